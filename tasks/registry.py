"""The task registry: a plain dict from name to factory.

Factories declare their hyperparameters in their signatures (see :mod:`tasks.hparams`);
:func:`make_task` validates user values against them before anything is compiled.
"""

from __future__ import annotations

from collections.abc import Callable

from tasks import natural, sequence, wall
from tasks.base import Task
from tasks.hparams import ConfigError, check_hparams
from tasks.plugins import resolve

TASKS: dict[str, Callable[..., Task]] = {
    "wall": wall.wall,
    "temporal_order": sequence.temporal_order,
    "temporal_order_3bit": sequence.temporal_order_3bit,
    "addition": sequence.addition,
    "multiplication": sequence.multiplication,
    "xor": sequence.xor,
    "random_permutation": sequence.random_permutation,
    "memorization": sequence.memorization,
    "memorization_5bit": sequence.memorization_5bit,
    "chorales": natural.chorales,
    "text": natural.text,
}


def register_task(name: str, factory: Callable[..., Task], overwrite: bool = False):
    """Register a user task factory under ``name`` (its signature declares hparams)."""
    if name in TASKS and not overwrite:
        raise ConfigError(f"task {name!r} is already registered")
    TASKS[name] = factory
    return factory


def resolve_task(name: str) -> Callable[..., Task]:
    """The factory registered as ``name``, or imported from the path ``name``.

    An import path (``my_module:my_task``) names a factory whose signature declares
    its hyperparameters, exactly as a registered one.
    """
    factory = resolve("task", TASKS, name, "my_module:my_task")
    if isinstance(factory, Task) or not callable(factory):
        raise ConfigError(f"task {name!r} must be a factory returning a Task")
    return factory


def check_task(name: str, hparams: dict) -> dict:
    """Validate ``hparams`` for task ``name``; return all of them with defaults."""
    return check_hparams("task", name, resolve_task(name), hparams)


def make_task(name: str, **hparams) -> Task:
    """Build a task by name or import path, validating its hyperparameters first."""
    task = resolve_task(name)(**check_task(name, hparams))
    if not isinstance(task, Task):
        raise ConfigError(f"task {name!r}: the factory returned {task!r}, not a Task")
    return task
