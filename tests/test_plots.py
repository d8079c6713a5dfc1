"""Tests of analysis.plots and analysis.curvature_plots on small synthetic frames."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
from frames import (
    OPTIMIZERS,
    SEEDS,
    make_growth,
    make_probes,
    make_records,
    make_summary,
)
from matplotlib.figure import Figure

from analysis import curvature_plots as cp
from analysis import plots
from analysis.fit import loglog_slope

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def legend_texts(fig: Figure) -> str:
    """All legend texts of a figure (figure and axes legends), joined."""
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes]
    return "\n".join(
        t.get_text() for leg in legends if leg is not None for t in leg.get_texts()
    )


def visible_axes(fig: Figure) -> list:
    return [
        ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"
    ]


def assert_optimizers_in_legend(fig: Figure) -> None:
    text = legend_texts(fig)
    for name in OPTIMIZERS:
        assert name in text, (name, text)


def test_optimizer_palette_depends_only_on_the_label_set():
    a = plots.optimizer_palette(["SGD-C", "HF", "SGD", "HF"])
    b = plots.optimizer_palette(["HF", "SGD", "SGD-C"])
    assert a == b and list(a) == ["HF", "SGD", "SGD-C"]
    assert len(set(a.values())) == 3
    assert len(plots.optimizer_palette(f"opt{i}" for i in range(14))) == 14


def test_training_curves_one_panel_per_configuration():
    fig = plots.training_curves(make_records())
    axes = visible_axes(fig)
    assert isinstance(fig, Figure) and len(axes) == 2
    assert {ax.get_title() for ax in axes} == {
        "temporal_order, length 20, smart_tanh",
        "temporal_order, length 40, smart_tanh",
    }
    for ax in axes:
        assert ax.get_xlabel() == "update step"
        assert ax.get_ylabel().startswith("evaluation loss")
        assert ax.get_yscale() == "log"
    assert_optimizers_in_legend(fig)
    assert "min-max" in fig.get_suptitle()


def test_training_curves_error_is_linear():
    fig = plots.training_curves(make_records(lengths=(20,)), y="eval_error", band=50)
    (ax,) = visible_axes(fig)
    assert ax.get_ylabel().startswith("evaluation error")
    assert ax.get_yscale() == "linear"
    assert "middle 50%" in fig.get_suptitle()


def test_traces_gradient_norm_and_spectral_radius():
    fig = plots.traces(make_records(lengths=(20,)))
    top, bottom = visible_axes(fig)
    assert top.get_yscale() == "log" and "gradient norm" in top.get_ylabel()
    assert "spectral radius" in bottom.get_ylabel()
    assert any(ln.get_linestyle() == "--" for ln in top.get_lines())
    threshold = [ln for ln in bottom.get_lines() if ln.get_linestyle() == ":"]
    assert threshold and np.allclose(threshold[0].get_ydata(), 1.0)  # tanh: 1/gamma
    text = legend_texts(fig)
    assert "explosion threshold" in text and "Pascanu" in text
    assert_optimizers_in_legend(fig)


def test_explosion_threshold():
    assert plots.explosion_threshold("temporal_order", "sigmoid") == 4.0
    assert plots.explosion_threshold("wall", None) == 4.0
    assert plots.explosion_threshold("addition", "basic_tanh") == 1.0
    assert plots.explosion_threshold("addition", float("nan")) is None


def data_lines(ax) -> list:
    """The series of a success plot: lines with the init markers (not bar caps)."""
    return [ln for ln in ax.get_lines() if ln.get_marker() in list("osD^vP*X")]


def wilson(k: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95% Wilson score interval in closed form (Wilson 1927)."""
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


