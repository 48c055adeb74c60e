"""The GPT-2 / WikiText-103 recipe, a few steps on a WikiText fixture in the raw release's
format with a tiny random GPT-2 (transformers' own class)."""

import json
import math

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
pytest.importorskip("yaml")
from gblr.cli import main
from gblr.recipes.text import ByteTokenizer, strided_perplexity
from gblr.recipes.train import model_from_run

from .text_fixtures import wikitext_split, write_wikitext

TINY_GPT2 = [
    "model.pretrained=false",
    "model.source=gpt2",
    "model.kwargs={n_layer: 2, n_embd: 32, n_head: 2, vocab_size: 256, n_positions: 64}",
    "data.tokenizer=bytes",
    "data.seq_len=32",
    "data.eval_stride=16",
    "structure.search_steps=0",
    "optim.batch_size=4",
    "optim.epochs=2",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.checkpoint_every_n_steps=2",
]


def test_gpt2_recipe_fine_tunes_and_reports_strided_perplexity(tmp_path, capsys):
    write_wikitext(tmp_path / "wikitext")
    out = tmp_path / "gpt2"
    argv = ["finetune", "--config", "wikitext103-gpt2-gblr", f"data.root={tmp_path / 'wikitext'}"]
    argv += [*TINY_GPT2, "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "test perplexity" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())["result"]
    train_blocks = len(wikitext_split("train").encode()) // 32
    assert result["steps"] == 2 * (train_blocks // 4)
    assert result["macs_ratio"] <= 0.333 + 1e-6  # searched to the budget, kept by the learner
    assert result["gflops"] < result["dense_gflops"]
    # the reported perplexity is the strided evaluation of the saved model on the test split
    model, _, _ = model_from_run(out)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "GBLRLinear"
    stream = torch.tensor(ByteTokenizer().encode(wikitext_split("test")))
    again = strided_perplexity(model, stream, max_length=32, stride=16)
    assert result["tokens"] == again["tokens"] == len(stream) - 1
    assert result["perplexity"] == pytest.approx(again["perplexity"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]), rel=1e-9)
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "val/perplexity" in header
    assert any((tmp_path / "wikitext" / ".gblr-cache").glob("tokens-*.pt"))  # cached ids
    # a checkpoint of this recipe resumes; one of another structure is refused
    assert main([*argv, "--resume"]) == 0
    assert main([*argv, "--resume", "--structure", "monarch", "--out", str(out)]) == 1
    assert "another structure" in capsys.readouterr().err


def test_gpt2_recipe_says_how_to_get_missing_data(tmp_path, capsys):
    argv = ["finetune", "--config", "wikitext103-gpt2-gblr", f"data.root={tmp_path}"]
    assert main([*argv, *TINY_GPT2]) == 1
    assert "wiki.train.raw" in capsys.readouterr().err
