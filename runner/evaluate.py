"""Length generalization: a stored run's parameters on fresh, longer sequences.

Pascanu et al. (2013) train temporal order on lengths 50 to 200 and test the solved
networks on 10,000 fresh sequences of lengths up to 5,000. :func:`evaluate` does that
for any run file: it rebuilds the run's task with the same hyperparameters but
``length = min_length = N`` (so every sequence has the task's length ``N``), samples
fresh sequences, and counts the ones the task's error test calls wrong, for every seed
of the run and every ``N``.

Sequences. Sequence ``j`` (``0 .. sequences - 1``) at length ``N`` is the one-sequence
batch ``task.sample_batch(key, 1)`` with::

    key = fold_in(fold_in(fold_in(PRNGKey(seed), EVAL_STREAM), N), j)

(``jax.random``; ``seed`` is the ``--seed`` option, ``EVAL_STREAM`` a fixed tag, ASCII
"eval"). Training draws its sequences from ``PRNGKey(run_seed)`` folded with 0
(training) and 1 (evaluation), so these are a separate stream. They do not depend on
the run: every seed of a run, and every run, is tested on the same sequences, which
makes counts comparable. Nor do they depend on ``batch`` (how many run in one forward
pass, a memory setting), and the first ``n`` sequences are the same for any
``sequences >= n``.

Counting. The task's :meth:`~tasks.base.Task.metrics` gives each batch's error rate and
loss. A batch's error count is ``round(error_rate * size)``: exact when the error rate
is the fraction of wrong sequences (every built-in task: a sequence is wrong when any
of its scored steps is), whatever the batch size up to millions. The loss is the mean
of the batch losses weighted by their sizes.

Cost. One program per length (and one more for a smaller last batch) is compiled and
called for each seed in turn, so memory holds one batch: the hidden states of
``batch`` sequences of the padded length (5,000 x 1,000 x 50 float32: 1 GB). Runs
whose batch cannot fit are refused before anything compiles (lower ``batch``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from analysis import results
from tasks.base import Batch, Task
from tasks.hparams import ConfigError, declared_hparams
from tasks.registry import make_task, resolve_task

#: Tag folded into ``PRNGKey(seed)`` for the evaluation sequences (ASCII "eval").
EVAL_STREAM = 0x6576616C
#: Largest seed ``jax.random.PRNGKey`` takes as is.
MAX_SEED = 2**32 - 1
#: The memory check counts a batch's outputs and hidden states this many times (the
#: network also holds a state offset like the states).
ACTIVATION_COPIES = 2

#: Columns of :func:`evaluate`'s frame, in order.
COLUMNS = (
    "run_id", "optimizer", "task", "step", "seed", "length", "sequences", "errors",
    "error_rate", "loss", "training_status", "seconds",
)  # fmt: skip


def length_key(seed: int, length: int) -> jax.Array:
    """The key the sequences at ``length`` derive from (see the module docstring)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
    return jax.random.fold_in(key, length)


def sample_sequences(task: Task, key: jax.Array, first: jax.Array, size: int) -> Batch:
    """Sequences ``first .. first + size - 1`` of ``key`` as one time-major batch.

    Sequence ``j`` is the one-sequence batch ``task.sample_batch(fold_in(key, j),
    1)``: it does not depend on how the sequences are grouped into batches.
    """
    index = jnp.asarray(first, jnp.uint32) + jnp.arange(size, dtype=jnp.uint32)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(index)
    single = jax.vmap(lambda k: task.sample_batch(k, 1))(keys)

    def time_major(x: jax.Array) -> jax.Array:  # [size, T, 1, ...] -> [T, size, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], size, *x.shape[3:])

    return Batch(
        inputs=time_major(single.inputs),
        targets=time_major(single.targets),
        mask=time_major(single.mask),
        lengths=single.lengths.reshape(size),
    )


