import math

import pytest
import torch

from gblr.structured import BudgetTooSmallError
from gblr.structured.pixelfly import PixelflyLinear, butterfly_pattern, max_butterfly_levels

from .conftest import allowed_macs, forward_macs

# (in, out, block_size, rank, butterfly_levels): square power-of-two and not, rectangular
# both ways, sizes not divisible by b, rank 0.
CASES = [
    (64, 64, 8, 4, None),
    (96, 64, 8, 3, 2),
    (40, 72, 8, 2, 1),
    (50, 30, 8, 5, None),
    (29, 13, 4, 2, 0),
    (64, 64, 16, 0, None),
]


def make(in_features, out_features, block_size, rank, levels, bias=True):
    torch.manual_seed(0)
    return PixelflyLinear(
        in_features,
        out_features,
        block_size,
        rank,
        bias=bias,
        butterfly_levels=levels,
        dtype=torch.float64,
    )


def randomize(layer):
    with torch.no_grad():
        layer.tiles.normal_()
        layer.U.normal_()
        layer.V.normal_()
    return layer


def test_square_power_of_two_pattern_is_flat_butterfly():
    pattern = butterfly_pattern(8, 8, 3)
    for i in range(8):
        expected = {i} | {i ^ (1 << k) for k in range(3)}
        assert set(pattern[i].nonzero().flatten().tolist()) == expected
    assert pattern.sum() == 8 * 4  # 1 + log2(n) tiles per block row
    assert torch.equal(pattern, pattern.T)
    assert butterfly_pattern(8, 8, 0).equal(torch.eye(8, dtype=torch.bool))
    assert max_butterfly_levels(8, 8) == 3
    assert max_butterfly_levels(5, 9) == 3  # strides 1, 2, 4 below m = 5
    assert max_butterfly_levels(1, 4) == 0


def test_rectangular_pattern_folds_modulo_shorter_side():
    wide = butterfly_pattern(2, 6, 1)  # m = 2, columns folded modulo 2: all linked
    assert bool(wide.all())
    tall = butterfly_pattern(8, 4, 1)  # m = 4, rows folded modulo 4
    assert torch.equal(tall[4:], tall[:4])
    assert torch.equal(tall[:4], butterfly_pattern(4, 4, 1))
    diagonal = butterfly_pattern(3, 7, 0)
    assert diagonal.sum() == 7 and bool(diagonal.any(0).all()) and bool(diagonal.any(1).all())
    odd = butterfly_pattern(5, 5, 3)  # XORs outside [0, 5) are dropped
    assert set(odd[4].nonzero().flatten().tolist()) == {4, 0}
    assert set(odd[0].nonzero().flatten().tolist()) == {0, 1, 2, 4}


