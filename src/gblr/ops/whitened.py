"""Low-rank approximation under an input-weighted norm: ``min ||(W - Ŵ) S||_F``.

``S Sᵀ`` is the second moment of the layer's inputs, so the norm is the expected output
error ``E ||(W - Ŵ) x||²`` (see :mod:`gblr.compress.calibrate`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["weighted_low_rank", "whitening"]

# Added to the second moment, relative to its mean diagonal: inputs that never vary in a
# direction (a constant feature) would otherwise make S singular.
_RIDGE = 1e-4


def whitening(second_moment: Tensor) -> Tensor:
    """Lower-triangular ``S`` with ``S Sᵀ = M + ε I`` (``ε`` relative to ``M``'s mean
    diagonal), float64 ``(in, in)``."""
    size = second_moment.shape[0]
    scale = float(second_moment.diagonal().mean().clamp_min(1e-30))
    identity = torch.eye(size, dtype=torch.float64, device=second_moment.device)
    return torch.linalg.cholesky(second_moment.to(torch.float64) + _RIDGE * scale * identity)


def weighted_low_rank(weight: Tensor, whitening_factor: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` ``A B`` minimizing ``||(W - A B) S||_F``.

    Args:
        weight: ``(out, in)``.
        whitening_factor: ``S`` ``(in, in)``, lower triangular (:func:`whitening`).
        rank: ``k``, at most ``min(out, in)``.

    Returns:
        ``A (out, k)``, ``B (k, in)`` in float64, the singular values of ``W S`` split
        evenly between them.
    """
    whitened = weight.to(torch.float64) @ whitening_factor
    left, singular, right = torch.linalg.svd(whitened, full_matrices=False)
    scale = singular[:rank].sqrt()
    # B = sqrt(Σ) Vᵀ S⁻¹, from the triangular system Sᵀ Bᵀ = (sqrt(Σ) Vᵀ)ᵀ.
    right_scaled = scale[:, None] * right[:rank]
    solved = torch.linalg.solve_triangular(whitening_factor.t(), right_scaled.t(), upper=True)
    return left[:, :rank] * scale, solved.t()
