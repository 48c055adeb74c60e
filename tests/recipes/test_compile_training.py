"""Training with ``trainer.compile``: the model is compiled in place, a GBLR model compiles
to one graph that the structure learner's steps (widths, σ) never recompile, and training
gives the weights of eager training."""

import tempfile

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from gblr.layers.base import GBLRMatrixMixin
from gblr.recipes.config import load_config
from gblr.recipes.data import digits
from gblr.recipes.engine import EngineConfig, train_classifier
from gblr.recipes.models import VisionTransformer, structure_model

pytest.importorskip("lightning")


def _train(compile_mode, train_set):
    torch.manual_seed(0)
    model = VisionTransformer(dim=16, depth=1, heads=2)
    structure_model(model, "gblr", 0.5)
    widths = {name: p.detach().clone() for name, p in model.named_parameters() if "widths" in name}
    config = EngineConfig(
        steps=3, batch_size=8, budget=0.4, trainer={"accelerator": "cpu"}, logger=None,
        progress=False, out_dir=tempfile.mkdtemp(), compile_mode=compile_mode,
    )  # fmt: skip
    result = train_classifier(model, train_set, None, config)
    moved = any(not torch.equal(p, widths[n]) for n, p in model.named_parameters() if n in widths)
    return model, result, moved


def test_compiled_training_is_one_graph_and_matches_eager(monkeypatch):
    train_set, _ = digits(seed=0)
    # A compiled graph masks both factors of every layer; eager training gathers the held
    # one-line sides instead (`strips`), which sums the same products in another order.
    # The keys' bias has a gradient of zero up to rounding, which Adam turns into steps
    # of the learning rate's size, so the reference is eager training without the strips.
    with monkeypatch.context() as patch:
        patch.setattr(GBLRMatrixMixin, "strips", lambda self: None)
        eager, eager_result, _ = _train(None, train_set)

    # aot_eager traces forward and backward as inductor would, without its C++ codegen
    # (minutes on 2 cores); tests/layers/test_compile.py runs inductor on a GBLR layer.
    compile_module = nn.Module.compile

    def traced_without_codegen(self, *args, **kwargs):
        assert kwargs.get("mode") is None  # "default" is torch.compile's own default
        return compile_module(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(nn.Module, "compile", traced_without_codegen)
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_result, widths_moved = _train("default", train_set)

    assert widths_moved  # the learner ran between compiled steps
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # widths and σ changed: no recompile
    assert compiled_result["macs_ratio"] == eager_result["macs_ratio"]
    for (name, value), expected in zip(
        compiled.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_compile_mode_is_refused():
    with pytest.raises(ValueError, match=r"trainer.compile must be one of default, "):
        load_config("digits-vit-gblr", ["trainer.compile=fastest"])
    config = load_config("digits-vit-gblr", ["trainer.compile=reduce-overhead"])
    assert config.trainer.compile == "reduce-overhead"
    with pytest.raises(ValueError, match=r"compile_mode must be one of .*'max-autotune'"):
        EngineConfig(steps=1, logger=None, progress=False, compile_mode="fast")
