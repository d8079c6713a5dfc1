"""Locating the wall of the single-unit model (Pascanu et al. 2013, Fig. 6).

The quoted positions and the line are those of docs/measurements.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis.wall import analytic_wall, error_surface, find_wall
from tasks.wall import wall_error


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_error(w, b, n_steps: int = 50) -> np.ndarray:
    """Independent float64 loop: ``x_t = w sigma(x_{t-1}) + b``, ``x_0 = 0.5``."""
    x = np.full(np.broadcast(w, b).shape, 0.5)
    for _ in range(n_steps):
        x = w * _sigmoid(x) + b
    return (_sigmoid(x) - 0.7) ** 2


@pytest.mark.parametrize(("w", "quoted"), [(5.0, -2.613), (8.0, -4.48), (10.0, -5.725)])
def test_find_wall_at_the_quoted_positions(w, quoted):
    b = find_wall(w)
    assert b.shape == ()
    assert abs(float(b) - quoted) < 0.01


def test_find_wall_agrees_with_analytic_line():
    w = np.linspace(5.0, 10.0, 11)
    found = find_wall(w)
    assert found.shape == w.shape
    np.testing.assert_allclose(found, analytic_wall(w), atol=0.01)
    # The line of docs/measurements.md: b = 0.5 - 0.6225 w.
    np.testing.assert_allclose(analytic_wall(w), 0.5 - 0.6225 * w, atol=2e-3)


def test_no_wall_for_small_w():
    w = np.array([2.0, 3.0])
    assert np.all(np.isnan(find_wall(w)))
    assert np.all(np.isnan(analytic_wall(w)))


def test_analytic_threshold_is_where_the_fixed_point_turns_unstable():
    # Slope of f(x) = w sigma(x) + b at x0 = 0.5, by a central difference.
    h = 1e-6
    dsigma = (_sigmoid(0.5 + h) - _sigmoid(0.5 - h)) / (2 * h)
    w_crit = 1.0 / dsigma
    assert 4.25 < w_crit < 4.26
    assert np.isnan(analytic_wall(w_crit - 1e-3))
    assert np.isfinite(analytic_wall(w_crit + 1e-3))
    # On the line, x0 = 0.5 is a fixed point: one step leaves it where it is.
    w = np.array([4.5, 7.0, 9.5])
    np.testing.assert_allclose(w * _sigmoid(0.5) + analytic_wall(w), 0.5, atol=1e-12)


@pytest.mark.parametrize("w", [5.0, 8.0, 10.0])
def test_error_jumps_across_the_found_wall(w):
    b = float(find_wall(w))
    jump = _np_error(w, b - 5e-4) - _np_error(w, b + 5e-4)  # delta b = 0.001
    assert 0.33 <= jump <= 0.41


@pytest.mark.parametrize("w", [6.0, 8.0, 10.0])
def test_bisection_locates_the_jump_finer_than_the_scan(w):
    """The scan step is 0.002; after bisection the jump is within +-1e-5 of ``b``."""
    b = float(find_wall(w))
    assert _np_error(w, b - 1e-5) - _np_error(w, b + 1e-5) > 0.3


def test_min_jump_controls_detection():
    assert np.isnan(find_wall(5.0, min_jump=0.5))
    assert np.isfinite(find_wall(5.0, min_jump=0.1))


def test_error_surface_shapes_and_values():
    w, b, e = error_surface(resolution=(11, 9))
    assert w.shape == (11,) and b.shape == (9,) and e.shape == (9, 11)
    assert e.dtype == np.float64
    assert (w[0], w[-1], b[0], b[-1]) == (0.0, 10.0, -7.0, 1.0)
    np.testing.assert_allclose(e, _np_error(w[None, :], b[:, None]), atol=1e-10)
    with jax.enable_x64(True):
        for i, j in [(0, 0), (5, 3), (10, 8), (8, 2)]:
            ref = float(wall_error(jnp.float64(w[i]), jnp.float64(b[j])))
            assert e[j, i] == pytest.approx(ref, abs=1e-12)


def test_error_surface_default_window():
    w, b, e = error_surface(resolution=(21, 17), n_steps=10)
    assert e.shape == (17, 21)
    np.testing.assert_allclose(e, _np_error(w[None, :], b[:, None], 10), atol=1e-10)
