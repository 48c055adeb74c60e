"""ONNX export of a frozen GBLR model.

A frozen layer's ``segment``, ``panels`` and ``blocksparse`` plans are Python loops over
slices chosen from the integer intervals, and ``triton`` is a custom kernel: none is a
graph an ONNX runtime can run well. What exports is the product a layer computes, in one
of two plain forms that every runtime optimizes: ``dense`` (one ``Gemm``/``Conv`` with
the materialized matrix) and ``lowrank`` (two, through the ``K r`` padded rank). So
:func:`export_onnx` exports a copy of the model in which every frozen layer is replaced
by ``nn.Linear``/``nn.Conv2d`` modules holding those matrices; the model itself is left
untouched.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files import replacement_target
from ..layers.base import GBLRMatrixMixin
from ..modules import set_submodule
from .frozen import FrozenGBLRConv2d, FrozenGBLRMatrix

__all__ = ["ONNX_PLANS", "OnnxExport", "export_onnx"]

ONNX_PLANS = ("auto", "dense", "lowrank")


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file (tensors over 2 GB go to ``path`` + ``.data`` next to it).
        plans: frozen layer name -> ``"dense"`` or ``"lowrank"``, the form exported.
        macs: MACs per input row (output position for convs) of the exported forms,
            summed over the frozen layers; ``gblr_macs`` is what their GBLR structure
            costs, ``dense_macs`` the dense layers' cost.
        max_abs_error: largest ``|onnxruntime - torch|`` over the outputs on the example
            input, or ``None`` when not checked.

    Examples:
        >>> from pathlib import Path
        >>> from gblr.deploy import OnnxExport
        >>> print(OnnxExport(Path("m.onnx"), {"fc": "lowrank"}, 384, 384, 2048, 1.2e-7))
        m.onnx: 1 frozen layers exported (dense 0, lowrank 1); their MACs 384 (GBLR structure
        384, dense 2,048); onnxruntime max |error| 1.20e-07
    """

    path: Path
    plans: dict[str, str] = field(default_factory=dict)
    macs: int = 0
    gblr_macs: int = 0
    dense_macs: int = 0
    max_abs_error: float | None = None

    def __str__(self) -> str:
        counts = {name: list(self.plans.values()).count(name) for name in ("dense", "lowrank")}
        checked = (
            "not checked"
            if self.max_abs_error is None
            else f"onnxruntime max |error| {self.max_abs_error:.2e}"
        )
        return (
            f"{self.path}: {len(self.plans)} frozen layers exported "
            f"(dense {counts['dense']}, lowrank {counts['lowrank']}); their MACs "
            f"{self.macs:,} (GBLR structure {self.gblr_macs:,}, dense {self.dense_macs:,}); "
            f"{checked}"
        )


def _plain_forms(layer: FrozenGBLRMatrix, plan: str) -> tuple[nn.Module, str, int]:
    """``(module, plan, MACs per row)``: ``layer`` as plain ``nn`` modules in ``plan``."""
    u, v = (t.detach() for t in layer._factors())  # padded (m, K r), (K r, n)
    rank = u.shape[1]
    m, n = layer.matrix_shape
    if plan == "auto":
        plan = "lowrank" if rank * (m + n) < m * n else "dense"
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


