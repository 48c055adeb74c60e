"""What a pick during the full schedule would score (reads trajectory.jsonl).

For each step k, a rule picks the learned start or the default one from the held-out
scores up to k; the score is the picked run's test accuracy at the end (both starts
trained on the same 90% of the training images, to the end). Rules: by default, the
learned start where its held-out accuracy at k beats the default's by more than
``--margin`` points; with ``--z``, a paired t-test over the held-out images (each image's
right answers averaged over the evaluations from ``--mean-from`` to k), the learned start
where its lead is above ``z`` standard errors (what
``gblr.recipes.start_probe.challenger_lead`` computes).

    python benchmarks/results/realtasks-experiments/probe/pick_trajectory.py \
        --z 1 --mean-from 160
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def held_accuracy(run: dict, first: int, k: int) -> float:
    """Mean held-out accuracy (%) of ``run`` over its evaluations from ``first`` to ``k``."""
    values = [v[1] for step, v in run["held"].items() if first <= int(step) <= k]
    return statistics.mean(values) * 100


def paired_lead(default: dict, learned: dict, chosen: list[str]) -> tuple[float, float]:
    """``(lead, standard error)`` of the learned start over the images, each image's right
    answers averaged over the evaluations ``chosen``."""

    def right(run: dict) -> list[float]:
        rows = [run["held"][t][2] for t in chosen]
        return [statistics.mean(int(row[i]) for row in rows) for i in range(len(rows[0]))]

    diffs = [y - x for x, y in zip(right(default), right(learned))]
    return statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def picks_learned(run: dict, k: int, steps: list[int], args: argparse.Namespace) -> bool:
    first = k if args.mean_from is None else args.mean_from
    if args.z is None:
        lead = held_accuracy(run["learned"], first, k) - held_accuracy(run["default"], first, k)
        return lead > args.margin
    chosen = [str(t) for t in steps if first <= t <= k]
    lead, error = paired_lead(run["default"], run["learned"], chosen)
    return lead > 0 and lead > args.z * error


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", default="trajectory.jsonl")
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--z", type=float, default=None)
    parser.add_argument("--mean-from", type=int, default=None)
    args = parser.parse_args()
    runs: dict = defaultdict(dict)
    for line in (HERE / args.file).read_text().splitlines():
        row = json.loads(line)
        runs[(row["task"], row["budget"])].setdefault(row["seed"], {})[row["start"]] = row
    steps = sorted(
        {int(k) for cell in runs.values() for s in cell.values() for r in s.values()
         for k in r["held"]}
    )  # fmt: skip
    print("cell            default learned | pick at k: mean test (picks L of n)")
    print(" " * 31 + " ".join(f"{k:>11}" for k in steps))
    worst: dict = defaultdict(float)
    for cell, seeds in sorted(runs.items()):
        seeds = {s: r for s, r in seeds.items() if len(r) == 2}
        d = statistics.mean(r["default"]["test"][1] for r in seeds.values()) * 100
        learned = statistics.mean(r["learned"]["test"][1] for r in seeds.values()) * 100
        out = []
        for k in steps:
            picks = [picks_learned(r, k, steps, args) for r in seeds.values()]
            scores = [
                r["learned" if pick else "default"]["test"][1] * 100
                for pick, r in zip(picks, seeds.values())
            ]
            mean = statistics.mean(scores)
            worst[k] = min(worst[k], mean - max(d, learned))
            out.append(f"{mean:6.2f} ({sum(picks)}/{len(picks)})")
        print(f"{cell[0]:9} {cell[1]:4} {d:7.2f} {learned:7.2f} | " + " ".join(out))
    print("worst gap to the better start:", {k: round(v, 2) for k, v in worst.items()})


if __name__ == "__main__":
    main()
