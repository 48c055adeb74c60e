"""``gblr train`` / ``gblr finetune``: one training run from a config, in its own folder.

The run folder (``config.out``) holds ``config.yaml`` (the resolved config),
``checkpoints/last.ckpt`` (resumable), ``metrics.csv`` and/or ``tensorboard/``,
``model_state.pt``, ``results.json`` and ``REPORT.md`` with its figures.

Image classifiers (the compact ViT and Mixer, timm and torchvision models) report top-1
and top-5 test accuracy; causal language models (Hugging Face) report the perplexity of
the test split with the standard sliding-window evaluation. Either may start from
pretrained weights (``model.pretrained``) fitted to a MACs budget by a structure search
(``structure.init: search``), or from scratch.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TEXT_DATASETS, TrainConfig, config_to_dict

__all__ = [
    "build_datasets",
    "build_model",
    "build_structured_model",
    "data_shape",
    "example_input",
    "model_from_run",
    "run_length",
    "smoke_config",
    "train_from_config",
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
        >>> from gblr.recipes.train import build_datasets
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
        train = load_cifar(
            data.root, train=True, classes=classes, augment=data.augment, download=data.download
        )
        test = load_cifar(data.root, train=False, classes=classes, download=data.download)
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
        >>> from gblr.recipes.train import data_shape
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
    return 3, sum(1 for child in root.iterdir() if child.is_dir())


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
        >>> from gblr.recipes.train import build_model
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
    """Make ``model``'s ``structure.include`` layers structured, in place (seeded)."""
    from ..compress.convert import convert
    from .models import structure_model

    s = config.structure
    if s.kind == "dense":
        return
    if s.init == "random":
        start = s.start_cost if s.start_cost is not None else s.budget
        structure_model(
            model, s.kind, start if s.kind == "gblr" else s.budget, include=s.include,
            seed=config.seed,
        )  # fmt: skip
        return
    options: dict[str, Any] = {}
    if s.allocation is not None:
        options["allocation"] = s.allocation
    if s.search_steps is not None:
        options["steps"] = s.search_steps
    convert(
        model,
        structure=s.kind,
        budget=s.budget,
        init="search",
        include=s.include,
        exclude=s.exclude,
        rank_per_component=s.rank_per_component,
        min_features=1,  # the include patterns choose the layers (and _structure_like agrees)
        seed=config.seed,
        **options,
    )


