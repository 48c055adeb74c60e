"""Monarch matrices (Dao et al., ICML 2022, "Monarch: Expressive Structured Matrices for
Efficient and Accurate Training"), with a block rank for budgets between configurations.

Parametrization
---------------
``W = P L P^T R`` of shape ``(m, n)`` = ``(out, in)``, with ``b = nblocks`` and block rank
``r = rank``:

- the input is cut into ``b`` contiguous chunks of sizes ``_split_sizes(n, b)`` (the first
  ``n mod b`` chunks are one longer), each zero-padded to ``p = ceil(n / b)``;
- ``R`` is block diagonal: ``right`` ``(b, b r, p)``; block ``k`` maps input chunk ``k`` to
  ``b r`` intermediate values, ``r`` for each block of ``L``;
- ``P^T`` is the stride permutation of the ``b * b * r`` intermediate values, taken in groups
  of ``r``: position ``(k, l, t)`` (``R``-block, ``L``-block, ``t < r``) goes to ``(l, k, t)``
  (a reshape ``(b, b, r)`` and a transpose of the first two axes);
- ``L`` is block diagonal: ``left`` ``(b, s, b r)`` with ``s = ceil(m / b)``;
- ``P`` is the stride permutation of the outputs: output ``o`` is row ``o // b`` of
  ``L``-block ``o mod b``. Rows of ``left`` with ``(o // b) * b + l >= m`` are padding and
  are dropped, so ``L``-block ``l`` has ``ceil((m - l) / b)`` real rows.

With ``n = m = b^2`` and ``r = 1`` this is the paper's square Monarch matrix (``L`` and
``R`` with ``b`` blocks of ``b x b``). For ``r = 1`` and any ``b`` it is the paper's class
of permuted block-rank-1 matrices; ``r > 1`` is the block-rank generalization.

Block-low-rank view
-------------------
Entry ``(o, c)`` with ``o`` in output group ``l`` (row ``u = o // b``) and ``c`` in input
chunk ``k`` (offset ``i``) is ``sum_t left[l, u, k r + t] * right[k, l r + t, i]``. So with
the rows taken in group order (``P^T W``), ``W`` is a block-low-rank matrix on a ``b x b``
grid with every block of rank ``<= r``; conversely every such matrix is a Monarch matrix
(each block owns its own factor slices). Hence the projection
([`MonarchLinear.from_dense`][gblr.structured.monarch.MonarchLinear.from_dense]) is the per-block
truncated SVD (the paper's Algorithm 1, generalized to rank ``r``), exact in the Frobenius norm by
Eckart–Young, and a GBLR matrix with one rank-``r`` component per grid block represents ``P^T W``
exactly at ``r b (m + n)`` MACs.

Sizes and cost
--------------
Any ``1 <= nblocks <= min(in, out)`` and ``1 <= rank <= min(p, s)`` is allowed; sizes that
``nblocks`` does not divide are zero-padded internally (see above), and `flops`
counts the MACs the two batched products really execute, padding included::

    flops = b * (b r) * p + b * s * (b r) = b^2 r (ceil(n / b) + ceil(m / b))

which is ``r b (n + m)`` when ``b`` divides both ``n`` and ``m``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.base import check_positive_int
from .base import StructuredLinear, check_weight, copy_bias, resolve_budget

__all__ = ["MonarchLinear", "monarch_flops"]


def _split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total``; the first ``total % parts`` longer."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def monarch_flops(in_features: int, out_features: int, nblocks: int, rank: int = 1) -> int:
    """MACs per input row of [`MonarchLinear`][gblr.structured.monarch.MonarchLinear]: ``b^2 r
    (ceil(n/b) + ceil(m/b))``."""
    b = nblocks
    return b * b * rank * (-(-in_features // b) + -(-out_features // b))


def _check_nblocks(nblocks: object, in_features: int, out_features: int) -> int:
    if isinstance(nblocks, bool) or not isinstance(nblocks, int):
        raise TypeError(
            f"nblocks must be an int in [1, min(in_features, out_features)] = "
            f"[1, {min(in_features, out_features)}], got {nblocks!r}"
        )
    if not 1 <= nblocks <= min(in_features, out_features):
        raise ValueError(
            f"nblocks must be in [1, min(in_features, out_features)] = "
            f"[1, {min(in_features, out_features)}], got {nblocks}"
        )
    return nblocks


def _max_rank(in_features: int, out_features: int, nblocks: int) -> int:
    """Largest useful block rank: the smaller padded block side ``min(p, s)``."""
    return min(-(-in_features // nblocks), -(-out_features // nblocks))


def _configurations(
    in_features: int, out_features: int, nblocks: int | None, rank: int | None
) -> Iterator[tuple[int, int, int]]:
    """``(nblocks, rank, flops)`` of every valid configuration matching the fixed ones."""
    block_range = [nblocks] if nblocks is not None else range(1, min(in_features, out_features) + 1)
    for b in block_range:
        top = _max_rank(in_features, out_features, b)
        for r in [rank] if rank is not None else range(1, top + 1):
            if r <= top:
                yield b, r, monarch_flops(in_features, out_features, b, r)


def _preference(in_features: int, out_features: int, config: tuple[int, int, int]) -> tuple:
    """Sort key, larger is preferred: most MACs, then blocks closest to square (the paper's
    ``b r = p = s`` shape), then more blocks."""
    b, r, cost = config
    p, s = -(-in_features // b), -(-out_features // b)
    return (cost, -abs(math.log(b * r) - 0.5 * math.log(p * s)), b)


def _select(
    in_features: int,
    out_features: int,
    budget: float | None,
    budget_macs: int | None,
    nblocks: int | None,
    rank: int | None,
) -> list[tuple[int, int, int]]:
    """Valid configurations within ``budget`` (a fraction) or ``budget_macs`` (a count),
    most preferred first (``BudgetTooSmallError`` below the cheapest one, which is named)."""
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    if nblocks is not None:
        nblocks = _check_nblocks(nblocks, in_features, out_features)
    if rank is not None:
        rank = check_positive_int("rank", rank)
    configs = list(_configurations(in_features, out_features, nblocks, rank))
    if not configs:
        where = (
            f"nblocks={nblocks} (at most min(ceil(in/nblocks), ceil(out/nblocks)) = "
            f"{_max_rank(in_features, out_features, nblocks)})"
            if nblocks is not None
            else f"any nblocks (the largest rank is min(in, out) = "
            f"{min(in_features, out_features)}, at nblocks=1)"
        )
        raise ValueError(
            f"rank={rank} is too large for a ({out_features}, {in_features}) "
            f"Monarch layer with {where}"
        )
    minimum = min(cost for _, _, cost in configs)
    # the smallest layer with the nblocks given, where one is (a smaller one may exist)
    family = "Monarch" if nblocks is None else f"Monarch (nblocks={nblocks})"
    macs = resolve_budget(budget, budget_macs, out_features, in_features, minimum, family)
    feasible = [c for c in configs if c[2] <= macs]
    return sorted(feasible, key=lambda c: _preference(in_features, out_features, c), reverse=True)


class MonarchLinear(StructuredLinear):
    """Linear layer ``y = x W^T + b`` with ``W = P L P^T R`` a Monarch matrix.

    See the module docstring for the parametrization, the padding rule and the cost.

    Args:
        in_features: ``n``.
        out_features: ``m``.
        nblocks: ``b``, the number of blocks of ``L`` and of ``R``, in
            ``[1, min(n, m)]``.
        rank: ``r``, the rank of each grid block, in ``[1, min(ceil(n/b), ceil(m/b))]``
            (default 1, the paper's Monarch matrices).
        bias: learn an additive bias (default True).
        device, dtype: factory keywords as for ``nn.Linear``.

    Attributes:
        right: ``(b, b r, p)`` blocks of ``R``, ``p = ceil(n / b)``.
        left: ``(b, s, b r)`` blocks of ``L``, ``s = ceil(m / b)``.

    Shapes:
        input ``(*, in_features)``, output ``(*, out_features)``.

    Examples:
        >>> import torch
        >>> from gblr.structured import MonarchLinear
        >>> layer = MonarchLinear(64, 64, nblocks=8)
        >>> layer(torch.randn(5, 64)).shape, layer.flops()
        (torch.Size([5, 64]), 1024)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        nblocks: int,
        rank: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        n, m = self.in_features, self.out_features
        b = self.nblocks = _check_nblocks(nblocks, n, m)
        r = self.rank = check_positive_int("rank", rank)
        if r > _max_rank(n, m, b):
            raise ValueError(
                f"rank must be in [1, min(ceil(in/nblocks), ceil(out/nblocks))] = "
                f"[1, {_max_rank(n, m, b)}] for nblocks={b}, got {r}"
            )
        self.in_block = p = -(-n // b)
        self.out_block = s = -(-m // b)
        # Real input sizes per R-block (contiguous chunks) and their start in the input.
        chunk_sizes = _split_sizes(n, b)
        starts = [sum(chunk_sizes[:k]) for k in range(b)]
        # gather index (b p,): padded position -> input index, ``n`` for a padding zero.
        gather = torch.full((b, p), n, dtype=torch.long)
        for k, (start, size) in enumerate(zip(starts, chunk_sizes)):
            gather[k, :size] = torch.arange(start, start + size)
        gather = gather.reshape(-1)
        self.padded_input = b * p != n
        self.register_buffer("_gather", gather.to(device), persistent=False)
        # position (n,) of each input in the padded layout: the columns of dense_weight.
        self.register_buffer(
            "_positions", torch.nonzero(gather < n).reshape(-1).to(device), persistent=False
        )
        # masks of the real (non-padding) entries.
        in_mask = torch.arange(p).unsqueeze(0) < torch.tensor(chunk_sizes).unsqueeze(1)
        out_mask = torch.arange(s).unsqueeze(0) * b + torch.arange(b).unsqueeze(1) < m
        self.register_buffer("_in_mask", in_mask.to(device), persistent=False)  # (b, p)
        self.register_buffer("_out_mask", out_mask.to(device), persistent=False)  # (b, s)
        factory = {"device": device, "dtype": dtype}
        self.right = nn.Parameter(torch.empty(b, b * r, p, **factory))
        self.left = nn.Parameter(torch.empty(b, s, b * r, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each factor like ``nn.Linear``'s default: uniform in ``±1/sqrt(fan_in)`` with
        ``fan_in`` the real chunk size for ``R`` and ``b r`` for ``L``; padding zero."""
        sizes = self._in_mask.sum(dim=1).clamp(min=1).to(self.right.dtype)
        bound = (1.0 / sizes.sqrt()).view(-1, 1, 1)
        self.right.uniform_(-1.0, 1.0).mul_(bound)
        self.left.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(self.nblocks * self.rank))
        self._zero_padding()

    @torch.no_grad()
    def _zero_padding(self) -> None:
        self.right.mul_(self._in_mask.unsqueeze(1).to(self.right.dtype))
        self.left.mul_(self._out_mask.unsqueeze(2).to(self.left.dtype))

    # ------------------------------------------------------------------ interface
    def _matmul(self, x: Tensor) -> Tensor:
        """``(..., n) -> (..., m)`` by two batched matmuls over the ``b`` blocks."""
        b, r, p, s = self.nblocks, self.rank, self.in_block, self.out_block
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.padded_input:
            rows = F.pad(rows, (0, 1)).index_select(1, self._gather)
        n_rows = rows.shape[0]
        chunks = rows.reshape(n_rows, b, p).transpose(0, 1)  # (b_k, N, p)
        mid = torch.bmm(chunks, self.right.transpose(1, 2))  # (b_k, N, b_l r)
        # P^T: (k, N, l, t) -> (l, N, k, t)
        mid = mid.reshape(b, n_rows, b, r).permute(2, 1, 0, 3).reshape(b, n_rows, b * r)
        out = torch.bmm(mid, self.left.transpose(1, 2))  # (b_l, N, s)
        # P: output o = u * b + l is row u of L-block l.
        out = out.permute(1, 2, 0).reshape(n_rows, s * b)[:, : self.out_features]
        return out.reshape(*lead, self.out_features)

    def dense_weight(self) -> Tensor:
        """The ``(out, in)`` weight, built explicitly from the factors (not via forward)."""
        b, r, p, s = self.nblocks, self.rank, self.in_block, self.out_block
        left = self.left.reshape(b, s, b, r)  # [l, u, k, t]
        right = self.right.reshape(b, b, r, p)  # [k, l, t, i]
        grid = torch.einsum("lukt,klti->ulki", left, right)  # [u, l, k, i]
        padded = grid.reshape(s * b, b * p)  # row u * b + l, column k * p + i
        return padded[: self.out_features].index_select(1, self._positions)

    def flops(self) -> int:
        """MACs per input row the two batched products execute (padding included):
        ``b^2 r (ceil(n/b) + ceil(m/b))``."""
        return monarch_flops(self.in_features, self.out_features, self.nblocks, self.rank)

    def output_groups(self) -> Tensor:
        """``(m,)`` output indices in group order (group ``l`` = outputs ``o ≡ l mod b``):
        ``dense_weight()[output_groups()]`` is ``P^T W``, block-low-rank on contiguous
        row blocks of sizes ``ceil((m - l) / b)`` and column chunks ``_split_sizes(n, b)``."""
        return torch.cat(
            [torch.arange(g, self.out_features, self.nblocks) for g in range(self.nblocks)]
        )

    @classmethod
    def for_budget(
        cls,
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        nblocks: int | None = None,
        rank: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MonarchLinear:
        """A freshly initialised layer at the largest configuration within the budget.

        Args:
            in_features, out_features: layer shape.
            budget: fraction in ``(0, 1]`` of ``out * in`` MACs (the int 1 means 1.0).
            budget_macs: the budget as an absolute MAC count (an int >= 1) instead;
                exactly one of ``budget`` and ``budget_macs``.
            nblocks, rank: fix either (or both); the others are searched. Among the
                configurations with the most MACs within budget, the one with the most
                nearly square blocks (``b r`` closest to ``sqrt(p s)``), then the most
                blocks, is taken.

        Raises:
            BudgetTooSmallError: budget below the cheapest allowed configuration (named;
                ``n + m`` MACs at ``nblocks = rank = 1`` when neither is fixed).
            TypeError, ValueError: a malformed budget (both or neither given, an int
                other than 1 as ``budget``, a fraction outside ``(0, 1]``).
        """
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        b, r, _ = _select(in_features, out_features, budget, budget_macs, nblocks, rank)[0]
        return cls(
            in_features, out_features, nblocks=b, rank=r, bias=bias, device=device, dtype=dtype
        )

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        bias: Tensor | None = None,
        nblocks: int | str | None = None,
        rank: int | None = None,
    ) -> MonarchLinear:
        """Frobenius-optimal Monarch approximation of ``weight`` ``(out, in)`` within
        ``budget`` (a fraction in ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a
        MAC count), exactly one given; ``bias`` ``(out,)`` is copied.

        The configuration is chosen as in `for_budget`; ``nblocks="best"`` instead
        tries every ``nblocks`` (each at its largest rank within budget) and keeps the
        smallest projection error (one batched SVD per candidate: costly for big matrices).
        The projection is the paper's Algorithm 1 generalized to rank ``r``: view the
        (padded) matrix as ``(s, b, b, p)`` ``[u, l, k, i]``, and replace each block
        ``[:, l, k, :]`` by its truncated rank-``r`` SVD, split as ``U sqrt(S)`` into
        ``L`` and ``sqrt(S) V^T`` into ``R``. Computed in float64, returned in
        ``weight``'s dtype and device; exact on Monarch matrices.
        """
        weight = check_weight(weight)
        out_features, in_features = weight.shape
        if isinstance(nblocks, str):
            if nblocks != "best":
                raise ValueError(f"nblocks must be an int, None or 'best', got {nblocks!r}")
            feasible = _select(in_features, out_features, budget, budget_macs, None, rank)
            best: dict[int, tuple[int, int, int]] = {}
            for config in feasible:  # most preferred first: keeps each b's largest cost
                best.setdefault(config[0], config)
            candidates = []
            for order, (b, r, _) in enumerate(best.values()):
                singular = torch.linalg.svdvals(_blocks(weight.double(), b))
                error = float(singular[..., r:].square().sum())
                candidates.append((error, order, b, r))
            _, _, b, r = min(candidates)
        elif nblocks is None or isinstance(nblocks, int):
            b, r, _ = _select(in_features, out_features, budget, budget_macs, nblocks, rank)[0]
        else:
            raise TypeError(f"nblocks must be an int, None or 'best', got {nblocks!r}")
        layer = cls(
            in_features,
            out_features,
            nblocks=b,
            rank=r,
            bias=False,
            device=weight.device,
            dtype=weight.dtype,
        )
        left, right = _project(weight, b, r)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
            layer._zero_padding()
        return copy_bias(layer, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}, rank={self.rank}"


def _blocks(weight: Tensor, nblocks: int) -> Tensor:
    """``(b, b, s, p)`` ``[l, k, u, i]``: the zero-padded grid blocks of ``weight`` ``(m, n)``,
    row ``u * b + l``, column ``i`` of input chunk ``k`` (chunks ``_split_sizes(n, b)``)."""
    m, n = weight.shape
    b = nblocks
    p, s = -(-n // b), -(-m // b)
    padded = weight.new_zeros(s * b, b * p)
    sizes = _split_sizes(n, b)
    columns = torch.cat(
        [torch.arange(k * p, k * p + size, device=weight.device) for k, size in enumerate(sizes)]
    )
    padded[:m, columns] = weight
    return padded.reshape(s, b, b, p).permute(1, 2, 0, 3)


def _project(weight: Tensor, nblocks: int, rank: int) -> tuple[Tensor, Tensor]:
    """``(left (b, s, b r), right (b, b r, p))``: per-block truncated SVD (float64)."""
    b, r = nblocks, rank
    blocks = _blocks(weight.double(), b)  # [l, k, u, i]
    u, sing, vh = torch.linalg.svd(blocks, full_matrices=False)
    root = sing[..., :r].sqrt()
    left_blocks = u[..., :r] * root.unsqueeze(-2)  # [l, k, u, t]
    right_blocks = root.unsqueeze(-1) * vh[..., :r, :]  # [l, k, t, i]
    s, p = blocks.shape[2], blocks.shape[3]
    left = left_blocks.permute(0, 2, 1, 3).reshape(b, s, b * r)  # [l, u, (k, t)]
    right = right_blocks.permute(1, 0, 2, 3).reshape(b, b * r, p)  # [k, (l, t), i]
    return left.to(weight.dtype), right.to(weight.dtype)
