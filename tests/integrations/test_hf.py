import contextlib

import pytest
import torch
from torch import nn

import gblr

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gblr.integrations.hf import GBLRTrainerCallback  # noqa: E402


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = gblr.GBLRLinear(16, 32, structure_init="random")
        self.head = gblr.GBLRLinear(32, 4, structure_init="random")

    def forward(self, inputs, labels=None):
        logits = self.head(torch.relu(self.body(inputs)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Dataset(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 16, generator=generator)
        self.y = torch.randint(0, 4, (64,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"inputs": self.x[index], "labels": self.y[index]}


def test_trainer_callback_learns_widths(tmp_path):
    model = TinyClassifier()
    before = model.body.widths.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=8,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    config = gblr.LearnerConfig.paper()
    callback = GBLRTrainerCallback(config=config, budget=0.3, warmup_steps=2)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Dataset(), callbacks=[callback]
    )
    trainer.train()
    assert callback.learner.step_count == 5 and callback.learner.config is config
    assert not torch.equal(before, model.body.widths.detach())
    assert gblr.count_flops(model).ratio <= 0.3
    logged = [entry for entry in trainer.state.log_history if "gblr/macs_ratio" in entry]
    assert logged and logged[-1]["gblr/macs_ratio"] <= 0.3


def test_bad_arguments():
    with pytest.raises(ValueError, match="keyword arguments"):
        GBLRTrainerCallback()


def test_learner_keywords_are_checked_when_the_callback_is_made():
    with pytest.raises(
        TypeError, match=r"unknown StructureLearner keyword argument\(s\) \['sigmaa'\]"
    ):
        GBLRTrainerCallback(budget=0.5, sigmaa=1.0)
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\]"):
        GBLRTrainerCallback(budget=1.5)
    with pytest.raises(ValueError, match=r"target must be a fraction in \(0, 1\]"):
        GBLRTrainerCallback(target=1.5)  # the deprecated name, named as given
    with pytest.warns(FutureWarning, match=r"GBLRTrainerCallback\(target=\.\.\.\) is deprecated"):
        assert GBLRTrainerCallback(target=0.5).learner_kwargs == {"budget": 0.5}


class _Stop(Exception):
    pass


class _StopAfterSaving(transformers.TrainerCallback):
    """Interrupts the run once the checkpoint of ``step`` is written (a crash)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Stop


def _resumable_run(folder, stop_at=None, resume=None):
    model = TinyClassifier()
    args = transformers.TrainingArguments(
        output_dir=str(folder), max_steps=12, per_device_train_batch_size=8,
        learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=6,
        logging_steps=4, use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    callback = GBLRTrainerCallback(budget=0.3, warmup_steps=10)
    callbacks = [callback] + ([_StopAfterSaving(stop_at)] if stop_at else [])
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Dataset(), callbacks=callbacks
    )
    with contextlib.suppress(_Stop):
        trainer.train(resume_from_checkpoint=resume)
    return model, callback


def test_a_resumed_run_continues_the_learner_exactly(tmp_path):
    """The callback saved no state: a resumed run rebuilt its learner from the resumed
    widths, so the budget's ramp restarted from another starting cost (89 of 100 steps
    of a QA run differed) and the run ended on other weights."""
    full, full_callback = _resumable_run(tmp_path / "full")
    _resumable_run(tmp_path / "run", stop_at=6)
    assert (tmp_path / "run" / "checkpoint-6" / "gblr_learner.pt").is_file()
    resumed, callback = _resumable_run(tmp_path / "run", resume=True)
    assert callback.learner.start_cost == full_callback.learner.start_cost
    assert callback.learner.step_count == 12
    expected = full.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_checkpoint_without_the_learner_state_resumes_with_a_warning(tmp_path):
    _resumable_run(tmp_path, stop_at=6)
    (tmp_path / "checkpoint-6" / "gblr_learner.pt").unlink()
    with pytest.warns(UserWarning, match="no learner state at"):
        _, callback = _resumable_run(tmp_path, resume=True)
    assert callback.learner.step_count == 12


def test_a_callback_builds_a_learner_for_each_training_run(tmp_path):
    """A second train() (hyperparameter_search's model_init gives a new model each time)
    went on stepping the first model's layers, and left the new one over the budget."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=8,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    callback = GBLRTrainerCallback(budget=0.3, warmup_steps=2)
    models = []
    for _ in range(2):
        models.append(TinyClassifier())
        transformers.Trainer(
            model=models[-1], args=args, train_dataset=Dataset(), callbacks=[callback]
        ).train()
        assert callback.learner.steps_layers_of(models[-1])
        assert callback.learner.step_count == 5
    assert gblr.count_flops(models[1]).ratio <= 0.3
    learner = gblr.StructureLearner(models[0], budget=0.3, total_steps=5)
    with pytest.raises(ValueError, match="built on another model"):
        transformers.Trainer(
            model=models[1], args=args, train_dataset=Dataset(),
            callbacks=[GBLRTrainerCallback(learner)],
        ).train()  # fmt: skip


def test_two_callbacks_in_one_trainer_are_refused(tmp_path):
    """Both stepped the structure on every step (in λ mode a second cut: ratio 0.43
    against 0.86 with one), without a word."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    callbacks = [GBLRTrainerCallback(budget=0.3), GBLRTrainerCallback(budget=0.3)]
    trainer = transformers.Trainer(
        model=TinyClassifier(), args=args, train_dataset=Dataset(), callbacks=callbacks
    )
    with pytest.raises(ValueError, match="two GBLRTrainerCallbacks"):
        trainer.train()
    # one callback, in trainer after trainer: no refusal
    callback = GBLRTrainerCallback(budget=0.3)
    for _ in range(2):
        transformers.Trainer(
            model=TinyClassifier(), args=args, train_dataset=Dataset(), callbacks=[callback]
        ).train()
