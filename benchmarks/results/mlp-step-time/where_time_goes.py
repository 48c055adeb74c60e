"""Where the pixel MLP's GBLR training time goes, in the engine and in a bare loop.

    OMP_NUM_THREADS=1 python benchmarks/results/mlp-step-time/where_time_goes.py

One torch thread, the real-task suite's t1-mlp at 0.1 (800 steps, batch 64):

- ``engine``: whole runs through the engine (``realtask_vision.run_t1_mlp``), GBLR and
  low-rank alternating, seeds 0-3: each run's training seconds;
- ``bare``: the same model, data, optimizer and learner in a plain loop (random batches of
  the training images), each part's median ms per 100-step segment;
- ``windows``: the largest and the mean long-side length (lines) of each GBLR layer's
  strips every 100 steps (the held strips' window form multiplies every block over the
  largest one plus 16 lines);
- ``threshold``: quantiles of the learner's threshold's relative change between steps
  (its hint costs thresholds within 10% of the last one first).

Writes ``where_time_goes.json`` beside this script.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import gblr  # noqa: E402
import realtask_vision as vision  # noqa: E402
from bench_layer import machine_description, write_json_atomically  # noqa: E402
from gblr.learn.groups import adamw  # noqa: E402
from gblr.ops.gaudi import _lengths  # noqa: E402
from gblr.recipes.models import structure_model  # noqa: E402

BUDGET, STEPS, SEGMENT = 0.1, 800, 100


def _engine(seeds: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {"gblr": [], "lowrank": []}
    for seed in range(seeds):
        for structure in ("gblr", "lowrank") if seed % 2 == 0 else ("lowrank", "gblr"):
            seconds[structure].append(
                vision.run_t1_mlp(structure, BUDGET, seed, False, {})["seconds"]
            )
    return seconds


def _bare() -> dict:
    torch.manual_seed(0)
    model = vision._mlp()
    structure_model(model, "gblr", BUDGET, seed=0)
    optimizer = adamw(gblr.param_groups(model, lr=vision.LR, weight_decay=0.05))
    learner = gblr.StructureLearner(
        model, budget=BUDGET, total_steps=STEPS, warmup_steps=STEPS // 3
    )
    images, labels = vision._upsampled_data()[0].tensors
    generator = torch.Generator().manual_seed(0)
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "adamw": [], "learner": []}
    windows: dict[str, list[tuple[int, float]]] = {"blocks.0": [], "blocks.1": []}
    thresholds = []
    for step in range(STEPS):
        index = torch.randint(0, len(labels), (64,), generator=generator)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        optimizer.step()
        adamw_end = time.perf_counter()
        learner.step()
        learner_end = time.perf_counter()
        for name, begin, end in (
            ("forward", start, forward_end),
            ("backward", forward_end, backward_end),
            ("adamw", backward_end, adamw_end),
            ("learner", adamw_end, learner_end),
        ):
            parts[name].append(end - begin)
        thresholds.append(learner.threshold)
        if step % SEGMENT == 0:
            for name, layer in zip(windows, model.blocks, strict=True):
                # the block-diagonal start's strips lie along the longer side (rows on a tie)
                long_side = 1 if layer.cols <= layer.rows else 0
                lines = layer.rows if long_side == 1 else layer.cols
                widths = layer.widths.detach()
                lengths = _lengths(widths[long_side], lines, finite=True).float()
                windows[name].append((int(lengths.max()), round(float(lengths.mean()), 1)))
    segments = {
        name: [
            round(statistics.median(values[i : i + SEGMENT]) * 1e3, 3)
            for i in range(0, STEPS, SEGMENT)
        ]
        for name, values in parts.items()
    }
    changes = sorted(
        abs(now - before) / abs(before)
        for before, now in zip(thresholds, thresholds[1:])
        if before != 0 and now != 0
    )
    quantiles = {f"{q:.0%}": changes[int(q * len(changes))] for q in (0.1, 0.5, 0.9) if changes}
    return {"bare_ms": segments, "windows": windows, "threshold_change": quantiles}


def main() -> int:
    torch.set_num_threads(1)
    engine = _engine(4)
    report = {
        "machine": machine_description(torch.device("cpu")),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "engine_seconds": engine,
        "engine_ratio_of_medians": statistics.median(engine["gblr"])
        / statistics.median(engine["lowrank"]),
        **_bare(),
    }
    print(json.dumps(report, indent=1))
    write_json_atomically(HERE / "where_time_goes.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
