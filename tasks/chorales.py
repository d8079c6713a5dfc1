"""Bach chorales from the music21 corpus as piano rolls (polyphonic music modelling).

The data: every MusicXML file of music21's ``bach`` corpus (410 files in music21
10; ``bwv846``, a keyboard prelude, is left out), that is about 409 chorale
harmonizations. Of each piece the four voices are kept (the parts named Soprano,
Alto, Tenor and Bass; a piece without them keeps all its parts), so instrumental
doublings and obbligato parts do not add notes.

The piano roll samples the sounding pitches once per ``resolution``: frame ``k``
holds MIDI pitch ``p`` when a note of pitch ``p`` sounds at time ``k * step``
(``start <= k step < start + duration``, in quarter notes). The default is one frame
per quarter note, the resolution of the JSB chorales of Boulanger-Lewandowski et al.
(2012), whose measure (negative log-likelihood per time step) this task reports:
shorter notes between two frames are dropped there too, and a quarter-note piece is
24-272 frames long (median 48), which is the range of lengths Pascanu et al. (2013)
study. ``"eighth"`` doubles the frames and keeps passing eighth notes. Repeats are
not expanded and grace notes (no duration) never sound.

The pitch range is the one that occurs in the kept voices of the whole corpus (MIDI
36-81 in music21 10: 46 output units). The split is fixed by the file names:
the pieces sorted by the SHA-256 of their names, then the first 229/382 of them for
training, the next 76/382 for validation and the rest for testing (245 / 81 / 83
pieces): the proportions of the common JSB split, not its pieces.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

#: Frames per quarter note.
RESOLUTIONS = {"quarter": 1, "eighth": 2}
#: Voices kept, matched at the start of a part's name (case-insensitive).
VOICES = ("soprano", "alto", "tenor", "bass")
#: Files of the corpus' ``bach`` folder that are not chorales.
NOT_CHORALES = frozenset({"bwv846"})
#: The JSB proportions (Boulanger-Lewandowski et al. 2012): 229 / 76 / 77 pieces.
JSB_SIZES = (229, 76, 77)
#: Numbers of MIDI pitches.
N_MIDI = 128


def _corpus():
    try:
        from music21 import corpus
    except ImportError as err:  # pragma: no cover: music21 is a dependency
        raise RuntimeError(
            "the chorales task needs music21 (pip install music21)"
        ) from err
    return corpus


def chorale_files() -> list[Path]:
    """The MusicXML files of the corpus' Bach chorales, sorted by name."""
    paths = _corpus().getComposer("bach")
    keep = [
        Path(p)
        for p in paths
        if Path(p).suffix in (".mxl", ".xml", ".musicxml")
        and piece_name(p) not in NOT_CHORALES
    ]
    return sorted(keep, key=lambda p: p.name)


def piece_name(path: str | Path) -> str:
    """``bwv1.6`` for ``.../bach/bwv1.6.mxl``."""
    name = Path(path).name
    for suffix in (".mxl", ".xml", ".musicxml", ".krn", ".rntxt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_pieces(names: list[str]) -> dict[str, list[str]]:
    """Train, validation and test pieces: sorted by the SHA-256 of their names,
    then cut in the JSB proportions (:data:`JSB_SIZES`)."""
    ordered = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    total = sum(JSB_SIZES)
    n_train = round(len(ordered) * JSB_SIZES[0] / total)
    n_valid = round(len(ordered) * JSB_SIZES[1] / total)
    return {
        "train": ordered[:n_train],
        "validation": ordered[n_train : n_train + n_valid],
        "test": ordered[n_train + n_valid :],
    }


def voice_parts(score) -> list:
    """The parts named Soprano, Alto, Tenor and Bass (all parts without them)."""
    parts = list(score.parts)
    named = [p for p in parts if (p.partName or "").lower().startswith(VOICES)]
    covered = {v for p in named for v in VOICES if p.partName.lower().startswith(v)}
    return named if covered == set(VOICES) else parts


def piano_roll(score, frames_per_quarter: int = 1) -> np.ndarray:
    """``[T, 128]`` booleans: MIDI pitch ``p`` sounds at frame ``k``.

    Frame ``k`` is the time ``k / frames_per_quarter`` quarter notes; a note sounds
    there when it starts at or before it and ends after it. ``T`` covers the whole
    piece (its highest time).
    """
    step = 1.0 / frames_per_quarter
    n_frames = math.ceil(float(score.highestTime) / step - 1e-9)
    roll = np.zeros((n_frames, N_MIDI), dtype=bool)
    for part in voice_parts(score):
        for note in part.flatten().notes:
            start = float(note.offset)
            stop = start + float(note.duration.quarterLength)
            first = math.ceil(start / step - 1e-9)
            last = min(math.ceil(stop / step - 1e-9), n_frames)
            for pitch in note.pitches:
                roll[first:last, pitch.midi] = True
    return roll


def parse(path: str | Path):
    """The score of one corpus file (music21)."""
    return _corpus().parse(str(path))


def build_rolls(paths: list[Path], frames_per_quarter: int) -> dict[str, np.ndarray]:
    """The piano rolls of ``paths`` for the cache: every piece's frames end to end.

    Returns ``rolls`` ``[N, 128]`` (uint8), ``lengths`` ``[S]`` and ``names`` ``[S]``
    (in the order of ``paths``).
    """
    rolls = [piano_roll(parse(p), frames_per_quarter) for p in paths]
    return {
        "rolls": np.concatenate(rolls).astype(np.uint8),
        "lengths": np.array([len(r) for r in rolls], dtype=np.int64),
        "names": np.array([piece_name(p) for p in paths]),
    }
