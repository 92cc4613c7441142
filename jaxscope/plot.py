"""Figures of a recorded run: per-layer metrics, network-level scalars, histograms.

Every function returns a :class:`matplotlib.figure.Figure` built directly (not through
``pyplot``), so nothing global is touched: no figure is registered with pyplot, none is
shown, and a figure is freed like any Python object once unreferenced. Show one in a
notebook by evaluating it, or save it with ``fig.savefig(path)``.

Non-finite values (NaN, ±Inf) are drawn as gaps in the lines and marked with a red
``x`` at the top of the axes at their steps, so a divergence is not hidden.

:func:`cockpit` draws the values of :func:`jaxscope.metrics.instruments` on one page, as
Cockpit's ``CockpitPlotter`` does (loss, α, gradient tests, distance, curvature, TIC and the
per-example gradient histograms).

The checkpoint analyses of :mod:`jaxscope.analysis` have their own figures:
:func:`path_figure` (loss and accuracy along interpolation paths with the real training
curve), :func:`layer_paths_figure` and :func:`parameter_paths_figure` (overlays with
distance-coded opacity), :func:`landscape_figure` and :func:`surface_figure` (contours with
data-derived levels and the trajectory, 3-D surface, 1-D loss/accuracy) and
:func:`robustness_figure` (the re-initialisation heat-map with the layer classes).

Example:
  >>> import tempfile
  >>> from jaxscope.plot import metric_figure, save_run_plots
  >>> from jaxscope.record import History
  >>> h = History([(s, {"loss": 1 / (s + 1), "grads/norm/Dense_0/kernel": 0.5 * s})
  ...              for s in range(10)])
  >>> fig = metric_figure(h, "grads", "norm")
  >>> [line.get_label() for line in fig.axes[0].get_lines()]
  ['Dense_0/kernel']
  >>> [p.name for p in save_run_plots(h, tempfile.mkdtemp())]
  ['grads_norm.png', 'loss.png']
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from jaxscope.record import History

__all__ = [
  "cockpit",
  "diagnosis_figure",
  "histogram_figure",
  "landscape_figure",
  "layer_paths_figure",
  "metric_figure",
  "parameter_paths_figure",
  "path_figure",
  "robustness_figure",
  "save_run_plots",
  "scalar_figure",
  "surface_figure",
]

_FIGSIZE = (8.0, 4.5)
_MANY_LAYERS = 12


def _auto_logy(values: Sequence[np.ndarray]) -> bool:
  """Log scale when all finite values are > 0 and span more than 2 decades."""
  finite = [v[np.isfinite(v)] for v in values]
  finite = [v for v in finite if v.size]
  if not finite:
    return False
  allv = np.concatenate(finite)
  lo, hi = float(allv.min()), float(allv.max())
  return lo > 0 and hi / lo > 100.0


def _scalar_series(history: History, key: str) -> tuple[np.ndarray, np.ndarray]:
  steps, values = history.series(key)
  if values.ndim != 1:
    raise ValueError(
      f"{key!r} holds arrays of shape {values.shape[1:]} per step, not scalars "
      "(for histograms use histogram_figure)."
    )
  return steps, values.astype(np.float64)


def _line_figure(
  series: Sequence[tuple[str, np.ndarray, np.ndarray]],
  *,
  title: str,
  ylabel: str,
  logy: bool | None,
) -> Figure:
  fig = Figure(figsize=_FIGSIZE, layout="constrained")
  ax = fig.add_subplot()
  ys = []
  bad_steps: list[np.ndarray] = []
  for label, steps, values in series:
    bad = ~np.isfinite(values)
    y = np.where(bad, np.nan, values)
    ys.append(y)
    bad_steps.append(steps[bad])
    marker = "o" if len(steps) == 1 else None
    ax.plot(steps, y, label=label, marker=marker)
  if logy is None:
    logy = _auto_logy(ys)
  if logy:
    ax.set_yscale("log")
  nonfinite = np.unique(np.concatenate(bad_steps)) if bad_steps else np.zeros(0)
  if nonfinite.size:
    # x in data coordinates, y at the top of the axes: visible whatever the y range.
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    ax.scatter(
      nonfinite,
      np.ones_like(nonfinite, dtype=np.float64),
      transform=trans,
      marker="x",
      color="red",
      clip_on=False,
      zorder=5,
      label=f"non-finite ({nonfinite.size} steps)",
    )
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if len(series) > 1 or nonfinite.size:
    if len(series) > _MANY_LAYERS:
      ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    else:
      ax.legend(fontsize="small")
  return fig


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
    logy: log y scale; ``None`` picks it when all finite values are positive and span
      more than two decades.

  Returns:
    A figure titled ``"{topic}/{stat}"``.

  Raises:
    KeyError: nothing recorded under ``{topic}/{stat}`` (or for a given layer).
    ValueError: the stat is not a scalar per step (e.g. a histogram).
  """
  if layers is None:
    layers = history.layers(topic, stat)
    if not layers:
      pairs = [f"{t}/{s}" for t in history.topics() for s in history.stats(t)]
      raise KeyError(f"metric_figure: no layer recorded under {topic}/{stat}; have {pairs}.")
  series = [(lay, *_scalar_series(history, f"{topic}/{stat}/{lay}")) for lay in layers]
  return _line_figure(series, title=f"{topic}/{stat}", ylabel=stat, logy=logy)


def scalar_figure(history: History, key: str, *, logy: bool | None = None) -> Figure:
  """Line plot of one scalar key over steps (``"loss"``, ``"accuracy"``, …).

  Args:
    history: the recorded run.
    key: the recorded key.
    logy: as in :func:`metric_figure`.

  Returns:
    A figure titled ``key``.
  """
  steps, values = _scalar_series(history, key)
  return _line_figure([(key, steps, values)], title=key, ylabel=key, logy=logy)


def _column_bounds(steps: np.ndarray) -> np.ndarray:
  """Boundaries of the step columns: midpoints between steps, half a gap at the ends."""
  s = steps.astype(np.float64)
  if s.size == 1:
    return np.array([s[0] - 0.5, s[0] + 0.5])
  mid = 0.5 * (s[:-1] + s[1:])
  return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


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
  fig = Figure(figsize=_FIGSIZE, layout="constrained")
  ax = fig.add_subplot()
  ax.set_title(f"{topic}/{stat}/{layer}")
  ax.set_xlabel("step")
  ax.set_ylabel(topic)
  n, bins = counts.shape
  if n == 0:
    return fig
  bounds = _column_bounds(common)
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
  ``{key}.png`` per network-level scalar key (:func:`scalar_figure`), and
  ``{topic}_{stat}_{layer}.png`` per histogram (:func:`histogram_figure`, ``/`` in the
  layer name replaced by ``_``). Other array-valued keys are skipped.

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
      scalar = [lay for lay in layers if history[f"{topic}/{stat}/{lay}"].ndim == 1]
      if scalar:
        save(metric_figure(history, topic, stat, scalar), _file_name(topic, stat))
  for key in history.keys():
    if key.count("/") < 2 and history[key].ndim == 1:
      save(scalar_figure(history, key), _file_name(key))
  for topic, stat, layer in histograms:
    save(histogram_figure(history, topic, layer, stat=stat), _file_name(topic, stat, layer))
  return paths


