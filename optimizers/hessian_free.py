"""Hessian-free optimization (Martens 2010; Martens & Sutskever 2011).

Each update re-estimates the curvature on a fresh curvature minibatch and minimizes the
damped quadratic model

    q(p) = 1/2 p^T (B + lambda I + lambda mu S) p + g^T p,

with ``B`` the Gauss-Newton matrix (or the exact Hessian), ``S`` the structural-damping
matrix over the hidden states (``mu = 0`` disables it) and ``g`` the gradient on the
(large) gradient batch. Steps:

1. CG from ``warm_start * p_prev`` with Martens' relative-progress stopping rule
   (:mod:`optimizers.cg`), optionally preconditioned by
   ``(mean per-example g^2 + lambda)^0.75``;
2. CG backtracking: walk back from the last iterate through those kept at
   ``ceil(5 * 1.3^j)`` while the objective on the gradient batch keeps decreasing;
3. Levenberg-Marquardt: ``rho = (f(theta + p) - f(theta)) / (q_0(p) - q_0(0))`` with
   the *undamped* model ``q_0``; ``rho < 1/4`` (or NaN) -> ``lambda *= 3/2``,
   ``rho > 3/4`` -> ``lambda *= 2/3``;
4. Armijo line search: rate 1, accept when
   ``f(theta + r p) <= f(theta) + c r g^T p``, else ``r *= 0.8``, up to 60 times,
   else reject the step.

The runner passes the gradient batch as ``objective.batch`` and a freshly drawn
curvature batch as ``objective.curvature_batch`` every update: this is the per-step
curvature re-estimation. ``reuse_curvature = K`` instead keeps one curvature batch for
K updates (the state keeps its key; ``objective.curvature_batch_at(key)`` redraws
it), so re-estimation can be compared with reuse.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from optimizers.base import Objective, StepRecord, WorkCount, gradient_equivalents
from optimizers.cg import conjugate_gradient, save_schedule
from optimizers.curvature import GAUSS_NEWTON_FORMS, curvature_operator
from tasks.base import map_sequences
from tasks.hparams import NONNEGATIVE, POSITIVE, UNIT, UNIT_OPEN, Range

Array = jax.Array

RECORD_KEYS = (
    "damping", "rho", "cg_iters", "backtrack_iter", "rate", "accepted",
    "cg_products", "grad_equivalents",
)  # fmt: skip


class HessianFreeState(NamedTuple):
    """State of :func:`hessian_free`."""

    damping: Array  # lambda
    previous: dict  # last CG iterate of the previous update (warm start)
    curvature_key: Array  # key of the kept curvature batch (reuse_curvature > 1)
    age: Array  # updates since the curvature batch was drawn
    work: WorkCount
    record: StepRecord


def _per_example_sq_grad_mean(task, params, batch):
    """Mean over sequences of squared per-sequence gradients (the preconditioner)."""
    grads = map_sequences(lambda single: jax.grad(task.loss)(params, single), batch)
    return jax.tree.map(lambda g: jnp.mean(g**2, axis=0), grads)


def levenberg_marquardt(
    damping, rho, low=0.25, high=0.75, increase=1.5, decrease=2.0 / 3.0
):
    """Martens' rule: ``rho < low`` (or NaN) grows lambda, ``rho > high`` shrinks it."""
    grow = ~(rho >= low)  # NaN grows the damping too
    return jnp.where(
        grow, damping * increase, jnp.where(rho > high, damping * decrease, damping)
    )


def _backtrack(value_at, saved, n_saved, last):
    """Walk back from the last CG iterate while the objective keeps decreasing.

    Returns ``(index, step, value, evaluations)``: index ``n_saved`` is the last
    iterate, ``0..n_saved-1`` the saved ones.
    """
    candidates = jax.tree.map(
        lambda s, x: jnp.concatenate([s, x[None]], axis=0).at[n_saved].set(x),
        saved,
        last,
    )
    pick = lambda j: jax.tree.map(lambda c: c[j], candidates)  # noqa: E731
    f_last = value_at(last)

    def cond(carry):
        j, _, done, _ = carry
        return (j > 0) & ~done

    def body(carry):
        j, f_j, _, evals = carry
        f_prev = value_at(pick(j - 1))
        better = f_prev < f_j
        return (
            jnp.where(better, j - 1, j),
            jnp.where(better, f_prev, f_j),
            ~better,
            evals + 1,
        )

    j, f_j, _, evals = jax.lax.while_loop(
        cond, body, (n_saved, f_last, jnp.bool_(False), jnp.int32(1))
    )
    return j, pick(j), f_j, evals


