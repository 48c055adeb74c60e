"""Refining interval ends: move one grid cell of budget to where the loss wants it.

Once the budget ramp is over, a learned interval is often one or two cells off: wider
than its block (a margin of near-zero entries) or shifted so that one row or column of
the block is left out. The structure gradient cannot fix that at a high Gaudi σ: the
entries just outside an interval are masked out, so their factor values are never
trained and extending the interval onto them predicts no gain. The gradients of the loss
with respect to the *masked* factors are not masked, though: for a component with
factors ``ũ_k`` (rows) and ``ṽ_k`` (columns), ``dL/dṽ_k = G^T ũ_k`` holds at every
column, ``G`` the loss gradient of the dense weight. With a quadratic model of the loss
(curvature ``c`` per layer, ``H = c ũ_k ũ_k^T`` for one column's ``r`` factor entries):

- extending an interval onto cell ``j`` (new entries ``-H^{-1} g_j``) gains
  ``g_j^T H^{-1} g_j / 2``;
- trimming its end cell ``j`` (entries ``a_j`` dropped) costs ``-g_j·a_j + a_j^T H a_j / 2``.

A swap trims one end cell of some interval and extends another interval by one cell,
which leaves the MACs unchanged; the learner makes the best swap of a layer when its gain
beats twice its cost plus a floor. The curvature ``c`` is a secant (Barzilai-Borwein)
estimate from two consecutive steps, ``<ΔG, ΔW> / ‖ΔW‖²``, computed from the factors and
their gradients (``ΔW`` formed densely, ``G`` never).

The model holds near a fit (after the budget ramp, factors trained): there the secant's
bias, of the order of the relative residual ``‖G‖ / (c ‖W‖)``, is small and the curvature
of a regression onto a weight is the same for every cell. Far from a fit neither holds:
in a small ReLU network trained on ``mean(y²)`` from the first step, the curvature along a
grown cell was 10-40 times the layer's secant (the secant averages the curvature along
the optimizer's step, which the other layers' moves disturb; a column's curvature grows
with its input's energy), so the Newton entries ``-H^{-1} g`` overshot, the loss rose
(from 0.2 to 230 in one swap), the larger gradients made the next swap's entries larger
still, and factors passed 1e10 within 100 steps. A swap's gain bounds the residual from
below (``gain <= ‖G‖² / 2c``), so a swap that gains more than ``ρ² c ‖W‖² / 2``
(``ρ = 1/2``) shows that the layer is outside the model's domain, and it is not made.
Measured 2026-12-04: on the planted-structure benchmark (seeds 13, 20, 41, 52, 54 at
1.1x) swaps gained at most 0.045 of ``c ‖W‖² / 2``, so none is affected; in that
network the swaps that raised the loss gained 0.7-2.5 of it, and of 64 runs (4 seeds, 4
sizes, 2 budgets, 2 learning rates) 11 diverged without the check and none with it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..layers.base import GBLRMatrixMixin
from .config import RefineConfig
from .passes import LearnerPass

__all__ = ["RefinePass", "average_gradients_across_processes", "secant_curvature"]

# A swap is made when its predicted gain exceeds this multiple of its predicted cost (plus
# the floor): the quadratic model is rough, and a swap that only just pays would be undone.
_MARGIN = 2.0
# Largest relative residual ‖G‖ / (c ‖W‖) a swap may reveal (module docstring): beyond it
# the curvature can be off by the factor 2 at which a Newton step stops lowering the loss.
_MAX_RESIDUAL = 0.5
# The learner's pass: the curvature used is the median of each layer's last secant
# estimates (one per pass; a single estimate can be far off when a rounding boundary was
# crossed).
_CURVATURE_HISTORY = 8


def _working(tensor: Tensor) -> Tensor:
    """At least float32 (records taken under autocast hold half-precision factors)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def average_gradients_across_processes(record: dict[str, Tensor]) -> None:
    """Average the record's gradients over the processes of ``torch.distributed`` (in place).

    The hooks see each process's own gradients, before data-parallel training averages
    those of the parameters; every process must decide the same swaps, or the replicas'
    structures would drift apart. A no-op without an initialized process group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for name in ("grad_u", "grad_v"):
        gradient = record[name].contiguous()
        dist.all_reduce(gradient)
        record[name] = gradient / dist.get_world_size()


def _dense(record: dict[str, Tensor]) -> Tensor:
    """The record's weight ``u^T v`` ``(out, in)``, computed once and kept in the record."""
    if "weight" not in record:
        u, v = _working(record["u"]).flatten(0, 1), _working(record["v"]).flatten(0, 1)
        record["weight"] = u.mT @ v
    return record["weight"]