def build_structured_model(config: TrainConfig, in_chans: int, num_classes: int) -> nn.Module:
    """:func:`build_model` with ``config.structure`` applied (seeded by ``config.seed``).

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", tiny)
        >>> from gblr.recipes.train import build_structured_model, example_input
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
        >>> from gblr.recipes.train import example_input
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
        (:func:`example_input`).

    Raises:
        FileNotFoundError: nothing of the kind at ``source``.
        ValueError: a checkpoint without the config that made it, or weights that do not
            fit the config's model.

    Examples:
        A shipped config gives its starting structure (a run folder: the trained model):

        >>> from gblr.recipes.train import model_from_run
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
    from .config import config_from_dict, load_config
    from .report import STATE_FILE, checkpoint_model_state, load_state

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
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
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
    from ..compress.convert import _set_submodule, convert
    from ..layers import GBLRConv2d, GBLRLinear

    # A random structure of the same kind and budget has the searched layers' parameter
    # shapes, except for the number of GBLR components, which the search chooses.
    convert(
        model,
        structure=config.structure.kind,
        budget=config.structure.budget,
        init="random",
        include=config.structure.include,
        exclude=config.structure.exclude,
        rank_per_component=config.structure.rank_per_component,
        min_features=1,
        seed=config.seed,
    )
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
            rebuilt = GBLRConv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                **options,
            )
        _set_submodule(model, name, rebuilt)


def run_length(config: TrainConfig, train_size: int) -> tuple[int, float]:
    """``(total optimizer steps, steps per run unit)``: a unit is an epoch of
    ``train_size`` samples at the global batch size, or one step.

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", tiny)
        >>> from gblr.recipes.train import run_length
        >>> run_length(config, train_size=1348)  # step-based: a unit is one step
        (2, 1.0)
        >>> epochs = load_config("digits-vit-gblr", ["optim.steps=null", "optim.epochs=3"])
        >>> run_length(epochs, train_size=1348)  # 1348 samples at batch 64: 21 steps an epoch
        (63, 21.0)
    """
    optim = config.optim
    if optim.steps is not None:
        return optim.steps, 1.0
    per_epoch = train_size // optim.batch_size
    if per_epoch < 1:
        raise ValueError(
            f"optim.batch_size={optim.batch_size} is larger than the training set "
            f"({train_size} samples): not one step per epoch"
        )
    return max(1, math.ceil(optim.epochs * per_epoch)), float(per_epoch)


def _trainer_options(config: TrainConfig) -> dict[str, Any]:
    t = config.trainer
    options: dict[str, Any] = {
        "accelerator": t.accelerator,
        "devices": t.devices,
        "num_nodes": t.num_nodes,
        "strategy": t.strategy,
        "precision": t.precision,
        "log_every_n_steps": t.log_every_n_steps,
        # cuDNN/cuBLAS determinism is slow and not needed off the CPU tests
        "deterministic": t.accelerator == "cpu",
    }
    if config.optim.grad_clip is not None:
        options["gradient_clip_val"] = config.optim.grad_clip
    return options


def _save_atomically(write, path: Path, text: bool = False) -> None:
    from .report import publish

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w" if text else "wb"
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, suffix=".tmp", delete=False) as f:
        write(f)
    publish(f.name, path)


def _text_data(config: TrainConfig) -> tuple[Any, Any, torch.Tensor]:
    """``(train blocks, validation blocks, test token stream)`` for a language model."""
    from .text import LMBlocks, load_tokenizer, read_text_files, read_wikitext, token_stream

    data = config.data
    tokenizer = load_tokenizer(data.tokenizer)
    cache = None if data.root is None else Path(data.root).expanduser() / ".gblr-cache"
    if config.smoke:
        cache = None  # the cache is for whole splits; a smoke run reads the first part only
    streams = {}
    for split in ("train", "valid", "test"):
        if data.name == "wikitext103":
            text = read_wikitext(data.root, split)
        else:
            text = read_text_files([Path(data.root).expanduser() / f"{split}.txt"])
        if config.smoke:
            # tokenizing a real corpus takes minutes; a smoke run needs a few blocks
            text = text[:_SMOKE_TEXT_CHARS]
        streams[split] = token_stream(text, tokenizer, cache_dir=cache)
    return (
        LMBlocks(streams["train"], data.seq_len),
        LMBlocks(streams["valid"], data.seq_len),
        streams["test"],
    )


def train_from_config(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train, evaluate and report one run described by ``config``.

    Args:
        config: from :func:`gblr.recipes.config.load_config`.
        resume: a checkpoint to continue, or ``"last"`` for the run folder's own
            ``checkpoints/last.ckpt``. A checkpoint of another structure is refused.
        progress: show progress bars.
        stop_after: stop at this optimizer step (an interruption; schedules still span
            the whole run).

    Returns:
        As written to ``results.json``: ``{"accuracy", "top5"}`` (images) or
        ``{"perplexity", "nll", "tokens"}`` (text), and ``"macs_ratio"``, ``"gflops"``,
        ``"dense_gflops"`` (whole model, one example), ``"seconds"``, ``"steps"``.

    Examples:
        Two steps of a tiny GBLR ViT on the digits, written to a temporary run folder:

        >>> import os, tempfile
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.train import train_from_config
        >>> out = tempfile.mkdtemp()
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> options = ["trainer.logger=none", "trainer.accelerator=cpu", f"out={out}"]
        >>> config = load_config("digits-vit-gblr", tiny + options)
        >>> results = train_from_config(config, progress=False)
        >>> results["steps"], 0.0 <= results["accuracy"] <= 1.0, results["macs_ratio"] < 1.0
        (2, True, True)
        >>> sorted(name for name in os.listdir(out) if "." in name)
        ['REPORT.md', 'config.yaml', 'model_state.pt', 'results.json']
    """
    import yaml

    from ..model_flops import count_model_flops
    from .data import batch_mixer
    from .engine import check_resume, train_classifier, train_language_model

    out = Path(config.out).expanduser()
    _check_run_folder(out, config, resume)
    text = config.data.name in TEXT_DATASETS
    if text:
        train_set, val_set, test_stream = _text_data(config)
        in_chans = num_classes = 0
    else:
        in_chans, num_classes = data_shape(config)
    torch.manual_seed(config.seed)
    model = build_model(config, in_chans, num_classes)
    if not text:
        train_set, val_set, in_chans, num_classes = build_datasets(config, model)
    if config.smoke:
        # real data may be present: read only what a few steps and one evaluation need
        batch = config.optim.batch_size
        train_set = _first(train_set, (config.optim.steps or 1) * batch)
        val_set = _first(val_set, 2 * batch)
    apply_structure(model, config)
    steps, unit = run_length(config, len(train_set))
    if resume == "last":
        resume = out / "checkpoints" / "last.ckpt"
    if resume is not None:
        check_resume(resume, model)  # before anything in the run folder is rewritten
    optim, learner = config.optim, config.learner
    warmup = round(optim.warmup * unit)
    ramp = warmup if learner.budget_ramp is None else round(learner.budget_ramp * unit)
    if config.trainer.val_every is not None:
        val_every = max(1, round(config.trainer.val_every * unit))
    else:
        val_every = round(unit) if optim.epochs is not None else None
    if val_every is not None and val_every > steps:
        val_every = None
    settings = config_to_dict(config)
    _save_atomically(
        lambda f: yaml.safe_dump(settings, f, sort_keys=False), out / "config.yaml", text=True
    )
    options: dict[str, Any] = dict(
        steps=steps,
        global_batch_size=optim.batch_size,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        warmup_steps=warmup,
        structure_lr=optim.structure_lr,
        target=config.structure.budget if config.structure.kind == "gblr" else None,
        budget_ramp_steps=ramp,
        sigma=None if learner.sigma is None else tuple(learner.sigma),
        sigma_schedule=learner.sigma_schedule,
        sigma_start_step=round(learner.sigma_start * unit),
        learner_options={
            "adaptive": learner.adaptive,
            "max_shift": learner.max_shift,
            "max_shift_ramp": learner.max_shift_ramp,
        },
        structure_include=config.structure.include,
        num_workers=config.data.num_workers,
        val_every_n_steps=val_every,
        out_dir=out,
        logger=config.trainer.logger,
        seed=config.seed,
        progress=progress,
        checkpoint_dir=out / "checkpoints",
        checkpoint_every_n_steps=config.trainer.checkpoint_every_n_steps,
        resume=resume,
        stop_after=stop_after,
        run_info={"structure": config.structure.kind, "config": settings},
        compile_mode=config.trainer.compile,
        **_trainer_options(config),
    )
    if text:
        result = train_language_model(model, train_set, val_set, **options)
    else:
        result = train_classifier(
            model,
            train_set,
            val_set,
            label_smoothing=config.data.label_smoothing,
            batch_mix=batch_mixer(config.data.mixup, config.data.cutmix, num_classes),
            **options,
        )
    result = {"name": config.name, "structure": config.structure.kind, **result}
    if config.smoke:
        result["smoke"] = True
    if result.pop("global_rank") != 0:
        return result
    if text:
        from .text import strided_perplexity

        stride = config.data.eval_stride or config.data.seq_len
        result.update(strided_perplexity(model, test_stream, config.data.seq_len, stride))
    device = next(model.parameters()).device
    model_cost = count_model_flops(model.eval(), example_input(config).to(device))
    result.update(gflops=model_cost.gflops, dense_gflops=model_cost.dense_macs / 1e9)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _save_atomically(lambda f: torch.save(state, f), out / "model_state.pt")
    _save_atomically(
        lambda f: json.dump({"config": settings, "result": result}, f, indent=2),
        out / "results.json",
        text=True,
    )
    write_run_report(out)
    return result


