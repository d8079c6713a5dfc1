"""The task interface shared by optimizers, runner and analysis.

A task separates the pieces that second-order methods and curvature probes need:

* ``init(key) -> params``: parameter initialization (a nested dict of arrays);
* ``sample_batch(key) -> Batch``: a pure, jittable sampler, time-major;
* ``apply(params, inputs, state_offset) -> (outputs, states)``: the network, with the
  hidden-state sequence that structural damping and the regularizer Omega use;
* ``output_loss``: an :class:`~tasks.losses.OutputLoss`, convex in the outputs;
* ``metrics(params, batch)`` and ``success(error_rate)``: the paper's success test.

The ``state_offset`` argument of ``apply`` is added to the hidden states ``x_t`` as they
are computed, so that ``d loss / d state_offset = d loss / d x_t``: one backward pass
gives the parameter gradient and the state gradients ``dE/dx_t`` used by Omega
(Pascanu et al. 2013, eq. 9).
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tasks.losses import OutputLoss, masked_mean

Array = jax.Array
Params = dict


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


class Task(abc.ABC):
    """Base class of every task.

    Subclasses set ``name``, ``output_loss``, ``batch_size`` and implement ``init``,
    ``sample_batch`` and ``apply``. Tasks with a recurrent weight matrix also implement
    ``transition`` and ``recurrent_mask`` (used by the regularizer Omega, the non-finite
    "shrink" policy and the spectral-radius records).
    """

    name: str = "task"
    output_loss: OutputLoss
    batch_size: int = 20
    #: Fraction of wrong sequences below which the task counts as solved.
    success_threshold: float = 0.01
    #: Number of fresh sequences in the success test (Pascanu et al. 2013: 10,000).
    success_sequences: int = 10_000

    @abc.abstractmethod
    def init(self, key: Array) -> Params:
        """Initial parameters from a PRNG key."""

    @abc.abstractmethod
    def sample_batch(self, key: Array, batch_size: int | None = None) -> Batch:
        """A fresh minibatch (``batch_size`` defaults to the task's)."""

    @abc.abstractmethod
    def apply(
        self, params: Params, inputs: Array, state_offset: Array | None = None
    ) -> tuple[Array, Array]:
        """Outputs ``[T, B, n_out]`` and hidden states ``[T, B, H]``."""

    # Optional recurrent structure.
    def transition(self, params: Params, state: Array, inputs: Array) -> Array:
        """One step of the recurrence, ``x_{k+1} = F(x_k, u_{k+1})`` (for Omega)."""
        raise NotImplementedError(f"task {self.name!r} has no recurrent transition")

    def recurrent_mask(self, params: Params) -> Params:
        """A pytree of booleans like ``params``, True for recurrent weights."""
        raise NotImplementedError(f"task {self.name!r} has no recurrent weights")

    def recurrent_matrix(self, params: Params) -> Array | None:
        """The recurrent weight matrix (for the spectral radius), or None."""
        return None

    # Derived quantities.
    def loss_from_outputs(self, outputs: Array, batch: Batch) -> Array:
        """Mean output loss over the scored steps of the batch."""
        return masked_mean(self.output_loss.value(outputs, batch.targets), batch.mask)

    def loss(self, params: Params, batch: Batch) -> Array:
        """The training objective on a batch."""
        outputs, _ = self.apply(params, batch.inputs)
        return self.loss_from_outputs(outputs, batch)

    def metrics(self, params: Params, batch: Batch) -> dict[str, Array]:
        """Loss and error rate (a sequence is wrong if any scored step is wrong)."""
        outputs, _ = self.apply(params, batch.inputs)
        wrong = self.output_loss.is_wrong(outputs, batch.targets) & (batch.mask > 0)
        return {
            "loss": self.loss_from_outputs(outputs, batch),
            "error_rate": jnp.mean(jnp.any(wrong, axis=0).astype(jnp.float32)),
        }

    def success(self, error_rate: float) -> bool:
        """The paper's success test on ``success_sequences`` fresh sequences."""
        return bool(error_rate < self.success_threshold)

    def describe(self) -> dict:
        """The task's configuration (for results files)."""
        return {"name": self.name}
