"""The user plug-in examples: validation, curvature against dense matrices, runs."""

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import dense_gauss_newton

import optimizers
from examples.newton_step import NewtonStepState, newton_step
from examples.plain_optax import adam_clipped
from optimizers import Objective, collect_records, collect_work, loss_grads_and_states
from runner.config import read_comparison
from runner.run import run
from tasks import ConfigError, Task, make_task

NEWTON = "examples.newton_step:newton_step"
ADAM = "examples.plain_optax:adam_clipped"
PLUGINS_TOML = Path(__file__).resolve().parents[1] / "examples" / "plugins.toml"
TINY = {"length": 10, "hidden": 6, "batch_size": 8}


# (a) hyperparameters are declared and validated through the registry.


def test_factories_validate_by_import_path():
    assert optimizers.check_optimizer(NEWTON, {"alpha": 0.5}) == {
        "alpha": 0.5,
        "damping": 1e-3,
        "max_step": 1.0,
    }
    assert optimizers.check_optimizer(ADAM, {"learning_rate": 1}) == {
        "learning_rate": 1.0,
        "threshold": 1.0,
    }
    # Plain floats are traced: a sweep over them compiles once.
    assert optimizers.traced_names(NEWTON) == ("alpha", "damping", "max_step")
    assert optimizers.traced_names(ADAM) == ("learning_rate", "threshold")


@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [
        (NEWTON, {"alpah": 1.0}, "'alpah' .* valid: alpha, damping, max_step"),
        (NEWTON, {"damping": 0.0}, "'damping' = 0.0 is out of range"),
        (NEWTON, {"max_step": -1.0}, "'max_step' = -1.0 is out of range"),
        (NEWTON, {"alpha": "big"}, "'alpha' = 'big' must be a number"),
        (ADAM, {"learning_rate": 0.0}, "'learning_rate' = 0.0 is out of range"),
        (ADAM, {"treshold": 1.0}, "'treshold' .* valid: learning_rate, threshold"),
        ("examples.newton_step:nope", {}, "cannot be imported"),
    ],
)
def test_bad_hyperparameters_raise(name, hparams, message):
    with pytest.raises(ConfigError, match=message):
        optimizers.check_optimizer(name, hparams)


def test_register_from_python(monkeypatch):
    monkeypatch.setitem(optimizers.OPTIMIZERS, "my_newton", newton_step)
    assert optimizers.check_optimizer("my_newton", {})["max_step"] == 1.0
    with pytest.raises(ConfigError, match="out of range"):
        optimizers.make_optimizer("my_newton", alpha=-1.0)
    opt = optimizers.make_optimizer("my_newton", alpha=2.0)
    assert isinstance(opt.init({"w": jnp.zeros(3)}), NewtonStepState)


# (b) the measured curvature against a dense Gauss-Newton matrix, in float64.


class Setup(NamedTuple):
    """A tiny float64 problem and a jitted Newton-step update on it."""

    task: Task
    params: dict
    grads: dict
    objective: Objective
    step: Callable  # (grads, state or None, hparams) -> (updates, state)


@functools.cache
def dense_setup() -> Setup:
    """Built once per process; call (and use) inside ``jax.enable_x64(True)``."""
    task = make_task("temporal_order", length=10, hidden=4, batch_size=3)

    @jax.jit
    def problem(key):
        k_init, k_noise, k_batch, k_curv = jax.random.split(key, 4)
        params = task.init(k_init)
        # Larger weights than the init so that the nonlinearities matter.
        flat, unravel = ravel_pytree(params)
        noise = jax.random.normal(k_noise, flat.shape, flat.dtype)
        params = unravel(flat + 0.5 * noise)
        batch = task.sample_batch(k_batch)
        curvature_batch = task.sample_batch(k_curv)
        return (
            params,
            batch,
            curvature_batch,
            loss_grads_and_states(task, params, batch),
        )

    params, batch, curvature_batch, (loss, grads, *states) = problem(
        jax.random.PRNGKey(0)
    )
    objective = Objective(task, batch, curvature_batch, loss, grads, *states)

    @jax.jit
    def update(grads, state, hparams):
        # Hyperparameters are traced, as in the runner: one compilation for all.
        return newton_step(**hparams).update(
            grads, state, params, objective=objective, key=jax.random.PRNGKey(4)
        )

    def step(grads, state, hparams):
        state = newton_step().init(params) if state is None else state
        return update(grads, state, hparams)

    return Setup(task, params, grads, objective, step)


