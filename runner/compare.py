"""Run a comparison grid, one run file per configuration, resumable."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from runner.config import Comparison
from runner.run import RunResult, run


def default_out(name: str) -> Path:
    """``results/<name>``: the default comparison directory."""
    return Path("results") / name


def compare(
    comparison: Comparison,
    out: str | Path | None = None,
    overrides: dict | None = None,
    progress: bool | None = None,
) -> list[RunResult]:
    """Run every configuration of ``comparison`` and write its run files.

    A run whose file already exists in ``out`` (same configuration, hence same run id)
    is loaded from disk instead of being run again, so an interrupted comparison
    resumes where it stopped.

    Args:
      comparison: a validated comparison (see :func:`runner.config.read_comparison`).
      out: results directory (default: the file's ``out`` or ``results/<name>``).
      overrides: run arguments that replace the file's and the optimizers' own
        (e.g. ``steps`` for a smoke test).
      progress: show progress bars (None: only on a terminal).
    """
    out = Path(out or comparison.out or default_out(comparison.name))
    run_args = comparison.run_args
    results = []
    disable = None if progress is None else not progress
    runs = tqdm(comparison.runs, desc=comparison.name, unit="run", disable=disable)
    for spec in runs:
        runs.set_postfix_str(f"{spec.task} {spec.label}")
        args = {**run_args, **(spec.run_args or {}), **(overrides or {})}
        with tqdm(
            total=args.get("steps", 1000),
            desc=f"{spec.task} {spec.task_hparams.get('length', '')} {spec.label}",
            unit="step",
            leave=False,
            disable=disable,
        ) as bar:
            results.append(
                run(
                    spec.task,
                    spec.optimizer,
                    task_hparams=spec.task_hparams,
                    opt_hparams=spec.opt_hparams,
                    label=spec.label,
                    out=out,
                    progress=bar,
                    skip_existing=True,
                    **args,
                )
            )
    return results
