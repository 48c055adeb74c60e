"""Shared by the framework adapters: build the learner lazily, once the run's length is known."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn

from ..learn.arguments import BUDGET_ALIASES, check_budget_arguments, resolve_deprecated
from ..learn.config import DEPRECATED_OPTIONS, LearnerConfig
from ..learn.learner import StructureLearner


def build_learner(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    total_steps: int,
    learner_kwargs: dict[str, Any],
) -> StructureLearner:
    kwargs = dict(learner_kwargs)
    if "total_steps" not in kwargs:
        if not math.isfinite(total_steps):
            raise ValueError(
                f"the trainer's run has no fixed length (its step count is {total_steps}: "
                "no max_steps and no max_epochs): give the callback total_steps=, the steps "
                "over which the learner ramps the budget and anneals"
            )
        kwargs["total_steps"] = max(1, int(total_steps))
    if kwargs.get("lam") is not None and "structure_lr" not in kwargs:
        kwargs.setdefault("optimizer", optimizer)
    return StructureLearner(model, **kwargs)


def check_learner_model(learner: StructureLearner, model: nn.Module, caller: str) -> None:
    """``ValueError`` when a learner given to ``caller`` does not step ``model``'s layers:
    it would go on moving another model's structure while this one trains as it is."""
    if not learner.steps_layers_of(model):
        raise ValueError(
            f"{caller}: its learner was built on another model than the one being trained; "
            "give a learner built on this model, or the learner's keyword arguments "
            "(budget=, ...) so that the callback builds one for each run"
        )


def warn_if_structure_not_trained(
    learner: StructureLearner, optimizer: torch.optim.Optimizer | None, caller: str
) -> None:
    """A ``UserWarning`` when ``optimizer`` holds none of the learner's widths: then only
    the budget's cut moves them, and the structure is not learned (λ mode refuses such an
    optimizer at its first step)."""
    if optimizer is None:
        return
    held = {id(param) for group in optimizer.param_groups for param in group["params"]}
    if not any(id(layer.widths) in held for layer in learner.layers):
        warnings.warn(
            f"{caller}: the optimizer holds none of the GBLR widths and locations, so the "
            "structure is not learned (only the budget's cut moves it); build it over "
            "gblr.param_groups(model, lr=...)",
            UserWarning,
            stacklevel=3,
        )


def log_items(learner: StructureLearner, prefix: str = "gblr/") -> dict[str, float]:
    return {f"{prefix}{key}": float(value) for key, value in learner.summary().items()}


def _learner_keywords() -> list[str]:
    parameters = inspect.signature(StructureLearner.__init__).parameters
    return [
        name
        for name, parameter in parameters.items()
        if name not in ("self", "model") and parameter.kind != parameter.VAR_KEYWORD
    ]


def check_learner_arguments(
    learner: StructureLearner | None, learner_kwargs: dict[str, Any], caller: str
) -> dict[str, Any]:
    """Check what a callback was given, when it is given: the learner itself is built only
    when training starts, and a misspelt keyword or a wrong budget should not wait for
    that. Returns the keyword arguments in their current form: deprecated ones become a
    ``config`` and ``budget``/``budget_macs``, with a ``FutureWarning`` naming ``caller``,
    so that the learner built later warns no more."""
    if learner is not None and learner_kwargs:
        raise ValueError("give either learner or learner keyword arguments, not both")
    if learner is None and not learner_kwargs:
        raise ValueError("give a learner, or its keyword arguments (budget=, budget_macs= or lam=)")
    if learner is not None:
        if not isinstance(learner, StructureLearner):
            raise TypeError(
                f"learner must be a gblr.StructureLearner, got {type(learner).__name__}"
            )
        return {}
    allowed = _learner_keywords()
    deprecated = [*BUDGET_ALIASES, *DEPRECATED_OPTIONS]
    unknown = sorted(set(learner_kwargs) - set(allowed) - set(deprecated))
    if unknown:
        raise TypeError(
            f"unknown StructureLearner keyword argument(s) {unknown}; allowed: {allowed} "
            f"(deprecated: {deprecated})"
        )
    config = learner_kwargs.get("config")
    if config is not None and not isinstance(config, LearnerConfig):
        raise TypeError(f"config must be a gblr.LearnerConfig or None, got {config!r}")
    check_budget_arguments(learner_kwargs)
    rest = {key: value for key, value in learner_kwargs.items() if key != "config"}
    # resolve_deprecated <- this function <- the callback's __init__ <- its caller
    config, rest = resolve_deprecated(config, rest, caller=caller, stacklevel=4)
    return rest if config is None else {"config": config, **rest}
