"""Lightning callback that drives a [`gblr.StructureLearner`][].

Needs ``lightning`` (``pip install "gblr[train]"``).
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gblr.integrations.lightning needs Lightning: pip install 'gblr[train]'"
    ) from error

from ..learn.config import LearnerConfig
from ..learn.learner import StructureLearner
from ._common import (
    build_learner,
    check_learner_arguments,
    check_learner_model,
    log_items,
    warn_if_structure_not_trained,
)

__all__ = ["GBLRCallback"]


class GBLRCallback(pl.Callback):
    """Runs ``learner.step()`` after every optimizer step and logs ``learner.summary()``.

    Args:
        learner: an existing learner (built on the module being trained, or a model
            inside it), or None to build one at each fit's start from ``config`` and
            ``learner_kwargs`` (``total_steps`` defaults to the trainer's
            ``estimated_stepping_batches``).
        config: the learner's [`gblr.LearnerConfig`][] (default: ``LearnerConfig()``, the
            library's default).
        log_every_n_steps: ``None`` (default): the summary is logged (under ``gblr/``)
            on every step the trainer writes to its loggers (``Trainer(log_every_n_steps)``),
            each row with the numbers of its own step; an int >= 1: only on those of them
            that are multiples of it, and the trainer's writes between them repeat the
            last logged numbers (Lightning keeps a logged value until it is logged again).
        **learner_kwargs: keyword arguments of [`gblr.StructureLearner`][]
            (``budget=``, ``budget_macs=`` or ``lam=``, ``warmup_steps=``, ...); names,
            the config and the budget are checked here, the rest when the learner is
            built at fit start. Its deprecated keywords (``target=``, ``sigma=``,
            ``merge=``, ...) warn here, once.

    The learner's state is saved in and restored from Lightning checkpoints.

    Examples:
        >>> from gblr.integrations.lightning import GBLRCallback
        >>> import gblr
        >>> callback = GBLRCallback(budget=0.3, warmup_steps=1000)
        >>> finetune = GBLRCallback(config=gblr.LearnerConfig.finetune(), budget=0.5)
    """

    def __init__(
        self,
        learner: StructureLearner | None = None,
        *,
        config: LearnerConfig | None = None,
        log_every_n_steps: int | None = None,
        **learner_kwargs: Any,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None:
            if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int):
                raise TypeError(
                    f"log_every_n_steps must be an int >= 1 or None, got {log_every_n_steps!r} "
                    f"({type(log_every_n_steps).__name__})"
                )
            if log_every_n_steps < 1:
                raise ValueError(
                    f"log_every_n_steps must be an int >= 1 or None, got {log_every_n_steps}"
                )
        if config is not None:
            learner_kwargs["config"] = config
        self.learner = learner
        self.learner_kwargs = check_learner_arguments(learner, learner_kwargs, "GBLRCallback")
        self._builds_learner = learner is None
        self.log_every_n_steps = log_every_n_steps
        self._pending_state: dict[str, Any] | None = None
        self._last_global_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a checkpoint (and this callback's state) has been restored.
        if self._builds_learner:
            # a new learner for every fit: a second one (another model, or the same one
            # again) starts its own schedule, unless a checkpoint's state is pending
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.learner = build_learner(
                pl_module, optimizer, trainer.estimated_stepping_batches, self.learner_kwargs
            )
        else:
            check_learner_model(self.learner, pl_module, "GBLRCallback")
        if trainer.optimizers:
            warn_if_structure_not_trained(self.learner, trainer.optimizers[0], "GBLRCallback")
        if self._pending_state is not None:
            self.learner.load_state_dict(self._pending_state)
            self._pending_state = None
        self._last_global_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # global_step counts optimizer steps, so gradient accumulation is handled.
        if trainer.global_step == self._last_global_step or self.learner is None:
            return
        for _ in range(trainer.global_step - self._last_global_step):
            self.learner.step()
        self._last_global_step = trainer.global_step
        if self._logs_now(trainer):
            pl_module.log_dict(log_items(self.learner), on_step=True, on_epoch=False)

    def _logs_now(self, trainer: pl.Trainer) -> bool:
        """Whether the trainer writes this step's metrics to its loggers (Lightning's own
        test, read where it exists) and the step is one of ``log_every_n_steps``."""
        every = self.log_every_n_steps
        if every is not None and trainer.global_step % every:
            return False
        connector = getattr(trainer, "_logger_connector", None)
        return connector is None or bool(connector.should_update_logs)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.learner is None else {"learner": self.learner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "learner" not in state_dict:
            return
        if self._builds_learner:  # loaded into the learner built at train start
            self._pending_state = state_dict["learner"]
        else:
            self.learner.load_state_dict(state_dict["learner"])
