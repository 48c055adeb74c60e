"""Exact GBLR layers for the paper's special cases (docs/design.md#special-cases).

Each helper returns a bias-free [`GBLRLinear`][gblr.layers.linear.GBLRLinear] whose
``dense_weight()`` equals the given structured matrix and whose ``flops()`` is the cost stated
below:

==================  ===========================================  ==========================
structure           components                                   MACs per input row
==================  ===========================================  ==========================
low-rank ``U V``    ``R / r`` components, all intervals full     ``R (m + n)``
block-low-rank      one rank-``r`` component per grid block      ``r (q m + p n)``; ``p (m + n)``
(``p x q`` grid)                                                 for ``p = q``, ``r = 1``
block-sparse        per nonzero ``b x b`` tile, ``b`` components  ``b (b + 1)`` per tile
                    of row width ``b`` and column width 1
block-diagonal      the block-sparse case on the diagonal        ``b (b + 1)`` per block
==================  ===========================================  ==========================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import check_positive_int
from .linear import GBLRLinear

__all__ = ["block_diagonal", "block_low_rank", "block_sparse", "low_rank"]


def _check_matrix(name: str, weight: object) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D (out, in) matrix, got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):  # as the families refuse it
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")
    return weight


def _pair(name: str, value: object) -> tuple[int, int]:
    """``value`` (an int ``b`` or a pair ``(b, c)``) as two positive ints, naming ``name``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        first, second = value
    else:
        first = second = value
    return check_positive_int(name, first), check_positive_int(name, second)


def _split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total``; the first ``total % parts`` are longer."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _starts(sizes: Sequence[int]) -> list[int]:
    starts, position = [], 0
    for size in sizes:
        starts.append(position)
        position += size
    return starts


