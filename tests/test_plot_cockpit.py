"""Tests of jaxscope.plot.cockpit: the one-page view of the instruments."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from jaxscope.plot import cockpit
from jaxscope.record import History, Recorder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_pyplot_figures() -> None:
  assert plt.get_fignums() == []
  yield
  assert plt.get_fignums() == []


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
      v[f"cockpit/grad_norm/{leaf}"] = 1.0 / (s + 1) + i
      v[f"cockpit/distance/{leaf}"] = 0.1 * s * (i + 1)
      v[f"cockpit/update_size/{leaf}"] = 0.01 * (i + 1)
    if preset == "full":
      v["hess_max_ev"] = 5.0 + s
      v["hess_trace"] = 50.0 + s
      v[f"hessian/trace/{leaves[0]}"] = 40.0 + s
      v["tic_diag"] = 10.0 - s if s != 7 else 1e6  # a spike: the axis keeps the rest
      v["per_example_grads/hist2d_counts_grad_param"] = rng.integers(0, 9, (5, 4)).astype(float)
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
  # The NaN α (not measured) is a gap, not marked.
  (alpha_line,) = [ln for ln in alpha_ax.get_lines() if ln.get_label() == "α"]
  assert np.isnan(alpha_line.get_ydata()[3])
  assert not [c for c in alpha_ax.collections if "non-finite" in str(c.get_label())]
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
  assert im.get_array().shape == (4, 5)  # rows: param bins (y), columns: grad bins (x)
  np.testing.assert_allclose(im.get_extent(), [-19.1, 19.1, -0.5, 0.5])
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


# ------------------------------------------------------------ panel contents, by hand

STEPS = np.arange(10)
LOSS = 1.0 / (STEPS + 1)  # 1 … 0.1: exactly one decade
ALPHA = np.array([-0.5, -0.2, np.nan, 0.1, 0.3, 0.6, -0.1, 0.2, 0.4, 0.5])
NORM_TEST = 0.5 + 0.1 * STEPS
TIC = np.array([1.0, 1.5, 0.0, 2.0, 1.0, 500.0, 1.2, 0.8, 1.4, 1.1])  # a zero: linear axis
HIST_STEPS = (0, 4, 8)


def _counts(s: int) -> np.ndarray:
  return np.array([0.0, 1.0, 4.0, 9.0]) + s


def _edges(s: int) -> np.ndarray:
  return np.linspace(-1.0, 1.0, 5) * (s + 1)


def _counts2d(s: int) -> np.ndarray:
  return np.arange(6.0).reshape(2, 3) * s


def _hand_history(config=None) -> History:
  records = []
  for s in STEPS:
    v: dict[str, object] = {
      "loss": LOSS[s],
      "alpha": ALPHA[s],
      "norm_test": NORM_TEST[s],
      "inner_test": 0.1,
      "params/distance/a": 0.5 * s,
      "params/distance/b": 0.25 * s,
      "updates/norm/a": 0.1,
      "grads/norm/a": 3.0,
      "hess_max_ev": 10.0 + s,
      "hess_trace": 100.0 + 10 * s,
      "tic_diag": TIC[s],
      "mean_gsnr": 0.01 * s,
    }
    if s != 3:  # a leaf missing at one step: the total leaves that step out
      v["grads/norm/b"] = 4.0
    if s in (4, 9):
      v["test/loss"] = 2.0 * LOSS[s]
    if s in HIST_STEPS:
      v["per_example_grads/hist_counts"] = _counts(s)
      v["per_example_grads/hist_edges"] = _edges(s)
      v["per_example_grads/hist2d_counts"] = _counts2d(s)
      v["per_example_grads/hist2d_param_edges"] = [-0.2, 0.0, 0.2]
      v["per_example_grads/hist2d_grad_edges"] = [-1.0, 0.0, 1.0, 2.0]
    records.append((int(s), v))
  return History(records, config=config if config is not None else {"learning_rate": 0.05})


def _labelled(ax) -> dict:
  return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def test_cockpit_panel_order_and_layout() -> None:
  fig = cockpit(_hand_history())
  assert _titles(fig) == [
    "loss",
    "α (step length)",
    "α distribution",
    "gradient tests",
    "distance / update size",
    "gradient norm",
    "largest Hessian eigenvalue",
    "Hessian trace",
    "TIC",
    "mean GSNR",
    "per-example gradients, step 8",
    "gradient vs parameter, step 8\ncolour: log(1 + count)",
  ]
  # Four columns, three rows.
  geometry = {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes}
  assert geometry == {(3, 4)}
  assert fig.get_suptitle() == "Cockpit — steps 0–9"


def test_cockpit_loss_and_alpha_panels() -> None:
  loss_ax, trace_ax, gauge_ax = cockpit(_hand_history()).axes[:3]
  lines = _labelled(loss_ax)
  np.testing.assert_array_equal(lines["loss"].get_xdata(), STEPS)
  np.testing.assert_allclose(lines["loss"].get_ydata(), LOSS)
  np.testing.assert_array_equal(lines["test/loss"].get_xdata(), [4, 9])
  np.testing.assert_allclose(lines["test/loss"].get_ydata(), [0.4, 0.2])
  assert loss_ax.get_yscale() == "linear"  # one decade: not more than 20×
  assert loss_ax.get_xlabel() == "step"
  # α over steps: the NaN (not measured) a gap without a mark, with the α = 0 line.
  np.testing.assert_array_equal(_labelled(trace_ax)["α"].get_ydata(), ALPHA)
  assert not [c for c in trace_ax.collections if "non-finite" in str(c.get_label())]
  zero = [ln for ln in trace_ax.get_lines() if ln.get_label().startswith("_")]
  assert [list(ln.get_ydata()) for ln in zero] == [[0.0, 0.0]]
  # α distribution: the nine finite values, their mean and the share on each side.
  finite = ALPHA[np.isfinite(ALPHA)]
  assert sum(p.get_height() for p in gauge_ax.patches) == 9
  assert len(gauge_ax.patches) == 5  # min(40, max(5, 9 // 5)) bins
  (mean,) = _labelled(gauge_ax).values()
  assert mean.get_label() == f"mean {np.mean(finite):.2f}" == "mean 0.14"
  assert mean.get_xdata()[0] == pytest.approx(np.mean(finite))
  assert [t.get_text() for t in gauge_ax.texts] == ["understep\n33%", "overshoot\n67%"]
  assert (gauge_ax.get_xlabel(), gauge_ax.get_ylabel()) == ("α", "steps")


def test_cockpit_alpha_gauge_without_finite_values() -> None:
  h = History([(s, {"alpha": np.nan}) for s in range(3)])
  gauge = cockpit(h).axes[1]
  assert [t.get_text() for t in gauge.texts] == ["no finite α"]
  assert len(gauge.patches) == 0


def test_cockpit_tests_and_movement_panels() -> None:
  fig = cockpit(_hand_history())
  tests_ax, move_ax, gnorm_ax = fig.axes[3:6]
  assert tests_ax.get_yscale() == "log"
  lines = _labelled(tests_ax)
  assert list(lines) == ["θ = 1", "norm_test", "inner_test"]
  np.testing.assert_array_equal(lines["θ = 1"].get_ydata(), [1.0, 1.0])
  np.testing.assert_allclose(lines["norm_test"].get_ydata(), NORM_TEST)
  np.testing.assert_allclose(lines["inner_test"].get_ydata(), np.full(10, 0.1))
  lines = _labelled(move_ax)
  np.testing.assert_allclose(lines["distance"].get_ydata(), 0.75 * STEPS)  # 0.5 s + 0.25 s
  np.testing.assert_allclose(lines["update size"].get_ydata(), np.full(10, 0.1))
  # ‖g‖ = sqrt(3² + 4²) = 5 at the steps where both leaves were recorded (not step 3).
  (g,) = gnorm_ax.get_lines()
  assert g.get_label() == "‖g‖"
  np.testing.assert_array_equal(g.get_xdata(), [0, 1, 2, 4, 5, 6, 7, 8, 9])
  np.testing.assert_allclose(g.get_ydata(), np.full(9, 5.0))


def test_cockpit_curvature_panels() -> None:
  fig = cockpit(_hand_history())
  ev_ax, trace_ax, tic_ax = fig.axes[6:9]
  lines = _labelled(ev_ax)
  np.testing.assert_allclose(lines["λ_max"].get_ydata(), 10.0 + STEPS)
  assert ev_ax.get_yscale() == "log"  # positive and not constant
  (limit,) = [ln for name, ln in lines.items() if name.startswith("2/η")]
  assert limit.get_label() == "2/η = 40"  # learning_rate 0.05 from the configuration
  np.testing.assert_array_equal(limit.get_ydata(), [40.0, 40.0])
  (tr,) = trace_ax.get_lines()
  assert tr.get_label() == "tr H" and trace_ax.get_yscale() == "log"
  np.testing.assert_allclose(tr.get_ydata(), 100.0 + 10 * STEPS)
  # TIC: the spike of 500 lies beyond 10 interquartile ranges (q1 = 1, q3 = 1.475): the
  # axis shows 0 … 2 with a 5 % margin, and counts the value off the scale.
  (tic,) = tic_ax.get_lines()
  np.testing.assert_allclose(tic.get_ydata(), TIC)
  assert tic_ax.get_yscale() == "linear"
  assert tic_ax.get_ylim() == pytest.approx((-0.1, 2.1))
  assert [t.get_text() for t in tic_ax.texts] == ["1 off-scale"]
  # No learning rate (or a flag instead of a number): no stability line.
  for config in ({}, {"lr": True}, {"lr": -1.0}):
    ev_ax = cockpit(_hand_history(config)).axes[6]
    assert list(_labelled(ev_ax)) == ["λ_max"]


def test_cockpit_histogram_panels() -> None:
  fig = cockpit(_hand_history())
  hist_ax, hist2d_ax = fig.axes[10:12]
  heights = [p.get_height() for p in hist_ax.patches]
  np.testing.assert_allclose(heights, _counts(8))
  np.testing.assert_allclose([p.get_x() for p in hist_ax.patches], _edges(8)[:-1])
  np.testing.assert_allclose([p.get_width() for p in hist_ax.patches], np.diff(_edges(8)))
  assert hist_ax.get_yscale() == "log"
  assert (hist_ax.get_xlabel(), hist_ax.get_ylabel()) == ("gradient entry", "count")
  # An old run's hist2d_counts [param bins, grad bins]: gradient on x, parameter on y.
  (im,) = hist2d_ax.get_images()
  np.testing.assert_allclose(im.get_array(), np.log1p(_counts2d(8)))
  np.testing.assert_allclose(im.get_extent(), [-1.0, 2.0, -0.2, 0.2])
  assert (hist2d_ax.get_xlabel(), hist2d_ax.get_ylabel()) == ("gradient entry", "parameter value")
  # The recorded step nearest to the one asked for (ties: the earlier).
  for step, want in ((5, 4), (7, 8), (2, 0), (100, 8)):
    hist_ax = cockpit(_hand_history(), step=step).axes[10]
    assert hist_ax.get_title() == f"per-example gradients, step {want}"
    np.testing.assert_allclose([p.get_height() for p in hist_ax.patches], _counts(want))


def test_cockpit_histogram_not_finite() -> None:
  h = History(
    [
      (
        0,
        {
          "per_example_grads/hist_counts": [1.0, 2.0],
          "per_example_grads/hist_edges": [0.0, np.nan, 1.0],
          "per_example_grads/hist2d_counts": [[1.0]],
          "per_example_grads/hist2d_param_edges": [0.0, 0.0],  # an empty extent
          "per_example_grads/hist2d_grad_edges": [0.0, 1.0],
        },
      )
    ]
  )
  hist_ax, hist2d_ax = cockpit(h).axes
  assert [t.get_text() for t in hist_ax.texts] == ["no finite histogram"]
  assert len(hist_ax.patches) == 0
  assert [t.get_text() for t in hist2d_ax.texts] == ["no finite histogram"]
  assert len(hist2d_ax.get_images()) == 0


# ------------------------------------------------------------ error bars (issue 18)

EV = np.array([-7e-3, 50.0, 0.21, 0.35, 0.37, 0.38, 0.39, 0.385, 0.38, 0.37])
EV_RES = np.array([0.4, 40.0, 0.2, 0.01, 0.02, 0.01, 0.005, 0.01, 0.01, 0.01])
EV_NOISE = [0, 1, 2]  # residual ≥ |λ|/2
TRACE = 100.0 + 10.0 * STEPS
TRACE[4] = 3.0  # stderr 2: 2σ = 4 ≥ 3, within noise
TRACE_SE = np.full(10, 5.0)
TRACE_SE[4] = 2.0


def _error_history() -> History:
  """λ_max with residuals, tr H with standard errors (none at step 9), TIC all noise, α NaN
  at step 0 (no update yet)."""
  records = []
  for s in STEPS:
    v: dict[str, object] = {
      "alpha": np.nan if s == 0 else 0.1 * s,
      "hess_max_ev": EV[s],
      "hess_max_ev_residual": EV_RES[s],
      "hess_trace": TRACE[s],
      "tic_diag": 1.0 + 0.1 * s,
      "tic_diag_stderr": 1.0,  # 2σ = 2 ≥ every value
    }
    if s != 9:
      v["hess_trace_stderr"] = TRACE_SE[s]
    records.append((int(s), v))
  return History(records)


def _gid(ax, prefix: str) -> list:
  return [a for a in (*ax.collections, *ax.get_children()) if str(a.get_gid()).startswith(prefix)]


def _y_extent(band) -> tuple[float, float]:
  ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
  return float(ys.min()), float(ys.max())


def test_cockpit_error_bands_and_noise() -> None:
  fig = cockpit(_error_history())
  titles = _titles(fig)
  ev_ax = fig.axes[titles.index("largest Hessian eigenvalue")]
  trace_ax = fig.axes[titles.index("Hessian trace")]
  # λ_max: the line and the band ± residual over the converged readings 3…9 only.
  line = _labelled(ev_ax)["λ_max"]
  np.testing.assert_array_equal(line.get_xdata(), STEPS[3:])
  np.testing.assert_allclose(line.get_ydata(), EV[3:])
  (band,) = set(_gid(ev_ax, "band:λ_max"))
  lo, hi = _y_extent(band)
  assert lo == pytest.approx(np.min(EV[3:] - EV_RES[3:]))
  assert hi == pytest.approx(np.max(EV[3:] + EV_RES[3:]))
  # The unconverged readings are hollow grey circles, outside the y range (50 and a
  # negative value) but inside the x range; the scale stays log (the trusted ones are > 0).
  (dots,) = set(_gid(ev_ax, "noise:λ_max"))
  np.testing.assert_array_equal(dots.get_xdata(), EV_NOISE)
  assert dots.get_markerfacecolor() == "none"
  assert ev_ax.get_yscale() == "log"
  assert ev_ax.get_ylim()[1] < 1.0 and ev_ax.get_xlim()[0] <= 0.0
  assert "3 of 10 readings within noise (residual ≥ |value|/2): hollow" in [
    t.get_text() for t in ev_ax.texts
  ]
  # tr H: ±2σ where the standard error was recorded (not step 9), step 4 within noise.
  (band,) = set(_gid(trace_ax, "band:tr H"))
  ok = [s for s in STEPS if s not in (4, 9)]
  lo, hi = _y_extent(band)
  assert lo == pytest.approx(np.min(TRACE[ok] - 2 * TRACE_SE[ok]))
  assert hi == pytest.approx(np.max(TRACE[ok] + 2 * TRACE_SE[ok]))
  np.testing.assert_array_equal(_labelled(trace_ax)["tr H"].get_xdata(), np.delete(STEPS, 4))
  assert trace_ax.get_ylim()[0] > 3.0  # the noise reading does not stretch the axis
  assert [t.get_text() for t in trace_ax.texts] == [
    "1 of 10 readings within noise (2σ ≥ |value|): hollow"
  ]


def test_cockpit_all_noise_and_nan_alpha() -> None:
  fig = cockpit(_error_history())
  titles = _titles(fig)
  # Every TIC reading within noise: no band, no trusted line, the circles set the range.
  tic_ax = fig.axes[titles.index("TIC")]
  assert not _gid(tic_ax, "band:")
  assert len(_labelled(tic_ax)["tic_diag"].get_xdata()) == 0
  (dots,) = set(_gid(tic_ax, "noise:tic_diag"))
  np.testing.assert_allclose(dots.get_ydata(), 1.0 + 0.1 * STEPS)
  y0, y1 = tic_ax.get_ylim()
  assert y0 <= 1.0 and y1 >= 1.9
  assert [t.get_text() for t in tic_ax.texts] == [
    "10 of 10 readings within noise (2σ ≥ |value|): hollow"
  ]
  # α is NaN at step 0: a gap, not a mark, not 0; the gauge counts the 9 measured steps.
  alpha_ax = fig.axes[titles.index("α (step length)")]
  y = _labelled(alpha_ax)["α"].get_ydata()
  assert np.isnan(y[0]) and not np.any(y == 0.0)
  assert not [c for c in alpha_ax.collections if "non-finite" in str(c.get_label())]
  gauge = fig.axes[titles.index("α distribution")]
  assert sum(p.get_height() for p in gauge.patches) == 9


def test_cockpit_hist2d_new_and_old_keys() -> None:
  counts_gp = np.arange(6.0).reshape(3, 2)  # [grad bins 3, param bins 2]
  grad_edges, param_edges = [-1.0, 0.0, 1.0, 2.0], [-0.2, 0.0, 0.2]
  new = {
    "per_example_grads/hist2d_counts_grad_param": counts_gp,
    "per_example_grads/hist2d_grad_edges": grad_edges,
    "per_example_grads/hist2d_param_edges": param_edges,
  }
  old = {**new}
  del old["per_example_grads/hist2d_counts_grad_param"]
  old["per_example_grads/hist2d_counts"] = counts_gp.T  # [param bins, grad bins]
  for values in (new, old):
    (ax,) = cockpit(History([(0, values)])).axes
    (im,) = ax.get_images()
    # Rows are parameter bins (y), columns gradient bins (x): image[p, g] = count[g, p].
    np.testing.assert_allclose(im.get_array(), np.log1p(counts_gp.T))
    np.testing.assert_allclose(im.get_extent(), [-1.0, 2.0, -0.2, 0.2])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("gradient entry", "parameter value")
