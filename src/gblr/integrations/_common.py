"""Shared by the framework adapters: build the learner lazily, once the run's length is known."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..learn.learner import StructureLearner


def build_learner(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    total_steps: int,
    learner_kwargs: dict[str, Any],
) -> StructureLearner:
    kwargs = dict(learner_kwargs)
    kwargs.setdefault("total_steps", max(1, int(total_steps)))
    if kwargs.get("lam") is not None and "structure_lr" not in kwargs:
        kwargs.setdefault("optimizer", optimizer)
    return StructureLearner(model, **kwargs)


def log_items(learner: StructureLearner, prefix: str = "gblr/") -> dict[str, float]:
    return {f"{prefix}{key}": float(value) for key, value in learner.summary().items()}


def check_learner_arguments(learner: StructureLearner | None, learner_kwargs: dict) -> None:
    if learner is not None and learner_kwargs:
        raise ValueError("give either learner or learner keyword arguments, not both")
    if learner is None and not learner_kwargs:
        raise ValueError("give a learner, or its keyword arguments (target= or lam=)")
