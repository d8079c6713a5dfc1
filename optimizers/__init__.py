"""Optimizers: every method is an optax ``GradientTransformationExtraArgs``."""

from optimizers.base import (
    Objective,
    StepRecord,
    WorkCount,
    collect_records,
    collect_work,
    loss_grads_and_states,
)
from optimizers.clipping import clip_gradients
from optimizers.first_order import sgd, sgd_clip, sgd_cr
from optimizers.nonfinite import guard_nonfinite
from optimizers.registry import (
    OPTIMIZERS,
    check_optimizer,
    make_optimizer,
    register_optimizer,
    resolve_optimizer,
    traced_names,
)
from optimizers.regularizer import add_omega_gradient, omega, omega_gradient

__all__ = [
    "OPTIMIZERS",
    "Objective",
    "StepRecord",
    "WorkCount",
    "add_omega_gradient",
    "check_optimizer",
    "clip_gradients",
    "collect_records",
    "collect_work",
    "guard_nonfinite",
    "loss_grads_and_states",
    "make_optimizer",
    "omega",
    "omega_gradient",
    "register_optimizer",
    "resolve_optimizer",
    "sgd",
    "sgd_clip",
    "sgd_cr",
    "traced_names",
]
