"""Helpers shared by the figure families: masking, log-scale choice, non-finite markers,
error bars (bands around a reading, readings within noise)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.lines import Line2D
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


# --------------------------------------------------------------------------- error bars

ERROR_SUFFIXES: tuple[tuple[str, float, float, str], ...] = (
  ("_stderr", 2.0, 1.0, "2σ ≥ |value|"),
  ("_residual", 1.0, 2.0, "residual ≥ |value|/2"),
)
"""The companion keys of a reading ``K`` that carry its error bar, in the order they are
looked for: ``(suffix, band, noise, rule)``. The band is ``value ± band · companion``; a
reading is within noise when ``noise · band · companion ≥ |value|`` (``K_stderr``, a standard
error: band ±2σ, noise when 2σ ≥ |value|; ``K_residual``, a convergence residual that bounds
the distance to the true value: band ± residual, noise when residual ≥ |value|/2)."""


@dataclasses.dataclass(frozen=True)
class ErrorBar:
  """The error bar of a scalar reading, aligned with the steps of the reading.

  Attributes:
    key: the companion key it was read from (``K_stderr``, ``K_residual``, …).
    half: the half-width of the band at each step of the reading (``2 · stderr`` or the
      residual); NaN where the companion was not recorded or is not a finite number ≥ 0.
    noise: a reading is within noise when ``noise · half ≥ |value|`` (1 for a standard
      error, 2 for a residual).
    rule: that test in words, e.g. ``"2σ ≥ |value|"``.
  """

  key: str
  half: np.ndarray
  noise: float
  rule: str

  def within_noise(self, values: Any) -> np.ndarray:
    """Where the reading is within noise: finite, with a finite error bar ``> 0`` and
    ``noise · half ≥ |value|`` (an error bar of exactly 0 is an exact reading)."""
    v = np.asarray(values, np.float64)
    h = self.half
    ok = np.isfinite(v) & np.isfinite(h) & (h > 0)
    return ok & (self.noise * np.where(ok, h, 0.0) >= np.abs(np.where(ok, v, 0.0)))


def companion_key(key: str, suffix: str) -> str:
  """The key of a companion of ``key``: ``{topic}/{stat}{suffix}/{layer}`` for a per-layer
  key ``{topic}/{stat}/{layer}`` (``hessian/trace/w`` → ``hessian/trace_stderr/w``),
  ``{key}{suffix}`` for any other (``hess_max_ev`` → ``hess_max_ev_residual``)."""
  if key.count("/") >= 2:
    topic, stat, layer = key.split("/", 2)
    return f"{topic}/{stat}{suffix}/{layer}"
  return key + suffix


def companion_parent(name: str, known: Any) -> str | None:
  """The reading whose error bar ``name`` holds: ``name`` less an error suffix when that
  name is in ``known`` (a container of keys, or of the stats of one topic); else ``None``."""
  for suffix, *_ in ERROR_SUFFIXES:
    if name.endswith(suffix) and name[: -len(suffix)] in known:
      return name[: -len(suffix)]
  return None


def error_bar(history: History, key: str, steps: np.ndarray) -> ErrorBar | None:
  """The error bar of the scalar ``key`` at ``steps`` (its recorded steps), from the first
  companion of :data:`ERROR_SUFFIXES` that was recorded as a scalar; ``None`` without one."""
  for suffix, band, noise, rule in ERROR_SUFFIXES:
    ckey = companion_key(key, suffix)
    if ckey not in history:
      continue
    c_steps, c_values = history.series(ckey)
    if c_values.ndim != 1:
      continue
    half = np.full(len(steps), np.nan)
    idx = np.searchsorted(c_steps, steps)
    hit = (idx < len(c_steps)) & (c_steps[np.minimum(idx, len(c_steps) - 1)] == steps)
    c = c_values.astype(np.float64)[idx[hit]]
    half[hit] = np.where(np.isfinite(c) & (c >= 0), band * c, np.nan)
    return ErrorBar(ckey, half, noise, rule)
  return None


def draw_reading(
  ax: Any,
  steps: np.ndarray,
  values: np.ndarray,
  err: ErrorBar | None,
  *,
  label: str,
  log: bool,
  autoscale_noise: bool = False,
  **line_kw: Any,
) -> int:
  """Draws one reading: a line through its trusted values, its error band and its readings
  within noise.

  * The line joins the finite readings not within noise (non-finite ones are gaps; on a log
    axis, values ≤ 0 too); a lone reading is drawn as a point.
  * The band ``value ± half`` (``fill_between``, the line's colour, alpha 0.2, gid
    ``"band:{label}"``) covers the same readings.
  * Readings within noise are hollow grey circles (gid ``"noise:{label}"``) that widen the x
    range but are left out of the y autoscaling, unless ``autoscale_noise``.

  Returns:
    The number of readings within noise.
  """
  v = np.asarray(values, np.float64)
  noise = err.within_noise(v) if err is not None else np.zeros(v.shape, bool)
  keep = ~noise
  xs, y = steps[keep], masked(v[keep], positive=log)
  marker = "o" if np.sum(np.isfinite(y)) == 1 else None
  (line,) = ax.plot(xs, y, label=label, marker=marker, **line_kw)
  if err is not None:
    half = err.half[keep]
    ok = np.isfinite(y) & np.isfinite(half)
    if ok.any():
      lo, hi = np.where(ok, y - half, np.nan), np.where(ok, y + half, np.nan)
      if log:
        lo = np.where(lo > 0, lo, np.where(ok, y, np.nan))
      band = ax.fill_between(xs, lo, hi, where=ok, color=line.get_color(), alpha=0.2, lw=0)
      band.set_gid(f"band:{label}")
  n_noise = int(noise.sum())
  if n_noise:
    nx, ny = steps[noise].astype(np.float64), masked(v[noise], positive=log)
    dots = Line2D(nx, ny, ls="none", marker="o", mfc="none", mec="0.55", ms=4.0, zorder=3)
    dots.set_label(f"_{label} within noise")
    dots.set_gid(f"noise:{label}")
    if autoscale_noise:
      ax.add_line(dots)
    else:
      ax.add_artist(dots)  # add_artist leaves the data limits alone: widen x only
      ax.update_datalim(np.column_stack([nx, np.zeros_like(nx)]), updatey=False)
  return n_noise


def note_noise(ax: Any, notes: Sequence[tuple[str, int, int, str]], *, named: bool) -> str:
  """Writes at the bottom left of the axes how many readings are within noise, one line per
  ``(label, within noise, readings, rule)`` with a count > 0 (prefixed by ``"{label}: "``
  when ``named``, for axes of several lines), e.g.
  ``"3 of 40 readings within noise (2σ ≥ |value|): hollow"``.

  Returns:
    The text written (empty: nothing written).
  """
  shown = [n for n in notes if n[1]]
  lines = [
    (f"{label}: " if named else "") + f"{k} of {total} readings within noise ({rule}): hollow"
    for label, k, total, rule in shown
  ]
  if not lines:
    return ""
  text = "\n".join(lines)
  corner_note(ax, text, "lower left")
  return text


#: Where :func:`corner_note` writes: axes coordinates and alignment per corner.
_CORNERS = {
  "lower left": (0.02, 0.03, "left", "bottom"),
  "upper right": (0.98, 0.97, "right", "top"),
}


def corner_note(ax: Any, text: str, corner: str) -> None:
  """A small grey note on a white box in a corner of the axes (``"lower left"`` or
  ``"upper right"``): what the plot leaves out (readings within noise, values off the
  scale)."""
  x, y, ha, va = _CORNERS[corner]
  ax.text(
    x,
    y,
    text,
    ha=ha,
    va=va,
    fontsize="x-small",
    color="0.3",
    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.5},
    transform=ax.transAxes,
    zorder=6,
  )