# --- smoke runs: the whole pipeline of a config in seconds, before a long run -------------

SMOKE_STEPS = 2
SMOKE_DATA = "smoke-data"
_SMOKE_BATCH = 4
_SMOKE_SEQ_LEN = 32
_SMOKE_TEXT_CHARS = 200_000  # of a real corpus: tokenized in well under a second
_SMOKE_CLASSES, _SMOKE_PER_CLASS = 4, 3  # of a stand-in image folder
# What a run writes into its folder: a real run started where a smoke run was removes
# exactly these, so that nothing of the smoke run (checkpoint, curves) is taken for its own.
_RUN_FILES = (
    "checkpoints",
    "tensorboard",
    "figures",
    SMOKE_DATA,
    "metrics.csv",
    "metrics.before-resume.csv",
    "model_state.pt",
    "results.json",
    "REPORT.md",
)
SMOKE_BANNER = (
    "> **Smoke run** (`--smoke`): a few steps of a tiny stand-in model of the config's "
    "family, on stand-in data where the real data was absent, to check the setup. Its "
    "numbers are not results.\n\n"
)


def smoke_kind(folder: str | Path) -> bool | None:
    """Whether ``folder`` holds a smoke run or sweep (``True``), another run or sweep
    (``False``) or neither (``None``), as its ``config.yaml`` or ``sweep.json`` says."""
    folder = Path(folder).expanduser()
    if (folder / "config.yaml").is_file():
        import yaml

        data = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    elif (folder / "sweep.json").is_file():
        data = json.loads((folder / "sweep.json").read_text(encoding="utf-8")).get("config")
    else:
        return None
    return bool(isinstance(data, dict) and data.get("smoke", False))


