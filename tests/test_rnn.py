"""The RNN model against explicit loops, its initializations and the state gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optimizers.base import loss_grads_and_states
from tasks import make_task
from tasks.rnn import _eig_radius_callback as spectral_radius_callback
from tasks.rnn import (
    init_rnn,
    rnn_apply,
    rnn_states,
    rnn_states_scan,
    spectral_radius,
)

# Eager JAX compiles every primitive; jit whole functions to keep the tests fast.
jit_init = jax.jit(init_rnn, static_argnums=(1, 2, 3, 4))
jit_apply = jax.jit(rnn_apply, static_argnums=(2, 3))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


NP_ACT = {"sigmoid": _sigmoid, "tanh": np.tanh}
JAX_ACT = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}


def _random_params(seed, n_in, hidden, n_out, scale=0.7):
    rng = np.random.default_rng(seed)
    return {
        "W_in": rng.normal(scale=scale, size=(n_in, hidden)),
        "W_rec": rng.normal(scale=scale, size=(hidden, hidden)),
        "b": rng.normal(scale=0.3, size=hidden),
        "W_out": rng.normal(scale=scale, size=(hidden, n_out)),
        "b_out": rng.normal(scale=0.3, size=n_out),
    }


def _loop_rnn(params, inputs, act, leak=0.0, offset=None):
    """Per sequence, per step, column convention: an independent reference.

    Vanilla: ``x_t = W_rec^T sigma(x_{t-1}) + W_in^T u_t + b``, ``sigma(x_0) = 0``,
    ``y_t = W_out^T sigma(x_t) + b_out``. Leaky:
    ``x_k = a x_{k-1} + (1 - a) sigma(W_rec^T x_{k-1} + W_in^T u_k + b)``, ``x_0 = 0``,
    ``y_k = W_out^T x_k + b_out``. ``offset[t]`` is added to ``x_t``.
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    inputs = np.asarray(inputs, np.float64)
    n_steps, batch, _ = inputs.shape
    hidden = p["W_rec"].shape[0]
    states = np.zeros((n_steps, batch, hidden))
    outputs = np.zeros((n_steps, batch, p["W_out"].shape[1]))
    for s in range(batch):
        x_prev = np.zeros(hidden)
        for t in range(n_steps):
            u = inputs[t, s]
            if leak == 0.0:
                h_prev = act(x_prev) if t > 0 else np.zeros(hidden)
                x = p["W_rec"].T @ h_prev + p["W_in"].T @ u + p["b"]
            else:
                pre = p["W_rec"].T @ x_prev + p["W_in"].T @ u + p["b"]
                x = leak * x_prev + (1.0 - leak) * act(pre)
            if offset is not None:
                x = x + offset[t, s]
            readout = act(x) if leak == 0.0 else x
            states[t, s] = x
            outputs[t, s] = p["W_out"].T @ readout + p["b_out"]
            x_prev = x
    return outputs, states


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
@pytest.mark.parametrize("leak", [0.0, 0.3, 0.9])
def test_rnn_apply_matches_explicit_loop(x64, act, leak):
    params = _random_params(0, 3, 5, 2)
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(7, 2, 3))
    out, states = jit_apply(
        {k: jnp.asarray(v) for k, v in params.items()},
        jnp.asarray(inputs),
        JAX_ACT[act],
        leak,
    )
    ref_out, ref_states = _loop_rnn(params, inputs, NP_ACT[act], leak)
    assert out.shape == (7, 2, 2) and states.shape == (7, 2, 5)
    np.testing.assert_allclose(states, ref_states, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("leak", [0.0, 0.5])
def test_rnn_apply_state_offset_is_added_to_states(x64, leak):
    params = _random_params(2, 2, 4, 3)
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(6, 3, 2))
    offset = rng.normal(scale=0.5, size=(6, 3, 4))
    out, states = jit_apply(
        {k: jnp.asarray(v) for k, v in params.items()},
        jnp.asarray(inputs),
        jnp.tanh,
        leak,
        jnp.asarray(offset),
    )
    ref_out, ref_states = _loop_rnn(params, inputs, np.tanh, leak, offset)
    np.testing.assert_allclose(states, ref_states, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)


