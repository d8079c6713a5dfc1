"""Gradient clipping and the non-finite guard (Pascanu et al. 2013; docs/methods.md).

References are explicit numpy computations of Pascanu et al. (2013) Algorithm 1,
element-wise clipping, the adaptive threshold and the released code's shrink policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks
from optimizers import (
    Objective,
    clip_gradients,
    collect_records,
    guard_nonfinite,
    loss_grads_and_states,
    sgd,
    sgd_clip,
)


def _tree(values: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


def _global_norm(tree) -> float:
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    return float(np.sqrt(sum(np.sum(x**2) for x in leaves)))


def _algorithm1(tree, threshold: float):
    """Pascanu et al. Algorithm 1 in float64 numpy: (clipped tree, norm, fired)."""
    norm = _global_norm(tree)
    fired = norm >= threshold
    scale = threshold / norm if fired else 1.0
    clipped = {k: np.asarray(v, np.float64) * scale for k, v in tree.items()}
    return clipped, norm, fired


# Global norm exactly 5 over three leaves of different shapes.
GRADS = {"a": [3.0, 0.0], "b": [[0.0], [4.0]], "c": 0.0}


def _apply(transform, grads):
    state = transform.init(grads)
    updates, state = transform.update(grads, state)
    return updates, state


@pytest.mark.parametrize(
    ("threshold", "fires"),
    [
        (5.0, True),  # at the threshold: ||g|| >= threshold clips (to itself)
        (5.0 * (1 + 1e-4), False),  # norm just below the threshold
        (5.0 * (1 - 1e-4), True),  # norm just above the threshold
        (1.0, True),
        (100.0, False),
    ],
)
def test_global_clip_matches_algorithm_1(threshold, fires):
    grads = _tree(GRADS)
    updates, state = _apply(clip_gradients(threshold), grads)
    expected, norm, fired = _algorithm1(GRADS, threshold)
    assert fired == fires
    assert norm == 5.0
    for k in GRADS:
        np.testing.assert_allclose(updates[k], expected[k], rtol=1e-6, atol=1e-7)
        assert updates[k].shape == grads[k].shape
        assert updates[k].dtype == grads[k].dtype
    # Norm after clipping is min(||g||, threshold); the direction never changes.
    np.testing.assert_allclose(_global_norm(updates), min(norm, threshold), rtol=1e-6)
    flat_in = np.concatenate([np.ravel(GRADS[k]) for k in GRADS])
    flat_out = np.concatenate([np.ravel(updates[k]) for k in GRADS])
    cosine = flat_in @ flat_out / (np.linalg.norm(flat_in) * np.linalg.norm(flat_out))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)
    record = collect_records(state)
    assert set(record) == {"clip_norm", "clip_threshold", "clip"}
    np.testing.assert_allclose(record["clip_norm"], 5.0, rtol=1e-6)
    np.testing.assert_allclose(record["clip_threshold"], threshold, rtol=1e-7)
    assert bool(record["clip"]) is fires


def test_global_clip_uses_norm_over_all_leaves():
    # Every leaf alone is below the threshold; only the global norm exceeds it.
    rng = np.random.default_rng(0)
    grads = {
        "W": rng.normal(size=(4, 3)) * 0.3,
        "v": rng.normal(size=(5,)) * 0.3,
        "s": np.array(0.4),
    }
    threshold = 0.9 * _global_norm(grads)
    assert all(_global_norm({k: v}) < threshold for k, v in grads.items())
    updates, _ = _apply(clip_gradients(threshold), _tree(grads))
    expected, _, fired = _algorithm1(grads, threshold)
    assert fired
    for k in grads:
        np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_global_norm(updates), threshold, rtol=1e-5)


def test_global_clip_with_traced_threshold():
    grads = _tree(GRADS)
    transform = clip_gradients(jnp.float32(2.0))
    state = transform.init(grads)

    @jax.jit
    def clip(grads, state, threshold):
        return clip_gradients(threshold).update(grads, state)

    for threshold in (2.0, 4.0, 8.0):
        updates, new_state = clip(grads, state, jnp.float32(threshold))
        expected, _, fired = _algorithm1(GRADS, threshold)
        for k in GRADS:
            np.testing.assert_allclose(updates[k], expected[k], rtol=1e-6, atol=1e-7)
        assert bool(collect_records(new_state)["clip"]) is fired
    assert clip._cache_size() == 1


@pytest.mark.parametrize("relative", [0.05, 0.5, 0.999, 1.0, 1.001, 10.0])
def test_elementwise_clip_matches_np_clip(relative):
    rng = np.random.default_rng(1)
    grads = {"W": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,)) * 0.2}
    grads = {k: v.astype(np.float32) for k, v in grads.items()}  # exact boundaries
    largest = max(np.abs(v).max() for v in grads.values())
    threshold = float(np.float32(relative * largest))
    updates, state = _apply(clip_gradients(threshold, "elementwise"), _tree(grads))
    for k in grads:
        expected = np.clip(grads[k], -threshold, threshold)
        np.testing.assert_allclose(updates[k], expected, rtol=1e-6)
    record = collect_records(state)
    np.testing.assert_allclose(record["clip_norm"], _global_norm(grads), rtol=1e-6)
    np.testing.assert_allclose(record["clip_threshold"], threshold, rtol=1e-7)
    any_large = any(np.any(np.abs(v) > threshold) for v in grads.values())
    assert bool(record["clip"]) == bool(any_large)


def test_clip_rejects_unknown_method():
    with pytest.raises(ValueError, match="global"):
        clip_gradients(1.0, method="rowwise")


@pytest.mark.parametrize(("method", "factor"), [("global", 1.5), ("elementwise", 0.3)])
def test_adaptive_threshold_is_factor_times_running_average(method, factor):
    rng = np.random.default_rng(2)
    scales = [2.0, 8.0, 0.5, np.inf, 4.0, 1.0, 0.1, 3.0]
    transform = clip_gradients(factor, method, adaptive=True)
    state = transform.init({"W": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
    finite_norms: list[float] = []
    outcomes: set[bool] = set()
    for scale in scales:
        raw = {"W": rng.normal(size=(2, 3)), "b": rng.normal(size=(3,))}
        if np.isinf(scale):
            raw["W"][0, 1] = np.inf
        else:
            raw = {k: v * scale for k, v in raw.items()}
        norm = _global_norm(raw)
        # The first update uses its own norm; later ones the previous finite norms.
        average = np.mean(finite_norms) if finite_norms else norm
        threshold = factor * average
        updates, state = transform.update(_tree(raw), state)
        record = collect_records(state)
        np.testing.assert_allclose(record["clip_norm"], norm, rtol=1e-6)
        np.testing.assert_allclose(record["clip_threshold"], threshold, rtol=1e-5)
        if np.isfinite(norm):
            if method == "global":
                expected, _, fired = _algorithm1(raw, threshold)
            else:
                expected = {
                    k: np.clip(v, -threshold, threshold) for k, v in raw.items()
                }
                fired = any(np.any(np.abs(v) > threshold) for v in raw.values())
            assert bool(record["clip"]) == bool(fired)
            for k in raw:
                np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5)
            outcomes.add(bool(fired))
            finite_norms.append(norm)
    # The sequence exercised both outcomes and skipped the infinite norm.
    assert outcomes == {True, False}
    assert len(finite_norms) == len(scales) - 1


def test_adaptive_clip_of_zero_gradient_is_zero_not_nan():
    # First update: average = own norm = 0, so the limit is 0 and ||g|| >= 0 fires;
    # the clipped gradient must stay 0 (regression: it was 0/0 = NaN).
    transform = clip_gradients(1.0, adaptive=True)
    zeros = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state = transform.init(zeros)
    updates, state = transform.update(zeros, state)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, np.zeros(leaf.shape))
    record = collect_records(state)
    assert float(record["clip_norm"]) == 0.0
    assert float(record["clip_threshold"]) == 0.0
    # Later updates: the average of previous norms (0, then 0 and 5).
    grads = _tree({"w": [3.0, 4.0, 0.0], "b": 0.0})
    updates, state = transform.update(grads, state)
    np.testing.assert_array_equal(updates["w"], np.zeros(3))
    updates, state = transform.update(grads, state)
    np.testing.assert_allclose(collect_records(state)["clip_threshold"], 2.5)
    np.testing.assert_allclose(updates["w"], [1.5, 2.0, 0.0], rtol=1e-6)


# Non-finite gradients.


@pytest.fixture(scope="module")
def rnn():
    """A tiny addition RNN: (task, params, finite grads, objective)."""
    task = tasks.make_task("addition", length=10, hidden=4)
    rng = np.random.default_rng(3)
    shapes = {
        "W_in": (2, 4),
        "W_rec": (4, 4),
        "b": (4,),
        "W_out": (4, 1),
        "b_out": (1,),
    }
    params = {
        k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()
    }
    # An addition-like batch: T = 6, B = 2, values and markers, scored at the end.
    inputs = np.zeros((6, 2, 2))
    inputs[:, :, 0] = rng.uniform(size=(6, 2))
    inputs[[1, 3], :, 1] = 1.0
    targets = 0.5 * (inputs[1, :, 0] + inputs[3, :, 0])
    batch = tasks.Batch(
        inputs=jnp.asarray(inputs, jnp.float32),
        targets=jnp.zeros((6, 2, 1)).at[-1, :, 0].set(targets),
        mask=jnp.zeros((6, 2)).at[-1].set(1.0),
        lengths=jnp.full((2,), 6, jnp.int32),
    )
    lgs = jax.jit(loss_grads_and_states, static_argnums=0)
    loss, grads, states, state_grads = lgs(task, params, batch)
    objective = Objective(task, batch, batch, loss, grads, states, state_grads)
    return task, params, grads, objective


def _jit_update(opt, params, objective):
    return jax.jit(lambda g, s: opt.update(g, s, params, objective=objective))


def _poison(grads, value, leaf="W_out"):
    bad = dict(grads)
    shape = grads[leaf].shape
    bad[leaf] = grads[leaf].reshape(-1).at[0].set(value).reshape(shape)
    return bad


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_skip_policy_zero_update_and_state_untouched(rnn):
    lr, decay = 0.1, 0.9
    _, params, grads, objective = rnn
    opt = sgd(learning_rate=lr, momentum=decay, nonfinite="skip")
    state = opt.init(params)
    step = _jit_update(opt, params, objective)
    np_grads = {k: np.asarray(v, np.float64) for k, v in grads.items()}

    # A finite update builds a nonzero momentum trace.
    updates, state = step(grads, state)
    trace = dict(np_grads)
    for k in params:
        np.testing.assert_allclose(updates[k], -lr * trace[k], rtol=1e-6, atol=1e-9)
    assert not bool(collect_records(state)["nonfinite"])
    assert int(state.events) == 0

    for n, value in enumerate([np.inf, np.nan, -np.inf], start=1):
        before = state.inner
        updates, state = step(_poison(grads, value), state)
        for k in params:
            np.testing.assert_array_equal(updates[k], np.zeros(params[k].shape))
        _assert_trees_equal(state.inner, before)  # the momentum trace is unchanged
        assert bool(collect_records(state)["nonfinite"])
        assert int(state.events) == n

    # The next finite update continues from the trace before the skipped ones.
    updates, state = step(grads, state)
    for k in params:
        expected = -lr * (np_grads[k] + decay * trace[k])
        np.testing.assert_allclose(updates[k], expected, rtol=1e-6, atol=1e-9)
    assert not bool(collect_records(state)["nonfinite"])
    assert int(state.events) == 3


def test_skip_policy_works_without_objective():
    grads = {"w": jnp.array([1.0, jnp.nan])}
    opt = guard_nonfinite(optax.sgd(0.1), "skip")
    state = opt.init(grads)
    updates, state = opt.update(grads, state, grads)
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
    assert int(state.events) == 1


@pytest.mark.parametrize("leaf", ["W_out", "W_rec", "b"])
def test_shrink_policy_replaces_gradient_by_shrunk_recurrent_weights(rnn, leaf):
    lr = 0.05
    _, params, grads, objective = rnn
    opt = sgd(learning_rate=lr, nonfinite="shrink")
    state = opt.init(params)
    step = _jit_update(opt, params, objective)
    w_rec = np.asarray(params["W_rec"], np.float64)
    events = 0
    for value in [np.inf, None, np.nan, -np.inf, None]:
        incoming = grads if value is None else _poison(grads, value, leaf)
        updates, state = step(incoming, state)
        if value is None:
            for k in params:
                np.testing.assert_allclose(updates[k], -lr * np.asarray(grads[k]))
        else:
            events += 1
            for k in params:
                expected = (
                    -lr * 0.02 * w_rec if k == "W_rec" else np.zeros(params[k].shape)
                )
                np.testing.assert_allclose(updates[k], expected, rtol=1e-6, atol=0)
            new_params = optax.apply_updates(params, updates)
            for k in params:
                assert np.all(np.isfinite(np.asarray(new_params[k])))
            np.testing.assert_allclose(
                new_params["W_rec"], (1 - lr * 0.02) * w_rec, rtol=1e-6
            )
        assert bool(collect_records(state)["nonfinite"]) is (value is not None)
        assert int(state.events) == events
    assert events == 3


def test_shrink_gradient_goes_through_the_inner_transform(rnn):
    # With momentum and a custom shrink factor the inner transform sees
    # g = shrink * W_rec (0 elsewhere) exactly as if that were the gradient.
    lr, decay, shrink = 0.1, 0.5, 0.3
    _, params, grads, objective = rnn
    opt = sgd(learning_rate=lr, momentum=decay, nonfinite="shrink", shrink=shrink)
    state = opt.init(params)
    step = _jit_update(opt, params, objective)
    _, state = step(grads, state)
    updates, state = step(_poison(grads, np.nan), state)
    for k in params:
        g = np.asarray(grads[k], np.float64)
        replacement = shrink * np.asarray(params[k]) if k == "W_rec" else 0.0 * g
        expected = -lr * (replacement + decay * g)
        np.testing.assert_allclose(updates[k], expected, rtol=1e-5, atol=1e-9)


def test_shrink_policy_under_clipping_and_jit(rnn):
    lr = 0.1
    _, params, grads, objective = rnn
    # A small threshold: the shrink gradient 0.02 W_rec is clipped like any other.
    w_rec = np.asarray(params["W_rec"], np.float64)
    threshold = 0.5 * 0.02 * np.linalg.norm(w_rec)
    opt = sgd_clip(learning_rate=lr, threshold=threshold)
    state = opt.init(params)
    step = _jit_update(opt, params, objective)
    updates, state = step(_poison(grads, np.inf), state)
    expected = -lr * threshold * w_rec / np.linalg.norm(w_rec)
    np.testing.assert_allclose(updates["W_rec"], expected, rtol=1e-5)
    for k in ("W_in", "b", "W_out", "b_out"):
        np.testing.assert_array_equal(updates[k], np.zeros(params[k].shape))
    record = collect_records(state)
    assert set(record) == {"clip_norm", "clip_threshold", "clip", "nonfinite"}
    assert bool(record["nonfinite"]) and bool(record["clip"])
    np.testing.assert_allclose(
        record["clip_norm"], 0.02 * np.linalg.norm(w_rec), rtol=1e-5
    )


def test_shrink_policy_needs_objective():
    params = {"W_rec": jnp.eye(2), "b": jnp.zeros(2)}
    opt = guard_nonfinite(optax.sgd(0.1), "shrink")
    state = opt.init(params)
    with pytest.raises(ValueError, match="objective"):
        opt.update(params, state, params)
    with pytest.raises(ValueError, match="objective"):
        sgd().update(params, sgd().init(params), params)


def test_guard_rejects_unknown_policy():
    with pytest.raises(ValueError, match="skip"):
        guard_nonfinite(optax.sgd(0.1), "ignore")
