"""Synthetic result frames shared by the plot and report tests.

Records, probes, growth rows and per-seed outcomes shaped as
:class:`analysis.results.Results` gives them, with known slopes and rates so that the
figures' fitted lines can be checked against closed forms.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.fit import fit_line

OPTIMIZERS = ("SGD", "SGD-C")
SEEDS = (0, 1, 2)


def make_records(lengths=(20, 40)) -> pd.DataFrame:
    """Two optimizers, three seeds, two lengths, ten evaluations."""
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        for k, name in enumerate(OPTIMIZERS):
            for seed in SEEDS:
                for step in range(10, 110, 10):
                    loss = np.exp(-step / (50 + 50 * k)) * (1 + 0.1 * rng.random())
                    grad = 10 ** rng.uniform(-1, 2)
                    rows.append(
                        {
                            "run_id": f"{name}-{length}", "task": "temporal_order",
                            "length": length, "init": "smart_tanh",
                            "optimizer": name, "seed": seed, "step": step,
                            "loss": loss, "eval_loss": loss, "eval_error": loss / 2,
                            "grad_norm_mean": grad, "grad_norm_max": 3 * grad,
                            "spectral_radius": 0.95 + 0.001 * step,
                        }
                    )  # fmt: skip
    return pd.DataFrame(rows)


def make_probes(exponent: float = 1.5) -> pd.DataFrame:
    """Probes with ``|curv_hessian| = 2 g^exponent`` and a few explosion probes."""
    rng = np.random.default_rng(1)
    rows = []
    for k, name in enumerate(OPTIMIZERS):
        for seed in SEEDS:
            for step in range(0, 100, 10):
                g = 10 ** rng.uniform(-1, 2)
                theta = np.sort(rng.normal(0, 1, 6)) * (1 + k)
                weights = rng.random(6)
                rows.append(
                    {
                        "run_id": f"run-{name}", "task": "temporal_order",
                        "length": 20, "init": "smart_tanh", "optimizer": name,
                        "seed": seed, "step": step,
                        "kind": "explosion" if step == 50 else "periodic",
                        "grad_norm": g, "curv_hessian": -2.0 * g**exponent,
                        "curv_gn": 0.5 * g**2, "smoothness": 0.5 + 0.3 * g,
                        "top_eigenvalue": float(theta[-1]),
                        "ritz_values": list(theta),
                        "ritz_weights": list(weights / weights.sum()),
                    }
                )  # fmt: skip
    return pd.DataFrame(rows)


def make_growth() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Growth rows (rates 0.1 for ||g||, 0.15 for c_H, 0.2 for c_G) and their fits."""
    rng = np.random.default_rng(2)
    rows = []
    for init in ("sigmoid", "smart_tanh"):
        for length in (10, 20, 30, 40):
            for seed in SEEDS:
                for batch in range(2):
                    noise = rng.normal(0, 0.05, 3)
                    g = np.exp(0.1 * length + noise[0])
                    ch = -np.exp(0.15 * length + noise[1])
                    cg = np.exp(0.2 * length + noise[2])
                    rows.append(
                        {
                            "task": "temporal_order", "init": init, "length": length,
                            "radius": np.nan, "source": "init", "seed": seed,
                            "batch": batch, "grad_norm": g, "curv_hessian": ch,
                            "curv_gn": cg, "ratio_hessian": ch / g, "ratio_gn": cg / g,
                        }
                    )  # fmt: skip
    rows = pd.DataFrame(rows)
    fits = []
    for init, part in rows.groupby("init"):
        for quantity in ("grad_norm", "curv_hessian", "curv_gn"):
            fit = fit_line(part["length"], np.log(part[quantity].abs()))
            fits.append(
                {
                    "init": init, "source": "init", "kind": "rate",
                    "quantity": quantity, "x": "length", "slope": fit.slope,
                    "slope_low": fit.slope_low, "slope_high": fit.slope_high,
                    "intercept": fit.intercept, "r2": fit.r2, "n": fit.n,
                }
            )  # fmt: skip
    return rows, pd.DataFrame(fits)


def make_summary() -> pd.DataFrame:
    """Per-seed outcomes: SGD-C solves more seeds at every length."""
    rows = []
    for init in ("sigmoid", "smart_tanh"):
        for length in (50, 100, 150):
            for k, name in enumerate(OPTIMIZERS):
                for seed in SEEDS:
                    solved = seed < k + 1 + (length == 50)
                    rows.append(
                        {
                            "task": "temporal_order", "init": init, "length": length,
                            "optimizer": name, "seed": seed,
                            "status": "solved" if solved else "unsolved",
                        }
                    )  # fmt: skip
    return pd.DataFrame(rows)
