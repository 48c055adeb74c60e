"""Pure tensor functions: interval masks."""

from .gaudi import (
    boxcar_mask,
    gaudi_mask,
    gaudi_mask_on_grid,
    interval_lengths,
    interval_starts,
    mask_factors,
    round_to_grid,
)

__all__ = [
    "boxcar_mask",
    "gaudi_mask",
    "gaudi_mask_on_grid",
    "interval_lengths",
    "interval_starts",
    "mask_factors",
    "round_to_grid",
]
