"""Wall time and error of ``gblr.fit_dense`` against truncated SVD at equal MACs.

    python benchmarks/bench_search.py            # CPU, about 3 minutes on 2 cores

For 768x3072 and 3072x768 (ViT-B MLP shapes) at MAC budgets 0.2 and 0.4, two matrices:
``gaussian`` (i.i.d., no structure: the hard case, where SVD is near optimal) and
``blocks`` (two wide rank-1 components plus 32 localized rank-8 blocks, some wrapping, and
1% noise: more rank than the budget's SVD can hold, at about 3% of the dense MACs as an
exact GBLR matrix — the kind of structure GBLR is for). Error is the relative Frobenius error.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gblr
from bench_layer import machine_description, write_json_atomically
from gblr.compress.search import _error, _svd_layer
from gblr.cost import fraction_budget_macs

RESULTS = Path(__file__).resolve().parent / "results"


def make_matrix(kind: str, m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(m, n, generator=generator) / n**0.5
    weight = 0.01 * torch.randn(m, n, generator=generator) / n**0.5
    for _ in range(2):  # wide low-rank components
        rows, cols = torch.randn(m, generator=generator), torch.randn(n, generator=generator)
        weight += torch.outer(rows, cols) / n**0.5
    for _ in range(32):  # localized rank-8 blocks, some wrapping around: 256 ranks in all
        rows = int(torch.randint(m // 32, m // 8, (1,), generator=generator))
        cols = int(torch.randint(n // 32, n // 8, (1,), generator=generator))
        r0 = int(torch.randint(0, m, (1,), generator=generator))
        c0 = int(torch.randint(0, n, (1,), generator=generator))
        left = torch.randn(rows, 8, generator=generator)
        block = left @ torch.randn(8, cols, generator=generator)
        row_index = (torch.arange(rows) + r0) % m
        col_index = (torch.arange(cols) + c0) % n
        weight[row_index[:, None], col_index] += block / (8 * cols) ** 0.5
    return weight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["768x3072", "3072x768"], help="OUT x IN")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--kinds", nargs="+", default=["gaussian", "blocks"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = []
    for shape in args.shapes:
        m, n = (int(v) for v in shape.lower().split("x"))
        for kind in args.kinds:
            weight = make_matrix(kind, m, n, torch.Generator().manual_seed(0)).to(device)
            for budget in args.budgets:
                macs = fraction_budget_macs(budget, None, m * n, fraction_name="budget")
                svd_error = _error(_svd_layer(weight, macs, 1), weight)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                layer = gblr.fit_dense(weight, budget)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                error = _error(layer, weight)
                case = {
                    "shape": [m, n],
                    "kind": kind,
                    "budget": budget,
                    "seconds": seconds,
                    "error": error,
                    "svd_error": svd_error,
                    "error_over_svd": error / svd_error,
                    "macs_ratio": layer.flops() / (m * n),
                    "components": layer.live_components(),
                }
                results.append(case)
                print(
                    f"{m}x{n} {kind:8s} budget {budget:.2f}: {seconds:6.1f} s  error {error:.4f}"
                    f"  svd {svd_error:.4f}  ratio {error / svd_error:.3f}"
                    f"  macs {case['macs_ratio']:.3f}  live {case['components']}",
                    flush=True,
                )
    payload = {
        "benchmark": "bench_search",
        "what": "fit_dense wall time and relative Frobenius error vs truncated SVD, equal MACs",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "device": str(device),
        "torch": torch.__version__,
        "results": results,
    }
    output = args.output or RESULTS / f"bench_search_{device.type}.json"
    write_json_atomically(output, payload)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
