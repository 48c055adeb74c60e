"""The panels plan (two-stage segment form): equal to the dense product in every case
its operands have to handle, and the tiling of the output it relies on."""

import pytest
import torch

import gblr
from gblr.deploy import FrozenGBLRLinear
from gblr.deploy import panels as PN
from tests.deploy.test_plans import narrow_layer, rel_error


def dense_reference(frozen, x):
    weight = frozen.dense_weight().double()
    y = x.double() @ weight.T
    return y if frozen.bias is None else y + frozen.bias.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_panels_equal_dense_with_wrapped_narrow_and_full_components(bias, rank, rows):
    _, frozen = narrow_layer(k=50, rank=rank, seed=rank)
    if not bias:
        frozen.bias = None
    x = torch.randn(rows, 61)
    frozen.plan = "panels"
    assert rel_error(frozen(x), dense_reference(frozen, x)) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_panels_write_uncovered_outputs_as_bias_or_zero(bias):
    # Two components covering output rows 10..29 only: rows 0..9 and 30..99 get the bias
    # (or zeros), though the output starts uninitialized.
    rows = torch.tensor([[10, 12], [20, 10]])
    cols = torch.tensor([[70, 50], [0, 5]])  # the first wraps around the 100 inputs
    b = torch.randn(100) if bias else None
    layer = gblr.GBLRLinear.from_intervals(
        torch.randn(2, 2, 100), torch.randn(2, 2, 100), rows, cols, bias=b
    ).eval()
    frozen = FrozenGBLRLinear.from_gblr(layer)
    frozen.plan = "panels"
    x = torch.randn(33, 100)
    expected = dense_reference(frozen, x)
    assert rel_error(frozen(x), expected) <= 1e-5
    y = frozen(x)
    assert torch.equal(y[:, :10], b[:10].expand(33, 10) if bias else torch.zeros(33, 10))


def test_panels_tile_the_output_and_stay_inside_the_rank_buffer():
    _, frozen = narrow_layer(in_features=300, out_features=400, k=120, rank=2, seed=4)
    ops = frozen._panel_ops(4096)
    assert ops.has_bias and ops.width == 2 * frozen.num_components + 1
    edges = [(p0, p1) for p0, p1, _ in ops.panels]
    assert edges[0][0] == 0 and edges[-1][1] == 400
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    assert len(ops.panels) > 1  # narrow components: not one low-rank product
    for p0, p1, ranges in ops.panels:
        for z0, z1, ut in ranges:
            assert 0 <= z0 < z1 <= ops.width and ut.shape == (z1 - z0, p1 - p0)
    covered = sorted(z for z0, z1, _ in ops.groups for z in range(z0, z1))
    assert covered == list(range(1, ops.width))  # column 0 is the bias's ones


def test_panels_in_several_row_chunks(monkeypatch):
    assert PN.chunk_rows(3072, 769) in (256, 512, 1024)
    _, frozen = narrow_layer(k=40, rank=2, seed=5)
    x = torch.randn(23, 61)
    expected = dense_reference(frozen, x)
    monkeypatch.setattr(PN, "chunk_rows", lambda out_features, width: 5)  # 5 chunks, last 3
    frozen.plan = "panels"
    assert rel_error(frozen(x), expected) <= 1e-5


