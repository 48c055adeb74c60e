import contextlib
import copy
import dataclasses
import logging
import math
import statistics

import pytest
import torch
from torch.utils.data import Subset

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")
from gblr.learn.groups import gblr_layers  # noqa: E402
from gblr.recipes.data import digits  # noqa: E402
from gblr.recipes.engine import EngineConfig, topk_hits, train_classifier  # noqa: E402
from gblr.recipes.models import VisionTransformer, structure_model  # noqa: E402
from gblr.recipes.start_probe import (  # noqa: E402
    BLOCKDIAG_START,
    LEARNED_START,
    GBLRStart,
    StartProbe,
    _winner,
    challenger_lead,
    train_classifier_probing_start,
)


def _config(tmp_path, **changes):
    options = dict(
        steps=10, batch_size=8, budget=0.5, logger=None, progress=False, out_dir=tmp_path, seed=3
    )
    return EngineConfig(**{**options, **changes})


def _vit():
    torch.manual_seed(0)
    return VisionTransformer(dim=16, depth=1, heads=2)


def test_challenger_lead_is_the_paired_mean_and_its_standard_error_over_samples():
    generator = torch.Generator().manual_seed(0)
    incumbent = torch.rand(3, 40, generator=generator) < 0.6
    challenger = torch.rand(3, 40, generator=generator) < 0.7
    differences = [
        statistics.mean(challenger[:, i].tolist()) - statistics.mean(incumbent[:, i].tolist())
        for i in range(40)
    ]
    lead, error = challenger_lead(incumbent, challenger)
    assert lead == pytest.approx(statistics.mean(differences), abs=1e-12)
    assert error == pytest.approx(statistics.stdev(differences) / math.sqrt(40), abs=1e-12)


