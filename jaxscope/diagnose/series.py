"""Series helpers shared by the rules: scalar series of a :class:`~jaxscope.record.History`,
layers in depth order, windows of the step range, robust trends and fitted slopes.

Depth order is a natural sort of the layer names (``Dense_2`` before ``Dense_10``); windows
(``_head``, ``_tail``) are fractions of the recorded step range and keep at least one point.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxscope.record import History

#: Last name components of weight matrices (biases start at zero: not comparable).
_WEIGHT_NAMES = frozenset({"kernel", "weight", "w", "embedding"})


def _natural_key(name: str) -> list[Any]:
  """Sort key: digit runs compare as numbers (``Dense_2`` before ``Dense_10``)."""
  return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _series(h: History, key: str) -> tuple[np.ndarray, np.ndarray] | None:
  """``(steps, float values)`` of a scalar key, or ``None`` if absent or not scalar."""
  if key not in h:
    return None
  try:
    steps, values = h.series(key)
  except ValueError:
    return None
  if values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iuf":
    return None
  return steps, values.astype(np.float64)


def _layers(h: History, topic: str, stat: str, *, weights: bool = False) -> list[str]:
  """Layers of ``{topic}/{stat}`` with scalar series, in depth (natural sort) order."""
  layers = [lay for lay in h.layers(topic, stat) if _series(h, f"{topic}/{stat}/{lay}") is not None]
  if weights:
    w = [lay for lay in layers if lay.rsplit("/", 1)[-1] in _WEIGHT_NAMES]
    layers = w or layers
  return sorted(layers, key=_natural_key)


def _tail(steps: np.ndarray, values: np.ndarray, fraction: float) -> tuple[np.ndarray, ...]:
  """The points in the last ``fraction`` of the step range (at least one)."""
  if steps.size == 0:
    return steps, values
  cut = steps[-1] - fraction * (steps[-1] - steps[0])
  keep = steps >= cut
  keep[-1] = True
  return steps[keep], values[keep]


def _head(steps: np.ndarray, values: np.ndarray, fraction: float) -> tuple[np.ndarray, ...]:
  """The points in the first ``fraction`` of the step range (at least one)."""
  if steps.size == 0:
    return steps, values
  cut = steps[0] + fraction * (steps[-1] - steps[0])
  keep = steps <= cut
  keep[0] = True
  return steps[keep], values[keep]


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The points whose value is finite."""
  ok = np.isfinite(values)
  return steps[ok], values[ok]


class _TailMedians(NamedTuple):
  """Per-layer medians over the last half of a series (:func:`_layer_tail_medians`)."""

  med: dict[str, float]
  """The median per layer."""
  first: dict[str, int]
  """The first step of the half per layer."""
  points: dict[str, int]
  """The number of points of the half per layer."""


def _layer_tail_medians(
  h: History, prefix: str, layers: Sequence[str], *, warmup: int = 0, min_points: int = 1
) -> _TailMedians:
  """Per layer, the median of ``{prefix}/{layer}`` over the last half of its finite
  values from step ``first recorded step + warmup`` on, the first step of that half and
  its number of points; layers with fewer than ``min_points`` there are left out."""
  out = _TailMedians({}, {}, {})
  for lay in layers:
    steps, values = _finite(*_series(h, f"{prefix}/{lay}"))  # type: ignore[misc]
    if steps.size and warmup > 0:
      keep = steps >= steps[0] + warmup
      steps, values = steps[keep], values[keep]
    if steps.size == 0:
      continue
    t_steps, tail = _tail(steps, values, 0.5)
    if tail.size < max(int(min_points), 1):
      continue
    out.med[lay] = float(np.median(tail))
    out.first[lay] = int(t_steps[0])
    out.points[lay] = int(tail.size)
  return out


def _linear_pad(y: np.ndarray, half: int) -> np.ndarray:
  """``y`` extended by ``half`` points each side along its robust edge trends: anchored at
  the median of the 5 edge values, sloped by the median step over ``half + 1`` values."""
  m, k = min(5, y.size), min(half + 1, y.size)
  idx = np.arange(1, half + 1, dtype=np.float64)
  a0, b0 = float(np.median(y[:m])), float(np.median(np.diff(y[:k])))
  a1, b1 = float(np.median(y[-m:])), float(np.median(np.diff(y[-k:])))
  c = (m - 1) / 2
  head = a0 - b0 * (idx[::-1] + c)
  tail = a1 + b1 * (idx + c)
  return np.concatenate([head, y, tail])


