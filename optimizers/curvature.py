"""Curvature-vector products, shared by the optimizers and the analysis.

For a task with outputs ``f(theta)`` (``[T, B, O]``), hidden states ``x(theta)``
(``[T, B, H]``) and loss ``L = sum_t m_t l(f_t, y_t) / sum_t m_t``:

* Gauss-Newton (Schraudolph 2002; Martens 2010): ``G v = J_f^T H_L J_f v``, with
  ``H_L`` the output-space Hessian of the masked loss (positive semi-definite);
* exact Hessian: ``H v = d/de grad L(theta + e v)``;
* structural damping (Martens & Sutskever 2011): ``S v = J_x^T D J_x v``, the
  Gauss-Newton matrix of a matching loss on the hidden states, with ``D`` from
  :meth:`tasks.base.Task.state_curvature` (``diag(sigma'(x_t))`` for vanilla units:
  the Hessian of the matching loss of a logistic or tanh unit with respect to its
  input; a task that does not declare it cannot use structural damping); averaged
  over sequences and summed over their valid steps.

The loss weights ``m_t / sum_t m_t`` come from :meth:`tasks.base.Task.loss_weights`
everywhere below, and the outputs from :meth:`tasks.base.Task.apply_scored`: only the
steps the loss can score (:meth:`tasks.base.Task.score_steps`) enter ``J_f``, since
``H_L`` is zero at every other step.

Each ``*_operator`` function linearizes the network once (``jax.linearize``) and
returns a closure that reuses that linearization for every product, as Hessian-free's
conjugate gradient needs (one forward-mode and one reverse-mode pass per product).

The Gauss-Newton product has a second form for tasks that score few outputs per
sequence (most pathological problems score ``K = 1`` step of ``O <= 8`` units): the
per-sequence Jacobian ``J_f`` of the scored outputs is formed once, ``K O`` rows per
sequence (``K (O - 1)`` for softmax, whose ``H_L`` ignores a shift of all outputs;
one reverse pass per row, all rows and sequences batched), and every product is then
two matrix-vector products with it. Forming it costs about as much as one linearized
product per row; each product after that costs almost nothing
(:func:`gauss_newton_jacobian_operator`, chosen by ``form = "auto"``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from tasks.base import Batch, Task, map_sequences
from tasks.losses import output_basis

Array = jax.Array
Operator = Callable[[dict], dict]

#: ``form = "auto"`` uses the Jacobian form up to this many Jacobian rows per
#: sequence (``K O``, or ``K (O - 1)`` for softmax): forming the Jacobian costs about
#: as much as one linearized product per row, and Hessian-free's conjugate gradient
#: runs more products than that in practice.
JACOBIAN_MAX_ROWS = 8
#: ... and while the Jacobian (``B K r x n_params`` numbers, per run: a runner that
#: vmaps seeds or grid points holds one per seed and point) stays under this size.
JACOBIAN_MAX_BYTES = 256 * 2**20
#: The forms of the Gauss-Newton product.
GAUSS_NEWTON_FORMS = ("auto", "jacobian", "linearize")


def output_hessian_vp(task: Task, outputs: Array, batch: Batch, v: Array) -> Array:
    """``H_L v`` for the weighted output loss (per step, block diagonal).

    ``outputs`` and ``batch`` match as in :meth:`tasks.base.Task.loss_from_outputs`.
    """
    weight = task.loss_weights(batch, outputs.dtype)
    return task.output_loss.hessian_vp(outputs, v) * weight[..., None]


def structural_diagonal(task: Task, states: Array, batch: Batch) -> Array:
    """``task.state_curvature(states)`` weighted by ``1 / n_sequences`` on valid steps.

    Steps at or beyond a sequence's length get 0. Raises ``NotImplementedError``
    (from the task) when the task does not declare its state curvature.
    """
    steps = jnp.arange(states.shape[0])[:, None]
    valid = (steps < batch.lengths[None, :]).astype(states.dtype)
    return task.state_curvature(states) * (valid / states.shape[1])[..., None]


def _is_zero(structural: float | Array) -> bool:
    """Whether ``structural`` is a Python zero (structural damping statically off)."""
    return isinstance(structural, int | float) and structural == 0


def jacobian_rows_per_sequence(task: Task, params: dict, batch: Batch) -> int:
    """``K r``: rows of one sequence's output Jacobian in the Jacobian form.

    ``K`` scored steps times the ``r`` output directions that carry the output
    Hessian (:func:`tasks.losses.output_basis`: ``O``, or ``O - 1`` for softmax).
    """
    outputs = jax.eval_shape(lambda p: task.apply_scored(p, batch)[0], params)
    return outputs.shape[0] * output_basis(task.output_loss, outputs.shape[2]).shape[1]


def jacobian_form_fits(task: Task, params: dict, batch: Batch) -> bool:
    """Whether ``form = "auto"`` takes the Jacobian form on this task and batch.

    It does when the sequences are independent (:attr:`Task.independent_sequences`),
    each has at most :data:`JACOBIAN_MAX_ROWS` Jacobian rows and the whole Jacobian
    fits in :data:`JACOBIAN_MAX_BYTES`. Decided from shapes only (static).
    """
    if not task.independent_sequences:
        return False
    rows = jacobian_rows_per_sequence(task, params, batch)
    flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
    size = batch.inputs.shape[1] * rows * flat.shape[0] * flat.dtype.itemsize
    return rows <= JACOBIAN_MAX_ROWS and size <= JACOBIAN_MAX_BYTES


def output_jacobian(
    task: Task, params: dict, batch: Batch
) -> tuple[Array, Array, Array]:
    """Scored outputs ``[K, B, O]``, the Jacobian ``[B, K, r, n_params]`` and ``Q``.

    ``Q`` is the ``[O, r]`` output basis (:func:`tasks.losses.output_basis`). Entry
    ``[b, k, c]`` of the Jacobian is ``d (Q^T f_kb)_c / d theta`` over the flattened
    parameters (``ravel_pytree`` order): one reverse pass per row, batched over rows
    and sequences (:func:`tasks.base.map_sequences`).
    """
    flat, unravel = ravel_pytree(params)

    def one(single: Batch) -> tuple[Array, Array]:
        out, vjp = jax.vjp(lambda x: task.apply_scored(unravel(x), single)[0], flat)
        basis = jnp.asarray(output_basis(task.output_loss, out.shape[-1]), out.dtype)
        n_steps, n_dirs = out.shape[0], basis.shape[1]
        # Cotangent (k, c): direction Q[:, c] at scored step k, zero elsewhere.
        steps = jnp.eye(n_steps, dtype=out.dtype)[:, None, :, None, None]
        cotangents = steps * basis.T[None, :, None, None, :]
        (rows,) = jax.vmap(vjp)(cotangents.reshape(n_steps * n_dirs, *out.shape))
        return out[:, 0], rows.reshape(n_steps, n_dirs, -1)

    outputs, rows = map_sequences(one, batch)
    basis = output_basis(task.output_loss, outputs.shape[-1])
    return jnp.swapaxes(outputs, 0, 1), rows, jnp.asarray(basis, outputs.dtype)


def gauss_newton_jacobian_operator(task: Task, params: dict, batch: Batch) -> Operator:
    """``v -> G v = J^T H_L J v`` from the per-sequence Jacobian, formed once.

    The same matrix as :func:`gauss_newton_operator` (without structural damping),
    for tasks whose sequences are independent: ``G = sum_b J_b^T H_b J_b`` with
    ``J_b`` the Jacobian of sequence ``b``'s scored outputs and ``H_b`` its block of
    the output-space Hessian. With the output basis ``Q``
    (:func:`tasks.losses.output_basis`), ``H_b = Q Q^T H_b Q Q^T``, so only
    ``Q^T J_b`` is formed: ``K r`` rows per sequence. Memory ``B K r n``; each
    product is two matrix-vector products with it and one ``H_L`` product.
    Raises ``ValueError`` for a task that sets ``independent_sequences = False``.
    """
    if not task.independent_sequences:
        raise ValueError(
            f"task {task.name!r} sets independent_sequences = False: the Jacobian "
            "form needs independent sequences; use 'linearize'"
        )
    outputs, rows, basis = output_jacobian(task, params, batch)
    scored = task.scored_batch(batch)
    jac = rows.reshape(-1, rows.shape[-1])
    unravel = ravel_pytree(params)[1]

    def matvec(v: dict) -> dict:
        coords = (jac @ ravel_pytree(v)[0]).reshape(rows.shape[:3])  # [B, K, r]
        jv = jnp.swapaxes(coords @ basis.T, 0, 1)  # [K, B, O]
        ct = output_hessian_vp(task, outputs, scored, jv)
        return unravel((jnp.swapaxes(ct, 0, 1) @ basis).reshape(-1) @ jac)

    return matvec


def gauss_newton_operator(
    task: Task,
    params: dict,
    batch: Batch,
    structural: float | Array = 0.0,
    form: str = "linearize",
) -> Operator:
    """``v -> G v + structural * S v``, linearized once at ``params`` on ``batch``.

    Args:
      task: the task (outputs, states, output loss).
      params: the point of linearization.
      batch: the curvature minibatch.
      structural: weight of the structural-damping term ``S`` (HF passes
        ``lambda * mu``); 0 leaves it out at no cost when a Python zero.
      form: "linearize" (one forward- and one reverse-mode pass per product),
        "jacobian" (:func:`gauss_newton_jacobian_operator`; no structural damping,
        independent sequences) or "auto" (the Jacobian form where
        :func:`jacobian_form_fits` and structural damping is off). The same matrix
        in every form, to rounding.
    """
    if form not in GAUSS_NEWTON_FORMS:
        raise ValueError(f"form must be one of {list(GAUSS_NEWTON_FORMS)}")
    if form == "jacobian" and not _is_zero(structural):
        raise ValueError("the Jacobian form has no structural damping: use 'linearize'")
    auto = form == "auto" and _is_zero(structural)
    if form == "jacobian" or (auto and jacobian_form_fits(task, params, batch)):
        return gauss_newton_jacobian_operator(task, params, batch)
    scored = task.scored_batch(batch)
    if _is_zero(structural):
        # Only the outputs are linearized: no state tangents to carry out of the loop
        # and no zero state cotangent to carry back through it.
        outputs, jvp = jax.linearize(lambda p: task.apply_scored(p, batch)[0], params)
        transpose = jax.linear_transpose(jvp, params)

        def matvec(v: dict) -> dict:
            ct_out = output_hessian_vp(task, outputs, scored, jvp(v))
            (gv,) = transpose(ct_out)
            return gv

        return matvec
    (outputs, states), jvp = jax.linearize(
        lambda p: task.apply_scored(p, batch), params
    )
    transpose = jax.linear_transpose(jvp, params)
    d = structural_diagonal(task, states, batch)

    def matvec(v: dict) -> dict:
        jv_out, jv_states = jvp(v)
        ct_out = output_hessian_vp(task, outputs, scored, jv_out)
        (gv,) = transpose((ct_out, structural * d * jv_states))
        return gv

    return matvec


def hessian_operator(task: Task, params: dict, batch: Batch) -> Operator:
    """``v -> H v``, the exact Hessian of the loss, linearized once at ``params``."""
    _, hvp = jax.linearize(jax.grad(lambda p: task.loss(p, batch)), params)
    return hvp


CURVATURES = {"gauss_newton": gauss_newton_operator, "hessian": hessian_operator}


def curvature_operator(
    kind: str,
    task: Task,
    params: dict,
    batch: Batch,
    structural=0.0,
    form: str = "linearize",
) -> Operator:
    """The ``kind`` ("gauss_newton" or "hessian") operator, plus structural damping.

    Structural damping is always taken in Gauss-Newton form, also with the Hessian.
    ``form`` selects the Gauss-Newton product's form (:func:`gauss_newton_operator`);
    the Hessian is always linearized.
    """
    if kind == "gauss_newton":
        return gauss_newton_operator(task, params, batch, structural, form)
    if kind != "hessian":
        raise ValueError(f"curvature must be one of {sorted(CURVATURES)}, not {kind!r}")
    if form == "jacobian":
        raise ValueError("the Jacobian form is for Gauss-Newton curvature only")
    hvp = hessian_operator(task, params, batch)
    if _is_zero(structural):
        return hvp
    structure = structural_operator(task, params, batch)
    return lambda v: jax.tree.map(lambda a, b: a + structural * b, hvp(v), structure(v))


def structural_operator(task: Task, params: dict, batch: Batch) -> Operator:
    """``v -> S v = J_x^T D J_x v`` alone (structural damping's curvature)."""
    states, jvp = jax.linearize(lambda p: task.apply_scored(p, batch)[1], params)
    transpose = jax.linear_transpose(jvp, params)
    d = structural_diagonal(task, states, batch)

    def matvec(v: dict) -> dict:
        (sv,) = transpose(d * jvp(v))
        return sv

    return matvec


# Diagonal estimators (Becker & LeCun 1988; Bekas et al. 2007; Yao et al. 2021;
# Liu et al. 2023). Each returns a pytree like ``params``.


def rademacher_like(key: Array, tree: dict) -> dict:
    """Independent +-1 entries with the structure of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    probes = [
        jax.random.rademacher(k, leaf.shape, leaf.dtype)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, probes)


def hutchinson_diagonal(
    operator: Operator, key: Array, like: dict, n_probes: int = 1
) -> dict:
    """``mean_i z_i * (A z_i)`` with Rademacher ``z_i``: unbiased for ``diag(A)``.

    With ``A`` the Hessian this is AdaHessian's and Sophia-H's estimator; with the
    Gauss-Newton operator it estimates the Gauss-Newton diagonal.
    """

    def one(k):
        z = rademacher_like(k, like)
        return jax.tree.map(lambda a, b: a * b, z, operator(z))

    estimates = jax.lax.map(one, jax.random.split(key, n_probes))
    return jax.tree.map(lambda e: jnp.mean(e, axis=0), estimates)


def gauss_newton_diagonal_sampled(
    task: Task, params: dict, batch: Batch, key: Array, n_samples: int = 1
) -> dict:
    """Monte-Carlo Gauss-Newton diagonal from targets sampled from the model.

    With ``y_hat ~ p(y | f)`` and ``w_t`` the loss weights,
    ``g_hat = grad sum_t sqrt(w_t) l(f_t, y_hat_t)`` has ``E[g_hat g_hat^T] =
    sum_t w_t J_t^T H_L J_t = G`` (the score of each step has zero mean and
    covariance ``H_L`` for these losses), so ``g_hat^2`` is unbiased for ``diag(G)``
    at the cost of one backward pass. This is Sophia-G's Gauss-Newton-Bartlett
    estimator (Liu et al. 2023), with the batch size folded into the weights.
    """
    outputs, vjp = jax.vjp(lambda p: task.apply_scored(p, batch)[0], params)
    root_w = jnp.sqrt(task.loss_weights(task.scored_batch(batch), outputs.dtype))

    def one(k):
        targets = task.output_loss.sample_targets(k, jax.lax.stop_gradient(outputs))
        # d/df sum_t sqrt(w_t) l(f_t, y_t): a cotangent for one reverse pass.
        ct = jax.grad(lambda f: jnp.sum(root_w * task.output_loss.value(f, targets)))(
            outputs
        )
        (g,) = vjp(ct)
        return jax.tree.map(jnp.square, g)

    estimates = jax.lax.map(one, jax.random.split(key, n_samples))
    return jax.tree.map(lambda e: jnp.mean(e, axis=0), estimates)


def gauss_newton_diagonal_exact(task: Task, params: dict, batch: Batch) -> dict:
    """Exact ``diag(J^T H_L J)``, one reverse pass per (sequence, step, output unit).

    ``diag(G) = sum_{t,b} sum_k (J_tb^T s_tbk)^2`` with ``H_tb = S S^T`` (a square
    root of the per-step output Hessian times its loss weight). Costs ``T x O``
    gradients of the batch: meant for small output sizes and short sequences (and
    as the reference the sampled estimators are tested against).
    """
    n_steps = batch.inputs.shape[0]
    outputs = task.apply(params, batch.inputs)[0]
    n_out = outputs.shape[-1]
    weight = task.loss_weights(batch, outputs.dtype)
    eye = jnp.eye(n_out, dtype=outputs.dtype)
    # H_tb as a dense [T, B, O, O] matrix, then its symmetric square root.
    hess = jax.vmap(
        lambda e: task.output_loss.hessian_vp(
            outputs, jnp.broadcast_to(e, outputs.shape)
        ),
        out_axes=-1,
    )(eye)
    hess = hess * weight[..., None, None]
    vals, vecs = jnp.linalg.eigh(hess)
    root = vecs * jnp.sqrt(jnp.clip(vals, 0.0))[..., None, :]  # [T, B, O, O]

    def sequence(inputs, root_b):
        # inputs [T, n_in], root_b [T, O, O] for one sequence.
        _, vjp = jax.vjp(lambda p: task.apply(p, inputs[:, None])[0][:, 0], params)

        def per_step(t):
            def per_unit(k):
                ct = (
                    jnp.zeros((n_steps, n_out), outputs.dtype)
                    .at[t]
                    .set(root_b[t, :, k])
                )
                (g,) = vjp(ct)
                return jax.tree.map(jnp.square, g)

            squares = jax.vmap(per_unit)(jnp.arange(n_out))
            return jax.tree.map(lambda s: jnp.sum(s, axis=0), squares)

        per_t = jax.lax.map(per_step, jnp.arange(n_steps))
        return jax.tree.map(lambda s: jnp.sum(s, axis=0), per_t)

    per_seq = jax.vmap(sequence, in_axes=(1, 1))(batch.inputs, root)
    return jax.tree.map(lambda s: jnp.sum(s, axis=0), per_seq)


# Lanczos (Lanczos 1950; Golub & Van Loan 2013, Alg. 10.1.1) and stochastic Lanczos
# quadrature (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019).


class LanczosResult(NamedTuple):
    """``A Q^T ~ Q^T T`` with ``T = tridiag(betas, alphas, betas)``.

    Attributes:
      alphas: ``[m]`` diagonal of ``T``.
      betas: ``[m - 1]`` off-diagonal of ``T``.
      basis: ``[m, n]`` orthonormal Lanczos vectors, row ``i`` is ``q_i``.
    """

    alphas: Array
    betas: Array
    basis: Array


def lanczos_tridiagonal(
    matvec: Callable[[Array], Array], v0: Array, num_iters: int
) -> LanczosResult:
    """``num_iters`` steps of Lanczos with full reorthogonalization on flat vectors.

    From ``q_0 = v0 / |v0|``: ``alpha_i = q_i^T A q_i``,
    ``r_i = (I - Q_i^T Q_i)^2 A q_i`` (classical Gram-Schmidt against every previous
    vector, done twice), ``beta_i = |r_i|`` and ``q_{i+1} = r_i / beta_i``
    (Lanczos 1950; Golub & Van Loan 2013, Alg. 10.1.1). Uses ``num_iters``
    products, a fixed-length ``lax.fori_loop``: jit- and vmap-safe.

    Breakdown (an invariant Krylov space): once ``beta_i <= tol * |A q_i|`` with
    ``tol = max(100 sqrt(n) eps, 1e-10)``, every later vector is zero and the
    remaining alphas and betas are 0, so ``T`` is block diagonal with a zero block.
    The test is relative to the current product, not to the largest one: when the
    top eigenvalue explodes (1e5 against 30, in float32) the small directions are
    still resolved. Should rounding noise pass the test, Lanczos continues from a
    noise vector that full reorthogonalization keeps orthogonal to the basis:
    the Ritz values stay Rayleigh-Ritz values of an orthonormal basis.

    Args:
      matvec: ``v -> A v`` for a symmetric ``A`` on ``[n]`` vectors.
      v0: ``[n]`` start vector (need not be normalized).
      num_iters: ``m``, the number of Lanczos vectors.
    """
    eps = float(jnp.finfo(v0.dtype).eps)
    tol = max(100.0 * v0.shape[-1] ** 0.5 * eps, 1e-10)

    def step(i, carry):
        basis, alphas, betas, scale, alive = carry
        q = basis[i]
        w = matvec(q)
        alpha = jnp.vdot(q, w)
        local = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, local)
        for _ in range(2):  # rows after i are still zero
            w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        alive = alive & (beta > tol * local)
        q_next = jnp.where(alive, w / jnp.where(alive, beta, 1.0), 0.0)
        basis = basis.at[i + 1].set(q_next, mode="drop")
        betas = betas.at[i].set(jnp.where(alive, beta, 0.0), mode="drop")
        return basis, alphas.at[i].set(alpha), betas, scale, alive

    init = _lanczos_start(v0, num_iters)
    basis, alphas, betas, _, _ = jax.lax.fori_loop(0, num_iters, step, init)
    return LanczosResult(alphas, betas, basis)


@partial(jax.jit, static_argnums=1)
def _lanczos_start(v0: Array, num_iters: int) -> tuple:
    """The loop's carry: ``q_0 = v0 / |v0|`` (0 if ``v0 = 0``) in an empty basis."""
    norm0 = jnp.linalg.norm(v0)
    q0 = jnp.where(norm0 > 0, v0 / jnp.where(norm0 > 0, norm0, 1.0), 0.0)
    basis = jnp.zeros((num_iters, v0.shape[0]), v0.dtype).at[0].set(q0)
    zeros = jnp.zeros(num_iters, v0.dtype)
    return basis, zeros, zeros[1:], jnp.zeros((), v0.dtype), norm0 > 0


def _ritz(result: LanczosResult) -> tuple[Array, Array, Array]:
    """Ascending Ritz values, their weights ``s_0j^2`` and ``T``'s eigenvectors.

    After a breakdown the zero block of ``T`` is moved below its Gershgorin lower
    bound, so that its spurious eigenpairs come first (ascending); they get weight
    0 and repeat the smallest genuine Ritz value. Their Ritz vectors are zero.
    """
    alphas, betas = result.alphas, result.betas
    live = jnp.any(result.basis != 0, axis=1)  # Lanczos vectors are 0 or unit
    pad = jnp.zeros((1,), alphas.dtype)
    radius = jnp.abs(jnp.concatenate([pad, betas])) + jnp.abs(
        jnp.concatenate([betas, pad])
    )
    low = jnp.min(jnp.where(live, alphas - radius, jnp.inf))
    low = jnp.where(jnp.isfinite(low), low, 0.0)
    diag = jnp.where(live, alphas, low - 1.0 - jnp.abs(low))
    tri = jnp.diag(diag) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    theta, s = jnp.linalg.eigh(tri)
    genuine = jnp.sum(jnp.where(live[:, None], s * s, 0.0), axis=0) > 0.5
    smallest = jnp.min(jnp.where(genuine, theta, jnp.inf))
    smallest = jnp.where(jnp.isfinite(smallest), smallest, 0.0)
    theta = jnp.where(genuine, theta, smallest)
    return theta, jnp.where(genuine, s[0] ** 2, 0.0), s


class Eigenpairs(NamedTuple):
    """Top Ritz pairs and the one-probe quadrature rule of a Lanczos run.

    Attributes:
      values: ``[k]`` Ritz values, largest (algebraic) first.
      vectors: pytree like ``params`` with a leading ``k`` axis, unit 2-norm.
      ritz_values: ``[m]`` all Ritz values (eigenvalues of ``T``), ascending.
      ritz_weights: ``[m]`` squared first components of ``T``'s eigenvectors (sum
        to 1): the SLQ weights of the start vector.
    """

    values: Array
    vectors: Any
    ritz_values: Array
    ritz_weights: Array


def _flat_matvec(operator: Operator, like: dict) -> tuple[Callable, Array, Callable]:
    flat, unravel = ravel_pytree(like)
    return lambda x: ravel_pytree(operator(unravel(x)))[0], flat, unravel


def top_eigenpairs(
    operator: Operator, like: dict, key: Array, num_iters: int = 20, k: int = 1
) -> Eigenpairs:
    """Top-``k`` (largest algebraic) eigenpairs of a symmetric operator on pytrees.

    Lanczos from a Gaussian start vector; with ``T = S diag(theta) S^T`` the Ritz
    vectors are ``Q^T S`` (Golub & Van Loan 2013, Sec. 10.1.4). Extreme, well
    separated eigenvalues converge first. If the Krylov space breaks down with
    fewer than ``k`` dimensions, the missing pairs have zero vectors and repeat
    the smallest Ritz value (with zero weight in ``ritz_weights``).

    Args:
      operator: ``v -> A v`` on pytrees like ``like`` (e.g. ``hessian_operator``).
      like: pytree with the structure and dtype of the vectors (the params).
      key: PRNG key for the start vector.
      num_iters: Lanczos steps (operator products).
      k: number of eigenpairs (at most ``num_iters``).
    """
    if not 1 <= k <= num_iters:
        raise ValueError(f"k = {k} must be between 1 and num_iters = {num_iters}")
    matvec, flat, unravel = _flat_matvec(operator, like)
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    result = lanczos_tridiagonal(matvec, v0, num_iters)
    values, vectors, theta, weights = _top_ritz(result, k)
    return Eigenpairs(values, jax.vmap(unravel)(vectors), theta, weights)


@partial(jax.jit, static_argnums=1)
def _top_ritz(result: LanczosResult, k: int) -> tuple[Array, Array, Array, Array]:
    """The top ``k`` Ritz values and flat vectors ``Q^T s_j``, then ``_ritz``."""
    theta, weights, s = _ritz(result)
    top = s[:, ::-1][:, :k]
    return theta[::-1][:k], top.T @ result.basis, theta, weights


@jax.jit
def spectral_density(
    ritz_values: Array, ritz_weights: Array, grid: Array, sigma: float | Array
) -> Array:
    """Gaussian-broadened SLQ density ``sum_j w_j N(grid; theta_j, sigma^2)``.

    (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019.) A leading probe axis
    on ``ritz_values`` and ``ritz_weights`` is averaged. Integrates to ~1.
    """
    theta = jnp.reshape(ritz_values, (-1, ritz_values.shape[-1]))
    weights = jnp.reshape(ritz_weights, theta.shape)
    z = (grid[:, None, None] - theta) / sigma
    gauss = jnp.exp(-0.5 * z * z) / (sigma * jnp.sqrt(2.0 * jnp.pi))
    return jnp.mean(jnp.sum(weights * gauss, axis=-1), axis=-1)


def slq_density(
    operator: Operator,
    like: dict,
    key: Array,
    grid: Array,
    num_iters: int = 30,
    n_probes: int = 4,
    sigma: float | None = None,
) -> Array:
    """Stochastic Lanczos quadrature estimate of the spectral density on ``grid``.

    ``phi(t) = E_z sum_j w_j(z) N(t; theta_j(z), sigma^2)`` over Rademacher starts
    ``z``: ``(1/n) tr g(A) = E[z^T g(A) z] / n ~ sum_j w_j g(theta_j)`` (Lin, Saad &
    Yang 2016; Ghorbani, Krishnan & Xiao 2019). Probes run one after another
    (``lax.map``). ``sigma`` defaults to 1% of the Ritz-value range over probes,
    at least ``eps * max |theta|`` and ``sqrt(tiny)``.
    """
    matvec, flat, _ = _flat_matvec(operator, like)

    def probe(k):
        z = jax.random.rademacher(k, flat.shape, flat.dtype)
        theta, weights, _ = _ritz(lanczos_tridiagonal(matvec, z, num_iters))
        return theta, weights

    theta, weights = jax.lax.map(probe, jax.random.split(key, n_probes))
    sigma = _default_sigma(theta) if sigma is None else sigma
    return spectral_density(theta, weights, grid, sigma)


@jax.jit
def _default_sigma(theta: Array) -> Array:
    """1% of the range of ``theta``, at least ``eps max |theta|`` and ``sqrt(tiny)``."""
    info = jnp.finfo(theta.dtype)
    spread = 0.01 * (jnp.max(theta) - jnp.min(theta))
    floor = jnp.maximum(info.eps * jnp.max(jnp.abs(theta)), jnp.sqrt(info.tiny))
    return jnp.maximum(spread, floor)
