"""Shared test problems and dense oracles.

Small problems with known minimizers (for the optimizer tests), small tasks covering
every output loss, and the explicit dense Gauss-Newton matrix that the curvature,
diagonal, probe and example tests compare against (float64).
"""

import functools
from functools import partial

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from tasks import Batch, Task, make_task, sigmoid_cross_entropy, squared_error
from tasks.generators import marked_pair
from tasks.sequence import SequenceTask


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


def _xor_sigmoid_task():
    """XOR with a sigmoid cross-entropy output (the third output loss)."""
    return SequenceTask(
        "xor_sigmoid", partial(marked_pair, op="xor"), 2, 1, sigmoid_cross_entropy,
        length=6, min_length=4, padded_length=6, batch_size=3, hidden=4,
        init="basic_tanh", leak=0.0, hparams={},
    )  # fmt: skip


#: Small tasks covering every output loss, sigmoid units and leaky units.
DENSE_TASKS = {
    "squared_error": lambda: make_task("addition", length=10, hidden=4, batch_size=3),
    "softmax": lambda: make_task(
        "temporal_order", length=12, min_length=10, hidden=3, batch_size=2
    ),
    "sigmoid": _xor_sigmoid_task,
    "sigmoid_units": lambda: make_task(
        "addition", length=10, hidden=4, batch_size=2, init="sigmoid"
    ),
    "leaky": lambda: make_task("addition", length=10, hidden=3, batch_size=2, leak=0.4),
}


def dense_setup(name):
    """``(task, params, batch, v, n_params)``: perturbed params, a batch, a vector.

    Built once per task and precision (float32 or float64, as enabled when called), so
    that the tests share the task object and with it the compiled oracles below.
    """
    return _dense_setup(name, jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64)


@functools.cache
def _dense_setup(name, x64):
    task = DENSE_TASKS[name]()
    params = jax.jit(task.init)(jax.random.PRNGKey(0))
    # Larger weights than the init so that nonlinearities and curvature matter.
    flat, unravel = ravel_pytree(params)
    noise = jax.random.normal(jax.random.PRNGKey(1), flat.shape, flat.dtype)
    params = unravel(flat + 0.5 * noise)
    batch = jax.jit(task.sample_batch)(jax.random.PRNGKey(2))
    v = unravel(jax.random.normal(jax.random.PRNGKey(3), flat.shape, flat.dtype))
    return task, params, batch, v, flat.shape[0]


def init_params(task, key):
    """``task.init(key)`` as one compiled program (once per task)."""
    return _compiled_of(task, "init")(key)


def sample(task, key, batch_size=None):
    """``task.sample_batch(key, batch_size)`` as one compiled program per size."""
    return _compiled_of(task, "sample_batch")(key, batch_size)


@functools.cache
def _compiled_of(task, method):
    fn = getattr(task, method)
    return jax.jit(fn) if method == "init" else jax.jit(fn, static_argnums=1)


def dense_hessian(task, params, batch):
    """The explicit Hessian of ``task.loss`` in the flattened parameters (autodiff)."""
    return _dense_hessian_of(task)(params, batch)


@functools.cache
def _dense_hessian_of(task):
    @jax.jit
    def dense(params, batch):
        flat, unravel = ravel_pytree(params)
        return jax.hessian(lambda f: task.loss(unravel(f), batch))(flat)

    return dense


def jacobian(fn, flat):
    """``d fn / d flat`` by forward mode, compiled (run op by op it is slow)."""
    return jax.jit(jax.jacfwd(fn))(flat)


def apply_operator(make_operator, task, params, batch, v, **kwargs):
    """``make_operator(task, params, batch, **kwargs)(v)`` as one compiled program.

    The code under test builds a linearization; eagerly, every operation in it would
    compile on its own. Compiled once per operator, task and keyword arguments.
    """
    compiled = _operator_of(make_operator, task, tuple(sorted(kwargs.items())))
    return compiled(params, batch, v)


@functools.cache
def _operator_of(make_operator, task, kwargs):
    return jax.jit(lambda p, b, v: make_operator(task, p, b, **dict(kwargs))(v))


def dense_gauss_newton(task, params, batch):
    """The explicit ``J^T H_L J`` (Jacobian by forward mode, ``H_L`` by jax.hessian).

    Compiled once per task (run op by op, its many small operations would each
    compile on their own).
    """
    return _dense_gauss_newton_of(task)(params, batch)


