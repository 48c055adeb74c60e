"""Development: held-out accuracy along the *full* 800-step schedule of both starts.

Each run trains GBLR from the default start or from the learned start of before
2026-12-06 on 90% of a T1 task's training images (the split of ``probe.py``: seed 123),
with the suite's full schedule (800 steps, warm-up and budget ramp over the first third),
and scores the other 10% every 80 steps from step 160 (cross-entropy, accuracy and which
images it got right, as a string of 0/1), and the test set at the end. A pick
rule "compare the two starts' held-out accuracy at step k, continue the better one" can then
be read off without more runs (``pick_trajectory.py``).

    OMP_NUM_THREADS=1 python benchmarks/results/realtasks-experiments/probe/trajectory.py \
        --tasks mlp-few mlp-shift mlp --seeds 0 1 2 3 4 --out trajectory.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # benchmarks/
from probe import LEARNED  # noqa: E402  (the learned start of probe.py, beside this file)

STARTS = {"default": {}, "learned": LEARNED}
EVERY = 80
FIRST = 160


def one_run(job):
    task, budget, seed, start = job
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import TensorDataset

    import realtask_vision as vision
    from gblr.recipes.engine import EngineConfig, train_classifier
    from gblr.recipes.models import structure_model
    from realtask_options import scratch_options

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = {"mlp-few": vision._few_data, "mlp-shift": vision._shifted_data,
            "mlp": vision._upsampled_data}.get(task, vision._data)  # fmt: skip
    train, test = data()
    images, labels = train.tensors
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(123))
    held, kept = order[: len(labels) // 10], order[len(labels) // 10 :]
    variant = scratch_options(STARTS[start], budget, "T1")
    torch.manual_seed(seed)
    model = vision._model(task)
    structure_model(model, "gblr", variant.start_cost, seed=seed, **variant.structure)
    scores = {}

    def score(x, y):
        was = model.training
        model.eval()
        with torch.no_grad():
            logits = model(x)
        model.train(was)
        right = (logits.argmax(1) == y).int().tolist()
        return (float(torch.nn.functional.cross_entropy(logits, y)),
                float(sum(right) / len(right)), "".join(map(str, right)))  # fmt: skip

    class HeldOut(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step >= FIRST and step % EVERY == 0 and step not in scores:
                scores[step] = score(images[held], labels[held])

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = EngineConfig(
            steps=vision.STEPS, lr=vision.LR, warmup_steps=vision.STEPS // 3, budget=budget,
            learner=variant.learner, out_dir=folder, seed=seed, progress=False,
            logger=None, trainer={"accelerator": "cpu"}, **variant.engine,
        )  # fmt: skip
        result = train_classifier(
            model, TensorDataset(images[kept], labels[kept]), None, config, callbacks=[HeldOut()]
        )
    scores[vision.STEPS] = score(images[held], labels[held])
    test_images, test_labels = test.tensors
    return {"task": task, "budget": budget, "seed": seed, "start": start,
            "held": scores, "test": score(test_images, test_labels)[:2],
            "seconds": result["seconds"], "macs_ratio": result["macs_ratio"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["mlp-few", "mlp-shift", "mlp"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="trajectory.jsonl")
    args = parser.parse_args()
    path = HERE / args.out
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done.add((row["task"], row["budget"], row["seed"], row["start"]))
    jobs = [(t, b, s, st) for t in args.tasks for b in args.budgets for s in args.seeds
            for st in STARTS if (t, b, s, st) not in done]  # fmt: skip
    with ProcessPoolExecutor(args.workers) as pool, open(path, "a") as handle:
        for row in pool.map(one_run, jobs):
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            print(row["task"], row["budget"], row["seed"], row["start"], row["test"], flush=True)


if __name__ == "__main__":
    main()
