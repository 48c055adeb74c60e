"""Inference speed of frozen GBLR layers and models against dense ones (issue 7).

    python benchmarks/bench_inference.py --threads 1              # CPU, ~15-25 minutes
    python benchmarks/bench_inference.py --device cuda --dtype bfloat16   # GPU

Layers: for each shape (in x out), MACs ratio and row count, a GBLR layer with a structure
typical of learned ones (``structure_init="half"``: half the MACs on full-width low-rank
components, half on narrow localized ones sliding along the diagonal) is frozen; every
plan and an ``nn.Linear`` of the same shape are timed in alternation in one process
(median of the repeats, forward under ``torch.no_grad()``); :func:`gblr.plan` is run on
the same input for its choice. The row reports ``best / nn.Linear`` (the fastest plan,
``dense`` included) and the planner's choice next to the MACs ratio.

Models: the demo's ViT (``gblr.recipes.models.VisionTransformer()``) and the paper's
CIFAR ViT-S/4, with their blocks' linear layers made GBLR at 0.3 of their MACs
(``structure_model(model, "gblr", 0.3)``), frozen and planned for the batch, against the
same model with dense layers: latency at batch 1 and throughput at batch 256.

On a GPU, the layer rows also give the roofline bound of issue 7: the time to read the
input and write the output once at the measured copy bandwidth, over the dense time.

Writes ``benchmarks/results/bench_inference_<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gblr
from bench_layer import machine_description, write_json_atomically
from gblr.deploy import GPU_PLANS, PLANS
from gblr.recipes.models import VisionTransformer, structure_model, vit_small_patch4_32

RESULTS = Path(__file__).resolve().parent / "results"


def timed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternate(runs: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median ms of each run; the order rotates every repeat so that drifts in machine
    load hit every candidate alike."""
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
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device: torch.device, dtype: torch.dtype) -> float:
    """Bytes per second of a device-to-device copy of 256 MB (read + write counted)."""
    x = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    seconds = alternate({"copy": lambda: y.copy_(x)}, 5, 2, device)["copy"] / 1e3
    return 2 * x.numel() / seconds


def measure_layer(in_f, out_f, ratio, rows, repeats, warmup, device, dtype, plans, bandwidth):
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(in_f, out_f, structure_init="half", init_cost=ratio).eval()
    frozen = gblr.FrozenGBLRLinear.from_gblr(layer).to(device=device, dtype=dtype)
    dense = nn.Linear(in_f, out_f).to(device=device, dtype=dtype)
    x = torch.randn(rows, in_f, device=device, dtype=dtype)
    with torch.no_grad():
        # Each plan's error against the dense product: a wrong fast plan is no result.
        reference = x.float() @ frozen.dense_weight().float().T + frozen.bias.float()
        errors = {}
        for name in plans:
            frozen.plan = name
            got = frozen(x).float()
            errors[name] = float((got - reference).norm() / reference.norm())

    def plan_run(name):
        def run():
            frozen.plan = name
            frozen(x)

        return run

    runs = {"nn.Linear": lambda: dense(x), **{name: plan_run(name) for name in plans}}
    medians = alternate(runs, repeats, warmup, device)
    frozen.plan = "auto"
    with torch.no_grad():
        report = gblr.plan(frozen, x, candidates=list(plans), repeats=repeats, warmup=warmup)
    linear = medians["nn.Linear"]
    best = min(plans, key=medians.__getitem__)
    choice = report.layers[0].choice
    row = {
        "shape": f"{in_f}x{out_f}",
        "macs_ratio": frozen.flops() / frozen.dense_flops(),
        "components": frozen.num_components,
        "rows": rows,
        "ms": medians,
        "ratio_vs_linear": {name: medians[name] / linear for name in plans},
        "rel_error_vs_dense": errors,
        "best_plan": best,
        "best_ratio": medians[best] / linear,
        "planner_choice": choice,
        "planner_ratio": medians[choice] / linear,
        "planner_ms": report.layers[0].times_ms,
    }
    if bandwidth is not None:
        # Roofline of issue 7: reading x and writing y once, over the dense time.
        moved = rows * (in_f + out_f) * x.element_size()
        row["activation_bound"] = max(row["macs_ratio"], moved / bandwidth * 1e3 / linear)
    return row


def vit_models() -> dict:
    return {
        "demo ViT (8x8, dim 64, depth 4)": (VisionTransformer, (1, 8, 8)),
        "ViT-S/4 (32x32, dim 384, depth 12)": (
            lambda: vit_small_patch4_32(drop_path=0.0),
            (3, 32, 32),
        ),
    }


