"""``StructureLearner``: proximal width updates, σ annealing and an exact MACs budget.

The objective (docs/design.md#learning-the-structure) is ``L(θ) + λ · Σ_layers cost(W)``,
with the cost relaxed to ``Σ_k r (w_R,k m + w_C,k n)``. After every optimizer step, each
width is soft-thresholded by ``τ · (its cost per unit width)`` and clamped to [0, 1];
locations wrap modulo 1:

- λ mode: ``τ = η λ / D`` (``η`` the structure learning rate, ``D`` the dense MACs of all
  GBLR layers, so ``λ`` is the penalty per unit of the model's dense cost);
- budget mode: ``τ`` is the smallest global threshold, found by bisection, for which the
  exact (integer, live-components-only) cost of all GBLR layers is at most the budget.
  Layers compete for one budget.

Costs are per input row (per output position for a convolution) summed over the layers,
or, with an ``example_input``, each layer's per-row cost times the rows it processes in
one forward pass of it: what a forward pass costs when layers see different numbers of
rows (an MLP-Mixer's token- and channel-mixing layers, a CNN's stages).

This module is the core: checks, the budget projection, the σ schedule, the budget ramp
and the state. The optional passes of [`gblr.LearnerConfig`][] are objects
(``passes.py``, ``merge.py``, ``untangle.py``, ``refine.py``) that the core calls at fixed
hooks, in the order of [`PASSES`][gblr.learn.learner.PASSES] (docs/design.md, "Adding a learner
pass").
"""

from __future__ import annotations

import bisect
import functools
import math
import numbers
import warnings
import weakref
from typing import Any

import numpy
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..cost import fraction_budget_macs, layer_rows, row_weights
from ..layers.base import GBLRMatrixMixin, skip_held_gradients
from ..modules import to_device
from .arguments import BUDGET_ALIASES, budget_names, check_budget_arguments, resolve_deprecated
from .config import DEPRECATED_OPTIONS, SIGMA_SCHEDULES, LearnerConfig, check_sigma
from .factors import check_int
from .groups import check_rate, gblr_layers
from .merge import MergePass
from .passes import AdaptivePass, LearnerPass, PassSchedule, ShiftLimitPass
from .refine import RefinePass
from .untangle import UntanglePass

__all__ = ["PASSES", "SIGMA_SCHEDULES", "StructureLearner", "project_to_budget"]

# The passes in the order they run at each hook: the shift limit clamps the optimizer's
# move before anything reads the structure; merge and untangle rewrite components before
# refine reads the records of the step (refine's swap must see the final intervals).
PASSES: tuple[type[LearnerPass], ...] = (
    ShiftLimitPass,
    AdaptivePass,
    MergePass,
    UntanglePass,
    RefinePass,
)
_BISECTION_STEPS = 60
# Halvings per batched evaluation while many components are costed (2**2 - 1 thresholds
# at once, in NumPy): the fastest of 1-4 on the pixel MLP, where the bisection was most of
# the learner's step (docs/BENCHMARKS.md, "Overhead on a small model"). Fewer components
# take more halvings at once, up to ``_MOST_HALVINGS_PER_ROUND``, while a round costs at
# most ``_NUMBERS_PER_ROUND`` widths.
_HALVINGS_PER_ROUND = 2
_MOST_HALVINGS_PER_ROUND = 6
_NUMBERS_PER_ROUND = 4096
# From this many components left in a bisection's bracket down, the remaining halvings
# run one at a time in plain Python floats: on the pixel MLP most of the learner's
# rounds cost one component, and a NumPy round's fixed cost is many Python halvings'.
_SCALAR_COMPONENTS = 2
# Widths at or near 0 are cut as if this wide (cut_exponent scales the cut by width ** p).
_NARROWEST_CUT_WIDTH = 1e-6


def _halvings_for(components: int) -> int:
    """Halvings per round for a bisection that costs ``components`` components: as many
    as keep a round's ``(2**h - 1, 2, components)`` widths within ``_NUMBERS_PER_ROUND``,
    between ``_HALVINGS_PER_ROUND`` and ``_MOST_HALVINGS_PER_ROUND``."""
    points = _NUMBERS_PER_ROUND // max(2 * components, 1)
    return max(_HALVINGS_PER_ROUND, min(_MOST_HALVINGS_PER_ROUND, (points + 1).bit_length() - 1))


def _midpoints(low: float, high: float, levels: int) -> list[float]:
    """The midpoints ``levels`` halvings of ``[low, high]`` can visit, in increasing order,
    each computed as a sequential bisection computes it (``0.5 * (a + b)`` of the two
    points around it)."""
    points = [low, high]
    for _ in range(levels):
        refined = [low]
        for left, right in zip(points, points[1:]):
            refined += (0.5 * (left + right), right)
        points = refined
    return points[1:-1]


# Thresholds costed first around a hint, relative to it: while the budget ramps down the
# learner's threshold moves by far less than 10% between steps.
_HINT_STEPS = (-0.1, -0.01, -0.001, 0.0, 0.001, 0.01, 0.1)
# ... and around where the cost, linear in the threshold from its exact value at 0, meets
# the target, in MACs of that line's slope: once the budget is spent and filled every
# step, the threshold changes by more than itself between steps (its sign too), and
# that estimate fell within 7 MACs of it on 90% of the pixel MLP's steps, within 15 on
# all (docs/BENCHMARKS.md, "The bisection started near a linear estimate").
_ESTIMATE_MACS = (-16.0, -8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0, 16.0)


