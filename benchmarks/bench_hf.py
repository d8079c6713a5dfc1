"""Cost of Hessian-free's pieces in gradient-equivalents.

1. One Gauss-Newton-vector product inside CG relative to one gradient on the same
   batch. The linearization is computed once; the marginal cost of a product is
   ``(time of N products - time of 0 products) / N`` (target: at most 1.2x).
2. One HF update with exactly ``k`` CG iterations relative to a gradient (target: at
   most ``k + 4`` gradient-equivalents). The update includes the linearization, CG,
   backtracking evaluations, the product for rho and the line search.

    python benchmarks/bench_hf.py [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from timing import best_time

from optimizers import Objective, loss_grads_and_states, make_optimizer
from optimizers.curvature import gauss_newton_operator
from tasks import make_task


def product_cost(
    task, params, batch, n_products: int, operator=gauss_newton_operator
) -> tuple[float, float]:
    """(seconds per gradient, marginal seconds per product of ``operator``)."""
    grad = jax.jit(jax.grad(task.loss))
    t_grad = best_time(grad, params, batch, repeats=10)

    def products(params, v, n):
        matvec = operator(task, params, batch)
        return jax.lax.fori_loop(0, n, lambda _, w: otu.tree_scale(1e-3, matvec(w)), v)

    run_n = jax.jit(products, static_argnums=2)
    v = jax.tree.map(jnp.ones_like, params)
    t_many = best_time(run_n, params, v, n_products)
    t_none = best_time(run_n, params, v, 0)
    return t_grad, (t_many - t_none) / n_products


def update_cost(task, params, batch, k: int, damping: float, repeats: int = 5) -> float:
    """Seconds of one HF update with exactly ``k`` CG iterations."""
    opt = make_optimizer("hf", min_cg_iters=k, max_cg_iters=k, damping=damping)

    def step(params, state):
        loss, grads, states, sgrads = loss_grads_and_states(task, params, batch)
        objective = Objective(task, batch, batch, loss, grads, states, sgrads)
        return opt.update(grads, state, params, objective=objective)

    step = jax.jit(step)
    state = opt.init(params)
    _, new_state = step(params, state)
    assert int(new_state.record.values["cg_iters"]) == k
    return best_time(step, params, state, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(
        "| task | init | hidden | length | batch | G v / gradient | HF update k=10 "
        "| k=50 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    configs = (
        ("temporal_order", "basic_tanh", 50, 1e-3),
        ("temporal_order", "basic_tanh", 100, 1e-3),
        ("memorization", "smart_tanh", 50, 1e-2),
    )
    for name, init, hidden, damping in configs:
        task = make_task(name, length=100, hidden=hidden, batch_size=100, init=init)
        params = task.init(jax.random.PRNGKey(0))
        batch = task.sample_batch(jax.random.PRNGKey(1))
        t_grad, t_prod = product_cost(task, params, batch, 20 if args.quick else 50)
        ratios = [
            update_cost(task, params, batch, k, damping, repeats) / t_grad
            for k in (10, 50)
        ]
        print(
            f"| {name} | {init} | {hidden} | 100 | 100 | {t_prod / t_grad:.2f}x "
            f"| {ratios[0]:.1f} (target <= 14) | {ratios[1]:.1f} (target <= 54) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
