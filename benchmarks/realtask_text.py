"""T2 of the real-task suite (benchmarks/realtasks.py): from scratch, language.

The corpus is the running Python's own standard library: every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]`` (site-packages and ``pydoc_data``, which is prose, left
out), read as bytes: about 30 MB of real code and comments that nobody here wrote. Whole
top-level modules are held out for validation (those whose name's CRC-32 is 0 mod 10,
about a tenth of the modules), so the score is on unseen files. The exact bytes depend on
the Python version, which the results record.

A byte-level GPT-style model (:class:`gblr.recipes.models.CausalTransformer`: dim 96, 4
blocks, 4 heads, MLP ratio 4, context 64) trained with the library's engine (AdamW over
``gblr.param_groups``, lr 2e-3, weight decay 0.05, warm-up over the first tenth, cosine
decay, batch 32 windows); the blocks' linear layers (qkv, proj, fc1, fc2) are dense, GBLR or
a baseline family at the budget, embeddings and the tied head stay dense. Score: perplexity
per byte on 512 windows spread evenly over the held-out modules.
"""

from __future__ import annotations

import functools
import logging
import math
import sysconfig
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

from realtask_options import scratch_options

STEPS = 600
QUICK_STEPS = 3
LR = 2e-3
CONTEXT = 64
DIM = 96
BATCH = 32
EVAL_WINDOWS = 512
HELD_OUT_MODULUS = 10


def stdlib_files() -> dict[str, list[Path]]:
    """``{"train": [...], "validation": [...]}``: the standard library's source files,
    split by top-level module (a package and its files stay on one side)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    split: dict[str, list[Path]] = {"train": [], "validation": []}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if "site-packages" in relative.parts or relative.parts[0] == "pydoc_data":
            continue
        module = relative.parts[0].removesuffix(".py")
        held_out = zlib.crc32(module.encode()) % HELD_OUT_MODULUS == 0
        split["validation" if held_out else "train"].append(path)
    return split


@functools.cache
def _streams() -> tuple[Any, Any]:
    import numpy as np
    import torch

    streams = []
    for paths in stdlib_files().values():
        data = b"\n".join(path.read_bytes() for path in paths)
        streams.append(torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64)))
    return streams[0], streams[1]


def _validation_windows(stream, count: int, length: int):
    import torch

    starts = torch.linspace(0, len(stream) - length - 1, count).long()
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def run_t2(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    """One run; returns ``perplexity`` (per byte, held-out modules), ``macs_ratio``,
    ``seconds``."""
    import torch

    from gblr.recipes.engine import EngineConfig, train_language_model
    from gblr.recipes.models import CausalTransformer, structure_model
    from gblr.recipes.text import LMBlocks

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    train_stream, validation_stream = _streams()
    steps = QUICK_STEPS if quick else STEPS
    variant = scratch_options(options, budget, "T2")
    if variant.probe is not None:
        raise ValueError("the start probe (option 'probe') is for T1's classifiers only, not T2")
    torch.manual_seed(seed)
    model = CausalTransformer(vocab_size=256, context=CONTEXT, dim=DIM, depth=4, heads=4)
    structure_model(
        model,
        structure,
        variant.start_cost if structure == "gblr" else budget,
        seed=seed,
        **variant.structure,
    )
    blocks = LMBlocks(train_stream, block_size=CONTEXT)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = EngineConfig(
            steps=steps,
            batch_size=BATCH,
            lr=LR,
            warmup_steps=steps // 10,
            budget=budget,
            learner=variant.learner,
            out_dir=folder,
            seed=seed,
            progress=False,
            logger=None,
            trainer={"accelerator": "cpu"},
            **variant.engine,
        )
        result = train_language_model(model, blocks, None, config)
    windows = _validation_windows(validation_stream, 16 if quick else EVAL_WINDOWS, CONTEXT)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in windows.split(64):
            logits = model(batch)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, 256), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
    loss = total / (windows.shape[0] * (CONTEXT - 1))
    return {
        "perplexity": math.exp(loss),
        "bits_per_byte": loss / math.log(2),
        "macs_ratio": result["macs_ratio"],
        "seconds": result["seconds"],
        "steps": steps,
        "train_bytes": len(train_stream),
        "validation_bytes": len(validation_stream),
    }