def test_newton_curvature_and_step_equal_dense():
    with jax.enable_x64(True):
        task, params, grads, objective, step = dense_setup()
        g = ravel_pytree(grads)[0]
        assert g.dtype == jnp.float64
        u = g / np.linalg.norm(g)
        dense = dense_gauss_newton(task, params, objective.curvature_batch)
        c = u @ dense @ u
        # Measured on the curvature batch, not on the gradient batch.
        c_batch = u @ dense_gauss_newton(task, params, objective.batch) @ u
        assert not np.isclose(c, c_batch, rtol=1e-3)

        alpha, damping = 0.7, 1e-3
        length = alpha * np.linalg.norm(g) / (c + damping)
        hparams = {"alpha": alpha, "damping": damping, "max_step": 10 * length}
        updates, state = step(grads, None, hparams)
        record = collect_records(state)
        np.testing.assert_allclose(record["curvature"], c, rtol=1e-10)
        np.testing.assert_allclose(record["newton_step"], length, rtol=1e-10)
        assert not record["newton_capped"]
        np.testing.assert_allclose(
            ravel_pytree(updates)[0], -length * u, rtol=1e-10, atol=1e-14
        )
        assert int(collect_work(state).curvature_products) == 1

        # A smaller max_step bounds the step length; the work count accumulates.
        hparams["max_step"] = 0.5 * length
        updates, state = step(grads, state, hparams)
        record = collect_records(state)
        assert record["newton_capped"]
        np.testing.assert_allclose(
            ravel_pytree(updates)[0], -0.5 * length * u, rtol=1e-10, atol=1e-14
        )
        assert int(collect_work(state).curvature_products) == 2


@pytest.mark.parametrize("value", [0.0, np.nan, np.inf])
def test_newton_zero_or_nonfinite_gradient_gives_zero_step(value):
    with jax.enable_x64(True):
        _, _, grads, _, step = dense_setup()
        bad = jax.tree.map(lambda g: jnp.full_like(g, value), grads)
        hparams = {"alpha": 1.0, "damping": 1e-3, "max_step": 1.0}
        updates, state = step(bad, None, hparams)
        assert all(np.all(u == 0) for u in jax.tree.leaves(updates))
        assert float(collect_records(state)["newton_step"]) == 0.0
        assert int(collect_work(state).curvature_products) == 1


# (c) tiny runs through the runner, by import path.


@pytest.mark.slow
@pytest.mark.parametrize("name", [ADAM, NEWTON])
def test_plugin_runs_through_the_runner(name):
    result = run(
        "addition",
        name,
        seeds=2,
        steps=40,
        task_hparams=TINY,
        eval_every=20,
        eval_size=64,
    )
    records = result.records
    assert len(records) == 4  # 2 seeds x 2 evaluations
    numeric = records.select_dtypes("number")
    assert np.isfinite(numeric.drop(columns=["spectral_radius"]).to_numpy()).all()
    assert (result.summary.status != "diverged").all()
    if name == NEWTON:
        for column in ("curvature_mean", "newton_step_mean", "newton_capped_rate"):
            assert column in records
        assert (records.curvature_mean >= 0).all()
        assert (records.newton_step_mean > 0).all()
        assert (records.curvature_products > 0).all()
        # One curvature product per applied update, counted in gradient-equivalents.
        assert (records.curvature_products == records.updates).all()
        assert (records.grad_equivalents > records.grad_evals).all()
    else:
        assert (records.curvature_products == 0).all()


# (d) the shipped comparison file validates.


def test_plugins_comparison_validates():
    comparison = read_comparison(PLUGINS_TOML)
    assert comparison.name == "plugins"
    names = {spec.optimizer.name for spec in comparison.runs}
    assert names == {"sgd_clip", ADAM, NEWTON}
    assert sorted(spec.label for spec in comparison.runs) == [
        "Adam-C",
        "Newton-step alpha=1.0",
        "Newton-step alpha=2.0",
        "SGD-C",
    ]
    assert adam_clipped is optimizers.resolve_optimizer(ADAM)
