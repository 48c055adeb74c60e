import copy
import re
import warnings

import pytest
import torch
from torch import nn

import gblr
from gblr import ConversionConfig, GBLRConfig, LowRankConfig
from gblr.compress import config_class
from tests.compress.test_search import svd_error


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def mlp_with_conv(seed=0):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 24, 3, padding=1)
            self.head = nn.Sequential(nn.Linear(24 * 4 * 4, 40), nn.ReLU(), nn.Linear(40, 20))

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).flatten(1))

    return Net().eval()


def test_svd_at_full_budget_reproduces_the_dense_model():
    model = mlp_with_conv()
    x = torch.randn(5, 3, 4, 4)
    expected = model(x)
    report = gblr.convert(model, GBLRConfig(budget=1.0, min_features=1))
    assert isinstance(model.conv, gblr.GBLRConv2d)
    assert all(isinstance(model.head[i], gblr.GBLRLinear) for i in (0, 2))
    assert relative(model(x), expected) <= 1e-4
    assert [layer.name for layer in report.layers] == ["conv", "head.0", "head.2"]
    assert max(layer.error for layer in report.layers) <= 1e-5


def test_layers_keep_bias_dtype_device_and_mode():
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16, bias=False)).to(torch.bfloat16)
    model[0].train()
    model[1].eval()
    bias = model[0].bias.detach().clone()
    gblr.convert(model, GBLRConfig(budget=0.5))
    assert model[0].training and not model[1].training
    assert model[0].U.dtype == torch.bfloat16 and model[0].widths.dtype == torch.float32
    assert torch.equal(model[0].bias.detach(), bias)
    assert model[1].bias is None
    assert model(torch.randn(3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("init", ["search", "svd", "random"])
def test_uniform_allocation_meets_each_layer_budget(init):
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 24))
    steps = {"search_steps": 10} if init == "search" else {}
    report = gblr.convert(model, GBLRConfig(budget=0.4, init=init, allocation="uniform", **steps))
    for layer in report.layers:
        assert layer.macs_after <= 0.4 * layer.macs_before
        assert layer.macs_after >= 0.3 * layer.macs_before
    if init != "random":
        # the fitted layers are no worse than truncated SVD at the MACs they use
        for layer, module in zip(report.layers, (model[0], model[2])):
            assert layer.error <= layer.svd_error + 1e-5
            assert layer.macs_after == module.flops()


def test_outputs_degrade_gracefully_as_the_budget_shrinks():
    x = torch.randn(16, 3, 4, 4)
    errors = []
    for budget in (0.9, 0.5, 0.2):
        model = mlp_with_conv(seed=1)
        expected = model(x)
        gblr.convert(model, GBLRConfig(budget=budget, min_features=1))
        errors.append(relative(model(x), expected))
    assert errors[0] <= errors[1] <= errors[2]
    # Random (incompressible) weights; measured 2026-11-26: 0.22, 0.50, 0.74.
    assert errors[0] < 0.35


def test_global_allocation_spends_the_budget_where_it_helps():
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 96))
    with torch.no_grad():
        # compressible (rank 4), incompressible (random), and in between (fast decay)
        model[0].weight.copy_(
            torch.randn(64, 4, generator=generator) @ torch.randn(4, 64, generator=generator)
        )
        model[1].weight.copy_(torch.randn(64, 64, generator=generator))
        decay = torch.logspace(0, -2, 64)
        left, _ = torch.linalg.qr(torch.randn(96, 64, generator=generator))
        right, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator))
        model[2].weight.copy_(left @ torch.diag(decay) @ right.t())
    weights = [m.weight.detach().clone() for m in model]
    uniform_model = nn.Sequential(*[nn.Linear(64, m.out_features) for m in model])
    uniform_model.load_state_dict(model.state_dict())

    report = gblr.convert(model, GBLRConfig(budget=0.3))
    uniform = gblr.convert(uniform_model, GBLRConfig(budget=0.3, allocation="uniform"))
    total = sum(w.numel() for w in weights)
    assert abs(report.macs_after - 0.3 * total) <= 0.01 * 0.3 * total
    ratios = [layer.ratio for layer in report.layers]
    assert max(ratios) - min(ratios) > 0.2
    assert ratios[0] < ratios[1]  # the rank-4 layer needs little
    summed = sum(layer.error**2 for layer in report.layers)
    summed_uniform = sum(layer.error**2 for layer in uniform.layers)
    assert summed < 0.8 * summed_uniform
    # the errors in the report are the converted layers' real errors
    for layer, module, weight in zip(report.layers, model, weights):
        assert layer.error == pytest.approx(
            relative(module.eval().dense_weight(), weight), rel=1e-4
        )
        assert layer.svd_error == pytest.approx(svd_error(weight, module.flops()), abs=1e-6)


