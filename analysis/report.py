"""Self-contained HTML report of a results directory: table, runs and figures.

:func:`write_report` writes one HTML file with every figure embedded as a base64 PNG
(no external files, scripts or style sheets), so it can be mailed or archived as is.
The figures come from :data:`FIGURES`: each builder reads what it needs from the
directory and returns ``None`` when that data is absent (no probes, no growth
experiment, one sequence length only), and the report then omits the section.
"""

from __future__ import annotations

import datetime
import html
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import curvature_plots as cp
from analysis import plots
from analysis.profiles import problem_costs, profile_figure, score_table
from analysis.results import Results
from analysis.sensitivity import sensitivity_figure, tuning_table
from analysis.table import comparison_table, explosion_table, group_columns


def palette(results: Results) -> plots.Palette:
    """One colour per optimizer label of the whole directory (shared by figures)."""
    return plots.optimizer_palette(results.labels)


def _has(frame: pd.DataFrame, *columns: str) -> bool:
    return not frame.empty and all(c in frame.columns for c in columns)


def wall_trajectories(results: Results) -> pd.DataFrame:
    """Parameter paths ``(param_w, param_b)`` of the runs of the ``wall`` task."""
    frames = []
    for run in results.runs:
        config = run["config"]
        if config["task"]["name"] != "wall":
            continue
        steps = results.steps(run)
        if _has(steps, "param_w", "param_b"):
            frames.append(
                steps.assign(optimizer=config["label"], run_id=config["run_id"])
            )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def growth_x(rows: pd.DataFrame) -> str | None:
    """The growth variable (``length``, else ``radius``) that varies in ``rows``."""
    for x in ("length", "radius"):
        if x in rows.columns:
            values = pd.to_numeric(rows[x], errors="coerce")
            by = rows["experiment"] if "experiment" in rows else np.zeros(len(rows))
            if values.groupby(by).nunique().max() > 1:
                return x
    return None


def _curves(y: str, default_x: str = "step") -> Callable[..., Figure | None]:
    def build(results: Results, x: str = default_x) -> Figure | None:
        if not _has(results.records, x, "seed", y):
            return None
        return plots.training_curves(results.records, y, palette(results), x=x)

    return build


def _traces(results: Results, x: str = "step") -> Figure | None:
    records = results.records
    if not _has(records, x, "seed", "grad_norm_mean", "spectral_radius"):
        return None
    return plots.traces(records, palette(results), x=x)


def _success(results: Results) -> Figure | None:
    summary = results.summary
    if not _has(summary, "length", "status") or summary["length"].nunique() < 2:
        return None
    return plots.success_vs_length(summary, palette(results))


def _curvature(kind: str, column: str) -> Callable[[Results], Figure | None]:
    def build(results: Results) -> Figure | None:
        if not _has(results.probes, "grad_norm", column, "smoothness", "kind"):
            return None
        return cp.curvature_ratio(results.probes, kind, palette(results))

    return build


def _spectrum(results: Results, x: str = "step") -> Figure | None:
    probes, records = results.probes, results.records
    if not _has(probes, "ritz_values", "ritz_weights", "top_eigenvalue"):
        return None
    if x != "step" and not _has(records, "step", "seed", x):
        return None
    records = records if _has(records, "step", "seed") else None
    return cp.spectrum_plot(probes, palette(results), records=records, x=x)


def _solvable(summary: pd.DataFrame) -> pd.DataFrame:
    """The seeds of tasks with a success test (natural-data tasks have a
    ``best_eval_loss`` instead): the only ones a cost to solve applies to."""
    if "best_eval_loss" not in summary.columns:
        return summary
    held_out = (
        summary["status"].isin(["finished", "stopped"])
        | summary["best_eval_loss"].notna()
    )
    return summary[~held_out]


def _profiles_apply(results: Results) -> bool:
    """Profiles need two optimizers and two problems (task configurations) with a
    success test."""
    summary = _solvable(results.summary)
    if not _has(summary, "status", "optimizer", "steps_to_solve"):
        return False
    if summary["optimizer"].nunique() < 2:
        return False
    return len(problem_costs(summary, "updates")) >= 2


