"""Plug-ins by import path: ``package.module:factory`` (or ``package.module.factory``).

Tasks and optimizers that are not registered by name can be given by import path in
comparison files, on the command line and from Python. Modules are looked up on
``sys.path``, then in the working directory (as ``python -m`` would) and in the
folders added by :func:`add_plugin_folder` (the folder of the comparison file being
read). Any failure, including a module that does not compile or raises while it is
imported, becomes a :class:`~tasks.hparams.ConfigError` naming the path.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.hparams import ConfigError

#: Folders searched for plug-in modules after ``sys.path`` (in this order).
PLUGIN_FOLDERS: list[str] = []


def add_plugin_folder(folder: str | Path) -> None:
    """Also look for plug-in modules in ``folder`` (e.g. a comparison file's)."""
    folder = str(Path(folder).resolve())
    if folder not in PLUGIN_FOLDERS:
        PLUGIN_FOLDERS.append(folder)


def is_import_path(name: str) -> bool:
    """Whether ``name`` looks like an import path rather than a registry name."""
    return "." in name or ":" in name


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        top = name.partition(".")[0]
        if err.name is not None and err.name != top and err.name != name:
            raise  # the module exists but one of its own imports is missing
        for folder in (os.getcwd(), *PLUGIN_FOLDERS):
            if folder not in sys.path:
                sys.path.append(folder)
                importlib.invalidate_caches()
                try:
                    return importlib.import_module(name)
                except ModuleNotFoundError as again:
                    if again.name not in (top, name):
                        raise
        raise err


def import_object(path: str, what: str) -> Any:
    """The object at ``path`` (``module:attr`` or ``module.attr``).

    Raises:
      ConfigError: the module cannot be found or imported (syntax error, an
        exception at import), or has no such attribute; ``what`` ("task",
        "optimizer") starts the message.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"{what} {path!r} cannot be imported: not an import path (module:factory)"
        )
    try:
        module = _import_module(module_name)
    except Exception as err:
        raise ConfigError(
            f"{what} {path!r} cannot be imported: {type(err).__name__}: {err}"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(
            f"{what} {path!r} cannot be imported: module {module_name!r} has no "
            f"attribute {attr!r}"
        ) from None


def resolve(what: str, registry: dict[str, Callable], name: str, example: str) -> Any:
    """``registry[name]``, or the object at the import path ``name``.

    Raises:
      ConfigError: ``name`` is not a string, or neither registered nor an import
        path (the message lists the registered names and shows ``example``), or
        cannot be imported.
    """
    if not isinstance(name, str):
        raise ConfigError(f"{what} name must be a string, got {name!r}")
    if name in registry:
        return registry[name]
    if not is_import_path(name):
        valid = ", ".join(sorted(registry))
        raise ConfigError(
            f"unknown {what} {name!r}; valid: {valid} (or an import path such as "
            f"{example})"
        )
    return import_object(name, what)
