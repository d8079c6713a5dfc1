"""Refuse, before compiling, runs whose memory cannot fit on this machine.

The estimate traces shapes only (``jax.eval_shape``: nothing is compiled or
allocated) and counts, in bytes:

* per seed: the parameters, about ``OPTIMIZER_COPIES`` parameter-sized optimizer
  buffers, the explosion events kept for probing, and the largest of the activations
  of one training step (gradient and curvature minibatches, kept ``BACKWARD_COPIES``
  times for the backward pass), of one evaluation and of one success-test chunk;
* on the host: the per-step traces of the whole run (``record_steps``).

It is deliberately generous (within a small factor): it exists to turn a typo
(``hidden = 10**6``, ``eval_size = 10**9``) into one clear line instead of an
out-of-memory crash after compilation.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from runner.options import MAX_RECORDED_PARAMS
from tasks.hparams import ConfigError

OPTIMIZER_COPIES = 4
BACKWARD_COPIES = 4
TRACE_COLUMNS = 16  # scalars recorded per seed and step (loss, norms, records)
SUCCESS_CHUNK = 1000  # sequences per forward pass of the success test
#: Share of the memory a run may plan to use.
USABLE_FRACTION = 0.8


def available_bytes() -> int:
    """The memory of the default device (host memory on CPU)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


#: A PRNG key's shape: shapes are traced from it without computing anything.
_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


#: Traced sizes by (task, sequences): the runs of a comparison share few tasks. The
#: task is kept in the value so that its id stays its own while the entry lives.
_TRACED: dict[tuple[int, int], tuple[object, int]] = {}


def _activation_bytes(task, params, n_sequences: int) -> int:
    """Inputs, targets, outputs and hidden states of ``n_sequences`` sequences."""
    key = (id(task), n_sequences)
    if key not in _TRACED:
        _TRACED[key] = (task, _traced_activation_bytes(task, params, n_sequences))
    return _TRACED[key][1]


def _traced_activation_bytes(task, params, n_sequences: int) -> int:
    sample = functools.partial(task.sample_batch, batch_size=n_sequences)
    batch = jax.eval_shape(sample, _KEY)
    outputs = jax.eval_shape(task.apply, params, batch.inputs)
    return _bytes(batch) + _bytes(outputs)


#: Parameter shapes by task (tuned comparisons validate thousands of runs of a few
#: tasks); the task is kept in the value so that its id stays its own.
_PARAMS: dict[int, tuple[object, object]] = {}


def _param_shapes(task):
    if id(task) not in _PARAMS:
        _PARAMS[id(task)] = (task, jax.eval_shape(task.init, _KEY))
    return _PARAMS[id(task)][1]


def estimate_bytes(config) -> int:
    """Memory a run of ``config`` needs (see the module docstring)."""
    task, opts = config.task, config.options
    params = _param_shapes(task)
    n_params = _bytes(params)
    step = BACKWARD_COPIES * (
        _activation_bytes(task, params, task.batch_size)
        + _activation_bytes(task, params, opts.curvature_batch_size or task.batch_size)
    )
    evaluation = _activation_bytes(task, params, opts.eval_size)
    success = _activation_bytes(
        task, params, min(SUCCESS_CHUNK, getattr(task, "success_sequences", 1))
    )
    events = opts.probe_events * n_params if opts.probe_every else 0
    per_seed = (
        (1 + OPTIMIZER_COPIES) * n_params + events + max(step, evaluation, success)
    )
    per_chunk_traces = opts.eval_every * TRACE_COLUMNS * 4
    host_traces = opts.steps * TRACE_COLUMNS * 4 if opts.record_steps else 0
    if opts.record_params:
        host_traces += opts.steps * MAX_RECORDED_PARAMS * 4
    return len(opts.seeds) * (per_seed + per_chunk_traces + host_traces)


def check_resources(config) -> None:
    """Raise a ConfigError when a run of ``config`` cannot fit in memory.

    Also turns failures of the task's own shape functions (absurd sizes that
    overflow) into a ConfigError naming the task.
    """
    what = "the run"
    try:
        needed = estimate_bytes(config)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"{what}: the task's arrays cannot be formed ({type(err).__name__}: "
            f"{err}); check its sizes (hidden, length, batch_size)"
        ) from None
    if config.options.record_params and param_count(config.task) > MAX_RECORDED_PARAMS:
        raise ConfigError(
            f"{what}: 'record_params' is for small models (at most "
            f"{MAX_RECORDED_PARAMS} parameters); this task has "
            f"{param_count(config.task)}"
        )
    limit = USABLE_FRACTION * available_bytes()
    if needed > limit:
        raise ConfigError(
            f"{what} needs about {needed / 2**30:.3g} GiB, more than the "
            f"{limit / 2**30:.3g} GiB this machine can give it; lower seeds, "
            "eval_size, steps (with record_steps) or the task's sizes"
        )


def param_count(task) -> int:
    """Number of parameters of a task's model (shapes only)."""
    params = jax.eval_shape(task.init, _KEY)
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
