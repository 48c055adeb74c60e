"""Development: the suite's GBLR runs of one task and budget (seeds 0-4) with the window
form's margin set to MARGIN lines (the library: 8); prints each run, then the accuracies
as JSON. From the repository root:

    OMP_NUM_THREADS=1 python \\
        benchmarks/results/realtasks-experiments/window-form/margin_run.py 32 mlp-few 0.1
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
import gblr.layers.linear as linear
import realtask_vision
from gblr.ops.strip_windows import strip_window_product


def main() -> None:
    torch.set_num_threads(1)
    margin, task, budget = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    linear.strip_window_product = functools.partial(strip_window_product, margin=margin)
    accuracies = []
    for seed in range(5):
        run = realtask_vision.train_digits(task, "gblr", budget, seed, False, {})
        accuracies.append(run["accuracy"])
        print(margin, task, budget, seed, round(100 * run["accuracy"], 2), flush=True)
    print(json.dumps(accuracies))


if __name__ == "__main__":
    main()
