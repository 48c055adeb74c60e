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

from typing import Any

import torch
from torch import Tensor, nn

from ..layers.base import GBLRMatrixMixin
from .config import MergeConfig
from .factors import check_fraction, circular_spans, closest_factors, exact_factors
from .groups import gblr_layers
from .passes import LearnerPass

__all__ = ["MergePass", "merge_components"]


@torch.no_grad()
def _merge_layer(layer: GBLRMatrixMixin, tolerance: float, allowed: Tensor | None = None) -> int:
    """Merge one layer's pairs (see `merge_components`); only the components ``allowed``
    (``(K,)`` bool, default all) take part. Returns the number of merges."""
    r = layer.rank_per_component
    col_len, row_len = layer.interval_lengths()
    live_mask = (row_len > 0) & (col_len > 0)
    if allowed is not None:
        live_mask &= allowed.to(live_mask.device)
    live = live_mask.nonzero().flatten()
    if live.numel() < 2:
        return 0
    col_start, row_start = layer.interval_starts()
    row_len, col_len = row_len[live].cpu(), col_len[live].cpu()
    row_start, col_start = row_start[live].cpu(), col_start[live].cpu()
    row_span_start, row_span = circular_spans(row_start, row_len, layer.rows)
    col_span_start, col_span = circular_spans(col_start, col_len, layer.cols)
    own = row_len + col_len
    saving = (own[:, None] + own[None, :]) - (row_span + col_span)
    pairs = torch.triu((saving > 0), diagonal=1).nonzero()
    if pairs.numel() == 0:
        return 0

    u, v = exact_factors(layer)
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
        new_u, new_v = closest_factors(new_u, new_v, u[a * r : (a + 1) * r], v[a * r : (a + 1) * r])
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
    tolerance = check_fraction("tolerance", tolerance)
    layers = [layer for _, layer in gblr_layers(model)]
    if not layers:
        raise ValueError("model has no GBLR layer (GBLRLinear or GBLRConv2d)")
    return sum(_merge_layer(layer, tolerance) for layer in layers)


class MergePass(LearnerPass):
    """The learner's merge pass ([`gblr.MergeConfig`][]): every ``pass_every`` steps
    after the budget ramp, merge pairs of components of a layer whose summed blocks are
    one cheaper component (as [`merge_components`][gblr.learn.merge.merge_components]). It only
    lowers the MACs.

    Examples:
        >>> import gblr
        >>> from gblr.learn.merge import MergePass
        >>> from gblr.learn.passes import PassSchedule
        >>> merge = MergePass(gblr.MergeConfig(), [gblr.GBLRLinear(8, 8)], PassSchedule(0, 10))
        >>> merge.after_shrink(5); merge.summary()  # not a pass step
        {'merges': 0.0}
    """

    name = "merge"
    counter = "merges"
    config: MergeConfig

    def start(self) -> None:
        self.merges = 0

    def after_shrink(self, step: int) -> None:
        if self.schedule.is_pass_step(step):
            tolerance = self.config.tolerance
            self.merges += sum(
                _merge_layer(layer, tolerance, self.movable(index))
                for index, layer in enumerate(self.layers)
            )

    def state_dict(self) -> dict[str, Any]:
        return {"merges": self.merges}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.merges = int(state.get("merges", 0))  # absent in states saved before merging
