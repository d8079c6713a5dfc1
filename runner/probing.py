"""Curvature probes during a run: validation, the compiled probe, probe rows.

:func:`runner.run.run` probes every live seed at step 0 and every ``probe_every``
steps on a fresh batch, and the explosions the compiled chunk kept
(:class:`runner.train.Events`) at the parameters and on the batch where the
gradient exploded. The measurements are :func:`analysis.probes.probe`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from analysis.probes import ProbeConfig, check_probe_config, probe, probe_rows
from tasks.base import Task
from tasks.hparams import ConfigError

MAX_RECORDED_PARAMS = 64


def check_probe_args(
    task: Task,
    eval_every: int,
    probe_every: int | None,
    probe_events: int,
    factor: float,
    iters: int,
    record_params: bool,
):
    """Validate the probe settings; the probe function, or None without probes."""
    if not isinstance(factor, int | float) or isinstance(factor, bool) or factor <= 1:
        raise ConfigError(f"'explosion_factor' must be a number > 1, got {factor!r}")
    if record_params:
        n_params = sum(
            int(np.prod(s.shape))
            for s in jax.tree.leaves(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
        )
        if n_params > MAX_RECORDED_PARAMS:
            raise ConfigError(
                f"'record_params' is for small models (at most "
                f"{MAX_RECORDED_PARAMS} parameters); this task has {n_params}"
            )
    if probe_every is None:
        return None
    if not isinstance(probe_every, int) or probe_every < 1 or probe_every % eval_every:
        raise ConfigError(
            f"'probe_every' = {probe_every!r} must be a positive multiple of "
            f"'eval_every' = {eval_every}"
        )
    if not isinstance(probe_events, int) or probe_events < 0:
        raise ConfigError(
            f"'probe_events' must be a non-negative integer, got {probe_events!r}"
        )
    return cached_probe(task, ProbeConfig(lanczos_iters=iters))


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
