"""Figures of a recorded run: per-layer metrics, network-level scalars, histograms.

Every function returns a :class:`matplotlib.figure.Figure` built directly (not through
``pyplot``), so nothing global is touched: no figure is registered with pyplot, none is
shown, and a figure is freed like any Python object once unreferenced. Show one in a
notebook by evaluating it, or save it with ``fig.savefig(path)``.

Non-finite values (NaN, ±Inf) are drawn as gaps in the lines and marked with a red
``x`` at the top of the axes at their steps, so a divergence is not hidden; a NaN ``alpha``
(no update yet, step 0) is only a gap. A reading recorded with an error bar (``K_stderr``:
band ``±2σ``; ``K_residual``: band ``± residual``) is drawn with its band, and readings
within noise (``2σ ≥ |value|`` or ``residual ≥ |value|/2``) as hollow grey circles left out
of the line and the axis range, with a note counting them.

:func:`cockpit` draws the values of :func:`jaxscope.metrics.instruments` on one page, as
Cockpit's ``CockpitPlotter`` does (loss, α, gradient tests, distance, curvature, TIC and the
per-example gradient histograms).

The checkpoint analyses of :mod:`jaxscope.analysis` have their own figures:
:func:`path_figure` (loss and accuracy along interpolation paths with the real training
curve), :func:`layer_paths_figure` and :func:`parameter_paths_figure` (overlays with
distance-coded opacity), :func:`landscape_figure` and :func:`surface_figure` (contours with
data-derived levels and the trajectory, 3-D surface, 1-D loss/accuracy) and
:func:`robustness_figure` (the re-initialisation heat-map with the layer classes).

The modules, one per family of figures:

* :mod:`~jaxscope.plot.series`: :func:`metric_figure`, :func:`scalar_figure`,
  :func:`histogram_figure` and :func:`save_run_plots` (a History's series);
* :mod:`~jaxscope.plot.paths`: :func:`path_figure`, :func:`layer_paths_figure`,
  :func:`parameter_paths_figure`;
* :mod:`~jaxscope.plot.landscapes`: :func:`landscape_figure`, :func:`surface_figure`;
* :mod:`~jaxscope.plot.robustness`: :func:`robustness_figure`;
* :mod:`~jaxscope.plot.stacks`: :func:`stack_figure` (step × layer heat maps of
  layer-stacked models);
* :mod:`~jaxscope.plot.cockpit`: :func:`cockpit`;
* :mod:`~jaxscope.plot.diagnosis`: :func:`diagnosis_figure`.

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

from jaxscope.plot.cockpit import cockpit
from jaxscope.plot.diagnosis import diagnosis_figure
from jaxscope.plot.landscapes import landscape_figure, surface_figure
from jaxscope.plot.paths import layer_paths_figure, parameter_paths_figure, path_figure
from jaxscope.plot.robustness import robustness_figure
from jaxscope.plot.series import histogram_figure, metric_figure, save_run_plots, scalar_figure
from jaxscope.plot.stacks import stack_figure

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
  "stack_figure",
  "surface_figure",
]
