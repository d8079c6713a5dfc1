"""Performance profiles of the optimizers over the task configurations.

A performance profile (Dolan & Moré 2002) summarises a benchmark in one curve per
solver. With ``t[p, s]`` the cost of solver ``s`` on problem ``p`` (``+inf`` when it
failed), the performance ratio is ``r[p, s] = t[p, s] / min_s' t[p, s']`` and the
profile is

    rho_s(tau) = |{p : r[p, s] <= tau}| / |P|,

the fraction of problems that ``s`` solves within a factor ``tau`` of the best
solver. ``rho_s(1)`` is the fraction of problems on which ``s`` is (one of) the
fastest; ``rho_s(tau)`` for large ``tau`` is the fraction it solves at all.
AlgoPerf (Dahl et al. 2023) scores training algorithms the same way, with the time
to reach a validation target as the cost and the area under the profile up to a
maximum ratio as the score.

Here a *problem* is a task configuration (task, sequence length, initialization and
any other task setting that varies: :func:`analysis.table.group_columns` without
the optimizer label, run options and optimizer settings) and the *cost* of an
optimizer on it is the median over the seeds of its cost to solve, an unsolved or
diverged seed counting as ``+inf``.

References:
    E. D. Dolan, J. J. Moré, "Benchmarking optimization software with performance
    profiles", Math. Program. 91 (2002) 201-213.
    G. E. Dahl et al., "Benchmarking Neural Network Training Algorithms",
    arXiv:2306.07179 (2023).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from analysis.plots import Palette, optimizer_legend, optimizer_palette, panel_grid
from analysis.stats import COST_COLUMNS
from analysis.table import group_columns

#: Summary column of each cost a profile can use.
#: Axis and panel labels of the costs.
COST_LABELS = {
    "updates": "updates to solve",
    "grad_equivalents": "gradient-equivalents to solve",
    "seconds": "seconds to solve",
}
#: Prefix of optimizer-setting columns (:func:`analysis.results.config_columns`).
_OPTIMIZER_SETTING = "opt_"


def _cost_column(cost: str) -> str:
    """The summary column of ``cost``; ``ValueError`` naming the valid choices."""
    if cost not in COST_COLUMNS:
        raise ValueError(f"cost must be one of {list(COST_COLUMNS)}, got {cost!r}")
    return COST_COLUMNS[cost]


def problem_keys(summary: pd.DataFrame) -> list[str]:
    """The columns that name a problem: the table's group keys before the label.

    :func:`analysis.table.group_columns` lists the task, the task settings that
    vary, the ``optimizer`` label and then, where one label has several
    configurations, the run options and optimizer settings that tell them apart.
    A problem is what comes before the label, without optimizer settings.
    """
    keys = group_columns(summary)
    before = keys[: keys.index("optimizer")] if "optimizer" in keys else keys
    return [k for k in before if not k.startswith(_OPTIMIZER_SETTING)]


def _seed_costs(summary: pd.DataFrame, column: str) -> pd.Series:
    """Per-seed cost to solve: the recorded cost if solved, ``+inf`` otherwise.

    A solved seed without a recorded cost (older run files) stays NaN: unknown.
    """
    if column in summary.columns:
        values = pd.to_numeric(summary[column], errors="coerce")
    else:
        values = pd.Series(np.nan, index=summary.index)
    solved = summary["status"] == "solved"
    return values.where(solved, np.inf).astype(float)


def _nan_median(values: pd.Series) -> float:
    """Median that is NaN when any value is NaN (an unknown cost stays unknown)."""
    return float(np.median(values.to_numpy(dtype=float)))


def problem_costs(
    summary: pd.DataFrame, cost: str = "grad_equivalents"
) -> pd.DataFrame:
    """Cost of each optimizer label on each problem: the median over its seeds.

    Per configuration (one ``config_digest``: a label with fixed settings) the cost
    is the median over the seeds of the per-seed cost to solve, where unsolved and
    diverged seeds count as ``+inf``: the cost is finite only when more than half
    of the seeds solved. If one label has several configurations on one problem
    (two budgets of steps, two learning rates), the cheapest is taken: the profile
    then shows the label at its best setting, i.e. after tuning on these seeds.

    Args:
        summary: Per-seed outcomes (:attr:`analysis.results.Results.summary`).
        cost: ``updates`` (``steps_to_solve``), ``grad_equivalents``
            (``grad_equivalents_to_solve``) or ``seconds`` (``seconds_to_solve``).

    Returns:
        Rows: problems (indexed by :func:`problem_keys`); columns: optimizer labels
        (sorted); values: cost (``inf``: not solved by the median seed; NaN: the
        label was not run on that problem, or a solved seed lacks the cost).

    Raises:
        ValueError: unknown ``cost`` or missing ``status`` / ``optimizer`` columns.
    """
    column = _cost_column(cost)
    missing = [c for c in ("status", "optimizer") if c not in summary.columns]
    if missing:
        raise ValueError(f"problem_costs: missing column(s) {missing}")
    if summary.empty:
        return pd.DataFrame(columns=pd.Index([], name="optimizer"), dtype=float)
    problem = problem_keys(summary)
    configuration = group_columns(summary)
    if "config_digest" in summary.columns:
        configuration = [*configuration, "config_digest"]
    frame = summary.assign(_cost=_seed_costs(summary, column))
    per_config = (
        frame.groupby(configuration, sort=True, dropna=False)["_cost"]
        .agg(_nan_median)
        .reset_index()
    )
    best = per_config.groupby([*problem, "optimizer"], sort=True, dropna=False)[
        "_cost"
    ].min()
    table = best.unstack("optimizer")
    table.columns.name = "optimizer"
    return table.astype(float)


def performance_ratios(costs: pd.DataFrame) -> pd.DataFrame:
    """``r[p, s] = cost[p, s] / min_s' cost[p, s']``; ``inf`` when not solved.

    Missing (NaN) costs mean the optimizer was not run on the problem and count as
    not solved (``inf``). On a problem no optimizer solved every ratio is ``inf``.

    Raises:
        ValueError: a cost that is zero or negative.
    """
    values = costs.to_numpy(dtype=float, copy=True)
    if np.any(values <= 0):
        raise ValueError("performance_ratios: costs must be positive")
    values[np.isnan(values)] = np.inf
    best = values.min(axis=1, keepdims=True) if values.size else values
    with np.errstate(invalid="ignore"):
        ratios = values / best
    ratios[~np.isfinite(values)] = np.inf
    return pd.DataFrame(ratios, index=costs.index, columns=costs.columns)


def performance_profile(costs: pd.DataFrame, taus: ArrayLike) -> pd.DataFrame:
    """Dolan-Moré profile ``rho_s(tau) = |{p : r[p, s] <= tau}| / |P|``.

    The denominator ``|P|`` counts every row of ``costs``, including problems that
    no optimizer solved (nobody gets them, so no curve reaches 1 then). Missing
    (NaN) costs count as not solved.

    Args:
        costs: Problems by optimizers (:func:`problem_costs`).
        taus: Ratios at which to evaluate the profile (1-D).

    Returns:
        Wide frame: index ``tau`` (as given), one column per optimizer, values the
        fraction of problems in ``[0, 1]`` (NaN for every tau when there are no
        problems).
    """
    grid = np.asarray(taus, dtype=float).ravel()
    ratios = performance_ratios(costs).to_numpy()
    count = ratios.shape[0]
    within = ratios[None, :, :] <= grid[:, None, None]  # tau x problem x optimizer
    rho = within.sum(axis=1) / count if count else np.full(within.shape[::2], np.nan)
    return pd.DataFrame(
        rho, index=pd.Index(grid, name="tau"), columns=pd.Index(costs.columns)
    )


def profile_scores(costs: pd.DataFrame, max_tau: float = 4.0) -> pd.Series:
    """AlgoPerf's score: the profile's mean height over ``1 <= tau <= max_tau``.

    ``score_s = 1 / (max_tau - 1) * integral_1^max_tau rho_s(tau) dtau`` (Dahl et
    al. 2023 integrate to ``tau = 4``). The profile is a step function, so the
    integral is exact: a problem solved at ratio ``r <= max_tau`` adds
    ``(max_tau - r) / (max_tau - 1)`` over the number of problems. 1 means the
    fastest on every problem; 0 means never within ``max_tau`` of the fastest.
    """
    if not max_tau > 1:
        raise ValueError(f"max_tau = {max_tau!r} must be greater than 1")
    ratios = performance_ratios(costs).to_numpy()
    if ratios.shape[0] == 0:
        return pd.Series(np.nan, index=costs.columns, name="score")
    share = np.clip(max_tau - ratios, 0.0, None) / (max_tau - 1)
    return pd.Series(share.mean(axis=0), index=costs.columns, name="score")


def score_table(
    summary: pd.DataFrame,
    costs: tuple[str, ...] = ("updates", "grad_equivalents", "seconds"),
    max_tau: float = 4.0,
) -> pd.DataFrame:
    """:func:`profile_scores` per optimizer (rows) and cost (columns)."""
    present = [c for c in costs if _cost_column(c) in summary.columns]
    return pd.DataFrame(
        {c: profile_scores(problem_costs(summary, c), max_tau) for c in present}
    ).rename_axis("optimizer")


def _tau_grid(ratios: pd.DataFrame, max_tau: float | None) -> tuple[np.ndarray, float]:
    """The profile's breakpoints from 1 to ``max_tau`` and ``max_tau`` itself.

    Default ``max_tau``: twice the largest finite ratio, at least 2.
    """
    finite = ratios.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if max_tau is None:
        max_tau = max(2.0, 2.0 * float(finite.max())) if finite.size else 2.0
    inside = finite[(finite >= 1.0) & (finite <= max_tau)]
    return np.unique(np.concatenate([[1.0, max_tau], inside])), float(max_tau)


def _profile_panel(
    ax: Axes,
    summary: pd.DataFrame,
    cost: str,
    palette: Palette,
    max_tau: float | None,
) -> None:
    """One cost's step curves, or a note when the summary lacks that cost."""
    label = COST_LABELS[cost]
    if COST_COLUMNS[cost] not in summary.columns:
        ax.text(0.5, 0.5, f"no {COST_COLUMNS[cost]} recorded", ha="center")
        ax.set(title=label, xticks=[], yticks=[])
        return
    costs = problem_costs(summary, cost)
    taus, top = _tau_grid(performance_ratios(costs), max_tau)
    profile = performance_profile(costs, taus)
    for name in palette:
        if name in profile.columns:
            ax.step(taus, profile[name], where="post", color=palette[name], lw=2)
    ax.set_xscale("log", base=2)
    ax.set_xlim(1.0, top)
    ax.set_ylim(-0.02, 1.02)
    ax.set(
        title=f"{label} ({len(costs)} problems)",
        xlabel=r"$\tau$: cost / best cost on the problem",
        ylabel=r"$\rho(\tau)$: fraction of problems within $\tau$",
    )


