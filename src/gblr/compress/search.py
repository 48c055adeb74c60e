"""Fit a GBLR layer to a dense matrix under a MAC budget (docs/design.md#fitting-a-dense-matrix).

``fit_dense`` runs three stages and returns the best of them, all within the budget:

1. **Truncated SVD** at the largest rank the budget pays for (low-rank is a GBLR special
   case, so the result is never worse than SVD at the same MACs).
2. **Greedy block pursuit** from the matrix's magnitude structure: repeatedly take the
   residual's leading singular pair, choose the circular row and column intervals on
   which it is concentrated (the pair that captures the most energy per MAC), fit the
   covered block by its truncated SVD, subtract, until the budget is spent.
3. **Proximal refinement** of the better start: Adam on factors, widths and locations
   with the [`gblr.StructureLearner`][] budget projection keeping the cost exact.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from ..cost import fraction_budget_macs
from ..layers.linear import GBLRLinear
from ..learn.config import LearnerConfig
from ..learn.groups import param_groups
from ..learn.learner import StructureLearner

__all__ = ["fit_dense"]

# Candidate intervals hold the entries of a singular vector above these fractions of its
# largest magnitude (0: the whole dimension).
_SUPPORT_THRESHOLDS = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3)


def _circular_support(magnitude: Tensor, threshold: float) -> tuple[int, int]:
    """Shortest circular interval ``(start, length)`` containing every index whose
    magnitude is at least ``threshold`` times the largest: the complement of the widest
    circular gap between such indices."""
    n = magnitude.numel()
    peak = magnitude.max()
    if threshold <= 0 or peak <= 0:
        return 0, n
    significant = torch.nonzero(magnitude >= threshold * peak).flatten()
    if significant.numel() == 1:
        return int(significant[0]), 1
    gaps = torch.diff(significant, append=significant[:1] + n)  # gap after each index
    widest = int(torch.argmax(gaps))
    start = int(significant[(widest + 1) % significant.numel()])
    return start, n - int(gaps[widest]) + 1


def _best_window(energy: Tensor, length: int) -> tuple[int, int]:
    """The circular window ``(start, length)`` holding the most of ``energy``."""
    n = energy.numel()
    length = max(1, min(length, n))
    prefix = torch.cat([energy.new_zeros(1), torch.cumsum(torch.cat([energy, energy]), 0)])
    starts = torch.arange(n, device=energy.device)
    return int(torch.argmax(prefix[starts + length] - prefix[starts])), length


def _indices(start: int, length: int, size: int, device: torch.device) -> Tensor:
    return (torch.arange(length, device=device) + start) % size


def _segments(start: int, length: int, size: int) -> list[tuple[int, int, int]]:
    """A circular interval as at most two ``(from, to, offset_in_interval)`` slices."""
    first = min(length, size - start)
    pieces = [(start, start + first, 0)]
    if length > first:
        pieces.append((0, length - first, first))
    return pieces


def _get_block(matrix: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """Copy of ``matrix`` on a block of circular intervals (slices, no gather)."""
    m, n = matrix.shape
    row_pieces = [matrix[a:b] for a, b, _ in _segments(*rows, m)]
    band = row_pieces[0] if len(row_pieces) == 1 else torch.cat(row_pieces, 0)
    col_pieces = [band[:, a:b] for a, b, _ in _segments(*cols, n)]
    return col_pieces[0].clone() if len(col_pieces) == 1 else torch.cat(col_pieces, 1)


def _subtract_block(
    matrix: Tensor, rows: tuple[int, int], cols: tuple[int, int], delta: Tensor
) -> None:
    """``matrix[block] -= delta`` in place, ``delta`` shaped like the block."""
    m, n = matrix.shape
    for a, b, i in _segments(*rows, m):
        for c, d, j in _segments(*cols, n):
            matrix[a:b, c:d] -= delta[i : i + b - a, j : j + d - c]


def empty_layer(weight: Tensor, rank_per_component: int) -> GBLRLinear:
    """The zero matrix shaped like ``weight`` as a GBLR layer: one dead component, no MACs
    (what a budget below one component buys). Eval mode, ``weight``'s dtype and device."""
    m, n = weight.shape
    empty = [(0, 0)]
    return GBLRLinear.from_intervals(
        weight.new_zeros(1, rank_per_component, m),
        weight.new_zeros(1, rank_per_component, n),
        empty,
        empty,
    ).eval()


