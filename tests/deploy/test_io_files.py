"""gblr.save/gblr.load against crafted files, file-system conventions and tied weights
(issue 20, "Files"). Crafted files have their checksum recomputed, so that every check
behind the checksum is reached."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import gblr
from gblr.deploy import GBLRFileError, io, is_gblr_file, load_checkpoint
from tests.conftest import tiny_bert
from tests.deploy.crafting import edit, join, resign, split


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        gblr.GBLRConv2d(2, 4, 3, padding=1, structure_init="half", init_cost=0.5),
        nn.ReLU(),
        nn.Flatten(),
        gblr.GBLRLinear(4 * 3 * 3, 6, structure_init="half", init_cost=0.5),
        nn.LayerNorm(6),
        nn.Linear(6, 6),
        nn.GELU(),
        nn.Linear(6, 6),
    )
    model[7].weight = model[5].weight  # tied
    return gblr.freeze(model.eval())


def vm_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024


@pytest.fixture
def memory_cap():
    """Address space capped at 1 GiB above the current one: a load that tried to allocate
    the gigabytes a crafted header asks for would fail with a MemoryError/RuntimeError,
    not a GBLRFileError."""
    resource = pytest.importorskip("resource")
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to measure the address space")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_bytes() + (1 << 30)
    if hard != resource.RLIM_INFINITY and hard < cap:
        pytest.skip("the hard address-space limit is lower than the cap")
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def saved(tmp_path) -> Path:
    return gblr.save(small_model(), tmp_path / "m.safetensors")


def test_the_small_model_round_trips(saved):
    model = small_model()
    loaded = gblr.load(saved)
    x = torch.randn(3, 2, 3, 3)
    assert torch.equal(loaded(x), model(x))
    assert loaded[7].weight is loaded[5].weight


# --------------------------------------------------------------------------- crafted
def _set(path: str, value):
    """A header edit: ``path`` is a '/'-separated path from the header's root, with
    ``structure`` parsed."""

    def change(header):
        *parents, last = path.split("/")
        node = header
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return change


_DELETE = object()
S = "__metadata__/structure"

CRAFTED = [
    # (edit, message): these gave KeyError, TypeError or a crash inside torch before.
    (_set(f"{S}/aliases", _DELETE), r"the structure must have exactly the keys"),
    (_set(f"{S}/layers", [5]), r"layers\[0\] must be a JSON object, got 5"),
    (_set(f"{S}/layers/0/class", _DELETE), r"layers\[0\]\.class must be"),
    (_set(f"{S}/layers/0/out", "4"), r"layers\[0\]\.out must be an int"),
    (_set(f"{S}/layers/0/row_intervals", [[0, 1, 2]]), r"row_intervals\[0\] must be a list"),
    (_set(f"{S}/layers/0/row_intervals", [[9, 1]]), r"row_intervals\[0\] start must be in"),
    (_set(f"{S}/layers/0/col_intervals", [[0, 1]]), r"row intervals and 1 column"),
    (_set(f"{S}/layers/0/dtype", "torch.int64"), r"dtype must be one of"),
    (_set(f"{S}/layers/0/plan_cache", {"a": 1}), r"plan_cache must be a list"),
    (_set(f"{S}/layers/0/kernel_size", [3, 4]), r"kernel matrix of shape \(4, 18\)"),
    (_set(f"{S}/layers/1/extra", 1), r"layers\[1\] must have exactly the keys"),
    (_set(f"{S}/layers/1/aliases", ["0"]), r"module name '0' is given to two"),
    (_set(f"{S}/layers/1/name", "a..b"), r"layers\[1\]\.name must be a module name"),
    (_set(f"{S}/aliases/7.weight", "nothing"), r"the alias '7\.weight' must be"),
    (_set(f"{S}/model/children/0/1", {"type": "Bogus"}), r"module type 'Bogus'; known"),
    (_set(f"{S}/model/children/0/1", {"type": "os.system"}), r"module type 'os\.system'"),
    (_set(f"{S}/model/children/1/0", "a.b"), r"name must be a non-empty string without"),
    (_set(f"{S}/model/children/1/1/args", {"inplace": True}), r"args must have exactly"),
    (_set(f"{S}/model/children/6/1/args/approximate", "x"), r"approximate must be"),
    (_set(f"{S}/model/children/4/1/eps", -1), r"eps must be a number in"),
    (_set(f"{S}/model/children/5/1/in_features", True), r"in_features must be an int"),
    (_set(f"{S}/model/children/5/1/in_features", 7), r"does not match the tensors"),
    (_set(f"{S}/model/children/5/1/dtype", "torch.float64"), r"another shape or dtype"),
    (_set(f"{S}/model/children/7/1", {"type": "shared", "target": "9"}), r"no module"),
    (_set(f"{S}/model/children/1/1", {"type": "shared", "target": "0"}), r"does not match"),
    (_set(f"{S}/model/children/2/1", {"type": "frozen"}), r"no layer entry of that name"),
    (_set(f"{S}/root", 3), r"root must be a string"),
    (_set(f"{S}/extra", None), r"the structure must have exactly the keys"),
    (_set("__metadata__/extra", "x"), r"the gblr metadata must have exactly the keys"),
    (_set("__metadata__/format_version", "3"), r"format version '3' is not supported"),
    (_set("__metadata__/format_version", 2), r"format version 2 is not supported"),
    (_set("0.u_packed/dtype", "F99"), r"dtype must be one of"),
    (_set("0.u_packed/shape", [1, -1]), r"shape\[1\] must be an int"),
    (_set("0.u_packed/data_offsets", [0]), r"data_offsets must be a list of 2"),
    (_set("0.u_packed/extra", 0), r"tensor '0\.u_packed' must have exactly the keys"),
]


@pytest.mark.parametrize(("change", "message"), CRAFTED, ids=[m for _, m in CRAFTED])
def test_crafted_headers_are_refused_with_the_reason(saved, change, message, memory_cap):
    edit(saved, change)
    with pytest.raises(GBLRFileError, match=message) as caught:
        gblr.load(saved)
    assert str(caught.value).startswith(f"cannot load {str(saved)!r}: ")


def test_a_tensor_whose_intervals_differ_from_its_entry_is_refused(saved):
    # Same shapes everywhere; the stored interval tensor says another thing than the entry.
    header, body = split(saved.read_bytes())
    begin, end = header["3.row_intervals"]["data_offsets"]
    intervals = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.int64).clone()
    intervals[0] = (intervals[0] + 1) % 6
    body = body[:begin] + intervals.numpy().tobytes() + body[end:]
    resign(header, body)
    saved.write_bytes(join(header, body))
    with pytest.raises(GBLRFileError, match=r"'3\.row_intervals' differs from the row_intervals"):
        gblr.load(saved)


HUGE_CONV = {
    "type": "Conv2d",
    "in_channels": 2,
    "out_channels": 2**20,
    "kernel_size": [64, 64],
    "stride": [1, 1],
    "padding": [1, 1],
    "dilation": [1, 1],
    "groups": 1,
    "bias": True,
    "dtype": "torch.float32",
}


@pytest.mark.parametrize(
    ("where", "value"),
    [
        # A 100000 x 100000 Linear: 40 GB from a 3 kB file, before any check (issue 20).
        (f"{S}/model/children/5/1/in_features", 100_000),
        (f"{S}/model/children/5/1/out_features", 2**31 - 1),
        (f"{S}/model/children/4/1/normalized_shape", [50_000, 50_000]),
        (f"{S}/model/children/0/1", HUGE_CONV),
        # rank 10**9 over a few components: u_packed of billions of floats.
        (f"{S}/layers/1/rank_per_component", 10**9),
    ],
)
def test_a_header_asking_for_gigabytes_is_refused_before_allocating(
    saved, where, value, memory_cap
):
    edit(saved, _set(where, value))
    with pytest.raises(GBLRFileError, match=r"does not match the tensors|needs torch\.float32"):
        gblr.load(saved)
    if "layers" in where:  # the layers are built from the file with a factory too
        with pytest.raises(GBLRFileError, match=r"'3\.u_packed' is torch.float32 of shape"):
            gblr.load(saved, model_factory=small_model)


def test_a_tensor_table_asking_for_more_bytes_than_the_file_has_is_refused(saved, memory_cap):
    edit(saved, _set("0.u_packed/shape", [2**40]), structure=False)
    with pytest.raises(GBLRFileError, match=r"tensor '0\.u_packed' .* \d+ bytes\) has"):
        gblr.load(saved)
    edit(saved, _set("0.u_packed/data_offsets", [0, 2**60]), structure=False)
    with pytest.raises(GBLRFileError, match="truncated: tensor data needs"):
        gblr.load(saved)


def test_deep_nesting_is_refused_not_a_recursion_error(saved):
    clean = saved.read_bytes()
    header, body = split(clean)
    header["__metadata__"]["structure"] = "[" * 100_000 + "]" * 100_000
    resign(header, body)
    saved.write_bytes(join(header, body))
    with pytest.raises(GBLRFileError, match="nested too deeply"):
        gblr.load(saved)
    text = json.dumps(header)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    saved.write_bytes(join(text, body))
    with pytest.raises(GBLRFileError, match="nested too deeply"):
        gblr.load(saved)

    def nest(header):  # Sequential in Sequential, 200 deep: valid JSON, too deep a model
        spec = header["__metadata__"]["structure"]["model"]
        for _ in range(200):
            spec = {"type": "Sequential", "children": [["0", spec]]}
        header["__metadata__"]["structure"]["model"] = spec

    saved.write_bytes(clean)
    edit(saved, nest)
    with pytest.raises(GBLRFileError, match="nested deeper than 64"):
        gblr.load(saved)


def test_duplicate_keys_and_non_numbers_are_refused(saved):
    clean = saved.read_bytes()
    header, body = split(clean)
    text = json.dumps(header)[:-1] + ', "__metadata__": {}}'
    saved.write_bytes(join(text, body))
    with pytest.raises(GBLRFileError, match="duplicate key '__metadata__'"):
        gblr.load(saved)
    saved.write_bytes(clean)
    edit(saved, _set(f"{S}/model/children/4/1/eps", float("nan")))  # json writes NaN
    with pytest.raises(GBLRFileError, match="NaN is not a JSON number"):
        gblr.load(saved)


def test_a_layer_named_inside_itself_is_refused_not_a_cycle(tmp_path):
    shared = gblr.GBLRLinear(8, 8, structure_init="half", init_cost=0.5)
    path = gblr.save(gblr.freeze(nn.Sequential(shared, shared).eval()), tmp_path / "m.st")

    def inside(header):
        structure = header["__metadata__"]["structure"]
        structure["layers"][0]["aliases"] = ["0.inner"]
        structure["aliases"] = {
            key.replace("1.", "0.inner.", 1): value for key, value in structure["aliases"].items()
        }

    edit(path, inside)
    with pytest.raises(GBLRFileError, match="would put a layer in itself"):
        gblr.load(path)


# --------------------------------------------------------------------------- versions
def test_the_versions_are_covered_by_the_checksum(saved):
    for key, value in (("gblr_version", "99.0"), ("format_version", "1"), ("format", "x")):
        data = saved.read_bytes()
        edit(saved, _set(f"__metadata__/{key}", value), sign=False)
        with pytest.raises(GBLRFileError, match=r"checksum mismatch|not a frozen GBLR"):
            gblr.load(saved)
        saved.write_bytes(data)
    edit(saved, _set("__metadata__/sha256", "abc"), sign=False)
    with pytest.raises(GBLRFileError, match="sha256 must be 64 lowercase hex digits, got 'abc'"):
        gblr.load(saved)


def _as_format_1(header):
    """What gblr 0.1.0 wrote: version 1, Sequential children deduplicated (a shared
    module's second mention dropped, named only in the layer's aliases)."""
    metadata = header["__metadata__"]
    metadata["format_version"] = "1"
    model = metadata["structure"]["model"]
    model["children"] = [c for c in model["children"] if c[1]["type"] != "shared"]


def test_files_of_format_1_are_still_read(tmp_path):
    shared = gblr.GBLRLinear(8, 8, structure_init="half", init_cost=0.5)
    model = gblr.freeze(nn.Sequential(shared, shared, nn.Tanh()).eval())
    path = edit(gblr.save(model, tmp_path / "m.safetensors"), _as_format_1)
    checkpoint = load_checkpoint(path)
    assert checkpoint.format_version == "1"
    loaded = gblr.load(path)
    # format 1's loader appended the second mention last: Tanh ran before it
    assert list(loaded._modules) == ["0", "1", "2"] and loaded[0] is loaded[1]
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))
    edit(path, _set("__metadata__/gblr_version", "0.0.1"), sign=False)  # not covered in 1
    assert load_checkpoint(path).gblr_version == "0.0.1"


# --------------------------------------------------------------------------- files
def test_load_refuses_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        gblr.load(3)
    with pytest.raises(ValueError, match="path must name a file"):
        gblr.load("")
    with pytest.raises(ValueError, match="is a folder"):
        gblr.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        gblr.load(tmp_path / "missing.safetensors")
    if Path("/dev/zero").exists():  # endless: read up to its size (0), never forever
        with pytest.raises(ValueError, match="not a regular file"):
            gblr.load("/dev/zero")
    assert not is_gblr_file("/dev/zero") and not is_gblr_file(tmp_path)


def test_save_refuses_an_empty_path_and_a_folder(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match=r"path must name a file .* got ''"):
        gblr.save(model, "")
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        gblr.save(model, tmp_path)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        gblr.save(model, None)
    assert list(tmp_path.iterdir()) == []


def test_save_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match=r"not written by gblr\.save"):
        gblr.save(small_model(), link)  # the target is not a gblr file: told first
    assert target.read_bytes() == b"old"
    assert gblr.save(small_model(), link, overwrite=True) == link
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert is_gblr_file(target) and torch.is_tensor(gblr.load(link)[5].weight)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "new.safetensors")
    gblr.save(small_model(), dangling)
    assert dangling.is_symlink() and is_gblr_file(tmp_path / "new.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling.safetensors",
        "link.safetensors",
        "new.safetensors",
        "real.safetensors",
    ]


def test_save_replaces_its_own_file_but_not_one_it_did_not_write_unless_told(tmp_path):
    """gblr.save replaced any file in silence: a user's torch.save checkpoint at the
    path was lost."""
    path = tmp_path / "best.pt"
    torch.save({"mine": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"not written by gblr\.save.*overwrite=True"):
        gblr.save(small_model(), path)
    assert path.read_bytes() == before
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        gblr.save(small_model(), path, overwrite="yes")
    gblr.save(small_model(), path, overwrite=True)
    assert is_gblr_file(path)
    gblr.save(small_model(), path)  # an earlier gblr.save file is replaced
    assert is_gblr_file(path)


def test_save_refuses_a_read_only_file_and_keeps_permissions(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    path.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only and is not replaced"):
        gblr.save(small_model(), path, overwrite=True)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    path.chmod(0o600)  # a private file stays private when replaced
    gblr.save(small_model(), path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and is_gblr_file(path)


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_save_failing_mid_write_leaves_the_old_file_and_no_temporary(
    tmp_path, monkeypatch, failure
):
    path = gblr.save(small_model(), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def fail(*args):
        raise failure

    monkeypatch.setattr(os, "fsync", fail)  # after the bytes are written, before the rename
    with pytest.raises(type(failure)):
        gblr.save(gblr.freeze(nn.Sequential(gblr.GBLRLinear(4, 4))), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# --------------------------------------------------------------------------- tied weights
class TiedNet(nn.Module):
    """An embedding tied to the output head, as in language models."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mix(self.emb(tokens))))


