"""Whole-model MACs: every linear, convolution and attention matmul of one forward pass.

[`gblr.count_flops`][] lists the layers that can be structured; this module counts
everything a forward pass multiplies, in the fvcore convention (one multiply-accumulate
counts as one FLOP), so that "5.65 GFLOPs of 17.6" style numbers come out directly.

It runs the model once under torch's ``FlopCounterMode`` (matmuls, convolutions,
scaled-dot-product attention) and replaces what happens inside each structured layer
(anything with ``flops()``/``dense_flops()``, e.g. [`gblr.GBLRLinear`][], a baseline
family, a frozen layer) by the layer's exact cost times the rows it processed: the
training form of a GBLR layer computes masked dense products whose size says nothing
about its cost. Elementwise work (norms, activations, softmax) is not counted, as in
fvcore.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from .cost import SupportsFlops, call_model, call_rows, counting_pass

__all__ = ["ModelFlops", "StructuredFlops", "count_model_flops"]


@dataclasses.dataclass(frozen=True)
class StructuredFlops:
    """One structured layer in a [`ModelFlops`][gblr.model_flops.ModelFlops]: MACs for the whole
    example input."""

    name: str
    kind: str
    macs: int
    dense_macs: int
    rows: int


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """MACs of one forward pass of the example input.

    ``macs`` = ``other_macs`` + the structured layers' ``macs``; ``dense_macs`` is the
    same model with every structured layer dense (its ``dense_flops()``).

    Examples:
        >>> import torch, gblr
        >>> result = gblr.count_model_flops(torch.nn.Linear(8, 4), torch.randn(3, 8))
        >>> result.macs, result.ratio
        (96, 1.0)
    """

    macs: int
    dense_macs: int
    other_macs: int
    structured: tuple[StructuredFlops, ...]
    by_operator: dict[str, int]

    @property
    def ratio(self) -> float:
        """``macs / dense_macs``."""
        return self.macs / self.dense_macs if self.dense_macs else 0.0

    @property
    def gflops(self) -> float:
        """``macs`` in units of 1e9 (fvcore's "GFLOPs")."""
        return self.macs / 1e9

    def __str__(self) -> str:
        structured = sum(layer.macs for layer in self.structured)
        structured_dense = sum(layer.dense_macs for layer in self.structured)
        lines = [
            f"model: {self.macs / 1e9:.4g} GFLOPs (MACs, fvcore convention) per forward; "
            f"dense: {self.dense_macs / 1e9:.4g} GFLOPs; ratio {self.ratio:.3f}",
            f"  structured layers ({len(self.structured)}): {structured / 1e9:.4g} of "
            f"{structured_dense / 1e9:.4g} GFLOPs dense",
            f"  everything else (dense layers, attention matmuls, convolutions): "
            f"{self.other_macs / 1e9:.4g} GFLOPs",
        ]
        return "\n".join(lines)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kw):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_operators() -> dict[Any, Any]:
    """Operators FlopCounterMode does not know (yet) in every torch version."""
    extra = {}
    # the CPU kernel of scaled_dot_product_attention
    operator = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if operator is not None:
        extra[operator] = _cpu_attention_flops
    return extra


@contextlib.contextmanager
def _no_fused_attention_fastpath():
    """nn.MultiheadAttention's inference fast path is one fused op that FlopCounterMode
    cannot see into; switch it off while counting (it computes the same products)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _outermost_structured(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") or prefix == "" for prefix, _ in found):
            continue
        if isinstance(module, SupportsFlops):
            found.append((name, module))
    return found


def count_model_flops(model: nn.Module, example_input: Any) -> ModelFlops:
    """MACs of one forward pass of ``model`` on ``example_input`` (fvcore convention).

    Counts every matmul, linear layer (``nn.Linear``, Hugging Face ``Conv1D``),
    convolution and attention product; structured layers count their exact cost
    (``flops()`` per row or output position, times the rows they processed). The model
    runs once in eval mode under ``torch.no_grad()``, so that counting changes nothing
    (dropout draws no random numbers, batch norm keeps its statistics); each module's
    training flag is restored after it, as in [`count_flops`][gblr.cost.count_flops].

    Args:
        model: any module.
        example_input: a tensor, a tuple of positional arguments, or a dict of keyword
            arguments (e.g. ``{"input_ids": ids}``); batch 1 gives per-image numbers.

    Returns:
        A [`ModelFlops`][gblr.model_flops.ModelFlops] (``print()`` it; ``.gflops``, ``.ratio``).

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), gblr.GBLRLinear(4, 8))
        >>> gblr.count_model_flops(model, torch.randn(2, 8)).dense_macs
        128
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_input is None:
        raise ValueError("example_input is required: the count depends on the input's size")
    counter = FlopCounterMode(display=False, custom_mapping=_extra_operators())
    structured = _outermost_structured(model)
    inside: dict[str, int] = {}
    rows: dict[str, int] = {}
    entry: dict[str, int] = {}
    handles = []
    for name, module in structured:
        unit = "position" if getattr(module, "counts_per_position", False) else "row"

        def before(mod, inputs, _name=name):
            entry[_name] = counter.get_total_flops()

        def after(mod, inputs, output, _name=name, _unit=unit):
            inside[_name] = inside.get(_name, 0) + counter.get_total_flops() - entry[_name]
            rows[_name] = rows.get(_name, 0) + call_rows(mod, _unit, inputs, output)

        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        with _no_fused_attention_fastpath(), counting_pass(model), counter:
            call_model(model, example_input, name="example_input")
    finally:
        for handle in handles:
            handle.remove()
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate
    total_macs = counter.get_total_flops() // 2
    other = total_macs - sum(inside.values()) // 2
    layers = tuple(
        StructuredFlops(
            name=name,
            kind=type(module).__name__,
            macs=int(module.flops()) * rows.get(name, 0),
            dense_macs=int(module.dense_flops()) * rows.get(name, 0),
            rows=rows.get(name, 0),
        )
        for name, module in structured
    )
    by_operator = {
        str(op): count // 2 for op, count in counter.get_flop_counts().get("Global", {}).items()
    }
    return ModelFlops(
        macs=other + sum(layer.macs for layer in layers),
        dense_macs=other + sum(layer.dense_macs for layer in layers),
        other_macs=other,
        structured=layers,
        by_operator=by_operator,
    )
