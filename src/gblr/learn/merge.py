"""Merging pairs of GBLR components whose sum is one cheaper component.

Two rank-``r`` components whose blocks, added up over the smallest box holding both, are
rank ``r`` (to a tolerance) can be replaced by one component over that box. When the box's
row and column intervals cost less than the two pairs of intervals, this saves MACs at no
cost in accuracy, and the budget learner gives the freed MACs to whatever needs them.

Why this matters for learning: the proximal learner sometimes covers one block with two
components (each holding part of its rows, with the same column vector). Gradient steps
cannot join them: growing one over the other costs budget that a tight target does not
have. On the planted-structure benchmark (``benchmarks/bench_learner.py``) that was the
failure of one of the two seeds that missed at 1.1x the planted cost.
"""

from __future__ import annotations

import numpy
import torch
from torch import Tensor, nn

from ..layers.base import GBLRMatrixMixin
from ..ops.gaudi import boxcar_mask
from .groups import gblr_layers

__all__ = ["merge_components"]


def _check_fraction(name: str, value: object) -> float:
    """``value`` as a float in ``[0, 1)`` (a tolerance or a fraction), else a clear error.

    Raises:
        TypeError: not a real number (bools refused).
        ValueError: outside ``[0, 1)`` (NaN included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _spans(starts: Tensor, lengths: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Smallest circular interval holding intervals ``i`` and ``j``, for all pairs.

    Args:
        starts, lengths: ``(K,)`` int64 integer intervals on a circle of ``n`` cells.

    Returns:
        ``(start, length)``, each ``(K, K)`` int64; ``length <= n``.
    """
    s_i, s_j = starts[:, None], starts[None, :]
    l_i, l_j = lengths[:, None], lengths[None, :]
    from_i = torch.maximum(l_i, torch.remainder(s_j - s_i, n) + l_j)
    from_j = torch.maximum(l_j, torch.remainder(s_i - s_j, n) + l_i)
    use_i = from_i <= from_j
    start = torch.where(use_i, s_i.expand_as(from_i), s_j.expand_as(from_j))
    length = torch.minimum(torch.where(use_i, from_i, from_j), torch.tensor(n))
    return start, length


def _masked_factors(layer: GBLRMatrixMixin) -> tuple[Tensor, Tensor]:
    """The exact (boxcar-masked) factors ``(K, r, rows)`` and ``(K, r, cols)`` in float64
    (in either mode: ``layer.masks()`` gives Gaudi masks while training)."""
    row_mask = boxcar_mask(layer.widths[1], layer.locations[1], layer.rows, torch.float64)
    col_mask = boxcar_mask(layer.widths[0], layer.locations[0], layer.cols, torch.float64)
    u = layer.U.detach().to(torch.float64) * row_mask.unsqueeze(1)
    v = layer.V.detach().to(torch.float64) * col_mask.unsqueeze(1)
    return u, v


def _closest_factors(
    new_u: Tensor, new_v: Tensor, old_u: Tensor, old_v: Tensor
) -> tuple[Tensor, Tensor]:
    """Factors of ``new_u^T new_v`` as close as possible to the kept component's old ones.

    ``new_u^T new_v`` is unchanged by ``new_u -> Q new_u, new_v -> Q^{-T} new_v``. The
    optimizer's state (Adam's moments) belongs to the old entries, so a sign flip or a
    rescaled split would point it the wrong way. Rank 1: the sign and the scale that
    minimise ``|u - u_old|^2 + |v - v_old|^2`` (the roots of a quartic). Higher ranks:
    the orthogonal ``Q`` of the Procrustes problem that aligns ``new_u`` with ``old_u``,
    then the sign and scale of each row as for rank 1.

    Args:
        new_u: ``(r, rows)``; new_v: ``(r, cols)``; old_u, old_v: the same shapes.

    Returns:
        ``(u, v)`` with ``u^T v == new_u^T new_v``.
    """
    if new_u.shape[0] > 1:
        left, _, right = torch.linalg.svd(old_u @ new_u.T)
        rotation = left @ right  # orthogonal: Q^{-T} = Q
        new_u, new_v = rotation @ new_u, rotation @ new_v
    # Per row, f(s) = |s u - u_old|^2 + |v / s - v_old|^2 over s != 0 (s < 0 flips the
    # sign); f'(s) = 0 is the quartic uu s^4 - uo s^3 + vo s - vv = 0, whose real roots
    # are compared (r is small).
    uu, vv = new_u.pow(2).sum(1).tolist(), new_v.pow(2).sum(1).tolist()
    uo, vo = (new_u * old_u).sum(1).tolist(), (new_v * old_v).sum(1).tolist()
    scales = []
    for a, b, c, d in zip(uu, uo, vo, vv):
        roots = numpy.roots([a, -b, 0.0, c, -d])
        real = [z.real for z in roots if abs(z.imag) <= 1e-9 * abs(z) and z.real != 0]
        candidates = real or [(d / a) ** 0.25]
        scales.append(min(candidates, key=lambda z: a * z * z - 2 * b * z + d / z**2 - 2 * c / z))
    scale = torch.tensor(scales, dtype=new_u.dtype, device=new_u.device)[:, None]
    return new_u * scale, new_v / scale


