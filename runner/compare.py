"""Run a comparison grid, one run file per configuration, resumable.

Every run of the comparison was validated when it was read
(:func:`runner.config.read_comparison`). A run whose file already exists in the
results directory (same configuration, hence same run id) is loaded instead of
trained again, so an interrupted comparison resumes where it stopped. A run that
fails (a plug-in that raises, for instance) costs only itself: the others still run
and write their files, and the failure is reported with its reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from analysis.results import RunResult
from runner.config import Comparison, RunConfig
from runner.run import execute
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
) -> CompareOutcome:
    """Run every configuration of ``comparison`` and write its run files.

    Args:
      comparison: a validated comparison (see :func:`runner.config.read_comparison`).
      out: results directory (default: the file's ``out`` or ``results/<name>``).
      progress: show progress bars (None: only on a terminal).
    """
    out = results_dir(comparison, out)
    disable = None if progress is None else not progress
    results, failures = [], []
    runs = tqdm(comparison.runs, desc=comparison.name, unit="run", disable=disable)
    for config in runs:
        name = _describe(config)
        runs.set_postfix_str(name)
        with tqdm(
            total=config.options.steps, desc=name, unit="step", leave=False,
            disable=disable,
        ) as bar:  # fmt: skip
            try:
                results.append(execute(config, out, bar, skip_existing=True))
            except Exception as err:
                failures.append(
                    RunFailure(
                        config.run_id,
                        config.label,
                        name,
                        f"{type(err).__name__}: {err}",
                    )
                )
    return CompareOutcome(out, results, failures)
