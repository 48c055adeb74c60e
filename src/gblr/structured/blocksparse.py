"""``BlockSparseLinear``: a fixed set of dense ``b x b`` tiles of the weight.

The tiles are evaluated by gathering the input blocks they read, one batched product
(``bmm``) over all tiles, and an ``index_add`` of the products into the output blocks, so
the MACs ``forward`` performs are exactly ``num_tiles * b * b`` per input row (the
``index_add`` is additions only). The helpers here are shared with
[`gblr.structured.pixelfly`][], whose sparse part is a block-sparse matrix too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.base import check_positive_int
from .base import StructuredLinear, check_weight, copy_bias, resolve_budget

__all__ = ["BlockSparseLinear", "default_block_size"]

MAX_DEFAULT_BLOCK_SIZE = 32
"""The default block size when the budget allows it (see `default_block_size`)."""


def default_block_size(
    in_features: int, out_features: int, fits: Callable[[int], bool] = lambda b: True
) -> int:
    """The default block size of the block-sparse families.

    **Rule**: the largest power of two ``b <= min(32, in, out)`` for which ``fits(b)``
    holds (``fits`` says whether the family's smallest layer with blocks of ``b`` fits the
    budget); 1 when none does (the caller's budget check then reports the minimum).
    """
    b = MAX_DEFAULT_BLOCK_SIZE
    while b > 1 and (b > min(in_features, out_features) or not fits(b)):
        b //= 2
    return b


def block_grid(in_features: int, out_features: int, block_size: int) -> tuple[int, int]:
    """``(block rows, block cols) = (ceil(out / b), ceil(in / b))``."""
    return -(-out_features // block_size), -(-in_features // block_size)


def check_positions(positions: object, num_block_rows: int, num_block_cols: int) -> Tensor:
    """``positions`` (a sequence of ``(block_row, block_col)`` pairs or an integer tensor
    ``(T, 2)``) as a ``(T, 2)`` long tensor on the CPU, or a ``TypeError``/``ValueError``
    naming ``blocks``: at least one tile, every tile inside the block grid, no repeats."""
    if isinstance(positions, Tensor):
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"blocks must hold integers, got a tensor of dtype {positions.dtype}")
        tensor = positions.detach().to("cpu", torch.long)
    elif isinstance(positions, Sequence) and not isinstance(positions, str):
        pairs = [tuple(pair) if isinstance(pair, Sequence) else pair for pair in positions]
        for pair in pairs:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            ):
                raise TypeError(f"blocks must be (block_row, block_col) int pairs, got {pair!r}")
        tensor = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    else:
        raise TypeError(
            "blocks must be a sequence of (block_row, block_col) pairs or an integer tensor "
            f"(num_tiles, 2), got {type(positions).__name__}"
        )
    if tensor.dim() != 2 or tensor.shape[1] != 2:
        raise ValueError(f"blocks must have shape (num_tiles, 2), got {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError("blocks must hold at least one tile")
    rows, cols = tensor[:, 0], tensor[:, 1]
    if bool((rows < 0).any() | (rows >= num_block_rows).any()):
        raise ValueError(
            f"blocks' block rows must be in [0, {num_block_rows - 1}] "
            f"(ceil(out_features / block_size) = {num_block_rows} block rows)"
        )
    if bool((cols < 0).any() | (cols >= num_block_cols).any()):
        raise ValueError(
            f"blocks' block cols must be in [0, {num_block_cols - 1}] "
            f"(ceil(in_features / block_size) = {num_block_cols} block cols)"
        )
    if torch.unique(rows * num_block_cols + cols).numel() != tensor.shape[0]:
        raise ValueError("blocks must not repeat a (block_row, block_col) tile")
    return tensor


def edge_mask(positions: Tensor, block_size: int, out_features: int, in_features: int) -> Tensor:
    """``(T, b, b)`` bool: which entries of each tile lie inside the ``(out, in)`` matrix
    (the rest is zero padding of the edge tiles)."""
    offsets = torch.arange(block_size, device=positions.device)
    rows_ok = positions[:, 0, None] * block_size + offsets < out_features
    cols_ok = positions[:, 1, None] * block_size + offsets < in_features
    return rows_ok[:, :, None] & cols_ok[:, None, :]


def init_tiles_(
    tiles: Tensor, positions: Tensor, out_features: int, in_features: int, gain: float = 1.0
) -> Tensor:
    """Kaiming-like (``nn.Linear``-default-like) init in place: the tiles of block row
    ``i`` are uniform in ``±gain / sqrt(fan_i)``, ``fan_i`` the number of real input
    columns the block row's tiles read, so each output has ``nn.Linear``'s default
    variance; padding entries are zero."""
    block_size = tiles.shape[-1]
    mask = edge_mask(positions, block_size, out_features, in_features)
    num_rows = -(-out_features // block_size)  # every block row (no read: meta tensors)
    cols_per_tile = mask[:, 0, :].sum(dim=1).to(torch.float64)
    fan = torch.zeros(num_rows, dtype=torch.float64, device=positions.device)
    fan = fan.index_add(0, positions[:, 0], cols_per_tile).clamp_min(1.0)
    bound = (gain / fan.sqrt())[positions[:, 0]].to(tiles.dtype)
    with torch.no_grad():
        tiles.uniform_(-1.0, 1.0).mul_(bound[:, None, None]).mul_(mask)
    return tiles


def block_sparse_matmul(
    x: Tensor, tiles: Tensor, positions: Tensor, out_features: int, num_block_rows: int
) -> Tensor:
    """``(..., in) -> (..., out)``: the block-sparse product without bias.

    The input is zero-padded to ``num_block_cols * b`` columns and cut into blocks, the
    blocks the tiles read are gathered, ``bmm`` multiplies ``(T, N, b) @ (T, b, b)`` (the
    only multiplications: ``T * b * b`` MACs per row) and ``index_add`` sums the products
    into ``(num_block_rows, N, b)`` output blocks, whose padding rows are dropped.

    Args:
        x: ``(..., in)``.
        tiles: ``(T, b, b)``, tile ``t`` maps input block ``positions[t, 1]`` to output
            block ``positions[t, 0]``.
        positions: ``(T, 2)`` long.
    """
    block_size = tiles.shape[-1]
    lead, in_features = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, in_features)
    count = rows.shape[0]
    pad = -in_features % block_size
    if pad:
        rows = F.pad(rows, (0, pad))
    # (a -1 here cannot be inferred for an empty batch)
    blocks = rows.reshape(count, rows.shape[1] // block_size, block_size).transpose(0, 1)
    gathered = blocks.index_select(0, positions[:, 1])  # (T, N, b)
    products = torch.bmm(gathered, tiles.transpose(1, 2))  # (T, N, b)
    out = products.new_zeros(num_block_rows, count, block_size)
    out = out.index_add(0, positions[:, 0], products)  # (nbr, N, b)
    out = out.transpose(0, 1).reshape(count, num_block_rows * block_size)
    return out[:, :out_features].reshape(*lead, out_features)


def block_sparse_dense(
    tiles: Tensor,
    positions: Tensor,
    out_features: int,
    in_features: int,
    num_block_rows: int,
    num_block_cols: int,
) -> Tensor:
    """The ``(out, in)`` matrix holding ``tiles`` ``(T, b, b)`` at ``positions``
    (differentiable; padding cut off)."""
    block_size = tiles.shape[-1]
    grid = tiles.new_zeros(num_block_rows, num_block_cols, block_size, block_size)
    grid = grid.index_put((positions[:, 0], positions[:, 1]), tiles)
    dense = grid.permute(0, 2, 1, 3).reshape(
        num_block_rows * block_size, num_block_cols * block_size
    )
    return dense[:out_features, :in_features]


def dense_to_tiles(weight: Tensor, block_size: int) -> Tensor:
    """``(out, in)`` -> ``(nbr, nbc, b, b)``: the zero-padded matrix cut into tiles."""
    out_features, in_features = weight.shape
    padded = F.pad(weight, (0, -in_features % block_size, 0, -out_features % block_size))
    num_rows, num_cols = padded.shape[0] // block_size, padded.shape[1] // block_size
    return padded.reshape(num_rows, block_size, num_cols, block_size).permute(0, 2, 1, 3)


class BlockSparseLinear(StructuredLinear):
    """A linear layer whose weight is zero outside a fixed set of dense ``b x b`` tiles.

    Tile ``t`` occupies rows ``[i*b, (i+1)*b)`` and columns ``[j*b, (j+1)*b)`` of the
    weight, where ``(i, j) = blocks[t]``.

    **Size rule**: when ``in`` or ``out`` is not a multiple of ``b``, the matrix is
    zero-padded to ``(ceil(out/b)*b, ceil(in/b)*b)``: edge tiles are full ``b x b`` tiles
    whose entries outside the matrix read zero-padded inputs or write dropped outputs
    (they never affect the result and are kept at zero by the initialisers). Forward
    computes full tiles, so **the padding is part of the cost**.

    **Default block size** (``for_budget``/``from_dense`` without ``block_size``): the
    largest power of two ``<= min(32, in, out)`` for which the budget pays for as many
    tiles as the grid has block rows and block columns (else: whose single tile fits), so
    that the tiles can reach every part of the matrix (`default_block_size`). With
    one 32 x 32 tile a 64 x 192 layer at 10% of its MACs left most outputs at zero, and a
    ViT trained with it from scratch stayed at chance on 2 of 3 seeds.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        block_size: ``b``, a positive int.
        blocks: the tiles' ``(block_row, block_col)`` positions, a sequence of int pairs
            or an integer tensor ``(num_tiles, 2)``; block rows in
            ``[0, ceil(out/b))``, block cols in ``[0, ceil(in/b))``, no repeats, at least
            one.

    Cost: ``num_tiles * b * b`` MACs per input row (padding included).

    Shapes:
        input ``(..., in)``, output ``(..., out)``; ``tiles (num_tiles, b, b)``
        (parameter), ``positions (num_tiles, 2)`` (long buffer, in the state dict).

    Examples:
        >>> import torch
        >>> from gblr.structured import BlockSparseLinear
        >>> layer = BlockSparseLinear.from_dense(torch.randn(64, 64), budget=0.25)
        >>> layer.flops(), layer(torch.randn(5, 64)).shape
        (1024, torch.Size([5, 64]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int,
        blocks: Sequence[Sequence[int]] | Tensor,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.block_size = check_positive_int("block_size", block_size)
        self.num_block_rows, self.num_block_cols = block_grid(in_features, out_features, block_size)
        positions = check_positions(blocks, self.num_block_rows, self.num_block_cols)
        self.register_buffer("positions", positions.to(device))
        self.tiles = nn.Parameter(
            torch.empty(positions.shape[0], block_size, block_size, device=device, dtype=dtype)
        )
        init_tiles_(self.tiles, self.positions, out_features, in_features)

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # The positions index the tiles: a state's out of the grid failed at the forward
        # with an IndexError, and repeated ones made forward and dense_weight() differ.
        positions = state_dict.get(prefix + "positions")
        if isinstance(positions, Tensor) and tuple(positions.shape) == tuple(self.positions.shape):
            try:
                check_positions(positions, self.num_block_rows, self.num_block_cols)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"the state's {prefix}positions do not fit this layer "
                    f"({self.num_block_rows} x {self.num_block_cols} blocks of "
                    f"{self.block_size}): {error}"
                ) from None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _matmul(self, x: Tensor) -> Tensor:
        return block_sparse_matmul(
            x, self.tiles, self.positions, self.out_features, self.num_block_rows
        )

    def dense_weight(self) -> Tensor:
        return block_sparse_dense(
            self.tiles,
            self.positions,
            self.out_features,
            self.in_features,
            self.num_block_rows,
            self.num_block_cols,
        )

    def flops(self) -> int:
        return self.tiles.numel()

    @staticmethod
    def tiles_for(
        in_features: int,
        out_features: int,
        budget: float | None = None,
        block_size: int | None = None,
        *,
        budget_macs: int | None = None,
    ) -> tuple[int, int]:
        """``(block_size, num_tiles)``: the most tiles whose MACs fit ``budget`` (a
        fraction in ``(0, 1]`` of ``out * in``) or ``budget_macs`` (a MAC count), exactly
        one given; [`BudgetTooSmallError`][gblr.structured.BudgetTooSmallError] naming the minimum,
        one tile, when none fits."""
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if block_size is None:
            macs = resolve_budget(budget, budget_macs, out_features, in_features, 1, "block-sparse")

            def covers(b: int) -> bool:  # as many tiles as block rows and block columns
                return b * b * max(block_grid(in_features, out_features, b)) <= macs

            fits = covers if covers(1) else (lambda b: b * b <= macs)
            block_size = default_block_size(in_features, out_features, fits)
            family = "block-sparse"
        else:
            check_positive_int("block_size", block_size)
            # the smallest layer with these blocks (a smaller block size may fit)
            family = f"block-sparse (block_size={block_size})"
        macs = resolve_budget(
            budget, budget_macs, out_features, in_features, block_size * block_size, family
        )
        num_rows, num_cols = block_grid(in_features, out_features, block_size)
        return block_size, min(macs // (block_size * block_size), num_rows * num_cols)

    @classmethod
    def for_budget(
        cls,
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        block_size: int | None = None,
        **kwargs,
    ) -> BlockSparseLinear:
        """A layer with the most tiles within ``budget`` (a fraction in ``(0, 1]`` of
        ``out * in`` MACs) or ``budget_macs`` (a MAC count), exactly one given, at
        positions drawn uniformly without replacement (torch's global RNG), Kaiming-like
        init. ``kwargs`` go to the constructor (``bias``, ``device``, ``dtype``)."""
        block_size, num_tiles = cls.tiles_for(
            in_features, out_features, budget, block_size, budget_macs=budget_macs
        )
        num_rows, num_cols = block_grid(in_features, out_features, block_size)
        chosen = torch.randperm(num_rows * num_cols)[:num_tiles].sort().values
        positions = torch.stack([chosen // num_cols, chosen % num_cols], dim=1)
        return cls(in_features, out_features, block_size, positions, **kwargs)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        bias: Tensor | None = None,
        block_size: int | None = None,
    ) -> BlockSparseLinear:
        """The tiles of ``weight`` ``(out, in)`` with the largest Frobenius norms, as
        many as ``budget`` (a fraction in ``(0, 1]`` of ``out * in`` MACs) or
        ``budget_macs`` (a MAC count) allows, exactly one given (the Frobenius-optimal
        approximation with that many tiles of the grid). Tiles are stored in row-major
        order of their positions; ``bias`` ``(out,)`` is copied."""
        weight = check_weight(weight)
        out_features, in_features = weight.shape
        block_size, num_tiles = cls.tiles_for(
            in_features, out_features, budget, block_size, budget_macs=budget_macs
        )
        grid = dense_to_tiles(weight, block_size)  # (nbr, nbc, b, b)
        num_cols = grid.shape[1]
        norms = grid.double().square().sum(dim=(2, 3)).flatten()
        chosen = norms.topk(num_tiles).indices.sort().values
        positions = torch.stack([chosen // num_cols, chosen % num_cols], dim=1)
        layer = cls(
            in_features,
            out_features,
            block_size,
            positions,
            bias=False,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.tiles.copy_(grid[layer.positions[:, 0], layer.positions[:, 1]])
        return copy_bias(layer, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, num_tiles={self.num_tiles}"
