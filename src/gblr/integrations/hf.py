"""Hugging Face ``transformers.Trainer`` integration: a callback that drives a
[`gblr.StructureLearner`][], and a trainer that recovers a converted model by
distillation to the original.

Needs ``transformers`` (``pip install "gblr[hf]"``).
"""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("gblr.integrations.hf needs transformers: pip install 'gblr[hf]'") from error

from ..compress.distill import distillation_loss, learner_budget, model_output
from ..files import save_atomically
from ..learn.config import LearnerConfig
from ..learn.groups import gblr_layers, param_groups
from ..learn.learner import StructureLearner
from ._common import (
    build_learner,
    check_learner_arguments,
    check_learner_model,
    log_items,
    warn_if_structure_not_trained,
)

__all__ = ["GBLRDistillationTrainer", "GBLRTrainerCallback"]


class GBLRTrainerCallback(TrainerCallback):
    """Runs ``learner.step()`` after every optimizer step and adds its summary to the logs.

    Args:
        learner: an existing learner (built on the model the trainer trains), or None to
            build one each time training begins from ``config`` and ``learner_kwargs``
            (``total_steps`` defaults to the trainer's ``max_steps``).
        config: the learner's [`gblr.LearnerConfig`][] (default: ``LearnerConfig()``, the
            library's default;
            ``LearnerConfig.finetune()`` for a converted model).
        **learner_kwargs: keyword arguments of [`gblr.StructureLearner`][]
            (``budget=``, ``budget_macs=`` or ``lam=``, ``warmup_steps=``, ...); names,
            the config and the budget are checked here, the rest when the learner is
            built. Its deprecated keywords warn here, once.

    The summary goes into ``trainer.state.log_history`` and the console; the trainer
    calls its ``report_to`` loggers (TensorBoard, W&B, ...) before the callbacks it was
    given, so for them to record ``gblr/*`` move this callback first:
    ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))``.
    Give each trainer one such callback (``GBLRDistillationTrainer`` adds its own): two
    are refused when training begins.

    Every checkpoint the trainer saves gets the learner's state
    (``gblr_learner.pt`` in its ``checkpoint-N`` folder), and a run resumed from it
    continues exactly where the learner was (σ schedule, budget ramp from the run's own
    starting cost, threshold, held sides). A checkpoint without that file (written by an
    earlier version, or by a trainer without this callback) resumes from the trainer's
    ``global_step`` with the starting cost of the resumed model, with a warning.

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
        self._builds_learner = learner is None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _claim_training_run(self, state)
        if self._builds_learner:
            # a new learner for every run: a second train() (another model, as
            # hyperparameter_search's model_init gives, or the same one) starts its own
            if model is None:
                raise ValueError("GBLRTrainerCallback needs the model at train begin")
            self.learner = build_learner(model, optimizer, state.max_steps, self.learner_kwargs)
        elif model is not None:
            check_learner_model(self.learner, model, "GBLRTrainerCallback")
        warn_if_structure_not_trained(self.learner, optimizer, "GBLRTrainerCallback")
        if state.global_step and self.learner.step_count != state.global_step:
            path = _learner_file(args, state.global_step)
            if path.is_file():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if int(saved["step_count"]) != state.global_step:
                    raise ValueError(
                        f"{path} holds the learner of step {saved['step_count']}, but the "
                        f"trainer resumes at step {state.global_step}"
                    )
                self.learner.load_state_dict(saved)
                return
            warnings.warn(
                f"GBLRTrainerCallback: no learner state at {path}; the learner continues "
                f"from step {state.global_step} with the resumed model's cost as its "
                "starting cost, so its budget ramp differs from the interrupted run's",
                UserWarning,
                stacklevel=2,
            )
            learner_state = self.learner.state_dict()
            learner_state["step_count"] = state.global_step
            self.learner.load_state_dict(learner_state)

    def on_save(self, args, state, control, **kwargs):
        if self.learner is None or not args.should_save:
            return
        path = _learner_file(args, state.global_step)
        if path.parent.is_dir():  # (the trainer wrote the checkpoint just before this hook)
            learner_state = self.learner.state_dict()
            save_atomically(lambda file: torch.save(learner_state, file), path)

    def on_step_end(self, args, state, control, **kwargs):
        if self.learner is not None:
            self.learner.step()

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if self.learner is None or logs is None:
            return
        items = log_items(self.learner)
        # Seen by the callbacks after this one: the trainer puts its report_to callbacks
        # (TensorBoard, W&B, ...) before those given to it, which see them only if this
        # callback is moved first (the class docstring says how).
        logs.update(items)
        if state.log_history:  # the trainer recorded its own copy of logs before this hook
            state.log_history[-1].update(items)


# The training run each callback steps: id of the run's TrainerState (one per trainer, a
# dataclass, not hashable) -> weak references to that state and to the callback. Two
# callbacks in one trainer would both step its model's structure.
_RUNS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _claim_training_run(callback: GBLRTrainerCallback, state: Any) -> None:
    """``ValueError`` when another live ``GBLRTrainerCallback`` steps the run of
    ``state`` (both in one trainer: each would step the structure once per step, a
    second budget cut in λ mode); else record ``callback`` as its one."""
    for key, (state_ref, callback_ref) in list(_RUNS.items()):
        if state_ref() is None or callback_ref() is None:
            del _RUNS[key]  # a run or callback gone: its id may come back for another
    entry = _RUNS.get(id(state))
    if entry is not None and entry[0]() is state and entry[1]() is not callback:
        raise ValueError(
            "this trainer has two GBLRTrainerCallbacks (GBLRDistillationTrainer adds its "
            "own): both would step the structure; give it one"
        )
    _RUNS[id(state)] = (weakref.ref(state), weakref.ref(callback))


#: The learner's state in a ``transformers.Trainer`` checkpoint folder.
LEARNER_FILE = "gblr_learner.pt"


def _learner_file(args: Any, global_step: int) -> Path:
    """Where the checkpoint of ``global_step`` holds the learner's state (the trainer's
    own folder naming: ``checkpoint-N`` in ``output_dir``)."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{global_step}" / LEARNER_FILE


class GBLRDistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that trains a converted model (the student, ``model=``)
    to reproduce the original (``teacher=``) on unlabelled inputs: the loss of
    [`gblr.compress.distill.distillation_loss`][] (mean squared error of the outputs,
    padding masked), the optimizer over [`gblr.param_groups`][] (the paper's settings
    for widths and locations), and, for GBLR students, a
    [`GBLRTrainerCallback`][gblr.integrations.hf.GBLRTrainerCallback] holding the MACs. Everything
    else is the ``Trainer``'s: arguments, schedulers, logging, checkpoints, evaluation (its loss is
    the same distillation loss).

    Args:
        *args: the ``Trainer``'s positional arguments (``model``, ``args``, ...).
        teacher: the original model; kept in eval mode, moved to the student's device.
        output: which output to match (`gblr.compress.distill.DistillConfig.output`;
            ``"auto"``: ``last_hidden_state``, else ``logits``).
        structure_lr: learning rate of GBLR widths and locations (default: the
            ``TrainingArguments``' ``learning_rate``).
        budget: GBLR layers' MACs as a fraction of their dense MACs (default: the MACs
            they have when the trainer is made); ignored for a student without GBLR
            layers.
        learner_config: the structure learner's config (default
            [`gblr.LearnerConfig.finetune`][]).
        example_input: one input of the student (e.g. a tokenizer's output for one
            text): the budget and the learner then count each GBLR layer's MACs times the
            rows it runs on for it, as [`gblr.distill`][gblr.compress.distill.distill]'s
            ``example_input`` (default: per row).
        **kwargs: the ``Trainer``'s keyword arguments.

    Batches are the tokenizer's output (``input_ids``, ``attention_mask``, ...); a
    ``labels`` column, if any, is not used. Keep ``remove_unused_columns`` at its default
    only if every column is an input of the model.

    Examples:
        >>> from gblr.integrations.hf import GBLRDistillationTrainer
        >>> # trainer = GBLRDistillationTrainer(model=student, teacher=original,
        >>> #     args=TrainingArguments("out", max_steps=150, learning_rate=3e-4),
        >>> #     train_dataset=tokenized)
        >>> # trainer.train()
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        output: str = "auto",
        structure_lr: float | None = None,
        budget: float | None = None,
        learner_config: LearnerConfig | None = None,
        example_input: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        super().__init__(*args, **kwargs)
        if self.model is teacher:
            raise ValueError("model and teacher are the same module: train a converted copy")
        self.teacher = teacher.eval()
        self.distill_output = output
        self.structure_lr = structure_lr
        if gblr_layers(self.model):
            config = learner_config or LearnerConfig.finetune()
            callback = GBLRTrainerCallback(
                config=config,
                example_input=example_input,
                **learner_budget(self.model, budget, example_input),
            )
            # first, so that the report_to loggers after it see its gblr/* numbers
            self.callback_handler.callbacks.insert(0, callback)

    def _distillation_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        inputs = {key: value for key, value in inputs.items() if key != "labels"}
        device = next(iter(model.parameters())).device
        if next(iter(self.teacher.parameters())).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            target = model_output(self.teacher, inputs, self.distill_output)
        student = model_output(model, inputs, self.distill_output)
        return distillation_loss(student, target, inputs.get("attention_mask"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self._distillation_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self._distillation_loss(model, inputs)
        return loss.detach(), None, None

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        target = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
        groups = param_groups(
            target,
            lr=self.args.learning_rate,
            structure_lr=self.structure_lr,
            weight_decay=self.args.weight_decay,
        )
        # the groups carry their own lr (and the structure group its betas)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
