"""ONNX export of frozen models: the exported file, run by onnxruntime, computes what the
frozen model computes, at any batch size; bad input is refused and a failed export
writes nothing."""

import pytest
import torch
from torch import nn

import gblr
from gblr.deploy import export as export_module
from tests.deploy.test_io import frozen_sequential

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
onnxruntime = pytest.importorskip("onnxruntime")


def run_onnx(path, *inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


@pytest.mark.parametrize("plan", ["auto", "dense", "lowrank"])
def test_exported_model_equals_the_frozen_model_at_other_batch_sizes(tmp_path, plan):
    model = frozen_sequential()  # GBLRConv2d (wrapping intervals, rank 2) + GBLRLinear
    done = gblr.export_onnx(model, torch.randn(2, 3, 5, 5), tmp_path / "m.onnx", plan=plan)
    assert done.path == tmp_path / "m.onnx" and done.path.is_file()
    assert set(done.plans) == {"0", "3"}
    if plan != "auto":
        assert set(done.plans.values()) == {plan}
    assert done.max_abs_error is not None and done.max_abs_error <= 1e-5
    onnx.checker.check_model(str(done.path))
    for batch in (1, 7):
        x = torch.randn(batch, 3, 5, 5)
        (got,) = run_onnx(done.path, x)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # one file, no leftovers


def test_auto_picks_the_form_with_fewer_macs():
    torch.manual_seed(0)
    model = nn.Sequential(
        gblr.GBLRLinear(64, 96, num_components=8),  # rank 8: 8 (96 + 64) < 96 * 64
        gblr.GBLRLinear(96, 64),  # full width, 64 components: K (m + n) > m n
    )
    frozen = gblr.freeze(model.eval())
    for name, plan in (("0", "lowrank"), ("1", "dense")):
        layer = frozen.get_submodule(name)
        rank = layer._factors()[0].shape[1]
        m, n = layer.matrix_shape
        assert (plan == "lowrank") == (rank * (m + n) < m * n)
        _, chosen, macs = export_module._plain_forms(layer, "auto")
        assert chosen == plan
        assert macs == (m * n if plan == "dense" else rank * (m + n))


def test_fixed_batch_and_a_shared_layer(tmp_path):
    torch.manual_seed(1)
    shared = gblr.GBLRLinear(16, 16, structure_init="random")
    model = gblr.freeze(nn.Sequential(shared, nn.Tanh(), shared).eval())
    assert model[0] is model[2]
    x = torch.randn(4, 16)
    done = gblr.export_onnx(model, x, tmp_path / "shared.onnx", dynamic_batch=False)
    assert set(done.plans) == {"0"}  # one layer, exported once, used twice
    graph_input = onnx.load(str(done.path)).graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == [4, 16]
    (got,) = run_onnx(done.path, x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_the_model_is_left_as_it_was(tmp_path):
    model = frozen_sequential().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gblr.export_onnx(model, torch.randn(2, 3, 5, 5), tmp_path / "m.onnx")
    assert model.training
    assert isinstance(model[0], gblr.FrozenGBLRConv2d)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_bad_arguments(tmp_path):
    frozen = frozen_sequential()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match=r"plan must be one of .*'segment'"):
        gblr.export_onnx(frozen, x, tmp_path / "m.onnx", plan="segment")
    training_form = nn.Sequential(gblr.GBLRLinear(8, 8), nn.ReLU())
    with pytest.raises(ValueError, match=r"training form \(0\).*gblr\.freeze"):
        gblr.export_onnx(training_form, torch.randn(2, 8), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        gblr.export_onnx(frozen, [x], tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_failed_export_or_check_writes_nothing_and_keeps_an_old_file(tmp_path, monkeypatch):
    frozen = frozen_sequential()
    x = torch.randn(2, 3, 5, 5)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"an earlier export")

    real_plain_forms = export_module._plain_forms

    def wrong_weights(layer, plan):
        module, chosen, macs = real_plain_forms(layer, plan)
        with torch.no_grad():
            next(module.parameters()).add_(0.1)
        return module, chosen, macs

    monkeypatch.setattr(export_module, "_plain_forms", wrong_weights)
    with pytest.raises(ValueError, match="differs from the model's"):
        gblr.export_onnx(frozen, x, target)
    monkeypatch.setattr(export_module, "_plain_forms", real_plain_forms)

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter failed"):
        gblr.export_onnx(frozen, x, target)
    assert target.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_half_precision_is_checked_and_bfloat16_is_written_unchecked(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(gblr.GBLRLinear(32, 64, num_components=4), nn.ReLU(), nn.Linear(64, 4))
    frozen = gblr.freeze(model.eval())
    x = torch.randn(3, 32)
    half = gblr.export_onnx(frozen.to(torch.float16), x.half(), tmp_path / "half.onnx")
    assert half.max_abs_error is not None and half.max_abs_error <= 1e-2
    # onnxruntime's CPU provider has no bfloat16 Gemm: a valid file, written unchecked.
    with pytest.warns(UserWarning, match="cannot run the exported model"):
        bf16 = gblr.export_onnx(frozen.to(torch.bfloat16), x.bfloat16(), tmp_path / "bf16.onnx")
    assert bf16.max_abs_error is None and bf16.path.is_file()
    onnx.checker.check_model(str(bf16.path))


def test_a_link_is_written_through_and_a_read_only_file_is_refused(tmp_path):
    # As gblr.save (issue 20): os.replace turned a link into a file and replaced a
    # read-only one.
    frozen = gblr.freeze(nn.Sequential(gblr.GBLRLinear(8, 4)).eval())
    x = torch.randn(2, 8)
    (tmp_path / "models").mkdir()
    real = tmp_path / "models" / "m.onnx"
    real.write_bytes(b"old")
    link = tmp_path / "m.onnx"
    link.symlink_to(real)
    gblr.export_onnx(frozen, x, link, check=False)
    assert link.is_symlink() and onnx.load(str(real)) is not None
    real.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only"):
        gblr.export_onnx(frozen, x, link, check=False)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m.onnx"]
