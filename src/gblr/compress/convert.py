"""Model surgery: replace a model's dense layers by structured ones under a MAC budget.

``convert(model, budget=0.3)`` swaps every matching ``nn.Linear``, ``nn.Conv2d`` and
Hugging Face ``Conv1D`` (GPT-2 family; weight stored ``(in, out)``) for a structured layer
fitted to its weights, in place, and returns a :class:`ConversionReport`.

Budgets are MACs per input row (per output position for convolutions), the same unit as
``layer.flops()``. ``allocation="uniform"`` gives every layer ``budget`` times its dense
MACs; ``"global"`` spends ``budget`` times the converted layers' total where it lowers
the summed normalized error most, using each layer's truncated-SVD error curve (exact
from its singular values) as the measure: adding one unit of rank to a layer costs
``out + in`` MACs and removes ``s_k^2 / ||W||^2`` of its normalized error, and since the
gains shrink along each spectrum a greedy fill is optimal for that separable problem. The
structured fit at the allotted MACs is never worse than that SVD (``fit_dense``), so the
curve is an upper bound on the error actually reached.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..cost import fraction_budget_macs
from ..layers.conv import GBLRConv2d
from ..layers.linear import GBLRLinear
from ..learn.learner import project_to_budget
from ..modules import set_submodule
from ..ops.whitened import weighted_low_rank, whitening
from ..structured.base import BudgetTooSmallError, StructuredLinear
from .calibrate import check_calibration, input_second_moments
from .search import _svd_layer, empty_layer, fit_dense

__all__ = [
    "ConversionReport",
    "LayerConversion",
    "convert",
    "register_structure",
    "structures",
]

INITS = ("search", "svd", "random")
ALLOCATIONS = ("uniform", "global")


# --------------------------------------------------------------------------- structures
@dataclass(frozen=True)
class _Structure:
    fit: Callable[..., nn.Module]
    supports_conv2d: bool
    supports_calibration: bool = False


_STRUCTURES: dict[str, _Structure] = {}


def register_structure(
    name: str,
    fit: Callable[..., nn.Module],
    *,
    supports_conv2d: bool = False,
    supports_calibration: bool = False,
) -> None:
    """Make ``convert(..., structure=name)`` available.

    Args:
        name: the structure's name.
        fit: ``fit(weight (out, in), macs, *, init, rank_per_component, steps, seed)`` →
            a bias-free module mapping ``(..., in) -> (..., out)`` whose ``flops()`` is at
            most ``macs`` and whose ``dense_weight()`` gives its matrix in eval mode.
        supports_conv2d: whether the returned module is a GBLR matrix layer whose factors
            and intervals can be moved into a :class:`gblr.GBLRConv2d`.
        supports_calibration: whether ``fit`` also takes ``whitening=S`` (``(in, in)``,
            :func:`gblr.ops.whitened.whitening`) and then minimizes the output
            error ``||(W - Ŵ) S||`` instead of the weight error.

    ``fit`` raises :class:`gblr.structured.BudgetTooSmallError` when the structure cannot
    be built within ``macs`` at that shape: :func:`convert` then leaves that layer dense
    (listed in ``report.skipped``). Any other exception stops the conversion with the
    model unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name == "dense":  # convert's no-op baseline
        raise ValueError("name 'dense' is reserved (structure='dense' converts nothing)")
    if not callable(fit):
        raise TypeError(f"fit must be callable, got {type(fit).__name__}")
    for flag, value in (
        ("supports_conv2d", supports_conv2d),
        ("supports_calibration", supports_calibration),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")
    _STRUCTURES[name] = _Structure(fit, supports_conv2d, supports_calibration)


def structures() -> list[str]:
    """Names accepted by ``convert(structure=...)``."""
    return sorted(_STRUCTURES)


def _fit_gblr(
    weight: Tensor,
    macs: int,
    *,
    init: str,
    rank_per_component: int,
    steps: int,
    seed: int,
    whitening: Tensor | None = None,
) -> GBLRLinear:
    m, n = weight.shape
    if macs < 2 * rank_per_component:  # pays for nothing: one dead component
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
            steps=steps,
            seed=seed,
        )
    if init == "svd":
        if macs >= m * n:
            # Budget 1.0 means "no compression": the exact full-rank factorization, the
            # starting point for learning the structure while fine-tuning (its MACs
            # exceed the dense layer's until the learner prunes it).
            macs = rank_per_component * math.ceil(min(m, n) / rank_per_component) * (m + n)
        layer = _svd_layer(weight, macs, rank_per_component)
        if layer is None:  # less than one full-width component: the best narrow ones
            r = rank_per_component
            return fit_dense(weight, budget_macs=macs, rank_per_component=r, steps=0)
        return layer.eval()
    # "random": a fresh layer at the budget's cost, nothing copied from the dense weights,
    # started as GBLR's block-diagonal special case (the start that trained best from
    # scratch on the real-task benchmarks; the paper's "half" trained 0.7-1.6 points worse).
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        ratio = min(1.0, macs / (m * n))
        layer = GBLRLinear(
            n,
            m,
            bias=False,
            rank_per_component=rank_per_component,
            structure_init="blockdiag",
            init_cost=ratio,
            dtype=weight.dtype,
            device=weight.device,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    project_to_budget([layer], macs)  # interval rounding can overshoot by a few MACs
    return layer.eval()


register_structure("gblr", _fit_gblr, supports_conv2d=True, supports_calibration=True)


def _family_fit(family: type[StructuredLinear]) -> Callable[..., nn.Module]:
    """``fit`` for a baseline family: its projection ``from_dense`` (``init`` "search" or
    "svd"), or a fresh layer at the budget (``"random"``)."""

    def fit(
        weight: Tensor,
        macs: int,
        *,
        init: str,
        rank_per_component: int,
        steps: int,
        seed: int,
        whitening: Tensor | None = None,
    ) -> nn.Module:
        if macs < 1:  # the global allocation can leave a small layer nothing: keep it dense
            raise BudgetTooSmallError(
                f"the allocation left this layer 0 MACs, below the smallest {family.__name__}"
            )
        if whitening is not None:
            return family.from_dense(weight, budget_macs=macs, whitening=whitening)
        if init != "random":
            return family.from_dense(weight, budget_macs=macs)
        out_features, in_features = weight.shape
        with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
            torch.manual_seed(seed)
            return family.for_budget(
                in_features,
                out_features,
                budget_macs=macs,
                bias=False,
                device=weight.device,
                dtype=weight.dtype,
            )

    return fit


def _register_families() -> None:
    from .. import structured

    for name, family in structured.FAMILIES.items():
        register_structure(
            name, _family_fit(family), supports_calibration=family.supports_calibration
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
    """

    name: str
    kind: str
    shape: tuple[int, int]
    macs_before: int
    macs_after: int
    error: float
    svd_error: float
    aliases: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        return self.macs_after / self.macs_before


@dataclass
class ConversionReport:
    """What :func:`convert` did: converted layers, skipped layers and totals.

    ``print(report)`` gives a table.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> report = gblr.convert(model, budget=0.25, init="svd")
        >>> len(report.layers), round(report.ratio, 2)
        (1, 0.25)
    """

    structure: str
    init: str
    allocation: str
    budget: float
    layers: list[LayerConversion] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    calibrated: bool = False

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

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
                layer.kind,
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
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            f"structure={self.structure} init={self.init} allocation={self.allocation} "
            f"budget={self.budget:g}"
            + (" (errors: of the outputs on the calibration inputs)" if self.calibrated else ""),
            "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        for name, reason in self.skipped:
            lines.append(f"skipped {name}: {reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers
def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


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


def _skip_reason(
    module: nn.Module, kind: str, min_features: int, supports_conv2d: bool
) -> str | None:
    if kind == "Conv2d":
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
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
) -> list[int]:
    """MACs per layer: greedy fill of rank units by normalized error removed per MAC."""
    r = rank_per_component
    ranks = [0] * len(curves)
    heap = []
    for index, (curve, (m, n)) in enumerate(zip(curves, shapes)):
        if curve.numel() >= r and r * (m + n) <= m * n:
            gain = float(curve[:r].sum()) / (r * (m + n))
            heap.append((-gain, index))
    heapq.heapify(heap)
    remaining = total
    while heap:
        _, index = heapq.heappop(heap)
        m, n = shapes[index]
        cost = r * (m + n)
        if cost > remaining:
            continue  # a cheaper layer may still fit
        ranks[index] += r
        remaining -= cost
        curve = curves[index]
        following = ranks[index]
        # A layer never gets more than its dense MACs.
        if following + r <= min(m, n) and (following + r) * (m + n) <= m * n:
            gain = float(curve[following : following + r].sum()) / cost
            heapq.heappush(heap, (-gain, index))
    # MACs no rank unit could use go to the layers in proportion to their size, so the
    # structured fit (which spends MACs on intervals, not only on whole ranks) uses them.
    macs = [rank * (m + n) for rank, (m, n) in zip(ranks, shapes)]
    dense = [m * n for m, n in shapes]
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
    return macs


def _build_layer(
    original: nn.Module, kind: str, fitted: nn.Module, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    bias = original.bias.detach() if original.bias is not None else None
    if kind in ("Linear", "Conv1D"):
        layer = fitted
        if bias is not None:  # dtype and device follow below with the whole layer
            layer.bias = nn.Parameter(bias.clone())
    else:
        conv = original
        layer = GBLRConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
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
    return layer.train(original.training)


def _with_progress(items: Iterable, total: int, progress: bool | None) -> Iterable:
    """``items`` behind a tqdm bar on standard error (``None``: only on a terminal)."""
    if progress is False:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return items
    return tqdm(
        items,
        total=total,
        desc="gblr.convert",
        unit="layer",
        disable=None if progress is None else False,
    )


# --------------------------------------------------------------------------- checks
def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_int(name: str, value: object, minimum: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _check_arguments(
    structure: object,
    budget: object,
    init: object,
    allocation: object,
    rank_per_component: object,
    min_features: object,
    steps: object,
    seed: object,
    progress: object,
    calibration: object,
) -> float:
    """Every argument's type and range, before the model is looked at; the budget as a
    float. Each error names the argument, the value and what is allowed."""
    _check_choice("structure", structure, ["dense", *structures()])
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"budget must be a float fraction in (0, 1] of the dense MACs, got {budget!r}"
        )
    if not 0 < float(budget) <= 1:  # NaN fails this too
        raise ValueError(f"budget must be a fraction in (0, 1] of the dense MACs, got {budget!r}")
    _check_choice("init", init, INITS)
    _check_choice("allocation", allocation, ALLOCATIONS)
    _check_int("rank_per_component", rank_per_component, 1, "a positive int")
    _check_int("min_features", min_features, 1, "a positive int")
    _check_int("steps", steps, 0, "an int >= 0 (refinement steps of init='search')")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch.manual_seed), got {seed}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(
            f"progress must be True, False or None (only on a terminal), got {progress!r}"
        )
    if calibration is not None:
        check_calibration(calibration)
        spec = _STRUCTURES.get(structure)
        if spec is None or not spec.supports_calibration:
            supported = [name for name, item in _STRUCTURES.items() if item.supports_calibration]
            raise ValueError(
                f"calibration is supported by structure {supported}, got structure={structure!r}"
            )
        if init != "svd":
            raise ValueError(
                f"calibration fits the calibrated truncated SVD: it needs init='svd', got "
                f"init={init!r}"
            )
    return float(budget)


def _as_patterns(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a glob pattern (str) or a list of them, got {value!r}")
    if not value:
        raise ValueError(
            f"{name} must hold at least one glob pattern, got {value!r} "
            f"({name}=None: {'every layer' if name == 'include' else 'no layer'})"
        )
    return list(value)


def _check_patterns_match(name: str, patterns: list[str] | None, names: list[str]) -> None:
    for pattern in patterns or []:
        if not any(fnmatch.fnmatchcase(candidate, pattern) for candidate in names):
            examples = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"{name} pattern {pattern!r} matches no convertible layer; available: "
                f"{examples or '(none)'}"
            )


def _check_weights(targets: list[_Target]) -> None:
    """``ValueError`` naming every layer whose weights cannot be fitted (not loaded, not
    floating point, NaN or inf): checked for all layers before any is replaced."""
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
        raise ValueError(
            f"convert fits each layer to its weights, and {len(problems)} layer(s) have "
            "weights it cannot fit: "
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


# --------------------------------------------------------------------------- convert
def convert(
    model: nn.Module,
    structure: str = "gblr",
    budget: float = 0.3,
    init: str = "svd",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    allocation: str = "global",
    *,
    rank_per_component: int = 1,
    min_features: int = 16,
    steps: int = 200,
    seed: int = 0,
    progress: bool | None = None,
    calibration: Iterable[Any] | None = None,
) -> ConversionReport:
    """Replace, in place, the model's dense layers by structured layers fitted to them.

    All or nothing: every argument and every selected layer's weights are checked before
    anything is fitted, all layers are fitted before any is replaced, and if anything
    fails (an exception, ``KeyboardInterrupt`` included) the model keeps its original
    modules and parameters.

    Args:
        model: any ``nn.Module``; every ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, zero
            padding) and Hugging Face ``Conv1D`` among ``named_modules()`` is a candidate.
            It cannot itself be such a layer (it is replaced in place: wrap it, e.g. in
            ``nn.Sequential``).
        structure: ``"dense"`` (no change: a baseline for scripts) or a name from
            :func:`structures`: ``"gblr"`` or a baseline family of
            :mod:`gblr.structured` (``"lowrank"``, ``"blockdiag"``, ...; those convert
            Linear and Conv1D layers, and skip convolutions).
        budget: fraction in ``(0, 1]`` of the converted layers' dense MACs. With
            ``init="svd"``, ``1.0`` means no compression: each layer becomes its exact
            full-rank factorization (costing more MACs than dense, until a structure
            learner prunes it while fine-tuning).
        init: ``"svd"`` (default: truncated SVD, full intervals; seconds, and as good
            as the search after fine-tuning on the real-task benchmarks), ``"search"``
            (:func:`gblr.fit_dense`: structure searched from the weights, a lower weight
            error before fine-tuning, minutes on a transformer), ``"random"`` (fresh
            layer at the budget's cost, for training from scratch). For the baseline
            families ``"svd"`` and ``"search"`` both mean the family's projection of the
            weights (``from_dense``).
        include: glob pattern(s) over module names; only matching layers are converted.
            Every pattern must match some candidate, and a list must not be empty.
        exclude: glob pattern(s); matching layers are left dense (same rules).
        allocation: ``"global"`` (layers compete for the model's budget, see the module
            docstring) or ``"uniform"`` (every layer gets the same ratio).
        rank_per_component: ``r`` of every GBLR component, at most ``min(out, in)`` of
            every converted layer; for the baseline families only the unit (rank ``r``)
            in which the global allocation hands out MACs.
        min_features: layers with ``min(out, in)`` below this are skipped (listed in the
            report).
        steps: refinement steps of ``fit_dense``; used by ``structure="gblr"`` with
            ``init="search"`` only, ignored otherwise (but always checked: an int >= 0).
        seed: seeds every fit; equal seeds give equal models.
        progress: show a progress bar over the layers (``tqdm``, when installed); the
            default ``None`` shows it only when standard error is a terminal.
        calibration: example inputs of the model (an iterable of batches: tensors, tuples
            of positional arguments, or mappings of keyword arguments such as a
            tokenizer's output; one batch alone goes in a list). The model runs once over
            them and every layer is fitted to minimize its *output* error on those
            inputs, ``||(W - Ŵ) S||`` with ``S Sᵀ`` the second moment of the layer's
            inputs, instead of the weight error
            (:mod:`gblr.compress.calibrate`); the global allocation weighs layers by the
            same output errors, and the report's errors are output errors. For
            ``"gblr"`` (``init="svd"``) and ``"lowrank"``, Linear and Conv1D layers.

    Returns:
        A :class:`ConversionReport`. Converted layers keep their bias, dtype, device and
        train/eval mode; they are :class:`gblr.GBLRLinear` (for ``Linear`` and ``Conv1D``,
        input ``(..., in)``) or :class:`gblr.GBLRConv2d`, or the family's
        :class:`gblr.structured.StructuredLinear`. Layers left dense are listed in
        ``report.skipped`` with the reason: one the family cannot express at its share
        of the budget (below the family's smallest configuration), the Linear children of
        ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` (torch reads their
        ``.weight``), and *tied* layers (below). A ``UserWarning`` says when
        tied layers were left dense and when no layer was converted at all.

    Tied weights: a module registered under several names is one layer, replaced by one
    structured module under all of them (``aliases`` in the report). Distinct modules
    sharing one weight ``Parameter`` (and the same bias, or none) likewise get one shared
    structured module. A layer whose parameters are also held by a module that stays as
    it is (a language-model head tied to the token embedding, a tied layer that is
    excluded or skipped) is left dense with a warning, so that the tie holds (as
    ``tie_weights()`` expects); ``exclude`` it to silence the warning.

    Raises:
        TypeError: an argument of the wrong type (named, with what is allowed).
        ValueError: an argument out of range, a pattern that matches no layer, a
            model that is itself a layer, ``rank_per_component`` above a layer's
            ``min(out, in)``, or weights that are NaN, inf or not loaded (the layers are
            named). Raised before the model is changed.
        RuntimeError: fitting a layer failed (the layer is named, the cause chained);
            the model is unchanged.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
        >>> report = gblr.convert(model, budget=0.5, init="svd")
        >>> isinstance(model[0], gblr.GBLRLinear), report.ratio <= 0.5
        (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    budget = _check_arguments(
        structure,
        budget,
        init,
        allocation,
        rank_per_component,
        min_features,
        steps,
        seed,
        progress,
        calibration,
    )
    # NumPy integers pass the checks; the fits want plain ints.
    rank_per_component, min_features = int(rank_per_component), int(min_features)
    steps, seed = int(steps), int(seed)
    include_patterns = _as_patterns("include", include)
    exclude_patterns = _as_patterns("exclude", exclude)
    spec = _STRUCTURES.get(structure)  # None: "dense", nothing is replaced

    conv1d = _conv1d_type()
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

    report = ConversionReport(
        structure, init, allocation, budget, calibrated=calibration is not None
    )
    selected = []
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
        reason = _skip_reason(module, kind, min_features, spec is None or spec.supports_conv2d)
        if reason is None:
            reason = _parent_reason(model, module_names)
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        selected.append((name, module, kind))

    if spec is None:  # the baseline of baselines: report the layers, change nothing
        for name, module, kind in selected:
            out_features, in_features = _matrix(module, kind).shape
            macs = out_features * in_features
            report.layers.append(
                LayerConversion(name, kind, (out_features, in_features), macs, macs, 0.0, 0.0)
            )
        return report

    targets, tied = _tie_groups(model, selected, aliases)
    report.skipped += tied
    if tied:
        warnings.warn(
            f"gblr.convert leaves {len(tied)} tied layer(s) dense: "
            + "; ".join(f"{name}: {reason}" for name, reason in tied[:3])
            + ("; ..." if len(tied) > 3 else ""),
            UserWarning,
            stacklevel=2,
        )
    _check_weights(targets)
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
        convs = [target.name for target in targets if target.kind == "Conv2d"]
        if convs:
            raise ValueError(
                f"calibration fits Linear and Conv1D layers only; exclude the convolutions "
                f"{convs[:5]} or convert them without calibration"
            )
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
    if allocation == "uniform" or budget >= 1.0:
        # At least 1 MAC, so that a layer too small for any MAC at this budget reaches the
        # structure's fit and is skipped there (BudgetTooSmallError), not refused as a
        # malformed MAC count.
        layer_macs = [
            max(1, fraction_budget_macs(budget, None, size, fraction_name="budget", minimum=0))
            for size in dense
        ]
    else:
        total = int(budget * sum(dense))
        layer_macs = _global_allocation(curves, shapes, total, rank_per_component)

    # Everything is fitted before anything is replaced: a failure leaves the model as it was.
    replacements: list[tuple[_Target, nn.Module]] = []
    fits = zip(targets, matrices, curves, layer_macs, whitenings, strict=True)
    for target, matrix, curve, macs, factor in _with_progress(fits, len(targets), progress):
        weight = target.module.weight
        options = {} if factor is None else {"whitening": factor}
        try:
            fitted = spec.fit(
                matrix,
                macs,
                init=init,
                rank_per_component=rank_per_component,
                steps=steps,
                seed=seed,
                **options,
            )
        except BudgetTooSmallError as error:  # a family that cannot express this budget here
            report.skipped.append((target.name, str(error)))
            continue
        except Exception as error:
            raise RuntimeError(
                f"gblr.convert: fitting layer {target.name!r} ({target.kind} "
                f"{matrix.shape[0]}x{matrix.shape[1]}, {macs} MACs, structure={structure!r}, "
                f"init={init!r}) failed with {type(error).__name__}: {error}; the model is "
                "unchanged"
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
        replacements.append((target, layer))
        report.layers.append(
            LayerConversion(
                name=target.name,
                kind=target.kind,
                shape=tuple(matrix.shape),
                macs_before=matrix.shape[0] * matrix.shape[1],
                macs_after=int(fitted.flops()),
                error=error,
                aliases=tuple(target.names[1:]),
                svd_error=_svd_error(
                    curve, int(fitted.flops()), tuple(matrix.shape), rank_per_component
                ),
            )
        )
    _install(model, [(name, layer) for target, layer in replacements for name in target.names])
    if not report.layers:
        warnings.warn(
            f"gblr.convert converted no layer ({len(report.skipped)} skipped, reasons in "
            "report.skipped)",
            UserWarning,
            stacklevel=2,
        )
    return report


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
