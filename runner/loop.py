"""The training loop: compiled chunks handed to callbacks.

:func:`train` runs the compiled program of :mod:`runner.train` chunk by chunk
(``eval_every`` steps each, every seed vmapped) and hands each finished chunk to a
list of callbacks, in order. A callback is any object with ``on_start(run)`` and
``on_chunk(run, chunk)``: the success test, the records, curvature probes,
checkpoints and progress are callbacks (:mod:`runner.callbacks`), and a new per-chunk
measurement is one more, not an edit of the loop. Callbacks read and extend the
mutable :class:`RunState`; the success test is the one that changes the training
state (it retires solved seeds).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from runner.train import Program, SeedState, timed


@dataclasses.dataclass
class RunState:
    """What a run has done so far (host side).

    Attributes:
      state: the per-seed training state (device arrays, leading seed axis).
      hparams: the traced optimizer hyperparameters.
      eval_keys: per-seed evaluation keys.
      seconds: training time so far (chunks and success tests, no compilation).
      probe_seconds: time spent in curvature probes (kept apart from training).
      records, probes: tidy rows so far (one per seed and chunk / probe).
      traces: per-step traces of each chunk (``record_steps``).
      solved_at: seed index -> (updates, seconds) when it was solved.
      callback_state: what callbacks keep between chunks (JSON values), so that a
        resumed run (:mod:`runner.resume`) carries it on.
      next_chunk: index of the next chunk to run (0 for a new run).
    """

    state: SeedState
    hparams: dict
    eval_keys: jax.Array
    seconds: float = 0.0
    probe_seconds: float = 0.0
    records: list[dict] = dataclasses.field(default_factory=list)
    probes: list[dict] = dataclasses.field(default_factory=list)
    traces: list[dict] = dataclasses.field(default_factory=list)
    solved_at: dict[int, tuple[int, float]] = dataclasses.field(default_factory=dict)
    callback_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    next_chunk: int = 0


@dataclasses.dataclass
class Chunk:
    """One finished chunk, as callbacks see it.

    Attributes:
      index: chunk number (0-based).
      step: steps done after it (clamped to the run's ``steps``).
      summary: per-seed chunk summary (numpy arrays: loss, evaluation, work).
      trace: per-step trace of the chunk (device arrays ``[seed, step]``).
      events: the explosions kept for probing (:class:`runner.train.Events`).
      was_active: seeds that were training when the chunk started.
      newly_solved: seed indices the success test retired after this chunk.
    """

    index: int
    step: int
    summary: dict[str, np.ndarray]
    trace: dict[str, Any]
    events: Any
    was_active: np.ndarray
    newly_solved: list[int] = dataclasses.field(default_factory=list)


class Callback(Protocol):
    """Called at the start of a run and after every chunk."""

    def on_start(self, run: RunState) -> None: ...

    def on_chunk(self, run: RunState, chunk: Chunk) -> None: ...


def train(
    program: Program,
    run: RunState,
    steps: int,
    eval_every: int,
    callbacks: list[Callback],
) -> RunState:
    """Run ``steps`` steps in chunks of ``eval_every``; stop early once no seed is
    active (all solved or diverged).

    Starts at chunk ``run.next_chunk`` (0 for a new run, later for a resumed one)
    and advances it after each chunk, before the callbacks see it.
    """
    for callback in callbacks:
        callback.on_start(run)
    for index in range(run.next_chunk, -(-steps // eval_every)):
        if index > 0 and not np.asarray(run.state.active).any():
            break
        was_active = np.asarray(run.state.active)
        (run.state, summary, trace, events), dt = timed(
            program.chunk,
            run.state,
            run.hparams,
            run.eval_keys,
            jnp.int32(steps),
            jnp.int32(index * eval_every),
        )
        run.seconds += dt
        run.next_chunk = index + 1
        chunk = Chunk(
            index=index,
            step=min((index + 1) * eval_every, steps),
            summary=jax.tree.map(np.asarray, summary),
            trace=trace,
            events=events,
            was_active=was_active,
        )
        for callback in callbacks:
            callback.on_chunk(run, chunk)
    return run
