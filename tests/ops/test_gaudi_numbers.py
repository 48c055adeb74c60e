"""Interval masks at the edges of the numbers: σ = inf and tiny σ, NaN and infinite
widths and locations."""

from __future__ import annotations

import math

import pytest
import torch

import gblr
from gblr.ops import boxcar_mask, gaudi_mask_on_grid, interval_lengths, interval_starts
from gblr.ops.gaudi import _gaudi_mask_on_grid_traceable, mask_factors
from tests.conftest import DEVICE, circular_boxcar

STARTS, LENGTHS, N = [0, 6, 3, 2], [3, 4, 7, 0], 7  # includes a wrap, a full and an empty box


def grid_interval(dtype=torch.float64):
    return (
        torch.tensor(LENGTHS, dtype=dtype) / N,
        torch.tensor(STARTS, dtype=dtype) / N,
    )


@pytest.mark.parametrize("tables", ["series", "fft"])
def test_traceable_masks_at_sigma_inf_are_the_brute_force_boxcars(tables, monkeypatch):
    """``exp(-(k/σ)²/2)`` is exactly 1 at σ = inf: the compiled path's masks are boxcars."""
    if tables == "series":  # the GPU's tables, built from the σ tensor itself
        monkeypatch.setattr(gblr.ops.gaudi, "_grid_tables_op", None)
    width, location = grid_interval()
    mask = _gaudi_mask_on_grid_traceable(width, location, N, torch.tensor(math.inf), torch.float64)
    assert torch.allclose(mask, circular_boxcar(STARTS, LENGTHS, N), atol=1e-12, rtol=0)