def test_rnn_apply_float32_matches_loop():
    params = _random_params(4, 3, 6, 2, scale=0.4)
    inputs = np.random.default_rng(5).normal(size=(8, 2, 3))
    out, states = jit_apply(
        {k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
        jnp.asarray(inputs, jnp.float32),
        jnp.tanh,
        0.0,
    )
    ref_out, ref_states = _loop_rnn(params, inputs, np.tanh)
    np.testing.assert_allclose(states, ref_states, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("init", "act", "leak"),
    [
        ("sigmoid", "sigmoid", 0.0),
        ("basic_tanh", "tanh", 0.0),
        ("smart_tanh", "tanh", 0.0),
        ("sigmoid", "sigmoid", 0.5),
    ],
)
def test_task_apply_uses_the_init_activation(x64, init, act, leak):
    task = make_task("addition", length=10, hidden=6, init=init, leak=leak)
    params = _random_params(6, task.n_in, 6, task.n_out)
    inputs = np.random.default_rng(7).normal(size=(5, 3, task.n_in))
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    out, states = jax.jit(task.apply)(jparams, jnp.asarray(inputs))
    ref_out, ref_states = _loop_rnn(params, inputs, NP_ACT[act], leak)
    np.testing.assert_allclose(states, ref_states, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("init", "act", "leak"),
    [
        ("sigmoid", "sigmoid", 0.0),
        ("basic_tanh", "tanh", 0.3),
        ("sigmoid", "sigmoid", 0.6),
    ],
)
def test_transition_reproduces_the_state_sequence(x64, init, act, leak):
    """``x_{k+1} = F(x_k, u_{k+1})`` for the states of the explicit loop."""
    task = make_task("temporal_order", length=10, hidden=5, init=init, leak=leak)
    params = _random_params(8, task.n_in, 5, task.n_out)
    inputs = np.random.default_rng(9).normal(size=(6, 2, task.n_in))
    _, ref_states = _loop_rnn(params, inputs, NP_ACT[act], leak)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    nxt = jax.jit(task.transition)(
        jparams, jnp.asarray(ref_states[:-1]), jnp.asarray(inputs[1:])
    )
    np.testing.assert_allclose(nxt, ref_states[1:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("init", "std"), [("sigmoid", 0.01), ("basic_tanh", 0.1)])
def test_dense_inits_std(init, std):
    params = jit_init(jax.random.key(0), 48, 48, 48, init)
    assert params["W_in"].shape == (48, 48)
    assert params["W_rec"].shape == (48, 48)
    assert params["W_out"].shape == (48, 48)
    for name in ("W_in", "W_rec", "W_out"):
        w = np.asarray(params[name])
        assert abs(w.std() / std - 1.0) < 0.1, (name, w.std())
        assert abs(w.mean()) < 0.1 * std
    for name in ("b", "b_out"):
        assert np.all(np.asarray(params[name]) == 0.0)
    # Independent draws: the three matrices differ.
    assert not np.allclose(params["W_in"], params["W_rec"])
    assert not np.allclose(params["W_rec"], params["W_out"])


@pytest.mark.parametrize(("hidden", "seed"), [(16, 0), (40, 1)])
def test_smart_tanh_init_sparse_with_radius(hidden, seed):
    n_in, n_out = 40, 40
    params = jit_init(jax.random.key(seed), n_in, hidden, n_out, "smart_tanh")
    w_rec = np.asarray(params["W_rec"], np.float64)
    assert w_rec.shape == (hidden, hidden)
    # Row-vector convention x @ W_rec: column j holds unit j's incoming weights.
    np.testing.assert_array_equal((w_rec != 0).sum(axis=0), np.full(hidden, 15))
    radius = np.abs(np.linalg.eigvals(w_rec)).max()
    np.testing.assert_allclose(radius, 0.95, rtol=1e-5)
    for name in ("W_in", "W_out"):
        w = np.asarray(params[name])
        assert abs(w.std() / 0.01 - 1.0) < 0.15, (name, w.std())
    assert np.all(np.asarray(params["b"]) == 0.0)
    assert np.all(np.asarray(params["b_out"]) == 0.0)


def test_smart_tanh_small_hidden_is_dense():
    params = jit_init(jax.random.key(3), 2, 8, 1, "smart_tanh")
    w_rec = np.asarray(params["W_rec"], np.float64)
    assert np.count_nonzero(w_rec) == 64
    np.testing.assert_allclose(np.abs(np.linalg.eigvals(w_rec)).max(), 0.95, rtol=1e-5)


def test_init_is_deterministic_per_key():
    a = jit_init(jax.random.key(5), 40, 16, 40, "smart_tanh")
    b = jit_init(jax.random.key(5), 40, 16, 40, "smart_tanh")
    c = jit_init(jax.random.key(6), 40, 16, 40, "smart_tanh")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["W_rec"], c["W_rec"])


def test_spectral_radius_jit_and_vmap():
    rng = np.random.default_rng(0)
    mats = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    ref = np.abs(np.linalg.eigvals(mats.astype(np.float64))).max(axis=-1)
    np.testing.assert_allclose(spectral_radius(jnp.asarray(mats[0, 0])), ref[0, 0])
    np.testing.assert_allclose(
        jax.jit(spectral_radius)(jnp.asarray(mats[0, 0])), ref[0, 0], rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.jit(jax.vmap(spectral_radius))(jnp.asarray(mats[1])), ref[1], rtol=1e-6
    )
    nested = jax.jit(jax.vmap(jax.vmap(spectral_radius)))(jnp.asarray(mats))
    assert nested.shape == (2, 3)
    np.testing.assert_allclose(nested, ref, rtol=1e-6)
    # Batched input without vmap, and a rotation (complex eigenvalues, radius 2).
    np.testing.assert_allclose(spectral_radius(jnp.asarray(mats[1])), ref[1], rtol=1e-6)
    rot = jnp.array([[0.0, -2.0], [2.0, 0.0]])
    np.testing.assert_allclose(jax.jit(spectral_radius)(rot), 2.0, rtol=1e-6)


def test_spectral_radius_is_float64_lapack_without_a_host_callback():
    # On CPU the eigensolver is compiled into the program: no host callback (which
    # would keep the program out of JAX's persistent compilation cache), and the
    # value is NumPy's float64 one rounded to float32, bit for bit, like the host path.
    rng = np.random.default_rng(1)
    mats = jnp.asarray(rng.normal(size=(4, 30, 30)).astype(np.float32))
    hlo = jax.jit(jax.vmap(spectral_radius)).lower(mats).as_text()
    assert "callback" not in hlo.lower()
    ref = np.abs(np.linalg.eigvals(np.asarray(mats, np.float64))).max(axis=-1)
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(spectral_radius))(mats), ref.astype(np.float32)
    )
    callback = jax.jit(jax.vmap(spectral_radius_callback))(mats)
    np.testing.assert_array_equal(callback, ref.astype(np.float32))
    broken = mats.at[0, 0, 0].set(jnp.nan)
    radii = np.asarray(jax.jit(jax.vmap(spectral_radius))(broken))
    assert np.isnan(radii[0]) and np.isfinite(radii[1:]).all()


