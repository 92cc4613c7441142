"""Gradient noise: per-example gradient statistics without materialising ``B × P`` gradients.

Conventions (Cockpit's, Schneider et al. 2021): the mini-batch loss is the mean of the
individual losses, ``L = (1/B) Σᵢ ℓᵢ``; ``gᵢ = ∇ℓᵢ`` is the gradient of example ``i``'s loss
and ``g = (1/B) Σᵢ gᵢ`` the mini-batch gradient. Everything below is computed from four
*sufficient statistics* of the ``gᵢ``:

* ``sq_norms``: ``‖gᵢ‖²`` per example (``[B]``),
* ``projections``: ``gᵢᵀv`` per example for a direction ``v`` (``[B]``; one forward-mode
  pass per direction, :func:`projections`),
* ``second_moment``: the uncentred second moment ``M = (1/B) Σᵢ gᵢ ⊙ gᵢ`` (a pytree like
  the parameters),
* ``grad``: ``g``.

:func:`per_example_moments` (:mod:`jaxscope.metrics.per_example`) forms ``sq_norms`` and
``M`` by the cheapest exact route: outer products for Dense layers, patches for
convolutions, chunked ``vmap(grad)`` for every other parameter. All of them assume that
example ``i``'s loss depends on the batch only through example ``i`` (no BatchNorm in
training mode, no in-batch contrastive losses).

The tests below follow Cockpit's formulas (``cockpit/quantities/*.py`` at v1.0.2), with
its batch-size conventions spelled out in each docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxscope.metrics.per_example import (
  ConvLayer,
  DenseLayer,
  PerExampleMoments,
  conv_layers,
  dense_layers,
  per_example_moments,
)

__all__ = [
  "ConvLayer",
  "DenseLayer",
  "HistogramSample",
  "PerExampleMoments",
  "cabs",
  "conv_layers",
  "dense_layers",
  "dense_projections",
  "early_stopping",
  "gradient_variance",
  "histogram_range",
  "histogram_sample",
  "inner_test",
  "layer_projections",
  "mean_gsnr",
  "norm_test",
  "ortho_test",
  "per_example_moments",
  "projections",
  "sampled_histogram",
  "sampled_histogram_2d",
  "weighted_histogram",
  "weighted_histogram_2d",
]

_F32 = jnp.float32


# --------------------------------------------------------------------------- the tests


def _safe_sqrt(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(x, 0.0))


def norm_test(sq_norms: jax.Array, grad_sq_norm: jax.Array) -> jax.Array:
  """The largest θ for which the norm test (Byrd et al. 2012, eq. 3.9) passes.

  ``Var₁ = (Σᵢ ‖gᵢ‖² − B‖g‖²)/(B − 1) = Σᵢ ‖gᵢ − g‖²/(B − 1)`` (the sample variance's
  ℓ₁ norm) and ``θ = √(Var₁ / (B‖g‖²))``. Small θ: the gradient's direction is reliable at
  this batch size; θ > 1: noise dominates. (Cockpit ``NormTest``.)

  Args:
    sq_norms: ``[B]`` per-example squared gradient norms ``‖gᵢ‖²``.
    grad_sq_norm: ``‖g‖²`` of the mini-batch gradient.

  Returns:
    θ (float32 scalar); a negative variance from rounding is clamped to 0.
  """
  b = sq_norms.shape[0]
  var = (jnp.sum(sq_norms) - b * grad_sq_norm) / (b - 1)
  return _safe_sqrt(var / (b * grad_sq_norm)).astype(_F32)


def inner_test(projections_on_grad: jax.Array, grad_sq_norm: jax.Array) -> jax.Array:
  """The largest θ for which the inner-product test (Bollapragada et al. 2017, eq. 2.6) passes.

  With projections ``pᵢ = gᵢᵀg``: ``Var = (Σᵢ pᵢ² − B‖g‖⁴)/(B − 1)`` (the sample variance of
  the ``pᵢ``, whose mean is ``‖g‖²``) and ``θ = √(Var / (B‖g‖⁴))``. (Cockpit ``InnerTest``.)

  Args:
    projections_on_grad: ``[B]`` values ``gᵢᵀg``.
    grad_sq_norm: ``‖g‖²``.
  """
  b = projections_on_grad.shape[0]
  var = (jnp.sum(projections_on_grad**2) - b * grad_sq_norm**2) / (b - 1)
  return _safe_sqrt(var / (b * grad_sq_norm**2)).astype(_F32)


def ortho_test(
  sq_norms: jax.Array, projections_on_grad: jax.Array, grad_sq_norm: jax.Array
) -> jax.Array:
  """The largest ν for which the orthogonality test (Bollapragada et al. 2017, eq. 3.3) passes.

  The variance of the components of ``gᵢ`` orthogonal to ``g``:
  ``Var⊥ = (Σᵢ ‖gᵢ‖² − Σᵢ pᵢ²/‖g‖²)/(B − 1)`` with ``pᵢ = gᵢᵀg``, and
  ``ν = √(Var⊥ / (B‖g‖²))``. (Cockpit ``OrthoTest``.)
  """
  b = sq_norms.shape[0]
  var = (jnp.sum(sq_norms) - jnp.sum(projections_on_grad**2) / grad_sq_norm) / (b - 1)
  return _safe_sqrt(var / (b * grad_sq_norm)).astype(_F32)


def _tree_sum(fn: Callable[..., jax.Array], *trees: Any) -> jax.Array:
  parts = jax.tree.leaves(jax.tree.map(lambda *xs: jnp.sum(fn(*xs)), *trees))
  return jnp.sum(jnp.stack(parts)) if len(parts) > 1 else parts[0]


def _tree_size(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def gradient_variance(grad: Any, second_moment: Any) -> Any:
  """Per-entry variance of the per-example gradients, ``Var(gᵢ) = M − g⊙g`` (a pytree).

  The biased (``1/B``) estimator, as Cockpit's ``MeanGSNR``; multiply by ``B/(B − 1)``
  for the unbiased one. The mini-batch gradient's own variance is ``Var(gᵢ)/B``.
  """
  return jax.tree.map(lambda m, g: m - g * g, second_moment, grad)


def mean_gsnr(grad: Any, second_moment: Any, eps: float = 1e-5) -> jax.Array:
  """Mean gradient signal-to-noise ratio (Liu et al. 2020) as Cockpit computes it.

  ``GSNR_j = g_j² / (M_j − g_j² + ε)``, averaged over all ``P`` parameters. The denominator
  is the per-*example* variance ``(1/B)Σᵢ gᵢⱼ² − gⱼ²`` (not the variance of the mini-batch
  mean): this is Cockpit's scaling, which its users questioned (cockpit issue #28; Liu et
  al. define the ratio with the variance over *samples*, which is this one). Multiply by
  ``B`` for the SNR of the mini-batch gradient.
  """
  total = _tree_sum(lambda g, m: (g * g) / (m - g * g + eps), grad, second_moment)
  return (total / _tree_size(grad)).astype(_F32)


def cabs(
  grad: Any, second_moment: Any, loss: jax.Array, learning_rate: jax.Array | float
) -> jax.Array:
  """Batch size suggested by CABS (Balles, Romero & Hennig 2017, eq. 22).

  ``B_CABS = η · tr(Σ) / L`` with the per-example gradient covariance trace
  ``tr(Σ) = Σⱼ (Mⱼ − gⱼ²)`` and the mini-batch loss ``L``; derived for SGD without
  momentum at learning rate ``η``. (Cockpit ``CABS``: ``η (B·ΣM − B‖g‖²)/(B·L)``, the same.)
  """
  trace = _tree_sum(lambda g, m: m - g * g, grad, second_moment)
  return (learning_rate * trace / loss).astype(_F32)


def early_stopping(grad: Any, second_moment: Any, batch_size: int, eps: float = 1e-5) -> jax.Array:
  """Evidence-based early-stopping criterion (Mahsereci et al. 2017, eq. 7, left side).

  ``Var_j = (B·M_j − B·g_j²)/(B − 1)`` (unbiased per-example variance),
  ``SNR_j = g_j² / (Var_j + ε)`` and the criterion ``1 − B · mean_j SNR_j``; a value
  above 0 says "stop": the gradient is indistinguishable from noise. For SGD without
  momentum. (Cockpit ``EarlyStopping``.)
  """
  b = batch_size
  total = _tree_sum(lambda g, m: (g * g) / (b * (m - g * g) / (b - 1) + eps), grad, second_moment)
  return (1.0 - b * total / _tree_size(grad)).astype(_F32)


# --------------------------------------------------------------------------- projections


def projections(
  losses_fn: Callable[..., Any],
  params: Any,
  args: Sequence[Any],
  tangents: Any,
  *,
  has_aux: bool = False,
) -> jax.Array:
  """Per-example directional derivatives ``gᵢᵀvₖ`` for ``k`` directions at once: ``[k, B]``.

  One forward-mode pass (``jax.jvp`` of the per-example losses) per direction, the ``k``
  directions batched by ``vmap``; no per-example gradient is formed. This gives the
  inner-product test (``v = g``) and Cockpit's α (``v`` = the update) for any layer type.

  Args:
    losses_fn: ``losses_fn(params, *args) -> [B]`` individual losses (``(losses, aux)``
      if ``has_aux``).
    params: the parameters.
    args: the batch arguments.
    tangents: a pytree like ``params`` whose leaves have a leading axis ``k``.
    has_aux: whether ``losses_fn`` returns ``(losses, aux)``.
  """

  def fn(p: Any) -> jax.Array:
    out = losses_fn(p, *args)
    return out[0] if has_aux else out

  def one(t: Any) -> jax.Array:
    return jax.jvp(fn, (params,), (t,))[1]

  return jax.vmap(one)(tangents)


def layer_projections(
  dense: Sequence[DenseLayer], convs: Sequence[Any], tangent_leaves: Sequence[jax.Array]
) -> jax.Array:
  """Per-example ``gᵢᵀv`` restricted to captured Dense and Conv leaves: ``[k, B]``.

  Dense layers as in :func:`dense_projections`; a convolution contracts its per-example
  gradients ``Gᵢ`` (:class:`ConvLayer`) with the direction: ``Σ_kc Gᵢ[k, c] V[k, c]``.
  """
  total = dense_projections(dense, tangent_leaves) if dense else None
  for conv in convs:
    _, k, c = conv.kernel_grads.shape
    v = tangent_leaves[conv.kernel].astype(_F32)
    part = jnp.einsum("bkc,nkc->nb", conv.kernel_grads, v.reshape(v.shape[0], k, c))
    if conv.bias is not None:
      part = part + jnp.einsum("bc,nc->nb", conv.bias_grads, tangent_leaves[conv.bias])
    total = part if total is None else total + part
  if total is None:
    raise ValueError("layer_projections: no Dense or Conv layer given.")
  return total


def dense_projections(
  dense: Sequence[DenseLayer], tangent_leaves: Sequence[jax.Array]
) -> jax.Array:
  """Per-example ``gᵢᵀv`` restricted to the Dense layers' leaves, for ``k`` directions: ``[k, B]``.

  ``gᵢ(W)ᵀV = xᵢᵀ V δᵢ`` and ``gᵢ(b)ᵀv_b = δᵢᵀ v_b`` (``δᵢ = B·∂L/∂yᵢ``): one ``[B, in] ×
  [in, out]`` product per layer and direction, no forward pass.

  Args:
    dense: the captured Dense layers.
    tangent_leaves: ``jax.tree.leaves`` of the directions, each with a leading axis ``k``.
  """
  total = None
  for layer in dense:
    x = layer.inputs.astype(_F32)
    d = layer.output_grads.astype(_F32) * x.shape[0]
    v = tangent_leaves[layer.kernel].astype(_F32)  # [k, in, out]
    part = jnp.einsum("bi,kio,bo->kb", x, v, d)
    if layer.bias is not None:
      part = part + jnp.einsum("ko,bo->kb", tangent_leaves[layer.bias].astype(_F32), d)
    total = part if total is None else total + part
  if total is None:
    raise ValueError("dense_projections: no Dense layer given.")
  return total


# --------------------------------------------------------------------------- histograms


class HistogramSample(NamedTuple):
  """A static sample of parameter coordinates for histograms of per-example gradients.

  Histogramming all ``B·P`` per-example gradient entries (Cockpit's ``GradHist1d``: 2.4 s
  per MNIST-MLP step on 2 cores) costs far more than a training step. Leaf ``l`` (``n_l``
  coordinates) contributes a uniform sample without replacement of ``s_l`` of its
  coordinates (all ``B`` examples each); an entry of leaf ``l`` then counts
  ``w_l = n_l / s_l`` times (:attr:`leaf_weights`), so :func:`sampled_histogram` estimates
  the full histogram without bias and is exact for leaves with ``s_l = n_l``.
  """

  indices: tuple[np.ndarray, ...]
  """Per leaf, the sampled flat indices (sorted; empty for leaves left out)."""
  weights: np.ndarray
  """``[S]`` the weight ``n_l / s_l`` of each sampled coordinate (leaf by leaf)."""
  sizes: tuple[int, ...] = ()
  """Per leaf, its number of coordinates ``n_l`` (``()``: derived from ``weights``)."""

  @property
  def leaf_sampled(self) -> tuple[int, ...]:
    """Per leaf, the number ``s_l`` of sampled coordinates (``S = Σ_l s_l``)."""
    return tuple(len(i) for i in self.indices)

  @property
  def leaf_weights(self) -> np.ndarray:
    """``float64[L]``: per leaf, ``w_l = n_l / s_l`` (1 for a leaf with ``s_l = 0``)."""
    counts = self.leaf_sampled
    if self.sizes:
      return np.array([n / s if s else 1.0 for n, s in zip(self.sizes, counts, strict=True)])
    offsets = np.cumsum((0, *counts))[:-1]
    w = np.asarray(self.weights, np.float64)
    return np.array([w[o] if s else 1.0 for o, s in zip(offsets, counts, strict=True)])


def histogram_sample(params: Any, size: int, seed: int = 0) -> HistogramSample:
  """Draws ``≈ size`` coordinates, each leaf getting ``max(1, round(size·n_l/P))`` of them.

  Leaf ``l`` gets ``s_l = min(n_l, max(1, round(size·n_l/P)))`` coordinates drawn uniformly
  without replacement (all of them when ``s_l = n_l``), and the weight ``n_l / s_l``.

  Args:
    params: the parameters (arrays or ``ShapeDtypeStruct``).
    size: the total number of sampled coordinates.
    seed: the numpy seed (the sample is fixed for the whole run).
  """
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"histogram_sample: size must be a positive int, got {size!r}.")
  leaves = jax.tree.leaves(params)
  sizes = tuple(math.prod(x.shape) for x in leaves)
  total = max(sum(sizes), 1)
  rng = np.random.default_rng(seed)
  indices, weights = [], []
  for n in sizes:
    s = min(n, max(1, round(size * n / total)))
    idx = np.sort(rng.choice(n, size=s, replace=False)) if s < n else np.arange(n)
    indices.append(idx.astype(np.int32))
    weights.append(np.full(s, n / s if s else 1.0, np.float32))
  weights_all = np.concatenate(weights) if weights else np.zeros(0, np.float32)
  return HistogramSample(tuple(indices), weights_all, sizes)


def _sym_range(x: jax.Array) -> jax.Array:
  """A symmetric range ``±max|x|`` over finite entries (``±1`` when none or all zero)."""
  m = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0))
  return jnp.where(m > 0, m, 1.0)


def weighted_histogram(
  values: jax.Array, weights: jax.Array, bins: int, limit: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Histogram of ``values`` (any shape) with per-entry ``weights`` on ``[−limit, limit]``.

  ``limit`` defaults to the largest finite ``|value|``; non-finite entries are not counted.
  Returns ``{"counts": float32[bins], "edges": float32[bins + 1]}``.
  """
  v = values.reshape(-1).astype(_F32)
  w = jnp.broadcast_to(weights, values.shape).reshape(-1).astype(_F32)
  lim = _sym_range(v) if limit is None else jnp.asarray(limit, _F32)
  idx = jnp.clip(jnp.floor((v + lim) * (bins / (2 * lim))).astype(jnp.int32), 0, bins - 1)
  w = jnp.where(jnp.isfinite(v) & (jnp.abs(v) <= lim), w, 0.0)
  counts = jnp.zeros((bins,), _F32).at[idx].add(w, mode="promise_in_bounds")
  return {"counts": counts, "edges": jnp.linspace(-lim, lim, bins + 1, dtype=_F32)}