class _Bracket:
    """What a bisection knows of the cost between two thresholds: ``below``, known not to
    fit the target, and ``above``, known to fit it (or the bisection's upper end, which
    the halvings never reach), with the line counts there where known.

    Each component's line counts do not increase with the threshold (every step of the
    arithmetic is monotone, roundings included). So a threshold at or below ``below``
    does not fit and one at or above ``above`` fits without costing it, and a component
    with the same counts at both ends has them everywhere between: its MACs move to
    ``fixed_cost`` and the thresholds between are costed on the other components alone.
    MACs are whole numbers far below 2**53, so the split sums are the whole sums exactly.
    The learner's bracket soon holds a few components, and then a round costs more
    thresholds at once: the NumPy calls, not the numbers, are what a round costs.
    """

    def __init__(
        self,
        below: float,
        above: float,
        target: int,
        widths: numpy.ndarray,
        per_unit: numpy.ndarray,
        dims: numpy.ndarray,
        ranks: numpy.ndarray,
        view: _StructureView,
    ) -> None:
        self.below, self.above, self.target, self.view = below, above, target, view
        self.widths, self.per_unit, self.dims, self.ranks = widths, per_unit, dims, ranks
        self.counts: list[numpy.ndarray | None] = [None, None]  # at below, at above
        self.fixed_cost = 0.0
        # thresholds worth costing first (`_bisection_start` sets them)
        self.likely: list[float] = []

    @property
    def components(self) -> int:
        return self.widths.shape[1]

    def know(
        self,
        below: tuple[float, numpy.ndarray] | None = None,
        above: tuple[float, numpy.ndarray] | None = None,
    ) -> None:
        """Record a threshold that does not fit (``below``) and one that fits (``above``),
        each with its ``(2, C)`` line counts over the components costed now, where they
        narrow the bracket."""
        if below is not None and below[0] >= self.below:
            self.below, self.counts[0] = below
        if above is not None and above[0] <= self.above:
            self.above, self.counts[1] = above
        low_counts, high_counts = self.counts
        if low_counts is None or high_counts is None:
            return
        moving = (low_counts != high_counts).any(axis=0)
        if moving.all():
            return
        fixed = ~moving
        self.fixed_cost += float(
            self.view._cost_of_lengths(high_counts[None][:, :, fixed], self.ranks[fixed])[0]
        )
        self.widths, self.per_unit, self.dims, self.ranks = (
            numpy.ascontiguousarray(array[..., moving])
            for array in (self.widths, self.per_unit, self.dims, self.ranks)
        )
        self.counts = [low_counts[:, moving], high_counts[:, moving]]

    def first_fit(self, points: list[float]) -> int:
        """Index of the first of the increasing ``points`` that fits the target (``len``
        if none does): those between the ends costed in one call, the others known from
        the ends."""
        first = bisect.bisect_right(points, self.below)  # the points before do not fit
        last = bisect.bisect_left(points, self.above)  # the points from here fit
        if first == last:
            return first
        costed = points[first:last]
        shrunk = self.widths - numpy.asarray(costed)[:, None, None] * self.per_unit
        counts = self.view._lengths(shrunk, self.dims)
        fits = self.fixed_cost + self.view._cost_of_lengths(counts, self.ranks) <= self.target
        # The costs do not increase, so the fits are some False, then True.
        index = int(fits.argmax()) if fits[-1] else len(costed)
        self.know(
            (costed[index - 1], counts[index - 1]) if index > 0 else None,
            (costed[index], counts[index]) if index < len(costed) else None,
        )
        return first + index

    def halve_one_by_one(self, low: float, high: float, halvings: int) -> float:
        """The upper end of ``[low, high]`` after ``halvings`` sequential halvings, each
        midpoint costed (where the bracket does not decide it) in Python floats with the
        arithmetic of `first_fit`, operation for operation: the product and difference in
        float64, the clamp, the cast to the dims' precision, the product with the dims in
        it (exact in float64 for float32 widths, then rounded once, as float32 rounds it)
        and the rounding half to even. So the result is `first_fit`'s bit for bit. A side
        with the same line count at both ends of the bracket has it everywhere between
        (the counts are monotone) and is not costed again."""
        single = self.dims.dtype == numpy.float32
        to_float32 = numpy.float32
        low_counts, high_counts = self.counts
        # Per component: its MACs per line, then per side either its constant line count
        # or (width, cut per unit of threshold, lines of the side) to count it from.
        terms = []
        for column in range(self.components):
            sides: list[int | tuple[float, float, float]] = []
            for side in (0, 1):
                if (
                    low_counts is not None
                    and high_counts is not None
                    and low_counts[side, column] == high_counts[side, column]
                ):
                    sides.append(int(low_counts[side, column]))
                else:
                    sides.append(
                        (
                            float(self.widths[side, column]),
                            float(self.per_unit[side, column]),
                            float(self.dims[side, column]),
                        )
                    )
            terms.append((float(self.ranks[column]), sides))
        budget = self.target - self.fixed_cost
        below, above = self.below, self.above
        for _ in range(halvings):
            middle = 0.5 * (low + high)
            if middle >= above:
                high = middle
                continue
            if middle <= below:
                low = middle
                continue
            cost = 0.0
            for rank, sides in terms:
                lines = []
                for known in sides:
                    if isinstance(known, int):
                        lines.append(known)
                        continue
                    width, unit, dim = known
                    shrunk = min(max(width - middle * unit, 0.0), 1.0)
                    if single:
                        lines.append(round(float(to_float32(float(to_float32(shrunk)) * dim))))
                    else:
                        lines.append(round(shrunk * dim))
                if lines[0] > 0 and lines[1] > 0:
                    cost += rank * (lines[0] + lines[1])
            if cost <= budget:
                high = above = middle
            else:
                low = below = middle
        return high


def _budget_threshold(
    view: _StructureView,
    widths: Tensor,
    target: int,
    scale: Tensor | None = None,
    fill: bool = False,
    hint: float | None = None,
) -> tuple[float, Tensor | None]:
    """Smallest global threshold whose shrunk widths cost at most ``target`` MACs, and the
    ``scale`` to shrink with.

    Widths that already fit get ``0``, or with ``fill`` and a cost under ``target`` the
    most negative threshold (the largest growth) that still fits, with ``scale`` set to 0
    for every component that is not live: what the cut closed stays closed.

    A bisection of ``_BISECTION_STEPS`` halvings, evaluated several at a time: the cost
    does not increase with the threshold, so the first of a round's midpoints that fits
    and the last that does not are the bracket the sequential halvings reach, bit for
    bit. ``hint`` (the threshold of the learner's previous step) changes how fast, never
    the result: thresholds near it are costed first, with those near where the cost,
    linear in the threshold from its exact value at 0, meets the target, and a midpoint at
    or below one that does not fit (or at or above one that fits) is decided without
    costing it.
    """
    threshold, scale, bound = _bisection_start(view, widths, target, scale, fill)
    if bound is None:
        return threshold, scale
    low, high = bound.below, bound.above
    first = set(bound.likely)
    if hint is not None and low < hint < high:
        first |= {hint * (1.0 + step) for step in _HINT_STEPS}
    first = {point for point in first if low < point < high}
    if first:
        bound.first_fit(sorted(first))
    halvings_left = _BISECTION_STEPS
    while halvings_left:
        if bound.components <= _SCALAR_COMPONENTS:
            return bound.halve_one_by_one(low, high, halvings_left), scale
        middle = 0.5 * (low + high)
        if not bound.below < middle < bound.above:  # a halving known without costing
            low, high = (low, middle) if middle >= bound.above else (middle, high)
            halvings_left -= 1
            continue
        halvings = min(halvings_left, _halvings_for(bound.components))
        halvings_left -= halvings
        points = _midpoints(low, high, halvings)
        first_fit = bound.first_fit(points)
        if first_fit < len(points):
            high = points[first_fit]
        if first_fit > 0:
            low = points[first_fit - 1]
    return high, scale


