"""Curvature probes against dense float64 matrices, and probes during training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from problems import dense_gauss_newton, dense_hessian, dense_setup

from analysis import results as store
from analysis.probes import (
    SCALARS,
    VECTORS,
    ProbeConfig,
    default_top_k,
    make_probe,
    probe,
)
from runner.run import run
from runner.train import EXPLOSION_BETA, EXPLOSION_WARMUP
from tasks import Batch, Task, softmax_cross_entropy
from tasks.hparams import ConfigError


@pytest.mark.parametrize("name", ["softmax", "squared_error"])
def test_probe_matches_dense_hessian_and_gauss_newton(name):
    with jax.enable_x64(True):
        task, params, batch, _, n = dense_setup(name)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        flat, unravel = ravel_pytree(params)
        loss = lambda f: task.loss(unravel(f), batch)  # noqa: E731
        g = np.asarray(jax.jit(jax.grad(loss))(flat))
        hess = np.asarray(dense_hessian(task, params, batch))
        gn = np.asarray(dense_gauss_newton(task, params, batch))
        u = g / np.linalg.norm(g)
        k = 2
        config = ProbeConfig(lanczos_iters=n, top_k=k, fd_radius=1e-6)
        out = make_probe(task, config)(params, batch, jax.random.PRNGKey(0))
        out = {key: np.asarray(v) for key, v in out.items()}

        c_h, c_g = u @ hess @ u, u @ gn @ u
        np.testing.assert_allclose(out["grad_norm"], np.linalg.norm(g), rtol=1e-10)
        np.testing.assert_allclose(out["curv_hessian"], c_h, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(out["curv_gn"], c_g, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(out["newton_gn"], np.linalg.norm(g) / c_g)
        np.testing.assert_allclose(out["ratio_hessian"], c_h / np.linalg.norm(g))

        vals, vecs = np.linalg.eigh(hess)
        top = vecs[:, ::-1][:, :k]
        np.testing.assert_allclose(out["top_eigenvalues"], vals[::-1][:k], rtol=1e-6)
        np.testing.assert_allclose(out["top_eigenvalue"], vals[-1], rtol=1e-6)
        np.testing.assert_allclose(out["cos_top"], abs(u @ top[:, 0]), atol=1e-6)
        np.testing.assert_allclose(
            out["topk_fraction"], np.sum((top.T @ u) ** 2), atol=1e-6
        )
        # Finite differences over a tiny step: ||H u||.
        np.testing.assert_allclose(
            out["smoothness"], np.linalg.norm(hess @ u), rtol=1e-4
        )
        radius = np.abs(np.linalg.eigvals(np.asarray(params["W_rec"]))).max()
        np.testing.assert_allclose(out["spectral_radius"], radius, rtol=1e-5)
        # The Ritz weights are a probability vector over the Ritz values.
        np.testing.assert_allclose(out["ritz_weights"].sum(), 1.0, rtol=1e-8)
        assert out["ritz_values"].shape == (n,)


def test_probe_vmaps_and_keys_are_deterministic():
    task, params, batch, _, _ = dense_setup("softmax")
    config = ProbeConfig(lanczos_iters=6)
    fn = make_probe(task, config)
    a = fn(params, batch, jax.random.PRNGKey(3))
    b = fn(params, batch, jax.random.PRNGKey(3))
    for key in (*SCALARS, *VECTORS):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    stacked = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params)
    one = lambda p: probe(task, p, batch, jax.random.PRNGKey(3), config)  # noqa: E731
    many = jax.jit(jax.vmap(one))(stacked)
    np.testing.assert_allclose(many["grad_norm"][0], a["grad_norm"], rtol=1e-5)
    assert many["top_eigenvalues"].shape == (2, task.n_out)


class _ThreeClasses(Task):
    """A user task with 3 output classes that does not declare ``n_out``."""

    name = "three_classes"
    output_loss = softmax_cross_entropy
    batch_size = 6

    def init(self, key):
        k1, k2 = jax.random.split(key)
        return {
            "W1": jax.random.normal(k1, (2, 3)),
            "W2": jax.random.normal(k2, (3, 3)),
        }

    def sample_batch(self, key, batch_size=None):
        size = batch_size or self.batch_size
        k_u, k_y = jax.random.split(key)
        return Batch(
            jax.random.normal(k_u, (1, size, 2)),
            jax.random.randint(k_y, (1, size), 0, 3),
            jnp.ones((1, size)),
            jnp.ones((size,), jnp.int32),
        )

    def apply(self, params, inputs, state_offset=None):
        hidden = jnp.tanh(inputs @ params["W1"])
        if state_offset is not None:
            hidden = hidden + state_offset
        return hidden @ params["W2"], hidden


class _ThreeClassesDeclared(_ThreeClasses):
    n_out = 3


@pytest.mark.parametrize("cls", [_ThreeClasses, _ThreeClassesDeclared])
def test_probe_top_k_defaults_to_the_tasks_three_classes(cls):
    with jax.enable_x64(True):
        task = cls()
        assert task.n_out == 3 and default_top_k(task) == 3
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64), jax.jit(task.init)(jax.random.PRNGKey(0))
        )
        batch = jax.jit(task.sample_batch)(jax.random.PRNGKey(1))
        batch = batch._replace(inputs=batch.inputs.astype(jnp.float64))
        flat, unravel = ravel_pytree(params)
        loss = lambda f: task.loss(unravel(f), batch)  # noqa: E731
        g = np.asarray(jax.jit(jax.grad(loss))(flat))
        vals, vecs = np.linalg.eigh(np.asarray(dense_hessian(task, params, batch)))
        top = vecs[:, ::-1][:, :3]  # Gur-Ari et al.'s top eigenspace, k = 3 classes
        config = ProbeConfig(lanczos_iters=flat.shape[0])  # top_k: the task's n_out
        out = make_probe(task, config)(params, batch, jax.random.PRNGKey(0))
        assert out["top_eigenvalues"].shape == (3,)
        np.testing.assert_allclose(out["top_eigenvalues"], vals[::-1][:3], rtol=1e-6)
        u = g / np.linalg.norm(g)
        np.testing.assert_allclose(
            out["topk_fraction"], np.sum((top.T @ u) ** 2), atol=1e-6
        )
        # No recurrent matrix: no spectral radius.
        assert np.isnan(float(out["spectral_radius"]))


@pytest.mark.parametrize(
    "config, field",
    [
        (ProbeConfig(lanczos_iters=1), "lanczos_iters"),
        (ProbeConfig(lanczos_iters=5, top_k=6), "top_k"),
        (ProbeConfig(fd_radius=0.0), "fd_radius"),
    ],
)
def test_bad_probe_config_names_the_field(config, field):
    task = dense_setup("softmax")[0]
    with pytest.raises(ConfigError, match=field):
        make_probe(task, config)


TINY = {"length": 12, "hidden": 6, "batch_size": 8}


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probed")
    result = run(
        "temporal_order", "sgd", seeds=2, steps=120, eval_every=20, eval_size=50,
        # basic_tanh (spectral radius above 1) with a large step explodes repeatedly.
        task_hparams={**TINY, "init": "basic_tanh"}, opt_hparams={"learning_rate": 3.0},
        probe_every=40,
        probe_events=2, explosion_factor=2.0, lanczos_iters=8, out=out,
    )  # fmt: skip
    return result


@pytest.mark.slow
def test_periodic_probes_at_start_and_every_interval(probed_run):
    probes = store.load_probes(probed_run.path.parent)
    periodic = probes[probes["kind"] == "periodic"]
    assert sorted(periodic["step"].unique()) == [0, 40, 80, 120]
    assert set(periodic["seed"]) == {0, 1}
    assert probes["optimizer"].eq("sgd").all()
    assert {"top_eigenvalue", "curv_gn", "ritz_values"} <= set(probes.columns)
    assert len(probes) == len(probed_run.probes)
    payload = store.read_run(probed_run.path)
    assert payload["probe_seconds"] > 0
    assert payload["config"]["probe_every"] == 40


@pytest.mark.slow
def test_explosions_are_flagged_against_the_running_average(probed_run):
    steps = store.load_steps(probed_run.path)
    for _, trace in steps.groupby("seed"):
        norms = trace["grad_norm"].to_numpy()
        live = trace["live"].to_numpy()
        avg, seen, expected = 0.0, 0, []
        for norm, on in zip(norms, live, strict=True):
            fired = on and seen >= EXPLOSION_WARMUP and norm > 2.0 * avg
            expected.append(fired)
            if on and np.isfinite(norm):
                avg = (
                    norm
                    if seen == 0
                    else EXPLOSION_BETA * avg + (1 - EXPLOSION_BETA) * norm
                )
                seen += 1
        np.testing.assert_array_equal(trace["explosion"].to_numpy(), expected)
    assert steps["explosion"].any(), "the large learning rate should explode"


@pytest.mark.slow
def test_explosion_probes_are_taken_where_the_gradient_exploded(probed_run):
    probes = probed_run.probes
    events = probes[probes["kind"] == "explosion"]
    assert not events.empty
    steps = store.load_steps(probed_run.path).set_index(["seed", "step"])
    for row in events.itertuples():
        assert steps.loc[(row.seed, row.step), "explosion"]
        # Same parameters and the same batch: the same gradient norm.
        traced = steps.loc[(row.seed, row.step), "grad_norm"]
        np.testing.assert_allclose(row.grad_norm, traced, rtol=1e-4)
    # At most probe_events per seed between two periodic probes (every 40 steps).
    interval = events["step"] // 40
    assert events.groupby([events["seed"], interval]).size().max() <= 2


@pytest.mark.slow
def test_probe_arguments_are_checked_before_compiling():
    with pytest.raises(ConfigError, match="probe_every"):
        run("temporal_order", "sgd", seeds=1, steps=10, eval_every=10,
            task_hparams=TINY, probe_every=15)  # fmt: skip
    with pytest.raises(ConfigError, match="explosion_factor"):
        run("temporal_order", "sgd", seeds=1, steps=10, eval_every=10,
            task_hparams=TINY, explosion_factor=0.5)  # fmt: skip
    with pytest.raises(ConfigError, match="record_params"):
        run("temporal_order", "sgd", seeds=1, steps=10, eval_every=10,
            task_hparams=TINY, record_params=True)  # fmt: skip


@pytest.mark.slow
def test_record_params_gives_the_wall_trajectory(tmp_path):
    result = run(
        "wall", "sgd", seeds=1, steps=5, eval_every=5, out=tmp_path,
        task_hparams={"init_noise": 0.0}, opt_hparams={"learning_rate": 0.1},
        record_params=True,
    )  # fmt: skip
    steps = store.load_steps(result.path)
    assert steps.loc[0, "param_w"] == pytest.approx(6.0)
    assert steps.loc[0, "param_b"] == pytest.approx(-3.0)
    # Each recorded point is the previous one minus lr * gradient (plain SGD).
    task_grad = jax.grad(
        lambda w, b: (jax.nn.sigmoid(_wall_x(w, b)) - 0.7) ** 2, argnums=(0, 1)
    )
    gw, gb = task_grad(6.0, -3.0)
    assert steps.loc[1, "param_w"] == pytest.approx(6.0 - 0.1 * float(gw), rel=1e-5)
    assert steps.loc[1, "param_b"] == pytest.approx(-3.0 - 0.1 * float(gb), rel=1e-5)


def _wall_x(w, b, n=50):
    x = 0.5
    for _ in range(n):
        x = w * jax.nn.sigmoid(x) + b
    return x
