"""Preconditioned conjugate gradient with Martens' (2010) rules, jit- and vmap-safe.

Minimizes ``q(x) = 1/2 x^T A x + g^T x`` (``A x = -g``) for a symmetric matrix-free
``A``:

* warm start from ``x_0`` (HF passes 0.95 x the previous solution);
* stop at iteration ``i`` when ``i > k = max(10, ceil(0.1 i))``, ``q(x_i) < 0`` and
  ``(q(x_i) - q(x_{i-k})) / q(x_i) < k * tol`` (relative progress; ``tol = 5e-4``),
  never before ``min_iters`` nor after ``max_iters``;
* stop, without taking the step, when the direction has ``p^T A p <= 0``;
* keep the iterates at ``i = ceil(5 * 1.3^j)`` for CG backtracking (the last iterate
  is returned separately).

``q`` is tracked without extra products: with the residual ``r = -g - A x``,
``q(x) = 1/2 x^T (g - r)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

Array = jax.Array


def save_schedule(max_iters: int) -> tuple[int, ...]:
    """Iterations ``ceil(5 * 1.3^j) <= max_iters`` at which iterates are kept."""
    out, j = [], 0
    while (i := math.ceil(5 * 1.3**j)) <= max_iters:
        if not out or i != out[-1]:
            out.append(i)
        j += 1
    return tuple(out)


class CGResult(NamedTuple):
    """What :func:`conjugate_gradient` returns.

    Attributes:
      x: the last iterate.
      iterations: number of iterations run.
      saved: iterates at ``save_schedule(max_iters)`` (leading axis), zeros beyond
        ``n_saved``.
      n_saved: how many scheduled iterates were reached.
      q: ``q(x_i)`` for ``i = 0..max_iters`` (NaN where not reached).
      negative_curvature: stopped because a direction had ``p^T A p <= 0``.
      products: number of ``A`` products used.
    """

    x: dict
    iterations: Array
    saved: dict
    n_saved: Array
    q: Array
    negative_curvature: Array
    products: Array


def _q(x, r, g):
    # r = -g - A x  =>  A x = -g - r  =>  q = 1/2 x.(A x) + g.x = 1/2 x.(g - r).
    return 0.5 * (otu.tree_vdot(x, g) - otu.tree_vdot(x, r))


def conjugate_gradient(
    matvec: Callable[[dict], dict],
    grad: dict,
    x0: dict,
    *,
    max_iters: int = 250,
    min_iters: int = 1,
    tol: float | Array = 5e-4,
    precondition: dict | None = None,
) -> CGResult:
    """Run CG on ``q(x) = 1/2 x^T A x + g^T x`` from ``x0`` with Martens' stopping rule.

    Args:
      matvec: ``v -> A v`` (symmetric; HF passes the damped curvature).
      grad: ``g``.
      x0: the starting point.
      max_iters: hard cap on iterations (static).
      min_iters: never stop by the progress rule before this many iterations.
      tol: relative-progress tolerance (Martens: 5e-4).
      precondition: the diagonal ``M`` of the preconditioner (``z = r / M``), or None.
    """
    schedule = save_schedule(max_iters)
    slot_of = [-1] * (max_iters + 1)
    for slot, i in enumerate(schedule):
        slot_of[i] = slot
    slot_of = jnp.array(slot_of, jnp.int32)
    n_slots = max(len(schedule), 1)

    def solve(r):
        if precondition is None:
            return r
        return jax.tree.map(lambda a, m: a / m, r, precondition)

    r0 = jax.tree.map(lambda g, ax: -g - ax, grad, matvec(x0))
    z0 = solve(r0)
    q0 = _q(x0, r0, grad)
    dtype = jnp.result_type(q0)
    q_hist = jnp.full((max_iters + 1,), jnp.nan, dtype).at[0].set(q0)
    saved0 = jax.tree.map(lambda a: jnp.zeros((n_slots, *a.shape), a.dtype), x0)
    init = (
        jnp.int32(0), x0, r0, z0, z0, otu.tree_vdot(r0, z0), q_hist, saved0,
        jnp.int32(0), jnp.bool_(False), jnp.bool_(False), otu.tree_vdot(r0, z0) == 0,
    )  # fmt: skip

    def cond(carry):
        i, *_, done = carry
        return (i < max_iters) & ~done

    def body(carry):
        i, x, r, z, p, rz, q_hist, saved, n_saved, neg, stalled, _ = carry
        ap = matvec(p)
        pap = otu.tree_vdot(p, ap)
        bad = ~(pap > 0)  # also catches NaN
        # A zero direction means the residual vanished: converged, not curvature.
        negative = bad & (otu.tree_vdot(p, p) > 0)
        alpha = jnp.where(bad, 0.0, rz / jnp.where(bad, 1.0, pap))
        x_new = otu.tree_add_scale(x, alpha, p)
        r_new = otu.tree_add_scale(r, -alpha, ap)
        z_new = solve(r_new)
        rz_new = otu.tree_vdot(r_new, z_new)
        beta = rz_new / jnp.where(rz == 0, 1.0, rz)
        p_new = otu.tree_add_scale(z_new, beta, p)
        i_new = i + 1
        q_new = _q(x_new, r_new, grad)
        q_hist = q_hist.at[i_new].set(jnp.where(bad, q_hist[i], q_new))
        slot = slot_of[i_new]
        store = (slot >= 0) & ~bad
        saved = jax.tree.map(
            lambda s, v: jnp.where(store, s.at[jnp.maximum(slot, 0)].set(v), s),
            saved,
            x_new,
        )
        n_saved = n_saved + store
        k = jnp.maximum(10, jnp.ceil(0.1 * i_new).astype(jnp.int32))
        q_then = q_hist[jnp.maximum(i_new - k, 0)]
        progress = (q_new - q_then) / jnp.where(q_new == 0, 1.0, q_new)
        converged = (
            (i_new > k) & (i_new >= min_iters) & (q_new < 0) & (progress < k * tol)
        )
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(bad, b, a), new, old
        )
        return (
            jnp.where(bad, i, i_new), keep(x_new, x), keep(r_new, r), keep(z_new, z),
            keep(p_new, p), jnp.where(bad, rz, rz_new), q_hist, saved, n_saved,
            neg | negative, stalled | bad, bad | converged,
        )  # fmt: skip

    i, x, *_, q_hist, saved, n_saved, neg, stalled, _ = jax.lax.while_loop(
        cond, body, init
    )
    # Products: one for r0, one per iteration run, plus the refused step that ended
    # CG (on a non-positive or zero direction) if any.
    products = 1 + i + stalled.astype(jnp.int32)
    return CGResult(x, i, saved, n_saved, q_hist, neg, products)
