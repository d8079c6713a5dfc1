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
}
TOP_KEYS = ("name", "description", "out", "task", "optimizer", *RUN_KEYS)


class RunSpec(NamedTuple):
    """One run of a comparison grid."""

    task: str
    task_hparams: dict
    optimizer: str
    opt_hparams: dict
    label: str


class Comparison(NamedTuple):
    """A parsed, validated comparison file."""

    name: str
    runs: list[RunSpec]
    run_args: dict  # seeds, steps, eval_every, ... for runner.run
    out: str | None


def _grid(entry: dict, where: str) -> list[dict]:
    grid = entry.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: 'grid' must be a table of lists")
    fixed = {k: v for k, v in entry.items() if k not in ("name", "label", "grid")}
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
    run_args = {}
    for key, kind in RUN_KEYS.items():
        if key in data:
            value = data[key]
            if isinstance(value, bool) and kind is not bool:
                raise ConfigError(f"comparison field {key!r} must be {kind}")
            if not isinstance(value, kind):
                raise ConfigError(
                    f"comparison field {key!r} = {value!r} has wrong type"
                )
            run_args[key] = value
    tasks = []
    for entry in _entries(data, "task"):
        for hparams in _grid(entry, f"task {entry['name']!r}"):
            make_task(entry["name"], **hparams)  # validates
            tasks.append((entry["name"], hparams))
    optimizers = []
    for entry in _entries(data, "optimizer"):
        for hparams in _grid(entry, f"optimizer {entry['name']!r}"):
            check_optimizer(entry["name"], hparams)
            optimizers.append((entry["name"], hparams, _label(entry, hparams)))
    labels = [label for *_, label in optimizers]
    duplicate = next((x for x in labels if labels.count(x) > 1), None)
    if duplicate:
        raise ConfigError(f"two optimizers share the label {duplicate!r}; set 'label'")
    runs = [
        RunSpec(t_name, t_hp, o_name, o_hp, label)
        for (t_name, t_hp), (o_name, o_hp, label) in itertools.product(
            tasks, optimizers
        )
    ]
    return Comparison(data.get("name", default_name), runs, run_args, data.get("out"))


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
