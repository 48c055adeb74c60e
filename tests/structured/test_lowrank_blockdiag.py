import pytest
import torch

from gblr.structured import BudgetTooSmallError
from gblr.structured.blockdiag import BlockDiagLinear
from gblr.structured.lowrank import LowRankLinear
from tests.structured.conftest import allowed_macs, forward_macs

SHAPES = [(24, 24), (20, 36), (37, 13)]  # (in, out): square, wide, odd and uneven


def layers(in_features, out_features):
    return [
        LowRankLinear(in_features, out_features, rank=3, dtype=torch.float64),
        LowRankLinear(in_features, out_features, rank=3, bias=False, dtype=torch.float64),
        BlockDiagLinear(in_features, out_features, num_blocks=1, dtype=torch.float64),
        BlockDiagLinear(in_features, out_features, num_blocks=4, dtype=torch.float64),
        BlockDiagLinear(in_features, out_features, num_blocks=5, bias=False, dtype=torch.float64),
    ]


@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_forward_equals_dense_weight_product(in_features, out_features, lead):
    for layer in layers(in_features, out_features):
        x = torch.randn(*lead, in_features, dtype=torch.float64)
        expected = x @ layer.dense_weight().T
        if layer.bias is not None:
            expected = expected + layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-12), layer


@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
def test_flops_are_the_macs_forward_really_uses(in_features, out_features):
    for layer in layers(in_features, out_features):
        assert layer.flops() == forward_macs(layer, in_features), layer
    low = LowRankLinear(in_features, out_features, rank=3)
    assert low.flops() == 3 * (in_features + out_features)
    diag = BlockDiagLinear(in_features, out_features, num_blocks=4)

    def pieces(size):  # the size rule: the first size % 4 pieces are one longer
        return [size // 4 + (i < size % 4) for i in range(4)]

    expected = sum(rows * cols for rows, cols in zip(pieces(out_features), pieces(in_features)))
    assert diag.flops() == expected == BlockDiagLinear.cost(in_features, out_features, 4)


def test_block_diagonal_padding_enters_no_product_and_gets_no_gradient():
    # 7 inputs and 5 outputs over 3 blocks: pieces (3, 2, 2) and (2, 2, 1), so the stored
    # (3, 2, 3) tiles hold padding; NaN there must not reach the output or the gradients.
    layer = BlockDiagLinear(7, 5, num_blocks=3, dtype=torch.float64)
    with torch.no_grad():
        layer.blocks[1, :, 2] = float("nan")
        layer.blocks[2, 1, :] = float("nan")
        layer.blocks[2, :, 2] = float("nan")
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert torch.allclose(out, x @ layer.dense_weight().T + layer.bias)
    out.sum().backward()
    grad = layer.blocks.grad
    assert grad[1, :, 2].eq(0).all() and grad[2, 1, :].eq(0).all() and grad[2, :, 2].eq(0).all()
    assert torch.isfinite(x.grad).all()


def test_block_diagonal_size_rule_and_dense_weight():
    layer = BlockDiagLinear(7, 5, num_blocks=3, bias=False, dtype=torch.float64)
    assert layer.in_sizes == [3, 2, 2] and layer.out_sizes == [2, 2, 1]
    weight = layer.dense_weight()
    # zero outside the three diagonal blocks, brute-force check
    starts_in, starts_out = [0, 3, 5, 7], [0, 2, 4, 5]
    for i in range(5):
        for j in range(7):
            same = any(
                starts_out[b] <= i < starts_out[b + 1] and starts_in[b] <= j < starts_in[b + 1]
                for b in range(3)
            )
            assert (weight[i, j] != 0) == same


@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
def test_from_dense_recovers_members_of_the_family(in_features, out_features):
    rank = 4
    target = torch.randn(out_features, rank, dtype=torch.float64) @ torch.randn(
        rank, in_features, dtype=torch.float64
    )
    low = LowRankLinear.from_dense(target, budget_macs=rank * (in_features + out_features))
    assert low.rank == rank
    assert torch.allclose(low.dense_weight(), target, rtol=1e-10, atol=1e-10)

    member = BlockDiagLinear(in_features, out_features, num_blocks=3, dtype=torch.float64)
    target = member.dense_weight().detach()
    bias = torch.randn(out_features, dtype=torch.float64)
    fitted = BlockDiagLinear.from_dense(target, budget_macs=member.flops(), bias=bias)
    assert fitted.num_blocks == 3
    assert torch.equal(fitted.dense_weight(), target)
    assert torch.equal(fitted.bias.detach(), bias)


def test_truncated_svd_is_optimal():
    weight = torch.randn(30, 40, dtype=torch.float64)
    layer = LowRankLinear.from_dense(weight, 0.3)
    singular = torch.linalg.svdvals(weight)
    error = (layer.dense_weight() - weight).norm()
    assert torch.isclose(error, singular[layer.rank :].norm())


@pytest.mark.parametrize(
    "budget",
    [{"budget": b} for b in (0.05, 0.2, 0.5, 0.9, 1.0)] + [{"budget_macs": 500}],
    ids=str,
)
@pytest.mark.parametrize("cls", [LowRankLinear, BlockDiagLinear])
def test_budget_is_never_exceeded_and_mostly_used(cls, budget):
    weight = torch.randn(48, 64)
    allowed = allowed_macs(48 * 64, **budget)
    for layer in (cls.from_dense(weight, **budget), cls.for_budget(64, 48, **budget)):
        assert layer.flops() <= allowed
    if cls is LowRankLinear:  # the next rank would not fit
        assert layer.flops() + 112 > allowed or layer.rank == 48
    else:  # one block fewer would not fit
        p = layer.num_blocks
        assert p == 1 or BlockDiagLinear.cost(64, 48, p - 1) > allowed


def test_budget_below_the_smallest_configuration_names_the_minimum():
    minimum = r"below the minimum of 112 MACs \(the smallest low-rank layer of shape \(48, 64\)\)"
    with pytest.raises(BudgetTooSmallError, match=rf"budget_macs=100, {minimum}"):
        LowRankLinear.for_budget(64, 48, budget_macs=100)
    # 48 blocks, 16 of 1 x 2 and 32 of 1 x 1 (64 inputs over 48 blocks: the first 16
    # pieces have 2): 16 * 2 + 32 * 1 MACs
    minimum = r"minimum of 64 MACs \(the smallest block-diagonal layer .*\): budget must be"
    with pytest.raises(BudgetTooSmallError, match=minimum):
        BlockDiagLinear.from_dense(torch.randn(48, 64), 0.01)


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: LowRankLinear(8, 8, rank=9), ValueError, "rank"),
        (lambda: LowRankLinear(8, 8, rank=0), ValueError, "rank"),
        (lambda: LowRankLinear(0, 8, rank=1), ValueError, "in_features"),
        (lambda: BlockDiagLinear(8, 4, num_blocks=5), ValueError, "num_blocks"),
        (lambda: BlockDiagLinear(8, 4, num_blocks=2, bias=1), TypeError, "bias"),
        (lambda: LowRankLinear.from_dense(torch.randn(4), 0.5), TypeError, "weight"),
        (lambda: LowRankLinear(8, 8, 2)(torch.randn(3, 7)), ValueError, "in_features=8"),
        (
            lambda: BlockDiagLinear.from_dense(torch.randn(8, 8), 0.5, bias=torch.ones(3)),
            ValueError,
            "bias",
        ),
        # an option the family does not have is refused, not ignored (a whitening would
        # silently give an uncalibrated fit)
        (
            lambda: BlockDiagLinear.from_dense(torch.randn(8, 8), 0.5, whitening=torch.eye(8)),
            TypeError,
            "whitening",
        ),
        (lambda: LowRankLinear.from_dense(torch.randn(8, 8), 0.5, rank=2), TypeError, "rank"),
        (
            lambda: LowRankLinear.from_dense(torch.randn(8, 6), 0.5, whitening=torch.eye(8)),
            ValueError,
            r"whitening must have shape \(in, in\) = \(6, 6\), got \(8, 8\)",
        ),
        (
            lambda: LowRankLinear.from_dense(
                torch.randn(8, 8), 0.5, whitening=torch.full((8, 8), float("nan"))
            ),
            ValueError,
            "whitening must be finite",
        ),
        (
            lambda: LowRankLinear.from_dense(torch.randn(8, 8), 0.5, whitening=[[1.0]]),
            TypeError,
            "whitening must be a floating-point torch.Tensor",
        ),
    ],
)
def test_bad_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()