def _svd_layer(weight: Tensor, macs: int, rank_per_component: int) -> GBLRLinear | None:
    m, n = weight.shape
    r = rank_per_component
    rank = r * (macs // (r * (m + n)))
    rank = min(rank, r * (min(m, n) // r))
    if rank == 0:
        return None
    left, singular, right = torch.linalg.svd(weight, full_matrices=False)
    k = rank // r
    # Singular values split evenly: balanced factors train better (Adam moves both alike).
    scale = singular[:rank].sqrt()
    factors_u = (left[:, :rank] * scale).t().reshape(k, r, m)
    factors_v = (scale[:, None] * right[:rank]).reshape(k, r, n)
    full = [(0, m)] * k, [(0, n)] * k
    return GBLRLinear.from_intervals(factors_u, factors_v, full[0], full[1])


def _circular_window_sums(values: Tensor, intervals: list[tuple[int, int]]) -> Tensor:
    """``(len(intervals),)`` sums of ``values`` over circular ``(start, length)`` windows,
    from one prefix sum over two periods."""
    prefix = torch.cat([values.new_zeros(1), torch.cumsum(torch.cat([values, values]), 0)])
    starts = torch.tensor([start for start, _ in intervals], device=values.device)
    lengths = torch.tensor([length for _, length in intervals], device=values.device)
    return prefix[starts + lengths] - prefix[starts]


def _subspace_iteration(
    matrix: Tensor, start: Tensor, iterations: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Leading singular triplets of ``matrix`` ``(p, q)`` by block power iteration from a
    ``(q, k)`` start basis: ``(left (p, k), values (k,), right (q, k))``, values sorted
    descending. A good start (the previous step's basis, a restricted singular vector)
    needs one or two iterations."""
    right, _ = torch.linalg.qr(start)
    for _ in range(iterations):
        left, _ = torch.linalg.qr(matrix @ right)
        right, _ = torch.linalg.qr(matrix.t() @ left)
    left, _ = torch.linalg.qr(matrix @ right)
    small_left, values, small_right_t = torch.linalg.svd(left.t() @ matrix @ right)
    return left @ small_left, values, right @ small_right_t.t()


def _top_singular(block: Tensor, rank: int, start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets ``(left (p, rank), values (rank,), right (rank, q))``:
    exact for small blocks, else one power iteration from ``start`` ``(q, k >= rank)`` (the
    greedy pass only needs a good start; backfitting and refinement polish it)."""
    p, q = block.shape
    if min(p, q) <= 4 * rank + 16:
        left, singular, right = torch.linalg.svd(block, full_matrices=False)
        return left[:, :rank], singular[:rank], right[:rank]
    left, singular, right = _subspace_iteration(block, start, iterations=1)
    return left[:, :rank], singular[:rank], right[:, :rank].t()


def _greedy_layer(
    weight: Tensor, macs: int, rank_per_component: int, start: GBLRLinear | None = None
) -> GBLRLinear | None:
    """Greedy block pursuit within ``macs``; with ``start`` (a layer of full-interval
    components, the truncated SVD), its components are kept and the pursuit spends only
    the MACs it leaves on the residual."""
    m, n = weight.shape
    r = rank_per_component
    device = weight.device
    residual = weight.clone()
    factors_u, factors_v, row_intervals, col_intervals = [], [], [], []
    remaining = macs
    if start is not None:
        for u, v in zip(start.U.detach(), start.V.detach()):
            factors_u.append(u.clone())
            factors_v.append(v.clone())
            row_intervals.append((0, m))
            col_intervals.append((0, n))
            residual -= u.t() @ v
        remaining -= start.flops()
    kept = len(factors_u)
    max_components = 4 * max(m, n)
    # The residual changes by one block per step: its leading subspace is tracked by power
    # iteration warm-started from the previous step's.
    basis = torch.randn(n, min(r + 4, min(m, n)), dtype=weight.dtype, device=device)
    iterations = 4
    while remaining >= 2 * r and len(factors_u) < max_components:
        left, singular, right = _subspace_iteration(residual, basis, iterations)
        basis, iterations = right, 2
        row_magnitude, col_magnitude = left[:, 0].abs(), right[:, 0].abs()
        row_candidates = {_circular_support(row_magnitude, t) for t in _SUPPORT_THRESHOLDS}
        col_candidates = {_circular_support(col_magnitude, t) for t in _SUPPORT_THRESHOLDS}
        # Windows sized to what is left, so the last MACs buy the most concentrated block.
        affordable = remaining // r
        if affordable < m + n:
            row_length = max(1, min(m, affordable - 1, round(affordable * m / (m + n))))
            row_candidates.add(_best_window(row_magnitude.pow(2), row_length))
            col_candidates.add(_best_window(col_magnitude.pow(2), affordable - row_length))
        row_candidates = sorted(row_candidates)
        col_candidates = sorted(col_candidates)
        # Energy a candidate block captures along the residual's leading right singular
        # vector, ||R[rows, cols] @ v[cols]||^2, for every (rows, cols) pair at once: one
        # product with the column-restricted vectors, then window sums over the rows.
        restricted = torch.zeros(n, len(col_candidates), dtype=weight.dtype, device=device)
        for j, cols in enumerate(col_candidates):
            index = _indices(*cols, n, device)
            restricted[index, j] = right[index, 0]
        projected = (residual @ restricted).pow(2)  # (m, column candidates)
        captured = torch.stack(
            [
                _circular_window_sums(projected[:, j], row_candidates)
                for j in range(len(col_candidates))
            ],
            dim=1,
        )  # (row candidates, column candidates)
        row_lengths = torch.tensor([length for _, length in row_candidates], device=device)
        col_lengths = torch.tensor([length for _, length in col_candidates], device=device)
        cost = r * (row_lengths[:, None] + col_lengths[None, :])
        score = torch.where(cost <= remaining, captured / cost, torch.full_like(captured, -1.0))
        best = int(torch.argmax(score))
        if float(score.flatten()[best]) <= 0:
            break
        rows = row_candidates[best // len(col_candidates)]
        cols = col_candidates[best % len(col_candidates)]
        row_index = _indices(*rows, m, device)
        col_index = _indices(*cols, n, device)
        rank = min(r, rows[1], cols[1])
        if rows[1] == m and cols[1] == n and rows[0] == 0 and cols[0] == 0:
            # The whole matrix: the residual's own leading triplets are the block's.
            block_left, block_singular, block_right = (
                left[:, :rank],
                singular[:rank],
                right[:, :rank].t(),
            )
        else:
            block = _get_block(residual, rows, cols)
            block_left, block_singular, block_right = _top_singular(block, rank, right[col_index])
        u = weight.new_zeros(r, m)
        v = weight.new_zeros(r, n)
        u[:rank, row_index] = (block_left * block_singular).t()
        v[:rank, col_index] = block_right
        _subtract_block(residual, rows, cols, u[:, row_index].t() @ v[:, col_index])
        factors_u.append(u)
        factors_v.append(v)
        row_intervals.append(rows)
        col_intervals.append(cols)
        remaining -= r * (rows[1] + cols[1])
    if len(factors_u) == kept:
        return None
    # Only the pursuit's own components are refitted: the kept ones are optimal already.
    _backfit(residual, factors_u, factors_v, row_intervals, col_intervals, sweeps=3, first=kept)
    return GBLRLinear.from_intervals(
        torch.stack(factors_u), torch.stack(factors_v), row_intervals, col_intervals
    )


def _least_squares_rows(basis: Tensor, target: Tensor) -> Tensor:
    """``X`` ``(r, q)`` minimizing ``||target - basis.T @ X||`` for ``basis`` ``(r, p)`` and
    ``target`` ``(p, q)`` (a tiny ridge keeps a rank-deficient basis solvable)."""
    gram = basis @ basis.t()
    if gram.shape[0] == 1:
        return (basis @ target) / gram.clamp_min(1e-30)
    ridge = 1e-12 * gram.diagonal().sum().clamp_min(1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, basis @ target)


def _backfit(
    residual: Tensor,
    factors_u: list[Tensor],
    factors_v: list[Tensor],
    row_intervals: list[tuple[int, int]],
    col_intervals: list[tuple[int, int]],
    sweeps: int,
    first: int = 0,
) -> None:
    """Block coordinate descent on the factors with the intervals fixed (in place; the
    ``residual`` = target minus approximation is kept up to date).

    Each component from index ``first`` on, in turn, is refitted to what the others leave
    of the target on its block, which repairs the greedy pass where blocks overlap. Small
    blocks take the exact truncated SVD; large ones one alternating-least-squares step
    from the current factors, which cannot increase the error and costs two block
    products.
    """
    m, n = residual.shape
    device = residual.device
    for _ in range(sweeps):
        for k in range(first, len(factors_u)):
            rows, cols = row_intervals[k], col_intervals[k]
            row_index = _indices(*rows, m, device)
            col_index = _indices(*cols, n, device)
            u, v = factors_u[k], factors_v[k]
            u_block, v_block = u[:, row_index], v[:, col_index]  # (r, p), (r, q)
            own = u_block.t() @ v_block
            target = _get_block(residual, rows, cols) + own
            rank = min(u.shape[0], rows[1], cols[1])
            if min(rows[1], cols[1]) <= 4 * rank + 16:
                left, singular, right = torch.linalg.svd(target, full_matrices=False)
                new_u = (left[:, :rank] * singular[:rank]).t()
                new_v = right[:rank]
            else:
                # Fix V, solve for U; then fix U, solve for V (ridge only guards rank loss).
                new_u = _least_squares_rows(v_block[:rank], target.t())
                new_v = _least_squares_rows(new_u, target)
            u.zero_()
            v.zero_()
            u[:rank, row_index] = new_u
            v[:rank, col_index] = new_v
            _subtract_block(residual, rows, cols, u[:, row_index].t() @ v[:, col_index] - own)


def _error(layer: GBLRLinear | None, weight: Tensor) -> float:
    if layer is None:
        return 1.0
    layer.eval()
    with torch.no_grad():
        return ((layer.dense_weight() - weight).norm() / weight.norm().clamp_min(1e-30)).item()


def _refine(layer: GBLRLinear, weight: Tensor, macs: int, steps: int, lr: float) -> GBLRLinear:
    """Proximal refinement; returns the best (eval-mode error) state seen."""
    optimizer = torch.optim.Adam(param_groups(layer, lr=lr, structure_lr=lr))
    # revive=True and the uniform cut: the search as measured (docs/BENCHMARKS.md),
    # removed components free to come back while it fits the weights.
    config = LearnerConfig(
        sigma=(10.0, 100.0),
        revive=True,
        cut_exponent=0.0,
        fill_budget=False,
        hold_narrow_sides=0,
    )
    learner = StructureLearner(layer, config, budget_macs=macs, total_steps=steps)
    energy = weight.pow(2).sum().clamp_min(1e-30)
    best_error, best_state = (
        _error(layer, weight),
        {k: v.clone() for k, v in layer.state_dict().items()},
    )
    check_every = max(1, steps // 10)
    layer.train()
    for step in range(steps):
        loss = (layer.dense_weight() - weight).pow(2).sum() / energy
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.step()
        if (step + 1) % check_every == 0 or step + 1 == steps:
            error = _error(layer, weight)
            if error < best_error and layer.flops() <= macs:
                best_error = error
                best_state = {k: v.clone() for k, v in layer.state_dict().items()}
            layer.train()
    layer.load_state_dict(best_state)
    return layer.eval()


def fit_dense(
    weight: Tensor,
    budget: float | int | None = None,
    *,
    budget_macs: int | None = None,
    rank_per_component: int = 1,
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
) -> GBLRLinear:
    """A bias-free [`GBLRLinear`][gblr.layers.linear.GBLRLinear] approximating ``weight`` within a
    MAC budget.

    Args:
        weight: ``(out, in)`` dense matrix (any float dtype, CPU or CUDA), at least one
            row and one column. The search runs in float32 (float64 for float64 input)
            on the matrix's device.
        budget: a fraction in (0, 1] of the ``out * in`` MACs per row (the int ``1`` is
            1.0, as in [`gblr.convert`][]; other ints are refused: an absolute count
            goes to ``budget_macs``).
        budget_macs: the budget as an absolute count of MACs per row (an int). Exactly
            one of ``budget`` and ``budget_macs``. A budget below one component
            (``2 * rank_per_component`` MACs) is a ``ValueError`` naming that minimum.
        rank_per_component: ``r`` of every component.
        steps: proximal refinement steps (0: SVD and greedy pursuit only).
        lr: Adam learning rate of the refinement (factors and structure).
        seed: seeds the randomized SVDs and the refinement; equal seeds give equal layers.

    Returns:
        [`GBLRLinear`][gblr.layers.linear.GBLRLinear] in eval mode, ``flops() <= budget``, on
        ``weight``'s device, in float32 (float64 for float64 input), ``sigma = inf``. Its relative
        Frobenius error is at most that of the truncated SVD with the same MAC budget.

    Examples:
        >>> import torch, gblr
        >>> weight = torch.block_diag(torch.randn(8, 8), torch.randn(8, 8))
        >>> layer = gblr.fit_dense(weight, 0.6, steps=0)
        >>> layer.flops() <= 0.6 * 16 * 16
        True
        >>> gblr.fit_dense(weight, budget_macs=40, steps=0).flops() <= 40
        True
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError("weight must be a 2-D floating-point torch.Tensor (out, in)")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"weight must have at least one row and one column, got shape {tuple(weight.shape)}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite (it holds NaN or inf)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    m, n = weight.shape
    if isinstance(rank_per_component, bool) or not isinstance(rank_per_component, int):
        raise TypeError(f"rank_per_component must be a positive int, got {rank_per_component!r}")
    if not 1 <= rank_per_component <= min(m, n):
        raise ValueError(
            f"rank_per_component must be in [1, min(out, in) = {min(m, n)}], "
            f"got {rank_per_component}"
        )
    macs = fraction_budget_macs(
        budget,
        budget_macs,
        m * n,
        fraction_name="budget",
        macs_name="budget_macs",
        minimum=2 * rank_per_component,
        minimum_reason=(
            f"one component: one row and one column at rank {rank_per_component}; "
            "below it the layer would be the zero matrix"
        ),
    )
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weight = weight.detach().to(dtype)

    with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
        torch.manual_seed(seed)
        svd = _svd_layer(weight, macs, rank_per_component)
        candidates = [
            layer
            for layer in (
                svd,
                # SVD plus blocks bought with the MACs whole ranks leave over
                None if svd is None else _greedy_layer(weight, macs, rank_per_component, svd),
                _greedy_layer(weight, macs, rank_per_component),
            )
            if layer is not None
        ]
        if not candidates:  # not reached: a budget of one component buys a greedy one
            return empty_layer(weight, rank_per_component)
        errors = [_error(layer, weight) for layer in candidates]
        best = candidates[min(range(len(candidates)), key=errors.__getitem__)]
        if steps > 0:
            refined = _refine(copy.deepcopy(best), weight, macs, steps, lr)
            if _error(refined, weight) <= min(errors):
                best = refined
    with torch.no_grad():
        # Exact masks: in training mode the layer computes what it computes in eval until
        # a structure learner sets its own sigma schedule.
        best.sigma.fill_(math.inf)
    return best.eval()
