"""One training step (forward + backward) of ``GBLRLinear`` at full width vs ``nn.Linear``.

Shapes are ViT-S and ViT-B MLP layers (384x1536, 768x3072); rows are tokens in a batch.
Each repeat times the GBLR step and the ``nn.Linear`` step back to back (alternating which
goes first), so both see the same machine load; the reported ratio is the median of the
per-repeat ratios.

    python benchmarks/bench_layer.py                 # CPU, writes benchmarks/results/
    python benchmarks/bench_layer.py --device cuda --autocast bf16 --rows 8192
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gblr
from gblr.files import save_atomically

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(layer: nn.Module, x: torch.Tensor, autocast: torch.dtype | None, graph: bool = False):
    # A fixed upstream gradient instead of a loss: the step is the layer's work alone.
    with (
        torch.no_grad(),
        torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None),
    ):
        grad_output = torch.randn_like(layer(x))
    if graph:
        # CUDA graph of forward and backward: what the step costs without launch overhead.
        with torch.autocast(
            x.device.type, dtype=autocast, enabled=autocast is not None, cache_enabled=False
        ):
            layer = torch.cuda.make_graphed_callables(layer, (x,))

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(
            x.device.type, dtype=autocast, enabled=autocast is not None, cache_enabled=not graph
        ):
            out = layer(x)
        out.backward(grad_output)

    return step


def time_step(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def bench_case(
    in_features: int,
    out_features: int,
    rows: int,
    device: torch.device,
    autocast: torch.dtype | None,
    repeats: int,
    warmup: int,
    graph: bool = False,
    compile_mode: str | None = None,
) -> dict:
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, device=device)
    structured = gblr.GBLRLinear(
        in_features, out_features, structure_init="full", sigma=1.0, device=device
    ).train()
    gblr_layer = structured
    x = torch.randn(rows, in_features, device=device, requires_grad=True)
    if compile_mode is not None:
        dense = torch.compile(dense, mode=compile_mode)
        structured = torch.compile(structured, mode=compile_mode)
    steps = {
        "gblr": _step_fn(structured, x, autocast, graph),
        "linear": _step_fn(dense, x, autocast, graph),
    }
    for _ in range(warmup):
        for step in steps.values():
            time_step(step, device)
    times: dict[str, list[float]] = {"gblr": [], "linear": []}
    ratios = []
    for repeat in range(repeats):
        order = ["gblr", "linear"] if repeat % 2 == 0 else ["linear", "gblr"]
        this = {name: time_step(steps[name], device) for name in order}
        for name, seconds in this.items():
            times[name].append(seconds)
        ratios.append(this["gblr"] / this["linear"])
    return {
        "shape": [out_features, in_features],
        "rows": rows,
        "num_components": gblr_layer.num_components,
        "evaluation_order": gblr_layer._choose_order(rows),
        "linear_ms_median": 1e3 * statistics.median(times["linear"]),
        "gblr_ms_median": 1e3 * statistics.median(times["gblr"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "repeats": repeats,
        "cuda_graph": graph,
        "compile": compile_mode,
    }


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def write_json_atomically(path: Path, payload: dict) -> None:
    save_atomically(lambda handle: json.dump(payload, handle, indent=2), path, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 64])
    parser.add_argument(
        "--shapes", nargs="+", default=["384x1536", "768x3072"], help="IN x OUT of each layer"
    )
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="JSON path")
    parser.add_argument(
        "--graph", action="store_true", help="CUDA only: time CUDA-graph replays of each step"
    )
    parser.add_argument(
        "--compile", default=None, help="torch.compile both layers with this mode ('default')"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    results = []
    for shape in args.shapes:
        in_features, out_features = (int(v) for v in shape.lower().split("x"))
        for rows in args.rows:
            case = bench_case(
                in_features,
                out_features,
                rows,
                device,
                autocast,
                args.repeats,
                args.warmup,
                args.graph,
                args.compile,
            )
            results.append(case)
            print(
                f"{in_features}x{out_features} rows={rows:5d} order={case['evaluation_order']:11s}"
                f" linear {case['linear_ms_median']:8.2f} ms  gblr {case['gblr_ms_median']:8.2f} ms"
                f"  ratio {case['ratio_median']:.3f} [{case['ratio_min']:.3f}, "
                f"{case['ratio_max']:.3f}]",
                flush=True,
            )
    payload = {
        "benchmark": "bench_layer",
        "what": "one training step (forward + backward), GBLRLinear full width vs nn.Linear",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "device": str(device),
        "autocast": args.autocast,
        "cuda_graph": args.graph,
        "compile": args.compile,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "results": results,
    }
    suffix = ("_graph" if args.graph else "") + (f"_compile-{args.compile}" if args.compile else "")
    output = args.output or RESULTS / f"bench_layer_{device.type}_{args.autocast}{suffix}.json"
    write_json_atomically(output, payload)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
