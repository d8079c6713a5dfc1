"""Curvature-vector products, shared by the optimizers and the analysis.

For a task with outputs ``f(theta)`` (``[T, B, O]``), hidden states ``x(theta)``
(``[T, B, H]``) and loss ``L = sum_t m_t l(f_t, y_t) / sum_t m_t``:

* Gauss-Newton (Schraudolph 2002; Martens 2010): ``G v = J_f^T H_L J_f v``, with
  ``H_L`` the output-space Hessian of the masked loss (positive semi-definite);
* exact Hessian: ``H v = d/de grad L(theta + e v)``;
* structural damping (Martens & Sutskever 2011): ``S v = J_x^T D J_x v``, the
  Gauss-Newton matrix of a matching loss on the hidden states, with
  ``D = diag(sigma'(x_t))`` for vanilla units (the Hessian of the matching loss of a
  logistic or tanh unit with respect to its input) and ``D = I`` otherwise; averaged
  over sequences and summed over their valid steps.

Each ``*_operator`` function linearizes the network once (``jax.linearize``) and
returns a closure that reuses that linearization for every product, as Hessian-free's
conjugate gradient needs (one forward-mode and one reverse-mode pass per product).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tasks.base import Batch, Task

Array = jax.Array
Operator = Callable[[dict], dict]


def output_hessian_vp(task: Task, outputs: Array, batch: Batch, v: Array) -> Array:
    """``H_L v`` for the masked-mean output loss (per step, block diagonal)."""
    mask = batch.mask.astype(outputs.dtype)
    weight = mask / jnp.maximum(jnp.sum(mask), 1.0)
    return task.output_loss.hessian_vp(outputs, v) * weight[..., None]


def state_curvature(task: Task, states: Array) -> Array:
    """The diagonal ``D`` of the structural-damping matching loss, like ``states``."""
    activation = getattr(task, "activation", None)
    if activation is None or getattr(task, "leak", 0.0) != 0.0:
        return jnp.ones_like(states)
    return jax.vmap(jax.grad(activation))(states.ravel()).reshape(states.shape)


def structural_diagonal(task: Task, states: Array, batch: Batch) -> Array:
    """``D`` weighted by ``1 / n_sequences`` on valid steps and 0 on padding."""
    steps = jnp.arange(states.shape[0])[:, None]
    valid = (steps < batch.lengths[None, :]).astype(states.dtype)
    return state_curvature(task, states) * (valid / states.shape[1])[..., None]


def gauss_newton_operator(
    task: Task, params: dict, batch: Batch, structural: float | Array = 0.0
) -> Operator:
    """``v -> G v + structural * S v``, linearized once at ``params`` on ``batch``.

    Args:
      task: the task (outputs, states, output loss).
      params: the point of linearization.
      batch: the curvature minibatch.
      structural: weight of the structural-damping term ``S`` (HF passes
        ``lambda * mu``); 0 leaves it out at no cost when a Python zero.
    """
    (outputs, states), jvp = jax.linearize(
        lambda p: task.apply(p, batch.inputs), params
    )
    transpose = jax.linear_transpose(jvp, params)
    use_states = not (isinstance(structural, int | float) and structural == 0)
    if use_states:
        d = structural_diagonal(task, states, batch)

    def matvec(v: dict) -> dict:
        jv_out, jv_states = jvp(v)
        ct_out = output_hessian_vp(task, outputs, batch, jv_out)
        ct_states = structural * d * jv_states if use_states else jnp.zeros_like(states)
        (gv,) = transpose((ct_out, ct_states))
        return gv

    return matvec


def hessian_operator(task: Task, params: dict, batch: Batch) -> Operator:
    """``v -> H v``, the exact Hessian of the loss, linearized once at ``params``."""
    _, hvp = jax.linearize(jax.grad(lambda p: task.loss(p, batch)), params)
    return hvp


CURVATURES = {"gauss_newton": gauss_newton_operator, "hessian": hessian_operator}


def curvature_operator(
    kind: str, task: Task, params: dict, batch: Batch, structural=0.0
) -> Operator:
    """The ``kind`` ("gauss_newton" or "hessian") operator, plus structural damping.

    Structural damping is always taken in Gauss-Newton form, also with the Hessian.
    """
    if kind == "gauss_newton":
        return gauss_newton_operator(task, params, batch, structural)
    if kind != "hessian":
        raise ValueError(f"curvature must be one of {sorted(CURVATURES)}, not {kind!r}")
    hvp = hessian_operator(task, params, batch)
    if isinstance(structural, int | float) and structural == 0:
        return hvp
    structure = structural_operator(task, params, batch)
    return lambda v: jax.tree.map(lambda a, b: a + structural * b, hvp(v), structure(v))


def structural_operator(task: Task, params: dict, batch: Batch) -> Operator:
    """``v -> S v = J_x^T D J_x v`` alone (structural damping's curvature)."""
    states, jvp = jax.linearize(lambda p: task.apply(p, batch.inputs)[1], params)
    transpose = jax.linear_transpose(jvp, params)
    d = structural_diagonal(task, states, batch)

    def matvec(v: dict) -> dict:
        (sv,) = transpose(d * jvp(v))
        return sv

    return matvec
