import pytest
import torch
from torch.utils.data import Subset

pytest.importorskip("lightning")
pytest.importorskip("sklearn")
from gblr.recipes.data import digits
from gblr.recipes.engine import train_classifier
from gblr.recipes.models import VisionTransformer, structure_model


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
