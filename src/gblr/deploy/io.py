"""Save and load frozen GBLR models: safetensors for the tensors, JSON for the structure.

File layout: one ``.safetensors`` file. The tensors are the model's ``state_dict()``
(tensors shared between several keys, tied weights, are stored once). The safetensors
header's ``__metadata__`` (string values only) holds:

- ``format``: ``"gblr.frozen"``, ``format_version``: ``"2"``, ``gblr_version``;
- ``structure``: JSON with ``layers`` (for every frozen GBLR layer: module name, other
  names it is shared under, class, shape arguments, rank, integer intervals, dtype, plan
  and timed plan choices), ``aliases`` (state-dict keys stored under another key: tied
  weights), ``root`` (class name of the saved model) and ``model``: a description from
  which [`load`][gblr.deploy.io.load] can rebuild the model without code, or ``null`` (see
  [`load`][gblr.deploy.io.load]);
- ``config`` (optional, from gblr 0.2): JSON of the conversion config that made the
  model (``model.gblr_config``, set by [`gblr.convert`][]; a flat object with its
  ``structure`` name, [`gblr.ConversionConfig.to_dict`][]), read back by
  [`gblr.ConversionConfig.from_file`][];
- ``sha256``: hex digest of every other metadata entry (the versions included) followed
  by every stored tensor (name, dtype, shape, byte count, bytes) in sorted name order, so
  a file that was truncated, or whose tensors, structure or versions were changed after
  saving, is refused. (It detects damage and accidental edits; it is not a signature.)

Reading trusts nothing in the file: the header is checked field by field (types, allowed
keys, ranges, nesting) before anything is built, every tensor's byte count must match its
dtype and shape and the data must fill the file exactly, and the model is built on the
``meta`` device and compared with the stored tensors before any memory is allocated for
it, so a crafted file makes [`load`][gblr.deploy.io.load] allocate no more than a small multiple of
its own size, and anything wrong is a [`GBLRFileError`][gblr.deploy.io.GBLRFileError]. Nothing from
the file is
executed or unpickled: the model description names only a fixed set of ``torch.nn``
classes. Files of format version ``"1"`` (whose checksum did not cover the versions) are
still read.

Loading needs only torch, safetensors and the frozen layers: no learner, no Gaudi masks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import save_atomically
from ..layers.conv import CONV_GEOMETRY, GBLRConv2d
from ..layers.linear import GBLRLinear
from ..modules import hf_conv1d_shape
from .frozen import PLAN_CHOICES, FrozenGBLRConv2d, FrozenGBLRLinear, FrozenGBLRMatrix

__all__ = [
    "FORMAT",
    "FrozenCheckpoint",
    "GBLRFileError",
    "frozen_layer_entry",
    "frozen_layer_from_entry",
    "is_gblr_file",
    "load",
    "load_checkpoint",
    "load_tensors",
    "matrix_shape_of",
    "save",
    "save_tensors",
    "tensor_file_kind",
]

FORMAT = "gblr.frozen"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")

# Module parameters are floating point; stored tensors may be of any safetensors dtype.
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
_STORED_DTYPES = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, name)
}
_METADATA_KEYS = {"format", "format_version", "gblr_version", "structure", "sha256"}
_OPTIONAL_METADATA_KEYS = {"config"}  # format version 2 only
# Entries of the conversion config: a flat JSON object of a few options.
_MAX_CONFIG_KEYS = 64
# safetensors' own limit: a larger header is not one that a real model needs.
_MAX_HEADER_BYTES = 100_000_000
# Largest size accepted for one dimension of a layer, and for a rank.
_MAX_SIZE = 2**31 - 1
_MAX_TENSOR_DIMS = 16
# Nesting of the model description (Sequential in Sequential ...).
_MAX_DEPTH = 64


class GBLRFileError(ValueError):
    """A file given to [`load`][gblr.deploy.io.load] or `load_checkpoint` that
    [`save`][gblr.deploy.io.save] did not
    write as it is: not a gblr file, truncated, damaged, edited, or of an unknown format
    version. The message names the file and what is wrong with it.

    A subclass of ``ValueError``: ``except ValueError`` catches it too.

    Examples:
        >>> import os, tempfile, gblr
        >>> from gblr.deploy import GBLRFileError
        >>> path = os.path.join(tempfile.mkdtemp(), "notes.safetensors")
        >>> with open(path, "wb") as handle:
        ...     _ = handle.write(b"hello")
        >>> try:
        ...     gblr.load(path)
        ... except GBLRFileError as error:
        ...     print(str(error).split(": ", 1)[1])
        truncated or not a safetensors file (5 bytes)
    """


class _Invalid(Exception):
    """A reason to refuse a file; `load_checkpoint` adds the file's name."""


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - safetensors is installed in dev
        raise ImportError(
            "gblr.save and gblr.load need the safetensors package: pip install safetensors"
        ) from error
    return safetensors.torch


def _gblr_version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------- structure
def _layer_entry(name: str, aliases: list[str], layer: FrozenGBLRMatrix) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "aliases": aliases,
        "class": type(layer).__name__,
        "out": layer.rows,
        "in": layer.cols,
        "rank_per_component": layer.rank_per_component,
        "bias": layer.bias is not None,
        "row_intervals": layer.row_intervals.tolist(),
        "col_intervals": layer.col_intervals.tolist(),
        "dtype": str(layer.u_packed.dtype),
        "plan": layer.plan,
        "plan_cache": [[*key, choice] for key, choice in sorted(layer.plan_cache.items())],
    }
    if isinstance(layer, FrozenGBLRConv2d):
        entry.update(geometry_entry(layer))
    return entry


def geometry_entry(conv: nn.Module) -> dict[str, Any]:
    """The geometry of a 2-D convolution (``nn.Conv2d`` or a GBLR one, grouped too) as
    JSON-safe values, keyed as its constructor's arguments (``CONV_GEOMETRY``): pairs
    as lists; [`geometry_arguments`][gblr.deploy.io.geometry_arguments] reads them back.

    Examples:
        >>> import torch
        >>> from gblr.deploy.io import geometry_entry
        >>> geometry_entry(torch.nn.Conv2d(3, 8, 3, padding="same"))["padding"]
        'same'
    """
    values = {name: getattr(conv, name) for name in CONV_GEOMETRY}
    return {name: v if isinstance(v, (int, str)) else list(v) for name, v in values.items()}