def secant_curvature(previous: dict[str, Tensor], current: dict[str, Tensor]) -> float | None:
    """Barzilai-Borwein curvature ``<G1 - G0, W1 - W0> / ‖W1 - W0‖²`` of one layer.

    Args:
        previous, current: records of two consecutive steps, each with the masked factors
            ``u`` ``(K, r, m)``, ``v`` ``(K, r, n)`` and the loss gradients ``grad_u``,
            ``grad_v`` with respect to them.

    Returns:
        The estimate, or ``None`` when the weight did not change or the estimate is not
        positive. ``<ΔG, ΔW>`` is taken as ``<Δgrad_u, Δu> + <Δgrad_v, Δv>``, which
        also holds ``2 <G0, Σ_i Δu_i Δv_i^T>``: a bias of the order of the relative
        residual ``‖G‖ / (c ‖W‖)``, small once the fit is close (after the budget ramp).
    """
    u0, v0 = (_working(previous[name]).flatten(0, 1) for name in ("u", "v"))
    u1, v1 = (_working(current[name]).flatten(0, 1) for name in ("u", "v"))
    numerator = sum(
        ((_working(current[grad]) - _working(previous[grad])).flatten(0, 1) * change).sum()
        for grad, change in (("grad_u", u1 - u0), ("grad_v", v1 - v0))
    )
    # The dense difference (K r m n MACs) is cheaper than Grams of the 2 K r factors
    # (4 (K r)^2 (m + n)) whenever K r is near min(m, n), as in GBLR layers.
    denominator = (_dense(current) - _dense(previous)).square().sum()
    if not (float(denominator) > 0 and float(numerator) > 0):
        return None
    return float(numerator / denominator)


class _Ends(NamedTuple):
    """Both ends of every interval of one dimension; column 0 is the start side, 1 the end."""

    trim_cost: Tensor  # (K, 2) predicted loss increase of dropping the end cell
    trim_ok: Tensor  # (K, 2) bool
    gain: Tensor  # (K, 2) predicted loss decrease of growing onto the next cell
    grow_ok: Tensor  # (K, 2) bool
    new_values: Tensor  # (K, 2, r) the grown cell's entries
    grow_cells: Tensor  # (K, 2) the cell each side would grow onto


def _end_candidates(
    values: Tensor,
    grads: Tensor,
    hessian: Tensor,
    starts: Tensor,
    lengths: Tensor,
    live: Tensor,
) -> _Ends:
    """Trim costs and extension gains at both ends of every interval of one dimension.

    Args:
        values, grads: ``(K, r, n)`` masked factors and their loss gradients.
        hessian: ``(K, r, r)`` quadratic model of one cell's ``r`` entries.
        starts, lengths: ``(K,)`` integer intervals; live: ``(K,)`` bool.
    """
    n = values.shape[-1]
    batch = torch.arange(values.shape[0], device=values.device)[:, None]
    trim_cells = torch.stack([starts, starts + lengths - 1], dim=1) % n  # (K, 2)
    grow_cells = torch.stack([starts - 1, starts + lengths], dim=1) % n
    a = values[batch, :, trim_cells]  # (K, 2, r)
    g = grads[batch, :, trim_cells]
    curvature = (a[..., None, :] @ hessian[:, None] @ a[..., None])[..., 0, 0]
    trim_cost = -(g * a).sum(-1) + 0.5 * curvature
    trim_ok = (live & (lengths >= 2))[:, None].expand(-1, 2)
    g = grads[batch, :, grow_cells]  # (K, 2, r)
    r = values.shape[1]
    trace = hessian.diagonal(dim1=1, dim2=2).sum(-1)
    has_curvature = trace > 0  # dead components (zero factors) cannot grow
    identity = torch.eye(r, dtype=hessian.dtype, device=hessian.device)
    # A ridge at the dtype's resolution for rank-deficient factors; the identity where
    # there is no curvature.
    ridge = 10 * torch.finfo(hessian.dtype).eps * (trace / r)[:, None, None] * identity
    safe = torch.where(has_curvature[:, None, None], hessian + ridge, identity)
    step = torch.linalg.solve(safe[:, None].expand(-1, 2, -1, -1), g[..., None])
    new_values = -step[..., 0]
    gain = 0.5 * (g * step[..., 0]).sum(-1)
    grow_ok = (live & (lengths < n) & has_curvature)[:, None].expand(-1, 2)
    return _Ends(trim_cost, trim_ok, gain, grow_ok, new_values, grow_cells)


