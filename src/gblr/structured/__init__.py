"""Hand-designed structured families, the baselines GBLR is compared with at equal MACs.

Each family is one file with a :class:`StructuredLinear` subclass (``forward``,
``flops()``, ``dense_weight()``, ``for_budget`` and ``from_dense``).
"""

from .base import StructuredLinear

__all__ = ["StructuredLinear"]
