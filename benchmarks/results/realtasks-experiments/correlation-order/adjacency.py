"""How much each pixel task's own input order already groups correlated inputs: the mean
correlation (over the training images) of adjacent inputs in the task's own order, in the
greedy chain from input 0 and in the best chain (`run.py`), and the mean correlation
within ten equal blocks of each order.

    PYTHONPATH=src python benchmarks/results/realtasks-experiments/correlation-order/adjacency.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE)]  # benchmarks/, this folder

from run import best_chain_order, chain_order  # noqa: E402

import realtask_vision as vision  # noqa: E402


def correlations(x: torch.Tensor) -> torch.Tensor:
    centred = (x - x.mean(0)).double()
    moment = centred.T @ centred
    scale = moment.diagonal().clamp_min(1e-12).sqrt()
    return moment / scale[:, None] / scale[None, :]


def adjacent(similarity: torch.Tensor, order: torch.Tensor) -> float:
    return float(similarity[order[:-1], order[1:]].mean())


def within_blocks(similarity: torch.Tensor, order: torch.Tensor, blocks: int = 10) -> float:
    total, pairs, size = 0.0, 0, len(order)
    for block in range(blocks):
        members = order[block * size // blocks : (block + 1) * size // blocks]
        part = similarity[members][:, members]
        total += float(part.sum() - part.diagonal().sum())
        pairs += part.shape[0] * (part.shape[0] - 1)
    return total / pairs


TASKS = {
    "t1-mlp": vision._upsampled_data,
    "t1-mlp-few": vision._few_data,
    "t1-mlp-shift": vision._shifted_data,
    "t1-mlp-perm": vision._permuted_data,
}
for name, data in TASKS.items():
    x = data()[0].tensors[0].flatten(1)
    similarity = correlations(x)
    orders = {
        "own": torch.arange(x.shape[1]),
        "chain": chain_order(x),
        "bestchain": best_chain_order(x),
    }
    print(
        f"{name:13s} adjacent "
        + " ".join(f"{k} {adjacent(similarity, o):.3f}" for k, o in orders.items())
        + " | within blocks "
        + " ".join(f"{k} {within_blocks(similarity, o):.3f}" for k, o in orders.items())
    )