def test_panels_follow_an_in_place_bias_change():
    _, frozen = narrow_layer(seed=6)
    frozen.plan = "panels"
    x = torch.randn(4, 61)
    frozen(x)  # builds and caches the operands, the bias inside them
    with torch.no_grad():
        frozen.bias.add_(1.0)
    assert rel_error(frozen(x), dense_reference(frozen, x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_panels_in_16_bit(dtype):
    _, frozen = narrow_layer(seed=7)
    frozen = frozen.to(dtype)
    x = torch.randn(9, 61, dtype=dtype)
    frozen.plan = "panels"
    expected = x.double() @ frozen.dense_weight().double().T + frozen.bias.double()
    assert rel_error(frozen(x), expected) <= 2e-2


def test_panels_of_a_layer_without_components_is_its_bias():
    ops = PN.panel_ops(
        torch.zeros(6, 0),
        torch.zeros(0, 5),
        torch.zeros(0, 2, dtype=torch.long),
        torch.zeros(0, 2, dtype=torch.long),
        1,
        8,
        torch.arange(6.0),
    )
    y = PN.run_panels(torch.randn(3, 5), ops)
    assert torch.equal(y, torch.arange(6.0).expand(3, 6))


def forced_ops(frozen, forms, rows=4096):
    return PN.panel_ops(
        *frozen._factors(),
        frozen.row_intervals,
        frozen.col_intervals,
        frozen.rank_per_component,
        rows,
        frozen.bias,
        *forms,
    )


FORMS = [("groups", "panels"), ("segments", "panels"), ("groups", "head"), ("segments", "head")]


@pytest.mark.parametrize("forms", FORMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_panel_forms_equal_dense(forms, bias, rank, rows):
    # 61 inputs, 47 outputs, narrow components wrapping around both ends, two full ones.
    _, frozen = narrow_layer(k=50, rank=rank, seed=20 + rank)
    if not bias:
        frozen.bias = None
    ops = forced_ops(frozen, forms)
    if forms[0] == "segments":
        assert ops.segments and ops.zeroed
    if forms[1] == "head":
        assert ops.head >= (1 if bias else rank)  # the bias's column and/or a full row
    x = torch.randn(rows, 61)
    assert rel_error(PN.run_panels(x, ops), dense_reference(frozen, x)) <= 1e-5


def test_panels_of_an_empty_batch_are_empty():
    _, frozen = narrow_layer(k=50, rank=1, seed=21)
    y = PN.run_panels(torch.randn(0, 61), forced_ops(frozen, FORMS[0]))
    assert y.shape == (0, 47)


def test_segments_accumulate_every_narrow_component_and_never_a_full_one():
    _, frozen = narrow_layer(in_features=300, out_features=200, k=120, rank=2, seed=24)
    ops = forced_ops(frozen, ("segments", "panels"))
    written = [z for z0, z1, _ in ops.groups for z in range(z0, z1)]
    zeroed = [z for z0, z1 in ops.zeroed for z in range(z0, z1)]
    assert sorted(written + zeroed) == list(range(1, ops.width))  # column 0: the bias
    for z0, z1, a, b, v_block in ops.segments:
        assert set(range(z0, z1)) <= set(zeroed) and v_block.shape == (z1 - z0, b - a)
        assert 0 <= a < b <= 300
    # Segments of one width tile the input columns; some component wraps around them.
    edges = sorted({(a, b) for _, _, a, b, _ in ops.segments})
    assert edges[0][0] == 0 and edges[-1][1] == 300
    x = torch.randn(40, 300)
    assert rel_error(PN.run_panels(x, ops), dense_reference(frozen, x)) <= 1e-5


@pytest.mark.parametrize("forms", FORMS)
def test_panel_forms_in_several_row_chunks(forms, monkeypatch):
    _, frozen = narrow_layer(k=40, rank=2, seed=25)
    ops = forced_ops(frozen, forms)
    x = torch.randn(23, 61)
    monkeypatch.setattr(PN, "chunk_rows", lambda out_features, width: 5)  # 5 chunks, last 3
    assert rel_error(PN.run_panels(x, ops), dense_reference(frozen, x)) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_head_form_without_full_rows(bias):
    # Narrow components only: the head is the bias's column, or absent without a bias (each
    # panel is then written once, as in the panels form; outputs 0..9 are bias or zero).
    rows = torch.tensor([[10, 12], [20, 10], [90, 15]])  # the last wraps around 100 outputs
    cols = torch.tensor([[70, 50], [0, 5], [3, 9]])
    b = torch.randn(100) if bias else None
    layer = gblr.GBLRLinear.from_intervals(
        torch.randn(3, 2, 100), torch.randn(3, 2, 100), rows, cols, bias=b
    ).eval()
    frozen = FrozenGBLRLinear.from_gblr(layer)
    ops = forced_ops(frozen, ("segments", "head"))
    assert ops.head == (1 if bias else 0)
    x = torch.randn(33, 100)
    y = PN.run_panels(x, ops)
    assert rel_error(y, dense_reference(frozen, x)) <= 1e-5
    assert torch.equal(y[:, 30:90], b[30:90].expand(33, 60) if bias else torch.zeros(33, 60))


def test_auto_forms_on_a_half_structure():
    # The time model picks the segments form for a wide input (each stage-1 GEMM writes
    # ~100 rows of Z, not 32) and the head for the full-width components.
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(1536, 384, structure_init="half", init_cost=0.3).eval()
    frozen = FrozenGBLRLinear.from_gblr(layer)
    ops = frozen._panel_ops(4096)
    full = int((frozen.row_intervals[:, 1] >= 384).sum())
    assert ops.segments and ops.head == 1 + full
    basic = frozen._panel_ops(4096, ("groups", "panels"))
    assert not basic.segments and basic.head == 0
    frozen.plan = "panels"
    x = torch.randn(64, 1536)
    assert rel_error(frozen(x), dense_reference(frozen, x)) <= 1e-5


@pytest.mark.parametrize("argument", ["stage1", "stage2"])
def test_panel_ops_refuse_unknown_forms(argument):
    _, frozen = narrow_layer()
    with pytest.raises(ValueError, match=argument):
        PN.panel_ops(
            *frozen._factors(),
            frozen.row_intervals,
            frozen.col_intervals,
            2,
            64,
            frozen.bias,
            **{argument: "fast"},
        )
