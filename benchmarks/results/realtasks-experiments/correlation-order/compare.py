"""Every comparison of this folder's records: each ordering against the task's own order
(paired by seed), and GBLR in each ordering against the best other family of the suite's
records (`benchmarks/results/realtasks/` and `realtasks-experiments/seeds-10-19/`; the
other families' runs are the same on every CPU: Monarch's 40 runs on t1-mlp-perm were rerun
here, in `t1-mlp-perm.json`, and equal the suite's bit for bit). Mean ± standard error.

    python benchmarks/results/realtasks-experiments/correlation-order/compare.py
"""

from __future__ import annotations

import collections
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parents[1]
TASKS = ("t1-mlp-perm", "t1-mlp", "t1-mlp-few", "t1-mlp-shift")


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    seeds = sorted(set(a) & set(b))
    differences = [a[s] - b[s] for s in seeds]
    error = statistics.stdev(differences) / len(differences) ** 0.5
    return f"{statistics.mean(differences):+.2f} ± {error:.2f} (n={len(seeds)})"


def families(task: str) -> dict[tuple[str, float], dict[int, float]]:
    """Accuracy in % by (family, budget) and seed, every family but GBLR and dense."""
    found: dict[tuple[str, float], dict[int, float]] = collections.defaultdict(dict)
    for path in (
        RESULTS / "realtasks" / f"{task}.json",
        RESULTS / "realtasks-experiments" / "seeds-10-19" / f"{task}.json",
    ):
        for run in json.loads(path.read_text())["runs"]:
            other = run["structure"] not in ("gblr", "dense")
            if other and not run.get("options") and not run.get("quick"):
                found[(run["structure"], run["budget"])][run["seed"]] = run["accuracy"] * 100
    return found


for task in TASKS:
    gblr: dict[tuple[str, float], dict[int, float]] = collections.defaultdict(dict)
    for run in json.loads((HERE / f"{task}.json").read_text()):
        if run["structure"] == "gblr":
            gblr[(run["ordering"], run["budget"])][run["seed"]] = run["accuracy"] * 100
    others = families(task)
    for (ordering, budget), runs in sorted(gblr.items()):
        seeds = sorted(runs)
        candidates = {
            family: values
            for (family, at), values in others.items()
            if at == budget and all(s in values for s in seeds)
        }
        best = max(candidates, key=lambda f: statistics.mean(candidates[f][s] for s in seeds))
        line = (
            f"{task:13s} {budget:<4g} {ordering:6s} GBLR {statistics.mean(runs.values()):.2f} "
            f"- {best} {paired(runs, candidates[best])}"
        )
        if ordering != "none":
            line += f"; - own order {paired(runs, gblr[('none', budget)])}"
        print(line)

# Block-diagonal in the best chain's order (t1-mlp-perm), against its own suite rows and
# against GBLR in the same order.
records = json.loads((HERE / "t1-mlp-perm.json").read_text())
ordered: dict[tuple[str, float], dict[int, float]] = collections.defaultdict(dict)
for run in records:
    if run["ordering"] == "bestchain":
        ordered[(run["structure"], run["budget"])][run["seed"]] = run["accuracy"] * 100
suite = families("t1-mlp-perm")
for budget in (0.1, 0.2):
    blocks = ordered.get(("blockdiag", budget))
    if blocks:
        print(
            f"t1-mlp-perm   {budget:<4g} bestchain block-diagonal "
            f"{statistics.mean(blocks.values()):.2f} - own order "
            f"{paired(blocks, suite[('blockdiag', budget)])}; GBLR (bestchain) - it "
            f"{paired(ordered[('gblr', budget)], blocks)}"
        )
