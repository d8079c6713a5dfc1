"""Diagonal second-order methods: SDLM, AdaHessian, Sophia-H and Sophia-G.

All four precondition the (averaged) gradient by a diagonal curvature estimate ``h``:

* SDLM, stochastic diagonal Levenberg-Marquardt (Becker & LeCun 1988; LeCun et al.
  1998): ``step = -lr * g / (h_bar + mu)``, ``h`` the Gauss-Newton diagonal (exact, or
  Monte-Carlo with targets sampled from the model, or Hutchinson on ``G``);
* AdaHessian (Yao et al. 2021): ``D = z * (H z)`` (Hutchinson, Rademacher ``z``),
  ``v = EMA(D^2)``, ``step = -lr * m_hat / ((sqrt(v_hat))^k + eps)``;
* Sophia (Liu et al. 2023): ``m = EMA(g)``; every ``k`` steps ``h = EMA(estimate)``
  with the Hutchinson Hessian diagonal (Sophia-H) or the Gauss-Newton-Bartlett
  estimate (Sophia-G); ``step = -lr * clip(m / max(gamma h, eps), 1)``.

Pascanu et al. (2013) contrast Hessian-free, which re-estimates curvature before every
update, with these methods, which average curvature over many steps. So every method
here has the same two knobs: ``every`` (re-estimate every k updates; in between the
last estimate is reused) and ``ema`` (the curvature's moving-average weight; 0 uses
only the fresh estimate). The every-k gate is a ``lax.cond`` on the runner's global
``step``, which is not vmapped over seeds, so skipped steps really skip the estimator.

Curvature is estimated on ``objective.curvature_batch`` with the estimators of
:mod:`optimizers.curvature`, shared with Hessian-free and the analysis. Probes and
sampled targets come from the per-seed ``key``, so they differ between seeds; ``update``
raises ``ValueError`` without ``key=``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from optimizers.base import Objective, StepRecord, WorkCount
from optimizers.curvature import (
    gauss_newton_diagonal_exact,
    gauss_newton_diagonal_sampled,
    gauss_newton_operator,
    hessian_operator,
    hutchinson_diagonal,
)
from tasks.hparams import POSITIVE, UNIT_OPEN, Range

Array = jax.Array
# estimator(objective, params, key) -> (diagonal, WorkCount of one estimate)
Estimator = Callable[[Objective, dict, Array], tuple[dict, WorkCount]]

LearningRate = Annotated[float, POSITIVE]
Every = Annotated[int, Range(1, None)]
Samples = Annotated[int, Range(1, 10_000)]
Beta = Annotated[float, UNIT_OPEN]


class DiagonalState(NamedTuple):
    """State of :func:`scale_by_diagonal_curvature`."""

    count: Array  # updates so far
    estimates: Array  # curvature estimates so far (for bias correction)
    momentum: dict  # EMA of gradients
    curvature: dict  # EMA of the curvature estimate (or of its square)
    work: WorkCount
    record: StepRecord


def _count(n: int, kind: str) -> WorkCount:
    z = jnp.zeros((), jnp.int32)
    counts = {"grad_evals": z, "fun_evals": z, "curvature_products": z}
    counts[kind] = jnp.asarray(n, jnp.int32)
    return WorkCount(**counts)


def hutchinson(kind: str = "hessian", n_probes: int = 1) -> Estimator:
    """``z * (A z)`` on the curvature batch, ``A`` the Hessian or Gauss-Newton matrix.

    Costs ``n_probes`` curvature-vector products.
    """
    operators = {"hessian": hessian_operator, "gauss_newton": gauss_newton_operator}
    make_operator = operators[kind]

    def estimate(objective, params, key):
        op = make_operator(objective.task, params, objective.curvature_batch)
        return hutchinson_diagonal(op, key, params, n_probes), _count(
            n_probes, "curvature_products"
        )

    return estimate


def sampled_gauss_newton(n_samples: int = 1) -> Estimator:
    """Gauss-Newton diagonal from sampled targets (one reverse pass per sample)."""

    def estimate(objective, params, key):
        diag = gauss_newton_diagonal_sampled(
            objective.task, params, objective.curvature_batch, key, n_samples
        )
        return diag, _count(n_samples, "grad_evals")

    return estimate


def exact_gauss_newton() -> Estimator:
    """The exact Gauss-Newton diagonal (``T x O`` reverse passes of the batch)."""

    def estimate(objective, params, key):
        del key
        batch = objective.curvature_batch
        diag = gauss_newton_diagonal_exact(objective.task, params, batch)
        return diag, _count(batch.inputs.shape[0] * objective.task.n_out, "grad_evals")

    return estimate


def scale_by_diagonal_curvature(
    estimator: Estimator,
    every: int = 1,
    ema: float | Array = 0.0,
    momentum: float | Array = 0.0,
    rule: str = "divide",
    damping: float | Array = 0.0,
    power: float | Array = 1.0,
    square: bool = False,
    bias_correction: bool = False,
    gamma: float | Array = 1.0,
    clip: float | Array = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Precondition gradients by a diagonal curvature estimate (before ``-lr``).

    Args:
      estimator: ``(objective, params, key) -> (diagonal, work)``.
      every: re-estimate every this many updates (static).
      ema: curvature moving-average weight; 0 keeps only the fresh estimate.
      momentum: gradient moving-average weight (0: the raw gradient).
      rule: "divide" -> ``m / (c^power + damping)`` with ``c = sqrt(v)`` when
        ``square`` else ``v``; "sophia" -> ``clip(m / max(gamma v, damping), clip)``.
      damping: mu (SDLM), eps (AdaHessian, Sophia).
      power: the Hessian power k of AdaHessian.
      square: average the squared estimate (AdaHessian).
      bias_correction: Adam-style bias correction of both moving averages.
      gamma, clip: Sophia's scale and clipping threshold.

    ``update`` needs ``params``, ``objective=`` and ``key=`` (a ``ValueError``
    otherwise); the runner passes all three.
    """
    if rule not in ("divide", "sophia"):
        raise ValueError(f"rule must be 'divide' or 'sophia', not {rule!r}")

    def init_fn(params):
        zeros = otu.tree_zeros_like(params)
        record = {
            "estimated": jnp.zeros((), bool),
            "curvature_mean": jnp.zeros((), jnp.float32),
        }
        if rule == "sophia":
            record["clip"] = jnp.zeros((), jnp.float32)
        zero = jnp.zeros((), jnp.int32)
        return DiagonalState(
            zero, zero, zeros, zeros, WorkCount.zeros(), StepRecord(record)
        )

    def update_fn(updates, state, params=None, *, objective=None, key=None, **extra):
        if objective is None or params is None:
            raise ValueError("diagonal curvature methods need params and objective=")
        if key is None:
            raise ValueError(
                "diagonal curvature methods need a PRNG key: pass key= to update "
                "(the runner passes a fresh per-seed key every step)"
            )
        step = extra.get("step", state.count)
        count = state.count + 1
        mom = otu.tree_update_moment(updates, state.momentum, momentum, 1)
        if bias_correction:
            mom_hat = otu.tree_bias_correction(mom, momentum, count)
        else:
            mom_hat = mom

        def estimate(_):
            diag, work = estimator(objective, params, key)
            if square:
                diag = jax.tree.map(jnp.square, diag)
            curv = otu.tree_update_moment(diag, state.curvature, ema, 1)
            return curv, state.estimates + 1, work

        def reuse(_):
            return state.curvature, state.estimates, _count(0, "grad_evals")

        if every == 1:
            curv, n_est, work = estimate(None)
            estimated = jnp.bool_(True)
        else:
            estimated = step % every == 0
            curv, n_est, work = jax.lax.cond(estimated, estimate, reuse, None)
        curv_hat = (
            otu.tree_bias_correction(curv, ema, n_est) if bias_correction else curv
        )
        record = {
            "estimated": estimated,
            "curvature_mean": jnp.mean(
                jnp.concatenate([jnp.ravel(c) for c in jax.tree.leaves(curv_hat)])
            ).astype(jnp.float32),
        }
        if rule == "divide":
            base = jax.tree.map(jnp.sqrt, curv_hat) if square else curv_hat
            out = jax.tree.map(
                lambda m, c: m / (jnp.maximum(c, 0.0) ** power + damping), mom_hat, base
            )
        else:
            ratio = jax.tree.map(
                lambda m, h: m / jnp.maximum(gamma * h, damping), mom_hat, curv_hat
            )
            out = jax.tree.map(lambda r: jnp.clip(r, -clip, clip), ratio)
            flat = jnp.concatenate([jnp.ravel(r) for r in jax.tree.leaves(ratio)])
            record["clip"] = jnp.mean(jnp.abs(flat) > clip).astype(jnp.float32)
        total = WorkCount(*(a + b for a, b in zip(state.work, work, strict=True)))
        new_state = DiagonalState(count, n_est, mom, curv, total, StepRecord(record))
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_lr(inner, learning_rate):
    return optax.chain(inner, optax.scale(-learning_rate))


