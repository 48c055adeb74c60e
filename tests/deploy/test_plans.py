"""Execution plans agree with dense; the segment partition; the planner's choices."""

import pytest
import torch
from torch import nn

import gblr
from gblr.deploy import PLANS, FrozenGBLRLinear
from gblr.deploy import plans as P


def narrow_layer(in_features=61, out_features=47, k=40, rank=2, seed=0):
    """Many narrow components at random places (plenty of wrap-around) and two full ones."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.stack(
        [torch.randint(0, out_features, (k,), generator=generator), torch.randint(1, 9, (k,))], 1
    )
    cols = torch.stack(
        [torch.randint(0, in_features, (k,), generator=generator), torch.randint(1, 9, (k,))], 1
    )
    rows[:2] = torch.tensor([0, out_features])
    cols[:2] = torch.tensor([0, in_features])
    u = torch.randn(k, rank, out_features, generator=generator)
    v = torch.randn(k, rank, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    layer = gblr.GBLRLinear.from_intervals(u, v, rows, cols, bias=bias).eval()
    return layer, FrozenGBLRLinear.from_gblr(layer)


def rel_error(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("plan", PLANS)
def test_every_plan_equals_dense(plan, rows):
    _, frozen = narrow_layer()
    x = torch.randn(rows, 61)
    dense = x @ frozen.dense_weight().T + frozen.bias
    frozen.plan = plan
    assert rel_error(frozen(x), dense) <= 1e-5


@pytest.mark.parametrize("bucket", [1, 64, 1 << 20])
def test_segment_partition_covers_each_component_once_within_the_unions(bucket):
    _, frozen = narrow_layer(k=60, rank=1, seed=1)
    m, n = frozen.matrix_shape
    partition = P.partition_components(
        frozen.row_intervals, frozen.col_intervals, 1, (m, n), bucket
    )
    members = sorted(c for run in partition.runs for c in run.members)
    assert members == list(range(frozen.num_components))
    for run in partition.runs:
        row_union = {(run.rows[0] + t) % m for t in range(run.rows[1])}
        col_union = {(run.cols[0] + t) % n for t in range(run.cols[1])}
        for c in run.members:
            (rs, rl), (cs, cl) = frozen.row_intervals[c].tolist(), frozen.col_intervals[c].tolist()
            assert {(rs + t) % m for t in range(rl)} <= row_union
            assert {(cs + t) % n for t in range(cl)} <= col_union
    # Identical intervals share a run: the two full components are in the same one.
    assert any({0, 1} <= set(run.members) for run in partition.runs)


def test_segment_and_blocks_with_wrapped_pieces_equal_dense():
    _, frozen = narrow_layer(k=60, rank=2, seed=2)
    m, n = frozen.matrix_shape
    u, v = P.padded_factors(
        frozen.u_packed, frozen.v_packed, frozen.row_intervals, frozen.col_intervals, 2, (m, n)
    )
    # One run per component, over its own intervals: many wrap around.
    runs = tuple(
        P.Run(
            (c,), tuple(frozen.col_intervals[c].tolist()), tuple(frozen.row_intervals[c].tolist())
        )
        for c in range(frozen.num_components)
    )
    assert sum(run.cols[0] + run.cols[1] > n for run in runs) >= 3
    assert sum(run.rows[0] + run.rows[1] > m for run in runs) >= 3
    x = torch.randn(5, n)
    dense = x @ (u @ v).T
    ops = P.segment_ops(u, v, P.Partition(runs, 0.0), 2)
    assert rel_error(P.run_segment(x, ops, None), dense) <= 1e-5
    # The DP's own partition at a bucket where call overhead is negligible.
    partition = P.partition_components(
        frozen.row_intervals, frozen.col_intervals, 2, (m, n), 1 << 30
    )
    assert len(partition.runs) > 1
    ops = P.segment_ops(u, v, partition, 2)
    assert rel_error(P.run_segment(x, ops, None), dense) <= 1e-5
    narrow = u[:, 4:] @ v[4:]  # without the two full components (ranks 0-3)
    blocks = P.block_ops(narrow, 1 << 30, block=4)
    assert len(blocks.blocks) > 1 and blocks.nonempty_tiles < blocks.tiles
    assert rel_error(P.run_blocks(x, blocks, None), x @ narrow.T) <= 1e-5


def test_blocksparse_skips_empty_tiles():
    # Block-diagonal: 4 blocks of 32 x 32, each 32 components of row width 32, column 1.
    k = 128
    rows = torch.tensor([[32 * (c // 32), 32] for c in range(k)])
    cols = torch.tensor([[c, 1] for c in range(k)])
    layer = gblr.GBLRLinear.from_intervals(
        torch.randn(k, 1, 128), torch.randn(k, 1, 128), rows, cols
    )
    frozen = FrozenGBLRLinear.from_gblr(layer.eval())
    ops = frozen._block_ops(4096)
    assert P.block_size((128, 128)) == 32
    assert (ops.tiles, ops.nonempty_tiles, len(ops.blocks)) == (16, 4, 4)
    x = torch.randn(9, 128)
    frozen.plan = "blocksparse"
    assert rel_error(frozen(x), layer(x)) <= 1e-5


def test_default_plan_follows_the_cost():
    full = FrozenGBLRLinear.from_gblr(gblr.GBLRLinear(256, 256).eval())  # ratio 2
    assert full.plan_for(4096) == "dense"
    lowrank = gblr.GBLRLinear(256, 256, num_components=8).eval()  # full intervals, ratio 1/16
    assert FrozenGBLRLinear.from_gblr(lowrank).plan_for(4096) == "lowrank"
    _, narrow = narrow_layer(in_features=512, out_features=512, k=100, rank=1)
    assert narrow.plan_for(4096) == "segment"
    assert P.row_bucket(0) == P.row_bucket(1) == 1
    assert [P.row_bucket(r) for r in (2, 3, 64, 65)] == [2, 4, 64, 128]


def test_planner_prefers_dense_at_full_cost_and_cheaper_plan_at_low_ratio():
    torch.manual_seed(0)
    # Near (here above) full cost: every other plan does at least the dense MACs.
    full = gblr.freeze(nn.Sequential(gblr.GBLRLinear(512, 512, structure_init="full").eval()))
    report = gblr.plan(full, torch.randn(1024, 512), repeats=3)
    assert report["0"].choice == "dense"
    assert "blocksparse" not in report["0"].times_ms  # all tiles occupied: not timed
    # Ratio 0.1 at 4096 rows: a rank-51 product costs a tenth of the dense one.
    cheap = gblr.freeze(
        nn.Sequential(gblr.GBLRLinear(1024, 1024, num_components=51, bias=False).eval())
    )
    assert cheap[0].flops() / cheap[0].dense_flops() <= 0.1
    x = torch.randn(4096, 1024)
    report = gblr.plan(cheap, x, candidates=["lowrank", "segment"], repeats=3)
    row = report["0"]
    assert row.choice in ("lowrank", "segment")
    assert set(row.times_ms) == {"dense", "lowrank", "segment"}
    assert (row.rows, row.bucket, row.device, row.dtype) == (4096, 4096, "cpu", "torch.float32")
    assert cheap[0].plan_cache == {("cpu", "torch.float32", 4096): row.choice}
    assert cheap[0].plan_for(3000) == row.choice
    assert "choice" in str(report) and row.choice in str(report)
    # Operands of the plans not chosen are freed.
    assert "dense" not in cheap[0]._cache()


def test_planner_takes_keyword_arguments_as_a_mapping():
    # a tokenizer's output: the dict went in as the model's first positional argument
    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = gblr.GBLRLinear(32, 32, num_components=4)

        def forward(self, input_ids, scale=1.0):
            return self.layer(input_ids * scale)

    model = gblr.freeze(Keyed().eval())
    report = gblr.plan(model, {"input_ids": torch.randn(8, 32), "scale": 2.0}, repeats=1)
    assert report["layer"].rows == 8


def test_planner_bad_arguments():
    model = gblr.freeze(nn.Sequential(gblr.GBLRLinear(8, 8)))
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"candidates must be plan names .* got 'fast'"):
        gblr.plan(model, x, candidates=["fast"])
    with pytest.raises(TypeError, match="candidates must be a list"):
        gblr.plan(model, x, candidates="dense")
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        gblr.plan(model, x, repeats=0)
    with pytest.raises(ValueError, match="no frozen GBLR layer"):
        gblr.plan(nn.Sequential(nn.Linear(8, 8)), x)
    with pytest.raises(TypeError, match="model must be"):
        gblr.plan(None, x)


def test_plan_lookup_follows_every_edit_of_the_plan_cache():
    # plan_for memoizes its lookups per bucket; an edit of plan_cache must still show.
    _, frozen = narrow_layer(in_features=512, out_features=512, k=100, rank=1)
    default = frozen.plan_for(4096)
    key = ("cpu", "torch.float32", 4096)
    frozen.plan_cache[key] = "lowrank"
    assert frozen.plan_for(3000) == "lowrank" and frozen.plan_for(5000) == default
    frozen.plan_cache[key] = "dense"
    assert frozen.plan_for(4096) == "dense"
    frozen.plan_cache.clear()
    assert frozen.plan_for(4096) == default
    frozen.plan_cache = {key: "blocksparse"}
    assert frozen.plan_for(4096) == "blocksparse"
    frozen.plan = "segment"
    assert frozen.plan_for(4096) == "segment"


def test_plan_refuses_an_empty_batch_before_running_the_model():
    # Issue 20: an empty batch crashed deep inside a plan (range() arg 3 must not be zero).
    layer = gblr.GBLRLinear(16, 16, structure_init="half", init_cost=0.3)
    linear = gblr.freeze(nn.Sequential(layer))
    linear[0].plan = "panels"  # the plan that crashed on zero rows
    with pytest.raises(ValueError, match=r"layer '0' an input of shape \(0, 16\).*at least one"):
        gblr.plan(linear, torch.randn(0, 16))
    assert linear[0].plan_cache == {}
    conv = gblr.freeze(nn.Sequential(gblr.GBLRConv2d(3, 8, 3, padding=1)))
    with pytest.raises(ValueError, match=r"shape \(0, 3, 5, 5\), with no rows"):
        gblr.plan(conv, torch.randn(0, 3, 5, 5))


def test_plan_names_example_input_when_the_model_fails_on_it():
    """``gblr.plan`` called the model through a dispatch of its own: a wrong input was a
    shape error from inside the model, where convert, the learner and the FLOP counters
    name the argument (``gblr.cost.call_model``)."""
    frozen = gblr.freeze(nn.Sequential(gblr.GBLRLinear(16, 8, init_cost=0.3)).eval())
    with pytest.raises(ValueError, match=r"^example_input: the model failed on it"):
        gblr.plan(frozen, torch.randn(3, 5))
    assert frozen[0].plan_cache == {}
    # A mapping is keyword arguments, a tuple positional ones, as everywhere.
    assert len(gblr.plan(frozen, (torch.randn(4, 16),)).layers) == 1
