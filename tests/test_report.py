"""Tests of analysis.report: the self-contained HTML report of a results directory."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest
from frames import SEEDS, make_growth, make_probes, make_records

from analysis import report
from analysis import results as store
from analysis.growth import GROWTH_SUFFIX, save_growth
from runner.run import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The training curves against gradient-equivalents.
WORK = {"training_work", "error_work"}
CONFIG_COLUMNS = ["run_id", "task", "length", "init", "optimizer"]


def write_fake_run(directory, label, length=20, probes=None, task="temporal_order"):
    """A run file as the runner writes it (records, summary, optional probes)."""
    task_config = {"name": task, "batch_size": 4}
    if task != "wall":
        task_config.update(length=length, init="smart_tanh")
    run_id = f"{task}-L{length}-{label}"
    config = {
        "task": task_config,
        "optimizer": {"name": label.lower(), "hparams": {"learning_rate": 0.1}},
        "label": label, "seeds": list(SEEDS), "steps": 100, "run_id": run_id,
    }  # fmt: skip
    records = make_records(lengths=(length,))
    records = records[records["optimizer"] == "SGD"].drop(columns=CONFIG_COLUMNS)
    records = records.assign(
        grad_equivalents=(2.0 + records["seed"]) * records["step"],
        seconds=0.01 * records["step"],
    )
    summary = [
        {"seed": s, "updates": 100, "run_seconds": 1.5,
         "status": "solved" if s < 2 else "unsolved",
         "steps_to_solve": 40 + s if s < 2 else None,
         "seconds_to_solve": 0.5 if s < 2 else None,
         "grad_equivalents_to_solve": 80 + s if s < 2 else None}
        for s in SEEDS
    ]  # fmt: skip
    result = store.RunResult(
        config=config,
        records=records,
        summary=pd.DataFrame(summary),
        params={"w": np.zeros((len(SEEDS), 1))},
        path=None,
        probes=(
            pd.DataFrame() if probes is None else probes.drop(columns=CONFIG_COLUMNS)
        ),
    )
    path = store.run_path(directory, run_id)
    n_steps = 30
    arrays = {
        "loss": np.ones((len(SEEDS), n_steps)),
        "grad_norm": np.ones((len(SEEDS), n_steps)),
    }
    if task == "wall":
        t = np.arange(n_steps)[None, :]
        arrays["param_w"] = 6.0 + 0.05 * t + 0.1 * np.arange(len(SEEDS))[:, None]
        arrays["param_b"] = -3.0 + 0.02 * t + np.zeros((len(SEEDS), 1))
    return store.write_run(path, result, {}, {}, traces=arrays)


def sections(text: str) -> set[str]:
    return set(re.findall(r'<section id="([a-z_]+)"', text))


def table_rows(text: str, table_id: str) -> list[str]:
    match = re.search(rf'<table id="{table_id}">(.*?)</table>', text, re.S)
    assert match, table_id
    body = match.group(1).split("<tbody>")[1]
    return re.findall(r"<tr>(.*?)</tr>", body, re.S)


def assert_self_contained(text: str) -> None:
    assert 'src="http' not in text and "<link" not in text and "<script" not in text
    images = re.findall(r'<img alt="[a-z_]+" src="data:image/png;base64,([^"]+)"', text)
    assert images and text.count("<img") == len(images)
    for data in images:
        assert base64.b64decode(data, validate=True).startswith(PNG_MAGIC)


@pytest.mark.slow
def test_report_without_probes_omits_curvature_sections(tmp_path):
    for label in ("SGD", "SGD-C"):
        write_fake_run(tmp_path, label)
    path = report.write_report(tmp_path)
    assert path == tmp_path / "report.html"
    text = path.read_text()
    assert_self_contained(text)
    assert len(table_rows(text, "comparison")) == len(table_rows(text, "runs")) == 2
    for label in ("SGD", "SGD-C"):
        assert f'<td class="text">{label}</td>' in text
    assert sections(text) == {"training", "error", "traces"} | WORK
    assert "temporal_order" in text and "2 runs" in text


@pytest.mark.slow
def test_report_of_a_real_probed_wall_run(tmp_path):
    run(
        "wall", "sgd_clip", seeds=2, steps=40, eval_every=10, eval_size=1,
        probe_every=10, record_params=True, label="SGD-C", out=tmp_path,
    )  # fmt: skip
    paths = report.wall_trajectories(store.Results.load(tmp_path))
    assert len(paths) == 2 * 40 and set(paths["optimizer"]) == {"SGD-C"}
    text = report.write_report(tmp_path).read_text()
    assert_self_contained(text)
    expected = {"training", "error", "traces", "curvature", "curvature_gn"}
    assert sections(text) == expected | {"spectrum", "wall"} | WORK
    assert "Could not draw" not in text


@pytest.mark.slow
def test_report_with_probes_wall_and_growth(tmp_path):
    probes = make_probes()
    for k, label in enumerate(("SGD", "SGD-C")):
        for length in (20, 40):
            mine = probes[probes["optimizer"] == label] if length == 20 else None
            write_fake_run(tmp_path, label, length=length, probes=mine)
        write_fake_run(tmp_path, label, task="wall", length=k)
    rows, fits = make_growth()
    save_growth(tmp_path / f"lengths{GROWTH_SUFFIX}", {"name": "lengths"}, rows, fits)
    out = tmp_path / "html" / "r.html"
    path = report.write_report(tmp_path, out=out, title="My <comparison>")
    assert path == out
    text = out.read_text()
    assert_self_contained(text)
    assert "<h1>My &lt;comparison&gt;</h1>" in text
    # Every figure but the tuning one (this comparison was not tuned); two
    # optimizers on three task configurations get performance profiles.
    assert sections(text) == set(report.FIGURES) - {"sensitivity"}
    assert len(table_rows(text, "scores")) == 2
    files = store.run_files(tmp_path)
    assert len(files) == 6  # the growth file is not a run
    assert len(table_rows(text, "comparison")) == len(files)
    assert len(table_rows(text, "runs")) == len(files)
    header = re.search(r'<table id="comparison"><thead>(.*?)</thead>', text).group(1)
    assert re.findall(r"<th>(.*?)</th>", header)[:4] == [
        "task", "length", "init", "optimizer",
    ]  # fmt: skip
    row = next(r for r in table_rows(text, "comparison") if "SGD-C" in r)
    assert "<td>67%</td>" in row and "<td>80</td>" in row  # 2/3 solved, median 80.5
    assert '<td class="text">smart_tanh</td>' in row


def test_figures_return_none_without_their_data(tmp_path):
    write_fake_run(tmp_path, "SGD")
    results = store.Results.load(tmp_path)
    for name in ("success", "curvature", "curvature_gn", "spectrum", "wall"):
        assert report.FIGURES[name](results) is None, name
    for name in ("growth", "ratio"):
        assert report.FIGURES[name](results) is None, name
    assert report.FIGURES["training"](results) is not None
    # Records written before work was counted: no curves against work.
    run = results.runs[0]
    run["records"] = [
        {k: v for k, v in r.items() if k != "grad_equivalents"} for r in run["records"]
    ]
    results = store.Results(results.path, results.runs, (pd.DataFrame(),) * 2)
    assert report.FIGURES["training_work"](results) is None
    assert report.build_figure("traces", results, x="grad_equivalents") is None


def test_build_figure_draws_against_the_chosen_axis(tmp_path):
    write_fake_run(tmp_path, "SGD")
    results = store.Results.load(tmp_path)
    work = report.FIGURES["training_work"](results)
    ax = work.axes[0]
    assert ax.get_xlabel() == "work (gradient-equivalents)"
    # Seed s does (2 + s) gradient-equivalents per step, evaluated every 10 steps
    # from 10 to 100: the common grid is every seed's own work values, 20 to 400.
    grid = np.unique([(2 + s) * step for s in SEEDS for step in range(10, 110, 10)])
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), grid)
    fig = report.build_figure("error", results, x="seconds")
    assert fig.axes[0].get_xlabel() == "training seconds"
    assert report.build_figure("traces", results).axes[0].get_xlabel() == (
        "update step"
    )
    with pytest.raises(ValueError, match="no training axis"):
        report.build_figure("success", results, x="seconds")
    with pytest.raises(ValueError, match="grad_equivalents"):
        report.build_figure("training", results, x="work")
    with pytest.raises(ValueError, match="unknown plot"):
        report.build_figure("nope", results)


@pytest.mark.slow
def test_plot_command_takes_the_x_axis(tmp_path, capsys):
    from runner.cli import main

    write_fake_run(tmp_path, "SGD")
    argv = ["plot", "training", str(tmp_path), "--format", "png"]
    assert main([*argv, "--x", "grad_equivalents"]) == 0
    path = tmp_path / "training-grad_equivalents.png"
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.strip() == str(path)
    assert main(argv) == 0 and (tmp_path / "training.png").is_file()
    assert main(["plot", "success", str(tmp_path), "--x", "seconds"]) == 2
    assert "--x applies to training" in capsys.readouterr().err


@pytest.mark.slow
def test_growth_only_directory(tmp_path):
    rows, fits = make_growth()
    save_growth(tmp_path / f"g{GROWTH_SUFFIX}", {"name": "g"}, rows, fits)
    text = report.write_report(tmp_path).read_text()
    assert sections(text) == {"growth", "ratio"}
    assert "comparison" not in sections(text)


@pytest.mark.slow
def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(store.ResultsError, match=re.escape(str(tmp_path))):
        report.write_report(tmp_path)
    with pytest.raises(store.ResultsError, match="does not exist"):
        report.write_report(tmp_path / "missing")


@pytest.mark.slow
def test_a_failing_figure_is_reported_not_raised(tmp_path, monkeypatch):
    write_fake_run(tmp_path, "SGD")

    def broken(directory):
        raise RuntimeError("boom")

    monkeypatch.setitem(report.FIGURES, "traces", broken)
    with pytest.warns(UserWarning, match="traces"):
        text = report.write_report(tmp_path).read_text()
    assert "Could not draw this figure" in text and "boom" in text
    assert "training" in sections(text)


def test_growth_x_picks_the_varying_column():
    rows = pd.DataFrame({"length": [10, 20], "radius": [np.nan, np.nan]})
    assert report.growth_x(rows) == "length"
    rows = pd.DataFrame({"length": [10, 10], "radius": [0.9, 1.1]})
    assert report.growth_x(rows) == "radius"
    assert report.growth_x(pd.DataFrame({"length": [10, 10]})) is None
