"""Host-side cost of one training step at a size where device work is negligible.

    python benchmarks/bench_overhead.py --device cuda

Eager GPU steps of GBLR layers are bound by how fast the host issues kernels, not by the
GPU: this measures microseconds of host time per step (forward + backward at 64x64 with 8
rows) for ``nn.Linear``, ``GBLRLinear`` and ``mask_factors`` alone, as the median over
repeats of the mean of a loop of steps followed by one synchronization.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import gblr
from gblr.ops import mask_factors


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_us(step, device: torch.device, loops: int = 200, repeats: int = 9) -> float:
    for _ in range(20):
        step()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(loops):
            step()
        _sync(device)
        samples.append((time.perf_counter() - start) / loops * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size, rows = 64, 8
    x = torch.randn(rows, size, device=device, requires_grad=True)
    grad = torch.randn(rows, size, device=device)
    dense = nn.Linear(size, size, device=device)
    structured = gblr.GBLRLinear(size, size, sigma=2.0, device=device).train()

    def layer_step(layer):
        def step():
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)

        return step

    def mask_step():
        u, v = mask_factors(
            structured.U, structured.V, structured.widths, structured.locations, 2.0
        )
        (u.sum() + v.sum()).backward()

    def mask_forward():
        with torch.no_grad():
            mask_factors(structured.U, structured.V, structured.widths, structured.locations, 2.0)

    results = {
        "nn.Linear step": host_us(layer_step(dense), device),
        "GBLRLinear step": host_us(layer_step(structured), device),
        "mask_factors forward (no grad)": host_us(mask_forward, device),
        "mask_factors forward + backward": host_us(mask_step, device),
    }
    for name, micros in results.items():
        print(f"{name:34s} {micros:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
