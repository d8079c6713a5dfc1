"""Statistics for the growth experiment and the (L0, L1) smoothness model.

Pascanu, Mikolov & Bengio (ICML 2013) argue that along an exploding direction the
curvature grows together with the gradient, so the Newton step ``||g|| / c`` stays
bounded (the discussion of their Fig. 6; docs/measurements.md). Two fits test this:

- growth rates: ``|q| ~ C exp(r x)`` with ``x`` the sequence length (or the spectral
  radius of ``W_rec``), fitted as the line ``log|q| = log C + r x``; equal rates for
  ``||g||`` and ``c`` mean a bounded Newton step;
- log-log slopes: ``log|c| = a + s log||g||``; ``s = 1`` is the same growth, ``s > 1``
  means curvature outgrows the gradient.

Measurements from one seed are not independent (same network, same trajectory), so
confidence intervals can come from a cluster bootstrap that resamples whole seeds.

The (L0, L1) smoothness model of Zhang, He, Sra & Jadbabaie (ICLR 2020, "Why gradient
clipping accelerates training") bounds the local smoothness by the gradient norm,
``||H|| <= L0 + L1 ||g||``; :func:`fit_smoothness` fits it along a trajectory.

This module is plain numpy/scipy/pandas (no JAX).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import optimize, stats

_NAN = float("nan")
TABLE_COLUMNS = [
    "kind", "quantity", "x", "slope", "slope_low", "slope_high", "intercept", "r2", "n",
]  # fmt: skip


class LineFit(NamedTuple):
    """Result of :func:`fit_line`: ``y = intercept + slope * x`` with intervals."""

    slope: float
    intercept: float
    slope_low: float  # confidence interval of the slope
    slope_high: float
    intercept_low: float
    intercept_high: float
    r2: float
    n: int  # points used (finite ones)


class SmoothnessFit(NamedTuple):
    """Result of :func:`fit_smoothness`: ``L ~ l0 + l1 ||g||``."""

    l0: float  # least-squares fit with l0, l1 >= 0
    l1: float
    l0_envelope: float  # smallest L0 >= 0 with L <= L0 + l1 ||g|| at every point
    r2: float
    n: int


def _nan_line(n: int) -> LineFit:
    return LineFit(_NAN, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, int(n))


def _cluster_bootstrap(
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    confidence: float,
    n_boot: int,
    seed: int,
) -> tuple[float, float, float, float]:
    """Percentile CI of (slope, intercept), resampling whole clusters with replacement.

    Each replicate draws ``G`` clusters out of ``G`` (multinomial counts ``k_g``) and
    refits OLS on the per-cluster sufficient statistics weighted by ``k_g``:
    ``b = (Sxy - Sx Sy / N) / (Sxx - Sx^2 / N)``, ``a = (Sy - b Sx) / N``. Replicates
    with no x-variance are dropped.
    """
    n_groups = int(codes.max()) + 1
    x_mean, y_mean = x.mean(), y.mean()
    xc, yc = x - x_mean, y - y_mean  # centred: less cancellation in the sums
    per_group = np.stack(
        [
            np.bincount(codes, weights=w, minlength=n_groups)
            for w in (np.ones_like(xc), xc, yc, xc * xc, xc * yc)
        ],
        axis=1,
    )  # [G, 5]: N, Sx, Sy, Sxx, Sxy
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), n_boot)
    s_n, s_x, s_y, s_xx, s_xy = (counts @ per_group).T
    sxx = s_xx - s_x**2 / s_n
    valid = sxx > 1e-12 * max(float(np.sum(xc * xc)), np.finfo(float).tiny)
    slope = (s_xy - s_x * s_y / s_n)[valid] / sxx[valid]
    intercept = (s_y[valid] - slope * s_x[valid]) / s_n[valid]
    intercept = intercept + y_mean - slope * x_mean  # back to the original x, y
    if slope.size < 2:
        return _NAN, _NAN, _NAN, _NAN
    tail = 50.0 * (1.0 - confidence)
    s_low, s_high = np.percentile(slope, [tail, 100.0 - tail])
    i_low, i_high = np.percentile(intercept, [tail, 100.0 - tail])
    return float(s_low), float(s_high), float(i_low), float(i_high)


def fit_line(
    x: ArrayLike,
    y: ArrayLike,
    confidence: float = 0.95,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> LineFit:
    """Ordinary least squares ``y = a + b x`` on the finite pairs, with intervals.

    ``b = Sxy / Sxx`` and ``a = ybar - b xbar`` (sums of centred products). Without
    ``groups`` the intervals are Student-t with ``n - 2`` degrees of freedom:
    ``b +- t se(b)``, ``se(b)^2 = s^2 / Sxx``, ``se(a)^2 = s^2 (1/n + xbar^2 / Sxx)``,
    ``s^2 = RSS / (n - 2)``. With ``groups`` (e.g. seed ids, same length as ``x``) the
    intervals are cluster-bootstrap percentiles, resampling whole groups (points from
    one seed are not independent), deterministic given ``seed``; points with a missing
    group are dropped, and with fewer than two groups the t interval is used.

    Args:
        x: Abscissae.
        y: Ordinates, same length.
        confidence: Coverage of the intervals.
        groups: Optional cluster label per point.
        n_boot: Bootstrap replicates (only with ``groups``).
        seed: Seed of the bootstrap generator.

    Returns:
        A :class:`LineFit`. Fewer than 3 finite points or no variance in ``x`` gives an
        all-NaN fit with ``n`` set (no exception).
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} != {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    codes = None
    if groups is not None:
        codes = pd.factorize(np.asarray(groups).ravel())[0]
        if codes.shape != x.shape:
            raise ValueError(f"groups has {codes.size} entries, x has {x.size}")
        keep &= codes >= 0
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 3:
        return _nan_line(n)
    x_mean, y_mean = x.mean(), y.mean()
    sxx = float(np.sum((x - x_mean) ** 2))
    if np.ptp(x) == 0.0:  # no x-variance: the slope is undefined
        return _nan_line(n)
    slope = float(np.sum((x - x_mean) * (y - y_mean)) / sxx)
    intercept = float(y_mean - slope * x_mean)
    rss = float(np.sum((y - intercept - slope * x) ** 2))
    tss = float(np.sum((y - y_mean) ** 2))
    r2 = 1.0 - rss / tss if tss > 0 else _NAN

    if codes is not None and np.unique(codes[keep]).size >= 2:
        codes = pd.factorize(codes[keep])[0]  # contiguous 0..G-1
        lows_highs = _cluster_bootstrap(x, y, codes, confidence, n_boot, seed)
    else:
        q = float(stats.t.ppf(0.5 + confidence / 2.0, n - 2))
        s2 = rss / (n - 2)
        half_b = q * np.sqrt(s2 / sxx)
        half_a = q * np.sqrt(s2 * (1.0 / n + x_mean**2 / sxx))
        lows_highs = (slope - half_b, slope + half_b)
        lows_highs += (intercept - half_a, intercept + half_a)
    slope_low, slope_high, intercept_low, intercept_high = map(float, lows_highs)
    return LineFit(
        slope, intercept, slope_low, slope_high, intercept_low, intercept_high, r2, n
    )


def _log_abs(values: ArrayLike) -> np.ndarray:
    """``log|v|``; zeros give ``-inf`` (dropped later as non-finite)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.abs(np.asarray(values, dtype=float)))


def growth_rate(x: ArrayLike, values: ArrayLike, **kw) -> LineFit:
    """Exponential growth rate ``r`` in ``|values| ~ C exp(r x)``.

    Fits ``log|values| = log C + r x`` with :func:`fit_line` (keywords such as
    ``groups`` and ``confidence`` pass through); zeros and non-finite values are
    dropped. ``r`` is per unit of ``x`` (per time step when ``x`` is the sequence
    length); the intercept is ``log C``. Pascanu et al. (2013) predict equal rates for
    the gradient norm and the curvature along the exploding direction.
    """
    return fit_line(x, _log_abs(values), **kw)


def loglog_slope(grad_norm: ArrayLike, curvature: ArrayLike, **kw) -> LineFit:
    """Slope ``s`` in ``log|c| = a + s log||g||`` (keywords pass to :func:`fit_line`).

    ``s = 1``: curvature and gradient grow at the same rate, so the Newton step
    ``||g|| / c`` stays bounded (Pascanu et al. 2013); ``s > 1``: curvature outgrows
    the gradient. For the Gauss-Newton curvature ``||Jv||^2`` against the gradient
    ``||Jv|| |r|`` one expects ``s`` near 2 when the residual stays bounded.
    """
    return fit_line(_log_abs(grad_norm), _log_abs(curvature), **kw)


def fit_smoothness(grad_norm: ArrayLike, smoothness: ArrayLike) -> SmoothnessFit:
    """Fit the (L0, L1) smoothness model ``||H|| <= L0 + L1 ||g||`` (Zhang et al. 2020).

    ``(l0, l1)`` minimise ``sum_i (L_i - l0 - l1 g_i)^2`` subject to ``l0, l1 >= 0``
    (``scipy.optimize.nnls``). The bound form of the model keeps ``l1`` and lifts the
    intercept: ``l0_envelope = max(0, max_i (L_i - l1 g_i))``, the smallest
    non-negative ``L0`` with every point under the line. It is at least ``l0`` (at an
    interior optimum the residuals sum to zero; on the boundary ``l0 = 0``).

    Args:
        grad_norm: Gradient norms ``g_i`` along a trajectory.
        smoothness: Local smoothness ``L_i`` (e.g. top Hessian eigenvalue magnitude).

    Returns:
        A :class:`SmoothnessFit`; non-finite points are dropped, and fewer than two
        points give NaNs with ``n`` set.
    """
    g = np.asarray(grad_norm, dtype=float).ravel()
    L = np.asarray(smoothness, dtype=float).ravel()
    if g.shape != L.shape:
        raise ValueError(f"grad_norm and smoothness differ: {g.size} != {L.size}")
    keep = np.isfinite(g) & np.isfinite(L)
    g, L = g[keep], L[keep]
    n = int(g.size)
    if n < 2:
        return SmoothnessFit(_NAN, _NAN, _NAN, _NAN, n)
    design = np.stack([np.ones_like(g), g], axis=1)
    (l0, l1), _ = optimize.nnls(design, L)
    rss = float(np.sum((L - l0 - l1 * g) ** 2))
    tss = float(np.sum((L - L.mean()) ** 2))
    r2 = 1.0 - rss / tss if tss > 0 else _NAN
    envelope = max(0.0, float(np.max(L - l1 * g)))
    return SmoothnessFit(float(l0), float(l1), envelope, r2, n)


def growth_table(
    frame: pd.DataFrame,
    x: str,
    quantities: list[str],
    by: list[str] | None = None,
    group: str | None = "seed",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Tidy table of growth fits, one row per (group of ``by``, kind, quantity).

    For every group of the ``by`` columns (``None`` or ``[]``: the whole frame) and
    every quantity ``q``: a row ``kind="rate"`` with ``growth_rate(frame[x],
    frame[q])``, and for every ``q`` other than ``"grad_norm"`` a row
    ``kind="loglog"`` with ``loglog_slope(frame["grad_norm"], frame[q])``.

    Args:
        frame: Tidy measurements (one row per probe).
        x: Column of the growth variable (sequence length, spectral radius).
        quantities: Columns to fit (e.g. ``grad_norm``, ``curv_hessian``, ``curv_gn``).
        by: Columns that split the frame (e.g. ``optimizer``, ``task``).
        group: Cluster column for bootstrap intervals (e.g. ``seed``); t intervals
            when ``None`` or absent from ``frame``.
        confidence: Coverage of the intervals.

    Returns:
        Columns ``*by, kind, quantity, x, slope, slope_low, slope_high, intercept, r2,
        n``; ``x`` holds the x column name, or ``"grad_norm"`` on loglog rows.
    """
    by = list(by or [])
    needed = [*by, x, *quantities]
    if any(q != "grad_norm" for q in quantities):
        needed.append("grad_norm")
    missing = sorted({c for c in needed if c not in frame.columns})
    if missing:
        raise KeyError(f"growth_table: columns {missing} not in the frame")
    use_groups = group is not None and group in frame.columns

    def row(key, kind, quantity, x_name, fit: LineFit) -> dict:
        return {
            **dict(zip(by, key, strict=True)),
            "kind": kind, "quantity": quantity, "x": x_name,
            "slope": fit.slope, "slope_low": fit.slope_low,
            "slope_high": fit.slope_high, "intercept": fit.intercept,
            "r2": fit.r2, "n": fit.n,
        }  # fmt: skip

    parts = frame.groupby(by, sort=True, dropna=False) if by else [((), frame)]
    rows = []
    for key, part in parts:
        kw = {"confidence": confidence}
        if use_groups:
            kw["groups"] = part[group].to_numpy()
        for q in quantities:
            fit = growth_rate(part[x].to_numpy(), part[q].to_numpy(), **kw)
            rows.append(row(key, "rate", q, x, fit))
        for q in quantities:
            if q != "grad_norm":
                g = part["grad_norm"].to_numpy()
                fit = loglog_slope(g, part[q].to_numpy(), **kw)
                rows.append(row(key, "loglog", q, "grad_norm", fit))
    return pd.DataFrame(rows, columns=[*by, *TABLE_COLUMNS])