def test_tied_weights_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedNet()
    model.mix = gblr.GBLRLinear(8, 8, structure_init="half", init_cost=0.5)
    model = gblr.freeze(model.eval())
    path = gblr.save(model, tmp_path / "tied.safetensors")
    assert load_checkpoint(path).aliases == {"head.weight": "emb.weight"}
    tokens = torch.tensor([[1, 2, 3]])
    for factory in (TiedNet, lambda: TiedNet(tie=False)):  # tied again if the factory does not
        loaded = gblr.load(path, model_factory=factory)
        assert loaded.head.weight is loaded.emb.weight
        assert isinstance(loaded.mix, gblr.FrozenGBLRLinear)
        assert torch.equal(loaded(tokens), model(tokens))
        with torch.no_grad():
            loaded.emb.weight[0, 0] = 5.0  # one parameter: a change shows under both names
        assert loaded.head.weight[0, 0] == 5.0


def test_a_shared_module_keeps_its_place_in_a_sequential(tmp_path):
    # Format 1 wrote Sequential(shared, shared, Tanh) as (shared, Tanh) + an alias, and
    # the rebuilt model ran Tanh before the second shared layer: a silently wrong output.
    shared = gblr.GBLRLinear(8, 8, structure_init="half", init_cost=0.5)
    linear = nn.Linear(8, 8)
    model = gblr.freeze(nn.Sequential(shared, shared, nn.Tanh(), linear, linear).eval())
    loaded = gblr.load(gblr.save(model, tmp_path / "m.safetensors"))
    assert list(loaded._modules) == ["0", "1", "2", "3", "4"]
    assert loaded[0] is loaded[1] and loaded[3] is loaded[4]
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))


