"""Run configurations: validation before compiling, run ids, plug-ins, failures.

Each test here is a regression test for a defect found by trying the toolkit as a new
user would (malformed comparison files and command lines, user tasks and plug-ins).
"""

from __future__ import annotations

import uuid

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from analysis import results
from runner import loop
from runner.cli import main
from runner.compare import compare
from runner.config import parse_comparison, read_comparison, run_config
from runner.options import MAX_SEEDS, option_specs
from runner.run import run
from tasks import ConfigError, register_task
from tasks.registry import TASKS, make_task

TINY_TASK = {"name": "addition", "length": 10, "hidden": 6, "batch_size": 8}
SMALL = {"seeds": 2, "steps": 20, "eval_every": 10, "eval_size": 16}


def _comparison(**top):
    """A valid comparison dict with ``top`` merged in (``None`` removes a key)."""
    data = {
        "name": "c",
        **SMALL,
        "task": [dict(TINY_TASK)],
        "optimizer": [{"name": "sgd_clip", "label": "SGD-C"}],
    }
    data.update(top)
    return {k: v for k, v in data.items() if v is not None}


def _module(folder, source: str) -> str:
    """Write a uniquely named module into ``folder``; its name."""
    name = f"plugin_{uuid.uuid4().hex[:10]}"
    (folder / f"{name}.py").write_text(source)
    return name


# ------------------------------------------------------------------ one list of options
def test_every_option_reaches_toml_cli_and_python():
    from runner.cli import build_parser

    flags = {
        a.dest
        for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
    }
    assert set(option_specs()) <= flags
    config = parse_comparison(_comparison(lanczos_iters=7, probe_every=10))
    assert config.runs[0].options.lanczos_iters == 7


# --------------------------------------------------------------------- bad input
BAD_COMPARISONS = [
    ({"name": 5}, "'name' = 5 must be a string"),
    ({"out": True}, "'out' = True must be a string"),
    ({"name": "../../y"}, "must be a plain name"),
    ({"seeds": ["a"]}, "'seeds': 'a' is not a seed"),
    ({"seeds": [1.5]}, "'seeds': 1.5 is not a seed"),
    ({"seeds": [True, False]}, "'seeds': True is not a seed"),
    ({"seeds": 1_000_000_000}, f"must be in \\[1, {MAX_SEEDS}\\]"),
    ({"seeds": [0, 0]}, "must be distinct"),
    ({"steps": 2_147_483_648}, "'steps' = 2147483648 is out of range"),
    ({"steps": 0}, "'steps' = 0 is out of range"),
    ({"eval_size": 10**30}, "'eval_size' = 10+ is out of range"),
    ({"curvature_batch_size": 0}, "'curvature_batch_size' = 0 is out of range"),
    ({"curvature_batch_size": -1}, "'curvature_batch_size' = -1 is out of range"),
    ({"explosion_factor": float("nan")}, "'explosion_factor' = nan is out of range"),
    ({"probe_events": -1}, "'probe_events' = -1 is out of range"),
    ({"lanczos_iters": -3}, "'lanczos_iters' = -3 is out of range"),
    ({"probe_every": 15}, "'probe_every' = 15 must be a multiple of 'eval_every'"),
    ({"record_steps": 1}, "'record_steps' = 1 must be true or false"),
    ({"task": 5}, "'task' must be \\[\\[task\\]\\] tables"),
    ({"task": [{"name": 5}]}, "'name' = 5 must be a string"),
    (
        {"task": [{**TINY_TASK, "grid": {"name": ["xor", "addition"]}}]},
        "'name' cannot be swept",
    ),
    ({"task": [{**TINY_TASK, "hidden": 10**30}]}, "the run needs about .* GiB"),
    (
        {"optimizer": [{"name": "sgd", "label": 5}]},
        "'label' = 5 must be a string",
    ),
    (
        {"optimizer": [{"name": "sgd", "task": {"name": "xor"}}]},
        "cannot change the task name",
    ),
    (
        {"optimizer": [{"name": "sgd", "grid": {"label": ["a", "b"]}}]},
        "'label' cannot be swept",
    ),
    (
        # The second optimizer's run is invalid: nothing of the file may train.
        {"optimizer": [{"name": "sgd"}, {"name": "sgd_clip", "steps": 0}]},
        "optimizer 'sgd_clip' on task 'addition': run option 'steps' = 0",
    ),
]


