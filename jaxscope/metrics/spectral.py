"""Spectral norm and condition number of weight matrices.

Kernels are measured as the matrix their layer applies, ``[fan_in, fan_out]``
(:func:`jaxscope.tree.as_matrix` with :func:`jaxscope.tree.input_axes`: a Conv kernel
``[kh, kw, in, out]`` becomes ``[kh·kw·in, out]``, an attention query kernel
``[d, heads, head_dim]`` ``[d, heads·head_dim]``). Only kernels are measured: biases
(also 2-D attention biases), normalisation scales and scalars are left out. A layer with
several matrices (``depth`` grouping) is treated as their block-diagonal operator:
its spectral norm is the largest of theirs, its condition number
``max σ_max / min σ_min``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxscope.metrics.base import Leaves, Metric, group_max, group_min, stateless
from jaxscope.tree import as_matrix

__all__ = ["condition_number", "power_iteration", "spectral_norm"]

_F32 = jnp.float32


def _matrix(x: jax.Array) -> jax.Array:
  return as_matrix(x.astype(_F32) if x.dtype != _F32 else x)


def _singular_values(x: jax.Array) -> jax.Array:
  return jnp.linalg.svd(_matrix(x), compute_uv=False)


def power_iteration(w: jax.Array, u: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
  """Runs ``iters`` steps of power iteration for ``σ_max(W)`` from the unit vector ``u``.

  Each step is ``v = Wᵀu / ‖Wᵀu‖``, ``σ = ‖W v‖``, ``u = W v / σ``: two matrix-vector
  products. ``σ = ‖W v‖`` with ``‖v‖ = 1`` is a lower bound on ``σ_max(W)`` that
  converges to it geometrically, at rate ``(σ₂/σ₁)²`` per step. Warm-starting ``u``
  from the previous training step (as ``torch.nn.utils.spectral_norm`` and ikkuna did)
  makes one step per training step enough once the weights change slowly.

  A non-finite or zero ``W`` leaves ``u`` unchanged, so one bad step cannot poison the
  warm start; ``σ`` then shows the NaN (or 0).

  Args:
    w: a matrix ``[m, n]``.
    u: the unit start vector ``[m]`` (left singular vector estimate).
    iters: number of steps (static, >= 1).

  Returns:
    ``(sigma, u)``.
  """
  new_u = u
  sigma = jnp.zeros((), w.dtype)
  for _ in range(iters):
    v = new_u @ w  # = Wᵀu; XLA:CPU runs this as a plain mat-vec, ``w.T @ u`` 4x slower.
    v = v / jnp.maximum(jnp.linalg.norm(v), 1e-30)
    wv = w @ v
    sigma = jnp.linalg.norm(wv)
    new_u = wv / jnp.maximum(sigma, 1e-30)
  keep = jnp.all(jnp.isfinite(new_u)) & (jnp.linalg.norm(new_u) > 0.5)
  return sigma, jnp.where(keep, new_u, u)


def spectral_norm(
  method: str = "auto",
  iters: int = 1,
  svd_max_size: int = 16384,
  seed: int = 0,
) -> Metric:
  """Largest singular value ``σ_max(W) = max_{‖v‖=1} ‖W v‖`` of each kernel matrix.

  Args:
    method: ``"svd"`` (exact, ``jnp.linalg.svd``), ``"power"`` (power iteration
      warm-started from the state, see :func:`power_iteration`) or ``"auto"``: SVD for
      matrices with at most ``svd_max_size`` elements, power iteration above.
    iters: power-iteration steps per training step (2 matrix-vector products each).
    svd_max_size: the ``"auto"`` threshold, in matrix elements.
    seed: seed of the Gaussian start vectors.

  The value is ``float32``. ikkuna ran 3 warm-started steps on PyTorch's
  ``[out, in·kh·kw]`` reshape, the transpose of this one (same singular values).
  """
  if method not in ("auto", "svd", "power"):
    raise ValueError(f"spectral_norm: method must be 'auto', 'svd' or 'power', got {method!r}.")
  if not isinstance(iters, int) or iters < 1:
    raise ValueError(f"spectral_norm: iters must be a positive int, got {iters!r}.")

  def use_svd(shape: Sequence[int]) -> bool:
    if method == "auto":
      size = 1
      for d in shape:
        size *= int(d)
      return size <= svd_max_size
    return method == "svd"

  def init(shapes: Sequence[jax.ShapeDtypeStruct]) -> tuple[jax.Array, ...]:
    vs = []
    for i, s in enumerate(shapes):
      if use_svd(s.shape):
        vs.append(jnp.zeros((0,), _F32))  # No warm start needed; keeps the structure fixed.
      else:
        m = 1
        for d in s.shape[:-1]:
          m *= int(d)
        v = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), (m,), _F32)
        vs.append(v / jnp.linalg.norm(v))
    return tuple(vs)

  def apply(
    leaves: Leaves, state: tuple[jax.Array, ...], reference: Leaves | None
  ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    del reference
    sigmas, new_state = [], []
    for x, v in zip(leaves, state, strict=True):
      if use_svd(x.shape):
        sigmas.append(_singular_values(x)[0])
        new_state.append(v)
      else:
        sigma, v = power_iteration(_matrix(x), v, iters)
        sigmas.append(sigma)
        new_state.append(v)
    return group_max(sigmas), tuple(new_state)

  return Metric(
    "spectral_norm", init, apply, needs_params=False, min_ndim=2, kernels_only=True, matrix=True
  )


def condition_number() -> Metric:
  """Condition number ``κ(W) = σ_max(W) / σ_min(W)``, exact via SVD.

  ``σ_min`` is the smallest of the ``min(m, n)`` singular values of the
  ``[fan_in, out]`` matrix; a rank-deficient matrix gives ``inf``. (ikkuna's
  ``ConditionNumberSubscriber`` returned ``σ_max(W)/σ_max(W⁺) = σ_max·σ_min``, a bug
  not copied here.) SVD costs ``O(m n min(m, n))``: prefer ``every=n`` on big layers.
  """

  def fn(leaves: Leaves) -> jax.Array:
    svs = [_singular_values(x) for x in leaves]
    smax = group_max([s[0] for s in svs])
    smin = group_min([s[-1] for s in svs])
    ratio = smax / jnp.where(smin > 0, smin, 1.0)
    return jnp.where(smin > 0, ratio, jnp.where(smin == 0, jnp.inf, jnp.nan))

  return stateless("condition_number", fn, min_ndim=2, kernels_only=True, matrix=True)
