"""Inference speed of frozen GBLR layers in every execution plan, against ``nn.Linear``.

    python benchmarks/bench_deploy.py --threads 1     # CPU; about 5 minutes

For each shape (in x out), MACs ratio and row count: a GBLR layer with a structure typical
of learned ones (``structure_init="half"``: half the MACs on full-width low-rank
components, half on narrow localized ones) is frozen; each plan and an ``nn.Linear`` of
the same shape are timed in alternation in one process (median of the repeats, forward
under ``torch.no_grad()``), and :func:`gblr.plan` is run on the same input for its choice.
Writes ``benchmarks/results/bench_deploy_<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gblr
from bench_layer import machine_description, write_json_atomically
from gblr.deploy import PLANS

RESULTS = Path(__file__).resolve().parent / "results"


def timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(in_f, out_f, ratio, rows, repeats, warmup, device, dtype) -> dict:
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(in_f, out_f, structure_init="half", init_cost=ratio).eval()
    frozen = gblr.FrozenGBLRLinear.from_gblr(layer).to(device=device, dtype=dtype)
    dense = nn.Linear(in_f, out_f).to(device=device, dtype=dtype)
    x = torch.randn(rows, in_f, device=device, dtype=dtype)
    runs = {"nn.Linear": lambda: dense(x)}

    def plan_run(name):
        def run():
            frozen.plan = name
            frozen(x)

        return run

    for name in PLANS:
        runs[name] = plan_run(name)
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                runs[name]()
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timed(runs[name], device))
        frozen.plan = "auto"
        report = gblr.plan(frozen, x, repeats=repeats, warmup=warmup)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    linear = medians["nn.Linear"]
    best = min(PLANS, key=medians.__getitem__)
    return {
        "shape": f"{in_f}x{out_f}",
        "macs_ratio": frozen.flops() / frozen.dense_flops(),
        "components": frozen.num_components,
        "rows": rows,
        "ms": medians,
        "ratio_vs_linear": {name: medians[name] / linear for name in PLANS},
        "best_plan": best,
        "best_ratio": medians[best] / linear,
        "planner_choice": report.layers[0].choice,
        "planner_ratio": medians[report.layers[0].choice] / linear,
        "planner_ms": report.layers[0].times_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=["768x3072", "3072x768"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 avoids the stalls of a thread that "
        "another process preempts inside a parallel region, on a shared machine",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    results = []
    for shape in args.shapes:
        in_f, out_f = (int(s) for s in shape.split("x"))
        for ratio in args.ratios:
            for rows in args.rows:
                row = measure(in_f, out_f, ratio, rows, args.repeats, args.warmup, device, dtype)
                results.append(row)
                plans = " ".join(f"{p} {row['ratio_vs_linear'][p]:.2f}" for p in PLANS)
                print(
                    f"{shape} MACs {row['macs_ratio']:.3f} rows {rows}: nn.Linear "
                    f"{row['ms']['nn.Linear']:.3g} ms | {plans} | planner {row['planner_choice']}"
                    f" {row['planner_ratio']:.2f}",
                    flush=True,
                )
    payload = {
        "benchmark": "bench_deploy",
        "machine": machine_description(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "date": datetime.date.today().isoformat(),
        "repeats": args.repeats,
        "results": results,
    }
    output = args.output or RESULTS / f"bench_deploy_{device.type}.json"
    write_json_atomically(output, payload)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
