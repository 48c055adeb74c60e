"""Execution plans of a frozen GBLR matrix: pure tensor functions, no modules.

A frozen GBLR matrix ``W (m, n)`` is given by ``K`` live components of rank ``r``: integer
circular row intervals ``(start, length)`` ``(K, 2)``, column intervals ``(K, 2)``, and
factors packed over their intervals only (see [`gblr.FrozenGBLRLinear`][]):

- ``u_packed``: for each component ``k`` in order, ``U_k`` of shape ``(len R_k, r)``
  row-major (row ``t`` belongs to output index ``(start_k + t) mod m``);
- ``v_packed``: for each component, ``V_k`` of shape ``(r, len C_k)`` row-major.

Every plan computes ``y = x W^T (+ bias)`` for ``x (N, n)``; they differ in how the work is
laid out:

``dense``
    ``W`` materialized once; one GEMM.
``lowrank``
    ``U (m, K r)`` and ``V (K r, n)`` zero-padded outside the intervals; two thin GEMMs.
``blocksparse``
    ``W`` tiled in ``b x b`` tiles; empty tiles are skipped. In each column panel the runs
    of non-empty tiles are one GEMM each, and neighbouring panels with the same runs are
    merged, so each GEMM reads a strided slice of ``x`` and updates a slice of ``y`` in
    place (no gathers).
``segment``
    the GBLR form ``z_k = V_k x[C_k]``, ``y[R_k] += U_k z_k``. Components are sorted and
    partitioned into runs of consecutive components (dynamic programming over a cost
    model, see [`partition_components`][gblr.deploy.plans.partition_components]); a run is evaluated
    over the union of its members' intervals as two GEMMs, zero-padded inside the union, so the work
    is in a few large matrix products rather than ``K`` small ones. Wrap-around intervals are at
    most two slices each.
``panels``
    the segment form in two stages ([`gblr.deploy.panels`][]): every ``z_k`` into one
    buffer, then each output panel written once by the GEMMs of the components covering
    it, in cache-sized chunks of rows.

Why slices and GEMMs rather than gathers and ``bmm``: on CPUs the gather of ``x`` and the
``index_add`` of the result move as many bytes as the products themselves do MACs, and were
measured slower than the dense product at 10% density (issue 7 notes); ``torch``'s CPU BSR
matmul gave only 1.3x at 9% tile density. A slice ``x[:, a:b]`` is a BLAS operand with a
leading stride, so it costs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GPU_PLANS",
    "PLANS",
    "BlockOps",
    "SegmentOps",
    "block_ops",
    "default_plan",
    "dense_matrix",
    "padded_factors",
    "partition_components",
    "row_bucket",
    "run_blocks",
    "run_dense",
    "run_lowrank",
    "run_segment",
    "segment_ops",
]

PLANS = ("dense", "lowrank", "blocksparse", "segment", "panels")
# Plans that run only on CUDA tensors (or under Triton's interpreter, for tests): timed by
# gblr.plan only on a CUDA device with triton installed.
GPU_PLANS = ("triton",)

# Cost model, in MACs per input row (the unit of layer.flops()):
# - a GEMM whose inner or outer dimension (the rank of a run) is below _RANK_FLOOR runs at
#   memory speed, not at the BLAS peak; it is charged as if it had _RANK_FLOOR columns.
#   (Measured on 2 EPYC cores: rank 1-4 products reach 3-7 GMAC/s, rank >= 16 30-45.)
# - each BLAS call costs about 10 microseconds of dispatch; at ~40 GMAC/s that is
#   _CALL_OVERHEAD_MACS, spread over the N rows of the input.
_RANK_FLOOR = 32
_CALL_OVERHEAD_MACS = 4.0e5
# A run of the segment plan holds at most this many distinct intervals (bounds the DP).
_MAX_RUN = 256


def row_bucket(rows: int) -> int:
    """Row-count bucket of plan caches: the next power of two ``>= rows`` (1 for 0)."""
    return 1 if rows <= 1 else 1 << (int(rows) - 1).bit_length()


# --------------------------------------------------------------------------- packing
def packed_indices(
    starts: Tensor,
    lengths: Tensor,
    rank: int,
    size: int,
    *,
    rank_major: bool,
    total: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Where each entry of a packed factor lives in the zero-padded factor.

    Args:
        starts, lengths: ``(K,)`` int64 circular intervals over a dimension of ``size``.
        rank: ``r``.
        size: the dimension (``m`` for ``U``, ``n`` for ``V``).
        rank_major: ``False`` for ``u_packed`` (each block ``(length, r)``), ``True`` for
            ``v_packed`` (each block ``(r, length)``).
        total: ``r * sum(lengths)`` when the caller knows it (the packed factor's size):
            then nothing is read back from the tensors, and the computation traces under
            ``torch.compile`` as one graph of static shapes.

    Returns:
        ``(position, rank_index)``, each ``(r * sum(lengths),)`` int64: the entry's index
        along the dimension, and its column ``k * r + j`` in the ``K r`` rank dimension.
    """
    device = starts.device
    sizes = lengths * rank
    if total is None:
        total = int(sizes.sum())
    component = torch.repeat_interleave(
        torch.arange(starts.numel(), device=device), sizes, output_size=total
    )
    offsets = torch.cumsum(sizes, 0) - sizes
    within = torch.arange(total, device=device) - offsets[component]
    if rank_major:
        j = torch.div(within, lengths[component], rounding_mode="floor")
        t = within - j * lengths[component]
    else:
        t = torch.div(within, rank, rounding_mode="floor")
        j = within - t * rank
    position = torch.remainder(starts[component] + t, size)
    return position, component * rank + j


