"""The results format: the one module that reads and writes result files.

A results directory holds one comparison::

    <run_id>.json              one run: format version, configuration, per-seed
                               summary, tidy records (one row per seed and evaluation
                               step), curvature probes (one row per seed and probe),
                               timings and package versions
    <run_id>.steps.npz         per-step traces, arrays [seed, step]
    <run_id>.params.npz        final parameters, leading seed axis
    <run_id>.ckpt/step_<N>.npz parameters every N steps (on request)
    <run_id>.resume.npz        the whole training state of an unfinished run (deleted
                               once its run file is written)
    <run_id>.final.npz         the same at the end of the run (a larger ``steps``
                               continues from it)
    <name>.growth.json         one growth experiment: configuration, rows, fits
    <name>.tuning.json         a tuned comparison: settings, and per tuned optimizer
                               and task configuration its trials (hyperparameters,
                               scores, run ids) and the chosen one
    tuning/                    the tuning trials' run files (a results directory)
    tuning/superseded/         held-out runs of trials that are no longer chosen

Every file is written atomically (a temporary file renamed into place), so a killed
process never leaves half a file. Run files carry ``"format": FORMAT_VERSION``; files
written before versioning read as version 1 (same fields). A file that cannot be read
(not JSON, a missing field, a newer format) raises :class:`ResultsError` naming it.

:class:`Results` loads a directory once; every table, figure and report takes it.
The training code writes runs through :func:`write_run`; nothing else touches the
files.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from tasks.files import atomic_write
from tasks.hparams import ConfigError

#: Version of the run-file layout written by :func:`write_run`.
FORMAT_VERSION = 2
RUN_SUFFIX = ".json"
GROWTH_SUFFIX = ".growth.json"
TUNING_SUFFIX = ".tuning.json"
#: Folder of a tuned comparison's trial runs, inside its results directory.
TUNING_DIR = "tuning"
#: Fields every run file has (whatever its version).
_RUN_FIELDS = ("config", "summary", "records")


class ResultsError(ConfigError):
    """A result file or directory that cannot be read; the message names it."""


class RunResult(NamedTuple):
    """One run: what :func:`runner.run.run` returns and :func:`load_result` reads."""

    config: dict
    records: pd.DataFrame  # one row per seed and evaluation step
    summary: pd.DataFrame  # one row per seed
    params: Any  # final parameters, leading seed axis
    path: Path | None  # the run file
    probes: pd.DataFrame = pd.DataFrame()  # one row per seed and curvature probe


# ---------------------------------------------------------------------------- writing
def _jsonable(value: Any, exact: bool = False) -> Any:
    """Plain JSON values. JSON has no NaN or infinity: they become None (which
    pandas reads back as NaN) or, ``exact``, ``{"__float__": "nan"}`` (restored by
    :func:`_unexact`)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, exact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, exact) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": repr(value)} if exact else None
    return value


def _write_json(path: Path, payload: dict) -> None:
    data = json.dumps(_jsonable(payload), indent=1, sort_keys=False).encode()
    atomic_write(path, lambda handle: handle.write(data))


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


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


def run_path(out_dir: str | Path, run_id: str) -> Path:
    """The run file of ``run_id`` in a results directory."""
    return Path(out_dir) / f"{run_id}{RUN_SUFFIX}"


#: Suffixes of a run's companion files and folders (besides ``<run_id>.json``).
_COMPANIONS = (".params.npz", ".steps.npz", ".final.npz", ".resume.npz", ".ckpt")


