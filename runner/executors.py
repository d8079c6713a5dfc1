"""Executors: where the runs of a comparison train.

* ``serial``: one after another in this process (what a debugger wants);
* ``local`` (the default) or ``local:N``: a pool of ``N`` spawned worker processes
  (default: one per core), each on one thread;
* ``dask`` or ``dask:ADDRESS``: the workers of a Dask cluster (``dask.distributed``);
  without an address a ``LocalCluster`` of single-threaded worker processes;
* ``slurm``: one SLURM array job per comparison through submitit, every run a task
  of the array that requeues itself when preempted or timed out.

Every executor trains each run through :func:`runner.worker.train_run`, i.e.
:func:`runner.run.execute` with ``skip_existing``: a finished run is loaded, an
interrupted one resumes from its checkpoint, and a lock per run keeps two workers
(or two commands) from training one run twice. Workers are spawned, never forked
(JAX is not fork-safe), run on one thread each (so results do not depend on how many
run at once), and share compiled programs through JAX's persistent compilation cache
in ``cache_dir``. A worker that dies costs only the runs it held: they are retried
``retries`` times (resuming from their checkpoints) and then reported as failed with
the reason; every other run completes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from runner.worker import (
    Outcome,
    SlurmRun,
    WorkerSetup,
    one_thread_flags,
    train_run,
)
from tasks.datacache import cache_root
from tasks.hparams import ConfigError

KINDS = ("serial", "local", "dask", "slurm")


def default_cache_dir() -> str:
    """``$CURVBENCH_CACHE/xla`` or ``$XDG_CACHE_HOME/curvbench/xla`` (``~/.cache``)."""
    return str(cache_root() / "xla")


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """How a comparison's runs are executed (``[executor]`` table, ``--executor``).

    Attributes:
      kind: one of :data:`KINDS`.
      workers: local: processes (default: CPU cores); dask without an address:
        workers of the ``LocalCluster`` (default: CPU cores); slurm: most array
        tasks running at once (default: all).
      address: dask: the scheduler's address (None starts a ``LocalCluster``).
      retries: times a run whose worker died is tried again.
      cache_dir: JAX's persistent compilation cache shared by the workers (default:
        :func:`default_cache_dir`); "" turns it off.
      partition, time_minutes, mem_gb, gpus, cpus, folder: slurm job settings
        (``folder`` holds submitit's scripts and logs; default
        ``<results>/.slurm``).
    """

    kind: str = "local"
    workers: int | None = None
    address: str | None = None
    retries: int = 2
    cache_dir: str | None = None
    partition: str | None = None
    time_minutes: int = 60
    mem_gb: float = 4.0
    gpus: int = 0
    cpus: int = 1
    folder: str | None = None

    def __post_init__(self) -> None:
        where = "executor"
        if self.kind not in KINDS:
            raise ConfigError(
                f"{where} kind {self.kind!r} is unknown; valid: {', '.join(KINDS)}"
            )
        for name, low in (("workers", 1), ("retries", 0), ("time_minutes", 1),
                          ("gpus", 0), ("cpus", 1)):  # fmt: skip
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"{where} {name!r} = {value!r} must be an integer >= {low}"
                )
        if isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, int | float):
            raise ConfigError(f"{where} 'mem_gb' = {self.mem_gb!r} must be a number")
        if not self.mem_gb > 0:
            raise ConfigError(f"{where} 'mem_gb' = {self.mem_gb!r} must be > 0")
        for name in ("address", "cache_dir", "partition", "folder"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{where} {name!r} = {value!r} must be a string")
        if self.address is not None and self.kind != "dask":
            raise ConfigError(
                f"{where} 'address' is for kind 'dask', not {self.kind!r}"
            )

    @classmethod
    def parse(cls, value: str | dict | ExecutorConfig | None) -> ExecutorConfig:
        """From ``"local"``, ``"local:4"``, ``"dask"``, ``"dask:tcp://host:8786"``,
        ``"serial"``, ``"slurm"``, or an ``[executor]`` table (``kind`` plus the
        fields above); None gives the default (``local``)."""
        if value is None:
            return cls()
        if isinstance(value, ExecutorConfig):
            return value
        if isinstance(value, dict):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - fields)
            if unknown:
                raise ConfigError(
                    f"unknown executor setting {unknown[0]!r}; valid: "
                    f"{', '.join(sorted(fields))}"
                )
            return cls(**value)
        if not isinstance(value, str):
            raise ConfigError(
                f"executor {value!r} must be a string such as 'local:2' or a table"
            )
        kind, _, rest = value.partition(":")
        if kind == "dask":
            return cls(kind="dask", address=rest or None)
        if kind in ("local", "slurm") and rest:
            if not rest.isdigit() or int(rest) < 1:
                raise ConfigError(
                    f"executor {value!r}: the number after ':' must be a positive "
                    "integer (workers)"
                )
            return cls(kind=kind, workers=int(rest))
        if rest:
            raise ConfigError(
                f"executor {value!r} is not one of: serial, local[:N], "
                "dask[:ADDRESS], slurm[:N]"
            )
        return cls(kind=kind)

    def worker_setup(self) -> WorkerSetup:
        from tasks.plugins import PLUGIN_FOLDERS

        cache = default_cache_dir() if self.cache_dir is None else self.cache_dir
        return WorkerSetup(
            cache_dir=cache or None,
            one_thread=True,
            plugin_folders=tuple(PLUGIN_FOLDERS),
            cwd=os.getcwd(),
        )

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


# A job: (run indices, pickled list of their RunConfigs): one run, or the grid
# points of a batched grid. on_start gets the indices; on_done every run's Outcome.
Job = tuple[tuple[int, ...], bytes]
OnStart = Callable[[tuple[int, ...]], None]
OnDone = Callable[[Outcome], None]


def pickled(runs: tuple[Any, ...], groups: Iterable[tuple[int, ...]]) -> list[Job]:
    """One job per group of run indices; a run that cannot be sent to a worker is a
    :class:`ConfigError` naming it (run it with the ``serial`` executor)."""
    jobs = []
    for group in groups:
        for i in group:
            try:
                pickle.dumps(runs[i])
            except Exception as err:
                raise ConfigError(
                    f"run {runs[i].label!r} cannot be sent to a worker process "
                    f"({type(err).__name__}: {err}); give the task and optimizer by "
                    "name or import path, or use the 'serial' executor"
                ) from None
        jobs.append((tuple(group), pickle.dumps([runs[i] for i in group])))
    return jobs


def execute_all(
    executor: ExecutorConfig,
    jobs: list[Job],
    out: Path,
    on_start: OnStart,
    on_done: OnDone,
) -> None:
    """Train every job on ``executor``; ``on_done`` gets every run's outcome."""
    setup = executor.worker_setup()
    if executor.kind == "serial":
        for indices, payload in jobs:
            on_start(indices)
            _report(train_run(indices, payload, str(out), setup), on_done)
        return
    runner = {"local": _local, "dask": _dask, "slurm": _slurm}[executor.kind]
    runner(executor, setup, jobs, out, on_start, on_done)


