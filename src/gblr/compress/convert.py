"""Model surgery: replace a model's dense layers by structured ones under a MAC budget.

``convert(model, GBLRConfig(budget=0.3))`` swaps every matching ``nn.Linear``,
``nn.Conv2d`` and Hugging Face ``Conv1D`` (GPT-2 family; weight stored ``(in, out)``) for a
structured layer fitted to its weights, in place, and returns a
[`ConversionReport`][gblr.compress.convert.ConversionReport]. The config (`gblr.compress.configs`)
says which structure and how.

Budgets are MACs per input row (per output position for convolutions), the same unit as
``layer.flops()``, summed over the layers; with an ``example_input`` each layer's MACs
are multiplied by the rows (positions) it processes in one forward pass on it, so that a
global allocation spends a forward pass's MACs. ``allocation="uniform"`` gives every
layer ``budget`` times its dense MACs; ``"global"`` spends ``budget`` times the
converted layers' total where it lowers the summed normalized error most, using each
layer's truncated-SVD error curve (exact from its singular values) as the measure:
adding one unit of rank to a layer costs ``out + in`` MACs and removes ``s_k^2 /
||W||^2`` of its normalized error, and since the gains shrink along each spectrum a
greedy fill is optimal for that separable problem. The structured fit at the allotted
MACs is never worse than that SVD (``fit_dense``), so the curve is an upper bound on the
error actually reached.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import heapq
import inspect
import math
import re
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..cost import fraction_budget_macs, layer_rows, row_weights
from ..layers.conv import GBLRConv2d, unsupported_conv
from ..layers.linear import GBLRLinear
from ..learn.learner import project_to_budget
from ..modules import hf_conv1d_class, set_submodule, to_device
from ..ops.whitened import weighted_low_rank, whitening
from ..structured.base import BudgetTooSmallError, StructuredLinear
from ..tables import text_table
from .calibrate import check_calibration, input_second_moments
from .configs import (
    DEFAULT_SEARCH_STEPS,
    FAMILY_CONFIGS,
    INITS,
    ConversionConfig,
    FamilyConfig,
    GBLRConfig,
    _as_patterns,
    _check_choice,
    _check_int,
    _config_text,
    _registered,
    config_class,
    config_from_dict,
    register_structure,
    structures,
)
from .pretrained import protect_save_pretrained
from .search import _svd_layer, empty_layer, fit_dense
from .unload import REPLACED_ATTRIBUTE

__all__ = [
    "ConversionReport",
    "LayerConversion",
    "LayerSelection",
    "convert",
    "register_structure",
    "select_layers",
    "start_from_scratch",
    "structures",
]


#: A layer the global allocation leaves under this fraction of ``budget`` times its MACs
#: is named in a warning: almost nothing passes through it.
STARVED_SHARE = 0.01

#: GBLR layers fitted by SVD (or the search) to weights whose median stable rank over the
#: layers is at least this fraction of a random matrix's of the same shapes are named in a
#: warning: a fresh ``nn.Linear`` measures 1.0-1.1, all-MiniLM-L6-v2's encoder 0.36 (its
#: largest 0.81), so such weights are most likely untrained, and their truncated SVD is a
#: low-rank start where the block-diagonal one (``init="random"``) trains better. Below
#: it, weights fitted alone by a config that takes calibration inputs get a warning that
#: calibration would fit them better.
RANDOM_LIKE_STABLE_RANK = 0.85


# --------------------------------------------------------------------------- structures
def _fit_gblr(
    weight: Tensor, macs: int, config: GBLRConfig, *, whitening: Tensor | None = None
) -> GBLRLinear:
    m, n = weight.shape
    init, rank_per_component, seed = config.init, config.rank_per_component, config.seed
    if macs < 2 * rank_per_component:  # pays for nothing: one dead component
        if config.allocation == "uniform" or init == "random":
            # the budget the user gave each layer builds nothing: left dense, as the
            # families leave a layer below their smallest configuration
            raise BudgetTooSmallError(
                f"{macs} MACs per row are below GBLR's smallest component (one row and one "
                f"column at rank {rank_per_component}: {2 * rank_per_component} MACs)"
            )
        # the global allocation spent this layer's share where it fits better
        return empty_layer(weight, rank_per_component)
    if whitening is not None:  # init "svd" (convert checks): the calibrated truncated SVD
        r = rank_per_component
        rank = min(r * (macs // (r * (m + n))), r * (min(m, n) // r))
        if rank == 0:
            return fit_dense(weight, budget_macs=macs, rank_per_component=r, steps=0)
        left, right = weighted_low_rank(weight, whitening, rank)
        k = rank // r
        full = [(0, m)] * k, [(0, n)] * k
        return GBLRLinear.from_intervals(
            left.t().reshape(k, r, m).to(weight.dtype),
            right.reshape(k, r, n).to(weight.dtype),
            *full,
        ).eval()
    if init == "search":
        return fit_dense(
            weight,
            budget_macs=macs,
            rank_per_component=rank_per_component,
            steps=config.search_steps,
            seed=seed,
        )
    if init == "svd":
        if macs >= m * n and config.budget >= 1.0:
            # Budget 1.0 means "no compression": the exact full-rank factorization, the
            # starting point for learning the structure while fine-tuning (its MACs
            # exceed the dense layer's until the learner prunes it). A layer that a
            # smaller budget's allocation gives its dense MACs (keep_dense off) gets the
            # best fit within them, never more.
            macs = rank_per_component * math.ceil(min(m, n) / rank_per_component) * (m + n)
        layer = _svd_layer(weight, macs, rank_per_component)
        if layer is None:  # less than one full-width component: the best narrow ones
            r = rank_per_component
            return fit_dense(weight, budget_macs=macs, rank_per_component=r, steps=0)
        return layer.eval()
    # "random": a fresh layer of the right shape, nothing copied from the dense weights;
    # convert draws every such layer afresh once all are in place (start_from_scratch).
    layer = GBLRLinear(
        n,
        m,
        bias=False,
        rank_per_component=rank_per_component,
        structure_init="blockdiag",
        init_cost=min(1.0, macs / (m * n)),
        factor_init="fixed_norm",
        dtype=weight.dtype,
        device=weight.device,
    )
    project_to_budget([layer], macs)  # interval rounding can overshoot by a few MACs
    return layer.eval()


register_structure(
    "gblr", _fit_gblr, config=GBLRConfig, supports_conv2d=True, supports_calibration=True
)


def start_from_scratch(
    layers: Iterable[GBLRLinear | GBLRConv2d],
    budget: float,
    seed: int,
    *,
    structure_init: str = "blockdiag",
    factor_init: str = "fixed_norm",
    full_share: float | None = None,
) -> None:
    """Start GBLR layers afresh for training from scratch, each at ``budget`` of its dense
    MACs: ``layer.init_structure(structure_init, budget)`` (default: GBLR's block-diagonal
    special case), ``layer.init_factors(factor_init)`` (default: every component's factors
    at exactly their expected norm), then the budget met exactly. Drawn layer after layer
    from one generator seeded with ``seed``, so that layers of one shape start different;
    the global random state is left as it was. What ``convert(init="random")`` and the
    recipes' ``structure_model`` start from (docs/BENCHMARKS.md, "A new default start").

    Args:
        layers: the GBLR layers, in the order they are drawn.
        budget: the fraction of each layer's dense MACs, in (0, 1].
        seed: seeds the draws.
        structure_init, factor_init, full_share: as ``GBLRLinear.init_structure`` /
            ``init_factors`` take them.

    Examples:
        >>> import gblr
        >>> layers = [gblr.GBLRLinear(64, 64), gblr.GBLRLinear(64, 64)]
        >>> start_from_scratch(layers, 0.25, seed=0)
        >>> [layer.flops() <= 0.25 * 64 * 64 for layer in layers]
        [True, True]
        >>> bool((layers[0].U != layers[1].U).any())  # one shape, different factors
        True

    Raises:
        ValueError, TypeError: ``budget`` not a number in (0, 1], ``seed`` not an int, or
            a layer not a GBLR layer (named in the message).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    layers = list(layers)
    for index, layer in enumerate(layers):
        if not isinstance(layer, (GBLRLinear, GBLRConv2d)):
            raise TypeError(
                f"layers[{index}] must be a GBLRLinear or GBLRConv2d, got {type(layer).__name__}"
            )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for layer in layers:
            layer.init_structure(structure_init, budget, full_share=full_share)
            layer.init_factors(factor_init)
            project_to_budget([layer], int(budget * layer.dense_flops()))


