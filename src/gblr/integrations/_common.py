"""Shared by the framework adapters: build the learner lazily, once the run's length is known."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..cost import check_fraction_budget
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


def _learner_keywords() -> list[str]:
    parameters = inspect.signature(StructureLearner.__init__).parameters
    return [name for name in parameters if name not in ("self", "model")]


def check_learner_arguments(learner: StructureLearner | None, learner_kwargs: dict) -> None:
    """Check what a callback was given, when it is given: the learner itself is built only
    when training starts, and a misspelt keyword or a wrong budget should not wait for
    that."""
    if learner is not None and learner_kwargs:
        raise ValueError("give either learner or learner keyword arguments, not both")
    if learner is None and not learner_kwargs:
        raise ValueError("give a learner, or its keyword arguments (target=, target_macs= or lam=)")
    if learner is not None:
        if not isinstance(learner, StructureLearner):
            raise TypeError(
                f"learner must be a gblr.StructureLearner, got {type(learner).__name__}"
            )
        return
    allowed = _learner_keywords()
    unknown = sorted(set(learner_kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"unknown StructureLearner keyword argument(s) {unknown}; allowed: {allowed}"
        )
    budgets = [n for n in ("target", "target_macs", "lam") if learner_kwargs.get(n) is not None]
    if len(budgets) != 1:
        raise ValueError(
            "give exactly one of target (budget mode, a fraction of the dense MACs), "
            f"target_macs (budget mode, a MAC count) and lam (λ mode), got {budgets or 'none'}"
        )
    if budgets[0] != "lam":
        check_fraction_budget(learner_kwargs.get("target"), learner_kwargs.get("target_macs"))