def _report(outcomes: list[Outcome], on_done: OnDone) -> None:
    for outcome in outcomes:
        on_done(outcome)


def _died(indices: tuple[int, ...], reason: str) -> list[Outcome]:
    return [Outcome(i, "?", reason, 0, 0) for i in indices]


def _local(executor, setup, jobs, out, on_start, on_done) -> None:
    """A spawned process pool with at most ``workers`` jobs in flight.

    No job waits inside the pool, so when a worker dies (the pool breaks) the jobs in
    flight are exactly the ones that were training. The pool does not say whose
    worker died: with one job in flight that job is charged an attempt; with several,
    none is charged yet and they run again one at a time, where a death is charged to
    the job that caused it. A job charged more than ``retries`` times is reported as
    failed; every other job completes.
    """
    payloads = dict(jobs)
    queue = [indices for indices, _ in jobs]
    attempts = dict.fromkeys(queue, 0)
    suspects: set = set()
    context = multiprocessing.get_context("spawn")
    while queue:
        isolate = any(job in suspects for job in queue)
        if isolate:  # suspects first, one at a time
            queue.sort(key=lambda job: job not in suspects)
        workers = 1 if isolate else min(executor.n_workers, len(queue))
        pool = cf.ProcessPoolExecutor(workers, mp_context=context)
        settled = False
        try:
            in_flight: dict[cf.Future, tuple[int, ...]] = {}
            crashed: list[tuple[int, ...]] = []
            while queue or in_flight:
                while queue and len(in_flight) < workers:
                    if isolate and queue[0] not in suspects:
                        break
                    job = queue.pop(0)
                    on_start(job)
                    future = pool.submit(train_run, job, payloads[job], str(out), setup)
                    in_flight[future] = job
                if not in_flight:
                    break  # the suspects are cleared: back to a full pool
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    try:
                        _report(future.result(), on_done)
                        suspects.discard(job)
                    except cf.process.BrokenProcessPool as err:
                        crashed.append((job, err))
                if crashed:
                    break
            # The other jobs in flight died with the pool (or had just finished).
            for future, job in in_flight.items():
                err = future.exception()
                if err is None:
                    _report(future.result(), on_done)
                    suspects.discard(job)
                else:
                    crashed.append((job, err))
            settled = True
        finally:
            # Settled, the workers are idle and exit on their own: waiting while each
            # interpreter tears JAX down (about a second) would only delay the
            # results. On an error (an interrupt, a failing callback) wait for the
            # runs in flight, so that none trains on after this returns.
            pool.shutdown(wait=not settled)  # no job ever waits in the pool
        if len(crashed) == 1:
            job, err = crashed[0]
            _charge(executor, job, attempts, queue, on_done, err)
        elif crashed:
            suspects.update(job for job, _ in crashed)
            queue[:0] = [job for job, _ in crashed]