def _family_fit(family: type[StructuredLinear]) -> Callable[..., nn.Module]:
    """``fit`` for a baseline family: its projection ``from_dense`` (``init="project"``),
    or a fresh layer at the budget (``"random"``)."""

    def fit(
        weight: Tensor, macs: int, config: FamilyConfig, *, whitening: Tensor | None = None
    ) -> nn.Module:
        if macs < 1:  # the global allocation can leave a small layer nothing: keep it dense
            raise BudgetTooSmallError(
                f"the allocation left this layer 0 MACs, below the smallest {family.__name__}"
            )
        if whitening is not None:
            return family.from_dense(weight, budget_macs=macs, whitening=whitening)
        if config.init == "project":
            return family.from_dense(weight, budget_macs=macs)
        out_features, in_features = weight.shape
        # drawn from convert's one generator, seeded once: layers of one shape differ
        return family.for_budget(
            in_features,
            out_features,
            budget_macs=macs,
            bias=False,
            device=weight.device,
            dtype=weight.dtype,
        )

    fit.family = family  # type: ignore[attr-defined]  (its smallest layer: _family_minimum)
    return fit


def _family_minimum(fit: Callable[..., nn.Module], shape: tuple[int, int]) -> int:
    """MACs per row of the smallest layer of ``shape`` that a baseline family's ``fit``
    builds (0 for GBLR, whose allocation may leave a layer empty, and for structures
    that do not say)."""
    family = getattr(fit, "family", None)
    if family is None:
        return 0
    out_features, in_features = shape
    try:
        family.for_budget(in_features, out_features, budget_macs=1, bias=False)
    except BudgetTooSmallError as error:
        return int(error.minimum_macs or 0)
    except Exception:  # a family that cannot be asked this way: no floor
        return 0
    return 1


def _register_families() -> None:
    from .. import structured

    for name, family in structured.FAMILIES.items():
        register_structure(
            name,
            _family_fit(family),
            config=FAMILY_CONFIGS[name],
            supports_calibration=family.supports_calibration,
        )


_register_families()


# --------------------------------------------------------------------------- report
@dataclass
class LayerConversion:
    """One converted layer.

    ``macs_*`` are per input row (per output position for convolutions); errors are
    relative Frobenius errors of the layer's matrix, ``svd_error`` that of the truncated
    SVD with the same MACs (the baseline every structure must beat or match); after a
    calibrated conversion both are relative errors of the layer's outputs on the
    calibration inputs, ``||(W - Ŵ) S|| / ||W S||``.
    ``aliases``: other names of the same module object (shared layers), or of distinct
    modules tied to the same weight and bias, all replaced by the one structured module.
    ``dense``: the layer was kept as it is (its share of the global allocation pays for
    its dense MACs, so a structured layer could only lose accuracy, or the structure
    cannot be built at its share, the reason in ``report.skipped``): ``macs_after`` is
    its dense cost and ``error`` 0; ``svd_error`` is still the truncated SVD's at those
    MACs (0 for a layer the structure could not build). ``rows``: the rows (positions)
    the layer processed in the forward pass on ``convert``'s ``example_input`` (1 without
    one): the report's totals weigh each layer by it.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    macs_before: int
    macs_after: int
    error: float
    svd_error: float
    aliases: tuple[str, ...] = ()
    dense: bool = False
    rows: int = 1

    @property
    def ratio(self) -> float:
        return self.macs_after / self.macs_before


@dataclass
class ConversionReport:
    """What [`convert`][gblr.compress.convert.convert] did: converted layers, skipped layers and
    totals.

    ``layers`` holds every layer the budget was spread over, those kept dense included
    (``layer.dense``, names in `dense_layers`: kept because their share paid for their
    dense MACs, or because the structure could not be built at it, then also in
    ``skipped`` with the reason), so that ``macs_after`` and ``ratio`` are the MACs the
    model now costs. ``print(report)`` gives a table headed by
    the config; ``report.config`` is the config
    used (also recorded on the model as ``model.gblr_config``), and ``structure``,
    ``init`` (``None`` for a structure without one), ``allocation`` and ``budget`` repeat
    its main fields.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> report = gblr.convert(model, gblr.GBLRConfig(budget=0.25))
        >>> len(report.layers), round(report.ratio, 2), report.config.budget
        (1, 0.25, 0.25)
        >>> print(str(report).splitlines()[0])
        GBLRConfig(budget=0.25)
        >>> report.to_dict()["config"]["structure"]
        'gblr'
    """

    structure: str
    init: str | None
    allocation: str
    budget: float
    layers: list[LayerConversion] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    calibrated: bool = False
    config: ConversionConfig | None = None

    @property
    def dense_layers(self) -> list[str]:
        """Names of the layers kept dense: their share of the budget pays for them, or the
        structure could not be built at it (those are also in ``skipped``, with the
        reason)."""
        return [layer.name for layer in self.layers if layer.dense]

    @property
    def macs_before(self) -> int:
        """Dense MACs of the layers: per row summed, or for ``convert``'s
        ``example_input`` (each layer's times its ``rows``)."""
        return sum(layer.macs_before * layer.rows for layer in self.layers)

    @property
    def macs_after(self) -> int:
        """MACs of the layers now, in the unit of `macs_before`."""
        return sum(layer.macs_after * layer.rows for layer in self.layers)

    @property
    def ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else float("nan")

    def to_dict(self) -> dict:
        """Plain data for JSON logs."""
        return {
            "structure": self.structure,
            "init": self.init,
            "allocation": self.allocation,
            "budget": self.budget,
            "calibrated": self.calibrated,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "layers": [
                {**layer.__dict__, "shape": list(layer.shape), "ratio": layer.ratio}
                for layer in self.layers
            ],
            "skipped": [{"name": name, "reason": reason} for name, reason in self.skipped],
            "dense_layers": self.dense_layers,
            "config": None if self.config is None else self.config.to_dict(),
        }

    def __str__(self) -> str:
        header = (
            "layer",
            "kind",
            "shape",
            "MACs before",
            "MACs after",
            "ratio",
            "error",
            "SVD error",
        )
        rows = [
            (
                layer.name,
                f"{layer.kind} (kept dense)" if layer.dense else layer.kind,
                f"{layer.shape[0]}x{layer.shape[1]}",
                f"{layer.macs_before:,}",
                f"{layer.macs_after:,}",
                f"{layer.ratio:.3f}",
                f"{layer.error:.4f}",
                f"{layer.svd_error:.4f}",
            )
            for layer in self.layers
        ]
        rows.append(
            (
                "total",
                "",
                "",
                f"{self.macs_before:,}",
                f"{self.macs_after:,}",
                f"{self.ratio:.3f}",
                "",
                "",
            )
        )
        if self.config is not None:
            title = _config_text(self.config)
        else:
            title = (
                f"structure={self.structure} init={self.init} allocation={self.allocation} "
                f"budget={self.budget:g}"
            )
        calibrated = " (errors: of the outputs on the calibration inputs)"
        notes = []
        if any(layer.rows != 1 for layer in self.layers):
            notes.append(
                "MACs per row (per position for convolutions); the total is for the example "
                "input: each layer's MACs times the rows it ran on there "
                f"({', '.join(str(layer.rows) for layer in self.layers[:8])}"
                f"{', ...' if len(self.layers) > 8 else ''})"
            )
        skipped = {name for name, _ in self.skipped}
        paid = [name for name in self.dense_layers if name not in skipped]
        if paid:
            notes.append(
                f"kept dense ({len(paid)}; their share of the budget pays for the dense "
                f"layer, which is exact): {', '.join(paid)}"
            )
        notes += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        table = text_table(header, rows, notes=notes)
        return f"{title}{calibrated if self.calibrated else ''}\n{table}"


# --------------------------------------------------------------------------- helpers


def convertible_kind(module: nn.Module, conv1d: type | None = None) -> str | None:
    """The kind of layer ``convert`` would replace ``module`` as: ``"Linear"``,
    ``"Conv2d"`` or ``"Conv1D"`` (Hugging Face's, when its class is given as ``conv1d``);
    ``None`` for any other module, a GBLR layer included (already structured).

    Examples:
        >>> import torch
        >>> from gblr.compress.convert import convertible_kind
        >>> convertible_kind(torch.nn.Linear(4, 4)), convertible_kind(torch.nn.ReLU())
        ('Linear', None)
    """
    if isinstance(module, (GBLRLinear, GBLRConv2d)):
        return None
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if conv1d is not None and isinstance(module, conv1d):
        return "Conv1D"
    return None


def _matrix(module: nn.Module, kind: str) -> Tensor:
    """The ``(out, in)`` matrix the layer multiplies by (detached)."""
    weight = module.weight.detach()
    if kind == "Conv1D":
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def _own_forward(module: nn.Module, kind: str) -> str | None:
    """The reason to leave ``module`` dense when its class has a ``forward`` of its own
    (a subclass of the layer ``kind`` names that computes more than the product: fake
    quantization, a scale, an adapter), which the structured layer would drop; else
    ``None``."""
    base = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}.get(kind) or hf_conv1d_class()
    if base is None or type(module).forward is base.forward:
        return None
    return (
        f"its class {type(module).__qualname__} has a forward of its own (not "
        f"{base.__name__}'s), which a structured layer would not run"
    )


