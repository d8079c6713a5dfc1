"""SGD, gradient-clipped SGD (SGD-C) and SGD-C with the regularizer Omega (SGD-CR).

Pascanu et al. (2013), section 4: learning rate 0.01, no momentum, clipping threshold 1,
regularizer weight 4. The update is assembled from optax pieces::

    add Omega gradient -> guard non-finite -> clip -> trace (momentum) -> scale(-lr)

The floats in these signatures may be traced scalars: the runner passes them as
arguments of one compiled program, so sweeping them does not recompile.
"""

from __future__ import annotations

from typing import Annotated, Literal

import optax

from optimizers.clipping import clip_gradients
from optimizers.nonfinite import guard_nonfinite
from optimizers.regularizer import add_omega_gradient
from tasks.hparams import NONNEGATIVE, POSITIVE, UNIT_OPEN

LearningRate = Annotated[float, POSITIVE]
Momentum = Annotated[float, UNIT_OPEN]
Threshold = Annotated[float, POSITIVE]
Shrink = Annotated[float, NONNEGATIVE]
NonFinite = Literal["skip", "shrink"]
ClipMethod = Literal["global", "elementwise"]


def build_first_order(
    learning_rate,
    momentum=0.0,
    nesterov: bool = False,
    nonfinite: str = "shrink",
    shrink=0.02,
    threshold=None,
    clip: str = "global",
    adaptive: bool = False,
    reg_weight=None,
) -> optax.GradientTransformationExtraArgs:
    """The shared builder behind :func:`sgd`, :func:`sgd_clip` and :func:`sgd_cr`.

    ``threshold=None`` means no clipping and ``reg_weight=None`` no regularizer.
    """
    inner = [] if threshold is None else [clip_gradients(threshold, clip, adaptive)]
    inner += [
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.scale(-learning_rate),
    ]
    guarded = guard_nonfinite(optax.chain(*inner), nonfinite, shrink)
    if reg_weight is None:
        return guarded
    return optax.chain(add_omega_gradient(reg_weight), guarded)


def sgd(
    learning_rate: LearningRate = 0.01,
    momentum: Momentum = 0.0,
    nesterov: bool = False,
    nonfinite: NonFinite = "shrink",
    shrink: Shrink = 0.02,
) -> optax.GradientTransformationExtraArgs:
    """Plain SGD, optionally with (Nesterov) momentum."""
    return build_first_order(learning_rate, momentum, nesterov, nonfinite, shrink)


def sgd_clip(
    learning_rate: LearningRate = 0.01,
    threshold: Threshold = 1.0,
    clip: ClipMethod = "global",
    adaptive: bool = False,
    momentum: Momentum = 0.0,
    nesterov: bool = False,
    nonfinite: NonFinite = "shrink",
    shrink: Shrink = 0.02,
) -> optax.GradientTransformationExtraArgs:
    """SGD-C: SGD with gradient clipping (Pascanu et al. 2013, Algorithm 1).

    ``clip="elementwise"`` is Mikolov's component-wise variant; ``adaptive=True`` makes
    ``threshold`` a factor on the running average gradient norm.
    """
    return build_first_order(
        learning_rate, momentum, nesterov, nonfinite, shrink, threshold, clip, adaptive
    )


def sgd_cr(
    learning_rate: LearningRate = 0.01,
    threshold: Threshold = 1.0,
    reg_weight: Annotated[float, NONNEGATIVE] = 4.0,
    clip: ClipMethod = "global",
    adaptive: bool = False,
    momentum: Momentum = 0.0,
    nesterov: bool = False,
    nonfinite: NonFinite = "shrink",
    shrink: Shrink = 0.02,
) -> optax.GradientTransformationExtraArgs:
    """SGD-CR: clipped SGD plus the regularizer Omega (Pascanu et al. 2013, eq. 9)."""
    return build_first_order(
        learning_rate,
        momentum,
        nesterov,
        nonfinite,
        shrink,
        threshold,
        clip,
        adaptive,
        reg_weight,
    )
