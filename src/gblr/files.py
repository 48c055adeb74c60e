"""Files written atomically, by the conventions of ``cp`` and editors.

[`save_atomically`][gblr.files.save_atomically] is the one writer of every file the library saves
(frozen models, ONNX exports, run folders, reports, token caches): a reader sees the old file or the
new one, never a partial one. It sits at the bottom of the package (no torch, no gblr
imports) so that every layer can use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["copy_atomically", "process_alive", "replacement_target", "save_atomically"]

_TEMPORARY = re.compile(r"^\..*\.gblr-(?P<host>\w+)-(?P<pid>\d+)-\w+\.tmp$")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this machine is running (unknown: assumed running).

    Examples:
        >>> import os
        >>> from gblr.files import process_alive
        >>> process_alive(os.getpid())
        True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:  # no way to tell (a platform without signals): assume alive
        return True
    return True


def _sweep_temporaries(folder: Path) -> None:
    """Delete the temporary files of saves into ``folder`` whose process was killed.

    A killed process (``kill -9``, out of memory, power loss) cannot remove its own
    temporary file; the next save into the folder does. Only files named by
    [`save_atomically`][gblr.files.save_atomically] on this machine whose process is gone are
    deleted: a save in progress, or one on another machine sharing the folder, is never touched."""
    host, me = _host_tag(), os.getpid()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid != me and not process_alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def replacement_target(path: str | os.PathLike) -> Path:
    """The file that writing ``path`` replaces, by the conventions of ``cp`` and editors.

    - a symbolic link is followed: its target is rewritten and the link stays a link
      (a dangling link creates its target);
    - an existing file that is read-only (no write permission for this user, or no write
      bit at all, which protects it even from root) is refused, as ``cp`` and editors
      refuse it without ``-f``/``:w!``: make it writable or remove it first;
    - a folder is refused.

    Raises:
        PermissionError: the file is read-only.
        IsADirectoryError: ``path`` is a folder.
        OSError: ``path`` is a link that loops.

    Examples:
        >>> import os, tempfile
        >>> from pathlib import Path
        >>> from gblr.files import replacement_target
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "real.json").write_text("{}")
        2
        >>> os.symlink(folder / "real.json", folder / "link.json")
        >>> replacement_target(folder / "link.json") == (folder / "real.json").resolve()
        True
    """
    path = Path(path)
    target = path
    if path.is_symlink():
        try:
            target = Path(os.path.realpath(path, strict=True))
        except FileNotFoundError:  # dangling: writing creates the target, as cp does
            target = Path(os.path.realpath(path))
        except OSError as error:
            raise OSError(
                error.errno, f"{path} is a symbolic link that cannot be followed ({error})"
            ) from None
    if target.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"{path} is a folder, not a file; give the path of a file", str(path)
        )
    if target.exists() and (not os.access(target, os.W_OK) or not target.stat().st_mode & 0o222):
        raise PermissionError(
            errno.EACCES,
            f"{target} is read-only and is not replaced (as cp and editors refuse a "
            "read-only file); make it writable (chmod u+w) or remove it first",
            str(target),
        )
    return target


def save_atomically(
    write: Callable[[IO], object], path: str | os.PathLike, text: bool = False
) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it into place.

    A failed write (any exception, ``KeyboardInterrupt`` included) leaves the old file as
    it was and removes the temporary file; a reader sees the old file or the new one,
    never a partial one. A process killed mid-write cannot clean up: the next save into
    the same folder removes temporary files of processes that are gone. The file is
    flushed to disk before the rename. Symbolic links and read-only files follow
    `replacement_target` (the link's target is rewritten; a read-only file is
    refused). A new file gets the permissions a plain ``open`` would give it; a replaced
    file keeps its permissions. The folder is created when missing.

    Args:
        write: called once with the open file.
        path: the file to write.
        text: open the file in text mode, UTF-8 (newlines written as given), else binary.

    Raises:
        PermissionError: the file is read-only, or the folder is not writable.
        IsADirectoryError: ``path`` is a folder.
        Exception: whatever ``write`` raises (the old file is kept).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.files import save_atomically
        >>> path = Path(tempfile.mkdtemp()) / "notes.md"
        >>> save_atomically(lambda f: f.write("# notes\\n"), path, text=True)
        >>> path.read_text()
        '# notes\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = replacement_target(path)
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"{path} links to {target}, whose folder does not exist", str(path)
        )
    _sweep_temporaries(folder)
    if target.exists():
        permissions = stat.S_IMODE(target.stat().st_mode)  # cp keeps a replaced file's mode
    else:
        umask = os.umask(0)
        os.umask(umask)
        permissions = 0o666 & ~umask  # not mkstemp's private 0600
    # The name says which save made it, so that _sweep_temporaries can tell a dead one.
    prefix = f".{target.name[:100]}.gblr-{_host_tag()}-{os.getpid()}-"
    try:
        handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    except PermissionError as error:
        raise PermissionError(
            error.errno,
            f"cannot create a file in the folder {folder} ({error.strerror})",
            str(folder),
        ) from None
    try:
        try:
            if text:
                file = os.fdopen(handle, "w", encoding="utf-8", newline="")
            else:
                file = os.fdopen(handle, "wb")
        except BaseException:
            os.close(handle)
            raise
        with file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, permissions)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def copy_atomically(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the file ``source`` to ``target`` through `save_atomically`: a reader of
    ``target`` sees the old file or the whole copy.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gblr.files import copy_atomically
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.ckpt").write_bytes(b"state")
        >>> copy_atomically(folder / "a.ckpt", folder / "copy" / "b.ckpt")
        >>> (folder / "copy" / "b.ckpt").read_bytes()
        b'state'
    """
    with open(source, "rb") as handle:
        save_atomically(lambda out: shutil.copyfileobj(handle, out), target)
