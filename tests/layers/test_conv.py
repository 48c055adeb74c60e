import pytest
import torch
import torch.nn.functional as F

import gblr

ORDERS = ["materialize", "factored"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "conv_args",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (3, 1), "stride": 2, "padding": (1, 0), "dilation": 1},
        {"kernel_size": 3, "dilation": 2, "padding": "same"},
        {"kernel_size": 1, "padding": "valid"},
    ],
)
def test_forward_matches_conv2d_with_dense_kernel(order, training, conv_args):
    conv = gblr.GBLRConv2d(
        3,
        5,
        **conv_args,
        structure_init="random",
        sigma=4.0,
        evaluation_order=order,
        rank_per_component=1,
        dtype=torch.float64,
    ).train(training)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    kernel = conv.dense_weight().reshape(5, 3, *conv.kernel_size)
    expected = F.conv2d(
        x, kernel, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation
    )
    out = conv(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-10)
    assert torch.allclose(conv(x[0]), expected[0], atol=1e-10)  # unbatched input


def test_auto_order_and_output_positions():
    conv = gblr.GBLRConv2d(8, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 8, 16, 16)
    assert conv._output_positions(x) == 2 * 8 * 8
    assert conv._output_positions(x[0]) == 8 * 8
    assert conv(x).shape == (2, 8, 8, 8)


def test_flops_per_output_position_and_matrix_shape():
    widths = torch.tensor([[0.5, 1.0], [0.25, 0.0]])
    conv = gblr.GBLRConv2d(
        2, 4, 2, num_components=2, widths=widths, locations=torch.zeros(2, 2), bias=False
    )
    assert conv.matrix_shape == (4, 8)
    assert conv.flops() == 4 + 1  # one live component: |C| = 4, |R| = 1
    assert conv.dense_flops() == 32
    assert conv.live_components() == 1


def test_gradients_flow():
    conv = gblr.GBLRConv2d(3, 4, 3, structure_init="random", sigma=2.0)
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    for name in ["U", "V", "widths", "locations", "bias"]:
        assert getattr(conv, name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("order", ORDERS)
def test_components_that_are_off_add_nothing_and_get_no_gradient(order):
    torch.manual_seed(0)
    conv = gblr.GBLRConv2d(
        3,
        5,
        3,
        padding=1,
        num_components=4,
        structure_init="random",
        sigma=3.0,
        evaluation_order=order,
        dtype=torch.float64,
    )
    with torch.no_grad():
        conv.widths[0, 1] = 0.0
        conv.widths[1, 2] = 0.0
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    conv(x).square().sum().backward()
    # Reference: every component masked by the public op, the kernel built by hand.
    params = {
        name: getattr(conv, name).detach().clone().requires_grad_()
        for name in ("U", "V", "widths", "locations")
    }
    u, v = gblr.ops.mask_factors(
        params["U"], params["V"], params["widths"], params["locations"], 3.0
    )
    kernel = (u.reshape(-1, 5).T @ v.reshape(-1, 27)).reshape(5, 3, 3, 3)
    F.conv2d(x, kernel, conv.bias.detach(), padding=1).square().sum().backward()
    assert torch.allclose(conv(x), F.conv2d(x, kernel, conv.bias, padding=1), atol=1e-12)
    on = torch.tensor([True, False, False, True])
    for name in ("U", "V"):
        assert torch.allclose(getattr(conv, name).grad, params[name].grad, atol=1e-12), name
    for name in ("widths", "locations"):
        ours, reference = getattr(conv, name).grad, params[name].grad
        assert torch.allclose(ours[:, on], reference[:, on], atol=1e-12), name
        assert torch.equal(ours[:, ~on], torch.zeros_like(ours[:, ~on])), name
    assert params["widths"].grad[:, ~on].abs().sum() > 0


def test_state_dict_round_trip():
    conv = gblr.GBLRConv2d(3, 4, 3, structure_init="random", sigma=2.0)
    clone = gblr.GBLRConv2d(3, 4, 3)
    clone.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(conv(x), clone(x))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_channels": 0}, ValueError, "in_channels"),
        ({"out_channels": -2}, ValueError, "out_channels"),
        ({"kernel_size": 0}, ValueError, "kernel_size"),
        ({"kernel_size": 2.5}, TypeError, "kernel_size"),
        ({"stride": 0}, ValueError, "stride"),
        ({"padding": -1}, ValueError, "padding"),
        ({"padding": "full"}, ValueError, "padding"),
        ({"padding": "same", "stride": 2}, ValueError, "same"),
        ({"rank_per_component": 100}, ValueError, "rank_per_component"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"in_channels": 3, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=match):
        gblr.GBLRConv2d(**args)


def test_wrong_input_is_refused():
    conv = gblr.GBLRConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="in_channels=3"):
        conv(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="in_channels=3"):
        conv(torch.randn(3, 5))


