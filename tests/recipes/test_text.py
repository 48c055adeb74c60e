import io
import math
import sys
import types

import pytest
import torch

from gblr.recipes.text import (
    ByteTokenizer,
    HFTokenizer,
    LMBlocks,
    load_tokenizer,
    read_text_files,
    read_wikitext,
    strided_perplexity,
    token_stream,
)
from tests.recipes.text_fixtures import train_byte_level_bpe, wikitext_split, write_wikitext

# ---------------------------------------------------------------- reading the data


def test_read_wikitext_returns_the_raw_files_byte_for_byte(tmp_path):
    written = write_wikitext(tmp_path)
    assert written["train"].startswith(" \n = Valkyria Chronicles III = \n \n Senjō")
    assert read_wikitext(tmp_path, "train") == written["train"]
    assert read_wikitext(tmp_path, "validation") == written["valid"]
    assert read_wikitext(tmp_path, "valid") == written["valid"]
    assert read_wikitext(str(tmp_path), "test") == written["test"]
    # the official zip's folder inside root
    nested = write_wikitext(tmp_path / "nested", folder="wikitext-103-raw")
    assert read_wikitext(tmp_path / "nested", "test") == nested["test"]


def test_read_wikitext_keeps_line_endings_and_reads_the_tokenized_release(tmp_path):
    (tmp_path / "wiki.test.raw").write_bytes(b" a \r\n b \n")
    assert read_wikitext(tmp_path, "test") == " a \r\n b \n"  # no newline translation
    written = write_wikitext(tmp_path / "tok", folder="wikitext-103", ext="tokens")
    assert read_wikitext(tmp_path / "tok", "train", "wikitext-103-v1") == written["train"]
    small = write_wikitext(tmp_path / "two", folder="wikitext-2-raw")
    assert read_wikitext(tmp_path / "two", "valid", "wikitext-2-raw-v1") == small["valid"]


def test_missing_wikitext_names_the_folder_and_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        read_wikitext(tmp_path, "test")
    message = str(error.value)
    assert str(tmp_path / "wiki.test.raw") in message
    assert str(tmp_path / "wikitext-103-raw" / "wiki.test.raw") in message
    assert "wikitext-103-raw-v1.zip" in message and "root=None" in message
    write_wikitext(tmp_path, ext="tokens")
    with pytest.raises(FileNotFoundError, match="variant='wikitext-103-v1'"):
        read_wikitext(tmp_path, "test")


def test_read_wikitext_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"split must be one of .*'dev'"):
        read_wikitext(tmp_path, "dev")
    with pytest.raises(ValueError, match=r"variant must be one of .*'wikitext-3'"):
        read_wikitext(tmp_path, "test", variant="wikitext-3")
    with pytest.raises(TypeError, match="root must be"):
        read_wikitext(3, "test")


def test_datasets_rows_are_joined_back_into_the_raw_text(monkeypatch):
    text = wikitext_split("valid")
    # the rows the `datasets` WikiText builder yields: each line with its newline,
    # whitespace-only lines as ""
    rows = [line if line.strip() else "" for line in io.StringIO(text)]
    assert "" in rows
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"text": rows}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert read_wikitext(None, "valid") == text
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "validation")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"gblr\[hf\]"):
        read_wikitext(None, "test")


