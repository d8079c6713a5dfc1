"""Comparing stored runs: two run files equal in everything but wall-clock times."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: Fields that hold wall-clock times: the only ones two equal runs may differ in.
TIMES = {"seconds", "seconds_to_solve", "run_seconds", "compile_seconds",
         "probe_seconds", "seconds_to_target"}  # fmt: skip


def without_times(value):
    """``value`` (parsed JSON) without the :data:`TIMES` fields, at any depth."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def assert_same_run(a: Path, b: Path) -> None:
    """Two run files (and their array files) equal bit for bit, times aside."""
    assert without_times(json.loads(a.read_text())) == without_times(
        json.loads(b.read_text())
    )
    for suffix in (".params.npz", ".steps.npz"):
        if not a.with_suffix(suffix).exists():
            assert not b.with_suffix(suffix).exists()
            continue
        with np.load(a.with_suffix(suffix)) as x, np.load(b.with_suffix(suffix)) as y:
            assert sorted(x.files) == sorted(y.files)
            for k in x.files:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{suffix} {k}")
