"""Calibrated (activation-aware) fitting: approximate what a layer *does* to real inputs.

A converted layer is used on its inputs ``x``, not on every direction alike, so the error
that matters is the output error ``E ||(W - Ŵ) x||² = ||(W - Ŵ) S||_F²`` with
``S Sᵀ = E[x xᵀ]`` (the inputs' second moment). The best rank-``k`` ``Ŵ`` under that norm
is ``trunc_k(W S) S⁻¹`` (the truncated SVD in whitened coordinates), which on trained
transformers keeps far more of the output than the plain truncated SVD of the same MACs.
The same whitened spectrum measures each layer's error curve for the global allocation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..cost import call_model

__all__ = ["check_calibration", "input_second_moments"]


def check_calibration(calibration: object) -> None:
    """``TypeError`` unless ``calibration`` is an iterable of batches.

    A bare tensor, mapping or string is iterable too, but iterating it yields rows, keys
    or characters rather than batches, which would run the model on the wrong inputs (or
    crash inside it): those are refused with the way to wrap one batch. Nothing is
    consumed, so a one-shot generator stays usable.

    Examples:
        >>> import torch
        >>> check_calibration([torch.randn(4, 8)])
        >>> check_calibration(torch.randn(4, 8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: calibration must be an iterable of batches, got a single Tensor ...
    """
    single = (
        "Tensor"
        if isinstance(calibration, Tensor)
        else "mapping"
        if isinstance(calibration, Mapping)
        else "string"
        if isinstance(calibration, (str, bytes))
        else None
    )
    if single is not None:
        raise TypeError(
            f"calibration must be an iterable of batches, got a single {single} "
            f"({type(calibration).__name__}): iterating it would not yield batches; wrap one "
            "batch in a list, calibration=[batch], or pass a DataLoader"
        )
    if not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be an iterable of batches (a list or DataLoader of tensors, "
            f"tuples of arguments or mappings of keyword arguments), got "
            f"{type(calibration).__name__}"
        )


def input_second_moments(
    model: nn.Module,
    layers: Mapping[str, nn.Module | Sequence[nn.Module]],
    calibration: Iterable[Any],
) -> dict[str, Tensor]:
    """``E[x xᵀ]`` of each layer's input over the calibration batches, float64 ``(in, in)``.

    Args:
        model: the model, run once over ``calibration`` in eval mode without gradients
            (its train/eval mode is restored afterwards).
        layers: name -> module whose inputs ``(..., in)`` are collected (``nn.Linear`` or
            Hugging Face ``Conv1D``), or a sequence of modules whose inputs are pooled
            (distinct modules tied to one weight, converted as one layer).
        calibration: model inputs: each item a tensor (``model(x)``), a tuple or list
            (``model(*x)``) or a mapping (``model(**x)``, e.g. a tokenizer's output).

    Returns:
        name -> second moment of that layer's input rows.

    Raises:
        TypeError: ``calibration`` is not an iterable of batches
            ([`check_calibration`][gblr.compress.calibrate.check_calibration]).
        ValueError: ``calibration`` is empty, a layer never ran, or a layer's inputs held
            NaN or inf (the layers are named).
    """
    check_calibration(calibration)
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def collect(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            rows = inputs[0].detach()
            rows = rows.reshape(-1, rows.shape[-1])
            # Each batch's product in the working precision (float64 is ~4x slower on a
            # CPU), summed over batches in float64.
            rows = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
            gram = (rows.t() @ rows).to(torch.float64)
            sums[name] = gram if name not in sums else sums[name] + gram
            counts[name] += rows.shape[0]

        return hook

    handles = [
        module.register_forward_hook(collect(name))
        for name, modules in layers.items()
        for module in ([modules] if isinstance(modules, nn.Module) else modules)
    ]
    training = model.training
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in calibration:
                call_model(model, batch, name=f"calibration batch {batches}", lists_unpack=True)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if batches == 0:
        raise ValueError("calibration holds no batch: give an iterable of model inputs")
    silent = [name for name, count in counts.items() if count == 0]
    if silent:
        raise ValueError(
            f"calibration batches never reached {silent[:5]}: these layers were not run "
            "by the model on them (exclude them, or give inputs that use them)"
        )
    moments = {name: sums[name] / counts[name] for name in layers}
    # A NaN would otherwise surface as a bare LinAlgError from the whitening factor.
    broken = [name for name, moment in moments.items() if not bool(torch.isfinite(moment).all())]
    if broken:
        raise ValueError(
            f"calibration inputs of {broken[:5]} hold NaN or inf (or overflow their second "
            "moment): check the calibration batches and the layers that feed these"
        )
    return moments