GNEstimator = Literal["sampled", "exact", "hutchinson"]


def _gn_estimator(kind: str, n_samples: int) -> Estimator:
    if kind == "exact":
        return exact_gauss_newton()
    if kind == "hutchinson":
        return hutchinson("gauss_newton", n_samples)
    return sampled_gauss_newton(n_samples)


def sdlm(
    learning_rate: LearningRate = 0.01,
    mu: Annotated[float, POSITIVE] = 0.02,
    estimator: GNEstimator = "sampled",
    n_samples: Samples = 1,
    every: Every = 1,
    ema: Beta = 0.9,
) -> optax.GradientTransformationExtraArgs:
    """Stochastic diagonal Levenberg-Marquardt: ``-lr * g / (<h> + mu)``.

    ``h`` is the Gauss-Newton diagonal ("exact": ``T x O`` reverse passes, small
    outputs only; "sampled": targets drawn from the model; "hutchinson": ``z * G z``),
    ``<h>`` its moving average with weight ``ema`` (0: the fresh estimate only).
    """
    # Bias correction makes <h> start from the first estimate, as LeCun et al.
    # initialize it, instead of from zero (which would divide by ~mu at first).
    inner = scale_by_diagonal_curvature(
        _gn_estimator(estimator, n_samples), every=every, ema=ema, damping=mu,
        bias_correction=True,
    )  # fmt: skip
    return _with_lr(inner, learning_rate)


