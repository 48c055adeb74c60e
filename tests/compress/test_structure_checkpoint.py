"""Restoring a converted model from a Lightning checkpoint without converting again: the
structure stored with the checkpoint (docs/guides/compress.md's recipe)."""

import pytest
import torch
from torch import nn

import gblr

lightning = pytest.importorskip("lightning")


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class Compressed(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = build()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["gblr_structure"] = gblr.model_structure(self.model)

    def on_load_checkpoint(self, checkpoint):
        if checkpoint.get("gblr_structure", {}).get("layers"):
            gblr.apply_structure(self.model, checkpoint["gblr_structure"])

    def forward(self, x):
        return self.model(x)


def test_a_checkpoint_of_a_converted_model_loads_without_the_conversion(tmp_path):
    module = Compressed()
    gblr.convert(module.model, gblr.MonarchConfig(budget=0.5, min_features=1))
    trainer = lightning.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0
    )
    trainer.strategy.connect(module)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = Compressed.load_from_checkpoint(path, weights_only=False)
    assert type(restored.model[0]).__name__ == "MonarchLinear"
    x = torch.randn(3, 32)
    assert torch.equal(restored.eval()(x), module.eval()(x))