def _profiles(results: Results) -> Figure | None:
    if not _profiles_apply(results):
        return None
    return profile_figure(_solvable(results.summary), palette=palette(results))


def _sensitivity(results: Results) -> Figure | None:
    trials = results.tuning
    if trials.empty or not any(c.startswith("hp_") for c in trials.columns):
        return None
    return sensitivity_figure(trials, palette(results))


def _wall(results: Results) -> Figure | None:
    paths = wall_trajectories(results)
    return None if paths.empty else plots.wall_plot(paths, palette=palette(results))


def _growth(results: Results) -> Figure | None:
    rows, fits = results.growth_rows, results.growth_fits
    x = growth_x(rows) if not rows.empty else None
    return None if x is None else cp.growth_plot(rows, fits, x)


def _ratio(results: Results) -> Figure | None:
    rows = results.growth_rows
    x = growth_x(rows) if _has(rows, "ratio_hessian", "ratio_gn") else None
    return None if x is None else cp.ratio_vs_x(rows, x)


#: Figure name -> builder from a results directory (None: the data is absent).
FIGURES: dict[str, Callable[..., Figure | None]] = {
    "training": _curves("eval_loss"),
    "training_work": _curves("eval_loss", "grad_equivalents"),
    "error": _curves("eval_error"),
    "error_work": _curves("eval_error", "grad_equivalents"),
    "traces": _traces,
    "success": _success,
    "profiles": _profiles,
    "sensitivity": _sensitivity,
    "curvature": _curvature("hessian", "curv_hessian"),
    "curvature_gn": _curvature("gauss_newton", "curv_gn"),
    "spectrum": _spectrum,
    "wall": _wall,
    "growth": _growth,
    "ratio": _ratio,
}
#: Figures drawn over training: their builders take ``x`` (:data:`plots.X_AXES`).
X_FIGURES = ("training", "training_work", "error", "error_work", "traces", "spectrum")


def build_figure(name: str, results: Results, x: str | None = None) -> Figure | None:
    """The figure ``name`` of :data:`FIGURES`, against ``x`` when given.

    Raises:
        ValueError: ``name`` is unknown, ``x`` is not in :data:`plots.X_AXES`, or
            ``x`` is given for a figure not in :data:`X_FIGURES`.
    """
    if name not in FIGURES:
        raise ValueError(f"unknown plot {name!r}; choose from {sorted(FIGURES)}")
    if x is None:
        return FIGURES[name](results)
    plots.check_x(x)
    if name not in X_FIGURES:
        raise ValueError(
            f"the {name!r} plot has no training axis; x applies to "
            f"{', '.join(X_FIGURES)}"
        )
    return FIGURES[name](results, x=x)


