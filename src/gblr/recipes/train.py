"""``gblr train`` / ``gblr finetune``: one training run from a config, in its own folder.

The run folder (``config.out``) holds ``config.yaml`` (the resolved config),
``checkpoints/last.ckpt`` (resumable), ``metrics.csv`` and/or ``tensorboard/``,
``model_state.pt``, ``results.json`` and ``REPORT.md`` with its figures.

Image classifiers (the compact ViT and Mixer, timm and torchvision models) report top-1
and top-5 test accuracy; causal language models (Hugging Face) report the perplexity of
the test split with the standard sliding-window evaluation. Either may start from
pretrained weights (``model.pretrained``) fitted to a MACs budget by a structure search
(``structure.init: search``), or from scratch.

Building the data and the model from a config is [`gblr.recipes.build`][] (its names
are importable from here too); claiming and locking the run folder is
[`gblr.recipes.run_folder`][]; the Lightning run itself is [`gblr.recipes.engine`][].
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..files import save_atomically
from .build import (
    apply_structure,
    build_datasets,
    build_model,
    build_structured_model,
    data_shape,
    example_input,
    model_from_run,
)
from .config import (
    PROBE_START,
    TEXT_DATASETS,
    TrainConfig,
    config_to_dict,
    learner_config,
    one_process,
)
from .engine_config import EngineConfig
from .report import write_run_report
from .run_folder import RunLock, claim_folder, is_launching_process, remove_library_files
from .smoke import SMOKE_TEXT_CHARS, first_samples

if TYPE_CHECKING:
    from .start_probe import GBLRStart

__all__ = [
    "build_datasets",
    "build_model",
    "build_structured_model",
    "data_shape",
    "engine_config",
    "example_input",
    "model_from_run",
    "probe_chooses_start",
    "probe_starts",
    "run_length",
    "train_from_config",
]


def run_length(config: TrainConfig, train_size: int) -> tuple[int, float]:
    """``(total optimizer steps, steps per run unit)``: a unit is an epoch of
    ``train_size`` samples at the global batch size, or one step.

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> config = load_config("digits-vit-gblr", tiny)
        >>> from gblr.recipes.train import run_length
        >>> run_length(config, train_size=1348)  # step-based: a unit is one step
        (2, 1.0)
        >>> epochs = load_config("digits-vit-gblr", ["optim.steps=null", "optim.epochs=3"])
        >>> run_length(epochs, train_size=1348)  # 1348 samples at batch 64: 21 steps an epoch
        (63, 21.0)
    """
    optim = config.optim
    if optim.steps is not None:
        return optim.steps, 1.0
    per_epoch = train_size // optim.batch_size
    if per_epoch < 1:
        raise ValueError(
            f"optim.batch_size={optim.batch_size} is larger than the training set "
            f"({train_size} samples): not one step per epoch"
        )
    return max(1, math.ceil(optim.epochs * per_epoch)), float(per_epoch)


def engine_config(
    config: TrainConfig,
    train_size: int,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> EngineConfig:
    """The [`gblr.recipes.engine.EngineConfig`][] of a recipe's run: durations in run
    units (epochs or steps, `run_length` over ``train_size`` samples) become steps,
    the ``learner`` section a [`gblr.LearnerConfig`][], and the run writes into
    ``config.out`` (checkpoints in ``config.out/checkpoints``). ``resume``, ``progress``,
    ``stop_after``: as [`train_from_config`][gblr.recipes.train.train_from_config] takes them
    (``resume`` a path).

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.train import engine_config
        >>> engine = engine_config(load_config("digits-vit-gblr"), train_size=1348)
        >>> engine.steps, engine.warmup_steps, engine.budget, engine.global_batch_size
        (1500, 500, 0.3, 64)
        >>> engine.learner.hold_narrow_sides, str(engine.checkpoint_dir)
        (1, 'runs/digits-vit-gblr/checkpoints')
    """
    steps, unit = run_length(config, train_size)
    optim, learner = config.optim, config.learner
    out = Path(config.out).expanduser()
    warmup = round(optim.warmup * unit)
    ramp = warmup if learner.budget_ramp is None else round(learner.budget_ramp * unit)
    if config.trainer.val_every is not None:
        val_every = max(1, round(config.trainer.val_every * unit))
    else:
        val_every = round(unit) if optim.epochs is not None else None
    if val_every is not None and val_every > steps:
        val_every = None
    return EngineConfig(
        steps=steps,
        global_batch_size=optim.batch_size,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        warmup_steps=warmup,
        structure_lr=optim.structure_lr,
        label_smoothing=0.0 if config.data.name in TEXT_DATASETS else config.data.label_smoothing,
        budget=config.structure.budget if config.structure.kind == "gblr" else None,
        budget_ramp_steps=ramp,
        learner=learner_config(config),
        sigma_start_step=round(learner.sigma_start * unit),
        structure_include=config.structure.include,
        structure_exclude=config.structure.exclude,
        num_workers=config.data.num_workers,
        val_every_n_steps=val_every,
        out_dir=out,
        logger=config.trainer.logger,
        seed=config.seed,
        progress=progress,
        checkpoint_dir=out / "checkpoints",
        checkpoint_every_n_steps=config.trainer.checkpoint_every_n_steps,
        resume=resume,
        stop_after=stop_after,
        compile_mode=config.trainer.compile,
        trainer=_trainer_options(config),
    )


def _trainer_options(config: TrainConfig) -> dict[str, Any]:
    t = config.trainer
    options: dict[str, Any] = {
        "accelerator": t.accelerator,
        "devices": t.devices,
        "num_nodes": t.num_nodes,
        "strategy": t.strategy,
        "precision": t.precision,
        "log_every_n_steps": t.log_every_n_steps,
        # cuDNN/cuBLAS determinism is slow and not needed off the CPU tests
        "deterministic": t.accelerator == "cpu",
    }
    if config.optim.grad_clip is not None:
        options["gradient_clip_val"] = config.optim.grad_clip
    return options


def _text_data(config: TrainConfig) -> tuple[Any, Any, torch.Tensor]:
    """``(train blocks, validation blocks, test token stream)`` for a language model."""
    from .text import LMBlocks, load_tokenizer, read_text_files, read_wikitext, token_stream

    data = config.data
    tokenizer = load_tokenizer(data.tokenizer)
    cache = None if data.root is None else Path(data.root).expanduser() / ".gblr-cache"
    if config.smoke:
        cache = None  # the cache is for whole splits; a smoke run reads the first part only
    streams = {}
    for split in ("train", "valid", "test"):
        if data.name == "wikitext103":
            text = read_wikitext(data.root, split)
        else:
            text = read_text_files([Path(data.root).expanduser() / f"{split}.txt"])
        if config.smoke:
            # tokenizing a real corpus takes minutes; a smoke run needs a few blocks
            text = text[:SMOKE_TEXT_CHARS]
        streams[split] = token_stream(text, tokenizer, cache_dir=cache)
    return (
        LMBlocks(streams["train"], data.seq_len),
        LMBlocks(streams["valid"], data.seq_len),
        streams["test"],
    )


def train_from_config(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and report one run described by ``config``.

    A GBLR image classifier trained from scratch whose config names no
    ``structure.start`` lets a start probe choose it
    ([`probe_chooses_start`][gblr.recipes.train.probe_chooses_start]); the run folder's
    ``config.yaml``, its checkpoints and the result (``start``, ``probe_seconds`` and
    ``probe``: each start's held-out accuracy at each evaluation, the challenger's lead
    and its standard error) name the start chosen.

    The run folder ``config.out`` is this run's: a folder holding another run is refused
    unless ``resume`` continues that run or ``overwrite`` replaces it (a smoke run in it
    is replaced without asking; a smoke run never replaces a real one unless told); a
    second run into the same folder at the same time is refused (a lock file). Nothing
    in the folder changes until the run has started (the data read, the model built,
    the checkpoint and the ``Trainer`` options checked); replacing a run then deletes
    only the files gblr writes (see [`gblr.recipes.run_folder.library_files`][]).

    Args:
        config: from [`gblr.recipes.config.load_config`][].
        resume: a checkpoint to continue, or ``"last"`` for the run folder's own
            ``checkpoints/last.ckpt``. A checkpoint of another structure, or written with
            another config (other than where the run runs and logs, see
            `gblr.recipes.config.RESUME_MAY_CHANGE`), is refused with the keys that
            differ.
        progress: show progress bars.
        stop_after: stop at this optimizer step (an interruption; schedules still span
            the whole run).
        overwrite: replace a run already in ``config.out``.
        report: called with a line of text at each stage of a start probe (each start's
            probe, the choice, the final run), for a command line to print.

    Raises:
        gblr.recipes.run_folder.RunFolderError: the folder holds another run (and neither
            ``resume`` nor ``overwrite`` was given), or another run is writing into it.

    Returns:
        As written to ``results.json``: ``{"accuracy", "top5"}`` (images) or
        ``{"perplexity", "nll", "tokens"}`` (text), and ``"macs_ratio"``, ``"gflops"``,
        ``"dense_gflops"`` (whole model, one example), ``"seconds"``, ``"steps"``.

    Examples:
        Two steps of a tiny GBLR ViT on the digits, written to a temporary run folder:

        >>> import os, tempfile
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.train import train_from_config
        >>> out = tempfile.mkdtemp()
        >>> tiny = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=2"]
        >>> options = ["trainer.logger=none", "trainer.accelerator=cpu", f"out={out}"]
        >>> config = load_config("digits-vit-gblr", tiny + options)
        >>> results = train_from_config(config, progress=False)
        >>> results["steps"], 0.0 <= results["accuracy"] <= 1.0, results["macs_ratio"] < 1.0
        (2, True, True)
        >>> sorted(name for name in os.listdir(out) if "." in name)
        ['REPORT.md', 'config.yaml', 'model_state.pt', 'results.json']
    """
    if resume is not None and overwrite:
        raise ValueError(
            "resume and overwrite contradict each other: --resume continues the run in the "
            "folder, --overwrite replaces it; give one"
        )
    out = Path(config.out).expanduser()
    if resume == "last" and not out.is_dir():
        # (a probing recipe explained how a run stopped during its probe has no checkpoint)
        raise FileNotFoundError(
            f"no run folder at {out} to resume: --resume continues the run in the run "
            "folder (--out, or the config's out)"
        )
    if not is_launching_process():  # a worker started by a launcher: the folder is rank 0's
        return _train(config, out, resume, progress, stop_after, replace=False)
    with RunLock(out):
        replace = claim_folder(
            out, smoke=config.smoke, resume=resume is not None, overwrite=overwrite
        )
        return _train(config, out, resume, progress, stop_after, replace=replace, report=report)