def refuse_real_folder(folder: str | Path) -> None:
    """Refuse to write a smoke run into a folder that holds a real run or sweep."""
    if smoke_kind(folder) is False:
        raise ValueError(
            f"{folder} holds a run that is not a smoke run; --smoke would overwrite it. "
            "Give the smoke run another folder with --out"
        )


def _check_run_folder(out: Path, config: TrainConfig, resume: str | Path | None) -> None:
    if config.smoke:
        refuse_real_folder(out)
    elif smoke_kind(out):
        if resume is not None:
            raise ValueError(
                f"{out} holds a smoke run (--smoke): there is no real run to resume; "
                "start it without --resume"
            )
        import shutil

        # tolerant: under DDP every process starts here and may find a file gone already
        for name in _RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def write_run_report(run_dir: str | Path) -> Path:
    """:func:`gblr.recipes.report.write_report`, with a banner on top when the folder
    holds a smoke run (so that its numbers are not taken for results)."""
    from .report import write_report

    path = write_report(run_dir)
    if smoke_kind(run_dir):
        mark_smoke_report(path)
    return path


def mark_smoke_report(path: str | Path) -> None:
    """Put :data:`SMOKE_BANNER` on top of a Markdown report (once)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.startswith(SMOKE_BANNER):
        path.write_text(SMOKE_BANNER + text, encoding="utf-8")


def _first(dataset: Any, count: int) -> Any:
    if dataset is None or len(dataset) <= count:
        return dataset
    return torch.utils.data.Subset(dataset, range(count))


def _real_data(config: TrainConfig) -> bool:
    """Whether the data of ``config`` is on disk (smoke runs download nothing)."""
    data = config.data
    if data.name == "digits":
        return True  # embedded in scikit-learn
    if data.root is None:
        return False
    root = Path(data.root).expanduser()
    if data.name == "cifar10":
        folder = root / "cifar-10-batches-py"
        names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        return all((folder / name).is_file() for name in names)
    if data.name == "cifar100":
        return all((root / "cifar-100-python" / name).is_file() for name in ("train", "test"))
    if data.name in ("imagenet", "folder"):
        if data.name == "imagenet":
            folders = [root / "train", root / "val"]
        else:  # without val_root the run fails as the real one would
            folders = [root, *([Path(data.val_root).expanduser()] if data.val_root else [])]
        return all(f.is_dir() and any(c.is_dir() for c in f.iterdir()) for f in folders)
    if data.name == "wikitext103":
        return any((d / "wiki.train.raw").is_file() for d in (root, root / "wikitext-103-raw"))
    return all((root / f"{split}.txt").is_file() for split in ("train", "valid", "test"))


def _standin_text(rng: Any, chars: int) -> list[str]:
    """Lines of made-up sentences in WikiText's raw format (headings, spaced punctuation)."""
    words = [
        *("the", "of", "and", "in", "to", "a", "was", "is", "for", "on", "as", "by"),
        *("with", "he", "at", "from", "that", "his", "it", "an", "were", "which", "this"),
        *("be", "also", "first", "has", "one", "two", "new", "after", "game", "city", "river"),
    ]
    lines, size, article = [" \n"], 0, 0
    while size < chars:
        article += 1
        lines += [f" = Article {article} = \n", " \n"]
        for _ in range(3):
            sentence = " ".join(rng.choice(words, size=int(rng.integers(8, 20))))
            lines += [f" {sentence.capitalize()} , {sentence} . \n", " \n"]
        size = sum(len(line) for line in lines)
    return lines


