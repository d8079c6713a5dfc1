"""Steps per second of the runner against a bare jitted training loop.

Clipped SGD on a tanh RNN (temporal order, length 100, batch 20, 50 and 100 hidden
units), one seed and five seeds vmapped. The bare loop is the least a user could write:
one ``jax.jit`` of a ``lax.scan`` over sample-batch, ``value_and_grad``, global-norm
clipping and an SGD step, with no recording, no evaluation and no bookkeeping. The
runner does everything it does in a real run: per-step records, the non-finite guard,
the state gradients for Omega, the per-chunk evaluation and the success-test check.

Target: the runner within 1.3x of the bare loop. Compilation is excluded from both.

    python benchmarks/bench_runner.py            # full table
    python benchmarks/bench_runner.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from runner.run import run
from tasks import make_task


def bare_loop(task, n_seeds: int, steps: int, lr: float = 0.01, threshold: float = 1.0):
    """Seconds for ``steps`` updates of the bare loop (compile excluded)."""
    opt = optax.chain(optax.clip_by_global_norm(threshold), optax.sgd(lr))

    def one_seed(key):
        k_init, key = jax.random.split(key)
        params = task.init(k_init)
        state = opt.init(params)

        def step(carry, _):
            params, state, key = carry
            key, k_batch = jax.random.split(key)
            batch = task.sample_batch(k_batch)
            loss, grads = jax.value_and_grad(task.loss)(params, batch)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state, key), loss

        (params, _, _), losses = jax.lax.scan(step, (params, state, key), None, steps)
        return params, losses

    fn = jax.jit(jax.vmap(one_seed))
    keys = jnp.stack([jax.random.PRNGKey(s) for s in range(n_seeds)])
    compiled = fn.lower(keys).compile()
    jax.block_until_ready(compiled(keys))  # warm
    start = time.perf_counter()
    jax.block_until_ready(compiled(keys))
    return time.perf_counter() - start


def runner_seconds(hidden, n_seeds, steps, eval_every, eval_size):
    """Seconds of :func:`runner.run.run` excluding compilation (second of two runs)."""
    kwargs = dict(
        task_hparams={"length": 100, "hidden": hidden, "init": "smart_tanh"},
        seeds=n_seeds,
        steps=steps,
        eval_every=eval_every,
        eval_size=eval_size,
    )
    run("temporal_order", "sgd_clip", **kwargs)  # compile and warm
    result = run("temporal_order", "sgd_clip", **kwargs)
    return float(result.summary.run_seconds.iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 1000 if args.quick else 4000
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {steps} steps")
    header = (
        "| hidden | seeds | bare steps/s | runner steps/s (eval every 1000) | ratio "
    )
    header += "| runner steps/s (eval every 100) | ratio |"
    print(header)
    print("|" + "---|" * 7)
    for hidden in (50, 100):
        task = make_task("temporal_order", length=100, hidden=hidden)
        for n_seeds in (1, 5):
            bare = bare_loop(task, n_seeds, steps)
            sparse = runner_seconds(hidden, n_seeds, steps, 1000, 1000)
            dense = runner_seconds(hidden, n_seeds, steps, 100, 1000)
            print(
                f"| {hidden} | {n_seeds} | {steps / bare:.0f} | {steps / sparse:.0f} | "
                f"{sparse / bare:.2f}x | {steps / dense:.0f} | {dense / bare:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
