"""Frozen GBLR layers: the exact inference form of a trained GBLR layer, and ``freeze``.

A frozen layer keeps only what eval mode uses: the integer intervals of the live
components (both intervals non-empty) and each component's factors over its intervals,
packed into two flat tensors. It has no widths, locations or Gaudi masks, so loading and
running it needs no training code. Its forward runs one of the execution plans of
[`gblr.deploy.plans`][], chosen per row-count bucket ([`gblr.plan`][], or set by hand
with ``layer.plan = "segment"``).

Under ``torch.compile`` a frozen layer is one graph with no host reads: it runs the plan
[`FrozenGBLRMatrix.compiled_plan`][gblr.deploy.frozen.FrozenGBLRMatrix.compiled_plan] chose ahead
from its shapes (``dense`` or ``lowrank``), and builds that plan's operands in the graph from its
parameters instead of reading the eager caches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import gblr_cost
from ..layers.base import GBLRMatrixMixin, check_positive_int
from ..layers.conv import GBLRConv2d, checked_geometry, conv_geometry
from ..layers.linear import GBLRLinear
from ..modules import set_submodule
from ..ops.gaudi import autocast_dtype, transforms_active
from . import panels as PN
from . import plans as P

__all__ = ["PLAN_CHOICES", "FrozenGBLRConv2d", "FrozenGBLRLinear", "FrozenGBLRMatrix", "freeze"]

PLAN_CHOICES = ("auto", *P.PLANS, *P.GPU_PLANS)
# The plans a compiled forward runs: one or two matrix products, traced as they are.
COMPILED_PLANS = ("dense", "lowrank")

_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def _traced() -> bool:
    """Whether a forward is being traced into a graph (``torch.compile``, ``torch.export``
    or ``torch.jit.trace``, whose sizes are tensors): it runs a compiled plan."""
    return _is_compiling() or torch.jit.is_tracing()


def _interval_buffer(name: str, value: object, size: int) -> Tensor:
    """Validated ``(K, 2)`` int64 ``(start, length)``: ``0 <= start < size``,
    ``1 <= length <= size`` (a frozen layer holds live components only)."""
    tensor = torch.as_tensor(value)
    if tensor.dim() != 2 or tensor.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape (K, 2) (start, length), got {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {tensor.dtype}")
    tensor = tensor.to(torch.int64).cpu()
    starts, lengths = tensor[:, 0], tensor[:, 1]
    if bool(((starts < 0) | (starts >= size)).any()):
        raise ValueError(f"{name} starts must be in [0, {size}), got {starts.tolist()}")
    if bool(((lengths < 1) | (lengths > size)).any()):
        raise ValueError(
            f"{name} lengths must be in [1, {size}] (dead components are dropped when "
            f"freezing), got {lengths.tolist()}"
        )
    return tensor


class FrozenGBLRMatrix(nn.Module):
    """Storage, cost and execution plans shared by the frozen linear and conv layers.

    Attributes:
        u_packed: ``(r * sum_k |R_k|,)`` left factors; component ``k``'s block is
            ``U_k (|R_k|, r)`` row-major, row ``t`` belonging to output
            ``(start_k + t) mod out``.
        v_packed: ``(r * sum_k |C_k|,)`` right factors; block ``V_k (r, |C_k|)``.
        row_intervals, col_intervals: int64 buffers ``(K, 2)`` of ``(start, length)``.
        bias: ``(out,)`` or ``None``.
        plan: ``"auto"`` (the timed choice for the input's row-count bucket if
            [`gblr.plan`][] stored one, else a cost-model default) or a plan name of
            [`gblr.deploy.plans.PLANS`][] to force.
        plan_cache: ``{(device type, dtype name, row bucket): plan}`` from [`gblr.plan`][].

    Factors and bias are parameters with ``requires_grad=False``: the layer is for
    inference; ``.to(dtype)`` and ``.to(device)`` convert them like any module.

    Examples:
        >>> import torch, gblr
        >>> from gblr.deploy import FrozenGBLRMatrix
        >>> layer = gblr.freeze(torch.nn.Sequential(gblr.GBLRLinear(8, 4)))[0]
        >>> isinstance(layer, FrozenGBLRMatrix), layer.matrix_shape, layer.num_components
        (True, (4, 8), 4)
        >>> layer.u_packed.shape, layer.row_intervals.shape, layer.plan
        (torch.Size([16]), torch.Size([4, 2]), 'auto')
        >>> x = torch.randn(3, 8)
        >>> bool(torch.allclose(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5))
        True
    """

    counts_per_position = False
    u_packed: nn.Parameter
    v_packed: nn.Parameter
    row_intervals: Tensor
    col_intervals: Tensor
    bias: nn.Parameter | None

    def _init_frozen(
        self,
        rows: int,
        cols: int,
        row_intervals: Tensor | Sequence,
        col_intervals: Tensor | Sequence,
        rank_per_component: int,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.rows, self.cols = rows, cols
        self.rank_per_component = check_positive_int("rank_per_component", rank_per_component)
        row_t = _interval_buffer("row_intervals", row_intervals, rows)
        col_t = _interval_buffer("col_intervals", col_intervals, cols)
        if row_t.shape[0] != col_t.shape[0]:
            raise ValueError(
                "row_intervals and col_intervals must have the same number of components, "
                f"got {row_t.shape[0]} and {col_t.shape[0]}"
            )
        r = self.rank_per_component
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("row_intervals", row_t.to(device))
        self.register_buffer("col_intervals", col_t.to(device))
        self.u_packed = nn.Parameter(
            torch.zeros(r * int(row_t[:, 1].sum()), **factory), requires_grad=False
        )
        self.v_packed = nn.Parameter(
            torch.zeros(r * int(col_t[:, 1].sum()), **factory), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(rows, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._plan = "auto"
        self.plan_cache: dict[tuple[str, str, int], str] = {}

    # ------------------------------------------------------------------ interface
    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the weight matrix."""
        return (self.rows, self.cols)

    @property
    def num_components(self) -> int:
        """Number of (live) components ``K``."""
        return int(self.row_intervals.shape[0])

    def live_components(self) -> int:
        """Number of components; all of a frozen layer's components are live."""
        return self.num_components

    def flops(self) -> int:
        """MACs per input row (per output position for a conv): ``sum_k r (|R_k| + |C_k|)``,
        the same number as the source GBLR layer's ``flops()``."""
        return gblr_cost(
            self.row_intervals[:, 1], self.col_intervals[:, 1], self.rank_per_component
        )

    def dense_flops(self) -> int:
        """MACs per row of the dense matrix of the same shape: ``out * in``."""
        return self.rows * self.cols

    def dense_weight(self) -> Tensor:
        """The ``(out, in)`` weight matrix (a new tensor, in the layer's dtype)."""
        with torch.no_grad():
            return P.dense_matrix(*self._factors())

    @property
    def plan(self) -> str:
        """The forced plan, or ``"auto"``; one of
        [`PLAN_CHOICES`][gblr.deploy.frozen.PLAN_CHOICES]."""
        return self._plan

    @plan.setter
    def plan(self, value: str | None) -> None:
        if value is None:
            value = "auto"
        if not isinstance(value, str):
            raise TypeError(f"plan must be a str, one of {PLAN_CHOICES}, got {value!r}")
        if value not in PLAN_CHOICES:
            raise ValueError(f"plan must be one of {PLAN_CHOICES}, got {value!r}")
        self._plan = value

    # ------------------------------------------------------------------ caches
    def _cache(self) -> dict:
        """Per-layer cache of plan operands, emptied whenever the factors change
        (``load_state_dict`` and in-place edits bump their version, ``.data =`` changes
        their pointer; ``.to()`` empties it in ``_apply``). Intervals change only together
        with the factors, whose sizes they fix. Operands that copy the bias key on it too
        (`_bias_key`)."""
        # Read from the module's dict directly and build no generator: this runs on every
        # forward, and a small layer's whole matmul takes about ten microseconds.
        params = self._parameters
        u, v = params["u_packed"], params["v_packed"]
        key = (u._version, v._version, u.data_ptr(), v.data_ptr())
        cache = self.__dict__.get("_plan_ops")
        if cache is None or cache["key"] != key:
            cache = {"key": key, "items": {}}
            self.__dict__["_plan_ops"] = cache
        return cache["items"]

    def _bias_key(self) -> tuple[int, int] | None:
        bias = self._parameters["bias"]
        return None if bias is None else (bias._version, bias.data_ptr())

    def clear_plan_cache(self, keep: Sequence[str] = ()) -> None:
        """Free cached plan operands (materialized weight, padded factors, blocks), except
        those of the plans named in ``keep``."""
        items = self._cache()
        for key in list(items):
            name = key[0] if isinstance(key, tuple) else key
            # segment and panels operands are built from the factors, lowrank uses them.
            needs_factors = {"lowrank", "segment", "panels", "triton"} & set(keep)
            if name not in keep and not (name == "factors" and needs_factors):
                del items[key]

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Cached operands belong to the old device/dtype; drop them now rather than at
        # the next forward, so that a model moved to the GPU frees its CPU copies.
        self.__dict__.pop("_plan_ops", None)
        self.__dict__.pop("_plan_memo", None)
        return super()._apply(fn, recurse)

    def compiled_plan(self) -> str:
        """The plan a forward traced by ``torch.compile`` (or ``torch.export``) runs,
        chosen ahead from static Python data (the shapes; nothing is read from a tensor):
        `plan` when it is ``"dense"`` or ``"lowrank"``, otherwise whichever of the
        two costs fewer MACs per row (``out * in`` against ``K r (out + in)``). The
        other plans (Python loops over slices of the intervals, a custom kernel) and the
        timed choices of [`gblr.plan`][] need operands read from the intervals, which
        would break the graph.

        Examples:
            >>> import torch, gblr
            >>> layer = gblr.freeze(gblr.GBLRLinear(64, 64, num_components=4))
            >>> layer.compiled_plan()  # 4 (64 + 64) MACs < 64 * 64
            'lowrank'
            >>> layer.plan = "dense"
            >>> layer.compiled_plan()
            'dense'
        """
        if self._plan in COMPILED_PLANS:
            return self._plan
        m, n = self.matrix_shape
        rank = int(self.row_intervals.shape[0]) * self.rank_per_component
        return "lowrank" if rank * (m + n) < m * n else "dense"

    def _build_factors(self) -> tuple[Tensor, Tensor]:
        """The padded factors from the parameters (static shapes: traceable)."""
        with torch.no_grad():
            return P.padded_factors(
                self.u_packed,
                self.v_packed,
                self.row_intervals,
                self.col_intervals,
                self.rank_per_component,
                self.matrix_shape,
            )

    def _factors(self) -> tuple[Tensor, Tensor]:
        if _traced():  # in the graph, from the parameters: no cache to validate
            return self._build_factors()
        items = self._cache()
        if "factors" not in items:
            items["factors"] = self._build_factors()
        return items["factors"]

    def _weight(self) -> Tensor:
        if _traced():
            with torch.no_grad():
                return P.dense_matrix(*self._factors())
        items = self._cache()
        if "dense" not in items:
            with torch.no_grad():
                items["dense"] = P.dense_matrix(*self._factors())
        return items["dense"]

    def _partition(self, bucket: int) -> P.Partition:
        items = self._cache()
        key = ("partition", bucket)
        if key not in items:
            items[key] = P.partition_components(
                self.row_intervals,
                self.col_intervals,
                self.rank_per_component,
                self.matrix_shape,
                bucket,
            )
        return items[key]

    def _segment_ops(self, bucket: int) -> P.SegmentOps:
        partition = self._partition(bucket)
        items = self._cache()
        key = ("segment", partition.runs)  # buckets with the same runs share operands
        if key not in items:
            with torch.no_grad():
                u, v = self._factors()
                items[key] = P.segment_ops(u, v, partition, self.rank_per_component)
        return items[key]

    def _panel_ops(self, bucket: int, forms: tuple[str, str] = ("auto", "auto")) -> PN.PanelOps:
        """The panels plan's operands for ``bucket``, ``forms`` = ``(stage1, stage2)`` of
        [`gblr.deploy.panels.panel_ops`][]."""
        items = self._cache()
        key = ("panels", bucket, self._bias_key(), forms)  # the operands hold the bias
        if key not in items:
            with torch.no_grad():
                items[key] = PN.panel_ops(
                    *self._factors(),
                    self.row_intervals,
                    self.col_intervals,
                    self.rank_per_component,
                    bucket,
                    self.bias,
                    *forms,
                )
        return items[key]

    def _triton_ops(self, bucket: int):
        items = self._cache()
        key = ("triton", bucket, self._bias_key())
        if key not in items:
            from .triton_panels import triton_panel_ops  # needs triton: imported on use

            with torch.no_grad():
                # The Triton kernels write each block of Z and of y once: the basic forms.
                items[key] = triton_panel_ops(self._panel_ops(bucket, ("groups", "panels")))
        return items[key]

    def _block_ops(self, bucket: int) -> P.BlockOps:
        items = self._cache()
        key = ("blocksparse", bucket)
        if key not in items:
            with torch.no_grad():
                items[key] = P.block_ops(self._weight(), bucket)
        return items[key]

    # ------------------------------------------------------------------ plans
    def _cache_key(self, rows: int) -> tuple[str, str, int]:
        u = self._parameters["u_packed"]  # per forward: skip nn.Module.__getattr__
        return (u.device.type, str(u.dtype), P.row_bucket(rows))

    def _default_plan(self, rows: int) -> str:
        bucket = P.row_bucket(rows)
        items = self._cache()
        key = ("default", bucket)
        if key not in items:  # the cost models take milliseconds: once per bucket
            items[key] = P.default_plan(
                self.matrix_shape,
                self.flops(),
                self.num_components * self.rank_per_component,
                self._partition(bucket).cost,
                bucket,
                self._panel_ops(bucket).cost,
            )
        return items[key]

    def _refuse_training_the_factors(self) -> None:
        """The plans multiply cached or packed copies of the factors outside autograd, so
        factors set to require a gradient (``requires_grad_(True)``) would get none, in
        silence: refused while gradients are recorded."""
        params = self._parameters
        if torch.is_grad_enabled() and (
            params["u_packed"].requires_grad or params["v_packed"].requires_grad
        ):
            raise ValueError(
                f"{type(self).__name__}.u_packed / v_packed require a gradient, but the "
                "frozen (inference) form gives its factors none: train the GBLR layers "
                "before gblr.freeze, or set u_packed and v_packed back to "
                "requires_grad=False (the bias may train)"
            )

    def plan_for(self, rows: int) -> str:
        """The plan a forward over ``rows`` input rows (output positions) will use."""
        if self._plan != "auto":
            return self._plan
        # Memoized per row bucket: building the lookup key costs ~2 us per forward, a
        # fifth of a small layer's matmul. The memo holds a copy of plan_cache (a few
        # entries, compared in ~0.1 us) so that any edit of it is seen; .to() empties it.
        cache = self.plan_cache
        memo = self.__dict__.get("_plan_memo")
        if memo is None or memo[0] != cache:
            memo = (dict(cache), {})
            self.__dict__["_plan_memo"] = memo
        bucket = P.row_bucket(rows)
        plan = memo[1].get(bucket)
        if plan is None:
            chosen = cache.get(self._cache_key(rows))
            plan = chosen if chosen is not None else self._default_plan(rows)
            memo[1][bucket] = plan
        return plan

    def _matmul(self, x: Tensor, plan: str) -> Tensor:
        """``(N, in) -> (N, out)`` (bias included) through ``plan``."""
        if plan in _UNTRACKED_PLANS:
            bias = self._parameters["bias"]
            tracked = x.requires_grad or (bias is not None and bias.requires_grad)
            if plan == "panels" and torch.is_grad_enabled() and tracked:
                plan = "segment"  # panels multiply into buffers (out=), which autograd refuses
            if plan in ("panels", "triton") and transforms_active():
                plan = "segment"  # nor has torch.func rules for out= products or Triton
            autocast = autocast_dtype(x.device.type)
            if autocast is not None:
                # their in-place products are outside autocast's casts: run them in the
                # layer's dtype and give autocast's, as F.linear would
                with torch.autocast(x.device.type, enabled=False):
                    return self._matmul(x.to(self.u_packed.dtype), plan).to(autocast)
        if plan == "dense":
            return P.run_dense(x, self._weight(), self.bias)
        if plan == "lowrank":
            return P.run_lowrank(x, *self._factors(), self.bias)
        bucket = P.row_bucket(x.shape[0])
        if plan == "segment":
            return P.run_segment(x, self._segment_ops(bucket), self.bias)
        if plan == "panels":
            return PN.run_panels(x, self._panel_ops(bucket))
        if plan == "blocksparse":
            return P.run_blocks(x, self._block_ops(bucket), self.bias)
        if plan == "triton":
            if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
                raise ValueError(
                    "plan 'triton' runs on CUDA tensors only (or under TRITON_INTERPRET=1); "
                    f"got an input on {x.device}"
                )
            from .triton_panels import run_triton_panels

            return run_triton_panels(x, self._triton_ops(bucket))
        raise ValueError(f"plan must be one of {P.PLANS + P.GPU_PLANS}, got {plan!r}")

    def _frozen_extra_repr(self) -> str:
        ratio = self.flops() / self.dense_flops()
        return (
            f"rank_per_component={self.rank_per_component}, "
            f"num_components={self.num_components}, macs_ratio={ratio:.3f}, plan={self._plan!r}"
        )


