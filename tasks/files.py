"""File utilities shared by every layer: atomic writes and advisory locks.

The lowest layer of the package (nothing here imports the rest of it), so that the
dataset cache (:mod:`tasks.datacache`), the result files (:mod:`analysis.results`)
and the run locks (:mod:`runner.locks`) write and lock files the same way.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


def atomic_write(path: Path, write: Callable) -> None:
    """Write ``path`` through ``write(handle)`` to a temporary file, then rename it.

    A reader never sees a half-written file; an interrupted write leaves a
    ``.<name>.*.tmp`` file that :func:`analysis.results.remove_stale_temporaries`
    (or the next dataset build) deletes. The file gets the permissions of any new
    file (the user's umask), not ``mkstemp``'s 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the ``with`` block, waiting while
    another process holds it. The operating system releases it when its process
    dies, however it dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_locked(path: Path) -> bool:
    """True while another process holds the lock on ``path``."""
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
