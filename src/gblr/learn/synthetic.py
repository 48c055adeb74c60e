"""Matrices with a known GBLR structure, for checking that structure learning works."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .config import LearnerConfig
from .factors import check_int

if TYPE_CHECKING:
    from ..layers.base import FactorInit
    from .learner import StructureLearner

__all__ = ["planted_blocks", "recovery_run", "regression_steps"]


def _int_pair(name: str, value: object) -> tuple[int, int]:
    """``value`` as ``(low, high)`` ints, or a ``TypeError`` naming ``name``."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)
    ):
        raise TypeError(f"{name} must be a pair of ints (low, high), got {value!r}")
    return int(value[0]), int(value[1])


def planted_blocks(
    size: int = 64,
    *,
    num_blocks: tuple[int, int] = (3, 5),
    block_sides: tuple[int, int] = (6, 24),
    seed: int = 0,
) -> tuple[Tensor, int]:
    """A ``size x size`` sum of random rank-1 blocks at random circular intervals.

    Blocks may wrap around the edges and overlap. The number of blocks is drawn from
    ``num_blocks`` (inclusive) and each side length from ``block_sides`` (inclusive).

    Args:
        size: matrix side ``n``.
        num_blocks: ``(fewest, most)`` blocks.
        block_sides: ``(shortest, longest)`` interval length.
        seed: random seed (a local generator; the global RNG is untouched).

    Returns:
        ``(target (n, n) float32, planted_cost)``: the MACs per row of the exact GBLR
        representation, ``sum (|R| + |C|)`` over blocks.
    """
    size = check_int("size", size, 1)
    seed = check_int("seed", seed, 0)
    num_blocks = _int_pair("num_blocks", num_blocks)
    block_sides = _int_pair("block_sides", block_sides)
    generator = torch.Generator().manual_seed(1000 + seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    if not 1 <= block_sides[0] <= block_sides[1] <= size:
        raise ValueError(f"block_sides must satisfy 1 <= low <= high <= size, got {block_sides}")
    if not 1 <= num_blocks[0] <= num_blocks[1]:
        raise ValueError(f"num_blocks must satisfy 1 <= low <= high, got {num_blocks}")
    target, cost = torch.zeros(size, size), 0
    for _ in range(draw(*num_blocks)):
        row_len, col_len = draw(*block_sides), draw(*block_sides)
        row_start, col_start = draw(0, size - 1), draw(0, size - 1)
        u = torch.randn(row_len, generator=generator)
        v = torch.randn(col_len, generator=generator)
        rows = (torch.arange(row_len) + row_start) % size
        cols = (torch.arange(col_len) + col_start) % size
        target[rows[:, None], cols] += u[:, None] * v[None, :]
        cost += row_len + col_len
    return target, cost


def regression_steps(
    layer: nn.Module,
    target: Tensor,
    optimizer: torch.optim.Optimizer,
    learner: StructureLearner,
    steps: int,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """``steps`` training steps of ``layer.dense_weight()`` (``(m, n)``) onto ``target``
    (same shape), loss ``‖W - T‖² / ‖T‖²``: optimizer, then learner, then schedule."""
    energy = target.pow(2).sum()
    for _ in range(steps):
        loss = (layer.dense_weight() - target).pow(2).sum() / energy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
        if schedule is not None:
            schedule.step()


def recovery_run(
    seed: int,
    budget_factor: float = 1.5,
    *,
    size: int = 64,
    steps: int = 1500,
    lr: float = 1e-2,
    config: LearnerConfig | None = None,
    lr_decay: float = 0.0,
    factor_init: FactorInit = "uniform",
) -> dict[str, float]:
    """Regress a randomly started ``GBLRLinear`` onto
    [`planted_blocks`][gblr.learn.synthetic.planted_blocks] under a budget.

    The layer starts from random widths and locations; Adam (``param_groups``) trains the
    factors and the structure while a [`gblr.StructureLearner`][] holds the exact cost
    to ``budget_factor`` times the planted cost (ramped down over the first half).

    Args:
        seed: seeds both the target and the layer's initialisation.
        budget_factor: budget as a multiple of the planted cost.
        size: matrix side.
        steps: optimizer steps.
        lr: learning rate of factors and structure.
        config: the learner's [`gblr.LearnerConfig`][], e.g.
            ``LearnerConfig.planted()`` (default: ``LearnerConfig.annealed()``, the
            library's default with σ annealed 1 → 100 and nothing held: a random start
            needs the smoothing to find blocks, and has no block-diagonal strips to hold;
            ``LearnerConfig.paper()`` is the paper's plain method).
        lr_decay: fraction of the steps, at the end, over which the learning rate of
            factors and structure decays linearly to zero (default 0: constant). With a
            constant rate, Adam's normalised steps keep moving interval ends by up to a
            cell per step to the last step, so the final error depends on the moment the
            run stops.
        factor_init: the layer's factor initialisation (``GBLRLinear(factor_init=)``);
            ``"uniform"`` by default, the scheme this benchmark's seeds and the learner's
            measured recoveries (docs/BENCHMARKS.md) were run with.

    Returns:
        ``{"seed", "error", "macs", "budget"}``: relative Frobenius error of the eval-mode
        (exact) weight, its MACs per row, and the budget.
    """
    from ..layers.linear import GBLRLinear
    from .groups import param_groups
    from .learner import StructureLearner

    if isinstance(lr_decay, bool) or not isinstance(lr_decay, (int, float)):
        raise TypeError(f"lr_decay must be a number in [0, 1], got {lr_decay!r}")
    if not 0 <= lr_decay <= 1:
        raise ValueError(f"lr_decay must be in [0, 1], got {lr_decay!r}")
    target, planted_cost = planted_blocks(size, seed=seed)
    torch.manual_seed(seed)
    layer = GBLRLinear(size, size, bias=False, structure_init="random", factor_init=factor_init)
    optimizer = torch.optim.Adam(param_groups(layer, lr=lr))
    decay_steps = lr_decay * steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 if decay_steps == 0 else min(1.0, (steps - step) / decay_steps)
    )
    budget = int(budget_factor * planted_cost)
    if config is None:
        config = LearnerConfig.annealed()
    learner = StructureLearner(
        layer, config, budget_macs=budget, total_steps=steps, warmup_steps=steps // 2
    )
    regression_steps(layer, target, optimizer, learner, steps, schedule)
    layer.eval()
    with torch.no_grad():
        error = ((layer.dense_weight() - target).norm() / target.norm()).item()
    return {"seed": seed, "error": error, "macs": layer.flops(), "budget": budget}