def _np_task_loss(task_name, params, batch, leak, act, offset):
    outputs, _ = _loop_rnn(params, batch.inputs, act, leak, offset)
    mask = np.asarray(batch.mask, np.float64)
    targets = np.asarray(batch.targets)
    if task_name == "addition":
        per_step = np.sum((outputs - targets) ** 2, axis=-1)
    else:
        z = outputs - outputs.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        per_step = -np.take_along_axis(logp, targets[..., None].astype(int), -1)[..., 0]
    return np.sum(per_step * mask) / max(mask.sum(), 1.0)


@pytest.mark.parametrize(
    ("task_name", "kwargs", "leak"),
    [
        ("addition", {"length": 10}, 0.0),
        ("addition", {"length": 10}, 0.4),
        ("memorization_5bit", {"length": 2}, 0.0),
    ],
)
def test_state_gradient_is_dE_dx(x64, task_name, kwargs, leak):
    """``loss_grads_and_states``' state gradient equals finite differences of E."""
    task = make_task(task_name, hidden=4, batch_size=2, leak=leak, **kwargs)
    params = _random_params(7, task.n_in, 4, task.n_out, scale=0.8)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    batch = jax.jit(task.sample_batch)(jax.random.key(1))
    batch = jax.tree.map(np.asarray, batch)
    loss, grads, states, state_grads = jax.jit(loss_grads_and_states, static_argnums=0)(
        task, jparams, batch
    )

    zero = np.zeros(states.shape)
    ref_loss = _np_task_loss(task_name, params, batch, leak, np.tanh, zero)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
    _, ref_states = _loop_rnn(params, batch.inputs, np.tanh, leak)
    np.testing.assert_allclose(states, ref_states, rtol=1e-10, atol=1e-12)

    eps = 1e-6
    fd = np.zeros(states.shape)
    for idx in np.ndindex(*states.shape):
        bump = zero.copy()
        bump[idx] = eps
        up = _np_task_loss(task_name, params, batch, leak, np.tanh, bump)
        down = _np_task_loss(task_name, params, batch, leak, np.tanh, -bump)
        fd[idx] = (up - down) / (2 * eps)
    assert np.abs(fd).max() > 1e-3  # the check has something to compare
    np.testing.assert_allclose(state_grads, fd, rtol=1e-6, atol=1e-9)

    # The parameter gradients come with it (shapes of the parameters).
    assert jax.tree.structure(grads) == jax.tree.structure(jparams)


