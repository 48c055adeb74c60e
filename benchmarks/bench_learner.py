"""Structure learner: overhead of ``learner.step()`` and recovery of planted structures.

1. Overhead: the median time of ``learner.step()`` (budget mode, bisection) relative to the
   median time of one training step (forward, backward, AdamW step) of a small ViT whose
   linear layers are all ``GBLRLinear``. Target <= 5%.
2. Recovery: ``GBLRLinear(64, 64)`` from random structures is regressed onto
   :func:`gblr.learn.synthetic.planted_blocks` targets with the learner in budget mode at
   1.1x and 1.5x the planted cost; a seed counts as recovered at relative Frobenius error
   <= 2e-2. Goal: every seed at 1.1x. Seven learner variants (``gblr.LearnerConfig``) in
   the same run: ``paper`` (one uniform threshold), ``adaptive+shift``
   (``adaptive=AdaptiveConfig(1.0)``, ``shift_limit=ShiftLimitConfig(cells=1.0)``; named
   ``adaptive=1.0, max_shift=1.0`` in docs/BENCHMARKS.md, the learner's keywords when
   measured), ``adaptive+shift+ramp`` (also ``cells_during_ramp=4.0``: ``max_shift_ramp``),
   ``...+merge`` (also ``MergeConfig(1e-3)``), ``...+untangle`` (also
   ``UntangleConfig(1e-4)``), ``...+refine`` (also ``RefineConfig(1e-6)``: all of
   ``LearnerConfig.planted()``) and ``adaptive+shift+ramp+refine`` (without merge and
   untangle). ``--lr-decay F`` decays the learning rate linearly to zero over the last
   fraction F of the steps (default 0: constant, as the earlier results);
   ``--merge-every N`` sets ``pass_every``, the steps between the learner's merge,
   untangle and refine passes (default 10), in both parts.
   The overhead part also times one merge pass (:func:`gblr.merge_components`) on
   the ViT, amortized over ``N`` steps, the learner's untangle pass twice (when every
   component has just settled, all overlapping pairs searched: the worst case, once per
   settling; and when none changed since the previous pass: the steady state), and what
   ``refine`` adds every ``N`` steps (two training steps with gradient hooks and one pass).

    python benchmarks/bench_learner.py                # both parts, 20 seeds
    python benchmarks/bench_learner.py --seeds 5 --skip-overhead --variants adaptive+shift
    python benchmarks/bench_learner.py --seed-list 12 13 --factors 1.1 --skip-overhead \
        --output /tmp/seeds.json                      # chosen seeds only (diagnosis)
    python benchmarks/bench_learner.py --skip-recovery --output /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gblr
from gblr.learn.synthetic import recovery_run
from gblr.recipes.models import VisionTransformer, structure_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import RESULTS, machine_description, write_json_atomically

# Learner configs compared on the recovery task: the paper's plain method, and the passes
# that made recovery more reliable (docs/BENCHMARKS.md says why), added one at a time.
_ALL = gblr.LearnerConfig.planted()
_RAMP = dataclasses.replace(_ALL, merge=None, untangle=None, refine=None)
VARIANTS = {
    "paper": gblr.LearnerConfig.paper(),
    "adaptive+shift": dataclasses.replace(_RAMP, shift_limit=gblr.ShiftLimitConfig(cells=1.0)),
    "adaptive+shift+ramp": _RAMP,
    "adaptive+shift+ramp+merge": dataclasses.replace(_RAMP, merge=_ALL.merge),
    "adaptive+shift+ramp+merge+untangle": dataclasses.replace(_ALL, refine=None),
    "adaptive+shift+ramp+refine": dataclasses.replace(_RAMP, refine=_ALL.refine),
    "adaptive+shift+ramp+merge+untangle+refine": _ALL,
}
MERGE_EVERY = gblr.LearnerConfig().pass_every


def gblr_vit() -> nn.Module:
    """ViT (dim 192, depth 6, 3 heads, 4x4 patches on 32x32 images) from the recipes, with
    every transformer-block linear layer a ``GBLRLinear`` started at half the dense MACs."""
    model = VisionTransformer(
        image_size=32, patch_size=4, in_chans=3, dim=192, depth=6, heads=3, mlp_ratio=4
    )
    structure_model(model, "gblr", 0.5)
    return model


def measure_overhead(repeats: int, batch: int, merge_every: int = MERGE_EVERY) -> dict:
    torch.manual_seed(0)
    model = gblr_vit()
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=1e-3, weight_decay=0.05))
    learner = gblr.StructureLearner(model, budget=0.3, total_steps=1000, warmup_steps=500)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))

    def train_step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = nn.functional.cross_entropy(net(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_times, learner_times = [], []
    for repeat in range(repeats + 2):
        start = time.perf_counter()
        train_step(model, optimizer)
        middle = time.perf_counter()
        learner.step()
        end = time.perf_counter()
        if repeat >= 2:  # warm-up
            train_times.append(middle - start)
            learner_times.append(end - middle)
    train_ms = 1e3 * statistics.median(train_times)
    learner_ms = 1e3 * statistics.median(learner_times)
    merge_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gblr.merge_components(model, tolerance=1e-3)
        merge_times.append(time.perf_counter() - start)
    merge_ms = 1e3 * statistics.median(merge_times)
    untangle_all, untangle_steady = [], []
    for _ in range(max(1, repeats // 5)):
        copy = gblr_vit()
        copy.load_state_dict(model.state_dict())
        config = gblr.LearnerConfig(untangle=_ALL.untangle, pass_every=merge_every)
        untangler = gblr.StructureLearner(copy, config, budget=0.3, total_steps=1000)
        untangle = untangler.passes["untangle"]
        untangle.run()  # records every block: nothing is settled yet
        start = time.perf_counter()
        untangle.run()  # every component settled at once: all pairs searched
        middle = time.perf_counter()
        untangle.run()  # nothing changed: no pair searched again
        end = time.perf_counter()
        untangle_all.append(middle - start)
        untangle_steady.append(end - middle)
    untangle_all_ms = 1e3 * statistics.median(untangle_all)
    untangle_steady_ms = 1e3 * statistics.median(untangle_steady)
    # refine: the two recorded training steps before each refine pass (gradient hooks)
    # and the pass itself, against plain steps of the same run.
    refined = gblr_vit()
    refined.load_state_dict(model.state_dict())
    refine_optimizer = torch.optim.AdamW(gblr.param_groups(refined, lr=1e-3, weight_decay=0.05))
    config = gblr.LearnerConfig(refine=_ALL.refine, pass_every=merge_every)
    refiner = gblr.StructureLearner(refined, config, budget=0.3, total_steps=1000)
    schedule = refiner.passes["refine"].schedule
    plain_train, recorded_train, plain_learner, refine_learner = [], [], [], []
    for _ in range(max(2, repeats // 5) * merge_every):
        recording = refiner.layers[0].factor_record is not None
        start = time.perf_counter()
        train_step(refined, refine_optimizer)
        middle = time.perf_counter()
        refiner.step()
        end = time.perf_counter()
        (recorded_train if recording else plain_train).append(middle - start)
        is_pass = schedule.is_half_step(refiner.step_count)
        (refine_learner if is_pass else plain_learner).append(end - middle)
    refine_extra_ms = 1e3 * (
        2 * (statistics.median(recorded_train) - statistics.median(plain_train))
        + statistics.median(refine_learner)
        - statistics.median(plain_learner)
    )
    return {
        "model": "ViT dim 192, depth 6, 3 heads, 4x4 patches on 32x32, all linears GBLR",
        "batch": batch,
        "gblr_layers": len(learner.layers),
        "components": int(sum(layer.num_components for layer in learner.layers)),
        "train_step_ms_median": train_ms,
        "learner_step_ms_median": learner_ms,
        "overhead_ratio": learner_ms / train_ms,
        "merge_pass_ms_median": merge_ms,
        "merge_every": merge_every,
        "merge_overhead_ratio": merge_ms / merge_every / train_ms,
        "untangle_pass_all_settling_ms_median": untangle_all_ms,
        "untangle_pass_steady_ms_median": untangle_steady_ms,
        "untangle_steady_overhead_ratio": untangle_steady_ms / merge_every / train_ms,
        "refine_recorded_train_step_ms_median": 1e3 * statistics.median(recorded_train),
        "refine_plain_train_step_ms_median": 1e3 * statistics.median(plain_train),
        "refine_pass_learner_step_ms_median": 1e3 * statistics.median(refine_learner),
        "refine_plain_learner_step_ms_median": 1e3 * statistics.median(plain_learner),
        "refine_extra_ms_per_pass": refine_extra_ms,
        "refine_overhead_ratio": refine_extra_ms / merge_every / train_ms,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="run seeds 0 .. SEEDS-1")
    parser.add_argument(
        "--seed-list",
        type=int,
        nargs="+",
        default=None,
        help="run exactly these seeds instead of 0 .. SEEDS-1 (e.g. the failing ones)",
    )
    parser.add_argument("--factors", type=float, nargs="+", default=[1.1, 1.5])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--lr-decay",
        type=float,
        default=0.0,
        help="fraction of the final steps over which the learning rate decays linearly to 0",
    )
    parser.add_argument(
        "--merge-every",
        type=int,
        default=MERGE_EVERY,
        help="steps between the learner's merge, untangle and refine passes",
    )
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_learner.json")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds)) if args.seed_list is None else args.seed_list
    if any(seed < 0 for seed in seeds):
        parser.error("--seed-list seeds must be >= 0")

    payload: dict = {
        "benchmark": "bench_learner",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(torch.device("cpu")),
        "torch": torch.__version__,
    }
    if not args.skip_overhead:
        overhead = measure_overhead(args.repeats, args.batch, args.merge_every)
        payload["overhead"] = overhead
        print(
            f"learner.step() {overhead['learner_step_ms_median']:.2f} ms vs training step "
            f"{overhead['train_step_ms_median']:.1f} ms: {100 * overhead['overhead_ratio']:.2f}%; "
            f"merge pass {overhead['merge_pass_ms_median']:.2f} ms every {args.merge_every} steps: "
            f"{100 * overhead['merge_overhead_ratio']:.2f}%; untangle pass "
            f"{overhead['untangle_pass_steady_ms_median']:.1f} ms steady "
            f"({100 * overhead['untangle_steady_overhead_ratio']:.2f}%), "
            f"{overhead['untangle_pass_all_settling_ms_median']:.0f} ms when all settle; "
            f"refine {overhead['refine_extra_ms_per_pass']:.1f} ms per {args.merge_every} steps "
            f"({100 * overhead['refine_overhead_ratio']:.2f}%)",
            flush=True,
        )
    payload["recovery"] = {}
    payload["lr_decay"] = args.lr_decay
    payload["merge_every"] = args.merge_every
    for variant in [] if args.skip_recovery else args.variants:
        config = dataclasses.replace(VARIANTS[variant], pass_every=args.merge_every)
        payload["recovery"][variant] = {"learner_config": config.to_dict()}
        for factor in args.factors:
            runs = [
                recovery_run(seed, factor, steps=args.steps, config=config, lr_decay=args.lr_decay)
                for seed in seeds
            ]
            recovered = sum(run["error"] <= 2e-2 for run in runs)
            payload["recovery"][variant][str(factor)] = {
                "recovered": recovered,
                "seeds": len(seeds),
                "steps": args.steps,
                "runs": runs,
            }
            errors = " ".join(f"{run['error']:.3f}" for run in runs)
            print(
                f"{variant}: budget {factor}x planted: {recovered}/{len(seeds)} recovered "
                f"({errors})",
                flush=True,
            )
    write_json_atomically(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
