"""Learning the structure: parameter groups and the proximal budget learner."""

from .groups import gblr_layers, param_groups
from .learner import StructureLearner

__all__ = ["StructureLearner", "gblr_layers", "param_groups"]
