"""Every ``structure.*`` key of a config takes effect on the path that builds the model,
or the config is refused naming the key (issue 21: ``exclude`` and
``rank_per_component`` were dropped with ``init: random``)."""

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("yaml")
from gblr.layers import GBLRLinear
from gblr.recipes.config import load_config
from gblr.recipes.train import build_structured_model
from gblr.structured import FAMILIES, StructuredLinear

TINY = ["model.dim=16", "model.depth=2", "model.heads=2", "optim.steps=2"]
LINEARS = ("qkv", "proj", "fc1", "fc2")


# A structure search of every layer takes seconds even without refinement steps: the
# searched builds structure the attention projections only.
SEARCH = ["structure.init=search", "structure.search_steps=0", "structure.include=blocks.*.proj"]


def _build(*overrides: str) -> nn.Module:
    return build_structured_model(load_config("digits-vit-gblr", [*TINY, *overrides]), 1, 10)


def _block_layers(model: nn.Module, block: int) -> list[nn.Module]:
    return [getattr(model.blocks[block], name) for name in LINEARS]


def _is_dense(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear


def _structured_macs(model: nn.Module) -> int:
    return sum(int(m.flops()) for m in model.modules() if isinstance(m, GBLRLinear))


def test_exclude_leaves_the_excluded_layers_dense_for_gblr():
    model = _build("structure.exclude=[blocks.0.*]")
    assert all(_is_dense(layer) for layer in _block_layers(model, 0))
    assert all(isinstance(layer, GBLRLinear) for layer in _block_layers(model, 1))


def test_exclude_leaves_the_excluded_layers_dense_for_a_gblr_search():
    model = _build(*SEARCH, "structure.exclude=[blocks.0.*]")
    assert _is_dense(model.blocks[0].proj) and isinstance(model.blocks[1].proj, GBLRLinear)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_exclude_leaves_the_excluded_layers_dense_for_every_family(kind):
    overrides = [f"structure.kind={kind}", "structure.budget=0.5"]
    model = _build(*overrides, "structure.exclude=blocks.1.fc*")
    assert _is_dense(model.blocks[1].fc1) and _is_dense(model.blocks[1].fc2)
    kept = [model.blocks[1].qkv, model.blocks[1].proj, *_block_layers(model, 0)]
    assert all(isinstance(layer, StructuredLinear) for layer in kept)


@pytest.mark.parametrize(("searched", "count"), [([], 8), (SEARCH, 2)])
def test_rank_per_component_reaches_the_gblr_layers(searched, count):
    model = _build(*searched, "structure.rank_per_component=2")
    layers = [m for m in model.modules() if isinstance(m, GBLRLinear)]
    assert len(layers) == count and {layer.rank_per_component for layer in layers} == {2}
    assert {layer.U.shape[1] for layer in layers} == {2}


def test_start_cost_sets_the_searched_starting_cost():
    # the learner then moves the searched layers from start_cost to the budget
    config = load_config("digits-vit-gblr", [*TINY, *SEARCH, "structure.start_cost=null"])
    at_budget = _structured_macs(build_structured_model(config, 1, 10))
    assert config.structure.budget == 0.3
    wider = _structured_macs(_build(*SEARCH, "structure.start_cost=0.6"))
    assert wider > 1.5 * at_budget


def _full_components(model: nn.Module) -> int:
    full = 0
    for layer in model.modules():
        if isinstance(layer, GBLRLinear):
            col_lengths, row_lengths = layer.interval_lengths()
            full += int(((col_lengths == layer.cols) & (row_lengths == layer.rows)).sum())
    return full


def test_start_sets_how_gblr_layers_start():
    # default "blockdiag": no full component; "blocks": full components next to a
    # block-diagonal; half: the paper's
    assert _full_components(_build()) == 0
    assert _full_components(_build("structure.start=blocks")) > 0
    assert _full_components(_build("structure.start=half", "structure.budget=0.5")) > 0


@pytest.mark.parametrize(
    ("key", "value", "unknown"),
    [("start", "half", "diagonal"), ("factor_init", "fixed_norm", "xavier")],
)
def test_a_from_scratch_gblr_key_is_checked_and_left_to_gblr(key, value, unknown):
    with pytest.raises(ValueError, match=rf"structure\.{key}"):
        _build(f"structure.{key}={unknown}")
    with pytest.raises(ValueError, match=rf"structure\.{key}='{value}' applies only"):
        _build(*SEARCH, f"structure.{key}={value}")
    # a GBLR recipe's key does not stop its baseline comparison (as start_cost)
    lowrank = _build(f"structure.{key}={value}", "structure.kind=lowrank")
    assert all(isinstance(layer, StructuredLinear) for layer in _block_layers(lowrank, 0))


def test_the_configs_gblr_starts_are_the_layers_costed_inits():
    from gblr.layers.base import COSTED_STRUCTURE_INITS, FACTOR_INITS
    from gblr.recipes import config

    assert sorted(config.GBLR_STARTS) == sorted(COSTED_STRUCTURE_INITS)
    assert sorted(config.FACTOR_INITS) == sorted(FACTOR_INITS)


def _input_line_norms(model: nn.Module) -> torch.Tensor:
    """The column norms of every GBLR layer's weight, concatenated."""
    layers = [layer for layer in model.modules() if isinstance(layer, GBLRLinear)]
    return torch.cat([layer.eval().dense_weight().norm(dim=0) for layer in layers])


def test_factor_init_sets_how_gblr_factors_are_drawn():
    local = ["structure.start=blockdiag", "structure.budget=0.2"]
    balanced = _input_line_norms(_build(*local, "structure.factor_init=balanced"))
    fixed = _input_line_norms(_build(*local))  # the default
    # exact norms give the strips' input lines far less spread than a normal draw
    assert (fixed.max() / fixed.min()) * 3 < balanced.max() / balanced.min()


def test_the_learner_section_holds_narrow_sides():
    from gblr.recipes.config import learner_config

    config = load_config("digits-vit-gblr", [*TINY, "learner.hold_narrow_sides=0"])
    assert learner_config(config).hold_narrow_sides == 0
    assert learner_config(load_config("digits-vit-gblr", TINY)).hold_narrow_sides == 1
    with pytest.raises(ValueError, match=r"learner\.hold_narrow_sides"):
        load_config("digits-vit-gblr", [*TINY, "learner.hold_narrow_sides=-1"])


def test_gblr_from_scratch_starts_above_the_budget_by_default():
    # the learner's ramp prunes a start at GBLR_START_RATIO x the budget down to it
    from gblr.recipes.models import GBLR_START_RATIO

    model = _build("structure.budget=0.3")
    dense = sum(m.dense_flops() for m in model.modules() if isinstance(m, GBLRLinear))
    assert _structured_macs(model) / dense == pytest.approx(GBLR_START_RATIO * 0.3, abs=0.01)
    assert _structured_macs(_build("structure.start_cost=0.3")) / dense <= 0.3


def test_start_cost_sets_the_random_starting_cost():
    narrow = _structured_macs(_build("structure.start_cost=0.2"))
    assert _structured_macs(_build("structure.start_cost=0.6")) > 2.5 * narrow


def test_a_family_searched_with_global_allocation_uses_rank_per_component():
    # its allocation hands out MACs in units of rank_per_component
    overrides = ["structure.kind=lowrank", "structure.init=search", "structure.budget=0.5"]
    model = _build(*overrides, "structure.rank_per_component=3")
    ranks = [m.rank for m in model.modules() if type(m).__name__ == "LowRankLinear"]
    assert ranks and all(rank % 3 == 0 for rank in ranks)
    # the other selected layers got their dense MACs: kept dense (issue 22)
    kept = [
        name
        for name, m in model.named_modules()
        if name.startswith("blocks.") and type(m).__name__ == "Linear"
    ]
    assert len(ranks) + len(kept) == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["structure.allocation=global"],
            r"structure.allocation='global' applies only to structure.init: search.*"
            r"init: random",
        ),
        (
            ["structure.search_steps=10"],
            r"structure.search_steps=10 applies only to structure.init: search",
        ),
        (
            ["structure.search_steps=0"],
            r"structure.search_steps=0 applies only to structure.init: search",
        ),
        (
            ["structure.kind=lowrank", "structure.init=search", "structure.search_steps=10"],
            r"structure.search_steps=10 applies only to structure.kind: gblr.*lowrank",
        ),
        (
            ["structure.kind=monarch", "structure.rank_per_component=2"],
            r"structure.rank_per_component=2 applies only to structure.kind: gblr, or to a "
            r"baseline family with init: search and allocation: global.*monarch.*"
            r"structure.rank_per_component=1",
        ),
        (
            [
                "structure.kind=lowrank",
                "structure.init=search",
                "structure.allocation=uniform",
                "structure.rank_per_component=2",
            ],
            r"structure.rank_per_component=2 applies only to.*allocation: uniform",
        ),
        (
            [
                "structure.kind=lowrank",
                "structure.init=search",
                "structure.budget=1.0",
                "structure.rank_per_component=2",
            ],
            r"structure.rank_per_component=2 applies only to.*budget: 1.0",
        ),
    ],
)
def test_keys_that_cannot_apply_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("digits-vit-gblr", [*TINY, *overrides])