def probe_chooses_start(config: TrainConfig, train_size: int) -> bool:
    """Whether a probe chooses how a run of ``config`` on ``train_size`` training samples
    starts its GBLR layers ([`probe_starts`][gblr.recipes.train.probe_starts]):
    ``structure.start: probe``, or, by default (no ``structure.start``), a GBLR image
    classifier trained from scratch (``init: random``) on one process whose run is long
    enough for the probe and whose training set can spare its held-out samples
    ([`gblr.recipes.start_probe.probe_plan`][]). Otherwise a GBLR run without a
    ``structure.start`` starts block-diagonal (language models, several processes, runs
    of a step or two).

    Examples:
        >>> from gblr.recipes.config import load_config
        >>> from gblr.recipes.train import probe_chooses_start
        >>> probe_chooses_start(load_config("digits-vit-gblr"), train_size=1348)
        True
        >>> probe_chooses_start(load_config("digits-vit-gblr", ["optim.steps=2"]), 1348)
        False
        >>> named = load_config("digits-vit-gblr", ["structure.start=blockdiag"])
        >>> probe_chooses_start(named, 1348)
        False
    """
    s = config.structure
    if s.kind != "gblr" or s.init != "random":
        return False
    if s.start == PROBE_START:
        return True
    if (
        s.start is not None
        or config.data.name in TEXT_DATASETS
        or not one_process(config.trainer.devices, config.trainer.num_nodes)
    ):
        return False
    from .start_probe import probe_plan

    try:
        probe_plan(_recipe_probe(config), train_size, run_length(config, train_size)[0])
    except ValueError:
        return False
    return True