def export_onnx(
    model: nn.Module,
    example_input: Tensor | tuple,
    path: str | os.PathLike,
    *,
    plan: str = "auto",
    dynamic_batch: bool = True,
    check: bool = True,
    opset_version: int | None = None,
) -> OnnxExport:
    """Export a frozen model to ONNX, each frozen layer as a dense or a low-rank product.

    The model is copied; in the copy every :class:`~gblr.FrozenGBLRLinear` /
    :class:`~gblr.FrozenGBLRConv2d` becomes ``nn.Linear``/``nn.Conv2d`` modules, and the
    copy is exported with ``torch.onnx.export(dynamo=True)``. The file is written to a
    temporary name, checked with ``onnxruntime`` when it is installed, and only then
    renamed to ``path``: a failed export leaves no partial file.

    Args:
        model: a model after :func:`gblr.freeze` (training-form GBLR layers are refused).
        example_input: a tensor, or a tuple of positional inputs, for tracing and the
            check. With ``dynamic_batch``, dimension 0 of every tensor input is exported
            as a symbolic batch size.
        path: the ``.onnx`` file to write. A symbolic link is followed (its target is
            written, the link stays); a read-only file is refused.
        plan: ``"auto"`` (per layer, whichever of dense and low-rank costs fewer MACs:
            ``out * in`` against ``K r (out + in)`` over the padded rank), ``"dense"`` or
            ``"lowrank"``.
        dynamic_batch: export a symbolic batch dimension (default) or the example's size.
        check: run the exported file in ``onnxruntime`` on the example input and compare
            with the model (skipped, ``max_abs_error=None``, when onnxruntime is missing,
            or with a warning when its CPU provider cannot run the model: bfloat16).
        opset_version: ONNX opset; ``None`` for the exporter's default.

    Returns:
        An :class:`OnnxExport` (path, per-layer plan, MACs, checked error).

    Raises:
        ValueError: a bad ``plan``, a model with training-form GBLR layers, or an
            exported file whose outputs differ from the model's.
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
    """
    if plan not in ONNX_PLANS:
        raise ValueError(f"plan must be one of {ONNX_PLANS}, got {plan!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    training_form = [
        name for name, module in model.named_modules() if isinstance(module, GBLRMatrixMixin)
    ]
    if training_form:
        raise ValueError(
            f"model has GBLR layers in training form ({', '.join(training_form[:5]) or 'the model'}"
            f"{', ...' if len(training_form) > 5 else ''}): call gblr.freeze(model) first, "
            "which makes their exact inference form"
        )
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError(
            "example_input must be a tensor or a tuple of tensors, got "
            f"{type(example_input).__name__}"
        )
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"export_onnx needs the onnx and onnxscript packages ({error}); "
            'install them with: pip install "gblr[onnx]"'
        ) from error

    exported = copy.deepcopy(model).eval()
    report = OnnxExport(path=Path(path))
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

    trace_inputs = inputs
    dynamic_shapes = None
    if dynamic_batch:
        # torch.export treats a size of 1 as a constant: trace on two rows.
        trace_inputs = tuple(torch.cat([x, x]) if x.shape[:1] == (1,) else x for x in inputs)
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if x.dim() else None for x in inputs)

    target = report.path
    target.parent.mkdir(parents=True, exist_ok=True)
    # As gblr.save: a link's target is written (the link stays), a read-only file refused.
    target = replacement_target(target)
    workdir = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        staged = workdir / target.name
        torch.onnx.export(
            exported,
            trace_inputs,
            str(staged),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset_version,
            # One file unless the tensors pass protobuf's 2 GB limit.
            external_data=sum(t.numel() * t.element_size() for t in exported.state_dict().values())
            > 1_500_000_000,
            verbose=False,
        )
        if check:
            report.max_abs_error = _check_with_onnxruntime(staged, model, inputs)
        for produced in sorted(workdir.iterdir()):  # the model, and external data if any
            os.replace(produced, target.parent / produced.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _check_with_onnxruntime(
    path: Path, model: nn.Module, inputs: tuple[Tensor, ...]
) -> float | None:
    """Max ``|onnxruntime - model|`` on ``inputs``; raise when it exceeds float rounding."""
    try:
        import onnxruntime
    except ImportError:
        return None
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as Unsupported

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {
            spec.name: x.detach().cpu().numpy()
            for spec, x in zip(session.get_inputs(), inputs, strict=True)
        }
        got = session.run(None, feeds)
    except Unsupported as error:  # e.g. bfloat16 Gemm: a valid model the CPU cannot run
        warnings.warn(
            f"onnxruntime's CPU provider cannot run the exported model ({error}); it was "
            "written without the check",
            stacklevel=3,
        )
        return None
    was_training = model.training
    try:
        with torch.no_grad():
            expected = _tensor_leaves(model.eval()(*inputs))
    finally:
        model.train(was_training)
    if len(got) != len(expected):
        raise ValueError(f"exported model has {len(got)} outputs, the model {len(expected)}")
    worst = 0.0
    for produced, reference in zip(got, expected, strict=True):
        # Both compute the same products with different summation orders: allow a few
        # rounding steps of the output's precision.
        relative = max(1e-4, 8 * torch.finfo(reference.dtype).eps)
        reference = reference.detach().float().cpu()
        error = (torch.as_tensor(produced).float() - reference).abs().max().item()
        tolerance = relative * max(1.0, reference.abs().max().item())
        if not error <= tolerance:
            raise ValueError(
                f"exported model's output differs from the model's by {error:.3g} "
                f"(tolerance {tolerance:.3g}); the file was not written"
            )
        worst = max(worst, error)
    return worst
