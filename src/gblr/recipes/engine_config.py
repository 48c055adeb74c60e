"""What one run of the training engine does:
[`EngineConfig`][gblr.recipes.engine_config.EngineConfig], the config that
[`gblr.recipes.engine.train_classifier`][],
[`train_language_model`][gblr.recipes.engine.train_language_model] and
[`train_module`][gblr.recipes.engine.train_module] take (issue 21: a config object, not two dozen
keywords), and the reading of the keywords they took before it.

Everything in it is data (numbers, names, paths): what a run needs at run time that is
not data (a batch mixer, callbacks, the ``before_fit`` hook, the checkpoint's
``run_info``) stays a keyword of those functions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..learn.config import LearnerConfig
from .config import COMPILE_MODES

__all__ = ["ENGINE_LOGGERS", "EngineConfig", "engine_config_from_keywords"]

ENGINE_LOGGERS = ("csv", "tensorboard", "both")

# Keywords the engine's functions took before EngineConfig whose field has another name.
_RENAMED = {"target": "budget", "learner_config": "learner"}
# Keywords that never were the engine's: the learner's options are one LearnerConfig.
_LEARNER_KEYWORDS = ("sigma", "sigma_schedule", "learner_options")


def _check_number(
    name: str,
    value: object,
    *,
    minimum: float,
    integer: bool = False,
    above: bool = False,
    optional: bool = False,
) -> None:
    """Raise unless ``value`` is a finite number ``>= minimum`` (``> minimum`` with
    ``above``; an int with ``integer``; None allowed with ``optional``)."""
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    wanted = f"{'an integer' if integer else 'a finite number'} {'>' if above else '>='} {minimum}"
    if optional:
        wanted += " or None"
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"EngineConfig.{name} must be {wanted}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (above and value == minimum):
        raise ValueError(f"EngineConfig.{name} must be {wanted}, got {value!r}")


def _check_patterns(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    listed = [value] if isinstance(value, str) else value
    if not isinstance(listed, (list, tuple)) or not all(isinstance(p, str) for p in listed):
        allowed = "a glob pattern or a list of them" + (" or None" if optional else "")
        raise TypeError(f"EngineConfig.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """One run of the training engine: how long, how it optimizes, how the structure is
    learned, and where it logs and checkpoints. Checked when made; frozen (derive
    another with `dataclasses.replace`).

    Run:
        steps: optimizer steps of the whole run (every schedule spans them).
        batch_size: samples per step and process (a run on ``devices=4`` takes 4 ×
            ``batch_size``); or ``global_batch_size``, split evenly over the processes.
        num_workers: data-loading processes.
        seed: seeds the model's training and the data order.

    Optimizer (AdamW over [`gblr.param_groups`][], linear warm-up then cosine decay):
        lr: peak learning rate of every parameter group.
        min_lr: learning rate at the end of the cosine decay, in ``[0, lr]``.
        weight_decay: of the weight matrices (not biases, norms, structure).
        warmup_steps: linear warm-up from 0 to ``lr``.
        structure_lr: learning rate of widths and locations (default ``lr``:
            `gblr.recipes.engine.STRUCTURE_LR_FACTOR`; 0 keeps the structure fixed).
        label_smoothing: of a classifier's cross-entropy loss (in ``[0, 1)``; 0 for a
            language model).

    Structure learner (for models with GBLR layers, when ``budget`` is given):
        budget: the MACs fraction in (0, 1] of the GBLR layers' dense MACs that the
            learner takes them to (was ``target``).
        budget_ramp_steps: steps over which the cost ramps from the start to ``budget``
            (default ``warmup_steps``; at most ``steps``: a shorter run ramps over itself).
        learner: how it learns, a [`gblr.LearnerConfig`][] (default
            ``LearnerConfig()``, the library's default from scratch: exact masks, the
            block-diagonal start's one-line sides held; was ``learner_config``).
        sigma_start_step: σ anneals from this step on.
        structure_include, structure_exclude: glob patterns of the layers whose MACs
            ratio is reported.

    Outputs and checkpoints:
        val_every_n_steps: validate on the evaluation set this often (None: never).
        out_dir: where the loggers write.
        logger: ``csv`` (``out_dir/metrics.csv``), ``tensorboard``
            (``out_dir/tensorboard``), ``both`` or None (``"none"``).
        progress: show a progress bar.
        checkpoint_dir: with it, Lightning saves ``last.ckpt`` there every
            ``checkpoint_every_n_steps`` and at the end.
        resume: a checkpoint to continue (checked first: same structure, and the same
            config when the run's ``run_info`` holds one).
        stop_after: end at this step while every schedule still spans ``steps`` (an
            interruption).
        compile_mode: ``torch.compile`` the model in place with this mode, or None.
        trainer: other ``lightning.Trainer`` options (``accelerator`` (default
            ``"cpu"``), ``devices``, ``num_nodes``, ``strategy``, ``precision``,
            ``gradient_clip_val``, ...).

    Raises:
        TypeError: a field of the wrong type, or a learner option in ``trainer``.
        ValueError: a field out of range or not one of its choices (each message names
            the field, the value and what is allowed).

    Examples:
        >>> import dataclasses
        >>> from gblr.recipes.engine import EngineConfig
        >>> config = EngineConfig(steps=100, warmup_steps=10, budget=0.3)
        >>> config.lr, config.batch_size, config.trainer
        (0.001, 64, {})
        >>> dataclasses.replace(config, stop_after=50).stop_after
        50
        >>> try:
        ...     EngineConfig(steps=100, budget=1.5)
        ... except ValueError as error:
        ...     print(error)
        EngineConfig.budget must be a fraction in (0, 1] of the dense MACs or None, got 1.5
    """

    steps: int
    batch_size: int = 64
    global_batch_size: int | None = None
    num_workers: int = 0
    seed: int = 0
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_steps: int = 0
    structure_lr: float | None = None
    label_smoothing: float = 0.0
    budget: float | None = None
    budget_ramp_steps: int | None = None
    learner: LearnerConfig | None = None
    sigma_start_step: int = 0
    structure_include: str | list[str] | tuple[str, ...] = "blocks.*"
    structure_exclude: str | list[str] | tuple[str, ...] | None = None
    val_every_n_steps: int | None = None
    out_dir: str | Path | None = None
    logger: str | None = "csv"
    progress: bool = True
    checkpoint_dir: str | Path | None = None
    checkpoint_every_n_steps: int = 50
    resume: str | Path | None = None
    stop_after: int | None = None
    compile_mode: str | None = None
    trainer: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every_n_steps"):
            _check_number(name, getattr(self, name), minimum=1, integer=True)
        for name in ("global_batch_size", "val_every_n_steps", "stop_after"):
            _check_number(name, getattr(self, name), minimum=1, integer=True, optional=True)
        for name in ("num_workers", "seed", "warmup_steps", "sigma_start_step"):
            _check_number(name, getattr(self, name), minimum=0, integer=True)
        _check_number("budget_ramp_steps", self.budget_ramp_steps, minimum=0, integer=True,
                      optional=True)  # fmt: skip
        _check_number("lr", self.lr, minimum=0, above=True)
        _check_number("structure_lr", self.structure_lr, minimum=0, optional=True)
        _check_number("weight_decay", self.weight_decay, minimum=0)
        _check_number("min_lr", self.min_lr, minimum=0)
        if self.min_lr > self.lr:
            raise ValueError(
                f"EngineConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}"
            )
        _check_number("label_smoothing", self.label_smoothing, minimum=0)
        if self.label_smoothing >= 1:
            raise ValueError(
                f"EngineConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}"
            )
        if self.budget is not None and (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, (int, float))
            or not 0 < self.budget <= 1
        ):
            raise ValueError(
                "EngineConfig.budget must be a fraction in (0, 1] of the dense MACs or None, "
                f"got {self.budget!r}"
            )
        if self.learner is not None and not isinstance(self.learner, LearnerConfig):
            raise TypeError(
                f"EngineConfig.learner must be a gblr.LearnerConfig or None, got "
                f"{type(self.learner).__name__}"
            )
        _check_patterns("structure_include", self.structure_include, optional=False)
        _check_patterns("structure_exclude", self.structure_exclude, optional=True)
        if self.logger not in (*ENGINE_LOGGERS, None, "none"):
            raise ValueError(
                f"EngineConfig.logger must be one of {ENGINE_LOGGERS}, 'none' or None, got "
                f"{self.logger!r}"
            )
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {COMPILE_MODES} (torch.compile modes) or None "
                f"for eager mode, got {self.compile_mode!r}"
            )
        if not isinstance(self.trainer, Mapping) or not all(
            isinstance(key, str) for key in self.trainer
        ):
            raise TypeError(
                "EngineConfig.trainer must be a mapping of lightning.Trainer option names to "
                f"values, got {self.trainer!r}"
            )
        learner_keys = sorted(set(_LEARNER_KEYWORDS) & set(self.trainer))
        if learner_keys:  # they would otherwise reach lightning.Trainer, which names no culprit
            raise TypeError(
                f"train_module got {learner_keys}: the learner's options are one "
                "learner_config=gblr.LearnerConfig(sigma=..., sigma_schedule=..., ...) now "
                "(EngineConfig.learner)"
            )
        object.__setattr__(self, "trainer", dict(self.trainer))


_FIELDS = tuple(f.name for f in fields(EngineConfig))


def engine_config_from_keywords(
    caller: str, config: EngineConfig | None, keywords: Mapping[str, Any]
) -> tuple[EngineConfig, list[Any]]:
    """The [`EngineConfig`][gblr.recipes.engine_config.EngineConfig] that ``caller``'s keywords from
    before it mean (with a ``FutureWarning`` naming the replacement), or ``config`` itself when none
    was given.

    ``target`` is ``budget`` and ``learner_config`` is ``learner`` now; ``extra_callbacks``
    are returned apart (the engine's ``callbacks=``); the keywords that are no field go
    to ``trainer`` (``lightning.Trainer``'s options), as they did.

    Returns:
        ``(config, extra callbacks)``.

    Raises:
        TypeError: neither a config nor keywords, or both.

    Examples:
        >>> import warnings
        >>> from gblr.recipes.engine_config import engine_config_from_keywords
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     config, callbacks = engine_config_from_keywords(
        ...         "train_classifier", None, {"steps": 10, "target": 0.3, "devices": 2}
        ...     )
        >>> config.steps, config.budget, config.trainer, callbacks
        (10, 0.3, {'devices': 2}, [])
        >>> str(caught[0].message).split(" is ")[0]
        'train_classifier(steps=..., target=..., devices=...)'
    """
    if not keywords:
        if config is None:
            raise TypeError(f"{caller} needs config=EngineConfig(steps=..., ...)")
        if not isinstance(config, EngineConfig):
            raise TypeError(
                f"{caller}: config must be a gblr.recipes.engine.EngineConfig, got "
                f"{type(config).__name__}"
            )
        return config, []
    named = ", ".join(f"{key}=..." for key in keywords)
    if config is not None:
        raise TypeError(
            f"{caller} got config= and the keywords {sorted(keywords)}: give the run's "
            "settings in the EngineConfig only"
        )
    warnings.warn(
        f"{caller}({named}) is deprecated since gblr 0.2 and will be removed in 0.3; use "
        f"{caller}(model, train_set, eval_set, EngineConfig(...)) (target= is "
        "EngineConfig.budget, learner_config= is EngineConfig.learner, Lightning's options "
        "go in EngineConfig.trainer, extra_callbacks= is callbacks=)",
        FutureWarning,
        stacklevel=3,
    )
    settings = {_RENAMED.get(key, key): value for key, value in keywords.items()}
    callbacks = list(settings.pop("extra_callbacks", None) or [])
    given = {key: settings.pop(key) for key in list(settings) if key in _FIELDS}
    trainer = {**given.pop("trainer", {}), **settings}
    return EngineConfig(**given, trainer=trainer), callbacks
