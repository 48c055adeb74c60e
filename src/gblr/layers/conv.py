"""``GBLRConv2d``: a 2-D convolution whose kernel matrix is a learned GBLR matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .base import EvaluationOrder, FactorInit, GBLRMatrixMixin, StructureInit, check_positive_int

__all__ = ["GBLRConv2d"]


def positive_pair(name: str, value: int | tuple[int, int], minimum: int = 1) -> tuple[int, int]:
    """``value`` as a pair of ints ``>= minimum`` (an int is used for both sides), as the
    convolution arguments ``kernel_size``, ``stride``, ``padding`` and ``dilation``.

    Shared with [`gblr.deploy.FrozenGBLRConv2d`][] so that both layers accept and
    refuse the same arguments.

    Raises:
        TypeError: not an int or a pair of ints (a bool is refused).
        ValueError: a side is below ``minimum``; ``name`` is in the message.

    Examples:
        >>> from gblr.layers.conv import positive_pair
        >>> positive_pair("stride", 2), positive_pair("padding", (0, 1), minimum=0)
        ((2, 2), (0, 1))
    """
    pair = _pair(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


class GBLRConv2d(GBLRMatrixMixin):
    """Conv2d whose ``(out_channels, in_channels * kh * kw)`` kernel matrix is GBLR.

    The kernel matrix's columns are ordered as ``nn.Conv2d.weight.reshape(out, -1)``
    (input channel, then kernel row, then kernel column). Only ``groups=1`` and zero
    padding are supported.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as
            ``nn.Conv2d`` (``padding`` may be an int, a pair, ``"valid"`` or ``"same"``).
        rank_per_component, num_components, structure_init, init_cost, factor_init: as
            [`gblr.GBLRLinear`][], over the kernel matrix.
        widths, locations, sigma, evaluation_order, device, dtype: as
            [`gblr.GBLRLinear`][]; ``evaluation_order="factored"`` evaluates a
            ``K r``-channel convolution followed by a 1x1 convolution.

    Shapes:
        input ``(N, C_in, H, W)`` or ``(C_in, H, W)``; output ``(N, C_out, H', W')`` with
        ``H'``, ``W'`` as for ``nn.Conv2d``.

    Examples:
        >>> import torch, gblr
        >>> conv = gblr.GBLRConv2d(3, 16, 3, padding=1)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    counts_per_position = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        rank_per_component: int = 1,
        num_components: int | None = None,
        structure_init: StructureInit = "full",
        init_cost: float | None = None,
        factor_init: FactorInit = "balanced",
        widths: Tensor | Sequence | None = None,
        locations: Tensor | Sequence | None = None,
        sigma: float | None = None,
        evaluation_order: EvaluationOrder = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = positive_pair("kernel_size", kernel_size)
        self.stride = positive_pair("stride", stride)
        self.dilation = positive_pair("dilation", dilation)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(
                    f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}"
                )
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' needs stride=1, as in nn.Conv2d")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = positive_pair("padding", padding, minimum=0)
        kh, kw = self.kernel_size
        self._init_gblr(
            out_channels,
            in_channels * kh * kw,
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
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
            bound = 1.0 / math.sqrt(in_channels * kh * kw)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)
        else:
            self.register_parameter("bias", None)

    def _output_positions(self, x: Tensor) -> int:
        batch = x.shape[0] if x.dim() == 4 else 1
        if self.padding == "same":
            return batch * x.shape[-2] * x.shape[-1]
        pad = (0, 0) if self.padding == "valid" else self.padding
        sizes = []
        for dim, (k, s, d, p) in enumerate(zip(self.kernel_size, self.stride, self.dilation, pad)):
            size = x.shape[-2 + dim]
            sizes.append(max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1))
        return batch * sizes[0] * sizes[1]

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H', W')`` (unbatched ``(C_in, H, W)`` too)."""
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"input must be (N, in_channels={self.in_channels}, H, W) or "
                f"(in_channels, H, W), got shape {tuple(x.shape)}"
            )
        conv = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        u, v = self.masked_factors()
        kernel_shape = (self.in_channels, *self.kernel_size)
        if self._choose_order(self._output_positions(x)) == "materialize":
            kernel = (u.t() @ v).reshape(self.out_channels, *kernel_shape)
            return F.conv2d(x, kernel, self.bias, **conv)
        hidden = F.conv2d(x, v.reshape(-1, *kernel_shape), None, **conv)
        return F.conv2d(hidden, u.t().reshape(self.out_channels, -1, 1, 1), self.bias)

    def dense_weight(self) -> Tensor:
        """The ``(out_channels, in_channels * kh * kw)`` kernel matrix in the current mode."""
        return self.gblr_weight()

    def dense_kernel(self) -> Tensor:
        """The kernel as ``nn.Conv2d.weight``: ``(out_channels, in_channels, kh, kw)``."""
        return self.gblr_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def flops(self) -> int:
        """MACs per output position, live components only (integer intervals of eval)."""
        return self.matrix_flops()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, {self._gblr_extra_repr()}"
        )
