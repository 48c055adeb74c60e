"""Recovering a converted model by distillation to the original:
[`distill`][gblr.compress.distill.distill].

After [`gblr.convert`][] a model's structured layers only approximate the dense ones.
Training the converted model (the *student*) to reproduce the original's outputs (the
*teacher*) on unlabelled inputs recovers most of the gap without a task loss or labels:
the loss is the mean squared error between the two models' outputs (token-level hidden
states for an encoder, logits for a classifier), padding masked. The optimizer is AdamW
over [`gblr.param_groups`][] (the paper's settings for widths and locations), with a
linear warm-up and a cosine decay; a [`gblr.StructureLearner`][] with
[`gblr.LearnerConfig.finetune`][] holds the GBLR layers' MACs where the conversion put
them (or at ``budget``). This is the recovery of the real-task suite's T3
(docs/RESULTS.md). The Hugging Face ``Trainer`` form of the same loss is
[`gblr.integrations.hf.GBLRDistillationTrainer`][].
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..cost import layer_rows
from ..learn.config import LearnerConfig, config_fields
from ..learn.factors import check_fraction, check_int
from ..learn.groups import adamw, check_rate, gblr_layers, param_groups
from ..learn.learner import StructureLearner
from ..modules import to_device
from .configs import _check_seed

__all__ = ["DistillConfig", "DistillResult", "distill", "distillation_loss", "model_output"]

OUTPUT_FIELDS = ("last_hidden_state", "logits")
#: A distillation whose mean loss over its last steps ends above this multiple of its
#: first step's loss (or not finite) is named in a warning: it diverged. A budget ramped
#: down while distilling raises the loss too, but not tenfold.
DIVERGED_LOSS_RATIO = 10.0


@dataclass(frozen=True)
class DistillConfig:
    """How [`distill`][gblr.compress.distill.distill] trains: a frozen, validated record (saved in
    reports).

    Args:
        steps: optimizer steps (the batches are cycled).
        lr: peak learning rate of the weights (AdamW).
        structure_lr: learning rate of GBLR widths and locations (default ``lr``).
        weight_decay: AdamW weight decay of the 2-D weights.
        warmup_fraction: share of ``steps`` (in [0, 1)) over which the learning rate rises linearly
            from ``lr / warmup`` to ``lr``; a cosine decay to 0 follows.
        output: which output to match: ``"auto"`` (``last_hidden_state``, else
            ``logits``, else the output itself or its first element), or the name of
            an output field (``"pooler_output"``, ``"logits"``, ...).
        learner: the structure learner's config for GBLR layers (default
            [`gblr.LearnerConfig.finetune`][]: σ left as the conversion set it).
        budget_ramp_fraction: share of ``steps`` (in [0, 1)) over which the learner's
            budget ramps from the GBLR layers' cost at the start down to ``budget`` (the
            learner's ``warmup_steps``, shaped by ``learner.ramp``), for a model converted
            above the budget; 0 (the default) holds the budget from the first step.
        seed: seeds the random draws of the student in training mode (its dropout) on a
            forked random state, so the same seed gives the same run and the caller's
            random state is left as it was; ``None`` draws from torch's global generator
            as the caller left it.

    Examples:
        >>> from gblr.compress.distill import DistillConfig
        >>> DistillConfig(steps=200, lr=1e-4).warmup_steps
        20
    """

    steps: int = 150
    lr: float = 3e-4
    structure_lr: float | None = None
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    output: str = "auto"
    learner: LearnerConfig | None = None
    seed: int | None = 0
    budget_ramp_fraction: float = 0.0

    def __post_init__(self) -> None:
        # Checked values are stored as Python numbers (numpy's are taken), so that
        # to_dict() and the reports that hold it are JSON.
        numbers = {
            "steps": check_int("steps", self.steps, 1),
            "lr": check_rate("lr", self.lr),
            "weight_decay": check_rate("weight_decay", self.weight_decay, allow_zero=True),
            "warmup_fraction": check_fraction("warmup_fraction", self.warmup_fraction),
            "budget_ramp_fraction": check_fraction(
                "budget_ramp_fraction", self.budget_ramp_fraction
            ),
        }
        if self.structure_lr is not None:
            numbers["structure_lr"] = check_rate("structure_lr", self.structure_lr)
        if not isinstance(self.output, str) or not self.output:
            raise TypeError(f"output must be 'auto' or an output field's name, got {self.output!r}")
        if self.learner is not None and not isinstance(self.learner, LearnerConfig):
            raise TypeError(
                f"learner must be a gblr.LearnerConfig or None, got {type(self.learner).__name__}"
            )
        if self.seed is not None:
            numbers["seed"] = _check_seed(self.seed)
        for name, value in numbers.items():
            object.__setattr__(self, name, value)  # (a frozen dataclass)

    @property
    def warmup_steps(self) -> int:
        """Steps of the linear warm-up (at least 1)."""
        return max(1, round(self.steps * self.warmup_fraction))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready data (the learner's config as its own dict)."""
        data = dataclasses.asdict(self)
        data["learner"] = None if self.learner is None else self.learner.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillConfig:
        """The config of ``data`` as `to_dict` gives it; unknown keys are a ``ValueError``
        listing the allowed ones, and the values are checked as by the constructor.

        Examples:
            >>> from gblr import DistillConfig, LearnerConfig
            >>> config = DistillConfig(steps=50, learner=LearnerConfig.finetune())
            >>> DistillConfig.from_dict(config.to_dict()) == config
            True
        """
        fields = config_fields(cls, data)
        if isinstance(fields.get("learner"), Mapping):
            fields["learner"] = LearnerConfig.from_dict(fields["learner"])
        return cls(**fields)


