"""Output losses: closed-form Hessians, predictive sampling, error tests, masking."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks.losses import (
    OUTPUT_LOSSES,
    REGRESSION_TOLERANCE,
    loss_weights,
    masked_mean,
    output_basis,
    sigmoid_cross_entropy,
    softmax_cross_entropy,
    squared_error,
)

N_OUT = 5


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _outputs_and_target(name: str, seed: int):
    """One step's outputs and a valid target for the named loss (float64)."""
    rng = np.random.default_rng(seed)
    f = jnp.asarray(rng.normal(scale=1.5, size=N_OUT), jnp.float64)
    if name == "squared_error":
        y = jnp.asarray(rng.normal(size=N_OUT), jnp.float64)
    elif name == "softmax_cross_entropy":
        y = jnp.asarray(rng.integers(N_OUT), jnp.int32)
    else:
        y = jnp.asarray(rng.integers(0, 2, size=N_OUT), jnp.float64)
    return f, y


@partial(jax.jit, static_argnums=0)
def _dense_hvp(loss, f):
    """``H_L`` built column by column from ``hessian_vp`` on the unit vectors."""
    eye = jnp.eye(f.shape[-1], dtype=f.dtype)
    return jax.vmap(lambda v: loss.hessian_vp(f, v), out_axes=1)(eye)


@partial(jax.jit, static_argnums=0)
def _dense_hessian(loss, f, y):
    """The dense Hessian of one step's loss with respect to the outputs."""
    return jax.hessian(lambda out: loss.value(out, y))(f)


def test_registry_has_the_three_losses():
    assert set(OUTPUT_LOSSES) == {
        "squared_error",
        "softmax_cross_entropy",
        "sigmoid_cross_entropy",
    }
    for name, loss in OUTPUT_LOSSES.items():
        assert loss.name == name


