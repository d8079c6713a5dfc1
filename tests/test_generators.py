"""Batch generators checked against the task definitions (Hochreiter & Schmidhuber
1997; Martens & Sutskever 2011; Pascanu et al. 2013, section 4; docs/tasks.md).

Positions are 0-based; a window ``[lo L, hi L)`` is ``[floor(lo L), floor(hi L))``
(computed here with exact fractions), widened to one position when empty.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import partial

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import generators, make_task

N_STEPS = 80  # static padded length shared by all draws: one compile per generator
BATCH = 32
SETTINGS = settings(max_examples=20, deadline=None)
LENGTHS = st.integers(10, 70)
SEEDS = st.integers(0, 2**31 - 1)


@partial(jax.jit, static_argnames=("n_bits",))
def _temporal(key, length, n_bits):
    return generators.temporal_order(key, N_STEPS, BATCH, length, n_bits=n_bits)


@partial(jax.jit, static_argnames=("op",))
def _pair(key, length, op):
    return generators.marked_pair(key, N_STEPS, BATCH, length, op=op)


@jax.jit
def _perm(key, length):
    return generators.random_permutation(key, N_STEPS, BATCH, length)


@partial(jax.jit, static_argnames=("n_values", "n_pos"))
def _memo(key, length, n_values, n_pos):
    return generators.memorization(
        key, N_STEPS, BATCH, length, n_values=n_values, n_pos=n_pos
    )


def _np(batch):
    return jax.tree.map(np.asarray, batch)


def _window(length: int, lo: str, hi: str) -> tuple[int, int]:
    low = math.floor(Fraction(lo) * length)
    high = max(math.floor(Fraction(hi) * length), low + 1)
    return low, high


def _decode_one_hot(inputs: np.ndarray, valid: int) -> np.ndarray:
    """Symbols of one sequence: exact one-hot rows before ``valid``, zeros after."""
    assert np.all(inputs[valid:] == 0.0)
    head = inputs[:valid]
    assert np.all((head == 0.0) | (head == 1.0))
    np.testing.assert_array_equal(head.sum(axis=-1), np.ones(valid))
    return head.argmax(axis=-1)


def _check_last_step_mask(mask: np.ndarray, lengths: np.ndarray) -> None:
    expected = np.zeros_like(mask)
    expected[lengths - 1, np.arange(mask.shape[1])] = 1.0
    np.testing.assert_array_equal(mask, expected)


TEMPORAL_WINDOWS = {
    2: [("1/10", "2/10"), ("5/10", "6/10")],
    3: [("1/10", "2/10"), ("3/10", "4/10"), ("6/10", "7/10")],
}


@pytest.mark.parametrize("n_bits", [2, 3])
@SETTINGS
@given(length=LENGTHS, seed=SEEDS)
def test_temporal_order(n_bits, length, seed):
    batch = _np(_temporal(jax.random.key(seed), length, n_bits=n_bits))
    assert batch.inputs.shape == (N_STEPS, BATCH, 6)
    assert batch.targets.shape == (N_STEPS, BATCH)
    np.testing.assert_array_equal(batch.lengths, np.full(BATCH, length))
    _check_last_step_mask(batch.mask, batch.lengths)
    windows = [_window(length, lo, hi) for lo, hi in TEMPORAL_WINDOWS[n_bits]]
    for b in range(BATCH):
        symbols = _decode_one_hot(batch.inputs[:, b], length)
        relevant = np.flatnonzero(symbols < 2)
        assert len(relevant) == n_bits, symbols
        label = 0
        for i, (pos, (low, high)) in enumerate(zip(relevant, windows, strict=True)):
            assert low <= pos < high, (i, pos, low, high)
            label += int(symbols[pos]) * 2**i
        distractors = np.delete(symbols, relevant)
        assert np.all((distractors >= 2) & (distractors <= 5))
        assert batch.targets[length - 1, b] == label


def test_temporal_order_covers_windows_and_classes():
    length = 60
    seen_pos = [set(), set(), set()]
    labels = set()
    for seed in range(4):
        batch = _np(_temporal(jax.random.key(seed), length, n_bits=3))
        labels |= set(batch.targets[length - 1].tolist())
        for b in range(BATCH):
            symbols = batch.inputs[:length, b].argmax(-1)
            for i, pos in enumerate(np.flatnonzero(symbols < 2)):
                seen_pos[i].add(int(pos))
    assert labels == set(range(8))
    for i, (lo, hi) in enumerate(TEMPORAL_WINDOWS[3]):
        low, high = _window(length, lo, hi)
        assert seen_pos[i] == set(range(low, high))


TARGET_FNS = {
    "add": lambda a1, a2: (a1 + a2) / 2.0,
    "mul": lambda a1, a2: a1 * a2,
    "xor": lambda a1, a2: float(int(a1) ^ int(a2)),
}


@pytest.mark.parametrize("op", ["add", "mul", "xor"])
@SETTINGS
@given(length=LENGTHS, seed=SEEDS)
def test_marked_pair(op, length, seed):
    batch = _np(_pair(jax.random.key(seed), length, op=op))
    assert batch.inputs.shape == (N_STEPS, BATCH, 2)
    assert batch.targets.shape == (N_STEPS, BATCH, 1)
    lengths = batch.lengths
    assert np.all(lengths >= length)
    assert np.all(lengths < length + math.ceil(Fraction(length, 10)))
    _check_last_step_mask(batch.mask, lengths)
    for b in range(BATCH):
        l = int(lengths[b])
        values, markers = batch.inputs[:, b, 0], batch.inputs[:, b, 1]
        assert np.all(batch.inputs[l:, b] == 0.0)
        if op == "xor":
            assert set(np.unique(values[:l])) <= {0.0, 1.0}
        else:
            assert np.all((values[:l] >= 0.0) & (values[:l] < 1.0))
        assert set(np.unique(markers)) <= {0.0, 1.0}
        p0, p1 = np.flatnonzero(markers)
        split = max(math.floor(Fraction(l, 10)), 1)
        assert 0 <= p0 < split
        assert split <= p1 < max(math.floor(Fraction(l, 2)), split + 1)
        expected = TARGET_FNS[op](float(values[p0]), float(values[p1]))
        np.testing.assert_allclose(batch.targets[l - 1, b, 0], expected, rtol=1e-6)


def test_marked_pair_covers_lengths_and_marker_windows():
    length = 40  # lengths 40..43, p0 in [0, 4), p1 in [4, 20) (or 21 for l = 42, 43)
    lengths, p0s, p1s = set(), set(), set()
    for seed in range(4):
        batch = _np(_pair(jax.random.key(seed), length, op="add"))
        lengths |= set(batch.lengths.tolist())
        for b in range(BATCH):
            p0, p1 = np.flatnonzero(batch.inputs[:, b, 1])
            p0s.add(int(p0))
            p1s.add(int(p1))
    assert lengths == {40, 41, 42, 43}
    assert p0s == set(range(4))
    assert set(range(4, 20)) <= p1s <= set(range(4, 21))


@SETTINGS
@given(length=st.integers(2, 70), seed=SEEDS)
def test_random_permutation(length, seed):
    batch = _np(_perm(jax.random.key(seed), length))
    assert batch.inputs.shape == (N_STEPS, BATCH, 100)
    np.testing.assert_array_equal(batch.lengths, np.full(BATCH, length))
    _check_last_step_mask(batch.mask, batch.lengths)
    for b in range(BATCH):
        symbols = _decode_one_hot(batch.inputs[:, b], length)
        assert symbols[0] in (0, 1)
        assert np.all((symbols[1:] >= 2) & (symbols[1:] <= 99))
        assert batch.targets[length - 1, b] == symbols[0]
    firsts = batch.inputs[0, :, :2].argmax(-1)
    assert 0 < firsts.sum() < BATCH  # both first symbols occur in a batch of 32


@pytest.mark.parametrize(("n_values", "n_pos"), [(5, 10), (2, 5)])
@SETTINGS
@given(length=st.integers(1, 40), seed=SEEDS)
def test_memorization(n_values, n_pos, length, seed):
    batch = _np(_memo(jax.random.key(seed), length, n_values=n_values, n_pos=n_pos))
    blank, go = n_values, n_values + 1
    total = length + 2 * n_pos + 1
    assert total <= N_STEPS
    assert batch.inputs.shape == (N_STEPS, BATCH, n_values + 2)
    assert batch.targets.shape == (N_STEPS, BATCH)
    np.testing.assert_array_equal(batch.lengths, np.full(BATCH, total))
    expected_mask = np.zeros((N_STEPS, BATCH))
    expected_mask[:total] = 1.0
    np.testing.assert_array_equal(batch.mask, expected_mask)
    for b in range(BATCH):
        symbols = _decode_one_hot(batch.inputs[:, b], total)
        pattern = symbols[:n_pos]
        assert np.all((pattern >= 0) & (pattern < n_values))
        assert np.all(symbols[n_pos : n_pos + length] == blank)
        assert symbols[n_pos + length] == go
        assert np.all(symbols[n_pos + length + 1 :] == blank)
        targets = batch.targets[:total, b]
        recall = n_pos + length + 1
        np.testing.assert_array_equal(targets[recall:], pattern)
        assert np.all(targets[:recall] == blank)


def test_memorization_patterns_vary():
    batch = _np(_memo(jax.random.key(0), 3, n_values=5, n_pos=10))
    pattern = batch.inputs[:10].argmax(-1)
    assert set(np.unique(pattern)) == set(range(5))
    assert len({tuple(col) for col in pattern.T}) > 1


@pytest.mark.parametrize(
    ("name", "padded"),
    [("temporal_order", 20), ("addition", 21), ("random_permutation", 20)],
)
def test_minibatch_length_range_and_no_recompile(name, padded):
    task = make_task(name, length=20, min_length=12, hidden=4, batch_size=4)
    sample = jax.jit(task.sample_batch)
    shapes = set()
    for seed in range(6):
        batch = sample(jax.random.key(seed))
        shapes.add(batch.inputs.shape)
    assert shapes == {(padded, 4, task.n_in)}
    assert sample._cache_size() == 1
    # One length per minibatch, uniform on [min_length, length]: all values occur.
    keys = jax.random.split(jax.random.key(0), 400)
    lengths = np.asarray(
        jax.jit(jax.vmap(lambda k: task.sample_batch(k).lengths))(keys)
    )
    if name == "addition":
        # Per-sequence lengths l in [L, L + ceil(0.1 L)) around the minibatch's L.
        spread = lengths.max(axis=1) - lengths.min(axis=1)
        assert spread.max() <= 2
        assert lengths.min() == 12 and lengths.max() == 21
    else:
        assert np.all(lengths == lengths[:, :1])
        counts = np.bincount(lengths[:, 0], minlength=21)
        assert set(np.flatnonzero(counts)) == set(range(12, 21))
        assert counts[12:].min() > 15  # roughly uniform (expected 44 each)


def test_memorization_task_variable_blank_length():
    task = make_task("memorization_5bit", length=6, min_length=2, hidden=4)
    sample = jax.jit(task.sample_batch)
    seen = set()
    for seed in range(12):
        batch = sample(jax.random.key(seed))
        assert batch.inputs.shape == (6 + 2 * 5 + 1, task.batch_size, 4)
        seen.add(int(batch.lengths[0]))
    assert sample._cache_size() == 1
    assert seen <= {n + 11 for n in range(2, 7)} and len(seen) > 2
