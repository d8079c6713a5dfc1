"""A plain optax optimizer as a curvbench plug-in: Adam on globally clipped gradients.

A plug-in is a *factory*: a function whose keyword parameters are the optimizer's
hyperparameters and which returns an optax transformation. curvbench reads the
signature to validate user values before anything compiles (unknown names, wrong
types and out-of-range values are a ``tasks.ConfigError`` naming the field) and, once
registered by name, to list the hyperparameters in ``curvbench optimizers``.

Hyperparameters annotated ``float`` (here through ``Annotated[float, Range(...)]``)
are passed to the compiled program as traced scalars, so a learning-rate or threshold
sweep compiles once. The factory must therefore not branch on them in Python; optax
transformations accept array-valued hyperparameters, so passing them through is safe.

Use it by import path, from the repository root::

    curvbench run --task temporal_order \\
        --optimizer examples.plain_optax:adam_clipped -o learning_rate=0.003 \\
        --seeds 2 --steps 500
"""

from __future__ import annotations

from typing import Annotated

import optax

from tasks import Range

#: Positive reals, ``(0, inf)``.
Positive = Annotated[float, Range(0, None, low_open=True)]


def adam_clipped(
    learning_rate: Positive = 1e-3,
    threshold: Positive = 1.0,
) -> optax.GradientTransformation:
    """Adam (Kingma & Ba 2015) on gradients clipped to global norm ``threshold``.

    ``g <- g * min(1, threshold / ||g||)`` (Pascanu et al. 2013, Algorithm 1), then
    the Adam update scaled by ``learning_rate``.

    Args:
      learning_rate: Adam's step size.
      threshold: the global-norm clipping threshold.

    Returns:
      ``optax.chain(optax.clip_by_global_norm(threshold), optax.adam(learning_rate))``.
    """
    return optax.chain(optax.clip_by_global_norm(threshold), optax.adam(learning_rate))
