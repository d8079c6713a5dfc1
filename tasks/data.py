"""Tasks on fixed datasets: next-step prediction by an RNN, with held-out splits.

A dataset is three splits (``train``, ``validation``, ``test``), each a list of
sequences stored end to end (:class:`Split`): piano-roll frames ``[N, P]`` for
music, character codes ``[N]`` for text. The network reads the previous element
and predicts the current one: for a window starting at position ``s`` of a
sequence ``x``,

    inputs_t = encode(x_{s+t-1})  (zeros for t = 0 when s = 0: the start),
    targets_t = x_{s+t},          t = 0 .. T-1,

and steps past the sequence's end are padding (mask 0). Every element of a
sequence is thus predicted exactly once when the sequence is cut into consecutive
windows, the first from the zero input. The loss is the masked mean over the scored
steps, so it is the negative log-likelihood per time step (per frame, per
character).

Training batches draw ``batch_size`` sequences uniformly with replacement and a
uniform window of ``T`` steps in each (the whole sequence, padded, when it is
shorter). Evaluation uses whole splits (:meth:`DataTask.evaluation_batch`): every
sequence whole, or cut into consecutive rows of ``eval_rows`` steps, each row from
a fresh state. Data tasks have no success test: runs end by their budget or by
early stopping on the validation loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasks.base import EVAL_SPLITS, Batch
from tasks.hparams import ConfigError
from tasks.losses import OutputLoss
from tasks.sequence import SequenceTask

Array = jax.Array

#: The splits of a dataset, in order.
SPLITS = ("train", *EVAL_SPLITS)


class Split(NamedTuple):
    """Sequences stored end to end: sequence ``i`` is
    ``values[starts[i] : starts[i] + lengths[i]]``."""

    values: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_sequences(cls, sequences: list[np.ndarray]) -> Split:
        """Concatenate ``sequences`` (a list of arrays with equal trailing shapes)."""
        lengths = [len(s) for s in sequences]
        return cls.from_lengths(np.concatenate(sequences), lengths)

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Split:
        """Sequences of ``lengths`` stored end to end in ``values``."""
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(values, starts, lengths)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def sequence(self, i: int) -> np.ndarray:
        """The ``i``-th sequence."""
        return self.values[self.starts[i] : self.starts[i] + self.lengths[i]]

    def rows(self, length: int) -> Split:
        """Every sequence cut into consecutive rows of at most ``length`` steps."""
        starts, lengths = [], []
        for start, n in zip(self.starts, self.lengths, strict=True):
            cuts = np.arange(0, n, length)
            starts.append(start + cuts)
            lengths.append(np.minimum(length, n - cuts))
        return Split(self.values, np.concatenate(starts), np.concatenate(lengths))


def window_batch(
    split: Split,
    index: Array,
    offset: Array,
    n_steps: int,
    encode: Callable[[Array, Array], Array],
    target: Callable[[Array, Array], Array],
) -> Batch:
    """Windows of ``n_steps`` steps: sequence ``index[b]`` from position ``offset[b]``.

    Jittable: ``split``'s arrays become constants of the traced program, ``index``
    and ``offset`` may be traced. ``encode(previous, valid)`` turns the previous
    elements ``[T, B, ...]`` into inputs (zero where not ``valid``), ``target(x,
    valid)`` the current ones into targets.
    """
    values = jnp.asarray(split.values)
    starts = jnp.asarray(split.starts, jnp.int32)[index]
    lengths = jnp.asarray(split.lengths, jnp.int32)[index]
    pos = offset[None, :] + jnp.arange(n_steps, dtype=jnp.int32)[:, None]  # [T, B]
    valid = pos < lengths[None, :]
    flat = starts[None, :] + pos
    last = values.shape[0] - 1
    current = values[jnp.clip(flat, 0, last)]
    previous = values[jnp.clip(flat - 1, 0, last)]
    return Batch(
        inputs=encode(previous, valid & (pos >= 1)),
        targets=target(current, valid),
        mask=valid.astype(jnp.float32),
        lengths=jnp.clip(lengths - offset, 0, n_steps),
    )


class DataTask(SequenceTask):
    """Next-step prediction on a fixed dataset with a vanilla or leaky RNN.

    Args:
      name: the registry name.
      splits: ``{"train": Split, "validation": Split, "test": Split}``.
      encode, target: see :func:`window_batch`.
      n_in, n_out: input and output sizes.
      output_loss: the per-step loss of the targets.
      window: training window in steps, or None for whole sequences (padded to the
        longest training sequence).
      eval_rows: evaluate on rows of this many steps, or None for whole sequences.
      batch_size, hidden, init, leak: as for :class:`~tasks.sequence.SequenceTask`.
      hparams: the validated hyperparameters (``describe``).
    """

    success_threshold = None

    def __init__(
        self,
        name: str,
        splits: dict[str, Split],
        encode: Callable[[Array, Array], Array],
        target: Callable[[Array, Array], Array],
        n_in: int,
        n_out: int,
        output_loss: OutputLoss,
        window: int | None,
        eval_rows: int | None,
        batch_size: int,
        hidden: int,
        init: str,
        leak: float,
        hparams: dict,
    ):
        missing = [s for s in SPLITS if s not in splits or not len(splits[s])]
        if missing:
            raise ConfigError(f"task {name!r}: the {missing[0]} split is empty")
        longest = int(splits["train"].lengths.max())
        padded = longest if window is None else window
        super().__init__(
            name, None, n_in, n_out, output_loss, length=padded, min_length=None,
            padded_length=padded, batch_size=batch_size, hidden=hidden, init=init,
            leak=leak, hparams=hparams,
        )  # fmt: skip
        self.splits = splits
        self.encode, self.target = encode, target
        self.eval_rows = eval_rows

    def sample_batch(self, key: Array, batch_size: int | None = None) -> Batch:
        size = self.batch_size if batch_size is None else batch_size
        train = self.splits["train"]
        k_seq, k_off = jax.random.split(key)
        index = jax.random.randint(k_seq, (size,), 0, len(train))
        lengths = jnp.asarray(train.lengths, jnp.int32)[index]
        room = jnp.maximum(lengths - self.length, 0)
        offset = jnp.floor(jax.random.uniform(k_off, (size,)) * (room + 1))
        offset = jnp.minimum(offset.astype(jnp.int32), room)
        return window_batch(train, index, offset, self.length, self.encode, self.target)

    def evaluation_batch(self, split: str) -> Batch:
        rows = self.evaluation_rows(split)
        n = len(rows)
        zeros = jnp.zeros((n,), jnp.int32)
        steps = int(rows.lengths.max())
        return window_batch(rows, jnp.arange(n), zeros, steps, self.encode, self.target)

    def evaluation_rows(self, split: str) -> Split:
        """The sequences of ``split`` as they are evaluated (whole or in rows)."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"split {split!r}: valid: {', '.join(EVAL_SPLITS)}")
        held_out = self.splits[split]
        return held_out if self.eval_rows is None else held_out.rows(self.eval_rows)

    def score_steps(self, batch: Batch) -> None:
        return None

    def metrics(self, params, batch: Batch) -> dict[str, Array]:
        """Loss (negative log-likelihood per scored step), per-step error rate and
        the task's own measures (:meth:`step_metrics`)."""
        outputs, _ = self.apply_scored(params, batch)
        return {
            "loss": self.loss_from_outputs(outputs, batch),
            **self.step_metrics(outputs, batch),
        }

    def step_metrics(self, outputs: Array, batch: Batch) -> dict[str, Array]:
        """``error_rate``: the fraction of scored steps whose prediction is wrong."""
        wrong = self.output_loss.is_wrong(outputs, batch.targets)
        return {"error_rate": _masked_fraction(wrong, batch.mask)}

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """Sequences and scored steps of each split."""
        return {
            name: {"sequences": len(s), "steps": int(s.lengths.sum())}
            for name, s in self.splits.items()
        }


def _masked_fraction(flags: Array, mask: Array) -> Array:
    return jnp.sum(flags * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bits(nats: Array) -> Array:
    """Nats to bits: ``x / ln 2``."""
    return nats / math.log(2.0)
