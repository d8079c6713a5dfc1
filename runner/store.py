"""Results store: one directory per comparison, one file per run, written atomically.

Layout of a comparison directory::

    <run_id>.json          config, per-seed summary, tidy records (one row per
                           seed and evaluation step) and curvature probes (one row
                           per seed and probe)
    <run_id>.steps.npz     per-step traces, arrays [seed, step]
    <run_id>.params.npz    final parameters, leading seed axis
    <run_id>.ckpt/step_<N>.npz   checkpoints every N steps (on request)

:func:`load` returns the records of every run as one pandas DataFrame with the run's
configuration as columns (task hyperparameters as they are, optimizer hyperparameters
prefixed ``opt_``); :func:`load_summary` the per-seed outcomes; :func:`load_params`
the saved parameters.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RUN_SUFFIX = ".json"
#: JSON files in a results directory that are not runs (growth experiments).
OTHER_SUFFIXES = (".growth.json",)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN; None reads back as NaN in pandas
    return value


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (non-finite floats become null)."""
    data = json.dumps(_jsonable(payload), indent=1, sort_keys=False).encode()
    _atomic_write(path, lambda handle: handle.write(data))


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write named arrays as ``.npz`` atomically."""
    _atomic_write(path, lambda handle: np.savez(handle, **arrays))


def flatten_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays to ``{"a/b": array}``."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, name + "/"))
        else:
            out[name] = np.asarray(value)
    return out


def unflatten_params(arrays: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_params`."""
    out: dict = {}
    for name, value in arrays.items():
        *parents, leaf = name.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def result_files(
    path: str | Path, suffix: str, exclude: tuple[str, ...] = ()
) -> list[Path]:
    """Files ``*<suffix>`` in a directory (or the single file given), sorted.

    Hidden files (atomic-write temporaries) and names ending in ``exclude`` are
    left out.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no results at {path}")
    return sorted(
        p
        for p in path.glob(f"*{suffix}")
        if not p.name.startswith(".") and not p.name.endswith(exclude)
    )


def run_files(path: str | Path) -> list[Path]:
    """The run files under a comparison directory (or the single file given)."""
    return result_files(path, RUN_SUFFIX, exclude=OTHER_SUFFIXES)


def read_run(path: str | Path) -> dict:
    """One run file as a dict."""
    return json.loads(Path(path).read_text())


def config_columns(config: dict) -> dict:
    """The columns that identify a run in tidy frames."""
    cols = {
        "run_id": config["run_id"],
        "task": config["task"]["name"],
        "optimizer": config["label"],
        "optimizer_name": config["optimizer"]["name"],
    }
    for key, value in config["task"].items():
        if key != "name":
            cols[key] = value
    for key, value in config["optimizer"].get("hparams", {}).items():
        cols[f"opt_{key}"] = value
    return cols


def _frame(path: str | Path, field: str) -> pd.DataFrame:
    frames = []
    for file in run_files(path):
        run = read_run(file)
        rows = pd.DataFrame(run.get(field, []))
        if rows.empty:
            continue
        for key, value in config_columns(run["config"]).items():
            rows[key] = [value] * len(rows)
        frames.append(rows)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def load(path: str | Path) -> pd.DataFrame:
    """Tidy records (one row per run, seed and evaluation step) of a comparison."""
    return _frame(path, "records")


def load_summary(path: str | Path) -> pd.DataFrame:
    """Per-seed outcomes (status, steps and seconds to solve, ...) of a comparison."""
    return _frame(path, "summary")


def load_probes(path: str | Path) -> pd.DataFrame:
    """Curvature probes (one row per run, seed and probe) of a comparison.

    Columns: the run's configuration, ``seed``, ``step``, ``kind`` (``"periodic"``
    or ``"explosion"``) and the quantities of :func:`analysis.probes.probe`. Empty
    when no run was probed.
    """
    return _frame(path, "probes")


def load_steps(run_file: str | Path) -> pd.DataFrame:
    """Per-step traces of one run, tidy (one row per seed and step)."""
    run_file = Path(run_file)
    run = read_run(run_file)
    with np.load(run_file.with_suffix(".steps.npz")) as data:
        arrays = {k: data[k] for k in data.files}
    seeds = run["config"]["seeds"]
    n_steps = arrays["loss"].shape[1]
    frame = pd.DataFrame({k: v.reshape(-1) for k, v in arrays.items()})
    frame.insert(0, "step", np.tile(np.arange(n_steps), len(seeds)))
    frame.insert(0, "seed", np.repeat(seeds, n_steps))
    return frame


def load_params(run_file: str | Path, step: int | None = None) -> dict:
    """Saved parameters of a run (leading seed axis); ``step`` picks a checkpoint."""
    run_file = Path(run_file)
    if step is None:
        target = run_file.with_suffix(".params.npz")
    else:
        target = run_file.with_suffix(".ckpt") / f"step_{step}.npz"
    with np.load(target) as data:
        return unflatten_params({k: data[k] for k in data.files})


def checkpoint_steps(run_file: str | Path) -> list[int]:
    """The steps at which checkpoints of a run were saved."""
    folder = Path(run_file).with_suffix(".ckpt")
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.npz"))
