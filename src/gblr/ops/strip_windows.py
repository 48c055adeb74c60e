"""The windowed training form of held one-line strips (the block-diagonal start).

Under the default start and learner every component of a layer is one line on one side
(an input column or an output row) whose width and location a structure learner holds,
and an interval on the other, long side whose location is held and whose width is
learned. With exact masks the long side's masked factor is zero outside its interval,
so a product over the full long side (what ``mask_factors`` and the strips' gather in
`gblr.ops.gaudi.strip_factors` compute) spends most of its work on zeros: a training
step then costs a dense layer's whatever the budget.

Here the long side is gathered, masked and multiplied only over a window per group of
components that share a start there (a block of the block-diagonal): the window runs
from ``EDGE_MARGIN`` lines before the start to ``EDGE_MARGIN`` lines past the longest
interval's end. The forward and the factors' gradients are the masked products'
(exactly zero outside the intervals). The width's gradient reads the exact masks' edge
kernel within ``EDGE_MARGIN`` lines of the interval's end (on each side) and nothing
beyond, where the full-length form reads all of it with weights falling off as one over
the distance: docs/BENCHMARKS.md, "The width's gradient from a window", measured no loss
from that cut on the real-task suite (5 seeds, every digits cell and the text model).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .gaudi import (
    _grid_kernels,
    _lengths,
    _mask_dtype,
    _starts,
    apply_function,
    autocast_dtype,
    held_strip_side,
    transforms_active,
)

__all__ = ["EDGE_MARGIN", "RUNS_MIN_ROWS", "strip_window_product"]

# Lines kept on each side of an interval's end for the width's gradient.
EDGE_MARGIN = 8

#: From this many input rows on, the windows' products run in place, one matrix product
#: per run of a window (`_WindowRunsProduct`); below it, one batched product.
RUNS_MIN_ROWS = 512


@functools.lru_cache(maxsize=64)
def _edge_around_end(n: int, margin: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(2 * margin,)``: the exact masks' edge kernel at the lines ``-margin .. margin - 1``
    past an interval's end (modulo ``n``; a line counted once when ``n < 2 * margin``)."""
    with torch.inference_mode(False), torch.no_grad():
        edge = _grid_kernels(n, None, dtype, device)[1][:n]
        index = torch.arange(-margin, margin, device=device)
        around = edge[torch.remainder(index, n)]
        # With n < 2 * margin the lines wrap onto each other: keep the first of each.
        first = torch.arange(2 * margin, device=device) < n
        return torch.where(first, around, torch.zeros_like(around))


class _WindowMask(torch.autograd.Function):
    """``blocks * inside``: the long side's factor over each group's window, masked by
    each rank term's interval; the width's gradient through the cut edge kernel."""

    @staticmethod
    def forward(ctx, blocks, widths, locations, plan, lengths, edge, skip_width):  # type: ignore[override]
        inside = (plan.offsets >= 0) & (plan.offsets < lengths.unsqueeze(-1))
        ctx.save_for_backward(blocks, inside, lengths, edge)
        ctx.plan, ctx.skip_width, ctx.shape = plan, skip_width, widths.shape
        return blocks * inside.to(blocks.dtype)

    @staticmethod
    def backward(ctx, grad, *_):  # type: ignore[override]
        blocks, inside, lengths, edge = ctx.saved_tensors
        plan = ctx.plan
        needs_blocks, needs_widths, needs_locations = ctx.needs_input_grad[:3]
        grad_blocks = grad * inside.to(grad.dtype) if needs_blocks else None
        zeros = torch.zeros(ctx.shape, dtype=edge.dtype, device=blocks.device)
        grad_widths = zeros if needs_widths else None
        if needs_widths and not ctx.skip_width:
            # Only the 2 * margin lines around each end have a nonzero edge weight.
            columns = torch.remainder(lengths.unsqueeze(-1) + plan.around_end, plan.columns)
            grad_mask = (grad.gather(2, columns) * blocks.gather(2, columns)).to(edge.dtype)
            per_term = (grad_mask * edge).sum(2).reshape(-1)  # (G * B,)
            terms = torch.zeros(plan.terms + 1, dtype=edge.dtype, device=blocks.device)
            terms = terms.index_add(0, plan.slots, per_term)  # (not in place: vmap's rule)
            rows = [zeros[0], zeros[1]]
            rows[plan.long_side] = terms[: plan.terms].view(-1, plan.rank).sum(1)
            grad_widths = torch.stack(rows)
        grad_locations = zeros if needs_locations else None
        return grad_blocks, grad_widths, grad_locations, None, None, None, None


