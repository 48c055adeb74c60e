"""Train from scratch with learned GBLR structure, on the Lightning engine, from Python.

The same as `gblr train --config digits-vit-gblr`, as an API call: load a shipped config
(or your own YAML), change keys, train. Lightning handles devices, precision, logging and
checkpoints; the structure learner brings the MACs of the blocks to the budget.

    python examples/train_from_scratch.py                 # 1500 steps, ~1 min on CPU
    python examples/train_from_scratch.py --smoke         # 30 steps (CI)
"""

import argparse
import tempfile

from gblr.recipes.config import load_config
from gblr.recipes.train import train_from_config

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="digits-vit-gblr", help="shipped name or YAML file")
parser.add_argument("--smoke", action="store_true", help="30 steps")
args = parser.parse_args()

out = tempfile.mkdtemp(prefix="gblr-run-")
overrides = [f"out={out}", "structure.budget=0.3"]
if args.smoke:
    overrides += ["optim.steps=30", "optim.warmup=10", "trainer.log_every_n_steps=5"]
config = load_config(args.config, overrides)
result = train_from_config(config, progress=not args.smoke)
print(
    f"test accuracy {result['accuracy']:.3f} at {result['macs_ratio']:.3f} of the blocks' "
    f"dense MACs ({result['gflops'] * 1e3:.3f} MFLOPs per image); run folder {out} holds "
    "config.yaml, checkpoints/, metrics.csv, model_state.pt, results.json and REPORT.md"
)
assert result["macs_ratio"] <= 0.3 + 1e-6