def geometry_arguments(entry: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a convolution from its (checked)
    [`geometry_entry`][gblr.deploy.io.geometry_entry] in ``entry``: lists as tuples.

    Examples:
        >>> from gblr.deploy.io import geometry_arguments
        >>> arguments = geometry_arguments({"in_channels": 3, "out_channels": 8,
        ...     "kernel_size": [3, 3], "stride": [1, 1], "padding": "same", "dilation": [1, 1]})
        >>> arguments["kernel_size"], arguments["padding"]
        ((3, 3), 'same')
    """
    values = {name: entry[name] for name in CONV_GEOMETRY}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}


_PARAMETERLESS = {
    nn.ReLU: (),
    nn.GELU: ("approximate",),
    nn.SiLU: (),
    nn.Tanh: (),
    nn.Sigmoid: (),
    nn.Identity: (),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.Dropout: ("p",),
}
_PARAMETERLESS_BY_NAME = {kind.__name__: kind for kind in _PARAMETERLESS}


def _model_spec(module: nn.Module, name: str = "", seen: dict[int, str] | None = None):
    """A description of ``module`` that [`_build`][gblr.deploy.io._build] can rebuild, or ``None``.

    Covers what is common in small deployed models without importing user code: frozen
    GBLR layers, ``nn.Sequential``, ``Linear``, ``Conv2d`` (zero padding), ``LayerNorm``
    and parameter-free activations. A module met a second time (shared under several
    names) is ``{"type": "shared", "target": first name}``, in its place."""
    seen = {} if seen is None else seen
    if id(module) in seen:
        return {"type": "shared", "target": seen[id(module)]}
    seen[id(module)] = name
    if isinstance(module, FrozenGBLRMatrix):
        return {"type": "frozen"}
    kind = type(module)
    if kind is nn.Sequential:
        children = []
        # _modules, not named_children(): that skips a module it has seen, and the
        # rebuilt Sequential would run its children in another order.
        for child_name, child in module._modules.items():
            if child is None:
                return None
            spec = _model_spec(child, f"{name}.{child_name}" if name else child_name, seen)
            if spec is None:
                return None
            children.append([child_name, spec])
        return {"type": "Sequential", "children": children}
    if kind is nn.Linear:
        return {
            "type": "Linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "dtype": str(module.weight.dtype),
        }
    if kind is nn.Conv2d and module.padding_mode == "zeros":
        return {
            "type": "Conv2d",
            **geometry_entry(module),
            "groups": module.groups,
            "bias": module.bias is not None,
            "dtype": str(module.weight.dtype),
        }
    if kind is nn.LayerNorm:
        return {
            "type": "LayerNorm",
            "normalized_shape": list(module.normalized_shape),
            "eps": module.eps,
            "elementwise_affine": module.elementwise_affine,
            "bias": module.elementwise_affine and module.bias is not None,
            "dtype": str(module.weight.dtype) if module.weight is not None else "torch.float32",
        }
    if kind in _PARAMETERLESS:
        return {
            "type": kind.__name__,
            "args": {arg: getattr(module, arg) for arg in _PARAMETERLESS[kind]},
        }
    return None


# --------------------------------------------------------------------------- checks
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _expect(ok: bool, where: str, allowed: str, value: Any) -> None:
    if not ok:
        raise _Invalid(f"{where} must be {allowed}, got {_show(value)}")


def _int(value: Any, where: str, minimum: int = 0, maximum: int = _MAX_SIZE) -> int:
    _expect(
        isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum,
        where,
        f"an int in [{minimum}, {maximum}]",
        value,
    )
    return value


def _number(value: Any, where: str, minimum: float, maximum: float) -> float:
    _expect(
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and minimum <= value <= maximum,
        where,
        f"a number in [{minimum}, {maximum}]",
        value,
    )
    return value


def _str(value: Any, where: str) -> str:
    _expect(isinstance(value, str), where, "a string", value)
    return value


def _bool(value: Any, where: str) -> bool:
    _expect(isinstance(value, bool), where, "true or false", value)
    return value


def _list(value: Any, where: str, length: int | None = None, max_length: int | None = None):
    if length is not None:
        _expect(
            isinstance(value, list) and len(value) == length, where, f"a list of {length}", value
        )
    elif max_length is not None:
        _expect(
            isinstance(value, list) and len(value) <= max_length,
            where,
            f"a list of at most {max_length}",
            value,
        )
    else:
        _expect(isinstance(value, list), where, "a list", value)
    return value


def _keys(
    value: Any, where: str, required: Iterable[str], optional: Iterable[str] = ()
) -> dict[str, Any]:
    _expect(isinstance(value, dict), where, "a JSON object", value)
    required, optional = set(required), set(optional)
    missing, extra = required - value.keys(), value.keys() - required - optional
    if missing or extra:
        also = f" (and optionally {sorted(optional)})" if optional else ""
        raise _Invalid(
            f"{where} must have exactly the keys {sorted(required)}{also}; missing "
            f"{sorted(missing)}, unexpected {_show(sorted(extra))}"
        )
    return value


def _module_name(value: Any, where: str, root: bool) -> str:
    """A module path such as ``"blocks.0.fc1"`` (``""``, the model itself, if ``root``)."""
    _expect(
        isinstance(value, str) and ((root and value == "") or all(value.split("."))),
        where,
        "a module name (names joined by '.', none empty)" + (" or ''" if root else ""),
        value,
    )
    return value


def _pair(value: Any, where: str, minimum: int, maximum: int = _MAX_SIZE) -> list[int]:
    _list(value, where, length=2)
    return [_int(v, f"{where}[{i}]", minimum, maximum) for i, v in enumerate(value)]


def _padding(value: Any, where: str) -> None:
    if isinstance(value, str):
        _expect(value in ("valid", "same"), where, "'valid', 'same' or a pair of ints", value)
    else:
        _pair(value, where, 0)


def _dtype(value: Any, where: str) -> str:
    _expect(isinstance(value, str) and value in _DTYPES, where, f"one of {sorted(_DTYPES)}", value)
    return value


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")  # two readers could differ on it
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(text: bytes | str, what: str) -> Any:
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except RecursionError:
        raise _Invalid(f"{what} is nested too deeply to be one gblr.save wrote") from None
    except ValueError as error:  # bad JSON or UTF-8, a duplicate key, an enormous number
        raise _Invalid(f"{what} is not valid JSON ({_show(str(error))})") from None


@dataclasses.dataclass(frozen=True)
class _Stored:
    """One tensor of the safetensors table: where its bytes are and what they are."""

    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


def _tensor_table(header: dict[str, Any], available: int) -> dict[str, _Stored]:
    """Every tensor entry, checked so that reading it allocates exactly its bytes."""
    table: dict[str, _Stored] = {}
    for name, info in header.items():
        where = f"the entry of tensor {_show(name)}"
        _keys(info, where, ("dtype", "shape", "data_offsets"))
        code = info["dtype"]
        _expect(
            isinstance(code, str) and code in _STORED_DTYPES,
            f"{where}: dtype",
            f"one of {sorted(_STORED_DTYPES)}",
            code,
        )
        _list(info["shape"], f"{where}: shape", max_length=_MAX_TENSOR_DIMS)
        shape = [_int(d, f"{where}: shape[{i}]", 0, 2**62) for i, d in enumerate(info["shape"])]
        begin, end = _pair(info["data_offsets"], f"{where}: data_offsets", 0, 2**62)
        table[name] = _Stored(_STORED_DTYPES[code], shape, begin, end)
    needed = max((entry.end for entry in table.values()), default=0)
    if needed > available:
        raise _Invalid(f"truncated: tensor data needs {needed} bytes, file has {available}")
    if needed < available:
        raise _Invalid(f"{available - needed} unexpected bytes after the tensor data")
    position = 0
    for name, entry in sorted(table.items(), key=lambda item: (item[1].begin, item[1].end)):
        size = math.prod(entry.shape) * entry.dtype.itemsize  # Python ints: cannot overflow
        if entry.begin != position or entry.end - entry.begin != size:
            raise _Invalid(
                f"tensor {_show(name)} ({entry.dtype}, shape {entry.shape}, {size} bytes) has "
                f"data_offsets [{entry.begin}, {entry.end}]; the tensors' bytes must follow "
                f"each other without gaps or overlaps, this one from byte {position}"
            )
        position = entry.end
    return table


def _check_plan_cache(cached: Any, kind: str) -> None:
    if (
        not isinstance(cached, list)
        or len(cached) != 4
        or not isinstance(cached[0], str)
        or not isinstance(cached[1], str)
        or isinstance(cached[2], bool)
        or not isinstance(cached[2], int)
        or cached[2] < 0
        or cached[3] not in PLAN_CHOICES[1:]
    ):
        raise _Invalid(
            f"the stored plan choice {_show(cached)} for a {kind} is not "
            f"[device type, dtype, row bucket, plan] with a plan in {PLAN_CHOICES[1:]}"
        )


def _check_intervals(value: Any, where: str, size: int) -> list[list[int]]:
    _list(value, where)
    for k, interval in enumerate(value):
        start, length = _pair(interval, f"{where}[{k}]", 0)
        _expect(start < size, f"{where}[{k}] start", f"in [0, {size})", start)
        _expect(1 <= length <= size, f"{where}[{k}] length", f"in [1, {size}]", length)
    return value


_LAYER_KEYS = (
    "name",
    "aliases",
    "class",
    "out",
    "in",
    "rank_per_component",
    "bias",
    "row_intervals",
    "col_intervals",
    "dtype",
    "plan",
    "plan_cache",
)


def _check_layer(entry: Any, where: str) -> None:
    _expect(isinstance(entry, dict), where, "a JSON object", entry)
    kind = entry.get("class")
    _expect(
        kind in ("FrozenGBLRLinear", "FrozenGBLRConv2d"),
        f"{where}.class",
        "'FrozenGBLRLinear' or 'FrozenGBLRConv2d'",
        kind,
    )
    conv = kind == "FrozenGBLRConv2d"
    _keys(entry, where, _LAYER_KEYS + (CONV_GEOMETRY if conv else ()))
    _module_name(entry["name"], f"{where}.name", root=True)
    for i, alias in enumerate(_list(entry["aliases"], f"{where}.aliases")):
        _module_name(alias, f"{where}.aliases[{i}]", root=False)
    out, cols = _int(entry["out"], f"{where}.out", 1), _int(entry["in"], f"{where}.in", 1)
    _int(entry["rank_per_component"], f"{where}.rank_per_component", 1)
    _bool(entry["bias"], f"{where}.bias")
    rows = _check_intervals(entry["row_intervals"], f"{where}.row_intervals", out)
    columns = _check_intervals(entry["col_intervals"], f"{where}.col_intervals", cols)
    if len(rows) != len(columns):
        raise _Invalid(
            f"{where} has {len(rows)} row intervals and {len(columns)} column intervals; "
            "every component has one of each"
        )
    _dtype(entry["dtype"], f"{where}.dtype")
    if entry["plan"] not in PLAN_CHOICES:
        raise _Invalid(
            f"the file's plan {_show(entry['plan'])} for a {kind} is not one of "
            f"{PLAN_CHOICES}; the file was written by another version of gblr, or edited"
        )
    for cached in _list(entry["plan_cache"], f"{where}.plan_cache"):
        _check_plan_cache(cached, kind)
    if conv:
        in_channels = _int(entry["in_channels"], f"{where}.in_channels", 1)
        out_channels = _int(entry["out_channels"], f"{where}.out_channels", 1)
        kh, kw = _pair(entry["kernel_size"], f"{where}.kernel_size", 1)
        _pair(entry["stride"], f"{where}.stride", 1)
        _pair(entry["dilation"], f"{where}.dilation", 1)
        _padding(entry["padding"], f"{where}.padding")
        if (out, cols) != (out_channels, in_channels * kh * kw):
            raise _Invalid(
                f"{where} has a kernel matrix of shape ({out}, {cols}), which must be "
                f"(out_channels, in_channels * kh * kw) = "
                f"({out_channels}, {in_channels * kh * kw})"
            )


def _check_spec(spec: Any, where: str, depth: int = 0) -> None:
    """The model description: known module types with exactly their arguments."""
    if depth > _MAX_DEPTH:
        raise _Invalid(f"the model description is nested deeper than {_MAX_DEPTH} modules")
    _expect(isinstance(spec, dict), where, "a JSON object", spec)
    kind = spec.get("type")
    _expect(isinstance(kind, str), f"{where}.type", "a module type name", kind)
    if kind == "frozen":
        _keys(spec, where, ("type",))
    elif kind == "shared":
        _keys(spec, where, ("type", "target"))
        _str(spec["target"], f"{where}.target")
    elif kind == "Sequential":
        _keys(spec, where, ("type", "children"))
        for i, child in enumerate(_list(spec["children"], f"{where}.children")):
            _list(child, f"{where}.children[{i}]", length=2)
            name = child[0]
            _expect(
                isinstance(name, str) and name != "" and "." not in name,
                f"{where}.children[{i}] name",
                "a non-empty string without '.'",
                name,
            )
            _check_spec(child[1], f"{where}.children[{i}] ({name})", depth + 1)
    elif kind == "Linear":
        _keys(spec, where, ("type", "in_features", "out_features", "bias", "dtype"))
        _int(spec["in_features"], f"{where}.in_features")
        _int(spec["out_features"], f"{where}.out_features")
        _bool(spec["bias"], f"{where}.bias")
        _dtype(spec["dtype"], f"{where}.dtype")
    elif kind == "Conv2d":
        _keys(spec, where, ("type", "groups", "bias", "dtype", *CONV_GEOMETRY))
        _int(spec["in_channels"], f"{where}.in_channels", 1)
        _int(spec["out_channels"], f"{where}.out_channels", 1)
        _pair(spec["kernel_size"], f"{where}.kernel_size", 1)
        _pair(spec["stride"], f"{where}.stride", 1)
        _pair(spec["dilation"], f"{where}.dilation", 1)
        _padding(spec["padding"], f"{where}.padding")
        _int(spec["groups"], f"{where}.groups", 1)
        _bool(spec["bias"], f"{where}.bias")
        _dtype(spec["dtype"], f"{where}.dtype")
    elif kind == "LayerNorm":
        keys = ("type", "normalized_shape", "eps", "elementwise_affine", "bias", "dtype")
        _keys(spec, where, keys)
        shape = _list(spec["normalized_shape"], f"{where}.normalized_shape", max_length=8)
        for i, size in enumerate(shape):
            _int(size, f"{where}.normalized_shape[{i}]", 1)
        _number(spec["eps"], f"{where}.eps", 0.0, 1.0)
        _bool(spec["elementwise_affine"], f"{where}.elementwise_affine")
        _bool(spec["bias"], f"{where}.bias")
        _dtype(spec["dtype"], f"{where}.dtype")
    elif kind in _PARAMETERLESS_BY_NAME:
        _keys(spec, where, ("type", "args"))
        args = _keys(spec["args"], f"{where}.args", _PARAMETERLESS[_PARAMETERLESS_BY_NAME[kind]])
        if "approximate" in args:
            _expect(
                args["approximate"] in ("none", "tanh"),
                f"{where}.args.approximate",
                "'none' or 'tanh'",
                args["approximate"],
            )
        for dim in ("start_dim", "end_dim"):
            if dim in args:
                _int(args[dim], f"{where}.args.{dim}", -64, 64)
        if "p" in args:
            _number(args["p"], f"{where}.args.p", 0.0, 1.0)
    else:
        known = ["frozen", "shared", "Sequential", "Linear", "Conv2d", "LayerNorm"]
        raise _Invalid(
            f"{where} has the module type {_show(kind)}; known: "
            f"{', '.join(known + sorted(_PARAMETERLESS_BY_NAME))}"
        )


def _check_structure(structure: Any, stored: Iterable[str]) -> None:
    _keys(structure, "the structure", ("root", "layers", "aliases", "model"))
    _str(structure["root"], "the structure's root")
    stored = set(stored)
    _check_aliases(structure["aliases"], stored, "the structure's aliases")
    names: set[str] = set()
    for i, entry in enumerate(_list(structure["layers"], "the structure's layers")):
        _check_layer(entry, f"layers[{i}]")
        for name in (entry["name"], *entry["aliases"]):
            if name in names:
                raise _Invalid(f"the module name {name!r} is given to two frozen layers")
            names.add(name)
    if structure["model"] is not None:
        _check_spec(structure["model"], "model")


def _check_aliases(aliases: Any, stored: set[str], where: str) -> None:
    """Tied keys: each names a stored tensor and is not stored itself."""
    _expect(isinstance(aliases, dict), where, "a JSON object", aliases)
    for alias, key in aliases.items():
        _expect(
            isinstance(key, str) and key in stored and alias not in stored,
            f"the alias {_show(alias)}",
            "a key not stored itself, naming a stored tensor",
            key,
        )


def _check_config(config: Any) -> dict[str, Any]:
    """The conversion config's plain data: a flat JSON object naming its structure, whose
    values are JSON scalars (finite numbers) or lists of strings. Its fields are the
    business of `gblr.compress.configs`, which checks them when it reads them."""
    _expect(isinstance(config, dict), "the config", "a JSON object", config)
    _expect(
        len(config) <= _MAX_CONFIG_KEYS,
        "the config",
        f"a JSON object of at most {_MAX_CONFIG_KEYS} keys",
        f"{len(config)} keys",
    )
    _expect(
        isinstance(config.get("structure"), str) and config["structure"] != "",
        "the config's structure",
        "a non-empty string",
        config.get("structure"),
    )
    for key, value in config.items():
        scalar = value is None or isinstance(value, (bool, str))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        _expect(
            scalar
            or (number and math.isfinite(value))
            or (isinstance(value, list) and all(isinstance(item, str) for item in value)),
            f"the config's {_show(key)}",
            "null, true, false, a finite number, a string or a list of strings",
            value,
        )
    return config


def _check_layer_tensors(entry: dict[str, Any], state: dict[str, Tensor]) -> None:
    """The stored tensors of a frozen layer have the sizes and intervals of its entry (a
    layer is built from the entry, then filled from the tensors)."""
    prefix = f"{entry['name']}." if entry["name"] else ""
    rank, dtype = entry["rank_per_component"], _DTYPES[entry["dtype"]]
    expected: dict[str, tuple[list[int], torch.dtype]] = {
        "u_packed": ([rank * sum(length for _, length in entry["row_intervals"])], dtype),
        "v_packed": ([rank * sum(length for _, length in entry["col_intervals"])], dtype),
        "row_intervals": ([len(entry["row_intervals"]), 2], torch.int64),
        "col_intervals": ([len(entry["col_intervals"]), 2], torch.int64),
    }
    if entry["bias"]:
        expected["bias"] = ([entry["out"]], dtype)
    for key, (shape, kind) in expected.items():
        tensor = state.get(prefix + key)
        if tensor is None:
            raise _Invalid(
                f"the file has no tensor {prefix + key!r} for its layer {entry['name']!r}"
            )
        if list(tensor.shape) != shape or tensor.dtype != kind:
            raise _Invalid(
                f"tensor {prefix + key!r} is {tensor.dtype} of shape {list(tensor.shape)}; "
                f"the layer's entry needs {kind} of shape {shape}"
            )
    for key in ("row_intervals", "col_intervals"):
        if state[prefix + key].tolist() != entry[key]:
            raise _Invalid(f"tensor {prefix + key!r} differs from the {key} of the layer's entry")


# --------------------------------------------------------------------------- build
def _frozen_from_entry(
    entry: dict[str, Any], device: torch.device | str | None
) -> FrozenGBLRMatrix:
    """A frozen layer of the entry's shapes (zeros; on ``"meta"`` it takes no memory)."""
    common = {
        "row_intervals": torch.tensor(entry["row_intervals"], dtype=torch.int64).reshape(-1, 2),
        "col_intervals": torch.tensor(entry["col_intervals"], dtype=torch.int64).reshape(-1, 2),
        "rank_per_component": entry["rank_per_component"],
        "device": device,
        "dtype": _DTYPES[entry["dtype"]],
    }
    if entry["class"] == "FrozenGBLRLinear":
        layer: FrozenGBLRMatrix = FrozenGBLRLinear(
            entry["in"], entry["out"], entry["bias"], **common
        )
    else:
        layer = FrozenGBLRConv2d(**geometry_arguments(entry), bias=entry["bias"], **common)
    layer.plan = entry["plan"]
    for device_type, dtype, bucket, choice in entry["plan_cache"]:
        layer.plan_cache[(device_type, dtype, bucket)] = choice
    return layer


def _module(spec: dict[str, Any], name: str, entries: dict[str, dict[str, Any]], device: str):
    kind = spec["type"]
    if kind == "frozen":
        if name not in entries:
            raise _Invalid(
                f"the model description has a frozen layer at {name or '(root)'!r}, and the "
                "file has no layer entry of that name"
            )
        return _frozen_from_entry(entries[name], device)
    if kind == "Linear":
        return nn.Linear(
            spec["in_features"],
            spec["out_features"],
            spec["bias"],
            device=device,
            dtype=_DTYPES[spec["dtype"]],
        )
    if kind == "Conv2d":
        return nn.Conv2d(
            **geometry_arguments(spec),
            groups=spec["groups"],
            bias=spec["bias"],
            device=device,
            dtype=_DTYPES[spec["dtype"]],
        )
    if kind == "LayerNorm":
        return nn.LayerNorm(
            tuple(spec["normalized_shape"]),
            spec["eps"],
            spec["elementwise_affine"],
            bias=spec["bias"],
            device=device,
            dtype=_DTYPES[spec["dtype"]],
        )
    return _PARAMETERLESS_BY_NAME[kind](**spec["args"])


def _build(
    spec: dict[str, Any],
    name: str,
    entries: dict[str, dict[str, Any]],
    built: dict[str, nn.Module],
    device: str,
) -> nn.Module:
    """The module a (checked) description describes, its tensors on ``device``."""
    kind = spec["type"]
    if kind == "shared":
        target = spec["target"]
        if target not in built:
            raise _Invalid(
                f"the model description shares module {target!r} at {name!r}, and no module "
                "of that name comes before it"
            )
        module = built[target]
    elif kind == "Sequential":
        module = nn.Sequential()
        for child, child_spec in spec["children"]:
            path = f"{name}.{child}" if name else child
            module.add_module(child, _build(child_spec, path, entries, built, device))
    else:
        try:
            module = _module(spec, name, entries, device)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise _Invalid(
                f"module {name or '(root)'!r} ({kind}) cannot be built from the file's "
                f"description: {_show(str(error))}"
            ) from None
    built[name] = module
    return module


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str] | None:
    parent, _, attribute = key.rpartition(".")
    try:
        return model.get_submodule(parent), attribute
    except AttributeError:
        return None


