"""Layers under `WINDOWED_LAYER_ENTRIES` at many rows (the digits ViT's at 1,088 rows, the
text model's at 2,048) and one MiniLM-sized layer: forward + backward ms at the
block-diagonal start under a learner by the layer's own choice (``layer``: the masked
factors, materialized or factored by their MACs), the window form forced with in-place
runs (``runs``) and with the batched product (``batched``), and low-rank at the same
MACs; alternating, medians of 13. (The forced forms set ``RUNS_MIN_ROWS``, which the
layer then reads too: on the last, windowed layer ``layer`` is the batched form.)

    python small_layers.py THREADS > small_layers_THREADSt.txt
"""

import sys
from pathlib import Path

import torch

import gblr.ops.strip_windows as sw
from gblr.ops.strip_windows import strip_window_product

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs_vs_batched import layer_under_learner, median_ms

torch.set_num_threads(int(sys.argv[1]))
CASES = [
    (64, 192, 1088, 0.1),
    (64, 64, 1088, 0.1),
    (64, 256, 1088, 0.1),
    (256, 64, 1088, 0.1),
    (64, 192, 1088, 0.2),
    (64, 256, 1088, 0.2),
    (256, 64, 1088, 0.2),
    (128, 512, 2048, 0.25),
    (512, 128, 2048, 0.25),
    (128, 384, 2048, 0.25),
    (384, 1536, 2048, 0.3),
]


def measure(fi: int, fo: int, rows: int, budget: float) -> dict[str, float]:
    """Median forward + backward ms of each form on one layer (the module's docstring)."""
    layer, learner, x, grad, lowrank = layer_under_learner(fi, fo, rows, budget)

    def window(threshold: int):
        def form() -> None:
            sw.RUNS_MIN_ROWS = threshold
            *factors_and_structure, skip, on = layer._held_strip_components()
            y = strip_window_product(x, *factors_and_structure, skip, components=on, max_window=1.0)
            assert y is not None
            (y + layer.bias).backward(grad)

        return form

    forms = {
        "layer": lambda: layer(x).backward(grad),
        "runs": window(1),
        "batched": window(10**9),
        "lowrank": lambda: lowrank(x).backward(grad),
    }
    med = median_ms(forms, 15, skip=2)
    del learner
    return med


for case in CASES:
    med = measure(*case)
    print(
        case,
        {name: round(ms, 3) for name, ms in med.items()},
        "runs/layer",
        round(med["runs"] / med["layer"], 2),
        "layer/lowrank",
        round(med["layer"] / med["lowrank"], 2),
        "runs/lowrank",
        round(med["runs"] / med["lowrank"], 2),
        flush=True,
    )
