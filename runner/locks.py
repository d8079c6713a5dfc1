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
from collections.abc import Iterator
from pathlib import Path

from tasks import files


def lock_path(run_file: Path) -> Path:
    """The lock file of a run file: hidden, next to it."""
    return run_file.with_name(f".{run_file.stem}.lock")


@contextlib.contextmanager
def run_lock(run_file: Path) -> Iterator[None]:
    """Hold the run's lock for the ``with`` block (waiting while another holds it)."""
    with files.file_lock(lock_path(run_file)):
        yield


def is_locked(run_file: Path) -> bool:
    """True while another process holds the run's lock (it is training the run)."""
    return files.is_locked(lock_path(run_file))
