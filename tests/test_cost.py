import pytest
import torch
from torch import nn

import gblr
from gblr.cost import gblr_cost


def test_gblr_cost_counts_only_live_components():
    rows = torch.tensor([3, 0, 5, 2])
    cols = torch.tensor([4, 7, 0, 1])
    assert gblr_cost(rows, cols, 1) == (3 + 4) + (2 + 1)
    assert gblr_cost(rows, cols, 3) == 3 * 10


def make_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        gblr.GBLRConv2d(4, 6, 3, padding=1, structure_init="half", init_cost=0.4),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 10),
        gblr.GBLRLinear(10, 7, structure_init="random"),
    )


def test_report_per_row_numbers():
    model = make_model()
    report = gblr.count_flops(model)
    assert [layer.name for layer in report] == ["0", "1", "3", "4"]
    assert report["0"].macs == report["0"].dense_macs == 4 * 27
    assert report["1"].macs == model[1].flops() and report["1"].dense_macs == 6 * 36
    assert report["1"].live_components == model[1].live_components()
    assert report["1"].unit == "position" and report["4"].unit == "row"
    assert report["4"].shape == (7, 10)
    assert report.macs == sum(layer.macs for layer in report)
    assert report.ratio == pytest.approx(report.macs / report.dense_macs)
    assert report["3"].live_components is None


def test_report_with_example_input_multiplies_by_rows_and_positions():
    model = make_model()
    x = torch.randn(2, 3, 5, 5)
    report = gblr.count_flops(model, x)
    assert report["0"].rows == 2 * 25
    assert report["3"].rows == 2
    assert report["0"].total_macs == 2 * 25 * 4 * 27
    assert report["1"].total_macs == 2 * 25 * model[1].flops()
    assert report.macs == sum(layer.total_macs for layer in report)
    # Hooks are removed afterwards.
    assert all(not m._forward_hooks for m in model.modules())


def test_sequence_input_counts_every_row():
    layer = gblr.GBLRLinear(8, 8)
    report = gblr.count_flops(nn.Sequential(layer), torch.randn(3, 5, 8))
    assert report.layers[0].rows == 15
    assert report.macs == 15 * layer.flops()


def test_hugging_face_conv1d_counts_as_a_dense_linear_layer():
    """GPT-2's ``Conv1D`` stores its weight (in, out): counted as an (out, in) layer, its
    MACs checked against the FLOPs torch's own counter sees in the same forward pass."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pytorch_utils.Conv1D(12, 5), nn.Linear(12, 3))
    x = torch.randn(2, 4, 5)
    report = gblr.count_flops(model, x)
    assert [layer.name for layer in report] == ["0", "1"]
    assert report["0"].shape == (12, 5) and report["0"].kind == "Conv1D"
    assert report["0"].rows == 8 and report["0"].macs == 60
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model[0](x)
    assert report["0"].total_macs == counter.get_total_flops() // 2  # 2 FLOPs per MAC


def test_include_exclude_globs():
    model = make_model()
    assert [l.name for l in gblr.count_flops(model, include=["1", "4"])] == ["1", "4"]
    assert [l.name for l in gblr.count_flops(model, exclude="0")] == ["1", "3", "4"]


def test_structured_layer_children_are_not_counted_twice():
    class Wrapper(nn.Module):
        matrix_shape = (4, 4)

        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def flops(self):
            return 5

        def dense_flops(self):
            return 16

    report = gblr.count_flops(nn.Sequential(Wrapper()))
    assert [(l.name, l.macs) for l in report] == [("0", 5)]


def test_table_lists_layers_and_totals():
    text = str(gblr.count_flops(make_model()))
    assert "GBLRConv2d" in text and "Linear" in text and "total" in text
    assert "fvcore" in text
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + 4 + 1 + 1 + 1


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        gblr.count_flops("not a model")


def test_fraction_budget_macs_takes_a_fraction_or_a_count_and_names_the_other():
    from gblr.cost import fraction_budget_macs

    assert fraction_budget_macs(0.25, None, 1000) == 250
    assert fraction_budget_macs(1, None, 1000) == fraction_budget_macs(1.0, None, 1000) == 1000
    assert fraction_budget_macs(None, 300, 1000) == 300
    assert fraction_budget_macs(None, 3000, 1000) == 3000  # a count may exceed dense
    with pytest.raises(ValueError, match=r"got the int 300; for a count of 300 MACs pass n=300"):
        fraction_budget_macs(300, None, 1000, fraction_name="f", macs_name="n")
    with pytest.raises(ValueError, match=r"f must be a fraction in \(0, 1\] .*got the int 0$"):
        fraction_budget_macs(0, None, 1000, fraction_name="f")
    for bad in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"target must be a fraction in \(0, 1\]"):
            fraction_budget_macs(bad, None, 1000)
    for bad, name in ((True, "target"), ("0.5", "target")):
        with pytest.raises(TypeError, match=name):
            fraction_budget_macs(bad, None, 1000)
    with pytest.raises(TypeError, match="target_macs must be an int"):
        fraction_budget_macs(None, 3.0, 1000)
    with pytest.raises(ValueError, match="target_macs must be an int >= 1"):
        fraction_budget_macs(None, 0, 1000)
    with pytest.raises(ValueError, match="exactly one of target"):
        fraction_budget_macs(None, None, 1000)


def test_a_budget_below_the_minimum_names_the_smallest_fraction_that_works():
    import math

    from gblr.cost import fraction_budget_macs, smallest_fraction

    with pytest.raises(ValueError, match=r"allows 1 of the 7 dense MACs, below the minimum of 2"):
        fraction_budget_macs(0.2, None, 7, minimum=2)
    with pytest.raises(ValueError, match=r"target must be at least 0\.2858 \(or target_macs"):
        fraction_budget_macs(0.2, None, 7, minimum=2, minimum_reason="one component")
    assert fraction_budget_macs(0.2858, None, 7, minimum=2) == 2
    with pytest.raises(ValueError, match=r"no fraction of the 1 dense MACs pays .*target_macs"):
        fraction_budget_macs(1, None, 1, minimum=2)
    # The printed minimum always works and is within 0.1% of the exact one (rounded up).
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        dense = int(torch.randint(1, 10**9, (1,), generator=generator))
        macs = int(torch.randint(1, dense + 1, (1,), generator=generator))
        text = smallest_fraction(macs, dense)
        assert math.floor(float(text) * dense) >= macs and float(text) <= 1
        assert float(text) <= macs / dense * (1 + 1e-3)
    assert smallest_fraction(2, 64) == "0.03125" and smallest_fraction(3, 2) is None


def test_inputs_the_model_fails_on_are_a_value_error_naming_the_argument():
    """convert's calibration and example_input, and count_flops' example_input, failed
    with torch's bare "mat1 and mat2 shapes cannot be multiplied"."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    wrong = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"^example_input: the model failed on it"):
        gblr.count_flops(model, wrong)
    with pytest.raises(ValueError, match=r"^example_input: the model failed on it"):
        gblr.convert(model, gblr.GBLRConfig(budget=0.5), example_input=wrong)
    with pytest.raises(ValueError, match=r"^calibration batch 1: the model failed on it"):
        gblr.convert(model, gblr.GBLRConfig(budget=0.5), calibration=[torch.randn(4, 64), wrong])
    with pytest.raises(ValueError, match=r"unexpected keyword argument 'input_ids'"):
        gblr.convert(
            model, gblr.GBLRConfig(budget=0.5), calibration=[{"input_ids": torch.randn(4, 64)}]
        )
    assert type(model[0]) is torch.nn.Linear  # unchanged