# ------------------------------------------------------------------- checkpoint analyses
#
# Figures of :mod:`jaxscope.analysis` results. They take the result objects by their
# attributes (``PathResult``: ``alpha``, ``loss``, ``accuracy``, ``kind``, ``name``,
# ``distance``; ``Landscape``: ``x``, ``y``, ``loss``, ``accuracy``, ``settings``;
# ``RobustnessResult``), so this module does not import jax.

_PATH_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
_CLASS_COLOURS = {"critical": "tab:red", "ambient": "tab:green", "intermediate": "tab:orange"}


def _masked(values: Any, *, positive: bool = False) -> np.ndarray:
  """``values`` as float64 with non-finite entries (and, with ``positive``, entries ≤ 0)
  replaced by NaN, which matplotlib leaves out of lines and masked meshes."""
  v = np.asarray(values, np.float64)
  bad = ~np.isfinite(v)
  if positive:
    bad |= v <= 0
  return np.where(bad, np.nan, v)


def _log_worthy(values: Sequence[Any], ratio: float) -> bool:
  """Whether all finite values are > 0 and span more than ``ratio``."""
  finite = [np.asarray(v, np.float64) for v in values]
  finite = [v[np.isfinite(v)] for v in finite]
  finite = [v for v in finite if v.size]
  if not finite:
    return False
  allv = np.concatenate(finite)
  return float(allv.min()) > 0 and float(allv.max()) > ratio * float(allv.min())


def _mark_nonfinite(ax: Any, xs: np.ndarray, label: str = "non-finite") -> None:
  """Red ``x`` at the top of the axes at the x positions ``xs`` (a divergence is shown,
  not hidden)."""
  xs = np.unique(np.asarray(xs, np.float64))
  if not xs.size:
    return
  trans = blended_transform_factory(ax.transData, ax.transAxes)
  ax.scatter(
    xs,
    np.ones_like(xs),
    transform=trans,
    marker="x",
    color="red",
    clip_on=False,
    zorder=5,
    label=f"{label} ({xs.size})",
  )


def _opacities(distances: Sequence[float], floor: float = 0.1) -> np.ndarray:
  """Min–max-normalised distances, floored at ``floor`` (nnvis's line opacity); 1 for
  all when they are equal or not finite."""
  d = np.asarray(distances, np.float64)
  ok = np.isfinite(d)
  out = np.ones_like(d)
  if ok.sum() >= 2:
    lo, hi = float(d[ok].min()), float(d[ok].max())
    if hi > lo:
      out[ok] = np.maximum(floor, (d[ok] - lo) / (hi - lo))
  return out


def _endpoints(ax: Any) -> None:
  for a in (0.0, 1.0):
    ax.axvline(a, color="0.6", lw=0.8, ls=":", zorder=0)


def _has_accuracy(results: Sequence[Any]) -> bool:
  """Whether any result carries a finite, non-zero accuracy (regression stores 0)."""
  for r in results:
    a = np.asarray(r.accuracy, np.float64)
    if np.any(np.isfinite(a) & (a != 0)):
      return True
  return False


def _real_points(real: Any) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
  if real is None:
    return None
  items = list(real.values()) if isinstance(real, dict) else list(real)
  if len(items) not in (2, 3):
    raise ValueError(
      f"path_figure: real must be (alpha_t, loss_t) or (alpha_t, loss_t, labels), "
      f"got {len(items)} items."
    )
  a = np.asarray(items[0], np.float64).reshape(-1)
  lt = np.asarray(items[1], np.float64).reshape(-1)
  if len(a) != len(lt):
    raise ValueError(f"path_figure: {len(a)} real alphas but {len(lt)} real losses.")
  labels = [str(s) for s in items[2]] if len(items) == 3 and items[2] is not None else []
  if labels and len(labels) != len(a):
    raise ValueError(f"path_figure: {len(labels)} labels for {len(a)} real checkpoints.")
  return a, lt, labels


def _path_mae(path: Any, alpha_t: np.ndarray, loss_t: np.ndarray) -> float:
  """As :func:`jaxscope.analysis.path_error`, on finite values only: the mean absolute
  error of the path's loss (interpolated at ``alpha_t``) against ``loss_t``."""
  a = np.asarray(path.alpha, np.float64)
  lo = np.asarray(path.loss, np.float64)
  good = np.isfinite(a) & np.isfinite(lo)
  if good.sum() < 1:
    return float("nan")
  a, lo = a[good], lo[good]
  order = np.argsort(a)
  a, lo = a[order], lo[order]
  inside = (alpha_t >= a[0]) & (alpha_t <= a[-1]) & np.isfinite(loss_t)
  if not inside.any():
    return float("nan")
  return float(np.mean(np.abs(np.interp(alpha_t[inside], a, lo) - loss_t[inside])))


