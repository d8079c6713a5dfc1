"""Hessian-free: its rules on constructed cases, and training behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import LinearRegression, init_params, sample

from optimizers import Objective, loss_grads_and_states, make_optimizer
from optimizers.hessian_free import (
    _backtrack,
    _line_search,
    _per_example_sq_grad_mean,
    levenberg_marquardt,
)
from runner.run import run
from tasks import Batch, make_task


def _objective(task, params, batch, curvature_batch=None, sampler=None):
    loss, grads, states, sgrads = loss_grads_and_states(task, params, batch)
    curv = batch if curvature_batch is None else curvature_batch
    if sampler is None:  # as the runner builds it: the task's sampler, curv's size
        size = curv.inputs.shape[1]
        sampler = lambda k: task.sample_batch(k, size)  # noqa: E731
    return grads, Objective(task, batch, curv, loss, grads, states, sgrads, sampler)


def _setup(task):
    """Initial parameters (key 0) and a batch (key 1), each one compiled program."""
    return init_params(task, jax.random.PRNGKey(0)), sample(task, jax.random.PRNGKey(1))


def _jitted_update(task, opt):
    """``(params, state, batch, curv, key) -> (updates, state)``, compiled once.

    Eager Hessian-free updates compile their CG loop on every call; the jitted one
    compiles once for all calls with the same shapes.
    """

    @jax.jit
    def update(params, state, batch, curv, key):
        grads, objective = _objective(task, params, batch, curv)
        return opt.update(grads, state, params, objective=objective, key=key)

    return update


@pytest.mark.parametrize(
    "rho, factor",
    [(np.nan, 1.5), (-3.0, 1.5), (0.1, 1.5), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0),
     (0.9, 2.0 / 3.0), (2.0, 2.0 / 3.0)],
)  # fmt: skip
def test_levenberg_marquardt_rule(rho, factor):
    assert float(levenberg_marquardt(10.0, jnp.float32(rho))) == pytest.approx(
        10.0 * factor
    )


def test_armijo_line_search():
    f = lambda r: (r - 0.3) ** 2  # noqa: E731
    # Rates 1, 0.8, 0.64 fail the Armijo test with c = 0.01; 0.512 passes.
    rate, tries = _line_search(f, f(0.0), -0.6, f(1.0), 0.01, 0.8, 60)
    assert float(rate) == pytest.approx(0.512) and int(tries) == 3
    # A "descent" direction along which f only grows is rejected after 60 tries.
    g = lambda r: r + 1.0  # noqa: E731
    rate, tries = _line_search(g, jnp.float32(1.0), -1.0, g(1.0), 0.01, 0.8, 60)
    assert float(rate) == 0.0 and int(tries) == 60


def test_cg_backtracking_walks_back_while_decreasing():
    values = {1.0: 5.0, 2.0: 3.0, 3.0: 2.0, 5.0: 4.0}
    value_at = lambda s: jnp.select(  # noqa: E731
        [s["x"][0] == k for k in values], list(values.values()), jnp.nan
    )
    saved = {"x": jnp.array([[1.0], [2.0], [3.0], [9.0]])}
    j, step, f_j, evals = _backtrack(
        value_at, saved, jnp.int32(3), {"x": jnp.array([5.0])}
    )
    # From the last (f = 4) back to x = 3 (f = 2); x = 2 (f = 3) is worse: stop.
    assert int(j) == 2 and float(step["x"][0]) == 3.0 and float(f_j) == 2.0
    assert int(evals) == 3
    # The last iterate is kept when the one before it is worse.
    values[3.0] = 7.0
    j, step, _, evals = _backtrack(
        value_at, saved, jnp.int32(3), {"x": jnp.array([5.0])}
    )
    assert int(j) == 3 and float(step["x"][0]) == 5.0 and int(evals) == 2


@pytest.mark.parametrize("product", ["linearize", "jacobian"])
def test_hf_solves_linear_least_squares_in_one_update(product):
    task = LinearRegression()
    params, batch = _setup(task)
    opt = make_optimizer(
        "hf", damping=1e-4, max_cg_iters=50, cg_tol=1e-8, product=product
    )
    state = opt.init(params)
    update = _jitted_update(task, opt)
    updates, state = update(params, state, batch, batch, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    # Least-squares reference from numpy.
    x = np.asarray(batch.inputs[0])
    y = np.asarray(batch.targets[0])
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    np.testing.assert_allclose(params["w"], coef[:-1], atol=1e-3)
    np.testing.assert_allclose(params["c"], coef[-1], atol=1e-3)
    # The quadratic model is exact: rho = 1, the damping shrinks by 2/3, rate 1.
    assert float(state.record.values["rho"]) == pytest.approx(1.0, abs=1e-3)
    assert float(state.damping) == pytest.approx(1e-4 * 2 / 3, rel=1e-5)
    assert float(state.record.values["rate"]) == 1.0
    assert int(state.work.curvature_products) >= 14  # 14 parameters


def test_jacobian_product_needs_gauss_newton_without_structural_damping():
    for bad in ({"structural": 0.03}, {"curvature": "hessian"}):
        with pytest.raises(ValueError, match="product = 'jacobian' needs"):
            make_optimizer("hf", product="jacobian", **bad)
    make_optimizer("hf", product="auto", structural=0.03)  # auto linearizes then


def test_hf_with_exact_hessian_on_a_convex_problem():
    task = LinearRegression()
    params, batch = _setup(task)
    opt = make_optimizer("hf", damping=1e-3, curvature="hessian", cg_tol=1e-8)
    state = opt.init(params)
    update = _jitted_update(task, opt)
    loss0 = float(task.loss(params, batch))
    for step in range(3):
        updates, state = update(params, state, batch, batch, jax.random.PRNGKey(step))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    final = float(task.loss(params, batch))
    assert final < 0.05 * loss0
    assert final == pytest.approx(2 * task.noise**2, rel=0.5)  # noise floor


def test_curvature_comes_from_the_curvature_batch():
    task = make_task("addition", length=10, hidden=6, batch_size=16)
    params, batch = _setup(task)
    opt = make_optimizer("hf", damping=1.0, max_cg_iters=20)
    update = _jitted_update(task, opt)
    outs = []
    for seed in (2, 3):
        curv = sample(task, jax.random.PRNGKey(seed), 8)
        key = jax.random.PRNGKey(0)
        updates, _ = update(params, opt.init(params), batch, curv, key)
        outs.append(np.asarray(updates["W_rec"]))
    assert not np.allclose(outs[0], outs[1])


def test_reuse_curvature_redraws_every_k_updates():
    task = make_task("addition", length=10, hidden=4, batch_size=8)
    params, _ = _setup(task)
    opt = make_optimizer("hf", reuse_curvature=3, max_cg_iters=5)
    update = _jitted_update(task, opt)
    state = opt.init(params)
    keys = []
    for step in range(7):
        batch = sample(task, jax.random.PRNGKey(100 + step))
        _, state = update(params, state, batch, batch, jax.random.PRNGKey(step))
        keys.append(tuple(np.asarray(state.curvature_key)))
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert keys[3] == keys[4] == keys[5] != keys[6]


@pytest.mark.slow
def test_reuse_curvature_draws_its_batch_through_the_objective():
    task = make_task("addition", length=10, hidden=4, batch_size=8)
    params = task.init(jax.random.PRNGKey(0))
    batch = task.sample_batch(jax.random.PRNGKey(1))
    size = 5
    sample = task.sample_batch
    drawn = []

    def sampler(key):
        drawn.append(tuple(np.asarray(key)))
        return sample(key, size)

    def no_sampling(*args, **kwargs):
        raise AssertionError("Hessian-free sampled data from the task")

    task.sample_batch = no_sampling  # the optimizer must go through the objective
    hparams = {"damping": 1.0, "max_cg_iters": 8, "min_cg_iters": 8}
    reuse = make_optimizer("hf", reuse_curvature=2, **hparams)
    fresh = make_optimizer("hf", **hparams)
    keys = [jax.random.PRNGKey(7), jax.random.PRNGKey(8), jax.random.PRNGKey(9)]
    # HF keeps fold_in(key, 1) of the update that redraws (updates 0 and 2 here).
    kept = [jax.random.fold_in(keys[i], 1) for i in (0, 0, 2)]
    state_r, state_f = reuse.init(params), fresh.init(params)
    for key, kept_key in zip(keys, kept, strict=True):
        # Hand-built expectation: the task sampled with the kept key, at the size of
        # the curvature batch, handed to HF with per-step re-estimation.
        expected = sample(kept_key, size)
        grads, objective = _objective(task, params, batch, batch, sampler)
        updates_r, state_r = reuse.update(
            grads, state_r, params, objective=objective, key=key
        )
        grads, objective = _objective(task, params, batch, expected, sampler)
        updates_f, state_f = fresh.update(
            grads, state_f, params, objective=objective, key=key
        )
        for k in params:
            np.testing.assert_array_equal(updates_r[k], updates_f[k])
        assert float(state_r.damping) == float(state_f.damping)
        assert drawn[-1] == tuple(np.asarray(kept_key))
    assert len(drawn) == 3  # one draw per reuse update, none by the fresh one


def test_reuse_curvature_needs_a_curvature_sampler():
    task = make_task("addition", length=10, hidden=4, batch_size=8)
    params, batch = _setup(task)
    opt = make_optimizer("hf", reuse_curvature=2, max_cg_iters=3)

    def update(params, key):  # traced only: the error comes before any computation
        loss, grads, states, sgrads = loss_grads_and_states(task, params, batch)
        objective = Objective(task, batch, batch, loss, grads, states, sgrads)
        return opt.update(grads, opt.init(params), params, objective=objective, key=key)

    with pytest.raises(ValueError, match="sample_curvature"):
        jax.eval_shape(update, params, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_preconditioner_diagonal_is_mean_squared_per_example_gradient():
    task = make_task("addition", length=10, hidden=4, batch_size=5)
    params = task.init(jax.random.PRNGKey(0))
    batch = task.sample_batch(jax.random.PRNGKey(1))
    diag = _per_example_sq_grad_mean(task, params, batch)
    squares = []
    for b in range(5):
        single = Batch(
            batch.inputs[:, b : b + 1], batch.targets[:, b : b + 1],
            batch.mask[:, b : b + 1], batch.lengths[b : b + 1],
        )  # fmt: skip
        squares.append(jax.grad(task.loss)(params, single))
    for k in diag:
        expected = np.mean([np.asarray(s[k]) ** 2 for s in squares], axis=0)
        np.testing.assert_allclose(diag[k], expected, rtol=1e-5, atol=1e-12)
    opt = make_optimizer("hf", precondition=True, max_cg_iters=10)
    grads, objective = _objective(task, params, batch)
    updates, state = opt.update(grads, opt.init(params), params, objective=objective)
    assert np.isfinite(np.asarray(updates["W_rec"])).all()
    assert int(state.work.grad_evals) == 1


@pytest.mark.slow
def test_hf_trains_the_wall_model_vmapped():
    # Left of the wall region (w < 4) the surface is smooth: HF converges quickly.
    result = run(
        "wall", "hf", seeds=[0, 1], steps=40, eval_every=10,
        task_hparams={"w0": 2.0, "b0": 1.0, "init_noise": 0.3, "tolerance": 1e-5},
        opt_hparams={"damping": 1.0},
    )  # fmt: skip
    assert list(result.summary.status) == ["solved", "solved"]
    first = result.records.groupby("seed").loss.first()
    assert first[0] != first[1]  # the seeds really start from different points


@pytest.mark.slow
def test_hf_trains_addition_at_a_short_length():
    result = run(
        "addition", "hf", seeds=1, steps=60, eval_every=20, eval_size=500,
        task_hparams={"length": 10, "hidden": 16, "batch_size": 200},
        opt_hparams={"damping": 1.0, "max_cg_iters": 50},
        curvature_batch_size=50,
    )  # fmt: skip
    losses = result.records.eval_loss.to_numpy()
    # Well below the best constant prediction (its loss, measured on a large
    # sample, is the reference) and still decreasing.
    task = make_task("addition", length=10, hidden=16, batch_size=200)
    batch = task.sample_batch(jax.random.PRNGKey(5), 2000)
    mean = jnp.sum(batch.targets[..., 0] * task.loss_weights(batch))
    constant = task.loss_from_outputs(jnp.full(batch.targets.shape, mean), batch)
    assert losses[-1] < 0.35 * float(constant)
    assert losses[-1] < losses[0]
    assert {"damping_mean", "rho_mean", "cg_iters_mean", "accepted_rate"} <= set(
        result.records.columns
    )
    assert (result.records.curvature_products > 0).all()
    # Gradient-equivalents count the curvature products on the smaller batch.
    row = result.records.iloc[-1]
    expected = row.grad_evals + 0.5 * row.fun_evals + row.curvature_products * 50 / 200
    assert row.grad_equivalents == pytest.approx(expected)
    # The per-update records (the runner's gradient included) add up to the same.
    per_update = (result.records.grad_equivalents_mean * 20).sum()
    assert per_update == pytest.approx(row.grad_equivalents, rel=1e-5)