class _WindowMaskForTransforms(_WindowMask):
    """[`_WindowMask`][gblr.ops.strip_windows._WindowMask] as ``torch.func`` takes it: the
    window's mask comes out second, without a gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(blocks, widths, locations, plan, lengths, edge, skip_width):  # type: ignore[override]
        inside = (plan.offsets >= 0) & (plan.offsets < lengths.unsqueeze(-1))
        return blocks * inside.to(blocks.dtype), inside

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        blocks, widths, _, plan, lengths, edge, skip_width = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(blocks, output[1], lengths, edge)
        ctx.plan, ctx.skip_width, ctx.shape = plan, skip_width, widths.shape


class _WindowRunsProduct(torch.autograd.Function):
    """The windows' products, one matrix product per unwrapped run of a window, each read
    from and written to column slices in place: no batched copy of the windows and no
    index-add over the rows, which at thousands of rows cost more than the products
    themselves (docs/BENCHMARKS.md, "Window runs in place").

    ``spread`` (the long side is the output): ``out[:, lines] += inputs[:, group] @
    blocks[g][:, run]``, ``out`` ``(rows, n)``; else (the long side is the input)
    ``out[:, group] += inputs[:, lines] @ blocks[g][:, run].T``, ``out`` ``(rows, G * B)``.
    """

    @staticmethod
    def forward(ctx, inputs, blocks, segments, spread, out_width):  # type: ignore[override]
        ctx.save_for_backward(inputs, blocks)
        ctx.segments, ctx.spread = segments, spread
        out = inputs.new_zeros(inputs.shape[0], out_width)
        for read, write, mapping in _runs(blocks, segments, spread):
            out[:, write].addmm_(inputs[:, read], mapping)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inputs, blocks = ctx.saved_tensors
        needs_inputs, needs_blocks = ctx.needs_input_grad[:2]
        # An expanded gradient (a sum's) would be copied by every run's product.
        grad = grad.contiguous()
        grad_inputs = torch.zeros_like(inputs) if needs_inputs else None
        grad_blocks = torch.zeros_like(blocks) if needs_blocks else None
        runs = _runs(blocks, ctx.segments, ctx.spread)
        # each run's view of grad_blocks, as its mapping is a view of blocks
        grad_runs = (
            _runs(grad_blocks, ctx.segments, ctx.spread)
            if grad_blocks is not None
            else itertools.repeat(None)
        )
        for (read, write, mapping), grad_run in zip(runs, grad_runs):
            if grad_inputs is not None:
                grad_inputs[:, read].addmm_(grad[:, write], mapping.t())
            if grad_run is not None:
                grad_run[2].addmm_(inputs[:, read].t(), grad[:, write])
        return grad_inputs, grad_blocks, None, None, None


def _runs(
    blocks: Tensor, segments: tuple[tuple[int, int, int, int], ...], spread: bool
) -> Iterator[tuple[slice, slice, Tensor]]:
    """Per run of a window: the columns it reads, the columns it writes, and the view of
    ``blocks`` ``(G, B, W)`` that maps one to the other (``(B, run)`` when ``spread``, its
    transpose else)."""
    size = blocks.shape[1]
    for group, first, past, line in segments:
        terms = slice(group * size, (group + 1) * size)
        lines = slice(line, line + past - first)
        run = blocks[group, :, first:past]
        yield (terms, lines, run) if spread else (lines, terms, run.t())


class _Plan(NamedTuple):
    """The index tensors of one grouping (see `_plan`)."""

    long_side: int
    rank: int
    terms: int  # K * r rank terms
    columns: int  # the window's length
    slots: Tensor  # (G * B,) rank terms of each group, padded with ``terms``
    reads: Tensor  # (G * B,) the same, padded with 0 (read, then masked to zero)
    positions: Tensor  # (G * W,) the long side's line of each window column
    flat: Tensor  # (G * B * W,) entries of the (terms, n) factor read, all K computed
    offsets: Tensor  # (W,) each window column's offset from its group's start
    around_end: Tensor  # (2 * margin,) the columns of lines -margin.. past an end, less
    # the interval's length (modulo the window)
    shape: tuple[int, int, int]  # (G, B, W)
    segments: tuple[tuple[int, int, int, int], ...]  # (group, first and past-last window
    # column, first long-side line) of each unwrapped run of a window


@functools.lru_cache(maxsize=256)
def _plan(
    starts: tuple[int, ...], long_side: int, rank: int, n: int, window: int, margin: int
) -> _Plan:
    """Rank terms grouped by their start on the long side (``starts`` per component),
    each group's window ``window`` lines from ``margin`` before the start. Cached: the
    starts are held, so a layer asks for the same grouping at every step."""
    term_starts = torch.tensor(starts, dtype=torch.int64).repeat_interleave(rank)
    count = term_starts.numel()
    order = torch.argsort(term_starts, stable=True)
    group_starts, counts = torch.unique_consecutive(term_starts[order], return_counts=True)
    sorted_group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    slot = torch.arange(count) - (torch.cumsum(counts, 0) - counts)[sorted_group]
    slots = torch.full((counts.numel(), int(counts.max())), count, dtype=torch.int64)
    slots[sorted_group, slot] = order
    # A window shorter than the long side starts ``margin`` lines before the start; one
    # as long holds every line once, from the start (the lines before it wrap to its end).
    shift = margin if window < n else 0
    offsets = torch.arange(window) - shift
    positions = torch.remainder(group_starts.unsqueeze(1) + offsets, n)  # (G, W)
    # The padding reads term 0, which the mask (length 0) then turns into zeros.
    reads = torch.where(slots == count, 0, slots)
    flat = reads.unsqueeze(-1) * n + positions.unsqueeze(1)  # (G, B, W)
    segments = []
    for group, first in enumerate(positions[:, 0].tolist()):
        # A window that runs past the long side's last line goes on at its first.
        run = min(window, n - first)
        segments.append((group, 0, run, first))
        if run < window:
            segments.append((group, run, window, 0))
    return _Plan(
        long_side=long_side,
        rank=rank,
        terms=count,
        columns=window,
        slots=slots.reshape(-1),
        reads=reads.reshape(-1),
        positions=positions.reshape(-1),
        flat=flat.reshape(-1),
        offsets=offsets,
        around_end=torch.arange(2 * margin) - margin + shift,
        shape=(*slots.shape, window),
        segments=tuple(segments),
    )


def strip_window_product(
    x: Tensor,
    factor_u: Tensor,
    factor_v: Tensor,
    widths: Tensor,
    locations: Tensor,
    skip: tuple[bool, bool, bool] | None,
    *,
    max_window: float = 0.5,
    margin: int = EDGE_MARGIN,
    components: Tensor | None = None,
) -> Tensor | None:
    """``x @ W.T`` for a GBLR matrix of held one-line strips, its long side computed over
    windows (see the module's docstring); ``None`` where the form does not apply
    (`gblr.ops.gaudi.held_strip_side` finds no side) or where the window would exceed
    ``max_window`` of the long side, which the full-length forms then compute more
    cheaply. The torch backend, CPU tensors, exact masks (``sigma=None``).

    Args:
        x: ``(rows, in)``.
        factor_u: ``(K, r, out)`` left factors.
        factor_v: ``(K, r, in)`` right factors.
        widths, locations: ``(2, K)`` (row 0 the input side), ``skip`` as in
            `gblr.ops.gaudi.held_strip_side`; the long side's width gets its gradient
            unless held too.
        max_window: the largest window, as a fraction of the long side, to compute this way.
        margin: lines kept past each interval's end (and before its start) for the width's
            gradient.
        components: ``(K',)`` indices of the components that ``widths`` and ``locations``
            (then ``(2, K')``) describe, of the factors' ``K`` (default: all ``K``); only
            their entries are read.

    Returns:
        ``(rows, out)``, or ``None``.

    Examples:
        >>> import torch, gblr
        >>> from gblr.ops.strip_windows import strip_window_product
        >>> u, v = torch.randn(4, 1, 64), torch.randn(4, 1, 4)
        >>> widths = torch.tensor([[0.25] * 4, [0.125] * 4])  # one column, 8 of 64 rows
        >>> locations = torch.tensor([[0.0, 0.25, 0.5, 0.75], [0.0, 0.0, 0.5, 0.5]])
        >>> x = torch.randn(3, 4)
        >>> y = strip_window_product(x, u, v, widths, locations, (True, False, True))
        >>> dense = sum(
        ...     torch.outer(u[k, 0] * gblr.boxcar_mask(widths[1, k], locations[1, k], 64),
        ...                 v[k, 0] * gblr.boxcar_mask(widths[0, k], locations[0, k], 4))
        ...     for k in range(4))
        >>> torch.allclose(y, x @ dense.T, atol=1e-6)
        True
    """
    side = held_strip_side(factor_u, factor_v, widths, locations, skip)
    if side is None:
        return None
    long_side = 1 - side
    strip_factor, long_factor = (factor_v, factor_u) if side == 0 else (factor_u, factor_v)
    _, rank, n = long_factor.shape
    k = widths.shape[1]
    lengths = _lengths(widths[long_side], n, finite=True)
    window = min(n, int(lengths.max()) + 2 * margin)
    if window > max_window * n:
        return None
    starts = _starts(locations[long_side], n, finite=True)
    plan = _plan(tuple(starts.tolist()), long_side, rank, n, window, margin)
    groups, size, _ = plan.shape
    # The rank terms of the computed components among all the factors' K * r.
    if components is None:
        terms, flat = torch.arange(k * rank), plan.flat
    else:
        terms = (components.unsqueeze(1) * rank + torch.arange(rank)).reshape(-1)
        flat = (terms[plan.reads] * n).view(groups, size, 1) + plan.positions.view(groups, 1, -1)
        flat = flat.reshape(-1)
    blocks = long_factor.reshape(-1).index_select(0, flat).view(plan.shape)
    term_lengths = torch.cat([lengths.repeat_interleave(rank), lengths.new_zeros(1)])
    mask_dtype = _mask_dtype(torch.promote_types(widths.dtype, locations.dtype))
    edge = _edge_around_end(n, margin, mask_dtype, long_factor.device)
    blocks = apply_function(
        _WindowMask,
        _WindowMaskForTransforms,
        blocks,
        widths,
        locations,
        plan,
        term_lengths.index_select(0, plan.slots).view(groups, size),
        edge,
        bool(skip[long_side]),
    )
    strip_size = strip_factor.shape[2]
    lines = _starts(locations[side], strip_size, finite=True)
    lines = lines.repeat_interleave(rank) if rank > 1 else lines
    values = strip_factor.reshape(-1).index_select(0, terms * strip_size + lines)
    rows = x.shape[0]
    # In-place runs need one dtype and plain autograd; a few rows take the batched form,
    # whose few calls cost less than a run's each (docs/BENCHMARKS.md, "Window runs in
    # place").
    in_place = (
        rows >= RUNS_MIN_ROWS
        and x.dtype == blocks.dtype == values.dtype
        and autocast_dtype(x.device.type) is None
        and not transforms_active()
    )
    if in_place:
        # Each rank term's strip entry scales its row of the window (G * B * W entries)
        # rather than an input or output column over the rows.
        scaled = blocks * values.index_select(0, plan.reads).view(groups, size, 1)
        strip_lines = lines.index_select(0, plan.reads)
        if side == 0:
            return _WindowRunsProduct.apply(
                x.index_select(1, strip_lines), scaled, plan.segments, True, n
            )
        gathered = _WindowRunsProduct.apply(x, scaled, plan.segments, False, groups * size)
        result = gathered.new_zeros(rows, strip_factor.shape[2])
        return result.index_add_(1, strip_lines, gathered)
    if side == 0:
        # The padding's rows of ``blocks`` are zeros: what it reads adds nothing.
        hidden = (x.index_select(1, lines) * values).index_select(1, plan.reads)
        hidden = hidden.view(rows, groups, size)
        out = torch.bmm(hidden.transpose(0, 1), blocks)  # (G, rows, W)
        # (under autocast the products come in its dtype, and the sums take it)
        result = out.new_zeros(rows, n)
        return result.index_add_(1, plan.positions, out.transpose(0, 1).reshape(rows, -1))
    read = x.index_select(1, plan.positions).view(rows, groups, window)
    out = torch.bmm(read.transpose(0, 1), blocks.transpose(1, 2))  # (G, rows, B)
    gathered = out.transpose(0, 1).reshape(rows, -1)
    products = gathered.new_zeros(rows, plan.terms)
    products.index_add_(1, plan.reads, gathered)
    result = gathered.new_zeros(rows, strip_factor.shape[2])
    return result.index_add_(1, lines, products * values.to(gathered.dtype))
