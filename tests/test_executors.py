"""Executors: the same run files whatever runs them; a dying worker costs one run."""

import os
import pickle

import pytest
from runs import assert_same_run

from runner.compare import compare, largest_first
from runner.config import parse_comparison
from runner.executors import (
    ExecutorConfig,
    default_cache_dir,
    local_cluster,
    slurm_executor,
)
from runner.worker import ONE_THREAD, one_thread_flags, with_xla_flag
from tasks import ConfigError

CACHE = default_cache_dir()  # the suite's cache (conftest sets CURVBENCH_CACHE)


def _comparison(**extra):
    data = {
        "name": "tiny", "seeds": 2, "steps": 40, "eval_every": 20, "eval_size": 64,
        "task": [{"name": "addition", "length": 10, "hidden": 6, "batch_size": 8}],
        "optimizer": [
            {"name": "sgd_clip", "learning_rate": 0.05},
            {"name": "adahessian", "every": 1},
        ],
        **extra,
    }  # fmt: skip
    return parse_comparison(data)


@pytest.mark.parametrize(
    "text, kind, workers, address",
    [
        ("serial", "serial", None, None),
        ("local", "local", None, None),
        ("local:3", "local", 3, None),
        ("dask", "dask", None, None),
        ("dask:tcp://10.0.0.1:8786", "dask", None, "tcp://10.0.0.1:8786"),
        ("slurm:8", "slurm", 8, None),
    ],
)
def test_executor_strings(text, kind, workers, address):
    spec = ExecutorConfig.parse(text)
    assert (spec.kind, spec.workers, spec.address) == (kind, workers, address)


@pytest.mark.parametrize(
    "value, field",
    [
        ("gpu", "gpu"),
        ("local:0", "local:0"),
        ("local:two", "local:two"),
        ("serial:2", "serial:2"),
        ({"kind": "local", "workers": "2"}, "workers"),
        ({"kind": "local", "cores": 2}, "cores"),
        ({"kind": "slurm", "mem_gb": -1}, "mem_gb"),
        ({"kind": "local", "address": "tcp://x"}, "address"),
        (3, "3"),
    ],
)
def test_bad_executors_name_the_field(value, field):
    with pytest.raises(ConfigError, match=field):
        ExecutorConfig.parse(value)


def test_executor_table_in_a_comparison_file():
    comparison = _comparison(executor={"kind": "local", "workers": 2, "retries": 0})
    assert comparison.executor == ExecutorConfig("local", workers=2, retries=0)
    with pytest.raises(ConfigError, match="kind"):
        _comparison(executor={"kind": "cloud"})


@pytest.mark.slow
def test_same_run_files_whatever_the_executor(tmp_path):
    comparison = _comparison()
    outcomes = {}
    for name, executor in {
        "serial": ExecutorConfig("serial", cache_dir=CACHE),
        "local1": ExecutorConfig("local", workers=1, cache_dir=CACHE),
        "local2": ExecutorConfig("local", workers=2, cache_dir=CACHE),
        "dask": ExecutorConfig("dask", workers=2, cache_dir=CACHE),
    }.items():
        outcome = compare(comparison, tmp_path / name, False, executor)
        assert not outcome.failures, outcome.failures
        assert [r.config["label"] for r in outcome.results] == [
            "sgd_clip",
            "adahessian",
        ]
        outcomes[name] = outcome
    for outcome in outcomes.values():
        for a, b in zip(outcomes["local1"].results, outcome.results, strict=True):
            assert_same_run(a.path, b.path)


