"""The fused Triton masking kernels against the torch composition, on the CPU through
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU); on
a GPU machine the same tests run the compiled kernels on CUDA tensors."""

import pytest
import torch

from gblr.ops import mask_factors
from tests.conftest import DEVICE

pytest.importorskip("triton")


def _inputs(k, rank, rows, cols, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    factor_u = torch.randn(k, rank, rows, dtype=dtype, generator=generator)
    factor_v = torch.randn(k, rank, cols, dtype=dtype, generator=generator)
    # Widths cover 0 (dead), 1 (full) and values in between; locations wrap.
    widths = torch.rand(2, k, dtype=torch.float64, generator=generator)
    widths[0, 0], widths[1, -1] = 0.0, 1.0
    locations = torch.rand(2, k, dtype=torch.float64, generator=generator) * 1.8 - 0.4
    return [t.to(DEVICE, dtype) for t in (factor_u, factor_v, widths, locations)]


CASES = [
    # (K, rank, rows, cols, sigma): odd and even sizes, rows < cols and rows > cols, a size
    # above one block (1024 columns), rank > 1, no sigma
    (5, 1, 17, 12, 2.0),
    (4, 3, 64, 33, 7.5),
    (3, 2, 20, 1031, 30.0),
    (6, 1, 40, 40, None),
]


@pytest.mark.parametrize("k, rank, rows, cols, sigma", CASES)
def test_forward_and_gradients_match_torch_float64(k, rank, rows, cols, sigma):
    inputs = _inputs(k, rank, rows, cols, torch.float64, seed=rows + cols)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        u, v = mask_factors(*leaves, sigma=sigma, backend=backend)
        loss = 0
        for out in (u, v):
            weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=DEVICE)
            loss = loss + (out * weights.reshape(out.shape)).sum()
        loss.backward()
        results[backend] = (u.detach(), v.detach(), *(leaf.grad for leaf in leaves))
    names = ("U", "V", "U grad", "V grad", "widths grad", "locations grad")
    for name, ours, reference in zip(names, results["triton"], results["torch"]):
        assert ours.dtype == reference.dtype, name
        assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-10), name


def test_an_unused_output_gets_a_zero_gradient():
    inputs = _inputs(3, 1, 9, 14, torch.float64, seed=3)
    grads = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        u, _ = mask_factors(*leaves, sigma=2.0, backend=backend)
        u.sum().backward()
        # The torch composition leaves V's gradient unset; zero is the same gradient.
        grads[backend] = [
            torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves
        ]
    for ours, reference in zip(grads["triton"], grads["torch"]):
        assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-10)


def test_float32_factors_and_bfloat16_autocast_output():
    inputs = _inputs(4, 2, 50, 21, torch.float32, seed=1)
    reference = mask_factors(*inputs, sigma=3.0, backend="torch")
    ours = mask_factors(*inputs, sigma=3.0, backend="triton")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        low = mask_factors(*inputs, sigma=3.0, backend="triton")
    for expected, full, half in zip(reference, ours, low):
        assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
        assert torch.allclose(full, expected, rtol=1e-6, atol=1e-6)
        assert torch.allclose(half.float(), expected, rtol=1e-2, atol=1e-2)


def test_half_grid_points_round_like_torch():
    # Exactly representable x.5 grid positions: torch.round rounds half to even, and the
    # kernel must land on the same interval (else training and eval structures differ).
    n = 16
    widths = torch.tensor([0.5, 1.5, 2.5, 7.5, 16.5], dtype=torch.float64) / n
    locations = torch.tensor([2.5, 3.5, -0.5, -1.5, 15.5], dtype=torch.float64) / n
    inputs = [
        torch.randn(5, 1, n, dtype=torch.float64),
        torch.randn(5, 1, n, dtype=torch.float64),
        torch.stack([widths, widths.flip(0)]),
        torch.stack([locations, locations.flip(0)]),
    ]
    inputs = [t.to(DEVICE) for t in inputs]
    reference = mask_factors(*inputs, sigma=None, backend="torch")
    ours = mask_factors(*inputs, sigma=None, backend="triton")
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)


def test_bad_arguments():
    factor_u, factor_v, widths, locations = _inputs(3, 1, 8, 5, torch.float32, seed=2)
    with pytest.raises(ValueError, match="backend"):
        mask_factors(factor_u, factor_v, widths, locations, backend="cuda")
    with pytest.raises(ValueError, match="factor_u"):
        mask_factors(factor_u[0], factor_v, widths, locations)
    with pytest.raises(ValueError, match="widths"):
        mask_factors(factor_u, factor_v, widths[:, :2], locations)
    with pytest.raises(ValueError, match="sigma"):
        mask_factors(factor_u, factor_v, widths, locations, sigma=-1.0)
