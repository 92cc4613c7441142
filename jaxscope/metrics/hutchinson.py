"""Hessian traces and diagonals from Hessian-vector products (Hutchinson; exact diagonal).

Pure functions of pytrees with fixed shapes (``jit``-, ``vmap``- and ``scan``-safe). The
Hessian is reached through ``hvp(v) = H v`` (:mod:`jaxscope.metrics.hvp`); it is never formed.
Re-exported by :mod:`jaxscope.metrics.curvature`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxscope.metrics.hvp import Hvp

__all__ = [
  "HutchinsonEstimate",
  "exact_hessian_diagonal",
  "hutchinson",
  "hutchinson_estimate",
  "leaf_traces",
  "probes_like",
  "rademacher",
  "streamed_estimate",
  "trace_estimate",
]

PyTree = Any

_F32 = jnp.float32


def _num_params(tree: PyTree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def rademacher(shape: tuple[int, ...], key: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """Independent ±1 entries with probability ½ each, from 32 random bits per word.

  Same distribution as ``jax.random.rademacher``, but one 32-bit draw gives 32 signs: on
  CPU, drawing a probe for a 1.3 M-parameter model this way takes about 1/30 of the time
  (the threefry generator dominates the cost of a Hutchinson probe otherwise).
  """
  shape = tuple(shape)
  return _expand(_probe_words(key, shape, 1), 0, shape, 1, dtype)[0]


class HutchinsonEstimate(NamedTuple):
  """Hutchinson's trace and diagonal estimates with their standard errors (all ``float32``)."""

  trace: jax.Array
  """``(1/K) Σₖ zₖᵀ H zₖ``, the estimate of ``tr(H)``."""
  trace_stderr: jax.Array
  """Its standard error (see :func:`trace_estimate` for the estimator)."""
  diag: PyTree
  """``(1/K) Σₖ zₖ ⊙ H zₖ``, the estimate of ``diag(H)``, a pytree like the parameters."""
  leaf_traces: PyTree
  """Per-leaf sums of ``diag``: estimates of the diagonal blocks' traces ``tr(H_ll)``."""
  leaf_stderr: PyTree
  """Upper bounds (in expectation) on their standard errors."""
  samples: PyTree
  """The ``K`` single-probe diagonals ``zₖ ⊙ H zₖ``, leaves with a leading axis ``K``
  (``None`` from :func:`streamed_estimate`, which never holds them all)."""
  diag_variance: PyTree
  """Per entry, the variance of ``diag``: ``Var[(z ⊙ Hz)ᵢ] = Σ_{j≠i} Hᵢⱼ²`` per probe;
  ``E[dₖᵢ²] = Σⱼ Hᵢⱼ²`` and ``E[d̄ᵢ²] = Hᵢᵢ² + Var/K``, so ``K/(K−1)·(mean dₖᵢ² − d̄ᵢ²)``
  (clipped at 0) is unbiased for it, divided by ``K`` for the mean. One probe cannot
  measure it (``d²`` in its place covered the exact TIC in only 4–22% of draws,
  ``docs/fidelity.md``): ``inf``, so what divides by it reads as noise. Unused, it costs
  nothing inside ``jit`` (XLA drops it)."""