@pytest.mark.parametrize(
    "act, leak",
    [(jnp.tanh, 0.0), (jax.nn.sigmoid, 0.0), (jnp.tanh, 0.4), (jax.nn.sigmoid, 0.7)],
)
def test_custom_rule_recurrence_equals_the_plain_scan(x64, act, leak):
    # rnn_states (weight tangent outside the time loop) against rnn_states_scan
    # (JAX's own derivatives of the plain scan): value, forward and reverse mode,
    # both orders of second derivatives, and vmap, with a state offset.
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    n_steps, batch, hidden = 6, 3, 4
    args = {
        "w": jax.random.normal(keys[0], (hidden, hidden)),
        "drive": jax.random.normal(keys[1], (n_steps, batch, hidden)),
        "offset": 0.3 * jax.random.normal(keys[2], (n_steps, batch, hidden)),
    }
    weights = jax.random.normal(keys[3], (n_steps, batch, hidden))
    tangent = jax.tree.map(lambda x: jax.random.normal(keys[4], x.shape), args)

    def states_of(fn):
        return lambda a: fn(act, leak, a["w"], a["drive"], a["offset"])

    def loss_of(fn):  # a nonlinear function of every state
        return lambda a: jnp.sum(jnp.sin(states_of(fn)(a)) * weights)

    fast, plain = states_of(rnn_states), states_of(rnn_states_scan)
    lf, lp = loss_of(rnn_states), loss_of(rnn_states_scan)

    def close(a, b):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-12)

    close(jax.jit(fast)(args), plain(args))
    _, linear = jax.linearize(fast, args)
    close(linear(tangent), jax.jvp(plain, (args,), (tangent,))[1])
    cotangent = jax.random.normal(keys[0], (n_steps, batch, hidden))
    close(jax.vjp(fast, args)[1](cotangent), jax.vjp(plain, args)[1](cotangent))
    hvp_plain = jax.jvp(jax.grad(lp), (args,), (tangent,))[1]
    close(
        jax.jit(lambda a: jax.jvp(jax.grad(lf), (a,), (tangent,))[1])(args), hvp_plain
    )

    def directional(a):  # reverse over reverse: d/da <grad L(a), tangent>
        pairs = zip(jax.grad(lf)(a).values(), tangent.values(), strict=True)
        return sum(jnp.vdot(g, t) for g, t in pairs)

    close(jax.grad(directional)(args), hvp_plain)
    stacked = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), args)
    close(jax.vmap(jax.grad(lf))(stacked), jax.vmap(jax.grad(lp))(stacked))
