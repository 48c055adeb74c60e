"""Run folders: which run may write into one, and what the library may delete from one.

The one place that keeps smoke runs and real runs apart
([`smoke_kind`][gblr.recipes.run_folder.smoke_kind],
[`claim_folder`][gblr.recipes.run_folder.claim_folder],
[`refuse_real_folder`][gblr.recipes.run_folder.refuse_real_folder], the smoke banner) and that locks
a folder ([`RunLock`][gblr.recipes.run_folder.RunLock]); the library's one atomic writer is
[`gblr.files.save_atomically`][].

A run folder (``config.out``) belongs to one run. A new run refuses a folder that holds
another run unless told to replace it (``overwrite``) or to continue it (``resume``); a
lock file refuses a second run writing into the same folder at the same time; replacing
a run removes only the files the library writes (a user's own files stay), and only
once the new run has started, so a run that fails at start-up leaves the old one whole.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..files import process_alive, save_atomically

__all__ = [
    "SMOKE_BANNER",
    "RunFolderError",
    "RunLock",
    "claim_folder",
    "holds_run",
    "is_launching_process",
    "library_files",
    "mark_smoke_report",
    "refuse_real_folder",
    "remove_library_files",
    "smoke_kind",
    "unused_folder",
]

LOCK_NAME = ".gblr-run.lock"

# What a run writes, relative to its folder. Lightning names checkpoints ``last.ckpt``
# (``last-vN.ckpt`` when one exists) and ``epoch=E-step=S.ckpt``; TensorBoard writes
# event files and ``hparams.yaml``; the report writes three figures.
_RUN_PATTERNS = (
    "config.yaml",
    "metrics.csv",
    "metrics.before-resume.csv",
    "model_state.pt",
    "results.json",
    "REPORT.md",
    "checkpoints/last.ckpt",
    "checkpoints/last-v*.ckpt",
    "checkpoints/epoch=*-step=*.ckpt",
    "checkpoints/*.ckpt.tmp*",
    ".*.gblr-*-*-*.tmp",  # a killed save_atomically's temporary file
    "tensorboard/events.out.tfevents.*",
    "tensorboard/hparams.yaml",
    "figures/macs_per_layer.png",
    "figures/masks.png",
    "figures/training.png",
)
# What a smoke run's stand-in data writer (gblr.recipes.smoke) puts under ``smoke-data``.
_STANDIN_PATTERNS = (
    "*/cifar-10-batches-py/data_batch_[1-5]",
    "*/cifar-10-batches-py/test_batch",
    "*/cifar-100-python/train",
    "*/cifar-100-python/test",
    "*/train/n*/[0-9]*.png",
    "*/val/n*/[0-9]*.png",
    "*/train.txt",
    "*/valid.txt",
    "*/test.txt",
    "*/wiki.train.raw",
    "*/wiki.valid.raw",
    "*/wiki.test.raw",
)
SMOKE_DATA = "smoke-data"
# Checked to tell whether a folder holds a run (of any kind: train, smoke or demo).
_RUN_MARKERS = ("config.yaml", "results.json", "model_state.pt")


class RunFolderError(ValueError):
    """A run folder holds another run, or another run is writing into it (a
    ``ValueError``, so that the command line prints it as one line).

    Examples:
        >>> from gblr.recipes.run_folder import RunFolderError
        >>> issubclass(RunFolderError, ValueError)
        True
    """


def holds_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds (part of) a run: its config, results, model or a checkpoint.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import holds_run
        >>> folder = Path(tempfile.mkdtemp())
        >>> holds_run(folder)
        False
        >>> _ = (folder / "notes.txt").write_text("mine")  # a user's file is not a run
        >>> holds_run(folder)
        False
        >>> (folder / "checkpoints").mkdir()
        >>> _ = (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
        >>> holds_run(folder)
        True
    """
    folder = Path(folder).expanduser()
    if any((folder / name).is_file() for name in _RUN_MARKERS):
        return True
    return (folder / "checkpoints").is_dir() and any((folder / "checkpoints").glob("*.ckpt"))


