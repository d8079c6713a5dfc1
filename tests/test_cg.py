"""Conjugate gradient with Martens' rules, against jnp.linalg.solve and a numpy CG."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optimizers.cg import conjugate_gradient, save_schedule


def _spd(n, seed, cond=50.0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eig = np.geomspace(1.0, cond, n)
    return (q * eig) @ q.T, rng.normal(size=n)


def _numpy_martens_cg(a, g, x0, max_iters, tol, min_iters=1):
    """An independent, plain implementation of the same rules (all iterates kept)."""
    x = x0.copy()
    r = -g - a @ x
    p = r.copy()
    q_vals = [0.5 * x @ a @ x + g @ x]
    iterates = [x.copy()]
    i = 0
    while i < max_iters:
        ap = a @ p
        pap = p @ ap
        if pap <= 0:
            break
        alpha = (r @ r) / pap
        x = x + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        i += 1
        iterates.append(x.copy())
        q_vals.append(0.5 * x @ a @ x + g @ x)
        k = max(10, math.ceil(0.1 * i))
        converged = i > k and i >= min_iters and q_vals[i] < 0
        if converged and (q_vals[i] - q_vals[i - k]) / q_vals[i] < k * tol:
            break
    return x, i, iterates, q_vals


def _run(a, g, x0, **kwargs):
    with jax.enable_x64(True):
        a_j = jnp.asarray(a)
        result = conjugate_gradient(
            lambda v: {"x": a_j @ v["x"]},
            {"x": jnp.asarray(g)},
            {"x": jnp.asarray(x0)},
            **kwargs,
        )
        return jax.tree.map(np.asarray, result)


def test_save_schedule_is_ceil_5_times_1_3_power():
    expected = (5, 7, 9, 11, 15, 19, 25, 32, 41, 54, 69, 90, 117, 152, 197)
    assert save_schedule(250) == expected
    assert save_schedule(4) == ()


def test_solves_spd_system_to_tolerance():
    a, g = _spd(30, 0, cond=20.0)
    result = _run(a, g, np.zeros(30), max_iters=200, tol=1e-14)
    with jax.enable_x64(True):
        exact = np.asarray(jnp.linalg.solve(jnp.asarray(a), -jnp.asarray(g)))
    np.testing.assert_allclose(result.x["x"], exact, rtol=1e-6, atol=1e-9)
    assert not result.negative_curvature


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stopping_rule_and_iterates_match_reference(seed):
    a, g = _spd(200, seed, cond=300.0)
    x0 = np.zeros(200)
    ref_x, ref_i, ref_iterates, ref_q = _numpy_martens_cg(a, g, x0, 250, 5e-4)
    result = _run(a, g, x0, max_iters=250, tol=5e-4)
    assert int(result.iterations) == ref_i
    assert 10 < ref_i < 200  # the relative-progress rule, not the cap, stopped it
    np.testing.assert_allclose(result.x["x"], ref_x, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(result.q[: ref_i + 1], ref_q, rtol=1e-8, atol=1e-12)
    assert np.isnan(result.q[ref_i + 1 :]).all()
    # The kept iterates are exactly those at ceil(5 * 1.3^j) <= iterations.
    schedule = [i for i in save_schedule(250) if i <= ref_i]
    assert int(result.n_saved) == len(schedule)
    for slot, i in enumerate(schedule):
        np.testing.assert_allclose(
            result.saved["x"][slot], ref_iterates[i], rtol=1e-6, atol=1e-9
        )
    assert int(result.products) == 1 + ref_i


def test_min_and_max_iterations():
    a, g = _spd(200, 4, cond=1e4)
    capped = _run(a, g, np.zeros(200), max_iters=7, tol=5e-4)
    assert int(capped.iterations) == 7
    free = _run(a, g, np.zeros(200), max_iters=250, tol=0.5)
    forced = _run(a, g, np.zeros(200), max_iters=250, tol=0.5, min_iters=40)
    assert int(free.iterations) < 40 <= int(forced.iterations)


def test_warm_start_near_the_solution_needs_fewer_iterations():
    a, g = _spd(200, 5, cond=300.0)
    exact = np.linalg.solve(a, -g)
    cold = _run(a, g, np.zeros(200), max_iters=250, tol=5e-4)
    warm = _run(a, g, 0.95 * exact, max_iters=250, tol=5e-4)
    ref = _numpy_martens_cg(a, g, 0.95 * exact, 250, 5e-4)
    assert int(warm.iterations) == ref[1]
    assert int(warm.iterations) < int(cold.iterations)
    q = lambda x: 0.5 * x @ a @ x + g @ x  # noqa: E731
    assert q(warm.x["x"]) <= q(cold.x["x"]) + 1e-9


def test_non_positive_curvature_stops_without_taking_the_step():
    # Indefinite matrix: the first direction already has p^T A p < 0.
    a = np.diag([-1.0, 2.0, 3.0])
    g = np.array([1.0, 0.0, 0.0])
    result = _run(a, g, np.zeros(3), max_iters=50)
    assert bool(result.negative_curvature)
    assert int(result.iterations) == 0
    np.testing.assert_array_equal(result.x["x"], np.zeros(3))
    # With a positive first direction the step is taken, then it stops at the bad one.
    a = np.array([[2.0, 1.5], [1.5, -1.0]])
    g = np.array([1.0, 0.3])
    result = _run(a, g, np.zeros(2), max_iters=50)
    ref_x, ref_i, _, _ = _numpy_martens_cg(a, g, np.zeros(2), 50, 5e-4)
    assert bool(result.negative_curvature) and int(result.iterations) == ref_i == 1
    np.testing.assert_allclose(result.x["x"], ref_x)


def test_zero_gradient_is_converged_not_negative_curvature():
    a, _ = _spd(5, 6)
    result = _run(a, np.zeros(5), np.zeros(5), max_iters=50)
    assert int(result.iterations) == 0 and not bool(result.negative_curvature)


def test_diagonal_preconditioner_solves_the_same_system_faster():
    rng = np.random.default_rng(7)
    scales = np.geomspace(1.0, 1e4, 100)
    a, g = _spd(100, 7, cond=10.0)
    a = a * np.sqrt(np.outer(scales, scales))  # badly scaled SPD matrix
    g = g * np.sqrt(scales) + 0.0 * rng.normal(size=100)
    plain = _run(a, g, np.zeros(100), max_iters=250, tol=1e-12)
    with jax.enable_x64(True):
        pre = conjugate_gradient(
            lambda v: {"x": jnp.asarray(a) @ v["x"]},
            {"x": jnp.asarray(g)},
            {"x": jnp.zeros(100)},
            max_iters=250,
            tol=1e-12,
            precondition={"x": jnp.asarray(np.diag(a))},
        )
    exact = np.linalg.solve(a, -g)
    np.testing.assert_allclose(np.asarray(pre.x["x"]), exact, rtol=1e-5, atol=1e-8)
    assert int(pre.iterations) < int(plain.iterations)


def test_jit_and_vmap():
    a, g = _spd(20, 8)
    gs = np.stack([g, 2 * g, -g])

    def solve(gv):
        return conjugate_gradient(
            lambda v: {"x": jnp.asarray(a, jnp.float32) @ v["x"]},
            {"x": gv},
            {"x": jnp.zeros(20)},
            max_iters=100,
            tol=1e-10,
        ).x["x"]

    out = jax.jit(jax.vmap(solve))(jnp.asarray(gs, jnp.float32))
    for row, gv in zip(np.asarray(out), gs, strict=True):
        np.testing.assert_allclose(row, np.linalg.solve(a, -gv), rtol=2e-3, atol=2e-4)


def test_exact_convergence_is_not_reported_as_negative_curvature():
    # A = 2 I: one step gives an exactly zero residual, then a zero direction.
    g = np.array([1.0, -2.0, 0.5])
    result = _run(2.0 * np.eye(3), g, np.zeros(3), max_iters=50)
    assert int(result.iterations) == 1
    assert not bool(result.negative_curvature)
    np.testing.assert_allclose(result.x["x"], -g / 2)
    assert int(result.products) == 3  # r0, the step, the refused zero direction
