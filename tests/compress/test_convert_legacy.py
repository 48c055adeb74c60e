"""The options of gblr.convert as arguments (before configs): deprecated, they still work
until 0.3, with a FutureWarning naming the config to pass, and give the same model as that
config, bit for bit."""

import warnings

import pytest
import torch
from torch import nn

import gblr
from gblr import ConversionConfig, GBLRConfig, LowRankConfig
from gblr.compress.configs import _config_text


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(16 * 16, 48), nn.ReLU(), nn.Linear(48, 24))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def model(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


# (old arguments after the model, old keywords, the config they mean)
SAME = [
    ((), {"structure": "gblr"}, GBLRConfig()),
    ((), {"budget": 0.5, "min_features": 1}, GBLRConfig(budget=0.5, min_features=1)),
    (
        (),
        {"budget": 0.4, "init": "search", "steps": 3, "seed": 2, "min_features": 1},
        GBLRConfig(budget=0.4, init="search", search_steps=3, seed=2, min_features=1),
    ),
    (
        (),
        {"init": "random", "rank_per_component": 2, "seed": 5, "allocation": "uniform"},
        GBLRConfig(init="random", rank_per_component=2, seed=5, allocation="uniform"),
    ),
    # steps with init="svd" was ignored: it is dropped
    ((), {"budget": 0.5, "steps": 7}, GBLRConfig(budget=0.5)),
    (("gblr", 0.5, "svd", None, "head.2"), {}, GBLRConfig(budget=0.5, exclude="head.2")),
    (
        ("lowrank",),
        {"budget": 0.4, "init": "search", "steps": 0},
        LowRankConfig(budget=0.4),
    ),
    (
        (),
        {"structure": "monarch", "init": "svd", "rank_per_component": 2},
        gblr.MonarchConfig(rank_per_component=2),
    ),
    (
        (),
        {"structure": "blocksparse", "init": "random", "seed": 5},
        gblr.BlockSparseConfig(init="random", seed=5),
    ),
    (
        (),
        {"structure": "pixelfly", "budget": 0.5, "allocation": "uniform"},
        gblr.PixelflyConfig(budget=0.5, allocation="uniform"),
    ),
    (
        (),
        {"structure": "blockdiag", "budget": 0.5, "include": ["head.*"], "min_features": 8},
        gblr.BlockDiagConfig(budget=0.5, include=["head.*"], min_features=8),
    ),
    ((), {"structure": "dense", "budget": 0.5}, ConversionConfig(structure="dense", budget=0.5)),
]


@pytest.mark.parametrize(
    ("args", "kwargs", "config"), SAME, ids=[_config_text(c) for *_, c in SAME]
)
def test_old_arguments_give_the_same_model_as_their_config(args, kwargs, config):
    old, new = model(), model()
    with pytest.warns(FutureWarning) as record:
        old_report = gblr.convert(old, *args, **kwargs)
    assert "gblr.convert(model, " in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the model's weights are untrained, which convert says of both calls alike
        warnings.filterwarnings("ignore", message=".* look untrained")
        new_report = gblr.convert(new, config)
    assert old_report.config == config and old_report.to_dict() == new_report.to_dict()
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    for key, value in old_state.items():
        assert value.dtype == new_state[key].dtype and torch.equal(value, new_state[key]), key
    assert [type(m) for m in old.modules()] == [type(m) for m in new.modules()]


def test_the_warning_names_the_config_to_pass():
    message = (
        r"deprecated since gblr 0\.2 and will be removed in 0\.3; pass one config: "
        r"gblr\.convert\(model, GBLRConfig\(budget=0\.5, min_features=1, init='search', "
        r"search_steps=3\)\)"
    )
    with pytest.warns(FutureWarning, match=message):
        gblr.convert(model(), budget=0.5, init="search", steps=3, min_features=1)
    with pytest.warns(FutureWarning, match=r"LowRankConfig\(budget=0\.3, init='random'\)"):
        gblr.convert(model(), "lowrank", init="random")


def test_calibrated_old_arguments_give_the_same_model():
    batches = [torch.randn(64, 48)]
    old, new = [nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 24)) for _ in "ab"]
    new.load_state_dict(old.state_dict())
    with pytest.warns(FutureWarning):
        gblr.convert(old, structure="lowrank", budget=0.4, min_features=1, calibration=batches)
    gblr.convert(new, LowRankConfig(budget=0.4, min_features=1), calibration=batches)
    for key, value in old.state_dict().items():
        assert torch.equal(value, new.state_dict()[key]), key


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # steps=-1 used to make fit_dense raise a ValueError that was taken for "budget
        # too small": every layer skipped, nothing raised
        ({"init": "search", "steps": -1}, ValueError, r"steps must be an int >= 0.*got -1"),
        ({"steps": -1}, ValueError, r"steps must be an int >= 0"),  # checked though unused
        ({"steps": 1.5}, TypeError, r"steps .* got 1\.5"),
        ({"structure": 3}, TypeError, r"structure must be a str, one of \['dense', "),
        ({"structure": "gblR"}, ValueError, r"structure must be one of .*'gblR'"),
        ({"init": None}, TypeError, "init must be a str"),
        ({"structure": "dense", "rank_per_component": 0}, ValueError, "rank_per_component"),
        ({"seed": "a"}, TypeError, r"seed must be an int, got 'a'"),
        ({"budget": 1.5}, ValueError, "budget"),
        ({"include": "decoder.*"}, ValueError, "matches no convertible layer"),
    ],
)
def test_old_arguments_are_still_checked(kwargs, error, match):
    net = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(error, match=match):
            gblr.convert(net, **{"min_features": 1, **kwargs})
    assert type(net.head[0]) is nn.Linear


def test_options_a_structure_ignores_are_accepted_and_dropped():
    with pytest.warns(FutureWarning, match=r"LowRankConfig\(budget=0\.5, min_features=1\)"):
        report = gblr.convert(
            model(), structure="lowrank", budget=0.5, steps=3, rank_per_component=1, min_features=1
        )
    assert len(report.layers) == 2


def test_a_config_and_old_arguments_together_are_refused():
    with pytest.raises(ValueError, match=r"not both: got GBLRConfig\(budget=0\.3\) and \['seed'\]"):
        gblr.convert(model(), GBLRConfig(), seed=1)
    with pytest.raises(TypeError, match="at most 2 positional arguments"):
        gblr.convert(model(), "gblr", 0.3, "svd", None, None, "global", 1)
    with pytest.raises(TypeError, match="multiple values for argument 'budget'"):
        gblr.convert(model(), "gblr", 0.3, budget=0.4)
