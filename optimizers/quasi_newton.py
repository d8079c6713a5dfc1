"""Quasi-Newton baselines through jaxopt: L-BFGS, nonlinear CG, Levenberg-Marquardt.

This is the one module through which the project uses jaxopt (0.8.5, no longer
maintained). Each factory returns an optax ``GradientTransformationExtraArgs`` whose
update takes ONE jaxopt solver iteration on this step's objective
``f(theta) = objective.value(theta)`` (the loss on ``objective.batch``) and returns
``new_params - params``:

* :func:`lbfgs`: ``theta+ = theta - alpha H grad f``, ``H`` the limited-memory BFGS
  inverse-Hessian approximation built from the last ``m`` pairs
  ``s = theta+ - theta``, ``y = grad f(theta+) - grad f(theta)`` (two-loop
  recursion, ``H_0 = gamma I`` with ``gamma = s^T y / y^T y``), ``alpha`` from a line
  search (Liu & Nocedal 1989; Nocedal & Wright 2006, Alg. 7.4-7.5);
* :func:`nonlinear_cg`: ``d = -g + beta d_prev`` with ``beta`` Polak-Ribiere(+),
  Fletcher-Reeves or Hestenes-Stiefel, ``alpha`` from a line search (Nocedal & Wright
  2006, Alg. 5.4 and Sec. 5.2);
* :func:`levenberg_marquardt`: ``(J^T J + mu I) delta = -J^T r`` on residuals ``r``
  with ``sum r^2 = f``; the step is kept when the gain ratio is positive and ``mu``
  follows Nielsen's rule (Levenberg 1944; Marquardt 1963; Madsen, Nielsen & Tingleff
  2004, Alg. 3.16).

Per-batch state. The objective changes every step (a new minibatch), so values and
gradients kept from the previous step belong to another function. Each update
therefore refreshes them from the runner's ``objective.loss`` and ``objective.grads``
(no extra evaluation) and keeps only what carries over: L-BFGS's ``(s, y)`` history
(each pair is measured on one batch, as in Schraudolph et al. 2007), nonlinear CG's
previous direction (re-anchored on the new gradient, with a steepest-descent restart
when it is not a descent direction), the Levenberg-Marquardt damping.

State. The jaxopt state lives inside the optax state (``solver``) with the same
structure, shapes and dtypes after ``init`` and every ``update`` (the runner scans and
vmaps over seeds). ``init(params)`` has no objective, so L-BFGS and nonlinear CG call
jaxopt's own ``init_state`` on a dummy quadratic (only ``value`` and ``grad`` depend on
the function, and the first update replaces both). Levenberg-Marquardt keeps jaxopt's
state with its batch-sized fields (residual, Jacobian) set to None: they are rebuilt
from the batch at every update.

Work. The runner counts its own gradient; ``WorkCount`` adds what jaxopt evaluates
inside the update: line-search value-and-gradient calls as gradients and value-only
calls as function evaluations (jaxopt counts a value-and-gradient call in both of its
counters), and for Levenberg-Marquardt the residuals, the gradient or Jacobian at the
trial point and the ``J^T J v`` products (on the gradient batch).

Warnings. jaxopt emits a ``DeprecationWarning`` on import; it is silenced here, around
the import, and around solver construction and updates, so none reaches the user.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from optimizers.base import Objective, StepRecord, WorkCount, gradient_equivalents
from tasks.hparams import POSITIVE, Range

Array = jax.Array


@functools.cache
def _jaxopt() -> Any:
    """The jaxopt module, imported on first use (it takes about a second to import,
    which every ``curvbench`` command would otherwise pay)."""
    with warnings.catch_warnings():
        # jaxopt 0.8.5: "JAXopt is no longer maintained" (DeprecationWarning).
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt
        import jaxopt._src.levenberg_marquardt
    return jaxopt


LineSearch = Literal["zoom", "backtracking", "hager-zhang"]
LineSearchInit = Literal["increase", "max", "current"]

LBFGS_RECORDS = (
    "stepsize", "error", "linesearch_iters", "linesearch_failed", "nonfinite",
    "grad_equivalents",
)  # fmt: skip
NCG_RECORDS = (
    "stepsize", "error", "linesearch_iters", "restart", "nonfinite",
    "grad_equivalents",
)  # fmt: skip
LM_RECORDS = (
    "damping", "error", "step_norm", "accepted", "nonfinite", "grad_equivalents",
)  # fmt: skip
_BOOL_RECORDS = ("linesearch_failed", "nonfinite", "restart", "accepted")

#: jaxopt's cap on the Levenberg-Marquardt damping and its increase factor.
_LM_MAX = 2.0**32


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings from building and tracing jaxopt solvers.

    Deprecation and future warnings raised while jaxopt runs concern jaxopt's own use
    of JAX (nothing a user can act on); user warnings are silenced only when jaxopt
    raises them itself.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"jaxopt(\.|$)")
        yield


def _strong(tree: Any) -> Any:
    """The same values without weak types (init and update avals must agree)."""
    return jax.tree.map(
        lambda x: jax.lax.convert_element_type(x, jnp.result_type(x)), tree
    )


def _cast_like(new: Any, old: Any) -> Any:
    """``new`` with the dtypes of ``old`` (jaxopt promotes some scalars)."""
    return jax.tree.map(lambda n, o: jax.lax.convert_element_type(n, o.dtype), new, old)


def _select(flag: Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _all_finite(tree: Any) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def _records(names: tuple[str, ...], values: dict | None = None) -> StepRecord:
    values = values or {}
    out = {}
    for name in names:
        dtype = jnp.bool_ if name in _BOOL_RECORDS else jnp.float32
        out[name] = jnp.asarray(values.get(name, 0), dtype)
    return StepRecord(out)


def _require(name: str, params: Any, objective: Objective | None) -> Objective:
    if objective is None or params is None:
        raise ValueError(f"{name} needs params and objective= (the runner passes both)")
    return objective


def _dummy_value(params: Any) -> Array:
    """A quadratic standing in for the objective in ``init`` (which has none)."""
    return 0.5 * otu.tree_vdot(params, params)


# L-BFGS and nonlinear CG: one line-search iteration per update.


class LBFGSAdapterState(NamedTuple):
    """State of :func:`lbfgs`: jaxopt's ``LbfgsState``, work and step records."""

    solver: Any  # jaxopt LbfgsState
    work: WorkCount
    record: StepRecord


