"""Lanczos iterations for the eigenvalue of largest magnitude of a symmetric operator.

``H`` is reached only through ``hvp(v) = H v`` on pytrees (a Hessian-vector product,
:mod:`jaxscope.metrics.hvp`); everything is jittable with fixed shapes. Two forms, with the
same result ``(θ, residual, x)``, the Ritz pair of largest magnitude and ``‖Hx − θx‖``:

* :func:`lanczos`: ``iters`` steps with full reorthogonalisation against a stored basis of
  ``iters + 1`` vectors (Paige; Parlett, *The Symmetric Eigenvalue Problem*, ch. 13);
* :func:`lanczos_two_pass`: the three-term recurrence twice, five vectors, no basis, with
  an early stop and a measured residual, for the refinement of
  :func:`jaxscope.metrics.curvature.max_eigenvalue_update`.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxscope.metrics import lanczos
  >>> h = jnp.diag(jnp.array([3.0, 1.0, -0.5, 0.25]))
  >>> theta, res, x = lanczos.lanczos_two_pass(lambda v: h @ v, jnp.full((4,), 0.5), 4)
  >>> round(float(theta), 4)
  3.0
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxscope.metrics.base import tree_norm, tree_vdot
from jaxscope.metrics.hvp import Hvp

__all__ = ["lanczos", "lanczos_two_pass"]

PyTree = Any

_F32 = jnp.float32


def _normalise(v: PyTree) -> tuple[PyTree, jax.Array]:
  n = tree_norm(v).astype(_F32)
  return optax.tree.scale(1.0 / jnp.maximum(n, 1e-30), v), n


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  return tree_vdot(a, b).astype(_F32)


def lanczos(hvp: Hvp, v: PyTree, iters: int) -> tuple[jax.Array, jax.Array, PyTree]:
  """``iters`` Lanczos steps with full reorthogonalisation: ``(θ, residual, Ritz vector)``.

  The largest-magnitude Ritz pair ``(θ, x = Q y)`` and its residual ``‖Hx − θx‖ = β_k |y_k|``
  (exact in exact arithmetic; full reorthogonalisation keeps it so in float32).
  """
  k = iters
  leaves, treedef = jax.tree.flatten(v)
  dtypes = [x.dtype for x in leaves]
  eps = max(float(jnp.finfo(dt).eps) for dt in dtypes)

  def stacked_dot(q: list[jax.Array], w: list[jax.Array]) -> jax.Array:
    # [k+1] coefficients Qᵀw, summed over leaves.
    return sum(
      jnp.tensordot(qi, wi, axes=wi.ndim).astype(_F32) for qi, wi in zip(q, w, strict=True)
    )

  def project_out(q: list[jax.Array], w: list[jax.Array]) -> list[jax.Array]:
    c = stacked_dot(q, w)
    return [wi - jnp.tensordot(c.astype(qi.dtype), qi, axes=1) for qi, wi in zip(q, w, strict=True)]

  q0 = [jnp.zeros((k + 1, *x.shape), x.dtype).at[0].set(x) for x in leaves]
  alphas0 = jnp.zeros((k,), _F32)
  betas0 = jnp.zeros((k,), _F32)

  def body(
    j: jax.Array, carry: tuple[list[jax.Array], jax.Array, jax.Array]
  ) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    q, alphas, betas = carry
    qj = [lax.dynamic_index_in_dim(qi, j, keepdims=False) for qi in q]
    w = jax.tree.leaves(hvp(jax.tree.unflatten(treedef, qj)))
    w = [wi.astype(dt) for wi, dt in zip(w, dtypes, strict=True)]
    a = sum(jnp.vdot(x, y).astype(_F32) for x, y in zip(qj, w, strict=True))
    ref = jnp.sqrt(sum(jnp.vdot(y, y).real.astype(_F32) for y in w))
    # Full reorthogonalisation against every stored vector (rows > j are zero), twice
    # (classical Gram-Schmidt twice is orthogonal to working precision).
    w = project_out(q, project_out(q, w))
    b = jnp.sqrt(sum(jnp.vdot(y, y).real.astype(_F32) for y in w))
    # Breakdown: the Krylov space is (numerically) invariant. Stop adding directions; the
    # remaining steps see q = 0, which only adds exact zeros to T.
    ok = jnp.isfinite(b) & (b > 64.0 * eps * ref)
    b = jnp.where(ok, b, jnp.where(jnp.isfinite(b), 0.0, b))
    scale = jnp.where(ok, 1.0 / jnp.where(ok, b, 1.0), 0.0)
    q = [
      lax.dynamic_update_index_in_dim(qi, (wi * scale.astype(wi.dtype)), j + 1, 0)
      for qi, wi in zip(q, w, strict=True)
    ]
    return q, alphas.at[j].set(a), betas.at[j].set(b)

  q, alphas, betas = lax.fori_loop(0, k, body, (q0, alphas0, betas0))
  finite = jnp.all(jnp.isfinite(alphas)) & jnp.all(jnp.isfinite(betas))
  theta, y = _ritz(jnp.where(finite, alphas, 0.0), jnp.where(finite, betas, 0.0), k)
  lam = jnp.where(finite, theta, jnp.nan)
  res = jnp.where(finite, jnp.abs(betas[k - 1] * y[k - 1]), jnp.nan).astype(_F32)
  x = [jnp.tensordot(y.astype(qi.dtype), qi[:k], axes=1) for qi in q]
  return lam, res, jax.tree.unflatten(treedef, x)


#: Relative Ritz residual ``β_j |y_j| / |θ|`` at which :func:`_lanczos_two_pass` stops early.
_REFINE_RTOL = 1e-4


def _ritz(alphas: jax.Array, betas: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Ritz pair of largest magnitude of the leading ``m × m`` block of the tridiagonal
  ``T`` (diagonal ``alphas``, off-diagonal ``betas``; rows ``≥ m`` zeroed): ``(θ, y)``."""
  k = alphas.shape[0]
  idx = jnp.arange(k)
  a = jnp.where(idx < m, alphas, 0.0)
  off = jnp.where(idx[: k - 1] < m - 1, betas[: k - 1], 0.0)
  evals, evecs = jnp.linalg.eigh(jnp.diag(a) + jnp.diag(off, 1) + jnp.diag(off, -1))
  i = jnp.argmax(jnp.abs(evals))
  return evals[i], jnp.where(idx < m, evecs[:, i], 0.0)


