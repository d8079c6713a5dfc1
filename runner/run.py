"""``run``: train one configuration over several seeds and store the results."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from optimizers.base import gradient_equivalents
from optimizers.registry import check_optimizer, resolve_optimizer, traced_names
from runner import store
from runner.probing import check_probe_args, event_probes, periodic_probes
from runner.train import Program, build_program, seed_keys, spectral_radii, timed
from tasks.base import Task
from tasks.hparams import ConfigError
from tasks.registry import make_task

_PROGRAMS: dict[tuple, tuple[Task, Program]] = {}
_TASKS: dict[str, Task] = {}
#: Number of programs compiled so far (a sweep over traced hyperparameters adds one).
COMPILATIONS = {"count": 0}


class RunResult(NamedTuple):
    """What :func:`run` returns (and writes, when ``out`` is given)."""

    config: dict
    records: pd.DataFrame  # one row per seed and evaluation step
    summary: pd.DataFrame  # one row per seed
    params: Any  # final parameters, leading seed axis
    path: Path | None  # the run file
    probes: pd.DataFrame = pd.DataFrame()  # one row per seed and curvature probe


class OptimizerSpec(NamedTuple):
    """A validated optimizer: factory, static and traced hyperparameters."""

    name: str
    factory: Any
    static: dict
    traced: dict

    def build(self, traced_values: dict) -> optax.GradientTransformationExtraArgs:
        return optax.with_extra_args_support(
            self.factory(**self.static, **traced_values)
        )


def optimizer_spec(optimizer: Any, hparams: dict | None = None) -> OptimizerSpec:
    """Validate an optimizer given by name, import path or transformation."""
    hparams = dict(hparams or {})
    if isinstance(optimizer, optax.GradientTransformation):
        if hparams:
            raise ConfigError("hyperparameters cannot be set on a ready transformation")
        return OptimizerSpec("custom", lambda: optimizer, {}, {})
    if not isinstance(optimizer, str):
        raise ConfigError(
            f"optimizer must be a name or a transformation: {optimizer!r}"
        )
    full = check_optimizer(optimizer, hparams)
    traced = {k: full[k] for k in traced_names(optimizer)}
    static = {k: v for k, v in full.items() if k not in traced}
    return OptimizerSpec(optimizer, resolve_optimizer(optimizer), static, traced)


def _program(task, spec, chunk_steps, eval_size, curv_size, n_seeds, probe_args,
             options):  # fmt: skip
    key = (
        options,
        id(task),
        spec.name,
        id(spec.factory),
        json.dumps(spec.static, sort_keys=True, default=repr),
        tuple(sorted(spec.traced)),
        chunk_steps,
        eval_size,
        curv_size,
        n_seeds,
    )
    if key not in _PROGRAMS:
        program = build_program(
            task, spec.build, chunk_steps, eval_size, curv_size, *options
        )
        state_shape = jax.eval_shape(program.init, *probe_args)
        compiled = Program(
            init=program.init.lower(*probe_args).compile(),
            chunk=program.chunk.lower(
                state_shape, probe_args[1], probe_args[0], jnp.int32(0), jnp.int32(0)
            ).compile(),
            success=program.success,
        )
        COMPILATIONS["count"] += 1
        _PROGRAMS[key] = (task, compiled)  # keep the task alive: id() stays unique
    return _PROGRAMS[key][1]


def cached_task(name: str, hparams: dict) -> Task:
    """Build (and validate) a registered task once per configuration.

    Runs of the same task configuration then share compiled programs.
    """
    key = json.dumps([name, hparams], sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = make_task(name, **hparams)
    return _TASKS[key]


def run_id_for(config: dict) -> str:
    """A readable, unique file name for a configuration."""
    task = config["task"]
    parts = [task["name"]]
    if "length" in task:
        parts.append(f"L{task['length']}")
    if "init" in task:
        parts.append(task["init"])
    parts.append(config["label"])
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(str(p) for p in parts))
    return f"{slug}-{digest}"


def run(
    task: str | Task,
    optimizer: str | optax.GradientTransformation,
    seeds: int | list[int] = 5,
    steps: int = 1000,
    *,
    task_hparams: dict | None = None,
    opt_hparams: dict | None = None,
    label: str | None = None,
    eval_every: int = 100,
    eval_size: int = 1000,
    curvature_batch_size: int | None = None,
    checkpoint_every: int | None = None,
    record_steps: bool = True,
    probe_every: int | None = None,
    probe_events: int = 2,
    explosion_factor: float = 5.0,
    lanczos_iters: int = 20,
    record_params: bool = False,
    out: str | Path | None = None,
    progress: Any = None,
    skip_existing: bool = False,
) -> RunResult:
    """Train ``task`` with ``optimizer`` for every seed (vmapped) and store the results.

    Args:
      task: a registered task name (with ``task_hparams``) or a :class:`Task`.
      optimizer: a registered name, an import path (with ``opt_hparams``) or an optax
        transformation.
      seeds: number of seeds (``0..n-1``) or a list of seeds.
      steps: maximum number of updates per seed.
      label: the optimizer's name in tables (default: its registry name).
      eval_every: steps per compiled chunk; evaluation and success test follow each.
      eval_size: fresh sequences per evaluation.
      curvature_batch_size: size of the curvature minibatch handed to the optimizer
        every step (default: the task's batch size).
      checkpoint_every: save parameters every this many steps (multiple of
        ``eval_every``).
      record_steps: keep per-step traces (``<run>.steps.npz``).
      probe_every: run the curvature probes of :mod:`analysis.probes` on every
        live seed at step 0 and every this many steps (a multiple of
        ``eval_every``; None: no probes). Rows go to the run file's ``probes``.
      probe_events: with ``probe_every``, also probe the first this many
        explosions of each seed between two periodic probes, at the parameters and
        on the batch where the gradient exploded (0: periodic probes only). Probe
        time is stored apart (``probe_seconds``), not in the training seconds.
      explosion_factor: a step explodes when its gradient norm exceeds this factor
        times the running average of the previous norms (every run counts them:
        ``explosion_rate`` in the records).
      lanczos_iters: Hessian-vector products per probe's Lanczos run.
      record_params: add every parameter entry to the per-step traces (for small
        models, e.g. the wall's trajectories; at most
        ``runner.probing.MAX_RECORDED_PARAMS``).
      out: comparison directory to write the run file into (None: do not write).
      progress: a tqdm-like bar updated with steps, loss and seeds solved.
      skip_existing: if ``out`` already holds this configuration's run file, load it
        instead of training again.

    Returns:
      A :class:`RunResult`.
    """
    if isinstance(task, str):
        task = cached_task(task, task_hparams or {})
    elif task_hparams:
        raise ConfigError("task_hparams are only accepted with a task name")
    spec = optimizer_spec(optimizer, opt_hparams)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    _check_run_args(seed_list, steps, eval_every, eval_size, checkpoint_every)
    prober = check_probe_args(
        task, eval_every, probe_every, probe_events, explosion_factor, lanczos_iters,
        record_params,
    )  # fmt: skip
    config = {
        "task": task.describe(),
        "optimizer": {"name": spec.name, "hparams": {**spec.static, **spec.traced}},
        "label": label or spec.name,
        "seeds": seed_list,
        "steps": steps,
        "eval_every": eval_every,
        "eval_size": eval_size,
        "curvature_batch_size": curvature_batch_size,
        "explosion_factor": explosion_factor,
    }
    if record_params:
        config["record_params"] = True
    if probe_every is not None:
        config["probes"] = {
            "probe_every": probe_every,
            "probe_events": probe_events,
            "lanczos_iters": lanczos_iters,
        }
    config["run_id"] = run_id_for(config)
    out_dir = Path(out) if out is not None else None
    if skip_existing and out_dir is not None:
        existing = out_dir / f"{config['run_id']}{store.RUN_SUFFIX}"
        if existing.is_file():
            return load_result(existing)

    train_keys, eval_keys = seed_keys(seed_list)
    hparams = {k: jnp.float32(v) for k, v in spec.traced.items()}
    start = time.perf_counter()
    program = _program(
        task, spec, eval_every, eval_size, curvature_batch_size, len(seed_list),
        (train_keys, hparams),
        (float(explosion_factor), probe_events if prober else 0, record_params),
    )  # fmt: skip
    compile_seconds = time.perf_counter() - start
    state, seconds = timed(program.init, train_keys, hparams)

    records, traces, probes = [], [], []
    solved_at = {}  # seed index -> (updates, seconds)
    # Probe time is kept apart: it is not training time (seconds to solve).
    probe_seconds = 0.0
    # Explosion probes left per seed until the next periodic probe.
    budget = [probe_events] * len(seed_list)
    if prober is not None:
        probes, probe_seconds = timed(
            periodic_probes, prober, seed_list, state, eval_keys, 0
        )
    n_chunks = -(-steps // eval_every)
    for chunk in range(n_chunks):
        chunk_eval_keys = jax.vmap(lambda k, c=chunk: jax.random.fold_in(k, c))(
            eval_keys
        )
        was_active = np.asarray(state.active)
        (state, summary, trace, events), dt = timed(
            program.chunk,
            state,
            hparams,
            chunk_eval_keys,
            jnp.int32(steps),
            jnp.int32(chunk * eval_every),
        )
        seconds += dt
        step = min((chunk + 1) * eval_every, steps)
        if prober is not None:
            rows, dt = timed(event_probes, prober, seed_list, events, budget)
            probes, probe_seconds = probes + rows, probe_seconds + dt
            if step % probe_every == 0:
                rows, dt = timed(
                    periodic_probes, prober, seed_list, state, eval_keys, step,
                    was_active,
                )  # fmt: skip
                probes, probe_seconds = probes + rows, probe_seconds + dt
                budget = [probe_events] * len(seed_list)
        summary = jax.tree.map(np.asarray, summary)
        if record_steps:
            traces.append({k: np.asarray(v) for k, v in trace.items()})
        radii = spectral_radii(task, state.params)
        state, newly, dt = _success_tests(task, program, state, summary, was_active)
        seconds += dt
        for i in newly:
            solved_at[i] = (int(state.updates[i]), seconds)
        rows = _chunk_rows(
            seed_list, summary, radii, state, was_active, newly, step, seconds
        )
        for row in rows:
            row["grad_equivalents"] = gradient_equivalents(
                row["grad_evals"], row["fun_evals"], row["curvature_products"],
                task.batch_size, curvature_batch_size or task.batch_size,
            )  # fmt: skip
        records += rows
        if checkpoint_every and step % checkpoint_every == 0:
            _save_checkpoint(out_dir, config, state.params, step)
        if progress is not None:
            _report(progress, eval_every, summary, was_active, len(solved_at))
        if not np.asarray(state.active).any():
            break

    summary_rows = _seed_summary(seed_list, state, solved_at, records, steps)
    for row in summary_rows:
        row["run_seconds"] = seconds
    result = RunResult(
        config=config,
        records=pd.DataFrame(records),
        summary=pd.DataFrame(summary_rows),
        params=jax.tree.map(np.asarray, state.params),
        path=None,
        probes=pd.DataFrame(probes),
    )
    if out_dir is None:
        return result
    path = out_dir / f"{config['run_id']}{store.RUN_SUFFIX}"
    if record_steps and traces:
        stacked = {
            k: np.concatenate([t[k] for t in traces], axis=1)[:, :steps]
            for k in traces[0]
        }
        store.write_arrays(path.with_suffix(".steps.npz"), stacked)
    store.write_arrays(
        path.with_suffix(".params.npz"), store.flatten_params(result.params)
    )
    payload = {
        "config": config,
        "compile_seconds": compile_seconds,
        "seconds": seconds,
        "probe_seconds": probe_seconds,
        "versions": {"jax": jax.__version__, "optax": optax.__version__},
        "summary": summary_rows,
        "records": records,
        "probes": probes,
    }
    store.write_json(path, payload)
    return result._replace(path=path)


def load_result(path: str | Path) -> RunResult:
    """A stored run as a :class:`RunResult` (the inverse of writing it)."""
    path = Path(path)
    payload = store.read_run(path)
    return RunResult(
        config=payload["config"],
        records=pd.DataFrame(payload["records"]),
        summary=pd.DataFrame(payload["summary"]),
        params=store.load_params(path),
        path=path,
        probes=pd.DataFrame(payload.get("probes", [])),
    )


def _check_run_args(seeds, steps, eval_every, eval_size, checkpoint_every) -> None:
    if not seeds:
        raise ConfigError("'seeds' must name at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"'seeds' must be distinct, got {seeds}")
    for name, value in (("steps", steps), ("eval_every", eval_every)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"'{name}' must be a positive integer, got {value!r}")
    if not isinstance(eval_size, int) or eval_size < 1:
        raise ConfigError(f"'eval_size' must be a positive integer, got {eval_size!r}")
    if checkpoint_every is not None and (
        checkpoint_every < 1 or checkpoint_every % eval_every
    ):
        raise ConfigError(
            f"'checkpoint_every' = {checkpoint_every} must be a positive multiple of "
            f"'eval_every' = {eval_every}"
        )


def _success_tests(task, program, state, summary, was_active):
    """Run the full success test for seeds whose evaluation error is low enough."""
    start = time.perf_counter()
    candidates = np.flatnonzero(
        np.asarray(state.active)
        & was_active
        & (summary["eval_error"] < task.success_threshold)
    )
    newly = []
    for i in candidates:
        params = jax.tree.map(lambda p, i=i: p[i], state.params)
        key = jax.random.fold_in(state.key[i], 7)
        if task.success(float(program.success(params, key))):
            newly.append(int(i))
    if newly:
        state = state._replace(active=state.active.at[np.array(newly)].set(False))
    return state, newly, time.perf_counter() - start


def _chunk_rows(seeds, summary, radii, state, was_active, newly, step, seconds):
    rows = []
    updates = np.asarray(state.updates)
    diverged = np.asarray(state.diverged_step)
    for i, seed in enumerate(seeds):
        if not was_active[i]:
            continue
        row = {"seed": seed, "step": step, "updates": int(updates[i])}
        row.update({k: float(v[i]) for k, v in summary.items() if k != "steps_live"})
        row["spectral_radius"] = float(radii[i])
        row["seconds"] = seconds
        row["status"] = (
            "solved" if i in newly else "diverged" if diverged[i] >= 0 else "running"
        )
        rows.append(row)
    return rows


def _seed_summary(seeds, state, solved_at, records, steps):
    rows = []
    diverged = np.asarray(state.diverged_step)
    updates = np.asarray(state.updates)
    last = {r["seed"]: r for r in records}
    for i, seed in enumerate(seeds):
        row = {"seed": seed, "updates": int(updates[i])}
        if i in solved_at:
            row.update(status="solved", steps_to_solve=solved_at[i][0])
            row["seconds_to_solve"] = solved_at[i][1]
            row["grad_evals_to_solve"] = last[seed]["grad_evals"]
            row["grad_equivalents_to_solve"] = last[seed]["grad_equivalents"]
        else:
            status = "diverged" if diverged[i] >= 0 else "unsolved"
            row.update(status=status, steps_to_solve=None, seconds_to_solve=None)
            row["grad_evals_to_solve"] = None
            row["grad_equivalents_to_solve"] = None
        row["diverged_step"] = int(diverged[i]) if diverged[i] >= 0 else None
        row["final_eval_error"] = last[seed]["eval_error"] if seed in last else None
        rows.append(row)
    return rows


def _save_checkpoint(out_dir, config, params, step) -> None:
    if out_dir is None:
        return
    folder = out_dir / f"{config['run_id']}.ckpt"
    arrays = store.flatten_params(jax.tree.map(np.asarray, params))
    store.write_arrays(folder / f"step_{step}.npz", arrays)


def _report(progress, n, summary, was_active, n_solved) -> None:
    progress.update(n)
    losses = summary["loss"][was_active]
    loss = float(np.nanmedian(losses)) if losses.size else float("nan")
    progress.set_postfix(loss=f"{loss:.4g}", solved=n_solved)