class NonlinearCGAdapterState(NamedTuple):
    """State of :func:`nonlinear_cg`: jaxopt's ``NonlinearCGState``, work, records."""

    solver: Any  # jaxopt NonlinearCGState
    work: WorkCount
    record: StepRecord


def _set_max_stepsize(solver: Any, max_stepsize: Any) -> Any:
    """Give a (possibly traced) ``max_stepsize`` to a solver and its line search.

    jaxopt's zoom line search tests ``if not max_stepsize`` in Python when it is built,
    which fails on a traced value; everywhere else the value is only used in ``jnp``
    arithmetic. The solver is therefore built with a placeholder and given the value
    afterwards.
    """
    solver.max_stepsize = max_stepsize
    solver.run_ls.__self__.max_stepsize = max_stepsize
    return solver


def _line_search_transform(
    name: str,
    make_solver: Callable[[Callable], Any],
    state_cls: type,
    record_names: tuple[str, ...],
    prepare: Callable[[Any, Objective], tuple[Any, dict]],
    phantom: int,
    finish: Callable[[Any], dict] = lambda new_inner: {},
) -> optax.GradientTransformationExtraArgs:
    """Shared init/update of :func:`lbfgs` and :func:`nonlinear_cg`.

    ``prepare(inner, objective) -> (inner, records)`` refreshes the jaxopt state for
    this update's batch; ``finish(new_inner) -> records`` reads the updated one.
    ``phantom`` is the number of evaluations jaxopt counts per update without running
    them (its zoom line search counts a value-and-gradient call when it evaluates the
    function only to read an empty ``aux``, which the compiler then removes).
    """

    def init_fn(params):
        with _quiet():
            solver = _strong(make_solver(_dummy_value).init_state(params))
        return state_cls(solver, WorkCount.zeros(), _records(record_names))

    def update_fn(updates, state, params=None, *, objective=None, **extra):
        del updates, extra  # the solver works on objective.value and objective.grads
        objective = _require(name, params, objective)
        inner, prepared = prepare(state.solver, objective)
        with _quiet():
            solver = make_solver(objective.task.loss)
            new_params, new_inner = solver.update(params, inner, objective.batch)
        new_inner = _cast_like(new_inner, state.solver)
        grads = new_inner.num_grad_eval - inner.num_grad_eval - phantom
        funs = new_inner.num_fun_eval - inner.num_fun_eval - phantom - grads
        ls_iters = new_inner.num_linesearch_iter - inner.num_linesearch_iter
        # A non-finite trial point is rejected: no step, the state before it.
        finite = _all_finite(new_params) & jnp.isfinite(new_inner.value)
        new_params = _select(finite, new_params, params)
        new_inner = _select(finite, new_inner, inner)
        work = WorkCount(
            grad_evals=state.work.grad_evals + grads,
            fun_evals=state.work.fun_evals + funs,
            curvature_products=state.work.curvature_products,
        )
        record = {
            "stepsize": jnp.where(finite, new_inner.stepsize, 0.0),
            "error": new_inner.error,
            "linesearch_iters": ls_iters,
            "nonfinite": ~finite,
            # This update's work, the runner's gradient included.
            "grad_equivalents": gradient_equivalents(1 + grads, funs, 0, 1, 1),
            **prepared,
            **finish(new_inner),
        }
        new_state = state_cls(new_inner, work, _records(record_names, record))
        return otu.tree_sub(new_params, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lbfgs(
    history_size: Annotated[int, Range(1, 1000)] = 10,
    linesearch: LineSearch = "zoom",
    linesearch_init: LineSearchInit = "increase",
    max_stepsize: Annotated[float, POSITIVE] = 1.0,
    min_stepsize: Annotated[float, POSITIVE] = 1e-6,
    increase_factor: Annotated[float, Range(1, None)] = 1.5,
    maxls: Annotated[int, Range(1, 1000)] = 30,
    use_gamma: bool = True,
    stepsize: Annotated[float, POSITIVE] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """L-BFGS, one iteration of ``jaxopt.LBFGS`` per update (Liu & Nocedal 1989).

    The direction is ``d = -H_k g_k``, with ``H_k`` applied by the two-loop recursion
    over the last ``history_size`` pairs ``s_i = theta_{i+1} - theta_i``,
    ``y_i = g_{i+1} - g_i``, ``rho_i = 1 / s_i^T y_i`` and ``H_0 = gamma I``,
    ``gamma = s^T y / y^T y`` of the latest pair (Nocedal & Wright 2006, eq. 7.20 and
    Alg. 7.4); the step ``theta_{k+1} = theta_k + alpha d`` takes ``alpha`` from a
    line search (strong Wolfe for "zoom", Nocedal & Wright Alg. 3.5-3.6; Hager & Zhang
    2006). Both ``g`` in a pair come from the same minibatch (the update's).

    jaxopt's behaviour is kept as is: when the line search fails, zoom takes its last
    step satisfying sufficient decrease (often none: ``alpha = 0``, and the empty pair
    then resets ``gamma`` to 1) and backtracking keeps its last trial point, which may
    increase the loss. The first step is ``-alpha g`` with ``alpha <= max_stepsize``,
    so problems with small gradients may need a larger ``max_stepsize``.

    Args:
      history_size: number of ``(s, y)`` pairs kept (``m``).
      linesearch: "zoom" (strong Wolfe), "backtracking" (strong Wolfe conditions,
        decrease factor 0.8) or "hager-zhang" (ignores ``max_stepsize``).
      linesearch_init: first trial step: "increase" (previous step times
        ``increase_factor``, reset to ``max_stepsize`` below ``min_stepsize``),
        "max" or "current".
      max_stepsize: upper bound on the step ``alpha``.
      min_stepsize: below it, "increase" restarts from ``max_stepsize``.
      increase_factor: growth of the trial step for "increase".
      maxls: maximum line-search iterations.
      use_gamma: scale ``H_0`` by ``gamma`` (else the identity).
      stepsize: a fixed ``alpha`` instead of a line search (None: line search).

    Records ``stepsize`` (``alpha``), ``error`` (``||grad f(theta_{k+1})||`` on the
    update's batch), ``linesearch_iters``, ``linesearch_failed``, ``nonfinite`` and
    ``grad_equivalents``. Needs ``objective=``.
    """

    def make_solver(fun):
        solver = _jaxopt().LBFGS(
            fun=fun, history_size=history_size, linesearch=linesearch,
            linesearch_init=linesearch_init, max_stepsize=1.0,
            min_stepsize=min_stepsize, increase_factor=increase_factor, maxls=maxls,
            use_gamma=use_gamma, stepsize=0.0 if stepsize is None else stepsize,
        )  # fmt: skip
        return _set_max_stepsize(solver, max_stepsize)

    def prepare(inner, objective):
        loss, grad = _cast_like(
            (objective.loss, objective.grads), (inner.value, inner.grad)
        )
        return inner._replace(value=loss, grad=grad), {}

    def finish(new_inner):
        return {"linesearch_failed": new_inner.failed_linesearch}

    phantom = int(linesearch == "zoom" and stepsize is None)
    return _line_search_transform(
        "lbfgs", make_solver, LBFGSAdapterState, LBFGS_RECORDS, prepare, phantom, finish
    )


def nonlinear_cg(
    method: Literal[
        "polak-ribiere", "fletcher-reeves", "hestenes-stiefel"
    ] = "polak-ribiere",
    linesearch: Literal["zoom", "hager-zhang"] = "zoom",
    linesearch_init: LineSearchInit = "increase",
    max_stepsize: Annotated[float, POSITIVE] = 1.0,
    min_stepsize: Annotated[float, POSITIVE] = 1e-6,
    increase_factor: Annotated[float, Range(1, None)] = 1.2,
    maxls: Annotated[int, Range(1, 1000)] = 30,
) -> optax.GradientTransformationExtraArgs:
    """Nonlinear conjugate gradient, one iteration of ``jaxopt.NonlinearCG`` per update.

    ``theta_{k+1} = theta_k + alpha_k d_k`` with ``alpha_k`` from a line search and
    ``d_{k+1} = -g_{k+1} + beta_{k+1} d_k`` (Nocedal & Wright 2006, Alg. 5.4), where,
    clipped at zero (the "+" variants):

    * Polak-Ribiere: ``beta = g_{k+1}^T (g_{k+1} - g_k) / g_k^T g_k``;
    * Fletcher-Reeves: ``beta = g_{k+1}^T g_{k+1} / g_k^T g_k``;
    * Hestenes-Stiefel: ``beta = g_{k+1}^T (g_{k+1} - g_k) / (g_{k+1} - g_k)^T d_k``.

    jaxopt computes ``beta`` inside the update, with both gradients on the update's
    batch. The next update swaps in its own batch's gradient, ``d = -g + beta d_prev``,
    and restarts with ``d = -g`` when that is not a descent direction
    (``g^T d >= 0``; Nocedal & Wright Sec. 5.2). jaxopt floors the denominators of
    ``beta`` at 1e-6, so near a minimum (``||g||^2 < 1e-6``) the method approaches
    steepest descent. The "backtracking" line search is not offered: jaxopt's
    NonlinearCG then steps along ``-g`` instead of ``d``.

    Args:
      method: the ``beta`` formula.
      linesearch: "zoom" (strong Wolfe) or "hager-zhang" (ignores ``max_stepsize``).
      linesearch_init, max_stepsize, min_stepsize, increase_factor, maxls: as in
        :func:`lbfgs`.

    Records ``stepsize``, ``error`` (``||grad f(theta_{k+1})||`` on the update's
    batch), ``linesearch_iters``, ``restart``, ``nonfinite`` and ``grad_equivalents``
    (jaxopt's NonlinearCG does not report line-search failures). Needs
    ``objective=``.
    """

    def make_solver(fun):
        solver = _jaxopt().NonlinearCG(
            fun=fun, method=method, linesearch=linesearch,
            linesearch_init=linesearch_init, max_stepsize=1.0,
            min_stepsize=min_stepsize, increase_factor=increase_factor, maxls=maxls,
        )  # fmt: skip
        return _set_max_stepsize(solver, max_stepsize)

    def prepare(inner, objective):
        loss, grad = _cast_like(
            (objective.loss, objective.grads), (inner.value, inner.grad)
        )
        # inner.descent_direction = -g_old + beta d_prev, g_old on the previous batch
        # (at init: -grad of the dummy, so the first direction is -g).
        direction = otu.tree_sub(
            otu.tree_add(inner.descent_direction, inner.grad), grad
        )
        slope = otu.tree_vdot(grad, direction)
        restart = ~(slope < 0)  # NaN restarts too
        direction = _select(restart, otu.tree_scale(-1.0, grad), direction)
        inner = inner._replace(value=loss, grad=grad, descent_direction=direction)
        return inner, {"restart": restart}

    def finish(new_inner):
        # jaxopt's NonlinearCG error is the norm of the gradient it started from.
        return {"error": otu.tree_norm(new_inner.grad)}

    phantom = int(linesearch == "zoom")
    return _line_search_transform(
        "nonlinear_cg", make_solver, NonlinearCGAdapterState, NCG_RECORDS, prepare,
        phantom, finish,
    )  # fmt: skip


# Levenberg-Marquardt on the task's residuals.


class LevenbergMarquardtAdapterState(NamedTuple):
    """State of :func:`levenberg_marquardt`.

    ``solver`` is jaxopt's ``LevenbergMarquardtState`` over the flattened parameters,
    with the batch-sized fields (``residual``, ``jac``, ``jt``, ``jtj``, ``hess_res``)
    set to None between updates.
    """

    solver: Any  # jaxopt LevenbergMarquardtState
    work: WorkCount
    record: StepRecord


def _fixed_cg(iters: int, tol: Any) -> Callable:
    """A CG solver for jaxopt: ``(A + ridge I) x = b`` in exactly ``iters`` products.

    A fixed number of products makes the work count exact. Iterates stop moving once
    ``||r|| <= tol ||b||``. jaxopt's ``init`` (its previous step, of the opposite
    sign) is not used: CG starts from zero.
    """

    def solve(matvec, b, ridge=0.0, init=None, **unused):
        del init, unused
        op = lambda v: matvec(v) + ridge * v  # noqa: E731
        stop = (tol**2) * jnp.vdot(b, b)

        def body(_, carry):
            x, r, p, rs = carry
            active = rs > stop
            ap = op(p)
            pap = jnp.vdot(p, ap)
            alpha = jnp.where(
                active & (pap > 0), rs / jnp.where(pap > 0, pap, 1.0), 0.0
            )
            x, r = x + alpha * p, r - alpha * ap
            rs_new = jnp.vdot(r, r)
            beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
            return (
                x,
                r,
                jnp.where(active, r + beta * p, p),
                jnp.where(active, rs_new, rs),
            )

        x0 = jnp.zeros_like(b)
        return jax.lax.fori_loop(0, iters, body, (x0, b, b, jnp.vdot(b, b)))[0]

    return solve


def _drop_batch_fields(state: Any) -> Any:
    """A ``LevenbergMarquardtState`` without its batch-sized fields."""
    return state._replace(residual=None, jac=None, jt=None, jtj=None, hess_res=None)


def _residual_fn(task: Any, unravel: Callable) -> Callable:
    """``r(theta) = sqrt(w_t) (f_t - y_t)``, flattened, so ``sum r^2 = f``.

    ``w`` are the task's :meth:`~tasks.base.Task.loss_weights` (``m_t / sum m``).
    """

    def residual(flat, batch):
        outputs, _ = task.apply_scored(unravel(flat), batch)
        scored = task.scored_batch(batch)
        weight = task.loss_weights(scored)
        scaled = jnp.sqrt(weight)[..., None] * (outputs - scored.targets)
        return jnp.ravel(scaled.astype(flat.dtype))

    return residual


def levenberg_marquardt(
    damping: Annotated[float, POSITIVE] = 1e-3,
    solver: Literal["cg", "cholesky"] = "cg",
    max_cg_iters: Annotated[int, Range(1, 10_000)] = 50,
    cg_tol: Annotated[float, POSITIVE] = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    """Levenberg-Marquardt, one iteration of ``jaxopt.LevenbergMarquardt`` per update.

    For a squared-error task, ``f(theta) = sum_t w_t sum_o (f_to - y_to)^2`` (``w``
    the task's loss weights, ``m_t / sum m`` by default) is ``sum r^2`` with residuals
    ``r_to = sqrt(w_t) (f_to - y_to)``. jaxopt minimizes ``F = 1/2 ||r||^2 = f / 2``
    (same minimizer) by solving ``(J^T J + mu I) h = -J^T r`` (Levenberg 1944;
    Marquardt 1963). The trial step is
    kept when the gain ratio ``rho = (F(theta) - F(theta + h)) / (1/2 h^T (mu h -
    J^T r))`` is positive, and then ``mu *= max(1/3, 1 - (2 rho - 1)^3)``, ``nu = 2``;
    otherwise ``mu *= nu``, ``nu *= 2`` (Nielsen 1999; Madsen, Nielsen & Tingleff 2004,
    Alg. 3.16). ``J^T r`` is half the runner's gradient. Meant for small problems
    (the wall model, small regressions): each update solves a linear system in all
    parameters. The residuals assume the task's loss is :class:`~tasks.base.Task`'s
    ``loss_from_outputs``: the output loss weighted by ``task.loss_weights``.

    Args:
      damping: initial ``mu`` (absolute; jaxopt's own init, relative to
        ``max diag J^T J``, would cost one product per parameter).
      solver: "cg" (matrix-free ``J^T J v`` products) or "cholesky" (materialized
        Jacobian by forward mode: one JVP per parameter at the current and at the
        trial point, each counted as a gradient; for small models only).
      max_cg_iters: CG products per update ("cg"): exactly ``min(max_cg_iters,
        number of parameters)``, from zero.
      cg_tol: CG stops moving once ``||residual|| <= cg_tol ||J^T r||``.

    The ``J^T J`` products use the gradient batch (there is one residual function);
    they are counted as curvature products. Records ``damping`` (the ``mu`` used),
    ``error`` (``||J^T r||`` after the update), ``step_norm``, ``accepted``,
    ``nonfinite`` and ``grad_equivalents``. The first update (when traced) raises
    ``ValueError`` for a task whose output loss is not squared error. Needs
    ``objective=``.
    """
    materialize = solver == "cholesky"

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        dtype = flat.dtype
        inner = _jaxopt()._src.levenberg_marquardt.LevenbergMarquardtState(
            iter_num=jnp.zeros((), jnp.int32),
            damping_factor=jnp.asarray(damping, dtype),
            increase_factor=jnp.asarray(2.0, dtype),
            residual=None,
            value=jnp.zeros((), dtype),
            delta=jnp.zeros_like(flat),
            error=jnp.asarray(jnp.inf, dtype),
            gradient=jnp.zeros_like(flat),
            jac=None,
            jt=None,
            jtj=None,
            hess_res=None,
            aux=None,
        )
        return LevenbergMarquardtAdapterState(
            _strong(inner), WorkCount.zeros(), _records(LM_RECORDS)
        )

    def update_fn(updates, state, params=None, *, objective=None, **extra):
        del updates, extra
        objective = _require("levenberg_marquardt", params, objective)
        task, batch = objective.task, objective.batch
        loss = task.output_loss
        if loss.name != "squared_error":
            raise ValueError(
                "levenberg_marquardt needs a squared-error output loss (residuals "
                f"f - y); task {task.name!r} has output loss {loss.name!r}"
            )
        flat, unravel = ravel_pytree(params)
        n = flat.size
        cg_iters = min(max_cg_iters, n)  # CG is exact in n steps (exact arithmetic)
        residual_fn = _residual_fn(task, unravel)
        stored = state.solver
        r0 = residual_fn(flat, batch)
        if materialize:
            jac = jax.jacfwd(residual_fn)(flat, batch)
            jt, jtj = jac.T, jac.T @ jac
            gradient = jt @ r0
            work = (2, 2 * n, 0)  # (fun, grad, products): residuals; Jacobians
        else:
            jac = jt = jtj = None
            gradient = 0.5 * ravel_pytree(objective.grads)[0].astype(flat.dtype)
            # residual at theta and at the trial point; J^T r there; CG products
            work = (2, 1, cg_iters)
        inner = stored._replace(
            residual=r0, value=0.5 * jnp.sum(r0**2), gradient=gradient,
            error=jnp.linalg.norm(gradient), jac=jac, jt=jt, jtj=jtj,
        )  # fmt: skip
        with _quiet():
            lm = _jaxopt().LevenbergMarquardt(
                residual_fun=residual_fn,
                solver="cholesky" if materialize else _fixed_cg(cg_iters, cg_tol),
                materialize_jac=materialize,
            )
            new_flat, new_inner = lm.update(flat, inner, batch)
        new_inner = _cast_like(_drop_batch_fields(new_inner), stored)
        # jaxopt resets nu to 2 exactly when it keeps the step (nu >= 4 otherwise).
        accepted = new_inner.increase_factor == 2.0
        # jaxopt blends kept and rejected branches by multiplying with 0/1, so a
        # non-finite trial point poisons both: reject it explicitly.
        finite = _all_finite(new_flat) & jnp.isfinite(new_inner.value)
        rejected = _drop_batch_fields(inner)._replace(
            iter_num=stored.iter_num + 1,
            damping_factor=jnp.minimum(
                stored.damping_factor * stored.increase_factor, _LM_MAX
            ),
            increase_factor=jnp.minimum(2.0 * stored.increase_factor, _LM_MAX),
        )
        new_inner = _select(finite, new_inner, _cast_like(rejected, stored))
        new_flat = jnp.where(finite, new_flat, flat)
        step = new_flat - flat
        funs, grads, products = work
        new_work = WorkCount(
            grad_evals=state.work.grad_evals + grads,
            fun_evals=state.work.fun_evals + funs,
            curvature_products=state.work.curvature_products + products,
        )
        record = {
            "damping": stored.damping_factor,
            "error": new_inner.error,
            "step_norm": jnp.linalg.norm(step),
            "accepted": accepted & finite,
            "nonfinite": ~finite,
            "grad_equivalents": gradient_equivalents(1 + grads, funs, products, 1, 1),
        }
        new_state = LevenbergMarquardtAdapterState(
            new_inner, new_work, _records(LM_RECORDS, record)
        )
        return unravel(step), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