def test_success_vs_length():
    fig = plots.success_vs_length(make_summary())
    (ax,) = visible_axes(fig)
    assert ax.get_xlabel() == "sequence length T"
    assert ax.get_ylabel() == "success rate (fraction of seeds solved)"
    low, high = ax.get_ylim()
    assert -0.05 < low <= 0 and 1 <= high < 1.05
    lines = data_lines(ax)
    assert len(lines) == 4  # 2 optimizers x 2 initializations
    ys = np.concatenate([ln.get_ydata() for ln in lines])
    np.testing.assert_allclose(np.unique(ys.round(9)), [1 / 3, 2 / 3, 1.0])
    # Series are shifted sideways by at most 15% of the gap (50) between lengths,
    # symmetrically around each length.
    xs = np.stack([ln.get_xdata() for ln in lines])
    shift = xs - np.array([50, 100, 150])
    assert np.abs(shift).max() <= 7.5 + 1e-9 and np.ptp(shift, axis=1).max() < 1e-9
    np.testing.assert_allclose(np.sort(shift[:, 0]), [-7.5, -2.5, 2.5, 7.5])
    text = legend_texts(fig)
    assert "init: sigmoid" in text and "init: smart_tanh" in text
    assert_optimizers_in_legend(fig)
    assert "95% Wilson" in fig.get_suptitle()


def test_success_vs_length_draws_wilson_intervals():
    fig = plots.success_vs_length(make_summary())
    (ax,) = visible_axes(fig)
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 4
    segments = np.concatenate([c.lines[2][0].get_segments() for c in bars])
    assert len(segments) == 12  # 4 series x 3 lengths
    # 3 seeds per point: the intervals of 1, 2 and 3 solved (hand-checked values).
    expected = {
        1: (0.0614919, 0.7923404),
        2: (0.2076596, 0.9385081),
        3: (0.4385030, 1.0),
    }
    for k, bounds in expected.items():
        np.testing.assert_allclose(wilson(k, 3), bounds, atol=1e-6)
    rate_at = {
        float(x): float(y)
        for ln in data_lines(ax)
        for x, y in zip(ln.get_xdata(), ln.get_ydata(), strict=True)
    }  # the dodged x of each point is unique
    for (x0, lo), (x1, hi) in segments:
        assert x0 == x1
        k = round(3 * rate_at[float(x0)])
        np.testing.assert_allclose([lo, hi], expected[k], atol=1e-6)
    rates = plots.success_rates(make_summary())
    row = rates.query("optimizer == 'SGD' and init == 'sigmoid' and length == 100")
    assert row[["solved", "seeds"]].to_numpy().tolist() == [[1, 3]]
    np.testing.assert_allclose(row[["low", "high"]].to_numpy()[0], wilson(1, 3))
    zero = plots.success_rates(make_summary().assign(status="unsolved"))
    assert (zero["low"] == 0).all() and np.allclose(zero["high"], wilson(0, 3)[1])


