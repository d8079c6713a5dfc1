"""The results format: versioned run files, damaged files, one read per directory."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis import report, results
from analysis.results import Results, ResultsError
from runner.cli import main
from runner.run import run

SMALL = dict(seeds=2, steps=20, eval_every=10, eval_size=16)
TINY = {"length": 10, "hidden": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A results directory with one real run."""
    out = tmp_path_factory.mktemp("results")
    run("addition", "sgd_clip", task_hparams=TINY, out=out, label="C", **SMALL)
    return out


@pytest.mark.slow
def test_run_file_is_versioned_and_round_trips(run_dir, tmp_path):
    (file,) = results.run_files(run_dir)
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for part in file.parent.glob(file.stem + "*"):
        (run_dir / part.name).write_bytes(part.read_bytes())
    rows = pd.DataFrame({"length": [5, 6, 7], "grad_norm": [1.0, 2.0, 4.0]})
    fits = pd.DataFrame({"quantity": ["grad_norm"], "slope": [0.69]})
    growth = run_dir / f"g{results.GROWTH_SUFFIX}"
    results.write_growth(growth, {"name": "g"}, rows, fits)
    payload = json.loads(file.read_text())
    assert payload["format"] == results.FORMAT_VERSION
    loaded = Results.load(run_dir)
    assert len(loaded.runs) == 1 and loaded.labels == ["C"]
    assert set(loaded.summary.seed) == {0, 1}
    assert len(loaded.records) == 2 * 2  # two seeds, two chunks
    assert loaded.growth_rows.length.tolist() == [5, 6, 7]
    assert loaded.growth_fits.experiment.tolist() == ["g"]
    # Version 1 (no "format" field) reads the same.
    del payload["format"]
    old = run_dir / "old" / file.name
    old.parent.mkdir()
    old.write_text(json.dumps(payload))
    assert Results.load(old.parent).summary.equals(loaded.summary)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is damaged"),
        (b"{not json", "is damaged"),
        (b"\xff\xfe\x00", "is damaged"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"format": 99, "config": {}, "summary": [], "records": []}', "format 99"),
        (b'{"config": {}, "summary": []}', "no 'records' field"),
        (b'{"config": {}, "summary": [], "records": []}', "incomplete 'config'"),
    ],
)
def test_damaged_run_file_names_the_file(tmp_path, content, message, capsys):
    bad = tmp_path / "broken.json"
    bad.write_bytes(content)
    with pytest.raises(ResultsError, match=message) as err:
        Results.load(tmp_path)
    assert "broken.json" in str(err.value)
    for command in (["show", str(tmp_path)], ["report", str(tmp_path)]):
        assert main(command) == 2
        line = capsys.readouterr().err
        assert line.count("\n") == 1 and "broken.json" in line


@pytest.mark.slow
def test_truncated_arrays_name_the_file(run_dir, tmp_path):
    (file,) = results.run_files(run_dir)
    copy = tmp_path / file.name
    copy.write_bytes(file.read_bytes())
    params = file.with_suffix(".params.npz").read_bytes()
    copy.with_suffix(".params.npz").write_bytes(params[: len(params) // 2])
    with pytest.raises(ResultsError, match=r"params\.npz is damaged"):
        results.load_result(copy)
    with pytest.raises(ResultsError, match="does not exist"):
        results.load_params(copy, step=10)


@pytest.mark.slow
def test_report_reads_each_file_once(run_dir, monkeypatch, tmp_path):
    calls = []
    original = results.read_run
    monkeypatch.setattr(
        results, "read_run", lambda path: calls.append(path) or original(path)
    )
    report.write_report(run_dir, out=tmp_path / "r.html")
    assert len(calls) == len(results.run_files(run_dir)) == 1


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.npz"
    results._write_arrays(target, {"a": np.ones(3)})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        results._write_arrays(target, {"a": np.zeros(3)})
    # The old file is intact and no temporary file is left behind.
    assert results._npz(target)["a"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]
