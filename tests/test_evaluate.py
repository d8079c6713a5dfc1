"""Length generalization: ``runner.evaluate`` and ``curvbench evaluate``.

The references here count wrong sequences without the code under test: the keys come
from the formula documented in :mod:`runner.evaluate`, the network runs one sequence
at a time through ``task.apply`` (all steps), and NumPy picks each sequence's last
step, its predicted class and its cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from analysis.results import RunResult, write_run
from runner.cli import main
from runner.evaluate import (
    COLUMNS,
    batch_sizes,
    evaluate,
    format_table,
    length_key,
    sample_sequences,
)
from runner.run import run
from tasks.hparams import ConfigError
from tasks.registry import make_task

#: A small temporal-order model trained (nominally) on lengths 10 to 20.
HPARAMS = {"length": 20, "min_length": 10, "hidden": 4, "batch_size": 4}


def write_hand_run(
    folder: Path,
    params: dict,
    seeds: list[int],
    statuses: list[str] | None = None,
    task: str = "temporal_order",
    hparams: dict | None = None,
    run_id: str = "hand",
) -> Path:
    """A run file with the given parameters (leading seed axis), as training writes."""
    described = {"name": task, **(HPARAMS if hparams is None else hparams)}
    config = {
        "task": described, "optimizer": {"name": "none", "hparams": {}},
        "label": "by hand", "seeds": seeds, "run_id": run_id,
    }  # fmt: skip
    summary = pd.DataFrame(
        {"seed": seeds, "status": statuses or ["unsolved"] * len(seeds)}
    )
    result = RunResult(
        config, pd.DataFrame(), summary, jax.tree.map(np.asarray, params), None
    )
    return write_run(folder / f"{run_id}.json", result, {}, {})


def init_params(seeds: list[int], hparams: dict | None = None) -> dict:
    """The task's initial parameters for ``seeds`` (leading seed axis)."""
    task = make_task("temporal_order", **(hparams or HPARAMS))
    return jax.vmap(task.init)(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))


def reference(
    params: dict, hparams: dict, seed: int, length: int, count: int
) -> tuple[int, float]:
    """Wrong sequences and mean cross-entropy, one sequence at a time."""
    task = make_task(
        "temporal_order", **{**hparams, "length": length, "min_length": length}
    )
    base = jax.random.fold_in(jax.random.PRNGKey(seed), 0x6576616C)
    base = jax.random.fold_in(base, length)

    @jax.jit  # one program, not one dispatch per operation
    def forward(params, base):
        keys = jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(count))
        batches = jax.vmap(lambda k: task.sample_batch(k, 1))(keys)
        return batches, jax.vmap(lambda x: task.apply(params, x))(batches.inputs)[0]

    batches, outputs = forward(params, base)
    lengths = np.asarray(batches.lengths)[:, 0]
    assert (lengths == length).all()
    index = np.arange(count)
    last = np.asarray(outputs, np.float64)[index, lengths - 1, 0]  # [count, 4]
    target = np.asarray(batches.targets)[index, lengths - 1, 0]
    errors = int((last.argmax(-1) != target).sum())
    log_z = np.log(np.exp(last - last.max(-1, keepdims=True)).sum(-1))
    log_z += last.max(-1)
    loss = float(np.mean(log_z - last[index, target]))
    return errors, loss


def test_sequences_follow_the_documented_keys_whatever_the_batch():
    task = make_task("temporal_order", **{**HPARAMS, "length": 12, "min_length": 12})
    key = length_key(7, 12)
    whole = sample_sequences(task, key, jnp.uint32(0), 5)
    tail = sample_sequences(task, key, jnp.uint32(3), 2)
    base = jax.random.fold_in(jax.random.PRNGKey(7), 0x6576616C)
    sample_one = jax.jit(lambda k: task.sample_batch(k, 1))
    for j in range(5):
        one = sample_one(jax.random.fold_in(jax.random.fold_in(base, 12), j))
        for field in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(
                getattr(whole, field)[:, j], getattr(one, field)[:, 0]
            )
            np.testing.assert_array_equal(
                getattr(tail, field), getattr(whole, field)[:, 3:5]
            )
        assert whole.lengths[j] == one.lengths[0]
    assert whole.inputs.shape == (12, 5, 6) and whole.lengths.tolist() == [12] * 5
    assert batch_sizes(10, 4) == [4, 4, 2] and batch_sizes(3, 10) == [3]


