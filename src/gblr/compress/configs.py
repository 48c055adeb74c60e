"""One config per structure: what [`gblr.convert`][] builds, and the registry of
structures.

``gblr.convert(model, GBLRConfig(budget=0.3))`` is the call, as
``peft.get_peft_model(model, LoraConfig(...))`` and ``torchao.quantize_(model,
Int4WeightOnlyConfig())`` are: every structure has one config class holding the options
every structure shares ([`ConversionConfig`][gblr.compress.configs.ConversionConfig]: ``budget``,
``include``, ``exclude``, ``allocation``, ``keep_dense``, ``min_features``, ``seed``) and only the
options that structure uses ([`GBLRConfig`][gblr.compress.configs.GBLRConfig]: ``init``,
``rank_per_component``, ``search_steps``; a baseline family's config,
[`FamilyConfig`][gblr.compress.configs.FamilyConfig]: ``init``, ``rank_per_component``). A config is
checked when it is made, is immutable (``dataclasses.replace`` gives a changed copy), and
round-trips through plain JSON data with its structure's name inside
([`ConversionConfig.to_dict`][gblr.compress.configs.ConversionConfig.to_dict],
[`config_from_dict`][gblr.compress.configs.config_from_dict]). [`gblr.convert`][] records the config
on the model (``model.gblr_config``), [`gblr.save`][] writes it into the file and
[`ConversionConfig.from_file`][gblr.compress.configs.ConversionConfig.from_file] reads it back.

[`register_structure`][gblr.compress.configs.register_structure] adds a structure with its fit
function and its config class ([`ConversionConfig`][gblr.compress.configs.ConversionConfig] itself
when it needs only the shared options).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..deploy.io import load_checkpoint
from ..learn.config import config_fields

__all__ = [
    "BlockDiagConfig",
    "BlockSparseConfig",
    "ConversionConfig",
    "FamilyConfig",
    "GBLRConfig",
    "LowRankConfig",
    "MonarchConfig",
    "PixelflyConfig",
    "config_class",
    "config_from_dict",
    "register_structure",
    "structures",
]

INITS = ("svd", "search", "random")
FAMILY_INITS = ("project", "random")
ALLOCATIONS = ("uniform", "global")
DEFAULT_SEARCH_STEPS = 200


# --------------------------------------------------------------------------- checks
# One checker per kind of value, shared by the configs and convert's own arguments; each
# error names the argument, the value and what is allowed.
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


def _check_budget(budget: object) -> float:
    """A fraction in ``(0, 1]`` of the dense MACs, as a float (the int 1 is 1.0)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"budget must be a float fraction in (0, 1] of the dense MACs, got {budget!r}"
        )
    if not 0 < float(budget) <= 1:  # NaN fails this too
        raise ValueError(f"budget must be a fraction in (0, 1] of the dense MACs, got {budget!r}")
    return float(budget)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch.manual_seed), got {seed}")
    return int(seed)


