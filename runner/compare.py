"""Run a comparison grid, one run file per configuration, resumable.

Every run of the comparison was validated when it was read
(:func:`runner.config.read_comparison`). The runs train on an executor
(:mod:`runner.executors`: a local process pool by default, Dask, SLURM, or serially
in this process). A run whose file already exists in the results directory (same
configuration, hence same run id) is loaded instead of trained again, and a run
interrupted mid-way resumes from its last checkpoint (:mod:`runner.resume`), so an
interrupted comparison resumes where it stopped. A run that fails (a plug-in that
raises, a worker that dies) costs only itself: the others still run and write their
files, and the failure is reported with its reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from analysis.results import (
    RunResult,
    load_result,
    remove_stale_temporaries,
    run_path,
)
from runner.batching import batch_groups, execute_batch
from runner.config import Comparison, RunConfig
from runner.executors import ExecutorConfig, execute_all, pickled
from runner.worker import Outcome, setup
from tasks.hparams import ConfigError


class RunFailure(NamedTuple):
    """A run of a comparison that raised instead of finishing."""

    run_id: str
    label: str
    task: str
    error: str


class CompareOutcome(NamedTuple):
    """What :func:`compare` did: the finished runs and the failed ones."""

    out: Path
    results: list[RunResult]
    failures: list[RunFailure]


def default_out(name: str) -> Path:
    """``results/<name>``: the default comparison directory."""
    return Path("results") / name


def results_dir(comparison: Comparison, out: str | Path | None = None) -> Path:
    """The results directory of a comparison; refuses a path that is a file."""
    path = Path(out or comparison.out or default_out(comparison.name))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"results directory {str(path)!r} exists and is not a folder")
    return path


def _describe(config: RunConfig) -> str:
    task = config.task_name or config.task.name
    length = config.task_hparams.get("length")
    return " ".join(str(p) for p in (task, length, config.label) if p is not None)


def compare(
    comparison: Comparison,
    out: str | Path | None = None,
    progress: bool | None = None,
    executor: str | dict | ExecutorConfig | None = None,
    batch_grid: bool | None = None,
) -> CompareOutcome:
    """Run every configuration of ``comparison`` and write its run files.

    Args:
      comparison: a validated comparison (see :func:`runner.config.read_comparison`).
      out: results directory (default: the file's ``out`` or ``results/<name>``).
      progress: show progress bars (None: only on a terminal).
      executor: where the runs train (:mod:`runner.executors`: ``"serial"``,
        ``"local[:N]"``, ``"dask[:ADDRESS]"``, ``"slurm"`` or an
        :class:`~runner.executors.ExecutorConfig`); default: the file's
        ``[executor]`` table, else ``local`` (one worker per core).
      batch_grid: train the grid points of each sweep over traced hyperparameters
        as one program (:mod:`runner.batching`); default: the file's
        ``batch_grid``.

    Whatever the executor, a run's file is the same (timings aside).
    """
    out = results_dir(comparison, out)
    spec = comparison.executor if executor is None else ExecutorConfig.parse(executor)
    remove_stale_temporaries(out)
    disable = None if progress is None else not progress
    batched = comparison.batch_grid if batch_grid is None else batch_grid
    groups = batch_groups(comparison.runs, batched)
    if spec.kind == "serial":
        setup(spec.worker_setup())  # this process is the worker: same cache
        return _serial(comparison, groups, out, disable)
    jobs = pickled(comparison.runs, groups)  # refuses unpicklable runs up front
    tracker = _Tracker(comparison, out, disable)
    try:
        execute_all(spec, jobs, out, tracker.started, tracker.finished)
    finally:
        tracker.bar.close()
    return CompareOutcome(out, tracker.results(), tracker.failures)


def _serial(comparison: Comparison, groups, out: Path, disable) -> CompareOutcome:
    """In this process, one run (or batch) after another, with a bar for each."""
    results, failures = {}, []
    bar_runs = tqdm(
        total=len(comparison.runs), desc=comparison.name, unit="run", disable=disable
    )
    for group in groups:
        configs = [comparison.runs[i] for i in group]
        name = _describe(configs[0]) + (f" +{len(group) - 1}" if len(group) > 1 else "")
        bar_runs.set_postfix_str(name)
        with tqdm(
            total=configs[0].options.steps, desc=name, unit="step", leave=False,
            disable=disable,
        ) as bar:  # fmt: skip
            try:
                for i, result in zip(
                    group, execute_batch(configs, out, bar), strict=True
                ):
                    results[i] = result
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
                failures += [_failure(config, error) for config in configs]
        bar_runs.update(len(group))
    bar_runs.close()
    return CompareOutcome(out, [results[i] for i in sorted(results)], failures)


def _failure(config: RunConfig, error: str) -> RunFailure:
    return RunFailure(config.run_id, config.label, _describe(config), error)


class _Tracker:
    """Progress of a comparison on an executor: done, running, failed, solved."""

    def __init__(self, comparison: Comparison, out: Path, disable) -> None:
        self.comparison, self.out = comparison, out
        self.running: set[int] = set()
        self.done: list[int] = []
        self.failures: list[RunFailure] = []
        self.solved = self.seeds = 0
        self.bar = tqdm(
            total=len(comparison.runs), desc=comparison.name, unit="run",
            disable=disable,
        )  # fmt: skip

    def _show(self) -> None:
        self.bar.set_postfix(
            running=len(self.running), failed=len(self.failures),
            solved=f"{self.solved}/{self.seeds} seeds",
        )  # fmt: skip

    def started(self, indices: tuple[int, ...]) -> None:
        self.running.update(indices)
        self._show()

    def finished(self, outcome: Outcome) -> None:
        self.running.discard(outcome.index)
        config = self.comparison.runs[outcome.index]
        if outcome.error is None:
            self.done.append(outcome.index)
            self.solved += outcome.solved
            self.seeds += outcome.seeds
        else:
            self.failures.append(_failure(config, outcome.error))
        self.bar.update(1)
        self._show()

    def results(self) -> list[RunResult]:
        """The finished runs, read from their files, in the comparison's order."""
        runs = self.comparison.runs
        return [
            load_result(run_path(self.out, runs[i].run_id)) for i in sorted(self.done)
        ]
