"""``StructureLearner``: proximal width updates, σ annealing and an exact FLOPs budget.

The objective (docs/design.md#learning-the-structure) is ``L(θ) + λ · Σ_layers cost(W)``,
with the cost relaxed to ``Σ_k r (w_R,k m + w_C,k n)``. After every optimizer step, each
width is soft-thresholded by ``τ · (its cost per unit width)`` and clamped to [0, 1];
locations wrap modulo 1:

- λ mode: ``τ = η λ / D`` (``η`` the structure learning rate, ``D`` the dense MACs of all
  GBLR layers, so ``λ`` is the penalty per unit of the model's dense cost);
- budget mode: ``τ`` is the smallest global threshold, found by bisection, for which the
  exact (integer, live-components-only) cost of all GBLR layers is at most the target.
  Layers compete for one budget.

Six options, off by default, make recovery of a planted structure more reliable
(``benchmarks/bench_learner.py``): ``adaptive`` (adaptive-lasso thresholds, weighted by each
component's weight per MAC), ``max_shift`` (after the budget ramp, structure moves are
limited to a few grid cells per step, against Adam's spikes), ``max_shift_ramp`` (a
looser limit during the ramp), ``merge`` (after the ramp, pairs of components whose sum
is one cheaper component are merged, :func:`gblr.merge_components`), ``untangle``
(after the ramp, settled pairs of rank-1 components are re-split into blocks on smaller
intervals, :func:`gblr.untangle_components`) and ``refine`` (after the ramp, one interval
end cell per layer moves to where a quadratic model of the loss gains most,
:mod:`gblr.learn.refine`). They are for synthetic recovery experiments: on real tasks
they did not help, and all six together collapsed a ViT trained from scratch on digits to
29-62% test accuracy (``benchmarks/realtasks.py``; docs/faq.md).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..cost import fraction_budget_macs
from ..layers.base import GBLRMatrixMixin, check_sigma_fits_buffer
from ..ops.gaudi import boxcar_mask
from .groups import gblr_layers
from .merge import _check_fraction, _masked_factors, _merge_layer
from .refine import _refine_layer, average_gradients_across_processes, secant_curvature
from .untangle import _untangle_layer

__all__ = ["SIGMA_SCHEDULES", "StructureLearner"]

SIGMA_SCHEDULES = ("linear", "geometric", "constant")
_BISECTION_STEPS = 60
# A component is settled for untangling when its exact block moved by at most this
# fraction (relative Frobenius) since the previous pass. On the planted-structure
# benchmark a prototype untangling every pair every 10 steps cut blocks that were still
# growing (8/20 at 1.1x the planted cost); with this check and the two guards below, 20/20.
_SETTLED = 1e-2
# Fraction of a pair's MACs an untangling must save: smaller rewrites change the
# factorization (and so the course of training) for nothing.
_UNTANGLE_MIN_SAVING = 0.05
# An untangled pair whose MACs grow back by this fraction of what untangling saved is
# never untangled again: the loss wants those entries, and repeating would fight it.
_UNTANGLE_REGROWTH = 0.5
# refine: the curvature used is the median of each layer's last secant estimates (one per
# pass; a single estimate can be far off when a rounding boundary was crossed).
_CURVATURE_HISTORY = 8


def _finite_record(record: dict[str, Tensor]) -> bool:
    """Whether a refine record's factors and gradients are all finite."""
    names = ("u", "v", "grad_u", "grad_v")
    return bool(torch.stack([torch.isfinite(record[n]).all() for n in names]).all())


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _budget_threshold(
    view: _StructureView, widths: Tensor, target: int, scale: Tensor | None = None
) -> float:
    """Smallest global threshold whose shrunk widths cost at most ``target`` MACs."""
    if view.cost(widths) <= target:
        return 0.0
    per_unit = view.unit_cost if scale is None else view.unit_cost * scale
    low, high = 0.0, float((widths / per_unit).max().item()) * (1 + 1e-9) + 1e-12
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if view.cost(view.shrink(widths, middle, scale)) <= target:
            high = middle
        else:
            low = middle
    return high


def project_to_budget(layers: list[GBLRMatrixMixin], macs: int) -> None:
    """Shrink the layers' widths (one global soft threshold, in place) until their exact
    MACs per row are at most ``macs``: the learner's budget projection, applied once."""
    view = _StructureView(layers)
    widths = view.widths().clamp(0.0, 1.0)
    view.write(view.shrink(widths, _budget_threshold(view, widths, macs)))


