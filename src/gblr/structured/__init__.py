"""Hand-designed structured families, the baselines GBLR is compared with at equal MACs.

Each family is one file with a :class:`StructuredLinear` subclass (``forward``,
``flops()``, ``dense_weight()``, ``for_budget`` and ``from_dense``). ``FAMILIES`` maps the
names ``gblr.convert(structure=...)`` accepts to the classes.
"""

from .base import StructuredLinear
from .blockdiag import BlockDiagLinear
from .lowrank import LowRankLinear

FAMILIES: dict[str, type[StructuredLinear]] = {
    "lowrank": LowRankLinear,
    "blockdiag": BlockDiagLinear,
}

__all__ = ["FAMILIES", "BlockDiagLinear", "LowRankLinear", "StructuredLinear"]
