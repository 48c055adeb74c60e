"""The Lightning training engine shared by the recipes and ``gblr demo``.

``ClassificationModule`` wraps any classifier and ``CausalLMModule`` any next-token
language model (a Hugging Face ``*ForCausalLM`` or a module returning logits): AdamW
over [`gblr.param_groups`][] (structure parameters get their own group), linear
warm-up then cosine decay, loss and accuracy (or perplexity) logged, and a record of
the model's layer types in every checkpoint so that resuming with a different
structure is refused with the reason. [`train_classifier`][gblr.recipes.engine.train_classifier]
runs a classifier with a Lightning ``Trainer`` (devices, nodes, strategy and precision are
Lightning's own options) and, for models with GBLR layers, the
[`gblr.integrations.lightning.GBLRCallback`][], as an
[`EngineConfig`][gblr.recipes.engine_config.EngineConfig] says (`gblr.recipes.engine_config`).
Reading and checking checkpoints before a resume is `gblr.recipes.checkpoints` (its names are
importable from here too).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("the training engine needs Lightning: pip install 'gblr[train]'") from error

from ..cost import FlopsReport, count_flops
from ..files import copy_atomically
from ..integrations.lightning import GBLRCallback
from ..learn.groups import adamw, gblr_layers, param_groups
from ..modules import to_device
from .checkpoints import (
    CHECKPOINT_KEY,
    _merge_metrics,
    _set_aside_metrics,
    check_checkpoint_structure,
    check_resume,
    layer_types,
    read_checkpoint,
)
from .engine_config import ENGINE_LOGGERS, EngineConfig, engine_config_from_keywords

__all__ = [
    "CausalLMModule",
    "ClassificationModule",
    "EngineConfig",
    "ShuffleStream",
    "check_checkpoint_structure",
    "check_resume",
    "evaluate",
    "evaluate_topk",
    "layer_types",
    "read_checkpoint",
    "topk_hits",
    "train_classifier",
    "train_language_model",
    "train_module",
]


#: The structure's learning rate as a multiple of the weights' when none is given, the
#: same as `gblr.param_groups`' default, so a plain PyTorch loop trains as the engine does.
#: Widths and locations move by about their learning rate per step (Adam, β1 = 0) in
#: fractions of their side, so a higher rate moves long sides by many lines a step
#: (docs/BENCHMARKS.md, "The structure's learning rate, again").
STRUCTURE_LR_FACTOR = 1


@contextlib.contextmanager
def _seeded_draws(seed: int, device: torch.device) -> Iterator[None]:
    """Meanwhile, the global random generators (the CPU's, and ``device``'s if it is an
    accelerator) are seeded with ``seed``; their states are restored afterwards.

    On the CPU the default generator alone, directly: ``fork_rng`` with ``torch.manual_seed``
    (which visits every backend) cost 150 us a step, a seventh of a small model's step."""
    seed %= 2**63
    if device.type != "cpu":
        index = [device.index or 0]
        with torch.random.fork_rng(devices=index, device_type=device.type):
            torch.manual_seed(seed)
            yield
        return
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class _ScheduledModule(pl.LightningModule):
    """AdamW over [`gblr.param_groups`][] with linear warm-up and cosine decay, and a
    record of the model's layer types (and ``run_info``) in each checkpoint."""

    #: Seeds each training step's random draws (`_step_draws`); the engine sets the run's.
    step_seed: int | None = None

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        min_lr: float = 0.0,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        total_steps: int = 1000,
        structure_lr: float | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= min_lr <= lr:
            raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr!r}")
        self.model = model
        self.lr, self.min_lr = lr, min_lr
        self.weight_decay, self.structure_lr = weight_decay, structure_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.run_info = dict(run_info or {})
        # training seconds before the checkpoint a run resumed; when this fit started
        self.seconds_before = 0.0
        self._fit_started: float | None = None

    def configure_optimizers(self) -> Any:
        structure_lr = self.structure_lr
        if structure_lr is None:
            structure_lr = STRUCTURE_LR_FACTOR * self.lr
        groups = param_groups(
            self.model, lr=self.lr, structure_lr=structure_lr, weight_decay=self.weight_decay
        )
        optimizer = adamw(groups)
        warmup, total = self.warmup_steps, max(self.total_steps, self.warmup_steps + 1)
        floor = self.min_lr / self.lr

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / (total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "layer_types": layer_types(self.model),
            **self.run_info,
            # so that a resumed run reports the whole run's time, not its last part's
            "train_seconds": self.train_seconds(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # (a checkpoint written before train_seconds was recorded: its time is unknown)
        self.seconds_before = float(checkpoint.get(CHECKPOINT_KEY, {}).get("train_seconds", 0.0))

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()

    def train_seconds(self) -> float:
        """Seconds of training of this run so far: those recorded in the checkpoint it
        resumed (``seconds_before``) and those of this fit."""
        started = self._fit_started
        return self.seconds_before + (0.0 if started is None else time.perf_counter() - started)

    def _step_draws(self) -> contextlib.AbstractContextManager[Any]:
        """Meanwhile, torch's random numbers (MixUp/CutMix, drop path, dropout) are those
        of this training step alone: drawn from a seed of (``step_seed``, rank, step), with
        the global generators restored afterwards. A resumed run then draws what the
        uninterrupted one drew at each step; from one stream, what came before a resume
        (the start probe's runs, a checkpoint's save) shifted every later draw. A step
        that draws nothing is unchanged. ``step_seed`` ``None`` (a module used alone):
        the global stream, as before."""
        if self.step_seed is None:
            return contextlib.nullcontext()
        return _seeded_draws(
            (self.step_seed * 1_000_003 + self.global_rank) * 1_000_033 + self.global_step,
            self.device,
        )

    def model_input(self, batch: Any) -> Any:
        """What ``self.model`` is called with for a training ``batch``."""
        return batch[0]

    def _logs_this_step(self) -> bool:
        """Whether this training step's metrics are logged: on the steps the trainer writes
        to its loggers (every ``log_every_n_steps``) and on the last step. One ``self.log``
        costs Lightning as much as a whole training step of a small model (it copies the
        metric's metadata each call), and the values of the other steps reach no logger:
        the progress bar shows the last logged ones. The last step always logs, so
        ``train/steps_done`` reaches the launching process of a spawn strategy."""
        trainer = self.trainer
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None or connector.should_update_logs:
            return True
        final = trainer.max_steps > 0 and self.global_step + 1 >= trainer.max_steps
        return final or trainer.is_last_batch


class ClassificationModule(_ScheduledModule):
    """Cross-entropy training of ``model`` (``(N, ...) -> (N, classes)`` logits).

    Args:
        model: the classifier.
        lr: peak learning rate (AdamW) of every parameter group.
        min_lr: learning rate at the end of the cosine decay.
        weight_decay: AdamW weight decay of weight matrices (not biases, norms, structure).
        warmup_steps: linear warm-up from 0 to ``lr``.
        total_steps: cosine decay to ``min_lr`` at this step.
        structure_lr: learning rate of widths and locations (default ``lr``,
            `STRUCTURE_LR_FACTOR`).
        label_smoothing: of the cross-entropy loss.
        batch_mix: applied to each training batch ``(inputs, labels) -> (inputs,
            soft labels (N, classes))``, e.g. torchvision's ``MixUp``/``CutMix``.
        run_info: stored in every checkpoint under ``"gblr"`` (e.g. the config).

    Examples:
        >>> import torch
        >>> from gblr.recipes.engine import ClassificationModule
        >>> from gblr.recipes.models import VisionTransformer
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> module = ClassificationModule(model, total_steps=10)
        >>> module(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        label_smoothing: float = 0.0,
        batch_mix: Any = None,
        **schedule: Any,
    ) -> None:
        super().__init__(model, **schedule)
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss()
        self.batch_mix = batch_mix

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        with self._step_draws():
            if self.batch_mix is not None:
                inputs, labels = self.batch_mix(inputs, labels)
            logits = self.model(inputs)
        loss = self.loss(logits, labels)
        if self._logs_this_step():
            hard = labels.argmax(-1) if labels.dim() > 1 else labels
            accuracy = (logits.argmax(-1) == hard).float().mean()
            self.log_dict({"train/loss": loss, "train/accuracy": accuracy}, prog_bar=True)
            # also reaches the launching process of a spawn strategy (its trainer stays at 0)
            self.log("train/steps_done", float(self.global_step + 1), reduce_fx="max")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = batch
        logits = self.model(inputs)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        metrics = {"val/loss": self.eval_loss(logits, labels), "val/accuracy": accuracy}
        if logits.shape[-1] > 5:
            top5 = logits.topk(5, dim=-1).indices == labels[:, None]
            metrics["val/top5"] = top5.any(dim=-1).float().mean()
        self.log_dict(metrics, prog_bar=True, sync_dist=True)


class CausalLMModule(_ScheduledModule):
    """Next-token training of a language model.

    ``model(input_ids)`` returns logits ``(N, T, vocab)`` or an object with ``.logits``
    (Hugging Face ``*ForCausalLM``). A batch is ``input_ids (N, T)`` (int64), or a dict
    with ``input_ids`` and optionally ``labels`` (``-100`` = ignored). The loss is the
    cross-entropy of the logits at position ``t`` against the token at ``t + 1``;
    validation logs it and its perplexity. Optimizer and schedule as
    [`ClassificationModule`][gblr.recipes.engine.ClassificationModule].

    Examples:
        >>> import torch
        >>> from gblr.recipes.engine import CausalLMModule
        >>> model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
        >>> module = CausalLMModule(model, lr=1e-3, total_steps=10)
        >>> module(torch.randint(0, 256, (2, 12))).shape
        torch.Size([2, 12, 256])
    """

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids)
        return output.logits if hasattr(output, "logits") else output

    def model_input(self, batch: Any) -> Any:
        return batch["input_ids"] if isinstance(batch, dict) else batch

    def _summed_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss and the number of predicted tokens."""
        if isinstance(batch, dict):
            input_ids = batch["input_ids"]
            labels = batch.get("labels", input_ids)
        else:
            input_ids = labels = batch
        logits = self(input_ids)
        targets = labels[:, 1:].reshape(-1)
        total = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets,
            ignore_index=-100,
            reduction="sum",
        )
        return total, (targets != -100).sum()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with self._step_draws():
            total, count = self._summed_loss(batch)
        loss = total / count.clamp(min=1)
        if self._logs_this_step():
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._validation_sums: list[torch.Tensor] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        total, count = self._summed_loss(batch)
        self._validation_sums.append(torch.stack([total.detach(), count.to(total.dtype)]))

    def on_validation_epoch_end(self) -> None:
        # token-weighted over the whole split and all processes, so perplexity is exact
        sums = torch.stack(self._validation_sums).sum(0) if self._validation_sums else None
        if sums is None:
            return
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        loss = sums[0] / sums[1].clamp(min=1)
        self.log_dict({"val/loss": loss, "val/perplexity": loss.exp()}, prog_bar=True)


class ShuffleStream(torch.utils.data.Sampler[int]):
    """The whole run's sample order as one stream: reshuffled passes over the dataset, the
    pass ``e`` ordered by ``(seed, e)`` alone, starting at sample ``offset``.

    Lightning restarts a half-read loader from its beginning when resuming; with
    ``offset`` set to the samples already consumed (`_ResumeDataOrder`), the
    resumed run reads exactly what the uninterrupted run would have read.

    Examples:
        >>> from gblr.recipes.engine import ShuffleStream
        >>> order = list(ShuffleStream(size=5, num_samples=12, seed=0))
        >>> len(order), sorted(order[:5]), sorted(order[5:10])  # each pass is a permutation
        (12, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    """

    def __init__(self, size: int, num_samples: int, seed: int = 0) -> None:
        self.size, self.num_samples, self.seed, self.offset = size, num_samples, seed, 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        position = self.offset
        while position < self.num_samples:
            epoch, start = divmod(position, self.size)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.size, generator=generator)[start:].tolist()
            yield from order[: self.num_samples - position]
            position += len(order)


