"""The learned GBLR matrix shared by `GBLRLinear` and `GBLRConv2d`.

A GBLR matrix ``W`` of shape ``(m, n)`` (out x in) is ``sum_k D(a_k) U_k V_k D(b_k)`` with
``K`` components of rank ``r`` (docs/design.md#a-gblr-matrix). Parameters:

- ``U``: ``(K, r, m)`` left factors (``U_k`` transposed, so that masking is a contiguous
  broadcast), ``V``: ``(K, r, n)`` right factors;
- ``widths``, ``locations``: ``(2, K)``, fractions of the dimension; index 0 is the input
  (column) interval, index 1 the output (row) interval;
- buffer ``sigma``: the Gaudi mask bandwidth (``inf`` = exact Dirichlet form).

In training mode the masks are Gaudi masks of the grid-rounded (straight-through) widths
and locations; in eval mode they are exact boxcars.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Sequence
from typing import Literal

import numpy
import torch
from torch import Tensor, nn

from ..cost import gblr_cost
from ..ops.gaudi import (
    boxcar_mask,
    gaudi_mask_on_grid,
    interval_lengths,
    interval_starts,
    mask_factors_traceable,
    mask_factors_unchecked,
    strip_factors,
)

__all__ = [
    "BLOCKS_FULL_SHARE",
    "EVALUATION_ORDERS",
    "FACTOR_INITS",
    "STRUCTURE_INITS",
    "GBLRMatrixMixin",
]

STRUCTURE_INITS = ("full", "random", "half", "blocks", "blockdiag")
# The schemes that place a starting cost (init_cost) on the matrix.
COSTED_STRUCTURE_INITS = ("half", "blocks", "blockdiag")
# The share of a "blocks" start's cost on full-width components (a low-rank part); the
# rest is a block-diagonal. Chosen on the real-task suite (docs/BENCHMARKS.md, "Two
# thirds or three quarters of the 3× start on full components").
BLOCKS_FULL_SHARE = 0.5
FACTOR_INITS = ("balanced", "uniform", "fixed_norm")
EVALUATION_ORDERS = ("auto", "materialize", "factored")

StructureInit = Literal["full", "random", "half", "blocks", "blockdiag"]
FactorInit = Literal["balanced", "uniform", "fixed_norm"]
EvaluationOrder = Literal["auto", "materialize", "factored"]


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as int, or raise TypeError/ValueError naming ``name``."""
    # any integral number (numpy's too, as nn.Linear takes them), never a bool
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_sigma_fits_buffer(name: str, sigma: float) -> None:
    """``ValueError`` if a positive σ rounds to 0 in the layers' float32 ``sigma`` buffer
    (0 is no bandwidth: the masks would be NaN). Any σ below about 1e-3 already smooths a
    mask to its mean, so nothing is lost by a larger one. A finite σ beyond float32's
    range (which the buffer would hold as inf, with numpy's overflow warning) is refused
    too: ``math.inf`` says so."""
    if math.isfinite(sigma) and abs(sigma) > float(numpy.finfo(numpy.float32).max):
        raise ValueError(
            f"{name}={sigma!r} overflows the layers' float32 sigma buffer (at most 3.4e38); "
            "give math.inf for exact boxcars"
        )
    if numpy.float32(sigma) == 0.0:  # not a tensor: a torch.device("meta") context holds no values
        raise ValueError(
            f"{name}={sigma!r} rounds to 0 in the layers' float32 sigma buffer; give a σ of "
            "at least 1.5e-45 (below about 1e-3 every σ gives the same, fully smoothed masks)"
        )


