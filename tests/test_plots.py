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


def test_success_vs_length():
    fig = plots.success_vs_length(make_summary())
    (ax,) = visible_axes(fig)
    assert ax.get_xlabel() == "sequence length T"
    assert ax.get_ylabel() == "success rate (fraction of seeds solved)"
    low, high = ax.get_ylim()
    assert -0.05 < low <= 0 and 1 <= high < 1.05
    ys = np.concatenate([ln.get_ydata() for ln in ax.get_lines()])
    np.testing.assert_allclose(np.unique(ys.round(9)), [1 / 3, 2 / 3, 1.0])
    text = legend_texts(fig)
    assert "init: sigmoid" in text and "init: smart_tanh" in text
    assert_optimizers_in_legend(fig)


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
