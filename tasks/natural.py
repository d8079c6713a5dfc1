"""Natural-data tasks: Bach chorales (polyphonic music) and character-level text.

Both are next-step prediction on a fixed dataset (:class:`tasks.data.DataTask`):
the network reads the previous frame or character and predicts the current one,
and the loss is the negative log-likelihood per time step. They have no success
test: runs train for their budget (or stop early on the validation loss), and the
runner evaluates every ``eval_every`` steps on the whole validation and test splits.

* ``chorales``: piano rolls of the music21 corpus' Bach chorales
  (:mod:`tasks.chorales`), one sigmoid unit per pitch (Bernoulli cross-entropy
  summed over pitches: NLL per time step as in Boulanger-Lewandowski et al. 2012
  and Pascanu et al. 2013, Table 1), and frame-level accuracy (Bay et al. 2009).
* ``text``: characters of any UTF-8 text file, by default the documentation topics
  that every CPython installation ships (``pydoc_data.topics``); softmax over the
  characters that occur in the file, reported in bits per character.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np

from tasks import chorales as music
from tasks.base import Batch
from tasks.data import DataTask, Split, bits
from tasks.datacache import cached
from tasks.hparams import ConfigError, Range
from tasks.losses import sigmoid_cross_entropy, softmax_cross_entropy
from tasks.rnn import Init
from tasks.sequence import BatchSize, Hidden, Leak, OptLength

Array = jax.Array
Length = Annotated[int, Range(1, None)]

#: Fractions of the text in the train, validation and test blocks.
TEXT_BLOCKS = (0.8, 0.1, 0.1)


# ---------------------------------------------------------------------- chorales
def _frames_in(previous: Array, valid: Array) -> Array:
    return previous.astype(jnp.float32) * valid[..., None]


def _frames_out(current: Array, valid: Array) -> Array:
    return current.astype(jnp.float32) * valid[..., None]


class ChoralesTask(DataTask):
    """Piano-roll prediction; ``pitch_low`` is the MIDI pitch of output unit 0."""

    pitch_low: int = 0

    def step_metrics(self, outputs: Array, batch: Batch) -> dict[str, Array]:
        """Frame-level accuracy ``sum TP / sum (TP + FP + FN)`` over the scored frames
        (Bay et al. 2009; a pitch is predicted on when its probability exceeds 1/2),
        and ``error_rate = 1 - accuracy``."""
        on = outputs > 0
        truth = batch.targets > 0.5
        mask = batch.mask[..., None]
        tp = jnp.sum((on & truth) * mask)
        wrong = jnp.sum((on != truth) * mask)
        accuracy = tp / jnp.maximum(tp + wrong, 1.0)
        return {"error_rate": 1.0 - accuracy, "accuracy": accuracy}


def chorale_splits(resolution: str) -> tuple[dict[str, Split], int]:
    """Train, validation and test piano rolls and the lowest pitch.

    Parsed once per ``resolution`` and music21 version and cached
    (:mod:`tasks.datacache`); the rolls keep the pitch range that occurs in the
    corpus.
    """
    import music21

    files = music.chorale_files()
    if not files:
        raise ConfigError("task 'chorales': music21's corpus has no Bach chorales")
    settings = {
        "resolution": resolution,
        "music21": music21.__version__,
        "files": [f.name for f in files],
    }
    arrays = cached(
        "chorales",
        settings,
        lambda: music.build_rolls(files, music.RESOLUTIONS[resolution]),
        message=f"Parsing {len(files)} Bach chorales once (about two minutes)",
        keys=("rolls", "lengths", "names"),
    )
    return rolls_to_splits(arrays)


def rolls_to_splits(arrays: dict) -> tuple[dict[str, Split], int]:
    """Cached rolls (:func:`tasks.chorales.build_rolls`) cut to the pitch range that
    occurs in them and split by :func:`tasks.chorales.split_pieces`."""
    rolls, lengths = arrays["rolls"], arrays["lengths"]
    names = [str(n) for n in arrays["names"]]
    played = np.flatnonzero(rolls.any(axis=0))
    low, high = int(played.min()), int(played.max())
    whole = Split.from_lengths(rolls[:, low : high + 1], lengths)
    position = {name: i for i, name in enumerate(names)}
    splits = {
        split: Split.from_sequences([whole.sequence(position[n]) for n in members])
        for split, members in music.split_pieces(names).items()
    }
    return splits, low


def chorales(
    resolution: Literal["quarter", "eighth"] = "quarter",
    length: OptLength = 100,
    batch_size: BatchSize = 20,
    hidden: Hidden = 100,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> ChoralesTask:
    """Bach chorales from music21's corpus: predict the next piano-roll frame.

    ``length`` is the training window in frames (None: whole pieces, padded to the
    longest); evaluation always scores whole pieces.
    """
    hp = dict(locals())
    splits, low = chorale_splits(resolution)
    return _chorales_task(splits, low, hp)


def _chorales_task(splits: dict[str, Split], low: int, hp: dict) -> ChoralesTask:
    n = splits["train"].values.shape[1]
    task = ChoralesTask(
        "chorales", splits, _frames_in, _frames_out, n, n, sigmoid_cross_entropy,
        window=hp["length"], eval_rows=None, batch_size=hp["batch_size"],
        hidden=hp["hidden"], init=hp["init"], leak=hp["leak"], hparams=hp,
    )  # fmt: skip
    task.pitch_low = low
    return task


# -------------------------------------------------------------------------- text
class TextTask(DataTask):
    """Character prediction; ``alphabet`` maps output unit ``i`` to a character."""

    alphabet: str = ""

    def step_metrics(self, outputs: Array, batch: Batch) -> dict[str, Array]:
        """Character error rate and ``bits_per_char`` (the loss in bits)."""
        loss = self.loss_from_outputs(outputs, batch)
        return {**super().step_metrics(outputs, batch), "bits_per_char": bits(loss)}

    def encode_text(self, text: str) -> np.ndarray:
        """Character codes of ``text`` (every character must be in the alphabet)."""
        index = {c: i for i, c in enumerate(self.alphabet)}
        return np.array([index[c] for c in text], dtype=np.int32)

    def decode(self, codes) -> str:
        """The text of character codes."""
        return "".join(self.alphabet[int(i)] for i in np.asarray(codes).reshape(-1))


def default_text() -> str:
    """The standard library's documentation topics (``pydoc_data.topics``), joined
    in the order of their names with blank lines between them."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_text(path: str) -> str:
    """The contents of the UTF-8 file ``path`` (one-line errors name the field)."""
    field = f"task hyperparameter 'path' = {path!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{field}: no such file (give a UTF-8 text file)")
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{field} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
            f"offset {err.start}); give a UTF-8 text file"
        ) from None
    except OSError as err:
        raise ConfigError(f"{field} cannot be read ({err.strerror})") from None


