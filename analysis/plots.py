"""Training plots: loss curves, gradient and spectral-radius traces, success, wall.

Every function takes tidy pandas frames (one row per run, seed and step, as read by
:mod:`analysis.results`) and returns a :class:`matplotlib.figure.Figure` drawn on
the Agg canvas, so plotting never needs a display. Colours follow
:func:`optimizer_palette`: one colour per optimizer label, the same in every figure
drawn with the same palette.

Seed bands: lines are the median over seeds and the shaded band covers the middle
``band`` percent of seeds (100: minimum to maximum), the percentiles
``50 -/+ band / 2`` (seaborn's ``errorbar=("pi", band)``).

Curves over training (:func:`training_curves`, :func:`traces`) can be drawn against
update steps, gradient-equivalents or training seconds (``x``, one of
:data:`X_AXES`). Seeds are first put on a common grid (:func:`seed_curves`), one
per optimizer and panel: the distinct ``x`` values of its records when there are at
most ``n`` of them (on the update axis, the evaluation steps every seed shares), else
``n`` evenly spaced values from the smallest to the largest; ``n`` is
:data:`GRID_POINTS`, or the number of evaluations of the longest seed if larger. Each
seed is interpolated linearly between its own evaluations (in log space
for the quantities drawn on a log scale) and has no value outside them; medians and
bands are taken over the seeds that have a value at each grid point. A solved seed is
retired and has no records after the evaluation that solved it: it is carried
forward at its final values to the end of its optimizer's range in the panel, so the
median does not jump when it leaves (its parameters no longer change).

References: Pascanu, Mikolov & Bengio (ICML 2013), Fig. 6 (the single-unit wall) and
Fig. 7 (success rate against sequence length).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

Palette = dict[str, tuple[float, float, float]]

#: Axis labels of the quantities found in records and probes.
LABELS = {
    "step": "update step",
    "grad_equivalents": "work (gradient-equivalents)",
    "seconds": "training seconds",
    "loss": "training loss (minibatch)",
    "eval_loss": "evaluation loss (fresh sequences)",
    "eval_error": "evaluation error (fraction of sequences wrong)",
    "grad_norm_mean": "gradient norm ||g|| (mean over chunk)",
    "spectral_radius": r"spectral radius $\rho(W_{rec})$",
    "length": "sequence length T",
    "radius": r"spectral radius $\rho(W_{rec})$ at initialization",
}
#: Columns that name one task configuration (one panel).
PANEL_KEYS = ("task", "length", "init")
#: Horizontal axes of curves over training: update step, work, training seconds.
X_AXES = ("step", "grad_equivalents", "seconds")
#: Grid size of :func:`seed_curves` when the seeds' ``x`` values are more distinct.
GRID_POINTS = 60
#: Columns that identify one seed's curve, where present.
SEED_KEYS = ("run_id", "optimizer", "seed")
#: Line dashes of initializations in :func:`success_vs_length` ("": solid).
_DASHES = ("", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1), (2, 2), (6, 2))
_TITLE_PREFIX = {"length": "length ", "radius": "radius ", "source": "params: "}


def optimizer_palette(labels: Iterable[str]) -> Palette:
    """One colour per optimizer label: sorted labels take the colour-blind palette.

    The mapping depends only on the set of labels, so figures drawn from the same
    results directory (the report passes all its labels) share colours.
    """
    names = sorted({str(label) for label in labels})
    if len(names) <= 10:
        colours = sns.color_palette("colorblind", 10)[: len(names)]
    else:
        colours = sns.color_palette("husl", len(names))
    return dict(zip(names, colours, strict=True))


def require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` naming the columns of ``columns`` missing from ``frame``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing} in the data frame")


def new_figure(
    nrows: int, ncols: int, width: float = 4.8, height: float = 3.4
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure on the Agg canvas and its ``[nrows, ncols]`` axes."""
    size = (max(width * ncols + 2.4, 8.0), height * nrows + 0.4)
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def panel_groups(
    frame: pd.DataFrame, keys: Sequence[str] = PANEL_KEYS
) -> list[tuple[str, pd.DataFrame]]:
    """Split ``frame`` by the ``keys`` columns it has: ``[(title, rows), ...]``."""
    keys = [k for k in keys if k in frame.columns]
    if not keys:
        return [("", frame)]
    parts = []
    for values, rows in frame.groupby(keys, sort=True, dropna=False):
        named = [
            f"{_TITLE_PREFIX.get(key, '')}{value}"
            for key, value in zip(keys, values, strict=True)
            if not pd.isna(value)
        ]
        parts.append((", ".join(named), rows))
    return parts