def path_figure(
  paths: Sequence[Any],
  real: Any = None,
  *,
  logy: bool | None = None,
  accuracy: bool | None = None,
  title: str | None = None,
) -> Figure:
  """Loss (left axis) and accuracy (right axis, dashed) along interpolation paths.

  Draws each path's loss against α (e.g. the linear and the quadratic path of
  :func:`jaxscope.analysis.model_path`), the checkpoints themselves as black points at
  their projected coordinate ``α_t`` with their true loss (the "real" training curve,
  labelled with their steps), and dotted lines at α = 0 and 1. With ``real`` given, each
  path's legend entry shows its mean absolute error against the real points inside its α
  range (:func:`jaxscope.analysis.path_error`): the smaller, the more faithful the path.
  Non-finite losses are left out and marked with a red ``x`` at the top of the axes.

  Args:
    paths: :class:`jaxscope.analysis.PathResult` objects.
    real: ``(alpha_t, loss_t)`` or ``(alpha_t, loss_t, labels)`` of the checkpoints, or
      ``None``.
    logy: log scale for the loss; ``None`` picks it when all finite losses are positive
      and span more than a decade (the loss along a path often stays high until α ≈ 1).
    accuracy: draw the accuracy on a twin axis; ``None``: when any path has a non-zero
      accuracy (not for regression).
    title: the figure title (default: the paths' level).

  Returns:
    The figure; ``fig.axes[0]`` is the loss axis, ``fig.axes[1]`` the accuracy axis.
  """
  paths = list(paths)
  pts = _real_points(real)
  fig = Figure(figsize=_FIGSIZE, layout="constrained")
  ax = fig.add_subplot()
  losses = [np.asarray(p.loss, np.float64) for p in paths]
  if pts is not None:
    losses.append(pts[1])
  if logy is None:
    logy = _log_worthy(losses, 10.0)
  if accuracy is None:
    accuracy = _has_accuracy(paths)
  ax2 = ax.twinx() if accuracy else None
  bad: list[np.ndarray] = []
  for i, p in enumerate(paths):
    colour = _PATH_COLOURS[i % len(_PATH_COLOURS)]
    alpha = np.asarray(p.alpha, np.float64)
    loss = np.asarray(p.loss, np.float64)
    bad.append(alpha[~np.isfinite(loss)])
    label = p.kind if p.name == "model" else f"{p.kind} {p.name}"
    if pts is not None:
      label += f" (MAE {_path_mae(p, pts[0], pts[1]):.3g})"
    ax.plot(alpha, _masked(loss, positive=logy), color=colour, label=label)
    if ax2 is not None:
      ax2.plot(alpha, _masked(p.accuracy), color=colour, ls="--", alpha=0.7)
  if pts is not None:
    a, lt, labels = pts
    ok = np.isfinite(a) & np.isfinite(lt) & ((lt > 0) if logy else True)
    ax.scatter(a[ok], lt[ok], color="black", zorder=6, s=18, label="checkpoints (true loss)")
    for j in np.flatnonzero(ok):
      if labels:
        ax.annotate(
          labels[j], (a[j], lt[j]), textcoords="offset points", xytext=(3, 4), fontsize="x-small"
        )
    bad.append(a[np.isfinite(a) & ~np.isfinite(lt)])
  if logy:
    ax.set_yscale("log")
  _endpoints(ax)
  _mark_nonfinite(ax, np.concatenate(bad) if bad else np.zeros(0), "non-finite loss")
  level = paths[0].level if paths else "model"
  ax.set_title(title or f"{level}-level interpolation paths")
  ax.set_xlabel("α (0: first checkpoint, 1: final checkpoint)")
  ax.set_ylabel("loss")
  ax.grid(True, alpha=0.3)
  if ax2 is not None:
    ax2.set_ylabel("accuracy (dashed)")
    ax2.set_ylim(-0.02, 1.02)
  if paths or pts is not None:
    ax.legend(fontsize="small", loc="best")
  return fig


def layer_paths_figure(
  layer_results: Mapping[str, Any] | Sequence[Any],
  model_result: Any = None,
  *,
  logy: bool | None = None,
  title: str | None = None,
) -> Figure:
  """All layers' path curves in one plot, each line's opacity coded by how far that layer
  moved (min–max-normalised ``‖θ_f − θ_0‖``, floored at 0.1, as nnvis), with the
  model-level curve in bold black.

  At α = 0 a layer's value is the re-initialisation test of Zhang et al.: a flat curve is
  an ambient layer, one that climbs towards α = 0 a critical one.

  Args:
    layer_results: ``{layer: PathResult}`` (:func:`jaxscope.analysis.layer_paths`) or a
      sequence of them.
    model_result: the model-level path (or several, e.g. linear and quadratic), or ``None``.
    logy: log scale for the loss (``None``: when all finite losses are positive and span
      more than a decade).
    title: the figure title.

  Returns:
    The figure.
  """
  results = list(layer_results.values() if isinstance(layer_results, Mapping) else layer_results)
  if model_result is None:
    models = []
  elif hasattr(model_result, "alpha"):
    models = [model_result]
  else:
    models = list(model_result)
  fig = Figure(figsize=_FIGSIZE, layout="constrained")
  ax = fig.add_subplot()
  if logy is None:
    logy = _log_worthy([r.loss for r in results + models], 10.0)
  opac = _opacities([r.distance for r in results])
  palette = "tab10" if len(results) <= 10 else "tab20"
  from matplotlib import colormaps

  cmap = colormaps[palette]
  bad: list[np.ndarray] = []
  for i, (r, o) in enumerate(zip(results, opac, strict=True)):
    alpha = np.asarray(r.alpha, np.float64)
    loss = np.asarray(r.loss, np.float64)
    bad.append(alpha[~np.isfinite(loss)])
    ax.plot(
      alpha,
      _masked(loss, positive=logy),
      color=cmap(i % cmap.N),
      alpha=float(o),
      label=f"{r.name} (‖Δθ‖ {r.distance:.3g})",
    )
  for j, m in enumerate(models):
    alpha = np.asarray(m.alpha, np.float64)
    loss = np.asarray(m.loss, np.float64)
    bad.append(alpha[~np.isfinite(loss)])
    ax.plot(
      alpha,
      _masked(loss, positive=logy),
      color="black",
      lw=2.5,
      ls="-" if j == 0 else "--",
      label=f"model ({m.kind})",
      zorder=4,
    )
  if logy:
    ax.set_yscale("log")
  _endpoints(ax)
  _mark_nonfinite(ax, np.concatenate(bad) if bad else np.zeros(0), "non-finite loss")
  kind = results[0].kind if results else (models[0].kind if models else "")
  ax.set_title(title or f"layer-level {kind} paths (opacity: distance moved)")
  ax.set_xlabel("α (the layer moves from the first to the final checkpoint)")
  ax.set_ylabel("loss")
  ax.grid(True, alpha=0.3)
  if results or models:
    if len(results) + len(models) > _MANY_LAYERS:
      ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    else:
      ax.legend(fontsize="small")
  return fig


def _param_layer(name: str) -> tuple[str, str]:
  """``"conv1/kernel[0,1]"`` → ``("conv1", "kernel[0,1]")``."""
  leaf, _, idx = name.partition("[")
  layer, _, tail = leaf.rpartition("/")
  tail = tail + (f"[{idx}" if idx else "")
  return (layer or leaf), tail


