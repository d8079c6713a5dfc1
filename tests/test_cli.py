"""Comparison files, the comparison table and the command line."""

import subprocess
import sys
from pathlib import Path

import pytest
from problems import use_small_chorales

from analysis import results as store
from analysis.table import comparison_table
from runner.cli import main
from runner.config import parse_assignments, parse_comparison, read_comparison
from tasks import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY_TOML = """
name = "tiny"
seeds = 2
steps = 40
eval_every = 20
eval_size = 32

[[task]]
name = "addition"
hidden = 6
batch_size = 8
grid = { length = [10, 12] }

[[optimizer]]
name = "sgd_clip"
label = "SGD-C"
learning_rate = 0.01

[[optimizer]]
name = "sgd"
label = "SGD-huge"
learning_rate = 1e30
"""


def test_grid_expands_tasks_times_optimizers(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text(TINY_TOML)
    comparison = read_comparison(file)
    assert comparison.name == "tiny"
    assert len(comparison.runs) == 4
    assert {(r.task_hparams["length"], r.label) for r in comparison.runs} == {
        (10, "SGD-C"), (12, "SGD-C"), (10, "SGD-huge"), (12, "SGD-huge")
    }  # fmt: skip
    for run in comparison.runs:
        opts = run.options
        assert (opts.seeds, opts.steps, opts.eval_every, opts.eval_size) == (
            (0, 1), 40, 20, 32
        )  # fmt: skip
        assert opts.probe_every is None  # the defaults fill the rest


def test_optimizer_grid_labels():
    comparison = parse_comparison(
        {
            "task": [{"name": "wall"}],
            "optimizer": [{"name": "sgd", "grid": {"learning_rate": [0.1, 0.2]}}],
        }
    )
    assert [r.label for r in comparison.runs] == [
        "sgd learning_rate=0.1",
        "sgd learning_rate=0.2",
    ]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"task": [{"name": "wall"}]}, r"\[\[optimizer\]\]"),
        ({"optimizer": [{"name": "sgd"}]}, r"\[\[task\]\]"),
        (
            {"task": [{"name": "wal"}], "optimizer": [{"name": "sgd"}]},
            "unknown task 'wal'; valid: addition",
        ),
        (
            {"task": [{"name": "wall"}], "optimizer": [{"name": "sgd", "lr": 1}]},
            "unknown optimizer hyperparameter 'lr' for 'sgd'; valid: learning_rate",
        ),
        (
            {"task": [{"name": "wall"}], "optimizer": [{"name": "sgd"}], "step": 1},
            "unknown comparison field 'step'; valid: name",
        ),
        (
            {
                "task": [{"name": "addition", "grid": {"length": [5]}}],
                "optimizer": [{"name": "sgd"}],
            },
            "'length' = 5 is too short",
        ),
        (
            {
                "task": [{"name": "wall"}],
                "optimizer": [{"name": "sgd"}, {"name": "sgd"}],
            },
            "share the label",
        ),
        (
            {"task": [{"name": "wall"}], "optimizer": [{"name": "sgd"}], "steps": "9"},
            "'steps'",
        ),
        (  # settings that clash are caught when the file is read, not in a worker
            {
                "task": [{"name": "wall"}],
                "optimizer": [{"name": "hf", "product": "jacobian", "structural": 0.1}],
            },
            "optimizer 'hf' failed to build: .*product = 'jacobian' needs",
        ),
    ],
)
def test_bad_comparisons_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_comparison(data)


def test_parse_assignments_uses_toml_values():
    parsed = parse_assignments(["a=1", "b=0.5", "c=true", "d=smart_tanh"], "x")
    assert parsed == {"a": 1, "b": 0.5, "c": True, "d": "smart_tanh"}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_assignments(["novalue"], "--task-param")


