"""What every optimizer shares: the objective it is handed, step records, work counts.

The runner calls every optimizer the same way (no name checks in the loop)::

    updates, state = opt.update(
        grads, state, params, objective=objective, key=key, step=step
    )

First-order transforms ignore the extra arguments; second-order ones evaluate the
objective or take curvature products on ``objective.curvature_batch`` (or on
``objective.curvature_batch_at(key)``, a curvature batch drawn from a key they keep:
optimizers never sample data from the task themselves). ``key`` is a
fresh per-seed PRNG key; ``step`` is the global update index, the same for every seed
and *not* vmapped, so a gate such as "re-estimate every k steps" can use
``lax.cond`` on it and really skip work when seeds are vmapped.

Optimizer states may contain two marker types that the runner collects wherever they sit
in the state tree:

* :class:`StepRecord`: named scalars describing the latest update (pre-clip norm,
  whether clipping fired, a non-finite event, ...), recorded every step;
* :class:`WorkCount`: cumulative extra work (gradient evaluations, curvature-vector
  products, function evaluations) beyond the one gradient the runner computes per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tasks.base import Batch, Task

Array = jax.Array


class Objective(NamedTuple):
    """The objective at the current step, passed to ``update`` as ``objective=``.

    Attributes:
      task: the task (model, output loss, recurrent structure).
      batch: the gradient minibatch of this step.
      curvature_batch: a fresh minibatch for curvature products (per-step
        re-estimation, Martens 2010).
      loss: the loss on ``batch`` at the current parameters.
      grads: its gradient (what the runner passes as ``updates``).
      states: hidden states ``x_t`` on ``batch``, ``[T, B, H]``.
      state_grads: ``dE/dx_t`` on ``batch``, ``[T, B, H]``.
      sample_curvature: ``key -> Batch``, the runner's curvature sampler (the
        task's sampler at the configured curvature batch size; ``curvature_batch``
        is one of its draws). Optional; :meth:`curvature_batch_at` needs it.
    """

    task: Task
    batch: Batch
    curvature_batch: Batch
    loss: Array
    grads: Any
    states: Array
    state_grads: Array
    sample_curvature: Callable[[Array], Batch] | None = None

    def curvature_batch_at(self, key: Array) -> Batch:
        """The curvature minibatch drawn from ``key`` (same key, same batch).

        For optimizers that keep a curvature batch over several updates (Hessian-free
        with ``reuse_curvature > 1``): they keep the key, not the batch.

        Raises:
          ValueError: the objective was built without ``sample_curvature``.
        """
        if self.sample_curvature is None:
            raise ValueError(
                "this Objective has no curvature sampler: build it with "
                "Objective(..., sample_curvature=lambda key: task.sample_batch(key, "
                "curvature_batch_size)) (the runner does) to draw curvature batches "
                "from kept keys"
            )
        return self.sample_curvature(key)

    def value(self, params, batch: Batch | None = None) -> Array:
        """The loss at ``params`` on ``batch`` (default: this step's batch)."""
        return self.task.loss(params, self.batch if batch is None else batch)

    def value_and_grad(self, params, batch: Batch | None = None):
        """Loss and gradient at ``params`` on ``batch`` (default: this step's batch)."""
        return jax.value_and_grad(self.value)(params, batch)


def loss_grads_and_states(task: Task, params, batch: Batch):
    """One forward and backward pass: loss, parameter grads, states and ``dE/dx_t``.

    The zero ``state_offset`` added to every state makes its gradient equal ``dE/dx_t``
    (Pascanu et al. 2013, the ``dE/dx_{k+1}`` of the regularizer Omega).
    """
    _, states0 = jax.eval_shape(task.apply_scored, params, batch)
    offset = jnp.zeros(states0.shape, states0.dtype)
    scored = task.scored_batch(batch)

    def objective(p, off):
        outputs, states = task.apply_scored(p, batch, off)
        return task.loss_from_outputs(outputs, scored), states

    (loss, states), (grads, state_grads) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True
    )(params, offset)
    return loss, grads, states, state_grads


class StepRecord(NamedTuple):
    """Named scalars about the latest update, collected by the runner every step."""

    values: dict[str, Array]


class WorkCount(NamedTuple):
    """Cumulative extra work done inside ``update`` (beyond the runner's gradient)."""

    grad_evals: Array
    fun_evals: Array
    curvature_products: Array

    @classmethod
    def zeros(cls) -> WorkCount:
        z = jnp.zeros((), jnp.int32)
        return cls(z, z, z)


#: Cost of one loss evaluation (a forward pass), in gradients on the same batch.
FUN_EVAL_COST = 0.5
#: Cost of one curvature-vector product (one forward-mode and one reverse-mode pass,
#: Pearlmutter 1994; Schraudolph 2002), in gradients on the same batch.
CURVATURE_PRODUCT_COST = 1.0


def gradient_equivalents(
    grad_evals, fun_evals, curvature_products, batch_size, curvature_batch_size
):
    """Work in gradients on the gradient batch.

    ``grad_evals + FUN_EVAL_COST * fun_evals + CURVATURE_PRODUCT_COST *
    curvature_products * curvature_batch_size / batch_size``. The weights are nominal;
    ``benchmarks/`` measures the real ratios.
    """
    ratio = curvature_batch_size / batch_size
    return (
        grad_evals
        + FUN_EVAL_COST * fun_evals
        + CURVATURE_PRODUCT_COST * curvature_products * ratio
    )


def _find(state: Any, kind: type) -> list:
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, kind))
    return [leaf for leaf in leaves if isinstance(leaf, kind)]


def collect_records(state: Any) -> dict[str, Array]:
    """Merge every :class:`StepRecord` in an optimizer state into one dict."""
    out: dict[str, Array] = {}
    for record in _find(state, StepRecord):
        out.update(record.values)
    return out


def collect_work(state: Any) -> WorkCount:
    """Sum every :class:`WorkCount` in an optimizer state."""
    total = WorkCount.zeros()
    for work in _find(state, WorkCount):
        total = WorkCount(*(a + b for a, b in zip(total, work, strict=True)))
    return total
