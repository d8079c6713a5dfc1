"""Growth-rate, log-log and (L0, L1) smoothness fits (analysis/fit.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.fit import (
    LineFit,
    fit_line,
    fit_smoothness,
    growth_rate,
    growth_table,
    loglog_slope,
)

# ---------------------------------------------------------------------------- fit_line


def test_fit_line_noiseless_is_exact():
    x = np.linspace(-3.0, 7.0, 25)
    fit = fit_line(x, 1.5 - 2.25 * x)
    assert fit.slope == pytest.approx(-2.25, abs=1e-12)
    assert fit.intercept == pytest.approx(1.5, abs=1e-12)
    assert fit.slope_low == pytest.approx(-2.25, abs=1e-9)
    assert fit.slope_high == pytest.approx(-2.25, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.n == 25


def test_fit_line_matches_scipy_linregress():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 10.0, 40)
    y = 0.3 + 1.7 * x + rng.normal(0.0, 2.0, x.size)
    fit = fit_line(x, y, confidence=0.9)
    ref = stats.linregress(x, y)
    q = stats.t.ppf(0.95, x.size - 2)
    assert fit.slope == pytest.approx(ref.slope, rel=1e-12)
    assert fit.intercept == pytest.approx(ref.intercept, rel=1e-12)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-12)
    assert fit.slope_low == pytest.approx(ref.slope - q * ref.stderr, rel=1e-10)
    assert fit.slope_high == pytest.approx(ref.slope + q * ref.stderr, rel=1e-10)
    half_a = q * ref.intercept_stderr
    assert fit.intercept_low == pytest.approx(ref.intercept - half_a, rel=1e-10)
    assert fit.intercept_high == pytest.approx(ref.intercept + half_a, rel=1e-10)


def test_t_interval_coverage():
    """The 95% t interval covers the true slope in about 95% of 400 datasets."""
    rng = np.random.default_rng(2)
    x = np.linspace(0.0, 5.0, 15)
    covered = 0
    for _ in range(400):
        y = -1.0 + 0.7 * x + rng.normal(0.0, 1.0, x.size)
        fit = fit_line(x, y)
        covered += fit.slope_low <= 0.7 <= fit.slope_high
    assert 0.9 <= covered / 400 <= 0.99


def test_fit_line_drops_non_finite_pairs():
    x = np.arange(10.0)
    y = 2.0 + 3.0 * x
    x[2], y[5], y[7] = np.nan, np.inf, -np.inf
    fit = fit_line(x, y)
    assert fit.n == 7
    assert fit.slope == pytest.approx(3.0) and fit.intercept == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([1.0, 2.0], [1.0, 3.0]),  # two points
        ([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]),  # no x-variance
        ([np.nan, 1.0, 2.0, np.inf], [1.0, 2.0, 3.0, 4.0]),  # two finite pairs
        ([], []),
    ],
)
def test_degenerate_input_gives_nans(x, y):
    expected_n = int(np.sum(np.isfinite(x) & np.isfinite(y)))
    for fit in (fit_line(x, y), fit_line(x, y, groups=np.arange(len(x)))):
        assert isinstance(fit, LineFit)
        assert fit.n == expected_n
        assert all(np.isnan(v) for v in fit[:-1])


# ---------------------------------------------------------------- cluster bootstrap


def _random_slopes(rng, n_groups=12, per_group=100, slope=0.5):
    """Each group (seed) has its own slope ``slope + N(0, 0.3^2)``."""
    x = np.tile(np.linspace(0.0, 4.0, per_group), n_groups)
    groups = np.repeat(np.arange(n_groups), per_group)
    group_slope = slope + rng.normal(0.0, 0.3, n_groups)
    group_shift = rng.normal(0.0, 0.2, n_groups)
    y = 1.0 + group_shift[groups] + group_slope[groups] * x
    return x, y + rng.normal(0.0, 0.1, x.size), groups


def test_cluster_bootstrap_is_wider_and_covers():
    rng = np.random.default_rng(3)
    naive_cover = boot_cover = wider = 0
    n_sims = 60
    for _ in range(n_sims):
        x, y, groups = _random_slopes(rng)
        naive = fit_line(x, y)
        boot = fit_line(x, y, groups=groups, n_boot=400, seed=1)
        assert boot.slope == naive.slope  # the point estimate is plain OLS
        naive_cover += naive.slope_low <= 0.5 <= naive.slope_high
        boot_cover += boot.slope_low <= 0.5 <= boot.slope_high
        wider += (boot.slope_high - boot.slope_low) > 2 * (
            naive.slope_high - naive.slope_low
        )
    assert wider == n_sims
    assert boot_cover / n_sims >= 0.8  # percentile bootstrap, 12 clusters
    assert naive_cover / n_sims < 0.5  # independent-points interval is far too narrow


def test_cluster_bootstrap_is_deterministic_given_seed():
    x, y, groups = _random_slopes(np.random.default_rng(4))
    labels = np.array([f"seed{g}" for g in groups])  # any hashable label works
    a = fit_line(x, y, groups=labels, seed=7)
    b = fit_line(x, y, groups=labels, seed=7)
    c = fit_line(x, y, groups=labels, seed=8)
    assert a == b
    assert a.slope_low != c.slope_low
    assert a.intercept_low < a.intercept < a.intercept_high


def test_single_group_falls_back_to_t_interval():
    rng = np.random.default_rng(5)
    x = np.linspace(0.0, 1.0, 20)
    y = x + rng.normal(0.0, 0.1, x.size)
    assert fit_line(x, y, groups=np.zeros(x.size)) == fit_line(x, y)


# ------------------------------------------------------------------- growth_rate


@pytest.mark.parametrize("rate", [0.3, -0.05])
def test_growth_rate_recovers_known_rate(rate):
    rng = np.random.default_rng(6)
    lengths = np.arange(10, 101, 10, dtype=float)
    n_seeds, n_batches = 8, 16
    x = np.repeat(lengths, n_seeds * n_batches)
    seeds = np.tile(np.repeat(np.arange(n_seeds), n_batches), lengths.size)
    values = 2.5 * np.exp(rate * x) * rng.lognormal(0.0, 0.5, x.size)
    values *= rng.choice([-1.0, 1.0], x.size)  # the sign is ignored (abs)
    for kw in ({}, {"groups": seeds}):
        fit = growth_rate(x, values, **kw)
        assert abs(fit.slope - rate) < 2e-3
        assert fit.slope_low <= rate <= fit.slope_high
        assert fit.intercept == pytest.approx(np.log(2.5), abs=0.15)
        assert fit.n == x.size


def test_growth_rate_drops_zeros_and_non_finite():
    x = np.arange(1.0, 11.0)
    values = 3.0 * np.exp(0.2 * x)
    values[[1, 4]] = 0.0
    values[7] = np.nan
    fit = growth_rate(x, values)
    assert fit.n == 7
    assert fit.slope == pytest.approx(0.2, abs=1e-12)
    assert np.isnan(growth_rate(x, np.zeros_like(x)).slope)


# ------------------------------------------------------------------ loglog_slope


@pytest.mark.parametrize(("power", "scale"), [(1.0, 3.0), (2.0, 1.0), (1.5, 0.2)])
def test_loglog_slope_of_power_law(power, scale):
    g = np.logspace(0.0, 4.0, 30)
    fit = loglog_slope(g, scale * g**power)
    assert fit.slope == pytest.approx(power, abs=1e-12)
    assert fit.intercept == pytest.approx(np.log(scale), abs=1e-10)
    # Negative curvature (e.g. u^T H u < 0) is taken in absolute value.
    assert loglog_slope(g, -scale * g**power).slope == pytest.approx(power, abs=1e-12)


# ---------------------------------------------------------------- fit_smoothness


def test_fit_smoothness_recovers_l0_l1_and_envelope():
    rng = np.random.default_rng(8)
    g = rng.uniform(0.0, 10.0, 300)
    L = 2.0 + 5.0 * g + rng.uniform(0.0, 0.2, g.size)  # noise >= 0, mean 0.1
    fit = fit_smoothness(g, L)
    assert fit.l0 == pytest.approx(2.1, abs=0.05)
    assert fit.l1 == pytest.approx(5.0, abs=0.01)
    # Interior optimum: the constrained fit is the unconstrained least squares line.
    l1_ref, l0_ref = np.polyfit(g, L, 1)
    assert (fit.l0, fit.l1) == pytest.approx((l0_ref, l1_ref), rel=1e-9)
    assert np.all(fit.l0_envelope + fit.l1 * g + 1e-12 >= L)
    assert np.min(fit.l0_envelope + fit.l1 * g - L) == pytest.approx(0.0, abs=1e-12)
    assert fit.l0 <= fit.l0_envelope <= 2.0 + 0.2 + 0.05
    assert 0.99 < fit.r2 <= 1.0
    assert fit.n == g.size


def test_fit_smoothness_respects_nonnegativity():
    """``L = 5 g - 1`` would need ``L0 < 0``; the fit is the line through the origin."""
    g = np.linspace(1.0, 4.0, 20)
    L = 5.0 * g - 1.0
    fit = fit_smoothness(g, L)
    assert fit.l0 == 0.0
    assert fit.l1 == pytest.approx(np.dot(g, L) / np.dot(g, g), rel=1e-10)
    assert fit.l0_envelope >= fit.l0
    assert np.all(fit.l0_envelope + fit.l1 * g + 1e-12 >= L)


def test_fit_smoothness_nan_handling():
    g = np.array([1.0, 2.0, np.nan, 3.0, 4.0, np.inf])
    L = np.array([3.0, 5.0, 1.0, np.nan, 9.0, 2.0])
    fit = fit_smoothness(g, L)
    assert fit.n == 3
    ref = fit_smoothness([1.0, 2.0, 4.0], [3.0, 5.0, 9.0])
    assert fit == ref
    assert (fit.l0, fit.l1) == pytest.approx((1.0, 2.0))
    one = fit_smoothness([1.0, np.nan], [2.0, 3.0])
    assert one.n == 1 and all(np.isnan(v) for v in one[:-1])


# ------------------------------------------------------------------ growth_table


def _frame(rng):
    rows = []
    for opt, rate in [("sgd", 0.2), ("hf", 0.1)]:
        for seed in range(3):
            for length in (10, 20, 40, 80):
                for _ in range(4):
                    g = np.exp(rate * length + rng.normal(0, 0.2))
                    rows.append(
                        {
                            "optimizer": opt, "seed": seed, "seq_len": length,
                            "grad_norm": g, "curv_hessian": -2.0 * g,
                            "curv_gn": g**2 * np.exp(rng.normal(0, 0.1)),
                        }
                    )  # fmt: skip
    return pd.DataFrame(rows)


QUANTITIES = ["grad_norm", "curv_hessian", "curv_gn"]


def test_growth_table_rows_and_values():
    frame = _frame(np.random.default_rng(9))
    table = growth_table(frame, "seq_len", QUANTITIES, by=["optimizer"])
    assert list(table.columns) == [
        "optimizer", "kind", "quantity", "x", "slope", "slope_low", "slope_high",
        "intercept", "r2", "n",
    ]  # fmt: skip
    assert len(table) == 2 * (3 + 2)
    counts = table.groupby(["optimizer", "kind"]).size()
    assert counts.loc[("sgd", "rate")] == 3 and counts.loc[("hf", "loglog")] == 2
    assert set(table.loc[table.kind == "loglog", "x"]) == {"grad_norm"}
    assert set(table.loc[table.kind == "rate", "x"]) == {"seq_len"}
    for _, row in table.iterrows():
        part = frame[frame.optimizer == row.optimizer]
        if row.kind == "rate":
            ref = growth_rate(part.seq_len, part[row.quantity], groups=part.seed)
        else:
            ref = loglog_slope(part.grad_norm, part[row.quantity], groups=part.seed)
        assert row.slope == ref.slope and row.intercept == ref.intercept
        assert (row.slope_low, row.slope_high) == (ref.slope_low, ref.slope_high)
        assert row.r2 == ref.r2 and row.n == ref.n == 48
    # The rates and slopes themselves (independent truth from the generator).
    sgd = table[table.optimizer == "sgd"].set_index(["kind", "quantity"])
    assert sgd.loc[("rate", "grad_norm"), "slope"] == pytest.approx(0.2, abs=0.01)
    assert sgd.loc[("loglog", "curv_hessian"), "slope"] == pytest.approx(1.0)
    assert sgd.loc[("loglog", "curv_gn"), "slope"] == pytest.approx(2.0, abs=0.02)


def test_growth_table_without_groups_uses_t_intervals():
    frame = _frame(np.random.default_rng(10))
    for table in (
        growth_table(frame, "seq_len", QUANTITIES, group=None),
        growth_table(frame.drop(columns="seed"), "seq_len", QUANTITIES, by=[]),
    ):
        assert list(table.kind) == ["rate"] * 3 + ["loglog"] * 2
        ref = growth_rate(frame.seq_len, frame.curv_gn)
        row = table[(table.kind == "rate") & (table.quantity == "curv_gn")].iloc[0]
        assert (row.slope_low, row.slope_high) == (ref.slope_low, ref.slope_high)
        assert row.n == len(frame)


def test_growth_table_missing_column():
    frame = _frame(np.random.default_rng(11)).drop(columns="grad_norm")
    with pytest.raises(KeyError, match="grad_norm"):
        growth_table(frame, "seq_len", ["curv_gn"])
