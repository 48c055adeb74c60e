"""The learner's structure passes on CUDA (run by benchmarks/gpu_checks.sh on a lent GPU)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import gblr
from gblr.learn.synthetic import planted_blocks, regression_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _split_block_and_tangle() -> gblr.GBLRLinear:
    """20 x 20, float64: components 0 and 1 are one rank-1 block cut into two row pieces
    (rows 13..17 and 18..22 mod 20, columns 3..11: merge joins them), components 2 and 3
    two blocks (rows 3..5 / columns 12..14 and rows 6..8 / columns 15..17) held as their
    sum and their difference over the box of both (untangle re-splits them)."""
    layer = gblr.GBLRLinear(
        20, 20, bias=False, num_components=4, dtype=torch.float64,
        widths=[[9 / 20, 9 / 20, 6 / 20, 6 / 20], [5 / 20, 5 / 20, 6 / 20, 6 / 20]],
        locations=[[3 / 20, 3 / 20, 12 / 20, 12 / 20], [13 / 20, 18 / 20, 3 / 20, 3 / 20]],
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(20, generator=generator, dtype=torch.float64)
    v = torch.randn(20, generator=generator, dtype=torch.float64)
    signs = torch.tensor([1.0, 1, 1, -1, -1, -1], dtype=torch.float64)
    with torch.no_grad():
        layer.U.zero_()
        layer.V.zero_()
        layer.U[0, 0], layer.U[1, 0], layer.V[0, 0], layer.V[1, 0] = u, u, v, v
        layer.U[2, 0, 3:9], layer.V[2, 0, 12:18] = u[:6], v[:6]
        layer.U[3, 0, 3:9], layer.V[3, 0, 12:18] = u[:6] * signs, v[:6] * signs
    return layer.eval()


def test_cuda_merge_and_untangle_make_the_cpu_decisions():
    layer = _split_block_and_tangle()
    weight = layer.dense_weight().detach().clone()
    widths = {}
    for device in ("cpu", "cuda"):
        moved = copy.deepcopy(layer).to(device)
        assert gblr.merge_components(moved, tolerance=1e-3) == 1
        assert gblr.untangle_components(moved, tolerance=1e-4) == 1
        assert moved.U.device.type == device and moved.widths.device.type == device
        assert moved.flops() == layer.flops() - 9 - 12  # merge: 28 -> 19, untangle: 24 -> 12
        torch.testing.assert_close(moved.dense_weight().detach().cpu(), weight)
        widths[device] = moved.widths.detach().cpu()
    assert torch.equal(widths["cpu"], widths["cuda"])


def test_cuda_learner_with_every_option_keeps_the_budget_on_the_device():
    target, planted = planted_blocks(32, seed=3, block_sides=(4, 12))
    target = target.cuda()
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(32, 32, bias=False, structure_init="random").cuda()
    optimizer = torch.optim.Adam(gblr.param_groups(layer, lr=1e-2))
    budget = int(1.2 * planted)
    config = dataclasses.replace(gblr.LearnerConfig.planted(), pass_every=10)
    learner = gblr.StructureLearner(
        layer, config, budget_macs=budget, total_steps=300, warmup_steps=150
    )
    regression_steps(layer, target, optimizer, learner, 300)
    assert layer.flops() <= budget
    # refine passes ran on recorded CUDA tensors: each computed a secant curvature
    assert len(learner.passes["refine"].curvatures[0]) > 0
    assert all(parameter.is_cuda for parameter in layer.parameters())
    layer.eval()
    with torch.no_grad():
        error = float((layer.dense_weight() - target).norm() / target.norm())
    assert error < 0.5  # a finite fit, not a recovery claim: 300 steps only
