"""One process per run: an advisory lock next to each run file.

Two processes on the same results directory (two ``curvbench compare`` commands, the
workers of an executor, a requeued cluster job next to its stale twin) never train the
same run at once: :func:`run_lock` holds ``.<run_id>.lock`` (``flock``) while a run
trains. The operating system releases the lock when its process dies, however it
dies, so a killed process never leaves a run locked. A second process waits for the
lock and then finds the run file written (and loads it) or the resume checkpoint of
the process that died (and continues it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


def lock_path(run_file: Path) -> Path:
    """The lock file of a run file: hidden, next to it."""
    return run_file.with_name(f".{run_file.stem}.lock")


@contextlib.contextmanager
def run_lock(run_file: Path) -> Iterator[None]:
    """Hold the run's lock for the ``with`` block (waiting while another holds it)."""
    path = lock_path(run_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_locked(run_file: Path) -> bool:
    """True while another process holds the run's lock (it is training the run)."""
    path = lock_path(run_file)
    if fcntl is None or not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
