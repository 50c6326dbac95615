"""A run holds its outputs: one lock file per work folder or output, taken before any work.

    with hold_locks([work_dir, out_file]):
        ...                     # a second run on either is refused in one line naming this one

The lock is ``fcntl.flock`` on a small file (``<folder>/.lock``, or ``.<name>.lock`` beside a
file) that records the holder's pid, command and start time. The kernel drops a flock when its
process dies, however it dies (SIGKILL included), so a lock left by a dead run is free and is
simply taken over: no pid guessing, no stale-lock timeouts. Locks are re-entrant within one
process (the pipeline holds its outputs, then runs distill.py in-process on the same ones).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .data import DataError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

_HELD: dict[str, int] = {}  # resolved lock path -> open fd, for this process


class RunLockedError(DataError):
    """Another live run holds the work folder or output; one line naming it."""


def lock_path(target: str | Path, is_dir: bool) -> Path:
    """The lock file of a folder (``folder/.lock``) or of a file (``.name.lock`` beside it)."""
    target = Path(target)
    return target / ".lock" if is_dir else target.parent / f".{target.name}.lock"


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} ({info['command']}, started {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold_locks(folders=(), files=()):
    """Lock every folder and file (created parent folders as needed) for the ``with`` block;
    RunLockedError naming the holder if a live run holds one (nothing is left locked then)."""
    with contextlib.ExitStack() as stack:
        for target, is_dir in [(f, True) for f in folders] + [(f, False) for f in files]:
            stack.enter_context(_hold(lock_path(target, is_dir)))
        yield


@contextlib.contextmanager
def _hold(path: Path):
    key = str(path.resolve())
    if fcntl is None or key in _HELD:  # no flock here, or this process holds it already
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            target = path.parent if path.name == ".lock" else path.parent / path.name[1:-len(".lock")]
            raise RunLockedError(f"{target}: in use by a running run, {_holder_text(path)}; wait for it to "
                                 "finish or stop it") from None
        try:  # the holder we waited on may have unlinked the file: lock the one on disk
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    record = {"pid": os.getpid(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
              "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        # unlink while still holding the lock, so no waiting run can lock a file that is going away
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
