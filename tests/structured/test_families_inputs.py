"""Inputs the families took badly: empty batches, a bias of another dtype, a whitening
factor the fit cannot use (QA pass of 2026-12-07)."""

import pytest
import torch

from gblr.structured import FAMILIES, LowRankLinear


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_an_empty_batch_gives_an_empty_output(name):
    # block-diagonal, block-sparse and Pixelfly reshaped 0 rows into (0, -1) and failed
    torch.manual_seed(0)
    layer = FAMILIES[name].for_budget(40, 24, budget=0.4)
    for shape in ((0, 40), (2, 0, 40)):
        x = torch.randn(*shape, requires_grad=True)
        out = layer(x)
        assert out.shape == (*shape[:-1], 24)
        out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_from_dense_casts_the_bias_to_the_layer(name):
    # a float64 bias made every output float64; an int one failed inside torch
    weight = torch.randn(24, 40)
    layer = FAMILIES[name].from_dense(weight, 0.4, bias=torch.randn(24, dtype=torch.float64))
    assert layer.bias.dtype == torch.float32 and layer(torch.randn(3, 40)).dtype == torch.float32
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        FAMILIES[name].from_dense(weight, 0.4, bias=torch.arange(24))


def test_a_whitening_factor_the_fit_cannot_use_is_refused():
    torch.manual_seed(0)
    weight, inputs = torch.randn(16, 12), torch.randn(200, 12)
    second_moment = inputs.T @ inputs / 200
    factor = torch.linalg.cholesky(second_moment)
    LowRankLinear.from_dense(weight, 0.3, whitening=factor)  # the documented factor
    rotation, _ = torch.linalg.qr(torch.randn(12, 12))
    # S Sᵀ = M still, but only S's lower triangle was read: a relative error of 1e10
    with pytest.raises(ValueError, match="whitening must be lower triangular"):
        LowRankLinear.from_dense(weight, 0.3, whitening=factor @ rotation)
    singular = factor.clone()
    singular[5:, 5] = 0.0  # an input that is always 0: NaN factors before
    with pytest.raises(ValueError, match="whitening is singular"):
        LowRankLinear.from_dense(weight, 0.3, whitening=singular)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_layer_builds_on_the_meta_device(name):
    # block-sparse and Pixelfly read a tile position's value (.item() on meta) while
    # drawing their tiles
    layer = FAMILIES[name].for_budget(64, 32, budget=0.4, device="meta")
    assert all(p.is_meta for p in layer.parameters())
    assert layer(torch.empty(2, 64, device="meta")).shape == (2, 32)


def test_block_sparse_tiles_are_drawn_as_before():
    # the fan-in per block row is counted over every block row now (no read of the
    # positions' largest value): the same draw, bit for bit
    from gblr.structured.blocksparse import edge_mask, init_tiles_

    torch.manual_seed(0)
    layer = FAMILIES["blocksparse"].for_budget(40, 24, budget=0.4)
    tiles = torch.empty_like(layer.tiles)
    torch.manual_seed(1)
    init_tiles_(tiles, layer.positions, 24, 40)
    mask = edge_mask(layer.positions, tiles.shape[-1], 24, 40)
    rows = int(layer.positions[:, 0].max()) + 1
    fan = torch.zeros(rows, dtype=torch.float64)
    fan = fan.index_add(0, layer.positions[:, 0], mask[:, 0, :].sum(1).double()).clamp_min(1)
    torch.manual_seed(1)
    expected = torch.empty_like(tiles).uniform_(-1.0, 1.0)
    expected = expected * (1 / fan.sqrt())[layer.positions[:, 0]].float()[:, None, None] * mask
    assert torch.equal(tiles, expected)


def test_a_minimum_with_a_fixed_block_count_or_size_says_so():
    # "the smallest Monarch layer of shape (64, 64)" (2048 MACs) with nblocks=16, where
    # the family's smallest, without it, costs 128
    from gblr.structured import BlockSparseLinear, BudgetTooSmallError, MonarchLinear

    weight = torch.randn(64, 64)
    with pytest.raises(BudgetTooSmallError, match=r"smallest Monarch \(nblocks=16\) layer"):
        MonarchLinear.from_dense(weight, 0.05, nblocks=16)
    with pytest.raises(BudgetTooSmallError, match=r"block-sparse \(block_size=32\) layer"):
        BlockSparseLinear.from_dense(weight, 0.1, block_size=32)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_an_empty_side_is_refused_naming_it(name):
    # low-rank called it a budget too small (which convert reads as "leave it dense"),
    # block-diagonal failed with "min() arg is an empty sequence"
    from gblr.structured import BudgetTooSmallError

    family = FAMILIES[name]
    with pytest.raises(ValueError, match=r"out_features must be a positive int") as caught:
        family.from_dense(torch.randn(0, 5), 0.5)
    assert not isinstance(caught.value, BudgetTooSmallError)
    with pytest.raises(ValueError, match=r"in_features must be a positive int"):
        family.for_budget(0, 8, budget=0.5)