def test_include_exclude_and_min_features():
    model = nn.Sequential()
    model.add_module("encoder_a", nn.Linear(32, 32))
    model.add_module("encoder_b", nn.Linear(32, 32))
    model.add_module("tiny", nn.Linear(32, 4))
    model.add_module("head", nn.Linear(32, 10))
    config = GBLRConfig(budget=0.5, include="encoder_*", exclude=["*_b"])
    report = gblr.convert(model, config)
    assert [layer.name for layer in report.layers] == ["encoder_a"]
    assert isinstance(model.encoder_b, nn.Linear) and not isinstance(
        model.encoder_b, gblr.GBLRLinear
    )

    report = gblr.convert(model, GBLRConfig(budget=0.5, min_features=8))
    assert [layer.name for layer in report.layers] == ["encoder_b", "head"]
    assert [name for name, _ in report.skipped] == ["tiny"]
    assert "min_features=8" in report.skipped[0][1]
    text = str(report)
    assert "encoder_b" in text and "total" in text and "skipped tiny" in text


def test_grouped_conv_is_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, groups=4), nn.Conv2d(32, 32, 1))
    report = gblr.convert(model, GBLRConfig(budget=0.5))
    assert [layer.name for layer in report.layers] == ["1"]
    assert report.skipped[0][0] == "0" and "groups=4" in report.skipped[0][1]


class _ScaledLinear(nn.Linear):  # what a fake-quant or scaled Linear looks like
    def forward(self, x):
        return 2.0 * super().forward(x)


class _ClippedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x).clamp(-1, 1)


class _RenamedLinear(nn.Linear):  # (torch's NonDynamicallyQuantizableLinear is such a one)
    pass


@pytest.mark.parametrize("structure", ["gblr", "lowrank"])
def test_a_layer_whose_class_has_its_own_forward_stays_dense(structure):
    """Before, a subclass of nn.Linear with its own forward became a plain structured
    layer and its extra computation was lost: at budget 1.0 the output moved by 0.82."""
    torch.manual_seed(0)
    model = nn.Sequential(
        _ScaledLinear(32, 32), _RenamedLinear(32, 32), nn.Unflatten(1, (2, 4, 4)),
        _ClippedConv(2, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
    )  # fmt: skip
    x = torch.randn(3, 32)
    before = model(x)
    config = config_class(structure)(budget=1.0, min_features=1)
    report = gblr.convert(model, config, progress=False)
    assert isinstance(model[0], _ScaledLinear) and isinstance(model[3], _ClippedConv)
    reason = "has a forward of its own (not {}'s), which a structured layer would not run"
    skipped = dict(report.skipped)
    assert skipped["0"] == "its class _ScaledLinear " + reason.format("Linear")
    if structure == "gblr":  # (low-rank converts Linear layers only)
        assert skipped["3"] == "its class _ClippedConv " + reason.format("Conv2d")
    assert not isinstance(model[1], _RenamedLinear)  # a subclass without one converts
    if structure == "gblr":  # exact at budget 1.0 (low-rank is not: rank 16 of 32)
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


def test_a_conv_gblr_conv2d_refuses_is_skipped_with_the_same_reason():
    padded = nn.Conv2d(16, 32, 3, padding=1, padding_mode="circular")
    model = nn.Sequential(padded, nn.Conv2d(32, 32, 1))
    report = gblr.convert(model, GBLRConfig(budget=0.5))
    assert [layer.name for layer in report.layers] == ["1"] and model[0] is padded
    reason = "padding_mode='circular' is not supported (only 'zeros')"
    assert report.skipped == [("0", reason)]
    with pytest.raises(ValueError, match=re.escape(reason)):
        gblr.GBLRConv2d.like(padded)


def test_shared_module_is_converted_once():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = gblr.convert(model, GBLRConfig(budget=0.5))
    assert len(report.layers) == 1 and report.layers[0].aliases == ("2",)
    assert isinstance(model[0], gblr.GBLRLinear) and model[2] is model[0]


def test_seeded_conversion_is_deterministic():
    outputs = []
    for _ in range(2):
        model = mlp_with_conv(seed=3)
        config = GBLRConfig(budget=0.3, min_features=1, init="search", search_steps=5, seed=7)
        gblr.convert(model, config)
        outputs.append(model(torch.ones(2, 3, 4, 4)))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ("monarchy", ValueError, "structure must be one of"),
        (
            GBLRConfig(include="decoder.*"),
            ValueError,
            r"matches no convertible layer; available: 0, 1",
        ),
        (GBLRConfig(exclude=["0", "nope"]), ValueError, "'nope'"),
        ({"budget": 0.5}, TypeError, r"config must be a conversion config .* got dict"),
    ],
)
def test_bad_arguments(config, error, match):
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with pytest.raises(error, match=match):
        gblr.convert(model, config)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], gblr.GBLRLinear)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gblr.convert(torch.randn(3, 3))


