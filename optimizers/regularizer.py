"""The vanishing-gradient regularizer Omega (Pascanu et al. 2013, section 3.3, eq. 9).

With ``delta_{k+1} = dE/dx_{k+1}`` (from the loss gradient) and the step Jacobian
``dx_{k+1}/dx_k`` (for the vanilla RNN ``W_rec^T diag(sigma'(x_k))``)::

    Omega = mean_{k, b} ( ||delta_{k+1} dx_{k+1}/dx_k||^2 / ||delta_{k+1}||^2 - 1 )^2

Like the released code we use squared norms, skip terms with
``||delta_{k+1}||^2 < 1e-20`` and average over the remaining (batch, time) terms. Only
the direct gradient with respect to the recurrent weights is used: ``x_k`` and
``delta_{k+1}`` are constants. Omega asks the backpropagated error to keep its norm from
step to step, which counters vanishing gradients; without clipping it usually fails,
because it pushes the network towards the exploding regime.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers.base import Objective, StepRecord

Array = jax.Array
SKIP_BELOW = 1e-20


def omega(task, params, states: Array, state_grads: Array, inputs: Array) -> Array:
    """Omega at ``params`` with states ``x_t`` and ``dE/dx_t`` held fixed.

    Args:
      task: a task with ``transition(params, x_k, u_{k+1}) -> x_{k+1}``.
      params: parameters (the recurrent weights are what Omega's gradient moves).
      states: ``[T, B, H]`` hidden states ``x_1..x_T``.
      state_grads: ``[T, B, H]`` gradients ``dE/dx_t``.
      inputs: ``[T, B, n_in]`` inputs (``u_{k+1}`` drives the step from ``x_k``).
    """
    states = jax.lax.stop_gradient(states)
    deltas = jax.lax.stop_gradient(state_grads)[1:]
    step = lambda x: task.transition(params, x, inputs[1:])  # noqa: E731
    _, pullback = jax.vjp(step, states[:-1])
    (back,) = pullback(deltas)
    delta_sq = jnp.sum(deltas**2, axis=-1)
    valid = delta_sq >= SKIP_BELOW
    ratio = jnp.sum(back**2, axis=-1) / jnp.where(valid, delta_sq, 1.0)
    terms = jnp.where(valid, (ratio - 1.0) ** 2, 0.0)
    return jnp.sum(terms) / jnp.maximum(jnp.sum(valid), 1)


def omega_gradient(task, params, states, state_grads, inputs):
    """``(Omega, dOmega/dW_rec)``: the gradient is zero outside recurrent weights."""
    value, grads = jax.value_and_grad(
        lambda p: omega(task, p, states, state_grads, inputs)
    )(params)
    mask = task.recurrent_mask(params)
    grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
    return value, grads


class OmegaState(NamedTuple):
    """State of :func:`add_omega_gradient`: records ``omega`` every update."""

    record: StepRecord


def add_omega_gradient(
    weight: float | Array = 4.0,
) -> optax.GradientTransformationExtraArgs:
    """Add ``weight * dOmega/dW_rec`` to the gradient (SGD-CR's regularizer).

    Args:
      weight: the regularization weight (Pascanu et al. 2013: 4; released code: 2).

    Needs ``objective=`` (an :class:`optimizers.base.Objective`): its states and state
    gradients come from the runner's backward pass, so Omega costs no extra forward or
    backward pass through the network.
    """

    def init_fn(params):
        del params
        return OmegaState(StepRecord({"omega": jnp.zeros((), jnp.float32)}))

    def update_fn(
        updates, state, params=None, *, objective: Objective | None = None, **_
    ):
        del state
        if objective is None or params is None:
            raise ValueError("add_omega_gradient needs params and objective=")
        value, grads = omega_gradient(
            objective.task,
            params,
            objective.states,
            objective.state_grads,
            objective.batch.inputs,
        )
        updates = jax.tree.map(lambda u, g: u + weight * g, updates, grads)
        return updates, OmegaState(StepRecord({"omega": value.astype(jnp.float32)}))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
