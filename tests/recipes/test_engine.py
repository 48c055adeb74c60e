import dataclasses
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")
import gblr  # noqa: E402
from gblr.recipes.data import digits  # noqa: E402
from gblr.recipes.engine import EngineConfig, train_classifier  # noqa: E402
from gblr.recipes.models import VisionTransformer, structure_model  # noqa: E402


def gblr_vit():
    torch.manual_seed(0)
    model = VisionTransformer(dim=32, depth=1, heads=2)
    structure_model(model, "gblr", 0.6)
    return model


@pytest.mark.parametrize("every", [50, 8])
def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path, every):
    """``every``: 50 saves the checkpoint when the interrupted run ends; 8 saves it from
    the step's own checkpoint hook at step 16, where the data order's state must already
    count that step's batch."""
    train, test = digits()
    train = Subset(train, range(256))  # 8 steps per pass over the data at batch 32
    config = EngineConfig(steps=24, batch_size=32, warmup_steps=12, budget=0.3, progress=False)

    full = gblr_vit()
    train_classifier(full, train, test, config)

    interrupted = gblr_vit()
    stopped = dataclasses.replace(
        config, checkpoint_dir=tmp_path, stop_after=16, checkpoint_every_n_steps=every
    )
    train_classifier(interrupted, train, test, stopped)
    assert (tmp_path / "last.ckpt").is_file()
    resumed = gblr_vit()
    train_classifier(
        resumed, train, test, dataclasses.replace(config, resume=tmp_path / "last.ckpt")
    )

    expected = full.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    # and the interruption really changed something along the way
    assert not torch.equal(interrupted.blocks[0].fc1.widths, full.blocks[0].fc1.widths)


def test_a_run_with_mixup_cutmix_and_drop_path_resumes_exactly(tmp_path):
    """Each training step draws its random numbers from its own seed: from one global
    stream, what ran before the resume (the checkpoint's save, a start probe) shifted
    every later draw (QA: parameters 0.002-0.006 apart after 12 steps stopped at 6)."""
    pytest.importorskip("torchvision")
    from gblr.recipes.data import batch_mixer

    train, test = digits()
    train = Subset(train, range(128))
    config = EngineConfig(steps=12, batch_size=16, warmup_steps=4, budget=0.3, progress=False)
    mix = batch_mixer(mixup=0.8, cutmix=1.0, num_classes=10)

    def model():
        torch.manual_seed(0)
        vit = VisionTransformer(dim=32, depth=2, heads=2, drop_path=0.3)
        structure_model(vit, "gblr", 0.6)
        return vit

    full = model()
    train_classifier(full, train, test, config, batch_mix=mix)
    stopped = dataclasses.replace(config, checkpoint_dir=tmp_path, stop_after=6)
    train_classifier(model(), train, test, stopped, batch_mix=mix)
    torch.rand(7)  # the global stream moves between the runs, as a probe's runs move it
    resumed = model()
    train_classifier(
        resumed,
        train,
        test,
        dataclasses.replace(config, resume=tmp_path / "last.ckpt"),
        batch_mix=mix,
    )
    expected = full.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    # and the draws are the run's own: another seed trains another model
    other = model()
    train_classifier(other, train, test, dataclasses.replace(config, seed=1), batch_mix=mix)
    assert not torch.equal(other.head.weight, full.head.weight)


class SaveWidths(pl.Callback):
    """Each rank writes its GBLR widths at the end of training, and those it had when the
    learner's final phase (fixed structure) began."""

    def __init__(self, folder, final_phase_from=None):
        self.folder = str(folder)
        self.final_phase_from = final_phase_from

    def _save(self, trainer, pl_module, name):
        widths = {
            name: module.widths.detach().clone()
            for name, module in pl_module.named_modules()
            if hasattr(module, "widths")
        }
        torch.save(widths, f"{self.folder}/{name}_rank{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the engine's learner callback ran before this one: its step of this batch is done
        if trainer.global_step == self.final_phase_from:
            self._save(trainer, pl_module, "final_phase")

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "widths")