class _ComponentList:
    """Accumulates rank-``r`` components as dense column/row vectors with integer intervals."""

    def __init__(self, out_features: int, in_features: int, rank: int, like: Tensor) -> None:
        self.shape = (out_features, in_features)
        self.rank = rank
        self.like = like
        self.u: list[Tensor] = []
        self.v: list[Tensor] = []
        self.rows: list[tuple[int, int]] = []
        self.cols: list[tuple[int, int]] = []

    def add(self, u: Tensor, v: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> None:
        """``u``: (r, len_rows) placed at ``rows``; ``v``: (r, len_cols) placed at ``cols``."""
        m, n = self.shape
        full_u = self.like.new_zeros(self.rank, m)
        full_v = self.like.new_zeros(self.rank, n)
        full_u[:, rows[0] : rows[0] + rows[1]] = u
        full_v[:, cols[0] : cols[0] + cols[1]] = v
        self.u.append(full_u)
        self.v.append(full_v)
        self.rows.append(rows)
        self.cols.append(cols)

    def add_dense_block(self, block: Tensor, row_start: int, col_start: int) -> None:
        """A dense block as rank-1 components, one per column (or per row, if cheaper).

        Per column: ``w`` components of row width ``h`` and column width 1, cost
        ``w (h + 1)``; per row: ``h (w + 1)``. All-zero columns (rows) are skipped.
        """
        h, w = block.shape
        one = block.new_ones(1, 1)
        if w * (h + 1) <= h * (w + 1):
            for j in range(w):
                if bool((block[:, j] != 0).any()):
                    self.add(block[:, j].unsqueeze(0), one, (row_start, h), (col_start + j, 1))
        else:
            for i in range(h):
                if bool((block[i] != 0).any()):
                    self.add(one, block[i : i + 1], (row_start + i, 1), (col_start, w))

    def build(self) -> GBLRLinear:
        if not self.u:
            # The zero matrix: one dead component, costing nothing.
            self.add(
                self.like.new_zeros(self.rank, 0), self.like.new_zeros(self.rank, 0), (0, 0), (0, 0)
            )
        factors_u = torch.stack(self.u, dim=0)  # (K, r, m)
        factors_v = torch.stack(self.v, dim=0)  # (K, r, n)
        layer = GBLRLinear.from_intervals(factors_u, factors_v, self.rows, self.cols)
        return layer.eval()


def low_rank(factor_u: Tensor, factor_v: Tensor, *, rank_per_component: int = 1) -> GBLRLinear:
    """GBLR layer equal to the low-rank matrix ``U V`` (all intervals full).

    Args:
        factor_u: ``(out, R)``.
        factor_v: ``(R, in)``.
        rank_per_component: ``r``; must divide ``R``. ``R / r`` components are used.

    Returns:
        Bias-free [`GBLRLinear`][gblr.layers.linear.GBLRLinear] in eval mode, ``flops() == R * (out
        + in)``.

    Examples:
        >>> import torch, gblr
        >>> u, v = torch.randn(48, 4), torch.randn(4, 32)
        >>> layer = gblr.special.low_rank(u, v)
        >>> torch.allclose(layer.dense_weight(), u @ v, atol=1e-5), layer.flops()  # 4 (48 + 32)
        (True, 320)
    """
    _check_matrix("factor_u", factor_u)
    _check_matrix("factor_v", factor_v)
    if factor_u.dtype != factor_v.dtype:  # the layer took factor_u's, casting factor_v
        raise TypeError(
            f"factor_u and factor_v must have one dtype, got {factor_u.dtype} and {factor_v.dtype}"
        )
    r = check_positive_int("rank_per_component", rank_per_component)
    (m, rank), (rank_v, n) = factor_u.shape, factor_v.shape
    if rank != rank_v:
        raise ValueError(f"factor_u is (out, {rank}) but factor_v is ({rank_v}, in): ranks differ")
    if rank % r:
        raise ValueError(f"rank_per_component={r} must divide the rank R={rank}")
    k = rank // r
    factors_u = factor_u.t().reshape(k, r, m)
    factors_v = factor_v.reshape(k, r, n)
    full = [(0, m)] * k, [(0, n)] * k
    return GBLRLinear.from_intervals(factors_u, factors_v, full[0], full[1]).eval()


def block_low_rank(
    weight: Tensor, grid: int | tuple[int, int], *, rank_per_component: int = 1
) -> GBLRLinear:
    """GBLR layer with one rank-``r`` component per block of a ``p x q`` grid.

    Rows are cut into ``p`` contiguous pieces and columns into ``q`` (sizes differ by at
    most one; the first pieces are the larger). Each block is replaced by its best
    rank-``r`` approximation (truncated SVD), so the result equals ``weight`` exactly when
    every block has rank ``<= r`` — the block-low-rank (Monarch without permutations) case.

    Args:
        weight: ``(out, in)`` matrix.
        grid: ``p`` (square grid) or ``(p, q)``.
        rank_per_component: ``r``, at most the smallest block side.

    Returns:
        Bias-free [`GBLRLinear`][gblr.layers.linear.GBLRLinear] in eval mode, ``flops() == r (q out
        + p in)``.

    Examples:
        >>> import torch, gblr
        >>> layer = gblr.special.block_low_rank(torch.randn(48, 48), 4)
        >>> layer.live_components(), layer.flops()  # 16 blocks, 4 (48 + 48) MACs per row
        (16, 384)
    """
    weight = _check_matrix("weight", weight)
    p, q = _pair("grid", grid)
    m, n = weight.shape
    if p > m or q > n:
        raise ValueError(f"grid={grid!r} has more blocks than rows/columns of a {m}x{n} matrix")
    r = check_positive_int("rank_per_component", rank_per_component)
    row_sizes, col_sizes = _split_sizes(m, p), _split_sizes(n, q)
    if r > min(min(row_sizes), min(col_sizes)):
        raise ValueError(
            f"rank_per_component={r} exceeds the smallest block side "
            f"{min(min(row_sizes), min(col_sizes))}"
        )
    parts = _ComponentList(m, n, r, weight)
    for row_start, h in zip(_starts(row_sizes), row_sizes):
        for col_start, w in zip(_starts(col_sizes), col_sizes):
            block = weight[row_start : row_start + h, col_start : col_start + w]
            # (no half-precision SVD on the CPU: in float32, then back to the weight's dtype)
            computed = block if block.dtype in (torch.float32, torch.float64) else block.float()
            left, singular, right = torch.linalg.svd(computed, full_matrices=False)
            left, singular, right = (t.to(block.dtype) for t in (left, singular, right))
            parts.add((left[:, :r] * singular[:r]).t(), right[:r], (row_start, h), (col_start, w))
    return parts.build()


def block_sparse(weight: Tensor, block_size: int | tuple[int, int]) -> GBLRLinear:
    """GBLR layer equal to a block-sparse matrix: every nonzero tile becomes components.

    The matrix is tiled from the top-left corner into ``bh x bw`` tiles (edge tiles are
    smaller). Each tile holding a nonzero becomes rank-1 components of row width ``bh`` and
    column width 1 (or the transpose, if cheaper), so a dense ``b x b`` tile costs
    ``b (b + 1)`` MACs per input row, within a factor ``1 + 1/b`` of the tile's own.
    Zero tiles (and all-zero columns inside a tile) cost nothing.

    Args:
        weight: ``(out, in)`` matrix.
        block_size: ``b`` or ``(bh, bw)``.

    Returns:
        Bias-free [`GBLRLinear`][gblr.layers.linear.GBLRLinear] in eval mode with ``dense_weight()
        == weight``.

    Examples:
        >>> import torch, gblr
        >>> weight = torch.zeros(8, 8)
        >>> weight[:4, 4:] = torch.randn(4, 4)  # one nonzero 4 x 4 tile
        >>> layer = gblr.special.block_sparse(weight, 4)
        >>> torch.allclose(layer.dense_weight(), weight, atol=1e-6), layer.flops()  # 4 (4 + 1)
        (True, 20)
    """
    weight = _check_matrix("weight", weight)
    bh, bw = _pair("block_size", block_size)
    m, n = weight.shape
    parts = _ComponentList(m, n, 1, weight)
    for row_start in range(0, m, bh):
        for col_start in range(0, n, bw):
            tile = weight[row_start : row_start + bh, col_start : col_start + bw]
            if bool((tile != 0).any()):
                parts.add_dense_block(tile, row_start, col_start)
    return parts.build()


def block_diagonal(blocks: Sequence[Tensor]) -> GBLRLinear:
    """GBLR layer equal to ``torch.block_diag(*blocks)`` (blocks may be rectangular).

    Args:
        blocks: non-empty sequence of 2-D ``(h_i, w_i)`` tensors.

    Returns:
        Bias-free [`GBLRLinear`][gblr.layers.linear.GBLRLinear] in eval mode of shape ``(sum h_i,
        sum w_i)``; ``flops() == sum_i min(w_i (h_i + 1), h_i (w_i + 1))``, i.e. ``b (b + 1)`` per
        square ``b x b`` block.

    Examples:
        >>> import torch, gblr
        >>> blocks = [torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4)]
        >>> layer = gblr.special.block_diagonal(blocks)
        >>> torch.allclose(layer.dense_weight(), torch.block_diag(*blocks), atol=1e-6)
        True
    """
    if isinstance(blocks, Tensor) or not isinstance(blocks, Sequence) or len(blocks) == 0:
        raise TypeError("blocks must be a non-empty sequence (list or tuple) of 2-D tensors")
    checked = [_check_matrix(f"blocks[{i}]", block) for i, block in enumerate(blocks)]
    m = sum(block.shape[0] for block in checked)
    n = sum(block.shape[1] for block in checked)
    parts = _ComponentList(m, n, 1, checked[0])
    row_start = col_start = 0
    for block in checked:
        parts.add_dense_block(block, row_start, col_start)
        row_start += block.shape[0]
        col_start += block.shape[1]
    return parts.build()