def _as_patterns(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    """``include`` / ``exclude`` as a list of glob patterns (``None``: not given)."""
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


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True, kw_only=True)
class ConversionConfig:
    """The options every structure shares; the config of ``structure="dense"`` (convert
    nothing, report the layers: a baseline for scripts) and of a structure registered
    without a config class of its own.

    A structure with options of its own has a subclass naming it
    ([`GBLRConfig`][gblr.compress.configs.GBLRConfig], the baseline families'
    [`LowRankConfig`][gblr.compress.configs.LowRankConfig], ...), whose ``structure`` is fixed; here
    it is given. Every field is checked when the config is made (``TypeError`` / ``ValueError``
    naming the field, the value and what is allowed); configs are frozen.

    Attributes:
        structure: the structure's name: ``"dense"`` or one of
            [`structures`][gblr.compress.configs.structures] whose config class is this one.
        budget: fraction in ``(0, 1]`` of the converted layers' dense MACs (per input
            row; per output position for convolutions). The int 1 means 1.0.
        include: glob pattern(s) over module names; only matching layers are converted
            (``None``: every candidate). A pattern without wildcards that names no
            candidate selects every name ending in ``.`` and it, as peft's
            ``target_modules`` (``"query"``: every ``*.query``;
            `gblr.compress.convert.peft_patterns`). Every pattern must match some
            candidate; a list must not be empty. A list is kept as a tuple.
        exclude: glob pattern(s); matching layers are left dense (same rules).
        allocation: ``"global"`` (layers compete for the model's budget: MACs go where
            they lower the summed normalized error most) or ``"uniform"`` (every layer
            gets ``budget`` times its own MACs). A structure's ``init="random"`` fits
            nothing to the weights, so they cannot say where MACs pay: every layer starts
            at ``budget`` of its own MACs whatever this says (from scratch, the
            [`gblr.StructureLearner`][]'s one budget moves MACs between GBLR layers as
            they train).
        keep_dense: with ``allocation="global"`` and a budget below 1, a layer whose
            share of the budget is at least its dense MACs stays as it is (``True``, the
            default: exact at the same cost, where a structured layer could only lose
            accuracy; listed in ``report.dense_layers``), or becomes a structured layer
            at that cost all the same (``False``: every selected layer structured, e.g.
            for a structure learner that moves MACs between them while fine-tuning). A
            structure's ``init="random"`` (fresh layers, nothing fitted to the weights)
            keeps no layer dense.
        min_features: layers with ``min(out, in)`` below this are skipped (listed in the
            report).
        seed: seeds every fit; equal seeds give equal models.

    Examples:
        >>> import torch, gblr
        >>> from gblr.compress import ConversionConfig
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
        >>> report = gblr.convert(model, ConversionConfig(structure="dense"))
        >>> report.ratio, type(model[0]).__name__
        (1.0, 'Linear')
        >>> ConversionConfig(structure="dense", budget=1).to_dict()["budget"]
        1.0
    """

    structure: str
    budget: float = 0.3
    include: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    allocation: Literal["global", "uniform"] = "global"
    keep_dense: bool = True
    min_features: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        expected = config_class(self.structure)
        if type(self) is not expected:
            raise ValueError(
                f"structure {self.structure!r} takes a {expected.__name__}, not a "
                f"{type(self).__name__}: use {expected.__name__}(...)"
            )
        self._set("budget", _check_budget(self.budget))
        for name in ("include", "exclude"):
            value = getattr(self, name)
            patterns = _as_patterns(name, value)
            self._set(name, value if patterns is None or isinstance(value, str) else tuple(value))
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        if not isinstance(self.keep_dense, bool):
            raise TypeError(f"keep_dense must be True or False, got {self.keep_dense!r}")
        minimum = _check_int("min_features", self.min_features, 1, "a positive int")
        self._set("min_features", minimum)
        self._set("seed", _check_seed(self.seed))

    def _set(self, name: str, value: Any) -> None:
        """Store a checked (normalized) value in the frozen dataclass."""
        object.__setattr__(self, name, value)

    def _calibration_refusal(self) -> str | None:
        """Why these options cannot be fitted to calibration inputs, or ``None``."""
        return None

    # ------------------------------------------------------------------ plain data
    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-safe data, its structure's name under ``"structure"``
        (lists for the pattern tuples).

        Examples:
            >>> import json
            >>> from gblr import GBLRConfig
            >>> data = GBLRConfig(budget=0.5, include=["blocks.*"]).to_dict()
            >>> data["structure"], data["include"], data["search_steps"]
            ('gblr', ['blocks.*'], 200)
            >>> json.loads(json.dumps(data)) == data
            True
        """
        return {
            item.name: list(value) if isinstance(value, tuple) else value
            for item in dataclasses.fields(self)
            for value in [getattr(self, item.name)]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConversionConfig:
        """The config of ``data`` (as `to_dict` gives it). ``"structure"``, when
        present, must be this class's, except on ``ConversionConfig`` itself, which reads
        any structure's data (as
        [`config_from_dict`][gblr.compress.configs.config_from_dict]); the class's own
        structure may be left out. Unknown keys are a ``ValueError`` listing the allowed
        ones; the values are checked as by the constructor.

        Examples:
            >>> from gblr import GBLRConfig
            >>> config = GBLRConfig(budget=0.5, init="search", search_steps=10)
            >>> GBLRConfig.from_dict(config.to_dict()) == config
            True
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping (a dict), got {type(data).__name__}")
        if cls is ConversionConfig and isinstance(data.get("structure"), str):
            # the base class reads any structure's data, as from_file does
            target = config_class(data["structure"])
            if target is not ConversionConfig:
                return target.from_dict(data)
        options = config_fields(cls, data)
        fixed = _fixed_structure(cls)
        if fixed is not None:
            given = options.pop("structure", fixed)
            if given != fixed:
                raise ValueError(
                    f"data is for structure {given!r}, and {cls.__name__} is the config of "
                    f"{fixed!r}; use gblr.compress.config_from_dict for any structure"
                )
        elif "structure" not in options:
            raise ValueError(f"data must name its structure under 'structure', got {dict(data)}")
        return cls(**options)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ConversionConfig:
        """The config of a file: the conversion that made a model saved by
        [`gblr.save`][] or [`gblr.save_pretrained`][] (a folder, or its
        ``model.safetensors``; both write ``model.gblr_config``, set by
        [`gblr.convert`][]), or a ``.json`` file of `to_dict`'s data (`to_file` writes one).

        A model file is verified first (`gblr.deploy.load_checkpoint`). Called on a
        subclass, the config must be of that class.

        Raises:
            ValueError: the file holds no config (saved from a model that
                [`gblr.convert`][] did not make, or by a gblr before configs), or one
                of another class, or of a structure not registered here, or a JSON file
                that is not a config's data.
            GBLRFileError: the model file is damaged or not a gblr file.
            FileNotFoundError: no such file.

        Examples:
            >>> import os, tempfile, torch, gblr
            >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
            >>> _ = gblr.convert(model, gblr.GBLRConfig(budget=0.5, min_features=1))
            >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
            >>> _ = gblr.save(gblr.freeze(model), path)
            >>> gblr.GBLRConfig.from_file(path) == model.gblr_config
            True
        """
        import json

        from ..deploy.io import load_tensors, tensor_file_kind
        from .formats import FORMAT, WEIGHTS_NAME

        where = Path(path)
        if where.is_dir():
            where = where / WEIGHTS_NAME
        if where.suffix == ".json":
            try:
                data = json.loads(where.read_text(encoding="utf-8"))
            except UnicodeDecodeError as error:
                raise ValueError(f"{str(where)!r} is not a JSON file ({error})") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"{str(where)!r} is not valid JSON ({error})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{str(where)!r} holds no config's data (a JSON object)")
            config, source = config_from_dict(data), where
        elif tensor_file_kind(where) == FORMAT:  # save_pretrained's weights
            _, metadata = load_tensors(where, kind=FORMAT)
            saved = metadata.get("conversion_config")
            if saved is None:
                raise ValueError(
                    f"{str(where)!r} holds no conversion config: it was saved from a "
                    "model that gblr.convert did not make"
                )
            config, source = config_from_dict(json.loads(saved)), where
        else:
            checkpoint = load_checkpoint(where)
            if checkpoint.config is None:
                raise ValueError(
                    f"{str(checkpoint.path)!r} holds no conversion config: it was saved from "
                    "a model that gblr.convert did not make (or by a gblr without configs)"
                )
            config, source = config_from_dict(checkpoint.config), checkpoint.path
        if cls is not ConversionConfig and type(config) is not cls:
            raise ValueError(
                f"{str(source)!r} holds a {type(config).__name__}, not a "
                f"{cls.__name__}; ConversionConfig.from_file reads any"
            )
        return config

    def to_file(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the config as JSON (`to_dict`'s data) to ``path``, which `from_file`
        reads back; an existing file is replaced only with ``overwrite=True``. Written
        to a temporary name and renamed.

        Returns:
            The path written.

        Examples:
            >>> import os, tempfile, gblr
            >>> config = gblr.LowRankConfig(budget=0.25, include="encoder.*")
            >>> path = config.to_file(os.path.join(tempfile.mkdtemp(), "conversion.json"))
            >>> gblr.ConversionConfig.from_file(path) == config
            True
        """
        import json

        from ..files import save_atomically

        where = Path(path)
        if where.suffix != ".json":
            raise ValueError(f"path must name a .json file, got {str(path)!r}")
        if where.exists() and not overwrite:
            raise FileExistsError(
                f"{str(where)!r} exists: pass overwrite=True to replace it, or another path"
            )
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        save_atomically(lambda handle: handle.write(text), where, text=True)
        return where


def _fixed_structure(cls: type[ConversionConfig]) -> str | None:
    """The structure a config class names (a subclass), or ``None`` (it is given)."""
    fixed = next(item for item in dataclasses.fields(cls) if item.name == "structure")
    return None if fixed.init else fixed.default


def _check_init_and_rank(config: GBLRConfig | FamilyConfig, inits: Sequence[str]) -> None:
    """The ``init`` and ``rank_per_component`` fields GBLR and the families share."""
    _check_choice("init", config.init, inits)
    rank = _check_int("rank_per_component", config.rank_per_component, 1, "a positive int")
    config._set("rank_per_component", rank)


@dataclass(frozen=True, kw_only=True)
class GBLRConfig(ConversionConfig):
    """Convert to GBLR layers ([`gblr.GBLRLinear`][], [`gblr.GBLRConv2d`][]): the
    shared options of [`ConversionConfig`][gblr.compress.configs.ConversionConfig] and

    Attributes:
        init: ``"svd"`` (default: truncated SVD on full intervals; seconds, and as good
            as the search after fine-tuning on the real-task benchmarks), ``"search"``
            ([`gblr.fit_dense`][]: structure searched from the weights, a lower weight
            error before fine-tuning, minutes on a transformer) or ``"random"`` (a fresh
            layer at the budget's cost, ``GBLRLinear(structure_init="blockdiag",
            factor_init="fixed_norm")``: GBLR's block-diagonal special case, as the
            recipes start, for training from scratch with a [`gblr.StructureLearner`][]
            at the same budget, whose default holds the blocks' one-line sides).
            With ``"svd"``, ``budget=1.0`` means no compression: each layer becomes its
            exact full-rank factorization (more MACs than dense until a structure
            learner prunes it).
        rank_per_component: ``r`` of every component, at most ``min(out, in)`` of every
            converted layer; also the unit (rank ``r``, ``r (out + in)`` MACs) in which
            the global allocation hands out MACs.
        search_steps: refinement steps of [`gblr.fit_dense`][] per layer, an int >= 0;
            only with ``init="search"`` (another value with another init is refused).

    Examples:
        >>> import dataclasses, torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 48))
        >>> config = gblr.GBLRConfig(budget=0.4, init="search", search_steps=5)
        >>> report = gblr.convert(model, dataclasses.replace(config, rank_per_component=2))
        >>> model[0].rank_per_component, report.layers[0].error <= report.layers[0].svd_error
        (2, True)
        >>> gblr.GBLRConfig(init="svd", search_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: search_steps=0 applies to init='search' only, got init='svd'
    """

    structure: str = field(default="gblr", init=False)
    init: Literal["svd", "search", "random"] = "svd"
    rank_per_component: int = 1
    search_steps: int = DEFAULT_SEARCH_STEPS

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_init_and_rank(self, INITS)
        steps = _check_int(
            "search_steps", self.search_steps, 0, "an int >= 0 (refinement steps of init='search')"
        )
        if self.init != "search" and steps != DEFAULT_SEARCH_STEPS:
            raise ValueError(
                f"search_steps={steps} applies to init='search' only, got init={self.init!r}"
            )
        self._set("search_steps", steps)

    def _calibration_refusal(self) -> str | None:
        if self.init == "svd":
            return None
        return (
            f"calibration fits the calibrated truncated SVD: it needs init='svd', got "
            f"init={self.init!r}"
        )


@dataclass(frozen=True, kw_only=True)
class FamilyConfig(ConversionConfig):
    """The options of a baseline family of [`gblr.structured`][] (each has a subclass
    naming it: [`LowRankConfig`][gblr.compress.configs.LowRankConfig],
    [`MonarchConfig`][gblr.compress.configs.MonarchConfig],
    [`BlockDiagConfig`][gblr.compress.configs.BlockDiagConfig],
    [`BlockSparseConfig`][gblr.compress.configs.BlockSparseConfig],
    [`PixelflyConfig`][gblr.compress.configs.PixelflyConfig]): the shared options of
    [`ConversionConfig`][gblr.compress.configs.ConversionConfig] and

    Attributes:
        init: ``"project"`` (default: the family's projection of the weights, its
            ``from_dense``) or ``"random"`` (a fresh layer at the budget, its
            ``for_budget``, seeded by ``seed``; for training from scratch).
        rank_per_component: the unit (rank ``r``, ``r (out + in)`` MACs) in which the
            global allocation hands out MACs from the layers' SVD error curves; at most
            ``min(out, in)`` of every converted layer. The family's own sizes follow
            from each layer's MACs.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
        >>> report = gblr.convert(model, gblr.MonarchConfig(budget=0.5, init="random"))
        >>> type(model[0]).__name__, report.ratio <= 0.5
        ('MonarchLinear', True)
    """

    init: Literal["project", "random"] = "project"
    rank_per_component: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_init_and_rank(self, FAMILY_INITS)

    def _calibration_refusal(self) -> str | None:
        if self.init == "project":
            return None
        return f"calibration fits the projection: it needs init='project', got init={self.init!r}"


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(FamilyConfig):
    """[`gblr.structured.LowRankLinear`][] layers (``U V``, the rank the budget pays
    for; its projection is the truncated SVD, and it can be fitted to calibration inputs).
    Options: those of [`FamilyConfig`][gblr.compress.configs.FamilyConfig].

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> _ = gblr.convert(model, gblr.LowRankConfig(budget=0.5, min_features=1))
        >>> model[0].rank  # 0.5 * 64 * 64 MACs at 64 + 64 per rank
        16
    """

    structure: str = field(default="lowrank", init=False)


@dataclass(frozen=True, kw_only=True)
class MonarchConfig(FamilyConfig):
    """[`gblr.structured.MonarchLinear`][] layers (two block-diagonal factors with
    permutations; the largest configuration within each layer's MACs). Options: those of
    [`FamilyConfig`][gblr.compress.configs.FamilyConfig].

    Examples:
        >>> import gblr
        >>> gblr.MonarchConfig(budget=0.25).to_dict()["structure"]
        'monarch'
    """

    structure: str = field(default="monarch", init=False)


@dataclass(frozen=True, kw_only=True)
class BlockDiagConfig(FamilyConfig):
    """[`gblr.structured.BlockDiagLinear`][] layers (the fewest diagonal blocks within
    each layer's MACs). Options: those of [`FamilyConfig`][gblr.compress.configs.FamilyConfig].

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> _ = gblr.convert(model, gblr.BlockDiagConfig(budget=0.25, min_features=1))
        >>> model[0].num_blocks
        4
    """

    structure: str = field(default="blockdiag", init=False)


@dataclass(frozen=True, kw_only=True)
class BlockSparseConfig(FamilyConfig):
    """[`gblr.structured.BlockSparseLinear`][] layers (the tiles of largest norm, as
    many as each layer's MACs pay for; random positions with ``init="random"``). Options:
    those of [`FamilyConfig`][gblr.compress.configs.FamilyConfig].

    Examples:
        >>> import gblr
        >>> gblr.BlockSparseConfig(init="random", seed=1).init
        'random'
    """

    structure: str = field(default="blocksparse", init=False)


@dataclass(frozen=True, kw_only=True)
class PixelflyConfig(FamilyConfig):
    """[`gblr.structured.PixelflyLinear`][] layers (butterfly block-sparse pattern plus
    low-rank, at the configuration each layer's MACs pay for). Options: those of
    [`FamilyConfig`][gblr.compress.configs.FamilyConfig].

    Examples:
        >>> import gblr
        >>> gblr.PixelflyConfig(budget=0.5, allocation="uniform").allocation
        'uniform'
    """

    structure: str = field(default="pixelfly", init=False)


# The config class of every baseline family of gblr.structured.FAMILIES, by name.
FAMILY_CONFIGS: dict[str, type[FamilyConfig]] = {
    "lowrank": LowRankConfig,
    "blockdiag": BlockDiagConfig,
    "monarch": MonarchConfig,
    "blocksparse": BlockSparseConfig,
    "pixelfly": PixelflyConfig,
}


def _config_text(config: ConversionConfig) -> str:
    """``GBLRConfig(budget=0.5, init='search')``: the class, the budget and the fields
    that differ from their defaults (the structure too where it is given)."""
    shown = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.init and (item.name == "budget" or value != item.default):
            shown.append(f"{item.name}={value!r}")
    return f"{type(config).__name__}({', '.join(shown)})"


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Structure:
    fit: Callable[..., nn.Module]
    supports_conv2d: bool
    supports_calibration: bool = False
    config: type[ConversionConfig] = ConversionConfig


_STRUCTURES: dict[str, _Structure] = {}


def register_structure(
    name: str,
    fit: Callable[..., nn.Module],
    *,
    config: type[ConversionConfig] = ConversionConfig,
    supports_conv2d: bool = False,
    supports_calibration: bool = False,
) -> None:
    """Make ``name`` a structure of [`gblr.convert`][] (and of the recipes' configs,
    ``--structure`` and ``gblr sweep``).

    Args:
        name: the structure's name.
        fit: ``fit(weight (out, in), macs, config)`` → a bias-free module mapping
            ``(..., in) -> (..., out)`` whose ``flops()`` is at most ``macs`` and whose
            ``dense_weight()`` gives its matrix in eval mode; ``config`` is the
            conversion's config (an instance of ``config``).
        config: the structure's config class:
            [`ConversionConfig`][gblr.compress.configs.ConversionConfig] (the default: the shared
            options only; the user gives ``structure=name``), or a subclass naming this structure,
            ``structure: str = field(default=name, init=False)``, with the structure's own options
            as further fields (checked in ``__post_init__``).
        supports_conv2d: whether the returned module is a GBLR matrix layer whose factors
            and intervals can be moved into a [`gblr.GBLRConv2d`][].
        supports_calibration: whether ``fit`` also takes ``whitening=S`` (``(in, in)``,
            `gblr.ops.whitened.whitening`) and then minimizes the output
            error ``||(W - Ŵ) S||`` instead of the weight error.

    ``fit`` raises [`gblr.structured.BudgetTooSmallError`][] when the structure cannot
    be built within ``macs`` at that shape: [`gblr.convert`][] then leaves that layer
    dense (listed in ``report.skipped``). Any other exception stops the conversion with
    the model unchanged.

    Examples:
        >>> import torch, gblr
        >>> from gblr.compress import ConversionConfig, register_structure
        >>> def fit(weight, macs, config):  # a low-rank fit of a user's own
        ...     return gblr.structured.LowRankLinear.from_dense(weight, budget_macs=macs)
        >>> register_structure("mine", fit)
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
        >>> report = gblr.convert(model, ConversionConfig(structure="mine", min_features=1))
        >>> type(model[0]).__name__
        'LowRankLinear'
        >>> from gblr.compress import configs
        >>> del configs._STRUCTURES["mine"]  # (a doctest cleans up after itself)
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
    if not (isinstance(config, type) and issubclass(config, ConversionConfig)):
        raise TypeError(
            f"config must be gblr.compress.ConversionConfig or a subclass of it, got {config!r}"
        )
    named = _fixed_structure(config)
    if config is not ConversionConfig and named != name:
        raise ValueError(
            f"config {config.__name__} names structure {named!r}, not {name!r}: give it "
            f"the field structure: str = field(default={name!r}, init=False)"
        )
    _check_fit_signature(fit, supports_calibration)
    _STRUCTURES[name] = _Structure(fit, supports_conv2d, supports_calibration, config)


def _check_fit_signature(fit: Callable[..., nn.Module], supports_calibration: bool) -> None:
    try:
        signature = inspect.signature(fit)
    except (TypeError, ValueError):  # no signature to read (a builtin): trusted
        return
    options = {"whitening": None} if supports_calibration else {}
    try:
        signature.bind(None, None, None, **options)
    except TypeError:
        call = "fit(weight, macs, config" + (", whitening=S)" if options else ")")
        raise TypeError(
            f"fit must be callable as {call}, got a fit with signature {signature}; the "
            "options (init, rank_per_component, ...) are fields of the structure's config "
            "class (register_structure(..., config=...))"
        ) from None


def _registered() -> dict[str, _Structure]:
    """The registry (read through this function, so that it can be swapped whole)."""
    return _STRUCTURES


def structures() -> list[str]:
    """Names of the registered structures: ``"gblr"``, the baseline families and any
    added with [`register_structure`][gblr.compress.configs.register_structure] (``"dense"``,
    convert nothing, is not one).

    Examples:
        >>> from gblr.compress import structures
        >>> structures()
        ['blockdiag', 'blocksparse', 'gblr', 'lowrank', 'monarch', 'pixelfly']
    """
    return sorted(_STRUCTURES)


def config_class(structure: str) -> type[ConversionConfig]:
    """The config class of ``structure``: ``"dense"`` or a name from
    [`structures`][gblr.compress.configs.structures].

    Examples:
        >>> from gblr.compress import config_class
        >>> config_class("gblr").__name__, config_class("dense").__name__
        ('GBLRConfig', 'ConversionConfig')
    """
    _check_choice("structure", structure, ["dense", *structures()])
    spec = _STRUCTURES.get(structure)
    return ConversionConfig if spec is None else spec.config


def config_from_dict(data: Mapping[str, Any]) -> ConversionConfig:
    """The config of any structure from its plain data
    ([`ConversionConfig.to_dict`][gblr.compress.configs.ConversionConfig.to_dict]), dispatched on
    ``data["structure"]`` through the registry.

    Raises:
        TypeError: ``data`` is not a mapping, or a value of the wrong type.
        ValueError: no ``"structure"``, an unknown structure, a key the structure's
            config does not have (the allowed ones are listed) or a value out of range.

    Examples:
        >>> import gblr
        >>> from gblr.compress import config_from_dict
        >>> config = config_from_dict({"structure": "monarch", "budget": 0.25})
        >>> type(config).__name__, config.budget, config.init
        ('MonarchConfig', 0.25, 'project')
        >>> config = gblr.GBLRConfig(budget=0.4, exclude=["head"])
        >>> config_from_dict(config.to_dict()) == config
        True
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping (a dict), got {type(data).__name__}")
    if "structure" not in data:
        raise ValueError(
            f"data must name its structure under 'structure' (one of "
            f"{['dense', *structures()]}), got the keys {sorted(data)}"
        )
    return config_class(data["structure"]).from_dict(data)
