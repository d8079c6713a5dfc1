"""Hessian-free and the diagonal methods against their JAX peers, at equal work.

Side by side in one process, one thread, in interleaved rounds (every contestant once
per round, the order rotated; the median over rounds with the min-max spread). Each
contestant is one jitted training step on the same fixed batch, gradient included:

* ``hf``: our Hessian-free with all of Martens' machinery (warm start, CG
  backtracking, Levenberg-Marquardt on rho, Armijo line search) and exactly ``k`` CG
  iterations, against somax's Gauss-Newton CG for cross-entropy (``somax.sgn_ce``:
  constant damping, exactly ``k`` iterations, no warm start, no line search);
* ``adahessian`` and ``sophia_h`` (one Hutchinson probe, estimate every step) against
  somax's ``adahessian`` and ``sophia_h`` and ``optax.contrib.sophia``
  (``update_interval=1``).

The task is temporal order (Hochreiter & Schmidhuber 1997): tanh RNN, length 100,
batch 100, softmax at the last step; the curvature batch is the gradient batch. The
peers get the RNN that a JAX user writes, a plain ``lax.scan``
(:func:`tasks.rnn.rnn_states_scan`), and, marked ``(our recurrence)``, the toolkit's
recurrence with its custom forward-mode rule, so the table separates the recurrence
from the optimizer. somax is not a dependency: ``pip install python-somax``.

    python benchmarks/bench_peers.py [--quick]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
)

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from timing import quick_option, rnn_problem

from optimizers import Objective, loss_grads_and_states, make_optimizer
from tasks.rnn import rnn_readout, rnn_states_scan

LENGTH, BATCH, DAMPING = 100, 100, 1e-3


def predictors(task) -> dict[str, Callable]:
    """``{name: predict(params, inputs) -> last-step logits [B, C]}`` for the peers."""

    def plain(params, inputs):
        drive = inputs @ params["W_in"] + params["b"]
        offset = jnp.zeros((*inputs.shape[:2], task.hidden), inputs.dtype)
        states = rnn_states_scan(
            task.activation, task.leak, params["W_rec"], drive, offset
        )
        return rnn_readout(params, states[-1], task.activation, task.leak)

    def ours(params, inputs):
        return task.apply(params, inputs)[0][-1]

    return {"": plain, " (our recurrence)": ours}


def our_step(task, opt) -> Callable:
    """A runner step: loss, gradient and states, then ``opt.update``."""

    @jax.jit
    def step(params, state, batch, key):
        loss, grads, states, sgrads = loss_grads_and_states(task, params, batch)
        objective = Objective(task, batch, batch, loss, grads, states, sgrads)
        updates, state = opt.update(
            grads, state, params, objective=objective, key=key, step=0
        )
        return optax.apply_updates(params, updates), state

    return step


def somax_step(method, k: int | None = None) -> Callable:
    """One somax step; with ``k``, each call checks that CG ran exactly ``k`` times."""

    @jax.jit
    def step(params, state, batch, key):
        params, state, info = method.step(params, batch, state, key)
        return params, state, info["cg_iters"] if k is not None else 0

    def checked(params, state, batch, key):
        params, state, iters = step(params, state, batch, key)
        if k is not None and int(iters) != k:
            raise RuntimeError(f"somax CG ran {int(iters)} iterations, not {k}")
        return params, state

    return checked


def optax_sophia_step(predict) -> Callable:
    opt = optax.contrib.sophia(0.01, update_interval=1)

    @jax.jit
    def step(params, state, batch, key):
        def loss(p):
            logits = predict(p, batch["x"])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, batch["y"]
            ).mean()

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params, obj_fn=loss)
        return optax.apply_updates(params, updates), state

    return step, opt.init


def contestants(task, params, batch, k: int) -> dict[str, Callable]:
    """``{name: run(n)}`` running ``n`` steps of each contestant."""
    import somax

    peer_batch = {"x": batch.inputs, "y": batch.targets[-1]}
    key = jax.random.PRNGKey(3)
    entries = {}

    def ours(name, opt):
        entries[name] = (our_step(task, opt), opt.init(params), batch)

    for form, label in (("auto", "hf"), ("linearize", "hf linearize")):
        hf = make_optimizer(
            "hf", damping=DAMPING, min_cg_iters=k, max_cg_iters=k, product=form
        )
        ours(f"{label} k={k}", hf)
    ours("adahessian", make_optimizer("adahessian", every=1))
    ours("sophia_h", make_optimizer("sophia_h", every=1))
    for suffix, predict in predictors(task).items():
        gn = somax.sgn_ce(
            predict_fn=predict, lam_policy="const", lam0=DAMPING, tol=0.0, maxiter=k,
            warm_start=False, stabilise_every=0,
        )  # fmt: skip
        assert gn.solver._maxiter == k and gn.solver._tol == 0.0  # no silent typos

        def loss(p, b, predict=predict):
            ce = optax.softmax_cross_entropy_with_integer_labels(
                predict(p, b["x"]), b["y"]
            )
            return ce.mean()

        ada = somax.adahessian(loss_fn=loss, learning_rate=0.15, eval_every_k=1)
        soph = somax.sophia_h(loss_fn=loss, learning_rate=0.01, eval_every_k=1)
        for name, method in ((f"somax sgn_ce k={k}", gn), ("somax adahessian", ada),
                             ("somax sophia_h", soph)):  # fmt: skip
            entries[name + suffix] = (
                somax_step(method, k if method is gn else None),
                method.init(params),
                peer_batch,
            )
        step, init = optax_sophia_step(predict)
        entries["optax sophia" + suffix] = (step, init(params), peer_batch)

    def runner(step, state, data):
        # Every step starts from the same parameters and state, so each does the
        # same work: a method whose parameters blew up would otherwise time NaN
        # arithmetic (and a CG that stops at its first NaN residual).
        def run(n):
            for _ in range(n):
                jax.block_until_ready(step(params, state, data, key))

        return run

    return {name: runner(*entry) for name, entry in entries.items()}


def seconds_per_step(runs: dict, steps: int, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds: ``{name: [seconds per step, one per round]}``."""
    names = list(runs)
    for name in names:  # compile outside the timed rounds
        runs[name](1)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name](steps)
            times[name].append((time.perf_counter() - start) / steps)
    return times


