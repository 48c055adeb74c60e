"""Untangling pairs of rank-1 GBLR components: the same sum over smaller intervals.

Two overlapping rank-1 components hold a rank-2 sum ``S = X Y^T`` over the box holding
both (``X``: their row factors, ``Y``: their column factors). Any invertible ``A`` gives
the same sum as ``(X A)(Y A^{-T})^T``, so the pair can hold its two blocks in many ways,
and the proximal learner can settle on one whose intervals are wider than the blocks':
each component then holds a mixture of both blocks. Gradient steps cannot leave such a
tangle, since every factorization has the same loss and the path between them crosses
intervals the budget does not pay for. On the planted-structure benchmark
(``benchmarks/bench_learner.py``) that was the failure left at 1.1x the planted cost.

Which factorization has the smallest intervals: with ``A = [a_0, a_1]`` the new row
factors are ``X a_k`` and the new column factors ``Y b_k`` with ``b_0 ∝ rot(a_1)`` and
``b_1 ∝ rot(a_0)`` (``rot``: the 90° rotation, since ``A^{-T}`` has columns orthogonal
to the other column of ``A``). So the pair's MACs split into ``f(a_0) + f(a_1)`` with
``f(a) = |support of X a| + |support of Y rot(a)|``: each direction is scored on its own.
Only directions that zero a row (``a ⊥ X[t]``) or a column (``a ∥ Y[t]``) can shorten a
support, and (pairs whose box spans a whole dimension are skipped) only those of the
span's outermost cells, so those are the candidates; pairs are scored in batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers.base import GBLRMatrixMixin
from .config import UntangleConfig
from .factors import check_fraction, circular_spans, closest_factors, exact_factors
from .groups import gblr_layers
from .passes import LearnerPass

__all__ = ["UntanglePass", "untangle_components"]

# An entry counts as part of a support when it is above this fraction of its vector's
# largest entry; smaller ones at the ends are dropped (and the result is checked against
# the tolerance).
_SUPPORT_FLOOR = 1e-2
# Pairs are searched in batches of about this many float64 elements per array.
_BATCH_ELEMENTS = 4_000_000
# Largest sum of the two blocks' Frobenius norms, relative to their sum's.
_CANCELLATION = 2.0
# The learner's pass: a component is settled for untangling when its exact block moved by
# at most this fraction (relative Frobenius) since the previous pass. On the
# planted-structure benchmark a prototype untangling every pair every 10 steps cut blocks
# that were still growing (8/20 at 1.1x the planted cost); with this check and the two
# guards below, 20/20.
_SETTLED = 1e-2
# Fraction of a pair's MACs an untangling must save: smaller rewrites change the
# factorization (and so the course of training) for nothing.
_UNTANGLE_MIN_SAVING = 0.05
# An untangled pair whose MACs grow back by this fraction of what untangling saved is
# never untangled again: the loss wants those entries, and repeating would fight it.
_UNTANGLE_REGROWTH = 0.5


def _supports(values: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest interval holding every entry above ``_SUPPORT_FLOOR`` of the row's peak.

    Args:
        values: ``(C, m)`` absolute values.

    Returns:
        ``(start, length)``, each ``(C,)`` int64; ``length == 0`` for an all-zero row.
    """
    m = values.shape[1]
    peak = values.amax(dim=1, keepdim=True)
    big = (values > _SUPPORT_FLOOR * peak) & (peak > 0)
    first = big.to(torch.int8).argmax(dim=1)
    last = m - 1 - big.flip(1).to(torch.int8).argmax(dim=1)
    length = torch.where(big.any(dim=1), last - first + 1, torch.zeros_like(first))
    return first, length


def _keep(values: Tensor, start: Tensor, length: Tensor) -> Tensor:
    """``values`` (C, m) with entries outside each row's interval set to zero."""
    offset = torch.arange(values.shape[1], device=values.device) - start[:, None]
    return values * ((offset >= 0) & (offset < length[:, None]))