@torch.no_grad()
def _merge_layer(layer: GBLRMatrixMixin, tolerance: float) -> int:
    r = layer.rank_per_component
    col_len, row_len = layer.interval_lengths()
    live = ((row_len > 0) & (col_len > 0)).nonzero().flatten()
    if live.numel() < 2:
        return 0
    col_start, row_start = layer.interval_starts()
    row_len, col_len = row_len[live].cpu(), col_len[live].cpu()
    row_start, col_start = row_start[live].cpu(), col_start[live].cpu()
    row_span_start, row_span = _spans(row_start, row_len, layer.rows)
    col_span_start, col_span = _spans(col_start, col_len, layer.cols)
    own = row_len + col_len
    saving = (own[:, None] + own[None, :]) - (row_span + col_span)
    pairs = torch.triu((saving > 0), diagonal=1).nonzero()
    if pairs.numel() == 0:
        return 0

    u, v = _masked_factors(layer)
    u, v = u[live].flatten(0, 1), v[live].flatten(0, 1)  # (L r, rows), (L r, cols)
    # The pair's block is X^T Y with X = [u_i; u_j] (2r, rows), Y = [v_i; v_j]; its
    # squared singular values are the eigenvalues of (X X^T)(Y Y^T), read off the Grams.
    gram_u, gram_v = u @ u.T, v @ v.T
    if r == 1:
        # 2 x 2 case in closed form over all pairs at once (no gather, no eig): with
        # tr = ||S||^2 and det = det(X X^T) det(Y Y^T), the small eigenvalue is
        # 2 det / (tr + sqrt(tr^2 - 4 det)), which avoids cancellation when it is tiny.
        first, second = pairs[:, 0].to(gram_u.device), pairs[:, 1].to(gram_u.device)
        a_u, b_u, c_u = gram_u[first, first], gram_u[first, second], gram_u[second, second]
        a_v, b_v, c_v = gram_v[first, first], gram_v[first, second], gram_v[second, second]
        energy = a_u * a_v + 2 * b_u * b_v + c_u * c_v
        det = ((a_u * c_u - b_u * b_u) * (a_v * c_v - b_v * b_v)).clamp_min(0.0)
        root = (energy * energy - 4 * det).clamp_min(0.0).sqrt()
        residual = 2 * det / (energy + root).clamp_min(torch.finfo(energy.dtype).tiny)
    else:
        index = (pairs[:, :, None] * r + torch.arange(r)).flatten(1).to(gram_u.device)
        gx = gram_u[index[:, :, None], index[:, None, :]]  # (P, 2r, 2r)
        gy = gram_v[index[:, :, None], index[:, None, :]]
        eigenvalues = torch.linalg.eigvals(gx @ gy).real.clamp_min(0.0).sort(dim=1).values
        energy = eigenvalues.sum(dim=1)
        residual = eigenvalues[:, :r].sum(dim=1)
    fits = (energy > 0) & (residual <= tolerance * energy)
    if not bool(fits.any()):
        return 0

    # Greedy by saving: each component joins at most one merge per call.
    candidates = pairs[fits.cpu()]
    order = saving[candidates[:, 0], candidates[:, 1]].argsort(descending=True)
    taken: set[int] = set()
    merged = 0
    for a, b in candidates[order].tolist():
        if a in taken or b in taken:
            continue
        taken.update((a, b))
        keep, drop = int(live[a]), int(live[b])
        x = torch.cat([u[a * r : (a + 1) * r], u[b * r : (b + 1) * r]])  # (2r, rows)
        y = torch.cat([v[a * r : (a + 1) * r], v[b * r : (b + 1) * r]])
        # X^T Y = Qx (Rx Ry^T) Qy^T: the rank-r truncation from the SVD of a 2r x 2r core.
        q_x, r_x = torch.linalg.qr(x.T)
        q_y, r_y = torch.linalg.qr(y.T)
        left, singular, right = torch.linalg.svd(r_x @ r_y.T)
        new_u = (q_x @ left[:, :r] * singular[:r]).T  # (r, rows), zero outside the intervals
        new_v = (q_y @ right[:r].T).T  # (r, cols), orthonormal rows
        new_u, new_v = _closest_factors(
            new_u, new_v, u[a * r : (a + 1) * r], v[a * r : (a + 1) * r]
        )
        rows = (row_span_start[a, b] + torch.arange(int(row_span[a, b]))) % layer.rows
        cols = (col_span_start[a, b] + torch.arange(int(col_span[a, b]))) % layer.cols
        rows, cols = rows.to(layer.U.device), cols.to(layer.V.device)
        # Entries outside the new box keep their values: they are what gives a width its
        # gradient to grow, as for any other component.
        layer.U[keep][:, rows] = new_u[:, rows].to(layer.U.dtype)
        layer.V[keep][:, cols] = new_v[:, cols].to(layer.V.dtype)
        layer.widths[1, keep] = int(row_span[a, b]) / layer.rows
        layer.widths[0, keep] = int(col_span[a, b]) / layer.cols
        layer.locations[1, keep] = int(row_span_start[a, b]) / layer.rows
        layer.locations[0, keep] = int(col_span_start[a, b]) / layer.cols
        # Zero factors as well as widths: a dead component with its old factors would get
        # a width gradient and could grow back over the block it was merged into.
        layer.widths[:, drop] = 0.0
        layer.U[drop] = 0.0
        layer.V[drop] = 0.0
        merged += 1
    return merged


