"""The learner's step with and without the thresholds around the cost's linear estimate
costed first, on real data, in lockstep.

    OMP_NUM_THREADS=1 python benchmarks/results/mlp-step-time/learner_estimate.py

Two copies of the same model (the real-task suite's pixel MLP at 0.1 and 0.2, the digits
ViT at 0.1 on 8x8 images), the library's default start and learner, trained side by side
on the same batches of the training images (800 steps, batch 64, one torch thread): one
learner with ``_ESTIMATE_MACS`` as the library has it, one with it empty (the form before
2026-12-07, afternoon), each copy's training and learner steps alternating which goes
first. Checks that the thresholds and every parameter stay equal bit for bit, and writes
each learner's median ms per 100-step segment to ``learner_estimate.json`` beside this
script.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import gblr  # noqa: E402
import realtask_vision as vision  # noqa: E402
from bench_layer import machine_description, write_json_atomically  # noqa: E402
from gblr.learn import learner as learner_module  # noqa: E402
from gblr.learn.groups import adamw  # noqa: E402
from gblr.recipes.models import structure_model  # noqa: E402

STEPS, SEGMENT = 800, 100
ESTIMATE_MACS = learner_module._ESTIMATE_MACS


def _copy(name: str, budget: float):
    torch.manual_seed(0)
    model = vision._model(name)
    structure_model(model, "gblr", budget, seed=0)
    optimizer = adamw(gblr.param_groups(model, lr=vision.LR, weight_decay=0.05))
    learner = gblr.StructureLearner(
        model, budget=budget, total_steps=STEPS, warmup_steps=STEPS // 3
    )
    return model, optimizer, learner


def _lockstep(name: str, budget: float) -> dict:
    copies = {"with_estimate": _copy(name, budget), "without_estimate": _copy(name, budget)}
    images, labels = vision._upsampled_data()[0].tensors
    if name == "vit":  # the suite's ViT reads the 8x8 digits
        images = torch.nn.functional.avg_pool2d(images, 2)
    generator = torch.Generator().manual_seed(0)
    seconds: dict[str, list[float]] = {form: [] for form in copies}
    for step in range(STEPS):
        index = torch.randint(0, len(labels), (64,), generator=generator)
        # Each copy trains last (its tensors the warmer in cache) and steps its learner
        # first on every other step.
        order = list(copies) if step % 2 == 0 else list(reversed(copies))
        for form in reversed(order):
            model, optimizer, _ = copies[form]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
        for form in order:
            learner_module._ESTIMATE_MACS = ESTIMATE_MACS if form == "with_estimate" else ()
            start = time.perf_counter()
            copies[form][2].step()
            seconds[form].append(time.perf_counter() - start)
        learner_module._ESTIMATE_MACS = ESTIMATE_MACS
        thresholds = {copies[form][2].threshold for form in copies}
        if len(thresholds) != 1:
            raise RuntimeError(f"{name} at {budget}: the thresholds differ at step {step}")
    (first, *_), (second, *_) = copies.values()
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        if not torch.equal(a, b):
            raise RuntimeError(f"{name} at {budget}: the parameters differ")
    return {
        form: [
            round(statistics.median(values[i : i + SEGMENT]) * 1e3, 3)
            for i in range(0, STEPS, SEGMENT)
        ]
        for form, values in seconds.items()
    }


def main() -> int:
    torch.set_num_threads(1)
    report = {
        "machine": machine_description(torch.device("cpu")),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "steps": STEPS,
        "learner_ms_per_segment": {
            f"{name}@{budget}": _lockstep(name, budget)
            for name, budget in (("mlp", 0.1), ("mlp", 0.2), ("vit", 0.1))
        },
    }
    print(json.dumps(report, indent=1))
    write_json_atomically(HERE / "learner_estimate.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
