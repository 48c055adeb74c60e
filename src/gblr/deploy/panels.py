"""The ``panels`` execution plan: the segment form in two stages over one rank buffer.

The ``segment`` plan evaluates each run of components as ``z = x[:, C] V^T`` followed by
``y[:, R] += z U^T``; every run re-reads and re-writes its slice of the output, and a
narrow run is a thin GEMM (rank ~32) whose output update is bound by memory traffic. This
plan separates the two halves:

1. **Stage 1** writes every component's ``z_k = V_k x[C_k]`` into one buffer
   ``Z (N, K r)`` (stored transposed), the components in a chosen order, in one of two
   forms:

   - *groups*: consecutive components form groups (dynamic programming over the same
     cost model as the segment plan); a group is one GEMM over the union of its column
     intervals into a block of ``Z``, written once.
   - *segments*: components with full column intervals are groups as above; the others
     are accumulated over segments of the input columns: for each segment
     ``x[:, s:e]``, one GEMM per contiguous range of components whose columns meet it,
     added into their (zeroed) block of ``Z``. The padding is that of groups of
     ``(e - s) / slope`` components (``slope``: input columns per component), but each
     GEMM writes every component meeting the segment, 50-200 rows of ``Z`` for learned
     band-like structures instead of about 32, and on CPUs a GEMM with a short side of
     32 runs at ~0.7 of one with a side of 128 (2 EPYC cores, MKL: 27.5 vs 39.6 GMAC/s,
     depth 260).

   The form (and the segment width) is chosen by a time model,
   [`_gemm_time`][gblr.deploy.panels._gemm_time].
2. **Stage 2** cuts the output into panels of rows of ``W`` (columns of ``y``). Each panel
   ``y[:, p0:p1]`` is written once, by one GEMM per contiguous range of ``Z`` columns whose
   components cover it (small gaps are padded with zeros rather than split into another
   call). Panel boundaries come from a dynamic program over a grid of output positions.
   In the *head* form, the leading columns of ``Z`` whose components cover every output
   (the bias's, and full-row components ordered first) are first one GEMM over the whole
   output, ``y = Z[:, :h] U_head^T``, and the panels then add the other components only:
   one wide product instead of a thin one (depth ``h``, 64-96 columns) in every panel.
   Chosen by the same time model.

The order of the components decides how contiguous those ranges are. Two orders are
tried, and the cheaper by the cost model kept: components whose row interval is full
first (every panel needs them, so they form one range), then by row start; or by column
start. Learned structures, whose narrow components slide along the diagonal, give each
panel one range of full components and one range of narrow ones.

All operands are slices: ``x[:, a:b]``, ``Z^T[z0:z1]`` and ``y[:, p0:p1]`` are BLAS operands
with a leading stride, written in place (``torch.mm(..., out=slice)``, ``addmm_``), so there
are no gathers and no scatter. Factors outside a component's intervals are exact zeros,
so padding a range or a union with them changes no result. The bias is one more column
of ``Z`` (all ones) with the bias as its ``U`` row, so the GEMMs add it as they write.
Rows are processed in chunks ([`chunk_rows`][gblr.deploy.panels.chunk_rows]) so that stage 2 reads
``Z`` from cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .plans import _CALL_OVERHEAD_MACS, _RANK_FLOOR, _best_split, _pieces, _run_costs

__all__ = ["STAGE1_FORMS", "STAGE2_FORMS", "PanelOps", "chunk_rows", "panel_ops", "run_panels"]

# Output positions are grouped in cells of this many (at least) before the panel DP, and a
# panel spans at most _MAX_PANEL_CELLS cells: this bounds the DP at O(cells * 32 * K).
_CELL = 32
_MAX_PANEL_CELLS = 32
# A stage-2 GEMM narrower than this many output columns runs well below the BLAS peak
# (2 EPYC cores, MKL: a (4096 x 30) @ (30 x 32) update reaches ~8-20 GMAC/s, at 64 columns
# ~20-30), so the cost model charges it as if it had this many.
_PANEL_FLOOR = 64
# Time model of a GEMM with a long dimension (the input rows) and two short ones d1, d2:
# its rate is about peak * d1 / (d1 + _HALF_RATE) * d2 / (d2 + _HALF_RATE). Fitted on
# one EPYC core (MKL, 1024 rows): a (g x 260) @ (260 x N) stage-1 product runs at 13.6,
# 20.5, 27.5, 34 and 39.6 GMAC/s for g = 8, 16, 32, 64, 128; an update of depth 16..128
# into 128-256 columns at 14..27 GMAC/s.
_HALF_RATE = 18.0
# Zeroing an element of Z, in MAC-equivalents of the time model (a cached memset).
_ZERO_COST = 4.0
# Segment widths (input columns) tried by the segments form of stage 1.
_SEGMENT_WIDTHS = (32, 64, 128, 256)
# A form other than the basic one (groups, no head) is used only when the time model finds
# it this much faster: the model's error against measurement is a few percent.
_FORM_MARGIN = 0.975
STAGE1_FORMS = ("auto", "groups", "segments")
STAGE2_FORMS = ("auto", "panels", "head")

Slices = tuple[tuple[int, int, Tensor], ...]


@dataclass(frozen=True)
class PanelOps:
    """Operands of the panels plan.

    Attributes:
        groups: stage 1, per group ``(z0, z1, ((a, b, V_piece (z1 - z0, b - a)), ...))``:
            ``Z^T[z0:z1] = sum over pieces of V_piece @ x[:, a:b]^T``.
        head: stage 2, head form: ``y = Z[:, :head] @ head_ut`` before the panels, which
            then add to ``y`` (0 in the panels form: each panel is written once).
        head_ut: ``(head, out_features)`` ``U^T`` of the head columns, or ``None``.
        zeroed: stage 1, segments form: ``((z0, z1), ...)`` rows of ``Z^T`` set to zero
            after the groups and before the segments (empty in the groups form).
        segments: stage 1, segments form: ``((z0, z1, a, b, V_block (z1 - z0, b - a)), ...)``:
            ``Z^T[z0:z1] += V_block @ x[:, a:b]^T``, in order (empty in the groups form).
        panels: stage 2, per panel ``(p0, p1, ((z0, z1, U_range^T (z1 - z0, p1 - p0)), ...))``:
            ``y[:, p0:p1] = sum over ranges of Z[:, z0:z1] @ U_range^T``. The panels tile
            ``0 .. out_features`` (a panel nothing covers has no ranges and is zero).
        width: columns of ``Z`` (``K r``, plus the bias column).
        out_features: ``m``.
        has_bias: column 0 of ``Z`` is all ones and the ``U`` ranges starting at it hold
            the bias.
        cost: modelled MACs per input row (stage 1 + stage 2 + call overheads).
    """

    groups: tuple[tuple[int, int, Slices], ...]
    panels: tuple[tuple[int, int, Slices], ...]
    width: int
    out_features: int
    has_bias: bool
    cost: float
    zeroed: tuple[tuple[int, int], ...] = ()
    segments: tuple[tuple[int, int, int, int, Tensor], ...] = ()
    head: int = 0
    head_ut: Tensor | None = None


def _ranges(covered: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of ``True`` in ``covered``, gaps of ``<= max_gap`` bridged."""
    index = np.flatnonzero(covered)
    if index.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) > max_gap + 1)
    starts = np.concatenate([[index[0]], index[breaks + 1]])
    ends = np.concatenate([index[breaks], [index[-1]]]) + 1
    return list(zip(starts.tolist(), ends.tolist()))