def library_files(folder: str | Path) -> list[Path]:
    """The files in ``folder`` that a run of the library writes (sorted), and nothing else:
    what [`remove_library_files`][gblr.recipes.run_folder.remove_library_files] may delete.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import library_files
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "checkpoints").mkdir()
        >>> for name in ("config.yaml", "checkpoints/last.ckpt", "checkpoints/mine.ckpt"):
        ...     _ = (folder / name).write_text("")
        >>> [str(path.relative_to(folder)) for path in library_files(folder)]
        ['checkpoints/last.ckpt', 'config.yaml']
    """
    folder = Path(folder).expanduser()
    return sorted({*_matching(folder, _RUN_PATTERNS), *standin_files(folder / SMOKE_DATA)})


def standin_files(root: Path) -> set[Path]:
    """The stand-in data files that a smoke run wrote under ``root`` (its ``smoke-data``)."""
    return _matching(root, _STANDIN_PATTERNS)


def _matching(root: Path, patterns: tuple[str, ...]) -> set[Path]:
    # a link is never the library's: it may point at a user's file
    return {p for q in patterns for p in root.glob(q) if p.is_file() and not p.is_symlink()}


def remove_library_files(folder: str | Path, *, standin: bool = True) -> list[Path]:
    """Delete what a run of the library wrote into ``folder`` (see
    [`library_files`][gblr.recipes.run_folder.library_files]) and the library's sub-folders left
    empty; a user's files, and the folders holding them, stay. ``standin``: also a smoke run's
    stand-in data under ``folder/smoke-data``.

    Returns:
        The deleted files.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import remove_library_files
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "figures").mkdir()
        >>> for name in ("results.json", "figures/masks.png", "figures/my-plot.png"):
        ...     _ = (folder / name).write_text("")
        >>> len(remove_library_files(folder))
        2
        >>> sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        ['figures', 'figures/my-plot.png']
    """
    folder = Path(folder).expanduser()
    files = library_files(folder)
    if not standin:
        kept = standin_files(folder / SMOKE_DATA)
        files = [path for path in files if path not in kept]
    for path in files:
        # tolerant: under DDP every process may start here and find a file gone already
        path.unlink(missing_ok=True)
    # deepest first, so that a folder emptied by removing its sub-folders goes too
    folders = {path.parent for path in files}
    for path in list(folders):
        folders.update(p for p in path.parents if folder in p.parents)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if path != folder and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return files


def is_launching_process() -> bool:
    """Whether this process owns the run folder: the one a person started, not a worker
    that a launcher (Lightning's DDP, torchrun, SLURM) started for another device.

    Examples:
        >>> from gblr.recipes.run_folder import is_launching_process
        >>> is_launching_process()  # a test process, started by nobody else
        True
    """
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "0").strip()
        if value not in ("", "0"):
            return False
    return True


