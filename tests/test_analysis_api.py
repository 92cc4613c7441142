"""Tests of the run-level analysis API, :func:`jaxscope.analysis.analyze`."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import contextlib
import io
import json
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pytest
from _fresh import run_fresh

from jaxscope import cli, data, models
from jaxscope.analysis import (
  ANALYSES,
  AnalysisOptions,
  AnalysisReport,
  Landscape,
  PathResult,
  RobustnessResult,
  analyze,
)
from jaxscope.checkpoint import RunCheckpoints
from jaxscope.train import train

ROOT = Path(__file__).resolve().parents[1]
CLI_ARGS = ["--grid", "-1:1:3,0:1:2", "--alphas", "0:1:3", "--eval-examples", "100"]
CLI_ARGS += ["--params", "top:3"]
OPTIONS = {"grid": "-1:1:3,0:1:2", "alphas": (0, 1, 3), "eval_examples": 100, "params": ("top", 3)}


@contextlib.contextmanager
def _open_run(run_dir):
  """A run for :func:`analyze` from the run's files (what ``jaxscope.load_run`` gives):
  any object with the attributes of :class:`jaxscope.analysis.RunLike` will do."""
  config = json.loads((run_dir / "config.json").read_text())
  ds = data.load(config["dataset"], config.get("data_dir"), **config.get("data_args", {}))
  shape = config.get("input_shape") or ds.train_x.shape[1:]
  classes = config.get("num_classes") or ds.num_classes
  model = models.build(config["model"], tuple(shape), classes, **config.get("model_args", {}))
  with RunCheckpoints(run_dir) as ckpts:
    yield SimpleNamespace(
      path=run_dir,
      config=config,
      checkpoints=ckpts,
      model=model,
      dataset=ds,
      task=config.get("task") or ds.task,
    )


def _train(run_dir, steps):
  train(
    model="mlp",
    dataset="digits",
    steps=steps,
    batch_size=64,
    checkpoint_every=2,
    metrics="none",
    out=str(run_dir),
    quiet=True,
  )
  return run_dir


def _analyze_both(base):
  """Trains the run, analyses it with the CLI and with the API, and pickles the API's report,
  the CLI's output and the API's echo to ``base/both.pickle``."""
  run_dir = _train(base / "r", steps=8)
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    rc = cli.main(["analyze", str(run_dir), "all", *CLI_ARGS, "--out", str(base / "cli")])
  assert rc == 0
  echoed = []
  with _open_run(run_dir) as run:
    report = analyze(run, "all", out=base / "api", echo=echoed.append, **OPTIONS)
  (base / "both.pickle").write_bytes(pickle.dumps((report, stdout.getvalue(), echoed)))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """One run analysed by ``jaxscope analyze`` and by the API, into two directories.

  Made in a new -O0 interpreter (:func:`_fresh.run_fresh`; the flag, set for the whole
  test process, the flag changes other tests' floats), with every program in the persistent
  compilation cache: the API loads the programs the CLI compiled (the test process's cache
  when it has one, ``make test``, else one in the fixture's folder). The report comes back
  pickled: the result objects of :func:`analyze`, arrays and all."""
  base = tmp_path_factory.mktemp("api")
  run_fresh(__file__, "_analyze_both", base, cache=base / "jax")
  report, stdout, echoed = pickle.loads((base / "both.pickle").read_bytes())
  return base, report, stdout, echoed


def _without_timings(obj):
  """The landscapes' JSON holds the kernel's wall-clock timings, which differ per call."""
  if isinstance(obj, dict):
    return {k: _without_timings(v) for k, v in obj.items() if k != "timings"}
  if isinstance(obj, list):
    return [_without_timings(v) for v in obj]
  return obj


def test_cli_and_api_write_the_same_files(both):
  base = both[0]
  cli_out, api_out = base / "cli", base / "api"
  names = sorted(p.name for p in cli_out.iterdir())
  assert names == sorted(p.name for p in api_out.iterdir())
  assert len(names) == 21
  for name in names:
    a, b = cli_out / name, api_out / name
    if name.endswith(".json"):
      if name in ("landscape.json", "trajectory.json"):
        assert _without_timings(json.loads(a.read_text())) == _without_timings(
          json.loads(b.read_text())
        ), name
      else:
        assert a.read_text() == b.read_text(), name
    elif name.endswith(".npz"):
      with np.load(a) as za, np.load(b) as zb:
        assert za.files == zb.files, name
        for k in za.files:
          assert za[k].dtype == zb[k].dtype, (name, k)
          np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{name}: {k}")
    else:
      assert name.endswith(".png")
      np.testing.assert_array_equal(mpimg.imread(a), mpimg.imread(b), err_msg=name)


def test_summary_is_returned_and_echoed_as_the_cli_prints_it(both):
  base, report, stdout, echoed = both

  def normal(lines):
    lines = [re.sub(r"\(\w+: [\d.]+ s\)", "(T s)", line) for line in lines]
    out = (str(base / "cli"), str(base / "api"))
    return [line.replace(out[0], "OUT").replace(out[1], "OUT") for line in lines]

  assert echoed == report.summary
  assert normal(report.summary) == normal(stdout.splitlines())
  assert report.summary[-1] == f"wrote 21 files to {base / 'api'}"
  for name, res in report.results.items():
    assert res.summary and res.summary[0].startswith(name)
    assert all(line in report.summary for line in res.summary)


def test_returned_objects_equal_what_was_written(both):
  base, report, _, _ = both
  out = base / "api"
  assert isinstance(report, AnalysisReport) and report.out == out
  assert list(report.results) == list(ANALYSES)
  assert not report.failed and not report.skipped
  assert report.files == [f for r in report.results.values() for f in r.files]
  assert sorted(p.name for p in report.files) == sorted(p.name for p in out.iterdir())
  for name, res in report.results.items():
    assert res.name == name and res.seconds > 0
    assert res.files[:2] == [out / f"{name}.npz", out / f"{name}.json"]
    assert all(f.is_file() for f in res.files)
    with np.load(out / f"{name}.npz") as z:
      assert sorted(z.files) == sorted(res.arrays)
      for k in z.files:
        np.testing.assert_array_equal(z[k], res.arrays[k], err_msg=f"{name}: {k}")
    assert json.loads((out / f"{name}.json").read_text()) == res.meta, name
  info = report.info
  assert info["checkpoints"] == [0, 2, 4, 6, 8] and info["eval"]["n"] == 100
  assert report.results["path"].meta["theta_mid"] == info["theta_mid"] == 4
  # The result objects are what the arrays were made of.
  r = report.results
  path = r["path"].value
  assert set(path) == {"linear", "quadratic"} and isinstance(path["linear"], PathResult)
  np.testing.assert_array_equal(path["quadratic"].loss, r["path"].arrays["quadratic_loss"])
  layers = r["layers"].value["linear"]
  assert list(layers) == ["fc1", "fc2", "out"]
  np.testing.assert_array_equal(
    np.stack([p.loss for p in layers.values()]), r["layers"].arrays["linear_loss"]
  )
  params = r["params"].value["quadratic"]
  assert [p.name for p in params] == list(r["params"].arrays["names"])
  for name in ("landscape", "trajectory"):
    land = r[name].value
    assert isinstance(land, Landscape) and land.loss.shape == (2, 3)
    np.testing.assert_array_equal(land.loss, r[name].arrays["loss"])
    assert land.center_loss == r[name].meta["center_loss"]
  rob = r["robustness"].value
  assert isinstance(rob, RobustnessResult)
  np.testing.assert_array_equal(rob.error, r["robustness"].arrays["error"])
  assert rob.labels == r["robustness"].meta["labels"]


def test_options_take_tuples_or_the_cli_text():
  d = AnalysisOptions()
  assert d.alphas == (-0.5, 1.5, 41) and d.grid == ((-1.0, 1.0, 21), (-1.0, 1.0, 21))
  assert d.params == ("top", 10) and d.eval_batch_size == 500 and d.dpi == 100
  o = AnalysisOptions(alphas="0:1:3", grid=(-1, 1, 3), params="random")
  assert o.alphas == (0.0, 1.0, 3) and o.grid == ((-1.0, 1.0, 3), (-1.0, 1.0, 3))
  assert o.params == ("random", 10)
  o = AnalysisOptions(grid=((-1, 1, 3), (0, 1, 2)), params=("top", 3))
  assert o.grid == ((-1.0, 1.0, 3), (0.0, 1.0, 2)) and o.params == ("top", 3)
  assert AnalysisOptions(grid="-1:1:3,0:1:2").grid == o.grid


@pytest.mark.parametrize(
  ("values", "name"),
  [
    ({"grid": "1:1:3"}, "grid"),
    ({"grid": (0, 1)}, "grid"),
    ({"grid": "0:1:3,0:1:3,0:1:3"}, "grid"),
    ({"alphas": (0, 1, 0)}, "alphas"),
    ({"alphas": (0, float("inf"), 3)}, "alphas"),
    ({"params": "x:3"}, "params"),
    ({"params": ("top", 0)}, "params"),
    ({"directions": "up"}, "directions"),
    ({"eval_examples": 0}, "eval_examples"),
    ({"eval_batch_size": 1.5}, "eval_batch_size"),
    ({"dpi": None}, "dpi"),
    ({"one_d": "yes"}, "one_d"),
  ],
)
def test_bad_options_raise_value_error_naming_them(tmp_path, values, name):
  with pytest.raises(ValueError, match=f"analyze: {name}"):
    AnalysisOptions(**values)
  # analyze checks them before it reads the run or writes anything.
  run = SimpleNamespace(path=tmp_path / "missing")
  with pytest.raises(ValueError, match=f"analyze: {name}"):
    analyze(run, "path", **values)
  assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("what", ["nope", ["path", "nope"], [], "All", None])
def test_unknown_analysis_raises_value_error_naming_what(tmp_path, what):
  with pytest.raises(ValueError, match="analyze: what must be"):
    analyze(SimpleNamespace(path=tmp_path), what)


def test_unknown_option_raises_type_error(tmp_path):
  with pytest.raises(TypeError, match="unknown option"):
    analyze(SimpleNamespace(path=tmp_path), "path", girds="-1:1:3")


@pytest.mark.slow
def test_a_failing_analysis_raises_alone_and_is_collected_among_several(tmp_path):
  run_dir = _train(tmp_path / "r2", steps=2)  # checkpoints 0 and 2: PCA spans one dimension
  opts = AnalysisOptions(directions="pca", eval_examples=50, grid="-1:1:3")
  with _open_run(run_dir) as run:
    with pytest.raises(ValueError, match="span one dimension"):
      analyze(run, "landscape", out=tmp_path / "a", options=opts)
    seen = []
    report = analyze(
      run,
      ["landscape", "trajectory"],
      out=tmp_path / "b",
      options=opts,
      on_failure=lambda name, e: seen.append((name, str(e))),
    )
  assert list(report.failed) == ["landscape"] and "span one dimension" in report.failed["landscape"]
  assert seen == [("landscape", report.failed["landscape"])]
  assert list(report.results) == ["trajectory"]
  assert report.results["trajectory"].value.y is None  # one PCA direction: a 1-D trajectory
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
    "trajectory.json",
    "trajectory.npz",
    "trajectory.png",
  ]
