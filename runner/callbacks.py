"""The per-chunk callbacks of a run: success test, records, checkpoints, progress.

Each is a small object with ``on_start(run)`` and ``on_chunk(run, chunk)`` (see
:class:`runner.loop.Callback`); curvature probes are
:class:`runner.probing.ProbeCallback`. :func:`runner.run.run` lists them in this
order: success test, work budget, records, probes, checkpoints, progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from analysis.results import write_checkpoint
from analysis.stats import first_reached
from runner.loop import Chunk, RunState
from runner.train import spectral_radii
from tasks.base import Task


class SuccessTest:
    """Give the full success test to seeds whose evaluation error is low enough.

    A seed passes when the task's :meth:`~tasks.base.Task.success` accepts its
    error rate on ``task.success_sequences`` fresh sequences (Pascanu et al. 2013:
    10,000). Passing seeds are retired (they stop updating) and their updates and
    training seconds so far are kept. The test is compiled with the rest of the
    program, so its time is run time only.
    """

    def __init__(self, task: Task, success: Callable) -> None:
        self.task, self.success = task, success

    def on_start(self, run: RunState) -> None:
        pass

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        if self.success is None:  # a task without a success test
            return
        start = time.perf_counter()
        state = run.state
        candidates = np.flatnonzero(
            np.asarray(state.active)
            & chunk.was_active
            & (chunk.summary["eval_error"] < self.task.success_threshold)
        )
        for i in candidates:
            params = jax.tree.map(lambda p, i=i: p[i], state.params)
            key = jax.random.fold_in(state.key[i], 7)
            if self.task.success(float(self.success(params, key))):
                chunk.newly_solved.append(int(i))
        if chunk.newly_solved:
            retired = state.active.at[np.array(chunk.newly_solved)].set(False)
            run.state = state._replace(active=retired)
        run.seconds += time.perf_counter() - start
        updates = np.asarray(run.state.updates)
        for i in chunk.newly_solved:
            run.solved_at[i] = (int(updates[i]), run.seconds)


class WorkBudget:
    """Retire seeds whose work has reached ``budget`` gradient-equivalents.

    Checked after each chunk (after the success test), so a seed may overshoot the
    budget by less than one chunk's work. A retired seed that was not solved ends
    ``unsolved``: it did not solve the task within the budget.
    """

    def __init__(self, budget: float | None) -> None:
        self.budget = budget

    def on_start(self, run: RunState) -> None:
        pass

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        if self.budget is None:
            return
        spent = np.asarray(chunk.summary["grad_equivalents"]) >= self.budget
        active = np.asarray(run.state.active)
        if (spent & active).any():
            run.state = run.state._replace(active=run.state.active & ~spent)


class EarlyStopping:
    """Retire a seed after ``patience`` evaluations without a new best ``eval_loss``.

    Runs after :class:`Records`. The evaluation loss is the validation loss of a
    task with held-out data (:meth:`tasks.base.Task.evaluation_batch`), else the
    loss on fresh sequences. A non-finite loss is never a best. The best losses and
    counts live in ``run.callback_state["early_stopping"]``, so a resumed run
    carries them on; stopped seeds end with the status ``stopped``.
    """

    def __init__(self, patience: int | None, seeds: list[int]) -> None:
        self.patience, self.seeds = patience, seeds

    def on_start(self, run: RunState) -> None:
        if self.patience is not None:
            n = len(self.seeds)
            run.callback_state.setdefault(
                "early_stopping", {"best": [None] * n, "since": [0] * n, "stopped": []}
            )

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        if self.patience is None:
            return
        memo = run.callback_state["early_stopping"]
        active = np.asarray(run.state.active)
        losses = np.asarray(chunk.summary["eval_loss"], dtype=float)
        stop = []
        for i in np.flatnonzero(chunk.was_active):
            best, loss = memo["best"][i], losses[i]
            if np.isfinite(loss) and (best is None or loss < best):
                memo["best"][i], memo["since"][i] = float(loss), 0
            else:
                memo["since"][i] += 1
            if active[i] and memo["since"][i] >= self.patience:
                stop.append(int(i))
        if stop:
            memo["stopped"] += stop
            run.state = run.state._replace(
                active=run.state.active.at[np.array(stop)].set(False)
            )


class Records:
    """One tidy row per live seed and chunk, and the per-step traces.

    Row columns: ``seed``, ``step``, ``updates``, the chunk summary (loss, gradient
    norms, optimizer records, evaluation loss and error, work counts and
    gradient-equivalents), ``spectral_radius`` of the recurrent matrix, training
    ``seconds`` so far and ``status`` (running, solved or diverged).
    """

    def __init__(self, task: Task, seeds: list[int], record_steps: bool) -> None:
        self.task, self.seeds, self.record_steps = task, seeds, record_steps

    def on_start(self, run: RunState) -> None:
        pass

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        if self.record_steps:
            run.traces.append({k: np.asarray(v) for k, v in chunk.trace.items()})
        radii = spectral_radii(self.task, run.state.params)
        updates = np.asarray(run.state.updates)
        diverged = np.asarray(run.state.diverged_step) >= 0
        for i, seed in enumerate(self.seeds):
            if not chunk.was_active[i]:
                continue
            row = {"seed": seed, "step": chunk.step, "updates": int(updates[i])}
            row.update(
                {k: float(v[i]) for k, v in chunk.summary.items() if k != "steps_live"}
            )
            row["spectral_radius"] = float(radii[i])
            row["seconds"] = run.seconds
            row["status"] = (
                "solved"
                if i in chunk.newly_solved
                else "diverged"
                if diverged[i]
                else "running"
            )
            run.records.append(row)


class Checkpoints:
    """Save every seed's parameters every ``every`` steps next to the run file."""

    def __init__(self, run_file: Path | None, every: int | None) -> None:
        self.run_file, self.every = run_file, every

    def on_start(self, run: RunState) -> None:
        pass

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        if self.run_file is None or not self.every or chunk.step % self.every:
            return
        write_checkpoint(
            self.run_file, chunk.step, jax.tree.map(np.asarray, run.state.params)
        )


