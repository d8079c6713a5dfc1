"""Locate the wall of the single-unit model (Pascanu et al. 2013, Fig. 6).

The model (:mod:`tasks.wall`) is ``x_t = w sigma(x_{t-1}) + b``,
``x_0 = 0.5``, 50 steps, error ``E(w, b) = (sigma(x_50) - 0.7)^2``.

On the line ``b = x_0 - w sigma(x_0)`` the start ``x_0`` is a fixed point of the map
``f(x) = w sigma(x) + b``, with slope ``f'(x_0) = w sigma(x_0) (1 - sigma(x_0))``
(``sigma'(0.5) = 0.2350``). Where ``f'(x_0) > 1``, i.e. ``w > 4.2553``, the fixed
point is unstable: a small change of ``b`` is amplified about ``f'(x_0)^50`` times,
and the trajectory falls to the lower or the upper stable fixed point depending on the
side of the line. ``E`` then jumps by 0.33-0.41 within ``delta b = 0.001``: the wall
(``w = 5 -> b = -2.613``, ``w = 8 -> -4.48``, ``w = 10 -> -5.725``).

:func:`find_wall` finds the wall numerically (a fine scan in ``b`` plus bisection);
:func:`analytic_wall` gives the line; :func:`error_surface` evaluates ``E`` on a grid
for plots.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from tasks.wall import X0, wall_error

SIGMA_X0 = 1.0 / (1.0 + math.exp(-X0))
W_CRITICAL = 1.0 / (SIGMA_X0 * (1.0 - SIGMA_X0))  # w sigma'(x0) = 1: about 4.2553
_CHUNK = 2**18  # grid points per compiled call (the scan keeps all n_steps states)
_BISECT_TOL = 1e-6

_wall_error_jit = jax.jit(wall_error, static_argnames="n_steps")


def _error(w: np.ndarray, b: np.ndarray, n_steps: int) -> np.ndarray:
    """``E(w, b)`` in float64 for same-shaped ``w`` and ``b`` (1-D), in fixed chunks."""
    w, b = np.broadcast_arrays(np.asarray(w, np.float64), np.asarray(b, np.float64))
    shape, w, b = w.shape, w.ravel(), b.ravel()
    size = min(_CHUNK, max(w.size, 1))
    pad = -w.size % size
    w, b = np.pad(w, (0, pad), mode="edge"), np.pad(b, (0, pad), mode="edge")
    out = np.empty(w.size, np.float64)
    with jax.enable_x64(True):
        for start in range(0, w.size, size):
            sl = slice(start, start + size)
            e = _wall_error_jit(jnp.asarray(w[sl]), jnp.asarray(b[sl]), n_steps=n_steps)
            out[sl] = np.asarray(e, np.float64)
    return out[: out.size - pad].reshape(shape)


def error_surface(
    w_range: tuple[float, float] = (0.0, 10.0),
    b_range: tuple[float, float] = (-7.0, 1.0),
    resolution: tuple[int, int] = (201, 161),
    n_steps: int = 50,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``E(w, b)`` on a regular grid (float64), by :func:`tasks.wall.wall_error`.

    Args:
        w_range: ``(w_min, w_max)``; ``curvbench plot wall`` draws ``[0, 10]``.
        b_range: ``(b_min, b_max)``; the window is ``[-7, 1]``.
        resolution: ``(n_w, n_b)`` grid points.
        n_steps: Length of the recurrence.

    Returns:
        ``(w [n_w], b [n_b], E [n_b, n_w])`` with ``E[j, i] = E(w[i], b[j])``.
    """
    w = np.linspace(*w_range, resolution[0])
    b = np.linspace(*b_range, resolution[1])
    return w, b, _error(w[None, :], b[:, None], n_steps)


def find_wall(
    w: ArrayLike,
    b_range: tuple[float, float] = (-7.0, 1.0),
    n_b: int = 4001,
    n_steps: int = 50,
    min_jump: float = 0.1,
) -> np.ndarray:
    """The ``b`` of the wall for each ``w``, found numerically.

    For each ``w``, ``E`` is evaluated on ``n_b`` equally spaced ``b`` in ``b_range``;
    the wall is in the cell ``[b_j, b_{j+1}]`` with the largest ``|E(b_{j+1}) -
    E(b_j)|``. The cell is then halved repeatedly, keeping the half with the larger
    change of ``E``, down to a width of about 1e-6; the midpoint is returned. (``E`` is
    not monotone across the wall, since ``sigma(x_50)`` passes 0.7 there, so the
    bisection follows the jump rather than a sign change.)

    Args:
        w: Recurrent weights (any shape).
        b_range: Window of the scan in ``b``.
        n_b: Points of the scan (4001 on ``[-7, 1]``: step 0.002).
        n_steps: Length of the recurrence.
        min_jump: Smallest jump between neighbouring scan points that counts as a wall.

    Returns:
        ``b`` of the wall, shape of ``w``; NaN where the largest jump is below
        ``min_jump`` (no wall, e.g. ``w`` below about 4.4 at the default scan).
    """
    w_in = np.asarray(w, np.float64)
    w_flat = w_in.ravel()
    b = np.linspace(*b_range, n_b)
    found = np.full(w_flat.shape, np.nan)
    if w_flat.size == 0 or n_b < 2:
        return found.reshape(w_in.shape)
    e = _error(w_flat[:, None], b[None, :], n_steps)  # [n_w, n_b]
    jumps = np.abs(np.diff(e, axis=1))
    jumps[~np.isfinite(jumps)] = -np.inf
    j = np.argmax(jumps, axis=1)
    rows = np.arange(w_flat.size)
    has_wall = jumps[rows, j] >= min_jump
    if not has_wall.any():
        return found.reshape(w_in.shape)
    ws, j = w_flat[has_wall], j[has_wall]
    lo, hi = b[j], b[j + 1]
    e_lo, e_hi = e[has_wall, j], e[has_wall, j + 1]
    n_halvings = max(0, math.ceil(math.log2((b[1] - b[0]) / _BISECT_TOL)))
    for _ in range(n_halvings):
        mid = 0.5 * (lo + hi)
        e_mid = _error(ws, mid, n_steps)
        left = np.abs(e_mid - e_lo) >= np.abs(e_hi - e_mid)  # jump in [lo, mid]
        hi, e_hi = np.where(left, mid, hi), np.where(left, e_mid, e_hi)
        lo, e_lo = np.where(left, lo, mid), np.where(left, e_lo, e_mid)
    found[has_wall] = 0.5 * (lo + hi)
    return found.reshape(w_in.shape)


def analytic_wall(w: ArrayLike) -> np.ndarray:
    """The wall line ``b = x_0 - w sigma(x_0)`` (about ``0.5 - 0.6225 w``).

    It is a wall only where the fixed point ``x_0`` is unstable,
    ``w sigma(x_0) (1 - sigma(x_0)) > 1`` (``w > 4.2553``); NaN elsewhere.

    Args:
        w: Recurrent weights (any shape).

    Returns:
        ``b`` of the wall, shape of ``w``.
    """
    w = np.asarray(w, np.float64)
    unstable = w * SIGMA_X0 * (1.0 - SIGMA_X0) > 1.0
    return np.where(unstable, X0 - w * SIGMA_X0, np.nan)