def measure_model(name, factory, image, batch, repeats, warmup, device, dtype, budget):
    torch.manual_seed(0)
    dense = factory().eval()
    structured = copy.deepcopy(dense)
    structure_model(structured, "gblr", budget)
    structured = gblr.freeze(structured.eval())
    dense = dense.to(device=device, dtype=dtype)
    structured = structured.to(device=device, dtype=dtype)
    x = torch.randn(batch, *image, device=device, dtype=dtype)
    flops_dense = gblr.count_model_flops(dense, x[:1]).macs
    flops_structured = gblr.count_model_flops(structured, x[:1]).macs
    with torch.no_grad():
        report = gblr.plan(structured, x, repeats=max(1, repeats // 2), warmup=1)
    choices: dict[str, int] = {}
    for layer in report:
        choices[layer.choice] = choices.get(layer.choice, 0) + 1
    medians = alternate(
        {"dense": lambda: dense(x), "frozen": lambda: structured(x)}, repeats, warmup, device
    )
    return {
        "model": name,
        "batch": batch,
        "macs_ratio_model": flops_structured / flops_dense,
        "ms": medians,
        "ratio_vs_dense": medians["frozen"] / medians["dense"],
        "images_per_s": {k: batch / (v / 1e3) for k, v in medians.items()},
        "plans": choices,
    }


def markdown(payload: dict) -> str:
    """The tables of docs/BENCHMARKS.md from a results file (``--table``)."""
    plans = [p for p in (*PLANS, *GPU_PLANS) if p in payload["layers"][0]["ms"]]
    head = ["shape (in × out)", "MACs ratio", "rows", "`nn.Linear` ms", *plans]
    head += ["best / `nn.Linear`", "1.5 × MACs", "planner's choice (ratio)"]
    if "activation_bound" in payload["layers"][0]:
        head.insert(-1, "bound")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in payload["layers"]:
        best = row["best_plan"]
        cells = [
            row["shape"].replace("x", " × "),
            f"{row['macs_ratio']:.3f}",
            str(row["rows"]),
            f"{row['ms']['nn.Linear']:.3g}",
            *[
                f"**{row['ratio_vs_linear'][p]:.2f}**"
                if p == best
                else f"{row['ratio_vs_linear'][p]:.2f}"
                for p in plans
            ],
            f"{row['best_ratio']:.2f}",
            f"{1.5 * row['macs_ratio']:.2f}",
        ]
        if "activation_bound" in row:
            cells.append(f"{row['activation_bound']:.2f}")
        cells.append(f"{row['planner_choice']} ({row['planner_ratio']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    if payload.get("models"):
        lines += [
            "",
            "| model | batch | MACs ratio | dense ms | frozen ms | frozen / dense "
            "| images/s dense → frozen | plans chosen |",
            "|" + " --- |" * 8,
        ]
        for row in payload["models"]:
            ips = row["images_per_s"]
            plans_chosen = ", ".join(f"{k} {v}" for k, v in sorted(row["plans"].items()))
            lines.append(
                f"| {row['model']} | {row['batch']} | {row['macs_ratio_model']:.3f} | "
                f"{row['ms']['dense']:.3g} | {row['ms']['frozen']:.3g} | "
                f"{row['ratio_vs_dense']:.2f} | {ips['dense']:.0f} → {ips['frozen']:.0f} | "
                f"{plans_chosen} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=["768x3072", "3072x768"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--large-repeats",
        type=int,
        default=3,
        help="repeats at more than 4096 rows (each dense product takes ~1 s on one core)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 256])
    parser.add_argument("--model-budget", type=float, default=0.3)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 avoids the stalls of a thread that "
        "another process preempts inside a parallel region, on a shared machine",
    )
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--table", type=Path, default=None, help="print the markdown tables of a results file"
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    plans = PLANS + (GPU_PLANS if device.type == "cuda" else ())
    bandwidth = copy_bandwidth(device, dtype) if device.type == "cuda" else None
    layers = []
    for shape in args.shapes:
        in_f, out_f = (int(s) for s in shape.split("x"))
        for ratio in args.ratios:
            for rows in args.rows:
                repeats = args.repeats if rows <= 4096 else args.large_repeats
                warmup = args.warmup if rows <= 4096 else 1
                row = measure_layer(
                    in_f, out_f, ratio, rows, repeats, warmup, device, dtype, plans, bandwidth
                )
                layers.append(row)
                ratios = " ".join(f"{p} {row['ratio_vs_linear'][p]:.2f}" for p in plans)
                print(
                    f"{shape} MACs {row['macs_ratio']:.3f} rows {rows}: nn.Linear "
                    f"{row['ms']['nn.Linear']:.3g} ms | {ratios} | best {row['best_plan']} "
                    f"{row['best_ratio']:.3f} | planner {row['planner_choice']} "
                    f"{row['planner_ratio']:.3f}",
                    flush=True,
                )
    models = []
    if not args.skip_models:
        for name, (factory, image) in vit_models().items():
            for batch in args.batches:
                row = measure_model(
                    name,
                    factory,
                    image,
                    batch,
                    args.repeats,
                    args.warmup,
                    device,
                    dtype,
                    args.model_budget,
                )
                models.append(row)
                print(
                    f"{name} batch {batch}: MACs {row['macs_ratio_model']:.3f} dense "
                    f"{row['ms']['dense']:.3g} ms frozen {row['ms']['frozen']:.3g} ms "
                    f"({row['ratio_vs_dense']:.2f}x) plans {row['plans']}",
                    flush=True,
                )
    payload = {
        "benchmark": "bench_inference",
        "machine": machine_description(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "large_repeats": args.large_repeats,
        "copy_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
        "layers": layers,
        "models": models,
    }
    output = args.output or RESULTS / f"bench_inference_{device.type}.json"
    write_json_atomically(output, payload)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
