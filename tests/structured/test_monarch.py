"""MonarchLinear: forward vs dense weight, the paper's P L P^T R form, MAC counts, the
per-block SVD projection, budgets, the GBLR cross-check and input errors."""

import math

import pytest
import torch

import gblr
from gblr.structured.base import BudgetTooSmallError, StructuredLinear
from gblr.structured.monarch import MonarchLinear, monarch_flops

from .conftest import allowed_macs, forward_macs

# (in, out, nblocks, rank): square, rectangular both ways, padded (non-dividing) sizes.
CONFIGS = [
    (16, 16, 4, 1),  # the paper's square Monarch, n = b^2
    (16, 16, 2, 3),
    (24, 12, 4, 2),
    (12, 20, 4, 3),
    (10, 7, 3, 2),  # nblocks divides neither side
    (9, 9, 9, 1),  # nblocks = n: 1-wide chunks
    (5, 13, 2, 1),
]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _random_monarch(n, m, b, r, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return MonarchLinear(n, m, nblocks=b, rank=r, bias=False, dtype=dtype)


def _stride_permutation_matrix(groups: int, size: int) -> torch.Tensor:
    """``(size, size)`` matrix mapping index ``g * (size // groups) + j`` to ``j * groups + g``."""
    per = size // groups
    perm = torch.zeros(size, size, dtype=torch.float64)
    for g in range(groups):
        for j in range(per):
            perm[j * groups + g, g * per + j] = 1.0
    return perm


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("n, m, b, r", CONFIGS)
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_forward_matches_dense_weight(n, m, b, r, lead):
    torch.manual_seed(0)
    layer = MonarchLinear(n, m, nblocks=b, rank=r, dtype=torch.float64)
    assert isinstance(layer, StructuredLinear)
    x = torch.randn(*lead, n, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, m)
    weight = layer.dense_weight()
    assert weight.shape == (m, n)
    torch.testing.assert_close(y, x @ weight.T + layer.bias, rtol=1e-10, atol=1e-12)


def test_forward_float32_and_no_bias_and_gradients():
    torch.manual_seed(1)
    layer = MonarchLinear(10, 7, nblocks=3, rank=2, bias=False)
    x = torch.randn(4, 10)
    y = layer(x)
    torch.testing.assert_close(y, x @ layer.dense_weight().T, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert layer.left.grad is not None and layer.right.grad is not None
    assert layer.left.grad.abs().sum() > 0 and layer.right.grad.abs().sum() > 0


@pytest.mark.parametrize("n, m, b, r", [(16, 16, 4, 1), (27, 27, 3, 1), (12, 18, 3, 2)])
def test_dense_weight_is_p_l_pt_r(n, m, b, r):
    """With b dividing n and m, the weight equals the product of the explicit matrices of
    the paper: R = blockdiag(right), P^T the stride permutation of the b*b*r intermediate
    values in groups of r, L = blockdiag(left), P the stride permutation of the outputs."""
    layer = _random_monarch(n, m, b, r, seed=2)
    right = torch.block_diag(*layer.right.detach())  # (b * b r, n)
    left = torch.block_diag(*layer.left.detach())  # (m, b * b r)
    # P^T on the intermediate: (k, l, t) -> (l, k, t), a stride permutation of r-groups.
    mid = _stride_permutation_matrix(b, b * b)
    mid_t = torch.kron(mid, torch.eye(r, dtype=torch.float64))
    out_p = _stride_permutation_matrix(b, m)
    torch.testing.assert_close(layer.dense_weight().detach(), out_p @ left @ mid_t @ right)
    if n == m == b * b and r == 1:  # the paper's square Monarch: b blocks of b x b
        assert layer.left.shape == layer.right.shape == (b, b, b)
        torch.testing.assert_close(mid_t, out_p)  # the same P on both sides


@pytest.mark.parametrize("n, m, b, r", CONFIGS)
def test_padding_stays_zero_and_blocks_have_rank_r(n, m, b, r):
    layer = _random_monarch(n, m, b, r, seed=3)
    assert not (layer.right * ~layer._in_mask.unsqueeze(1)).any()
    assert not (layer.left * ~layer._out_mask.unsqueeze(2)).any()
    # P^T W is block-low-rank on the b x b grid with blocks of rank <= r.
    grouped = layer.dense_weight().detach()[layer.output_groups()]
    row_sizes = [math.ceil((m - g) / b) for g in range(b)]
    col_sizes = [n // b + (1 if k < n % b else 0) for k in range(b)]
    for rows in grouped.split(row_sizes, dim=0):
        for block in rows.split(col_sizes, dim=1):
            assert torch.linalg.matrix_rank(block) <= min(r, *block.shape)


# --------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("n, m, b, r", CONFIGS)
def test_flops_counted_and_formula(n, m, b, r):
    layer = MonarchLinear(n, m, nblocks=b, rank=r)
    p, s = math.ceil(n / b), math.ceil(m / b)
    expected = b * b * r * (p + s)
    assert layer.flops() == expected == monarch_flops(n, m, b, r)
    assert forward_macs(layer, n) == expected
    if n % b == 0 and m % b == 0:
        assert expected == r * b * (n + m)


def test_paper_cost_for_square_monarch():
    """n = b^2, r = 1: 2 n^{3/2} MACs (paper, Sec. 3)."""
    layer = MonarchLinear(64, 64, nblocks=8)
    assert layer.flops() == forward_macs(layer, 64) == 2 * 64 * 8


# --------------------------------------------------------------------------- projection


@pytest.mark.parametrize("n, m, b, r", CONFIGS)
def test_from_dense_recovers_monarch(n, m, b, r):
    target = _random_monarch(n, m, b, r, seed=4, dtype=torch.float32).dense_weight().detach()
    layer = MonarchLinear.from_dense(target, budget_macs=monarch_flops(n, m, b, r), nblocks=b)
    assert (layer.nblocks, layer.rank) == (b, r)
    assert layer.dense_weight().dtype == torch.float32
    assert _relative(layer.dense_weight().detach(), target) <= 1e-5
    assert layer.bias is None


@pytest.mark.parametrize("n, m, b, r", [(16, 16, 4, 1), (24, 12, 4, 2), (10, 7, 3, 2)])
def test_from_dense_is_a_projection(n, m, b, r):
    torch.manual_seed(5)
    target = torch.randn(m, n, dtype=torch.float64)
    budget = monarch_flops(n, m, b, r)
    layer = MonarchLinear.from_dense(target, budget_macs=budget, nblocks=b, rank=r)
    approx = layer.dense_weight().detach()
    error = float((approx - target).norm())
    # Eckart-Young per grid block: the error is the norm of the discarded singular values.
    grouped = target[layer.output_groups()]
    row_sizes = [math.ceil((m - g) / b) for g in range(b)]
    col_sizes = [n // b + (1 if k < n % b else 0) for k in range(b)]
    tail = sum(
        float(torch.linalg.svdvals(block)[r:].square().sum())
        for rows in grouped.split(row_sizes, dim=0)
        for block in rows.split(col_sizes, dim=1)
    )
    assert error == pytest.approx(math.sqrt(tail), rel=1e-9)
    # No random Monarch matrix of the same configuration, nor a perturbation of the
    # projection's own factors, does better.
    for seed in range(5):
        other = _random_monarch(n, m, b, r, seed=10 + seed).dense_weight().detach()
        assert error <= float((other - target).norm())
    for seed in range(5):
        torch.manual_seed(20 + seed)
        nudged = MonarchLinear(n, m, nblocks=b, rank=r, bias=False, dtype=torch.float64)
        with torch.no_grad():
            nudged.left.copy_(layer.left + 1e-3 * torch.randn_like(layer.left))
            nudged.right.copy_(layer.right + 1e-3 * torch.randn_like(layer.right))
        assert error <= float((nudged.dense_weight().detach() - target).norm()) + 1e-12
    # Projecting twice changes nothing; a Monarch matrix projects with zero error.
    again = MonarchLinear.from_dense(approx, budget_macs=budget, nblocks=b, rank=r).dense_weight()
    assert _relative(again.detach(), approx) <= 1e-10


def test_from_dense_bias_and_best_nblocks():
    torch.manual_seed(6)
    target = _random_monarch(24, 24, 6, 1, seed=7).dense_weight().detach()
    bias = torch.randn(24, dtype=torch.float64)
    budget = monarch_flops(24, 24, 6, 1)  # = monarch_flops(24, 24, 3, 2) = ... (b r = 6)
    best = MonarchLinear.from_dense(target, budget_macs=budget, bias=bias, nblocks="best")
    assert best.flops() <= budget
    assert _relative(best.dense_weight().detach(), target) <= 1e-10  # found the b = 6 grid
    torch.testing.assert_close(best.bias.detach(), bias)
    # "best" is never worse than the default choice or any fixed nblocks within budget.
    noise = target + 0.1 * torch.randn_like(target)
    best_error = _relative(
        MonarchLinear.from_dense(noise, budget_macs=budget, nblocks="best").dense_weight(), noise
    )
    for nblocks in (None, 1, 2, 3, 4, 6):
        fixed = MonarchLinear.from_dense(noise, budget_macs=budget, nblocks=nblocks)
        assert best_error <= _relative(fixed.dense_weight(), noise) + 1e-12


# --------------------------------------------------------------------------- budgets


def _all_configs(n, m):
    for b in range(1, min(n, m) + 1):
        for r in range(1, min(math.ceil(n / b), math.ceil(m / b)) + 1):
            yield b, r, monarch_flops(n, m, b, r)


@pytest.mark.parametrize("n, m", [(16, 16), (24, 10), (13, 29)])
@pytest.mark.parametrize(
    "budget",
    [{"budget": b} for b in (0.1, 0.25, 0.5, 1.0)] + [{"budget_macs": c} for c in (60, 200)],
    ids=str,
)
def test_budget_never_exceeded_and_maximal(n, m, budget):
    macs = allowed_macs(n * m, **budget)
    if macs < n + m:
        with pytest.raises(BudgetTooSmallError, match=f"minimum of {n + m} MACs"):
            MonarchLinear.for_budget(n, m, **budget)
        return
    best = max(cost for _, _, cost in _all_configs(n, m) if cost <= macs)
    layer = MonarchLinear.for_budget(n, m, **budget)
    assert layer.flops() == best <= macs
    assert forward_macs(layer, n) == layer.flops()
    torch.manual_seed(8)
    projected = MonarchLinear.from_dense(torch.randn(m, n), **budget)
    assert projected.flops() == best
    for nblocks in (1, 2, 3):
        within = [c for b, _, c in _all_configs(n, m) if b == nblocks and c <= macs]
        if not within:  # below this nblocks' rank-1 cost
            minimum = f"minimum of {monarch_flops(n, m, nblocks)} MACs"
            with pytest.raises(BudgetTooSmallError, match=minimum):
                MonarchLinear.for_budget(n, m, **budget, nblocks=nblocks)
            continue
        fixed_best = max(within)
        fixed = MonarchLinear.for_budget(n, m, **budget, nblocks=nblocks)
        assert fixed.nblocks == nblocks and fixed.flops() == fixed_best
        projected = MonarchLinear.from_dense(torch.randn(m, n), **budget, nblocks=nblocks)
        assert projected.flops() <= macs


def test_for_budget_prefers_paper_shape_on_ties():
    """64 x 64 at 1024 MACs: b r = 8 for all of (8,1), (4,2), (2,4), (1,8); the square
    paper Monarch (8 blocks of 8 x 8) is chosen. At 2048 MACs, b r = 16 with square
    16 x 16 blocks: (4, 4)."""
    layer = MonarchLinear.for_budget(64, 64, budget_macs=1024)
    assert (layer.nblocks, layer.rank, layer.flops()) == (8, 1, 1024)
    layer = MonarchLinear.for_budget(64, 64, budget_macs=2048)
    assert (layer.nblocks, layer.rank, layer.flops()) == (4, 4, 2048)
    layer = MonarchLinear.for_budget(64, 64, budget_macs=2048, rank=1)
    assert (layer.nblocks, layer.rank) == (16, 1)


def test_below_minimum_budget_names_minimum():
    minimum = r"minimum of 32 MACs \(the smallest Monarch layer of shape \(16, 16\)\)"
    with pytest.raises(BudgetTooSmallError, match=rf"budget_macs=31, below the {minimum}"):
        MonarchLinear.for_budget(16, 16, budget_macs=31)
    with pytest.raises(BudgetTooSmallError, match=rf"budget=0.1 allows 25 .*{minimum}"):
        MonarchLinear.from_dense(torch.randn(16, 16), 0.1)
    # with nblocks fixed, the minimum is that of rank 1 at that nblocks
    with pytest.raises(BudgetTooSmallError, match=f"{monarch_flops(16, 16, 4, 1)} MACs"):
        MonarchLinear.for_budget(16, 16, budget_macs=100, nblocks=4)


# --------------------------------------------------------------------------- GBLR


@pytest.mark.parametrize("n, m, b, r", CONFIGS)
def test_gblr_represents_grouped_monarch_at_equal_cost(n, m, b, r):
    """What is verified: with the outputs taken in group order (``P^T W``, a fixed
    relabelling of the outputs), a Monarch matrix is block-low-rank on a ``b x b`` grid with
    rank-``r`` blocks (row blocks of ``ceil((m-l)/b)`` rows, column chunks of the input
    split). A GBLR matrix with one rank-``r`` component per grid block, built directly from
    the Monarch factors with ``GBLRLinear.from_intervals`` (no SVD), equals it (<= 1e-5)
    and costs ``r b (n + m)`` MACs: equal to the Monarch layer when ``b`` divides ``n``
    and ``m``, strictly less when the Monarch layer pays for padding. The same holds for
    ``gblr.special.block_low_rank`` (per-block SVD) on the grouped matrix."""
    monarch = _random_monarch(n, m, b, r, seed=9, dtype=torch.float32)
    grouped = monarch.dense_weight().detach()[monarch.output_groups()]
    row_sizes = [math.ceil((m - g) / b) for g in range(b)]
    col_sizes = [n // b + (1 if k < n % b else 0) for k in range(b)]
    row_starts = [sum(row_sizes[:g]) for g in range(b)]
    col_starts = [sum(col_sizes[:k]) for k in range(b)]
    factors_u, factors_v, rows, cols = [], [], [], []
    left, right = monarch.left.detach(), monarch.right.detach()
    for g in range(b):
        for k in range(b):
            u = torch.zeros(r, m)
            v = torch.zeros(r, n)
            u[:, row_starts[g] : row_starts[g] + row_sizes[g]] = left[
                g, : row_sizes[g], k * r : (k + 1) * r
            ].T
            v[:, col_starts[k] : col_starts[k] + col_sizes[k]] = right[
                k, g * r : (g + 1) * r, : col_sizes[k]
            ]
            factors_u.append(u)
            factors_v.append(v)
            rows.append((row_starts[g], row_sizes[g]))
            cols.append((col_starts[k], col_sizes[k]))
    layer = gblr.GBLRLinear.from_intervals(
        torch.stack(factors_u), torch.stack(factors_v), rows, cols
    ).eval()
    assert _relative(layer.dense_weight().detach(), grouped) <= 1e-5
    x = torch.randn(3, n)
    torch.testing.assert_close(
        layer(x), monarch(x)[:, monarch.output_groups()], rtol=1e-4, atol=1e-5
    )
    assert layer.flops() == r * b * (n + m) <= monarch.flops()
    if n % b == 0 and m % b == 0:
        assert layer.flops() == monarch.flops()
    special = gblr.special.block_low_rank(grouped, (b, b), rank_per_component=r)
    assert _relative(special.dense_weight().detach(), grouped) <= 1e-5
    assert special.flops() == layer.flops()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"nblocks": 0}, ValueError, r"nblocks must be in \[1, min\(in_features"),
        ({"nblocks": 9}, ValueError, r"nblocks must be in \[1, .*= \[1, 8\], got 9"),
        ({"nblocks": 2.0}, TypeError, "nblocks must be an int"),
        ({"nblocks": True}, TypeError, "nblocks must be an int"),
        ({"nblocks": 2, "rank": 0}, ValueError, "rank must be a positive int"),
        ({"nblocks": 2, "rank": 1.5}, TypeError, "rank must be a positive int"),
        ({"nblocks": 2, "rank": 5}, ValueError, r"rank must be in \[1, .*\[1, 4\]"),
        ({"nblocks": 2, "bias": 1}, TypeError, "bias must be a bool"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        MonarchLinear(12, 8, **kwargs)


def test_other_errors():
    with pytest.raises(TypeError, match="nblocks"):
        MonarchLinear(12, 8)  # nblocks is required
    with pytest.raises(TypeError, match="in_features must be a positive int"):
        MonarchLinear.for_budget(12.0, 8, 0.5)
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\] .*, got 1.5"):
        MonarchLinear.for_budget(12, 8, 1.5)
    with pytest.raises(TypeError, match="budget must be"):
        MonarchLinear.for_budget(12, 8, "half")
    with pytest.raises(ValueError, match="rank=9 is too large"):
        MonarchLinear.for_budget(12, 8, 1.0, rank=9)
    with pytest.raises(TypeError, match="weight must be a 2-D floating-point"):
        MonarchLinear.from_dense(torch.ones(3, 4, 5), 1.0)
    with pytest.raises(TypeError, match="weight must be a 2-D floating-point"):
        MonarchLinear.from_dense(torch.ones(8, 12, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="nblocks must be an int, None or 'best'"):
        MonarchLinear.from_dense(torch.ones(8, 12), 1.0, nblocks="auto")
    with pytest.raises(TypeError, match="nblocks must be an int, None or 'best'"):
        MonarchLinear.from_dense(torch.ones(8, 12), 1.0, nblocks=2.0)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(8,\)"):
        MonarchLinear.from_dense(torch.ones(8, 12), 1.0, bias=torch.ones(12))
    layer = MonarchLinear(12, 8, nblocks=2)
    with pytest.raises(ValueError, match="in_features=12"):
        layer(torch.randn(3, 11))
    with pytest.raises(ValueError, match="in_features=12"):
        layer(torch.tensor(1.0))
