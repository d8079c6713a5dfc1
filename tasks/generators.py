"""Batch generators of the pathological problems (Hochreiter & Schmidhuber 1997;
Martens & Sutskever 2011; Pascanu et al. 2013, section 4.1).

Each generator is ``gen(key, n_steps, batch_size, length) -> Batch``: ``n_steps`` is the
static padded length, ``length`` a traced integer scalar (the minibatch's length), so a
variable length is one compiled program. Positions are 0-based; ``[a, b)`` windows use
``floor`` of the fractions, widened to one position when they would be empty. Steps at
and beyond a sequence's length hold zero inputs and are never scored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tasks.base import Batch

Array = jax.Array

TEMPORAL_WINDOWS = {
    2: ((0.1, 0.2), (0.5, 0.6)),
    3: ((0.1, 0.2), (0.3, 0.4), (0.6, 0.7)),
}
N_TEMPORAL_SYMBOLS = 6  # A, B = 0, 1; distractors 2..5
N_PERMUTATION_SYMBOLS = 100


def _window(key: Array, length: Array, lo: float, hi: float, shape=()) -> Array:
    """A uniform position in ``[floor(lo * length), floor(hi * length))``."""
    length = jnp.asarray(length, jnp.float32)
    low = jnp.floor(lo * length).astype(jnp.int32)
    high = jnp.maximum(jnp.floor(hi * length).astype(jnp.int32), low + 1)
    return jax.random.randint(key, shape, low, high)


def _last_step_mask(n_steps: int, lengths: Array) -> Array:
    return (jnp.arange(n_steps)[:, None] == (lengths - 1)[None, :]).astype(jnp.float32)


def temporal_order(
    key: Array, n_steps: int, batch_size: int, length: Array, n_bits: int = 2
) -> Batch:
    """Temporal order: classify the order of ``n_bits`` relevant symbols (A or B).

    Relevant symbol ``i`` sits in window ``TEMPORAL_WINDOWS[n_bits][i]`` of the
    sequence; all other steps are distractors 2..5. Target class ``sum_i v_i 2^i`` at
    the last step.
    """
    k_dis, k_bits, *k_pos = jax.random.split(key, 2 + n_bits)
    t = jnp.arange(n_steps)[:, None]
    symbols = jax.random.randint(k_dis, (n_steps, batch_size), 2, N_TEMPORAL_SYMBOLS)
    bits = jax.random.randint(k_bits, (n_bits, batch_size), 0, 2)
    for i, (lo, hi) in enumerate(TEMPORAL_WINDOWS[n_bits]):
        pos = _window(k_pos[i], length, lo, hi, (batch_size,))
        symbols = jnp.where(t == pos[None, :], bits[i][None, :], symbols)
    symbols = jnp.where(t < length, symbols, -1)  # one_hot(-1) is all zeros
    label = jnp.sum(bits * (2 ** jnp.arange(n_bits))[:, None], axis=0)
    lengths = jnp.full((batch_size,), length, jnp.int32)
    return Batch(
        inputs=jax.nn.one_hot(symbols, N_TEMPORAL_SYMBOLS),
        targets=jnp.broadcast_to(label, (n_steps, batch_size)),
        mask=_last_step_mask(n_steps, lengths),
        lengths=lengths,
    )


def marked_pair(
    key: Array, n_steps: int, batch_size: int, length: Array, op: str = "add"
) -> Batch:
    """Addition, multiplication and XOR: combine the two marked values.

    Each sequence has its own length ``l = length + randint(ceil(0.1 length))``.
    Channel 0
    carries values (``U(0, 1)``, or bits for XOR), channel 1 the markers at
    ``p0 in [0, 0.1 l)`` and ``p1 in [0.1 l, 0.5 l)``. The target at step ``l - 1`` is
    ``(a1 + a2) / 2``, ``a1 a2`` or ``a1 XOR a2``.
    """
    k_len, k_val, k_p0, k_p1 = jax.random.split(key, 4)
    length_f = jnp.asarray(length, jnp.float32)
    extra = jnp.maximum(jnp.ceil(0.1 * length_f).astype(jnp.int32), 1)
    lengths = length + jax.random.randint(k_len, (batch_size,), 0, extra)
    t = jnp.arange(n_steps)[:, None]
    if op == "xor":
        values = jax.random.bernoulli(k_val, 0.5, (n_steps, batch_size))
        values = values.astype(jnp.float32)
    else:
        values = jax.random.uniform(k_val, (n_steps, batch_size))
    lf = lengths.astype(jnp.float32)
    split = jnp.maximum(jnp.floor(0.1 * lf).astype(jnp.int32), 1)
    p0 = jax.random.randint(k_p0, (batch_size,), 0, split)
    p1 = jax.random.randint(
        k_p1,
        (batch_size,),
        split,
        jnp.maximum(jnp.floor(0.5 * lf).astype(jnp.int32), split + 1),
    )
    valid = t < lengths[None, :]
    markers = (t == p0[None, :]) | (t == p1[None, :])
    inputs = jnp.stack([values * valid, markers.astype(jnp.float32)], axis=-1)
    a1 = jnp.take_along_axis(values, p0[None, :], 0)[0]
    a2 = jnp.take_along_axis(values, p1[None, :], 0)[0]
    target = {
        "add": (a1 + a2) / 2.0,
        "mul": a1 * a2,
        "xor": jnp.abs(a1 - a2),
    }[op]
    return Batch(
        inputs=inputs,
        targets=jnp.broadcast_to(target[None, :, None], (n_steps, batch_size, 1)),
        mask=_last_step_mask(n_steps, lengths),
        lengths=lengths,
    )


def random_permutation(
    key: Array, n_steps: int, batch_size: int, length: Array
) -> Batch:
    """Random permutation: remember the first symbol (0 or 1) of 100 one-hot symbols.

    The rest are uniform in 2..99; the target at the last step is the first symbol.
    """
    k_first, k_rest = jax.random.split(key)
    t = jnp.arange(n_steps)[:, None]
    first = jax.random.randint(k_first, (batch_size,), 0, 2)
    rest = jax.random.randint(k_rest, (n_steps, batch_size), 2, N_PERMUTATION_SYMBOLS)
    symbols = jnp.where(t == 0, first[None, :], rest)
    symbols = jnp.where(t < length, symbols, -1)
    lengths = jnp.full((batch_size,), length, jnp.int32)
    return Batch(
        inputs=jax.nn.one_hot(symbols, N_PERMUTATION_SYMBOLS),
        targets=jnp.broadcast_to(first, (n_steps, batch_size)),
        mask=_last_step_mask(n_steps, lengths),
        lengths=lengths,
    )


def memorization(
    key: Array,
    n_steps: int,
    batch_size: int,
    length: Array,
    n_values: int = 5,
    n_pos: int = 10,
) -> Batch:
    """Noiseless memorization: reproduce a pattern after ``length`` blank steps.

    Input symbols: values ``0..n_values-1``, blank ``n_values``, go ``n_values + 1``.
    Steps ``[0, n_pos)`` show the pattern, ``[n_pos, n_pos + length)`` are blank, step
    ``n_pos + length`` is "go", the next ``n_pos`` steps are blank inputs during which
    the targets are the pattern; every other target is "blank". Every step is scored.
    """
    blank, go = n_values, n_values + 1
    total = length + 2 * n_pos + 1
    t = jnp.arange(n_steps)[:, None]
    pattern = jax.random.randint(key, (n_pos, batch_size), 0, n_values)
    shown = jnp.take(pattern, jnp.clip(t[:, 0], 0, n_pos - 1), axis=0)
    recall_start = n_pos + length + 1
    recalled = jnp.take(pattern, jnp.clip(t[:, 0] - recall_start, 0, n_pos - 1), axis=0)
    symbols = jnp.where(t < n_pos, shown, blank)
    symbols = jnp.where(t == n_pos + length, go, symbols)
    symbols = jnp.where(t < total, symbols, -1)
    in_recall = (t >= recall_start) & (t < total)
    targets = jnp.where(in_recall, recalled, blank)
    lengths = jnp.full((batch_size,), total, jnp.int32)
    return Batch(
        inputs=jax.nn.one_hot(symbols, n_values + 2),
        targets=targets,
        mask=jnp.broadcast_to(t < total, (n_steps, batch_size)).astype(jnp.float32),
        lengths=lengths,
    )