class _StructureView:
    """All GBLR widths of a model as flat ``(2, ΣK)`` tensors, for vectorized cost math."""

    def __init__(self, layers: list[GBLRMatrixMixin]) -> None:
        self.layers = layers
        dims, ranks = [], []
        for layer in layers:
            k = layer.num_components
            dims.append(torch.tensor([[layer.cols] * k, [layer.rows] * k], dtype=torch.float64))
            ranks.append(torch.full((k,), float(layer.rank_per_component), dtype=torch.float64))
        device = layers[0].widths.device
        # Costs are computed in the widths' own precision, so that they round exactly as
        # the layers' flops() do.
        dtypes = {layer.widths.dtype for layer in layers}
        self.dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self.dims = torch.cat(dims, dim=1).to(device)
        self.dims_in_dtype = self.dims.to(self.dtype)  # cost() runs ~60 times per step
        self.ranks = torch.cat(ranks).to(device)
        # Relaxed cost per unit of width: r * m for a row width, r * n for a column width.
        self.unit_cost = self.dims * self.ranks
        self.dense_macs = sum(layer.rows * layer.cols for layer in layers)

    def widths(self) -> Tensor:
        return torch.cat([layer.widths.detach().to(torch.float64) for layer in self.layers], 1)

    def cost(self, widths: Tensor) -> int:
        """Exact MACs of the widths (clamped to [0, 1]): live components only."""
        widths = widths.clamp(0.0, 1.0).to(self.dtype)
        lengths = torch.round(widths * self.dims_in_dtype)
        live = (lengths > 0).all(dim=0)
        return int((self.ranks * lengths.sum(dim=0) * live).sum().item())

    def shrink(self, widths: Tensor, threshold: float, scale: Tensor | None = None) -> Tensor:
        per_unit = self.unit_cost if scale is None else self.unit_cost * scale
        return (widths - threshold * per_unit).clamp(0.0, 1.0)

    def importance(self) -> Tensor:
        """``(ΣK,)`` RMS entry of each component's exact (boxcar-masked) block:
        ``‖D(a_k) U_k‖ ‖V_k D(b_k)‖ / sqrt(|R_k| |C_k|)``; 0 for dead components."""
        values = []
        for layer in self.layers:
            col_mask = boxcar_mask(layer.widths[0], layer.locations[0], layer.cols, layer.U.dtype)
            row_mask = boxcar_mask(layer.widths[1], layer.locations[1], layer.rows, layer.U.dtype)
            u = (layer.U.detach() * row_mask.unsqueeze(1)).flatten(1).norm(dim=1)
            v = (layer.V.detach() * col_mask.unsqueeze(1)).flatten(1).norm(dim=1)
            area = (row_mask.sum(1) * col_mask.sum(1)).clamp_min(1.0)
            values.append((u * v / area.sqrt()).to(torch.float64))
        return torch.cat(values)

    def write(self, widths: Tensor) -> None:
        start = 0
        with torch.no_grad():
            for layer in self.layers:
                k = layer.num_components
                layer.widths.copy_(widths[:, start : start + k])
                start += k


