"""Vanilla and leaky-integrator RNNs, time-major, with the paper's initializations.

Vanilla (Pascanu et al. 2013, eq. 11; the state is the pre-activation ``x_t``)::

    x_t = W_rec sigma(x_{t-1}) + W_in u_t + b,   sigma(x_0) := h_0 = 0,
    y_t = W_out sigma(x_t) + b_out.

This is the released code's ``h_t = sigma(W_rec h_{t-1} + W_in u_t + b)`` with
``h_t = sigma(x_t)``; carrying ``x`` makes ``dx_{k+1}/dx_k = W_rec diag(sigma'(x_k))``,
the Jacobian of the paper's analysis and of the regularizer Omega.

Leaky integration (Jaeger et al. 2007), leak ``a`` in (0, 1)::

    x_k = a x_{k-1} + (1 - a) sigma(W_rec x_{k-1} + W_in u_k + b),  x_0 = 0,
    y_k = W_out x_k + b_out.

Weights act on row vectors: ``W_rec`` is ``[H, H]`` with ``x W_rec``, so its spectral
radius is the same as the paper's column convention.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Init = Literal["sigmoid", "basic_tanh", "smart_tanh"]
ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "basic_tanh": jnp.tanh,
    "smart_tanh": jnp.tanh,
}

#: smart_tanh: nonzero incoming recurrent weights per unit and target spectral radius.
SMART_FAN_IN = 15
SMART_RADIUS = 0.95


def _eig_radius_host(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    radius = np.abs(np.linalg.eigvals(w)).max(axis=-1)
    return radius.astype(np.float32)


def _eig_radius_cpu(w: Array) -> Array:
    # XLA's CPU LAPACK (geev) inside the compiled program, in float64 whatever the
    # global precision, so the value is the host computation's, to the last bit.
    with jax.enable_x64(True):
        eigenvalues = jnp.linalg.eigvals(w.astype(jnp.float64))
        return jnp.abs(eigenvalues).max(axis=-1).astype(jnp.float32)


def _eig_radius_callback(w: Array) -> Array:
    shape = jax.ShapeDtypeStruct(w.shape[:-2], jnp.float32)
    return jax.pure_callback(_eig_radius_host, shape, w, vmap_method="expand_dims")


def spectral_radius(w: Array) -> Array:
    """Largest absolute eigenvalue ``max_i |lambda_i(W)|`` of a square matrix (or many).

    Computed in float64 by LAPACK's ``geev`` and returned as float32; it works inside
    ``jit`` and ``vmap`` and is not differentiable. On CPU the eigenvalue routine is
    part of the compiled program, which therefore stays cacheable by JAX's persistent
    compilation cache (programs with host callbacks never are). Other backends have no
    nonsymmetric eigensolver, so there the value comes from NumPy on the host through
    ``jax.pure_callback``; both give the same number. A non-finite matrix gives NaN.
    """
    return jax.lax.platform_dependent(
        w, cpu=_eig_radius_cpu, default=_eig_radius_callback
    )


def init_rnn(key: Array, n_in: int, n_hidden: int, n_out: int, init: str) -> dict:
    """Initial RNN parameters (biases zero).

    * ``sigmoid``: all weights ``N(0, 0.01^2)``;
    * ``basic_tanh``: all weights ``N(0, 0.1^2)``;
    * ``smart_tanh``: ``W_in, W_out ~ N(0, 0.01^2)``; ``W_rec`` sparse with
      ``SMART_FAN_IN`` normal incoming weights per unit, rescaled to spectral radius
      ``SMART_RADIUS`` (Sutskever et al. 2013; Pascanu et al. 2013, section 4).
    """
    k_in, k_rec, k_out, k_mask = jax.random.split(key, 4)
    std = {"sigmoid": 0.01, "basic_tanh": 0.1, "smart_tanh": 0.01}[init]
    w_in = std * jax.random.normal(k_in, (n_in, n_hidden))
    w_out = std * jax.random.normal(k_out, (n_hidden, n_out))
    if init == "smart_tanh":
        fan_in = min(SMART_FAN_IN, n_hidden)
        # For each receiving unit (a column), pick fan_in distinct senders (rows).
        scores = jax.random.uniform(k_mask, (n_hidden, n_hidden))
        ranks = jnp.argsort(jnp.argsort(scores, axis=0), axis=0)
        w_rec = jax.random.normal(k_rec, (n_hidden, n_hidden)) * (ranks < fan_in)
        w_rec = w_rec * (SMART_RADIUS / spectral_radius(w_rec))
    else:
        w_rec = std * jax.random.normal(k_rec, (n_hidden, n_hidden))
    return {
        "W_in": w_in,
        "W_rec": w_rec,
        "b": jnp.zeros((n_hidden,)),
        "W_out": w_out,
        "b_out": jnp.zeros((n_out,)),
    }


def rnn_transition(
    params: dict, state: Array, inputs: Array, activation, leak: float
) -> Array:
    """``x_{k+1} = F(x_k, u_{k+1})`` for the vanilla (leak 0) or leaky recurrence."""
    drive = inputs @ params["W_in"] + params["b"]
    if leak == 0.0:
        return activation(state) @ params["W_rec"] + drive
    return leak * state + (1.0 - leak) * activation(state @ params["W_rec"] + drive)


def rnn_state_curvature(states: Array, activation, leak: float) -> Array:
    """Structural damping's ``D`` for the RNN's states ``x_t`` (like ``states``).

    Vanilla units (leak 0): ``x_t`` is the pre-activation, so ``D = sigma'(x_t)``, the
    Hessian of the matching loss of a logistic or tanh unit with respect to its input
    (Martens & Sutskever 2011). Leaky units: ``D = 1`` (the state is the unit's
    output, matched with squared error).
    """
    if leak != 0.0:
        return jnp.ones_like(states)
    return jax.vmap(jax.grad(activation))(states.ravel()).reshape(states.shape)


def _slope(activation, x: Array) -> Array:
    """``sigma'(x)`` elementwise (the activation's forward-mode derivative)."""
    return jax.jvp(activation, (x,), (jnp.ones_like(x),))[1]


def _previous(states: Array) -> Array:
    """``states[t - 1]`` at each ``t``, zeros at ``t = 0`` (the initial carry)."""
    return jnp.concatenate([jnp.zeros_like(states[:1]), states[:-1]], axis=0)


def rnn_states_scan(
    activation, leak: float, w_rec: Array, drive: Array, offset: Array
) -> Array:
    """The states ``x_t [T, B, H]`` by a plain ``lax.scan`` (the definition).

    ``drive_t = u_t W_in + b`` and ``offset_t`` is added to each ``x_t`` as it is
    computed. Differentiated by JAX's own rules, every derivative carries the weight
    tangent through the time loop; :func:`rnn_states` computes the same values with a
    cheaper rule and is what the tasks use. This one is its reference.
    """

    def step(carry, xs):
        drive_t, offset_t = xs
        if leak == 0.0:
            x = carry @ w_rec + drive_t + offset_t
            return activation(x), x
        x = leak * carry + (1.0 - leak) * activation(carry @ w_rec + drive_t)
        return x + offset_t, x + offset_t

    carry0 = jnp.zeros(drive.shape[1:], drive.dtype)
    return jax.lax.scan(step, carry0, (drive, offset))[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def rnn_states(
    activation, leak: float, w_rec: Array, drive: Array, offset: Array
) -> Array:
    """The states ``x_t [T, B, H]`` (as :func:`rnn_states_scan`), with a faster rule.

    The forward-mode rule moves the weight tangent out of the time loop. Vanilla
    units (``h_t = sigma(x_t)``, ``h_{-1} = 0``)::

        dx_t = sigma'(x_{t-1}) dx_{t-1} W_rec + e_t,
        e_t  = h_{t-1} dW_rec + d(drive_t) + d(offset_t),

    where every ``e_t`` comes from one ``[T B, H] @ [H, H]`` product after the
    forward pass, so the loop carries only the ``[B, H] @ [H, H]`` step. Leaky units
    (``x_t = a x_{t-1} + (1 - a) sigma(z_t) + offset_t``, ``z_t = x_{t-1} W_rec +
    drive_t``)::

        dx_t = a dx_{t-1} + (1 - a) sigma'(z_t) (dx_{t-1} W_rec + e_t) + d(offset_t),
        e_t  = x_{t-1} dW_rec + d(drive_t).

    The rule is linear in the tangents, so JAX transposes it for gradients (the
    weight cotangent is again one large product, ``sum_t h_{t-1}^T g_t``) and
    differentiates it again for Hessian-vector products; ``jax.linearize`` and
    ``vmap`` work as usual. Values and derivatives equal the plain scan's to
    rounding (tests/test_rnn.py checks value, JVP, VJP, HVP and vmap in float64).
    """
    return rnn_states_scan(activation, leak, w_rec, drive, offset)


@rnn_states.defjvp
def _rnn_states_jvp(activation, leak, primals, tangents):
    w_rec, drive, offset = primals
    d_w, d_drive, d_offset = tangents
    states = rnn_states(activation, leak, w_rec, drive, offset)
    if leak == 0.0:
        inject = _previous(activation(states)) @ d_w + d_drive + d_offset

        def step(dh_prev, xs):  # dh_prev = sigma'(x_{t-1}) dx_{t-1}
            inject_t, slope_t = xs
            dx = dh_prev @ w_rec + inject_t
            return slope_t * dx, dx

        xs = (inject, _slope(activation, states))
    else:
        previous = _previous(states)
        gain = (1.0 - leak) * _slope(activation, previous @ w_rec + drive)
        inject = previous @ d_w + d_drive

        def step(dx_prev, xs):
            inject_t, gain_t, d_offset_t = xs
            dx = leak * dx_prev + gain_t * (dx_prev @ w_rec + inject_t) + d_offset_t
            return dx, dx

        xs = (inject, gain, d_offset)
    _, d_states = jax.lax.scan(step, jnp.zeros_like(states[0]), xs)
    return states, d_states


def rnn_hidden(
    params: dict,
    inputs: Array,
    activation,
    leak: float = 0.0,
    state_offset: Array | None = None,
) -> Array:
    """The states ``x_t [T, B, H]`` for time-major ``inputs [T, B, n_in]``.

    ``state_offset`` (like the states, None for zeros) is added to each ``x_t`` as it
    is computed. The input layer is one matmul for all steps, outside the loop.
    """
    n_steps, batch = inputs.shape[:2]
    n_hidden = params["W_rec"].shape[0]
    if state_offset is None:
        state_offset = jnp.zeros((n_steps, batch, n_hidden), inputs.dtype)
    drive = inputs @ params["W_in"] + params["b"]
    return rnn_states(activation, leak, params["W_rec"], drive, state_offset)


def rnn_readout(params: dict, states: Array, activation, leak: float = 0.0) -> Array:
    """Outputs ``y = W_out sigma(x) + b_out`` (vanilla) or ``W_out x + b_out`` (leaky).

    ``states`` may hold any subset of the steps (``[K, B, H]``): the output layer
    is per step, so reading out only the scored steps gives the same values there.
    """
    readout = activation(states) if leak == 0.0 else states
    return readout @ params["W_out"] + params["b_out"]


def rnn_apply(
    params: dict,
    inputs: Array,
    activation,
    leak: float = 0.0,
    state_offset: Array | None = None,
) -> tuple[Array, Array]:
    """Run the RNN over time-major ``inputs [T, B, n_in]``.

    Returns ``(outputs [T, B, n_out], states [T, B, H])``: :func:`rnn_hidden`, then
    :func:`rnn_readout` at every step.
    """
    states = rnn_hidden(params, inputs, activation, leak, state_offset)
    return rnn_readout(params, states, activation, leak), states
