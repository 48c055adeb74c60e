import math
import warnings

import pytest
import torch
from torch import nn

import gblr

pl = pytest.importorskip("lightning.pytorch")
from gblr.integrations.lightning import GBLRCallback  # noqa: E402


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            gblr.GBLRLinear(16, 32, structure_init="random"),
            nn.ReLU(),
            gblr.GBLRLinear(32, 4, structure_init="random"),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(gblr.param_groups(self, lr=1e-2, weight_decay=0.01))


def loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def trainer(tmp_path, callback, max_steps, **kwargs):
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip


def test_callback_learns_widths_and_meets_budget(tmp_path):
    module = TinyModule()
    before = [layer.widths.detach().clone() for layer in (module.net[0], module.net[2])]
    callback = GBLRCallback(budget=0.3, warmup_steps=3, log_every_n_steps=1)
    trainer(tmp_path, callback, 6, enable_checkpointing=False).fit(module, loader())
    assert callback.learner.step_count == 6
    assert callback.learner.total_steps == 6  # from estimated_stepping_batches
    after = [layer.widths.detach() for layer in (module.net[0], module.net[2])]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert gblr.count_flops(module.net).ratio <= 0.3


def test_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    callback = GBLRCallback(budget=0.5)
    trainer(tmp_path, callback, 3, accumulate_grad_batches=2, enable_checkpointing=False).fit(
        TinyModule(), loader()
    )
    assert callback.learner.step_count == 3


def test_learner_state_travels_in_checkpoints(tmp_path):
    callback = GBLRCallback(target=0.4, warmup_steps=4)
    run = trainer(tmp_path, callback, 4)
    run.fit(TinyModule(), loader())
    path = tmp_path / "last.ckpt"
    run.save_checkpoint(path)
    resumed = GBLRCallback(target=0.4, warmup_steps=4)
    trainer(tmp_path, resumed, 6).fit(TinyModule(), loader(), ckpt_path=path)
    assert resumed.learner.step_count == 6
    assert resumed.learner.start_cost == callback.learner.start_cost
    # another budget ramp is refused (it resumed on the new ramp in silence)
    other_ramp = GBLRCallback(budget=0.4, warmup_steps=2)
    with pytest.raises(ValueError, match=r"saved with warmup_steps=4, this learner has .*=2"):
        trainer(tmp_path, other_ramp, 6).fit(TinyModule(), loader(), ckpt_path=path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="keyword arguments"):
        GBLRCallback()


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-5, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_log_every_n_steps_is_a_positive_int(value, error):
    """0 used to pass and divide by zero (``global_step % 0``) at the first step."""
    message = rf"log_every_n_steps must be an int >= 1 or None, got {value!r}"
    with pytest.raises(error, match=message):
        GBLRCallback(budget=0.5, log_every_n_steps=value)


def test_learner_keywords_are_checked_when_the_callback_is_made():
    """The learner is built at fit start; these used to fail only there."""
    with pytest.raises(
        TypeError, match=r"unknown StructureLearner keyword argument\(s\) \['traget'\]"
    ):
        GBLRCallback(traget=0.5)
    with pytest.raises(ValueError, match=r"got the int 500; .* pass budget_macs=500"):
        GBLRCallback(budget=500)
    with pytest.raises(ValueError, match="exactly one of budget"):
        GBLRCallback(budget=0.5, lam=0.1)
    with pytest.raises(TypeError, match=r"learner must be a gblr\.StructureLearner"):
        GBLRCallback(learner="not a learner")
    with pytest.raises(TypeError, match=r"config must be a gblr\.LearnerConfig"):
        GBLRCallback(config={"sigma": None}, budget=0.5)
    with pytest.raises(ValueError, match=r"either config= or the deprecated GBLRCallback"):
        GBLRCallback(config=gblr.LearnerConfig(), budget=0.5, merge=1e-3)
    with pytest.raises(ValueError, match="merge must be in"), pytest.warns(FutureWarning):
        GBLRCallback(budget=0.5, merge=2.0)
    GBLRCallback(budget_macs=500)  # an absolute budget passes through


