"""Matrices with a known GBLR structure, for checking that structure learning works."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["planted_blocks"]


def planted_blocks(
    size: int = 64,
    *,
    num_blocks: tuple[int, int] = (3, 5),
    block_sides: tuple[int, int] = (6, 24),
    seed: int = 0,
) -> tuple[Tensor, int]:
    """A ``size x size`` sum of random rank-1 blocks at random circular intervals.

    Blocks may wrap around the edges and overlap. The number of blocks is drawn from
    ``num_blocks`` (inclusive) and each side length from ``block_sides`` (inclusive).

    Args:
        size: matrix side ``n``.
        num_blocks: ``(fewest, most)`` blocks.
        block_sides: ``(shortest, longest)`` interval length.
        seed: random seed (a local generator; the global RNG is untouched).

    Returns:
        ``(target (n, n) float32, planted_cost)``: the MACs per row of the exact GBLR
        representation, ``sum (|R| + |C|)`` over blocks.
    """
    generator = torch.Generator().manual_seed(1000 + seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    if not 1 <= block_sides[0] <= block_sides[1] <= size:
        raise ValueError(f"block_sides must satisfy 1 <= low <= high <= size, got {block_sides}")
    if not 1 <= num_blocks[0] <= num_blocks[1]:
        raise ValueError(f"num_blocks must satisfy 1 <= low <= high, got {num_blocks}")
    target, cost = torch.zeros(size, size), 0
    for _ in range(draw(*num_blocks)):
        row_len, col_len = draw(*block_sides), draw(*block_sides)
        row_start, col_start = draw(0, size - 1), draw(0, size - 1)
        u = torch.randn(row_len, generator=generator)
        v = torch.randn(col_len, generator=generator)
        rows = (torch.arange(row_len) + row_start) % size
        cols = (torch.arange(col_len) + col_start) % size
        target[rows[:, None], cols] += u[:, None] * v[None, :]
        cost += row_len + col_len
    return target, cost