def test_read_text_files_concatenates_in_order(tmp_path):
    (tmp_path / "a.txt").write_bytes("first é\nline".encode())
    (tmp_path / "b.txt").write_bytes(b"second\n")
    (tmp_path / "c.txt").write_bytes(b"third")
    paths = [tmp_path / "a.txt", tmp_path / "b.txt", str(tmp_path / "c.txt")]
    assert read_text_files(paths) == "first é\nline\nsecond\nthird"
    assert read_text_files(tmp_path / "b.txt") == "second\n"
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        read_text_files([tmp_path / "a.txt", tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="folder"):
        read_text_files(tmp_path)
    with pytest.raises(ValueError, match="non-empty"):
        read_text_files([])


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_non_ascii_text():
    tokenizer = load_tokenizer("bytes")
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.vocab_size, tokenizer.name) == (256, "bytes")
    text = " = Senjō no Valkyria = \n £ 1 @,@ 000 – 中文 😀 \n"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")) and len(ids) > len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_tensor(text).tolist() == ids
    assert tokenizer.encode_tensor(text).dtype == torch.int64
    assert tokenizer.encode("") == [] and tokenizer.encode_tensor("").shape == (0,)
    assert ByteTokenizer(eos_id=0).eos_id == 0
    with pytest.raises(ValueError, match=r"eos_id .*\[0, 255\], got 256"):
        ByteTokenizer(eos_id=256)
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(b"bytes")


def test_locally_trained_bpe_loads_offline_and_matches_the_tokenizers_library(tmp_path):
    transformers = pytest.importorskip("transformers")
    texts = write_wikitext(tmp_path / "data")
    raw = train_byte_level_bpe([texts["train"]])
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "full")
    (tmp_path / "bare").mkdir()
    raw.save(str(tmp_path / "bare" / "tokenizer.json"))
    for source in (tmp_path / "full", str(tmp_path / "bare"), tmp_path / "bare/tokenizer.json"):
        tokenizer = load_tokenizer(source)
        assert isinstance(tokenizer, HFTokenizer) and tokenizer.chunkable
        assert tokenizer.vocab_size == raw.get_vocab_size()
        for text in texts.values():
            assert tokenizer.encode(text) == raw.encode(text).ids
    # another tokenizer at the same path gets another name, so caches are not shared
    before = load_tokenizer(tmp_path / "bare").name
    assert before.startswith(f"hf:{tmp_path / 'bare'}#")
    train_byte_level_bpe([texts["test"]], vocab_size=290).save(
        str(tmp_path / "bare/tokenizer.json")
    )
    assert load_tokenizer(tmp_path / "bare").name != before


def test_chunked_encoding_equals_encoding_the_whole_split(tmp_path):
    pytest.importorskip("transformers")
    text = "".join(wikitext_split(split) for split in ("train", "valid", "test")) * 3
    raw = train_byte_level_bpe([text])
    raw.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path, chunk_chars=40)
    chunks = tokenizer._chunks(text)
    assert len(chunks) > 20 and "".join(chunks) == text
    assert all(chunk.endswith("\n") for chunk in chunks[:-1])
    whole = raw.encode(text).ids
    assert tokenizer.encode(text) == whole
    assert tokenizer.encode_tensor(text, batch=3).tolist() == whole
    # cutting at every newline would not be exact: " \n \n" is one byte-level piece
    naive = [i for line in io.StringIO(text) for i in raw.encode(line).ids]
    assert naive != whole


