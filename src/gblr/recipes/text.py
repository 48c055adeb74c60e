"""Language-modelling data: WikiText and local text, tokenizers, a cached token stream,
training blocks, and the standard strided perplexity evaluation."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = [
    "WIKITEXT_SPLITS",
    "WIKITEXT_VARIANTS",
    "ByteTokenizer",
    "HFTokenizer",
    "LMBlocks",
    "Tokenizer",
    "load_tokenizer",
    "read_text_files",
    "read_wikitext",
    "strided_perplexity",
    "token_stream",
]

# variant -> (folder of the official zip, file extension of the split files)
WIKITEXT_VARIANTS = {
    "wikitext-103-raw-v1": ("wikitext-103-raw", "raw"),
    "wikitext-103-v1": ("wikitext-103", "tokens"),
    "wikitext-2-raw-v1": ("wikitext-2-raw", "raw"),
    "wikitext-2-v1": ("wikitext-2", "tokens"),
}
# accepted split name -> (name in the official files, name in `datasets`)
WIKITEXT_SPLITS = {
    "train": ("train", "train"),
    "validation": ("valid", "validation"),
    "valid": ("valid", "validation"),
    "test": ("test", "test"),
}
_HF_HINT = "pip install 'gblr[hf]'"


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer: ``encode``, ``vocab_size`` and a ``name``
    that identifies its mapping from text to ids (it keys the token cache).

    Examples:
        >>> from gblr.recipes.text import Tokenizer, load_tokenizer
        >>> isinstance(load_tokenizer("bytes"), Tokenizer)
        True
    """

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