def _tie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias key the same parameter (or buffer) as the key it was stored under:
    weights that were tied when saved are tied again, whatever the model's constructor
    did."""
    for alias, stored in aliases.items():
        source, target = _owner(model, stored), _owner(model, alias)
        if source is None or target is None:
            continue
        (owner, attribute), (alias_owner, alias_attribute) = source, target
        for table in ("_parameters", "_buffers"):
            tensors, alias_tensors = getattr(owner, table), getattr(alias_owner, table)
            if attribute in tensors and alias_attribute in alias_tensors:
                if tensors[attribute] is not None and alias_tensors[alias_attribute] is not None:
                    alias_tensors[alias_attribute] = tensors[attribute]
                break


def _restore_order_v1(model: nn.Module) -> None:
    """Format 1 dropped a Sequential's second mention of a shared module and appended it at
    the end on load; put numbered children back in their order."""
    for module in model.modules():
        if isinstance(module, nn.Sequential) and all(k.isdigit() for k in module._modules):
            ordered = sorted(module._modules.items(), key=lambda item: int(item[0]))
            module._modules.clear()
            module._modules.update(ordered)


# --------------------------------------------------------------------------- hashing
def _digest(metadata: dict[str, str], records: Iterable[tuple[str, str, list[int], Any]]) -> str:
    """Format 2: every metadata entry but the digest itself, then every tensor as one JSON
    line ``[name, dtype, shape, byte count]`` followed by its bytes, in name order."""
    sha = hashlib.sha256(b"gblr.frozen 2\n")
    covered = {key: value for key, value in metadata.items() if key != "sha256"}
    sha.update(json.dumps(covered, sort_keys=True).encode() + b"\n")
    for name, dtype, shape, data in sorted(records, key=lambda record: record[0]):
        data = memoryview(data).cast("B")
        sha.update(json.dumps([name, dtype, shape, data.nbytes]).encode() + b"\n")
        sha.update(data)
    return sha.hexdigest()


def _digest_v1(structure: str, records: Iterable[tuple[str, str, list[int], Any]]) -> str:
    """Format 1: the structure string, then every tensor, in name order."""
    sha = hashlib.sha256(structure.encode("utf-8"))
    for name, dtype, shape, data in sorted(records, key=lambda record: record[0]):
        sha.update(f"\0{name}\0{dtype}\0{shape}\0".encode())
        sha.update(memoryview(data).cast("B"))
    return sha.hexdigest()


def _tensor_records(tensors: dict[str, Tensor]) -> list[tuple[str, str, list[int], Any]]:
    return [
        (key, str(t.dtype), list(t.shape), t.reshape(-1).view(torch.uint8).numpy())
        for key, t in ((key, t.detach().cpu().contiguous()) for key, t in tensors.items())
    ]


# --------------------------------------------------------------------------- save
def _unique_tensors(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors stored once each (safetensors refuses shared memory), and the keys that
    are the same tensor as a stored one."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    identity: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        tensor = tensor.detach()
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
            str(tensor.device),
        )
        if tensor.numel() and ident in identity:
            aliases[key] = identity[ident]
            continue
        storage = tensor.untyped_storage().data_ptr()
        shares = tensor.numel() > 0 and storage in storages
        tensor = tensor.cpu()
        # A view into memory already stored (but not the same view) is copied out.
        tensors[key] = tensor.clone() if shares else tensor.contiguous()
        if tensor.numel():
            identity[ident] = key
            storages.add(storage)
    return tensors, aliases


def _file_argument(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(
            f"path must be a str or os.PathLike naming a file, got {type(path).__name__}"
        )
    if os.fspath(path) == "":
        raise ValueError("path must name a file (such as 'model.safetensors'), got ''")
    return Path(path).expanduser()  # as export_onnx and the recipes' paths


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a frozen model (tensors as safetensors, structure as JSON metadata).

    Args:
        model: a module containing frozen GBLR layers (after [`gblr.freeze`][]), or one
            frozen layer. Unfrozen GBLR layers are refused: freeze first. Tied weights
            (one parameter under several names) are stored once and tied again by
            [`load`][gblr.deploy.io.load]. The conversion config that [`gblr.convert`][] recorded on
            the model (``model.gblr_config``) is saved with it, as peft saves
            ``adapter_config.json`` next to the weights
            ([`gblr.ConversionConfig.from_file`][] reads it back).
        path: the file to write (conventionally ``*.safetensors``); its folder must exist.
            Written atomically ([`gblr.files.save_atomically`][]): an existing
            file is replaced only once the new one is complete, and a failed save leaves
            no temporary file. As with ``cp`` and editors, a symbolic link is followed
            (its target is rewritten, the link stays) and a read-only file is refused
            (``PermissionError``); an existing file keeps its permissions. An existing
            file that `gblr.save` did not write (a ``torch.save`` checkpoint, an export)
            is not replaced unless ``overwrite=True``; an earlier `gblr.save` file is.
        overwrite: replace an existing file that `gblr.save` did not write.

    Returns:
        The path written (as given; for a link, the link).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``path`` not a path, or
            ``model.gblr_config`` not a conversion config.
        ValueError: no frozen GBLR layer, an unfrozen one, an empty path, a folder, or
            a folder that does not exist.
        PermissionError: ``path`` is a read-only file, or its folder is not writable.
        FileExistsError: ``path`` holds a file `gblr.save` did not write, and
            ``overwrite`` is ``False``.

    Examples:
        >>> import torch, gblr, tempfile, os
        >>> model = gblr.freeze(torch.nn.Sequential(gblr.GBLRLinear(8, 4)))
        >>> path = gblr.save(model, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> bool(torch.equal(gblr.load(path)[0].u_packed, model[0].u_packed))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = _file_argument(path)
    if path.is_dir():
        raise ValueError(
            f"path {str(path)!r} is a folder; give a file name such as "
            f"{str(path / 'model.safetensors')!r}"
        )
    if not path.parent.is_dir():
        raise ValueError(f"path's folder {str(path.parent)!r} does not exist")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if path.exists() and not overwrite and not is_gblr_file(path):
        raise FileExistsError(
            f"{str(path)!r} already exists and was not written by gblr.save; it is not "
            "replaced unless you pass overwrite=True"
        )
    names: dict[int, list[str]] = {}
    modules: dict[int, FrozenGBLRMatrix] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (GBLRLinear, GBLRConv2d)):
            raise ValueError(
                f"model has an unfrozen GBLR layer {name or '(root)'!r} "
                f"({type(module).__name__}); call gblr.freeze(model) before gblr.save"
            )
        if isinstance(module, FrozenGBLRMatrix):
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    if not modules:
        raise ValueError(
            f"model ({type(model).__name__}) has no frozen GBLR layer to save; "
            "gblr.save writes frozen models (gblr.freeze), use torch.save otherwise"
        )
    config = _config_metadata(model)
    layers = [_layer_entry(ns[0], ns[1:], modules[key]) for key, ns in names.items()]
    tensors, aliases = _unique_tensors(model.state_dict())
    structure = json.dumps(
        {
            "root": type(model).__name__,
            "layers": layers,
            "aliases": aliases,
            "model": _model_spec(model),
        },
        sort_keys=True,
    )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gblr_version": _gblr_version(),
        "structure": structure,
    }
    if config is not None:
        metadata["config"] = config
    metadata["sha256"] = _digest(metadata, _tensor_records(tensors))
    data = _safetensors().save(tensors, metadata=metadata)
    save_atomically(lambda handle: handle.write(data), path)
    return path


def _config_metadata(model: nn.Module) -> str | None:
    """The JSON of ``model.gblr_config`` (the conversion config [`gblr.convert`][]
    records), checked as `load_checkpoint` will check it; ``None`` without one."""
    config = getattr(model, "gblr_config", None)
    if config is None:
        return None
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        raise TypeError(
            "model.gblr_config must be a conversion config (gblr.ConversionConfig, as "
            f"gblr.convert sets it) or None, got {type(config).__name__}"
        )
    data = to_dict()
    try:
        _check_config(data)
        return json.dumps(data, sort_keys=True, allow_nan=False)
    except (_Invalid, TypeError, ValueError) as error:
        raise ValueError(f"model.gblr_config cannot be saved: {error}") from None


# --------------------------------------------------------------------------- load
@dataclasses.dataclass(frozen=True)
class FrozenCheckpoint:
    """The verified contents of a file written by [`gblr.save`][].

    Attributes:
        path: where it was read from.
        tensors: the stored tensors by state-dict key (CPU).
        aliases: state-dict keys that are the same tensor as another key (tied weights).
        layers: per frozen GBLR layer, its metadata (name, class, shapes, intervals...).
        model_spec: the model description [`load`][gblr.deploy.io.load] rebuilds from, or ``None``.
        root: class name of the saved model.
        gblr_version: the version that wrote the file (covered by the checksum from
            format version 2 on).
        format_version: the file's format version.
        config: the conversion config that made the model, as plain data
            ([`gblr.ConversionConfig.to_dict`][]; [`gblr.ConversionConfig.from_file`][]
            gives the config itself), or ``None`` (the model had none, or an older gblr
            wrote the file).

    Examples:
        >>> import os, tempfile
        >>> import torch, gblr
        >>> from gblr.deploy import load_checkpoint
        >>> model = gblr.freeze(torch.nn.Sequential(gblr.GBLRLinear(8, 4)))
        >>> path = gblr.save(model, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> checkpoint = load_checkpoint(path)
        >>> checkpoint.root, [layer["class"] for layer in checkpoint.layers]
        ('Sequential', ['FrozenGBLRLinear'])
        >>> checkpoint.tensors["0.row_intervals"].shape  # (K, 2) intervals of 4 components
        torch.Size([4, 2])
        >>> sorted(checkpoint.state_dict())
        ['0.bias', '0.col_intervals', '0.row_intervals', '0.u_packed', '0.v_packed']
    """

    path: Path
    tensors: dict[str, Tensor]
    aliases: dict[str, str]
    layers: tuple[dict[str, Any], ...]
    model_spec: dict[str, Any] | None
    root: str
    gblr_version: str
    format_version: str = FORMAT_VERSION
    config: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Tensor]:
        """Every state-dict key, aliases included, mapped to its tensor."""
        state = dict(self.tensors)
        for key, stored in self.aliases.items():
            state[key] = self.tensors[stored]
        return state


def _read_file(path: Path) -> bytes:
    """The file's bytes: a regular file only, read up to its size (a device or a pipe
    could be endless)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no such file: {str(path)!r} (give a file written by gblr.save)"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(
            f"path {str(path)!r} is a folder; give a .safetensors file written by gblr.save"
        )
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(
            f"path {str(path)!r} is not a regular file (a device, pipe or socket); give a "
            "file written by gblr.save"
        )
    with open(path, "rb") as handle:
        data = handle.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise GBLRFileError(f"cannot load {str(path)!r}: the file changed while it was read")
    return data


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    """The safetensors header (parsed JSON) and its size in bytes."""
    if len(data) < 8:
        raise _Invalid(f"truncated or not a safetensors file ({len(data)} bytes)")
    header_size = int.from_bytes(data[:8], "little")
    if 8 + header_size > len(data):
        raise _Invalid(
            f"truncated or not a safetensors file: header of {header_size} bytes announced, "
            f"file has {len(data)} bytes"
        )
    if header_size > _MAX_HEADER_BYTES:
        raise _Invalid(
            f"header of {header_size} bytes, more than safetensors allows ({_MAX_HEADER_BYTES})"
        )
    header = _parse_json(data[8 : 8 + header_size], "the safetensors header")
    _expect(isinstance(header, dict), "the safetensors header", "a JSON object", header)
    return header, header_size


