"""Curvature probes: gradient versus curvature along the gradient direction.

At parameters ``theta`` and a batch, with gradient ``g`` and ``u = g / ||g||``
(Pascanu, Mikolov & Bengio 2013, section 3: the exploding direction and the
curvature along it):

* ``grad_norm = ||g||``;
* ``curv_hessian = u^T H u`` (exact Hessian, may be negative) and
  ``curv_gn = u^T G u`` (Gauss-Newton ``G = J^T H_L J``, non-negative);
* the Newton step length along ``u``: ``newton_* = ||g|| / |c|``, and the
  curvature ratio ``ratio_* = c / ||g||``. If curvature and gradient explode at the
  same rate along ``u`` the Newton step stays bounded and a second-order method
  copes with the wall;
* the top-``k`` Hessian eigenpairs by Lanczos (``k`` = number of classes, Gur-Ari
  et al. 2018): ``top_eigenvalue``, ``cos_top = |g . v_1| / ||g||`` and
  ``topk_fraction = sum_i (g . v_i)^2 / ||g||^2``, plus the Ritz values and
  weights of the random start vector (a one-probe stochastic Lanczos quadrature
  estimate of the spectral density);
* ``smoothness = ||grad(theta - r u) - g|| / r``: the finite-difference local
  smoothness of Zhang et al. (ICLR 2020) over a step of length ``r`` along the
  descent direction (in float32 its relative rounding error is about
  ``eps ||g|| / (r ||H u||)``: raise ``fd_radius`` if the gradient is huge and
  the curvature small);
* ``spectral_radius`` of ``W_rec`` (NaN for tasks without one).

The probe is a pure function: jit it, vmap it over seeds or batches. Its cost is
about two gradients, ``lanczos_iters + 1`` Hessian-vector products (each one is
linearized once) and one Gauss-Newton product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optimizers.curvature import (
    gauss_newton_operator,
    hessian_operator,
    top_eigenpairs,
)
from tasks.base import Batch, Task
from tasks.hparams import ConfigError
from tasks.rnn import spectral_radius

Array = jax.Array

#: Scalar quantities of a probe, in the order of the tidy tables.
SCALARS = (
    "loss",
    "grad_norm",
    "curv_hessian",
    "curv_gn",
    "newton_hessian",
    "newton_gn",
    "ratio_hessian",
    "ratio_gn",
    "top_eigenvalue",
    "cos_top",
    "topk_fraction",
    "smoothness",
    "spectral_radius",
)
#: Vector quantities (stored as lists in the run files).
VECTORS = ("top_eigenvalues", "ritz_values", "ritz_weights")


class ProbeConfig(NamedTuple):
    """Settings of a probe.

    Attributes:
      lanczos_iters: Hessian-vector products in the Lanczos run (20 finds the top
        eigenvalues of these models to a few digits).
      top_k: size of the top eigenspace for ``topk_fraction`` (None: the task's
        ``n_out``, the number of output units, i.e. classes for softmax tasks).
      fd_radius: step length ``r`` of the finite-difference smoothness.
    """

    lanczos_iters: int = 20
    top_k: int | None = None
    fd_radius: float = 1e-3


DEFAULT_PROBE = ProbeConfig()


def check_probe_config(config: ProbeConfig) -> ProbeConfig:
    """Validate a probe configuration (a :class:`ConfigError` names the field)."""
    if not isinstance(config.lanczos_iters, int) or config.lanczos_iters < 2:
        raise ConfigError(
            f"'lanczos_iters' must be an integer >= 2, got {config.lanczos_iters!r}"
        )
    if config.top_k is not None and (
        not isinstance(config.top_k, int)
        or not 1 <= config.top_k <= config.lanczos_iters
    ):
        raise ConfigError(
            f"'top_k' must be an integer in [1, lanczos_iters = "
            f"{config.lanczos_iters}], got {config.top_k!r}"
        )
    if not config.fd_radius > 0:
        raise ConfigError(f"'fd_radius' must be positive, got {config.fd_radius!r}")
    return config


def default_top_k(task: Task) -> int:
    """``task.n_out``, the number of output units (classes of a softmax task).

    Gur-Ari, Roberts & Dyer (2018) find the gradient concentrated in the top
    eigenspace of the Hessian whose dimension is the number of classes.
    """
    return int(task.n_out)


_dot = optax.tree_utils.tree_vdot


def probe(
    task: Task,
    params: Any,
    batch: Batch,
    key: Array,
    config: ProbeConfig = DEFAULT_PROBE,
) -> dict[str, Array]:
    """Measure gradient and curvature quantities at ``params`` on ``batch``.

    Args:
      task: the task (loss, outputs, recurrent matrix).
      params: the point.
      batch: the batch the loss, gradient and curvature are taken on.
      key: PRNG key for the Lanczos start vector.
      config: Lanczos iterations, ``k`` and the finite-difference radius.

    Returns:
      A dict with the scalars of :data:`SCALARS` and the vectors of
      :data:`VECTORS` (``top_eigenvalues`` ``[k]``, ``ritz_*`` ``[lanczos_iters]``).
    """
    k = config.top_k or default_top_k(task)
    k = min(k, config.lanczos_iters)

    def loss_fn(p):
        return task.loss(p, batch)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    gnorm = optax.tree_utils.tree_norm(grads)
    safe = jnp.where(gnorm > 0, gnorm, 1.0)
    u = jax.tree.map(lambda g: g / safe, grads)

    hvp = hessian_operator(task, params, batch)
    curv_h = _dot(u, hvp(u))
    curv_g = _dot(u, gauss_newton_operator(task, params, batch)(u))
    eig = top_eigenpairs(hvp, params, key, num_iters=config.lanczos_iters, k=k)
    proj = jax.vmap(lambda v: _dot(v, u))(eig.vectors)

    r = config.fd_radius
    moved = jax.tree.map(lambda p, d: p - r * d, params, u)
    diff = jax.tree.map(jnp.subtract, jax.grad(loss_fn)(moved), grads)
    smooth = optax.tree_utils.tree_norm(diff) / r

    matrix = task.recurrent_matrix(params)
    radius = (
        jnp.float32(jnp.nan) if matrix is None else spectral_radius(matrix)
    ).astype(jnp.float32)
    return {
        "loss": loss,
        "grad_norm": gnorm,
        "curv_hessian": curv_h,
        "curv_gn": curv_g,
        "newton_hessian": gnorm / jnp.abs(curv_h),
        "newton_gn": gnorm / curv_g,
        "ratio_hessian": curv_h / gnorm,
        "ratio_gn": curv_g / gnorm,
        "top_eigenvalue": eig.values[0],
        "cos_top": jnp.abs(proj[0]),
        "topk_fraction": jnp.sum(proj**2),
        "smoothness": smooth,
        "spectral_radius": radius,
        "top_eigenvalues": eig.values,
        "ritz_values": eig.ritz_values,
        "ritz_weights": eig.ritz_weights,
    }


def make_probe(task: Task, config: ProbeConfig = DEFAULT_PROBE) -> Callable:
    """``jit(params, batch, key) -> probe dict`` for one point (vmap it for many)."""
    check_probe_config(config)
    return jax.jit(lambda params, batch, key: probe(task, params, batch, key, config))


def probe_rows(values: dict[str, Any], **columns: Any) -> list[dict]:
    """Tidy rows from probe outputs with a leading axis (one row per entry).

    Scalars become floats (non-finite ones as they are: the run file stores them
    as null, which reads back as NaN), vectors become lists; the
    keyword ``columns`` (``seed=[...]``, ``step=7``, ``kind="periodic"``) are added
    to every row: sequences give one value per row, anything else is repeated.
    """
    values = {k: np.asarray(v) for k, v in values.items()}
    n = values["grad_norm"].shape[0]
    rows = []
    for i in range(n):
        row = {}
        for name, col in columns.items():
            row[name] = col[i] if isinstance(col, list | tuple | np.ndarray) else col
        for name in SCALARS:
            row[name] = float(values[name][i])
        for name in VECTORS:
            row[name] = [float(x) for x in values[name][i]]
        rows.append(row)
    return rows
