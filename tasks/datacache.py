"""The on-disk cache of prepared datasets (the one owner of its ``.npz`` files).

Preparing a dataset can be slow (parsing every chorale of the music21 corpus takes
about two minutes), so :func:`cached` keeps the arrays in
``$CURVBENCH_CACHE/data`` (default ``$XDG_CACHE_HOME/curvbench/data``, that is
``~/.cache/curvbench/data``), one file per dataset and settings: the file name
holds a digest of the settings and the file itself repeats them, so changed
settings never read stale arrays. A file that is missing, unreadable, truncated or
written for other settings is rebuilt; files are written to a temporary name and
renamed, so a killed build leaves no half-written cache (stale temporary files are
removed on the next build).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

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
) -> dict[str, np.ndarray]:
    """The arrays of ``kind`` for ``settings``: from the cache, or built and cached.

    Args:
      kind: the dataset's name (the file name's prefix).
      settings: JSON values that determine the arrays (the cache key).
      build: makes the arrays (a dict of numpy arrays) when the cache cannot serve.
      message: printed to stderr before a build (what is built and how long).
    """
    path = cache_path(kind, settings)
    arrays = _load(path, _settings_text(kind, settings))
    if arrays is not None:
        return arrays
    if message:
        print(f"{message}; caching it in {path}", file=sys.stderr, flush=True)
    arrays = build()
    _write(path, arrays, _settings_text(kind, settings))
    return arrays


def _settings_text(kind: str, settings: dict) -> str:
    payload = {"kind": kind, "format": FORMAT_VERSION, "settings": settings}
    return json.dumps(payload, sort_keys=True)


def _load(path: Path, settings_text: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, damaged or stale."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None
    stored = arrays.pop(_SETTINGS_KEY, None)
    if stored is None or str(stored) != settings_text:
        return None
    return arrays


def atomic_write(path: Path, write: Callable) -> None:
    """Write ``path`` through ``write(handle)`` to a temporary file, then rename it.

    A reader never sees a half-written file; an interrupted write leaves a
    ``.<name>.*.tmp`` file that :func:`analysis.results.remove_stale_temporaries` (or
    the next cache build) deletes. The file gets the permissions of any new file
    (the user's umask), not ``mkstemp``'s 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write(path: Path, arrays: dict[str, np.ndarray], settings_text: str) -> None:
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    extra = {_SETTINGS_KEY: np.array(settings_text)}
    atomic_write(path, lambda handle: np.savez(handle, **arrays, **extra))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
