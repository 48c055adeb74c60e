"""``torch.func`` transforms of the layers in training mode: ``grad`` equals autograd and
``vmap`` of ``grad`` gives per-sample gradients that equal autograd on each sample alone.

The masks and the held strips' window form are custom ``autograd.Function``s; functorch
takes only those with a ``setup_context`` (and a vmap rule), so each has a twin that runs
under a transform (``gblr.ops.gaudi.transforms_active``)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import gblr
from gblr.ops import gaudi, strip_windows


def _trained_strips(fan_in: int, fan_out: int) -> tuple[torch.nn.Module, object]:
    """A block-diagonal start whose strips a learner holds (the strip and window forms
    run in its training forward), after a few steps so the strips' long sides differ."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        gblr.GBLRLinear(fan_in, fan_out, init_cost=0.2),
        torch.nn.ReLU(),
        torch.nn.Linear(fan_out, 3),
    )
    learner = gblr.StructureLearner(model, gblr.LearnerConfig(), budget=0.2, total_steps=100)
    optimizer = torch.optim.Adam(gblr.param_groups(model, lr=1e-2))
    x = torch.randn(16, fan_in)
    for _ in range(10):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
    return model, learner


def _cases():
    """``(name, model, input, learner)``."""
    torch.manual_seed(0)
    yield "smooth masks", gblr.GBLRLinear(24, 16, sigma=2.0), torch.randn(4, 24), None
    yield "exact masks", gblr.GBLRLinear(24, 16, init_cost=0.4), torch.randn(4, 24), None
    conv = gblr.GBLRConv2d(3, 8, 3, padding=1, sigma=2.0)
    yield "conv", conv, torch.randn(4, 3, 6, 6), None
    for shape in ((96, 64), (64, 96)):  # strips on the input side, then the output side
        model, learner = _trained_strips(*shape)
        yield f"held strips {shape}", model, torch.randn(4, shape[0]), learner


@pytest.mark.parametrize(
    ("name", "model", "x", "learner"), list(_cases()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_grad_and_per_sample_grads_of_the_training_form_match_autograd(
    name, model, x, learner, monkeypatch
):
    """Before, every transform of a training-mode layer raised torch's "In order to use
    an autograd.Function with functorch transforms ..." error."""
    model.train()
    calls = {"twins": 0}
    for cls in (gaudi._MaskFactorsTorchForTransforms, strip_windows._WindowMaskForTransforms):
        original = cls.apply

        def counted(*args, _original=original):
            calls["twins"] += 1
            return _original(*args)

        monkeypatch.setattr(cls, "apply", counted)
    params = {key: value.detach() for key, value in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, batch):
        return functional_call(model, (p, buffers), (batch,)).square().sum()

    def autograd_of(batch):
        model.zero_grad()
        loss(dict(model.named_parameters()), batch).backward()
        return {
            key: torch.zeros_like(value) if value.grad is None else value.grad.clone()
            for key, value in model.named_parameters()
        }

    grads = grad(loss)(params, x)
    expected = autograd_of(x)
    for key in params:
        assert torch.allclose(grads[key], expected[key], rtol=1e-4, atol=1e-5), key
    per_sample = vmap(grad(lambda p, one: loss(p, one[None])), in_dims=(None, 0))(params, x)
    for index in range(x.shape[0]):
        alone = autograd_of(x[index : index + 1])
        for key in params:
            assert torch.allclose(per_sample[key][index], alone[key], rtol=1e-4, atol=1e-5), key
    # The structure gets gradients, and the twins ran (only under the transforms).
    assert any(bool(grads[key].abs().sum() > 0) for key in params if key.endswith("widths"))
    assert calls["twins"] > 0
    before = calls["twins"]
    autograd_of(x)
    assert calls["twins"] == before  # plain autograd runs the plain Functions
    del learner  # (kept alive until here: it holds the strips)


def test_a_mask_on_the_grid_under_grad_matches_autograd():
    widths = torch.tensor([0.3, 0.55, 0.9], dtype=torch.float64, requires_grad=True)
    locations = torch.tensor([0.1, 0.8, 0.4], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 20, dtype=torch.float64)

    def loss(w, loc):
        return (gaudi.gaudi_mask_on_grid(w, loc, 20, sigma=3.0) * weights).sum()

    grads = grad(loss, argnums=(0, 1))(widths.detach(), locations.detach())
    loss(widths, locations).backward()
    assert torch.allclose(grads[0], widths.grad) and torch.allclose(grads[1], locations.grad)
    assert bool(widths.grad.abs().sum() > 0)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("plan", ["dense", "lowrank", "blocksparse", "segment", "panels"])
def test_the_frozen_form_under_grad_vmap_and_jacrev_matches_autograd(plan):
    """Before, the plans' partition read its interval buffers through numpy, which
    torch.func's transforms do not allow ("Cannot access data pointer ..."), and the
    panels plan's out= products have no vmap rule (it runs as segment there)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        gblr.GBLRLinear(32, 24, init_cost=0.3), torch.nn.ReLU(), gblr.GBLRLinear(24, 8, sigma=2.0)
    )
    frozen = gblr.freeze(model.eval())
    for layer in (frozen[0], frozen[2]):
        layer.plan = plan
    x = torch.randn(5, 32)
    gradient = grad(lambda inputs: frozen(inputs).sum())(x)
    tracked = x.clone().requires_grad_()
    frozen(tracked).sum().backward()
    assert torch.allclose(gradient, tracked.grad, atol=1e-5)
    rows = vmap(lambda row: frozen(row[None])[0])(x)
    assert torch.allclose(rows, frozen(x), atol=1e-5)
    jacobian = jacrev(lambda row: frozen(row[None])[0])(x[0])
    dense = (
        model[2].dense_weight()
        @ torch.diag((model[0](x[:1])[0] > 0).float())
        @ model[0].dense_weight()
    )
    assert torch.allclose(jacobian, dense, atol=1e-5)
