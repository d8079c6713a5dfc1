"""The single-unit wall model (Pascanu et al. 2013, Fig. 6; docs/measurements.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optimizers.base import loss_grads_and_states
from tasks import make_task
from tasks.wall import wall_error, wall_states

SIGMOID_HALF = 1.0 / (1.0 + np.exp(-0.5))


def _np_wall_error(w: float, b: float, n_steps: int = 50) -> float:
    """``x_t = w sigma(x_{t-1}) + b``, ``x_0 = 0.5``; ``(sigma(x_50) - 0.7)^2``."""
    x = 0.5
    for _ in range(n_steps):
        x = w / (1.0 + np.exp(-x)) + b
    return (1.0 / (1.0 + np.exp(-x)) - 0.7) ** 2


@pytest.mark.parametrize(("w", "quoted"), [(5.0, -2.613), (8.0, -4.48), (10.0, -5.725)])
def test_error_jumps_across_the_wall(w, quoted):
    b_wall = 0.5 - w * SIGMOID_HALF
    assert abs(b_wall - quoted) < 2e-3  # the positions quoted in docs/measurements.md
    below, above = np.asarray(
        wall_error(jnp.float32(w), jnp.array([b_wall - 1e-3, b_wall + 1e-3]))
    )
    assert below - above > 0.3
    assert below - above < 0.45  # docs/measurements.md: the jump is 0.33-0.41
    # The same jump in an independent float64 loop.
    ref_below = _np_wall_error(w, b_wall - 1e-3)
    ref_above = _np_wall_error(w, b_wall + 1e-3)
    assert ref_below - ref_above > 0.3
    np.testing.assert_allclose([below, above], [ref_below, ref_above], atol=2e-3)


def test_wall_is_where_the_jump_is():
    """On a fine b grid for w = 5 the largest jump sits at b = 0.5 - w sigma(0.5)."""
    b = jnp.linspace(-4.0, -1.0, 3001)  # step 0.001
    e = np.asarray(wall_error(jnp.float32(5.0), b))
    jumps = np.abs(np.diff(e))
    i = int(np.argmax(jumps))
    assert jumps[i] > 0.3
    assert abs(float(b[i]) - (0.5 - 5.0 * SIGMOID_HALF)) < 2e-3
    assert np.sort(jumps)[-2] < 0.05  # one wall, smooth elsewhere


def test_no_wall_for_small_w():
    b = jnp.linspace(-7.0, 1.0, 8001)  # step 0.001
    e = np.asarray(wall_error(jnp.float32(3.0), b))
    assert np.all(np.isfinite(e))
    assert np.abs(np.diff(e)).max() < 0.05
    # The error still varies over the window (the grid is not degenerate).
    assert e.max() - e.min() > 0.1


def test_wall_error_matches_loop_and_vectorizes():
    ws = np.array([0.0, 2.0, 5.0, 9.0])
    bs = np.array([-6.0, -2.5, 0.0, 0.7])
    got = np.asarray(wall_error(jnp.asarray(ws)[:, None], jnp.asarray(bs)[None, :]))
    assert got.shape == (4, 4)
    ref = np.array([[_np_wall_error(w, b) for b in bs] for w in ws])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    states = np.asarray(wall_states(jnp.float32(2.0), jnp.float32(-1.0), 5))
    x, ref_states = 0.5, []
    for _ in range(5):
        x = 2.0 / (1.0 + np.exp(-x)) - 1.0
        ref_states.append(x)
    np.testing.assert_allclose(states, ref_states, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "hparams", [{}, {"w0": 5.0, "b0": -2.0}, {"init_noise": 0.5, "n_steps": 20}]
)
def test_wall_task_loss_is_wall_error(hparams):
    task = make_task("wall", **hparams)
    params = task.init(jax.random.key(4))
    assert params["w"].shape == (1, 1) and params["b"].shape == (1,)
    batch = jax.jit(task.sample_batch)(jax.random.key(0))
    w, b = float(params["w"][0, 0]), float(params["b"][0])
    if not hparams.get("init_noise"):
        assert (w, b) == (task.w0, task.b0)
    loss = float(jax.jit(task.loss)(params, batch))
    np.testing.assert_allclose(loss, wall_error(w, b, task.n_steps), rtol=1e-5)
    np.testing.assert_allclose(loss, _np_wall_error(w, b, task.n_steps), rtol=1e-4)
    metrics = jax.jit(task.metrics)(params, batch)
    assert float(metrics["error_rate"]) == float(loss >= task.tolerance)
    # The gradient of the task loss agrees with that of wall_error.
    grads = jax.jit(jax.grad(task.loss))(params, batch)
    dw, db = jax.jit(jax.grad(wall_error, argnums=(0, 1)), static_argnums=2)(
        jnp.float32(w), jnp.float32(b), task.n_steps
    )
    np.testing.assert_allclose(grads["w"][0, 0], dw, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads["b"][0], db, rtol=1e-4, atol=1e-7)


def test_wall_state_gradient_is_dE_dx():
    """``loss_grads_and_states`` on the wall: ``dE/dx_t`` by finite differences."""
    task = make_task("wall", n_steps=8, w0=5.0, b0=-2.0)
    with jax.enable_x64(True):
        params = {"w": jnp.full((1, 1), 5.0), "b": jnp.full((1,), -2.0)}
        batch = jax.jit(task.sample_batch)(jax.random.key(0))
        loss, _, states, state_grads = jax.jit(loss_grads_and_states, static_argnums=0)(
            task, params, batch
        )
    np.testing.assert_allclose(loss, _np_wall_error(5.0, -2.0, 8), rtol=1e-12)

    def error(t_bump, eps):
        x = 0.5
        for t in range(8):
            x = 5.0 / (1.0 + np.exp(-x)) - 2.0 + (eps if t == t_bump else 0.0)
        return (1.0 / (1.0 + np.exp(-x)) - 0.7) ** 2

    eps = 1e-6
    fd = [(error(t, eps) - error(t, -eps)) / (2 * eps) for t in range(8)]
    assert states.shape == (8, 1, 1)
    np.testing.assert_allclose(state_grads[:, 0, 0], fd, rtol=1e-6, atol=1e-10)
