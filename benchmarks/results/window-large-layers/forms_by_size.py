"""Forward + backward ms of one GBLR layer at the block-diagonal start under a structure
learner, by the form that computes it: the layer's own choice (``current``), its choice
by the rule before 2026-12-07 (``before``: the held strips' forms only where the rows are
fewer than ``in * out / (K r)``), the held strips' window form forced (``window``, any
window length), the masked factors' two products (``full``), and low-rank at the same
MACs; alternating, medians.

    python forms_by_size.py THREADS > forms_by_size_THREADS.txt
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import gblr
import gblr.layers.linear
from gblr.layers.linear import WINDOWED_LAYER_ENTRIES
from gblr.ops.strip_windows import strip_window_product
from gblr.structured.lowrank import LowRankLinear

torch.set_num_threads(int(sys.argv[1]))
CASES = [  # in, out, rows, budget
    *((64, 128, 1088, 0.1), (128, 64, 1088, 0.1), (64, 192, 1088, 0.1), (64, 192, 1088, 0.2)),
    *((96, 384, 2048, 0.25), (384, 96, 2048, 0.25), (96, 288, 2048, 0.5), (512, 512, 64, 0.1)),
    *((256, 1024, 1024, 0.2), (1024, 256, 1024, 0.2), (192, 768, 2048, 0.2)),
    *((256, 256, 4096, 0.2), (512, 2048, 256, 0.2), (512, 512, 1024, 0.2)),
    *((384, 1536, 512, 0.3), (384, 1536, 2048, 0.3), (768, 768, 4096, 0.3)),
    *((768, 3072, 512, 0.1), (768, 3072, 4096, 0.1), (768, 3072, 4096, 0.3)),
    *((3072, 768, 4096, 0.3), (768, 3072, 4096, 0.5), (1024, 4096, 2048, 0.2)),
]
print(f"torch threads {torch.get_num_threads()}; WINDOWED_LAYER_ENTRIES {WINDOWED_LAYER_ENTRIES}")


def measure(fan_in: int, fan_out: int, rows: int, budget: float) -> dict[str, float]:
    """Median forward + backward ms of each form (see the module's docstring)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        gblr.GBLRLinear(
            fan_in, fan_out, structure_init="blockdiag", init_cost=budget, factor_init="fixed_norm"
        )
    )
    learner = gblr.StructureLearner(model, budget=budget, total_steps=1000, warmup_steps=1)
    layer = model[0]
    x = torch.randn(rows, fan_in, requires_grad=True)
    rank = max(1, round(budget * fan_in * fan_out / (fan_in + fan_out)))
    lowrank = LowRankLinear(fan_in, fan_out, rank=rank)

    def full() -> None:
        u, v = layer.masked_factors()
        F.linear(F.linear(x, v), u.t(), layer.bias).sum().backward()

    def window() -> None:
        *factors_and_structure, skip, on = layer._held_strip_components()
        y = strip_window_product(x, *factors_and_structure, skip, components=on, max_window=1.0)
        (y + layer.bias).sum().backward()

    def before() -> None:
        gblr.layers.linear.WINDOWED_LAYER_ENTRIES = 10**18
        try:
            layer(x).sum().backward()
        finally:
            gblr.layers.linear.WINDOWED_LAYER_ENTRIES = WINDOWED_LAYER_ENTRIES

    forms = {
        "current": lambda: layer(x).sum().backward(),
        "before": before,
        "window": window,
        "full": full,
        "lowrank": lambda: lowrank(x).sum().backward(),
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(9 if rows * fan_in * fan_out < 2e9 else 5):
        for name, form in forms.items():
            start = time.perf_counter()
            form()
            times[name].append(time.perf_counter() - start)
    del learner
    return {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}


for fan_in, fan_out, rows, budget in CASES:
    ms = measure(fan_in, fan_out, rows, budget)
    print(
        f"{fan_in}x{fan_out} rows {rows} budget {budget}: "
        + ", ".join(f"{name} {value:.2f} ms" for name, value in ms.items())
        + f"; current / before {ms['current'] / ms['before']:.2f}",
        flush=True,
    )
