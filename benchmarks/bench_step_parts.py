"""Where a small GBLR model's training step goes: forward, backward, AdamW, learner.

    OMP_NUM_THREADS=1 python benchmarks/bench_step_parts.py

The real tasks' pixel MLP (benchmarks/realtask_vision.py: 256 -> 512 -> 512 -> 10, both
hidden layers structured) on one random batch of 64, one torch thread: GBLR started as
the suite trains it (the library's default start and learner: since 2026-12-06 the
block-diagonal start at the budget of 0.1, before that 3x the budget ramped to it over
the first third of the steps), against low-rank at the budget. Medians over steps
``--skip`` .. ``--steps`` of each part, in ms. The training step uses the engine's AdamW
(``gblr.learn.groups.adamw``: fused since 2026-12-06, ``foreach=True`` before). Also,
alternating where two things are compared, so that both see the same machine:

- the learner's non-finite screen (one sum per tensor) against the element-wise
  ``isfinite(t).all()`` it replaced, on the same tensors;
- one AdamW step of each model after training: torch's default (a for-loop on the CPU),
  ``foreach=True`` and ``fused=True``, on the last step's gradients;
- the masking of one layer's factors, forward and backward, by the torch backend's single
  autograd node against the composition of two grid masks and two products it replaced
  (the MLP's 512 x 512 layer and a 64 x 256 layer of the Mixer's size, every component
  on);
- the 512 x 512 layer's forward and backward at the default start under a learner, by the
  held strips' window form, their full-length form and the masked factors' two products;
- the learner's budget bisection on the thresholds' inputs of a training run, by the
  library's form (components whose line counts are the same at both ends of the bracket
  leave it, and few components take more halvings per round) against the rounds of two
  halvings over every live component it replaced (both give the same threshold, bit for
  bit), and against the same form with every round in NumPy (``library_numpy_rounds_only``:
  before 2026-12-07 the last halvings, over one or two components, were not run in Python
  floats) and without the thresholds around the cost's linear estimate costed first
  (``library_without_estimate``: before 2026-12-07, afternoon).

Writes ``benchmarks/results/bench_step_parts.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import machine_description, write_json_atomically

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET = 0.1


def _parts(structure: str, steps: int, skip: int, repeats: int) -> dict[str, float]:
    """Median ms of each part of a training step, steps ``skip`` .. ``steps``, and of an
    AdamW step after them (``adamw_default``, ``adamw_fused``: ``repeats`` each)."""
    import gblr
    import realtask_vision
    from gblr.learn.groups import adamw
    from gblr.recipes.models import gblr_start_cost, structure_model

    torch.manual_seed(0)
    model = realtask_vision._mlp()
    start = gblr_start_cost(BUDGET) if structure == "gblr" else BUDGET
    structure_model(model, structure, start, seed=0)
    optimizer = adamw(gblr.param_groups(model, lr=2e-3, weight_decay=0.05))
    learner = None
    if structure == "gblr":
        learner = gblr.StructureLearner(
            model, budget=BUDGET, total_steps=steps, warmup_steps=steps // 3
        )
    images, labels = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    times: dict[str, list[float]] = {"forward": [], "backward": [], "adamw": [], "learner": []}
    for step in range(steps):
        start_time = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        optimizer.step()
        adamw_end = time.perf_counter()
        if learner is not None:
            learner.step()
        learner_end = time.perf_counter()
        if step >= skip:
            times["forward"].append(forward_end - start_time)
            times["backward"].append(backward_end - forward_end)
            times["adamw"].append(adamw_end - backward_end)
            times["learner"].append(learner_end - adamw_end)
    result = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    result["step"] = sum(result.values())
    optimizers = {
        name: torch.optim.AdamW(gblr.param_groups(model, lr=2e-3, weight_decay=0.05), **options)
        for name, options in (
            ("adamw_default", {}),
            ("adamw_foreach", {"foreach": True}),
            ("adamw_fused", {"fused": True}),
        )
    }
    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):  # alternating, so both see the same machine
        for name, optimizer in optimizers.items():
            start_time = time.perf_counter()
            optimizer.step()
            samples[name].append(time.perf_counter() - start_time)
    result.update({name: statistics.median(values) * 1e3 for name, values in samples.items()})
    return result


def _screens(repeats: int) -> dict[str, float]:
    """Median ms of the two non-finite checks on the GBLR MLP's structure and factors."""
    import realtask_vision
    from gblr.layers.base import GBLRMatrixMixin
    from gblr.learn.learner import _sum_to_screen
    from gblr.recipes.models import structure_model

    model = realtask_vision._mlp()
    structure_model(model, "gblr", 0.3, seed=0)
    tensors = [
        getattr(layer, name).detach()
        for layer in model.modules()
        if isinstance(layer, GBLRMatrixMixin)
        for name in ("widths", "locations", "U", "V")
    ]

    def elementwise() -> bool:
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def sums() -> bool:
        return bool(torch.isfinite(torch.stack([_sum_to_screen(t) for t in tensors])).all())

    samples: dict[str, list[float]] = {"elementwise_ms": [], "sums_ms": []}
    for _ in range(repeats):  # the two alternate, so both see the same machine
        for name, check in (("elementwise_ms", elementwise), ("sums_ms", sums)):
            start = time.perf_counter()
            for _ in range(20):
                check()
            samples[name].append((time.perf_counter() - start) / 20 * 1e3)
    result = {name: statistics.median(values) for name, values in samples.items()}
    result["factor_entries"] = sum(t.numel() for t in tensors)
    return result


