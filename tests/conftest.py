"""Shared fixtures: float64 for dense checks, PRNG keys and an XLA compile counter.

Dense oracles (explicit Gauss-Newton matrices, Hessians, small problems) live in
``tests/problems.py``; tests import them from there, never from each other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

from runner.worker import use_one_thread, with_xla_flag

# One XLA thread per process, as the curvbench command and every executor worker run
# (run files must not depend on where a run trained); pytest -n 2 runs two of them.
use_one_thread()

# Most of the suite's time is XLA compiling small programs (the dense references run
# op by op), and LLVM's optimization passes are most of that. Compiling at the lowest
# backend level makes the cold suite about a third faster. It changes the generated
# code (the last bits of some sums, not the arithmetic the tests check against their
# references), and every process of a test, spawned executor workers included,
# inherits the same flags.
os.environ["XLA_FLAGS"] = with_xla_flag(
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"
)

# JAX's persistent compilation cache shares compiled programs between the
# pytest-xdist workers and keeps them for the next run; compiled code is looked up by
# a hash of the program, so results are the same with or without it.
# Executor workers (spawned processes) and the serial executor use the same cache:
# runner.executors.default_cache_dir() is $CURVBENCH_CACHE/xla.
os.environ.setdefault(
    "CURVBENCH_CACHE", str(Path(__file__).resolve().parents[1] / ".jax_cache")
)
jax.config.update(
    "jax_compilation_cache_dir", str(Path(os.environ["CURVBENCH_CACHE"]) / "xla")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

#: The event JAX records once per XLA backend compilation.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_COMPILES = {"count": 0}


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT:
        _COMPILES["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


class CompileCounter:
    """Counts real XLA compilations in a ``with`` block (``.count``)."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[CompileCounter]:
        start = _COMPILES["count"]
        try:
            yield self
        finally:
            self.count = _COMPILES["count"] - start


@pytest.fixture
def count_compiles() -> CompileCounter:
    """``with count_compiles() as c: ...`` then ``c.count`` XLA compilations."""
    return CompileCounter()


@pytest.fixture
def float64() -> Iterator[None]:
    """Run the test with 64-bit JAX arrays (dense references to 1e-12 and below)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key() -> jax.Array:
    """A fixed PRNG key: tests are deterministic."""
    return jax.random.PRNGKey(0)
