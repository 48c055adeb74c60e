import pytest
import torch

from gblr.structured import BudgetTooSmallError
from gblr.structured.blocksparse import BlockSparseLinear, default_block_size

from .conftest import allowed_macs, forward_macs

# (in, out, block_size, tiles): square, rectangular, and sizes not divisible by b, with
# edge tiles included.
CASES = [
    (64, 64, 16, [(0, 0), (1, 3), (3, 2), (2, 2)]),
    (48, 32, 16, [(0, 2), (1, 0)]),
    (50, 30, 16, [(1, 3), (0, 0), (1, 1)]),
    (29, 13, 4, [(3, 7), (0, 0), (2, 5), (1, 1)]),
]


def make(in_features, out_features, block_size, tiles, bias=True):
    torch.manual_seed(0)
    return BlockSparseLinear(
        in_features, out_features, block_size, tiles, bias=bias, dtype=torch.float64
    )


@pytest.mark.parametrize("in_features,out_features,block_size,tiles", CASES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_forward_matches_dense_weight(in_features, out_features, block_size, tiles, lead):
    layer = make(in_features, out_features, block_size, tiles)
    x = torch.randn(*lead, in_features, dtype=torch.float64)
    expected = x @ layer.dense_weight().T + layer.bias
    out = layer(x)
    assert out.shape == (*lead, out_features)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_features,out_features,block_size,tiles", CASES)
def test_dense_weight_places_tiles(in_features, out_features, block_size, tiles):
    layer = make(in_features, out_features, block_size, tiles, bias=False)
    weight = layer.dense_weight()
    assert weight.shape == (out_features, in_features)
    b = block_size
    expected = torch.zeros(-(-out_features // b) * b, -(-in_features // b) * b, dtype=weight.dtype)
    for t, (i, j) in enumerate(tiles):
        expected[i * b : (i + 1) * b, j * b : (j + 1) * b] = layer.tiles[t].detach()
    torch.testing.assert_close(weight, expected[:out_features, :in_features])


@pytest.mark.parametrize("in_features,out_features,block_size,tiles", CASES)
def test_flops_equal_executed_macs(in_features, out_features, block_size, tiles):
    layer = make(in_features, out_features, block_size, tiles)
    analytic = len(tiles) * block_size * block_size  # padding of edge tiles included
    assert layer.flops() == analytic == forward_macs(layer, in_features)


def test_padding_never_matters():
    layer = make(29, 13, 4, [(3, 7)], bias=False)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:1, :1] = True  # only row 12, column 28 lie inside the (13, 29) matrix
    assert bool((layer.tiles[0][~mask] == 0).all())
    x = torch.randn(5, 29, dtype=torch.float64)
    before = layer(x)
    with torch.no_grad():
        layer.tiles[0][~mask] = 7.0
    torch.testing.assert_close(layer(x), before)
    layer(x).sum().backward()
    assert bool((layer.tiles.grad[0][~mask] == 0).all())


@pytest.mark.parametrize("in_features,out_features,block_size,tiles", CASES)
def test_from_dense_recovers_block_sparse_matrix(in_features, out_features, block_size, tiles):
    target = make(in_features, out_features, block_size, tiles, bias=False)
    weight = target.dense_weight().detach().float()
    bias = torch.randn(out_features)
    layer = BlockSparseLinear.from_dense(
        weight, budget_macs=len(tiles) * block_size**2, bias=bias, block_size=block_size
    )
    assert layer.num_tiles == len(tiles)
    assert sorted(map(tuple, layer.positions.tolist())) == sorted(tiles)
    err = (layer.dense_weight() - weight).norm() / weight.norm()
    assert err <= 1e-5
    torch.testing.assert_close(layer.bias.detach(), bias)
    assert layer.dense_weight().dtype == torch.float32


def test_from_dense_keeps_largest_tiles():
    torch.manual_seed(1)
    weight = torch.randn(32, 48) * 0.01
    big = [(0, 2), (3, 1), (2, 5)]
    for scale, (i, j) in zip([3.0, 2.0, 1.0], big):
        weight[i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8] *= 100 * scale
    layer = BlockSparseLinear.from_dense(weight, budget_macs=2 * 64 + 63, block_size=8)
    assert layer.positions.tolist() == [[0, 2], [3, 1]]  # the two largest, row-major
    layer = BlockSparseLinear.from_dense(weight, budget_macs=3 * 64, block_size=8)
    assert layer.positions.tolist() == [[0, 2], [2, 5], [3, 1]]
    assert layer.bias is None


@pytest.mark.parametrize("shape", [(64, 64), (30, 70), (70, 30), (13, 29)])
@pytest.mark.parametrize(
    "budget",
    [{"budget": b} for b in (0.05, 0.2, 0.5, 1.0)] + [{"budget_macs": n} for n in (300, 1000)],
    ids=str,
)
@pytest.mark.parametrize("block_size", [None, 4])
def test_budget_never_exceeded_and_filled(shape, budget, block_size):
    out_features, in_features = shape
    macs = allowed_macs(out_features * in_features, **budget)
    if block_size is not None and macs < block_size**2:
        return
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    for layer in (
        BlockSparseLinear.for_budget(in_features, out_features, **budget, block_size=block_size),
        BlockSparseLinear.from_dense(weight, **budget, block_size=block_size),
    ):
        b = layer.block_size
        assert layer.flops() <= macs
        grid = layer.num_block_rows * layer.num_block_cols
        # The largest configuration: one more tile would not fit (or none is left).
        assert layer.num_tiles == grid or (layer.num_tiles + 1) * b * b > macs
        assert layer.flops() == forward_macs(layer, in_features)


def test_default_block_size_rule():
    assert BlockSparseLinear.for_budget(768, 768, 0.1).block_size == 32
    # The largest block whose tiles can number the grid's block rows and columns: at
    # 16 a 20 x 50 grid is 2 x 4 blocks, 4 tiles cost 1024 > 500; at 8, 7 tiles fit.
    assert BlockSparseLinear.for_budget(50, 20, 0.5).block_size == 8
    assert BlockSparseLinear.for_budget(64, 192, 0.1).block_size == 4
    # Budgets below one tile per block row or column of every block size fall back to the
    # largest power of two whose single tile fits.
    assert BlockSparseLinear.for_budget(768, 768, budget_macs=300).block_size == 16
    assert BlockSparseLinear.for_budget(768, 768, budget_macs=3).block_size == 1
    assert default_block_size(5, 100) == 4


def test_for_budget_is_seeded_by_global_rng():
    torch.manual_seed(3)
    a = BlockSparseLinear.for_budget(64, 96, 0.3, block_size=8)
    torch.manual_seed(3)
    b = BlockSparseLinear.for_budget(64, 96, 0.3, block_size=8)
    assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(a.tiles, b.tiles)


def test_init_has_linear_output_variance():
    torch.manual_seed(0)
    layer = BlockSparseLinear.for_budget(512, 512, 0.25, block_size=32, bias=False)
    dense = torch.nn.Linear(512, 512, bias=False)
    x = torch.randn(256, 512)
    ratio = layer(x).var() / dense(x).var()
    assert 0.7 < ratio.item() < 1.4


def test_state_dict_roundtrip_keeps_positions():
    layer = make(50, 30, 16, [(1, 3), (0, 0)])
    state = layer.state_dict()
    assert "positions" in state
    other = BlockSparseLinear(50, 30, 16, [(0, 1), (1, 2)], dtype=torch.float64)
    other.load_state_dict(state)
    x = torch.randn(4, 50, dtype=torch.float64)
    torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize(
    ("positions", "match"),
    [([[1, 3], [2, 0]], "block rows must be in"), ([[1, 3], [1, 3]], "must not repeat")],
)
def test_a_state_whose_positions_do_not_fit_is_refused(positions, match):
    """Before, out-of-grid positions loaded and failed at the forward (IndexError) and
    repeated ones loaded and made forward differ from dense_weight()."""
    layer = make(50, 30, 16, [(1, 3), (0, 0)])
    state = layer.state_dict()
    state["positions"] = torch.tensor(positions)
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    model = torch.nn.Sequential(layer)
    with pytest.raises(ValueError, match=rf"0\.positions do not fit.*{match}"):
        model.load_state_dict({"0." + name: tensor for name, tensor in state.items()})
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # nothing half-loaded


def test_below_minimum_budget_raises_naming_minimum():
    with pytest.raises(BudgetTooSmallError, match="budget_macs=63, below the minimum of 64 MACs"):
        BlockSparseLinear.for_budget(64, 64, budget_macs=63, block_size=8)
    with pytest.raises(BudgetTooSmallError, match="minimum of 64 MACs"):
        BlockSparseLinear.from_dense(torch.randn(64, 64), 0.01, block_size=8)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": 2.0}, TypeError, "block_size"),
        ({"block_size": True}, TypeError, "block_size"),
        ({"blocks": []}, ValueError, "at least one tile"),
        ({"blocks": [(0, 0), (0, 0)]}, ValueError, "repeat"),
        ({"blocks": [(2, 0)]}, ValueError, r"block rows must be in \[0, 1\]"),
        ({"blocks": [(0, 4)]}, ValueError, r"block cols must be in \[0, 3\]"),
        ({"blocks": [(0, -1)]}, ValueError, "block cols"),
        ({"blocks": [(0, 1, 2)]}, TypeError, "pairs"),
        ({"blocks": [(0.0, 1)]}, TypeError, "pairs"),
        ({"blocks": torch.zeros(2, 2)}, TypeError, "integers"),
        ({"blocks": torch.zeros(2, 3, dtype=torch.long)}, ValueError, "shape"),
        ({"blocks": "00"}, TypeError, "blocks"),
        ({"blocks": 3}, TypeError, "blocks"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    args = {"in_features": 64, "out_features": 32, "block_size": 16, "blocks": [(0, 0)]}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        BlockSparseLinear(**args)


def test_bad_budget_weight_and_input():
    with pytest.raises(ValueError, match="budget"):
        BlockSparseLinear.for_budget(64, 64, 1.5)
    with pytest.raises(TypeError, match="budget"):
        BlockSparseLinear.for_budget(64, 64, "half")
    with pytest.raises(TypeError, match="block_size"):
        BlockSparseLinear.for_budget(64, 64, 0.5, block_size=8.0)
    with pytest.raises(TypeError, match="weight"):
        BlockSparseLinear.from_dense(torch.randn(64), 0.5)
    with pytest.raises(TypeError):
        BlockSparseLinear.from_dense(torch.randn(8, 8), 0.5, unknown=1)
    layer = make(64, 64, 16, [(0, 0)])
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(3, 63, dtype=torch.float64))
