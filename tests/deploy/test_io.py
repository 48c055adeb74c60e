"""save/load: fresh-process round trip, refusal of damaged files, atomic writes."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gblr
from gblr.deploy import FrozenGBLRConv2d, FrozenGBLRLinear, load_checkpoint
from tests.conftest import tiny_bert

ROOT = Path(__file__).resolve().parents[2]


def frozen_sequential(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(
        gblr.GBLRConv2d(3, 8, 3, padding=1, rank_per_component=2, structure_init="random"),
        nn.ReLU(),
        nn.Flatten(),
        gblr.GBLRLinear(8 * 5 * 5, 10, structure_init="half", init_cost=0.3),
        nn.LayerNorm(10),
        nn.Linear(10, 4),
    )
    return gblr.freeze(model.eval()).to(dtype)


class Net(nn.Module):
    """Not a Sequential: needs a model_factory to be rebuilt."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(12, 16)
        self.head = nn.Linear(16, 6, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))


def run_fresh(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, check=True)


def test_round_trip_in_a_fresh_process(tmp_path):
    model = frozen_sequential()
    x = torch.randn(4, 3, 5, 5)
    gblr.plan(model, x, candidates=["lowrank"], repeats=1, warmup=0)
    path = gblr.save(model, tmp_path / "model.safetensors")
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x), tmp_path / "expected.pt")
    run_fresh(
        """
        import sys, torch, gblr
        model = gblr.load("model.safetensors")
        assert not model.training
        torch.save(model(torch.load("x.pt")), "y.pt")
        torch.save({k: v.plan_cache for k, v in model.named_children()
                    if isinstance(v, gblr.FrozenGBLRLinear)}, "plans.pt")
        """,
        tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "y.pt"), torch.load(tmp_path / "expected.pt"))
    assert torch.load(tmp_path / "plans.pt")["3"] == model[3].plan_cache
    checkpoint = load_checkpoint(path)
    assert [entry["name"] for entry in checkpoint.layers] == ["0", "3"]
    assert checkpoint.layers[0]["class"] == "FrozenGBLRConv2d"
    assert checkpoint.layers[1]["row_intervals"] == model[3].row_intervals.tolist()


def test_round_trip_with_model_factory_in_a_fresh_process(tmp_path):
    torch.manual_seed(1)
    model = Net()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5, min_features=4))
    model = gblr.freeze(model.eval())
    x = torch.randn(7, 12)
    gblr.save(model, tmp_path / "net.safetensors")
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x), tmp_path / "expected.pt")
    with pytest.raises(ValueError, match="model_factory"):
        gblr.load(tmp_path / "net.safetensors")
    # a model instead of a function that builds one: named, not a TypeError from its forward
    with pytest.raises(TypeError, match=r"function that builds the model .* got a Net instance"):
        gblr.load(tmp_path / "net.safetensors", model_factory=Net())
    run_fresh(
        f"""
        import sys, torch, gblr
        sys.path.insert(0, {str(ROOT)!r})
        from tests.deploy.test_io import Net
        model = gblr.load("net.safetensors", model_factory=Net)  # the dense architecture
        assert isinstance(model.encoder, gblr.FrozenGBLRLinear)
        torch.save(model(torch.load("x.pt")), "y.pt")
        """,
        tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "y.pt"), torch.load(tmp_path / "expected.pt"))


def test_bfloat16_and_shared_layers_round_trip(tmp_path):
    shared = gblr.GBLRLinear(8, 8, structure_init="half", init_cost=0.5)
    model = gblr.freeze(nn.Sequential(shared, nn.GELU(), shared).eval()).to(torch.bfloat16)
    path = gblr.save(model, tmp_path / "m.safetensors")
    loaded = gblr.load(path)
    assert loaded[0] is loaded[2]
    assert loaded[0].u_packed.dtype == torch.bfloat16
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(loaded(x), model(x))
    root = gblr.load(gblr.save(model[0], tmp_path / "layer.safetensors"))
    assert isinstance(root, FrozenGBLRLinear) and torch.equal(root(x), model[0](x))


