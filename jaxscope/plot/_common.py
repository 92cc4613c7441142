"""Helpers shared by the figure families: masking, log-scale choice, non-finite markers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.transforms import blended_transform_factory

from jaxscope.record import History

FIGSIZE = (8.0, 4.5)
"""The size of a one-axes figure, in inches."""
MANY_LAYERS = 12
"""Above this many lines a legend moves outside the axes (and a diagnosis panel stops)."""


def scalar_series(history: History, key: str) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, float64 values)`` of a scalar key.

  Raises:
    KeyError: ``key`` was not recorded.
    ValueError: ``key`` holds an array per step.
  """
  steps, values = history.series(key)
  if values.ndim != 1:
    raise ValueError(
      f"{key!r} holds arrays of shape {values.shape[1:]} per step, not scalars "
      "(for histograms use histogram_figure)."
    )
  return steps, values.astype(np.float64)


def masked(values: Any, *, positive: bool = False) -> np.ndarray:
  """``values`` as float64 with non-finite entries (and, with ``positive``, entries ≤ 0)
  replaced by NaN, which matplotlib leaves out of lines and masked meshes."""
  v = np.asarray(values, np.float64)
  bad = ~np.isfinite(v)
  if positive:
    bad |= v <= 0
  return np.where(bad, np.nan, v)


def log_worthy(values: Sequence[Any], ratio: float) -> bool:
  """Whether all finite values are > 0 and the largest exceeds ``ratio`` × the smallest."""
  finite = [np.asarray(v, np.float64) for v in values]
  finite = [v[np.isfinite(v)] for v in finite]
  finite = [v for v in finite if v.size]
  if not finite:
    return False
  allv = np.concatenate(finite)
  return float(allv.min()) > 0 and float(allv.max()) > ratio * float(allv.min())


def mark_nonfinite(ax: Any, xs: Any, label: str = "non-finite", unit: str = "") -> int:
  """Red ``x`` at the top of the axes at the x positions ``xs`` (a divergence is shown,
  not hidden), labelled ``"{label} ({count}{unit})"``.

  Returns:
    The number of distinct positions marked (0: nothing drawn).
  """
  xs = np.unique(np.asarray(xs, np.float64))
  if not xs.size:
    return 0
  # x in data coordinates, y at the top of the axes: visible whatever the y range.
  trans = blended_transform_factory(ax.transData, ax.transAxes)
  ax.scatter(
    xs,
    np.ones_like(xs),
    transform=trans,
    marker="x",
    color="red",
    clip_on=False,
    zorder=5,
    label=f"{label} ({xs.size}{unit})",
  )
  return int(xs.size)


def column_bounds(steps: np.ndarray) -> np.ndarray:
  """Boundaries of cells centred on ``steps`` (steps or layer indices): midpoints between
  neighbours, half a gap beyond the ends (±0.5 for a single value)."""
  s = steps.astype(np.float64)
  if s.size == 1:
    return np.array([s[0] - 0.5, s[0] + 0.5])
  mid = 0.5 * (s[:-1] + s[1:])
  return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])