def test_config_reaches_the_learner_and_old_keywords_warn_once(tmp_path):
    # The old keywords describe runs without the final phase, where removed components
    # came back, every width took the same cut and the budget was an upper bound only.
    config = gblr.LearnerConfig(
        sigma=None,
        merge=gblr.MergeConfig(1e-3),
        exact_from=None,
        revive=True,
        cut_exponent=0.0,
        fill_budget=False,
        hold_narrow_sides=0,
    )
    callback = GBLRCallback(config=config, budget=0.5)
    with pytest.warns(FutureWarning, match="deprecated since gblr") as caught:
        old = GBLRCallback(target=0.5, sigma=None, merge=1e-3)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("GBLRCallback(sigma=..., merge=...) is deprecated") for m in messages)
    assert any(m.startswith("GBLRCallback(target=...) is deprecated") for m in messages)
    assert old.learner_kwargs == callback.learner_kwargs == {"config": config, "budget": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, old, 2, enable_checkpointing=False).fit(TinyModule(), loader())
    assert not [w for w in caught if "deprecated since gblr" in str(w.message)]  # no more
    assert old.learner.config == config


class _Rows(pl.loggers.logger.Logger):
    """Keeps every row the trainer writes: (step, metrics)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "rows"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


@pytest.mark.parametrize(("callback_every", "trainer_every"), [(None, 3), (4, 2), (3, 4)])
def test_every_written_row_carries_the_learner_s_numbers_of_its_own_step(
    tmp_path, callback_every, trainer_every
):
    """The callback logged on its own schedule, and the trainer wrote the values it held
    at its next write: the row of step 50 carried the learner's numbers of step 30."""
    rows = _Rows()
    callback = GBLRCallback(budget=0.4, warmup_steps=4, log_every_n_steps=callback_every)
    pl.Trainer(
        max_steps=12, accelerator="cpu", devices=1, logger=rows, log_every_n_steps=trainer_every,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[callback], default_root_dir=tmp_path,
    ).fit(TinyModule(), loader())  # fmt: skip
    # the trainer's step counter starts at 0, the learner's after the first step at 1
    logged = {step + 1: row["gblr/step"] for step, row in rows.rows if "gblr/step" in row}
    every = math.lcm(trainer_every, callback_every or 1)
    fresh = {step: logged.get(step) for step in range(every, 13, every)}
    assert fresh == {step: float(step) for step in fresh}
    if callback_every is None:  # every write is one of them
        assert set(logged) == set(fresh)


def test_a_callback_builds_a_learner_for_each_fit(tmp_path):
    """It built one learner per callback object: a second fit (another model) went on
    stepping the first model's layers, and left the second at 1.45x the budget."""
    callback = GBLRCallback(budget=0.3, warmup_steps=3)
    first, second = TinyModule(), TinyModule()
    trainer(tmp_path, callback, 6, enable_checkpointing=False).fit(first, loader())
    learner = callback.learner
    trainer(tmp_path, callback, 6, enable_checkpointing=False).fit(second, loader())
    assert callback.learner is not learner and callback.learner.step_count == 6
    assert gblr.count_flops(second.net).ratio <= 0.3


def test_a_learner_of_another_model_is_refused(tmp_path):
    learner = gblr.StructureLearner(TinyModule(), budget=0.3, total_steps=6)
    with pytest.raises(ValueError, match="built on another model"):
        trainer(tmp_path, GBLRCallback(learner), 6).fit(TinyModule(), loader())


def test_a_run_of_no_fixed_length_asks_for_total_steps(tmp_path):
    with pytest.raises(ValueError, match=r"no fixed length.*total_steps="):
        trainer(tmp_path, GBLRCallback(budget=0.3), -1, max_epochs=-1).fit(TinyModule(), loader())


class _FactorsOnly(TinyModule):
    def configure_optimizers(self):
        factors = [p for name, p in self.named_parameters() if "widths" not in name]
        return torch.optim.AdamW([p for p in factors if p.dim() > 1 or p.numel() > 8])


def test_an_optimizer_without_the_structure_is_named_in_a_warning(tmp_path):
    """In budget mode nothing said that the structure was not learned: only the cut
    moved it."""
    with pytest.warns(UserWarning, match="holds none of the GBLR widths"):
        trainer(tmp_path, GBLRCallback(budget=0.5), 2, enable_checkpointing=False).fit(
            _FactorsOnly(), loader()
        )
