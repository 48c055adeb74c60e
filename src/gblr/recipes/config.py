"""Training configurations: YAML files shipped with the package, checked key by key.

A config has six sections (``model``, ``structure``, ``data``, ``optim``, ``learner``,
``trainer``) plus ``out``, ``seed``, ``name``, ``smoke`` and ``extends``; the dataclasses
below list every key, its type and its default. A config may start from another one
(``extends: NAME``) and change only some keys. Any key can be overridden from the command
line as ``section.key=value`` (the value is read as YAML: ``optim.lr=1e-3``,
``trainer.devices=[0,1]``). An unknown key, a value of the wrong type or an unknown
choice is a ``ValueError`` naming the key and what is allowed.

Durations (``optim.warmup``, ``learner.sigma_start``, ``learner.budget_ramp``) are in
the unit of the run's length: epochs when ``optim.epochs`` is set, optimizer steps when
``optim.steps`` is.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when called: configs load without torch
    from ..learn.config import LearnerConfig as StructureLearnerConfig

__all__ = [
    "CONFIG_DIR",
    "DataConfig",
    "LearnerConfig",
    "ModelConfig",
    "OptimConfig",
    "StructureConfig",
    "TrainConfig",
    "TrainerConfig",
    "config_from_dict",
    "config_to_dict",
    "flatten_config",
    "learner_config",
    "load_config",
    "one_process",
    "resume_changes",
    "shipped_configs",
    "with_structure",
]

CONFIG_DIR = Path(__file__).parent / "configs"

MODELS = ("vit", "mixer", "timm", "torchvision", "hf-causal-lm")
DATASETS = ("digits", "cifar10", "cifar100", "folder", "imagenet", "wikitext103", "text")
TEXT_DATASETS = ("wikitext103", "text")
STRUCTURE_INITS = ("random", "search")
# How GBLR layers trained from scratch may start: gblr.layers.base.COSTED_STRUCTURE_INITS
# (a test keeps the two equal), kept here because configs load without torch.
GBLR_STARTS = ("half", "blocks", "blockdiag")
# structure.start may also ask a probe to choose between blockdiag and the learned blocks
# start (gblr.recipes.start_probe); the run saves the start it chose in its config.yaml.
PROBE_START = "probe"
# How their factors may be drawn: gblr.layers.base.FACTOR_INITS (the same test).
FACTOR_INITS = ("balanced", "uniform", "fixed_norm")
ALLOCATIONS = ("uniform", "global")
AUGMENTATIONS = ("none", "standard", "autoaugment")
LOGGERS = ("csv", "tensorboard", "both", "none")
# torch.compile modes (kept here, not imported from the engine: configs load without torch)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SIGMA_SCHEDULES = ("geometric", "linear", "constant")
# Lightning's precision settings (its Trainer refuses others)
PRECISIONS = (
    *("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"),
    *("transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16"),
)
# What may differ between a run and the checkpoint it resumes from: where it runs and
# logs, not what it computes (the optimizer, schedule, model and data come back from the
# checkpoint, so a change there would be recorded but not take effect).
RESUME_MAY_CHANGE = (
    *("out", "name", "data.root", "data.val_root", "data.download", "data.num_workers"),
    *("trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy"),
    *("trainer.logger", "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps"),
    "trainer.compile",
)


@dataclass
class ModelConfig:
    """The network. ``vit``: [`VisionTransformer`][gblr.recipes.models.VisionTransformer];
    ``mixer``: [`MlpMixer`][gblr.recipes.models.MlpMixer] (``heads``/``mlp_ratio`` are the
    ViT's, ``token_mlp_ratio``/``channel_mlp_ratio`` the Mixer's). Input channels and
    classes come from the data. Models of other libraries name their ``source``:
    ``timm`` (``timm.create_model(source, pretrained, num_classes, **kwargs)``),
    ``torchvision`` (``torchvision.models.<source>``, ImageNet weights when
    ``pretrained``), ``hf-causal-lm`` (a Hugging Face causal LM: a hub name or local
    folder loaded with ``from_pretrained`` when ``pretrained``, else a model type such
    as ``gpt2`` built from ``AutoConfig.for_model(source, **kwargs)``, randomly
    initialised). ``kwargs`` go to the constructor.

    Examples:
        >>> from gblr.recipes.config import ModelConfig
        >>> model = ModelConfig(name="mixer", dim=32, depth=2)
        >>> model.patch_size, model.channel_mlp_ratio
        (2, 4.0)
    """

    name: str = "vit"
    source: str | None = None
    pretrained: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 8
    patch_size: int = 2
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    token_mlp_ratio: float = 0.5
    channel_mlp_ratio: float = 4.0
    drop_path: float = 0.0


@dataclass
class StructureConfig:
    """Which layers become structured and how. ``kind``: ``dense``, ``gblr`` or a
    baseline family (``gblr.structured.FAMILIES``), or a structure added with
    [`gblr.compress.register_structure`][]. ``budget``: MACs of the ``include``
    layers (glob patterns over module names, minus ``exclude``) as a fraction of dense;
    for GBLR the learner's target, reached from ``start_cost`` (GBLR only; default: with
    ``init: random``, [`gblr.recipes.models.gblr_start_cost`][] of the budget, with
    ``init: search`` the budget itself, the cost the layers are fitted at) over
    ``learner.budget_ramp``. ``init``: ``random`` (training from scratch) or ``search``
    (fit each layer to its pretrained weights, [`gblr.convert`][], with ``allocation``
    ``global`` or ``uniform`` and, for GBLR, ``search_steps`` of refinement).
    ``rank_per_component``: GBLR's rank per component, and the unit in which a family's
    global allocation hands out MACs. ``start`` (GBLR with ``init: random`` only): how the
    layers start: ``probe``, a probe on a held-out tenth of the training set chooses
    between ``blockdiag`` and the learned ``blocks`` start
    ([`gblr.recipes.start_probe`][]; image classifiers on one process; the run saves the
    start it chose in its ``config.yaml``), or a ``structure_init`` of
    [`gblr.GBLRLinear`][] that places a cost: ``blockdiag``, GBLR's block-diagonal
    special case, ``blocks``, which adds full-width components, ``half``, the paper's
    start. Unset (the default), an image classifier's run probes
    ([`gblr.recipes.train.probe_chooses_start`][]: on one process, where the run is long
    enough) and every other run starts ``blockdiag``: the choice that trained best on the
    real-task benchmarks, docs/RESULTS.md, "Choosing the start". ``factor_init`` (GBLR
    with ``init: random`` only): how the factors are drawn, a ``factor_init`` of
    [`gblr.GBLRLinear`][] (default ``fixed_norm``; ``balanced`` was the default before
    2026-12-06). A key set where it cannot apply is refused.

    Examples:
        >>> from gblr.recipes.config import StructureConfig
        >>> structure = StructureConfig(budget=0.2, include=["blocks.*.mlp.*"])
        >>> structure.kind, structure.budget, structure.init
        ('gblr', 0.2, 'random')
    """

    kind: str = "gblr"
    budget: float = 0.3
    start_cost: float | None = None
    include: str | list[str] = "blocks.*"
    exclude: str | list[str] | None = None
    init: str = "random"
    allocation: str | None = None
    search_steps: int | None = None
    rank_per_component: int = 1
    start: str | None = None
    factor_init: str | None = None


@dataclass
class DataConfig:
    """``digits`` is embedded (scikit-learn); ``cifar10``/``cifar100`` read the python
    pickles under ``root`` (``download: true``: torchvision fetches them when missing);
    ``verify``: check the CIFAR files against the official release's MD5 before reading
    them (false for your own files in CIFAR's format; they are read safely either way).
    ``folder`` reads ``root`` (train) and ``val_root``
    (ImageNet-style class folders); ``imagenet`` reads ``root/train`` and ``root/val``.
    ``augment`` (CIFAR only; image folders crop and flip by themselves): ``standard`` =
    random crop with 4-pixel padding and horizontal flip; ``autoaugment`` adds
    torchvision's AutoAugment (CIFAR-10 policy). ``mixup``/``cutmix``: Beta-distribution α
    of each (0 = off; with both, each batch uses one of the two at random), applied on the
    batch (images only). ``mean``/``std`` (image folders only; digits and CIFAR bring their
    own): image normalization (default: the model's pretrained statistics for timm models,
    else ImageNet's). A key the dataset would ignore is refused.

    Text: ``wikitext103`` reads the raw WikiText-103 files in ``root`` (or, without
    ``root``, the ``datasets`` hub copy); ``text`` reads ``root/{train,valid,test}.txt``.
    ``tokenizer``: a Hugging Face tokenizer name or folder, or ``bytes``; ``seq_len``:
    training block and evaluation window; ``eval_stride``: the sliding window's step
    for perplexity (default ``seq_len``).

    Examples:
        >>> from gblr.recipes.config import DataConfig
        >>> DataConfig().name, DataConfig(name="text", root="corpus", tokenizer="bytes").seq_len
        ('digits', 1024)
    """

    name: str = "digits"
    root: str | None = None
    download: bool = False
    verify: bool = True
    val_root: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    tokenizer: str = "gpt2"
    seq_len: int = 1024
    eval_stride: int | None = None
    augment: str = "none"
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    num_workers: int = 0


@dataclass
class OptimConfig:
    """AdamW over [`gblr.param_groups`][]; linear warm-up from ``lr`` × 0 to ``lr``,
    cosine decay to ``min_lr``. ``batch_size`` is the global batch (split over all
    devices). Give exactly one of ``epochs`` and ``steps``. ``structure_lr`` (GBLR widths
    and locations) defaults to the engine's default, ``lr`` itself
    (`gblr.recipes.engine.STRUCTURE_LR_FACTOR`).

    Examples:
        >>> from gblr.recipes.config import OptimConfig
        >>> optim = OptimConfig(lr=3e-3, steps=200, warmup=20)
        >>> optim.batch_size, optim.epochs
        (64, None)
    """

    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    structure_lr: float | None = None
    batch_size: int = 64
    epochs: float | None = None
    steps: int | None = None
    warmup: float = 0.0
    grad_clip: float | None = None


@dataclass
class LearnerConfig:
    """The structure learner (GBLR only): σ annealed from ``sigma[0]`` to ``sigma[1]``
    from ``sigma_start`` to the end (default ``null``: σ left as the layers have it, ∞ =
    exact boxcars, for layers made from scratch or fitted by a structure search; the
    paper's method is ``[1.0, 100.0]``); the MACs target ramped from the starting
    cost to ``structure.budget`` over ``budget_ramp`` (default: ``optim.warmup``).
    ``adaptive``, ``max_shift``, ``max_shift_ramp``, ``merge``, ``untangle``, ``refine``:
    the learner's optional passes against structure collapses, blocks split over two
    components, pairs holding two blocks as a mixture and intervals a cell or two off
    (off by default: the paper's method; built for planted structures, they did not help
    on real tasks, see docs/faq.md); ``merge_every``: steps between their passes.
    ``exact_from``: the fraction of the run from which the masks are exact and the
    structure is fixed (default 0.95; ``null``: the paper's method, σ annealed and the
    structure learned to the last step; see [`gblr.LearnerConfig`][]). ``revive``:
    whether components the budget cut removed may come back (default false: they stay
    off and are not computed; true: the paper's method). ``cut_exponent``: each width's
    budget cut is scaled by ``width ** cut_exponent`` (default 0.5: narrow intervals are
    cut less; 0: the paper's uniform cut). ``fill_budget``: whether the live widths grow
    back to the budget when the loss closes components after the warm-up (default true;
    false: the budget is an upper bound only, the paper's method). ``hold_narrow_sides``:
    sides at most that many lines wide at the start keep their width and their
    components' locations (default 1: every block of the default block-diagonal start
    stays dense; 0: off, the paper's method).
    [`learner_config`][gblr.recipes.config.learner_config] turns the section into a
    [`gblr.LearnerConfig`][].

    Examples:
        >>> from gblr.recipes.config import LearnerConfig
        >>> LearnerConfig().sigma, LearnerConfig(sigma=[1.0, 100.0]).sigma_schedule
        (None, 'geometric')
    """

    sigma: list[float] | None = None
    sigma_schedule: str = "geometric"
    sigma_start: float = 0.0
    budget_ramp: float | None = None
    adaptive: float = 0.0
    max_shift: float | None = None
    max_shift_ramp: float | None = None
    merge: float | None = None
    untangle: float | None = None
    refine: float | None = None
    merge_every: int = 10
    exact_from: float | None = 0.95
    revive: bool = False
    cut_exponent: float = 0.5
    fill_budget: bool = True
    hold_narrow_sides: int = 1


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` options (``devices``, ``num_nodes``, ``strategy``:
    ``auto``, ``ddp``, ``fsdp``, ...; ``precision``: ``32-true``, ``16-mixed``,
    ``bf16-mixed``, ...) and logging (``logger``: csv, tensorboard, both or none).
    ``val_every``: test-set evaluation interval in run units (epochs or steps; default:
    every epoch of an epoch-based run, only at the end of a step-based one).
    ``compile``: ``torch.compile`` mode for the model (``default``, ``reduce-overhead``:
    CUDA graphs, ``max-autotune``, ``max-autotune-no-cudagraphs``), or null for eager.

    Examples:
        >>> from gblr.recipes.config import TrainerConfig
        >>> trainer = TrainerConfig(devices=[0, 1], strategy="ddp", precision="bf16-mixed")
        >>> trainer.logger, trainer.num_nodes
        ('csv', 1)
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    logger: str = "csv"
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int = 500
    val_every: float | None = None
    compile: str | None = None


@dataclass
class TrainConfig:
    """A whole training run; ``out`` is its folder. ``smoke`` marks a smoke run (set by
    ``--smoke``, see [`gblr.recipes.smoke.smoke_config`][]): a few steps of a tiny
    stand-in that checks the setup; its numbers are not results.

    Examples:
        >>> from gblr.recipes.config import OptimConfig, TrainConfig
        >>> config = TrainConfig(optim=OptimConfig(steps=2), out="runs/demo")
        >>> config.model.name, config.data.name, config.structure.budget
        ('vit', 'digits', 0.3)
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out: str = "runs/gblr"
    seed: int = 0
    name: str = ""
    smoke: bool = False


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (``gblr train --config NAME``).

    Examples:
        >>> from gblr.recipes.config import shipped_configs
        >>> "digits-vit-gblr" in shipped_configs(), "cifar10-vit-s-gblr" in shipped_configs()
        (True, True)
    """
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("configs need PyYAML: pip install 'gblr[train]'") from error
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _locate(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    # `--config cfg/mine` finds cfg/mine.yaml, as `extends: mine` does beside it
    if path.suffix != ".yaml" and path.with_name(path.name + ".yaml").is_file():
        return path.with_name(path.name + ".yaml")
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    shipped = CONFIG_DIR / f"{name}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    close = difflib.get_close_matches(name, shipped_configs(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise FileNotFoundError(
        f"config {str(source)!r} is neither a file nor a shipped config{hint}; "
        f"shipped configs: {', '.join(shipped_configs())}"
    )


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_with_parents(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ValueError(f"config 'extends' loops: {chain}")
    data = _read_yaml(path)
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    # (an empty `extends:` is None: it ran on the library's defaults, in silence)
    if not isinstance(parent, str) or not parent.strip():
        raise ValueError(f"{path}: 'extends' must name a config, got {parent!r}")
    sibling = path.parent / (parent if parent.endswith(".yaml") else f"{parent}.yaml")
    try:
        parent_path = sibling if sibling.is_file() else _locate(parent)
    except FileNotFoundError as error:  # which file asked for it
        raise FileNotFoundError(f"{path} extends {parent!r}: {error}") from None
    inherited = _read_with_parents(parent_path, (*seen, path.resolve()))
    # a config's name and run folder are its own: inherited, a run of the child would
    # go into (and be refused by, or resume) the parent's run folder under its name
    for key in ("name", "out"):
        inherited.pop(key, None)
    return _merge(inherited, data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} must look like section.key=value (optim.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (a builtin, ``X | None``, a union, ``list[X]``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError:
                continue  # the message below names the whole union
        raise ValueError(f"{key} must be {_type_name(hint)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (hint is bool and isinstance(value, bool)) or (hint is str and isinstance(value, str)):
        return value
    if hint is int and is_number and isinstance(value, int):
        return value
    if hint is int and is_number and math.isfinite(value) and float(value).is_integer():
        return int(value)  # a count written as a float: 10.0, or 1.0e+4 in YAML
    if hint is float and is_number:
        if math.isnan(value):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, str):
        # PyYAML reads 5e-4 (no dot) as a string; accept any number spelled as text
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if not math.isnan(number):
                return number
    raise ValueError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _unknown_key(key: str, allowed: Sequence[str]) -> ValueError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise _unknown_key(full, list(fields))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, full)
        else:
            values[key] = _coerce(value, hint, full)
    return cls(**values)


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(key: str, value: float | int | None, *, zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero) or math.isinf(value)):
        raise ValueError(f"{key} must be finite and {'>= 0' if zero else '> 0'}, got {value!r}")


def _check_own_model(model: ModelConfig) -> None:
    """The shapes the library's own ViT and Mixer need, named by their keys (they were
    refused only when the model was built, as "dim=64 must be a multiple of heads=3", or
    crashed inside torch for a hidden width of 0)."""
    if model.name not in ("vit", "mixer"):
        return
    if model.image_size % model.patch_size:
        raise ValueError(
            f"model.image_size={model.image_size} must be a multiple of "
            f"model.patch_size={model.patch_size}"
        )
    if model.name == "vit" and model.dim % model.heads:
        raise ValueError(f"model.dim={model.dim} must be a multiple of model.heads={model.heads}")
    ratios = ("mlp_ratio",) if model.name == "vit" else ("token_mlp_ratio", "channel_mlp_ratio")
    for key in ratios:  # hidden widths ratio * dim, timm's convention for both models
        ratio = getattr(model, key)
        _positive(f"model.{key}", ratio)
        if int(model.dim * ratio) < 1:
            raise ValueError(
                f"model.{key}={ratio!r} gives hidden layers of int({model.dim} * {ratio!r}) = "
                f"{int(model.dim * ratio)} units at model.dim={model.dim}; they need at least 1"
            )


def _check_devices(devices: int | str | list[int]) -> None:
    """Lightning's forms: a count (-1: all), ``auto``, a list of indices, or "0,1"."""
    allowed = "a count >= 1, -1 (all), 'auto', a list of device indices or '0,1'"
    if isinstance(devices, int):
        ok = devices == -1 or devices >= 1
    elif isinstance(devices, list):
        ok = bool(devices) and all(d >= 0 for d in devices) and len(set(devices)) == len(devices)
    else:
        text = devices.strip()
        parts = [part.strip() for part in text.split(",") if part.strip()]
        ok = text == "auto" or (bool(parts) and all(part.isdigit() for part in parts))
        ok = ok or text == "-1"
    if not ok:
        raise ValueError(f"trainer.devices must be {allowed}; got {devices!r}")


def _validate(config: TrainConfig) -> None:
    # convert's registry: the families and any structure added with register_structure
    from ..compress import structures

    _choice("model.name", config.model.name, MODELS)
    if config.model.name in ("timm", "torchvision", "hf-causal-lm") and not config.model.source:
        raise ValueError(f"model.source must name the {config.model.name} model to build")
    text_model = config.model.name == "hf-causal-lm"
    if text_model != (config.data.name in TEXT_DATASETS):
        raise ValueError(
            f"model.name={config.model.name!r} does not go with data.name="
            f"{config.data.name!r}: language models take {', '.join(TEXT_DATASETS)}, "
            "image models the image datasets"
        )
    for key in ("image_size", "patch_size", "dim", "depth", "heads"):
        _positive(f"model.{key}", getattr(config.model, key))
    _check_own_model(config.model)
    if not 0.0 <= config.model.drop_path < 1.0:
        raise ValueError(f"model.drop_path must be in [0, 1), got {config.model.drop_path!r}")
    _choice("structure.kind", config.structure.kind, ["dense", *structures()])
    for key in ("budget", "start_cost"):
        value = getattr(config.structure, key)
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"structure.{key} must be in (0, 1], got {value!r}")
    _choice("structure.init", config.structure.init, STRUCTURE_INITS)
    if config.structure.start is not None:
        _choice("structure.start", config.structure.start, (*GBLR_STARTS, PROBE_START))
    if config.structure.start == PROBE_START and config.structure.kind == "gblr":
        _check_probe_applies(config)
    if config.structure.factor_init is not None:
        _choice("structure.factor_init", config.structure.factor_init, FACTOR_INITS)
    if config.structure.allocation is not None:
        _choice("structure.allocation", config.structure.allocation, ALLOCATIONS)
    _positive("structure.search_steps", config.structure.search_steps, zero=True)
    _positive("structure.rank_per_component", config.structure.rank_per_component)
    _choice("data.name", config.data.name, DATASETS)
    _choice("data.augment", config.data.augment, AUGMENTATIONS)
    if config.data.name in ("cifar10", "cifar100", "folder", "imagenet", "text") and not (
        config.data.root
    ):
        raise ValueError(f"data.root must name the folder holding the {config.data.name} data")
    if config.data.name == "folder" and not config.data.val_root:
        # (it was found missing only when the datasets were built, after the run began)
        raise ValueError(
            "data.val_root must name the validation image folder: data.name=folder trains "
            "on data.root and evaluates on data.val_root, each root/<class>/<image>"
        )
    for key in ("mixup", "cutmix", "label_smoothing", "num_workers"):
        _positive(f"data.{key}", getattr(config.data, key), zero=True)
    _positive("data.seq_len", config.data.seq_len)
    stride = config.data.eval_stride
    if stride is not None and not 1 <= stride <= config.data.seq_len:
        raise ValueError(
            f"data.eval_stride must be in [1, data.seq_len={config.data.seq_len}], got {stride}"
        )
    for key in ("mean", "std"):
        value = getattr(config.data, key)
        if value is not None and len(value) not in (1, 3):
            raise ValueError(f"data.{key} must list 1 or 3 channel values, got {value!r}")
    _check_data_keys_apply(config.data)
    optim = config.optim
    if (optim.epochs is None) == (optim.steps is None):
        raise ValueError(
            "give exactly one of optim.epochs and optim.steps, got "
            f"epochs={optim.epochs!r}, steps={optim.steps!r}"
        )
    for key in ("lr", "batch_size", "epochs", "steps", "structure_lr", "grad_clip"):
        _positive(f"optim.{key}", getattr(optim, key))
    for key in ("min_lr", "weight_decay", "warmup"):
        _positive(f"optim.{key}", getattr(optim, key), zero=True)
    sigma = config.learner.sigma
    if sigma is not None and (len(sigma) != 2 or min(sigma) <= 0):
        raise ValueError(
            f"learner.sigma must be [start, end] with both > 0, got {config.learner.sigma!r}"
        )
    _choice("learner.sigma_schedule", config.learner.sigma_schedule, SIGMA_SCHEDULES)
    _positive("learner.sigma_start", config.learner.sigma_start, zero=True)
    _positive("learner.budget_ramp", config.learner.budget_ramp, zero=True)
    _positive("learner.adaptive", config.learner.adaptive, zero=True)
    _positive("learner.max_shift", config.learner.max_shift)
    _positive("learner.max_shift_ramp", config.learner.max_shift_ramp)
    _positive("learner.merge_every", config.learner.merge_every)
    _positive("learner.hold_narrow_sides", config.learner.hold_narrow_sides, zero=True)
    exact_from = config.learner.exact_from
    if exact_from is not None and (
        isinstance(exact_from, bool)
        or not isinstance(exact_from, (int, float))
        or not 0 < exact_from <= 1
    ):
        raise ValueError(
            f"learner.exact_from must be a fraction of the run in (0, 1] or null, got "
            f"{exact_from!r}"
        )
    for key in ("merge", "untangle", "refine"):
        tolerance = getattr(config.learner, key)
        if tolerance is not None and not (
            isinstance(tolerance, (int, float))
            and not isinstance(tolerance, bool)
            and 0 <= tolerance < 1
        ):
            raise ValueError(
                f"learner.{key} must be a tolerance in [0, 1) or null, got {tolerance!r}"
            )
    _choice("trainer.logger", config.trainer.logger, LOGGERS)
    _choice("trainer.precision", config.trainer.precision, PRECISIONS)
    _check_devices(config.trainer.devices)
    if config.trainer.compile is not None:
        _choice("trainer.compile", config.trainer.compile, COMPILE_MODES)
    _positive("trainer.num_nodes", config.trainer.num_nodes)
    _positive("trainer.log_every_n_steps", config.trainer.log_every_n_steps)
    _positive("trainer.checkpoint_every_n_steps", config.trainer.checkpoint_every_n_steps)
    _positive("trainer.val_every", config.trainer.val_every)
    _check_structure_keys_apply(config.structure)


def _check_data_keys_apply(data: DataConfig) -> None:
    """Refuse a ``data`` key that the dataset would accept and ignore: normalization
    statistics where the dataset brings its own, an augmentation where none is built,
    image batch mixing or label smoothing for a language model."""
    name = data.name
    if (data.mean is None) != (data.std is None):
        given, missing = ("mean", "std") if data.std is None else ("std", "mean")
        raise ValueError(f"data.{given} is given without data.{missing}: give both or neither")
    if data.mean is not None and name not in ("folder", "imagenet"):
        raise ValueError(
            f"data.mean and data.std apply to image folders (data.name folder or imagenet); "
            f"{name} is normalized by its own statistics: remove them"
        )
    if data.augment != "none" and name not in ("cifar10", "cifar100"):
        raise ValueError(
            f"data.augment={data.augment!r} applies to CIFAR (cifar10, cifar100); {name} "
            "takes none (image folders crop and flip their training images themselves): "
            "remove it or set data.augment=none"
        )
    if name in TEXT_DATASETS:
        for key in ("mixup", "cutmix", "label_smoothing"):
            if getattr(data, key):
                raise ValueError(
                    f"data.{key}={getattr(data, key)!r} applies to image classifiers; a "
                    f"language model's data ({name}) takes none: remove it"
                )


def _rank_per_component_unused(s: StructureConfig) -> str | None:
    """Why a baseline family has no use for ``rank_per_component`` here, or None where it
    is the unit in which the global allocation of a search hands out MACs."""
    if s.init == "random":
        return "init: random"
    if s.allocation == "uniform":
        return "allocation: uniform"
    if s.budget >= 1.0:
        return f"budget: {s.budget} (every layer at its full cost)"
    return None


def _check_probe_applies(config: TrainConfig) -> None:
    """Refuse ``structure.start: probe`` where the probe cannot run: a language model, or
    several processes (the probes train one after another on one)."""
    if config.data.name in TEXT_DATASETS:
        raise ValueError(
            "structure.start=probe is for image classifiers; a language model's run takes "
            f"structure.start in {GBLR_STARTS}"
        )
    devices, nodes = config.trainer.devices, config.trainer.num_nodes
    if not one_process(devices, nodes):
        raise ValueError(
            f"structure.start=probe trains its probes on one process, got trainer.devices="
            f"{devices!r} and trainer.num_nodes={nodes}: name a start (structure.start in "
            f"{GBLR_STARTS}) to train on several"
        )


def one_process(devices: int | str | list[int], num_nodes: int) -> bool:
    """Whether Lightning's ``devices`` and ``num_nodes`` make a run of one process.

    Examples:
        >>> from gblr.recipes.config import one_process
        >>> one_process(1, 1), one_process([3], 1), one_process(2, 1), one_process(1, 2)
        (True, True, False, False)
    """
    single = devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1)
    return single and num_nodes == 1


def _check_structure_keys_apply(structure: StructureConfig) -> None:
    """Refuse a ``structure`` key set to a value that its kind and init would not use.

    Not checked: ``kind: dense`` (nothing is structured) and ``start_cost`` or ``start``
    with a baseline family (documented as GBLR's starting cost; a GBLR recipe sets it, and
    ``structure.kind=lowrank`` on that recipe should not need a second override).
    ``--structure`` and ``gblr sweep`` go through
    [`with_structure`][gblr.recipes.config.with_structure], which resets every GBLR-only key. Values
    that say what happens anyway are accepted: ``allocation: uniform`` with ``init: random``,
    ``search_steps: 0`` for a family's search.
    """
    s = structure
    if s.kind == "dense":
        return
    from_scratch = {"start": "start", "factor_init": "draw their factors"}
    for key, what in from_scratch.items():
        value = getattr(s, key)
        if value is not None and s.kind == "gblr" and s.init != "random":
            raise ValueError(
                f"structure.{key}={value!r} applies only to init: random (how GBLR layers "
                f"trained from scratch {what}), not to init: search, which fits the layers "
                f"to the weights: remove the key or set structure.{key}=null"
            )

    if s.init == "random":
        if s.allocation not in (None, "uniform"):
            raise ValueError(
                f"structure.allocation={s.allocation!r} applies only to structure.init: "
                "search (how the search splits the budget between layers); with init: "
                "random every layer starts at the same fraction of its MACs: remove the "
                "key or set structure.allocation=null"
            )
        if s.search_steps is not None:
            raise ValueError(
                f"structure.search_steps={s.search_steps!r} applies only to structure.init: "
                "search (refinement steps of the structure search), not init: random: "
                "remove the key or set structure.search_steps=null"
            )
    family = s.kind != "gblr"
    if family and s.init == "search" and s.search_steps:
        raise ValueError(
            f"structure.search_steps={s.search_steps!r} applies only to structure.kind: "
            f"gblr with init: search; the {s.kind} family is projected onto the weights "
            "without refinement steps: set structure.search_steps=0 or null"
        )
    how = _rank_per_component_unused(s)
    if family and s.rank_per_component != 1 and how is not None:
        raise ValueError(
            f"structure.rank_per_component={s.rank_per_component!r} applies only to "
            "structure.kind: gblr, or to a baseline family with init: search and "
            "allocation: global (the unit in which it hands out MACs); "
            f"{s.kind} with {how} has no use for it: set structure.rank_per_component=1"
        )


def with_structure(config: TrainConfig, kind: str, budget: float | None = None) -> TrainConfig:
    """A checked copy of ``config`` whose layers get structure ``kind`` (and ``budget``):
    how a GBLR recipe runs as its dense or baseline comparison. For another kind than
    ``gblr`` the keys only GBLR uses go back to their defaults (``start_cost``,
    ``start``, the search's ``search_steps``, and ``rank_per_component`` where the kind
    has no use for it), so that the comparison is the same recipe with other layers.

    Examples:
        >>> from gblr.recipes.config import load_config, with_structure
        >>> config = load_config("digits-vit-gblr", ["structure.start_cost=0.6"])
        >>> lowrank = with_structure(config, "lowrank", 0.2)
        >>> lowrank.structure.kind, lowrank.structure.budget, lowrank.structure.start_cost
        ('lowrank', 0.2, None)
        >>> config.structure.kind, config.structure.start_cost  # unchanged
        ('gblr', 0.6)
    """
    data = config_to_dict(config)
    structure = data["structure"]
    structure["kind"] = kind
    if budget is not None:
        structure["budget"] = budget
    if kind != "gblr":
        structure["start_cost"] = None
        structure["start"] = None
        structure["factor_init"] = None
        if structure["init"] == "search":
            structure["search_steps"] = None
        if _rank_per_component_unused(StructureConfig(**structure)) is not None:
            structure["rank_per_component"] = 1
    return config_from_dict(data)


def learner_config(config: TrainConfig) -> StructureLearnerConfig:
    """The [`gblr.LearnerConfig`][] of the config's ``learner`` section: the one
    place where its keys become the learner's config (``adaptive: 0`` is off,
    ``max_shift``/``max_shift_ramp`` are one ``shift_limit``, ``merge_every`` is
    ``pass_every``; ``exact_from``, ``revive``, ``cut_exponent``, ``fill_budget`` and
    ``hold_narrow_sides`` are passed as they are). ``sigma_start`` and ``budget_ramp`` are
    durations of the run and go to the learner as steps.

    Examples:
        >>> from gblr.recipes.config import learner_config, load_config
        >>> config = load_config("digits-vit-gblr", ["learner.merge=1e-3"])
        >>> learned = learner_config(config)
        >>> learned.sigma, learned.merge, learned.adaptive
        (None, MergeConfig(tolerance=0.001), None)
    """
    from ..learn.config import config_from_options

    learner = config.learner
    options = config_from_options(
        {
            "sigma": None if learner.sigma is None else tuple(learner.sigma),
            "sigma_schedule": learner.sigma_schedule,
            "adaptive": learner.adaptive,
            "max_shift": learner.max_shift,
            "max_shift_ramp": learner.max_shift_ramp,
            "merge": learner.merge,
            "untangle": learner.untangle,
            "refine": learner.refine,
            "merge_every": learner.merge_every,
        }
    )
    return dataclasses.replace(
        options,
        exact_from=learner.exact_from,
        revive=learner.revive,
        cut_exponent=learner.cut_exponent,
        fill_budget=learner.fill_budget,
        hold_narrow_sides=learner.hold_narrow_sides,
    )


def load_config(source: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config (a YAML path or a shipped name such as ``cifar10-vit-s-gblr``),
    follow its ``extends`` chain, apply ``section.key=value`` overrides and check it.

    A config's ``name`` and ``out`` are not inherited through ``extends``: without them a
    file is named by its file name (``my-vit.yaml``: ``my-vit``) and runs into
    ``runs/<name>``.

    Raises:
        FileNotFoundError: no such file or shipped config (the message lists them).
        ValueError: an unknown key (named, with the closest allowed one), a value of the
            wrong type or out of range, or an unknown choice.

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> config = load_config("digits-vit-gblr", ["optim.lr=3e-3", "structure.budget=0.5"])
        >>> config.name, config.optim.lr, config.structure.budget
        ('digits-vit-gblr', 0.003, 0.5)
        >>> try:
        ...     load_config("digits-vit-gblr", ["optim.lrr=1"])
        ... except ValueError as error:
        ...     print(str(error)[:44])
        unknown config key 'optim.lrr' (did you mean
    """
    if isinstance(overrides, str):  # it was read character by character
        raise TypeError(
            f"overrides must be a list of 'section.key=value' strings, got the string "
            f"{overrides!r}: pass [{overrides!r}]"
        )
    path = _locate(source)
    data = _read_with_parents(path)
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"override {text!r}: {'.'.join(keys[: depth + 1])} is not a section"
                )
            node = child
        node[keys[-1]] = value
    data.setdefault("name", path.stem)
    if isinstance(data["name"], str) and data["name"]:
        data.setdefault("out", f"runs/{data['name']}")
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A checked config from plain data (as written by
    [`config_to_dict`][gblr.recipes.config.config_to_dict]).

    Examples:
        >>> from gblr.recipes.config import config_from_dict
        >>> config = config_from_dict({"optim": {"steps": 2}, "structure": {"budget": 0.5}})
        >>> config.optim.steps, config.structure.budget
        (2, 0.5)
        >>> try:
        ...     config_from_dict({"optim": {"lr": 1e-3}})
        ... except ValueError as error:
        ...     print(error)
        give exactly one of optim.epochs and optim.steps, got epochs=None, steps=None
    """
    config = _build(TrainConfig, data, "")
    _validate(config)
    return config


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-3, ...}`` from nested config data (``model.kwargs`` kept whole).

    Examples:
        >>> from gblr.recipes.config import flatten_config
        >>> flatten_config({"optim": {"lr": 1e-3}, "model": {"kwargs": {"a": 1}}, "seed": 0})
        {'optim.lr': 0.001, 'model.kwargs': {'a': 1}, 'seed': 0}
    """
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys (``section.key``) in which config data ``current`` differs from the
    config ``saved`` with a checkpoint, other than those in `RESUME_MAY_CHANGE`:
    resuming with any of them changed is refused.

    Examples:
        >>> from gblr.recipes.config import config_to_dict, load_config, resume_changes
        >>> saved = config_to_dict(load_config("digits-vit-gblr"))
        >>> moved = config_to_dict(load_config("digits-vit-gblr", ["trainer.devices=2"]))
        >>> resume_changes(saved, moved)
        []
        >>> faster = config_to_dict(load_config("digits-vit-gblr", ["optim.lr=1e-2"]))
        >>> resume_changes(saved, faster)
        ['optim.lr: 0.002 in the checkpoint, 0.01 now']
    """
    before, after = flatten_config(saved), flatten_config(current)
    return [
        f"{key}: {before.get(key, '(absent)')!r} in the checkpoint, "
        f"{after.get(key, '(absent)')!r} now"
        for key in sorted(set(before) | set(after))
        if key not in RESUME_MAY_CHANGE and before.get(key) != after.get(key)
    ]


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (for YAML/JSON and checkpoints).

    Examples:
        >>> from gblr.recipes.config import config_from_dict, config_to_dict, load_config
        >>> config = load_config("digits-vit-gblr")
        >>> data = config_to_dict(config)
        >>> sorted(data)
        ... # doctest: +NORMALIZE_WHITESPACE
        ['data', 'learner', 'model', 'name', 'optim', 'out', 'seed', 'smoke', 'structure',
         'trainer']
        >>> config_from_dict(data) == config
        True
    """
    return dataclasses.asdict(config)
