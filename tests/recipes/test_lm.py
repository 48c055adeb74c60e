import math

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")
import gblr  # noqa: E402
from gblr.recipes.engine import CausalLMModule  # noqa: E402


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def test_causal_lm_loss_matches_the_models_own_and_perplexity_is_token_weighted():
    model = tiny_gpt2().eval()
    module = CausalLMModule(model)
    ids = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    total, count = module._summed_loss(ids)
    reference = model(ids, labels=ids).loss  # Hugging Face's own shifted loss
    assert count == 3 * 15
    assert (total / count).item() == pytest.approx(reference.item(), rel=1e-5)
    # ignored positions (-100) are left out of both the sum and the count
    labels = ids.clone()
    labels[0, 5:] = -100
    total, count = module._summed_loss({"input_ids": ids, "labels": labels})
    assert count == 3 * 15 - 11
    assert (total / count).item() == pytest.approx(model(ids, labels=labels).loss.item(), rel=1e-5)

    # validation over batches of different sizes: exp(mean loss per token), not a mean of exps
    batches = torch.utils.data.DataLoader([ids[:1], ids[1:]], batch_size=None)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(module, batches, verbose=False)
    sums = [module._summed_loss(batch) for batch in batches]
    mean = sum(t for t, _ in sums) / sum(c for _, c in sums)
    assert metrics["val/loss"] == pytest.approx(mean.item(), rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(mean.item()), rel=1e-5)


def test_causal_lm_trains_a_converted_gpt2_with_the_structure_learner():
    model = tiny_gpt2()
    gblr.convert(model, gblr.GBLRConfig(budget=0.5, init="random", min_features=1))
    widths = {n: m.widths.detach().clone() for n, m in gblr.learn.groups.gblr_layers(model)}
    module = CausalLMModule(model, lr=3e-3, warmup_steps=2, total_steps=12)
    data = torch.randint(0, 50, (24, 16), generator=torch.Generator().manual_seed(2))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    from gblr.integrations.lightning import GBLRCallback

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[GBLRCallback(budget=0.3, warmup_steps=6, total_steps=12)],
    )
    before = trainer.validate(module, loader, verbose=False)[0]["val/loss"]
    trainer.fit(module, loader)
    after = trainer.validate(module, loader, verbose=False)[0]["val/loss"]
    assert after < before  # it learned (random tokens: towards the unigram entropy)
    report = gblr.count_flops(model)
    gblr_rows = [row for row in report.layers if row.live_components is not None]
    assert (
        gblr_rows
        and sum(r.macs for r in gblr_rows) <= 0.3 * sum(r.dense_macs for r in gblr_rows) + 1
    )
    moved = [not torch.equal(m.widths, widths[n]) for n, m in gblr.learn.groups.gblr_layers(model)]
    assert any(moved)
