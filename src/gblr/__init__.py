"""gblr: learned Generalized Block Low-Rank (Gaudi-GBLR) structured matrices for PyTorch.

Implements Lee & Kim, "Differentiable Learning of Generalized Structured Matrices for
Efficient Deep Neural Networks" (ICLR 2024, arXiv:2310.18882).
"""

from importlib.metadata import PackageNotFoundError, version

from . import deploy, structured
from .compress import (
    ConversionReport,
    apply_structure,
    compress_pretrained,
    convert,
    fit_dense,
    from_pretrained,
    merge_and_unload,
    model_structure,
    save_pretrained,
)
from .compress.configs import (
    BlockDiagConfig,
    BlockSparseConfig,
    ConversionConfig,
    GBLRConfig,
    LowRankConfig,
    MonarchConfig,
    PixelflyConfig,
)
from .compress.distill import DistillConfig, distill
from .cost import FlopsReport, LayerFlops, count_flops
from .deploy import FrozenGBLRConv2d, FrozenGBLRLinear, export_onnx, freeze, load, plan, save
from .layers import GBLRConv2d, GBLRLinear, special
from .learn import StructureLearner, merge_components, param_groups, untangle_components
from .learn.config import (
    AdaptiveConfig,
    LearnerConfig,
    MergeConfig,
    RefineConfig,
    ShiftLimitConfig,
    UntangleConfig,
)
from .model_flops import ModelFlops, count_model_flops
from .ops import boxcar_mask, gaudi_mask

try:
    __version__ = version("gblr")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AdaptiveConfig",
    "BlockDiagConfig",
    "BlockSparseConfig",
    "ConversionConfig",
    "ConversionReport",
    "DistillConfig",
    "FlopsReport",
    "FrozenGBLRConv2d",
    "FrozenGBLRLinear",
    "GBLRConfig",
    "GBLRConv2d",
    "GBLRLinear",
    "LayerFlops",
    "LearnerConfig",
    "LowRankConfig",
    "MergeConfig",
    "ModelFlops",
    "MonarchConfig",
    "PixelflyConfig",
    "RefineConfig",
    "ShiftLimitConfig",
    "StructureLearner",
    "UntangleConfig",
    "__version__",
    "apply_structure",
    "boxcar_mask",
    "compress_pretrained",
    "convert",
    "count_flops",
    "count_model_flops",
    "deploy",
    "distill",
    "export_onnx",
    "fit_dense",
    "freeze",
    "from_pretrained",
    "gaudi_mask",
    "load",
    "merge_and_unload",
    "merge_components",
    "model_structure",
    "param_groups",
    "plan",
    "save",
    "save_pretrained",
    "special",
    "structured",
    "untangle_components",
]
