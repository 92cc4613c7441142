"""Figures of a recorded History: per-layer metrics, network-level scalars, histograms."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from jaxscope.plot._common import (
  FIGSIZE,
  MANY_LAYERS,
  ErrorBar,
  column_bounds,
  companion_parent,
  draw_reading,
  error_bar,
  log_worthy,
  mark_nonfinite,
  note_noise,
  scalar_series,
)
from jaxscope.plot.stacks import stack_families, stack_figure
from jaxscope.record import History

__all__ = ["histogram_figure", "metric_figure", "save_run_plots", "scalar_figure"]


NAN_NOT_MEASURED = frozenset({"alpha"})
"""Scalar keys whose NaN means "not measured yet" (α before the first update): a gap in the
line, not marked as non-finite."""


def _line_figure(
  series: Sequence[tuple[str, np.ndarray, np.ndarray, ErrorBar | None]],
  *,
  title: str,
  ylabel: str,
  logy: bool | None,
  nan_unmeasured: bool = False,
) -> Figure:
  """One line per ``(label, steps, values, error bar)`` with its band
  (:func:`~jaxscope.plot._common.draw_reading`); non-finite values are gaps marked in red
  (with ``nan_unmeasured``, only ±Inf is marked); readings within noise are hollow,
  counted in a note and left out of the y range and of the log-scale choice."""
  fig = Figure(figsize=FIGSIZE, layout="constrained")
  ax = fig.add_subplot()
  trusted = [v if e is None else v[~e.within_noise(v)] for _, _, v, e in series]
  some_trusted = any(np.isfinite(t).any() for t in trusted)
  if logy is None:
    logy = log_worthy(trusted, 100.0)
  bad_steps: list[np.ndarray] = []
  notes: list[tuple[str, int, int, str]] = []
  for label, steps, values, err in series:
    bad_steps.append(steps[np.isinf(values) if nan_unmeasured else ~np.isfinite(values)])
    k = draw_reading(
      ax, steps, values, err, label=label, log=bool(logy), autoscale_noise=not some_trusted
    )
    if err is not None:
      notes.append((label, k, int(np.isfinite(values).sum()), err.rule))
  if logy:
    ax.set_yscale("log")
  marked = mark_nonfinite(ax, np.concatenate(bad_steps) if bad_steps else [], unit=" steps")
  note_noise(ax, notes, named=len(series) > 1)
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if len(series) > 1 or marked:
    if len(series) > MANY_LAYERS:
      ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    else:
      ax.legend(fontsize="small")
  return fig


def _with_error(history: History, key: str) -> tuple[np.ndarray, np.ndarray, ErrorBar | None]:
  """``(steps, values, error bar)`` of a scalar key (error bar: ``None`` without one)."""
  steps, values = scalar_series(history, key)
  return steps, values, error_bar(history, key, steps)


def metric_figure(
  history: History,
  topic: str,
  stat: str,
  layers: Sequence[str] | None = None,
  *,
  logy: bool | None = None,
) -> Figure:
  """Line plot of a per-layer metric ``{topic}/{stat}/{layer}`` over steps.

  Args:
    history: the recorded run.
    topic: e.g. ``"grads"``.
    stat: e.g. ``"norm"``.
    layers: the layers to draw (default: all recorded ones, one line each, labelled
      with the layer name).
    logy: log y scale; ``None`` picks it when all finite values (less those within noise)
      are positive and span more than two decades.

  Returns:
    A figure titled ``"{topic}/{stat}"``. A layer recorded with an error bar
    ``{topic}/{stat}_stderr/{layer}`` (a standard error) or ``{topic}/{stat}_residual/{layer}``
    (a convergence residual) gets the band ``value ± 2σ`` or ``value ± residual``; its
    readings within noise (``2σ ≥ |value|``, or ``residual ≥ |value|/2``) are hollow grey
    circles left out of the line and the y range, and a note counts them.

  Raises:
    KeyError: nothing recorded under ``{topic}/{stat}`` (or for a given layer).
    ValueError: the stat is not a scalar per step (e.g. a histogram).
  """
  if layers is None:
    layers = history.layers(topic, stat)
    if not layers:
      pairs = [f"{t}/{s}" for t in history.topics() for s in history.stats(t)]
      raise KeyError(f"metric_figure: no layer recorded under {topic}/{stat}; have {pairs}.")
  series = [(lay, *_with_error(history, f"{topic}/{stat}/{lay}")) for lay in layers]
  return _line_figure(series, title=f"{topic}/{stat}", ylabel=stat, logy=logy)


def scalar_figure(history: History, key: str, *, logy: bool | None = None) -> Figure:
  """Line plot of one scalar key over steps (``"loss"``, ``"accuracy"``, …).

  Args:
    history: the recorded run.
    key: the recorded key.
    logy: as in :func:`metric_figure`.

  Returns:
    A figure titled ``key``, with the band of ``{key}_stderr`` or ``{key}_residual`` when
    recorded (as in :func:`metric_figure`). A NaN of a key in :data:`NAN_NOT_MEASURED`
    (``alpha``) is a gap without a mark.
  """
  series = [(key, *_with_error(history, key))]
  return _line_figure(
    series, title=key, ylabel=key, logy=logy, nan_unmeasured=key in NAN_NOT_MEASURED
  )


def histogram_figure(
  history: History,
  topic: str,
  layer: str,
  *,
  stat: str = "histogram",
  log_counts: bool = True,
) -> Figure:
  """Histogram of a layer's values over time: x = step, y = value, colour = count.

  Each recorded step is a column spanning half-way to its neighbours, drawn with that
  step's own bin edges (they move from step to step when the range is automatic); the
  columns are drawn as one mesh, with no resampling to a common grid. Steps whose
  edges are not finite are left blank.

  Args:
    history: the recorded run, holding ``{topic}/{stat}_counts/{layer}`` and
      ``{topic}/{stat}_edges/{layer}``.
    topic: e.g. ``"grads"``.
    layer: the layer name.
    stat: the histogram metric's name.
    log_counts: logarithmic colour scale (empty bins are left blank).

  Returns:
    A figure titled ``"{topic}/{stat}/{layer}"`` with a colour bar.

  Raises:
    KeyError: the counts or edges were not recorded.
    ValueError: counts and edges do not match.
  """
  csteps, counts = history.series(f"{topic}/{stat}_counts/{layer}")
  esteps, edges = history.series(f"{topic}/{stat}_edges/{layer}")
  common, ci, ei = np.intersect1d(csteps, esteps, return_indices=True)
  counts, edges = counts[ci].astype(np.float64), edges[ei].astype(np.float64)
  if counts.ndim != 2 or edges.ndim != 2 or edges.shape[1] != counts.shape[1] + 1:
    raise ValueError(
      f"histogram_figure: counts {counts.shape} and edges {edges.shape} of {layer!r} do "
      "not match (expected [steps, bins] and [steps, bins + 1])."
    )
  fig = Figure(figsize=FIGSIZE, layout="constrained")
  ax = fig.add_subplot()
  ax.set_title(f"{topic}/{stat}/{layer}")
  ax.set_xlabel("step")
  ax.set_ylabel(topic)
  n, bins = counts.shape
  if n == 0:
    return fig
  bounds = column_bounds(common)
  # One mesh of 2n−1 columns: column 2j is step j (its own edges on both sides), the
  # zero-width odd columns between steps are masked.
  x = np.repeat(bounds, 2)[1:-1]  # b0 b1 b1 b2 b2 … bn
  good = np.all(np.isfinite(edges), axis=1)
  y_cols = np.where(good[:, None], edges, 0.0)  # pcolormesh needs finite coordinates.
  yy = np.repeat(y_cols, 2, axis=0).T  # [bins + 1, 2n]
  xx = np.broadcast_to(x, yy.shape)
  c = np.zeros((bins, 2 * n - 1))
  mask = np.ones_like(c, dtype=bool)
  c[:, 0::2] = counts.T
  mask[:, 0::2] = ~good[None, :]
  if log_counts:
    mask |= c <= 0
    positive = c[~mask]
    norm: Normalize = LogNorm(
      vmin=float(positive.min()) if positive.size else 1.0,
      vmax=float(positive.max()) if positive.size else 10.0,
    )
  else:
    norm = Normalize(vmin=0.0, vmax=float(c[~mask].max()) if (~mask).any() else 1.0)
  mesh = ax.pcolormesh(xx, yy, np.ma.array(c, mask=mask), norm=norm, cmap="viridis")
  fig.colorbar(mesh, ax=ax, label="count")
  ax.set_xlim(bounds[0], bounds[-1])
  return fig


def _file_name(*parts: str) -> str:
  name = "_".join(p.replace("/", "_") for p in parts)
  return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".png"


def save_run_plots(
  history: History | str | os.PathLike[str],
  out_dir: str | os.PathLike[str],
  *,
  dpi: int = 100,
) -> list[Path]:
  """Saves every plot of a run as PNG files.

  Writes ``{topic}_{stat}.png`` per per-layer scalar metric (:func:`metric_figure`),
  ``{topic}_{stat}_stack.png`` when the metric has layers of stacked leaves
  (:func:`~jaxscope.plot.stacks.stack_figure`), ``{key}.png`` per network-level scalar
  key (:func:`scalar_figure`), and
  ``{topic}_{stat}_{layer}.png`` per histogram (:func:`histogram_figure`, ``/`` in the
  layer name replaced by ``_``). Other array-valued keys are skipped, and so are the error
  bars of a recorded reading (``K_stderr``, ``K_residual``, ``{topic}/{stat}_stderr/…``):
  they are drawn as the band of ``K``, not as a metric of their own.

  Args:
    history: the recorded run, or its run directory.
    out_dir: the output directory (created with its parents).
    dpi: resolution of the PNG files.

  Returns:
    The paths written, in that order.
  """
  if not isinstance(history, History):
    history = History.load(history)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths: list[Path] = []

  def save(fig: Figure, name: str) -> None:
    path = out / name
    fig.savefig(path, dpi=dpi)
    paths.append(path)

  histograms: list[tuple[str, str, str]] = []
  for topic in history.topics():
    stats = history.stats(topic)
    for stat in stats:
      layers = history.layers(topic, stat)
      if stat.endswith("_counts") and stat[: -len("_counts")] + "_edges" in stats:
        histograms += [(topic, stat[: -len("_counts")], lay) for lay in layers]
        continue
      if companion_parent(stat, stats) is not None:
        continue  # an error bar: the band of its parent
      scalar = [lay for lay in layers if history[f"{topic}/{stat}/{lay}"].ndim == 1]
      if scalar:
        save(metric_figure(history, topic, stat, scalar), _file_name(topic, stat))
        if stack_families(scalar):
          save(stack_figure(history, topic, stat), _file_name(topic, stat, "stack"))
  keys = history.keys()
  for key in keys:
    if key.count("/") < 2 and history[key].ndim == 1 and companion_parent(key, keys) is None:
      save(scalar_figure(history, key), _file_name(key))
  for topic, stat, layer in histograms:
    save(histogram_figure(history, topic, layer, stat=stat), _file_name(topic, stat, layer))
  return paths
