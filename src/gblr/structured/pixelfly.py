"""``PixelflyLinear``: a flat block butterfly sparsity pattern plus a low-rank term.

Pixelated Butterfly (Chen, Dao, Liang, Yang, Song, Rudra, Ré: "Pixelated Butterfly:
Simple and Efficient Sparse Training for Neural Network Models", ICLR 2022) replaces a
dense weight by ``W = S + U V``: ``S`` is block-sparse on the *flat block butterfly*
pattern (the union of the supports of the butterfly factors, taken at block granularity)
and ``U V`` is low rank. The implementation here is written from the paper's description.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.base import check_positive_int
from .base import check_weight, copy_bias, resolve_budget
from .blocksparse import (
    BlockSparseLinear,
    block_grid,
    default_block_size,
    dense_to_tiles,
)

__all__ = ["PixelflyLinear", "butterfly_pattern", "max_butterfly_levels"]

DEFAULT_LOWRANK_FRACTION = 0.5
DEFAULT_REFITS = 20


def max_butterfly_levels(num_block_rows: int, num_block_cols: int) -> int:
    """The number of butterfly strides ``1, 2, 4, ...`` below ``m = min(rows, cols)``:
    ``ceil(log2(m))`` (0 when ``m == 1``)."""
    m = min(num_block_rows, num_block_cols)
    return (m - 1).bit_length()


def butterfly_pattern(num_block_rows: int, num_block_cols: int, levels: int) -> Tensor:
    """``(num_block_rows, num_block_cols)`` bool: the flat block butterfly pattern.

    **Folding rule**: with ``m = min(num_block_rows, num_block_cols)``, block indices are
    folded modulo ``m`` (``i' = i mod m``, ``j' = j mod m``; only the longer side really
    folds), and tile ``(i, j)`` is present when ``i' == j'`` or ``i' XOR j'`` is a power
    of two ``2^k`` with ``k < levels`` (all such strides are below ``m`` when ``levels <=
    max_butterfly_levels``). For a square grid of ``n = 2^L`` blocks and ``levels = L``
    this is the paper's pattern with ``1 + L`` tiles per block row. For ``m`` not a power
    of two, pairs whose XOR falls outside ``[0, m)`` are simply absent. The ``i' == j'``
    tiles (a block diagonal, repeated along the longer side of a rectangular grid) cover
    every block row and column; each further level adds at least one tile.
    """
    m = min(num_block_rows, num_block_cols)
    rows = torch.arange(num_block_rows) % m
    cols = torch.arange(num_block_cols) % m
    xor = rows[:, None] ^ cols[None, :]
    power_of_two = (xor & (xor - 1)) == 0
    return (xor == 0) | (power_of_two & (xor < 2**levels))


def butterfly_positions(num_block_rows: int, num_block_cols: int, levels: int) -> Tensor:
    """``(T, 2)`` long: the pattern's tiles in row-major order."""
    return butterfly_pattern(num_block_rows, num_block_cols, levels).nonzero()


def _check_fraction(lowrank_fraction: object) -> float:
    if isinstance(lowrank_fraction, bool) or not isinstance(lowrank_fraction, (int, float)):
        raise TypeError(f"lowrank_fraction must be a float in [0, 1], got {lowrank_fraction!r}")
    if not 0.0 <= lowrank_fraction <= 1.0:
        raise ValueError(f"lowrank_fraction must be in [0, 1], got {lowrank_fraction}")
    return float(lowrank_fraction)


