"""Per-layer statistics of tensors: moments, norms, ratios, histograms.

Every factory returns a :class:`~jaxscope.metrics.Metric`. A layer's leaves
``x⁽¹⁾ … x⁽ᵏ⁾`` are treated as one flat vector ``x`` of ``N = Σ size(x⁽ʲ⁾)``
elements; sums are accumulated in ``float32`` whatever the input dtype.

Non-finite values are measured, not hidden: a NaN or Inf in a layer's tensor makes that
layer's moments and norms NaN/Inf (and leaves every other layer's values untouched);
:func:`nonfinite_fraction` counts them, and :func:`histogram` counts only finite values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxscope.metrics.base import (
  Leaves,
  Metric,
  group_max,
  group_min,
  group_sum,
  moments,
  stateless,
)

__all__ = [
  "elementwise_ratio",
  "histogram",
  "lost_fraction",
  "max_abs",
  "mean",
  "nonfinite_fraction",
  "norm",
  "ratio_to_params",
  "realised_ratio",
  "rms",
  "sample_axis",
  "sample_stride",
  "total",
  "variance",
  "zero_fraction",
]

_F32 = jnp.float32


def _f(x: jax.Array) -> jax.Array:
  return x.astype(_F32) if x.dtype != _F32 else x


def _count(leaves: Leaves) -> int:
  n = 0
  for x in leaves:
    n += x.size
  return n


def _sum(leaves: Leaves) -> jax.Array:
  return group_sum([jnp.sum(_f(x)) for x in leaves])


def _sumsq(leaves: Leaves) -> jax.Array:
  return group_sum([jnp.sum(jnp.square(_f(x))) for x in leaves])


def _mean(leaves: Leaves) -> jax.Array:
  return _sum(leaves) / _count(leaves)


def mean() -> Metric:
  """Mean of the layer's elements: ``mean = (1/N) Σᵢ xᵢ``."""
  return stateless("mean", _mean, moments=moments(("s1",), lambda s, n: s["s1"] / n))


def total() -> Metric:
  """Sum of the layer's elements: ``Σᵢ xᵢ`` (registered, and keyed, as ``"sum"``, ikkuna's
  name; the function is ``total`` so that it does not shadow the builtin ``sum``)."""
  return stateless("sum", _sum, moments=moments(("s1",), lambda s, n: s["s1"]))


def _variance(leaves: Leaves, ddof: int) -> jax.Array:
  n = _count(leaves)
  if n - ddof <= 0:
    return jnp.full((), jnp.nan, _F32)
  s1, s2 = _sum(leaves), _sumsq(leaves)
  m = s1 / n
  ss_fast = s2 - s1 * m  # Σx² − N·mean², from the sums norm and mean use anyway.

  def two_pass(_: None) -> jax.Array:
    return group_sum([jnp.sum(jnp.square(_f(x) - m)) for x in leaves])

  # The one-pass form loses relative accuracy ~ ε·Σx²/ss; when ss < Σx²/64
  # (|mean| ≳ 8·std, e.g. BatchNorm scales near 1) recompute exactly.
  ss = jax.lax.cond(ss_fast < s2 * (1.0 / 64.0), two_pass, lambda _: ss_fast, None)
  return jnp.maximum(ss, 0.0) / (n - ddof)


def variance(ddof: int = 0) -> Metric:
  """Variance of the layer's elements: ``(1/(N−ddof)) Σᵢ (xᵢ − mean)²``.

  Computed from ``Σx`` and ``Σx²`` (the sums that :func:`mean` and :func:`norm` read,
  so the three share two passes over the data) as ``(Σx² − N·mean²) / (N − ddof)``.
  When that form would lose accuracy (``N·mean² > (63/64)·Σx²``, i.e. the mean is
  large against the spread), a ``lax.cond`` recomputes ``Σ(x − mean)²`` in a second
  pass, so the result keeps float32 accuracy in every case and costs one pass extra
  only where needed.

  Args:
    ddof: delta degrees of freedom. The default ``0`` is the population variance (the
      maximum-likelihood estimate, numpy's default); ``ddof=1`` is the unbiased sample
      variance that ikkuna's ``torch.var`` computed.
  """
  if ddof < 0:
    raise ValueError(f"variance: ddof must be >= 0, got {ddof}.")

  def finish(s: dict[str, jax.Array], n: np.ndarray) -> jax.Array:
    dof = n - ddof
    return jnp.where(dof > 0, jnp.maximum(s["ss"], 0.0) / np.maximum(dof, 1), jnp.nan)

  return stateless(
    "variance", lambda leaves: _variance(leaves, ddof), moments=moments(("ss",), finish)
  )


