"""The held strips' windowed training form against independent computations: a dense
weight built from exact boxcars, and the width's gradient as a loop over the lines near
each interval's end of the exact masks' edge kernel."""

from __future__ import annotations

import pytest
import torch

import gblr
import gblr.ops.strip_windows
from gblr.ops.gaudi import _grid_kernels
from gblr.ops.strip_windows import EDGE_MARGIN, strip_window_product


@pytest.fixture(params=["batched", "runs"])
def form(request, monkeypatch):
    """Each test once with the windows' batched product and once with the in-place runs
    (`_WindowRunsProduct`), whichever the input's rows would pick."""
    threshold = 10**9 if request.param == "batched" else 1
    monkeypatch.setattr(gblr.ops.strip_windows, "RUNS_MIN_ROWS", threshold)
    return request.param


def _strips(side, rank, shape, count, groups, longest, seed):
    """Widths and locations of ``count`` components one line wide on ``side`` (distinct
    lines), in ``groups`` groups sharing a start on the other side, lengths below
    ``longest``; float64 factors and an input of 5 rows."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    strip_size, long_size = (in_features, out_features) if side == 0 else shape
    group_starts = torch.randint(0, long_size, (groups,), generator=generator)
    starts = group_starts[torch.randint(0, groups, (count,), generator=generator)]
    lengths = torch.randint(0, longest, (count,), generator=generator)
    lines = torch.randperm(strip_size, generator=generator)[:count]
    widths = torch.zeros(2, count, dtype=torch.float64)
    locations = torch.zeros(2, count, dtype=torch.float64)
    widths[side], locations[side] = 1 / strip_size, lines / strip_size
    widths[1 - side], locations[1 - side] = lengths / long_size, starts / long_size
    u = torch.randn(count, rank, out_features, dtype=torch.float64, generator=generator)
    v = torch.randn(count, rank, in_features, dtype=torch.float64, generator=generator)
    x = torch.randn(5, in_features, dtype=torch.float64, generator=generator)
    return u, v, widths, locations, x


def _dense_product(x, u, v, widths, locations):
    """``x @ W.T`` with ``W`` built from exact boxcars held as leaves (for their
    gradients): ``(output, column masks, row masks)``."""
    col_mask = gblr.boxcar_mask(widths[0], locations[0], v.shape[2]).requires_grad_(True)
    row_mask = gblr.boxcar_mask(widths[1], locations[1], u.shape[2]).requires_grad_(True)
    weight = torch.einsum("kro,kri->oi", u * row_mask[:, None], v * col_mask[:, None])
    return x @ weight.T, col_mask, row_mask


def _cut_width_gradient(grad_mask, width, location, n, margin):
    """Per component: the mask's gradient times the exact edge kernel over the lines
    within ``margin`` of the interval's end (``distance < margin``), by a loop."""
    edge = _grid_kernels(n, None, torch.float64, torch.device("cpu"))[1][:n]
    result = []
    for k in range(grad_mask.shape[0]):
        end = round(float(location[k]) * n) + round(float(width[k]) * n)
        total = 0.0
        for line in range(n):
            index = (line - end) % n  # 0: the first line past the end
            if min(index, n - 1 - index) < margin:
                total += float(grad_mask[k, line]) * float(edge[index])
        result.append(total)
    return torch.tensor(result, dtype=torch.float64)


CASES = [  # side, rank, (out, in), components, groups, longest
    (0, 1, (64, 16), 16, 3, 16),
    (0, 2, (30, 30), 27, 6, 8),
    (0, 3, (12, 40), 40, 4, 5),  # long side shorter than 2 * margin: the window is all
    (1, 1, (16, 64), 16, 3, 16),
    (1, 2, (40, 12), 40, 7, 9),
    (1, 1, (30, 30), 25, 25, 10),  # one component per group
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("seed", [0, 1])
def test_window_form_gives_the_dense_product_and_the_cut_width_gradient(case, seed, form):
    side, rank, shape, count, groups, longest = case
    u, v, widths, locations, x = _strips(side, rank, shape, count, groups, longest, seed)
    leaves = [t.clone().requires_grad_(True) for t in (u, v, widths, locations, x)]
    skip = (side == 0, side == 1, True)
    out = strip_window_product(leaves[4], *leaves[:4], skip, max_window=1.0)
    generator = torch.Generator().manual_seed(9)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=generator)
    (out * weights).sum().backward()

    reference = [t.clone().requires_grad_(True) for t in (u, v, x)]
    expected, col_mask, row_mask = _dense_product(
        reference[2], reference[0], reference[1], widths, locations
    )
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    for got, want in zip((leaves[0], leaves[1], leaves[4]), reference, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-10)
    long_side = 1 - side
    grad_mask = (row_mask if long_side == 1 else col_mask).grad
    n = shape[0] if long_side == 1 else shape[1]
    width_gradient = _cut_width_gradient(
        grad_mask, widths[long_side], locations[long_side], n, EDGE_MARGIN
    )
    torch.testing.assert_close(leaves[2].grad[long_side], width_gradient, rtol=1e-9, atol=1e-9)
    assert leaves[2].grad[long_side].abs().sum() > 0
    assert (leaves[2].grad[side] == 0).all() and (leaves[3].grad == 0).all()  # held


