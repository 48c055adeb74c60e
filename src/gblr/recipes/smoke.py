"""Smoke runs: a config's whole pipeline in seconds, to check a setup before a long run.

``gblr train|finetune|sweep|demo --smoke`` (what Lightning's ``fast_dev_run`` is to a
Trainer): [`smoke_config`][gblr.recipes.smoke.smoke_config] turns a config into a tiny run of the
same model class, data format and structure on stand-in data; the helpers here keep smoke runs and
real runs apart in their folders and reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, config_to_dict, flatten_config
from .run_folder import SMOKE_DATA, refuse_real_folder, smoke_kind, standin_files

__all__ = ["first_samples", "smoke_config", "smoke_kind"]


SMOKE_STEPS = 2
_SMOKE_BATCH = 4
_SMOKE_SEQ_LEN = 32
SMOKE_TEXT_CHARS = 200_000  # of a real corpus: tokenized in well under a second
_SMOKE_CLASSES, _SMOKE_PER_CLASS = 4, 3  # of a stand-in image folder


def first_samples(dataset: Any, count: int) -> Any:
    """The first ``count`` samples of ``dataset`` (all of it when it has no more; None
    stays None): what a smoke run reads of real data.

    Examples:
        >>> from gblr.recipes.smoke import first_samples
        >>> len(first_samples(list(range(10)), 3)), len(first_samples(list(range(2)), 3))
        (3, 2)
    """
    if dataset is None or len(dataset) <= count:
        return dataset
    return torch.utils.data.Subset(dataset, range(count))


def _real_data(config: TrainConfig) -> bool:
    """Whether the data of ``config`` is on disk (smoke runs download nothing)."""
    data = config.data
    if data.name == "digits":
        return True  # embedded in scikit-learn
    if data.root is None:
        return False
    root = Path(data.root).expanduser()
    if data.name == "cifar10":
        folder = root / "cifar-10-batches-py"
        names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        return all((folder / name).is_file() for name in names)
    if data.name == "cifar100":
        return all((root / "cifar-100-python" / name).is_file() for name in ("train", "test"))
    if data.name in ("imagenet", "folder"):
        if data.name == "imagenet":
            folders = [root / "train", root / "val"]
        else:  # without val_root the run fails as the real one would
            folders = [root, *([Path(data.val_root).expanduser()] if data.val_root else [])]
        return all(f.is_dir() and any(c.is_dir() for c in f.iterdir()) for f in folders)
    if data.name == "wikitext103":
        return any((d / "wiki.train.raw").is_file() for d in (root, root / "wikitext-103-raw"))
    return all((root / f"{split}.txt").is_file() for split in ("train", "valid", "test"))


def _standin_text(rng: Any, chars: int) -> list[str]:
    """Lines of made-up sentences in WikiText's raw format (headings, spaced punctuation)."""
    words = [
        *("the", "of", "and", "in", "to", "a", "was", "is", "for", "on", "as", "by"),
        *("with", "he", "at", "from", "that", "his", "it", "an", "were", "which", "this"),
        *("be", "also", "first", "has", "one", "two", "new", "after", "game", "city", "river"),
    ]
    lines, size, article = [" \n"], 0, 0
    while size < chars:
        article += 1
        lines += [f" = Article {article} = \n", " \n"]
        for _ in range(3):
            sentence = " ".join(rng.choice(words, size=int(rng.integers(8, 20))))
            lines += [f" {sentence.capitalize()} , {sentence} . \n", " \n"]
        size = sum(len(line) for line in lines)
    return lines


