"""Learning the structure: parameter groups and the proximal budget learner."""

from .groups import gblr_layers, param_groups
from .learner import StructureLearner
from .merge import merge_components
from .untangle import untangle_components

__all__ = [
    "StructureLearner",
    "gblr_layers",
    "merge_components",
    "param_groups",
    "untangle_components",
]
