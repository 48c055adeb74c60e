"""gblr.merge_and_unload (issue 22, point 2): every structured layer back to the plain
layer it replaced, with its exact eval-mode matrix; no gblr module left."""

import warnings

import pytest
import torch
from torch import nn

import gblr
from gblr.compress.unload import is_structured

CONFIGS = [
    gblr.compress.config_class(structure)(budget=0.5) for structure in gblr.compress.structures()
]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 32, bias=False)).eval()


def assert_plain(model: nn.Module) -> None:
    assert not [type(m).__name__ for m in model.modules() if is_structured(m)]
    assert not any(type(m).__module__.startswith("gblr") for m in model.modules())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.structure)
def test_every_family_merges_to_linear_layers_with_equal_outputs(config):
    model = mlp()
    report = gblr.convert(model, config)
    assert len(report.layers) == 2
    x = torch.randn(5, 48)
    expected = model(x)
    merged = gblr.merge_and_unload(model)
    assert merged is model
    assert_plain(merged)
    assert isinstance(merged[0], nn.Linear) and merged[2].bias is None
    assert (merged(x) - expected).abs().max().item() <= 1e-5
    assert not hasattr(merged, "gblr_config")


def test_frozen_and_training_form_convolutions_merge_to_conv2d():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding="valid")
    ).eval()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    frozen = gblr.freeze(model)
    merged = gblr.merge_and_unload(frozen)
    assert_plain(merged)
    assert isinstance(merged[2], nn.Conv2d) and merged[2].stride == (2, 2)
    assert (merged(x) - expected).abs().max().item() <= 1e-5


def test_a_training_mode_model_gets_the_eval_matrix_and_keeps_its_mode():
    model = mlp()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    x = torch.randn(4, 48)
    expected = model.eval()(x)
    model.train()
    merged = gblr.merge_and_unload(model)
    assert merged.training and merged[0].training
    assert merged[0].weight.requires_grad
    assert (merged.eval()(x) - expected).abs().max().item() <= 1e-5


def test_shared_layers_stay_shared_and_a_layer_alone_is_returned():
    layer = gblr.GBLRLinear(16, 16)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    merged = gblr.merge_and_unload(model)
    assert merged[0] is merged[2] and isinstance(merged[0], nn.Linear)
    dense = gblr.merge_and_unload(gblr.GBLRLinear(8, 4).eval())
    assert isinstance(dense, nn.Linear) and dense.weight.shape == (4, 8)
    with pytest.raises(TypeError):
        gblr.merge_and_unload("model")


def test_gpt2_conv1d_layers_come_back_as_conv1d():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    model = transformers.GPT2LMHeadModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head stays dense
        report = gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    assert {layer.kind for layer in report.layers} == {"Conv1D"}
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(ids).logits
    merged = gblr.merge_and_unload(gblr.freeze(model))  # the mark survives freeze
    assert_plain(merged)
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    assert (merged(ids).logits - expected).abs().max().item() <= 1e-5
    # the plain save_pretrained is transformers' own again
    assert "save_pretrained" not in vars(merged)


def test_a_timm_vit_merges_back():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=64,
        num_heads=2,
    ).eval()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5))
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    merged = gblr.merge_and_unload(model)
    assert_plain(merged)
    assert isinstance(merged.patch_embed.proj, nn.Conv2d)
    assert (merged(x) - expected).abs().max().item() <= 1e-5
