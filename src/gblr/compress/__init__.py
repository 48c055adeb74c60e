"""Compression of dense models: structure search from dense weights."""

from .search import budget_macs, fit_dense

__all__ = ["budget_macs", "fit_dense"]
