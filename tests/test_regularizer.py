"""The regularizer Omega (Pascanu et al. 2013, eq. 9) against a direct computation.

The reference builds every term explicitly in float64: the states ``x_k`` and the
backpropagated errors ``delta_k = dE/dx_k`` come from a hand-written time loop (not the
task's ``lax.scan``), the step Jacobian is written out in the row-vector convention
(vanilla: ``delta_k = (delta_{k+1} W_rec^T) * sigma'(x_k)``), and the gradient with
respect to ``W_rec`` (``x`` and ``delta`` held constant) is written in closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks
from optimizers import (
    Objective,
    add_omega_gradient,
    collect_records,
    loss_grads_and_states,
    omega,
    omega_gradient,
)

T, B, H = 5, 3, 4
SKIP_BELOW = 1e-20


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _params(seed: int, scale: float = 1.2) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "W_in": rng.normal(size=(2, H)),
        "W_rec": scale * rng.normal(size=(H, H)) / np.sqrt(H),
        "b": 0.1 * rng.normal(size=(H,)),
        "W_out": rng.normal(size=(H, 1)),
        "b_out": 0.1 * rng.normal(size=(1,)),
    }


def _batch(seed: int) -> tasks.Batch:
    rng = np.random.default_rng(seed)
    inputs = np.zeros((T, B, 2))
    inputs[:, :, 0] = rng.uniform(size=(T, B))
    inputs[[0, 2], :, 1] = 1.0
    targets = rng.uniform(size=(T, B, 1))
    mask = np.zeros((T, B))
    mask[-1] = 1.0
    mask[2, 0] = 1.0
    mask[-1, 1] = 0.0  # sequence 1 is scored only at step 2: later deltas vanish
    mask[2, 1] = 1.0
    return tasks.Batch(
        jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask), jnp.full(B, T)
    )


def _explicit_forward(params, inputs, leak, eps):
    """States ``x_1..x_T`` and outputs, one Python step at a time (tanh units)."""
    p = {k: jnp.asarray(v) for k, v in params.items()}
    x = jnp.zeros((inputs.shape[1], H))
    states, outputs = [], []
    for t in range(inputs.shape[0]):
        drive = inputs[t] @ p["W_in"] + p["b"]
        if leak == 0.0:
            h_prev = jnp.tanh(x) if t > 0 else jnp.zeros_like(x)
            x = h_prev @ p["W_rec"] + drive + eps[t]
            readout = jnp.tanh(x)
        else:
            x = leak * x + (1 - leak) * jnp.tanh(x @ p["W_rec"] + drive) + eps[t]
            readout = x
        states.append(x)
        outputs.append(readout @ p["W_out"] + p["b_out"])
    return jnp.stack(states), jnp.stack(outputs)


def _explicit_loss(params, batch, leak, eps):
    _, outputs = _explicit_forward(params, batch.inputs, leak, eps)
    per_step = jnp.sum((outputs - batch.targets) ** 2, axis=-1)
    return jnp.sum(per_step * batch.mask) / jnp.sum(batch.mask)


def _states_and_deltas(params, batch, leak):
    eps = jnp.zeros((T, B, H))
    states, _ = _explicit_forward(params, batch.inputs, leak, eps)
    deltas = jax.grad(lambda e: _explicit_loss(params, batch, leak, e))(eps)
    return np.asarray(states), np.asarray(deltas)


def _back(params, x_k, u_next, delta_next, leak):
    """``delta_{k+1} dx_{k+1}/dx_k`` for one (k, b), written out by hand."""
    w = np.asarray(params["W_rec"])
    if leak == 0.0:
        jac = w * (1 - np.tanh(x_k) ** 2)[:, None]  # J[i, j] = dx_{k+1,j} / dx_{k,i}
    else:
        z = x_k @ w + u_next @ np.asarray(params["W_in"]) + np.asarray(params["b"])
        jac = leak * np.eye(H) + (1 - leak) * w * (1 - np.tanh(z) ** 2)[None, :]
    return jac @ delta_next


def _reference_omega(params, states, deltas, inputs, leak):
    """Omega and (vanilla only) dOmega/dW_rec in closed form, with x, delta fixed."""
    w = np.asarray(params["W_rec"])
    terms, grads = [], []
    for k in range(T - 1):
        for b in range(B):
            d = deltas[k + 1, b]
            d_sq = d @ d
            if d_sq < SKIP_BELOW:
                continue
            back = _back(params, states[k, b], inputs[k + 1, b], d, leak)
            ratio = back @ back / d_sq
            terms.append((ratio - 1) ** 2)
            if leak == 0.0:
                # back = s * (W d), s = tanh'(x_k):
                # d ||back||^2 / dW_ij = 2 s_i^2 (W d)_i d_j.
                s = 1 - np.tanh(states[k, b]) ** 2
                d_back_sq = 2 * np.outer(s**2 * (w @ d), d)
                grads.append(2 * (ratio - 1) * d_back_sq / d_sq)
    value = np.mean(terms) if terms else 0.0
    grad = np.mean(grads, axis=0) if grads else None
    return value, grad, len(terms)


def _setup(leak, seed=0):
    task = tasks.make_task("addition", length=10, hidden=H, leak=leak)
    # The hand-made batch scores steps that the addition generator never scores
    # (not only the last), so the task must read out every step.
    task.last_step_only = False
    params = _params(seed)
    batch = _batch(seed + 1)
    states, deltas = _states_and_deltas(params, batch, leak)
    return task, params, batch, states, deltas


@pytest.mark.parametrize("leak", [0.0, 0.5])
def test_states_and_state_grads_match_explicit_loop(leak):
    task, params, batch, states, deltas = _setup(leak)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    loss, _, got_states, got_deltas = loss_grads_and_states(task, jparams, batch)
    np.testing.assert_allclose(got_states, states, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_deltas, deltas, rtol=1e-9, atol=1e-12)
    # And one delta by central finite differences on the injected perturbation.
    eps = np.zeros((T, B, H))
    eps[1, 0, 2] = 1e-6
    up = _explicit_loss(params, batch, leak, jnp.asarray(eps))
    down = _explicit_loss(params, batch, leak, jnp.asarray(-eps))
    np.testing.assert_allclose((up - down) / 2e-6, deltas[1, 0, 2], rtol=1e-6)
    # Sequence 1 is not scored after step 2 (index 2): its later deltas are zero.
    assert np.all(deltas[3:, 1] == 0.0)
    assert float(loss) > 0


@pytest.mark.parametrize("leak", [0.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_omega_value_matches_direct_computation(leak, seed):
    task, params, batch, states, deltas = _setup(leak, seed)
    expected, _, n_terms = _reference_omega(
        params, states, deltas, np.asarray(batch.inputs), leak
    )
    # Two (k, b) terms of sequence 1 have zero deltas and are skipped.
    assert n_terms == (T - 1) * B - 2
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    value = omega(task, jparams, jnp.asarray(states), jnp.asarray(deltas), batch.inputs)
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    assert expected > 1e-3  # a non-trivial value


def test_omega_gradient_matches_closed_form_vanilla():
    task, params, batch, states, deltas = _setup(0.0)
    expected_value, expected_grad, _ = _reference_omega(
        params, states, deltas, np.asarray(batch.inputs), 0.0
    )
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    value, grads = omega_gradient(
        task, jparams, jnp.asarray(states), jnp.asarray(deltas), batch.inputs
    )
    np.testing.assert_allclose(grads["W_rec"], expected_grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(value, expected_value, rtol=1e-10)
    assert np.abs(expected_grad).max() > 1e-3
    assert set(grads) == set(params)
    for k in ("W_in", "b", "W_out", "b_out"):
        np.testing.assert_array_equal(grads[k], np.zeros(params[k].shape))


def _explicit_omega_leaky(w_rec, params, states, deltas, inputs, leak):
    """Omega as an explicit function of W_rec alone (x and delta constant)."""
    total, count = 0.0, 0
    for k in range(T - 1):
        for b in range(B):
            d = deltas[k + 1, b]
            d_sq = float(d @ d)
            if d_sq < SKIP_BELOW:
                continue
            z = states[k, b] @ w_rec + inputs[k + 1, b] @ params["W_in"] + params["b"]
            back = leak * d + (1 - leak) * ((d * (1 - jnp.tanh(z) ** 2)) @ w_rec.T)
            total = total + (back @ back / d_sq - 1) ** 2
            count += 1
    return total / count


def test_omega_gradient_matches_explicit_function_leaky():
    leak = 0.5
    task, params, batch, states, deltas = _setup(leak)
    inputs = np.asarray(batch.inputs)
    expected_value, _, _ = _reference_omega(params, states, deltas, inputs, leak)
    ref_fn = lambda w: _explicit_omega_leaky(  # noqa: E731
        w, params, states, deltas, inputs, leak
    )
    w_rec = jnp.asarray(params["W_rec"])
    np.testing.assert_allclose(ref_fn(w_rec), expected_value, rtol=1e-10)
    expected_grad = jax.grad(ref_fn)(w_rec)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    value, grads = omega_gradient(
        task, jparams, jnp.asarray(states), jnp.asarray(deltas), batch.inputs
    )
    np.testing.assert_allclose(value, expected_value, rtol=1e-10)
    np.testing.assert_allclose(grads["W_rec"], expected_grad, rtol=1e-9, atol=1e-12)
    # W_in and b do change Omega for leaky units, but only W_rec gets a gradient.
    for k in ("W_in", "b", "W_out", "b_out"):
        np.testing.assert_array_equal(grads[k], np.zeros(params[k].shape))


def test_omega_skips_tiny_deltas():
    task, params, batch, states, _ = _setup(0.0)
    rng = np.random.default_rng(7)
    deltas = rng.normal(size=(T, B, H))
    deltas[2, 0] = 0.0  # skipped
    deltas[3, 1] = 1e-11 / np.sqrt(H)  # ||delta||^2 = 1e-22: skipped
    deltas[4, 2] = 1e-9 * rng.normal(size=H)  # ||delta||^2 ~ 1e-18: kept
    deltas[0] = 0.0  # delta_1 never enters (no x_0 step)
    inputs = np.asarray(batch.inputs)
    expected, expected_grad, n_terms = _reference_omega(
        params, states, deltas, inputs, 0.0
    )
    assert n_terms == (T - 1) * B - 2
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    value, grads = omega_gradient(
        task, jparams, jnp.asarray(states), jnp.asarray(deltas), batch.inputs
    )
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    np.testing.assert_allclose(grads["W_rec"], expected_grad, rtol=1e-9, atol=1e-12)
    # Nothing valid at all: Omega is 0 with a zero gradient, not NaN.
    value, grads = omega_gradient(
        task, jparams, jnp.asarray(states), jnp.zeros((T, B, H)), batch.inputs
    )
    assert float(value) == 0.0
    np.testing.assert_array_equal(grads["W_rec"], np.zeros((H, H)))


def test_omega_is_zero_for_orthogonal_linear_steps():
    # With sigma'(x_k) = 1 (x_k = 0) and an orthogonal W_rec every ratio is exactly 1.
    task, params, batch, _, _ = _setup(0.0)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(H, H)))
    params = {**params, "W_rec": q}
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    deltas = jnp.asarray(np.random.default_rng(4).normal(size=(T, B, H)))
    value, grads = omega_gradient(
        task, jparams, jnp.zeros((T, B, H)), deltas, batch.inputs
    )
    np.testing.assert_allclose(value, 0.0, atol=1e-24)
    np.testing.assert_allclose(grads["W_rec"], 0.0, atol=1e-12)


@pytest.mark.parametrize("weight", [4.0, 0.5])
def test_add_omega_gradient_adds_weighted_gradient(weight):
    task, params, batch, _, _ = _setup(0.0)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    loss, grads, states, state_grads = loss_grads_and_states(task, jparams, batch)
    objective = Objective(task, batch, batch, loss, grads, states, state_grads)
    expected_value, expected_grad, _ = _reference_omega(
        params,
        np.asarray(states),
        np.asarray(state_grads),
        np.asarray(batch.inputs),
        0.0,
    )
    rng = np.random.default_rng(5)
    incoming = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in params.items()}
    transform = add_omega_gradient(weight)
    state = transform.init(jparams)
    assert set(collect_records(state)) == {"omega"}
    updates, state = transform.update(incoming, state, jparams, objective=objective)
    for k in params:
        expected = np.asarray(incoming[k])
        if k == "W_rec":
            expected = expected + weight * expected_grad
        np.testing.assert_allclose(updates[k], expected, rtol=1e-9, atol=1e-12)
    record = collect_records(state)
    assert set(record) == {"omega"}
    assert record["omega"].dtype == jnp.float32
    np.testing.assert_allclose(record["omega"], expected_value, rtol=1e-6)


def test_add_omega_gradient_needs_objective():
    params = {"W_rec": jnp.eye(2)}
    transform = optax.with_extra_args_support(add_omega_gradient(1.0))
    state = transform.init(params)
    with pytest.raises(ValueError, match="objective"):
        transform.update(params, state, params)
