"""Cost of the curvature probes: Lanczos in gradients, probe overhead on a run.

1. Lanczos with 20 iterations on the exact Hessian and on the Gauss-Newton matrix
   (:func:`optimizers.curvature.top_eigenpairs`, linearized once), and one whole
   probe (:func:`analysis.probes.probe`), each divided by the time of one jitted
   gradient on the same batch. Target: Lanczos(20) <= 25 gradient-equivalents.
2. The overhead of probing a training run every ``PROBE_EVERY`` steps (plus the
   explosion probes): the run's time with probes over its time without, both
   after a warm-up run so that compilation is excluded. Target: <= 10%.

Temporal order, length 100, 50 tanh units (basic_tanh), batch 20.

    python benchmarks/bench_probes.py
"""

from __future__ import annotations

import time

import jax
from timing import best_time

from analysis.probes import ProbeConfig, make_probe
from optimizers.curvature import (
    gauss_newton_operator,
    hessian_operator,
    top_eigenpairs,
)
from runner.run import run
from tasks import make_task

TASK = {"length": 100, "min_length": 100, "hidden": 50, "init": "basic_tanh"}
PROBE_EVERY = 1000
STEPS = 5000
REPEATS = 2  # best of: the shared machine's timings vary by about 10%


def lanczos_cost(batch_size: int) -> None:
    task = make_task("temporal_order", batch_size=batch_size, **TASK)
    params = task.init(jax.random.PRNGKey(0))
    batch = task.sample_batch(jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    t_grad = best_time(jax.jit(jax.grad(task.loss)), params, batch, repeats=20)
    for name, operator in (
        ("hessian", hessian_operator),
        ("gauss_newton", gauss_newton_operator),
    ):
        fn = jax.jit(
            lambda p, b, k, op=operator: (
                top_eigenpairs(op(task, p, b), p, k, num_iters=20, k=4).values
            )
        )
        ratio = best_time(fn, params, batch, key) / t_grad
        print(f"| Lanczos(20), {name} | {batch_size} | {ratio:.1f} |", flush=True)
    probe = make_probe(task, ProbeConfig(lanczos_iters=20))
    ratio = best_time(probe, params, batch, key) / t_grad
    print(f"| whole probe (Lanczos 20) | {batch_size} | {ratio:.1f} |", flush=True)


def overhead(optimizer: str, opt_hparams: dict, seeds: int) -> None:
    common = dict(
        seeds=seeds, steps=STEPS, eval_every=100, task_hparams=TASK,
        opt_hparams=opt_hparams, record_steps=False,
    )  # fmt: skip
    timings = {}
    for probe_every in (None, PROBE_EVERY):
        # Warm-up (compiles the program and the probe), then the timed run.
        warm = {**common, "steps": 200}
        run("temporal_order", optimizer, probe_every=probe_every and 100, **warm)
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            result = run("temporal_order", optimizer, probe_every=probe_every, **common)
            best = min(best, time.perf_counter() - start)
        timings[probe_every] = best
        n_probes = len(result.probes)
    ratio = timings[PROBE_EVERY] / timings[None] - 1
    print(
        f"| {optimizer} | {seeds} | {timings[None]:.1f} s | "
        f"{timings[PROBE_EVERY]:.1f} s | {n_probes} | {ratio:+.1%} |",
        flush=True,
    )


def main() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| measurement | batch | gradient-equivalents (measured time) |")
    print("|---|---|---|")
    for batch_size in (20, 100):
        lanczos_cost(batch_size)
    print(f"\nprobe overhead, {STEPS} steps, probes every {PROBE_EVERY} steps")
    print("| optimizer | seeds | no probes | with probes | probes | overhead |")
    print("|---|---|---|---|---|---|")
    overhead("sgd_clip", {"learning_rate": 0.01, "threshold": 1.0}, 1)
    overhead("sgd_clip", {"learning_rate": 0.01, "threshold": 1.0}, 5)


if __name__ == "__main__":
    main()
