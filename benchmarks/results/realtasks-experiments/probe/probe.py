"""Development probe: does a short run on 90% of the training images, scored on the other
10%, pick the start that wins the full run? The default start against the learned start
of before 2026-12-06, on the pixel MLPs of T1 (README beside this file).

    OMP_NUM_THREADS=1 python benchmarks/results/realtasks-experiments/probe/probe.py STEPS
    OMP_NUM_THREADS=1 python benchmarks/results/realtasks-experiments/probe/probe.py 240 \
        --tasks vit mixer --seeds 0 1 2 3 4 --out probe_240_vit_mixer.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # benchmarks/
import realtask_vision as vision  # noqa: E402
from gblr.recipes.engine import EngineConfig, train_classifier  # noqa: E402
from gblr.recipes.models import structure_model  # noqa: E402
from realtask_options import scratch_options  # noqa: E402

LEARNED = {
    "structure": {"structure_init": "blocks", "factor_init": "balanced"},
    "start_cost_ratio": 3.0,
    "sigma": [1.0, 100.0],
    "learner_config": {"hold_narrow_sides": 0},
}
TASKS = {
    "mlp-few": vision._few_data,
    "mlp-shift": vision._shifted_data,
    "mlp": vision._upsampled_data,
    "vit": vision._data,
    "mixer": vision._data,
}


def held_out_scores(task, images, labels, kept, held, budget, seed, options, steps):
    """``(cross-entropy, accuracy)`` on ``held`` after ``steps`` steps on ``kept``."""
    variant = scratch_options(options, budget, "T1")
    torch.manual_seed(seed)
    model = vision._model(task)
    structure_model(model, "gblr", variant.start_cost, seed=seed, **variant.structure)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = EngineConfig(
            steps=steps, lr=vision.LR, warmup_steps=steps // 3, budget=budget,
            learner=variant.learner, out_dir=folder, seed=seed, progress=False,
            logger=None, trainer={"accelerator": "cpu"}, **variant.engine,
        )  # fmt: skip
        train_classifier(model, TensorDataset(images[kept], labels[kept]), None, config)
    model.eval()
    with torch.no_grad():
        logits = model(images[held])
    loss = float(torch.nn.functional.cross_entropy(logits, labels[held]))
    return loss, float((logits.argmax(1) == labels[held]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", type=int, nargs="?", default=80)
    parser.add_argument(
        "--tasks", nargs="+", choices=list(TASKS), default=["mlp-few", "mlp-shift", "mlp"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", help="file name beside this script (default probe_STEPS.json)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    steps = args.steps
    rows = []
    for task in args.tasks:
        images, labels = TASKS[task]()[0].tensors
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(123))
        held, kept = order[: len(labels) // 10], order[len(labels) // 10 :]
        for budget in (0.1, 0.2):
            for seed in args.seeds:
                row = {
                    name: held_out_scores(
                        task, images, labels, kept, held, budget, seed, options, steps
                    )
                    for name, options in (("default", {}), ("learned", LEARNED))
                }
                rows.append((task, budget, seed, row))
                print(task, budget, seed, row, flush=True)
    with open(HERE / (args.out or f"probe_{steps}.json"), "w") as handle:
        json.dump(rows, handle)


if __name__ == "__main__":
    main()