def move_run(run_file: Path, folder: str | Path) -> Path:
    """Move a run file and its companions into ``folder`` (made if missing).

    Used to set aside a tuned comparison's held-out runs of a trial that is no
    longer the chosen one, so that the comparison table never pools them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in _COMPANIONS:
        companion = run_file.with_suffix(suffix)
        if companion.exists():
            companion.replace(folder / companion.name)
    run_file.replace(folder / run_file.name)
    return folder / run_file.name


def write_run(
    path: Path,
    result: RunResult,
    timings: dict[str, float],
    versions: dict[str, str],
    traces: dict[str, np.ndarray] | None = None,
    statistics: dict | None = None,
) -> Path:
    """Write a run's file, its parameters and (optionally) its per-step traces.

    ``statistics``: the run's aggregate over seeds (success rate and medians with
    their intervals, time to target; :func:`analysis.stats.run_statistics`).

    The arrays go first and the JSON file last, so a run file on disk always has
    its companions (a run counts as done once its JSON file exists).
    """
    if traces:
        _write_arrays(path.with_suffix(".steps.npz"), traces)
    _write_arrays(path.with_suffix(".params.npz"), flatten_params(result.params))
    payload = {
        "format": FORMAT_VERSION,
        "config": result.config,
        **timings,
        "versions": versions,
        "summary": result.summary.to_dict(orient="records"),
        "statistics": statistics or {},
        "records": result.records.to_dict(orient="records"),
        "probes": result.probes.to_dict(orient="records"),
    }
    _write_json(path, payload)
    return path


def write_checkpoint(run_file: Path, step: int, params: Any) -> Path:
    """Save ``params`` (leading seed axis) as the run's checkpoint at ``step``."""
    target = run_file.with_suffix(".ckpt") / f"step_{step}.npz"
    _write_arrays(target, flatten_params(params))
    return target


RESUME_SUFFIX = ".resume.npz"
FINAL_SUFFIX = ".final.npz"


def resume_path(run_file: Path, final: bool = False) -> Path:
    """The resume checkpoint of a run file, or (``final``) its final state."""
    return run_file.with_suffix(FINAL_SUFFIX if final else RESUME_SUFFIX)


def write_resume(
    run_file: Path, leaves: list[np.ndarray], meta: dict, final: bool = False
) -> Path:
    """Save an unfinished run: the training state's leaves and the host-side ``meta``.

    One ``.npz`` written atomically: ``leaf_<i>`` in the order of
    ``jax.tree.leaves`` of the state, and ``meta`` (JSON: configuration id, chunk,
    records, probes, timings, ...) as bytes. With ``final`` the file is the run's
    final state (``<run_id>.final.npz``), kept so that a longer budget continues
    the run. Floats that JSON cannot hold (NaN,
    infinities) are stored as strings and restored by :func:`read_resume`, so the
    records come back exactly.
    """
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    blob = json.dumps(_jsonable(meta, exact=True)).encode()
    arrays["meta"] = np.frombuffer(blob, np.uint8)
    target = resume_path(run_file, final)
    _write_arrays(target, arrays)
    return target


def read_resume(run_file: Path, final: bool = False) -> tuple[list[np.ndarray], dict]:
    """``(leaves, meta)`` of a resume checkpoint (or final state, ``final``).

    Raises :class:`ResultsError` (naming the file) when it is missing or damaged.
    """
    path = resume_path(run_file, final)
    arrays = _npz(path)
    try:
        meta = _unexact(json.loads(arrays.pop("meta").tobytes().decode()))
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"result file {path} is damaged: {err}") from None
    leaves = [arrays[k] for k in sorted(arrays)]
    return leaves, meta


def _unexact(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _unexact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unexact(v) for v in value]
    return value


