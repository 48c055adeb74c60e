"""GBLR layers and non-finite structure, and layers built on the meta device."""

from __future__ import annotations

import math

import pytest
import torch

import gblr


def nan_layer(name="widths", index=(0, 2), value=math.nan):
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(8, 6, structure_init="random")
    with torch.no_grad():
        getattr(layer, name)[index] = value
    return layer


@pytest.mark.parametrize(
    ("name", "index", "value", "where"),
    [
        ("widths", (0, 2), math.nan, r"widths\[0, 2\] is nan, the input \(column\) interval"),
        ("locations", (1, 4), -math.inf, r"locations\[1, 4\] is -inf, the output \(row\) interval"),
    ],
)
def test_eval_flops_and_freeze_refuse_a_non_finite_interval(name, index, value, where):
    """Each used to make up an interval (NaN rounds to an arbitrary int64): eval and
    freeze silently dropped the component."""
    layer = nan_layer(name, index, value).eval()
    message = rf"GBLRLinear \(6 x 8\): {where} of component {index[1]}"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match=message):
        layer.flops()
    with pytest.raises(ValueError, match=message):
        layer.live_components()
    with pytest.raises(ValueError, match=message):
        gblr.freeze(torch.nn.Sequential(layer))


def test_the_eval_check_is_redone_after_the_parameters_change():
    layer = nan_layer().eval()
    with torch.no_grad():
        layer.widths[0, 2] = 0.5
    layer(torch.randn(2, 8))  # checked and remembered
    with torch.no_grad():
        layer.widths[0, 2] = math.inf  # an in-place change: the check runs again
    with pytest.raises(ValueError, match=r"widths\[0, 2\] is inf"):
        layer(torch.randn(2, 8))
    with torch.no_grad():
        layer.widths.data = torch.full_like(layer.widths, math.nan)  # a new storage
    with pytest.raises(ValueError, match=r"widths\[0, 0\] is nan"):
        layer(torch.randn(2, 8))


def test_a_training_forward_gives_nan_not_an_index_error():
    """The torch backend used to index its mask table with the int64 of NaN."""
    layer = nan_layer().train()
    output = layer(torch.randn(3, 8))
    assert output.shape == (3, 6) and torch.isnan(output).all()
    col_mask, row_mask = layer.masks()
    assert torch.isnan(col_mask[2]).all()
    assert torch.isfinite(torch.cat([col_mask[:2], col_mask[3:]])).all()
    assert torch.isfinite(row_mask).all()


@pytest.mark.parametrize(
    ("cls", "args", "shape"),
    [
        (gblr.GBLRLinear, (8, 6), (3, 8)),
        (gblr.GBLRConv2d, (3, 4, 3), (2, 3, 6, 6)),
    ],
)
def test_layers_build_on_the_meta_device_and_load_a_state_dict(cls, args, shape):
    """Building on the meta device used to fail reading the structure (``Tensor.item()``)."""
    reference = cls(*args, structure_init="half", init_cost=0.4)
    meta = cls(*args, structure_init="half", init_cost=0.4, device="meta")
    with torch.device("meta"):
        default = cls(*args)
    assert meta.U.is_meta and default.widths.is_meta and "sigma=?" in repr(meta)
    x = torch.randn(shape)
    for training in (True, False):
        assert meta.train(training)(x.to("meta")).shape == reference(x).shape
    with pytest.raises(RuntimeError, match="meta device: its intervals have no values"):
        meta.flops()
    with pytest.raises(ValueError, match="init_cost"):  # arguments are still checked
        cls(*args, structure_init="half", init_cost=5.0, device="meta")
    meta.to_empty(device="cpu").load_state_dict(reference.state_dict())
    reference.eval(), meta.eval()
    assert torch.equal(meta(x), reference(x)) and meta.flops() == reference.flops()


def test_numpy_scalars_are_taken_where_python_numbers_are():
    """nn.Linear takes np.int64 sizes; gblr refused them (and np.float32 costs, sigma, a
    learning rate, total_steps) as "not a number", while it took np.float32 budgets."""
    import numpy as np

    torch.manual_seed(0)
    layer = gblr.GBLRLinear(np.int64(16), np.int64(8), init_cost=np.float32(0.5))
    assert (layer.in_features, layer.out_features) == (16, 8)
    assert type(layer.in_features) is int
    sigma = gblr.GBLRLinear(8, 8, sigma=np.float32(2.0))
    assert float(sigma.sigma) == 2.0
    model = torch.nn.Sequential(layer)
    groups = gblr.param_groups(model, lr=np.float32(1e-3), structure_lr=np.float64(1e-3))
    assert all(isinstance(group["lr"], float) for group in groups)
    learner = gblr.StructureLearner(model, budget=0.3, total_steps=np.int64(10))
    assert learner.total_steps == 10
    with pytest.raises(TypeError, match="total_steps"):
        gblr.StructureLearner(model, budget=0.3, total_steps=np.float64(10))