def _stage2(
    cover: np.ndarray, m: int, cell: int, rank: int, overhead: float
) -> tuple[float, list[tuple[int, int, list[tuple[int, int]]]]]:
    """Best split of the output cells into panels, and each panel's component ranges.

    ``cover (cells, K)``: whether the (ordered) component ``j`` covers a row of cell ``c``.
    A panel of ``P`` outputs costs, per range of ``L`` components,
    ``max(L r, _RANK_FLOOR) * max(P, _PANEL_FLOOR)`` plus one call ``overhead``.
    """
    cells = cover.shape[0]
    best = np.full(cells + 1, np.inf)
    best[0] = 0.0
    choice: list[tuple[int, list[tuple[int, int]]] | None] = [None] * (cells + 1)
    for i in range(cells):
        acc = np.zeros(cover.shape[1], dtype=bool)
        for j in range(i, min(cells, i + _MAX_PANEL_CELLS)):
            acc |= cover[j]
            width = min((j + 1) * cell, m) - i * cell
            # Bridging a gap of g components adds g r * width MACs; a call costs overhead.
            max_gap = int(overhead // max(rank * width, 1))
            ranges = _ranges(acc, max_gap)
            cost = best[i] + overhead * max(len(ranges), 1)
            cost += sum(max((b - a) * rank, _RANK_FLOOR) for a, b in ranges) * max(
                width, _PANEL_FLOOR
            )
            if cost < best[j + 1]:
                best[j + 1] = cost
                choice[j + 1] = (i, ranges)
    panels = []
    end = cells
    while end > 0:
        start, ranges = choice[end]  # type: ignore[misc]
        panels.append((start * cell, min(end * cell, m), ranges))
        end = start
    return float(best[cells]), panels[::-1]


def _gemm_time(macs: float, side1: float, side2: float) -> float:
    """Modelled time of a GEMM of ``macs`` MACs per input row whose two short sides are
    ``side1`` and ``side2``, in MACs at the BLAS peak (see ``_HALF_RATE``)."""
    return macs * (1.0 + _HALF_RATE / max(side1, 1.0)) * (1.0 + _HALF_RATE / max(side2, 1.0))


def _split_at(ranges: list[tuple[int, int]], barrier: np.ndarray) -> list[tuple[int, int]]:
    """``ranges`` cut so that none contains an index where ``barrier`` is ``True``."""
    out = []
    for a, b in ranges:
        out += [(a + c, a + d) for c, d in _ranges(~barrier[a:b], 0)]
    return out


def _panels_time(
    panels: list[tuple[int, int, list[tuple[int, int]]]], column, overhead: float
) -> float:
    """Time model of stage 2's panel GEMMs (ranges in the cover's numbering; ``column``
    maps an item to its ``Z`` column)."""
    time = 0.0
    for p0, p1, ranges in panels:
        for a, b in ranges:
            depth = column(b) - column(a)
            time += _gemm_time(depth * (p1 - p0), depth, p1 - p0) + overhead
    return time


@dataclass(frozen=True)
class _Stage1Layout:
    """A stage-1 layout over the ordered components (indices in the order, not yet Z
    rows): ``groups`` ``[(first, end, ((a, b), ...))]`` written once over column pieces,
    ``zeroed`` ``[(first, end)]``, ``segments`` ``[(first, end, a, b)]`` accumulated;
    ``time`` is the time model's estimate and ``cost`` the MACs cost model's (both per
    input row, call overheads included)."""

    groups: tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...]
    zeroed: tuple[tuple[int, int], ...]
    segments: tuple[tuple[int, int, int, int], ...]
    time: float
    cost: float