def _recipe_probe(config: TrainConfig) -> Any:
    """The recipe's `StartProbe`: the default, or, for a smoke run (a few steps on a few
    samples), one evaluation at half of it on a quarter of the samples."""
    from .start_probe import StartProbe

    return StartProbe(evaluate_at=(0.5,), held_out=0.25) if config.smoke else StartProbe()


def _chosen_start(
    config: TrainConfig, engine: EngineConfig, resume: Path, *, own: bool
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config of the start that the probe of the run being resumed chose: the one of
    ``probe_starts``' configs that its checkpoint was written with (that closest to it,
    if none is, for the resume's check to name what differs), or ``config`` itself where
    it names no start and the checkpoint's config is the same (a run from before the
    probe was the default, which started block-diagonal); and the probe's record that the
    checkpoint holds (``None`` for a run from before it did). ``own``: ``resume`` is the
    run folder's own last checkpoint (whose absence the probe may explain)."""
    from .checkpoints import CHECKPOINT_KEY, read_checkpoint
    from .config import resume_changes

    try:
        checkpoint = read_checkpoint(resume)
    except FileNotFoundError:
        if not own:  # a path the user named: nothing to explain but that it is not there
            raise
        raise FileNotFoundError(
            f"no checkpoint at {resume}: a run whose start a probe chooses writes its first "
            "checkpoint after the probe (the probes keep none), so a run stopped during its "
            "probe starts again (--overwrite)"
        ) from None
    saved = checkpoint.get(CHECKPOINT_KEY, {}).get("config")
    probe = checkpoint.get(CHECKPOINT_KEY, {}).get("probe")
    record = probe if isinstance(probe, dict) else None
    candidates = list(probe_starts(config, engine)[1].values())
    if config.structure.start is None:
        candidates.append(config)
    if not isinstance(saved, dict):
        return candidates[0], record
    chosen = min(candidates, key=lambda c: len(resume_changes(saved, config_to_dict(c))))
    return chosen, record