def retired_records() -> pd.DataFrame:
    """Three AdaHessian seeds; seeds 0 and 1 are solved at step 1000 and retired.

    Seed 2 keeps training with a high loss: without the solved seeds the median
    would "rise" from 0.007 at step 1000 to 1.4 at step 1500.
    """
    losses = {0: [0.9, 0.007], 1: [1.1, 0.004], 2: [1.2, 1.4, 1.4, 1.3]}
    rows = []
    for seed, values in losses.items():
        for i, loss in enumerate(values):
            step = 500 * (i + 1)
            status = "solved" if seed < 2 and i == 1 else "running"
            rows.append(
                {
                    "run_id": "ah", "task": "temporal_order", "length": 30,
                    "init": "basic_tanh", "optimizer": "AdaHessian", "seed": seed,
                    "step": step, "eval_loss": loss, "eval_error": loss / 2,
                    "grad_norm_mean": 1.0 + seed, "spectral_radius": 1.0 + 0.1 * i,
                    "grad_equivalents": 3 * step, "seconds": step / 100,
                    "status": status,
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_solved_seeds_are_carried_forward_so_the_median_does_not_jump():
    records = retired_records()
    curves = plots.seed_curves(records, "step", ["eval_loss"])
    stats = plots.median_band(curves, "eval_loss")
    np.testing.assert_array_equal(stats["x"], [500, 1000, 1500, 2000])
    # By hand: median(0.9, 1.1, 1.2); then median(0.007, 0.004, 1.4 / 1.4 / 1.3).
    np.testing.assert_allclose(stats["median"], [1.1, 0.007, 0.007, 0.007])
    np.testing.assert_allclose(stats["low"], [0.9, 0.004, 0.004, 0.004])
    np.testing.assert_allclose(stats["high"], [1.2, 1.4, 1.4, 1.3])
    np.testing.assert_array_equal(stats["seeds"], [3, 3, 3, 3])
    carried = curves[curves["carried"]]
    assert set(carried["curve"]) == {"ah/AdaHessian/0", "ah/AdaHessian/1"}
    np.testing.assert_array_equal(sorted(set(carried["x"])), [1500, 2000])
    # Without carrying, the median is seed 2's alone after step 1000: the jump.
    plain = plots.median_band(
        plots.seed_curves(records, "step", ["eval_loss"], carry=False), "eval_loss"
    )
    np.testing.assert_allclose(plain["median"], [1.1, 0.007, 1.4, 1.3])
    # The figure draws the carried median and says so.
    fig = plots.training_curves(records)
    (ax,) = visible_axes(fig)
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), [500, 1000, 1500, 2000])
    np.testing.assert_allclose(line.get_ydata(), [1.1, 0.007, 0.007, 0.007])
    assert "solved seeds carried forward" in fig.get_suptitle()
    assert "carried" not in plots.training_curves(make_records()).get_suptitle()


def test_work_axis_interpolates_seeds_onto_a_common_grid():
    # Work differs between seeds, so no x is shared by all of them.
    rows = [
        (0, 100, 0.4, "running"), (0, 200, 0.0, "solved"),
        (1, 150, 0.6, "running"), (1, 300, 0.0, "solved"),
        (2, 120, 0.5, "running"), (2, 240, 0.5, "running"),
        (2, 360, 0.5, "running"), (2, 480, 0.5, "running"),
    ]  # fmt: skip
    records = pd.DataFrame(
        rows, columns=["seed", "grad_equivalents", "eval_error", "status"]
    ).assign(optimizer="HF", task="temporal_order", step=0)
    curves = plots.seed_curves(records, "grad_equivalents", ["eval_error"])
    stats = plots.median_band(curves, "eval_error")
    grid = [100, 120, 150, 200, 240, 300, 360, 480]  # every seed's own x values
    np.testing.assert_array_equal(stats["x"], grid)
    # Seed 0 at 120: 0.4 - 0.4 * 20/100 = 0.32; seed 1 at 200 and 240:
    # 0.6 - 0.6 * 50/150 = 0.4 and 0.6 - 0.6 * 90/150 = 0.24. Each seed has no value
    # before its first evaluation; solved seeds stay at 0 after their last.
    medians = [0.4, (0.32 + 0.5) / 2, 0.5, 0.4, 0.24, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(stats["median"], medians, atol=1e-12)
    np.testing.assert_array_equal(stats["seeds"], [1, 2, 3, 3, 3, 3, 3, 3])
    fig = plots.training_curves(records, "eval_error", x="grad_equivalents")
    (ax,) = visible_axes(fig)
    assert ax.get_xlabel() == "work (gradient-equivalents)"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), medians, atol=1e-12)
    assert "common grid" in fig.get_suptitle()


def test_log_columns_are_interpolated_geometrically():
    records = pd.DataFrame(
        {"optimizer": "A", "seed": [0, 0, 1, 1], "seconds": [1.0, 3.0, 1.0, 2.0],
         "eval_loss": [1.0, 0.01, 1.0, 0.1]}
    )  # fmt: skip
    curves = plots.seed_curves(records, "seconds", ["eval_loss"], log=["eval_loss"])
    seed0 = curves[curves["curve"] == "A/0"].set_index("x")["eval_loss"]
    assert seed0[2.0] == pytest.approx(0.1)  # halfway in log: sqrt(1 * 0.01)
    seed1 = curves[curves["curve"] == "A/1"].set_index("x")["eval_loss"]
    assert np.isnan(seed1[3.0])  # not solved: not carried past its last point


