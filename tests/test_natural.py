"""Natural-data tasks: chorale piano rolls, text, splits, the dataset cache, and runs.

References are independent of the code under test: the score's notes read through
another music21 path, hand-read frames of a chorale, numpy loops, scipy.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from problems import SMALL_CHORALES, make_small_chorales, small_chorale_files
from scipy import stats

from analysis.stats import mean_interval
from analysis.table import comparison_table, format_table
from runner.callbacks import EarlyStopping
from runner.loop import Chunk, RunState
from runner.run import run
from runner.tuning import trial_score
from tasks import ConfigError, datacache, make_task
from tasks import chorales as music
from tasks.data import Split, window_batch
from tasks.natural import read_text, text_splits


def _corpus_file(name: str) -> Path:
    (path,) = [p for p in music.chorale_files() if music.piece_name(p) == name]
    return path


@pytest.fixture(scope="module")
def small_chorales():
    """The chorales task on six pieces (4 train, 1 validation, 1 test), built by
    the registered factory, and the pieces of each split."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        task = make_small_chorales(monkeypatch, length=16, hidden=8, batch_size=4)
    return task, music.split_pieces(list(SMALL_CHORALES))


@pytest.fixture(scope="module")
def small_text():
    return make_task("text", length=20, hidden=8, batch_size=4)


# ------------------------------------------------------------------ piano rolls
# bwv1.6, "Wie schön leuchtet der Morgenstern", read off the score: the four voices
# (soprano, alto, tenor, bass) of its first six quarter notes, as MIDI numbers.
BWV1_6_FIRST_BEATS = [
    {65, 60, 57, 53},  # F4 C4 A3 F3
    {72, 60, 55, 52},  # C5 C4 G3 E3
    {69, 60, 57, 53},  # A4 C4 A3 F3
    {65, 62, 57, 50},  # F4 D4 A3 D3
    {72, 65, 57, 45},  # C5 F4 A3 A2
    {74, 70, 53, 46},  # D5 Bb4 F3 Bb2 (the bass's first eighth)
]


def _frames_from_notes(score, frames_per_quarter: int) -> list[set[int]]:
    """The sounding pitches of each frame, from every note's offset in its part."""
    parts = [
        p for p in score.parts if p.partName in ("Soprano", "Alto", "Tenor", "Bass")
    ]
    assert len(parts) == 4
    n = math.ceil(float(score.highestTime) * frames_per_quarter)
    frames = [set() for _ in range(n)]
    for part in parts:
        for note in part.recurse().notes:
            start = float(note.getOffsetInHierarchy(part)) * frames_per_quarter
            stop = start + float(note.quarterLength) * frames_per_quarter
            for k in range(n):
                if start <= k < stop:
                    frames[k].update(p.midi for p in note.pitches)
    return frames


@pytest.mark.parametrize("frames_per_quarter", [1, 2])
def test_piano_roll_matches_the_score(frames_per_quarter):
    score = music.parse(_corpus_file("bwv1.6"))
    assert [p.partName for p in music.voice_parts(score)] == [
        "Soprano",
        "Alto",
        "Tenor",
        "Bass",
    ]  # fmt: skip  (the horn's part is left out)
    roll = music.piano_roll(score, frames_per_quarter)
    assert roll.shape == (80 * frames_per_quarter, 128)  # 80 quarter notes long
    got = [set(np.flatnonzero(frame)) for frame in roll]
    assert got == _frames_from_notes(score, frames_per_quarter)
    beats = got[::frames_per_quarter][:6]
    assert beats == BWV1_6_FIRST_BEATS
    if frames_per_quarter == 2:  # the bass's second eighth, Bb2 -> C3 (48)
        assert got[11] == {74, 70, 53, 48}


def test_chorale_split_sizes_and_disjointness():
    names = [music.piece_name(p) for p in music.chorale_files()]
    assert len(names) == len(set(names)) >= 400  # 409 in music21 10
    assert "bwv846" not in names  # a keyboard prelude, not a chorale
    split = music.split_pieces(names)
    sizes = [len(split[s]) for s in ("train", "validation", "test")]
    assert sum(sizes) == len(names)
    for size, jsb in zip(sizes, (229, 76, 77), strict=True):
        assert abs(size - len(names) * jsb / 382) <= 1.5
    train, valid, test = (set(split[s]) for s in ("train", "validation", "test"))
    assert not (train & valid or train & test or valid & test)
    # The rule depends on the names only, not on their order.
    again = music.split_pieces(list(reversed(names)))
    assert again == split