# Plans that multiply into buffers of their own (in place, or out=) rather than through
# F.linear and F.conv2d.
_UNTRACKED_PLANS = ("segment", "panels", "blocksparse", "triton")


def _pack(layer: GBLRMatrixMixin) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(row_intervals, col_intervals, u_packed, v_packed)`` of a GBLR layer's live
    components, from the integer intervals its eval mode uses."""
    with torch.no_grad():
        col_lengths, row_lengths = layer.interval_lengths()
        col_starts, row_starts = layer.interval_starts()
        live = layer.live_mask()
        r = layer.rank_per_component
        row_intervals = torch.stack([row_starts[live], row_lengths[live]], 1).cpu()
        col_intervals = torch.stack([col_starts[live], col_lengths[live]], 1).cpu()
        u = layer.U.detach()[live]  # (K', r, m)
        v = layer.V.detach()[live]  # (K', r, n)
        device = u.device
        rows, u_rank = P.packed_indices(
            row_intervals[:, 0].to(device),
            row_intervals[:, 1].to(device),
            r,
            layer.rows,
            rank_major=False,
        )
        cols, v_rank = P.packed_indices(
            col_intervals[:, 0].to(device),
            col_intervals[:, 1].to(device),
            r,
            layer.cols,
            rank_major=True,
        )
        u_packed = u[torch.div(u_rank, r, rounding_mode="floor"), u_rank % r, rows]
        v_packed = v[torch.div(v_rank, r, rounding_mode="floor"), v_rank % r, cols]
    return row_intervals, col_intervals, u_packed.clone(), v_packed.clone()


def _fill(frozen: FrozenGBLRMatrix, layer: GBLRMatrixMixin, u: Tensor, v: Tensor) -> None:
    with torch.no_grad():
        frozen.u_packed.copy_(u)
        frozen.v_packed.copy_(v)
        if layer.bias is not None:
            frozen.bias.copy_(layer.bias.detach())
    frozen.train(layer.training)


class FrozenGBLRLinear(FrozenGBLRMatrix):
    """Inference form of [`gblr.GBLRLinear`][]: ``y = x W^T + b`` with ``W`` fixed.

    Usually made by [`gblr.freeze`][] or `from_gblr`; the constructor makes a
    zero-filled layer of a given structure (what [`gblr.load`][] fills).

    Args:
        in_features, out_features: ``n`` and ``m``.
        bias: whether the layer has a bias.
        row_intervals: ``(K, 2)`` integer ``(start, length)`` over ``out_features``,
            circular, ``1 <= length``.
        col_intervals: ``(K, 2)`` likewise over ``in_features``.
        rank_per_component: ``r``.
        device, dtype: factory keywords.

    Shapes:
        input ``(*, in_features)``, output ``(*, out_features)``.

    Examples:
        >>> import torch, gblr
        >>> layer = gblr.GBLRLinear(64, 32, structure_init="half", init_cost=0.3).eval()
        >>> frozen = gblr.FrozenGBLRLinear.from_gblr(layer)
        >>> x = torch.randn(8, 64)
        >>> bool(torch.allclose(frozen(x), layer(x), atol=1e-5))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        row_intervals: Tensor | Sequence,
        col_intervals: Tensor | Sequence,
        rank_per_component: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self._init_frozen(
            out_features,
            in_features,
            row_intervals,
            col_intervals,
            rank_per_component,
            bias,
            device,
            dtype,
        )

    @classmethod
    def from_gblr(cls, layer: GBLRLinear) -> FrozenGBLRLinear:
        """Freeze ``layer`` (its eval-mode matrix, on its device and dtype)."""
        if not isinstance(layer, GBLRLinear):
            raise TypeError(f"layer must be a gblr.GBLRLinear, got {type(layer).__name__}")
        rows, cols, u, v = _pack(layer)
        frozen = cls(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            row_intervals=rows,
            col_intervals=cols,
            rank_per_component=layer.rank_per_component,
            device=layer.U.device,
            dtype=layer.U.dtype,
        )
        _fill(frozen, layer, u, v)
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)``."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}, "
                f"got input of shape {tuple(x.shape)}"
            )
        self._refuse_training_the_factors()
        plan = self.compiled_plan() if _traced() else self.plan_for(x.numel() // self.in_features)
        if plan == "dense":  # F.linear takes any leading dims: no reshapes on the fast path
            return P.run_dense(x, self._weight(), self._parameters["bias"])
        x2 = x.reshape(-1, self.in_features)
        y = self._matmul(x2, plan)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._frozen_extra_repr()}"
        )