def text_splits(text: str, length: int) -> tuple[dict[str, Split], str]:
    """Contiguous train / validation / test blocks (:data:`TEXT_BLOCKS`) of the
    character codes, and the alphabet (the sorted characters of the whole text)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    values, codes = np.unique(points, return_inverse=True)
    alphabet = "".join(chr(v) for v in values)
    dtype = np.uint8 if len(alphabet) <= 256 else np.int32
    codes = codes.astype(dtype)
    n = len(codes)
    cut1 = round(n * TEXT_BLOCKS[0])
    cut2 = cut1 + round(n * TEXT_BLOCKS[1])
    blocks = {
        "train": codes[:cut1],
        "validation": codes[cut1:cut2],
        "test": codes[cut2:],
    }
    short = min(len(b) for b in blocks.values())
    if short < length + 1:
        need = -(-(length + 1) // min(TEXT_BLOCKS))
        raise ConfigError(
            f"task hyperparameter 'path': the text has {n} characters, too few for "
            f"'length' = {length} (at least {need})"
        )
    return {k: Split.from_sequences([b]) for k, b in blocks.items()}, alphabet


def _codes_in(size: int):
    def encode(previous: Array, valid: Array) -> Array:
        return jax.nn.one_hot(jnp.where(valid, previous.astype(jnp.int32), -1), size)

    return encode


def _codes_out(current: Array, valid: Array) -> Array:
    return jnp.where(valid, current.astype(jnp.int32), 0)


def text(
    path: str | None = None,
    length: Length = 100,
    batch_size: BatchSize = 20,
    hidden: Hidden = 128,
    init: Init = "smart_tanh",
    leak: Leak = 0.0,
) -> TextTask:
    """Character-level language modelling on a UTF-8 file, in bits per character.

    The default file is the standard library's ``pydoc_data`` documentation topics.

    ``length`` is the training window and the length of the evaluation rows.
    """
    hp = dict(locals())
    corpus = default_text() if path is None else read_text(path)
    splits, alphabet = text_splits(corpus, length)
    size = len(alphabet)
    task = TextTask(
        "text", splits, _codes_in(size), _codes_out, size, size,
        softmax_cross_entropy, window=length, eval_rows=length,
        batch_size=batch_size, hidden=hidden, init=init, leak=leak, hparams=hp,
    )  # fmt: skip
    task.alphabet = alphabet
    return task