def _skip_reason(
    module: nn.Module, kind: str, min_features: int, supports_conv2d: bool
) -> str | None:
    reason = _own_forward(module, kind)
    if reason is not None:
        return reason
    if kind == "Conv2d":
        reason = unsupported_conv(module)
        if reason is not None:
            return reason
        if not supports_conv2d:
            return "this structure converts Linear layers only"
    out_features, in_features = _matrix(module, kind).shape
    if min(out_features, in_features) < min_features:
        return f"smaller than min_features={min_features} ({out_features}x{in_features})"
    return None


def _svd_curve(weight: Tensor) -> Tensor:
    """Normalized squared singular values, descending: the error removed per rank. From the
    eigenvalues of the smaller Gram matrix (float64), several times faster than an SVD of
    a tall matrix; only the energies are needed."""
    work = weight.double()
    gram = work.t() @ work if work.shape[0] >= work.shape[1] else work @ work.t()
    energy = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    return energy / energy.sum().clamp_min(1e-300)


def stable_rank_to_random(matrix: Tensor, iterations: int = 30) -> float:
    """``matrix``'s stable rank ``||W||_F^2 / ||W||_2^2`` as a fraction of that of a random
    matrix of its shape with i.i.d. entries, ``m n / (sqrt(m) + sqrt(n))^2``: about 1 for a
    freshly initialized layer, well below 1 for trained weights whose energy gathers in
    a few singular directions. ``||W||_2`` by ``iterations`` power iterations (float64,
    a fixed start), which can only underestimate it: a random matrix, whose top singular
    values crowd together, reads at 1 or above.

    Args:
        matrix: ``(m, n)``.

    Examples:
        >>> import torch
        >>> from gblr.compress.convert import stable_rank_to_random
        >>> _ = torch.manual_seed(0)
        >>> round(stable_rank_to_random(torch.nn.Linear(256, 128).weight.detach()), 1)
        1.0
        >>> trained_like = torch.randn(128, 4) @ torch.randn(4, 256) + 0.1 * torch.randn(128, 256)
        >>> stable_rank_to_random(trained_like) < 0.2
        True
    """
    work = matrix.detach().double()
    m, n = work.shape
    energy = float(work.square().sum())
    if energy == 0.0:
        return 0.0
    vector = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vector = vector.to(work.device)
    for _ in range(iterations):
        vector = work.t() @ (work @ vector)
        vector = vector / vector.norm().clamp_min(1e-300)
    top = float((work @ vector).square().sum())  # ||W v||^2, ||v|| = 1
    return (energy / max(top, 1e-300)) / (m * n / (math.sqrt(m) + math.sqrt(n)) ** 2)