def test_masks_approach_the_boxcar_as_sigma_grows_and_equal_it_at_inf():
    width, location = grid_interval()
    box = circular_boxcar(STARTS, LENGTHS, N)
    errors = [
        float((gaudi_mask_on_grid(width, location, N, sigma) - box).abs().max())
        for sigma in (1.0, 10.0, 1e3, 1e6)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-9, errors
    assert torch.equal(gaudi_mask_on_grid(width, location, N, math.inf), box)
    fft = gblr.gaudi_mask(width, location, N, sigma=math.inf)
    assert torch.allclose(fft, box, atol=1e-12, rtol=0)


def test_a_tiny_sigma_gives_its_limit_not_nan():
    """σ² underflowed to 0, and ``-k² / (2 σ²)`` was ``0 / 0`` at ``k = 0``: NaN masks.
    The limit σ -> 0 keeps only the mean: every entry is the box's share ``L / n``."""
    width, location = grid_interval()
    share = (torch.tensor(LENGTHS, dtype=torch.float64) / N)[:, None].expand(-1, N)
    for mask in (
        gblr.gaudi_mask(width, location, N, sigma=1e-200),
        gaudi_mask_on_grid(width, location, N, sigma=1e-200),
        _gaudi_mask_on_grid_traceable(
            width, location, N, torch.tensor(1e-200, dtype=torch.float64), torch.float64
        ),
    ):
        assert torch.allclose(mask, share, atol=1e-12), mask


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_interval_queries_refuse_non_finite_values(value):
    width, location = grid_interval()
    width[1], location[2] = value, value
    with pytest.raises(ValueError, match=rf"width must be finite .* got {value} at index \(1,\)"):
        interval_lengths(width, N)
    with pytest.raises(ValueError, match=r"location must be finite .* at index \(2,\)"):
        interval_starts(location, N)


def test_masks_of_non_finite_intervals_are_nan_rows():
    """No host read in the masks (they run in every forward): the rows of a NaN or
    infinite interval are NaN, the others exact; nothing indexes out of range."""
    width, location = grid_interval()
    width[1], location[2] = math.nan, math.inf
    box = circular_boxcar(STARTS, LENGTHS, N)
    good = [0, 3]
    for mask in (
        boxcar_mask(width, location, N),
        gaudi_mask_on_grid(width, location, N),
        gaudi_mask_on_grid(width, location, N, sigma=3.0),
        _gaudi_mask_on_grid_traceable(width, location, N, torch.tensor(math.inf), torch.float64),
    ):
        assert torch.isnan(mask[1:3]).all()
        if torch.equal(mask[good], box[good]) or torch.allclose(mask[good], box[good], atol=1e-12):
            continue
        assert torch.isfinite(mask[good]).all()  # the smoothed one: finite, not a boxcar


@pytest.mark.parametrize("sigma", [None, 3.0])
def test_the_checked_finite_path_gives_the_guarded_masks_and_gradients_bit_for_bit(sigma):
    """``mask_factors_unchecked`` on the CPU skips the masks' element-wise guards once one
    sum has shown every width and location finite: nothing may change but the speed."""
    from gblr.ops.gaudi import _GaudiMaskOnGrid, _known_finite

    torch.manual_seed(0)
    width = torch.rand(12, dtype=torch.float32) * 1.4 - 0.2  # some clamp to 0 and to 1
    location = torch.randn(12, dtype=torch.float32) * 3  # some wrap several times
    results = []
    for finite in (False, True):
        w, loc = width.clone().requires_grad_(), location.clone().requires_grad_()
        mask = _GaudiMaskOnGrid.apply(w, loc, 19, sigma, torch.float32, finite)
        (mask * torch.linspace(-1, 2, 19)).sum().backward()
        results.append((mask, w.grad, loc.grad))
    for guarded, fast in zip(*results):
        assert torch.equal(guarded, fast)
    assert _known_finite(width, location)
    for value in (math.nan, math.inf, -math.inf):
        bad = location.clone()
        bad[3] = value
        assert not _known_finite(width, bad)
    both = location.clone()
    both[0], both[1] = math.inf, -math.inf  # a sum of NaN, not a finite cancellation
    assert not _known_finite(width, both)
    huge = torch.full((4,), 3e38)  # finite float32 values whose float32 sum overflows
    assert _known_finite(huge, torch.zeros(4))


def test_triton_kernels_give_a_non_finite_interval_the_empty_box():
    """The Triton backend reads no flags on the host; its kernels would round NaN to an
    arbitrary int64 (an out-of-range read), so the kernels make the interval empty."""
    torch.manual_seed(0)
    k, r, rows, cols = 4, 1, N, 5
    u, v = torch.randn(k, r, rows, device=DEVICE), torch.randn(k, r, cols, device=DEVICE)
    widths = torch.tensor(
        [[1.0, 0.4, 0.6, 1.0], [LENGTHS[0] / N, math.nan, 3 / N, 1.0]], device=DEVICE
    )
    locations = torch.tensor([[0.0, 0.2, math.inf, 0.0], [0.0, 0.5, 1 / N, 0.0]], device=DEVICE)
    u_out, v_out = mask_factors(u, v, widths, locations, backend="triton")
    assert torch.isfinite(u_out).all() and torch.isfinite(v_out).all()
    assert torch.count_nonzero(u_out[1]) == 0  # NaN row width: the empty row interval
    ref_u, ref_v = mask_factors(
        u, v, torch.nan_to_num(widths, nan=0.0), torch.nan_to_num(locations, posinf=0.0),
        backend="torch",
    )  # fmt: skip
    assert torch.allclose(u_out, ref_u) and torch.allclose(v_out, ref_v)


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    """Compiled Triton kernels cannot read CPU memory: a clear error, not a crash inside
    Triton's launcher (seen on an H200, 2026-12-04)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    u, v = torch.randn(2, 1, 5), torch.randn(2, 1, 6)
    widths, locations = torch.full((2, 2), 0.5), torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"backend='triton' needs every tensor on one CUDA"):
        mask_factors(u, v, widths, locations, backend="triton")


def _masked_by_composition(u, v, widths, locations, sigma, finite):
    """The torch backend as it was composed before its single autograd node: two grid masks
    times the factors, differentiated by autograd."""
    from gblr.ops.gaudi import _GaudiMaskOnGrid, _mask_dtype

    dtype = _mask_dtype(torch.promote_types(widths.dtype, locations.dtype))
    rows, cols = u.shape[2], v.shape[2]
    row_mask = _GaudiMaskOnGrid.apply(widths[1], locations[1], rows, sigma, dtype, finite)
    col_mask = _GaudiMaskOnGrid.apply(widths[0], locations[0], cols, sigma, dtype, finite)
    return u * row_mask.to(u.dtype).unsqueeze(1), v * col_mask.to(v.dtype).unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [None, 2.5])
@pytest.mark.parametrize("learned", ["all", "factors", "structure", "u only"])
@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("r", [1, 2])
def test_one_node_masking_is_the_composed_masking_bit_for_bit(dtype, sigma, learned, finite, r):
    """``_MaskFactorsTorch`` (one autograd node for both masks and products) gives the values
    and every gradient of the composition it replaced, to the last bit, whichever inputs
    need a gradient, with and without the element-wise guards."""
    from gblr.ops.gaudi import _mask_dtype, _MaskFactorsTorch

    torch.manual_seed(1)
    k, rows, cols = 6, 11, 7
    inputs = {
        "u": torch.randn(k, r, rows, dtype=dtype),
        "v": torch.randn(k, r, cols, dtype=dtype),
        "widths": torch.rand(2, k, dtype=dtype) * 1.2 - 0.1,
        "locations": torch.randn(2, k, dtype=dtype) * 2,
    }
    grads_of = {
        "all": ("u", "v", "widths", "locations"),
        "factors": ("u", "v"),
        "structure": ("widths", "locations"),
        "u only": ("u",),
    }[learned]
    weight_u, weight_v = torch.randn(k, r, rows, dtype=dtype), torch.randn(k, r, cols, dtype=dtype)
    results = []
    for fused in (False, True):
        leaves = {
            name: value.clone().requires_grad_(name in grads_of) for name, value in inputs.items()
        }
        arguments = (leaves["u"], leaves["v"], leaves["widths"], leaves["locations"], sigma)
        if fused:
            mask_dtype = _mask_dtype(dtype)
            out_u, out_v = _MaskFactorsTorch.apply(*arguments, mask_dtype, finite)
        else:
            out_u, out_v = _masked_by_composition(*arguments, finite)
        ((out_u * weight_u).sum() + (out_v * weight_v).sum()).backward()
        results.append((out_u, out_v, *(leaves[name].grad for name in inputs)))
    for composed, fused in zip(*results, strict=True):
        if composed is None:
            assert fused is None
        else:
            assert fused is not None and fused.dtype == composed.dtype
            assert torch.equal(composed, fused)


@pytest.mark.parametrize("sigma", [None, 2.5])
@pytest.mark.parametrize(
    "skip", [(True, False, False), (False, True, True), (True, True, False), (True, False, True)]
)
def test_skipped_structure_gradients_are_zeros_and_the_rest_is_unchanged(sigma, skip):
    """``skip`` (input widths, output widths, locations): what a learner holds comes back
    as zeros, every other gradient and both outputs as without it, to the last bit."""
    from gblr.ops.gaudi import mask_factors_unchecked

    torch.manual_seed(2)
    k, rows, cols = 6, 11, 7
    inputs = (
        torch.randn(k, 1, rows),
        torch.randn(k, 1, cols),
        torch.rand(2, k) * 0.9 + 0.05,
        torch.rand(2, k),
    )
    weight_u, weight_v = torch.randn(k, 1, rows), torch.randn(k, 1, cols)
    results = []
    for each in (None, skip):
        leaves = [value.clone().requires_grad_(True) for value in inputs]
        out_u, out_v = mask_factors_unchecked(*leaves, sigma, backend="torch", skip=each)
        ((out_u * weight_u).sum() + (out_v * weight_v).sum()).backward()
        results.append((out_u, out_v, *(leaf.grad for leaf in leaves)))
    (u, v, grad_u, grad_v, widths, locations), skipped = results
    assert torch.equal(skipped[0], u) and torch.equal(skipped[1], v)
    assert torch.equal(skipped[2], grad_u) and torch.equal(skipped[3], grad_v)
    for side in (0, 1):
        expected = torch.zeros_like(widths[side]) if skip[side] else widths[side]
        assert torch.equal(skipped[4][side], expected)
        assert skip[side] or bool(widths[side].abs().sum() > 0)  # a gradient to skip
    assert torch.equal(skipped[5], torch.zeros_like(locations) if skip[2] else locations)


def test_one_node_masking_passes_gradcheck():
    """The factors' gradients against finite differences in float64. (The structure's
    straight-through gradient has no finite difference on the grid: the test above ties it
    to the composed masks, whose gradient test_gaudi.py checks against the reference.)"""
    from gblr.ops.gaudi import _MaskFactorsTorch

    torch.manual_seed(2)
    k, r, rows, cols = 3, 1, 9, 6
    u = torch.randn(k, r, rows, dtype=torch.float64, requires_grad=True)
    v = torch.randn(k, r, cols, dtype=torch.float64, requires_grad=True)
    widths = torch.tensor([[2, 3, 6], [4, 9, 1]], dtype=torch.float64) / torch.tensor(
        [[cols], [rows]], dtype=torch.float64
    )
    locations = torch.tensor([[1, 4, 0], [7, 0, 3]], dtype=torch.float64) / torch.tensor(
        [[cols], [rows]], dtype=torch.float64
    )

    def factors_only(u, v):
        return _MaskFactorsTorch.apply(u, v, widths, locations, 1.5, torch.float64, True)

    assert torch.autograd.gradcheck(factors_only, (u, v))


@pytest.mark.parametrize("side", [0, 1])
def test_one_side_masked_alone_is_that_side_of_both(side):
    """A factor given as ``None`` (the strip form computes that side itself): the other
    side's output and gradients are those of masking both, to the last bit, and the
    missing side's widths and locations get zeros."""
    from gblr.ops.gaudi import _mask_dtype, _MaskFactorsTorch

    torch.manual_seed(3)
    k, rows, cols = 5, 10, 8
    inputs = (
        torch.randn(k, 2, rows),
        torch.randn(k, 2, cols),
        torch.rand(2, k, dtype=torch.float64) * 0.9 + 0.05,
        torch.rand(2, k, dtype=torch.float64),
    )
    weights = (torch.randn(k, 2, rows), torch.randn(k, 2, cols))
    results = []
    for alone in (False, True):
        leaves = [value.clone().requires_grad_(True) for value in inputs]
        kept = 1 if side == 0 else 0  # side 0 (columns) masks V, side 1 (rows) U
        factors = list(leaves[:2])
        if alone:
            factors[1 - kept] = None
        outputs = _MaskFactorsTorch.apply(
            *factors, leaves[2], leaves[3], None, _mask_dtype(torch.float64), True
        )
        assert alone is (outputs[1 - kept] is None)
        (outputs[kept] * weights[kept]).sum().backward()
        results.append((outputs[kept], leaves[kept].grad, leaves[2].grad, leaves[3].grad))
    (out, grad, widths, locations), (out_alone, grad_alone, widths_alone, locations_alone) = results
    assert torch.equal(out_alone, out) and torch.equal(grad_alone, grad)
    assert torch.equal(widths_alone[side], widths[side])
    assert torch.equal(locations_alone[side], locations[side])
    assert bool(widths[side].abs().sum() > 0) and bool(locations[side].abs().sum() > 0)
    assert not widths_alone[1 - side].any() and not locations_alone[1 - side].any()