@torch.no_grad()
def _refine_layer(
    layer: GBLRMatrixMixin,
    record: dict[str, Tensor],
    curvature: float,
    min_gain: float,
    held: Tensor | None = None,
) -> dict[str, Any] | None:
    """Make the layer's best swap (one trimmed end cell, one extended), if it pays.

    Args:
        record: the layer's masked factors and their loss gradients at this step
            (``u``, ``v``, ``grad_u``, ``grad_v``, shapes ``(K, r, out)`` / ``(K, r, in)``).
        curvature: the loss's curvature per unit squared weight (see module docstring).
        min_gain: the floor, as a fraction of the quadratic model's ``c ‖W‖² / 2``.
        held: ``(2, K)`` bool, the sides the learner holds (``None``: none): neither end
            of a held side moves, nor the start (its location) of any side of a component
            holding one.

    Returns:
        ``None`` (nothing pays, or the best swap gains more than the model can vouch
        for: see the module docstring), or what was done: ``{"gain", "cost", "grown":
        (k, dim, side, cell), "trimmed": (k, dim, side)}`` with ``dim`` 0 for columns and
        1 for rows, ``side`` 0 for the interval's start and 1 for its end.
    """
    u, v, grad_u, grad_v = (_working(record[name]) for name in ("u", "v", "grad_u", "grad_v"))
    col_len, row_len = (t.to(u.device) for t in layer.interval_lengths())
    col_start, row_start = (t.to(u.device) for t in layer.interval_starts())
    live = (row_len > 0) & (col_len > 0)
    # A column's entries of component k meet the rows of ũ_k: H = c ũ_k ũ_k^T; a row's, ṽ_k.
    per_dim = [
        _end_candidates(v, grad_v, curvature * (u @ u.mT), col_start, col_len, live),
        _end_candidates(u, grad_u, curvature * (v @ v.mT), row_start, row_len, live),
    ]
    trim_cost = torch.stack([d.trim_cost for d in per_dim], dim=1)  # (K, dim, side)
    trim_ok = torch.stack([d.trim_ok for d in per_dim], dim=1)
    gain = torch.stack([d.gain for d in per_dim], dim=1)
    grow_ok = torch.stack([d.grow_ok for d in per_dim], dim=1)
    if held is not None:
        held = held.to(grow_ok.device)
        fixed = held.T[:, :, None].expand(-1, -1, 2).clone()  # (K, dim, side)
        fixed[:, :, 0] |= held.any(0)[:, None]
        grow_ok, trim_ok = grow_ok & ~fixed, trim_ok & ~fixed
    if not bool(grow_ok.any()) or not bool(trim_ok.any()):
        return None
    gain = torch.where(grow_ok, gain, torch.full_like(gain, -torch.inf))
    k, dim, side = (int(i) for i in torch.unravel_index(gain.flatten().argmax(), gain.shape))
    best_gain = float(gain[k, dim, side])
    # The trimmed end must not be the grown one (the interval would not stay contiguous).
    trim_ok = trim_ok.clone()
    trim_ok[k, dim, side] = False
    cost = torch.where(trim_ok, trim_cost, torch.full_like(trim_cost, torch.inf))
    tk, tdim, tside = (int(i) for i in torch.unravel_index(cost.flatten().argmin(), cost.shape))
    best_cost = float(cost[tk, tdim, tside])
    scale = 0.5 * curvature * float(_dense(record).square().sum())  # the model's c ‖W‖² / 2
    if not best_gain > _MARGIN * max(best_cost, 0.0) + min_gain * scale:
        return None
    if not best_gain <= _MAX_RESIDUAL**2 * scale:
        return None  # far from a fit: the quadratic model cannot be trusted (see above)
    cell = int(per_dim[dim].grow_cells[k, side])
    new_values = per_dim[dim].new_values[k, side]
    _move_end(layer, tk, tdim, tside, -1)
    _move_end(layer, k, dim, side, +1)
    factor = layer.V if dim == 0 else layer.U
    factor[k, :, cell] = new_values.to(factor.dtype)
    return {
        "gain": best_gain,
        "cost": best_cost,
        "grown": (k, dim, side, cell),
        "trimmed": (tk, tdim, tside),
    }


def _move_end(layer: GBLRMatrixMixin, k: int, dim: int, side: int, cells: int) -> None:
    """Grow (``cells`` = 1) or shrink (-1) one end of an interval by exactly one grid
    cell: the width (and, for the start, the location) set to the centre of its new
    cell. Adding ``1 / n`` to a width on a cell's boundary moved its rounded length by 0
    or 2 lines (half to even), and the swap could break the budget by a few MACs."""
    n = layer.cols if dim == 0 else layer.rows
    length = int(layer.interval_lengths()[dim][k])
    layer.widths[dim, k] = min(max(length + cells, 0), n) / n
    if side == 0:
        start = int(layer.interval_starts()[dim][k])
        layer.locations[dim, k] = ((start - cells) % n) / n


