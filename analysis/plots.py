"""Training plots: loss curves, gradient and spectral-radius traces, success, wall.

Every function takes tidy pandas frames (one row per run, seed and step, as read by
:mod:`analysis.results`) and returns a :class:`matplotlib.figure.Figure` drawn on
the Agg canvas, so plotting never needs a display. Colours follow
:func:`optimizer_palette`: one colour per optimizer label, the same in every figure
drawn with the same palette.

Seed bands: lines are the median over seeds and the shaded band covers the middle
``band`` percent of seeds (100: minimum to maximum), i.e. seaborn's
``errorbar=("pi", band)``.

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


def _seed_lines(ax, data, y, palette, band, **kw) -> None:
    sns.lineplot(
        data=data, x="step", y=y, hue="optimizer", hue_order=list(palette),
        palette=palette, estimator="median", errorbar=("pi", band), legend=False,
        ax=ax, **kw,
    )  # fmt: skip


def training_curves(
    records: pd.DataFrame,
    y: str = "eval_loss",
    palette: Palette | None = None,
    band: float = 100,
) -> Figure:
    """``y`` against update step, one panel per task configuration, hue optimizer.

    Args:
        records: Tidy records (:attr:`analysis.results.Results.records`).
        y: Column to plot (``eval_loss``, ``eval_error``, ``loss``, ...). Loss columns
            go on a log scale when positive.
        palette: Optimizer colours (default: :func:`optimizer_palette` of the data).
        band: Percent of seeds covered by the band around the median line.

    Returns:
        The figure.
    """
    require_columns(records, ["step", y, "optimizer", "seed"], "training_curves")
    palette = palette or optimizer_palette(records["optimizer"])
    records = finite(records, [y])
    groups = panel_groups(records)
    fig, axes = panel_grid(len(groups))
    for ax, (title, rows) in zip(axes, groups, strict=True):
        _seed_lines(ax, rows, y, palette, band)
        ax.set(title=title, xlabel=LABELS["step"], ylabel=LABELS.get(y, y))
        if "loss" in y:
            log_if_positive(ax, rows[y])
    fig.suptitle(f"{LABELS.get(y, y)} ({band_text(band)})")
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
    records: pd.DataFrame, palette: Palette | None = None, band: float = 100
) -> Figure:
    """Gradient norm (top row, log) and spectral radius of ``W_rec`` (bottom row).

    One column per task configuration. The dashed lines are ``grad_norm_max`` (the
    largest gradient norm within an evaluation chunk) when recorded; the grey line in
    the bottom row is ``1 / gamma``, the spectral radius above which gradients can
    explode (a necessary condition, Pascanu et al. 2013).
    """
    need = ["step", "grad_norm_mean", "spectral_radius", "optimizer", "seed"]
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
    drew_threshold = False
    for col, (title, rows) in enumerate(groups):
        top, bottom = axes[0, col], axes[1, col]
        _seed_lines(top, rows, "grad_norm_mean", palette, band)
        if has_max:
            sns.lineplot(
                data=rows, x="step", y="grad_norm_max", hue="optimizer",
                hue_order=list(palette), palette=palette, estimator="median",
                errorbar=None, legend=False, ax=top, linestyle="--", lw=1,
            )  # fmt: skip
        log_if_positive(top, rows["grad_norm_mean"])
        top.set(title=title, xlabel=LABELS["step"], ylabel=LABELS["grad_norm_mean"])
        _seed_lines(bottom, rows, "spectral_radius", palette, band)
        first = rows.iloc[0]
        level = explosion_threshold(first.get("task"), first.get("init"))
        if level is not None:
            bottom.axhline(level, color="0.4", ls=":", lw=1.5)
            drew_threshold = True
        radii = rows["spectral_radius"].to_numpy(dtype=float)
        radii = radii[np.isfinite(radii)]
        if len(radii) and radii.min() > 0 and radii.max() > 20 * radii.min():
            bottom.set_yscale("log")  # a diverging W_rec spans orders of magnitude
        bottom.set(xlabel=LABELS["step"], ylabel=LABELS["spectral_radius"])
    if drew_threshold:
        extra.append(
            Line2D([], [], color="0.4", ls=":", lw=1.5,
                   label=r"$1/\gamma$: explosion threshold" "\n"
                   "(necessary, Pascanu et al. 2013)")
        )  # fmt: skip
    fig.suptitle(f"Gradient norm and spectral radius of W_rec ({band_text(band)})")
    optimizer_legend(fig, palette, records["optimizer"], extra=extra)
    return fig


def success_vs_length(summary: pd.DataFrame, palette: Palette | None = None) -> Figure:
    """Success rate (fraction of seeds solved) against sequence length (Pascanu Fig. 7).

    One panel per task, one colour per optimizer, one marker per initialization.
    """
    require_columns(summary, ["length", "status", "optimizer"], "success_vs_length")
    palette = palette or optimizer_palette(summary["optimizer"])
    frame = summary.assign(solved=(summary["status"] == "solved").astype(float))
    if "init" not in frame.columns:
        frame["init"] = "default"
    frame["init"] = frame["init"].astype(str)
    keys = [k for k in ("task", "init", "length", "optimizer") if k in frame.columns]
    rates = frame.groupby(keys, sort=True)["solved"].agg(["mean", "size"])
    rates = rates.rename(columns={"mean": "success_rate", "size": "seeds"})
    rates = rates.reset_index()
    inits = sorted(rates["init"].unique())
    markers = dict(zip(inits, "osD^vP*X", strict=False))
    dashes = dict(zip(inits, _DASHES, strict=False))
    groups = panel_groups(rates, ["task"])
    fig, axes = panel_grid(len(groups))
    for ax, (title, rows) in zip(axes, groups, strict=True):
        sns.lineplot(
            data=rows, x="length", y="success_rate", hue="optimizer",
            hue_order=list(palette), palette=palette, style="init",
            style_order=inits, markers=markers, dashes=dashes, legend=False, ax=ax,
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
    fig.suptitle("Success rate against sequence length")
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