@pytest.mark.parametrize(
    "conv_args",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (3, 5), "stride": (2, 1), "padding": (0, 2), "dilation": (1, 2)},
        {"kernel_size": 3, "dilation": 2, "padding": "same", "bias": False},
        {"kernel_size": 2, "stride": 3, "padding": "valid"},
    ],
)
def test_like_copies_the_geometry_of_a_conv2d(conv_args):
    conv = torch.nn.Conv2d(3, 5, **conv_args, dtype=torch.float64)
    layer = gblr.GBLRConv2d.like(conv, structure_init="random", sigma=4.0, num_components=3)
    assert layer.U.dtype == torch.float64 and layer.num_components == 3
    assert (layer.bias is None) == (conv.bias is None)
    # the template itself, given the GBLR kernel, is the reference: nn.Conv2d's forward
    # with its own stride, padding and dilation
    with torch.no_grad():
        conv.weight.copy_(layer.dense_kernel())
        if conv.bias is not None:
            conv.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    expected = conv(x)
    for order in ORDERS:
        layer.evaluation_order = order
        out = layer(x)
        assert out.shape == expected.shape
        assert torch.allclose(out, expected, atol=1e-10), order


def test_like_takes_gblr_and_frozen_templates_and_given_options_win():
    source = gblr.GBLRConv2d(4, 6, (1, 3), stride=2, padding=(0, 1), bias=False)
    frozen = gblr.FrozenGBLRConv2d.from_gblr(source.eval())
    for template in (source, frozen):
        layer = gblr.GBLRConv2d.like(template, bias=True, dtype=torch.float64)
        assert (layer.in_channels, layer.out_channels) == (4, 6)
        assert (layer.kernel_size, layer.stride, layer.padding) == ((1, 3), (2, 2), (0, 1))
        assert layer.dilation == (1, 1)
        assert layer.bias is not None and layer.U.dtype == torch.float64


@pytest.mark.parametrize(
    ("conv", "options", "error", "match"),
    [
        (torch.nn.Conv2d(4, 4, 3, groups=2), {}, ValueError, r"grouped convolution \(groups=2\)"),
        (torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), {}, ValueError, "'reflect'"),
        (torch.nn.Linear(4, 4), {}, TypeError, "Linear without"),
        (torch.nn.Conv1d(4, 4, 3), {}, TypeError, "got Conv1d"),
        (torch.nn.ConvTranspose2d(4, 4, 3), {}, TypeError, "got ConvTranspose2d"),
        (torch.nn.Conv2d(4, 4, 3), {"stride": 2}, TypeError, r"\['stride'\]"),
    ],
)
def test_like_refuses_what_gblr_conv2d_does_not_compute(conv, options, error, match):
    with pytest.raises(error, match=match):
        gblr.GBLRConv2d.like(conv, **options)


@pytest.mark.parametrize("order", ORDERS)
def test_a_conv_with_every_component_off_is_its_bias_in_training_too(order):
    # training computes only the components that are on: with none, a 0-channel conv
    # was refused inside torch (the structure learner can close every component)
    torch.manual_seed(0)
    conv = gblr.GBLRConv2d(
        3, 8, 3, padding=1, structure_init="random", evaluation_order=order
    ).train()
    with torch.no_grad():
        conv.widths[0].zero_()
    x = torch.randn(2, 3, 6, 6)
    out = conv(x)
    assert torch.equal(out, conv.bias.view(1, 8, 1, 1).expand(2, 8, 6, 6))
    out.sum().backward()
    assert torch.equal(conv.bias.grad, torch.full((8,), 72.0))
