"""Development runner of the T1 tasks (a record, see README.md).

    python exp.py TASK OUT.json NAME STRUCTURE BUDGET 'JSON' [NAME STRUCTURE BUDGET JSON ...]

runs seeds $SEEDS (default 0-4) of each, $WORKERS (2) at a time, and appends to OUT.json.
"""

import concurrent.futures
import json
import os
import statistics
import sys

sys.path.insert(0, os.environ.get("BENCH", "/work/wt-diag/benchmarks"))


def one(args):
    import torch

    torch.set_num_threads(1)
    task, name, structure, budget, opts, seed = args
    import realtask_vision as rv

    fn = {
        "t1-mlp": lambda *a: rv.train_digits("mlp", *a),
        "t1-mlp-shift": lambda *a: rv.train_digits("mlp-shift", *a),
        "t1-vit": lambda *a: rv.train_digits("vit", *a),
        "t1-mixer": lambda *a: rv.train_digits("mixer", *a),
    }[task]
    r = fn(structure, budget, seed, False, opts)
    r.update(name=name, seed=seed, budget=budget)
    return r


if __name__ == "__main__":
    import multiprocessing

    task, out = sys.argv[1], sys.argv[2]
    rest = sys.argv[3:]
    seeds = [int(s) for s in os.environ.get("SEEDS", "0 1 2 3 4").split()]
    jobs = []
    for i in range(0, len(rest), 4):
        name, structure, budget, opts = rest[i : i + 4]
        for seed in seeds:
            jobs.append((task, name, structure, float(budget), json.loads(opts), seed))
    results = []
    if os.path.exists(out):
        with open(out) as handle:
            results = json.load(handle)
    done = {(r["name"], r["budget"], r["seed"]) for r in results}
    jobs = [j for j in jobs if (j[1], j[3], j[5]) not in done]
    with concurrent.futures.ProcessPoolExecutor(
        int(os.environ.get("WORKERS", 2)), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        for r in pool.map(one, jobs):
            results.append(r)
            with open(out + ".tmp", "w") as handle:
                json.dump(results, handle, indent=1)
            os.replace(out + ".tmp", out)
            print(
                r["name"],
                r["budget"],
                r["seed"],
                round(r["accuracy"] * 100, 2),
                {
                    k: round(v, 4)
                    for k, v in r.items()
                    if k in ("test_loss", "train_loss", "train_accuracy", "macs_ratio", "seconds")
                },
                flush=True,
            )
    by = {}
    for r in results:
        by.setdefault((r["name"], r["budget"]), []).append(r)
    for (n, b), rs in by.items():
        acc = [r["accuracy"] * 100 for r in rs]
        extra = {
            k: round(statistics.mean(r[k] for r in rs), 4)
            for k in ("test_loss", "train_loss", "train_accuracy")
            if k in rs[0]
        }
        print(
            f"{n:12s} {b:.2f} n={len(rs)} {statistics.mean(acc):6.2f}",
            f"± {statistics.stdev(acc) if len(acc) > 1 else 0:.2f}",
            extra,
        )