def test_gpt2_conv1d_layers_keep_their_orientation():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4, n_inner=80
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected = model(tokens).logits
    # lm_head shares its weight with the token embedding: left dense
    report = gblr.convert(model, GBLRConfig(budget=1.0, exclude="lm_head"))
    names = [layer.name for layer in report.layers]
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, gblr.GBLRLinear)
    assert (c_attn.in_features, c_attn.out_features) == (48, 3 * 48)
    assert {layer.kind for layer in report.layers} == {"Conv1D"}
    with torch.no_grad():
        assert relative(model(tokens).logits, expected) <= 1e-4

    model = transformers.GPT2LMHeadModel(config).eval()
    report = gblr.convert(model, GBLRConfig(budget=0.5, exclude="lm_head"))
    assert abs(report.ratio - 0.5) <= 0.01
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_converts_in_place_on_the_device():
    model = mlp_with_conv().cuda()
    x = torch.randn(4, 3, 4, 4, device="cuda")
    expected = model(x)
    gblr.convert(model, GBLRConfig(budget=1.0, min_features=1))
    assert model.conv.U.is_cuda and model.head[0].U.is_cuda
    assert relative(model(x), expected) <= 1e-4
    config = GBLRConfig(budget=0.5, min_features=1, init="search", search_steps=20)
    report = gblr.convert(mlp_with_conv().cuda(), config)
    assert abs(report.ratio - 0.5) <= 0.01


@pytest.mark.parametrize("structure", sorted(gblr.structured.FAMILIES))
@pytest.mark.parametrize("init", ["project", "random"])
def test_every_baseline_family_converts_linear_layers(structure, init):
    family = gblr.structured.FAMILIES[structure]
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.Conv2d(3, 8, 3))
    bias = model[0].bias.detach().clone()
    config = config_class(structure)(budget=0.5, init=init, allocation="uniform")
    report = gblr.convert(model, config)
    assert isinstance(model[0], family) and isinstance(model[2], family)
    assert isinstance(model[3], nn.Conv2d)  # the baselines convert Linear layers only
    assert [name for name, _ in report.skipped] == ["3"]
    assert torch.equal(model[0].bias.detach(), bias)
    for layer, module in zip(report.layers, (model[0], model[2])):
        assert layer.macs_after == module.flops() <= 0.5 * layer.macs_before
    if init == "project":  # from_dense is the family's projection of the weights
        assert all(layer.error < 1 for layer in report.layers)
    counted = {row.name: row.macs for row in gblr.count_flops(model).layers}
    assert counted["0"] == model[0].flops() and counted["2"] == model[2].flops()


def test_structure_dense_is_a_no_op_with_a_report():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    before = [module for module in model]
    report = gblr.convert(model, ConversionConfig(structure="dense"))
    assert [module for module in model] == before
    assert report.ratio == 1.0 and [layer.error for layer in report.layers] == [0.0, 0.0]


def test_a_budget_the_family_cannot_express_keeps_the_layer_dense():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.warns(UserWarning, match="converted no layer"):
        report = gblr.convert(model, LowRankConfig(budget=0.01, allocation="uniform"))
    assert len(report.skipped) == 2 and "128 MACs" in report.skipped[0][1]
    # counted at their dense cost: the report says what the model costs (1.0, not nan)
    assert [row.dense for row in report.layers] == [True, True] and report.ratio == 1.0
    assert not isinstance(model[0], gblr.structured.StructuredLinear)