def test_a_rebuilt_model_is_created_on_the_meta_device_first(saved, monkeypatch):
    # The order that bounds allocation: built without memory, compared, then allocated.
    calls = []
    original = nn.Module.to_empty

    def spy(self, *, device, recurse=True):
        calls.append({t.device.type for t in self.state_dict().values()})
        return original(self, device=device, recurse=recurse)

    monkeypatch.setattr(nn.Module, "to_empty", spy)
    gblr.load(saved)
    assert calls == [{"meta"}]
    assert io.FORMAT_VERSION == "2"


# --------------------------------------------------------------------------- config
@pytest.fixture
def converted(tmp_path) -> tuple[Path, gblr.GBLRConfig]:
    """A model converted with a config, frozen and saved: the file holds the config."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    config = gblr.GBLRConfig(budget=0.5, include=["0", "2"], min_features=1, seed=3)
    gblr.convert(model, config)
    return gblr.save(gblr.freeze(model.eval()), tmp_path / "m.safetensors"), config


def test_the_conversion_config_is_saved_with_the_model(converted):
    path, config = converted
    checkpoint = load_checkpoint(path)
    assert checkpoint.config == config.to_dict()
    assert gblr.ConversionConfig.from_file(path) == config
    assert gblr.GBLRConfig.from_file(path) == config
    with pytest.raises(ValueError, match="holds a GBLRConfig, not a LowRankConfig"):
        gblr.LowRankConfig.from_file(path)
    loaded = gblr.load(path)  # the model loads as before
    assert isinstance(loaded[0], gblr.FrozenGBLRLinear)


def test_a_config_goes_to_json_and_comes_back_from_it_and_from_save_pretrained(tmp_path):
    config = gblr.LowRankConfig(budget=0.25, include="encoder.*", seed=2)
    path = config.to_file(tmp_path / "conversion.json")
    assert gblr.ConversionConfig.from_file(path) == config
    assert gblr.LowRankConfig.from_file(path) == config
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gblr.GBLRConfig().to_file(path)  # an earlier file is kept unless told
    assert gblr.ConversionConfig.from_file(path) == config
    gblr.GBLRConfig().to_file(path, overwrite=True)
    assert gblr.ConversionConfig.from_file(path) == gblr.GBLRConfig()
    with pytest.raises(ValueError, match=r"must name a \.json file"):
        config.to_file(tmp_path / "conversion.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds no config's data"):
        gblr.ConversionConfig.from_file(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        gblr.ConversionConfig.from_file(tmp_path / "broken.json")
    # a save_pretrained folder (it read only gblr.save's files: "header of ... bytes")
    model = tiny_bert()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    folder = gblr.save_pretrained(model, tmp_path / "bert")
    assert gblr.ConversionConfig.from_file(folder) == model.gblr_config
    assert gblr.GBLRConfig.from_file(folder / "model.safetensors") == model.gblr_config


def test_a_file_without_a_config_still_loads(saved):
    # written from a model gblr.convert did not make, as every file before configs
    assert load_checkpoint(saved).config is None
    assert "config" not in split(saved.read_bytes())[0]["__metadata__"]
    with pytest.raises(ValueError, match="holds no conversion config"):
        gblr.ConversionConfig.from_file(saved)
    gblr.load(saved)


def test_the_config_is_covered_by_the_checksum(converted):
    path, _ = converted
    edit(path, _set("__metadata__/config", '{"structure": "gblr", "budget": 0.9}'), sign=False)
    with pytest.raises(GBLRFileError, match="checksum mismatch"):
        gblr.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"the config metadata is not valid JSON"),
        ("[]", r"the config must be a JSON object, got \[\]"),
        ('{"budget": 0.5}', r"the config's structure must be a non-empty string, got None"),
        ('{"structure": ""}', r"the config's structure must be a non-empty string"),
        ('{"structure": "gblr", "budget": {"a": 1}}', r"the config's 'budget' must be null"),
        ('{"structure": "gblr", "budget": 1e999}', r"the config's 'budget' must be null"),
        ('{"structure": "gblr", "budget": NaN}', r"NaN is not a JSON number"),
        ('{"structure": "gblr", "include": [1]}', r"'include' must be .* a list of strings"),
        ('{"structure": "gblr", "seed": 1, "seed": 2}', r"duplicate key 'seed'"),
        (json.dumps({"structure": "x", **{f"k{i}": 0 for i in range(64)}}), r"at most 64 keys"),
    ],
)
def test_a_crafted_config_is_refused(converted, text, message):
    path, _ = converted
    edit(path, _set("__metadata__/config", text))
    with pytest.raises(GBLRFileError, match=message):
        gblr.load(path)


def test_a_config_this_gblr_cannot_read_leaves_the_model_loadable(converted):
    # The loader checks the form; the fields are the configs' business (a newer gblr, a
    # structure registered elsewhere): the model loads, reading the config says why not.
    path, _ = converted
    edit(path, _set("__metadata__/config", '{"structure": "gblr", "steps": 3}'))
    gblr.load(path)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['steps'\] for GBLRConfig"):
        gblr.ConversionConfig.from_file(path)
    edit(path, _set("__metadata__/config", '{"structure": "elsewhere"}'))
    with pytest.raises(ValueError, match="structure must be one of"):
        gblr.ConversionConfig.from_file(path)


def test_a_config_in_a_format_1_file_is_refused(converted):
    path, _ = converted
    edit(path, lambda header: header["__metadata__"].update(format_version="1"))
    with pytest.raises(GBLRFileError, match=r"unexpected \['config'\]"):
        gblr.load(path)


def test_saving_refuses_a_gblr_config_that_is_not_one(tmp_path):
    model = gblr.freeze(nn.Sequential(gblr.GBLRLinear(8, 4)).eval())
    model.gblr_config = {"structure": "gblr"}
    with pytest.raises(TypeError, match=r"model\.gblr_config must be a conversion config"):
        gblr.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
