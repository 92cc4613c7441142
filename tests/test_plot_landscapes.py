"""Tests of jaxscope.plot.landscapes: contour levels, data ranges and trajectories."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.colors import BoundaryNorm, LogNorm
from matplotlib.contour import QuadContourSet

from jaxscope.analysis import Landscape
from jaxscope.plot import landscape_figure, surface_figure

X = np.linspace(-1.0, 1.0, 5)
Y = np.linspace(0.0, 1.0, 3)
Z = X[None, :] ** 2 + Y[:, None] ** 2 + 0.1  # 0.1 … 2.1: more than a decade


def _land(loss=Z, *, settings=None, y=Y, x=X, accuracy=None, center=0.1) -> Landscape:
  loss = np.asarray(loss, np.float64)
  acc = np.full_like(loss, 0.5) if accuracy is None else np.asarray(accuracy, np.float64)
  return Landscape(x, y, loss, acc, center, {} if settings is None else settings)


@pytest.fixture(autouse=True)
def _no_pyplot_figures() -> None:
  assert plt.get_fignums() == []
  yield
  assert plt.get_fignums() == []


def _contours(ax):
  filled = [c for c in ax.collections if isinstance(c, QuadContourSet) and c.filled]
  lines = [c for c in ax.collections if isinstance(c, QuadContourSet) and not c.filled]
  return filled, lines


def _data_lines(ax):
  return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


# ------------------------------------------------------------------- 2-D landscape_figure


def test_landscape_figure_log_levels_from_data() -> None:
  z = Z.copy()
  z[1, 2], z[0, 0] = np.nan, np.inf
  fig = landscape_figure(_land(z), levels=5)
  ax, cbar = fig.axes
  (cs,), (lines,) = _contours(ax)
  want = np.geomspace(0.1, 2.1, 5)  # the finite minimum and maximum
  np.testing.assert_allclose(cs.levels, want)
  np.testing.assert_allclose(lines.levels, want)
  assert isinstance(cs.norm, LogNorm)
  assert (cs.norm.vmin, cs.norm.vmax) == pytest.approx((0.1, 2.1))
  assert (cs.zmin, cs.zmax) == pytest.approx((0.1, 2.1))  # NaN and Inf left blank
  assert cbar.get_ylabel() == "loss"
  assert ax.get_title() == "loss landscape"
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("direction 1 (δ)", "direction 2 (η)")
  # The centre θ* as a star at the origin.
  (star,) = _data_lines(ax)
  assert star.get_label() == "centre θ*" and star.get_marker() == "*"
  np.testing.assert_array_equal(star.get_xydata(), [[0.0, 0.0]])


def test_landscape_figure_quantile_levels() -> None:
  z = Z - 0.5  # negative values: levels at quantiles, not log-spaced
  for n in (5, 20):
    fig = landscape_figure(_land(z), levels=n)
    ax, cbar = fig.axes
    (cs,), _ = _contours(ax)
    want = np.unique(np.quantile(z.ravel(), np.linspace(0.0, 1.0, n)))
    np.testing.assert_allclose(cs.levels, want)
    assert isinstance(cs.norm, BoundaryNorm)
    np.testing.assert_allclose(cs.norm.boundaries, want)
    if len(want) > 9:  # at most about eight ticks on the colour bar
      step = len(want) // 8
      np.testing.assert_allclose(cbar.get_yticks(), want[::step])
  # logz forces either way.
  (cs,), _ = _contours(landscape_figure(_land(), levels=4, logz=False).axes[0])
  np.testing.assert_allclose(cs.levels, np.unique(np.quantile(Z, np.linspace(0, 1, 4))))
  (cs,), _ = _contours(landscape_figure(_land(Z + 1), levels=4, logz=True).axes[0])
  np.testing.assert_allclose(cs.levels, np.geomspace(1.1, 3.1, 4))


def test_landscape_figure_constant_and_empty() -> None:
  (cs,), _ = _contours(landscape_figure(_land(np.ones_like(Z))).axes[0])
  np.testing.assert_allclose(cs.levels, [1.0 - 1e-3, 1.0 + 1e-3])  # one band around it
  fig = landscape_figure(_land(np.full_like(Z, np.nan)))
  assert len(fig.axes) == 1  # no colour bar
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.texts] == ["no finite loss values"]
  assert _contours(ax) == ([], [])


def test_landscape_figure_trajectory_and_labels() -> None:
  coords = np.array([[0.5, 0.5], [0.2, 0.1], [0.0, 0.0]])
  settings = {"explained_variance_ratio": [0.8, 0.1]}
  fig = landscape_figure(_land(settings=settings), (coords, [0, 2, 4]), title="T")
  ax = fig.axes[0]
  assert ax.get_title() == "T"
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("1st PC: 80.00 %", "2nd PC: 10.00 %")
  # The checkpoints joined in training order, as points, labelled with their steps.
  (path,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("_")]
  np.testing.assert_array_equal(path.get_xydata(), coords)
  (pts,) = [c for c in ax.collections if c.get_label() == "checkpoints"]
  np.testing.assert_array_equal(pts.get_offsets(), coords)
  assert [t.get_text() for t in ax.texts] == ["0", "2", "4"]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["centre θ*", "checkpoints"]
  # explained_variance overrides the settings; one value leaves the second axis generic.
  ax = landscape_figure(_land(settings=settings), explained_variance=[0.5]).axes[0]
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("1st PC: 50.00 %", "direction 2")
  # A mapping works; one-column coordinates sit on y = 0.
  ax = landscape_figure(_land(), {"coords": [0.3, -0.2]}).axes[0]
  (pts,) = [c for c in ax.collections if c.get_label() == "checkpoints"]
  np.testing.assert_array_equal(pts.get_offsets(), [[0.3, 0.0], [-0.2, 0.0]])
  assert len(ax.texts) == 0


def test_landscape_figure_one_row_is_a_mesh() -> None:
  row = _land(Z[:1], y=np.array([0.0]))
  ax = landscape_figure(row).axes[0]
  (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
  np.testing.assert_allclose(mesh.get_array().reshape(1, -1), Z[:1])
  assert _contours(ax) == ([], [])


def test_landscape_figure_bad_input() -> None:
  with pytest.raises(ValueError, match=r"not \(ny, nx\)"):
    landscape_figure(_land(Z.T))
  with pytest.raises(ValueError, match="2 trajectory labels for 3 points"):
    landscape_figure(_land(), (np.zeros((3, 2)), ["a", "b"]))


# ------------------------------------------------------------------- 1-D landscape_figure


def test_landscape_figure_1d() -> None:
  loss = np.array([1.0, np.nan, 0.2, np.inf, 1.0])
  acc = np.array([0.1, 0.2, 0.9, 0.3, 0.1])
  line = _land(loss, y=None, accuracy=acc, center=0.2)
  fig = landscape_figure(line)
  ax, ax2 = fig.axes
  assert ax.get_title() == "1-D loss landscape"
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("direction 1 (δ)", "loss")
  curve, star = _data_lines(ax)
  assert curve.get_label() == "loss"
  np.testing.assert_array_equal(curve.get_xdata(), X)
  np.testing.assert_array_equal(curve.get_ydata(), [1.0, np.nan, 0.2, np.nan, 1.0])
  np.testing.assert_array_equal(star.get_xydata(), [[0.0, 0.2]])
  (marks,) = [c for c in ax.collections if "non-finite" in str(c.get_label())]
  np.testing.assert_array_equal(marks.get_offsets()[:, 0], [-0.5, 0.5])
  assert marks.get_label() == "non-finite loss (2)"
  (acc_line,) = ax2.get_lines()
  np.testing.assert_array_equal(acc_line.get_ydata(), acc)
  assert acc_line.get_linestyle() == "--"
  assert ax2.get_ylim() == pytest.approx((-0.02, 1.02))
  assert ax.get_yscale() == "linear"  # 0.2 … 1


def test_landscape_figure_1d_checkpoints_and_log() -> None:
  loss = np.array([10.0, 1.0, 0.1, 1.0, 10.0])  # 0.1 … 10: log
  line = _land(loss, y=None, accuracy=np.zeros(5))
  fig = landscape_figure(line, {"coords": [-0.75, 0.25], "labels": ["a", "b"]}, title="T")
  assert len(fig.axes) == 1  # regression: no accuracy axis
  ax = fig.axes[0]
  assert ax.get_title() == "T" and ax.get_yscale() == "log"
  (pts,) = [c for c in ax.collections if c.get_label() == "checkpoints"]
  # Drawn on the curve, linearly interpolated: −0.75 → 5.5, 0.25 → 0.55.
  np.testing.assert_allclose(pts.get_offsets(), [[-0.75, 5.5], [0.25, 0.55]])
  assert [t.get_text() for t in ax.texts] == ["a", "b"]
  # Or at their own loss when given.
  ax = landscape_figure(line, {"coords": [0.25], "loss": [3.0]}).axes[0]
  (pts,) = [c for c in ax.collections if c.get_label() == "checkpoints"]
  np.testing.assert_allclose(pts.get_offsets(), [[0.25, 3.0]])
  assert landscape_figure(line, logz=False).axes[0].get_yscale() == "linear"


# ------------------------------------------------------------------------ surface_figure


def _face_means(z: np.ndarray) -> np.ndarray:
  """The value matplotlib colours each surface quad by: the mean of its four corners."""
  return np.array(
    [z[i : i + 2, j : j + 2].mean() for i in range(z.shape[0] - 1) for j in range(z.shape[1] - 1)]
  )


def test_surface_figure() -> None:
  fig = surface_figure(_land(settings={"explained_variance_ratio": [0.7, 0.2]}))
  (ax,) = fig.axes
  assert ax.name == "3d"
  assert ax.get_title() == "loss surface"
  assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()) == (
    "1st PC: 70.00 %",
    "2nd PC: 20.00 %",
    "loss",
  )
  (surf,) = ax.collections
  np.testing.assert_allclose(surf.get_array(), _face_means(Z))
  assert (surf.norm.vmin, surf.norm.vmax) == pytest.approx((0.1, 2.1))
  lo, hi = ax.get_zlim()
  assert lo <= 0.1 and hi >= 2.1
  fig = surface_figure(_land(), logz=True, title="T")
  (ax,) = fig.axes
  assert ax.get_title() == "T" and ax.get_zlabel() == "log10 loss"
  (surf,) = ax.collections
  np.testing.assert_allclose(surf.get_array(), _face_means(np.log10(Z)))


def test_surface_figure_nonfinite_and_bad_input() -> None:
  z = Z.copy()
  z[1, 2], z[0, 0] = np.nan, np.inf
  (surf,) = surface_figure(_land(z)).axes[0].collections
  assert (surf.norm.vmin, surf.norm.vmax) == pytest.approx((0.1, 2.1))  # finite range
  (ax,) = surface_figure(_land(np.full_like(Z, np.nan))).axes
  assert len(ax.collections) == 0
  assert [t.get_text() for t in ax.texts] == ["no finite loss values"]
  with pytest.raises(ValueError, match="2-D"):
    surface_figure(_land(Z[0], y=None))
  with pytest.raises(ValueError, match=r"not \(ny, nx\)"):
    surface_figure(_land(Z.T))
