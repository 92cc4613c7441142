"""Tests of jaxscope.plot.series: figures of a History's series, saved PNG files."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

import jaxscope.plot
from jaxscope.plot import (
  histogram_figure,
  metric_figure,
  save_run_plots,
  scalar_figure,
)
from jaxscope.record import History, Recorder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ("Dense_0/kernel", "Dense_1/kernel")
STEPS = list(range(0, 30, 3))
NAN_STEP = 9
INF_STEP = 15
BINS = 5


def _norm(step: int, i: int) -> float:
  if i == 0 and step == NAN_STEP:
    return float("nan")
  if i == 1 and step == INF_STEP:
    return float("inf")
  return 1.0 + 0.1 * step + i


def _history() -> History:
  records = []
  for step in STEPS:
    values: dict[str, object] = {
      f"grads/norm/{lay}": _norm(step, i) for i, lay in enumerate(LAYERS)
    }
    values["loss"] = 2.0 / (step + 1)
    values["accuracy"] = min(1.0, 0.1 + 0.03 * step)
    values["grads/histogram_counts/Dense_0/kernel"] = list(range(step % 4, step % 4 + BINS))
    values["grads/histogram_edges/Dense_0/kernel"] = np.linspace(-1 - step, 1 + step, BINS + 1)
    records.append((step, values))
  return History(records)


@pytest.fixture(autouse=True)
def _no_pyplot_figures() -> None:
  assert plt.get_fignums() == []
  yield
  assert plt.get_fignums() == []


def _marks(ax):
  """The non-finite markers of an axes."""
  return [c for c in ax.collections if "non-finite" in str(c.get_label())]


def test_public_names() -> None:
  want = {
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
  }
  assert set(jaxscope.plot.__all__) == want
  assert all(callable(getattr(jaxscope.plot, name)) for name in want)


# ------------------------------------------------------------------------ metric_figure


def test_metric_figure_lines_equal_inputs() -> None:
  fig = metric_figure(_history(), "grads", "norm")
  assert isinstance(fig, Figure)
  ax = fig.axes[0]
  assert ax.get_title() == "grads/norm"
  lines = ax.get_lines()
  assert [line.get_label() for line in lines] == list(LAYERS)
  for i, line in enumerate(lines):
    np.testing.assert_array_equal(line.get_xdata(), STEPS)
    want = np.array([_norm(s, i) for s in STEPS])
    want[~np.isfinite(want)] = np.nan  # Non-finite values are gaps.
    np.testing.assert_array_equal(np.asarray(line.get_ydata(), np.float64), want)
  # The non-finite steps are marked.
  marks = [c for c in ax.collections if "non-finite" in str(c.get_label())]
  assert len(marks) == 1
  np.testing.assert_array_equal(marks[0].get_offsets()[:, 0], [NAN_STEP, INF_STEP])
  legend = ax.get_legend()
  assert legend is not None
  assert [t.get_text() for t in legend.get_texts()][:2] == list(LAYERS)


def test_metric_figure_axes_labels_and_legend() -> None:
  fig = metric_figure(_history(), "grads", "norm")
  ax = fig.axes[0]
  assert len(fig.axes) == 1
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "norm")
  assert ax.get_yscale() == "linear"  # 1 … 4.7: less than two decades.
  (marks,) = _marks(ax)
  assert marks.get_label() == "non-finite (2 steps)"
  # Marks sit at the top of the axes (y = 1 in axes coordinates), whatever the data.
  np.testing.assert_array_equal(marks.get_offsets()[:, 1], [1.0, 1.0])
  texts = [t.get_text() for t in ax.get_legend().get_texts()]
  assert texts == [*LAYERS, "non-finite (2 steps)"]
  # One layer, all finite: no legend.
  h = History([(s, {"grads/norm/a": 1.0 + s}) for s in range(4)])
  ax = metric_figure(h, "grads", "norm").axes[0]
  assert ax.get_legend() is None and not _marks(ax)


def test_metric_figure_layers_and_logy() -> None:
  h = History([(s, {"a/b/x": 10.0**s, "a/b/y": 1.0 + s, "a/c/x": -1.0 + s}) for s in range(5)])
  fig = metric_figure(h, "a", "b", layers=["x"])
  assert [line.get_label() for line in fig.axes[0].get_lines()] == ["x"]
  assert fig.axes[0].get_yscale() == "log"
  assert metric_figure(h, "a", "b", ["y"]).axes[0].get_yscale() == "linear"
  assert metric_figure(h, "a", "c").axes[0].get_yscale() == "linear"
  assert metric_figure(h, "a", "b", ["y"], logy=True).axes[0].get_yscale() == "log"
  with pytest.raises(KeyError):
    metric_figure(h, "a", "nope")


def test_metric_figure_log_threshold_is_two_decades() -> None:
  def scale(values, **kw):
    h = History([(s, {"g/n/w": v}) for s, v in enumerate(values)])
    return metric_figure(h, "g", "n", **kw).axes[0].get_yscale()

  assert scale([1.0, 100.0]) == "linear"  # exactly two decades: not more
  assert scale([1.0, 101.0]) == "log"
  assert scale([1.0, np.nan, 1e6]) == "log"  # non-finite values are ignored
  assert scale([0.0, 1e6]) == "linear"  # a zero cannot be drawn on a log axis
  assert scale([1.0, 1e6], logy=False) == "linear"
  assert scale([np.nan, np.inf]) == "linear"


def test_metric_figure_many_layers_legend_outside() -> None:
  layers = [f"L{i}" for i in range(13)]
  h = History([(s, {f"g/n/{lay}": 1.0 + i for i, lay in enumerate(layers)}) for s in range(3)])
  ax = metric_figure(h, "g", "n").axes[0]
  lines = ax.get_lines()
  assert [ln.get_label() for ln in lines] == layers
  for i, ln in enumerate(lines):
    np.testing.assert_array_equal(ln.get_ydata(), [1.0 + i] * 3)
  legend = ax.get_legend()
  assert len(legend.get_texts()) == 13
  x0, y0 = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).p0
  assert x0 == pytest.approx(1.01) and y0 == pytest.approx(1.0)  # right of the axes


def test_metric_figure_rejects_histograms() -> None:
  with pytest.raises(ValueError, match="histogram_figure"):
    metric_figure(_history(), "grads", "histogram_counts")


# ------------------------------------------------------------------------ scalar_figure


def test_scalar_figure() -> None:
  fig = scalar_figure(_history(), "loss")
  ax = fig.axes[0]
  assert ax.get_title() == "loss"
  (line,) = ax.get_lines()
  np.testing.assert_allclose(line.get_ydata(), [2.0 / (s + 1) for s in STEPS])
  with pytest.raises(ValueError, match="histogram_figure"):
    scalar_figure(_history(), "grads/histogram_counts/Dense_0/kernel")


def test_scalar_figure_content() -> None:
  fig = scalar_figure(_history(), "accuracy")
  ax = fig.axes[0]
  (line,) = ax.get_lines()
  np.testing.assert_array_equal(line.get_xdata(), STEPS)
  np.testing.assert_allclose(line.get_ydata(), [min(1.0, 0.1 + 0.03 * s) for s in STEPS])
  assert line.get_label() == "accuracy"
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "accuracy")
  assert ax.get_legend() is None  # one finite series
  # The loss 2/(s + 1) spans 2 … 0.071: less than two decades, linear unless asked.
  assert scalar_figure(_history(), "loss").axes[0].get_yscale() == "linear"
  assert scalar_figure(_history(), "loss", logy=True).axes[0].get_yscale() == "log"
  with pytest.raises(KeyError):
    scalar_figure(_history(), "nope")


def test_scalar_figure_nonfinite_and_single_step() -> None:
  h = History([(0, {"loss": 3.0}), (5, {"loss": np.inf}), (7, {"loss": 1.0})])
  ax = scalar_figure(h, "loss").axes[0]
  (line,) = ax.get_lines()
  np.testing.assert_array_equal(line.get_xdata(), [0, 5, 7])
  np.testing.assert_array_equal(line.get_ydata(), [3.0, np.nan, 1.0])
  (marks,) = _marks(ax)
  np.testing.assert_array_equal(marks.get_offsets()[:, 0], [5])
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "non-finite (1 steps)"]
  # A single step is drawn as a point (a line of one point would be invisible).
  (dot,) = scalar_figure(History([(4, {"loss": 2.0})]), "loss").axes[0].get_lines()
  assert dot.get_marker() == "o"
  assert line.get_marker() in ("None", None, "")


# --------------------------------------------------------------------- histogram_figure


def _two_step_histogram() -> History:
  return History(
    [
      (0, {"p/histogram_counts/w": [1, 2], "p/histogram_edges/w": [0.0, 1.0, 2.0]}),
      (2, {"p/histogram_counts/w": [3, 0], "p/histogram_edges/w": [-1.0, 0.0, 1.0]}),
    ]
  )


def test_histogram_figure() -> None:
  fig = histogram_figure(_history(), "grads", "Dense_0/kernel")
  assert isinstance(fig, Figure)
  ax = fig.axes[0]
  assert ax.get_title() == "grads/histogram/Dense_0/kernel"
  (mesh,) = ax.collections
  # Each step's column spans its own edges: the y range covers the widest step.
  assert ax.get_ylim()[0] <= -1 - STEPS[-1] and ax.get_ylim()[1] >= 1 + STEPS[-1]
  assert len(fig.axes) == 2  # The colour bar.
  data = mesh.get_array()
  assert data.count() > 0
  linear = histogram_figure(_history(), "grads", "Dense_0/kernel", log_counts=False)
  assert linear.axes[0].collections


def test_histogram_figure_mesh_equals_inputs() -> None:
  fig = histogram_figure(_two_step_histogram(), "p", "w")
  ax, cbar = fig.axes
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "p")
  assert cbar.get_ylabel() == "count"
  (mesh,) = ax.collections
  assert isinstance(mesh, QuadMesh)
  # Columns: step 0 spans [−1, 1] (half-way to step 2 on both sides), step 2 spans [1, 3];
  # the zero-width column between them is masked.
  xy = mesh.get_coordinates()  # [bins + 1, 2 × steps, 2]
  np.testing.assert_array_equal(xy[..., 0], np.tile([-1.0, 1.0, 1.0, 3.0], (3, 1)))
  # Each step with its own edges.
  np.testing.assert_array_equal(xy[:, :2, 1], [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
  np.testing.assert_array_equal(xy[:, 2:, 1], [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
  data = mesh.get_array()
  # Rows are bins, column 0 step 0, column 2 step 2; the empty bin is blank (log colours).
  np.testing.assert_array_equal(data.mask, [[False, True, False], [False, True, True]])
  np.testing.assert_array_equal(data.filled(-1), [[1, -1, 3], [2, -1, -1]])
  assert isinstance(mesh.norm, LogNorm)
  assert (mesh.norm.vmin, mesh.norm.vmax) == (1.0, 3.0)
  assert ax.get_xlim() == (-1.0, 3.0)
  # Linear colours: zero counts are drawn, from 0.
  (mesh,) = histogram_figure(_two_step_histogram(), "p", "w", log_counts=False).axes[0].collections
  np.testing.assert_array_equal(mesh.get_array().filled(-1), [[1, -1, 3], [2, -1, 0]])
  assert (mesh.norm.vmin, mesh.norm.vmax) == (0.0, 3.0)


def test_histogram_figure_stat_and_title() -> None:
  h = History([(1, {"g/h_counts/w": [4, 5], "g/h_edges/w": [0.0, 0.5, 1.0]})])
  ax = histogram_figure(h, "g", "w", stat="h").axes[0]
  assert ax.get_title() == "g/h/w"
  with pytest.raises(KeyError):
    histogram_figure(h, "g", "w")  # default stat "histogram" was not recorded


def test_histogram_figure_single_step_and_nonfinite_edges() -> None:
  h = History(
    [
      (0, {"p/histogram_counts/w": [1, 2], "p/histogram_edges/w": [0.0, 0.5, 1.0]}),
      (4, {"p/histogram_counts/w": [0, 0], "p/histogram_edges/w": [np.nan, 0.5, 1.0]}),
    ]
  )
  histogram_figure(h, "p", "w")
  one = History([(0, {"p/histogram_counts/w": [1, 2], "p/histogram_edges/w": [0.0, 0.5, 1.0]})])
  histogram_figure(one, "p", "w")


def test_histogram_figure_nonfinite_edges_blank_column() -> None:
  h = History(
    [
      (0, {"p/histogram_counts/w": [1, 2], "p/histogram_edges/w": [0.0, 0.5, 1.0]}),
      (4, {"p/histogram_counts/w": [7, 8], "p/histogram_edges/w": [np.nan, 0.5, 1.0]}),
    ]
  )
  ax = histogram_figure(h, "p", "w", log_counts=False).axes[0]
  (mesh,) = ax.collections
  # The second step's counts are there but masked: its edges are not finite.
  np.testing.assert_array_equal(mesh.get_array().mask, [[False, True, True], [False, True, True]])
  assert mesh.norm.vmax == 2.0  # the blank column does not set the colour range
  np.testing.assert_array_equal(np.isfinite(mesh.get_coordinates()), True)
  # A single step is a column one step wide around it.
  one = History([(3, {"p/histogram_counts/w": [1, 2], "p/histogram_edges/w": [0.0, 0.5, 1.0]})])
  ax = histogram_figure(one, "p", "w").axes[0]
  assert ax.get_xlim() == (2.5, 3.5)
  (mesh,) = ax.collections
  np.testing.assert_array_equal(mesh.get_array().filled(-1), [[1], [2]])


def test_histogram_figure_mismatch() -> None:
  h = History([(0, {"p/histogram_counts/w": [1, 2], "p/histogram_edges/w": [0.0, 1.0]})])
  with pytest.raises(ValueError, match="do not match"):
    histogram_figure(h, "p", "w")


# ------------------------------------------------------------------------ save_run_plots


def test_save_run_plots(tmp_path: Path) -> None:
  out = tmp_path / "plots" / "nested"
  paths = save_run_plots(_history(), out)
  names = sorted(p.name for p in paths)
  assert names == sorted(
    ["grads_norm.png", "loss.png", "accuracy.png", "grads_histogram_Dense_0_kernel.png"]
  )
  for p in paths:
    assert p.parent == out
    assert p.read_bytes()[:8] == PNG_MAGIC


def test_save_run_plots_order_and_skips(tmp_path: Path) -> None:
  h = History(
    [
      (
        s,
        {
          "loss": 1.0 / (s + 1),
          "grads/norm/a/kernel": 1.0,
          "grads/hist_counts/a/kernel": [1, 2],
          "grads/hist_edges/a/kernel": [0.0, 1.0, 2.0],
          "params/spectrum/a/kernel": [3.0, 2.0, 1.0],  # an array that is no histogram
          "train/accuracy": 0.5,
        },
      )
      for s in range(3)
    ]
  )
  names = [p.name for p in save_run_plots(h, tmp_path, dpi=20)]
  # Per-layer metrics, then network-level scalars, then histograms.
  assert names == ["grads_norm.png", "loss.png", "train_accuracy.png", "grads_hist_a_kernel.png"]


def test_save_run_plots_from_run_dir(tmp_path: Path) -> None:
  with Recorder(tmp_path / "run") as rec:
    for step in range(3):
      rec.write(step, {"loss": float(step), "updates/ratio/Conv_1/kernel": 1e-3})
  paths = save_run_plots(tmp_path / "run", tmp_path / "plots")
  assert sorted(p.name for p in paths) == ["loss.png", "updates_ratio.png"]
  assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


# ----------------------------------------------------------- error bars (issue 18)

SN = np.array([2.0, 2.5, 2.8, 2.9, 3.0, 3.0])  # power-iteration spectral norms
SN_RES = np.array([1.5, 0.1, 0.05, 0.02, 0.01, np.nan])  # step 0: 1.5 ≥ 2/2, not converged


def _spectral_history() -> History:
  records = []
  for s in range(6):
    records.append(
      (
        s,
        {
          "params/spectral_norm/Dense_0/kernel": SN[s],
          "params/spectral_norm_residual/Dense_0/kernel": SN_RES[s],
          "params/spectral_norm/Dense_1/kernel": 1.0,  # no error bar
          "hess_trace": 50.0 + s if s else 500.0,
          "hess_trace_stderr": 1.0 if s else 400.0,  # step 0: 2σ = 800 ≥ 500
          "alpha": np.nan if s == 0 else 0.1 * s,
        },
      )
    )
  return History(records)


def _by_gid(ax, gid: str) -> list:
  return [a for a in ax.get_children() if a.get_gid() == gid]


def test_metric_figure_residual_band_and_noise() -> None:
  ax = metric_figure(_spectral_history(), "params", "spectral_norm").axes[0]
  # The residual is the band of its parent, not a line of its own.
  lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
  assert list(lines) == ["Dense_0/kernel", "Dense_1/kernel"]
  np.testing.assert_array_equal(lines["Dense_0/kernel"].get_xdata(), [1, 2, 3, 4, 5])
  (band,) = _by_gid(ax, "band:Dense_0/kernel")
  ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
  # Steps 1–4 (step 5's residual is NaN: no band there, the reading stays on the line).
  assert ys.min() == pytest.approx(np.min(SN[1:5] - SN_RES[1:5]))
  assert ys.max() == pytest.approx(np.max(SN[1:5] + SN_RES[1:5]))
  assert not _by_gid(ax, "band:Dense_1/kernel")
  (dots,) = _by_gid(ax, "noise:Dense_0/kernel")
  np.testing.assert_array_equal(dots.get_xdata(), [0])
  assert [t.get_text() for t in ax.texts] == [
    "Dense_0/kernel: 1 of 6 readings within noise (residual ≥ |value|/2): hollow"
  ]


def test_scalar_figure_stderr_band_noise_and_nan_alpha() -> None:
  h = _spectral_history()
  ax = scalar_figure(h, "hess_trace").axes[0]
  # Step 0 (500 ± 800) is within noise: not on the line, not in the y range nor the log
  # choice; the x range still starts at step 0.
  (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "hess_trace"]
  np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3, 4, 5])
  assert ax.get_ylim()[1] < 100.0 and ax.get_xlim()[0] <= 0.0
  assert ax.get_yscale() == "linear"
  (band,) = _by_gid(ax, "band:hess_trace")
  ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
  assert (ys.min(), ys.max()) == pytest.approx((49.0, 57.0))
  assert [t.get_text() for t in ax.texts] == ["1 of 6 readings within noise (2σ ≥ |value|): hollow"]
  # α is NaN at step 0 (no update yet): a gap, not 0, not marked; a loss NaN still is.
  ax = scalar_figure(h, "alpha").axes[0]
  (line,) = ax.get_lines()
  assert np.isnan(line.get_ydata()[0]) and ax.get_legend() is None and not _marks(ax)
  h = History([(0, {"loss": np.nan}), (1, {"loss": 1.0})])
  assert len(_marks(scalar_figure(h, "loss").axes[0])) == 1


def test_save_run_plots_skips_error_bar_keys(tmp_path: Path) -> None:
  names = [p.name for p in save_run_plots(_spectral_history(), tmp_path, dpi=20)]
  assert names == ["params_spectral_norm.png", "hess_trace.png", "alpha.png"]
