"""One battery for every registered optimizer (and an optax factory by import path),
plus the optimizer registry.

The training loop is the runner's: one forward/backward pass per step gives the loss,
the gradients, the hidden states and ``dE/dx_t``; the optimizer gets them as
``objective=``. Hyperparameters that :func:`optimizers.traced_names` reports are passed
as traced scalars of one compiled step, as the runner does.
"""

from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tasks
from optimizers import (
    OPTIMIZERS,
    Objective,
    WorkCount,
    check_optimizer,
    collect_records,
    collect_work,
    loss_grads_and_states,
    make_optimizer,
    omega_gradient,
    register_optimizer,
    resolve_optimizer,
    traced_names,
)
from tasks import ConfigError

NAMES = [*sorted(OPTIMIZERS), "optax.adam"]

#: Hyperparameters for the small problem (default values where a name is missing).
HPARAMS = {
    "sgd": {"learning_rate": 0.05, "momentum": 0.5},
    "sgd_clip": {"learning_rate": 0.05, "threshold": 0.2},
    "sgd_cr": {"learning_rate": 0.05, "threshold": 0.2, "reg_weight": 1.0},
    "optax.adam": {"learning_rate": 0.01},
}

#: The documented step records of the first-order methods (none for plain optax).
CLIP_KEYS = {"clip_norm", "clip_threshold", "clip", "nonfinite"}
RECORD_KEYS = {
    "sgd": {"nonfinite"},
    "sgd_clip": CLIP_KEYS,
    "sgd_cr": {"omega", *CLIP_KEYS},
    "optax.adam": set(),
}

N_STEPS = 150
#: Methods with an inner solver per update (CG, a damped Gauss-Newton solve) get
#: there in a handful of updates; more would only spend the test's time.
INNER_SOLVER_STEPS = {"hf": 40, "levenberg_marquardt": 40}


@functools.cache
def _problem():
    """A small addition RNN with one fixed batch (targets (a1 + a2) / 2)."""
    task = tasks.make_task("addition", length=10, hidden=8, init="basic_tanh")
    params = task.init(jax.random.PRNGKey(0))
    batch = jax.jit(task.sample_batch, static_argnums=1)(jax.random.PRNGKey(1), 16)
    return task, params, batch


@functools.cache
def _compiled(name: str):
    """(init_fn, jitted step, traced hyperparameter values) for ``name``."""
    task, _, _ = _problem()
    full = check_optimizer(name, HPARAMS.get(name, {}))
    traced = {k: full[k] for k in traced_names(name)}
    static = {k: v for k, v in full.items() if k not in traced}
    factory = resolve_optimizer(name)

    def build(values):
        return optax.with_extra_args_support(factory(**static, **values))

    @jax.jit
    def step(params, state, batch, key, values):
        loss, grads, states, state_grads = loss_grads_and_states(task, params, batch)
        objective = Objective(task, batch, batch, loss, grads, states, state_grads)
        opt = build(values)
        updates, state = opt.update(grads, state, params, objective=objective, key=key)
        return optax.apply_updates(params, updates), state, loss

    values = {k: jnp.float32(v) for k, v in traced.items()}
    return build(traced).init, step, values