#: Section title and what to read from each figure.
CAPTIONS = {
    "training": ("Evaluation loss",
        "Loss on fresh sequences against update step: median over seeds, band from "
        "the best to the worst seed. A solved seed stops training; it is carried "
        "forward at its final evaluation to the end of its optimizer's curve, so the "
        "median does not jump when it retires. A plateau that never drops means the "
        "task was not solved; sudden jumps upwards are gradient explosions."),
    "training_work": ("Evaluation loss against work",
        "As above against gradient-equivalents (gradients, function evaluations and "
        "curvature-vector products at their nominal cost), the work the comparison "
        "table counts: a method with few expensive updates is drawn at its cost. "
        "Each seed is interpolated onto a common grid per optimizer (60 points, or "
        "as many as the longest seed has evaluations) before the median is taken; "
        "solved seeds are carried forward."),
    "error": ("Evaluation error",
        "Fraction of evaluation sequences wrong, solved seeds carried forward at "
        "their final error. A seed counts as solved once the error falls below the "
        "task's threshold and it passes the full success test."),
    "error_work": ("Evaluation error against work",
        "The evaluation error against gradient-equivalents, seeds on a common grid, "
        "solved seeds carried forward."),
    "traces": ("Gradient norm and spectral radius",
        "Top: mean gradient norm per evaluation chunk (dashed: the largest); jumps of "
        "orders of magnitude are explosions. Bottom: spectral radius of W_rec; above "
        "the dotted line 1/gamma (1 for tanh, 4 for sigmoid) gradients can explode, a "
        "necessary but not sufficient condition (Pascanu et al. 2013). Solved seeds "
        "keep their final values (their parameters no longer change)."),
    "success": ("Success rate against sequence length",
        "Fraction of seeds solved at each length (Pascanu et al. 2013, Fig. 7), with "
        "95% Wilson score intervals over seeds. With a handful of seeds per point "
        "they are wide: 2 of 5 seeds solved spans 0.12 to 0.77."),
    "profiles": ("Performance profiles",
        "For each optimizer, the fraction of problems (task configurations) it "
        "solved within tau times the cost of the best optimizer on that problem "
        "(Dolan and More 2002), in updates, gradient-equivalents and seconds. The "
        "cost on a problem is the median over seeds, an unsolved or diverged seed "
        "counting as infinite. The value at tau = 1 is how often an optimizer was "
        "the fastest; the height at the right is how many problems it solved."),
    "sensitivity": ("Tuning sensitivity",
        "The tuning criterion against each tuned hyperparameter, one point per "
        "trial on the tuning seeds; the chosen trial is circled, trials that solved "
        "no tuning seed are crosses along the top. A wide basin means the result "
        "does not hinge on the tuning; a single good point means it does."),
    "curvature": ("Curvature against gradient norm (Hessian)",
        "Left: |u^T H u| along u = g/||g|| against ||g||, log-log, with the fitted "
        "slope and its confidence interval per optimizer. Slope 1 (parallel to the "
        "dotted line) means curvature grows with the gradient, so the Newton step "
        "||g||/|c| stays bounded and a second-order method can cope with the wall; "
        "slope above 1: curvature outgrows the gradient; below 1: the Newton step "
        "itself explodes. Stars are probes triggered by a gradient explosion. Right: "
        "local smoothness with the (L0, L1) fit of Zhang et al. (2020); L1 > 0 means "
        "smoothness grows with the gradient norm, the regime where clipping helps."),
    "curvature_gn": ("Curvature against gradient norm (Gauss-Newton)",
        "As above with u^T G u. For squared error u^T G u = ||Ju||^2 while ||g|| is "
        "about ||Ju|| |r|, so a slope near 2 is expected while the residual stays "
        "bounded: Gauss-Newton curvature can outgrow the gradient."),
    "spectrum": ("Hessian spectrum",
        "Left: spectral density of the Hessian (stochastic Lanczos quadrature) at the "
        "last probe of each seed, averaged over seeds; mass left of 0 is "
        "non-convexity, isolated peaks on the right are sharp directions. Right: the "
        "top eigenvalue along training (compare with 2/learning rate, the edge of "
        "stability of Cohen et al. 2021); solved seeds keep their last probe."),
    "wall": ("The wall of the single-unit model",
        "Error E(w, b) with the wall (white) and each seed's path from its square "
        "start. Pascanu et al. (2013, Fig. 6): plain SGD hitting the wall is thrown "
        "far away, a clipped step stays close to it."),
    "growth": ("Growth of gradient and curvature",
        "Gradient norm and curvature along u against sequence length or spectral "
        "radius, with the fitted exponential rates (log|q| = a + rate x). Equal "
        "rates for ||g|| and the curvature mean a bounded Newton step."),
    "ratio": ("Curvature ratio",
        "|c| / ||g|| against sequence length or spectral radius. Flat: curvature and "
        "gradient grow at the same rate; rising: curvature outgrows the gradient."),
}  # fmt: skip

