"""Quasi-Newton adapters over jaxopt: convergence, jit/vmap stability, warnings."""

from __future__ import annotations

import functools
import importlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from problems import LinearRegression

from optimizers import Objective, collect_records, collect_work, loss_grads_and_states
from optimizers import quasi_newton as qn
from tasks import ConfigError, make_task
from tasks.hparams import check_hparams, declared_hparams

FACTORIES = {
    "lbfgs": (lambda: qn.lbfgs, {}),
    "nonlinear_cg": (lambda: qn.nonlinear_cg, {}),
    "levenberg_marquardt": (lambda: qn.levenberg_marquardt, {}),
    "levenberg_marquardt_cholesky": (
        lambda: qn.levenberg_marquardt,
        {"solver": "cholesky"},
    ),
}


def _objective(task, params, batch):
    loss, grads, states, state_grads = loss_grads_and_states(task, params, batch)
    return grads, Objective(task, batch, batch, loss, grads, states, state_grads)


def _split(factory, hparams):
    """Full hyperparameters split as the runner does: plain floats are traced."""
    full = check_hparams("optimizer", factory.__name__, factory, hparams)
    declared = declared_hparams(factory)
    traced = [n for n, hp in declared.items() if hp.kind is float and not hp.optional]
    static = {k: v for k, v in full.items() if k not in traced}
    return static, {k: full[k] for k in traced}


def _make_step(task, factory, static):
    """A jitted, seed-vmapped update with traced hyperparameters (as in the runner)."""

    def one(params, state, batch, values):
        grads, objective = _objective(task, params, batch)
        opt = optax.with_extra_args_support(factory(**static, **values))
        updates, state = opt.update(
            grads, state, params, objective=objective, key=jax.random.PRNGKey(0)
        )
        return optax.apply_updates(params, updates), state, objective.loss

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))


def _avals(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [
        (jnp.shape(x), jnp.result_type(x), jax.typeof(x).weak_type) for x in leaves
    ]


@functools.cache
def _regression():
    """The regression task, one batch and two parameter sets (stacked)."""
    task = LinearRegression(n_in=4, random_init=True)
    batch = jax.jit(task.sample_batch, static_argnums=1)(jax.random.PRNGKey(1), None)
    keys = jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(7)])
    return task, batch, jax.jit(jax.vmap(task.init))(keys)


def _lstsq(batch):
    x, y = np.asarray(batch.inputs[0]), np.asarray(batch.targets[0])
    coef, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)
    return coef[:-1], coef[-1]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_reaches_least_squares_minimizer_jitted_and_vmapped(name):
    get_factory, hparams = FACTORIES[name]
    factory = get_factory()
    task, batch, params = _regression()  # two parameter sets
    static, traced = _split(factory, hparams)
    # Eager init with Python floats; jitted updates with traced float32 values.
    state0 = jax.vmap(factory(**static, **traced).init)(params)
    values = {k: jnp.float32(v) for k, v in traced.items()}
    step = _make_step(task, factory, static)
    state, ls_iters, ls_failed, losses = state0, 0, 0, []
    for _ in range(25):
        params, state, loss = step(params, state, batch, values)
        losses.append(np.asarray(loss))
        records = collect_records(state)
        ls_iters += np.asarray(records.get("linesearch_iters", 0)).astype(int)
        ls_failed += np.asarray(records.get("linesearch_failed", False)).astype(int)
    assert step._cache_size() == 1  # the state's avals never change
    assert _avals(state) == _avals(state0)
    w, c = _lstsq(batch)
    for seed in range(2):
        np.testing.assert_allclose(params["w"][seed], w, atol=2e-3)
        np.testing.assert_allclose(params["c"][seed], c, atol=2e-3)
    assert np.all(losses[-1] < 0.05 * losses[0])
    # Work: at least one gradient per solver iteration; the zoom line search makes one
    # value-and-gradient call per iteration, plus one at the safe step if it fails.
    work = collect_work(state)
    records = collect_records(state)
    assert np.all(np.asarray(work.grad_evals) >= 25)
    assert set(records) >= {"error", "grad_equivalents", "nonfinite"}
    if name in ("lbfgs", "nonlinear_cg"):
        assert "stepsize" in records
        assert np.all(np.asarray(work.fun_evals) == 0)
        assert np.all(np.asarray(work.grad_evals) >= ls_iters)
        if name == "lbfgs":
            np.testing.assert_array_equal(work.grad_evals, ls_iters + ls_failed)
    else:
        assert "damping" in records and "step_norm" in records
        assert np.all(np.asarray(work.fun_evals) == 2 * 25)
    if name == "levenberg_marquardt":  # min(50 CG iterations, 10 parameters)
        np.testing.assert_array_equal(work.curvature_products, 25 * 10)


def test_levenberg_marquardt_solves_the_wall_model():
    task = make_task("wall", w0=2.0, b0=1.0)
    params = task.init(jax.random.PRNGKey(0))
    batch = task.sample_batch(jax.random.PRNGKey(0))
    opt = qn.levenberg_marquardt()

    @jax.jit
    def step(params, state):
        grads, objective = _objective(task, params, batch)
        updates, state = opt.update(grads, state, params, objective=objective)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    loss0 = float(task.loss(params, batch))
    accepted = 0
    for _ in range(20):
        params, state = step(params, state)
        accepted += bool(state.record.values["accepted"])
    assert loss0 > 0.05
    assert float(task.loss(params, batch)) < 1e-4
    assert accepted >= 3
    assert int(state.work.curvature_products) == 20 * 2  # CG: one per parameter
    assert int(state.work.grad_evals) == 20 and int(state.work.fun_evals) == 40


