"""Figures of loss landscapes (:mod:`jaxscope.analysis.landscape`): contours with the
trajectory, the 3-D surface, and the 1-D loss and accuracy.

They take a ``Landscape`` by its attributes (``x``, ``y``, ``loss``, ``accuracy``,
``center_loss``, ``settings``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.colors import BoundaryNorm, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke

from jaxscope.plot._common import FIGSIZE, log_worthy, mark_nonfinite, masked

__all__ = ["landscape_figure", "surface_figure"]


def _levels(z: np.ndarray, n: int, log: bool | None) -> tuple[np.ndarray, Normalize, bool] | None:
  """Contour levels from the data: log-spaced when all finite values are positive and span
  more than a decade (or ``log=True``), else at quantiles (so every band holds values,
  unlike the original's fixed ``[0.1, 10)``). ``None`` when nothing is finite."""
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
  """``(coords [T, d], labels)`` of ``landscape_figure``'s ``trajectory`` argument."""
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
  """The axis labels: the PCA components with their explained variance, when known."""
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
  """Loss along a line (left axis) and accuracy (dashed, twin right axis)."""
  ax = fig.add_subplot()
  x = np.asarray(landscape.x, np.float64)
  loss = np.asarray(landscape.loss, np.float64)
  if logy is None:
    logy = log_worthy([loss], 10.0)
  ax.plot(x, masked(loss, positive=logy), color="tab:blue", label="loss")
  ax.plot(
    [0.0], [landscape.center_loss], marker="*", color="black", ms=10, ls="", label="centre θ*"
  )
  if trajectory is not None:
    c, labs = _trajectory_points(trajectory)
    tl = (
      np.asarray(trajectory.get("loss"), np.float64)
      if isinstance(trajectory, Mapping) and trajectory.get("loss") is not None
      else np.interp(c[:, 0], x, masked(loss))
    )
    ax.scatter(c[:, 0], tl, color="black", s=14, zorder=6, label="checkpoints")
    for j, lab in enumerate(labs):
      ax.annotate(lab, (c[j, 0], tl[j]), textcoords="offset points", xytext=(3, 4), fontsize=6)
  if logy:
    ax.set_yscale("log")
  mark_nonfinite(ax, x[~np.isfinite(loss)], "non-finite loss")
  ax.set_xlabel(labels[0])
  ax.set_ylabel("loss")
  ax.grid(True, alpha=0.3)
  acc = np.asarray(landscape.accuracy, np.float64)
  if np.any(np.isfinite(acc) & (acc != 0)):
    ax2 = ax.twinx()
    ax2.plot(x, masked(acc), color="tab:orange", ls="--", label="accuracy")
    ax2.set_ylabel("accuracy (dashed)")
    ax2.set_ylim(-0.02, 1.02)
  ax.legend(fontsize="small")


def _landscape_2d(
  fig: Figure,
  landscape: Any,
  trajectory: Any,
  labels: list[str],
  levels: int,
  logz: bool | None,
) -> None:
  """Filled contours (or a mesh for one row or column), the centre and the trajectory."""
  ax = fig.add_subplot()
  x = np.asarray(landscape.x, np.float64)
  y = np.asarray(landscape.y, np.float64)
  z = masked(landscape.loss)
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
  ax.legend(fontsize="small", loc="upper right")


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
  fig = Figure(figsize=(7.0, 5.5) if landscape.y is not None else FIGSIZE, layout="constrained")
  if landscape.y is None:
    _landscape_1d(fig, landscape, trajectory, labels, logz)
    fig.axes[0].set_title(title or "1-D loss landscape")
  else:
    _landscape_2d(fig, landscape, trajectory, labels, levels, logz)
    fig.axes[0].set_title(title or "loss landscape")
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
  z = masked(landscape.loss, positive=logz)
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