def _write_standin(config: TrainConfig, root: Path) -> str:
    """Write stand-in data for ``config.data`` in its on-disk format at ``root``; returns
    what it wrote."""
    import shutil

    import numpy as np

    data = config.data
    rng = np.random.default_rng(config.seed)
    if root.exists():
        shutil.rmtree(root)  # the previous smoke run's: written afresh, never mixed
    root.mkdir(parents=True)
    if data.name in ("cifar10", "cifar100"):
        import pickle

        classes = 10 if data.name == "cifar10" else 100
        if classes == 10:
            folder, key = root / "cifar-10-batches-py", "labels"
            names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        else:
            folder, key, names = root / "cifar-100-python", "fine_labels", ["train", "test"]
        folder.mkdir()
        per_file = 8
        for name in names:
            batch = {
                "data": rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8),
                key: rng.integers(0, classes, size=per_file).tolist(),
            }
            with open(folder / name, "wb") as handle:
                pickle.dump(batch, handle)
        return f"{per_file * len(names)} random images in the official python-pickle files"
    if data.name in ("imagenet", "folder"):
        from PIL import Image

        for split in ("train", "val"):
            for label in range(_SMOKE_CLASSES):
                folder = root / split / f"n{label:08d}"
                folder.mkdir(parents=True)
                for k in range(_SMOKE_PER_CLASS):
                    pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{k}.png")
        count = 2 * _SMOKE_CLASSES * _SMOKE_PER_CLASS
        return f"{count} random PNG images in train/ and val/ class folders"
    for split, chars in (("train", 6000), ("valid", 1000), ("test", 1000)):
        name = f"wiki.{split}.raw" if data.name == "wikitext103" else f"{split}.txt"
        (root / name).write_text("".join(_standin_text(rng, chars)), encoding="utf-8")
    return (
        "made-up sentences in the raw release's format"
        if data.name == "wikitext103"
        else ("made-up sentences in train.txt, valid.txt and test.txt")
    )