_STYLE = """body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eee}td.text{text-align:left}img{max-width:100%}
figcaption{max-width:1000px;color:#444}.error{color:#a00}"""
#: Comparison-table metrics: column, header, format.
_METRICS = (
    ("seeds", "seeds", "{:.0f}"),
    ("solved", "solved", "{:.0f}"),
    ("success_rate", "success rate", "{:.0%}"),
    ("success_lo", "95% low", "{:.0%}"),
    ("success_hi", "95% high", "{:.0%}"),
    ("median_steps", "median updates to solve", "{:.0f}"),
    ("steps_lo", "updates 95% low", "{:.0f}"),
    ("steps_hi", "updates 95% high", "{:.0f}"),
    ("median_grad_equiv", "median gradient-equivalents", "{:.0f}"),
    ("grad_equiv_lo", "grad.-equiv. 95% low", "{:.0f}"),
    ("grad_equiv_hi", "grad.-equiv. 95% high", "{:.0f}"),
    ("median_seq_grads", "median sequence gradients", "{:.3g}"),
    ("median_seconds", "median seconds to solve", "{:.1f}"),
    ("diverged", "diverged seeds", "{:.0f}"),
    ("run_seconds", "run seconds", "{:.1f}"),
)


def _cell(value: object, fmt: str | None = None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "<td>-</td>"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a length read back as float next to missing ones
    if fmt is not None:
        return f"<td>{html.escape(fmt.format(value))}</td>"
    return f'<td class="text">{html.escape(str(value))}</td>'


def html_table(frame: pd.DataFrame, formats: dict[str, str], table_id: str) -> str:
    """An HTML table; ``formats`` maps columns to format strings (others as text)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = (
            _cell(v, formats.get(c)) for c, v in zip(frame.columns, row, strict=True)
        )
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def comparison_html(summary: pd.DataFrame) -> str:
    """The comparison table (one row per configuration) as HTML.

    Length and initialization are shown even where they do not vary (the table of
    :func:`analysis.table.comparison_table` keeps only varying settings).
    """
    if summary.empty:
        return "<p>(no per-seed outcomes recorded)</p>"
    table = comparison_table(summary)
    keys = group_columns(summary)
    fixed = [c for c in ("length", "init") if c in summary and c not in keys]
    if fixed:
        first = summary.groupby(keys, sort=True, dropna=False)[fixed].first()
        table = table.merge(first.reset_index(), on=keys, how="left")
    metrics = [m for m, _, _ in _METRICS if m in table.columns]
    # Tasks without a success test: held-out means and their intervals.
    held_out = [c for c in table.columns if c.startswith(("val_", "test_"))]
    front = [c for c in ("task", "length", "init") if c in table.columns]
    shown = table[front + [c for c in keys if c not in front] + metrics + held_out]
    headers = {m: h for m, h, _ in _METRICS}
    formats = {headers[m]: f for m, _, f in _METRICS}
    formats.update({c: "{:.4g}" for c in held_out})
    return html_table(shown.rename(columns=headers), formats, "comparison")


def explosions_html(results: Results) -> str:
    """The gradient-explosion table (:func:`analysis.table.explosion_table`)."""
    table = explosion_table(results.records, results.summary)
    if table.empty:
        return ""
    numbers = table.select_dtypes("number").columns
    formats = {c: "{:.4g}" for c in numbers}
    return (
        "<h2>Gradient explosions</h2><p>A step explodes when its gradient norm "
        "exceeds the run's explosion_factor times the running mean of the earlier "
        "norms. Explosions per 1,000 training steps are means over seeds; the first "
        "explosion is the median over the exploding seeds of the evaluation step "
        "that closed its chunk.</p>" + html_table(table, formats, "explosions")
    )


def tuning_html(trials: pd.DataFrame) -> str:
    """The tuning table (:func:`analysis.sensitivity.tuning_table`) as HTML."""
    table = tuning_table(trials).replace([np.inf], np.nan)
    numbers = table.select_dtypes("number").columns
    formats = {c: "{:.4g}" for c in numbers}
    return html_table(table, formats, "tuning")


def runs_html(results: Results) -> str:
    """One row per run: id, optimizer label, task, seeds, outcomes, probes."""
    rows = []
    for run in results.runs:
        config = run["config"]
        status = pd.Series([s.get("status") for s in run.get("summary", [])])
        counts = ", ".join(f"{n} {s}" for s, n in status.value_counts().items())
        rows.append(
            {
                "run_id": config["run_id"], "optimizer": config["label"],
                "task": config["task"]["name"], "seeds": len(config.get("seeds", [])),
                "steps": config.get("steps"), "outcome": counts or None,
                "probes": len(run.get("probes", [])),
            }
        )  # fmt: skip
    frame = pd.DataFrame(rows)
    return html_table(frame, {"seeds": "{}", "steps": "{}", "probes": "{}"}, "runs")


def _figure_section(name: str, results: Results) -> str:
    title, caption = CAPTIONS.get(name, (name, ""))
    try:
        fig = FIGURES[name](results)
    except Exception as error:  # a broken figure must not cost the whole report
        warnings.warn(f"figure {name!r} failed: {error!r}", stacklevel=2)
        return (
            f'<section id="{name}"><h2>{html.escape(title)}</h2><p class="error">'
            f"Could not draw this figure: {html.escape(repr(error))}</p></section>"
        )
    if fig is None:
        return ""
    data = plots.figure_png_base64(fig)
    return (
        f'<section id="{name}"><h2>{html.escape(title)}</h2><figure>'
        f'<img alt="{name}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure></section>"
    )


def write_report(
    directory: str | Path | Results,
    out: str | Path | None = None,
    title: str | None = None,
) -> Path:
    """Write a self-contained HTML report of a results directory.

    Args:
        directory: A comparison directory (run files, probes, growth results), or
            the :class:`~analysis.results.Results` already loaded from one.
        out: The HTML file (default ``<directory>/report.html``).
        title: Page title (default: the directory name).

    Returns:
        The path written.

    Raises:
        ResultsError: when ``directory`` does not exist, holds a damaged file, or
            holds neither runs nor growth results.
    """
    results = directory if isinstance(directory, Results) else Results.load(directory)
    directory = results.path
    title = title or f"curvbench report: {directory.name}"
    out = Path(out) if out is not None else directory / "report.html"
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = f"Generated {now} from {directory.resolve()}: {len(results.runs)} runs"
    if results.runs:
        summary = results.summary
        tasks = ", ".join(sorted(summary["task"].astype(str).unique()))
        labels = ", ".join(palette(results))
        info = f"{info}; tasks: {tasks}; optimizers: {labels}."
        parts.append(f"<p>{html.escape(info)}</p>")
        parts += [
            "<h2>Comparison</h2><p>One row per configuration. Medians are over solved "
            "seeds ('-' when none solved), with 95% intervals: Wilson for the "
            "success rate, percentile bootstrap over seeds for the medians; for "
            "tasks without a success test, means over seeds of the best validation "
            "loss and the test measures there, with Student-t intervals. "
            "Gradient-equivalents add function evaluations and curvature-vector "
            "products at their nominal cost in gradients; sequence gradients "
            "multiply them by the batch size.</p>",
            comparison_html(summary),
            explosions_html(results),
        ]
    else:
        parts.append(f"<p>{html.escape(info)}; growth experiments only.</p>")
    if results.runs and _profiles_apply(results):
        scores = score_table(_solvable(results.summary)).reset_index()
        parts += [
            "<h2>Performance-profile scores</h2><p>AlgoPerf's score: the mean "
            "height of each optimizer's performance profile for 1 &le; tau &le; 4 "
            "(1: the fastest on every task configuration; 0: never within 4x of "
            "the fastest), in updates, gradient-equivalents and seconds.</p>",
            html_table(scores, {c: "{:.3f}" for c in scores.columns[1:]}, "scores"),
        ]
    if not results.tuning.empty:
        parts += [
            "<h2>Tuning</h2><p>What tuning chose for each optimizer and task "
            "configuration, with the chosen trial's scores on the tuning seeds; the "
            "comparison table holds the held-out seeds only.</p>",
            tuning_html(results.tuning),
        ]
    parts += [_figure_section(name, results) for name in FIGURES]
    if results.runs:
        parts += ["<h2>Runs</h2>", runs_html(results)]
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(p for p in parts if p), encoding="utf-8")
    return out
