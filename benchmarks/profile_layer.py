"""Where a ``GBLRLinear`` training step spends its time: a ``torch.profiler`` table.

    python benchmarks/profile_layer.py                        # CPU
    python benchmarks/profile_layer.py --device cuda --autocast bf16 --rows 8192

Prints the operators of a few profiled steps (forward + backward, fixed upstream
gradient) sorted by device time, and the number of kernel launches per step: on a GPU a
step that launches many small kernels is bound by launch overhead, not arithmetic.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import gblr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--shape", default="768x3072", help="IN x OUT")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    in_features, out_features = (int(v) for v in args.shape.lower().split("x"))
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(
        in_features, out_features, structure_init="full", sigma=1.0, device=device
    ).train()
    x = torch.randn(args.rows, in_features, device=device, requires_grad=True)
    grad_output = torch.randn(args.rows, out_features, device=device)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = layer(x)
        out.backward(grad_output.to(out.dtype))

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        torch.cuda.synchronize()
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30))
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_us = sum(e.device_time for e in kernels) / args.steps
        print(
            f"per step: {len(kernels) / args.steps:.0f} kernels, "
            f"{device_us / 1e3:.3f} ms of kernel time"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
