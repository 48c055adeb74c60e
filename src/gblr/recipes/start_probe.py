"""Choosing how GBLR layers start, from scratch, by a probe on held-out training data.

GBLR's default start (its block-diagonal special case, kept dense while the learner moves
how far each block reaches) wins where local structure pays and loses where a layer must
mix all of its inputs with nothing else in the model to do it; there the learned start
(full-width and block components at 3x the budget, σ annealed, pruned by the learner) is
the better one (docs/RESULTS.md, "Choosing the start"). Which one a task needs shows
early in training, but only on data the model does not train on:
[`train_classifier_probing_start`][gblr.recipes.start_probe.train_classifier_probing_start]
trains every candidate start for the first part of the run's own schedule on most of the
training set, scores them on the rest, and continues the better one, from where its probe
stopped, on the whole training set.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("the training engine needs Lightning: pip install 'gblr[train]'") from error

from ..files import copy_atomically
from ..layers.base import COSTED_STRUCTURE_INITS, FACTOR_INITS
from ..learn.config import LearnerConfig
from ..learn.groups import gblr_layers
from .build import check_structures_some_layer
from .checkpoints import CHECKPOINT_KEY, read_checkpoint
from .engine import EngineConfig, lightning_messages_dropped, topk_hits, train_classifier
from .models import structure_model

__all__ = [
    "BLOCKDIAG_START",
    "LEARNED_START",
    "GBLRStart",
    "StartProbe",
    "challenger_lead",
    "probe_plan",
    "train_classifier_probing_start",
]

#: What the winner's run does after the probe (`StartProbe.then`).
PROBE_THEN = ("continue", "restart")


@dataclass(frozen=True)
class GBLRStart:
    """One way to start GBLR layers for training from scratch.

    Attributes:
        name: what results call it (unique among the starts of a probe).
        structure_init: how every layer's components are laid out
            ([`structure_model`][gblr.recipes.models.structure_model]'s ``structure_init``).
        factor_init: how their factors are drawn (a ``factor_init`` of
            [`gblr.GBLRLinear`][]).
        start_cost_ratio: the starting cost as a multiple of the budget (capped at the
            dense MACs); the learner ramps it down to the budget.
        learner: the [`gblr.LearnerConfig`][] that trains from this start.
        structure_lr_factor: the learning rate of widths and locations as a multiple of
            the weights' (``config.lr``) when the run's ``config.structure_lr`` is None;
            None: the engine's default (`gblr.recipes.engine.STRUCTURE_LR_FACTOR`). A
            rate the run's config names is used by every start.

    Examples:
        >>> from gblr.recipes.start_probe import BLOCKDIAG_START, LEARNED_START
        >>> BLOCKDIAG_START.structure_init, LEARNED_START.start_cost_ratio
        ('blockdiag', 3.0)
        >>> BLOCKDIAG_START.structure_lr_factor, LEARNED_START.structure_lr_factor
        (None, 3.0)
    """

    name: str
    structure_init: str = "blockdiag"
    factor_init: str = "fixed_norm"
    start_cost_ratio: float = 1.0
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    structure_lr_factor: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"GBLRStart.name must be a non-empty string, got {self.name!r}")
        if self.structure_init not in COSTED_STRUCTURE_INITS:
            raise ValueError(
                f"GBLRStart.structure_init must be one of {sorted(COSTED_STRUCTURE_INITS)}, "
                f"got {self.structure_init!r}"
            )
        if self.factor_init not in FACTOR_INITS:
            raise ValueError(
                f"GBLRStart.factor_init must be one of {FACTOR_INITS}, got {self.factor_init!r}"
            )
        ratio = self.start_cost_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1.0:
            raise ValueError(
                f"GBLRStart.start_cost_ratio must be a number >= 1 (a multiple of the budget), "
                f"got {ratio!r}"
            )
        if not isinstance(self.learner, LearnerConfig):
            raise TypeError(
                f"GBLRStart.learner must be a gblr.LearnerConfig, got {type(self.learner).__name__}"
            )
        factor = self.structure_lr_factor
        if factor is not None and (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not math.isfinite(factor)
            or factor < 0
        ):
            raise ValueError(
                "GBLRStart.structure_lr_factor must be None or a finite number >= 0 (a "
                f"multiple of the weights' learning rate), got {factor!r}"
            )

    def start_cost(self, budget: float) -> float:
        """The starting cost at ``budget`` (fractions of the dense MACs): the one place it
        is computed, so that a recipe saves exactly the cost its probe started from."""
        return min(1.0, self.start_cost_ratio * budget)

    def structure_lr(self, config: EngineConfig) -> float | None:
        """The structure's learning rate of a run of ``config`` from this start (None: the
        engine's default): ``config.structure_lr`` where it is set, else
        ``structure_lr_factor`` × ``config.lr``."""
        if config.structure_lr is not None or self.structure_lr_factor is None:
            return config.structure_lr
        return self.structure_lr_factor * config.lr


#: The library's default start from scratch (`structure_model`'s and `LearnerConfig()`'s).
BLOCKDIAG_START = GBLRStart("blockdiag")
#: The default until 2026-12-06: the best start where a layer must mix globally. Its
#: structure trains at 3x the weights' rate, the rate it was chosen at: at 1x it is slower
#: on the shifted-digits MLP (realtasks-experiments/probe-at-1x).
LEARNED_START = GBLRStart(
    "learned",
    structure_init="blocks",
    factor_init="balanced",
    start_cost_ratio=3.0,
    learner=LearnerConfig.annealed(),
    structure_lr_factor=3.0,
)


@dataclass(frozen=True)
class StartProbe:
    """How the starts are compared.

    Attributes:
        evaluate_at: fractions of the run's steps at which every start is scored on the
            held-out samples; each probe trains to the last of them, on the run's own
            schedule (the default, 0.2 / 0.3 / 0.4: after the budget's ramp over the first
            third, every start at the budget by the last one).
        held_out: the fraction of the training set the probes do not train on.
        z: a challenger replaces the first start only when it leads by more than ``z``
            standard errors of its lead (see
            [`challenger_lead`][gblr.recipes.start_probe.challenger_lead]); ``inf`` never
            replaces it.
        split_seed: seeds which samples are held out.
        then: what the winner's run does next: ``"continue"`` from where its probe
            stopped, on every training sample (the run costs ``1 + (len(starts) - 1) *
            p`` of an unprobed one, ``p`` the last of ``evaluate_at``), or
            ``"restart"`` from its first step on every training sample (``1 +
            len(starts) * p``; where the first start is kept, the run is that start's
            unprobed run exactly).

    Examples:
        >>> from gblr.recipes.start_probe import StartProbe
        >>> StartProbe().held_out, StartProbe(z=2.0).z
        (0.1, 2.0)
    """

    evaluate_at: tuple[float, ...] = (0.2, 0.3, 0.4)
    held_out: float = 0.1
    z: float = 1.0
    split_seed: int = 0
    then: str = "continue"

    def __post_init__(self) -> None:
        fractions = self.evaluate_at
        if (
            not isinstance(fractions, (tuple, list))
            or not fractions
            or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1
                for f in fractions
            )
        ):
            raise ValueError(
                "StartProbe.evaluate_at must be a non-empty tuple of fractions in (0, 1) of "
                f"the run's steps, got {fractions!r}"
            )
        object.__setattr__(self, "evaluate_at", tuple(sorted(set(fractions))))
        held = self.held_out
        if isinstance(held, bool) or not isinstance(held, (int, float)) or not 0 < held < 1:
            raise ValueError(f"StartProbe.held_out must be a fraction in (0, 1), got {held!r}")
        if isinstance(self.z, bool) or not isinstance(self.z, (int, float)) or math.isnan(self.z):
            raise ValueError(f"StartProbe.z must be a number (inf allowed), got {self.z!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise TypeError(f"StartProbe.split_seed must be an int, got {self.split_seed!r}")
        if self.then not in PROBE_THEN:
            raise ValueError(f"StartProbe.then must be one of {PROBE_THEN}, got {self.then!r}")


def challenger_lead(
    incumbent_hits: torch.Tensor, challenger_hits: torch.Tensor
) -> tuple[float, float]:
    """How far a challenger leads the incumbent on the held-out samples, and how sure that
    is: a paired comparison over the samples (the independent units), each sample's score
    the fraction of the evaluations in which the model got it right (averaging several
    evaluations damps the swings of training at its peak learning rate).

    Args:
        incumbent_hits, challenger_hits: bool ``(evaluations, N)``, right or wrong on each
            of the same ``N`` held-out samples at each evaluation.

    Returns:
        ``(lead, standard_error)``: the mean over samples of the challenger's score minus
        the incumbent's (a fraction of the samples; positive: the challenger is ahead) and
        the standard error of that mean (0 when every sample's difference is the same).

    Examples:
        >>> import torch
        >>> from gblr.recipes.start_probe import challenger_lead
        >>> incumbent = torch.tensor([[True, False, False, True]])
        >>> challenger = torch.tensor([[True, True, True, False]])
        >>> lead, error = challenger_lead(incumbent, challenger)
        >>> round(lead, 3), round(error, 3)
        (0.25, 0.479)
    """
    if incumbent_hits.shape != challenger_hits.shape or incumbent_hits.dim() != 2:
        raise ValueError(
            "challenger_lead needs two (evaluations, N) tensors of the same shape, got "
            f"{tuple(incumbent_hits.shape)} and {tuple(challenger_hits.shape)}"
        )
    count = incumbent_hits.shape[1]
    if count < 2:
        raise ValueError(f"challenger_lead needs at least 2 held-out samples, got {count}")
    differences = challenger_hits.double().mean(0) - incumbent_hits.double().mean(0)
    return float(differences.mean()), float(differences.std() / math.sqrt(count))


class _HeldOutHits(pl.Callback):
    """Records which held-out samples the model gets right after the given steps."""

    def __init__(self, held_out: Dataset, steps: Sequence[int], batch_size: int) -> None:
        self.held_out, self.steps, self.batch_size = held_out, set(steps), batch_size
        self.hits: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.hits:
            self.hits[step] = topk_hits(module.model, self.held_out, self.batch_size, ks=(1,))[:, 0]


def _winner(starts: Sequence[GBLRStart], scores: dict[str, dict[str, Any]], z: float) -> GBLRStart:
    """The challenger (``starts[1:]``) with the largest ``lead`` in ``scores`` among those
    ahead by more than ``z`` standard errors, else the incumbent ``starts[0]``."""
    winner, best_lead = starts[0], 0.0
    for start in starts[1:]:
        lead, error = scores[start.name]["lead"], scores[start.name]["standard_error"]
        # z * 0 is nan at z = inf, and nan never passes: an exact tie keeps the incumbent
        if lead > 0 and lead > z * error and lead > best_lead:
            winner, best_lead = start, lead
    return winner


def _structure(model: nn.Module, start: GBLRStart, config: EngineConfig) -> None:
    """Make ``model``'s structured layers GBLR layers as ``start`` says, at ``config``'s
    budget and seed."""
    assert config.budget is not None
    report = structure_model(
        model,
        "gblr",
        start.start_cost(config.budget),
        include=config.structure_include,
        exclude=config.structure_exclude,
        seed=config.seed,
        structure_init=start.structure_init,
        factor_init=start.factor_init,
    )
    # (as apply_structure does for a run without a probe)
    check_structures_some_layer(report, "gblr")


def _check_arguments(
    model: nn.Module,
    train_set: Dataset,
    config: EngineConfig,
    starts: Sequence[GBLRStart],
    probe: StartProbe,
) -> tuple[list[int], int]:
    """Refuse what cannot be probed; else ``(evaluation steps, held-out sample count)``."""
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    if config.budget is None:
        raise ValueError("config.budget must be set: the starts are compared at a budget")
    if config.resume is not None:
        raise ValueError(
            f"config.resume must be None (the probe runs its own interrupted runs), got "
            f"{config.resume!r}: resume the chosen start's run with train_classifier"
        )
    if not isinstance(probe, StartProbe):
        raise TypeError(f"probe must be a StartProbe, got {type(probe).__name__}")
    if not starts or not all(isinstance(start, GBLRStart) for start in starts):
        raise TypeError(f"starts must be a non-empty sequence of GBLRStart, got {starts!r}")
    names = [start.name for start in starts]
    if len(set(names)) != len(names):
        raise ValueError(f"starts must have different names, got {names}")
    if gblr_layers(model):
        raise ValueError(
            "model already has GBLR layers: pass the model with its dense layers, the probe "
            "structures a copy of it per start"
        )
    steps, held = probe_plan(probe, len(train_set), config.steps)  # type: ignore[arg-type]
    if config.stop_after is not None and config.stop_after <= steps[-1]:
        raise ValueError(
            f"config.stop_after={config.stop_after} must be None or after the probe's last "
            f"step ({steps[-1]}): the probes keep no checkpoint to resume from"
        )
    return steps, held


def probe_plan(probe: StartProbe, train_size: int, steps: int) -> tuple[list[int], int]:
    """Where ``probe`` scores the starts of a run of ``steps`` optimizer steps on
    ``train_size`` training samples, and how many samples it holds out.

    Returns:
        ``(evaluation steps, held-out sample count)``.

    Raises:
        ValueError: the run is too short for ``probe.evaluate_at`` (an evaluation step
            below 1 or at the last step) or the training set too small for
            ``probe.held_out`` (fewer than 2 held out, or none left to train on).

    Examples:
        >>> from gblr.recipes.start_probe import StartProbe, probe_plan
        >>> probe_plan(StartProbe(), train_size=1348, steps=800)
        ([160, 240, 320], 135)
        >>> try:
        ...     probe_plan(StartProbe(), train_size=1348, steps=2)
        ... except ValueError as error:
        ...     print(str(error).split(":")[0])
        StartProbe.evaluate_at=(0.2, 0.3, 0.4) of 2 steps gives evaluation steps [0, 1]
    """
    held = round(probe.held_out * train_size)
    if held < 2 or train_size - held < 1:
        raise ValueError(
            f"StartProbe.held_out={probe.held_out} of {train_size} training samples "
            "leaves fewer than 2 to compare the starts on or none to train on"
        )
    evaluations = sorted({round(f * steps) for f in probe.evaluate_at})
    if evaluations[0] < 1 or evaluations[-1] >= steps:
        raise ValueError(
            f"StartProbe.evaluate_at={probe.evaluate_at} of {steps} steps gives evaluation "
            f"steps {evaluations}: each must be at least 1 and before the last step"
        )
    return evaluations, held


def train_classifier_probing_start(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset | None,
    config: EngineConfig,
    *,
    starts: Sequence[GBLRStart] = (BLOCKDIAG_START, LEARNED_START),
    probe: StartProbe | None = None,
    batch_mix: Any = None,
    run_info: dict[str, Any] | Callable[[GBLRStart], dict[str, Any]] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    before_fit: Callable[[], None] | None = None,
    on_choice: Callable[[GBLRStart], None] | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Structure ``model`` with GBLR layers from the start that a probe prefers, and train it.

    Each of ``starts`` structures a copy of ``model`` and trains it on the run's own
    schedule (``config``, interrupted at the last of ``probe.evaluate_at``) on the
    training set less a held-out ``probe.held_out`` of it, scored on those held-out
    samples at each of ``probe.evaluate_at``. The first start is kept unless another
    leads it by more than ``probe.z`` standard errors
    ([`challenger_lead`][gblr.recipes.start_probe.challenger_lead]; the one with the
    largest lead wins). ``model`` is then structured as the winner says and its run
    continues from where its probe stopped (its weights, optimizer, learner and schedule)
    to ``config.steps`` on the whole ``train_set`` (with ``probe.then="restart"``: runs
    again from its first step on the whole ``train_set``, so that a kept first start
    gives exactly its unprobed run); it is scored on ``test_set`` as
    [`train_classifier`][gblr.recipes.engine.train_classifier] does. The probes write no
    logs or checkpoints of their own outside a temporary folder; the final run writes
    what ``config`` says, and (``"continue"``) its ``checkpoint_dir`` starts with the
    winner's checkpoint at the end of its probe, so that a run stopped before its first
    own checkpoint resumes from there. The probes cost ``len(starts) - 1`` (``"continue"``) or
    ``len(starts)`` (``"restart"``) times the probe's steps on top of the run.

    Args:
        model: the model with its layers still dense (``nn.Linear``); changed in place.
        train_set, test_set: ``(input, label)`` datasets (``test_set`` may be None).
        config: the run (``budget`` set, ``resume`` unset; ``stop_after``, if set, after
            the probe's last step, interrupts the final run there); the
            ``learner`` of each start replaces ``config.learner``, and its
            [`structure_lr`][gblr.recipes.start_probe.GBLRStart.structure_lr] is the run's
            ``structure_lr``.
        starts: the candidates, the first the incumbent (default: GBLR's block-diagonal
            start, the library's default, and the learned start).
        probe: how they are compared (default ``StartProbe()``).
        batch_mix, run_info: as [`train_classifier`][gblr.recipes.engine.train_classifier]'s,
            for the probes and the final run (``run_info`` may be a function of the start,
            as a recipe's config differs by start).
        callbacks, before_fit: as `train_classifier`'s, for the final run only.
        on_choice: called with the winner once it is chosen, before the final run.
        report: called with one line of text as each probe starts, when the winner is
            chosen and as the final run starts (what a command line prints between the
            runs' progress bars). The probes' own Lightning messages (accelerators found,
            their stop) are dropped, and so is the final run's note that it restored the
            probe's temporary checkpoint.

    Returns:
        [`train_classifier`][gblr.recipes.engine.train_classifier]'s result, with
        ``seconds`` the whole training time (every probe and the final run), and
        ``start`` (the winner's name), ``probe_seconds`` and ``probe`` (per start: its
        held-out ``accuracy`` at each evaluation, and for each challenger its ``lead``
        over the first start and that lead's ``standard_error``).

    Raises:
        ValueError, TypeError: a bad argument (named in the message), or ``model``
            already has GBLR layers.

    Examples:
        >>> import tempfile
        >>> from gblr.recipes.data import digits
        >>> from gblr.recipes.engine import EngineConfig
        >>> from gblr.recipes.models import VisionTransformer
        >>> from gblr.recipes.start_probe import train_classifier_probing_start
        >>> train, test = digits()
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> config = EngineConfig(
        ...     steps=10, batch_size=8, budget=0.5, logger=None, progress=False,
        ...     out_dir=tempfile.mkdtemp(),
        ... )
        >>> result = train_classifier_probing_start(model, train, test, config)
        >>> result["start"] in ("blockdiag", "learned"), result["steps"]
        (True, 10)
    """
    probe = StartProbe() if probe is None else probe
    starts = tuple(starts)
    steps, held_count = _check_arguments(model, train_set, config, starts, probe)
    order = torch.randperm(
        len(train_set),  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(probe.split_seed),
    ).tolist()
    held_out, kept = Subset(train_set, order[:held_count]), Subset(train_set, order[held_count:])
    scores: dict[str, dict[str, Any]] = {}
    hits: dict[str, torch.Tensor] = {}
    probe_seconds = 0.0
    say = report if report is not None else (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="gblr-start-probe-") as folder:
        for number, start in enumerate(starts, 1):
            say(
                f"start probe {number} of {len(starts)}: the {start.name} start, steps 1-"
                f"{steps[-1]} of {config.steps} on {len(kept)} training samples, scored on "
                f"{held_count} held out at steps {', '.join(map(str, steps))}"
            )
            candidate = copy.deepcopy(model)
            _structure(candidate, start, config)
            recorder = _HeldOutHits(held_out, steps, config.batch_size)
            probe_config = dataclasses.replace(
                config,
                learner=start.learner,
                structure_lr=start.structure_lr(config),
                stop_after=steps[-1],
                checkpoint_dir=Path(folder) / start.name,
                checkpoint_every_n_steps=steps[-1],
                out_dir=None,
                logger=None,
                val_every_n_steps=None,
            )
            with lightning_messages_dropped(lambda record: record.levelno < logging.WARNING):
                result = train_classifier(
                    candidate,
                    kept,
                    None,
                    probe_config,
                    batch_mix=batch_mix,
                    run_info=run_info(start) if callable(run_info) else run_info,
                    callbacks=[recorder],
                )
            probe_seconds += result["seconds"]
            hits[start.name] = torch.stack([recorder.hits[step] for step in steps])
            scores[start.name] = {
                "accuracy": [float(row.double().mean()) for row in hits[start.name]]
            }
        for start in starts[1:]:
            lead, error = challenger_lead(hits[starts[0].name], hits[start.name])
            scores[start.name].update(lead=lead, standard_error=error)
        winner = _winner(starts, scores, probe.z)
        leads = ", ".join(
            f"{start.name} {100 * scores[start.name]['lead']:+.1f} ± "
            f"{100 * scores[start.name]['standard_error']:.1f} points"
            for start in starts[1:]
        )
        say(
            f"start probe: the {winner.name} start is kept (held-out lead over the "
            f"{starts[0].name} start: {leads}; a challenger needs more than {probe.z:g} "
            "standard error)"
        )
        if on_choice is not None:
            on_choice(winner)
        _structure(model, winner, config)
        probe_end = None if probe.then == "restart" else Path(folder) / winner.name / "last.ckpt"
        final_config = dataclasses.replace(
            config,
            learner=winner.learner,
            structure_lr=winner.structure_lr(config),
            resume=probe_end,
        )

        def started() -> None:
            if before_fit is not None:
                before_fit()
            if probe_end is not None and config.checkpoint_dir is not None:
                # the run's checkpoints begin at the end of its probe: stopped before its
                # first own checkpoint, it resumes from there, not from its first step
                copy_atomically(probe_end, Path(config.checkpoint_dir) / "last.ckpt")

        say(
            f"the {winner.name} start trains "
            + (
                f"on from step {steps[-1]}"
                if probe_end is not None
                else "again from its first step"
            )
            + f" to step {config.steps} on all {len(train_set)} training samples"  # type: ignore[arg-type]
        )
        restored = None if probe_end is None else str(probe_end)
        # the time the continued run starts from: what its probe's checkpoint recorded
        continued = (
            0.0
            if probe_end is None
            else float(read_checkpoint(probe_end).get(CHECKPOINT_KEY, {}).get("train_seconds", 0))
        )
        with (
            warnings.catch_warnings(),
            lightning_messages_dropped(
                lambda record: restored is not None and restored in record.getMessage()
            ),
        ):
            # the continued run checkpoints only where config says; the probe's own
            # ModelCheckpoint has nothing left to restore
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
            # ... and its checkpoint folder holds the probe's end, put there just before
            warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
            result = train_classifier(
                model,
                train_set,
                test_set,
                final_config,
                batch_mix=batch_mix,
                # the probe's record travels in the run's checkpoints, so that a resumed
                # run reports it as the uninterrupted one does
                run_info={
                    **((run_info(winner) if callable(run_info) else run_info) or {}),
                    "probe": {
                        "start": winner.name,
                        "seconds": probe_seconds,
                        "scores": scores,
                        # already in the run's own time, which continues its probe's
                        "continued_seconds": continued,
                    },
                },
                callbacks=callbacks,
                before_fit=started,
            )
    # the continued run's time began with its own probe's (its checkpoint's), counted
    # once in probe_seconds
    return {
        **result,
        "seconds": probe_seconds + result["seconds"] - continued,
        "start": winner.name,
        "probe_seconds": probe_seconds,
        "probe": scores,
    }
