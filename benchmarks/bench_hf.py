"""Cost of Hessian-free's pieces in gradient-equivalents, in both product forms.

1. The Gauss-Newton-vector product relative to one gradient on the same batch, for
   each form (:func:`optimizers.curvature.gauss_newton_operator`): ``setup``, the
   one-off cost of building the operator (the linearization, or forming the
   per-sequence Jacobian), and the marginal cost of each product,
   ``(time of N products - time of 1) / (N - 1)`` (target for the linearized
   product: at most 1.2 gradients).
2. One HF update with exactly ``k`` CG iterations relative to a gradient, with the
   product HF picks by default (``auto``) and with the linearized one (target: at
   most ``k + 4`` gradient-equivalents). The update includes the runner's gradient,
   the operator, CG, backtracking evaluations, the product for rho and the line
   search.

XLA's default threads. Memorization scores every step (100 x 10 Jacobian rows per
sequence), so ``auto`` keeps the linearized product there and the Jacobian form is
not timed.

    python benchmarks/bench_hf.py [--quick]
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from timing import best_time

from optimizers import Objective, loss_grads_and_states, make_optimizer
from optimizers.curvature import gauss_newton_operator, jacobian_form_fits
from tasks import make_task


def product_cost(
    task, params, batch, n_products: int, operator, repeats: int = 5
) -> tuple[float, float, float]:
    """(seconds per gradient, setup seconds, marginal seconds per product).

    ``operator(task, params, batch)`` builds ``v -> A v``; ``setup`` is its one-off
    cost, ``marginal`` that of each product after it.
    """
    grad = jax.jit(jax.grad(task.loss))
    t_grad = best_time(grad, params, batch, repeats=2 * repeats)

    def products(params, v, n):
        matvec = operator(task, params, batch)
        return jax.lax.fori_loop(0, n, lambda _, w: otu.tree_scale(1e-3, matvec(w)), v)

    run_n = jax.jit(products, static_argnums=2)
    v = jax.tree.map(jnp.ones_like, params)
    t_many = best_time(run_n, params, v, n_products, repeats=repeats)
    t_one = best_time(run_n, params, v, 1, repeats=repeats)
    marginal = (t_many - t_one) / (n_products - 1)
    return t_grad, t_one - marginal, marginal


def update_cost(
    task, params, batch, k: int, damping: float, product: str, repeats: int
) -> float:
    """Seconds of one HF update with exactly ``k`` CG iterations."""
    opt = make_optimizer(
        "hf", min_cg_iters=k, max_cg_iters=k, damping=damping, product=product
    )

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
    n_products = 20 if args.quick else 50
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(
        "| task | hidden | product | setup / gradient | G v / gradient "
        "| HF update k=10 | k=50 |"
    )
    print("|---|---|---|---|---|---|---|")
    configs = (
        ("temporal_order", "basic_tanh", 50, 1e-3),
        ("temporal_order", "basic_tanh", 100, 1e-3),
        ("memorization", "smart_tanh", 50, 1e-2),
    )
    for name, init, hidden, damping in configs:
        task = make_task(name, length=100, hidden=hidden, batch_size=100, init=init)
        params = task.init(jax.random.PRNGKey(0))
        batch = task.sample_batch(jax.random.PRNGKey(1))
        forms = ["linearize"]
        if jacobian_form_fits(task, params, batch):
            forms.insert(0, "jacobian")
        for form in forms:
            operator = partial(gauss_newton_operator, form=form)
            t_grad, setup, marginal = product_cost(
                task, params, batch, n_products, operator, repeats
            )
            # HF's default (auto) is the first form listed: the Jacobian where it fits.
            product = "auto" if form == forms[0] else form
            updates = [
                update_cost(task, params, batch, k, damping, product, repeats) / t_grad
                for k in (10, 50)
            ]
            print(
                f"| {name} | {hidden} | {form} ({product}) | {setup / t_grad:.2f} "
                f"| {marginal / t_grad:.3f} | {updates[0]:.1f} (target <= 14) "
                f"| {updates[1]:.1f} (target <= 54) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