def test_two_process_ddp_keeps_the_structure_identical_on_both_ranks(tmp_path):
    """Also through the learner's final phase (the last 5% of the steps, structure fixed):
    it used to stop the widths' gradients, and DDP failed on parameters that got none at
    the forward after the first backward of that phase (30 steps: the phase starts at
    step 28, after which two forwards run)."""
    train, test = digits()
    model = gblr_vit()
    config = EngineConfig(
        steps=30,
        batch_size=16,
        warmup_steps=5,
        budget=0.3,
        progress=False,
        trainer={"strategy": "ddp_spawn", "devices": 2},
    )
    final_phase_from = round(0.95 * config.steps)  # LearnerConfig().exact_from
    saver = SaveWidths(tmp_path, final_phase_from=final_phase_from)
    result = train_classifier(model, Subset(train, range(256)), test, config, callbacks=[saver])
    ranks = [torch.load(tmp_path / f"widths_rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 4
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # the final phase kept the structure it began with, though the widths had gradients
    fixed = torch.load(tmp_path / "final_phase_rank0.pt")
    for name in ranks[0]:
        assert torch.equal(fixed[name], ranks[0][name]), name
    # the learner really ran (the structure moved to the target) in both processes
    assert result["macs_ratio"] <= 0.3


def test_the_learner_config_reaches_the_structure_learner(tmp_path):
    import gblr
    from gblr.integrations.lightning import GBLRCallback

    config = gblr.LearnerConfig(
        sigma=(2.0, 50.0),
        adaptive=gblr.AdaptiveConfig(1.0),
        shift_limit=gblr.ShiftLimitConfig(cells=2.0),
        merge=gblr.MergeConfig(1e-3),
        untangle=gblr.UntangleConfig(1e-4),
        refine=gblr.RefineConfig(1e-6),
        pass_every=20,
    )
    seen = {}

    class Probe(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            (callback,) = [c for c in trainer.callbacks if isinstance(c, GBLRCallback)]
            seen["config"] = callback.learner.config

    train, _ = digits()
    engine = EngineConfig(steps=4, batch_size=16, budget=0.3, progress=False, learner=config)
    train_classifier(gblr_vit(), Subset(train, range(64)), None, engine, callbacks=[Probe()])
    assert seen["config"] is config
    with pytest.raises(TypeError, match=r"\['learner_options'\]: .* learner_config="):
        EngineConfig(steps=1, trainer={"learner_options": {"merge": 1e-3}})
    with pytest.warns(FutureWarning), pytest.raises(TypeError, match=r"\['learner_options'\]"):
        train_classifier(gblr_vit(), train, None, steps=1, learner_options={"merge": 1e-3})


def test_layers_kept_dense_count_in_the_budget_the_learner_holds():
    """A global allocation may keep a structured layer dense: its MACs count in the run's
    budget (the result's ``macs_ratio``) but the learner cannot move them, so they come off
    the learner's budget (else a learner that fills its budget overspends the run's). The
    budget is counted for one forward pass on the example, which the learner gets too."""
    import gblr
    from gblr.recipes.engine import _learner_budget

    mixed = torch.nn.Sequential(torch.nn.Linear(8, 8), gblr.GBLRLinear(8, 16))  # 64 + 128
    example = torch.zeros(3, 8)  # 3 rows through each layer: 192 + 384 MACs
    engine = EngineConfig(steps=1, budget=0.5, structure_include="*")
    kept = _learner_budget(mixed, engine, example)
    assert kept.pop("example_input") is example
    assert kept == {"budget_macs": 288 - 192}
    only_gblr = torch.nn.Sequential(gblr.GBLRLinear(8, 8), gblr.GBLRLinear(8, 16))
    assert _learner_budget(only_gblr, engine, example)["budget"] == 0.5
    # a layer outside the structured ones costs nothing of the budget
    outside = dataclasses.replace(engine, structure_include="1")
    assert _learner_budget(mixed, outside, example)["budget"] == 0.5
    tight = dataclasses.replace(engine, budget=1 / 3)  # 192 of 192 MACs left: none for GBLR
    with pytest.raises(ValueError, match=r"budget=0.33.* \['0'\]\): nothing is left"):
        _learner_budget(mixed, tight, example)


def test_the_budget_and_macs_ratio_are_per_example_on_a_mixer():
    """An MLP-Mixer's token-mixing layers run on ``dim`` rows per image, its channel-mixing
    layers on ``tokens``: the run's budget and ``macs_ratio`` are the structured layers'
    MACs for one image, not per row."""
    import gblr
    from gblr.recipes.models import MlpMixer

    train, test = digits()
    torch.manual_seed(0)
    model = MlpMixer(image_size=8, patch_size=2, in_chans=1, dim=32, depth=1)
    structure_model(model, "gblr", 0.6)
    config = EngineConfig(steps=6, batch_size=16, warmup_steps=3, budget=0.3, progress=False)
    result = train_classifier(model, Subset(train, range(96)), test, config)
    image = train[0][0][None]
    per_image = gblr.count_flops(model, image, include=["blocks.*"])
    assert result["macs_ratio"] == per_image.ratio
    assert 0.25 <= per_image.ratio <= 0.3
    token_layer = per_image["blocks.0.token_mlp.fc1"]
    channel_layer = per_image["blocks.0.channel_mlp.fc1"]
    assert (token_layer.rows, channel_layer.rows) == (32, 16)  # dim 32, 16 patches


def test_the_old_keywords_warn_and_give_the_same_run(tmp_path):
    """``train_classifier(..., steps=..., target=..., learner_config=..., extra_callbacks=...,
    accelerator=...)`` (before EngineConfig) still works until 0.3: the same run, bit for
    bit, with a FutureWarning naming the replacement."""
    import gblr

    train, test = digits()
    train = Subset(train, range(64))
    learner = gblr.LearnerConfig(sigma=(2.0, 50.0))
    seen = []

    class Count(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            seen.append(trainer.global_step)

    new = gblr_vit()
    config = EngineConfig(
        steps=4, batch_size=16, warmup_steps=2, budget=0.3, learner=learner, progress=False,
        lr=2e-3, trainer={"accelerator": "cpu"},
    )  # fmt: skip
    expected = train_classifier(new, train, test, config, callbacks=[Count()])
    old = gblr_vit()
    with pytest.warns(FutureWarning, match=r"train_classifier\(steps=\.\.\., .* EngineConfig"):
        result = train_classifier(
            old, train, test, steps=4, batch_size=16, warmup_steps=2, target=0.3,
            learner_config=learner, progress=False, lr=2e-3, accelerator="cpu",
            extra_callbacks=[Count()],
        )  # fmt: skip
    assert seen == [4, 4]
    assert {k: v for k, v in result.items() if k != "seconds"} == {
        k: v for k, v in expected.items() if k != "seconds"
    }
    for name, value in old.state_dict().items():
        assert torch.equal(value, new.state_dict()[name]), name
    with pytest.raises(TypeError, match="config= and the keywords"):
        train_classifier(gblr_vit(), train, None, config, steps=2)
    with pytest.raises(TypeError, match=r"needs config=EngineConfig"):
        train_classifier(gblr_vit(), train, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config form warns about nothing of its own
        EngineConfig(steps=1)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"steps": 0}, ValueError, r"EngineConfig.steps must be an integer >= 1, got 0"),
        ({"steps": 2.5}, TypeError, r"EngineConfig.steps must be an integer >= 1, got 2.5"),
        ({"steps": 1, "lr": 0.0}, ValueError, r"EngineConfig.lr must be a finite number > 0"),
        ({"steps": 1, "min_lr": 1.0}, ValueError, r"min_lr must be in \[0, lr=0.001\]"),
        ({"steps": 1, "budget": 0}, ValueError, r"budget must be a fraction in \(0, 1\]"),
        ({"steps": 1, "learner": {}}, TypeError, r"learner must be a gblr.LearnerConfig"),
        ({"steps": 1, "logger": "wandb"}, ValueError, r"logger must be one of .*'wandb'"),
        ({"steps": 1, "compile_mode": "fast"}, ValueError, r"compile_mode must be one of"),
        ({"steps": 1, "structure_include": 3}, TypeError, r"structure_include must be a glob"),
        ({"steps": 1, "label_smoothing": 1.0}, ValueError, r"label_smoothing must be in"),
        ({"steps": 1, "trainer": [1]}, TypeError, r"trainer must be a mapping"),
        ({"steps": 1, "stop_after": 0}, ValueError, r"stop_after must be an integer >= 1 or"),
    ],
)
def test_engine_config_refuses_bad_values_naming_them(options, error, message):
    with pytest.raises(error, match=message):
        EngineConfig(**options)


def test_engine_trainer_drops_only_lightnings_litlogger_tip(caplog):
    import logging

    import lightning.pytorch as pl

    from gblr.recipes.engine import _without_litlogger_tip

    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    assert "litlogger" in caplog.text  # Lightning prints it (so the test can fail)
    caplog.clear()
    with _without_litlogger_tip():
        pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    assert "litlogger" not in caplog.text
    assert caplog.text  # its other lines (GPU available: ...) still come through


def test_progress_bar_is_labelled_by_steps_not_epochs():
    pytest.importorskip("rich")
    from types import SimpleNamespace

    from gblr.recipes.engine import _step_progress_bar

    bar = _step_progress_bar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # a gblr run counts steps
    assert bar._get_train_description(0).strip() == "Training"  # Lightning's: "Epoch 0/-2"
    # resumed at step 16 of 40, the bar counts on from 16: its total is the run's 40 steps
    # (Lightning's is the steps left, 24, so the bar ended at "40/24")
    bar._trainer = SimpleNamespace(
        max_epochs=-1, max_steps=40, global_step=16, num_training_batches=10**9
    )
    assert bar.total_train_batches == 40
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1, num_training_batches=23)
    assert bar.total_train_batches == 23  # an epoch-based run: Lightning's own


