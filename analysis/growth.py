"""Growth experiment: how gradient and curvature grow with length or spectral radius.

Pascanu et al. (2013, section 3) argue that along an exploding direction the
curvature explodes with the gradient. This experiment measures the probe quantities
of :mod:`analysis.probes` at many seeds and batches while one thing varies:

* ``x = "length"``: the sequence length ``T`` (the task's ``length`` and
  ``min_length``; addition-like tasks add their random 10%); for an exploding
  recurrence ``||g|| ~ exp(r_g T)``;
* ``x = "radius"``: the spectral radius ``rho`` of ``W_rec``, rescaled at a fixed
  length (``rho > 1 / gamma`` is necessary for explosion: 1 for tanh, 4 for the
  logistic sigmoid);

at initialization (optionally with ``W_rec`` rescaled to a radius) or at the
parameters saved by a run (a checkpoint or the final ones). It then fits the
exponential growth rate of each quantity against ``x`` and the slope of
``log |c|`` against ``log ||g||`` with confidence intervals
(:func:`analysis.fit.growth_table`). A slope of 1 means curvature and gradient
grow at the same rate: the Newton step ``||g|| / c`` stays bounded.

Results are written as ``<name>.growth.json``: the configuration, the tidy rows
(one per value of ``x``, seed and batch) and the fits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from analysis import results
from analysis.fit import growth_table
from analysis.probes import SCALARS, ProbeConfig, check_probe_config, probe
from analysis.results import GROWTH_SUFFIX
from tasks.base import Batch, Task
from tasks.hparams import ConfigError, declared_hparams
from tasks.registry import TASKS, make_task
from tasks.rnn import spectral_radius

X_CHOICES = ("length", "radius")
#: Quantities whose growth is fitted (the sign of ``curv_hessian`` is dropped).
FITTED = ("grad_norm", "curv_hessian", "curv_gn", "top_eigenvalue", "smoothness")


def rescale_recurrent(task: Task, params: dict, radius: float) -> dict:
    """``params`` with the recurrent weights scaled to spectral radius ``radius``."""
    try:
        mask = task.recurrent_mask(params)
    except NotImplementedError:
        raise ConfigError(f"task {task.name!r} has no recurrent weights") from None
    matrix = task.recurrent_matrix(params)
    if matrix is None:
        raise ConfigError(f"task {task.name!r} has no recurrent matrix")
    current = spectral_radius(matrix)
    scale = radius / jnp.where(current > 0, current, 1.0)
    return jax.tree.map(lambda p, m: p * scale if m else p, params, mask)


def _task_at(name: str, hparams: dict, x: str, value: float) -> Task:
    if x != "length":
        return make_task(name, **hparams)
    hparams = {**hparams, "length": int(value)}
    if "min_length" in _task_hparam_names(name):
        hparams["min_length"] = int(value)
    return make_task(name, **hparams)


def _task_hparam_names(name: str) -> set[str]:
    return set(declared_hparams(TASKS[name]))


def _check(task, x, values, seeds, n_batches, radius) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if x not in X_CHOICES:
        raise ConfigError(f"'x' must be one of {list(X_CHOICES)}, not {x!r}")
    if len(values) < 3:
        what = "lengths" if x == "length" else "radii"
        raise ConfigError(
            f"give at least 3 {what} to fit a growth rate, got {list(values)}"
        )
    if x == "length" and any(int(v) != v or v < 2 for v in values):
        raise ConfigError(f"lengths must be integers >= 2, got {list(values)}")
    if x == "radius" and any(not 0 < v < math.inf for v in values):
        raise ConfigError(f"radii must be positive, got {list(values)}")
    if not seeds:
        raise ConfigError("'seeds' must name at least one seed")
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ConfigError(f"'batches' must be a positive integer, got {n_batches!r}")
    if radius is not None and not 0 < radius < math.inf:
        raise ConfigError(f"'radius' must be a positive number, got {radius!r}")
    if x == "radius" and radius is not None:
        raise ConfigError("'radius' rescales W_rec for a length sweep; with x = "
                          "'radius' the radii are the values")  # fmt: skip


def measure(
    task: str,
    x: str,
    values: Sequence[float],
    *,
    task_hparams: dict | None = None,
    seeds: Sequence[int] = range(5),
    batches: int = 4,
    radius: float | None = None,
    params: dict | None = None,
    source: str = "init",
    config: ProbeConfig | None = None,
) -> pd.DataFrame:
    """Probe quantities for every value of ``x``, seed and batch (tidy rows).

    Args:
      task: a registered task name.
      x: "length" or "radius".
      values: the lengths or spectral radii.
      task_hparams: the task's other hyperparameters.
      seeds: initialization seeds; with ``params``, the labels of its seed axis
        in order (row ``i`` of ``params`` is ``seeds[i]``).
      batches: independent batches per seed and value.
      radius: with ``x = "length"``, rescale ``W_rec`` to this spectral radius
        first (None: as initialized or saved).
      params: parameters with a leading seed axis (from a run) instead of the
        initialization; ``seeds`` then index that axis.
      source: a label for where the parameters come from ("init", "HF step 1000").
      config: the probe settings.
    """
    task_hparams = dict(task_hparams or {})
    seeds = list(seeds)
    _check(task, x, values, seeds, batches, radius)
    config = check_probe_config(config or ProbeConfig())
    # One compiled probe for every value: batches of shorter sequences are padded
    # (zero inputs, zero mask) to the longest, which leaves every probed quantity
    # unchanged because the recurrence is causal and the loss is masked.
    tasks = {v: _task_at(task, task_hparams, x, v) for v in values}
    model = tasks[max(values)] if x == "length" else tasks[values[0]]
    grid = _probe_grid(model, config)
    shape_key = jax.ShapeDtypeStruct((1, 1, 2), jnp.uint32)
    steps = max(
        jax.eval_shape(lambda k, t=t: _sample(t, k), shape_key).inputs.shape[2]
        for t in tasks.values()
    )
    rows = []
    for value in values:
        t = tasks[value]
        rho = float(value) if x == "radius" else radius
        point = []
        for i, seed in enumerate(seeds):
            if params is None:
                p = t.init(jax.random.PRNGKey(seed))
            else:
                p = jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), params)
            point.append(p if rho is None else rescale_recurrent(t, p, rho))
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *point)
        keys = jnp.stack(
            [
                jax.random.fold_in(jax.random.PRNGKey(seed), 1000 + b)
                for seed in seeds
                for b in range(batches)
            ]
        ).reshape(len(seeds), batches, -1)
        batch = _pad_time(_sample(t, keys), steps)
        out = jax.tree.map(np.asarray, grid(stacked, batch, keys))
        described = t.describe()
        for i, seed in enumerate(seeds):
            for b in range(batches):
                row = {
                    "task": task,
                    "init": described.get("init"),
                    "length": described.get("length"),
                    "radius": np.nan if rho is None else rho,
                    "source": source,
                    "seed": seed,
                    "batch": b,
                }
                row.update({k: float(out[k][i, b]) for k in SCALARS})
                rows.append(row)
    return pd.DataFrame(rows)


def _sample(task: Task, keys: jax.Array) -> Batch:
    """Batches ``[seeds, batches, T, B, ...]`` from keys ``[seeds, batches, 2]``."""
    keys = jax.vmap(jax.vmap(lambda k: jax.random.split(k)[0]))(keys)
    return jax.vmap(jax.vmap(task.sample_batch))(keys)


def _pad_time(batch: Batch, steps: int) -> Batch:
    """Zero-pad the time axis (axis 2) of every field but ``lengths`` to ``steps``."""

    def pad(a):
        widths = [(0, 0)] * a.ndim
        widths[2] = (0, steps - a.shape[2])
        return jnp.pad(a, widths)

    return batch._replace(
        inputs=pad(batch.inputs), targets=pad(batch.targets), mask=pad(batch.mask)
    )


def _probe_grid(task: Task, config: ProbeConfig):
    """``jit(vmap_seeds(vmap_batches(probe)))`` without the vector outputs."""

    def one(params, batch, key):
        values = probe(task, params, batch, jax.random.split(key)[1], config)
        return {k: values[k] for k in SCALARS}

    per_seed = jax.vmap(one, in_axes=(None, 0, 0))
    return jax.jit(jax.vmap(per_seed, in_axes=(0, 0, 0)))


def fit(rows: pd.DataFrame, x: str, confidence: float = 0.95) -> pd.DataFrame:
    """Growth rates against ``x`` and log-log slopes against the gradient norm.

    Lengths: ``log |q| = a + r T`` (``r`` per time step, since ``||g||`` grows
    like ``alpha^T``). Radii: ``log |q| = a + p log rho`` (column ``x`` reads
    ``log_radius``), since a product of ``T`` Jacobians grows like ``rho^T``, a
    power of ``rho``. Grouped by initialization and parameter source; confidence
    intervals by a cluster bootstrap over seeds (batches of one seed are not
    independent). Fits use ``|q|``; ``negative_fraction`` says how many of the
    values were negative (``u^T H u`` can be), where a fit of ``log |q|`` mixes
    two signs and should be read with care.
    """
    by = [c for c in ("init", "source") if c in rows.columns]
    present = [q for q in FITTED if q in rows.columns]
    if x == "radius":
        rows = rows.assign(log_radius=np.log(rows["radius"]))
        x = "log_radius"
    fits = growth_table(rows, x, present, by=by, group="seed", confidence=confidence)
    negative = (
        rows.groupby(by)[present]
        .agg(lambda q: float((q < 0).mean()))
        .reset_index()
        .melt(id_vars=by, var_name="quantity", value_name="negative_fraction")
    )
    return fits.merge(negative, on=[*by, "quantity"], how="left")


def save_growth(path: str | Path, config: dict, rows: pd.DataFrame, fits: pd.DataFrame):
    """Write a growth result (configuration, rows, fits) atomically."""
    results.write_growth(Path(path), config, rows, fits)


def run_params(run_file: str | Path, step: int | None = None) -> tuple[dict, Any]:
    """A run's configuration and its saved parameters (final, or a checkpoint)."""
    config = results.read_run(run_file)["config"]
    if step is not None and step not in results.checkpoint_steps(run_file):
        raise ConfigError(
            f"run {Path(run_file).name} has no checkpoint at step {step}; saved "
            f"steps: {results.checkpoint_steps(run_file)}"
        )
    return config, results.load_params(run_file, step)