def weighted_histogram_2d(
  x: jax.Array, y: jax.Array, weights: jax.Array, bins: tuple[int, int]
) -> dict[str, jax.Array]:
  """2-D histogram of the pairs ``(x, y)`` (same shape) with ``weights``, symmetric ranges.

  Returns ``counts`` ``float32[bins_x, bins_y]``, ``x_edges`` and ``y_edges``.
  """
  bx, by = bins
  xv = x.reshape(-1).astype(_F32)
  yv = y.reshape(-1).astype(_F32)
  w = jnp.broadcast_to(weights, x.shape).reshape(-1).astype(_F32)
  lx, ly = _sym_range(xv), _sym_range(yv)
  ix = jnp.clip(jnp.floor((xv + lx) * (bx / (2 * lx))).astype(jnp.int32), 0, bx - 1)
  iy = jnp.clip(jnp.floor((yv + ly) * (by / (2 * ly))).astype(jnp.int32), 0, by - 1)
  w = jnp.where(jnp.isfinite(xv) & jnp.isfinite(yv), w, 0.0)
  counts = jnp.zeros((bx * by,), _F32).at[ix * by + iy].add(w, mode="promise_in_bounds")
  return {
    "counts": counts.reshape(bx, by),
    "x_edges": jnp.linspace(-lx, lx, bx + 1, dtype=_F32),
    "y_edges": jnp.linspace(-ly, ly, by + 1, dtype=_F32),
  }