@pytest.mark.parametrize("side", [0, 1])
def test_window_form_gradcheck_in_the_factors_and_the_input(side, form):
    """The form is linear in the factors and the input: their gradients are exact."""
    shape = (24, 8) if side == 0 else (8, 24)
    u, v, widths, locations, x = _strips(side, 2, shape, 8, 3, 4, seed=3)
    skip = (side == 0, side == 1, True)

    def product(u, v, x):
        return strip_window_product(x, u, v, widths, locations, skip, max_window=1.0)

    inputs = tuple(t.requires_grad_(True) for t in (u, v, x))
    assert product(*inputs) is not None  # windows of at most 3 + 16 of 24 lines
    assert torch.autograd.gradcheck(product, inputs)


def test_a_held_long_side_gets_no_width_gradient():
    u, v, widths, locations, x = _strips(0, 1, (64, 16), 16, 3, 16, seed=0)
    widths.requires_grad_(True)
    strip_window_product(x, u, v, widths, locations, (True, True, True)).sum().backward()
    assert (widths.grad == 0).all()


def test_window_form_applies_only_to_held_one_line_sides_and_short_windows():
    u, v, widths, locations, x = _strips(0, 1, (64, 16), 16, 3, 16, seed=0)
    longest = int((widths[1] * 64).round().max())
    assert strip_window_product(x, u, v, widths, locations, (True, False, True)) is not None
    for skip in (None, (False, False, True), (True, False, False), (False, True, True)):
        assert strip_window_product(x, u, v, widths, locations, skip) is None, skip
    # A window longer than max_window of the long side: the full-length forms.
    fraction = (longest + 2 * EDGE_MARGIN) / 64
    args = (x, u, v, widths, locations, (True, False, True))
    assert strip_window_product(*args, max_window=fraction) is not None
    assert strip_window_product(*args, max_window=fraction - 1e-3) is None
    wide = widths.clone()
    wide[0, 0] = 2 / 16  # one component two lines wide on its held side
    assert strip_window_product(x, u, v, wide, locations, (True, False, True)) is None
    bad = locations.clone()
    bad[1, 0] = float("nan")
    assert strip_window_product(x, u, v, widths, bad, (True, False, True)) is None


@pytest.mark.parametrize("side", [0, 1])
def test_components_read_from_all_factors_give_the_subset_product(side, form):
    """``components``: the widths and locations of some components, the factors of all;
    the product, and the gradients of every factor entry, are those of the subset's
    factors (entries of the components left out get zero gradients)."""
    shape = (48, 16) if side == 0 else (16, 48)
    u, v, widths, locations, x = _strips(side, 2, shape, 16, 4, 8, seed=5)
    components = torch.tensor([0, 2, 3, 7, 8, 9, 15])
    skip = (side == 0, side == 1, True)
    full = [t.clone().requires_grad_(True) for t in (u, v)]
    out = strip_window_product(
        x, *full, widths[:, components], locations[:, components], skip, components=components
    )
    subset = [t[components].clone().requires_grad_(True) for t in (u, v)]
    expected = strip_window_product(
        x, *subset, widths[:, components], locations[:, components], skip
    )
    assert out is not None and expected is not None
    weights = torch.randn(out.shape, dtype=torch.float64)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    left_out = torch.ones(16, dtype=torch.bool)
    left_out[components] = False
    for whole, part in zip(full, subset, strict=True):
        torch.testing.assert_close(whole.grad[components], part.grad, rtol=0, atol=1e-12)
        assert (whole.grad[left_out] == 0).all()


@pytest.mark.parametrize("side", [0, 1])
def test_runs_match_the_batched_product_where_an_input_needs_no_gradient(side, monkeypatch):
    """A layer's first input needs no gradient: the runs then give the factors' gradients
    alone, the batched product's."""
    u, v, widths, locations, x = _strips(side, 2, (40, 12) if side else (12, 40), 12, 3, 6, 7)
    skip = (side == 0, side == 1, True)
    results = []
    for threshold in (10**9, 1):
        monkeypatch.setattr(gblr.ops.strip_windows, "RUNS_MIN_ROWS", threshold)
        factors = [t.clone().requires_grad_(True) for t in (u, v)]
        out = strip_window_product(x, *factors, widths, locations, skip, max_window=1.0)
        out.square().sum().backward()
        results.append((out, *(t.grad for t in factors)))
    for batched, runs in zip(*results, strict=True):
        torch.testing.assert_close(runs, batched, rtol=0, atol=1e-10)