def parameter_paths_figure(
  results: Sequence[Any],
  *,
  logy: bool | None = None,
  max_cols: int = 3,
  title: str | None = None,
) -> Figure:
  """Individual-parameter paths, one panel per layer (nnvis's ``plot_params_by_layer``).

  Each line is one scalar following the path while everything else stays at the final
  model; its opacity is the scalar's displacement ``|θ_f[i] − θ_0[i]|``, min–max
  normalised within the panel and floored at 0.1.

  Args:
    results: parameter-level :class:`jaxscope.analysis.PathResult` objects (names
      ``"{leaf}[{index}]"``, :func:`jaxscope.analysis.parameter_paths`).
    logy: log scale (``None``: when all finite losses are positive and span more than a
      decade).
    max_cols: panels per row.
    title: the figure title.

  Returns:
    The figure, one axes per layer (one empty axes when ``results`` is empty).
  """
  results = list(results)
  groups: dict[str, list[Any]] = {}
  for r in results:
    groups.setdefault(_param_layer(r.name)[0], []).append(r)
  n = max(1, len(groups))
  cols = max(1, min(max_cols, n))
  rows = -(-n // cols)
  fig = Figure(figsize=(4.2 * cols + 0.6, 3.2 * rows + 0.6), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  if logy is None:
    logy = _log_worthy([r.loss for r in results], 10.0)
  kind = results[0].kind if results else ""
  fig.suptitle(title or f"parameter-level {kind} paths (opacity: |Δθ|)")
  if not results:
    axes[0, 0].text(0.5, 0.5, "no parameters", ha="center", va="center")
  for gi, (layer, rs) in enumerate(groups.items()):
    ax = axes[gi // cols, gi % cols]
    colour = _PATH_COLOURS[gi % len(_PATH_COLOURS)]
    bad: list[np.ndarray] = []
    for r, o in zip(rs, _opacities([r.distance for r in rs]), strict=True):
      alpha = np.asarray(r.alpha, np.float64)
      loss = np.asarray(r.loss, np.float64)
      bad.append(alpha[~np.isfinite(loss)])
      ax.plot(
        alpha,
        _masked(loss, positive=logy),
        color=colour,
        alpha=float(o),
        label=f"{_param_layer(r.name)[1]} |Δ| {r.distance:.2g}",
      )
    if logy:
      ax.set_yscale("log")
    _endpoints(ax)
    _mark_nonfinite(ax, np.concatenate(bad), "non-finite")
    ax.set_title(layer, fontsize="medium")
    ax.set_xlabel("α")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="xx-small")
  for gi in range(len(groups), rows * cols):
    if gi:
      axes[gi // cols, gi % cols].set_visible(False)
  return fig


def _levels(z: np.ndarray, n: int, log: bool | None) -> tuple[np.ndarray, Normalize, bool] | None:
  """Contour levels from the data: log-spaced when all finite values are positive and span
  more than a decade (or ``log=True``), else at quantiles (so every band holds values,
  unlike the original's fixed ``[0.1, 10)``). ``None`` when nothing is finite."""
  from matplotlib.colors import BoundaryNorm

  v = z[np.isfinite(z)]
  if not v.size:
    return None
  lo, hi = float(v.min()), float(v.max())
  if log is None:
    log = lo > 0 and hi > 10 * lo
  if log and lo > 0 and hi > lo:
    lv = np.geomspace(lo, hi, max(2, n))
    return lv, LogNorm(vmin=lv[0], vmax=lv[-1]), True
  lv = np.unique(np.quantile(v, np.linspace(0.0, 1.0, max(2, n))))
  if len(lv) < 2:
    d = max(abs(lo) * 1e-3, 1e-12)
    lv = np.array([lo - d, lo + d])
  return lv, BoundaryNorm(lv, 256), False


def _trajectory_points(trajectory: Any) -> tuple[np.ndarray, list[str]]:
  if isinstance(trajectory, Mapping):
    coords, labels = trajectory.get("coords"), trajectory.get("labels")
  else:
    items = list(trajectory)
    coords, labels = items[0], (items[1] if len(items) > 1 else None)
  c = np.asarray(coords, np.float64)
  if c.ndim == 1:
    c = c[:, None]
  labs = [str(s) for s in labels] if labels is not None else []
  if labs and len(labs) != len(c):
    raise ValueError(f"landscape_figure: {len(labs)} trajectory labels for {len(c)} points.")
  return c, labs


def _axis_labels(landscape: Any, explained_variance: Any) -> list[str]:
  ev = explained_variance
  if ev is None:
    ev = (landscape.settings or {}).get("explained_variance_ratio")
  if ev is not None:
    ev = np.asarray(ev, np.float64).reshape(-1)
    names = ("1st PC", "2nd PC", "3rd PC")
    return [f"{names[k]}: {100 * ev[k]:.2f} %" for k in range(min(len(ev), 3))] + [
      "direction 2"
    ] * max(0, 2 - len(ev))
  return ["direction 1 (δ)", "direction 2 (η)"]


def _landscape_1d(
  fig: Figure, landscape: Any, trajectory: Any, labels: list[str], logy: bool | None
) -> None:
  ax = fig.add_subplot()
  x = np.asarray(landscape.x, np.float64)
  loss = np.asarray(landscape.loss, np.float64)
  if logy is None:
    logy = _log_worthy([loss], 10.0)
  ax.plot(x, _masked(loss, positive=logy), color="tab:blue", label="loss")
  ax.plot(
    [0.0], [landscape.center_loss], marker="*", color="black", ms=10, ls="", label="centre θ*"
  )
  if trajectory is not None:
    c, labs = _trajectory_points(trajectory)
    tl = (
      np.asarray(trajectory.get("loss"), np.float64)
      if isinstance(trajectory, Mapping) and trajectory.get("loss") is not None
      else np.interp(c[:, 0], x, _masked(loss))
    )
    ax.scatter(c[:, 0], tl, color="black", s=14, zorder=6, label="checkpoints")
    for j, lab in enumerate(labs):
      ax.annotate(lab, (c[j, 0], tl[j]), textcoords="offset points", xytext=(3, 4), fontsize=6)
  if logy:
    ax.set_yscale("log")
  _mark_nonfinite(ax, x[~np.isfinite(loss)], "non-finite loss")
  ax.set_xlabel(labels[0])
  ax.set_ylabel("loss")
  ax.grid(True, alpha=0.3)
  acc = np.asarray(landscape.accuracy, np.float64)
  if np.any(np.isfinite(acc) & (acc != 0)):
    ax2 = ax.twinx()
    ax2.plot(x, _masked(acc), color="tab:orange", ls="--", label="accuracy")
    ax2.set_ylabel("accuracy (dashed)")
    ax2.set_ylim(-0.02, 1.02)
  ax.legend(fontsize="small")


def landscape_figure(
  landscape: Any,
  trajectory: Any = None,
  *,
  explained_variance: Any = None,
  levels: int = 20,
  logz: bool | None = None,
  title: str | None = None,
) -> Figure:
  """A loss landscape: filled contours of a 2-D grid, or loss and accuracy of a 1-D line.

  2-D: ``loss[iy, ix]`` over ``x × y`` (any shape; grids with one row or column are drawn
  as a mesh), contour levels from the data (log-spaced when all values are positive and
  span more than a decade, else at quantiles; never the original's fixed ``[0.1, 10)``
  that left most plots empty), the centre ``θ*`` as a star, non-finite points blank, and
  optionally the trajectory's projected checkpoints joined in training order. The axes
  are labelled with the explained variance of the PCA directions when known.

  1-D: loss on the left axis and accuracy (dashed) on a twin right axis.

  Args:
    landscape: a :class:`jaxscope.analysis.Landscape`.
    trajectory: ``(coords [T, 2], labels)`` or ``{"coords": …, "labels": …}`` (for 1-D
      also ``"loss"``: the checkpoints' loss to draw them at), or ``None``.
    explained_variance: per-axis explained-variance ratios (default:
      ``landscape.settings["explained_variance_ratio"]`` when present).
    levels: the number of contour levels.
    logz: log-spaced levels (``None``: automatic, above).
    title: the figure title.

  Returns:
    The figure (``fig.axes[0]`` is the plot).
  """
  labels = _axis_labels(landscape, explained_variance)
  fig = Figure(figsize=(7.0, 5.5) if landscape.y is not None else _FIGSIZE, layout="constrained")
  if landscape.y is None:
    _landscape_1d(fig, landscape, trajectory, labels, logz)
    fig.axes[0].set_title(title or "1-D loss landscape")
    return fig
  ax = fig.add_subplot()
  x = np.asarray(landscape.x, np.float64)
  y = np.asarray(landscape.y, np.float64)
  z = _masked(landscape.loss)
  if z.shape != (len(y), len(x)):
    raise ValueError(
      f"landscape_figure: loss has shape {z.shape}, not (ny, nx) = {len(y), len(x)}."
    )
  lv = _levels(z, levels, logz)
  if lv is None:
    ax.text(0.5, 0.5, "no finite loss values", ha="center", va="center", transform=ax.transAxes)
  else:
    lev, norm, is_log = lv
    zz = np.ma.masked_invalid(np.where(z <= 0, np.nan, z) if is_log else z)
    if min(z.shape) >= 2:
      cs = ax.contourf(x, y, zz, levels=lev, norm=norm, cmap="viridis", extend="neither")
      ax.contour(x, y, zz, levels=lev, colors="k", linewidths=0.3, alpha=0.5)
    else:
      cs = ax.pcolormesh(x, y, zz, norm=norm, cmap="viridis", shading="nearest")
    cb = fig.colorbar(cs, ax=ax, label="loss")
    if not is_log and len(lev) > 9:
      cb.set_ticks(lev[:: max(1, len(lev) // 8)])
    cb.ax.yaxis.set_major_formatter("{x:.4g}")
  ax.plot([0.0], [0.0], marker="*", color="white", mec="black", ms=12, ls="", label="centre θ*")
  if trajectory is not None:
    c, labs = _trajectory_points(trajectory)
    if c.shape[1] < 2:
      c = np.concatenate([c, np.zeros((len(c), 1))], axis=1)
    ax.plot(c[:, 0], c[:, 1], "-", color="white", lw=1.0, zorder=4)
    ax.scatter(
      c[:, 0], c[:, 1], color="red", edgecolors="white", s=22, zorder=5, label="checkpoints"
    )
    from matplotlib.patheffects import withStroke

    halo = [withStroke(linewidth=2, foreground="white")]
    for j, lab in enumerate(labs):
      ax.annotate(
        lab,
        (c[j, 0], c[j, 1]),
        textcoords="offset points",
        xytext=(3, 3),
        fontsize=6,
        path_effects=halo,
      )
  ax.set_xlabel(labels[0])
  ax.set_ylabel(labels[1])
  ax.set_title(title or "loss landscape")
  ax.legend(fontsize="small", loc="upper right")
  return fig


def surface_figure(landscape: Any, *, logz: bool = False, title: str | None = None) -> Figure:
  """A 3-D surface of a 2-D loss landscape (non-finite points left out).

  Args:
    landscape: a 2-D :class:`jaxscope.analysis.Landscape`.
    logz: plot ``log10(loss)`` (non-positive values left out).
    title: the figure title.

  Returns:
    The figure, with one 3-D axes.

  Raises:
    ValueError: a 1-D landscape, or a loss that is not ``[len(y), len(x)]``.
  """
  if landscape.y is None:
    raise ValueError("surface_figure: needs a 2-D landscape (use landscape_figure for 1-D).")
  x = np.asarray(landscape.x, np.float64)
  y = np.asarray(landscape.y, np.float64)
  z = _masked(landscape.loss, positive=logz)
  if z.shape != (len(y), len(x)):
    raise ValueError(
      f"surface_figure: loss has shape {z.shape}, not (ny, nx) = {(len(y), len(x))}."
    )
  if logz:
    z = np.log10(z)
  fig = Figure(figsize=(7.0, 5.5), layout="constrained")
  ax = fig.add_subplot(projection="3d")
  xx, yy = np.meshgrid(x, y)
  finite = z[np.isfinite(z)]
  if finite.size:
    norm = Normalize(vmin=float(finite.min()), vmax=float(finite.max()))
    ax.plot_surface(xx, yy, z, cmap="viridis", norm=norm, linewidth=0, antialiased=True)
  else:
    ax.text2D(0.5, 0.5, "no finite loss values", ha="center", transform=ax.transAxes)
  labels = _axis_labels(landscape, None)
  ax.set_xlabel(labels[0])
  ax.set_ylabel(labels[1])
  ax.set_zlabel("log10 loss" if logz else "loss")
  ax.set_title(title or "loss surface")
  return fig


def robustness_figure(
  result: Any, *, annotate: bool | None = None, title: str | None = None
) -> Figure:
  """The layer-robustness heat-map of Zhang, Bengio & Singer.

  Rows are the checkpoint steps ``τ`` each layer is reset to (``τ = 0``: the
  re-initialisation test), columns the layers, colour the test error; the re-randomisation
  rows (a fresh draw of the layer per seed) sit below in their own panel. Each layer's
  label carries its class (critical in red, ambient in green, intermediate in orange) and
  the title the thresholds used (:func:`jaxscope.analysis.classify_layers`). Non-finite
  errors are drawn grey.

  Args:
    result: a :class:`jaxscope.analysis.RobustnessResult`.
    annotate: write the values in the cells (``None``: when there are at most 200).
    title: the figure title.

  Returns:
    The figure (``fig.axes[0]`` is the re-initialisation heat-map).
  """
  from matplotlib import colormaps

  layers = list(result.layers)
  steps = list(result.steps)
  err = _masked(result.error)
  rer = _masked(result.rerandomized_error).reshape(-1, len(layers))
  th = dict(result.thresholds)
  chance = float(th.get("chance_error", 1.0))
  finite = np.concatenate([err[np.isfinite(err)], rer[np.isfinite(rer)]])
  vmax = max(chance, float(finite.max()) if finite.size else chance, 1e-6)
  norm = Normalize(vmin=0.0, vmax=vmax)
  cmap = colormaps["magma_r"].with_extremes(bad="0.75")
  if annotate is None:
    annotate = err.size + rer.size <= 200
  n_rows = len(steps) + len(rer)
  fig = Figure(
    figsize=(max(5.0, 1.1 * len(layers) + 2.5), max(3.0, 0.38 * n_rows + 2.2)),
    layout="constrained",
  )
  ratios = [max(1, len(steps))] + ([len(rer)] if len(rer) else [])
  axes = fig.subplots(len(ratios), 1, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]

  def heat(ax: Any, values: np.ndarray, row_labels: list[str]) -> Any:
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, norm=norm)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize="small")
    ax.set_xticks(range(len(layers)), [""] * len(layers))
    if annotate:
      for (i, j), v in np.ndenumerate(values):
        text = "nan" if not np.isfinite(v) else f"{v:.2f}"
        dark = np.isfinite(v) and norm(v) > 0.55
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if dark else "k")
    return im

  im = heat(axes[0], err, [f"τ = {s}" for s in steps])
  axes[0].set_ylabel("layer reset to step τ")
  if len(rer):
    heat(axes[1], rer, [f"re-rand. {k + 1}" for k in range(len(rer))])
  bottom = axes[-1]
  names = [f"{lay}\n({result.labels.get(lay, '?')})" for lay in layers]
  bottom.set_xticks(range(len(layers)), names, fontsize="small", rotation=30, ha="right")
  for tick, lay in zip(bottom.get_xticklabels(), layers, strict=True):
    tick.set_color(_CLASS_COLOURS.get(result.labels.get(lay, ""), "black"))
  fig.colorbar(im, ax=list(axes), label="test error")
  amb, crit = th.get("ambient_tol"), th.get("critical_tol")
  rule = ""
  if amb is not None and crit is not None:
    rule = f"\nambient: Δerr ≤ {amb:g}, critical: err ≥ {chance - crit:.2f}"
  fig.suptitle(
    title or f"layer robustness (base error {result.base_error:.3f}){rule}", fontsize="medium"
  )
  return fig


# ------------------------------------------------------------------- Cockpit's instruments
#
# The values of :func:`jaxscope.metrics.instruments` (see its module for the keys) on one
# page, as Cockpit's ``CockpitPlotter``.

_COCKPIT_COLUMNS = 4
_HIST_1D = ("per_example_grads/hist_counts", "per_example_grads/hist_edges")
_HIST_2D = (
  "per_example_grads/hist2d_counts",
  "per_example_grads/hist2d_param_edges",
  "per_example_grads/hist2d_grad_edges",
)


def _cockpit_scalar(history: History, key: str) -> tuple[np.ndarray, np.ndarray] | None:
  """``(steps, float64 values)`` of a scalar key, or ``None`` if absent or not scalar."""
  if key not in history:
    return None
  steps, values = history.series(key)
  if values.ndim != 1:
    return None
  return steps, values.astype(np.float64)


def _cockpit_leaf_total(
  history: History, topic: str, stat: str, *, quadrature: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
  """The sum over leaves of ``{topic}/{stat}/{leaf}`` (or ``sqrt`` of the sum of squares)
  at the steps where every leaf was recorded; ``None`` when no leaf was."""
  series = [
    _cockpit_scalar(history, f"{topic}/{stat}/{lay}") for lay in history.layers(topic, stat)
  ]
  series = [s for s in series if s is not None]
  if not series:
    return None
  steps = series[0][0]
  for s, _ in series[1:]:
    steps = np.intersect1d(steps, s)
  total = np.zeros(len(steps))
  for s, v in series:
    v = v[np.searchsorted(s, steps)]
    total = total + (v * v if quadrature else v)
  return steps, np.sqrt(total) if quadrature else total


def _cockpit_robust_ylim(ax: Any, values: Sequence[np.ndarray], *, fence: float = 10.0) -> None:
  """Limits a linear y axis to the values within ``fence`` interquartile ranges of the
  quartiles when some lie beyond (a few TIC spikes would flatten the rest), and says how many
  values are off the scale."""
  v = np.concatenate([np.asarray(x, np.float64).ravel() for x in values]) if values else []
  v = np.asarray(v)[np.isfinite(v)]
  if v.size < 8:
    return
  q1, q3 = np.percentile(v, [25.0, 75.0])
  iqr = float(q3 - q1)
  inside = (v >= q1 - fence * iqr) & (v <= q3 + fence * iqr)
  if iqr <= 0 or inside.all():
    return
  lo, hi = float(v[inside].min()), float(v[inside].max())
  pad = 0.05 * (hi - lo) if hi > lo else 1.0
  ax.set_ylim(lo - pad, hi + pad)
  ax.text(
    0.98,
    0.97,
    f"{int(np.sum(~inside))} off-scale",
    ha="right",
    va="top",
    fontsize="x-small",
    color="0.3",
    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.5},
    transform=ax.transAxes,
    zorder=6,
  )


def _cockpit_lines(
  ax: Any,
  series: Sequence[tuple[str, tuple[np.ndarray, np.ndarray]]],
  *,
  log: bool | None = None,
  ratio: float = 100.0,
  robust: bool = False,
) -> None:
  """Draws labelled step series with gaps and red marks at non-finite values; log y when
  ``log`` (``None``: all finite values > 0 spanning more than ``ratio``), where values
  ≤ 0 are gaps too; with ``robust``, a linear axis leaves far outliers off the scale."""
  if log is None:
    log = _log_worthy([v for _, (_, v) in series], ratio)
  bad: list[np.ndarray] = []
  for label, (steps, values) in series:
    marker = "o" if len(steps) == 1 else None
    ax.plot(steps, _masked(values, positive=log), label=label, marker=marker, lw=1.0)
    bad.append(steps[~np.isfinite(values)])
  if log:
    ax.set_yscale("log")
  elif robust:
    _cockpit_robust_ylim(ax, [v for _, (_, v) in series])
  if bad:
    _mark_nonfinite(ax, np.concatenate(bad))
  ax.set_xlabel("step")
  ax.grid(True, alpha=0.3)
  if len(series) > 1 or any(b.size for b in bad):
    ax.legend(fontsize="x-small")


def _cockpit_learning_rate(history: History) -> float | None:
  """A positive float ``lr`` or ``learning_rate`` from the run's configuration."""
  for key in ("lr", "learning_rate"):
    v = history.config.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) and v > 0:
      return float(v)
  return None


def _cockpit_hist_step(
  history: History, keys: Sequence[str], step: int | None
) -> tuple[int, list[np.ndarray]] | None:
  """The histogram arrays of ``keys`` at the latest step (or the recorded step nearest to
  ``step``) where all of them were recorded; ``None`` when there is none."""
  if not all(k in history for k in keys):
    return None
  steps = history.steps(keys[0])
  for k in keys[1:]:
    steps = np.intersect1d(steps, history.steps(k))
  if not steps.size:
    return None
  s = int(steps[-1] if step is None else steps[np.argmin(np.abs(steps - step))])
  arrays = [
    np.asarray(history[k][int(np.searchsorted(history.steps(k), s))], np.float64) for k in keys
  ]
  return s, arrays


def cockpit(
  history: History | str | os.PathLike[str],
  *,
  step: int | None = None,
) -> Figure:
  """One page of Cockpit's instruments (:func:`jaxscope.metrics.instruments`).

  The panels, each drawn only when its keys were recorded (an ``economy`` run has the
  first seven):

  * **loss**: ``loss`` and, when present, ``test/loss``;
  * **α over steps** with the ``α = 0`` line (the update reached the minimum of the
    noise-aware quadratic fit along its direction; ``α < 0`` understeps, ``α > 0``
    overshoots);
  * **α distribution**: a histogram of the α values, the 0 line, the share on each side and
    the mean (Cockpit's alpha gauge);
  * **gradient tests**: ``norm_test``, ``inner_test`` and ``ortho_test`` (the largest θ / ν
    each test passes: small, the mini-batch gradient is reliable; above the reference line
    θ = 1, its noise dominates), log y;
  * **distance and update size**: the sums over leaves of ``params/distance/*`` and
    ``updates/norm/*``;
  * **gradient norm**: the leaves' ``grads/norm/*`` added in quadrature;
  * **largest Hessian eigenvalue** ``hess_max_ev`` (log y when positive), with the
    stability limit ``2/η`` of gradient descent when the run's configuration holds ``lr``
    or ``learning_rate``;
  * **Hessian trace** ``hess_trace`` (log y when positive);
  * **TIC**: ``tic_diag`` and ``tic_trace`` (far outliers, from a near-zero curvature
    estimate in a denominator, are left off the scale and counted);
  * ``mean_gsnr``, ``cabs`` and ``early_stopping``, one panel each;
  * the **per-example gradient histogram** of one step (bars from
    ``per_example_grads/hist_counts`` and ``hist_edges``, log counts);
  * the **2-D histogram** of per-example gradient entries against parameter values of the
    same step (``log(1 + count)`` over the ``hist2d_param_edges`` × ``hist2d_grad_edges``
    extent).

  Non-finite values are gaps in the lines, marked with a red ``x`` at their steps.

  Args:
    history: the recorded run, or its run directory.
    step: the step of the histograms: the recorded step nearest to it (default: the latest
      one).

  Returns:
    The figure; ``fig.axes`` holds one axes per panel drawn, in the order above.

  Raises:
    KeyError: none of the instruments' keys was recorded.
  """
  if not isinstance(history, History):
    history = History.load(history)
  panels: list[tuple[str, Any]] = []

  def scalars(*keys: str) -> list[tuple[str, tuple[np.ndarray, np.ndarray]]]:
    out = [(k, _cockpit_scalar(history, k)) for k in keys]
    return [(k, s) for k, s in out if s is not None]

  loss = scalars("loss", "test/loss")
  if loss:
    panels.append(("loss", lambda ax: _cockpit_lines(ax, loss, ratio=20.0)))

  alpha = _cockpit_scalar(history, "alpha")
  if alpha is not None:

    def alpha_trace(ax: Any) -> None:
      ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
      _cockpit_lines(ax, [("α", alpha)], log=False)

    def alpha_gauge(ax: Any) -> None:
      a = alpha[1][np.isfinite(alpha[1])]
      ax.axvline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
      ax.set_xlabel("α")
      ax.set_ylabel("steps")
      if not a.size:
        ax.text(0.5, 0.5, "no finite α", ha="center", va="center", transform=ax.transAxes)
        return
      ax.hist(a, bins=min(40, max(5, a.size // 5)), color="tab:blue", alpha=0.8)
      ax.axvline(float(np.mean(a)), color="tab:red", lw=1.0, label=f"mean {np.mean(a):.2f}")
      for x, ha, text in (
        (0.02, "left", f"understep\n{np.mean(a < 0):.0%}"),
        (0.98, "right", f"overshoot\n{np.mean(a > 0):.0%}"),
      ):
        ax.text(x, 0.97, text, ha=ha, va="top", fontsize="x-small", transform=ax.transAxes)
      ax.legend(fontsize="x-small", loc="center right")

    panels.append(("α (step length)", alpha_trace))
    panels.append(("α distribution", alpha_gauge))

  tests = scalars("norm_test", "inner_test", "ortho_test")
  if tests:

    def gradient_tests(ax: Any) -> None:
      ax.axhline(1.0, color="0.4", lw=0.8, ls="--", zorder=0, label="θ = 1")
      _cockpit_lines(ax, tests, log=True)
      ax.legend(fontsize="x-small")

    panels.append(("gradient tests", gradient_tests))

  dist = _cockpit_leaf_total(history, "params", "distance")
  upd = _cockpit_leaf_total(history, "updates", "norm")
  moves = [(label, s) for label, s in (("distance", dist), ("update size", upd)) if s is not None]
  if moves:
    panels.append(("distance / update size", lambda ax: _cockpit_lines(ax, moves)))

  gnorm = _cockpit_leaf_total(history, "grads", "norm", quadrature=True)
  if gnorm is not None:
    panels.append(("gradient norm", lambda ax: _cockpit_lines(ax, [("‖g‖", gnorm)])))

  max_ev = _cockpit_scalar(history, "hess_max_ev")
  if max_ev is not None:
    lr = _cockpit_learning_rate(history)

    def largest_eigenvalue(ax: Any) -> None:
      _cockpit_lines(ax, [("λ_max", max_ev)], log=_log_worthy([max_ev[1]], 1.0))
      if lr is not None:
        ax.axhline(2.0 / lr, color="tab:red", lw=0.8, ls="--", label=f"2/η = {2.0 / lr:.3g}")
        ax.legend(fontsize="x-small")

    panels.append(("largest Hessian eigenvalue", largest_eigenvalue))

  trace = _cockpit_scalar(history, "hess_trace")
  if trace is not None:
    panels.append(
      (
        "Hessian trace",
        lambda ax: _cockpit_lines(ax, [("tr H", trace)], log=_log_worthy([trace[1]], 1.0)),
      )
    )

  tic = scalars("tic_diag", "tic_trace")
  if tic:
    panels.append(("TIC", lambda ax: _cockpit_lines(ax, tic, robust=True)))

  for key, title in (
    ("mean_gsnr", "mean GSNR"),
    ("cabs", "CABS batch size"),
    ("early_stopping", "early stopping"),
  ):
    s = _cockpit_scalar(history, key)
    if s is not None:
      panels.append((title, lambda ax, s=s, key=key: _cockpit_lines(ax, [(key, s)])))

  h1 = _cockpit_hist_step(history, _HIST_1D, step)
  if h1 is not None:

    def hist_1d(ax: Any) -> None:
      s, (counts, edges) = h1
      ax.set_title(f"per-example gradients, step {s}")
      ax.set_xlabel("gradient entry")
      ax.set_ylabel("count")
      ok = np.isfinite(counts)
      if edges.shape != (counts.size + 1,) or not np.all(np.isfinite(edges)) or not ok.any():
        ax.text(0.5, 0.5, "no finite histogram", ha="center", va="center", transform=ax.transAxes)
        return
      c = np.where(ok, counts, 0.0)
      ax.bar(edges[:-1], c, width=np.diff(edges), align="edge", color="tab:blue", alpha=0.8)
      if np.any(c > 0):
        ax.set_yscale("log")

    panels.append(("", hist_1d))

  h2 = _cockpit_hist_step(history, _HIST_2D, step)
  if h2 is not None:

    def hist_2d(ax: Any) -> None:
      s, (counts, px, gy) = h2
      ax.set_title(f"gradient vs parameter, step {s}\ncolour: log(1 + count)")
      ax.set_xlabel("parameter value")
      ax.set_ylabel("gradient entry")
      good = (
        counts.ndim == 2
        and px.shape == (counts.shape[0] + 1,)
        and gy.shape == (counts.shape[1] + 1,)
        and np.all(np.isfinite(px))
        and np.all(np.isfinite(gy))
        and px[-1] > px[0]
        and gy[-1] > gy[0]
      )
      if not good:
        ax.text(0.5, 0.5, "no finite histogram", ha="center", va="center", transform=ax.transAxes)
        return
      c = np.log1p(np.where(np.isfinite(counts) & (counts > 0), counts, 0.0))
      ax.imshow(
        c.T,
        origin="lower",
        aspect="auto",
        extent=(px[0], px[-1], gy[0], gy[-1]),
        cmap="viridis",
        interpolation="nearest",
      )

    panels.append(("", hist_2d))

  if not panels:
    have = history.keys()[:8]
    raise KeyError(
      f"cockpit: no instrument values recorded (see jaxscope.metrics.instruments); have {have}."
    )

  cols = min(_COCKPIT_COLUMNS, len(panels))
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(4.2 * cols, 3.3 * rows + 0.5), layout="constrained")
  for i, (title, draw) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    if title:
      ax.set_title(title)
    draw(ax)
  all_steps = [history.steps(k) for k in history.keys()]
  all_steps = [s for s in all_steps if s.size]
  span = ""
  if all_steps:
    lo = min(int(s[0]) for s in all_steps)
    hi = max(int(s[-1]) for s in all_steps)
    span = f"steps {lo}–{hi}"
  name = f"{history.run_dir.name}: " if history.run_dir is not None else ""
  fig.suptitle(f"Cockpit — {name}{span}", fontsize="large")
  return fig


# --------------------------------------------------------------------------- diagnosis


def _evidence_keys(history: History, evidence: Mapping[str, Any]) -> list[str]:
  """The recorded scalar keys a finding's evidence names (metric × layers)."""
  metrics = evidence.get("metric") or evidence.get("metrics") or []
  if isinstance(metrics, str):
    metrics = [metrics]
  layers = evidence.get("layers") or []
  keys: list[str] = []
  for m in metrics:
    if m in history:
      keys.append(m)
      continue
    for lay in layers:
      if f"{m}/{lay}" in history:
        keys.append(f"{m}/{lay}")
    if not layers:
      keys.extend(k for k in history.keys() if k.startswith(f"{m}/"))
  out = []
  for k in dict.fromkeys(keys):
    _, v = history.series(k)
    if v.ndim == 1:
      out.append(k)
  return out[:_MANY_LAYERS]


def diagnosis_figure(history: History | str | Path, findings: Sequence[Any]) -> Figure:
  """One page with the metrics behind each finding of :func:`jaxscope.diagnose.diagnose`.

  One panel per finding (most severe first, at most 8): the recorded series its evidence
  names (``evidence["metric"]`` and ``evidence["layers"]``), log scale when they span
  decades, the steps in ``evidence["steps"]`` marked by vertical lines, titled with the
  finding's severity, name and summary. With no finding, the loss with "no problem found".

  Args:
    history: the run (a :class:`~jaxscope.record.History` or its directory).
    findings: the findings (objects with ``name``, ``severity``, ``summary``, ``evidence``).

  Returns:
    The figure.
  """
  if not isinstance(history, History):
    history = History.load(history)
  shown = list(findings)[:8]
  n = max(len(shown), 1)
  cols = 2 if n > 1 else 1
  rows = -(-n // cols)
  fig = Figure(figsize=(6.5 * cols, 3.2 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  colors = {"critical": "tab:red", "warning": "tab:orange", "info": "tab:blue"}
  if not shown:
    ax = axes[0]
    if "loss" in history:
      steps, loss = _scalar_series(history, "loss")
      ax.plot(steps, loss, lw=1)
      if _auto_logy([loss]):
        ax.set_yscale("log")
    ax.set_title("no problem found", fontsize=10)
    ax.set_xlabel("step")
  for ax, f in zip(axes, shown, strict=False):
    keys = _evidence_keys(history, f.evidence) or (["loss"] if "loss" in history else [])
    values = []
    for k in keys:
      steps, v = _scalar_series(history, k)
      values.append(v)
      ok = np.isfinite(v)
      ax.plot(steps[ok], v[ok], lw=1, label=k if len(keys) > 1 else None)
      _mark_nonfinite(ax, steps[~ok])
    if values and _auto_logy(values):
      ax.set_yscale("log")
    for s in list(f.evidence.get("steps") or [])[:20]:
      ax.axvline(float(s), color=colors.get(f.severity, "gray"), lw=0.8, alpha=0.7)
    ax.set_title(f"[{f.severity}] {f.name}\n{f.summary}", fontsize=8, loc="left", wrap=True)
    ax.set_xlabel("step")
    if keys:
      ax.set_ylabel(keys[0] if len(keys) == 1 else "value", fontsize=8)
    if len(keys) > 1:
      ax.legend(fontsize=6)
  for ax in axes[n:]:
    ax.set_visible(False)
  fig.suptitle(f"diagnosis of {history.run_dir or 'a run'}", fontsize=10)
  fig.tight_layout()
  return fig