# --------------------------------------------------------------------------- exact per-leaf counts


def histogram_range(values: jax.Array, pad: float = 0.2) -> jax.Array:
  """A symmetric range ``[−r, r]``, ``r = (1 + pad)·max|x|`` over the finite entries of ``values``.

  Meant for the first measured step: the caller keeps the result (e.g. in its state) and
  passes it as ``range`` to :func:`sampled_histogram` / :func:`sampled_histogram_2d` at every
  later step, so that the bins stay the same and compare across steps; later entries outside
  it are clamped into the edge bins. This is Cockpit's ``GradAbsMax`` / ``ParamAbsMax`` bin
  adaptation (``±(1 + padding)·max|x|``; ``padding`` defaults to 0 there) applied once; the
  padding leaves room for the entries to grow.

  Args:
    values: any shape and float dtype; NaN and ±Inf entries are ignored.
    pad: the relative padding, ``≥ 0``.

  Returns:
    ``float32[2]``: ``(lo, hi) = (−r, r)``, or ``(−1, 1)`` when no entry is finite and
    non-zero.
  """
  if not pad >= 0:
    raise ValueError(f"histogram_range: pad must be >= 0, got {pad!r}.")
  x = jnp.asarray(values).astype(_F32)
  r = (1.0 + pad) * jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0), initial=0.0)
  r = jnp.where(jnp.isfinite(r) & (r > 0), r, 1.0)  # all zero, or (1 + pad)·max overflowed
  return jnp.stack([-r, r]).astype(_F32)


