"""One page of Cockpit's instruments.

The values of :func:`jaxscope.metrics.instruments` (see its module for the keys) on one
page, as Cockpit's ``CockpitPlotter``: one panel per group of recorded keys, each drawn by
one ``_draw_*`` function of an axes and the data :func:`_panels` picked from the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxscope.plot._common import (
  ErrorBar,
  corner_note,
  draw_reading,
  error_bar,
  log_worthy,
  mark_nonfinite,
  note_noise,
)
from jaxscope.record import History

__all__ = ["cockpit"]

_COLUMNS = 4
_HIST_1D = ("per_example_grads/hist_counts", "per_example_grads/hist_edges")
_HIST_2D = (
  "per_example_grads/hist2d_counts_grad_param",
  "per_example_grads/hist2d_grad_edges",
  "per_example_grads/hist2d_param_edges",
)
"""The 2-D histogram: counts ``[grad bins, param bins]`` (Cockpit's order), gradient edges,
parameter edges."""
_HIST_2D_OLD = (
  "per_example_grads/hist2d_counts",
  "per_example_grads/hist2d_grad_edges",
  "per_example_grads/hist2d_param_edges",
)
"""The 2-D histogram of runs recorded before issue 18: counts ``[param bins, grad bins]``."""
_ONE_PANEL_EACH = (
  ("mean_gsnr", "mean GSNR"),
  ("cabs", "CABS batch size"),
  ("early_stopping", "early stopping"),
)

Series = tuple[np.ndarray, np.ndarray]
"""``(steps, float64 values)``."""
Panel = tuple[str, Callable[[Any], None]]
"""``(title, draw(ax))``; an empty title leaves the axes' title to ``draw``."""


def _scalar(history: History, key: str) -> Series | None:
  """``(steps, float64 values)`` of a scalar key, or ``None`` if absent or not scalar."""
  if key not in history:
    return None
  steps, values = history.series(key)
  if values.ndim != 1:
    return None
  return steps, values.astype(np.float64)


def _leaf_total(
  history: History, topic: str, stat: str, *, quadrature: bool = False
) -> Series | None:
  """The sum over leaves of ``{topic}/{stat}/{leaf}`` (or ``sqrt`` of the sum of squares)
  at the steps where every leaf was recorded; ``None`` when no leaf was."""
  series = [_scalar(history, f"{topic}/{stat}/{lay}") for lay in history.layers(topic, stat)]
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


def _learning_rate(history: History) -> float | None:
  """A positive float ``lr`` or ``learning_rate`` from the run's configuration."""
  for key in ("lr", "learning_rate"):
    v = history.config.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) and v > 0:
      return float(v)
  return None