def _gblr_metadata(header: dict[str, Any]) -> dict[str, str] | None:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        return None
    return metadata


def is_gblr_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that says it was written by [`gblr.save`][] (its
    safetensors header names the format). Reads the header only; use
    `load_checkpoint` to verify the whole file. Never raises for a bad file.

    Examples:
        >>> import os, tempfile, torch, gblr
        >>> from gblr.deploy import is_gblr_file
        >>> folder = tempfile.mkdtemp()
        >>> model = gblr.freeze(torch.nn.Sequential(gblr.GBLRLinear(8, 4)))
        >>> is_gblr_file(gblr.save(model, os.path.join(folder, "m.safetensors")))
        True
        >>> torch.save(model.state_dict(), os.path.join(folder, "state.pt"))
        >>> is_gblr_file(os.path.join(folder, "state.pt")), is_gblr_file(folder)
        (False, False)
    """
    return tensor_file_kind(path) == FORMAT


def load_checkpoint(path: str | os.PathLike) -> FrozenCheckpoint:
    """Read and verify a file written by [`gblr.save`][], without building a model.

    Everything in the header is checked before it is used (see the module's docstring):
    a file that is not what [`gblr.save`][] wrote is refused with the reason, never
    with an error from deep inside JSON, safetensors or torch, and reading it allocates
    at most a small multiple of the file's size.

    Raises:
        TypeError: ``path`` is not a str or ``os.PathLike``.
        ValueError: ``path`` is empty, a folder or not a regular file.
        FileNotFoundError: no such file.
        GBLRFileError: (a ``ValueError``) the file is not a gblr frozen-model file, is
            truncated, its checksum does not match (modified or corrupted), its format
            version is unknown, or its contents are inconsistent; the message names the
            path and the reason.

    Examples:
        >>> import os, tempfile
        >>> import torch, gblr
        >>> from gblr.deploy import load_checkpoint
        >>> folder = tempfile.mkdtemp()
        >>> model = gblr.freeze(torch.nn.Sequential(gblr.GBLRLinear(8, 4)))
        >>> checkpoint = load_checkpoint(gblr.save(model, os.path.join(folder, "m.safetensors")))
        >>> checkpoint.gblr_version == gblr.__version__, checkpoint.tensors["0.u_packed"].shape
        (True, torch.Size([16]))
        >>> with open(os.path.join(folder, "bad.safetensors"), "wb") as handle:
        ...     _ = handle.write(b"not a model")
        >>> try:
        ...     load_checkpoint(os.path.join(folder, "bad.safetensors"))
        ... except ValueError as error:
        ...     print(type(error).__name__)
        GBLRFileError
    """
    path = _file_argument(path)
    data = _read_file(path)
    try:
        return _verified(path, data)
    except _Invalid as error:
        raise GBLRFileError(f"cannot load {str(path)!r}: {error}") from None


def _verified(path: Path, data: bytes) -> FrozenCheckpoint:
    header, header_size = _header(data)
    metadata = _gblr_metadata(header)
    if metadata is None:
        raise _Invalid(
            "not a frozen GBLR model file (no 'gblr.frozen' metadata); it must be written "
            "by gblr.save"
        )
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise _Invalid(
            f"format version {_show(version)} is not supported (this gblr, "
            f"{_gblr_version()}, reads versions {', '.join(READABLE_VERSIONS)}); a newer "
            "gblr may read it"
        )
    optional = _OPTIONAL_METADATA_KEYS if version == "2" else ()
    _keys(metadata, "the gblr metadata", _METADATA_KEYS, optional)
    for key, value in metadata.items():
        _str(value, f"the metadata's {key}")
    digest = metadata["sha256"]
    _expect(
        len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
        "the metadata's sha256",
        "64 lowercase hex digits",
        digest,
    )
    del header["__metadata__"]
    start = 8 + header_size
    table = _tensor_table(header, len(data) - start)
    view = memoryview(data)
    records = [
        (name, str(entry.dtype), entry.shape, view[start + entry.begin : start + entry.end])
        for name, entry in table.items()
    ]
    if version == "1":
        computed = _digest_v1(metadata["structure"], records)
    else:
        computed = _digest(metadata, records)
    if computed != digest:
        raise _Invalid(
            "checksum mismatch: the tensors or the metadata (structure, versions) were "
            f"modified or corrupted after saving (stored sha256 {digest!r}, computed "
            f"{computed!r})"
        )
    structure = _parse_json(metadata["structure"], "the structure metadata")
    _check_structure(structure, table)
    config = None
    if "config" in metadata:
        config = _check_config(_parse_json(metadata["config"], "the config metadata"))
    try:
        tensors = _safetensors().load(data)
    except Exception as error:  # its own error types; the checks above leave none expected
        raise _Invalid(f"unreadable tensor data ({_show(str(error))})") from None
    checkpoint = FrozenCheckpoint(
        path=path,
        tensors=tensors,
        aliases=dict(structure["aliases"]),
        layers=tuple(structure["layers"]),
        model_spec=structure["model"],
        root=structure["root"],
        gblr_version=metadata["gblr_version"],
        format_version=version,
        config=config,
    )
    state = checkpoint.state_dict()
    for entry in checkpoint.layers:
        _check_layer_tensors(entry, state)
    return checkpoint


_REPLACEABLE = {
    "FrozenGBLRLinear": (nn.Linear, GBLRLinear, FrozenGBLRLinear),
    "FrozenGBLRConv2d": (nn.Conv2d, GBLRConv2d, FrozenGBLRConv2d),
}


def matrix_shape_of(module: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of the matrix a layer multiplies by: ``nn.Linear``, ``nn.Conv2d``
    (``(out_channels, in_channels / groups * kh * kw)``), Hugging Face's ``Conv1D``, a
    GBLR or frozen layer; ``None`` for any other module.

    Examples:
        >>> import torch
        >>> from gblr.deploy.io import matrix_shape_of
        >>> matrix_shape_of(torch.nn.Conv2d(3, 8, 3)), matrix_shape_of(torch.nn.ReLU())
        ((8, 27), None)
    """
    if isinstance(module, (GBLRLinear, GBLRConv2d, FrozenGBLRMatrix)):
        return module.matrix_shape
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (module.out_channels, module.in_channels // module.groups * kh * kw)
    return hf_conv1d_shape(module)


def _install(model: nn.Module, entry: dict[str, Any], path: Path) -> nn.Module:
    """Replace the module at each of the entry's names with a frozen layer."""
    frozen = None
    for name in [entry["name"], *entry["aliases"]]:
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"cannot load {str(path)!r}: the model from model_factory has no module "
                f"{name!r} (a {entry['class']} in the file)"
            ) from None
        allowed = _REPLACEABLE[entry["class"]]
        # GPT-2's Conv1D (or a layer converted from one) takes a frozen linear layer that
        # remembers it, so that merge_and_unload gives a Conv1D back, not an nn.Linear
        # holding the transposed weight
        conv1d = entry["class"] == "FrozenGBLRLinear" and hf_conv1d_shape(current) is not None
        replaced = "Conv1D" if conv1d else getattr(current, "gblr_replaced", None)
        if not (isinstance(current, allowed) or conv1d) or matrix_shape_of(current) != (
            entry["out"],
            entry["in"],
        ):
            raise ValueError(
                f"cannot load {str(path)!r}: module {name!r} of the model from model_factory "
                f"is {type(current).__name__} with matrix shape {matrix_shape_of(current)}; the "
                f"file has a {entry['class']} of shape ({entry['out']}, {entry['in']}) there "
                f"(replaceable: {', '.join(t.__name__ for t in allowed)} of that shape"
                f"{', or Conv1D' if entry['class'] == 'FrozenGBLRLinear' else ''})"
            )
        if frozen is None:
            device = next(iter(current.parameters()), torch.empty(0)).device
            # Sizes checked against the stored tensors by load_checkpoint.
            frozen = _frozen_from_entry(entry, device)
        if replaced is not None:
            frozen.gblr_replaced = replaced
        if name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, frozen)
        else:
            model = frozen
    return model


