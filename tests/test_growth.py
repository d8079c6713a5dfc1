"""The growth experiment: rows, rescaled radii, run sources, files and the CLI."""

import jax
import numpy as np
import pandas as pd
import pytest

from analysis.growth import fit, growth_experiment, measure, rescale_recurrent
from analysis.probes import ProbeConfig
from analysis.results import load_growth
from runner.cli import main
from runner.run import run
from tasks import make_task
from tasks.hparams import ConfigError

TINY = {"hidden": 5, "batch_size": 4}
FAST = ProbeConfig(lanczos_iters=4)


def test_rescale_recurrent_sets_the_spectral_radius():
    task = make_task("addition", length=10, **TINY)
    params = task.init(jax.random.PRNGKey(0))
    scaled = rescale_recurrent(task, params, 2.5)
    radius = np.abs(np.linalg.eigvals(np.asarray(scaled["W_rec"]))).max()
    assert radius == pytest.approx(2.5, rel=1e-5)
    np.testing.assert_array_equal(scaled["W_in"], params["W_in"])


@pytest.mark.slow
def test_measure_rows_per_value_seed_and_batch():
    rows = measure(
        "temporal_order", "radius", [0.5, 1.0, 2.0], seeds=[3, 4], batches=2,
        task_hparams={"length": 10, **TINY}, config=FAST,
    )  # fmt: skip
    assert len(rows) == 3 * 2 * 2
    assert set(rows["seed"]) == {3, 4} and set(rows["batch"]) == {0, 1}
    # Every row is probed at the radius it asks for.
    np.testing.assert_allclose(rows["spectral_radius"], rows["radius"], rtol=1e-4)
    assert rows["length"].eq(10).all() and rows["source"].eq("init").all()
    # Different batches of one seed give different gradients (independent draws).
    one = rows[(rows["seed"] == 3) & (rows["radius"] == 1.0)]["grad_norm"]
    assert one.nunique() == 2


@pytest.mark.slow
def test_length_sweep_uses_full_length_sequences():
    rows = measure(
        "temporal_order", "length", [10, 13, 16], task_hparams=TINY, seeds=[0],
        batches=1, radius=1.2, config=FAST,
    )  # fmt: skip
    assert list(rows["length"]) == [10, 13, 16]
    np.testing.assert_allclose(rows["spectral_radius"], 1.2, rtol=1e-4)
    # Padding the length-10 batches to 16 or to 11 steps changes nothing.
    other = measure(
        "temporal_order", "length", [10, 11, 10], task_hparams=TINY, seeds=[0],
        batches=1, radius=1.2, config=FAST,
    )  # fmt: skip
    for name in ("loss", "grad_norm", "curv_hessian", "curv_gn", "smoothness"):
        np.testing.assert_allclose(other[name][0], rows[name][0], rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"x": "width"}, "'x'"),
        ({"values": [10, 20]}, "at least 3"),
        ({"values": [10, 20.5, 30]}, "integers"),
        ({"task": "nope"}, "unknown task"),
        ({"batches": 0}, "batches"),
    ],
)
def test_bad_growth_settings_are_rejected(kwargs, field):
    args = {"task": "temporal_order", "x": "length", "values": [10, 20, 30]}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        measure(
            args.pop("task"), args.pop("x"), args.pop("values"), config=FAST, **args
        )


@pytest.mark.slow
def test_growth_from_a_run_checkpoint_and_file_round_trip(tmp_path):
    result = run(
        "temporal_order", "sgd_clip", seeds=[1, 2], steps=20, eval_every=10,
        eval_size=20, task_hparams={"length": 10, **TINY}, checkpoint_every=10,
        out=tmp_path / "runs",
    )  # fmt: skip
    rows, fits, path = growth_experiment(
        None, "length", [10, 12, 14], run_file=result.path, step=10, batches=1,
        out=tmp_path / "growth", config=FAST,
    )  # fmt: skip
    assert set(rows["seed"]) == {1, 2}
    assert rows["source"].eq("sgd_clip step 10").all()
    assert path.name.endswith(".growth.json")
    loaded_rows, loaded_fits = load_growth(tmp_path / "growth")
    assert len(loaded_rows) == len(rows) == 6
    np.testing.assert_allclose(loaded_rows["grad_norm"], rows["grad_norm"])
    assert set(loaded_fits["kind"]) == {"rate", "loglog"}
    assert len(loaded_fits) == len(fits)
    with pytest.raises(ConfigError, match="no checkpoint at step 5"):
        growth_experiment(None, "length", [10, 12, 14], run_file=result.path, step=5)


@pytest.mark.slow
def test_growth_command_writes_results_and_figures(tmp_path, capsys):
    code = main(
        [
            "growth", "--task", "temporal_order", "-t", "hidden=4", "-t",
            "batch_size=4", "--lengths", "10,12,14", "--radius", "1.5", "--seeds", "2",
            "--batches", "1", "--lanczos-iters", "3", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "grad_norm" in printed and "loglog" in printed
    stem = tmp_path / "temporal_order-smart_tanh-length"
    assert stem.with_suffix(".growth.json").is_file()
    for suffix in ("png", "svg"):
        assert (tmp_path / f"temporal_order-smart_tanh-length.{suffix}").stat().st_size
        assert (tmp_path / f"temporal_order-smart_tanh-length-ratio.{suffix}").is_file()


def test_growth_command_needs_exactly_one_sweep(capsys):
    assert main(["growth", "--task", "temporal_order"]) == 2
    assert "--lengths" in capsys.readouterr().err


@pytest.mark.slow
def test_radius_sweeps_fit_a_power_law_and_report_negative_curvature():
    rng = np.random.default_rng(0)
    radius = np.repeat([1.0, 1.5, 2.0, 3.0], 6)
    seed = np.tile(np.arange(6), 4)
    noise = np.exp(0.01 * rng.normal(size=radius.size))
    rows = pd.DataFrame(
        {
            "init": "basic_tanh", "source": "init", "seed": seed, "radius": radius,
            "grad_norm": radius**3 * noise, "curv_gn": 2 * radius**6 * noise,
            "curv_hessian": np.where(seed == 0, -1, 1) * radius**6,
        }
    )  # fmt: skip
    fits = fit(rows, "radius").set_index(["kind", "quantity"])
    assert fits.loc[("rate", "grad_norm"), "x"] == "log_radius"
    assert fits.loc[("rate", "grad_norm"), "slope"] == pytest.approx(3, abs=0.05)
    assert fits.loc[("loglog", "curv_gn"), "slope"] == pytest.approx(2, abs=0.05)
    assert fits.loc[("rate", "curv_hessian"), "negative_fraction"] == pytest.approx(
        1 / 6
    )
    assert fits.loc[("rate", "curv_gn"), "negative_fraction"] == 0
    with pytest.raises(ConfigError, match="radius"):
        measure("temporal_order", "radius", [1, 2, 3], radius=2.0)
