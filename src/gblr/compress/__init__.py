"""Compression of dense models: structure search from dense weights and model surgery."""

from .configs import (
    BlockDiagConfig,
    BlockSparseConfig,
    ConversionConfig,
    FamilyConfig,
    GBLRConfig,
    LowRankConfig,
    MonarchConfig,
    PixelflyConfig,
    config_class,
    config_from_dict,
    register_structure,
    structures,
)
from .convert import ConversionReport, LayerConversion, convert
from .distill import DistillConfig, DistillResult, distill, distillation_loss
from .search import fit_dense

__all__ = [
    "BlockDiagConfig",
    "BlockSparseConfig",
    "ConversionConfig",
    "ConversionReport",
    "DistillConfig",
    "DistillResult",
    "FamilyConfig",
    "GBLRConfig",
    "LayerConversion",
    "LowRankConfig",
    "MonarchConfig",
    "PixelflyConfig",
    "config_class",
    "config_from_dict",
    "convert",
    "distill",
    "distillation_loss",
    "fit_dense",
    "register_structure",
    "structures",
]
