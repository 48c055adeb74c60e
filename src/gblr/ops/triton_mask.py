"""Fused Triton kernels for GBLR factors masked by Gaudi masks on the grid (training).

``mask_factors(U, V, widths, locations)`` multiplies each factor of shape ``(K, r, n)`` by
its components' Gaudi masks on the grid (``gaudi_mask_on_grid``). Unfused, the masks are
built as ``(K, n)`` tensors, multiplied in, cast for autocast, and in backward reduced
against the factor and two edge kernels: 85 kernels per training step of a 768x3072
layer (measured on an H100, docs/BENCHMARKS.md), which bound a GPU step by launch
overhead. Here each direction is one launch for both factors; the grid rounding of
widths and locations and the mask values (read from the cumulative table of
[`gblr.ops.gaudi._grid_kernels`][]) are computed on the fly.

Correctness is tested on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``, set
before triton is first imported). Importing this module needs ``triton``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    # torch.round's rule, so the kernel lands on the same grid point as eval's intervals.
    floor = tl.floor(x)
    diff = x - floor
    half = floor * 0.5
    floor_is_odd = tl.floor(half) != half
    up = (diff > 0.5) | ((diff == 0.5) & floor_is_odd)
    return tl.where(up, floor + 1.0, floor)


@triton.jit
def _interval(width_ptr, location_ptr, component, n):
    """``(start, length)`` on the grid, as ``gaudi_mask_on_grid`` rounds them."""
    width = tl.load(width_ptr + component)
    location = tl.load(location_ptr + component)
    # A NaN or infinite value would round to an arbitrary integer (an out-of-range table
    # read); it gets the empty interval at 0 here, in the kernel, so the hot path needs no
    # extra launches to clean it (the learner and the interval queries report such values).
    width = tl.where((width == width) & (tl.abs(width) < float("inf")), width, 0.0)
    location = tl.where((location == location) & (tl.abs(location) < float("inf")), location, 0.0)
    length = _round_half_even(tl.minimum(tl.maximum(width, 0.0), 1.0) * n).to(tl.int64)
    start = _round_half_even(location * n).to(tl.int64) % n
    start = tl.where(start < 0, start + n, start)
    return start, length


@triton.jit
def _mask_values(cumulative_ptr, start, length, n, cols):
    # mask[j] = C(j - s + 1) - C(j - s - L + 1), C at offset 2n of the table (see gaudi.py).
    first = 2 * n + 1 - start
    upper = tl.load(cumulative_ptr + first + cols, mask=cols < n, other=0.0)
    lower = tl.load(cumulative_ptr + first - length + cols, mask=cols < n, other=0.0)
    return upper - lower


@triton.jit
def _forward_side(
    factor_ptr, out_ptr, cumulative_ptr, width_ptr, location_ptr, component, rank, n, cols
):
    valid = cols < n
    start, length = _interval(width_ptr, location_ptr, component, n)
    mask = _mask_values(cumulative_ptr, start, length, n, cols)
    row = component.to(tl.int64) * rank
    for i in range(rank):
        offsets = (row + i) * n + cols
        values = tl.load(factor_ptr + offsets, mask=valid, other=0.0).to(mask.dtype)
        tl.store(out_ptr + offsets, (values * mask).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def masked_factors_forward_kernel(
    u_ptr,
    u_out_ptr,
    u_cumulative_ptr,
    v_ptr,
    v_out_ptr,
    v_cumulative_ptr,
    widths_ptr,
    locations_ptr,
    num_components,
    rank,
    rows,
    cols,
    BLOCK: tl.constexpr,
):
    """Grid ``(K, cdiv(max(rows, cols), BLOCK), 2)``; axis 2 picks the factor:
    ``out[k, i, j] = factor[k, i, j] * mask[k, j]``. Row 0 of widths/locations masks
    ``V`` (columns), row 1 masks ``U`` (rows)."""
    component = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if tl.program_id(2) == 0:
        _forward_side(
            v_ptr,
            v_out_ptr,
            v_cumulative_ptr,
            widths_ptr,
            locations_ptr,
            component,
            rank,
            cols,
            offsets,
        )
    else:
        _forward_side(
            u_ptr,
            u_out_ptr,
            u_cumulative_ptr,
            widths_ptr + num_components,
            locations_ptr + num_components,
            component,
            rank,
            rows,
            offsets,
        )


@triton.jit
def _backward_side(
    grad_out_ptr,
    factor_ptr,
    grad_factor_ptr,
    grad_width_ptr,
    grad_location_ptr,
    cumulative_ptr,
    edge_ptr,
    width_ptr,
    location_ptr,
    component,
    rank,
    n,
    BLOCK: tl.constexpr,
):
    start, length = _interval(width_ptr, location_ptr, component, n)
    # Row a of the edge table's unfolded view is edge[a + j]; see _GaudiMaskOnGrid.backward.
    end_offset = (2 * n - start - length) % n
    start_offset = (n - start) % n
    row = component.to(tl.int64) * rank
    acc_end = tl.zeros([BLOCK], dtype=cumulative_ptr.dtype.element_ty)
    acc_start = tl.zeros([BLOCK], dtype=cumulative_ptr.dtype.element_ty)
    for block_start in range(0, n, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        valid = cols < n
        mask = _mask_values(cumulative_ptr, start, length, n, cols)
        grad_mask = tl.zeros_like(mask)
        for i in range(rank):
            offsets = (row + i) * n + cols
            grad = tl.load(grad_out_ptr + offsets, mask=valid, other=0.0).to(mask.dtype)
            values = tl.load(factor_ptr + offsets, mask=valid, other=0.0).to(mask.dtype)
            tl.store(
                grad_factor_ptr + offsets,
                (grad * mask).to(grad_factor_ptr.dtype.element_ty),
                mask=valid,
            )
            grad_mask += grad * values
        edge_at_end = tl.load(edge_ptr + end_offset + cols, mask=valid, other=0.0)
        edge_at_start = tl.load(edge_ptr + start_offset + cols, mask=valid, other=0.0)
        acc_end += grad_mask * edge_at_end
        acc_start += grad_mask * edge_at_start
    # Widening moves the end; moving the box moves both ends the same way.
    grad_end = tl.sum(acc_end, axis=0)
    tl.store(grad_width_ptr + component, grad_end)
    tl.store(grad_location_ptr + component, grad_end - tl.sum(acc_start, axis=0))


@triton.jit
def masked_factors_backward_kernel(
    u_grad_out_ptr,
    u_ptr,
    u_grad_ptr,
    u_cumulative_ptr,
    u_edge_ptr,
    v_grad_out_ptr,
    v_ptr,
    v_grad_ptr,
    v_cumulative_ptr,
    v_edge_ptr,
    widths_ptr,
    locations_ptr,
    grad_widths_ptr,
    grad_locations_ptr,
    num_components,
    rank,
    rows,
    cols,
    BLOCK: tl.constexpr,
):
    """Grid ``(K, 2)``: each factor's gradient (masked) and, per component, the mask
    gradient reduced against the edge kernel at the box's end and at its start, written
    to the ``(2, K)`` gradients of widths and locations."""
    component = tl.program_id(0)
    if tl.program_id(1) == 0:
        _backward_side(
            v_grad_out_ptr,
            v_ptr,
            v_grad_ptr,
            grad_widths_ptr,
            grad_locations_ptr,
            v_cumulative_ptr,
            v_edge_ptr,
            widths_ptr,
            locations_ptr,
            component,
            rank,
            cols,
            BLOCK,
        )
    else:
        _backward_side(
            u_grad_out_ptr,
            u_ptr,
            u_grad_ptr,
            grad_widths_ptr + num_components,
            grad_locations_ptr + num_components,
            u_cumulative_ptr,
            u_edge_ptr,
            widths_ptr + num_components,
            locations_ptr + num_components,
            component,
            rank,
            rows,
            BLOCK,
        )


def block_size(n: int) -> int:
    """Columns per program: a power of two, at most 1024."""
    return min(1024, triton.next_power_of_2(max(n, 16)))
