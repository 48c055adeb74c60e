"""Helpers shared by the learner and its passes (merge, untangle, refine): argument
checks, the exact factors of a layer, circular spans and factor alignment.

Shapes follow [`gblr.layers.base.GBLRMatrixMixin`][]: ``U`` is ``(K, r, rows)``,
``V`` ``(K, r, cols)``; intervals are integer ``(start, length)`` on a circle of ``n``
cells.
"""

from __future__ import annotations

import numbers

import numpy
import torch
from torch import Tensor

from ..layers.base import GBLRMatrixMixin
from ..ops.gaudi import boxcar_mask

__all__ = ["check_fraction", "check_int", "circular_spans", "closest_factors", "exact_factors"]


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float in ``[0, 1)`` (a tolerance or a fraction), else a clear error.

    Raises:
        TypeError: not a real number (bools refused).
        ValueError: outside ``[0, 1)`` (NaN included).

    Examples:
        >>> from gblr.learn.factors import check_fraction
        >>> check_fraction("tolerance", 1e-3)
        0.001
        >>> check_fraction("tolerance", 1)
        Traceback (most recent call last):
        ...
        ValueError: tolerance must be in [0, 1), got 1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else a clear error.

    Examples:
        >>> from gblr.learn.factors import check_int
        >>> check_int("total_steps", 100, 1)
        100
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def circular_spans(starts: Tensor, lengths: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Smallest circular interval holding intervals ``i`` and ``j``, for all pairs.

    Args:
        starts, lengths: ``(K,)`` int64 integer intervals on a circle of ``n`` cells.

    Returns:
        ``(start, length)``, each ``(K, K)`` int64; ``length <= n``.

    Examples:
        >>> import torch
        >>> from gblr.learn.factors import circular_spans
        >>> start, length = circular_spans(torch.tensor([0, 6]), torch.tensor([2, 3]), 8)
        >>> start[0, 1].item(), length[0, 1].item()  # cells 6, 7, 0, 1
        (6, 4)
    """
    s_i, s_j = starts[:, None], starts[None, :]
    l_i, l_j = lengths[:, None], lengths[None, :]
    from_i = torch.maximum(l_i, torch.remainder(s_j - s_i, n) + l_j)
    from_j = torch.maximum(l_j, torch.remainder(s_i - s_j, n) + l_i)
    use_i = from_i <= from_j
    start = torch.where(use_i, s_i.expand_as(from_i), s_j.expand_as(from_j))
    length = torch.minimum(torch.where(use_i, from_i, from_j), torch.tensor(n))
    return start, length


def exact_factors(layer: GBLRMatrixMixin) -> tuple[Tensor, Tensor]:
    """The exact (boxcar-masked) factors ``(K, r, rows)`` and ``(K, r, cols)`` in float64,
    detached, in either mode (``layer.masks()`` gives Gaudi masks while training).

    Examples:
        >>> import gblr
        >>> from gblr.learn.factors import exact_factors
        >>> u, v = exact_factors(gblr.GBLRLinear(6, 4, num_components=3))
        >>> tuple(u.shape), tuple(v.shape), u.dtype
        ((3, 1, 4), (3, 1, 6), torch.float64)
    """
    row_mask = boxcar_mask(layer.widths[1], layer.locations[1], layer.rows, torch.float64)
    col_mask = boxcar_mask(layer.widths[0], layer.locations[0], layer.cols, torch.float64)
    u = layer.U.detach().to(torch.float64) * row_mask.unsqueeze(1)
    v = layer.V.detach().to(torch.float64) * col_mask.unsqueeze(1)
    return u, v


def closest_factors(
    new_u: Tensor, new_v: Tensor, old_u: Tensor, old_v: Tensor
) -> tuple[Tensor, Tensor]:
    """Factors of ``new_u^T new_v`` as close as possible to the kept component's old ones.

    ``new_u^T new_v`` is unchanged by ``new_u -> Q new_u, new_v -> Q^{-T} new_v``. The
    optimizer's state (Adam's moments) belongs to the old entries, so a sign flip or a
    rescaled split would point it the wrong way. Rank 1: the sign and the scale that
    minimise ``|u - u_old|^2 + |v - v_old|^2`` (the roots of a quartic). Higher ranks:
    the orthogonal ``Q`` of the Procrustes problem that aligns ``new_u`` with ``old_u``,
    then the sign and scale of each row as for rank 1.

    Args:
        new_u: ``(r, rows)``; new_v: ``(r, cols)``; old_u, old_v: the same shapes.

    Returns:
        ``(u, v)`` with ``u^T v == new_u^T new_v``.

    Examples:
        >>> import torch
        >>> from gblr.learn.factors import closest_factors
        >>> old_u, old_v = torch.tensor([[1.0, 0.0, 3.0]]), torch.tensor([[1.0, -2.0]])
        >>> u, v = closest_factors(-2 * old_u, -0.5 * old_v, old_u, old_v)  # flipped, rescaled
        >>> torch.allclose(u, old_u) and torch.allclose(v, old_v)
        True
    """
    if new_u.shape[0] > 1:
        left, _, right = torch.linalg.svd(old_u @ new_u.T)
        rotation = left @ right  # orthogonal: Q^{-T} = Q
        new_u, new_v = rotation @ new_u, rotation @ new_v
    # Per row, f(s) = |s u - u_old|^2 + |v / s - v_old|^2 over s != 0 (s < 0 flips the
    # sign); f'(s) = 0 is the quartic uu s^4 - uo s^3 + vo s - vv = 0, whose real roots
    # are compared (r is small).
    uu, vv = new_u.pow(2).sum(1).tolist(), new_v.pow(2).sum(1).tolist()
    uo, vo = (new_u * old_u).sum(1).tolist(), (new_v * old_v).sum(1).tolist()
    scales = []
    for a, b, c, d in zip(uu, uo, vo, vv):
        roots = numpy.roots([a, -b, 0.0, c, -d])
        real = [z.real for z in roots if abs(z.imag) <= 1e-9 * abs(z) and z.real != 0]
        candidates = real or [(d / a) ** 0.25]
        scales.append(min(candidates, key=lambda z: a * z * z - 2 * b * z + d / z**2 - 2 * c / z))
    scale = torch.tensor(scales, dtype=new_u.dtype, device=new_u.device)[:, None]
    return new_u * scale, new_v / scale
