"""The training loop: jit-compiled ``lax.scan`` chunks, all seeds vmapped.

One configuration (task, optimizer, hyperparameters) runs every seed in one compiled
program. The traced hyperparameters (see :func:`optimizers.traced_names`) are arguments
of that program, so a learning-rate or threshold sweep compiles once. Every
``eval_every`` steps the chunk ends with an evaluation on fresh sequences; seeds whose
error rate is below the task's threshold get the full success test (10,000 fresh
sequences, in chunks). A solved seed stops updating (its steps-to-solve is recorded); a
seed whose loss becomes non-finite is marked diverged at that step. Neither stops the
other seeds, and nothing raises.

Every step also flags an *explosion*: a gradient norm above ``explosion_factor``
times the running average (an exponential moving average, weight
``EXPLOSION_BETA``, of the previous finite norms, after ``EXPLOSION_WARMUP``
steps). With ``event_slots > 0`` the chunk keeps the parameters and batch key of
the first ``event_slots`` explosions of each seed, so that they can be probed
afterwards (:mod:`analysis.probes`) exactly where the wall was hit.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optimizers.base import (
    Objective,
    collect_records,
    collect_work,
    gradient_equivalents,
    loss_grads_and_states,
)
from tasks.base import Task

Array = jax.Array
SUCCESS_CHUNK = 1000  # sequences per forward pass in the success test
EXPLOSION_BETA = 0.95  # weight of the running average of gradient norms
EXPLOSION_WARMUP = 10  # finite norms averaged before explosions are flagged


class SeedState(NamedTuple):
    """Per-seed training state (vmapped over seeds)."""

    params: Any
    opt_state: Any
    key: Array
    t: Array  # global step index (counts every step of the run)
    updates: Array  # updates applied to this seed
    grad_evals: Array  # gradients computed by the runner for this seed
    active: Array  # neither solved nor diverged
    diverged_step: Array  # -1 or the update at which the loss became non-finite
    norm_avg: Array  # running average of finite gradient norms (explosion test)
    norm_seen: Array  # finite gradient norms averaged so far


class Events(NamedTuple):
    """The explosions of one chunk kept for probing (per seed, ``slots`` of them)."""

    params: Any  # parameters before the exploding update, leading slot axis
    batch_key: Array  # [slots, 2] key of the batch the gradient exploded on
    step: Array  # [slots] global step, -1 for an empty slot
    count: Array  # explosions seen in this chunk (may exceed the slots)


class Program(NamedTuple):
    """The compiled pieces of one configuration."""

    init: Callable  # (seed_keys, hparams) -> SeedState
    chunk: Callable  # (state, hparams, eval_keys, step_limit, first_step) -> ...
    success: Callable | None  # (params, key) -> error rate; None: no success test


def _select(flag: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


class Settings(NamedTuple):
    """What a compiled program is built from (static: a change recompiles).

    Attributes:
      task: the task.
      build_optimizer: traced hyperparameters -> transformation.
      chunk_steps: steps per compiled chunk (the evaluation interval).
      eval_size: sequences per evaluation.
      curvature_batch_size: curvature minibatch size (None: the task's).
      explosion_factor: a step explodes when its gradient norm exceeds this factor
        times the running average.
      event_slots: explosions per seed and chunk whose point is kept (0: none).
      record_params: add every parameter entry (before the update) to the
        per-step trace as ``param_<name>[_<i>]``: trajectories of small models.
      per_seed_hparams: the traced hyperparameters have a leading seed axis
        (a batched grid: every grid point's seeds in one program) instead of
        being shared by all seeds.
    """

    task: Task
    build_optimizer: Callable[[dict], optax.GradientTransformationExtraArgs]
    chunk_steps: int
    eval_size: int
    curvature_batch_size: int | None
    explosion_factor: float = 5.0
    event_slots: int = 0
    record_params: bool = False
    per_seed_hparams: bool = False


def build_program(s: Settings) -> Program:
    """Trace and jit (not yet compile) the init, chunk and success functions.

    All seeds are vmapped: ``init`` maps seed keys to a :class:`SeedState` with a
    leading seed axis, ``chunk`` runs ``chunk_steps`` steps of every seed (a
    ``lax.scan``) and evaluates them, and ``success`` is the full success test of
    one seed's parameters.
    """

    hp_axis = 0 if s.per_seed_hparams else None

    def init_all(seed_keys, hparams):
        return jax.vmap(functools.partial(_init_one, s), in_axes=(0, hp_axis))(
            seed_keys, hparams
        )

    def chunk_all(state, hparams, eval_keys, step_limit, first_step):
        return jax.vmap(
            functools.partial(_chunk_one, s), in_axes=(0, hp_axis, 0, None, None)
        )(state, hparams, eval_keys, step_limit, first_step)

    return Program(
        init=jax.jit(init_all),
        chunk=jax.jit(chunk_all, donate_argnums=0),
        success=(
            jax.jit(functools.partial(_success_one, s.task))
            if s.task.has_success_test
            else None
        ),
    )


def _init_one(s: Settings, key: Array, hparams: dict) -> SeedState:
    k_init, k_train = jax.random.split(key)
    params = s.task.init(k_init)
    opt_state = s.build_optimizer(hparams).init(params)
    zero = jnp.zeros((), jnp.int32)
    return SeedState(
        params, opt_state, k_train, zero, zero, zero, jnp.array(True), zero - 1,
        jnp.zeros((), jnp.float32), zero,
    )  # fmt: skip


def _train_step(
    s: Settings, state: SeedState, events: Events, hparams, step_limit, step
):
    """One update of one seed: batch, loss and gradients, optimizer, guards."""
    key, k_batch, k_curv, k_opt = jax.random.split(state.key, 4)
    batch = s.task.sample_batch(k_batch)
    curv = s.task.sample_batch(k_curv, s.curvature_batch_size)
    loss, grads, states, state_grads = loss_grads_and_states(
        s.task, state.params, batch
    )
    objective = Objective(
        s.task, batch, curv, loss, grads, states, state_grads,
        sample_curvature=lambda k: s.task.sample_batch(k, s.curvature_batch_size),
    )  # fmt: skip
    opt = s.build_optimizer(hparams)
    updates, opt_state = opt.update(
        grads,
        state.opt_state,
        state.params,
        objective=objective,
        key=k_opt,
        step=step,
    )
    params = optax.apply_updates(state.params, updates)
    live = state.active & (state.t < step_limit)
    # The non-finite policy covers the update too: a plug-in whose update is
    # NaN/Inf on a finite loss has diverged, and its parameters stay finite.
    finite = jnp.isfinite(loss) & _all_finite(updates)
    apply = live & finite
    diverged = live & ~finite
    norm = optax.tree_utils.tree_norm(grads).astype(jnp.float32)
    counted = live & jnp.isfinite(norm)
    explosion = (
        counted
        & (state.norm_seen >= EXPLOSION_WARMUP)
        & (norm > s.explosion_factor * state.norm_avg)
    )
    norm_avg = jnp.where(
        state.norm_seen > 0,
        EXPLOSION_BETA * state.norm_avg + (1 - EXPLOSION_BETA) * norm,
        norm,
    )
    if s.event_slots:
        events = _keep_event(events, explosion, state.params, k_batch, step)
    new_state = SeedState(
        params=_select(apply, params, state.params),
        opt_state=_select(apply, opt_state, state.opt_state),
        key=key,
        t=state.t + 1,
        updates=state.updates + apply,
        grad_evals=state.grad_evals + live,
        active=state.active & ~diverged,
        diverged_step=jnp.where(diverged, state.updates, state.diverged_step),
        norm_avg=jnp.where(counted, norm_avg, state.norm_avg),
        norm_seen=state.norm_seen + counted,
    )
    trace = {
        "live": live,
        "loss": loss,
        "grad_norm": norm,
        "explosion": explosion,
        **collect_records(opt_state),
    }
    if s.record_params:
        trace.update(_param_entries(state.params))
    return new_state, events, trace


def _chunk_one(
    s: Settings, state: SeedState, hparams, eval_key, step_limit, first_step
):
    """``chunk_steps`` steps of one seed, then its chunk summary and evaluation."""
    # The global step index is not vmapped: gates on it (re-estimate curvature
    # every k steps) stay real branches under the seed vmap.
    steps = first_step + jnp.arange(s.chunk_steps, dtype=jnp.int32)

    traced: dict[str, Any] = {}  # the trace row's shapes, from run_step's trace

    def run_step(carry, t):
        state, events, trace = _train_step(s, *carry, hparams, step_limit, t)
        traced["row"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trace
        )
        return (state, events), trace

    def skip_step(carry, t):  # past the run's last step: no work, a dead trace row
        # lax.cond traces run_step first; tracing it again only for its output
        # shapes would double the cost of tracing a training step.
        row = traced.get("row") or jax.eval_shape(run_step, carry, t)[1]
        return carry, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), row)

    def body(carry, t):
        # t and step_limit are shared by all seeds, so under the seed vmap this stays
        # a branch: the last chunk of a run whose length is not a multiple of
        # eval_every costs only its remaining steps.
        return jax.lax.cond(t < step_limit, run_step, skip_step, carry, t)

    (state, events), trace = jax.lax.scan(
        body, (state, _empty_events(state.params, s.event_slots)), steps
    )
    summary = _trace_summary(trace)
    # A fresh evaluation batch per chunk: the seed's evaluation key, folded with the
    # chunk's index.
    eval_key = jax.random.fold_in(eval_key, first_step // s.chunk_steps)
    summary.update(_evaluate(s, state.params, eval_key))
    work = collect_work(state.opt_state)
    summary["grad_evals"] = state.grad_evals + work.grad_evals
    summary["fun_evals"] = work.fun_evals
    summary["curvature_products"] = work.curvature_products
    summary["grad_equivalents"] = gradient_equivalents(
        summary["grad_evals"].astype(jnp.float32),
        work.fun_evals.astype(jnp.float32),
        work.curvature_products.astype(jnp.float32),
        s.task.batch_size,
        s.curvature_batch_size or s.task.batch_size,
    )
    return state, summary, trace, events


def _evaluate(s: Settings, params: Any, eval_key: Array) -> dict[str, Array]:
    """``eval_*`` metrics: on ``eval_size`` fresh sequences, or, for a task with
    held-out data, on its whole validation split, with ``test_*`` metrics on its
    whole test split (``error_rate`` is recorded as ``*_error``)."""
    validation = s.task.evaluation_batch("validation")
    if validation is None:
        batches = {"eval": s.task.sample_batch(eval_key, s.eval_size)}
    else:
        batches = {"eval": validation, "test": s.task.evaluation_batch("test")}
    out = {}
    for prefix, batch in batches.items():
        for name, value in s.task.metrics(params, batch).items():
            name = "error" if name == "error_rate" else name
            out[f"{prefix}_{name}"] = value
    return out


def _trace_summary(trace: dict[str, Array]) -> dict[str, Array]:
    """Means over the live steps of a chunk (``_rate`` for flags, else ``_mean``)."""
    live = trace["live"]
    n_live = jnp.maximum(jnp.sum(live), 1)

    def live_mean(x):
        return jnp.sum(jnp.where(live, x.astype(jnp.float32), 0.0)) / n_live

    summary = {
        "steps_live": jnp.sum(live),
        "loss": live_mean(trace["loss"]),
        "grad_norm_mean": live_mean(trace["grad_norm"]),
        "grad_norm_max": jnp.max(jnp.where(live, trace["grad_norm"], -jnp.inf)),
    }
    for name, values in trace.items():
        if name in ("live", "loss", "grad_norm") or name.startswith("param_"):
            continue
        suffix = "_rate" if values.dtype == jnp.bool_ else "_mean"
        summary[name + suffix] = live_mean(values)
    return summary


def _success_one(task: Task, params: Any, key: Array) -> Array:
    """Error rate on ``task.success_sequences`` fresh sequences (in chunks)."""
    n_chunks = -(-task.success_sequences // SUCCESS_CHUNK)
    size = min(SUCCESS_CHUNK, task.success_sequences)

    def body(k):
        return task.metrics(params, task.sample_batch(k, size))["error_rate"]

    return jnp.mean(jax.lax.map(body, jax.random.split(key, n_chunks)))


def _all_finite(tree: Any) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _empty_events(params: Any, slots: int) -> Events:
    return Events(
        params=jax.tree.map(lambda p: jnp.zeros((slots, *p.shape), p.dtype), params),
        batch_key=jnp.zeros((slots, 2), jnp.uint32),
        step=jnp.full((slots,), -1, jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def _keep_event(events: Events, flag: Array, params: Any, key: Array, step) -> Events:
    """Store ``(params, key, step)`` in the next free slot when ``flag``."""
    slot = jnp.minimum(events.count, events.step.shape[0] - 1)
    write = flag & (events.count < events.step.shape[0])

    def put(buffer, value):
        return buffer.at[slot].set(jnp.where(write, value, buffer[slot]))

    return Events(
        params=jax.tree.map(put, events.params, params),
        batch_key=put(events.batch_key, key),
        step=put(events.step, step),
        count=events.count + flag,
    )


def _param_entries(params: Any) -> dict[str, Array]:
    """``{"param_<path>[_<i>]": scalar}`` for every entry of a small model."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "param_" + "_".join(str(getattr(k, "key", k)) for k in path)
        flat = leaf.reshape(-1)
        if flat.shape[0] == 1:
            out[name] = flat[0]
        else:
            out.update({f"{name}_{i}": flat[i] for i in range(flat.shape[0])})
    return out


def spectral_radii(task: Task, params: Any) -> np.ndarray:
    """Spectral radius of each seed's recurrent matrix (NaN without one)."""
    matrix = task.recurrent_matrix(params)
    if matrix is None:
        return np.full(jax.tree.leaves(params)[0].shape[0], np.nan)
    matrix = np.asarray(matrix, dtype=np.float64)
    with np.errstate(all="ignore"):
        finite = np.isfinite(matrix).all(axis=(-2, -1))
        safe = np.where(finite[:, None, None], matrix, 0.0)
        radii = np.abs(np.linalg.eigvals(safe)).max(axis=-1)
    return np.where(finite, radii, np.nan)


def seed_keys(seeds: list[int]) -> tuple[Array, Array]:
    """Training keys and evaluation keys for each seed (independent streams)."""
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    train = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    evals = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return train, evals


def timed(fn: Callable, *args) -> tuple[Any, float]:
    """``fn(*args)`` after blocking on the result, with the wall time it took."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start