@pytest.mark.parametrize("in_features,out_features,block_size,rank,levels", CASES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_forward_matches_dense_weight(in_features, out_features, block_size, rank, levels, lead):
    layer = randomize(make(in_features, out_features, block_size, rank, levels))
    x = torch.randn(*lead, in_features, dtype=torch.float64)
    expected = x @ layer.dense_weight().T + layer.bias
    out = layer(x)
    assert out.shape == (*lead, out_features)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_features,out_features,block_size,rank,levels", CASES)
def test_flops_equal_executed_macs(in_features, out_features, block_size, rank, levels):
    layer = make(in_features, out_features, block_size, rank, levels)
    rows, cols = -(-out_features // block_size), -(-in_features // block_size)
    if levels is None:
        levels = max_butterfly_levels(rows, cols)
    tiles = int(butterfly_pattern(rows, cols, levels).sum())
    analytic = tiles * block_size**2 + rank * (in_features + out_features)
    assert layer.flops() == analytic == forward_macs(layer, in_features)
    assert analytic == PixelflyLinear.cost(in_features, out_features, block_size, rank, levels)


@pytest.mark.parametrize("in_features,out_features,block_size,rank,levels", CASES)
def test_from_dense_recovers_pixelfly_matrix(in_features, out_features, block_size, rank, levels):
    target = randomize(make(in_features, out_features, block_size, rank, levels, bias=False))
    weight = target.dense_weight().detach().float()
    budget = target.flops()
    fraction = rank * (in_features + out_features) / budget
    bias = torch.randn(out_features)
    layer = PixelflyLinear.from_dense(
        weight, budget_macs=budget, bias=bias, block_size=block_size, lowrank_fraction=fraction
    )
    assert (layer.rank, layer.butterfly_levels) == (target.rank, target.butterfly_levels)
    assert layer.flops() == budget
    err = (layer.dense_weight() - weight).norm() / weight.norm()
    assert err <= 1e-5
    torch.testing.assert_close(layer.bias.detach(), bias)
    assert layer.tiles.dtype == torch.float32


def test_from_dense_refits_do_not_hurt():
    torch.manual_seed(0)
    weight = torch.randn(64, 96, dtype=torch.float64)
    errors = [
        (PixelflyLinear.from_dense(weight, 0.4, refits=n).dense_weight() - weight).norm()
        for n in (0, 20)
    ]
    assert errors[1] <= errors[0] + 1e-9
    # refits=0 is the order of the docstring: truncated SVD, then the residual's tiles.
    layer = PixelflyLinear.from_dense(weight, 0.4, refits=0)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    low = (u[:, : layer.rank] * s[: layer.rank]) @ vh[: layer.rank]
    torch.testing.assert_close(layer.U @ layer.V, low)
    torch.testing.assert_close(layer.sparse_weight(), (weight - low) * _mask(layer))


def _mask(layer):
    b = layer.block_size
    pattern = butterfly_pattern(layer.num_block_rows, layer.num_block_cols, layer.butterfly_levels)
    full = pattern.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return full[: layer.out_features, : layer.in_features]


def test_from_dense_without_low_rank_keeps_pattern_tiles():
    weight = torch.randn(40, 56)
    layer = PixelflyLinear.from_dense(weight, 0.5, block_size=8, lowrank_fraction=0.0)
    assert layer.rank == 0
    torch.testing.assert_close(layer.dense_weight(), weight * _mask(layer))


@pytest.mark.parametrize("shape", [(64, 64), (30, 70), (96, 40), (13, 29)])
@pytest.mark.parametrize(
    "budget", [{"budget": b} for b in (0.3, 0.5, 0.8, 1.0)] + [{"budget_macs": 2000}], ids=str
)
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_budget_never_exceeded_and_split(shape, budget, fraction):
    out_features, in_features = shape
    macs = allowed_macs(out_features * in_features, **budget)
    unit = in_features + out_features
    try:
        block_size, rank, levels = PixelflyLinear.config_for(
            in_features, out_features, **budget, lowrank_fraction=fraction
        )
    except BudgetTooSmallError as error:
        assert "MACs" in str(error)
        return
    layer = PixelflyLinear.for_budget(
        in_features, out_features, **budget, lowrank_fraction=fraction
    )
    assert (layer.block_size, layer.rank, layer.butterfly_levels) == (block_size, rank, levels)
    assert layer.flops() <= macs
    assert layer.flops() == forward_macs(layer, in_features)
    sparse = layer.flops() - rank * unit
    assert (rank == 0) == (fraction == 0)
    # The low rank takes what the sparse part leaves (up to min(in, out)).
    assert rank == min(in_features, out_features) or fraction == 0 or macs - layer.flops() < unit
    # The sparse part stays within its share (or the block diagonal, always kept), up to
    # what the rank's rounding leaves, unless the low rank is capped.
    share = macs - math.floor(fraction * macs)
    diagonal = PixelflyLinear.cost(in_features, out_features, block_size, 0, 0)
    assert sparse < max(share, diagonal) + unit or rank == min(in_features, out_features)
    top = max_butterfly_levels(layer.num_block_rows, layer.num_block_cols)
    if levels < top:  # one more level would not fit next to this rank
        assert (
            PixelflyLinear.cost(in_features, out_features, block_size, rank, levels + 1) > macs
            or PixelflyLinear.cost(in_features, out_features, block_size, 0, levels + 1) > share
        )


def test_budget_respected_by_from_dense():
    weight = torch.randn(48, 80)
    for budget in ({"budget": 0.2}, {"budget": 0.45}, {"budget": 0.9}, {"budget_macs": 1500}):
        layer = PixelflyLinear.from_dense(weight, **budget, refits=2)
        assert layer.flops() <= allowed_macs(48 * 80, **budget)


def test_default_block_size_rule():
    assert PixelflyLinear.for_budget(768, 768, 0.2).block_size == 32
    # Clipped to the matrix size (b <= 12): 5 diagonal tiles of 8 x 8 fit 480 MACs.
    assert PixelflyLinear.for_budget(12, 40, 1.0, lowrank_fraction=0.0).block_size == 8
    # The block diagonal must fit the sparse share (half of 0.04 * 768^2 = 11796 MACs):
    # 24 tiles of 32^2 and 48 of 16^2 do not, 96 of 8^2 (6144 MACs) do.
    assert PixelflyLinear.for_budget(768, 768, 0.04).block_size == 8
    # Without a low-rank term the whole budget is the sparse share.
    assert PixelflyLinear.for_budget(768, 768, 0.05, lowrank_fraction=0.0).block_size == 32
    # All of it to the low rank: the smallest diagonal, b = 1.
    assert PixelflyLinear.for_budget(64, 64, 0.5, lowrank_fraction=1.0).block_size == 1
    with pytest.raises(BudgetTooSmallError, match="minimum of 26112 MACs"):
        PixelflyLinear.for_budget(768, 768, 0.04, block_size=32)  # 24 * 1024 + 1536 MACs


def test_half_split_by_default():
    layer = PixelflyLinear.for_budget(1024, 1024, 0.25, block_size=32)
    low = layer.rank * 2048
    assert abs(low - (layer.flops() - low)) <= 0.1 * layer.flops()


def test_below_minimum_budget_raises_naming_minimum():
    # block size 8 on 64 x 64: the 8 diagonal tiles (512 MACs) + rank 1 (128 MACs).
    with pytest.raises(BudgetTooSmallError, match="budget_macs=639, below the minimum of 640 MACs"):
        PixelflyLinear.for_budget(64, 64, budget_macs=639, block_size=8)
    with pytest.raises(BudgetTooSmallError, match="minimum of 512 MACs"):
        PixelflyLinear.for_budget(64, 64, budget_macs=511, block_size=8, lowrank_fraction=0.0)
    # Default block size: the smallest over the candidate sizes (b = 1: 64 + 128).
    with pytest.raises(BudgetTooSmallError, match="minimum of 192 MACs"):
        PixelflyLinear.from_dense(torch.randn(64, 64), budget_macs=191)
    assert PixelflyLinear.for_budget(64, 64, budget_macs=640, block_size=8).rank == 1


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": 1.5}, TypeError, "block_size"),
        ({"rank": -1}, ValueError, "rank"),
        ({"rank": 33}, ValueError, r"rank must be in \[0, min\(in, out\) = 32\]"),
        ({"rank": 2.0}, TypeError, "rank"),
        ({"butterfly_levels": 3}, ValueError, r"butterfly_levels must be in \[0, 2\]"),
        ({"butterfly_levels": -1}, ValueError, "butterfly_levels"),
        ({"butterfly_levels": 1.0}, TypeError, "butterfly_levels"),
        ({"bias": 1}, TypeError, "bias"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    args = {"in_features": 64, "out_features": 32, "block_size": 8, "rank": 2}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        PixelflyLinear(**args)


def test_bad_budget_arguments():
    weight = torch.randn(32, 32)
    with pytest.raises(ValueError, match="lowrank_fraction"):
        PixelflyLinear.for_budget(32, 32, 0.5, lowrank_fraction=1.5)
    with pytest.raises(TypeError, match="lowrank_fraction"):
        PixelflyLinear.for_budget(32, 32, 0.5, lowrank_fraction="half")
    with pytest.raises(ValueError, match="refits"):
        PixelflyLinear.from_dense(weight, 0.5, refits=-1)
    with pytest.raises(TypeError, match="refits"):
        PixelflyLinear.from_dense(weight, 0.5, refits=2.0)
    with pytest.raises(TypeError, match="weight"):
        PixelflyLinear.from_dense(weight.long(), 0.5)
    with pytest.raises(ValueError, match="budget"):
        PixelflyLinear.from_dense(weight, 0.0)
    layer = PixelflyLinear.for_budget(32, 32, 0.5)
    with pytest.raises(ValueError, match="in_features=32"):
        layer(torch.randn(2, 31))
