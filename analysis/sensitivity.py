"""What tuning chose and how sensitive each optimizer is to its hyperparameters.

Reads the trials of a tuned comparison (:attr:`analysis.results.Results.tuning`, one
row per trial; see :mod:`runner.tuning` for the protocol) and gives:

- :func:`tuning_table`: per tuned optimizer and task configuration, the trial budget
  used, the chosen hyperparameters and the chosen trial's scores on the tuning seeds;
- :func:`sensitivity_figure`: the criterion against each tuned hyperparameter, one
  point per trial (DeepOBS's learning-rate sensitivity plot, Schneider et al. 2019,
  for any hyperparameter), the chosen trial circled.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.plots import (
    Palette,
    optimizer_legend,
    optimizer_palette,
    panel_grid,
)
from analysis.table import markdown_table

#: Columns of a trial row that are not task settings.
_NOT_TASK = {
    "study", "label", "optimizer_name", "criterion", "chosen", "trial", "run_id",
    "solved_fraction", "median_cost", "final_loss", "error",
}  # fmt: skip
#: What each criterion's cost is measured in (axis labels).
_COST_LABELS = {
    "updates": "median updates to solve",
    "grad_equivalents": "median gradient-equivalents to solve",
    "seconds": "median seconds to solve",
    "eval_loss": "median final evaluation loss",
}


def _hp_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith("hp_")]


def _task_keys(trials: pd.DataFrame) -> list[str]:
    """The task settings that differ between studies (task name first)."""
    columns = [
        c for c in trials.columns if c not in _NOT_TASK and not c.startswith("hp_")
    ]
    varying = [c for c in columns if trials[c].astype(str).nunique(dropna=False) > 1]
    return sorted(varying, key=lambda c: (c != "task", c != "length", c != "init"))


def _title(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k} {row[k]}" for k in keys if pd.notna(row[k])) or "all"


def tuning_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per study: trials run and failed, the choice and its scores.

    Columns: the task settings that vary between studies, ``optimizer`` (the
    label), ``trials``, ``failed`` (trials that raised), ``none_solved`` (trials that
    solved no tuning seed), one column per tuned hyperparameter (the chosen value),
    ``solved_fraction``, ``median_cost`` and ``final_loss`` of the chosen trial.
    """
    if trials.empty:
        return pd.DataFrame()
    keys = _task_keys(trials)
    rows = []
    for _, group in trials.groupby("study", sort=False):
        chosen = group[group["chosen"].astype(bool)].iloc[0]
        row = {k: chosen[k] for k in keys}
        row["optimizer"] = chosen["label"]
        row["trials"] = len(group)
        row["failed"] = int(group["error"].notna().sum()) if "error" in group else 0
        row["none_solved"] = int((group["solved_fraction"] == 0).sum())
        for col in _hp_columns(group):
            if pd.notna(chosen[col]):
                row[col.removeprefix("hp_")] = chosen[col]
        for col in ("solved_fraction", "median_cost", "final_loss"):
            row[col] = chosen[col]
        rows.append(row)
    table = pd.DataFrame(rows)
    scores = ["solved_fraction", "median_cost", "final_loss"]
    return table[[c for c in table.columns if c not in scores] + scores]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def format_tuning(trials: pd.DataFrame, markdown: bool = False) -> str:
    """The tuning table as text: what was chosen, with how many trials."""
    table = tuning_table(trials)
    if table.empty:
        return ""
    criterion = trials["criterion"].iloc[0]
    shown = table.map(_fmt)
    head = (
        f"Tuning ({criterion}; scores of the chosen trial on the tuning seeds; "
        "the comparison table above holds the held-out seeds only)"
    )
    if not markdown:
        return head + "\n" + shown.to_string(index=False)
    return head + "\n\n" + markdown_table(shown)


def trial_criterion(trials: pd.DataFrame) -> pd.Series:
    """The quantity each trial is judged by: its median cost to solve, or its final
    evaluation loss for ``criterion = "eval_loss"`` (inf: nothing solved / diverged).
    """
    if trials["criterion"].iloc[0] == "eval_loss":
        return trials["final_loss"].astype(float)
    return trials["median_cost"].astype(float)


def sensitivity_figure(trials: pd.DataFrame, palette: Palette | None = None) -> Figure:
    """The criterion against each tuned hyperparameter, one point per trial.

    One panel per hyperparameter (and task configuration, when several were tuned);
    colours are optimizers; the chosen trial of each study is circled. Trials that
    solved no tuning seed (or diverged) have no finite cost: they are drawn as
    crosses along the top edge. Log scales where a range spans more than a factor 20.
    """
    if trials.empty:
        raise ValueError("sensitivity_figure: no tuning trials")
    palette = palette or optimizer_palette(trials["label"])
    hps = _hp_columns(trials)
    keys = _task_keys(trials)
    panels = []
    for hp in hps:
        rows = trials[trials[hp].notna()]
        groups = rows.groupby(keys, sort=True, dropna=False) if keys else [((), rows)]
        for _, group in groups:
            panels.append((hp.removeprefix("hp_"), _title(group.iloc[0], keys), group))
    fig, axes = panel_grid(len(panels))
    criterion = trials["criterion"].iloc[0]
    for ax, (hp, title, group) in zip(axes, panels, strict=True):
        _sensitivity_panel(ax, group, f"hp_{hp}", palette)
        ax.set(title=title, xlabel=hp, ylabel=_COST_LABELS.get(criterion, criterion))
    extra = [
        Line2D([], [], ls="", marker="o", mfc="none", mec="0.2", ms=11,
               label="chosen trial"),
        Line2D([], [], ls="", marker="x", color="0.3", label="nothing solved"),
    ]  # fmt: skip
    fig.suptitle("Tuning sensitivity: one point per trial (tuning seeds)")
    optimizer_legend(fig, palette, trials["label"], extra=extra)
    return fig


def _sensitivity_panel(ax, group: pd.DataFrame, hp: str, palette: Palette) -> None:
    y = trial_criterion(group)
    finite = np.isfinite(y.to_numpy())
    top = float(y[finite].max()) * 1.3 if finite.any() else 1.0
    numeric = pd.api.types.is_numeric_dtype(group[hp])
    x = group[hp] if numeric else group[hp].astype(str)
    for label, rows in group.groupby("label"):
        colour = palette[str(label)]
        ok = finite[group.index.get_indexer(rows.index)]
        ax.scatter(x[rows.index][ok], y[rows.index][ok], color=colour, s=22)
        ax.scatter(x[rows.index][~ok], [top] * int((~ok).sum()), color=colour,
                   marker="x", s=22)  # fmt: skip
        best = rows[rows["chosen"].astype(bool)]
        if len(best):
            y_best = y[best.index].to_numpy()
            y_best = np.where(np.isfinite(y_best), y_best, top)
            ax.scatter(x[best.index], y_best, s=120, facecolors="none",
                       edgecolors=colour, linewidths=1.5)  # fmt: skip
    values = group[hp].to_numpy(dtype=float) if numeric else None
    if values is not None and values.min() > 0 and values.max() > 20 * values.min():
        ax.set_xscale("log")
    if finite.any() and y[finite].min() > 0 and top > 20 * y[finite].min():
        ax.set_yscale("log")