def test_common_grid():
    np.testing.assert_array_equal(
        plots.common_grid(np.array([3, 1, 2, 1.0])), [1, 2, 3]
    )
    values = np.r_[np.arange(100.0), np.nan]
    grid = plots.common_grid(values, points=60)
    assert len(grid) == 60 and grid[0] == 0 and grid[-1] == 99
    np.testing.assert_allclose(np.diff(grid), 99 / 59)


def test_grid_is_never_coarser_than_one_seed():
    steps = np.arange(1, 101) * 10.0
    records = pd.DataFrame(
        {"optimizer": "A", "seed": np.repeat([0, 1], 100),
         "step": np.tile(steps, 2), "grad_equivalents": np.r_[steps, steps + 5],
         "eval_error": 0.5}
    )  # fmt: skip
    # 100 shared steps: the grid is exactly those steps, not 60 points.
    curves = plots.seed_curves(records, "step", ["eval_error"])
    np.testing.assert_array_equal(np.unique(curves["x"]), steps)
    # 200 distinct work values: 100 evenly spaced points from 10 to 1005.
    curves = plots.seed_curves(records, "grad_equivalents", ["eval_error"])
    np.testing.assert_allclose(np.unique(curves["x"]), np.linspace(10, 1005, 100))


def test_diverged_seeds_are_not_carried():
    records = retired_records()
    records.loc[records["status"] == "solved", "status"] = "diverged"
    curves = plots.seed_curves(records, "step", ["eval_loss"])
    assert not curves["carried"].any()
    assert curves.query("x > 1000")["eval_loss"].notna().sum() == 2  # seed 2 only


def test_training_axes_and_bad_x():
    records = retired_records()
    fig = plots.traces(records, x="seconds")
    top, bottom = visible_axes(fig)
    assert top.get_xlabel() == bottom.get_xlabel() == "training seconds"
    # Spectral radius: seeds 0, 1 solved at 10 s with radius 1.1 and carried; seed
    # 2 goes 1.0, 1.1, 1.2, 1.3 -> medians 1.0, 1.1, 1.1, 1.1.
    (radius,) = bottom.get_lines()[:1]
    np.testing.assert_allclose(radius.get_xdata(), [5, 10, 15, 20])
    np.testing.assert_allclose(radius.get_ydata(), [1.0, 1.1, 1.1, 1.1])
    assert "against training seconds" in fig.get_suptitle()
    with pytest.raises(ValueError, match="grad_equivalents"):
        plots.training_curves(records, x="updates")
    with pytest.raises(ValueError, match="seconds"):
        plots.training_curves(make_records(), x="seconds")


def test_probe_x_reads_work_off_the_records():
    records = pd.DataFrame(
        {"run_id": "r", "optimizer": "HF", "seed": [0, 0, 1],
         "step": [10, 20, 10], "grad_equivalents": [30.0, 70.0, 50.0]}
    )  # fmt: skip
    probes = pd.DataFrame(
        {"run_id": "r", "optimizer": "HF", "seed": [0, 0, 0, 0, 1, 2],
         "step": [0, 10, 15, 20, 5, 10]}
    )  # fmt: skip
    x = cp.probe_x(probes, records, "grad_equivalents")
    np.testing.assert_allclose(x, [0, 30, 50, 70, 25, np.nan])
    np.testing.assert_array_equal(cp.probe_x(probes, records, "step"), probes["step"])