def _norm(leaves: Leaves, ord: int | float) -> jax.Array:
  if ord == 2:
    return jnp.sqrt(_sumsq(leaves))
  if ord == 1:
    return group_sum([jnp.sum(jnp.abs(_f(x))) for x in leaves])
  return group_max([jnp.max(jnp.abs(_f(x))) for x in leaves])


def norm(ord: int | float | str = 2) -> Metric:
  """p-norm of the flattened layer: ``‖x‖_p = (Σᵢ |xᵢ|ᵖ)^(1/p)``, p ∈ {1, 2, ∞}.

  For p = 2 this is the Frobenius norm of a kernel; p = ∞ is ``maxᵢ |xᵢ|``. The stat
  is named ``norm`` for p = 2, ``norm1`` and ``norminf`` otherwise.

  Args:
    ord: ``1``, ``2`` or ``inf`` (``"inf"`` and ``jnp.inf`` are accepted).
  """
  if isinstance(ord, str) and ord.lower() == "inf":
    ord = float("inf")
  if ord not in (1, 2, float("inf")):
    raise ValueError(f"norm: ord must be 1, 2 or inf, got {ord!r}.")
  name = {1: "norm1", 2: "norm"}.get(ord, "norminf")  # type: ignore[call-overload]
  two = moments(("s2",), lambda s, n: jnp.sqrt(s["s2"])) if ord == 2 else None
  return stateless(name, lambda leaves: _norm(leaves, ord), moments=two)


def rms() -> Metric:
  """Root mean square: ``sqrt((1/N) Σᵢ xᵢ²) = ‖x‖₂ / √N``."""
  return stateless(
    "rms",
    lambda leaves: jnp.sqrt(_sumsq(leaves) / _count(leaves)),
    moments=moments(("s2",), lambda s, n: jnp.sqrt(s["s2"] / n)),
  )


def max_abs() -> Metric:
  """Largest magnitude: ``maxᵢ |xᵢ|`` (the ∞-norm, under the name ``max_abs``)."""
  return stateless("max_abs", lambda leaves: _norm(leaves, float("inf")))


def zero_fraction() -> Metric:
  """Fraction of exact zeros: ``(1/N) #{i : xᵢ = 0}`` (dead units, sparsity)."""

  def fn(leaves: Leaves) -> jax.Array:
    zeros = group_sum([jnp.sum(x == 0, dtype=jnp.int32) for x in leaves])
    return zeros.astype(_F32) / _count(leaves)

  return stateless("zero_fraction", fn)