def _compare(model: nn.Module, state: dict[str, Tensor]) -> str | None:
    """How the (meta) model's tensors differ from the file's, or ``None``."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    different = [
        f"{key}: {state[key].dtype} {list(state[key].shape)} in the file, "
        f"{own[key].dtype} {list(own[key].shape)} in the model"
        for key in sorted(own.keys() & state.keys())
        if own[key].shape != state[key].shape or own[key].dtype != state[key].dtype
    ]
    if not (missing or unexpected or different):
        return None
    parts = []
    for label, items in (
        ("tensors the model needs and the file lacks", missing),
        ("tensors in the file the model lacks", unexpected),
        ("tensors of another shape or dtype", different),
    ):
        if items:
            parts.append(f"{label}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
    return "; ".join(parts)


def _rebuild(checkpoint: FrozenCheckpoint) -> nn.Module:
    """The model of a checkpoint's description, on the CPU, with its tensors."""
    entries = {entry["name"]: entry for entry in checkpoint.layers}
    try:
        # On the meta device no memory is taken: the sizes a description asks for are
        # compared with the stored tensors (whose size the file bounds) first.
        model = _build(checkpoint.model_spec, "", entries, {}, "meta")
        for entry in checkpoint.layers:
            for alias in entry["aliases"]:  # a shared layer is one module again
                try:
                    layer = model.get_submodule(entry["name"])
                except AttributeError:
                    raise _Invalid(f"the layer {entry['name']!r} is not in the model") from None
                owner = _owner(model, alias)
                if owner is None:
                    raise _Invalid(f"the parent of the shared layer name {alias!r} is missing")
                if any(module is owner[0] for module in layer.modules()):
                    raise _Invalid(f"the shared layer name {alias!r} would put a layer in itself")
                setattr(owner[0], owner[1], layer)
        if checkpoint.format_version == "1":
            _restore_order_v1(model)
        difference = _compare(model, checkpoint.state_dict())
        if difference is not None:
            raise _Invalid(f"the model description does not match the tensors ({difference})")
    except _Invalid as error:
        raise GBLRFileError(f"cannot load {str(checkpoint.path)!r}: {error}") from None
    return model.to_empty(device="cpu")


