"""The fused Triton masking kernels against the torch composition, on the CPU through
Triton's interpreter (the same kernels run compiled on CUDA)."""

import pytest
import torch

from gblr.ops.gaudi import masked_factor
from tests.conftest import DEVICE

pytest.importorskip("triton")


def _inputs(k, rank, n, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(k, rank, n, dtype=dtype, generator=generator).to(DEVICE)
    # Widths cover 0 (dead), 1 (full) and values in between; locations wrap.
    width = torch.rand(k, dtype=torch.float64, generator=generator)
    width[0], width[-1] = 0.0, 1.0
    location = torch.rand(k, dtype=torch.float64, generator=generator) * 1.8 - 0.4
    return factor, width.to(DEVICE, dtype), location.to(DEVICE, dtype)


CASES = [
    # (K, rank, n, sigma): odd and even n, n above one block (1024), rank > 1, no sigma
    (5, 1, 17, 2.0),
    (4, 3, 64, 7.5),
    (3, 2, 1031, 30.0),
    (6, 1, 40, None),
]


@pytest.mark.parametrize("k, rank, n, sigma", CASES)
def test_forward_and_gradients_match_torch_float64(k, rank, n, sigma):
    factor, width, location = _inputs(k, rank, n, torch.float64, seed=n)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (factor, width, location)]
        out = masked_factor(*leaves, sigma=sigma, backend=backend)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=DEVICE)
        upstream = upstream.reshape(out.shape)
        (out * upstream).sum().backward()
        results[backend] = (out.detach(), *(leaf.grad for leaf in leaves))
    for name, ours, reference in zip(
        ("out", "factor grad", "width grad", "location grad"),
        results["triton"],
        results["torch"],
    ):
        assert ours.dtype == reference.dtype, name
        assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-10), name


def test_float32_factor_and_bfloat16_autocast_output():
    factor, width, location = _inputs(4, 2, 50, torch.float32, seed=1)
    reference = masked_factor(factor, width, location, sigma=3.0, backend="torch")
    ours = masked_factor(factor, width, location, sigma=3.0, backend="triton")
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        low = masked_factor(factor, width, location, sigma=3.0, backend="triton")
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), reference, rtol=1e-2, atol=1e-2)


def test_bad_arguments():
    factor, width, location = _inputs(3, 1, 8, torch.float32, seed=2)
    with pytest.raises(ValueError, match="backend"):
        masked_factor(factor, width, location, backend="cuda")
    with pytest.raises(ValueError, match="factor"):
        masked_factor(factor[0], width, location)
    with pytest.raises(ValueError, match="width"):
        masked_factor(factor, width[:2], location[:2])


def test_half_grid_points_round_like_torch():
    # Exactly representable x.5 grid positions: torch.round rounds half to even, and the
    # kernel must land on the same interval (else training and eval structures differ).
    n = 16
    width = torch.tensor([0.5, 1.5, 2.5, 7.5, 16.5], dtype=torch.float64) / n
    location = torch.tensor([2.5, 3.5, -0.5, -1.5, 15.5], dtype=torch.float64) / n
    factor = torch.randn(5, 1, n, dtype=torch.float64)
    args = [t.to(DEVICE) for t in (factor, width, location)]
    reference = masked_factor(*args, sigma=None, backend="torch")
    ours = masked_factor(*args, sigma=None, backend="triton")
    assert torch.equal(ours, reference)