@functools.cache
def _dense_gauss_newton_of(task):
    @jax.jit
    def dense(params, batch):
        flat, unravel = ravel_pytree(params)
        outputs_of = lambda f: task.apply(unravel(f), batch.inputs)[0].ravel()  # noqa: E731
        jac = jax.jacfwd(outputs_of)(flat)
        outputs = task.apply(params, batch.inputs)[0]
        loss_of = lambda o: task.loss_from_outputs(o.reshape(outputs.shape), batch)  # noqa: E731
        h_out = jax.hessian(loss_of)(outputs.ravel())
        return jac.T @ h_out @ jac

    return dense


class UserTanhRNN(Task):
    """A user-written tanh RNN (not a SequenceTask); states are pre-activations."""

    name = "user_tanh"
    output_loss = squared_error
    batch_size = 3
    n_steps, n_in, n_hidden = 4, 2, 3

    def init(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "W_in": 0.8 * jax.random.normal(k1, (self.n_in, self.n_hidden)),
            "W_rec": 0.8 * jax.random.normal(k2, (self.n_hidden, self.n_hidden)),
            "W_out": 0.8 * jax.random.normal(k3, (self.n_hidden, 1)),
        }

    def sample_batch(self, key, batch_size=None):
        size = batch_size or self.batch_size
        k_u, k_y = jax.random.split(key)
        lengths = jnp.array([4, 2, 3][:size] + [4] * max(size - 3, 0), jnp.int32)
        valid = jnp.arange(self.n_steps)[:, None] < lengths[None, :]
        inputs = (
            jax.random.normal(k_u, (self.n_steps, size, self.n_in)) * valid[..., None]
        )
        targets = jax.random.normal(k_y, (self.n_steps, size, 1))
        return Batch(inputs, targets, valid.astype(inputs.dtype), lengths)

    def apply(self, params, inputs, state_offset=None):
        if state_offset is None:
            state_offset = jnp.zeros((*inputs.shape[:2], self.n_hidden), inputs.dtype)

        def step(h, xs):
            u, off = xs
            x = h @ params["W_rec"] + u @ params["W_in"] + off
            return jnp.tanh(x), x

        h0 = jnp.zeros((inputs.shape[1], self.n_hidden), inputs.dtype)
        _, states = jax.lax.scan(step, h0, (inputs, state_offset))
        return jnp.tanh(states) @ params["W_out"], states


class UserTanhRNNWithCurvature(UserTanhRNN):
    def state_curvature(self, states):
        return 1.0 - jnp.tanh(states) ** 2


class PerSequenceMean(UserTanhRNNWithCurvature):
    """Overrides the loss weights: each sequence's scored steps average to 1 / B."""

    def loss_weights(self, batch, dtype=None):
        mask = batch.mask if dtype is None else batch.mask.astype(dtype)
        per_seq = jnp.maximum(jnp.sum(mask, axis=0, keepdims=True), 1.0)
        return mask / (per_seq * mask.shape[1])


#: Six chorales of music21's corpus: a corpus small enough to parse in a test
#: (about two seconds) that still splits 4 / 1 / 1.
SMALL_CHORALES = ("bwv1.6", "bwv10.7", "bwv269", "bwv347", "bwv11.6", "bwv110.7")


def small_chorale_files():
    """The corpus files of :data:`SMALL_CHORALES`, in the order of
    :func:`tasks.chorales.chorale_files` (by name)."""
    from tasks import chorales

    wanted = set(SMALL_CHORALES)
    return [p for p in chorales.chorale_files() if chorales.piece_name(p) in wanted]


def use_small_chorales(monkeypatch) -> None:
    """Make the ``chorales`` task read :data:`SMALL_CHORALES` instead of the whole
    corpus (which takes one to two minutes to parse on a fresh machine)."""
    from tasks import chorales

    files = small_chorale_files()
    monkeypatch.setattr(chorales, "chorale_files", lambda: files)


def make_small_chorales(monkeypatch, **hparams) -> Task:
    """``make_task("chorales", **hparams)`` through the real factory and dataset
    cache, on :data:`SMALL_CHORALES` (:func:`use_small_chorales`)."""
    use_small_chorales(monkeypatch)
    return make_task("chorales", **hparams)