def load(
    path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """Load a model saved by [`gblr.save`][], in eval mode.

    With ``model_factory`` (like ``peft.PeftModel.from_pretrained(base_model, path)``):
    the factory builds the architecture (the original dense model, or the GBLR-trained
    one), each module named in the file is replaced by a frozen GBLR layer built from the
    stored structure (it must be an ``nn.Linear``/GBLR/frozen layer, or ``nn.Conv2d``/...,
    of the same matrix shape), and all tensors are loaded strictly (every key must match).
    Other parameters keep the factory's device and dtype; frozen layers take the device of
    the module they replace and the saved dtype.

    Without it, the model is rebuilt from the file alone when that is possible: the saved
    model was a frozen layer, or an ``nn.Sequential`` (nested) of frozen layers,
    ``Linear``, ``Conv2d``, ``LayerNorm`` and parameter-free activations. Any other
    architecture is code, which a tensor file cannot (and should not) carry: then a
    ``ValueError`` asks for ``model_factory``; `load_checkpoint` returns the
    verified tensors and metadata in every case.

    Either way, weights that were tied when saved (one parameter under several names) are
    one parameter again, and modules shared under several names are one module.

    Args:
        path: a file written by [`gblr.save`][].
        model_factory: ``() -> nn.Module``, or ``None``.

    Returns:
        The model (on CPU when rebuilt from the file), with stored plan choices restored.

    Raises:
        GBLRFileError: (a ``ValueError``) the file is damaged, edited or inconsistent
            (see `load_checkpoint`).
        ValueError: the model cannot be rebuilt without a factory, or the factory's model
            does not match the file.
        TypeError: ``model_factory`` is not callable or does not return an ``nn.Module``.

    Examples:
        >>> import torch, gblr, tempfile, os
        >>> model = gblr.freeze(torch.nn.Sequential(gblr.GBLRLinear(8, 4), torch.nn.ReLU()))
        >>> path = gblr.save(model, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> loaded = gblr.load(path)  # no factory: a Sequential is rebuilt from the file
        >>> x = torch.randn(3, 8)
        >>> bool(torch.equal(loaded(x), model.eval()(x)))
        True
    """
    if isinstance(model_factory, nn.Module):
        raise TypeError(
            f"model_factory must be a function that builds the model (e.g. lambda: "
            f"{type(model_factory).__name__}(...)), got a {type(model_factory).__name__} "
            "instance: load builds the model itself, then fills it"
        )
    if model_factory is not None and not callable(model_factory):
        raise TypeError(
            f"model_factory must be a callable returning an nn.Module, or None, got "
            f"{type(model_factory).__name__}"
        )
    checkpoint = load_checkpoint(path)
    path = checkpoint.path
    if model_factory is None:
        if checkpoint.model_spec is None:
            raise ValueError(
                f"cannot rebuild {str(path)!r} without code: it holds a {checkpoint.root}, and "
                "only frozen GBLR layers and nn.Sequential of Linear, Conv2d, LayerNorm, "
                "activations and frozen layers are rebuilt from the file; pass model_factory "
                "(a function that builds the architecture), or use "
                "gblr.deploy.load_checkpoint for the tensors and metadata"
            )
        model = _rebuild(checkpoint)
    else:
        model = model_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_factory must return an nn.Module, got {type(model).__name__}")
        for entry in checkpoint.layers:
            model = _install(model, entry, path)
    try:
        model.load_state_dict(checkpoint.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"cannot load {str(path)!r}: the model's tensors do not match the file's: {error}"
        ) from None
    _tie(model, checkpoint.aliases)
    return model.eval()


# --------------------------------------------------------------------------- other formats
# The same safe container for other gblr formats (gblr.save_pretrained's weights): the
# tensors as safetensors, string metadata covered by a sha256 with the tensors, tied
# tensors stored once, and every check of load_checkpoint on reading.
def save_tensors(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str], *, kind: str
) -> Path:
    """Write ``tensors`` to the safetensors file ``path`` (atomically) with ``metadata``.

    The header's metadata is ``metadata`` plus ``format`` (``kind``), ``gblr_version``,
    ``aliases`` (JSON: keys that are the same tensor as a stored key; tied weights are
    stored once) and ``sha256`` over all of them and every tensor, which
    [`load_tensors`][gblr.deploy.io.load_tensors] checks.

    Args:
        tensors: name -> tensor (a ``state_dict()``; any device).
        path: the file to write, as [`gblr.save`][].
        metadata: string values; the keys above are reserved.
        kind: the format name, such as ``"gblr.pretrained"``.

    Returns:
        The path written.

    Examples:
        >>> import os, tempfile, torch
        >>> from gblr.deploy.io import load_tensors, save_tensors
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> weight = torch.ones(2, 2)
        >>> _ = save_tensors({"a": weight, "b": weight}, path, {"note": "hi"}, kind="demo")
        >>> tensors, metadata = load_tensors(path, kind="demo")
        >>> sorted(tensors), metadata["note"]
        (['a', 'b'], 'hi')
    """
    reserved = {"format", "gblr_version", "aliases", "sha256"} & metadata.keys()
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise TypeError("metadata values must be strings")
    path = _file_argument(path)
    stored, aliases = _unique_tensors(tensors)
    header = {
        "format": kind,
        "gblr_version": _gblr_version(),
        "aliases": json.dumps(aliases, sort_keys=True),
        **metadata,
    }
    header["sha256"] = _digest(header, _tensor_records(stored))
    data = _safetensors().save(stored, metadata=header)
    save_atomically(lambda handle: handle.write(data), path)
    return path