def adahessian(
    learning_rate: LearningRate = 0.15,
    b1: Beta = 0.9,
    ema: Beta = 0.999,
    eps: Annotated[float, POSITIVE] = 1e-4,
    power: Annotated[float, Range(0, 1)] = 1.0,
    n_probes: Samples = 1,
    every: Every = 1,
) -> optax.GradientTransformationExtraArgs:
    """AdaHessian: ``-lr * m_hat / (sqrt(v_hat)^k + eps)``, ``v = EMA((z * H z)^2)``.

    ``ema`` is the paper's ``beta_2``; ``power`` its Hessian power ``k``.
    """
    inner = scale_by_diagonal_curvature(
        hutchinson("hessian", n_probes), every=every, ema=ema, momentum=b1,
        damping=eps, power=power, square=True, bias_correction=True,
    )  # fmt: skip
    return _with_lr(inner, learning_rate)


def _sophia(estimator, learning_rate, b1, ema, gamma, eps, clip, every):
    inner = scale_by_diagonal_curvature(
        estimator, every=every, ema=ema, momentum=b1, rule="sophia",
        damping=eps, gamma=gamma, clip=clip,
    )  # fmt: skip
    return _with_lr(inner, learning_rate)


def sophia_h(
    learning_rate: LearningRate = 0.01,
    b1: Beta = 0.96,
    ema: Beta = 0.99,
    gamma: Annotated[float, POSITIVE] = 0.01,
    eps: Annotated[float, POSITIVE] = 1e-12,
    clip: Annotated[float, POSITIVE] = 1.0,
    every: Every = 10,
    n_probes: Samples = 1,
) -> optax.GradientTransformationExtraArgs:
    """Sophia-H: Hutchinson Hessian diagonal every ``every`` steps, clipped update."""
    estimator = hutchinson("hessian", n_probes)
    return _sophia(estimator, learning_rate, b1, ema, gamma, eps, clip, every)


def sophia_g(
    learning_rate: LearningRate = 0.01,
    b1: Beta = 0.96,
    ema: Beta = 0.99,
    gamma: Annotated[float, POSITIVE] = 0.01,
    eps: Annotated[float, POSITIVE] = 1e-12,
    clip: Annotated[float, POSITIVE] = 1.0,
    every: Every = 10,
    n_samples: Samples = 1,
) -> optax.GradientTransformationExtraArgs:
    """Sophia-G: Gauss-Newton-Bartlett estimate (targets sampled from the model)."""
    estimator = sampled_gauss_newton(n_samples)
    return _sophia(estimator, learning_rate, b1, ema, gamma, eps, clip, every)
