"""Reproduce a paper experiment and compare it with the baselines at equal FLOPs.

Runs one shipped recipe for several structures and budgets (the `gblr sweep` command as
an API call) and prints the table that `sweep.md` holds; `sweep.png` plots accuracy (or
perplexity) against the whole model's GFLOPs. Finished runs are not repeated.

    python examples/reproduce_paper.py --config imagenet-vit-b-gblr data.root=/data/imagenet
    python examples/reproduce_paper.py --config wikitext103-gpt2-gblr --budgets 0.25 0.333
    python examples/reproduce_paper.py --smoke          # digits, tiny, seconds (CI)
"""

import argparse
import tempfile
from pathlib import Path

from gblr.recipes.config import load_config
from gblr.recipes.sweep import run_sweep

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="cifar10-vit-s-gblr", help="a shipped recipe")
parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE changes")
parser.add_argument("--structures", nargs="+", default=["dense", "gblr", "lowrank", "monarch"])
parser.add_argument("--budgets", nargs="+", type=float, default=None)
parser.add_argument("--out", default=None)
parser.add_argument("--smoke", action="store_true", help="the digits recipe, tiny")
args = parser.parse_args()

if args.smoke:
    args.config = "digits-vit-gblr"
    args.overrides = ["model.dim=32", "model.depth=1", "model.heads=2", "optim.steps=10"]
    args.overrides += ["optim.warmup=4"]
    args.structures, args.out = ["dense", "gblr", "lowrank"], tempfile.mkdtemp()
config = load_config(args.config, args.overrides)
budgets = args.budgets or [config.structure.budget]
out = args.out or f"{config.out}-sweep"
rows = run_sweep(config, args.structures, budgets, out, progress=not args.smoke)
print(Path(out, "sweep.md").read_text())
