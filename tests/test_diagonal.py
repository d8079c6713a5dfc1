"""Diagonal curvature estimators and the diagonal second-order methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import (
    DiagonalQuadratic,
    dense_gauss_newton,
    dense_hessian,
    dense_setup,
)

from optimizers import Objective, loss_grads_and_states, make_optimizer
from optimizers.curvature import (
    gauss_newton_diagonal_exact,
    gauss_newton_diagonal_sampled,
    gauss_newton_operator,
    hessian_operator,
    hutchinson_diagonal,
)
from optimizers.diagonal import exact_gauss_newton, scale_by_diagonal_curvature
from runner.run import run

DIAGONAL = ("sdlm", "adahessian", "sophia_h", "sophia_g")


@pytest.mark.parametrize("name", ["squared_error", "softmax", "sigmoid", "leaky"])
def test_exact_gauss_newton_diagonal_equals_dense(name):
    with jax.enable_x64(True):
        task, params, batch, _, _ = dense_setup(name)
        dense = np.diag(dense_gauss_newton(task, params, batch))
        exact = jax.jit(gauss_newton_diagonal_exact, static_argnums=0)(
            task, params, batch
        )
        exact = ravel_pytree(exact)[0]
        np.testing.assert_allclose(exact, dense, rtol=1e-9, atol=1e-14)


def _samples(fn, n):
    """``n`` independent draws of ``fn(key)``, flattened: one compiled, vmapped call."""
    keys = jax.random.split(jax.random.PRNGKey(9), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: ravel_pytree(fn(k))[0]))(keys))


@pytest.mark.parametrize("estimator", ["sampled_gn", "hutchinson_gn", "hutchinson_h"])
def test_stochastic_estimators_are_unbiased(estimator):
    with jax.enable_x64(True):
        task, params, batch, _, _ = dense_setup("softmax")
        if estimator == "hutchinson_h":
            dense = np.diag(dense_hessian(task, params, batch))

            def one(k):
                op = hessian_operator(task, params, batch)
                return hutchinson_diagonal(op, k, params)
        elif estimator == "hutchinson_gn":
            dense = np.diag(dense_gauss_newton(task, params, batch))

            def one(k):
                op = gauss_newton_operator(task, params, batch)
                return hutchinson_diagonal(op, k, params)
        else:
            dense = np.diag(dense_gauss_newton(task, params, batch))

            def one(k):
                return gauss_newton_diagonal_sampled(task, params, batch, k)

        draws = _samples(one, 3000)
        mean = draws.mean(axis=0)
        stderr = draws.std(axis=0) / np.sqrt(len(draws))
        # Within 5 standard errors everywhere (plus a floor for exact-zero entries).
        assert np.all(np.abs(mean - dense) <= 5 * stderr + 1e-10)
        # ... and not trivially: the estimates do vary from probe to probe.
        assert stderr.max() > 0


def _train(task, opt, steps, key=0):
    params = task.init(None)
    state = opt.init(params)
    batch = task.sample_batch(None)

    @jax.jit
    def step(params, state, t):
        loss, grads, states, sg = loss_grads_and_states(task, params, batch)
        objective = Objective(task, batch, batch, loss, grads, states, sg)
        k = jax.random.fold_in(jax.random.PRNGKey(key), t)
        updates, state = opt.update(
            grads, state, params, objective=objective, key=k, step=t
        )
        return jax.tree.map(lambda p, u: p + u, params, updates), state, updates

    for t in range(steps):
        params, state, updates = step(params, state, jnp.int32(t))
    return params, state, updates


@pytest.mark.parametrize(
    "name, hparams, steps",
    [
        ("sdlm", {"learning_rate": 0.5, "estimator": "exact"}, 60),
        ("sdlm", {"learning_rate": 0.5, "estimator": "sampled", "ema": 0.99}, 150),
        ("adahessian", {"learning_rate": 0.3}, 300),
        ("sophia_h", {"learning_rate": 0.05, "every": 2}, 400),
        ("sophia_g", {"learning_rate": 0.05, "every": 1}, 400),
        ("hf", {"damping": 1e-3}, 5),
    ],
)
def test_methods_reach_the_minimizer_of_a_diagonal_quadratic(name, hparams, steps):
    a = jnp.array([0.1, 1.0, 10.0, 100.0])  # condition number 1000
    c = jnp.array([1.0, -2.0, 0.5, 3.0])
    task = DiagonalQuadratic(a, c)
    params, _, _ = _train(task, make_optimizer(name, **hparams), steps)
    np.testing.assert_allclose(params["x"], c, atol=0.05)


def test_sophia_clipping_bounds_hold():
    # Huge gradients and a tiny curvature: every coordinate is clipped at lr * clip.
    task = DiagonalQuadratic(jnp.array([1e4, 1e-6, 1.0]), jnp.array([100.0, 50.0, 0.1]))
    lr, clip = 0.01, 0.5
    opt = make_optimizer("sophia_g", learning_rate=lr, clip=clip, every=1, b1=0.0)
    _, state, updates = _train(task, opt, 3)
    assert np.all(np.abs(np.asarray(updates["x"])) <= lr * clip + 1e-7)
    assert float(state[0].record.values["clip"]) > 0


def test_every_k_and_ema_do_what_they_say():
    a = jnp.array([1.0, 4.0])
    task = DiagonalQuadratic(a, jnp.array([1.0, 1.0]))
    inner = scale_by_diagonal_curvature(exact_gauss_newton(), every=3, ema=0.5)
    params = task.init(None)
    batch = task.sample_batch(None)
    state = inner.init(params)

    @jax.jit
    def update(state, key, t):
        loss, grads, states, sg = loss_grads_and_states(task, params, batch)
        objective = Objective(task, batch, batch, loss, grads, states, sg)
        return inner.update(grads, state, params, objective=objective, key=key, step=t)

    estimated, curvatures = [], []
    for t in range(7):
        _, state = update(state, jax.random.PRNGKey(t), jnp.int32(t))
        estimated.append(bool(state.record.values["estimated"]))
        curvatures.append(np.asarray(state.curvature["x"]))
    assert estimated == [True, False, False, True, False, False, True]
    # The exact estimate is 2a; EMA weight 0.5 from zero: a, then 1.5a, then 1.75a.
    np.testing.assert_allclose(curvatures[0], a)
    np.testing.assert_allclose(curvatures[2], a)  # reused, unchanged
    np.testing.assert_allclose(curvatures[3], 1.5 * a)
    np.testing.assert_allclose(curvatures[6], 1.75 * a)
    assert int(state.estimates) == 3
    # Work is counted only when the estimator runs (T x O = 1 x 2 passes each).
    assert int(state.work.grad_evals) == 3 * 2
    fresh = scale_by_diagonal_curvature(exact_gauss_newton(), every=1, ema=0.0)
    s = fresh.init(params)
    loss, grads, states, sg = loss_grads_and_states(task, params, batch)
    objective = Objective(task, batch, batch, loss, grads, states, sg)
    _, s = fresh.update(
        grads, s, params, objective=objective, key=jax.random.PRNGKey(0), step=0
    )
    np.testing.assert_allclose(s.curvature["x"], 2 * a)


@pytest.mark.parametrize("name", DIAGONAL)
def test_diagonal_methods_without_a_key_raise(name):
    # No silent fixed key: every seed would get the same probes and samples.
    task = DiagonalQuadratic(jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
    opt = make_optimizer(name)
    params = task.init(None)
    batch = task.sample_batch(None)
    loss, grads, states, sg = loss_grads_and_states(task, params, batch)
    objective = Objective(task, batch, batch, loss, grads, states, sg)
    with pytest.raises(ValueError, match="key="):
        opt.update(grads, opt.init(params), params, objective=objective, step=0)
    with pytest.raises(ValueError, match="key="):
        opt.update(grads, opt.init(params), params, objective=objective, key=None)
    # With a key the same call works.
    updates, _ = opt.update(
        grads, opt.init(params), params, objective=objective,
        key=jax.random.PRNGKey(0), step=0,
    )  # fmt: skip
    assert np.isfinite(np.asarray(updates["x"])).all()


def test_every_k_gate_is_a_real_branch_under_vmap():
    # With the step not vmapped (as the runner passes it), the estimator sits in a
    # lax.cond that survives vmap over seeds, so skipped steps skip the work.
    task = DiagonalQuadratic(jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
    opt = make_optimizer("sophia_h", every=10)
    batch = task.sample_batch(None)

    def step(params, state, key, t):
        loss, grads, states, sg = loss_grads_and_states(task, params, batch)
        objective = Objective(task, batch, batch, loss, grads, states, sg)
        return opt.update(grads, state, params, objective=objective, key=key, step=t)

    params = jax.tree.map(lambda x: jnp.stack([x, x + 1]), task.init(None))
    state = jax.vmap(opt.init)(params)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    vmapped = jax.vmap(step, in_axes=(0, 0, 0, None))
    jaxpr = str(jax.make_jaxpr(vmapped)(params, state, keys, jnp.int32(3)))
    assert "cond[" in jaxpr
    # A vmapped step index would turn it into a select that runs both branches.
    batched = jax.vmap(step, in_axes=(0, 0, 0, 0))
    jaxpr = str(jax.make_jaxpr(batched)(params, state, keys, jnp.array([3, 3])))
    assert "cond[" not in jaxpr


@pytest.mark.slow
@pytest.mark.parametrize("name", DIAGONAL)
def test_runner_runs_every_method_and_probes_differ_across_seeds(name):
    # init_noise = 0: both seeds start from the same point, so only the probes (or
    # sampled targets) can make their curvature estimates differ.
    hparams = {"every": 1} if name.startswith("sophia") else {}
    # With two parameters a Rademacher probe pair repeats with probability 1/2 per
    # step, so compare the mean over 10 steps.
    result = run(
        "wall", name, seeds=[0, 1], steps=10, eval_every=10, task_hparams={"w0": 3.0},
        opt_hparams=hparams,
    )  # fmt: skip
    records = result.records
    assert np.isfinite(records.loss).all()
    first = records.set_index("seed").curvature_mean_mean
    assert first[0] != first[1]
    assert (records.grad_equivalents > records.grad_evals - 1).all()