def test_counts_match_an_independent_reference(tmp_path):
    params = init_params([0, 1])
    path = write_hand_run(tmp_path, params, [0, 1], ["solved", "unsolved"])
    frame = evaluate(path, [12, 15], sequences=80, batch=40, seed=3)
    assert list(frame.columns) == list(COLUMNS)
    assert frame[["seed", "length"]].values.tolist() == [[0, 12], [1, 12],
                                                         [0, 15], [1, 15]]  # fmt: skip
    for row in frame.itertuples():
        one = jax.tree.map(lambda p, i=row.seed: p[i], params)
        errors, loss = reference(one, HPARAMS, 3, row.length, 80)
        assert row.errors == errors
        assert 0 < errors < 80  # random weights: a real test of the count
        assert row.error_rate == errors / 80
        np.testing.assert_allclose(row.loss, loss, rtol=1e-5)
    assert frame["sequences"].eq(80).all() and frame["step"].isna().all()
    assert frame["training_status"].tolist() == ["solved", "unsolved"] * 2
    assert (frame["run_id"] == "hand").all() and (frame["optimizer"] == "by hand").all()
    table = format_table(frame)
    assert "final parameters" in table and table.count("1/2 solved") == 2


def test_batch_size_and_order_of_lengths_do_not_change_the_counts(tmp_path):
    path = write_hand_run(tmp_path, init_params([5]), [5])
    a = evaluate(path, [15, 11], sequences=40, batch=40)
    b = evaluate(path, [11, 15], sequences=40, batch=8)
    b = b.set_index("length").loc[[15, 11]].reset_index()
    np.testing.assert_array_equal(a["errors"], b["errors"])
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    other_seed = evaluate(path, [11, 15], sequences=40, batch=40, seed=1)
    assert not np.array_equal(other_seed["loss"], b["loss"])


def test_a_constant_readout_is_wrong_on_every_other_class(tmp_path):
    params = init_params([0])
    params["W_out"] = jnp.zeros_like(params["W_out"])
    params["b_out"] = jnp.array([[0.0, 0.0, 5.0, 0.0]])  # always predicts class 2
    path = write_hand_run(tmp_path, params, [0])
    frame = evaluate(path, [11, 15], sequences=80, batch=40, seed=11)
    for row in frame.itertuples():
        task = make_task(
            "temporal_order", **{**HPARAMS, "length": row.length,
                                 "min_length": row.length}
        )  # fmt: skip
        base = jax.random.fold_in(jax.random.PRNGKey(11), 0x6576616C)
        base = jax.random.fold_in(base, row.length)
        targets = jax.jit(
            lambda b, t=task: jax.vmap(
                lambda j: t.sample_batch(jax.random.fold_in(b, j), 1).targets[-1, 0]
            )(jnp.arange(80))
        )(base)
        other = int((targets != 2).sum())
        assert row.errors == other
        log_z = np.log(3.0 + np.exp(5.0))
        expected = (other * log_z + (80 - other) * (log_z - 5.0)) / 80
        np.testing.assert_allclose(row.loss, expected, rtol=1e-5)


def test_a_plug_in_task_by_import_path(tmp_path):
    path = write_hand_run(tmp_path, init_params([2]), [2], task="tasks.sequence:xor",
                          hparams={**HPARAMS, "hidden": 4})  # fmt: skip
    # Parameters of another shape (xor has 2 inputs and 1 output, temporal order 6
    # and 4) are refused, naming the task.
    with pytest.raises(ConfigError, match="do not match task 'xor'"):
        evaluate(path, [12], sequences=10)
    path = write_hand_run(
        tmp_path, init_params([2]), [2], task="tasks.sequence:temporal_order",
        run_id="plugin",
    )  # fmt: skip
    frame = evaluate(path, [12], sequences=80, batch=40)
    one = jax.tree.map(lambda p: p[0], init_params([2]))
    assert frame["errors"].item() == reference(one, HPARAMS, 0, 12, 80)[0]
    assert frame["task"].item() == "tasks.sequence:temporal_order"


@pytest.fixture
def hand_run(tmp_path) -> Path:
    return write_hand_run(tmp_path, init_params([0, 1]), [0, 1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lengths": [5]}, "'length' = 5 is too short for 'temporal_order'"),
        ({"lengths": [0]}, "'length' = 0 must be a positive integer"),
        ({"lengths": []}, "at least one sequence length"),
        ({"lengths": [12], "sequences": 0}, "'sequences' = 0 must be a positive"),
        ({"lengths": [12], "batch": -3}, "'batch' = -3 must be a positive"),
        ({"lengths": [12], "seed": -1}, "'seed' = -1 must be an integer in"),
        ({"lengths": [12], "step": 7}, r"no checkpoint at that step; saved steps"),
        ({"lengths": [12], "sequences": 2**32}, "'sequences' = 4294967296 must be"),
        ({"lengths": [12], "sequences": 10**9, "batch": 10**9}, "'batch' = 10+: a"),
    ],
)
def test_bad_input_is_refused_before_compiling(hand_run, kwargs, message,
                                               count_compiles):  # fmt: skip
    with count_compiles() as compiles, pytest.raises(ConfigError, match=message):
        evaluate(hand_run, **kwargs)
    assert compiles.count == 0


