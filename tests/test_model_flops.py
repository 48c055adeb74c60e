import pytest
import torch

import gblr
from gblr.model_flops import count_model_flops


def small_vit_macs(batch, dim=64, depth=4, mlp_ratio=2, tokens=17, classes=10, patch_macs=4096):
    """Hand count for recipes.VisionTransformer on 8x8 images (2x2 patches, class token)."""
    linear = dim * 3 * dim + dim * dim + 2 * dim * int(dim * mlp_ratio)  # qkv, proj, fc1, fc2
    attention = 2 * tokens * tokens * dim  # Q K^T and A V over all heads
    return batch * (depth * (tokens * linear + attention) + patch_macs + dim * classes)


def test_small_vit_matches_a_hand_count_and_a_converted_one_sums_its_layers():
    pytest.importorskip("sklearn")
    from gblr.recipes.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer().eval()
    images = torch.randn(3, 1, 8, 8)
    dense = count_model_flops(model, images)
    assert dense.macs == dense.dense_macs == small_vit_macs(3)
    assert dense.structured == ()

    gblr.convert(
        model, gblr.GBLRConfig(budget=0.3, init="random", include="blocks.*", min_features=1)
    )
    converted = count_model_flops(model, images)
    layers = gblr.count_flops(model, images, include=["blocks.*"])  # per-layer totals
    assert len(converted.structured) == len(layers) == 16
    assert sum(s.macs for s in converted.structured) == layers.macs
    assert all(s.rows == 3 * 17 for s in converted.structured)
    # the unchanged parts (attention products, patch embedding, head) are what they were
    assert converted.other_macs == dense.macs - layers.dense_macs
    assert converted.macs == converted.other_macs + layers.macs
    assert converted.dense_macs == dense.macs
    assert 0.25 < converted.ratio < 0.45 and "GFLOPs" in str(converted)
    # the training form (masked dense products inside) counts the same
    model.train()
    assert count_model_flops(model, images).macs == converted.macs


def test_gpt2_counts_conv1d_attention_and_head_and_takes_keyword_inputs():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (1, 16))
    tokens, dim = 16, 32
    per_layer = tokens * (dim * 3 * dim + dim * dim + 2 * dim * 4 * dim) + 2 * tokens**2 * dim
    expected = 2 * per_layer + tokens * dim * 50  # two blocks and the LM head
    assert count_model_flops(model, {"input_ids": ids}).macs == expected
    gblr.convert(
        model, gblr.GBLRConfig(budget=0.5, init="random", include="transformer.h.*", min_features=1)
    )
    converted = count_model_flops(model, (ids,))
    assert len(converted.structured) == 8 and converted.dense_macs == expected
    assert converted.macs < expected


@pytest.mark.parametrize(
    ("name", "published_gflops"),
    # fvcore-convention figures quoted with these models (ViT-B/16: DeiT's table; ResNet-18:
    # torchvision's model card, 1.81 GFLOPs) at 224x224
    [("vit_b_16", 17.6), ("resnet18", 1.82)],
)
def test_reference_models_match_their_published_counts_within_one_percent(name, published_gflops):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()  # random weights: nothing downloaded
    result = count_model_flops(model, torch.randn(1, 3, 224, 224))
    assert result.gflops == pytest.approx(published_gflops, rel=0.01)
    # the fused attention fast path was switched off only while counting
    if hasattr(torch.backends, "mha"):
        assert torch.backends.mha.get_fastpath_enabled()


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        count_model_flops(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="example_input is required"):
        count_model_flops(torch.nn.Linear(2, 2), None)


def test_counting_a_model_in_training_changes_nothing_of_its_state():
    """It ran in the model's own mode: a model counted mid-training had its batch-norm
    statistics moved and its dropout drew from the global generator."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)
    ).train()
    model[2].eval()  # a module's own flag, which must come back as it was
    before = {name: value.clone() for name, value in model.state_dict().items()}
    inputs = torch.randn(16, 4) + 3
    rng = torch.get_rng_state()
    result = count_model_flops(model, inputs)
    assert result.macs == 16 * (4 * 8 + 8 * 2)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert [module.training for module in model] == [True, True, False, True]
