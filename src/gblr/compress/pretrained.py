"""A save/load round trip for converted Hugging Face, sentence-transformers and timm models.

[`save_pretrained`][gblr.compress.pretrained.save_pretrained] writes a folder that
[`from_pretrained`][gblr.compress.pretrained.from_pretrained] loads in one call, with no code from
the user:

- ``config.json``: the base architecture's own config (transformers' ``config.json``;
  for timm the ``architecture``, ``num_classes`` and ``model_args`` of its Hub format);
- ``model.safetensors``: every tensor of the model (GBLR and baseline layers included),
  in gblr's safe container ([`gblr.deploy.io.save_tensors`][]: safetensors, a sha256
  over tensors and metadata, nothing pickled). Its metadata holds the library, the
  architecture, the base config and the *structure*: for every structured layer its
  class, what it replaced (``Linear``, ``Conv1D``, ``Conv2d``) and the shape parameters
  that the weights alone do not tell (components, ranks, intervals, each baseline
  family's blocks), so that loading searches nothing again;
- ``generation_config.json``: a transformers generation model's ``generation_config``
  (the defaults of ``generate``), restored on load;
- for a sentence-transformers model, the folder of ``SentenceTransformer.save`` whose
  transformer module's subfolder is such a folder.

A dense loader must never read such a folder as a dense model with randomly initialized
layers. So the weights file also holds, for every structured layer, an empty tensor
under the dense layer's own key (``<layer>.weight``, shape ``(0,)``) and an empty tensor
named ``gblr.load_with.gblr.from_pretrained``: transformers' ``from_pretrained`` (any
class: ``AutoModel``, ``BertModel``, a task head) refuses the folder with a size-mismatch
error whose report names that key, timm's strict loading refuses the unexpected keys, and
``SentenceTransformer(folder)`` refuses it through transformers. Trainer's checkpoint
resume, which loads ``model.safetensors`` non-strictly into the live converted model,
still works. [`gblr.convert`][] (and [`from_pretrained`][gblr.compress.pretrained.from_pretrained])
make a converted transformers model's own ``model.save_pretrained(folder)`` write this same folder.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..deploy.frozen import FrozenGBLRConv2d, FrozenGBLRLinear, FrozenGBLRMatrix
from ..deploy.io import (
    frozen_layer_entry,
    frozen_layer_from_entry,
    geometry_entry,
    load_tensors,
    matrix_shape_of,
    save_tensors,
    tensor_file_kind,
)
from ..files import save_atomically
from ..layers.conv import CONV_GEOMETRY, GBLRConv2d
from ..layers.linear import GBLRLinear
from ..modules import hf_conv1d_shape, set_submodule
from ..structured import (
    BlockDiagLinear,
    BlockSparseLinear,
    LowRankLinear,
    MonarchLinear,
    PixelflyLinear,
)
from .configs import config_from_dict
from .formats import CONFIG_NAME, FORMAT, FORMAT_VERSION, GENERATION_CONFIG_NAME, WEIGHTS_NAME
from .unload import REPLACED_ATTRIBUTE, is_structured

__all__ = [
    "FORMAT",
    "HINT_KEY",
    "apply_structure",
    "from_pretrained",
    "model_structure",
    "protect_save_pretrained",
    "save_pretrained",
]

#: An empty tensor of this name is in every weights file: a dense loader's report of
#: unexpected keys then says how to load the folder.
HINT_KEY = "gblr.load_with.gblr.from_pretrained"
LIBRARIES = ("transformers", "timm", "sentence-transformers")
_METADATA = ("format_version", "library", "architecture", "base_config", "structure", "dtype")
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
_LARGEST = 2**31 - 1

# Shape parameters of each class beyond in/out features, bias and dtype: read from the
# layer's attributes of the same name, passed back to its constructor by keyword.
_FAMILY_ARGS: dict[type, tuple[str, ...]] = {
    LowRankLinear: ("rank",),
    BlockDiagLinear: ("num_blocks",),
    MonarchLinear: ("nblocks", "rank"),
    BlockSparseLinear: ("block_size", "blocks"),
    PixelflyLinear: ("block_size", "rank", "butterfly_levels"),
}
_GBLR_ARGS = ("rank_per_component", "num_components", "evaluation_order")
_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (*_FAMILY_ARGS, GBLRLinear, GBLRConv2d, FrozenGBLRLinear, FrozenGBLRConv2d)
}
_REPLACED = ("Linear", "Conv1D", "Conv2d")


# --------------------------------------------------------------------------- structure
def _replaced(layer: nn.Module) -> str:
    if isinstance(layer, (GBLRConv2d, FrozenGBLRConv2d)):
        return "Conv2d"
    return getattr(layer, REPLACED_ATTRIBUTE, None) or "Linear"


def _describe(layer: nn.Module) -> dict[str, Any]:
    """The JSON description of one structured layer (without its names)."""
    kind = type(layer)
    if kind.__name__ not in _CLASSES or _CLASSES[kind.__name__] is not kind:
        raise TypeError(
            f"cannot describe a {kind.__name__}: save_pretrained knows the gblr layers "
            f"{sorted(_CLASSES)}"
        )
    if isinstance(layer, FrozenGBLRMatrix):
        entry = frozen_layer_entry(layer)
    else:
        entry = {"class": kind.__name__, "bias": layer.bias is not None}
        entry["dtype"] = str(next(p for p in layer.parameters() if p.is_floating_point()).dtype)
        if isinstance(layer, GBLRConv2d):
            entry.update(geometry_entry(layer))
        else:
            entry.update(in_features=layer.in_features, out_features=layer.out_features)
        for name in _GBLR_ARGS if isinstance(layer, GBLRConv2d | GBLRLinear) else ():
            entry[name] = getattr(layer, name)
        for name in _FAMILY_ARGS.get(kind, ()):
            value = layer.positions.tolist() if name == "blocks" else getattr(layer, name)
            entry[name] = value
    entry["replaced"] = _replaced(layer)
    return entry


def model_structure(model: nn.Module) -> dict[str, Any]:
    """The structure of every gblr layer of ``model``, as JSON-safe data.

    For each structured layer (GBLR in training or frozen form, or a baseline family's):
    its module name and the other names it is shared under, its class, what it replaced
    (``"Linear"``, ``"Conv1D"`` or ``"Conv2d"``) and the shape parameters that its
    weights do not tell (number of components and rank per component; a frozen layer's
    integer intervals; a family's rank, blocks or block positions). With the model's
    ``state_dict()`` (which holds the widths, locations and factors) it is everything
    [`apply_structure`][gblr.compress.pretrained.apply_structure] needs to rebuild the layers on a
    dense copy of the architecture, without converting again.

    Use it to make a checkpoint of a converted model restorable without the conversion
    (Lightning: store it in ``on_save_checkpoint``, apply it in ``on_load_checkpoint``,
    docs/guides/compress.md).

    Args:
        model: any ``nn.Module``.

    Returns:
        ``{"format_version": 1, "layers": [{"name", "aliases", "class", "replaced",
        ...}]}``; ``layers`` is empty for a model without gblr layers.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
        >>> _ = gblr.convert(model, gblr.LowRankConfig(budget=0.5))
        >>> layer = gblr.model_structure(model)["layers"][0]
        >>> layer["name"], layer["class"], layer["rank"], layer["replaced"]
        ('0', 'LowRankLinear', 8, 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names: dict[int, list[str]] = {}
    layers: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_structured(module):
            names.setdefault(id(module), []).append(name)
            layers[id(module)] = module
    entries = []
    for key, module in layers.items():
        first, *aliases = names[key]
        entries.append({"name": first, "aliases": aliases, **_describe(module)})
    return {"format_version": 1, "layers": entries}


def _check(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        text = repr(value)
        raise ValueError(f"{where} must be {expected}, got {text[:80]}")


def _positive(value: Any, where: str, minimum: int = 1) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= _LARGEST
    _check(ok, where, f"an int in [{minimum}, {_LARGEST}]", value)
    return value


def _pairs(entry: dict[str, Any], where: str) -> None:
    for name in ("kernel_size", "stride", "dilation"):
        value = entry[name]
        _check(isinstance(value, list) and len(value) == 2, f"{where}.{name}", "a pair", value)
        for side in value:
            _positive(side, f"{where}.{name}")
    padding = entry["padding"]
    if isinstance(padding, str):
        _check(padding in ("valid", "same"), f"{where}.padding", "'valid' or 'same'", padding)
    else:
        _check(
            isinstance(padding, list) and len(padding) == 2, f"{where}.padding", "a pair", padding
        )
        for side in padding:
            _positive(side, f"{where}.padding", minimum=0)


def _keys_of(kind: type) -> set[str]:
    keys = {"class", "bias", "dtype"}
    keys |= set(CONV_GEOMETRY) if kind is GBLRConv2d else {"in_features", "out_features"}
    if kind in (GBLRLinear, GBLRConv2d):
        keys |= set(_GBLR_ARGS)
    return keys | set(_FAMILY_ARGS.get(kind, ()))


def _build(entry: dict[str, Any], where: str) -> nn.Module:
    """A layer of a (checked) description, on the CPU, its parameters to be loaded."""
    kind = _CLASSES[entry["class"]]
    if issubclass(kind, FrozenGBLRMatrix):
        return frozen_layer_from_entry(entry, where)
    expected = _keys_of(kind)
    if set(entry) != expected:
        raise ValueError(
            f"{where} must have exactly the keys {sorted(expected)}, got {sorted(entry)}"
        )
    _check(isinstance(entry["bias"], bool), f"{where}.bias", "true or false", entry["bias"])
    dtype = entry["dtype"]
    _check(dtype in _DTYPES, f"{where}.dtype", f"one of {sorted(_DTYPES)}", dtype)
    arguments = {k: v for k, v in entry.items() if k not in ("class", "dtype")}
    if kind is GBLRConv2d:
        _pairs(entry, where)
        for name in ("in_channels", "out_channels"):
            _positive(entry[name], f"{where}.{name}")
        arguments.update({name: tuple(v) for name, v in arguments.items() if isinstance(v, list)})
    else:
        for name in ("in_features", "out_features"):
            _positive(entry[name], f"{where}.{name}")
    for name in ("rank_per_component", "num_components", "rank", "num_blocks", "nblocks"):
        if name in entry:
            _positive(entry[name], f"{where}.{name}", minimum=0 if kind is PixelflyLinear else 1)
    if "block_size" in entry:
        _positive(entry["block_size"], f"{where}.block_size")
    if "butterfly_levels" in entry:
        _positive(entry["butterfly_levels"], f"{where}.butterfly_levels", minimum=0)
    if "blocks" in entry:
        blocks = entry["blocks"]
        _check(isinstance(blocks, list), f"{where}.blocks", "a list of [row, column]", blocks)
        for block in blocks:
            _check(isinstance(block, list) and len(block) == 2, f"{where}.blocks", "pairs", block)
            for index in block:
                _positive(index, f"{where}.blocks", minimum=0)
    if "evaluation_order" in entry:
        order = entry["evaluation_order"]
        _check(order in ("auto", "materialize", "factored"), f"{where}.evaluation_order",
               "'auto', 'materialize' or 'factored'", order)  # fmt: skip
    _check_sizes(kind, entry, where)
    try:
        sizes = (
            ("in_channels", "out_channels")
            if kind is GBLRConv2d
            else ("in_features", "out_features")
        )
        in_size, out_size = (arguments.pop(name) for name in sizes)
        return kind(in_size, out_size, dtype=_DTYPES[dtype], **arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} describes no valid {kind.__name__}: {error}") from None


def _check_sizes(kind: type, entry: dict[str, Any], where: str) -> None:
    """Refuse a description whose parameters would be far larger than its dense matrix
    (a crafted file must not make the loader allocate without bound)."""
    if kind is GBLRConv2d:
        rows = entry["out_channels"]
        cols = entry["in_channels"] * math.prod(entry["kernel_size"])
    else:
        rows, cols = entry["out_features"], entry["in_features"]
    rank = entry.get("rank_per_component", 1) * entry.get("num_components", 1)
    rank *= entry.get("nblocks", 1) * max(entry.get("rank", 1), 1)
    blocks = len(entry.get("blocks", [])) * entry.get("block_size", 1) ** 2
    if rank * (rows + cols) + blocks > 64 * rows * cols + 2**20:
        raise ValueError(
            f"{where} describes a layer far larger than its {rows}x{cols} dense matrix; the "
            "file is damaged or was not written by gblr"
        )


def _matrix_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of a dense layer a structured layer can stand in for, or of a
    structured layer; ``None`` for anything else."""
    if is_structured(module):
        return module.matrix_shape
    conv1d = hf_conv1d_shape(module)
    return conv1d if conv1d is not None else matrix_shape_of(module)


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Put the structured layers a [`model_structure`][gblr.compress.pretrained.model_structure]
    describes into ``model``, in
    place: each named module (a dense ``nn.Linear``/``nn.Conv2d``/``Conv1D`` of the same
    matrix shape, or a structured layer) is replaced by a new layer of the described
    class and shape, on the device of the module it replaces, its values to be loaded
    from a state dict (``model.load_state_dict(state, strict=True)``). Nothing is fitted
    or searched.

    Args:
        model: the architecture the structure was taken from, dense (freshly built) or
            already structured.
        structure: what [`model_structure`][gblr.compress.pretrained.model_structure] returned
            (plain JSON data).

    Returns:
        ``model``.

    Raises:
        ValueError: a malformed description, a name that is not in the model, or a module
            there of another kind or matrix shape (the message names it).

    Examples:
        >>> import torch, gblr
        >>> def build():
        ...     return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
        >>> model = build()
        >>> _ = gblr.convert(model, gblr.GBLRConfig(budget=0.5))
        >>> structure, state = gblr.model_structure(model), model.state_dict()
        >>> restored = gblr.apply_structure(build(), structure)
        >>> _ = restored.load_state_dict(state)  # no conversion run again
        >>> x = torch.randn(2, 32)
        >>> bool(torch.equal(restored.eval()(x), model.eval()(x)))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check(isinstance(structure, dict), "the structure", "a JSON object", structure)
    _check(
        set(structure) == {"format_version", "layers"} and structure["format_version"] == 1,
        "the structure",
        "an object with format_version 1 and layers",
        sorted(structure),
    )
    _check(isinstance(structure["layers"], list), "the structure's layers", "a list", None)
    replacements = []
    for index, raw in enumerate(structure["layers"]):
        where = f"layers[{index}]"
        _check(isinstance(raw, dict), where, "a JSON object", raw)
        entry = dict(raw)
        names = [entry.pop("name", None), *(entry.pop("aliases", None) or [])]
        replaced = entry.pop("replaced", None)
        _check(replaced in _REPLACED, f"{where}.replaced", f"one of {_REPLACED}", replaced)
        _check(entry.get("class") in _CLASSES, f"{where}.class", f"one of {sorted(_CLASSES)}",
               entry.get("class"))  # fmt: skip
        for name in names:
            _check(isinstance(name, str) and bool(name), f"{where}.name", "a module name", name)
        layer = _build(entry, where)
        for name in names:
            try:
                current = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"{where}: the model ({type(model).__name__}) has no module {name!r} "
                    f"(a {entry['class']} in the structure); is it the architecture the "
                    "structure was saved from?"
                ) from None
            if _matrix_shape(current) != layer.matrix_shape:
                raise ValueError(
                    f"{where}: module {name!r} of the model is a {type(current).__name__} "
                    f"with matrix shape {_matrix_shape(current)}; the structure has a "
                    f"{entry['class']} of shape {layer.matrix_shape} there"
                )
        device = next(iter(current.parameters()), torch.empty(0)).device
        layer = layer.to(device)
        if replaced != "Linear" and replaced != "Conv2d":
            setattr(layer, REPLACED_ATTRIBUTE, replaced)
        replacements.append((names, layer.train(current.training)))
    for names, layer in replacements:
        for name in names:
            set_submodule(model, name, layer)
    return protect_save_pretrained(model)  # as convert's: its save_pretrained writes gblr's


# --------------------------------------------------------------------------- libraries
def _transformers_model_class() -> type | None:
    # A transformers model exists only once the module defining its base class has been
    # imported; `transformers.PreTrainedModel` itself would import it (seconds) whenever
    # the lazy top-level package is loaded, as other libraries do.
    module = sys.modules.get("transformers.modeling_utils")
    return None if module is None else module.PreTrainedModel


def _library(model: nn.Module) -> str:
    kind = type(model)
    if kind.__module__.startswith("sentence_transformers"):
        return "sentence-transformers"
    pretrained = _transformers_model_class()
    if pretrained is not None and isinstance(model, pretrained):
        return "transformers"
    if kind.__module__.startswith("timm.") and hasattr(model, "pretrained_cfg"):
        return "timm"
    raise TypeError(
        f"save_pretrained saves transformers, sentence-transformers and timm models, got a "
        f"{kind.__module__}.{kind.__name__}; for other models use gblr.save (frozen) or "
        "gblr.model_structure with the state dict"
    )


def _base_config(model: nn.Module, library: str, model_args: dict[str, Any] | None):
    """``(architecture, config dict)`` of the base architecture."""
    if library == "transformers":
        if model_args is not None:
            raise ValueError("model_args is for timm models (a transformers config says it all)")
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        return type(model).__name__, config
    architecture = model.pretrained_cfg.get("architecture") or type(model).__name__.lower()
    args = dict(model_args or {})
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"model_args must be JSON data (ints, strings, lists...): {error}"
        ) from None
    config = {
        "architecture": architecture,
        "num_classes": getattr(model, "num_classes", None),
        "num_features": getattr(model, "num_features", None),
        "model_args": args,
        "pretrained_cfg": {k: v for k, v in model.pretrained_cfg.items() if _json_safe(v)},
    }
    return architecture, config


def _check_rebuilds(
    model: nn.Module, architecture: str, config: dict[str, Any], structure: dict[str, Any]
) -> None:
    """Refuse to save a timm model that its saved ``architecture`` and ``model_args`` would
    not rebuild (a model created with other arguments, which ``model_args`` must repeat):
    the base model is built on the meta device and every tensor outside the converted
    layers compared by shape."""
    try:
        with torch.device("meta"):
            base = _base_model("timm", architecture, config, "save_pretrained:")
    except ValueError:  # a model whose construction reads values (.item(), .tolist())
        base = _base_model("timm", architecture, config, "save_pretrained:")
    layers = structure["layers"]
    converted = tuple(f"{name}." for entry in layers for name in (entry["name"], *entry["aliases"]))
    own = model.state_dict()
    rebuilt = base.state_dict()
    differ = [
        f"{key} {tuple(own[key].shape)} here, {tuple(value.shape)} rebuilt"
        for key, value in rebuilt.items()
        if key in own and not key.startswith(converted) and own[key].shape != value.shape
    ]
    unmatched = sorted(set(own).symmetric_difference(rebuilt))
    differ += [
        f"{key} only {'here' if key in own else 'rebuilt'}"
        for key in unmatched
        if not key.startswith(converted)
    ][:3]
    for entry in layers:  # a converted layer: the dense weight it replaced
        if entry["class"] == "GBLRConv2d":
            shape = (entry["out_channels"], entry["in_channels"], *entry["kernel_size"])
        elif "out_features" in entry and "in_features" in entry:
            shape = (entry["out_features"], entry["in_features"])
        else:
            continue
        found = rebuilt.get(f"{entry['name']}.weight")
        if found is not None and tuple(found.shape) != shape:
            differ.append(f"{entry['name']} {shape} here, {tuple(found.shape)} rebuilt")
    if differ:
        raise ValueError(
            f"save_pretrained: timm.create_model({architecture!r}, "
            f"**{config['model_args']!r}) builds another model than this one "
            f"({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}), so the folder "
            "would not load; pass model_args= with the keyword arguments the model was "
            "created with (img_size=, embed_dim=, depth=, ...)"
        )


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _weights_state(
    model: nn.Module, structure: dict[str, Any], state: dict[str, Tensor] | None
) -> dict[str, Tensor]:
    """The tensors to store: the state dict, an empty tensor under every structured
    layer's dense ``weight`` key (a dense loader then refuses the file), and the hint."""
    own = model.state_dict()
    if state is not None:
        _check_same_state(own, state)
    tensors = dict(own if state is None else state)
    for entry in structure["layers"]:
        for name in (entry["name"], *entry["aliases"]):
            key = f"{name}.weight"
            if key in tensors:
                raise ValueError(f"the state dict has {key!r}, a structured layer has no weight")
            tensors[key] = torch.empty(0)
    tensors[HINT_KEY] = torch.empty(0)
    return tensors


def _check_same_state(own: dict[str, Tensor], state: object) -> None:
    """``ValueError`` unless ``state`` holds tensors under exactly ``own``'s keys, of its
    shapes: a folder saved from another state could not be loaded back, and replacing an
    earlier save with it would lose that save."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise TypeError(
            f"state_dict must be a dict of tensors (the model's state_dict()), got "
            f"{type(state).__name__}"
        )
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [
        f"{key} {list(state[key].shape)} (the model's {list(own[key].shape)})"
        for key in sorted(own.keys() & state.keys())
        if state[key].shape != own[key].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        ]
        raise ValueError(
            "state_dict must have the model's keys and shapes (from_pretrained could not "
            f"load the folder back); nothing was written. {'; '.join(parts)}"
        )


def _is_gblr_folder(directory: Path) -> bool:
    if tensor_file_kind(directory / WEIGHTS_NAME) == FORMAT:
        return True
    return (directory / "modules.json").is_file() and any(
        tensor_file_kind(path) == FORMAT for path in directory.glob(f"*/{WEIGHTS_NAME}")
    )


def _target_folder(save_directory: str | os.PathLike, overwrite: bool, files: list[str]) -> Path:
    """The folder to write ``files`` into, refusing to replace what is not ours."""
    if not isinstance(save_directory, (str, os.PathLike)) or os.fspath(save_directory) in ("", b""):
        raise TypeError(f"save_directory must name a folder, got {save_directory!r}")
    directory = Path(save_directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{str(directory)!r} is a file; give a folder")
    if directory.is_dir() and not overwrite and not _is_gblr_folder(directory):
        clashes = [name for name in files if (directory / name).exists()]
        if clashes:
            raise FileExistsError(
                f"{str(directory)!r} already holds {clashes}, not written by "
                "gblr.save_pretrained: they are not replaced unless you pass overwrite=True "
                "(other files in the folder are never touched)"
            )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _write_folder(
    model: nn.Module,
    directory: Path,
    library: str,
    model_args: dict[str, Any] | None,
    state: dict[str, Tensor] | None = None,
) -> None:
    architecture, config = _base_config(model, library, model_args)
    structure = model_structure(model)
    tensors = _weights_state(model, structure, state)
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    metadata = {
        "format_version": FORMAT_VERSION,
        "library": library,
        "architecture": architecture,
        "base_config": json.dumps(config, sort_keys=True, allow_nan=False),
        "structure": json.dumps(structure, sort_keys=True),
        "dtype": str(max(set(dtypes), key=dtypes.count) if dtypes else torch.float32),
    }
    conversion = getattr(model, "gblr_config", None)
    if conversion is not None and callable(getattr(conversion, "to_dict", None)):
        metadata["conversion_config"] = json.dumps(conversion.to_dict(), sort_keys=True)
    save_tensors(tensors, directory / WEIGHTS_NAME, metadata, kind=FORMAT)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    save_atomically(lambda handle: handle.write(text), directory / CONFIG_NAME, text=True)
    generation = _generation_config(model, library)
    if generation is not None:
        settings = generation.to_json_string(use_diff=True)
        save_atomically(
            lambda handle: handle.write(settings), directory / GENERATION_CONFIG_NAME, text=True
        )


def _generation_config(model: nn.Module, library: str) -> Any:
    """A transformers generation model's ``generation_config`` (what ``generate`` uses
    by default), or ``None`` for other models."""
    if library != "transformers":
        return None
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        return None
    return getattr(model, "generation_config", None)


def _files_of(model: nn.Module, library: str) -> list[str]:
    """The files [`save_pretrained`][gblr.compress.pretrained.save_pretrained] writes for
    ``model`` (besides a sentence-transformer's)."""
    files = [WEIGHTS_NAME, CONFIG_NAME]
    if _generation_config(model, library) is not None:
        files.append(GENERATION_CONFIG_NAME)
    return files


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    model_args: dict[str, Any] | None = None,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Save a converted (or frozen) transformers, sentence-transformers or timm model so
    that [`gblr.from_pretrained`][] loads it in one call.

    The folder holds the base architecture's own config (``config.json``) and
    ``model.safetensors`` with every tensor and the structure of every gblr layer (see
    `gblr.compress.pretrained`): nothing is pickled, nothing is searched again on
    load. Works for GBLR layers in training form, frozen ones ([`gblr.freeze`][]) and
    every baseline family's layers, and for models with no gblr layer at all. Dense
    loaders (``AutoModel.from_pretrained``, ``SentenceTransformer(...)``, timm) refuse
    the folder with an error instead of loading random layers.

    Each file is written to a temporary name and renamed into place. As with Hugging
    Face's ``save_pretrained``, an existing folder is written into and its other files
    are left alone, and a folder saved by ``gblr.save_pretrained`` before is updated; but
    files of another model (a dense ``model.safetensors`` or ``config.json``) are not
    replaced unless ``overwrite=True``.

    Args:
        model: a ``transformers.PreTrainedModel``, a ``SentenceTransformer`` or a timm
            model, typically after [`gblr.convert`][] (and training, or
            [`gblr.freeze`][]).
        save_directory: the folder (created when missing).
        overwrite: replace a ``config.json``/``model.safetensors`` (and, for
            sentence-transformers, the files it saves) that gblr did not write.
        model_args: timm only: the keyword arguments the model was created with
            (``timm.create_model(name, **model_args)``: ``img_size``, ``depth``...), as
            timm's own Hub format stores them; ``num_classes`` is stored anyway.
        state_dict: the tensors to store instead of ``model.state_dict()`` (what
            ``Trainer`` passes to ``save_pretrained``); same keys.

    Returns:
        The folder.

    Raises:
        TypeError: not a supported model, or ``model_args`` not JSON data.
        ValueError: a timm model that ``timm.create_model(architecture, **model_args)``
            does not rebuild (another shape of a tensor outside the converted layers, or
            of a converted layer's weight): checked on the meta device before anything
            is written.
        FileExistsError: the folder holds another model's files and ``overwrite`` is
            false.
        NotADirectoryError: ``save_directory`` is a file.

    Examples:
        >>> import tempfile, torch, gblr, transformers
        >>> config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100)
        >>> model = transformers.BertModel(config).eval()
        >>> _ = gblr.convert(model, gblr.GBLRConfig(budget=0.5))
        >>> folder = gblr.save_pretrained(model, tempfile.mkdtemp())
        >>> loaded = gblr.from_pretrained(folder)  # no factory, no conversion
        >>> ids = torch.tensor([[1, 5, 7, 2]])
        >>> bool(torch.allclose(loaded(ids).last_hidden_state,
        ...                     model(ids).last_hidden_state, atol=1e-6))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    library = _library(model)
    if library == "sentence-transformers":
        if model_args is not None or state_dict is not None:
            raise ValueError("model_args and state_dict are not taken for sentence-transformers")
        return _save_sentence_transformer(model, save_directory, overwrite)
    if library == "timm":  # before the folder is made
        _check_rebuilds(model, *_base_config(model, library, model_args), model_structure(model))
    directory = _target_folder(save_directory, overwrite, _files_of(model, library))
    _write_folder(model, directory, library, model_args, state_dict)
    return directory


def _save_sentence_transformer(model: nn.Module, save_directory, overwrite: bool) -> Path:
    """``model.save`` into a staging folder (its transformer modules through
    [`save_pretrained`][gblr.compress.pretrained.save_pretrained]), then every file renamed into the
    target."""
    probe = (
        Path(save_directory).expanduser()
        if isinstance(save_directory, (str, os.PathLike))
        else None
    )
    protect_save_pretrained(model)
    with _staging(probe) as stage:
        model.save(str(stage))
        files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        directory = _target_folder(save_directory, overwrite, files)
        for name in files:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, directory / name)
    return directory


@contextlib.contextmanager
def _staging(target: Path | None):
    parent = target.parent if target is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name if target else 'st'}.gblr-", dir=parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _hf_save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *args: Any,
    is_main_process: bool = True,
    state_dict: dict[str, Tensor] | None = None,
    push_to_hub: bool = False,
    overwrite: bool = False,
    **kwargs: Any,
) -> None:
    """``model.save_pretrained`` of a converted transformers model: the gblr folder
    (``overwrite`` as [`save_pretrained`][gblr.compress.pretrained.save_pretrained]'s;
    transformers' other options warn that they are not used)."""
    if push_to_hub:
        raise NotImplementedError(
            "a converted model's save_pretrained writes a gblr folder and does not push it; "
            "save it, then upload the folder (huggingface_hub.upload_folder)"
        )
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    # (safe_serialization=True, what Trainer passes, is what the folder is anyway)
    ignored = [f"{k}={v!r}" for k, v in kwargs.items() if not (k == "safe_serialization" and v)]
    if args or ignored:
        shown = ", ".join([*(repr(a) for a in args), *ignored])
        warnings.warn(
            f"save_pretrained of a gblr model does not use {shown}: it writes one "
            "model.safetensors holding the structure (gblr.save_pretrained)",
            UserWarning,
            stacklevel=2,
        )
    if is_main_process:
        directory = _target_folder(save_directory, overwrite, _files_of(model, "transformers"))
        _write_folder(model, directory, "transformers", None, state_dict)


def protect_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``save_pretrained`` of every transformers model in ``model`` that holds gblr
    layers write the folder of [`save_pretrained`][gblr.compress.pretrained.save_pretrained] (an
    instance attribute), and guard transformers' ``PreTrainedModel.save_pretrained``
    itself (once) so that a model ``model`` sits in (the task model around a converted
    ``model.bert``, the ``BertModel`` of a converted ``model.encoder``) does the same
    while it holds gblr layers; a model without them saves as transformers does.
    [`gblr.convert`][] and [`from_pretrained`][gblr.compress.pretrained.from_pretrained]
    call it, and [`gblr.merge_and_unload`][] undoes the instance attribute. Without
    transformers loaded, nothing to do.

    Returns:
        ``model``.
    """
    pretrained = _transformers_model_class()
    if pretrained is None:
        return model
    _guard_pretrained_save(pretrained)
    # the instance attribute too: a model class with a save_pretrained of its own (a few
    # transformers models override it) would not reach the guarded one
    for module in model.modules():
        if isinstance(module, pretrained) and any(is_structured(m) for m in module.modules()):
            module.save_pretrained = functools.partial(_hf_save_pretrained, module)
    return model


def _guard_pretrained_save(pretrained: type) -> None:
    """Wrap ``pretrained.save_pretrained`` (transformers' ``PreTrainedModel``) once: a
    model holding gblr layers writes the gblr folder, any other saves unchanged.

    A model that only holds a converted part never had its own ``save_pretrained``
    protected, and wrote a plain folder that transformers' loaders read as the dense
    model with the converted layers drawn at random (a warning in the log at most).
    """
    original = inspect.getattr_static(pretrained, "save_pretrained", None)
    if original is None or getattr(original, "_gblr_guard", False):
        return

    @functools.wraps(original)
    def save_pretrained(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any):
        if any(is_structured(module) for module in self.modules()):
            return _hf_save_pretrained(self, save_directory, *args, **kwargs)
        return original(self, save_directory, *args, **kwargs)

    save_pretrained._gblr_guard = True  # type: ignore[attr-defined]
    pretrained.save_pretrained = save_pretrained


# --------------------------------------------------------------------------- load
def _folder_argument(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)) or os.fspath(directory) in ("", b""):
        raise TypeError(f"directory must name a folder, got {directory!r}")
    path = Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such folder: {str(path)!r}")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{str(path)!r} is a file; give the folder gblr.save_pretrained wrote"
        )
    return path


def from_pretrained(directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Load a folder written by [`gblr.save_pretrained`][] (or by the
    ``save_pretrained`` of a converted transformers model), in eval mode.

    The base architecture is built from the stored config (transformers: the model
    class named in the file, from its config; timm: ``timm.create_model(architecture,
    num_classes=..., **model_args)``; sentence-transformers: the saved modules), the
    stored structure is applied ([`apply_structure`][gblr.compress.pretrained.apply_structure],
    nothing is searched) and every tensor is loaded strictly and verified (sha256). Nothing is
    unpickled or executed
    from the folder: the architecture is a class of the installed library.

    Args:
        directory: the folder.
        device: where to put the model.

    Returns:
        The model, in eval mode, with the dtype it was saved in; its
        ``save_pretrained`` (transformers) writes a gblr folder again.

    Raises:
        FileNotFoundError, NotADirectoryError, TypeError: not a folder.
        ValueError: not a gblr folder (a dense model: load it with its library), or its
            files are damaged, edited or inconsistent (``GBLRFileError``, a
            ``ValueError``, names the file and the reason).
        ImportError: the model's library is not installed.

    Examples:
        >>> import tempfile, warnings, torch, gblr, transformers
        >>> config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
        >>> model = transformers.GPT2LMHeadModel(config).eval()
        >>> with warnings.catch_warnings():  # the head tied to the embedding stays dense
        ...     warnings.simplefilter("ignore")
        ...     _ = gblr.convert(model, gblr.LowRankConfig(budget=0.5))
        >>> folder = tempfile.mkdtemp()
        >>> model.save_pretrained(folder)  # after convert: the gblr folder
        >>> loaded = gblr.from_pretrained(folder)
        >>> type(loaded.transformer.h[0].mlp.c_fc).__name__
        'LowRankLinear'
        >>> try:  # a dense loader refuses it instead of loading random layers
        ...     _ = transformers.GPT2LMHeadModel.from_pretrained(folder)
        ... except RuntimeError:
        ...     print("refused")
        refused
    """
    folder = _folder_argument(directory)
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(
            f"device must be a str, torch.device or int (such as 'cpu', 'cuda:0'), got {device!r}"
        )
    try:
        device = torch.device(device)
    except RuntimeError as error:  # (checked before the folder is read)
        raise ValueError(f"device: {device!r} is not a device torch knows ({error})") from None
    weights = folder / WEIGHTS_NAME
    if (folder / "modules.json").is_file():
        return _load_sentence_transformer(folder, device)
    kind = tensor_file_kind(weights)
    if kind != FORMAT:
        found = (
            f"no {WEIGHTS_NAME}"
            if not weights.is_file()
            else f"a {WEIGHTS_NAME} that gblr did not write"
        )
        raise ValueError(
            f"{str(folder)!r} is not a folder written by gblr.save_pretrained (it has {found}); "
            "a dense model loads with its own library (transformers' from_pretrained, "
            "timm.create_model)"
        )
    return _load_folder(folder).to(device).eval()


def _load_folder(folder: Path) -> nn.Module:
    weights = folder / WEIGHTS_NAME
    tensors, metadata = load_tensors(weights, kind=FORMAT)
    where = f"cannot load {str(weights)!r}:"
    missing = [key for key in _METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{where} its metadata lacks {missing}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{where} format version {metadata['format_version']!r}; this gblr reads "
            f"{FORMAT_VERSION!r} (a newer gblr may read it)"
        )
    library, architecture = metadata["library"], metadata["architecture"]
    if library not in ("transformers", "timm") or metadata["dtype"] not in _DTYPES:
        raise ValueError(f"{where} unknown library {library!r} or dtype {metadata['dtype']!r}")
    try:
        config = json.loads(metadata["base_config"])
        structure = json.loads(metadata["structure"])
    except ValueError as error:
        raise ValueError(f"{where} its config or structure is not JSON ({error})") from None
    _check(isinstance(config, dict), f"{where} the base config", "a JSON object", config)
    model = _base_model(library, architecture, config, where)
    model = model.to(_DTYPES[metadata["dtype"]])
    try:
        apply_structure(model, structure)
    except ValueError as error:
        raise ValueError(f"{where} {error}") from None
    dense_keys = {f"{n}.weight" for e in structure["layers"] for n in (e["name"], *e["aliases"])}
    state = {k: v for k, v in tensors.items() if k != HINT_KEY and k not in dense_keys}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{where} its tensors do not match the {architecture} rebuilt from its config "
            f"and structure: {str(error)[:600]}"
        ) from None
    _keep_saved_dtypes(model, state)
    generation = folder / GENERATION_CONFIG_NAME
    if library == "transformers" and generation.is_file():
        model.generation_config = _read_generation_config(generation, where)
    if "conversion_config" in metadata:
        with contextlib.suppress(ValueError, TypeError):
            model.gblr_config = config_from_dict(json.loads(metadata["conversion_config"]))
    return protect_save_pretrained(model)


def _keep_saved_dtypes(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give every floating parameter and buffer the dtype it was saved in: the model was
    cast to the file's most common dtype, so a bfloat16 model's float32 LayerNorms (kept
    so by AMP or transformers) came back rounded to bfloat16. Through ``.data``, so that
    tied parameters stay one."""
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for key, value in named:
        saved = state.get(key)
        if saved is not None and saved.is_floating_point() and saved.dtype != value.dtype:
            value.data = saved.to(value.device)


def _read_generation_config(path: Path, where: str) -> Any:
    """The ``GenerationConfig`` saved beside the weights."""
    import transformers

    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
        return transformers.GenerationConfig.from_dict(settings)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{where} unreadable {path.name} ({error})") from None


def _base_model(library: str, architecture: str, config: dict[str, Any], where: str):
    if library == "transformers":
        try:
            import transformers
        except ImportError as error:
            raise ImportError(
                f"{where} the model needs transformers: pip install 'gblr[hf]'"
            ) from error
        cls = getattr(transformers, architecture, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(
                f"{where} {architecture!r} is not a transformers model class of this "
                f"transformers ({transformers.__version__})"
            )
        try:
            base = cls.config_class.from_dict(dict(config))
            with _quiet_transformers():
                return cls(base)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(
                f"{where} cannot build {architecture} from its config: {error}"
            ) from None
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"{where} the model needs timm: pip install timm") from error
    args = config.get("model_args") or {}
    _check(isinstance(args, dict), f"{where} model_args", "a JSON object", args)
    if config.get("num_classes") is not None:
        args = {**args, "num_classes": config["num_classes"]}
    try:
        return timm.create_model(architecture, pretrained=False, **args)
    except (RuntimeError, TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{where} timm cannot build {architecture!r}: {error}") from None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at errors only (its load report of the deliberately
    mismatched keys is noise here)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _load_sentence_transformer(folder: Path, device) -> nn.Module:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            f"{str(folder)!r} is a sentence-transformers folder: pip install sentence-transformers"
        ) from error
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        paths = [entry["path"] for entry in modules if str(entry["type"]).endswith("Transformer")]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{str(folder)!r}: unreadable modules.json ({error})") from None
    ours = [p for p in paths if tensor_file_kind(folder / p / WEIGHTS_NAME) == FORMAT]
    if not ours:
        raise ValueError(
            f"{str(folder)!r} is a sentence-transformers folder not written by "
            "gblr.save_pretrained; load it with SentenceTransformer(folder)"
        )
    loaded = {path: _load_folder(folder / path) for path in ours}
    # The dense skeleton: its structured layers' keys mismatch on purpose (the refusal
    # above), so transformers is told to accept them; every such module is then replaced.
    with _quiet_transformers():
        model = SentenceTransformer(
            str(folder), device="cpu", model_kwargs={"ignore_mismatched_sizes": True}
        )
    for index, entry in enumerate(modules):
        if entry.get("path") in loaded:
            model[index].model = loaded[entry["path"]]
    return protect_save_pretrained(model.to(device).eval())