def test_spectrum_plot_against_work():
    probes = make_probes()
    records = make_records(lengths=(20,))
    records = records.assign(
        run_id="run-" + records["optimizer"], grad_equivalents=2.0 * records["step"]
    )
    fig = cp.spectrum_plot(probes, records=records, x="grad_equivalents")
    _, right = visible_axes(fig)
    assert right.get_xlabel() == "work (gradient-equivalents)"
    # Periodic probes at steps 0..90 (not 50: explosion) -> work 0..180.
    xs = np.concatenate([ln.get_xdata() for ln in right.get_lines()])
    assert xs.min() == 0 and xs.max() == 180
    with pytest.raises(ValueError, match="records"):
        cp.spectrum_plot(probes, x="seconds")


def test_wall_plot_draws_surface_wall_and_trajectories():
    from analysis.wall import error_surface

    steps = np.arange(20)
    trajectories = pd.DataFrame(
        [
            {"optimizer": name, "seed": seed, "step": s,
             "param_w": 6 + 0.05 * s * (k + 1), "param_b": -3 + 0.02 * s - 0.1 * seed}
            for k, name in enumerate(OPTIMIZERS) for seed in SEEDS for s in steps
        ]
    )  # fmt: skip
    surface = error_surface(resolution=(41, 33))
    fig = plots.wall_plot(trajectories, surface=surface)
    ax = visible_axes(fig)[0]
    assert ax.get_xlabel().startswith("w") and ax.get_ylabel().startswith("b")
    assert ax.get_xlim() == (0.0, 10.0) and ax.get_ylim() == (-7.0, 1.0)
    # 2 wall lines + per seed: a path and a start marker.
    assert len(ax.get_lines()) == 2 + 2 * len(OPTIMIZERS) * len(SEEDS)
    assert_optimizers_in_legend(fig)
    assert "wall (numerical)" in legend_texts(fig)


def test_save_figure_and_base64(tmp_path):
    fig = plots.training_curves(make_records(lengths=(20,)))
    paths = plots.save_figure(fig, tmp_path / "sub" / "curves")
    assert [p.name for p in paths] == ["curves.png", "curves.svg"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC)
    assert b"<svg" in paths[1].read_bytes()[:2000]
    assert base64.b64decode(plots.figure_png_base64(fig)).startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("function", "frame", "column"),
    [
        (plots.training_curves, make_records, "eval_loss"),
        (plots.traces, make_records, "spectral_radius"),
        (plots.success_vs_length, make_summary, "length"),
        (cp.curvature_ratio, make_probes, "curv_hessian"),
        (cp.curvature_ratio, make_probes, "smoothness"),
        (cp.spectrum_plot, make_probes, "ritz_values"),
        (cp.ratio_vs_x, lambda: make_growth()[0], "ratio_gn"),
    ],
)
def test_missing_column_is_named(function, frame, column):
    with pytest.raises(ValueError, match=column):
        function(frame().drop(columns=column))


def test_wall_and_growth_missing_columns_are_named():
    with pytest.raises(ValueError, match="param_b"):
        plots.wall_plot(pd.DataFrame({"optimizer": [], "seed": [], "step": []}))
    rows, fits = make_growth()
    with pytest.raises(ValueError, match="curv_gn"):
        cp.growth_plot(rows.drop(columns="curv_gn"), fits)
    with pytest.raises(ValueError, match="intercept"):
        cp.growth_plot(rows, fits.drop(columns="intercept"))


