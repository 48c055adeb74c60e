"""Inputs the families took badly: empty batches, a bias of another dtype, a whitening
factor the fit cannot use (QA pass of 2026-12-07)."""

import pytest
import torch

from gblr.structured import FAMILIES, LowRankLinear


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_an_empty_batch_gives_an_empty_output(name):
    # block-diagonal, block-sparse and Pixelfly reshaped 0 rows into (0, -1) and failed
    torch.manual_seed(0)
    layer = FAMILIES[name].for_budget(40, 24, budget=0.4)
    for shape in ((0, 40), (2, 0, 40)):
        x = torch.randn(*shape, requires_grad=True)
        out = layer(x)
        assert out.shape == (*shape[:-1], 24)
        out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_from_dense_casts_the_bias_to_the_layer(name):
    # a float64 bias made every output float64; an int one failed inside torch
    weight = torch.randn(24, 40)
    layer = FAMILIES[name].from_dense(weight, 0.4, bias=torch.randn(24, dtype=torch.float64))
    assert layer.bias.dtype == torch.float32 and layer(torch.randn(3, 40)).dtype == torch.float32
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        FAMILIES[name].from_dense(weight, 0.4, bias=torch.arange(24))


def test_a_whitening_factor_the_fit_cannot_use_is_refused():
    torch.manual_seed(0)
    weight, inputs = torch.randn(16, 12), torch.randn(200, 12)
    second_moment = inputs.T @ inputs / 200
    factor = torch.linalg.cholesky(second_moment)
    LowRankLinear.from_dense(weight, 0.3, whitening=factor)  # the documented factor
    rotation, _ = torch.linalg.qr(torch.randn(12, 12))
    # S Sᵀ = M still, but only S's lower triangle was read: a relative error of 1e10
    with pytest.raises(ValueError, match="whitening must be lower triangular"):
        LowRankLinear.from_dense(weight, 0.3, whitening=factor @ rotation)
    singular = factor.clone()
    singular[5:, 5] = 0.0  # an input that is always 0: NaN factors before
    with pytest.raises(ValueError, match="whitening is singular"):
        LowRankLinear.from_dense(weight, 0.3, whitening=singular)
