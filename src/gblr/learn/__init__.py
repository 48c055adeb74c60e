"""Learning the structure: parameter groups, the proximal budget learner and its config."""

from .config import (
    AdaptiveConfig,
    LearnerConfig,
    MergeConfig,
    RefineConfig,
    ShiftLimitConfig,
    UntangleConfig,
)
from .groups import gblr_layers, param_groups
from .learner import StructureLearner
from .merge import merge_components
from .untangle import untangle_components

__all__ = [
    "AdaptiveConfig",
    "LearnerConfig",
    "MergeConfig",
    "RefineConfig",
    "ShiftLimitConfig",
    "StructureLearner",
    "UntangleConfig",
    "gblr_layers",
    "merge_components",
    "param_groups",
    "untangle_components",
]