def test_curvature_ratio_draws_the_loglog_fit():
    probes = make_probes(exponent=1.5)
    fig = cp.curvature_ratio(probes)
    left, right = visible_axes(fig)
    assert left.get_xscale() == "log" and left.get_yscale() == "log"
    assert left.get_xlabel() == right.get_xlabel() == cp.GRAD_LABEL
    assert "Hessian" in left.get_ylabel() and "smoothness" in right.get_ylabel()
    text = legend_texts(fig)
    for name in OPTIMIZERS:
        rows = probes[probes["optimizer"] == name]
        fit = loglog_slope(rows["grad_norm"], rows["curv_hessian"])
        assert abs(fit.slope - 1.5) < 1e-9
        assert f"{name}: slope {fit.slope:.2f}" in text
        assert f"{name}: L0=0.5, L1=0.3" in text
    assert "slope 1: bounded Newton step" in text
    assert "explosion probe" in text
    # The drawn lines themselves: one fitted line per optimizer with slope 1.5 in
    # log-log coordinates, and the dotted slope-1 reference.
    slopes = sorted(
        np.polyfit(np.log(line.get_xdata()), np.log(line.get_ydata()), 1)[0]
        for line in left.get_lines()
    )
    np.testing.assert_allclose(slopes, [1.0] + [1.5] * len(OPTIMIZERS), atol=1e-6)
    sizes = np.concatenate([c.get_sizes() for c in left.collections])
    n_explosion = int((probes["kind"] == "explosion").sum())
    assert (sizes > 100).sum() == n_explosion  # large star markers


def test_curvature_ratio_gauss_newton_and_bad_choice():
    probes = make_probes()
    fig = cp.curvature_ratio(probes[probes["kind"] == "periodic"], "gauss_newton")
    left, _ = visible_axes(fig)
    assert "Gauss-Newton" in left.get_ylabel()
    text = legend_texts(fig)
    assert "slope 2.00" in text  # curv_gn = g^2 / 2
    assert "explosion" not in text
    with pytest.raises(ValueError, match="gauss_newton"):
        cp.curvature_ratio(make_probes(), curvature="fisher")


def test_ratio_vs_x():
    rows, _ = make_growth()
    fig = cp.ratio_vs_x(rows)
    axes = visible_axes(fig)
    assert len(axes) == 2
    for ax in axes:
        assert ax.get_xlabel() == "sequence length T"
        assert ax.get_yscale() == "log" and "curvature ratio" in ax.get_ylabel()
    text = legend_texts(fig)
    assert "Hessian" in text and "Gauss-Newton" in text


def test_growth_plot_shows_fitted_rates():
    rows, fits = make_growth()
    fig = cp.growth_plot(rows, fits)
    axes = visible_axes(fig)
    assert len(axes) == 2 and all(ax.get_yscale() == "log" for ax in axes)
    assert axes[0].get_xlabel() == "sequence length T"
    text = legend_texts(fig)
    for fit in fits.itertuples():
        assert f"rate {fit.slope:.3g} [{fit.slope_low:.3g}" in text
    assert abs(fits["slope"].iloc[0] - 0.1) < 0.01
    fig = cp.growth_plot(rows, fits.iloc[:0])  # no fits: points only
    assert "rate" not in legend_texts(fig)


def test_spectrum_plot():
    fig = cp.spectrum_plot(make_probes())
    left, right = visible_axes(fig)
    assert left.get_xscale() == "symlog" and left.get_yscale() == "log"
    assert "eigenvalue" in left.get_xlabel() and "density" in left.get_ylabel()
    assert right.get_xlabel() == "update step" and "top" in right.get_ylabel()
    densities = [ln.get_ydata() for ln in left.get_lines()]
    assert len(densities) == len(OPTIMIZERS)
    assert all(np.all(np.asarray(d) > 0) for d in densities)
    assert_optimizers_in_legend(fig)


def test_success_rates_leave_out_runs_trained_on_a_range_of_lengths():
    # A run on lengths 50-200 must not pool with the fixed length-200 run.
    summary = pd.DataFrame(
        {
            "task": ["t"] * 4, "length": [200, 200, 50, 50],
            "min_length": [50, None, None, 50], "optimizer": ["A"] * 4,
            "status": ["solved", "unsolved", "solved", "solved"],
        }
    )  # fmt: skip
    rates = plots.success_rates(summary).set_index("length")
    assert rates.loc[200, "seeds"] == 1 and rates.loc[200, "solved"] == 0
    assert rates.loc[50, "seeds"] == 2  # min_length == length is a fixed length
