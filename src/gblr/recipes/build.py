"""From a config to its data and its model: the datasets, the dense network of
``config.model``, the structure of ``config.structure`` applied to it, one example input,
and the model of a finished run (a run folder, a checkpoint or a config).

Used by training (`gblr.recipes.train`), smoke runs (`gblr.recipes.smoke`) and
``gblr flops``; it trains nothing.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TEXT_DATASETS, TrainConfig

__all__ = [
    "apply_structure",
    "build_datasets",
    "build_model",
    "build_structured_model",
    "check_structures_some_layer",
    "data_shape",
    "example_input",
    "model_from_run",
]


def _image_stats(config: TrainConfig, model: nn.Module | None) -> tuple[Any, Any]:
    if config.data.mean is not None and config.data.std is not None:
        return tuple(config.data.mean), tuple(config.data.std)
    pretrained = getattr(model, "pretrained_cfg", None) or {}  # timm models carry theirs
    if "mean" in pretrained and "std" in pretrained:
        return tuple(pretrained["mean"]), tuple(pretrained["std"])
    from .data import _IMAGENET_MEAN, _IMAGENET_STD

    return _IMAGENET_MEAN, _IMAGENET_STD


def build_datasets(
    config: TrainConfig, model: nn.Module | None = None
) -> tuple[Any, Any, int, int]:
    """``(train, test, in_chans, num_classes)`` of an image dataset in ``config.data``;
    ``model`` (optional) supplies a timm model's normalization statistics.

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", tiny)
        >>> from gblr.recipes.build import build_datasets
        >>> train, test, in_chans, num_classes = build_datasets(config)
        >>> len(train), len(test), in_chans, num_classes
        (1348, 449, 1, 10)
    """
    from .data import digits, image_folder, load_cifar

    data = config.data
    if data.name == "digits":
        train, test = digits(seed=config.seed, image_size=config.model.image_size)
        return train, test, 1, 10
    if data.name in ("cifar10", "cifar100"):
        classes = 10 if data.name == "cifar10" else 100
        # a smoke run may read its own stand-in files; read safely all the same
        verify = data.verify and not config.smoke
        options = dict(classes=classes, download=data.download, verify=verify)
        train = load_cifar(data.root, train=True, augment=data.augment, **options)
        test = load_cifar(data.root, train=False, **options)
        return train, test, 3, classes
    if data.name in TEXT_DATASETS:
        raise ValueError(f"data.name={data.name!r} is text; build_datasets reads images")
    train_root, val_root = data.root, data.val_root
    if data.name == "imagenet":
        train_root, val_root = f"{data.root}/train", f"{data.root}/val"
    if val_root is None:
        raise ValueError("data.val_root must name the validation image folder")
    mean, std = _image_stats(config, model)
    size = config.model.image_size
    train = image_folder(train_root, size, train=True, mean=mean, std=std)
    test = image_folder(val_root, size, train=False, mean=mean, std=std)
    if test.classes != train.classes:
        raise ValueError(f"the validation folder {val_root} has other classes than {train_root}")
    return train, test, 3, len(train.classes)


def data_shape(config: TrainConfig) -> tuple[int, int]:
    """``(in_chans, num_classes)`` of ``config.data`` without reading the images
    (``(0, 0)`` for text).

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", tiny)
        >>> from gblr.recipes.build import data_shape
        >>> data_shape(config)  # digits: 1 channel, 10 classes
        (1, 10)
    """
    name = config.data.name
    if name in TEXT_DATASETS:
        return 0, 0
    if name in ("digits", "cifar10", "cifar100"):
        return {"digits": (1, 10), "cifar10": (3, 10), "cifar100": (3, 100)}[name]
    root = Path(config.data.root or "").expanduser()
    if name == "imagenet":
        root = root / "train"
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root} (data.root): cannot count classes")
    from .data import image_classes

    return 3, len(image_classes(root))


def _timm_model(config: TrainConfig, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError as error:
        raise ImportError("model.name='timm' needs timm: pip install 'gblr[vision]'") from error
    m = config.model
    kwargs = {"drop_path_rate": m.drop_path, **m.kwargs}
    return timm.create_model(m.source, pretrained=m.pretrained, num_classes=num_classes, **kwargs)


def _torchvision_model(config: TrainConfig, num_classes: int) -> nn.Module:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(
            "model.name='torchvision' needs torchvision: pip install 'gblr[vision]'"
        ) from error
    m = config.model
    if m.source not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"model.source={m.source!r} is not a torchvision classification model")
    if not m.pretrained:
        return torchvision.models.get_model(m.source, weights=None, num_classes=num_classes)
    # ImageNet weights come with a 1000-class head; another number of classes gets a new one
    model = torchvision.models.get_model(m.source, weights="DEFAULT", **m.kwargs)
    if num_classes != 1000:
        if not isinstance(getattr(model, "fc", None), nn.Linear):
            raise ValueError(
                f"pretrained {m.source} has no 'fc' head to replace for {num_classes} classes"
            )
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _hf_causal_lm(config: TrainConfig) -> nn.Module:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "model.name='hf-causal-lm' needs transformers: pip install 'gblr[hf]'"
        ) from error
    m = config.model
    if m.pretrained:
        return transformers.AutoModelForCausalLM.from_pretrained(m.source, **m.kwargs)
    try:
        model_config = transformers.AutoConfig.for_model(m.source, **m.kwargs)
    except ValueError as error:
        raise ValueError(
            f"model.source={m.source!r}: without model.pretrained it must be a model type "
            f"such as 'gpt2' (a randomly initialised model is built): {error}"
        ) from None
    return transformers.AutoModelForCausalLM.from_config(model_config)


def build_model(config: TrainConfig, in_chans: int, num_classes: int) -> nn.Module:
    """The dense network of ``config.model`` (structure is applied separately).

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", tiny)
        >>> from gblr.recipes.build import build_model
        >>> model = build_model(config, in_chans=1, num_classes=10)
        >>> type(model).__name__, type(model.blocks[0].qkv).__name__
        ('VisionTransformer', 'Linear')
    """
    from .models import MlpMixer, VisionTransformer

    m = config.model
    if m.name == "timm":
        return _timm_model(config, num_classes)
    if m.name == "torchvision":
        return _torchvision_model(config, num_classes)
    if m.name == "hf-causal-lm":
        return _hf_causal_lm(config)
    size = (m.image_size, m.patch_size, in_chans, num_classes, m.dim, m.depth)
    if m.name == "vit":
        return VisionTransformer(*size, m.heads, m.mlp_ratio, m.drop_path, **m.kwargs)
    return MlpMixer(*size, m.token_mlp_ratio, m.channel_mlp_ratio, m.drop_path, **m.kwargs)


def apply_structure(model: nn.Module, config: TrainConfig) -> None:
    """Make ``model``'s ``structure.include`` layers, minus ``structure.exclude``,
    structured, in place (seeded).

    GBLR layers start at ``structure.start_cost`` (default: the budget), from scratch
    (``init: random``) or fitted to the weights (``init: search``); the learner then
    takes them to ``structure.budget``; without ``structure.start`` they start
    ``blockdiag`` here, with no data to probe on (a run of the config may let a probe
    choose, [`gblr.recipes.train.probe_chooses_start`][]). The baseline families, which
    no learner moves, start at the budget. [`gblr.recipes.config.load_config`][] has
    refused the keys that cannot apply to the config's kind and init.

    Examples:
        >>> from gblr.recipes.build import apply_structure, build_model
        >>> from gblr.recipes.config import load_config
        >>> config = load_config("digits-vit-gblr", ["structure.kind=lowrank"])
        >>> model = build_model(config, in_chans=1, num_classes=10)
        >>> apply_structure(model, config)
        >>> type(model.blocks[0].fc1).__name__, type(model.head).__name__
        ('LowRankLinear', 'Linear')
    """
    s = config.structure
    if s.kind == "dense":
        return
    with warnings.catch_warnings():
        if config.smoke:
            # a smoke run's model has random weights by design: that they look untrained
            # (and init='random' would fit them better) is no advice for the recipe
            warnings.filterwarnings(
                "ignore", message=r"gblr\.convert: the weights of .* look untrained"
            )
        report = _apply_structure(model, config)
    # not a smoke run's tiny stand-in model, too small for a family at the budget that
    # the real model takes
    if not config.smoke:
        check_structures_some_layer(report, s.kind)


def check_structures_some_layer(report: Any, kind: str) -> None:
    """``ValueError`` when the conversion ``report`` (a
    [`gblr.ConversionReport`][gblr.compress.convert.ConversionReport], ``None``: nothing
    to check) structured no layer: a run named after structure ``kind`` would train the
    dense model under its name.

    Examples:
        >>> import torch, gblr
        >>> from gblr.recipes.build import check_structures_some_layer
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> report = gblr.convert(model, gblr.LowRankConfig(budget=0.5))
        >>> check_structures_some_layer(report, "lowrank")  # one layer: nothing to say
        >>> report = gblr.convert(torch.nn.Sequential(torch.nn.Linear(64, 64)),
        ...     gblr.LowRankConfig(budget=0.5, exclude="0"))
        >>> try:
        ...     check_structures_some_layer(report, "lowrank")
        ... except ValueError as error:
        ...     print(str(error)[:54])
        structure.kind=lowrank structures no layer of this mod
    """
    if report is None or any(not row.dense for row in report.layers):
        return
    reasons = sorted({reason for _, reason in report.skipped})
    raise ValueError(
        f"structure.kind={kind} structures no layer of this model"
        + (f" ({'; '.join(reasons[:3])})" if reasons else " (include/exclude leave none)")
        + "; the run would train the dense model under its name"
    )


def _apply_structure(model: nn.Module, config: TrainConfig) -> Any:
    """`apply_structure`'s work; the conversion's report (``None`` for none)."""
    from ..compress.convert import convert
    from .models import _conversion_config, gblr_start_cost, structure_model

    s = config.structure
    if s.kind == "gblr" and s.start == "probe":
        raise ValueError(
            "structure.start=probe has no structure until a run chooses its start: train "
            "it (gblr train), then load the run folder, whose config.yaml names the start"
        )
    start = s.start_cost if s.kind == "gblr" and s.start_cost is not None else s.budget
    if s.init == "random":
        return structure_model(
            model,
            s.kind,
            gblr_start_cost(s.budget, s.start_cost) if s.kind == "gblr" else s.budget,
            include=s.include,
            exclude=s.exclude,
            rank_per_component=s.rank_per_component,
            seed=config.seed,
            **({} if s.start is None else {"structure_init": s.start}),
            **({} if s.factor_init is None else {"factor_init": s.factor_init}),
        )
    # min_features=1: the include patterns choose the layers (and _structure_like agrees)
    conversion = _conversion_config(
        s.kind,
        start,
        init="search",
        include=s.include,
        exclude=s.exclude,
        rank_per_component=s.rank_per_component,
        seed=config.seed,
        allocation=s.allocation,
        search_steps=s.search_steps,
    )
    return convert(model, conversion)


def build_structured_model(config: TrainConfig, in_chans: int, num_classes: int) -> nn.Module:
    """[`build_model`][gblr.recipes.build.build_model] with ``config.structure`` applied (seeded by
    ``config.seed``).

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", tiny)
        >>> from gblr.recipes.build import build_structured_model, example_input
        >>> model = build_structured_model(config, in_chans=1, num_classes=10)
        >>> type(model.blocks[0].qkv).__name__, model(example_input(config)).shape
        ('GBLRLinear', torch.Size([1, 10]))
    """
    torch.manual_seed(config.seed)
    model = build_model(config, in_chans, num_classes)
    apply_structure(model, config)
    return model


def example_input(config: TrainConfig) -> Any:
    """One example input for ``config.model``: an image ``(1, C, S, S)`` or one window of
    token ids ``(1, seq_len)``.

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", tiny)
        >>> from gblr.recipes.build import example_input
        >>> example_input(config).shape
        torch.Size([1, 1, 8, 8])
    """
    if config.data.name in TEXT_DATASETS:
        return torch.zeros(1, config.data.seq_len, dtype=torch.long)
    in_chans, _ = data_shape(config)
    return torch.zeros(1, in_chans, config.model.image_size, config.model.image_size)


def model_from_run(source: str | Path) -> tuple[nn.Module, str, Any]:
    """The model of a run folder (``config.yaml`` + ``model_state.pt``), of a Lightning
    checkpoint written by ``gblr train``, or of a config (its starting structure).

    A config with ``structure.init: search`` builds its dense model only (the search
    needs the pretrained weights and time); a run folder or checkpoint rebuilds the
    structure from the saved state.

    Returns:
        ``(model, what, example)``: the model (eval mode) with its trained state when
        there is one, a phrase saying which it is, and one example input
        ([`example_input`][gblr.recipes.build.example_input]).

    Raises:
        FileNotFoundError: nothing of the kind at ``source``.
        ValueError: a checkpoint without the config that made it, or weights that do not
            fit the config's model.

    Examples:
        A shipped config gives its starting structure (a run folder: the trained model):

        >>> from gblr.recipes.build import model_from_run
        >>> model, what, example = model_from_run("digits-vit-gblr")
        >>> what
        'config digits-vit-gblr (starting structure, untrained)'
        >>> example.shape, model(example).shape
        (torch.Size([1, 1, 8, 8]), torch.Size([1, 10]))
        >>> try:
        ...     model_from_run("no/such/run")
        ... except FileNotFoundError as error:
        ...     print(type(error).__name__)
        FileNotFoundError
    """
    from .checkpoints import STATE_FILE, checkpoint_model_state, load_state
    from .config import config_from_dict, load_config

    path = Path(source)
    state = None
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"no config.yaml in the run folder {path}")
        config = load_config(path / "config.yaml")
        what = f"run {path}"
        if (path / STATE_FILE).is_file():
            state = load_state(path / STATE_FILE)
        else:
            what += " (no model_state.pt: its starting structure)"
    elif path.suffix == ".ckpt":
        from .checkpoints import read_checkpoint

        checkpoint = read_checkpoint(path)
        settings = checkpoint.get("gblr", {}).get("config")
        if settings is None:
            raise ValueError(f"{path} holds no gblr config (not written by gblr train)")
        config = config_from_dict(settings)
        state = checkpoint_model_state(checkpoint)  # already read: not loaded twice
        what = f"checkpoint {path} (step {checkpoint.get('global_step', '?')})"
    else:
        config = load_config(path)
        what = f"config {config.name} (starting structure, untrained)"
    if config.smoke:
        what += " [smoke run: a tiny stand-in model, not the recipe's]"
    in_chans, num_classes = data_shape(config)
    if state is None and config.structure.init == "search":
        config.structure.kind = "dense"
        what = f"config {config.name} (dense model before its structure search)"
    torch.manual_seed(config.seed)
    model = build_model(config, in_chans, num_classes)
    if state is not None and config.structure.init == "search":
        _structure_like(model, state, config)
    elif config.structure.kind != "dense":
        apply_structure(model, config)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise ValueError(
                f"the weights of {what} do not fit the model its config builds: {first[:300]}"
            ) from None
    return model.eval(), what, example_input(config)


def _structure_like(model: nn.Module, state: dict[str, torch.Tensor], config: TrainConfig) -> None:
    """Give ``model`` the structured layers whose shapes ``state`` holds, without the
    structure search (their values come from ``state``)."""
    from ..compress.convert import convert, convertible_kind
    from ..layers import GBLRConv2d, GBLRLinear
    from ..modules import hf_conv1d_class, set_submodule
    from .models import _conversion_config

    # A random structure of the same kind and budget has the searched layers' parameter
    # shapes, except for the number of GBLR components, which the search chooses. Layers
    # the search kept dense (their share of the budget paid for them) are dense in
    # ``state``: they stay; every other selected layer is structured.
    s = config.structure
    conv1d = hf_conv1d_class()  # Hugging Face's Conv1D (GPT-2) is a convertible layer too
    kept = [
        name
        for name, layer in model.named_modules()
        if convertible_kind(layer, conv1d) is not None
        and getattr(state.get(f"{name}.weight"), "shape", None) == layer.weight.shape
    ]
    excluded = [s.exclude] if isinstance(s.exclude, str) else list(s.exclude or [])
    conversion = _conversion_config(
        s.kind,
        s.budget,
        init="random",
        include=s.include,
        exclude=excluded + kept or None,
        rank_per_component=s.rank_per_component,
        seed=config.seed,
    )
    convert(model, dataclasses.replace(conversion, keep_dense=False))
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, (GBLRLinear, GBLRConv2d)) or f"{name}.U" not in state:
            continue
        components, rank = state[f"{name}.U"].shape[:2]
        options = dict(
            rank_per_component=int(rank),
            num_components=int(components),
            bias=layer.bias is not None,
        )
        if isinstance(layer, GBLRLinear):
            rebuilt = GBLRLinear(layer.in_features, layer.out_features, **options)
        else:
            rebuilt = GBLRConv2d.like(layer, **options)
        set_submodule(model, name, rebuilt)
