"""The tuning protocol: search spaces, quasi-random trials, selection, held-out seeds.

A comparison file with a ``[tuning]`` table tunes every optimizer that declares a
``search`` space, the way DeepOBS (Schneider et al. 2019), Schmidt et al. (2021) and
AlgoPerf (Dahl et al. 2023) compare optimizers::

    seeds = 5                      # held-out seeds: the only ones in the final table

    [tuning]
    trials = 8                     # trials per optimizer and task configuration
    seeds = 2                      # tuning seeds (default: the 2 after the held-out)
    sampler = "sobol"              # "sobol", "halton" or "grid"
    criterion = "grad_equivalents" # then "updates", "seconds" or "eval_loss"
    steps = 1000                   # run options of the trials only (optional)

    [[optimizer]]
    name = "sgd_clip"
    search = { learning_rate = { log_uniform = [1e-3, 1.0] }, threshold = [1, 10] }

    [[optimizer]]
    name = "sgd"
    search = "deepobs_lr"          # learning rate on a log scale over [1e-5, 1e2]

For each task configuration and tuned optimizer, a *study* draws ``trials`` points
from a scrambled quasi-random sequence over the unit cube (:mod:`scipy.stats.qmc`,
one dimension per hyperparameter, the same sequence for every optimizer with the
same number of dimensions) and maps each coordinate ``u`` to a value: ``lo + u (hi -
lo)`` (uniform), ``lo (hi / lo)^u`` (log-uniform), or the ``floor(u n)``-th of ``n``
listed choices. Every trial trains on the tuning seeds. The best trial is the one that
minimizes, in order:

1. minus the fraction of tuning seeds solved;
2. the median cost to solve over the solved seeds (updates, gradient-equivalents or
   seconds, the ``criterion``), infinite when none solved;
3. the median final evaluation loss (a diverged seed's is infinite).

With ``criterion = "eval_loss"`` (tasks without a success test) only the median
final evaluation loss counts. A trial that diverges, or fails, is infinitely slow:
it is never chosen over one that finished, and it is never an error. Ties go to the
earlier trial. The chosen configuration trains again on the held-out seeds, and only
those runs enter the comparison table; the trials are written to ``tuning/`` below
the results directory and summarized in ``<name>.tuning.json``.

Every trial's configuration, and its held-out twin, is validated when the file is
read, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.stats import COST_COLUMNS
from tasks.hparams import ConfigError

SAMPLERS = ("sobol", "halton", "grid")
CRITERIA = ("grad_equivalents", "updates", "seconds", "eval_loss")
KINDS = ("log_uniform", "uniform", "choice")
#: Named search spaces. ``deepobs_lr``: the learning rate alone on a log scale over
#: DeepOBS's range, 1e-5 to 1e2 (Schneider et al. 2019 used 36 grid points there:
#: ``trials = 36, sampler = "grid"`` gives exactly that grid).
PRESETS = {"deepobs_lr": {"learning_rate": {"log_uniform": [1e-5, 1e2]}}}
#: Keys of the [tuning] table besides run options.
TUNING_FIELDS = ("trials", "seeds", "sampler", "criterion", "seed")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One tuned hyperparameter: its name and how ``u`` in [0, 1) maps to a value."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def value(self, u: float) -> Any:
        """The hyperparameter value at unit coordinate ``u``."""
        if self.kind == "choice":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.kind == "log_uniform":
            ratio = math.log(self.high / self.low)
            return float(math.exp(math.log(self.low) + u * ratio))
        return float(self.low + u * (self.high - self.low))

    def describe(self) -> dict:
        """The dimension as written in a comparison file."""
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        return {self.kind: [self.low, self.high]}


def _dimension(name: str, spec: Any, where: str) -> Dimension:
    field = f"{where}: search.{name}"
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{field} must be one of {{log_uniform = [lo, hi]}}, {{uniform = [lo, hi]}}"
            f" or a list of choices, got {spec!r}"
        )
    ((kind, values),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{field}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{field}.{kind} must be a non-empty list")
    if kind == "choice":
        return Dimension(name, kind, choices=tuple(values))
    if len(values) != 2 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in values
    ):
        raise ConfigError(f"{field}.{kind} = {values!r} must be two finite numbers")
    low, high = (float(v) for v in values)
    if not low < high:
        raise ConfigError(f"{field}.{kind} = {values!r} needs low < high")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{field}.log_uniform = {values!r} needs 0 < low")
    return Dimension(name, kind, low, high)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The tuned hyperparameters of one optimizer (in the file's order)."""

    dims: tuple[Dimension, ...]

    @classmethod
    def parse(cls, spec: Any, where: str) -> SearchSpace:
        """From a ``search`` value: a table of dimensions or a preset's name."""
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise ConfigError(
                    f"{where}: unknown search preset {spec!r}; valid: "
                    f"{', '.join(PRESETS)}"
                )
            spec = PRESETS[spec]
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(
                f"{where}: 'search' must be a non-empty table of hyperparameter "
                f"ranges or a preset ({', '.join(PRESETS)})"
            )
        return cls(tuple(_dimension(k, v, where) for k, v in spec.items()))

    def describe(self) -> dict:
        return {d.name: d.describe() for d in self.dims}

    def points(self, n: int, sampler: str, seed: int) -> list[dict]:
        """``n`` hyperparameter settings from the sampler's unit-cube points."""
        units = unit_points(n, len(self.dims), sampler, seed)
        return [
            {d.name: d.value(float(u)) for d, u in zip(self.dims, row, strict=True)}
            for row in units
        ]


