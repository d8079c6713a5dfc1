"""Run a comparison grid, one run file per configuration, resumable.

Every run of the comparison was validated when it was read
(:func:`runner.config.read_comparison`). The runs train on an executor
(:mod:`runner.executors`: a local process pool by default, Dask, SLURM, or serially
in this process). A run whose file already exists in the results directory (same
configuration, hence same run id) is loaded instead of trained again, and a run
interrupted mid-way resumes from its last checkpoint (:mod:`runner.resume`), so an
interrupted comparison resumes where it stopped. A comparison with a ``[tuning]``
table first trains its tuning trials, then the chosen configurations on the held-out
seeds (:mod:`runner.tuning`). A run that fails (a plug-in that
raises, a worker that dies) costs only itself: the others still run and write their
files, and the failure is reported with its reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from analysis.results import (
    TUNING_DIR,
    RunResult,
    load_result,
    move_run,
    remove_stale_temporaries,
    run_path,
    write_tuning,
)
from runner.batching import batch_groups, execute_batch
from runner.config import Comparison, RunConfig
from runner.executors import ExecutorConfig, execute_all, pickled
from runner.tuning import Study, choose, trial_score
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
    disable = None if progress is None else not progress
    batched = comparison.batch_grid if batch_grid is None else batch_grid
    execute = functools.partial(_execute, spec=spec, batched=batched, disable=disable)
    if comparison.studies:
        return _tuned(comparison, out, execute)
    return execute(comparison.name, comparison.runs, out)


def _execute(
    name: str, runs: tuple[RunConfig, ...], out: Path, *, spec, batched, disable
) -> CompareOutcome:
    """Train ``runs`` (those without a file in ``out``) on the executor."""
    remove_stale_temporaries(out)
    groups = batch_groups(runs, batched)
    if spec.kind == "serial":
        setup(spec.worker_setup())  # this process is the worker: same cache
        return _serial(name, runs, groups, out, disable)
    jobs = pickled(runs, largest_first(runs, groups))  # refuses unpicklable runs
    tracker = _Tracker(name, runs, out, disable)
    try:
        execute_all(spec, jobs, out, tracker.started, tracker.finished)
    finally:
        tracker.bar.close()
    return CompareOutcome(out, tracker.results(), tracker.failures)


def largest_first(
    runs: tuple[RunConfig, ...], groups: list[tuple[int, ...]]
) -> list[tuple[int, ...]]:
    """``groups`` with the largest estimated work first (ties keep their order).

    A pool that starts its longest jobs first leaves the short ones to fill the gaps
    at the end, instead of one worker finishing a long run while the others idle
    (longest-processing-time-first scheduling, Graham 1969). The estimate is only an
    order: seeds x steps x the task's ``length``, ``hidden`` squared and
    ``batch_size`` where it has them (a recurrent step costs about
    ``batch_size * hidden**2``). It never changes what a run computes.
    """

    def size(i: int) -> float:
        config = runs[i]
        hp = config.task_hparams
        work = float(len(config.options.seeds) * config.options.steps)
        for name, power in (("length", 1), ("hidden", 2), ("batch_size", 1)):
            value = hp.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                work *= value**power
        return work

    return sorted(groups, key=lambda group: -sum(size(i) for i in group))


def _tuned(comparison: Comparison, out: Path, execute: Callable) -> CompareOutcome:
    """Tune (trials on the tuning seeds), choose, then train the held-out runs.

    The trials go to ``out/tuning``; ``<name>.tuning.json`` records every trial's
    score and the choice (:mod:`runner.tuning`); the comparison's untuned runs and
    the chosen configurations on the held-out seeds go to ``out``.
    """
    tuning = comparison.tuning
    trials = tuple(t for study in comparison.studies for t in study.trials)
    tried = execute(f"{comparison.name} tuning", trials, out / TUNING_DIR)
    done = {r.config["run_id"]: r for r in tried.results}
    errors = {f.run_id: f.error for f in tried.failures}
    studies, chosen, failures = [], [], list(tried.failures)
    for index, study in enumerate(comparison.studies):
        scores = [
            trial_score(
                done[t.run_id].summary if t.run_id in done else None,
                done[t.run_id].records if t.run_id in done else None,
                tuning.criterion,
            )
            for t in study.trials
        ]
        best = choose(scores, tuning.criterion)
        _set_aside(study, best, out)
        if all(t.run_id in errors for t in study.trials):
            failures.append(
                RunFailure(
                    study.held_out[best].run_id, study.label,
                    _describe(study.held_out[best]),
                    "every tuning trial failed; no configuration to re-run",
                )
            )  # fmt: skip
        else:
            chosen.append(study.held_out[best])
        studies.append({"study": index, **_study_record(study, scores, best, errors)})
    write_tuning(out, comparison.name, tuning.describe(), studies)
    final = execute(comparison.name, comparison.runs + tuple(chosen), out)
    return CompareOutcome(out, final.results, failures + final.failures)


def _set_aside(study: Study, best: int, out: Path) -> None:
    """Move held-out runs of this study's other trials to ``tuning/superseded``.

    They exist when an earlier invocation chose another trial (a trial that failed
    then, a smaller trial budget, another criterion); left in place, the table
    would show two rows under one label.
    """
    for i, config in enumerate(study.held_out):
        path = run_path(out, config.run_id)
        if i != best and path.exists():
            move_run(path, out / TUNING_DIR / "superseded")


def _study_record(study: Study, scores: list[dict], best: int, errors: dict) -> dict:
    """A study as the tuning file stores it (:func:`analysis.results.write_tuning`)."""
    first = study.trials[0].describe()
    trials = []
    for i, (trial, point, score) in enumerate(
        zip(study.trials, study.points, scores, strict=True)
    ):
        row = {"trial": i + 1, "run_id": trial.run_id, "hparams": point, **score}
        trials.append({**row, "error": errors.get(trial.run_id)})
    return {
        "label": study.label,
        "optimizer": first["optimizer"]["name"],
        "task": first["task"],
        "space": study.space.describe(),
        "trials": trials,
        "chosen": best,
        "run_id": study.held_out[best].run_id,
    }


def _serial(
    name: str, runs: tuple[RunConfig, ...], groups, out: Path, disable
) -> CompareOutcome:
    """In this process, one run (or batch) after another, with a bar for each."""
    results, failures = {}, []
    bar_runs = tqdm(total=len(runs), desc=name, unit="run", disable=disable)
    for group in groups:
        configs = [runs[i] for i in group]
        label = _describe(configs[0]) + (
            f" +{len(group) - 1}" if len(group) > 1 else ""
        )
        bar_runs.set_postfix_str(label)
        with tqdm(
            total=configs[0].options.steps, desc=label, unit="step", leave=False,
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

    def __init__(
        self, name: str, runs: tuple[RunConfig, ...], out: Path, disable
    ) -> None:
        self.runs, self.out = runs, out
        self.running: set[int] = set()
        self.done: list[int] = []
        self.failures: list[RunFailure] = []
        self.solved = self.seeds = 0
        self.bar = tqdm(
            total=len(runs), desc=name, unit="run",
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
        config = self.runs[outcome.index]
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
        return [
            load_result(run_path(self.out, self.runs[i].run_id))
            for i in sorted(self.done)
        ]
