"""Run configurations and comparison files, validated before anything compiles.

A :class:`RunConfig` is one frozen, validated run: a task (by name or import path, with
its complete hyperparameters, or a ready :class:`~tasks.base.Task`), an optimizer (by
name, import path or a ready transformation), a label and the
:class:`~runner.options.RunOptions`. Its :meth:`RunConfig.describe` is what a run file
stores and its :attr:`RunConfig.run_id` names the file.

A comparison file is a TOML grid of tasks x optimizers, every combination a run::

    name = "quickstart"
    seeds = 3
    steps = 3000
    eval_every = 250

    [[task]]
    name = "temporal_order"             # or an import path: "my_tasks:my_task"
    hidden = 32
    grid = { length = [20, 40] }        # every combination of grid values is a run

    [[optimizer]]
    name = "sgd_clip"
    label = "SGD-C"
    grid = { learning_rate = [0.01, 0.03] }

    [[optimizer]]
    name = "hf"
    steps = 300                          # run options of this optimizer only
    task = { batch_size = 200 }          # task overrides of this optimizer only

:func:`read_comparison` validates every run of the file (names, hyperparameters, run
options, memory) before the first one trains, and puts the file's folder on the
plug-in search path, so modules next to it can be named by import path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import optax

from optimizers.registry import (
    OPTIMIZERS,
    check_optimizer,
    resolve_optimizer,
    traced_names,
)
from runner.executors import ExecutorConfig
from runner.options import RunOptions, option_specs
from runner.tuning import SearchSpace, Study, TuningSpec, parse_tuning
from tasks.base import Task
from tasks.hparams import ConfigError
from tasks.plugins import add_plugin_folder
from tasks.registry import check_task, make_task

#: Fields of a comparison file besides the run options.
COMPARISON_FIELDS = (
    "name", "description", "out", "task", "optimizer", "executor", "batch_grid",
    "tuning",
)  # fmt: skip
#: Keys of a [[task]] or [[optimizer]] table that are not hyperparameters.
_ENTRY_KEYS = ("name", "label", "grid", "task", "search")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A validated optimizer: factory, static and traced hyperparameters.

    Traced hyperparameters (plain ``float`` in the factory's signature) are arguments
    of the compiled program, so a sweep over them compiles once.
    """

    name: str
    factory: Any
    static: dict
    traced: dict

    @property
    def hparams(self) -> dict:
        return {**self.static, **self.traced}

    def build(self, traced_values: dict) -> optax.GradientTransformationExtraArgs:
        """The transformation for the given traced values (called inside jit)."""
        return optax.with_extra_args_support(
            self.factory(**self.static, **traced_values)
        )

    def check_builds(self) -> None:
        """Call the factory once: it must return an optax transformation."""
        try:
            opt = self.factory(**self.hparams)
        except Exception as err:
            raise ConfigError(
                f"optimizer {self.name!r} failed to build: {type(err).__name__}: {err}"
            ) from None
        if not isinstance(opt, optax.GradientTransformation):
            raise ConfigError(
                f"optimizer {self.name!r} returned {type(opt).__name__}, not an optax "
                "GradientTransformation"
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
    spec = OptimizerSpec(optimizer, resolve_optimizer(optimizer), static, traced)
    if optimizer in OPTIMIZERS:
        # Built-in settings that clash (hf's product and structural) are bad input;
        # a plugin's factory that fails is a failed run (it costs only its run).
        spec.check_builds()
    return spec


_TASKS: dict[str, Task] = {}


def cached_task(name: str, hparams: dict) -> Task:
    """Build a task once per configuration (runs of it share compiled programs)."""
    key = json.dumps([name, hparams], sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = make_task(name, **hparams)
    return _TASKS[key]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One validated run: task, optimizer, label and run options.

    Build it with :func:`run_config` (validating), not directly.
    """

    task_name: str | None  # registry name or import path; None for a Task object
    task_hparams: dict  # complete and validated (empty for a Task object)
    optimizer: OptimizerSpec
    label: str
    options: RunOptions
    task_object: Task | None = None

    @property
    def task(self) -> Task:
        """The task (built once per configuration)."""
        if self.task_object is not None:
            return self.task_object
        return cached_task(self.task_name, self.task_hparams)

    def describe(self) -> dict:
        """The configuration stored in the run file (and hashed into the run id).

        Task (name and every hyperparameter), optimizer (name and every
        hyperparameter), label, and every run option that changes results
        (:meth:`RunOptions.identity`).
        """
        if self.task_object is not None:
            task = self.task_object.describe()
        else:
            task = {"name": self.task_name, **self.task_hparams}
        config = {
            "task": task,
            "optimizer": {
                "name": self.optimizer.name,
                "hparams": self.optimizer.hparams,
            },
            "label": self.label,
            **self.options.identity(),
        }
        return {**config, "run_id": run_id_for(config)}

    @property
    def run_id(self) -> str:
        return self.describe()["run_id"]


def run_id_for(config: dict) -> str:
    """A readable, unique file name: task, length and init, label, and a digest.

    The digest covers the whole configuration (every task and optimizer
    hyperparameter and every run option that changes results).
    """
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


def run_config(
    task: str | Task,
    optimizer: str | optax.GradientTransformation,
    *,
    task_hparams: dict | None = None,
    opt_hparams: dict | None = None,
    label: str | None = None,
    **options: Any,
) -> RunConfig:
    """Validate one run; ``options`` are :class:`RunOptions` fields."""
    if isinstance(task, Task):
        if task_hparams:
            raise ConfigError("task_hparams are only accepted with a task name")
        task_name, hparams, task_object = None, {}, task
    elif isinstance(task, str):
        task_name, hparams, task_object = (
            task,
            check_task(task, task_hparams or {}),
            None,
        )
    else:
        raise ConfigError(f"task must be a name, an import path or a Task: {task!r}")
    spec = optimizer_spec(optimizer, opt_hparams)
    if label is not None and not isinstance(label, str):
        raise ConfigError(f"optimizer 'label' = {label!r} must be a string")
    opts = RunOptions.from_dict(options, "run option")
    config = RunConfig(task_name, hparams, spec, label or spec.name, opts, task_object)
    from runner.resources import check_resources  # needs JAX: imported on use

    check_resources(config)
    return config


# --------------------------------------------------------------------- comparison files
@dataclasses.dataclass(frozen=True)
class Comparison:
    """A parsed comparison: its name, output directory and validated runs."""

    name: str
    runs: tuple[RunConfig, ...]
    out: str | None = None
    description: str = ""
    executor: ExecutorConfig = dataclasses.field(default_factory=ExecutorConfig)
    batch_grid: bool = False
    tuning: TuningSpec | None = None
    studies: tuple[Study, ...] = ()  # tuned optimizers (:mod:`runner.tuning`)


def _string(table: dict, key: str, where: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where} {key!r} = {value!r} must be a string")
    return value


def _grid(entry: dict, where: str) -> list[dict]:
    grid = entry.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: 'grid' must be a table of lists")
    fixed = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
    for key, values in grid.items():
        if key in _ENTRY_KEYS:
            raise ConfigError(f"{where}: {key!r} cannot be swept in 'grid'")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{key} must be a non-empty list")
        if key in fixed:
            raise ConfigError(f"{where}: {key!r} is both fixed and in the grid")
    return [
        {**fixed, **dict(zip(grid, combo, strict=True))}
        for combo in itertools.product(*grid.values())
    ]


def _entries(data: dict, key: str) -> list[dict]:
    entries = data.get(key)
    if not entries:
        raise ConfigError(f"comparison needs at least one [[{key}]] table")
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"comparison field {key!r} must be [[{key}]] tables")
    for i, entry in enumerate(entries):
        if "name" not in entry:
            raise ConfigError(f"[[{key}]] number {i + 1} has no 'name'")
        _string(entry, "name", f"[[{key}]] number {i + 1}")
    return entries


def _split(entry: dict) -> tuple[dict, dict]:
    """An [[optimizer]] table's run options and hyperparameters (grid expanded)."""
    options = {k: v for k, v in entry.items() if k in option_specs()}
    rest = {k: v for k, v in entry.items() if k not in option_specs()}
    return options, rest


def _task_entries(data: dict) -> list[tuple[str, dict]]:
    tasks = []
    for entry in _entries(data, "task"):
        where = f"task {entry['name']!r}"
        if "task" in entry or "label" in entry:
            raise ConfigError(f"{where}: 'task' and 'label' belong to [[optimizer]]")
        for hparams in _grid(entry, where):
            check_task(entry["name"], hparams)
            tasks.append((entry["name"], hparams))
    return tasks


def _search(entry: dict, where: str, tuned: bool) -> SearchSpace | None:
    if "search" not in entry:
        return None
    if not tuned:
        raise ConfigError(f"{where}: 'search' needs a [tuning] table in the file")
    if "grid" in entry:
        raise ConfigError(f"{where}: give either 'grid' or 'search', not both")
    space = SearchSpace.parse(entry["search"], where)
    fixed = [d.name for d in space.dims if d.name in entry]
    if fixed:
        raise ConfigError(f"{where}: {fixed[0]!r} is both fixed and in 'search'")
    return space


def _optimizer_entries(data: dict, tuned: bool = False) -> list[tuple]:
    optimizers = []
    for entry in _entries(data, "optimizer"):
        where = f"optimizer {entry['name']!r}"
        space = _search(entry, where, tuned)
        own, rest = _split(entry)
        overrides = rest.get("task", {})
        if not isinstance(overrides, dict):
            raise ConfigError(
                f"{where}: 'task' must be a table of task hyperparameters"
            )
        if "name" in overrides:
            raise ConfigError(f"{where}: 'task' overrides cannot change the task name")
        base = _string(entry, "label", where) or entry["name"]
        for hparams in _grid(rest, where):
            swept = [f"{k}={hparams[k]}" for k in entry.get("grid", {})]
            label = " ".join([base, *swept])
            optimizers.append((entry["name"], hparams, label, own, overrides, space))
    labels = [opt[2] for opt in optimizers]
    duplicate = next((x for x in labels if labels.count(x) > 1), None)
    if duplicate:
        raise ConfigError(f"two optimizers share the label {duplicate!r}; set 'label'")
    return optimizers


def parse_comparison(
    data: dict, default_name: str = "comparison", overrides: dict | None = None
) -> Comparison:
    """Validate a comparison given as a dict (parsed TOML), every run of it.

    Args:
      data: the parsed file.
      default_name: the name when the file gives none.
      overrides: run options that replace the file's and the optimizers' own (the
        command line's ``--steps`` and the like).
    """
    valid = (*COMPARISON_FIELDS, *option_specs())
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown comparison field {unknown[0]!r}; valid: {', '.join(valid)}"
        )
    name = _string(data, "name", "comparison field") or default_name
    if not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"comparison field 'name' = {name!r} must be a plain name (letters, "
            "digits, '_', '-', '.'), not a path; use 'out' for the directory"
        )
    out = _string(data, "out", "comparison field")
    description = _string(data, "description", "comparison field") or ""
    file_options, _ = _split(data)
    tuning = None
    if "tuning" in data:
        tuning = parse_tuning(
            data["tuning"], _all_seeds(data, file_options, overrides),
            tuple(option_specs()),
        )  # fmt: skip
    runs, studies = [], []
    for (t_name, t_hp), (o_name, o_hp, label, own, over, space) in itertools.product(
        _task_entries(data), _optimizer_entries(data, tuning is not None)
    ):
        base = _RunBase(t_name, {**t_hp, **over}, o_name, o_hp)
        layers = (file_options, own, overrides or {})
        if space is None:
            runs.append(base.build(label, _merged(*layers)))
        else:
            studies.append(_study(tuning, space, label, base, layers))
    if tuning is not None and not studies:
        raise ConfigError(
            "a [tuning] table needs at least one [[optimizer]] with a 'search' space"
        )
    executor = data.get("executor")
    if executor is not None and not isinstance(executor, dict | str):
        raise ConfigError(
            f"comparison field 'executor' = {executor!r} must be a table or a string "
            "such as 'local:2'"
        )
    batch_grid = data.get("batch_grid", False)
    if not isinstance(batch_grid, bool):
        raise ConfigError(
            f"comparison field 'batch_grid' = {batch_grid!r} must be true or false"
        )
    executor = ExecutorConfig.parse(executor)
    return Comparison(
        name, tuple(runs), out, description, executor, batch_grid, tuning,
        tuple(studies),
    )  # fmt: skip


