"""Frozen layers: exact eval-mode outputs in every plan, cost, dtypes, freeze()."""

import pytest
import torch
from torch import nn

import gblr
from gblr.deploy import PLANS, FrozenGBLRConv2d, FrozenGBLRLinear
from tests.conftest import circular_boxcar


def structured_linear(in_features=37, out_features=29, rank=2, bias=True, dtype=torch.float32):
    """Wrapped intervals, a full one, a dead one (empty row interval), odd sizes."""
    row_intervals = [(25, 9), (0, out_features), (3, 0), (10, 1), (28, 5), (7, 12)]
    col_intervals = [(30, 11), (5, 3), (2, 4), (0, in_features), (36, 2), (12, 20)]
    k = len(row_intervals)
    u = torch.randn(k, rank, out_features, dtype=dtype)
    v = torch.randn(k, rank, in_features, dtype=dtype)
    b = torch.randn(out_features, dtype=dtype) if bias else None
    return gblr.GBLRLinear.from_intervals(u, v, row_intervals, col_intervals, bias=b).eval()


def brute_force_weight(layer):
    """Independent reference: a loop over components with the integer eval intervals."""
    col_len, row_len = layer.interval_lengths()
    col_start, row_start = layer.interval_starts()
    rows = circular_boxcar(row_start.tolist(), row_len.tolist(), layer.rows)
    cols = circular_boxcar(col_start.tolist(), col_len.tolist(), layer.cols)
    weight = torch.zeros(layer.rows, layer.cols, dtype=torch.float64)
    for k in range(layer.num_components):
        block = layer.U[k].detach().double().T @ layer.V[k].detach().double()
        weight += rows[k][:, None] * block * cols[k][None, :]
    return weight


def rel_error(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 3])
def test_frozen_linear_equals_eval_in_every_plan(plan, bias, rank):
    layer = structured_linear(rank=rank, bias=bias)
    frozen = FrozenGBLRLinear.from_gblr(layer)
    frozen.plan = plan
    x = torch.randn(2, 5, 37)
    expected = layer(x)
    reference = x.double() @ brute_force_weight(layer).T
    if bias:
        reference += layer.bias.double()
    y = frozen(x)
    assert y.shape == (2, 5, 29)
    assert rel_error(y, expected) <= 1e-5
    assert rel_error(y, reference) <= 1e-5
    assert frozen.plan_for(10) == plan


def test_dead_components_dropped_and_factors_packed_over_intervals():
    layer = structured_linear(rank=2)
    frozen = FrozenGBLRLinear.from_gblr(layer)
    assert frozen.num_components == layer.live_components() == 5
    col_len, row_len = layer.interval_lengths()
    live = layer.live_mask()
    assert frozen.u_packed.numel() == 2 * int(row_len[live].sum())
    assert frozen.v_packed.numel() == 2 * int(col_len[live].sum())
    assert frozen.flops() == layer.flops()
    assert frozen.dense_flops() == 37 * 29
    assert torch.allclose(frozen.dense_weight().double(), brute_force_weight(layer), atol=1e-5)