@pytest.mark.parametrize("name", sorted(OUTPUT_LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_hessian_vp_equals_dense_hessian(x64, name, seed):
    loss = OUTPUT_LOSSES[name]
    f, y = _outputs_and_target(name, seed)
    assert f.dtype == jnp.float64
    dense = _dense_hessian(loss, f, y)
    np.testing.assert_allclose(_dense_hvp(loss, f), dense, rtol=1e-10, atol=1e-12)
    # And on an arbitrary vector, batched over several steps at once.
    rng = np.random.default_rng(100 + seed)
    v = jnp.asarray(rng.normal(size=N_OUT))
    np.testing.assert_allclose(loss.hessian_vp(f, v), dense @ v, rtol=1e-10)
    fs = jnp.stack([f, 0.5 * f, -f])
    vs = jnp.asarray(rng.normal(size=(3, N_OUT)))
    for i in range(3):
        dense_i = _dense_hessian(loss, fs[i], y)
        np.testing.assert_allclose(
            loss.hessian_vp(fs, vs)[i], dense_i @ vs[i], rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("name", sorted(OUTPUT_LOSSES))
def test_hessian_is_positive_semidefinite(x64, name):
    loss = OUTPUT_LOSSES[name]
    f, _ = _outputs_and_target(name, 7)
    eig = np.linalg.eigvalsh(np.asarray(_dense_hvp(loss, f)))
    assert eig.min() > -1e-12


@pytest.mark.parametrize("name", sorted(OUTPUT_LOSSES))
def test_output_basis_carries_the_hessian(x64, name):
    loss = OUTPUT_LOSSES[name]
    f, y = _outputs_and_target(name, 3)
    q = output_basis(loss, N_OUT)
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-12)
    # Softmax drops the shift of all outputs, which its loss ignores; the others
    # keep every direction.
    assert q.shape == (N_OUT, N_OUT - 1 if name == "softmax_cross_entropy" else N_OUT)
    if name == "softmax_cross_entropy":
        np.testing.assert_allclose(q.T @ np.ones(N_OUT), 0.0, atol=1e-12)
        shifted = loss.value(f + 3.0, y)
        np.testing.assert_allclose(shifted, loss.value(f, y), rtol=1e-12)
    dense = np.asarray(_dense_hessian(loss, f, y))  # autodiff, not hessian_vp
    np.testing.assert_allclose(q @ q.T @ dense @ q @ q.T, dense, atol=1e-12)


def test_loss_values_closed_form(x64):
    f = jnp.array([0.3, -1.2, 2.0])
    y = jnp.array([1.0, 0.0, 2.5])
    np.testing.assert_allclose(
        squared_error.value(f, y), np.sum((np.asarray(f) - np.asarray(y)) ** 2)
    )
    p = np.exp(np.asarray(f)) / np.exp(np.asarray(f)).sum()
    np.testing.assert_allclose(
        softmax_cross_entropy.value(f, jnp.array(2)), -np.log(p[2]), rtol=1e-12
    )
    bits = jnp.array([1.0, 0.0, 1.0])
    s = 1.0 / (1.0 + np.exp(-np.asarray(f)))
    ref = -np.sum(np.asarray(bits) * np.log(s) + (1 - np.asarray(bits)) * np.log(1 - s))
    np.testing.assert_allclose(sigmoid_cross_entropy.value(f, bits), ref, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(OUTPUT_LOSSES))
def test_sampled_gradient_outer_product_matches_hessian(name):
    """``E_{y ~ p(y|f)}[grad_f l grad_f l^T] = H_L`` within Monte-Carlo error."""
    n_samples = 40_000
    loss = OUTPUT_LOSSES[name]
    f = jnp.array([0.8, -0.5, 0.1, 1.5])
    key = jax.random.key(3)
    fs = jnp.broadcast_to(f, (n_samples, f.shape[0]))
    ys = loss.sample_targets(key, fs)
    if name == "softmax_cross_entropy":
        assert ys.shape == (n_samples,)
        assert jnp.all((ys >= 0) & (ys < f.shape[0]))
    else:
        assert ys.shape == fs.shape
    if name == "sigmoid_cross_entropy":
        assert set(np.unique(np.asarray(ys))) <= {0.0, 1.0}
    grads = jax.jit(jax.vmap(jax.grad(loss.value)))(fs, ys)
    grads = np.asarray(grads, np.float64)
    outer = grads[:, :, None] * grads[:, None, :]
    mean = outer.mean(axis=0)
    stderr = outer.std(axis=0) / np.sqrt(n_samples)
    h = np.asarray(_dense_hvp(loss, f), np.float64)
    assert np.all(np.abs(mean - h) <= 5.0 * stderr + 1e-3), (mean, h)
    # The estimate is not trivially right: the Hessian has a clear signal.
    assert np.abs(h).max() > 0.1


def test_sampled_targets_differ_between_keys():
    f = jnp.zeros((64, 3))
    for loss in OUTPUT_LOSSES.values():
        a = loss.sample_targets(jax.random.key(0), f)
        b = loss.sample_targets(jax.random.key(1), f)
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_is_wrong_squared_error_threshold():
    assert REGRESSION_TOLERANCE == 0.04
    outputs = jnp.array([[0.19], [0.21], [-0.25], [0.0], [0.5]])
    targets = jnp.array([[0.0], [0.0], [0.0], [0.1], [0.5]])
    expected = [False, True, True, False, False]
    assert squared_error.is_wrong(outputs, targets).tolist() == expected
    # Summed over output units: 0.15^2 + 0.15^2 = 0.045 > 0.04.
    two = jnp.array([[0.15, 0.15], [0.1, 0.1]])
    assert squared_error.is_wrong(two, jnp.zeros((2, 2))).tolist() == [True, False]


def test_is_wrong_softmax_is_argmax():
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(7, 3, 4))
    targets = rng.integers(0, 4, size=(7, 3))
    got = softmax_cross_entropy.is_wrong(jnp.asarray(outputs), jnp.asarray(targets))
    assert got.shape == (7, 3)
    np.testing.assert_array_equal(got, np.argmax(outputs, axis=-1) != targets)
    np.testing.assert_array_equal(
        softmax_cross_entropy.predict(jnp.asarray(outputs)), np.argmax(outputs, -1)
    )


def test_is_wrong_sigmoid_thresholds_at_zero():
    outputs = jnp.array([[0.5, -0.5], [0.5, 0.5], [-2.0, -0.1], [0.1, -3.0]])
    targets = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    got = sigmoid_cross_entropy.is_wrong(outputs, targets)
    assert got.tolist() == [False, True, False, True]
    np.testing.assert_allclose(
        sigmoid_cross_entropy.predict(jnp.array([0.0, 2.0])),
        [0.5, 1.0 / (1.0 + np.exp(-2.0))],
        rtol=1e-6,
    )


def test_masked_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))
    mask = (rng.uniform(size=(6, 4)) < 0.4).astype(np.float32)
    mask[0, 0] = 1.0
    expected = (x * mask).sum() / mask.sum()
    np.testing.assert_allclose(
        masked_mean(jnp.asarray(x), jnp.asarray(mask)), expected, rtol=1e-6
    )
    # No scored step: zero, not NaN.
    assert float(masked_mean(jnp.asarray(x), jnp.zeros((6, 4)))) == 0.0
    # A fractional total mask below one is not divided by it.
    np.testing.assert_allclose(
        masked_mean(jnp.array([2.0, 4.0]), jnp.array([0.5, 0.0])), 1.0
    )