def _all_seeds(data: dict, file_options: dict, overrides: dict | None) -> tuple:
    """Every held-out seed of the file: the top level's and each optimizer's own
    (the default tuning seeds start after the largest)."""
    seeds = set(RunOptions.from_dict({**file_options, **(overrides or {})}).seeds)
    entries = data.get("optimizer")
    for entry in entries if isinstance(entries, list) else [entries]:
        if isinstance(entry, dict) and "seeds" in entry:
            seeds |= set(RunOptions.from_dict({"seeds": entry["seeds"]}).seeds)
    return tuple(sorted(seeds))


@dataclasses.dataclass(frozen=True)
class _RunBase:
    """What the runs of one task x optimizer entry share."""

    task: str
    task_hparams: dict
    optimizer: str
    hparams: dict

    def build(self, label: str, options: dict, point: dict | None = None) -> RunConfig:
        try:
            return run_config(
                self.task, self.optimizer, task_hparams=self.task_hparams,
                opt_hparams={**self.hparams, **(point or {})}, label=label, **options,
            )  # fmt: skip
        except ConfigError as err:
            raise ConfigError(
                f"optimizer {label!r} on task {self.task!r}: {err}"
            ) from None


def _merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        out.update(layer)
    return out


def _study(
    tuning: TuningSpec, space: SearchSpace, label: str, base: _RunBase, layers: tuple
) -> Study:
    """The trials of one tuned optimizer on one task configuration (validated).

    Trials take the file's run options, then the [tuning] table's, then the
    optimizer's own, then the command line's, and always the tuning seeds.
    """
    file_options, own, overrides = layers
    options = _merged(file_options, own, overrides)
    held_out_seeds = RunOptions.from_dict(options).seeds
    shared = sorted(set(held_out_seeds) & set(tuning.seeds))
    if shared:
        raise ConfigError(
            f"optimizer {label!r}: held-out seed {shared[0]} is also a tuning seed"
        )
    trial_options = _merged(
        file_options, tuning.options, own, overrides, {"seeds": list(tuning.seeds)}
    )
    points = tuple(space.points(tuning.trials, tuning.sampler, tuning.seed))
    trials = tuple(
        base.build(f"{label} trial {i + 1}", trial_options, point)
        for i, point in enumerate(points)
    )
    held_out = tuple(base.build(label, options, point) for point in points)
    return Study(label, space, points, trials, held_out)


def read_comparison(path: str | Path, overrides: dict | None = None) -> Comparison:
    """Read and validate a comparison TOML file (see :func:`parse_comparison`).

    The file's folder is added to the plug-in search path first.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"comparison file {path} is not UTF-8 text: {err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"malformed TOML in {path}: {err}") from None
    add_plugin_folder(path.parent)
    return parse_comparison(data, default_name=path.stem, overrides=overrides)


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