def _bisection_start(
    view: _StructureView,
    widths: Tensor,
    target: int,
    scale: Tensor | None,
    fill: bool,
) -> tuple[float, Tensor | None, _Bracket | None]:
    """Where `_budget_threshold`'s bisection starts: ``(threshold, scale, None)`` when no
    halving is needed (the widths fit, or every live width can grow to 1), else ``(0.0,
    scale, bracket)`` with the bracket's ``below`` and ``above`` the halvings' two ends
    and its components those live at the threshold 0."""
    host_widths = widths.detach().to(torch.float64).cpu().numpy()
    lengths = view._lengths(host_widths[None])
    per_unit = view.unit_cost if scale is None else view.unit_cost * scale
    cost = view._cost_of_lengths(lengths)[0]
    if cost > target:
        # A width with no cut (a held side, scale 0) bounds nothing.
        reach = torch.where(per_unit > 0, widths / per_unit.clamp_min(1e-300), 0.0)
        low, high = 0.0, float(reach.max().item()) * (1 + 1e-9) + 1e-12
    elif cost == target or not fill:
        return 0.0, scale, None
    else:
        live = torch.as_tensor((lengths[0] > 0).all(axis=0), device=widths.device)
        scale = (torch.ones_like(widths) if scale is None else scale) * live
        per_unit = view.unit_cost * scale
        grows = live & (per_unit > 0)
        room = torch.where(grows, (1.0 - widths) / per_unit.where(grows, 1.0), 0.0)
        low, high = -float(room.max().item()) * (1 + 1e-9) - 1e-12, 0.0
        if view.cost(view.shrink(widths, low, scale)) <= target:
            return low, scale, None  # every live width can reach 1 within the budget
    # A component with no line on a side at the threshold 0 has none at any larger one
    # (the shrink only narrows; a growth leaves such components alone, their scale is 0),
    # so the halvings count the components live at 0 alone:
    # the same costs, on a fraction of the widths once the cut has removed most
    # components. The bracket above comes from all of them, as before. The subsets are
    # copied C-contiguous: NumPy is several times slower on the strided arrays that
    # indexing returns.
    columns = (lengths[0] > 0).all(axis=0).nonzero()[0]
    host_per_unit = per_unit.detach().to(torch.float64).cpu().numpy()
    live_widths, live_per_unit, dims, ranks = (
        numpy.ascontiguousarray(array)
        for array in (
            host_widths[:, columns],
            host_per_unit[:, columns],
            view.dims_numpy[:, columns],
            view.ranks_numpy[columns],
        )
    )
    bound = _Bracket(low, high, target, live_widths, live_per_unit, dims, ranks, view)
    # The threshold 0 (one end of either bracket) leaves the widths as they are.
    at_zero = (0.0, numpy.ascontiguousarray(lengths[0][:, columns]))
    bound.know(*((at_zero, None) if low == 0.0 else (None, at_zero)))
    # While the budget is filled every step, the last threshold is no guide (see
    # _ESTIMATE_MACS); while it ramps down, the thresholds around it cost less.
    if not fill:
        return 0.0, scale, bound
    # MACs per unit of threshold of the sides that move (not at 0 or 1, not held).
    moving = (live_widths > 0.0) & (live_widths < 1.0) & (live_per_unit > 0.0)
    slope = float((ranks * numpy.where(moving, live_per_unit * dims, 0.0).sum(0)).sum())
    if slope > 0.0:
        estimate = (cost - target) / slope
        bound.likely = [estimate + macs / slope for macs in _ESTIMATE_MACS]
    return 0.0, scale, bound


def _sum_to_screen(tensor: Tensor) -> Tensor:
    """``tensor``'s sum, in float32 at least (half-precision sums overflow early)."""
    return tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def project_to_budget(layers: list[GBLRMatrixMixin], macs: int) -> None:
    """Shrink the layers' widths (one global soft threshold, in place) until their exact
    MACs per row are at most ``macs``: the learner's budget projection, applied once.

    Examples:
        >>> import gblr
        >>> from gblr.learn.learner import project_to_budget
        >>> layer = gblr.GBLRLinear(16, 16)  # full components: 16 * 32 MACs
        >>> project_to_budget([layer], 100); layer.flops() <= 100
        True
    """
    view = _StructureView(layers)
    widths = view.widths().clamp(0.0, 1.0)
    view.write(view.shrink(widths, _budget_threshold(view, widths, macs)[0]))


def _row_weights(
    model: nn.Module, layers: list[GBLRMatrixMixin], names: list[str], example_input: Any
) -> tuple[list[int], int]:
    """Each layer's rows in one forward pass on ``example_input``, divided by their greatest
    common divisor, and that divisor: ``([1, ...], 1)`` without an input, so that layers
    which all see the same rows cost exactly what they cost per row."""
    if example_input is None:
        return [1] * len(layers), 1
    rows = layer_rows(model, layers, to_device(example_input, layers[0].widths.device))
    missing = [name for name, count in zip(names, rows, strict=True) if count == 0]
    if missing:
        raise ValueError(
            f"example_input: the GBLR layers {missing[:3]}{' ...' if len(missing) > 3 else ''} "
            "did not run in the model's forward pass on it, so their cost per example is "
            "unknown; give an input that runs every GBLR layer (model(*example_input) for a "
            "tuple), or leave example_input out to count every layer per row"
        )
    return row_weights(rows)


