"""Tests of ``jaxscope analyze`` and the figures of the checkpoint analyses."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import contextlib
import io
import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from jaxscope import cli, data, plot
from jaxscope.analysis import Landscape, PathResult, RobustnessResult
from jaxscope.run import load_run
from jaxscope.train import make_evaluate, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARGS = ["--grid", "-1:1:3,0:1:2", "--alphas", "0:1:3", "--eval-examples", "100"]
ARGS += ["--params", "top:3"]


def _main(argv):
  """Runs the command line, returning (exit status, stdout)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = cli.main(argv)
  return rc, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("run") / "r"
  train(
    model="mlp",
    dataset="digits",
    steps=8,
    batch_size=64,
    checkpoint_every=2,
    metrics="none",
    out=str(run_dir),
    quiet=True,
  )
  rc, text = _main(["analyze", str(run_dir), "all", *ARGS])
  return run_dir, rc, text


def test_all_writes_every_analysis(run):
  run_dir, rc, text = run
  assert rc == 0
  out = run_dir / "analysis"
  for name in ("path", "layers", "params", "landscape", "trajectory", "robustness"):
    assert (out / f"{name}.npz").is_file() and (out / f"{name}.json").is_file(), name
    json.loads((out / f"{name}.json").read_text())  # strict JSON
  pngs = [
    "path.png",
    "layers_linear.png",
    "layers_quadratic.png",
    "params_linear.png",
    "params_quadratic.png",
    "landscape.png",
    "landscape_surface.png",
    "trajectory.png",
    "robustness.png",
  ]
  for name in pngs:
    assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
  # The summary says which path is closer and classifies the layers.
  assert "closer to the real training curve" in text
  assert "robustness: base error" in text and "off-plane fraction" in text


def test_path_endpoints_reproduce_the_checkpoints(run):
  run_dir, _, _ = run
  meta = json.loads((run_dir / "analysis" / "path.json").read_text())
  with np.load(run_dir / "analysis" / "path.npz") as z:
    idx = z["eval_indices"]
    np.testing.assert_allclose(z["alpha"], [0.0, 0.5, 1.0])
  assert len(idx) == 100 and meta["eval"]["n"] == 100
  ds = data.load("digits")
  with load_run(run_dir) as run:
    ck = run.checkpoints
    model = run.model
    steps = ck.steps
    evaluate = make_evaluate(model, ds.test_x[idx], ds.test_y[idx])
    losses = {
      s: float(evaluate(c.params, c.model_state)["test/loss"])
      for s, c in ((s, ck.restore(s)) for s in steps)
    }
  assert steps == [0, 2, 4, 6, 8] and meta["theta_mid"] == 4
  lin, quad = meta["paths"]["linear"]["loss"], meta["paths"]["quadratic"]["loss"]
  np.testing.assert_allclose([lin[0], lin[2]], [losses[0], losses[8]], rtol=1e-5)
  # The quadratic path passes through all three nodes (mid at α = 0.5).
  np.testing.assert_allclose(quad, [losses[0], losses[4], losses[8]], rtol=1e-5)
  # The real curve: every checkpoint's true loss, at α = 0 and 1 for the endpoints.
  real = meta["checkpoints_on_path"]
  np.testing.assert_allclose(real["loss"], [losses[s] for s in steps], rtol=1e-5)
  assert real["alpha"][0] == 0.0 and abs(real["alpha"][-1] - 1.0) < 1e-6
  assert set(meta["paths"]["linear"]) >= {"alpha", "loss", "accuracy", "mae_vs_checkpoints"}


def test_non_square_grid_keeps_its_orientation(run):
  run_dir, _, _ = run
  with np.load(run_dir / "analysis" / "landscape.npz") as z:
    assert z["loss"].shape == (2, 3)  # (ny, nx)
    np.testing.assert_allclose(z["x"], [-1, 0, 1])
    np.testing.assert_allclose(z["y"], [0, 1])  # a y range starting at 0 is accepted
    centre = float(z["loss"][0, 1])  # y = 0, x = 0
  meta = json.loads((run_dir / "analysis" / "landscape.json").read_text())
  assert meta["layout"] == "loss[iy, ix]" and meta["settings"]["directions"] == "random"
  path = json.loads((run_dir / "analysis" / "path.json").read_text())
  np.testing.assert_allclose(centre, meta["center_loss"], rtol=1e-6)
  np.testing.assert_allclose(centre, path["checkpoints_on_path"]["loss"][-1], rtol=1e-5)