def _check_range(rng: Any, name: str) -> tuple[jax.Array, jax.Array]:
  """``(lo, hi)`` as float32 scalars; ``lo < hi`` is checked when they are concrete."""
  lo, hi = rng[0], rng[1]
  try:
    ok = float(lo) < float(hi)
  except TypeError:  # traced: checked by the caller's construction (histogram_range)
    ok = True
  if not ok:
    raise ValueError(f"{name} must satisfy lo < hi, got ({float(lo)!r}, {float(hi)!r}).")
  return jnp.asarray(lo, _F32), jnp.asarray(hi, _F32)


def _bin_index(
  x: jax.Array, lo: jax.Array, hi: jax.Array, bins: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(bin, finite, edges)``: the bin of each entry of ``x`` clamped into ``[lo, hi]``.

  ``edges = linspace(lo, hi, bins + 1)`` in float32 and ``x`` falls in bin ``k`` iff
  ``edges[k] ≤ x < edges[k + 1]``, the last bin closed (``numpy.histogram``'s rule, exact
  with respect to the returned edges: the rounded ``⌊(x − lo)·bins/(hi − lo)⌋`` is moved
  by one where an edge says so, as numpy does). Non-finite entries get bin 0 and
  ``finite = False``.
  """
  edges = jnp.linspace(lo, hi, bins + 1, dtype=_F32)
  finite = jnp.isfinite(x)
  xc = jnp.where(finite, jnp.clip(x, lo, hi), lo)
  k = jnp.clip(jnp.floor((xc - lo) * (bins / (hi - lo))), 0, bins - 1).astype(jnp.int32)
  k = k - (xc < edges[k]).astype(jnp.int32)
  k = k + ((xc >= edges[k + 1]) & (k < bins - 1)).astype(jnp.int32)
  return jnp.clip(k, 0, bins - 1), finite, edges


def _leaf_layout(ncols: int, sample: HistogramSample | None, name: str) -> tuple[tuple, Any]:
  """``(s_l per leaf, w_l per leaf)`` for ``ncols`` sampled columns; checks the count."""
  if sample is None:
    return (ncols,), np.ones(1)
  sampled = sample.leaf_sampled
  if sum(sampled) != ncols:
    raise ValueError(
      f"{name}: the last axis ({ncols}) must hold the sample's {sum(sampled)} coordinates "
      f"(per leaf {sampled})."
    )
  return sampled, sample.leaf_weights


def _leaf_counts(
  cells: jax.Array, finite: jax.Array, n_cells: int, layout: tuple[tuple, Any]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(leaf_counts int32[L, n_cells], counts float32[n_cells], nonfinite float32[])``.

  One ``int32`` scatter-add counts every leaf's entries (column ``j`` of ``cells`` belongs
  to the leaf that sampled it) into its own row, plus one slot per leaf for its
  non-finite entries; the rows are then weighted by ``w_l = n_l / s_l`` and summed.
  """
  sampled, weights = layout
  n_leaves = len(sampled)
  leaf_of = np.repeat(np.arange(n_leaves, dtype=np.int32), sampled) * (n_cells + 1)
  flat = leaf_of + jnp.where(finite, cells, n_cells)
  table = jnp.zeros(n_leaves * (n_cells + 1), jnp.int32)
  table = table.at[flat.reshape(-1)].add(1, mode="promise_in_bounds").reshape(n_leaves, -1)
  # Elementwise products and a sum, not a matmul: a float32 dot may run in TF32 on a GPU.
  scaled = jnp.sum(table.astype(_F32) * jnp.asarray(weights, _F32)[:, None], axis=0)
  return table[:, :n_cells], scaled[:n_cells], scaled[n_cells]


def _check_bins(bins: Any, name: str) -> None:
  if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
    raise ValueError(f"{name} must be a positive int, got {bins!r}.")


def sampled_histogram(
  values: jax.Array,
  sample: HistogramSample | None,
  bins: int,
  range: Any,
) -> dict[str, jax.Array]:
  """Histogram of per-example gradient entries from integer counts per leaf.

  ``values[..., j]`` are the entries of the sample's coordinate ``j`` (leaf by leaf,
  ``s_l`` columns for leaf ``l``: the ``samples`` of ``per_example_moments(...,
  sample=sample)``, ``[B, S]``); leading axes (the examples) are all counted.

  **Estimator.** Each leaf's entries are counted into the bins with an ``int32``
  scatter-add, ``c_l[k]`` (exact integers), and

  ``counts[k] = Σ_l w_l · c_l[k]``,  ``w_l = n_l / s_l``.

  A coordinate of leaf ``l`` is in the sample with probability ``s_l / n_l`` (uniform
  without replacement, :func:`histogram_sample`), so ``E[counts[k]] = Σ_l Σ_{j ∈ l}
  (s_l/n_l)·(n_l/s_l)·#{i : x_ij ∈ bin k}`` is the full-data count: the estimate is
  unbiased, and exact for the leaves with ``s_l = n_l``. With full data (``sample=None``
  or every ``s_l = n_l``) the counts are the exact integers (float32 holds them exactly
  below ``2²⁴`` per bin) and ``counts.sum() + nonfinite == B·P``; with a sample the
  same identity holds up to float32 rounding of the weights.

  **Bins.** ``edges = linspace(lo, hi, bins + 1)`` (float32); an entry ``x`` falls in bin
  ``k`` iff ``edges[k] ≤ x < edges[k + 1]``, the last bin closed (``numpy.histogram``'s
  rule). Entries below ``lo`` / above ``hi`` are clamped into the first / last bin, so
  nothing finite is dropped; NaN and ±Inf entries are not counted but reported in
  ``nonfinite`` (weighted like ``counts``). Full data therefore reproduce
  ``numpy.histogram(numpy.clip(x, lo, hi), bins=edges)`` exactly, and
  ``numpy.histogram(numpy.clip(x, lo, hi), bins, range=(lo, hi))`` up to entries within
  one float32 ulp of an edge (numpy rounds a float64 ``linspace`` to its float32 edges).

  **Cockpit** (``GradHist1d``, v1.0.2): 100 bins on the fixed range ``(−2, 2)``, every
  individual gradient entry ``∇ℓᵢ`` of every parameter clamped into it and counted by
  ``torch.histc`` each step (no sample). Here the entries are the same ``∇ℓᵢ`` (not
  ``∇ℓᵢ / B``); the range is the caller's, e.g. :func:`histogram_range` of the first
  measured step kept for the run, since gradient scales differ by orders of magnitude
  between models.

  Args:
    values: ``[..., S]`` per-example gradient entries at the sampled coordinates.
    sample: the :class:`HistogramSample` the columns come from, or ``None`` for one group
      of weight 1 (full data, or any array to histogram as is).
    bins: the number of bins (static).
    range: ``(lo, hi)`` with ``lo < hi``: Python numbers or float32 scalars, traced ones
      included (e.g. a range kept in a state), or a ``[2]`` array.

  Returns:
    ``counts`` ``float32[bins]``, ``edges`` ``float32[bins + 1]``, ``nonfinite``
    ``float32[]`` (the weighted number of NaN/±Inf entries) and ``leaf_counts``
    ``int32[L, bins]`` (the exact per-leaf counts ``c_l``; ``L = 1`` for ``sample=None``).
  """
  _check_bins(bins, "sampled_histogram: bins")
  lo, hi = _check_range(range, "sampled_histogram: range")
  x = jnp.asarray(values).astype(_F32)
  if x.ndim == 0:
    raise ValueError("sampled_histogram: values must have a last axis of coordinates.")
  layout = _leaf_layout(x.shape[-1], sample, "sampled_histogram: values")
  k, finite, edges = _bin_index(x, lo, hi, bins)
  leaf, counts, nonfinite = _leaf_counts(k, finite, bins, layout)
  return {"counts": counts, "edges": edges, "nonfinite": nonfinite, "leaf_counts": leaf}


def sampled_histogram_2d(
  grads: jax.Array,
  param_values: jax.Array,
  sample: HistogramSample | None,
  bins: tuple[int, int],
  grad_range: Any,
  param_range: Any,
) -> dict[str, jax.Array]:
  """2-D histogram of (per-example gradient entry, parameter value) pairs, axis order (grad, param).

  The pair ``(gᵢⱼ, θⱼ)`` of example ``i`` and sampled coordinate ``j`` is counted in cell
  ``[a, b]`` with ``a`` the bin of ``gᵢⱼ`` on ``grad_edges`` and ``b`` the bin of ``θⱼ`` on
  ``param_edges``. Counting, weighting, clamping (on each axis) and the non-finite
  report are those of :func:`sampled_histogram`: integer counts per leaf scaled by
  ``w_l = n_l / s_l``, unbiased for a sample (``E[counts]`` = the full-data counts) and
  exact integers for full data, which then reproduce ``numpy.histogram2d(clip(g),
  clip(θ), bins=(grad_edges, param_edges))`` (and with ``range=(grad_range,
  param_range)`` up to entries within an ulp of an edge). A pair is non-finite when
  either entry is.

  **Cockpit** (``GradHist2d``, v1.0.2): bins ``(40, 50)``; axis 0 (x) the individual
  gradient entries on ``(−1, 1)``, axis 1 (y) the parameter values on ``(−2, 2)``, both
  clamped (to the outer bin centres, which is the same as into the edge bins): the
  ``[grad_bins, param_bins]`` layout used here.

  Args:
    grads: ``[..., S]`` per-example gradient entries at the sampled coordinates.
    param_values: the parameter values at the same coordinates, broadcastable to
      ``grads`` (``[S]``).
    sample: the :class:`HistogramSample` of the columns, or ``None`` (weight 1).
    bins: ``(grad_bins, param_bins)`` (static).
    grad_range: ``(lo, hi)`` of the gradient axis (see :func:`sampled_histogram`).
    param_range: ``(lo, hi)`` of the parameter axis.

  Returns:
    ``counts`` ``float32[grad_bins, param_bins]``, ``grad_edges`` ``float32[grad_bins + 1]``,
    ``param_edges`` ``float32[param_bins + 1]``, ``nonfinite`` ``float32[]`` and
    ``leaf_counts`` ``int32[L, grad_bins, param_bins]``.
  """
  if not isinstance(bins, tuple | list) or len(bins) != 2:
    raise ValueError(f"sampled_histogram_2d: bins must be (grad_bins, param_bins), got {bins!r}.")
  gb, pb = bins
  _check_bins(gb, "sampled_histogram_2d: bins[0] (grad)")
  _check_bins(pb, "sampled_histogram_2d: bins[1] (param)")
  glo, ghi = _check_range(grad_range, "sampled_histogram_2d: grad_range")
  plo, phi = _check_range(param_range, "sampled_histogram_2d: param_range")
  g = jnp.asarray(grads).astype(_F32)
  p = jnp.asarray(param_values).astype(_F32)
  try:
    shape = jnp.broadcast_shapes(g.shape, p.shape)
  except ValueError as e:
    raise ValueError(
      f"sampled_histogram_2d: param_values {p.shape} must broadcast to grads {g.shape}."
    ) from e
  if shape != g.shape or g.ndim == 0:
    raise ValueError(
      f"sampled_histogram_2d: param_values {p.shape} must broadcast to grads {g.shape} "
      "(with a last axis of coordinates)."
    )
  layout = _leaf_layout(g.shape[-1], sample, "sampled_histogram_2d: grads")
  kg, fg, grad_edges = _bin_index(g, glo, ghi, gb)
  kp, fp, param_edges = _bin_index(p, plo, phi, pb)  # once per coordinate, not per example
  cells = kg * pb + kp
  leaf, counts, nonfinite = _leaf_counts(cells, fg & fp, gb * pb, layout)
  return {
    "counts": counts.reshape(gb, pb),
    "grad_edges": grad_edges,
    "param_edges": param_edges,
    "nonfinite": nonfinite,
    "leaf_counts": leaf.reshape(-1, gb, pb),
  }