@dataclass
class DistillResult:
    """What [`distill`][gblr.compress.distill.distill] did.

    Attributes:
        steps: optimizer steps taken.
        first_loss: the loss of the first step (before any update).
        last_loss: the mean loss of the last ``min(10, steps)`` steps.
        seconds: wall-clock time of the training loop.
        macs: MACs of the GBLR layers at the end (``None`` without any): per input row,
            or with `distill`'s ``example_input`` in one forward pass on it.
        config: the [`DistillConfig`][gblr.compress.distill.DistillConfig] used.
    """

    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    macs: int | None
    config: DistillConfig


def _select(output: Any, field: str) -> Tensor:
    """The tensor named by ``field`` (see `DistillConfig.output`) in a model output."""
    if field == "auto":
        if isinstance(output, Tensor):
            return output
        for name in OUTPUT_FIELDS:
            value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
            if isinstance(value, Tensor):
                return value
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return output[0]
        raise TypeError(
            f"cannot find the output to match in a {type(output).__name__}: give "
            f"output= the name of one of its fields"
        )
    value = output.get(field) if isinstance(output, Mapping) else getattr(output, field, None)
    if not isinstance(value, Tensor):
        raise ValueError(
            f"output={field!r}: the model's {type(output).__name__} has no tensor field "
            f"of that name"
        )
    return value


def model_output(model: nn.Module, batch: Any, output: str = "auto") -> Tensor:
    """Run ``model`` on ``batch`` and return the tensor that distillation matches.

    Args:
        model: any module.
        batch: a mapping (called as ``model(**batch)``, as Hugging Face models take
            their tokenizer's output), a tuple or list (``model(*batch)``) or a tensor.
        output: see `DistillConfig.output`.

    Returns:
        The selected output, e.g. ``(batch, tokens, hidden)`` hidden states.
    """
    if isinstance(batch, Mapping):
        result = model(**batch)
    elif isinstance(batch, (tuple, list)):
        result = model(*batch)
    else:
        result = model(batch)
    return _select(result, output)