def test_trajectory_reports_true_and_plane_losses(run):
  run_dir, _, _ = run
  with np.load(run_dir / "analysis" / "trajectory.npz") as z:
    assert z["loss"].shape == (2, 3)  # the counts of --grid
    coords, resid = z["coords"], z["residual_fraction"]
    true, plane = z["true_loss"], z["plane_loss"]
    x, y = z["x"], z["y"]
  assert coords.shape == (5, 2) and resid.shape == true.shape == plane.shape == (5,)
  # The origin is the final checkpoint: no residual, and the plane loss is its loss.
  assert resid[-1] == 0.0 and np.allclose(coords[-1], 0.0)
  np.testing.assert_allclose(plane[-1], true[-1], rtol=1e-5)
  assert np.all((resid >= 0) & (resid <= 1))
  # The grid covers the projected path.
  assert x.min() < coords[:, 0].min() and x.max() > coords[:, 0].max()
  assert y.min() < coords[:, 1].min() and y.max() > coords[:, 1].max()
  meta = json.loads((run_dir / "analysis" / "trajectory.json").read_text())
  assert len(meta["settings"]["explained_variance_ratio"]) == 2


def test_layers_params_and_robustness_files(run):
  run_dir, _, _ = run
  out = run_dir / "analysis"
  with np.load(out / "layers.npz") as z:
    assert list(z["layers"]) == ["fc1", "fc2", "out"]
    assert z["linear_loss"].shape == z["quadratic_loss"].shape == (3, 3)
  layers = json.loads((out / "layers.json").read_text())["layers"]
  assert {v["class"] for v in layers.values()} <= {"critical", "ambient", "intermediate"}
  params = json.loads((out / "params.json").read_text())
  assert len(params["parameters"]) == 3 and params["selection"]["how"] == "top"
  rob = json.loads((out / "robustness.json").read_text())
  assert rob["steps"] == [0, 2, 4, 6, 8] and set(rob["labels"]) == {"fc1", "fc2", "out"}
  with np.load(out / "robustness.npz") as z:
    assert z["error"].shape == (5, 3) and z["rerandomized_error"].shape == (3, 3)


def test_pca_landscape_1d(run, tmp_path):
  run_dir, _, _ = run
  argv = ["analyze", str(run_dir), "landscape", "--directions", "pca", "--1d"]
  rc, text = _main([*argv, "--grid", "-0.5:0.5:3", "--eval-examples", "50", "--out", str(tmp_path)])
  assert rc == 0 and "pca directions" in text
  with np.load(tmp_path / "landscape.npz") as z:
    assert z["loss"].shape == (3,) and "y" not in z.files
    assert z["trajectory_coords"].shape == (5, 1)
  assert (tmp_path / "landscape.png").read_bytes()[:8] == PNG_MAGIC