@pytest.mark.parametrize("top, message", BAD_COMPARISONS)
def test_bad_comparison_is_one_clear_error_before_compiling(
    top, message, count_compiles
):
    with count_compiles() as compiles, pytest.raises(ConfigError, match=message):
        parse_comparison(_comparison(**top))
    assert compiles.count == 0


def test_memory_estimate_refuses_a_run_that_cannot_fit(count_compiles):
    with count_compiles() as compiles, pytest.raises(ConfigError, match="GiB"):
        run_config(
            "addition", "sgd", task_hparams={"hidden": 1_000_000}, seeds=5, steps=10
        )
    assert compiles.count == 0
    # A long run's per-step traces count too (record_steps keeps them on the host).
    with pytest.raises(ConfigError, match="record_steps"):
        run_config("addition", "sgd", seeds=4096, steps=10**9, eval_every=1000)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["growth", "--task", "addition", "--lengths", "10,20"], "at least 3 lengths"),
        (["growth", "--task", "addition", "--radii", "1,2"], "at least 3 radii"),
        (["report", "{tmp}/missing"], "does not exist"),
        (["report", "{tmp}"], "no run or growth files"),
        (["plot", "training", "{tmp}"], "no run or growth files"),
        (["show", "{tmp}"], "no run or growth files"),
        (["run", "--task", "addition", "--optimizer", "sgd", "--steps", "0"], "steps"),
        (
            ["run", "--task", "addition", "--optimizer", "sgd", "--seeds", "[1.5]"],
            "'seeds': 1.5",
        ),
        (
            ["run", "--task", "addition", "--optimizer", "sgd", "-t", "name=xor"],
            "cannot set 'name'",
        ),
    ],
)
def test_cli_bad_input_one_line_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvbench: error:"), err
    assert message in err


@pytest.mark.parametrize("radius", ["-1", "nan", "inf"])
def test_growth_radius_must_be_positive(radius, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["growth", "--task", "addition", "--lengths", "5,6,7", "--radius", radius])
    assert exit_.value.code == 2
    assert "--radius" in capsys.readouterr().err


