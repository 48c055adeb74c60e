"""How far below ``nn.Linear`` any frozen layer can go on this CPU (issue 7's CPU target).

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_floor.py --threads 1

Issue 7 asks, at >= 4096 rows, for ``time / nn.Linear time <= 1.5 x MACs ratio``. This
measures the cheapest possible structure at each MACs ratio, as a ratio to ``nn.Linear``
of the same shape timed in alternation in the same process (medians):

- ``lowrank``: one rank-``r`` product ``(x V^T) U^T`` with ``r = ratio * in * out / (in +
  out)``, the fewest GEMM calls any structure with that many MACs can take (a learned
  structure, with narrow components, needs many thinner ones);
- ``lowrank_reused``: the same into output and intermediate buffers allocated once;
- ``linear_reused``: the dense product into a reused output buffer.

A fresh float32 output of ``rows x out`` is new memory for every call (glibc serves
allocations above 32 MB with mmap and returns them on free), so each call pays the page
faults of writing it once; ``nn.Linear`` pays them too, but they are a fixed cost that a
structure cannot shrink. The ``_reused`` columns show what is left without them.

Writes ``benchmarks/results/bench_cpu_floor.json``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import alternate
from bench_layer import RESULTS, machine_description, write_json_atomically


def measure(in_f: int, out_f: int, ratio: float, rows: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    rank = max(1, round(ratio * in_f * out_f / (in_f + out_f)))
    dense = nn.Linear(in_f, out_f)
    x = torch.randn(rows, in_f)
    v, u = torch.randn(rank, in_f), torch.randn(out_f, rank)
    out, z = torch.empty(rows, out_f), torch.empty(rows, rank)
    weight_t = dense.weight.detach().T
    runs = {
        "nn.Linear": lambda: dense(x),
        "linear_reused": lambda: torch.addmm(dense.bias, x, weight_t, out=out),
        "lowrank": lambda: (x @ v.T) @ u.T,
        "lowrank_reused": lambda: torch.mm(torch.mm(x, v.T, out=z), u.T, out=out),
    }
    ms = alternate(runs, repeats, warmup, torch.device("cpu"))
    with torch.no_grad():  # the reused-buffer product computes what the fresh one does
        fresh = (x @ v.T) @ u.T
        runs["lowrank_reused"]()
        assert torch.allclose(fresh, out, rtol=1e-4, atol=1e-3)
    return {
        "shape": f"{in_f}x{out_f}",
        "macs_ratio": rank * (in_f + out_f) / (in_f * out_f),
        "rank": rank,
        "rows": rows,
        "ms": ms,
        "ratio_vs_linear": {name: ms[name] / ms["nn.Linear"] for name in ms if name != "nn.Linear"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["768x3072", "3072x768"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--rows", nargs="+", type=int, default=[4096])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_cpu_floor.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows_out = []
    for shape in args.shapes:
        in_f, out_f = (int(side) for side in shape.split("x"))
        for ratio in args.ratios:
            for rows in args.rows:
                row = measure(in_f, out_f, ratio, rows, args.repeats, args.warmup)
                rows_out.append(row)
                ratios = " ".join(f"{k} {v:.3f}" for k, v in row["ratio_vs_linear"].items())
                print(
                    f"{shape} MACs {row['macs_ratio']:.3f} rows {rows}: nn.Linear "
                    f"{row['ms']['nn.Linear']:.1f} ms | {ratios} | target "
                    f"{1.5 * row['macs_ratio']:.3f}",
                    flush=True,
                )
    payload = {
        "benchmark": "bench_cpu_floor",
        "machine": machine_description(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "repeats": args.repeats,
        "rows": rows_out,
    }
    write_json_atomically(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