def _csv_logged_run(folder, *, steps, every, samples):
    """A GBLR ViT run of ``steps`` logging to CSV every ``every`` steps: its result and the
    rows of metrics.csv that hold a training loss."""
    import csv

    train, _ = digits()
    config = EngineConfig(
        steps=steps,
        batch_size=16,
        budget=0.5,
        progress=False,
        out_dir=folder,
        trainer={"log_every_n_steps": every},
    )
    result = train_classifier(gblr_vit(), Subset(train, range(samples)), None, config)
    with open(folder / "metrics.csv") as handle:
        return result, [row for row in csv.DictReader(handle) if row.get("train/loss")]


def test_training_steps_log_when_the_logger_writes_and_at_the_last_step(tmp_path, monkeypatch):
    """A ``self.log`` costs Lightning about a small model's whole step, so the training step
    logs only on the steps the trainer writes to its loggers, and on the last step (whose
    ``train/steps_done`` reaches the launching process of a spawn strategy)."""

    from gblr.recipes.engine import ClassificationModule

    logged_at = []
    original = ClassificationModule.log_dict

    def log_dict(self, metrics, *args, **kwargs):
        if "train/loss" in metrics:
            logged_at.append(self.global_step)
        return original(self, metrics, *args, **kwargs)

    monkeypatch.setattr(ClassificationModule, "log_dict", log_dict)
    result, written = _csv_logged_run(tmp_path, steps=25, every=10, samples=128)
    assert logged_at == [9, 19, 24]
    assert result["steps"] == 25
    # the CSV logger writes what it wrote before: every 10th step, with its loss
    assert [int(row["step"]) for row in written] == [9, 19]
    assert all(float(row["train/loss"]) > 0 for row in written)


