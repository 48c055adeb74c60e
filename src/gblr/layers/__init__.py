"""GBLR layers in their training form."""

from . import special
from .conv import GBLRConv2d
from .linear import GBLRLinear

__all__ = ["GBLRConv2d", "GBLRLinear", "special"]
