"""MAC accounting for structured layers and whole models.

Convention (fvcore's): one multiply-accumulate (MAC) counts as one "FLOP". A linear
layer's cost is given per input row, a convolution's per output position; with an
example input, [`count_flops`][gblr.cost.count_flops] also multiplies by the rows/positions actually
seen.

This module sits at the bottom of the package: it knows structured layers only through
the small interface they share (``flops()``, ``dense_flops()``, optionally
``live_components()``), never by importing them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import fnmatch
import fractions
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .modules import hf_conv1d_shape
from .tables import text_table

__all__ = [
    "FlopsReport",
    "LayerFlops",
    "SupportsFlops",
    "call_model",
    "check_fraction_budget",
    "count_flops",
    "counting_pass",
    "fraction_budget_macs",
    "gblr_cost",
    "layer_rows",
    "row_weights",
]


@runtime_checkable
class SupportsFlops(Protocol):
    """What [`count_flops`][gblr.cost.count_flops] needs from a structured layer."""

    matrix_shape: tuple[int, int]
    """``(out, in)`` of the layer's weight matrix (``(out, in*kh*kw)`` for a conv)."""

    def flops(self) -> int:
        """MACs per input row (linear) or per output position (convolution)."""
        ...

    def dense_flops(self) -> int:
        """MACs per row/position of the dense layer of the same shape."""
        ...


def gblr_cost(row_lengths: Tensor, col_lengths: Tensor, rank_per_component: int) -> int:
    """MACs per input row of ``y = W x`` for a GBLR matrix (docs/design.md#cost-in-macs).

    ``cost = sum_k r * (|R_k| + |C_k|)`` over live components (both intervals non-empty).

    Args:
        row_lengths: ``(K,)`` integer row-interval lengths ``|R_k|``.
        col_lengths: ``(K,)`` integer column-interval lengths ``|C_k|``.
        rank_per_component: ``r``.

    Returns:
        The cost as a Python int.
    """
    live = (row_lengths > 0) & (col_lengths > 0)
    return int(rank_per_component) * int(((row_lengths + col_lengths) * live).sum().item())


def smallest_fraction(macs: int, dense_macs: int) -> str | None:
    """The smallest fraction budget that allows ``macs`` of ``dense_macs`` MACs, as text:
    ``macs / dense_macs`` to four significant digits, rounded *up* so that passing the
    printed number works; ``None`` when it is above 1."""
    if macs > dense_macs:
        return None
    exact = fractions.Fraction(macs, dense_macs)
    for digits in range(4, 18):
        exponent = digits - 1 - math.floor(math.log10(exact))
        scale = fractions.Fraction(10) ** exponent
        text = str(decimal.Decimal(math.ceil(exact * scale)).scaleb(-exponent).normalize())
        if math.floor(float(text) * dense_macs) >= macs:
            return format(decimal.Decimal(text), "f")
    return repr(math.nextafter(float(exact), math.inf))


def check_fraction_budget(
    fraction: object,
    macs: object,
    *,
    fraction_name: str = "target",
    macs_name: str = "target_macs",
) -> None:
    """The checks of [`fraction_budget_macs`][gblr.cost.fraction_budget_macs] that need no layer:
    exactly one of the two given, ``fraction`` a number in (0, 1] (or the int 1), ``macs`` an int >=
    1. For callers that build the layers later (the training callbacks), so that a wrong
    budget fails when it is given, not when training starts.

    Examples:
        >>> from gblr.cost import check_fraction_budget
        >>> check_fraction_budget(0.3, None)
        >>> check_fraction_budget(300, None)
        Traceback (most recent call last):
        ...
        ValueError: target must be a fraction in (0, 1] ... pass target_macs=300
    """
    if (fraction is None) == (macs is None):
        raise ValueError(
            f"give exactly one of {fraction_name} (a fraction in (0, 1] of the dense MACs) "
            f"and {macs_name} (an absolute MAC count), got {fraction_name}={fraction!r} "
            f"and {macs_name}={macs!r}"
        )
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise TypeError(
                f"{fraction_name} must be a number in (0, 1] (a fraction of the dense MACs), "
                f"got {fraction!r} ({type(fraction).__name__})"
            )
        if isinstance(fraction, numbers.Integral) and fraction != 1:
            count = int(fraction)
            hint = f"; for a count of {count} MACs pass {macs_name}={count}" if count > 1 else ""
            raise ValueError(
                f"{fraction_name} must be a fraction in (0, 1] of the dense MACs "
                f"(the int 1 means all of them), got the int {count}{hint}"
            )
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(
                f"{fraction_name} must be a fraction in (0, 1] of the dense MACs, got {fraction!r}"
            )
    else:
        if isinstance(macs, bool) or not isinstance(macs, numbers.Integral):
            raise TypeError(
                f"{macs_name} must be an int >= 1 (an absolute MAC count), got {macs!r} "
                f"({type(macs).__name__})"
            )
        if macs < 1:
            raise ValueError(f"{macs_name} must be an int >= 1 (a MAC count), got {macs}")