def probe_starts(
    config: TrainConfig, engine: EngineConfig
) -> tuple[tuple[GBLRStart, GBLRStart], dict[str, TrainConfig]]:
    """The starts a recipe with ``structure.start: probe`` chooses between, and the config
    each one is: ``blockdiag`` (with the recipe's ``start_cost``, ``factor_init`` and
    learner) and ``blocks``, the learned start (at 3x the budget, balanced factors, the
    recipe's learner with σ annealed 1 -> 100 and nothing held, its structure at 3x the
    weights' learning rate unless ``optim.structure_lr`` names one).

    Examples:
        >>> from gblr.recipes.config import learner_config, load_config
        >>> from gblr.recipes.train import engine_config, probe_starts
        >>> config = load_config("digits-vit-gblr", ["structure.start=probe"])
        >>> engine = engine_config(config, train_size=1348)
        >>> starts, configs = probe_starts(config, engine)
        >>> [start.name for start in starts], round(configs["blocks"].structure.start_cost, 6)
        (['blockdiag', 'blocks'], 0.9)
        >>> learner_config(configs["blocks"]) == starts[1].learner
        True
        >>> budget = config.structure.budget  # each config starts where its probe did
        >>> all(configs[st.name].structure.start_cost == st.start_cost(budget) for st in starts)
        True
        >>> [configs[st.name].optim.structure_lr == st.structure_lr(engine) for st in starts]
        [True, True]
        >>> configs["blocks"].optim.structure_lr / config.optim.lr  # the learned start's rate
        3.0
    """
    from .models import gblr_start_cost
    from .start_probe import LEARNED_START, GBLRStart

    s, budget = config.structure, config.structure.budget
    assert engine.learner is not None
    annealed = dataclasses.replace(config.learner, sigma=[1.0, 100.0], hold_narrow_sides=0)
    learned_config = dataclasses.replace(config, learner=annealed)
    starts = (
        GBLRStart(
            "blockdiag",
            factor_init=s.factor_init or "fixed_norm",
            start_cost_ratio=gblr_start_cost(budget, s.start_cost) / budget,
            learner=engine.learner,
        ),
        GBLRStart(
            "blocks",
            structure_init="blocks",
            factor_init="balanced",
            start_cost_ratio=LEARNED_START.start_cost_ratio,
            learner=learner_config(learned_config),
            structure_lr_factor=LEARNED_START.structure_lr_factor,
        ),
    )
    # each config names the structure's rate its start trains at, so that a resume keeps it
    learned_config = dataclasses.replace(
        learned_config,
        optim=dataclasses.replace(config.optim, structure_lr=starts[1].structure_lr(engine)),
    )
    # each config holds the very starting cost its probe used, so it rebuilds the model
    configs = {
        start.name: dataclasses.replace(
            base,
            structure=dataclasses.replace(
                s,
                start=start.structure_init,
                factor_init=start.factor_init,
                start_cost=start.start_cost(budget),
            ),
        )
        for start, base in zip(starts, (config, learned_config))
    }
    return starts, configs


