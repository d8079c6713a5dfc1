"""Never apply a non-finite update: skip it, or shrink the recurrent weights instead.

When the gradient norm is not finite (the gradient exploded past float range),
Pascanu et al.'s released code replaces the gradient by ``0.02 W_rec`` for the
recurrent weights and 0 for every other parameter, so the step shrinks ``W_rec`` and
moves the network away from the exploding region. The ``skip`` policy instead returns a
zero update and leaves the inner optimizer's state untouched. Every event is counted.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers.base import StepRecord

Array = jax.Array
POLICIES = ("skip", "shrink")


class GuardState(NamedTuple):
    """State of :func:`guard_nonfinite`."""

    inner: Any
    events: Array  # cumulative count of non-finite gradients
    record: StepRecord  # nonfinite: this update's gradient was non-finite


def _shrink_gradient(params, objective, shrink):
    if objective is None:
        raise ValueError(
            "the 'shrink' non-finite policy needs objective= (the task knows which "
            "weights are recurrent); use nonfinite='skip' outside the runner"
        )
    mask = objective.task.recurrent_mask(params)
    return jax.tree.map(
        lambda p, m: shrink * p if m else jnp.zeros_like(p), params, mask
    )


def guard_nonfinite(
    inner: optax.GradientTransformation,
    policy: str = "shrink",
    shrink: float | Array = 0.02,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so that non-finite gradients never reach the parameters.

    Args:
      inner: the transformation applied to finite gradients.
      policy: "skip" (zero update, inner state unchanged) or "shrink" (the gradient is
        replaced by ``shrink * W_rec`` on recurrent weights and 0 elsewhere, then passed
        to ``inner``).
      shrink: the shrink factor (Pascanu et al.'s code: 0.02).

    Returns:
      A transformation recording ``nonfinite`` every update and counting events.
    """
    if policy not in POLICIES:
        raise ValueError(f"nonfinite policy must be one of {POLICIES}, not {policy!r}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        record = StepRecord({"nonfinite": jnp.zeros((), bool)})
        return GuardState(inner.init(params), jnp.zeros((), jnp.int32), record)

    def update_fn(updates, state, params=None, *, objective=None, **extra):
        norm = optax.tree_utils.tree_norm(updates)
        bad = ~jnp.isfinite(norm)
        record = StepRecord({"nonfinite": bad})
        events = state.events + bad.astype(jnp.int32)
        if policy == "skip":
            safe = jax.tree.map(
                lambda g: jnp.where(bad, 0.0, g).astype(g.dtype), updates
            )
            new_updates, new_inner = inner.update(
                safe, state.inner, params, objective=objective, **extra
            )
            new_updates = jax.tree.map(
                lambda u: jnp.where(bad, jnp.zeros_like(u), u), new_updates
            )
            new_inner = jax.tree.map(
                lambda new, old: jnp.where(bad, old, new), new_inner, state.inner
            )
            return new_updates, GuardState(new_inner, events, record)
        replacement = _shrink_gradient(params, objective, shrink)
        grads = jax.tree.map(
            lambda g, r: jnp.where(bad, r, g).astype(g.dtype), updates, replacement
        )
        new_updates, new_inner = inner.update(
            grads, state.inner, params, objective=objective, **extra
        )
        return new_updates, GuardState(new_inner, events, record)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
