"""Register a user optimizer by name from Python and train with it.

``optimizers.register_optimizer(name, factory)`` adds the factory to the registry
for this process, so ``name`` then works everywhere a built-in name does:
``runner.run.run``, ``runner.config.parse_comparison`` and
``optimizers.make_optimizer``. The factory's signature declares and validates its
hyperparameters, as for built-in methods.

Run from the repository root (a few seconds on 2 CPU cores)::

    python -m examples.register_from_python
"""

from __future__ import annotations

import pandas as pd

import optimizers
from examples.newton_step import newton_step
from runner.run import RunResult, run

NAME = "newton_step"


def main(steps: int = 300, seeds: int = 2) -> RunResult:
    """Register :func:`~examples.newton_step.newton_step` and run it on a tiny task.

    Args:
      steps: maximum updates per seed.
      seeds: number of seeds (vmapped).

    Returns:
      The run's result (not written to disk: ``out=None``).
    """
    if NAME not in optimizers.OPTIMIZERS:
        optimizers.register_optimizer(NAME, newton_step)
    result = run(
        "temporal_order",
        NAME,
        seeds=seeds,
        steps=steps,
        task_hparams={"length": 10, "hidden": 8, "init": "basic_tanh"},
        opt_hparams={"alpha": 2.0, "max_step": 0.5},
        eval_every=50,
        eval_size=500,
    )
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print(result.summary.to_string(index=False))
        columns = ["seed", "step", "loss", "eval_error", "grad_norm_mean"]
        columns += ["curvature_mean", "newton_step_mean", "curvature_products"]
        print(result.records[columns].to_string(index=False))
    return result


if __name__ == "__main__":
    main()
