"""Low-rank approximation under an input-weighted norm: ``min ||(W - Ŵ) S||_F``.

``S Sᵀ`` is the second moment of the layer's inputs, so the norm is the expected output
error ``E ||(W - Ŵ) x||²`` (see `gblr.compress.calibrate`).
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

    The leading singular pairs of ``W S`` come from the eigenvectors of its smaller Gram
    matrix in float64 (several times faster than an SVD of a tall matrix on a CPU, and
    exact enough for the leading pairs).

    Args:
        weight: ``(out, in)``.
        whitening_factor: ``S`` ``(in, in)``, lower triangular (`whitening`).
        rank: ``k``, at most ``min(out, in)``.

    Returns:
        ``A (out, k)``, ``B (k, in)`` in float64, the singular values of ``W S`` split
        evenly between them (a pair whose singular value is negligible is left at zero).
    """
    factor = whitening_factor.to(torch.float64)
    whitened = weight.to(torch.float64) @ factor
    tall = whitened.shape[0] >= whitened.shape[1]
    gram = whitened.t() @ whitened if tall else whitened @ whitened.t()
    energy, vectors = torch.linalg.eigh(gram)
    energy, vectors = energy.flip(0)[:rank], vectors.flip(1)[:, :rank]
    singular = energy.clamp_min(0.0).sqrt()
    kept = singular > singular[:1].clamp_min(1e-300) * 1e-12
    inverse = torch.where(kept, 1.0 / singular.clamp_min(1e-300), torch.zeros_like(singular))
    if tall:  # vectors are right singular vectors V: U = W S V / σ
        right, left = vectors.t(), (whitened @ vectors) * inverse
    else:  # vectors are left singular vectors U: Vᵀ = Uᵀ W S / σ
        left, right = vectors, (vectors.t() @ whitened) * inverse[:, None]
    left, right = left * kept, right * kept[:, None]
    scale = singular.sqrt()
    # B = sqrt(Σ) Vᵀ S⁻¹, from the triangular system Sᵀ Bᵀ = (sqrt(Σ) Vᵀ)ᵀ.
    right_scaled = scale[:, None] * right
    solved = torch.linalg.solve_triangular(factor.t(), right_scaled.t(), upper=True)
    return left * scale, solved.t()