def _train(
    config: TrainConfig,
    out: Path,
    resume: str | Path | None,
    progress: bool,
    stop_after: int | None,
    *,
    replace: bool,
    report: Callable[[str], None] | None,
) -> dict[str, Any]:
    import yaml

    from ..model_flops import count_model_flops
    from .data import batch_mixer
    from .engine import train_classifier, train_language_model

    # the config as asked for, before a probe names the start it chose: what a sweep
    # compares a finished run with
    requested = config_to_dict(config)
    text = config.data.name in TEXT_DATASETS
    if text:
        train_set, val_set, test_stream = _text_data(config)
        in_chans = num_classes = 0
    else:
        in_chans, num_classes = data_shape(config)
    torch.manual_seed(config.seed)
    model = build_model(config, in_chans, num_classes)
    if not text:
        train_set, val_set, in_chans, num_classes = build_datasets(config, model)
    if config.smoke:
        # real data may be present: read only what a few steps and one evaluation need
        batch = config.optim.batch_size
        train_set = first_samples(train_set, (config.optim.steps or 1) * batch)
        val_set = first_samples(val_set, 2 * batch)
    if resume == "last":
        resume = out / "checkpoints" / "last.ckpt"
    engine = engine_config(
        config, len(train_set), resume=resume, progress=progress, stop_after=stop_after
    )
    probing = probe_chooses_start(config, len(train_set))
    resumed_probe = probing and resume is not None
    if resumed_probe:
        # the probe chose when the run began; its checkpoint's config names the start
        own = Path(resume).resolve() == (out / "checkpoints" / "last.ckpt").resolve()
        config, probe_record = _chosen_start(config, engine, Path(resume), own=own)
        engine = engine_config(
            config, len(train_set), resume=resume, progress=progress, stop_after=stop_after
        )
        probing = False
    if not probing:
        apply_structure(model, config)
    settings = config_to_dict(config)

    def start_run() -> None:
        """The run has started: the old run's files go, this one's config is written."""
        if replace:
            # a smoke run's stand-in data was written for this run, just now
            remove_library_files(out, standin=not config.smoke)
        save_atomically(
            lambda f: yaml.safe_dump(settings, f, sort_keys=False), out / "config.yaml", text=True
        )

    run_info = {"structure": config.structure.kind, "config": settings}
    if text:
        result = train_language_model(
            model, train_set, val_set, engine, run_info=run_info, before_fit=start_run
        )
    elif probing:
        from .start_probe import train_classifier_probing_start

        starts, configs = probe_starts(config, engine)

        def chosen(start: Any) -> None:
            # the run folder names the start it chose, so that its config rebuilds the model
            settings.clear()
            settings.update(config_to_dict(configs[start.name]))

        result = train_classifier_probing_start(
            model,
            train_set,
            val_set,
            engine,
            starts=starts,
            # a smoke run is a few steps on a few samples: probe at half of it, on a quarter
            probe=_recipe_probe(config),
            batch_mix=batch_mixer(config.data.mixup, config.data.cutmix, num_classes),
            run_info=lambda start: {
                "structure": "gblr",
                "config": config_to_dict(configs[start.name]),
            },
            before_fit=start_run,
            on_choice=chosen,
            report=report,
        )
    else:
        result = train_classifier(
            model,
            train_set,
            val_set,
            engine,
            batch_mix=batch_mixer(config.data.mixup, config.data.cutmix, num_classes),
            run_info=run_info,
            before_fit=start_run,
        )
    result = {"name": config.name, "structure": config.structure.kind, **result}
    if resumed_probe:
        result["start"] = config.structure.start
        if probe_record is not None:  # as the uninterrupted run reports it
            result["probe_seconds"] = probe_record.get("seconds")
            result["probe"] = probe_record.get("scores")
            if "continued_seconds" in probe_record:  # (not in records of older versions)
                result["seconds"] += probe_record["seconds"] - probe_record["continued_seconds"]
    if config.smoke:
        result["smoke"] = True
    if result.pop("global_rank") != 0:
        return result
    if text:
        from .text import strided_perplexity

        stride = config.data.eval_stride or config.data.seq_len
        result.update(strided_perplexity(model, test_stream, config.data.seq_len, stride))
    device = next(model.parameters()).device
    model_cost = count_model_flops(model.eval(), example_input(config).to(device))
    result.update(gflops=model_cost.gflops, dense_gflops=model_cost.dense_macs / 1e9)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomically(lambda f: torch.save(state, f), out / "model_state.pt")
    save_atomically(
        lambda f: json.dump(
            {"config": settings, "requested_config": requested, "result": result}, f, indent=2
        ),
        out / "results.json",
        text=True,
    )
    write_run_report(out)
    return result