def _end_cells(factors: Tensor) -> Tensor:
    """The two first and two last cells whose factor row is above ``_SUPPORT_FLOOR`` of
    the largest, per pair (repeated when there are fewer).

    Args:
        factors: ``(P, m, 2)``.

    Returns:
        ``(P, 4)`` int64 cell indices.
    """
    m = factors.shape[1]
    norms = factors[..., 0].square() + factors[..., 1].square()  # squared: same order
    significant = norms > _SUPPORT_FLOOR**2 * norms.amax(dim=1, keepdim=True)
    forward, backward = significant.cumsum(dim=1), significant.flip(1).cumsum(dim=1)
    cells = [(forward >= 1), (forward >= 2), (backward >= 2), (backward >= 1)]
    index = [cell.to(torch.int8).argmax(dim=1) for cell in cells]
    return torch.stack([index[0], index[1], m - 1 - index[2], m - 1 - index[3]], dim=1)


def _best_factorizations(
    x: Tensor, y: Tensor, tolerance: float, limit: Tensor | None = None
) -> tuple[Tensor, list[Any]]:
    """For each pair, the cheapest two rank-1 blocks, each within its own interval, whose
    sum is ``x @ y.T`` to ``tolerance`` and whose norms add up to no more than the
    current ones or twice the sum's.

    Args:
        x: ``(P, m, 2)`` row factors over each pair's row span (zero-padded past a span's
            end; spans shorter than the dimension, so intervals in them do not wrap);
            y: ``(P, n, 2)`` column factors.
        limit: ``(P,)`` most MACs of interest per pair: pairs that cannot get at or
            below it are not searched further (reported as ``-1``).

    Returns:
        ``(macs, blocks)``: ``macs`` ``(P,)`` int64, -1 where no candidate passes; per
        pair ``blocks`` is ``None`` or two ``(u, v, (row_start, row_len), (col_start,
        col_len))``, ``u`` of shape ``(m,)`` and ``v`` ``(n,)``, zero outside their
        intervals (indices into the span).
    """
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=x.dtype, device=x.device)
    count, m, _ = x.shape
    n = y.shape[1]
    # A support shorter than its span leaves out the span's outermost non-negligible
    # cells, so only the directions that zero one of those can shorten it (the two at
    # each end: one may be noise). The current factors (the identity) are candidates
    # too. a ⊥ x_t zeroes row t; a ∥ y_t zeroes column t.
    batch = torch.arange(count, device=x.device)[:, None]
    row_dirs = x[batch, _end_cells(x)]
    col_dirs = y[batch, _end_cells(y)]
    identity = torch.eye(2, dtype=x.dtype, device=x.device).expand(count, 2, 2)
    directions = torch.cat([row_dirs @ rotation.T, col_dirs, identity], dim=1)  # (P, C, 2)
    norms = (directions[..., 0].square() + directions[..., 1].square()).sqrt()[..., None]
    directions = directions / norms.clamp_min(torch.finfo(x.dtype).tiny)
    row_values = directions @ x.mT  # (P, C, m): X a
    col_values = directions @ (y @ rotation).mT  # (P, C, n): Y rot(a)
    row_start, row_len = _supports(row_values.abs().flatten(0, 1))
    col_start, col_len = _supports(col_values.abs().flatten(0, 1))
    row_start, row_len = row_start.view(count, -1), row_len.view(count, -1)
    col_start, col_len = col_start.view(count, -1), col_len.view(count, -1)
    macs = row_len + col_len
    usable = norms[..., 0] > 0
    if limit is not None:
        # The two cheapest directions bound the pair's MACs from below; most pairs (the
        # current factors are candidates) cannot save anything, so stop there.
        big = torch.iinfo(macs.dtype).max // 4
        cheapest = torch.where(usable, macs, torch.full_like(macs, big))
        bound = cheapest.topk(2, dim=1, largest=False).values.sum(dim=1)
        hopeful = (bound <= limit.to(bound.device)).nonzero().flatten()
        if hopeful.numel() < count:
            best = torch.full((count,), -1, dtype=macs.dtype, device=macs.device)
            blocks: list[Any] = [None] * count
            if hopeful.numel() > 0:
                sub_best, sub_blocks = _best_factorizations(x[hopeful], y[hopeful], tolerance)
                best[hopeful] = sub_best
                for position, found in zip(hopeful.tolist(), sub_blocks):
                    blocks[position] = found
            return best, blocks
    # Parallel candidates (rows of one block share their angle) make d below zero, so
    # their pairs are invalid; no deduplication is needed.
    p = _keep(row_values.flatten(0, 1), row_start.flatten(), row_len.flatten())
    q = _keep(col_values.flatten(0, 1), col_start.flatten(), col_len.flatten())
    p, q = p.view(count, -1, m), q.view(count, -1, n)  # (P, C, m), (P, C, n)
    # For the ordered pair (c0, c1): blocks p_c0 q_c1^T / d and -p_c1 q_c0^T / d with
    # d = a_c0 . rot(a_c1); their sum is X Y^T up to the dropped entries.
    d = directions @ rotation @ directions.mT  # (P, C, C): d[c0, c1] = a_c0^T rot a_c1
    gram_p, gram_q = p @ p.mT, q @ q.mT
    cross = (p @ x) @ (q @ y).mT  # <S, p_c0 q_c1^T>
    energy = (x.mT @ x * (y.mT @ y)).sum(dim=(1, 2))[:, None, None]
    sq_p, sq_q = gram_p.diagonal(dim1=1, dim2=2), gram_q.diagonal(dim1=1, dim2=2)
    approx = (
        sq_p[:, :, None] * sq_q[:, None, :] + sq_p[:, None, :] * sq_q[:, :, None]
        - 2 * gram_p * gram_q
    )  # fmt: skip
    safe_d = torch.where(d.abs() > 1e-6, d, torch.ones_like(d))
    error = energy - 2 * (cross - cross.mT) / safe_d + approx / safe_d**2
    root_p, root_q = sq_p.sqrt(), sq_q.sqrt()
    pair_norm = (
        root_p[:, :, None] * root_q[:, None, :] + root_p[:, None, :] * root_q[:, :, None]
    ) / safe_d.abs()
    old_norm = (x.norm(dim=1) * y.norm(dim=1)).sum(dim=1)[:, None, None]
    valid = (
        (d.abs() > 1e-6)
        & usable[:, :, None]
        & usable[:, None, :]
        & (energy > 0)
        & (error <= tolerance * energy)
        # No pair of large blocks that cancel each other: every later change of an
        # interval would be a large change of the weight. Blocks that do not overlap
        # have norms adding up to at most sqrt(2) |S|; allow 2 |S|, or the current ones.
        & (pair_norm <= torch.maximum(old_norm, _CANCELLATION * energy.sqrt()) * (1 + 1e-9))
    )
    total = macs[:, :, None] + macs[:, None, :]
    total = torch.where(valid, total, torch.full_like(total, torch.iinfo(total.dtype).max))
    width = total.shape[1]
    best_total, flat = total.flatten(1).min(dim=1)
    best = torch.where(valid.flatten(1).any(dim=1), best_total, torch.full_like(best_total, -1))
    blocks = []
    for index, (found, position) in enumerate(zip(best.tolist(), flat.tolist())):
        if found < 0:
            blocks.append(None)
            continue
        c0, c1 = divmod(position, width)
        scale = d[index, c0, c1]
        rows = [(int(row_start[index, c]), int(row_len[index, c])) for c in (c0, c1)]
        cols = [(int(col_start[index, c]), int(col_len[index, c])) for c in (c1, c0)]
        blocks.append(
            [
                (p[index, c0], q[index, c1] / scale, rows[0], cols[0]),
                (p[index, c1], -q[index, c0] / scale, rows[1], cols[1]),
            ]
        )
    return best, blocks