def test_run_without_checkpoints_exits_2(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit) as e:
    cli.main(["analyze", str(tmp_path / "empty"), "path"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "jaxscope analyze: error:" in err and "has no checkpoints" in err


@pytest.mark.parametrize("bad", [["--grid", "1:1:3"], ["--alphas", "0:1"], ["--params", "x:3"]])
def test_bad_options_exit_2(tmp_path, capsys, bad):
  with pytest.raises(SystemExit) as e:
    cli.main(["analyze", str(tmp_path), "path", *bad])
  assert e.value.code == 2
  assert "error: argument" in capsys.readouterr().err


def test_range_options_accept_negative_values_and_zero():
  assert cli._join_range_values(["analyze", "r", "--grid", "-1:1:3", "--alphas", "-.5:1:3"]) == [
    "analyze",
    "r",
    "--grid=-1:1:3",
    "--alphas=-.5:1:3",
  ]
  assert cli._grid("0:1:5") == ((0.0, 1.0, 5), (0.0, 1.0, 5))
  assert cli._grid("-1:1:3,0:1:2") == ((-1.0, 1.0, 3), (0.0, 1.0, 2))
  assert cli._axis("0:0:1") == (0.0, 0.0, 1)


# ----------------------------------------------------------------------------- figures


def _paths():
  a = np.linspace(-0.5, 1.5, 9)
  loss = np.exp(-2 * a) + 0.1
  bad = loss.copy()
  bad[2], bad[4] = np.nan, np.inf
  acc = np.clip(a, 0, 1)
  lin = PathResult(a, loss, acc, "linear", "model", "model", 2.0)
  quad = PathResult(a, bad, acc, "quadratic", "model", "model", 2.0)
  return a, lin, quad, bad


def test_path_figure():
  _, lin, quad, _ = _paths()
  fig = plot.path_figure([lin, quad], real=([0.0, 0.4, 1.0], [1.1, np.nan, 0.2], [0, 4, 8]))
  assert isinstance(fig, Figure) and len(fig.axes) == 2  # loss and accuracy (twin)
  labels = [h.get_label() for h in fig.axes[0].get_lines()]
  assert any("MAE" in lab for lab in labels)
  assert isinstance(plot.path_figure([lin], logy=False, accuracy=False), Figure)
  with pytest.raises(ValueError, match="labels"):
    plot.path_figure([lin], real=([0, 1], [1, 2], ["a"]))


def test_layer_and_parameter_figures():
  a, lin, quad, bad = _paths()
  layers = {
    n: PathResult(a, lin.loss * (i + 1), lin.accuracy, "linear", "layer", n, float(i))
    for i, n in enumerate(["conv1", "conv2", "fc"])
  }
  layers["fc"] = layers["fc"]._replace(loss=bad)
  fig = plot.layer_paths_figure(layers, lin)
  assert isinstance(fig, Figure)
  lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
  alphas = sorted(ln.get_alpha() for k, ln in lines.items() if not k.startswith(("model", "_")))
  assert alphas == [0.1, 0.5, 1.0]  # min–max normalised distance, floored at 0.1
  assert isinstance(plot.layer_paths_figure(list(layers.values()), [lin, quad]), Figure)
  params = [
    PathResult(a, lin.loss + 0.01 * i, lin.accuracy, "linear", "parameter", n, 0.1 * i)
    for i, n in enumerate(["conv1/kernel[0,0,0,1]", "conv1/kernel[1,0,0,1]", "fc/bias[3]"])
  ]
  params.append(PathResult(a, bad, lin.accuracy, "linear", "parameter", "fc/kernel[0,1]", 1.0))
  fig = plot.parameter_paths_figure(params)
  assert isinstance(fig, Figure)
  assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["conv1", "fc"]
  assert isinstance(plot.parameter_paths_figure([]), Figure)


def test_landscape_and_surface_figures():
  x, y = np.linspace(-1, 1, 5), np.linspace(0, 1, 3)
  z = x[None, :] ** 2 + y[:, None] ** 2 + 0.1
  z[1, 2], z[0, 0] = np.nan, np.inf
  land = Landscape(x, y, z, np.full_like(z, 0.5), 0.1, {"explained_variance_ratio": [0.8, 0.1]})
  traj = (np.array([[0.5, 0.5], [0.2, 0.1], [0.0, 0.0]]), [0, 2, 4])
  fig = plot.landscape_figure(land, traj)
  assert isinstance(fig, Figure) and fig.axes[0].get_xlabel() == "1st PC: 80.00 %"
  assert isinstance(plot.surface_figure(land), Figure)
  assert isinstance(plot.surface_figure(land, logz=True), Figure)
  steep = land._replace(loss=np.exp(10 * z), settings={})  # log-spaced levels
  assert isinstance(plot.landscape_figure(steep), Figure)
  for degenerate in (np.full_like(z, np.nan), np.ones_like(z)):
    assert isinstance(plot.landscape_figure(land._replace(loss=degenerate)), Figure)
    assert isinstance(plot.surface_figure(land._replace(loss=degenerate)), Figure)
  row = Landscape(x, np.array([0.0]), z[:1], z[:1], 0.1, {})
  assert isinstance(plot.landscape_figure(row), Figure)
  line = Landscape(x, None, np.array([1.0, np.nan, 0.1, np.inf, 1.0]), np.full(5, 0.3), 0.1, {})
  fig = plot.landscape_figure(line, {"coords": [0.1, 0.2], "labels": ["a", "b"]})
  assert isinstance(fig, Figure) and len(fig.axes) == 2  # loss and accuracy
  with pytest.raises(ValueError, match="2-D"):
    plot.surface_figure(line)


def test_robustness_figure():
  err = np.array([[0.9, 0.1, 0.05], [0.5, 0.06, np.nan], [0.05, 0.05, 0.05]])
  res = RobustnessResult(
    ("conv1", "conv2", "fc"),
    (0, 2, 4),
    err,
    err,
    0.05,
    np.array([[0.9, 0.8, np.nan]]),
    {"conv1": "critical", "conv2": "intermediate", "fc": "ambient"},
    {"ambient_tol": 0.01, "critical_tol": 0.1, "chance_error": 0.9},
  )
  fig = plot.robustness_figure(res)
  assert isinstance(fig, Figure)
  ticks = [t.get_text() for t in fig.axes[1].get_xticklabels()]
  assert ticks == ["conv1\n(critical)", "conv2\n(intermediate)", "fc\n(ambient)"]
  assert isinstance(
    plot.robustness_figure(res._replace(rerandomized_error=np.zeros((0, 3)))), Figure
  )