def fraction_budget_macs(
    fraction: object,
    macs: object,
    dense_macs: int,
    *,
    fraction_name: str = "target",
    macs_name: str = "target_macs",
    minimum: int = 1,
    minimum_reason: str = "",
) -> int:
    """MACs allowed by a budget given either as a fraction or as an explicit MAC count.

    Args:
        fraction: a number in (0, 1]: that fraction of ``dense_macs`` (floored). The int
            ``1`` means 1.0 (all of the dense MACs), as in [`gblr.convert`][]; any other
            int is refused, since it used to mean a MAC count and silently reading it as a
            fraction (or ``1`` as one MAC) would change a model's cost without a word.
        macs: an absolute count of MACs (an int >= 1), or ``None``.
        dense_macs: the dense MACs the fraction refers to.
        fraction_name, macs_name: the arguments' names, for the errors.
        minimum: the fewest MACs that make sense (e.g. one GBLR component's); a budget
            below it is a ``ValueError`` naming the smallest fraction and count allowed.
        minimum_reason: what ``minimum`` pays for, for that error.

    Returns:
        The budget in MACs.

    Raises:
        TypeError: a fraction that is not a real number, a count that is not an int.
        ValueError: both or neither given, a fraction outside (0, 1], a count < 1, or a
            budget below ``minimum``.

    Examples:
        >>> from gblr.cost import fraction_budget_macs
        >>> fraction_budget_macs(0.25, None, 1000), fraction_budget_macs(1, None, 1000)
        (250, 1000)
        >>> fraction_budget_macs(None, 300, 1000)
        300
    """
    check_fraction_budget(fraction, macs, fraction_name=fraction_name, macs_name=macs_name)
    if fraction is not None:
        budget = math.floor(float(fraction) * dense_macs)  # type: ignore[arg-type]
        given = f"{fraction_name}={fraction!r} allows {budget} of the {dense_macs} dense MACs"
    else:
        budget = int(macs)  # type: ignore[call-overload]
        given = f"{macs_name}={budget}"
    if budget < minimum:
        reason = f" ({minimum_reason})" if minimum_reason else ""
        smallest = smallest_fraction(minimum, dense_macs)
        allowed = (
            f"{fraction_name} must be at least {smallest} (or {macs_name} at least {minimum})"
            if smallest is not None
            else f"no fraction of the {dense_macs} dense MACs pays for it; pass "
            f"{macs_name} at least {minimum}"
        )
        raise ValueError(f"{given}, below the minimum of {minimum} MACs{reason}: {allowed}")
    return budget


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """One row of a [`FlopsReport`][gblr.cost.FlopsReport].

    ``macs`` and ``dense_macs`` are per input row (linear) or per output position (conv).
    ``total_macs``/``total_dense_macs`` are filled only when an example input was given:
    the per-row numbers times the rows/positions that the layer actually processed.

    Examples:
        >>> import torch, gblr
        >>> row = gblr.count_flops(torch.nn.Linear(8, 4), torch.randn(3, 8)).layers[0]
        >>> row.shape, row.macs, row.rows, row.total_macs
        ((4, 8), 32, 3, 96)
    """

    name: str
    kind: str
    shape: tuple[int, int]
    macs: int
    dense_macs: int
    live_components: int | None
    unit: str
    rows: int | None = None

    @property
    def ratio(self) -> float:
        """``macs / dense_macs``."""
        return self.macs / self.dense_macs if self.dense_macs else 0.0

    @property
    def total_macs(self) -> int | None:
        return None if self.rows is None else self.macs * self.rows

    @property
    def total_dense_macs(self) -> int | None:
        return None if self.rows is None else self.dense_macs * self.rows


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-layer MAC counts with totals; ``str(report)`` is a table.

    Totals are sums of the per-row (per-position) numbers, or of the per-input totals when
    the report was made with an example input.

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), gblr.GBLRLinear(4, 8))
        >>> report = gblr.count_flops(model)
        >>> report.macs, report.dense_macs, [layer.name for layer in report]
        (80, 64, ['0', '1'])
    """

    layers: tuple[LayerFlops, ...]
    with_input: bool

    @property
    def macs(self) -> int:
        """Total MACs: per forward of the example input if one was given, else per row."""
        if self.with_input:
            return sum(layer.total_macs or 0 for layer in self.layers)
        return sum(layer.macs for layer in self.layers)

    @property
    def dense_macs(self) -> int:
        """The same total for the dense layers of the same shapes."""
        if self.with_input:
            return sum(layer.total_dense_macs or 0 for layer in self.layers)
        return sum(layer.dense_macs for layer in self.layers)

    @property
    def ratio(self) -> float:
        """``macs / dense_macs`` over all counted layers."""
        return self.macs / self.dense_macs if self.dense_macs else 0.0

    def __getitem__(self, name: str) -> LayerFlops:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the report")

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def table(self) -> str:
        """A plain-text table, one row per layer and a total row."""
        per = "total MACs" if self.with_input else "MACs/row"
        header = ["layer", "type", "shape (out x in)", per, "dense", "ratio", "live"]
        rows = []
        for layer in self.layers:
            macs = layer.total_macs if self.with_input else layer.macs
            dense = layer.total_dense_macs if self.with_input else layer.dense_macs
            rows.append(
                [
                    layer.name or "(root)",
                    layer.kind,
                    f"{layer.shape[0]} x {layer.shape[1]}",
                    f"{macs:,}" if macs is not None else "-",
                    f"{dense:,}" if dense is not None else "-",
                    f"{layer.ratio:.3f}",
                    "-" if layer.live_components is None else str(layer.live_components),
                ]
            )
        rows.append(
            ["total", "", "", f"{self.macs:,}", f"{self.dense_macs:,}", f"{self.ratio:.3f}", ""]
        )
        return text_table(
            header,
            rows,
            align="<<<>>>>",
            rules=(0, len(rows) - 1),
            notes=["(1 MAC = 1 FLOP, fvcore convention; convolutions per output position)"],
        )

    def __str__(self) -> str:
        return self.table()


def _layer_entry(
    module: nn.Module,
) -> tuple[str, tuple[int, int], int, int, int | None, str] | None:
    """(kind, shape, macs, dense_macs, live, unit) for a countable module, else None."""
    kind = type(module).__name__
    if isinstance(module, SupportsFlops):
        shape = module.matrix_shape
        live_fn = getattr(module, "live_components", None)
        live = int(live_fn()) if callable(live_fn) else None
        unit = "position" if getattr(module, "counts_per_position", False) else "row"
        macs, dense = int(module.flops()), int(module.dense_flops())
        return kind, (int(shape[0]), int(shape[1])), macs, dense, live, unit
    if isinstance(module, nn.Linear):
        shape = (module.out_features, module.in_features)
        return kind, shape, shape[0] * shape[1], shape[0] * shape[1], None, "row"
    conv1d = hf_conv1d_shape(module)
    if conv1d is not None:  # a linear layer with its weight stored (in, out)
        return kind, conv1d, conv1d[0] * conv1d[1], conv1d[0] * conv1d[1], None, "row"
    if isinstance(module, nn.Conv2d):
        cols = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        macs = module.out_channels * cols
        return kind, (module.out_channels, cols), macs, macs, None, "position"
    return None


def call_rows(module: nn.Module, unit: str, inputs: tuple[Any, ...], output: Any) -> int:
    """How many vectors one forward call of ``module`` multiplied by its matrix, read from
    the call's ``inputs`` and ``output`` (as a forward hook sees them).

    Args:
        module: the layer (only the tensors are read).
        unit: ``"position"`` for a convolution (one vector per output pixel per image, from
            an ``(N, C, H, W)`` or ``(C, H, W)`` output), else one per row of the input's
            last dimension.
        inputs: the positional inputs of the call.
        output: what the call returned.

    Returns:
        The count; 0 when the tensors give none (no tensor, a scalar).

    Examples:
        >>> import torch
        >>> from gblr.cost import call_rows
        >>> layer = torch.nn.Linear(4, 3)
        >>> x = torch.zeros(2, 5, 4)
        >>> call_rows(layer, "row", (x,), layer(x))
        10
    """
    if unit == "position":
        if not isinstance(output, Tensor) or output.dim() < 3:
            return 0
        # (N, C, H, W) or unbatched (C, H, W): one position per output pixel per image.
        return output.numel() // output.shape[-3]
    x = inputs[0]
    return x.numel() // x.shape[-1] if isinstance(x, Tensor) and x.dim() > 0 else 0


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def count_flops(
    model: nn.Module,
    example_input: Any = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> FlopsReport:
    """Count the MACs of every linear, convolution and structured layer of ``model``.

    Structured layers (anything with ``flops()`` and ``dense_flops()``, e.g.
    [`gblr.GBLRLinear`][]) report their live cost; ``nn.Linear``, Hugging Face's
    ``Conv1D`` (GPT-2) and ``nn.Conv2d`` count as dense. Modules inside a counted
    structured layer are not counted again.

    Args:
        model: any module.
        example_input: optional input (a tensor, a tuple of positional arguments, or a
            mapping of keyword arguments). When given, the model runs once on it, in eval
            mode under ``torch.no_grad()`` (the modules' training flags restored after
            it), and each layer's MACs are multiplied by the rows (linear) or output
            positions (conv) it processed.
        include: glob patterns over ``named_modules()`` names; only matching layers count.
        exclude: glob patterns of layers to leave out.

    Returns:
        A [`FlopsReport`][gblr.cost.FlopsReport] (``print(report)`` shows a table).

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), gblr.GBLRLinear(8, 8))
        >>> gblr.count_flops(model).dense_macs
        128
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude

    entries: list[tuple[str, nn.Module, tuple]] = []
    counted_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") or p == "" for p in counted_prefixes):
            continue
        entry = _layer_entry(module)
        if entry is None:
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        entries.append((name, module, entry))
        if isinstance(module, SupportsFlops):
            counted_prefixes.append(name)

    rows = (
        _rows_of_one_forward(
            model, [(module, entry[5]) for _, module, entry in entries], example_input
        )
        if example_input is not None
        else [None] * len(entries)
    )
    layers = tuple(
        LayerFlops(
            name=name,
            kind=entry[0],
            shape=entry[1],
            macs=entry[2],
            dense_macs=entry[3],
            live_components=entry[4],
            unit=entry[5],
            rows=seen,
        )
        for (name, _, entry), seen in zip(entries, rows, strict=True)
    )
    return FlopsReport(layers=layers, with_input=example_input is not None)


