"""Issue 20, points 1 and 2: no file runs code, and no run folder is ever lost.

Every entry point that reads a file a user may have been given (a checkpoint to resume
or to count, a run folder's model, CIFAR's pickles) is fed a pickle whose ``__reduce__``
runs a shell command; the command would create a marker file, which must never appear.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("yaml")
from gblr.cli import main
from gblr.recipes.data import load_cifar, read_array_pickle
from gblr.recipes.engine import check_resume, read_checkpoint
from gblr.recipes.run_folder import LOCK_NAME, RunFolderError, RunLock, library_files
from gblr.recipes.train import model_from_run

TINY = ["model.dim=16", "model.depth=1", "model.heads=2", "optim.steps=4", "optim.warmup=0"]
TINY += ["trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=2"]
TINY += ["trainer.log_every_n_steps=1"]


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a file ran code"


def evil_checkpoint(path, marker):
    """A file shaped like the engine's checkpoints, with one object that runs code."""
    torch.save({"state_dict": {}, "gblr": {"config": RunsAShellCommand(marker)}}, path)
    return path


def train_argv(out, *extra):
    return ["train", "--config", "digits-vit-gblr", *TINY, "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 4-step run, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_argv(out)) == 0
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def snapshot(out):
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


# -- 1. nothing unpickles an untrusted file -------------------------------------------


def test_the_marker_would_appear_if_a_file_ran_code(tmp_path):
    """The check below can fail: loading the evil file the unsafe way runs the command."""
    path = evil_checkpoint(tmp_path / "evil.ckpt", tmp_path / "ran")
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_gblr_flops_on_a_code_running_checkpoint_refuses_it(tmp_path, marker, capsys):
    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    assert main(["flops", str(path)]) == 1
    assert "cannot read the checkpoint" in capsys.readouterr().err


def test_library_readers_refuse_a_code_running_checkpoint(tmp_path, marker):
    from gblr.recipes.models import VisionTransformer

    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        check_resume(path, VisionTransformer(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        model_from_run(path)


def test_resume_from_a_code_running_checkpoint_refuses_it(tmp_path, marker, capsys):
    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    assert main(train_argv(tmp_path / "run", "--resume", str(path))) == 1
    assert "cannot read the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_a_run_folders_code_running_model_state_is_refused(finished_run, tmp_path, marker):
    out = copy_run(finished_run, tmp_path)
    torch.save({"weight": RunsAShellCommand(marker)}, out / "model_state.pt")
    with pytest.raises(ValueError, match="cannot read the model state"):
        model_from_run(out)


def test_cifar_pickles_are_checked_before_they_are_read(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": RunsAShellCommand(marker), "labels": [0]}, handle)
    with pytest.raises(ValueError, match=r"not the official CIFAR-10 file \(MD5 [0-9a-f]{32}"):
        load_cifar(tmp_path, train=False)
    # without the checksum (your own files in CIFAR's format) the reader builds arrays,
    # lists and strings only: the callable is refused before it is looked up
    with pytest.raises(ValueError, match=r"(posix|os)\.system"):
        load_cifar(tmp_path, train=False, verify=False)


@pytest.mark.parametrize(
    "payload",
    [
        {"data": [1, 2], "labels": "abc", "nested": ({"x": 1.5},), b"raw": None},
        [torch.zeros(1).numpy(), "text"],
    ],
)
def test_the_array_reader_returns_what_plain_pickle_returns(tmp_path, payload):
    import numpy as np

    path = tmp_path / "plain"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    expected = pickle.loads(path.read_bytes(), encoding="latin1")
    got = read_array_pickle(path)
    assert repr(got) == repr(expected)
    if isinstance(payload, list):
        assert isinstance(got[0], np.ndarray)


def test_truncated_array_pickle_names_the_file(tmp_path):
    path = tmp_path / "cut"
    path.write_bytes(pickle.dumps({"data": list(range(100))})[:20])
    with pytest.raises(ValueError, match="cut"):
        read_array_pickle(path)


# -- 2. a run folder is never lost ----------------------------------------------------


def test_the_same_train_command_twice_leaves_the_first_run_intact(finished_run, capsys):
    before = snapshot(finished_run)
    capsys.readouterr()
    assert main(train_argv(finished_run)) == 1
    error = capsys.readouterr().err
    assert "holds a run already" in error and "--overwrite" in error and "--resume" in error
    assert snapshot(finished_run) == before
    assert not (finished_run / LOCK_NAME).exists()


def test_overwrite_replaces_only_what_gblr_wrote(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    (out / "checkpoints" / "my-notes.txt").write_text("mine")
    (out / "figures" / "my-plot.png").write_bytes(b"mine")
    (out / "checkpoints" / "epoch=0-step=999.ckpt").write_bytes(b"an old periodic checkpoint")
    assert main(train_argv(out, "--overwrite", "seed=1")) == 0
    assert (out / "checkpoints" / "my-notes.txt").read_text() == "mine"
    assert (out / "figures" / "my-plot.png").read_bytes() == b"mine"
    assert not (out / "checkpoints" / "epoch=0-step=999.ckpt").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == [
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]  # no last-v1.ckpt: a later --resume continues this run
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 1


def test_a_run_failing_at_start_up_changes_nothing(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    # Lightning refuses the strategy when it builds its Trainer: after the data and the
    # model, before training, where the old run's files would have gone
    assert main(train_argv(out, "--overwrite", "trainer.strategy=no-such-strategy")) == 1
    assert "invalid strategy name" in capsys.readouterr().err
    assert snapshot(out) == before
    assert not (out / LOCK_NAME).exists()


def test_a_real_run_replacing_a_smoke_run_keeps_the_users_files(tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(out, "--smoke")) == 0
    (out / "checkpoints" / "keep.txt").write_text("mine")
    assert main(train_argv(out)) == 0
    assert (out / "checkpoints" / "keep.txt").read_text() == "mine"
    assert "smoke" not in json.loads((out / "results.json").read_text())["result"]


def test_a_run_does_not_write_over_files_named_as_its_own_but_not_from_a_run(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "REPORT.md").write_text("my notes")
    (out / "metrics.csv").write_text("a,b\n1,2\n")
    before = snapshot(out)
    assert main(train_argv(out)) == 1
    error = capsys.readouterr().err
    assert "REPORT.md, metrics.csv, named as a run's files, but no gblr run" in error
    assert "--overwrite" in error
    assert snapshot(out) == before
    assert main(train_argv(out, "--overwrite")) == 0  # told: they are replaced
    assert (out / "REPORT.md").read_text() != "my notes"


def test_a_users_results_json_is_not_called_a_finished_run(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"accuracy": 0.9}')
    assert main(train_argv(out)) == 1
    assert "its results.json is not one that gblr wrote" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"accuracy": 0.9}'


def test_demo_and_sweep_keep_a_users_files_of_their_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "gblr-demo"
    (demo / "dense").mkdir(parents=True)
    (demo / "results.md").write_text("my results")
    (demo / "dense" / "REPORT.md").write_text("my report")
    before = snapshot(demo)
    argv = ["demo", "--steps", "2", "--structures", "dense", "--quiet"]
    assert main([*argv, "--smoke"]) == 1  # a smoke demo refuses
    assert "that no gblr demo wrote there" in capsys.readouterr().err
    assert main(argv) == 0  # a demo goes to the next free folder
    assert "this one writes to gblr-demo-2" in capsys.readouterr().out
    assert snapshot(demo) == before
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.md").write_text("my sweep")
    sweep_argv = ["sweep", "--config", "digits-vit-gblr", *TINY, "--structures", "dense"]
    assert main([*sweep_argv, "--budgets", "0.5", "--out", str(sweep), "--quiet"]) == 1
    assert "which no gblr sweep wrote" in capsys.readouterr().err
    assert snapshot(sweep) == {"sweep.md": b"my sweep"}


def test_a_sweep_does_not_report_a_finished_run_of_another_config_as_its_own(tmp_path, capsys):
    # it read the finished run's results.json whatever the config now said
    out = tmp_path / "sweep"

    def sweep(*overrides):
        return ["sweep", "--config", "digits-vit-gblr", *TINY, *overrides, "--structures", "dense"]

    assert main([*sweep(), "--out", str(out), "--quiet"]) == 0
    before = snapshot(out / "dense")
    assert main([*sweep("optim.lr=0.01"), "--out", str(out), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "holds a finished run of another config (optim.lr: 0.002 there, 0.01 now)" in error
    assert snapshot(out / "dense") == before
    assert main([*sweep(), "--out", str(out), "--quiet"]) == 0  # the same config: read
    assert "done before" in capsys.readouterr().out
    # a smoke sweep of another config replaces its own smoke run
    smoke = tmp_path / "smoke"
    assert main([*sweep(), "--out", str(smoke), "--smoke", "--quiet"]) == 0
    assert main([*sweep("seed=3"), "--out", str(smoke), "--smoke", "--quiet"]) == 0
    assert json.loads((smoke / "dense" / "results.json").read_text())["config"]["seed"] == 3


def test_a_second_run_into_a_busy_folder_is_refused(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    with RunLock(out):
        assert main(train_argv(out, "--overwrite")) == 1
    assert "another gblr run (process" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    import socket

    folder = tmp_path / "run"
    folder.mkdir()
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    with RunLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    # a live process's lock (this one's, as another machine would see it) is respected
    record["pid"] = os.getpid()
    (folder / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(RunFolderError, match="another gblr run"):
        RunLock(folder).acquire()
    # a file where the folder should be: said so ("Not a directory: .../.gblr-run.lock")
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(RunFolderError, match="is a file: give a folder"):
        RunLock(tmp_path / "afile").acquire()
    assert (tmp_path / "afile").read_text() == "mine"


def test_resume_with_a_changed_config_is_refused_and_names_the_keys(finished_run, capsys):
    before = snapshot(finished_run)
    capsys.readouterr()
    assert main(train_argv(finished_run, "--resume", "optim.lr=0.5")) == 1
    error = capsys.readouterr().err
    assert "optim.lr: 0.002 in the checkpoint, 0.5 now" in error  # parsed as an override
    assert snapshot(finished_run) == before


def test_resume_takes_an_override_after_it_and_continues_the_run(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    # where it logs may change on resume; the run itself is the checkpoint's
    assert main(train_argv(out, "--resume", "trainer.log_every_n_steps=1")) == 0
    assert json.loads((out / "results.json").read_text())["result"]["steps"] == 4


def test_a_checkpoint_named_like_an_override_is_still_a_checkpoint(tmp_path, monkeypatch):
    from gblr.cli import _override_after_resume, build_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "step=4.ckpt").write_bytes(b"")
    args = build_parser().parse_args(["train", "--resume", "step=4.ckpt", "optim.lr=1"])
    _override_after_resume(args)
    assert (args.resume, args.overrides) == ("step=4.ckpt", ["optim.lr=1"])
    args = build_parser().parse_args(["train", "--resume", "optim.lr=1"])
    _override_after_resume(args)
    assert (args.resume, args.overrides) == ("last", ["optim.lr=1"])


def test_a_corrupt_last_checkpoint_gives_one_clear_line(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert main(train_argv(out, "--resume")) == 1
    error = capsys.readouterr().err
    assert "cannot read the checkpoint" in error and "last.ckpt" in error


def test_library_files_lists_only_what_runs_write(finished_run):
    names = {str(p.relative_to(finished_run)) for p in library_files(finished_run)}
    assert {"config.yaml", "results.json", "model_state.pt", "REPORT.md"} <= names
    assert {"checkpoints/last.ckpt", "metrics.csv"} <= names
    everything = {str(p.relative_to(finished_run)) for p in finished_run.rglob("*")}
    assert names <= everything


def test_demo_twice_keeps_the_first_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--steps", "2", "--structures", "dense", "--quiet"]
    assert main(argv) == 0
    first = snapshot(tmp_path / "gblr-demo")
    assert main(argv) == 0
    assert "gblr-demo holds an earlier demo (kept); this one writes to gblr-demo-2" in (
        capsys.readouterr().out
    )
    assert snapshot(tmp_path / "gblr-demo") == first
    assert (tmp_path / "gblr-demo-2" / "results.json").is_file()


def test_an_unfinished_sweep_run_is_continued_only_when_it_is_the_same_run(tmp_path):
    import yaml

    from gblr.recipes.config import config_to_dict, load_config
    from gblr.recipes.sweep import _continue

    run = load_config("digits-vit-gblr", [f"out={tmp_path / 'gblr-0.3'}"])
    folder = tmp_path / "gblr-0.3"
    assert _continue(run) == {}  # nothing there: a fresh run
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(run)))
    assert _continue(run) == {"overwrite": True}  # its own run, stopped before a checkpoint
    other = load_config("digits-vit-gblr", ["optim.lr=0.5", f"out={folder}"])
    assert _continue(other) == {"overwrite": False}  # another run: train_from_config refuses
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert _continue(run) == {"resume": "last"}  # check_resume then compares the configs
    (folder / "config.yaml").write_text("smoke: true\n")
    assert _continue(run) == {}  # a smoke run is never continued by a real one


def test_a_code_running_token_cache_is_ignored_not_run(tmp_path, marker):
    from gblr.recipes.text import load_tokenizer, token_stream

    tokenizer, cache = load_tokenizer("bytes"), tmp_path / "cache"
    expected = token_stream("some text to tokenize", tokenizer, cache_dir=cache)
    (written,) = [p for p in cache.iterdir() if p.is_file() and not p.name.startswith(".")]
    torch.save({"ids": RunsAShellCommand(marker)}, written)
    with pytest.warns(UserWarning, match="ignoring unreadable token cache"):
        again = token_stream("some text to tokenize", tokenizer, cache_dir=cache)
    assert torch.equal(again, expected)


def test_a_sweep_without_budgets_runs_the_configs_own(tmp_path):
    # --budgets defaulted to 0.3, dropping the configs' (and the overrides') budgets
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", "digits-vit-gblr", *TINY, "structure.budget=0.5"]
    assert main([*argv, "--structures", "gblr", "--out", str(out), "--smoke", "--quiet"]) == 0
    assert (out / "gblr-0.5" / "results.json").is_file()
    assert [row["budget"] for row in json.loads((out / "sweep.json").read_text())["rows"]] == [0.5]


def test_resume_and_overwrite_together_are_refused(finished_run, tmp_path, capsys):
    # accepted in silence (it resumed)
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    assert main(train_argv(out, "--resume", "--overwrite")) == 1
    assert "resume and overwrite contradict each other" in capsys.readouterr().err
    assert snapshot(out) == before


def test_load_config_refuses_one_string_of_overrides():
    from gblr.recipes.config import load_config

    with pytest.raises(TypeError, match=r"overrides must be a list .* pass \['optim.lr=0.01'\]"):
        load_config("digits-vit-gblr", "optim.lr=0.01")


def test_a_run_stopped_before_its_first_checkpoint_is_not_offered_a_resume(tmp_path):
    # "unfinished: ... it may be resumed", and --resume then found no checkpoint
    from gblr.recipes.run_folder import RunFolderError, claim_folder

    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(RunFolderError, match="no checkpoint to resume from; --overwrite"):
        claim_folder(tmp_path, smoke=False, resume=False, overwrite=False)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(RunFolderError, match="it may be resumed"):
        claim_folder(tmp_path, smoke=False, resume=False, overwrite=False)


def test_a_sweep_of_more_runs_keeps_the_earlier_rows_and_checks_every_run_first(tmp_path, capsys):
    """A second sweep into the folder rewrote sweep.md with its own runs alone (a table of
    seven rows became one); and a finished run of another config stopped a sweep only when
    reached, after the runs before it had trained."""
    out = tmp_path / "sweep"
    base = ["sweep", "--config", "digits-vit-gblr", *TINY, "--out", str(out), "--quiet"]
    assert main([*base, "--structures", "dense"]) == 0
    assert main([*base, "--structures", "lowrank", "--budgets", "0.5"]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(row["structure"], row["budget"]) for row in rows] == [("dense", 1.0), ("lowrank", 0.5)]
    assert "| dense" in (out / "sweep.md").read_text()
    # lowrank-0.5 (second in the sweep) was run with optim.lr=0.002: with another rate the
    # sweep is refused before its first run (gblr-0.5) trains
    changed = [*base, "optim.lr=0.01", "--structures", "gblr", "lowrank", "--budgets", "0.5"]
    assert main(changed) == 1
    assert "holds a finished run of another config" in capsys.readouterr().err
    assert not (out / "gblr-0.5").exists()


def test_a_run_lock_leaves_no_empty_folder_it_made(tmp_path):
    """A refused `gblr train` (default out `runs/<name>`) left an empty `runs/` behind in
    the working folder: the lock made it and removed only the run folder."""
    folder = tmp_path / "runs" / "deep" / "run"
    with RunLock(folder):
        assert folder.is_dir()
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()
    with RunLock(folder):
        (folder.parent / "mine.txt").write_text("a user's file")  # stops the clean-up there
    assert not folder.exists() and (folder.parent / "mine.txt").is_file()
