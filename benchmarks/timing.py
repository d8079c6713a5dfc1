"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time

import jax


def best_time(fn, *args, repeats: int = 5) -> float:
    """Best wall time of ``fn(*args)`` over ``repeats`` calls, after a warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)
