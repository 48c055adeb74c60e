"""The recipes' default (the start probe) against ``structure.start=blockdiag``, through
``gblr train``'s own path (``train_from_config``): ``digits-vit-gblr`` at budget 0.1, the
ViT or (``mixer``) the Mixer, one seed per call; appends a line to ``results.jsonl`` next
to this file.

    OMP_NUM_THREADS=1 xargs -P 2 -L 1 python run.py < jobs.txt
"""

import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch  # noqa: F401  (sets its logger's level when imported)
import torch

from gblr.recipes.config import load_config
from gblr.recipes.train import train_from_config

torch.set_num_threads(1)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.simplefilter("ignore")
model, seed, variant = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with tempfile.TemporaryDirectory() as out:
    overrides = [
        *("structure.budget=0.1", f"seed={seed}", f"out={out}"),
        *("trainer.logger=none", "trainer.accelerator=cpu"),
        *(["model.name=mixer"] if model == "mixer" else []),
        *(["structure.start=blockdiag"] if variant == "blockdiag" else []),
    ]
    result = train_from_config(load_config("digits-vit-gblr", overrides), progress=False)
keys = ("accuracy", "macs_ratio", "seconds", "start", "probe_seconds")
line = {"model": model, "seed": seed, "variant": variant, **{k: result.get(k) for k in keys}}
with open(Path(__file__).with_name("results.jsonl"), "a") as handle:
    handle.write(json.dumps(line) + "\n")
print(line)