def test_tokenizer_that_cannot_be_chunked_is_encoded_whole(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, trainers

    text = wikitext_split("train") * 4
    # Llama-2 style: "▁" prepended to every input and no pre-tokenizer, so a chunk that
    # starts with a space gets "▁▁" where the whole text has "▁"
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    raw.train_from_iterator([text], trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path, chunk_chars=40)
    assert not tokenizer.chunkable
    chunks = HFTokenizer._chunks(tokenizer, text)
    assert [i for c in chunks for i in raw.encode(c).ids] != raw.encode(text).ids
    assert tokenizer.encode(text) == raw.encode(text).ids


def test_load_tokenizer_errors_name_the_path_and_what_to_do(tmp_path):
    pytest.importorskip("transformers")
    missing = tmp_path / "no" / "tokenizer"
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(str(missing))
    assert str(missing) in str(error.value) and "save_pretrained" in str(error.value)
    with pytest.raises(TypeError, match="name_or_path must be 'bytes'"):
        load_tokenizer(3)


# ---------------------------------------------------------------- token stream and cache


class CountingTokenizer:
    def __init__(self, name="bytes"):
        self.name, self.vocab_size, self.calls = name, 256, 0

    def encode(self, text):
        self.calls += 1
        return list(text.encode("utf-8"))


def test_token_stream_is_cached_and_the_cache_is_keyed_by_text_and_tokenizer(tmp_path):
    text = wikitext_split("test")
    tokenizer = CountingTokenizer()
    first = token_stream(text, tokenizer, cache_dir=tmp_path / "cache")
    assert first.dtype == torch.int64 and first.shape == (len(text.encode()),)
    assert first.tolist() == list(text.encode())
    again = token_stream(text, tokenizer, cache_dir=tmp_path / "cache")
    assert tokenizer.calls == 1 and again.dtype == torch.int64 and torch.equal(again, first)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].startswith("tokens-") and files[0].endswith(".pt")
    # another text, another tokenizer name: other files, tokenized again
    token_stream(text + "x", tokenizer, cache_dir=tmp_path / "cache")
    token_stream(text, CountingTokenizer("other"), cache_dir=tmp_path / "cache")
    assert tokenizer.calls == 2 and len(list((tmp_path / "cache").iterdir())) == 3
    # without a cache it tokenizes each time, with the ByteTokenizer's fast path too
    assert torch.equal(token_stream(text, tokenizer), first) and tokenizer.calls == 3
    assert torch.equal(token_stream(text, ByteTokenizer()), first)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(tmp_path, damage):
    text = wikitext_split("valid")
    tokenizer = CountingTokenizer()
    expected = token_stream(text, tokenizer, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a readable cache of another text under this name
        token_stream("another text", tokenizer, cache_dir=tmp_path / "elsewhere")
        (other,) = (tmp_path / "elsewhere").iterdir()
        path.write_bytes(other.read_bytes())
    calls = tokenizer.calls
    with pytest.warns(UserWarning, match="ignoring unreadable token cache"):
        assert torch.equal(token_stream(text, tokenizer, cache_dir=tmp_path), expected)
    assert tokenizer.calls == calls + 1
    assert torch.equal(token_stream(text, tokenizer, cache_dir=tmp_path), expected)
    assert tokenizer.calls == calls + 1  # the rewritten file is read back
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_token_stream_rejects_bad_inputs():
    with pytest.raises(TypeError, match="text must be a str"):
        token_stream(b"x", ByteTokenizer())
    with pytest.raises(TypeError, match="missing"):
        token_stream("x", object())
    bad = CountingTokenizer()
    bad.vocab_size = 100
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=100\)"):
        token_stream("é", bad)


# ---------------------------------------------------------------- training blocks


def test_lm_blocks_are_disjoint_blocks_without_the_tail():
    stream = torch.arange(23)
    blocks = LMBlocks(stream, 5)
    assert len(blocks) == 4
    assert [blocks[i].tolist() for i in range(4)] == [
        list(range(5 * i, 5 * i + 5)) for i in range(4)
    ]
    assert blocks[-1].tolist() == [15, 16, 17, 18, 19]
    assert blocks[0].dtype == torch.int64 and blocks[0].shape == (5,)
    batch = next(iter(torch.utils.data.DataLoader(blocks, batch_size=3)))
    assert batch.shape == (3, 5) and batch.dtype == torch.int64
    assert len(LMBlocks(torch.arange(20, dtype=torch.int32), 5)) == 4
    with pytest.raises(IndexError):
        blocks[4]
    with pytest.raises(ValueError, match="block_size=30 is longer than the stream"):
        LMBlocks(stream, 30)
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        LMBlocks(stream, 0)
    with pytest.raises(TypeError, match="integer"):
        LMBlocks(stream.float(), 5)
    with pytest.raises(ValueError, match="1-D"):
        LMBlocks(stream[:20].view(4, 5), 5)


# ---------------------------------------------------------------- strided perplexity


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # a wide initialization makes the predictions depend strongly on the context, so a
    # window that gives a token the wrong context changes the result
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64, initializer_range=0.5
    )
    return transformers.GPT2LMHeadModel(config)