class RunLock:
    """A lock file in a run folder that keeps a second run from writing into it at the
    same time; a lock left by a run that died (same machine, its process gone) is taken
    over. Use as a context manager; the folder (and any missing folder above it, such as
    ``runs/``) is created when missing and removed again on release if the lock was all
    it held.

    Raises:
        RunFolderError: another live run holds the folder (named, with its process id).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import RunFolderError, RunLock
        >>> folder = Path(tempfile.mkdtemp()) / "runs" / "run"
        >>> with RunLock(folder):
        ...     try:
        ...         RunLock(folder).acquire()
        ...     except RunFolderError as error:
        ...         print(str(error)[:30])
        another gblr run (process ...
        >>> folder.exists(), folder.parent.exists()  # they held nothing but the lock
        (False, False)
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOCK_NAME
        self._held = False
        self._created: list[Path] = []  # the folders acquire made, innermost first

    def acquire(self) -> RunLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(
                f"the run folder {self.folder} is a file: give a folder (out= / --out)"
            )
        missing = self.folder
        while not missing.exists():
            self._created.append(missing)
            missing = missing.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise RunFolderError(self._busy_message()) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as file:
                json.dump(record, file)
            self._held = True
            return self
        raise RunFolderError(self._busy_message())

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _stale(self) -> bool:
        owner = self._owner()
        pid = owner.get("pid")
        if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
            # another machine's run (a shared file system), or a lock being written now
            return False
        return not process_alive(pid)

    def _busy_message(self) -> str:
        owner = self._owner()
        since = owner.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
        return (
            f"another gblr run (process {owner.get('pid', '?')} on {owner.get('host', '?')}, "
            f"started {when}) is writing into {self.folder}; wait for it to end or choose "
            f"another --out. If no such run is alive, delete {self.path}"
        )

    def release(self) -> None:
        if not self._held:
            return
        self.path.unlink(missing_ok=True)
        self._held = False
        for folder in self._created:  # while empty: a run that wrote nothing leaves nothing
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


SMOKE_BANNER = (
    "> **Smoke run** (`--smoke`): a few steps of a tiny stand-in model of the config's "
    "family, on stand-in data where the real data was absent, to check the setup. Its "
    "numbers are not results.\n\n"
)


def smoke_kind(folder: str | Path) -> bool | None:
    """Whether ``folder`` holds a smoke run, sweep or demo (``True``), another one
    (``False``) or neither (``None``), as its ``config.yaml``, ``sweep.json`` or (a demo)
    ``results.json`` says.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import smoke_kind
        >>> folder = Path(tempfile.mkdtemp())
        >>> print(smoke_kind(folder))
        None
        >>> _ = (folder / "config.yaml").write_text("smoke: true")
        >>> smoke_kind(folder)
        True
    """
    folder = Path(folder).expanduser()
    try:
        if (folder / "config.yaml").is_file():
            import yaml

            data = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        elif (folder / "sweep.json").is_file():
            data = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
            data = data.get("config") if isinstance(data, dict) else None
        elif (folder / "results.json").is_file():  # gblr demo: its settings hold the flag
            data = json.loads((folder / "results.json").read_text(encoding="utf-8"))
            data = data.get("settings") if isinstance(data, dict) else None
        else:
            return None
    except (OSError, UnicodeDecodeError, ValueError, ImportError):
        return False  # unreadable: taken as a real run, which nothing replaces untold
    if not isinstance(data, dict):
        return False  # a file of that name that gblr did not write: as a real run
    return bool(data.get("smoke", False))


def refuse_real_folder(folder: str | Path, what: str = "run") -> None:
    """Refuse to write a smoke run (or sweep, or demo: ``what``) into a folder that holds
    a real run, sweep or demo.

    Raises:
        ValueError: naming the folder.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import refuse_real_folder
        >>> folder = Path(tempfile.mkdtemp())
        >>> refuse_real_folder(folder)  # empty: a smoke run may go there
        >>> _ = (folder / "config.yaml").write_text("smoke: false")
        >>> try:
        ...     refuse_real_folder(folder, "sweep")
        ... except ValueError as error:
        ...     print(str(error).split(" holds ")[1].split(";")[0])
        a sweep that is not a smoke run
    """
    if smoke_kind(folder) is False:
        raise ValueError(
            f"{folder} holds a {what} that is not a smoke run; --smoke would overwrite it. "
            f"Give the smoke {what} another folder with --out"
        )


def mark_smoke_report(path: str | Path) -> None:
    """Put `SMOKE_BANNER` on top of a Markdown report (once).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import SMOKE_BANNER, mark_smoke_report
        >>> path = Path(tempfile.mkdtemp()) / "REPORT.md"
        >>> _ = path.write_text("# Run report")
        >>> mark_smoke_report(path); mark_smoke_report(path)
        >>> path.read_text() == SMOKE_BANNER + "# Run report"
        True
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.startswith(SMOKE_BANNER):
        save_atomically(lambda f: f.write(SMOKE_BANNER + text), path, text=True)