def _check_text(text: Any, argument: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{argument} must be a str, got {type(text).__name__}")
    return text


def _check_int(value: Any, argument: str, minimum: int) -> int:
    # bool is an int subclass, but True as a length is always a mistake
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{argument} must be an int >= {minimum}, got {value!r}")
    return value


class ByteTokenizer:
    """Byte-level tokenizer: the ids of a text are its UTF-8 bytes (vocabulary of 256).

    Needs no download and no training; meant for tests and for users without a
    tokenizer. ``eos_id`` (a byte value in [0, 255], e.g. 0, which never occurs in text)
    is only recorded for callers that want an end-of-text id; ``encode`` never adds it.

    Examples:
        >>> from gblr.recipes.text import ByteTokenizer
        >>> tokenizer = ByteTokenizer(eos_id=0)
        >>> tokenizer.encode("hi!"), tokenizer.vocab_size, tokenizer.name
        ([104, 105, 33], 256, 'bytes')
        >>> tokenizer.decode([104, 105]), tokenizer.encode_tensor("hi").shape
        ('hi', torch.Size([2]))
    """

    vocab_size = 256
    name = "bytes"

    def __init__(self, eos_id: int | None = None) -> None:
        if eos_id is not None:
            if isinstance(eos_id, bool) or not isinstance(eos_id, int):
                raise TypeError(f"eos_id must be None or an int in [0, 255], got {eos_id!r}")
            if not 0 <= eos_id < 256:
                raise ValueError(f"eos_id must be None or an int in [0, 255], got {eos_id!r}")
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as a list of ids in [0, 255]."""
        return list(_check_text(text).encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """``encode`` as an int64 tensor ``(T,)``, without a Python list in between (a
        list of 500 M ints would take tens of GB)."""
        data = bytearray(_check_text(text).encode("utf-8"))
        if not data:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of byte ids; invalid UTF-8 (possible in generated ids) becomes U+FFFD."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(eos_id={self.eos_id!r})"


# A chunk boundary: a newline followed by a space and a non-space, i.e. the start of every
# line of the WikiText raw files (" = Title = ", " Text ..."). For GPT-2's byte-level
# pre-tokenizer (regex `\s+(?!\S)` then ` ?\S...`) a word's single leading space always
# starts a new piece and the whitespace before it ends at the newline, so no piece crosses
# such a boundary and BPE (which never merges across pieces) gives the same ids either way.
_CUT = re.compile(r"\n(?= \S)")
# Pairs cut at such a boundary; a tokenizer is chunked only if each encodes the same as
# its two halves (a SentencePiece-style tokenizer that prepends "▁" to its input does not).
_PROBES = (
    ("Hello world.\n", " Next line"),
    (" = Title = \n \n", " = = Section = = \n"),
    ("a  \n", " 1 @,@ 000"),
    ("é ü\n", " ñ 中文"),
    ("tab\t\n", " x"),
    ("end\n", " 's"),
)


class HFTokenizer:
    """A Hugging Face tokenizer with the pipeline's interface.

    ``encode(text)`` returns exactly ``tokenizer(text, add_special_tokens=False)``'s
    ``input_ids``, without the "sequence longer than the model's maximum" warning (the
    stream is cut into windows later). A long text is encoded in chunks of about
    ``chunk_chars`` characters cut at line starts (a newline followed by a space and a
    non-space, as every line of the WikiText raw files), in batches, which keeps memory
    and time linear for a 500 MB split. Chunking is used only when the tokenizer encodes
    a set of probe texts cut at such points the same as whole (true for GPT-2's
    byte-level BPE); otherwise the text is encoded in one call.

    ``name`` is ``hf:<name_or_path>#<hash of the tokenizer's serialized vocabulary and
    rules>``, so a retrained tokenizer at the same path does not reuse stale caches.

    Examples:
        A toy word-level tokenizer built in memory (no download):

        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> from gblr.recipes.text import HFTokenizer
        >>> vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}
        >>> core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        >>> core.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=core), "toy")
        >>> tokenizer.encode("the cat sat"), tokenizer.vocab_size, tokenizer.name[:7]
        ([1, 2, 3], 4, 'hf:toy#')
        >>> tokenizer.encode_tensor("the cat").tolist(), tokenizer.decode([1, 2])
        ([1, 2], 'the cat')
    """

    def __init__(self, tokenizer: Any, name_or_path: str, chunk_chars: int = 1 << 20) -> None:
        self.tokenizer = tokenizer
        self.chunk_chars = _check_int(chunk_chars, "chunk_chars", 1)
        self.vocab_size = len(tokenizer)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.name = f"hf:{name_or_path}#{self._fingerprint()}"
        self.chunkable = all(
            self._ids([a + b])[0] == self._ids([a])[0] + self._ids([b])[0] for a, b in _PROBES
        )

    def _fingerprint(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            state = backend.to_str()
        else:  # a slow (Python) tokenizer: its vocabulary and class stand for its rules
            vocab = sorted(self.tokenizer.get_vocab().items())
            state = json.dumps([type(self.tokenizer).__name__, vocab], ensure_ascii=False)
        return hashlib.sha256(state.encode("utf-8")).hexdigest()[:16]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer(
            texts, add_special_tokens=False, verbose=False, return_attention_mask=False
        )
        return encoded["input_ids"]

    def _chunks(self, text: str) -> list[str]:
        chunks, start = [], 0
        while len(text) - start > self.chunk_chars:
            cut = _CUT.search(text, start + self.chunk_chars)
            if cut is None:
                break
            chunks.append(text[start : cut.end()])
            start = cut.end()
        chunks.append(text[start:])
        return chunks

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.encode_tensor(text).tolist()

    def encode_tensor(self, text: str, batch: int = 64) -> torch.Tensor:
        """Token ids of ``text`` as an int64 tensor ``(T,)``."""
        _check_text(text)
        chunks = self._chunks(text) if self.chunkable else [text]
        parts = []
        for i in range(0, len(chunks), batch):
            parts.extend(
                np.asarray(ids, dtype=np.int64) for ids in self._ids(chunks[i : i + batch])
            )
        return (
            torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64)
        )

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else can only mean a path on disk
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith(".json")
    )


def load_tokenizer(name_or_path: str | os.PathLike, chunk_chars: int = 1 << 20) -> Tokenizer:
    """The tokenizer for a recipe.

    ``"bytes"`` gives a [`ByteTokenizer`][gblr.recipes.text.ByteTokenizer]. Anything else is loaded
    with ``transformers.AutoTokenizer.from_pretrained`` (extra ``[hf]``) and wrapped in
    [`HFTokenizer`][gblr.recipes.text.HFTokenizer]: a Hub name (``"gpt2"``, downloaded once on a
    machine with internet access, then cached by Hugging Face), a local folder (from
    ``save_pretrained``, or holding just a ``tokenizer.json``; works offline), or a
    ``tokenizer.json`` file.

    Examples:
        >>> from gblr.recipes.text import load_tokenizer
        >>> tokenizer = load_tokenizer("bytes")
        >>> type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.encode("ok")
        ('ByteTokenizer', 256, [111, 107])
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(
            "name_or_path must be 'bytes', a Hugging Face tokenizer name or a local folder, "
            f"got {name_or_path!r}"
        )
    if name_or_path == "bytes":
        return ByteTokenizer()
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"tokenizer {name_or_path!r} needs transformers: {_HF_HINT}, or use 'bytes'"
        ) from error
    path = Path(name_or_path).expanduser()
    if path.is_file():
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        return HFTokenizer(tokenizer, str(path), chunk_chars)
    if path.is_dir():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            # older transformers want a config next to a bare tokenizer.json
            if not (path / "tokenizer.json").is_file():
                raise
            tokenizer = transformers.PreTrainedTokenizerFast(
                tokenizer_file=str(path / "tokenizer.json")
            )
        return HFTokenizer(tokenizer, str(path), chunk_chars)
    if _looks_local(name_or_path):
        raise FileNotFoundError(
            f"no tokenizer at {str(path.resolve())!r} (looked for a folder or a tokenizer.json "
            "file). Save one with tokenizer.save_pretrained(folder), train one with the "
            "`tokenizers` library, pass a Hugging Face name such as 'gpt2', or use 'bytes'"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise FileNotFoundError(
            f"could not load tokenizer {name_or_path!r}: it is not a local folder "
            f"({str(path.resolve())!r} does not exist) and the Hugging Face Hub did not "
            "provide it (offline, or no such name). On a machine with internet access run "
            f"transformers.AutoTokenizer.from_pretrained({name_or_path!r})"
            ".save_pretrained(folder) and pass the folder, or use 'bytes'"
        ) from error
    return HFTokenizer(tokenizer, name_or_path, chunk_chars)


def _wikitext_args(split: Any, variant: Any) -> tuple[str, str, str, str]:
    if split not in WIKITEXT_SPLITS:
        raise ValueError(f"split must be one of {sorted(WIKITEXT_SPLITS)}, got {split!r}")
    if variant not in WIKITEXT_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(WIKITEXT_VARIANTS)}, got {variant!r}")
    folder, ext = WIKITEXT_VARIANTS[variant]
    file_split, hf_split = WIKITEXT_SPLITS[split]
    return folder, ext, file_split, hf_split


