import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gblr
from gblr.ops import boxcar_mask, gaudi_mask_on_grid, round_to_grid
from tests.conftest import circular_boxcar


@pytest.mark.parametrize("n", [1, 2, 7, 8, 33, 64])
def test_sigma_inf_equals_circular_boxcar_on_grid(n):
    starts = [0, n - 1, n // 2, 1 % n, 0, n - 1]
    lengths = [0, 1 if n > 1 else 0, n, max(n - 1, 0), n, n]  # includes wrap and full
    width = torch.tensor(lengths, dtype=torch.float64) / n
    location = torch.tensor(starts, dtype=torch.float64) / n
    mask = gblr.gaudi_mask(width, location, n)
    expected = circular_boxcar(starts, lengths, n)
    assert mask.shape == (len(starts), n)
    assert (mask - expected).abs().max().item() <= 1e-5
    inf_mask = gblr.gaudi_mask(width, location, n, sigma=math.inf)
    assert torch.equal(inf_mask, mask)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 97),
    data=st.data(),
)
def test_sigma_inf_boxcar_property(n, data):
    k = data.draw(st.integers(1, 6))
    starts = data.draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k))
    lengths = data.draw(st.lists(st.integers(0, n), min_size=k, max_size=k))
    width = torch.tensor(lengths, dtype=torch.float64) / n
    location = torch.tensor(starts, dtype=torch.float64) / n
    expected = circular_boxcar(starts, lengths, n)
    assert (gblr.gaudi_mask(width, location, n) - expected).abs().max().item() <= 1e-5
    assert torch.equal(boxcar_mask(width, location, n), expected)


def test_width_zero_is_exactly_zero_for_any_sigma_and_location():
    location = torch.tensor([0.0, 0.123, 0.77], dtype=torch.float64)
    width = torch.zeros(3, dtype=torch.float64)
    for sigma in [None, 0.5, 3.0, 100.0]:
        mask = gblr.gaudi_mask(width, location, 31, sigma=sigma)
        assert torch.count_nonzero(mask) == 0


def test_full_width_is_all_ones():
    mask = gblr.gaudi_mask(torch.ones(2), torch.tensor([0.0, 0.4]), 10)
    assert torch.allclose(mask, torch.ones(2, 10), atol=1e-6)


def test_location_is_periodic():
    width = torch.tensor([0.3], dtype=torch.float64)
    a = gblr.gaudi_mask(width, torch.tensor([0.2], dtype=torch.float64), 20, sigma=5.0)
    b = gblr.gaudi_mask(width, torch.tensor([1.2], dtype=torch.float64), 20, sigma=5.0)
    assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("n", [15, 16])