def test_an_all_dead_conv_outputs_its_bias_in_every_plan_and_compiled():
    # the lowrank plan (compiled_plan's choice at 0 MACs) ran a 0-channel conv
    torch.manual_seed(0)
    conv = gblr.GBLRConv2d(3, 8, 3, padding=1, structure_init="random")
    with torch.no_grad():
        conv.widths[0].zero_()
    frozen = gblr.freeze(nn.Sequential(conv.eval()))
    x = torch.randn(2, 3, 6, 6)
    expected = conv.bias.view(1, 8, 1, 1).expand(2, 8, 6, 6)
    for plan in PLANS:
        frozen[0].plan = plan
        assert torch.equal(frozen(x), expected), plan
    frozen[0].plan = "auto"
    assert torch.equal(torch.compile(frozen, backend="eager")(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_plan_runs_under_cpu_autocast_and_gives_its_dtype(dtype):
    # segment failed (addmm_ of a bf16 product into a float32 output), panels gave float32
    torch.manual_seed(0)
    layer = gblr.freeze(gblr.GBLRLinear(256, 256, structure_init="half", init_cost=0.1).eval())
    x = torch.randn(64, 256)
    expected = layer(x)
    for plan in PLANS:
        layer.plan = plan
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            out = layer(x)
        assert out.dtype == dtype, plan
        assert torch.allclose(out.float(), expected, rtol=0.05, atol=0.05), plan


def test_the_input_gradient_through_every_plan():
    # panels multiplied into buffers (out=), which autograd refuses
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(64, 48, structure_init="half", init_cost=0.3, dtype=torch.float64)
    frozen = gblr.freeze(nn.Sequential(layer.eval()))[0]
    x = torch.randn(16, 64, dtype=torch.float64, requires_grad=True)
    weight = layer.dense_weight().detach()
    for plan in PLANS:
        frozen.plan = plan
        (grad,) = torch.autograd.grad(frozen(x).square().sum(), x)
        expected = 2 * (x @ weight.t() + layer.bias.detach()) @ weight
        assert torch.allclose(grad, expected, atol=1e-10), plan


def test_all_dead_layer_outputs_bias():
    layer = gblr.GBLRLinear(8, 6, widths=torch.zeros(2, 6), locations=torch.zeros(2, 6)).eval()
    frozen = FrozenGBLRLinear.from_gblr(layer)
    assert frozen.num_components == 0 and frozen.flops() == 0
    x = torch.randn(3, 8)
    for plan in PLANS:
        frozen.plan = plan
        assert torch.equal(frozen(x), layer.bias.expand(3, 6))


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize(
    "conv_args",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 2, "padding": "same", "dilation": 2},
        {"kernel_size": (3, 1), "stride": 2, "bias": False},
        {"kernel_size": 3, "padding": "valid"},
    ],
)
def test_frozen_conv_equals_eval(plan, conv_args):
    conv = gblr.GBLRConv2d(5, 7, rank_per_component=2, structure_init="random", **conv_args)
    conv.eval()
    frozen = FrozenGBLRConv2d.from_gblr(conv)
    frozen.plan = plan
    x = torch.randn(2, 5, 9, 8)
    expected = conv(x)
    reference = nn.functional.conv2d(
        x.double(),
        brute_force_weight(conv).reshape(7, 5, *conv.kernel_size),
        None if conv.bias is None else conv.bias.double(),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
    )
    assert frozen(x).shape == expected.shape
    assert rel_error(frozen(x), expected) <= 1e-5
    assert rel_error(frozen(x), reference) <= 1e-5
    assert rel_error(frozen(x[0]), expected[0]) <= 1e-5  # unbatched input
    assert frozen.flops() == conv.flops()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("plan", PLANS)
def test_half_precision_against_float32(dtype, tolerance, plan):
    layer = structured_linear(rank=2)
    model = gblr.freeze(nn.Sequential(layer))
    x = torch.randn(16, 37)
    expected = model(x)
    model = model.to(dtype)
    model[0].plan = plan
    y = model(x.to(dtype))
    assert y.dtype == dtype
    assert rel_error(y, expected) <= tolerance
    assert model[0].row_intervals.dtype == torch.int64


def test_to_dtype_rebuilds_cached_operands():
    frozen = FrozenGBLRLinear.from_gblr(structured_linear())
    frozen.plan = "dense"
    x = torch.randn(4, 37)
    frozen(x)
    frozen = frozen.double()
    y = frozen(x.double())
    assert y.dtype == torch.float64
    with torch.no_grad():
        frozen.u_packed.mul_(2.0)  # in-place edits are seen too
    assert torch.allclose(frozen(x.double()) - frozen.bias, 2 * (y - frozen.bias))


def test_freeze_model_in_place_and_count_flops():
    torch.manual_seed(0)
    shared = gblr.GBLRLinear(16, 16, structure_init="half", init_cost=0.4)
    model = nn.Sequential(
        gblr.GBLRConv2d(3, 4, 3, padding=1, structure_init="random"),
        nn.Flatten(),
        gblr.GBLRLinear(4 * 6 * 6, 16, structure_init="half", init_cost=0.3),
        nn.ReLU(),
        shared,
        shared,
        nn.Linear(16, 2),
    ).eval()
    x = torch.randn(3, 3, 6, 6)
    expected = model(x)
    before = gblr.count_flops(model, x)
    assert gblr.freeze(model) is model
    assert isinstance(model[0], FrozenGBLRConv2d) and isinstance(model[2], FrozenGBLRLinear)
    assert model[4] is model[5]
    assert rel_error(model(x), expected) <= 1e-5
    after = gblr.count_flops(model, x)
    assert [(layer.name, layer.macs, layer.total_macs) for layer in after] == [
        (layer.name, layer.macs, layer.total_macs) for layer in before
    ]
    assert gblr.freeze(model) is model  # already frozen: unchanged


