"""Forward + backward ms of one GBLR layer at the block-diagonal start under a structure
learner, its held strips' window form computed by the windows' batched product
(``batched``) or by in-place runs (``runs``, `gblr.ops.strip_windows._WindowRunsProduct`),
and low-rank at the same MACs; alternating in one process, medians (the first repeat
dropped). The gradient is a drawn tensor, not a sum's expanded one.

    python runs_vs_batched.py THREADS runs_vs_batched_THREADSt.json
"""

import json
import statistics
import sys
import time

import torch

import gblr
import gblr.ops.strip_windows as sw
from gblr.structured.lowrank import LowRankLinear

CASES = (
    [  # in, out, rows, budget
        (512, 512, r, 0.1) for r in (64, 128, 256, 512, 1024)
    ]
    + [(768, 3072, r, b) for b in (0.1, 0.3) for r in (64, 256, 512, 1024, 4096)]
    + [(3072, 768, r, 0.3) for r in (64, 512, 4096)]
    + [(768, 768, r, 0.3) for r in (256, 512, 4096)]
    + [(1024, 4096, r, 0.2) for r in (512, 2048)]
)


def layer_under_learner(fi: int, fo: int, rows: int, budget: float):
    """One layer at the block-diagonal start under a structure learner, an input of ``rows``
    rows that needs a gradient, a drawn output gradient, and low-rank at the same MACs:
    ``(layer, learner, x, grad, lowrank)`` (keep the learner: it holds the strips)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        gblr.GBLRLinear(
            fi, fo, structure_init="blockdiag", init_cost=budget, factor_init="fixed_norm"
        )
    )
    learner = gblr.StructureLearner(model, budget=budget, total_steps=1000, warmup_steps=1)
    x = torch.randn(rows, fi, requires_grad=True)
    lowrank = LowRankLinear(fi, fo, rank=max(1, round(budget * fi * fo / (fi + fo))))
    grad = torch.randn(rows, fo)
    return model[0], learner, x, grad, lowrank


def median_ms(forms: dict, repeats: int, skip: int) -> dict[str, float]:
    """Each form called ``repeats`` times, alternating; the median ms of all but the first
    ``skip`` calls."""
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, form in forms.items():
            start = time.perf_counter()
            form()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[skip:]) * 1e3 for name, t in times.items()}


def measure(fi: int, fo: int, rows: int, budget: float) -> dict:
    """Median forward + backward ms of each form on one layer (the module's docstring)."""
    layer, learner, x, grad, lowrank = layer_under_learner(fi, fo, rows, budget)

    def with_threshold(threshold: int):
        def form() -> None:
            sw.RUNS_MIN_ROWS = threshold
            layer(x).backward(grad)

        return form

    forms = {
        "batched": with_threshold(10**9),
        "runs": with_threshold(1),
        "lowrank": lambda: lowrank(x).backward(grad),
    }
    med = median_ms(forms, 9 if rows * fi * fo < 2e9 else 5, skip=1)
    del learner
    return dict(
        shape=[fi, fo],
        rows=rows,
        budget=budget,
        **{name: round(ms, 3) for name, ms in med.items()},
        runs_over_batched=round(med["runs"] / med["batched"], 3),
    )


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    out = []
    for case in CASES:
        out.append(measure(*case))
        print(out[-1], flush=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(sys.argv[2], "w") as handle:
        json.dump({"meta": meta, "cases": out}, handle, indent=1)


if __name__ == "__main__":
    main()