def panel_grid(n: int, max_cols: int = 3) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` panels on a grid; unused axes are hidden."""
    ncols = min(n, max_cols)
    nrows = -(-n // ncols)
    fig, axes = new_figure(nrows, ncols)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def optimizer_legend(
    fig: Figure,
    palette: Palette,
    labels: Iterable[str],
    title: str = "optimizer",
    extra: Sequence[Line2D] = (),
) -> None:
    """A figure legend with one line per optimizer in ``labels`` plus ``extra``."""
    shown = [name for name in palette if name in set(map(str, labels))]
    handles = [Line2D([], [], color=palette[name], lw=2, label=name) for name in shown]
    fig.legend(handles=[*handles, *extra], title=title, loc="outside center right")


def band_text(band: float, over: str = "seeds") -> str:
    """Description of a band of ``band`` percent around a median over ``over``."""
    if band >= 100:
        return f"median over {over}, band: min-max"
    return f"median over {over}, band: middle {band:g}%"


def finite(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """A copy of ``frame`` with infinities in ``columns`` turned into NaN."""
    frame = frame.copy()
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        frame[col] = values.where(np.isfinite(values))
    return frame


def log_if_positive(ax: Axes, values: pd.Series, axis: str = "y") -> None:
    """Log scale on ``axis`` when every finite value is positive."""
    values = values[np.isfinite(values)]
    if len(values) and (values > 0).all():
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def check_x(x: str) -> None:
    """Raise ``ValueError`` unless ``x`` is one of :data:`X_AXES`."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {list(X_AXES)}: {x!r}")


def common_grid(values: np.ndarray, points: int = GRID_POINTS) -> np.ndarray:
    """The grid of :func:`seed_curves`: the distinct finite ``values`` when there are
    at most ``points`` of them, else ``points`` evenly spaced from min to max."""
    values = np.unique(values[np.isfinite(values)])
    if len(values) <= points:
        return values
    return np.linspace(values[0], values[-1], points)


def _on_grid(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, log: bool):
    """``ys`` at ``xs`` interpolated onto ``grid``, NaN outside ``[xs[0], xs[-1]]``."""
    out = np.full(len(grid), np.nan)
    inside = (grid >= xs[0]) & (grid <= xs[-1])
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            ys = np.log(np.where(ys > 0, ys, np.nan))
    out[inside] = np.interp(grid[inside], xs, ys)
    return np.exp(out) if log else out


def _is_solved(rows: pd.DataFrame) -> bool:
    return "status" in rows.columns and bool((rows["status"] == "solved").any())


def seed_curves(
    rows: pd.DataFrame,
    x: str,
    ys: Sequence[str],
    log: Iterable[str] = (),
    carry: bool = True,
    points: int = GRID_POINTS,
) -> pd.DataFrame:
    """Every seed's ``ys`` on one common ``x`` grid per optimizer.

    Rows of one seed (:data:`SEED_KEYS`) are sorted by ``x``; rows without a finite
    ``x`` are dropped. With ``carry``, a seed with a ``status`` of ``"solved"`` gets
    its last row repeated at the optimizer's largest ``x``, so it keeps its final
    values to the end of the curve. The grid is :func:`common_grid` of the
    optimizer's ``x`` values (carried points included) with ``points`` points or,
    if more, as many as the longest seed has: never coarser than one seed's own
    evaluations, and exact where the seeds share their ``x``. Each seed is
    interpolated linearly between its own points (columns in ``log``: linearly in
    ``log y``, NaN where ``y <= 0``) and is NaN outside them.

    Returns:
        Columns ``optimizer``, ``curve`` (the seed's key as text), ``x``, ``carried``
        (True past a solved seed's last evaluation) and ``ys``.
    """
    log = set(log)
    keys = [k for k in SEED_KEYS if k in rows.columns]
    values = pd.to_numeric(rows[x], errors="coerce")
    rows = rows[np.isfinite(values)].sort_values(x, kind="stable")
    parts = []
    for name, group in rows.groupby("optimizer", sort=True):
        end = float(group[x].max())
        seeds = []
        for key, seed_rows in group.groupby(keys, sort=True):
            xs = seed_rows[x].to_numpy(float)
            table = {y: seed_rows[y].to_numpy(float) for y in ys}
            last = np.inf  # carried past here (never, unless solved)
            if carry and _is_solved(seed_rows) and xs[-1] < end:
                last = xs[-1]
                xs = np.append(xs, end)
                table = {y: np.append(v, v[-1]) for y, v in table.items()}
            seeds.append(("/".join(map(str, key)), xs, table, last))
        size = max(points, *(len(xs) for _, xs, _, _ in seeds))
        grid = common_grid(np.concatenate([xs for _, xs, _, _ in seeds]), size)
        for curve, xs, table, last in seeds:
            frame = {"optimizer": name, "curve": curve, "x": grid}
            frame["carried"] = grid > last
            for y, v in table.items():
                frame[y] = _on_grid(xs, v, grid, y in log)
            parts.append(pd.DataFrame(frame))
    if not parts:
        return pd.DataFrame(columns=["optimizer", "curve", "x", "carried", *ys])
    return pd.concat(parts, ignore_index=True)


def median_band(curves: pd.DataFrame, y: str, band: float = 100) -> pd.DataFrame:
    """Median of ``y`` over seeds at every grid point of :func:`seed_curves`.

    Returns columns ``optimizer``, ``x``, ``median``, ``low`` and ``high`` (the
    ``50 -/+ band / 2`` percentiles, linear interpolation between order statistics)
    and ``seeds`` (how many seeds have a value there); grid points where no seed has
    a value are left out.
    """
    data = curves.dropna(subset=[y])
    grouped = data.groupby(["optimizer", "x"], sort=True)[y]
    half = min(band, 100) / 2
    stats = grouped.agg(
        median="median",
        low=lambda v: np.percentile(v, 50 - half),
        high=lambda v: np.percentile(v, 50 + half),
        seeds="size",
    )
    return stats.reset_index()


def seed_lines(
    ax: Axes,
    curves: pd.DataFrame,
    y: str,
    palette: Palette,
    band: float | None,
    **kw,
) -> None:
    """The median line (and band unless ``band`` is None) of each optimizer."""
    stats = median_band(curves, y, 100 if band is None else band)
    for name in palette:
        mine = stats[stats["optimizer"] == name]
        if mine.empty:
            continue
        ax.plot(mine["x"], mine["median"], color=palette[name], **kw)
        if band is not None:
            ax.fill_between(
                mine["x"], mine["low"], mine["high"], color=palette[name], alpha=0.2,
                lw=0,
            )  # fmt: skip


def all_positive(values: pd.Series) -> bool:
    """Whether ``values`` has a finite value and every finite value is positive."""
    values = pd.to_numeric(values, errors="coerce")
    values = values[np.isfinite(values)]
    return bool(len(values)) and bool((values > 0).all())


def curve_notes(x: str, curves: Iterable[pd.DataFrame]) -> list[str]:
    """Caption notes on :func:`seed_curves`: the grid of a work or time axis, and
    whether solved seeds were carried forward."""
    notes = [] if x == "step" else ["seeds interpolated onto a common grid"]
    if any(c["carried"].any() for c in curves):
        notes.append("solved seeds carried forward at their final values")
    return notes


def training_curves(
    records: pd.DataFrame,
    y: str = "eval_loss",
    palette: Palette | None = None,
    band: float = 100,
    x: str = "step",
) -> Figure:
    """``y`` against ``x``, one panel per task configuration, hue optimizer.

    Seeds are put on a common grid and solved seeds carried forward at their final
    values (:func:`seed_curves`), then the median and band are drawn.

    Args:
        records: Tidy records (:attr:`analysis.results.Results.records`).
        y: Column to plot (``eval_loss``, ``eval_error``, ``loss``, ...). Loss columns
            go on a log scale when positive.
        palette: Optimizer colours (default: :func:`optimizer_palette` of the data).
        band: Percent of seeds covered by the band around the median line.
        x: ``step`` (updates), ``grad_equivalents`` (work) or ``seconds``.

    Returns:
        The figure.
    """
    check_x(x)
    require_columns(records, [x, y, "optimizer", "seed"], "training_curves")
    palette = palette or optimizer_palette(records["optimizer"])
    records = finite(records, [y])
    groups = panel_groups(records)
    fig, axes = panel_grid(len(groups))
    drawn = []
    for ax, (title, rows) in zip(axes, groups, strict=True):
        log = "loss" in y and all_positive(rows[y])
        curves = seed_curves(rows, x, [y], log=[y] if log else [])
        drawn.append(curves)
        seed_lines(ax, curves, y, palette, band)
        ax.set(title=title, xlabel=LABELS[x], ylabel=LABELS.get(y, y))
        if log:
            ax.set_yscale("log")
    notes = "; ".join([band_text(band), *curve_notes(x, drawn)])
    fig.suptitle(f"{LABELS.get(y, y)} against {LABELS[x]}\n({notes})")
    optimizer_legend(fig, palette, records["optimizer"])
    return fig


def explosion_threshold(task: object, init: object) -> float | None:
    """``1 / gamma``: 4 for sigmoid units (and the wall), 1 for tanh, else None.

    With ``||diag sigma'|| <= gamma``, a spectral radius above ``1 / gamma`` is
    necessary for exploding gradients (Pascanu et al. 2013, section 2.1).
    """
    name = str(init) if isinstance(init, str) else ""
    if "sigmoid" in name or task == "wall":
        return 4.0
    if "tanh" in name:
        return 1.0
    return None


def traces(
    records: pd.DataFrame,
    palette: Palette | None = None,
    band: float = 100,
    x: str = "step",
) -> Figure:
    """Gradient norm (top row, log) and spectral radius of ``W_rec`` (bottom row).

    One column per task configuration, against ``x`` (:data:`X_AXES`), seeds on a
    common grid with solved seeds carried forward (:func:`seed_curves`). The dashed
    lines are ``grad_norm_max`` (the largest gradient norm within an evaluation
    chunk) when recorded; the grey line in the bottom row is ``1 / gamma``, the
    spectral radius above which gradients can explode (a necessary condition,
    Pascanu et al. 2013).
    """
    check_x(x)
    need = [x, "grad_norm_mean", "spectral_radius", "optimizer", "seed"]
    require_columns(records, need, "traces")
    palette = palette or optimizer_palette(records["optimizer"])
    has_max = "grad_norm_max" in records.columns
    cols = ["grad_norm_mean", "spectral_radius"] + (["grad_norm_max"] * has_max)
    records = finite(records, cols)
    groups = panel_groups(records)
    fig, axes = new_figure(2, len(groups))
    extra = [Line2D([], [], color="0.3", lw=1.5, label="||g||: mean over chunk")]
    if has_max:
        extra.append(
            Line2D([], [], color="0.3", ls="--", label="||g||: max over chunk")
        )
    drew_threshold, drawn = False, []
    for col, (title, rows) in enumerate(groups):
        top, bottom = axes[0, col], axes[1, col]
        log = [c for c in cols if c != "spectral_radius" and all_positive(rows[c])]
        curves = seed_curves(rows, x, cols, log=log)
        drawn.append(curves)
        seed_lines(top, curves, "grad_norm_mean", palette, band)
        if has_max:
            seed_lines(top, curves, "grad_norm_max", palette, None, ls="--", lw=1)
        if "grad_norm_mean" in log:
            top.set_yscale("log")
        top.set(title=title, xlabel=LABELS[x], ylabel=LABELS["grad_norm_mean"])
        seed_lines(bottom, curves, "spectral_radius", palette, band)
        first = rows.iloc[0]
        level = explosion_threshold(first.get("task"), first.get("init"))
        if level is not None:
            bottom.axhline(level, color="0.4", ls=":", lw=1.5)
            drew_threshold = True
        radii = rows["spectral_radius"].to_numpy(dtype=float)
        radii = radii[np.isfinite(radii)]
        if len(radii) and radii.min() > 0 and radii.max() > 20 * radii.min():
            bottom.set_yscale("log")  # a diverging W_rec spans orders of magnitude
        bottom.set(xlabel=LABELS[x], ylabel=LABELS["spectral_radius"])
    if drew_threshold:
        extra.append(
            Line2D([], [], color="0.4", ls=":", lw=1.5,
                   label=r"$1/\gamma$: explosion threshold" "\n"
                   "(necessary, Pascanu et al. 2013)")
        )  # fmt: skip
    notes = "; ".join([band_text(band), *curve_notes(x, drawn)])
    fig.suptitle(
        f"Gradient norm and spectral radius of W_rec against {LABELS[x]}\n({notes})"
    )
    optimizer_legend(fig, palette, records["optimizer"], extra=extra)
    return fig


def success_rates(summary: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Seeds solved per task, initialization, length and optimizer, with intervals.

    Returns columns ``task`` (when present), ``init`` (``"default"`` when absent),
    ``length``, ``optimizer``, ``solved`` and ``seeds`` (counts), ``success_rate``
    and ``low``, ``high``: the Wilson score interval of ``confidence``
    (:func:`analysis.stats.wilson_interval`). Runs trained on a range of lengths
    (``min_length`` below ``length``) are not a point on the length axis and are
    left out; the comparison table lists them.
    """
    from analysis.stats import wilson_interval

    if "min_length" in summary.columns:
        low_end = pd.to_numeric(summary["min_length"], errors="coerce")
        summary = summary[low_end.isna() | (low_end == summary["length"])]
    frame = summary.assign(solved=(summary["status"] == "solved").astype(int))
    if "init" not in frame.columns:
        frame["init"] = "default"
    frame["init"] = frame["init"].astype(str)
    keys = [k for k in ("task", "init", "length", "optimizer") if k in frame.columns]
    rates = frame.groupby(keys, sort=True)["solved"].agg(["sum", "size"])
    rates = rates.rename(columns={"sum": "solved", "size": "seeds"}).reset_index()
    rates["success_rate"] = rates["solved"] / rates["seeds"]
    low, high = wilson_interval(
        rates["solved"].to_numpy(), rates["seeds"].to_numpy(), confidence=confidence
    )
    rates["low"], rates["high"] = np.asarray(low, float), np.asarray(high, float)
    return rates


def _dodge(lengths: np.ndarray, n: int, spread: float = 0.3) -> np.ndarray:
    """Sideways offsets of ``n`` series: ``spread / 3`` of the smallest gap apart
    (at most ``spread`` together), so two series sit close to their length."""
    gaps = np.diff(np.unique(lengths))
    gap = float(gaps.min()) if len(gaps) else 1.0
    if n < 2:
        return np.zeros(max(n, 1))
    return (np.arange(n) - (n - 1) / 2) * spread * gap / max(n - 1, 3)


def success_vs_length(
    summary: pd.DataFrame, palette: Palette | None = None, confidence: float = 0.95
) -> Figure:
    """Success rate (fraction of seeds solved) against sequence length (Pascanu Fig. 7).

    One panel per task, one colour per optimizer, one marker and dash per
    initialization. Error bars are Wilson score intervals of ``confidence`` for the
    fraction solved (:func:`success_rates`); the series of a panel are shifted
    sideways by up to 15% of the smallest gap between lengths so that their bars do
    not hide each other.
    """
    require_columns(summary, ["length", "status", "optimizer"], "success_vs_length")
    palette = palette or optimizer_palette(summary["optimizer"])
    rates = success_rates(summary, confidence)
    inits = sorted(rates["init"].unique())
    markers = dict(zip(inits, "osD^vP*X", strict=False))
    dashes = dict(zip(inits, _DASHES, strict=False))
    groups = panel_groups(rates, ["task"])
    fig, axes = panel_grid(len(groups))
    for ax, (title, rows) in zip(axes, groups, strict=True):
        series = [
            (name, init)
            for name in palette
            for init in inits
            if ((rows["optimizer"] == name) & (rows["init"] == init)).any()
        ]
        offsets = _dodge(rows["length"].to_numpy(float), len(series))
        for (name, init), offset in zip(series, offsets, strict=False):
            mine = rows[(rows["optimizer"] == name) & (rows["init"] == init)]
            mine = mine.sort_values("length")
            at = mine["length"].to_numpy(float) + offset
            rate = mine["success_rate"].to_numpy(float)
            (line,) = ax.plot(
                at, rate, color=palette[name], marker=markers[init], ms=5, lw=1.5
            )
            if dashes[init]:
                line.set_dashes(dashes[init])
            below, above = rate - mine["low"].to_numpy(), mine["high"].to_numpy() - rate
            ax.errorbar(
                at, rate, yerr=np.vstack([below, above]), fmt="none",
                ecolor=palette[name], elinewidth=1, capsize=2.5, alpha=0.8,
            )  # fmt: skip
        ax.set(title=title, xlabel=LABELS["length"], ylim=(-0.04, 1.04))
        ax.set_ylabel("success rate (fraction of seeds solved)")
    extra = [
        Line2D([], [], color="0.3", marker=markers[i], label=f"init: {i}")
        for i in inits
        if len(inits) > 1 or i != "default"
    ]
    for handle, init in zip(extra, inits, strict=False):
        if dashes[init]:
            handle.set_dashes(dashes[init])
    fig.suptitle(
        f"Success rate against sequence length (bars: {confidence:.0%} Wilson "
        "intervals over seeds)"
    )
    optimizer_legend(fig, palette, rates["optimizer"], extra=extra)
    return fig


def wall_plot(
    trajectories: pd.DataFrame,
    surface: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    palette: Palette | None = None,
    floor: float = 1e-6,
) -> Figure:
    """Error surface of the single-unit model with the wall and optimizer trajectories.

    Reproduces Pascanu et al. (2013) Fig. 6: ``E(w, b) = (sigma(x_50) - 0.7)^2`` on a
    log colour scale, the wall found numerically (solid white) and its analytic line
    ``b = x_0 - w sigma(x_0)`` (dotted), and each seed's path ``(w, b)`` coloured by
    optimizer, started at the square marker.

    Args:
        trajectories: Columns ``optimizer, seed, step, param_w, param_b`` (the
            parameters before each update).
        surface: ``(w [nw], b [nb], E [nb, nw])`` from
            :func:`analysis.wall.error_surface` (computed when None).
        palette: Optimizer colours.
        floor: Smallest error shown on the log colour scale.
    """
    need = ["optimizer", "seed", "step", "param_w", "param_b"]
    require_columns(trajectories, need, "wall_plot")
    from analysis import wall  # deferred: computes with JAX

    w, b, error = surface if surface is not None else wall.error_surface()
    palette = palette or optimizer_palette(trajectories["optimizer"])
    fig, axes = new_figure(1, 1, width=6.4, height=5.0)
    ax = axes[0, 0]
    error = np.clip(np.asarray(error, dtype=float), floor, None)
    mesh = ax.pcolormesh(
        w, b, error, norm=LogNorm(vmin=floor, vmax=error.max()), cmap="viridis",
        shading="auto", rasterized=True,
    )  # fmt: skip
    fig.colorbar(mesh, ax=ax, label=r"error $E(w, b)$ (log scale)")
    ax.plot(w, wall.find_wall(w), color="white", lw=3)
    ax.plot(w, wall.analytic_wall(w), color="black", ls=":", lw=1.2)
    keys = [k for k in ("run_id", "optimizer", "seed") if k in trajectories.columns]
    for _, path in trajectories.sort_values("step").groupby(keys, sort=True):
        colour = palette[str(path["optimizer"].iloc[0])]
        pw, pb = path["param_w"].to_numpy(), path["param_b"].to_numpy()
        every = max(1, len(pw) // 40)
        ax.plot(pw, pb, "-o", color=colour, ms=2.5, lw=1, markevery=every, alpha=0.9)
        ax.plot(pw[:1], pb[:1], "s", color=colour, ms=8, mec="black")
    ax.set(xlim=(w.min(), w.max()), ylim=(b.min(), b.max()))
    ax.set(xlabel="w (recurrent weight)", ylabel="b (bias)")
    ax.set_title(r"Single-unit model $x_t = w\,\sigma(x_{t-1}) + b$, 50 steps")
    extra = [
        Line2D([], [], color="0.85", lw=3, label="wall (numerical)"),
        Line2D([], [], color="black", ls=":", label=r"$b = x_0 - w\,\sigma(x_0)$"),
        Line2D([], [], color="0.5", marker="s", ls="", mec="black", label="start"),
    ]
    optimizer_legend(fig, palette, trajectories["optimizer"], extra=extra)
    return fig


def save_figure(
    fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """Save ``fig`` as ``<stem>.<format>`` for each format (PNG at 150 dpi).

    Parent directories are created. Returns the written paths.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.parent / f"{stem.name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=150 if fmt == "png" else "figure")
        paths.append(path)
    return paths


def figure_png_base64(fig: Figure, dpi: int = 110) -> str:
    """The figure as a base64-encoded PNG (for ``data:image/png;base64,`` URIs)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