def test_freeze_root_layer_and_bad_arguments():
    layer = structured_linear()
    assert isinstance(gblr.freeze(layer), FrozenGBLRLinear)
    with pytest.raises(ValueError, match="no GBLR layer"):
        gblr.freeze(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        gblr.freeze("model")
    frozen = FrozenGBLRLinear.from_gblr(layer)
    with pytest.raises(ValueError, match=r"plan must be one of .*'dense'.*got 'fast'"):
        frozen.plan = "fast"
    with pytest.raises(TypeError, match="plan must be a str"):
        frozen.plan = 3
    with pytest.raises(ValueError, match="in_features=37"):
        frozen(torch.randn(4, 36))
    with pytest.raises(ValueError, match="row_intervals lengths"):
        FrozenGBLRLinear(4, 4, row_intervals=[(0, 0)], col_intervals=[(0, 1)])
    with pytest.raises(ValueError, match="same number of components"):
        FrozenGBLRLinear(4, 4, row_intervals=[(0, 1)], col_intervals=[(0, 1), (1, 1)])
    with pytest.raises(TypeError, match=r"gblr\.GBLRLinear"):
        FrozenGBLRLinear.from_gblr(nn.Linear(3, 3))


class _CountGraphs:
    """A torch.compile backend that runs the graph eagerly and counts compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def test_a_frozen_model_compiles_to_one_graph_with_no_recompile_for_another_batch():
    # Issue 22: plan_for read the intervals (Tensor.item()) in the forward: 48 graph
    # breaks on two layers, and a recompile per row bucket up to the recompile limit.
    import torch._dynamo

    torch.manual_seed(0)
    conv = gblr.GBLRConv2d(3, 8, 3, padding=1, structure_init="half", init_cost=0.5)
    model = nn.Sequential(
        conv,
        nn.Flatten(),
        structured_linear(8 * 4 * 4, 29),  # wrapped, narrow and full intervals
        nn.ReLU(),
        gblr.GBLRLinear(29, 64, num_components=3),
    )
    frozen = gblr.freeze(model.eval())
    assert [frozen[i].compiled_plan() for i in (0, 2, 4)] == ["dense", "lowrank", "lowrank"]
    frozen[2].plan = "segment"  # an eager-only plan: the compiled forward runs lowrank
    frozen[4].plan = "dense"  # a compiled plan: kept
    assert [frozen[i].compiled_plan() for i in (2, 4)] == ["lowrank", "dense"]
    x = torch.randn(3, 3, 4, 4)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(frozen)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    counter = _CountGraphs()
    compiled = torch.compile(frozen, backend=counter, fullgraph=True)
    for batch in (3, 5, 8):  # (torch guards conv2d on batch <= 15 itself)
        x = torch.randn(batch, 3, 4, 4)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), frozen(x), rtol=1e-5, atol=1e-5)
    assert counter.graphs == 1
    # The compiled graph reads the parameters: new weights are seen without recompiling.
    with torch.no_grad():
        frozen[4].u_packed.mul_(2)
    x = torch.randn(4, 3, 4, 4)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), frozen(x), rtol=1e-5, atol=1e-5)
    assert counter.graphs == 1
    torch._dynamo.reset()


def test_factors_set_to_train_are_refused_and_a_training_bias_gets_its_gradient():
    """The plans multiply copies of the factors outside autograd: after
    ``requires_grad_(True)`` the packed factors silently got no gradient, and the panels
    plan failed inside torch for a bias that needs one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        gblr.GBLRLinear(64, 64, init_cost=0.3), gblr.GBLRConv2d(4, 8, 3, init_cost=0.3)
    )
    frozen = gblr.freeze(model).requires_grad_(True)
    x, image = torch.randn(3, 64), torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match=r"u_packed / v_packed require a gradient"):
        frozen[0](x)
    with pytest.raises(ValueError, match=r"FrozenGBLRConv2d"):
        frozen[1](image)
    with torch.no_grad():  # inference with the flags left on is fine
        assert torch.allclose(frozen[0](x), model[0].eval()(x), atol=1e-5)
    layer = frozen[0]
    layer.u_packed.requires_grad_(False)
    layer.v_packed.requires_grad_(False)
    for plan in ("segment", "panels", "lowrank", "blocksparse", "dense"):
        layer.plan = plan
        layer.bias.grad = None
        layer(x).sum().backward()
        assert torch.equal(layer.bias.grad, torch.full((64,), 3.0)), plan


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notice
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_frozen_model_traces_with_torch_jit_trace():
    """``torch.jit.trace`` gives sizes as tensors: the plan choice failed ("'Tensor' object
    has no attribute 'bit_length'"), and the factors' cache, built inside the first trace
    and read in its check, made the two graphs differ. A trace now runs a compiled plan,
    from the parameters, as torch.compile does."""
    torch.manual_seed(0)
    model = gblr.freeze(
        nn.Sequential(
            gblr.GBLRConv2d(3, 8, 3, padding=1, init_cost=0.3),
            nn.Flatten(),
            gblr.GBLRLinear(8 * 5 * 5, 16, init_cost=0.3),
        ).eval()
    )
    x = torch.randn(2, 3, 5, 5)
    traced = torch.jit.trace(model, x)  # checks its graph against a second trace
    torch.testing.assert_close(traced(x), model(x))
    other = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(traced(other), model(other))
