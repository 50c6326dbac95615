"""Atomic writes: every artefact goes to a temp file in the same folder, then is renamed.

A crash or SIGKILL therefore leaves either the previous complete file or none, never a
half-written one (os.replace is atomic on POSIX and Windows within one file system).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync, then rename into place.

    The temp file is ``.<name>.<pid>.<random>.tmp``: a writer killed mid-write (SIGKILL, power
    loss) leaves one behind, and the next write of the same file removes it once its pid is
    dead. A failing write (a full disk, a folder turned read-only) removes its temp file,
    leaves the previous ``path`` untouched and raises an OSError naming ``path``."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    remove_dead_temp_files(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the usual open() permissions
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(err, OSError) and err.errno is not None:
            # name the file being written, not the temp file (or nothing, as write() errors do)
            raise type(err)(err.errno, f"{os.strerror(err.errno)} while writing it; the previous file, if any, "
                            "is unchanged", str(path)) from None
        raise
    return path


def remove_dead_temp_files(path: str | Path) -> list[Path]:
    """Remove the temp files of ``path`` (``.<name>.<pid>.*.tmp``) whose writer is no longer
    alive: left by a run killed mid-write, they are never complete. Returns what was removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def ensure_writable_dir(folder: str | Path) -> Path:
    """Create ``folder`` if needed; PermissionError naming it unless files can be written there.
    Lets a long run fail at its start rather than when it saves its result."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PermissionError(f"{folder}: output folder cannot be created (permission denied)") from None
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{folder}: output folder is not writable")
    return folder


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save through a temp file + rename."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def output_problem(path: str | Path, is_dir: bool = False) -> str | None:
    """What stops ``path`` (a file, or a folder when ``is_dir``) from being written, checked
    before any work and without creating anything: a folder where a file goes (or the
    reverse), a regular file among its parents; PermissionError (as ensure_writable_dir)
    when the folder that would hold it is not writable. None if it can be written."""
    path = Path(path)
    if path.exists():
        if is_dir and not path.is_dir():
            return f"{path}: is a file, expected a folder"
        if not is_dir and path.is_dir():
            return f"{path}: is a folder, expected a file path"
    folder = path if is_dir and path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{path}: cannot be created, {folder} is a file, not a folder"
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{folder}: output folder is not writable")
    return None
