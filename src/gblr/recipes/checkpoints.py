"""The engine's checkpoints: what they record, reading one without running code, and
the checks before a run resumes from one (same structure, same config); and the
metrics file kept whole across a resume.

[`gblr.recipes.engine.ClassificationModule`][] and
[`CausalLMModule`][gblr.recipes.engine.CausalLMModule] write the record
([`CHECKPOINT_KEY`][gblr.recipes.checkpoints.CHECKPOINT_KEY]);
[`gblr.recipes.engine.train_module`][] runs these checks before it resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_KEY",
    "check_checkpoint_structure",
    "check_resume",
    "layer_types",
    "load_state",
    "read_checkpoint",
]

CHECKPOINT_KEY = "gblr"

#: A run folder's trained model: ``torch.save(model.state_dict())``.
STATE_FILE = "model_state.pt"


def checkpoint_model_state(checkpoint: dict, prefix: str = "model.") -> dict[str, Tensor]:
    """The model's state dict inside a Lightning checkpoint of the recipes' modules (which
    hold the model as ``self.model``, so its tensors sit under ``"model."``)."""
    return {
        key[len(prefix) :]: value
        for key, value in checkpoint.get("state_dict", {}).items()
        if key.startswith(prefix)
    }


def read_tensor_file(path: str | Path, what: str, expected: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and
    containers only, so a file cannot run code; any failure is one ``ValueError`` that
    names ``what`` was read, the file and the reason, and says the file is not
    ``expected``.

    Examples:
        >>> import os, tempfile
        >>> from gblr.recipes.checkpoints import read_tensor_file
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> _ = open(path, "wb").write(b"garbage")
        >>> try:
        ...     read_tensor_file(path, "the model state", "a state dict")
        ... except ValueError as error:
        ...     print(str(error)[:30])
        cannot read the model state /...
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a bad file; one answer here
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"cannot read {what} {path} ({reason[:200]}): it is truncated, corrupt or not "
            f"{expected}; only tensors, numbers and strings are read from such a file"
        ) from None


def load_state(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a file (``torch.save(model.state_dict())`` or a Lightning
    checkpoint of the recipes), or from ``STATE_FILE`` in a run folder.

    Examples:
        >>> from gblr.recipes.models import VisionTransformer, structure_model
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> _ = structure_model(model, "gblr", 0.5)
        >>> import os, tempfile
        >>> import torch
        >>> from gblr.recipes.checkpoints import load_state
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> torch.save(model.state_dict(), path)
        >>> sorted(load_state(path)) == sorted(model.state_dict())
        True
        >>> try:
        ...     load_state(tempfile.mkdtemp())  # a folder without model_state.pt
        ... except FileNotFoundError as error:
        ...     print(type(error).__name__)
        FileNotFoundError
    """
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no model state at {path}: give a file saved with torch.save(model.state_dict()) "
            f"or a run folder holding {STATE_FILE} (gblr demo writes one per model)"
        )
    state = read_tensor_file(path, "the model state", "a state dict")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = checkpoint_model_state(state)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor)")
    return state


def layer_types(model: nn.Module) -> dict[str, str]:
    """Class name of every module that holds parameters of its own, by module name.

    Examples:
        >>> from gblr.recipes.checkpoints import layer_types
        >>> from gblr.recipes.models import VisionTransformer
        >>> types = layer_types(VisionTransformer(dim=16, depth=1, heads=2))
        >>> types["patch"], types["blocks.0.qkv"], types["head"], len(types)
        ('Conv2d', 'Linear', 'Linear', 10)
    """
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }


def check_checkpoint_structure(
    checkpoint: dict[str, Any], model: nn.Module, path: str | Path, prefix: str = "model."
) -> None:
    """Refuse a Lightning checkpoint whose model does not have ``model``'s structure.

    Compares the layer types recorded by `ClassificationModule` (or
    `CausalLMModule`) at save time, then the tensor names and shapes.

    Raises:
        ValueError: naming the first layers that differ and what each side has.

    Examples:
        >>> import os, tempfile
        >>> import torch
        >>> from gblr.recipes.data import digits
        >>> from gblr.recipes.checkpoints import check_checkpoint_structure, read_checkpoint
        >>> from gblr.recipes.engine import EngineConfig, train_classifier
        >>> from gblr.recipes.models import VisionTransformer
        >>> folder = tempfile.mkdtemp()
        >>> config = EngineConfig(
        ...     steps=1, batch_size=8, logger=None, progress=False, out_dir=folder,
        ...     checkpoint_dir=folder,
        ... )
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> _ = train_classifier(model, digits()[0], None, config)
        >>> path = os.path.join(folder, "last.ckpt")
        >>> checkpoint = read_checkpoint(path)
        >>> same, wider = (VisionTransformer(dim=d, depth=1, heads=2) for d in (16, 32))
        >>> check_checkpoint_structure(checkpoint, same, path)
        >>> try:
        ...     check_checkpoint_structure(checkpoint, wider, path)
        ... except ValueError as error:
        ...     print(type(error).__name__)
        ValueError
    """
    record = checkpoint.get(CHECKPOINT_KEY, {})
    saved_types = record.get("layer_types")
    if saved_types is not None:
        current = layer_types(model)
        differing = [
            f"{name!r} is {saved_types.get(name, 'absent')} there, "
            f"{current.get(name, 'absent')} here"
            for name in sorted(set(saved_types) | set(current))
            if saved_types.get(name) != current.get(name)
        ]
        if differing:
            saved_kind = record.get("structure", "unknown")
            raise ValueError(
                f"checkpoint {path} holds a model of another structure (saved: "
                f"{saved_kind!r}); {len(differing)} layers differ, e.g. "
                + "; ".join(differing[:3])
                + ". Resume with the config that wrote it, or start a new run (another out "
                "folder)."
            )
    state = checkpoint_model_state(checkpoint, prefix)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [
        f"{key}: {tuple(state[key].shape)} there, {tuple(value.shape)} here"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if reshaped:
            parts.append(f"other shapes {reshaped[:3]}")
        raise ValueError(
            f"checkpoint {path} does not fit this model ({'; '.join(parts)}): it was saved "
            "from a model of another structure or size"
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of the engine, read without running code: tensors, numbers,
    strings and containers only (``torch.load(weights_only=True)``), on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not such a checkpoint (truncated, corrupt, another
            format, or a pickle that would build other objects, which is not run).

    Examples:
        >>> import os, tempfile
        >>> from gblr.recipes.checkpoints import read_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "last.ckpt")
        >>> with open(path, "wb") as handle:
        ...     _ = handle.write(b"not a checkpoint")
        >>> try:
        ...     read_checkpoint(path)
        ... except ValueError as error:
        ...     print("not a checkpoint written by gblr's training" in str(error))
        True
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    what = "a checkpoint written by gblr's training"
    checkpoint = read_tensor_file(path, "the checkpoint", what)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"cannot read the checkpoint {path} (no state_dict in it): it is truncated, "
            "corrupt or not a checkpoint written by gblr's training"
        )
    return checkpoint


