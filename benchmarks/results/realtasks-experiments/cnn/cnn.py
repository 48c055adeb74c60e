"""A small CNN on the upsampled digits, its two middle convolutions GBLR at 0.1 of their
MACs (development check, not a suite task: the baseline families have no convolution).

The model: a dense 3x3 stem (1 -> 64 channels), two 3x3 convolutions 64 -> 128 and
128 -> 128 (``blocks.0``, ``blocks.1``: the structured ones; max-pooling between them),
global average pooling and a dense head; GELU after each convolution. Data: t1-mlp's
(the digits bilinearly upsampled to 16x16 with pixel noise, 1,348 training / 449 test
images). Training: the suite's engine for 400 steps (lr 2e-3, warm-up over a third,
batch 64), ``structure_model`` at the library's defaults, the structure learning rate
given by ``--structure-lr`` (default: the engine's). ``--groups G`` instead makes the two
convolutions dense ``nn.Conv2d(..., groups=G)`` (block-diagonal over channels, the
hand-designed counterpart: 8 groups cost 0.125 of the MACs, 16 cost 0.0625).

    PYTHONPATH=src:benchmarks python benchmarks/results/realtasks-experiments/cnn/cnn.py \\
        --seed 0 [--structure-lr 0.002] [--groups 8] [--out results.jsonl]

Appends one JSON line per run to ``--out`` (default: results.jsonl beside this file).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import gblr
import realtask_vision
from gblr.recipes.engine import EngineConfig, train_classifier
from gblr.recipes.models import structure_model

BUDGET, STEPS = 0.1, 400


class DigitsCnn(nn.Module):
    """Images ``(N, 1, 16, 16)`` -> logits ``(N, 10)``."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 64, 3, padding=1)
        self.blocks = nn.ModuleList(
            [
                nn.Conv2d(64, 128, 3, padding=1, groups=groups),
                nn.Conv2d(128, 128, 3, padding=1, groups=groups),
            ]
        )
        self.head = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.stem(images))
        x = nn.functional.max_pool2d(nn.functional.gelu(self.blocks[0](x)), 2)
        x = nn.functional.gelu(self.blocks[1](x))
        return self.head(x.mean((2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structure-lr", type=float, default=None)
    parser.add_argument("--groups", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.jsonl"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    train, test = realtask_vision._upsampled_data()
    torch.manual_seed(args.seed)
    model = DigitsCnn(args.groups or 1)
    if args.groups is None:
        structure_model(model, "gblr", BUDGET, seed=args.seed)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = EngineConfig(
            steps=STEPS,
            lr=2e-3,
            warmup_steps=STEPS // 3,
            budget=BUDGET if args.groups is None else None,
            structure_lr=args.structure_lr,
            out_dir=folder,
            seed=args.seed,
            progress=False,
            logger=None,
            trainer={"accelerator": "cpu"},
        )
        result = train_classifier(model, train, test, config)
    live = {name: layer.live_components() for name, layer in gblr.learn.groups.gblr_layers(model)}
    record = {
        "seed": args.seed,
        "structure_lr": args.structure_lr,
        "groups": args.groups,
        "accuracy": result["accuracy"],
        "macs_ratio": result["macs_ratio"],
        "seconds": result["seconds"],
        "live_components": live,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(record))
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
