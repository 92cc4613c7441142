"""The moment statistics of a scope's topic, evaluated for all its layers at once.

Norms, means, variances, sums and update/weight ratios are functions of a layer's element
count ``N`` and two sums, ``s₁ = Σx`` and ``s₂ = Σx²`` (of the parameters too, for the
ratio). A scope that evaluated each of them per layer spent most of its time on the
scalar work around the reductions, not on the reductions: the ``economy`` preset on a
4-layer MLP compiled to 400 extra XLA operations, 24 of them ``conditional`` (one per
variance), for 48 reductions' worth of data (``benchmarks/costs.py``).

Metrics that declare :class:`~jaxscope.metrics.base.Moments` are evaluated here instead:

1. every leaf (or every layer of a stacked leaf, reduced over all axes but the stack
   axis) gets each sum it needs once, whatever the number of metrics that use it;
2. the sums of a layer's leaves are added, and the layers of a topic concatenated into one
   vector per sum;
3. each metric's ``finish`` turns the vectors into its values for every layer in a few
   vector operations, which are split per layer at the end.

The variance's sum of squared deviations ``ss = s₂ − s₁²/N`` loses relative accuracy
``~ ε·s₂/ss`` when the mean is large against the spread; where ``ss < s₂/64`` it is
recomputed as ``Σ(x − mean)²`` in a second pass. One ``lax.cond`` per topic guards that
second pass (taken only when some layer needs it), and inside it each layer's own
``lax.cond`` reads only the leaves of the layers that need it, so the result is exact to
float32 in every case, as the per-layer :func:`~jaxscope.metrics.variance` is.

The values equal the per-layer evaluation's to float32 rounding (the sums are the same
reductions, added in the same order); NaN or Inf in one layer's tensor make that layer's
values NaN/Inf and leave every other layer's untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxscope import tree as jtree
from jaxscope.metrics.base import Metric
from jaxscope.metrics.stats import _f

__all__ = ["batched", "measure"]

_F32 = jnp.float32
#: Below this ratio ``ss / s₂`` the one-pass variance is recomputed in two passes.
TWO_PASS_BELOW = 1.0 / 64.0


def batched(metric: Metric) -> bool:
  """Whether :func:`measure` evaluates ``metric``: it declares moments and measures the
  leaves themselves (no matrix view)."""
  return metric.moments is not None and not metric.matrix


class _Column(NamedTuple):
  """The layers of one plan entry: a single layer, or the ``L`` layers of a stack."""

  infos: tuple[jtree.LeafInfo, ...]
  family: bool
  width: int
  """``1``, or ``L`` for a stack."""
  count: int
  """Elements per layer, ``N``."""


def _axes(info: jtree.LeafInfo, family: bool, ndim: int) -> tuple[int, ...]:
  """The axes a layer's sum reduces: all, or all but the stack axis of a family."""
  if not family:
    return tuple(range(ndim))
  return tuple(a for a in range(ndim) if a != info.stack[0])  # type: ignore[index]


def _leaf(leaves: Sequence[Any], info: jtree.LeafInfo, family: bool) -> jax.Array:
  """The whole stacked leaf for a family, else the layer's (possibly sliced) leaf."""
  return _f(leaves[info.index] if family else jtree.leaf_value(leaves, info))


def _column_sum(col: _Column, leaves: Sequence[Any], power: int) -> jax.Array:
  """``Σ xᵖ`` of each layer of ``col`` over its leaves, shape ``[width]``."""
  total = None
  for info in col.infos:
    x = _leaf(leaves, info, col.family)
    part = jnp.sum(x if power == 1 else jnp.square(x), axis=_axes(info, col.family, x.ndim))
    total = part if total is None else total + part
  return jnp.reshape(total, (col.width,))  # type: ignore[arg-type]


