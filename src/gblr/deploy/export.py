"""ONNX export of a frozen GBLR model.

A frozen layer's ``segment``, ``panels`` and ``blocksparse`` plans are Python loops over
slices chosen from the integer intervals, and ``triton`` is a custom kernel: none is a
graph an ONNX runtime can run well. What exports is the product a layer computes, in one
of two plain forms that every runtime optimizes: ``dense`` (one ``Gemm``/``Conv`` with
the materialized matrix) and ``lowrank`` (two, through the ``K r`` padded rank). So
[`export_onnx`][gblr.deploy.export.export_onnx] exports a copy of the model in which every frozen
layer is replaced by ``nn.Linear``/``nn.Conv2d`` modules holding those matrices; the model itself is
left untouched.

The file's inputs and outputs have names (the forward's parameter names or the keys of a
tokenizer's output; the keys of a Hugging Face ``ModelOutput``), and every dimension that
varies is a named symbolic axis (the batch; the sequence of token inputs): the check runs
the file at the example's shape and at a second one.
"""

from __future__ import annotations

import copy
import inspect
import logging
import numbers
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import replacement_target
from ..layers.base import GBLRMatrixMixin
from ..modules import set_submodule
from .frozen import FrozenGBLRConv2d, FrozenGBLRMatrix

__all__ = ["ONNX_PLANS", "OnnxExport", "export_onnx"]

ONNX_PLANS = ("auto", "dense", "lowrank")
# The oldest opset torch's (dynamo) ONNX exporter writes without converting.
MIN_OPSET = 18
# The metadata key of the files export_onnx writes: an existing file without it is not
# replaced unless the caller says so.
EXPORT_MARK = "gblr.export_onnx"


@dataclass
class OnnxExport:
    """What [`export_onnx`][gblr.deploy.export.export_onnx] wrote.

    Attributes:
        path: the ``.onnx`` file (tensors over 2 GB go to ``path`` + ``.data`` next to it).
        plans: frozen layer name -> ``"dense"`` or ``"lowrank"``, the form exported.
        macs: MACs per input row (output position for convs) of the exported forms,
            summed over the frozen layers; ``gblr_macs`` is what their GBLR structure
            costs, ``dense_macs`` the dense layers' cost.
        max_abs_error: largest ``|onnxruntime - torch|`` over the outputs, on the example
            input and on the second shape of the check, or ``None`` when not checked.
        inputs, outputs: the file's input and output names, in order, each with its
            shape: an int for a fixed dimension, the axis name for a symbolic one
            (``{"input_ids": ["batch", "sequence"]}``).
        checked_shapes: the input shapes onnxruntime ran (the example's, then one with
            every symbolic axis changed), ``[]`` when not checked.

    Examples:
        >>> from pathlib import Path
        >>> from gblr.deploy import OnnxExport
        >>> print(OnnxExport(Path("m.onnx"), {"fc": "lowrank"}, 384, 384, 2048, 1.2e-7,
        ...                  {"input": ["batch", 32]}, {"output": ["batch", 4]}))
        m.onnx: 1 frozen layers exported (dense 0, lowrank 1); their MACs 384 (GBLR structure
        384, dense 2,048); onnxruntime max |error| 1.20e-07; inputs input [batch, 32];
        outputs output [batch, 4]
    """

    path: Path
    plans: dict[str, str] = field(default_factory=dict)
    macs: int = 0
    gblr_macs: int = 0
    dense_macs: int = 0
    max_abs_error: float | None = None
    inputs: dict[str, list[int | str]] = field(default_factory=dict)
    outputs: dict[str, list[int | str]] = field(default_factory=dict)
    checked_shapes: list[dict[str, list[int]]] = field(default_factory=list)

    def __str__(self) -> str:
        counts = {name: list(self.plans.values()).count(name) for name in ("dense", "lowrank")}
        checked = (
            "not checked"
            if self.max_abs_error is None
            else f"onnxruntime max |error| {self.max_abs_error:.2e}"
        )
        text = (
            f"{self.path}: {len(self.plans)} frozen layers exported "
            f"(dense {counts['dense']}, lowrank {counts['lowrank']}); their MACs "
            f"{self.macs:,} (GBLR structure {self.gblr_macs:,}, dense {self.dense_macs:,}); "
            f"{checked}"
        )
        for title, values in (("inputs", self.inputs), ("outputs", self.outputs)):
            if values:
                shown = ", ".join(
                    f"{name} [{', '.join(str(d) for d in shape)}]" for name, shape in values.items()
                )
                text += f"; {title} {shown}"
        return text


