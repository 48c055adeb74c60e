"""Property-based fuzzing of gblr.load (issue 20): random truncations, byte flips and
header edits (with the checksum recomputed, so that the checks behind it are reached)
end in a correct model or in the library's own error, never in another exception, and
never allocate the memory a crafted header asks for (the address space is capped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gblr
from gblr.deploy import GBLRFileError
from tests.deploy.crafting import join, resign, split
from tests.deploy.test_io_files import memory_cap  # noqa: F401 - a fixture

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_MODEL = None


def model() -> nn.Module:
    global _MODEL
    if _MODEL is None:
        torch.manual_seed(0)
        built = nn.Sequential(
            gblr.GBLRConv2d(2, 3, 3, padding=1, structure_init="half", init_cost=0.5),
            nn.Flatten(),
            gblr.GBLRLinear(3 * 2 * 2, 4, structure_init="half", init_cost=0.5),
            nn.LayerNorm(4),
            nn.Linear(4, 4),
            nn.Dropout(0.1),
            nn.Linear(4, 4),
        )
        built[6].weight = built[4].weight
        _MODEL = gblr.freeze(built.eval())
    return _MODEL


def check(path: Path) -> None:
    """Loading ends in the library's own error, in the one ValueError that asks for code
    (a file whose description was edited to ``null``), or in the model the file describes
    (an edit can describe another valid model: a padding of 2, a dropout of 0.5), holding
    exactly the file's tensors."""
    try:
        loaded = gblr.load(path)
    except GBLRFileError as error:
        assert str(error).startswith(f"cannot load {str(path)!r}: ")
        return
    except ValueError as error:
        assert type(error) is ValueError and "without code" in str(error), repr(error)
        return
    assert isinstance(loaded, nn.Module) and not loaded.training
    stored = gblr.deploy.load_checkpoint(path).state_dict()
    state = loaded.state_dict()
    assert state.keys() == stored.keys()
    assert all(torch.equal(state[key], stored[key]) for key in stored)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("fuzz")
    return gblr.save(model(), folder / "m.safetensors").read_bytes()


FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure is reproducible
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=st.data())
def test_truncations_and_byte_flips(original, tmp_path, memory_cap, data):  # noqa: F811
    damaged = bytearray(original)
    if data.draw(st.booleans(), label="truncate"):
        damaged = damaged[: data.draw(st.integers(0, len(damaged) - 1), label="length")]
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, 2**32), st.integers(1, 255)), max_size=4),
        label="flips",
    )
    for where, mask in flips:
        if damaged:
            damaged[where % len(damaged)] ^= mask
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(damaged))
    if bytes(damaged) != original:
        with pytest.raises(GBLRFileError):
            gblr.load(path)


# Values a crafted header puts anywhere: wrong types, huge and negative sizes, nesting.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20),
    st.sampled_from([-(2**63), 2**31, 2**40, 2**62, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["frozen", "shared", "Sequential", "Linear", "torch.float32", "F32", "0"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node, prefix=()):
    """Every place in a JSON tree: (path to the container, key or index)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (prefix, index)
            yield from _paths(value, (*prefix, index))


def _node(tree, path):
    for part in path:
        tree = tree[part]
    return tree


@FUZZ
@given(data=st.data())
def test_header_edits_with_a_recomputed_checksum(original, tmp_path, memory_cap, data):  # noqa: F811
    header, body = split(original)
    metadata = header["__metadata__"]
    metadata["structure"] = json.loads(metadata["structure"])
    places = sorted(_paths(header), key=repr)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        parent_path, key = data.draw(st.sampled_from(places), label="place")
        try:
            parent = _node(header, parent_path)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed it
        action = data.draw(st.sampled_from(["set", "delete", "add", "nudge"]), label="action")
        if not isinstance(parent, (dict, list)) or (
            isinstance(parent, list) and key >= len(parent)
        ):
            continue
        if isinstance(parent, dict) and key not in parent:
            continue
        if action == "set":
            parent[key] = data.draw(VALUES, label="value")
        elif action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6), label="new key")] = data.draw(VALUES)
        elif action == "add":
            parent.insert(key, data.draw(VALUES, label="inserted"))
        elif isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += data.draw(st.sampled_from([-1, 1, 7, 2**20, 2**40]), label="by")
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict) and not isinstance(metadata.get("structure", ""), str):
        try:
            metadata["structure"] = json.dumps(metadata["structure"], sort_keys=True)
        except (TypeError, ValueError):
            return  # a key json cannot write: not a file anyone can craft this way
    resign(header, body)
    path = tmp_path / "edited.safetensors"
    try:
        path.write_bytes(join(header, body))
    except (TypeError, ValueError):
        return
    check(path)