def _worker_settings(dask_worker) -> dict:
    callbacks = dask_worker.periodic_callbacks
    return {
        "profiler": "profile" in callbacks,
        "tick_ms": callbacks["tick"].callback_time,
        "memory_monitor_ms": callbacks["memory_monitor"].callback_time,
        "threads": dask_worker.state.nthreads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


@pytest.mark.slow
def test_the_local_dask_cluster_leaves_the_gil_to_training():
    distributed = pytest.importorskip("distributed")
    cluster = local_cluster(1)
    try:
        with distributed.Client(cluster) as client:
            (seen,) = client.run(_worker_settings).values()
    finally:
        cluster.close()
    # Dask's defaults: a profiler every 10 ms, a tick every 20 ms, memory every 100.
    assert seen["profiler"] is False
    assert seen["tick_ms"] == 1000
    assert seen["memory_monitor_ms"] == 1000
    assert seen["threads"] == 1
    assert ONE_THREAD in seen["xla_flags"].split()


@pytest.mark.slow
def test_a_dying_worker_costs_only_its_run(tmp_path):
    comparison = _comparison(
        optimizer=[
            {"name": "sgd_clip", "learning_rate": 0.05},
            {"name": "killer_plugin:dies_in_worker", "label": "killer"},
        ]
    )
    executor = ExecutorConfig("local", workers=2, retries=1, cache_dir=CACHE)
    outcome = compare(comparison, tmp_path, False, executor)
    assert [r.config["label"] for r in outcome.results] == ["sgd_clip"]
    (failure,) = outcome.failures
    assert failure.label == "killer"
    assert "died 2 times" in failure.error


def test_unpicklable_run_is_refused_before_any_work(tmp_path):
    import optax

    from runner.config import Comparison, run_config

    config = run_config(
        "addition", optax.sgd(0.1), label="inline", seeds=1, steps=10, eval_every=10,
        task_hparams={"length": 10, "hidden": 4},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="serial"):
        compare(Comparison("x", (config,)), tmp_path, False, "local:1")
    assert not list(tmp_path.glob("*.json"))


def test_slurm_job_script_has_the_settings(tmp_path, monkeypatch):
    # submitit looks for srun on the PATH before it writes a SLURM job script.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    spec = ExecutorConfig(
        "slurm", workers=4, partition="long", time_minutes=90, mem_gb=6, gpus=1
    )
    submitter = slurm_executor(spec, tmp_path, cluster="slurm")
    script = submitter._executor._make_submission_file_text("python -c pass", "0")
    for line in ("--partition=long", "--time=90", "--mem=6GB", "--gpus-per-node=1",
                 "--cpus-per-task=1"):  # fmt: skip
        assert line in script, script
    assert submitter._executor.parameters.get("array_parallelism") == 4


@pytest.mark.slow
def test_slurm_path_trains_with_submitits_local_executor(tmp_path):
    from runner.executors import _slurm
    from runner.worker import WorkerSetup

    comparison = _comparison()
    jobs = [((i,), pickle.dumps([run])) for i, run in enumerate(comparison.runs)]
    spec = ExecutorConfig("slurm", time_minutes=10, cache_dir=CACHE)
    setup = WorkerSetup(CACHE, True, (), os.getcwd())
    done = []
    _slurm(spec, setup, jobs, tmp_path / "slurm", lambda i: None, done.append,
           cluster="local")  # fmt: skip
    assert sorted(o.index for o in done) == [0, 1]
    assert all(o.error is None for o in done), done
    reference = compare(comparison, tmp_path / "serial", False, "serial")
    for result in reference.results:
        assert_same_run(result.path, tmp_path / "slurm" / result.path.name)


def test_worker_flags_add_one_thread_once():
    # JAX keys its persistent compilation cache by the XLA flags: a worker whose
    # flags repeat ONE_THREAD would compile every program its parent compiled.
    flags = one_thread_flags("--xla_backend_optimization_level=0")
    assert flags.split().count(ONE_THREAD) == 1
    assert one_thread_flags(flags) == flags
    assert one_thread_flags("") == ONE_THREAD
    # Whole flags are compared, not substrings.
    assert with_xla_flag("--a=10", "--a=1") == "--a=10 --a=1"
    # XLA stops reading XLA_FLAGS at the first token that is not a flag.
    assert all(token.startswith("--") for token in ONE_THREAD.split())


def test_pools_start_the_largest_runs_first():
    comparison = _comparison(
        task=[{"name": "addition", "hidden": 6, "batch_size": 8,
               "grid": {"length": [10, 30, 20]}}],
    )  # fmt: skip
    runs = comparison.runs
    lengths = [r.task_hparams["length"] for r in runs]
    order = largest_first(runs, [(i,) for i in range(len(runs))])
    assert [lengths[i] for (i,) in order] == sorted(lengths, reverse=True)
    # Equal sizes keep the comparison's order (sgd_clip before adahessian).
    labels = [runs[i].label for (i,) in order]
    assert labels[:2] == ["sgd_clip", "adahessian"]
    # A batch weighs as much as its members together.
    assert largest_first(runs, [(0,), (2, 4)])[0] == (2, 4)
