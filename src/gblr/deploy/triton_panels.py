"""The ``triton`` execution plan: the two stages of the panels plan as two Triton launches.

On a GPU the ``panels`` plan would be tens of small cuBLAS calls per layer, each one a
launch and a pass over its slice of the activations. Here each stage is one launch of a
*segmented GEMM*: a table of tasks, each computing one tile of output columns as
``out[:, c0:c0 + w] = A[:, idx] @ B`` where ``idx`` is the task's list of ``A`` columns and
``B`` its packed ``(len(idx), w)`` factor. A program handles one (row tile, task) pair and
keeps its accumulator in registers.

- Stage 1: ``A = x``, one task per group of components and tile of its ``Z`` columns;
  ``idx`` lists the group's input columns (its circular union, wrap-around included),
  ``B`` the group's ``V`` over them, transposed. Output: ``Z (N, K r [+1])``.
- Stage 2: ``A = Z``, one task per output panel and tile of it; ``idx`` lists the ``Z``
  columns of the panel's ranges (bias column included), ``B`` the matching rows of ``U^T``.

``Z`` is the only intermediate: ``N (K r + 1)`` values, a fraction of the output's ``N m``
at the ratios where this plan is chosen, and small enough to stay in a large GPU's L2.
Accumulation is in float32; ``Z`` is stored in the input's dtype, like the intermediate
of any two-GEMM low-rank product. float32 inputs use IEEE products (no TF32), so the
plan matches ``dense`` to float32 rounding.

Correctness is tested on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``, as
``tests/conftest.py`` sets when there is no GPU); the plan is a timing candidate of
[`gblr.plan`][] only on CUDA. Importing this module needs ``triton``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .panels import PanelOps

__all__ = ["BLOCK_N", "TritonPanelOps", "run_triton_panels", "triton_panel_ops"]

# Output columns per task. Panels and groups are cut into tiles of at most this width.
BLOCK_N = 64
_BLOCK_M = 64
_BLOCK_K = 32
# Task table columns: output column, width, number of A columns, offset in the index
# array, offset of B in the packed factor, leading dimension of B.
_FIELDS = 6


@triton.jit
def segmented_gemm_kernel(
    a_ptr,
    out_ptr,
    tasks_ptr,
    index_ptr,
    b_ptr,
    rows,
    a_stride,
    out_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``out[rows, c0 + j] = sum_t A[rows, idx[t]] B[t, j]`` for one (row tile, task)."""
    pid_m = tl.program_id(0)
    task = tl.program_id(1)
    fields = tasks_ptr + task * 6
    col0 = tl.load(fields)
    width = tl.load(fields + 1)
    depth = tl.load(fields + 2)
    index_offset = tl.load(fields + 3)
    b_offset = tl.load(fields + 4)
    b_stride = tl.load(fields + 5)
    row_ids = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row_ids < rows
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < depth
        # idx: which columns of A this slice of the contraction reads (a gather along
        # the contiguous dimension of A's rows; the rows themselves are coalesced).
        idx = tl.load(index_ptr + index_offset + ks, mask=k_ok, other=0)
        a = tl.load(
            a_ptr + row_ids[:, None].to(tl.int64) * a_stride + idx[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + b_offset + ks[:, None].to(tl.int64) * b_stride + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    out = out_ptr + row_ids[:, None].to(tl.int64) * out_stride + col0 + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class Stage:
    """One segmented GEMM: ``tasks (T, 6)`` int64, ``index`` int64 ``A`` columns,
    ``factor`` the packed ``B`` blocks (flat, in the activations' dtype)."""

    tasks: Tensor
    index: Tensor
    factor: Tensor


@dataclass(frozen=True)
class TritonPanelOps:
    """Operands of the triton plan: the two stages, ``Z``'s width, ``m``, and whether
    column 0 of ``Z`` is the bias's column of ones."""

    stage1: Stage
    stage2: Stage
    width: int
    out_features: int
    has_bias: bool


def _stage(blocks: list[tuple[int, Tensor, Tensor]], device: torch.device, dtype) -> Stage:
    """Pack ``[(out column, A column indices (d,), B (d, w))]`` into a
    [`Stage`][gblr.deploy.triton_panels.Stage], each block cut into tiles of at most ``BLOCK_N``
    output columns."""
    tasks, indices, factors = [], [], []
    index_offset = factor_offset = 0
    for col0, index, factor in blocks:
        depth, width = factor.shape
        for j in range(0, width, BLOCK_N):
            tasks.append(
                [col0 + j, min(BLOCK_N, width - j), depth, index_offset, factor_offset + j, width]
            )
        indices.append(index)
        factors.append(factor.reshape(-1))
        index_offset += depth
        factor_offset += depth * width
    if not tasks:
        empty = torch.zeros(0, device=device)
        return Stage(torch.zeros(0, _FIELDS, dtype=torch.int64, device=device), empty, empty)
    return Stage(
        torch.tensor(tasks, dtype=torch.int64, device=device),
        torch.cat(indices).to(device=device, dtype=torch.int64),
        torch.cat(factors).to(device=device, dtype=dtype),
    )


def triton_panel_ops(ops: PanelOps) -> TritonPanelOps:
    """Repack [`gblr.deploy.panels.PanelOps`][] (built on the layer's device and dtype)
    into the two task tables of the triton plan. The ops must be in the basic forms
    (``panel_ops(..., stage1="groups", stage2="panels")``): the kernel writes each block of
    ``Z`` and each panel of the output once."""
    if ops.segments or ops.head:
        raise ValueError(
            "ops must be in the basic forms (panel_ops(..., stage1='groups', "
            f"stage2='panels')); got {len(ops.segments)} accumulated segments and a head of "
            f"{ops.head} columns"
        )
    sample = next((t for _, _, pieces in (*ops.groups, *ops.panels) for *_, t in pieces), None)
    device = sample.device if sample is not None else torch.device("cpu")
    dtype = sample.dtype if sample is not None else torch.float32
    stage1 = []
    for z0, _, pieces in ops.groups:
        index = torch.cat([torch.arange(a, b) for a, b, _ in pieces])
        # V pieces are (G r, b - a); stage 1 contracts over the input columns.
        factor = torch.cat([v_piece.t() for *_, v_piece in pieces], 0).contiguous()
        stage1.append((z0, index, factor))
    stage2 = []
    for p0, _, ranges in ops.panels:
        if not ranges:
            continue
        index = torch.cat([torch.arange(z0, z1) for z0, z1, _ in ranges])
        factor = torch.cat([ut for *_, ut in ranges], 0).contiguous()
        stage2.append((p0, index, factor))
    uncovered = [(p0, p1) for p0, p1, ranges in ops.panels if not ranges]
    if uncovered:
        # Outputs no component (nor the bias) covers: a zero contraction of depth 0
        # writes their zeros, so the output needs no separate fill.
        for p0, p1 in uncovered:
            zeros = torch.zeros(0, p1 - p0, device=device, dtype=dtype)
            stage2.append((p0, torch.zeros(0, dtype=torch.int64), zeros))
    return TritonPanelOps(
        _stage(stage1, device, dtype),
        _stage(stage2, device, dtype),
        ops.width,
        ops.out_features,
        ops.has_bias,
    )


def _launch(a: Tensor, out: Tensor, stage: Stage) -> None:
    if stage.tasks.shape[0] == 0 or a.shape[0] == 0:
        return
    grid = (triton.cdiv(a.shape[0], _BLOCK_M), stage.tasks.shape[0])
    segmented_gemm_kernel[grid](
        a,
        out,
        stage.tasks,
        stage.index,
        stage.factor,
        a.shape[0],
        a.stride(0),
        out.stride(0),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=_BLOCK_K,
        IEEE=a.dtype == torch.float32,
    )


def run_triton_panels(x: Tensor, ops: TritonPanelOps) -> Tensor:
    """``(N, n) -> (N, m)``: stage 1 into ``Z (N, width)``, stage 2 into the output.

    ``x`` must have unit stride along its last dimension (it is made so otherwise).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    z = x.new_empty(rows, ops.width)
    if ops.has_bias:
        z[:, 0] = 1.0  # stage 1 writes columns 1..width-1 only
    _launch(x, z, ops.stage1)
    y = x.new_empty(rows, ops.out_features)
    _launch(z, y, ops.stage2)
    return y
