"""Optimizer parameter groups that treat GBLR structure parameters apart.

See docs/design.md#learning-the-structure.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..layers.base import GBLRMatrixMixin

__all__ = ["STRUCTURE_BETAS", "adamw", "gblr_layers", "param_groups"]

# The paper trains widths and locations with Adam without momentum: betas (0, 0.999).
STRUCTURE_BETAS = (0.0, 0.999)


def gblr_layers(model: nn.Module) -> list[tuple[str, GBLRMatrixMixin]]:
    """``(name, layer)`` for every GBLR layer in ``model`` (the model itself included)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GBLRMatrixMixin)]


def check_rate(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a float when it is a finite number > 0 (``>= 0`` with ``allow_zero``):
    a learning rate or a weight decay; else a TypeError/ValueError naming it.

    Examples:
        >>> from gblr.learn.groups import check_rate
        >>> check_rate("lr", 3e-4)
        0.0003
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return float(value)


def param_groups(
    model: nn.Module,
    lr: float,
    structure_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Parameter groups for any ``torch.optim`` optimizer.

    - ``"decay"``: every trainable parameter of 2 or more dimensions (weights, GBLR
      factors), learning rate ``lr``, weight decay ``weight_decay``;
    - ``"no_decay"``: biases and normalisation parameters (1-D), no weight decay — the
      usual timm/Hugging Face convention;
    - ``"structure"``: GBLR ``widths`` and ``locations``, learning rate ``structure_lr``
      (default ``lr``), no weight decay, and Adam betas ``(0, 0.999)`` as in the paper
      (optimizers without ``betas`` ignore the key). Those that a structure learner's
      final phase fixed are included: the next learner built on the model gives them
      their gradient back (parameters you set to ``requires_grad=False`` are left out).

    Empty groups are left out. Shared parameters appear once.

    Args:
        model: any module.
        lr: learning rate of the weights.
        structure_lr: learning rate of widths and locations (default ``lr``; 0 keeps the
            structure where it is while the factors train).
        weight_decay: weight decay of the ``"decay"`` group.

    Returns:
        A list of dicts with keys ``params``, ``lr``, ``weight_decay``, ``name`` (and
        ``betas`` for the structure group), ready for ``torch.optim.AdamW(groups)``.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(gblr.GBLRLinear(8, 8))
        >>> opt = torch.optim.AdamW(gblr.param_groups(model, lr=1e-3, structure_lr=1e-2))
        >>> print(*(g["name"] for g in opt.param_groups))
        decay no_decay structure
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lr = check_rate("lr", lr)
    structure_lr = (
        lr if structure_lr is None else check_rate("structure_lr", structure_lr, allow_zero=True)
    )
    weight_decay = check_rate("weight_decay", weight_decay, allow_zero=True)

    layers = [layer for _, layer in gblr_layers(model)]
    structure_ids = {id(p) for layer in layers for p in (layer.widths, layer.locations)}
    # fixed by a structure learner's final phase, not by the user: the next learner built
    # on the model gives them their gradient back, so the optimizer must hold them
    fixed_by_learner = {
        id(p)
        for layer in layers
        if getattr(layer, "structure_fixed_by_learner", False)
        for p in (layer.widths, layer.locations)
    }
    seen: set[int] = set()
    decay, no_decay, structure = [], [], []
    for param in model.parameters():
        skipped = not param.requires_grad and id(param) not in fixed_by_learner
        if skipped or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in structure_ids:
            structure.append(param)
        elif param.dim() >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        {
            "params": structure,
            "lr": structure_lr,
            "weight_decay": 0.0,
            "betas": STRUCTURE_BETAS,
            "name": "structure",
        },
    ]
    return [group for group in groups if group["params"]]


def adamw(groups: Iterable[dict[str, Any]] | Iterable[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW over ``groups`` (as [`param_groups`][gblr.param_groups] returns them) with torch's
    fused kernel, or its multi-tensor ``foreach`` form where the fused one does not take
    every parameter (the CPU before torch 2.4).

    The fused kernel makes one pass over each tensor where the default AdamW on the CPU
    makes about ten, and a GBLR layer's factors are full length for every component: on
    the real tasks' pixel MLP it took the AdamW step from 4.8 to 0.8 ms
    (docs/BENCHMARKS.md, "Held strips and a fused AdamW"). Its results differ from the
    other forms in the last bits. The training engine and [`gblr.distill`][] use it.

    Examples:
        >>> import torch, gblr
        >>> from gblr.learn.groups import adamw
        >>> model = torch.nn.Sequential(gblr.GBLRLinear(8, 8), torch.nn.Linear(8, 2))
        >>> optimizer = adamw(gblr.param_groups(model, lr=1e-3))
        >>> optimizer.defaults["fused"] or optimizer.defaults["foreach"]
        True
    """
    groups = list(groups)
    try:
        return torch.optim.AdamW(groups, fused=True)
    except RuntimeError:  # a device or dtype the fused kernel does not take
        return torch.optim.AdamW(groups, foreach=True)