class PixelflyLinear(BlockSparseLinear):
    """``W = S + U V``: block-sparse ``S`` on the flat block butterfly pattern plus rank
    ``rank`` (Pixelated Butterfly, Chen et al., ICLR 2022).

    ``S`` has ``b x b`` tiles at the positions of `butterfly_pattern` (block rows
    ``ceil(out/b)``, block cols ``ceil(in/b)``, indices folded modulo the shorter side).
    The sparse part is a [`BlockSparseLinear`][gblr.structured.blocksparse.BlockSparseLinear] (this
    class extends it): sizes not divisible by ``b`` are zero-padded the same way (full
    edge tiles computed, padding counted in the cost).

    **Budget split** (``for_budget``/``from_dense``): ``lowrank_fraction`` (default 0.5)
    of the MACs go to the low-rank term, the rest to the sparse part. The sparse part
    takes the most butterfly levels whose tiles fit its share (at least the block
    diagonal, ``levels = 0``, which is always kept); the low-rank term then takes the
    largest rank fitting what is left (at least 1 when ``lowrank_fraction > 0``: levels
    are dropped if needed; none when it is 0); what the rank leaves unused (its rounding
    remainder, or everything beyond ``rank = min(in, out)``) goes back to further levels
    when they fit. So ``flops() <= budget`` always; the smallest
    layer is the block diagonal plus rank 1 (rank 0 when ``lowrank_fraction == 0``).
    **Default block size**: the largest power of two ``<= min(32, in, out)`` whose block
    diagonal fits the sparse share of the budget (and leaves room for rank 1 when
    ``lowrank_fraction > 0``); 1 when none does (``b = 1`` has the smallest diagonal,
    ``max(in, out)`` MACs, so its minimum is the family's).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        block_size: ``b``, a positive int.
        rank: of the low-rank term, ``0 <= rank <= min(in, out)`` (0: no low-rank term).
        butterfly_levels: strides ``2^0 .. 2^(levels-1)`` of the pattern, ``0 <= levels <=
            max_butterfly_levels(ceil(out/b), ceil(in/b))``; ``None``: the maximum.

    Cost: ``num_tiles * b * b + rank * (in + out)`` MACs per input row.

    Shapes:
        input ``(..., in)``, output ``(..., out)``; ``tiles (num_tiles, b, b)``,
        ``positions (num_tiles, 2)`` (long buffer), ``U (out, rank)``, ``V (rank, in)``.

    Examples:
        >>> import torch
        >>> from gblr.structured import PixelflyLinear
        >>> layer = PixelflyLinear.from_dense(torch.randn(64, 64), budget=0.25)
        >>> layer.flops() <= 0.25 * 64 * 64, layer(torch.randn(5, 64)).shape
        (True, torch.Size([5, 64]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int,
        rank: int,
        bias: bool = True,
        *,
        butterfly_levels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        block_size = check_positive_int("block_size", block_size)
        num_block_rows, num_block_cols = block_grid(in_features, out_features, block_size)
        top = max_butterfly_levels(num_block_rows, num_block_cols)
        if butterfly_levels is None:
            butterfly_levels = top
        if isinstance(butterfly_levels, bool) or not isinstance(butterfly_levels, int):
            raise TypeError(f"butterfly_levels must be an int or None, got {butterfly_levels!r}")
        if not 0 <= butterfly_levels <= top:
            raise ValueError(
                f"butterfly_levels must be in [0, {top}] for a {num_block_rows} x "
                f"{num_block_cols} block grid, got {butterfly_levels}"
            )
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be a non-negative int, got {rank!r}")
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in [0, min(in, out) = {min(in_features, out_features)}], got {rank}"
            )
        positions = butterfly_positions(num_block_rows, num_block_cols, butterfly_levels)
        super().__init__(
            in_features, out_features, block_size, positions, bias, device=device, dtype=dtype
        )
        self.butterfly_levels, self.rank = butterfly_levels, rank
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V = nn.Parameter(torch.empty(rank, in_features, **factory))
        # Each part gets half of nn.Linear's default output variance when both exist.
        gain = math.sqrt(0.5) if rank else 1.0
        if rank:
            bound_v, bound_u = math.sqrt(3.0 / in_features), math.sqrt(1.0 / rank) * gain
            with torch.no_grad():
                self.tiles.mul_(gain)
                self.U.uniform_(-bound_u, bound_u)
                self.V.uniform_(-bound_v, bound_v)

    def _matmul(self, x: Tensor) -> Tensor:
        out = super()._matmul(x)
        if self.rank:
            out = out + F.linear(F.linear(x, self.V), self.U)
        return out

    def sparse_weight(self) -> Tensor:
        """``(out, in)``: the butterfly-pattern part ``S``."""
        return super().dense_weight()

    def dense_weight(self) -> Tensor:
        return self.sparse_weight() + self.U @ self.V

    def flops(self) -> int:
        return super().flops() + self.rank * (self.in_features + self.out_features)

    # ------------------------------------------------------------------ budgets
    @staticmethod
    def cost(
        in_features: int, out_features: int, block_size: int, rank: int, butterfly_levels: int
    ) -> int:
        """MACs per row of that configuration (padding included)."""
        rows, cols = block_grid(in_features, out_features, block_size)
        tiles = int(butterfly_pattern(rows, cols, butterfly_levels).sum())
        return tiles * block_size * block_size + rank * (in_features + out_features)

    @classmethod
    def config_for(
        cls,
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        block_size: int | None = None,
        lowrank_fraction: float = DEFAULT_LOWRANK_FRACTION,
    ) -> tuple[int, int, int]:
        """``(block_size, rank, butterfly_levels)`` for ``budget`` (a fraction in
        ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a MAC count), exactly one
        given, under the split rule of the class docstring;
        [`BudgetTooSmallError`][gblr.structured.BudgetTooSmallError] naming the minimum when even
        the smallest layer does not fit."""
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        fraction = _check_fraction(lowrank_fraction)
        unit = in_features + out_features
        min_rank = 1 if fraction > 0 else 0

        def level_costs(b: int) -> list[int]:
            rows, cols = block_grid(in_features, out_features, b)
            return [
                int(butterfly_pattern(rows, cols, levels).sum()) * b * b
                for levels in range(max_butterfly_levels(rows, cols) + 1)
            ]

        def minimum(b: int) -> int:
            return level_costs(b)[0] + min_rank * unit

        if block_size is None:
            candidates = [1 << k for k in range(6) if 1 << k <= min(32, in_features, out_features)]
            floor = min(minimum(b) for b in candidates)
            macs = resolve_budget(budget, budget_macs, out_features, in_features, floor, "Pixelfly")
            share = macs - math.floor(fraction * macs)
            block_size = default_block_size(
                in_features,
                out_features,
                lambda b: level_costs(b)[0] <= share and minimum(b) <= macs,
            )
        else:
            check_positive_int("block_size", block_size)
        macs = resolve_budget(
            budget, budget_macs, out_features, in_features, minimum(block_size), "Pixelfly"
        )
        costs = level_costs(block_size)

        def most_levels(allowed: int) -> int:
            return max((k for k, c in enumerate(costs) if c <= allowed), default=0)

        levels = most_levels(macs - math.floor(fraction * macs))
        rank = 0
        if min_rank:
            while (macs - costs[levels]) // unit < 1:  # terminates: the minimum fits
                levels -= 1
            rank = min((macs - costs[levels]) // unit, in_features, out_features)
        levels = most_levels(macs - rank * unit)
        return block_size, rank, levels

    @classmethod
    def for_budget(
        cls,
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        block_size: int | None = None,
        lowrank_fraction: float = DEFAULT_LOWRANK_FRACTION,
        **kwargs,
    ) -> PixelflyLinear:
        """A randomly initialised layer at the configuration `config_for` picks for
        ``budget`` (a fraction in ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a
        MAC count), exactly one given (``kwargs`` go to the constructor: ``bias``,
        ``device``, ``dtype``)."""
        block_size, rank, levels = cls.config_for(
            in_features,
            out_features,
            budget,
            budget_macs=budget_macs,
            block_size=block_size,
            lowrank_fraction=lowrank_fraction,
        )
        return cls(in_features, out_features, block_size, rank, butterfly_levels=levels, **kwargs)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        bias: Tensor | None = None,
        block_size: int | None = None,
        lowrank_fraction: float = DEFAULT_LOWRANK_FRACTION,
        refits: int = DEFAULT_REFITS,
    ) -> PixelflyLinear:
        """Approximate ``weight`` ``(out, in)`` by ``S + U V`` at the configuration
        `config_for` picks for ``budget`` (a fraction in ``(0, 1]`` of ``out * in``
        MACs) or ``budget_macs`` (a MAC count), exactly one given; ``bias`` ``(out,)`` is
        copied.

        Order: the low-rank term starts as the truncated SVD of ``weight``; then up to
        ``refits`` alternating least-squares sweeps refit ``U`` (with ``V`` fixed) and
        ``V`` (with ``U`` fixed) to the entries **off** the pattern (on the pattern ``S``
        absorbs any residual, so the total error is the off-pattern error; all rows of a
        block row share one pattern, so a sweep is one ``rank x rank`` solve per block
        row/col). The sweeps stop early once the error falls below ``1e-12`` of
        ``||weight||`` or by less than ``1e-6`` of itself. Finally ``S`` = the tiles of
        the residual ``weight - U V`` on the pattern (its optimum given ``U V``), and the
        singular values of ``U V`` are split evenly between the factors. Computed in
        float64 on ``weight``'s device. With ``rank == 0``, ``S`` is just the pattern's
        tiles of ``weight``.
        """
        weight = check_weight(weight)
        if isinstance(refits, bool) or not isinstance(refits, int):
            raise TypeError(f"refits must be a non-negative int, got {refits!r}")
        if refits < 0:
            raise ValueError(f"refits must be a non-negative int, got {refits}")
        out_features, in_features = weight.shape
        block_size, rank, levels = cls.config_for(
            in_features,
            out_features,
            budget,
            budget_macs=budget_macs,
            block_size=block_size,
            lowrank_fraction=lowrank_fraction,
        )
        layer = cls(
            in_features,
            out_features,
            block_size,
            rank,
            bias=False,
            butterfly_levels=levels,
            device=weight.device,
            dtype=weight.dtype,
        )
        work = weight.double()
        left = work.new_zeros(out_features, 0)
        right = work.new_zeros(0, in_features)
        if rank:
            pattern = butterfly_pattern(layer.num_block_rows, layer.num_block_cols, levels)
            left, right = _fit_low_rank(work, pattern.to(work.device), block_size, rank, refits)
        residual = work - left @ right
        grid = dense_to_tiles(residual, block_size)
        with torch.no_grad():
            layer.tiles.copy_(grid[layer.positions[:, 0], layer.positions[:, 1]])
            layer.U.copy_(left)
            layer.V.copy_(right)
        return copy_bias(layer, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, butterfly_levels={self.butterfly_levels}"


def _fit_low_rank(
    weight: Tensor, pattern: Tensor, block_size: int, rank: int, refits: int
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` ``(U, V)`` minimising ``||P(weight - U V)||_F`` where ``P`` keeps the
    entries off the block ``pattern`` ``(nbr, nbc)`` (truncated-SVD start, then ALS)."""
    out_features, in_features = weight.shape
    b = block_size
    num_rows, num_cols = pattern.shape
    observed = (~pattern).to(weight.dtype)  # (nbr, nbc): 1 where the low rank must fit
    entry_mask = observed.repeat_interleave(b, 0).repeat_interleave(b, 1)
    entry_mask = entry_mask[:out_features, :in_features]
    target = weight * entry_mask
    u_svd, singular, vh_svd = torch.linalg.svd(weight, full_matrices=False)
    left, right = u_svd[:, :rank] * singular[:rank], vh_svd[:rank]
    scale = weight.norm().item()

    def error() -> float:
        return (target - (left @ right) * entry_mask).norm().item()

    def solve(factor: Tensor, rhs: Tensor, grid: Tensor, size: int, count: int) -> Tensor:
        # factor (size, rank) per row of the fixed side; gram of each block of it, summed
        # over the observed blocks of the other side; rhs (other, rank).
        blocks = F.pad(factor, (0, 0, 0, count * b - size)).reshape(count, b, rank)
        grams = blocks.transpose(1, 2) @ blocks  # (count, rank, rank)
        systems = torch.einsum("ij,jrs->irs", grid, grams)
        other = rhs.shape[0]
        n_other = grid.shape[0]
        rhs_blocks = F.pad(rhs, (0, 0, 0, n_other * b - other)).reshape(n_other, b, rank)
        solved = rhs_blocks @ torch.linalg.pinv(systems, hermitian=True)
        return solved.reshape(n_other * b, rank)[:other]

    best = error()
    for _ in range(refits):
        if best <= 1e-12 * scale:
            break
        left = solve(right.T, target @ right.T, observed, in_features, num_cols)
        right = solve(left, target.T @ left, observed.T, out_features, num_rows).T
        now = error()
        if best - now <= 1e-6 * best:
            best = min(best, now)
            break
        best = now
    # Balance: U V = Qu (Ru Rv^T) Qv^T; split the core's singular values evenly.
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    a, s, bh = torch.linalg.svd(r_left @ r_right.T)
    root = s.sqrt()
    return q_left @ (a * root), (root[:, None] * bh) @ q_right.T
