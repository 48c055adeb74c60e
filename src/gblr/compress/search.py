"""Fit a GBLR layer to a dense matrix under a MAC budget (DESIGN.md §2.4).

``fit_dense`` runs three stages and returns the best of them, all within the budget:

1. **Truncated SVD** at the largest rank the budget pays for (low-rank is a GBLR special
   case, so the result is never worse than SVD at the same MACs).
2. **Greedy block pursuit** from the matrix's magnitude structure: repeatedly take the
   residual's leading singular pair, choose the circular row and column intervals on
   which it is concentrated (the pair that captures the most energy per MAC), fit the
   covered block by its truncated SVD, subtract, until the budget is spent.
3. **Proximal refinement** of the better start: Adam on factors, widths and locations
   with the :class:`gblr.StructureLearner` budget projection keeping the cost exact.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..cost import budget_macs
from ..layers.linear import GBLRLinear
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


def _indices(start: int, length: int, size: int, device: torch.device) -> Tensor:
    return (torch.arange(length, device=device) + start) % size


def _svd_layer(weight: Tensor, macs: int, rank_per_component: int) -> GBLRLinear | None:
    m, n = weight.shape
    r = rank_per_component
    rank = r * (macs // (r * (m + n)))
    rank = min(rank, r * (min(m, n) // r))
    if rank == 0:
        return None
    left, singular, right = torch.linalg.svd(weight, full_matrices=False)
    k = rank // r
    factors_u = (left[:, :rank] * singular[:rank]).t().reshape(k, r, m)
    factors_v = right[:rank].reshape(k, r, n)
    full = [(0, m)] * k, [(0, n)] * k
    return GBLRLinear.from_intervals(factors_u, factors_v, full[0], full[1])


def _greedy_layer(weight: Tensor, macs: int, rank_per_component: int) -> GBLRLinear | None:
    m, n = weight.shape
    r = rank_per_component
    device = weight.device
    residual = weight.clone()
    factors_u, factors_v, row_intervals, col_intervals = [], [], [], []
    remaining = macs
    max_components = 4 * max(m, n)
    while remaining >= 2 * r and len(factors_u) < max_components:
        left, _, right = torch.svd_lowrank(residual, q=min(r + 4, min(m, n)), niter=3)
        row_magnitude, col_magnitude = left[:, 0].abs(), right[:, 0].abs()
        best = None
        row_candidates = {_circular_support(row_magnitude, t) for t in _SUPPORT_THRESHOLDS}
        col_candidates = {_circular_support(col_magnitude, t) for t in _SUPPORT_THRESHOLDS}
        for rows in sorted(row_candidates):
            for cols in sorted(col_candidates):
                cost = r * (rows[1] + cols[1])
                if cost > remaining:
                    continue
                row_index = _indices(*rows, m, device)
                col_index = _indices(*cols, n, device)
                block = residual[row_index][:, col_index]
                captured = (block @ right[col_index, 0]).pow(2).sum().item()
                score = captured / cost
                if best is None or score > best[0]:
                    best = (score, rows, cols, row_index, col_index)
        if best is None or best[0] <= 0:
            break
        _, rows, cols, row_index, col_index = best
        block = residual[row_index][:, col_index]
        rank = min(r, rows[1], cols[1])
        block_left, block_singular, block_right = torch.linalg.svd(block, full_matrices=False)
        u = weight.new_zeros(r, m)
        v = weight.new_zeros(r, n)
        u[:rank, row_index] = (block_left[:, :rank] * block_singular[:rank]).t()
        v[:rank, col_index] = block_right[:rank]
        residual[row_index[:, None], col_index] -= u[:, row_index].t() @ v[:, col_index]
        factors_u.append(u)
        factors_v.append(v)
        row_intervals.append(rows)
        col_intervals.append(cols)
        remaining -= r * (rows[1] + cols[1])
    if not factors_u:
        return None
    _backfit(weight, factors_u, factors_v, row_intervals, col_intervals, sweeps=3)
    return GBLRLinear.from_intervals(
        torch.stack(factors_u), torch.stack(factors_v), row_intervals, col_intervals
    )


def _backfit(
    weight: Tensor,
    factors_u: list[Tensor],
    factors_v: list[Tensor],
    row_intervals: list[tuple[int, int]],
    col_intervals: list[tuple[int, int]],
    sweeps: int,
) -> None:
    """Block coordinate descent on the factors with the intervals fixed (in place).

    Each component in turn is refitted as the truncated SVD of what the others leave of
    ``weight`` on its block, which repairs the greedy pass where blocks overlap.
    """
    m, n = weight.shape
    device = weight.device
    approximation = sum(u.t() @ v for u, v in zip(factors_u, factors_v))
    for _ in range(sweeps):
        for k, (rows, cols) in enumerate(zip(row_intervals, col_intervals)):
            row_index = _indices(*rows, m, device)
            col_index = _indices(*cols, n, device)
            u, v = factors_u[k], factors_v[k]
            own = u[:, row_index].t() @ v[:, col_index]
            target = (weight - approximation)[row_index][:, col_index] + own
            rank = min(u.shape[0], rows[1], cols[1])
            left, singular, right = torch.linalg.svd(target, full_matrices=False)
            u.zero_()
            v.zero_()
            u[:rank, row_index] = (left[:, :rank] * singular[:rank]).t()
            v[:rank, col_index] = right[:rank]
            new = u[:, row_index].t() @ v[:, col_index]
            approximation[row_index[:, None], col_index] += new - own


def _error(layer: GBLRLinear | None, weight: Tensor) -> float:
    if layer is None:
        return 1.0
    layer.eval()
    with torch.no_grad():
        return ((layer.dense_weight() - weight).norm() / weight.norm().clamp_min(1e-30)).item()


def _refine(layer: GBLRLinear, weight: Tensor, macs: int, steps: int, lr: float) -> GBLRLinear:
    """Proximal refinement; returns the best (eval-mode error) state seen."""
    optimizer = torch.optim.Adam(param_groups(layer, lr=lr, structure_lr=lr))
    learner = StructureLearner(layer, target=macs, sigma=(10.0, 100.0), total_steps=steps)
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
    budget: float | int,
    *,
    rank_per_component: int = 1,
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
) -> GBLRLinear:
    """A bias-free :class:`GBLRLinear` approximating ``weight`` within a MAC budget.

    Args:
        weight: ``(out, in)`` dense matrix (any float dtype, CPU or CUDA). The search runs
            in float32 (float64 for float64 input) on the matrix's device.
        budget: float in (0, 1]: fraction of ``out * in`` MACs per row; int: absolute MACs.
        rank_per_component: ``r`` of every component.
        steps: proximal refinement steps (0: SVD and greedy pursuit only).
        lr: Adam learning rate of the refinement (factors and structure).
        seed: seeds the randomized SVDs and the refinement; equal seeds give equal layers.

    Returns:
        :class:`GBLRLinear` in eval mode, ``flops() <= budget``, on ``weight``'s device,
        in float32 (float64 for float64 input). Its relative Frobenius error is at most
        that of the truncated SVD with the same MAC budget.

    Example:
        >>> import torch, gblr
        >>> weight = torch.block_diag(torch.randn(8, 8), torch.randn(8, 8))
        >>> layer = gblr.fit_dense(weight, 0.6, steps=0)
        >>> layer.flops() <= 0.6 * 16 * 16
        True
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError("weight must be a 2-D floating-point torch.Tensor (out, in)")
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
    macs = budget_macs(budget, m * n)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weight = weight.detach().to(dtype)

    with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
        torch.manual_seed(seed)
        candidates = [
            layer
            for layer in (
                _svd_layer(weight, macs, rank_per_component),
                _greedy_layer(weight, macs, rank_per_component),
            )
            if layer is not None
        ]
        if not candidates:  # the budget pays for nothing: the zero matrix, one dead component
            empty = [(0, 0)]
            return GBLRLinear.from_intervals(
                weight.new_zeros(1, rank_per_component, m),
                weight.new_zeros(1, rank_per_component, n),
                empty,
                empty,
            ).eval()
        errors = [_error(layer, weight) for layer in candidates]
        best = candidates[min(range(len(candidates)), key=errors.__getitem__)]
        if steps > 0:
            refined = _refine(copy.deepcopy(best), weight, macs, steps, lr)
            if _error(refined, weight) <= min(errors):
                best = refined
    return best.eval()
