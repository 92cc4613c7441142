"""Figures of interpolation paths (:mod:`jaxscope.analysis.paths`).

They take the results by their attributes (``PathResult``: ``alpha``, ``loss``,
``accuracy``, ``kind``, ``level``, ``name``, ``distance``), so building a figure needs no
analysis to have run in this process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from jaxscope.plot._common import FIGSIZE, MANY_LAYERS, log_worthy, mark_nonfinite, masked

__all__ = ["layer_paths_figure", "parameter_paths_figure", "path_figure"]

PATH_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
"""The colour of the i-th path (cycled)."""


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
  """Dotted vertical lines at α = 0 and α = 1 (the first and the final checkpoint)."""
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
  """``(alpha_t, loss_t, labels)`` of ``path_figure``'s ``real`` argument, checked."""
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
  if pts is not None:
    # Imported here: jaxscope.analysis may itself import this package.
    from jaxscope.analysis.paths import path_error
  fig = Figure(figsize=FIGSIZE, layout="constrained")
  ax = fig.add_subplot()
  losses = [np.asarray(p.loss, np.float64) for p in paths]
  if pts is not None:
    losses.append(pts[1])
  if logy is None:
    logy = log_worthy(losses, 10.0)
  if accuracy is None:
    accuracy = _has_accuracy(paths)
  ax2 = ax.twinx() if accuracy else None
  bad: list[np.ndarray] = []
  for i, p in enumerate(paths):
    colour = PATH_COLOURS[i % len(PATH_COLOURS)]
    alpha = np.asarray(p.alpha, np.float64)
    loss = np.asarray(p.loss, np.float64)
    bad.append(alpha[~np.isfinite(loss)])
    label = p.kind if p.name == "model" else f"{p.kind} {p.name}"
    if pts is not None:
      label += f" (MAE {path_error(p, pts[0], pts[1]):.3g})"
    ax.plot(alpha, masked(loss, positive=logy), color=colour, label=label)
    if ax2 is not None:
      ax2.plot(alpha, masked(p.accuracy), color=colour, ls="--", alpha=0.7)
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
  mark_nonfinite(ax, np.concatenate(bad) if bad else [], "non-finite loss")
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
  fig = Figure(figsize=FIGSIZE, layout="constrained")
  ax = fig.add_subplot()
  if logy is None:
    logy = log_worthy([r.loss for r in results + models], 10.0)
  opac = _opacities([r.distance for r in results])
  cmap = colormaps["tab10" if len(results) <= 10 else "tab20"]
  bad: list[np.ndarray] = []
  for i, (r, o) in enumerate(zip(results, opac, strict=True)):
    alpha = np.asarray(r.alpha, np.float64)
    loss = np.asarray(r.loss, np.float64)
    bad.append(alpha[~np.isfinite(loss)])
    ax.plot(
      alpha,
      masked(loss, positive=logy),
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
      masked(loss, positive=logy),
      color="black",
      lw=2.5,
      ls="-" if j == 0 else "--",
      label=f"model ({m.kind})",
      zorder=4,
    )
  if logy:
    ax.set_yscale("log")
  _endpoints(ax)
  mark_nonfinite(ax, np.concatenate(bad) if bad else [], "non-finite loss")
  kind = results[0].kind if results else (models[0].kind if models else "")
  ax.set_title(title or f"layer-level {kind} paths (opacity: distance moved)")
  ax.set_xlabel("α (the layer moves from the first to the final checkpoint)")
  ax.set_ylabel("loss")
  ax.grid(True, alpha=0.3)
  if results or models:
    if len(results) + len(models) > MANY_LAYERS:
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
    logy = log_worthy([r.loss for r in results], 10.0)
  kind = results[0].kind if results else ""
  fig.suptitle(title or f"parameter-level {kind} paths (opacity: |Δθ|)")
  if not results:
    axes[0, 0].text(0.5, 0.5, "no parameters", ha="center", va="center")
  for gi, (layer, rs) in enumerate(groups.items()):
    ax = axes[gi // cols, gi % cols]
    colour = PATH_COLOURS[gi % len(PATH_COLOURS)]
    bad: list[np.ndarray] = []
    for r, o in zip(rs, _opacities([r.distance for r in rs]), strict=True):
      alpha = np.asarray(r.alpha, np.float64)
      loss = np.asarray(r.loss, np.float64)
      bad.append(alpha[~np.isfinite(loss)])
      ax.plot(
        alpha,
        masked(loss, positive=logy),
        color=colour,
        alpha=float(o),
        label=f"{_param_layer(r.name)[1]} |Δ| {r.distance:.2g}",
      )
    if logy:
      ax.set_yscale("log")
    _endpoints(ax)
    mark_nonfinite(ax, np.concatenate(bad), "non-finite")
    ax.set_title(layer, fontsize="medium")
    ax.set_xlabel("α")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="xx-small")
  for gi in range(len(groups), rows * cols):
    if gi:
      axes[gi // cols, gi % cols].set_visible(False)
  return fig
