"""Spectral norm and condition number of weight matrices.

Kernels are measured as the matrix their layer applies, ``[fan_in, fan_out]``
(:func:`jaxscope.tree.as_matrix` with :func:`jaxscope.tree.input_axes`: a Conv kernel
``[kh, kw, in, out]`` becomes ``[kh·kw·in, out]``, an attention query kernel
``[d, heads, head_dim]`` ``[d, heads·head_dim]``). Only kernels are measured: biases
(also 2-D attention biases), normalisation scales and scalars are left out. A layer with
several matrices (``depth`` grouping) is treated as their block-diagonal operator:
its spectral norm is the largest of theirs, its condition number
``max σ_max / min σ_min``.

:func:`spectral_norm` is exact (SVD) for small kernels and a warm-started power iteration
above (:data:`SVD_MAX_SIZE`), converged from the first call (:func:`subspace_start`) and
reported with its residual (:func:`refine`): keys ``{topic}/spectral_norm/{layer}`` and
``{topic}/spectral_norm_residual/{layer}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope.metrics.base import Leaves, Metric, group_max, group_min, stateless
from jaxscope.tree import as_matrix

__all__ = [
  "SVD_MAX_SIZE",
  "WARMUP_BLOCK",
  "PowerState",
  "condition_number",
  "power_iteration",
  "refine",
  "spectral_norm",
  "subspace_start",
]

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


#: Default of :func:`spectral_norm`'s ``svd_max_size`` (matrix elements): exact SVD up to it.
#: Measured on the 2-core development CPU (jax 0.10.2, float32, medians of 20 jitted calls):
#: ``jnp.linalg.svd(compute_uv=False)`` takes 0.05 ms on 32×32 (1 024 elements), 0.2 ms on
#: 64×64 (4 096), 0.7–1.3 ms on 64×256, 128×128, 256×64 (16 384), 4 ms on 256×256 (65 536)
#: and 25 ms on 512×512, against 0.1–0.3 ms for the forward and backward pass of that
#: layer on a batch of 128 (0.9–3.6 ms for the 256×256–512×512 ones) and ≈ 0.02 ms of
#: matrix-vector products for a power-iteration step. Up to 4 096 elements the SVD costs
#: at most the layer's own training pass (a small fraction of a whole train step); at
#: 16 384 it already costs 1–4 times that pass, and grows as ``m·n·min(m, n)``.
SVD_MAX_SIZE = 4096


class PowerState(NamedTuple):
  """State of :func:`spectral_norm` for one layer."""

  count: jax.Array
  """``int32``: calls whose power iteration gave a finite estimate (0: next call warms up)."""
  vectors: tuple[jax.Array, ...]
  """Per leaf: the unit left singular vector estimate ``u [m]`` (the warm start), or a
  ``[1]`` placeholder for a leaf measured by SVD."""


def refine(
  w: jax.Array, u: jax.Array, iters: int, max_iters: int, tol: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Power iteration for ``σ_max(W)`` with a residual check, from the unit vector ``u``.

  Each iteration is ``v = Wᵀu / ‖Wᵀu‖``, ``σ = ‖W v‖``, ``u = W v / σ`` (two
  matrix-vector products). ``iters`` iterations run unconditionally; then a
  ``lax.while_loop`` (batched under ``vmap``) adds iterations, up to ``max_iters`` in
  all, while ``r > tol·σ``, with the residual of the singular triplet

      r = ‖Wᵀu − σ v‖.

  ``Wᵀu`` is the first product of the next iteration, so the residual costs one
  matrix-vector product per call (``2k + 1`` in all for ``k`` iterations).

  What the two numbers bound (``A = WᵀW``, ``ρ = vᵀAv = σ²``,
  ``‖Av − ρv‖ = σ‖Wᵀu − σv‖ = σ r``): an eigenvalue of ``A`` lies within ``σ r`` of
  ``σ²`` (the Rayleigh-quotient residual bound), so some singular value ``σ_i`` of ``W``
  (or 0) satisfies ``|σ − σ_i| ≤ σ r / (σ + σ_i) ≤ r``; and ``σ = ‖Wv‖ ≤ σ_max`` always.
  ``[σ, σ + r]`` holds ``σ_max`` itself when that ``σ_i`` is the largest: when ``u`` has
  a fair weight on the top singular vector (for two singular values ``σ₁ > σ₂``, from
  about 1/5 of ``u``'s squared norm on), which a random start lacks (its weight is
  ``≈ 1/m``, often far less) and :func:`subspace_start` provides.

  The residual reported is at least ``ε·√max(m, n)·σ`` (``ε`` the float32 machine
  epsilon), the scale of the rounding of ``σ`` and ``r`` themselves: a converged residual
  below it is rounding noise, not accuracy.

  A non-finite or zero ``W`` leaves ``u`` unchanged, so one bad step cannot poison the
  warm start; ``σ`` and ``r`` then show the NaN (or 0).

  Args:
    w: a matrix ``[m, n]`` (float32).
    u: the unit start vector ``[m]``.
    iters: the fewest iterations (static, ``>= 1``).
    max_iters: the most iterations (static).
    tol: the relative residual ``r/σ`` below which no iteration is added.

  Returns:
    ``(sigma, residual, u)``: float32 scalars and the new unit vector.
  """

  def step(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    k, _, z, _, _ = c
    v = z / jnp.maximum(jnp.linalg.norm(z), 1e-30)
    wv = w @ v
    sigma = jnp.linalg.norm(wv)
    new_u = wv / jnp.maximum(sigma, 1e-30)
    z = new_u @ w  # = Wᵀu; XLA:CPU runs this as a plain mat-vec, ``w.T @ u`` 4x slower.
    return k + 1, new_u, z, sigma, jnp.linalg.norm(z - sigma * v)

  def more(c: tuple[jax.Array, ...]) -> jax.Array:
    k, _, _, sigma, r = c
    return (k < max_iters) & (r > tol * sigma)  # NaN stops.

  zero = jnp.zeros((), w.dtype)
  c = (jnp.zeros((), jnp.int32), u, u @ w, zero, zero)
  for _ in range(iters):
    c = step(c)
  if max_iters > iters:
    c = jax.lax.while_loop(more, step, c)
  _, new_u, _, sigma, r = c
  # Below float32 rounding neither r nor σ is exact: never claim less than its scale.
  floor = float(jnp.finfo(jnp.float32).eps) * math.sqrt(max(w.shape)) * sigma
  return sigma, jnp.maximum(r, floor), _kept(new_u, u)


def _kept(new_u: jax.Array, u: jax.Array) -> jax.Array:
  """``new_u``, or ``u`` where ``new_u`` is not a finite unit vector."""
  keep = jnp.all(jnp.isfinite(new_u)) & (jnp.linalg.norm(new_u) > 0.5)
  return jnp.where(keep, new_u, u)


#: Vectors in the block of :func:`subspace_start` (fewer for matrices with fewer rows or
#: columns).
WARMUP_BLOCK = 8


def subspace_start(w: jax.Array, u: jax.Array, steps: jax.Array | int, key: jax.Array) -> jax.Array:
  """A start vector for :func:`refine`: ``steps`` of subspace iteration on a block.

  The block ``U [m, b]`` (``b = min(8, m, n)``, :data:`WARMUP_BLOCK`) starts as ``u`` and
  ``b − 1`` Gaussian columns (from ``key``); each step is ``Z = Uᵀ W``,
  ``U = orth(W orth(Zᵀ))`` (``2b`` matrix-vector products and two thin QRs), and the
  result is the top Ritz vector of the last block (Rayleigh–Ritz: the top eigenvector
  of ``Z Zᵀ``, ``b × b``). A block converges to the top singular vector at rate
  ``(σ_{b+1}/σ₁)²`` per step instead of power iteration's ``(σ₂/σ₁)²``, and no single
  unlucky start vector can leave it without weight on the top: measured on 200 random
  ``64…300 × 200…700`` matrices (Gaussian, uniform singular values, gaps 0.1%–10%),
  30 steps then :func:`refine` with ``tol = 1e-2`` gave ``|σ − σ_max| ≤ 0.39 r`` in every
  case, where 30 power iterations from a Gaussian start were out by up to ``3.4 r``
  (2% of ``σ_max``) in 5 of them. ``steps = 0`` (traced: a later call) costs nothing and
  returns ``u``.

  Args:
    w: a matrix ``[m, n]`` (float32).
    u: a unit vector ``[m]``.
    steps: subspace iterations (may be traced).
    key: PRNG key of the other start columns (:func:`spectral_norm` folds in the leaf
      index and the call count, so a re-warm draws new ones).

  Returns:
    A unit vector ``[m]``; ``u`` when ``steps`` is 0 or the result is not finite.
  """
  m, n = w.shape
  b = min(WARMUP_BLOCK, m, n)

  def body(c: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    k, block, _ = c
    fresh = jnp.concatenate([u[:, None], jax.random.normal(key, (m, b - 1), w.dtype)], axis=1)
    block, _ = jnp.linalg.qr(jnp.where(k == 0, fresh, block))
    z = block.T @ w  # [b, n]
    _, vecs = jnp.linalg.eigh(z @ z.T)
    top = block @ vecs[:, -1]
    q, _ = jnp.linalg.qr(z.T)
    return k + 1, w @ q, top / jnp.maximum(jnp.linalg.norm(top), 1e-30)

  def run() -> jax.Array:
    init = (jnp.zeros((), jnp.int32), jnp.zeros((m, b), w.dtype), u)
    _, _, top = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    return _kept(top, u)

  # The cond skips the loop outright (a zero-trip while around QR and eigh costs
  # ~0.1 ms on XLA:CPU, the cond ~0.01 ms); under vmap it becomes a select, the loop's
  # trip count still 0 on later calls.
  return jax.lax.cond(steps > 0, run, lambda: u)


def _checked_options(
  method: str, iters: int, warmup_iters: int, rewarm_every: int, max_iters: int, tol: float
) -> int:
  """Checks :func:`spectral_norm`'s options; returns ``max_iters`` (at least ``iters``)."""
  if method not in ("auto", "svd", "power"):
    raise ValueError(f"spectral_norm: method must be 'auto', 'svd' or 'power', got {method!r}.")
  for arg, val, low in (
    ("iters", iters, 1),
    ("warmup_iters", warmup_iters, 0),
    ("rewarm_every", rewarm_every, 0),
    ("max_iters", max_iters, 1),
  ):
    if not isinstance(val, int) or isinstance(val, bool) or val < low:
      raise ValueError(f"spectral_norm: {arg} must be an int >= {low}, got {val!r}.")
  if not tol >= 0.0:
    raise ValueError(f"spectral_norm: tol must be >= 0, got {tol!r}.")
  return max(max_iters, iters)


def spectral_norm(
  method: str = "auto",
  iters: int = 1,
  svd_max_size: int = SVD_MAX_SIZE,
  seed: int = 0,
  *,
  warmup_iters: int = 30,
  rewarm_every: int = 100,
  tol: float = 1e-2,
  max_iters: int = 50,
) -> Metric:
  """Largest singular value ``σ_max(W) = max_{‖v‖=1} ‖W v‖`` of each kernel matrix.

  Keys: ``{topic}/spectral_norm/{layer}`` (the value, float32) and, for layers measured
  by power iteration, ``{topic}/spectral_norm_residual/{layer}``: the residual
  ``r = ‖Wᵀu − σv‖`` of the singular triplet (see :func:`refine`). Some singular value
  lies within ``r`` of ``σ`` in every case, ``σ ≤ σ_max`` always, and ``σ_max ≤ σ + r``
  once the iteration holds the top of the spectrum (what the warm-up is for). An exact
  (SVD) layer has no residual key. (The metric's ``name`` is ``"spectral"`` and its
  value a dict ``{"norm", "norm_residual"}``, which a scope keys
  ``{topic}/spectral_{part}/{layer}``.)

  Power iteration: the first call starts from ``warmup_iters`` steps of subspace
  iteration on 8 vectors (:func:`subspace_start`), later calls from the previous call's
  vector (warm start, as ``torch.nn.utils.spectral_norm`` and ikkuna did), and every
  ``rewarm_every``-th call again from a subspace iteration (seeded with that vector);
  each call runs at least ``iters`` power iterations and adds more, up to ``max_iters``,
  while ``r > tol·σ`` (e.g. after an update that turned the top singular vector).
  Between re-warms, a singular value that overtakes the tracked one (training can make a
  new direction the largest) is found only at power iteration's rate; until then ``r``
  bounds the distance to the tracked singular value, below ``σ_max``. A layer of
  several kernels (``depth`` grouping) is their block-diagonal operator:
  ``σ = max_j σ_j`` and ``r = max_j (σ_j + r_j) − σ``.

  Args:
    method: ``"svd"`` (exact, ``jnp.linalg.svd``), ``"power"`` (power iteration with a
      residual) or ``"auto"`` (default): SVD for matrices of at most ``svd_max_size``
      elements, power iteration above.
    iters: the fewest power iterations per call (2 matrix-vector products each, plus
      one per call for the residual).
    svd_max_size: the ``"auto"`` threshold in matrix elements; default
      :data:`SVD_MAX_SIZE` (4096, measured: up to it the SVD costs at most about the
      layer's own forward and backward pass on a batch of 128, on a 2-core CPU).
    seed: seed of the random start vectors.
    warmup_iters: subspace-iteration steps of the first call and of a re-warm (``0``:
      start from one Gaussian vector, never re-warm).
    rewarm_every: re-warm every this many calls (``0``: never); amortised, a re-warm
      costs ``2·8·warmup_iters / rewarm_every`` matrix-vector products per call (4.8 by
      default).
    tol: the relative residual ``r/σ`` up to which no iteration is added (default 1%).
    max_iters: the most power iterations of a call (at least ``iters``).

  ikkuna ran 3 warm-started steps on PyTorch's ``[out, in·kh·kw]`` reshape, the transpose
  of this one (same singular values).
  """
  max_iters = _checked_options(method, iters, warmup_iters, rewarm_every, max_iters, tol)

  def use_svd(shape: Sequence[int]) -> bool:
    if method == "auto":
      return math.prod(int(d) for d in shape) <= svd_max_size
    return method == "svd"

  def init(shapes: Sequence[jax.ShapeDtypeStruct]) -> PowerState:
    vs = []
    for i, s in enumerate(shapes):
      if use_svd(s.shape):
        # No warm start needed; a placeholder keeps the structure fixed (of size 1: orbax
        # cannot save zero-size arrays).
        vs.append(jnp.zeros((1,), _F32))
      else:
        m = math.prod(int(d) for d in s.shape[:-1])
        v = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), (m,), _F32)
        vs.append(v / jnp.linalg.norm(v))
    return PowerState(jnp.zeros((), jnp.int32), tuple(vs))

  def apply(
    leaves: Leaves, state: PowerState, reference: Leaves | None
  ) -> tuple[dict[str, jax.Array], PowerState]:
    del reference
    warm = state.count == 0
    if rewarm_every:
      warm = warm | (state.count % rewarm_every == 0)
    steps = jnp.where(warm, warmup_iters, 0)
    sigmas, residuals, new_vs = [], [], []
    finite = jnp.ones((), jnp.bool_)
    for i, (x, u) in enumerate(zip(leaves, state.vectors, strict=True)):
      if use_svd(x.shape):
        sigma = _singular_values(x)[0]
        r = None
      else:
        w = _matrix(x)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), i), state.count)
        sigma, r, new_u = refine(w, subspace_start(w, u, steps, key), iters, max_iters, tol)
        finite = finite & jnp.isfinite(sigma)
        u = _kept(new_u, u)
      sigmas.append(sigma)
      residuals.append(r)
      new_vs.append(u)
    value = group_max(sigmas)
    out = {"norm": value}
    count = state.count
    if any(r is not None for r in residuals):
      # The block-diagonal operator's σ_max lies in [max σ_j, max (σ_j + r_j)].
      parts = [
        s - value + (0.0 if r is None else r) for s, r in zip(sigmas, residuals, strict=True)
      ]
      out["norm_residual"] = group_max(parts)
      count = jnp.where(finite, optax.safe_increment(count), count)
    return out, PowerState(count, tuple(new_vs))

  return Metric("spectral", init, apply, min_ndim=2, kernels_only=True, matrix=True)


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
