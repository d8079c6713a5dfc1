"""Output losses: convex functions of the network outputs (the Gauss-Newton split).

Every task's objective is ``L(theta) = sum_t m_t l(f_t(theta), y_t) / sum_t m_t``
where ``f_t`` are the network outputs, ``m_t`` the mask and ``l`` one of the losses
below. Each loss is convex in the outputs, so the generalized Gauss-Newton matrix
``G = J^T H_L J`` (Schraudolph 2002; Martens 2010) is positive semi-definite. Each
loss also knows

* ``hessian_vp(outputs, v)``: ``H_L v``, with ``H_L`` the Hessian of ``l`` with
  respect to one step's outputs (closed form);
* ``sample_targets(key, outputs)``: targets drawn from the model's predictive
  distribution ``p(y | f)`` whose negative log-likelihood is ``l`` (up to a
  constant), so that ``E[grad grad^T] = H_L`` (Monte-Carlo Gauss-Newton, Sophia-G);
* ``is_wrong(outputs, targets)``: the per-step error test of Pascanu et al. (2013);
* ``shift_invariant``: whether ``l(f + c 1, y) = l(f, y)`` for every ``c`` (softmax
  cross-entropy), so that ``H_L 1 = 0`` and the Gauss-Newton matrix only needs the
  outputs' components orthogonal to ``1`` (:func:`output_basis`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: A regression step is wrong when its squared error exceeds this (Pascanu et al. 2013).
REGRESSION_TOLERANCE = 0.04


class OutputLoss(NamedTuple):
    """A per-step loss ``l(f, y)`` convex in the outputs ``f``.

    Attributes:
      name: registry name.
      value: ``(outputs [..., O], targets) -> [...]`` per-step loss.
      hessian_vp: ``(outputs [..., O], v [..., O]) -> H_L v`` per step.
      sample_targets: ``(key, outputs [..., O]) -> targets`` from ``p(y | f)``.
      is_wrong: ``(outputs, targets) -> bool [...]`` per-step error test.
      predict: ``outputs -> prediction`` (class index, probability or value).
      shift_invariant: ``l(f + c 1, y) = l(f, y)`` for all ``c`` (default False).
    """

    name: str
    value: Callable[[Array, Array], Array]
    hessian_vp: Callable[[Array, Array], Array]
    sample_targets: Callable[[Array, Array], Array]
    is_wrong: Callable[[Array, Array], Array]
    predict: Callable[[Array], Array]
    shift_invariant: bool = False


def output_basis(loss: OutputLoss, n_out: int) -> np.ndarray:
    """An orthonormal ``[O, r]`` basis that carries ``H_L``: ``H_L = Q Q^T H_L Q Q^T``.

    The identity (``r = O``), or for a shift-invariant loss the Helmert basis of the
    complement of ``1`` (``r = O - 1``; column ``j`` is ``(1, ..., 1, -j, 0, ...) /
    sqrt(j (j + 1))`` with ``j`` ones): ``H_L 1 = 0`` and ``H_L`` is symmetric, so
    its range lies in that complement. Jacobians of the outputs are then needed
    only along these ``r`` directions.
    """
    if not loss.shift_invariant or n_out == 1:
        return np.eye(n_out)
    basis = np.zeros((n_out, n_out - 1))
    for j in range(1, n_out):
        basis[:j, j - 1] = 1.0
        basis[j, j - 1] = -float(j)
        basis[:, j - 1] /= np.sqrt(j * (j + 1.0))
    return basis


def _se_value(outputs: Array, targets: Array) -> Array:
    return jnp.sum((outputs - targets) ** 2, axis=-1)


def _se_sample(key: Array, outputs: Array) -> Array:
    # l = (f - y)^2 is the NLL of N(f, 1/2): its Fisher, 4 Var = 2 I, equals H_L.
    return outputs + jnp.sqrt(0.5) * jax.random.normal(
        key, outputs.shape, outputs.dtype
    )


squared_error = OutputLoss(
    name="squared_error",
    value=_se_value,
    hessian_vp=lambda outputs, v: 2.0 * v,
    sample_targets=_se_sample,
    is_wrong=lambda outputs, targets: (
        _se_value(outputs, targets) > REGRESSION_TOLERANCE
    ),
    predict=lambda outputs: outputs,
)


def _softmax_value(outputs: Array, targets: Array) -> Array:
    logz = jax.nn.logsumexp(outputs, axis=-1)
    picked = jnp.take_along_axis(outputs, targets[..., None].astype(jnp.int32), -1)
    return logz - picked[..., 0]


def _softmax_hvp(outputs: Array, v: Array) -> Array:
    # H_L = diag(p) - p p^T.
    p = jax.nn.softmax(outputs, axis=-1)
    return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)


softmax_cross_entropy = OutputLoss(
    name="softmax_cross_entropy",
    value=_softmax_value,
    hessian_vp=_softmax_hvp,
    sample_targets=lambda key, outputs: jax.random.categorical(key, outputs, axis=-1),
    is_wrong=lambda outputs, targets: jnp.argmax(outputs, axis=-1) != targets,
    predict=lambda outputs: jnp.argmax(outputs, axis=-1),
    shift_invariant=True,
)


def _sigmoid_value(outputs: Array, targets: Array) -> Array:
    # -y log s(f) - (1 - y) log(1 - s(f)), summed over independent output units.
    per_unit = jax.nn.softplus(outputs) - targets * outputs
    return jnp.sum(per_unit, axis=-1)


def _sigmoid_hvp(outputs: Array, v: Array) -> Array:
    p = jax.nn.sigmoid(outputs)
    return p * (1.0 - p) * v


sigmoid_cross_entropy = OutputLoss(
    name="sigmoid_cross_entropy",
    value=_sigmoid_value,
    hessian_vp=_sigmoid_hvp,
    sample_targets=lambda key, outputs: jax.random.bernoulli(
        key, jax.nn.sigmoid(outputs)
    ).astype(outputs.dtype),
    is_wrong=lambda outputs, targets: jnp.any(
        (outputs > 0) != (targets > 0.5), axis=-1
    ),
    predict=jax.nn.sigmoid,
)

#: Registry of output losses by name.
OUTPUT_LOSSES: dict[str, OutputLoss] = {
    loss.name: loss
    for loss in (squared_error, softmax_cross_entropy, sigmoid_cross_entropy)
}


def loss_weights(mask: Array, dtype=None) -> Array:
    """The per-step loss weights ``w = mask / max(sum(mask), 1)``, like ``mask``.

    The one place where the masked mean is normalized: the loss
    (:func:`masked_mean`, :meth:`tasks.base.Task.loss_from_outputs`) and every
    curvature product on it (:mod:`optimizers.curvature`) use these weights, through
    :meth:`tasks.base.Task.loss_weights`. An all-zero mask gives all-zero weights.

    Args:
      mask: ``[T, B]`` (or any shape) non-negative step weights, 0 on padding.
      dtype: compute in this dtype (default: the mask's), e.g. the outputs' dtype so
        that float64 outputs get float64 weights from a float32 mask.
    """
    mask = jnp.asarray(mask)
    if dtype is not None:
        mask = mask.astype(dtype)
    return mask / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mean(per_step: Array, mask: Array) -> Array:
    """``sum_t w_t per_step_t``, :func:`loss_weights` ``w``: the scored-step mean."""
    dtype = jnp.result_type(per_step, mask)
    return jnp.sum(per_step * loss_weights(mask, dtype))