def batch_sizes(sequences: int, batch: int) -> list[int]:
    """Sizes of the batches that hold ``sequences`` sequences, ``batch`` at most."""
    full, rest = divmod(sequences, batch)
    return [batch] * full + ([rest] if rest else [])


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"'{name}' = {value!r} must be a positive integer")
    return int(value)


def _check_numbers(
    lengths: Sequence[int], sequences: int, batch: int, seed: int
) -> list[int]:
    if isinstance(lengths, int | np.integer):
        lengths = [lengths]
    lengths = [_positive_int("length", n) for n in lengths]
    if not lengths:
        raise ConfigError("'lengths' must name at least one sequence length")
    if _positive_int("sequences", sequences) > MAX_SEED:
        raise ConfigError(
            f"'sequences' = {sequences} must be at most {MAX_SEED} (one key each)"
        )
    _positive_int("batch", batch)
    if (
        isinstance(seed, bool)
        or not isinstance(seed, int | np.integer)
        or not 0 <= seed <= MAX_SEED
    ):
        raise ConfigError(f"'seed' = {seed!r} must be an integer in [0, {MAX_SEED}]")
    return list(dict.fromkeys(lengths))  # in order, each once


def _task_config(config: dict, path: Path) -> tuple[str, dict]:
    described = config.get("task")
    if not isinstance(described, dict) or not isinstance(described.get("name"), str):
        raise results.ResultsError(
            f"result file {path} is damaged: its 'task' has no name"
        )
    hparams = {k: v for k, v in described.items() if k != "name"}
    return described["name"], hparams


def _declared_with_length(name: str) -> dict:
    declared = declared_hparams(resolve_task(name))
    if "length" not in declared:
        valid = ", ".join(declared) or "(none)"
        raise ConfigError(
            f"task {name!r} has no hyperparameter 'length' (its hyperparameters: "
            f"{valid}); evaluate needs a sequence task"
        )
    return declared


def task_at_length(name: str, hparams: dict, length: int) -> Task:
    """The task ``name`` with ``hparams`` but ``length = min_length = length``.

    Raises:
      ConfigError: the task has no ``length`` hyperparameter, rejects this
        length (the message names the field and the valid range), or has fixed
        held-out data instead of a sampler of fresh sequences.
    """
    declared = _declared_with_length(name)
    hparams = {**hparams, "length": length}
    if "min_length" in declared:
        hparams["min_length"] = length
    task = make_task(name, **hparams)
    # Shapes only: a held-out split is not built just to be refused.
    if jax.eval_shape(lambda: task.evaluation_batch("test")) is not None:
        raise ConfigError(
            f"task {name!r} has fixed held-out data: its run files already hold the "
            "validation and test measures of every evaluation (eval_*, test_*); "
            "evaluate samples fresh sequences of synthetic tasks"
        )
    return task


def _seeds(config: dict, path: Path) -> list[int]:
    seeds = config.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise results.ResultsError(f"result file {path} is damaged: no 'seeds'")
    return [int(s) for s in seeds]


def _statuses(payload: dict) -> dict[int, str]:
    return {
        int(row["seed"]): str(row.get("status"))
        for row in payload.get("summary") or []
        if isinstance(row, dict) and "seed" in row
    }


def _load_params(path: Path, step: int | None, task: Task, n_seeds: int) -> Any:
    """The run's parameters (leading seed axis), checked against the task's."""
    if step is not None:
        saved = results.checkpoint_steps(path)
        if step not in saved:
            raise ConfigError(
                f"'step' = {step}: run {path.name} has no checkpoint at that step; "
                f"saved steps: {saved or 'none'}"
            )
    params = results.load_params(path, step)
    expected = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    where = "checkpoint" if step is not None else "parameters"
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise results.ResultsError(
            f"the {where} of {path.name} do not match task {task.name!r}: "
            f"arrays {sorted(results.flatten_params(params))}"
        )
    for got, want in zip(
        jax.tree.leaves(params), jax.tree.leaves(expected), strict=True
    ):
        if tuple(got.shape) != (n_seeds, *want.shape):
            raise results.ResultsError(
                f"the {where} of {path.name} do not match task {task.name!r} and "
                f"its {n_seeds} seeds: an array of shape {tuple(got.shape)}, "
                f"expected {(n_seeds, *want.shape)}"
            )
    return jax.tree.map(lambda p, w: np.asarray(p, w.dtype), params, expected)