def check_resume(path: str | Path, model: nn.Module, config: dict[str, Any] | None = None) -> int:
    """Refuse to resume ``model`` from ``path`` when the file is missing, unreadable (see
    [`read_checkpoint`][gblr.recipes.checkpoints.read_checkpoint]), holds a model of another
    structure (see
    [`check_checkpoint_structure`][gblr.recipes.checkpoints.check_checkpoint_structure]) or, given
    the run's ``config`` (as [`gblr.recipes.config.config_to_dict`][] writes it), was written with
    another config in anything but `gblr.recipes.config.RESUME_MAY_CHANGE`.

    Returns:
        The optimizer step the checkpoint was saved at.

    Examples:
        A 2-step run that saves ``last.ckpt``, then a model of another structure refused:

        >>> import os, tempfile
        >>> from gblr.recipes.data import digits
        >>> from gblr.recipes.checkpoints import check_resume
        >>> from gblr.recipes.engine import EngineConfig, train_classifier
        >>> from gblr.recipes.models import VisionTransformer, structure_model
        >>> train, _ = digits()
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> _ = structure_model(model, "gblr", 0.5)
        >>> folder = tempfile.mkdtemp()
        >>> config = EngineConfig(
        ...     steps=2, batch_size=8, logger=None, progress=False, out_dir=folder,
        ...     checkpoint_dir=folder,
        ... )
        >>> _ = train_classifier(model, train, None, config)
        >>> check_resume(os.path.join(folder, "last.ckpt"), model)
        2
        >>> dense = VisionTransformer(dim=16, depth=1, heads=2)
        >>> try:
        ...     check_resume(os.path.join(folder, "last.ckpt"), dense)
        ... except ValueError as error:
        ...     print(str(error).split(";")[1].strip())
        4 layers differ, e.g. 'blocks.0.fc1' is GBLRLinear there, Linear here
    """
    checkpoint = read_checkpoint(path)
    check_checkpoint_structure(checkpoint, model, path)
    if config is not None:
        from .config import resume_changes

        saved = checkpoint.get(CHECKPOINT_KEY, {}).get("config")
        if not isinstance(saved, dict):
            raise ValueError(
                f"checkpoint {path} holds no gblr config (not written by gblr train): "
                "cannot check that it is this run's"
            )
        changes = resume_changes(saved, config)
        if changes:
            raise ValueError(
                f"checkpoint {path} was written with another config; a resumed run "
                "continues the checkpoint's optimizer, schedule and model, so these "
                f"changes would not take effect: {'; '.join(changes[:6])}"
                + (f" (and {len(changes) - 6} more)" if len(changes) > 6 else "")
                + ". Resume with the checkpoint's settings, or start a new run "
                "(--overwrite, or another --out)."
            )
    return int(checkpoint.get("global_step", 0))


_METRICS, _METRICS_BEFORE_RESUME = "metrics.csv", "metrics.before-resume.csv"


def _set_aside_metrics(out_dir: Path) -> None:
    """Lightning's CSV logger deletes ``metrics.csv`` when it starts; on resume, keep the
    rows written so far next to it until [`_merge_metrics`][gblr.recipes.checkpoints._merge_metrics]
    puts them back."""
    current, kept = out_dir / _METRICS, out_dir / _METRICS_BEFORE_RESUME
    if current.is_file() and not kept.is_file():
        current.replace(kept)


def _merge_metrics(out_dir: Path, resumed_step: int) -> None:
    """``metrics.csv`` = the rows before ``resumed_step`` from before the resume, then the
    resumed run's rows (columns united)."""
    import csv

    from ..files import save_atomically

    kept, current = out_dir / _METRICS_BEFORE_RESUME, out_dir / _METRICS
    if not kept.is_file():
        return
    rows: list[dict[str, str]] = []
    with open(kept, newline="") as handle:
        rows += [r for r in csv.DictReader(handle) if int(float(r["step"])) < resumed_step]
    if current.is_file():
        with open(current, newline="") as handle:
            rows += list(csv.DictReader(handle))
    columns = sorted({key for row in rows for key in row})

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    save_atomically(write, current, text=True)
    kept.unlink()
