"""save_atomically, the one writer of the library's files (issue 20): the conventions of
cp and editors for symbolic links and read-only files, and no temporary file left behind,
whether the write fails or the process is killed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gblr.files import replacement_target, save_atomically

ROOT = Path(__file__).resolve().parents[2]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "results.json"
    target.write_text("old")
    link = tmp_path / "results.json"
    link.symlink_to(target)
    save_atomically(lambda f: f.write("new"), link, text=True)
    assert link.is_symlink() and target.read_text() == "new"
    chain = tmp_path / "chain.json"  # a link to a link
    chain.symlink_to(link)
    save_atomically(lambda f: f.write("newer"), chain, text=True)
    assert chain.is_symlink() and link.is_symlink() and target.read_text() == "newer"
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(OSError, match="symbolic link that cannot be followed"):
        save_atomically(lambda f: f.write("x"), loop, text=True)
    assert names(tmp_path) == ["chain.json", "data", "loop.json", "results.json"]
    assert names(tmp_path / "data") == ["results.json"]


def test_a_read_only_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("precious")
    path.chmod(0o444)
    with pytest.raises(PermissionError, match=r"read-only and is not replaced.*chmod u\+w"):
        save_atomically(lambda f: f.write("new"), path, text=True)
    assert path.read_text() == "precious" and names(tmp_path) == ["results.json"]
    link = tmp_path / "link.json"  # a link to a read-only file: the file decides
    link.symlink_to(path)
    with pytest.raises(PermissionError):
        save_atomically(lambda f: f.write("new"), link, text=True)
    path.chmod(0o644)
    save_atomically(lambda f: f.write("new"), path, text=True)
    assert path.read_text() == "new"


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "secret.json"
    path.write_text("old")
    path.chmod(0o600)
    save_atomically(lambda f: f.write("new"), path, text=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "new"


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        save_atomically(lambda f: f.write(b"x"), tmp_path)
    assert replacement_target(tmp_path / "new.md") == tmp_path / "new.md"


@pytest.mark.parametrize("where", ["write", "fsync", "chmod", "replace"])
@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_no_temporary_is_left_whatever_step_fails(tmp_path, monkeypatch, where, failure):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail(*args, **kwargs):
        raise failure

    def write(handle):
        handle.write("partial")
        if where == "write":
            fail()

    if where != "write":
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(type(failure)):
        save_atomically(write, path, text=True)
    monkeypatch.undo()
    assert path.read_text() == "old" and names(tmp_path) == ["results.json"]


def test_text_is_written_as_utf8(tmp_path):
    save_atomically(lambda f: f.write("σ → 0.1\n"), tmp_path / "t.md", text=True)
    assert (tmp_path / "t.md").read_bytes() == "σ → 0.1\n".encode()


def _start_hanging_save(folder: Path, name: str) -> subprocess.Popen:
    """A process that writes half of ``folder/name`` and hangs there, as if it was busy."""
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from gblr.files import save_atomically

        def write(handle):
            handle.write(b"half of it")
            handle.flush()
            Path({str(folder / (name + ".started"))!r}).touch()
            time.sleep(120)

        save_atomically(write, Path({str(folder / name)!r}))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 60
    while not (folder / f"{name}.started").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    (folder / f"{name}.started").unlink()
    return process


def test_a_killed_save_leaves_no_temporary_after_the_next_save(tmp_path):
    killed = _start_hanging_save(tmp_path, "model_state.pt")
    busy = _start_hanging_save(tmp_path, "other.pt")
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(30)
        leftovers = [n for n in names(tmp_path) if n.startswith(".model_state.pt.")]
        assert len(leftovers) == 1  # kill -9: nothing runs, the temporary stays for now
        save_atomically(lambda f: f.write("{}"), tmp_path / "results.json", text=True)
        # the dead save's temporary is gone; the one of the save still running is not
        assert [n for n in names(tmp_path) if n.startswith(".")] == [
            n for n in names(tmp_path) if n.startswith(".other.pt.")
        ]
        assert len([n for n in names(tmp_path) if n.startswith(".other.pt.")]) == 1
    finally:
        for process in (killed, busy):
            if process.poll() is None:
                process.kill()
            process.wait(30)
    save_atomically(lambda f: f.write("{}"), tmp_path / "results.json", text=True)
    assert names(tmp_path) == ["results.json"]