class _StructureView:
    """All GBLR widths of a model as flat ``(2, ΣK)`` tensors, for vectorized cost math.

    ``weights``: each layer's rows per unit of cost (default 1 each: per-row costs)."""

    def __init__(self, layers: list[GBLRMatrixMixin], weights: list[int] | None = None) -> None:
        self.layers = layers
        weights = [1] * len(layers) if weights is None else weights
        dims, ranks = [], []
        for layer, weight in zip(layers, weights, strict=True):
            k = layer.num_components
            dims.append(torch.tensor([[layer.cols] * k, [layer.rows] * k], dtype=torch.float64))
            # MACs per line of a component: its rank times the rows it is applied to.
            line_macs = float(layer.rank_per_component * weight)
            ranks.append(torch.full((k,), line_macs, dtype=torch.float64))
        device = layers[0].widths.device
        self.dims = torch.cat(dims, dim=1).to(device)
        self.ranks = torch.cat(ranks).to(device)
        # The exact costs are counted on the host, in NumPy: the learner reads them every
        # step (the bisection about 30 times), and NumPy's calls on a few thousand numbers
        # cost a fraction of torch's. They round in the widths' own precision, as the
        # layers' flops() do.
        dtypes = {layer.widths.dtype for layer in layers}
        cost_dtype = numpy.float64 if torch.float64 in dtypes else numpy.float32
        self.dims_numpy = torch.cat(dims, dim=1).numpy().astype(cost_dtype)
        self.ranks_numpy = torch.cat(ranks).numpy()
        # Relaxed cost per unit of width: r * m for a row width, r * n for a column width.
        self.unit_cost = self.dims * self.ranks
        self.dense_macs = sum(
            layer.rows * layer.cols * weight for layer, weight in zip(layers, weights, strict=True)
        )

    def widths(self) -> Tensor:
        return torch.cat([layer.widths.detach().to(torch.float64) for layer in self.layers], 1)

    def cost(self, widths: Tensor) -> int:
        """Exact MACs of the ``(2, ΣK)`` widths (clamped to [0, 1]): live components only."""
        host = widths.detach().to(torch.float64).cpu().numpy()
        return int(self._cost_of_lengths(self._lengths(host[None]))[0])

    def _lengths(self, widths: numpy.ndarray, dims: numpy.ndarray | None = None) -> numpy.ndarray:
        """Whole lines of ``(T, 2, C)`` float64 widths, clamped to [0, 1] and rounded in the
        widths' own precision, as the layers' flops() do. ``dims``: ``(2, C)``, the line
        counts of the ``C`` components ``widths`` holds (default: all of the view's)."""
        dims = self.dims_numpy if dims is None else dims
        return numpy.round(numpy.clip(widths, 0.0, 1.0).astype(dims.dtype) * dims)

    def _cost_of_lengths(
        self, lengths: numpy.ndarray, ranks: numpy.ndarray | None = None
    ) -> numpy.ndarray:
        """``(T,)`` exact MACs of ``(T, 2, C)`` line counts: live components only.
        ``ranks``: ``(C,)``, their MACs per line (default: all of the view's)."""
        ranks = self.ranks_numpy if ranks is None else ranks
        live = (lengths > 0).all(axis=1)
        return (ranks * lengths.sum(axis=1, dtype=numpy.float64) * live).sum(axis=1)

    def shrink(self, widths: Tensor, threshold: float, scale: Tensor | None = None) -> Tensor:
        per_unit = self.unit_cost if scale is None else self.unit_cost * scale
        return (widths - threshold * per_unit).clamp(0.0, 1.0)

    @functools.cached_property
    def parts(self) -> list[tuple[GBLRMatrixMixin, slice]]:
        """Each layer with the slice of its components in the flat ``(2, ΣK)`` tensors."""
        parts, start = [], 0
        for layer in self.layers:
            parts.append((layer, slice(start, start + layer.num_components)))
            start += layer.num_components
        return parts

    def write(self, widths: Tensor) -> None:
        with torch.no_grad():
            for layer, part in self.parts:
                layer.widths.copy_(widths[:, part])


#: Steps between the learner's checks that its layers are still in the model (a walk
#: over the model's modules; about 50 us for a ViT-B).
MEMBERSHIP_CHECK_EVERY = 50


def _distributed() -> bool:
    """Whether this process is one of a ``torch.distributed`` run (any world size: a
    one-process DistributedDataParallel checks its parameters' gradients too)."""
    return dist.is_available() and dist.is_initialized()


