"""Smoke battery over every registered task, hyperparameter checks and the registry."""

from __future__ import annotations

from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import make_small_chorales

import tasks
from tasks import TASKS, Batch, ConfigError, Range, Task, make_task, register_task
from tasks.losses import squared_error


def _build(name: str, monkeypatch=None) -> Task:
    if name == "wall":
        return make_task("wall")
    if name == "chorales":  # six pieces, not the whole corpus
        return make_small_chorales(monkeypatch, length=12, hidden=8)
    return make_task(name, length=12, hidden=8)


def _perturb(params, seed=0, scale=0.3):
    """The (small) initial weights plus host noise, so the checks see real dynamics."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(p + scale * rng.normal(size=p.shape), p.dtype), params
    )


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_smoke(name, monkeypatch):
    task = _build(name, monkeypatch)
    assert task.name == name
    key = jax.random.key(0)

    # init is a deterministic function of the key.
    init = jax.jit(task.init)
    params = init(key)
    again = init(jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(again)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    if name != "wall":  # the default wall starts at (w0, b0) without noise
        other = init(jax.random.key(1))
        assert not np.array_equal(params["W_rec"], other["W_rec"])

    # A jitted sampler; one batch, time-major.
    batch = jax.jit(task.sample_batch)(jax.random.key(2))
    assert isinstance(batch, Batch)
    n_steps, size = batch.inputs.shape[:2]
    assert size == task.batch_size
    assert batch.mask.shape == (n_steps, size)
    assert batch.lengths.shape == (size,)
    assert batch.targets.shape[:2] == (n_steps, size)
    mask = np.asarray(batch.mask)
    assert np.all((mask == 0.0) | (mask == 1.0))
    assert np.all(mask.sum(axis=0) > 0)
    # Nothing is scored at or beyond a sequence's length.
    steps = np.arange(n_steps)[:, None]
    assert np.all(mask[steps >= np.asarray(batch.lengths)[None, :]] == 0.0)

    params = _perturb(params)

    @jax.jit
    def evaluate(params, batch):
        outputs, states = task.apply(params, batch.inputs)
        return {
            "outputs": outputs,
            "states": states,
            "metrics": task.metrics(params, batch),
            "loss": task.loss_from_outputs(outputs, batch),
            # The one-step transition applied to apply's own states.
            "next": task.transition(params, states[:-1], batch.inputs[1:]),
            "moved": task.transition(params, states[:-1], batch.inputs[1:] + 1.0),
            # With tanh units x_1 = F(0, u_1) (h_0 = 0 and x_0 = 0).
            "first": task.transition(
                params, jnp.zeros_like(states[0]), batch.inputs[0]
            ),
        }

    out = jax.tree.map(np.asarray, evaluate(params, batch))
    outputs, states = out["outputs"], out["states"]
    hidden = 1 if name == "wall" else task.hidden
    assert outputs.shape == (n_steps, size, task.n_out)
    assert states.shape == (n_steps, size, hidden)
    assert np.all(np.isfinite(outputs)) and np.all(np.isfinite(states))

    assert np.isfinite(out["metrics"]["loss"])
    np.testing.assert_allclose(out["metrics"]["loss"], out["loss"], rtol=1e-6)
    assert 0.0 <= float(out["metrics"]["error_rate"]) <= 1.0

    # Only the recurrent weight matrix is marked recurrent.
    rec = task.recurrent_mask(params)
    assert jax.tree.structure(rec) == jax.tree.structure(params)
    marked = {k for k, v in rec.items() if v}
    recurrent_key = "w" if name == "wall" else "W_rec"
    assert marked == {recurrent_key}
    np.testing.assert_array_equal(task.recurrent_matrix(params), params[recurrent_key])

    # Structural damping's D: sigma'(x) of the vanilla tanh units (by hand), 1 for
    # the wall's state.
    d = np.asarray(task.state_curvature(jnp.asarray(states)))
    expected = np.ones_like(states) if name == "wall" else 1 - np.tanh(states) ** 2
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-6)

    # The one-step transition reproduces the state sequence of apply.
    np.testing.assert_allclose(out["next"], states[1:], rtol=1e-5, atol=1e-5)
    if name != "wall":  # and the inputs enter it
        assert not np.allclose(out["moved"], states[1:], atol=1e-3)
        assert task.init_scheme == "smart_tanh"  # tanh: sigma(0) = 0 = h_0
        np.testing.assert_allclose(out["first"], states[0], rtol=1e-6, atol=1e-7)
        assert np.abs(states[0]).max() > 1e-2


@pytest.mark.parametrize("name", ["addition", "memorization_5bit"])
def test_error_rate_counts_wrong_sequences(name):
    """error_rate = fraction of sequences with any wrong scored step."""
    task = make_task(name, length=12, hidden=8, batch_size=16)

    shapes = jax.eval_shape(task.init, jax.random.key(0))
    params = _perturb(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes))
    if name == "addition":  # outputs near 0.5: some right, some wrong
        params["W_out"] = 0.02 * params["W_out"]
        params["b_out"] = jnp.full_like(params["b_out"], 0.5)

    @jax.jit
    def run(params):
        batch = task.sample_batch(jax.random.key(1))
        outputs, _ = task.apply(params, batch.inputs)
        if name != "addition":  # make every other sequence right
            right = jnp.arange(batch.mask.shape[1]) % 2 == 0
            predicted = jnp.argmax(outputs, axis=-1)
            batch = batch._replace(
                targets=jnp.where(right[None, :], predicted, batch.targets)
            )
        return outputs, batch, task.metrics(params, batch)["error_rate"]

    outputs, batch, got = jax.tree.map(np.asarray, run(params))
    targets, mask = batch.targets, batch.mask > 0
    if name == "addition":
        wrong = np.sum((outputs - targets) ** 2, axis=-1) > 0.04
    else:
        wrong = outputs.argmax(-1) != targets
    expected = np.mean(np.any(wrong & mask, axis=0))
    assert 0.0 < expected < 1.0  # a mixed batch: the test discriminates
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert task.success(0.009) and not task.success(0.01)


# Hyperparameter validation.


def test_unknown_task_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        make_task("no_such_task")
    message = str(err.value)
    assert "no_such_task" in message
    for name in TASKS:
        assert name in message


@pytest.mark.parametrize(
    ("name", "hparams", "field"),
    [
        ("addition", {"lenght": 10}, "lenght"),  # unknown name
        ("addition", {"length": 0}, "length"),
        ("addition", {"length": 5}, "length"),  # shorter than the task allows
        ("addition", {"length": 10.5}, "length"),
        ("addition", {"length": True}, "length"),
        ("temporal_order", {"hidden": 0}, "hidden"),
        ("temporal_order", {"batch_size": -3}, "batch_size"),
        ("temporal_order", {"leak": 1.0}, "leak"),
        ("temporal_order", {"leak": -0.1}, "leak"),
        ("temporal_order", {"init": "relu"}, "init"),
        ("xor", {"hidden": "8"}, "hidden"),
        ("memorization", {"n_values": 1}, "n_values"),
        ("memorization", {"n_pos": 0}, "n_pos"),
        ("wall", {"tolerance": 0.0}, "tolerance"),
        ("wall", {"init_noise": -1.0}, "init_noise"),
        ("wall", {"n_steps": 0}, "n_steps"),
        ("temporal_order", {"length": 20, "min_length": 30}, "min_length"),
        ("memorization", {"length": 5, "min_length": 6}, "min_length"),
    ],
)
def test_invalid_hparams_raise_config_error(name, hparams, field):
    with pytest.raises(ConfigError) as err:
        make_task(name, **hparams)
    assert repr(field) in str(err.value)  # the message quotes the field
    assert isinstance(err.value, ValueError)


def test_unknown_hparam_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        make_task("addition", lenght=10)
    message = str(err.value)
    for field in ("length", "min_length", "batch_size", "hidden", "init", "leak"):
        assert field in message


def test_wrong_choice_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        make_task("temporal_order", init="relu")
    for choice in ("sigmoid", "basic_tanh", "smart_tanh"):
        assert choice in str(err.value)


def test_valid_hparams_are_applied():
    task = make_task(
        "temporal_order", length=30, min_length=15, hidden=7, init="basic_tanh"
    )
    assert (task.length, task.min_length, task.hidden) == (30, 15, 7)
    assert task.init_scheme == "basic_tanh"
    assert task.describe()["hidden"] == 7
    assert make_task("addition", length=20.0).length == 20  # integral float is fine


# User tasks.


class _ConstantTask(Task):
    """A toy task: one linear unit, its output should equal ``target``."""

    name = "constant"
    output_loss = squared_error
    batch_size = 2

    def __init__(self, target: float, n_steps: int):
        self.target, self.n_steps = target, n_steps

    def init(self, key):
        return {"w": jax.random.normal(key, (1, 1))}

    def sample_batch(self, key, batch_size=None):
        size = batch_size or self.batch_size
        return Batch(
            inputs=jnp.ones((self.n_steps, size, 1)),
            targets=jnp.full((self.n_steps, size, 1), self.target),
            mask=jnp.ones((self.n_steps, size)),
            lengths=jnp.full((size,), self.n_steps, jnp.int32),
        )

    def apply(self, params, inputs, state_offset=None):
        states = inputs @ params["w"]
        if state_offset is not None:
            states = states + state_offset
        return states, states


def constant_task(
    target: Annotated[float, Range(0, 1)] = 0.5,
    n_steps: Annotated[int, Range(1, None)] = 3,
    mode: Literal["a", "b"] = "a",
) -> _ConstantTask:
    del mode
    return _ConstantTask(target, n_steps)


@pytest.fixture
def registered():
    register_task("test_constant", constant_task)
    try:
        yield "test_constant"
    finally:
        TASKS.pop("test_constant", None)


def test_register_task_and_make_it(registered):
    assert tasks.TASKS is TASKS and registered in TASKS
    task = make_task(registered, target=0.25, n_steps=4)
    assert isinstance(task, _ConstantTask)
    assert (task.target, task.n_steps) == (0.25, 4)
    params = {"w": jnp.full((1, 1), 0.75)}
    batch = task.sample_batch(jax.random.key(0))
    np.testing.assert_allclose(task.loss(params, batch), 0.25, rtol=1e-6)
    with pytest.raises(ConfigError, match="target"):
        make_task(registered, target=2.0)
    with pytest.raises(ConfigError, match="mode"):
        make_task(registered, mode="c")
    with pytest.raises(ConfigError, match="already registered"):
        register_task(registered, constant_task)
    register_task(registered, constant_task, overwrite=True)
    with pytest.raises(ConfigError) as err:
        make_task("nope")
    assert registered in str(err.value)


def test_registry_is_clean_after_user_task():
    assert "test_constant" not in TASKS


def test_user_task_contract_defaults():
    task = _ConstantTask(0.5, 3)
    params = task.init(jax.random.key(0))
    batch = task.sample_batch(jax.random.key(1))
    # n_out is inferred from apply's output shape when a task does not declare it.
    assert task.n_out == 1
    # The loss weights default to mask / sum(mask).
    np.testing.assert_allclose(task.loss_weights(batch), np.full((3, 2), 1 / 6))
    # Optional pieces raise (or return None) instead of guessing.
    with pytest.raises(NotImplementedError, match="structural damping"):
        task.state_curvature(jnp.zeros((3, 2, 1)))
    with pytest.raises(NotImplementedError, match="transition"):
        task.transition(params, jnp.zeros((2, 1)), jnp.zeros((2, 1)))
    with pytest.raises(NotImplementedError, match="recurrent"):
        task.recurrent_mask(params)
    assert task.recurrent_matrix(params) is None
    assert task.describe() == {"name": "constant"}


def test_n_out_declared_or_not_inferable():
    class Declared(_ConstantTask):
        n_out = 4

    assert Declared(0.5, 3).n_out == 4
    instance = _ConstantTask(0.5, 3)
    instance.n_out = 7  # an instance attribute overrides the default too
    assert instance.n_out == 7

    class Broken(_ConstantTask):
        def apply(self, params, inputs, state_offset=None):
            raise RuntimeError("no shapes here")

    with pytest.raises(NotImplementedError, match="n_out"):
        _ = Broken(0.5, 3).n_out


def test_builtin_tasks_declare_n_out():
    assert make_task("temporal_order").n_out == 4
    assert make_task("temporal_order_3bit").n_out == 8
    assert make_task("addition").n_out == 1
    assert make_task("memorization").n_out == 6
    assert make_task("wall").n_out == 1


# Where the loss is scored: the output layer runs at the scored steps only.

LAST_STEP_TASKS = {
    "temporal_order": dict(length=12, min_length=10, hidden=5, batch_size=4),
    "addition": dict(length=12, hidden=5, batch_size=6),  # lengths vary per sequence
    "random_permutation": dict(length=8, hidden=5, batch_size=3),
    "xor": dict(length=12, hidden=5, batch_size=6, leak=0.3),
}


@pytest.mark.parametrize("name", sorted(LAST_STEP_TASKS))
def test_scored_steps_give_the_full_loss_and_gradient(name):
    with jax.enable_x64(True):
        task = make_task(name, **LAST_STEP_TASKS[name])
        params = _perturb(jax.tree.map(np.asarray, task.init(jax.random.key(0))))
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        batch = task.sample_batch(jax.random.key(1))
        index = np.asarray(task.score_steps(batch))
        mask, lengths = np.asarray(batch.mask), np.asarray(batch.lengths)
        # The indices are each sequence's last step and cover the whole mask.
        np.testing.assert_array_equal(index, (lengths - 1)[None])
        covered = np.zeros_like(mask)
        covered[index[0], np.arange(mask.shape[1])] = 1
        assert np.all((mask != 0) <= (covered != 0))

        # Reference: every step's outputs, the full mask (Task.apply, the contract).
        def full_loss(p):
            outputs, _ = task.apply(p, batch.inputs)
            return task.loss_from_outputs(outputs, batch)

        outputs, states = task.apply(params, batch.inputs)
        scored_out, scored_states = task.apply_scored(params, batch)
        np.testing.assert_allclose(
            scored_out[0], np.asarray(outputs)[lengths - 1, np.arange(len(lengths))],
            rtol=1e-13,
        )  # fmt: skip
        np.testing.assert_allclose(scored_states, states, rtol=1e-13)
        np.testing.assert_allclose(
            task.loss(params, batch), full_loss(params), rtol=1e-13
        )
        for a, b in zip(
            jax.tree.leaves(jax.grad(task.loss)(params, batch)),
            jax.tree.leaves(jax.grad(full_loss)(params)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
        metrics = task.metrics(params, batch)
        wrong = task.output_loss.is_wrong(outputs, batch.targets) & (batch.mask > 0)
        assert float(metrics["error_rate"]) == float(jnp.mean(jnp.any(wrong, axis=0)))


def test_every_step_is_scored_where_the_mask_says_so():
    task = make_task("memorization", length=5, n_values=2, n_pos=2, hidden=4)
    batch = task.sample_batch(jax.random.key(0))
    assert task.score_steps(batch) is None
    assert task.scored_batch(batch) is batch


def test_default_apply_scored_takes_the_declared_steps():
    class LastStep(Task):
        name, output_loss, batch_size = "last_step", squared_error, 3

        def init(self, key):
            return {"w": jax.random.normal(key, (2, 1))}

        def sample_batch(self, key, batch_size=None):
            x = jax.random.normal(key, (4, 3, 2))
            lengths = jnp.array([4, 2, 3])
            mask = (jnp.arange(4)[:, None] == lengths - 1).astype(jnp.float32)
            return Batch(x, jnp.ones((4, 3, 1)), mask, lengths)

        def apply(self, params, inputs, state_offset=None):
            out = jnp.cumsum(inputs, axis=0) @ params["w"]
            return out, out

        def score_steps(self, batch):
            return (batch.lengths - 1)[None]

    task = LastStep()
    params = task.init(jax.random.key(0))
    batch = task.sample_batch(jax.random.key(1))
    outputs, _ = task.apply(params, batch.inputs)
    scored, _ = task.apply_scored(params, batch)
    np.testing.assert_array_equal(scored[0], outputs[jnp.array([3, 1, 2]), [0, 1, 2]])
    assert task.scored_batch(batch).mask.shape == (1, 3)
    np.testing.assert_allclose(
        task.loss(params, batch), task.loss_from_outputs(outputs, batch), rtol=1e-6
    )