def _tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def batch_bytes(task: Task, size: int) -> int:
    """Memory one evaluation batch of ``size`` sequences needs (shapes only)."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params = jax.eval_shape(task.init, key)
    batch = jax.eval_shape(lambda k: task.sample_batch(k, size), key)
    outputs = jax.eval_shape(task.apply, params, batch.inputs)
    return _tree_bytes(batch) + ACTIVATION_COPIES * _tree_bytes(outputs)


def _check_memory(task: Task, length: int, size: int) -> None:
    from runner.resources import USABLE_FRACTION, available_bytes

    try:
        needed = batch_bytes(task, size)
    except Exception as err:
        raise ConfigError(
            f"'length' = {length}: the task's arrays cannot be formed "
            f"({type(err).__name__}: {err})"
        ) from None
    limit = USABLE_FRACTION * available_bytes()
    if needed > limit:
        raise ConfigError(
            f"'batch' = {size}: a batch at length {length} needs about "
            f"{needed / 2**30:.3g} GiB, more than the {limit / 2**30:.3g} GiB this "
            "machine can give; lower --batch"
        )


def _length_program(task: Task):
    """``(params, key, firsts [K], size) -> (errors [K], losses [K])`` for ``task``.

    Batch ``k`` holds the ``size`` sequences from ``firsts[k]`` on
    (:func:`sample_sequences`). The ``K`` batches run one after another in one
    program (``lax.map``), which reuses one batch's memory for the next.
    """

    def one_batch(params: Any, key: jax.Array, first: jax.Array, size: int):
        metrics = task.metrics(params, sample_sequences(task, key, first, size))
        errors = jnp.round(metrics["error_rate"].astype(jnp.float32) * size)
        return errors.astype(jnp.int32), metrics["loss"]

    def batches(params: Any, key: jax.Array, firsts: jax.Array, size: int):
        return jax.lax.map(lambda first: one_batch(params, key, first, size), firsts)

    return jax.jit(batches, static_argnums=3)


def evaluate(
    run_file: str | Path,
    lengths: Sequence[int] | int | None = None,
    sequences: int = 10_000,
    batch: int = 1000,
    seed: int = 0,
    step: int | None = None,
    progress: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """Error counts of a stored run's parameters on fresh sequences of given lengths.

    Args:
      run_file: a run file (``<run_id>.json``) of a sequence task.
      lengths: the task's ``length`` for each evaluation (``min_length`` too, so
        every sequence has that length); default: the run's own ``length``.
      sequences: fresh sequences per length (the same for every seed of the run).
      batch: sequences per forward pass (memory holds one batch).
      seed: the sequences' seed (see the module docstring for the keys).
      step: evaluate the checkpoint saved at this step instead of the final
        parameters.
      progress: called as ``progress(row)`` with each finished row (a dict).

    Returns:
      One row per seed of the run and length, with the columns :data:`COLUMNS`:
      ``errors`` wrong sequences out of ``sequences``, ``error_rate`` their
      fraction, ``loss`` the task's mean loss, ``training_status`` the seed's
      outcome in training (solved, unsolved, diverged), ``step`` the checkpoint
      (missing for the final parameters) and ``seconds`` the evaluation's time
      (compilation excluded).

    Raises:
      ConfigError: a missing or damaged run file, a task without ``length``, a
        length the task rejects, non-positive numbers, an unknown checkpoint or a
        batch that cannot fit in memory; before anything is compiled.
    """
    path = Path(run_file)
    payload = results.read_run(path)
    config = payload["config"]
    name, hparams = _task_config(config, path)
    if lengths is None:
        _declared_with_length(name)
        lengths = [hparams.get("length")]
    lengths = _check_numbers(lengths, sequences, batch, seed)
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int | np.integer)
    ):
        raise ConfigError(f"'step' = {step!r} must be an integer (a checkpoint step)")
    step = None if step is None else int(step)
    seeds = _seeds(config, path)
    statuses = _statuses(payload)
    tasks = {n: task_at_length(name, hparams, n) for n in lengths}
    params = _load_params(path, step, tasks[lengths[0]], len(seeds))
    sizes = batch_sizes(sequences, batch)
    for n, task in tasks.items():
        _check_memory(task, n, sizes[0])

    rows = []
    for n, task in tasks.items():
        program = _length_program(task)
        key = length_key(seed, n)
        firsts = np.cumsum([0, *sizes[:-1]], dtype=np.uint32)
        # Full batches, then (when batch does not divide sequences) the rest.
        split = np.array(sizes)
        groups = [(size, firsts[split == size]) for size in dict.fromkeys(sizes)]
        for i, run_seed in enumerate(seeds):
            seed_params = jax.tree.map(lambda p, i=i: jnp.asarray(p[i]), params)
            if i == 0:  # compiled outside the timing, once per batch size
                compiled = [
                    program.lower(seed_params, key, group, size).compile()
                    for size, group in groups
                ]
            start = time.perf_counter()
            out = jax.device_get(
                [
                    run(seed_params, key, group)
                    for run, (_, group) in zip(compiled, groups, strict=True)
                ]
            )
            seconds = time.perf_counter() - start
            counts = np.concatenate([c for c, _ in out])
            losses = np.concatenate([v for _, v in out])
            errors = int(counts.astype(np.int64).sum())
            loss = float(np.dot(losses.astype(np.float64), sizes) / sequences)
            row = {
                "run_id": config["run_id"], "optimizer": config["label"],
                "task": name, "step": step, "seed": run_seed, "length": n,
                "sequences": sequences, "errors": errors,
                "error_rate": errors / sequences, "loss": loss,
                "training_status": statuses.get(run_seed, "unknown"),
                "seconds": seconds,
            }  # fmt: skip
            rows.append(row)
            if progress is not None:
                progress(row)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["step"] = frame["step"].astype("Int64")
    return frame


def totals(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per length over all seeds: errors and sequences summed, mean loss.

    ``training_status`` becomes ``"K/S solved"`` (seeds solved in training).
    """
    rows = []
    for length, group in frame.groupby("length", sort=False):
        solved = int((group["training_status"] == "solved").sum())
        n = int(group["sequences"].sum())
        errors = int(group["errors"].sum())
        rows.append(
            {
                "seed": "all", "length": length, "sequences": n, "errors": errors,
                "error_rate": errors / n if n else math.nan,
                "loss": float(np.average(group["loss"], weights=group["sequences"])),
                "training_status": f"{solved}/{len(group)} solved",
                "seconds": float(group["seconds"].sum()),
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def format_table(frame: pd.DataFrame) -> str:
    """A readable table: per seed and length, then a total row for each length."""
    if frame.empty:
        return "(no rows)"
    first = frame.iloc[0]
    source = "final parameters" if pd.isna(first["step"]) else f"step {first['step']}"
    header = (
        f"{first['run_id']}: task {first['task']}, optimizer {first['optimizer']}, "
        f"{source}"
    )
    shown = ["seed", "length", "sequences", "errors", "error_rate", "loss",
             "training_status", "seconds"]  # fmt: skip
    parts = []
    for length, group in frame.groupby("length", sort=False):
        body = group[shown].astype({"seed": object})
        parts.append(body)
        parts.append(totals(frame[frame["length"] == length])[shown])
    table = pd.concat(parts, ignore_index=True)
    table = table.rename(columns={"training_status": "training"})
    text = table.to_string(
        index=False,
        formatters={
            "error_rate": lambda v: f"{v:.4%}",
            "loss": lambda v: f"{v:.4g}",
            "seconds": lambda v: f"{v:.2f}",
        },
    )
    return f"{header}\n{text}"