class FrozenGBLRConv2d(FrozenGBLRMatrix):
    """Inference form of [`gblr.GBLRConv2d`][].

    The ``(out_channels, in_channels * kh * kw)`` kernel matrix is frozen as in
    [`FrozenGBLRLinear`][gblr.deploy.frozen.FrozenGBLRLinear]. ``dense`` and ``lowrank`` run as
    convolutions (a ``K r`` channel convolution then a 1x1 one); ``segment`` and ``blocksparse`` run
    on the unfolded input (``F.unfold``) as matrix products.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as
            ``nn.Conv2d`` (``groups=1``, zero padding; ``padding`` may be ``"same"`` or
            ``"valid"``).
        row_intervals, col_intervals, rank_per_component, device, dtype: as
            [`FrozenGBLRLinear`][gblr.deploy.frozen.FrozenGBLRLinear], columns over ``in_channels *
            kh * kw``.

    Shapes:
        input ``(N, C_in, H, W)`` or ``(C_in, H, W)``, output ``(N, C_out, H', W')``.

    Examples:
        >>> import torch, gblr
        >>> layer = gblr.GBLRConv2d(3, 8, 3, padding=1, structure_init="half",
        ...                         init_cost=0.5).eval()
        >>> frozen = gblr.FrozenGBLRConv2d.from_gblr(layer)
        >>> x = torch.randn(2, 3, 6, 6)
        >>> bool(torch.allclose(frozen(x), layer(x), atol=1e-5))
        True
    """

    counts_per_position = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        row_intervals: Tensor | Sequence,
        col_intervals: Tensor | Sequence,
        rank_per_component: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size, self.stride, self.padding, self.dilation = checked_geometry(
            kernel_size, stride, padding, dilation
        )
        kh, kw = self.kernel_size
        self._init_frozen(
            out_channels,
            in_channels * kh * kw,
            row_intervals,
            col_intervals,
            rank_per_component,
            bias,
            device,
            dtype,
        )

    @classmethod
    def from_gblr(cls, layer: GBLRConv2d) -> FrozenGBLRConv2d:
        """Freeze ``layer`` (its eval-mode kernel matrix, on its device and dtype)."""
        if not isinstance(layer, GBLRConv2d):
            raise TypeError(f"layer must be a gblr.GBLRConv2d, got {type(layer).__name__}")
        rows, cols, u, v = _pack(layer)
        frozen = cls(
            **conv_geometry(layer),
            bias=layer.bias is not None,
            row_intervals=rows,
            col_intervals=cols,
            rank_per_component=layer.rank_per_component,
            device=layer.U.device,
            dtype=layer.U.dtype,
        )
        _fill(frozen, layer, u, v)
        return frozen

    def _padding_amounts(self) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` zero padding, as ``nn.Conv2d`` applies it."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            # nn.Conv2d's 'same': total d (k - 1), the odd one extra on the right/bottom.
            amounts = []
            for k, d in zip(reversed(self.kernel_size), reversed(self.dilation)):
                total = d * (k - 1)
                amounts += [total // 2, total - total // 2]
            return tuple(amounts)  # type: ignore[return-value]
        ph, pw = self.padding  # type: ignore[misc]
        return (pw, pw, ph, ph)

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        left, right, top, bottom = self._padding_amounts()
        sizes = []
        for size, pad, k, s, d in zip(
            (height, width),
            (top + bottom, left + right),
            self.kernel_size,
            self.stride,
            self.dilation,
        ):
            sizes.append(max(0, (size + pad - d * (k - 1) - 1) // s + 1))
        return sizes[0], sizes[1]

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H', W')`` (unbatched ``(C_in, H, W)`` too)."""
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"input must be (N, in_channels={self.in_channels}, H, W) or "
                f"(in_channels, H, W), got shape {tuple(x.shape)}"
            )
        self._refuse_training_the_factors()
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        out_h, out_w = self._output_size(x.shape[-2], x.shape[-1])
        plan = self.compiled_plan() if _traced() else self.plan_for(x.shape[0] * out_h * out_w)
        y = self._conv(x, plan, out_h, out_w)
        return y.squeeze(0) if unbatched else y

    def _conv(self, x: Tensor, plan: str, out_h: int, out_w: int) -> Tensor:
        conv = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        kernel_shape = (self.in_channels, *self.kernel_size)
        if plan == "lowrank" and self.row_intervals.shape[0] == 0:
            plan = "dense"  # no component: the zero kernel (a 0-channel conv is refused)
        if plan == "dense":
            kernel = self._weight().reshape(self.out_channels, *kernel_shape)
            return F.conv2d(x, kernel, self.bias, **conv)
        if plan == "lowrank":
            u, v = self._factors()
            hidden = F.conv2d(x, v.reshape(-1, *kernel_shape), None, **conv)
            return F.conv2d(hidden, u.reshape(self.out_channels, -1, 1, 1), self.bias)
        left, right, top, bottom = self._padding_amounts()
        if left or right or top or bottom:
            x = F.pad(x, (left, right, top, bottom))
        columns = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
        batch, features, positions = columns.shape
        rows = columns.transpose(1, 2).reshape(batch * positions, features)
        y = self._matmul(rows, plan)
        return (
            y.reshape(batch, positions, self.out_channels)
            .transpose(1, 2)
            .reshape(batch, self.out_channels, out_h, out_w)
        )

    def plan_for(self, rows: int) -> str:
        """As `FrozenGBLRMatrix.plan_for`; the untimed default is ``dense`` or
        ``lowrank`` only (the unfolded plans pay for copying the input ``kh kw`` times,
        which the cost model does not see)."""
        chosen = super().plan_for(rows)
        if self._plan == "auto" and self._cache_key(rows) not in self.plan_cache:
            return chosen if chosen in ("dense", "lowrank") else "dense"
        return chosen

    def dense_kernel(self) -> Tensor:
        """The kernel as ``nn.Conv2d.weight``: ``(out_channels, in_channels, kh, kw)``."""
        return self.dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, {self._frozen_extra_repr()}"
        )


def freeze(model: nn.Module) -> nn.Module:
    """Replace, in place, every GBLR layer of ``model`` by its frozen inference form.

    Each [`gblr.GBLRLinear`][] / [`gblr.GBLRConv2d`][] becomes a
    [`FrozenGBLRLinear`][gblr.deploy.frozen.FrozenGBLRLinear] /
    [`FrozenGBLRConv2d`][gblr.deploy.frozen.FrozenGBLRConv2d] holding the exact eval-mode
    matrix: the integer intervals of ``layer.interval_starts()`` /
    ``layer.interval_lengths()``, dead components (an empty interval) dropped, factors
    kept only over their intervals, bias kept, same device and dtype. A layer shared under
    several names becomes one frozen layer under all of them. Outputs equal the eval-mode
    outputs up to float rounding, in any plan.

    Args:
        model: a module containing GBLR layers, or a GBLR layer itself.

    Returns:
        ``model`` (like ``torchao.quantize_``), or the frozen layer when ``model`` itself
        is a GBLR layer. A model that is already frozen is returned unchanged.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has neither GBLR layers nor frozen ones (as
            [`gblr.StructureLearner`][], it asks to convert the model first).

    Examples:
        >>> import torch, gblr
        >>> model = torch.nn.Sequential(gblr.GBLRLinear(16, 8, structure_init="half",
        ...                                             init_cost=0.5))
        >>> model = gblr.freeze(model)
        >>> type(model[0]).__name__
        'FrozenGBLRLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, GBLRLinear):
        return FrozenGBLRLinear.from_gblr(model)
    if isinstance(model, GBLRConv2d):
        return FrozenGBLRConv2d.from_gblr(model)
    frozen: dict[int, nn.Module] = {}
    already_frozen = False
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, (GBLRLinear, GBLRConv2d)):
            if id(module) not in frozen:
                frozen[id(module)] = (
                    FrozenGBLRLinear.from_gblr(module)
                    if isinstance(module, GBLRLinear)
                    else FrozenGBLRConv2d.from_gblr(module)
                )
                # What the layer replaced, when convert marked it (a Hugging Face Conv1D):
                # merge_and_unload and from_pretrained read it.
                replaced = getattr(module, "gblr_replaced", None)
                if replaced is not None:
                    frozen[id(module)].gblr_replaced = replaced
            set_submodule(model, name, frozen[id(module)])
            module.superseded_by = "gblr.freeze"
        elif isinstance(module, FrozenGBLRMatrix):
            already_frozen = True
    if not frozen and not already_frozen:
        raise ValueError(
            f"model ({type(model).__name__}) has no GBLR layer (GBLRLinear or GBLRConv2d) "
            "to freeze; convert it first (gblr.convert) or build it with GBLR layers"
        )
    return model
