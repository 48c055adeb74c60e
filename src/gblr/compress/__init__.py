"""Compression of dense models: structure search from dense weights and model surgery."""

from .convert import ConversionReport, LayerConversion, convert, register_structure, structures
from .search import fit_dense

__all__ = [
    "ConversionReport",
    "LayerConversion",
    "convert",
    "fit_dense",
    "register_structure",
    "structures",
]