# ------------------------------------------------------------------------ cache
def test_dataset_cache_is_rebuilt_when_missing_damaged_or_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("CURVBENCH_CACHE", str(tmp_path))
    builds = []

    def build():
        builds.append(1)
        return {"x": np.arange(5), "y": np.ones((2, 3))}

    def get(settings=None):
        out = datacache.cached("toy", settings or {"a": 1}, build, keys=("x", "y"))
        np.testing.assert_array_equal(out["x"], np.arange(5))
        np.testing.assert_array_equal(out["y"], np.ones((2, 3)))

    path = datacache.cache_path("toy", {"a": 1})
    assert path.parent == tmp_path / "data"
    get()
    get()
    assert len(builds) == 1 and path.is_file()
    path.unlink()  # deleted
    get()
    assert len(builds) == 2
    path.write_bytes(path.read_bytes()[:40])  # truncated
    get()
    assert len(builds) == 3
    path.write_text("not a zip file")  # garbage
    get()
    assert len(builds) == 4
    # Other settings go to another file; a file holding other settings is stale.
    other = datacache.cache_path("toy", {"a": 2})
    assert other != path
    other.write_bytes(path.read_bytes())
    get({"a": 2})
    assert len(builds) == 5
    # A file without an expected array is rebuilt.
    np.savez(path, x=np.arange(5))
    get()
    assert len(builds) == 6
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*.tmp"))


def test_chorale_rolls_survive_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CURVBENCH_CACHE", str(tmp_path))
    paths = small_chorale_files()[:2]
    direct = music.build_rolls(paths, 1)
    cached = datacache.cached("rolls", {"n": 2}, lambda: direct)
    again = datacache.cached("rolls", {"n": 2}, lambda: pytest.fail("rebuilt"))
    for arrays in (cached, again):
        assert sorted(arrays) == ["lengths", "names", "rolls"]
        for k in arrays:
            np.testing.assert_array_equal(arrays[k], direct[k])
    assert list(again["names"]) == [music.piece_name(p) for p in paths]
    assert again["lengths"].sum() == again["rolls"].shape[0]


# ---------------------------------------------------------------------- windows
def _window_reference(split: Split, index, offset, n_steps):
    """Inputs (previous element, 0 at a sequence start), targets and mask by loops."""
    size = len(index)
    inputs = np.zeros((n_steps, size), int)
    targets = np.zeros((n_steps, size), int)
    mask = np.zeros((n_steps, size))
    for b, (i, s) in enumerate(zip(index, offset, strict=True)):
        seq = split.sequence(i)
        for t in range(n_steps):
            p = s + t
            if p < len(seq):
                mask[t, b] = 1
                targets[t, b] = seq[p]
                inputs[t, b] = seq[p - 1] if p >= 1 else 0
    return inputs, targets, mask


def test_window_batch_against_loops():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 9, size=n) for n in (5, 1, 9, 3)]
    split = Split.from_sequences(seqs)
    index = np.array([2, 0, 1, 2, 3])
    offset = np.array([3, 0, 0, 0, 2])

    def keep(x, valid):
        return jnp.where(valid, x, 0)

    batch = window_batch(split, jnp.array(index), jnp.array(offset), 6, keep, keep)
    inputs, targets, mask = _window_reference(split, index, offset, 6)
    np.testing.assert_array_equal(batch.inputs, inputs)
    np.testing.assert_array_equal(batch.targets, targets)
    np.testing.assert_array_equal(batch.mask, mask)
    np.testing.assert_array_equal(batch.lengths, mask.sum(0))


def test_rows_cover_every_element_once():
    split = Split.from_sequences([np.arange(7), np.arange(10, 13)])
    rows = split.rows(3)
    assert list(rows.lengths) == [3, 3, 1, 3]
    covered = np.concatenate([rows.sequence(i) for i in range(len(rows))])
    np.testing.assert_array_equal(covered, split.values)


# ------------------------------------------------------------------------- text
def test_text_round_trips_and_blocks(small_text):
    task = small_text
    sample = "def f(x):\n    return x  # ok"
    np.testing.assert_array_equal(task.decode(task.encode_text(sample)), sample)
    sizes = task.split_sizes()
    total = sum(s["steps"] for s in sizes.values())
    assert abs(sizes["train"]["steps"] - 0.8 * total) <= 1
    assert abs(sizes["validation"]["steps"] - 0.1 * total) <= 1
    from tasks.natural import default_text

    corpus = default_text()
    assert total == len(corpus)
    assert task.alphabet == "".join(sorted(set(corpus)))
    # Contiguous blocks in order: train, validation, test.
    blocks = [
        task.decode(task.splits[s].values) for s in ("train", "validation", "test")
    ]
    assert "".join(blocks) == corpus


