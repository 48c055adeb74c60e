"""The structure learner's optional passes: the interface, their schedule, and the two
passes that only constrain the proximal step (``adaptive``, ``shift_limit``).

A pass is built from its sub-config of [`gblr.LearnerConfig`][] and the GBLR layers,
and the learner calls its hooks at fixed points of every `StructureLearner.step`
(docs/design.md, "Adding a learner pass"):

1. ``before_shrink(step)``: after the optimizer moved the structure, before the learner
   wraps locations and clamps widths (``shift_limit``);
2. ``threshold_scale()``: a ``(ΣK,)`` factor on every component's threshold, or ``None``
   (``adaptive``);
3. ``after_shrink(step)``: after the proximal shrink, in the order of
   ``StructureLearner.PASSES`` (``merge``, ``untangle``, ``refine``); a pass here must
   not raise the MACs;
4. ``end_step(step)``: last, before the next σ is written (``shift_limit`` keeps the
   structure of this step).

The merge, untangle and refine passes live with their algorithms (``merge.py``,
``untangle.py``, ``refine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..layers.base import GBLRMatrixMixin
from ..ops.gaudi import boxcar_mask
from .config import AdaptiveConfig, ShiftLimitConfig

__all__ = ["AdaptivePass", "LearnerPass", "PassSchedule", "ShiftLimitPass", "component_importance"]


@dataclass(frozen=True)
class PassSchedule:
    """When the passes run: after the budget ramp of ``warmup_steps`` steps, every
    ``every`` steps (``LearnerConfig.pass_every``).

    Examples:
        >>> from gblr.learn.passes import PassSchedule
        >>> schedule = PassSchedule(warmup_steps=20, every=10)
        >>> [s for s in range(1, 50) if schedule.is_pass_step(s)]
        [30, 40]
        >>> [s for s in range(1, 50) if schedule.is_half_step(s)]
        [25, 35, 45]
    """

    warmup_steps: int
    every: int

    def ramp_over(self, step: int) -> bool:
        """Whether the budget ramp is over at learner step ``step`` (counted from 1)."""
        return step > self.warmup_steps

    def is_pass_step(self, step: int) -> bool:
        """A merge and untangle step: every ``every`` steps after the ramp."""
        return self.ramp_over(step) and step % self.every == 0

    def is_half_step(self, step: int) -> bool:
        """A refine step: half-way between two pass steps, after the ramp."""
        return self.ramp_over(step) and step % self.every == self.every // 2


class LearnerPass:
    """One optional behaviour of [`gblr.StructureLearner`][]; every hook does nothing
    unless a subclass overrides it.

    Subclasses set ``name`` (their [`gblr.LearnerConfig`][] field, also their key in
    the learner's ``state_dict()["passes"]``), are built as ``(config, layers,
    schedule)`` and set up their state in `start`.
    `state_dict` keys are those of the learner's flat state before the passes
    were split out, so that `load_state_dict` reads either form (missing keys:
    the pass's defaults).

    Examples:
        >>> import gblr
        >>> from gblr.learn.passes import LearnerPass, PassSchedule
        >>> class Counter(LearnerPass):
        ...     name = "counter"
        ...     def after_shrink(self, step):
        ...         self.calls = getattr(self, "calls", 0) + 1
        >>> counter = Counter(None, [gblr.GBLRLinear(4, 4)], PassSchedule(0, 10))
        >>> counter.after_shrink(1); counter.calls
        1
    """

    name: ClassVar[str]
    # An int attribute counting what the pass did, reported under its name in the summary.
    counter: ClassVar[str | None] = None

    def __init__(self, config: Any, layers: list[GBLRMatrixMixin], schedule: PassSchedule) -> None:
        self.config = config
        self.layers = layers
        self.schedule = schedule
        # Per layer, the ``(2, K)`` bool mask of the sides the learner holds
        # (``LearnerConfig.hold_narrow_sides``), or ``None``: the learner puts a held side's
        # width and both locations of its component back at its next step, so a pass that
        # moved them would be half undone. The learner sets it.
        self.held: list[Tensor | None] = [None] * len(layers)
        self.start()

    def movable(self, index: int) -> Tensor | None:
        """``(K,)`` bool: the components of layer ``index`` that hold no side (a pass may
        change their intervals), or ``None`` when the learner holds nothing there."""
        held = self.held[index]
        return None if held is None else ~held.any(0)

    def start(self) -> None:
        """Set up the pass's state for a new run (called by ``__init__``)."""

    def before_shrink(self, step: int) -> None:
        """Called once the optimizer has moved the structure, before the shrink."""

    def threshold_scale(self) -> Tensor | None:
        """A ``(ΣK,)`` float64 factor on each component's threshold, or ``None``."""
        return None

    def after_shrink(self, step: int) -> None:
        """Called after the proximal shrink; must not raise the MACs."""

    def end_step(self, step: int) -> None:
        """Called last in the step, once every pass has run."""

    def summary(self) -> dict[str, float]:
        """Numbers for `StructureLearner.summary` (default: the counter)."""
        return {} if self.counter is None else {self.counter: float(getattr(self, self.counter))}

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs (tensors cloned by the caller when it copies)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output; the model's state is already loaded."""


def component_importance(layers: list[GBLRMatrixMixin]) -> Tensor:
    """``(ΣK,)`` float64 RMS entry of each component's exact (boxcar-masked) block,
    ``‖D(a_k) U_k‖ ‖V_k D(b_k)‖ / sqrt(|R_k| |C_k|)``, over all layers in order; 0 for
    dead components.

    Examples:
        >>> import gblr
        >>> from gblr.learn.passes import component_importance
        >>> layer = gblr.GBLRLinear(8, 8, num_components=2, widths=[[1.0, 0.0], [1.0, 1.0]],
        ...                         locations=[[0.0, 0.0], [0.0, 0.0]])
        >>> importance = component_importance([layer])
        >>> importance.shape, bool(importance[0] > 0), float(importance[1])
        (torch.Size([2]), True, 0.0)
    """
    values = []
    for layer in layers:
        col_mask = boxcar_mask(layer.widths[0], layer.locations[0], layer.cols, layer.U.dtype)
        row_mask = boxcar_mask(layer.widths[1], layer.locations[1], layer.rows, layer.U.dtype)
        u = (layer.U.detach() * row_mask.unsqueeze(1)).flatten(1).norm(dim=1)
        v = (layer.V.detach() * col_mask.unsqueeze(1)).flatten(1).norm(dim=1)
        area = (row_mask.sum(1) * col_mask.sum(1)).clamp_min(1.0)
        values.append((u * v / area.sqrt()).to(torch.float64))
    return torch.cat(values)


class AdaptivePass(LearnerPass):
    """Adaptive-lasso thresholds ([`gblr.AdaptiveConfig`][]): each component's
    threshold weighted by ``(mean importance / importance_k) ** exponent``
    ([`component_importance`][gblr.learn.passes.component_importance]), so that components carrying
    little weight per MAC shrink first.

    Examples:
        >>> import gblr
        >>> from gblr.learn.passes import AdaptivePass, PassSchedule
        >>> layer = gblr.GBLRLinear(8, 8, num_components=2)
        >>> scale = AdaptivePass(gblr.AdaptiveConfig(1.0), [layer], PassSchedule(0, 10))
        >>> scale.threshold_scale().shape
        torch.Size([2])
    """

    name = "adaptive"
    config: AdaptiveConfig

    def threshold_scale(self) -> Tensor | None:
        # The mean is over live components, so a typical component keeps the uniform
        # threshold; empty ones (RMS near 0) are capped at 1000 ** exponent times it.
        importance = component_importance(self.layers)
        live = importance > 0
        if not bool(live.any()):
            return None
        reference = importance[live].mean()
        ratio = reference / importance.clamp_min(1e-3 * float(reference))
        return ratio.pow(self.config.exponent)


class ShiftLimitPass(LearnerPass):
    """Limits each width and location to a few grid cells of its value after the
    previous step ([`gblr.ShiftLimitConfig`][]), clamping the optimizer's move before
    the proximal shrink.

    Why: with the paper's Adam betas ``(0, 0.999)`` a converged structure sees tiny
    gradients for hundreds of steps, so Adam's second moment decays; when a drifting
    location then crosses a rounding boundary the loss jumps and Adam's normalised step
    reaches ``lr / sqrt(1 - β2) ≈ 32 lr``, many cells. The reference is the structure
    after the previous step, so load the model's state before the learner's when
    resuming.

    Examples:
        >>> import torch, gblr
        >>> from gblr.learn.passes import PassSchedule, ShiftLimitPass
        >>> layer = gblr.GBLRLinear(8, 8, num_components=1, widths=[[0.5], [0.5]],
        ...                         locations=[[0.0], [0.0]])
        >>> limit = ShiftLimitPass(gblr.ShiftLimitConfig(1.0), [layer], PassSchedule(0, 10))
        >>> with torch.no_grad():  # the learner calls its passes under no_grad
        ...     _ = layer.widths.add_(0.5)  # the optimizer moved four cells at once
        ...     limit.before_shrink(1)
        >>> layer.widths.tolist()  # one cell, 1/8, of the previous step's 0.5
        [[0.625], [0.625]]
    """

    name = "shift_limit"
    config: ShiftLimitConfig

    def start(self) -> None:
        self.previous = self._snapshot()

    def _snapshot(self) -> list[tuple[Tensor, Tensor]]:
        return [(layer.widths.detach().clone(), layer.locations.detach().clone())
                for layer in self.layers]  # fmt: skip

    def before_shrink(self, step: int) -> None:
        ramp_over = self.schedule.ramp_over(step)
        cells = self.config.cells if ramp_over else self.config.cells_during_ramp
        if cells is None:
            return
        for layer, (widths, locations) in zip(self.layers, self.previous):
            cell = torch.tensor(
                [[1.0 / layer.cols], [1.0 / layer.rows]], dtype=widths.dtype, device=widths.device
            )
            limit = cells * cell
            layer.widths.copy_(torch.clamp(layer.widths, widths - limit, widths + limit))
            layer.locations.copy_(
                torch.clamp(layer.locations, locations - limit, locations + limit)
            )

    def end_step(self, step: int) -> None:
        self.previous = self._snapshot()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = self._snapshot()  # the model's structure, loaded before the learner
