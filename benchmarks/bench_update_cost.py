"""Measured cost of one update of every registered optimizer, in gradients.

For each optimizer: the wall time of one jitted training step (the runner's gradient
plus ``update``) divided by the time of one gradient on the same batch, next to the
nominal gradient-equivalents the run records report for that update
(:func:`optimizers.base.gradient_equivalents`). Addition, length 100, 50 tanh
units, batch 20, curvature batch 20. HF is measured with CG capped at 10 iterations.

    python benchmarks/bench_update_cost.py
"""

from __future__ import annotations

import jax
from timing import best_time

from optimizers import OPTIMIZERS, Objective, loss_grads_and_states, make_optimizer
from optimizers.base import collect_work, gradient_equivalents
from tasks import make_task

SETTINGS = {
    "hf": {"max_cg_iters": 10, "min_cg_iters": 10, "damping": 1e-3},
    "sophia_h": {"every": 1},
    "sophia_g": {"every": 1},
}


def main() -> None:
    task = make_task("addition", length=100, hidden=50, init="basic_tanh")
    params = task.init(jax.random.PRNGKey(0))
    batch = task.sample_batch(jax.random.PRNGKey(1))
    t_grad = best_time(jax.jit(jax.grad(task.loss)), params, batch, repeats=20)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; gradient "
        f"{t_grad * 1e3:.2f} ms"
    )
    print("| optimizer | settings | measured (gradients) | recorded grad-equivalents |")
    print("|---|---|---|---|")
    for name in sorted(OPTIMIZERS):
        hparams = SETTINGS.get(name, {})
        opt = make_optimizer(name, **hparams)

        def step(params, state, key, opt=opt):
            loss, grads, states, sg = loss_grads_and_states(task, params, batch)
            objective = Objective(task, batch, batch, loss, grads, states, sg)
            updates, state = opt.update(
                grads, state, params, objective=objective, key=key, step=0
            )
            return updates, state

        step = jax.jit(step)
        state = opt.init(params)
        key = jax.random.PRNGKey(2)
        _, new_state = step(params, state, key)
        work = collect_work(new_state)
        nominal = 1 + gradient_equivalents(
            int(work.grad_evals), int(work.fun_evals), int(work.curvature_products),
            20, 20,
        )  # fmt: skip
        measured = best_time(step, params, state, key, repeats=20) / t_grad
        settings = ", ".join(f"{k}={v}" for k, v in hparams.items()) or "defaults"
        print(f"| {name} | {settings} | {measured:.2f} | {nominal:.1f} |", flush=True)


if __name__ == "__main__":
    main()