def _hist_step(
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


def _robust_ylim(ax: Any, values: Sequence[np.ndarray], *, fence: float = 10.0) -> None:
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
  corner_note(ax, f"{int(np.sum(~inside))} off-scale", "upper right")


def _draw_lines(
  ax: Any,
  series: Sequence[tuple[str, Series]],
  *,
  errors: Mapping[str, ErrorBar] | None = None,
  log: bool | None = None,
  ratio: float = 100.0,
  robust: bool = False,
  nan_unmeasured: bool = False,
) -> None:
  """Draws labelled step series with their error bands (:func:`draw_reading`).

  Non-finite values are gaps, marked in red at the top of the axes (with
  ``nan_unmeasured``, a NaN means "not measured" and only ±Inf is marked). Readings within
  noise (``errors``, by label) are hollow, counted in a note, and left out of the y range and
  the log-scale choice unless every reading is noise. Log y when ``log`` (``None``: all
  trusted finite values > 0 spanning more than ``ratio``), where values ≤ 0 are gaps too;
  with ``robust``, a linear axis leaves far outliers off the scale.
  """
  errors = errors or {}
  trusted = []
  for label, (_, values) in series:
    err = errors.get(label)
    trusted.append(values[~err.within_noise(values)] if err is not None else values)
  some_trusted = any(np.isfinite(t).any() for t in trusted)
  if log is None:
    log = log_worthy(trusted, ratio)
  bad: list[np.ndarray] = []
  notes: list[tuple[str, int, int, str]] = []
  for label, (steps, values) in series:
    err = errors.get(label)
    k = draw_reading(
      ax, steps, values, err, label=label, log=log, autoscale_noise=not some_trusted, lw=1.0
    )
    if err is not None:
      notes.append((label, k, int(np.isfinite(values).sum()), err.rule))
    bad.append(steps[np.isinf(values) if nan_unmeasured else ~np.isfinite(values)])
  if log:
    ax.set_yscale("log")
  elif robust:
    _robust_ylim(ax, trusted)
  if bad:
    mark_nonfinite(ax, np.concatenate(bad))
  note_noise(ax, notes, named=len(series) > 1)
  ax.set_xlabel("step")
  ax.grid(True, alpha=0.3)
  if len(series) > 1 or any(b.size for b in bad):
    ax.legend(fontsize="x-small")


def _draw_alpha_trace(ax: Any, alpha: Series) -> None:
  """α over steps with the ``α = 0`` line; NaN (no update yet, e.g. step 0) is not
  measured: a gap, not marked."""
  ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
  _draw_lines(ax, [("α", alpha)], log=False, nan_unmeasured=True)


def _draw_alpha_gauge(ax: Any, alpha: Series) -> None:
  """Histogram of the finite α values, the 0 line, the share on each side and the mean."""
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


def _draw_gradient_tests(ax: Any, tests: Sequence[tuple[str, Series]]) -> None:
  """The gradient tests on a log axis with the reference line θ = 1."""
  ax.axhline(1.0, color="0.4", lw=0.8, ls="--", zorder=0, label="θ = 1")
  _draw_lines(ax, tests, log=True)
  ax.legend(fontsize="x-small")


def _draw_largest_eigenvalue(
  ax: Any, max_ev: Series, lr: float | None, err: ErrorBar | None = None
) -> None:
  """λ_max (log y when the trusted readings are positive) with its error band and the
  stability limit ``2/η`` when ``lr`` is known."""
  _draw_lines(ax, [("λ_max", max_ev)], errors={"λ_max": err} if err else None, ratio=1.0)
  if lr is not None:
    ax.axhline(2.0 / lr, color="tab:red", lw=0.8, ls="--", label=f"2/η = {2.0 / lr:.3g}")
    ax.legend(fontsize="x-small")


def _draw_hist_1d(ax: Any, hist: tuple[int, list[np.ndarray]]) -> None:
  """The per-example gradient histogram of one step as bars, log counts."""
  s, (counts, edges) = hist
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


def _draw_hist_2d(ax: Any, hist: tuple[int, list[np.ndarray]]) -> None:
  """Per-example gradient entries (x) against parameter values (y) of one step, as Cockpit
  draws them, ``log(1 + count)``; the counts are ``[grad bins, param bins]``."""
  s, (counts, gx, py) = hist
  ax.set_title(f"gradient vs parameter, step {s}\ncolour: log(1 + count)")
  ax.set_xlabel("gradient entry")
  ax.set_ylabel("parameter value")
  good = (
    counts.ndim == 2
    and gx.shape == (counts.shape[0] + 1,)
    and py.shape == (counts.shape[1] + 1,)
    and np.all(np.isfinite(gx))
    and np.all(np.isfinite(py))
    and gx[-1] > gx[0]
    and py[-1] > py[0]
  )
  if not good:
    ax.text(0.5, 0.5, "no finite histogram", ha="center", va="center", transform=ax.transAxes)
    return
  c = np.log1p(np.where(np.isfinite(counts) & (counts > 0), counts, 0.0))
  ax.imshow(
    c.T,  # rows: parameter bins (y), columns: gradient bins (x)
    origin="lower",
    aspect="auto",
    extent=(gx[0], gx[-1], py[0], py[-1]),
    cmap="viridis",
    interpolation="nearest",
  )


def _hist_2d(history: History, step: int | None) -> tuple[int, list[np.ndarray]] | None:
  """The 2-D histogram ``(step, [counts[grad, param], grad edges, param edges])`` of
  :data:`_HIST_2D`, else of an old run's :data:`_HIST_2D_OLD` (counts transposed)."""
  if (h := _hist_step(history, _HIST_2D, step)) is not None:
    return h
  if (h := _hist_step(history, _HIST_2D_OLD, step)) is not None:
    s, (counts, gx, py) = h
    return s, [counts.T if counts.ndim == 2 else counts, gx, py]
  return None


def _panels(history: History, step: int | None) -> list[Panel]:
  """The panels of the keys ``history`` holds, in :func:`cockpit`'s order."""
  panels: list[Panel] = []

  def scalars(*keys: str) -> list[tuple[str, Series]]:
    out = [(k, _scalar(history, k)) for k in keys]
    return [(k, s) for k, s in out if s is not None]

  def errors(series: Sequence[tuple[str, Series]]) -> dict[str, ErrorBar]:
    bars = {k: error_bar(history, k, s[0]) for k, s in series}
    return {k: e for k, e in bars.items() if e is not None}

  if loss := scalars("loss", "test/loss"):
    panels.append(("loss", partial(_draw_lines, series=loss, ratio=20.0)))
  if (alpha := _scalar(history, "alpha")) is not None:
    panels.append(("α (step length)", partial(_draw_alpha_trace, alpha=alpha)))
    panels.append(("α distribution", partial(_draw_alpha_gauge, alpha=alpha)))
  if tests := scalars("norm_test", "inner_test", "ortho_test"):
    panels.append(("gradient tests", partial(_draw_gradient_tests, tests=tests)))
  # Runs before issue 18 recorded the instruments' per-leaf norms under the scope's topics.
  dist = _leaf_total(history, "cockpit", "distance") or _leaf_total(history, "params", "distance")
  upd = _leaf_total(history, "cockpit", "update_size") or _leaf_total(history, "updates", "norm")
  if moves := [(lab, s) for lab, s in (("distance", dist), ("update size", upd)) if s is not None]:
    panels.append(("distance / update size", partial(_draw_lines, series=moves)))
  gnorm = _leaf_total(history, "cockpit", "grad_norm", quadrature=True) or _leaf_total(
    history, "grads", "norm", quadrature=True
  )
  if gnorm is not None:
    panels.append(("gradient norm", partial(_draw_lines, series=[("‖g‖", gnorm)])))
  if (max_ev := _scalar(history, "hess_max_ev")) is not None:
    err = error_bar(history, "hess_max_ev", max_ev[0])
    draw = partial(_draw_largest_eigenvalue, max_ev=max_ev, lr=_learning_rate(history), err=err)
    panels.append(("largest Hessian eigenvalue", draw))
  if (trace := _scalar(history, "hess_trace")) is not None:
    bar = {"tr H": e} if (e := error_bar(history, "hess_trace", trace[0])) else None
    draw = partial(_draw_lines, series=[("tr H", trace)], errors=bar, ratio=1.0)
    panels.append(("Hessian trace", draw))
  if tic := scalars("tic_diag", "tic_trace"):
    panels.append(("TIC", partial(_draw_lines, series=tic, errors=errors(tic), robust=True)))
  for key, title in _ONE_PANEL_EACH:
    if s := scalars(key):
      panels.append((title, partial(_draw_lines, series=s, errors=errors(s))))
  if (h1 := _hist_step(history, _HIST_1D, step)) is not None:
    panels.append(("", partial(_draw_hist_1d, hist=h1)))
  if (h2 := _hist_2d(history, step)) is not None:
    panels.append(("", partial(_draw_hist_2d, hist=h2)))
  return panels


def _step_span(history: History) -> str:
  """``"steps {first}–{last}"`` over all keys (empty when nothing was recorded)."""
  all_steps = [history.steps(k) for k in history.keys()]
  all_steps = [s for s in all_steps if s.size]
  if not all_steps:
    return ""
  lo = min(int(s[0]) for s in all_steps)
  hi = max(int(s[-1]) for s in all_steps)
  return f"steps {lo}–{hi}"


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
    overshoots); α is NaN until a previous update exists (step 0): not measured, so a gap
    without a mark;
  * **α distribution**: a histogram of the α values, the 0 line, the share on each side and
    the mean (Cockpit's alpha gauge);
  * **gradient tests**: ``norm_test``, ``inner_test`` and ``ortho_test`` (the largest θ / ν
    each test passes: small, the mini-batch gradient is reliable; above the reference line
    θ = 1, its noise dominates), log y;
  * **distance and update size**: the sums over leaves of ``cockpit/distance/*`` and
    ``cockpit/update_size/*`` (older runs: ``params/distance/*``, ``updates/norm/*``);
  * **gradient norm**: the leaves' ``cockpit/grad_norm/*`` (older runs: ``grads/norm/*``)
    added in quadrature;
  * **largest Hessian eigenvalue** ``hess_max_ev`` (log y when positive), with the
    stability limit ``2/η`` of gradient descent when the run's configuration holds ``lr``
    or ``learning_rate``, and the band ``± hess_max_ev_residual``;
  * **Hessian trace** ``hess_trace`` (log y when positive), band ``± 2 · hess_trace_stderr``;
  * **TIC**: ``tic_diag`` and ``tic_trace`` with their ``±2σ`` bands (far outliers, from a
    near-zero curvature estimate in a denominator, are left off the scale and counted);
  * ``mean_gsnr``, ``cabs`` and ``early_stopping``, one panel each;
  * the **per-example gradient histogram** of one step (bars from
    ``per_example_grads/hist_counts`` and ``hist_edges``, log counts);
  * the **2-D histogram** of per-example gradient entries (x) against parameter values (y)
    of the same step, as Cockpit draws it (``log(1 + count)`` of
    ``hist2d_counts_grad_param[grad bin, param bin]`` over the ``hist2d_grad_edges`` ×
    ``hist2d_param_edges`` extent; an older run's ``hist2d_counts[param bin, grad bin]`` is
    transposed).

  Non-finite values are gaps in the lines, marked with a red ``x`` at their steps (except
  a NaN α, which is not measured).

  **Error bars.** A scalar ``K`` recorded with ``K_stderr`` (a standard error) is drawn
  with the band ``K ± 2 · K_stderr``; with ``K_residual`` (a convergence residual), with
  ``K ± K_residual`` (same colour, alpha 0.2). A reading within noise (``2 · K_stderr ≥
  |K|``, or ``K_residual ≥ |K|/2``) is a hollow grey circle, left out of the line, the band,
  the y range and the log-scale choice (unless every reading of the panel is noise), and
  the panel counts them: ``"3 of 40 readings within noise (2σ ≥ |value|): hollow"``.

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
  panels = _panels(history, step)
  if not panels:
    have = history.keys()[:8]
    raise KeyError(
      f"cockpit: no instrument values recorded (see jaxscope.metrics.instruments); have {have}."
    )
  cols = min(_COLUMNS, len(panels))
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(4.2 * cols, 3.3 * rows + 0.5), layout="constrained")
  for i, (title, draw) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    if title:
      ax.set_title(title)
    draw(ax)
  name = f"{history.run_dir.name}: " if history.run_dir is not None else ""
  fig.suptitle(f"Cockpit — {name}{_step_span(history)}", fontsize="large")
  return fig
