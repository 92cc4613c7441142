"""Per-layer statistics of activations (layer outputs), as :class:`Metric` s.

These metrics read a layer's output tensor ``x`` of shape ``[B, ..., U]``: batch axis
first, units (features of a Dense layer, channels of a Conv layer) LAST, as Flax lays
them out and as :mod:`jaxscope.capture` records them. They are meant for the
``activations`` topic of a :func:`~jaxscope.metrics.scope` (and work on ``layer_grads``
too); the generic moments of :mod:`jaxscope.metrics.stats` (``mean``, ``variance``,
``norm``, ``zero_fraction`` …) apply to activations as they are.

A layer made of several leaves is treated as the concatenation of its leaves' units
(each leaf keeps its own batch and spatial axes). Counts are exact integers; results
are ``float32``.

Non-finite values never crash a metric and never touch other layers: a NaN compares
false with everything, so a unit that outputs NaN anywhere is *not* dead and a NaN
element is *not* saturated; ``+Inf`` is saturated and ``-Inf`` is ``<= threshold``.
:func:`activation_std` of a layer with a NaN/Inf is NaN. Use
:func:`~jaxscope.metrics.stats.nonfinite_fraction` to count them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxscope.metrics.base import Leaves, Metric, group_sum, stateless
from jaxscope.metrics.stats import variance

__all__ = ["activation_std", "dead_fraction", "saturation_fraction"]


def activation_std() -> Metric:
  """Population standard deviation of a layer's outputs: ``sqrt((1/N) Σᵢ (xᵢ − x̄)²)``.

  Taken over all ``N`` elements (batch, spatial positions and units). The layer-response
  analysis of He et al. (2016, "Deep Residual Learning for Image Recognition", Fig. 7)
  and of the dynamic-capacity thesis plots this per layer: small responses of residual
  layers, growth or collapse of the signal with depth. Computed as the square root of
  :func:`~jaxscope.metrics.stats.variance` (``ddof=0``), so it keeps float32 accuracy
  when the mean is large against the spread.
  """
  var = variance(0)

  def fn(leaves: Leaves) -> jax.Array:
    value, _ = var.apply(leaves, (), None)
    return jnp.sqrt(value)

  return stateless("std", fn)


def _check_units(name: str, leaves: Leaves) -> None:
  for x in leaves:
    if x.ndim < 1:
      raise ValueError(
        f"{name}: expected a layer output [batch, ..., units] (rank >= 1), got a scalar."
      )


def dead_fraction(threshold: float = 0.0) -> Metric:
  """Fraction of units whose output is ``<= threshold`` everywhere in the batch.

  For an output ``x`` of shape ``[B, ..., U]``,
  ``dead_fraction = (1/U) #{u : x[b, ..., u] <= threshold for every b and position}``.
  With ``threshold = 0`` and the output captured *before* a functional ReLU (the Flax
  ``nn.relu(Dense(x))`` pattern that :mod:`jaxscope.capture` records), a dead unit is a
  dead ReLU: it outputs 0 for the whole batch, so it passes no gradient to its weights.
  On outputs taken after a ReLU, ``threshold=0`` counts units that are exactly 0.

  A unit with a NaN anywhere in the batch is not dead (NaN compares false).

  Args:
    threshold: a unit counts as dead when none of its outputs exceeds this value.
  """
  threshold = float(threshold)

  def fn(leaves: Leaves) -> jax.Array:
    _check_units("dead_fraction", leaves)
    units = 0
    dead = []
    for x in leaves:
      alive = ~(x <= threshold)  # NaN → alive.
      per_unit = jnp.any(alive.reshape(-1, x.shape[-1]), axis=0)
      dead.append(jnp.sum(~per_unit, dtype=jnp.int32))
      units += x.shape[-1]
    if units == 0:
      return jnp.full((), jnp.nan, jnp.float32)
    return group_sum(dead).astype(jnp.float32) / units

  return stateless("dead_fraction", fn)


def saturation_fraction(threshold: float = 3.0) -> Metric:
  """Fraction of elements with ``|xᵢ| > threshold``: ``(1/N) #{i : |xᵢ| > threshold}``.

  On pre-activations of ``tanh`` (or ``sigmoid``), the default ``3`` marks units in the
  flat tail: ``tanh'(3) = 1 − tanh²(3) ≈ 0.0099``, so such a unit passes less than 1 % of
  the gradient (``sigmoid'(x)`` is below 1 % of its peak beyond ``|x| ≈ 6``: use 6
  for sigmoid pre-activations). On outputs taken *after* a ``tanh``, compare the output
  itself: ``threshold=0.99`` (``|tanh(x)| > 0.99 ⇔ |x| > 2.65``). A sigmoid saturates
  towards 0 and 1, not towards ``±threshold``: measure its pre-activation instead.

  NaN elements are not saturated (NaN compares false); ``±Inf`` are.

  Args:
    threshold: magnitude above which an element counts as saturated (``> 0``).
  """
  threshold = float(threshold)
  if not threshold >= 0.0:
    raise ValueError(f"saturation_fraction: threshold must be >= 0, got {threshold}.")

  def fn(leaves: Leaves) -> jax.Array:
    n = 0
    sat = []
    for x in leaves:
      sat.append(jnp.sum(jnp.abs(x) > threshold, dtype=jnp.int32))
      n += x.size
    if n == 0:
      return jnp.full((), jnp.nan, jnp.float32)
    return group_sum(sat).astype(jnp.float32) / n

  return stateless("saturation_fraction", fn)