def read_wikitext(root: str | Path | None, split: str, variant: str = "wikitext-103-raw-v1") -> str:
    """The text of one WikiText split, exactly as in the official release.

    With ``root``: reads ``wiki.{train,valid,test}.raw`` (raw variants) or
    ``wiki.{split}.tokens`` (tokenized variants ``wikitext-103-v1``, ``wikitext-2-v1``)
    from ``root`` itself or from the release's folder inside it (``wikitext-103-raw/``,
    ``wikitext-103/``, ...), byte for byte. ``split`` is ``train``, ``validation`` (or
    ``valid``) or ``test``.

    With ``root=None``: ``datasets.load_dataset("Salesforce/wikitext", variant)``
    (extra ``[hf]``; downloads once). Its rows are the file's lines with their
    newline, whitespace-only lines stored as ``""``; those are restored as ``" \\n"``,
    the release's blank line, so the result is the file's text.

    Examples:
        A one-line test split written here (the real files come from the official release):

        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.text import read_wikitext
        >>> root = Path(tempfile.mkdtemp())
        >>> try:
        ...     read_wikitext(root, "test")
        ... except FileNotFoundError as error:
        ...     print(type(error).__name__)
        FileNotFoundError
        >>> _ = (root / "wiki.test.raw").write_text(" = Title = ")
        >>> read_wikitext(root, "test")
        ' = Title = '
    """
    folder, ext, file_split, hf_split = _wikitext_args(split, variant)
    if root is None:
        return _wikitext_from_datasets(variant, hf_split)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path or None, got {type(root).__name__}")
    root = Path(root).expanduser()
    name = f"wiki.{file_split}.{ext}"
    candidates = [root / name, root / folder / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_bytes().decode("utf-8")
    other_ext = "tokens" if ext == "raw" else "raw"
    other = [
        v
        for v, (f, e) in WIKITEXT_VARIANTS.items()
        if e == other_ext
        and any((d / f"wiki.{file_split}.{e}").is_file() for d in (root, root / f))
    ]
    hint = f" (found the other release's files there: pass variant={other[0]!r})" if other else ""
    raise FileNotFoundError(
        f"WikiText {variant!r} split {split!r} not found: looked for "
        f"{', '.join(repr(str(c)) for c in candidates)}{hint}. Get the data by unzipping "
        f"the official {folder}-v1.zip into {str(root)!r}, or pass root=None to load it with "
        f"the `datasets` library ({_HF_HINT}; downloads once)"
    )


def _wikitext_from_datasets(variant: str, split: str) -> str:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"reading WikiText without a local copy needs the `datasets` library: {_HF_HINT}, "
            "or pass root= a folder holding the official wiki.*.raw files"
        ) from error
    rows = datasets.load_dataset("Salesforce/wikitext", variant, split=split)["text"]
    return "".join(row if row else " \n" for row in rows)