def window_starts_and_ends(length, max_length, stride):
    spans = []
    for begin in range(0, length, stride):
        spans.append((begin, min(begin + max_length, length)))
        if spans[-1][1] == length:
            return spans


def brute_force_nll(model, stream, max_length, stride):
    """Each token scored alone, on the context its window gives it: the first window that
    reaches the token, from that window's start up to the token before it."""
    model.eval()
    spans = window_starts_and_ends(len(stream), max_length, stride)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(stream)):
            begin = next(begin for begin, end in spans if end > t)
            if begin == t:
                continue  # nothing before it in its window
            logits = model(stream[begin:t][None]).logits[0, -1].double()
            total -= torch.log_softmax(logits, -1)[stream[t]].item()
            count += 1
    return total, count


STREAM = ByteTokenizer().encode_tensor(wikitext_split("test"))


@pytest.mark.parametrize(
    "max_length, stride, length, batch_size",
    [
        (16, 5, 47, 1),  # overlapping windows, length not a multiple of the stride
        (16, 5, 47, 3),
        (16, 16, 50, 2),  # disjoint windows
        (16, 16, 49, 1),  # the last window is a single token with nothing to score
        (16, 7, 16, 1),  # one window covers the stream
    ],
)
def test_strided_perplexity_equals_a_brute_force_token_loop(max_length, stride, length, batch_size):
    model = tiny_gpt2()
    stream = STREAM[:length]
    model.train()  # dropout on: the evaluation must switch it off and restore the mode
    result = strided_perplexity(model, stream, max_length, stride, batch_size=batch_size)
    assert model.training
    total, count = brute_force_nll(model, stream, max_length, stride)
    windows = len(window_starts_and_ends(length, max_length, stride))
    assert count == (length - 1 if stride < max_length else length - windows)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5, abs=0)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5, abs=0)
    if length > max_length:
        # the window's context matters: all-preceding-token context gives another value
        full_total, _ = brute_force_nll(model, stream, len(stream), len(stream))
        assert abs(full_total - total) / count > 1e-3


def test_single_window_matches_the_models_own_loss_and_plain_logits_work():
    model = tiny_gpt2().eval()
    stream = STREAM[:32]
    result = strided_perplexity(model, stream, max_length=32, stride=32)
    reference = model(stream[None], labels=stream[None]).loss.item()
    assert result["tokens"] == 31 and not model.training
    assert result["nll"] == pytest.approx(reference, rel=1e-5)

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids).logits

    assert strided_perplexity(LogitsOnly(model), stream, 32, 32, device="cpu") == result


def test_strided_perplexity_rejects_bad_arguments():
    model = tiny_gpt2()
    stream = STREAM[:40]
    with pytest.raises(ValueError, match=r"stride must be in \[1, max_length=16\], got 17"):
        strided_perplexity(model, stream, 16, 17)
    with pytest.raises(ValueError, match="stride must be an int >= 1, got 0"):
        strided_perplexity(model, stream, 16, 0)
    with pytest.raises(TypeError, match="stride must be an int"):
        strided_perplexity(model, stream, 16, 4.0)
    with pytest.raises(ValueError, match="max_length must be an int >= 2, got 1"):
        strided_perplexity(model, stream, 1, 1)
    with pytest.raises(TypeError, match="batch_size must be an int >= 1, got True"):
        strided_perplexity(model, stream, 16, 8, batch_size=True)
    with pytest.raises(ValueError, match="at least 2 tokens, got 1"):
        strided_perplexity(model, stream[:1], 16, 8)
    with pytest.raises(TypeError, match=r"dtype torch\.float32"):
        strided_perplexity(model, stream.float(), 16, 8)
    with pytest.raises(ValueError, match=r"1-D \(T,\), got shape \(4, 10\)"):
        strided_perplexity(model, stream.view(4, 10), 16, 8)
