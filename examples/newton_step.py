"""A small second-order plug-in: gradient descent with the Newton step length.

The step goes along the negative gradient and its length is the minimizer of the local
quadratic model along that direction. With ``g`` the gradient on the minibatch,
``u = g / ||g||`` and ``G`` the Gauss-Newton matrix ``J^T H_L J`` measured on the
curvature minibatch, the model along ``-u`` is

    f(theta - t u) ~= f(theta) - t ||g|| + 1/2 t^2 c,    c = u^T G u >= 0,

minimized at ``t* = ||g|| / c``. This is the Newton step along a single direction
``v``, ``|g . v| / (v^T H v)``, that Pascanu, Mikolov & Bengio (2013) discuss for the
exploding direction: if the curvature along the direction in which the gradient
explodes grows as fast as the gradient, the ratio stays bounded and a second-order
step is automatically short where the gradient is large (the "wall" of their Fig. 6),
where plain SGD jumps far away. The update is

    theta <- theta - min(alpha ||g|| / (c + damping), max_step) u,

with ``damping > 0`` keeping the denominator positive (``G`` is only positive
semi-definite) and ``max_step`` a trust bound on the step length, the analogue of
``learning_rate * threshold`` of clipped SGD. Each update costs one Gauss-Newton
vector product ``G u`` (one forward- and one reverse-mode pass on the curvature
batch; Schraudolph 2002) from :func:`optimizers.curvature.gauss_newton_operator`,
counted in the state's :class:`~optimizers.base.WorkCount`. The state's
:class:`~optimizers.base.StepRecord` holds ``curvature`` (``c``), ``newton_step``
(the length taken) and ``newton_capped`` (whether ``max_step`` bound it). The runner
traces them every step and records their means over each evaluation chunk as
``curvature_mean``, ``newton_step_mean`` and ``newton_capped_rate``. Uncapped,
``newton_step / ||g|| = alpha / (c + damping)``: the records track how the curvature
grows against the gradient.

A zero gradient gives a zero step; a non-finite gradient or curvature gives a zero
step too (the runner marks the seed diverged if its loss becomes non-finite).
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from optimizers.base import Objective, StepRecord, WorkCount
from optimizers.curvature import gauss_newton_operator
from tasks import Range

Array = jax.Array
Positive = Annotated[float, Range(0, None, low_open=True)]


class NewtonStepState(NamedTuple):
    """State of :func:`newton_step`: work done and the latest update's record."""

    work: WorkCount  # curvature_products: one per update
    record: StepRecord  # curvature, newton_step, newton_capped


def _record(curvature: Array, length: Array, capped: Array) -> StepRecord:
    return StepRecord(
        {"curvature": curvature, "newton_step": length, "newton_capped": capped}
    )


def newton_step(
    alpha: Positive = 1.0,
    damping: Positive = 1e-3,
    max_step: Positive = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Steepest descent with the Newton step length along the gradient.

    ``step = -min(alpha ||g|| / (u^T G u + damping), max_step) u`` with
    ``u = g / ||g||`` and ``G`` the Gauss-Newton matrix on
    ``objective.curvature_batch`` (Pascanu et al. 2013: the Newton step along a
    direction ``v`` is ``|g . v| / (v^T H v)``).

    Args:
      alpha: factor on the Newton step length (1: the exact minimizer of the
        quadratic model along ``-u``).
      damping: added to the curvature ``c``, bounding the step by
        ``alpha ||g|| / damping`` where the curvature vanishes.
      max_step: largest step length (Euclidean norm over all parameters).

    Returns:
      A transformation needing ``params`` and ``objective=`` (the runner passes
      both); its state records ``curvature``, ``newton_step`` and ``newton_capped``
      and counts one curvature-vector product per update.
    """

    def init_fn(params) -> NewtonStepState:
        dtype = jnp.result_type(*jax.tree.leaves(params))
        zero = jnp.zeros((), dtype)
        return NewtonStepState(WorkCount.zeros(), _record(zero, zero, jnp.bool_(False)))

    def update_fn(
        grads,
        state: NewtonStepState,
        params=None,
        *,
        objective: Objective | None = None,
        **extra,
    ) -> tuple[dict, NewtonStepState]:
        del extra  # key=, step=: unused here
        if objective is None or params is None:
            raise ValueError("newton_step needs params and objective= (the runner)")
        dtype = state.record.values["curvature"].dtype
        norm = otu.tree_norm(grads)
        u = otu.tree_scale(1.0 / jnp.where(norm > 0, norm, 1.0), grads)
        gv = gauss_newton_operator(objective.task, params, objective.curvature_batch)
        curvature = otu.tree_vdot(u, gv(u))
        newton = alpha * norm / (curvature + damping)
        length = jnp.minimum(newton, max_step)
        finite = jnp.isfinite(length)
        length = jnp.where(finite, length, 0.0).astype(dtype)
        updates = jax.tree.map(
            lambda d: jnp.where(finite, -length * d, 0.0).astype(d.dtype), u
        )
        work = state.work._replace(curvature_products=state.work.curvature_products + 1)
        record = _record(curvature.astype(dtype), length, newton > max_step)
        return updates, NewtonStepState(work, record)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