def padded_factors(
    u_packed: Tensor,
    v_packed: Tensor,
    row_intervals: Tensor,
    col_intervals: Tensor,
    rank: int,
    shape: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """``(U (m, K r), V (K r, n))``, zero outside each component's intervals, ``W = U V``."""
    m, n = shape
    k = row_intervals.shape[0]
    u = u_packed.new_zeros(m, k * rank)
    v = v_packed.new_zeros(k * rank, n)
    if k:
        rows, u_rank = packed_indices(
            row_intervals[:, 0],
            row_intervals[:, 1],
            rank,
            m,
            rank_major=False,
            total=u_packed.numel(),
        )
        cols, v_rank = packed_indices(
            col_intervals[:, 0],
            col_intervals[:, 1],
            rank,
            n,
            rank_major=True,
            total=v_packed.numel(),
        )
        u[rows, u_rank] = u_packed
        v[v_rank, cols] = v_packed
    return u, v


def dense_matrix(u: Tensor, v: Tensor) -> Tensor:
    """``W = U V`` ``(m, n)`` from the padded factors, accumulated in float32 for 16-bit
    dtypes (the sum over ``K r`` terms would lose precision in bf16/fp16)."""
    dtype = u.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return (u.float() @ v.float()).to(dtype)
    return u @ v


# --------------------------------------------------------------------------- segment
@dataclass(frozen=True)
class Run:
    """One run of the segment plan: components evaluated together over their union.

    ``members`` are component indices; ``cols``/``rows`` the union intervals
    ``(start, length)`` (circular; ``start`` is 0 for a full interval).
    """

    members: tuple[int, ...]
    cols: tuple[int, int]
    rows: tuple[int, int]


@dataclass(frozen=True)
class Partition:
    """Runs covering every live component once, and the cost model's MACs per row."""

    runs: tuple[Run, ...]
    cost: float


def _run_costs(
    c0: np.ndarray,
    c1: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray,
    g: np.ndarray,
    shape: tuple[int, int],
    overhead: float,
) -> np.ndarray:
    """``cost[i, l]``: modelled MACs/row of the run of items ``i .. i + l`` (inf if past the
    end). Items are intervals in linear coordinates ``[c0, c1)``: a run's union is
    ``[min c0, max c1)``, capped at the full dimension."""
    m, n = shape
    p = c0.size
    width = min(p, _MAX_RUN)
    cost = np.full((p, width), np.inf)
    for i in range(p):
        j = min(p, i + width)
        lc = np.minimum(np.maximum.accumulate(c1[i:j]) - np.minimum.accumulate(c0[i:j]), n)
        lr = np.minimum(np.maximum.accumulate(r1[i:j]) - np.minimum.accumulate(r0[i:j]), m)
        rank = np.cumsum(g[i:j])
        cost[i, : j - i] = np.maximum(rank, _RANK_FLOOR) * (lc + lr) + overhead
    return cost


def _best_split(cost: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
    """Cheapest split of ``0 .. p`` into consecutive runs (shortest path over a DAG)."""
    p, width = cost.shape
    best = np.full(p + 1, np.inf)
    best[0] = 0.0
    previous = np.zeros(p + 1, dtype=np.int64)
    for i in range(p):
        j = min(p, i + width)
        candidate = best[i] + cost[i, : j - i]
        better = candidate < best[i + 1 : j + 1]
        best[i + 1 : j + 1][better] = candidate[better]
        previous[i + 1 : j + 1][better] = i
    runs, end = [], p
    while end > 0:
        runs.append((int(previous[end]), end))
        end = int(previous[end])
    return float(best[p]), runs[::-1]


def partition_components(
    row_intervals: Tensor, col_intervals: Tensor, rank: int, shape: tuple[int, int], rows: int
) -> Partition:
    """Group components into runs for the segment plan, minimizing modelled time.

    A run of components costs ``max(G r, 8) * (|union C| + |union R|)`` MACs per input row
    (padded GEMMs through its ``G r`` ranks; narrow GEMMs run at memory speed, hence the
    floor) plus a fixed overhead per BLAS call divided over ``rows``. Components with
    identical intervals always share a run (full-width ones thus form one low-rank
    product). The items are sorted by column start (then row start), and separately by
    row start; the best split into consecutive runs is found exactly for each order by
    dynamic programming, and the cheaper of the two is kept.

    Args:
        row_intervals, col_intervals: ``(K, 2)`` int64 ``(start, length)``, lengths >= 1.
        rank: ``r``.
        shape: ``(m, n)``.
        rows: the number of input rows the partition is for (its bucket).

    Returns:
        A [`Partition`][gblr.deploy.plans.Partition].
    """
    m, n = shape
    k = row_intervals.shape[0]
    if k == 0:
        return Partition((), 0.0)
    # (tolist: under torch.func a tensor read here has no numpy view)
    rows_np = np.asarray(row_intervals.tolist(), dtype=np.int64).reshape(-1, 2)
    cols_np = np.asarray(col_intervals.tolist(), dtype=np.int64).reshape(-1, 2)
    # Linear coordinates: an interval is [start, start + length) with start < size; a
    # full interval is [0, size) whatever its start, so full components coincide.
    c0 = np.where(cols_np[:, 1] >= n, 0, cols_np[:, 0])
    c1 = c0 + cols_np[:, 1]
    r0 = np.where(rows_np[:, 1] >= m, 0, rows_np[:, 0])
    r1 = r0 + rows_np[:, 1]
    keys = np.stack([c0, c1, r0, r1], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    members = [[] for _ in range(len(unique))]
    for component, item in enumerate(inverse.tolist()):
        members[item].append(component)
    g = np.array([len(ms) * rank for ms in members], dtype=np.float64)
    overhead = 2 * _CALL_OVERHEAD_MACS / max(rows, 1)
    u0, u1, v0, v1 = (unique[:, i].astype(np.float64) for i in range(4))

    best: tuple[float, list[tuple[int, int]], np.ndarray] | None = None
    for order in (np.lexsort((v0, u0)), np.lexsort((u0, v0))):
        cost = _run_costs(u0[order], u1[order], v0[order], v1[order], g[order], shape, overhead)
        total, splits = _best_split(cost)
        if best is None or total < best[0]:
            best = (total, splits, order)
    assert best is not None
    total, splits, order = best
    runs = []
    for start, end in splits:
        items = order[start:end]
        lc = int(min(u1[items].max() - u0[items].min(), n))
        lr = int(min(v1[items].max() - v0[items].min(), m))
        cols = (0, n) if lc >= n else (int(u0[items].min()), lc)
        rws = (0, m) if lr >= m else (int(v0[items].min()), lr)
        runs.append(Run(tuple(sorted(c for i in items for c in members[i])), cols, rws))
    return Partition(tuple(runs), total)


def _pieces(start: int, length: int, size: int) -> list[tuple[int, int, int]]:
    """A circular interval as at most two slices ``(from, to, offset in the interval)``."""
    first = min(length, size - start)
    pieces = [(start, start + first, 0)]
    if length > first:
        pieces.append((0, length - first, first))
    return pieces


Pieces = tuple[tuple[int, int, Tensor], ...]


@dataclass(frozen=True)
class SegmentOps:
    """Operands of the segment plan: per run, ``[(a, b, V_piece (G r, b - a))]`` over
    input slices and ``[(a, b, U_piece^T (G r, b - a))]`` over output slices."""

    runs: tuple[tuple[Pieces, Pieces], ...]
    out_features: int


def segment_ops(u: Tensor, v: Tensor, partition: Partition, rank: int) -> SegmentOps:
    """Cut the padded factors ``U (m, K r)``, ``V (K r, n)`` into the runs of ``partition``.

    Within a run, each member's factors are zero outside its own intervals, so padding to
    the union is exact.
    """
    m, n = u.shape[0], v.shape[1]
    device = u.device
    runs = []
    for run in partition.runs:
        members = torch.tensor(run.members, device=device, dtype=torch.long)
        ranks = (members.unsqueeze(1) * rank + torch.arange(rank, device=device)).reshape(-1)
        v_run = v.index_select(0, ranks)
        ut_run = u.index_select(1, ranks).t()
        # The padded factors are indexed by the real row/column, so a piece is a slice.
        col_pieces = tuple((a, b, v_run[:, a:b].contiguous()) for a, b, _ in _pieces(*run.cols, n))
        row_pieces = tuple((a, b, ut_run[:, a:b].contiguous()) for a, b, _ in _pieces(*run.rows, m))
        runs.append((col_pieces, row_pieces))
    # A run over all output rows goes first: it writes y directly (no zero-fill pass).
    runs.sort(key=lambda r: not (len(r[1]) == 1 and r[1][0][:2] == (0, m)))
    return SegmentOps(tuple(runs), m)


def _empty_output(x: Tensor, bias: Tensor | None, m: int) -> Tensor:
    if bias is None:
        return x.new_zeros(x.shape[0], m)
    return bias.expand(x.shape[0], m).clone()


def run_segment(x: Tensor, ops: SegmentOps, bias: Tensor | None) -> Tensor:
    """``(N, n) -> (N, m)`` through the runs of [`segment_ops`][gblr.deploy.plans.segment_ops]."""
    m = ops.out_features
    y: Tensor | None = None
    for col_pieces, row_pieces in ops.runs:
        a, b, v_piece = col_pieces[0]
        z = F.linear(x[:, a:b], v_piece)
        for a, b, v_piece in col_pieces[1:]:
            z.addmm_(x[:, a:b], v_piece.t())
        if y is None and len(row_pieces) == 1 and row_pieces[0][:2] == (0, m):
            ut = row_pieces[0][2]
            y = torch.mm(z, ut) if bias is None else torch.addmm(bias, z, ut)
            continue
        if y is None:
            y = _empty_output(x, bias, m)
        for a, b, ut_piece in row_pieces:
            y[:, a:b].addmm_(z, ut_piece)
    return _empty_output(x, bias, m) if y is None else y


# --------------------------------------------------------------------------- blocksparse
def block_size(shape: tuple[int, int]) -> int:
    """Tile size of the blocksparse plan: 64, or 32 / 16 for small matrices."""
    smallest = min(shape)
    return 64 if smallest >= 512 else 32 if smallest >= 128 else 16


@dataclass(frozen=True)
class BlockOps:
    """Operands of the blocksparse plan: ``[(col_from, col_to, row_from, row_to, W_block^T)]``."""

    blocks: tuple[tuple[int, int, int, int, Tensor], ...]
    out_features: int
    tiles: int
    nonempty_tiles: int


def block_ops(weight: Tensor, rows: int, block: int | None = None) -> BlockOps:
    """Tile ``weight (m, n)`` into ``block x block`` tiles and keep the non-empty ones.

    In each column panel, consecutive non-empty tiles form one block (gaps are filled when
    the extra MACs cost less than a BLAS call at ``rows`` rows); adjacent panels with the
    same blocks are merged into wider ones.
    """
    m, n = weight.shape
    b = block_size((m, n)) if block is None else block
    mb, nb = -(-m // b), -(-n // b)
    padded = weight.new_zeros(mb * b, nb * b)
    padded[:m, :n] = weight
    occupied = (padded != 0).reshape(mb, b, nb, b).any(dim=3).any(dim=1).cpu()  # (mb, nb)
    max_gap = _CALL_OVERHEAD_MACS / max(rows, 1) / (b * b)
    panels: list[tuple[int, ...]] = []
    for j in range(nb):
        tiles = torch.nonzero(occupied[:, j]).flatten().tolist()
        spans: list[list[int]] = []
        for i in tiles:
            if spans and i - spans[-1][1] <= max_gap:
                spans[-1][1] = i + 1
            else:
                spans.append([i, i + 1])
        panels.append(tuple(x for span in spans for x in span))
    blocks = []
    j = 0
    while j < nb:
        end = j + 1
        while end < nb and panels[end] == panels[j]:
            end += 1
        c_from, c_to = j * b, min(end * b, n)
        spans = panels[j]
        for s in range(0, len(spans), 2):
            r_from, r_to = spans[s] * b, min(spans[s + 1] * b, m)
            block_t = weight[r_from:r_to, c_from:c_to].t().contiguous()
            blocks.append((c_from, c_to, r_from, r_to, block_t))
        j = end
    blocks.sort(key=lambda blk: not (blk[2] == 0 and blk[3] == m))
    return BlockOps(tuple(blocks), m, mb * nb, int(occupied.sum()))


def run_blocks(x: Tensor, ops: BlockOps, bias: Tensor | None) -> Tensor:
    """``(N, n) -> (N, m)`` through the blocks of [`block_ops`][gblr.deploy.plans.block_ops]."""
    m = ops.out_features
    y: Tensor | None = None
    for c_from, c_to, r_from, r_to, block_t in ops.blocks:
        if y is None and (r_from, r_to) == (0, m):
            xs = x[:, c_from:c_to]
            y = torch.mm(xs, block_t) if bias is None else torch.addmm(bias, xs, block_t)
            continue
        if y is None:
            y = _empty_output(x, bias, m)
        y[:, r_from:r_to].addmm_(x[:, c_from:c_to], block_t)
    return _empty_output(x, bias, m) if y is None else y


# --------------------------------------------------------------------------- dense, lowrank
def run_dense(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``(N, n) -> (N, m)``: one GEMM with the materialized ``W (m, n)``."""
    return F.linear(x, weight, bias)


def run_lowrank(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """``(N, n) -> (N, m)``: ``(x V^T) U^T`` with the padded ``U (m, K r)``, ``V (K r, n)``."""
    return F.linear(F.linear(x, v), u, bias)


# --------------------------------------------------------------------------- default
def default_plan(
    shape: tuple[int, int],
    flops: int,
    total_rank: int,
    segment_cost: float,
    rows: int,
    panels_cost: float | None = None,
) -> str:
    """The plan used when none was timed for this row-count bucket.

    ``dense`` when the structure costs more than half the dense MACs; otherwise the
    cheapest of ``lowrank``, ``segment`` and (when its cost is given) ``panels`` by the
    cost model of [`partition_components`][gblr.deploy.plans.partition_components], if it is clearly
    (20%) below dense, else ``dense``.
    """
    m, n = shape
    dense = float(m * n)
    if flops > 0.5 * dense:
        return "dense"
    lowrank = max(total_rank, _RANK_FLOOR) * (m + n) + 2 * _CALL_OVERHEAD_MACS / max(rows, 1)
    costs = {"lowrank": lowrank, "segment": segment_cost}
    if panels_cost is not None:
        costs["panels"] = panels_cost
    name = min(costs, key=costs.__getitem__)
    return name if costs[name] < 0.8 * dense else "dense"