def test_challenger_lead_refuses_tensors_it_cannot_pair():
    with pytest.raises(ValueError, match="same shape"):
        challenger_lead(torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 held-out samples, got 1"):
        challenger_lead(torch.ones(2, 1, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool))


def test_the_largest_lead_beyond_z_standard_errors_wins_else_the_first_start():
    starts = [GBLRStart("a"), GBLRStart("b"), GBLRStart("c")]
    scores = {
        "a": {},
        "b": {"lead": 0.03, "standard_error": 0.01},
        "c": {"lead": 0.05, "standard_error": 0.03},
    }
    assert _winner(starts, scores, z=1.0).name == "c"  # 0.05 > 0.03, the larger lead
    assert _winner(starts, scores, z=2.0).name == "b"  # c is within 2 standard errors
    assert _winner(starts, scores, z=4.0).name == "a"
    assert _winner(starts, scores, z=math.inf).name == "a"
    tied = {"a": {}, "b": {"lead": 0.0, "standard_error": 0.0}, "c": scores["c"]}
    assert _winner(starts, tied, z=-1.0).name == "c"  # no lead is no reason to change


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GBLRStart(""), "GBLRStart.name must be a non-empty string"),
        (lambda: GBLRStart("x", structure_init="diagonal"), "GBLRStart.structure_init"),
        (lambda: GBLRStart("x", factor_init="zeros"), "GBLRStart.factor_init"),
        (lambda: GBLRStart("x", start_cost_ratio=0.5), "start_cost_ratio must be a number >= 1"),
        (lambda: GBLRStart("x", learner={}), "GBLRStart.learner must be a gblr.LearnerConfig"),
        (lambda: GBLRStart("x", structure_lr_factor=-1.0), "structure_lr_factor must be None"),
        (lambda: GBLRStart("x", structure_lr_factor=math.inf), "got inf"),
        (lambda: GBLRStart("x", structure_lr_factor=True), "structure_lr_factor must be None"),
        (lambda: StartProbe(evaluate_at=(0.2, 1.0)), r"fractions in \(0, 1\)"),
        (lambda: StartProbe(evaluate_at=()), "non-empty tuple"),
        (lambda: StartProbe(held_out=0.0), "StartProbe.held_out must be a fraction"),
        (lambda: StartProbe(z=float("nan")), "StartProbe.z must be a number"),
        (lambda: StartProbe(split_seed=1.5), "StartProbe.split_seed must be an int"),
        (lambda: StartProbe(then="resume"), "StartProbe.then must be one of"),
    ],
)
def test_starts_and_probes_refuse_bad_values_naming_them(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_probing_refuses_runs_it_cannot_probe(tmp_path):
    train, test = digits()
    model = _vit()
    with pytest.raises(ValueError, match=r"config\.budget must be set"):
        train_classifier_probing_start(model, train, test, _config(tmp_path, budget=None))
    # 10 steps: the probes score at steps 2, 3 and 4 and keep no checkpoint
    with pytest.raises(ValueError, match=r"config\.stop_after=4 must be None or after"):
        train_classifier_probing_start(model, train, test, _config(tmp_path, stop_after=4))
    with pytest.raises(ValueError, match=r"config\.resume must be None"):
        resumed = _config(tmp_path, resume=tmp_path / "last.ckpt")
        train_classifier_probing_start(model, train, test, resumed)
    with pytest.raises(ValueError, match="evaluation steps"):
        probe = StartProbe(evaluate_at=(0.99,))
        train_classifier_probing_start(model, train, test, _config(tmp_path), probe=probe)
    tiny = Subset(train, range(12))
    with pytest.raises(ValueError, match="fewer than 2 to compare"):
        train_classifier_probing_start(model, tiny, test, _config(tmp_path))
    with pytest.raises(ValueError, match="different names"):
        starts = (BLOCKDIAG_START, GBLRStart("blockdiag", start_cost_ratio=2.0))
        train_classifier_probing_start(model, train, test, _config(tmp_path), starts=starts)
    structured = _vit()
    structure_model(structured, "gblr", 0.5)
    with pytest.raises(ValueError, match="already has GBLR layers"):
        train_classifier_probing_start(structured, train, test, _config(tmp_path))
    assert not gblr_layers(model)  # nothing was changed by the refusals


def _by_hand(dense, start, folder, split_seed, stop_after):
    """``start``'s probe and its continuation done by hand with the engine: ``dense``
    structured as ``start`` says, trained on the training set less the held-out tenth up
    to ``stop_after``, then resumed from there on every training sample. Returns the
    model, its held-out accuracy at ``stop_after`` and the resumed run's result."""
    train, test = digits()
    model = copy.deepcopy(dense)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
    held, kept = order[: round(0.1 * len(train))], order[round(0.1 * len(train)) :]
    structure_model(
        model,
        "gblr",
        min(1.0, 0.5 * start.start_cost_ratio),
        seed=3,
        structure_init=start.structure_init,
        factor_init=start.factor_init,
    )
    config = _config(folder)
    factor = start.structure_lr_factor
    config = dataclasses.replace(
        config,
        learner=start.learner,
        structure_lr=None if factor is None else factor * config.lr,
    )
    stopped = dataclasses.replace(config, stop_after=stop_after, checkpoint_dir=folder)
    train_classifier(model, Subset(train, kept.tolist()), None, stopped)
    hits = topk_hits(model, Subset(train, held.tolist()), ks=(1,))[:, 0]
    resumed = dataclasses.replace(config, resume=folder / "last.ckpt")
    result = train_classifier(model, train, test, resumed)
    return model, float(hits.double().mean()), result


@contextlib.contextmanager
def _lightning_messages():
    """The messages Lightning's fits log meanwhile, as a list (at INFO and above)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _assert_same_model(ours, theirs):
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_kept_start_continues_its_probe_on_the_whole_training_set(tmp_path):
    """With z = inf the first start always wins: the model must be that start's probe
    continued on every training sample."""
    train, test = digits()
    probe = StartProbe(evaluate_at=(0.2, 0.4), z=math.inf, split_seed=5)
    dense = _vit()
    model = copy.deepcopy(dense)
    lines = []
    with _lightning_messages() as messages:
        result = train_classifier_probing_start(
            model, train, test, _config(tmp_path), probe=probe, report=lines.append
        )
    assert result["start"] == "blockdiag" and result["steps"] == 10
    # one line as each probe starts, one for the choice, one as the final run starts
    held = math.ceil(0.1 * len(train))
    assert lines[0] == (
        f"start probe 1 of 2: the blockdiag start, steps 1-4 of 10 on {len(train) - held} "
        f"training samples, scored on {held} held out at steps 2, 4"
    )
    assert lines[1].startswith("start probe 2 of 2: the learned start, steps 1-4 of 10")
    assert lines[2].startswith("start probe: the blockdiag start is kept (held-out lead")
    final = f"the blockdiag start trains on from step 4 to step 10 on all {len(train)} training"
    assert lines[3] == f"{final} samples"
    assert len(lines) == 4
    # the probes' own Lightning messages are dropped, and the restore of their temporary
    # checkpoint; the final run's other messages are not
    assert sum("GPU available" in message for message in messages) == 1
    assert sum("`Trainer.fit` stopped" in message for message in messages) == 1
    assert not any("gblr-start-probe" in message for message in messages)
    assert set(result["probe"]) == {"blockdiag", "learned"}
    assert len(result["probe"]["learned"]["accuracy"]) == 2
    assert result["seconds"] > result["probe_seconds"] > 0

    by_hand, held_out, resumed = _by_hand(dense, BLOCKDIAG_START, tmp_path / "by-hand", 5, 4)
    assert result["probe"]["blockdiag"]["accuracy"][-1] == held_out
    assert result["accuracy"] == resumed["accuracy"]
    _assert_same_model(model, by_hand)


def test_a_kept_start_restarted_is_its_unprobed_run_exactly(tmp_path):
    train, test = digits()
    dense = _vit()
    model = copy.deepcopy(dense)
    probe = StartProbe(z=math.inf, then="restart")
    result = train_classifier_probing_start(model, train, test, _config(tmp_path), probe=probe)
    assert result["start"] == "blockdiag"
    structure_model(dense, "gblr", 0.5, seed=3)
    unprobed = train_classifier(dense, train, test, _config(tmp_path / "unprobed"))
    assert result["accuracy"] == unprobed["accuracy"]
    _assert_same_model(model, dense)


def test_a_challenger_that_leads_is_continued_in_the_model(tmp_path, monkeypatch):
    """The decision itself is `_winner`'s (tested above); here a lead is given, and the
    model must end as the challenger's probe continued, with its own structure and
    learner."""
    import gblr.recipes.start_probe as start_probe

    monkeypatch.setattr(start_probe, "challenger_lead", lambda incumbent, challenger: (0.5, 0.1))
    train, test = digits()
    dense = _vit()
    model = copy.deepcopy(dense)
    result = train_classifier_probing_start(model, train, test, _config(tmp_path))
    assert result["start"] == "learned" and result["probe"]["learned"]["lead"] == 0.5
    by_hand, _, resumed = _by_hand(dense, LEARNED_START, tmp_path / "by-hand", 0, 4)
    assert result["accuracy"] == resumed["accuracy"]
    _assert_same_model(model, by_hand)


@pytest.mark.parametrize("named_rate", [None, 0.02])
def test_each_start_trains_its_structure_at_its_own_rate_unless_the_run_names_one(
    tmp_path, monkeypatch, named_rate
):
    """The learned start was chosen with its structure at 3x the weights' rate, the
    block-diagonal start at the engine's default; a rate the run's config names is every
    start's. Checked in the optimizer each probe and the final run trained with."""
    import gblr.recipes.engine as engine

    rates = []

    class Rates(pl.Callback):
        def on_train_start(self, trainer, module):
            groups = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
            rates.append(groups["structure"] / groups["decay"])

    real = engine.train_classifier

    def recording(model, train, test, config, **kwargs):
        callbacks = [*kwargs.pop("callbacks", ()), Rates()]
        return real(model, train, test, config, callbacks=callbacks, **kwargs)

    import gblr.recipes.start_probe as start_probe

    monkeypatch.setattr(start_probe, "train_classifier", recording)
    monkeypatch.setattr(start_probe, "challenger_lead", lambda incumbent, challenger: (0.5, 0.1))
    train, test = digits()
    config = _config(tmp_path, lr=1e-3, warmup_steps=0, structure_lr=named_rate)
    result = train_classifier_probing_start(_vit(), train, test, config)
    assert result["start"] == "learned"
    expected = [1.0, 3.0, 3.0] if named_rate is None else [20.0, 20.0, 20.0]
    assert rates == pytest.approx(expected)  # blockdiag's probe, learned's, the final run


def test_a_start_put_first_is_kept_at_infinite_z(tmp_path):
    train, test = digits()
    result = train_classifier_probing_start(
        _vit(),
        train,
        test,
        _config(tmp_path),
        starts=(LEARNED_START, BLOCKDIAG_START),
        probe=StartProbe(z=math.inf),
    )
    assert result["start"] == "learned"
    assert "lead" in result["probe"]["blockdiag"] and "lead" not in result["probe"]["learned"]


def test_batch_mix_and_run_info_reach_every_run_and_callbacks_the_final_one(tmp_path):
    """``batch_mix`` and ``run_info`` go to the probes and the final run (whose resume
    checks the probe's checkpoint against ``run_info``); ``callbacks`` and ``before_fit``
    to the final run only."""
    train, test = digits()
    mixed = []

    def batch_mix(inputs, labels):
        mixed.append(len(labels))
        return inputs, labels

    class Ends(pl.Callback):
        ends = 0

        def on_train_end(self, trainer, module):
            Ends.ends += 1
            # the final run's checkpoints also carry the probe's record (for a resume)
            assert module.run_info["config"] == {"name": "probe-test"}
            assert set(module.run_info) == {"config", "probe"}

    started = []
    result = train_classifier_probing_start(
        _vit(),
        train,
        test,
        _config(tmp_path),
        batch_mix=batch_mix,
        run_info={"config": {"name": "probe-test"}},
        callbacks=[Ends()],
        before_fit=lambda: started.append(True),
    )
    # two probes of 4 steps and the continued run's 6: every training batch was mixed
    assert len(mixed) == 4 + 4 + 6 and set(mixed) == {8}
    assert Ends.ends == 1 and started == [True] and result["steps"] == 10


_TINY_RECIPE = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=10"]


def _recipe(out, *overrides):
    """A tiny `digits-vit-gblr` run of 10 steps into ``out`` (the probes score at steps 2,
    3 and 4)."""
    from gblr.recipes.config import load_config

    options = ["trainer.logger=none", "trainer.accelerator=cpu", f"out={out}"]
    return load_config("digits-vit-gblr", [*_TINY_RECIPE, *options, *overrides])


def _probing_recipe(out):
    return _recipe(out, "structure.start=probe")


def _assert_same_weights(first, second):
    """The two run folders' ``model_state.pt`` hold the same tensors, bit for bit."""
    a = torch.load(first / "model_state.pt", weights_only=True)
    b = torch.load(second / "model_state.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name
    return a


@pytest.mark.parametrize("lead", [-0.5, 0.5])
def test_a_recipe_run_saves_the_start_it_chose_and_its_model_loads(tmp_path, monkeypatch, lead):
    """``structure.start=probe`` in a recipe: the run folder's config names the chosen start
    (its structure, factors, starting cost and learner), so the trained model rebuilds
    from it; ``lead`` 0.5 makes the learned start win, -0.5 the block-diagonal one (set:
    which wins on its own depends on the few steps of this tiny run)."""
    import yaml

    import gblr.recipes.start_probe as start_probe
    from gblr.recipes.build import model_from_run
    from gblr.recipes.train import train_from_config

    monkeypatch.setattr(start_probe, "challenger_lead", lambda a, b: (lead, 0.1))
    results = train_from_config(_probing_recipe(tmp_path), progress=False)
    expected = "blockdiag" if lead < 0 else "blocks"
    assert results["start"] == expected and results["steps"] == 10
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["structure"]["start"] == expected
    assert saved["learner"]["hold_narrow_sides"] == (1 if lead < 0 else 0)
    # the learned start trains its structure at 3x the weights' rate, and says so
    lr = saved["optim"]["lr"]
    assert saved["optim"]["structure_lr"] == (None if lead < 0 else pytest.approx(3 * lr))
    model, _, example = model_from_run(tmp_path)
    assert gblr_layers(model) and model(example).shape == (1, 10)
    # resuming with the saved config (as the refusal below says) passes the engine's check
    from gblr.recipes.checkpoints import check_resume
    from gblr.recipes.config import config_to_dict, load_config

    again = config_to_dict(load_config(str(tmp_path / "config.yaml")))
    assert check_resume(tmp_path / "checkpoints" / "last.ckpt", model, again) == 10


def test_a_probing_recipe_refuses_what_it_cannot_do_naming_it(tmp_path):
    from gblr.recipes.build import apply_structure, build_model
    from gblr.recipes.config import load_config
    from gblr.recipes.train import train_from_config

    config = _probing_recipe(tmp_path)
    with pytest.raises(ValueError, match="stop_after=3 must be None or after the probe's last"):
        train_from_config(config, progress=False, stop_after=3)
    with pytest.raises(ValueError, match="has no structure until a run chooses its start"):
        apply_structure(build_model(config, in_chans=1, num_classes=10), config)
    with pytest.raises(ValueError, match=r"on one process, got trainer\.devices=2"):
        load_config("digits-vit-gblr", ["structure.start=probe", "trainer.devices=2"])
    # a run stopped during its probe has no checkpoint yet: resuming it says so
    with pytest.raises(FileNotFoundError, match="writes its first checkpoint after the probe"):
        train_from_config(config, progress=False, resume="last")
    # a checkpoint the user named that is not there: only that (the probe explained
    # nothing and misled)
    with pytest.raises(FileNotFoundError, match=r"none\.ckpt$"):
        train_from_config(config, progress=False, resume=tmp_path / "none.ckpt")
    # nor where there is no run folder at all (`--resume --out` a typo)
    config.out = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no run folder at .*missing to resume"):
        train_from_config(config, progress=False, resume="last")
    assert not (tmp_path / "missing").exists()  # and none is made
    text = ["model.name=hf-causal-lm", "model.source=gpt2", "data.name=text", "data.root=x"]
    with pytest.raises(ValueError, match=r"structure\.start=probe is for image classifiers"):
        load_config("digits-vit-gblr", [*text, "structure.start=probe"])


def test_the_recipes_probe_by_default_where_a_probe_can_run():
    from gblr.recipes.config import load_config
    from gblr.recipes.train import probe_chooses_start

    def probes(*overrides, train_size=1348):
        return probe_chooses_start(load_config("digits-vit-gblr", list(overrides)), train_size)

    assert probes() and probes("structure.start=probe")
    assert not probes("structure.start=blockdiag") and not probes("structure.kind=lowrank")
    assert not probes("trainer.devices=2") and not probes("trainer.num_nodes=2")
    assert not probes("optim.steps=2")  # too short to score a probe before its last step
    assert not probes(train_size=12)  # too few samples to hold out
    text = ["model.name=hf-causal-lm", "model.source=gpt2", "data.name=text", "data.root=x"]
    assert not probes(*text)


@pytest.mark.parametrize("lead", [-0.5, 0.5])
def test_a_default_run_interrupted_after_its_probe_resumes_to_the_same_model(
    tmp_path, monkeypatch, lead
):
    """No ``structure.start``: the probe chooses; a run stopped after it and resumed from
    its folder (with the same config, which names no start) ends with the weights of
    the run that was not stopped, bit for bit, whichever start won."""
    import gblr.recipes.start_probe as start_probe
    from gblr.recipes.train import train_from_config

    monkeypatch.setattr(start_probe, "challenger_lead", lambda a, b: (lead, 0.1))
    whole = train_from_config(_recipe(tmp_path / "whole"), progress=False)
    train_from_config(_recipe(tmp_path / "stopped"), progress=False, stop_after=7)
    resumed = train_from_config(_recipe(tmp_path / "stopped"), progress=False, resume="last")
    assert whole["start"] == resumed["start"] == ("blockdiag" if lead < 0 else "blocks")
    assert resumed["steps"] == 10 and resumed["accuracy"] == whole["accuracy"]
    # the probe's record comes back from the checkpoint (a resumed run lost it)
    assert resumed["probe"] == whole["probe"] and resumed["probe_seconds"] > 0
    weights = _assert_same_weights(tmp_path / "whole", tmp_path / "stopped")
    assert any("widths" in name for name in weights)


def test_a_probing_recipe_smoke_run_probes_on_its_few_samples(tmp_path):
    """A smoke run reads a handful of samples for two steps; the probe must still run
    (a quarter held out, one evaluation) and save the start it chose."""
    import yaml

    from gblr.recipes.smoke import smoke_config
    from gblr.recipes.train import train_from_config

    config, _ = smoke_config(_probing_recipe(tmp_path))
    results = train_from_config(config, progress=False)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["structure"]["start"] == results["start"] in ("blockdiag", "blocks")


def test_a_run_from_before_the_probe_was_the_default_resumes_block_diagonal(tmp_path, monkeypatch):
    """A run folder written before 2026-12-07 names no start (it started block-diagonal
    with no probe): resuming it with the same config continues that run, to the weights
    it would have reached uninterrupted."""
    import gblr.recipes.train as train

    with monkeypatch.context() as old_code:
        old_code.setattr(train, "probe_chooses_start", lambda config, size: False)
        whole = train.train_from_config(_recipe(tmp_path / "whole"), progress=False)
        train.train_from_config(_recipe(tmp_path / "stopped"), progress=False, stop_after=5)
    resumed = train.train_from_config(_recipe(tmp_path / "stopped"), progress=False, resume="last")
    assert "start" not in whole and resumed["steps"] == 10
    _assert_same_weights(tmp_path / "whole", tmp_path / "stopped")


def test_a_run_stopped_before_its_first_own_checkpoint_resumes_from_its_probe(
    tmp_path, monkeypatch
):
    """The final run's checkpoint folder starts with the winner's checkpoint at the end of
    its probe: a run that dies as its final part begins resumes from the probe's end
    (not from its first step) to the weights of the run that did not die."""
    import gblr.recipes.start_probe as start_probe
    from gblr.recipes.checkpoints import check_resume
    from gblr.recipes.train import train_from_config

    whole = train_from_config(_recipe(tmp_path / "whole"), progress=False)
    real_train_classifier = start_probe.train_classifier

    def dies_as_the_final_run_starts(*args, before_fit=None, **kwargs):
        if before_fit is None:  # a probe
            return real_train_classifier(*args, **kwargs)
        before_fit()
        raise RuntimeError("the machine went away")

    with monkeypatch.context() as broken:
        broken.setattr(start_probe, "train_classifier", dies_as_the_final_run_starts)
        with pytest.raises(RuntimeError, match="went away"):
            train_from_config(_recipe(tmp_path / "died"), progress=False)
    checkpoint = tmp_path / "died" / "checkpoints" / "last.ckpt"
    assert check_resume(checkpoint, _vit_like_run(tmp_path / "died")) == 4  # the probe's end
    resumed = train_from_config(_recipe(tmp_path / "died"), progress=False, resume="last")
    assert resumed["start"] == whole["start"] and resumed["accuracy"] == whole["accuracy"]
    _assert_same_weights(tmp_path / "whole", tmp_path / "died")


def _vit_like_run(folder):
    """The model a run folder's config.yaml builds (structured, untrained)."""
    from gblr.recipes.build import build_structured_model
    from gblr.recipes.config import load_config

    return build_structured_model(load_config(str(folder / "config.yaml")), 1, 10)


def test_gblr_train_says_which_start_its_probe_chose(tmp_path, capsys):
    import json

    from gblr.cli import main

    arguments = ["train", "--config", "digits-vit-gblr", *_TINY_RECIPE, "trainer.logger=none"]
    assert main([*arguments, "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())["result"]
    # the probe's scores are kept: each start's held-out accuracy at its three evaluations
    # (10 steps: 2, 3 and 4), the challenger's lead over the first and its standard error
    probe = result["probe"]
    assert set(probe) == {"blockdiag", "blocks"} and len(probe["blockdiag"]["accuracy"]) == 3
    lead, error = probe["blocks"]["lead"], probe["blocks"]["standard_error"]
    expected = "blocks" if lead > error else "blockdiag"  # z = 1
    assert result["start"] == expected
    printed = capsys.readouterr().out
    assert "start probe 1 of 2: the blockdiag start, steps 1-4 of 10" in printed
    assert f"start probe: the {expected} start is kept (held-out lead" in printed
    assert f"GBLR's start, chosen by the start probe: {expected} (held-out lead" in printed
    assert f"blocks {100 * lead:+.1f} ± {100 * error:.1f} points)\n" in printed
    assert (
        main([*arguments, "--out", str(tmp_path / "named"), "--quiet", "structure.start=half"]) == 0
    )
    assert "chosen by the start probe" not in capsys.readouterr().out


def test_a_probed_run_that_would_structure_no_layer_is_refused_before_training(tmp_path):
    """A run without a probe refused a budget at which no layer can be structured; the
    probe converted the layers itself and trained the dense model under GBLR's name."""
    from gblr.recipes.train import train_from_config

    config = _recipe(tmp_path, "structure.start=probe", "structure.budget=1e-9")
    no_layer = pytest.raises(ValueError, match="structures no layer of this model")
    with pytest.warns(UserWarning, match="converted no layer"), no_layer:
        train_from_config(config, progress=False)
    assert not (tmp_path / "results.json").exists()