def _moving_median(y: np.ndarray, window: int, *, edge: bool | str = True) -> np.ndarray:
  """Centred moving median; pads with the median of the 5 edge values (a trend), along
  the edges' robust linear trends (``edge="linear"``: a trend that is still falling at
  the start, so a smoothly decaying loss has no residual there), or by reflection
  (``edge=False``: a stationary scale)."""
  half = min(max(window // 2, 1), max(y.size - 1, 1))
  if edge == "linear" and y.size >= 3:
    padded = _linear_pad(y, half)
  elif edge or y.size < 2:
    padded = np.pad(y, half, mode="median", stat_length=min(5, y.size))
  else:
    padded = np.pad(y, half, mode="reflect")
  return np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)


def _acf_period(r: np.ndarray, lo: float, hi: float) -> float | None:
  """The period (samples) of ``r`` from its autocorrelation, or ``None``.

  The first interior local maximum of the (biased) autocorrelation at a lag in
  ``[lo, hi]`` whose value is at least half the largest one in that range, refined by
  parabolic interpolation: the fundamental of a spike train (whose harmonics are as
  strong in the periodogram) and the period of a sine alike.
  """
  n = r.size
  spec = np.fft.rfft(r, 2 * n)
  acf = np.fft.irfft(np.abs(spec) ** 2)[:n]
  if acf[0] <= 0:
    return None
  acf = acf / acf[0]
  a, b = max(math.ceil(lo), 1), min(int(hi), n - 2)
  if b <= a:
    return None
  top = float(acf[a : b + 1].max())
  if top <= 0:
    return None
  for lag in range(a + 1, b + 1):
    if acf[lag] >= 0.5 * top and acf[lag] >= acf[lag - 1] and acf[lag] >= acf[lag + 1]:
      x, y, z = acf[lag - 1], acf[lag], acf[lag + 1]
      den = x - 2 * y + z
      return lag + (float(np.clip(0.5 * (x - z) / den, -0.5, 0.5)) if den != 0 else 0.0)
  return None


def _rel_drop(steps: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
  """``(start, end, (start − end)/start)`` of a least-squares line through the window.

  The line is fitted to ``log(values)`` when they are positive (multiplicative noise,
  exponential decay), else to the values; ``start`` and ``end`` are the fitted values at
  the window's first and last step. A fit over every point is less noisy than comparing
  a few points at either end.
  """
  x = steps.astype(np.float64)
  if np.all(values > 0):
    slope, icpt = np.polyfit(x, np.log(values), 1) if x.size > 1 else (0.0, np.log(values[0]))
    start, end = float(np.exp(icpt + slope * x[0])), float(np.exp(icpt + slope * x[-1]))
  else:
    slope, icpt = np.polyfit(x, values, 1) if x.size > 1 else (0.0, values[0])
    start, end = float(icpt + slope * x[0]), float(icpt + slope * x[-1])
  return start, end, (start - end) / abs(start) if start != 0 else 0.0


def _slope(x: np.ndarray, y: np.ndarray) -> float:
  """Least-squares slope of ``y`` over ``x`` (0 for fewer than two distinct ``x``)."""
  if x.size < 2 or np.ptp(x) == 0:
    return 0.0
  return float(np.polyfit(x.astype(np.float64), y, 1)[0])


def _before(h: History, step: int) -> History:
  """The records of ``h`` at steps before ``step`` (same config and run directory); keys
  whose values change shape between steps are left out (no rule reads them)."""
  by_step: dict[int, dict[str, Any]] = {}
  for key in h.keys():
    try:
      steps, values = h.series(key)
    except ValueError:
      continue
    for s, v in zip(steps.tolist(), values, strict=True):
      if s < step:
        by_step.setdefault(int(s), {})[key] = v
  return History(sorted(by_step.items()), config=h.config, run_dir=h.run_dir)
