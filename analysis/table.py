"""The comparison table: success rate and work to solve, with 95% intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import Results
from analysis.stats import (
    heldout_columns,
    heldout_names,
    interval_columns,
    time_to_target,
)

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
    config = [c for c in summary.columns if not _is_summary_field(c)]
    varying = [
        c
        for c in config
        if c not in _NOT_KEYS
        and c not in _RUN_OPTIONS
        and not c.startswith("opt_")
        and summary[c].astype(str).nunique(dropna=False) > 1
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
        and grouped[c].agg(lambda v: v.astype(str).nunique(dropna=False)).max() > 1
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
    "updates_to_target",
    "grad_equivalents_to_target",
    "seconds_to_target",
    "target_loss",
    "best_eval_loss",
    "best_updates",
    "best_step",
}


def _is_summary_field(column: str) -> bool:
    """A per-seed outcome column (not configuration)."""
    return column in _SUMMARY_FIELDS or (
        column.startswith("test_") and column.endswith("_at_best")
    )


def comparison_table(
    summary: pd.DataFrame,
    records: pd.DataFrame | None = None,
    target: tuple[str, float] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Aggregate per-seed outcomes into one row per configuration.

    Columns: seeds, solved, success rate with its Wilson interval (``success_lo``,
    ``success_hi``), median updates / gradient-equivalents / seconds to solve over
    the solved seeds with percentile-bootstrap intervals (``steps_lo``, ...;
    :func:`analysis.stats.interval_columns`), ``median_seq_grads``
    (gradient-equivalents times the batch size: work in single-sequence gradients,
    comparable across optimizers with different batches), diverged seeds, run
    seconds. With ``target = (column, value)`` and the ``records``: the median
    updates and gradient-equivalents until ``column`` first fell to ``value`` at an
    evaluation (``updates_to_target``, ``grad_equiv_to_target``, over all seeds,
    a seed that never reached it counting as infinite) and how many seeds reached it.
    For tasks with held-out data (no success test): the mean over seeds of the best
    validation loss (``val_loss``) and of the test measures at that evaluation
    (``test_loss``, ``test_bits_per_char``, ...), each with a Student-t interval
    (``*_lo``, ``*_hi``; :func:`analysis.stats.heldout_columns`).
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
    table = interval_columns(summary, keys, confidence)
    grouped = summary.groupby(keys, sort=True, dropna=False)
    solved = summary["status"] == "solved"
    extra = {
        "median_seq_grads": summary["sequence_grads"].where(solved).groupby(
            [summary[k] for k in keys], sort=True, dropna=False
        ).median(),
        "diverged": grouped["status"].agg(lambda s: int((s == "diverged").sum())),
        "run_seconds": grouped["run_seconds"].max(),
    }  # fmt: skip
    for name, values in extra.items():
        table[name] = values.to_numpy()
    order = [*keys, "seeds", "solved", "success_rate", "success_lo", "success_hi"]
    for name in ("steps", "grad_equiv"):
        order += [f"median_{name}", f"{name}_lo", f"{name}_hi"]
    order += ["median_seq_grads", "median_seconds", "seconds_lo", "seconds_hi"]
    table = table[[*order, "diverged", "run_seconds"]]
    if heldout_names(summary):
        held = heldout_columns(summary, keys, confidence)
        for column in held.columns[len(keys) :]:
            table[column] = held[column].to_numpy()
    if target is not None and records is not None and not records.empty:
        table = _with_target(table, records, keys, target)
    elif "updates_to_target" in summary.columns:  # the runs' own target_loss
        table = _declared_target(table, summary, keys)
    return table.drop(columns="config_digest", errors="ignore")


def _with_target(
    table: pd.DataFrame, records: pd.DataFrame, keys: list[str], target: tuple
) -> pd.DataFrame:
    column, value = target
    if column not in records.columns:
        raise ValueError(
            f"target column {column!r} is not in the records; valid: eval_loss, "
            "eval_error, loss"
        )
    parts = []
    for cost in ("updates", "grad_equivalents"):
        reached = time_to_target(records, value, column, cost)
        have = [k for k in keys if k in reached.columns]
        parts.append(
            reached.groupby(have, sort=True, dropna=False)[f"{cost}_to_target"].median()
        )
    parts.append(reached.groupby(have, sort=True, dropna=False)["reached"].sum())
    frame = pd.concat(parts, axis=1).reset_index()
    frame.columns = [*have, "updates_to_target", "grad_equiv_to_target", "reached"]
    return table.merge(frame, on=have, how="left")


def _declared_target(
    table: pd.DataFrame, summary: pd.DataFrame, keys: list[str]
) -> pd.DataFrame:
    """Medians over seeds of the time to the runs' own ``target_loss``.

    A seed that never reached its target counts as infinite; rows of runs that
    recorded no target leave their configuration's columns empty, and so do
    configurations whose seeds recorded different targets.
    """
    frame = summary[keys].copy()  # grouped as interval_columns groups the table
    recorded = (
        pd.to_numeric(summary["target_loss"], errors="coerce").notna()
        if "target_loss" in summary.columns
        else pd.Series(True, index=summary.index)
    )
    for column in ("updates_to_target", "grad_equivalents_to_target"):
        values = pd.to_numeric(summary[column], errors="coerce").fillna(np.inf)
        frame[column] = values.where(recorded)
    frame["target"] = summary.get("target_loss")
    frame["reached"] = (frame["updates_to_target"] < np.inf).astype(float)
    frame.loc[~recorded, "reached"] = np.nan
    grouped = frame.groupby(keys, sort=True, dropna=False)
    complete = grouped["updates_to_target"].agg(lambda v: v.notna().all())
    single = grouped["target"].agg(lambda v: v.nunique(dropna=False) <= 1)
    valid = (complete & single).to_numpy()
    out = table.copy()
    out["target"] = np.where(valid, grouped["target"].first().to_numpy(), np.nan)
    for column, name in (
        ("updates_to_target", "updates_to_target"),
        ("grad_equivalents_to_target", "grad_equiv_to_target"),
        ("reached", "reached"),
    ):
        agg = grouped[column].sum() if column == "reached" else grouped[column].median()
        out[name] = np.where(valid, agg.to_numpy(), np.nan)
    return out


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """Plain text or Markdown: medians over solved seeds ('-' when none solved),
    95% intervals in brackets (success: Wilson; medians: bootstrap over seeds)."""
    if table.empty:
        return "(no runs)"
    shown = table.copy()
    shown["success_rate"] = shown["success_rate"].map(lambda x: f"{x:.0%}")
    shown.insert(
        shown.columns.get_loc("success_rate") + 1,
        "success_95",
        [f"[{lo:.0%}, {hi:.0%}]" for lo, hi in zip(
            table["success_lo"], table["success_hi"], strict=True)],
    )  # fmt: skip
    for name in ("steps", "grad_equiv"):
        shown.insert(
            shown.columns.get_loc(f"median_{name}") + 1,
            f"{name}_95",
            [_bracket(lo, hi) for lo, hi in zip(
                table[f"{name}_lo"], table[f"{name}_hi"], strict=True)],
        )  # fmt: skip
    hidden = [f"{n}_{e}" for n in ("success", "steps", "grad_equiv", "seconds")
              for e in ("lo", "hi")]  # fmt: skip
    shown = shown.drop(columns=hidden)
    shown = _heldout_display(table, shown)
    for col, fmt in (
        ("median_steps", "{:.0f}"),
        ("median_grad_equiv", "{:.0f}"),
        ("median_seq_grads", "{:.3g}"),
        ("median_seconds", "{:.1f}"),
        ("run_seconds", "{:.1f}"),
        ("updates_to_target", "{:.0f}"),
        ("grad_equiv_to_target", "{:.0f}"),
    ):
        if col in shown.columns:
            shown[col] = shown[col].map(
                lambda x, f=fmt: "-" if pd.isna(x) or np.isinf(x) else f.format(x)
            )
    return markdown_table(shown) if markdown else shown.to_string(index=False)


#: Columns about solving, left out of a table whose rows all have held-out data.
_SOLVING = [
    "solved", "success_rate", "success_95", "median_steps", "steps_95",
    "median_grad_equiv", "grad_equiv_95", "median_seq_grads", "median_seconds",
]  # fmt: skip


def _heldout_display(table: pd.DataFrame, shown: pd.DataFrame) -> pd.DataFrame:
    """Held-out means as text with their intervals (``val_loss``, ``val_loss_95``,
    ...); the solving columns go when every row is a task without a success test."""
    means = [c for c in table.columns if f"{c}_lo" in table.columns]
    means = [c for c in means if c.startswith(("val_", "test_"))]
    if not means:
        return shown
    for name in means:
        shown[name] = table[name].map(lambda x: "-" if pd.isna(x) else f"{x:.4g}")
        shown[f"{name}_95"] = [
            "-" if pd.isna(lo) else f"[{lo:.4g}, {hi:.4g}]"
            for lo, hi in zip(table[f"{name}_lo"], table[f"{name}_hi"], strict=True)
        ]
        shown = shown.drop(columns=[f"{name}_lo", f"{name}_hi"])
    if table[means[0]].notna().all():
        shown = shown.drop(columns=[c for c in _SOLVING if c in shown.columns])
    pairs = [c for name in means for c in (name, f"{name}_95")]
    rest = [c for c in shown.columns if c not in pairs]
    at = rest.index("seeds") + 1
    return shown[rest[:at] + pairs + rest[at:]]


def markdown_table(frame: pd.DataFrame) -> str:
    """A frame of display strings as a Markdown table."""
    rows = [list(frame.columns), ["---"] * len(frame.columns)]
    rows += [[str(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def _bracket(lo: float, hi: float) -> str:
    if pd.isna(lo):
        return "-"
    hi_text = "inf" if np.isinf(hi) else f"{hi:.0f}"
    return f"[{lo:.0f}, {hi_text}]"


def explosion_table(records: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Gradient explosions per configuration (the rows of :func:`comparison_table`).

    A step explodes when its gradient norm exceeds ``explosion_factor`` times the
    running mean of the earlier norms (the runner's records, ``explosion_rate`` per
    chunk). Columns: ``seeds``; ``exploding_seeds`` (seeds with at least one
    explosion); ``explosions_per_1k`` (explosions per 1,000 training steps, mean
    over seeds); ``first_explosion`` (median over the exploding seeds of the step
    count at the end of the chunk of their first explosion); ``grad_norm_max``
    (largest gradient norm of any step) and, when the optimizer clips,
    ``clip_rate`` (fraction of clipped steps over all seeds and chunks).
    """
    if records.empty or "explosion_rate" not in records.columns:
        return pd.DataFrame()
    keys = [k for k in group_columns(summary) if k in records.columns]
    if "config_digest" in records.columns:
        keys = [*keys, "config_digest"]
    rows = []
    for values, group in records.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, values if isinstance(values, tuple) else (values,),
                       strict=True))  # fmt: skip
        per_seed = []
        for _, seed in group.sort_values("step").groupby(_seed_keys(group)):
            steps = np.diff(seed["step"].to_numpy(dtype=float), prepend=0.0)
            counts = seed["explosion_rate"].to_numpy(dtype=float) * steps
            first = seed["step"].to_numpy()[np.flatnonzero(counts > 0)[:1]]
            per_seed.append((counts.sum(), steps.sum(), first))
        firsts = [float(f[0]) for _, _, f in per_seed if f.size]
        row["seeds"] = len(per_seed)
        row["exploding_seeds"] = sum(1 for c, _, _ in per_seed if c > 0)
        row["explosions_per_1k"] = float(
            np.mean([1000.0 * c / max(n, 1.0) for c, n, _ in per_seed])
        )
        row["first_explosion"] = float(np.median(firsts)) if firsts else np.nan
        row["grad_norm_max"] = float(group["grad_norm_max"].max())
        if "clip_rate" in group.columns:
            row["clip_rate"] = float(group["clip_rate"].mean())
        rows.append(row)
    return pd.DataFrame(rows).drop(columns="config_digest", errors="ignore")


def _seed_keys(records: pd.DataFrame) -> list[str]:
    return [k for k in ("run_id", "seed") if k in records.columns]


def show(
    results: Results | str | Path,
    markdown: bool = False,
    target: tuple[str, float] | None = None,
    explosions: bool = False,
) -> str:
    """The formatted comparison table of a results directory (or loaded results),
    followed by what tuning chose when the comparison was tuned, and with
    ``explosions`` by the :func:`explosion_table`."""
    if not isinstance(results, Results):
        results = Results.load(results)
    records = results.records if target is not None else None
    text = format_table(comparison_table(results.summary, records, target), markdown)
    from analysis.sensitivity import format_tuning  # it formats with this module

    tuning = format_tuning(results.tuning, markdown)
    text += "\n\n" + tuning if tuning else ""
    if explosions:
        table = explosion_table(results.records, results.summary)
        if not table.empty:
            shown = table.round(3).astype(str).replace("nan", "-")
            body = markdown_table(shown) if markdown else shown.to_string(index=False)
            text += "\n\nGradient explosions:\n" + body
    return text
