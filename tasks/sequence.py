"""RNN sequence tasks: a generator from :mod:`tasks.generators` plus an RNN model.

The factories at the bottom are the registry entries; their signatures declare the
hyperparameters (checked by :func:`tasks.hparams.check_hparams`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Annotated

import jax

from tasks import generators
from tasks.base import Batch, Task, take_steps
from tasks.hparams import UNIT_OPEN, ConfigError, Range
from tasks.losses import OutputLoss, softmax_cross_entropy, squared_error
from tasks.rnn import (
    ACTIVATIONS,
    Init,
    init_rnn,
    rnn_apply,
    rnn_hidden,
    rnn_readout,
    rnn_state_curvature,
    rnn_transition,
)

Array = jax.Array
Generator = Callable[[Array, int, int, Array], Batch]

Length = Annotated[int, Range(1, None)]
OptLength = Annotated[int, Range(1, None)] | None
BatchSize = Annotated[int, Range(1, None)]
Hidden = Annotated[int, Range(1, None)]
Leak = Annotated[float, UNIT_OPEN]


class SequenceTask(Task):
    """A pathological problem solved by a vanilla or leaky RNN.

    The minibatch length is drawn uniformly from ``[min_length, length]`` (one per
    minibatch, Pascanu et al. 2013); batches are padded to ``padded_length`` and masked,
    so every length runs in the same compiled program. With ``last_step_only`` the
    generator scores only each sequence's last step, so ``score_steps`` is
    ``lengths - 1`` and the output layer runs there alone. ``n_out`` is set from the
    constructor; ``state_curvature`` is ``sigma'(x_t)`` for vanilla units and 1 for
    leaky ones (:func:`tasks.rnn.rnn_state_curvature`).
    """

    def __init__(
        self,
        name: str,
        generator: Generator,
        n_in: int,
        n_out: int,
        output_loss: OutputLoss,
        length: int,
        min_length: int | None,
        padded_length: int,
        batch_size: int,
        hidden: int,
        init: str,
        leak: float,
        hparams: dict,
        last_step_only: bool = False,
    ):
        min_length = length if min_length is None else min_length
        if min_length > length:
            raise ConfigError(
                f"task hyperparameter 'min_length' = {min_length} must be <= "
                f"'length' = {length}"
            )
        self.name = name
        self.generator = generator
        self.n_in, self.n_out, self.hidden = n_in, n_out, hidden
        self.output_loss = output_loss
        self.length, self.min_length = length, min_length
        self.padded_length = padded_length
        self.batch_size = batch_size
        self.init_scheme = init
        self.activation = ACTIVATIONS[init]
        self.leak = float(leak)
        self.hparams = dict(hparams)
        self.last_step_only = last_step_only

    def init(self, key: Array) -> dict:
        return init_rnn(key, self.n_in, self.hidden, self.n_out, self.init_scheme)

    def sample_batch(self, key: Array, batch_size: int | None = None) -> Batch:
        k_len, k_gen = jax.random.split(key)
        length = jax.random.randint(k_len, (), self.min_length, self.length + 1)
        size = self.batch_size if batch_size is None else batch_size
        return self.generator(k_gen, self.padded_length, size, length)

    def apply(self, params, inputs, state_offset=None):
        return rnn_apply(params, inputs, self.activation, self.leak, state_offset)

    def score_steps(self, batch: Batch) -> Array | None:
        return (batch.lengths - 1)[None, :] if self.last_step_only else None

    def apply_scored(self, params, batch, state_offset=None):
        states = rnn_hidden(
            params, batch.inputs, self.activation, self.leak, state_offset
        )
        index = self.score_steps(batch)
        scored = states if index is None else take_steps(states, index)
        return rnn_readout(params, scored, self.activation, self.leak), states

    def state_curvature(self, states):
        return rnn_state_curvature(states, self.activation, self.leak)

    def transition(self, params, state, inputs):
        return rnn_transition(params, state, inputs, self.activation, self.leak)

    def recurrent_mask(self, params):
        return {k: k == "W_rec" for k in params}

    def recurrent_matrix(self, params):
        return params["W_rec"]

    def describe(self) -> dict:
        return {"name": self.name, **self.hparams}


def _check_min_length(name: str, length: int, minimum: int) -> None:
    if length < minimum:
        raise ConfigError(
            f"task hyperparameter 'length' = {length} is too short for {name!r} "
            f"(at least {minimum})"
        )


def _make(
    name, generator, n_in, n_out, loss, padded, hparams, last_step_only=True
) -> SequenceTask:
    keys = ("length", "min_length", "batch_size", "hidden", "init", "leak")
    return SequenceTask(
        name, generator, n_in, n_out, loss, padded_length=padded, hparams=hparams,
        last_step_only=last_step_only, **{k: hparams[k] for k in keys},
    )  # fmt: skip


def temporal_order(
    length: Length = 50,
    min_length: OptLength = None,
    batch_size: BatchSize = 20,
    hidden: Hidden = 50,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> SequenceTask:
    """Temporal order (2 relevant symbols, 4 classes), softmax at the last step."""
    hp = dict(locals())
    _check_min_length("temporal_order", min_length or length, 10)
    gen = partial(generators.temporal_order, n_bits=2)
    return _make("temporal_order", gen, 6, 4, softmax_cross_entropy, length, hp)


def temporal_order_3bit(
    length: Length = 50,
    min_length: OptLength = None,
    batch_size: BatchSize = 20,
    hidden: Hidden = 50,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> SequenceTask:
    """3-bit temporal order (3 relevant symbols, 8 classes)."""
    hp = dict(locals())
    _check_min_length("temporal_order_3bit", min_length or length, 10)
    gen = partial(generators.temporal_order, n_bits=3)
    return _make("temporal_order_3bit", gen, 6, 8, softmax_cross_entropy, length, hp)


def _marked_pair_task(name: str, op: str, hparams: dict) -> SequenceTask:
    length = hparams["length"]
    _check_min_length(name, hparams["min_length"] or length, 10)
    padded = length + max(math.ceil(0.1 * length), 1) - 1
    gen = partial(generators.marked_pair, op=op)
    return _make(name, gen, 2, 1, squared_error, padded, hparams)


def addition(
    length: Length = 50,
    min_length: OptLength = None,
    batch_size: BatchSize = 20,
    hidden: Hidden = 50,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> SequenceTask:
    """Addition: target (a1 + a2) / 2 of the two marked values, squared error."""
    return _marked_pair_task("addition", "add", locals())


def multiplication(
    length: Length = 50,
    min_length: OptLength = None,
    batch_size: BatchSize = 20,
    hidden: Hidden = 50,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> SequenceTask:
    """Multiplication: target a1 * a2, squared error."""
    return _marked_pair_task("multiplication", "mul", locals())


def xor(
    length: Length = 50,
    min_length: OptLength = None,
    batch_size: BatchSize = 20,
    hidden: Hidden = 50,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> SequenceTask:
    """XOR of two marked bits (Martens & Sutskever 2011), squared error."""
    return _marked_pair_task("xor", "xor", locals())


def random_permutation(
    length: Length = 50,
    min_length: OptLength = None,
    batch_size: BatchSize = 20,
    hidden: Hidden = 50,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> SequenceTask:
    """Random permutation: output the first symbol (0 or 1) of 100 at the last step."""
    hp = dict(locals())
    _check_min_length("random_permutation", min_length or length, 2)
    n = generators.N_PERMUTATION_SYMBOLS
    gen = generators.random_permutation
    return _make("random_permutation", gen, n, n, softmax_cross_entropy, length, hp)


def memorization(
    length: Length = 50,
    min_length: OptLength = None,
    n_values: Annotated[int, Range(2, None)] = 5,
    n_pos: Annotated[int, Range(1, None)] = 10,
    batch_size: BatchSize = 20,
    hidden: Hidden = 50,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> SequenceTask:
    """Noiseless memorization (default: 5 values x 10 positions, about 23 bits).

    ``length`` counts the blank steps between the pattern and the "go" marker; the
    sequence has ``length + 2 n_pos + 1`` steps, softmax over ``n_values + 1`` classes
    at every step.
    """
    return _memorization_task("memorization", dict(locals()))


def _memorization_task(name: str, hp: dict) -> SequenceTask:
    n_values, n_pos = hp["n_values"], hp["n_pos"]
    gen = partial(generators.memorization, n_values=n_values, n_pos=n_pos)
    padded = hp["length"] + 2 * n_pos + 1
    loss = softmax_cross_entropy
    n_in, n_out = n_values + 2, n_values + 1
    return _make(name, gen, n_in, n_out, loss, padded, hp, last_step_only=False)


def memorization_5bit(
    length: Length = 50,
    min_length: OptLength = None,
    batch_size: BatchSize = 20,
    hidden: Hidden = 50,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> SequenceTask:
    """The 5-bit noiseless memorization variant (2 values x 5 positions)."""
    hp = dict(locals())
    task = _memorization_task("memorization_5bit", {**hp, "n_values": 2, "n_pos": 5})
    task.hparams = hp
    return task
