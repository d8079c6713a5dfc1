"""Comparison files: a TOML grid of tasks x lengths x optimizers x seeds.

Example::

    name = "quickstart"
    seeds = 3
    steps = 3000
    eval_every = 250

    [[task]]
    name = "temporal_order"
    hidden = 32
    grid = { length = [20, 40] }        # every combination of grid values is a run

    [[optimizer]]
    name = "sgd"
    label = "SGD"
    learning_rate = 0.01

    [[optimizer]]
    name = "sgd_clip"
    label = "SGD-C"
    grid = { learning_rate = [0.01, 0.03] }

    [[optimizer]]
    name = "hf"
    label = "HF"
    steps = 300                          # run arguments of this optimizer only
    curvature_batch_size = 50
    task = { batch_size = 200 }          # task overrides of this optimizer only

Every entry is validated (names, hyperparameters, ranges) when the file is read, before
anything is compiled or run.
"""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from optimizers.registry import check_optimizer
from tasks.hparams import ConfigError
from tasks.registry import make_task

RUN_KEYS = {
    "seeds": int | list,
    "steps": int,
    "eval_every": int,
    "eval_size": int,
    "curvature_batch_size": int,
    "checkpoint_every": int,
    "record_steps": bool,
    "probe_every": int,
    "probe_events": int,
    "explosion_factor": int | float,
    "lanczos_iters": int,
    "record_params": bool,
}
TOP_KEYS = ("name", "description", "out", "task", "optimizer", *RUN_KEYS)


class RunSpec(NamedTuple):
    """One run of a comparison grid."""

    task: str
    task_hparams: dict
    optimizer: str
    opt_hparams: dict
    label: str
    run_args: dict | None = None  # this optimizer's run arguments (override the file's)


class Comparison(NamedTuple):
    """A parsed, validated comparison file."""

    name: str
    runs: list[RunSpec]
    run_args: dict  # seeds, steps, eval_every, ... for runner.run
    out: str | None


#: Keys of an [[optimizer]] table that are not optimizer hyperparameters.
OPTIMIZER_KEYS = ("name", "label", "grid", "task", *RUN_KEYS)


def _grid(entry: dict, where: str, reserved=("name", "label", "grid")) -> list[dict]:
    grid = entry.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: 'grid' must be a table of lists")
    fixed = {k: v for k, v in entry.items() if k not in reserved}
    names = list(grid)
    values = []
    for key in names:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"{where}: grid.{key} must be a non-empty list")
        if key in fixed:
            raise ConfigError(f"{where}: {key!r} is both fixed and in the grid")
        values.append(grid[key])
    return [
        {**fixed, **dict(zip(names, combo, strict=True))}
        for combo in itertools.product(*values)
    ]


def _label(entry: dict, hparams: dict) -> str:
    label = entry.get("label", entry["name"])
    swept = [f"{k}={hparams[k]}" for k in entry.get("grid", {})]
    return " ".join([label, *swept])


def _entries(data: dict, key: str) -> list[dict]:
    entries = data.get(key)
    if not entries:
        raise ConfigError(f"comparison needs at least one [[{key}]] table")
    if isinstance(entries, dict):
        entries = [entries]
    for i, entry in enumerate(entries):
        if "name" not in entry:
            raise ConfigError(f"[[{key}]] number {i + 1} has no 'name'")
    return entries


def parse_comparison(data: dict, default_name: str = "comparison") -> Comparison:
    """Validate a comparison given as a dict (parsed TOML)."""
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown comparison field {unknown[0]!r}; valid: {', '.join(TOP_KEYS)}"
        )
    run_args = _run_args(data, "comparison field")
    tasks = []
    for entry in _entries(data, "task"):
        for hparams in _grid(entry, f"task {entry['name']!r}"):
            make_task(entry["name"], **hparams)  # validates
            tasks.append((entry["name"], hparams))
    optimizers = []
    for entry in _entries(data, "optimizer"):
        where = f"optimizer {entry['name']!r}"
        own_args = _run_args(entry, f"{where} field")
        overrides = entry.get("task", {})
        if not isinstance(overrides, dict):
            raise ConfigError(
                f"{where}: 'task' must be a table of task hyperparameters"
            )
        for hparams in _grid(entry, where, OPTIMIZER_KEYS):
            check_optimizer(entry["name"], hparams)
            label = _label(entry, hparams)
            optimizers.append((entry["name"], hparams, label, own_args, overrides))
    labels = [opt[2] for opt in optimizers]
    duplicate = next((x for x in labels if labels.count(x) > 1), None)
    if duplicate:
        raise ConfigError(f"two optimizers share the label {duplicate!r}; set 'label'")
    runs = []
    for (t_name, t_hp), (o_name, o_hp, label, args, over) in itertools.product(
        tasks, optimizers
    ):
        t_hp = {**t_hp, **over}
        if over:
            make_task(t_name, **t_hp)  # validates the overrides
        runs.append(RunSpec(t_name, t_hp, o_name, o_hp, label, args))
    return Comparison(data.get("name", default_name), runs, run_args, data.get("out"))


def _run_args(table: dict, what: str) -> dict:
    out = {}
    for key, kind in RUN_KEYS.items():
        if key in table:
            value = table[key]
            if (isinstance(value, bool) and kind is not bool) or not isinstance(
                value, kind
            ):
                raise ConfigError(f"{what} {key!r} = {value!r} has the wrong type")
            out[key] = value
    return out


def read_comparison(path: str | Path) -> Comparison:
    """Read and validate a comparison TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"malformed TOML in {path}: {err}") from None
    return parse_comparison(data, default_name=path.stem)


def parse_value(raw: str) -> Any:
    """A command-line value: TOML syntax (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_assignments(items: list[str] | None, what: str) -> dict:
    """``["k=v", ...]`` to a dict, with values parsed by :func:`parse_value`."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} must look like NAME=VALUE, got {item!r}")
        out[key.strip()] = parse_value(raw.strip())
    return out
