"""``GBLRConv2d``: a 2-D convolution whose kernel matrix is a learned GBLR matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .base import EvaluationOrder, FactorInit, GBLRMatrixMixin, StructureInit, check_positive_int

__all__ = ["GBLRConv2d"]

# The constructor arguments that fix a convolution's geometry, in the order of
# ``nn.Conv2d``'s, GBLRConv2d's and FrozenGBLRConv2d's signatures.
CONV_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")


def positive_pair(name: str, value: int | tuple[int, int], minimum: int = 1) -> tuple[int, int]:
    """``value`` as a pair of ints ``>= minimum`` (an int is used for both sides), as the
    convolution arguments ``kernel_size``, ``stride``, ``padding`` and ``dilation``.

    The check of each pair of ``checked_geometry``.

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


def checked_geometry(
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: int | tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int] | str, tuple[int, int]]:
    """``(kernel_size, stride, padding, dilation)`` checked as ``nn.Conv2d`` takes them,
    pairs as tuples (``padding`` may also be ``"valid"`` or ``"same"``, the latter with
    ``stride=1``).

    Shared by [`gblr.GBLRConv2d`][] and [`gblr.deploy.FrozenGBLRConv2d`][], so that both
    accept and refuse the same geometry.

    Raises:
        TypeError: an argument is not an int or a pair of ints (see ``positive_pair``).
        ValueError: a size below 1 (a padding below 0), another padding string, or
            ``padding="same"`` with a stride; the argument is named in the message.

    Examples:
        >>> from gblr.layers.conv import checked_geometry
        >>> checked_geometry(3, 2, 1, 1)
        ((3, 3), (2, 2), (1, 1), (1, 1))
        >>> checked_geometry((1, 3), 1, "same", 2)[2]
        'same'
    """
    kernel_size = positive_pair("kernel_size", kernel_size)
    stride = positive_pair("stride", stride)
    dilation = positive_pair("dilation", dilation)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError("padding='same' needs stride=1, as in nn.Conv2d")
        return kernel_size, stride, padding, dilation
    return kernel_size, stride, positive_pair("padding", padding, minimum=0), dilation


_OTHER_TORCH_CONVS = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def unsupported_conv(conv: nn.Module) -> str | None:
    """Why a GBLR convolution cannot take ``conv``'s place, or ``None`` when it can.

    The GBLR convolutions compute ``groups=1`` convolutions with zero padding;
    [`gblr.convert`][] skips a convolution with this reason, and
    [`GBLRConv2d.like`][gblr.GBLRConv2d.like] refuses it with it.

    Examples:
        >>> import torch
        >>> from gblr.layers.conv import unsupported_conv
        >>> unsupported_conv(torch.nn.Conv2d(4, 4, 3)) is None
        True
        >>> unsupported_conv(torch.nn.Conv2d(4, 4, 3, groups=2))
        'grouped convolution (groups=2) is not supported'
    """
    groups = getattr(conv, "groups", 1)
    if groups != 1:
        return f"grouped convolution (groups={groups}) is not supported"
    padding_mode = getattr(conv, "padding_mode", "zeros")
    if padding_mode != "zeros":
        return f"padding_mode={padding_mode!r} is not supported (only 'zeros')"
    return None


