"""``run``: train one configuration over several seeds and store the results.

:func:`run` validates its arguments into a :class:`~runner.config.RunConfig`
(:func:`run_config`) and hands it to :func:`execute`: compile the program (init,
chunk and success test, all before training; compile time is kept apart), initialize
every seed, drive the loop of :mod:`runner.loop` with the callbacks of
:mod:`runner.callbacks` and :mod:`runner.probing`, and write the run file through
:mod:`analysis.results`.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from analysis.results import (
    ResultsError,
    RunResult,
    load_result,
    remove_resume,
    run_path,
    write_run,
)
from analysis.stats import run_statistics
from runner import callbacks as cb
from runner import resume
from runner.config import OptimizerSpec, RunConfig, run_config
from runner.locks import run_lock
from runner.loop import RunState, train
from runner.probing import ProbeCallback
from runner.train import Program, Settings, build_program, seed_keys, timed
from tasks.base import Task

__all__ = ["RunResult", "compile_program", "execute", "load_result", "run"]

_PROGRAMS: dict[tuple, tuple[Task, Program]] = {}


def run(
    task: str | Task,
    optimizer: str | optax.GradientTransformation,
    seeds: int | list[int] = 5,
    steps: int = 1000,
    *,
    task_hparams: dict | None = None,
    opt_hparams: dict | None = None,
    label: str | None = None,
    out: str | Path | None = None,
    progress: Any = None,
    skip_existing: bool = False,
    **options: Any,
) -> RunResult:
    """Train ``task`` with ``optimizer`` for every seed (vmapped) and store the results.

    Args:
      task: a registered task name or import path (with ``task_hparams``) or a
        :class:`~tasks.base.Task`.
      optimizer: a registered name or import path (with ``opt_hparams``) or an
        optax transformation.
      seeds: number of seeds (``0..n-1``) or a list of seeds.
      steps: maximum number of updates per seed.
      label: the optimizer's name in tables (default: its registry name).
      out: results directory to write the run file into (None: do not write).
      progress: a tqdm-like bar updated with steps, loss and seeds solved.
      skip_existing: if ``out`` already holds this configuration's run file, load
        it instead of training again.
      **options: the other run options (``eval_every``, ``eval_size``,
        ``curvature_batch_size``, ``checkpoint_every``, ``record_steps``,
        ``probe_every``, ``probe_events``, ``explosion_factor``,
        ``lanczos_iters``, ``record_params``): see :class:`runner.options.RunOptions`
        and docs/configuration.md.

    Returns:
      A :class:`~analysis.results.RunResult`.

    Raises:
      ConfigError: invalid arguments, before anything is compiled.
    """
    config = run_config(
        task, optimizer, task_hparams=task_hparams, opt_hparams=opt_hparams,
        label=label, seeds=seeds, steps=steps, **options,
    )  # fmt: skip
    return execute(config, out, progress, skip_existing)


def execute(
    config: RunConfig,
    out: str | Path | None = None,
    progress: Any = None,
    skip_existing: bool = False,
) -> RunResult:
    """Train a validated configuration; write its run file into ``out``."""
    described = config.describe()
    path = run_path(out, described["run_id"]) if out is not None else None
    if path is None:
        return _train(config, described, None, progress)
    with run_lock(path):  # another process training this run: wait for it
        if skip_existing and path.is_file():
            try:
                return load_result(path)
            except ResultsError as err:  # damaged or incomplete: train it again
                warnings.warn(f"{err}; training the run again", stacklevel=2)
        return _train(config, described, path, progress)


def _train(
    config: RunConfig, described: dict, path: Path | None, progress: Any
) -> RunResult:
    """Train (or resume, from ``path``'s resume checkpoint) and write the run file."""
    config.optimizer.check_builds()
    opts = config.options
    seeds = list(opts.seeds)
    train_keys, eval_keys = seed_keys(seeds)
    hparams = {k: jnp.float32(v) for k, v in config.optimizer.traced.items()}
    start = time.perf_counter()
    program = compile_program(config, train_keys, hparams)
    compile_seconds = time.perf_counter() - start
    state, init_seconds = timed(program.init, train_keys, hparams)
    run_state = RunState(state, hparams, eval_keys, seconds=init_seconds)
    if path is not None:
        run_state = (
            resume.load(path, described["run_id"], run_state)
            or resume.continuation(path.parent, described, opts.eval_every, run_state)
            or run_state
        )
    callbacks = run_callbacks(
        config, seeds, program, path, described["run_id"], progress
    )
    train(program, run_state, opts.steps, opts.eval_every, callbacks)
    return finish_run(config, described, path, run_state, seeds, compile_seconds)


def run_callbacks(
    config: RunConfig,
    seeds: list[int],
    program: Program,
    path: Path | None,
    resume_id: str,
    progress: Any = None,
) -> list:
    """The callbacks of a run, in order: success test, work budget, records, early
    stopping, probes, checkpoints, resume checkpoints (under ``resume_id``),
    progress. ``seeds`` label the rows."""
    task, opts = config.task, config.options
    callbacks = [
        cb.SuccessTest(task, program.success),
        cb.WorkBudget(opts.work_budget),
        cb.Records(task, seeds, opts.record_steps),
        cb.EarlyStopping(opts.early_stopping, seeds),
    ]
    if opts.probe_every is not None:
        callbacks.append(
            ProbeCallback(
                task, seeds, opts.probe_every, opts.probe_events, opts.lanczos_iters
            )
        )
    callbacks.append(cb.Checkpoints(path, opts.checkpoint_every))
    callbacks.append(
        resume.ResumeCheckpoints(
            path, resume_id, opts.checkpoint_every, opts.resume_every_seconds
        )
    )
    if progress is not None:
        callbacks.append(cb.Progress(progress, opts.eval_every))
    return callbacks


def finish_run(
    config: RunConfig,
    described: dict,
    path: Path | None,
    run_state: RunState,
    seeds: list[int],
    compile_seconds: float,
    keep_final: bool = True,
) -> RunResult:
    """The run's result; with a ``path``, its files (and, ``keep_final``, its final
    state for a longer budget to continue from)."""
    result = RunResult(
        config=described,
        records=pd.DataFrame(run_state.records),
        summary=pd.DataFrame(
            cb.seed_summary(
                seeds,
                run_state,
                config.options.target_loss,
                config.task.has_success_test,
            )
        ),
        params=jax.tree.map(np.asarray, run_state.state.params),
        path=None,
        probes=pd.DataFrame(run_state.probes),
    )
    if path is None:
        return result
    timings = {
        "compile_seconds": compile_seconds,
        "seconds": run_state.seconds,
        "probe_seconds": run_state.probe_seconds,
    }
    versions = {"jax": jax.__version__, "optax": optax.__version__}
    steps = config.options.steps
    statistics = run_statistics(result.summary, config.options.target_loss)
    traces = _stack(run_state.traces, steps)
    write_run(path, result, timings, versions, traces, statistics)
    if keep_final:
        resume.save(path, described["run_id"], run_state, final=True)
    remove_resume(path)
    return result._replace(path=path)


def _stack(traces: list[dict], steps: int) -> dict[str, np.ndarray] | None:
    if not traces:
        return None
    return {
        k: np.concatenate([t[k] for t in traces], axis=1)[:, :steps] for k in traces[0]
    }


def compile_program(
    config: RunConfig,
    train_keys: jax.Array,
    hparams: dict,
    per_seed_hparams: bool = False,
) -> Program:
    """Lower and compile init, chunk and success test of a configuration.

    Programs are cached per task object, optimizer (factory, static
    hyperparameters, names of the traced ones), chunk length, evaluation and
    curvature sizes, number of seeds and the explosion and event settings, so runs
    that differ only in traced hyperparameters or seed values share one.
    """
    task, opts, spec = config.task, config.options, config.optimizer
    events = opts.probe_events if opts.probe_every is not None else 0
    key = (
        id(task),
        _optimizer_key(spec),
        opts.eval_every,
        opts.eval_size,
        opts.curvature_batch_size,
        int(train_keys.shape[0]),
        float(opts.explosion_factor),
        events,
        opts.record_params,
        per_seed_hparams,
    )
    if key not in _PROGRAMS:
        settings = Settings(
            task=task,
            build_optimizer=spec.build,
            chunk_steps=opts.eval_every,
            eval_size=opts.eval_size,
            curvature_batch_size=opts.curvature_batch_size,
            explosion_factor=float(opts.explosion_factor),
            event_slots=events,
            record_params=opts.record_params,
            per_seed_hparams=per_seed_hparams,
        )
        program = build_program(settings)
        state = jax.eval_shape(program.init, train_keys, hparams)
        seed_params = jax.eval_shape(task.init, train_keys[0])
        int32 = jax.ShapeDtypeStruct((), jnp.int32)
        compiled = Program(
            init=program.init.lower(train_keys, hparams).compile(),
            chunk=program.chunk.lower(
                state, hparams, train_keys, int32, int32
            ).compile(),
            success=(
                program.success.lower(seed_params, train_keys[0]).compile()
                if program.success is not None
                else None
            ),
        )
        _PROGRAMS[key] = (task, compiled)  # keep the task alive: id() stays unique
    return _PROGRAMS[key][1]


def _optimizer_key(spec: OptimizerSpec) -> tuple:
    static = json.dumps(spec.static, sort_keys=True, default=repr)
    return (spec.name, id(spec.factory), static, tuple(sorted(spec.traced)))