class _TokenChannel(nn.Module):
    """Two 32 x 32 linear layers with the same weight; per example ``token`` runs on 32
    rows and ``channel`` on 4, as a Mixer's token- and channel-mixing layers differ."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(32, 32, generator=generator) * torch.logspace(0, -1, 32)
        self.token, self.channel = nn.Linear(32, 32), nn.Linear(32, 32)
        with torch.no_grad():
            self.token.weight.copy_(weight)
            self.channel.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 32, 32)
        return self.channel(self.token(x)[:, :4])


def test_global_allocation_per_example_weighs_layers_by_their_rows():
    example = torch.randn(1, 32, 32)
    per_row = gblr.convert(_TokenChannel(), GBLRConfig(budget=0.3, init="svd"))
    # the same weights: counted per row, the token layer gets as many MACs as the other
    # (one more rank unit, which ties go to first)
    assert per_row.layers[0].macs_after >= per_row.layers[1].macs_after
    model = _TokenChannel()
    report = gblr.convert(model, GBLRConfig(budget=0.3, init="svd"), example_input=example)
    token, channel = report.layers
    assert (token.rows, channel.rows) == (32, 4)
    # per example, the token layer's MACs cost 8 times as much: it gets fewer of them
    assert token.macs_after < channel.macs_after
    # the report's totals are the model's cost on the example, by an independent count
    counted = gblr.count_flops(model, example)
    assert report.macs_after == counted.macs
    assert report.macs_before == counted.dense_macs == 32 * 32 * 36
    # within the budget; the SVD start spends whole rank units (64 MACs per row), so a
    # little of it stays unspent, as per row (0.281 there)
    assert 0.26 <= report.ratio <= 0.3
    assert "the total is for the example input" in str(report) and "(32, 4)" in str(report)
    # the same rows everywhere: the per-row allocation, exactly
    same_rows = nn.Sequential(_TokenChannel().channel, nn.ReLU(), _TokenChannel().token)
    plain = nn.Sequential(_TokenChannel().channel, nn.ReLU(), _TokenChannel().token)
    a = gblr.convert(same_rows, GBLRConfig(budget=0.3), example_input=torch.randn(5, 32))
    b = gblr.convert(plain, GBLRConfig(budget=0.3))
    assert [layer.macs_after for layer in a.layers] == [layer.macs_after for layer in b.layers]
    assert a.macs_after == 5 * b.macs_after


def test_a_layer_the_example_does_not_run_is_refused_before_any_change():
    class ChannelOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _TokenChannel()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.channel(x)

    model = ChannelOnly()
    with pytest.raises(ValueError, match=r"example_input: the layers \['inner.token'\] did not"):
        gblr.convert(model, GBLRConfig(budget=0.3), example_input=torch.randn(1, 4, 32))
    assert type(model.inner.token) is nn.Linear and type(model.inner.channel) is nn.Linear


def test_a_layer_the_global_allocation_gives_its_dense_macs_stays_dense():
    # Issue 22: such a layer became a rank-n/2 GBLR layer (its factors cost as much as
    # the dense matrix) with an error of 0.26-0.33 instead of staying exact.
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():  # rank 2 (cheap to keep) and random (incompressible)
        model[0].weight.copy_(
            torch.randn(64, 2, generator=generator) @ torch.randn(2, 64, generator=generator)
        )
        model[2].weight.copy_(torch.randn(64, 64, generator=generator))
    dense_layer = model[2]
    before = {k: v.clone() for k, v in dense_layer.state_dict().items()}
    x = torch.randn(5, 64, generator=generator)
    hidden = torch.relu(model[0](x))
    with torch.no_grad():
        expected = dense_layer(hidden)

    report = gblr.convert(model, GBLRConfig(budget=0.55))
    assert report.dense_layers == ["2"]
    assert isinstance(model[0], gblr.GBLRLinear)
    assert model[2] is dense_layer and type(model[2]) is nn.Linear  # the same module
    for key, value in dense_layer.state_dict().items():
        assert torch.equal(value, before[key])
    with torch.no_grad():
        assert torch.equal(model[2](hidden), expected)  # exact
    kept = report.layers[1]
    assert (kept.name, kept.dense, kept.error) == ("2", True, 0.0)
    assert kept.macs_after == kept.macs_before == 64 * 64
    assert 0.2 < kept.svd_error < 0.5  # what the SVD at the same MACs would have lost
    # MACs: the report's totals are what the model costs, within the budget.
    assert report.macs_after == model[0].flops() + 64 * 64 <= 0.55 * 2 * 64 * 64
    counted = gblr.count_model_flops(model, x)
    assert counted.macs == 5 * report.macs_after
    assert "kept dense (1; their share of the budget pays for the dense layer" in str(report)
    assert "Linear (kept dense)" in str(report)
    assert report.to_dict()["dense_layers"] == ["2"]
    assert report.to_dict()["layers"][1]["dense"] is True
    assert model.gblr_config == GBLRConfig(budget=0.55)

    # budget 1.0 keeps its meaning (GBLR's exact full-rank factorization, to learn from),
    # and the uniform allocation never reaches a layer's dense MACs below it.
    full = nn.Sequential(nn.Linear(32, 32))
    assert gblr.convert(full, GBLRConfig(budget=1.0, min_features=1)).dense_layers == []
    assert isinstance(full[0], gblr.GBLRLinear)


def test_keep_dense_false_structures_every_layer_and_a_run_restores_kept_layers():
    from types import SimpleNamespace

    from gblr.recipes.build import _structure_like

    def model():
        generator = torch.Generator().manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        with torch.no_grad():
            net[0].weight.copy_(
                torch.randn(64, 2, generator=generator) @ torch.randn(2, 64, generator=generator)
            )
            net[2].weight.copy_(torch.randn(64, 64, generator=generator))
        return net

    every = gblr.convert(model(), GBLRConfig(budget=0.55, keep_dense=False))
    assert every.dense_layers == [] and len(every.layers) == 2
    assert "keep_dense=False" in str(every).splitlines()[0]
    with pytest.raises(TypeError, match="keep_dense must be True or False, got 1"):
        GBLRConfig(keep_dense=1)

    # A recipe run's weights come back without the search: the kept layer stays dense.
    searched = model()
    assert gblr.convert(searched, GBLRConfig(budget=0.55)).dense_layers == ["2"]
    structure = SimpleNamespace(
        kind="gblr", budget=0.55, include=None, exclude=None, rank_per_component=1
    )
    fresh = model()
    _structure_like(fresh, searched.state_dict(), SimpleNamespace(structure=structure, seed=0))
    fresh.load_state_dict(searched.state_dict())
    assert type(fresh[2]) is nn.Linear and isinstance(fresh[0], gblr.GBLRLinear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), searched(x))


def test_select_layers_names_what_convert_replaces_and_why_calibration_is_refused():
    """One hand-built model: a convolution (GBLR converts it, a family skips it), a
    grouped one (always skipped), torch attention (its projection stays), a small layer,
    two layers tied to one weight and an excluded layer; written out here, then checked
    against what convert does."""
    from gblr.compress.convert import select_layers

    tied = nn.Linear(32, 32)
    twin = nn.Linear(32, 32)
    twin.weight, twin.bias = tied.weight, tied.bias
    model = nn.ModuleDict(
        {
            "conv": nn.Conv2d(3, 32, 4, stride=4),
            "grouped": nn.Conv2d(32, 32, 1, groups=4),
            "attn": nn.MultiheadAttention(32, 2),
            "small": nn.Linear(32, 4),
            "a": tied,
            "b": twin,
            "head": nn.Linear(32, 32),
        }
    )
    config = GBLRConfig(budget=0.5, exclude="head")
    selection = select_layers(model, config)
    assert [name for name, _, _ in selection.selected] == ["conv", "a", "b"]
    skipped = dict(selection.skipped)
    assert list(skipped) == ["grouped", "attn.out_proj", "small"]
    assert "groups=4" in skipped["grouped"] and "MultiheadAttention" in skipped["attn.out_proj"]
    assert [(t.name, t.kind, t.names) for t in selection.targets] == [
        ("conv", "Conv2d", ["conv"]),
        ("a", "Linear", ["a", "b"]),
    ]
    assert selection.convolutions == ["conv"]
    assert "exclude the convolutions ['conv']" in selection.calibration_refusal
    with pytest.raises(ValueError, match=re.escape(selection.calibration_refusal)):
        gblr.convert(model, config, calibration=[torch.randn(1, 3, 8, 8)], progress=False)

    family = select_layers(model, LowRankConfig(budget=0.5, exclude="head"))
    assert family.convolutions == [] and family.calibration_refusal is None
    assert "Linear layers only" in dict(family.skipped)["conv"]
    assert "calibration is supported by" in select_layers(model, "monarch").calibration_refusal
    dense = select_layers(model, "dense")
    assert dense.targets == [] and [n for n, _, _ in dense.selected] == ["conv", "a", "b", "head"]

    report = gblr.convert(model, config, progress=False)
    assert [layer.name for layer in report.layers] == ["conv", "a"]
    assert report.skipped == selection.skipped
    with pytest.raises(ValueError, match="pattern 'nope' matches no convertible layer"):
        select_layers(model, GBLRConfig(include="nope"))
    with pytest.raises(TypeError, match="config must be a conversion config"):
        select_layers(model, 3)


def test_random_init_starts_as_the_recipes_block_diagonal_start():
    # init="random" is the start for training from scratch: GBLR's block-diagonal special
    # case, as GBLRLinear(structure_init="blockdiag") places it, factors of exact norm.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
    gblr.convert(model, GBLRConfig(budget=0.3, init="random", allocation="uniform", min_features=1))
    for layer in (model[0], model[2]):
        reference = gblr.GBLRLinear(
            layer.in_features, layer.out_features, structure_init="blockdiag", init_cost=0.3
        )
        assert torch.equal(layer.widths, reference.widths)
        assert torch.equal(layer.locations, reference.locations)
        col_lengths, row_lengths = layer.interval_lengths()
        live = layer.live_mask()
        # one-line strips on the shorter side (64 lines): dense diagonal blocks, no full
        # component
        short = col_lengths if layer.in_features <= layer.out_features else row_lengths
        assert (short[live] == 1).all() and live.sum() == 64
        weight = layer.dense_weight().detach()
        assert weight.count_nonzero() < 0.35 * weight.numel()
        assert layer.flops() <= 0.6 * layer.dense_flops()


@pytest.mark.parametrize("structure", ["gblr", *sorted(gblr.structured.FAMILIES)])
def test_random_init_starts_every_layer_at_the_budget_whatever_the_allocation(structure):
    """init="random" fits nothing to the weights, so the global allocation (the default)
    has nothing to go by: every layer starts at the budget. Before, the untrained weights'
    error curves handed out the MACs, and a pixel MLP's second layer got none (it trained
    at chance)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512))
    report = gblr.convert(model, config_class(structure)(budget=0.1, init="random"))
    assert report.allocation == "uniform" and len(report.layers) == 2
    for row, module in zip(report.layers, (model[0], model[2])):
        assert row.macs_after == module.flops() <= 0.1 * row.macs_before
        # the families round to their configurations; GBLR meets the budget to a line
        assert module.flops() >= (0.09 if structure == "gblr" else 0.05) * row.macs_before