def _as_interval_tensor(name: str, value: object, num_components: int) -> Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if tuple(tensor.shape) != (2, num_components):
        raise ValueError(
            f"{name} must have shape (2, num_components) = (2, {num_components}) "
            f"(row 0: input intervals, row 1: output intervals), got {tuple(tensor.shape)}"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got non-finite values")
    return tensor


# Whether torch.compile (dynamo) is tracing the current call; looked up once, not in
# every forward (torch >= 2.3; older versions cannot trace these layers anyway).
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


# Layers whose structure gradients a live structure learner discards because it holds
# those sides and restores them every step: layer -> (weak reference to the learner,
# (input widths, output widths, locations)). Weak on both sides, so a layer never skips a
# gradient that no learner is there to discard.
_HELD_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def skip_held_gradients(
    layer: nn.Module, owner: object, skip: tuple[bool, bool, bool] | None
) -> None:
    """While ``owner`` (a [`gblr.StructureLearner`][]) lives, let ``layer``'s training
    masks return zeros instead of the gradients of the sides in ``skip`` (input widths,
    output widths, every location), which ``owner`` holds and restores after every
    optimizer step; ``None`` or all ``False``: compute them all again. The torch backend
    only (CUDA's fused kernel computes them anyway)."""
    if skip is None or not any(skip):
        _HELD_STRUCTURE.pop(layer, None)
    else:
        _HELD_STRUCTURE[layer] = (weakref.ref(owner), tuple(bool(each) for each in skip))


def _skipped_gradients(layer: nn.Module) -> tuple[bool, bool, bool] | None:
    """The sides whose gradients ``layer`` may skip now (see `skip_held_gradients`)."""
    entry = _HELD_STRUCTURE.get(layer)
    if entry is None or entry[0]() is None:
        return None
    return entry[1]


def _off_components(widths: Tensor) -> Tensor:
    """``(K,)`` bool: the components of the ``(2, K)`` widths that are off in training.

    A width at or below 0 on either side: the masks are zero, so the component adds
    nothing. Through the smoothing alone its widths would still get a gradient, and Adam
    (first moment 0 for the structure) would lift a zero width by about the learning
    rate whatever the gradient's size: components the budget cut had removed came back
    thousands of times per run and were cut again (docs/BENCHMARKS.md, "Components that
    come back"). A NaN width is not off (the learner reports it).
    """
    return (widths.detach() <= 0).any(dim=0)


def _record_factor_gradients(record: dict, u: Tensor, v: Tensor) -> None:
    """Keep the masked factors ``(K, r, out)``, ``(K, r, in)`` of this forward in
    ``record`` and, from the backward, the loss gradients with respect to them (summed
    over the calls of one step). These gradients are not masked: ``dL/dũ_k = G ṽ_k`` for
    every row, ``G`` the loss gradient of the dense weight, so they tell what extending an
    interval by one cell would gain (the structure learner's ``refine``)."""
    record["u"], record["v"] = u.detach(), v.detach()

    def keep(name: str):
        def hook(grad: Tensor) -> None:
            previous = record.get(name)
            record[name] = grad.detach() if previous is None else previous + grad.detach()

        return hook

    u.register_hook(keep("grad_u"))
    v.register_hook(keep("grad_v"))


class GBLRMatrixMixin(nn.Module):
    """Parameters, masks, cost and initialisation of a learned GBLR matrix.

    Subclasses set the matrix shape through `_init_gblr` and define ``forward``.
    """

    U: nn.Parameter
    V: nn.Parameter
    widths: nn.Parameter
    locations: nn.Parameter
    sigma: Tensor
    #: What the structure learner's ``refine`` pass reads (see `record_factors`):
    #: ``None`` when not recording, else the record of the training forwards since it was
    #: armed: ``u`` ``(K, r, out)``, ``v`` ``(K, r, in)`` (masked factors, detached) and,
    #: after the backward, ``grad_u``, ``grad_v`` (the loss gradients with respect to
    #: them, summed over the forwards). Not part of the module's ``state_dict``.
    factor_record: dict[str, Tensor] | None = None
    #: ``False`` (default): a component with a width at or below 0 is off in the training
    #: forward (no gradient, not computed on the CPU); ``True``: its widths keep the Gaudi
    #: smoothing's gradient and the optimizer may bring it back (every component
    #: computed). [`gblr.StructureLearner`][] sets it from ``LearnerConfig.revive``.
    revive_empty: bool = False

    def _init_gblr(
        self,
        rows: int,
        cols: int,
        *,
        rank_per_component: int,
        num_components: int | None,
        structure_init: StructureInit | None,
        init_cost: float | None,
        factor_init: FactorInit | None = None,
        widths: Tensor | Sequence | None,
        locations: Tensor | Sequence | None,
        sigma: float | None,
        evaluation_order: EvaluationOrder,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        rank_per_component = check_positive_int("rank_per_component", rank_per_component)
        if rank_per_component > min(rows, cols):
            raise ValueError(
                f"rank_per_component must be between 1 and min(out, in) = {min(rows, cols)}, "
                f"got {rank_per_component}"
            )
        if num_components is None:
            num_components = max(1, min(rows, cols) // rank_per_component)
        num_components = check_positive_int("num_components", num_components)
        if structure_init is None:
            # A starting cost asks for the start that trained best from scratch; none, for
            # a dense-equivalent matrix (docs/BENCHMARKS.md, "A new default start").
            structure_init = "full" if init_cost is None else "blockdiag"
        if structure_init not in STRUCTURE_INITS:
            raise ValueError(
                f"structure_init must be one of {STRUCTURE_INITS}, got {structure_init!r}"
            )
        if structure_init in COSTED_STRUCTURE_INITS:
            if init_cost is None:
                raise ValueError(
                    f"structure_init={structure_init!r} needs init_cost, the starting cost as "
                    "a fraction of the dense MACs in (0, 1]"
                )
        elif init_cost is not None:
            raise ValueError(
                f"init_cost is only used with structure_init in {COSTED_STRUCTURE_INITS}, got "
                f"init_cost={init_cost!r} with structure_init={structure_init!r}"
            )
        if factor_init is None:
            # The block-diagonal start trained clearly better with its strips at exactly
            # their expected norm (docs/BENCHMARKS.md, "Balanced factors on the
            # block-diagonal start"); the other starts were not measured against it.
            blockdiag = structure_init == "blockdiag" and widths is None
            factor_init = "fixed_norm" if blockdiag else "balanced"
        if factor_init not in FACTOR_INITS:
            raise ValueError(f"factor_init must be one of {FACTOR_INITS}, got {factor_init!r}")
        if (widths is None) != (locations is None):
            raise ValueError("widths and locations must be given together, or neither")
        if sigma is None:
            sigma = math.inf
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma > 0:
            raise ValueError(f"sigma must be a positive number (math.inf for none), got {sigma!r}")
        sigma = float(sigma)
        check_sigma_fits_buffer("sigma", sigma)

        self.rows = rows
        self.cols = cols
        self.rank_per_component = rank_per_component
        self.num_components = num_components
        self.evaluation_order = evaluation_order  # validated by the property setter
        self.factor_record = None
        # The call that put another module in this layer's place in its model
        # ("gblr.freeze", "gblr.merge_and_unload"): a structure learner built on the model
        # before then refuses to step what the model no longer runs.
        self.superseded_by: str | None = None

        factory = {"device": device, "dtype": dtype}
        k, r = num_components, rank_per_component
        self.U = nn.Parameter(torch.empty(k, r, rows, **factory))
        self.V = nn.Parameter(torch.empty(k, r, cols, **factory))
        # Structure parameters stay float32 (or float64) even in a half-precision model:
        # their values are fractions rounded to a grid of up to ~1e5 points.
        structure_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.widths = nn.Parameter(torch.empty(2, k, device=device, dtype=structure_dtype))
        self.locations = nn.Parameter(torch.empty(2, k, device=device, dtype=structure_dtype))
        self.register_buffer("sigma", torch.tensor(float(sigma), device=device))

        if widths is not None:
            w = _as_interval_tensor("widths", widths, k)
            loc = _as_interval_tensor("locations", locations, k)
            if bool((w < 0).any()) or bool((w > 1).any()):
                raise ValueError("widths must lie in [0, 1] (fractions of the dimension)")
            with torch.no_grad():
                self.widths.copy_(w)
                self.locations.copy_(torch.remainder(loc, 1.0))
        else:
            self.init_structure(structure_init, init_cost)  # also checks init_cost
        # On the meta device (``device="meta"`` or ``with torch.device("meta")``) tensors
        # have shapes but no values: the factors' scale, which reads the structure, is
        # left out, as every value is (load a state dict after ``to_empty``).
        if not self.U.is_meta:
            self.init_factors(factor_init)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Keep widths and locations in float32/float64 under ``.half()``, ``.to(bf16)``...

        Their values are fractions on grids of up to ~1e5 points; in 16-bit floats the
        rounded intervals would be wrong. Factors and bias follow the model's dtype.
        """
        saved = {name: getattr(self, name).data for name in ("widths", "locations")}
        super()._apply(fn, recurse)
        for name, before in saved.items():
            param = getattr(self, name)
            if param.dtype not in (torch.float32, torch.float64):
                param.data = before.to(device=param.device)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def evaluation_order(self) -> str:
        """``"auto"`` (cheaper of the two for the input size), ``"materialize"`` or
        ``"factored"``."""
        return self._evaluation_order

    @evaluation_order.setter
    def evaluation_order(self, value: str) -> None:
        if value not in EVALUATION_ORDERS:
            raise ValueError(f"evaluation_order must be one of {EVALUATION_ORDERS}, got {value!r}")
        self._evaluation_order = value

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the GBLR weight matrix."""
        return (self.rows, self.cols)

    # ------------------------------------------------------------------ init
    def init_structure(
        self,
        scheme: StructureInit,
        init_cost: float | None = None,
        *,
        full_share: float | None = None,
    ) -> None:
        """Set widths and locations afresh by ``scheme``, as the constructor's
        ``structure_init`` does (factors are left as they are: follow with
        `init_factors` for the scale that matches the new structure).

        Args:
            scheme: ``"full"``, ``"random"``, ``"half"``, ``"blocks"`` or
                ``"blockdiag"`` (see [`gblr.GBLRLinear`][]).
            init_cost: the starting cost as a fraction of dense MACs, in (0, 1]; needed by
                ``"half"``, ``"blocks"`` and ``"blockdiag"``, ignored by the others.
            full_share: ``"blocks"`` only: the share of ``init_cost`` on full-width
                components, in [0, 1) (default ``gblr.layers.base.BLOCKS_FULL_SHARE``;
                0 is ``"blockdiag"``); the rest is the block-diagonal.

        Raises:
            ValueError: unknown ``scheme``, ``init_cost`` out of (0, 1], ``full_share``
                out of [0, 1) or given with a scheme other than ``"blocks"``.
            TypeError: ``init_cost`` or ``full_share`` is not a number where it is needed.

        Examples:
            >>> from gblr import GBLRLinear
            >>> layer = GBLRLinear(8, 8, structure_init="full")
            >>> layer.init_structure("half", 0.25)
            >>> layer.init_factors()
            >>> layer.flops() <= 0.25 * layer.dense_flops()
            True
        """
        if scheme not in STRUCTURE_INITS:
            raise ValueError(f"structure_init must be one of {STRUCTURE_INITS}, got {scheme!r}")
        if full_share is None:
            full_share = BLOCKS_FULL_SHARE
        elif scheme != "blocks":
            raise ValueError(
                f"full_share is only used with structure_init='blocks', got "
                f"full_share={full_share!r} with structure_init={scheme!r}"
            )
        elif isinstance(full_share, bool) or not isinstance(full_share, numbers.Real):
            raise TypeError(f"full_share must be a number in [0, 1), got {full_share!r}")
        elif not 0.0 <= full_share < 1.0:
            raise ValueError(f"full_share must be in [0, 1), got {full_share}")
        k, r, m, n = self.num_components, self.rank_per_component, self.rows, self.cols
        with torch.no_grad():
            if scheme == "full":
                self.widths.fill_(1.0)
                self._spread_full_components(k)
            elif scheme == "random":
                self.widths.uniform_(0.0, 1.0)
                self.locations.uniform_(0.0, 1.0)
            elif scheme == "half":
                self._init_half(init_cost, k, r, m, n)
            elif scheme == "blocks":
                self._init_blocks(init_cost, float(full_share))
            else:
                self._init_blocks(init_cost, 0.0)

    def _spread_full_components(self, count: int) -> None:
        """Place the first ``count`` components' (full) intervals at evenly spaced
        locations ``i / count`` on both sides, along the circular diagonal.

        A full interval covers every line wherever it starts, so the matrix does not
        change; what changes is where the interval lets go of lines when the learner
        narrows it (its start stays, its end moves). Full intervals that all started at 0
        would all give up the same last lines, and a fast prune could leave whole output
        ranges (a ViT's value rows) uncovered (docs/BENCHMARKS.md, "Full components let go
        of the same lines").
        """
        if count > 0:
            spread = torch.arange(count, dtype=torch.float64) / count
            self.locations[:, :count] = spread.to(self.locations.device, self.locations.dtype)

    def _init_blocks(self, init_cost: object, full_share: float) -> None:
        """``full_share`` of the starting cost on full-width components, the rest on a
        block-diagonal matrix made of strips: each strip spans one diagonal block along
        the longer side and ``S / N`` lines of the shorter side (``S`` lines shared by the
        ``N`` components left over from the full ones: 1 or 2 lines with the default
        ``K = min(out, in)``).

        A strip of ``r`` lines is an exact dense ``a x r`` block at ``r (a + r)`` MACs, so
        a dense ``a x b`` block costs within ``1 + r / a`` of its own ``a b`` MACs: the
        start holds (nearly) the block-diagonal special case next to a low-rank part,
        and training can move MACs between the two. ``full_share=0`` is the pure
        block-diagonal start (``"blockdiag"``). Whole blocks are chosen at or under the
        budget; what they leave lengthens strips by whole cells, so the start costs the
        budget to within one cell (``r`` MACs).
        """
        if isinstance(init_cost, bool) or not isinstance(init_cost, numbers.Real):
            raise TypeError(f"init_cost must be a number in (0, 1], got {init_cost!r}")
        if not 0.0 < init_cost <= 1.0:
            raise ValueError(
                f"init_cost must be in (0, 1] (fraction of dense MACs), got {init_cost}"
            )
        init_cost = float(init_cost)
        k, r, m, n = self.num_components, self.rank_per_component, self.rows, self.cols
        budget = init_cost * m * n
        full_cost = r * (m + n)
        num_full = min(k - 1, int(budget * full_share // full_cost)) if k > 1 else 0
        strips_budget = budget - num_full * full_cost
        # Strips run along the longer side; there are ``short / r`` of them at most.
        short, long = (n, m) if n <= m else (m, n)
        num_strips = min(k - num_full, max(1, short // r))
        lines = short / num_strips  # lines of the short side per strip (r when all fit)
        block_long = strips_budget / (num_strips * r) - lines
        if block_long < 1:  # too little for a strip per line: fewer, shorter ones
            self._init_sparse_strips(init_cost, num_full, strips_budget)
            return
        block_long = min(block_long, float(long))
        # Whole blocks at or under the budget (more blocks are smaller); what is left over
        # lengthens strips by whole cells below.
        blocks = max(1, math.ceil(long / block_long - 1e-9))
        index = torch.arange(num_strips, dtype=torch.int64)
        # Integer boundaries: strip i holds lines [i S // N, (i + 1) S // N) of the S lines.
        first, end = index * short // num_strips, (index + 1) * short // num_strips
        short_start = first.double() / short
        short_width = (end - first).double() / short
        index = index.double()
        # Block b spans whole lines [floor(b L / blocks), floor((b + 1) L / blocks)) of the
        # long side; a strip lies in the block of its centre on the diagonal.
        block = torch.floor((index + 0.5) * lines / short * blocks)
        long_start = torch.floor(block * long / blocks)
        long_length = torch.floor((block + 1) * long / blocks) - long_start
        # The budget the whole blocks leave: one more long cell for as many strips as it
        # pays for (a cell costs r MACs), so the start spends the budget, not up to a
        # block's worth less. Those strips reach a cell into the next block.
        spent = float((long_length + (end - first).double()).sum()) * r
        extra = int((strips_budget - spent) // r)
        if extra > 0:
            per_strip = torch.full((num_strips,), extra // num_strips, dtype=torch.float64)
            per_strip[: extra % num_strips] += 1
            long_length = torch.minimum(long_length + per_strip, torch.tensor(float(long)))
            # The last block's strips grow backwards: no interval wraps past the end.
            long_start = torch.minimum(long_start, long - long_length)
        self._set_start(num_full, (short_width, short_start), (long_length, long_start))

    def _init_sparse_strips(self, init_cost: float, num_full: int, budget: float) -> None:
        """The block-diagonal start where ``budget`` MACs cannot pay a strip for every
        line of the shorter side: as many one-line strips as the budget pays at one cell
        each (``2 r`` MACs), spread evenly along the diagonal, each as long as the budget
        allows; the components left over are off. Every strip is live (a narrower start
        rounds to empty intervals: a layer of zeros that no gradient revives).

        Raises:
            ValueError: ``budget`` pays for no component and there is no full one.
        """
        k, r, m, n = self.num_components, self.rank_per_component, self.rows, self.cols
        short, long = (n, m) if n <= m else (m, n)
        count = min(k - num_full, short, int(budget // (2 * r)))
        if count == 0 and num_full == 0:
            smallest = 2 * r / (m * n)
            remedy = (
                f"use init_cost >= {smallest:.4g}"
                if smallest <= 1
                else "the layer is too small to cost less than dense: keep it an nn.Linear"
            )
            raise ValueError(
                f"init_cost={init_cost} is {init_cost * m * n:.4g} MACs of this {m}x{n} "
                f"layer, less than its smallest component ({2 * r} MACs: one row and one "
                f"column at rank {r}): {remedy}"
            )
        length = min(long, int(budget // (count * r)) - 1) if count else 0
        index = torch.arange(count, dtype=torch.float64)
        short_start = torch.floor(index * short / max(count, 1))
        long_start = torch.minimum(
            torch.floor(index * long / max(count, 1)), torch.tensor(float(long - length))
        )
        one_line = torch.full((count,), 1.0 / short, dtype=torch.float64)
        lengths = torch.full((count,), float(length), dtype=torch.float64)
        self._set_start(num_full, (one_line, short_start / short), (lengths, long_start))

    def _set_start(
        self, num_full: int, short: tuple[Tensor, Tensor], long: tuple[Tensor, Tensor]
    ) -> None:
        """The structure of a start: ``num_full`` full components first, then strips whose
        shorter side is ``short`` = (widths, locations) as fractions and whose longer side
        is ``long`` = (lengths, starts) in lines (float64, one entry per strip); the other
        components off."""
        m, n = self.rows, self.cols
        short_side, long_side = (0, 1) if n <= m else (1, 0)
        lines = max(m, n)  # the longer side
        strips = slice(num_full, num_full + short[0].numel())
        like = {"dtype": self.widths.dtype, "device": self.widths.device}
        with torch.no_grad():
            self.widths.zero_()
            self.locations.zero_()
            self.widths[:, :num_full] = 1.0
            self._spread_full_components(num_full)
            self.widths[short_side, strips] = short[0].to(**like)
            self.locations[short_side, strips] = short[1].to(**like)
            self.widths[long_side, strips] = (long[0] / lines).to(**like)
            self.locations[long_side, strips] = (long[1] / lines).to(**like)

    def _init_half(self, init_cost: object, k: int, r: int, m: int, n: int) -> None:
        """Half of the starting budget on full-width components, half on narrow ones.

        Our reading of the paper's "half full, half narrow" start: ``init_cost * m * n``
        MACs, of which half go to components with full intervals (dense-like low-rank
        terms) and half are spread evenly over the remaining components as narrow
        intervals at evenly spaced locations (block-like terms), so the training can move
        FLOPs either way.
        """
        if isinstance(init_cost, bool) or not isinstance(init_cost, numbers.Real):
            raise TypeError(f"init_cost must be a number in (0, 1], got {init_cost!r}")
        if not 0.0 < init_cost <= 1.0:
            raise ValueError(
                f"init_cost must be in (0, 1] (fraction of dense MACs), got {init_cost}"
            )
        init_cost = float(init_cost)
        budget = init_cost * m * n
        full_cost = r * (m + n)
        num_full = min(k - 1, int(budget / 2 // full_cost)) if k > 1 else 0
        num_narrow = k - num_full
        narrow_budget = budget - num_full * full_cost
        narrow_width = narrow_budget / (num_narrow * r * (m + n))
        if narrow_width > 1.0:
            raise ValueError(
                f"init_cost={init_cost} is more than {k} components of rank {r} can cost "
                f"(at most {k * full_cost / (m * n):.4f} of the dense MACs); "
                "use a smaller init_cost or more components"
            )
        with torch.no_grad():
            self.widths[:, :num_full] = 1.0
            self._spread_full_components(num_full)
            self.widths[:, num_full:] = narrow_width
            spacing = torch.arange(num_narrow, dtype=self.locations.dtype) / num_narrow
            self.locations[:, num_full:] = spacing.to(self.locations.device)

    def init_factors(self, scheme: FactorInit = "balanced") -> None:
        """Draw ``U`` and ``V`` afresh for the current structure, as the constructor's
        ``factor_init`` does (``"balanced"``, ``"uniform"`` or ``"fixed_norm"``).

        Match ``nn.Linear``'s weight variance ``1 / (3 n)`` at the starting structure.

        The entry variance is divided by the expected number of (component, rank) terms
        covering an entry, so narrow starts are not scaled down. ``"balanced"`` (default):
        each component's two factors get equal norms (normal entries, those of ``U_k``
        scaled by ``(|C_k| / |R_k|) ** 0.25``, those of ``V_k`` by the inverse), so Adam
        moves both alike; on the digits ViT at 0.1-0.2 of the MACs it trained faster than
        ``"uniform"`` (``V`` at ``nn.Linear``'s bound ``1/sqrt(n)``, ``U`` carrying the rest:
        with entries of ``U`` near 1, Adam's steps of size ``lr`` barely change them).
        ``"fixed_norm"``: drawn as ``"balanced"``, then each component's factors scaled to
        exactly their expected norm over their intervals (the direction stays random). A
        strip one line wide has a one-number factor, whose normal draw would give the
        lines of GBLR's block-diagonal special case scales many times apart; with exact
        norms that start, its structure kept fixed, was the best family on the pixel MLPs
        of the real-task suite (docs/BENCHMARKS.md, "Few training images").

        Raises:
            ValueError: unknown ``scheme``.

        Examples:
            >>> from gblr import GBLRLinear
            >>> layer = GBLRLinear(16, 16, structure_init="full")
            >>> layer.init_factors("uniform")
            >>> bool(layer.V.abs().max() <= 0.25)
            True
        """
        if scheme not in FACTOR_INITS:
            raise ValueError(f"factor_init must be one of {FACTOR_INITS}, got {scheme!r}")
        with torch.no_grad():
            coverage = (self.widths[0].clamp(0, 1) * self.widths[1].clamp(0, 1)).sum().item()
            terms = max(coverage, 1.0 / max(self.rows, self.cols)) * self.rank_per_component
            if scheme == "uniform":
                bound_v = 1.0 / math.sqrt(self.cols)
                self.V.uniform_(-bound_v, bound_v)
                bound_u = math.sqrt(3.0 / terms)
                self.U.uniform_(-bound_u, bound_u)
                return
            entry_std = math.sqrt(1.0 / (3.0 * self.cols * terms))
            col_lengths, row_lengths = self.interval_lengths()
            ratio = col_lengths.clamp_min(1).double() / row_lengths.clamp_min(1).double()
            u_std = (math.sqrt(entry_std) * ratio.pow(0.25)).to(self.U.dtype)
            v_std = (math.sqrt(entry_std) * ratio.pow(-0.25)).to(self.V.dtype)
            self.U.normal_().mul_(u_std.to(self.U.device)[:, None, None])
            self.V.normal_().mul_(v_std.to(self.V.device)[:, None, None])
            if scheme == "fixed_norm":
                self._rescale_to_expected_norms(u_std, v_std, col_lengths, row_lengths)

    def _rescale_to_expected_norms(
        self, u_std: Tensor, v_std: Tensor, col_lengths: Tensor, row_lengths: Tensor
    ) -> None:
        """Scale every ``(component, rank)`` row of ``U`` and ``V`` so that its norm over
        the component's interval is exactly ``std * sqrt(length)``: the expectation of
        the normal draw's (``u_std``/``v_std`` ``(K,)``, lengths ``(K,)`` in lines)."""
        intervals = (
            (self.U, boxcar_mask(self.widths[1], self.locations[1], self.rows), u_std, row_lengths),
            (self.V, boxcar_mask(self.widths[0], self.locations[0], self.cols), v_std, col_lengths),
        )
        for factor, mask, std, lengths in intervals:
            inside = (factor * mask.to(factor.dtype)[:, None, :]).norm(dim=2, keepdim=True)
            target = std.to(factor) * lengths.clamp_min(1).to(factor).sqrt()
            scale = target[:, None, None] / inside.clamp_min(torch.finfo(factor.dtype).tiny)
            # An empty interval (a component the start left off) keeps its draw.
            factor.mul_(torch.where(inside > 0, scale, torch.ones_like(scale)))

    # ------------------------------------------------------------------ masks
    def masks(self) -> tuple[Tensor, Tensor]:
        """The column and row masks used by ``forward`` in the current mode.

        Returns:
            ``(col_mask (K, in), row_mask (K, out))``. Training: Gaudi masks (bandwidth
            ``self.sigma``) of widths and locations rounded to the grid with a
            straight-through gradient (widths clamped to [0, 1] the same way), see
            [`gblr.ops.gaudi_mask_on_grid`][]. Eval: exact 0/1 boxcars; a NaN or
            infinite width or location is a ``ValueError`` there (checked once per change
            of the parameters, so inference pays no device sync per forward; under
            ``torch.compile`` the mask rows of such components are NaN instead). In
            training the rows are NaN (torch backend) or empty (Triton backend, whose
            kernels read no flags on the host); [`gblr.StructureLearner`][] raises on
            its next step.
        """
        if not self.training:
            if not _is_compiling():
                self._check_structure_finite()
            return (
                boxcar_mask(self.widths[0], self.locations[0], self.cols),
                boxcar_mask(self.widths[1], self.locations[1], self.rows),
            )
        sigma = self._sigma_value()
        return (
            gaudi_mask_on_grid(self.widths[0], self.locations[0], self.cols, sigma),
            gaudi_mask_on_grid(self.widths[1], self.locations[1], self.rows, sigma),
        )

    def _sigma_value(self) -> float | None:
        """``float(self.sigma)`` (``None`` for ``inf``) without a device sync per forward.

        The buffer is the source of truth (state_dict, learner). On the CPU it is read at
        every call (a microsecond). On an accelerator, where reading it waits for the
        device, it is re-read only when the buffer is another tensor or was changed in
        place (its ``_version``); the tensor itself is kept with the value, so a new
        tensor at a freed one's address is not taken for it (``functional_call`` with a
        fresh σ per call). A change through ``sigma.data``, which torch does not count, is
        seen on the CPU only: set σ with ``layer.sigma.fill_(s)`` or ``copy_``.
        """
        sigma = self.sigma
        if sigma.is_meta:  # no value; the masks' shapes do not depend on it
            return None
        if sigma.device.type == "cpu":
            value = float(sigma)
            return None if math.isinf(value) else value
        cached = self.__dict__.get("_sigma_cache")
        if cached is None or cached[0] is not sigma or cached[1] != sigma._version:
            value = float(sigma)
            cached = (sigma, sigma._version, None if math.isinf(value) else value)
            self.__dict__["_sigma_cache"] = cached
        return cached[2]

    def masked_factors(self) -> tuple[Tensor, Tensor]:
        """``(U_masked (K'*r, out), V_masked (K'*r, in))`` with ``W = U_masked.T @ V_masked``.

        ``K' = K`` except in training on the CPU, where only the components that are on
        (both widths above 0) are computed; the others' terms are exact zeros. Training:
        [`gblr.ops.mask_factors`][] without its argument checks (on CUDA one fused Triton
        launch each way; under autocast its output already has the autocast dtype), and a
        component that is off gets no gradient, on every path, unless ``revive_empty``
        (set by [`gblr.StructureLearner`][] from ``LearnerConfig.revive``).
        """
        if self.training:
            compiling = _is_compiling()
            factor_u, factor_v, widths, locations = self._computed_components(compiling)
            if compiling:
                # Under torch.compile: σ stays a tensor (reading it on the host would break
                # the graph, and a Python float would recompile at every σ step) and the
                # compiler fuses the masking into its own kernels.
                u, v = mask_factors_traceable(factor_u, factor_v, widths, locations, self.sigma)
            else:
                u, v = mask_factors_unchecked(
                    factor_u,
                    factor_v,
                    widths,
                    locations,
                    self._sigma_value(),
                    skip=_skipped_gradients(self),
                )
                record = self.factor_record
                if record is not None and u.requires_grad:
                    _record_factor_gradients(record, u, v)
            return u.reshape(-1, self.rows), v.reshape(-1, self.cols)
        col_mask, row_mask = self.masks()
        dtype = self.U.dtype
        u = (self.U * row_mask.to(dtype).unsqueeze(1)).reshape(-1, self.rows)
        v = (self.V * col_mask.to(dtype).unsqueeze(1)).reshape(-1, self.cols)
        return u, v

    def _computed_components(self, compiling: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(U, V, widths, locations)`` of the components a training forward computes."""
        on, off = self._computed_index(compiling)
        widths, locations = self.widths, self.locations
        factor_u, factor_v = self.U, self.V
        if on is not None:
            factor_u, factor_v = factor_u[on], factor_v[on]
            widths, locations = widths[:, on], locations[:, on]
        if off is not None:
            widths = torch.where(off, widths.detach(), widths)
            locations = torch.where(off, locations.detach(), locations)
        return factor_u, factor_v, widths, locations

    def _computed_index(self, compiling: bool) -> tuple[Tensor | None, Tensor | None]:
        """``(on, off)``: the indices ``(K',)`` of the components a training forward
        computes where that leaves some out (else ``None``), and the ``(K,)`` components
        that are off where they are computed anyway, their structure to detach (else
        ``None``)."""
        off = None if self.revive_empty else _off_components(self.widths)
        # Components that are off add exact zeros: on the CPU they are left out of the
        # masking and both products, which also keeps their widths and locations out of
        # the gradient (on CUDA, finding them would cost a sync). Not while factors are
        # recorded: the records hold all K components.
        if off is not None and not compiling and self.U.is_cpu and self.factor_record is None:
            on = (~off).nonzero().flatten()
            return (on if on.numel() < off.numel() else None), None
        return None, off

    def _held_strip_components(
        self,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[bool, bool, bool], Tensor | None] | None:
        """``(U, V, widths, locations, skip, on)`` when the held strips' training forms may
        apply (training, eager, on the CPU, exact masks, a learner holding sides,
        ``evaluation_order="auto"``, no factor record), else ``None``: all ``K``
        components' factors, the computed components' widths and locations, and their
        indices ``on`` (``None``: all), so that a form reads only the factors' entries it
        needs instead of copying the computed components' factors."""
        if self._evaluation_order != "auto" or not self.training or _is_compiling():
            return None
        if self.factor_record is not None:
            return None
        skip = _skipped_gradients(self)
        if skip is None or self._sigma_value() is not None:
            return None
        on, _ = self._computed_index(False)
        widths, locations = self.widths, self.locations
        if on is not None:
            widths, locations = widths[:, on], locations[:, on]
        return self.U, self.V, widths, locations, skip, on

    def strips(self) -> tuple[int, Tensor, Tensor, Tensor] | None:
        """The training form of a layer whose computed components are each one line (an
        input column or an output row) that a [`gblr.StructureLearner`][] holds, with
        exact masks (the default block-diagonal start): ``(side, masked, values (K'*r,),
        lines (K'*r,))`` as [`gblr.ops.gaudi.strip_factors`][] returns them, the masked
        factor of the other side flattened to ``(K'*r, out or in)``. ``None`` in eval,
        under ``torch.compile``, with an ``evaluation_order`` other than ``"auto"``, while
        factors are recorded, off the CPU, with a Gaussian smoothing, or when no side is
        one held line in every computed component.
        """
        held = self._held_strip_components()
        return None if held is None else self._strips_of(held)

    def _strips_of(
        self, held: tuple[Tensor, Tensor, Tensor, Tensor, tuple[bool, bool, bool], Tensor | None]
    ) -> tuple[int, Tensor, Tensor, Tensor] | None:
        """`strips` from what `_held_strip_components` returned."""
        factor_u, factor_v, widths, locations, skip, on = held
        if on is not None:
            factor_u, factor_v = factor_u[on], factor_v[on]
        found = strip_factors(factor_u, factor_v, widths, locations, skip)
        if found is None:
            return None
        side, masked, values, lines = found
        rank = self.rank_per_component
        return (
            side,
            masked.reshape(-1, masked.shape[2]),
            values.reshape(-1),
            lines.repeat_interleave(rank) if rank > 1 else lines,
        )

    def record_factors(self, enabled: bool = True) -> None:
        """Arm (``enabled``) or stop the recording of `factor_record`.

        Armed, the next eager training forwards store their masked factors and, through
        hooks, the loss gradients with respect to them: those gradients are not masked
        (``dL/dũ_k = G ṽ_k`` at every row, ``G`` the loss gradient of the dense weight),
        so they tell what extending an interval by one cell would gain. Under
        ``torch.compile`` nothing is recorded. Arming again starts a new, empty record.

        Examples:
            >>> import torch, gblr
            >>> layer = gblr.GBLRLinear(6, 4, num_components=2)
            >>> layer.record_factors()
            >>> layer(torch.randn(3, 6)).sum().backward()
            >>> sorted(layer.factor_record), tuple(layer.factor_record["grad_v"].shape)
            (['grad_u', 'grad_v', 'u', 'v'], (2, 1, 6))
            >>> layer.record_factors(False); layer.factor_record is None
            True
        """
        self.factor_record = {} if enabled else None

    def gblr_weight(self) -> Tensor:
        """The ``(out, in)`` GBLR matrix in the current mode (training: Gaudi; eval: exact)."""
        u, v = self.masked_factors()
        return u.t() @ v

    # ------------------------------------------------------------------ cost
    def _check_structure_finite(self) -> None:
        """``ValueError`` naming the layer, the entry and its value if a width or location
        is NaN or infinite: it has no integer interval, so eval, ``flops()`` and
        [`gblr.freeze`][] would otherwise make up one (or drop the component).

        Checked once per change of the two parameters (the tensors themselves, kept with
        the check so that a new one at a freed one's address is not taken for it, and their
        in-place version counters), so repeated eval forwards read nothing from the device.
        """
        widths, locations = self.widths, self.locations
        if widths.is_meta:
            return
        checked = self.__dict__.get("_finite_structure")
        versions = (widths._version, locations._version)
        if (
            checked is not None
            and checked[0] is widths
            and checked[1] is locations
            and checked[2] == versions
        ):
            return
        for name in ("widths", "locations"):
            values = getattr(self, name).detach()
            if not bool(torch.isfinite(values).all()):
                side, k = (~torch.isfinite(values)).nonzero()[0].tolist()
                interval = "input (column)" if side == 0 else "output (row)"
                raise ValueError(
                    f"{type(self).__name__} ({self.rows} x {self.cols}): {name}[{side}, {k}] "
                    f"is {float(values[side, k])}, the {interval} interval of component {k}; "
                    "widths and locations must be finite. NaN usually comes from a NaN "
                    "loss or gradient in training."
                )
        self.__dict__["_finite_structure"] = (widths, locations, versions)

    def _check_has_values(self) -> None:
        if self.widths.is_meta:
            raise RuntimeError(
                f"{type(self).__name__} ({self.rows} x {self.cols}) is on the meta device: its "
                "intervals have no values (and so no MACs); materialize it first, e.g. "
                "module.to_empty(device='cpu') and load_state_dict(...)"
            )
        self._check_structure_finite()

    def interval_lengths(self) -> tuple[Tensor, Tensor]:
        """Integer ``(col_lengths (K,), row_lengths (K,))`` of the intervals used in eval
        (``ValueError`` for a NaN or infinite width or location)."""
        self._check_has_values()
        return (
            interval_lengths(self.widths[0], self.cols),
            interval_lengths(self.widths[1], self.rows),
        )

    def interval_starts(self) -> tuple[Tensor, Tensor]:
        """Integer ``(col_starts (K,), row_starts (K,))`` of the intervals used in eval
        (``ValueError`` for a NaN or infinite width or location)."""
        self._check_has_values()
        return (
            interval_starts(self.locations[0], self.cols),
            interval_starts(self.locations[1], self.rows),
        )

    def live_mask(self) -> Tensor:
        """``(K,)`` bool: components whose row and column intervals are both non-empty."""
        col_lengths, row_lengths = self.interval_lengths()
        return (col_lengths > 0) & (row_lengths > 0)

    def live_components(self) -> int:
        """Number of live components."""
        return int(self.live_mask().sum().item())

    def matrix_flops(self) -> int:
        """MACs of ``W @ x`` for one input column, live components only
        (docs/design.md#cost-in-macs)."""
        col_lengths, row_lengths = self.interval_lengths()
        return gblr_cost(row_lengths, col_lengths, self.rank_per_component)

    def dense_flops(self) -> int:
        """MACs of the dense matrix of the same shape for one input column: ``out * in``."""
        return self.rows * self.cols

    def _choose_order(self, vectors: int, rank_terms: int | None = None) -> str:
        """Evaluation order for ``vectors`` input columns, by the MACs each really spends.

        ``materialize``: build ``W`` (``m n K r``) then one product (``vectors m n``);
        ``factored``: two thin products through the ``K r`` rank (``vectors K r (m + n)``).
        ``rank_terms``: the ``K r`` rows of the masked factors actually computed (default:
        all).
        """
        if self._evaluation_order != "auto":
            return self._evaluation_order
        m, n = self.rows, self.cols
        kr = self.num_components * self.rank_per_component if rank_terms is None else rank_terms
        materialize = m * n * kr + vectors * m * n
        factored = vectors * kr * (m + n)
        return "factored" if factored < materialize else "materialize"

    def _gblr_extra_repr(self) -> str:
        return (
            f"rank_per_component={self.rank_per_component}, "
            f"num_components={self.num_components}, "
            f"sigma={'?' if self.sigma.is_meta else format(float(self.sigma), 'g')}, "
            f"evaluation_order={self._evaluation_order!r}"
        )