def _groups_layout(
    splits: list[tuple[int, int]],
    c0: np.ndarray,
    c1: np.ndarray,
    n: int,
    rank: int,
    overhead: float,
    cost: float,
) -> _Stage1Layout:
    """The groups form of stage 1 from the DP's ``splits`` (ordered intervals ``c0, c1``)."""
    groups, time = [], 0.0
    for start, end in splits:
        lo = int(c0[start:end].min())
        length = int(min(c1[start:end].max() - lo, n))
        pieces = ((0, n),) if length >= n else tuple((a, b) for a, b, _ in _pieces(lo, length, n))
        groups.append((start, end, pieces))
        g = (end - start) * rank
        time += _gemm_time(g * length, g, length) + overhead * len(pieces)
    return _Stage1Layout(tuple(groups), (), (), time, cost)


def _segments_layout(
    starts: np.ndarray, lengths: np.ndarray, n: int, rank: int, width: int, overhead: float
) -> _Stage1Layout:
    """The segments form of stage 1 with segments of ``width`` input columns.

    Components with a full column interval are written by one GEMM per contiguous run of
    them over all of ``x``; the others are zeroed, then each segment adds one GEMM per
    range of components meeting it (gaps bridged when cheaper than a call, but never
    across a full component: its row of ``Z`` is complete and must not be added to).
    """
    full = lengths >= n
    groups, time, cost = [], 0.0, 0.0
    for a, b in _ranges(full, 0):
        g = (b - a) * rank
        groups.append((a, b, ((0, n),)))
        time += _gemm_time(g * n, g, n) + overhead
        cost += max(g, _RANK_FLOOR) * n + overhead
    zeroed = tuple(_ranges(~full, 0))
    segments = []
    if zeroed:
        time += _ZERO_COST * rank * int((~full).sum())
        # occupied (n, K): input column c lies in component k's circular interval.
        occupied = ((np.arange(n)[:, None] - starts[None, :]) % n) < lengths[None, :]
        occupied &= ~full[None, :]
        for s in range(0, n, width):
            e = min(n, s + width)
            max_gap = int(overhead // max(rank * (e - s), 1))
            for a, b in _split_at(_ranges(occupied[s:e].any(axis=0), max_gap), full):
                segments.append((a, b, s, e))
                g = (b - a) * rank
                time += _gemm_time(g * (e - s), g, e - s) + overhead
                cost += max(g, _RANK_FLOOR) * (e - s) + overhead
    return _Stage1Layout(tuple(groups), zeroed, tuple(segments), time, cost)


def panel_ops(
    u: Tensor,
    v: Tensor,
    row_intervals: Tensor,
    col_intervals: Tensor,
    rank: int,
    rows: int,
    bias: Tensor | None = None,
    stage1: str = "auto",
    stage2: str = "auto",
) -> PanelOps:
    """Build the panels plan's operands from the padded factors.

    Args:
        u: ``(m, K r)`` left factors, zero outside each component's row interval.
        v: ``(K r, n)`` right factors, zero outside each column interval.
        row_intervals, col_intervals: ``(K, 2)`` int64 ``(start, length)``, lengths >= 1.
        rank: ``r``.
        rows: the number of input rows the plan is for (its bucket): call overheads are
            spread over them (over one chunk of [`chunk_rows`][gblr.deploy.panels.chunk_rows] rows
            at most).
        bias: ``(m,)`` or ``None``. It becomes column 0 of ``Z`` (all ones) and one more
            row of each panel's first ``U`` range, so the GEMMs add it as they write.
        stage1: ``"groups"``, ``"segments"`` (see the module's docstring) or ``"auto"``:
            whichever the time model [`_gemm_time`][gblr.deploy.panels._gemm_time] finds faster,
            trying segment widths of ``_SEGMENT_WIDTHS`` columns.
        stage2: ``"panels"``, ``"head"`` (see the module's docstring; a layer without
            bias nor full-row components has no head and gets ``"panels"``) or
            ``"auto"``: whichever the time model finds faster.

    Returns:
        A [`PanelOps`][gblr.deploy.panels.PanelOps].

    Raises:
        ValueError: ``stage1`` is not one of [`STAGE1_FORMS`][gblr.deploy.panels.STAGE1_FORMS], or
            ``stage2`` not one of [`STAGE2_FORMS`][gblr.deploy.panels.STAGE2_FORMS].
    """
    if stage1 not in STAGE1_FORMS:
        raise ValueError(f"stage1 must be one of {STAGE1_FORMS}, got {stage1!r}")
    if stage2 not in STAGE2_FORMS:
        raise ValueError(f"stage2 must be one of {STAGE2_FORMS}, got {stage2!r}")
    m, n = u.shape[0], v.shape[1]
    k = row_intervals.shape[0]
    extra = 0 if bias is None else 1
    overhead = _CALL_OVERHEAD_MACS / max(min(rows, chunk_rows(m, k * rank + extra)), 1)
    # (tolist: under torch.func a tensor read here has no numpy view)
    rows_np = np.asarray(row_intervals.tolist(), dtype=np.int64).reshape(-1, 2)
    cols_np = np.asarray(col_intervals.tolist(), dtype=np.int64).reshape(-1, 2)
    full_row = rows_np[:, 1] >= m
    r0 = np.where(full_row, 0, rows_np[:, 0])
    c0 = np.where(cols_np[:, 1] >= n, 0, cols_np[:, 0])
    c1 = c0 + cols_np[:, 1]
    # occupancy (m, K): output position p lies in component k's circular row interval.
    position = np.arange(m)[:, None]
    occupied = ((position - rows_np[None, :, 0]) % m) < rows_np[None, :, 1]
    cell = max(_CELL, -(-m // 512))
    cells = -(-m // cell)
    padded = np.zeros((cells * cell, k), dtype=bool)
    padded[:m] = occupied
    cell_cover = padded.reshape(cells, cell, k).any(axis=1)
    # The bias is a pseudo-component 0 covering every output (its Z column is all ones).
    bias_cover = np.ones((cells, extra), dtype=bool)

    best = None
    orders = [np.lexsort((c0, r0, ~full_row)), np.lexsort((r0, c0))] if k else [np.arange(0)]
    for order in orders:
        cost1, splits = 0.0, []
        if k:
            group_cost = _run_costs(
                c0[order].astype(np.float64),
                c1[order].astype(np.float64),
                np.zeros(k),
                np.zeros(k),
                np.full(k, float(rank)),
                (m, n),
                overhead,
            )
            cost1, splits = _best_split(group_cost)
        cover = np.concatenate([bias_cover, cell_cover[:, order]], axis=1)
        cost2, panels = _stage2(cover, m, cell, rank, overhead)
        if best is None or cost1 + cost2 < best[0]:
            best = (cost1 + cost2, order, splits, panels, cost1, cover, cost2)
    assert best is not None
    cost, order, splits, panels, cost1, cover, cost2 = best

    def column(item: int) -> int:
        # Z column of (pseudo-)component ``item`` in the cover's numbering.
        return item if item < extra else extra + (item - extra) * rank

    # Stage 2's head: the bias and the full-row components ordered first.
    leading = np.flatnonzero(~full_row[order])
    lead = extra + (int(leading[0]) if leading.size else k)
    head = 0
    if stage2 != "panels" and lead:
        headless = cover.copy()
        headless[:, :lead] = False
        cost2_headless, panels_headless = _stage2(headless, m, cell, rank, overhead)
        width = column(lead)
        time_head = _gemm_time(width * m, width, m) + overhead
        time_head += _panels_time(panels_headless, column, overhead)
        if stage2 == "head" or time_head < _FORM_MARGIN * _panels_time(panels, column, overhead):
            head, panels = width, panels_headless
            cost += max(width, _RANK_FLOOR) * m + overhead + cost2_headless - cost2
    # The order (and stage 2) are chosen with the groups form; stage 1's form is then
    # chosen for that order by the time model, which sees the GEMMs' shapes.
    layout = _groups_layout(splits, c0[order], c1[order], n, rank, overhead, cost1)
    if stage1 != "groups" and k:
        widths = [w for w in _SEGMENT_WIDTHS if w < n] or [n]
        candidates = [
            _segments_layout(cols_np[order, 0], cols_np[order, 1], n, rank, width, overhead)
            for width in widths
        ]
        segmented = min(candidates, key=lambda c: c.time)
        if stage1 == "segments" or segmented.time < _FORM_MARGIN * layout.time:
            layout = segmented
    cost += layout.cost - cost1

    device = u.device
    ranks = torch.as_tensor(
        (order[:, None] * rank + np.arange(rank)[None, :]).reshape(-1), device=device
    )
    v_ordered = v.index_select(0, ranks)
    # u_ordered's columns are Z's: the bias (if any), then the ordered components' ranks.
    u_ordered = u.index_select(1, ranks)
    if bias is not None:
        u_ordered = torch.cat([bias.reshape(m, 1).to(u_ordered), u_ordered], 1)
    groups = []
    for start, end, pieces in layout.groups:
        z0, z1 = start * rank, end * rank
        groups.append(
            (
                z0 + extra,
                z1 + extra,
                tuple((a, b, v_ordered[z0:z1, a:b].contiguous()) for a, b in pieces),
            )
        )
    zeroed = tuple((extra + a * rank, extra + b * rank) for a, b in layout.zeroed)
    segments = tuple(
        (extra + a * rank, extra + b * rank, s, e, v_ordered[a * rank : b * rank, s:e].contiguous())
        for a, b, s, e in layout.segments
    )

    panel_slices = []
    for p0, p1, ranges in panels:
        slices = []
        for a, b in ranges:
            z0, z1 = column(a), column(b)
            slices.append((z0, z1, u_ordered[p0:p1, z0:z1].t().contiguous()))
        panel_slices.append((p0, p1, tuple(slices)))
    return PanelOps(
        tuple(groups),
        tuple(panel_slices),
        k * rank + extra,
        m,
        extra == 1,
        cost,
        zeroed,
        segments,
        head,
        u_ordered[:, :head].t().contiguous() if head else None,
    )


def chunk_rows(out_features: int, width: int) -> int:
    """Rows per chunk of [`run_panels`][gblr.deploy.panels.run_panels]: a power of two (256 .. 4096)
    such that a chunk's ``Z`` and output rows (``width + out_features`` floats each) take about 8
    MB, so that stage 2 reads ``Z`` from cache rather than memory."""
    target = (8 << 20) // (4 * max(out_features + width, 1))
    return int(min(4096, max(256, 1 << max(target, 1).bit_length() - 1)))


def run_panels(x: Tensor, ops: PanelOps) -> Tensor:
    """``(N, n) -> (N, m)`` through the two stages of [`panel_ops`][gblr.deploy.panels.panel_ops],
    in chunks of [`chunk_rows`][gblr.deploy.panels.chunk_rows] input rows (bias included when the
    ops were built with one)."""
    rows = x.shape[0]
    chunk = max(1, min(rows, chunk_rows(ops.out_features, ops.width)))  # rows may be 0
    y = x.new_empty(rows, ops.out_features)
    # Z is kept transposed, (K r, rows): a group's rows of Z^T are one contiguous block
    # that stage 1 writes with unit stride, and stage 2 reads Z^T[z0:z1].t() as a
    # transposed BLAS operand. Measured on 2 EPYC cores (MKL), this ran stage 2 about
    # twice as fast as column slices of a row-major Z.
    zt_buffer = x.new_empty(ops.width, max(chunk, 1))
    if ops.has_bias:
        zt_buffer[0] = 1.0  # stage 1 never writes row 0
    for begin in range(0, rows, chunk):
        xc = x[begin : begin + chunk]
        yc = y[begin : begin + chunk]
        zt = zt_buffer[:, : xc.shape[0]]
        for z0, z1, pieces in ops.groups:
            zs = zt[z0:z1]
            a, b, v_piece = pieces[0]
            torch.mm(v_piece, xc[:, a:b].t(), out=zs)
            for a, b, v_piece in pieces[1:]:
                zs.addmm_(v_piece, xc[:, a:b].t())
        for z0, z1 in ops.zeroed:
            zt[z0:z1].zero_()
        for z0, z1, a, b, v_block in ops.segments:
            zt[z0:z1].addmm_(v_block, xc[:, a:b].t())
        if ops.head:
            torch.mm(zt[: ops.head].t(), ops.head_ut, out=yc)
        for p0, p1, ranges in ops.panels:
            yp = yc[:, p0:p1]
            if not ranges and not ops.head:
                yp.zero_()
            # beta=0 ignores the uninitialized panel (NaNs included): it is written once,
            # unless the head wrote it already.
            beta = 1.0 if ops.head else 0.0
            for z0, z1, ut in ranges:
                yp.addmm_(zt[z0:z1].t(), ut, beta=beta)
                beta = 1.0
    return y
