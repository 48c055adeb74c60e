"""``GBLRLinear``: a drop-in ``nn.Linear`` whose weight is a learned GBLR matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.strip_windows import strip_window_product
from .base import EvaluationOrder, FactorInit, GBLRMatrixMixin, StructureInit, check_positive_int

__all__ = ["GBLRLinear"]

# From this many weight entries (512 x 512) the held strips' window form is taken at any
# number of rows: there each block's product over its window costs less than the masked
# factors' full-length products even at thousands of rows, where on smaller layers its
# gathers and scatters cost more (docs/BENCHMARKS.md, "The window form on large layers").
WINDOWED_LAYER_ENTRIES = 512 * 512


class GBLRLinear(GBLRMatrixMixin):
    """Linear layer ``y = x W^T + b`` with ``W`` a Generalized Block Low-Rank matrix.

    ``W = sum_k D(a_k) U_k V_k D(b_k)``: ``K`` components of rank ``r``, each confined to a
    learned (circular) row interval and column interval. See docs/design.md#the-math.

    Args:
        in_features: size of each input sample ``n``.
        out_features: size of each output sample ``m``.
        rank_per_component: rank ``r`` of each component (default 1), ``1 <= r <= min(m, n)``.
        num_components: ``K`` (default ``min(m, n) // r``, the dense-equivalent count).
        bias: learn an additive bias (default True).
        structure_init: starting widths/locations (default: ``"blockdiag"`` when
            ``init_cost`` is given, else ``"full"``): ``"full"`` (every interval full: a
            rank ``K r`` matrix, a dense-equivalent start, 2x the dense MACs for a square
            layer), ``"random"`` (uniform widths and locations),
            ``"half"`` (half of ``init_cost`` on full components, half on narrow ones
            along the diagonal), ``"blocks"`` (half on full components, half on a
            block-diagonal matrix of one- or two-line strips; the recipes' start until
            2026-12-06, at 3x the budget) or ``"blockdiag"`` (all of ``init_cost`` on a
            block-diagonal of one-line strips, dense diagonal blocks: the recipes' start
            for training from scratch, at the budget, the one that trained best on the
            real-task benchmarks, docs/BENCHMARKS.md, "A new default start").
        init_cost: starting cost as a fraction of the dense MACs, for ``"half"``,
            ``"blocks"`` and ``"blockdiag"``; a layer to be trained from scratch under a
            [`gblr.StructureLearner`][] at a budget starts best at that budget (a start
            far above it, pruned during the warm-up, trained worse on every real task).
        factor_init: ``"balanced"`` (each component's two factors get equal norms,
            normal entries), ``"fixed_norm"`` (the same, each component's factors scaled
            to exactly their expected norm) or ``"uniform"`` (``V`` at ``nn.Linear``'s
            bound, ``U`` carrying the rest, the scheme before 0.2); all give the weight
            ``nn.Linear``'s variance at the starting structure. Default: ``"fixed_norm"``
            for the ``"blockdiag"`` start (1-5 points better than ``"balanced"`` on the
            real-task suite's pixel MLPs, docs/BENCHMARKS.md), ``"balanced"`` otherwise.
        widths, locations: explicit ``(2, K)`` starting values (row 0: input intervals,
            row 1: output intervals), fractions in [0, 1]; override ``structure_init``.
        sigma: Gaudi mask bandwidth used in training mode (default ``inf``: exact
            Dirichlet form; [`gblr.StructureLearner`][] anneals it).
        evaluation_order: ``"auto"`` picks, from the number of input rows, the cheaper of
            ``"materialize"`` (build ``W``, one matmul) and ``"factored"`` (two thin
            matmuls through the rank); in training on the CPU, when every component reads
            one input column that a structure learner holds (the block-diagonal start),
            or one output row, and the input rows are fewer than the layer's
            ``in * out / (K r)``, it gathers those columns or adds into those rows
            instead of the product on that side (`strips`), and where the other side's
            intervals are short it multiplies only a window around each group of them
            (`gblr.ops.strip_windows`: the width's gradient then reads the exact masks'
            edge kernel within 8 lines of each end); the window form also at any number
            of rows from ``512 * 512`` weight entries on. The outputs are exact on all
            paths.
        device, dtype: factory keywords as for ``nn.Linear``.

    Shapes:
        input ``(*, in_features)``, output ``(*, out_features)``.

    Examples:
        >>> import torch, gblr
        >>> layer = gblr.GBLRLinear(64, 32, structure_init="half", init_cost=0.3)
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
        >>> round(layer.flops() / (64 * 32), 2)  # about init_cost: whole rows and columns
        0.31
        >>> layer = gblr.GBLRLinear(64, 64, init_cost=0.25)  # the block-diagonal start
        >>> round(layer.flops() / (64 * 64), 2), int((layer.widths[0] * 64).round().max())
        (0.25, 1)
    """

    counts_per_position = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank_per_component: int = 1,
        num_components: int | None = None,
        bias: bool = True,
        structure_init: StructureInit | None = None,
        init_cost: float | None = None,
        factor_init: FactorInit | None = None,
        widths: Tensor | Sequence | None = None,
        locations: Tensor | Sequence | None = None,
        sigma: float | None = None,
        evaluation_order: EvaluationOrder = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self._init_gblr(
            self.out_features,
            self.in_features,
            rank_per_component=rank_per_component,
            num_components=num_components,
            structure_init=structure_init,
            init_cost=init_cost,
            factor_init=factor_init,
            widths=widths,
            locations=locations,
            sigma=sigma,
            evaluation_order=evaluation_order,
            device=device,
            dtype=dtype,
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            bound = 1.0 / math.sqrt(in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)``."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}, "
                f"got input of shape {tuple(x.shape)}"
            )
        rows = x.numel() // self.in_features
        # Held strips skip the product on their side, which pays when the rows are few;
        # with many, their element-wise work over the rows costs more than the masking
        # of a factor that they save (docs/BENCHMARKS.md, "Held strips and a fused AdamW").
        terms = self.num_components * self.rank_per_component
        entries = self.in_features * self.out_features
        few_rows = rows * terms < entries
        # (an empty batch takes the masked factors' products, which handle 0 rows)
        if rows and (few_rows or entries >= WINDOWED_LAYER_ENTRIES):
            held = self._held_strip_components()
            if held is not None:
                *factors_and_structure, skip, on = held
                windowed = strip_window_product(
                    x.reshape(rows, self.in_features), *factors_and_structure, skip, components=on
                )
                if windowed is not None:
                    windowed = windowed.view(*x.shape[:-1], self.out_features)
                    return _plus_bias(windowed, self.bias)
                strips = self._strips_of(held) if few_rows else None
                if strips is not None:
                    return self._strips_forward(x, *strips)
        u, v = self.masked_factors()
        if self._choose_order(rows, u.shape[0]) == "materialize":
            return F.linear(x, u.t() @ v, self.bias)
        return F.linear(F.linear(x, v), u.t(), self.bias)

    def _strips_forward(
        self, x: Tensor, side: int, masked: Tensor, values: Tensor, lines: Tensor
    ) -> Tensor:
        """The forward of held one-line strips (`strips`): a gather of ``x``'s columns
        (``side`` 0) or an index-add into the output's rows (``side`` 1) times the strips'
        entries, and the other side's product."""
        if side == 0:
            return F.linear(x.index_select(-1, lines) * values, masked.t(), self.bias)
        products = F.linear(x, masked) * values
        out = products.new_zeros(*products.shape[:-1], self.out_features)
        out = out.index_add(-1, lines, products)
        return _plus_bias(out, self.bias)

    def dense_weight(self) -> Tensor:
        """The ``(out_features, in_features)`` weight in the current mode."""
        return self.gblr_weight()

    def flops(self) -> int:
        """MACs per input row, live components only, from the integer intervals of eval."""
        return self.matrix_flops()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._gblr_extra_repr()}"
        )

    @classmethod
    def from_intervals(
        cls,
        factors_u: Tensor,
        factors_v: Tensor,
        row_intervals: Tensor | Sequence,
        col_intervals: Tensor | Sequence,
        *,
        bias: Tensor | None = None,
        sigma: float | None = None,
    ) -> GBLRLinear:
        """Build a layer from explicit factors and integer intervals.

        Args:
            factors_u: ``(K, r, out)`` left factors, transposed (only entries inside a
                component's row interval matter).
            factors_v: ``(K, r, in)`` right factors (only entries inside its column interval
                matter).
            row_intervals: ``(K, 2)`` integers ``(start, length)`` with ``0 <= start < out``,
                ``0 <= length <= out``; intervals wrap around.
            col_intervals: ``(K, 2)`` likewise over ``in``.
            bias: optional ``(out,)``.
            sigma: as in the constructor.

        Returns:
            A [`GBLRLinear`][gblr.layers.linear.GBLRLinear] whose ``dense_weight()`` in eval mode is
            ``sum_k D(a_k) U_k V_k D(b_k)``, on the device and dtype of ``factors_u``.
        """
        if factors_u.dim() != 3 or factors_v.dim() != 3:
            raise ValueError(
                "factors_u must be (K, r, out) and factors_v (K, r, in), got "
                f"{tuple(factors_u.shape)} and {tuple(factors_v.shape)}"
            )
        k, r, out_features = factors_u.shape
        if factors_v.shape[:2] != (k, r):
            raise ValueError(
                f"factors_v must be (K, r, in) = ({k}, {r}, in), got {tuple(factors_v.shape)}"
            )
        in_features = factors_v.shape[2]
        rows = _interval_fractions("row_intervals", row_intervals, k, out_features)
        cols = _interval_fractions("col_intervals", col_intervals, k, in_features)
        layer = cls(
            in_features,
            out_features,
            rank_per_component=r,
            num_components=k,
            bias=bias is not None,
            widths=torch.stack([cols[1], rows[1]]),
            locations=torch.stack([cols[0], rows[0]]),
            sigma=sigma,
            device=factors_u.device,
            dtype=factors_u.dtype,
        )
        with torch.no_grad():
            layer.U.copy_(factors_u)
            layer.V.copy_(factors_v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer


def _plus_bias(out: Tensor, bias: Tensor | None) -> Tensor:
    """``out + bias`` in ``out``'s dtype: under autocast the products come in its dtype,
    as ``F.linear``'s output with its bias does (a float32 bias would promote them)."""
    return out if bias is None else out + bias.to(out.dtype)


def _interval_fractions(name: str, intervals: object, k: int, size: int) -> tuple[Tensor, Tensor]:
    """``(starts/size, lengths/size)`` as float64 ``(K,)`` tensors, validated."""
    ints = torch.as_tensor(intervals)
    if tuple(ints.shape) != (k, 2):
        raise ValueError(f"{name} must have shape (K, 2) = ({k}, 2), got {tuple(ints.shape)}")
    if ints.is_floating_point() and not bool((ints == ints.round()).all()):
        raise ValueError(f"{name} must hold integers (start, length)")
    ints = ints.to(torch.int64)
    starts, lengths = ints[:, 0], ints[:, 1]
    if bool((starts < 0).any()) or bool((starts >= size).any()):
        raise ValueError(f"{name} starts must be in [0, {size}), got {starts.tolist()}")
    if bool((lengths < 0).any()) or bool((lengths > size).any()):
        raise ValueError(f"{name} lengths must be in [0, {size}], got {lengths.tolist()}")
    return starts.double() / size, lengths.double() / size
