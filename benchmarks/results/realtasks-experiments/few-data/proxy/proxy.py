"""The development sweep that chose t1-mlp-few's size and noise: the t1-mlp pixel MLP on
N training images (a subset drawn with seed 1) and pixel noise of std NOISE.

From the repository root:
    python benchmarks/results/realtasks-experiments/few-data/proxy/proxy.py \\
        N NOISE STRUCTURE BUDGET SEED [VARIANT_JSON LABEL]
prints one JSON line (runs.jsonl holds those of 2026-12-06; GBLR_BENCH names the
benchmarks folder, default ./benchmarks).
"""

import functools
import json
import os
import sys

sys.path.insert(0, os.environ.get("GBLR_BENCH", "benchmarks"))

import torch

import realtask_vision as vision


def make(n_train: int, noise: float):
    @functools.cache
    def data():
        def upsample(images, generator):
            return torch.nn.functional.interpolate(
                images, size=(vision.CANVAS, vision.CANVAS), mode="bilinear", align_corners=False
            )

        train, test = vision._digits_on_canvas(upsample, noise)
        if n_train < len(train):
            subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
            images, labels = train.tensors
            subset = subset[:n_train]
            train = torch.utils.data.TensorDataset(images[subset], labels[subset])
        return train, test

    return data


if __name__ == "__main__":
    n_train, noise, structure = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    budget, seed = float(sys.argv[4]), int(sys.argv[5])
    options = json.loads(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] else {}
    label = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] else structure
    torch.set_num_threads(1)
    vision._upsampled_data = make(n_train, noise)
    result = vision.train_digits("mlp", structure, budget, seed, False, options)
    result.update(n_train=n_train, noise=noise, structure=label, budget=budget, seed=seed)
    print(json.dumps(result), flush=True)