@pytest.mark.slow
def test_compare_cli_writes_runs_and_table(tmp_path, capsys):
    file = tmp_path / "c.toml"
    file.write_text(TINY_TOML)
    out = tmp_path / "results"
    assert main(["compare", str(file), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "SGD-C" in printed and "SGD-huge" in printed
    assert len(store.run_files(out)) == 4
    summary = store.load_summary(out)
    # The diverging optimizer is data in the table, and the other runs are intact.
    table = comparison_table(summary)
    huge = table[table.optimizer == "SGD-huge"]
    assert (huge.diverged == 2).all() and (huge.success_rate == 0).all()
    clipped = table[table.optimizer == "SGD-C"]
    assert (clipped.diverged == 0).all() and len(clipped) == 2
    assert list(table.columns[:3]) == ["task", "length", "optimizer"]
    # Resuming skips finished runs: the files are not rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in store.run_files(out)}
    assert main(["compare", str(file), "--out", str(out), "--quiet"]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in store.run_files(out)}
    capsys.readouterr()
    assert main(["show", str(out), "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("| task | length | optimizer |")
    assert markdown.count("\n") == 6  # header, rule, four runs


@pytest.mark.slow
def test_run_cli(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["run", "--task", "wall", "--optimizer", "sgd_clip", "-o", "threshold=0.5"]
    argv += ["--seeds", "2", "--steps", "50", "--eval-every", "25", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    assert "sgd_clip" in capsys.readouterr().out
    records = store.load(out)
    assert set(records.seed) == {0, 1}
    assert (records.opt_threshold == 0.5).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--task", "nope", "--optimizer", "sgd"], "unknown task 'nope'; valid"),
        (
            ["run", "--task", "wall", "--optimizer", "sgd", "-o", "learning_rate=0"],
            "'learning_rate' = 0.0 is out of range",
        ),
        (
            ["run", "--task", "wall", "--optimizer", "sgd_clip", "-o", "clip=norm"],
            "'clip' = 'norm' is not one of 'global', 'elementwise'",
        ),
        (
            ["run", "--task", "wall", "--optimizer", "optax.nothing"],
            "cannot be imported",
        ),
        (["show", "/nonexistent/dir"], "does not exist"),
        (["compare", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curvbench: error:")
    assert message in err


def test_malformed_toml(tmp_path, capsys):
    file = tmp_path / "bad.toml"
    file.write_text("[[task]\nname = 1\n")
    assert main(["compare", str(file)]) == 2
    assert "malformed TOML" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_lists(tmp_path):
    # The installed entry point, as a user runs it (exit status included).
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "optimizers"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0
    assert "sgd_clip" in proc.stdout and "threshold = 1.0" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "run", "--task", "x", "--optimizer", "y"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown task 'x'" in proc.stderr


@pytest.mark.slow  # validates every run and tuning trial of the shipped comparisons
def test_shipped_experiments_are_valid(monkeypatch):
    # Validation builds every task: the chorales from six pieces, not the whole
    # corpus (a minute or two of parsing on a fresh machine).
    use_small_chorales(monkeypatch)
    for file in sorted((ROOT / "experiments").glob("*.toml")):
        comparison = read_comparison(file)
        assert comparison.runs or comparison.studies, file
        for study in comparison.studies:  # tuned: trials and held-out twins
            assert len(study.trials) == len(study.held_out) == comparison.tuning.trials


def test_optimizer_overrides_task_settings_and_run_arguments():
    comparison = parse_comparison(
        {
            "steps": 100,
            "task": [{"name": "addition", "length": 10}],
            "optimizer": [
                {"name": "sgd_clip", "label": "SGD-C"},
                {
                    "name": "hf",
                    "label": "HF",
                    "steps": 5,
                    "curvature_batch_size": 8,
                    "task": {"batch_size": 64},
                    "max_cg_iters": 20,
                },
            ],
        }
    )
    sgd, hf = comparison.runs
    # Task hyperparameters are complete (defaults filled in) and validated.
    assert sgd.task_hparams["length"] == 10 and sgd.task_hparams["batch_size"] == 20
    assert sgd.options.steps == 100 and sgd.options.curvature_batch_size is None
    assert hf.task_hparams["length"] == 10 and hf.task_hparams["batch_size"] == 64
    assert (hf.options.steps, hf.options.curvature_batch_size) == (5, 8)
    assert hf.optimizer.hparams["max_cg_iters"] == 20
    with pytest.raises(ConfigError, match="'batch_size' = 0 is out of range"):
        parse_comparison(
            {
                "task": [{"name": "addition"}],
                "optimizer": [{"name": "hf", "task": {"batch_size": 0}}],
            }
        )
    with pytest.raises(ConfigError, match="'steps' = 'x' must be a number"):
        parse_comparison(
            {"task": [{"name": "wall"}], "optimizer": [{"name": "hf", "steps": "x"}]}
        )