def _rows_of_one_forward(
    model: nn.Module, modules: list[tuple[nn.Module, str]], example_input: Any
) -> list[int]:
    """Rows (``unit`` ``"row"``) or output positions (``"position"``) each of ``modules``
    processed, summed over its calls, in one forward of ``model`` on ``example_input`` (a
    tensor, a tuple of positional arguments, or a mapping of keyword arguments). The
    forward runs in eval mode under ``torch.no_grad()``, so that counting changes nothing
    (dropout draws no random numbers, batch norm keeps its statistics); every module's
    training flag is restored."""
    seen = [0] * len(modules)
    handles = []
    for index, (module, unit) in enumerate(modules):

        def hook(mod, inputs, output, _index=index, _unit=unit):
            seen[_index] += call_rows(mod, _unit, inputs, output)

        handles.append(module.register_forward_hook(hook))
    # A compiled model (nn.Module.compile) runs this one pass eagerly: compiling a graph
    # for it would cost more than the pass and leave one more graph behind. torch < 2.6
    # has no stance to set; there the pass compiles.
    set_stance = getattr(torch.compiler, "set_stance", None)
    eager = set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
    try:
        with counting_pass(model), eager:
            call_model(model, example_input, name="example_input")
    finally:
        for handle in handles:
            handle.remove()
    return seen


