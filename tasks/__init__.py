"""Tasks: the task interface, RNN model, pathological problems and their registry."""

from tasks.base import Batch, Task
from tasks.hparams import ConfigError, Range
from tasks.losses import (
    OUTPUT_LOSSES,
    OutputLoss,
    sigmoid_cross_entropy,
    softmax_cross_entropy,
    squared_error,
)
from tasks.registry import TASKS, make_task, register_task
from tasks.rnn import init_rnn, rnn_apply, spectral_radius
from tasks.sequence import SequenceTask
from tasks.wall import WallTask, wall_error

__all__ = [
    "OUTPUT_LOSSES",
    "TASKS",
    "Batch",
    "ConfigError",
    "OutputLoss",
    "Range",
    "SequenceTask",
    "Task",
    "WallTask",
    "init_rnn",
    "make_task",
    "register_task",
    "rnn_apply",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "spectral_radius",
    "squared_error",
    "wall_error",
]
