"""Save and load frozen GBLR models: safetensors for the tensors, JSON for the structure.

File layout: one ``.safetensors`` file. The tensors are the model's ``state_dict()``
(tensors shared between several keys are stored once). The safetensors header's
``__metadata__`` (string values only) holds:

- ``format``: ``"gblr.frozen"``, ``format_version``: ``"1"``, ``gblr_version``;
- ``structure``: JSON with ``layers`` (for every frozen GBLR layer: module name, other
  names it is shared under, class, shape arguments, rank, integer intervals, dtype, plan
  and timed plan choices), ``aliases`` (state-dict keys stored under another key),
  ``root`` (class name of the saved model) and ``model``: a description from which
  :func:`load` can rebuild the model without code, or ``null`` (see :func:`load`);
- ``sha256``: hex digest of the ``structure`` string followed by every stored tensor
  (name, dtype, shape, bytes) in sorted name order, so a file that was truncated, or
  whose tensors or structure were changed after saving, is refused. (It detects damage
  and accidental edits; it is not a signature.)

Loading needs only torch, safetensors and the frozen layers: no learner, no Gaudi masks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.conv import GBLRConv2d
from ..layers.linear import GBLRLinear
from .frozen import PLAN_CHOICES, FrozenGBLRConv2d, FrozenGBLRLinear, FrozenGBLRMatrix

__all__ = ["FORMAT", "FrozenCheckpoint", "load", "load_checkpoint", "save"]

FORMAT = "gblr.frozen"
FORMAT_VERSION = "1"

_DTYPES = {
    str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64)
}


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
        entry.update(
            in_channels=layer.in_channels,
            out_channels=layer.out_channels,
            kernel_size=list(layer.kernel_size),
            stride=list(layer.stride),
            padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            dilation=list(layer.dilation),
        )
    return entry


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


def _model_spec(module: nn.Module) -> dict[str, Any] | None:
    """A description of ``module`` that :func:`_build` can rebuild, or ``None``.

    Covers what is common in small deployed models without importing user code: frozen
    GBLR layers, ``nn.Sequential``, ``Linear``, ``Conv2d`` (zero padding), ``LayerNorm``
    and parameter-free activations."""
    if isinstance(module, FrozenGBLRMatrix):
        return {"type": "frozen"}
    kind = type(module)
    if kind is nn.Sequential:
        children = []
        for name, child in module.named_children():
            spec = _model_spec(child)
            if spec is None:
                return None
            children.append([name, spec])
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
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation),
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


def _frozen_from_entry(entry: dict[str, Any], device: torch.device | None) -> FrozenGBLRMatrix:
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
    elif entry["class"] == "FrozenGBLRConv2d":
        padding = entry["padding"]
        layer = FrozenGBLRConv2d(
            entry["in_channels"],
            entry["out_channels"],
            tuple(entry["kernel_size"]),
            tuple(entry["stride"]),
            padding if isinstance(padding, str) else tuple(padding),
            tuple(entry["dilation"]),
            entry["bias"],
            **common,
        )
    else:
        raise ValueError(f"unknown frozen layer class {entry['class']!r} in the file")
    plan = entry.get("plan", "auto")
    if plan not in PLAN_CHOICES:
        raise ValueError(
            f"the file's plan {plan!r} for a {entry['class']} is not one of {PLAN_CHOICES}; "
            "the file was written by another version of gblr, or edited"
        )
    layer.plan = plan
    for cached in entry.get("plan_cache", []):
        # A stored choice is used as is at the next forward of that size: check it now.
        if (
            not isinstance(cached, list)
            or len(cached) != 4
            or cached[3] not in PLAN_CHOICES[1:]
            or not isinstance(cached[2], int)
        ):
            raise ValueError(
                f"the file's stored plan choice {cached!r} for a {entry['class']} is not "
                f"[device type, dtype, row bucket, plan] with a plan in {PLAN_CHOICES[1:]}"
            )
        device_type, dtype, bucket, choice = cached
        layer.plan_cache[(device_type, dtype, bucket)] = choice
    return layer


def _build(spec: dict[str, Any], name: str, entries: dict[str, dict[str, Any]]) -> nn.Module:
    kind = spec["type"]
    if kind == "frozen":
        return _frozen_from_entry(entries[name], None)
    if kind == "Sequential":
        model = nn.Sequential()
        for child, child_spec in spec["children"]:
            model.add_module(
                child, _build(child_spec, f"{name}.{child}" if name else child, entries)
            )
        return model
    if kind == "Linear":
        return nn.Linear(
            spec["in_features"], spec["out_features"], spec["bias"], dtype=_DTYPES[spec["dtype"]]
        )
    if kind == "Conv2d":
        padding = spec["padding"]
        return nn.Conv2d(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            tuple(spec["stride"]),
            padding if isinstance(padding, str) else tuple(padding),
            tuple(spec["dilation"]),
            spec["groups"],
            spec["bias"],
            dtype=_DTYPES[spec["dtype"]],
        )
    if kind == "LayerNorm":
        return nn.LayerNorm(
            tuple(spec["normalized_shape"]),
            spec["eps"],
            spec["elementwise_affine"],
            bias=spec["bias"],
            dtype=_DTYPES[spec["dtype"]],
        )
    for module_type in _PARAMETERLESS:
        if module_type.__name__ == kind:
            return module_type(**spec["args"])
    raise ValueError(f"unknown module type {kind!r} in the file's model description")


# --------------------------------------------------------------------------- hashing
def _digest(structure: str, tensors: dict[str, Tensor]) -> str:
    sha = hashlib.sha256(structure.encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        sha.update(f"\0{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


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


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then ``os.replace``: a reader sees the
    old file or the new one, never a partial one, and a failure leaves the old file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would surprise users
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a frozen model (tensors as safetensors, structure as JSON metadata).

    Args:
        model: a module containing frozen GBLR layers (after :func:`gblr.freeze`), or one
            frozen layer. Unfrozen GBLR layers are refused: freeze first.
        path: the file to write (conventionally ``*.safetensors``); its folder must exist.
            Written atomically: an existing file is replaced only once the new one is
            complete.

    Returns:
        The path written.

    Examples:
        >>> import torch, gblr, tempfile, os
        >>> model = gblr.freeze(torch.nn.Sequential(gblr.GBLRLinear(8, 4)))
        >>> path = gblr.save(model, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> bool(torch.equal(gblr.load(path)[0].u_packed, model[0].u_packed))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path's folder {str(path.parent)!r} does not exist")
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
        "sha256": _digest(structure, tensors),
    }
    _write_atomically(path, _safetensors().save(tensors, metadata=metadata))
    return path


# --------------------------------------------------------------------------- load
@dataclasses.dataclass(frozen=True)
class FrozenCheckpoint:
    """The verified contents of a file written by :func:`gblr.save`.

    Attributes:
        path: where it was read from.
        tensors: the stored tensors by state-dict key (CPU).
        aliases: state-dict keys that are the same tensor as another key.
        layers: per frozen GBLR layer, its metadata (name, class, shapes, intervals...).
        model_spec: the model description :func:`load` rebuilds from, or ``None``.
        root: class name of the saved model.
        gblr_version: the version that wrote the file.

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

    def state_dict(self) -> dict[str, Tensor]:
        """Every state-dict key, aliases included, mapped to its tensor."""
        state = dict(self.tensors)
        for key, stored in self.aliases.items():
            state[key] = self.tensors[stored]
        return state


