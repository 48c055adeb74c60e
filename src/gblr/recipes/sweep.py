"""``gblr sweep``: one config over several structures and budgets, one table and one plot.

Each run goes to ``OUT/<structure>-<budget>`` (``OUT/dense`` for the dense model) and is
skipped when its ``results.json`` already exists, so an interrupted sweep continues
where it stopped (a smoke run's results count only for a smoke sweep, ``--smoke``).
``OUT/sweep.{json,md,png}`` gather the results: accuracy (or perplexity) against the
whole model's GFLOPs, one line per structure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..tables import markdown_table
from .config import TEXT_DATASETS, TrainConfig, config_to_dict, resume_changes, with_structure
from .run_folder import RunFolderError

__all__ = ["budget_label", "run_folder_name", "run_sweep", "sweep_runs", "train_runs"]


def budget_label(budget: float) -> str:
    """``budget`` as a sweep names and prints it: six significant digits where they give
    the number back exactly, else every digit it needs, so that two budgets never share a
    label (and a run folder).

    Examples:
        >>> from gblr.recipes.sweep import budget_label
        >>> budget_label(0.3), budget_label(0.1000001), budget_label(1.0)
        ('0.3', '0.1000001', '1')
    """
    short = f"{budget:g}"
    return short if float(short) == budget else repr(float(budget))


def run_folder_name(structure: str, budget: float) -> str:
    """A sweep's run folder: ``<structure>-<budget>``
    ([`budget_label`][gblr.recipes.sweep.budget_label]), ``dense`` for the dense model.

    Examples:
        >>> from gblr.recipes.sweep import run_folder_name
        >>> run_folder_name("gblr", 0.3), run_folder_name("dense", 1.0)
        ('gblr-0.3', 'dense')
    """
    return "dense" if structure == "dense" else f"{structure}-{budget_label(budget)}"


def sweep_runs(
    config: TrainConfig,
    structures: Sequence[str],
    budgets: Sequence[float],
    out: Path,
    *,
    folder_name: Callable[[str, float], str] = run_folder_name,
) -> list[TrainConfig]:
    """The configs of a sweep: every structure except ``dense`` at every budget, and the
    dense model once when ``dense`` is listed; each writes into
    ``out/folder_name(structure, budget)`` (default
    [`run_folder_name`][gblr.recipes.sweep.run_folder_name]).

    Examples:
        >>> from pathlib import Path
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.sweep import sweep_runs
        >>> config = load_config("digits-vit-gblr")
        >>> runs = sweep_runs(config, ["dense", "gblr", "lowrank"], [0.2, 0.5], Path("sweep"))
        >>> [(run.structure.kind, run.structure.budget, Path(run.out).name) for run in runs]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('dense', 1.0, 'dense'), ('gblr', 0.2, 'gblr-0.2'), ('gblr', 0.5, 'gblr-0.5'),
         ('lowrank', 0.2, 'lowrank-0.2'), ('lowrank', 0.5, 'lowrank-0.5')]
    """
    from ..compress import structures as known_structures

    allowed = {"dense", *known_structures()}
    unknown = [s for s in structures if s not in allowed]
    if unknown:
        raise ValueError(f"structures: unknown {unknown}; allowed: {sorted(allowed)}")
    bad = [b for b in budgets if not 0.0 < b <= 1.0]
    if bad or not budgets:
        raise ValueError(f"budgets must be fractions in (0, 1], got {list(budgets)}")
    runs = []
    for structure in dict.fromkeys(structures):  # in order, once each
        for budget in [1.0] if structure == "dense" else dict.fromkeys(budgets):
            run = with_structure(config, structure, budget)  # checked like any config
            name = folder_name(structure, budget)
            run.out, run.name = str(out / name), f"{config.name}/{name}"
            runs.append(run)
    return runs


def _metric(config: TrainConfig) -> tuple[str, str]:
    if config.data.name in TEXT_DATASETS:
        return "perplexity", "test perplexity (lower is better)"
    return "accuracy", "top-1 test accuracy"


def _plot(rows: list[dict[str, Any]], metric: str, label: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _savefig

    figure, axes = plt.subplots(figsize=(6, 4))
    for structure in dict.fromkeys(r["structure"] for r in rows):
        points = sorted(
            (r["gflops"], r[metric])
            for r in rows
            if r["structure"] == structure and not math.isnan(r[metric])
        )
        if points:
            style = "*" if structure == "dense" else "o-"
            axes.plot(*zip(*points), style, label=structure, markersize=9 if style == "*" else 5)
    axes.set_xlabel("model GFLOPs per example (MACs, fvcore convention)")
    axes.set_ylabel(label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    _savefig(figure, path)
    plt.close(figure)


def _continue(run: TrainConfig) -> dict[str, Any]:
    """How to go on with an unfinished run of the sweep in its folder: resume it from its
    last checkpoint, or (no checkpoint yet, same config) start it afresh; a folder holding
    another run is left to [`gblr.recipes.train.train_from_config`][] to refuse."""
    import yaml

    from .run_folder import smoke_kind

    folder = Path(run.out).expanduser()
    if smoke_kind(folder) != run.smoke:
        return {}  # none there, or a smoke run and a real one: never continued by the other
    if (folder / "checkpoints" / "last.ckpt").is_file() and not run.smoke:
        return {"resume": "last"}
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return {"overwrite": saved == config_to_dict(run)}


def train_runs(runs: Sequence[TrainConfig], *, progress: bool = True) -> list[dict[str, Any]]:
    """Train each run ([`gblr.recipes.train.train_from_config`][]) in turn, in its own
    folder; a finished run (its ``results.json``, smoke or real as the run) is read, not
    repeated, and an unfinished one is resumed where it can be.

    Returns:
        Each run's result, as its ``results.json`` holds it.

    Examples:
        >>> import contextlib, io, tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.sweep import sweep_runs, train_runs
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=1"]
        >>> config = load_config("digits-vit-gblr", [*tiny, "trainer.logger=none"])
        >>> runs = sweep_runs(config, ["gblr"], [0.5], Path(tempfile.mkdtemp()))
        >>> with contextlib.redirect_stdout(io.StringIO()) as printed:
        ...     first = train_runs(runs, progress=False)
        ...     again = train_runs(runs, progress=False)  # finished: read, not repeated
        >>> first == again, first[0]["steps"], "done before" in printed.getvalue()
        (True, 1, True)
    """
    from .train import train_from_config

    # Every finished run is checked before any trains: a folder of another config found
    # late would stop the sweep after hours of runs before it.
    finished_results = [_finished_result(run) for run in runs]
    results = []
    for run, (result, done) in zip(runs, finished_results, strict=True):
        if done:
            print(f"[{run.name}] done before, read {Path(run.out) / 'results.json'}")
            results.append(result)
            continue
        print(f"\n[{run.name}]")
        options = _continue(run)
        if result is not None and run.smoke:
            options = {"overwrite": True}  # a smoke run of another config: replaced
        result = train_from_config(run, progress=progress, report=print, **options)
        results.append(result)
    return results


def _finished_result(run: TrainConfig) -> tuple[dict[str, Any] | None, bool]:
    """``(result, done)``: the result in ``run``'s folder (``None``: none, or one of the
    other kind, smoke or real) and whether it is ``run``'s, finished.

    Raises:
        RunFolderError: the folder holds a finished real run of another config.
    """
    finished = Path(run.out) / "results.json"
    saved = json.loads(finished.read_text()) if finished.is_file() else None
    result = None if saved is None else saved["result"]
    # a smoke run's results never stand for a real run's, nor the other way round
    if result is None or result.get("smoke", False) != run.smoke:
        return None, False
    # (runs written before 2026-12-07 kept only the config they ran)
    changes = _changes(saved.get("requested_config", saved.get("config")), run)
    if not changes:
        return result, True
    if not run.smoke:
        raise RunFolderError(
            f"{run.out} holds a finished run of another config ({'; '.join(changes[:4])}"
            f"{'; ...' if len(changes) > 4 else ''}), whose numbers this sweep would "
            "report as this config's; nothing was changed. Give the sweep another "
            "--out, or move that run"
        )
    return result, False


def _changes(saved: Any, run: TrainConfig) -> list[str]:
    """How the config a finished run was asked to run differs from ``run``'s (the keys
    that change a run's result, as a resume checks them): ``key: there, now``."""
    if not isinstance(saved, dict):
        return ["its results.json holds no config"]
    current = config_to_dict(run)
    return [
        change.replace(" in the checkpoint, ", " there, ")
        for change in resume_changes(saved, current)
    ]


