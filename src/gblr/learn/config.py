"""How the structure is learned: [`LearnerConfig`][gblr.learn.config.LearnerConfig] and the
sub-configs of the learner's optional passes.

The budget (``budget``/``budget_macs``/``lam``) and the run's length stay keywords of
[`gblr.StructureLearner`][]: they belong to a run, the config to a method. What each
option does, and what it was measured to do, is in docs/BENCHMARKS.md ("The structure
learner's options").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from ..layers.base import check_sigma_fits_buffer
from .factors import check_fraction, check_int

__all__ = [
    "RAMPS",
    "SIGMA_SCHEDULES",
    "AdaptiveConfig",
    "LearnerConfig",
    "MergeConfig",
    "RefineConfig",
    "ShiftLimitConfig",
    "UntangleConfig",
    "config_fields",
]

SIGMA_SCHEDULES = ("linear", "geometric", "constant")
RAMPS = ("geometric", "linear")


def _check_real(name: str, value: object, allowed: str) -> float:
    """``value`` as a float when it is a real number (bools refused), else a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_cells(name: str, value: object) -> float | None:
    """A shift limit: ``None`` or a finite number of grid cells > 0."""
    if value is None:
        return None
    allowed = "a finite number of grid cells > 0, or None"
    cells = _check_real(name, value, allowed)
    if not 0 < cells < math.inf:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return cells


def check_sigma(sigma: object) -> tuple[float, float] | None:
    """``sigma`` as a ``(start, end)`` pair of floats, or ``None`` (σ left alone).

    A number means a constant; ``math.inf`` (exact boxcar masks) only as a constant.

    Raises:
        ValueError: not ``None``, a positive number or a pair of them; a value the
            layers' σ buffer cannot hold; a schedule between a finite σ and inf.

    Examples:
        >>> from gblr.learn.config import check_sigma
        >>> check_sigma((1, 100)), check_sigma(5.0), check_sigma(None)
        ((1.0, 100.0), (5.0, 5.0), None)
    """
    if sigma is None:
        return None
    values = (sigma, sigma) if isinstance(sigma, numbers.Real) else sigma
    if (
        not isinstance(values, (tuple, list))
        or len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values)
        or not all(v > 0 for v in values)
    ):
        raise ValueError(
            f"sigma must be a positive number, a (start, end) pair of them, or None, got {sigma!r}"
        )
    start, end = float(values[0]), float(values[1])
    for value in (start, end):
        check_sigma_fits_buffer("sigma", value)
    if math.isinf(start) != math.isinf(end):
        # A schedule between a finite σ and inf has no meaningful middle: geometric
        # steps would jump to inf at once, linear ones too.
        raise ValueError(
            f"sigma={sigma!r}: a schedule needs two finite ends; sigma=math.inf (exact "
            "boxcar masks) is a constant, give it alone"
        )
    return start, end


_C = TypeVar("_C", bound="_Config")


def config_fields(cls: type, data: object) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``, for a config's
    ``from_dict``: a ``TypeError`` if it is not a mapping, a ``ValueError`` naming the
    keys ``cls`` has no field for and listing the allowed ones.

    Examples:
        >>> from gblr import MergeConfig
        >>> from gblr.learn.config import config_fields
        >>> config_fields(MergeConfig, {"tolerance": 0.01})
        {'tolerance': 0.01}
        >>> try:
        ...     config_fields(MergeConfig, {"tolerence": 0.01})
        ... except ValueError as error:
        ...     print(str(error)[:48])
        unknown key(s) ['tolerence'] for MergeConfig; al
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping (a dict), got {type(data).__name__}")
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for {cls.__name__}; allowed: {names}")
    return dict(data)