def conv_geometry(conv: nn.Module) -> dict[str, Any]:
    """The geometry of a 2-D convolution, as keyword arguments of its constructor.

    One place for what a layer that replaces, freezes or rebuilds a convolution copies
    from it: ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``
    and ``dilation`` (in that order, as ``CONV_GEOMETRY``), each as ``conv`` holds it
    (pairs as tuples; ``padding`` may be ``"same"`` or ``"valid"``).

    Args:
        conv: an ``nn.Conv2d``, a [`gblr.GBLRConv2d`][] or a
            [`gblr.FrozenGBLRConv2d`][]: any module with those six attributes.

    Raises:
        TypeError: ``conv`` is not a 2-D convolution (it lacks one of the attributes,
            or is another of torch's convolutions, a transposed one included).
        ValueError: ``conv`` is a convolution the GBLR layers do not compute (grouped,
            or padded other than with zeros; the reason is ``unsupported_conv``'s).

    Examples:
        >>> import torch
        >>> from gblr.layers.conv import conv_geometry
        >>> geometry = conv_geometry(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1))
        >>> geometry["kernel_size"], geometry["stride"], geometry["padding"]
        ((3, 3), (2, 2), (1, 1))
    """
    missing = [name for name in CONV_GEOMETRY if not hasattr(conv, name)]
    # torch's other convolutions have the same attributes and compute something else
    if missing or isinstance(conv, _OTHER_TORCH_CONVS):
        lacking = f" without {missing}" if missing else ""
        raise TypeError(
            "conv must be a 2-D convolution (nn.Conv2d, gblr.GBLRConv2d or "
            f"gblr.FrozenGBLRConv2d), got {type(conv).__name__}{lacking}"
        )
    reason = unsupported_conv(conv)
    if reason is not None:
        raise ValueError(f"conv ({type(conv).__name__}): {reason}")
    return {name: getattr(conv, name) for name in CONV_GEOMETRY}


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

    @classmethod
    def like(cls, conv: nn.Module, **options: Any) -> GBLRConv2d:
        """A GBLR convolution with ``conv``'s geometry, to take its place.

        ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding`` and
        ``dilation`` are ``conv``'s; ``bias`` (whether there is one), ``device`` and
        ``dtype`` are ``conv``'s unless given. The weights are not copied: the factors,
        widths and locations are initialized as ``options`` say (for a fit of ``conv``'s
        kernel, see [`gblr.convert`][]).

        Args:
            conv: an ``nn.Conv2d`` (``groups=1``, ``padding_mode="zeros"``), a
                [`gblr.GBLRConv2d`][] or a [`gblr.FrozenGBLRConv2d`][].
            **options: the other keyword arguments of [`gblr.GBLRConv2d`][] (``bias``,
                ``rank_per_component``, ``num_components``, ``structure_init``, ...).

        Returns:
            The new layer; on input ``(N, C_in, H, W)`` its output has ``conv``'s shape
            ``(N, C_out, H', W')``.

        Raises:
            TypeError: ``conv`` is not a 2-D convolution, or ``options`` names a geometry
                argument (those are ``conv``'s).
            ValueError: ``conv`` is grouped or not zero-padded, which a GBLR convolution
                does not compute.

        Examples:
            >>> import torch, gblr
            >>> conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
            >>> layer = gblr.GBLRConv2d.like(conv, num_components=4)
            >>> layer.stride, layer.padding, layer.bias is None
            ((2, 2), (1, 1), True)
            >>> x = torch.randn(2, 3, 8, 8)
            >>> layer(x).shape == conv(x).shape
            True
        """
        given = sorted(set(options) & set(CONV_GEOMETRY))
        if given:
            raise TypeError(
                f"GBLRConv2d.like takes the geometry from conv; got {given} in options, "
                "which may only hold the other GBLRConv2d arguments"
            )
        geometry = conv_geometry(conv)
        template = next(
            (t for t in (*conv.parameters(), *conv.buffers()) if t.is_floating_point()), None
        )
        options.setdefault("bias", getattr(conv, "bias", None) is not None)
        if template is not None:
            options.setdefault("device", template.device)
            options.setdefault("dtype", template.dtype)
        return cls(**geometry, **options)

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
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size, self.stride, self.padding, self.dilation = checked_geometry(
            kernel_size, stride, padding, dilation
        )
        kh, kw = self.kernel_size
        self._init_gblr(
            self.out_channels,
            self.in_channels * kh * kw,
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
        # no computed component (all off): the zero kernel, as a 0-channel conv is refused
        order = self._choose_order(self._output_positions(x), u.shape[0])
        if u.shape[0] == 0 or order == "materialize":
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