def tensor_file_kind(path: str | os.PathLike) -> str | None:
    """The ``format`` a safetensors file's metadata names (``"gblr.frozen"``,
    ``"gblr.pretrained"``, ``"pt"`` for transformers' files...), or ``None`` for a file
    that is not a readable safetensors file or names none. Reads the header only; never
    raises for a bad file.

    Examples:
        >>> import os, tempfile, torch
        >>> from gblr.deploy.io import save_tensors, tensor_file_kind
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> tensor_file_kind(save_tensors({"a": torch.ones(1)}, path, {}, kind="demo"))
        'demo'
    """
    try:
        path = Path(path)
        if not path.is_file():
            return None
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= min(_MAX_HEADER_BYTES, path.stat().st_size - 8):
                return None
            header = _parse_json(handle.read(size), "the header")
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        kind = metadata.get("format") if isinstance(metadata, dict) else None
        return kind if isinstance(kind, str) else None
    except (OSError, ValueError, TypeError, _Invalid):
        return None


def load_tensors(path: str | os.PathLike, *, kind: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and verify a file written by [`save_tensors`][gblr.deploy.io.save_tensors] with the same
    ``kind``.

    Every check of `load_checkpoint` applies (header, tensor table, sha256 over the
    metadata and tensors); tied keys come back as the same tensor.

    Returns:
        ``(tensors, metadata)``: every key (aliases included) -> tensor on the CPU, and the
        metadata without ``format``, ``aliases`` and ``sha256``.

    Raises:
        FileNotFoundError, ValueError, TypeError: as `load_checkpoint`.
        GBLRFileError: not a ``kind`` file, truncated, damaged or edited; the message names
            the file and the reason.
    """
    path = _file_argument(path)
    data = _read_file(path)
    try:
        header, header_size = _header(data)
        metadata = header.pop("__metadata__", None)
        _expect(isinstance(metadata, dict), "the safetensors metadata", "a JSON object", metadata)
        if metadata.get("format") != kind:
            raise _Invalid(
                f"not a {kind!r} file (its metadata names the format "
                f"{_show(metadata.get('format'))})"
            )
        for key in ("gblr_version", "aliases", "sha256"):
            _expect(key in metadata, f"the metadata's {key}", "present", None)
        for key, value in metadata.items():
            _str(value, f"the metadata's {key}")
        table = _tensor_table(header, len(data) - 8 - header_size)
        start, view = 8 + header_size, memoryview(data)
        records = [
            (name, str(entry.dtype), entry.shape, view[start + entry.begin : start + entry.end])
            for name, entry in table.items()
        ]
        digest = metadata["sha256"]
        if _digest(metadata, records) != digest:
            raise _Invalid(
                "checksum mismatch: the tensors or the metadata were modified or corrupted "
                "after saving"
            )
        aliases = _parse_json(metadata["aliases"], "the aliases metadata")
        _check_aliases(aliases, set(table), "the aliases")
        try:
            tensors = _safetensors().load(data)
        except Exception as error:  # its own error types; the checks above leave none expected
            raise _Invalid(f"unreadable tensor data ({_show(str(error))})") from None
    except _Invalid as error:
        raise GBLRFileError(f"cannot load {str(path)!r}: {error}") from None
    for alias, key in aliases.items():
        tensors[alias] = tensors[key]
    rest = {k: v for k, v in metadata.items() if k not in ("format", "aliases", "sha256")}
    return tensors, rest


def frozen_layer_entry(layer: FrozenGBLRMatrix) -> dict[str, Any]:
    """The JSON description of a frozen layer that [`gblr.save`][] writes (class,
    shapes, integer intervals, dtype, plan), without its names.

    Examples:
        >>> import torch, gblr
        >>> from gblr.deploy.io import frozen_layer_entry
        >>> layer = gblr.FrozenGBLRLinear.from_gblr(gblr.GBLRLinear(8, 4, num_components=2))
        >>> entry = frozen_layer_entry(layer)
        >>> entry["class"], entry["out"], entry["in"], len(entry["row_intervals"])
        ('FrozenGBLRLinear', 4, 8, 2)
    """
    entry = _layer_entry("", [], layer)
    del entry["name"], entry["aliases"]
    return entry


def frozen_layer_from_entry(entry: Any, where: str) -> FrozenGBLRMatrix:
    """A zero-filled frozen layer of a [`frozen_layer_entry`][gblr.deploy.io.frozen_layer_entry]
    description, on the CPU, after checking every field as `load_checkpoint` does.

    Raises:
        ValueError: the description is malformed (``where`` names it in the message).
    """
    try:
        _expect(isinstance(entry, dict), where, "a JSON object", entry)
        full = {"name": "", "aliases": [], **entry}
        _check_layer(full, where)
        # Without stored tensors to compare with first (as load does): sizes bounded by the
        # dense matrix, so that a crafted description cannot make it allocate without end.
        rank, lengths = full["rank_per_component"], 0
        for key in ("row_intervals", "col_intervals"):
            lengths += sum(length for _, length in full[key])
        if rank * lengths > 64 * full["out"] * full["in"] + 2**20:
            raise _Invalid(
                f"{where} describes factors far larger than its {full['out']}x{full['in']} "
                "matrix; the file is damaged or was not written by gblr"
            )
        return _frozen_from_entry(full, "cpu")
    except _Invalid as error:
        raise ValueError(str(error)) from None
