import pytest
import torch
from torch.utils.data import Subset

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")
from gblr.recipes.data import digits  # noqa: E402
from gblr.recipes.engine import train_classifier  # noqa: E402
from gblr.recipes.models import VisionTransformer, structure_model  # noqa: E402


def gblr_vit():
    torch.manual_seed(0)
    model = VisionTransformer(dim=32, depth=1, heads=2)
    structure_model(model, "gblr", 0.6)
    return model


def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path):
    train, test = digits()
    train = Subset(train, range(256))  # 8 steps per pass over the data at batch 32
    settings = dict(steps=24, batch_size=32, warmup_steps=12, target=0.3, progress=False)

    full = gblr_vit()
    train_classifier(full, train, test, **settings)

    interrupted = gblr_vit()
    train_classifier(interrupted, train, test, checkpoint_dir=tmp_path, stop_after=16, **settings)
    assert (tmp_path / "last.ckpt").is_file()
    resumed = gblr_vit()
    train_classifier(resumed, train, test, resume=tmp_path / "last.ckpt", **settings)

    expected = full.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    # and the interruption really changed something along the way
    assert not torch.equal(interrupted.blocks[0].fc1.widths, full.blocks[0].fc1.widths)


class SaveWidths(pl.Callback):
    """Each rank writes its GBLR widths and its view of the data at the end of training."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_end(self, trainer, pl_module):
        widths = {
            name: module.widths.detach().clone()
            for name, module in pl_module.named_modules()
            if hasattr(module, "widths")
        }
        torch.save(widths, f"{self.folder}/widths_rank{trainer.global_rank}.pt")


def test_two_process_ddp_keeps_the_structure_identical_on_both_ranks(tmp_path):
    train, test = digits()
    model = gblr_vit()
    result = train_classifier(
        model,
        Subset(train, range(256)),
        test,
        steps=10,
        batch_size=16,
        warmup_steps=5,
        target=0.3,
        progress=False,
        strategy="ddp_spawn",
        devices=2,
        extra_callbacks=[SaveWidths(tmp_path)],
    )
    ranks = [torch.load(tmp_path / f"widths_rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 4
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
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
    train_classifier(
        gblr_vit(),
        Subset(train, range(64)),
        None,
        steps=4,
        batch_size=16,
        target=0.3,
        progress=False,
        learner_config=config,
        extra_callbacks=[Probe()],
    )
    assert seen["config"] is config
    with pytest.raises(TypeError, match=r"\['learner_options'\]: .* learner_config="):
        train_classifier(gblr_vit(), train, None, steps=1, learner_options={"merge": 1e-3})
