"""``BlockDiagLinear``: ``p`` dense blocks on the diagonal."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..layers.base import check_positive_int
from .base import StructuredLinear, check_weight, copy_bias, resolve_budget

__all__ = ["BlockDiagLinear"]


def _split(size: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``size``, as even as possible: the first
    ``size % parts`` pieces are one longer."""
    base, extra = divmod(size, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def _equal_shape_runs(
    out_sizes: list[int], in_sizes: list[int]
) -> list[tuple[int, int, int, int, int]]:
    """``(first, last, col_start, rows, cols)`` for each run of consecutive blocks
    ``first:last`` of one shape ``rows x cols``, whose input pieces start at column
    ``col_start``: at most three runs, since the longer pieces of each side come first."""
    runs, first, col_start = [], 0, 0
    while first < len(out_sizes):
        shape = (out_sizes[first], in_sizes[first])
        last = first
        while last < len(out_sizes) and (out_sizes[last], in_sizes[last]) == shape:
            last += 1
        runs.append((first, last, col_start, *shape))
        col_start += (last - first) * shape[1]
        first = last
    return runs


class BlockDiagLinear(StructuredLinear):
    """A block-diagonal linear layer with ``num_blocks`` blocks.

    Block ``i`` maps input piece ``i`` to output piece ``i``. **Size rule**: when ``in``
    or ``out`` is not a multiple of ``num_blocks``, the pieces are as even as possible
    and the first ``size % num_blocks`` pieces are one longer (``_split``). The blocks are
    stored as ``(num_blocks, ceil(out/p), ceil(in/p))`` tiles, the shorter blocks
    zero-padded, and evaluated by one batched product per run of blocks of one shape (at
    most three runs; one when ``p`` divides both sizes), so the padding never enters a
    product, never learns and costs nothing.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        num_blocks: ``p``, ``1 <= p <= min(in, out)`` (1 is dense).

    Cost: ``sum_i out_i * in_i`` MACs per input row over the blocks' sizes (``out * in /
    p`` when ``p`` divides both).

    Shapes:
        input ``(..., in)``, output ``(..., out)``; ``blocks (p, ceil(out/p), ceil(in/p))``
        (block ``i`` is ``blocks[i, :out_i, :in_i]``).

    Examples:
        >>> import torch
        >>> from gblr.structured import BlockDiagLinear
        >>> layer = BlockDiagLinear.from_dense(torch.randn(64, 64), budget=0.25)
        >>> layer.num_blocks, layer.flops(), layer(torch.randn(5, 64)).shape
        (4, 1024, torch.Size([5, 64]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_blocks: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        p = check_positive_int("num_blocks", num_blocks)
        if p > min(in_features, out_features):
            raise ValueError(
                f"num_blocks must be in [1, min(in, out) = {min(in_features, out_features)}], "
                f"got {p}"
            )
        self.num_blocks = p
        self.out_sizes, self.in_sizes = _split(out_features, p), _split(in_features, p)
        block_out, block_in = self.out_sizes[0], self.in_sizes[0]
        self.blocks = nn.Parameter(torch.empty(p, block_out, block_in, device=device, dtype=dtype))
        bound = 1.0 / math.sqrt(block_in)  # nn.Linear's default init per block
        with torch.no_grad():
            self.blocks.uniform_(-bound, bound)
        self._runs = _equal_shape_runs(self.out_sizes, self.in_sizes)
        with torch.no_grad():  # the padding of shorter blocks (no slice when p divides both)
            for i, (rows, cols) in enumerate(zip(self.out_sizes, self.in_sizes)):
                self.blocks[i, rows:].zero_()
                self.blocks[i, :, cols:].zero_()

    def _matmul(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        outs = []
        # Each run's blocks are sliced out of the padded tiles, so its product holds no
        # padding. Gathering zero-padded input pieces and picking the output rows back by
        # index, as before, made an uneven layer's training step 2-4x slower on the CPU,
        # for the same sums (bit for bit on every layer of the real-task suite;
        # docs/BENCHMARKS.md, "Block-diagonal layers without padding").
        for first, last, col_start, block_out, block_in in self._runs:
            pieces = rows[:, col_start : col_start + (last - first) * block_in]
            pieces = pieces.reshape(count, last - first, block_in).transpose(0, 1)
            blocks = self.blocks[first:last, :block_out, :block_in]
            out = torch.bmm(pieces, blocks.transpose(1, 2)).transpose(0, 1)
            outs.append(out.reshape(count, (last - first) * block_out))  # (0 rows: no -1)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.reshape(*lead, self.out_features)

    def dense_weight(self) -> Tensor:
        return torch.block_diag(
            *[
                self.blocks[i, :rows, :cols]
                for i, (rows, cols) in enumerate(zip(self.out_sizes, self.in_sizes))
            ]
        )

    def flops(self) -> int:
        return self.cost(self.in_features, self.out_features, self.num_blocks)

    @staticmethod
    def cost(in_features: int, out_features: int, num_blocks: int) -> int:
        """MACs per row of ``num_blocks`` blocks: the sum of the blocks' sizes."""
        pieces = zip(_split(out_features, num_blocks), _split(in_features, num_blocks))
        return sum(rows * cols for rows, cols in pieces)

    @classmethod
    def blocks_for(
        cls,
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
    ) -> int:
        """Fewest blocks (the most MACs) whose cost fits ``budget`` (a fraction in
        ``(0, 1]`` of ``out * in``) or ``budget_macs`` (a MAC count);
        [`BudgetTooSmallError`][gblr.structured.BudgetTooSmallError] below the most blocks' cost."""
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        largest = min(in_features, out_features)
        costs = {p: cls.cost(in_features, out_features, p) for p in range(1, largest + 1)}
        macs = resolve_budget(
            budget, budget_macs, out_features, in_features, min(costs.values()), "block-diagonal"
        )
        return min(p for p, cost in costs.items() if cost <= macs)

    @classmethod
    def for_budget(
        cls,
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        **kwargs,
    ) -> BlockDiagLinear:
        """A randomly initialised layer with the fewest blocks within ``budget`` (a
        fraction in ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a MAC count),
        exactly one given; ``kwargs`` go to the constructor (``bias``, ``device``,
        ``dtype``)."""
        p = cls.blocks_for(in_features, out_features, budget, budget_macs=budget_macs)
        return cls(in_features, out_features, p, **kwargs)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        bias: Tensor | None = None,
    ) -> BlockDiagLinear:
        """The diagonal blocks of ``weight`` ``(out, in)`` (the Frobenius-optimal
        block-diagonal approximation), with the fewest blocks within ``budget`` (a
        fraction in ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a MAC count),
        exactly one given; ``bias`` ``(out,)`` is copied."""
        weight = check_weight(weight)
        out_features, in_features = weight.shape
        p = cls.blocks_for(in_features, out_features, budget, budget_macs=budget_macs)
        layer = cls(
            in_features, out_features, p, bias=False, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            layer.blocks.zero_()
            row = col = 0
            for i, (rows, cols) in enumerate(zip(layer.out_sizes, layer.in_sizes)):
                layer.blocks[i, :rows, :cols] = weight[row : row + rows, col : col + cols]
                row, col = row + rows, col + cols
        return copy_bias(layer, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_blocks={self.num_blocks}"
