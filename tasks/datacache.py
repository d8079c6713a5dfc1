"""The on-disk cache of prepared datasets (the one owner of its ``.npz`` files).

Preparing a dataset can be slow (parsing every chorale of the music21 corpus takes
about two minutes), so :func:`cached` keeps the arrays in
``$CURVBENCH_CACHE/data`` (default ``$XDG_CACHE_HOME/curvbench/data``, that is
``~/.cache/curvbench/data``), one file per dataset and settings: the file name
holds a digest of the settings and the file itself repeats them, so changed
settings never read stale arrays. A file that is missing, unreadable, truncated or
written for other settings is rebuilt; files are written to a temporary name and
renamed, so a killed build leaves no half-written cache (stale temporary files are
removed on the next build), and concurrent processes wait for one build (a lock
file next to the cache file) instead of repeating it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks.files import atomic_write, file_lock

#: Bump when the layout of the cached arrays changes: old files are then rebuilt.
FORMAT_VERSION = 1
_SETTINGS_KEY = "__settings__"


def cache_root() -> Path:
    """``$CURVBENCH_CACHE``, else ``$XDG_CACHE_HOME/curvbench`` (``~/.cache``)."""
    root = os.environ.get("CURVBENCH_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "curvbench"


def cache_path(kind: str, settings: dict) -> Path:
    """Where the arrays of dataset ``kind`` prepared with ``settings`` are kept."""
    text = _settings_text(kind, settings)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_root() / "data" / f"{kind}-{digest}.npz"


def cached(
    kind: str,
    settings: dict,
    build: Callable[[], dict[str, np.ndarray]],
    message: str | None = None,
    keys: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """The arrays of ``kind`` for ``settings``: from the cache, or built and cached.

    Args:
      kind: the dataset's name (the file name's prefix).
      settings: JSON values that determine the arrays (the cache key).
      build: makes the arrays (a dict of numpy arrays) when the cache cannot serve.
      message: printed to stderr before a build (what is built and how long).
      keys: arrays a usable file must hold (a file without one is rebuilt).
    """
    path = cache_path(kind, settings)
    text = _settings_text(kind, settings)
    arrays = _load(path, text, keys)
    if arrays is not None:
        return arrays
    # One builder at a time (the workers of an executor start together): the others
    # wait, then read what it wrote.
    with file_lock(path.with_name(f".{path.name}.lock")):
        arrays = _load(path, text, keys)
        if arrays is not None:
            return arrays
        if message:
            print(f"{message}; caching it in {path}", file=sys.stderr, flush=True)
        arrays = build()
        _write(path, arrays, text)
    return arrays


def _settings_text(kind: str, settings: dict) -> str:
    payload = {"kind": kind, "format": FORMAT_VERSION, "settings": settings}
    return json.dumps(payload, sort_keys=True)


def _load(
    path: Path, settings_text: str, keys: tuple[str, ...] = ()
) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, damaged or stale."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None
    stored = arrays.pop(_SETTINGS_KEY, None)
    if stored is None or str(stored) != settings_text:
        return None
    return arrays if all(k in arrays for k in keys) else None


def _write(path: Path, arrays: dict[str, np.ndarray], settings_text: str) -> None:
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    extra = {_SETTINGS_KEY: np.array(settings_text)}
    atomic_write(path, lambda handle: np.savez(handle, **arrays, **extra))