def unit_points(n: int, d: int, sampler: str, seed: int) -> np.ndarray:
    """``[n, d]`` points in [0, 1)^d.

    ``sobol``: the first ``n`` points of a scrambled Sobol sequence (Owen
    scrambling; drawn as the next power of two and cut, so no balance warning);
    ``halton``: a scrambled Halton sequence; ``grid``: one dimension only, the
    midpoints ``(i + 1/2) / n`` stretched to the ends ``i / (n - 1)`` so that the
    grid includes both ends of the range (DeepOBS's log grid).
    """
    if sampler == "grid":
        if d != 1:
            raise ConfigError(
                f"tuning sampler 'grid' takes one tuned hyperparameter, not {d}; "
                "use 'sobol' or 'halton'"
            )
        # n points from low to high inclusive; the top is nudged below 1 so a
        # choice dimension's last option stays reachable.
        return (np.linspace(0.0, 1.0, n) * (1 - 1e-12))[:, None]
    # Imported here: scipy.stats takes about a second to import, and every executor
    # worker reads this module without drawing tuning points.
    from scipy.stats import qmc

    rng = np.random.default_rng(seed)
    if sampler == "sobol":
        draws = qmc.Sobol(d, scramble=True, seed=rng).random_base2(
            max(0, math.ceil(math.log2(n)))
        )
        return draws[:n]
    return qmc.Halton(d, scramble=True, seed=rng).random(n)


@dataclasses.dataclass(frozen=True)
class TuningSpec:
    """The [tuning] table: trial budget, tuning seeds, sampler and criterion."""

    trials: int = 8
    seeds: tuple[int, ...] = ()
    sampler: str = "sobol"
    criterion: str = "grad_equivalents"
    seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "trials": self.trials, "seeds": list(self.seeds), "sampler": self.sampler,
            "criterion": self.criterion, "seed": self.seed, "options": self.options,
        }  # fmt: skip


def _int_field(table: dict, key: str, default: int, low: int, high: int) -> int:
    value = table.get(key, default)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or not low <= value <= high:
        raise ConfigError(
            f"tuning field {key!r} = {value!r} must be an integer in [{low}, {high}]"
        )
    return value


def _choice_field(table: dict, key: str, default: str, valid: tuple) -> str:
    value = table.get(key, default)
    if value not in valid:
        raise ConfigError(
            f"tuning field {key!r} = {value!r}; valid: {', '.join(valid)}"
        )
    return value


