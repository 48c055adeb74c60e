"""Hand-designed structured families, the baselines GBLR is compared with at equal MACs.

Each family is one file with a [`StructuredLinear`][gblr.structured.base.StructuredLinear] subclass
(``forward``, ``flops()``, ``dense_weight()``, ``for_budget`` and ``from_dense``). ``FAMILIES`` maps
the structure names to the classes; each family's config for [`gblr.convert`][]
(``gblr.LowRankConfig``, ...) is in `gblr.compress.configs`.
"""

from .base import BudgetTooSmallError, StructuredLinear, resolve_budget
from .blockdiag import BlockDiagLinear
from .blocksparse import BlockSparseLinear
from .lowrank import LowRankLinear
from .monarch import MonarchLinear
from .pixelfly import PixelflyLinear

FAMILIES: dict[str, type[StructuredLinear]] = {
    "lowrank": LowRankLinear,
    "blockdiag": BlockDiagLinear,
    "monarch": MonarchLinear,
    "blocksparse": BlockSparseLinear,
    "pixelfly": PixelflyLinear,
}

__all__ = [
    "FAMILIES",
    "BlockDiagLinear",
    "BlockSparseLinear",
    "BudgetTooSmallError",
    "LowRankLinear",
    "MonarchLinear",
    "PixelflyLinear",
    "StructuredLinear",
    "resolve_budget",
]