class _Config:
    """``to_dict``/``from_dict`` and field setting shared by the frozen configs."""

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-safe data (see
        [`LearnerConfig.to_dict`][gblr.learn.config.LearnerConfig.to_dict])."""
        fields = dataclasses.fields(self)
        return {field.name: _plain(getattr(self, field.name)) for field in fields}

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """The config of `to_dict`'s data; unknown keys are a ``ValueError`` listing
        the allowed ones."""
        return cls(**config_fields(cls, data))


def _plain(value: object) -> object:
    """JSON-safe form of a field: nested configs as dicts, tuples as lists, inf as "inf"."""
    if isinstance(value, _Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf"  # JSON has no infinity; σ = inf (exact boxcars) is a valid setting
    return value


def _from_plain(value: object) -> object:
    if value == "inf":
        return math.inf
    if isinstance(value, list):
        return tuple(_from_plain(item) for item in value)
    return value


@dataclass(frozen=True)
class AdaptiveConfig(_Config):
    """Adaptive-lasso thresholds: each component's widths shrink by
    ``τ · (cost per unit width) · (mean importance / importance_k) ** exponent``, its
    importance the RMS entry of its exact block, ``‖D(a_k) U_k‖ ‖V_k D(b_k)‖ /
    sqrt(|R_k| |C_k|)``; the budget is still met exactly by one global ``τ``.

    Attributes:
        exponent: ``γ``, a finite number > 0 (``adaptive=None`` in the
            [`LearnerConfig`][gblr.learn.config.LearnerConfig] is the paper's one uniform
            threshold).

    Examples:
        >>> from gblr import AdaptiveConfig
        >>> AdaptiveConfig().exponent
        1.0
    """

    exponent: float = 1.0

    def __post_init__(self) -> None:
        allowed = "a finite number > 0 (adaptive=None: the paper's uniform threshold)"
        exponent = _check_real("AdaptiveConfig.exponent", self.exponent, allowed)
        if not 0 < exponent < math.inf:
            raise ValueError(f"AdaptiveConfig.exponent must be {allowed}, got {self.exponent!r}")
        self._set("exponent", exponent)


@dataclass(frozen=True)
class ShiftLimitConfig(_Config):
    """A limit on how far the optimizer moves each width and location per learner step,
    in grid cells (rows or columns), relative to the structure after the previous step.
    The budget's cut and fill (``LearnerConfig.fill_budget``) come after the clamp and may
    move a width further.

    Attributes:
        cells: the limit once the budget ramp (``warmup_steps``) is over; ``None``: none.
        cells_during_ramp: the limit during the ramp; ``None``: none. At least one of the
            two is a finite number > 0.

    Examples:
        >>> from gblr import ShiftLimitConfig
        >>> ShiftLimitConfig(cells_during_ramp=4.0)
        ShiftLimitConfig(cells=1.0, cells_during_ramp=4.0)
    """

    cells: float | None = 1.0
    cells_during_ramp: float | None = None

    def __post_init__(self) -> None:
        for name in ("cells", "cells_during_ramp"):
            self._set(name, _check_cells(f"ShiftLimitConfig.{name}", getattr(self, name)))
        if self.cells is None and self.cells_during_ramp is None:
            raise ValueError(
                "ShiftLimitConfig needs cells or cells_during_ramp (a number of grid cells "
                "> 0), got None for both; use shift_limit=None for no limit"
            )


class _FractionConfig(_Config):
    """A pass config whose fields are all fractions in ``[0, 1)``, kept as floats."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            self._set(field.name, check_fraction(f"{type(self).__name__}.{field.name}", value))


@dataclass(frozen=True)
class MergeConfig(_FractionConfig):
    """Merging pairs of components whose summed blocks are one cheaper component
    ([`gblr.merge_components`][]), every ``pass_every`` steps after the budget ramp.

    Attributes:
        tolerance: relative squared error allowed per merge, in ``[0, 1)``.

    Examples:
        >>> from gblr import LearnerConfig, MergeConfig
        >>> LearnerConfig(merge=MergeConfig()).merge
        MergeConfig(tolerance=0.001)
    """

    tolerance: float = 1e-3


@dataclass(frozen=True)
class UntangleConfig(_FractionConfig):
    """Re-splitting settled overlapping pairs of rank-1 components into blocks on
    smaller intervals ([`gblr.untangle_components`][], saving at least 5% of a pair's
    MACs), every ``pass_every`` steps after the budget ramp.

    Attributes:
        tolerance: relative squared error allowed per pair, in ``[0, 1)``.

    Examples:
        >>> import gblr
        >>> gblr.UntangleConfig(tolerance=0).to_dict()  # exact untanglings only
        {'tolerance': 0.0}
    """

    tolerance: float = 1e-4