def remove_resume(run_file: Path) -> None:
    """Delete a run's resume checkpoint (after its run file is written)."""
    resume_path(run_file).unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path, older_than: float = 600.0) -> list:
    """Delete the ``.*.tmp`` files that interrupted atomic writes left in ``folder``.

    Only those untouched for ``older_than`` seconds: a write in progress (another
    process on the same directory) takes far less. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, now = [], time.time()
    for tmp in folder.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime >= older_than:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
    return removed


def write_growth(path: Path, config: dict, rows: pd.DataFrame, fits: pd.DataFrame):
    """Write a growth experiment (configuration, rows, fits) atomically."""
    payload = {
        "format": FORMAT_VERSION,
        "config": config,
        "rows": rows.to_dict(orient="records"),
        "fits": fits.to_dict(orient="records"),
    }
    _write_json(Path(path), payload)


def write_tuning(out_dir: str | Path, name: str, settings: dict, studies: list[dict]):
    """Write ``<name>.tuning.json``: the tuning settings and every study.

    A study is a dict: ``label``, ``optimizer``, ``task`` (name and
    hyperparameters), ``space`` (as in the comparison file), ``trials`` (each:
    ``trial``, ``run_id``, ``hparams`` (the tuned values), ``solved_fraction``,
    ``median_cost``, ``final_loss``, ``error``), ``chosen`` (index into trials) and
    ``run_id`` (the held-out run).
    """
    payload = {"format": FORMAT_VERSION, "settings": settings, "studies": studies}
    _write_json(Path(out_dir) / f"{name}{TUNING_SUFFIX}", payload)


# ---------------------------------------------------------------------------- reading
def _read_json(path: Path, fields: tuple[str, ...]) -> dict:
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"result file {str(path)!r} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"result file {path} is damaged: {err}") from None
    if not isinstance(payload, dict):
        raise ResultsError(f"result file {path} is damaged: not a JSON object")
    version = payload.get("format", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ResultsError(
            f"result file {path} has format {version!r}; this curvbench reads "
            f"formats 1 to {FORMAT_VERSION}"
        )
    missing = [f for f in fields if f not in payload]
    if missing:
        raise ResultsError(f"result file {path} is damaged: no {missing[0]!r} field")
    return payload


def read_run(path: str | Path) -> dict:
    """One run file as a dict (checked: readable, a known format, every field)."""
    payload = _read_json(Path(path), _RUN_FIELDS)
    config = payload["config"]
    if not isinstance(config, dict) or not {"run_id", "task", "label"} <= set(config):
        raise ResultsError(f"result file {path} is damaged: incomplete 'config'")
    return payload


def _files(path: Path, suffix: str, exclude: tuple[str, ...] = ()) -> list[Path]:
    if path.is_file():
        return [path] if path.name.endswith(suffix) else []
    if not path.is_dir():
        raise ResultsError(f"results directory {str(path)!r} does not exist")
    return sorted(
        p
        for p in path.glob(f"*{suffix}")
        if not p.name.startswith(".") and not p.name.endswith(exclude)
    )


def run_files(path: str | Path) -> list[Path]:
    """The run files of a results directory (or the single run file given)."""
    return _files(Path(path), RUN_SUFFIX, exclude=(GROWTH_SUFFIX, TUNING_SUFFIX))


def growth_files(path: str | Path) -> list[Path]:
    """The growth files of a results directory (or the single file given)."""
    return _files(Path(path), GROWTH_SUFFIX)


def tuning_files(path: str | Path) -> list[Path]:
    """The tuning files of a results directory (none for a single run file)."""
    path = Path(path)
    return _files(path, TUNING_SUFFIX) if path.is_dir() else []


def load_tuning(path: str | Path) -> pd.DataFrame:
    """Every trial of every tuning file under ``path``: one row per trial.

    Columns: ``study`` (file and study index: one tuned optimizer on one task
    configuration), ``label``, ``optimizer_name``, ``task`` and the task's
    hyperparameters, ``trial``, ``run_id``, ``chosen`` (bool), the scores
    (``solved_fraction``, ``median_cost``, ``final_loss``), ``criterion``,
    ``error``, and one ``hp_<name>`` column per tuned hyperparameter.
    """
    rows = []
    for file in tuning_files(path):
        payload = _read_json(file, ("settings", "studies"))
        settings = payload["settings"]
        try:
            for index, study in enumerate(payload["studies"]):
                task = dict(study["task"])
                for i, trial in enumerate(study["trials"]):
                    row = {
                        "study": f"{file.name}:{study.get('study', index)}",
                        "label": study["label"],
                        "optimizer_name": study["optimizer"],
                        "task": task.get("name"),
                        **{k: v for k, v in task.items() if k != "name"},
                        "criterion": settings.get("criterion"),
                        "chosen": i == study["chosen"],
                        **{k: v for k, v in trial.items() if k != "hparams"},
                        **{f"hp_{k}": v for k, v in trial["hparams"].items()},
                    }
                    rows.append(row)
        except (KeyError, TypeError, AttributeError) as err:
            raise ResultsError(f"result file {file} is damaged: {err!r}") from None
    frame = pd.DataFrame(rows)
    if not frame.empty:  # JSON has no infinity: null scores are "never reached"
        cost = frame["criterion"] != "eval_loss"
        frame.loc[cost, "median_cost"] = frame.loc[cost, "median_cost"].fillna(np.inf)
        frame["final_loss"] = frame["final_loss"].fillna(np.inf)
    return frame


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as handle, np.load(handle) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise ResultsError(f"result file {str(path)!r} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ResultsError(f"result file {path} is damaged: {err}") from None


def load_params(run_file: str | Path, step: int | None = None) -> dict:
    """Saved parameters of a run (leading seed axis); ``step`` picks a checkpoint."""
    run_file = Path(run_file)
    if step is None:
        return unflatten_params(_npz(run_file.with_suffix(".params.npz")))
    return unflatten_params(_npz(run_file.with_suffix(".ckpt") / f"step_{step}.npz"))


def checkpoint_steps(run_file: str | Path) -> list[int]:
    """The steps at which checkpoints of a run were saved."""
    folder = Path(run_file).with_suffix(".ckpt")
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.npz"))


def load_steps(run_file: str | Path) -> pd.DataFrame:
    """Per-step traces of one run, tidy (one row per seed and step)."""
    run_file = Path(run_file)
    seeds = read_run(run_file)["config"]["seeds"]
    arrays = _npz(run_file.with_suffix(".steps.npz"))
    n_steps = arrays["loss"].shape[1]
    frame = pd.DataFrame({k: v.reshape(-1) for k, v in arrays.items()})
    frame.insert(0, "step", np.tile(np.arange(n_steps), len(seeds)))
    frame.insert(0, "seed", np.repeat(seeds, n_steps))
    return frame


def load_result(path: str | Path) -> RunResult:
    """A stored run as a :class:`RunResult` (the inverse of :func:`write_run`)."""
    path = Path(path)
    payload = read_run(path)
    return RunResult(
        config=payload["config"],
        records=pd.DataFrame(payload["records"]),
        summary=pd.DataFrame(payload["summary"]),
        params=load_params(path),
        path=path,
        probes=pd.DataFrame(payload.get("probes", [])),
    )


def config_columns(config: dict) -> dict:
    """The columns that identify a run in tidy frames.

    Task hyperparameters as they are, optimizer hyperparameters prefixed ``opt_``,
    the run options that change results (``steps``, ``eval_every``, ...) and
    ``config_digest`` (:func:`config_digest`).
    """
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
    for key, value in config.items():  # run options (steps, eval_every, ...)
        if key not in _NOT_OPTIONS and key not in cols:
            cols[key] = json.dumps(value) if isinstance(value, list | dict) else value
    cols["config_digest"] = config_digest(config)
    return cols


#: Top-level configuration fields that are not run options.
_NOT_OPTIONS = {"task", "optimizer", "label", "run_id", "seeds"}


def config_digest(config: dict) -> str:
    """A digest of a run's configuration without its seeds and run id.

    Runs with equal digests differ only in their seeds: the comparison table pools
    them; runs that differ in anything else (a budget of steps, an optimizer
    setting under the same label) are never pooled.
    """
    kept = {k: v for k, v in config.items() if k not in ("seeds", "run_id")}
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def _tidy(runs: list[dict], field: str) -> pd.DataFrame:
    frames = []
    for run in runs:
        rows = pd.DataFrame(run.get(field) or [])
        if rows.empty:
            continue
        for key, value in config_columns(run["config"]).items():
            rows[key] = [value] * len(rows)
        frames.append(rows)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _growth_frames(files: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, fits = [], []
    for file in files:
        payload = _read_json(file, ("config", "rows", "fits"))
        name = payload["config"].get("name", file.name[: -len(GROWTH_SUFFIX)])
        for part, out in (("rows", rows), ("fits", fits)):
            out.append(pd.DataFrame(payload[part]).assign(experiment=name))
    if not rows:
        return pd.DataFrame(), pd.DataFrame()
    return pd.concat(rows, ignore_index=True), pd.concat(fits, ignore_index=True)


def load_growth(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every growth experiment's rows and fits under ``path`` (empty frames if none)."""
    path = Path(path)
    return _growth_frames(growth_files(path) if path.exists() else [])