def test_text_evaluation_scores_every_character_once(small_text):
    task = small_text
    batch = task.evaluation_batch("validation")
    values = task.splits["validation"].values
    assert float(jnp.sum(batch.mask)) == len(values)
    targets = np.asarray(batch.targets).T[np.asarray(batch.mask).T > 0]
    np.testing.assert_array_equal(targets, values)  # rows in order, every target once
    # The input at a step is the previous character of its row (a one-hot).
    inputs = np.asarray(batch.inputs)
    np.testing.assert_array_equal(inputs[0].sum(-1), 0.0)  # row starts: no input
    np.testing.assert_array_equal(
        inputs[1:, 0].argmax(-1), np.asarray(batch.targets)[:-1, 0]
    )


def test_uniform_model_scores_log2_of_the_alphabet(small_text):
    task = small_text
    params = task.init(jax.random.key(0))
    params = {**params, "W_out": params["W_out"] * 0, "b_out": params["b_out"] * 0}
    metrics = task.metrics(params, task.evaluation_batch("test"))
    assert task.n_out == len(task.alphabet)
    np.testing.assert_allclose(
        metrics["bits_per_char"], math.log2(len(task.alphabet)), rtol=1e-6
    )
    np.testing.assert_allclose(metrics["loss"], math.log(task.n_out), rtol=1e-6)


def test_text_on_a_user_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcä\n" * 400, encoding="utf-8")
    task = make_task("text", path=str(path), length=10, hidden=4)
    assert task.alphabet == "\nabcä"
    assert task.decode(task.splits["train"].values[:5]) == "abcä\n"


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no such file"),
        (b"\xff\xfeabc" * 100, "not UTF-8 text .*0xff at offset 0"),
        (b"abc", "too few"),
    ],
)
def test_bad_text_files_name_the_field(tmp_path, content, match):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"'path'.*{match}"):
        make_task("text", path=str(path), length=10)


def test_text_splits_need_room_for_a_window():
    with pytest.raises(ConfigError, match="'length' = 50"):
        text_splits("x" * 200, 50)


# --------------------------------------------------------------------- chorales
def test_chorale_evaluation_scores_whole_pieces(small_chorales):
    task, names = small_chorales
    for split in ("validation", "test"):
        members = names[split]
        batch = task.evaluation_batch(split)
        held_out = task.splits[split]
        assert batch.inputs.shape[1] == len(members) == len(held_out)
        assert float(jnp.sum(batch.mask)) == held_out.lengths.sum()
        first = held_out.sequence(0)
        np.testing.assert_array_equal(batch.targets[: len(first), 0], first)
        np.testing.assert_array_equal(batch.inputs[0, 0], 0.0)  # the start
        np.testing.assert_array_equal(batch.inputs[1 : len(first), 0], first[:-1])


def test_chorale_accuracy_and_nll_per_step(small_chorales):
    task, _ = small_chorales
    batch = task.evaluation_batch("validation")
    rng = np.random.default_rng(1)
    outputs = jnp.asarray(rng.normal(size=batch.targets.shape), jnp.float32)
    got = task.step_metrics(outputs, batch)
    y, m = np.asarray(batch.targets) > 0.5, np.asarray(batch.mask) > 0
    on = np.asarray(outputs) > 0
    tp = (on & y)[m].sum()
    fp = (on & ~y)[m].sum()
    fn = (~on & y)[m].sum()
    np.testing.assert_allclose(got["accuracy"], tp / (tp + fp + fn), rtol=1e-6)
    # The loss: Bernoulli NLL summed over pitches, averaged over the scored frames.
    x = np.asarray(outputs, np.float64)
    nll = np.logaddexp(0, x) - np.asarray(batch.targets) * x
    expected = nll.sum(-1)[m].mean()
    np.testing.assert_allclose(
        task.loss_from_outputs(outputs, batch), expected, rtol=1e-5
    )


