"""Curvature-vector products against explicit dense matrices, in float64."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from optimizers.curvature import (
    curvature_operator,
    gauss_newton_operator,
    hessian_operator,
    structural_operator,
)
from tasks import make_task, sigmoid_cross_entropy
from tasks.generators import marked_pair
from tasks.sequence import SequenceTask


def _xor_sigmoid_task():
    # XOR with a sigmoid cross-entropy output: covers the third output loss.
    return SequenceTask(
        "xor_sigmoid", partial(marked_pair, op="xor"), 2, 1, sigmoid_cross_entropy,
        length=6, min_length=4, padded_length=6, batch_size=3, hidden=4,
        init="basic_tanh", leak=0.0, hparams={},
    )  # fmt: skip


TASKS = {
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


def _setup(name):
    task = TASKS[name]()
    params = task.init(jax.random.PRNGKey(0))
    # Larger weights than the init so that nonlinearities and curvature matter.
    flat, unravel = ravel_pytree(params)
    noise = jax.random.normal(jax.random.PRNGKey(1), flat.shape, flat.dtype)
    params = unravel(flat + 0.5 * noise)
    batch = task.sample_batch(jax.random.PRNGKey(2))
    v = unravel(jax.random.normal(jax.random.PRNGKey(3), flat.shape, flat.dtype))
    return task, params, batch, v, flat.shape[0]


def _dense_gauss_newton(task, params, batch):
    flat, unravel = ravel_pytree(params)
    outputs_of = lambda f: task.apply(unravel(f), batch.inputs)[0].ravel()  # noqa: E731
    jac = jax.jacfwd(outputs_of)(flat)
    outputs = task.apply(params, batch.inputs)[0]
    loss_of = lambda o: task.loss_from_outputs(o.reshape(outputs.shape), batch)  # noqa: E731
    h_out = jax.hessian(loss_of)(outputs.ravel())
    return jac.T @ h_out @ jac


def _dense_structural(task, params, batch):
    flat, unravel = ravel_pytree(params)
    states_of = lambda f: task.apply(unravel(f), batch.inputs)[1].ravel()  # noqa: E731
    jac = jax.jacfwd(states_of)(flat)
    states = task.apply(params, batch.inputs)[1]
    n_steps, n_seq, _ = states.shape
    valid = (np.arange(n_steps)[:, None] < np.asarray(batch.lengths)[None, :]) / n_seq
    if task.leak == 0.0:
        # D = sigma'(x): the Hessian of the matching loss of the unit's nonlinearity.
        x = jnp.asarray(states)
        if task.init_scheme == "sigmoid":
            d = jax.nn.sigmoid(x) * (1 - jax.nn.sigmoid(x))
        else:
            d = 1 - jnp.tanh(x) ** 2
    else:
        d = jnp.ones_like(states)
    d = d * valid[..., None]
    return jac.T @ (d.ravel()[:, None] * jac)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gauss_newton_product_equals_dense(name):
    with jax.enable_x64(True):
        task, params, batch, v, _ = _setup(name)
        dense = _dense_gauss_newton(task, params, batch)
        gv = gauss_newton_operator(task, params, batch)(v)
        np.testing.assert_allclose(
            ravel_pytree(gv)[0], dense @ ravel_pytree(v)[0], rtol=1e-9, atol=1e-12
        )
        # Positive semi-definite, as every output loss is convex in the outputs.
        assert np.linalg.eigvalsh(dense).min() > -1e-10


@pytest.mark.parametrize("name", sorted(TASKS))
def test_hessian_product_equals_jax_hessian(name):
    with jax.enable_x64(True):
        task, params, batch, v, _ = _setup(name)
        flat, unravel = ravel_pytree(params)
        dense = jax.hessian(lambda f: task.loss(unravel(f), batch))(flat)
        hv = hessian_operator(task, params, batch)(v)
        np.testing.assert_allclose(
            ravel_pytree(hv)[0], dense @ ravel_pytree(v)[0], rtol=1e-8, atol=1e-11
        )


@pytest.mark.parametrize("name", ["squared_error", "softmax", "sigmoid_units", "leaky"])
def test_structural_damping_equals_dense(name):
    with jax.enable_x64(True):
        task, params, batch, v, _ = _setup(name)
        vf = ravel_pytree(v)[0]
        s_dense = _dense_structural(task, params, batch)
        sv = structural_operator(task, params, batch)(v)
        np.testing.assert_allclose(ravel_pytree(sv)[0], s_dense @ vf, rtol=1e-9)
        # Combined with Gauss-Newton in one pass, and added to the Hessian.
        g_dense = _dense_gauss_newton(task, params, batch)
        mu = 0.3
        combined = gauss_newton_operator(task, params, batch, structural=mu)(v)
        np.testing.assert_allclose(
            ravel_pytree(combined)[0], (g_dense + mu * s_dense) @ vf, rtol=1e-9
        )
        flat, unravel = ravel_pytree(params)
        h_dense = jax.hessian(lambda f: task.loss(unravel(f), batch))(flat)
        hs = curvature_operator("hessian", task, params, batch, mu)(v)
        np.testing.assert_allclose(
            ravel_pytree(hs)[0], (h_dense + mu * s_dense) @ vf, rtol=1e-8
        )


def test_gauss_newton_equals_hessian_for_linear_outputs():
    # With W_rec = 0 and W_in = 0 the outputs are affine in (W_out, b_out) only
    # through a constant hidden state: on those parameters G equals H exactly.
    with jax.enable_x64(True):
        task, params, batch, v, _ = _setup("squared_error")
        params = {**params, "W_rec": params["W_rec"] * 0, "W_in": params["W_in"] * 0}
        only_out = {k: (x if k in ("W_out", "b_out") else x * 0) for k, x in v.items()}
        gv = gauss_newton_operator(task, params, batch)(only_out)
        hv = hessian_operator(task, params, batch)(only_out)
        for k in ("W_out", "b_out"):
            np.testing.assert_allclose(gv[k], hv[k], rtol=1e-10, atol=1e-14)


def test_unknown_curvature_kind():
    task, params, batch, _, _ = _setup("squared_error")
    with pytest.raises(ValueError, match="gauss_newton"):
        curvature_operator("fisher", task, params, batch)


def test_operator_is_linear_and_reuses_one_linearization():
    task, params, batch, v, _ = _setup("softmax")
    matvec = jax.jit(gauss_newton_operator(task, params, batch))
    a = matvec(v)
    b = matvec(jax.tree.map(lambda x: 2.0 * x, v))
    for k in a:
        np.testing.assert_allclose(2.0 * a[k], b[k], rtol=1e-5, atol=1e-7)
    # The jitted closure compiles once and is reused for new vectors.
    matvec(jax.tree.map(lambda x: -x, v))
    assert matvec._cache_size() == 1