def _finite_record(record: dict[str, Tensor]) -> bool:
    """Whether a record's factors and gradients are all finite."""
    names = ("u", "v", "grad_u", "grad_v")
    return bool(torch.stack([torch.isfinite(record[n]).all() for n in names]).all())


def _cloned(record: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if record is None else {name: t.clone() for name, t in record.items()}


class RefinePass(LearnerPass):
    """The learner's refine pass ([`gblr.RefineConfig`][]): half-way between merge
    passes after the budget ramp, each layer makes its best swap of one grid cell (one
    interval end trimmed, another grown, the MACs unchanged) when the quadratic model of
    this module predicts a gain above twice its cost plus the floor.

    The layers record their masked factors and loss gradients
    (`GBLRMatrixMixin.record_factors`) on the step before a pass and on the pass's
    step, for the secant curvature (the median of each layer's last 8); nothing is
    recorded under ``torch.compile``. Gradients are averaged over ``torch.distributed``
    processes, so that replicas make the same swaps; a step whose record is not finite
    (an overflow that ``torch.amp.GradScaler`` skips) gives no curvature and no swap.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(gblr.GBLRLinear(8, 8))
        >>> config = gblr.LearnerConfig(refine=gblr.RefineConfig(), pass_every=4)
        >>> learner = gblr.StructureLearner(model, config, budget=1.0, total_steps=10)
        >>> model[0].factor_record  # armed: step 1 is the one before the first pass (2)
        {}
        >>> learner.passes["refine"].curvatures
        [[]]
    """

    name = "refine"
    counter = "refines"
    config: RefineConfig

    def start(self) -> None:
        self.refines = 0
        # Per layer: the record of the previous step (when one was taken), and the last
        # secant curvature estimates.
        self.previous: list[dict[str, Tensor] | None] = [None] * len(self.layers)
        self.curvatures: list[list[float]] = [[] for _ in self.layers]
        self._arm_recording(0)

    def after_shrink(self, step: int) -> None:
        """Collect this step's records; on a refine step, estimate each layer's curvature
        and make its best swap; arm the recording for the next step."""
        refine_now = self.schedule.is_half_step(step)
        for index, layer in enumerate(self.layers):
            record = layer.factor_record
            current = record if record and "grad_u" in record and "grad_v" in record else None
            if current is not None and not _finite_record(current):
                # An overflowing step (one that torch.amp.GradScaler skips): no secant and
                # no swap from it, as the scaler takes no optimizer step from it.
                current = None
            if current is not None:
                average_gradients_across_processes(current)
            previous = self.previous[index]  # always the step just before
            if refine_now and current is not None:
                if previous is not None:
                    estimate = secant_curvature(previous, current)
                    if estimate is not None:
                        history = self.curvatures[index]
                        history.append(estimate)
                        del history[:-_CURVATURE_HISTORY]
                if self.curvatures[index]:
                    curvature = float(torch.tensor(self.curvatures[index]).median())
                    swap = _refine_layer(
                        layer, current, curvature, self.config.floor, self.held[index]
                    )
                    if swap is not None:
                        self.refines += 1
            # Kept only for the secant of the next step (four factor-sized tensors).
            next_is_pass = self.schedule.is_half_step(step + 1)
            self.previous[index] = current if next_is_pass else None
        self._arm_recording(step)

    def _arm_recording(self, step: int) -> None:
        """Record the forward after ``step`` when it is a refine step or the one before it
        (the secant needs two consecutive steps); otherwise record nothing."""
        upcoming = step + 1
        wanted = self.schedule.is_half_step(upcoming) or self.schedule.is_half_step(upcoming + 1)
        for layer in self.layers:
            layer.record_factors(wanted)

    def state_dict(self) -> dict[str, Any]:
        return {
            "refines": self.refines,
            "refine_previous": self.previous,
            "curvatures": self.curvatures,
            "factor_records": [layer.factor_record for layer in self.layers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refines = int(state.get("refines", 0))
        count = len(self.layers)
        self.previous = [_cloned(r) for r in state.get("refine_previous", [None] * count)]
        self.curvatures = [list(map(float, h)) for h in state.get("curvatures", [[]] * count)]
        for layer, record in zip(self.layers, state.get("factor_records", [None] * count)):
            layer.factor_record = _cloned(record)
