"""Curvature probes during a run: validation, the compiled probe, probe rows.

:class:`ProbeCallback` probes every live seed at step 0 and every ``probe_every``
steps on a fresh batch, and the explosions the compiled chunk kept
(:class:`runner.train.Events`) at the parameters and on the batch where the
gradient exploded. The measurements are :func:`analysis.probes.probe`. Probe time
is kept apart from training time (``probe_seconds``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from analysis.probes import ProbeConfig, check_probe_config, probe, probe_rows
from runner.loop import Chunk, RunState
from runner.train import timed
from tasks.base import Task

_PROBES: dict[tuple, Any] = {}


def cached_probe(task: Task, config: ProbeConfig):
    """``jit(params, batch_key, probe_key) -> probe`` of a task, compiled once.

    The batch is sampled inside the compiled function from ``batch_key``: the same
    batch the training step drew from that key.
    """
    key = (id(task), config)
    if key not in _PROBES:
        check_probe_config(config)

        def at(params, batch_key, probe_key):
            batch = task.sample_batch(batch_key)
            return probe(task, params, batch, probe_key, config)

        _PROBES[key] = (task, jax.jit(at))
    return _PROBES[key][1]


def _probe_one(prober, params, i, batch_key, probe_key, **columns) -> list[dict]:
    values = prober(jax.tree.map(lambda p: p[i], params), batch_key, probe_key)
    return probe_rows(jax.tree.map(lambda v: np.asarray(v)[None], values), **columns)


#: Folded into a seed's evaluation key for its probe keys (apart from chunk keys).
_PROBE_STREAM = 2**20


def periodic_probes(prober, seeds, state, eval_keys, step, was_active=None):
    """Probe every seed that was live in the chunk and has not diverged."""
    rows = []
    diverged = np.asarray(state.diverged_step) >= 0
    keys = np.asarray(
        jax.vmap(
            lambda k: jax.random.split(
                jax.random.fold_in(jax.random.fold_in(k, _PROBE_STREAM), step)
            )
        )(eval_keys)
    )
    for i, seed in enumerate(seeds):
        if (was_active is None or was_active[i]) and not diverged[i]:
            rows += _probe_one(
                prober, state.params, i, keys[i, 0], keys[i, 1],
                seed=seed, step=step, kind="periodic",
            )  # fmt: skip
    return rows


def event_probes(prober, seeds, events, budget):
    """Probe the kept explosions where they happened (same params, same batch).

    ``budget[i]`` explosion probes are left to seed ``i`` until the next periodic
    probe; it is decremented here, which bounds the probes' cost per interval.
    """
    rows = []
    steps = np.asarray(events.step)
    batch_keys = np.asarray(events.batch_key)
    for i, seed in enumerate(seeds):
        for j in np.flatnonzero(steps[i] >= 0)[: budget[i]]:
            budget[i] -= 1
            params = jax.tree.map(lambda p, i=i: p[i], events.params)
            probe_key = np.asarray(jax.random.fold_in(batch_keys[i, j], 1))
            rows += _probe_one(
                prober, params, j, batch_keys[i, j], probe_key,
                seed=seed, step=int(steps[i, j]), kind="explosion",
            )  # fmt: skip
    return rows


class ProbeCallback:
    """Periodic and explosion probes of a run (a :class:`runner.loop.Callback`).

    At most ``probe_events`` explosions per seed are probed between two periodic
    probes, which bounds the probes' cost per interval.
    """

    def __init__(
        self, task: Task, seeds: list[int], every: int, events: int, iters: int
    ) -> None:
        self.prober = cached_probe(task, ProbeConfig(lanczos_iters=iters))
        self.seeds, self.every, self.events = seeds, every, events

    def on_start(self, run: RunState) -> None:
        if run.next_chunk > 0:  # resumed: the step-0 probes are in run.probes
            return
        run.callback_state["probe_budget"] = [self.events] * len(self.seeds)
        rows, dt = timed(
            periodic_probes, self.prober, self.seeds, run.state, run.eval_keys, 0
        )
        run.probes += rows
        run.probe_seconds += dt

    def on_chunk(self, run: RunState, chunk: Chunk) -> None:
        # The explosion budget left per seed lives in the run, so a resumed run
        # continues it (event_probes spends it in place).
        budget = run.callback_state["probe_budget"]
        rows, dt = timed(event_probes, self.prober, self.seeds, chunk.events, budget)
        run.probes += rows
        run.probe_seconds += dt
        if chunk.step % self.every == 0:
            rows, dt = timed(
                periodic_probes, self.prober, self.seeds, run.state, run.eval_keys,
                chunk.step, chunk.was_active,
            )  # fmt: skip
            run.probes += rows
            run.probe_seconds += dt
            run.callback_state["probe_budget"] = [self.events] * len(self.seeds)
