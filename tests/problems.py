"""Small problems with known minimizers, shared by the optimizer tests."""

import jax
import jax.numpy as jnp

from tasks import Batch, Task, squared_error


class LinearRegression(Task):
    """Linear least squares through the task interface (one time step).

    The Gauss-Newton matrix equals the Hessian, and ``numpy.linalg.lstsq`` gives the
    minimizer.
    """

    name = "linear_regression"
    output_loss = squared_error
    batch_size = 40

    def __init__(self, n_in=6, n_out=2, noise=0.1, random_init=False):
        self.n_in, self.n_out, self.noise = n_in, n_out, noise
        self.random_init = random_init
        self.w_true = jax.random.normal(jax.random.PRNGKey(42), (n_in, n_out))

    def init(self, key):
        shape = (self.n_in, self.n_out)
        w = jax.random.normal(key, shape) if self.random_init else jnp.zeros(shape)
        return {"w": w, "c": jnp.zeros(self.n_out)}

    def sample_batch(self, key, batch_size=None):
        size = batch_size or self.batch_size
        k_x, k_e = jax.random.split(key)
        x = jax.random.normal(k_x, (1, size, self.n_in))
        noise = self.noise * jax.random.normal(k_e, (1, size, self.n_out))
        y = x @ self.w_true + 0.5 + noise
        return Batch(x, y, jnp.ones((1, size)), jnp.ones(size, jnp.int32))

    def apply(self, params, inputs, state_offset=None):
        out = inputs @ params["w"] + params["c"]
        return out, out if state_offset is None else out + state_offset


class DiagonalQuadratic(Task):
    """``L(x) = sum_i a_i (x_i - c_i)^2``: Hessian and Gauss-Newton are ``diag(2a)``."""

    name = "diagonal_quadratic"
    output_loss = squared_error
    batch_size = 1

    def __init__(self, a, c):
        self.a, self.c = jnp.asarray(a), jnp.asarray(c)

    def init(self, key):
        return {"x": jnp.zeros_like(self.c)}

    def sample_batch(self, key, batch_size=None):
        targets = (jnp.sqrt(self.a) * self.c)[None, None]
        return Batch(jnp.zeros((1, 1, 0)), targets, jnp.ones((1, 1)), jnp.ones(1, int))

    def apply(self, params, inputs, state_offset=None):
        out = (jnp.sqrt(self.a) * params["x"])[None, None]
        return out, out if state_offset is None else out + state_offset
