"""Where the start probe's 0.7 points on the 300-image MLP go (t1-mlp-few at 0.1).

The default start trained for the probe's 40% of the run on a Subset of the training
set, then resumed on the whole set, as the probe's "continue" does:

    B: the probe's 270 images (the 30 of StartProbe(split_seed=0) held out);
    C: all 300 images through a Subset, in the same permuted order;
    D: no Subset (stopped and resumed on the whole set: the unprobed run, bit for bit).

    cd benchmarks/results/realtasks-experiments/probe-cost
    OMP_NUM_THREADS=1 xargs -P 2 -L 1 python run.py < jobs.txt > results.jsonl
"""

import dataclasses
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import realtask_vision as vision
from gblr.recipes.engine import train_classifier
from gblr.recipes.models import structure_model
from realtask_options import scratch_options


def _structured(budget_start: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = vision._model("mlp-few")
    structure_model(model, "gblr", budget_start, seed=seed)
    return model


def main(mode: str, budget: float, seed: int) -> None:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variant = scratch_options({}, budget, "T1")
    model = _structured(variant.start_cost, seed)
    train, test = vision._few_data()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    held = {"B": 30, "C": 0, "D": 0}[mode]
    first_part = train if mode == "D" else Subset(train, order[held:])
    steps = vision.STEPS
    stop = int(0.4 * steps)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = vision.engine_config(steps, budget, seed, variant, folder)
        probe_config = dataclasses.replace(
            config,
            stop_after=stop,
            checkpoint_dir=Path(folder) / "probe",
            checkpoint_every_n_steps=stop,
            out_dir=None,
            val_every_n_steps=None,
        )
        train_classifier(model, first_part, None, probe_config)
        resumed = dataclasses.replace(config, resume=Path(folder) / "probe" / "last.ckpt")
        fresh = _structured(variant.start_cost, seed)
        result = train_classifier(fresh, train, test, resumed)
    print(json.dumps({"mode": mode, "budget": budget, "seed": seed, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