class Progress:
    """Advance a tqdm-like bar by each chunk's steps, with loss and seeds solved."""

    def __init__(self, bar: Any, eval_every: int) -> None:
        self.bar, self.eval_every = bar, eval_every

    def on_start(self, run: RunState) -> None:
        if run.next_chunk:  # a resumed run starts where it stopped
            self.bar.update(run.next_chunk * self.eval_every)

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        self.bar.update(self.eval_every)
        losses = chunk.summary["loss"][chunk.was_active]
        losses = losses[np.isfinite(losses)]
        loss = float(np.median(losses)) if losses.size else float("nan")
        self.bar.set_postfix(loss=f"{loss:.4g}", solved=len(run.solved_at))


def seed_summary(
    seeds: list[int],
    run: RunState,
    target_loss: float | None = None,
    solvable: bool = True,
) -> list[dict[str, Any]]:
    """One row per seed: outcome, work and time to solve, last evaluation error.

    The status is ``solved``, ``diverged``, ``stopped`` (early stopping), or, at the
    end of the budget, ``unsolved`` (``finished`` on a task without a success test,
    ``solvable=False``). On a task with held-out data the row also has the best
    evaluation (:func:`_best_evaluation`).

    With ``target_loss``: also the updates, gradient-equivalents and seconds at the
    first evaluation whose loss was at most the target (None: never reached).
    """
    rows = []
    diverged = np.asarray(run.state.diverged_step)
    updates = np.asarray(run.state.updates)
    last = {r["seed"]: r for r in run.records}
    stopped = set(run.callback_state.get("early_stopping", {}).get("stopped", []))
    for i, seed in enumerate(seeds):
        row: dict[str, Any] = {"seed": seed, "updates": int(updates[i])}
        if i in run.solved_at:
            row.update(status="solved", steps_to_solve=run.solved_at[i][0])
            row["seconds_to_solve"] = run.solved_at[i][1]
            row["grad_evals_to_solve"] = last[seed]["grad_evals"]
            row["grad_equivalents_to_solve"] = last[seed]["grad_equivalents"]
        else:
            status = (
                "diverged"
                if diverged[i] >= 0
                else "stopped"
                if i in stopped
                else "unsolved"
                if solvable
                else "finished"
            )
            row.update(status=status, steps_to_solve=None, seconds_to_solve=None)
            row["grad_evals_to_solve"] = None
            row["grad_equivalents_to_solve"] = None
        row["diverged_step"] = int(diverged[i]) if diverged[i] >= 0 else None
        row["final_eval_error"] = last[seed]["eval_error"] if seed in last else None
        row["run_seconds"] = run.seconds
        row.update(_best_evaluation(run.records, seed))
        if target_loss is not None:
            row["target_loss"] = target_loss
            row.update(_to_target(run.records, seed, target_loss))
        rows.append(row)
    return rows


def _best_evaluation(records: list[dict], seed: int) -> dict[str, Any]:
    """For a task with held-out data (records with ``test_loss``): the evaluation
    with the lowest finite ``eval_loss`` (validation loss), as ``best_eval_loss``,
    ``best_updates`` and ``best_step``, and every ``test_*`` measure there as
    ``test_*_at_best``. Nothing for other tasks; None when no loss was finite."""
    rows = [r for r in records if r["seed"] == seed and "test_loss" in r]
    if not rows:
        return {}
    finite = [r for r in rows if np.isfinite(r["eval_loss"])]
    test = [k for k in rows[0] if k.startswith("test_")]
    if not finite:
        return {
            "best_eval_loss": None, "best_updates": None, "best_step": None,
            **{f"{k}_at_best": None for k in test},
        }  # fmt: skip
    best = min(finite, key=lambda r: r["eval_loss"])  # the first of equal losses
    return {
        "best_eval_loss": best["eval_loss"],
        "best_updates": best["updates"],
        "best_step": best["step"],
        **{f"{k}_at_best": best[k] for k in test},
    }


def _to_target(records: list[dict], seed: int, target: float) -> dict[str, Any]:
    """Updates, gradient-equivalents and seconds at the seed's first evaluation
    with a loss at most ``target`` (None: never)."""
    rows = pd.DataFrame([r for r in records if r["seed"] == seed])
    out = {}
    for cost in ("updates", "grad_equivalents", "seconds"):
        value = first_reached(rows, "eval_loss", target, cost) if len(rows) else np.inf
        out[f"{cost}_to_target"] = value if np.isfinite(value) else None
    return out