def _written_by_a_sweep(path: Path) -> bool:
    """Whether ``path`` is a ``sweep.json`` that `run_sweep` wrote (its config and rows)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and "rows" in data


def _with_earlier_rows(
    path: Path, config: TrainConfig, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``rows`` and, before them, the rows of the earlier sweep of the same config in
    ``path`` whose runs this one did not ask for (and whose folders still hold their
    results): a sweep of one more budget into the folder adds its row to the table instead
    of replacing the table by it."""
    if not _written_by_a_sweep(path):
        return rows
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if earlier["config"] != config_to_dict(config):
        return rows
    asked = {str(row["run"]) for row in rows}
    kept = [
        row
        for row in earlier["rows"]
        if str(row.get("run")) not in asked and (Path(row["run"]) / "results.json").is_file()
    ]
    return kept + rows


def run_sweep(
    config: TrainConfig,
    structures: Sequence[str],
    budgets: Sequence[float],
    out: str | Path,
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every run of the sweep (skipping finished ones,
    [`train_runs`][gblr.recipes.sweep.train_runs]) and write ``sweep.json``, ``sweep.md`` and
    ``sweep.png`` into ``out``.

    Returns:
        One row per run: structure, budget, the metric, GFLOPs, MACs ratio, seconds.

    Examples:
        A dense and a GBLR run of a tiny ViT, two steps each (progress lines silenced):

        >>> import contextlib, io, os, tempfile
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.sweep import run_sweep
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", [*tiny, "trainer.logger=none"])
        >>> out = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     rows = run_sweep(config, ["dense", "gblr"], [0.5], out, progress=False)
        >>> [(row["structure"], row["budget"]) for row in rows]
        [('dense', 1.0), ('gblr', 0.5)]
        >>> sorted(os.listdir(out))
        ['dense', 'gblr-0.5', 'sweep.json', 'sweep.md', 'sweep.png']
    """
    from ..files import save_atomically
    from .run_folder import SMOKE_BANNER, refuse_real_folder

    out = Path(out).expanduser()
    if config.smoke:
        refuse_real_folder(out, "sweep")
    written = [name for name in ("sweep.md", "sweep.png", "sweep.json") if (out / name).exists()]
    if written and not _written_by_a_sweep(out / "sweep.json"):
        raise RunFolderError(
            f"{out} holds {', '.join(written)}, which no gblr sweep wrote (no sweep.json of "
            "its rows); this sweep would write over them, so nothing was changed. Give it "
            "another folder with --out, or move them"
        )
    metric, label = _metric(config)
    runs = sweep_runs(config, structures, budgets, out)
    rows = [
        {
            "structure": run.structure.kind,
            "budget": run.structure.budget,
            metric: result.get(metric, math.nan),
            "gflops": result["gflops"],
            "macs_ratio": result["macs_ratio"],
            "seconds": result["seconds"],
            "run": run.out,
        }
        for run, result in zip(runs, train_runs(runs, progress=progress), strict=True)
    ]
    rows = _with_earlier_rows(out / "sweep.json", config, rows)
    table = markdown_table(
        ["structure", "budget", metric, "GFLOPs", "MACs ratio (structured)", "seconds"],
        [
            [
                r["structure"],
                budget_label(r["budget"]),
                f"{r[metric]:.4f}",
                f"{r['gflops']:.4g}",
                f"{r['macs_ratio']:.3f}",
                f"{r['seconds']:.0f}",
            ]
            for r in rows
        ],
        align="<>>>>>",
    )
    text = f"# Sweep: {config.name}\n\n![{label} vs GFLOPs](sweep.png)\n\n" + table
    if config.smoke:
        text = SMOKE_BANNER + text
    save_atomically(lambda f: f.write(text + "\n"), out / "sweep.md", text=True)
    save_atomically(
        lambda f: json.dump({"config": config_to_dict(config), "rows": rows}, f, indent=2),
        out / "sweep.json",
        text=True,
    )
    title = f"{config.name} (SMOKE RUN: not results)" if config.smoke else config.name
    _plot(rows, metric, label, out / "sweep.png", title)
    return rows