PAIRS = {  # ours -> the peers it is compared with
    "hf": ("somax sgn_ce", "hf linearize"),
    "adahessian": ("somax adahessian",),
    "sophia_h": ("somax sophia_h", "optax sophia"),
}


def main() -> None:
    quick = quick_option(__doc__)
    steps, rounds = (3, 3) if quick else (5, 5)
    print("| hidden | contestant | ms per step, median (min-max) | peer / ours |")
    print("|---|---|---|---|")
    for hidden in (50, 100):
        task, params, batch = rnn_problem("temporal_order", hidden, LENGTH, BATCH)
        for k in (10, 50):
            runs = contestants(task, params, batch, k)
            if k == 50:  # the diagonal methods do not depend on k
                runs = {n: r for n, r in runs.items() if "k=" in n}
            times = seconds_per_step(runs, steps, rounds)
            medians = {n: statistics.median(t) for n, t in times.items()}
            for name, values in times.items():
                base = name.split(" k=")[0]
                ours = next(
                    (o for o, peers in PAIRS.items()
                     if any(base.startswith(p) for p in peers)),
                    None,
                )  # fmt: skip
                ours_name = ours + (f" k={k}" if ours == "hf" else "") if ours else None
                ratio = (
                    f"{medians[name] / medians[ours_name]:.2f}x" if ours_name else ""
                )
                spread = (
                    f"{1e3 * medians[name]:.1f} "
                    f"({1e3 * min(values):.1f}-{1e3 * max(values):.1f})"
                )
                print(f"| {hidden} | {name} | {spread} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