def test_no_network_is_needed(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("CURVBENCH_CACHE", str(tmp_path))
    rolls = music.build_rolls([_corpus_file("bwv269")], 1)
    assert rolls["rolls"].any()
    assert make_task("text", length=10, hidden=4).n_out > 50


# ------------------------------------------------------------- early stopping
class _State:
    def __init__(self, n):
        self.active = jnp.ones(n, bool)

    def _replace(self, active):
        out = _State(0)
        out.active = active
        return out


def test_early_stopping_retires_after_patience_evaluations():
    run_state = RunState(state=_State(2), hparams={}, eval_keys=None)
    stopper = EarlyStopping(2, seeds=[0, 1])
    stopper.on_start(run_state)
    # Seed 0 improves every time; seed 1 stalls after its second evaluation.
    losses = [(5.0, 5.0), (4.0, 3.0), (3.0, 3.5), (2.0, np.nan), (1.0, 2.0)]
    active_after = []
    for i, pair in enumerate(losses):
        was = np.asarray(run_state.state.active)
        chunk = Chunk(i, i, {"eval_loss": np.array(pair)}, {}, None, was)
        stopper.on_chunk(run_state, chunk)
        active_after.append(np.asarray(run_state.state.active).tolist())
    assert active_after == [
        [True, True], [True, True], [True, True], [True, False], [True, False],
    ]  # fmt: skip
    memo = run_state.callback_state["early_stopping"]
    assert memo["stopped"] == [1] and memo["best"] == [1.0, 3.0]


# -------------------------------------------------------------------- runs
@pytest.mark.slow
def test_a_text_run_reports_its_best_validation_and_test_losses(small_text):
    task = small_text
    result = run(task, "sgd_cr", seeds=3, steps=40, eval_every=10, probe_every=20,
                 eval_size=32, opt_hparams={"learning_rate": 1.0})  # fmt: skip
    records, summary = result.records, result.summary
    periodic = result.probes[result.probes["kind"] == "periodic"]
    assert set(periodic["step"]) == {0, 20, 40}  # probes run on text too
    assert {
        "eval_loss",
        "eval_bits_per_char",
        "test_loss",
        "test_bits_per_char",
    } <= set(records.columns)
    # The last evaluation is the task's metrics on the whole splits.
    for split, prefix in (("validation", "eval"), ("test", "test")):
        params = jax.tree.map(lambda p: p[0], result.params)
        metrics = task.metrics(params, task.evaluation_batch(split))
        last = records[records.seed == 0].iloc[-1]
        np.testing.assert_allclose(last[f"{prefix}_loss"], metrics["loss"], rtol=1e-5)
    for _, row in summary.iterrows():
        rows = records[records.seed == row.seed]
        best = rows.loc[rows.eval_loss.idxmin()]
        assert row.best_eval_loss == best.eval_loss
        assert row.test_loss_at_best == best.test_loss
        assert row.test_bits_per_char_at_best == best.test_bits_per_char
        assert row.status == "finished"
    # The table: means over seeds with Student-t intervals, no success columns.
    summary = summary.assign(task="text", optimizer="SGD-C")
    table = comparison_table(summary)
    best = summary.best_eval_loss
    mean, lo, hi = mean_interval(best)
    low, high = stats.t.interval(0.95, 2, loc=best.mean(), scale=stats.sem(best))
    np.testing.assert_allclose([mean, lo, hi], [best.mean(), low, high])
    shown = table[["val_loss", "val_loss_lo", "val_loss_hi"]].iloc[0]
    np.testing.assert_allclose(shown, [mean, lo, hi])
    text = format_table(table)
    assert "val_loss_95" in text and "test_bits_per_char" in text
    assert "success_rate" not in text


def test_tuning_ranks_held_out_trials_by_their_best_validation_loss():
    summary = pd.DataFrame({"seed": [0, 1], "status": ["finished", "diverged"],
                            "best_eval_loss": [2.0, None]})  # fmt: skip
    records = pd.DataFrame({"seed": [0, 1], "step": [10, 10],
                            "eval_loss": [9.0, 9.0]})  # fmt: skip
    score = trial_score(summary, records, "eval_loss")
    assert score["final_loss"] == math.inf  # median of 2.0 and inf
    summary.loc[1, "best_eval_loss"] = 3.0
    assert trial_score(summary, records, "eval_loss")["final_loss"] == 2.5


#: One optimizer per family on each task. The chorales (a sigmoid output per pitch)
#: get every family; text shares the data path and its softmax output is covered by
#: the synthetic softmax tasks' tests, so it gets HF here and first-order with probes
#: in test_a_text_run_reports_its_best_validation_and_test_losses.
FAMILY_RUNS = [
    *[("chorales", o) for o in ("sgd_cr", "hf", "sophia_g", "lbfgs")],
    ("text", "hf"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("data, optimizer", FAMILY_RUNS)
def test_every_optimizer_family_trains_on_natural_data(
    optimizer, data, small_chorales, small_text
):
    task = small_chorales[0] if data == "chorales" else small_text
    hparams = {"max_cg_iters": 5} if optimizer == "hf" else {}
    probes = optimizer == "sgd_cr"  # curvature probes run on the data too
    result = run(task, optimizer, seeds=2, steps=4, eval_every=2, opt_hparams=hparams,
                 eval_size=32, probe_every=2 if probes else None)  # fmt: skip
    records = result.records
    assert len(records) == 4 and np.isfinite(records["test_loss"]).all()
    assert np.isfinite(result.summary["best_eval_loss"]).all()
    assert result.probes.empty != probes


def test_read_text_rejects_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_text(str(tmp_path))


def test_evaluate_at_other_lengths_refuses_held_out_data():
    from runner.evaluate import task_at_length

    with pytest.raises(ConfigError, match="held-out data"):
        task_at_length("text", {"hidden": 4}, 50)
