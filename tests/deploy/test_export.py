"""ONNX export of frozen models: the exported file, run by onnxruntime, computes what the
frozen model computes, at any batch size; bad input is refused and a failed export
writes nothing."""

import sys
import warnings

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
    # a str opset failed inside torch ("'<' not supported"), an old one printed a
    # traceback and wrote opset 18
    with pytest.raises(TypeError, match=r"opset_version must be an int >= 18 or None, got '17'"):
        gblr.export_onnx(frozen, x, tmp_path / "m.onnx", opset_version="17")
    with pytest.raises(ValueError, match=r"opset_version must be >= 18 .* got 7"):
        gblr.export_onnx(frozen, x, tmp_path / "m.onnx", opset_version=7)
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
        gblr.export_onnx(frozen, x, target, overwrite=True)
    monkeypatch.setattr(export_module, "_plain_forms", real_plain_forms)

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter failed"):
        gblr.export_onnx(frozen, x, target, overwrite=True)
    assert target.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_export_replaces_its_own_file_but_not_another_unless_told(tmp_path):
    """export_onnx replaced any file at the path in silence (a user's other model, a
    checkpoint); its own earlier exports carry a metadata mark and are replaced."""
    frozen = gblr.freeze(nn.Sequential(gblr.GBLRLinear(8, 4)).eval())
    x = torch.randn(2, 8)
    other = tmp_path / "other.onnx"
    other.write_bytes(b"someone else's model")
    with pytest.raises(FileExistsError, match=r"not written by gblr\.export_onnx.*overwrite=True"):
        gblr.export_onnx(frozen, x, other)
    assert other.read_bytes() == b"someone else's model"
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        gblr.export_onnx(frozen, x, other, overwrite=1)
    gblr.export_onnx(frozen, x, other, overwrite=True, check=False)
    marks = {p.key: p.value for p in onnx.load(str(other)).metadata_props}
    assert marks.get("gblr.export_onnx") == "1"
    gblr.export_onnx(frozen, x, other, check=False)  # its own file: replaced
    torch.onnx.export(nn.Linear(8, 4), (x,), str(tmp_path / "torch.onnx"), dynamo=True)
    with pytest.raises(FileExistsError):  # an ONNX file torch wrote is not ours
        gblr.export_onnx(frozen, x, tmp_path / "torch.onnx")


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
    gblr.export_onnx(frozen, x, link, check=False, overwrite=True)
    assert link.is_symlink() and onnx.load(str(real)) is not None
    real.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only"):
        gblr.export_onnx(frozen, x, link, check=False)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m.onnx"]


