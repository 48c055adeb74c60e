"""The triton plan (two segmented-GEMM launches) against the dense product: on CUDA when
there is one, else through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported)."""

import pytest
import torch

import gblr
from gblr.deploy import FrozenGBLRLinear
from tests.conftest import DEVICE
from tests.deploy.test_plans import narrow_layer, rel_error

pytest.importorskip("triton")
from gblr.deploy import panels as PN
from gblr.deploy import triton_panels as T


def reference(frozen, x):
    y = x.double() @ frozen.dense_weight().double().T
    return y if frozen.bias is None else y + frozen.bias.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("rows", [1, 70])
def test_triton_plan_equals_dense(bias, rank, rows):
    # Wrapped narrow components, two full ones; 47 outputs, so tiles are partial.
    _, frozen = narrow_layer(k=30, rank=rank, seed=10 + rank)
    if not bias:
        frozen.bias = None
    frozen = frozen.to(DEVICE)
    frozen.plan = "triton"
    x = torch.randn(rows, 61, device=DEVICE)
    assert rel_error(frozen(x).cpu(), reference(frozen, x).cpu()) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_triton_stages_with_many_groups_and_panels_equal_dense(bias):
    # Planned for many rows, the narrow components split into many groups and panels,
    # some wrapping around: every task reads its own slice of the index and factor.
    _, frozen = narrow_layer(in_features=200, out_features=260, k=90, rank=2, seed=12)
    if not bias:
        frozen.bias = None
    frozen = frozen.to(DEVICE)
    ops = PN.panel_ops(
        *frozen._factors(),
        frozen.row_intervals,
        frozen.col_intervals,
        2,
        1 << 20,
        frozen.bias,
        stage1="groups",
        stage2="panels",
    )
    assert len(ops.groups) > 3 and len(ops.panels) > 3
    tops = T.triton_panel_ops(ops)
    assert len(set(tops.stage1.tasks[:, 3].tolist())) > 3
    x = torch.randn(70, 200, device=DEVICE)
    y = T.run_triton_panels(x, tops)
    assert rel_error(y.cpu(), reference(frozen, x).cpu()) <= 1e-5


def test_triton_tasks_tile_wide_panels_and_uncovered_outputs():
    # 150 outputs: components cover rows 0..99 only; a full-width group of 80 inputs has
    # more than BLOCK_N columns in one panel.
    k = 6
    rows = torch.tensor([[0, 100]] * 2 + [[10 * i, 20] for i in range(4)])
    cols = torch.tensor([[0, 80]] * 2 + [[75, 10], [0, 5], [40, 30], [60, 20]])
    layer = gblr.GBLRLinear.from_intervals(
        torch.randn(k, 1, 150), torch.randn(k, 1, 80), rows, cols, bias=None
    ).eval()
    frozen = FrozenGBLRLinear.from_gblr(layer).to(DEVICE)
    frozen.plan = "triton"
    x = torch.randn(9, 80, device=DEVICE)
    y = frozen(x)
    assert rel_error(y.cpu(), reference(frozen, x).cpu()) <= 1e-5
    assert torch.equal(y[:, 100:].cpu(), torch.zeros(9, 50))  # written, not left empty
    ops = frozen._triton_ops(16)
    widths = ops.stage2.tasks[:, 1]
    assert int(widths.max()) <= T.BLOCK_N and int(widths.sum()) == 150


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bfloat16 tl.dot needs a GPU")
def test_triton_plan_bfloat16_on_cuda():
    _, frozen = narrow_layer(k=30, rank=2, seed=3)
    frozen = frozen.to(device=DEVICE, dtype=torch.bfloat16)
    frozen.plan = "triton"
    x = torch.randn(300, 61, device=DEVICE, dtype=torch.bfloat16)
    assert rel_error(frozen(x).float().cpu(), reference(frozen, x).cpu()) <= 2e-2


def test_triton_plan_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    _, frozen = narrow_layer()
    frozen.plan = "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="plan 'triton' runs on CUDA tensors only"):
        frozen(torch.randn(2, 61))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the CPU candidates")
def test_planner_does_not_time_triton_on_cpu():
    _, frozen = narrow_layer()
    report = gblr.plan(frozen, torch.randn(8, 61), repeats=1)
    assert "triton" not in report.layers[0].times_ms


@pytest.mark.parametrize("forms", [("segments", "panels"), ("groups", "head")])
def test_triton_ops_refuse_the_cpu_forms(forms):
    # Accumulated stage-1 segments and a stage-2 head write a block twice: the kernels
    # write each once, so such ops are refused rather than run wrong.
    _, frozen = narrow_layer(seed=13)
    ops = PN.panel_ops(
        *frozen._factors(), frozen.row_intervals, frozen.col_intervals, 2, 64, frozen.bias, *forms
    )
    with pytest.raises(ValueError, match="basic forms"):
        T.triton_panel_ops(ops)
