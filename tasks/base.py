"""The task interface shared by optimizers, runner and analysis.

A task separates the pieces that second-order methods and curvature probes need.

Required (abstract, or set by the subclass):

* ``name``, ``output_loss`` (an :class:`~tasks.losses.OutputLoss`, convex in the
  outputs) and ``batch_size``;
* ``init(key) -> params``: parameter initialization (a pytree of arrays);
* ``sample_batch(key, batch_size=None) -> Batch``: a pure, jittable sampler,
  time-major;
* ``apply(params, inputs, state_offset=None) -> (outputs, states)``: the network,
  with the hidden-state sequence that structural damping and the regularizer Omega
  use.

Declared with a default (override when the default does not fit):

* ``n_out``: number of output units (inferred from the shape of ``apply``'s outputs);
* ``loss_weights(batch)``: per-step weights of the loss, ``mask / max(sum(mask), 1)``;
* ``loss_from_outputs``, ``loss``, ``metrics``, ``success`` and ``describe``;
* ``score_steps(batch)``: the only time steps the loss can score (None: every step),
  and ``apply_scored``: the outputs at those steps only. The loss, its gradient and
  every curvature product read the outputs through ``apply_scored``, so a task that
  scores one step out of ``T`` (the pathological problems score the last) skips the
  output layer and the output loss everywhere else.

Optional (the default raises ``NotImplementedError`` or returns None; only the
features that need them fail):

* ``state_curvature(states)``: the diagonal ``D`` of structural damping;
* ``transition``, ``recurrent_mask``, ``recurrent_matrix``: the recurrent structure.

The ``state_offset`` argument of ``apply`` is added to the hidden states ``x_t`` as they
are computed, so that ``d loss / d state_offset = d loss / d x_t``: one backward pass
gives the parameter gradient and the state gradients ``dE/dx_t`` used by Omega
(Pascanu et al. 2013, eq. 9).

``docs/tasks.md`` describes the contract with an example.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tasks.losses import OutputLoss, loss_weights

Array = jax.Array
Params = dict


#: The held-out splits of :meth:`Task.evaluation_batch`.
EVAL_SPLITS = ("validation", "test")


class Batch(NamedTuple):
    """A time-major minibatch.

    Attributes:
      inputs: ``[T, B, n_in]``; zero beyond a sequence's length.
      targets: ``[T, B, n_out]`` for regression, ``[T, B]`` class indices otherwise.
      mask: ``[T, B]``; 1 where the step is scored, 0 elsewhere (padding included).
      lengths: ``[B]`` actual sequence lengths (padding and masking make variable
        lengths one compiled program).
    """

    inputs: Array
    targets: Array
    mask: Array
    lengths: Array


def map_sequences(fn: Callable[[Batch], Any], batch: Batch) -> Any:
    """``vmap`` of ``fn(single)`` over the sequences of ``batch``, each a batch of one.

    ``single`` is a :class:`Batch` of batch size 1 (``inputs [T, 1, n_in]``, ...); the
    results get a leading sequence axis. Per-sequence gradients and Jacobians use
    it, which is valid when :attr:`Task.independent_sequences` holds.
    """

    def one(inputs, targets, mask, length):
        return fn(Batch(inputs[:, None], targets[:, None], mask[:, None], length[None]))

    return jax.vmap(one, in_axes=(1, 1, 1, 0))(*batch)


def take_steps(values: Array, index: Array) -> Array:
    """``values[index[k, b], b, ...]``: ``[K, B, ...]`` from time-major ``values``."""
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=0)


class Task(abc.ABC):
    """Base class of every task.

    Subclasses set ``name``, ``output_loss`` and ``batch_size`` and implement ``init``,
    ``sample_batch`` and ``apply``. What else optimizers and analysis read from a
    task is declared below, with its user:

    * ``n_out`` (probes: the size ``k`` of the top eigenspace; the exact Gauss-Newton
      diagonal's cost);
    * ``loss_weights`` (the loss and every curvature product on it);
    * ``state_curvature`` (structural damping of Hessian-free);
    * ``transition`` (the regularizer Omega), ``recurrent_mask`` (Omega, the
      non-finite "shrink" policy, the growth experiment's rescaling) and
      ``recurrent_matrix`` (spectral-radius records and probes).
    """

    name: str = "task"
    output_loss: OutputLoss
    batch_size: int = 20
    #: Fraction of wrong sequences below which the task counts as solved; None: the
    #: task has no success test (natural data): its runs end by their budget or by
    #: early stopping, and tables report validation and test losses instead.
    success_threshold: float | None = 0.01
    #: Number of fresh sequences in the success test (Pascanu et al. 2013: 10,000).
    success_sequences: int = 10_000
    #: Whether each sequence's outputs depend on its own inputs only (no statistics
    #: across the batch, as in every recurrent network here), and column ``b`` of
    #: :meth:`score_steps` on sequence ``b`` only. Per-sequence Jacobians rely on it:
    #: Hessian-free's Jacobian form of the Gauss-Newton product (``product = "auto"``
    #: / ``"jacobian"``) and its preconditioner. Set False for a model that mixes
    #: sequences; ``"auto"`` then keeps the linearized product.
    independent_sequences: bool = True

    @abc.abstractmethod
    def init(self, key: Array) -> Params:
        """Initial parameters from a PRNG key."""

    @abc.abstractmethod
    def sample_batch(self, key: Array, batch_size: int | None = None) -> Batch:
        """A fresh minibatch (``batch_size`` defaults to the task's).

        Must be a pure function of ``key`` (jittable, vmappable): the runner draws
        gradient, curvature and evaluation batches from keys, and the same key must
        give the same batch.
        """

    @abc.abstractmethod
    def apply(
        self, params: Params, inputs: Array, state_offset: Array | None = None
    ) -> tuple[Array, Array]:
        """Outputs ``[T, B, n_out]`` and hidden states ``[T, B, H]``.

        ``state_offset`` (like the states, or None for zeros) is added to each
        state ``x_t`` as it is computed, before it drives later steps.
        """

    # Output size.
    @functools.cached_property
    def n_out(self) -> int:
        """Number of output units (classes of a softmax task).

        Declare it as a class or instance attribute (``self.n_out = 3``) or a
        property. This default infers it once from the last axis of ``apply``'s
        outputs on a batch of ``sample_batch`` (shapes only, nothing is computed) and
        raises ``NotImplementedError`` if that fails.
        """
        key = jax.random.PRNGKey(0)
        try:
            params = jax.eval_shape(self.init, key)
            batch = jax.eval_shape(self.sample_batch, key)
            outputs, _ = jax.eval_shape(self.apply, params, batch.inputs)
        except Exception as err:
            raise NotImplementedError(
                f"task {self.name!r} does not declare n_out and it could not be "
                "inferred from the shapes of init, sample_batch and apply; set "
                "n_out (the number of output units) on the task"
            ) from err
        return int(outputs.shape[-1])

    # Loss weights.
    def loss_weights(self, batch: Batch, dtype=None) -> Array:
        """Per-step weights ``w [T, B]`` of the loss ``sum_t w_t l(f_t, y_t)``.

        The default is the masked mean ``mask / max(sum(mask), 1)`` (all zeros for an
        all-zero mask). The loss and every curvature product (Gauss-Newton, sampled
        and exact Gauss-Newton diagonals, Levenberg-Marquardt residuals) use these
        weights, so an override changes all of them consistently.

        Args:
          batch: the minibatch (its ``mask``).
          dtype: compute in this dtype (default: the mask's).
        """
        return loss_weights(batch.mask, dtype)

    # Structural damping.
    def state_curvature(self, states: Array) -> Array:
        """The diagonal ``D`` of structural damping's matching loss, like ``states``.

        Structural damping (Martens & Sutskever 2011) adds ``lambda mu J_x^T D J_x``
        to the curvature, with ``J_x`` the Jacobian of the hidden states ``x_t``
        (what ``apply`` returns) and ``D`` the Hessian of a loss that matches the
        units' nonlinearity, taken with respect to ``x_t``: ``sigma'(x_t)`` when
        ``x_t`` is the pre-activation of a logistic or tanh unit, 1 for linear
        units. Only Hessian-free with ``structural=`` (and
        :func:`optimizers.curvature.structural_operator`) calls it.
        """
        raise NotImplementedError(
            f"task {self.name!r} does not implement state_curvature(states), which "
            "structural damping needs: return the diagonal D of the matching loss' "
            "Hessian with respect to the hidden states, an array like states (for "
            "example 1 - tanh(states) ** 2 when the states are pre-activations of tanh "
            "units, jnp.ones_like(states) for linear units), or run without "
            "structural damping"
        )

    # Optional recurrent structure.
    def transition(self, params: Params, state: Array, inputs: Array) -> Array:
        """One step of the recurrence, ``x_{k+1} = F(x_k, u_{k+1})``.

        ``state`` ``[..., H]`` and ``inputs`` ``[..., n_in]`` share their leading
        axes (Omega calls it on all steps at once). Used by the regularizer Omega
        (Pascanu et al. 2013, eq. 9).
        """
        raise NotImplementedError(f"task {self.name!r} has no recurrent transition")

    def recurrent_mask(self, params: Params) -> Params:
        """A pytree of Python booleans like ``params``, True for recurrent weights.

        Used by Omega (its gradient moves only these), the non-finite "shrink"
        policy and the growth experiment's spectral-radius rescaling.
        """
        raise NotImplementedError(f"task {self.name!r} has no recurrent weights")

    def recurrent_matrix(self, params: Params) -> Array | None:
        """The square recurrent weight matrix, or None (no spectral radius).

        Used for the spectral-radius records of the runner, the probes and the
        growth experiment.
        """
        return None

    # Where the loss is scored.
    def score_steps(self, batch: Batch) -> Array | None:
        """Time indices ``[K, B]`` of the steps the loss can score, or None (all ``T``).

        Declare it when the mask is zero everywhere but at ``K < T`` known steps per
        sequence (the last step of each sequence: ``(batch.lengths - 1)[None]``). The
        indices must cover every step where ``batch.mask`` is nonzero; the loss,
        gradients and curvature are then unchanged, only cheaper. The default, None,
        scores all steps.
        """
        del batch
        return None

    def scored_batch(self, batch: Batch) -> Batch:
        """``batch`` with ``targets`` and ``mask`` taken at :meth:`score_steps`.

        ``inputs`` and ``lengths`` are kept whole (they drive the network and the
        structural-damping mask); :meth:`loss_weights` is called on this batch. The
        identity when :meth:`score_steps` is None.
        """
        index = self.score_steps(batch)
        if index is None:
            return batch
        return batch._replace(
            targets=take_steps(batch.targets, index), mask=take_steps(batch.mask, index)
        )

    def apply_scored(
        self, params: Params, batch: Batch, state_offset: Array | None = None
    ) -> tuple[Array, Array]:
        """Outputs ``[K, B, n_out]`` at :meth:`score_steps` and states ``[T, B, H]``.

        What the loss and the curvature products use. The default takes the outputs
        of :meth:`apply` at those steps; a task can override it to compute the
        output layer only there (:class:`tasks.sequence.SequenceTask` does).
        """
        outputs, states = self.apply(params, batch.inputs, state_offset)
        index = self.score_steps(batch)
        return (outputs if index is None else take_steps(outputs, index)), states

    # Derived quantities.
    def loss_from_outputs(self, outputs: Array, batch: Batch) -> Array:
        """``sum_t w_t l(f_t, y_t)`` with the :meth:`loss_weights` ``w``.

        ``outputs`` and ``batch`` must match: all steps (:meth:`apply`, the batch) or
        the scored ones (:meth:`apply_scored`, :meth:`scored_batch`).
        """
        per_step = self.output_loss.value(outputs, batch.targets)
        dtype = jnp.result_type(per_step, batch.mask)
        return jnp.sum(per_step * self.loss_weights(batch, dtype))

    def loss(self, params: Params, batch: Batch) -> Array:
        """The training objective on a batch."""
        outputs, _ = self.apply_scored(params, batch)
        return self.loss_from_outputs(outputs, self.scored_batch(batch))

    def metrics(self, params: Params, batch: Batch) -> dict[str, Array]:
        """Loss and error rate (a sequence is wrong if any scored step is wrong)."""
        outputs, _ = self.apply_scored(params, batch)
        scored = self.scored_batch(batch)
        wrong = self.output_loss.is_wrong(outputs, scored.targets) & (scored.mask > 0)
        return {
            "loss": self.loss_from_outputs(outputs, scored),
            "error_rate": jnp.mean(jnp.any(wrong, axis=0).astype(jnp.float32)),
        }

    def success(self, error_rate: float) -> bool:
        """The paper's success test on ``success_sequences`` fresh sequences."""
        if self.success_threshold is None:
            return False
        return bool(error_rate < self.success_threshold)

    @property
    def has_success_test(self) -> bool:
        """Whether runs on this task can be solved (``success_threshold`` is set)."""
        return self.success_threshold is not None

    # Held-out data.
    def evaluation_batch(self, split: str) -> Batch | None:
        """The whole held-out ``split`` as one fixed batch, or None (the default).

        A task with a fixed dataset returns its ``"validation"`` and ``"test"``
        splits here (:data:`EVAL_SPLITS`); the runner then evaluates on the whole
        validation split (``eval_*`` records) and the whole test split (``test_*``
        records) instead of on fresh samples. Synthetic tasks return None and are
        evaluated on fresh batches of :meth:`sample_batch`. Must be a pure function
        of ``split`` (it is called while tracing the training program).
        """
        del split
        return None

    def describe(self) -> dict:
        """``{"name": ..., **hyperparameters}``: the validated hyperparameters.

        Results files and run identifiers use it; a task with hyperparameters should
        return all of them (the values its factory was called with).
        """
        return {"name": self.name}