# --------------------------------------------------------------------------- text models
def small_bert():
    """A 2-layer BERT with random weights (built offline from a config), converted by
    gblr and frozen."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5, min_features=8))
    return gblr.freeze(model)


def tokens(batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # a padded sentence
    return {"input_ids": ids, "attention_mask": mask}


def test_small_bert_runs_in_onnxruntime_at_two_sequence_lengths_and_matches_torch(tmp_path, capfd):
    # Issue 22, must hold: the file fixed the sequence length at the example's ("Got: 17
    # Expected: 8"), named its outputs layer_norm_12 and printed "Evaluation failed".
    model = small_bert()
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        done = gblr.export_onnx(model, tokens(2, 8, seed=0), tmp_path / "bert.onnx")
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""
    assert done.inputs == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
    }
    assert done.outputs == {
        "last_hidden_state": ["batch", "sequence", 32],
        "pooler_output": ["batch", 32],
    }
    assert done.checked_shapes == [
        {"input_ids": [2, 8], "attention_mask": [2, 8]},
        {"input_ids": [1, 7], "attention_mask": [1, 7]},
    ]
    assert done.max_abs_error is not None and done.max_abs_error <= 1e-5
    session = onnxruntime.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    for batch, length in ((2, 8), (3, 17)):
        feeds = tokens(batch, length, seed=length)
        got = session.run(None, {name: x.numpy() for name, x in feeds.items()})
        with torch.no_grad():
            expected = model(**feeds)
        torch.testing.assert_close(
            torch.from_numpy(got[0]), expected.last_hidden_state, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            torch.from_numpy(got[1]), expected.pooler_output, rtol=1e-5, atol=1e-5
        )


def test_a_language_model_exports_without_its_key_value_cache(tmp_path):
    # GPT-2's default use_cache returned a DynamicCache, which torch.export refused
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    frozen = gblr.freeze(model)
    done = gblr.export_onnx(
        frozen, {"input_ids": torch.randint(0, 100, (2, 8))}, tmp_path / "lm.onnx"
    )
    assert list(done.outputs) == ["logits"]
    assert done.max_abs_error is not None and done.max_abs_error <= 1e-5
    assert frozen.config.use_cache is True  # the model is left as it was


def test_names_and_axes_can_be_given(tmp_path, capfd):
    model = small_bert()
    feeds = tokens(2, 8, seed=1)
    capfd.readouterr()
    done = gblr.export_onnx(
        model,
        (feeds["input_ids"], feeds["attention_mask"]),  # positional: the forward's names
        tmp_path / "bert.onnx",
        input_names=["ids", "mask"],
        output_names=["tokens", "sentence"],
        dynamic_axes={"ids": {0: "n"}, "mask": {0: "n"}},  # a fixed sequence length
    )
    # A fixed length makes onnxscript's constant folding try (and fail) BERT's
    # token_type_ids gather; its "Evaluation failed" log stays quiet.
    assert capfd.readouterr().err == ""
    assert done.inputs == {"ids": ["n", 8], "mask": ["n", 8]}
    assert done.outputs == {"tokens": ["n", 8, 32], "sentence": ["n", 32]}
    assert [shape["ids"] for shape in done.checked_shapes] == [[2, 8], [1, 8]]
    session = onnxruntime.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="Got: 17 Expected: 8"):
        other = tokens(1, 17, seed=2)
        session.run(
            None, {"ids": other["input_ids"].numpy(), "mask": other["attention_mask"].numpy()}
        )


def test_output_names_of_tuples_and_a_sequence_axis_of_size_one(tmp_path):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.layer = gblr.GBLRLinear(16, 8, num_components=2)

        def forward(self, token_ids):
            hidden = self.layer(self.embed(token_ids))
            return hidden, hidden.mean(1)

    torch.manual_seed(2)
    model = gblr.freeze(Pair().eval())
    done = gblr.export_onnx(model, torch.randint(0, 50, (1, 1)), tmp_path / "pair.onnx")
    assert done.inputs == {"token_ids": ["batch", "sequence"]}
    assert list(done.outputs) == ["output_0", "output_1"]
    assert done.checked_shapes == [{"token_ids": [1, 1]}, {"token_ids": [2, 2]}]
    x = torch.randint(0, 50, (3, 5))
    got = run_onnx(done.path, x)
    with torch.no_grad():
        expected = model(x)
    for produced, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(produced, reference, rtol=1e-5, atol=1e-5)


def test_bad_names_and_axes_are_refused(tmp_path):
    frozen = frozen_sequential()
    x = torch.randn(2, 3, 5, 5)
    cases = [
        ({"input_names": ["a", "b"]}, ValueError, r"input_names must name all 1 .*\['input'\]"),
        ({"input_names": "a"}, TypeError, "input_names must be a list of str"),
        ({"output_names": ["y", "z"]}, ValueError, r"output_names must name all 1.*\['output'\]"),
        ({"dynamic_axes": {"x": {0: "batch"}}}, ValueError, r"input 'x'.*inputs: \['input'\]"),
        ({"dynamic_axes": {"input": {4: "w"}}}, ValueError, r"dimension 4.*has 4"),
        ({"dynamic_axes": {"input": {0: 1}}}, TypeError, r"must be an axis name"),
        ({"dynamic_axes": {"input": "batch"}}, TypeError, r"dimension: axis name"),
        ({"dynamic_axes": [0]}, TypeError, "dynamic_axes must be a mapping"),
        ({"dynamic_batch": "yes"}, TypeError, "dynamic_batch must be True or False"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            gblr.export_onnx(frozen, x, tmp_path / "m.onnx", **options)
    with pytest.raises(TypeError, match="mapping of names to tensors"):
        gblr.export_onnx(frozen, {"input": [1, 2]}, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_an_axis_the_model_cannot_vary_is_refused(tmp_path):
    class Fixed(nn.Module):  # reads exactly 4 rows: dimension 0 is not free
        def __init__(self):
            super().__init__()
            self.layer = gblr.GBLRLinear(8, 8, num_components=2)

        def forward(self, x):
            return self.layer(x).reshape(4, 16)

    model = gblr.freeze(Fixed().eval())
    with pytest.raises(Exception, match=r"inferred a static shape of 4") as caught:
        gblr.export_onnx(model, torch.randn(4, 2, 8), tmp_path / "m.onnx")
    notes = " ".join(getattr(caught.value, "__notes__", []))  # Python 3.11+
    assert sys.version_info < (3, 11) or "give dynamic_axes= with only those" in notes
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".onnx"]


def test_a_path_in_a_folder_that_does_not_exist_is_refused(tmp_path):
    # it created the missing folders (a typo made new ones), where gblr.save refuses
    pytest.importorskip("onnx")
    model = gblr.freeze(torch.nn.Sequential(gblr.GBLRLinear(8, 4, init_cost=0.5)))
    with pytest.raises(ValueError, match=r"path's folder .*missing.* does not exist"):
        gblr.export_onnx(model, torch.randn(2, 8), tmp_path / "missing" / "model.onnx")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="is a folder"):
        gblr.export_onnx(model, torch.randn(2, 8), tmp_path)