def profile_figure(
    summary: pd.DataFrame,
    costs: Sequence[str] = ("updates", "grad_equivalents", "seconds"),
    palette: Palette | None = None,
    max_tau: float | None = None,
) -> Figure:
    """Performance profiles, one panel per cost, one step curve per optimizer.

    Args:
        summary: Per-seed outcomes (:attr:`analysis.results.Results.summary`).
        costs: Costs to profile (see :func:`problem_costs`).
        palette: Optimizer colours (default: :func:`optimizer_palette` of the data).
        max_tau: Right end of the log2 ratio axis (default: twice the largest
            finite ratio of each panel, at least 2).

    Returns:
        The figure (Agg canvas).

    Raises:
        ValueError: an unknown cost or an empty ``costs``.
    """
    costs = list(costs)
    if not costs:
        raise ValueError("profile_figure: costs must name at least one cost")
    for cost in costs:
        _cost_column(cost)
    palette = palette or optimizer_palette(summary["optimizer"])
    fig, axes = panel_grid(len(costs))
    for ax, cost in zip(axes, costs, strict=True):
        _profile_panel(ax, summary, cost, palette, max_tau)
    problem = ", ".join(problem_keys(summary)) if not summary.empty else "task"
    fig.suptitle(
        f"Performance profiles (Dolan & Moré 2002): a problem is one ({problem}); "
        "cost is the median over seeds, unsolved or diverged counting as infinite"
    )
    optimizer_legend(fig, palette, summary["optimizer"])
    return fig
