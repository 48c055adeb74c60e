"""LearnerConfig: checks, JSON round trip, presets, the deprecated keywords (same run, bit
for bit) and the config saved in the learner's state."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch

import gblr
from gblr.learn.synthetic import planted_blocks, regression_steps

PLANTED_KEYWORDS = {
    "adaptive": 1.0, "max_shift": 1.0, "max_shift_ramp": 4.0, "merge": 1e-3,
    "untangle": 1e-4, "refine": 1e-6, "merge_every": 20,
}  # fmt: skip


# ---------------------------------------------------------------- the config
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: gblr.LearnerConfig(sigma=(0.0, 10.0)), ValueError, "sigma"),
        (lambda: gblr.LearnerConfig(sigma="big"), ValueError, "sigma"),
        (lambda: gblr.LearnerConfig(sigma=(1.0, math.inf)), ValueError, "finite ends"),
        (lambda: gblr.LearnerConfig(sigma_schedule="cosine"), ValueError, "sigma_schedule"),
        (lambda: gblr.LearnerConfig(ramp="cubic"), ValueError, "ramp"),
        (lambda: gblr.LearnerConfig(pass_every=0), ValueError, "pass_every"),
        (lambda: gblr.LearnerConfig(pass_every=2.0), TypeError, "pass_every"),
        (lambda: gblr.LearnerConfig(merge=1e-3), TypeError, r"merge must be a gblr.MergeConfig"),
        (lambda: gblr.LearnerConfig(adaptive=1.0), TypeError, "adaptive must be"),
        (lambda: gblr.LearnerConfig(revive=1), TypeError, r"revive must be True or False, got 1"),
        (lambda: gblr.LearnerConfig(cut_exponent=True), TypeError, r"cut_exponent must be"),
        (lambda: gblr.LearnerConfig(cut_exponent="0.5"), TypeError, r"cut_exponent must be"),
        (lambda: gblr.LearnerConfig(cut_exponent=-0.1), ValueError, r"cut_exponent .*got -0.1"),
        (lambda: gblr.LearnerConfig(cut_exponent=1.5), ValueError, r"in \[0, 1\]"),
        (lambda: gblr.LearnerConfig(cut_exponent=math.nan), ValueError, r"cut_exponent"),
        (lambda: gblr.LearnerConfig(fill_budget=1), TypeError, r"fill_budget must be True or"),
        (lambda: gblr.AdaptiveConfig(0.0), ValueError, r"exponent .*adaptive=None"),
        (lambda: gblr.AdaptiveConfig("yes"), TypeError, "AdaptiveConfig.exponent"),
        (lambda: gblr.ShiftLimitConfig(cells=0), ValueError, "ShiftLimitConfig.cells"),
        (lambda: gblr.ShiftLimitConfig(cells=True), TypeError, "ShiftLimitConfig.cells"),
        (lambda: gblr.ShiftLimitConfig(1.0, -1.0), ValueError, "cells_during_ramp"),
        (lambda: gblr.ShiftLimitConfig(None, None), ValueError, "shift_limit=None"),
        (lambda: gblr.MergeConfig(1.0), ValueError, r"MergeConfig.tolerance must be in \[0, 1\)"),
        (lambda: gblr.UntangleConfig(-1e-3), ValueError, "UntangleConfig.tolerance"),
        (lambda: gblr.RefineConfig("x"), TypeError, "RefineConfig.floor"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_every_pass_config_has_its_pass_in_the_learner():
    from gblr.learn.learner import PASSES

    assert sorted(cls.name for cls in PASSES) == sorted(gblr.LearnerConfig.PASS_CONFIGS)


def test_presets():
    # The default differs from the paper's method in six fields (exact masks, a final
    # phase, removed components kept off, the scaled cut, the filled budget, held strips).
    assert gblr.LearnerConfig.paper().differences(gblr.LearnerConfig()) == [
        "sigma: (1.0, 100.0) != None",
        "exact_from: None != 0.95",
        "revive: True != False",
        "cut_exponent: 0.0 != 0.5",
        "fill_budget: False != True",
        "hold_narrow_sides: 0 != 1",
    ]
    assert gblr.LearnerConfig().sigma is None
    assert gblr.LearnerConfig().hold_narrow_sides == 1
    annealed = dataclasses.replace(gblr.LearnerConfig(), sigma=(1.0, 100.0), hold_narrow_sides=0)
    assert gblr.LearnerConfig.annealed() == annealed
    assert gblr.LearnerConfig().exact_from == 0.95
    assert gblr.LearnerConfig().revive is False
    assert gblr.LearnerConfig().cut_exponent == 0.5
    assert gblr.LearnerConfig().fill_budget is True
    finetune = gblr.LearnerConfig(
        sigma=None, exact_from=None, cut_exponent=0.0, fill_budget=False, hold_narrow_sides=0
    )
    assert gblr.LearnerConfig.finetune() == finetune
    assert gblr.LearnerConfig.from_dict(gblr.LearnerConfig().to_dict()) == gblr.LearnerConfig()
    planted = gblr.LearnerConfig.planted()
    assert planted.adaptive == gblr.AdaptiveConfig(1.0)
    assert planted.shift_limit == gblr.ShiftLimitConfig(cells=1.0, cells_during_ramp=4.0)
    assert (planted.merge.tolerance, planted.untangle.tolerance) == (1e-3, 1e-4)
    assert (planted.refine.floor, planted.pass_every) == (1e-6, 20)
    assert planted.revive is True and planted.cut_exponent == 0.0
    assert planted.fill_budget is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        planted.pass_every = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    "config",
    [
        gblr.LearnerConfig(),
        gblr.LearnerConfig.finetune(),
        gblr.LearnerConfig.planted(),
        gblr.LearnerConfig(sigma=math.inf, ramp="linear"),
        gblr.LearnerConfig(sigma=5, shift_limit=gblr.ShiftLimitConfig(None, 2)),
    ],
)
def test_to_dict_is_json_and_round_trips(config):
    data = config.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert gblr.LearnerConfig.from_dict(data) == config


def test_numbers_are_kept_as_floats_and_pairs_as_tuples():
    config = gblr.LearnerConfig(sigma=[1, 100], shift_limit=gblr.ShiftLimitConfig(2))
    assert config.sigma == (1.0, 100.0) and isinstance(config.shift_limit.cells, float)
    assert config == gblr.LearnerConfig(sigma=(1.0, 100.0), shift_limit=gblr.ShiftLimitConfig(2.0))


def test_unknown_keys_are_refused_listing_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['merge_every'\] .*'pass_every'"):
        gblr.LearnerConfig.from_dict({"merge_every": 20})
    with pytest.raises(ValueError, match=r"\['tol'\] for MergeConfig; allowed: \['tolerance'\]"):
        gblr.LearnerConfig.from_dict({"merge": {"tol": 1e-3}})
    with pytest.raises(TypeError, match="mapping"):
        gblr.LearnerConfig.from_dict([("sigma", None)])


# ---------------------------------------------------------------- the deprecated keywords
def _planted_run(steps=70, **learner_arguments):
    """``steps`` optimizer and learner steps of a 32 x 32 layer onto planted blocks; the
    passes run from step 21 on (merge and untangle at 40 and 60, refine at 30, 50, 70)."""
    target, _ = planted_blocks(32, seed=3, block_sides=(4, 12))
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(32, 32, bias=False, structure_init="random", factor_init="uniform")
    optimizer = torch.optim.Adam(gblr.param_groups(layer, lr=1e-2))
    learner = gblr.StructureLearner(layer, total_steps=100, warmup_steps=20, **learner_arguments)
    regression_steps(layer, target, optimizer, learner, steps)
    return layer, learner


@pytest.mark.parametrize(
    ("config", "keywords"),
    [
        (gblr.LearnerConfig(), {}),  # no learner keyword: the default config
        (gblr.LearnerConfig.planted(), PLANTED_KEYWORDS),
        (  # the keywords describe runs without the final phase
            gblr.LearnerConfig(
                sigma=(2.0, 50.0),
                sigma_schedule="linear",
                ramp="linear",
                exact_from=None,
                revive=True,
                cut_exponent=0.0,
                fill_budget=False,
                hold_narrow_sides=0,
            ),
            {"sigma": (2.0, 50.0), "sigma_schedule": "linear", "ramp": "linear"},
        ),
    ],
    ids=["default", "planted", "linear"],
)
def test_config_and_deprecated_keywords_give_bit_identical_runs(config, keywords):
    planted = planted_blocks(32, seed=3, block_sides=(4, 12))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config form warns about nothing
        new_layer, new = _planted_run(config=config, budget_macs=int(1.2 * planted))
    with pytest.warns(FutureWarning, match=r"\) is deprecated since gblr 0.2"):
        old_layer, old = _planted_run(target_macs=int(1.2 * planted), **keywords)
    assert old.config == config
    for name, tensor in new_layer.state_dict().items():
        assert torch.equal(tensor, old_layer.state_dict()[name]), name
    assert new.summary() == old.summary()
    if config.refine is not None:  # the passes ran: the comparison covers them
        assert new.summary()["refines"] > 0 and new.summary()["merges"] > 0


def test_deprecated_keywords_warn_with_their_replacement():
    layer = gblr.GBLRLinear(8, 8)
    with pytest.warns(FutureWarning) as caught:
        learner = gblr.StructureLearner(
            layer, target=0.5, total_steps=10, merge=1e-3, max_shift=1.0, merge_every=5
        )
    messages = [str(w.message) for w in caught]
    assert any(
        "StructureLearner(merge=..., max_shift=..., merge_every=...) is deprecated" in m
        and "use config=LearnerConfig(merge=MergeConfig(tolerance=...), pass_every=..., "
        "shift_limit=ShiftLimitConfig(cells=...))"
        in m
        for m in messages
    ), messages
    assert any("StructureLearner(target=...) is deprecated" in m and "use budget=" in m
               for m in messages)  # fmt: skip
    assert learner.config == gblr.LearnerConfig(
        merge=gblr.MergeConfig(1e-3),
        shift_limit=gblr.ShiftLimitConfig(1.0),
        pass_every=5,
        exact_from=None,  # the old keywords' runs had no final phase
        revive=True,  # and let removed components come back
        cut_exponent=0.0,  # and cut every width alike
        fill_budget=False,  # and left what the loss freed of the budget unspent
        sigma=(1.0, 100.0),  # and annealed σ
        hold_narrow_sides=0,  # and held nothing
    )


@pytest.mark.parametrize(
    ("keywords", "error", "match"),
    [
        ({"target": 0.0}, ValueError, "target must be a fraction"),
        ({"target": 500}, ValueError, "target must be .* pass budget_macs=500"),
        ({"target": 0.3, "lam": 0.1}, ValueError, "exactly one of target"),
        ({"target": 0.3, "budget": 0.3}, ValueError, "budget or its deprecated alias target"),
        ({"target": 0.3, "sigma": (0.0, 10.0)}, ValueError, "sigma"),
        ({"target": 0.3, "sigma_schedule": "cosine"}, ValueError, "sigma_schedule"),
        ({"target": 0.3, "ramp": "cubic"}, ValueError, "ramp"),
        ({"target": 0.3, "adaptive": -1.0}, ValueError, "adaptive"),
        ({"target": 0.3, "adaptive": "yes"}, TypeError, "adaptive"),
        ({"target": 0.3, "max_shift": 0}, ValueError, "max_shift"),
        ({"target": 0.3, "max_shift": True}, ValueError, "max_shift"),
        ({"target": 0.3, "max_shift_ramp": -1.0}, ValueError, "max_shift_ramp"),
        ({"target": 0.3, "merge_every": 0}, ValueError, "merge_every"),
        (
            {"budget": 0.3, "config": gblr.LearnerConfig(), "merge": 1e-3},
            ValueError,
            r"either config= or the deprecated StructureLearner keywords \['merge'\]",
        ),
    ],
)
def test_deprecated_keywords_are_checked_under_their_names(keywords, error, match):
    model = torch.nn.Sequential(gblr.GBLRLinear(8, 8))
    with pytest.raises(error, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gblr.StructureLearner(model, total_steps=10, **keywords)


# ---------------------------------------------------------------- the saved config
def test_state_holds_the_config_and_refuses_another():
    config = dataclasses.replace(gblr.LearnerConfig.planted(), pass_every=10)
    layer, learner = _planted_run(steps=35, config=config, budget=0.2)
    state = learner.state_dict()
    assert state["config"] == config.to_dict()
    assert list(state["passes"]) == ["shift_limit", "adaptive", "merge", "untangle", "refine"]
    other = dataclasses.replace(config, pass_every=20, merge=gblr.MergeConfig(1e-2))
    resumed = gblr.StructureLearner(layer, other, budget=0.2, total_steps=100, warmup_steps=20)
    with pytest.raises(ValueError, match=r"merge.tolerance: 0.01 != 0.001; pass_every: 20 != 10"):
        resumed.load_state_dict(state)


def _flat(state):
    """A state in the form saved before the passes were split out: the passes' keys at
    the top level, no config."""
    flat = {key: value for key, value in state.items() if key not in ("config", "passes")}
    for pass_state in state["passes"].values():
        flat.update(pass_state)
    return flat


def test_a_flat_state_without_config_resumes_bit_for_bit():
    config = gblr.LearnerConfig.planted()
    target, planted = planted_blocks(32, seed=3, block_sides=(4, 12))

    def setup():
        torch.manual_seed(0)
        layer = gblr.GBLRLinear(32, 32, bias=False, structure_init="random")
        optimizer = torch.optim.Adam(gblr.param_groups(layer, lr=1e-2))
        learner = gblr.StructureLearner(
            layer, config, budget_macs=int(1.2 * planted), total_steps=100, warmup_steps=20
        )
        return layer, optimizer, learner

    layer, optimizer, learner = setup()
    regression_steps(layer, target, optimizer, learner, 49)  # the step before a refine pass
    saved = copy.deepcopy((layer.state_dict(), optimizer.state_dict(), learner.state_dict()))
    regression_steps(layer, target, optimizer, learner, 21)
    for state in (saved[2], _flat(saved[2])):
        resumed_layer, resumed_optimizer, resumed = setup()
        resumed_layer.load_state_dict(saved[0])
        # Adam's state tensors are taken over, not copied, and stepped in place.
        resumed_optimizer.load_state_dict(copy.deepcopy(saved[1]))
        resumed.load_state_dict(copy.deepcopy(state))
        regression_steps(resumed_layer, target, resumed_optimizer, resumed, 21)
        assert torch.equal(resumed_layer.U, layer.U) and torch.equal(resumed_layer.V, layer.V)
        assert torch.equal(resumed_layer.widths, layer.widths)
        assert resumed.summary() == learner.summary()


def test_a_sigma_beyond_the_float32_buffer_is_refused():
    # accepted with numpy's "overflow encountered in cast", and held as inf
    with pytest.raises(ValueError, match=r"overflows the layers' float32 sigma buffer"):
        gblr.LearnerConfig(sigma=1e39)
    with pytest.raises(ValueError, match=r"overflows"):
        gblr.LearnerConfig(sigma=(1.0, 1e39))
    assert gblr.LearnerConfig(sigma=math.inf).sigma == math.inf
