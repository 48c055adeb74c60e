"""Back to plain layers: [`merge_and_unload`][gblr.compress.unload.merge_and_unload] turns every
structured layer of a model into the dense layer it replaced, holding the exact matrix the
structured layer computes.

A layer converted from a Hugging Face ``Conv1D`` (GPT-2 family) is marked by
[`gblr.convert`][] (``layer.gblr_replaced = "Conv1D"``, kept by [`gblr.freeze`][] and
by [`gblr.from_pretrained`][]) and comes back as a ``Conv1D``; every other linear layer
comes back as ``nn.Linear`` and every convolution as ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..deploy.frozen import FrozenGBLRConv2d, FrozenGBLRMatrix
from ..layers.base import GBLRMatrixMixin
from ..layers.conv import GBLRConv2d
from ..modules import hf_conv1d_class, set_submodule
from ..structured.base import StructuredLinear

__all__ = ["REPLACED_ATTRIBUTE", "is_structured", "merge_and_unload"]

#: The attribute [`gblr.convert`][] sets on a layer that replaced something other than
#: ``nn.Linear``/``nn.Conv2d`` (today only ``"Conv1D"``, Hugging Face's).
REPLACED_ATTRIBUTE = "gblr_replaced"

STRUCTURED_TYPES = (GBLRMatrixMixin, FrozenGBLRMatrix, StructuredLinear)


def is_structured(module: nn.Module) -> bool:
    """Whether ``module`` is a gblr structured layer: GBLR (training or frozen form) or a
    baseline family's layer.

    Examples:
        >>> import torch, gblr
        >>> from gblr.compress.unload import is_structured
        >>> is_structured(gblr.GBLRLinear(8, 8)), is_structured(torch.nn.Linear(8, 8))
        (True, False)
    """
    return isinstance(module, STRUCTURED_TYPES)


def _eval_weight(layer: nn.Module) -> Tensor:
    """The ``(out, in)`` matrix ``layer`` computes in eval mode (the inference form)."""
    training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            return layer.dense_weight().detach().clone()
    finally:
        layer.train(training)


def _conv1d_class() -> type:
    conv1d = hf_conv1d_class()
    if conv1d is None:
        raise ImportError(
            "a layer converted from Hugging Face's Conv1D merges back into a Conv1D, which "
            "needs transformers: pip install 'gblr[hf]'"
        )
    return conv1d


def dense_layer(layer: nn.Module) -> nn.Module:
    """The plain layer (``nn.Linear``, ``nn.Conv2d`` or ``Conv1D``) computing what the
    structured ``layer`` computes in eval mode, on its device and dtype, in its train/eval
    mode.

    Raises:
        TypeError: ``layer`` is not a gblr structured layer.
    """
    if not is_structured(layer):
        raise TypeError(f"not a gblr structured layer: {type(layer).__name__}")
    weight = _eval_weight(layer)
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, (GBLRConv2d, FrozenGBLRConv2d)):
        sizes = (layer.in_channels, layer.out_channels, layer.kernel_size)
        options = {key: getattr(layer, key) for key in ("stride", "padding", "dilation")}
        dense: nn.Module = nn.Conv2d(*sizes, bias=bias is not None, **options, **factory)
        weight = weight.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)
    elif getattr(layer, REPLACED_ATTRIBUTE, None) == "Conv1D":
        out_features, in_features = weight.shape
        dense = _conv1d_class()(out_features, in_features).to(**factory)
        weight = weight.t().contiguous()  # Conv1D stores (in, out)
        if bias is None:
            dense.bias = None
    else:
        out_features, in_features = weight.shape
        dense = nn.Linear(in_features, out_features, bias=bias is not None, **factory)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.weight.requires_grad_(layer_requires_grad(layer))
    if dense.bias is not None:
        dense.bias.requires_grad_(layer_requires_grad(layer))
    return dense.train(layer.training)


def layer_requires_grad(layer: nn.Module) -> bool:
    """Whether any floating-point parameter of ``layer`` requires a gradient (a frozen
    layer holds buffers only: ``False``)."""
    return any(p.requires_grad for p in layer.parameters() if p.is_floating_point())


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace, in place, every gblr structured layer of ``model`` by the plain layer it
    replaced, holding the exact dense matrix the structured layer computes.

    The inverse of [`gblr.convert`][] up to the approximation: GBLR layers in training
    form ([`gblr.GBLRLinear`][], [`gblr.GBLRConv2d`][]), frozen ones
    ([`gblr.freeze`][]) and every baseline family's layer
    ([`gblr.structured`][]) become ``nn.Linear`` / ``nn.Conv2d`` / Hugging Face
    ``Conv1D`` (whichever the layer replaced) with weight ``(out, in)`` (``Conv1D``:
    ``(in, out)``; ``Conv2d``: ``(out, in, kh, kw)``) equal to the layer's eval-mode
    matrix, and the same bias, device, dtype and train/eval mode. A layer shared under
    several names becomes one dense layer under all of them. As peft's
    ``merge_and_unload``, the model is changed in place and returned; the conversion
    config (``model.gblr_config``) and the ``save_pretrained`` that [`gblr.convert`][]
    put on Hugging Face models are removed, so ``model.save_pretrained`` writes a plain
    dense folder again.

    Use it to ship a model to tools that know only dense layers, or to measure what the
    structure costs in accuracy against the dense layers it came from. The dense model
    has the dense model's cost: the MACs saved by the structure are given back.

    Args:
        model: any ``nn.Module``; a structured layer itself is returned as its dense layer.

    Returns:
        ``model``, with no gblr module left (or the dense layer when ``model`` is one).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ImportError: a layer converted from ``Conv1D`` and transformers is not installed.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
        >>> _ = gblr.convert(model, gblr.GBLRConfig(budget=0.5))
        >>> x = torch.randn(3, 64)
        >>> expected = model.eval()(x)
        >>> model = gblr.merge_and_unload(model)
        >>> type(model[0]).__name__, model[0].weight.shape
        ('Linear', torch.Size([64, 64]))
        >>> bool(torch.allclose(model(x), expected, atol=1e-5))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_structured(model):
        return dense_layer(model)
    merged: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not is_structured(module):
            continue
        if id(module) not in merged:
            merged[id(module)] = dense_layer(module)
        set_submodule(model, name, merged[id(module)])
        module.superseded_by = "gblr.merge_and_unload"
    for module in model.modules():
        # What convert (or from_pretrained) added: the model is dense again.
        if "save_pretrained" in vars(module):
            delattr(module, "save_pretrained")
        if getattr(module, "gblr_config", None) is not None:
            delattr(module, "gblr_config")
    return model