def _svd_error(curve: Tensor, macs: int, shape: tuple[int, int], rank_per_component: int) -> float:
    m, n = shape
    r = rank_per_component
    rank = min(r * (macs // (r * (m + n))), r * (min(m, n) // r))
    return float(curve[rank:].sum().clamp_min(0.0).sqrt())


def _global_allocation(
    curves: list[Tensor],
    shapes: list[tuple[int, int]],
    total: int,
    rank_per_component: int,
    weights: list[int] | None = None,
) -> list[int]:
    """MACs per row of each layer: greedy fill of rank units by normalized error removed
    per MAC.

    A layer's last step is the dense layer itself: once no further rank unit fits within
    its dense MACs, what is left of its error goes for the MACs left to its dense cost
    (nothing, for a square matrix at half its rank, whose factors cost as much as the
    dense matrix). A layer given its dense MACs stays dense (exact). ``weights``: each
    layer's rows per unit of ``total`` (default 1 each: ``total`` is per row); a layer's
    MACs cost ``weight`` times as much, and what it is given is floored to whole MACs per
    row."""
    r = rank_per_component
    weights = [1] * len(curves) if weights is None else weights
    ranks = [0] * len(curves)
    made_dense = [False] * len(curves)
    heap: list[tuple[float, int, bool]] = []

    def push(index: int) -> None:
        curve, (m, n), weight = curves[index], shapes[index], weights[index]
        rank = ranks[index]
        if rank + r <= min(m, n) and (rank + r) * (m + n) <= m * n:
            gain = float(curve[rank : rank + r].sum()) / (weight * r * (m + n))
            heapq.heappush(heap, (-gain, index, False))
            return
        rest = weight * (m * n - rank * (m + n))
        left = float(curve[rank:].sum())
        gain = math.inf if rest <= 0 else left / rest
        heapq.heappush(heap, (-gain, index, True))

    for index in range(len(curves)):
        push(index)
    remaining = total
    while heap:
        _, index, dense_step = heapq.heappop(heap)
        m, n = shapes[index]
        cost = max(0, m * n - ranks[index] * (m + n)) if dense_step else r * (m + n)
        cost *= weights[index]
        if cost > remaining:
            continue  # a cheaper layer may still fit
        remaining -= cost
        if dense_step:
            made_dense[index] = True
        else:
            ranks[index] += r
            push(index)
    # MACs no rank unit could use go to the layers in proportion to their size, so the
    # structured fit (which spends MACs on intervals, not only on whole ranks) uses them.
    # Counted in the weighted unit of `total` until the end.
    dense = [m * n * weight for (m, n), weight in zip(shapes, weights, strict=True)]
    macs = [
        size if full else rank * (m + n) * weight
        for size, full, rank, (m, n), weight in zip(dense, made_dense, ranks, shapes, weights)
    ]
    open_layers = [i for i in range(len(dense)) if macs[i] < dense[i]]
    spare = total - sum(macs)
    while spare > 0 and open_layers:
        room = sum(dense[i] for i in open_layers)
        given = 0
        for index in open_layers:
            share = min(dense[index] - macs[index], spare * dense[index] // room)
            macs[index] += share
            given += share
        open_layers = [i for i in open_layers if macs[i] < dense[i]]
        spare -= given
        if given == 0:  # rounding left less than one MAC per layer
            for index in open_layers[:spare]:
                macs[index] += 1
            break
    return [size // weight for size, weight in zip(macs, weights, strict=True)]


def _allocation_with_floors(
    curves: list[Tensor],
    shapes: list[tuple[int, int]],
    total: int,
    rank_per_component: int,
    weights: list[int],
    minimum: Callable[[tuple[int, int]], int],
) -> list[int]:
    """`_global_allocation`, but a layer it gives less than ``minimum(shape)`` (a baseline
    family's smallest layer) gets exactly that minimum and the others share the rest:
    below it the family leaves the layer dense, and the model ends over the budget (a
    Pixelfly MiniLM at 0.1 cost 0.155). Where the budget cannot pay every minimum, the
    plain allocation (such layers then stay dense, in ``report.skipped``). Only layers
    given under ``4 (m + n)`` are asked their minimum (every family's is under it; asking
    Pixelfly at 4096 x 4096 takes seconds)."""
    minimums = [0] * len(shapes)
    asked: set[int] = set()

    def under(index: int, macs: int) -> bool:
        m, n = shapes[index]
        if macs >= 4 * (m + n):
            return False
        if index not in asked:
            asked.add(index)
            minimums[index] = minimum(shapes[index])
        return macs < minimums[index]

    pinned: dict[int, int] = {}
    while True:
        free = [i for i in range(len(shapes)) if i not in pinned]
        rest = total - sum(minimums[i] * weights[i] for i in pinned)
        if rest < 0:
            return _global_allocation(curves, shapes, total, rank_per_component, weights)
        given = _global_allocation(
            [curves[i] for i in free],
            [shapes[i] for i in free],
            rest,
            rank_per_component,
            [weights[i] for i in free],
        )
        below = [i for i, macs in zip(free, given, strict=True) if under(i, macs)]
        if not below:
            macs = dict(zip(free, given, strict=True)) | {i: minimums[i] for i in pinned}
            return [macs[i] for i in range(len(shapes))]
        # pinning takes more than they had: the others only get less, so pin all at once
        pinned.update({i: minimums[i] for i in below})


def _target_rows(model: nn.Module, targets: list[_Target], example_input: Any) -> list[int]:
    """Rows (positions) each target's modules process in one forward pass on
    ``example_input``, summed over a target's modules; 1 each without an input."""
    if example_input is None:
        return [1] * len(targets)
    modules = [module for target in targets for module in target.modules]
    counts = dict(zip(map(id, modules), layer_rows(model, modules, example_input), strict=True))
    rows = [sum(counts[id(module)] for module in target.modules) for target in targets]
    missing = [target.name for target, count in zip(targets, rows, strict=True) if count == 0]
    if missing:
        raise ValueError(
            f"example_input: the layers {missing[:3]}{' ...' if len(missing) > 3 else ''} did "
            "not run in the model's forward pass on it, so their cost per example is "
            "unknown; give an input that runs every selected layer (model(*example_input) "
            "for a tuple), exclude them, or leave example_input out to count per row"
        )
    return rows


def _build_layer(
    original: nn.Module, kind: str, fitted: nn.Module, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    bias = original.bias.detach() if original.bias is not None else None
    if kind in ("Linear", "Conv1D"):
        layer = fitted
        if bias is not None:  # dtype and device follow below with the whole layer
            layer.bias = nn.Parameter(bias.clone())
    else:
        layer = GBLRConv2d.like(
            original,
            bias=bias is not None,
            rank_per_component=fitted.rank_per_component,
            num_components=fitted.num_components,
            device=fitted.U.device,
            dtype=fitted.U.dtype,
        )
        with torch.no_grad():
            for name in ("U", "V", "widths", "locations", "sigma"):
                getattr(layer, name).copy_(getattr(fitted, name))
            if bias is not None:
                layer.bias.copy_(bias)
    layer = layer.to(device=device, dtype=dtype)
    if kind == "Conv1D":  # merge_and_unload gives a Conv1D back, from_pretrained keeps it
        setattr(layer, REPLACED_ATTRIBUTE, kind)
    return layer.train(original.training)


def _progress_bar(total: int, progress: bool | None) -> Any:
    """A tqdm bar over ``total`` layers on standard error, with the time left (``None``:
    no bar: ``progress=False``, tqdm not installed, or ``progress=None`` and standard
    error is not a terminal)."""
    if progress is False or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    bar = tqdm(
        total=total,
        desc="gblr.convert",
        unit="layer",
        disable=None if progress is None else False,
    )
    if bar.disable:
        bar.close()
        return None
    return bar


# --------------------------------------------------------------------------- checks
# convert's arguments before configs (deprecated since 0.2, removed in 0.3): the
# positional ones after the model, in their old order, then the keyword-only ones.
_OLD_POSITIONAL = ("structure", "budget", "init", "include", "exclude", "allocation")
_OLD_ARGUMENTS = (*_OLD_POSITIONAL, "rank_per_component", "min_features", "steps", "seed")


def _config_argument(
    config: object, args: tuple[Any, ...], old: dict[str, Any]
) -> ConversionConfig:
    """The config of a call to [`convert`][gblr.compress.convert.convert]: the one given, the
    default config of a structure name, or one built from the old arguments (with a
    ``FutureWarning`` that names it)."""
    if len(args) > len(_OLD_POSITIONAL) - 1:
        raise TypeError(
            f"convert takes at most 2 positional arguments (model, config), got {2 + len(args)}"
        )
    unknown = [key for key in old if key not in _OLD_ARGUMENTS]
    if unknown:
        raise TypeError(
            f"convert got unexpected keyword argument(s) {unknown}; it takes model, config, "
            f"calibration=, example_input= and progress= (and, deprecated, {list(_OLD_ARGUMENTS)})"
        )
    given = dict(zip(_OLD_POSITIONAL[1:], args))
    for key, value in old.items():
        if key in given or (key == "structure" and config is not None):
            raise TypeError(f"convert got multiple values for argument {key!r}")
        given[key] = value
    if isinstance(config, ConversionConfig):
        if given:
            raise ValueError(
                f"give the options in the config or (deprecated) as arguments, not both: "
                f"got {_config_text(config)} and {sorted(given)}; change the config with "
                "dataclasses.replace(config, ...)"
            )
        return config
    if config is not None and not isinstance(config, str):
        raise TypeError(
            "config must be a conversion config (gblr.GBLRConfig, gblr.LowRankConfig, ...), "
            f"a structure name or None (GBLRConfig()), got {type(config).__name__}"
        )
    if not given:  # None or a structure's name: its default config
        return config_from_dict({"structure": "gblr" if config is None else config})
    structure = given.pop("structure", "gblr" if config is None else config)
    built = _old_config(structure, given)
    warnings.warn(
        "gblr.convert with the options as arguments (structure=, budget=, init=, ...) is "
        "deprecated since gblr 0.2 and will be removed in 0.3; pass one config: "
        f"gblr.convert(model, {_config_text(built)})",
        FutureWarning,
        stacklevel=3,
    )
    return built


def _old_config(structure: object, given: dict[str, Any]) -> ConversionConfig:
    """The config the old arguments meant: ``init`` "svd"/"search" is a family's
    projection, ``steps`` counts only with ``init="search"``, and options that the
    structure's config does not have are checked as before, then dropped (ignored)."""
    cls = config_class(structure)
    init = _check_choice("init", given.pop("init", "svd"), INITS)
    steps = given.pop("steps", DEFAULT_SEARCH_STEPS)
    _check_int("steps", steps, 0, "an int >= 0 (refinement steps of init='search')")
    rank = given.pop("rank_per_component", 1)
    _check_int("rank_per_component", rank, 1, "a positive int")
    if issubclass(cls, GBLRConfig):
        given.update(init=init, rank_per_component=rank)
        if init == "search":
            given["search_steps"] = steps
    elif issubclass(cls, FamilyConfig):
        given.update(init="random" if init == "random" else "project", rank_per_component=rank)
    return config_from_dict({"structure": structure, **given})


def _check_call(config: ConversionConfig, progress: object, calibration: object) -> None:
    """convert's own arguments, before the model is looked at."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(
            f"progress must be True, False or None (only on a terminal), got {progress!r}"
        )
    if calibration is None:
        return
    check_calibration(calibration)
    refusal = _config_calibration_refusal(config)
    if refusal is not None:
        raise ValueError(refusal)


def _config_calibration_refusal(config: ConversionConfig) -> str | None:
    """Why ``config`` cannot be fitted to calibration inputs (its structure, or its
    options), or ``None``."""
    spec = _registered().get(config.structure)
    if spec is None or not spec.supports_calibration:
        supported = [name for name, item in _registered().items() if item.supports_calibration]
        return (
            f"calibration is supported by structure {supported}, got structure={config.structure!r}"
        )
    return config._calibration_refusal()


def peft_patterns(patterns: Sequence[str] | None, names: Sequence[str]) -> list[str] | None:
    """``include``/``exclude`` ``patterns`` as globs over the module ``names``: a pattern
    without wildcards that names no module itself selects, as peft's ``target_modules``
    do, every module whose name ends with it after a dot (``"query"`` selects
    ``encoder.layer.0.attention.self.query``); one that names a module (``"0"`` in an
    ``nn.Sequential``) selects that module alone.

    Examples:
        >>> from gblr.compress.convert import peft_patterns
        >>> names = ["0", "2.0", "encoder.self.query"]
        >>> peft_patterns(["query", "0", "*.self.*"], names)
        ['*.query', '0', '*.self.*']
    """
    if patterns is None:
        return None
    return [
        f"*.{pattern}"
        if not any(char in pattern for char in "*?[") and pattern not in names
        else pattern
        for pattern in patterns
    ]


def _check_patterns_match(name: str, patterns: list[str] | None, names: list[str]) -> None:
    for pattern in patterns or []:
        (glob,) = peft_patterns([pattern], names)
        if not any(fnmatch.fnmatchcase(candidate, glob) for candidate in names):
            examples = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"{name} pattern {pattern!r} matches no convertible layer; available: "
                f"{examples or '(none)'}"
            )


def _check_weights(targets: list[_Target], fresh: bool = False) -> None:
    """``ValueError`` naming every layer whose weights cannot be fitted (not loaded, not
    floating point, NaN or inf): checked for all layers before any is replaced. ``fresh``
    (``init="random"``): nothing is fitted, but the fresh layers are drawn on the
    weights' device, which must hold values."""
    problems: dict[str, str] = {}
    for target in targets:
        weight = target.module.weight.detach()
        if weight.is_meta:
            problems[target.name] = "on the meta device (weights not loaded)"
        elif not weight.is_floating_point():
            problems[target.name] = f"dtype {weight.dtype} is not floating point"
        # A NaN or inf anywhere makes the sum non-finite; only then (or on an overflow of
        # the sum) the elementwise test, several times slower.
        elif not bool(torch.isfinite(weight.sum())) and not bool(torch.isfinite(weight).all()):
            nan, inf = int(torch.isnan(weight).sum()), int(torch.isinf(weight).sum())
            problems[target.name] = f"{nan} NaN and {inf} inf of {weight.numel()}"
    if problems:
        shown = list(problems)[:8]
        more = ", ..." if len(problems) > 8 else ""
        what = (
            "draws each fresh layer on its weights' device and dtype"
            if fresh
            else "fits each layer to its weights"
        )
        raise ValueError(
            f"convert {what}, and {len(problems)} layer(s) have weights it cannot use: "
            + "; ".join(f"{name!r}: {problems[name]}" for name in shown)
            + f"{more}. Load or repair the weights, or leave these layers dense with "
            f"exclude={shown}{more}; the model is unchanged"
        )


def _check_rank(targets: list[_Target], rank_per_component: int) -> None:
    small = []
    for target in targets:
        out_features, in_features = _matrix(target.module, target.kind).shape
        if rank_per_component > min(out_features, in_features):
            small.append(f"{target.name!r} ({out_features}x{in_features})")
    if small:
        raise ValueError(
            f"rank_per_component={rank_per_component} exceeds min(out, in) of "
            f"{len(small)} layer(s): {', '.join(small[:8])}{', ...' if len(small) > 8 else ''}; "
            f"lower it, or leave the smaller layers dense with "
            f"min_features={rank_per_component} or exclude=[...]"
        )


# --------------------------------------------------------------------------- selection
@dataclass
class _Target:
    """One layer to convert: a module (under one or more names), or distinct modules tied
    to one weight and bias, which get one structured module between them."""

    name: str
    kind: str
    modules: list[nn.Module]
    names: list[str]

    @property
    def module(self) -> nn.Module:
        return self.modules[0]


def _parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


# torch modules whose forward reads their Linear children's ``.weight`` directly (the
# attention kernel; the encoder layer's fast path in eval mode), which no structured
# layer has.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _parent_reason(model: nn.Module, names: list[str]) -> str | None:
    for name in names:
        parent, child = _parent_and_child(model, name)
        if isinstance(parent, _READS_CHILD_WEIGHTS):
            return (
                f"torch's nn.{type(parent).__name__} reads {child}.weight directly, which "
                "a structured layer does not have"
            )
        reader = _weight_reader(model, name)
        if reader is not None:
            return (
                f"{reader} reads its .weight in its forward ({reader}.forward), which a "
                "structured layer does not have"
            )
    return None


@functools.lru_cache(maxsize=256)
def _forward_sources(cls: type) -> str:
    """The source of ``cls``'s ``forward`` methods along its MRO (torch's own and those
    whose source is not available left out)."""
    sources = []
    for klass in cls.__mro__:
        forward = getattr(klass, "forward", None)
        own = getattr(forward, "__qualname__", "") == f"{klass.__qualname__}.forward"
        if not own or klass.__module__.split(".")[0] == "torch":
            continue
        with contextlib.suppress(OSError, TypeError):
            sources.append(inspect.getsource(forward))
    return "\n".join(sources)


def _weight_reader(model: nn.Module, name: str) -> str | None:
    """The class of a module above ``name`` whose forward reads the layer's ``.weight``
    by its path (``self.wo.weight.dtype`` in transformers' T5, ``self.patch_embeddings.
    projection.weight.dtype`` in its ViT): replaced, the model would fail at its first
    forward. A look at the source, so a read through another name goes unseen."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        above = ".".join(parts[:depth])
        path = re.escape(".".join(parts[depth:]))
        ancestor = model.get_submodule(above) if above else model
        if re.search(rf"self\.{path}\.weight\b", _forward_sources(type(ancestor))):
            return type(ancestor).__name__
    return None


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every qualified name it is registered under."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for local, parameter in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(parameter), []).append(f"{name}.{local}" if name else local)
    return owners


def _tie_groups(
    model: nn.Module,
    selected: list[tuple[str, nn.Module, str]],
    aliases: dict[int, list[str]],
) -> tuple[list[_Target], list[tuple[str, str]]]:
    """The layers to convert, with modules tied to one weight grouped, and the tied layers
    that must stay dense (name, reason).

    Modules sharing a weight Parameter become one target when nothing outside them holds
    their parameters and they compute the same function (same class and kind, and the
    same bias object or none); a layer whose parameters are also held by a module that
    stays (an embedding its head is tied to, an excluded or skipped layer) or by tied
    modules that differ stays dense: replacing it would silently untie them.
    """
    owners = _parameter_owners(model)
    groups: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for entry in selected:
        weight = entry[1].weight
        key = id(weight) if isinstance(weight, nn.Parameter) else id(entry[1])
        groups.setdefault(key, []).append(entry)
    targets: list[_Target] = []
    skipped: list[tuple[str, str]] = []
    for members in groups.values():
        names = [alias for _, module, _ in members for alias in aliases[id(module)]]
        prefixes = tuple(f"{alias}." for alias in names)
        outside = sorted(
            {
                owner
                for _, module, _ in members
                for parameter in module.parameters()
                for owner in owners.get(id(parameter), [])
                if not owner.startswith(prefixes)
            }
        )
        first_name, first, kind = members[0]
        if outside:
            shown = ", ".join(outside[:4]) + (", ..." if len(outside) > 4 else "")
            reason = (
                f"tied: its parameters are shared with {shown}, which stay as they are; "
                f"replacing it would untie them, so it stays dense (exclude it to silence "
                f"the warning)"
            )
            skipped += [(name, reason) for name, _, _ in members]
            continue
        if len(members) > 1:
            modules = [module for _, module, _ in members]
            same = (
                kind != "Conv2d"
                and all(k == kind for _, _, k in members)
                and all(type(module) is type(first) for module in modules)
                and all(module.bias is first.bias for module in modules)
            )
            if not same:
                reason = (
                    f"tied: {', '.join(name for name, _, _ in members)} share one weight "
                    "but differ (bias, class or convolution settings), so one structured "
                    "layer cannot replace them; they stay dense (exclude them to silence the "
                    "warning)"
                )
                skipped += [(name, reason) for name, _, _ in members]
                continue
            targets.append(_Target(first_name, kind, modules, names))
        else:
            targets.append(_Target(first_name, kind, [first], names))
    return targets, skipped


@dataclass
class LayerSelection:
    """The layers [`gblr.convert`][] picks in a model under a config
    ([`select_layers`][gblr.compress.convert.select_layers]).

    Attributes:
        config: the config (``GBLRConfig()`` for ``None``, a structure name's defaults).
        selected: ``(name, module, kind)`` of every layer the config selects: a
            convertible layer (``kind``: ``"Linear"``, ``"Conv2d"`` or ``"Conv1D"``)
            matched by ``include`` and not by ``exclude`` (by any of its names), that the
            structure can convert and that is large enough (``min_features``); a module
            registered under several names appears once, under its first.
        skipped: ``(name, reason)`` of the other matched layers, left dense: too small, a
            convolution the structure cannot convert, or a layer whose weight a module above
            it reads in its forward (``nn.MultiheadAttention``, transformers' T5).
        aliases: every name of each convertible module, by ``id(module)``.
        targets: the layers that would be replaced, each with its ``name``, ``kind``,
            ``modules`` and ``names`` (selected modules tied to one weight are one
            target); empty for ``structure="dense"``, which replaces nothing.
        tied: ``(name, reason)`` of the selected layers that stay dense because they are
            tied to weights that stay (empty for ``"dense"``).
    """

    config: ConversionConfig
    selected: list[tuple[str, nn.Module, str]]
    skipped: list[tuple[str, str]]
    aliases: dict[int, list[str]]
    targets: list[_Target] = field(default_factory=list)
    tied: list[tuple[str, str]] = field(default_factory=list)

    @property
    def convolutions(self) -> list[str]:
        """The names of the ``Conv2d`` layers that would be replaced: calibration
        (``convert(..., calibration=...)``) is refused while there are any."""
        return [target.name for target in self.targets if target.kind == "Conv2d"]

    @property
    def calibration_refusal(self) -> str | None:
        """Why ``convert(model, config, calibration=...)`` would refuse calibration
        inputs (the structure or its options do not support it, or a layer to replace is
        a convolution), or ``None`` when it takes them."""
        refusal = _config_calibration_refusal(self.config)
        if refusal is None and self.convolutions:
            refusal = (
                "calibration fits Linear and Conv1D layers only; exclude the convolutions "
                f"{self.convolutions[:5]} or convert them without calibration"
            )
        return refusal


def select_layers(model: nn.Module, config: ConversionConfig | str | None = None) -> LayerSelection:
    """The layers [`gblr.convert`][] would replace in ``model`` under ``config``, and
    those it would leave dense with the reason, without changing anything: the selection
    ``convert`` itself makes (``include``, ``exclude``, ``min_features``, what the
    structure converts, tied weights), before weights are checked and the budget spread.

    Args:
        model: any ``nn.Module`` (not itself a layer, as for ``convert``).
        config: as for [`gblr.convert`][]: a [`gblr.ConversionConfig`][], a structure
            name or ``None`` (``GBLRConfig()``).

    Returns:
        A [`LayerSelection`][gblr.compress.convert.LayerSelection].

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``config`` is not a config, a
            structure name or ``None``.
        ValueError: ``model`` is itself a layer, or an ``include`` or ``exclude`` pattern
            matches no convertible layer (the layers are listed).

    Examples:
        >>> import torch, gblr
        >>> from gblr.compress.convert import select_layers
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 4, stride=4), torch.nn.Flatten(),
        ...                             torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
        >>> selection = select_layers(model, gblr.GBLRConfig())
        >>> [name for name, _, _ in selection.selected], selection.convolutions
        (['0', '2'], ['0'])
        >>> select_layers(model, gblr.LowRankConfig()).convolutions  # families skip convs
        []
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, ConversionConfig):
        config = _config_argument(config, (), {})
    include_patterns = _as_patterns("include", config.include)
    exclude_patterns = _as_patterns("exclude", config.exclude)
    spec = _registered().get(config.structure)  # None: "dense", nothing is replaced

    conv1d = hf_conv1d_class()
    if (kind := convertible_kind(model, conv1d)) is not None:
        raise ValueError(
            f"model is itself a {kind} layer ({type(model).__name__}); convert replaces a "
            "model's layers in place and cannot replace the object you hold: convert "
            "nn.Sequential(model) and use its [0]"
        )
    aliases: dict[int, list[str]] = {}
    candidates = []
    for name, module in model.named_modules(remove_duplicate=False):
        if (kind := convertible_kind(module, conv1d)) is None:
            continue
        if id(module) in aliases:
            aliases[id(module)].append(name)
        else:
            aliases[id(module)] = [name]
            candidates.append((name, module, kind))
    names = [alias for _, module, _ in candidates for alias in aliases[id(module)]]
    _check_patterns_match("include", include_patterns, names)
    _check_patterns_match("exclude", exclude_patterns, names)
    include_patterns = peft_patterns(include_patterns, names)
    exclude_patterns = peft_patterns(exclude_patterns, names)

    selection = LayerSelection(config, [], [], aliases)
    supports_conv2d = spec is None or spec.supports_conv2d
    for name, module, kind in candidates:
        # A shared module is one layer: selected by any of its names, excluded by any.
        module_names = aliases[id(module)]
        if include_patterns and not any(
            fnmatch.fnmatchcase(alias, p) for alias in module_names for p in include_patterns
        ):
            continue
        if exclude_patterns and any(
            fnmatch.fnmatchcase(alias, p) for alias in module_names for p in exclude_patterns
        ):
            continue
        reason = _skip_reason(module, kind, config.min_features, supports_conv2d)
        if reason is None:
            reason = _parent_reason(model, module_names)
        if reason is not None:
            selection.skipped.append((name, reason))
            continue
        selection.selected.append((name, module, kind))
    if spec is not None:
        selection.targets, selection.tied = _tie_groups(model, selection.selected, aliases)
    return selection


# --------------------------------------------------------------------------- convert
def convert(
    model: nn.Module,
    config: ConversionConfig | str | None = None,
    *args: Any,
    calibration: Iterable[Any] | None = None,
    progress: bool | None = None,
    example_input: Any = None,
    **old: Any,
) -> ConversionReport:
    """Replace, in place, the model's dense layers by structured layers fitted to them.

    ``config`` says which structure and how (as ``peft.get_peft_model(model,
    LoraConfig(...))``): [`gblr.GBLRConfig`][] (the default, ``GBLRConfig()``: GBLR
    layers at 0.3 of the MACs from the truncated SVD), a baseline family's config
    ([`gblr.LowRankConfig`][], [`gblr.MonarchConfig`][],
    [`gblr.BlockDiagConfig`][], [`gblr.BlockSparseConfig`][],
    [`gblr.PixelflyConfig`][]: those convert Linear and Conv1D layers and skip
    convolutions), or [`gblr.ConversionConfig`][] (``structure="dense"``: convert
    nothing, report the layers: a baseline for scripts; or a structure registered
    without a config of its own). A structure's name (``"lowrank"``) means its default
    config. The config is recorded on the model as ``model.gblr_config`` when a layer
    was converted, and [`gblr.save`][] writes it into the file
    ([`gblr.ConversionConfig.from_file`][] reads it back).

    All or nothing: the config, the arguments and every selected layer's weights are
    checked before anything is fitted, all layers are fitted before any is replaced, and
    if anything fails (an exception, ``KeyboardInterrupt`` included) the model keeps its
    original modules and parameters.

    Deprecated: the options as arguments, ``convert(model, structure="gblr",
    budget=0.3, init="svd", include=None, exclude=None, allocation="global", *,
    rank_per_component=1, min_features=16, steps=200, seed=0)``, still work until gblr
    0.3 and give the same model, with a ``FutureWarning`` naming the config to pass
    instead (``steps`` is ``GBLRConfig(search_steps=)``; for a family, ``init`` "svd"
    and "search" are ``init="project"``; options a structure ignores are dropped).
    A config and such arguments together are a ``ValueError``.

    Args:
        model: any ``nn.Module``; every ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, zero
            padding) and Hugging Face ``Conv1D`` among ``named_modules()`` is a candidate.
            It cannot itself be such a layer (it is replaced in place: wrap it, e.g. in
            ``nn.Sequential``).
        config: a [`gblr.ConversionConfig`][] (of any structure), a structure name
            (``"dense"`` or one of [`structures`][gblr.compress.configs.structures]) or ``None``
            (``GBLRConfig()``).
        calibration: example inputs of the model (an iterable of batches: tensors, tuples
            of positional arguments, or mappings of keyword arguments such as a
            tokenizer's output; one batch alone goes in a list). The model runs once over
            them and every layer is fitted to minimize its *output* error on those
            inputs, ``||(W - Ŵ) S||`` with ``S Sᵀ`` the second moment of the layer's
            inputs, instead of the weight error
            (`gblr.compress.calibrate`); the global allocation weighs layers by the
            same output errors, and the report's errors are output errors. For
            ``GBLRConfig(init="svd")`` and ``LowRankConfig(init="project")``, Linear and
            Conv1D layers.
        progress: show a progress bar over the layers, with the layer being fitted and
            the time left (``tqdm``, when installed); the default ``None`` shows it only
            when standard error is a terminal, ``False`` never. (A display option of this
            call, not of the conversion: it is not part of the config that
            ``model.gblr_config`` records and [`gblr.save`][] writes.)
        example_input: optional input of ``model`` (a tensor, a tuple of positional
            arguments, or a mapping of keyword arguments such as a tokenizer's output), for
            example one sample of its data. The model runs once on it (eval
            mode, no gradient, training flags restored) and each selected layer's MACs are
            counted times the rows (output positions, for a convolution) it processes
            there: the budget is then a fraction of a forward pass's MACs, and the global
            allocation weighs a layer that runs on more rows per example accordingly (a
            CNN's early stages, an MLP-Mixer's token-mixing layers). Without it every
            layer counts per row, which is the same where all selected layers see the
            same rows (a transformer's linear layers). Each selected layer must run on it.

    Returns:
        A [`ConversionReport`][gblr.compress.convert.ConversionReport] (``report.config``: the
        config used). Converted layers keep their bias, dtype, device and train/eval mode; they are
        [`gblr.GBLRLinear`][] (for ``Linear`` and ``Conv1D``, input ``(..., in)``) or
        [`gblr.GBLRConv2d`][], or the family's
        [`gblr.structured.StructuredLinear`][]. With ``allocation="global"`` (and a
        budget below 1), a layer whose share of the budget is at least its dense MACs
        stays as it is (its ``nn.Linear`` and weights, exact): a structured layer at that
        cost could only lose accuracy (``keep_dense=False`` in the config converts it
        all the same, and so does ``init="random"``, which fits nothing to the weights).
        It is in ``report.layers`` with ``dense=True`` (its MACs count in the totals)
        and named in ``report.dense_layers``. Layers left
        dense for other reasons are listed in ``report.skipped`` with the reason: one the
        family cannot express at its share of the budget (below the family's smallest
        configuration), the Linear children of
        ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (torch reads their
        ``.weight``), a layer whose ``.weight`` a module above it reads in its forward
        (``self.wo.weight.dtype`` in transformers' T5, its ViT's patch projection), and
        *tied* layers (below). A ``UserWarning`` says when
        tied layers were left dense, when no layer was converted at all, and when the
        global allocation left a layer under `STARVED_SHARE` (1%) of ``budget`` times
        its MACs (almost nothing passes through it: an untrained model's flat spectra
        do that), when GBLR was fitted to weights that look untrained (use
        ``init="random"`` to train from scratch), and when trained weights were fitted
        alone by a config that takes ``calibration`` (`RANDOM_LIKE_STABLE_RANK`).

    Tied weights: a module registered under several names is one layer, replaced by one
    structured module under all of them (``aliases`` in the report). Distinct modules
    sharing one weight ``Parameter`` (and the same bias, or none) likewise get one shared
    structured module. A layer whose parameters are also held by a module that stays as
    it is (a language-model head tied to the token embedding, a tied layer that is
    excluded or skipped) is left dense with a warning, so that the tie holds (as
    ``tie_weights()`` expects); ``exclude`` it to silence the warning.

    Raises:
        TypeError: an argument of the wrong type (named, with what is allowed).
        ValueError: a config together with old-style arguments, an argument out of
            range, a pattern that matches no layer, a model that is itself a layer,
            ``rank_per_component`` above a layer's ``min(out, in)``, or weights that are
            NaN, inf or not loaded (the layers are named). Raised before the model is
            changed.
        RuntimeError: fitting a layer failed (the layer is named, the cause chained);
            the model is unchanged.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
        >>> report = gblr.convert(model, gblr.GBLRConfig(budget=0.5))
        >>> isinstance(model[0], gblr.GBLRLinear), report.ratio <= 0.5
        (True, True)
        >>> model.gblr_config == gblr.GBLRConfig(budget=0.5)
        True
        >>> dense = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> report = gblr.convert(dense, "dense")  # a structure's name: its defaults
        >>> report.config.structure, report.ratio, type(dense[0]).__name__
        ('dense', 1.0, 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if "example_input" in old:
        raise TypeError("convert() got example_input twice")
    config = _config_argument(config, args, old)
    _check_call(config, progress, calibration)
    structure, budget, allocation = config.structure, config.budget, config.allocation
    fresh = getattr(config, "init", None) == "random"  # nothing fitted to the weights
    if fresh:
        # Nothing is fitted: the untrained weights' error curves would hand out MACs at
        # random (a two-layer MLP's second layer got none and trained at chance).
        allocation = "uniform"
    # The allocation's unit of rank (GBLR's rank per component; 1 without one).
    rank_per_component = getattr(config, "rank_per_component", 1)
    spec = _registered().get(structure)  # None: "dense", nothing is replaced
    selection = select_layers(model, config)
    parameter = next(model.parameters(), None)
    if example_input is not None and parameter is not None:
        example_input = to_device(example_input, parameter.device)
    report = ConversionReport(
        structure,
        getattr(config, "init", None),
        allocation,
        budget,
        calibrated=calibration is not None,
        config=config,
    )
    report.skipped += selection.skipped
    if spec is None:  # the baseline of baselines: report the layers, change nothing
        modules = [module for _, module, _ in selection.selected]
        counts = [1] * len(modules)
        if example_input is not None:
            counts = layer_rows(model, modules, example_input)
        for (name, module, kind), seen in zip(selection.selected, counts, strict=True):
            out_features, in_features = _matrix(module, kind).shape
            macs = out_features * in_features
            shape = (out_features, in_features)
            report.layers.append(
                LayerConversion(name, kind, shape, macs, macs, 0.0, 0.0, rows=seen)
            )
        return report

    targets, tied = selection.targets, selection.tied
    report.skipped += tied
    if tied:
        warnings.warn(
            f"gblr.convert leaves {len(tied)} tied layer(s) dense: "
            + "; ".join(f"{name}: {reason}" for name, reason in tied[:3])
            + ("; ..." if len(tied) > 3 else ""),
            UserWarning,
            stacklevel=2,
        )
    _check_weights(targets, fresh)
    _check_rank(targets, rank_per_component)

    matrices = []
    for target in targets:
        matrix = _matrix(target.module, target.kind)
        matrices.append(
            matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
        )
    shapes = [tuple(matrix.shape) for matrix in matrices]
    whitenings: list[Tensor | None] = [None] * len(targets)
    if calibration is not None and targets:
        if selection.convolutions:
            raise ValueError(selection.calibration_refusal)
        moments = input_second_moments(
            model, {target.name: target.modules for target in targets}, calibration
        )
        whitenings = [
            whitening(moments[target.name].to(matrix.device))
            for target, matrix in zip(targets, matrices, strict=True)
        ]
    # Error curves for the global allocation: of the output (whitened) when calibrated.
    curves = [
        _svd_curve(matrix if factor is None else matrix @ factor.to(matrix.dtype))
        for matrix, factor in zip(matrices, whitenings, strict=True)
    ]
    dense = [m * n for m, n in shapes]
    rows = _target_rows(model, targets, example_input)
    if allocation == "uniform" or budget >= 1.0:
        # At least 1 MAC, so that a layer too small for any MAC at this budget reaches the
        # structure's fit and is skipped there (BudgetTooSmallError), not refused as a
        # malformed MAC count.
        layer_macs = [
            max(1, fraction_budget_macs(budget, None, size, fraction_name="budget", minimum=0))
            for size in dense
        ]
    else:
        weights, _ = row_weights(rows)
        total = int(budget * sum(size * weight for size, weight in zip(dense, weights)))
        layer_macs = _allocation_with_floors(
            curves,
            shapes,
            total,
            rank_per_component,
            weights,
            functools.partial(_family_minimum, spec.fit),
        )

    # A layer the global allocation gives its dense MACs stays dense: exact, same cost.
    # (budget 1.0 is "no compression": GBLR's exact full-rank factorization, to learn from.)
    # Not for init="random": nothing is fitted to the weights, every layer starts fresh.
    keeps = config.keep_dense and not fresh
    keep = [
        keeps and allocation == "global" and budget < 1.0 and macs >= size
        for macs, size in zip(layer_macs, dense)
    ]

    # Everything is fitted before anything is replaced: a failure leaves the model as it was.
    replacements: list[tuple[_Target, nn.Module]] = []
    fits = zip(targets, matrices, curves, layer_macs, whitenings, keep, rows, strict=True)
    bar = _progress_bar(len(targets), progress)
    draws = contextlib.ExitStack()
    if fresh:
        # Fresh layers are drawn one after another from the config's seed, leaving the
        # caller's random state as it was.
        devices = {t.module.weight.device for t in targets if t.module.weight.is_cuda}
        draws.enter_context(torch.random.fork_rng(devices=list(devices)))
        torch.manual_seed(config.seed)
    try:
        for target, matrix, curve, macs, factor, kept, seen in fits:
            if bar is not None:
                bar.set_postfix_str(target.name, refresh=False)
            shape = tuple(matrix.shape)
            if kept:
                svd_error = _svd_error(curve, shape[0] * shape[1], shape, rank_per_component)
                report.layers.append(_dense_row(target, shape, svd_error, seen))
            else:
                fitted = _fit_target(spec, config, target, matrix, macs, factor, report)
                if fitted is None:  # the structure cannot be built at its share: dense,
                    # and counted so, or the report's ratio would hide its cost
                    report.layers.append(_dense_row(target, shape, 0.0, seen))
                else:
                    replacements.append((target, fitted[0]))
                    report.layers.append(
                        LayerConversion(
                            name=target.name,
                            kind=target.kind,
                            shape=shape,
                            macs_before=shape[0] * shape[1],
                            macs_after=fitted[1],
                            error=fitted[2],
                            aliases=tuple(target.names[1:]),
                            svd_error=_svd_error(curve, fitted[1], shape, rank_per_component),
                            rows=seen,
                        )
                    )
            if bar is not None:
                bar.update(1)
    finally:
        draws.close()
        if bar is not None:
            bar.close()
    _install(model, [(name, layer) for target, layer in replacements for name in target.names])
    starved = [
        f"{row.name} ({row.macs_after} of {row.macs_before})"
        for row in report.layers
        if not row.dense and row.macs_after < STARVED_SHARE * budget * row.macs_before
    ]
    if starved:
        # e.g. an untrained model's flat spectra: the greedy fill gives one layer nearly all
        warnings.warn(
            f"gblr.convert: the global allocation left {len(starved)} layer(s) under "
            f"{STARVED_SHARE:.0%} of the budget's share of their MACs, so almost nothing "
            f"passes through them: {', '.join(starved[:5])}"
            + (", ..." if len(starved) > 5 else "")
            + "; allocation='uniform' gives every layer the budget (and from scratch, "
            "init='random' starts every layer at it)",
            UserWarning,
            stacklevel=2,
        )
    if report.layers and report.ratio > OVER_BUDGET * budget:
        # a family's smallest layer above its share (Pixelfly on small layers): dense
        stays = len(report.dense_layers)
        warnings.warn(
            f"gblr.convert: the converted layers cost {report.ratio:.3f} of their dense "
            f"MACs, above the budget of {budget:g}: "
            + (
                f"{stays} layer(s) the structure could not build within their share stay "
                "dense (report.dense_layers)"
                if stays
                else "the structure's smallest layers cost more than their share"
            )
            + "; a larger budget or another structure fits",
            UserWarning,
            stacklevel=2,
        )
    if structure == "gblr" and fresh:
        start_from_scratch([layer for _, layer in replacements], budget, config.seed)
    elif replacements:
        _warn_about_the_fit(
            [matrix for matrix, kept in zip(matrices, keep) if not kept],
            gblr_fitted=structure == "gblr",
            could_calibrate=calibration is None and selection.calibration_refusal is None,
        )
    if replacements:
        # The config that made the model (gblr.save writes it), as peft's model.peft_config.
        previous = getattr(model, "gblr_config", None)
        if previous is not None and previous != config:
            warnings.warn(
                f"model.gblr_config held the config of an earlier conversion ({previous!r}); "
                "it now records this one only (the layers of both stay as converted)",
                UserWarning,
                stacklevel=2,
            )
        model.gblr_config = config
        # A transformers model's own save_pretrained writes a gblr folder (which dense
        # loaders refuse), never a folder that loads as a dense model with random layers.
        protect_save_pretrained(model)
    else:
        kept_dense = len(report.dense_layers)
        warnings.warn(
            f"gblr.convert converted no layer ({len(report.skipped)} skipped, reasons in "
            "report.skipped"
            + (f"; {kept_dense} kept dense, report.dense_layers" if kept_dense else "")
            + ")",
            UserWarning,
            stacklevel=2,
        )
    return report


# The report's MACs ratio beyond which convert warns that it ended above the budget (the
# allocations round to whole lines and blocks, within a few percent).
OVER_BUDGET = 1.05


def _warn_about_the_fit(fitted: list[Tensor], gblr_fitted: bool, could_calibrate: bool) -> None:
    """Warn when what the layers were fitted to is likely the wrong thing to fit: weights
    that look untrained (`stable_rank_to_random`, median over the layers at least
    ``RANDOM_LIKE_STABLE_RANK``) under GBLR, whose truncated SVD is a low-rank start where
    training from scratch went far better from the block-diagonal start; or trained
    weights fitted alone where the config could have been fitted to calibration inputs
    (``could_calibrate``), which kept far more of a pretrained model."""
    if not fitted or not (gblr_fitted or could_calibrate):
        return
    median = statistics.median(stable_rank_to_random(matrix) for matrix in fitted)
    if median >= RANDOM_LIKE_STABLE_RANK:
        if gblr_fitted:
            warnings.warn(
                f"gblr.convert: the weights of the {len(fitted)} layer(s) it fitted look "
                f"untrained (spread as evenly as random weights: median stable rank "
                f"{median:.2f} of a random matrix's), and their SVD is a low-rank start; to "
                "train from scratch, convert with init='random' (the block-diagonal start, "
                "which trained best)",
                UserWarning,
                stacklevel=3,
            )
    elif could_calibrate:
        warnings.warn(
            f"gblr.convert: {len(fitted)} layer(s) were fitted to their weights alone; "
            "calibration= (a few batches of the model's inputs) fits each to its outputs on "
            "them instead, which kept far more of a pretrained model (all-MiniLM-L6-v2 at "
            "0.3 of the MACs: held-out embedding cosine 0.27 alone, 0.58 calibrated; "
            "docs/RESULTS.md, T3)",
            UserWarning,
            stacklevel=3,
        )


def _dense_row(
    target: _Target, shape: tuple[int, int], svd_error: float, rows: int
) -> LayerConversion:
    """The report's row of a layer left dense: its dense MACs before and after."""
    size = shape[0] * shape[1]
    return LayerConversion(
        target.name,
        target.kind,
        shape,
        size,
        size,
        0.0,
        svd_error,
        aliases=tuple(target.names[1:]),
        dense=True,
        rows=rows,
    )


def _fit_target(
    spec: Any,
    config: ConversionConfig,
    target: _Target,
    matrix: Tensor,
    macs: int,
    factor: Tensor | None,
    report: ConversionReport,
) -> tuple[nn.Module, int, float] | None:
    """``(layer, MACs, error)``: the structured layer fitted to one target, with its bias,
    dtype, device and mode; ``None`` when the structure cannot be built at ``macs`` (the
    layer is then listed in ``report.skipped``)."""
    weight = target.module.weight
    options = {} if factor is None else {"whitening": factor}
    try:
        fitted = spec.fit(matrix, macs, config, **options)
    except BudgetTooSmallError as error:  # a family that cannot express this budget here
        report.skipped.append((target.name, str(error)))
        return None
    except Exception as error:
        raise RuntimeError(
            f"gblr.convert: fitting layer {target.name!r} ({target.kind} "
            f"{matrix.shape[0]}x{matrix.shape[1]}, {macs} MACs, {_config_text(config)}) "
            f"failed with {type(error).__name__}: {error}; the model is unchanged"
        ) from error
    fitted.eval()
    with torch.no_grad():
        difference = fitted.dense_weight().to(matrix.dtype) - matrix
        reference = matrix
        if factor is not None:  # output errors on the calibration inputs
            factor = factor.to(matrix.dtype)
            difference, reference = difference @ factor, matrix @ factor
        error = float(difference.norm() / reference.norm().clamp_min(1e-30))
    layer = _build_layer(target.module, target.kind, fitted, weight.device, weight.dtype)
    return layer, int(fitted.flops()), error


def _install(model: nn.Module, replacements: list[tuple[str, nn.Module]]) -> None:
    """Put each module at its name; on any failure, the original modules back."""
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, layer in replacements:
            parent, child = _parent_and_child(model, name)
            done.append((parent, child, getattr(parent, child)))
            set_submodule(model, name, layer)
    except BaseException:
        for parent, child, original in reversed(done):
            setattr(parent, child, original)
        raise
