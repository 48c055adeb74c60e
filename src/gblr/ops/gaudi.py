"""Interval masks for GBLR components: the differentiable Gaudi mask and the exact boxcar.

An interval of a dimension of size ``n`` is given by a width ``w`` and a location ``l``,
both fractions of ``n``: it covers the indices ``l*n, l*n + 1, ..., l*n + w*n - 1``,
wrapping around modulo ``n`` (docs/design.md#a-gblr-matrix).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "boxcar_mask",
    "gaudi_mask",
    "gaudi_mask_on_grid",
    "interval_lengths",
    "interval_starts",
    "mask_factors",
    "round_to_grid",
]


def _check_interval_tensors(width: Tensor, location: Tensor, n: int) -> None:
    if not isinstance(width, Tensor) or not isinstance(location, Tensor):
        raise TypeError(
            "width and location must be torch.Tensor, got "
            f"{type(width).__name__} and {type(location).__name__}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int (the dimension size), got {n!r}")
    if width.shape != location.shape:
        raise ValueError(
            f"width and location must have the same shape, got {tuple(width.shape)} "
            f"and {tuple(location.shape)}"
        )


def _mask_dtype(dtype: torch.dtype) -> torch.dtype:
    # FFTs need float32 or float64; half-precision widths are computed in float32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def gaudi_mask(
    width: Tensor,
    location: Tensor,
    n: int,
    sigma: float | Tensor | None = None,
) -> Tensor:
    """Gaussian-Dirichlet (Gaudi) masks of ``K`` circular intervals on a grid of size ``n``.

    The mask is the inverse real DFT of the boxcar's closed-form spectrum, evaluated at
    real-valued width and location, times a Gaussian low-pass filter
    (docs/design.md#the-gaudi-mask)::

        M[k] = w sinc(k w) / sinc(k / n) exp(-i pi k (2 l + w - 1/n)) exp(-k^2 / (2 sigma^2))
        mask = irfft(M, n, norm="forward"),   k = 0 .. n // 2

    With ``sigma=None`` (or ``inf``) and ``w*n``, ``l*n`` integers, this is exactly the
    circular boxcar; a zero width gives the zero mask. The mask is smooth in ``w`` and ``l``
    for every ``sigma``, so gradients flow to both.

    Args:
        width: ``(K,)`` (or any shape ``S``) widths as fractions of ``n``, usually in [0, 1].
        location: same shape as ``width``; starting points as fractions of ``n``.
            Periodic with period 1.
        n: size of the masked dimension.
        sigma: Gaussian bandwidth in frequency bins; ``None`` or ``inf`` for no smoothing.
            A float or a 0-d tensor, must be positive.

    Returns:
        Tensor of shape ``S + (n,)``: float64 if the inputs are float64, else float32.

    Examples:
        >>> import torch, gblr
        >>> gblr.gaudi_mask(torch.tensor([0.5]), torch.tensor([0.75]), 4).round().abs()
        tensor([[1., 0., 0., 1.]])
    """
    _check_interval_tensors(width, location, n)
    dtype = _mask_dtype(torch.promote_types(width.dtype, location.dtype))
    w = width.to(dtype).unsqueeze(-1)
    loc = location.to(dtype).unsqueeze(-1)
    k = torch.arange(n // 2 + 1, device=width.device, dtype=dtype)

    amplitude = w * torch.sinc(k * w) / torch.sinc(k / n)
    if sigma is not None:
        sigma_t = torch.as_tensor(sigma, dtype=torch.float64, device=width.device)
        if sigma_t.numel() != 1 or not bool(sigma_t.reshape(()) > 0):
            raise ValueError(f"sigma must be a positive number or None, got {sigma!r}")
        # exp(-(k / σ)² / 2) in float64: neither σ² nor k² / σ² can underflow to 0 / 0
        # (NaN) for a tiny σ, and σ = inf gives exactly 1 (the Dirichlet form).
        amplitude = amplitude * _gaussian(k.double(), sigma_t).to(dtype)
    phase = (-math.pi) * k * (2.0 * loc + w - 1.0 / n)
    spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
    return torch.fft.irfft(spectrum, n=n, dim=-1, norm="forward")


def _gaussian(k: Tensor, sigma: Tensor | float) -> Tensor:
    """The low-pass filter ``exp(-k² / (2 σ²))``, written as ``exp(-(k / σ)² / 2)`` so that
    a tiny σ gives 0 and not ``0 / 0`` at ``k = 0`` (σ² underflows first), and ``σ = inf``
    gives exactly 1: the unsmoothed (exact boxcar) mask."""
    return torch.exp(-0.5 * (k / sigma).square())


def round_to_grid(fraction: Tensor, n: int) -> Tensor:
    """Round fractions of ``n`` to multiples of ``1/n`` with a straight-through gradient.

    The value is ``round(fraction * n) / n``; the gradient is that of the identity, so a
    width or location keeps learning while the mask it drives stays on the grid.

    Args:
        fraction: any shape.
        n: grid size (positive int).

    Returns:
        Tensor of the same shape and dtype as ``fraction``.
    """
    rounded = torch.round(fraction * n) / n
    return fraction + (rounded - fraction).detach()


def _check_finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value.detach())).nonzero()[0].tolist()
        raise ValueError(
            f"{name} must be finite to give an integer interval, got "
            f"{float(value.detach()[tuple(bad)])} at index {tuple(bad)}"
        )


def interval_lengths(width: Tensor, n: int) -> Tensor:
    """Integer interval lengths ``round(clamp(w, 0, 1) * n)`` as int64, same shape as ``width``.

    A NaN or infinite width is a ``ValueError`` (it has no integer length; converting it
    would give an arbitrary integer)."""
    _check_finite("width", width)
    return _lengths(width, n)


def interval_starts(location: Tensor, n: int) -> Tensor:
    """Integer interval starts ``round(l * n) mod n`` as int64, same shape as ``location``.

    A NaN or infinite location is a ``ValueError``."""
    _check_finite("location", location)
    return _starts(location, n)


# The masks' own rounding, with no host read (it runs in every training forward and in
# compiled graphs). A non-finite value would convert to an arbitrary int64 (an index out of
# range); it gets the empty interval here, and the masks that use these are NaN there.
# ``finite=True`` (the caller has checked every value) skips those element-wise guards:
# the same result, fewer small kernels per training forward.
def _lengths(width: Tensor, n: int, finite: bool = False) -> Tensor:
    width = width.detach()
    lengths = torch.round(width.clamp(0.0, 1.0) * n)
    if not finite:
        lengths = torch.where(torch.isfinite(width), lengths, 0.0)
    return lengths.to(torch.int64)


def _starts(location: Tensor, n: int, finite: bool = False) -> Tensor:
    location = location.detach()
    if not finite:
        location = torch.where(torch.isfinite(location), location, 0.0)
    return torch.remainder(torch.round(location * n).to(torch.int64), n)


def _poison(mask: Tensor, width: Tensor, location: Tensor) -> Tensor:
    """``mask`` with NaN rows where the width or location is not finite: a NaN structure
    gives a NaN output, not an arbitrary interval or a silently dropped component."""
    finite = torch.isfinite(width.detach()) & torch.isfinite(location.detach())
    return torch.where(finite.unsqueeze(-1), mask, torch.nan)


def _known_finite(widths: Tensor, locations: Tensor) -> bool:
    """Whether every width and location is finite, known without an element-wise pass:
    a float64 sum is finite only if every entry is. Only on the CPU (elsewhere reading
    the answer would cost a device sync per forward): ``False`` means "not known"."""
    if widths.device.type != "cpu":
        return False
    total = widths.detach().sum(dtype=torch.float64) + locations.detach().sum(dtype=torch.float64)
    return math.isfinite(float(total))


def boxcar_mask(
    width: Tensor, location: Tensor, n: int, dtype: torch.dtype | None = None
) -> Tensor:
    """Exact 0/1 circular boxcar masks from the integer intervals of ``width`` and ``location``.

    Args:
        width: ``(K,)`` (or shape ``S``) widths as fractions of ``n`` (clamped to [0, 1]
            when rounding: the integer length is ``round(w * n)``).
        location: same shape; start ``round(l * n) mod n``.
        n: size of the masked dimension.
        dtype: output dtype (default: float32, or float64 for float64 inputs).

    Returns:
        Tensor of shape ``S + (n,)`` holding exact zeros and ones (NaN rows for a NaN or
        infinite width or location). Not differentiable.

    Examples:
        >>> import torch, gblr
        >>> gblr.boxcar_mask(torch.tensor([0.5]), torch.tensor([0.75]), 4)  # wraps around
        tensor([[1., 0., 0., 1.]])
    """
    _check_interval_tensors(width, location, n)
    if dtype is None:
        dtype = _mask_dtype(torch.promote_types(width.dtype, location.dtype))
    lengths = _lengths(width, n).unsqueeze(-1)
    starts = _starts(location, n).unsqueeze(-1)
    index = torch.arange(n, device=width.device)
    return _poison((torch.remainder(index - starts, n) < lengths).to(dtype), width, location)


@functools.lru_cache(maxsize=64)
def _grid_kernels(
    n: int, sigma: float | None, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Lookup tables for [`gaudi_mask_on_grid`][gblr.ops.gaudi.gaudi_mask_on_grid], computed in
    float64.

    Returns:
        ``cumulative`` ``(3n + 1,)``: entry ``i + 2n`` (``-2n <= i <= n``) is the sum of the
        Gaussian smoothing kernel over ``[0, i)``, the kernel extended periodically, so a
        smoothed boxcar is the difference of two windows of this table; ``edge`` ``(2n,)``:
        two periods of the derivative of a mask with respect to its width, for a box that
        ends at index 0.

    Cached: σ changes once per optimizer step at most, while every forward of every layer
    of size ``n`` asks for the same tables; rebuilding them costs a dozen small kernels
    (two FFTs), which dominates a GPU step. The tables are read-only.
    """
    # Built outside inference mode: the tables are saved for backward by later calls.
    with torch.inference_mode(False), torch.no_grad():
        return _build_grid_kernels(n, sigma, dtype, device)


def _build_grid_kernels(
    n: int, sigma: float | None, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    k = torch.arange(n // 2 + 1, device=device, dtype=torch.float64)
    gauss = torch.ones_like(k) if sigma is None else _gaussian(k, sigma)
    if sigma is None:
        # The kernel is a unit impulse: the table counts multiples of n, exactly.
        index = torch.arange(-2 * n, n + 1, device=device)
        periods = torch.div(index, n, rounding_mode="floor")
        cumulative = (periods + (torch.remainder(index, n) > 0).long()).double()
    else:
        smoothing = torch.fft.irfft(gauss.to(torch.complex128), n=n, norm="backward")
        cumulative = _cumulative_table(smoothing, n)
    # d/dw of w sinc(kw) exp(-i pi k w) is exp(-2 i pi k w): an edge kernel at the box's end.
    edge_amplitude = gauss / torch.sinc(k / n)
    phase = math.pi * k / n
    edge_spectrum = torch.complex(
        edge_amplitude * torch.cos(phase), edge_amplitude * torch.sin(phase)
    )
    edge = torch.fft.irfft(edge_spectrum, n=n, norm="forward")
    return cumulative.to(dtype), torch.cat([edge, edge]).to(dtype)


def _cumulative_table(smoothing: Tensor, n: int) -> Tensor:
    """``(3n + 1,)``: entry ``i + 2n`` (``-2n <= i <= n``) sums the ``(n,)`` kernel
    ``smoothing``, extended periodically, over ``[0, i)``."""
    index = torch.arange(-2 * n, n + 1, device=smoothing.device)
    periods = torch.div(index, n, rounding_mode="floor")
    prefix = torch.cat([smoothing.new_zeros(1), torch.cumsum(smoothing, 0)])
    return prefix[torch.remainder(index, n)] + periods * prefix[n]


class _GaudiMaskOnGrid(torch.autograd.Function):
    """Every row of the output is a window of a 1-D table, so only ``(K,)`` index arithmetic
    is needed and the ``(K, n)`` work is contiguous row copies and one reduction."""

    @staticmethod
    def forward(ctx, width, location, n, sigma, dtype, finite=False):  # type: ignore[override]
        mask, starts, lengths, edge = _grid_mask_forward(width, location, n, sigma, dtype, finite)
        ctx.save_for_backward(starts, lengths, edge)
        ctx.n = n
        return mask.reshape(*width.shape, n)

    @staticmethod
    def backward(ctx, grad_mask, *_):  # type: ignore[override]
        starts, lengths, edge = ctx.saved_tensors
        grad_width, grad_location = _grid_mask_backward(grad_mask, starts, lengths, edge, ctx.n)
        return grad_width, grad_location, None, None, None, None


def apply_function(
    plain: type[torch.autograd.Function],
    twin: type[torch.autograd.Function],
    *arguments: object,
    outputs: int = 1,
) -> Any:
    """``plain.apply(*arguments)``, or under a ``torch.func`` transform the same through
    ``twin``, its transform-ready form, whose first ``outputs`` outputs are ``plain``'s
    (the rest carry what its backward needs)."""
    if transforms_active():
        result = twin.apply(*arguments)
        return result[0] if outputs == 1 else result[:outputs]
    return plain.apply(*arguments)


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) is running.

    Each custom ``autograd.Function`` here has a twin for the transforms (a ``forward``
    without ``ctx``, a ``setup_context``, a generated vmap rule), which functorch
    requires; outside them the plain one runs, as torch binds a ``setup_context``
    Function's arguments through ``inspect.signature`` on every call, several times the
    plain one's call overhead.

    Examples:
        >>> import torch
        >>> from gblr.ops.gaudi import transforms_active
        >>> transforms_active()
        False
        >>> torch.func.grad(lambda x: x * transforms_active())(torch.tensor(2.0))
        tensor(1.)
    """
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


class _GaudiMaskOnGridForTransforms(_GaudiMaskOnGrid):
    """[`_GaudiMaskOnGrid`][gblr.ops.gaudi._GaudiMaskOnGrid] as ``torch.func`` takes it: what
    the backward needs comes out as outputs without gradients (callers keep the first)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(width, location, n, sigma, dtype, finite=False):  # type: ignore[override]
        mask, starts, lengths, _ = _grid_mask_forward(width, location, n, sigma, dtype, finite)
        return mask.reshape(*width.shape, n), starts, lengths

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        width, _, n, sigma, dtype = inputs[:5]
        ctx.mark_non_differentiable(*output[1:])
        # the cached edge table, looked up again rather than returned as an output
        ctx.save_for_backward(*output[1:], _grid_kernels(n, sigma, dtype, width.device)[1])
        ctx.n = n


def _grid_mask_forward(
    width: Tensor, location: Tensor, n: int, sigma: float | None, dtype: torch.dtype, finite: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mask (K, n), starts, lengths, edge)``: the forward of
    [`_GaudiMaskOnGrid`][gblr.ops.gaudi._GaudiMaskOnGrid] for widths and locations of any
    shape (``K`` entries; ``starts`` and ``lengths`` keep their shape), and what its backward
    needs."""
    lengths, starts = _lengths(width, n, finite), _starts(location, n, finite)
    cumulative, edge = _grid_kernels(n, sigma, dtype, width.device)
    windows = cumulative.unfold(0, n, 1)  # row a: cumulative[a : a + n]
    # mask[j] = C(j - s + 1) - C(j - s - L + 1), C the table's value at offset 2n.
    first = (2 * n + 1) - starts
    mask = windows.index_select(0, first.reshape(-1)) - windows.index_select(
        0, (first - lengths).reshape(-1)
    )
    if not finite:
        mask = _poison(mask, width.reshape(-1), location.reshape(-1))
    return mask, starts, lengths, edge


def _grid_mask_backward(
    grad_mask: Tensor,
    starts: Tensor,
    lengths: Tensor,
    edge: Tensor,
    n: int,
    locations: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(grad_width, grad_location)`` of the masks' ``(K, n)`` gradient ``grad_mask``:
    the edge kernel at the box's end (width) and at both ends (location; ``None`` without
    ``locations``)."""
    periods = edge.unfold(0, n, 1)  # row a: edge[(a + j) mod n], 0 <= a <= n
    grad_mask = grad_mask.reshape(-1, n).to(edge.dtype)
    at_end = periods.index_select(0, torch.remainder(-(starts + lengths), n).reshape(-1))
    grad_end = torch.linalg.vecdot(grad_mask, at_end).reshape(starts.shape)
    if not locations:
        return grad_end, None
    at_start = periods.index_select(0, torch.remainder(-starts, n).reshape(-1))
    grad_start = torch.linalg.vecdot(grad_mask, at_start).reshape(starts.shape)
    # Widening moves the end; moving the box moves both ends the same way.
    return grad_end, grad_end - grad_start


class _MaskFactorsTorch(torch.autograd.Function):
    """Both factors masked by their Gaudi masks in one autograd node: the same arithmetic as
    two [`_GaudiMaskOnGrid`][gblr.ops.gaudi._GaudiMaskOnGrid] masks times the factors under
    autograd (so the same numbers, bit for bit), without the dozen nodes per layer (selects,
    dtype copies, broadcasts) whose bookkeeping was much of a small layer's training step."""

    @staticmethod
    def forward(ctx, factor_u, factor_v, widths, locations, sigma, dtype, finite, skip=None):  # type: ignore[override]
        outputs, saved = _masked_factors(
            factor_u, factor_v, widths, locations, sigma, dtype, finite
        )
        ctx.save_for_backward(factor_u, factor_v, *saved)
        ctx.skip, ctx.mask_dtype = skip, dtype
        return outputs

    @staticmethod
    def backward(ctx, grad_u, grad_v, *_):  # type: ignore[override]
        (
            factor_u, factor_v, row_scale, row_starts, row_lengths, row_edge,
            col_scale, col_starts, col_lengths, col_edge,
        ) = ctx.saved_tensors  # fmt: skip
        needs_u, needs_v, needs_widths, needs_locations = ctx.needs_input_grad[:4]
        grad_factor_u = grad_u * row_scale if needs_u and factor_u is not None else None
        grad_factor_v = grad_v * col_scale if needs_v and factor_v is not None else None
        grad_widths = grad_locations = None
        if needs_widths or needs_locations:
            # ``skip``: (input widths, output widths, locations) whose gradients a structure
            # learner discards (it holds them); they come back as zeros, the rest is the
            # same arithmetic as without it, bit for bit.
            skip_widths = ctx.skip[:2] if ctx.skip is not None else (False, False)
            skip_locations = not needs_locations or (ctx.skip is not None and ctx.skip[2])
            # One zeros tensor for every skipped gradient and every side not masked here:
            # both sides' starts have the components' shape, the tables the mask's dtype.
            known = row_starts if row_starts is not None else col_starts
            zeros = torch.zeros(known.shape, dtype=ctx.mask_dtype, device=known.device)
            sides = []
            for grad, factor, starts, lengths, edge, skip_width in (
                (grad_v, factor_v, col_starts, col_lengths, col_edge, skip_widths[0]),
                (grad_u, factor_u, row_starts, row_lengths, row_edge, skip_widths[1]),
            ):
                if factor is None or (skip_width and skip_locations):
                    sides.append((zeros, zeros))
                    continue
                # What autograd does for ``factor * mask.to(factor.dtype).unsqueeze(1)``:
                # the product's gradient summed over the broadcast rank dimension (no sum
                # at rank 1, where the shapes already match), back in the mask's dtype.
                grad_mask = grad * factor
                if factor.shape[1] > 1:
                    grad_mask = grad_mask.sum(1, keepdim=True)
                grad_mask = grad_mask.squeeze(1).to(ctx.mask_dtype)
                grad_width, grad_location = _grid_mask_backward(
                    grad_mask, starts, lengths, edge, factor.shape[2], not skip_locations
                )
                sides.append(
                    (
                        zeros if skip_width else grad_width,
                        zeros if grad_location is None else grad_location,
                    )
                )
            grad_widths = torch.stack([sides[0][0], sides[1][0]]) if needs_widths else None
            grad_locations = torch.stack([sides[0][1], sides[1][1]]) if needs_locations else None
        return grad_factor_u, grad_factor_v, grad_widths, grad_locations, None, None, None, None


def _masked_factors(
    factor_u: Tensor | None,
    factor_v: Tensor | None,
    widths: Tensor,
    locations: Tensor,
    sigma: float | None,
    dtype: torch.dtype,
    finite: bool,
) -> tuple[tuple[Tensor | None, Tensor | None], list[Tensor | None]]:
    """The forward of [`_MaskFactorsTorch`][gblr.ops.gaudi._MaskFactorsTorch]: ``((U_masked,
    V_masked), saved)``, ``saved`` each side's ``scale, starts, lengths, edge`` (rows
    first). A factor given as ``None`` is not masked (its output and saved entries are
    ``None``): the caller computes that side itself (`strip_factors`); its widths and
    locations get zero gradients."""
    saved: list[Tensor | None] = []
    outputs: list[Tensor | None] = []
    for factor, side in ((factor_u, 1), (factor_v, 0)):
        if factor is None:
            saved += [None] * 4
            outputs.append(None)
            continue
        mask, starts, lengths, edge = _grid_mask_forward(
            widths[side], locations[side], factor.shape[2], sigma, dtype, finite
        )
        scale = mask.to(factor.dtype).unsqueeze(1)
        saved += [scale, starts, lengths, edge]
        outputs.append(factor * scale)
    return (outputs[0], outputs[1]), saved


class _MaskFactorsTorchForTransforms(_MaskFactorsTorch):
    """[`_MaskFactorsTorch`][gblr.ops.gaudi._MaskFactorsTorch] as ``torch.func`` takes it: the
    saved tensors come out after the two masked factors, without gradients."""

    generate_vmap_rule = True

    @staticmethod
    def forward(factor_u, factor_v, widths, locations, sigma, dtype, finite, skip=None):  # type: ignore[override]
        outputs, saved = _masked_factors(
            factor_u, factor_v, widths, locations, sigma, dtype, finite
        )
        return (*outputs, *saved[0:3], *saved[4:7])  # the cached edge tables left out

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        factor_u, factor_v, widths, _, sigma, dtype = inputs[:6]
        rows, cols = output[2:5], output[5:8]
        ctx.mark_non_differentiable(*(t for t in (*rows, *cols) if t is not None))
        edges = [
            None
            if factor is None
            else _grid_kernels(factor.shape[2], sigma, dtype, widths.device)[1]
            for factor in (factor_u, factor_v)
        ]
        ctx.save_for_backward(factor_u, factor_v, *rows, edges[0], *cols, edges[1])
        ctx.skip = inputs[7] if len(inputs) > 7 else None
        ctx.mask_dtype = dtype


def gaudi_mask_on_grid(
    width: Tensor,
    location: Tensor,
    n: int,
    sigma: float | Tensor | None = None,
) -> Tensor:
    """Gaudi masks at widths and locations rounded to the grid, with a straight-through gradient.

    Equal to ``gaudi_mask(round_to_grid(clamp(width, 0, 1), n), round_to_grid(location, n),
    n, sigma)`` in value and in gradient, but computed without per-element trigonometry or
    an FFT per component: at grid points a Gaudi mask is the boxcar circularly convolved
    with a Gaussian kernel, i.e. the difference of two entries of a cumulative-sum table,
    and its derivatives in width and location are a fixed edge kernel placed at the box's
    ends. Cost ``O(K n)`` row copies plus two FFTs of size ``n`` per call. With
    ``sigma=None`` the masks are exact 0/1 boxcars (only the gradient uses the Dirichlet
    form).

    Args:
        width: ``(K,)`` (or shape ``S``) widths as fractions of ``n``.
        location: same shape; locations as fractions of ``n``.
        n: size of the masked dimension.
        sigma: Gaussian bandwidth in frequency bins, ``None``/``inf`` for none.

    Returns:
        ``S + (n,)`` masks, float64 for float64 inputs, else float32.
    """
    _check_interval_tensors(width, location, n)
    dtype = _mask_dtype(torch.promote_types(width.dtype, location.dtype))
    return apply_function(
        _GaudiMaskOnGrid,
        _GaudiMaskOnGridForTransforms,
        width,
        location,
        n,
        _sigma_or_none(sigma),
        dtype,
    )


def _sigma_or_none(sigma: float | Tensor | None) -> float | None:
    """A checked Gaussian bandwidth: a positive float, or ``None`` for none (also ``inf``)."""
    if sigma is None:
        return None
    value = float(sigma)
    if not value > 0:
        raise ValueError(f"sigma must be a positive number or None, got {sigma!r}")
    return None if math.isinf(value) else value


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_triton_device(*tensors: Tensor) -> None:
    """Compiled Triton kernels read CUDA memory only; CPU tensors run through Triton's
    interpreter (``TRITON_INTERPRET=1``) alone, and otherwise fail deep inside Triton."""
    if not _triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"} and not (interpreted and devices == {"cpu"}):
        raise ValueError(
            f"backend='triton' needs every tensor on one CUDA device (or CPU tensors under "
            f"TRITON_INTERPRET=1), got devices {sorted(devices)}"
        )


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype if autocast is enabled for ``device_type``, else ``None``.

    Examples:
        >>> import torch
        >>> from gblr.ops.gaudi import autocast_dtype
        >>> print(autocast_dtype("cpu"))
        None
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype("cpu")
        torch.bfloat16
    """
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 only knows the CUDA flag
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_dtype(device_type) if enabled else None


class _MaskFactorsTriton(torch.autograd.Function):
    """Both factors masked in one Triton launch each way; the grid rounding of widths and
    locations happens inside the kernels too, so a call launches nothing else."""

    @staticmethod
    def forward(ctx, factor_u, factor_v, widths, locations, sigma, out_dtype):  # type: ignore[override]
        import triton

        from . import triton_mask

        k, rank, rows = factor_u.shape
        cols = factor_v.shape[2]
        table_dtype = torch.float64 if factor_u.dtype == torch.float64 else torch.float32
        u_cumulative, u_edge = _grid_kernels(rows, sigma, table_dtype, factor_u.device)
        v_cumulative, v_edge = _grid_kernels(cols, sigma, table_dtype, factor_u.device)
        factor_u, factor_v = factor_u.contiguous(), factor_v.contiguous()
        # The kernels give a non-finite width or location the empty interval themselves.
        widths, locations = widths.detach().contiguous(), locations.detach().contiguous()
        u_out = torch.empty(factor_u.shape, dtype=out_dtype, device=factor_u.device)
        v_out = torch.empty(factor_v.shape, dtype=out_dtype, device=factor_u.device)
        block = triton_mask.block_size(max(rows, cols))
        grid = (k, triton.cdiv(max(rows, cols), block), 2)
        triton_mask.masked_factors_forward_kernel[grid](
            factor_u,
            u_out,
            u_cumulative,
            factor_v,
            v_out,
            v_cumulative,
            widths,
            locations,
            k,
            rank,
            rows,
            cols,
            BLOCK=block,
        )
        ctx.save_for_backward(
            factor_u, factor_v, widths, locations, u_cumulative, u_edge, v_cumulative, v_edge
        )
        ctx.block = block
        return u_out, v_out

    @staticmethod
    def backward(ctx, grad_u, grad_v):  # type: ignore[override]
        from . import triton_mask

        (factor_u, factor_v, widths, locations, u_cumulative, u_edge, v_cumulative, v_edge) = (
            ctx.saved_tensors
        )
        k, rank, rows = factor_u.shape
        cols = factor_v.shape[2]
        # An output unused by the loss arrives as None: its gradient is zero.
        grad_u = torch.zeros_like(factor_u) if grad_u is None else grad_u.contiguous()
        grad_v = torch.zeros_like(factor_v) if grad_v is None else grad_v.contiguous()
        u_grad = torch.empty_like(factor_u)
        v_grad = torch.empty_like(factor_v)
        grad_widths = torch.empty(widths.shape, dtype=u_cumulative.dtype, device=widths.device)
        grad_locations = torch.empty_like(grad_widths)
        triton_mask.masked_factors_backward_kernel[(k, 2)](
            grad_u,
            factor_u,
            u_grad,
            u_cumulative,
            u_edge,
            grad_v,
            factor_v,
            v_grad,
            v_cumulative,
            v_edge,
            widths,
            locations,
            grad_widths,
            grad_locations,
            k,
            rank,
            rows,
            cols,
            BLOCK=ctx.block,
        )
        return (
            u_grad,
            v_grad,
            grad_widths.to(widths.dtype),
            grad_locations.to(locations.dtype),
            None,
            None,
        )


def mask_factors(
    factor_u: Tensor,
    factor_v: Tensor,
    widths: Tensor,
    locations: Tensor,
    sigma: float | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The factors of a GBLR matrix masked by their Gaudi masks on the grid.

    Equal in value and gradient (straight-through rounding) to
    ``factor_u * gaudi_mask_on_grid(widths[1], locations[1], out, sigma)[:, None]`` and
    ``factor_v * gaudi_mask_on_grid(widths[0], locations[0], in, sigma)[:, None]``.

    Args:
        factor_u: ``(K, r, out)`` left factors (stored transposed).
        factor_v: ``(K, r, in)`` right factors.
        widths: ``(2, K)``: row 0 the column (input) intervals, row 1 the row (output)
            intervals, as fractions of the dimension.
        locations: ``(2, K)`` likewise.
        sigma: Gaussian bandwidth in frequency bins, ``None``/``inf`` for none.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton is installed, else torch),
            ``"torch"``, or ``"triton"`` (also on CPU tensors under ``TRITON_INTERPRET=1``).

    Returns:
        ``(U_masked (K, r, out), V_masked (K, r, in))``. The torch backend returns the
        promoted dtype of factor and mask; the Triton backend the factors' dtype, or the
        autocast dtype inside an enabled autocast region (the products feed a matrix
        product that autocast would cast anyway).
    """
    if factor_u.dim() != 3 or factor_v.dim() != 3 or factor_u.shape[:2] != factor_v.shape[:2]:
        raise ValueError(
            "factor_u must be (K, r, out) and factor_v (K, r, in), got "
            f"{tuple(factor_u.shape)} and {tuple(factor_v.shape)}"
        )
    k = factor_u.shape[0]
    for name, value in (("widths", widths), ("locations", locations)):
        if not isinstance(value, Tensor) or tuple(value.shape) != (2, k):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of shape (2, K) = (2, {k}), got {shape}")
    if factor_u.dtype != factor_v.dtype:
        raise ValueError(
            f"factor_u and factor_v must share a dtype, got {factor_u.dtype} and {factor_v.dtype}"
        )
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton":
        _check_triton_device(factor_u, factor_v, widths, locations)
    return mask_factors_unchecked(
        factor_u, factor_v, widths, locations, _sigma_or_none(sigma), backend
    )


def _cosine_series(coefficients: Tensor, n: int, half_sample: bool) -> Tensor:
    """``x[j] = sum_k c_k cos(pi k (2 j + s) / n)`` for ``j < n``, ``s = 1`` if
    ``half_sample`` else 0: the inverse real DFT of a real (or half-sample-shifted) spectrum
    in real arithmetic. ``torch.compile`` fuses it into one reduction, where an FFT would be
    a complex-valued fallback (inductor generates no code for complex tensors). The phase
    is reduced modulo ``2n`` in integers first, so it stays exact for large ``n``."""
    k = torch.arange(coefficients.shape[0], device=coefficients.device)
    j = torch.arange(n, device=coefficients.device)
    phase = torch.remainder(k * (2 * j.unsqueeze(1) + int(half_sample)), 2 * n)
    return (coefficients * torch.cos(phase.to(coefficients.dtype) * (math.pi / n))).sum(1)


def _grid_tables_from_tensor(n: int, sigma: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[`_grid_kernels`][gblr.ops.gaudi._grid_kernels] built from a 0-d ``sigma`` tensor (``inf`` =
    no smoothing) with real tensor operations only, so ``torch.compile`` traces it without reading σ
    on the host (a graph break) or specializing on its value (a recompile every step).
    ``exp(-(k/σ)²/2)`` is exactly 1 at σ = inf, so one formula covers both cases."""
    k = torch.arange(n // 2 + 1, device=sigma.device, dtype=torch.float64)
    gauss = _gaussian(k, sigma.to(torch.float64))
    # Hermitian weights of a length-n inverse real DFT: bins 0 and n/2 (n even) once.
    weights = torch.full_like(k, 2.0)
    weights[0] = 1.0
    nyquist = 1.0 if n % 2 == 0 else 2.0
    weights[-1] = nyquist if n > 1 else 1.0
    smoothing = _cosine_series(weights * gauss / n, n, half_sample=False)
    cumulative = _cumulative_table(smoothing, n)
    # The edge spectrum is G(k)/sinc(k/n) shifted by half a sample; at an even n's Nyquist
    # bin that shift makes it imaginary, and an inverse real DFT keeps only real parts.
    if n % 2 == 0 and n > 1:
        weights[-1] = 0.0
    edge = _cosine_series(weights * gauss / torch.sinc(k / n), n, half_sample=True)
    return cumulative.to(dtype), torch.cat([edge, edge]).to(dtype)


def _cached_grid_tables(sigma: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[`_grid_kernels`][gblr.ops.gaudi._grid_kernels] for a CPU ``sigma`` tensor (reading it costs
    no device sync)."""
    value = float(sigma)
    cumulative, edge = _grid_kernels(n, None if math.isinf(value) else value, dtype, sigma.device)
    return cumulative.clone(), edge.clone()  # an op's outputs must not alias a cache


def _register_cached_grid_tables():
    """``gblr::grid_tables``: the cached FFT tables as an op that ``torch.compile`` calls
    without tracing into it (torch >= 2.4; ``None`` before)."""
    custom_op = getattr(getattr(torch, "library", None), "custom_op", None)
    if custom_op is None:
        return None
    op = custom_op("gblr::grid_tables", mutates_args=())(_cached_grid_tables)

    @op.register_fake
    def _(sigma: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return sigma.new_empty(3 * n + 1, dtype=dtype), sigma.new_empty(2 * n, dtype=dtype)

    return op


_grid_tables_op = _register_cached_grid_tables()


def _compiled_grid_tables(n: int, sigma: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The mask tables inside a compiled graph. On a CPU, the cached FFT tables through an
    opaque op (the O(n²) cosine series cost ~75 ms per 768 x 3072 step there); on a GPU
    the series (microseconds of device work, and no host read of σ, which would sync the
    device and cannot be captured in a CUDA graph)."""
    if _grid_tables_op is not None and sigma.device.type == "cpu":
        return _grid_tables_op(sigma, n, dtype)
    return _grid_tables_from_tensor(n, sigma, dtype)


def _gaudi_mask_on_grid_traceable(
    width: Tensor, location: Tensor, n: int, sigma: Tensor, dtype: torch.dtype
) -> Tensor:
    """``(K,)`` widths and locations -> ``(K, n)`` masks equal in value and gradient to
    [`gaudi_mask_on_grid`][gblr.ops.gaudi.gaudi_mask_on_grid], written with differentiable tensor
    operations only.

    The mask's value comes from the cumulative table (detached); its derivatives are
    attached linearly: ``mask + (w - w.detach()) * E_end + (l - l.detach()) * (E_end -
    E_start)`` adds exactly zero to the value, and its gradient is the edge kernel at the
    box's end (width) and at both ends (location), as in ``_GaudiMaskOnGrid.backward``.
    With no custom autograd node, the compiler fuses the gathers into the factor products.
    """
    lengths, starts = _lengths(width, n), _starts(location, n)
    cumulative, edge = _compiled_grid_tables(n, sigma, dtype)
    columns = torch.arange(n, device=width.device)
    first = ((2 * n + 1) - starts).unsqueeze(1) + columns
    value = _poison(cumulative[first] - cumulative[first - lengths.unsqueeze(1)], width, location)
    at_end = edge[torch.remainder(columns - (starts + lengths).unsqueeze(1), n)]
    at_start = edge[torch.remainder(columns - starts.unsqueeze(1), n)]
    width_step = (width - width.detach()).to(dtype).unsqueeze(1)
    location_step = (location - location.detach()).to(dtype).unsqueeze(1)
    return value + width_step * at_end + location_step * (at_end - at_start)


def mask_factors_traceable(
    factor_u: Tensor, factor_v: Tensor, widths: Tensor, locations: Tensor, sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """[`mask_factors`][gblr.ops.gaudi.mask_factors] for code that ``torch.compile`` traces:
    ``sigma`` is a 0-d tensor (``inf`` for none), no custom autograd node and no host read, so a
    compiled training step has no graph break and σ can change every step without a recompile.

    Shapes as in [`mask_factors`][gblr.ops.gaudi.mask_factors]; returns the promoted dtype of factor
    and mask (the torch backend's rule).
    """
    dtype = _mask_dtype(torch.promote_types(widths.dtype, locations.dtype))
    rows, cols = factor_u.shape[2], factor_v.shape[2]
    row_mask = _gaudi_mask_on_grid_traceable(widths[1], locations[1], rows, sigma, dtype)
    col_mask = _gaudi_mask_on_grid_traceable(widths[0], locations[0], cols, sigma, dtype)
    return (
        factor_u * row_mask.to(factor_u.dtype).unsqueeze(1),
        factor_v * col_mask.to(factor_v.dtype).unsqueeze(1),
    )


def mask_factors_unchecked(
    factor_u: Tensor,
    factor_v: Tensor,
    widths: Tensor,
    locations: Tensor,
    sigma: float | None,
    backend: str = "auto",
    skip: tuple[bool, bool, bool] | None = None,
) -> tuple[Tensor, Tensor]:
    """[`mask_factors`][gblr.ops.gaudi.mask_factors] without argument checks, for layers whose
    shapes are right by construction (it runs in every training forward); ``sigma`` a positive float
    or ``None`` (no smoothing), never ``inf``. ``skip``: (input widths, output widths,
    locations) whose gradients come back as zeros without being computed (the torch backend
    only; a structure learner that holds them discards them anyway)."""
    if backend == "auto":
        # (the Triton kernels have no torch.func rules: the torch form under a transform)
        triton = factor_u.is_cuda and _triton_available() and not transforms_active()
        backend = "triton" if triton else "torch"
    if backend == "torch":
        dtype = _mask_dtype(torch.promote_types(widths.dtype, locations.dtype))
        finite = _known_finite(widths, locations)
        return apply_function(
            _MaskFactorsTorch,
            _MaskFactorsTorchForTransforms,
            factor_u, factor_v, widths, locations, sigma, dtype, finite, skip,
            outputs=2,
        )  # fmt: skip
    out_dtype = autocast_dtype(factor_u.device.type) or factor_u.dtype
    return _MaskFactorsTriton.apply(factor_u, factor_v, widths, locations, sigma, out_dtype)


def held_strip_side(
    factor_u: Tensor,
    factor_v: Tensor,
    widths: Tensor,
    locations: Tensor,
    skip: tuple[bool, bool, bool] | None,
) -> int | None:
    """The side (0: input columns, 1: output rows) on which every component is one line
    whose width, like every location, a structure learner holds (``skip``, see
    `mask_factors_unchecked`); ``None`` when there is none, off the CPU, or
    when a width or location is not finite (known without an element-wise pass).

    Args:
        factor_u: ``(K, r, out)``.
        factor_v: ``(K, r, in)``.
        widths, locations: ``(2, K)`` (row 0 the input side).
        skip: (input widths, output widths, locations) held, or ``None``.
    """
    if skip is None or not skip[2] or not factor_u.is_cpu:
        return None
    if not _known_finite(widths, locations):
        return None
    for side, factor in ((0, factor_v), (1, factor_u)):
        if skip[side] and bool((_lengths(widths[side], factor.shape[2], finite=True) == 1).all()):
            return side
    return None


def strip_factors(
    factor_u: Tensor,
    factor_v: Tensor,
    widths: Tensor,
    locations: Tensor,
    skip: tuple[bool, bool, bool] | None,
) -> tuple[int, Tensor, Tensor, Tensor] | None:
    """The training form of a GBLR matrix whose every component is one line (one input
    column, or one output row) that a structure learner holds, the block-diagonal start's
    strips; ``None`` where that is not so.

    With exact masks (``sigma=None``) such a component's masked factor on its one-line
    side is a single entry per rank, so its product with the layer's input (columns) or
    into the output (rows) is a gather or a scatter-add of single entries: it skips that
    side's masking and a product as large as the dense layer's. The values are those of
    `mask_factors_unchecked` (``sigma=None``) followed by the products, exactly where no
    two components share a line; the entries' gradients differ by rounding only (a sum
    over the rows in another order). The torch backend, CPU tensors.

    Args:
        factor_u: ``(K, r, out)`` left factors.
        factor_v: ``(K, r, in)`` right factors.
        widths: ``(2, K)`` (row 0 the input side).
        locations: ``(2, K)``.
        skip: the held sides as `mask_factors_unchecked` takes them; the form applies when
            one side's widths and the locations are held and that side is one line in
            every component.

    Returns:
        ``(side, masked, values (K, r), lines (K,) int64)``: ``side`` 0 (columns) with
        ``masked = U_masked (K, r, out)`` and ``x @ V_masked[k, i].T == x[..., lines[k]]
        * values[k, i]``, or 1 (rows) with ``masked = V_masked (K, r, in)`` and
        ``U_masked[k, i] == values[k, i]`` at row ``lines[k]``, 0 elsewhere; or ``None``.
    """
    side = held_strip_side(factor_u, factor_v, widths, locations, skip)
    if side is None:
        return None
    factor = factor_v if side == 0 else factor_u
    lines = _starts(locations[side], factor.shape[2], finite=True)
    dtype = _mask_dtype(torch.promote_types(widths.dtype, locations.dtype))
    masked_u, masked_v = apply_function(
        _MaskFactorsTorch,
        _MaskFactorsTorchForTransforms,
        factor_u if side == 0 else None,
        factor_v if side == 1 else None,
        widths,
        locations,
        None,
        dtype,
        True,
        skip,
        outputs=2,
    )
    k, r = factor.shape[:2]
    values = factor.gather(2, lines.view(k, 1, 1).expand(k, r, 1)).squeeze(2)
    return side, masked_u if side == 0 else masked_v, values, lines
