import pytest
import torch

import gblr
from gblr.cost import fraction_budget_macs


def relative_error(layer, weight):
    with torch.no_grad():
        return ((layer.dense_weight() - weight).norm() / weight.norm()).item()


def svd_error(weight, macs, rank_per_component=1):
    """Independent reference: truncated SVD at the largest rank the MACs pay for."""
    m, n = weight.shape
    rank = rank_per_component * (macs // (rank_per_component * (m + n)))
    singular = torch.linalg.svdvals(weight.double())
    return (singular[rank:].norm() / singular.norm()).item()


def low_rank(generator, rows, cols, rank):
    return torch.randn(rows, rank, generator=generator) @ torch.randn(
        rank, cols, generator=generator
    )


@pytest.mark.parametrize(("m", "n"), [(32, 48), (48, 32), (33, 17)])
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_never_worse_than_truncated_svd_on_random_matrices(m, n, budget):
    weight = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n))
    layer = gblr.fit_dense(weight, budget, steps=30)
    macs = fraction_budget_macs(budget, None, m * n)
    assert layer.flops() <= macs
    assert not layer.training and layer.bias is None
    assert relative_error(layer, weight) <= svd_error(weight, macs) + 1e-5


def test_rank_per_component_two():
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    layer = gblr.fit_dense(weight, 0.4, rank_per_component=2, steps=20)
    macs = fraction_budget_macs(0.4, None, 40 * 24)
    assert layer.rank_per_component == 2 and layer.flops() <= macs
    assert relative_error(layer, weight) <= svd_error(weight, macs, 2) + 1e-5


def block_matrices():
    generator = torch.Generator().manual_seed(0)
    block_diagonal_low_rank = torch.block_diag(*[low_rank(generator, 16, 16, 2) for _ in range(4)])
    wrapped = torch.zeros(48, 80)
    rows, cols = (torch.arange(20) + 40) % 48, (torch.arange(30) + 65) % 80
    wrapped[rows[:, None], cols] = low_rank(generator, 20, 30, 1)
    wrapped[5:25, 10:40] += low_rank(generator, 20, 30, 1)
    block_diagonal_dense = torch.block_diag(
        *[torch.randn(8, 8, generator=generator) for _ in range(6)]
    )
    # (matrix, MACs of its exact GBLR representation)
    return {
        "block-diagonal, rank-2 blocks": (block_diagonal_low_rank, 4 * 2 * 32),
        "two blocks, one wrapped": (wrapped, 50 + 50),
        "block-diagonal, dense blocks": (block_diagonal_dense, 6 * 8 * (8 + 8)),
    }


@pytest.mark.parametrize("name", list(block_matrices()))
def test_block_structure_beats_svd_by_far(name):
    weight, exact_cost = block_matrices()[name]
    macs = int(1.2 * exact_cost)
    layer = gblr.fit_dense(weight, budget_macs=macs, steps=300, lr=1e-2)
    assert layer.flops() <= macs
    # Measured 2026-11-26: 0.05, 0.09 and 0.015 of the SVD error.
    assert relative_error(layer, weight) <= 0.1 * svd_error(weight, macs), name


def test_deterministic_for_a_seed():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    first = gblr.fit_dense(weight, 0.3, steps=20, seed=3)
    second = gblr.fit_dense(weight, 0.3, steps=20, seed=3)
    assert torch.equal(first.dense_weight(), second.dense_weight())


def test_dtype_and_tiny_budget():
    weight = torch.randn(16, 16, dtype=torch.float64)
    layer = gblr.fit_dense(weight, 0.5, steps=5)
    assert layer.U.dtype == torch.float64
    everything = gblr.fit_dense(weight, 1, steps=0)  # the int 1 is all of the dense MACs
    assert torch.equal(everything.U, gblr.fit_dense(weight, 1.0, steps=0).U)
    with pytest.raises(ValueError, match=r"minimum of 2 MACs.*at least 0\.007813"):
        gblr.fit_dense(weight, budget_macs=1, steps=5)  # pays for no component


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((torch.randn(4, 4), 0.0), {}, ValueError),
        ((torch.randn(4, 4), 1.5), {}, ValueError),
        ((torch.randn(4, 4), -3), {}, ValueError),
        ((torch.randn(4, 4), "half"), {}, TypeError),
        ((torch.randn(4), 0.5), {}, TypeError),
        ((torch.tensor([[1.0, float("nan")]]), 0.5), {}, ValueError),
        ((torch.randn(4, 4), 0.5), {"steps": -1}, ValueError),
        ((torch.randn(4, 4), 0.5), {"rank_per_component": 5}, ValueError),
    ],
)
def test_bad_arguments(args, kwargs, error):
    with pytest.raises(error):
        gblr.fit_dense(*args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_stays_on_the_device_and_beats_svd():
    weight, exact_cost = block_matrices()["two blocks, one wrapped"]
    macs = int(1.2 * exact_cost)
    layer = gblr.fit_dense(weight.cuda(), budget_macs=macs, steps=100, lr=1e-2)
    assert layer.U.is_cuda and layer.flops() <= macs
    error = relative_error(layer.cpu(), weight)
    assert error <= 0.1 * svd_error(weight, macs)