def test_levenberg_marquardt_residuals_sum_to_the_loss():
    task = make_task("wall", w0=2.0, b0=1.0)
    params = task.init(jax.random.PRNGKey(0))
    batch = task.sample_batch(jax.random.PRNGKey(0))
    flat, unravel = ravel_pytree(params)
    r = qn._residual_fn(task, unravel)(flat, batch)
    assert r.shape == (50,)
    np.testing.assert_allclose(jnp.sum(r**2), task.loss(params, batch), rtol=1e-6)


def test_levenberg_marquardt_rejects_other_output_losses():
    task = make_task("temporal_order", length=10, hidden=4)
    params = jax.jit(task.init)(jax.random.PRNGKey(0))
    # The check comes first: the batch, loss, gradients and states are not needed.
    objective = Objective(task, None, None, jnp.zeros(()), params, None, None)
    opt = qn.levenberg_marquardt()
    loss_name = task.output_loss.name
    assert loss_name != "squared_error"
    with pytest.raises(ValueError, match=loss_name):
        opt.update(params, opt.init(params), params, objective=objective)


@pytest.mark.parametrize("factory", [qn.lbfgs, qn.nonlinear_cg, qn.levenberg_marquardt])
def test_update_needs_the_objective(factory):
    params = {"w": jnp.ones(2)}
    opt = factory()
    with pytest.raises(ValueError, match="objective="):
        opt.update(params, opt.init(params), params)


def test_hyperparameters_are_validated():
    with pytest.raises(ConfigError, match="'polak-ribiere'"):
        check_hparams("optimizer", "nonlinear_cg", qn.nonlinear_cg, {"method": "dy"})
    with pytest.raises(ConfigError, match="'history_size'"):
        check_hparams("optimizer", "lbfgs", qn.lbfgs, {"history_size": 0})
    with pytest.raises(ConfigError, match="'solver'"):
        check_hparams("optimizer", "lm", qn.levenberg_marquardt, {"solver": "qr"})
    full = check_hparams("optimizer", "lbfgs", qn.lbfgs, {})
    assert full["history_size"] == 10 and full["linesearch"] == "zoom"
    assert full["stepsize"] is None


def _drop_jaxopt():
    for name in [m for m in sys.modules if m == "jaxopt" or m.startswith("jaxopt.")]:
        del sys.modules[name]


def test_no_jaxopt_warning_reaches_the_user():
    # The check can see jaxopt's warning: a fresh import emits it.
    _drop_jaxopt()
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        importlib.import_module("jaxopt")
    assert any(issubclass(w.category, DeprecationWarning) for w in raw)
    _drop_jaxopt()
    task = LinearRegression(n_in=1, n_out=1, random_init=True)
    batch = task.sample_batch(jax.random.PRNGKey(1), 8)

    def updates(opt, params, state, n=2):
        for _ in range(n):
            grads, objective = _objective(task, params, batch)
            step, state = opt.update(grads, state, params, objective=objective)
            params = optax.apply_updates(params, step)
        return params, state

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.reload(qn)
        for factory in (module.lbfgs, module.nonlinear_cg, module.levenberg_marquardt):
            opt = factory()
            params = task.init(jax.random.PRNGKey(0))
            state = opt.init(params)
            # Tracing runs every line of jaxopt's Python code (compiling adds none);
            # one of them also compiles and runs.
            lowered = jax.jit(lambda p, s, opt=opt: updates(opt, p, s)).lower(
                params, state
            )
            if factory is module.levenberg_marquardt:
                params, _ = lowered.compile()(params, state)
                assert float(task.loss(params, batch)) < 0.1
    bad = [
        f"{w.category.__name__}: {w.message} ({w.filename})"
        for w in caught
        if issubclass(w.category, DeprecationWarning | FutureWarning | UserWarning)
    ]
    assert not bad


def test_levenberg_marquardt_residuals_use_the_task_loss_weights():
    # A task overriding loss_weights (per-sequence means): sum r^2 is its loss,
    # checked against the weights computed by hand.
    from problems import PerSequenceMean

    task = PerSequenceMean()
    params = task.init(jax.random.PRNGKey(0))
    batch = task.sample_batch(jax.random.PRNGKey(1))
    flat, unravel = ravel_pytree(params)
    residuals = np.asarray(qn._residual_fn(task, unravel)(flat, batch), np.float64)
    mask = np.asarray(batch.mask, np.float64)
    w = mask / (mask.sum(axis=0, keepdims=True) * mask.shape[1])
    outputs = np.asarray(task.apply(params, batch.inputs)[0], np.float64)
    expected = (w * ((outputs - np.asarray(batch.targets)) ** 2).sum(-1)).sum()
    np.testing.assert_allclose((residuals**2).sum(), expected, rtol=1e-5)
    np.testing.assert_allclose(float(task.loss(params, batch)), expected, rtol=1e-5)
