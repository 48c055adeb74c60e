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
from .search import fit_dense

__all__ = [
    "BlockDiagConfig",
    "BlockSparseConfig",
    "ConversionConfig",
    "ConversionReport",
    "FamilyConfig",
    "GBLRConfig",
    "LayerConversion",
    "LowRankConfig",
    "MonarchConfig",
    "PixelflyConfig",
    "config_class",
    "config_from_dict",
    "convert",
    "fit_dense",
    "register_structure",
    "structures",
]
