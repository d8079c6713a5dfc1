"""Performance profiles against hand-computed ratios, costs and figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from analysis.profiles import (
    performance_profile,
    performance_ratios,
    problem_costs,
    problem_keys,
    profile_figure,
    profile_scores,
)
from analysis.results import config_columns

INF = np.inf


def _costs(c_on_p1: float = INF) -> pd.DataFrame:
    """Three problems, three solvers; nobody solves p3."""
    return pd.DataFrame(
        {"A": [10.0, 30.0, INF], "B": [20.0, 15.0, INF], "C": [c_on_p1, 45.0, INF]},
        index=["p1", "p2", "p3"],
    )


def test_ratios_by_hand():
    ratios = performance_ratios(_costs())
    expected = pd.DataFrame(
        {"A": [1.0, 2.0, INF], "B": [2.0, 1.0, INF], "C": [INF, 3.0, INF]},
        index=["p1", "p2", "p3"],
    )
    pd.testing.assert_frame_equal(ratios, expected)


@pytest.mark.parametrize("c_on_p1", [INF, np.nan])  # NaN: C not run on p1
def test_profile_by_hand(c_on_p1):
    profile = performance_profile(_costs(c_on_p1), [0.5, 1.0, 1.5, 2.0, 3.0, 100.0])
    # The unsolved p3 stays in the denominator: nobody passes 2/3.
    expected = pd.DataFrame(
        {
            "A": [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3],
            "B": [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3],
            "C": [0, 0, 0, 0, 1 / 3, 1 / 3],
        },
        index=pd.Index([0.5, 1.0, 1.5, 2.0, 3.0, 100.0], name="tau"),
    )
    pd.testing.assert_frame_equal(profile, expected)


def test_ties_are_all_best():
    costs = pd.DataFrame({"A": [5.0], "B": [5.0]})
    assert performance_profile(costs, [1.0]).iloc[0].tolist() == [1.0, 1.0]


def test_non_positive_costs_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        performance_ratios(pd.DataFrame({"A": [0.0], "B": [1.0]}))


def _config(length, label, lr, seeds):
    return {
        "task": {"name": "addition", "length": length, "hidden": 6},
        "optimizer": {"name": label.lower(), "hparams": {"learning_rate": lr}},
        "label": label, "seeds": seeds, "steps": 400, "eval_every": 10,
        "run_id": f"{label}-{length}-{lr}",
    }  # fmt: skip


def _summary() -> pd.DataFrame:
    """SGD: L10 [100, 300, unsolved], L20 [200, diverged, unsolved].

    HF at L10 with lr 1: [50, 70, unsolved, unsolved]; with lr 2: [40, 60, 80];
    HF never ran at L20.
    """
    runs = [
        (_config(10, "SGD", 0.1, [0, 1, 2]), [100, 300, "unsolved"]),
        (_config(20, "SGD", 0.1, [0, 1, 2]), [200, "diverged", "unsolved"]),
        (_config(10, "HF", 1.0, [0, 1, 2, 3]), [50, 70, "unsolved", "unsolved"]),
        (_config(10, "HF", 2.0, [0, 1, 2]), [40, 60, 80]),
    ]
    rows = []
    for config, outcomes in runs:
        for seed, outcome in zip(config["seeds"], outcomes, strict=True):
            solved = not isinstance(outcome, str)
            steps = float(outcome) if solved else np.nan
            rows.append(
                {"seed": seed, "status": "solved" if solved else outcome,
                 "steps_to_solve": steps, "grad_equivalents_to_solve": 3 * steps,
                 "seconds_to_solve": steps / 100, "run_seconds": 1.0,
                 **config_columns(config)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_a_problem_is_the_task_configuration():
    assert problem_keys(_summary()) == ["task", "length"]


@pytest.mark.parametrize(
    ("cost", "scale"), [("updates", 1.0), ("grad_equivalents", 3.0), ("seconds", 0.01)]
)
def test_problem_costs_take_the_median_seed_with_unsolved_infinite(cost, scale):
    costs = problem_costs(_summary(), cost)
    assert sorted(costs.columns) == ["HF", "SGD"]
    assert list(costs.index) == [("addition", 10), ("addition", 20)]
    # SGD L10: median(100, 300, inf) = 300; L20: median(200, inf, inf) = inf.
    assert costs.loc[("addition", 10), "SGD"] == pytest.approx(300 * scale)
    assert costs.loc[("addition", 20), "SGD"] == INF
    # HF L10: lr 1 gives median(50, 70, inf, inf) = inf, lr 2 gives 60: the cheaper.
    assert costs.loc[("addition", 10), "HF"] == pytest.approx(60 * scale)
    assert np.isnan(costs.loc[("addition", 20), "HF"])  # not run


def test_problem_costs_reject_unknown_costs():
    with pytest.raises(ValueError, match="grad_equivalents"):
        problem_costs(_summary(), "flops")


def test_profile_of_the_summary():
    profile = performance_profile(problem_costs(_summary(), "updates"), [1.0, 5.0])
    # L10: HF 60 (ratio 1), SGD 300 (ratio 5); L20: nobody.
    assert profile["HF"].tolist() == [0.5, 0.5]
    assert profile["SGD"].tolist() == [0.0, 0.5]


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_figure_has_one_panel_per_cost():
    fig = profile_figure(_summary())
    assert isinstance(fig.canvas, FigureCanvasAgg)
    axes = _visible(fig)
    assert len(axes) == 3
    for ax in axes:
        assert ax.get_xscale() == "log"
        assert ax.get_xlim()[0] == pytest.approx(1.0)
        assert len(ax.get_lines()) == 2  # one curve per optimizer
    assert "infinite" in fig.get_suptitle()
    assert len(fig.legends) == 1
    fig.canvas.draw()


def test_figure_with_one_cost_and_a_missing_column():
    fig = profile_figure(_summary(), costs=("updates",), max_tau=16)
    assert len(_visible(fig)) == 1
    assert _visible(fig)[0].get_xlim() == pytest.approx((1.0, 16.0))
    partial = _summary().drop(columns="seconds_to_solve")
    fig = profile_figure(partial, costs=("updates", "seconds"))
    assert len(_visible(fig)) == 2
    assert len(_visible(fig)[1].get_lines()) == 0
    with pytest.raises(ValueError, match="updates"):
        profile_figure(_summary(), costs=("flops",))


def test_profile_scores_integrate_the_step_function():
    # Two problems. A is fastest on both (ratio 1, 1); B has ratios 2 and inf;
    # C has ratio 4 and 3. Over tau in [1, 4]: A's profile is 1 everywhere (score
    # 1); B's is 1/2 from tau = 2 on: (4 - 2) / 3 / 2 = 1/3; C's is 1/2 from 3
    # and 1 from 4: ((4 - 4) + (4 - 3)) / 3 / 2 = 1/6.
    costs = pd.DataFrame(
        {"A": [10.0, 5.0], "B": [20.0, np.inf], "C": [40.0, 15.0]},
        index=pd.Index(["p1", "p2"], name="task"),
    )
    scores = profile_scores(costs, max_tau=4.0)
    np.testing.assert_allclose(scores[["A", "B", "C"]], [1.0, 1 / 3, 1 / 6])
    # The same by numerical integration of the profile on a fine grid.
    taus = np.linspace(1.0, 4.0, 300_001)
    rho = performance_profile(costs, taus)
    numeric = np.trapezoid(rho.to_numpy(), taus, axis=0) / 3.0
    np.testing.assert_allclose(scores.to_numpy(), numeric, atol=1e-4)