def _charge(executor, job, attempts, queue, on_done, err) -> None:
    """Count a death against ``job``: run it again, or report it as failed."""
    attempts[job] += 1
    if attempts[job] <= executor.retries:
        queue.insert(0, job)  # again, first (it resumes from its checkpoint)
        return
    reason = (
        f"its worker process died {attempts[job]} times (killed, or out of "
        f"memory?): {err}"
    )
    _report(_died(job, reason), on_done)


#: Dask settings for the ``LocalCluster`` the ``dask`` executor starts. A worker's
#: sampling profiler (every 10 ms it walks the stack of the thread that trains), its
#: event-loop tick (20 ms) and its memory monitor (100 ms) all need the GIL, which
#: tracing a training program holds most of the time: with them at their defaults
#: the 12-run benchmark grid took 5-10% more CPU seconds than ``local:2`` did.
#: Memory limits are still enforced, checked once a second.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def local_cluster(n_workers: int | None):
    """A ``LocalCluster`` of ``n_workers`` single-threaded worker processes (one per
    core by default) with :data:`LOCAL_CLUSTER_CONFIG`, XLA's matrix products on
    one thread."""
    import dask
    from distributed import LocalCluster

    env = {"XLA_FLAGS": one_thread_flags(os.environ.get("XLA_FLAGS", ""))}
    if os.environ.get("CURVBENCH_XLA_THREADS") == "all":
        env = {}
    with dask.config.set(LOCAL_CLUSTER_CONFIG):  # the nannies pass it on to workers
        return LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True,
            dashboard_address=None, env=env,
        )  # fmt: skip


def _dask(executor, setup, jobs, out, on_start, on_done) -> None:
    """Submit every job to a Dask cluster (a ``LocalCluster`` without an address)."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise ConfigError(
            "executor 'dask' needs dask.distributed: pip install 'curvbench[dask]'"
        ) from None
    cluster = local_cluster(executor.n_workers) if executor.address is None else None
    client = Client(cluster if cluster is not None else executor.address)
    try:
        futures = {}
        for job, payload in jobs:
            on_start(job)
            future = client.submit(
                train_run, job, payload, str(out), setup, pure=False,
                retries=executor.retries,
                key=f"curvbench-{'-'.join(map(str, job))}-{os.getpid()}",
            )  # fmt: skip
            futures[future] = job
        for future in as_completed(futures):
            job = futures[future]
            try:
                outcomes = future.result()
            except Exception as err:  # a worker lost more often than retries
                outcomes = _died(job, f"{type(err).__name__}: {err}")
            _report(outcomes, on_done)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def slurm_executor(executor: ExecutorConfig, out: Path, cluster: str | None = None):
    """The submitit executor for ``executor`` (``cluster="local"`` for tests)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "executor 'slurm' needs submitit: pip install 'curvbench[slurm]'"
        ) from None
    folder = Path(executor.folder or out / ".slurm") / "%j"
    submitter = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {
        "timeout_min": executor.time_minutes,
        "mem_gb": executor.mem_gb,
        "cpus_per_task": executor.cpus,
        "name": "curvbench",
    }
    if executor.gpus:
        params["gpus_per_node"] = executor.gpus
    if submitter.cluster == "slurm":
        if executor.partition:
            params["slurm_partition"] = executor.partition
        if executor.workers:
            params["slurm_array_parallelism"] = executor.workers
    submitter.update_parameters(**params)
    return submitter


def _slurm(executor, setup, jobs, out, on_start, on_done, cluster=None) -> None:
    """One array job; each task trains one job and requeues itself when preempted."""
    submitter = slurm_executor(executor, out, cluster)
    task = SlurmRun()
    with submitter.batch():
        submitted = [
            submitter.submit(task, job, payload, str(out), setup)
            for job, payload in jobs
        ]
    for job, _ in jobs:
        on_start(job)
    for (job, _), handle in zip(jobs, submitted, strict=True):
        try:
            outcomes = handle.result()
        except Exception as err:  # the job failed for good (after its requeues)
            outcomes = _died(job, f"{type(err).__name__}: {err}")
        _report(outcomes, on_done)
