"""Deployment: freeze a trained GBLR model into its exact inference form, choose an
execution plan per layer, device and input size, and save/load it without training code.
"""

from .frozen import PLAN_CHOICES, FrozenGBLRConv2d, FrozenGBLRLinear, FrozenGBLRMatrix, freeze
from .io import FrozenCheckpoint, load, load_checkpoint, save
from .planner import LayerPlan, PlanReport, plan
from .plans import PLANS

__all__ = [
    "PLANS",
    "PLAN_CHOICES",
    "FrozenCheckpoint",
    "FrozenGBLRConv2d",
    "FrozenGBLRLinear",
    "FrozenGBLRMatrix",
    "LayerPlan",
    "PlanReport",
    "freeze",
    "load",
    "load_checkpoint",
    "plan",
    "save",
]