def test_a_layer_the_global_allocation_starves_is_named_in_a_warning():
    """An untrained model's flat spectra make the greedy fill give one layer nearly all
    of the budget (the pixel MLP's second layer: 102 of 262,144 MACs at 0.1); the user
    is told which layer and what to do. Trained-like weights (decaying spectra) share it
    without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512))
    with pytest.warns(UserWarning, match=r"under 1% .* their MACs.*: 2 \(\d+ of 262144\)"):
        report = gblr.convert(model, GBLRConfig(budget=0.1))
    assert report.layers[1].macs_after < 0.01 * 0.1 * 262144
    decaying = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512))
    with torch.no_grad():
        for layer in (decaying[0], decaying[2]):
            u, _, v = torch.linalg.svd(layer.weight, full_matrices=False)
            spectrum = 0.8 ** torch.arange(u.shape[1], dtype=u.dtype)
            layer.weight.copy_(u @ torch.diag(spectrum) @ v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".* fitted to their weights alone")
        gblr.convert(decaying, GBLRConfig(budget=0.1))


def test_stable_rank_to_random_is_about_one_for_fresh_weights_and_exact_for_trained_ones():
    from gblr.compress.convert import stable_rank_to_random

    torch.manual_seed(0)
    for shape in ((64, 64), (512, 128), (96, 768)):
        fresh = nn.Linear(shape[1], shape[0]).weight.detach()
        assert 0.95 < stable_rank_to_random(fresh) < 1.3, shape
    # a decaying spectrum: the power iteration finds the top singular value
    u, _, v = torch.linalg.svd(torch.randn(128, 96, dtype=torch.float64), full_matrices=False)
    spectrum = 0.9 ** torch.arange(96, dtype=torch.float64)
    decaying = u @ torch.diag(spectrum) @ v
    exact = float(
        (spectrum.square().sum() / spectrum[0] ** 2) / (128 * 96 / (128**0.5 + 96**0.5) ** 2)
    )
    # 30 power iterations at a gap of 0.9: the top energy to about 0.81 ** 60 of itself
    assert stable_rank_to_random(decaying) == pytest.approx(exact, rel=1e-4)
    assert stable_rank_to_random(torch.zeros(4, 5)) == 0.0


def test_gblr_fitted_to_untrained_weights_says_to_start_from_scratch():
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    with pytest.warns(UserWarning, match=r"2 layer\(s\) it fitted look untrained .* init='random'"):
        gblr.convert(copy.deepcopy(fresh), GBLRConfig(budget=0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gblr.convert(copy.deepcopy(fresh), GBLRConfig(budget=0.3, init="random"))
        gblr.convert(copy.deepcopy(fresh), "lowrank")  # its fit is its own start anyway
        # trained-like weights (a few strong directions over noise) are fitted in silence
        # when fitted to calibration inputs
        for layer in (fresh[0], fresh[2]):
            out_features, in_features = layer.weight.shape
            with torch.no_grad():
                strong = torch.randn(out_features, 4) @ torch.randn(4, in_features)
                layer.weight.copy_(strong + 0.1 * torch.randn(out_features, in_features))
        calibration = [torch.randn(32, 64)]
        gblr.convert(copy.deepcopy(fresh), GBLRConfig(budget=0.3), calibration=calibration)


@pytest.mark.parametrize("config", [GBLRConfig(budget=0.3), gblr.LowRankConfig(budget=0.3)])
def test_trained_weights_fitted_alone_suggest_calibration(config):
    """A config that could have been fitted to calibration inputs says so when it fitted
    trained-looking weights alone; one that cannot (the search, Monarch) stays silent."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    for layer in (model[0], model[2]):
        out_features, in_features = layer.weight.shape
        with torch.no_grad():
            strong = torch.randn(out_features, 4) @ torch.randn(4, in_features)
            layer.weight.copy_(strong + 0.1 * torch.randn(out_features, in_features))
    with pytest.warns(UserWarning, match=r"2 layer\(s\) were fitted to their weights alone; cal"):
        gblr.convert(copy.deepcopy(model), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gblr.convert(copy.deepcopy(model), config, calibration=[torch.randn(32, 64)])
        gblr.convert(copy.deepcopy(model), GBLRConfig(budget=0.3, init="search", search_steps=2))
        gblr.convert(copy.deepcopy(model), gblr.MonarchConfig(budget=0.5))


@pytest.mark.parametrize("structure", sorted(gblr.structured.FAMILIES))
def test_a_family_draws_each_fresh_layer_afresh_from_the_seed(structure):
    """Each layer was drawn from the same seed before, so a transformer's blocks started
    equal; now one after another from it, the caller's random state untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    state = torch.random.get_rng_state()
    gblr.convert(model, config_class(structure)(budget=0.5, init="random", seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)
    first, second = model[0].state_dict(), model[2].state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first if k != "bias")
    again = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    gblr.convert(again, config_class(structure)(budget=0.5, init="random", seed=4))
    assert all(
        torch.equal(v, model[2].state_dict()[k])
        for k, v in again[2].state_dict().items()
        if k != "bias"
    )


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((0.0, 0), ValueError, r"budget must be a number in \(0, 1\], got 0.0"),
        ((1.5, 0), ValueError, "got 1.5"),
        ((True, 0), ValueError, "got True"),
        ((0.5, 1.0), TypeError, "seed must be an int, got 1.0"),
    ],
)
def test_start_from_scratch_refuses_bad_values_naming_them(arguments, error, message):
    from gblr.compress.convert import start_from_scratch

    layer = gblr.GBLRLinear(16, 16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=message):
        start_from_scratch([layer], *arguments)
    with pytest.raises(TypeError, match=r"layers\[1\] must be a GBLRLinear or GBLRConv2d, got"):
        start_from_scratch([layer, nn.Linear(4, 4)], 0.5, 0)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_random_init_draws_each_layer_afresh_and_leaves_the_rest_alone():
    """Layers of one shape start from different factors (each was drawn from the same seed
    before), the global random state is untouched, the seed decides, and a GBLR layer
    the model had before is not drawn again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.Linear(64, 64))
    kept = gblr.GBLRLinear(64, 64, structure_init="blockdiag", init_cost=0.5)
    model[3] = kept
    before = {k: v.clone() for k, v in kept.state_dict().items()}
    state = torch.random.get_rng_state()
    gblr.convert(model, GBLRConfig(budget=0.25, init="random", min_features=1, seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(model[0].U, model[2].U) and not torch.equal(model[0].V, model[2].V)
    assert all(torch.equal(v, kept.state_dict()[k]) for k, v in before.items())
    again = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    gblr.convert(again, GBLRConfig(budget=0.25, init="random", min_features=1, seed=4))
    assert torch.equal(again[2].U, model[2].U)  # the weights it replaced play no part
    other = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    gblr.convert(other, GBLRConfig(budget=0.25, init="random", min_features=1, seed=5))
    assert not torch.equal(other[2].U, model[2].U)


def test_converting_a_plain_model_does_not_import_transformers_models():
    """With only transformers' lazy top-level package loaded (other libraries load it),
    converting a plain model does not import its model classes (about 3 s)."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    code = (
        "import sys, torch, transformers, gblr\n"
        "model = torch.nn.Sequential(torch.nn.Linear(16, 16))\n"
        "gblr.convert(model, gblr.GBLRConfig(budget=0.5, init='svd'))\n"
        "print('transformers.modeling_utils' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("options", [{"allocation": "uniform"}, {"init": "random"}])
def test_a_uniform_budget_too_small_for_any_component_leaves_the_layers_dense(options):
    # GBLR built 0-MAC layers there (the model's output was its biases alone), where the
    # families leave such layers dense and say why
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    x = torch.randn(4, 64)
    expected = model(x)
    with pytest.warns(UserWarning, match="converted no layer"):
        report = gblr.convert(model, GBLRConfig(budget=1e-9, **options))
    assert [name for name, _ in report.skipped] == ["0", "2"]
    assert all("below GBLR's smallest component" in reason for _, reason in report.skipped)
    assert torch.equal(model(x), expected)


def test_a_pattern_without_wildcards_selects_names_ending_in_it_as_peft_does():
    from gblr.compress.convert import select_layers

    model = nn.Sequential()
    model.add_module("attn", nn.ModuleDict({"query": nn.Linear(32, 32), "key": nn.Linear(32, 32)}))
    model.add_module("mlp", nn.ModuleDict({"fc1": nn.Linear(32, 64), "fc2": nn.Linear(64, 32)}))
    selected = select_layers(model, GBLRConfig(include=("query", "fc2")))
    assert [name for name, _, _ in selected.selected] == ["attn.query", "mlp.fc2"]
    selected = select_layers(model, GBLRConfig(exclude="fc1"))
    assert [name for name, _, _ in selected.selected] == ["attn.query", "attn.key", "mlp.fc2"]
    # a part of a name is not a suffix; a glob still matches the whole name; a name that
    # is a module's own selects it alone (nn.Sequential's "0", not "2.0")
    with pytest.raises(ValueError, match="pattern 'fc' matches no convertible layer"):
        select_layers(model, GBLRConfig(include="fc"))
    selected = select_layers(model, GBLRConfig(include="mlp.*"))
    assert [name for name, _, _ in selected.selected] == ["mlp.fc1", "mlp.fc2"]
    numbered = nn.Sequential(nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 32)))
    selected = select_layers(numbered, GBLRConfig(exclude="0", min_features=1))
    assert [name for name, _, _ in selected.selected] == ["1.0"]


class _ReadsWeightDtype(nn.Module):
    """As transformers' T5 feed-forward block: its forward reads ``self.wo.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.wi, self.wo = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(torch.relu(self.wi(x)).to(self.wo.weight.dtype))


class _ReadsGrandchildWeight(nn.Module):
    """As transformers' ViT embeddings: ``self.patch.projection.weight.dtype``."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Sequential()
        self.patch.projection = nn.Linear(32, 32)
        self.block = _ReadsWeightDtype()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.patch.projection(x.to(self.patch.projection.weight.dtype)))


def test_a_layer_whose_model_reads_its_weight_in_forward_stays_dense_with_the_reason():
    """Converted, transformers' T5 and ViT failed at their first forward ("'GBLRLinear'
    object has no attribute 'weight'") after a conversion that reported success."""
    torch.manual_seed(0)
    model = _ReadsGrandchildWeight()
    report = gblr.convert(model, gblr.GBLRConfig(budget=0.5), progress=False)
    skipped = dict(report.skipped)
    assert "_ReadsWeightDtype reads its .weight in its forward" in skipped["block.wo"]
    assert "_ReadsGrandchildWeight" in skipped["patch.projection"]
    assert isinstance(model.block.wi, gblr.GBLRLinear)
    assert model(torch.randn(3, 32)).shape == (3, 32)  # it runs


def test_keep_dense_off_never_spends_more_than_the_budget():
    """A layer the global allocation gave its dense MACs got the exact full-rank
    factorization meant for budget 1.0: up to 2x its dense MACs (0.501 for a budget of
    0.3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 100), nn.Linear(100, 64), nn.Linear(64, 64))
    with torch.no_grad():  # nearly rank 1: the allocation gives its MACs to the others
        model[0].weight.copy_(torch.randn(100, 1) @ torch.randn(1, 300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = gblr.convert(model, gblr.GBLRConfig(budget=0.3, keep_dense=False), progress=False)
    assert gblr.count_flops(model).ratio <= 0.3
    assert all(row.macs_after <= row.macs_before for row in report.layers)


def test_a_second_conversion_with_another_config_says_it_replaces_the_record():
    # model.gblr_config silently named only the last of two conversions
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gblr.convert(model, gblr.GBLRConfig(budget=0.5, include="0"), progress=False)
    with pytest.warns(UserWarning, match=r"held the config of an earlier conversion"):
        gblr.convert(model, gblr.LowRankConfig(budget=0.5, include="1"), progress=False)
    assert model.gblr_config == gblr.LowRankConfig(budget=0.5, include="1")
    assert isinstance(model[0], gblr.GBLRLinear)  # the first conversion's layer stays


def test_a_conversion_that_ends_above_the_budget_warns():
    """Pixelfly at 0.05 on small layers ended at 0.6-0.8 of the MACs with no warning (its
    smallest layer is above their share, so they stay dense, listed in the report)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(3)))
    with pytest.warns(
        UserWarning, match=r"cost 1\.000 of their dense MACs, above the budget of 0\.05: 3 layer"
    ):
        report = gblr.convert(model, config_class("pixelfly")(budget=0.05), progress=False)
    assert len(report.dense_layers) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*look untrained")
        within = gblr.convert(nn.Sequential(nn.Linear(32, 32)), GBLRConfig(budget=0.3))
    assert within.ratio <= 0.3
