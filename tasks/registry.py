"""The task registry: a plain dict from name to factory.

Factories declare their hyperparameters in their signatures (see :mod:`tasks.hparams`);
:func:`make_task` validates user values against them before anything is compiled.
"""

from __future__ import annotations

from collections.abc import Callable

from tasks import sequence, wall
from tasks.base import Task
from tasks.hparams import ConfigError, check_hparams, lookup

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
}


def register_task(name: str, factory: Callable[..., Task], overwrite: bool = False):
    """Register a user task factory under ``name`` (its signature declares hparams)."""
    if name in TASKS and not overwrite:
        raise ConfigError(f"task {name!r} is already registered")
    TASKS[name] = factory
    return factory


def make_task(name: str, **hparams) -> Task:
    """Build a registered task, validating its hyperparameters first."""
    factory = lookup("task", TASKS, name)
    return factory(**check_hparams("task", name, factory, hparams))
