"""Training steps per second and curvature-product cost of the RNN recurrence.

Side by side in one process, in interleaved rounds (every contestant once per round,
the order rotated; the median over rounds is reported with the min-max spread):

* ``scan``: the states by a plain ``lax.scan`` (:func:`tasks.rnn.rnn_states_scan`),
  differentiated by JAX's own rules: what the toolkit did before;
* ``custom rule``: :func:`tasks.rnn.rnn_states`, whose forward-mode rule moves the
  weight tangent out of the time loop, with the output layer at every step;
* ``custom, scored``: the same, with the output layer only at the step the loss scores
  (:meth:`tasks.base.Task.apply_scored`): what the tasks use;
* ``torch eager`` and ``torch compiled``: ``torch.nn.RNN`` (tanh) and a linear
  read-out of the last state, the same sizes, when PyTorch is installed (it is not a
  dependency: ``pip install torch`` to include it).

The task is addition (Hochreiter & Schmidhuber 1997; squared error at the last step),
length 100, batch 20, ``basic_tanh`` initialization; the step is a gradient, global
norm clipping at 1 and an SGD update. Everything runs on one thread (XLA and
PyTorch), as one worker of a sweep does. The same script reports one Gauss-Newton-
vector product and one exact Hessian-vector product in gradients (the marginal cost
of a product with the linearization reused, as inside CG and Lanczos), and for the
scored variant the Gauss-Newton product in Hessian-free's default Jacobian form: the
one-off cost of forming the per-sequence Jacobian (one row on addition) plus the
marginal cost of each product.

    python benchmarks/bench_recurrence.py [--quick]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
)

import copy
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_hf import product_cost
from timing import quick_option, rnn_problem

from optimizers.curvature import gauss_newton_operator, hessian_operator
from tasks import Task
from tasks.rnn import rnn_states_scan

LENGTH, BATCH, LEARNING_RATE, THRESHOLD = 100, 20, 0.01, 1.0


def every_step_task(task, apply=None):
    """A copy of ``task`` that reads out every step (and with ``apply``'s states).

    The loss then goes through :meth:`tasks.base.Task.apply_scored`'s default: all
    ``T`` outputs from ``apply``, of which the loss keeps the last. This is what the
    toolkit did before tasks declared the steps they score.
    """
    variant = copy.copy(task)
    variant.last_step_only = False
    if apply is not None:
        variant.apply = apply
    variant.apply_scored = functools.partial(Task.apply_scored, variant)
    return variant


def plain_scan_task(task):
    """A copy of ``task`` whose states come from the plain scan, read out everywhere."""

    def apply(params, inputs, state_offset=None):
        if state_offset is None:
            state_offset = jnp.zeros((*inputs.shape[:2], task.hidden), inputs.dtype)
        drive = inputs @ params["W_in"] + params["b"]
        states = rnn_states_scan(
            task.activation, task.leak, params["W_rec"], drive, state_offset
        )
        outputs = task.activation(states) @ params["W_out"] + params["b_out"]
        return outputs, states

    return every_step_task(task, apply)


def jax_step(task) -> Callable:
    """One clipped-SGD training step of ``task`` on a fixed batch, compiled."""
    opt = optax.chain(optax.clip_by_global_norm(THRESHOLD), optax.sgd(LEARNING_RATE))

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(task.loss)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step, opt.init


def torch_contestants(hidden: int, n_in: int, inputs, targets) -> dict:
    """``{name: step}`` for PyTorch eager and compiled (empty without PyTorch)."""
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.tensor(np.array(inputs))
    y = torch.tensor(np.array(targets))

    def build():
        rnn = torch.nn.RNN(n_in, hidden, nonlinearity="tanh")
        out = torch.nn.Linear(hidden, y.shape[-1])
        params = [*rnn.parameters(), *out.parameters()]
        return rnn, out, torch.optim.SGD(params, lr=LEARNING_RATE), params

    def make_step(compiled: bool):
        rnn, out, sgd, params = build()

        def loss_fn():
            states, _ = rnn(x)
            return torch.mean((out(states[-1]) - y) ** 2)

        if compiled:
            loss_fn = torch.compile(loss_fn)

        def step():
            sgd.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, THRESHOLD)
            sgd.step()
            return loss

        return step

    return {"torch eager": make_step(False), "torch compiled": make_step(True)}


def steps_per_second(contestants: dict, steps: int, rounds: int) -> dict:
    """Interleaved rounds: ``{name: [steps/s per round]}``."""
    rates = {name: [] for name in contestants}
    names = list(contestants)
    for name in names:  # warm up (compilation) outside the timed rounds
        contestants[name](3)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            contestants[name](steps)
            rates[name].append(steps / (time.perf_counter() - start))
    return rates


def jax_runner(task, params, batch) -> Callable:
    step, init = jax_step(task)

    def run(n):
        p, s = params, init(params)
        for _ in range(n):
            p, s = step(p, s, batch)
        jax.block_until_ready(p)

    return run


def torch_runner(step) -> Callable:
    def run(n):
        for _ in range(n):
            loss = step()
        float(loss.detach())

    return run


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    quick = quick_option(__doc__)
    steps, rounds = (100, 3) if quick else (300, 5)
    print(
        "| hidden | contestant | steps/s median (min-max) | vs scan | vs torch eager "
        "| gradient ms | G v / gradient | H v / gradient "
        "| Jacobian form: setup + G v / gradient |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for hidden in (50, 100):
        task, params, batch = rnn_problem("addition", hidden, LENGTH, BATCH)
        variants = {
            "scan": plain_scan_task(task),
            "custom rule": every_step_task(task),
            "custom, scored": task,
        }
        contestants = {n: jax_runner(t, params, batch) for n, t in variants.items()}
        last = np.asarray(batch.lengths)[0] - 1  # addition: one length per batch
        torch_steps = torch_contestants(
            hidden, task.n_in, batch.inputs[: last + 1], batch.targets[last]
        )
        contestants.update({n: torch_runner(s) for n, s in torch_steps.items()})
        rates = steps_per_second(contestants, steps, rounds)
        costs = {}
        for name, variant in variants.items():
            n = 10 if quick else 30
            timed = [
                product_cost(variant, params, batch, n, op)
                for op in (gauss_newton_operator, hessian_operator)
            ]
            t_grad = min(t for t, _, _ in timed)
            costs[name] = [t_grad * 1e3] + [t / t_grad for _, _, t in timed]
            if variant is task:  # HF's default on this last-step task
                jac = functools.partial(gauss_newton_operator, form="jacobian")
                # A product is ~1% of a gradient here: 10x more to resolve it.
                _, setup, marginal = product_cost(variant, params, batch, 10 * n, jac)
                costs[name].append(f"{setup / t_grad:.2f} + {marginal / t_grad:.3f}")
        scan = statistics.median(rates["scan"])
        eager = statistics.median(rates.get("torch eager", [float("nan")]))
        for name, values in rates.items():
            median = statistics.median(values)
            cost = [
                c if isinstance(c, str) else f"{c:.2f}" for c in costs.get(name, [])
            ]
            cost = (cost or ["--"] * 3) + ["--"] * (4 - max(len(cost), 3))
            print(
                f"| {hidden} | {name} | {_spread(values)} | {median / scan:.2f}x "
                f"| {median / eager:.2f}x | {' | '.join(cost)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
