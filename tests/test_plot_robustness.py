"""Tests of jaxscope.plot.robustness: the heat-map's cells, labels and colours."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from jaxscope.analysis import RobustnessResult
from jaxscope.plot import robustness_figure

LAYERS = ("conv1", "conv2", "fc")
ERR = np.array([[0.95, 0.1, 0.05], [0.5, 0.06, np.nan], [0.05, 0.05, 0.05]])
RERAND = np.array([[0.9, 0.8, np.nan]])
LABELS = {"conv1": "critical", "conv2": "intermediate", "fc": "ambient"}
THRESHOLDS = {"ambient_tol": 0.01, "critical_tol": 0.1, "chance_error": 0.9}


def _result(**kw) -> RobustnessResult:
  base = RobustnessResult(LAYERS, (0, 2, 4), ERR, ERR, 0.05, RERAND, LABELS, THRESHOLDS)
  return base._replace(**kw)


@pytest.fixture(autouse=True)
def _no_pyplot_figures() -> None:
  assert plt.get_fignums() == []
  yield
  assert plt.get_fignums() == []


def test_robustness_figure_cells_equal_inputs() -> None:
  fig = robustness_figure(_result())
  heat, rerand, cbar = fig.axes
  (im,) = heat.get_images()
  data = im.get_array()
  np.testing.assert_array_equal(data.mask, ~np.isfinite(ERR))  # NaN drawn grey (masked)
  np.testing.assert_array_equal(data.filled(-1), np.where(np.isfinite(ERR), ERR, -1))
  (im2,) = rerand.get_images()
  np.testing.assert_array_equal(im2.get_array().filled(-1), [[0.9, 0.8, -1]])
  # One colour scale from 0 to the larger of chance error and the worst finite error.
  assert (im.norm.vmin, im.norm.vmax) == (0.0, 0.95)
  assert im2.norm is im.norm
  assert cbar.get_ylabel() == "test error"
  assert [t.get_text() for t in heat.get_yticklabels()] == ["τ = 0", "τ = 2", "τ = 4"]
  assert [t.get_text() for t in rerand.get_yticklabels()] == ["re-rand. 1"]
  assert heat.get_ylabel() == "layer reset to step τ"
  # The layers under the bottom panel, with their class, coloured by it.
  ticks = rerand.get_xticklabels()
  assert [t.get_text() for t in ticks] == [
    "conv1\n(critical)",
    "conv2\n(intermediate)",
    "fc\n(ambient)",
  ]
  colours = [to_rgba(t.get_color()) for t in ticks]
  assert colours == [to_rgba(c) for c in ("tab:red", "tab:orange", "tab:green")]
  assert [t.get_text() for t in heat.get_xticklabels()] == ["", "", ""]
  want = "layer robustness (base error 0.050)\nambient: Δerr ≤ 0.01, critical: err ≥ 0.80"
  assert fig.get_suptitle() == want


def test_robustness_figure_annotations() -> None:
  heat, rerand, _ = robustness_figure(_result()).axes
  texts = heat.texts
  assert [t.get_text() for t in texts] == [
    "0.95", "0.10", "0.05", "0.50", "0.06", "nan", "0.05", "0.05", "0.05",
  ]  # fmt: skip
  # Row-major at the cell centres; light text on dark (high-error) cells.
  assert [t.get_position() for t in texts[:4]] == [(0, 0), (1, 0), (2, 0), (0, 1)]
  assert [t.get_color() for t in texts[:3]] == ["w", "k", "k"]
  assert [t.get_text() for t in rerand.texts] == ["0.90", "0.80", "nan"]
  heat, rerand, _ = robustness_figure(_result(), annotate=False).axes
  assert len(heat.texts) == 0 and len(rerand.texts) == 0
  # Automatic: no numbers beyond 200 cells.
  many = _result(steps=tuple(range(70)), error=np.full((70, 3), 0.5), rerandomized_error=RERAND)
  assert len(robustness_figure(many).axes[0].texts) == 0


def test_robustness_figure_without_rerandomisation() -> None:
  fig = robustness_figure(
    _result(rerandomized_error=np.zeros((0, 3)), thresholds={}, labels={}), title="T"
  )
  heat, cbar = fig.axes
  assert fig.get_suptitle() == "T" and cbar.get_ylabel() == "test error"
  ticks = heat.get_xticklabels()
  assert [t.get_text() for t in ticks] == ["conv1\n(?)", "conv2\n(?)", "fc\n(?)"]
  assert all(to_rgba(t.get_color()) == to_rgba("black") for t in ticks)
  (im,) = heat.get_images()
  assert im.norm.vmax == 1.0  # chance error defaults to 1
  fig = robustness_figure(_result(rerandomized_error=np.zeros((0, 3)), thresholds={}))
  assert fig.get_suptitle() == "layer robustness (base error 0.050)"  # no thresholds, no rule