def test_a_run_shorter_than_log_every_n_steps_still_writes_its_metrics(tmp_path):
    """Lightning writes to its loggers only every ``log_every_n_steps``: a shorter run
    (a recipe's 50 against a few steps) wrote no metrics.csv at all."""
    _, written = _csv_logged_run(tmp_path, steps=4, every=50, samples=64)
    assert [int(row["step"]) for row in written] == [3]


def test_the_structure_learns_at_the_weights_rate_unless_told():
    """The engine's default structure learning rate (lr, as `gblr.param_groups`; chosen
    on the real-task suite and a digits CNN); an explicit one is kept."""
    from gblr.recipes.engine import STRUCTURE_LR_FACTOR, ClassificationModule

    model = VisionTransformer(dim=16, depth=1, heads=2)
    structure_model(model, "gblr", 0.5)
    rates = {}
    for given in (None, 1e-4):
        module = ClassificationModule(model, lr=2e-3, total_steps=10, structure_lr=given)
        optimizer = module.configure_optimizers()["optimizer"]
        rates[given] = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert STRUCTURE_LR_FACTOR == 1
    assert rates[None]["structure"] == pytest.approx(2e-3)
    assert rates[None]["decay"] == pytest.approx(2e-3)
    assert rates[1e-4]["structure"] == pytest.approx(1e-4)