def distillation_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between two outputs, over the positions ``mask`` keeps.

    Args:
        student: ``(batch, ..., features)`` output of the model being trained.
        teacher: the same shape, the target (no gradient needed).
        mask: optional ``(batch, tokens)`` attention mask (1 = a real token) for
            ``(batch, tokens, features)`` outputs; padded positions do not count. For
            outputs with one row per example, ``(batch, features)`` (a classifier's
            logits, a pooled embedding), it is not needed and is ignored.

    Returns:
        A scalar: the mean over kept positions and features.

    Examples:
        >>> import torch
        >>> from gblr.compress.distill import distillation_loss
        >>> out = torch.ones(2, 3, 4)
        >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        >>> float(distillation_loss(out, out * 0, mask))
        1.0
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher outputs differ in shape: {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    error = (student.float() - teacher.float()).pow(2)
    if mask is None:
        return error.mean()
    if student.dim() == 2 and mask.dim() == 2 and mask.shape[0] == student.shape[0]:
        return error.mean()  # one output per example: no padded position in it
    if student.dim() != 3 or tuple(mask.shape) != tuple(student.shape[:2]):
        raise ValueError(
            f"mask must be (batch, tokens) = {tuple(student.shape[:2])} for outputs of shape "
            f"(batch, tokens, features), got mask {tuple(mask.shape)} for outputs "
            f"{tuple(student.shape)}"
        )
    keep = mask.unsqueeze(-1).to(error.dtype)
    return (error * keep).sum() / (keep.sum() * student.shape[-1]).clamp_min(1.0)


def _mask_of(batch: Any, model: nn.Module, output: str) -> Tensor | None:
    """The ``(batch, tokens)`` mask of the positions ``output`` has: the batch's
    ``attention_mask``; for an encoder-decoder model's decoder outputs (its logits, its
    last hidden state) ``decoder_attention_mask``, else ``labels != -100`` when the model
    builds the decoder's inputs from the labels (T5, BART), else none (every position).
    The encoder's mask weighted the decoder's positions (and failed where the lengths
    differ)."""
    if not isinstance(batch, Mapping):
        return None
    config = getattr(model, "config", None)
    decoder = bool(getattr(config, "is_encoder_decoder", False)) and not output.startswith(
        "encoder"
    )
    if not decoder:
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, Tensor) else None
    mask, labels = batch.get("decoder_attention_mask"), batch.get("labels")
    if isinstance(mask, Tensor):
        return mask
    if isinstance(labels, Tensor) and batch.get("decoder_input_ids") is None:
        return labels != -100
    return None


def _cycle(batches: Iterable[Any]):
    """Each batch in turn, again from the first when the iterable ends (a DataLoader
    reshuffles then, as in epochs)."""
    passes = 0
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty and passes:
            raise ValueError(
                f"batches ({type(batches).__name__}) ran out after one pass and cannot be "
                "read again: give a list of batches or a DataLoader, which are read once "
                "per pass"
            )
        if empty:
            raise ValueError("batches is empty: give at least one batch")
        passes += 1


def _lr_factor(config: DistillConfig):
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, config.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))

    return factor