def _plain_forms(layer: FrozenGBLRMatrix, plan: str) -> tuple[nn.Module, str, int]:
    """``(module, plan, MACs per row)``: ``layer`` as plain ``nn`` modules in ``plan``."""
    u, v = (t.detach() for t in layer._factors())  # padded (m, K r), (K r, n)
    rank = u.shape[1]
    m, n = layer.matrix_shape
    if plan == "auto":
        plan = "lowrank" if rank * (m + n) < m * n else "dense"
    if rank == 0 and isinstance(layer, FrozenGBLRConv2d):
        plan = "dense"  # no component: the zero kernel (a 0-channel conv is refused)
    factory = {"device": u.device, "dtype": u.dtype}
    bias = layer.bias is not None
    if isinstance(layer, FrozenGBLRConv2d):
        conv = {
            "stride": layer.stride,
            "padding": layer.padding,
            "dilation": layer.dilation,
        }
        if plan == "dense":
            module: nn.Module = nn.Conv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, bias=bias,
                **conv, **factory,
            )  # fmt: skip
            weights = [layer.dense_kernel()]
        else:
            module = nn.Sequential(
                nn.Conv2d(layer.in_channels, rank, layer.kernel_size, bias=False, **conv,
                          **factory),
                nn.Conv2d(rank, layer.out_channels, 1, bias=bias, **factory),
            )  # fmt: skip
            weights = [
                v.reshape(rank, layer.in_channels, *layer.kernel_size),
                u.reshape(layer.out_channels, rank, 1, 1),
            ]
    else:
        if plan == "dense":
            module = nn.Linear(n, m, bias=bias, **factory)
            weights = [layer.dense_weight()]
        else:
            module = nn.Sequential(
                nn.Linear(n, rank, bias=False, **factory),
                nn.Linear(rank, m, bias=bias, **factory),
            )
            weights = [v, u]
    linears = [module] if plan == "dense" else list(module)
    with torch.no_grad():
        for target, weight in zip(linears, weights, strict=True):
            target.weight.copy_(weight)
        if bias:
            linears[-1].bias.copy_(layer.bias)
    macs = m * n if plan == "dense" else rank * (m + n)
    return module.eval(), plan, macs


def _tensor_leaves(value: object) -> list[Tensor]:
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, Tensor)]


def _output_names(output: object) -> list[str]:
    """Names of the tensors in a model's output, in the exporter's (pytree) order: the key
    path (``last_hidden_state``, ``logits``, ``hidden_states.2``), ``output`` for a
    single tensor and ``output_0``, ``output_1``, ... for a tuple."""
    from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten_with_path

    if isinstance(output, Tensor):
        return ["output"]
    names = []
    for path, leaf in tree_flatten_with_path(output)[0]:
        if not isinstance(leaf, Tensor):
            continue
        parts = []
        for key in path:
            if isinstance(key, MappingKey):
                parts.append(str(key.key))
            elif isinstance(key, SequenceKey):
                parts.append(str(key.idx))
            else:  # an attribute (GetAttrKey) or a key type of a library's own
                parts.append(str(getattr(key, "name", key)))
        names.append(".".join(parts) if parts else "output")
    if names and all(name.isdigit() for name in names):  # a flat tuple
        names = [f"output_{name}" for name in names]
    return names


def _example_arguments(example_input: object) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """``(args, kwargs)`` of the model's call from ``example_input``."""
    if isinstance(example_input, Tensor):
        return (example_input,), {}
    if (
        isinstance(example_input, tuple)
        and example_input
        and all(isinstance(x, Tensor) for x in example_input)
    ):
        return example_input, {}
    if (
        isinstance(example_input, Mapping)
        and example_input
        and all(isinstance(k, str) and isinstance(x, Tensor) for k, x in example_input.items())
    ):
        return (), dict(example_input)
    raise TypeError(
        "example_input must be a tensor, a non-empty tuple of tensors (positional inputs) "
        "or a non-empty mapping of names to tensors (keyword inputs, e.g. a tokenizer's "
        f"output), got {type(example_input).__name__}"
    )


