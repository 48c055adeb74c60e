"""``LowRankLinear``: ``W = U V`` with ``U (out, rank)`` and ``V (rank, in)``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.base import check_positive_int
from ..ops.whitened import weighted_low_rank
from .base import StructuredLinear, check_weight, check_whitening, copy_bias, resolve_budget

__all__ = ["LowRankLinear"]


class LowRankLinear(StructuredLinear):
    """A rank-``rank`` linear layer, evaluated as two thin products.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        rank: inner dimension, ``1 <= rank <= min(in, out)``.

    Cost: ``rank * (in + out)`` MACs per input row.

    Shapes:
        input ``(..., in)``, output ``(..., out)``; ``U (out, rank)``, ``V (rank, in)``.

    Examples:
        >>> import torch
        >>> from gblr.structured import LowRankLinear
        >>> layer = LowRankLinear.from_dense(torch.randn(64, 64), budget=0.25)
        >>> layer.rank, layer.flops(), layer(torch.randn(5, 64)).shape
        (8, 1024, torch.Size([5, 64]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        rank = check_positive_int("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, min(in, out) = {min(in_features, out_features)}], got {rank}"
            )
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        # Var(V) = 1/in and Var(U) = 1/(3 rank): the product has nn.Linear's default
        # weight variance 1/(3 in).
        bound_v, bound_u = math.sqrt(3.0 / in_features), math.sqrt(1.0 / rank)
        self.U = nn.Parameter(
            torch.empty(out_features, rank, **factory).uniform_(-bound_u, bound_u)
        )
        self.V = nn.Parameter(torch.empty(rank, in_features, **factory).uniform_(-bound_v, bound_v))

    def _matmul(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.V), self.U)

    def dense_weight(self) -> Tensor:
        return self.U @ self.V

    def flops(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @staticmethod
    def rank_for(
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
    ) -> int:
        """Largest rank whose MACs fit ``budget`` (a fraction in ``(0, 1]`` of ``out * in``)
        or ``budget_macs`` (a MAC count);
        [`BudgetTooSmallError`][gblr.structured.BudgetTooSmallError] below rank 1 (``in + out``
        MACs)."""
        macs = resolve_budget(
            budget, budget_macs, out_features, in_features, in_features + out_features, "low-rank"
        )
        return min(macs // (in_features + out_features), in_features, out_features)

    @classmethod
    def for_budget(
        cls,
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        **kwargs,
    ) -> LowRankLinear:
        """A randomly initialised layer of the largest rank within ``budget`` (a fraction
        in ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a MAC count), exactly one
        given; ``kwargs`` go to the constructor (``bias``, ``device``, ``dtype``)."""
        rank = cls.rank_for(in_features, out_features, budget, budget_macs=budget_macs)
        return cls(in_features, out_features, rank, **kwargs)

    supports_calibration = True

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        bias: Tensor | None = None,
        whitening: Tensor | None = None,
    ) -> LowRankLinear:
        """Truncated SVD of ``weight`` ``(out, in)`` at the largest rank within ``budget``
        (a fraction in ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a MAC count),
        exactly one given (optimal in Frobenius norm); singular values split evenly
        between the factors; ``bias`` ``(out,)`` is copied.
        With ``whitening`` ``S`` ``(in, in)`` (lower triangular, ``S Sᵀ`` the inputs'
        second moment): the rank minimizing the output error ``||(W - Ŵ) S||`` instead
        (`gblr.ops.whitened.weighted_low_rank`)."""
        weight = check_weight(weight)
        out_features, in_features = weight.shape
        if whitening is not None:
            whitening = check_whitening(whitening, in_features)
        rank = cls.rank_for(in_features, out_features, budget, budget_macs=budget_macs)
        if whitening is not None:
            left, right = weighted_low_rank(weight, whitening, rank)
        else:
            work = weight.double() if weight.dtype == torch.float64 else weight.float()
            u, singular, vh = torch.linalg.svd(work, full_matrices=False)
            scale = singular[:rank].sqrt()
            left, right = u[:, :rank] * scale, scale[:, None] * vh[:rank]
        layer = cls(
            in_features, out_features, rank, bias=False, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            layer.U.copy_(left)
            layer.V.copy_(right)
        return copy_bias(layer, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
