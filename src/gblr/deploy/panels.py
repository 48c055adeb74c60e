"""The ``panels`` execution plan: the segment form in two stages over one rank buffer.

The ``segment`` plan evaluates each run of components as ``z = x[:, C] V^T`` followed by
``y[:, R] += z U^T``; every run re-reads and re-writes its slice of the output, and a
narrow run is a thin GEMM (rank ~32) whose output update is bound by memory traffic. This
plan separates the two halves:

1. **Stage 1** writes every component's ``z_k = V_k x[C_k]`` into one buffer
   ``Z (N, K r)`` (stored transposed), the components in a chosen order. Consecutive
   components form groups (dynamic programming over the same cost model as the segment
   plan); a group is one GEMM over the union of its column intervals into a block of
   ``Z``.
2. **Stage 2** cuts the output into panels of rows of ``W`` (columns of ``y``). Each panel
   ``y[:, p0:p1]`` is written once, by one GEMM per contiguous range of ``Z`` columns whose
   components cover it (small gaps are padded with zeros rather than split into another
   call). Panel boundaries come from a dynamic program over a grid of output positions.

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
Rows are processed in chunks (:func:`chunk_rows`) so that stage 2 reads ``Z`` from cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .plans import _CALL_OVERHEAD_MACS, _RANK_FLOOR, _best_split, _pieces, _run_costs

__all__ = ["PanelOps", "chunk_rows", "panel_ops", "run_panels"]

# Output positions are grouped in cells of this many (at least) before the panel DP, and a
# panel spans at most _MAX_PANEL_CELLS cells: this bounds the DP at O(cells * 32 * K).
_CELL = 32
_MAX_PANEL_CELLS = 32
# A stage-2 GEMM narrower than this many output columns runs well below the BLAS peak
# (2 EPYC cores, MKL: a (4096 x 30) @ (30 x 32) update reaches ~8-20 GMAC/s, at 64 columns
# ~20-30), so the cost model charges it as if it had this many.
_PANEL_FLOOR = 64

Slices = tuple[tuple[int, int, Tensor], ...]


@dataclass(frozen=True)
class PanelOps:
    """Operands of the panels plan.

    Attributes:
        groups: stage 1, per group ``(z0, z1, ((a, b, V_piece (z1 - z0, b - a)), ...))``:
            ``Z^T[z0:z1] = sum over pieces of V_piece @ x[:, a:b]^T``.
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


def panel_ops(
    u: Tensor,
    v: Tensor,
    row_intervals: Tensor,
    col_intervals: Tensor,
    rank: int,
    rows: int,
    bias: Tensor | None = None,
) -> PanelOps:
    """Build the panels plan's operands from the padded factors.

    Args:
        u: ``(m, K r)`` left factors, zero outside each component's row interval.
        v: ``(K r, n)`` right factors, zero outside each column interval.
        row_intervals, col_intervals: ``(K, 2)`` int64 ``(start, length)``, lengths >= 1.
        rank: ``r``.
        rows: the number of input rows the plan is for (its bucket): call overheads are
            spread over them (over one chunk of :func:`chunk_rows` rows at most).
        bias: ``(m,)`` or ``None``. It becomes column 0 of ``Z`` (all ones) and one more
            row of each panel's first ``U`` range, so the GEMMs add it as they write.

    Returns:
        A :class:`PanelOps`.
    """
    m, n = u.shape[0], v.shape[1]
    k = row_intervals.shape[0]
    extra = 0 if bias is None else 1
    overhead = _CALL_OVERHEAD_MACS / max(min(rows, chunk_rows(m, k * rank + extra)), 1)
    rows_np = row_intervals.detach().cpu().numpy().reshape(-1, 2)
    cols_np = col_intervals.detach().cpu().numpy().reshape(-1, 2)
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
            best = (cost1 + cost2, order, splits, panels)
    assert best is not None
    cost, order, splits, panels = best

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
    c0o, c1o = c0[order], c1[order]
    for start, end in splits:
        lo = int(c0o[start:end].min())
        length = int(min(c1o[start:end].max() - lo, n))
        pieces = ((0, n, 0),) if length >= n else _pieces(lo, length, n)
        z0, z1 = start * rank, end * rank
        groups.append(
            (
                z0 + extra,
                z1 + extra,
                tuple((a, b, v_ordered[z0:z1, a:b].contiguous()) for a, b, _ in pieces),
            )
        )

    def column(item: int) -> int:
        # Z column of (pseudo-)component ``item`` in the cover's numbering.
        return item if item < extra else extra + (item - extra) * rank

    panel_slices = []
    for p0, p1, ranges in panels:
        slices = []
        for a, b in ranges:
            z0, z1 = column(a), column(b)
            slices.append((z0, z1, u_ordered[p0:p1, z0:z1].t().contiguous()))
        panel_slices.append((p0, p1, tuple(slices)))
    return PanelOps(tuple(groups), tuple(panel_slices), k * rank + extra, m, extra == 1, cost)


def chunk_rows(out_features: int, width: int) -> int:
    """Rows per chunk of :func:`run_panels`: a power of two (256 .. 4096) such that a
    chunk's ``Z`` and output rows (``width + out_features`` floats each) take about 8 MB,
    so that stage 2 reads ``Z`` from cache rather than memory."""
    target = (8 << 20) // (4 * max(out_features + width, 1))
    return int(min(4096, max(256, 1 << max(target, 1).bit_length() - 1)))


def run_panels(x: Tensor, ops: PanelOps) -> Tensor:
    """``(N, n) -> (N, m)`` through the two stages of :func:`panel_ops`, in chunks of
    :func:`chunk_rows` input rows (bias included when the ops were built with one)."""
    rows = x.shape[0]
    chunk = min(rows, chunk_rows(ops.out_features, ops.width))
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
        for p0, p1, ranges in ops.panels:
            yp = yc[:, p0:p1]
            if not ranges:
                yp.zero_()
            # beta=0 ignores the uninitialized panel (NaNs included): it is written once.
            beta = 0.0
            for z0, z1, ut in ranges:
                yp.addmm_(zt[z0:z1].t(), ut, beta=beta)
                beta = 1.0
    return y
