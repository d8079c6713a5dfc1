"""The single-unit model with an exploding-gradient wall (Pascanu et al. 2013, Fig. 6).

``x_t = w sigma(x_{t-1}) + b`` with ``sigma`` the logistic function, ``x_0 = 0.5``, no
input, ``n_steps = 50``; error ``E = (sigma(x_50) - 0.7)^2``. Parameters ``(w, b)``.

For ``w`` above about 4.25 the fixed point at ``x_0`` becomes unstable and ``E`` jumps
by
0.33-0.41 across the line ``b = x_0 - w sigma(x_0)`` (about ``b = 0.5 - 0.6225 w``): the
wall. The network output is ``sigma(x_50)`` and the output loss is squared error against
0.7, so the Gauss-Newton split is the same as for the RNN tasks.
"""

from __future__ import annotations

from typing import Annotated

import jax
import jax.numpy as jnp

from tasks.base import Batch, Task
from tasks.hparams import NONNEGATIVE, Range
from tasks.losses import squared_error

Array = jax.Array

X0 = 0.5
TARGET = 0.7


def wall_states(w: Array, b: Array, n_steps: int, x0: float = X0) -> Array:
    """The trajectory ``x_1..x_n`` of the single-unit recurrence."""

    def step(x, _):
        x = w * jax.nn.sigmoid(x) + b
        return x, x

    _, xs = jax.lax.scan(step, jnp.asarray(x0, jnp.result_type(w, b)), None, n_steps)
    return xs


def wall_error(w: Array, b: Array, n_steps: int = 50) -> Array:
    """``E(w, b) = (sigma(x_n) - 0.7)^2``, vectorized over ``w`` and ``b``."""
    fn = jnp.vectorize(lambda w_, b_: wall_states(w_, b_, n_steps)[-1])
    return (jax.nn.sigmoid(fn(w, b)) - TARGET) ** 2


class WallTask(Task):
    """Single-unit wall model as a task: parameters ``{"w": [1, 1], "b": [1]}``.

    The batch is trivial (one sequence, no inputs, target 0.7 at the last step); the
    task counts as solved when ``E`` falls below ``tolerance``. Structural damping
    uses ``D = I`` on the state ``x_t``.
    """

    name = "wall"
    output_loss = squared_error
    batch_size = 1
    success_sequences = 1
    n_out = 1

    def __init__(self, n_steps, w0, b0, init_noise, tolerance):
        self.n_steps, self.w0, self.b0 = n_steps, w0, b0
        self.init_noise, self.tolerance = init_noise, tolerance
        self.hparams = {
            "n_steps": n_steps, "w0": w0, "b0": b0,
            "init_noise": init_noise, "tolerance": tolerance,
        }  # fmt: skip

    def init(self, key):
        noise = self.init_noise * jax.random.normal(key, (2,))
        return {
            "w": jnp.full((1, 1), self.w0) + noise[0],
            "b": jnp.full((1,), self.b0) + noise[1],
        }

    def sample_batch(self, key, batch_size=None):
        size = 1 if batch_size is None else batch_size
        t = jnp.arange(self.n_steps)[:, None]
        return Batch(
            inputs=jnp.zeros((self.n_steps, size, 0)),
            targets=jnp.full((self.n_steps, size, 1), TARGET),
            mask=jnp.broadcast_to(t == self.n_steps - 1, (self.n_steps, size)).astype(
                jnp.float32
            ),
            lengths=jnp.full((size,), self.n_steps, jnp.int32),
        )

    def transition(self, params, state, inputs):
        return jax.nn.sigmoid(state) @ params["w"] + params["b"]

    def apply(self, params, inputs, state_offset=None):
        n_steps, size = inputs.shape[:2]
        if state_offset is None:
            state_offset = jnp.zeros((n_steps, size, 1))

        def step(x, offset):
            x = self.transition(params, x, None) + offset
            return x, x

        x0 = jnp.full((size, 1), X0, params["w"].dtype)
        _, states = jax.lax.scan(step, x0, state_offset)
        return jax.nn.sigmoid(states), states

    def state_curvature(self, states):
        # D = I: structural damping treats the single unit's state as linear.
        return jnp.ones_like(states)

    def recurrent_mask(self, params):
        return {"w": True, "b": False}

    def recurrent_matrix(self, params):
        return params["w"]

    def metrics(self, params, batch):
        loss = self.loss(params, batch)
        return {
            "loss": loss,
            "error_rate": (loss >= self.tolerance).astype(jnp.float32),
        }

    def describe(self):
        return {"name": self.name, **self.hparams}


def wall(
    n_steps: Annotated[int, Range(1, None)] = 50,
    w0: float = 6.0,
    b0: float = -3.0,
    init_noise: Annotated[float, NONNEGATIVE] = 0.0,
    tolerance: Annotated[float, Range(0, None, low_open=True)] = 1e-4,
) -> WallTask:
    """The single-unit wall model, started at ``(w0, b0)`` (plus Gaussian noise)."""
    return WallTask(n_steps, w0, b0, init_noise, tolerance)
