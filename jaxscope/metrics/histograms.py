"""Histograms of per-example gradient entries: a fixed sample of coordinates, exact counts.

Cockpit's ``GradHist1d`` and ``GradHist2d`` (Schneider, Dangel & Hennig 2021), computed on a
static uniform sample of parameter coordinates (:func:`histogram_sample`): integer counts per
leaf scaled by the leaf's sampling weight (:func:`sampled_histogram`,
:func:`sampled_histogram_2d`), exact for full data and unbiased for samples, with values
outside the range clamped into the edge bins as Cockpit does. Re-exported by
:mod:`jaxscope.metrics.noise`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "HistogramSample",
  "histogram_range",
  "histogram_sample",
  "sampled_histogram",
  "sampled_histogram_2d",
]

_F32 = jnp.float32


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