def _line_search(value_at, f0, slope, f_full, c, decay, max_tries):
    """Armijo search on the rate: ``(rate, evaluations)``; rate 0 rejects the step."""

    f0 = jnp.asarray(f0)

    def ok(rate, f_rate):
        return f_rate <= f0 + c * rate * slope

    def cond(carry):
        rate, f_rate, tries = carry
        return ~ok(rate, f_rate) & (tries < max_tries)

    def body(carry):
        rate, _, tries = carry
        rate = rate * decay
        return rate, value_at(rate), tries + 1

    rate, f_rate, tries = jax.lax.while_loop(
        cond, body, (jnp.asarray(1.0, f0.dtype), f_full, jnp.int32(0))
    )
    return jnp.where(ok(rate, f_rate), rate, 0.0), tries


def hessian_free(
    damping: Annotated[float, POSITIVE] = 45.0,
    curvature: Literal["gauss_newton", "hessian"] = "gauss_newton",
    structural: Annotated[float, NONNEGATIVE] | None = None,
    max_cg_iters: Annotated[int, Range(1, 10_000)] = 250,
    min_cg_iters: Annotated[int, Range(1, 10_000)] = 1,
    cg_tol: Annotated[float, POSITIVE] = 5e-4,
    warm_start: Annotated[float, UNIT] = 0.95,
    precondition: bool = False,
    precondition_exponent: Annotated[float, NONNEGATIVE] = 0.75,
    backtrack: bool = True,
    line_search: bool = True,
    armijo: Annotated[float, UNIT_OPEN] = 0.01,
    line_search_decay: Annotated[float, Range(0, 1, True, True)] = 0.8,
    line_search_tries: Annotated[int, Range(0, 1000)] = 60,
    rho_low: Annotated[float, UNIT] = 0.25,
    rho_high: Annotated[float, UNIT] = 0.75,
    damping_increase: Annotated[float, Range(1, None)] = 1.5,
    damping_decrease: Annotated[float, Range(0, 1, True)] = 2.0 / 3.0,
    reuse_curvature: Annotated[int, Range(1, None)] = 1,
    product: Literal["auto", "jacobian", "linearize"] = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free with per-step curvature re-estimation (defaults: Martens 2010).

    Args:
      damping: initial Tikhonov damping lambda (Martens' code: 45).
      curvature: "gauss_newton" (positive semi-definite, the default) or "hessian".
      structural: mu of structural damping (Martens & Sutskever 2011 use about 0.03);
        None disables it (a static choice: a value compiles its own program).
      max_cg_iters, min_cg_iters, cg_tol: CG limits and relative-progress tolerance.
      warm_start: CG starts from this times the previous CG solution.
      precondition: use ``(mean per-example g^2 + lambda)^precondition_exponent``.
      backtrack: CG backtracking over the saved iterates.
      line_search: Armijo line search (``armijo`` c, ``line_search_decay``,
        ``line_search_tries``); off means rate 1 always.
      rho_low, rho_high, damping_increase, damping_decrease: Levenberg-Marquardt rule.
      reuse_curvature: keep one curvature batch for this many updates (1: redraw
        every update).
      product: form of the Gauss-Newton product (the same matrix to rounding):
        "linearize" (one forward- and one reverse-mode pass per product),
        "jacobian" (the per-sequence Jacobian of the scored outputs formed once per
        update, then two matrix-vector products per product) or "auto" (the
        Jacobian form where a sequence has at most
        :data:`optimizers.curvature.JACOBIAN_MAX_ROWS` Jacobian rows, without
        structural damping; see :func:`optimizers.curvature.gauss_newton_operator`).

    Needs ``objective=`` and ``key=`` (the runner passes both); with
    ``reuse_curvature > 1`` the objective must carry ``sample_curvature``, and
    with ``structural`` the task must implement ``state_curvature``.
    """
    if product not in GAUSS_NEWTON_FORMS:
        raise ValueError(f"product must be one of {list(GAUSS_NEWTON_FORMS)}")
    if product == "jacobian" and (curvature == "hessian" or structural is not None):
        raise ValueError(
            "product = 'jacobian' needs curvature = 'gauss_newton' and no structural "
            "damping; use 'auto' or 'linearize'"
        )
    schedule = jnp.array((0, *save_schedule(max_cg_iters)), jnp.int32)

    def init_fn(params):
        record = {k: jnp.zeros((), jnp.float32) for k in RECORD_KEYS}
        record["accepted"] = jnp.zeros((), bool)
        return HessianFreeState(
            damping=jnp.asarray(damping, jnp.float32),
            previous=otu.tree_zeros_like(params),
            curvature_key=jax.random.PRNGKey(0),
            age=jnp.zeros((), jnp.int32),
            work=WorkCount.zeros(),
            record=StepRecord(record),
        )

    def update_fn(
        grads, state, params=None, *, objective: Objective = None, key=None, **extra
    ):
        del extra
        if objective is None or params is None:
            raise ValueError("hessian_free needs params and objective= (the runner)")
        lam = state.damping
        f0 = objective.loss
        value_at = lambda step: objective.value(otu.tree_add(params, step))  # noqa: E731
        # Curvature batch: fresh every update, or redrawn from a kept key.
        if reuse_curvature == 1:
            curv_batch, curv_key, age = (
                objective.curvature_batch,
                state.curvature_key,
                0,
            )
        else:
            refresh = state.age % reuse_curvature == 0
            new_key = (
                jax.random.fold_in(key, 1) if key is not None else state.curvature_key
            )
            curv_key = jnp.where(refresh, new_key, state.curvature_key)
            curv_batch = objective.curvature_batch_at(curv_key)
            age = state.age + 1
        struct = 0.0 if structural is None else lam * structural
        curv = curvature_operator(
            curvature, objective.task, params, curv_batch, struct, form=product
        )
        damped = lambda v: otu.tree_add_scale(curv(v), lam, v)  # noqa: E731
        extra_grads = 0
        if precondition:
            sq = _per_example_sq_grad_mean(objective.task, params, objective.batch)
            diag = jax.tree.map(lambda s: (s + lam) ** precondition_exponent, sq)
            extra_grads = 1
        else:
            diag = None
        x0 = otu.tree_scale(warm_start, state.previous)
        cg = conjugate_gradient(
            damped, grads, x0, max_iters=max_cg_iters, min_iters=min_cg_iters,
            tol=cg_tol, precondition=diag,
        )  # fmt: skip
        finite = jnp.isfinite(otu.tree_norm(cg.x))
        last = jax.tree.map(lambda a: jnp.where(finite, a, 0.0), cg.x)
        if backtrack:
            j, step, f_step, evals = _backtrack(value_at, cg.saved, cg.n_saved, last)
            chosen_iter = jnp.where(j == cg.n_saved, cg.iterations, schedule[j + 1])
        else:
            step, f_step, evals = last, value_at(last), jnp.int32(1)
            chosen_iter = cg.iterations
        # Levenberg-Marquardt on the undamped quadratic model.
        slope = otu.tree_vdot(grads, step)
        q_step = 0.5 * otu.tree_vdot(step, curv(step)) + slope
        rho = (f_step - f0) / q_step
        new_lam = levenberg_marquardt(
            lam, rho, rho_low, rho_high, damping_increase, damping_decrease
        )
        if line_search:
            rate, tries = _line_search(
                lambda r: value_at(otu.tree_scale(r, step)), f0, slope, f_step, armijo,
                line_search_decay, line_search_tries,
            )  # fmt: skip
        else:
            rate, tries = jnp.where(jnp.isfinite(f_step), 1.0, 0.0), jnp.int32(0)
        updates = otu.tree_scale(rate, step)
        products = cg.products + 1
        work = WorkCount(
            grad_evals=state.work.grad_evals + extra_grads,
            fun_evals=state.work.fun_evals + evals + tries,
            curvature_products=state.work.curvature_products + products,
        )
        # This update's work, the runner's gradient included.
        cost = gradient_equivalents(
            1 + extra_grads, evals + tries, products,
            objective.batch.inputs.shape[1], curv_batch.inputs.shape[1],
        )  # fmt: skip
        record = {
            "damping": lam, "rho": rho, "cg_iters": cg.iterations,
            "backtrack_iter": chosen_iter, "rate": rate, "accepted": rate > 0,
            "cg_products": products, "grad_equivalents": cost,
        }  # fmt: skip
        new_state = HessianFreeState(
            damping=new_lam.astype(jnp.float32),
            previous=last,
            curvature_key=curv_key,
            age=jnp.asarray(age, jnp.int32),
            work=work,
            record=StepRecord(
                {
                    k: v if k == "accepted" else jnp.asarray(v, jnp.float32)
                    for k, v in record.items()
                }
            ),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