@torch.no_grad()
def _untangle_layer(
    layer: GBLRMatrixMixin,
    tolerance: float,
    min_saving: float,
    allowed: Tensor | None = None,
    banned: set[tuple[int, int]] | None = None,
    fresh: Tensor | None = None,
) -> list[tuple[int, int, int, int]]:
    """Untangle overlapping pairs of one layer (see
    [`untangle_components`][gblr.learn.untangle.untangle_components]).

    Args:
        allowed: ``(K,)`` bool, the components that may take part (default all).
        banned: pairs ``(i, j)``, ``i < j``, to leave alone.
        fresh: ``(K,)`` bool: only pairs with at least one of these are searched (the
            learner's: components newly settled; pairs of unchanged blocks were searched
            before).

    Returns:
        ``(i, j, macs_before, macs_after)`` for each pair untangled.
    """
    if layer.rank_per_component != 1:
        return []
    col_len, row_len = layer.interval_lengths()
    live_mask = (row_len > 0) & (col_len > 0)
    if allowed is not None:
        live_mask &= allowed.to(live_mask.device)
    live = live_mask.nonzero().flatten()
    if live.numel() < 2:
        return []
    col_start, row_start = layer.interval_starts()
    row_len, col_len = row_len[live].cpu(), col_len[live].cpu()
    row_start, col_start = row_start[live].cpu(), col_start[live].cpu()
    row_span_start, row_span = circular_spans(row_start, row_len, layer.rows)
    col_span_start, col_span = circular_spans(col_start, col_len, layer.cols)
    # Overlapping in both dimensions: the union is shorter than the two intervals. A
    # pair whose box spans a whole dimension is skipped: there the gap of a new interval
    # could be anywhere, so its search would try every row or column (and such pairs
    # are typically wide low-rank components, with nothing to untangle).
    overlap = (
        (row_span < row_len[:, None] + row_len[None, :])
        & (col_span < col_len[:, None] + col_len[None, :])
        & (row_span < layer.rows)
        & (col_span < layer.cols)
    )
    own = row_len + col_len
    pair_macs = own[:, None] + own[None, :]
    if fresh is not None:
        new = fresh.to(live.device)[live].cpu()
        overlap &= new[:, None] | new[None, :]
    pairs = torch.triu(overlap, diagonal=1).nonzero()
    if pairs.numel() == 0:
        return []
    u, v = exact_factors(layer)
    pair_list = [
        (a, b)
        for a, b in pairs.tolist()
        if banned is None or (int(live[a]), int(live[b])) not in banned
    ]
    # Worth finding: a saving of min_saving of the pair's MACs, and at least one MAC.
    limits = (pair_macs - torch.clamp(torch.ceil(min_saving * pair_macs), min=1)).long()
    found = _search_pairs(layer, u, v, live, pair_list, row_span_start, row_span,
                          col_span_start, col_span, tolerance, limits)  # fmt: skip
    taken: set[int] = set()
    untangled = []
    for a, b in pair_list:
        i, j = int(live[a]), int(live[b])
        current = int(pair_macs[a, b])
        if a in taken or b in taken or found[(a, b)] is None:
            continue
        macs, blocks = found[(a, b)]
        if macs > int(limits[a, b]):  # the screen bounds the search, not its result
            continue
        rows = (row_span_start[a, b] + torch.arange(int(row_span[a, b]))) % layer.rows
        cols = (col_span_start[a, b] + torch.arange(int(col_span[a, b]))) % layer.cols
        rows, cols = rows.to(u.device), cols.to(v.device)
        blocks = [
            (new_u[: len(rows)], new_v[: len(cols)], row_interval, col_interval)
            for new_u, new_v, row_interval, col_interval in blocks
        ]
        taken.update((a, b))
        old = [(u[k, :, rows], v[k, :, cols]) for k in (i, j)]
        # Which old component takes which new block: the closer one, so the optimizer's
        # moments still describe roughly the same entries.
        straight = (blocks[0][0] - old[0][0][0]).norm() + (blocks[1][0] - old[1][0][0]).norm()
        crossed = (blocks[1][0] - old[0][0][0]).norm() + (blocks[0][0] - old[1][0][0]).norm()
        if crossed < straight:
            blocks = blocks[::-1]
        for k, (new_u, new_v, (row_first, row_count), (col_first, col_count)), (
            old_u,
            old_v,
        ) in zip((i, j), blocks, old):
            new_u, new_v = closest_factors(new_u[None], new_v[None], old_u, old_v)
            layer.U[k, :, rows] = new_u.to(layer.U.dtype)
            layer.V[k, :, cols] = new_v.to(layer.V.dtype)
            layer.widths[1, k] = row_count / layer.rows
            layer.widths[0, k] = col_count / layer.cols
            layer.locations[1, k] = int(rows[row_first]) / layer.rows
            layer.locations[0, k] = int(cols[col_first]) / layer.cols
        untangled.append((i, j, current, macs))
    return untangled