def test_truncated_and_tampered_files_are_refused(tmp_path):
    path = gblr.save(frozen_sequential(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated\.safetensors.*truncated"):
        gblr.load(truncated)
    truncated.write_bytes(data[:20])
    with pytest.raises(ValueError, match="truncated"):
        gblr.load(truncated)

    flipped = bytearray(data)
    flipped[8 + header_size + 50] ^= 0x01  # one bit of one tensor
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"tampered\.safetensors.*checksum mismatch"):
        gblr.load(tampered)

    # Change one interval in the structure metadata (same tensor data).
    header = json.loads(data[8 : 8 + header_size])
    structure = json.loads(header["__metadata__"]["structure"])
    structure["layers"][1]["row_intervals"][0][0] += 1
    header["__metadata__"]["structure"] = json.dumps(structure, sort_keys=True)
    new_header = json.dumps(header).encode()
    tampered.write_bytes(
        len(new_header).to_bytes(8, "little") + new_header + data[8 + header_size :]
    )
    with pytest.raises(ValueError, match="checksum mismatch"):
        gblr.load(tampered)

    other = tmp_path / "plain.safetensors"
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a frozen GBLR model file"):
        gblr.load(other)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = gblr.save(frozen_sequential(), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        gblr.save(frozen_sequential(torch.float64), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp left


def test_save_and_load_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"call gblr\.freeze"):
        gblr.save(nn.Sequential(gblr.GBLRLinear(4, 4)), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="no frozen GBLR layer"):
        gblr.save(nn.Linear(4, 4), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        gblr.save(frozen_sequential(), tmp_path / "missing" / "a.safetensors")
    path = gblr.save(frozen_sequential(), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="model_factory must be a callable"):
        gblr.load(path, model_factory=nn.Linear(3, 3).weight)
    with pytest.raises(TypeError, match=r"must return an nn\.Module"):
        gblr.load(path, model_factory=lambda: 3)

    def wrong_shape():
        model = frozen_sequential()
        model[3] = nn.Linear(200, 11)
        return model

    with pytest.raises(ValueError, match=r"module '3' .* shape \(11, 200\)"):
        gblr.load(path, model_factory=wrong_shape)
    conv = gblr.load(
        path,
        model_factory=lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(200, 10),
            nn.LayerNorm(10),
            nn.Linear(10, 4),
        ),
    )
    assert isinstance(conv[0], FrozenGBLRConv2d)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("plan", "fused9000", r"plan 'fused9000' for a FrozenGBLR\w+ is not one of"),
        ("plan_cache", [["cpu", "torch.float32", 64, "fused9000"]], "stored plan choice"),
        ("plan_cache", [["cpu", "torch.float32", "64", "dense"]], "stored plan choice"),
        ("plan_cache", [["cpu", 64, "dense"]], "stored plan choice"),
    ],
)
def test_plans_of_another_version_are_refused_on_load(tmp_path, field, value, message):
    # A consistent file (its checksum recomputed) naming a plan this version lacks.
    from tests.deploy.crafting import edit

    path = gblr.save(frozen_sequential(), tmp_path / "m.safetensors")

    def change(header):
        header["__metadata__"]["structure"]["layers"][0][field] = value

    edit(path, change)
    with pytest.raises(gblr.deploy.GBLRFileError, match=message):
        gblr.load(path)


@pytest.mark.parametrize("factory_converts", [False, True])
def test_a_gpt2_file_loads_into_gpt2_and_merges_back_into_conv1d(tmp_path, factory_converts):
    """GPT-2's linear layers are Hugging Face Conv1D (weight stored (in, out)). Before, a
    plain GPT-2 from model_factory was refused ("matrix shape None"), and one the factory
    had converted lost the mark that the layers replaced a Conv1D, so merge_and_unload gave
    an nn.Linear that transformers reloaded with transposed weights (wrong outputs, no
    error, where the MLP is square)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=32, n_inner=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16
    )

    def gpt2():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).eval()
        if factory_converts:
            gblr.convert(model, gblr.GBLRConfig(budget=0.5), progress=False)
        return model

    model = gpt2()
    if not factory_converts:
        gblr.convert(model, gblr.GBLRConfig(budget=0.5), progress=False)
    gblr.freeze(model)
    ids = torch.randint(0, 64, (2, 8))
    path = gblr.save(model, tmp_path / "gpt2.safetensors")
    loaded = gblr.load(path, model_factory=gpt2)
    expected = model(ids).logits
    torch.testing.assert_close(loaded(ids).logits, expected)
    merged = gblr.merge_and_unload(loaded)
    assert type(merged.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    merged.save_pretrained(tmp_path / "dense")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_home_relative_path_means_the_home_folder_everywhere(tmp_path, monkeypatch):
    """export_onnx expanded ``~`` while gblr.save refused "path's folder '~' does not
    exist" for the same string; save, load, save_pretrained and from_pretrained expand it
    now too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = gblr.save(frozen_sequential(), "~/m.safetensors")
    assert path == tmp_path / "m.safetensors" and path.is_file()
    gblr.load("~/m.safetensors")
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5), progress=False)
    gblr.save_pretrained(model, "~/bert")
    assert (tmp_path / "bert" / "model.safetensors").is_file()
    gblr.from_pretrained("~/bert")
    with pytest.raises(TypeError, match=r"device must be a str, torch\.device or int"):
        gblr.from_pretrained("~/bert", device=3.5)
    with pytest.raises(ValueError, match=r"device: 'banana' is not a device torch knows"):
        gblr.from_pretrained("~/bert", device="banana")
