"""The tuning protocol: search sequences, validation, selection, end to end."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.report import write_report
from analysis.results import TUNING_DIR, Results, read_run, run_files, write_tuning
from analysis.sensitivity import tuning_table
from runner.cli import main
from runner.compare import _set_aside
from runner.config import parse_comparison
from runner.tuning import SearchSpace, choose, trial_score, unit_points
from tasks import ConfigError

BASE = {
    "seeds": 2,
    "steps": 40,
    "eval_every": 20,
    "eval_size": 32,
    "task": [{"name": "temporal_order", "length": 10, "hidden": 6}],
}


def _comparison(optimizer: dict, tuning: dict | None = None, **fields):
    data = {**BASE, "optimizer": [optimizer], **fields}
    if tuning is not None:
        data["tuning"] = tuning
    return parse_comparison(data)


# ----------------------------------------------------------------- search sequences
@pytest.mark.parametrize("sampler", ["sobol", "halton"])
def test_sequence_is_reproducible_and_seed_dependent(sampler):
    a = unit_points(16, 3, sampler, seed=4)
    np.testing.assert_array_equal(a, unit_points(16, 3, sampler, seed=4))
    assert not np.array_equal(a, unit_points(16, 3, sampler, seed=5))
    assert a.shape == (16, 3) and (a >= 0).all() and (a < 1).all()


def test_sobol_points_stratify_every_axis():
    # The first 2^m points of a (scrambled) Sobol sequence are a (0, m, 1)-net in
    # each coordinate: exactly one point in each interval [k / 2^m, (k + 1) / 2^m).
    points = unit_points(16, 4, "sobol", seed=0)
    for axis in range(4):
        cells = np.floor(points[:, axis] * 16).astype(int)
        assert sorted(cells) == list(range(16))


def test_sobol_prefix_of_a_power_of_two():
    # 12 trials are the first 12 of the 16-point sequence (no balance warning).
    np.testing.assert_array_equal(
        unit_points(12, 2, "sobol", 3), unit_points(16, 2, "sobol", 3)[:12]
    )


def test_values_cover_the_declared_ranges():
    space = SearchSpace.parse(
        {
            "learning_rate": {"log_uniform": [1e-4, 1.0]},
            "threshold": {"uniform": [0.5, 2.0]},
            "ema": [0.0, 0.9, 0.99],
        },
        "test",
    )
    points = space.points(64, "sobol", seed=1)
    lr = np.array([p["learning_rate"] for p in points])
    th = np.array([p["threshold"] for p in points])
    assert (lr >= 1e-4).all() and (lr <= 1.0).all()
    # Log-uniform: a quarter of the points in each decade.
    decades = np.floor(np.log10(lr) + 4).astype(int)
    assert np.bincount(decades, minlength=4).tolist() == [16, 16, 16, 16]
    assert (th >= 0.5).all() and (th <= 2.0).all()
    assert np.mean(th < 1.25) == 0.5
    emas = [p["ema"] for p in points]
    assert {emas.count(v) for v in (0.0, 0.9, 0.99)} <= {21, 22}


def test_deepobs_preset_on_its_grid_is_the_deepobs_grid():
    space = SearchSpace.parse("deepobs_lr", "test")
    values = [p["learning_rate"] for p in space.points(36, "grid", seed=0)]
    np.testing.assert_allclose(values, np.logspace(-5, 2, 36), rtol=1e-9)


# --------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "optimizer, tuning, message",
    [
        ({"name": "sgd", "search": "deepobs_lr"}, None, "needs a [tuning] table"),
        ({"name": "sgd", "search": {"learning_rate": {"normal": [0, 1]}}}, {},
         "unknown kind 'normal'"),
        ({"name": "sgd", "search": {"learning_rate": {"uniform": [1, 0.1]}}}, {},
         "needs low < high"),
        ({"name": "sgd", "search": {"learning_rate": {"log_uniform": [0, 1]}}}, {},
         "needs 0 < low"),
        ({"name": "sgd", "search": "nope"}, {}, "unknown search preset 'nope'"),
        ({"name": "sgd", "search": "deepobs_lr", "learning_rate": 0.1}, {},
         "both fixed and in 'search'"),
        ({"name": "sgd", "search": "deepobs_lr", "grid": {"learning_rate": [1.0]}},
         {}, "either 'grid' or 'search'"),
        ({"name": "sgd", "search": "deepobs_lr"}, {"seeds": [1, 7]},
         "shares seed 1 with the held-out"),
        ({"name": "sgd", "search": "deepobs_lr"}, {"budget": 3},
         "unknown tuning field 'budget'"),
        ({"name": "sgd", "search": "deepobs_lr"}, {"criterion": "speed"},
         "valid: grad_equivalents, updates, seconds, eval_loss"),
        ({"name": "sgd_clip", "search": {"learning_rate": [0.1], "threshold": [1.0]}},
         {"sampler": "grid"}, "'grid' takes one tuned hyperparameter"),
        ({"name": "sgd", "search": {"momentum_typo": [0.1]}}, {},
         "momentum_typo"),
        ({"name": "sgd"}, {}, "needs at least one [[optimizer]] with a 'search'"),
    ],
)  # fmt: skip
def test_bad_tuning_input_is_refused_before_anything_runs(optimizer, tuning, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(
        "(", r"\(")):  # fmt: skip
        _comparison(optimizer, tuning)


def test_trials_use_tuning_seeds_and_options_held_out_the_files():
    comparison = _comparison(
        {"name": "sgd_clip", "label": "C", "search": {"learning_rate": [0.1, 0.2]}},
        {"trials": 2, "sampler": "grid", "steps": 20},
    )
    (study,) = comparison.studies
    assert [t.options.seeds for t in study.trials] == [(2, 3), (2, 3)]
    assert [t.options.steps for t in study.trials] == [20, 20]
    assert [t.label for t in study.trials] == ["C trial 1", "C trial 2"]
    assert [h.options.seeds for h in study.held_out] == [(0, 1), (0, 1)]
    assert [h.options.steps for h in study.held_out] == [40, 40]
    assert [h.optimizer.hparams["learning_rate"] for h in study.held_out] == [0.1, 0.2]
    assert comparison.runs == ()


# ---------------------------------------------------------------------- selection
def _summary(statuses, costs):
    return pd.DataFrame(
        {
            "seed": range(len(statuses)),
            "status": statuses,
            "steps_to_solve": costs,
            "grad_equivalents_to_solve": [None if c is None else 2 * c for c in costs],
            "seconds_to_solve": costs,
        }
    )


def _records(losses):
    return pd.DataFrame(
        {"seed": range(len(losses)), "step": [10] * len(losses), "eval_loss": losses}
    )


def test_trial_score_counts_divergence_as_infinitely_slow():
    score = trial_score(
        _summary(["solved", "diverged", "solved"], [100, None, 300]),
        _records([0.1, float("nan"), 0.3]),
        "grad_equivalents",
    )
    assert score["solved_fraction"] == pytest.approx(2 / 3)
    assert score["median_cost"] == 400  # median of 200 and 600
    assert score["final_loss"] == 0.3  # median of 0.1, inf, 0.3
    failed = trial_score(None, None, "updates")
    assert failed == {"solved_fraction": 0.0, "median_cost": math.inf,
                      "final_loss": math.inf}  # fmt: skip


def test_choose_ranks_solved_fraction_then_cost_then_loss():
    inf = math.inf
    scores = [
        {"solved_fraction": 0.5, "median_cost": 10, "final_loss": 0.1},
        {"solved_fraction": 1.0, "median_cost": 900, "final_loss": 0.5},
        {"solved_fraction": 1.0, "median_cost": 300, "final_loss": 0.9},
        {"solved_fraction": 1.0, "median_cost": 300, "final_loss": 0.2},
        {"solved_fraction": 0.0, "median_cost": inf, "final_loss": inf},
    ]
    assert choose(scores, "updates") == 3
    assert choose(scores, "eval_loss") == 0  # the lowest final loss alone
    tie = [{"solved_fraction": 0.0, "median_cost": inf, "final_loss": inf}] * 3
    assert choose(tie, "updates") == 0  # every trial diverged: the first, no error


# -------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tuned_comparison_end_to_end(tmp_path, capsys):
    # Two learning rates for plain SGD: 1e5 wrecks the model (it saturates or
    # diverges), 0.5 does not; neither solves in 40 steps, so the lower final loss
    # decides. Tuning must pick 0.5 and re-run it on the held-out seeds only.
    path = tmp_path / "tuned.toml"
    path.write_text(
        'name = "tuned"\nseeds = 2\nsteps = 40\neval_every = 20\neval_size = 32\n'
        '[tuning]\ntrials = 2\nsampler = "grid"\nseeds = [5, 6]\n'
        '[[task]]\nname = "temporal_order"\nlength = 10\nhidden = 6\n'
        '[[optimizer]]\nname = "sgd"\nlabel = "SGD"\n'
        "search = { learning_rate = [1e5, 0.5] }\n"
    )
    out = tmp_path / "out"
    code = main(["compare", str(path), "--out", str(out), "--executor", "serial",
                 "--quiet"])  # fmt: skip
    assert code == 0
    trials = [read_run(f) for f in run_files(out / TUNING_DIR)]
    assert sorted(t["config"]["optimizer"]["hparams"]["learning_rate"]
                  for t in trials) == [0.5, 1e5]  # fmt: skip
    assert all(t["config"]["seeds"] == [5, 6] for t in trials)

    def final_loss(trial):  # median over seeds of the last evaluation loss
        last = pd.DataFrame(trial["records"]).sort_values("step").groupby("seed")
        losses = last["eval_loss"].last().fillna(math.inf)
        return float(np.median(losses))

    by_lr = {t["config"]["optimizer"]["hparams"]["learning_rate"]: t for t in trials}
    assert final_loss(by_lr[0.5]) < final_loss(by_lr[1e5])
    (held_out,) = [read_run(f) for f in run_files(out)]
    assert held_out["config"]["seeds"] == [0, 1]
    assert held_out["config"]["label"] == "SGD"
    assert held_out["config"]["optimizer"]["hparams"]["learning_rate"] == 0.5
    tuning = json.loads((out / "tuned.tuning.json").read_text())
    (study,) = tuning["studies"]
    assert study["run_id"] == held_out["config"]["run_id"]
    assert study["trials"][study["chosen"]]["hparams"] == {"learning_rate": 0.5}
    frame = Results.load(out).tuning
    assert frame["chosen"].tolist() == [False, True]
    assert frame["final_loss"].tolist() == pytest.approx(
        [final_loss(by_lr[1e5]), final_loss(by_lr[0.5])]
    )
    text = capsys.readouterr().out
    assert "Tuning (grad_equivalents" in text and "0.5" in text
    page = write_report(out).read_text()
    assert 'id="tuning"' in page and 'id="sensitivity"' in page


def test_held_out_runs_of_trials_no_longer_chosen_are_set_aside(tmp_path):
    # An earlier invocation chose trial 1 and trained its held-out run; now trial 2
    # is chosen: trial 1's held-out files move to tuning/superseded, so the table
    # never shows two rows under one label.
    comparison = _comparison(
        {"name": "sgd", "label": "SGD", "search": {"learning_rate": [0.1, 0.2]}},
        {"trials": 2, "sampler": "grid"},
    )
    (study,) = comparison.studies
    stale = tmp_path / f"{study.held_out[0].run_id}.json"
    stale.write_text("{}")
    stale.with_suffix(".params.npz").write_bytes(b"")
    (stale.with_suffix(".ckpt")).mkdir()
    kept = tmp_path / f"{study.held_out[1].run_id}.json"
    kept.write_text("{}")
    _set_aside(study, 1, tmp_path)
    moved = tmp_path / TUNING_DIR / "superseded"
    assert sorted(p.name for p in moved.iterdir()) == sorted(
        [stale.name, stale.with_suffix(".params.npz").name,
         stale.with_suffix(".ckpt").name]
    )  # fmt: skip
    assert not stale.exists() and kept.exists()


def _study(index, task, lr_chosen):
    trials = [
        {"trial": i + 1, "run_id": f"r{index}-{i}", "hparams": {"learning_rate": lr},
         "solved_fraction": 0.0, "median_cost": None, "final_loss": 1.0 - lr,
         "error": None}
        for i, lr in enumerate([0.1, lr_chosen])
    ]  # fmt: skip
    return {
        "study": index, "label": "SGD", "optimizer": "sgd", "task": task,
        "space": {"learning_rate": {"choice": [0.1, lr_chosen]}}, "trials": trials,
        "chosen": 1, "run_id": f"held-{index}",
    }  # fmt: skip


def test_tuning_table_has_one_row_per_study(tmp_path):
    # Studies that differ in length, in a setting outside (task, length, init), or
    # that lack a length altogether each keep their own row and choice.
    tasks = [
        {"name": "temporal_order", "length": 20, "hidden": 8},
        {"name": "temporal_order", "length": 200, "min_length": 50, "hidden": 8},
        {"name": "temporal_order", "length": 200, "hidden": 8},
        {"name": "temporal_order", "length": 200, "hidden": 16},
        {"name": "wall"},
    ]
    studies = [_study(i, task, 0.2 + i / 10) for i, task in enumerate(tasks)]
    write_tuning(tmp_path, "t", {"criterion": "updates"}, studies)
    table = tuning_table(Results.load(tmp_path, require=False).tuning)
    assert len(table) == 5
    assert table["learning_rate"].tolist() == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    assert table["median_cost"].tolist() == [math.inf] * 5  # null: never solved


def test_default_tuning_seeds_follow_every_held_out_seed():
    # An optimizer's own seeds = 6 (0..5) is held out too: tuning takes 6 and 7.
    comparison = _comparison(
        {"name": "sgd", "seeds": 6, "search": "deepobs_lr"}, {"trials": 2}
    )
    (study,) = comparison.studies
    assert study.trials[0].options.seeds == (6, 7)
    assert study.held_out[0].options.seeds == tuple(range(6))
