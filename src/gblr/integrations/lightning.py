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
from ._common import build_learner, check_learner_arguments, log_items

__all__ = ["GBLRCallback"]


class GBLRCallback(pl.Callback):
    """Runs ``learner.step()`` after every optimizer step and logs ``learner.summary()``.

    Args:
        learner: an existing learner, or None to build one at fit start from ``config``
            and ``learner_kwargs`` (``total_steps`` defaults to the trainer's
            ``estimated_stepping_batches``).
        config: the learner's [`gblr.LearnerConfig`][] (default: ``LearnerConfig()``, the
            library's default).
        log_every_n_steps: how often the summary is logged (under ``gblr/``): an int >= 1.
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
        log_every_n_steps: int = 50,
        **learner_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int):
            raise TypeError(
                f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r} "
                f"({type(log_every_n_steps).__name__})"
            )
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps}")
        if config is not None:
            learner_kwargs["config"] = config
        self.learner = learner
        self.learner_kwargs = check_learner_arguments(learner, learner_kwargs, "GBLRCallback")
        self.log_every_n_steps = log_every_n_steps
        self._pending_state: dict[str, Any] | None = None
        self._last_global_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a checkpoint (and this callback's state) has been restored.
        if self.learner is None:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.learner = build_learner(
                pl_module, optimizer, trainer.estimated_stepping_batches, self.learner_kwargs
            )
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
        if trainer.global_step % self.log_every_n_steps == 0 or trainer.global_step == 1:
            pl_module.log_dict(log_items(self.learner), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.learner is None else {"learner": self.learner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "learner" not in state_dict:
            return
        if self.learner is None:
            self._pending_state = state_dict["learner"]
        else:
            self.learner.load_state_dict(state_dict["learner"])
