"""Uncertainty of the comparison: success-rate intervals, bootstrap medians, targets.

Success rates over a handful of seeds are binomial proportions with wide intervals;
medians of the work to solve over the solved seeds are uncertain too. This module
gives the intervals the comparison table reports and the time to reach a fixed loss
target from the per-chunk records.

- :func:`wilson_interval`: the Wilson score interval (Wilson 1927), the default
  for success rates: good coverage for small ``n`` and never outside ``[0, 1]``.
- :func:`clopper_pearson_interval`: the exact (conservative) interval of
  Clopper & Pearson (1934).
- :func:`bootstrap_median_interval`: the percentile bootstrap (Efron 1979; Efron &
  Tibshirani 1993, ch. 13) of a median, where ``+inf`` means "never reached".
- :func:`time_to_target`: per run and seed, the work spent when an evaluation
  metric first reached a target.
- :func:`interval_columns`: all of the above per group of a summary frame.
- :func:`mean_interval` and :func:`heldout_columns`: the mean over seeds of a
  held-out loss (best validation loss, test loss there) with its Student-t
  interval, for tasks without a success test.

References:
    E. B. Wilson, "Probable inference, the law of succession, and statistical
    inference", JASA 22 (1927) 209-212.
    C. J. Clopper, E. S. Pearson, "The use of confidence or fiducial limits
    illustrated in the case of the binomial", Biometrika 26 (1934) 404-413.
    B. Efron, R. J. Tibshirani, "An Introduction to the Bootstrap", Chapman &
    Hall (1993).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

# The quantiles come straight from scipy.special (ndtri: normal; betaincinv: beta;
# stdtrit: Student t), the functions scipy.stats evaluates for them, bit for bit:
# importing scipy.stats would add about a second to every executor worker's start.
from scipy import special

#: Cost columns of the records that :func:`time_to_target` can report.
#: Summary column of each cost to solve (tables, profiles, tuning criteria).
COST_COLUMNS = {
    "updates": "steps_to_solve",
    "grad_equivalents": "grad_equivalents_to_solve",
    "seconds": "seconds_to_solve",
}
TARGET_COSTS = ("step", "updates", "grad_equivalents", "seconds")
#: Per-record measurements: never configuration columns in :func:`time_to_target`.
_MEASURED = {
    "step", "updates", "seconds", "status", "loss", "eval_loss", "eval_error",
    "grad_evals", "grad_equivalents", "spectral_radius",
}  # fmt: skip
#: Columns that identify a run in records without ``run_id``.
_RUN_KEYS = ("task", "length", "init", "optimizer", "config_digest")
#: Summary cost columns and the names of their median and interval columns.
INTERVAL_NAMES = {
    "steps_to_solve": "steps",
    "grad_equivalents_to_solve": "grad_equiv",
    "seconds_to_solve": "seconds",
}

Interval = tuple[np.ndarray | float, np.ndarray | float]


def _check_confidence(confidence: float) -> None:
    """Raise ``ValueError`` unless ``0 < confidence < 1``."""
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")


def _binomial_counts(
    successes: ArrayLike, trials: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Broadcast float arrays ``k, n`` after checking ``n >= 0`` and ``0 <= k <= n``."""
    k, n = np.broadcast_arrays(
        np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    )
    if not np.all(n >= 0):  # also rejects NaN
        raise ValueError(f"trials must be >= 0, got {trials!r}")
    if not np.all((k >= 0) & (k <= n)):
        raise ValueError(f"successes must lie in [0, trials], got {successes!r}")
    return k, n


def _as_output(lo: np.ndarray, hi: np.ndarray, scalar: bool) -> Interval:
    """Floats for scalar inputs, arrays otherwise."""
    if scalar:
        return float(lo), float(hi)
    return lo, hi


def _normal_quantile(confidence: float) -> float:
    """``z = Phi^{-1}(1 - alpha / 2)`` with ``alpha = 1 - confidence``."""
    return float(special.ndtri(0.5 + confidence / 2.0))