def test_the_engine_updates_with_a_fused_adamw_that_matches_the_loop(monkeypatch):
    """The engine's AdamW is torch's fused one on the CPU (`gblr.learn.groups.adamw`), and
    it moves a GBLR model as the per-parameter loop does, to rounding. (An MLP: in
    attention the keys' bias has a zero gradient up to rounding, which Adam turns into
    steps of the learning rate's size in any two forms that round differently.)"""
    from gblr.recipes.engine import ClassificationModule

    def trained(fused: bool | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Flatten(), gblr.GBLRLinear(64, 32, structure_init="half", init_cost=0.5),
            nn.GELU(), nn.Linear(32, 4),
        )  # fmt: skip
        optimizer = ClassificationModule(model, lr=2e-3, total_steps=10).configure_optimizers()[
            "optimizer"
        ]
        if fused is not None:
            for group in optimizer.param_groups:
                group["fused"], group["foreach"] = fused, False
        images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    module = ClassificationModule(VisionTransformer(dim=16, depth=1, heads=2), total_steps=10)
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True
    # Whether the fused kernel ran is counted, not read from the results: on some CPUs it
    # gives the loop's bits exactly (an Intel Xeon, 2026-12-08).
    fused_calls = []
    fused_kernel = torch._fused_adamw_

    def counted(*args, **kwargs):
        fused_calls.append(1)
        return fused_kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counted)
    engine = trained(None)
    calls = len(fused_calls)
    assert calls >= 3  # every step (one call per parameter group)
    loop = trained(False)
    assert len(fused_calls) == calls
    for a, b in zip(engine, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "trainer, message",
    [
        ({"accelerator": "cpu", "devices": [0]}, r"devices=\[0\].*int > 0"),
        ({"accelerator": "tpu"}, r"accelerator='tpu'"),
        ({"accelerator": "cpu", "no_such_option": 1}, r"no_such_option"),
    ],
)
def test_trainer_options_lightning_refuses_are_a_value_error_naming_them(trainer, message):
    """Lightning raised its own exceptions (MisconfigurationException, TypeError,
    ModuleNotFoundError) from deep inside; the CLI printed them as tracebacks."""
    from gblr.recipes.engine import _lightning_trainer

    options = {"logger": False, "enable_progress_bar": False, **trainer}
    with pytest.raises(ValueError, match=message):
        _lightning_trainer(options, chosen=trainer)


def test_a_finished_run_resumed_into_another_folder_keeps_its_checkpoint(tmp_path):
    """Resumed at its last step the run trains nothing and Lightning saved nothing: the
    new folder had no checkpoint to resume from."""
    train, test = digits()
    train = Subset(train, range(64))
    config = EngineConfig(steps=3, batch_size=16, budget=0.5, progress=False)
    first = dataclasses.replace(config, checkpoint_dir=tmp_path / "a")
    train_classifier(gblr_vit(), train, test, first)
    again = dataclasses.replace(
        config, checkpoint_dir=tmp_path / "b", resume=tmp_path / "a" / "last.ckpt"
    )
    result = train_classifier(gblr_vit(), train, test, again)
    assert result["steps"] == 3
    copied = (tmp_path / "b" / "last.ckpt").read_bytes()
    assert copied == (tmp_path / "a" / "last.ckpt").read_bytes()
    # a run that trains its own steps keeps the checkpoint Lightning saved
    longer = dataclasses.replace(
        config, steps=5, checkpoint_dir=tmp_path / "c", resume=tmp_path / "a" / "last.ckpt"
    )
    train_classifier(gblr_vit(), train, test, longer)
    assert (tmp_path / "c" / "last.ckpt").read_bytes() != copied


def test_a_resumed_run_reports_the_whole_run_s_training_time(tmp_path):
    """A resumed run's "seconds" counted only the time since the resume (QA: a run
    stopped at step 1,100 of 3,000 reported 3,000 steps in 46 s, its first 40 s lost)."""
    from gblr.recipes.checkpoints import read_checkpoint

    train, test = digits()
    config = EngineConfig(steps=6, batch_size=16, warmup_steps=2, budget=0.3, progress=False)
    stopped = dataclasses.replace(config, checkpoint_dir=tmp_path, stop_after=3)
    first = train_classifier(gblr_vit(), Subset(train, range(128)), test, stopped)
    checkpoint = read_checkpoint(tmp_path / "last.ckpt")
    recorded = checkpoint["gblr"]["train_seconds"]
    assert 0 < recorded <= first["seconds"]
    # a long first part, so that the resumed run's own seconds cannot cover it
    checkpoint["gblr"]["train_seconds"] = 1000.0
    torch.save(checkpoint, tmp_path / "long.ckpt")
    resumed = dataclasses.replace(config, resume=tmp_path / "long.ckpt")
    result = train_classifier(gblr_vit(), Subset(train, range(128)), test, resumed)
    assert 1000.0 < result["seconds"] < 1000.0 + 600