def _causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _hf_cached(repo: str, filename: str) -> str | None:
    """A file of a Hub repository when it is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename)
    except Exception:  # not a valid repository name, or no huggingface_hub: not cached
        return None
    return found if isinstance(found, str) else None


def _hf_model_type(source: str) -> tuple[str, str]:
    """``(model type, how it was found)`` of a Hugging Face causal LM, without the network."""
    import re

    local = Path(source).expanduser() / "config.json"
    config_file = str(local) if local.is_file() else _hf_cached(source, "config.json")
    if config_file is not None:
        model_type = json.loads(Path(config_file).read_text(encoding="utf-8")).get("model_type")
        if model_type:
            return model_type, f"the model type in {config_file}"
    types_ = _causal_lm_types()
    if source in types_:
        return source, "model.source names it"
    # A hub name usually names its architecture ("Graphcore/gpt2-wikitext-103"): the
    # longest run of its words that spells a causal-LM model type
    words = re.split(r"[-_.]", source.rsplit("/", 1)[-1].lower())
    known = {t.replace("_", "").replace("-", ""): t for t in types_}
    runs = ["".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)]
    matches = sorted((r for r in runs if r in known), key=len, reverse=True)
    if not matches:
        raise ValueError(
            f"model.source={source!r}: a smoke run builds a tiny random model of its type "
            "without downloading, but the type is neither in a local config.json, nor in the "
            "Hugging Face cache, nor in the name; give it as model.source=TYPE (e.g. gpt2)"
        )
    return known[matches[0]], "read from the name"


def _tiny_hf_kwargs(model_type: str, vocab_size: int, positions: int) -> dict[str, Any]:
    import transformers

    defaults = transformers.AutoConfig.for_model(model_type)
    wanted = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 64,
        "max_position_embeddings": positions,
        "vocab_size": vocab_size,
    }
    kwargs = {key: value for key, value in wanted.items() if hasattr(defaults, key)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(defaults, key, None)
        if isinstance(value, int) and value >= vocab_size:
            kwargs[key] = None  # the pretrained vocabulary's ids do not exist in the small one
    return kwargs


def _first_block(config: TrainConfig) -> list[str]:
    """The structured layers of ``config`` in the first block (parent module) holding one."""
    import fnmatch

    from ..compress.convert import _kind

    in_chans, num_classes = data_shape(config)
    model = build_model(config, in_chans, num_classes)

    def patterns(value: str | list[str] | None) -> list[str]:
        listed = [value] if isinstance(value, str) else list(value or [])
        return [q for p in listed for q in (p, f"{p}.*")]

    include, exclude = patterns(config.structure.include), patterns(config.structure.exclude)
    names = [
        name
        for name, module in model.named_modules()
        if _kind(module, None) is not None
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    if not names:
        return []
    parent = names[0].rpartition(".")[0]
    return [name for name in names if name.rpartition(".")[0] == parent]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def smoke_config(
    config: TrainConfig, steps: int = SMOKE_STEPS, data_dir: str | Path | None = None
) -> tuple[TrainConfig, list[str]]:
    """A smoke run of ``config``: its whole pipeline in seconds, to check a setup before
    a long run (what Lightning's ``fast_dev_run`` is to a Trainer).

    The run keeps the config's model family and class, structure (kind, budget, layers,
    search), data pipeline and format, loggers and run folder, and changes:

    - the model: a tiny one of the same class, randomly initialised (nothing is
      downloaded); for models that cannot be made smaller (torchvision's), 32-pixel
      images and, with a structure search, only the first block's layers searched;
    - the data: the real data when it is on disk (only its first samples are read),
      else stand-in data in the same on-disk format written under ``data_dir``; a Hub
      tokenizer is used from the local cache, else ``bytes``;
    - the run: ``steps`` optimizer steps at batch 4, schedules scaled to them, one
      validation at the end when the config validates; 1 CPU process, 32-bit,
      no data-loading workers.

    The run is marked ``smoke: true`` (``config.yaml``, ``results.json``, a banner on
    ``REPORT.md``). It refuses a folder holding a real run; a real run started in a smoke
    run's folder first removes the smoke run's files.

    Args:
        config: from :func:`gblr.recipes.config.load_config`.
        steps: optimizer steps (default 2).
        data_dir: where stand-in data goes (default ``<out>/smoke-data``).

    Returns:
        ``(smoke config, notes)``: the notes say, one line each, what was changed and why.

    Raises:
        ValueError: ``steps`` is not a positive integer, ``data_dir`` lies in a real
            run's folder, or a Hugging Face model's type cannot be found offline.

    Examples:
        The multi-GPU CIFAR recipe, where no CIFAR-10 is on disk:

        >>> import tempfile
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.train import smoke_config
        >>> folder = tempfile.mkdtemp()
        >>> overrides = [f"data.root={folder}/cifar", "trainer.devices=8", f"out={folder}/run"]
        >>> config = load_config("cifar10-vit-s-gblr", overrides)
        >>> smoke, notes = smoke_config(config)
        >>> smoke.smoke, smoke.optim.steps, smoke.trainer.devices, smoke.model.dim
        (True, 2, 1, 16)
        >>> smoke.model.name, smoke.structure.budget, smoke.data.name, smoke.data.root[-18:]
        ('vit', 0.0667, 'cifar10', 'smoke-data/cifar10')
        >>> [note for note in notes if "trainer.devices" in note]
        ['  trainer.devices: 8 -> 1']
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    from .config import config_from_dict

    folder = Path(config.out).expanduser()
    data_dir = Path(data_dir if data_dir is not None else folder / SMOKE_DATA).expanduser()
    data_dir = data_dir.resolve()
    refuse_real_folder(data_dir.parent)
    smoke = config_from_dict(config_to_dict(config))  # a copy
    smoke.smoke = True
    notes = [
        f"smoke run: {steps} steps of a tiny stand-in on 1 CPU process, to check the setup "
        "(its numbers are not results). Changed:"
    ]
    m, s, data = smoke.model, smoke.structure, smoke.data
    why: list[str] = []
    if m.name in ("vit", "mixer"):
        m.dim, m.depth = 16, 1
        if m.name == "vit":
            m.heads = 2
    elif m.name == "timm":
        import timm

        if not timm.is_model(m.source):
            raise ValueError(
                f"model.source={m.source!r} is not a timm architecture name; a smoke run "
                "builds the architecture without downloading: give model.source=NAME"
            )
        m.pretrained, m.image_size = False, min(m.image_size, 32)
        family = timm.models.model_entrypoint(m.source).__module__.rsplit(".", 1)[-1]
        if family in ("vision_transformer", "deit"):
            m.kwargs = {**m.kwargs, "img_size": m.image_size, "embed_dim": 32, "depth": 2}
            m.kwargs["num_heads"] = 2
    elif m.name == "torchvision":
        m.pretrained, m.image_size = False, min(m.image_size, 32)
    if m.name == "hf-causal-lm":
        from .text import load_tokenizer

        model_type, found = _hf_model_type(m.source)
        if model_type != m.source:
            why.append(f"model type {model_type!r}: {found}")
        tokenizer = data.tokenizer
        if tokenizer != "bytes" and not Path(tokenizer).expanduser().exists():
            cached = _hf_cached(tokenizer, "tokenizer.json")
            data.tokenizer = cached or "bytes"
            where = "from the Hugging Face cache" if cached else "not in the Hugging Face cache"
            why.append(f"tokenizer {tokenizer!r} {where} (smoke runs download nothing)")
        seq_len = min(data.seq_len, _SMOKE_SEQ_LEN)
        if data.eval_stride is not None:
            data.eval_stride = max(1, round(data.eval_stride * seq_len / data.seq_len))
        data.seq_len = seq_len
        vocab = load_tokenizer(data.tokenizer).vocab_size
        m.source, m.pretrained = model_type, False
        m.kwargs = _tiny_hf_kwargs(model_type, vocab, seq_len)
    if _real_data(smoke):
        why.append(f"data: the real {data.name} data, its first samples only")
    else:
        where = data.root or "the Hugging Face hub (not downloaded in a smoke run)"
        root = data_dir / data.name
        wrote = _write_standin(smoke, root)
        data.root, data.download = str(root), False
        if data.name == "folder":
            data.root, data.val_root = str(root / "train"), str(root / "val")
        why.append(f"data: no {data.name} data at {where}; stand-in at {root}: {wrote}")
    if s.init == "search":
        s.search_steps = 0
        if m.name == "torchvision" or (m.name == "timm" and "depth" not in m.kwargs):
            first = _first_block(smoke)
            if first:
                s.include = first
                why.append("structure: searching every layer of this model takes minutes")
    optim, learner, trainer = smoke.optim, smoke.learner, smoke.trainer
    scale = steps / (optim.epochs if optim.epochs is not None else optim.steps)
    validates = trainer.val_every is not None or optim.epochs is not None
    optim.epochs, optim.steps = None, steps
    optim.batch_size = min(optim.batch_size, _SMOKE_BATCH)
    optim.warmup *= scale  # durations are in run units: now steps
    learner.sigma_start *= scale
    if learner.budget_ramp is not None:
        learner.budget_ramp *= scale
    trainer.accelerator, trainer.devices, trainer.num_nodes = "cpu", 1, 1
    trainer.strategy, trainer.precision = "auto", "32-true"
    trainer.log_every_n_steps, trainer.checkpoint_every_n_steps = 1, steps
    trainer.val_every = float(steps) if validates else None
    data.num_workers = 0
    smoke = config_from_dict(config_to_dict(smoke))  # checked like any config
    before, after = _flat(config_to_dict(config)), _flat(config_to_dict(smoke))
    for key, value in after.items():
        if key != "smoke" and before.get(key) != value:
            notes.append(f"  {key}: {_shown(before.get(key))} -> {_shown(value)}")
    notes += [f"  ({reason})" for reason in why]
    return smoke, notes
