"""Model surgery shared by the layers that rewrite a model in place (``convert``,
``freeze``, ``export_onnx``, the recipes' checkpoint loading), moving a model's inputs
to a device (``distill``, the structure learner's and the engine's example inputs), and
recognising Hugging Face's ``Conv1D`` without importing transformers.

It sits below every package (torch only, no gblr imports) so that ``compress/``,
``deploy/`` and ``recipes/`` use one helper instead of each keeping a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["hf_conv1d_class", "hf_conv1d_shape", "set_submodule", "to_device"]


def to_device(data: Any, device: torch.device | str) -> Any:
    """``data`` with every tensor in it moved to ``device``: a tensor, a mapping (returned
    as a ``dict``, e.g. from a tokenizer's ``BatchEncoding``), or a tuple or list of them,
    nested; anything else as it is.

    Examples:
        >>> import torch
        >>> from gblr.modules import to_device
        >>> moved = to_device({"ids": torch.zeros(2), "n": 3}, "cpu")
        >>> moved["ids"].device.type, moved["n"]
        ('cpu', 3)
    """
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return {key: to_device(value, device) for key, value in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(to_device(value, device) for value in data)
    return data


def hf_conv1d_class() -> type | None:
    """Hugging Face's ``Conv1D`` class (GPT-2's linear layer), or ``None`` without
    transformers.

    Examples:
        >>> from gblr.modules import hf_conv1d_class
        >>> hf_conv1d_class() is None or hf_conv1d_class().__name__ == "Conv1D"
        True
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def hf_conv1d_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of a Hugging Face ``Conv1D`` (GPT-2's linear layer, weight stored
    ``(in, out)``), else ``None``. Recognised by its class name and its ``nf`` (output
    size) attribute, so that counting a model's layers does not import transformers.

    Examples:
        >>> import torch
        >>> from gblr.modules import hf_conv1d_shape
        >>> hf_conv1d_shape(torch.nn.Linear(4, 3)) is None
        True
    """
    if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    return int(weight.shape[1]), int(weight.shape[0])


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (as ``named_modules`` names it).

    The parent must exist; the child is set with ``setattr``, so it is added when missing
    and replaced when present (inside an ``nn.Sequential`` or ``nn.ModuleList`` too, whose
    children are named by their index). Unlike ``nn.Module.set_submodule`` of recent
    PyTorch versions, it works on every supported version and does not check the type of
    what it replaces.

    Args:
        model: the model to change in place.
        name: a dotted submodule name, e.g. ``"blocks.0.qkv"``; not empty.
        module: the new submodule.

    Raises:
        AttributeError: a parent on the path does not exist.

    Examples:
        >>> import torch
        >>> from gblr.modules import set_submodule
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> set_submodule(model, "0", torch.nn.Identity())
        >>> type(model[0]).__name__
        'Identity'
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