def probes_like(params: PyTree, key: jax.Array, num_probes: int) -> PyTree:
  """``num_probes`` Rademacher probes like ``params``: leaves ``[K, *shape]`` in their dtypes."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(
    treedef,
    [rademacher((num_probes, *x.shape), k, x.dtype) for k, x in zip(keys, leaves, strict=False)],
  )


def _variance(k: int, hz_sq: jax.Array, diag_sq: jax.Array) -> jax.Array:
  """Per-probe variance estimate ``2K/(K−1) · (mean‖Hzₖ‖² − ‖d̄‖²)``, or ``2 ‖Hz‖²`` (K = 1)."""
  if k == 1:
    return 2.0 * hz_sq
  return jnp.maximum(2.0 * k / (k - 1) * (hz_sq - diag_sq), 0.0)


def trace_estimate(probes: PyTree, products: PyTree) -> HutchinsonEstimate:
  """Hutchinson's estimates and their standard errors from probes and their products.

  With ``K`` Rademacher probes ``zₖ`` and their products ``H zₖ`` (leading axis ``K`` on
  every leaf): ``dₖ = zₖ ⊙ H zₖ``, ``diag = d̄ = (1/K) Σₖ dₖ``, ``trace = Σᵢ d̄ᵢ``.

  **Standard error.** A probe's variance is ``Var[zᵀHz] = 2 Σ_{i≠j} Hᵢⱼ² = 2(‖H‖_F² −
  Σᵢ Hᵢᵢ²)`` (Hutchinson 1990; Avron & Toledo 2011). Both terms are estimated from all ``P``
  coordinates of the ``K`` products rather than from the ``K`` scalars ``zₖᵀHzₖ`` alone:
  ``E‖H zₖ‖² = ‖H‖_F²`` (as ``E[zzᵀ] = I``) and ``E‖d̄‖² = Σᵢ Hᵢᵢ² + Σ_{i≠j} Hᵢⱼ² / K``, so

      v̂ = 2K/(K−1) · ((1/K) Σₖ ‖H zₖ‖² − ‖d̄‖²)

  is unbiased for the per-probe variance (clipped at 0), and ``trace_stderr = √(v̂/K)``.
  Pooling the ``P`` coordinates makes ``v̂`` far steadier than the sample variance of
  ``K`` scalars. With one probe the diagonal term cannot be separated and ``v̂ = 2‖Hz‖²``,
  an upper bound in expectation. The per-leaf ``leaf_stderr`` uses the same formula on each
  leaf's coordinates: it estimates ``2 Σ_{i∈l, j≠i} Hᵢⱼ²``, which bounds the block trace's
  variance ``2 Σ_{i,j∈l, i≠j} Hᵢⱼ² + Σ_{i∈l, j∉l} Hᵢⱼ²`` from above (by the coupling to the
  other leaves).

  Coverage: ``zᵀHz`` is a Rademacher chaos, skewed when a few eigenvalues dominate ``H``
  (then ``zᵀHz ≈ λ₁ (v₁ᵀz)²``, a scaled χ²₁). With ``K ≥ 8`` the interval
  ``trace ± 2·trace_stderr`` covers ``tr(H)`` in about 92% (rank-one ``H``, the worst case)
  to 95% (many comparable eigenvalues) of draws; with ``K = 1`` the interval collapses
  exactly when ``v₁ᵀz ≈ 0`` and covers only ~75% in the rank-one case. ``docs/fidelity.md``
  has the coverage measured on real networks.

  Args:
    probes: the probes ``zₖ`` (entries ±1), leaves ``[K, *shape]``.
    products: ``H zₖ``, the same structure.

  Returns:
    A :class:`HutchinsonEstimate`.
  """
  k = int(jax.tree.leaves(probes)[0].shape[0])
  samples = jax.tree.map(lambda z, hz: z.astype(_F32) * hz.astype(_F32), probes, products)
  sum_d2 = jax.tree.map(lambda d: jnp.sum(jnp.square(d), axis=0), samples)
  # Σₖ ‖H zₖ‖² of a leaf is the sum of its Σₖ dₖ² entries (dₖ² = (H zₖ)², as zₖ = ±1).
  sum_hz2 = jax.tree.map(jnp.sum, sum_d2)
  sum_d = jax.tree.map(lambda d: jnp.sum(d, axis=0), samples)
  return _from_sums(k, sum_d, sum_d2, sum_hz2, samples)


def _sumsq(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x))


def _from_sums(
  k: int, sum_d: PyTree, sum_d2: PyTree, sum_hz2: PyTree, samples: PyTree
) -> HutchinsonEstimate:
  """The estimate from its sums over the ``K`` probes: ``Σₖ dₖ``, ``Σₖ dₖ²`` (per entry)
  and ``Σₖ ‖H zₖ‖²`` (per leaf); see :func:`trace_estimate`."""
  diag = jax.tree.map(lambda s: s / k, sum_d)
  hz_sq = jax.tree.map(lambda s: s / k, sum_hz2)
  diag_sq = jax.tree.map(_sumsq, diag)
  leaf_tr = jax.tree.map(jnp.sum, diag)
  leaf_var = jax.tree.map(lambda a, b: _variance(k, a, b), hz_sq, diag_sq)
  var = _variance(k, optax.tree.sum(hz_sq), optax.tree.sum(diag_sq))
  if k == 1:
    diag_var = jax.tree.map(lambda d: jnp.full(d.shape, jnp.inf, _F32), diag)
  else:
    diag_var = jax.tree.map(
      lambda s2, d: jnp.maximum(s2 / k - jnp.square(d), 0.0) / (k - 1), sum_d2, diag
    )
  return HutchinsonEstimate(
    trace=jnp.asarray(optax.tree.sum(leaf_tr), _F32),
    trace_stderr=jnp.sqrt(var / k).astype(_F32),
    diag=diag,
    leaf_traces=leaf_tr,
    leaf_stderr=jax.tree.map(lambda v: jnp.sqrt(v / k), leaf_var),
    samples=samples,
    diag_variance=diag_var,
  )


def _probe_words(key: jax.Array, shape: tuple[int, ...], k: int) -> jax.Array:
  """The random words for ``k`` probes of a leaf of ``shape`` (32 signs per word)."""
  return jax.random.bits(key, (max(-(-k * math.prod(shape) // 32), 1),), jnp.uint32)


def _probe_slice(words: jax.Array, shape: tuple[int, ...], start: int, stop: int) -> Any:
  """``(words[w0:w1], offset)``: the words that hold probes ``start..stop−1``' bits."""
  n = math.prod(shape)
  w0 = start * n // 32
  return words[w0 : max(-(-stop * n // 32), w0 + 1)], start * n - 32 * w0


def _expand(words: jax.Array, offset: int, shape: tuple[int, ...], count: int, dtype: Any) -> Any:
  """Probes ``[count, *shape]`` of ±1 entries from their words, bit ``j`` of word ``w``
  at flat position ``32w + j − offset``."""
  n = count * math.prod(shape)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
  return (2 * bits.reshape(-1)[offset : offset + n].astype(dtype) - 1).reshape(count, *shape)


def _turn_sums(sums: tuple[list, list], z: list, hz: list) -> tuple[list, list]:
  """``(Σ d, Σ d²)`` with this turn's ``dₖ = zₖ ⊙ H zₖ`` added (over its probe axis)."""
  sum_d, sum_d2 = sums
  d = [a.astype(_F32) * b.astype(_F32) for a, b in zip(z, hz, strict=True)]
  sum_d = [s + jnp.sum(x, 0) for s, x in zip(sum_d, d, strict=True)]
  # dₖ² = (Hzₖ)² exactly, as zₖ = ±1: this pass need not read the probes.
  sq = [jnp.square(b.astype(_F32)) for b in hz]
  sum_d2 = [s + jnp.sum(x, 0) for s, x in zip(sum_d2, sq, strict=True)]
  return sum_d, sum_d2


def _add_turn(sum_d: list, sum_d2: list, z: list, hz: list, words: jax.Array) -> tuple[list, list]:
  """:func:`_turn_sums`, on XLA:CPU inside a conditional whose predicate XLA cannot fold.

  Left to itself, XLA:CPU fuses the sums of all turns into every fusion that reads them
  (the moving average of the diagonal, its variance, the per-leaf traces), each of which
  then reads all ``2K`` products of a Dense kernel again, and in the transposed order in
  which the kernel-gradient ``dot`` leaves them (``jvp(transpose(...))``: ``[out, in]``
  for an ``[in, out]`` kernel), one cache line per float. An ``optimization_barrier``
  orders the turns but is expanded into control dependencies before fusion, so it does
  not stop this. A branch is a computation of its own, so the sums are materialised each
  turn, from products that are still in the cache, and no later fusion reads the
  products. The predicate ``min(w, 0) == 0`` holds for every unsigned word ``w`` of the
  probes, so the other branch (the sums unchanged) is never taken, but it is not a
  constant XLA folds. On the MNIST MLP (8 probes) the instruments' ``hess_trace`` plus
  ``tic_diag`` step went from 193 to 93 ms over its loss-only step with a one-trip loop in
  place of the branch (2-core CPU, one process, interleaved), and the branch took the
  ``business`` and ``full`` presets another 11–14 % lower (99 against 112 ms, 109
  against 127 ms); on the 3c3d CNN the ``business`` preset's went from 2908 to 2753 ms
  with the loop, 2402 against 2427 ms for the branch against the loop. Other backends
  add the terms directly (``lax.platform_dependent``)."""

  def branched(sum_d: list, sum_d2: list, z: list, hz: list, words: jax.Array) -> tuple:
    always = jnp.minimum(words.reshape(-1)[0], jnp.uint32(0)) == 0
    return lax.cond(always, lambda: _turn_sums((sum_d, sum_d2), z, hz), lambda: (sum_d, sum_d2))

  def direct(sum_d: list, sum_d2: list, z: list, hz: list, words: jax.Array) -> tuple:
    del words
    return _turn_sums((sum_d, sum_d2), z, hz)

  return lax.platform_dependent(sum_d, sum_d2, z, hz, words, cpu=branched, default=direct)


def streamed_estimate(
  hvp: Hvp, params: PyTree, key: jax.Array, num_probes: int, *, chunk: int = 1
) -> tuple[HutchinsonEstimate, PyTree]:
  """:func:`hutchinson_estimate` with the probes pushed through ``hvp`` ``chunk`` at a time.

  The probes are those of :func:`probes_like` ``(params, key, num_probes)``, entry for
  entry, but each turn expands only its own from the random words, and the estimate's
  per-entry sums (``Σₖ zₖ ⊙ H zₖ`` and its square) are added up as the products come
  (:func:`_add_turn`); a leaf's ``Σₖ ‖H zₖ‖²`` is the sum of the second.
  Each turn's probes wait for the previous turn's products (``optimization_barrier``),
  so at most ``chunk`` probes and products are live at once: no ``[K, P]`` array is
  formed. On the MNIST MLP (1.3 M parameters, batch 128, 8 probes) the instruments'
  ``hess_trace`` step went from 146–149 ms to 109 ms (its loss-only form: 6–9 ms; 2-core
  CPU, one process), against forming the probes and products and reducing them.

  Args:
    hvp: ``v ↦ H v``, e.g. a linearisation (:func:`jaxscope.metrics.hvp.linearize_grad`).
    params: the parameters (structure, shapes and dtypes of the probes).
    key: PRNG key of the probes.
    num_probes: ``K`` (static, ≥ 1).
    chunk: probes per turn (``vmap`` over them).

  Returns:
    ``(estimate, last)``: the :class:`HutchinsonEstimate` (``samples`` is ``None``) and the
    last turn's products, for a caller to order further products after them.
  """
  if not isinstance(num_probes, int) or num_probes < 1:
    raise ValueError(f"hutchinson: num_probes must be a positive int, got {num_probes!r}.")
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"hutchinson: chunk must be a positive int, got {chunk!r}.")
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  shapes = [tuple(x.shape) for x in leaves]
  words = [_probe_words(k, s, num_probes) for k, s in zip(keys, shapes, strict=False)]
  sum_d = [jnp.zeros(s, _F32) for s in shapes]
  sum_d2 = [jnp.zeros(s, _F32) for s in shapes]
  last = None
  for start in range(0, num_probes, chunk):
    stop = min(start + chunk, num_probes)
    parts = [_probe_slice(w, s, start, stop) for w, s in zip(words, shapes, strict=True)]
    turn = [w for w, _ in parts]
    if last is not None:
      turn, _ = lax.optimization_barrier((turn, last))
    z = [
      _expand(w, off, s, stop - start, x.dtype)
      for w, (_, off), s, x in zip(turn, parts, shapes, leaves, strict=True)
    ]
    if stop - start == 1:  # Without vmap: 8 probes through a linearisation with a batch
      # axis of 1 took 22 ms longer on the MNIST MLP (XLA:CPU's matmuls with that axis).
      hz = [a[None] for a in jax.tree.leaves(hvp(jax.tree.unflatten(treedef, [a[0] for a in z])))]
    else:
      hz = jax.tree.leaves(jax.vmap(hvp)(jax.tree.unflatten(treedef, z)))
    last = hz
    sum_d, sum_d2 = _add_turn(sum_d, sum_d2, z, hz, turn[0])
  # Σₖ ‖H zₖ‖² of a leaf is the sum of its Σₖ (H zₖ)² entries: no pass over the products.
  sum_hz2 = [jnp.sum(s) for s in sum_d2]
  unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
  est = _from_sums(num_probes, unflat(sum_d), unflat(sum_d2), unflat(sum_hz2), None)
  return est, unflat(last)


def hutchinson_estimate(
  hvp: Hvp, params: PyTree, key: jax.Array, num_probes: int = 8, *, batch_size: int | None = None
) -> HutchinsonEstimate:
  """Hutchinson estimates of ``tr(H)`` and ``diag(H)`` with standard errors.

  ``num_probes`` Rademacher probes (:func:`probes_like`) are pushed through ``hvp`` with
  ``jax.vmap`` (``batch_size`` at a time with ``lax.map``, to bound memory) and combined by
  :func:`trace_estimate` (estimators, variances and coverage there).

  Args:
    hvp: ``v ↦ H v``.
    params: the parameters (structure, shapes and dtypes of the probes).
    key: PRNG key of the probes.
    num_probes: ``K`` (static, ≥ 1; ≥ 8 for error bars that cover, see
      :func:`trace_estimate`).
    batch_size: probes per ``vmap`` batch; ``None``: all ``K`` at once.

  Returns:
    A :class:`HutchinsonEstimate`.
  """
  if not isinstance(num_probes, int) or num_probes < 1:
    raise ValueError(f"hutchinson: num_probes must be a positive int, got {num_probes!r}.")
  probes = probes_like(params, key, num_probes)
  if batch_size is None or batch_size >= num_probes:
    prods = jax.vmap(hvp)(probes)
  else:
    prods = lax.map(hvp, probes, batch_size=batch_size)
  return trace_estimate(probes, prods)


def hutchinson(
  hvp: Hvp, params: PyTree, key: jax.Array, num_probes: int = 1, *, batch_size: int | None = None
) -> tuple[jax.Array, PyTree]:
  """Hutchinson estimates of the Hessian trace and diagonal.

  With ``K`` Rademacher probes ``zₖ`` (entries ±1 with probability ½, independent):

  * ``tr(H) ≈ (1/K) Σₖ zₖᵀ H zₖ`` (Hutchinson 1990),
  * ``diag(H) ≈ (1/K) Σₖ zₖ ⊙ H zₖ`` (Bekas, Kokiopoulou & Saad 2007),

  both unbiased. Variances, per probe (divide by ``K`` for the mean):
  ``Var[zᵀHz] = 2 (‖H‖_F² − Σᵢ Hᵢᵢ²) = 2 Σ_{i≠j} Hᵢⱼ²`` and
  ``Var[(z ⊙ Hz)ᵢ] = Σ_{j≠i} Hᵢⱼ²`` (Rademacher probes have the smallest variance of all
  i.i.d. zero-mean unit-variance probes; an exactly diagonal ``H`` is recovered from one
  probe). The trace is the sum of the diagonal estimate, and summing it per leaf
  (:func:`leaf_traces`) gives unbiased per-layer traces ``tr(H_ll)`` of the diagonal
  blocks, Cockpit's per-layer ``HessTrace``. :func:`hutchinson_estimate` returns the same
  estimates with their standard errors.

  Args:
    hvp: ``v ↦ H v``.
    params: the parameters (structure, shapes and dtypes of the probes).
    key: PRNG key of the probes.
    num_probes: ``K`` (static, ≥ 1).
    batch_size: probes per ``vmap`` batch; ``None``: all ``K`` at once.

  Returns:
    ``(trace, diag)``: the ``float32`` trace estimate and the diagonal estimate, a pytree
    like ``params`` (in its dtypes).
  """
  est = hutchinson_estimate(hvp, params, key, num_probes, batch_size=batch_size)
  return est.trace, jax.tree.map(lambda d, p: d.astype(p.dtype), est.diag, params)


def leaf_traces(diag: PyTree) -> PyTree:
  """Per-leaf (per-layer) traces ``tr(H_ll) = Σ_{i ∈ l} Hᵢᵢ`` from a Hessian diagonal.

  Args:
    diag: a (possibly estimated) Hessian diagonal, a pytree like the parameters, from
      :func:`hutchinson` or :func:`exact_hessian_diagonal`.

  Returns:
    A pytree of ``float32`` scalars with the same structure.
  """
  return jax.tree.map(lambda d: jnp.sum(d.astype(_F32)), diag)


def exact_hessian_diagonal(
  hvp: Hvp,
  params: PyTree,
  *,
  chunk: int = 64,
  max_params: int = 100_000,
  with_row_norm: bool = False,
) -> PyTree | tuple[PyTree, PyTree]:
  """The exact Hessian diagonal ``Hᵢᵢ = eᵢᵀ H eᵢ``, from ``P`` one-hot HVPs.

  The ``P`` unit vectors are pushed through ``hvp`` ``chunk`` at a time (``jax.vmap``
  inside ``lax.map``), so the cost is ``P`` HVPs and the memory ``chunk × P``: only for
  small models (a reference for :func:`hutchinson`, or Cockpit's exact ``HessTrace`` on a
  toy problem).

  Args:
    hvp: ``v ↦ H v``.
    params: the parameters (structure, shapes and dtypes).
    chunk: one-hot vectors per ``vmap`` batch (static, ≥ 1).
    max_params: refuse models with more parameters than this.
    with_row_norm: also return the row norms ``‖Hᵢ,:‖₂`` (from the same products, free):
      the scale of the float32 rounding error of ``Hᵢᵢ``, about ``ε₃₂ ‖Hᵢ,:‖₂`` (measured on
      the digits MLP: every entry's error below ``0.6 ε₃₂ ‖Hᵢ,:‖₂``).

  Returns:
    The diagonal, a pytree like ``params``; with ``with_row_norm``, ``(diag, row_norm)``.

  Raises:
    ValueError: when the model has more than ``max_params`` parameters.
  """
  p = _num_params(params)
  if p > max_params:
    raise ValueError(
      f"exact_hessian_diagonal: the model has {p} parameters, more than max_params="
      f"{max_params}; it needs one HVP per parameter. Use hutchinson() instead, or raise "
      "max_params."
    )
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"exact_hessian_diagonal: chunk must be a positive int, got {chunk!r}.")
  flat, unravel = ravel_pytree(params)
  chunk = min(chunk, max(p, 1))
  n_chunks = -(-p // chunk)
  idx = jnp.arange(n_chunks * chunk, dtype=jnp.int32).reshape(n_chunks, chunk)

  def entry(i: jax.Array) -> tuple[jax.Array, jax.Array]:
    e = jax.nn.one_hot(i, p, dtype=flat.dtype)  # Zero vector for the padding i >= P.
    he, _ = ravel_pytree(hvp(unravel(e)))
    return jnp.take(he, jnp.minimum(i, p - 1)), jnp.sqrt(jnp.sum(jnp.square(he.astype(_F32))))

  diag, row_norm = lax.map(jax.vmap(entry), idx)
  diag = unravel(diag.reshape(-1)[:p].astype(flat.dtype))
  if not with_row_norm:
    return diag
  return diag, unravel(row_norm.reshape(-1)[:p].astype(flat.dtype))
