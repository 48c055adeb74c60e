"""Compression of dense models: structure search from dense weights."""

from .search import fit_dense

__all__ = ["fit_dense"]
