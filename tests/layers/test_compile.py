"""GBLR layers under ``torch.compile``: one graph per training step, no recompile when σ
changes, and the same values and gradients as eager mode.

The compiled path masks the factors with :func:`gblr.ops.gaudi.mask_factors_traceable`
(σ read as a tensor, real arithmetic only); it is checked here against the eager path's
masks, which are themselves checked against autograd through ``gaudi_mask`` in
tests/ops/test_gaudi.py.
"""

import math
import shutil
import warnings

import pytest
import torch
import torch._dynamo

import gblr
from gblr.ops import gaudi, gaudi_mask_on_grid, mask_factors
from gblr.ops.gaudi import (
    _build_grid_kernels,
    _gaudi_mask_on_grid_traceable,
    _grid_tables_from_tensor,
    mask_factors_traceable,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 64, 300])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 7.0, 100.0, math.inf])
def test_tables_from_a_sigma_tensor_equal_the_cached_tables(n, sigma):
    cached = _build_grid_kernels(
        n, None if math.isinf(sigma) else sigma, torch.float64, torch.device("cpu")
    )
    traced = _grid_tables_from_tensor(n, torch.tensor(sigma), torch.float64)
    for expected, got in zip(cached, traced, strict=True):
        assert expected.shape == got.shape
        assert (expected - got).abs().max().item() <= 1e-11


@pytest.mark.parametrize("tables", ["cached op (CPU)", "cosine series (GPU)"])
@pytest.mark.parametrize("n", [5, 8, 33])
@pytest.mark.parametrize("sigma", [1.0, 3.5, math.inf])
def test_traceable_masks_equal_on_grid_masks_in_value_and_gradient(n, sigma, tables, monkeypatch):
    if tables.startswith("cosine"):
        monkeypatch.setattr(gaudi, "_grid_tables_op", None)
    else:
        assert gaudi._grid_tables_op is not None or not hasattr(torch.library, "custom_op")
    generator = torch.Generator().manual_seed(n)
    # Locations outside [0, 1) wrap; widths up to 1 (full) and near 0 (dead).
    width = torch.rand(9, generator=generator, dtype=torch.float64)
    width[0], width[1] = 1.0, 0.0
    width.requires_grad_()
    location = torch.rand(9, generator=generator, dtype=torch.float64) * 2.4 - 0.7
    location.requires_grad_()
    upstream = torch.randn(9, n, generator=generator, dtype=torch.float64)

    expected = gaudi_mask_on_grid(width, location, n, sigma)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (width, location))
    got = _gaudi_mask_on_grid_traceable(width, location, n, torch.tensor(sigma), torch.float64)
    got_grads = torch.autograd.grad((got * upstream).sum(), (width, location))

    assert (got - expected).abs().max().item() <= 1e-12
    for e, g in zip(expected_grads, got_grads, strict=True):
        assert (g - e).abs().max().item() <= 1e-10 * max(1.0, e.abs().max().item())


def test_traceable_factors_equal_mask_factors():
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(12, 10, rank_per_component=2, structure_init="random")
    args = (layer.U, layer.V, layer.widths, layer.locations)
    expected = mask_factors(*args, 2.0, backend="torch")
    got = mask_factors_traceable(*args, torch.tensor(2.0))
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape and e.dtype == g.dtype
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


class _GraphCounter:
    """A dynamo backend that records every graph it is given and runs it as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def _step_grads(step, layer, x):
    layer.zero_grad(set_to_none=True)
    loss = step(x)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("tables", ["cached op (CPU)", "cosine series (GPU)"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compiled_training_step_is_one_graph_and_sigma_changes_do_not_recompile(
    kind, tables, monkeypatch
):
    if tables.startswith("cosine"):
        monkeypatch.setattr(gaudi, "_grid_tables_op", None)
    torch.manual_seed(1)
    if kind == "linear":
        layer = gblr.GBLRLinear(24, 20, structure_init="random", sigma=2.0)
        x = torch.randn(3, 5, 24)
    else:
        layer = gblr.GBLRConv2d(3, 8, 3, padding=1, structure_init="random", sigma=2.0)
        x = torch.randn(2, 3, 6, 6)
    layer.train()

    def step(inputs):
        return layer(inputs).square().mean()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    torch._dynamo.reset()
    counter = _GraphCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for sigma in (2.0, 5.5, math.inf, 40.0):  # what the learner does: fill_ in place
        with torch.no_grad():
            layer.sigma.fill_(sigma)
        loss_c, grads_c = _step_grads(compiled, layer, x)
        loss_e, grads_e = _step_grads(step, layer, x)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-6)
    assert counter.graphs == 1


def test_eval_mode_compiles_without_graph_breaks():
    layer = gblr.GBLRLinear(16, 16, structure_init="random").eval()
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=_GraphCounter(), fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU backend needs g++")
def test_inductor_compiles_the_training_step_without_complex_fallbacks():
    # Inductor generates no code for complex tensors (it warns and falls back): the compiled
    # masks use real arithmetic only, so a user's compile log stays clean.
    torch.manual_seed(2)
    layer = gblr.GBLRLinear(16, 12, structure_init="random", sigma=3.0).train()
    x = torch.randn(8, 16)

    def step(inputs):
        return layer(inputs).square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_c, grads_c = _step_grads(compiled, layer, x)
    assert not [w for w in caught if "complex" in str(w.message)]
    loss_e, grads_e = _step_grads(step, layer, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)
