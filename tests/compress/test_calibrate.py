"""Calibrated conversion: fit each layer's outputs on example inputs, not its weights."""

import copy

import pytest
import torch
from torch import nn

import gblr
from gblr.compress.calibrate import input_second_moments
from gblr.ops.whitened import weighted_low_rank, whitening


def correlated_inputs(rows=512, size=32, seed=0):
    """Inputs whose directions carry very different energy (as real activations do)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(size, size, generator=generator) * torch.logspace(0, -2, size)
    return torch.randn(rows, size, generator=generator) @ mixing


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


def test_whitening_factors_the_second_moment():
    x = correlated_inputs().double()
    moment = x.t() @ x / x.shape[0]
    factor = whitening(moment)
    assert torch.equal(factor, factor.tril())
    ridge = 1e-4 * moment.diagonal().mean()
    expected = moment + ridge * torch.eye(32, dtype=torch.float64)
    assert torch.allclose(factor @ factor.t(), expected, rtol=1e-10, atol=1e-12)


def test_weighted_low_rank_is_the_optimum_of_the_output_error():
    torch.manual_seed(1)
    weight = torch.randn(24, 32, dtype=torch.float64)
    x = correlated_inputs().double()
    factor = whitening(x.t() @ x / x.shape[0])
    left, right = weighted_low_rank(weight, factor, 5)
    assert left.shape == (24, 5) and right.shape == (5, 32)
    error = ((weight - left @ right) @ factor).norm()
    # Independent: the tail of the whitened spectrum is the smallest possible error.
    singular = torch.linalg.svdvals(weight @ factor)
    assert error.item() == pytest.approx(singular[5:].norm().item(), rel=1e-9)
    # Balanced factors: equal norms for every rank-1 term.
    assert torch.allclose(left.norm(dim=0), (right @ factor).norm(dim=1), rtol=1e-9)
    # Much better on these inputs than the plain truncated SVD of the same rank.
    u, s, vh = torch.linalg.svd(weight)
    plain = ((weight - (u[:, :5] * s[:5]) @ vh[:5]) @ factor).norm()
    assert error < 0.9 * plain


def test_weighted_low_rank_with_identity_is_the_truncated_svd():
    torch.manual_seed(2)
    weight = torch.randn(16, 20, dtype=torch.float64)
    left, right = weighted_low_rank(weight, torch.eye(20, dtype=torch.float64), 4)
    u, s, vh = torch.linalg.svd(weight)
    assert torch.allclose(left @ right, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-10)


def test_second_moments_are_collected_from_every_kind_of_batch():
    model = mlp()
    x = correlated_inputs(64)
    layers = {"0": model[0], "2": model[2]}
    batches = [x[:20], (x[20:40],), [x[40:]]]
    moments = input_second_moments(model, layers, batches)
    expected = x.double().t() @ x.double() / 64
    assert moments["0"].dtype == torch.float64
    assert torch.allclose(moments["0"], expected, rtol=1e-5, atol=1e-8)  # float32 products
    hidden = torch.relu(model[0](x)).double()
    assert torch.allclose(moments["2"], hidden.t() @ hidden / 64, rtol=1e-6, atol=1e-8)

    class KeywordModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 8)

        def forward(self, *, features):
            return self.proj(features)

    keyword = KeywordModel()
    keyword.train()
    moments = input_second_moments(keyword, {"proj": keyword.proj}, [{"features": x}])
    assert torch.allclose(moments["proj"], expected, rtol=1e-5, atol=1e-8)
    assert keyword.training  # mode restored
    assert not keyword.proj._forward_hooks  # hooks removed


def test_second_moments_refuse_empty_or_unused_calibration():
    model = mlp()
    with pytest.raises(ValueError, match="calibration holds no batch"):
        input_second_moments(model, {"0": model[0]}, [])
    unused = nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"never reached \['spare'\]"):
        input_second_moments(model, {"0": model[0], "spare": unused}, [correlated_inputs(8)])
    assert not unused._forward_hooks and not model[0]._forward_hooks


@pytest.mark.parametrize("structure", ["gblr", "lowrank"])
def test_calibrated_conversion_fits_the_outputs(structure):
    x = correlated_inputs()
    reference = mlp()
    outputs = {}
    for calibrated in (False, True):
        model = copy.deepcopy(reference)
        calibration = [x[:256], x[256:]] if calibrated else None
        report = gblr.convert(
            model,
            gblr.compress.config_class(structure)(budget=0.3, min_features=1),
            calibration=calibration,
            progress=False,
        )
        assert report.calibrated is calibrated
        assert report.ratio <= 0.3
        with torch.no_grad():
            outputs[calibrated] = (model(x) - reference(x)).norm() / reference(x).norm()
        if calibrated:
            # The report's errors are output errors on the calibration inputs.
            first = report.layers[0]
            fitted = model[0].dense_weight().double() if structure == "gblr" else None
            if fitted is not None:
                weight = reference[0].weight.double()
                xd = x.double()
                expected = ((xd @ (weight - fitted).t()).norm() / (xd @ weight.t()).norm()).item()
                assert first.error == pytest.approx(expected, rel=1e-3)
                assert first.error == pytest.approx(first.svd_error, rel=1e-6)
            assert "outputs on the calibration inputs" in str(report)
    # Measured: 0.87 uncalibrated, 0.41 calibrated (seed 0).
    assert outputs[True] < 0.7 * outputs[False]


def test_calibrated_gblr_and_lowrank_give_the_same_matrix():
    x = correlated_inputs()
    models = {name: mlp() for name in ("gblr", "lowrank")}
    for name, model in models.items():
        gblr.convert(
            model, gblr.compress.config_class(name)(budget=0.4, min_features=1), calibration=[x]
        )
    for index in (0, 2):
        assert torch.allclose(
            models["gblr"][index].dense_weight(),
            models["lowrank"][index].dense_weight(),
            atol=1e-5,
        )


def test_calibration_is_refused_where_it_cannot_apply():
    x = [correlated_inputs()]
    with pytest.raises(ValueError, match="calibration is supported by structure"):
        gblr.convert(mlp(), gblr.MonarchConfig(budget=0.5, min_features=1), calibration=x)
    with pytest.raises(ValueError, match="needs init='svd', got init='search'"):
        gblr.convert(
            mlp(), gblr.GBLRConfig(budget=0.5, init="search", min_features=1), calibration=x
        )

    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.fc = nn.Linear(16, 16)

        def forward(self, images):
            return self.fc(self.conv(images).mean((2, 3)))

    model = WithConv()
    with pytest.raises(ValueError, match=r"exclude the convolutions \['conv'\]"):
        gblr.convert(
            model,
            gblr.GBLRConfig(budget=0.5, min_features=1),
            calibration=[torch.randn(2, 3, 8, 8)],
        )
    assert isinstance(model.conv, nn.Conv2d)  # nothing was converted
    report = gblr.convert(
        model,
        gblr.GBLRConfig(budget=0.5, exclude="conv", min_features=1),
        calibration=[torch.randn(2, 3, 8, 8)],
    )
    assert [layer.name for layer in report.layers] == ["fc"]


def test_progress_bar_is_shown_when_asked(capsys):
    pytest.importorskip("tqdm")
    model = mlp()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5, min_features=1), progress=True)
    shown = capsys.readouterr().err
    # per layer: the count, the time spent and left, and the layer being fitted
    assert "gblr.convert" in shown and "2/2 [" in shown and "<" in shown, shown
    assert "layer/s, 2]" in shown or "s/layer, 2]" in shown, shown
    gblr.convert(mlp(), gblr.GBLRConfig(budget=0.5, min_features=1), progress=False)
    assert "gblr.convert" not in capsys.readouterr().err
    gblr.convert(mlp(), gblr.GBLRConfig(budget=0.5, min_features=1))  # not a terminal
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_weighted_low_rank_of_a_rank_deficient_matrix(shape):
    torch.manual_seed(3)
    out_features, in_features = shape
    weight = torch.randn(out_features, 2, dtype=torch.float64) @ torch.randn(
        2, in_features, dtype=torch.float64
    )
    factor = whitening(torch.eye(in_features, dtype=torch.float64))
    left, right = weighted_low_rank(weight, factor, 5)  # more rank than the matrix has
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert torch.allclose(left @ right, weight, atol=1e-8)