def _mask_paths(repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of one forward and backward of a layer's masked factors, by the single
    autograd node (``one_node``) and by the composition it replaced (``composed``)."""
    from gblr.ops.gaudi import _GaudiMaskOnGrid, _mask_dtype, _MaskFactorsTorch

    def composed(u, v, widths, locations, sigma, dtype):
        row = _GaudiMaskOnGrid.apply(widths[1], locations[1], u.shape[2], sigma, dtype, True)
        col = _GaudiMaskOnGrid.apply(widths[0], locations[0], v.shape[2], sigma, dtype, True)
        return u * row.to(u.dtype).unsqueeze(1), v * col.to(v.dtype).unsqueeze(1)

    def one_node(u, v, widths, locations, sigma, dtype):
        return _MaskFactorsTorch.apply(u, v, widths, locations, sigma, dtype, True)

    result = {}
    for rows, cols in ((512, 512), (256, 64)):
        torch.manual_seed(0)
        k = min(rows, cols)
        leaves = [
            torch.randn(k, 1, rows, requires_grad=True),
            torch.randn(k, 1, cols, requires_grad=True),
            (torch.rand(2, k) * 0.5 + 0.05).requires_grad_(),
            torch.rand(2, k).requires_grad_(),
        ]
        dtype = _mask_dtype(torch.float32)
        samples: dict[str, list[float]] = {"composed": [], "one_node": []}
        for _ in range(repeats):  # the two alternate, so both see the same machine
            for name, path in (("composed", composed), ("one_node", one_node)):
                start = time.perf_counter()
                for _ in range(20):
                    u, v = path(*leaves, 4.0, dtype)
                    (u.sum() + v.sum()).backward()
                samples[name].append((time.perf_counter() - start) / 20 * 1e3)
        result[f"{rows}x{cols}"] = {
            name: statistics.median(values) for name, values in samples.items()
        }
    return result


def _strip_form(repeats: int) -> dict[str, float]:
    """Median ms of one forward and backward of the pixel MLP's 512 x 512 layer at the
    default start under a learner (batch 64), after 150 training steps (past the budget's
    ramp, the intervals as the run has them): the held strips' window form
    (``evaluation_order="auto"``, since 2026-12-06 night), the strips' full-length form
    (`GBLRLinear._strips_forward`, what "auto" took before) and the masked factors' two
    products (``"factored"``), the same layer, alternating."""
    import gblr
    import realtask_vision
    from gblr.learn.groups import adamw
    from gblr.recipes.models import structure_model

    torch.manual_seed(0)
    model = realtask_vision._mlp()
    structure_model(model, "gblr", BUDGET, seed=0)
    learner = gblr.StructureLearner(model, budget=BUDGET, total_steps=300, warmup_steps=100)
    optimizer = adamw(gblr.param_groups(model, lr=2e-3, weight_decay=0.05))
    images, labels = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        learner.step()
    layer = model.blocks[1]
    inputs = torch.randn(64, layer.in_features)
    forms = {
        "window": lambda: layer(inputs),
        "strips": lambda: layer._strips_forward(inputs, *layer.strips()),
        "masked_factors": lambda: layer(inputs),
    }
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):  # the forms alternate, so all see the same machine
        for name, form in forms.items():
            layer._evaluation_order = "factored" if name == "masked_factors" else "auto"
            start = time.perf_counter()
            for _ in range(20):
                form().sum().backward()
            samples[name].append((time.perf_counter() - start) / 20 * 1e3)
    layer._evaluation_order = "auto"
    del learner
    return {name: statistics.median(values) for name, values in samples.items()}


def _bisection_rounds_of_two(view, widths, target, scale, fill):
    """The budget bisection as the learner ran it until 2026-12-06 (late afternoon):
    rounds of two halvings, every component live at 0 costed in each, from the library's
    bracket (`_bisection_start`); ``None`` where it makes no halvings."""
    from gblr.learn import learner as learner_module

    _, _, bound = learner_module._bisection_start(view, widths, target, scale, fill)
    if bound is None:
        return None
    low, high = bound.below, bound.above
    for _ in range(30):
        points = learner_module._midpoints(low, high, 2)
        shrunk = bound.widths - numpy.asarray(points)[:, None, None] * bound.per_unit
        costs = view._cost_of_lengths(view._lengths(shrunk, bound.dims), bound.ranks)
        fits = (costs <= target).tolist()
        first_fit = fits.index(True) if True in fits else len(points)
        if first_fit < len(points):
            high = points[first_fit]
        if first_fit > 0:
            low = points[first_fit - 1]
    return high


def _bisection(steps: int, repeats: int) -> dict[str, float]:
    """Median ms per call of the budget bisection, the library's form (with the learner's
    hint, and without) against the rounds of two it replaced, on the inputs of every call
    with halvings (a cut or a fill) of a ``steps``-step training run of the GBLR MLP
    (default start and learner, batch 64), alternating; and the number of calls
    compared."""
    import gblr
    import realtask_vision
    from gblr.learn import learner as learner_module
    from gblr.learn.groups import adamw
    from gblr.recipes.models import gblr_start_cost, structure_model

    torch.manual_seed(0)
    model = realtask_vision._mlp()
    structure_model(model, "gblr", gblr_start_cost(BUDGET), seed=0)
    optimizer = adamw(gblr.param_groups(model, lr=2e-3, weight_decay=0.05))
    learner = gblr.StructureLearner(
        model, budget=BUDGET, total_steps=steps, warmup_steps=steps // 3
    )
    recorded = []
    library_form = learner_module._budget_threshold

    hints = []

    def recording(view, widths, target, scale=None, fill=False, hint=None):
        recorded.append(
            (view, widths.clone(), target, None if scale is None else scale.clone(), fill)
        )
        hints.append(hint)
        return library_form(view, widths, target, scale, fill, hint)

    learner_module._budget_threshold = recording
    try:
        images, labels = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            learner.step()
    finally:
        learner_module._budget_threshold = library_form
    calls = [
        (args, hint)
        for args, hint in zip(recorded, hints, strict=True)
        if _bisection_rounds_of_two(*args) is not None
    ]
    for args, hint in calls:
        expected = _bisection_rounds_of_two(*args)
        if {library_form(*args)[0], library_form(*args, hint=hint)[0]} != {expected}:
            raise RuntimeError("the bisections gave different thresholds")

    def numpy_rounds_only(args, hint):
        # the library's form before 2026-12-07 (morning): no halvings in Python floats
        scalar_components = learner_module._SCALAR_COMPONENTS
        learner_module._SCALAR_COMPONENTS = -1
        try:
            return library_form(*args, hint=hint)
        finally:
            learner_module._SCALAR_COMPONENTS = scalar_components

    def without_estimate(args, hint):
        # the library's form before 2026-12-07 (afternoon): only the hint's thresholds
        # costed first, not those around the cost's linear estimate
        estimate_macs = learner_module._ESTIMATE_MACS
        learner_module._ESTIMATE_MACS = ()
        try:
            return library_form(*args, hint=hint)
        finally:
            learner_module._ESTIMATE_MACS = estimate_macs

    for args, hint in calls:
        threshold = library_form(*args, hint=hint)[0]
        if numpy_rounds_only(args, hint)[0] != threshold:
            raise RuntimeError("the halvings in Python floats gave a different threshold")
        if without_estimate(args, hint)[0] != threshold:
            raise RuntimeError("the linear estimate's thresholds changed the threshold")
    forms = {
        "rounds_of_two_ms": lambda args, hint: _bisection_rounds_of_two(*args),
        "library_without_hint_ms": lambda args, hint: library_form(*args),
        "library_numpy_rounds_only_ms": numpy_rounds_only,
        "library_without_estimate_ms": without_estimate,
        "library_ms": lambda args, hint: library_form(*args, hint=hint),
    }
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):  # alternating, so all see the same machine
        for name, form in forms.items():
            start = time.perf_counter()
            for args, hint in calls:
                form(args, hint)
            samples[name].append((time.perf_counter() - start) / len(calls) * 1e3)
    result = {name: statistics.median(values) for name, values in samples.items()}
    result["calls"] = len(calls)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--skip", type=int, default=100, help="steps left out of the medians")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_step_parts.json")
    args = parser.parse_args(argv)
    if not 0 <= args.skip < args.steps:
        parser.error(f"--skip must be in [0, --steps), got {args.skip} with --steps {args.steps}")
    torch.set_num_threads(1)
    report = {
        "machine": machine_description(torch.device("cpu")),
        "date": time.strftime("%Y-%m-%d"),
        "budget": BUDGET,
        "steps": args.steps,
        "skip": args.skip,
        "gblr_ms": _parts("gblr", args.steps, args.skip, 10 * args.repeats),
        "lowrank_ms": _parts("lowrank", args.steps, args.skip, 10 * args.repeats),
        "non_finite_screen": _screens(args.repeats),
        "masking_ms": _mask_paths(args.repeats),
        "strip_form_ms": _strip_form(args.repeats),
        "bisection_ms": _bisection(min(args.steps, 300), args.repeats),
    }
    for name in ("gblr_ms", "lowrank_ms"):
        print(name, {key: round(value, 2) for key, value in report[name].items()})
    print("non-finite screen", report["non_finite_screen"])
    print("masking (forward + backward)", report["masking_ms"])
    print("512 x 512 layer (forward + backward)", report["strip_form_ms"])
    print("budget bisection per learner step", report["bisection_ms"])
    write_json_atomically(args.output, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
