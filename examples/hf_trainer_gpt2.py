"""Fine-tune GPT-2 with GBLR weights using Hugging Face's own ``Trainer``.

For users who live in the Hugging Face ecosystem: convert the model's Conv1D layers with
``gblr.convert`` (fitted to the pretrained weights by truncated SVD) and add
``GBLRTrainerCallback``, which keeps the MACs at the budget while the structure is
learned; everything else is a plain ``Trainer`` run. ``gblr finetune --config
wikitext103-gpt2-gblr`` is the same recipe on the Lightning engine.

    python examples/hf_trainer_gpt2.py --model gpt2 --budget 0.333 --train-file train.txt
    python examples/hf_trainer_gpt2.py --smoke     # tiny random GPT-2, offline, seconds

Needs ``pip install "gblr[hf]"``.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

import gblr
from gblr.integrations.hf import GBLRTrainerCallback
from gblr.recipes.text import ByteTokenizer, LMBlocks, strided_perplexity

SMOKE_TEXT = " ".join(
    f"Line {i} of a small corpus : the {['cat', 'dog', 'bird'][i % 3]} sat on the mat ."
    for i in range(200)
)


class Blocks(torch.utils.data.Dataset):
    """``LMBlocks`` as the dicts ``Trainer`` expects (labels = inputs; the model shifts)."""

    def __init__(self, blocks: LMBlocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="a causal LM name or folder")
    parser.add_argument("--train-file", help="plain text to fine-tune on")
    parser.add_argument("--budget", type=float, default=0.333, help="MACs of the blocks")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="tiny offline run (CI)")
    args = parser.parse_args()

    if args.smoke:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64)
        model, tokenizer = GPT2LMHeadModel(config), ByteTokenizer()
        ids = torch.tensor(tokenizer.encode(SMOKE_TEXT))
        args.block_size, args.steps = 32, 20
    else:
        if args.train_file is None:
            parser.error("--train-file is required (or --smoke)")
        model = AutoModelForCausalLM.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        with open(args.train_file, encoding="utf-8") as handle:
            ids = torch.tensor(tokenizer(handle.read())["input_ids"])

    split = int(0.9 * len(ids))
    train, held_out = ids[:split], ids[split:]
    dense = strided_perplexity(model, held_out, args.block_size, args.block_size // 2)
    # fit every Conv1D of the transformer blocks to the budget; the LM head stays dense
    config = gblr.GBLRConfig(budget=args.budget, include="transformer.h.*")
    report = gblr.convert(model, config)
    print(report)
    converted = strided_perplexity(model, held_out, args.block_size, args.block_size // 2)

    learning_rate = 1.5e-3 if args.smoke else 1e-4
    # the paper's settings for widths and locations (no momentum, no weight decay); the
    # Trainer's own AdamW would give them both
    optimizer = torch.optim.AdamW(gblr.param_groups(model, lr=learning_rate))
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(
            model=model,
            optimizers=(optimizer, None),
            args=TrainingArguments(
                output_dir=output_dir,
                max_steps=args.steps,
                per_device_train_batch_size=4 if args.smoke else 8,
                learning_rate=learning_rate,
                warmup_steps=args.steps // 10,
                logging_steps=max(1, args.steps // 5),
                save_strategy="no",
                report_to=[],
                use_cpu=args.smoke,
            ),
            train_dataset=Blocks(LMBlocks(train, args.block_size)),
            # budget mode: the learner holds the blocks at the conversion's MACs; σ stays
            # as the conversion left it (exact masks), as the paper's fine-tuning does
            callbacks=[
                GBLRTrainerCallback(config=gblr.LearnerConfig.finetune(), budget=args.budget)
            ],
        )
        trainer.train()
    tuned = strided_perplexity(model, held_out, args.block_size, args.block_size // 2)
    macs = gblr.count_flops(model, include=["transformer.h.*"])
    print(
        f"held-out perplexity: dense {dense['perplexity']:.2f}, converted "
        f"{converted['perplexity']:.2f}, fine-tuned {tuned['perplexity']:.2f}; "
        f"MACs of the blocks {macs.ratio:.3f} of dense"
    )
    assert math.isfinite(tuned["perplexity"]) and macs.ratio <= args.budget + 1e-6


if __name__ == "__main__":
    main()
