"""Hugging Face ``transformers.Trainer`` callback that drives a :class:`gblr.StructureLearner`.

Needs ``transformers`` (``pip install "gblr[hf]"``).
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("gblr.integrations.hf needs transformers: pip install 'gblr[hf]'") from error

from ..learn.config import LearnerConfig
from ..learn.learner import StructureLearner
from ._common import build_learner, check_learner_arguments, log_items

__all__ = ["GBLRTrainerCallback"]


class GBLRTrainerCallback(TrainerCallback):
    """Runs ``learner.step()`` after every optimizer step and adds its summary to the logs.

    Args:
        learner: an existing learner, or None to build one when training begins from
            ``config`` and ``learner_kwargs`` (``total_steps`` defaults to the trainer's
            ``max_steps``).
        config: the learner's :class:`gblr.LearnerConfig` (default: the paper's method;
            ``LearnerConfig.finetune()`` for a converted model).
        **learner_kwargs: keyword arguments of :class:`gblr.StructureLearner`
            (``budget=``, ``budget_macs=`` or ``lam=``, ``warmup_steps=``, ...); names,
            the config and the budget are checked here, the rest when the learner is
            built. Its deprecated keywords warn here, once.

    When a run resumes from a checkpoint, the learner continues from the trainer's
    ``global_step`` (σ schedule and budget ramp included); its starting cost is the one
    at the start of the resumed run.

    Examples:
        >>> from gblr.integrations.hf import GBLRTrainerCallback
        >>> import gblr
        >>> callback = GBLRTrainerCallback(
        ...     config=gblr.LearnerConfig.finetune(), budget=0.25, warmup_steps=500
        ... )
    """

    def __init__(
        self,
        learner: StructureLearner | None = None,
        *,
        config: LearnerConfig | None = None,
        **learner_kwargs: Any,
    ) -> None:
        if config is not None:
            learner_kwargs["config"] = config
        self.learner = learner
        self.learner_kwargs = check_learner_arguments(
            learner, learner_kwargs, "GBLRTrainerCallback"
        )

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.learner is None:
            if model is None:
                raise ValueError("GBLRTrainerCallback needs the model at train begin")
            self.learner = build_learner(model, optimizer, state.max_steps, self.learner_kwargs)
        if state.global_step and self.learner.step_count != state.global_step:
            learner_state = self.learner.state_dict()
            learner_state["step_count"] = state.global_step
            self.learner.load_state_dict(learner_state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.learner is not None:
            self.learner.step()

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if self.learner is None or logs is None:
            return
        items = log_items(self.learner)
        logs.update(items)  # seen by the reporting callbacks that run after this one
        if state.log_history:  # the trainer recorded its own copy of logs before this hook
            state.log_history[-1].update(items)
