"""``gblr train``: one training run from a config, written to its own folder.

The run folder (``config.out``) holds ``config.yaml`` (the resolved config),
``checkpoints/last.ckpt`` (resumable), ``metrics.csv`` and/or ``tensorboard/``,
``model_state.pt``, ``results.json`` and ``REPORT.md`` with its figures.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig, config_to_dict

__all__ = [
    "build_datasets",
    "build_model",
    "build_structured_model",
    "data_shape",
    "model_from_run",
    "run_length",
    "train_from_config",
]


def build_datasets(config: TrainConfig) -> tuple[Any, Any, int, int]:
    """``(train, test, in_chans, num_classes)`` for ``config.data``."""
    from .data import digits, image_folder, load_cifar

    data = config.data
    if data.name == "digits":
        train, test = digits(seed=config.seed, image_size=config.model.image_size)
        return train, test, 1, 10
    if data.name in ("cifar10", "cifar100"):
        classes = 10 if data.name == "cifar10" else 100
        train = load_cifar(data.root, train=True, classes=classes, augment=data.augment)
        test = load_cifar(data.root, train=False, classes=classes)
        return train, test, 3, classes
    train = image_folder(data.root, config.model.image_size, train=True)
    if data.val_root is None:
        raise ValueError("data.val_root must name the validation image folder")
    test = image_folder(data.val_root, config.model.image_size, train=False)
    if test.classes != train.classes:
        raise ValueError(
            f"data.val_root {data.val_root} has other classes than data.root {data.root}"
        )
    return train, test, 3, len(train.classes)


def data_shape(config: TrainConfig) -> tuple[int, int]:
    """``(in_chans, num_classes)`` of ``config.data`` without reading the images."""
    name = config.data.name
    if name in ("digits", "cifar10", "cifar100"):
        return {"digits": (1, 10), "cifar10": (3, 10), "cifar100": (3, 100)}[name]
    root = Path(config.data.root or "")
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root} (data.root): cannot count classes")
    return 3, sum(1 for child in root.iterdir() if child.is_dir())


def model_from_run(source: str | Path) -> tuple[nn.Module, str, torch.Tensor]:
    """The model of a run folder (``config.yaml`` + ``model_state.pt``), of a Lightning
    checkpoint written by ``gblr train``, or of a config (its starting structure).

    Returns:
        ``(model, what, example)``: the model with its trained state when there is one,
        a phrase saying which it is, and one example input image ``(1, C, S, S)``.

    Raises:
        FileNotFoundError: nothing of the kind at ``source``.
        ValueError: a checkpoint without the config that made it.
    """
    from .config import config_from_dict, load_config
    from .report import STATE_FILE, load_state

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
        state = load_state(path)
        what = f"checkpoint {path} (step {checkpoint.get('global_step', '?')})"
    else:
        config = load_config(path)
        what = f"config {config.name} (starting structure, untrained)"
    in_chans, num_classes = data_shape(config)
    model = build_structured_model(config, in_chans, num_classes)
    example = torch.zeros(1, in_chans, config.model.image_size, config.model.image_size)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise ValueError(
                f"the weights of {what} do not fit the model its config builds: {first[:300]}"
            ) from None
    return model, what, example


def build_model(config: TrainConfig, in_chans: int, num_classes: int) -> nn.Module:
    """The dense network of ``config.model`` (structure is applied separately)."""
    from .models import MlpMixer, VisionTransformer

    m = config.model
    if m.name == "vit":
        return VisionTransformer(
            m.image_size,
            m.patch_size,
            in_chans,
            num_classes,
            m.dim,
            m.depth,
            m.heads,
            m.mlp_ratio,
            m.drop_path,
        )
    return MlpMixer(
        m.image_size,
        m.patch_size,
        in_chans,
        num_classes,
        m.dim,
        m.depth,
        m.token_mlp_ratio,
        m.channel_mlp_ratio,
        m.drop_path,
    )


def build_structured_model(
    config: TrainConfig, in_chans: int, num_classes: int
) -> nn.Module:
    """:func:`build_model` with ``config.structure`` applied (seeded by ``config.seed``)."""
    from .models import structure_model

    torch.manual_seed(config.seed)
    model = build_model(config, in_chans, num_classes)
    kind, budget = config.structure.kind, config.structure.budget
    start = config.structure.start_cost if config.structure.start_cost is not None else budget
    structure_model(
        model,
        kind,
        start if kind == "gblr" else budget,
        include=config.structure.include,
        seed=config.seed,
    )
    return model


def run_length(config: TrainConfig, train_size: int) -> tuple[int, float]:
    """``(total optimizer steps, steps per run unit)``: a unit is an epoch of
    ``train_size`` samples at the global batch size, or one step."""
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
        ``{"accuracy", "macs_ratio", "seconds", "steps", ...}`` as written to
        ``results.json``.
    """
    import yaml

    from .data import batch_mixer
    from .engine import check_resume, train_classifier
    from .report import write_report

    out = Path(config.out).expanduser()
    train_set, test_set, in_chans, num_classes = build_datasets(config)
    model = build_structured_model(config, in_chans, num_classes)
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
    result = train_classifier(
        model,
        train_set,
        test_set,
        steps=steps,
        global_batch_size=optim.batch_size,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        warmup_steps=warmup,
        structure_lr=optim.structure_lr,
        target=config.structure.budget if config.structure.kind == "gblr" else None,
        budget_ramp_steps=ramp,
        sigma=tuple(learner.sigma),
        sigma_schedule=learner.sigma_schedule,
        sigma_start_step=round(learner.sigma_start * unit),
        structure_include=config.structure.include,
        label_smoothing=config.data.label_smoothing,
        batch_mix=batch_mixer(config.data.mixup, config.data.cutmix, num_classes),
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
        **_trainer_options(config),
    )
    result = {"name": config.name, "structure": config.structure.kind, **result}
    if result.pop("global_rank") == 0:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _save_atomically(lambda f: torch.save(state, f), out / "model_state.pt")
        _save_atomically(
            lambda f: json.dump({"config": settings, "result": result}, f, indent=2),
            out / "results.json",
            text=True,
        )
        write_report(out)
    return result