@contextlib.contextmanager
def counting_pass(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in eval mode under ``torch.no_grad()`` and give every
    module its own training flag back after it: a forward that only counts changes
    nothing of the user's (dropout draws no random numbers, batch norm keeps its running
    statistics, no gradient is recorded).

    Examples:
        >>> import torch
        >>> from gblr.cost import counting_pass
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(3)).train()
        >>> with counting_pass(model):
        ...     _ = model(torch.randn(4, 3) + 5)
        >>> model.training, model[0].running_mean.tolist()
        (True, [0.0, 0.0, 0.0])
    """
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in training.items():
            module.training = flag


def call_model(model: nn.Module, inputs: Any, *, name: str, lists_unpack: bool = False) -> Any:
    """``model(**inputs)`` for a mapping (a tokenizer's output), ``model(*inputs)`` for a
    tuple (and a list with ``lists_unpack``), else ``model(inputs)``; a failure of the
    model on them is a ``ValueError`` naming the argument ``name`` they came from, not a
    shape error from deep inside torch.

    Examples:
        >>> import torch
        >>> from gblr.cost import call_model
        >>> call_model(torch.nn.Linear(4, 2), torch.randn(3, 4), name="example_input").shape
        torch.Size([3, 2])
        >>> try:
        ...     call_model(torch.nn.Linear(4, 2), torch.randn(3, 5), name="example_input")
        ... except ValueError as error:
        ...     print(str(error).split(" (")[0])
        example_input: the model failed on it
    """
    try:
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, tuple) or (lists_unpack and isinstance(inputs, list)):
            return model(*inputs)
        return model(inputs)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as error:
        raise ValueError(
            f"{name}: the model failed on it ({type(error).__name__}: {error}); give what the "
            "model takes: model(x) for a tensor, model(*x) for a tuple, model(**x) for a "
            "mapping"
        ) from error


def layer_rows(model: nn.Module, layers: Sequence[nn.Module], example_input: Any) -> list[int]:
    """How many rows each of ``layers`` multiplies in one forward pass of ``model`` on
    ``example_input``, summed over its calls: what a layer's per-row MACs are multiplied
    by to give its cost for that input. A convolution (``nn.Conv2d``, or a structured
    layer counted per position) counts its output positions; any other module the rows of
    its input's last dimension.

    The pass runs in eval mode under ``torch.no_grad()`` (dropout draws no random numbers,
    batch norm keeps its statistics); each module's training flag is restored after it,
    as in [`count_flops`][gblr.cost.count_flops].

    Args:
        model: the module to run.
        layers: modules of ``model`` (structured layers, ``nn.Linear``, ``nn.Conv2d``, a
            Hugging Face ``Conv1D``, ...); each object counted once.
        example_input: a tensor, a tuple of positional arguments of ``model``, or a
            mapping of keyword arguments (a tokenizer's output for a Hugging Face model).

    Returns:
        One count per layer, in order; 0 for a layer the pass did not call.

    Examples:
        >>> import torch
        >>> from gblr.cost import layer_rows
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
        >>> layer_rows(model, [model[0], model[1]], torch.zeros(3, 5, 4))
        [15, 15]
    """
    distinct = list({id(layer): layer for layer in layers}.values())
    units = [
        "position"
        if isinstance(layer, nn.Conv2d) or getattr(layer, "counts_per_position", False)
        else "row"
        for layer in distinct
    ]
    seen = _rows_of_one_forward(model, list(zip(distinct, units, strict=True)), example_input)
    by_id = {id(layer): count for layer, count in zip(distinct, seen, strict=True)}
    return [by_id[id(layer)] for layer in layers]


def row_weights(rows: Sequence[int]) -> tuple[list[int], int]:
    """``rows`` (each layer's rows on an example, all >= 1) divided by their greatest
    common divisor, and that divisor: costs weighted by the first count are in units of the
    second many rows. Layers that all see the same rows get weight 1 each, so that costing
    them per example is costing them per row, exactly.

    Examples:
        >>> from gblr.cost import row_weights
        >>> row_weights([64, 64, 16, 16]), row_weights([17, 17])
        (([4, 4, 1, 1], 16), ([1, 1], 17))
    """
    unit = math.gcd(*rows)
    return [count // unit for count in rows], unit