def nonfinite_fraction() -> Metric:
  """Fraction of NaN or ±Inf elements: ``(1/N) #{i : xᵢ ∉ ℝ}``."""

  def fn(leaves: Leaves) -> jax.Array:
    bad = group_sum([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves])
    return bad.astype(_F32) / _count(leaves)

  return stateless("nonfinite_fraction", fn)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den``, with ``0/0 = 0`` and ``x/0 = inf`` for ``x > 0``; NaN propagates."""
  zero_den = den == 0
  q = num / jnp.where(zero_den, 1.0, den)
  return jnp.where(zero_den, jnp.where(num == 0, 0.0, jnp.inf), q)


def _reference(leaves: Leaves, reference: Leaves | None, denominator: str) -> Sequence[jax.Array]:
  if reference is None:
    raise ValueError("this metric needs the parameters (params=) as reference.")
  if denominator == "new":
    return [_f(p) + _f(u) for p, u in zip(reference, leaves, strict=True)]
  return [_f(p) for p in reference]


def _check_denominator(denominator: str) -> None:
  if denominator not in ("old", "new"):
    raise ValueError(f"denominator must be 'old' or 'new', got {denominator!r}.")


def ratio_to_params(denominator: str = "old") -> Metric:
  """Update/weight ratio of a layer: ``R = ‖Δθ‖₂ / ‖θ‖₂``.

  Meant for the ``updates`` topic, where ``Δθ`` is what the optimizer adds to the
  parameters this step. The rule of thumb (Karpathy; the live-introspection thesis,
  eq. 3.6) is ``R ≈ 1e-3``.

  Args:
    denominator: ``"old"`` (default) divides by the parameters the update is applied
      to, ``θ_{k−1}``, as ikkuna's code did after its issue #31; ``"new"`` divides by
      ``θ_k = θ_{k−1} + Δθ`` (the thesis's ``‖W_k − W_{k−1}‖ / ‖W_k‖``). The two
      differ by ``O(R²)``; ``"old"`` reuses ``‖θ_{k−1}‖`` from ``params/norm``, so it
      costs no extra pass over the data, while ``"new"`` reads ``θ`` and ``Δθ`` again.

  The stat is named ``ratio`` (``"old"``) or ``ratio_new`` (``"new"``). A zero
  denominator gives ``0`` when the update is zero too and ``inf`` otherwise
  (e.g. the first step of a bias initialised at zero).
  """
  _check_denominator(denominator)

  def fn(leaves: Leaves, reference: Leaves | None) -> jax.Array:
    ref = _reference(leaves, reference, denominator)
    return _safe_div(jnp.sqrt(_sumsq(leaves)), jnp.sqrt(_sumsq(ref)))

  if denominator == "new":
    return stateless("ratio_new", fn, needs_params=True)
  old = moments(("s2", "ref_s2"), lambda s, n: _safe_div(jnp.sqrt(s["s2"]), jnp.sqrt(s["ref_s2"])))
  return stateless("ratio", fn, needs_params=True, moments=old)


def elementwise_ratio(denominator: str = "old") -> Metric:
  """ikkuna's element-wise ratio: ``mean over {i : θᵢ ≠ 0} of |Δθᵢ / θᵢ|``.

  Elements whose parameter is exactly zero are left out (they would give ``x/0``);
  if every parameter is zero the value is ``0``. NaN or Inf in either tensor propagate
  to the value, so they are reported rather than dropped.

  Args:
    denominator: ``"old"`` (``θ_{k−1}``, default, as ikkuna) or ``"new"`` (``θ_k``).
  """
  _check_denominator(denominator)

  def fn(leaves: Leaves, reference: Leaves | None) -> jax.Array:
    ref = _reference(leaves, reference, denominator)
    total = jnp.zeros((), _F32)
    count = jnp.zeros((), jnp.int32)
    for u, p in zip(leaves, ref, strict=True):
      valid = p != 0
      q = jnp.abs(_f(u) / jnp.where(valid, p, 1.0))
      total = total + jnp.sum(jnp.where(valid, q, 0.0))
      count = count + jnp.sum(valid, dtype=jnp.int32)
    return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(_F32), 0.0)

  return stateless("elementwise_ratio", fn, needs_params=True)


def _landed(u: jax.Array, p: jax.Array) -> jax.Array:
  """The update that lands, in float32: ``(θ + Δθ)`` rounded to ``θ``'s dtype, minus ``θ``.

  This is what ``optax.apply_updates`` stores (``(p + u).astype(p.dtype)``), so in
  bfloat16 an update below half a unit in the last place of ``θ`` lands as zero.
  """
  new = (p + u).astype(p.dtype)  # As optax.apply_updates: promote, add, round.
  return _f(new) - _f(p)


def realised_ratio() -> Metric:
  """Realised update/weight ratio: ``‖θ_new − θ‖₂ / ‖θ‖₂`` with ``θ_new = (θ + Δθ)`` stored
  in the parameter's dtype.

  The intended ratio (:func:`ratio_to_params`) measures ``Δθ`` as the optimizer computed
  it; this one measures what ``optax.apply_updates`` actually changes, the difference
  taken in float32 after rounding ``θ + Δθ`` to ``θ``'s dtype. In float32 the two agree
  to rounding; with bfloat16 parameters (8 mantissa bits) every element whose update is
  below half a unit in the last place of ``θᵢ`` (``|Δθᵢ| < 2⁻⁹ |θᵢ|``) does not move, so the
  realised ratio can be far below the intended one (a LayerNorm scale at 1.0 does not
  move for ``|Δθ| < 2⁻⁸``). Meant for the ``updates`` topic.
  """

  def fn(leaves: Leaves, reference: Leaves | None) -> jax.Array:
    if reference is None:
      raise ValueError("realised_ratio needs the parameters (params=) as reference.")
    moved = group_sum(
      [jnp.sum(jnp.square(_landed(u, p))) for u, p in zip(leaves, reference, strict=True)]
    )
    return _safe_div(jnp.sqrt(moved), jnp.sqrt(_sumsq(reference)))

  return stateless("realised_ratio", fn, needs_params=True)


def lost_fraction() -> Metric:
  """Fraction of a layer's non-zero updates that do not change the stored parameter.

  ``|{i : Δθᵢ ≠ 0, θ_new,i = θᵢ}| / |{i : Δθᵢ ≠ 0}|`` with ``θ_new = (θ + Δθ)`` in the
  parameter's dtype (see :func:`realised_ratio`); ``0`` when no update is non-zero. Near
  1 means the updates are lost to rounding: typical of bfloat16 parameters with a small
  learning rate (keep a float32 master copy, or raise the rate). NaN updates count as
  changing the parameter (they do). Meant for the ``updates`` topic.
  """

  def fn(leaves: Leaves, reference: Leaves | None) -> jax.Array:
    if reference is None:
      raise ValueError("lost_fraction needs the parameters (params=) as reference.")
    lost = jnp.zeros((), jnp.int32)
    moving = jnp.zeros((), jnp.int32)
    for u, p in zip(leaves, reference, strict=True):
      nonzero = u != 0
      # θ_new = θ compared as stored (not θ_new − θ = 0: the difference is realised_ratio's,
      # and a second reader made XLA:CPU write it out as an array).
      stuck = nonzero & ((p + u).astype(p.dtype) == p)
      lost = lost + count_true(stuck)
      moving = moving + count_true(nonzero)
    return jnp.where(moving > 0, lost.astype(_F32) / jnp.maximum(moving, 1).astype(_F32), 0.0)

  return stateless("lost_fraction", fn, needs_params=True)


def count_true(mask: jax.Array) -> jax.Array:
  """The number of ``True`` entries of ``mask``, as ``int32``.

  Each row (the last axis) is counted in float32, then the rows' counts are added as
  integers: exact while a row holds fewer than ``2²⁴`` entries (a longer last axis is
  counted in int32 directly). On XLA:CPU a float32 reduction runs through its fast
  reduction kernels while an int32 one becomes a tiled ``reduce-window``: on the MNIST
  MLP, ``lost_fraction``'s two counts over a ``[784, 1000]`` update took 0.27 ms that way.
  """
  if mask.ndim == 0 or mask.shape[-1] >= 2**24:
    return jnp.sum(mask, dtype=jnp.int32)
  rows = jnp.sum(mask.astype(_F32), axis=-1)
  return jnp.sum(rows.astype(jnp.int32), dtype=jnp.int32)


def sample_stride(size: int, last_dim: int, max_elements: int) -> int:
  """The stride of :func:`histogram`'s subsample of a tensor of ``size`` elements.

  The smallest ``k >= ceil(size / max_elements)``; the histogram keeps every ``k``-th
  index along the tensor's largest input axis (:func:`sample_axis`), so every output unit
  (the last axis, ``last_dim`` wide) is represented. Kept for the flat fallback: ``k`` is
  then made coprime with ``last_dim`` so that ``x.reshape(-1)[::k]`` also visits every
  output unit.
  """
  k = max(1, -(-size // max_elements))
  while k > 1 and math.gcd(k, max(last_dim, 1)) != 1:
    k += 1
  return k


def sample_axis(shape: Sequence[int]) -> int:
  """The axis :func:`histogram` subsamples: the largest axis but the last (the output
  axis in Flax; ties go to the later axis), or axis 0 of a vector."""
  if len(shape) < 2:
    return 0
  lead = list(shape[:-1])
  return max(range(len(lead)), key=lambda a: (lead[a], a))


def _subsample(x: jax.Array, max_elements: int) -> jax.Array:
  """Every ``k``-th index of ``x`` along :func:`sample_axis` (``n`` long), with
  ``k = ceil(n / ⌊max_elements · n / size⌋)``, so that at most ``max_elements`` are kept.

  A strided slice along one axis keeps the tensor's other axes (and so their sharding:
  no all-gather of a parameter sharded on another axis, which ``reshape(-1)`` would
  need). Only if that axis is too short for the stride does it fall back to the flat
  ``x.reshape(-1)[::k]`` with ``k`` coprime with the last axis.
  """
  if x.size <= max_elements:
    return x
  axis = sample_axis(x.shape)
  n = x.shape[axis]
  rows = max_elements // (x.size // n)  # Indices along the axis that fit in the budget.
  if rows >= 1:
    return jax.lax.slice_in_dim(x, 0, n, stride=-(-n // rows), axis=axis)
  last = x.shape[-1] if x.ndim else 1
  return x.reshape(-1)[:: sample_stride(x.size, last, max_elements)]


def histogram(
  bins: int = 64,
  range: tuple[float, float] | None = None,
  max_elements: int | None = None,
) -> Metric:
  """Fixed-bin histogram of the layer's finite elements: ``counts`` and ``edges``.

  ``edges = linspace(lo, hi, bins + 1)``; element ``x`` falls in bin
  ``⌊(x − lo) · bins / (hi − lo)⌋``, the last bin being closed (``x = hi`` counts),
  as in ``numpy.histogram``.

  Args:
    bins: number of bins (static, so the output shape is fixed).
    range: ``(lo, hi)`` for a fixed range: elements outside it are not counted, as
      numpy does. ``None`` (default) uses this step's finite min and max; a constant
      tensor gets the range ``[x − 0.5, x + 0.5]`` (numpy's rule) and a tensor with no
      finite element the range ``[0, 1]`` with all counts zero.
    max_elements: if set, a leaf with more elements is histogrammed on a strided
      subsample of at most ``max_elements``: every ``k``-th index along its largest input
      axis (:func:`sample_axis`; every output unit is kept, and a
      parameter sharded along another axis is not gathered); counts then sum to the
      sample size. Exact counting is a serial scatter-add on
      CPU (~1.5 ns per element), the one statistic here whose cost is not a plain
      reduction; the subsample bounds it. ``None`` (default) counts every element.

  Returns:
    A metric whose value is ``{"counts": int32[bins], "edges": float32[bins + 1]}``,
    stored as ``{topic}/histogram_counts/{layer}`` and ``{topic}/histogram_edges/{layer}``.
  """
  if not isinstance(bins, int) or bins < 1:
    raise ValueError(f"histogram: bins must be a positive int, got {bins!r}.")
  if range is not None:
    lo_f, hi_f = float(range[0]), float(range[1])
    if not lo_f < hi_f:
      raise ValueError(f"histogram: range must satisfy lo < hi, got {range!r}.")

  if max_elements is not None and (not isinstance(max_elements, int) or max_elements < 1):
    raise ValueError(f"histogram: max_elements must be a positive int, got {max_elements!r}.")

  def _sample(x: jax.Array) -> jax.Array:
    # No reshape: bins are found element-wise on the tensor's own shape, so a sharded
    # leaf is counted shard by shard (a scatter into the replicated counts) and never
    # gathered.
    x = _f(x)
    return x if max_elements is None else _subsample(x, max_elements)

  def fn(leaves: Leaves) -> dict[str, jax.Array]:
    flat = [_sample(x) for x in leaves]
    if range is None:
      # The finite min and max, each one fused pass over the sample. (A lax.cond that
      # took the masked pass only for tensors with NaN/Inf cost more than the mask: its
      # operands, the samples, were copied in and the step waited on its predicate.)
      big = jnp.finfo(_F32).max
      lo = group_min([jnp.min(jnp.where(jnp.isfinite(x), x, big)) for x in flat])
      hi = group_max([jnp.max(jnp.where(jnp.isfinite(x), x, -big)) for x in flat])
      empty = lo > hi
      lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 1.0, hi)
      same = lo == hi
      lo, hi = jnp.where(same, lo - 0.5, lo), jnp.where(same, hi + 0.5, hi)
    else:
      lo, hi = jnp.asarray(lo_f, _F32), jnp.asarray(hi_f, _F32)
    scale = bins / (hi - lo)
    counts = jnp.zeros((bins + 1,), jnp.int32)
    for x in flat:
      valid = (x >= lo) & (x <= hi)  # False for NaN and for out-of-range values.
      idx = jnp.clip(jnp.floor((x - lo) * scale).astype(jnp.int32), 0, bins - 1)
      idx = jnp.where(valid, idx, bins)  # Invalid elements go to an overflow bin.
      counts = counts.at[idx].add(1, mode="promise_in_bounds")
    edges = jnp.linspace(lo, hi, bins + 1, dtype=_F32)
    return {"counts": counts[:bins], "edges": edges}

  return stateless("histogram", fn)