def learner_budget(
    model: nn.Module, budget: float | None, example_input: Any = None
) -> dict[str, Any]:
    """The budget keyword of the [`gblr.StructureLearner`][] that recovery runs with:
    ``budget`` (a fraction of the GBLR layers' dense MACs) when given, else the MACs the
    GBLR layers have now (``budget_macs``): what the conversion chose, its global
    allocation included, is held rather than replaced by a new budget. Those MACs are per
    row, or with ``example_input`` (an input of ``model``) in one forward pass on it, as
    the learner then counts them."""
    if budget is not None:
        return {"budget": budget}
    layers = [layer for _, layer in gblr_layers(model)]
    rows = [1] * len(layers)
    if example_input is not None and layers:
        rows = layer_rows(model, layers, to_device(example_input, layers[0].widths.device))
    current = sum(layer.matrix_flops() * count for layer, count in zip(layers, rows, strict=True))
    return {"budget_macs": max(1, current)}


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    config: DistillConfig | None = None,
    *,
    budget: float | None = None,
    example_input: Any = None,
    progress: bool = False,
) -> DistillResult:
    """Train ``student`` (a converted model) to reproduce ``teacher`` (the original).

    Args:
        student: the converted model, trained in place (left in eval mode).
        teacher: the original model (not changed; run in eval mode without gradients).
        batches: an iterable of inputs both models take (see
            [`model_output`][gblr.compress.distill.model_output]), e.g. a list of tokenizer outputs
            or a ``DataLoader``; cycled for ``config.steps`` steps. A mapping's ``attention_mask``
            masks padding.
        config: a [`DistillConfig`][gblr.compress.distill.DistillConfig] (default:
            ``DistillConfig()``).
        budget: GBLR layers' MACs as a fraction of their dense MACs, held by a
            [`gblr.StructureLearner`][] (default: the MACs they have now).
        example_input: one input of ``student`` (e.g. the first batch cut to one
            example; moved to its device). The learner then weights each GBLR layer's
            MACs by the rows it runs on for this input, so the budget is a share of a
            forward pass's MACs (as [`gblr.convert`][]'s ``example_input`` allocates it);
            this matters where layers see different numbers of rows (a CNN's stages, an
            MLP-Mixer's token and channel layers). Default: every layer counts per row.
        progress: print the loss every tenth of the run.

    Returns:
        A [`DistillResult`][gblr.compress.distill.DistillResult].

    Examples:
        >>> import copy, torch, gblr
        >>> from gblr.compress.distill import DistillConfig, distill
        >>> teacher = torch.nn.Sequential(torch.nn.Linear(16, 16))
        >>> student = copy.deepcopy(teacher)
        >>> _ = gblr.convert(student, gblr.GBLRConfig(budget=0.5), progress=False)
        >>> result = distill(student, teacher, [torch.randn(8, 16)], DistillConfig(steps=5))
        >>> result.steps
        5
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError(
            f"student and teacher must be torch.nn.Module, got {type(student).__name__} and "
            f"{type(teacher).__name__}"
        )
    if student is teacher:
        raise ValueError("student and teacher are the same module: distill a converted copy")
    config = DistillConfig() if config is None else config
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    device = next(iter(student.parameters())).device
    optimizer = adamw(
        param_groups(
            student,
            lr=config.lr,
            structure_lr=config.structure_lr,
            weight_decay=config.weight_decay,
        )
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    learner = None
    if gblr_layers(student):
        learner_config = config.learner or LearnerConfig.finetune()
        learner = StructureLearner(
            student,
            learner_config,
            total_steps=config.steps,
            warmup_steps=round(config.steps * config.budget_ramp_fraction),
            example_input=example_input,
            **learner_budget(student, budget, example_input),
        )
    teacher_mode = teacher.training
    teacher.eval()
    student.train()
    losses: list[float] = []
    start = time.perf_counter()
    cuda_devices = [device.index] if device.type == "cuda" else []  # a tensor's has an index
    with torch.random.fork_rng(devices=cuda_devices, enabled=config.seed is not None):
        if config.seed is not None:
            torch.manual_seed(config.seed)
        try:
            for step, batch in zip(range(config.steps), _cycle(batches)):
                batch = to_device(batch, device)
                with torch.no_grad():
                    target = model_output(teacher, batch, config.output)
                loss = distillation_loss(
                    model_output(student, batch, config.output),
                    target,
                    _mask_of(batch, student, config.output),
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"distillation loss is {float(loss.detach())} at step {step}: lower lr "
                        f"(now {config.lr:g}) or check the inputs"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if learner is not None:
                    learner.step()
                losses.append(float(loss.detach()))
                if progress and (step + 1) % max(1, config.steps // 10) == 0:
                    print(
                        f"distill step {step + 1}/{config.steps}: loss {losses[-1]:.4g}", flush=True
                    )
        finally:
            student.eval()
            teacher.train(teacher_mode)
    seconds = time.perf_counter() - start
    tail = losses[-min(10, len(losses)) :]
    last_loss = sum(tail) / len(tail)
    # (a first loss of 0, a student equal to its teacher, has no scale to diverge from)
    if not math.isfinite(last_loss) or 0 < DIVERGED_LOSS_RATIO * losses[0] < last_loss:
        warnings.warn(
            f"gblr.distill: the loss ended at {last_loss:.4g}, from {losses[0]:.4g} at the "
            "first step: the distillation diverged (a learning rate too high for this "
            f"model? lr={config.lr:g}); the student may be worse than after conversion",
            UserWarning,
            stacklevel=2,
        )
    return DistillResult(
        steps=len(losses),
        first_loss=losses[0],
        last_loss=last_loss,
        seconds=seconds,
        macs=None if learner is None else learner.macs(),
        config=config,
    )
