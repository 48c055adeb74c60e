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
from .pipeline import CompressionResult, compress_pretrained
from .pretrained import apply_structure, from_pretrained, model_structure, save_pretrained
from .search import fit_dense
from .unload import merge_and_unload

__all__ = [
    "BlockDiagConfig",
    "BlockSparseConfig",
    "CompressionResult",
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
    "apply_structure",
    "compress_pretrained",
    "config_class",
    "config_from_dict",
    "convert",
    "distill",
    "distillation_loss",
    "fit_dense",
    "from_pretrained",
    "merge_and_unload",
    "model_structure",
    "register_structure",
    "save_pretrained",
    "structures",
]