def _signature_names(model: nn.Module) -> tuple[list[str], bool]:
    """The forward's positional parameter names, and whether it takes ``*args``."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read
        return [], True
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [item.name for item in parameters if item.kind in kinds]
    return names, any(item.kind == inspect.Parameter.VAR_POSITIONAL for item in parameters)


def _default_input_names(
    model: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]
) -> list[str]:
    """The forward's parameter names for positional inputs (``input_0``, ... past them),
    the keys for keyword inputs."""
    if kwargs:
        return list(kwargs)
    names, _ = _signature_names(model)
    return [names[i] if i < len(names) else f"input_{i}" for i in range(len(args))]


def _ordered_kwargs(model: nn.Module, kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keyword inputs in the forward's parameter order (the order of the file's inputs);
    keys the signature does not name (``**kwargs``) follow in their own order."""
    names, _ = _signature_names(model)
    known = [name for name in names if name in kwargs]
    return {name: kwargs[name] for name in known + [k for k in kwargs if k not in known]}


def _check_names(argument: str, names: object, count: int, defaults: list[str]) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{argument} must be a list of str, got {names!r}")
    names = list(names)
    if not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"{argument} must be a list of non-empty str, got {names!r}")
    if len(names) != count:
        raise ValueError(
            f"{argument} must name all {count} of them (the defaults: {defaults}), got "
            f"{len(names)}: {names}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{argument} must be distinct, got {names}")
    return names


def _default_axes(inputs: dict[str, Tensor], dynamic_batch: bool) -> dict[str, dict[int, str]]:
    """``batch`` on dimension 0 of every input (with ``dynamic_batch``) and ``sequence``
    on dimension 1 of token inputs (integer or bool tensors of 2 or more dimensions:
    token ids, attention masks, token type ids)."""
    axes: dict[str, dict[int, str]] = {}
    for name, x in inputs.items():
        dims: dict[int, str] = {}
        if dynamic_batch and x.dim() >= 1:
            dims[0] = "batch"
        if x.dim() >= 2 and not x.is_floating_point() and not x.is_complex():
            dims[1] = "sequence"
        if dims:
            axes[name] = dims
    return axes


