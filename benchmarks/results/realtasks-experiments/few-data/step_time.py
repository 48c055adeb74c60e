"""Bare training step (forward, backward, AdamW foreach, structure learner) of the suite's
pixel MLP or MLP-Mixer at 0.1 of the MACs, batch 64, one torch thread: the default GBLR,
the held block-diagonal start (`bdpl0`), the fixed one (`bdfz-fn`) and low-rank, each
past 300 steps, then 60 steps of each, interleaved; medians in ms.

From the repository root: python
benchmarks/results/realtasks-experiments/few-data/step_time.py mlp|mixer
"""

import statistics
import sys
import time

sys.path.insert(0, "benchmarks")

import torch

import gblr
import realtask_vision as vision
from gblr.recipes.models import structure_model
from realtask_options import scratch_options

BUDGET = 0.1
LOCAL = {
    "structure": {"structure_init": "blockdiag", "factor_init": "fixed_norm"},
    "start_cost_ratio": 1.0,
    "sigma": None,
}
VARIANTS = {
    "default": {},
    "bdpl0": {**LOCAL, "learner_config": {"hold_narrow_sides": 1}},
    "bdfz-fn": {**LOCAL, "structure_lr": 0.0},
    "lowrank": None,
}


def stepper(name: str, options: dict | None, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = vision._model(name)
    learner, structure_lr = None, 6e-3
    if options is None:
        structure_model(model, "lowrank", BUDGET, seed=0)
    else:
        variant = scratch_options(options, BUDGET, "T1")
        structure_model(model, "gblr", variant.start_cost, seed=0, **variant.structure)
        learner = gblr.StructureLearner(
            model, variant.learner, budget=BUDGET, total_steps=800, warmup_steps=266,
            example_input=x[:1],
        )  # fmt: skip
        structure_lr = variant.engine.get("structure_lr", structure_lr)
    groups = gblr.param_groups(model, lr=2e-3, structure_lr=structure_lr, weight_decay=0.05)
    optimizer = torch.optim.AdamW(groups, foreach=True)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if learner is not None:
            learner.step()

    return step


def main(name: str) -> None:
    torch.set_num_threads(1)
    train, _ = (vision._upsampled_data if name == "mlp" else vision._data)()
    x, y = train.tensors[0][:64], train.tensors[1][:64]
    steps = {label: stepper(name, options, x, y) for label, options in VARIANTS.items()}
    for step in steps.values():
        for _ in range(300):
            step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(60):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    base = statistics.median(times["lowrank"])
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{name} {label:8s} {1000 * median:7.2f} ms  {median / base:.2f}x low-rank")


if __name__ == "__main__":
    main(sys.argv[1])