def _deviation_sum(col: _Column, leaves: Sequence[Any], mean: jax.Array) -> jax.Array:
  """``Σ (x − mean)²`` of each layer of ``col`` (the exact second pass), ``[width]``."""
  total = None
  for info in col.infos:
    x = _leaf(leaves, info, col.family)
    if col.family:
      shape = [1] * x.ndim
      shape[info.stack[0]] = col.width  # type: ignore[index]
      m = jnp.reshape(mean, shape)
    else:
      m = mean[0]
    part = jnp.sum(jnp.square(x - m), axis=_axes(info, col.family, x.ndim))
    total = part if total is None else total + part
  return jnp.reshape(total, (col.width,))  # type: ignore[arg-type]


def _exact_ss(
  cols: Sequence[_Column], leaves: Sequence[Any], s1: jax.Array, s2: jax.Array, n: np.ndarray
) -> jax.Array:
  """``Σ(x − mean)²`` per layer: ``s₂ − s₁·mean``, or the second pass where that is
  inaccurate (see the module docstring)."""
  mean = s1 / n
  fast = s2 - s1 * mean
  need = fast < s2 * TWO_PASS_BELOW
  starts = np.cumsum([0] + [c.width for c in cols])

  def second_pass(_: None) -> jax.Array:
    parts = []
    for c, a in zip(cols, starts[:-1], strict=True):
      sl = slice(int(a), int(a) + c.width)
      parts.append(
        jax.lax.cond(
          jnp.any(need[sl]),
          lambda _, c=c, sl=sl: _deviation_sum(c, leaves, mean[sl]),
          lambda _, sl=sl: fast[sl],
          None,
        )
      )
    return jnp.where(need, jnp.concatenate(parts), fast)

  return jax.lax.cond(jnp.any(need), second_pass, lambda _: fast, None)


def measure(
  items: Sequence[Any], leaves: Sequence[Any], ref_leaves: Sequence[Any] | None
) -> dict[str, jax.Array]:
  """The values of the moment items of one topic, ``{key: scalar}``.

  Args:
    items: :class:`jaxscope.metrics.stacked.Item` s whose metric is :func:`batched`.
    leaves: the topic tree's leaves.
    ref_leaves: the parameters' leaves (for metrics with ``needs_params``).

  Returns:
    Each item's key(s) with its float32 value.
  """
  cols: dict[tuple, _Column] = {}
  for it in items:
    k = (it.infos, it.family)
    if k not in cols:
      width = len(it.keys)
      count = sum(int(np.prod(i.shape)) for i in it.infos)
      cols[k] = _Column(it.infos, it.family, width, count)
  order = list(cols.values())
  needs = set().union(*(it.metric.moments.needs for it in items))
  if "ss" in needs:
    needs |= {"s1", "s2"}
  n = np.concatenate([np.full(c.width, c.count, np.float32) for c in order])
  sums: dict[str, jax.Array] = {}
  for name, power in (("s1", 1), ("s2", 2)):
    if name in needs:
      sums[name] = jnp.concatenate([_column_sum(c, leaves, power) for c in order])
  if "ref_s2" in needs:
    if ref_leaves is None:
      users = sorted({it.metric.name for it in items if "ref_s2" in it.metric.moments.needs})
      raise ValueError(f"{', '.join(users)} needs the parameters (params=) as reference.")
    sums["ref_s2"] = jnp.concatenate([_column_sum(c, ref_leaves, 2) for c in order])
  if "ss" in needs:
    sums["ss"] = _exact_ss(order, leaves, sums["s1"], sums["s2"], n)
  starts = dict(zip(cols, np.cumsum([0] + [c.width for c in order]), strict=False))
  finished: dict[str, jax.Array] = {}
  values: dict[str, jax.Array] = {}
  for it in items:
    m = it.metric
    if m.name not in finished:
      finished[m.name] = m.moments.finish({k: sums[k] for k in m.moments.needs}, n).astype(_F32)
    start = int(starts[(it.infos, it.family)])
    for j, key in enumerate(it.keys):
      values[key] = finished[m.name][start + j]
  return values
