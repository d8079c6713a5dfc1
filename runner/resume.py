"""Preemption-safe runs: the whole training state saved at chunk ends, and resumed.

A run killed at any point (``kill -9``, a preempted job, a full node) restarts from
its last resume checkpoint instead of from step 0, and ends bit-identical to a run
that was never interrupted: the checkpoint holds everything the next chunk depends
on, i.e. the per-seed training state (parameters, optimizer state, PRNG keys,
counters, the explosion test's running mean), the records, probes and per-step
traces so far, the seeds solved and when, the callbacks' own state (the probes'
explosion budget) and the index of the next chunk. Chunk boundaries do not depend
on where a run was interrupted, so the resumed run replays the same program on the
same state.

The file (``<run_id>.resume.npz``, written atomically by
:func:`analysis.results.write_resume`) is written at the end of a chunk every
``checkpoint_every`` steps and whenever ``resume_every_seconds`` of training have
passed since the last one, and deleted once the run file is written.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from analysis.results import ResultsError, read_resume, write_resume
from runner.loop import Chunk, RunState


def save(run_file: Path, run_id: str, run: RunState, final: bool = False) -> None:
    """Write ``run`` (after ``run.next_chunk`` chunks) as the resume checkpoint, or
    (``final``) as the run's final state."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(run.state)]
    trace_keys = sorted(run.traces[0]) if run.traces else []
    for key in trace_keys:
        leaves.append(np.concatenate([t[key] for t in run.traces], axis=1))
    meta = {
        "run_id": run_id,
        "next_chunk": run.next_chunk,
        "n_state_leaves": len(leaves) - len(trace_keys),
        "trace_keys": trace_keys,
        "seconds": run.seconds,
        "probe_seconds": run.probe_seconds,
        "records": run.records,
        "probes": run.probes,
        "solved_at": [[i, u, s] for i, (u, s) in sorted(run.solved_at.items())],
        "callback_state": run.callback_state,
    }
    write_resume(run_file, leaves, meta, final)


def load(
    run_file: Path, run_id: str, fresh: RunState, final: bool = False
) -> RunState | None:
    """The run saved for ``run_file``, or None (no checkpoint, or an unusable one).

    ``fresh`` is the run as initialized: its state gives the tree structure, shapes
    and dtypes the saved leaves must have. A checkpoint of another configuration,
    or a damaged one, is ignored (the run starts again from step 0).
    """
    try:
        leaves, meta = read_resume(run_file, final)
    except ResultsError:
        return None
    if final:  # another run's final state: the caller checked its configuration
        run_id = meta.get("run_id")
    like = jax.tree.leaves(fresh.state)
    n = meta.get("n_state_leaves")
    if meta.get("run_id") != run_id or n != len(like) or len(leaves) < n:
        return None
    for saved, leaf in zip(leaves[:n], like, strict=True):
        if saved.shape != leaf.shape or saved.dtype != leaf.dtype:
            return None
    treedef = jax.tree.structure(fresh.state)
    state = jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in leaves[:n]])
    traces = dict(zip(meta["trace_keys"], leaves[n:], strict=True))
    return RunState(
        state=state,
        hparams=fresh.hparams,
        eval_keys=fresh.eval_keys,
        seconds=meta["seconds"],
        probe_seconds=meta["probe_seconds"],
        records=meta["records"],
        probes=meta["probes"],
        traces=[traces] if traces else [],
        solved_at={int(i): (int(u), float(s)) for i, u, s in meta["solved_at"]},
        callback_state=meta["callback_state"],
        next_chunk=int(meta["next_chunk"]),
    )


class ResumeCheckpoints:
    """Save the run for resuming every ``every_steps`` steps or ``every_seconds``.

    ``every_steps`` (``checkpoint_every``) and ``every_seconds``
    (``resume_every_seconds``, measured in training and probing time) may each be
    None. Nothing is written without a run file.
    """

    def __init__(
        self,
        run_file: Path | None,
        run_id: str,
        every_steps: int | None,
        every_seconds: float | None,
    ) -> None:
        self.run_file, self.run_id = run_file, run_id
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self._last = time.perf_counter()

    def on_start(self, run: RunState) -> None:
        self._last = time.perf_counter()

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        if self.run_file is None:
            return
        by_steps = bool(self.every_steps) and chunk.step % self.every_steps == 0
        elapsed = time.perf_counter() - self._last
        by_time = self.every_seconds is not None and elapsed >= self.every_seconds
        if by_steps or by_time:
            save(self.run_file, self.run_id, run)
            self._last = time.perf_counter()


def continuation(
    out: Path, described: dict, eval_every: int, fresh: RunState
) -> RunState | None:
    """A finished run of this configuration with fewer ``steps``, to continue.

    Raising ``steps`` on a finished comparison then continues each run from its
    final state instead of training from step 0. The earlier run must differ in
    ``steps`` alone, have ended on a chunk boundary (its ``steps`` a multiple of
    ``eval_every``, so that its chunks are the new run's first ones) and have kept
    its final state. Of several, the longest is continued. The result is
    bit-identical to training the larger budget from the start.
    """
    from analysis.results import read_run, resume_path, run_files

    ours = {k: v for k, v in described.items() if k not in ("steps", "run_id")}
    # Run ids are "<readable part>-<digest>", and the readable part does not hold
    # steps: only files with our readable part can be the same configuration.
    prefix = described["run_id"].rsplit("-", 1)[0] + "-"
    best = None
    for file in run_files(out) if out.is_dir() else []:
        if not file.name.startswith(prefix):
            continue
        try:
            config = read_run(file)["config"]
        except ResultsError:
            continue
        theirs = {k: v for k, v in config.items() if k not in ("steps", "run_id")}
        steps = config.get("steps")
        if (
            theirs == ours
            and isinstance(steps, int)
            and steps < described["steps"]
            and steps % eval_every == 0
            and resume_path(file, final=True).is_file()
            and (best is None or steps > best[0])
        ):
            best = (steps, file)
    if best is None:
        return None
    return load(best[1], "", fresh, final=True)
