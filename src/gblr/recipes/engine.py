"""The Lightning training engine shared by the recipes and ``gblr demo``.

``ClassificationModule`` wraps any classifier: AdamW over :func:`gblr.param_groups`
(structure parameters get their own group), linear warm-up then cosine decay, loss and
accuracy logged. :func:`train_classifier` runs it with a Lightning ``Trainer`` (devices,
nodes, strategy and precision are Lightning's own options) and, for models with GBLR
layers, the :class:`gblr.integrations.lightning.GBLRCallback`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("the training engine needs Lightning: pip install 'gblr[train]'") from error

from ..cost import count_flops
from ..integrations.lightning import GBLRCallback
from ..learn.groups import gblr_layers, param_groups

__all__ = ["ClassificationModule", "ShuffleStream", "evaluate", "train_classifier"]


class ClassificationModule(pl.LightningModule):
    """Cross-entropy training of ``model`` (``(N, ...) -> (N, classes)`` logits).

    Args:
        model: the classifier.
        lr: peak learning rate (AdamW) of every parameter group.
        weight_decay: AdamW weight decay of weight matrices (not biases, norms, structure).
        warmup_steps: linear warm-up from 0 to ``lr``.
        total_steps: cosine decay to 0 at this step.
        structure_lr: learning rate of widths and locations (default ``lr``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        total_steps: int = 1000,
        structure_lr: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.structure_lr = lr, weight_decay, structure_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.loss = nn.CrossEntropyLoss()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        logits = self.model(inputs)
        loss = self.loss(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": accuracy}, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = batch
        logits = self.model(inputs)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        self.log_dict(
            {"val/loss": self.loss(logits, labels), "val/accuracy": accuracy}, prog_bar=True
        )

    def configure_optimizers(self) -> Any:
        groups = param_groups(
            self.model, lr=self.lr, structure_lr=self.structure_lr, weight_decay=self.weight_decay
        )
        optimizer = torch.optim.AdamW(groups)
        warmup, total = self.warmup_steps, max(self.total_steps, self.warmup_steps + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / (total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ShuffleStream(torch.utils.data.Sampler[int]):
    """The whole run's sample order as one stream: reshuffled passes over the dataset, the
    pass ``e`` ordered by ``(seed, e)`` alone, starting at sample ``offset``.

    Lightning restarts a half-read loader from its beginning when resuming; with
    ``offset`` set to the samples already consumed (:class:`_ResumeDataOrder`), the
    resumed run reads exactly what the uninterrupted run would have read.
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
    loader's iterator) moves the stream there."""

    def __init__(self, sampler: ShuffleStream, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self._consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.offset = int(state_dict["consumed"])

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._consumed = trainer.global_step * self.batch_size

    _consumed = 0


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``dataset``."""
    training = model.training
    model.eval()
    correct = total = 0
    for inputs, labels in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(inputs).argmax(-1) == labels).sum())
        total += len(labels)
    model.train(training)
    return correct / max(total, 1)


def train_classifier(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    target: float | None = None,
    sigma: tuple[float, float] = (1.0, 100.0),
    structure_include: str = "blocks.*",
    out_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    extra_callbacks: list[pl.Callback] | None = None,
    **trainer_kwargs: Any,
) -> dict[str, float]:
    """Train ``model`` for ``steps`` optimizer steps and evaluate it.

    With GBLR layers in ``model`` and a ``target`` (fraction of their dense MACs), a
    structure learner ramps their cost from the starting cost to ``target`` over the
    warm-up and anneals σ over ``sigma``. ``trainer_kwargs`` go to ``lightning.Trainer``
    (``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ``precision``, ...).

    Checkpoints: with ``checkpoint_dir``, Lightning saves ``last.ckpt`` there (model,
    optimizer, schedule, step and the structure learner's state) every 50 steps and at
    the end; ``resume`` (a checkpoint path) continues such a run. ``stop_after`` ends the
    run early at that step while every schedule still spans ``steps`` (an interruption).
    Resuming reproduces the uninterrupted run exactly: the data order is one seeded
    stream over the whole run (:class:`ShuffleStream`), resumed at the samples consumed.

    Returns:
        ``{"accuracy", "macs_ratio", "seconds", "steps"}``: test accuracy, MACs of the
        ``structure_include`` layers over their dense MACs, wall time of training.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    module = ClassificationModule(
        model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, total_steps=steps
    )
    callbacks: list[pl.Callback] = []
    if gblr_layers(model) and target is not None:
        callbacks.append(
            GBLRCallback(target=target, warmup_steps=warmup_steps, sigma=sigma, total_steps=steps)
        )
    if progress:
        try:
            from lightning.pytorch.callbacks import RichProgressBar

            callbacks.append(RichProgressBar(leave=True))
        except (ImportError, ModuleNotFoundError):  # rich not installed: Lightning's tqdm bar
            pass
    logger: Any = False
    if out_dir is not None:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(str(out_dir), name="", version="")
    sampler = ShuffleStream(len(train_set), steps * batch_size, seed)
    callbacks.append(_ResumeDataOrder(sampler, batch_size))
    callbacks.extend(extra_callbacks or [])
    if checkpoint_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(
            ModelCheckpoint(dirpath=str(checkpoint_dir), save_last=True, every_n_train_steps=50)
        )
    trainer_options = {
        "max_steps": steps if stop_after is None else min(stop_after, steps),
        "accelerator": "cpu",
        "logger": logger,
        "callbacks": callbacks,
        "enable_checkpointing": checkpoint_dir is not None,
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 10,
        "deterministic": True,
    }
    trainer_options.update(trainer_kwargs)
    trainer = pl.Trainer(**trainer_options)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True)
    start = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=None if resume is None else str(resume))
    seconds = time.perf_counter() - start
    flops = count_flops(model, include=[structure_include + ".*", structure_include])
    return {
        "accuracy": evaluate(model, test_set),
        "macs_ratio": flops.ratio,
        "seconds": seconds,
        "steps": trainer.global_step,
    }
