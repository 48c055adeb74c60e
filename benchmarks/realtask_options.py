"""The GBLR options a variant of a from-scratch real task may set (``--variant NAME=JSON``
of benchmarks/realtasks.py), split into where they go; shared by T1 and T2.

Keys: ``start_cost_ratio`` (starting cost as a multiple of the budget, at most 1),
``structure`` (keywords of ``gblr.recipes.models.structure_model``), the engine's
``structure_lr``, ``sigma_start_step``, ``weight_decay`` and ``budget_ramp_steps`` (steps
of the budget's ramp from the start down to the budget; default: the task's warm-up), the
learner's deprecated keywords (``sigma``, ``sigma_schedule`` at the top level, the rest
under ``learner``, as a recipe's learner section names them) and ``learner_config``
(``gblr.LearnerConfig`` fields that have no such keyword, e.g. ``exact_from``), and
``probe`` (T1 only: ``gblr.recipes.start_probe.StartProbe`` fields, ``{}`` for its
defaults; the run then picks its start with
``gblr.recipes.start_probe.train_classifier_probing_start`` between the start the other
options describe and the learned start).
"""

from __future__ import annotations

import dataclasses
from typing import Any

ENGINE_OPTIONS = ("structure_lr", "sigma_start_step", "weight_decay", "budget_ramp_steps")
LEARNER_OPTIONS = ("sigma", "sigma_schedule")


@dataclasses.dataclass(frozen=True)
class ScratchOptions:
    """``start_cost`` of GBLR layers, ``structure`` and ``engine`` keywords, ``learner``,
    ``probe`` (``StartProbe`` fields, or None for no probe)."""

    start_cost: float
    structure: dict[str, Any]
    engine: dict[str, Any]
    learner: Any  # gblr.LearnerConfig
    probe: dict[str, Any] | None = None


def scratch_options(options: dict[str, Any], budget: float, task: str) -> ScratchOptions:
    """Split a variant's ``options`` for a run at ``budget``; an unknown key is a
    ``ValueError`` naming ``task``."""
    from gblr.learn.config import DEPRECATED_OPTIONS, LearnerConfig, config_from_options
    from gblr.recipes.models import gblr_start_cost

    options = dict(options)
    ratio = options.pop("start_cost_ratio", None)
    start_cost = gblr_start_cost(budget, None if ratio is None else min(1.0, ratio * budget))
    structure = options.pop("structure", {})
    engine = {name: options.pop(name) for name in ENGINE_OPTIONS if name in options}
    learner_options = {name: options.pop(name) for name in LEARNER_OPTIONS if name in options}
    learner_options.update(options.pop("learner", {}))
    learner_fields = options.pop("learner_config", {})
    probe = options.pop("probe", None)
    if options:
        raise ValueError(f"unknown GBLR options for {task}: {sorted(options)}")
    # A variant's learner keywords set only their own fields of the library's default
    # LearnerConfig (config_from_options would start from the paper's method); until
    # 2026-12-06 a variant without "sigma" ran the paper's σ schedule and no held sides,
    # the default then (the "note" of each recorded row says on which code it ran).
    given = config_from_options(learner_options)
    # The field each keyword sets: the left of its replacement, "shift_limit=..." for both
    # max_shift keywords.
    fields = {
        field: getattr(given, field)
        for field in (DEPRECATED_OPTIONS[option].split("=")[0] for option in learner_options)
    }
    learner = dataclasses.replace(LearnerConfig(), **fields, **learner_fields)
    return ScratchOptions(start_cost, structure, engine, learner, probe)
