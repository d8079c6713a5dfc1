"""Curvature-vector products against explicit dense matrices, in float64."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import (
    DENSE_TASKS,
    PerSequenceMean,
    UserTanhRNN,
    UserTanhRNNWithCurvature,
    apply_operator,
    dense_gauss_newton,
    dense_hessian,
    dense_setup,
    init_params,
    jacobian,
    sample,
)

from optimizers import Objective, loss_grads_and_states, make_optimizer
from optimizers.curvature import (
    curvature_operator,
    gauss_newton_diagonal_exact,
    gauss_newton_operator,
    hessian_operator,
    jacobian_form_fits,
    jacobian_rows_per_sequence,
    lanczos_tridiagonal,
    slq_density,
    spectral_density,
    structural_operator,
    top_eigenpairs,
)
from tasks import make_task


def _curvature_operator(task, params, batch, kind, mu):
    return curvature_operator(kind, task, params, batch, mu)


def _dense_structural(task, params, batch):
    flat, unravel = ravel_pytree(params)
    states_of = lambda f: task.apply(unravel(f), batch.inputs)[1].ravel()  # noqa: E731
    jac = jacobian(states_of, flat)
    states = task.apply(params, batch.inputs)[1]
    n_steps, n_seq, _ = states.shape
    valid = (np.arange(n_steps)[:, None] < np.asarray(batch.lengths)[None, :]) / n_seq
    if task.leak == 0.0:
        # D = sigma'(x): the Hessian of the matching loss of the unit's nonlinearity.
        x = jnp.asarray(states)
        if task.init_scheme == "sigmoid":
            d = jax.nn.sigmoid(x) * (1 - jax.nn.sigmoid(x))
        else:
            d = 1 - jnp.tanh(x) ** 2
    else:
        d = jnp.ones_like(states)
    d = d * valid[..., None]
    return jac.T @ (d.ravel()[:, None] * jac)


@pytest.mark.parametrize("form", ["linearize", "jacobian"])
@pytest.mark.parametrize("name", sorted(DENSE_TASKS))
def test_gauss_newton_product_equals_dense(name, form):
    with jax.enable_x64(True):
        task, params, batch, v, _ = dense_setup(name)
        dense = dense_gauss_newton(task, params, batch)
        gv = apply_operator(gauss_newton_operator, task, params, batch, v, form=form)
        np.testing.assert_allclose(
            ravel_pytree(gv)[0], dense @ ravel_pytree(v)[0], rtol=1e-9, atol=1e-12
        )
        # Positive semi-definite, as every output loss is convex in the outputs.
        assert np.linalg.eigvalsh(dense).min() > -1e-10


@pytest.mark.parametrize("name", sorted(DENSE_TASKS))
def test_hessian_product_equals_jax_hessian(name):
    with jax.enable_x64(True):
        task, params, batch, v, _ = dense_setup(name)
        dense = dense_hessian(task, params, batch)
        hv = apply_operator(hessian_operator, task, params, batch, v)
        np.testing.assert_allclose(
            ravel_pytree(hv)[0], dense @ ravel_pytree(v)[0], rtol=1e-8, atol=1e-11
        )


@pytest.mark.parametrize("name", ["squared_error", "softmax", "sigmoid_units", "leaky"])
def test_structural_damping_equals_dense(name):
    with jax.enable_x64(True):
        task, params, batch, v, _ = dense_setup(name)
        vf = ravel_pytree(v)[0]
        s_dense = _dense_structural(task, params, batch)
        sv = apply_operator(structural_operator, task, params, batch, v)
        np.testing.assert_allclose(ravel_pytree(sv)[0], s_dense @ vf, rtol=1e-9)
        # Combined with Gauss-Newton in one pass, and added to the Hessian.
        g_dense = dense_gauss_newton(task, params, batch)
        mu = 0.3
        for form in ("linearize", "auto"):  # auto linearizes: structural damping
            combined = apply_operator(
                gauss_newton_operator, task, params, batch, v, structural=mu, form=form
            )
            np.testing.assert_allclose(
                ravel_pytree(combined)[0], (g_dense + mu * s_dense) @ vf, rtol=1e-9
            )
        h_dense = dense_hessian(task, params, batch)
        hs = apply_operator(
            _curvature_operator, task, params, batch, v, kind="hessian", mu=mu
        )
        np.testing.assert_allclose(
            ravel_pytree(hs)[0], (h_dense + mu * s_dense) @ vf, rtol=1e-8
        )


def test_gauss_newton_equals_hessian_for_linear_outputs():
    # With W_rec = 0 and W_in = 0 the outputs are affine in (W_out, b_out) only
    # through a constant hidden state: on those parameters G equals H exactly.
    with jax.enable_x64(True):
        task, params, batch, v, _ = dense_setup("squared_error")
        params = {**params, "W_rec": params["W_rec"] * 0, "W_in": params["W_in"] * 0}
        only_out = {k: (x if k in ("W_out", "b_out") else x * 0) for k, x in v.items()}
        gv = apply_operator(gauss_newton_operator, task, params, batch, only_out)
        hv = apply_operator(hessian_operator, task, params, batch, only_out)
        for k in ("W_out", "b_out"):
            np.testing.assert_allclose(gv[k], hv[k], rtol=1e-10, atol=1e-14)


# User tasks: structural damping needs the task's declared state curvature, and the
# loss weights have one owner.


def _user_setup(task):
    params = jax.tree.map(
        lambda p: p.astype(jnp.float64), init_params(task, jax.random.PRNGKey(0))
    )
    batch = jax.tree.map(
        lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
        sample(task, jax.random.PRNGKey(1)),
    )
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.PRNGKey(2), flat.shape, flat.dtype))
    return params, batch, v


def test_user_task_structural_damping_uses_its_state_curvature():
    with jax.enable_x64(True):
        task = UserTanhRNNWithCurvature()
        params, batch, v = _user_setup(task)
        flat, unravel = ravel_pytree(params)
        vf = ravel_pytree(v)[0]
        states_of = lambda f: task.apply(unravel(f), batch.inputs)[1].ravel()  # noqa: E731
        jac = jacobian(states_of, flat)
        states = task.apply(params, batch.inputs)[1]
        # Reference: the matching loss of tanh units is sum log cosh(x) (its gradient
        # is tanh), weighted by 1 / n_sequences on the valid steps; D is its dense
        # Hessian by autodiff, not the task's formula.
        n_steps, n_seq, _ = states.shape
        valid = (np.arange(n_steps)[:, None] < np.asarray(batch.lengths)) / n_seq
        weight = jnp.asarray(np.broadcast_to(valid[..., None], states.shape).ravel())

        def matching(x):
            return jnp.sum(weight * jnp.log(jnp.cosh(x)))

        d_dense = jax.jit(jax.hessian(matching))(states.ravel())
        s_dense = jac.T @ d_dense @ jac
        sv = apply_operator(structural_operator, task, params, batch, v)
        np.testing.assert_allclose(ravel_pytree(sv)[0], s_dense @ vf, rtol=1e-9)
        # The identity (the old silent fallback) is a different matrix here.
        s_identity = jac.T @ (weight[:, None] * jac)
        assert not np.allclose(s_identity @ vf, s_dense @ vf, rtol=0.05)
        mu = 0.3
        g_dense = dense_gauss_newton(task, params, batch)
        combined = apply_operator(
            gauss_newton_operator, task, params, batch, v, structural=mu
        )
        np.testing.assert_allclose(
            ravel_pytree(combined)[0], (g_dense + mu * s_dense) @ vf, rtol=1e-9
        )


def test_structural_damping_without_state_curvature_is_an_error():
    task = UserTanhRNN()
    params = init_params(task, jax.random.PRNGKey(0))
    batch = sample(task, jax.random.PRNGKey(1))
    with pytest.raises(NotImplementedError, match="state_curvature"):
        structural_operator(task, params, batch)
    with pytest.raises(NotImplementedError, match="structural damping"):
        gauss_newton_operator(task, params, batch, structural=0.1)
    with pytest.raises(NotImplementedError, match="state_curvature"):
        curvature_operator("hessian", task, params, batch, 0.1)
    # Without structural damping the task is fine.
    v = jax.tree.map(jnp.ones_like, params)
    gv = apply_operator(gauss_newton_operator, task, params, batch, v)
    assert np.isfinite(ravel_pytree(gv)[0]).all()
    # ... and Hessian-free asks for it only when structural damping is on.
    loss, grads, states, sgrads = jax.jit(loss_grads_and_states, static_argnums=0)(
        task, params, batch
    )
    objective = Objective(task, batch, batch, loss, grads, states, sgrads)

    def update(opt):  # compiled: eagerly, every operation of HF would compile alone
        step = jax.jit(lambda g, s, p: opt.update(g, s, p, objective=objective))
        return step(grads, opt.init(params), params)

    with pytest.raises(NotImplementedError, match="state_curvature"):
        update(make_optimizer("hf", structural=0.03, max_cg_iters=3))
    updates, _ = update(make_optimizer("hf", max_cg_iters=3))
    assert np.isfinite(np.asarray(updates["W_rec"])).all()


def test_overridden_loss_weights_reach_the_loss_and_every_curvature_product():
    with jax.enable_x64(True):
        task = PerSequenceMean()
        params, batch, v = _user_setup(task)
        flat, unravel = ravel_pytree(params)
        mask = np.asarray(batch.mask)
        w = mask / (mask.sum(axis=0, keepdims=True) * mask.shape[1])  # by hand
        outputs = np.asarray(task.apply(params, batch.inputs)[0])
        per_step = ((outputs - np.asarray(batch.targets)) ** 2).sum(-1)
        np.testing.assert_allclose(task.loss(params, batch), (w * per_step).sum())
        # Gauss-Newton in closed form: squared error has H_L = 2 w_t I per step.
        outputs_of = lambda f: task.apply(unravel(f), batch.inputs)[0].ravel()  # noqa: E731
        jac = np.asarray(jacobian(outputs_of, flat))
        g_dense = jac.T @ (2 * np.repeat(w.ravel(), outputs.shape[-1])[:, None] * jac)
        for form in ("linearize", "jacobian"):  # every step scored: K = T rows
            gv = apply_operator(
                gauss_newton_operator, task, params, batch, v, form=form
            )
            np.testing.assert_allclose(
                ravel_pytree(gv)[0], g_dense @ ravel_pytree(v)[0], rtol=1e-9
            )
        exact = gauss_newton_diagonal_exact(task, params, batch)
        np.testing.assert_allclose(ravel_pytree(exact)[0], np.diag(g_dense), rtol=1e-9)


def test_jacobian_form_with_several_steps_of_softmax_rows_equals_dense():
    # Memorization scores every step (K = T) of a 6-way softmax (r = 5 rows per
    # step), with a mask: rows ordered by step, then direction.
    with jax.enable_x64(True):
        task = make_task("memorization", length=12, hidden=3, batch_size=2)
        params, batch, v = _user_setup(task)
        n_steps = batch.inputs.shape[0]
        assert jacobian_rows_per_sequence(task, params, batch) == n_steps * 5
        dense = dense_gauss_newton(task, params, batch)
        for form in ("jacobian", "auto"):  # auto: too many rows, linearized
            gv = apply_operator(
                gauss_newton_operator, task, params, batch, v, form=form
            )
            np.testing.assert_allclose(
                ravel_pytree(gv)[0], dense @ ravel_pytree(v)[0], rtol=1e-9, atol=1e-12
            )


def test_auto_form_takes_the_jacobian_only_where_it_fits():
    # Temporal order scores one step of 4 softmax units: 3 rows per sequence.
    task, params, batch, _, _ = dense_setup("softmax")
    assert jacobian_rows_per_sequence(task, params, batch) == 3
    assert jacobian_form_fits(task, params, batch)

    def built_by(form, structural=0.0):  # which operator builds the product
        shapes = jax.eval_shape(lambda p: p, params)  # traced, never computed
        picked = []

        def trace(p):
            op = gauss_newton_operator(task, p, batch, structural, form=form)
            picked.append(op.__qualname__.split(".")[0])
            return op(p)

        jax.eval_shape(trace, shapes)
        return picked[0]

    assert built_by("auto") == "gauss_newton_jacobian_operator"
    assert built_by("auto", 0.1) == "gauss_newton_operator"  # structural damping
    assert built_by("linearize") == "gauss_newton_operator"
    # Every step scored: 4 steps of one unit fit, 12 are too many rows.
    for n_steps, fits in ((4, True), (12, False)):
        user = type("Long", (UserTanhRNN,), {"n_steps": n_steps})()
        user_params = user.init(jax.random.PRNGKey(0))
        user_batch = user.sample_batch(jax.random.PRNGKey(1))
        assert jacobian_rows_per_sequence(user, user_params, user_batch) == n_steps
        assert jacobian_form_fits(user, user_params, user_batch) == fits
    # A model that mixes sequences: auto keeps linearizing, the Jacobian refuses.
    mixed = copy.copy(task)
    mixed.independent_sequences = False
    assert not jacobian_form_fits(mixed, params, batch)
    with pytest.raises(ValueError, match="independent_sequences"):
        gauss_newton_operator(mixed, params, batch, form="jacobian")
    with pytest.raises(ValueError, match="structural"):
        gauss_newton_operator(task, params, batch, 0.1, form="jacobian")
    with pytest.raises(ValueError, match="form must be one of"):
        gauss_newton_operator(task, params, batch, form="dense")


def test_unknown_curvature_kind():
    task, params, batch, _, _ = dense_setup("squared_error")
    with pytest.raises(ValueError, match="gauss_newton"):
        curvature_operator("fisher", task, params, batch)


def test_operator_is_linear_and_reuses_one_linearization():
    task, params, batch, v, _ = dense_setup("softmax")
    matvec = jax.jit(gauss_newton_operator(task, params, batch))
    a = matvec(v)
    b = matvec(jax.tree.map(lambda x: 2.0 * x, v))
    for k in a:
        np.testing.assert_allclose(2.0 * a[k], b[k], rtol=1e-5, atol=1e-7)
    # The jitted closure compiles once and is reused for new vectors.
    matvec(jax.tree.map(lambda x: -x, v))
    assert matvec._cache_size() == 1


# Lanczos, top eigenpairs and stochastic Lanczos quadrature against dense eigh.
# Results go to NumPy before checking: every eager jnp op on a new shape compiles.

KEY = jax.random.PRNGKey(11)


def _dense_symmetric(eigenvalues, seed=0):
    """``Q diag(lam) Q^T`` with a random orthogonal ``Q``, and ``Q``."""
    n = len(eigenvalues)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.asarray(eigenvalues)) @ q.T, q


def _pytree_operator(matrix):
    """A two-leaf pytree ``like`` and ``v -> A v`` on it."""
    n = matrix.shape[0]
    like = {"a": jnp.zeros((n // 2,)), "b": jnp.zeros((n - n // 2, 1))}
    _, unravel = ravel_pytree(like)
    a = jnp.asarray(matrix)
    return like, lambda v: unravel(a @ ravel_pytree(v)[0])


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _flat_vectors(vectors):
    """``[k, n]`` from a pytree with a leading ``k`` axis (leaves in ravel order)."""
    leaves = jax.tree.leaves(_numpy(vectors))
    return np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


def _assert_same_up_to_sign(u, v, tol):
    cos = np.abs(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))
    assert cos > 1 - tol, cos


def _start_vector(n):
    """The start vector ``top_eigenpairs`` draws from ``KEY`` for a flat ``[n]``."""
    z = np.asarray(jax.random.normal(KEY, (n,), jnp.float64))
    return z / np.linalg.norm(z)


def test_lanczos_tridiagonal_recovers_dense_spectrum():
    with jax.enable_x64(True):
        lam = np.random.default_rng(1).uniform(-5.0, 10.0, 30)
        a, _ = _dense_symmetric(lam)
        v0 = np.random.default_rng(2).standard_normal(30)
        matvec = lambda x: jnp.asarray(a) @ x  # noqa: E731
        result = _numpy(lanczos_tridiagonal(matvec, jnp.asarray(3.0 * v0), 30))
        assert result.alphas.shape == (30,) and result.betas.shape == (29,)
        t = (
            np.diag(result.alphas)
            + np.diag(result.betas, 1)
            + np.diag(result.betas, -1)
        )
        np.testing.assert_allclose(np.linalg.eigvalsh(t), np.sort(lam), atol=1e-8)
        np.testing.assert_allclose(
            result.basis @ result.basis.T, np.eye(30), atol=1e-12
        )
        np.testing.assert_allclose(result.basis[0], v0 / np.linalg.norm(v0), atol=1e-14)
        # Q A Q^T = T: the basis tridiagonalizes A.
        np.testing.assert_allclose(result.basis @ a @ result.basis.T, t, atol=1e-10)


def test_top_eigenpairs_converge_fast_on_separated_top():
    with jax.enable_x64(True):
        rest = np.random.default_rng(2).uniform(-1.0, 1.0, 197)
        a, q = _dense_symmetric(np.concatenate([[100.0, 50.0, 20.0], rest]))
        like, operator = _pytree_operator(a)
        pairs = _numpy(top_eigenpairs(operator, like, KEY, num_iters=16, k=3))
        np.testing.assert_allclose(pairs.values, [100.0, 50.0, 20.0], rtol=1e-6)
        vectors = _flat_vectors(pairs.vectors)
        for i in range(3):
            _assert_same_up_to_sign(vectors[i], q[:, i], 1e-6)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-12)
        assert pairs.ritz_values.shape == (16,)
        assert np.all(np.diff(pairs.ritz_values) >= 0)
        np.testing.assert_allclose(pairs.ritz_weights.sum(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("name", ["softmax", "squared_error"])
def test_top_eigenpairs_of_pytree_hessian(name):
    with jax.enable_x64(True):
        task, params, batch, _, n = dense_setup(name)
        dense = dense_hessian(task, params, batch)
        values, vectors = np.linalg.eigh(np.asarray(dense))
        # Linearized inside jit, as the analysis does (eager linearization is slow).
        top = jax.jit(
            lambda p: top_eigenpairs(hessian_operator(task, p, batch), p, KEY, n, k=2)
        )
        pairs = _numpy(top(params))
        np.testing.assert_allclose(pairs.values, values[::-1][:2], rtol=1e-8)
        assert jax.tree.structure(pairs.vectors) == jax.tree.structure(params)
        for leaf, p in zip(
            jax.tree.leaves(pairs.vectors), jax.tree.leaves(params), strict=True
        ):
            assert leaf.shape == (2, *p.shape)
        _assert_same_up_to_sign(_flat_vectors(pairs.vectors)[0], vectors[:, -1], 1e-8)


def test_lanczos_breakdown_is_finite_and_exact():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        u, w = np.linalg.qr(rng.standard_normal((10, 2)))[0].T
        a = 3.0 * np.outer(u, u) - np.outer(w, w)  # rank 2: Krylov dimension 3
        matvec = lambda x: jnp.asarray(a) @ x  # noqa: E731
        # A generic start vector and a zero one, which breaks down at once.
        starts = jnp.asarray(np.stack([rng.standard_normal(10), np.zeros(10)]))
        result = _numpy(jax.vmap(lambda v: lanczos_tridiagonal(matvec, v, 8))(starts))
        assert all(np.all(np.isfinite(x)) for x in result)
        np.testing.assert_array_equal(result.basis[0, 3:], 0.0)
        np.testing.assert_array_equal(result.alphas[0, 3:], 0.0)
        np.testing.assert_array_equal(result.betas[0, 2:], 0.0)
        assert all(np.all(x[1] == 0) for x in result)
        like, operator = _pytree_operator(a)
        pairs = _numpy(top_eigenpairs(operator, like, KEY, num_iters=8, k=4))
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(pairs))
        np.testing.assert_allclose(pairs.values[:3], [3.0, 0.0, -1.0], atol=1e-12)
        vectors = _flat_vectors(pairs.vectors)
        _assert_same_up_to_sign(vectors[0], u, 1e-12)
        np.testing.assert_array_equal(vectors[3], 0.0)  # no 4th Krylov direction
        # The quadrature rule is still exact: weights are the squared projections.
        z = _start_vector(10)
        genuine = pairs.ritz_weights > 0
        np.testing.assert_allclose(
            pairs.ritz_values[genuine], [-1.0, 0.0, 3.0], atol=1e-12
        )
        expect = [(w @ z) ** 2, 1 - (u @ z) ** 2 - (w @ z) ** 2, (u @ z) ** 2]
        np.testing.assert_allclose(pairs.ritz_weights[genuine], expect, rtol=1e-10)
        # A zero operator breaks down at once, with the default (floored) sigma.
        zero = lambda v: jax.tree.map(jnp.zeros_like, v)  # noqa: E731
        density = slq_density(zero, like, KEY, np.linspace(-1.0, 1.0, 5), 8)
        assert np.all(np.isfinite(density))


def test_spectral_density_single_probe_matches_dense():
    with jax.enable_x64(True):
        lam = np.linspace(-3.0, 5.0, 12)
        a, q = _dense_symmetric(lam, seed=5)
        like, operator = _pytree_operator(a)
        pairs = _numpy(top_eigenpairs(operator, like, KEY, num_iters=12))
        weights = (q.T @ _start_vector(12)) ** 2
        np.testing.assert_allclose(pairs.ritz_values, lam, atol=1e-10)
        np.testing.assert_allclose(pairs.ritz_weights, weights, atol=1e-10)
        theta, w = pairs.ritz_values, pairs.ritz_weights
        grid = np.linspace(-10.0, 12.0, 4001)
        density = np.asarray(spectral_density(theta, w, grid, 0.3))
        np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, rtol=1e-8)
        # With a tiny sigma, the mass near each eigenvalue is its weight.
        local = lam[:, None] + np.linspace(-0.05, 0.05, 2001)
        sharp = np.asarray(spectral_density(theta, w, local.ravel(), 1e-3))
        mass = np.trapezoid(sharp.reshape(local.shape), local, axis=1)
        np.testing.assert_allclose(mass, weights, rtol=1e-6, atol=1e-12)
        # A leading probe axis is averaged.
        stacked = spectral_density(np.stack([theta] * 3), np.stack([w] * 3), grid, 0.3)
        np.testing.assert_allclose(stacked, density, rtol=1e-12)


def test_slq_density_approaches_eigenvalue_histogram():
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        lam = np.concatenate([rng.uniform(-2.0, -1.0, 30), rng.uniform(1.0, 3.0, 70)])
        a, _ = _dense_symmetric(lam, seed=7)
        like, operator = _pytree_operator(a)
        grid = np.linspace(-4.0, 5.0, 2001)
        density = slq_density(operator, like, KEY, grid, num_iters=16, n_probes=32)
        density = np.asarray(density)
        np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, rtol=1e-6)
        mass = np.trapezoid(np.where(grid < 0.0, density, 0.0), grid)
        assert abs(mass - 0.3) < 0.1, mass


def test_lanczos_jit_and_vmap():
    with jax.enable_x64(True):
        a, _ = _dense_symmetric(np.linspace(-1.0, 4.0, 16), seed=8)
        like, operator = _pytree_operator(a)
        top = jax.jit(top_eigenpairs, static_argnames=("operator", "num_iters", "k"))
        first = top(operator, like, KEY, num_iters=16, k=2)
        compiled = top._cache_size()
        top(operator, like, jax.random.PRNGKey(9), num_iters=16, k=2)
        assert top._cache_size() == compiled  # a new key does not recompile
        np.testing.assert_allclose(first.values, [4.0, 4.0 - 5.0 / 15], rtol=1e-10)
        matvec = lambda x: jnp.asarray(a) @ x  # noqa: E731
        starts = np.random.default_rng(9).standard_normal((3, 16))
        starts[1] = np.linalg.eigh(a)[1][:, 0]  # an eigenvector: breaks down at once
        batched = jax.vmap(lambda v: lanczos_tridiagonal(matvec, v, 8))(starts)
        batched = _numpy(batched)
        single = jax.jit(lanczos_tridiagonal, static_argnums=(0, 2))
        for i in range(3):
            for x, y in zip(batched, single(matvec, starts[i], 8), strict=True):
                np.testing.assert_allclose(x[i], y, atol=1e-12)
        np.testing.assert_array_equal(batched.basis[1, 1:], 0.0)


def test_top_eigenpairs_float32_resolves_small_eigenvalues_under_an_exploding_one():
    # An exploding top direction (1e5) must not hide the next ones in float32.
    n = 100
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.concatenate([[1e5, 100.0, 30.0], rng.uniform(-1, 1, n - 3)])
    a = jnp.asarray((q * lam) @ q.T, jnp.float32)
    like = {"x": jnp.zeros(n, jnp.float32)}
    pairs = top_eigenpairs(
        lambda v: {"x": a @ v["x"]}, like, jax.random.PRNGKey(0), num_iters=20, k=3
    )
    np.testing.assert_allclose(pairs.values, [1e5, 100.0, 30.0], rtol=1e-3)


def test_top_eigenpairs_rejects_more_pairs_than_iterations():
    like = {"x": jnp.zeros(4)}
    with pytest.raises(ValueError, match="num_iters"):
        top_eigenpairs(lambda v: v, like, jax.random.PRNGKey(0), num_iters=3, k=4)
