"""Intervals and times to target against closed forms, scipy and hand-built frames."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from analysis.stats import (
    bootstrap_median_interval,
    clopper_pearson_interval,
    interval_columns,
    time_to_target,
    wilson_interval,
)

GRID = [(k, n) for n in (1, 2, 3, 5, 10, 17, 40) for k in range(n + 1)]


def _wilson_textbook(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson (1927) in the p-hat form, z from the standard library."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_wilson_matches_published_values():
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (
        pytest.approx(0.2366, abs=1e-4),
        pytest.approx(0.7634, abs=1e-4),
    )


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_wilson_matches_the_textbook_formula(confidence):
    for k, n in GRID:
        expected = _wilson_textbook(k, n, confidence)
        got = wilson_interval(k, n, confidence)
        assert got == pytest.approx(expected, abs=1e-12), (k, n)


def test_wilson_matches_scipy_binomtest():
    for k, n in GRID:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        got = wilson_interval(k, n)
        assert got == pytest.approx((ci.low, ci.high), abs=1e-10), (k, n)


def test_wilson_is_vectorized_and_scalars_give_floats():
    k = np.array([0, 3, 7, 0])
    n = np.array([7, 7, 7, 0])
    lo, hi = wilson_interval(k, n)
    assert isinstance(lo, np.ndarray) and lo.shape == (4,)
    for i in range(3):
        ci = binomtest(int(k[i]), int(n[i])).proportion_ci(method="wilson")
        assert (lo[i], hi[i]) == pytest.approx((ci.low, ci.high), abs=1e-10)
    assert (lo[3], hi[3]) == (0.0, 1.0)
    scalar = wilson_interval(2, 5)
    assert all(isinstance(v, float) for v in scalar)


def test_no_trials_give_the_whole_unit_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert clopper_pearson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("interval", [wilson_interval, clopper_pearson_interval])
def test_bad_arguments_are_named(interval):
    with pytest.raises(ValueError, match="successes"):
        interval(6, 5)
    with pytest.raises(ValueError, match="successes"):
        interval(-1, 5)
    with pytest.raises(ValueError, match="trials"):
        interval(0, -1)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            interval(1, 5, bad)


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_clopper_pearson_matches_scipy_exact(confidence):
    for k, n in GRID:
        ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
        got = clopper_pearson_interval(k, n, confidence)
        assert got == pytest.approx((ci.low, ci.high), abs=1e-10), (k, n)


def test_clopper_pearson_edges_have_closed_forms():
    # P(X = 0) = (1 - p)^n = alpha / 2 and P(X = n) = p^n = alpha / 2.
    n, alpha = 12, 0.05
    assert clopper_pearson_interval(0, n) == (
        0.0,
        pytest.approx(1 - (alpha / 2) ** (1 / n), abs=1e-12),
    )
    assert clopper_pearson_interval(n, n) == (
        pytest.approx((alpha / 2) ** (1 / n), abs=1e-12),
        1.0,
    )


def test_clopper_pearson_is_vectorized():
    lo, hi = clopper_pearson_interval(np.array([1, 4]), 9)
    for i, k in enumerate((1, 4)):
        ci = binomtest(k, 9).proportion_ci(method="exact")
        assert (lo[i], hi[i]) == pytest.approx((ci.low, ci.high), abs=1e-10)


def test_bootstrap_median_interval_covers_the_true_median():
    rng = np.random.default_rng(12345)
    truth = math.log(2.0)  # median of the unit exponential
    reps = 300
    covered = 0
    for rep in range(reps):
        sample = rng.exponential(size=25)
        lo, hi = bootstrap_median_interval(sample, resamples=300, seed=rep)
        covered += lo <= truth <= hi
    assert 0.88 <= covered / reps <= 0.995


def test_bootstrap_is_deterministic_given_the_seed():
    values = np.random.default_rng(3).normal(size=30)
    first = bootstrap_median_interval(values, seed=7)
    assert bootstrap_median_interval(values, seed=7) == first
    others = {bootstrap_median_interval(values, 0.9, 200, seed) for seed in range(10)}
    assert len(others) > 1  # the seed drives the resampling


def test_bootstrap_interval_brackets_the_median_within_the_data():
    values = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0])
    lo, hi = bootstrap_median_interval(values)
    assert values.min() <= lo <= 5.0 <= hi <= values.max()
    assert lo < hi


def test_bootstrap_of_two_values_spans_them():
    # Resample medians of (a, b): a w.p. 1/4, (a + b) / 2 w.p. 1/2, b w.p. 1/4.
    assert bootstrap_median_interval([2.0, 6.0]) == (2.0, 6.0)


def test_bootstrap_edge_cases():
    assert all(math.isnan(v) for v in bootstrap_median_interval([]))
    assert all(math.isnan(v) for v in bootstrap_median_interval([np.nan]))
    assert bootstrap_median_interval([4.0]) == (4.0, 4.0)
    assert bootstrap_median_interval([4.0, np.nan]) == (4.0, 4.0)
    with pytest.raises(ValueError, match="-inf"):
        bootstrap_median_interval([1.0, -np.inf])


def test_bootstrap_keeps_infinity_as_not_reached():
    # Resample medians of (1, inf): 1 w.p. 1/4, inf w.p. 3/4.
    assert bootstrap_median_interval([1.0, np.inf]) == (1.0, np.inf)
    assert bootstrap_median_interval([np.inf, np.inf, np.inf]) == (np.inf, np.inf)


def _record(run, optimizer, seed, step, loss, status="running", updates=None):
    return {
        "run_id": run, "task": "addition", "length": 10, "optimizer": optimizer,
        "seed": seed, "step": step,
        "updates": step - 1 if updates is None else updates,
        "grad_equivalents": 3.0 * step, "seconds": step / 10.0,
        "eval_loss": loss, "eval_error": loss / 2, "status": status,
        "grad_norm_mean": float(seed + step),
    }  # fmt: skip


def _records() -> pd.DataFrame:
    rows = [
        _record("r1", "SGD", 0, 10, 0.5),
        _record("r1", "SGD", 0, 20, 0.09),
        _record("r1", "SGD", 0, 30, 0.05),
        _record("r1", "SGD", 1, 10, 0.5),
        _record("r1", "SGD", 1, 20, np.nan),
        _record("r1", "SGD", 1, 30, 0.3),
        # Out of step order: the first step at the target is 20 (<= is inclusive).
        _record("r2", "HF", 0, 30, 0.01),
        _record("r2", "HF", 0, 10, 0.2),
        _record("r2", "HF", 0, 20, 0.1),
        # Retired as solved (by error) before the loss target: never reached.
        _record("r2", "HF", 1, 10, 0.4),
        _record("r2", "HF", 1, 20, 0.2, status="solved"),
        # Retired as solved on a record that reached the target.
        _record("r2", "HF", 2, 10, 0.4),
        _record("r2", "HF", 2, 20, 0.05, status="solved"),
    ]
    return pd.DataFrame(rows)


def _by_seed(frame: pd.DataFrame, column: str) -> dict:
    return {(r.run_id, r.seed): r[column] for _, r in frame.iterrows()}


def test_time_to_target_reads_the_first_record_at_the_target():
    frame = time_to_target(_records(), target=0.1)
    expected = {
        ("r1", 0): 19.0, ("r1", 1): np.inf, ("r2", 0): 19.0,
        ("r2", 1): np.inf, ("r2", 2): 19.0,
    }  # fmt: skip
    assert _by_seed(frame, "updates_to_target") == expected
    assert _by_seed(frame, "reached") == {
        k: np.isfinite(v) for k, v in expected.items()
    }
    assert len(frame) == 5


@pytest.mark.parametrize(
    ("cost", "value"), [("step", 20.0), ("grad_equivalents", 60.0), ("seconds", 2.0)]
)
def test_time_to_target_reports_each_cost(cost, value):
    frame = time_to_target(_records(), target=0.1, cost=cost)
    assert _by_seed(frame, f"{cost}_to_target")[("r1", 0)] == value
    assert _by_seed(frame, f"{cost}_to_target")[("r1", 1)] == np.inf


def test_time_to_target_keeps_configuration_not_measurements():
    frame = time_to_target(_records(), target=0.2, column="eval_error")
    assert {"task", "length", "optimizer"} <= set(frame.columns)
    for measured in ("eval_loss", "eval_error", "status", "step", "grad_norm_mean"):
        assert measured not in frame.columns
    assert dict(zip(frame.run_id, frame.optimizer, strict=True)) == {
        "r1": "SGD",
        "r2": "HF",
    }
    # eval_error = eval_loss / 2 <= 0.2 first at eval_loss 0.4 (r2 seeds 1, 2).
    assert _by_seed(frame, "updates_to_target")[("r2", 1)] == 9.0


def test_time_to_target_without_run_id_separates_optimizers():
    frame = time_to_target(_records().drop(columns="run_id"), target=0.1)
    got = {(r.optimizer, r.seed): r.updates_to_target for _, r in frame.iterrows()}
    assert got == {
        ("SGD", 0): 19.0, ("SGD", 1): np.inf, ("HF", 0): 19.0,
        ("HF", 1): np.inf, ("HF", 2): 19.0,
    }  # fmt: skip


def test_time_to_target_rejects_unknown_costs():
    with pytest.raises(ValueError, match="grad_equivalents"):
        time_to_target(_records(), 0.1, cost="flops")


def _summary() -> pd.DataFrame:
    rows = [
        ("A", 0, "solved", 10.0, 100.0),
        ("A", 1, "solved", 30.0, 300.0),
        ("A", 2, "solved", 20.0, 200.0),
        ("A", 3, "unsolved", np.nan, np.nan),
        ("B", 0, "diverged", np.nan, np.nan),
        ("B", 1, "unsolved", np.nan, np.nan),
    ]
    columns = ["optimizer", "seed", "status", "steps_to_solve"]
    columns += ["grad_equivalents_to_solve"]
    return pd.DataFrame(rows, columns=columns)


def test_interval_columns_per_group():
    summary = _summary()
    before = summary.copy()
    table = interval_columns(summary, ["optimizer"]).set_index("optimizer")
    pd.testing.assert_frame_equal(summary, before)
    assert list(table.index) == ["A", "B"]
    assert table.loc["A", ["seeds", "solved"]].tolist() == [4, 3]
    assert table.loc["A", "success_rate"] == 0.75
    ci = binomtest(3, 4).proportion_ci(method="wilson")
    assert table.loc["A", "success_lo"] == pytest.approx(ci.low, abs=1e-10)
    assert table.loc["A", "success_hi"] == pytest.approx(ci.high, abs=1e-10)
    assert table.loc["A", "median_steps"] == 20.0
    assert 10.0 <= table.loc["A", "steps_lo"] <= 20.0 <= table.loc["A", "steps_hi"]
    assert table.loc["A", "steps_hi"] <= 30.0
    assert table.loc["A", "median_grad_equiv"] == 200.0
    ci = binomtest(0, 2).proportion_ci(method="wilson")
    assert table.loc["B", "success_hi"] == pytest.approx(ci.high, abs=1e-10)
    assert table.loc["B", ["median_steps", "steps_lo", "steps_hi"]].isna().all()
    assert "median_seconds" not in table.columns


def test_interval_columns_of_no_groups_is_empty_with_columns():
    table = interval_columns(_summary().iloc[:0], ["optimizer"])
    assert table.empty
    assert {"success_lo", "steps_hi", "grad_equiv_lo"} <= set(table.columns)
