"""Preemption-safe runs: resume checkpoints, locks, temporaries, file permissions."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from runs import assert_same_run

from analysis import results as store
from runner import resume
from runner.locks import is_locked, lock_path, run_lock
from runner.run import run

TINY = {"length": 10, "hidden": 6, "batch_size": 8}


def _run(out, **kwargs):
    args = dict(
        task="addition", optimizer="adahessian", seeds=2, steps=100,
        task_hparams=TINY, opt_hparams={"every": 1}, eval_every=10, eval_size=64,
        resume_every_seconds=0.0, out=out,
    )  # fmt: skip
    args.update(kwargs)
    return run(**args)


class Interrupt(Exception):
    """Stands for a kill between two chunks."""


def _interrupt_at(monkeypatch, chunk_index):
    original = resume.ResumeCheckpoints.on_chunk

    def on_chunk(self, run_state, chunk):
        if chunk.index == chunk_index:  # killed before this chunk's save
            raise Interrupt
        original(self, run_state, chunk)

    monkeypatch.setattr(resume.ResumeCheckpoints, "on_chunk", on_chunk)


def test_interrupted_run_resumes_bit_identical(tmp_path, monkeypatch):
    reference = _run(tmp_path / "a").path
    _interrupt_at(monkeypatch, 5)
    with pytest.raises(Interrupt):
        _run(tmp_path / "b")
    run_file = tmp_path / "b" / reference.name
    assert not run_file.exists()
    _, meta = store.read_resume(run_file)
    assert meta["next_chunk"] == 5  # chunks 0-4 saved, chunk 5 lost
    assert len(meta["records"]) == 2 * 5
    monkeypatch.undo()
    resumed = _run(tmp_path / "b")
    assert resumed.path == run_file
    assert not store.resume_path(run_file).exists()  # removed once finished
    assert_same_run(reference, run_file)


def test_damaged_or_foreign_resume_checkpoint_starts_over(tmp_path):
    reference = _run(tmp_path / "a", steps=30).path
    run_file = tmp_path / "b" / reference.name
    run_file.parent.mkdir()
    store.resume_path(run_file).write_bytes(b"PK\x03\x04 truncated")
    assert_same_run(reference, _run(tmp_path / "b", steps=30).path)
    # A checkpoint of another configuration (other seeds: other shapes) is ignored.
    other = _run(tmp_path / "c", steps=30, seeds=3)
    store.resume_path(other.path).unlink(missing_ok=True)
    leaves, meta = [np.zeros(3)], {"run_id": "someone-else", "n_state_leaves": 1}
    store.write_resume(run_file, leaves, meta)
    run_file.unlink()
    assert_same_run(reference, _run(tmp_path / "b", steps=30).path)


def test_resume_keeps_non_finite_records_exactly(tmp_path):
    meta = {"records": [{"loss": float("nan"), "grad": float("inf")}], "n": -0.0}
    store.write_resume(tmp_path / "r.json", [np.arange(3)], meta)
    leaves, back = store.read_resume(tmp_path / "r.json")
    np.testing.assert_array_equal(leaves[0], np.arange(3))
    assert np.isnan(back["records"][0]["loss"]) and back["records"][0]["grad"] == np.inf


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_bit_identical(tmp_path):
    reference = _run(tmp_path / "a", steps=400).path
    out = tmp_path / "b"
    cmd = [
        sys.executable, "-m", "runner.cli", "run", "--task", "addition",
        "--optimizer", "adahessian",
        "--seeds", "2", "--steps", "400", "-t", "length=10", "-t", "hidden=6",
        "-t", "batch_size=8", "-o", "every=1", "--eval-every", "10",
        "--eval-size", "64", "--resume-every-seconds", "0", "--out", str(out),
    ]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    checkpoint = store.resume_path(out / reference.name)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended first: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / reference.name).exists()
    assert is_locked(out / reference.name) is False  # the dead process let go
    assert_same_run(reference, _run(out, steps=400).path)


def test_lock_is_held_while_training_and_released_by_death(tmp_path):
    run_file = tmp_path / "x.json"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from runner.locks import "
         f"run_lock\nwith run_lock(Path({str(run_file)!r})):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == b"held"
    assert is_locked(run_file)
    holder.kill()
    holder.wait()
    holder.stdout.close()
    assert not is_locked(run_file)
    with run_lock(run_file):
        assert lock_path(run_file).exists()


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / ".a.json.x1.tmp", tmp_path / ".b.json.x2.tmp"
    stale.write_text("half")
    fresh.write_text("writing")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert store.remove_stale_temporaries(tmp_path) == [stale]
    assert fresh.exists() and not stale.exists()


def test_run_files_get_the_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        result = _run(tmp_path, steps=10)
    finally:
        os.umask(previous)
    for path in (result.path, result.path.with_suffix(".params.npz")):
        assert path.stat().st_mode & 0o777 == 0o644


def test_raising_steps_continues_the_finished_run(tmp_path, monkeypatch):
    reference = _run(tmp_path / "a", steps=80).path
    short = _run(tmp_path / "b", steps=40).path
    assert store.resume_path(short, final=True).is_file()
    import runner.run as run_module

    starts = []
    original = run_module.train

    def spy(program, run_state, *args, **kwargs):
        starts.append(run_state.next_chunk)
        return original(program, run_state, *args, **kwargs)

    monkeypatch.setattr(run_module, "train", spy)
    longer = _run(tmp_path / "b", steps=80).path
    assert starts == [4]  # 40 steps in chunks of 10 were done already
    assert_same_run(reference, longer)
    assert short.is_file()  # the shorter budget stays, as its own row
    # A budget that ended inside a chunk cannot continue: it trains from step 0.
    odd = _run(tmp_path / "c", steps=45).path
    assert odd.is_file()
    starts.clear()
    assert_same_run(reference, _run(tmp_path / "c", steps=80).path)
    assert starts == [0]


@pytest.mark.slow
def test_compare_trains_damaged_runs_again(tmp_path):
    from runner.compare import compare
    from runner.config import parse_comparison

    comparison = parse_comparison(
        {
            "seeds": 2,
            "steps": 20,
            "eval_every": 10,
            "eval_size": 32,
            "task": [{"name": "addition", **TINY}],
            "optimizer": [{"name": "sgd_clip"}, {"name": "sgd", "label": "SGD"}],
        }
    )
    first = compare(comparison, tmp_path / "a", False, "serial")
    keep = tmp_path / "kept"
    keep.mkdir()
    for result in first.results:
        for part in result.path.parent.glob(result.path.stem + ".*"):
            (keep / part.name).write_bytes(part.read_bytes())
    empty, truncated = (r.path for r in first.results)
    empty.write_bytes(b"")  # an empty run file
    params = truncated.with_suffix(".params.npz")
    params.write_bytes(params.read_bytes()[:100])  # a truncated array file
    with pytest.warns(UserWarning, match="training the run again") as caught:
        again = compare(comparison, tmp_path / "a", False, "serial")
    assert len(caught) == 2 and not again.failures
    for result in again.results:
        assert_same_run(keep / result.path.name, result.path)


@pytest.mark.slow
def test_two_commands_never_train_one_run_twice(tmp_path):
    (tmp_path / "tagged.py").write_text(
        "import os\nimport optax\n"
        "def tagged(tag: int = 0, learning_rate: float = 0.01):\n"
        "    with open(os.path.join(os.path.dirname(__file__), f'built-{tag}'), 'a')"
        " as f:\n"
        "        f.write(f'{os.getpid()}\\n')\n"
        "    return optax.sgd(learning_rate)\n"
    )  # fmt: skip
    (tmp_path / "c.toml").write_text(
        "seeds = 2\nsteps = 40\neval_every = 20\neval_size = 32\n"
        '[[task]]\nname = "addition"\nlength = 10\nhidden = 6\nbatch_size = 8\n'
        '[[optimizer]]\nname = "tagged:tagged"\ngrid = { tag = [1, 2, 3] }\n'
    )
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "runner.cli", "compare", str(tmp_path / "c.toml"),
           "--out", out, "--quiet", "--executor", "serial"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    for tag in (1, 2, 3):
        pids = set((tmp_path / f"built-{tag}").read_text().split())
        assert len(pids) == 1, f"run {tag} was built by processes {pids}"
    assert len(store.run_files(tmp_path / "out")) == 3
