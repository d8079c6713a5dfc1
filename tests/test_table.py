"""The comparison table pools seeds of one configuration, never two configurations."""

import pandas as pd

from analysis.results import config_columns
from analysis.table import comparison_table


def _config(seeds, steps=40, lr=0.1, label="SGD-C"):
    return {
        "task": {"name": "addition", "length": 10, "hidden": 6},
        "optimizer": {"name": "sgd_clip", "hparams": {"learning_rate": lr}},
        "label": label, "seeds": seeds, "steps": steps, "eval_every": 20,
        "run_id": f"r-{steps}-{lr}-{seeds[0]}",
    }  # fmt: skip


def _summary(*configs):
    rows = []
    for config in configs:
        for seed in config["seeds"]:
            status = "solved" if seed % 2 == 0 else "unsolved"
            rows.append(
                {"seed": seed, "status": status, "steps_to_solve": 10.0,
                 "run_seconds": 1.0, **config_columns(config)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_seeds_of_one_configuration_pool_into_one_row():
    table = comparison_table(_summary(_config([0, 1]), _config([2, 3])))
    assert len(table) == 1 and int(table.seeds.iloc[0]) == 4
    assert "steps" not in table.columns


def test_two_budgets_are_two_rows_with_their_steps():
    table = comparison_table(_summary(_config([0, 1]), _config([0, 1], steps=80)))
    assert sorted(table.steps) == [40, 80]
    assert list(table.seeds) == [2, 2]


def test_two_settings_under_one_label_are_two_rows():
    table = comparison_table(_summary(_config([0, 1]), _config([0, 1], lr=0.5)))
    assert sorted(table.opt_learning_rate) == [0.1, 0.5]
    assert list(table.seeds) == [2, 2]


def test_other_labels_keep_their_own_rows_without_extra_columns():
    table = comparison_table(
        _summary(_config([0, 1]), _config([0, 1], steps=80, label="Other"))
    )
    assert sorted(table.optimizer) == ["Other", "SGD-C"]
    assert "steps" not in table.columns
