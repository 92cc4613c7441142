"""Tests of jaxscope.plot: figures from a History, saved PNG files, no pyplot state."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from jaxscope.plot import (
  cockpit,
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


def test_scalar_figure() -> None:
  fig = scalar_figure(_history(), "loss")
  ax = fig.axes[0]
  assert ax.get_title() == "loss"
  (line,) = ax.get_lines()
  np.testing.assert_allclose(line.get_ydata(), [2.0 / (s + 1) for s in STEPS])
  with pytest.raises(ValueError, match="histogram_figure"):
    scalar_figure(_history(), "grads/histogram_counts/Dense_0/kernel")


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


def test_save_run_plots_from_run_dir(tmp_path: Path) -> None:
  with Recorder(tmp_path / "run") as rec:
    for step in range(3):
      rec.write(step, {"loss": float(step), "updates/ratio/Conv_1/kernel": 1e-3})
  paths = save_run_plots(tmp_path / "run", tmp_path / "plots")
  assert sorted(p.name for p in paths) == ["loss.png", "updates_ratio.png"]
  assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def _instrument_history(*, preset: str = "full", steps: int = 20) -> History:
  """Made-up instrument values (:func:`jaxscope.metrics.instruments`) with a NaN."""
  rng = np.random.default_rng(0)
  leaves = ("Dense_0/kernel", "Dense_0/bias")
  records = []
  for s in range(steps):
    v: dict[str, object] = {
      "loss": 2.0 / (s + 1),
      "alpha": float(rng.normal(0.2, 0.5)),
      "norm_test": 0.5 + 0.05 * s,
      "inner_test": 0.2 + 0.01 * s,
      "ortho_test": 0.4 + 0.04 * s,
      "per_example_grads/hist_counts": rng.integers(0, 50, 10).astype(float),
      "per_example_grads/hist_edges": np.linspace(-1.0 - s, 1.0 + s, 11),
    }
    for i, leaf in enumerate(leaves):
      v[f"grads/norm/{leaf}"] = 1.0 / (s + 1) + i
      v[f"params/distance/{leaf}"] = 0.1 * s * (i + 1)
      v[f"updates/norm/{leaf}"] = 0.01 * (i + 1)
    if preset == "full":
      v["hess_max_ev"] = 5.0 + s
      v["hess_trace"] = 50.0 + s
      v[f"hessian/trace/{leaves[0]}"] = 40.0 + s
      v["tic_diag"] = 10.0 - s if s != 7 else 1e6  # a spike: the axis keeps the rest
      v["per_example_grads/hist2d_counts"] = rng.integers(0, 9, (4, 5)).astype(float)
      v["per_example_grads/hist2d_param_edges"] = np.linspace(-0.5, 0.5, 5)
      v["per_example_grads/hist2d_grad_edges"] = np.linspace(-0.1 - s, 0.1 + s, 6)
    if s % 5 == 4:
      v["test/loss"] = 2.5 / (s + 1)
    records.append((s, v))
  records[3][1]["alpha"] = float("nan")
  records[5][1]["norm_test"] = float("inf")
  return History(records, config={"lr": 0.1})


def _titles(fig: Figure) -> list[str]:
  return [ax.get_title() for ax in fig.axes]


def test_cockpit_full() -> None:
  fig = cockpit(_instrument_history())
  assert isinstance(fig, Figure)
  titles = _titles(fig)
  assert len(fig.axes) == 11
  assert titles[:4] == ["loss", "α (step length)", "α distribution", "gradient tests"]
  assert "steps 0–19" in fig.get_suptitle()
  loss_ax, alpha_ax = fig.axes[0], fig.axes[1]
  assert [ln.get_label() for ln in loss_ax.get_lines()] == ["loss", "test/loss"]
  # The NaN α is a gap, marked at its step.
  (alpha_line,) = [ln for ln in alpha_ax.get_lines() if ln.get_label() == "α"]
  assert np.isnan(alpha_line.get_ydata()[3])
  marks = [c for c in alpha_ax.collections if "non-finite" in str(c.get_label())]
  np.testing.assert_array_equal(marks[0].get_offsets()[:, 0], [3])
  tests_ax = fig.axes[3]
  assert tests_ax.get_yscale() == "log"
  assert 1.0 in [ln.get_ydata()[0] for ln in tests_ax.get_lines()]  # the θ = 1 line
  # Sums over the leaves, the gradient norm in quadrature.
  dist = next(ln for ln in fig.axes[4].get_lines() if ln.get_label() == "distance")
  np.testing.assert_allclose(dist.get_ydata(), [0.3 * s for s in range(20)])
  (gnorm,) = fig.axes[5].get_lines()
  np.testing.assert_allclose(
    gnorm.get_ydata(), [np.hypot(1.0 / (s + 1), 1.0 / (s + 1) + 1) for s in range(20)]
  )
  ev_ax = fig.axes[6]
  assert ev_ax.get_title() == "largest Hessian eigenvalue"
  assert any("2/η = 20" in str(ln.get_label()) for ln in ev_ax.get_lines())  # lr from config
  tic_ax = fig.axes[8]
  assert tic_ax.get_title() == "TIC" and tic_ax.get_ylim()[1] < 1e5  # the spike is off-scale
  hist_ax, hist2d_ax = fig.axes[9], fig.axes[10]
  assert hist_ax.get_title() == "per-example gradients, step 19"
  assert len(hist_ax.patches) == 10
  (im,) = hist2d_ax.get_images()
  assert im.get_array().shape == (5, 4)  # [grad bins, param bins]
  np.testing.assert_allclose(im.get_extent(), [-0.5, 0.5, -19.1, 19.1])
  # An earlier step for the histograms.
  assert cockpit(_instrument_history(), step=6).axes[9].get_title().endswith("step 6")


def test_cockpit_economy_and_extras(tmp_path: Path) -> None:
  fig = cockpit(_instrument_history(preset="economy"))
  assert len(fig.axes) == 7
  assert _titles(fig)[-1] == "per-example gradients, step 19"
  # Cockpit's optional quantities get a panel each; a run directory works too.
  with Recorder(tmp_path / "run") as rec:
    for s in range(5):
      rec.write(s, {"loss": 1.0, "mean_gsnr": 0.1, "cabs": 64.0, "early_stopping": -0.5})
  fig = cockpit(tmp_path / "run")
  assert _titles(fig) == ["loss", "mean GSNR", "CABS batch size", "early stopping"]
  assert "run: steps 0–4" in fig.get_suptitle()
  fig.savefig(tmp_path / "cockpit.png")
  assert (tmp_path / "cockpit.png").read_bytes()[:8] == PNG_MAGIC
  with pytest.raises(KeyError, match="no instrument values"):
    cockpit(History([(0, {"accuracy": 1.0})]))
