"""A pixel MLP's inputs put in an order found from the training images' correlations,
for GBLR's block-diagonal start to group, against the order the suite gives them.

The block-diagonal start's first layer groups *adjacent* inputs into each diagonal block.
``chain``: from input 0, the next input is always the unvisited one most correlated with
the last (a greedy chain over the training images' input correlations); ``bestchain``:
of the greedy chains from every input, the one whose adjacent inputs' correlations sum
highest (the same order whatever the inputs' own order); ``knn16``: the Fiedler vector
of the graph joining each input to its 16 most correlated ones; ``none``: the task's own
order. The order is computed once from the task's training images and
applied to train and test images alike (equivalent to placing the first layer's one-line
strips on those input columns: the same GBLR start, other strip locations). Each run
trains GBLR with the suite's code (`benchmarks/realtask_vision.py`, library defaults) in
a fresh process (a run replaces the module's data function).

    TASK=t1-mlp-perm python run.py OUT.json ORDERINGS STRUCTURES BUDGETS SEEDS...
    # e.g. TASK=t1-mlp-perm python run.py t1-mlp-perm.json none,chain,knn16 gblr 0.1,0.2 0 1 2

Resumable: runs already in OUT.json are skipped.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/

DATA = {
    "t1-mlp-perm": "_permuted_data",
    "t1-mlp": "_upsampled_data",
    "t1-mlp-few": "_few_data",
    "t1-mlp-shift": "_shifted_data",
}
TASK = os.environ.get("TASK", "t1-mlp-perm")


def chain_order(x):
    """``(d,)`` input order: a greedy chain over the inputs' correlations (``x`` ``(N, d)``)."""
    centred = x - x.mean(0)
    moment = centred.T @ centred
    scale = moment.diagonal().clamp_min(1e-12).sqrt()
    similarity = (moment / scale[:, None] / scale[None, :]).tolist()
    visited, left = [0], set(range(1, x.shape[1]))
    while left:
        row = similarity[visited[-1]]
        following = max(left, key=row.__getitem__)
        visited.append(following)
        left.remove(following)
    import torch

    return torch.tensor(visited)


def best_chain_order(x):
    """``(d,)`` input order: of the greedy chains from every input, the one whose adjacent
    inputs' correlations sum highest (the same order whatever the inputs' own order):
    `gblr.layers.input_order.correlation_chain`, which was written from this function
    (the rows here ran on this file's own copy; both give the same order on every task)."""
    from gblr.layers.input_order import correlation_chain

    return correlation_chain(x)


def knn_order(x, neighbours: int = 16):
    """``(d,)`` input order: the Fiedler vector of the inputs' k-nearest-correlation graph."""
    import torch

    centred = x - x.mean(0)
    moment = centred.T @ centred
    scale = moment.diagonal().clamp_min(1e-12).sqrt()
    similarity = moment / scale[:, None] / scale[None, :]
    similarity.fill_diagonal_(-1)
    adjacency = torch.zeros_like(similarity)
    adjacency.scatter_(1, similarity.topk(neighbours, dim=1).indices, 1.0)
    adjacency = ((adjacency + adjacency.T) > 0).double()
    _, vectors = torch.linalg.eigh(torch.diag(adjacency.sum(1)) - adjacency)
    return torch.argsort(vectors[:, 1])


def job(args: tuple[str, str, float, int]) -> dict:
    ordering, structure, budget, seed = args
    import torch

    torch.set_num_threads(1)
    import realtask_vision as vision

    if ordering != "none":
        task_data = getattr(vision, DATA[TASK])

        @functools.cache
        def reordered():
            from torch.utils.data import TensorDataset

            train, test = task_data()
            flat = train.tensors[0].flatten(1)
            orders = {"chain": chain_order, "bestchain": best_chain_order, "knn16": knn_order}
            order = orders[ordering](flat)
            out = []
            for dataset in (train, test):
                images, labels = dataset.tensors
                out.append(TensorDataset(images.flatten(1)[:, order].reshape(images.shape), labels))
            return out[0], out[1]

        setattr(vision, DATA[TASK], reordered)
    start = time.perf_counter()
    runner = getattr(vision, "run_" + TASK.replace("-", "_"))
    result = runner(structure, budget, seed, False, {})
    return {
        "task": TASK,
        "ordering": ordering,
        "structure": structure,
        "budget": budget,
        "seed": seed,
        **result,
        "wall": time.perf_counter() - start,
    }


def main() -> None:
    out = Path(sys.argv[1])
    orderings, structures = sys.argv[2].split(","), sys.argv[3].split(",")
    budgets = [float(b) for b in sys.argv[4].split(",")]
    seeds = [int(s) for s in sys.argv[5:]]
    done = json.loads(out.read_text()) if out.exists() else []
    have = {(r["ordering"], r["structure"], r["budget"], r["seed"]) for r in done}
    todo = [
        (ordering, structure, budget, seed)
        for seed in seeds
        for budget in budgets
        for structure in structures
        for ordering in orderings
        if (ordering, structure, budget, seed) not in have
    ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context, max_tasks_per_child=1) as pool:
        for record in pool.map(job, todo):
            done.append(record)
            print(record["ordering"], record["budget"], record["seed"], record["accuracy"])
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=1))
            os.replace(tmp, out)


if __name__ == "__main__":
    main()
