"""What runs inside an executor's worker process: set up once, then train runs.

This module imports no JAX at module level: a freshly spawned worker must set its
XLA flags (one thread) before JAX creates its CPU backend. :func:`setup` does that,
points JAX's persistent compilation cache at the executor's directory (so workers
share compiled programs instead of each compiling its own) and makes plug-in
modules importable as in the parent. :func:`train_run` trains one run and returns a
small outcome; the run file itself is the result.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any, NamedTuple

#: XLA flags that keep a worker's matrix products on one thread. Only ``--``
#: flags belong here: XLA stops reading ``XLA_FLAGS`` at the first token that is not
#: one, silently dropping every flag after it.
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"


class WorkerSetup(NamedTuple):
    """How a worker process is prepared (picklable, sent with every run)."""

    cache_dir: str | None
    one_thread: bool
    plugin_folders: tuple[str, ...]
    cwd: str


_DONE: dict[str, Any] = {}


def use_one_thread() -> None:
    """Run XLA's matrix products on one thread in this process (call before its
    first computation).

    Every process that trains (the ``curvbench`` command, executor workers, the
    tests) does so: matrix products split over several threads sum in another order,
    and run files would then depend on where a run trained. XLA's runtime still runs
    independent operations of a program concurrently on its pool (one thread per
    core), which changes no result; one run alone uses 1.0-1.15 cores.
    ``CURVBENCH_XLA_THREADS=all`` leaves XLA's default (all cores) in place, at the
    price of that equality.
    """
    if os.environ.get("CURVBENCH_XLA_THREADS") == "all":
        return
    os.environ["XLA_FLAGS"] = one_thread_flags(os.environ.get("XLA_FLAGS", ""))


def one_thread_flags(flags: str) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with :data:`ONE_THREAD` added once."""
    return with_xla_flag(flags, ONE_THREAD)


def with_xla_flag(flags: str, flag: str) -> str:
    """``flags`` with ``flag`` added unless it is there already.

    Never twice: JAX's persistent compilation cache keys programs by the XLA flags, so
    a worker whose flags repeat one would miss every program its parent compiled.
    """
    return flags if flag in flags.split() else f"{flags} {flag}".strip()


def setup(config: WorkerSetup) -> None:
    """Prepare this process once: thread count, compilation cache, plug-in folders."""
    if _DONE.get("setup") == config:
        return
    if config.one_thread:
        use_one_thread()
    import jax

    if config.cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from tasks.plugins import add_plugin_folder

    for folder in config.plugin_folders:
        add_plugin_folder(folder)
    if config.cwd not in sys.path:
        sys.path.append(config.cwd)
    _DONE["setup"] = config


class Outcome(NamedTuple):
    """What a worker reports for one run (the run file holds the rest)."""

    index: int
    run_id: str
    error: str | None  # None when the run file was written
    seeds: int
    solved: int


def train_run(
    indices: tuple[int, ...], payload: bytes, out: str, config: WorkerSetup
) -> list[Outcome]:
    """Train (or resume, or load) the runs ``indices`` of a comparison into ``out``.

    ``payload`` is the pickled list of their configurations: one run, or the grid
    points of a batched grid (:mod:`runner.batching`), trained as one program. Any
    exception becomes the outcomes' ``error``: a failing run costs only itself.
    """
    setup(config)
    ids = ["?"] * len(indices)
    try:
        configs = pickle.loads(payload)
        ids = [c.run_id for c in configs]
        from runner.batching import execute_batch

        results = execute_batch(configs, out)
        return [
            Outcome(index, run_id, None, len(result.summary),
                    int((result.summary["status"] == "solved").sum()))
            for index, run_id, result in zip(indices, ids, results, strict=True)
        ]  # fmt: skip
    except Exception as err:  # reported with the runs, never raised
        error = f"{type(err).__name__}: {err}"
        return [
            Outcome(index, run_id, error, 0, 0)
            for index, run_id in zip(indices, ids, strict=True)
        ]


class SlurmRun:
    """A run as a submitit job that requeues itself on preemption or time-out.

    The requeued job calls the same run again; it resumes from the run's last
    resume checkpoint (:mod:`runner.resume`), so a preempted job loses at most one
    checkpoint interval.
    """

    def __call__(self, indices, payload: bytes, out: str, config: WorkerSetup):
        return train_run(indices, payload, out, config)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
