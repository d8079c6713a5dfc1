"""Curvature plots: curvature against gradient norm, growth with length, spectra.

Pascanu, Mikolov & Bengio (ICML 2013) argue that where the gradient explodes along
``u = g / ||g||`` the curvature ``c = u^T H u`` explodes with it; if both grow at the
same rate the Newton step ``||g|| / |c|`` stays bounded (slope 1 of ``log|c|`` against
``log||g||``). These figures show the measurements of :mod:`analysis.probes` (probes
along training runs) and :mod:`analysis.growth` (growth experiments), with the fits of
:mod:`analysis.fit` drawn on top:

- :func:`curvature_ratio`: ``|c|`` and the local smoothness against ``||g||``;
- :func:`ratio_vs_x`: the curvature ratio ``|c| / ||g||`` against length or radius;
- :func:`growth_plot`: ``||g||``, ``|c_H|`` and ``c_G`` against length or radius with
  the fitted exponential growth rates;
- :func:`spectrum_plot`: the Hessian spectral density (stochastic Lanczos quadrature)
  and the top eigenvalue along training (against updates, gradient-equivalents or
  seconds: :func:`probe_x` reads the work and time of a probe off the records).

Logarithms in fits are natural: a rate ``r`` means ``|q| ~ C exp(r x)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.fit import fit_smoothness, loglog_slope
from analysis.plots import (
    LABELS,
    SEED_KEYS,
    Palette,
    all_positive,
    band_text,
    check_x,
    curve_notes,
    finite,
    log_if_positive,
    new_figure,
    optimizer_palette,
    panel_groups,
    require_columns,
    seed_curves,
    seed_lines,
)

#: Curvature choices of :func:`curvature_ratio`: column and axis label.
CURVATURES = {
    "hessian": ("curv_hessian", r"$|u^\top H u|$, Hessian curvature along $u$"),
    "gauss_newton": ("curv_gn", r"$u^\top G u$, Gauss-Newton curvature along $u$"),
}
GRAD_LABEL = r"gradient norm $||g||$"
#: Growth quantities: column, legend name, colour.
GROWTH = (
    ("grad_norm", r"$||g||$", "C0"),
    ("curv_hessian", r"$|u^\top H u|$", "C3"),
    ("curv_gn", r"$u^\top G u$", "C2"),
)
RATIOS = {
    "ratio_hessian": r"Hessian $|u^\top H u| / ||g||$",
    "ratio_gn": r"Gauss-Newton $u^\top G u / ||g||$",
}
_PER = {"length": "per time step", "radius": r"per unit $\rho$"}


def _ci(fit, fmt: str = ".2f") -> str:
    if np.isfinite(fit.slope_low) and np.isfinite(fit.slope_high):
        return f"{fit.slope:{fmt}} [{fit.slope_low:{fmt}}, {fit.slope_high:{fmt}}]"
    return f"{fit.slope:{fmt}}"


def _clusters(frame: pd.DataFrame) -> np.ndarray:
    """One cluster per run and seed (probes of one seed are not independent)."""
    keys = [c for c in ("run_id", "seed") if c in frame.columns]
    return frame[keys].astype(str).agg("/".join, axis=1).to_numpy()


def curvature_ratio(
    probes: pd.DataFrame,
    curvature: str = "hessian",
    palette: Palette | None = None,
    confidence: float = 0.95,
) -> Figure:
    """Directional curvature (left) and local smoothness (right) against ``||g||``.

    Left, log-log: ``|c|`` per probe, explosion-triggered probes as large stars, the
    fitted line ``log|c| = a + s log||g||`` per optimizer (:func:`loglog_slope`,
    ``confidence`` interval by a bootstrap over seeds) and a dotted slope-1 reference:
    parallel to it the Newton step ``||g|| / |c|`` stays bounded. Right: the
    finite-difference smoothness with the fitted ``L0 + L1 ||g||`` per optimizer
    (:func:`fit_smoothness`, Zhang et al. 2020).

    Args:
        probes: Probe rows (:attr:`analysis.results.Results.probes`).
        curvature: ``"hessian"`` (``curv_hessian``) or ``"gauss_newton"``
            (``curv_gn``).
        palette: Optimizer colours.
        confidence: Coverage of the slope intervals.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {list(CURVATURES)}: {curvature!r}")
    column, label = CURVATURES[curvature]
    need = ["grad_norm", column, "smoothness", "kind", "optimizer", "seed"]
    require_columns(probes, need, "curvature_ratio")
    palette = palette or optimizer_palette(probes["optimizer"])
    data = finite(probes, ["grad_norm", column, "smoothness"])
    data["abs_curvature"] = data[column].abs()
    data = data[(data["grad_norm"] > 0) & (data["abs_curvature"] > 0)]
    fig, axes = new_figure(1, 2, width=5.4, height=4.4)
    left, right = axes[0]
    kinds = {"periodic": "o", "explosion": "*"}
    data = data.assign(kind=data["kind"].where(data["kind"].isin(kinds), "periodic"))
    for ax, y in ((left, "abs_curvature"), (right, "smoothness")):
        sns.scatterplot(
            data=data, x="grad_norm", y=y, hue="optimizer", hue_order=list(palette),
            palette=palette, style="kind", style_order=list(kinds), markers=kinds,
            size="kind", sizes={"periodic": 18, "explosion": 170}, alpha=0.7,
            edgecolor="black", linewidth=0.3, legend=False, ax=ax,
        )  # fmt: skip
    left_handles, right_handles = [], []
    for name in (n for n in palette if n in set(data["optimizer"])):
        rows = data[data["optimizer"] == name]
        g = rows["grad_norm"].to_numpy()
        grid = np.geomspace(g.min(), g.max(), 50)
        fit = loglog_slope(
            g, rows[column].to_numpy(), confidence=confidence, groups=_clusters(rows)
        )
        text = name
        if np.isfinite(fit.slope):
            left.plot(
                grid, np.exp(fit.intercept) * grid**fit.slope, color=palette[name]
            )
            text = f"{name}: slope {_ci(fit)}"
        left_handles.append(Line2D([], [], color=palette[name], label=text))
        smooth = fit_smoothness(g, rows["smoothness"].to_numpy())
        text = name
        if np.isfinite(smooth.l1):
            right.plot(grid, smooth.l0 + smooth.l1 * grid, color=palette[name])
            text = f"{name}: L0={smooth.l0:.3g}, L1={smooth.l1:.3g}"
        right_handles.append(Line2D([], [], color=palette[name], label=text))
    if len(data):
        g = np.geomspace(data["grad_norm"].min(), data["grad_norm"].max(), 50)
        scale = float(np.median(data["abs_curvature"] / data["grad_norm"]))
        left.plot(g, scale * g, color="0.3", ls=":", lw=1.5)
    if (data["kind"] == "explosion").any():
        star = Line2D([], [], color="0.4", marker="*", ms=12, mec="black", ls="")
        star.set_label("explosion probe (||g|| jumped above its running mean)")
        left_handles.append(star)
    left_handles.append(
        Line2D([], [], color="0.3", ls=":", label="slope 1: bounded Newton step")
    )
    left.set(xscale="log", xlabel=GRAD_LABEL, ylabel=label)
    left.set_title(f"{label.split(',')[0]} against $||g||$ (fit: {confidence:.0%} CI)")
    right.set(xlabel=GRAD_LABEL, ylabel="local smoothness L (finite difference)")
    right.set_title(r"(L0, L1) smoothness: $L \approx L_0 + L_1 ||g||$")
    log_if_positive(left, data["abs_curvature"])
    log_if_positive(right, data["grad_norm"], axis="x")
    if (data["smoothness"] > 0).any():
        right.set_yscale("log")  # zero (float-precision) smoothness is not drawn
    for ax, handles in ((left, left_handles), (right, right_handles)):
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    return fig