def _check_axes(dynamic_axes: object, inputs: dict[str, Tensor]) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` as ``{input name: {dimension >= 0: axis name}}``."""
    if not isinstance(dynamic_axes, Mapping):
        raise TypeError(
            "dynamic_axes must be a mapping of input names to {dimension: axis name} (or to "
            f"a list of dimensions), got {type(dynamic_axes).__name__}"
        )
    axes: dict[str, dict[int, str]] = {}
    for name, dims in dynamic_axes.items():
        if name not in inputs:
            raise ValueError(
                f"dynamic_axes names input {name!r}, which the file does not have; its "
                f"inputs: {list(inputs)}"
            )
        rank = inputs[name].dim()
        if isinstance(dims, Mapping):
            pairs = list(dims.items())
        elif isinstance(dims, Sequence) and not isinstance(dims, str):
            pairs = [(dim, f"{name}_dim{dim}") for dim in dims]
        else:
            raise TypeError(
                f"dynamic_axes[{name!r}] must be {{dimension: axis name}} or a list of "
                f"dimensions, got {dims!r}"
            )
        checked: dict[int, str] = {}
        for dim, axis in pairs:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise TypeError(f"dynamic_axes[{name!r}] dimensions must be ints, got {dim!r}")
            if not -rank <= dim < rank:
                raise ValueError(
                    f"dynamic_axes[{name!r}] has dimension {dim}, and input {name!r} has "
                    f"{rank} (shape {tuple(inputs[name].shape)})"
                )
            if not isinstance(axis, str) or not axis:
                raise TypeError(
                    f"dynamic_axes[{name!r}][{dim}] must be an axis name (a non-empty str), "
                    f"got {axis!r}"
                )
            checked[dim % rank] = axis
        if checked:
            axes[name] = checked
    return axes


def _resize(
    inputs: dict[str, Tensor], axes: dict[str, dict[int, str]], size: dict[str, int]
) -> dict[str, Tensor]:
    """``inputs`` with every dimension of axis ``a`` brought to ``size[a]``: cut, or
    repeated (so that token ids and masks stay valid)."""
    resized = {}
    for name, x in inputs.items():
        for dim, axis in axes.get(name, {}).items():
            target = size[axis]
            while x.shape[dim] < target:
                x = torch.cat([x, x], dim)
            x = x.narrow(dim, 0, target)
        resized[name] = x
    return resized


class _DropFailedFolding(logging.Filter):
    """Drops onnxscript's "Evaluation failed" warnings: its constant folding tries
    onnx's reference implementation on constant subgraphs and, when that fails (BERT's
    ``token_type_ids`` gather at a fixed sequence length), keeps the node as it is and
    logs the failure. Nothing is wrong with the exported model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Evaluation failed")


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's harmless noise off, for the export only: the failed constant
    folding above, and torch's warning that two inputs' batch axes share one name."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    quiet = _DropFailedFolding()
    folding.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            yield
    finally:
        folding.removeFilter(quiet)


def export_onnx(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    plan: str = "auto",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    opset_version: int | None = None,
    overwrite: bool = False,
) -> OnnxExport:
    """Export a frozen model to ONNX, each frozen layer as a dense or a low-rank product.

    The model is copied; in the copy every [`FrozenGBLRLinear`][gblr.FrozenGBLRLinear] /
    [`FrozenGBLRConv2d`][gblr.FrozenGBLRConv2d] becomes ``nn.Linear``/``nn.Conv2d`` modules, and the
    copy is exported with ``torch.onnx.export(dynamo=True)``. The file is written to a
    temporary name, checked with ``onnxruntime`` when it is installed, and only then
    renamed to ``path``: a failed export leaves no partial file. Nothing is printed. A
    transformers model's key-value cache (``config.use_cache``, an object that is no ONNX
    output) is off while it exports, and back on after.

    Args:
        model: a model after [`gblr.freeze`][] (training-form GBLR layers are refused).
        example_input: the model's inputs for tracing and the check: a tensor, a tuple
            of positional inputs, or a mapping of keyword inputs (a tokenizer's output,
            ``{"input_ids": (B, S), "attention_mask": (B, S)}``).
        path: the ``.onnx`` file to write, in a folder that exists. A symbolic link is
            followed (its target is written, the link stays); a read-only file is refused.
        plan: ``"auto"`` (per layer, whichever of dense and low-rank costs fewer MACs:
            ``out * in`` against ``K r (out + in)`` over the padded rank), ``"dense"`` or
            ``"lowrank"``.
        input_names: the file's input names, one per input (default: the forward's
            parameter names, ``input_ids``, or the mapping's keys).
        output_names: the file's output names, one per output tensor (default: the
            output's keys, ``last_hidden_state`` and ``pooler_output`` for a Hugging Face
            encoder; ``output`` for one tensor, ``output_0``, ``output_1``, ... for a tuple).
        dynamic_axes: the symbolic dimensions, by input name (as named in the file):
            ``{"input_ids": {0: "batch", 1: "sequence"}}`` (dimensions of inputs
            sharing an axis name have one size), or a list of dimensions (named
            ``<input>_dim<d>``); inputs not named are fixed. ``None`` (default): dimension
            0 of every input is ``batch`` (with ``dynamic_batch``) and dimension 1 of
            every integer or bool input of 2 or more dimensions (token ids, masks) is
            ``sequence``; a float input's other dimensions (an image's height) stay fixed.
        dynamic_batch: with ``dynamic_axes=None``, export a symbolic batch dimension
            (default) or the example's size (ignored when ``dynamic_axes`` is given).
        check: run the exported file in ``onnxruntime`` and compare with the model, on
            the example input and, when the file has symbolic axes, on a second input in
            which every symbolic axis has another size (the example cut by one along it,
            or repeated where its size is 1), so a size the trace fixed is caught
            (skipped, ``max_abs_error=None``, when onnxruntime is missing, or with a
            warning when its CPU provider cannot run the model: bfloat16).
        opset_version: ONNX opset, an int from 18 (the oldest torch's exporter writes);
            ``None`` for the exporter's default.
        overwrite: replace an existing file at ``path`` that ``export_onnx`` did not
            write (its files carry a ``gblr.export_onnx`` metadata entry); an earlier
            export is replaced without it.

    Returns:
        An `OnnxExport` (path, per-layer plan, MACs, checked error, the file's
        input and output names and shapes).

    Raises:
        TypeError: an argument of the wrong type (named, with what is allowed).
        ValueError: a bad ``plan``, a model with training-form GBLR layers, names of the
            wrong count, a ``dynamic_axes`` entry for an input the file does not have or
            a dimension it does not have, or an exported file whose outputs differ from
            the model's (at either checked shape).
        PermissionError: ``path`` is a read-only file.
        ImportError: the ``onnx``/``onnxscript`` packages are missing
            (``pip install "gblr[onnx]"``).

    Examples:
        >>> import tempfile, torch, gblr
        >>> from torch import nn
        >>> model = nn.Sequential(gblr.GBLRLinear(32, 64, num_components=4), nn.ReLU(),
        ...                       nn.Linear(64, 4))
        >>> frozen = gblr.freeze(model.eval())
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     done = gblr.export_onnx(frozen, torch.randn(3, 32), f"{folder}/model.onnx")
        >>> done.plans, done.macs, done.max_abs_error < 1e-5  # 4 (64 + 32) MACs, not 64 * 32
        ({'0': 'lowrank'}, 384, True)
        >>> done.inputs, done.outputs
        ({'input': ['batch', 32]}, {'output': ['batch', 4]})
    """
    if not isinstance(plan, str) or plan not in ONNX_PLANS:
        raise ValueError(f"plan must be one of {ONNX_PLANS}, got {plan!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for flag, value in (("dynamic_batch", dynamic_batch), ("check", check)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if opset_version is not None:
        # torch's exporter writes opset 18 and up; an older one it tries to convert to,
        # printing a traceback, and writes 18 when that fails
        if isinstance(opset_version, bool) or not isinstance(opset_version, numbers.Integral):
            raise TypeError(f"opset_version must be an int >= 18 or None, got {opset_version!r}")
        if opset_version < MIN_OPSET:
            raise ValueError(
                f"opset_version must be >= {MIN_OPSET} (torch's ONNX exporter writes opset "
                f"{MIN_OPSET} and up) or None, got {opset_version}"
            )
        opset_version = int(opset_version)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    folder = Path(path).expanduser().parent
    if Path(path).expanduser().is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; give a file name such as model.onnx")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if Path(path).expanduser().exists() and not overwrite and not _exported_here(Path(path)):
        raise FileExistsError(
            f"{str(path)!r} already exists and was not written by gblr.export_onnx; it is "
            "not replaced unless you pass overwrite=True"
        )
    if not folder.is_dir():  # as gblr.save: a mistyped folder is not created
        raise ValueError(f"path's folder {str(folder)!r} does not exist")
    training_form = [
        name for name, module in model.named_modules() if isinstance(module, GBLRMatrixMixin)
    ]
    if training_form:
        raise ValueError(
            f"model has GBLR layers in training form ({', '.join(training_form[:5]) or 'the model'}"
            f"{', ...' if len(training_form) > 5 else ''}): call gblr.freeze(model) first, "
            "which makes their exact inference form"
        )
    args, kwargs = _example_arguments(example_input)
    if kwargs:
        kwargs = _ordered_kwargs(model, kwargs)
    defaults = _default_input_names(model, args, kwargs)
    names = (
        defaults
        if input_names is None
        else _check_names("input_names", input_names, len(defaults), defaults)
    )
    inputs = dict(zip(names, (*args, *kwargs.values()), strict=True))
    axes = (
        _default_axes(inputs, dynamic_batch)
        if dynamic_axes is None
        else _check_axes(dynamic_axes, inputs)
    )
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"export_onnx needs the onnx and onnxscript packages ({error}); "
            'install them with: pip install "gblr[onnx]"'
        ) from error

    # A transformers model returns its key-value cache by default (use_cache): an object
    # that is no ONNX output. The export and its check run without it; restored after.
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is True:
        config.use_cache = False
        try:
            return export_onnx(
                model,
                example_input,
                path,
                plan=plan,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                dynamic_batch=dynamic_batch,
                check=check,
                opset_version=opset_version,
            )
        finally:
            config.use_cache = True

    # The model's own outputs: their names, and the reference of the check.
    expected = _run_model(model, args, kwargs)
    outputs = _output_names(expected)
    if output_names is not None:
        outputs = _check_names("output_names", output_names, len(outputs), outputs)

    exported = copy.deepcopy(model).eval()
    report = OnnxExport(path=Path(path).expanduser())
    replaced: dict[int, nn.Module] = {}  # a layer shared under several names stays shared
    for name, module in list(exported.named_modules(remove_duplicate=False)):
        if not isinstance(module, FrozenGBLRMatrix):
            continue
        if id(module) not in replaced:
            plain, chosen, macs = _plain_forms(module, plan)
            replaced[id(module)] = plain
            report.plans[name] = chosen
            report.macs += macs
            report.gblr_macs += module.flops()
            report.dense_macs += module.dense_flops()
        set_submodule(exported, name, replaced[id(module)])

    # torch.export treats a size of 1 as a constant: trace on 2 along every symbolic axis.
    sizes = {
        axis: inputs[name].shape[dim] for name, dims in axes.items() for dim, axis in dims.items()
    }
    trace = _resize(inputs, axes, {axis: max(2, size) for axis, size in sizes.items()})
    dynamic = torch.export.Dim.DYNAMIC
    shapes = [{dim: dynamic for dim in axes[name]} if name in axes else None for name in names]
    trace_values = list(trace.values())

    target = report.path
    # As gblr.save: a link's target is written (the link stays), a read-only file refused.
    target = replacement_target(target)
    workdir = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        staged = workdir / target.name
        with _quiet_exporter():
            try:
                program = torch.onnx.export(
                    exported,
                    tuple(trace_values) if not kwargs else (),
                    kwargs=dict(zip(kwargs, trace_values, strict=True)) if kwargs else None,
                    dynamo=True,
                    dynamic_shapes=(
                        tuple(shapes) if not kwargs else dict(zip(kwargs, shapes, strict=True))
                    ),
                    input_names=names,
                    output_names=outputs,
                    opset_version=opset_version,
                    verbose=False,
                )
            except Exception as error:
                if axes and hasattr(error, "add_note"):  # Python 3.11+
                    error.add_note(
                        f"gblr.export_onnx exported these axes as symbolic: {axes}; if the "
                        "model fixes one of them, give dynamic_axes= with only those that vary"
                    )
                raise
            report.inputs, report.outputs = _name_axes(program, axes)
            program.model.metadata_props[EXPORT_MARK] = "1"  # (what _exported_here reads)
            program.save(
                str(staged),
                # One file unless the tensors pass protobuf's 2 GB limit.
                external_data=sum(
                    t.numel() * t.element_size() for t in exported.state_dict().values()
                )
                > 1_500_000_000,
            )
        if check:
            _check_file(staged, model, inputs, kwargs, expected, axes, sizes, report)
        for produced in sorted(workdir.iterdir()):  # the model, and external data if any
            os.replace(produced, target.parent / produced.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _exported_here(path: Path) -> bool:
    """Whether ``path`` is an ONNX file `export_onnx` wrote (its metadata holds
    ``EXPORT_MARK``); ``False`` for anything else, a file it cannot read included."""
    try:
        import onnx

        model = onnx.load(str(path.expanduser()), load_external_data=False)
    except Exception:  # not ONNX, unreadable, or no onnx installed: not ours
        return False
    return any(entry.key == EXPORT_MARK for entry in model.metadata_props)


def _run_model(model: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> Any:
    """The model's output in eval mode (its mode restored)."""
    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(*args, **kwargs)
    finally:
        model.train(was_training)


def _name_axes(
    program: Any, axes: dict[str, dict[int, str]]
) -> tuple[dict[str, list[int | str]], dict[str, list[int | str]]]:
    """Give the exported program's symbolic dimensions the axis names (the exporter's are
    ``s0``, ``s1``, ...); return the inputs' and outputs' shapes."""
    graph = program.model.graph
    mapping: dict[str, str] = {}
    for value in graph.inputs:
        for dim, axis in axes.get(value.name, {}).items():
            symbol = value.shape[dim]
            if not isinstance(symbol, int) and getattr(symbol, "value", None) is not None:
                mapping.setdefault(symbol.value, axis)
    if mapping:
        program.rename_axes(mapping)

    def shapes(values: Sequence[Any]) -> dict[str, list[int | str]]:
        return {
            value.name: [
                d if isinstance(d, int) else str(getattr(d, "value", d)) for d in value.shape
            ]
            for value in values
        }

    return shapes(graph.inputs), shapes(graph.outputs)


def _check_file(
    path: Path,
    model: nn.Module,
    inputs: dict[str, Tensor],
    kwargs: dict[str, Tensor],
    expected: Any,
    axes: dict[str, dict[int, str]],
    sizes: dict[str, int],
    report: OnnxExport,
) -> None:
    """Run the file at the example's shapes and, with symbolic axes, at other sizes of
    every one; record the largest error and the shapes in ``report``."""
    try:
        import onnxruntime
    except ImportError:
        return
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as Unsupported

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Unsupported as error:  # e.g. bfloat16 Gemm: a valid model the CPU cannot run
        _unchecked(error)
        return
    cases = [(inputs, expected)]
    if sizes:
        other = _resize(inputs, axes, {a: size - 1 if size > 1 else 2 for a, size in sizes.items()})
        values = list(other.values())
        positional = () if kwargs else tuple(values)
        keywords = dict(zip(kwargs, values, strict=True)) if kwargs else {}
        try:
            reference = _run_model(model, positional, keywords)
        except Exception as error:
            shown = {name: list(x.shape) for name, x in other.items()}
            raise ValueError(
                f"the model does not run at the second shape of the check ({shown}: every "
                f"symbolic axis {sorted(sizes)} resized), so these axes do not vary freely; "
                "give dynamic_axes (or check=False)"
            ) from error
        cases.append((other, reference))
    worst = 0.0
    for feeds, reference in cases:
        try:
            got = session.run(None, {name: x.detach().cpu().numpy() for name, x in feeds.items()})
        except Unsupported as error:
            _unchecked(error)
            return
        worst = max(worst, _compare(got, _tensor_leaves(reference), feeds))
        report.checked_shapes.append({name: list(x.shape) for name, x in feeds.items()})
    report.max_abs_error = worst


def _unchecked(error: Exception) -> None:
    warnings.warn(
        f"onnxruntime's CPU provider cannot run the exported model ({error}); it was "
        "written without the check",
        stacklevel=4,
    )


def _compare(got: list[Any], expected: list[Tensor], feeds: dict[str, Tensor]) -> float:
    """Max ``|onnxruntime - model|``; raise when it exceeds float rounding."""
    if len(got) != len(expected):
        raise ValueError(f"exported model has {len(got)} outputs, the model {len(expected)}")
    worst = 0.0
    for produced, reference in zip(got, expected, strict=True):
        # Both compute the same products with different summation orders: allow a few
        # rounding steps of the output's precision.
        relative = max(1e-4, 8 * torch.finfo(reference.dtype).eps)
        reference = reference.detach().float().cpu()
        produced = torch.as_tensor(produced).float()
        if produced.shape != reference.shape:
            raise ValueError(
                f"exported model's output has shape {tuple(produced.shape)}, the model's "
                f"{tuple(reference.shape)}, at input shapes "
                f"{ {name: list(x.shape) for name, x in feeds.items()} }; the file was not written"
            )
        error = (produced - reference).abs().max().item() if reference.numel() else 0.0
        tolerance = relative * max(1.0, reference.abs().max().item() if reference.numel() else 0.0)
        if not error <= tolerance:
            raise ValueError(
                f"exported model's output differs from the model's by {error:.3g} "
                f"(tolerance {tolerance:.3g}) at input shapes "
                f"{ {name: list(x.shape) for name, x in feeds.items()} }; the file was not written"
            )
        worst = max(worst, error)
    return worst