def test_loss_weights_are_mask_over_its_total():
    rng = np.random.default_rng(1)
    mask = (rng.uniform(size=(7, 3)) < 0.5).astype(np.float32)
    mask[0, 0] = 1.0
    expected = mask / mask.sum()  # by hand
    np.testing.assert_allclose(loss_weights(jnp.asarray(mask)), expected, rtol=1e-7)
    # All-zero mask: all-zero weights (no NaN), so the loss is 0.
    zero = np.asarray(loss_weights(jnp.zeros((7, 3))))
    assert zero.shape == (7, 3) and np.all(zero == 0.0)
    # A total below one is not divided by: the weights are the mask itself.
    np.testing.assert_array_equal(
        loss_weights(jnp.array([[0.25, 0.0], [0.5, 0.0]])), [[0.25, 0.0], [0.5, 0.0]]
    )
    # dtype: float64 weights from a float32 mask (the mask is cast first).
    with jax.enable_x64(True):
        w = loss_weights(jnp.asarray(mask), jnp.float64)
        assert w.dtype == jnp.float64
        np.testing.assert_allclose(w, mask.astype(np.float64) / mask.sum(), rtol=1e-15)


def test_task_loss_uses_its_loss_weights():
    # The Task method is the one owner: its default is the function above, and the
    # loss is sum_t w_t l_t with those weights (checked by hand, all-zero mask too).
    from problems import init_params, sample

    from tasks import make_task

    task = make_task("memorization", length=3, n_pos=2, hidden=4, batch_size=3)
    params = init_params(task, jax.random.PRNGKey(0))
    batch = sample(task, jax.random.PRNGKey(1))
    mask = np.asarray(batch.mask)
    np.testing.assert_allclose(task.loss_weights(batch), mask / mask.sum(), rtol=1e-7)
    outputs = task.apply(params, batch.inputs)[0]
    per_step = np.asarray(softmax_cross_entropy.value(outputs, batch.targets))
    np.testing.assert_allclose(
        task.loss(params, batch), (per_step * mask).sum() / mask.sum(), rtol=1e-6
    )
    empty = batch._replace(mask=jnp.zeros_like(batch.mask))
    assert np.all(np.asarray(task.loss_weights(empty)) == 0.0)
    assert float(task.loss(params, empty)) == 0.0