def _write_standin(config: TrainConfig, root: Path) -> str:
    """Write stand-in data for ``config.data`` in its on-disk format at ``root``; returns
    what it wrote."""
    import numpy as np

    data = config.data
    rng = np.random.default_rng(config.seed)
    # the previous smoke run's stand-in is written afresh, never mixed; only its files go
    for path in standin_files(root.parent):
        path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    if data.name in ("cifar10", "cifar100"):
        import pickle

        classes = 10 if data.name == "cifar10" else 100
        if classes == 10:
            folder, key = root / "cifar-10-batches-py", "labels"
            names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
        else:
            folder, key, names = root / "cifar-100-python", "fine_labels", ["train", "test"]
        folder.mkdir(exist_ok=True)
        per_file = 8
        for name in names:
            batch = {
                "data": rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8),
                key: rng.integers(0, classes, size=per_file).tolist(),
            }
            with open(folder / name, "wb") as handle:
                pickle.dump(batch, handle)
        return f"{per_file * len(names)} random images in the official python-pickle files"
    if data.name in ("imagenet", "folder"):
        from PIL import Image

        for split in ("train", "val"):
            for label in range(_SMOKE_CLASSES):
                folder = root / split / f"n{label:08d}"
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(_SMOKE_PER_CLASS):
                    pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{k}.png")
        count = 2 * _SMOKE_CLASSES * _SMOKE_PER_CLASS
        return f"{count} random PNG images in train/ and val/ class folders"
    for split, chars in (("train", 6000), ("valid", 1000), ("test", 1000)):
        name = f"wiki.{split}.raw" if data.name == "wikitext103" else f"{split}.txt"
        (root / name).write_text("".join(_standin_text(rng, chars)), encoding="utf-8")
    return (
        "made-up sentences in the raw release's format"
        if data.name == "wikitext103"
        else ("made-up sentences in train.txt, valid.txt and test.txt")
    )