def merge_components(model: nn.Module, tolerance: float = 1e-3) -> int:
    """Merge pairs of components whose sum is one component over a cheaper box (in place).

    For every GBLR layer and every pair of live components ``i, j``: the exact blocks
    ``U_i^T V_i + U_j^T V_j`` (boxcar intervals) are summed over the smallest box holding
    both; when that box's ``r (|R| + |C|)`` is below the two components' MACs and the
    sum's best rank-``r`` approximation leaves at most ``tolerance`` of its squared
    Frobenius norm, component ``i`` becomes that approximation over the box and ``j``
    dies (zero widths and factors). Pairs are taken greedily by MACs saved, each
    component in at most one merge per call. The eval-mode weight changes by at most
    ``sqrt(tolerance)`` of the merged blocks' norm; with ``tolerance=0`` only exact merges
    (up to float64 rounding of the test) happen.

    Args:
        model: a GBLR layer or a module containing them.
        tolerance: relative squared error allowed per merge, in ``[0, 1)``.

    Returns:
        Number of merges made.

    Examples:
        >>> import torch, gblr
        >>> layer = gblr.GBLRLinear(8, 8, num_components=2, bias=False,
        ...     widths=[[0.5, 0.5], [0.25, 0.25]], locations=[[0.0, 0.0], [0.0, 0.25]])
        >>> with torch.no_grad():
        ...     layer.V[1] = layer.V[0]  # same columns: one rank-1 block of 4 rows
        >>> gblr.merge_components(layer), layer.flops()
        (1, 8)
    """
    tolerance = _check_fraction("tolerance", tolerance)
    layers = [layer for _, layer in gblr_layers(model)]
    if not layers:
        raise ValueError("model has no GBLR layer (GBLRLinear or GBLRConv2d)")
    return sum(_merge_layer(layer, tolerance) for layer in layers)