def _varying(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """Rows with a finite ``x``, from experiments in which ``x`` takes >1 value."""
    require_columns(rows, [x], "growth rows")
    rows = rows[np.isfinite(pd.to_numeric(rows[x], errors="coerce"))]
    if "experiment" in rows.columns:
        spread = rows.groupby("experiment")[x].transform("nunique")
        rows = rows[spread > 1]
    return rows


def ratio_vs_x(
    growth_rows: pd.DataFrame, x: str = "length", band: float = 100
) -> Figure:
    """Curvature ratio ``|c| / ||g||`` (Hessian and Gauss-Newton) against ``x``.

    One panel per experiment (without an ``experiment`` column: per task,
    initialization and parameter source); lines are medians over seeds
    and batches. A flat line means curvature and gradient grow at the same rate.
    """
    need = [x, "ratio_hessian", "ratio_gn", "seed"]
    require_columns(growth_rows, need, "ratio_vs_x")
    rows = finite(_varying(growth_rows, x), list(RATIOS))
    long = rows.melt(
        id_vars=[
            c for c in (x, "seed", "init", "source", "task", "experiment") if c in rows
        ],
        value_vars=list(RATIOS), var_name="curvature", value_name="ratio",
    )  # fmt: skip
    long["curvature"] = long["curvature"].map(RATIOS)
    long["ratio"] = long["ratio"].abs()
    colours = dict(zip(RATIOS.values(), ("C3", "C2"), strict=True))
    keys = ["experiment"] if "experiment" in long else ["task", "init", "source"]
    groups = panel_groups(long, keys)
    fig, axes = new_figure(1, len(groups))
    for ax, (title, part) in zip(axes[0], groups, strict=True):
        sns.lineplot(
            data=part, x=x, y="ratio", hue="curvature", palette=colours,
            estimator="median", errorbar=("pi", band), marker="o", ax=ax,
            legend=ax is axes[0, 0],
        )  # fmt: skip
        log_if_positive(ax, part["ratio"].dropna())
        ax.set(title=title, xlabel=LABELS.get(x, x))
        ax.set_ylabel(r"curvature ratio $|c| / ||g||$")
    fig.suptitle(f"Curvature ratio ({band_text(band, 'seeds and batches')})")
    return fig


def growth_plot(
    growth_rows: pd.DataFrame, fits: pd.DataFrame, x: str = "length"
) -> Figure:
    """``||g||``, ``|u^T H u|`` and ``u^T G u`` against ``x`` with fitted growth rates.

    Points are single measurements (seed and batch); lines are the rate fits of
    ``fits`` (rows with ``kind == "rate"``): ``|q| = exp(intercept + rate x)``. Equal
    rates for the gradient norm and the curvature mean a bounded Newton step.
    """
    need = [x, "seed", *(q for q, _, _ in GROWTH)]
    require_columns(growth_rows, need, "growth_plot")
    fit_cols = ["kind", "quantity", "x", "slope", "slope_low", "slope_high"]
    if not fits.empty:
        require_columns(fits, [*fit_cols, "intercept"], "growth_plot fits")
        # Radius sweeps are fitted against log(radius): a power law rho^p.
        fits = fits[(fits["kind"] == "rate") & fits["x"].isin([x, f"log_{x}"])]
    rows = finite(_varying(growth_rows, x), [q for q, _, _ in GROWTH])
    keys = [k for k in ("experiment", "init", "source") if k in rows.columns]
    groups = panel_groups(rows, keys)
    fig, axes = new_figure(1, len(groups), height=4.0)
    for ax, (title, part) in zip(axes[0], groups, strict=True):
        handles = []
        power = not fits.empty and (fits["x"] == f"log_{x}").any()
        space = np.geomspace if power else np.linspace
        grid = space(part[x].min(), part[x].max(), 50)
        for quantity, name, colour in GROWTH:
            sns.scatterplot(
                x=part[x], y=part[quantity].abs(), color=colour, s=10, alpha=0.35,
                linewidth=0, ax=ax,
            )  # fmt: skip
            label = name
            match = fits[fits["quantity"] == quantity] if not fits.empty else fits
            for key in keys:
                if not match.empty and key in match.columns:
                    match = match[match[key].astype(str) == str(part[key].iloc[0])]
            if not match.empty and np.isfinite(match["slope"].iloc[0]):
                fit = match.iloc[0]
                at = np.log(grid) if power else grid
                ax.plot(grid, np.exp(fit["intercept"] + fit["slope"] * at), c=colour)
                label = (
                    f"{name}: exponent {_ci(fit, '.3g')}"
                    if power
                    else f"{name}: rate {_ci(fit, '.3g')} {_PER.get(x, '')}"
                )
            handles.append(Line2D([], [], color=colour, marker="o", label=label))
        log_if_positive(ax, part["grad_norm"])
        if power:
            ax.set_xscale("log")
        ax.set(title=title, xlabel=LABELS.get(x, x))
        ax.set_ylabel("magnitude (log scale)")
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    kind = "power laws" if power else "exponential rates"
    fig.suptitle(f"Growth of gradient and curvature (lines: fitted {kind})")
    return fig


def _pad(lists: pd.Series) -> np.ndarray:
    """Ragged lists of floats to a ``[n, m]`` array, padded with NaN."""
    arrays = [
        np.asarray(v if isinstance(v, list | np.ndarray) else [], float) for v in lists
    ]
    width = max((a.size for a in arrays), default=0)
    out = np.full((len(arrays), width), np.nan)
    for i, a in enumerate(arrays):
        out[i, : a.size] = a
    return out


def _last_probes(rows: pd.DataFrame) -> pd.DataFrame:
    """The last periodic probe of every run and seed (any kind when none)."""
    periodic = rows[rows["kind"] == "periodic"] if "kind" in rows else rows
    rows = periodic if len(periodic) else rows
    keys = [c for c in ("run_id", "optimizer", "seed") if c in rows.columns]
    return rows.sort_values("step").groupby(keys, sort=False).tail(1)


def probe_x(probes: pd.DataFrame, records: pd.DataFrame, x: str) -> pd.Series:
    """The ``x`` (:data:`analysis.plots.X_AXES`) of every probe, from the records.

    ``step`` is the probe's own. Work and seconds are read off the same seed's
    records (matched on :data:`analysis.plots.SEED_KEYS`), interpolated linearly in
    the step between its evaluations from ``(step 0, x 0)``: a periodic probe falls
    on an evaluation, an explosion probe between two. NaN for a probe whose seed has
    no records.
    """
    check_x(x)
    if x == "step":
        return probes["step"].astype(float)
    require_columns(records, ["step", x, "seed"], "probe_x records")
    keys = [k for k in SEED_KEYS if k in probes.columns and k in records.columns]
    out = pd.Series(np.nan, index=probes.index, dtype=float)
    seeds = dict(list(records.sort_values("step").groupby(keys, sort=False)))
    for key, rows in probes.groupby(keys, sort=False):
        mine = seeds.get(key)
        if mine is None:
            continue
        steps = np.concatenate([[0.0], mine["step"].to_numpy(float)])
        work = np.concatenate([[0.0], pd.to_numeric(mine[x]).to_numpy(float)])
        out[rows.index] = np.interp(rows["step"].to_numpy(float), steps, work)
    return out


def _mark_solved(probes: pd.DataFrame, records: pd.DataFrame | None) -> pd.DataFrame:
    """``probes`` with ``status = "solved"`` for the seeds the records saw solved."""
    if records is None or "status" not in records.columns or probes.empty:
        return probes
    keys = [k for k in SEED_KEYS if k in probes.columns and k in records.columns]
    solved = records.loc[records["status"] == "solved", keys].drop_duplicates()
    marked = probes.drop(columns="status", errors="ignore").merge(
        solved.assign(status="solved"), on=keys, how="left"
    )
    marked.index = probes.index
    return marked


def spectrum_plot(
    probes: pd.DataFrame,
    palette: Palette | None = None,
    band: float = 100,
    grid_size: int = 400,
    floor: float = 1e-6,
    records: pd.DataFrame | None = None,
    x: str = "step",
) -> Figure:
    """Hessian spectral density at the end of training and top eigenvalue along it.

    Left: the one-probe stochastic Lanczos quadrature densities (Ritz values and
    weights) of the last probe of every seed, averaged over seeds, one line per
    optimizer. They are Gaussian-broadened (:func:`optimizers.curvature.
    spectral_density`) in ``t = asinh(lambda / c)``, ``c = 1e-3 max |lambda|``, so
    that outliers and bulk get the same relative resolution on the symlog axis;
    log density with a floor of ``floor`` times the peak.
    Right: the top Hessian eigenvalue of the periodic probes against ``x``
    (update step, or with ``records``: gradient-equivalents or seconds,
    :func:`probe_x`), seeds on a common grid (:func:`analysis.plots.seed_curves`);
    with ``records``, seeds solved there are carried forward at their last probe.
    One row per task configuration.
    """
    check_x(x)
    need = ["ritz_values", "ritz_weights", "top_eigenvalue", "step", "seed"]
    require_columns(probes, [*need, "optimizer"], "spectrum_plot")
    if x != "step" and records is None:
        raise ValueError(f"spectrum_plot: x={x!r} needs the records")
    from optimizers.curvature import spectral_density  # deferred: imports JAX

    palette = palette or optimizer_palette(probes["optimizer"])
    probes = _mark_solved(probes, records)
    probes = probes.assign(_x=probe_x(probes, records, x))
    groups = panel_groups(probes)
    fig, axes = new_figure(len(groups), 2, width=5.2, height=3.8)
    drawn = []
    for (title, rows), (left, right) in zip(groups, axes, strict=True):
        last = _last_probes(rows)
        theta, weights = _pad(last["ritz_values"]), _pad(last["ritz_weights"])
        valid = np.isfinite(theta) & np.isfinite(weights)
        top = float(np.abs(theta[valid]).max()) if valid.any() else 0.0
        if top > 0:
            # Broaden in t = asinh(lambda / c): a constant relative width for the
            # outliers and the bulk alike, matching the symlog axis.
            c = 1e-3 * top
            t = np.arcsinh(np.where(valid, theta, 0.0) / c)
            weights = np.where(valid, weights, 0.0)
            span = float(np.ptp(t[valid])) or 1.0
            sigma = max(0.01 * span, 0.05)
            t_grid = np.linspace(t[valid].min() - 3 * sigma, t[valid].max() + 3 * sigma,
                                 grid_size)  # fmt: skip
            for name in (n for n in palette if n in set(last["optimizer"])):
                mine = (last["optimizer"] == name).to_numpy()
                density = np.asarray(
                    spectral_density(t[mine], weights[mine], t_grid, sigma)
                )
                density = np.maximum(density, floor * max(density.max(), 1e-300))
                left.plot(c * np.sinh(t_grid), density, color=palette[name], label=name)
            left.set_xscale("symlog", linthresh=c, linscale=1.0)
            left.set_yscale("log")
        left.set(title=title, xlabel=r"Hessian eigenvalue $\lambda$ (symlog)")
        left.set_ylabel(r"density of asinh($\lambda/c$) (SLQ, log)")
        track = rows[rows["kind"] == "periodic"] if "kind" in rows else rows
        track = finite(track if len(track) else rows, ["top_eigenvalue"])
        log = ["top_eigenvalue"] if all_positive(track["top_eigenvalue"]) else []
        curves = seed_curves(track, "_x", ["top_eigenvalue"], log=log)
        drawn.append(curves)
        seed_lines(right, curves, "top_eigenvalue", palette, band,
                    marker="o" if x == "step" else None, ms=4)  # fmt: skip
        if log:
            right.set_yscale("log")
        right.set(title=band_text(band), xlabel=LABELS[x])
        right.set_ylabel(r"top Hessian eigenvalue $\lambda_{max}$")
    names = [n for n in palette if n in set(probes["optimizer"])]
    fig.legend(
        handles=[Line2D([], [], color=palette[n], label=n) for n in names],
        title="optimizer", loc="outside center right",
    )  # fmt: skip
    notes = "; ".join(curve_notes(x, drawn))
    fig.suptitle(
        "Hessian spectrum (last probe of each seed) and top eigenvalue against "
        f"{LABELS[x]}" + (f"\n({notes})" if notes else "")
    )
    return fig
