"""The paper's expressiveness special cases (docs/design.md#special-cases)."""

import pytest
import torch

import gblr
from gblr.layers.special import block_diagonal, block_low_rank, block_sparse, low_rank

SHAPES = [(8, 8), (12, 20), (21, 9), (7, 13)]


def relative_error(layer, target):
    return ((layer.dense_weight() - target).norm() / target.norm()).item()


@pytest.mark.parametrize(("m", "n"), SHAPES)
@pytest.mark.parametrize(("rank", "r"), [(3, 1), (4, 2), (6, 3)])
def test_low_rank(m, n, rank, r):
    u, v = torch.randn(m, rank, dtype=torch.float64), torch.randn(rank, n, dtype=torch.float64)
    layer = low_rank(u, v, rank_per_component=r)
    assert relative_error(layer, u @ v) <= 1e-5
    assert layer.flops() == rank * (m + n)
    assert layer.num_components == rank // r


def block_rank_matrix(m, n, p, q, r):
    """Sum over blocks of random rank-r blocks, grid cut as documented."""
    weight = torch.zeros(m, n, dtype=torch.float64)
    row_cuts = torch.tensor_split(torch.arange(m), p)
    col_cuts = torch.tensor_split(torch.arange(n), q)
    for rows in row_cuts:
        for cols in col_cuts:
            block = torch.randn(len(rows), r, dtype=torch.float64) @ torch.randn(
                r, len(cols), dtype=torch.float64
            )
            weight[rows[:, None], cols] = block
    return weight


@pytest.mark.parametrize(("m", "n"), SHAPES)
@pytest.mark.parametrize("p", [1, 2, 3])
def test_block_low_rank_square_grid(m, n, p):
    target = block_rank_matrix(m, n, p, p, 1)
    layer = block_low_rank(target, p)
    assert relative_error(layer, target) <= 1e-5
    assert layer.flops() == p * (m + n)


def test_block_low_rank_rectangular_grid_rank_two():
    target = block_rank_matrix(12, 20, 2, 4, 2)
    layer = block_low_rank(target, (2, 4), rank_per_component=2)
    assert relative_error(layer, target) <= 1e-5
    assert layer.flops() == 2 * (4 * 12 + 2 * 20)


def test_block_low_rank_projects_non_low_rank_blocks():
    target = torch.randn(8, 8, dtype=torch.float64)
    layer = block_low_rank(target, 2)
    # Each block is replaced by its best rank-1 approximation: error equals the
    # sum of the blocks' discarded singular values squared.
    expected = 0.0
    for i in range(2):
        for j in range(2):
            s = torch.linalg.svdvals(target[4 * i : 4 * i + 4, 4 * j : 4 * j + 4])
            expected += s[1:].pow(2).sum().item()
    assert (layer.dense_weight() - target).pow(2).sum().item() == pytest.approx(expected)


@pytest.mark.parametrize(("m", "n", "b"), [(8, 8, 2), (12, 20, 4), (9, 15, 3)])
def test_block_sparse(m, n, b):
    generator = torch.Generator().manual_seed(m * n)
    target = torch.zeros(m, n, dtype=torch.float64)
    tiles = [(i, j) for i in range(m // b) for j in range(n // b)]
    chosen = [tiles[t] for t in torch.randperm(len(tiles), generator=generator)[:3]]
    for i, j in chosen:
        target[i * b : (i + 1) * b, j * b : (j + 1) * b] = torch.randn(b, b, dtype=torch.float64)
    layer = block_sparse(target, b)
    assert relative_error(layer, target) <= 1e-5
    assert layer.flops() == 3 * b * (b + 1)
    assert layer.flops() <= (1 + 1 / b) * 3 * b * b


def test_block_sparse_with_partial_edge_tiles():
    target = torch.zeros(7, 10, dtype=torch.float64)
    target[4:7, 8:10] = torch.randn(3, 2, dtype=torch.float64)  # a 3x2 edge tile
    layer = block_sparse(target, 4)
    assert relative_error(layer, target) <= 1e-5
    assert layer.flops() == min(2 * (3 + 1), 3 * (2 + 1))


@pytest.mark.parametrize("sizes", [[3, 3, 3], [4, 2, 5], [1, 6]])
def test_block_diagonal_square_blocks(sizes):
    blocks = [torch.randn(s, s, dtype=torch.float64) for s in sizes]
    target = torch.block_diag(*blocks)
    layer = block_diagonal(blocks)
    assert relative_error(layer, target) <= 1e-5
    assert layer.flops() == sum(b * (b + 1) for b in sizes)


def test_block_diagonal_rectangular_blocks():
    blocks = [torch.randn(2, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    layer = block_diagonal(blocks)
    assert relative_error(layer, torch.block_diag(*blocks)) <= 1e-5
    assert layer.flops() == min(5 * 3, 2 * 6) + min(3 * 5, 4 * 4)


def test_zero_matrix_costs_nothing():
    layer = block_sparse(torch.zeros(5, 6), 2)
    assert layer.flops() == 0 and layer.live_components() == 0
    assert torch.count_nonzero(layer.dense_weight()) == 0


def test_special_layers_run_forward_in_float32():
    blocks = [torch.randn(3, 3), torch.randn(3, 3)]
    layer = block_diagonal(blocks)
    x = torch.randn(4, 6)
    assert torch.allclose(layer(x), x @ torch.block_diag(*blocks).T, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ranks differ"):
        low_rank(torch.randn(4, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="divide"):
        low_rank(torch.randn(4, 3), torch.randn(3, 4), rank_per_component=2)
    with pytest.raises(ValueError, match="grid"):
        block_low_rank(torch.randn(4, 4), 5)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse(torch.randn(4, 4), 0)
    with pytest.raises(TypeError, match="blocks"):
        block_diagonal(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"weight must be a non-empty 2-D"):
        block_sparse(torch.randn(4), 2)
    assert gblr.special.low_rank is low_rank


def test_special_builders_name_what_they_cannot_take():
    """Unpacking errors ("too many values to unpack"), a half-precision SVD that failed
    inside torch, a NaN weight taken, factors of two dtypes cast in silence."""
    weight = torch.randn(8, 8)
    with pytest.raises(ValueError, match=r"grid must be an int or a pair of ints"):
        gblr.special.block_low_rank(weight, (2, 2, 2))
    with pytest.raises(TypeError, match=r"grid must be a positive int, got 2\.0"):
        gblr.special.block_low_rank(weight, 2.0)
    with pytest.raises(ValueError, match=r"block_size must be an int or a pair of ints"):
        gblr.special.block_sparse(weight, (2,))
    with pytest.raises(ValueError, match=r"weight must be finite"):
        gblr.special.block_sparse(torch.full((4, 4), float("nan")), 2)
    with pytest.raises(TypeError, match=r"one dtype"):
        gblr.special.low_rank(torch.randn(4, 2), torch.randn(2, 5, dtype=torch.float64))
    half = weight.to(torch.bfloat16)
    layer = gblr.special.block_low_rank(half, 2, rank_per_component=4)  # exact: rank 4 blocks
    assert layer.U.dtype == torch.bfloat16
    assert torch.allclose(layer.eval().dense_weight().float(), half.float(), atol=0.1)