def test_comparison_file_not_utf8_and_out_a_file(tmp_path, capsys):
    file = tmp_path / "latin.toml"
    file.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert main(["compare", str(file)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text('[[task]]\nname = "wall"\n[[optimizer]]\nname = "sgd"\n')
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main(["compare", str(good), "--out", str(taken)]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "source, message",
    [
        ("def broken(:\n", "SyntaxError"),
        ("raise RuntimeError('at import')\n", "RuntimeError: at import"),
        ("x = 1\n", "has no attribute 'factory'"),
    ],
)
def test_broken_plugin_module_is_a_config_error(tmp_path, source, message):
    name = _module(tmp_path, source)
    file = tmp_path / "c.toml"
    file.write_text(
        f'[[task]]\nname = "wall"\n[[optimizer]]\nname = "{name}:factory"\n'
    )
    with pytest.raises(ConfigError, match=message):
        read_comparison(file)


# ------------------------------------------------------------------- plug-ins
PLUGIN_TASK = """
from typing import Annotated
from tasks import Range, make_task

def tiny_xor(length: Annotated[int, Range(10, 100)] = 10, hidden: int = 4):
    '''A small xor task built from the registered one.'''
    return make_task("xor", length=length, hidden=hidden, batch_size=4)
"""

PLUGIN_OPTIMIZER = """
import optax

def plain(learning_rate: float = 0.01):
    return optax.sgd(learning_rate)
"""


@pytest.mark.slow
def test_plugins_next_to_the_comparison_file(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    folder.mkdir()
    task_module = _module(folder, PLUGIN_TASK)
    opt_module = _module(folder, PLUGIN_OPTIMIZER)
    file = folder / "c.toml"
    file.write_text(
        f"seeds = 1\nsteps = 10\neval_every = 10\neval_size = 8\n"
        f'[[task]]\nname = "{task_module}:tiny_xor"\ngrid = {{ length = [10, 12] }}\n'
        f'[[optimizer]]\nname = "{opt_module}:plain"\nlearning_rate = 0.1\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the cwd nor sys.path holds the modules
    comparison = read_comparison(file)
    assert [r.task_hparams["length"] for r in comparison.runs] == [10, 12]
    assert comparison.runs[0].task.describe()["length"] == 10
    outcome = compare(comparison, tmp_path / "out", progress=False)
    assert not outcome.failures and len(outcome.results) == 2
    # A user task by import path on the command line too.
    assert main([
        "run", "--task", f"{task_module}:tiny_xor", "-t", "length=11",
        "--optimizer", "sgd", "--steps", "10", "--eval-every", "10", "--seeds", "1",
        "--eval-size", "8", "--out", str(tmp_path / "cli"), "--quiet",
    ]) == 0  # fmt: skip
    assert results.load_summary(tmp_path / "cli")["length"].tolist() == [11]


# ------------------------------------------------------------------ run ids
@pytest.mark.slow
def test_registered_task_hyperparameters_are_in_the_run_id(tmp_path):
    name = f"user_task_{uuid.uuid4().hex[:6]}"

    def user_task(hidden: int = 4):
        task = make_task("xor", length=10, hidden=hidden, batch_size=4)
        task.describe = lambda: {"name": name}  # a user task that describes little
        return task

    register_task(name, user_task)
    try:
        small = run(name, "sgd", task_hparams={"hidden": 4}, out=tmp_path, **SMALL)
        large = run(
            name, "sgd", task_hparams={"hidden": 5}, out=tmp_path, skip_existing=True,
            **SMALL,
        )  # fmt: skip
    finally:
        TASKS.pop(name)
    assert small.path != large.path
    assert small.config["task"] == {"name": name, "hidden": 4}
    assert large.config["task"] == {"name": name, "hidden": 5}
    # The second configuration trained (it did not load the first one's results).
    assert large.params["W_rec"].shape == (2, 5, 5)
    assert len(results.run_files(tmp_path)) == 2


# --------------------------------------------------------------- timing and failures
@pytest.mark.slow
def test_success_test_is_compiled_before_training(monkeypatch, count_compiles):
    wall = {"w0": 1.0, "b0": 0.35, "tolerance": 1e-3}
    args = dict(seeds=2, steps=200, eval_every=100, task_hparams=wall)
    # Warm the small eager helpers (key folding, slicing) on one program ...
    lr = {"learning_rate": 1.0}
    assert run("wall", "sgd", opt_hparams=lr, **args).summary.status.eq("solved").all()
    inside = []
    original = loop.train

    def counted(*a, **kw):
        with count_compiles() as compiles:
            out = original(*a, **kw)
        inside.append(compiles.count)
        return out

    monkeypatch.setattr("runner.run.train", counted)
    # ... then a new program (a static hyperparameter differs): the success test
    # it runs inside the loop was compiled with the rest, before training.
    result = run("wall", "sgd", opt_hparams={**lr, "nesterov": True}, **args)
    assert result.summary.status.eq("solved").all()
    assert inside == [0]


@pytest.mark.slow
def test_failing_plugin_costs_only_its_run(tmp_path, capsys):
    module = _module(
        tmp_path,
        "import optax\n"
        "def raises(scale: float = 1.0):\n    raise ValueError('no such thing')\n"
        "def not_a_transformation():\n    return 42\n",
    )
    file = tmp_path / "c.toml"
    file.write_text(
        "seeds = 1\nsteps = 10\neval_every = 10\neval_size = 8\n"
        '[[task]]\nname = "wall"\n'
        '[[optimizer]]\nname = "sgd"\n'
        f'[[optimizer]]\nname = "{module}:raises"\nlabel = "R"\n'
        f'[[optimizer]]\nname = "{module}:not_a_transformation"\nlabel = "N"\n'
    )
    out = tmp_path / "out"
    assert main(["compare", str(file), "--out", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "sgd" in captured.out  # the table of the run that finished
    assert "'R'" in captured.err and "no such thing" in captured.err
    assert "'N'" in captured.err and "not an optax GradientTransformation" in (
        captured.err
    )
    assert [f.name.split("-")[0] for f in results.run_files(out)] == ["wall"]


@pytest.mark.slow
def test_nonfinite_update_never_reaches_the_saved_parameters(tmp_path):
    def nan_update():
        def update_tree(updates, state, params=None):
            return {k: jnp.full_like(v, jnp.nan) for k, v in updates.items()}, state

        return optax.GradientTransformation(lambda p: optax.EmptyState(), update_tree)

    result = run(
        make_task("addition", length=10, hidden=4, batch_size=4), nan_update(),
        out=tmp_path, **SMALL,
    )  # fmt: skip
    assert result.summary.status.eq("diverged").all()
    assert (result.summary.diverged_step == 0).all()
    saved = results.load_params(result.path)
    for value in saved.values():
        assert np.isfinite(value).all()