def parse_tuning(
    table: Any, held_out: tuple[int, ...], option_names: tuple[str, ...]
) -> TuningSpec:
    """Validate the [tuning] table; ``held_out`` are the comparison's seeds.

    ``seeds`` is a count (that many seeds following the largest held-out seed) or a
    list, and must not share a seed with the held-out seeds.
    """
    if not isinstance(table, dict):
        raise ConfigError("comparison field 'tuning' must be a [tuning] table")
    valid = (*TUNING_FIELDS, *option_names)
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown tuning field {unknown[0]!r}; valid: {', '.join(valid)}"
        )
    trials = _int_field(table, "trials", 8, 1, 10_000)
    seed = _int_field(table, "seed", 0, 0, 2**31 - 1)
    sampler = _choice_field(table, "sampler", "sobol", SAMPLERS)
    criterion = _choice_field(table, "criterion", "grad_equivalents", CRITERIA)
    seeds = _tuning_seeds(table.get("seeds", 2), held_out)
    options = {k: v for k, v in table.items() if k not in TUNING_FIELDS}
    return TuningSpec(trials, seeds, sampler, criterion, seed, options)


def _tuning_seeds(value: Any, held_out: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 4096:
            raise ConfigError(f"tuning field 'seeds' = {value} must be in [1, 4096]")
        start = max(held_out) + 1
        return tuple(range(start, start + value))
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"tuning field 'seeds' = {value!r} must be a count or a list of seeds"
        )
    shared = sorted(set(value) & set(held_out))
    if shared:
        raise ConfigError(
            f"tuning field 'seeds' shares seed {shared[0]} with the held-out 'seeds' "
            f"{list(held_out)}; tuning and held-out seeds must be disjoint"
        )
    return tuple(value)


# ------------------------------------------------------------------------ selection
@dataclasses.dataclass(frozen=True)
class Study:
    """One tuned optimizer on one task configuration: its trials and held-out runs.

    ``trials[i]`` trains ``points[i]`` on the tuning seeds; ``held_out[i]`` is the
    same configuration on the held-out seeds (validated up front, trained only for
    the chosen trial).
    """

    label: str
    space: SearchSpace
    points: tuple[dict, ...]
    trials: tuple  # RunConfig, one per point
    held_out: tuple  # RunConfig, one per point


def trial_score(
    summary: pd.DataFrame | None, records: pd.DataFrame | None, criterion: str
) -> dict:
    """A trial's outcome on the tuning seeds (None for a trial that failed).

    ``solved_fraction``; ``median_cost``: median of the criterion's cost to solve
    over the solved seeds (inf when none solved; NaN for ``eval_loss``);
    ``final_loss``: median over seeds of the last evaluation loss, a diverged or
    non-finite one counting as inf (on a task with held-out data: of the best
    validation loss, which early stopping would keep).
    """
    inf = math.inf
    if summary is None or summary.empty:
        return {"solved_fraction": 0.0, "median_cost": inf, "final_loss": inf}
    solved = (summary["status"] == "solved").to_numpy()
    cost = math.nan
    if criterion in COST_COLUMNS:
        values = pd.to_numeric(summary[COST_COLUMNS[criterion]], errors="coerce")
        values = values.to_numpy(dtype=float)[solved]
        cost = float(np.median(values)) if values.size else inf
    return {
        "solved_fraction": float(solved.mean()),
        "median_cost": cost,
        "final_loss": _final_loss(summary, records),
    }


def _final_loss(summary: pd.DataFrame, records: pd.DataFrame | None) -> float:
    if "best_eval_loss" in summary:  # held-out data: the best validation loss
        best = pd.to_numeric(summary["best_eval_loss"], errors="coerce")
        return float(np.median(best.fillna(math.inf).to_numpy(dtype=float)))
    losses = []
    last = {}
    if records is not None and not records.empty and "eval_loss" in records:
        for seed, rows in records.sort_values("step").groupby("seed"):
            last[seed] = float(rows["eval_loss"].iloc[-1])
    for seed, status in zip(summary["seed"], summary["status"], strict=True):
        loss = last.get(seed, math.inf)
        losses.append(math.inf if status == "diverged" or not math.isfinite(loss)
                      else loss)  # fmt: skip
    return float(np.median(losses))


def rank_key(score: dict, criterion: str) -> tuple[float, ...]:
    """What :func:`choose` minimizes (see the module docstring)."""
    if criterion == "eval_loss":
        return (score["final_loss"],)
    return (-score["solved_fraction"], score["median_cost"], score["final_loss"])


def choose(scores: list[dict], criterion: str) -> int:
    """The index of the best trial; ties go to the earlier one."""
    if not scores:
        raise ValueError("choose: no trials")
    return min(range(len(scores)), key=lambda i: (rank_key(scores[i], criterion), i))
