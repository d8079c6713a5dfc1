"""Batched grids: the grid points of a sweep over traced hyperparameters as one program.

A comparison with ``batch_grid = true`` groups the runs that differ only in traced
optimizer hyperparameters (learning rate, threshold, damping, ...: the ones a
factory annotates as plain ``float``) and the label. Each group trains as one
compiled program, vmapped over grid points x seeds (the hyperparameters get a
leading seed axis, :attr:`runner.train.Settings.per_seed_hparams`), and each grid
point is still written as its own run file, the same file the run would have
alone: the same seeds and keys, the same records, the traces of the chunks it would
have run. Only the timings differ: the seconds are those of the whole batch.

A batch resumes as a whole (``.batch-<digest>.resume.npz``) and holds the lock of
every member's run file while it trains. Members whose run file already exists are
loaded, and the batch trains the others.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from analysis.results import (
    ResultsError,
    load_result,
    remove_resume,
    run_path,
    write_checkpoint,
)
from runner import callbacks as cb
from runner import resume
from runner.config import RunConfig
from runner.locks import run_lock
from runner.loop import Chunk, RunState, train
from runner.run import compile_program, execute, finish_run, run_callbacks
from runner.train import seed_keys, timed


def batch_key(config: RunConfig) -> str:
    """What runs of one batch share: everything but traced values and the label."""
    described = config.describe()
    shared = {k: v for k, v in described.items() if k not in ("run_id", "label")}
    spec = config.optimizer
    shared["optimizer"] = {
        "name": spec.name,
        "static": {k: v for k, v in spec.hparams.items() if k not in spec.traced},
        "traced": sorted(spec.traced),
    }
    if config.task_object is not None:
        shared["task_object"] = id(config.task_object)
    return json.dumps(shared, sort_keys=True, default=repr)


def batch_groups(runs: tuple[RunConfig, ...], enabled: bool) -> list[tuple[int, ...]]:
    """Indices of the runs, grouped into batches (singletons when not ``enabled``).

    Only runs with traced hyperparameters batch; groups keep the comparison's order.
    """
    if not enabled:
        return [(i,) for i in range(len(runs))]
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(runs):
        key = batch_key(config) if config.optimizer.traced else f"single-{i}"
        groups.setdefault(key, []).append(i)
    return [tuple(g) for g in groups.values()]


def execute_batch(
    configs: list[RunConfig],
    out: str | Path,
    progress: Any = None,
) -> list:
    """Train ``configs`` (one batch) into ``out``; their results, in order."""
    if len(configs) == 1:
        return [execute(configs[0], out, progress, skip_existing=True)]
    out = Path(out)
    described = [c.describe() for c in configs]
    paths = [run_path(out, d["run_id"]) for d in described]
    with ExitStack() as stack:
        for path in sorted(paths):  # one order: two batches never deadlock
            stack.enter_context(run_lock(path))
        results: list = [None] * len(configs)
        todo = []
        for i, path in enumerate(paths):
            try:
                results[i] = load_result(path) if path.is_file() else None
            except ResultsError:
                results[i] = None
            if results[i] is None:
                todo.append(i)
        if len(todo) == 1:
            results[todo[0]] = _train_single_locked(configs[todo[0]], out, progress)
        elif todo:
            trained = _train_batch([configs[i] for i in todo], out, progress)
            for i, result in zip(todo, trained, strict=True):
                results[i] = result
    return results


def _train_single_locked(config: RunConfig, out: Path, progress: Any):
    from runner.run import _train

    described = config.describe()
    return _train(config, described, run_path(out, described["run_id"]), progress)


class _MemberEnds:
    """Records, per grid point, after how many chunks all its seeds were done.

    Alone, a run stops once none of its seeds is active; in a batch the program
    goes on for the others, so each member's traces are cut where its own run
    would have stopped.
    """

    def __init__(self, members: int, seeds: int) -> None:
        self.members, self.seeds = members, seeds

    def on_start(self, run: RunState) -> None:
        run.callback_state.setdefault("member_chunks", [None] * self.members)

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        active = np.asarray(run.state.active).reshape(self.members, self.seeds)
        ends = run.callback_state["member_chunks"]
        for g in range(self.members):
            if ends[g] is None and not active[g].any():
                ends[g] = run.next_chunk


class _MemberCheckpoints:
    """Each member's parameters every ``every`` steps, next to its own run file."""

    def __init__(self, paths: list[Path], seeds: int, every: int | None) -> None:
        self.paths, self.seeds, self.every = paths, seeds, every

    def on_start(self, run: RunState) -> None:
        pass

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        if not self.every or chunk.step % self.every:
            return
        params = jax.tree.map(np.asarray, run.state.params)
        ends = run.callback_state["member_chunks"]
        for g, path in enumerate(self.paths):
            if ends[g] is not None and ends[g] < run.next_chunk:
                continue  # its own run stopped before this chunk
            part = slice(g * self.seeds, (g + 1) * self.seeds)
            write_checkpoint(
                path, chunk.step, jax.tree.map(lambda p, part=part: p[part], params)
            )