def wilson_interval(
    successes: ArrayLike, trials: ArrayLike, confidence: float = 0.95
) -> Interval:
    """Wilson score interval of a binomial proportion (Wilson 1927).

    With ``k`` successes in ``n`` trials and ``z = Phi^{-1}(1 - alpha/2)``, the
    interval is the set of ``p`` with ``|k/n - p| <= z sqrt(p (1 - p) / n)``:

        centre = (k + z^2 / 2) / (n + z^2)
        half   = z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)

    ``[centre - half, centre + half]``, clipped to ``[0, 1]`` against rounding
    (exactly 0 below when ``k = 0`` and 1 above when ``k = n``). No trials
    (``n = 0``) give ``(0, 1)``. Vectorized: inputs broadcast.

    Args:
        successes: Number of successes ``k`` (scalar or array), ``0 <= k <= n``.
        trials: Number of trials ``n`` (scalar or array), ``n >= 0``.
        confidence: Coverage ``1 - alpha`` in ``(0, 1)``.

    Returns:
        ``(lower, upper)``: floats for scalar inputs, arrays otherwise.

    Raises:
        ValueError: ``confidence`` outside ``(0, 1)``, ``trials < 0`` or
            ``successes`` outside ``[0, trials]``.
    """
    _check_confidence(confidence)
    scalar = np.ndim(successes) == 0 and np.ndim(trials) == 0
    k, n = _binomial_counts(successes, trials)
    z2 = _normal_quantile(confidence) ** 2
    some = n > 0
    safe_n = np.where(some, n, 1.0)
    centre = (k + z2 / 2.0) / (safe_n + z2)
    half = np.sqrt(z2) / (safe_n + z2) * np.sqrt(k * (safe_n - k) / safe_n + z2 / 4)
    lo = np.where(k > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    hi = np.where(k < n, np.clip(centre + half, 0.0, 1.0), 1.0)
    return _as_output(np.where(some, lo, 0.0), np.where(some, hi, 1.0), scalar)


def clopper_pearson_interval(
    successes: ArrayLike, trials: ArrayLike, confidence: float = 0.95
) -> Interval:
    """Exact (Clopper-Pearson 1934) interval of a binomial proportion.

    With ``alpha = 1 - confidence`` and ``B(q; a, b)`` the ``q`` quantile of the
    Beta(a, b) distribution, the bounds are

        lower = B(alpha / 2; k, n - k + 1)      (0 when k = 0)
        upper = B(1 - alpha / 2; k + 1, n - k)  (1 when k = n)

    i.e. the ``p`` at which ``P(X >= k) = alpha/2`` and ``P(X <= k) = alpha/2``
    for ``X ~ Binomial(n, p)``. Coverage is at least ``confidence`` for every
    ``p`` (conservative). ``n = 0`` gives ``(0, 1)``. Same arguments, outputs and
    errors as :func:`wilson_interval`.
    """
    _check_confidence(confidence)
    scalar = np.ndim(successes) == 0 and np.ndim(trials) == 0
    k, n = _binomial_counts(successes, trials)
    alpha = 1.0 - confidence
    # Beta parameters must be positive: the edge cases take their fixed values.
    lo_k = np.where(k > 0, k, 1.0)
    hi_b = np.where(k < n, n - k, 1.0)
    lo = np.where(k > 0, special.betaincinv(lo_k, n - k + 1, alpha / 2), 0.0)
    hi = np.where(k < n, special.betaincinv(k + 1, hi_b, 1 - alpha / 2), 1.0)
    return _as_output(lo.astype(float), hi.astype(float), scalar)


def _linear_quantile(sorted_values: np.ndarray, q: float) -> float:
    """The type-7 (numpy "linear") sample quantile, exact with ``+inf`` values.

    ``h = (m - 1) q``; the quantile is ``x[floor h] + (h - floor h) (x[ceil h] -
    x[floor h])``, read as ``x[floor h]`` when the fraction is 0 and ``+inf`` when
    ``x[ceil h]`` is infinite (numpy's interpolation would give NaN for ``0 * inf``).
    """
    h = (len(sorted_values) - 1) * q
    below, above = int(np.floor(h)), int(np.ceil(h))
    frac = h - below
    low, high = sorted_values[below], sorted_values[above]
    if frac == 0.0 or low == high:
        return float(low)
    if np.isinf(high):
        return float("inf")
    return float(low + frac * (high - low))


def bootstrap_median_interval(
    values: ArrayLike,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median (Efron & Tibshirani 1993, 13.3).

    Draw ``resamples`` samples of size ``n`` with replacement from the values,
    take each sample's median ``m*_b`` and return the ``alpha/2`` and
    ``1 - alpha/2`` quantiles (numpy's "linear" rule) of the ``m*_b``.

    NaN values are dropped. ``+inf`` is kept and means "never reached": a
    resample's median is infinite when at least half of it is, so the upper end
    (or both ends) may be ``inf``. Deterministic given ``seed``
    (:func:`numpy.random.default_rng`).

    Args:
        values: The sample (e.g. steps to solve per seed).
        confidence: Coverage ``1 - alpha`` in ``(0, 1)``.
        resamples: Number of bootstrap samples (>= 1).
        seed: Seed of the resampling generator.

    Returns:
        ``(lower, upper)``; ``(nan, nan)`` for no values, ``(v, v)`` for one value.

    Raises:
        ValueError: ``confidence`` outside ``(0, 1)``, ``resamples < 1`` or a
            ``-inf`` value.
    """
    _check_confidence(confidence)
    if int(resamples) < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if np.any(x == -np.inf):
        raise ValueError("values must not contain -inf (+inf means 'not reached')")
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, x.size, size=(int(resamples), x.size))]
    medians = np.sort(np.median(draws, axis=1))
    alpha = 1.0 - confidence
    return (
        _linear_quantile(medians, alpha / 2),
        _linear_quantile(medians, 1 - alpha / 2),
    )


def _run_keys(records: pd.DataFrame) -> list[str]:
    """``run_id`` and ``seed``; without ``run_id``, the run-identifying columns."""
    if "run_id" in records.columns:
        return ["run_id", "seed"]
    return [c for c in _RUN_KEYS if c in records.columns] + ["seed"]


def _constant_columns(
    records: pd.DataFrame, keys: list[str], skip: set[str]
) -> list[str]:
    """Columns (not in ``keys`` or ``skip``) with one value inside every group."""
    candidates = [c for c in records.columns if c not in keys and c not in skip]
    if not candidates or records.empty:
        return candidates
    text = records[candidates].astype(str)
    counts = text.groupby([records[k] for k in keys], dropna=False).nunique(
        dropna=False
    )
    return [c for c in candidates if (counts[c] <= 1).all()]


def first_reached(group: pd.DataFrame, column: str, target: float, cost: str) -> float:
    """``cost`` at the first record (by step) with ``column <= target``, else inf."""
    rows = group.sort_values("step", kind="stable") if "step" in group else group
    values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
    hit = np.flatnonzero(values <= target)  # NaN never reaches
    if hit.size == 0:
        return float("inf")
    return float(pd.to_numeric(rows[cost].iloc[hit[0]], errors="coerce"))


def time_to_target(
    records: pd.DataFrame,
    target: float,
    column: str = "eval_loss",
    cost: str = "updates",
) -> pd.DataFrame:
    """Work spent when ``column`` first reached ``target``, per run and seed.

    For each ``(run_id, seed)`` the records are read in ``step`` order and the
    result is ``cost`` at the first record with ``column <= target`` (``+inf`` when
    no record does; NaN values never count). Records hold evaluations only every
    ``eval_every`` steps, so the time is the first *evaluated* chunk at the target.
    A seed retired as solved before reaching the target has no later records: it
    keeps ``inf`` unless its last record reached the target.

    Without a ``run_id`` column, runs are told apart by the columns among
    ``task, length, init, optimizer, config_digest`` that the records have.

    Args:
        records: Tidy records (:attr:`analysis.results.Results.records`).
        target: The threshold on ``column`` (lower is better).
        column: The metric (``eval_loss``, ``eval_error``, ``loss``, ...).
        cost: One of :data:`TARGET_COSTS` (``step``, ``updates``,
            ``grad_equivalents``, ``seconds``).

    Returns:
        One row per run and seed: the run keys, ``seed``, the configuration columns
        constant within the run and seed (task, length, init, optimizer, ...),
        ``{cost}_to_target`` (float, ``inf`` when never reached) and ``reached``
        (bool).

    Raises:
        ValueError: unknown ``cost`` or missing columns.
    """
    if cost not in TARGET_COSTS:
        raise ValueError(f"cost must be one of {list(TARGET_COSTS)}, got {cost!r}")
    keys = _run_keys(records)
    missing = [c for c in {*keys, column, cost} if c not in records.columns]
    if missing:
        raise ValueError(f"time_to_target: missing column(s) {sorted(missing)}")
    out_name = f"{cost}_to_target"
    skip = (
        _MEASURED
        | {column, cost}
        | {c for c in records.columns if c.startswith("grad_norm")}
    )
    config = _constant_columns(records, keys, skip)
    rows = []
    for _, group in records.groupby(keys, sort=True, dropna=False):
        row = {c: group[c].iloc[0] for c in [*keys, *config]}
        row[out_name] = first_reached(group, column, float(target), cost)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*keys, *config, out_name])
    frame[out_name] = frame[out_name].astype(float)
    frame["reached"] = np.isfinite(frame[out_name])
    return frame


def _solved_costs(rows: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` over the solved seeds of ``rows``, as floats (NaN dropped later)."""
    solved = rows[rows["status"] == "solved"]
    return pd.to_numeric(solved[column], errors="coerce").to_numpy(dtype=float)


def _median(values: np.ndarray) -> float:
    """Median of the non-NaN values, NaN when there are none."""
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else float("nan")


def _group_intervals(
    rows: pd.DataFrame,
    costs: list[str],
    confidence: float,
    resamples: int,
    seed: int,
) -> dict[str, float]:
    """Success-rate and median-cost intervals of one group of seeds."""
    seeds = len(rows)
    solved = int((rows["status"] == "solved").sum())
    lo, hi = wilson_interval(solved, seeds, confidence)
    out: dict[str, float] = {
        "seeds": seeds,
        "solved": solved,
        "success_rate": solved / seeds if seeds else float("nan"),
        "success_lo": lo,
        "success_hi": hi,
    }
    for column in costs:
        name = INTERVAL_NAMES[column]
        values = _solved_costs(rows, column)
        out[f"median_{name}"] = _median(values)
        out[f"{name}_lo"], out[f"{name}_hi"] = bootstrap_median_interval(
            values, confidence, resamples, seed
        )
    return out


def interval_columns(
    summary: pd.DataFrame,
    keys: Sequence[str],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Success rates and median costs to solve with their intervals, per group.

    For each group of ``keys`` (missing values form their own group):

    - ``seeds``, ``solved``, ``success_rate = solved / seeds`` and its Wilson
      interval ``success_lo``, ``success_hi`` (:func:`wilson_interval`);
    - for each of ``steps_to_solve``, ``grad_equivalents_to_solve`` and
      ``seconds_to_solve`` present in ``summary``: the median over the *solved*
      seeds and its percentile-bootstrap interval over the same seeds
      (:func:`bootstrap_median_interval`), named ``median_steps``, ``steps_lo``,
      ``steps_hi``; ``median_grad_equiv``, ``grad_equiv_lo``, ``grad_equiv_hi``;
      ``median_seconds``, ``seconds_lo``, ``seconds_hi`` (NaN when no seed
      solved).

    A pure function of its arguments: the bootstrap of every group uses ``seed``.

    Args:
        summary: Per-seed outcomes with a ``status`` column.
        keys: Grouping columns (e.g. :func:`analysis.table.group_columns`).
        confidence: Coverage of every interval.
        resamples: Bootstrap samples per median.
        seed: Seed of the bootstrap generator.

    Returns:
        One row per group: ``keys`` then the columns above.
    """
    _check_confidence(confidence)
    keys = list(keys)
    missing = [c for c in [*keys, "status"] if c not in summary.columns]
    if missing:
        raise ValueError(f"interval_columns: missing column(s) {missing}")
    costs = [c for c in INTERVAL_NAMES if c in summary.columns]
    columns = [*keys, "seeds", "solved", "success_rate", "success_lo", "success_hi"]
    for column in costs:
        name = INTERVAL_NAMES[column]
        columns += [f"median_{name}", f"{name}_lo", f"{name}_hi"]
    rows = _per_group(
        summary,
        keys,
        lambda group: _group_intervals(group, costs, confidence, resamples, seed),
    )
    return pd.DataFrame(rows, columns=columns)


def _per_group(
    summary: pd.DataFrame, keys: list[str], measure: Callable[[pd.DataFrame], dict]
) -> list[dict]:
    """One row per group of ``keys`` (the whole frame without keys; missing values
    form their own group): the key values, then ``measure(group)``."""
    whole = [((), summary)]
    groups = summary.groupby(keys, sort=True, dropna=False) if keys else whole
    rows = []
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        rows.append({**dict(zip(keys, values, strict=True)), **measure(group)})
    return rows


def mean_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, ...]:
    """Mean of the finite ``values`` and its Student-t interval ``(mean, lo, hi)``.

    ``mean +- t_{(1+c)/2, n-1} s / sqrt(n)`` with ``s`` the sample standard
    deviation (Student 1908): the interval of a mean over a few seeds, assuming
    their values are roughly normal. NaN interval for fewer than two values, NaN
    everything for none.
    """
    _check_confidence(confidence)
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean(x))
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = special.stdtrit(x.size - 1, 0.5 + confidence / 2) * np.std(x, ddof=1)
    half /= np.sqrt(x.size)
    return mean, float(mean - half), float(mean + half)


#: Held-out summary columns and the names of their mean and interval columns.
HELDOUT_NAMES = {"best_eval_loss": "val_loss", "test_loss_at_best": "test_loss"}


def heldout_names(summary: pd.DataFrame) -> dict[str, str]:
    """:data:`HELDOUT_NAMES` plus ``test_<m>_at_best -> test_<m>`` for every other
    test measure in ``summary`` (bits per character, accuracy), error rates left
    out."""
    names = {c: n for c, n in HELDOUT_NAMES.items() if c in summary.columns}
    for column in summary.columns:
        if (
            column.startswith("test_")
            and column.endswith("_at_best")
            and column not in names
            and column != "test_error_at_best"
        ):
            names[column] = column[: -len("_at_best")]
    return names


def heldout_columns(
    summary: pd.DataFrame, keys: Sequence[str], confidence: float = 0.95
) -> pd.DataFrame:
    """Per group of ``keys``: the mean over seeds of the best validation loss and the
    test measures at that evaluation, each with its Student-t interval
    (:func:`mean_interval`): ``val_loss``, ``val_loss_lo``, ``val_loss_hi``,
    ``test_loss``, ... (:func:`heldout_names`). Seeds without a finite best (a run
    diverged from its first evaluation) are left out of the means. Empty
    (no columns but ``keys``) when ``summary`` has no held-out measures."""
    names = heldout_names(summary)

    def means(group: pd.DataFrame) -> dict:
        row = {}
        for column, name in names.items():
            numbers = pd.to_numeric(group[column], errors="coerce")
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval(
                numbers, confidence
            )
        return row

    return pd.DataFrame(_per_group(summary, list(keys), means))


def run_statistics(summary: pd.DataFrame, target_loss: float | None = None) -> dict:
    """The statistics a run file stores next to its per-seed summary.

    Success rate with its Wilson interval, and the median updates and
    gradient-equivalents to solve with their bootstrap intervals
    (:func:`interval_columns` over one group; seconds are left out, so that the
    same run gives the same file whatever machine it ran on). With ``target_loss``:
    the seeds that reached it and the median updates and gradient-equivalents to
    reach it over all seeds (a seed that never did counts as infinite; None when
    the median is infinite).
    """
    frame = summary.drop(columns=["seconds_to_solve"], errors="ignore")
    (row,) = interval_columns(frame, []).to_dict(orient="records")
    stats = {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
    stats["seeds"], stats["solved"] = int(row["seeds"]), int(row["solved"])
    stats["confidence"] = 0.95
    if heldout_names(summary):
        (held,) = heldout_columns(summary, []).to_dict(orient="records")
        stats.update({k: None if pd.isna(v) else float(v) for k, v in held.items()})
    if target_loss is not None:
        stats["target_loss"] = float(target_loss)
        for column in ("updates_to_target", "grad_equivalents_to_target"):
            values = pd.to_numeric(summary.get(column), errors="coerce")
            values = values.fillna(np.inf).to_numpy(dtype=float)
            median = float(np.median(values)) if values.size else np.inf
            stats[f"median_{column}"] = median if np.isfinite(median) else None
        reached = pd.to_numeric(summary.get("updates_to_target"), errors="coerce")
        stats["reached_target"] = int(reached.notna().sum())
    return stats