class StructureLearner:
    """Learns every GBLR layer's structure and MACs share; call `step` after
    ``optimizer.step()``.

    How it learns (σ schedule, budget ramp, optional passes) is a
    [`gblr.LearnerConfig`][]; the budget and the run's length are keywords here.
    What the options were measured to do: docs/BENCHMARKS.md (the structure learner's
    section); they help on planted structures and did not help on real tasks.

    Args:
        model: a module containing GBLR layers.
        config: a [`gblr.LearnerConfig`][] (default ``LearnerConfig()``: the layers'
            σ left alone, the one-line sides of the block-diagonal start held, a final
            phase with the structure fixed, removed components kept off, the scaled cut
            and the filled budget; the paper's method is
            [`LearnerConfig.paper`][gblr.learn.config.LearnerConfig.paper]). Kept as
            `config` and saved in `state_dict`; the learner sets every GBLR layer's
            ``revive_empty`` from it.
        budget: budget mode: a fraction in (0, 1] of the dense MACs of all GBLR layers
            (the int ``1`` is 1.0, as in [`gblr.convert`][]; other ints are refused:
            an absolute count goes to ``budget_macs``).
        budget_macs: budget mode: an absolute budget, MACs per input row summed over the
            GBLR layers (an int), or with ``example_input`` MACs of the GBLR layers in
            one forward pass on it.
        lam: λ mode: penalty weight per unit of the GBLR layers' total dense cost.
            Exactly one of ``budget``, ``budget_macs`` and ``lam`` must be given. A
            budget below the cheapest component (``2 r`` MACs: one row and one column at
            rank ``r``) would leave every layer empty: a ``ValueError`` names the
            smallest budget allowed.
        total_steps: number of `step` calls in the run; σ reaches its end here.
        warmup_steps: budget mode: the budget ramps from the starting cost down to its
            final value over these steps, shaped by ``config.ramp`` (0: the full cut at
            once). The passes run only after it.
        sigma_start_step: σ stays at its start value until this step.
        optimizer: λ mode: the optimizer whose structure group's current learning rate is
            ``η`` (follows LR schedulers). Alternatively give ``structure_lr``.
        structure_lr: λ mode: a fixed ``η``.
        example_input: optional input of ``model`` (a tensor, a tuple of positional
            arguments, or a mapping of keyword arguments such as a tokenizer's output;
            moved to the GBLR layers' device), for example one sample of the
            training data. The model runs once on it (eval mode, no gradient, training
            flags restored) and each layer's cost is then its per-row MACs times the rows
            (positions, for a convolution) it processed: the budget becomes a fraction
            of a forward pass's MACs, and layers that see more rows per example pay more
            for each line. Without it every layer counts per row, which is the same
            where all GBLR layers see the same rows (a transformer's linear layers) and
            not where they do not (an MLP-Mixer's token- and channel-mixing layers, a
            CNN's stages). Every GBLR layer must run on it (``ValueError`` naming those
            that do not).
        **deprecated: until gblr 0.3, with a ``FutureWarning`` naming the replacement:
            ``target``/``target_macs`` (now ``budget``/``budget_macs``) and the options
            now in [`gblr.LearnerConfig`][]: ``sigma``, ``sigma_schedule``, ``ramp``,
            ``adaptive`` (``adaptive=AdaptiveConfig(exponent)``, 0 was off),
            ``max_shift``/``max_shift_ramp`` (``shift_limit=ShiftLimitConfig(cells,
            cells_during_ramp)``), ``merge``, ``untangle``, ``refine`` (``MergeConfig``,
            ``UntangleConfig``, ``RefineConfig``) and ``merge_every`` (``pass_every``).
            They build the same config, so the run is the same bit for bit; with
            ``config`` they are a ``ValueError``.

    Non-finite numbers: `step` (and the constructor) raise ``FloatingPointError``
    naming the layer (its module name), the parameter and the step when a width,
    location or factor is NaN or infinite; they come from a NaN or infinite loss or
    gradient that the optimizer applied. Gradients themselves are not read (except by
    the ``refine`` pass): a step that ``torch.amp.GradScaler`` skipped leaves the
    parameters finite, and the learner steps as usual (call it after
    ``scaler.step(optimizer)``).

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(gblr.GBLRLinear(32, 32), gblr.GBLRLinear(32, 32))
        >>> opt = torch.optim.Adam(gblr.param_groups(model, lr=1e-3))
        >>> learner = gblr.StructureLearner(model, budget=0.3, total_steps=100)
        >>> opt.step(); learner.step()
        >>> learner.summary()["macs_ratio"] <= 0.3
        True
        >>> planted = gblr.StructureLearner(model, gblr.LearnerConfig.planted(),
        ...                                 budget=0.3, total_steps=100, warmup_steps=50)
        >>> list(planted.passes)
        ['shift_limit', 'adaptive', 'merge', 'untangle', 'refine']
    """

    def __init__(
        self,
        model: nn.Module,
        config: LearnerConfig | None = None,
        *,
        budget: float | int | None = None,
        budget_macs: int | None = None,
        lam: float | None = None,
        total_steps: int,
        warmup_steps: int = 0,
        sigma_start_step: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        structure_lr: float | None = None,
        example_input: Any = None,
        **deprecated: Any,
    ) -> None:
        unknown = sorted(set(deprecated) - set(DEPRECATED_OPTIONS) - set(BUDGET_ALIASES))
        if unknown:
            raise TypeError(
                f"StructureLearner got unexpected keyword argument(s) {unknown}; it takes "
                "model, config, budget=, budget_macs=, lam=, total_steps=, warmup_steps=, "
                "sigma_start_step=, optimizer=, structure_lr=, example_input="
            )
        if config is not None and not isinstance(config, LearnerConfig):
            raise TypeError(
                f"config must be a gblr.LearnerConfig or None, got {type(config).__name__} "
                "(a dict: LearnerConfig.from_dict(...))"
            )
        budgets = {"budget": budget, "budget_macs": budget_macs, "lam": lam}
        budgets.update(
            {name: deprecated.pop(name) for name in BUDGET_ALIASES if name in deprecated}
        )
        fraction_name, macs_name = budget_names(budgets)
        config, budgets = resolve_deprecated(config, {**budgets, **deprecated})
        self.config: LearnerConfig = LearnerConfig() if config is None else config
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = gblr_layers(model)
        layers = [layer for _, layer in named]
        if not layers:
            raise ValueError(
                "model has no GBLR layer in training form (GBLRLinear or GBLRConv2d): convert "
                "it first (gblr.convert); a frozen model (gblr.freeze) is for inference"
            )
        given = {fraction_name: budgets.get("budget"), macs_name: budgets.get("budget_macs")}
        check_budget_arguments({**given, "lam": lam})
        # Names for errors: "" is the model itself.
        self.layer_names = [name or "(model)" for name, _ in named]
        # to see layers the user replaced or deleted (a weak reference: the learner does
        # not keep a model alive)
        self._model_ref = weakref.ref(model)
        on_meta = [
            name for name, layer in zip(self.layer_names, layers, strict=True)
            if any(p.is_meta for p in layer.parameters(recurse=False))
        ]  # fmt: skip
        if on_meta:
            raise ValueError(
                f"the GBLR layers {on_meta[:3]} are on the meta device (no values yet): "
                "materialise the model first (model.to_empty(device=...) and "
                "load_state_dict) and build the learner on it"
            )
        # A new run learns the structure that an earlier learner's final phase fixed
        # (left so, the model in memory would train differently from its state_dict's).
        for layer in layers:
            if getattr(layer, "structure_fixed_by_learner", False):
                layer.widths.requires_grad_(True)
                layer.locations.requires_grad_(True)
                layer.structure_fixed_by_learner = False
        self.total_steps = check_int("total_steps", total_steps, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.sigma_start_step = check_int("sigma_start_step", sigma_start_step, 0)
        sigma = self.config.sigma
        anneals = isinstance(sigma, tuple) and sigma[0] != sigma[1]
        if anneals and self.sigma_start_step >= self.total_steps:
            warnings.warn(
                f"sigma_start_step={self.sigma_start_step} >= total_steps={self.total_steps}: "
                "σ never anneals and stays at its start for the whole run",
                UserWarning,
                stacklevel=2,
            )
        self.sigma_range = check_sigma(self.config.sigma)

        # Costs are counted in units of `rows_unit` rows: row_weights are each layer's rows
        # in the example divided by it (all 1 without one).
        self.row_weights, self.rows_unit = _row_weights(
            model, layers, self.layer_names, example_input
        )
        self.view = _StructureView(layers, self.row_weights)
        self.layers = layers
        for layer in layers:
            layer.revive_empty = self.config.revive
        self.lam: float | None = None
        self.final_target: int | None = None
        self._check_finite("when the learner was built")
        if lam is None:
            cheapest, weight = min(
                zip(layers, self.row_weights, strict=True),
                key=lambda pair: pair[0].rank_per_component * pair[1],
            )
            rank = cheapest.rank_per_component
            rows = "" if example_input is None else f", applied to {weight * self.rows_unit} rows"
            final_macs = fraction_budget_macs(
                budgets.get("budget"),
                budgets.get("budget_macs"),
                self.view.dense_macs * self.rows_unit,
                fraction_name=fraction_name,
                macs_name=macs_name,
                minimum=2 * rank * weight * self.rows_unit,
                minimum_reason=(
                    f"the cheapest component: one row and one column at rank {rank}{rows}; "
                    "below it every GBLR layer would be empty"
                ),
            )
            self.final_target = final_macs // self.rows_unit
            if self.warmup_steps > self.total_steps:
                warnings.warn(
                    f"warmup_steps={self.warmup_steps} > total_steps={self.total_steps}: the "
                    "budget's ramp ends after the run, which then ends above the budget "
                    "(unless it starts under it); give warmup_steps <= total_steps",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
                raise TypeError(f"lam must be a number >= 0, got {lam!r}")
            if not (lam >= 0 and math.isfinite(lam)):
                raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
            if optimizer is None and structure_lr is None:
                raise ValueError(
                    "λ mode needs the structure learning rate: pass optimizer= (its group "
                    "holding the widths) or structure_lr="
                )
            if structure_lr is not None:  # inf cut every component at the first step
                structure_lr = check_rate("structure_lr", structure_lr)
            self.lam = float(lam)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            # (it failed at the first step, reading its param_groups)
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.structure_lr = structure_lr

        self.step_count = 0
        self.threshold = 0.0
        self.start_cost = self.view.cost(self.view.widths())
        # The final phase's structure, put back before every step, where the widths and
        # locations must keep their gradients (`_apply_sigma`); None otherwise.
        self._fixed_structure: list[tuple[Tensor, Tensor]] | None = None
        self._hold(*self._narrow_sides())
        schedule = PassSchedule(self.warmup_steps, self.config.pass_every)
        # name -> pass, in the order of PASSES: the passes the config turns on.
        self.passes: dict[str, LearnerPass] = {
            cls.name: cls(getattr(self.config, cls.name), layers, schedule)
            for cls in PASSES
            if getattr(self.config, cls.name) is not None
        }
        self._show_passes_held()
        self._apply_sigma()

    def _check_finite(self, when: str) -> None:
        """``FloatingPointError`` naming the layer, the parameter and ``when`` if a width,
        location or factor is NaN or infinite.

        One device sync for all layers, and one pass over each tensor: a NaN or infinite
        entry makes the tensor's sum NaN or infinite, so the sums screen every step (an
        element-wise ``isfinite`` takes several passes and was a measurable share of a
        small model's training step, docs/BENCHMARKS.md). Only a sum that is not finite,
        which a finite tensor's sum can also be when it overflows, is followed by the
        element-wise check. Gradients are not checked here: a step that
        ``torch.amp.GradScaler`` skipped for non-finite gradients leaves the parameters
        finite, and the learner then steps as usual.
        """
        tensors = [
            (index, name, getattr(layer, name).detach())
            for index, layer in enumerate(self.layers)
            for name in ("widths", "locations", "U", "V")
        ]
        device = tensors[0][2].device
        sums = torch.stack([_sum_to_screen(t).to(device) for _, _, t in tensors])
        if bool(torch.isfinite(sums).all()):
            return
        flags = [bool(torch.isfinite(t).all()) for _, _, t in tensors]
        if all(flags):
            return  # a sum overflowed; every entry is finite
        index, name, values = tensors[flags.index(False)]
        nan = int(torch.isnan(values).sum())
        inf = int(torch.isinf(values).sum())
        layer = self.layers[index]
        raise FloatingPointError(
            f"StructureLearner: the {name} of layer {self.layer_names[index]!r} "
            f"({type(layer).__name__}) are not finite {when}: {nan} NaN and {inf} infinite "
            f"of {values.numel()} entries. What ran before produced them: usually a NaN or "
            "infinite loss or gradient (check the loss and learning rate; with "
            "torch.amp.GradScaler call learner.step() after scaler.step(optimizer), which "
            "skips such steps and leaves the parameters finite)"
        )

    # ------------------------------------------------------------------ schedules
    def sigma_at(self, step: int) -> float | None:
        """σ used for the forward passes after ``step`` learner steps."""
        if self.exact_phase(step):
            return math.inf
        if self.sigma_range is None:
            return None
        start, end = self.sigma_range
        if start == end:  # also σ = inf, where the schedules' arithmetic gives NaN
            return start
        last = self.total_steps if self.exact_step is None else self.exact_step
        span = max(1, last - self.sigma_start_step)
        progress = min(1.0, max(0.0, (step - self.sigma_start_step) / span))
        if self.config.sigma_schedule == "constant":
            return start
        if self.config.sigma_schedule == "geometric":
            return start * (end / start) ** progress
        return start + (end - start) * progress

    def target_at(self, step: int) -> int | None:
        """Budget (MACs) enforced at ``step``: ramped from the starting cost over warm-up."""
        target = self._target_at(step)
        return None if target is None else target * self.rows_unit

    def _target_at(self, step: int) -> int | None:
        """`target_at` in the view's units of ``rows_unit`` rows."""
        if self.final_target is None:
            return None
        if self.warmup_steps == 0 or self.start_cost <= self.final_target:
            return self.final_target
        progress = min(1.0, step / self.warmup_steps)
        if self.config.ramp == "geometric":
            ramped = self.start_cost * (self.final_target / self.start_cost) ** progress
        else:
            ramped = self.start_cost + (self.final_target - self.start_cost) * progress
        return max(self.final_target, math.floor(ramped))

    def _structure_lr(self) -> float:
        if self.structure_lr is not None:
            return float(self.structure_lr)
        assert self.optimizer is not None
        width_ids = {id(layer.widths) for layer in self.layers}
        for group in self.optimizer.param_groups:
            if any(id(p) in width_ids for p in group["params"]):
                return float(group["lr"])
        raise ValueError("the optimizer given to StructureLearner does not hold the GBLR widths")

    @property
    def exact_step(self) -> int | None:
        """The step from which ``config.exact_from``'s final phase runs (``None``: none)."""
        if self.config.exact_from is None:
            return None
        return max(1, round(self.config.exact_from * self.total_steps))

    def exact_phase(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the steps taken) is in the final phase of
        ``config.exact_from``: exact masks and a fixed structure."""
        step = self.step_count if step is None else step
        return self.exact_step is not None and step >= self.exact_step

    def _apply_sigma(self) -> None:
        sigma = self.sigma_at(self.step_count)
        if sigma is None:
            return
        for layer in self.layers:
            layer.sigma.fill_(sigma)
        # The final phase trains the factors of the structure that evaluation and the
        # frozen form use: widths and locations stop (no gradient, so optimizers skip
        # them); with exact masks every move of theirs would be a discrete jump.
        if not self.exact_phase():
            return
        if _distributed():
            # DistributedDataParallel (and FSDP) fix at wrapping which parameters get a
            # gradient: one that stops fails the next forward ("parameters that were not
            # used in producing the loss"). There they keep their gradient, and the
            # structure of the end of this step is put back before the next one, which
            # undoes whatever the optimizer made of that gradient.
            self._fixed_structure = [
                (layer.widths.detach().clone(), layer.locations.detach().clone())
                for layer in self.layers
            ]
            return
        for layer in self.layers:
            layer.widths.requires_grad_(False)
            layer.locations.requires_grad_(False)
            # a later run's param_groups and learner give them their gradient back
            layer.structure_fixed_by_learner = True

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        """Proximal step on all widths, wrap locations, run the passes, advance σ. Call
        after ``optimizer.step()``."""
        for name, layer in zip(self.layer_names, self.layers, strict=True):
            by = getattr(layer, "superseded_by", None)  # (a layer pickled before it: none)
            if by is not None:
                raise RuntimeError(
                    f"{by} replaced the GBLR layer {name!r} in the model this learner was "
                    "built on: stepping it would change nothing the model runs; step the "
                    "learner before freezing or merging, not after"
                )
        if self.step_count % MEMBERSHIP_CHECK_EVERY == 0:
            self._check_layers_in_model()
        if self._fixed_structure is not None and self.exact_phase():
            for layer, (widths, locations) in zip(self.layers, self._fixed_structure, strict=True):
                layer.widths.copy_(widths)
                layer.locations.copy_(locations)
        self.step_count += 1
        step = self.step_count
        self._check_finite(f"at step {step} (before the learner changed anything)")
        passes = list(self.passes.values())
        for each in passes:
            each.before_shrink(step)
        for layer in self.layers:
            layer.locations.remainder_(1.0)
        scale = self._hold_narrow_sides()
        widths = self.view.widths().clamp(0.0, 1.0)
        for each in passes:
            factor = each.threshold_scale()
            if factor is not None:
                scale = factor if scale is None else scale * factor
        if self.config.cut_exponent:
            # A narrow interval is cut less; the floor keeps 0 ** p at a finite scale.
            factor = widths.clamp_min(_NARROWEST_CUT_WIDTH) ** self.config.cut_exponent
            scale = factor if scale is None else scale * factor
        if self.lam is not None:
            self.threshold = self._structure_lr() * self.lam / self.view.dense_macs
        else:
            target = self._target_at(step)
            assert target is not None
            self.threshold, scale = _budget_threshold(
                self.view, widths, target, scale, fill=self._fills(step), hint=self.threshold
            )
        self.view.write(self.view.shrink(widths, self.threshold, scale))
        if not self.exact_phase(step):  # the final phase keeps the structure it reached
            for each in passes:
                each.after_shrink(step)
        for each in passes:
            each.end_step(step)
        self._apply_sigma()

    def _fills(self, step: int) -> bool:
        """Whether ``step`` grows the live widths back to the budget
        (``config.fill_budget``): after the warm-up, before the final phase."""
        return self.config.fill_budget and step > self.warmup_steps and not self.exact_phase(step)

    def steps_layers_of(self, model: nn.Module) -> bool:
        """Whether every GBLR layer this learner steps is a module of ``model`` (the model
        it was built on, or one holding it): a training callback given a learner checks
        that it drives the model being trained.

        Examples:
            >>> import torch, gblr
            >>> model = torch.nn.Sequential(gblr.GBLRLinear(8, 8, init_cost=0.5))
            >>> learner = gblr.StructureLearner(model, budget=0.5, total_steps=10)
            >>> learner.steps_layers_of(model), learner.steps_layers_of(torch.nn.Linear(8, 8))
            (True, False)
        """
        return not self._layers_missing_from(model)

    def _layers_missing_from(self, model: nn.Module) -> list[str]:
        """The names of the GBLR layers this learner steps that are not modules of
        ``model``."""
        present = {id(module) for module in model.modules()}
        return [
            name
            for name, layer in zip(self.layer_names, self.layers, strict=True)
            if id(layer) not in present
        ]

    # ------------------------------------------------------------------ reporting
    def macs(self) -> int:
        """Exact MACs of all GBLR layers now: per row, or with ``example_input`` in one
        forward pass on it."""
        return self.view.cost(self.view.widths()) * self.rows_unit

    def _check_layers_in_model(self) -> None:
        """``RuntimeError`` naming a layer that is no longer in the model the learner was
        built on (replaced by assignment or deleted): the learner would go on moving and
        costing it, and its budget would not be the model's."""
        model = self._model_ref()
        if model is None:
            return
        missing = self._layers_missing_from(model)
        if missing:
            raise RuntimeError(
                f"the GBLR layer {missing[0]!r} is no longer in the model this learner was "
                "built on (replaced or deleted): build a new learner (and param_groups) "
                "for the model as it is now"
            )

    def summary(self) -> dict[str, float]:
        """Numbers for logging: step, MACs, ``macs_ratio``, threshold, live components,
        the passes' counters (``merges``, ``untangles``, ``refines``), σ, and
        ``target_macs`` (the budget now) or ``lam``."""
        macs = self.macs()
        live = sum(layer.live_components() for layer in self.layers)
        summary: dict[str, float] = {
            "step": float(self.step_count),
            "macs": float(macs),
            "dense_macs": float(self.view.dense_macs * self.rows_unit),
            "macs_ratio": macs / (self.view.dense_macs * self.rows_unit),
            "threshold": self.threshold,
            "live_components": float(live),
        }
        for each in self.passes.values():
            summary.update(each.summary())
        sigma = self.sigma_at(self.step_count)
        if sigma is not None:
            summary["sigma"] = sigma
        target = self.target_at(self.step_count)
        if target is not None:
            summary["target_macs"] = float(target)
        if self.lam is not None:
            summary["lam"] = self.lam
        return summary

    def _narrow_sides(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``config.hold_narrow_sides``: the ``(2, ΣK)`` bool mask of the sides at most
        that many lines wide (and not empty) now, and every layer's widths and locations
        now, concatenated ``(2, ΣK)`` float64; ``None`` each when off."""
        lines = self.config.hold_narrow_sides
        if not lines:
            return None, None, None
        widths = self.view.widths().clamp(0.0, 1.0)
        lengths = torch.as_tensor(self.view._lengths(widths.cpu().numpy()[None])[0])
        held = ((lengths > 0) & (lengths <= lines)).to(widths.device)
        # Kept as the step keeps them (widths in [0, 1], locations wrapped), so restoring
        # them never undoes the step's own projection.
        locations = torch.cat([layer.locations.detach().double() for layer in self.layers], 1)
        return held, widths, locations.remainder(1.0)

    def _hold(self, sides: Tensor | None, widths: Tensor | None, locations: Tensor | None) -> None:
        """Hold ``sides`` (``(2, ΣK)`` bool) at ``widths`` with their components at
        ``locations`` (``None`` each: nothing held): keeps them, the cut's scale they give
        (0 on a held side) and which locations they hold, and tells each layer which of
        its sides are held in every component that can get a gradient (the live ones; all
        of them with ``revive``), so its training masks skip those gradients. The live set
        only shrinks and the held set is fixed, so that stays true."""
        self.held_sides, self.held_widths, self.held_locations = sides, widths, locations
        self._held_scale = None if sides is None else (~sides).double()
        self._held_components = (
            None if sides is None else sides.any(0, keepdim=True).expand_as(sides)
        )
        for layer, part in self.view.parts:
            skip = None
            if sides is not None:
                held = sides[:, part].to(layer.widths.device)
                able = torch.ones(held.shape[1], dtype=torch.bool, device=held.device)
                if not self.config.revive:
                    able = (layer.widths.detach() > 0).all(0)
                if bool(able.any()):
                    skip = (
                        bool(held[0][able].all()),
                        bool(held[1][able].all()),
                        bool(held.any(0)[able].all()),
                    )
            skip_held_gradients(layer, self, skip)
        self._show_passes_held()

    def _show_passes_held(self) -> None:
        """Give every pass each layer's ``(2, K)`` held sides (``LearnerPass.held``), so
        that merges, untangles and refines leave the intervals this learner holds alone."""
        held: list[Tensor | None] = [
            None if self.held_sides is None else self.held_sides[:, part].to(layer.widths.device)
            for layer, part in self.view.parts
        ]
        for each in getattr(self, "passes", {}).values():  # (none yet while __init__ holds)
            each.held = held

    def _hold_narrow_sides(self) -> Tensor | None:
        """Undo the optimizer's moves of the held sides' widths and of their components'
        locations; returns the cut's ``(2, ΣK)`` scale (0 on a held side), or ``None``
        when nothing is held."""
        if self.held_sides is None:
            return None
        assert self.held_widths is not None and self.held_locations is not None
        for layer, part in self.view.parts:
            for values, held, kept in (
                (layer.widths, self.held_sides[:, part], self.held_widths[:, part]),
                (layer.locations, self._held_components[:, part], self.held_locations[:, part]),
            ):
                values.copy_(torch.where(held, kept.to(values), values))
        return self._held_scale

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, starting cost, last threshold, the
        target, ``total_steps`` and ``warmup_steps``, the config (``config.to_dict()``),
        the layers' rows per unit of cost (``row_weights``, from ``example_input``), each
        pass's state under ``"passes"`` and, with ``config.hold_narrow_sides``, the held
        sides with their widths and locations (``"held"``, CPU tensors; ``None``
        otherwise)."""
        return {
            "step_count": self.step_count,
            "row_weights": list(self.row_weights),
            "start_cost": self.start_cost,
            "threshold": self.threshold,
            "final_target": self.final_target,
            "lam": self.lam,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "config": self.config.to_dict(),
            "passes": {name: each.state_dict() for name, each in self.passes.items()},
            "held": None
            if self.held_sides is None
            else {
                "sides": self.held_sides.cpu(),
                "widths": self.held_widths.cpu(),
                "locations": self.held_locations.cpu(),
            },
        }

    def _check_same_target(self, state: dict[str, Any]) -> None:
        """Refuse a state saved for another budget (``final_target``) or in the other mode
        (a budget against a penalty ``lam``): it would resume towards this learner's target
        with the saved run's threshold and ramp, in silence."""
        if "final_target" not in state or "lam" not in state:  # states of older versions
            return
        saved_target, saved_lam = state["final_target"], state["lam"]

        def mode(target: object, lam: object) -> str:
            return f"lam={lam}" if lam is not None else f"budget of {target} MACs"

        if (saved_lam is None) != (self.lam is None) or (
            saved_target != self.final_target if saved_lam is None else saved_lam != self.lam
        ):
            raise ValueError(
                f"the learner state was saved for a {mode(saved_target, saved_lam)}, this "
                f"learner has a {mode(self.final_target, self.lam)}: build it with the saved "
                "run's budget (or lam) to resume that run"
            )

    def _check_same_ramp(self, state: dict[str, Any]) -> None:
        """Refuse a state saved with another ``warmup_steps``: the budget's ramp would go
        on from the saved step towards another end, a run that is neither the saved one
        nor a fresh one. (``total_steps`` may grow: a run resumed to train longer goes on
        with σ's schedule and the final phase stretched to its new end.)"""
        if "warmup_steps" in state and state["warmup_steps"] != self.warmup_steps:
            raise ValueError(
                f"the learner state was saved with warmup_steps={state['warmup_steps']}, "
                f"this learner has warmup_steps={self.warmup_steps}: build it with the saved "
                "run's warmup_steps to resume that run"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output (and σ on every layer); load the model's
        state first.

        A state saved with another config, or with costs counted over other rows (another
        ``example_input``, or one against none), is refused (``ValueError`` naming what
        differs). States without ``"config"``, saved before the passes were split out, hold
        the passes' state at the top level; they load too; states without
        ``"row_weights"`` were counted per row.
        """
        missing = {"step_count", "start_cost", "threshold"} - set(state)
        if missing:
            raise ValueError(f"learner state is missing {sorted(missing)}")
        if "config" in state:
            saved = LearnerConfig.from_dict(state["config"])
            differences = self.config.differences(saved)
            if differences:
                raise ValueError(
                    "the learner state was saved with another LearnerConfig; build the "
                    "learner with the saved one (LearnerConfig.from_dict(state['config'])). "
                    f"Differences (this learner's != saved): {'; '.join(differences)}"
                )
        saved_weights = [int(w) for w in state.get("row_weights", [1] * len(self.layers))]
        if saved_weights != list(self.row_weights):
            raise ValueError(
                "the learner state was saved with costs counted over other rows per layer "
                f"(row_weights {saved_weights[:8]}, this learner's {self.row_weights[:8]}): "
                "build the learner with the same example_input as the saved run (none: "
                "every layer counted per row)"
            )
        # after the rows' check: other rows per layer give other MACs, the target too
        self._check_same_target(state)
        self._check_same_ramp(state)
        self.step_count = int(state["step_count"])
        self.start_cost = int(state["start_cost"])
        self.threshold = float(state["threshold"])
        held = state.get("held")
        if held is not None:  # the sides held since the saved run's start, not today's
            device = self.view.dims.device
            self._hold(
                torch.as_tensor(held["sides"], dtype=torch.bool, device=device),
                torch.as_tensor(held["widths"], dtype=torch.float64, device=device),
                torch.as_tensor(held["locations"], dtype=torch.float64, device=device),
            )
        nested = state.get("passes")
        for name, each in self.passes.items():
            each.load_state_dict(state if nested is None else nested.get(name, {}))
        self._apply_sigma()