def lanczos_two_pass(hvp: Hvp, v: PyTree, iters: int) -> tuple[jax.Array, jax.Array, PyTree]:
  """Up to ``iters`` Lanczos steps that keep three vectors, not the basis: ``(θ, residual, x)``.

  The first pass runs the three-term recurrence ``β_j q_{j+1} = H q_j − α_j q_j −
  β_{j−1} q_{j−1}`` (the new vector orthogonalised once more against ``q_j``, a local
  reorthogonalisation) and keeps only ``α`` and ``β``; it stops after ``m ≤ iters`` steps,
  once the Ritz value of largest magnitude has converged (``β_{m−1} |y_{m−1}| ≤ 10⁻⁴ |θ|``)
  or the Krylov space is invariant. The second pass runs the same recurrence again (for
  ``iters − 1`` steps: ``y``'s entries past ``m`` are zero) and adds up the Ritz vector
  ``x = Σⱼ yⱼ qⱼ`` as the vectors come. Memory: five vectors, against ``(iters + 1) × P``
  for :func:`lanczos`; cost: ``m + iters`` HVPs (the last for the residual, below)
  against ``iters``.

  Without full reorthogonalisation the Lanczos vectors lose orthogonality as soon as a
  Ritz value converges; the converged value stays an accurate eigenvalue (copies of it
  appear in ``T``, never a value outside the spectrum: Paige 1980; Parlett, *The
  Symmetric Eigenvalue Problem*, ch. 13), but ``β_k |y_k|`` is then no longer the
  residual of a unit vector. So ``x`` is normalised and its own Rayleigh quotient
  ``xᵀHx`` and residual ``‖Hx − (xᵀHx) x‖`` are returned, from one more HVP: the
  residual reported is measured, not inferred.
  """
  k = iters
  eps = max(float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(v))

  def step(q_prev: PyTree, q: PyTree, b_prev: jax.Array) -> tuple[PyTree, jax.Array, jax.Array]:
    w = jax.tree.map(lambda a, b: a.astype(b.dtype), hvp(q), q)
    a = _vdot(q, w)
    ref = tree_norm(w).astype(_F32)
    w = jax.tree.map(
      lambda wi, qi, pi: wi - a.astype(wi.dtype) * qi - b_prev.astype(wi.dtype) * pi,
      w,
      q,
      q_prev,
    )
    c = _vdot(q, w)
    w = jax.tree.map(lambda wi, qi: wi - c.astype(wi.dtype) * qi, w, q)
    b = tree_norm(w).astype(_F32)
    # Breakdown (an invariant Krylov space) or a non-finite product: no further directions.
    ok = jnp.isfinite(b) & (b > 64.0 * eps * ref)
    scale = jnp.where(ok, 1.0 / jnp.where(ok, b, 1.0), 0.0)
    q_next = jax.tree.map(lambda wi: wi * scale.astype(wi.dtype), w)
    return q_next, a, jnp.where(ok, b, jnp.where(jnp.isfinite(b), 0.0, b))

  zeros = jax.tree.map(jnp.zeros_like, v)

  def going(carry: tuple) -> jax.Array:
    return ~carry[-1]

  def first(carry: tuple) -> tuple:
    j, q_prev, q, alphas, betas, _ = carry
    b_prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], 0.0)
    q_next, a, b = step(q_prev, q, b_prev)
    alphas, betas = alphas.at[j].set(a), betas.at[j].set(b)
    theta, y = _ritz(alphas, betas, j + 1)
    converged = jnp.abs(b * y[j]) <= _REFINE_RTOL * jnp.abs(theta)
    done = (j + 1 >= k) | converged | ~(b > 0) | ~jnp.isfinite(a)
    return j + 1, q, q_next, alphas, betas, done

  carry = (jnp.zeros((), jnp.int32), zeros, v, jnp.zeros((k,), _F32), jnp.zeros((k,), _F32))
  m, _, _, alphas, betas, _ = lax.while_loop(going, first, (*carry, jnp.zeros((), jnp.bool_)))
  finite = jnp.all(jnp.isfinite(alphas)) & jnp.all(jnp.isfinite(betas))
  _, y = _ritz(jnp.where(finite, alphas, 0.0), jnp.where(finite, betas, 0.0), m)

  def second(j: jax.Array, carry: tuple) -> tuple:
    q_prev, q, x = carry
    x = jax.tree.map(lambda xi, qi: xi + y[j].astype(xi.dtype) * qi, x, q)
    b_prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], 0.0)
    q_next, _, _ = step(q_prev, q, b_prev)
    return q, q_next, x

  # A fixed trip count, though the rows of y past m are zero: with the trip count known
  # only at run time (m − 1), XLA:CPU's temporaries of the 3c3d CNN's full instruments
  # step grew from 355 to 435 MB.
  _, q_last, x = lax.fori_loop(0, k - 1, second, (zeros, v, zeros))
  x = jax.tree.map(lambda xi, qi: xi + y[k - 1].astype(xi.dtype) * qi, x, q_last)
  x, _ = _normalise(x)
  hx = jax.tree.map(lambda a, b: a.astype(b.dtype), hvp(x), x)
  lam = _vdot(x, hx)
  res = tree_norm(jax.tree.map(lambda a, b: a - lam.astype(a.dtype) * b, hx, x)).astype(_F32)
  bad = ~finite | ~jnp.isfinite(lam)
  return jnp.where(bad, jnp.nan, lam), jnp.where(bad, jnp.nan, res), x