def claim_folder(out: str | Path, *, smoke: bool, resume: bool, overwrite: bool) -> bool:
    """Refuse ``out`` when it holds a run that a new run may not write over; returns
    whether the old run's files are to be deleted when the new one starts.

    A smoke run (``smoke``) replaces a smoke run without asking and never replaces a real
    run unless told (``overwrite``); a real run replaces a smoke run but cannot resume
    one; another real run is continued (``resume``) or replaced (``overwrite``) only when
    told.

    Raises:
        RunFolderError: the folder holds a run this one may not write over; the message
            says what is there and which option to give.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import RunFolderError, claim_folder
        >>> folder = Path(tempfile.mkdtemp())
        >>> claim_folder(folder, smoke=False, resume=False, overwrite=False)  # empty
        False
        >>> _ = (folder / "config.yaml").write_text("smoke: true")
        >>> claim_folder(folder, smoke=False, resume=False, overwrite=False)  # replaces it
        True
        >>> _ = (folder / "config.yaml").write_text("smoke: false")
        >>> try:
        ...     claim_folder(folder, smoke=False, resume=False, overwrite=False)
        ... except RunFolderError as error:
        ...     print(str(error).split(" holds ")[1].split(" (")[0])
        a run already
    """
    out = Path(out).expanduser()
    if not holds_run(out):
        # Files named as a run's (a REPORT.md, a metrics.csv) but no run: most likely the
        # user's own, which the run would write over.
        # (A smoke run's stand-in data is written before the folder is claimed.)
        stray = [str(path.relative_to(out)) for path in sorted(_matching(out, _RUN_PATTERNS))]
        if stray and not overwrite:
            raise RunFolderError(
                f"{out} holds {', '.join(stray[:4])}{', ...' if len(stray) > 4 else ''}, "
                "named as a run's files, but no gblr run (no config.yaml, results.json, "
                "model_state.pt or checkpoint); this run would write over them, so nothing "
                "was changed. Give it another folder with --out, move them, or --overwrite "
                "to replace them"
            )
        return bool(stray)
    kind = smoke_kind(out)
    if smoke and kind is False and not overwrite:
        raise RunFolderError(
            f"{out} holds a run that is not a smoke run; --smoke would overwrite it. Give "
            "the smoke run another folder with --out (or --overwrite to replace the run)"
        )
    if kind is True and not smoke:
        if resume:
            raise RunFolderError(
                f"{out} holds a smoke run (--smoke): there is no real run to resume; "
                "start it without --resume"
            )
        return True  # a smoke run only checked the setup: the real run takes its place
    if resume:
        return False  # continues the run (the engine's check_resume compares the configs)
    if smoke or overwrite:
        return True
    raise RunFolderError(
        f"{out} holds a run already ({_run_summary(out)}); nothing was changed. To continue "
        "it: --resume; to replace it: --overwrite (deletes only the files gblr wrote "
        "there); or give this run another folder with --out"
    )


def _run_summary(out: Path) -> str:
    results = out / "results.json"
    if results.is_file():
        try:
            result = json.loads(results.read_text(encoding="utf-8"))["result"]
            return f"finished: {result['steps']} steps of {result['name']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its results.json is not one that gblr wrote"
    if (out / "checkpoints" / "last.ckpt").is_file():
        return "unfinished: no results.json; it may be resumed"
    # stopped before its first checkpoint: nothing to resume from
    return (
        "unfinished: no results.json and no checkpoint to resume from; --overwrite starts it again"
    )


def unused_folder(out: str | Path, holds: Callable[[Path], bool]) -> Path:
    """``out`` when ``holds(out)`` is false, else the first of ``OUT-2``, ``OUT-3``, ...
    that does not exist: a new folder for a run that keeps earlier ones, as Lightning's
    loggers give each run a new version.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.recipes.run_folder import holds_run, unused_folder
        >>> folder = Path(tempfile.mkdtemp()) / "demo"
        >>> unused_folder(folder, holds_run) == folder
        True
        >>> folder.mkdir(); _ = (folder / "results.json").write_text("{}")
        >>> unused_folder(folder, holds_run).name
        'demo-2'
    """
    out = Path(out)
    if not holds(out):
        return out
    return next(
        folder
        for folder in (out.with_name(f"{out.name}-{k}") for k in range(2, 10_000))
        if not folder.exists()
    )