def _causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _hf_cached(repo: str, filename: str) -> str | None:
    """A file of a Hub repository when it is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename)
    except Exception:  # not a valid repository name, or no huggingface_hub: not cached
        return None
    return found if isinstance(found, str) else None


def _hf_model_type(source: str) -> tuple[str, str]:
    """``(model type, how it was found)`` of a Hugging Face causal LM, without the network."""
    import re

    local = Path(source).expanduser() / "config.json"
    config_file = str(local) if local.is_file() else _hf_cached(source, "config.json")
    if config_file is not None:
        model_type = json.loads(Path(config_file).read_text(encoding="utf-8")).get("model_type")
        if model_type:
            return model_type, f"the model type in {config_file}"
    types_ = _causal_lm_types()
    if source in types_:
        return source, "model.source names it"
    # A hub name usually names its architecture ("Graphcore/gpt2-wikitext-103"): the
    # longest run of its words that spells a causal-LM model type
    words = re.split(r"[-_.]", source.rsplit("/", 1)[-1].lower())
    known = {t.replace("_", "").replace("-", ""): t for t in types_}
    runs = ["".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)]
    matches = sorted((r for r in runs if r in known), key=len, reverse=True)
    if not matches:
        raise ValueError(
            f"model.source={source!r}: a smoke run builds a tiny random model of its type "
            "without downloading, but the type is neither in a local config.json, nor in the "
            "Hugging Face cache, nor in the name; give it as model.source=TYPE (e.g. gpt2)"
        )
    return known[matches[0]], "read from the name"


def _tiny_hf_kwargs(model_type: str, vocab_size: int, positions: int) -> dict[str, Any]:
    import transformers

    defaults = transformers.AutoConfig.for_model(model_type)
    wanted = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 64,
        "max_position_embeddings": positions,
        "vocab_size": vocab_size,
    }
    kwargs = {key: value for key, value in wanted.items() if hasattr(defaults, key)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(defaults, key, None)
        if isinstance(value, int) and value >= vocab_size:
            kwargs[key] = None  # the pretrained vocabulary's ids do not exist in the small one
    return kwargs


def _first_block(config: TrainConfig) -> list[str]:
    """The structured layers of ``config`` in the first block (parent module) holding one."""
    import fnmatch

    from ..compress.convert import convertible_kind
    from .build import build_model, data_shape

    in_chans, num_classes = data_shape(config)
    model = build_model(config, in_chans, num_classes)

    def patterns(value: str | list[str] | None) -> list[str]:
        listed = [value] if isinstance(value, str) else list(value or [])
        return [q for p in listed for q in (p, f"{p}.*")]

    include, exclude = patterns(config.structure.include), patterns(config.structure.exclude)
    names = [
        name
        for name, module in model.named_modules()
        if convertible_kind(module) is not None
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    if not names:
        return []
    parent = names[0].rpartition(".")[0]
    return [name for name in names if name.rpartition(".")[0] == parent]


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def smoke_config(
    config: TrainConfig, steps: int = SMOKE_STEPS, data_dir: str | Path | None = None
) -> tuple[TrainConfig, list[str]]:
    """A smoke run of ``config``: its whole pipeline in seconds, to check a setup before
    a long run (what Lightning's ``fast_dev_run`` is to a Trainer).

    The run keeps the config's model family and class, structure (kind, budget, layers,
    search), data pipeline and format, loggers and run folder, and changes:

    - the model: a tiny one of the same class, randomly initialised (nothing is
      downloaded); for models that cannot be made smaller (torchvision's), 32-pixel
      images and, with a structure search, only the first block's layers searched;
    - the data: the real data when it is on disk (only its first samples are read),
      else stand-in data in the same on-disk format written under ``data_dir``; a Hub
      tokenizer is used from the local cache, else ``bytes``;
    - the run: ``steps`` optimizer steps at batch 4, schedules scaled to them, one
      validation at the end when the config validates; 1 CPU process, 32-bit,
      no data-loading workers.

    The run is marked ``smoke: true`` (``config.yaml``, ``results.json``, a banner on
    ``REPORT.md``). It refuses a folder holding a real run; a real run started in a smoke
    run's folder first removes the smoke run's files.

    Args:
        config: from [`gblr.recipes.config.load_config`][].
        steps: optimizer steps (default 2).
        data_dir: where stand-in data goes (default ``<out>/smoke-data``).

    Returns:
        ``(smoke config, notes)``: the notes say, one line each, what was changed and why.

    Raises:
        ValueError: ``steps`` is not a positive integer, ``data_dir`` lies in a real
            run's folder, or a Hugging Face model's type cannot be found offline.

    Examples:
        The multi-GPU CIFAR recipe, where no CIFAR-10 is on disk:

        >>> import tempfile
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.smoke import smoke_config
        >>> folder = tempfile.mkdtemp()
        >>> overrides = [f"data.root={folder}/cifar", "trainer.devices=8", f"out={folder}/run"]
        >>> config = load_config("cifar10-vit-s-gblr", overrides)
        >>> smoke, notes = smoke_config(config)
        >>> smoke.smoke, smoke.optim.steps, smoke.trainer.devices, smoke.model.dim
        (True, 2, 1, 16)
        >>> smoke.model.name, smoke.structure.budget, smoke.data.name, smoke.data.root[-18:]
        ('vit', 0.0667, 'cifar10', 'smoke-data/cifar10')
        >>> [note for note in notes if "trainer.devices" in note]
        ['  trainer.devices: 8 -> 1']
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    from .config import config_from_dict

    folder = Path(config.out).expanduser()
    data_dir = Path(data_dir if data_dir is not None else folder / SMOKE_DATA).expanduser()
    data_dir = data_dir.resolve()
    refuse_real_folder(data_dir.parent)
    smoke = config_from_dict(config_to_dict(config))  # a copy
    smoke.smoke = True
    notes = [
        f"smoke run: {steps} steps of a tiny stand-in on 1 CPU process, to check the setup "
        "(its numbers are not results). Changed:"
    ]
    m, s, data = smoke.model, smoke.structure, smoke.data
    why: list[str] = []
    if m.name in ("vit", "mixer"):
        m.dim, m.depth = 16, 1
        if m.name == "vit":
            m.heads = 2
    elif m.name == "timm":
        import timm

        if not timm.is_model(m.source):
            raise ValueError(
                f"model.source={m.source!r} is not a timm architecture name; a smoke run "
                "builds the architecture without downloading: give model.source=NAME"
            )
        m.pretrained, m.image_size = False, min(m.image_size, 32)
        family = timm.models.model_entrypoint(m.source).__module__.rsplit(".", 1)[-1]
        if family in ("vision_transformer", "deit"):
            m.kwargs = {**m.kwargs, "img_size": m.image_size, "embed_dim": 32, "depth": 2}
            m.kwargs["num_heads"] = 2
    elif m.name == "torchvision":
        m.pretrained, m.image_size = False, min(m.image_size, 32)
    if m.name == "hf-causal-lm":
        from .text import load_tokenizer

        model_type, found = _hf_model_type(m.source)
        if model_type != m.source:
            why.append(f"model type {model_type!r}: {found}")
        tokenizer = data.tokenizer
        if tokenizer != "bytes" and not Path(tokenizer).expanduser().exists():
            cached = _hf_cached(tokenizer, "tokenizer.json")
            data.tokenizer = cached or "bytes"
            where = "from the Hugging Face cache" if cached else "not in the Hugging Face cache"
            why.append(f"tokenizer {tokenizer!r} {where} (smoke runs download nothing)")
        seq_len = min(data.seq_len, _SMOKE_SEQ_LEN)
        if data.eval_stride is not None:
            data.eval_stride = max(1, round(data.eval_stride * seq_len / data.seq_len))
        data.seq_len = seq_len
        vocab = load_tokenizer(data.tokenizer).vocab_size
        m.source, m.pretrained = model_type, False
        m.kwargs = _tiny_hf_kwargs(model_type, vocab, seq_len)
    if _real_data(smoke):
        why.append(f"data: the real {data.name} data, its first samples only")
    else:
        where = data.root or "the Hugging Face hub (not downloaded in a smoke run)"
        root = data_dir / data.name
        wrote = _write_standin(smoke, root)
        data.root, data.download = str(root), False
        if data.name == "folder":
            data.root, data.val_root = str(root / "train"), str(root / "val")
        why.append(f"data: no {data.name} data at {where}; stand-in at {root}: {wrote}")
    if s.init == "search":
        s.search_steps = 0
        if m.name == "torchvision" or (m.name == "timm" and "depth" not in m.kwargs):
            first = _first_block(smoke)
            if first:
                s.include = first
                why.append("structure: searching every layer of this model takes minutes")
    optim, learner, trainer = smoke.optim, smoke.learner, smoke.trainer
    scale = steps / (optim.epochs if optim.epochs is not None else optim.steps)
    validates = trainer.val_every is not None or optim.epochs is not None
    optim.epochs, optim.steps = None, steps
    optim.batch_size = min(optim.batch_size, _SMOKE_BATCH)
    optim.warmup *= scale  # durations are in run units: now steps
    learner.sigma_start *= scale
    if learner.budget_ramp is not None:
        learner.budget_ramp *= scale
    trainer.accelerator, trainer.devices, trainer.num_nodes = "cpu", 1, 1
    trainer.strategy, trainer.precision = "auto", "32-true"
    trainer.compile = None  # compiling takes longer than a smoke run, on a CPU
    trainer.log_every_n_steps, trainer.checkpoint_every_n_steps = 1, steps
    trainer.val_every = float(steps) if validates else None
    data.num_workers = 0
    smoke = config_from_dict(config_to_dict(smoke))  # checked like any config
    before = flatten_config(config_to_dict(config))
    after = flatten_config(config_to_dict(smoke))
    for key, value in after.items():
        if key != "smoke" and before.get(key) != value:
            notes.append(f"  {key}: {_shown(before.get(key))} -> {_shown(value)}")
    notes += [f"  ({reason})" for reason in why]
    return smoke, notes