def _train_batch(configs: list[RunConfig], out: Path, progress: Any) -> list:
    first = configs[0]
    first.optimizer.check_builds()
    opts = first.options
    seeds = list(opts.seeds)
    n_members, n_seeds = len(configs), len(seeds)
    keys, evals = seed_keys(seeds)
    train_keys = jnp.tile(keys, (n_members, 1))
    eval_keys = jnp.tile(evals, (n_members, 1))
    hparams = {
        k: jnp.repeat(
            jnp.array([c.optimizer.traced[k] for c in configs], jnp.float32), n_seeds
        )
        for k in first.optimizer.traced
    }
    start = time.perf_counter()
    program = compile_program(first, train_keys, hparams, per_seed_hparams=True)
    compile_seconds = time.perf_counter() - start
    state, init_seconds = timed(program.init, train_keys, hparams)
    run_state = RunState(state, hparams, eval_keys, seconds=init_seconds)
    ids = [c.run_id for c in configs]
    batch_id = "batch-" + hashlib.sha1(" ".join(ids).encode()).hexdigest()[:12]
    anchor = out / f".{batch_id}.json"  # never written: names the batch's resume file
    run_state = resume.load(anchor, batch_id, run_state) or run_state
    indices = list(range(n_members * n_seeds))  # row labels, mapped back below
    callbacks = run_callbacks(first, indices, program, anchor, batch_id, progress)
    paths = [run_path(out, c.run_id) for c in configs]
    callbacks = [
        _MemberCheckpoints(paths, n_seeds, opts.checkpoint_every)
        if isinstance(c, cb.Checkpoints)
        else c
        for c in callbacks
    ]
    # After the success test, the work budget and early stopping (which retire
    # seeds), before anything that saves.
    retiring = max(
        i for i, c in enumerate(callbacks)
        if isinstance(c, cb.SuccessTest | cb.WorkBudget | cb.EarlyStopping)
    )  # fmt: skip
    callbacks.insert(retiring + 1, _MemberEnds(n_members, n_seeds))
    train(program, run_state, opts.steps, opts.eval_every, callbacks)
    results = []
    for g, config in enumerate(configs):
        member = _member(run_state, g, n_seeds, seeds, opts.eval_every)
        path = run_path(out, config.run_id)
        result = finish_run(
            config, config.describe(), path, member, seeds, compile_seconds, False
        )
        results.append(result)
    remove_resume(anchor)
    return results


def _member(run: RunState, g: int, n_seeds: int, seeds: list[int], eval_every: int):
    """Grid point ``g``'s part of a batched run, as its own run would hold it."""
    lo, hi = g * n_seeds, (g + 1) * n_seeds

    def rows(table):
        out = []
        for row in table:
            if lo <= row["seed"] < hi:
                out.append({**row, "seed": seeds[row["seed"] - lo]})
        return out

    chunks = run.callback_state["member_chunks"][g]
    traces = []
    if run.traces:
        width = None if chunks is None else chunks * eval_every
        traces = [
            {
                k: np.concatenate([t[k] for t in run.traces], axis=1)[lo:hi, :width]
                for k in run.traces[0]
            }
        ]
    return RunState(
        state=jax.tree.map(lambda x: x[lo:hi], run.state),
        hparams={k: v[lo:hi] for k, v in run.hparams.items()},
        eval_keys=run.eval_keys[lo:hi],
        seconds=run.seconds,
        probe_seconds=run.probe_seconds,
        records=rows(run.records),
        probes=rows(run.probes),
        traces=traces,
        solved_at={i - lo: v for i, v in run.solved_at.items() if lo <= i < hi},
        callback_state=_member_callback_state(run.callback_state, lo, hi),
        next_chunk=chunks if chunks is not None else run.next_chunk,
    )


def _member_callback_state(state: dict, lo: int, hi: int) -> dict:
    """The per-seed callback state of seeds ``lo..hi-1``, renumbered from 0."""
    if "early_stopping" not in state:
        return {}
    memo = state["early_stopping"]
    return {
        "early_stopping": {
            "best": memo["best"][lo:hi],
            "since": memo["since"][lo:hi],
            "stopped": [i - lo for i in memo["stopped"] if lo <= i < hi],
        }
    }