def _avals(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [
        (jnp.shape(x), jnp.result_type(x), jax.typeof(x).weak_type) for x in leaves
    ]


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_small_problem(name):
    task, params, batch = _problem()
    init, step, values = _compiled(name)
    state = init(params)
    losses = []
    for i in range(INNER_SOLVER_STEPS.get(name, N_STEPS)):
        params, state, loss = step(params, state, batch, jax.random.PRNGKey(i), values)
        losses.append(float(loss))
    final = float(task.loss(params, batch))
    assert np.all(np.isfinite(losses))
    assert losses[0] > 0.1
    assert final < 0.3 * losses[0], (losses[0], final)
    assert final <= min(losses[:10])
    for leaf in jax.tree.leaves(params):
        assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("name", NAMES)
def test_second_update_does_not_recompile(name, count_compiles):
    _, params, batch = _problem()
    init, step, values = _compiled(name)
    state = init(params)
    keys = jax.random.split(jax.random.PRNGKey(0))
    params, state, _ = step(params, state, batch, keys[0], values)
    # Different parameters, state, batch, key and traced hyperparameter values.
    other_batch = batch._replace(inputs=batch.inputs * 0.5)
    other_values = {k: v * 0.5 for k, v in values.items()}
    with count_compiles() as compiles:
        jax.block_until_ready(step(params, state, other_batch, keys[1], other_values))
    assert compiles.count == 0  # real XLA compilations


@pytest.mark.parametrize("name", NAMES)
def test_state_structure_is_stable_across_updates(name):
    _, params, batch = _problem()
    init, step, values = _compiled(name)
    state0 = init(params)
    treedef0, avals0 = _avals(state0)
    state = state0
    for i in range(2):
        params, state, _ = step(params, state, batch, jax.random.PRNGKey(i), values)
        treedef, avals = _avals(state)
        assert treedef == treedef0
        assert avals == avals0


@pytest.mark.parametrize("name", NAMES)
def test_records_and_work(name):
    task, params, batch = _problem()
    init, step, values = _compiled(name)
    state = init(params)
    if name in RECORD_KEYS:
        assert set(collect_records(state)) == RECORD_KEYS[name]
    _, state, _ = step(params, state, batch, jax.random.PRNGKey(0), values)
    records = collect_records(state)
    for value in records.values():
        assert jnp.shape(value) == ()
    if name not in RECORD_KEYS:
        return
    assert set(records) == RECORD_KEYS[name]
    if "nonfinite" in records:
        assert not bool(records["nonfinite"])
    if "clip" in records:
        threshold = HPARAMS[name]["threshold"]
        np.testing.assert_allclose(records["clip_threshold"], threshold, rtol=1e-6)
        assert bool(records["clip"]) == bool(records["clip_norm"] >= threshold)
    if name == "sgd_clip":
        # The pre-clip norm is the global norm of the loss gradient (it fires here).
        grads = jax.grad(task.loss)(params, batch)
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
        np.testing.assert_allclose(records["clip_norm"], norm, rtol=1e-5)
        assert bool(records["clip"])
    if "omega" in records:
        assert np.isfinite(float(records["omega"])) and float(records["omega"]) > 0
    work = collect_work(state)
    assert isinstance(work, WorkCount)
    assert [int(w) for w in work] == [0, 0, 0]


#: Work after one and after two updates: (grad_evals, fun_evals, curvature_products)
#: beyond the runner's gradient, with the default settings.
EXPECTED_WORK = {
    "adahessian": [(0, 0, 1), (0, 0, 2)],  # one Hutchinson product per update
    "sophia_h": [(0, 0, 1), (0, 0, 1)],  # re-estimated every 10 updates
    "sophia_g": [(1, 0, 0), (1, 0, 0)],  # one sampled-target gradient, every 10
    "sdlm": [(1, 0, 0), (2, 0, 0)],  # one sampled-target gradient per update
}
DIAGONAL_RECORDS = {
    "adahessian": {"estimated", "curvature_mean"},
    "sdlm": {"estimated", "curvature_mean"},
    "sophia_h": {"estimated", "curvature_mean", "clip"},
    "sophia_g": {"estimated", "curvature_mean", "clip"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_WORK))
def test_diagonal_methods_count_their_estimates(name):
    _, params, batch = _problem()
    init, step, values = _compiled(name)
    state = init(params)
    for expected, i in zip(EXPECTED_WORK[name], range(2), strict=True):
        params, state, _ = step(params, state, batch, jax.random.PRNGKey(i), values)
        assert tuple(int(w) for w in collect_work(state)) == expected
        records = collect_records(state)
        assert set(records) == DIAGONAL_RECORDS[name]
        assert bool(records["estimated"]) == (i == 0 or name in ("adahessian", "sdlm"))


def test_hessian_free_counts_cg_products_and_evaluations():
    from optimizers.base import gradient_equivalents

    _, params, batch = _problem()
    init, step, values = _compiled("hf")
    state = init(params)
    for i in range(2):
        before = collect_work(state)
        params, state, _ = step(params, state, batch, jax.random.PRNGKey(i), values)
        work = collect_work(state)
        records = collect_records(state)
        grads, funs, products = (
            int(a) - int(b) for a, b in zip(work, before, strict=True)
        )
        # One curvature product per CG iteration, one for the initial residual
        # b - A x0 of the warm start and one for the model decrease q(step).
        assert products == int(records["cg_iters"]) + 2 == int(records["cg_products"])
        assert 1 <= int(records["cg_iters"]) <= 250
        assert grads == 0  # no preconditioner by default
        assert funs >= 1  # at least the loss at the chosen step
        # The recorded cost of the update, the runner's gradient included.
        size = batch.inputs.shape[1]
        expected = gradient_equivalents(1 + grads, funs, products, size, size)
        np.testing.assert_allclose(records["grad_equivalents"], expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["lbfgs", "nonlinear_cg", "levenberg_marquardt"])
def test_quasi_newton_methods_count_their_evaluations(name):
    _, params, batch = _problem()
    init, step, values = _compiled(name)
    state = init(params)
    params, state, _ = step(params, state, batch, jax.random.PRNGKey(0), values)
    grads, funs, products = (int(w) for w in collect_work(state))
    assert min(grads, funs, products) >= 0
    # Every method evaluates the objective somewhere beyond the runner's gradient.
    assert grads + funs + products >= 1
    if name == "levenberg_marquardt":
        assert products >= 1  # Gauss-Newton products inside its CG solve


def test_sgd_update_is_minus_learning_rate_times_gradient():
    task, params, batch = _problem()
    loss, grads, states, state_grads = jax.jit(loss_grads_and_states, static_argnums=0)(
        task, params, batch
    )
    objective = Objective(task, batch, batch, loss, grads, states, state_grads)
    opt = make_optimizer("sgd", learning_rate=0.3)
    updates, _ = opt.update(grads, opt.init(params), params, objective=objective)
    for k in params:
        np.testing.assert_allclose(updates[k], -0.3 * np.asarray(grads[k]), rtol=1e-6)


def _algorithm1(tree, threshold):
    leaves = {k: np.asarray(v, np.float64) for k, v in tree.items()}
    norm = np.sqrt(sum(np.sum(v**2) for v in leaves.values()))
    scale = threshold / norm if norm >= threshold else 1.0
    return {k: v * scale for k, v in leaves.items()}


def test_sgd_cr_composes_regularizer_clip_momentum_and_step():
    # Pascanu et al.: g + w dOmega/dW_rec, clipped (Algorithm 1), then the momentum
    # trace and the learning rate: u_t = -lr (c_t + m c_{t-1}) for two steps.
    lr, m, w, threshold = 0.1, 0.5, 3.0, 0.3
    task, params, batch = _problem()
    lgs = jax.jit(loss_grads_and_states, static_argnums=0)
    loss, grads, states, state_grads = lgs(task, params, batch)
    objective = Objective(task, batch, batch, loss, grads, states, state_grads)
    _, omega_grads = omega_gradient(task, params, states, state_grads, batch.inputs)
    opt = make_optimizer(
        "sgd_cr", learning_rate=lr, momentum=m, reg_weight=w, threshold=threshold
    )
    step = jax.jit(lambda g, s: opt.update(g, s, params, objective=objective))
    state = opt.init(params)
    clipped = []
    for factor in (1.0, 3.0):
        incoming = {k: factor * g for k, g in grads.items()}
        updates, state = step(incoming, state)
        regularized = {
            k: np.asarray(incoming[k]) + w * np.asarray(omega_grads[k]) for k in params
        }
        clipped.append(_algorithm1(regularized, threshold))
        for k in params:
            trace = clipped[-1][k] + (m * clipped[0][k] if len(clipped) == 2 else 0)
            np.testing.assert_allclose(updates[k], -lr * trace, rtol=2e-5, atol=1e-8)
        assert bool(collect_records(state)["clip"])


# Registry.


def test_registry_names():
    assert {"sgd", "sgd_clip", "sgd_cr"} <= set(OPTIMIZERS)


def test_check_optimizer_fills_defaults():
    # Pascanu et al. (2013): learning rate 0.01, threshold 1, regularizer weight 4.
    full = check_optimizer("sgd_cr", {"threshold": 2})
    assert full["learning_rate"] == 0.01
    assert full["threshold"] == 2.0 and isinstance(full["threshold"], float)
    assert full["reg_weight"] == 4.0
    assert full["clip"] == "global" and full["nonfinite"] == "shrink"
    assert full["momentum"] == 0.0 and full["nesterov"] is False


def test_check_optimizer_rejects_unknown_name():
    with pytest.raises(ConfigError, match="unknown optimizer 'sgdd'") as err:
        check_optimizer("sgdd", {})
    for name in ("sgd", "sgd_clip", "sgd_cr"):
        assert name in str(err.value)


def test_check_optimizer_rejects_misspelled_hyperparameter():
    with pytest.raises(ConfigError, match="'learning_rte'") as err:
        check_optimizer("sgd_clip", {"learning_rte": 0.1})
    message = str(err.value)
    for valid in ("learning_rate", "threshold", "momentum", "clip"):
        assert valid in message


@pytest.mark.parametrize(
    ("name", "hparams", "field"),
    [
        ("sgd", {"learning_rate": -0.1}, "learning_rate"),
        ("sgd", {"learning_rate": 0.0}, "learning_rate"),
        ("sgd", {"momentum": 1.0}, "momentum"),
        ("sgd", {"momentum": -0.5}, "momentum"),
        ("sgd_clip", {"threshold": 0.0}, "threshold"),
        ("sgd_cr", {"reg_weight": -1.0}, "reg_weight"),
        ("sgd", {"shrink": -0.02}, "shrink"),
        ("sgd", {"learning_rate": float("nan")}, "learning_rate"),
    ],
)
def test_check_optimizer_rejects_out_of_range(name, hparams, field):
    with pytest.raises(ConfigError, match=f"'{field}'.*out of range"):
        check_optimizer(name, hparams)


def test_check_optimizer_accepts_boundary_values():
    assert check_optimizer("sgd", {"momentum": 0.99})["momentum"] == 0.99
    assert check_optimizer("sgd_cr", {"reg_weight": 0})["reg_weight"] == 0.0


@pytest.mark.parametrize(
    ("name", "hparams", "field", "choices"),
    [
        ("sgd_clip", {"clip": "foo"}, "clip", ("'global'", "'elementwise'")),
        ("sgd", {"nonfinite": "ignore"}, "nonfinite", ("'skip'", "'shrink'")),
    ],
)
def test_check_optimizer_rejects_bad_choices(name, hparams, field, choices):
    with pytest.raises(ConfigError, match=f"'{field}'") as err:
        check_optimizer(name, hparams)
    for choice in choices:
        assert choice in str(err.value)


@pytest.mark.parametrize(
    ("hparams", "field"),
    [({"nesterov": 1}, "nesterov"), ({"learning_rate": "0.1"}, "learning_rate")],
)
def test_check_optimizer_rejects_wrong_types(hparams, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        check_optimizer("sgd", hparams)


def test_make_optimizer_validates_before_building():
    with pytest.raises(ConfigError, match="'threshold'"):
        make_optimizer("sgd", threshold=1.0)


def test_traced_names():
    names = traced_names("sgd_clip")
    assert {"learning_rate", "threshold", "momentum", "shrink"} <= set(names)
    for static in ("clip", "nesterov", "adaptive", "nonfinite"):
        assert static not in names
    assert "reg_weight" in traced_names("sgd_cr")
    assert "threshold" not in traced_names("sgd")


def test_resolve_optimizer_by_import_path():
    assert resolve_optimizer("optax.adam") is optax.adam
    assert resolve_optimizer("optax:sgd") is optax.sgd
    opt = make_optimizer("optax.adam", learning_rate=0.1)
    params = {"w": jnp.ones(3)}
    updates, _ = opt.update(params, opt.init(params), params, objective=None)
    # Adam's first step is -lr * sign(g) (up to eps).
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3), rtol=1e-4)
    with pytest.raises(ConfigError, match="'learning_rte'"):
        check_optimizer("optax.adam", {"learning_rte": 0.1})


