"""The comparison table: success rate and steps, gradients and seconds to solve."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.results import Results

#: Configuration columns that never define a group on their own.
_NOT_KEYS = {
    "run_id", "optimizer_name", "optimizer", "task", "batch_size", "config_digest",
}  # fmt: skip
#: Run options: a key only when runs of one row would otherwise differ in them.
_RUN_OPTIONS = {
    "steps", "eval_every", "eval_size", "curvature_batch_size", "probe_every",
    "probe_events", "explosion_factor", "lanczos_iters", "record_params",
}  # fmt: skip


def group_columns(summary: pd.DataFrame) -> list[str]:
    """Task, the task settings that vary across runs, and the optimizer label.

    Runs pool into one row only when their configurations are equal but for the
    seeds (:func:`analysis.results.config_digest`). Where two configurations would
    share a row (the same label at two budgets of steps, or with two settings), the
    run options and optimizer settings that tell them apart become columns too.
    """
    config = [c for c in summary.columns if c not in _SUMMARY_FIELDS]
    varying = [
        c
        for c in config
        if c not in _NOT_KEYS
        and c not in _RUN_OPTIONS
        and not c.startswith("opt_")
        and summary[c].astype(str).nunique() > 1
    ]
    fixed_first = [c for c in ("length", "init") if c in varying]
    rest = [c for c in varying if c not in fixed_first]
    keys = ["task", *fixed_first, *rest, "optimizer"]
    return keys + _distinguishing(summary, keys, config)


def _distinguishing(summary: pd.DataFrame, keys: list[str], config: list[str]):
    """Option and optimizer columns that differ inside a row of ``keys``."""
    if "config_digest" not in summary.columns:
        return []
    text = summary[keys].astype(str)
    clash = summary.groupby([text[k] for k in keys])["config_digest"].transform(
        "nunique"
    )
    inside = summary[clash > 1]
    if inside.empty:
        return []
    grouped = inside.groupby([text.loc[inside.index, k] for k in keys])
    extra = [
        c
        for c in config
        if (c in _RUN_OPTIONS or c.startswith("opt_"))
        and grouped[c].agg(lambda v: v.astype(str).nunique()).max() > 1
    ]
    return extra


_SUMMARY_FIELDS = {
    "seed",
    "updates",
    "status",
    "steps_to_solve",
    "seconds_to_solve",
    "grad_evals_to_solve",
    "grad_equivalents_to_solve",
    "diverged_step",
    "final_eval_error",
    "run_seconds",
}


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Aggregate per-seed outcomes into one row per configuration.

    Columns: seeds, solved, success rate, median updates / gradient-equivalents /
    seconds to solve (over solved seeds), diverged seeds, run seconds.
    ``median_seq_grads`` is gradient-equivalents times the batch size (work in
    single-sequence gradients), comparable across optimizers with different batches.
    """
    if summary.empty:
        return pd.DataFrame()
    keys = group_columns(summary)
    summary = summary.copy()
    if "config_digest" in summary.columns:  # never pool two configurations
        keys = [*keys, "config_digest"]
    for col in ("steps_to_solve", "seconds_to_solve", "grad_equivalents_to_solve"):
        # Older run files may lack a column: it reads as missing, not as an error.
        summary[col] = pd.to_numeric(summary.get(col), errors="coerce")
    batch = pd.to_numeric(summary.get("batch_size", 1), errors="coerce")
    summary["sequence_grads"] = summary["grad_equivalents_to_solve"] * batch
    grouped = summary.groupby(keys, sort=True, dropna=False)
    table = pd.DataFrame(
        {
            "seeds": grouped.size(),
            "solved": grouped["status"].agg(lambda s: int((s == "solved").sum())),
            "success_rate": grouped["status"].agg(
                lambda s: float((s == "solved").mean())
            ),
            "median_steps": grouped["steps_to_solve"].median(),
            "median_grad_equiv": grouped["grad_equivalents_to_solve"].median(),
            "median_seq_grads": grouped["sequence_grads"].median(),
            "median_seconds": grouped["seconds_to_solve"].median(),
            "diverged": grouped["status"].agg(lambda s: int((s == "diverged").sum())),
            "run_seconds": grouped["run_seconds"].max(),
        }
    )
    table = table.reset_index()
    return table.drop(columns="config_digest", errors="ignore")


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """Plain text or Markdown (medians over solved seeds; '-' when none solved)."""
    if table.empty:
        return "(no runs)"
    shown = table.copy()
    shown["success_rate"] = shown["success_rate"].map(lambda x: f"{x:.0%}")
    for col, fmt in (
        ("median_steps", "{:.0f}"),
        ("median_grad_equiv", "{:.0f}"),
        ("median_seq_grads", "{:.3g}"),
        ("median_seconds", "{:.1f}"),
        ("run_seconds", "{:.1f}"),
    ):
        shown[col] = shown[col].map(lambda x, f=fmt: "-" if pd.isna(x) else f.format(x))
    if not markdown:
        return shown.to_string(index=False)
    rows = [list(shown.columns), ["---"] * len(shown.columns)]
    rows += [[str(v) for v in row] for row in shown.itertuples(index=False)]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def show(results: Results | str | Path, markdown: bool = False) -> str:
    """The formatted comparison table of a results directory (or loaded results)."""
    if not isinstance(results, Results):
        results = Results.load(results)
    return format_table(comparison_table(results.summary), markdown)