@pytest.mark.parametrize(
    "overrides",
    [
        # uniform is what a random start is; no refinement is what a family's search is
        ["structure.allocation=uniform"],
        ["structure.kind=lowrank", "structure.init=search", "structure.search_steps=0"],
        # a GBLR recipe run as a baseline or dense (--structure): its GBLR-only keys stay
        ["structure.kind=lowrank", "structure.start_cost=0.6"],
        ["structure.kind=dense", "structure.rank_per_component=2", "structure.search_steps=5"],
        ["structure.kind=lowrank", "structure.init=search", "structure.rank_per_component=2"],
    ],
)
def test_keys_that_apply_or_mean_what_happens_are_accepted(overrides):
    load_config("digits-vit-gblr", [*TINY, *overrides])


def test_a_gblr_recipe_runs_as_its_baseline_without_its_gblr_only_keys():
    from gblr.recipes.config import with_structure
    from gblr.recipes.sweep import sweep_runs

    # a GBLR recipe of rank-2 components, searched with refinement steps
    searched = ["structure.init=search", "structure.search_steps=50"]
    config = load_config("digits-vit-gblr", [*TINY, *searched, "structure.rank_per_component=2"])
    lowrank = with_structure(config, "lowrank", 0.2)  # checked: would be refused as is
    assert (lowrank.structure.kind, lowrank.structure.budget) == ("lowrank", 0.2)
    assert lowrank.structure.search_steps is None and lowrank.structure.start_cost is None
    assert lowrank.structure.rank_per_component == 2  # the global allocation's unit
    assert config.structure.kind == "gblr" and config.structure.search_steps == 50
    runs = sweep_runs(config, ["gblr", "monarch"], [0.3], Path("sweep"))
    assert [run.structure.search_steps for run in runs] == [50, None]
    # what with_structure guards against: the same change made by hand is refused
    with pytest.raises(ValueError, match=r"structure\.search_steps=50 applies only"):
        load_config("digits-vit-gblr", [*TINY, *searched, "structure.kind=monarch"])


