"""The interface every structured linear family shares (docs/design.md#adding-a-structure-family).

A family is one file: a subclass of [`StructuredLinear`][gblr.structured.base.StructuredLinear] that
implements ``_matmul`` (the bias-free product), ``dense_weight``, ``flops``, and the two
classmethods ``for_budget`` (a fresh, randomly initialised layer at the largest configuration whose
MACs do not exceed a budget; for training from scratch) and ``from_dense`` (the family's
projection of a dense matrix under a budget).

Budgets are given as everywhere in gblr ([`gblr.cost.fraction_budget_macs`][]):
``budget`` is a fraction in ``(0, 1]`` of the dense MACs ``out * in`` per input row (the
int ``1`` means 1.0; any other int is refused), and an absolute MAC count is the separate
keyword ``budget_macs``; exactly one of the two. When a family's discrete parameters
cannot hit the budget exactly, the largest configuration not above it is taken
(``flops()`` reports the actual MACs); a budget below the family's smallest configuration
is a [`BudgetTooSmallError`][gblr.structured.base.BudgetTooSmallError] (a ``ValueError``) naming
that minimum, which ``gblr.convert`` turns into "this layer stays dense".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..cost import check_fraction_budget, fraction_budget_macs
from ..layers.base import check_positive_int

__all__ = ["BudgetTooSmallError", "StructuredLinear", "resolve_budget"]


class BudgetTooSmallError(ValueError):
    """A valid budget below the smallest layer a family can build at that shape.

    Distinct from every other ``ValueError`` (a malformed argument) so that
    [`gblr.convert`][] can leave exactly these layers dense, listed in
    ``report.skipped``, and let every other failure propagate. A structure registered
    with [`gblr.compress.register_structure`][] raises it for the same purpose.

    Examples:
        >>> import torch
        >>> from gblr.structured import BudgetTooSmallError, LowRankLinear
        >>> try:
        ...     LowRankLinear.from_dense(torch.randn(64, 64), 0.01)  # 40 MACs < rank 1's 128
        ... except BudgetTooSmallError as error:
        ...     print(error)
        ...     print(error.minimum_macs)
        budget=0.01 allows 40 of the 4096 dense MACs, below the minimum of 128 MACs
        (the smallest low-rank layer of shape (64, 64)): budget must be at least 0.03125
        (or budget_macs at least 128)
        128
    """

    #: The family's smallest layer at that shape, in MACs per row (``None`` where the
    #: raiser did not say).
    minimum_macs: int | None = None


def resolve_budget(
    budget: float | None,
    budget_macs: int | None,
    out_features: int,
    in_features: int,
    minimum: int,
    family: str,
) -> int:
    """MACs per input row allowed for an ``(out, in)`` layer by ``budget`` (a fraction in
    ``(0, 1]`` of ``out * in``; the int 1 means 1.0) or ``budget_macs`` (an int MAC count),
    exactly one of them given.

    Raises:
        TypeError, ValueError: a malformed budget (from
            `gblr.cost.fraction_budget_macs`: both or neither given, a bool or str,
            an int other than 1 as ``budget``, a fraction outside ``(0, 1]``, a count < 1).
        BudgetTooSmallError: a well-formed budget below the family's ``minimum`` MACs; the
            message names that minimum, as a count and as the smallest fraction.

    Examples:
        >>> from gblr.structured import resolve_budget
        >>> resolve_budget(0.25, None, 64, 32, minimum=96, family="low-rank")
        512
        >>> resolve_budget(None, 200, 64, 32, minimum=96, family="low-rank")
        200
    """
    names = {"fraction_name": "budget", "macs_name": "budget_macs"}
    # an empty side is no layer (it was a BudgetTooSmallError, which convert reads as
    # "leave it dense")
    check_positive_int("out_features", out_features)
    check_positive_int("in_features", in_features)
    # Checked first so that a malformed budget stays a plain error: convert leaves a layer
    # dense only on BudgetTooSmallError, and must not do so for a typo in the budget.
    check_fraction_budget(budget, budget_macs, **names)
    try:
        return fraction_budget_macs(
            budget,
            budget_macs,
            out_features * in_features,
            minimum=minimum,
            minimum_reason=f"the smallest {family} layer of shape ({out_features}, {in_features})",
            **names,
        )
    except ValueError as error:  # well formed (checked above): only the minimum is left
        too_small = BudgetTooSmallError(str(error))
        too_small.minimum_macs = int(minimum)
        raise too_small from None


class StructuredLinear(nn.Module):
    """A linear map ``(..., in) -> (..., out)`` whose ``(out, in)`` weight is structured.

    Subclasses implement ``_matmul``, ``dense_weight``, ``flops``, ``for_budget`` and
    ``from_dense``. ``forward`` checks the input and adds the bias.

    Attributes:
        in_features, out_features: as ``nn.Linear``.
        bias: ``(out,)`` parameter or ``None``.

    Examples:
        >>> import torch
        >>> from gblr.structured import FAMILIES
        >>> weight = torch.randn(32, 48)
        >>> sorted(FAMILIES)
        ['blockdiag', 'blocksparse', 'lowrank', 'monarch', 'pixelfly']
        >>> [FAMILIES[name].from_dense(weight, 0.5).flops() <= 0.5 * 32 * 48 for name in FAMILIES]
        [True, True, True, True, True]
    """

    counts_per_position = False
    # Whether ``from_dense`` takes ``whitening=S`` and then minimizes the output error
    # ``||(W - Ŵ) S||`` on calibration inputs (``gblr.convert(..., calibration=...)``).
    supports_calibration = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(
                torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound)
            )
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ interface
    def _matmul(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., out)``: ``x @ dense_weight().T`` without the bias."""
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The ``(out, in)`` weight this layer multiplies by."""
        raise NotImplementedError

    def flops(self) -> int:
        """MACs per input row of ``forward`` (bias additions not counted)."""
        raise NotImplementedError

    @classmethod
    def for_budget(
        cls,
        in_features: int,
        out_features: int,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        **kwargs,
    ) -> StructuredLinear:
        """A freshly initialised layer at the largest configuration within ``budget`` (a
        fraction in ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a MAC count)."""
        raise NotImplementedError

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        budget: float | None = None,
        *,
        budget_macs: int | None = None,
        bias: Tensor | None = None,
        **kwargs,
    ) -> StructuredLinear:
        """The family's approximation of ``weight`` ``(out, in)`` within ``budget`` (a
        fraction in ``(0, 1]`` of ``out * in`` MACs) or ``budget_macs`` (a MAC count)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dense_flops(self) -> int:
        """MACs per row of ``nn.Linear`` of the same shape: ``out * in``."""
        return self.out_features * self.in_features

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., out)``."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}, "
                f"got input of shape {tuple(x.shape)}"
            )
        out = self._matmul(x)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, macs={self.flops()}"
        )