class Results:
    """A results directory, read once: runs, tidy frames and growth experiments.

    Attributes:
      path: the directory (or single run file) read.
      runs: every run file's content (``config``, ``summary``, ``records``,
        ``probes``, timings), with its path under ``"file"``.
      growth_rows, growth_fits: every growth experiment's rows and fits, with an
        ``experiment`` column (empty frames without growth files).

    The frames :attr:`records`, :attr:`summary` and :attr:`probes` carry the run's
    configuration as columns (:func:`config_columns`) and are built on first use.
    """

    def __init__(self, path: Path, runs: list[dict], growth: tuple) -> None:
        self.path = path
        self.runs = runs
        self.growth_rows, self.growth_fits = growth

    @classmethod
    def load(cls, path: str | Path, require: bool = True) -> Results:
        """Read every run and growth file under ``path``.

        Raises:
          ResultsError: the path does not exist, a file is damaged, or (with
            ``require``) there is neither a run nor a growth experiment.
        """
        path = Path(path)
        runs = [{**read_run(f), "file": f} for f in run_files(path)]
        growth = load_growth(path) if path.is_dir() else (pd.DataFrame(),) * 2
        if require and not runs and growth[0].empty:
            raise ResultsError(f"no run or growth files in {str(path)!r}")
        return cls(path, runs, growth)

    @cached_property
    def records(self) -> pd.DataFrame:
        """Tidy records: one row per run, seed and evaluation step."""
        return _tidy(self.runs, "records")

    @cached_property
    def summary(self) -> pd.DataFrame:
        """Per-seed outcomes (status, steps and seconds to solve, ...)."""
        return _tidy(self.runs, "summary")

    @cached_property
    def probes(self) -> pd.DataFrame:
        """Curvature probes: one row per run, seed and probe (empty without)."""
        return _tidy(self.runs, "probes")

    @cached_property
    def tuning(self) -> pd.DataFrame:
        """Tuning trials, one row per trial (empty for an untuned comparison)."""
        return load_tuning(self.path)

    @property
    def labels(self) -> list[str]:
        """The optimizer label of each run, in file order."""
        return [run["config"]["label"] for run in self.runs]

    def steps(self, run: dict) -> pd.DataFrame:
        """Per-step traces of one of :attr:`runs` (empty when not recorded)."""
        if not run["file"].with_suffix(".steps.npz").is_file():
            return pd.DataFrame()
        return load_steps(run["file"])


def load(path: str | Path) -> pd.DataFrame:
    """Tidy records of a results directory (``Results.load(path).records``)."""
    return Results.load(path, require=False).records


def load_summary(path: str | Path) -> pd.DataFrame:
    """Per-seed outcomes of a results directory."""
    return Results.load(path, require=False).summary


def load_probes(path: str | Path) -> pd.DataFrame:
    """Curvature probes of a results directory (empty when no run was probed)."""
    return Results.load(path, require=False).probes