@pytest.mark.parametrize(
    "path",
    [
        "optax.nonexistent",
        "no_such_module_xyz.adam",
        "optax:nonexistent",
        ".adam",  # empty module name
        ":adam",
        "..adam",  # relative import
    ],
)
def test_resolve_optimizer_bad_import_path(path):
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_optimizer(path)
    with pytest.raises(ConfigError):
        make_optimizer(path)


def test_resolve_optimizer_user_module(tmp_path, monkeypatch):
    module = tmp_path / "user_opt_module_for_tests.py"
    module.write_text(
        textwrap.dedent(
            """
            import optax

            READY = optax.sgd(0.5)
            NOT_AN_OPTIMIZER = 3

            def factory(learning_rate: float = 0.25, decay: float = 0.0):
                return optax.sgd(learning_rate, momentum=decay or None)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    params = {"w": jnp.ones(2)}
    ready = make_optimizer("user_opt_module_for_tests:READY")
    updates, _ = ready.update(params, ready.init(params))
    np.testing.assert_allclose(updates["w"], [-0.5, -0.5])
    path = "user_opt_module_for_tests:factory"
    assert traced_names(path) == ("learning_rate", "decay")
    opt = make_optimizer(path)
    updates, _ = opt.update(params, opt.init(params))
    np.testing.assert_allclose(updates["w"], [-0.25, -0.25])
    with pytest.raises(ConfigError, match="neither a factory nor a transformation"):
        resolve_optimizer("user_opt_module_for_tests:NOT_AN_OPTIMIZER")


@pytest.fixture
def user_name():
    name = "test_user_sgd_registered"
    assert name not in OPTIMIZERS
    yield name
    OPTIMIZERS.pop(name, None)


def test_register_optimizer(user_name):
    def user_sgd(learning_rate: float = 0.5, nesterov: bool = False):
        return optax.sgd(learning_rate, nesterov=nesterov)

    assert register_optimizer(user_name, user_sgd) is user_sgd
    assert resolve_optimizer(user_name) is user_sgd
    assert check_optimizer(user_name, {}) == {"learning_rate": 0.5, "nesterov": False}
    assert traced_names(user_name) == ("learning_rate",)
    with pytest.raises(ConfigError, match="'lr'"):
        check_optimizer(user_name, {"lr": 0.1})
    opt = make_optimizer(user_name, learning_rate=2.0)
    params = {"w": jnp.array([1.0, -2.0])}
    updates, _ = opt.update(params, opt.init(params), params, objective=None)
    np.testing.assert_allclose(updates["w"], [-2.0, 4.0])
    with pytest.raises(ConfigError, match="already registered"):
        register_optimizer(user_name, user_sgd)
    other = lambda: optax.sgd(1.0)  # noqa: E731
    register_optimizer(user_name, other, overwrite=True)
    assert resolve_optimizer(user_name) is other
    # Unknown-name messages list the user optimizer too.
    with pytest.raises(ConfigError, match=user_name):
        check_optimizer("not_registered_anywhere", {})
