"""Gradient clipping with records (Pascanu et al. 2013, Algorithm 1; Mikolov 2012).

Global-norm clipping (Algorithm 1)::

    g <- dE/dtheta;  if ||g|| >= threshold:  g <- threshold * g / ||g||

with ``||g||`` the norm over all parameters. Element-wise clipping (Mikolov 2012) clips
each component to ``[-threshold, threshold]``.

The threshold is either a number (``adaptive=False``) or ``factor`` times the running
average of the pre-clip gradient norm over all previous updates (``adaptive=True``;
Pascanu et al. suggest the average norm, and half to ten times it still converges). At
the first update of an adaptive clip the average is the current norm.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers.base import StepRecord

Array = jax.Array


class ClipState(NamedTuple):
    """State of :func:`clip_gradients`."""

    norm_sum: Array  # sum of finite pre-clip norms seen so far
    count: Array  # number of finite norms seen
    record: StepRecord  # clip_norm, clip_threshold, clipped


def clip_gradients(
    threshold: float | Array = 1.0,
    method: str = "global",
    adaptive: bool = False,
) -> optax.GradientTransformation:
    """Clip gradients by their global norm or element-wise, recording every update.

    Args:
      threshold: the clipping threshold, or the factor on the running average
        gradient norm when ``adaptive``. May be a traced scalar.
      method: "global" (Algorithm 1) or "elementwise".
      adaptive: derive the threshold from the running average pre-clip norm.

    Returns:
      A transformation whose state records ``clip_norm`` (pre-clip global norm),
      ``clip_threshold`` and ``clipped`` (whether clipping changed the update).
    """
    if method not in ("global", "elementwise"):
        raise ValueError(
            f"clip method must be 'global' or 'elementwise', not {method!r}"
        )

    def init_fn(params):
        del params
        zero = jnp.zeros((), jnp.float32)
        record = StepRecord(
            {"clip_norm": zero, "clip_threshold": zero, "clip": jnp.zeros((), bool)}
        )
        return ClipState(zero, jnp.zeros((), jnp.int32), record)

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree_utils.tree_norm(updates).astype(jnp.float32)
        finite = jnp.isfinite(norm)
        if adaptive:
            average = jnp.where(
                state.count > 0, state.norm_sum / jnp.maximum(state.count, 1), norm
            )
            limit = threshold * average
        else:
            limit = jnp.asarray(threshold, jnp.float32)
        if method == "global":
            fired = norm >= limit
            # An all-zero gradient at a zero adaptive limit stays zero (not 0/0).
            scale = jnp.where(fired, limit / jnp.where(norm > 0, norm, 1.0), 1.0)
            updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
        else:
            fired = jnp.any(
                jnp.stack(
                    [jnp.any(jnp.abs(g) > limit) for g in jax.tree.leaves(updates)]
                )
            )
            updates = jax.tree.map(lambda g: jnp.clip(g, -limit, limit), updates)
        record = StepRecord({"clip_norm": norm, "clip_threshold": limit, "clip": fired})
        new_state = ClipState(
            norm_sum=state.norm_sum + jnp.where(finite, norm, 0.0),
            count=state.count + finite.astype(jnp.int32),
            record=record,
        )
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)