def test_the_reported_macs_ratio_leaves_excluded_layers_out(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from gblr.recipes.train import train_from_config

    options = ["structure.exclude=[blocks.0.*]", "structure.budget=0.3", "optim.warmup=0"]
    options += ["structure.start_cost=0.3"]  # two steps: no time to ramp from above it
    options += ["trainer.logger=none", "trainer.accelerator=cpu", f"out={tmp_path / 'run'}"]
    result = train_from_config(load_config("digits-vit-gblr", [*TINY, *options]), progress=False)
    # only the structured layers (blocks.1) count: they sit at the budget
    assert result["macs_ratio"] == pytest.approx(0.3, abs=0.02)


def test_a_structure_added_with_register_structure_reaches_the_configs(monkeypatch):
    import dataclasses

    from gblr.compress import LowRankConfig, configs, register_structure
    from gblr.recipes.sweep import sweep_runs

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MyLowRankConfig(LowRankConfig):
        structure: str = dataclasses.field(default="mylowrank", init=False)

    # one registry for convert and the configs: a user's structure (here low-rank's fit
    # and options under another name) is a structure.kind, a --structure and a sweep entry
    monkeypatch.setattr(configs, "_STRUCTURES", dict(configs._STRUCTURES))
    fit = configs._STRUCTURES["lowrank"].fit
    register_structure("mylowrank", fit, config=MyLowRankConfig)
    config = load_config("digits-vit-gblr", [*TINY, "structure.kind=mylowrank"])
    model = build_structured_model(config, 1, 10)
    assert type(model.blocks[0].qkv).__name__ == "LowRankLinear"
    assert len(sweep_runs(config, ["mylowrank"], [0.3], Path("sweep"))) == 1
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"structure\.kind must be one of"):
        load_config("digits-vit-gblr", [*TINY, "structure.kind=mylowrank"])


@pytest.mark.parametrize("kind", ["gblr", "lowrank"])
def test_a_structure_that_structures_no_layer_is_refused(kind):
    # the run trained the dense model and reported it under the structure's name (a family
    # on a CNN's convolutions, or an exclude that leaves nothing)
    config = load_config(
        "digits-vit-gblr", [f"structure.kind={kind}", "structure.exclude=blocks.*"]
    )
    with pytest.raises(ValueError, match=rf"structure.kind={kind} structures no layer .*dense"):
        build_structured_model(config, in_chans=1, num_classes=10)
