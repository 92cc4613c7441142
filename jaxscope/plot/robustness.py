"""The layer-robustness heat-map (:mod:`jaxscope.analysis.robustness`).

It takes a ``RobustnessResult`` by its attributes (``layers``, ``steps``, ``error``,
``base_error``, ``rerandomized_error``, ``labels``, ``thresholds``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from jaxscope.plot._common import masked

__all__ = ["robustness_figure"]

CLASS_COLOURS = {"critical": "tab:red", "ambient": "tab:green", "intermediate": "tab:orange"}
"""The colour of a layer's name by its class."""


def _heat(
  ax: Any,
  values: np.ndarray,
  row_labels: list[str],
  n_layers: int,
  norm: Normalize,
  *,
  annotate: bool,
) -> Any:
  """One heat-map panel: rows ``row_labels``, one column per layer, NaN drawn grey."""
  cmap = colormaps["magma_r"].with_extremes(bad="0.75")
  im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, norm=norm)
  ax.set_yticks(range(len(row_labels)), row_labels, fontsize="small")
  ax.set_xticks(range(n_layers), [""] * n_layers)
  if annotate:
    for (i, j), v in np.ndenumerate(values):
      text = "nan" if not np.isfinite(v) else f"{v:.2f}"
      dark = np.isfinite(v) and norm(v) > 0.55
      ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if dark else "k")
  return im


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
  layers = list(result.layers)
  steps = list(result.steps)
  err = masked(result.error)
  rer = masked(result.rerandomized_error).reshape(-1, len(layers))
  th = dict(result.thresholds)
  chance = float(th.get("chance_error", 1.0))
  finite = np.concatenate([err[np.isfinite(err)], rer[np.isfinite(rer)]])
  vmax = max(chance, float(finite.max()) if finite.size else chance, 1e-6)
  norm = Normalize(vmin=0.0, vmax=vmax)
  if annotate is None:
    annotate = err.size + rer.size <= 200
  n_rows = len(steps) + len(rer)
  fig = Figure(
    figsize=(max(5.0, 1.1 * len(layers) + 2.5), max(3.0, 0.38 * n_rows + 2.2)),
    layout="constrained",
  )
  ratios = [max(1, len(steps))] + ([len(rer)] if len(rer) else [])
  axes = fig.subplots(len(ratios), 1, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
  rows = [f"τ = {s}" for s in steps]
  im = _heat(axes[0], err, rows, len(layers), norm, annotate=annotate)
  axes[0].set_ylabel("layer reset to step τ")
  if len(rer):
    rows = [f"re-rand. {k + 1}" for k in range(len(rer))]
    _heat(axes[1], rer, rows, len(layers), norm, annotate=annotate)
  bottom = axes[-1]
  names = [f"{lay}\n({result.labels.get(lay, '?')})" for lay in layers]
  bottom.set_xticks(range(len(layers)), names, fontsize="small", rotation=30, ha="right")
  for tick, lay in zip(bottom.get_xticklabels(), layers, strict=True):
    tick.set_color(CLASS_COLOURS.get(result.labels.get(lay, ""), "black"))
  fig.colorbar(im, ax=list(axes), label="test error")
  amb, crit = th.get("ambient_tol"), th.get("critical_tol")
  rule = ""
  if amb is not None and crit is not None:
    rule = f"\nambient: Δerr ≤ {amb:g}, critical: err ≥ {chance - crit:.2f}"
  fig.suptitle(
    title or f"layer robustness (base error {result.base_error:.3f}){rule}", fontsize="medium"
  )
  return fig