def test_bad_run_files_name_the_file(tmp_path, hand_run):
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(tmp_path / "missing.json", [12])
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        evaluate(damaged, [12])
    hand_run.with_suffix(".params.npz").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="damaged"):
        evaluate(hand_run, [12])
    wall = write_hand_run(tmp_path, {}, [0], task="wall", hparams={}, run_id="wall")
    for lengths in ([100], None):
        with pytest.raises(ConfigError, match="'wall' has no hyperparameter 'length'"):
            evaluate(wall, lengths)


def test_cli_bad_input_exits_2_with_one_line(hand_run, tmp_path, capsys):
    assert main(["evaluate", str(hand_run), "--length", "5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "curvbench: error: task hyperparameter 'length' = 5 is too short for "
        "'temporal_order' (at least 10)"
    ]
    assert main(["evaluate", str(tmp_path / "nothing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(hand_run), "--length", "12", "--step", "3"]) == 2
    assert "no checkpoint at that step" in capsys.readouterr().err
    for flag in ("--length", "--sequences", "--batch"):
        with pytest.raises(SystemExit) as exit_:
            main(["evaluate", str(hand_run), flag, "0"])
        assert exit_.value.code == 2
        assert f"argument {flag}: '0' must be at least 1" in capsys.readouterr().err


def test_cli_prints_the_table_and_writes_csv(hand_run, tmp_path, capsys):
    csv = tmp_path / "out" / "eval.csv"
    code = main(["evaluate", str(hand_run), "--length", "12", "15", "--sequences",
                 "40", "--batch", "40", "--seed", "4", "--csv", str(csv)])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "length 15 seed 1:" in captured.err  # progress
    lines = captured.out.splitlines()
    assert lines[0] == "hand: task temporal_order, optimizer by hand, final parameters"
    assert lines[1].split() == ["seed", "length", "sequences", "errors", "error_rate",
                                "loss", "training", "seconds"]  # fmt: skip
    rows = [line.split() for line in lines[2:8]]
    assert [row[:3] for row in rows] == [
        ["0", "12", "40"], ["1", "12", "40"], ["all", "12", "80"],
        ["0", "15", "40"], ["1", "15", "40"], ["all", "15", "80"],
    ]  # fmt: skip
    assert rows[2][6:8] == ["0/2", "solved"]
    assert f"csv: {csv}" in captured.out
    written = pd.read_csv(csv)
    assert list(written.columns) == list(COLUMNS)
    assert written[["seed", "length"]].values.tolist() == [[0, 12], [1, 12], [0, 15],
                                                           [1, 15]]  # fmt: skip
    printed = [int(row[3]) for row in rows if row[0] != "all"]
    assert written["errors"].tolist() == printed
    assert int(rows[2][3]) == printed[0] + printed[1]
    assert written["step"].isna().all() and written["sequences"].eq(40).all()


@pytest.mark.slow
def test_a_trained_run_and_its_checkpoint(tmp_path, capsys):
    hp = {"length": 12, "min_length": 10, "hidden": 4, "batch_size": 4}
    result = run(
        "temporal_order", "sgd_clip", seeds=[1, 2], steps=20, eval_every=10,
        eval_size=20, task_hparams=hp, checkpoint_every=10, out=tmp_path,
    )  # fmt: skip
    final = evaluate(result.path, sequences=80, batch=40)  # its own length, 12
    assert final["length"].tolist() == [12, 12]
    statuses = dict(zip(result.summary["seed"], result.summary["status"], strict=True))
    for row in final.itertuples():
        i = [1, 2].index(row.seed)
        one = jax.tree.map(lambda p, i=i: np.asarray(p[i]), result.params)
        errors, loss = reference(one, hp, 0, 12, 80)
        assert row.errors == errors
        np.testing.assert_allclose(row.loss, loss, rtol=1e-5)
        assert row.training_status == statuses[row.seed]
    code = main(["evaluate", str(result.path), "--step", "10", "--length", "12",
                 "15", "--sequences", "80", "--batch", "40", "--quiet"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "step 10" in out.splitlines()[0]
    at_10 = evaluate(result.path, [12], sequences=80, batch=40, step=10)
    assert at_10["step"].tolist() == [10, 10]
    assert main(["evaluate", str(result.path), "--step", "15"]) == 2
    assert "saved steps: [10, 20]" in capsys.readouterr().err