class StructureLearner:
    """Learns every GBLR layer's structure and FLOPs share; call :meth:`step` after
    ``optimizer.step()``.

    Args:
        model: a module containing GBLR layers.
        target: budget mode: a fraction in (0, 1] of the dense MACs of all GBLR layers
            (the int ``1`` is 1.0, as in :func:`gblr.convert`; other ints are refused:
            an absolute count goes to ``target_macs``).
        target_macs: budget mode: an absolute budget, MACs per input row summed over the
            GBLR layers (an int).
        lam: λ mode: penalty weight per unit of the GBLR layers' total dense cost.
            Exactly one of ``target``, ``target_macs`` and ``lam`` must be given. A
            budget below the cheapest component (``2 r`` MACs: one row and one column at
            rank ``r``) would leave every layer empty: a ``ValueError`` names the
            smallest budget allowed.
        sigma: Gaudi bandwidth schedule: ``(start, end)``, a single float (constant), or
            ``None`` to leave the layers' σ alone. Paper: 1 → 100. ``math.inf`` (only as
            a constant: ``sigma=math.inf``) trains through exact boxcar masks.
        sigma_schedule: ``"geometric"`` (default: equal time per factor of σ),
            ``"linear"`` or ``"constant"``. On the planted-structure benchmark the
            geometric schedule recovered 5/5 fixed seeds where linear recovered 3/5.
        sigma_start_step: σ stays at its start value until this step.
        warmup_steps: budget mode: the target ramps from the starting cost down to
            ``target`` over these steps, shaped by ``ramp`` (0: the full cut at once).
        total_steps: number of :meth:`step` calls in the run; σ reaches its end here.
        optimizer: λ mode: the optimizer whose structure group's current learning rate is
            ``η`` (follows LR schedulers). Alternatively give ``structure_lr``.
        structure_lr: λ mode: a fixed ``η``.
        ramp: shape of the warm-up ramp of the target: ``"geometric"`` (default: equal
            time per factor of cost, so the last, hardest cuts are gradual) or
            ``"linear"``.
        adaptive: exponent ``γ`` of adaptive-lasso thresholds (default 0: the paper's one
            uniform threshold). Each component's widths are shrunk by
            ``τ · (cost per unit width) · (mean importance / importance_k) ** γ``, its
            importance the RMS entry of its exact block,
            ``‖D(a_k) U_k‖ ‖V_k D(b_k)‖ / sqrt(|R_k| |C_k|)``: components that carry little
            weight per MAC (empty, or wider than their content) shrink first, and the
            budget is still met exactly by one global ``τ`` found by bisection.
        max_shift: once the warm-up (budget ramp) is over, each width and location moves
            at most this many grid cells (rows or columns) per step (default ``None``: no
            limit). Why: with the paper's Adam betas ``(0, 0.999)``, a converged structure
            sees tiny gradients for hundreds of steps, so Adam's second moment decays;
            when a drifting location then crosses a rounding boundary the loss jumps and
            Adam's normalised step reaches ``lr / sqrt(1 - β2) ≈ 32 lr``, many cells,
            which wrecks a fit that was exact. On the planted-structure benchmark
            (``benchmarks/bench_learner.py``) ``max_shift=1`` turned such late collapses
            into recoveries. The limit is relative to the structure after the previous
            :meth:`step`, so load the model's state before the learner's when resuming.
        max_shift_ramp: the same limit during the warm-up (budget ramp), default ``None``
            (no limit). A loose one only catches Adam's spikes while the structure still
            has to travel: on the planted-structure benchmark, ``max_shift_ramp=4`` with
            ``max_shift=1`` and ``adaptive=1`` recovered 18/20 seeds at 1.1x the planted
            cost (14/20 without it; 2 cells gave 15/20, 8 cells 16/20).
        merge: once the warm-up is over, every ``merge_every`` steps, merge pairs of
            components of a layer whose summed blocks are, to this relative squared error,
            one rank-``r`` component over a box that costs fewer MACs than the two
            (:func:`gblr.merge_components`; default ``None``: never). The learner can
            cover one block with two components that split its rows or columns, and
            gradient steps cannot join them under a tight budget; a merge does, at no loss
            of accuracy, and the freed MACs go to what needs them. On the planted-structure
            benchmark ``merge=1e-3`` with the three options above recovered 19/20 seeds
            at 1.1x the planted cost (18/20 without: it fixes seed 13, a block split over
            two components) and 20/20 at 1.5x; merging from step 0 instead: 17/20.
        merge_every: steps between merge (and untangle and refine) passes (default 10).
            With all three on, ``20`` recovered as many planted seeds as ``10`` on the
            benchmark at half the cost (together with the learner: 4.0-4.3% of a training
            step of the benchmark's ViT, against 8% every 10 steps).
        untangle: once the warm-up is over, every ``merge_every`` steps, re-split
            overlapping pairs of rank-1 components into two blocks on smaller intervals
            when, to this relative squared error, the pair's sum allows it and it saves
            at least 5% of the pair's MACs (:func:`gblr.untangle_components`; default
            ``None``: never; layers of rank > 1 are skipped). Only settled components
            take part: those whose exact block moved by at most 1% since the previous
            pass, so blocks still growing are not cut. Why: two components can hold two
            overlapping blocks as a mixture, on intervals wider than the blocks'; every
            mixture has the same loss, so gradient steps do not leave it. A pair is
            searched when one of its components has just settled, and not again after
            its MACs grew back (the loss wants those entries). On the planted-structure
            benchmark ``untangle=1e-4`` with the four options above recovered 20/20 seeds
            at 1.1x the planted cost (19/20 without); on seeds 20-39, 18/20, as without
            (other seeds miss). Cost: a pass searching every overlapping pair of the
            benchmark's ViT (24 layers, 6,912 components) took 46 s, 70 training steps;
            a pass where nothing newly settled, 52 ms.
        refine: once the warm-up is over, every ``merge_every`` steps (half-way between
            merge passes), each layer makes its best swap of one grid cell: one interval
            end is trimmed and another interval grows by one cell, so the MACs do not
            change, when a quadratic model of the loss predicts a gain above twice the
            cost plus this floor (a fraction of the model's ``c ‖W‖² / 2``; default
            ``None``: never; ``1e-6`` on the benchmark). Why: after the ramp an interval
            is often a cell or two wider than its block, or shifted by one so that a row
            or column of the block is left out; at a high σ the structure gradient cannot
            see the cells outside an interval (their factor entries are masked, so never
            trained). The loss gradients with respect to the masked factors are not
            masked: they give each outside cell's gain, and the layers record them (hooks
            on two training steps per pass, in eager mode; under ``torch.compile`` nothing
            is recorded and nothing refined; averaged over ``torch.distributed``
            processes, so that data-parallel replicas make the same swaps). The curvature
            ``c`` is a secant estimate from those two steps (median of each layer's last
            8). On the planted-structure benchmark, with the five options above and the
            learning rate decayed to zero over the last quarter: 20/20 seeds at 1.1x and
            at 1.5x the planted cost, and 38/40 further seeds at 1.1x (31/40 without);
            see :mod:`gblr.learn.refine`. A swap whose predicted gain shows that the layer
            is far from a fit (over ``c ‖W‖² / 8``) is not made: the model does not hold
            there. A step whose recorded factors or gradients are not finite (an overflow
            that ``torch.amp.GradScaler`` skips) is skipped too: no curvature, no swap.

    Non-finite numbers: :meth:`step` (and the constructor) raise ``FloatingPointError``
    naming the layer (its module name), the parameter and the step when a width,
    location or factor is NaN or infinite; they come from a NaN or infinite loss or
    gradient that the optimizer applied. Gradients themselves are not read (except by
    ``refine``, above): a step that ``torch.amp.GradScaler`` skipped leaves the
    parameters finite, and the learner steps as usual (call it after
    ``scaler.step(optimizer)``).

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(gblr.GBLRLinear(32, 32), gblr.GBLRLinear(32, 32))
        >>> opt = torch.optim.Adam(gblr.param_groups(model, lr=1e-3))
        >>> learner = gblr.StructureLearner(model, target=0.3, total_steps=100)
        >>> opt.step(); learner.step()
        >>> learner.summary()["mac_ratio"] <= 0.3
        True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target: float | int | None = None,
        target_macs: int | None = None,
        lam: float | None = None,
        sigma: tuple[float, float] | float | None = (1.0, 100.0),
        sigma_schedule: Literal["linear", "geometric", "constant"] = "geometric",
        sigma_start_step: int = 0,
        warmup_steps: int = 0,
        total_steps: int,
        optimizer: torch.optim.Optimizer | None = None,
        structure_lr: float | None = None,
        ramp: Literal["linear", "geometric"] = "geometric",
        adaptive: float = 0.0,
        max_shift: float | None = None,
        max_shift_ramp: float | None = None,
        merge: float | None = None,
        merge_every: int = 10,
        untangle: float | None = None,
        refine: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = gblr_layers(model)
        layers = [layer for _, layer in named]
        if not layers:
            raise ValueError("model has no GBLR layer (GBLRLinear or GBLRConv2d); convert it first")
        given = [n for n, v in (("target", target), ("target_macs", target_macs), ("lam", lam))
                 if v is not None]  # fmt: skip
        if len(given) != 1:
            raise ValueError(
                "give exactly one of target (budget mode, a fraction of the dense MACs), "
                f"target_macs (budget mode, a MAC count) and lam (λ mode), got {given or 'none'}"
            )
        # Names for errors: "" is the model itself.
        self.layer_names = [name or "(model)" for name, _ in named]
        on_meta = [
            name for name, layer in zip(self.layer_names, layers, strict=True)
            if any(p.is_meta for p in layer.parameters(recurse=False))
        ]
        if on_meta:
            raise ValueError(
                f"the GBLR layers {on_meta[:3]} are on the meta device (no values yet): "
                "materialise the model first (model.to_empty(device=...) and "
                "load_state_dict) and build the learner on it"
            )
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.sigma_start_step = _check_int("sigma_start_step", sigma_start_step, 0)
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(
                f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {sigma_schedule!r}"
            )
        self.sigma_schedule = sigma_schedule
        self.sigma_range = self._check_sigma(sigma)

        self.view = _StructureView(layers)
        self.layers = layers
        self.lam: float | None = None
        self.final_target: int | None = None
        self._check_finite("when the learner was built")
        if lam is None:
            rank = min(layer.rank_per_component for layer in layers)
            self.final_target = fraction_budget_macs(
                target,
                target_macs,
                self.view.dense_macs,
                minimum=2 * rank,
                minimum_reason=(
                    f"the cheapest component: one row and one column at rank {rank}; "
                    "below it every GBLR layer would be empty"
                ),
            )
        else:
            if isinstance(lam, bool) or not isinstance(lam, (int, float)):
                raise TypeError(f"lam must be a number >= 0, got {lam!r}")
            if not (lam >= 0 and math.isfinite(lam)):
                raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
            if optimizer is None and structure_lr is None:
                raise ValueError(
                    "λ mode needs the structure learning rate: pass optimizer= (its group "
                    "holding the widths) or structure_lr="
                )
            if structure_lr is not None and not (
                isinstance(structure_lr, (int, float)) and structure_lr > 0
            ):
                raise ValueError(f"structure_lr must be a number > 0, got {structure_lr!r}")
            self.lam = float(lam)
        self.optimizer = optimizer
        self.structure_lr = structure_lr
        if ramp not in ("linear", "geometric"):
            raise ValueError(f"ramp must be 'linear' or 'geometric', got {ramp!r}")
        self.ramp = ramp
        for name, value in (("max_shift", max_shift), ("max_shift_ramp", max_shift_ramp)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value < math.inf
            ):
                raise ValueError(
                    f"{name} must be a finite number of grid cells > 0, or None, got {value!r}"
                )
        self.max_shift = None if max_shift is None else float(max_shift)
        self.max_shift_ramp = None if max_shift_ramp is None else float(max_shift_ramp)
        if isinstance(adaptive, bool) or not isinstance(adaptive, (int, float)):
            raise TypeError(f"adaptive must be a number >= 0, got {adaptive!r}")
        if not 0 <= adaptive < math.inf:
            raise ValueError(f"adaptive must be a finite number >= 0, got {adaptive!r}")
        self.adaptive = float(adaptive)
        self.merge = None if merge is None else _check_fraction("merge", merge)
        self.merge_every = _check_int("merge_every", merge_every, 1)
        self.untangle = None if untangle is None else _check_fraction("untangle", untangle)
        self.untangles = 0
        # Each layer's exact factors at the previous untangle pass (None before the first).
        self._untangle_reference: list[tuple[Tensor, Tensor]] | None = None
        # Each layer's settled components at the previous pass: pairs of components that
        # stayed settled were searched then and are not searched again.
        self._untangle_settled: list[Tensor] | None = None
        # (layer, i, j) -> (MACs before, after) of the last untangling; pairs banned.
        self._untangled: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._untangle_banned: set[tuple[int, int, int]] = set()
        self.refine = None if refine is None else _check_fraction("refine", refine)
        self.refines = 0
        # Per layer: the factor record of the previous step (when one was taken), and the
        # last secant curvature estimates.
        self._refine_previous: list[dict[str, Tensor] | None] = [None] * len(layers)
        self._curvatures: list[list[float]] = [[] for _ in layers]

        self.step_count = 0
        self.merges = 0
        self.threshold = 0.0
        self.start_cost = self.view.cost(self.view.widths())
        self._previous = self._snapshot()
        self._apply_sigma()
        if self.refine is not None:
            self._arm_recording()

    def _check_finite(self, when: str) -> None:
        """``FloatingPointError`` naming the layer, the parameter and ``when`` if a width,
        location or factor is NaN or infinite.

        One device sync for all layers (``isfinite`` reduced on the device, then one read):
        the learner already reads the cost on the host every step. Gradients are not
        checked here: a step that ``torch.amp.GradScaler`` skipped for non-finite
        gradients leaves the parameters finite, and the learner then steps as usual.
        """
        tensors = [
            (index, name, getattr(layer, name))
            for index, layer in enumerate(self.layers)
            for name in ("widths", "locations", "U", "V")
        ]
        device = tensors[0][2].device
        flags = torch.stack([torch.isfinite(t).all().to(device) for _, _, t in tensors])
        if bool(flags.all()):
            return
        index, name, tensor = tensors[int((~flags).nonzero()[0, 0])]
        values = tensor.detach()
        nan = int(torch.isnan(values).sum())
        inf = int(torch.isinf(values).sum())
        layer = self.layers[index]
        raise FloatingPointError(
            f"StructureLearner: the {name} of layer {self.layer_names[index]!r} "
            f"({type(layer).__name__}) are not finite {when}: {nan} NaN and {inf} infinite "
            f"of {values.numel()} entries. What ran before produced them: usually a NaN or "
            "infinite loss or gradient (check the loss and learning rate; with "
            "torch.amp.GradScaler call learner.step() after scaler.step(optimizer), which "
            "skips such steps and leaves the parameters finite)"
        )

    def _snapshot(self) -> list[tuple[Tensor, Tensor]] | None:
        """Widths and locations after this step, the reference of the next step's shift limit."""
        if self.max_shift is None and self.max_shift_ramp is None:
            return None
        return [(layer.widths.detach().clone(), layer.locations.detach().clone())
                for layer in self.layers]  # fmt: skip

    def _limit_shift(self, cells: float) -> None:
        """Clamp each width and location to within ``cells`` grid cells of its value after
        the previous step (the optimizer's move; the proximal shrink comes after)."""
        assert self._previous is not None
        for layer, (widths, locations) in zip(self.layers, self._previous):
            cell = torch.tensor(
                [[1.0 / layer.cols], [1.0 / layer.rows]], dtype=widths.dtype, device=widths.device
            )
            limit = cells * cell
            layer.widths.copy_(torch.clamp(layer.widths, widths - limit, widths + limit))
            layer.locations.copy_(
                torch.clamp(layer.locations, locations - limit, locations + limit)
            )

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_sigma(sigma: object) -> tuple[float, float] | None:
        if sigma is None:
            return None
        values = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
        if (
            not isinstance(values, (tuple, list))
            or len(values) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values)
            or not all(v > 0 for v in values)
        ):
            raise ValueError(
                f"sigma must be a positive number, a (start, end) pair of them, or None, "
                f"got {sigma!r}"
            )
        start, end = float(values[0]), float(values[1])
        for value in (start, end):
            check_sigma_fits_buffer("sigma", value)
        if math.isinf(start) != math.isinf(end):
            # A schedule between a finite σ and inf has no meaningful middle: geometric
            # steps would jump to inf at once, linear ones too.
            raise ValueError(
                f"sigma={sigma!r}: a schedule needs two finite ends; sigma=math.inf (exact "
                "boxcar masks) is a constant, give it alone"
            )
        return start, end

    # ------------------------------------------------------------------ schedules
    def sigma_at(self, step: int) -> float | None:
        """σ used for the forward passes after ``step`` learner steps."""
        if self.sigma_range is None:
            return None
        start, end = self.sigma_range
        if start == end:  # also σ = inf, where the schedules' arithmetic gives NaN
            return start
        span = max(1, self.total_steps - self.sigma_start_step)
        progress = min(1.0, max(0.0, (step - self.sigma_start_step) / span))
        if self.sigma_schedule == "constant":
            return start
        if self.sigma_schedule == "geometric":
            return start * (end / start) ** progress
        return start + (end - start) * progress

    def target_at(self, step: int) -> int | None:
        """Budget (MACs) enforced at ``step``: ramped from the starting cost over warm-up."""
        if self.final_target is None:
            return None
        if self.warmup_steps == 0 or self.start_cost <= self.final_target:
            return self.final_target
        progress = min(1.0, step / self.warmup_steps)
        if self.ramp == "geometric":
            ramped = self.start_cost * (self.final_target / self.start_cost) ** progress
        else:
            ramped = self.start_cost + (self.final_target - self.start_cost) * progress
        return max(self.final_target, math.floor(ramped))

    def _structure_lr(self) -> float:
        if self.structure_lr is not None:
            return float(self.structure_lr)
        assert self.optimizer is not None
        width_ids = {id(layer.widths) for layer in self.layers}
        for group in self.optimizer.param_groups:
            if any(id(p) in width_ids for p in group["params"]):
                return float(group["lr"])
        raise ValueError("the optimizer given to StructureLearner does not hold the GBLR widths")

    def _apply_sigma(self) -> None:
        sigma = self.sigma_at(self.step_count)
        if sigma is None:
            return
        for layer in self.layers:
            layer.sigma.fill_(sigma)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        """Proximal step on all widths, wrap locations, advance σ. Call after
        ``optimizer.step()``."""
        self.step_count += 1
        self._check_finite(f"at step {self.step_count} (before the learner changed anything)")
        limit = self.max_shift if self.step_count > self.warmup_steps else self.max_shift_ramp
        if limit is not None:
            self._limit_shift(limit)
        for layer in self.layers:
            layer.locations.remainder_(1.0)
        widths = self.view.widths().clamp(0.0, 1.0)
        scale = self._adaptive_scale()
        if self.lam is not None:
            self.threshold = self._structure_lr() * self.lam / self.view.dense_macs
        else:
            self.threshold = _budget_threshold(
                self.view, widths, self.target_at(self.step_count), scale
            )
        self.view.write(self.view.shrink(widths, self.threshold, scale))
        if self.step_count > self.warmup_steps and self.step_count % self.merge_every == 0:
            if self.merge is not None:
                self.merges += sum(_merge_layer(layer, self.merge) for layer in self.layers)
            if self.untangle is not None:
                self._untangle_pass()
        if self.refine is not None:
            self._refine_step()
        self._previous = self._snapshot()
        self._apply_sigma()

    def _is_refine_step(self, step: int) -> bool:
        """Refine passes fall half-way between merge passes, so that the gradients they
        use were taken on the structure they change."""
        return step > self.warmup_steps and step % self.merge_every == self.merge_every // 2

    def _refine_step(self) -> None:
        """Collect this step's factor records; on a refine step, estimate each layer's
        curvature and make its best swap; arm the recording for the next step."""
        assert self.refine is not None
        refine_now = self._is_refine_step(self.step_count)
        for index, layer in enumerate(self.layers):
            record = layer.__dict__.get("_factor_record")
            current = record if record and "grad_u" in record and "grad_v" in record else None
            if current is not None and not _finite_record(current):
                # An overflowing step (one that torch.amp.GradScaler skips): no secant and
                # no swap from it, as the scaler takes no optimizer step from it.
                current = None
            if current is not None:
                average_gradients_across_processes(current)
            previous = self._refine_previous[index]  # always the step just before
            if refine_now and current is not None:
                if previous is not None:
                    estimate = secant_curvature(previous, current)
                    if estimate is not None:
                        history = self._curvatures[index]
                        history.append(estimate)
                        del history[:-_CURVATURE_HISTORY]
                if self._curvatures[index]:
                    curvature = float(torch.tensor(self._curvatures[index]).median())
                    if _refine_layer(layer, current, curvature, self.refine) is not None:
                        self.refines += 1
            # Kept only for the secant of the next step (four factor-sized tensors).
            next_is_pass = self._is_refine_step(self.step_count + 1)
            self._refine_previous[index] = current if next_is_pass else None
        self._arm_recording()

    def _arm_recording(self) -> None:
        """Record the next step's forward when it is a refine step or the one before it
        (the secant needs two consecutive steps); otherwise record nothing."""
        upcoming = self.step_count + 1
        wanted = self._is_refine_step(upcoming) or self._is_refine_step(upcoming + 1)
        for layer in self.layers:
            layer.__dict__["_factor_record"] = {} if wanted else None

    def _untangle_pass(self) -> None:
        """Untangle the settled components of every layer; keep their factors for the
        next pass's settledness test."""
        assert self.untangle is not None
        reference, settled_layers = [], []
        for index, layer in enumerate(self.layers):
            u, v = _masked_factors(layer)
            settled = torch.zeros(layer.num_components, dtype=torch.bool, device=u.device)
            if self._untangle_reference is not None:
                old_u, old_v = self._untangle_reference[index]
                old_u, old_v = old_u.to(u.device), old_v.to(v.device)
                # |B1 - B0|^2 = |B1|^2 + |B0|^2 - 2 <B1, B0> per component, from r x r Grams.
                new_sq = (u @ u.mT * (v @ v.mT)).sum((1, 2))
                old_sq = (old_u @ old_u.mT * (old_v @ old_v.mT)).sum((1, 2))
                inner = (u @ old_u.mT * (v @ old_v.mT)).sum((1, 2))
                change = (new_sq + old_sq - 2 * inner).clamp_min(0.0)
                settled = change <= _SETTLED**2 * new_sq
                before = (
                    torch.zeros_like(settled)
                    if self._untangle_settled is None
                    else self._untangle_settled[index].to(settled.device)
                )
                fresh = settled & ~before
                if bool(fresh.any()):
                    self._ban_regrown(index, layer)
                    banned = {(i, j) for n, i, j in self._untangle_banned if n == index}
                    done = _untangle_layer(
                        layer, self.untangle, _UNTANGLE_MIN_SAVING, settled, banned, fresh
                    )
                    for i, j, macs_before, macs_after in done:
                        self._untangled[(index, i, j)] = (macs_before, macs_after)
                    self.untangles += len(done)
                    u, v = _masked_factors(layer)
            reference.append((u, v))
            settled_layers.append(settled)
        self._untangle_reference = reference
        self._untangle_settled = settled_layers

    def _ban_regrown(self, index: int, layer: GBLRMatrixMixin) -> None:
        """Ban the layer's untangled pairs whose MACs grew back (see ``_UNTANGLE_REGROWTH``)."""
        col_len, row_len = layer.interval_lengths()
        own = (row_len + col_len).tolist()
        for (n, i, j), (before, after) in list(self._untangled.items()):
            if n == index and own[i] + own[j] - after >= _UNTANGLE_REGROWTH * (before - after):
                self._untangle_banned.add((n, i, j))
                del self._untangled[(n, i, j)]

    def _adaptive_scale(self) -> Tensor | None:
        """Adaptive-lasso weights ``(mean importance / importance_k) ** adaptive`` per
        component (``None``: the paper's uniform threshold). The mean is over live
        components, so a typical component keeps the uniform threshold; empty ones (RMS
        near 0) are capped at 1000 ** adaptive times it."""
        if self.adaptive == 0.0:
            return None
        importance = self.view.importance()
        live = importance > 0
        if not bool(live.any()):
            return None
        reference = importance[live].mean()
        ratio = reference / importance.clamp_min(1e-3 * float(reference))
        return ratio.pow(self.adaptive)

    # ------------------------------------------------------------------ reporting
    def macs(self) -> int:
        """Exact MACs per row of all GBLR layers now."""
        return self.view.cost(self.view.widths())

    def summary(self) -> dict[str, float]:
        """Numbers for logging: step, σ, MACs and ratio, target or λ, threshold, live."""
        macs = self.macs()
        live = sum(layer.live_components() for layer in self.layers)
        summary: dict[str, float] = {
            "step": float(self.step_count),
            "macs": float(macs),
            "dense_macs": float(self.view.dense_macs),
            "mac_ratio": macs / self.view.dense_macs,
            "threshold": self.threshold,
            "live_components": float(live),
        }
        if self.merge is not None:
            summary["merges"] = float(self.merges)
        if self.untangle is not None:
            summary["untangles"] = float(self.untangles)
        if self.refine is not None:
            summary["refines"] = float(self.refines)
        sigma = self.sigma_at(self.step_count)
        if sigma is not None:
            summary["sigma"] = sigma
        target = self.target_at(self.step_count)
        if target is not None:
            summary["target_macs"] = float(target)
        if self.lam is not None:
            summary["lam"] = self.lam
        return summary

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step count, starting cost, last threshold."""
        return {
            "step_count": self.step_count,
            "start_cost": self.start_cost,
            "threshold": self.threshold,
            "final_target": self.final_target,
            "lam": self.lam,
            "merges": self.merges,
            "untangles": self.untangles,
            "untangle_reference": self._untangle_reference,
            "untangle_settled": self._untangle_settled,
            "untangled": [[*key, *value] for key, value in sorted(self._untangled.items())],
            "untangle_banned": sorted(self._untangle_banned),
            "refines": self.refines,
            "refine_previous": self._refine_previous,
            "curvatures": self._curvatures,
            "factor_records": [layer.__dict__.get("_factor_record") for layer in self.layers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (and σ on every layer)."""
        missing = {"step_count", "start_cost", "threshold"} - set(state)
        if missing:
            raise ValueError(f"learner state is missing {sorted(missing)}")
        self.step_count = int(state["step_count"])
        self.start_cost = int(state["start_cost"])
        self.threshold = float(state["threshold"])
        self.merges = int(state.get("merges", 0))  # absent in states saved before merging
        self.untangles = int(state.get("untangles", 0))
        reference = state.get("untangle_reference")
        self._untangle_reference = (
            None if reference is None else [(u.clone(), v.clone()) for u, v in reference]
        )
        settled = state.get("untangle_settled")
        self._untangle_settled = None if settled is None else [m.clone() for m in settled]
        self._untangled = {
            (int(n), int(i), int(j)): (int(before), int(after))
            for n, i, j, before, after in state.get("untangled", [])
        }
        self._untangle_banned = {
            (int(n), int(i), int(j)) for n, i, j in state.get("untangle_banned", [])
        }
        self.refines = int(state.get("refines", 0))
        count = len(self.layers)
        self._refine_previous = [
            None if record is None else {name: t.clone() for name, t in record.items()}
            for record in state.get("refine_previous", [None] * count)
        ]
        self._curvatures = [list(map(float, h)) for h in state.get("curvatures", [[]] * count)]
        for layer, record in zip(self.layers, state.get("factor_records", [None] * count)):
            layer.__dict__["_factor_record"] = (
                None if record is None else {name: t.clone() for name, t in record.items()}
            )
        self._previous = self._snapshot()  # the model's structure, loaded before the learner
        self._apply_sigma()
