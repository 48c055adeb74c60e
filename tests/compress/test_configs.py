"""One config per structure (issue 21, point 1): checked when made, frozen, plain JSON
data with the structure's name inside, one registry that knows every config class."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import gblr
from gblr.compress import (
    ConversionConfig,
    FamilyConfig,
    GBLRConfig,
    LowRankConfig,
    MonarchConfig,
    config_class,
    config_from_dict,
    structures,
)
from gblr.compress.configs import FAMILY_CONFIGS


def mlp():
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))


def test_every_structure_has_its_config_class():
    assert FAMILY_CONFIGS.keys() == gblr.structured.FAMILIES.keys()
    for name in structures():
        cls = config_class(name)
        assert cls.structure == name and cls().structure == name
        assert cls().to_dict()["structure"] == name
    assert config_class("gblr") is GBLRConfig and config_class("dense") is ConversionConfig
    for name, cls in FAMILY_CONFIGS.items():
        assert issubclass(cls, FamilyConfig) and config_class(name) is cls
        assert getattr(gblr, cls.__name__) is cls  # exported at the top level


def test_defaults_are_convert_defaults():
    config = GBLRConfig()
    assert (config.budget, config.include, config.exclude, config.allocation) == (
        0.3,
        None,
        None,
        "global",
    )
    assert (config.min_features, config.seed, config.init) == (16, 0, "svd")
    assert (config.rank_per_component, config.search_steps) == (1, 200)
    family = LowRankConfig()
    assert (family.init, family.rank_per_component) == ("project", 1)
    assert not hasattr(family, "search_steps")  # only what the family uses


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    [
        (GBLRConfig, {"budget": 0.0}, ValueError, r"budget must be a fraction in \(0, 1\]"),
        (GBLRConfig, {"budget": 1.5}, ValueError, "got 1.5"),
        (GBLRConfig, {"budget": float("nan")}, ValueError, "budget"),
        (GBLRConfig, {"budget": True}, TypeError, "budget must be a float fraction"),
        (GBLRConfig, {"budget": "0.3"}, TypeError, "budget must be a float fraction"),
        (GBLRConfig, {"init": "zeros"}, ValueError, r"init must be one of \['svd', 'search'"),
        (GBLRConfig, {"init": None}, TypeError, "init must be a str"),
        (GBLRConfig, {"init": "project"}, ValueError, "init must be one of"),
        (
            LowRankConfig,
            {"init": "svd"},
            ValueError,
            r"init must be one of \['project', 'random'\]",
        ),
        (GBLRConfig, {"allocation": "Global"}, ValueError, "allocation must be one of"),
        (GBLRConfig, {"include": 3}, TypeError, "include must be a glob pattern"),
        (GBLRConfig, {"include": []}, ValueError, "include must hold at least one glob pattern"),
        (GBLRConfig, {"exclude": ()}, ValueError, "exclude must hold at least one glob pattern"),
        (GBLRConfig, {"exclude": ["2.*", 3]}, TypeError, "exclude must be a glob pattern"),
        (GBLRConfig, {"min_features": 0}, ValueError, "min_features must be a positive int"),
        (GBLRConfig, {"min_features": 1.5}, TypeError, "min_features must be a positive int"),
        (GBLRConfig, {"seed": "a"}, TypeError, r"seed must be an int, got 'a'"),
        (GBLRConfig, {"seed": 2**70}, ValueError, "seed must be an int in"),
        (GBLRConfig, {"rank_per_component": 0}, ValueError, "rank_per_component must be a"),
        (MonarchConfig, {"rank_per_component": 2.0}, TypeError, "rank_per_component"),
        (
            GBLRConfig,
            {"init": "search", "search_steps": -1},
            ValueError,
            r"search_steps must be an int >= 0.*got -1",
        ),
        (GBLRConfig, {"init": "search", "search_steps": True}, TypeError, "search_steps"),
        (GBLRConfig, {"search_steps": 0}, ValueError, "applies to init='search' only"),
        (LowRankConfig, {"search_steps": 0}, TypeError, "unexpected keyword"),
        (GBLRConfig, {"structure": "lowrank"}, TypeError, "unexpected keyword"),
        (ConversionConfig, {}, TypeError, "structure"),
        (ConversionConfig, {"structure": "gblr"}, ValueError, r"takes a GBLRConfig, not a"),
        (ConversionConfig, {"structure": "nope"}, ValueError, "structure must be one of"),
        (FamilyConfig, {"structure": "lowrank"}, ValueError, "takes a LowRankConfig"),
    ],
)
def test_every_field_is_checked_when_the_config_is_made(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_configs_are_frozen_keyword_only_and_normalized():
    config = GBLRConfig(budget=1, include=["a.*", "b"], exclude="head")
    assert config.budget == 1.0 and isinstance(config.budget, float)
    assert config.include == ("a.*", "b") and config.exclude == "head"
    assert hash(config) == hash(GBLRConfig(budget=1.0, include=("a.*", "b"), exclude="head"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 0.5
    with pytest.raises(TypeError):
        GBLRConfig(0.3)
    with pytest.raises(ValueError, match="budget"):  # replace checks again
        dataclasses.replace(config, budget=2.0)
    assert dataclasses.replace(config, budget=0.5).budget == 0.5


CONFIGS = [
    GBLRConfig(),
    GBLRConfig(
        budget=0.25,
        include=["blocks.*"],
        exclude="blocks.0.*",
        allocation="uniform",
        min_features=4,
        seed=-3,
        init="search",
        rank_per_component=2,
        search_steps=7,
    ),
    LowRankConfig(budget=1, init="random", rank_per_component=3),
    MonarchConfig(include="x"),
    ConversionConfig(structure="dense", budget=0.5),
    *[cls(seed=5) for cls in FAMILY_CONFIGS.values()],
]


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_plain_data_round_trips_through_json(config):
    data = config.to_dict()
    assert data["structure"] == config.structure
    assert list(data) == ["structure"] + [
        f.name for f in dataclasses.fields(config) if f.name != "structure"
    ]
    text = json.dumps(data, allow_nan=False)
    assert config_from_dict(json.loads(text)) == config
    assert type(config).from_dict(json.loads(text)) == config


def test_from_dict_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['steps'\] for GBLRConfig; allowed"):
        config_from_dict({"structure": "gblr", "steps": 3})
    with pytest.raises(ValueError, match=r"allowed: \['structure', 'budget', .*'rank_per_comp"):
        config_from_dict({"structure": "lowrank", "search_steps": 3})
    with pytest.raises(ValueError, match=r"must name its structure .* got the keys \['budget'\]"):
        config_from_dict({"budget": 0.3})
    with pytest.raises(ValueError, match="structure must be one of"):
        config_from_dict({"structure": "nope"})
    with pytest.raises(TypeError, match="data must be a mapping"):
        config_from_dict([("structure", "gblr")])
    with pytest.raises(ValueError, match="data is for structure 'lowrank'"):
        GBLRConfig.from_dict({"structure": "lowrank"})
    with pytest.raises(ValueError, match="budget"):
        config_from_dict({"structure": "gblr", "budget": 3})
    assert GBLRConfig.from_dict({"budget": 0.5}) == GBLRConfig(budget=0.5)
    with pytest.raises(ValueError, match="must name its structure"):
        ConversionConfig.from_dict({"budget": 0.5})
    # the base class reads any structure's data, as from_file does (it refused them)
    lowrank = ConversionConfig.from_dict({"structure": "lowrank", "budget": 0.3})
    assert lowrank == gblr.LowRankConfig(budget=0.3)
    assert ConversionConfig.from_dict({"structure": "dense"}).structure == "dense"
    with pytest.raises(ValueError, match="structure must be one of"):
        ConversionConfig.from_dict({"structure": "nope"})


def test_convert_records_the_config_on_the_model_and_in_the_report():
    model = mlp()
    config = GBLRConfig(budget=0.5, min_features=1, exclude="2")
    report = gblr.convert(model, config)
    assert model.gblr_config is config and report.config is config
    assert (report.structure, report.init, report.budget) == ("gblr", "svd", 0.5)
    assert report.to_dict()["config"] == config.to_dict()
    assert str(report).splitlines()[0] == "GBLRConfig(budget=0.5, exclude='2', min_features=1)"
    json.dumps(report.to_dict())
    # a conversion that changes nothing records nothing
    untouched = mlp()
    gblr.convert(untouched, ConversionConfig(structure="dense"))
    with pytest.warns(UserWarning, match="converted no layer"):
        gblr.convert(untouched, GBLRConfig(min_features=64))
    assert not hasattr(untouched, "gblr_config")


def test_a_family_config_reports_its_init():
    report = gblr.convert(mlp(), MonarchConfig(budget=0.5, min_features=1, init="random"))
    assert report.init == "random" and report.config.rank_per_component == 1
    assert str(report).startswith("MonarchConfig(budget=0.5, min_features=1, init='random')")
    report = gblr.convert(mlp(), ConversionConfig(structure="dense"))
    assert report.init is None and report.to_dict()["config"]["structure"] == "dense"


def test_a_structure_name_is_its_default_config(recwarn):
    report = gblr.convert(mlp(), "lowrank")
    assert report.config == LowRankConfig()
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_a_registered_structure_with_a_config_of_its_own(monkeypatch):
    from gblr.compress import configs

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ScaledConfig(ConversionConfig):
        structure: str = dataclasses.field(default="scaled", init=False)
        scale: float = 1.0

    def fit(weight, macs, config):
        fitted = gblr.structured.LowRankLinear.from_dense(weight, budget_macs=macs)
        with torch.no_grad():
            fitted.U.mul_(config.scale)
        return fitted

    monkeypatch.setitem(configs._STRUCTURES, "scaled", configs._Structure(fit, False))
    with pytest.raises(ValueError, match="takes a ConversionConfig, not a ScaledConfig"):
        ScaledConfig()  # registered with the base class: ScaledConfig is not its config
    gblr.compress.register_structure("scaled", fit, config=ScaledConfig)
    assert config_class("scaled") is ScaledConfig
    config = config_from_dict({"structure": "scaled", "scale": 0.0, "min_features": 1})
    model = mlp()
    report = gblr.convert(model, config)
    assert len(report.layers) == 2 and torch.count_nonzero(model[0].dense_weight()) == 0
    assert model.gblr_config.to_dict()["scale"] == 0.0