def test_converges_to_boxcar_as_sigma_grows(n):
    width = torch.tensor([5 / n, 1 / n, 9 / n], dtype=torch.float64)
    location = torch.tensor([0.0, 3 / n, (n - 4) / n], dtype=torch.float64)
    box = boxcar_mask(width, location, n)
    errors = [
        (gblr.gaudi_mask(width, location, n, sigma=s) - box).abs().max().item()
        for s in [1.0, 3.0, 10.0, 100.0, 1000.0]
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1
    assert errors[-1] < 1e-4


@pytest.mark.parametrize("n", [9, 12])
@pytest.mark.parametrize("sigma", [None, 1.0, 4.0, 50.0])
def test_gradcheck_width_and_location(n, sigma):
    width = torch.tensor([0.31, 0.77, 0.05], dtype=torch.float64, requires_grad=True)
    location = torch.tensor([0.12, 0.9, 0.48], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w, loc: gblr.gaudi_mask(w, loc, n, sigma=sigma), (width, location)
    )


def test_gradient_is_nonzero_for_both_parameters():
    width = torch.tensor([0.25], requires_grad=True)
    location = torch.tensor([0.1], requires_grad=True)
    target = torch.zeros(16)
    target[4:12] = 1.0
    loss = (gblr.gaudi_mask(width, location, 16, sigma=2.0)[0] - target).pow(2).sum()
    loss.backward()
    assert width.grad.item() < 0  # target is wider: widening lowers the loss
    assert location.grad.item() < 0  # target sits to the right: moving right lowers it


def test_float32_and_batched_shape():
    width = torch.rand(4, 3)
    location = torch.rand(4, 3)
    mask = gblr.gaudi_mask(width, location, 10, sigma=torch.tensor(2.0))
    assert mask.shape == (4, 3, 10)
    assert mask.dtype == torch.float32
    reference = gblr.gaudi_mask(width.double(), location.double(), 10, sigma=2.0)
    assert torch.allclose(mask.double(), reference, atol=1e-5)


def test_half_inputs_compute_in_float32():
    mask = gblr.gaudi_mask(torch.tensor([0.5], dtype=torch.bfloat16), torch.zeros(1), 8)
    assert mask.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    width, location = torch.rand(5), torch.rand(5)
    cpu = gblr.gaudi_mask(width, location, 33, sigma=3.0)
    gpu = gblr.gaudi_mask(width.cuda(), location.cuda(), 33, sigma=3.0)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


def test_bad_arguments():
    w = torch.zeros(2)
    with pytest.raises(ValueError, match="n must be"):
        gblr.gaudi_mask(w, w, 0)
    with pytest.raises(ValueError, match="same shape"):
        gblr.gaudi_mask(w, torch.zeros(3), 4)
    with pytest.raises(ValueError, match="sigma"):
        gblr.gaudi_mask(w, w, 4, sigma=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        gblr.gaudi_mask(w, w, 4, sigma=0.0)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        gblr.gaudi_mask([0.1], w, 4)


def test_round_to_grid_is_straight_through():
    x = torch.tensor([0.26, 0.74], requires_grad=True)
    y = round_to_grid(x, 4)
    assert torch.equal(y.detach(), torch.tensor([0.25, 0.75]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(2))


def _reference_on_grid(width, location, n, sigma):
    """gaudi_mask at straight-through grid-rounded parameters (widths clamped to [0, 1])."""
    snapped = torch.round(width.clamp(0.0, 1.0) * n) / n
    return gblr.gaudi_mask(
        width + (snapped - width).detach(), round_to_grid(location, n), n, sigma=sigma
    )


@pytest.mark.parametrize("n", [1, 2, 7, 8, 33, 64])
@pytest.mark.parametrize("sigma", [None, 0.7, 3.0, 50.0])
def test_on_grid_equals_reference_in_value_and_gradient(n, sigma):
    generator = torch.Generator().manual_seed(n)
    width = torch.rand(2, 7, dtype=torch.float64, generator=generator) * 1.4 - 0.2
    width[0, :2] = torch.tensor([0.0, 1.0])  # dead and full components
    location = torch.rand(2, 7, dtype=torch.float64, generator=generator) * 4 - 2
    grad_out = torch.randn(2, 7, n, dtype=torch.float64, generator=generator)
    results = []
    for fn in (gaudi_mask_on_grid, _reference_on_grid):
        w = width.clone().requires_grad_()
        loc = location.clone().requires_grad_()
        mask = fn(w, loc, n, sigma)
        (mask * grad_out).sum().backward()
        results.append((mask, w.grad, loc.grad))
    for fast, reference in zip(*results):
        assert fast.shape == reference.shape
        assert torch.allclose(fast, reference, atol=1e-10, rtol=0)


def test_on_grid_float32_and_boxcar_at_sigma_inf():
    width = torch.tensor([0.3, 0.0, 1.0, 0.55])
    location = torch.tensor([0.9, 0.2, 0.4, -0.3])
    mask = gaudi_mask_on_grid(width, location, 20)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, boxcar_mask(width, location, 20))  # exact at sigma = inf
    with pytest.raises(ValueError, match="sigma"):
        gaudi_mask_on_grid(width, location, 20, sigma=-2.0)
