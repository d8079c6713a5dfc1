"""Timing and setup helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import time

import jax

from tasks import make_task


def best_time(fn, *args, repeats: int = 5) -> float:
    """Best wall time of ``fn(*args)`` over ``repeats`` calls, after a warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def quick_option(doc: str) -> bool:
    """Parse the command line of a benchmark (``--quick``); print the JAX version."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, one thread")
    return quick


def rnn_problem(name: str, hidden: int, length: int, batch_size: int):
    """``(task, params, batch)``: a ``basic_tanh`` RNN task, its init, one batch."""
    task = make_task(
        name, length=length, hidden=hidden, batch_size=batch_size, init="basic_tanh"
    )
    params = task.init(jax.random.PRNGKey(0))
    return task, params, task.sample_batch(jax.random.PRNGKey(1))