def read_text_files(paths: str | Path | Sequence[str | Path]) -> str:
    """The text of local UTF-8 files, read byte for byte and concatenated in the given
    order; a ``"\\n"`` is put between two files only where the first does not end with
    one, so a file's last line never runs into the next file's first.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.text import read_text_files
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.txt").write_text("first"), (folder / "b.txt").write_text("second")
        >>> read_text_files([folder / "a.txt", folder / "b.txt"]).splitlines()
        ['first', 'second']
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Sequence) or not paths:
        raise ValueError(f"paths must be a file path or a non-empty list of them, got {paths!r}")
    texts = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"paths must hold file paths, got {path!r}")
        path = Path(path).expanduser()
        if path.is_dir():
            raise ValueError(f"paths must name text files, got the folder {str(path)!r}")
        if not path.is_file():
            raise FileNotFoundError(
                f"text file {str(path.resolve())!r} not found; pass existing UTF-8 text files"
            )
        texts.append(path.read_bytes().decode("utf-8"))
    joined = texts[0]
    for text in texts[1:]:
        joined += text if not joined or joined.endswith("\n") else "\n" + text
    return joined


_CACHE_VERSION = 1


def _cache_key(text: str, tokenizer: Tokenizer) -> dict:
    return {
        "version": _CACHE_VERSION,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "text_chars": len(text),
        "tokenizer": str(tokenizer.name),
        "vocab_size": int(tokenizer.vocab_size),
    }


def _load_cache(path: Path, key: dict) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        ids = saved["ids"]
        if saved["key"] != json.dumps(key, sort_keys=True):
            raise ValueError("key does not match")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() != saved["n"]:
            raise ValueError("malformed ids")
        return ids.to(torch.int64)
    except Exception as error:  # any damage means: tokenize again and overwrite
        warnings.warn(
            f"ignoring unreadable token cache {str(path)!r} ({error}); rewriting it",
            stacklevel=3,
        )
        return None


def _save_cache(path: Path, key: dict, ids: torch.Tensor) -> None:
    from ..files import save_atomically

    # int32 halves the file; ids of every real vocabulary fit
    stored = ids.to(torch.int32) if int(key["vocab_size"]) <= 2**31 - 1 else ids
    payload = {"key": json.dumps(key, sort_keys=True), "n": ids.numel(), "ids": stored}
    # a reader (or a crash) never sees a half-written file under the final name
    save_atomically(lambda handle: torch.save(payload, handle), path)


def token_stream(
    text: str, tokenizer: Tokenizer, cache_dir: str | Path | None = None
) -> torch.Tensor:
    """The whole ``text`` tokenized as one stream: int64 tensor ``(T,)``.

    Uses ``tokenizer.encode_tensor`` when it has one
    ([`ByteTokenizer`][gblr.recipes.text.ByteTokenizer],
    [`HFTokenizer`][gblr.recipes.text.HFTokenizer]), else ``encode``. With ``cache_dir``, the ids
    are kept in ``cache_dir/tokens-<hash>.pt``, keyed by the SHA-256 of the text's UTF-8 bytes, its
    length, the tokenizer's ``name`` and ``vocab_size`` and a format version; the file is written
    atomically, and an unreadable or mismatched file is ignored (with a warning) and rewritten.

    Examples:
        >>> import tempfile
        >>> from gblr.recipes.text import load_tokenizer, token_stream
        >>> cache = tempfile.mkdtemp()
        >>> stream = token_stream("hello world", load_tokenizer("bytes"), cache_dir=cache)
        >>> stream.shape, stream.dtype, stream[:3].tolist()
        (torch.Size([11]), torch.int64, [104, 101, 108])
        >>> import os; [name.startswith("tokens-") for name in os.listdir(cache)]
        [True]
    """
    _check_text(text)
    missing = [a for a in ("encode", "name", "vocab_size") if not hasattr(tokenizer, a)]
    if missing:
        raise TypeError(
            f"tokenizer must have encode(text), name and vocab_size (missing {missing}); "
            "use load_tokenizer(...) or ByteTokenizer()"
        )
    path = key = None
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a folder path or None, got {cache_dir!r}")
        folder = Path(cache_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        key = _cache_key(text, tokenizer)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = folder / f"tokens-{digest}.pt"
        cached = _load_cache(path, key)
        if cached is not None:
            return cached
    if hasattr(tokenizer, "encode_tensor"):
        ids = tokenizer.encode_tensor(text).to(torch.int64)
    else:
        ids = torch.as_tensor(tokenizer.encode(text), dtype=torch.int64).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= int(tokenizer.vocab_size)):
        raise ValueError(
            f"tokenizer {tokenizer.name!r} produced ids outside [0, vocab_size="
            f"{tokenizer.vocab_size}): min {int(ids.min())}, max {int(ids.max())}"
        )
    if path is not None:
        _save_cache(path, key, ids)
    return ids


def _check_stream(stream: Any, minimum: int) -> torch.Tensor:
    if not isinstance(stream, torch.Tensor):
        raise TypeError(f"stream must be a 1-D integer torch.Tensor, got {type(stream).__name__}")
    if stream.dtype in (torch.bool,) or stream.dtype.is_floating_point or stream.is_complex():
        raise TypeError(f"stream must be a 1-D integer torch.Tensor, got dtype {stream.dtype}")
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D (T,), got shape {tuple(stream.shape)}")
    if stream.numel() < minimum:
        raise ValueError(f"stream must hold at least {minimum} tokens, got {stream.numel()}")
    return stream.to(torch.int64)


class LMBlocks(torch.utils.data.Dataset):
    """Non-overlapping training blocks of a token stream.

    Block ``i`` is ``stream[i * block_size : (i + 1) * block_size]``, an int64 tensor
    ``(block_size,)``; the tail shorter than a block is dropped. A block is both input and
    target: the loss shifts it by one (see ``CausalLMModule``).

    Examples:
        >>> import torch
        >>> from gblr.recipes.text import LMBlocks
        >>> blocks = LMBlocks(torch.arange(10), block_size=4)  # the last 2 tokens are dropped
        >>> len(blocks), blocks[1].tolist()
        (2, [4, 5, 6, 7])
    """

    def __init__(self, stream: torch.Tensor, block_size: int) -> None:
        self.block_size = _check_int(block_size, "block_size", 1)
        stream = _check_stream(stream, 0)
        if stream.numel() < block_size:
            raise ValueError(
                f"block_size={block_size} is longer than the stream ({stream.numel()} tokens); "
                "use a smaller block_size or more text"
            )
        self.blocks = stream[: len(stream) // block_size * block_size].view(-1, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"block index {index} out of range for {len(self)} blocks")
        return self.blocks[index]


def _windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window: it reads ``stream[begin:end]`` and scores the
    tokens ``first..end-1``, those after the previous window's end (never ``begin``,
    which has no context inside the window)."""
    windows, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + max_length, length)
        first = max(previous_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        previous_end = end
        if end == length:
            break
    return windows


def strided_perplexity(
    model: nn.Module,
    stream: torch.Tensor,
    max_length: int,
    stride: int,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """Perplexity of a causal LM on a token stream by the standard sliding window.

    The method of Hugging Face's guide "Perplexity of fixed-length models": windows of
    ``max_length`` tokens start every ``stride`` tokens (the last ends at the stream's
    end); each window scores only the tokens the previous window did not reach, with the
    window's earlier tokens as context (the first window scores all but its first token).
    ``stride == max_length`` gives disjoint windows whose first tokens are not scored;
    a smaller stride gives each scored token at least ``max_length - stride`` tokens of
    context and scores every token but the stream's first.

    Args:
        model: ``model(input_ids (N, L))`` returns logits ``(N, L, V)`` or an object with
            ``.logits``. Run in eval mode under ``no_grad``; its mode is restored after.
        stream: int ``(T,)`` token ids, ``T >= 2``.
        max_length: window length (the model's context, 1024 for GPT-2), ``>= 2``.
        stride: in ``[1, max_length]``.
        batch_size: windows per forward pass (equal-length windows only, so no padding).
        device: where to run; default the model's parameters' device.

    Returns:
        ``{"perplexity": exp(nll), "nll": summed negative log-likelihood / tokens,
        "tokens": number of scored tokens}``, token-weighted over the whole stream and
        summed in float64.

    Examples:
        A model that predicts a uniform distribution over 256 tokens has perplexity 256:

        >>> import torch
        >>> from gblr.recipes.text import strided_perplexity
        >>> model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
        >>> _ = torch.nn.init.zeros_(model[1].weight), torch.nn.init.zeros_(model[1].bias)
        >>> stream = torch.randint(0, 256, (50,))
        >>> result = strided_perplexity(model, stream, max_length=16, stride=8)
        >>> round(result["perplexity"], 3), result["tokens"]
        (256.0, 49)
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    max_length = _check_int(max_length, "max_length", 2)
    stride = _check_int(stride, "stride", 1)
    if stride > max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    stream = _check_stream(stream, 2)
    if device is None:
        parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)

    windows = _windows(len(stream), max_length, stride)
    # consecutive windows of the same length share a forward pass (only the last is shorter)
    batches, current = [], []
    for window in windows:
        full = len(current) == batch_size
        if current and (full or window[1] - window[0] != current[0][1] - current[0][0]):
            batches.append(current)
            current = []
        current.append(window)
    batches.append(current)

    total, count = 0.0, 0
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training is not None:
        model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids = torch.stack([stream[b:e] for b, e, _ in batch]).to(device)
                output = model(ids)
                logits = output.logits if hasattr(output, "logits") else output
                for row, (begin, end, first) in enumerate(batch):
                    # logits at position p predict token p + 1
                    scored = logits[row, first - begin - 1 : end - begin - 1].float()
                    targets = ids[row, first - begin : end - begin]
                    nll = nn.functional.cross_entropy(scored, targets, reduction="none")
                    total += nll.double().sum().item()
                    count += end - first
    finally:
        if was_training is not None:
            model.train(was_training)
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}