def check_weight(weight: object) -> Tensor:
    """``weight`` as a detached 2-D floating tensor, or a ``TypeError``."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError("weight must be a 2-D floating-point torch.Tensor (out, in)")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite (it holds NaN or inf)")
    return weight.detach()


def check_whitening(whitening: object, in_features: int) -> Tensor:
    """``whitening`` ``S`` as a detached finite, lower-triangular, nonsingular ``(in, in)``
    floating tensor, or a ``TypeError``/``ValueError`` naming what it got."""
    if not isinstance(whitening, Tensor) or not whitening.is_floating_point():
        raise TypeError(
            "whitening must be a floating-point torch.Tensor (in, in), got "
            f"{type(whitening).__name__}"
        )
    if tuple(whitening.shape) != (in_features, in_features):
        raise ValueError(
            f"whitening must have shape (in, in) = ({in_features}, {in_features}), "
            f"got {tuple(whitening.shape)}"
        )
    if not bool(torch.isfinite(whitening).all()):
        raise ValueError("whitening must be finite (it holds NaN or inf)")
    # the fit solves with S's lower triangle only: any other S gave a garbage layer
    if bool((torch.triu(whitening, diagonal=1) != 0).any()):
        raise ValueError(
            "whitening must be lower triangular (the Cholesky factor of the inputs' second "
            "moment M, S = torch.linalg.cholesky(M)); got a matrix with entries above its "
            "diagonal"
        )
    # a zero on the diagonal (M singular: an input that is always 0) divides by zero
    if bool((whitening.diagonal() == 0).any()):
        raise ValueError(
            "whitening is singular (a zero on its diagonal: an input direction the inputs "
            "never take); factor M + eps * I instead (convert does, with eps 1e-4 of M's "
            "mean diagonal)"
        )
    return whitening.detach()


def copy_bias(layer: StructuredLinear, bias: Tensor | None) -> StructuredLinear:
    """Set ``layer``'s bias from ``bias`` (``(out,)`` or ``None``: no bias)."""
    if bias is None:
        layer.bias = None
        return layer
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (layer.out_features,):
        raise ValueError(f"bias must be a tensor of shape ({layer.out_features},)")
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got dtype {bias.dtype}")
    # in the layer's dtype and device, as nn.Linear.load_state_dict casts (a float64 bias
    # made every output float64)
    like = next((p for p in layer.parameters() if p.is_floating_point()), None)
    bias = bias.detach() if like is None else bias.detach().to(like.dtype).to(like.device)
    layer.bias = nn.Parameter(bias.clone())
    return layer