def load_checkpoint(path: str | os.PathLike) -> FrozenCheckpoint:
    """Read and verify a file written by :func:`gblr.save`, without building a model.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a gblr frozen-model file, is truncated, or its
            checksum does not match (modified or corrupted); the message names the path
            and the reason.

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
        ValueError
    """
    path = Path(path)
    data = path.read_bytes()

    def refuse(reason: str) -> ValueError:
        return ValueError(f"cannot load {str(path)!r}: {reason}")

    if len(data) < 8:
        raise refuse(f"truncated or not a safetensors file ({len(data)} bytes)")
    header_size = int.from_bytes(data[:8], "little")
    if 8 + header_size > len(data):
        raise refuse(
            f"truncated or not a safetensors file: header of {header_size} bytes announced, "
            f"file has {len(data)} bytes"
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(f"the safetensors header is not valid JSON ({error})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise refuse(
            "not a frozen GBLR model file (no 'gblr.frozen' metadata); it must be written "
            "by gblr.save"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise refuse(
            f"format version {metadata.get('format_version')!r} is not supported "
            f"(this gblr reads version {FORMAT_VERSION})"
        )
    try:
        ends = [int(info["data_offsets"][1]) for k, info in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, ValueError, IndexError):
        raise refuse("the safetensors header has malformed tensor entries") from None
    expected, available = max(ends, default=0), len(data) - 8 - header_size
    if available < expected:
        raise refuse(f"truncated: tensor data needs {expected} bytes, file has {available}")
    if available > expected:
        raise refuse(f"{available - expected} unexpected bytes after the tensor data")
    try:
        tensors = _safetensors().load(data)
    except Exception as error:  # safetensors raises its own error types
        raise refuse(f"unreadable tensor data ({error})") from None
    structure_text = metadata.get("structure", "")
    digest = _digest(structure_text, tensors)
    if digest != metadata.get("sha256"):
        raise refuse(
            "checksum mismatch: the tensors or the structure metadata were modified or "
            f"corrupted after saving (stored sha256 {metadata.get('sha256')!r}, "
            f"computed {digest!r})"
        )
    structure = json.loads(structure_text)
    return FrozenCheckpoint(
        path=path,
        tensors=tensors,
        aliases=dict(structure["aliases"]),
        layers=tuple(structure["layers"]),
        model_spec=structure["model"],
        root=structure["root"],
        gblr_version=metadata.get("gblr_version", "unknown"),
    )


_REPLACEABLE = {
    "FrozenGBLRLinear": (nn.Linear, GBLRLinear, FrozenGBLRLinear),
    "FrozenGBLRConv2d": (nn.Conv2d, GBLRConv2d, FrozenGBLRConv2d),
}


def _matrix_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, (GBLRLinear, GBLRConv2d, FrozenGBLRMatrix)):
        return module.matrix_shape
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (module.out_channels, module.in_channels // module.groups * kh * kw)
    return None


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
        if not isinstance(current, allowed) or _matrix_shape(current) != (
            entry["out"],
            entry["in"],
        ):
            raise ValueError(
                f"cannot load {str(path)!r}: module {name!r} of the model from model_factory "
                f"is {type(current).__name__} with matrix shape {_matrix_shape(current)}; the "
                f"file has a {entry['class']} of shape ({entry['out']}, {entry['in']}) there "
                f"(replaceable: {', '.join(t.__name__ for t in allowed)} of that shape)"
            )
        if frozen is None:
            device = next(iter(current.parameters()), torch.empty(0)).device
            frozen = _frozen_from_entry(entry, device)
        if name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, frozen)
        else:
            model = frozen
    return model


def load(
    path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """Load a model saved by :func:`gblr.save`, in eval mode.

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
    ``ValueError`` asks for ``model_factory``; :func:`load_checkpoint` returns the
    verified tensors and metadata in every case.

    Args:
        path: a file written by :func:`gblr.save`.
        model_factory: ``() -> nn.Module``, or ``None``.

    Returns:
        The model (on CPU when rebuilt from the file), with stored plan choices restored.

    Raises:
        ValueError: the file is damaged (see :func:`load_checkpoint`), the model cannot be
            rebuilt without a factory, or the factory's model does not match the file.
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
    if model_factory is not None and not callable(model_factory):
        raise TypeError(
            f"model_factory must be a callable returning an nn.Module, or None, got "
            f"{type(model_factory).__name__}"
        )
    checkpoint = load_checkpoint(path)
    path = checkpoint.path
    entries = {entry["name"]: entry for entry in checkpoint.layers}
    if model_factory is None:
        if checkpoint.model_spec is None:
            raise ValueError(
                f"cannot rebuild {str(path)!r} without code: it holds a {checkpoint.root}, and "
                "only frozen GBLR layers and nn.Sequential of Linear, Conv2d, LayerNorm, "
                "activations and frozen layers are rebuilt from the file; pass model_factory "
                "(a function that builds the architecture), or use "
                "gblr.deploy.load_checkpoint for the tensors and metadata"
            )
        model = _build(checkpoint.model_spec, "", entries)
        for entry in checkpoint.layers:
            for alias in entry["aliases"]:  # a shared layer is one module again
                parent_name, _, child = alias.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, model.get_submodule(entry["name"]))
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
    return model.eval()
