"""Batched grids: grid points x seeds in one program, each written as its own run."""

import numpy as np
import pytest
from runs import assert_same_run

from analysis import results as store
from runner import run as run_module
from runner.batching import batch_groups
from runner.compare import compare
from runner.config import parse_comparison


def _comparison(**extra):
    data = {
        "name": "grid", "seeds": 2, "steps": 60, "eval_every": 20, "eval_size": 64,
        "task": [{"name": "addition", "length": 10, "hidden": 6, "batch_size": 8}],
        "optimizer": [
            {"name": "sgd", "label": "SGD",
             "grid": {"learning_rate": [0.05, 0.2, 1e4]}},
            {"name": "adahessian", "every": 1},
        ],
        **extra,
    }  # fmt: skip
    return parse_comparison(data)


def test_only_runs_differing_in_traced_values_batch():
    comparison = _comparison()
    assert batch_groups(comparison.runs, enabled=False) == [(0,), (1,), (2,), (3,)]
    assert batch_groups(comparison.runs, enabled=True) == [(0, 1, 2), (3,)]
    # A static hyperparameter (every, an int) never batches.
    other = _comparison(optimizer=[{"name": "adahessian", "grid": {"every": [1, 2]}}])
    assert batch_groups(other.runs, enabled=True) == [(0,), (1,)]


@pytest.mark.slow
def test_batched_grid_writes_the_runs_it_would_write_alone(tmp_path):
    sgd_grid = {"name": "sgd", "label": "SGD",
                "grid": {"learning_rate": [0.05, 0.2, 1e4]}}  # fmt: skip
    comparison = _comparison(
        checkpoint_every=20, probe_every=40, lanczos_iters=3, optimizer=[sgd_grid]
    )
    alone = compare(comparison, tmp_path / "alone", False, "serial", batch_grid=False)
    programs = set(run_module._PROGRAMS)
    batched = compare(
        comparison, tmp_path / "batched", False, "serial", batch_grid=True
    )
    # The three grid points share one new program.
    new = [key for key in run_module._PROGRAMS if key not in programs]
    assert len(new) == 1 and new[0][-1] is True  # per-seed hyperparameters
    assert not alone.failures and not batched.failures
    assert [r.path.name for r in alone.results] == [
        r.path.name for r in batched.results
    ]
    for a, b in zip(alone.results, batched.results, strict=True):
        assert_same_run(a.path, b.path)
        steps = store.checkpoint_steps(a.path)
        assert steps == store.checkpoint_steps(b.path) and steps
        for step in steps:
            ckpt_a = store.load_params(a.path, step)
            ckpt_b = store.load_params(b.path, step)
            for name, value in ckpt_a.items():
                np.testing.assert_array_equal(value, ckpt_b[name])
    statuses = set(batched.results[2].summary["status"])
    assert statuses == {"diverged"}  # lr 1e4: its traces stop where it did alone
    assert store.checkpoint_steps(batched.results[2].path) == [20]
    assert not list((tmp_path / "batched").glob(".batch-*"))


@pytest.mark.slow
def test_batched_grid_with_a_work_budget_matches_the_runs_alone(tmp_path):
    # HF's damping is traced and changes its CG iterations, so the grid points
    # spend the budget at different chunks: each must stop where it stops alone,
    # with the same records and traces. (Vmapped over per-seed damping, HF's floats
    # can differ from the run alone in the last bits, so shapes and steps are
    # compared here, not values.)
    comparison = parse_comparison(
        {
            "name": "budget", "seeds": 2, "steps": 40, "eval_every": 5,
            "eval_size": 64, "work_budget": 120.0,
            "task": [{"name": "addition", "length": 10, "hidden": 6,
                      "batch_size": 8}],
            "optimizer": [{"name": "hf", "max_cg_iters": 10, "backtrack": False,
                           "line_search": False,
                           "grid": {"damping": [0.01, 1000.0]}}],
        }
    )  # fmt: skip
    alone = compare(comparison, tmp_path / "alone", False, "serial", batch_grid=False)
    batched = compare(
        comparison, tmp_path / "batched", False, "serial", batch_grid=True
    )
    updates = [sorted(r.summary["updates"]) for r in alone.results]
    assert updates[0] != updates[1]  # the budget ends them at different steps
    for a, b in zip(alone.results, batched.results, strict=True):
        assert a.summary["updates"].tolist() == b.summary["updates"].tolist()
        assert a.records[["seed", "step"]].equals(b.records[["seed", "step"]])
        traces_a, traces_b = store.load_steps(a.path), store.load_steps(b.path)
        assert traces_a.shape == traces_b.shape