def _search_pairs(
    layer: GBLRMatrixMixin,
    u: Tensor,
    v: Tensor,
    live: Tensor,
    pairs: list[tuple[int, int]],
    row_span_start: Tensor,
    row_span: Tensor,
    col_span_start: Tensor,
    col_span: Tensor,
    tolerance: float,
    limits: Tensor,
) -> dict[tuple[int, int], tuple[int, list[Any]] | None]:
    """[`_best_factorizations`][gblr.learn.untangle._best_factorizations] for the given pairs
    (indices into ``live``; spans shorter than the dimensions), in batches zero-padded to the
    longest span. ``limits`` ``(L, L)``: the most MACs worth finding per pair."""
    found: dict[tuple[int, int], tuple[int, list[Any]] | None] = {}
    if not pairs:
        return found
    index = torch.tensor(pairs)
    first, second = index[:, 0], index[:, 1]
    components = live.cpu()[index]  # (P, 2) layer component indices
    longest = max(int(row_span[first, second].max()), int(col_span[first, second].max()))
    chunk = max(1, _BATCH_ELEMENTS // (12 * longest))
    for begin in range(0, len(pairs), chunk):
        part = slice(begin, begin + chunk)
        x = _gather_spans(u, components[part], row_span_start[first[part], second[part]],
                          row_span[first[part], second[part]], layer.rows)  # fmt: skip
        y = _gather_spans(v, components[part], col_span_start[first[part], second[part]],
                          col_span[first[part], second[part]], layer.cols)  # fmt: skip
        limit = limits[first[part], second[part]]
        macs, blocks = _best_factorizations(x, y, tolerance, limit)
        for pair, cost, pair_blocks in zip(pairs[part], macs.tolist(), blocks):
            found[pair] = None if pair_blocks is None else (cost, pair_blocks)
    return found


def _gather_spans(
    factors: Tensor, components: Tensor, starts: Tensor, lengths: Tensor, n: int
) -> Tensor:
    """``(P, L, 2)``: the two components' factors over each span, zero past its end.

    Args:
        factors: ``(K, 1, n)`` masked factors; components: ``(P, 2)`` their indices;
        starts, lengths: ``(P,)`` spans on the circle of ``n`` cells.
    """
    longest = int(lengths.max())
    offsets = torch.arange(longest)
    cells = (starts[:, None] + offsets) % n  # (P, L)
    inside = (offsets < lengths[:, None]).to(factors.dtype).to(factors.device)
    device = factors.device
    values = factors[:, 0][components.to(device)[:, :, None], cells.to(device)[:, None, :]]
    return (values * inside[:, None, :]).mT  # (P, L, 2)


def untangle_components(model: nn.Module, tolerance: float = 1e-4, min_saving: float = 0.05) -> int:
    """Re-split overlapping pairs of rank-1 components into blocks on smaller intervals.

    For every GBLR layer with ``rank_per_component == 1`` and every pair of live
    components whose intervals overlap in rows and in columns: the pair's sum ``X Y^T``
    over the smallest box holding both is re-factored as two rank-1 blocks, each on its
    own (possibly wrapping) intervals, choosing the factorization with the fewest MACs.
    It is applied when it drops at most ``tolerance`` of the sum's squared Frobenius norm
    (entries under 1% of a factor's peak at the ends of an interval are dropped), saves
    at least ``min_saving`` of the pair's MACs (and at least one MAC), and the two new
    blocks' Frobenius norms add up to no more than the old ones or twice their sum's (no
    pair of large blocks cancelling each other). Pairs are taken in order, each component
    in at most one untangling per call. Layers of higher rank, and pairs whose box spans a
    whole dimension, are left as they are.

    Args:
        model: a GBLR layer or a module containing them.
        tolerance: relative squared error allowed per pair, in ``[0, 1)``.
        min_saving: fraction of the pair's MACs an untangling must save, in ``[0, 1)``.

    Returns:
        Number of pairs untangled.

    Examples:
        >>> import torch, gblr
        >>> layer = gblr.GBLRLinear(8, 8, num_components=2, bias=False,
        ...     widths=[[0.75, 0.75], [0.75, 0.75]], locations=[[0.0, 0.0], [0.0, 0.0]])
        >>> with torch.no_grad():  # two blocks on rows 0-2 / cols 0-2 and rows 3-5 / cols 3-5,
        ...     _ = layer.U.zero_(), layer.V.zero_()  # held as their sum and their difference
        ...     layer.U[0, 0, :6] = torch.tensor([1., 1, 1, 1, 1, 1])
        ...     layer.V[0, 0, :6] = torch.tensor([.5, .5, .5, .5, .5, .5])
        ...     layer.U[1, 0, :6] = torch.tensor([1., 1, 1, -1, -1, -1])
        ...     layer.V[1, 0, :6] = torch.tensor([.5, .5, .5, -.5, -.5, -.5])
        >>> weight = layer.dense_weight().detach().clone()
        >>> layer.flops(), gblr.untangle_components(layer), layer.flops()
        (24, 1, 12)
        >>> torch.allclose(layer.dense_weight(), weight)
        True
    """
    tolerance = check_fraction("tolerance", tolerance)
    min_saving = check_fraction("min_saving", min_saving)
    layers = [layer for _, layer in gblr_layers(model)]
    if not layers:
        raise ValueError("model has no GBLR layer (GBLRLinear or GBLRConv2d)")
    return sum(len(_untangle_layer(layer, tolerance, min_saving)) for layer in layers)


class UntanglePass(LearnerPass):
    """The learner's untangle pass ([`gblr.UntangleConfig`][]): every ``pass_every``
    steps after the budget ramp, re-split overlapping pairs of settled rank-1 components
    into blocks on smaller intervals (as
    [`untangle_components`][gblr.learn.untangle.untangle_components], saving at least 5% of a pair's
    MACs). It only lowers the MACs.

    A component is settled when its exact block moved by at most 1% since the previous
    pass, so blocks still growing are not cut; a pair is searched when one of its
    components has just settled, and never again once its MACs grew back (the loss wants
    those entries).

    Examples:
        >>> import gblr
        >>> from gblr.learn.passes import PassSchedule
        >>> from gblr.learn.untangle import UntanglePass
        >>> layer = gblr.GBLRLinear(8, 8)
        >>> untangle = UntanglePass(gblr.UntangleConfig(), [layer], PassSchedule(0, 10))
        >>> untangle.after_shrink(10)  # the first pass only records each block
        >>> untangle.summary(), untangle.reference is not None
        ({'untangles': 0.0}, True)
    """

    name = "untangle"
    counter = "untangles"
    config: UntangleConfig

    def start(self) -> None:
        self.untangles = 0
        # Each layer's exact factors at the previous pass (None before the first).
        self.reference: list[tuple[Tensor, Tensor]] | None = None
        # Each layer's settled components at the previous pass: pairs of components that
        # stayed settled were searched then and are not searched again.
        self.settled: list[Tensor] | None = None
        # (layer, i, j) -> (MACs before, after) of the last untangling; pairs banned.
        self.untangled: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.banned: set[tuple[int, int, int]] = set()

    def after_shrink(self, step: int) -> None:
        if self.schedule.is_pass_step(step):
            self.run()

    def run(self) -> None:
        """One pass: untangle the settled components of every layer; keep their factors
        for the next pass's settledness test."""
        reference, settled_layers = [], []
        for index, layer in enumerate(self.layers):
            u, v = exact_factors(layer)
            settled = torch.zeros(layer.num_components, dtype=torch.bool, device=u.device)
            if self.reference is not None:
                old_u, old_v = self.reference[index]
                old_u, old_v = old_u.to(u.device), old_v.to(v.device)
                # |B1 - B0|^2 = |B1|^2 + |B0|^2 - 2 <B1, B0> per component, from r x r Grams.
                new_sq = (u @ u.mT * (v @ v.mT)).sum((1, 2))
                old_sq = (old_u @ old_u.mT * (old_v @ old_v.mT)).sum((1, 2))
                inner = (u @ old_u.mT * (v @ old_v.mT)).sum((1, 2))
                change = (new_sq + old_sq - 2 * inner).clamp_min(0.0)
                settled = change <= _SETTLED**2 * new_sq
                before = (
                    torch.zeros_like(settled)
                    if self.settled is None
                    else self.settled[index].to(settled.device)
                )
                fresh = settled & ~before
                if bool(fresh.any()):
                    self._ban_regrown(index, layer)
                    banned = {(i, j) for n, i, j in self.banned if n == index}
                    movable = self.movable(index)
                    allowed = settled if movable is None else settled & movable.to(settled)
                    done = _untangle_layer(
                        layer, self.config.tolerance, _UNTANGLE_MIN_SAVING, allowed, banned, fresh
                    )
                    for i, j, macs_before, macs_after in done:
                        self.untangled[(index, i, j)] = (macs_before, macs_after)
                    self.untangles += len(done)
                    u, v = exact_factors(layer)
            reference.append((u, v))
            settled_layers.append(settled)
        self.reference = reference
        self.settled = settled_layers

    def _ban_regrown(self, index: int, layer: GBLRMatrixMixin) -> None:
        """Ban the layer's untangled pairs whose MACs grew back (see ``_UNTANGLE_REGROWTH``)."""
        col_len, row_len = layer.interval_lengths()
        own = (row_len + col_len).tolist()
        for (n, i, j), (before, after) in list(self.untangled.items()):
            if n == index and own[i] + own[j] - after >= _UNTANGLE_REGROWTH * (before - after):
                self.banned.add((n, i, j))
                del self.untangled[(n, i, j)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "untangles": self.untangles,
            "untangle_reference": self.reference,
            "untangle_settled": self.settled,
            "untangled": [[*key, *value] for key, value in sorted(self.untangled.items())],
            "untangle_banned": sorted(self.banned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.untangles = int(state.get("untangles", 0))
        reference = state.get("untangle_reference")
        self.reference = (
            None if reference is None else [(u.clone(), v.clone()) for u, v in reference]
        )
        settled = state.get("untangle_settled")
        self.settled = None if settled is None else [m.clone() for m in settled]
        self.untangled = {
            (int(n), int(i), int(j)): (int(before), int(after))
            for n, i, j, before, after in state.get("untangled", [])
        }
        self.banned = {(int(n), int(i), int(j)) for n, i, j in state.get("untangle_banned", [])}
