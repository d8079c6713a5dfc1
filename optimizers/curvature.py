"""Curvature-vector products, shared by the optimizers and the analysis.

For a task with outputs ``f(theta)`` (``[T, B, O]``), hidden states ``x(theta)``
(``[T, B, H]``) and loss ``L = sum_t m_t l(f_t, y_t) / sum_t m_t``:

* Gauss-Newton (Schraudolph 2002; Martens 2010): ``G v = J_f^T H_L J_f v``, with
  ``H_L`` the output-space Hessian of the masked loss (positive semi-definite);
* exact Hessian: ``H v = d/de grad L(theta + e v)``;
* structural damping (Martens & Sutskever 2011): ``S v = J_x^T D J_x v``, the
  Gauss-Newton matrix of a matching loss on the hidden states, with
  ``D = diag(sigma'(x_t))`` for vanilla units (the Hessian of the matching loss of a
  logistic or tanh unit with respect to its input) and ``D = I`` otherwise; averaged
  over sequences and summed over their valid steps.

Each ``*_operator`` function linearizes the network once (``jax.linearize``) and
returns a closure that reuses that linearization for every product, as Hessian-free's
conjugate gradient needs (one forward-mode and one reverse-mode pass per product).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tasks.base import Batch, Task

Array = jax.Array
Operator = Callable[[dict], dict]


def output_hessian_vp(task: Task, outputs: Array, batch: Batch, v: Array) -> Array:
    """``H_L v`` for the masked-mean output loss (per step, block diagonal)."""
    mask = batch.mask.astype(outputs.dtype)
    weight = mask / jnp.maximum(jnp.sum(mask), 1.0)
    return task.output_loss.hessian_vp(outputs, v) * weight[..., None]


def state_curvature(task: Task, states: Array) -> Array:
    """The diagonal ``D`` of the structural-damping matching loss, like ``states``."""
    activation = getattr(task, "activation", None)
    if activation is None or getattr(task, "leak", 0.0) != 0.0:
        return jnp.ones_like(states)
    return jax.vmap(jax.grad(activation))(states.ravel()).reshape(states.shape)


def structural_diagonal(task: Task, states: Array, batch: Batch) -> Array:
    """``D`` weighted by ``1 / n_sequences`` on valid steps and 0 on padding."""
    steps = jnp.arange(states.shape[0])[:, None]
    valid = (steps < batch.lengths[None, :]).astype(states.dtype)
    return state_curvature(task, states) * (valid / states.shape[1])[..., None]


def gauss_newton_operator(
    task: Task, params: dict, batch: Batch, structural: float | Array = 0.0
) -> Operator:
    """``v -> G v + structural * S v``, linearized once at ``params`` on ``batch``.

    Args:
      task: the task (outputs, states, output loss).
      params: the point of linearization.
      batch: the curvature minibatch.
      structural: weight of the structural-damping term ``S`` (HF passes
        ``lambda * mu``); 0 leaves it out at no cost when a Python zero.
    """
    (outputs, states), jvp = jax.linearize(
        lambda p: task.apply(p, batch.inputs), params
    )
    transpose = jax.linear_transpose(jvp, params)
    use_states = not (isinstance(structural, int | float) and structural == 0)
    if use_states:
        d = structural_diagonal(task, states, batch)

    def matvec(v: dict) -> dict:
        jv_out, jv_states = jvp(v)
        ct_out = output_hessian_vp(task, outputs, batch, jv_out)
        ct_states = structural * d * jv_states if use_states else jnp.zeros_like(states)
        (gv,) = transpose((ct_out, ct_states))
        return gv

    return matvec


def hessian_operator(task: Task, params: dict, batch: Batch) -> Operator:
    """``v -> H v``, the exact Hessian of the loss, linearized once at ``params``."""
    _, hvp = jax.linearize(jax.grad(lambda p: task.loss(p, batch)), params)
    return hvp


CURVATURES = {"gauss_newton": gauss_newton_operator, "hessian": hessian_operator}


def curvature_operator(
    kind: str, task: Task, params: dict, batch: Batch, structural=0.0
) -> Operator:
    """The ``kind`` ("gauss_newton" or "hessian") operator, plus structural damping.

    Structural damping is always taken in Gauss-Newton form, also with the Hessian.
    """
    if kind == "gauss_newton":
        return gauss_newton_operator(task, params, batch, structural)
    if kind != "hessian":
        raise ValueError(f"curvature must be one of {sorted(CURVATURES)}, not {kind!r}")
    hvp = hessian_operator(task, params, batch)
    if isinstance(structural, int | float) and structural == 0:
        return hvp
    structure = structural_operator(task, params, batch)
    return lambda v: jax.tree.map(lambda a, b: a + structural * b, hvp(v), structure(v))


def structural_operator(task: Task, params: dict, batch: Batch) -> Operator:
    """``v -> S v = J_x^T D J_x v`` alone (structural damping's curvature)."""
    states, jvp = jax.linearize(lambda p: task.apply(p, batch.inputs)[1], params)
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
    outputs, vjp = jax.vjp(lambda p: task.apply(p, batch.inputs)[0], params)
    mask = batch.mask.astype(outputs.dtype)
    root_w = jnp.sqrt(mask / jnp.maximum(jnp.sum(mask), 1.0))

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
    mask = batch.mask.astype(outputs.dtype)
    weight = mask / jnp.maximum(jnp.sum(mask), 1.0)
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
