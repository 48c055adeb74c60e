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


class BlockDiagLinear(StructuredLinear):
    """A block-diagonal linear layer with ``num_blocks`` blocks.

    Block ``i`` maps input piece ``i`` to output piece ``i``. **Size rule**: when ``in``
    or ``out`` is not a multiple of ``num_blocks``, the pieces are as even as possible
    and the first ``size % num_blocks`` pieces are one longer (``_split``). All blocks are
    evaluated by one batched product over ``(num_blocks, ceil(out/p), ceil(in/p))``
    tiles, the shorter blocks zero-padded, so the cost counts the padding too.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        num_blocks: ``p``, ``1 <= p <= min(in, out)`` (1 is dense).

    Cost: ``p * ceil(out / p) * ceil(in / p)`` MACs per input row (``out * in / p``
    when ``p`` divides both).

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
        self.uneven = block_out * p != out_features or block_in * p != in_features
        # Input gather: block i reads inputs [start_i, start_i + in_i); padding reads an
        # appended zero (index in_features). Output: the valid rows of each block.
        gather, start = torch.full((p, block_in), in_features, dtype=torch.long), 0
        mask = torch.zeros(p, block_out, block_in, dtype=torch.bool)
        keep = []
        for i, (rows, cols) in enumerate(zip(self.out_sizes, self.in_sizes)):
            gather[i, :cols] = torch.arange(start, start + cols)
            mask[i, :rows, :cols] = True
            keep.append(torch.arange(rows) + i * block_out)
            start += cols
        self.register_buffer("gather_index", gather.to(device), persistent=False)
        self.register_buffer("pad_mask", mask.to(device), persistent=False)
        self.register_buffer("output_index", torch.cat(keep).to(device), persistent=False)
        if self.uneven:
            with torch.no_grad():
                self.blocks.mul_(self.pad_mask)

    def _block_values(self) -> Tensor:
        # Padding entries are multiplied by zero so they never matter (nor learn).
        return self.blocks * self.pad_mask if self.uneven else self.blocks

    def _matmul(self, x: Tensor) -> Tensor:
        p = self.num_blocks
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.uneven:
            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], 1)], dim=1)
            pieces = rows[:, self.gather_index]  # (N, p, block_in)
        else:
            pieces = rows.reshape(rows.shape[0], p, -1)
        out = torch.bmm(pieces.transpose(0, 1), self._block_values().transpose(1, 2))
        out = out.transpose(0, 1).reshape(rows.shape[0], -1)  # (N, p * block_out)
        if self.uneven:
            out = out[:, self.output_index]
        return out.reshape(*lead, self.out_features)

    def dense_weight(self) -> Tensor:
        blocks = self._block_values()
        return torch.block_diag(
            *[
                blocks[i, :rows, :cols]
                for i, (rows, cols) in enumerate(zip(self.out_sizes, self.in_sizes))
            ]
        )

    def flops(self) -> int:
        return self.blocks.numel()

    @staticmethod
    def cost(in_features: int, out_features: int, num_blocks: int) -> int:
        """MACs per row of ``num_blocks`` blocks (padding included)."""
        return (
            num_blocks * math.ceil(out_features / num_blocks) * math.ceil(in_features / num_blocks)
        )

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