def growth_experiment(
    task: str | None,
    x: str,
    values: Sequence[float],
    *,
    name: str | None = None,
    out: str | Path | None = None,
    run_file: str | Path | None = None,
    step: int | None = None,
    task_hparams: dict | None = None,
    seeds: Sequence[int] = range(5),
    batches: int = 4,
    radius: float | None = None,
    config: ProbeConfig | None = None,
    confidence: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame, Path | None]:
    """Measure, fit and (with ``out``) save one growth experiment.

    With ``run_file`` the parameters are that run's (its final ones, or the
    checkpoint at ``step``) for all its seeds, and the task and its settings are
    the run's (``task_hparams`` override them); otherwise the task's
    initialization for ``seeds``.

    Returns:
      ``(rows, fits, path)``; ``path`` is None without ``out``.
    """
    params, source = None, "init"
    task_hparams = dict(task_hparams or {})
    if run_file is not None:
        run_config, params = run_params(run_file, step)
        described = dict(run_config["task"])
        task = task or described.pop("name")
        described.pop("name", None)
        task_hparams = {**described, **task_hparams}
        seeds = run_config["seeds"]
        source = f"{run_config['label']} step {step if step is not None else 'final'}"
    if task is None:
        raise ConfigError("give a task name or a run file")
    rows = measure(
        task, x, values, task_hparams=task_hparams, seeds=seeds, batches=batches,
        radius=radius, params=params, source=source, config=config,
    )  # fmt: skip
    fits = fit(rows, x, confidence)
    path = None
    if out is not None:
        name = name or f"{task}-{rows['init'].iloc[0]}-{x}"
        settings = config or ProbeConfig()
        experiment = {
            "name": name,
            "task": task,
            "task_hparams": task_hparams,
            "x": x,
            "values": [float(v) for v in values],
            "seeds": list(seeds),
            "batches": batches,
            "radius": radius,
            "source": source,
            "probe": settings._asdict(),
        }
        path = Path(out) / f"{name}{GROWTH_SUFFIX}"
        save_growth(path, experiment, rows, fits)
    return rows, fits, path
