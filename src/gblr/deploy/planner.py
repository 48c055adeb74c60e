"""``gblr.plan``: time each frozen layer's execution plans on its real input and keep the
fastest, per (device type, dtype, row-count bucket)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..cost import call_model
from ..tables import text_table
from .frozen import FrozenGBLRConv2d, FrozenGBLRMatrix
from .plans import GPU_PLANS, PLANS, row_bucket

__all__ = ["LayerPlan", "PlanReport", "plan"]

# A plan replaces dense only when its median is at least 5% faster.
_MARGIN = 0.95
# blocksparse is not timed when this fraction of the tiles is occupied.
_DENSE_EQUIVALENT = 0.9


class _NoRowsToTime(Exception):
    """A layer's captured input has no rows (raised from a forward hook, so that the model
    call's own failures, which name ``example_input``, do not wrap it)."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One row of a `PlanReport`: the median time (ms) of every candidate for one
    layer at one input size, and the plan stored for its bucket.

    Examples:
        >>> import torch, gblr
        >>> model = gblr.freeze(torch.nn.Sequential(
        ...     gblr.GBLRLinear(64, 64, structure_init="half", init_cost=0.2)))
        >>> row = gblr.plan(model, torch.randn(32, 64), repeats=3)["0"]  # layer "0"
        >>> row.shape, row.rows, row.device, "dense" in row.times_ms, row.speedup >= 1.0
        ((64, 64), 32, 'cpu', True, True)
    """

    name: str
    kind: str
    shape: tuple[int, int]
    macs_ratio: float
    rows: int
    bucket: int
    device: str
    dtype: str
    choice: str
    times_ms: dict[str, float]

    @property
    def speedup(self) -> float:
        """``time(dense) / time(choice)`` (>= 1 by construction)."""
        return self.times_ms["dense"] / self.times_ms[self.choice]


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What [`plan`][gblr.deploy.planner.plan] chose; ``str(report)`` is a table.

    Examples:
        >>> import torch, gblr
        >>> model = gblr.freeze(torch.nn.Sequential(
        ...     gblr.GBLRLinear(64, 64, structure_init="half", init_cost=0.2)))
        >>> report = gblr.plan(model, torch.randn(32, 64), repeats=3)
        >>> type(report).__name__, len(report), [row.name for row in report]
        ('PlanReport', 1, ['0'])
        >>> report.table().split()[:4]
        ['layer', 'shape', '(out', 'x']
    """

    layers: tuple[LayerPlan, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the report")

    def table(self) -> str:
        """A plain-text table: one row per layer, a column per candidate (median ms)."""
        candidates = [p for p in PLANS if any(p in layer.times_ms for layer in self.layers)]
        header = ["layer", "shape (out x in)", "MACs ratio", "rows", "bucket", *candidates]
        header += ["choice", "vs dense"]
        rows = []
        for layer in self.layers:
            rows.append(
                [
                    layer.name or "(root)",
                    f"{layer.shape[0]} x {layer.shape[1]}",
                    f"{layer.macs_ratio:.3f}",
                    str(layer.rows),
                    str(layer.bucket),
                    *[
                        f"{layer.times_ms[p]:.3g}" if p in layer.times_ms else "-"
                        for p in candidates
                    ],
                    layer.choice,
                    f"{1 / layer.speedup:.2f}x",
                ]
            )
        note = "(times: median ms of one forward per plan; 'vs dense': chosen / dense)"
        return text_table(header, rows, rules=(0,), notes=[note])

    def __str__(self) -> str:
        return self.table()


def _check_candidates(candidates: Sequence[str] | None) -> tuple[str, ...]:
    names = PLANS + GPU_PLANS
    if candidates is None:
        return names
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(
            f"candidates must be a list of plan names from {names} or None, got {candidates!r}"
        )
    for name in candidates:
        if name not in names:
            raise ValueError(f"candidates must be plan names from {names}, got {name!r}")
    # dense is always timed: it is the baseline a plan has to beat.
    return ("dense", *dict.fromkeys(c for c in candidates if c != "dense"))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _rows(layer: FrozenGBLRMatrix, x: Tensor) -> int:
    if isinstance(layer, FrozenGBLRConv2d):
        batch = x.shape[0] if x.dim() == 4 else 1
        height, width = layer._output_size(x.shape[-2], x.shape[-1])
        return batch * height * width
    return x.numel() // x.shape[-1]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan(
    model: nn.Module,
    example_input: Any,
    candidates: Sequence[str] | None = None,
    *,
    repeats: int = 7,
    warmup: int = 1,
) -> PlanReport:
    """Time every candidate plan of every frozen GBLR layer on its real input; store the
    fastest in the layer.

    The model runs once on ``example_input`` (under ``torch.no_grad()``) with hooks that
    capture each frozen layer's input. Each layer then runs each candidate on that input,
    ``warmup`` times untimed (this also builds the plan's cached operands) and ``repeats``
    times timed, candidates alternating so that drifts in machine load hit them alike; the
    median decides. The choice is stored in ``layer.plan_cache`` under (device type, dtype,
    row-count bucket = next power of two of the rows, or output positions for a conv), and
    forwards whose rows fall in that bucket use it while ``layer.plan == "auto"``.
    ``dense`` is always a candidate, so a planned layer is never slower than its dense
    product (up to timing noise); another plan is chosen only when it is at least 5%
    faster, and ``blocksparse`` is not timed when 90% of its tiles are occupied (it would
    be the dense product in pieces). Cached operands of plans not chosen are freed.

    Args:
        model: a module with frozen GBLR layers ([`gblr.freeze`][]), or one such layer.
        example_input: a tensor, a tuple of positional arguments, or a mapping of keyword
            arguments (a tokenizer's output) for ``model``,
            giving every frozen layer at least one row (an empty batch is refused).
        candidates: plan names from `gblr.deploy.PLANS` and ``GPU_PLANS`` (default:
            all; ``GPU_PLANS`` are timed only for CUDA inputs with triton installed).
        repeats: timed runs per candidate (>= 1).
        warmup: untimed runs per candidate before timing (>= 0).

    Returns:
        A `PlanReport` (``print(report)`` shows a table).

    Examples:
        >>> import torch, gblr
        >>> model = gblr.freeze(torch.nn.Sequential(
        ...     gblr.GBLRLinear(64, 64, structure_init="half", init_cost=0.2)))
        >>> report = gblr.plan(model, torch.randn(32, 64), repeats=3)
        >>> report.layers[0].choice in gblr.deploy.PLANS
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = _check_candidates(candidates)
    for arg, value, minimum in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    layers: dict[int, tuple[str, FrozenGBLRMatrix]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenGBLRMatrix):
            layers.setdefault(id(module), (name, module))
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) has no frozen GBLR layer; call gblr.freeze first"
        )

    inputs: dict[int, list[Tensor]] = {}

    def capture(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if isinstance(x, Tensor) and x.dim() > 0 and _rows(module, x) == 0:
            # Nothing to time: every plan returns an empty output at once, and a choice
            # stored for that bucket would be noise. Raised before the layer runs.
            raise _NoRowsToTime(
                f"example_input gives layer {layers[id(module)][0] or '(root)'!r} an input "
                f"of shape {tuple(x.shape)}, with no rows to time; plan needs an example "
                "with at least one row (a batch of the size the model will run on)"
            )
        inputs.setdefault(id(module), []).append(x.detach())

    handles = [module.register_forward_pre_hook(capture) for _, module in layers.values()]
    try:
        with torch.no_grad():
            call_model(model, example_input, name="example_input")
    except _NoRowsToTime as error:
        raise ValueError(str(error)) from None
    finally:
        for handle in handles:
            handle.remove()

    report = []
    for key, (name, layer) in layers.items():
        seen = {}
        for x in inputs.get(key, []):  # a layer called twice at one size is timed once
            seen.setdefault(row_bucket(_rows(layer, x)), x)
        for x in seen.values():
            report.append(_time_layer(name, layer, x, names, repeats, warmup))
        keep = set(layer.plan_cache.values())
        layer.clear_plan_cache(keep=tuple(keep))
    return PlanReport(tuple(report))


def _time_layer(
    name: str,
    layer: FrozenGBLRMatrix,
    x: Tensor,
    candidates: tuple[str, ...],
    repeats: int,
    warmup: int,
) -> LayerPlan:
    rows = _rows(layer, x)
    if not (x.is_cuda and _triton_available()):
        # GPU plans are candidates on CUDA only (under Triton's interpreter they would be
        # timed as a CPU emulation).
        candidates = tuple(c for c in candidates if c not in GPU_PLANS)
    if "blocksparse" in candidates:
        ops = layer._block_ops(row_bucket(rows))
        if ops.nonempty_tiles >= _DENSE_EQUIVALENT * ops.tiles:
            # Nearly every tile is occupied: the blocks are the dense product in pieces, a
            # tie with dense that timing noise alone would decide.
            candidates = tuple(c for c in candidates if c != "blocksparse")
    forced = layer.plan
    times: dict[str, list[float]] = {c: [] for c in candidates}
    device = x.device
    try:
        with torch.no_grad():
            for candidate in candidates:
                layer.plan = candidate
                for _ in range(warmup):
                    layer(x)
            for repeat in range(repeats):
                # Rotate the order so no candidate always runs right after another.
                shift = repeat % len(candidates)
                for candidate in candidates[shift:] + candidates[:shift]:
                    layer.plan = candidate
                    _synchronize(device)
                    start = time.perf_counter()
                    layer(x)
                    _synchronize(device)
                    times[candidate].append(time.perf_counter() - start)
    finally:
        layer.plan = forced
    medians = {c: 1e3 * statistics.median(t) for c, t in times.items()}
    choice = min(medians, key=medians.__getitem__)
    if medians[choice] > _MARGIN * medians["dense"]:
        choice = "dense"  # within the noise of dense: keep the simplest plan
    cache_key = layer._cache_key(rows)
    layer.plan_cache[cache_key] = choice
    return LayerPlan(
        name=name,
        kind=type(layer).__name__,
        shape=layer.matrix_shape,
        macs_ratio=layer.flops() / layer.dense_flops(),
        rows=rows,
        bucket=cache_key[2],
        device=cache_key[0],
        dtype=cache_key[1],
        choice=choice,
        times_ms=medians,
    )
