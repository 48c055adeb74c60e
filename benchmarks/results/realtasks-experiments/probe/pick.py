"""What a start picked by the 240-step probe would score: per task, budget and seed, the
full run of the start with the higher held-out probe accuracy (the default on a tie),
against the default and the learned start alone and the best other family (means over
seeds 0-4). Full runs: the suite's GBLR rows (default start) and `learned-start-now/`
(the learned start, the same code). README beside this file.

    python benchmarks/results/realtasks-experiments/probe/pick.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = HERE.parents[1] / "realtasks"
PROBES = ("probe_240.json", "probe_240_seeds34.json", "probe_240_vit_mixer.json")
TASKS = {
    "mlp-few": "t1-mlp-few",
    "mlp-shift": "t1-mlp-shift",
    "mlp": "t1-mlp",
    "vit": "t1-vit",
    "mixer": "t1-mixer",
}


def main() -> None:
    probe = {}
    for name in PROBES:
        for task, budget, seed, row in json.loads((HERE / name).read_text()):
            probe[(task, budget, seed)] = row
    print("| task | budget | default | learned | probe's pick | picks | best other family |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for short, task in TASKS.items():
        suite = json.loads((SUITE / f"{task}.json").read_text())["runs"]
        learned_runs = json.loads((HERE / "learned-start-now" / f"{task}.json").read_text())
        for budget in (0.1, 0.2):
            default = {
                r["seed"]: 100 * r["accuracy"]
                for r in suite
                if r["label"] == "gblr" and r["budget"] == budget
            }
            learned = {
                r["seed"]: 100 * r["accuracy"]
                for r in learned_runs["runs"]
                if r["budget"] == budget
            }
            others: dict[str, list[float]] = {}
            for r in suite:
                within = r.get("macs_ratio", 0) <= budget * 1.0001
                if r["structure"] not in ("gblr", "dense") and r["budget"] == budget and within:
                    others.setdefault(r["structure"], []).append(100 * r["accuracy"])
            best = max((statistics.mean(v), k) for k, v in others.items())
            seeds = sorted(s for s in default if (short, budget, s) in probe and s in learned)
            picks, picked = "", []
            for seed in seeds:
                scores = probe[(short, budget, seed)]
                if scores["learned"][1] > scores["default"][1]:
                    picks, picked = picks + "L", [*picked, learned[seed]]
                else:
                    picks, picked = picks + "d", [*picked, default[seed]]

            def mean(values: list[float]) -> str:
                return f"{statistics.mean(values):.2f}"

            print(
                f"| {task} | {budget} | {mean([default[s] for s in seeds])} | "
                f"{mean([learned[s] for s in seeds])} | {mean(picked)} | {picks} | "
                f"{best[1]} {best[0]:.2f} |"
            )


if __name__ == "__main__":
    main()
