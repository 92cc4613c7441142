"""Tests of jaxscope.plot.paths: interpolation-path figures checked against their inputs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from jaxscope.analysis import PathResult
from jaxscope.plot import layer_paths_figure, parameter_paths_figure, path_figure

A = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
LIN = np.array([1.0, 0.8, 0.6, 0.4, 0.2])
ACC = np.array([0.1, 0.3, 0.5, 0.7, 0.9])


def _path(loss, *, kind="linear", level="model", name="model", distance=1.0, alpha=A, acc=None):
  loss = np.asarray(loss, np.float64)
  acc = np.zeros_like(loss) if acc is None else np.asarray(acc, np.float64)
  return PathResult(np.asarray(alpha, np.float64), loss, acc, kind, level, name, distance)


@pytest.fixture(autouse=True)
def _no_pyplot_figures() -> None:
  assert plt.get_fignums() == []
  yield
  assert plt.get_fignums() == []


def _data_lines(ax):
  """The labelled lines of an axes (matplotlib names unlabelled ones ``_child…``)."""
  return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def _marks(ax):
  return [c for c in ax.collections if "non-finite" in str(c.get_label())]


def _vlines_at(ax):
  """x of the unlabelled vertical lines (the α = 0 and α = 1 markers)."""
  out = []
  for ln in ax.get_lines():
    x = np.asarray(ln.get_xdata(), np.float64)
    if ln.get_label().startswith("_") and x.size == 2 and x[0] == x[1]:
      out.append(float(x[0]))
  return out


# -------------------------------------------------------------------------- path_figure


def test_path_figure_lines_equal_inputs() -> None:
  bad = LIN.copy()
  bad[1], bad[3] = np.nan, np.inf
  lin = _path(LIN, acc=ACC)
  quad = _path(bad, kind="quadratic", acc=ACC[::-1])
  fig = path_figure([lin, quad])
  assert isinstance(fig, Figure)
  ax, ax2 = fig.axes
  lines = _data_lines(ax)
  assert [ln.get_label() for ln in lines] == ["linear", "quadratic"]
  for ln in lines:
    np.testing.assert_array_equal(ln.get_xdata(), A)
  np.testing.assert_array_equal(lines[0].get_ydata(), LIN)
  np.testing.assert_array_equal(lines[1].get_ydata(), [1.0, np.nan, 0.6, np.nan, 0.2])
  assert [to_rgba(ln.get_color()) for ln in lines] == [to_rgba("tab:blue"), to_rgba("tab:orange")]
  # The accuracy on the twin axis, dashed, in the colour of its path.
  acc_lines = ax2.get_lines()
  assert len(acc_lines) == 2
  np.testing.assert_array_equal(acc_lines[0].get_ydata(), ACC)
  np.testing.assert_array_equal(acc_lines[1].get_ydata(), ACC[::-1])
  assert all(ln.get_linestyle() == "--" for ln in acc_lines)
  assert [to_rgba(ln.get_color(), 1) for ln in acc_lines] == [
    to_rgba(ln.get_color()) for ln in lines
  ]
  assert ax2.get_ylim() == pytest.approx((-0.02, 1.02))
  assert ax2.get_ylabel() == "accuracy (dashed)"
  # Non-finite losses marked at their α.
  (marks,) = _marks(ax)
  np.testing.assert_array_equal(marks.get_offsets()[:, 0], [0.25, 0.75])
  assert marks.get_label() == "non-finite loss (2)"
  assert sorted(_vlines_at(ax)) == [0.0, 1.0]
  assert ax.get_title() == "model-level interpolation paths"
  assert ax.get_xlabel() == "α (0: first checkpoint, 1: final checkpoint)"
  assert ax.get_ylabel() == "loss"
  assert ax.get_yscale() == "linear"  # 0.2 … 1: less than a decade
  texts = [t.get_text() for t in ax.get_legend().get_texts()]
  assert texts == ["linear", "quadratic", "non-finite loss (2)"]


def test_path_figure_real_points_and_mae() -> None:
  # α in descending order with a NaN loss: the error uses the finite points, sorted.
  path = _path([0.0, 0.5, np.nan, 1.0], alpha=[1.0, 0.5, 0.25, 0.0])
  real = ([0.25, 0.75, 2.0, 0.5], [1.0, 0.0, 5.0, np.nan], [10, 20, 30, 40])
  fig = path_figure([path], real=real)
  ax = fig.axes[0]
  # Interpolated at 0.25: 0.75 (|0.75 − 1| = 0.25); at 0.75: 0.25 (|0.25 − 0| = 0.25);
  # α = 2 lies outside the path and the NaN loss is left out: MAE = 0.25.
  (line,) = _data_lines(ax)
  assert line.get_label() == "linear (MAE 0.25)"
  (pts,) = [c for c in ax.collections if c.get_label() == "checkpoints (true loss)"]
  np.testing.assert_array_equal(pts.get_offsets(), [[0.25, 1.0], [0.75, 0.0], [2.0, 5.0]])
  assert [t.get_text() for t in ax.texts] == ["10", "20", "30"]
  (marks,) = _marks(ax)  # the path's NaN at α = 0.25 and the checkpoint's at α = 0.5
  np.testing.assert_array_equal(marks.get_offsets()[:, 0], [0.25, 0.5])
  # A dict works too, and labels are optional.
  fig = path_figure([path], real={"alpha": real[0], "loss": real[1]})
  assert len(fig.axes[0].texts) == 0
  assert _data_lines(fig.axes[0])[0].get_label() == "linear (MAE 0.25)"


def test_path_figure_mae_nan_without_overlap() -> None:
  fig = path_figure([_path(LIN)], real=([3.0], [1.0]))
  assert _data_lines(fig.axes[0])[0].get_label() == "linear (MAE nan)"


def test_path_figure_labels_and_title() -> None:
  p = _path(LIN, level="layer", name="conv1", kind="quadratic")
  ax = path_figure([p]).axes[0]
  assert [ln.get_label() for ln in _data_lines(ax)] == ["quadratic conv1"]
  assert ax.get_title() == "layer-level interpolation paths"
  assert path_figure([p], title="mine").axes[0].get_title() == "mine"
  # No path, no points: an empty axes, no legend.
  ax = path_figure([]).axes[0]
  assert ax.get_legend() is None and ax.get_title() == "model-level interpolation paths"


def test_path_figure_log_scale() -> None:
  steep = _path([20.0, 5.0, 1.0, 0.5, 1.0])  # 0.5 … 20: more than a decade
  assert path_figure([steep]).axes[0].get_yscale() == "log"
  assert path_figure([steep], logy=False).axes[0].get_yscale() == "linear"
  # A zero loss keeps the axis linear; asked for log, the zero becomes a gap.
  zero = _path([20.0, 5.0, 0.0, 0.5, 1.0])
  assert path_figure([zero]).axes[0].get_yscale() == "linear"
  ax = path_figure([zero], real=([0.1, 0.2], [2.0, 0.0]), logy=True).axes[0]
  assert ax.get_yscale() == "log"
  np.testing.assert_array_equal(_data_lines(ax)[0].get_ydata(), [20.0, 5.0, np.nan, 0.5, 1.0])
  (pts,) = [c for c in ax.collections if c.get_label() == "checkpoints (true loss)"]
  np.testing.assert_array_equal(pts.get_offsets(), [[0.1, 2.0]])  # the zero is left out
  # The real points count for the automatic choice.
  assert path_figure([_path(LIN)], real=([0.5], [100.0])).axes[0].get_yscale() == "log"


def test_path_figure_accuracy_axis() -> None:
  assert len(path_figure([_path(LIN)]).axes) == 1  # regression: accuracy all 0
  assert len(path_figure([_path(LIN, acc=ACC)]).axes) == 2
  assert len(path_figure([_path(LIN, acc=ACC)], accuracy=False).axes) == 1
  assert len(path_figure([_path(LIN)], accuracy=True).axes) == 2


def test_path_figure_bad_real() -> None:
  with pytest.raises(ValueError, match="labels"):
    path_figure([_path(LIN)], real=([0, 1], [1, 2], ["a"]))
  with pytest.raises(ValueError, match="2 real alphas but 1 real losses"):
    path_figure([_path(LIN)], real=([0, 1], [1]))
  with pytest.raises(ValueError, match="got 4 items"):
    path_figure([_path(LIN)], real=([0], [1], ["a"], None))


# ------------------------------------------------------------------- layer_paths_figure


def _layers(distances=(0.0, 1.0, 2.0)):
  names = ("conv1", "conv2", "fc")
  return {
    n: _path(LIN * (i + 1), level="layer", name=n, distance=d)
    for i, (n, d) in enumerate(zip(names, distances, strict=True))
  }


def test_layer_paths_figure_lines_and_opacity() -> None:
  layers = _layers()
  fig = layer_paths_figure(layers, _path(LIN, kind="linear"))
  ax = fig.axes[0]
  assert len(fig.axes) == 1
  lines = _data_lines(ax)
  labels = [ln.get_label() for ln in lines]
  assert labels == ["conv1 (‖Δθ‖ 0)", "conv2 (‖Δθ‖ 1)", "fc (‖Δθ‖ 2)", "model (linear)"]
  for i, ln in enumerate(lines[:3]):
    np.testing.assert_array_equal(ln.get_xdata(), A)
    np.testing.assert_allclose(ln.get_ydata(), LIN * (i + 1))
    assert to_rgba(ln.get_color()) == colormaps["tab10"](i)
  # Opacity: min–max-normalised distance, floored at 0.1.
  assert [ln.get_alpha() for ln in lines[:3]] == [0.1, 0.5, 1.0]
  model = lines[3]
  np.testing.assert_array_equal(model.get_ydata(), LIN)
  assert to_rgba(model.get_color()) == to_rgba("black")
  assert model.get_linewidth() == 2.5 and model.get_linestyle() == "-"
  assert ax.get_title() == "layer-level linear paths (opacity: distance moved)"
  assert ax.get_xlabel() == "α (the layer moves from the first to the final checkpoint)"
  assert ax.get_ylabel() == "loss"
  assert sorted(_vlines_at(ax)) == [0.0, 1.0]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == labels


def test_layer_paths_figure_opacity_edge_cases() -> None:
  ax = layer_paths_figure(_layers((2.0, 2.0, 2.0))).axes[0]
  assert [ln.get_alpha() for ln in _data_lines(ax)] == [1.0, 1.0, 1.0]  # all equal
  ax = layer_paths_figure(_layers((1.0, np.nan, 3.0))).axes[0]
  lines = _data_lines(ax)
  assert [ln.get_alpha() for ln in lines] == [0.1, 1.0, 1.0]  # NaN: drawn fully
  assert lines[1].get_label() == "conv2 (‖Δθ‖ nan)"


def test_layer_paths_figure_models_nonfinite_and_sequence() -> None:
  bad = LIN.copy()
  bad[2] = np.nan
  layers = list(_layers().values())
  layers[2] = layers[2]._replace(loss=bad)
  models = [_path(LIN), _path(LIN * 2, kind="quadratic")]
  ax = layer_paths_figure(layers, models, title="T").axes[0]
  lines = _data_lines(ax)
  assert [ln.get_label() for ln in lines[3:]] == ["model (linear)", "model (quadratic)"]
  assert [ln.get_linestyle() for ln in lines[3:]] == ["-", "--"]
  np.testing.assert_array_equal(lines[2].get_ydata(), [1.0, 0.8, np.nan, 0.4, 0.2])
  (marks,) = _marks(ax)
  np.testing.assert_array_equal(marks.get_offsets()[:, 0], [0.5])
  assert ax.get_title() == "T"
  # Only a model path: the title takes its kind.
  ax = layer_paths_figure({}, _path(LIN, kind="quadratic")).axes[0]
  assert ax.get_title() == "layer-level quadratic paths (opacity: distance moved)"
  assert ax.get_legend() is not None
  assert layer_paths_figure({}).axes[0].get_legend() is None


def test_layer_paths_figure_log_and_many_layers() -> None:
  steep = {f"L{i}": _path(np.geomspace(100, 1, 5), name=f"L{i}", distance=i) for i in range(13)}
  ax = layer_paths_figure(steep).axes[0]
  assert ax.get_yscale() == "log"
  lines = _data_lines(ax)
  assert len(lines) == 13
  assert to_rgba(lines[11].get_color()) == colormaps["tab20"](11)  # more than 10: tab20
  legend = ax.get_legend()
  x0, _ = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).p0
  assert x0 == pytest.approx(1.01)  # outside, right of the axes
  assert layer_paths_figure(steep, logy=False).axes[0].get_yscale() == "linear"


# --------------------------------------------------------------- parameter_paths_figure


def _params():
  bad = LIN.copy()
  bad[4] = np.inf
  return [
    _path(LIN, level="parameter", name="conv1/kernel[0,0]", distance=0.1),
    _path(LIN + 1, level="parameter", name="conv1/kernel[1,0]", distance=0.3),
    _path(LIN + 2, level="parameter", name="conv1/bias[2]", distance=0.2),
    _path(bad, level="parameter", name="fc/kernel[0,1]", distance=1.0),
  ]


def test_parameter_paths_figure_panels() -> None:
  fig = parameter_paths_figure(_params())
  assert fig.get_suptitle() == "parameter-level linear paths (opacity: |Δθ|)"
  assert len(fig.axes) == 2  # two layers: one row of two panels
  conv, fc = fig.axes
  assert [conv.get_title(), fc.get_title()] == ["conv1", "fc"]
  lines = _data_lines(conv)
  assert [ln.get_label() for ln in lines] == [
    "kernel[0,0] |Δ| 0.1",
    "kernel[1,0] |Δ| 0.3",
    "bias[2] |Δ| 0.2",
  ]
  for k, ln in enumerate(lines):
    np.testing.assert_array_equal(ln.get_xdata(), A)
    np.testing.assert_allclose(ln.get_ydata(), LIN + k)
    assert to_rgba(ln.get_color(), 1) == to_rgba("tab:blue")
  # Opacity normalised within the panel: 0.1 → floor, 0.3 → 1, 0.2 → 0.5.
  np.testing.assert_allclose([ln.get_alpha() for ln in lines], [0.1, 1.0, 0.5])
  (line,) = _data_lines(fc)
  assert line.get_alpha() == 1.0 and to_rgba(line.get_color(), 1) == to_rgba("tab:orange")
  np.testing.assert_array_equal(line.get_ydata(), [1.0, 0.8, 0.6, 0.4, np.nan])
  (marks,) = _marks(fc)
  np.testing.assert_array_equal(marks.get_offsets()[:, 0], [1.0])
  assert marks.get_label() == "non-finite (1)"
  assert not _marks(conv)
  assert (conv.get_xlabel(), conv.get_ylabel()) == ("α", "loss")
  assert sorted(_vlines_at(conv)) == [0.0, 1.0]


def test_parameter_paths_figure_layout_and_edge_cases() -> None:
  fig = parameter_paths_figure(_params(), max_cols=1, title="T")
  assert len(fig.axes) == 2 and all(ax.get_visible() for ax in fig.axes)
  assert fig.get_suptitle() == "T"
  four = [_path(LIN, name=f"{n}/w[0]") for n in "abcd"]
  fig = parameter_paths_figure(four)  # 2 rows of 3, the last two panels hidden
  assert [ax.get_visible() for ax in fig.axes] == [True] * 4 + [False] * 2
  assert [ax.get_title() for ax in fig.axes[:4]] == list("abcd")
  steep = [_path(np.geomspace(100, 1, 5), name="w[0]", distance=1.0)]
  fig = parameter_paths_figure(steep)
  assert [ax.get_title() for ax in fig.axes] == ["w"]  # a leaf without a layer
  assert fig.axes[0].get_yscale() == "log"
  assert _data_lines(fig.axes[0])[0].get_label() == "w[0] |Δ| 1"
  empty = parameter_paths_figure([])
  assert isinstance(empty, Figure) and len(empty.axes) == 1
  assert [t.get_text() for t in empty.axes[0].texts] == ["no parameters"]