class _ResumeDataOrder(pl.Callback):
    """Saves how many samples the run consumed; restoring it (before Lightning builds the
    loader's iterator) moves the stream there.

    The count is read from the trainer's step when the checkpoint is written, not kept
    from a hook: a checkpoint saved by ``ModelCheckpoint``'s own end-of-step hook may run
    before this callback's, and must still count that step's batch.
    """

    def __init__(self, sampler: ShuffleStream, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, int]:
        steps = 0 if self._trainer is None else self._trainer.global_step
        return {"consumed": steps * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.offset = int(state_dict["consumed"])


@torch.no_grad()
def evaluate_topk(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, ks: tuple[int, ...] = (1, 5)
) -> tuple[float, ...]:
    """Top-k accuracies of ``model`` (in eval mode, on its own device) on ``dataset``
    (k larger than the number of classes counts every sample as correct). ``dataset``
    yields ``(input, label)`` pairs; ``model`` maps inputs ``(N, ...)`` to logits
    ``(N, classes)``.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from gblr.recipes.engine import evaluate_topk
        >>> model = torch.nn.Linear(4, 3)
        >>> inputs = torch.randn(20, 4)
        >>> labels = model(inputs).argmin(dim=1)  # the least likely class: right at k = 3 only
        >>> evaluate_topk(model, TensorDataset(inputs, labels), ks=(1, 3, 5))
        (0.0, 1.0, 1.0)
    """
    hits = topk_hits(model, dataset, batch_size, ks)
    return tuple(int(column.sum()) / max(len(column), 1) for column in hits.T)


@torch.no_grad()
def topk_hits(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, ks: tuple[int, ...] = (1, 5)
) -> torch.Tensor:
    """Which samples of ``dataset`` ``model`` (in eval mode, on its own device) gets right
    in its top k, for each k of ``ks``: a bool tensor ``(N, len(ks))`` in the dataset's
    order (what [`evaluate_topk`][gblr.recipes.engine.evaluate_topk] averages; a paired
    comparison of two models needs the samples themselves).

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from gblr.recipes.engine import topk_hits
        >>> model = torch.nn.Linear(4, 3)
        >>> inputs = torch.randn(5, 4)
        >>> labels = model(inputs).argmax(dim=1)
        >>> labels[0] = model(inputs[:1]).argmin()  # the least likely class: wrong at k = 1
        >>> topk_hits(model, TensorDataset(inputs, labels), ks=(1, 3))[:, 0].tolist()
        [False, True, True, True, True]
    """
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = []
    for inputs, labels in DataLoader(dataset, batch_size=batch_size):
        logits = model(inputs.to(device)).float().cpu()
        ranked = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
        in_top = ranked == labels[:, None]
        hits.append(torch.stack([in_top[:, :k].any(dim=-1) for k in ks], dim=1))
    model.train(training)
    return torch.cat(hits) if hits else torch.zeros(0, len(ks), dtype=torch.bool)


class _DropMessages(logging.Filter):
    def __init__(self, dropped: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.dropped = dropped

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.dropped(record)


@contextlib.contextmanager
def lightning_messages_dropped(dropped: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """Meanwhile, the messages Lightning logs about a fit (accelerators found, a
    checkpoint restored, the fit's stop, tips) for which ``dropped`` is true are not shown."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    line_filter = _DropMessages(dropped)
    logger.addFilter(line_filter)
    try:
        yield
    finally:
        logger.removeFilter(line_filter)


def _without_litlogger_tip() -> contextlib.AbstractContextManager[None]:
    """Lightning advertises its cloud logger on every Trainer made without it; a gblr run
    prints what the user can act on, so that one line is dropped (nothing else)."""
    return lightning_messages_dropped(lambda record: "litlogger" in record.getMessage())


def _lightning_trainer(options: dict[str, Any], chosen: dict[str, Any]) -> Any:
    """``lightning.Trainer(**options)``; options it refuses (an accelerator this machine
    lacks, ``devices=[0]`` on the CPU, an unknown option) are a ValueError naming the
    caller's ``chosen`` trainer options, not a traceback from inside Lightning."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        with _without_litlogger_tip():
            return pl.Trainer(**options)
    except (MisconfigurationException, ImportError, TypeError, ValueError, RuntimeError) as error:
        shown = ", ".join(f"{key}={value!r}" for key, value in chosen.items()) or "defaults"
        raise ValueError(
            f"Lightning cannot run these trainer options ({shown}) on this machine: {error}"
        ) from error


def _step_progress_bar():
    """Lightning's rich progress bar labelled "Training": gblr runs count steps
    (``max_epochs=-1``), where Lightning's label read "Epoch 0/-2"."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
                return super()._get_train_description(current_epoch)
            width = len(self.validation_description)
            return f"{'Training':{width}}"

        @property
        def total_train_batches(self) -> int | float:
            # A run of max_steps is one pass over a stream of that many batches, whose
            # position a resumed run restores: the bar counts from there, so its total is
            # the run's steps (Lightning's, the steps left, read "40/23" on a resume).
            trainer = self.trainer
            if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
                return trainer.max_steps
            return super().total_train_batches

    return StepProgressBar(leave=True)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in eval mode, on its own device) on ``dataset``.

    ``dataset`` yields ``(input, label)`` pairs; ``model`` maps a batch of inputs
    ``(N, ...)`` to logits ``(N, classes)``.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from gblr.recipes.engine import evaluate
        >>> model = torch.nn.Linear(4, 3)
        >>> inputs = torch.randn(20, 4)
        >>> labels = model(inputs).argmax(dim=1)  # the model's own predictions: all correct
        >>> evaluate(model, TensorDataset(inputs, labels), batch_size=8)
        1.0
    """
    return evaluate_topk(model, dataset, batch_size, ks=(1,))[0]


LOGGERS = ENGINE_LOGGERS


def _loggers(out_dir: str | Path | None, logger: str | None) -> Any:
    if out_dir is None or logger in (None, "none"):
        return False
    if logger not in LOGGERS:
        raise ValueError(f"logger must be one of {LOGGERS} or None, got {logger!r}")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = []
    if logger in ("csv", "both"):
        loggers.append(CSVLogger(str(out_dir), name="", version=""))  # out_dir/metrics.csv
    if logger in ("tensorboard", "both"):
        try:
            import tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "logger='tensorboard' needs TensorBoard: pip install 'gblr[train]'"
            ) from error
        loggers.append(TensorBoardLogger(str(out_dir), name="", version="tensorboard"))
    return loggers


def _include_patterns(include: str | list[str]) -> list[str]:
    patterns = [include] if isinstance(include, str) else list(include)
    return [q for p in patterns for q in (p, p + ".*")]


def _one_example(module: _ScheduledModule, train_set: Dataset) -> Any:
    """The first training sample as a batch of one, as the model takes it: the structured
    layers' costs are counted for one forward pass on it."""
    return module.model_input(torch.utils.data.default_collate([train_set[0]]))


def _structured_layers_flops(model: nn.Module, c: EngineConfig, example: Any) -> FlopsReport:
    """MACs of the ``structure_include`` layers (less ``structure_exclude``) in one forward
    pass on ``example``: what ``budget`` and the result's ``macs_ratio`` are fractions of.
    Per example, not per row: an MLP-Mixer's token-mixing layers run on more rows per
    example than its channel-mixing layers, and cost accordingly."""
    excluded = None if c.structure_exclude is None else _include_patterns(c.structure_exclude)
    parameter = next(model.parameters(), None)
    if parameter is not None:  # after a run the model may be on another device
        example = to_device(example, parameter.device)
    return count_flops(
        model, example, include=_include_patterns(c.structure_include), exclude=excluded
    )


def _learner_budget(model: nn.Module, c: EngineConfig, example: Any) -> dict[str, Any]:
    """The structure learner's budget keywords for ``c.budget`` of the structured layers'
    MACs in one forward pass on ``example`` (which the learner is given too).

    A layer that a global allocation kept dense (its share of the budget was at least its
    dense cost) counts in that budget but is not the learner's to move: its MACs come off
    the learner's, which then spends ``budget_macs``. With every structured layer a GBLR
    layer, the fraction as it is."""
    report = _structured_layers_flops(model, c, example)
    modules = dict(model.named_modules())
    learned = {id(layer) for _, layer in gblr_layers(model)}
    kept = [layer for layer in report.layers if id(modules[layer.name]) not in learned]
    if not kept:
        return {"budget": c.budget, "example_input": example}
    fixed = sum(layer.total_macs for layer in kept)
    budget_macs = math.floor(c.budget * report.dense_macs) - fixed
    if budget_macs <= 0:
        names = [layer.name for layer in kept]
        raise ValueError(
            f"budget={c.budget} of the structured layers ({report.dense_macs} dense MACs per "
            f"example) is spent by the layers that are not GBLR layers ({fixed} MACs: "
            f"{names[:3]}{' ...' if len(names) > 3 else ''}): nothing is left for the GBLR "
            "layers; raise the budget or exclude those layers (EngineConfig.structure_exclude; "
            "structure.exclude in a config)"
        )
    return {"budget_macs": budget_macs, "example_input": example}


def train_module(
    module: _ScheduledModule,
    train_set: Dataset,
    val_set: Dataset | None,
    config: EngineConfig | None = None,
    *,
    callbacks: Sequence[pl.Callback] = (),
    before_fit: Callable[[], None] | None = None,
    **deprecated: Any,
) -> dict[str, Any]:
    """Train a [`ClassificationModule`][gblr.recipes.engine.ClassificationModule] or
    [`CausalLMModule`][gblr.recipes.engine.CausalLMModule] as ``config`` says (its optimizer fields
    are the module's own, given when it was made); see
    [`train_classifier`][gblr.recipes.engine.train_classifier]. ``callbacks``: more Lightning
    callbacks. ``before_fit``: called once the ``Trainer`` is built (its options checked) and before
    training
    starts, in the launching process only: where a recipe writes into its run folder, so
    that a run failing at start-up writes nothing. The keywords it took before
    [`EngineConfig`][gblr.recipes.engine_config.EngineConfig] still work until gblr 0.3, with a
    ``FutureWarning``.

    Returns:
        ``{"macs_ratio", "seconds", "steps", "global_rank"}``.

    Examples:
        >>> import tempfile
        >>> from gblr.recipes.data import digits
        >>> from gblr.recipes.engine import ClassificationModule, EngineConfig, train_module
        >>> from gblr.recipes.models import VisionTransformer
        >>> train, test = digits()
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> module = ClassificationModule(model, total_steps=2)
        >>> config = EngineConfig(
        ...     steps=2, batch_size=8, logger=None, progress=False, out_dir=tempfile.mkdtemp(),
        ... )
        >>> result = train_module(module, train, None, config)
        >>> result["steps"], result["global_rank"]
        (2, 0)
    """
    config, old_callbacks = engine_config_from_keywords("train_module", config, deprecated)
    return _run(module, train_set, val_set, config, [*old_callbacks, *callbacks], before_fit)


def _run(
    module: _ScheduledModule,
    train_set: Dataset,
    val_set: Dataset | None,
    config: EngineConfig,
    extra_callbacks: list[pl.Callback],
    before_fit: Callable[[], None] | None,
) -> dict[str, Any]:
    """The run of [`train_module`][gblr.recipes.engine.train_module] (``config`` checked)."""
    c = config
    model = module.model
    resumed_step = None
    if c.resume is not None:  # a recipe's run_info holds its config: resumed only unchanged
        resumed_step = check_resume(c.resume, model, module.run_info.get("config"))
    if c.compile_mode is not None:
        # In place (nn.Module.compile): parameter names, checkpoints and the learner's view
        # of the GBLR layers stay those of the eager model. GBLR layers compile to one graph
        # whose sigma is a tensor, so the learner's annealing does not recompile it.
        model.compile(mode=None if c.compile_mode == "default" else c.compile_mode)
    pl.seed_everything(c.seed, workers=True, verbose=False)
    module.step_seed = c.seed
    example = _one_example(module, train_set)
    callbacks: list[pl.Callback] = []
    if gblr_layers(model) and c.budget is not None:
        callbacks.append(
            GBLRCallback(
                config=c.learner,
                **_learner_budget(model, c, example),
                # a run shorter than the ramp (a smoke run of a recipe) ramps over itself
                warmup_steps=min(
                    c.steps, c.warmup_steps if c.budget_ramp_steps is None else c.budget_ramp_steps
                ),
                sigma_start_step=c.sigma_start_step,
                total_steps=c.steps,
                # on the trainer's writes every 50 steps (a call of self.log costs
                # Lightning about a millisecond, and the summary is eight of them); a
                # shorter run on each of its writes
                log_every_n_steps=50 if c.steps >= 50 else None,
            )
        )
    if c.progress:
        # without rich, Lightning's own tqdm bar
        with contextlib.suppress(ImportError, ModuleNotFoundError):
            callbacks.append(_step_progress_bar())
    callbacks.extend(extra_callbacks)
    if c.checkpoint_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(
            ModelCheckpoint(
                dirpath=str(c.checkpoint_dir),
                save_last=True,
                every_n_train_steps=c.checkpoint_every_n_steps,
                # always last.ckpt: a last-v1.ckpt next to an old one would make a later
                # --resume continue the old run
                enable_version_counter=False,
            )
        )
    validate = val_set is not None and c.val_every_n_steps is not None
    trainer_options = {
        "max_steps": c.steps if c.stop_after is None else min(c.stop_after, c.steps),
        "accelerator": "cpu",
        "logger": _loggers(c.out_dir, c.logger),
        "callbacks": callbacks,
        "enable_checkpointing": c.checkpoint_dir is not None,
        "enable_progress_bar": c.progress,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": min(10, c.steps),  # a short run logs too
        "deterministic": True,
        "limit_val_batches": 1.0 if validate else 0,
    }
    if validate:
        trainer_options["val_check_interval"] = c.val_every_n_steps
    trainer_options.update(c.trainer)
    # a run shorter than log_every_n_steps wrote no metrics.csv at all (Lightning writes
    # to its loggers only on those steps)
    trainer_options["log_every_n_steps"] = max(
        1, min(trainer_options["log_every_n_steps"], trainer_options["max_steps"])
    )
    trainer = _lightning_trainer(trainer_options, chosen=c.trainer)
    batch_size = c.batch_size
    if c.global_batch_size is not None:
        if c.global_batch_size % trainer.world_size:
            raise ValueError(
                f"global_batch_size={c.global_batch_size} must be a multiple of the number of "
                f"processes ({trainer.world_size})"
            )
        batch_size = c.global_batch_size // trainer.world_size
    from .run_folder import is_launching_process

    if is_launching_process():
        if before_fit is not None:
            before_fit()
        if resumed_step is not None and c.out_dir is not None:
            _set_aside_metrics(Path(c.out_dir))
    # One sampler stream for the whole run; Lightning splits it over the processes.
    sampler = ShuffleStream(len(train_set), c.steps * batch_size * trainer.world_size, c.seed)
    trainer.callbacks.append(_ResumeDataOrder(sampler, batch_size * trainer.world_size))
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=c.num_workers,
        persistent_workers=c.num_workers > 0,
    )
    val_loader = (
        DataLoader(val_set, batch_size=batch_size, num_workers=c.num_workers) if validate else None
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        # ShuffleStream + _ResumeDataOrder make a mid-epoch resume exact
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
        # Expected here, nothing a user can act on: the modules always define a
        # validation step (used only with a validation set), and Lightning's own pytree
        # call trips a deprecation inside Lightning.
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_data")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        # A recipe writes its config.yaml first, and replaces or sets aside (on resume) an
        # older run's metrics itself: the CSV logger's warning about a folder that is not
        # empty says nothing here.
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* not empty")
        if c.resume is not None:  # the folder holds the checkpoint being resumed
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
        trainer.fit(
            module,
            loader,
            val_loader,
            ckpt_path=None if c.resume is None else str(c.resume),
            weights_only=True,  # a checkpoint never runs code (read_checkpoint checked it)
        )
    # with the time of the run before the checkpoint it resumed, as the checkpoint says
    seconds = module.seconds_before + time.perf_counter() - start
    if resumed_step is not None and c.out_dir is not None and trainer.is_global_zero:
        _merge_metrics(Path(c.out_dir), resumed_step)
    trained_nothing = resumed_step is not None and trainer.global_step == resumed_step
    if trained_nothing and c.checkpoint_dir is not None and trainer.is_global_zero:
        _keep_finished_checkpoint(Path(c.resume), Path(c.checkpoint_dir))
    flops = _structured_layers_flops(model, c, example)
    return {
        "macs_ratio": flops.ratio,
        "seconds": seconds,
        "steps": max(trainer.global_step, int(trainer.callback_metrics.get("train/steps_done", 0))),
        "global_rank": trainer.global_rank,
    }


def _keep_finished_checkpoint(resumed: Path, folder: Path) -> None:
    """A run resumed from a checkpoint at its last step trains nothing, so Lightning
    saves nothing: where ``folder`` (the run's checkpoints) has no ``last.ckpt``, the
    checkpoint it resumed (called only when no step was trained: it holds the model the
    run ends with) is copied there, so the run resumes from its own folder as any other."""
    target = folder / "last.ckpt"
    if target.exists() or not resumed.is_file() or resumed.resolve() == target.resolve():
        return
    copy_atomically(resumed, target)


def _module_options(config: EngineConfig, run_info: dict[str, Any] | None) -> dict[str, Any]:
    """The options of [`ClassificationModule`][gblr.recipes.engine.ClassificationModule] /
    [`CausalLMModule`][gblr.recipes.engine.CausalLMModule] that ``config`` holds."""
    return dict(
        lr=config.lr,
        min_lr=config.min_lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
        structure_lr=config.structure_lr,
        run_info=run_info,
    )


def train_classifier(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset | None,
    config: EngineConfig | None = None,
    *,
    batch_mix: Any = None,
    run_info: dict[str, Any] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    before_fit: Callable[[], None] | None = None,
    **deprecated: Any,
) -> dict[str, Any]:
    """Train ``model`` as ``config`` (an [`EngineConfig`][gblr.recipes.engine_config.EngineConfig])
    says and evaluate it.

    A [`ClassificationModule`][gblr.recipes.engine.ClassificationModule] of ``model`` with
    ``config``'s optimizer, run by a Lightning ``Trainer`` (``config.trainer``: devices, nodes,
    strategy, precision are Lightning's own options). With GBLR layers in ``model`` and a
    ``config.budget``, a [`gblr.integrations.lightning.GBLRCallback`][] ramps their cost from the
    starting cost to the budget over ``budget_ramp_steps`` (default ``warmup_steps``) and anneals
    σ from ``sigma_start_step`` on, as ``config.learner`` says (default: ``LearnerConfig()``,
    the library's default from scratch; a recipe's ``learner`` section gives it through
    [`gblr.recipes.config.learner_config`][]). ``test_set`` (optional) is also the
    validation set every ``val_every_n_steps``.

    ``batch_mix``: applied to each training batch (see
    [`ClassificationModule`][gblr.recipes.engine.ClassificationModule]); ``run_info``: stored in
    every checkpoint under ``"gblr"`` (a recipe's config, which a resume then must match);
    ``callbacks``: more Lightning callbacks; ``before_fit``: see
    [`train_module`][gblr.recipes.engine.train_module]. The keywords it took before
    [`EngineConfig`][gblr.recipes.engine_config.EngineConfig] (``steps=``, ``lr=``, ``target=``,
    ..., Lightning's options) still work until gblr 0.3, with a
    ``FutureWarning``, and give the same run.

    Checkpoints: with ``checkpoint_dir``, Lightning saves ``last.ckpt`` there (model,
    optimizer, schedule, step, the structure learner's state and the model's layer
    types) every ``checkpoint_every_n_steps`` and at the end; ``resume`` (a checkpoint
    path) continues such a run, after checking that it holds a model of this structure
    (and, when ``run_info`` holds a config, that it was written with it). ``stop_after``
    ends the run early at that step while every schedule still spans ``steps`` (an
    interruption). Resuming reproduces the uninterrupted run exactly: the data order is
    one seeded stream over the whole run ([`ShuffleStream`][gblr.recipes.engine.ShuffleStream]),
    resumed at the samples consumed.

    Returns:
        ``{"accuracy", "top5", "macs_ratio", "seconds", "steps", "global_rank"}``: test
        top-1 and top-5 accuracy (nan without ``test_set``), MACs of the
        ``structure_include`` layers over their dense MACs, wall time of training,
        optimizer steps taken, this process's rank.

    Examples:
        Two steps of a tiny GBLR ViT on the digits (inputs ``(1, 8, 8)``, 10 classes):

        >>> import tempfile
        >>> import torch
        >>> from gblr.recipes.data import digits
        >>> from gblr.recipes.engine import EngineConfig, train_classifier
        >>> from gblr.recipes.models import VisionTransformer, structure_model
        >>> train, test = digits()
        >>> model = VisionTransformer(dim=16, depth=1, heads=2)
        >>> _ = structure_model(model, "gblr", 0.5)
        >>> config = EngineConfig(
        ...     steps=2, batch_size=8, budget=0.5, logger=None, progress=False,
        ...     out_dir=tempfile.mkdtemp(), trainer={"accelerator": "cpu"},
        ... )
        >>> result = train_classifier(model, train, test, config)
        >>> sorted(result)
        ['accuracy', 'global_rank', 'macs_ratio', 'seconds', 'steps', 'top5']
        >>> result["steps"], 0.0 <= result["accuracy"] <= 1.0, round(result["macs_ratio"], 1)
        (2, True, 0.5)
    """
    config, old_callbacks = engine_config_from_keywords("train_classifier", config, deprecated)
    module = ClassificationModule(
        model,
        label_smoothing=config.label_smoothing,
        batch_mix=batch_mix,
        **_module_options(config, run_info),
    )
    result = _run(module, train_set, test_set, config, [*old_callbacks, *callbacks], before_fit)
    top1, top5 = (math.nan, math.nan) if test_set is None else evaluate_topk(model, test_set)
    return {"accuracy": top1, "top5": top5, **result}


def train_language_model(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    config: EngineConfig | None = None,
    *,
    run_info: dict[str, Any] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    before_fit: Callable[[], None] | None = None,
    **deprecated: Any,
) -> dict[str, Any]:
    """Train a causal language model ([`CausalLMModule`][gblr.recipes.engine.CausalLMModule]) on
    ``train_set`` (blocks of token ids ``(T,)`` int64) as ``config`` says; options as
    [`train_classifier`][gblr.recipes.engine.train_classifier] (``config.label_smoothing`` must be
    0). ``val_set`` blocks are scored every ``val_every_n_steps`` (``val/loss``,
    ``val/perplexity``).

    Returns:
        ``{"macs_ratio", "seconds", "steps", "global_rank"}``.

    Raises:
        ValueError: ``config.label_smoothing`` is not 0.

    Examples:
        Two steps of a tiny byte-level language model (blocks of 16 token ids):

        >>> import tempfile
        >>> import torch
        >>> from gblr.recipes.engine import EngineConfig, train_language_model
        >>> from gblr.recipes.text import LMBlocks, load_tokenizer, token_stream
        >>> stream = token_stream("the cat sat on the mat. " * 20, load_tokenizer("bytes"))
        >>> blocks = LMBlocks(stream, block_size=16)
        >>> model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
        >>> config = EngineConfig(
        ...     steps=2, batch_size=4, logger=None, progress=False, out_dir=tempfile.mkdtemp()
        ... )
        >>> result = train_language_model(model, blocks, blocks, config)
        >>> sorted(result), result["steps"]
        (['global_rank', 'macs_ratio', 'seconds', 'steps'], 2)
    """
    config, old_callbacks = engine_config_from_keywords("train_language_model", config, deprecated)
    if config.label_smoothing:
        raise ValueError(
            "train_language_model: EngineConfig.label_smoothing must be 0 (a classifier's "
            f"option), got {config.label_smoothing!r}"
        )
    module = CausalLMModule(model, **_module_options(config, run_info))
    return _run(module, train_set, val_set, config, [*old_callbacks, *callbacks], before_fit)