@dataclass(frozen=True)
class RefineConfig(_FractionConfig):
    """Budget-neutral swaps of interval end cells judged by a quadratic model of the
    loss ([`gblr.learn.refine`][]), half-way between merge passes after the ramp.

    Attributes:
        floor: the least predicted gain of a swap, a fraction in ``[0, 1)`` of the
            model's ``c ‖W‖² / 2``.

    Examples:
        >>> from gblr import RefineConfig
        >>> RefineConfig(floor=1)
        Traceback (most recent call last):
        ...
        ValueError: RefineConfig.floor must be in [0, 1), got 1
    """

    floor: float = 1e-6


@dataclass(frozen=True)
class LearnerConfig(_Config):
    """How [`gblr.StructureLearner`][] learns the structure: the σ schedule, the shape
    of the budget ramp and the optional passes (each ``None``: off).

    Checked when made (a ``TypeError``/``ValueError`` naming the field, the value and
    what is allowed), frozen, and round-trips through JSON (`to_dict`,
    `from_dict`); the learner saves it in its ``state_dict()``. Presets:
    `paper`, `annealed`, `finetune` and `planted`; change one with
    ``dataclasses.replace(LearnerConfig.planted(), pass_every=10)``.

    Attributes:
        sigma: Gaudi bandwidth schedule: ``(start, end)``, a single number (constant),
            or ``None`` (default) to leave the layers' σ alone: ∞, exact boxcar masks,
            for layers made from scratch by the library. Paper: 1 → 100 (the default
            until 2026-12-06; with the block-diagonal start the exact masks trained as
            well or better on the real tasks, docs/BENCHMARKS.md, "A new default
            start"). ``math.inf`` (only
            as a constant) trains through exact boxcar masks. A pair is kept as a tuple
            of floats.
        sigma_schedule: ``"geometric"`` (equal time per factor of σ), ``"linear"`` or
            ``"constant"``.
        ramp: shape of the budget's warm-up ramp from the starting cost:
            ``"geometric"`` (equal time per factor of cost, so the last cuts are
            gradual) or ``"linear"``.
        adaptive: adaptive-lasso thresholds ([`AdaptiveConfig`][gblr.learn.config.AdaptiveConfig]).
        shift_limit: a per-step limit on structure moves
            ([`ShiftLimitConfig`][gblr.learn.config.ShiftLimitConfig]).
        merge: merge passes ([`MergeConfig`][gblr.learn.config.MergeConfig]).
        untangle: untangle passes ([`UntangleConfig`][gblr.learn.config.UntangleConfig]).
        refine: refine passes ([`RefineConfig`][gblr.learn.config.RefineConfig]).
        pass_every: steps between merge, untangle and refine passes, an int >= 1.
        exact_from: the fraction of the learner's ``total_steps``, in (0, 1], from which
            the masks are exact boxcars (σ = inf), the masks that evaluation and the
            frozen form use, and the structure is fixed (widths and locations stop
            requiring gradients, so optimizers skip them): the last steps train the
            factors of the structure that will be deployed. The σ schedule runs from
            ``sigma_start_step`` to that step (with ``sigma=None`` the layers' σ is left
            alone until then). Default 0.95: without it training ends on σ = 100 masks,
            under which a one-line interval of a 256-wide layer still blurs over its
            neighbours while evaluation uses exact ones; on pixel MLPs from scratch
            (no normalisation layer to absorb the difference) that cost 1.3-1.6 points,
            docs/BENCHMARKS.md. ``None``: σ follows the schedule to the last step and
            the structure moves to the end (the paper's method).
        revive: whether a component the budget cut removed (a width at 0) may come back.
            ``False`` (default): it stays off, with no gradient, and on the CPU the
            training forward does not compute it (the layers' ``revive_empty``). Real
            tasks did not tell the two apart, and training is faster without the
            removed components (docs/BENCHMARKS.md, "Components that come back"). ``True``
            (the paper's method, and `planted`): zero widths keep the gradient of the
            Gaudi smoothing, so Adam lifts them again (all K components computed); on
            planted blocks at a tight budget, that is how the options recover what
            they first missed.
        cut_exponent: the budget cut of each width is scaled by ``width ** cut_exponent``
            (one global threshold still meets the budget exactly), a number in [0, 1].
            ``0``: the paper's soft threshold, the same cost-weighted cut for every
            width, which closes a one-line side (a strip of a block-diagonal) some
            hundreds of times sooner than a full one, so a start's local structure dies
            in the budget ramp whatever the data says. ``1``: cuts in proportion to the
            widths, which keeps every component about as it was and selects nothing.
            Default 0.5, chosen on the real-task benchmarks (docs/BENCHMARKS.md, "A cut
            that spares narrow intervals").
        fill_budget: whether the learner spends the whole budget: after the warm-up and
            before the final phase, when the live components cost less than the budget
            (the loss closed some of them, and the cut only ever narrows), the live widths
            grow by the cut's own rule run backwards, one global negative threshold with
            the same per-width scale, until they cost the budget again. Closed components
            stay closed. ``False``: the budget is an upper bound only (the paper's
            method); a language model from scratch then ended at 0.44 of a 0.5 budget.
            Default ``True``, chosen on the real-task benchmarks (docs/BENCHMARKS.md, "A
            budget that is spent"). Budget mode only (λ mode has no budget to fill).
        hold_narrow_sides: ``0`` (off) or a number of lines ``n >= 1`` (default 1): every
            component that has a side at most ``n`` lines wide when the learner is built
            keeps that side's width and both its locations (the optimizer's moves are
            undone each step, and the budget's cut and fill leave that side out); its
            other side is learned and cut as usual. The passes leave them alone too: no
            merge or untangle of such a component, no refine of its held side or of
            either start. With GBLR's block-diagonal start
            (``structure_init="blockdiag"``, made of one-line strips) ``1`` keeps every
            block dense and lets the learner set only how far each strip reaches and how
            the budget splits between layers; learned freely, a one-line side moves by
            about the structure's learning rate every step and the blocks fall apart
            (docs/BENCHMARKS.md, "Few training images"). The default since 2026-12-06
            (with that start, the library's default from scratch); the paper's method
            and `finetune` hold nothing.

    Examples:
        >>> import torch, gblr
        >>> config = gblr.LearnerConfig(merge=gblr.MergeConfig(tolerance=1e-3))
        >>> config.to_dict()["merge"], config.pass_every
        ({'tolerance': 0.001}, 10)
        >>> gblr.LearnerConfig.from_dict(config.to_dict()) == config
        True
        >>> model = torch.nn.Sequential(gblr.GBLRLinear(32, 32))
        >>> learner = gblr.StructureLearner(model, config, budget=0.3, total_steps=100)
        >>> learner.config is config
        True
    """

    sigma: tuple[float, float] | float | None = None
    sigma_schedule: Literal["geometric", "linear", "constant"] = "geometric"
    ramp: Literal["geometric", "linear"] = "geometric"
    adaptive: AdaptiveConfig | None = None
    shift_limit: ShiftLimitConfig | None = None
    merge: MergeConfig | None = None
    untangle: UntangleConfig | None = None
    refine: RefineConfig | None = None
    pass_every: int = 10
    exact_from: float | None = 0.95
    revive: bool = False
    cut_exponent: float = 0.5
    fill_budget: bool = True
    hold_narrow_sides: int = 1

    # The optional passes: field name -> its config class.
    PASS_CONFIGS: ClassVar[dict[str, type[_Config]]] = {
        "adaptive": AdaptiveConfig,
        "shift_limit": ShiftLimitConfig,
        "merge": MergeConfig,
        "untangle": UntangleConfig,
        "refine": RefineConfig,
    }

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        if isinstance(self.sigma, (tuple, list)):
            self._set("sigma", tuple(float(value) for value in self.sigma))
        elif self.sigma is not None:
            self._set("sigma", float(self.sigma))
        _check_choice("sigma_schedule", self.sigma_schedule, SIGMA_SCHEDULES)
        _check_choice("ramp", self.ramp, RAMPS)
        for name, cls in self.PASS_CONFIGS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(
                    f"{name} must be a gblr.{cls.__name__} or None (off), got {value!r}"
                )
        self._set("pass_every", check_int("pass_every", self.pass_every, 1))
        if self.exact_from is not None:
            value = self.exact_from
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"exact_from must be a number in (0, 1] or None, got {value!r}")
            if not 0 < value <= 1:
                raise ValueError(f"exact_from must be in (0, 1] or None, got {value!r}")
            self._set("exact_from", float(value))
        if not isinstance(self.revive, bool):
            raise TypeError(f"revive must be True or False, got {self.revive!r}")
        allowed = "a number in [0, 1] (0: the paper's uniform cut)"
        exponent = _check_real("cut_exponent", self.cut_exponent, allowed)
        if not 0 <= exponent <= 1:
            raise ValueError(f"cut_exponent must be {allowed}, got {self.cut_exponent!r}")
        self._set("cut_exponent", exponent)
        if not isinstance(self.fill_budget, bool):
            raise TypeError(f"fill_budget must be True or False, got {self.fill_budget!r}")
        self._set("hold_narrow_sides", check_int("hold_narrow_sides", self.hold_narrow_sides, 0))

    @classmethod
    def paper(cls) -> LearnerConfig:
        """The paper's method: σ annealed 1 → 100 geometrically over the whole run, a
        geometric budget ramp, no optional pass, the structure learned to the last step,
        removed components free to come back.

        The default differs in six fields: ``sigma=None`` (the layers' exact masks
        throughout), ``exact_from=0.95`` (the last 5% of the steps train the factors of
        the fixed structure), ``revive=False`` (what the cut removed stays removed, and
        is not computed), ``cut_exponent=0.5`` (narrow intervals are cut less),
        ``fill_budget=True`` (what the loss frees of the budget is spent again) and
        ``hold_narrow_sides=1`` (the one-line sides of the block-diagonal start keep
        their width and place). None of the optional passes helped on the real-task
        benchmarks (docs/BENCHMARKS.md, "Real tasks decide the defaults").

        Examples:
            >>> import dataclasses
            >>> from gblr import LearnerConfig
            >>> default = LearnerConfig()
            >>> paper = dataclasses.replace(
            ...     default,
            ...     sigma=(1.0, 100.0),
            ...     exact_from=None,
            ...     revive=True,
            ...     cut_exponent=0.0,
            ...     fill_budget=False,
            ...     hold_narrow_sides=0,
            ... )
            >>> LearnerConfig.paper() == paper
            True
        """
        return cls(
            sigma=(1.0, 100.0),
            exact_from=None,
            revive=True,
            cut_exponent=0.0,
            fill_budget=False,
            hold_narrow_sides=0,
        )

    @classmethod
    def annealed(cls) -> LearnerConfig:
        """For a start whose structure must move far, learned from wide or random
        intervals (``structure_init="blocks"``, ``"half"``, ``"random"``): the default
        with σ annealed 1 → 100 (geometric) and nothing held, the library's default until
        2026-12-06. Small σ early lets widths and locations move far; the learned
        ``"blocks"`` start at 3× the budget with it is the best family where a layer must
        mix its inputs globally with no attention (docs/RESULTS.md, "Choosing the start").

        Examples:
            >>> from gblr import LearnerConfig
            >>> LearnerConfig.annealed().sigma, LearnerConfig.annealed().hold_narrow_sides
            ((1.0, 100.0), 0)
        """
        return cls(sigma=(1.0, 100.0), hold_narrow_sides=0)

    @classmethod
    def finetune(cls) -> LearnerConfig:
        """For fine-tuning a converted model (after [`gblr.convert`][]): ``sigma=None``
        leaves σ as the layers have it (∞: the exact masks of the fit), so the structure
        moves only where the loss asks and the start is not blurred; the masks are exact
        throughout, so there is no final phase (``exact_from=None``: the structure moves
        to the last step, as on the pretrained benchmarks), and the paper's uniform cut
        with the budget as an upper bound only (``cut_exponent=0``, ``fill_budget=False``:
        the pretrained benchmark was measured with them), nothing held
        (``hold_narrow_sides=0``: a fitted structure has no block-diagonal strips).

        Examples:
            >>> from gblr import LearnerConfig
            >>> LearnerConfig.finetune().sigma, LearnerConfig.finetune().exact_from
            (None, None)
        """
        return cls(
            sigma=None, exact_from=None, cut_exponent=0.0, fill_budget=False, hold_narrow_sides=0
        )

    @classmethod
    def planted(cls) -> LearnerConfig:
        """The planted-block recovery setting (``benchmarks/bench_learner.py``): every
        pass on, passes every 20 steps. It recovers planted structures reliably but
        collapses real tasks (a ViT from scratch on digits fell to 29-62% test accuracy;
        docs/BENCHMARKS.md): use it for synthetic recovery experiments only.

        Examples:
            >>> from gblr import LearnerConfig
            >>> config = LearnerConfig.planted()
            >>> config.shift_limit, config.pass_every
            (ShiftLimitConfig(cells=1.0, cells_during_ramp=4.0), 20)
        """
        return dataclasses.replace(
            cls.paper(),  # the paper's method plus every pass, as it was measured there
            adaptive=AdaptiveConfig(1.0),
            shift_limit=ShiftLimitConfig(cells=1.0, cells_during_ramp=4.0),
            merge=MergeConfig(1e-3),
            untangle=UntangleConfig(1e-4),
            refine=RefineConfig(1e-6),
            pass_every=20,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-safe data: the passes as nested dicts (``None`` when off),
        tuples as lists, ``math.inf`` as ``"inf"``.

        Examples:
            >>> import json
            >>> from gblr import LearnerConfig
            >>> data = LearnerConfig.planted().to_dict()
            >>> data["sigma"], data["shift_limit"]
            ([1.0, 100.0], {'cells': 1.0, 'cells_during_ramp': 4.0})
            >>> json.loads(json.dumps(data)) == data
            True
        """
        return super().to_dict()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LearnerConfig:
        """The config of ``data`` (as `to_dict` gives it). Unknown keys, here or
        in a pass's dict, are a ``ValueError`` listing the allowed ones; the values are
        checked as by the constructor.

        Examples:
            >>> from gblr import LearnerConfig
            >>> config = LearnerConfig.planted()
            >>> LearnerConfig.from_dict(config.to_dict()) == config
            True
            >>> LearnerConfig.from_dict({"merge_every": 20})
            Traceback (most recent call last):
            ...
            ValueError: unknown key(s) ['merge_every'] for LearnerConfig; allowed: [...]
        """
        options = config_fields(cls, data)
        options = {key: _from_plain(value) for key, value in options.items()}
        for name, sub in cls.PASS_CONFIGS.items():
            value = options.get(name)
            if isinstance(value, Mapping):
                options[name] = sub.from_dict(value)
        return cls(**options)

    def differences(self, other: LearnerConfig) -> list[str]:
        """The fields in which ``other`` differs, as ``"field: self's value != other's"``
        lines (nested fields of the passes as ``"pass.field"``).

        Examples:
            >>> from gblr import LearnerConfig, MergeConfig
            >>> LearnerConfig(merge=MergeConfig(1e-3)).differences(LearnerConfig())
            ['merge: MergeConfig(tolerance=0.001) != None']
        """
        found = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine == theirs:
                continue
            if isinstance(mine, _Config) and type(mine) is type(theirs):
                found += [
                    f"{field.name}.{sub.name}: {getattr(mine, sub.name)!r} != "
                    f"{getattr(theirs, sub.name)!r}"
                    for sub in dataclasses.fields(mine)
                    if getattr(mine, sub.name) != getattr(theirs, sub.name)
                ]
            else:
                found.append(f"{field.name}: {mine!r} != {theirs!r}")
        return found


# The deprecated StructureLearner keywords (before LearnerConfig) and what replaces each.
DEPRECATED_OPTIONS: dict[str, str] = {
    "sigma": "sigma=...",
    "sigma_schedule": "sigma_schedule=...",
    "ramp": "ramp=...",
    "adaptive": "adaptive=AdaptiveConfig(exponent=...)",
    "max_shift": "shift_limit=ShiftLimitConfig(cells=...)",
    "max_shift_ramp": "shift_limit=ShiftLimitConfig(cells_during_ramp=...)",
    "merge": "merge=MergeConfig(tolerance=...)",
    "merge_every": "pass_every=...",
    "untangle": "untangle=UntangleConfig(tolerance=...)",
    "refine": "refine=RefineConfig(floor=...)",
}


def config_from_options(options: Mapping[str, Any]) -> LearnerConfig:
    """The [`LearnerConfig`][gblr.learn.config.LearnerConfig] that the deprecated
    [`gblr.StructureLearner`][] keywords in ``options`` describe (every key one of
    [`DEPRECATED_OPTIONS`][gblr.learn.config.DEPRECATED_OPTIONS]), checked as they were, under their
    old names; the same run as before, bit for bit (so ``exact_from=None``,
    ``revive=True``, ``cut_exponent=0`` and ``fill_budget=False``: those runs had no
    final phase, removed components came back, every width took the same cut and the
    budget was an upper bound only).

    ``adaptive=0`` was the paper's uniform threshold (``adaptive=None``);
    ``max_shift``/``max_shift_ramp`` are one
    [`ShiftLimitConfig`][gblr.learn.config.ShiftLimitConfig].

    Examples:
        >>> from gblr.learn.config import config_from_options
        >>> config = config_from_options({"merge": 1e-3, "merge_every": 20, "adaptive": 0.0})
        >>> config.merge, config.pass_every, config.adaptive
        (MergeConfig(tolerance=0.001), 20, None)
    """
    unknown = sorted(set(options) - set(DEPRECATED_OPTIONS))
    if unknown:
        raise TypeError(f"unknown learner option(s) {unknown}; allowed: {list(DEPRECATED_OPTIONS)}")
    fields: dict[str, Any] = {
        name: options[name] for name in ("sigma", "sigma_schedule", "ramp") if name in options
    }
    adaptive = options.get("adaptive", 0.0)
    exponent = _check_real("adaptive", adaptive, "a number >= 0")
    if not 0 <= exponent < math.inf:
        raise ValueError(f"adaptive must be a finite number >= 0, got {adaptive!r}")
    if exponent > 0:
        fields["adaptive"] = AdaptiveConfig(exponent)
    for name in ("max_shift", "max_shift_ramp"):
        value = options.get(name)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not 0 < value < math.inf
        ):
            raise ValueError(
                f"{name} must be a finite number of grid cells > 0, or None, got {value!r}"
            )
    if options.get("max_shift") is not None or options.get("max_shift_ramp") is not None:
        fields["shift_limit"] = ShiftLimitConfig(
            options.get("max_shift"), options.get("max_shift_ramp")
        )
    for name, cls in (
        ("merge", MergeConfig),
        ("untangle", UntangleConfig),
        ("refine", RefineConfig),
    ):
        if options.get(name) is not None:
            fields[name] = cls(check_fraction(name, options[name]))
    if "merge_every" in options:
        fields["pass_every"] = check_int("merge_every", options["merge_every"], 1)
    # The keywords describe the paper's method, as they ran before the final phase, kept
    # removals, the scaled cut and the filled budget existed.
    return dataclasses.replace(LearnerConfig.paper(), **fields)


def deprecation_text(caller: str, options: Mapping[str, Any]) -> str:
    """The ``FutureWarning`` for ``caller(<old keywords>)``: each keyword and the
    [`LearnerConfig`][gblr.learn.config.LearnerConfig] field that replaces it.

    Examples:
        >>> from gblr.learn.config import deprecation_text
        >>> text = deprecation_text("StructureLearner", {"merge": 1e-3, "max_shift": 1.0})
        >>> text.startswith("StructureLearner(merge=..., max_shift=...) is deprecated")
        True
        >>> replacement = text.split("; ")[1]
        >>> replacement.startswith("use config=LearnerConfig(merge=MergeConfig(tolerance=...)")
        True
        >>> replacement.endswith("shift_limit=ShiftLimitConfig(cells=...))")
        True
    """
    old = ", ".join(f"{name}=..." for name in options)
    new = [DEPRECATED_OPTIONS[name] for name in options if not name.startswith("max_shift")]
    shift = [field for name, field in (("max_shift", "cells"), ("max_shift_ramp",
             "cells_during_ramp")) if name in options]  # fmt: skip
    if shift:  # one ShiftLimitConfig holds both limits
        new.append(f"shift_limit=ShiftLimitConfig({', '.join(f'{f}=...' for f in shift)})")
    return (
        f"{caller}({old}) is deprecated since gblr 0.2 and will be removed in 0.3; "
        f"use config=LearnerConfig({', '.join(new)})"
    )
