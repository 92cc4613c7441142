"""The ``jaxscope`` command line end to end, and metric plugins through entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxscope.cli import main
from jaxscope.record import History


@pytest.mark.slow
def test_train_writes_a_complete_run_directory(tmp_path, capsys):
  out = tmp_path / "run"
  argv = ["train", "--model", "lenet5", "--steps", "25", "--batch-size", "32", "--out", str(out)]
  argv += ["--metrics", "economy", "--topics", "params,updates", "--layers", "Conv|conv"]
  argv += ["--eval-every", "10", "--checkpoint-every", "10", "--opt-args", "momentum=0.5"]
  argv += ["--optimizer", "sgd", "--schedule", "exponential:0.9", "--quiet"]
  assert main(argv) == 0
  assert sorted(p.name for p in out.iterdir()) == [
    ".lock",  # RunLock's file (who trains here), kept: the next run takes it over
    "checkpoints",
    "config.json",
    "metrics.jsonl",
    "plots",
  ]
  h = History.load(out)
  assert h.config["optimizer_args"] == {"momentum": 0.5}
  # --topics and --layers select the per-layer scope; the economy preset's instruments add
  # per-leaf cockpit/{grad_norm,distance,update_size} (their own topic since issue 18, so
  # they never collide with the scope's keys), and every layer's activations.
  assert set(h.topics()) == {"params", "updates", "cockpit", "activations", "layer_grads"}
  assert set(h.stats("cockpit")) == {"grad_norm", "distance", "update_size"}
  assert {"loss", "lr", "train/accuracy", "test/loss", "test/accuracy", "alpha"} <= set(h.keys())
  for stat in ["ratio", "mean"]:
    layers = h.layers("updates", stat)
    assert layers and all("conv" in lay.lower() for lay in layers)
  assert len(h.layers("activations", "std")) > len(h.layers("updates", "mean"))
  assert h.steps("test/loss").tolist() == [0, 10, 20, 25]
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0", "10", "20", "25"]
  plots = sorted(p.name for p in (out / "plots").iterdir())
  assert "updates_ratio.png" in plots and "loss.png" in plots
  # The exponential schedule, γ per epoch (1438 // 32 = 44 steps per epoch: one decay so far).
  np.testing.assert_allclose(h["lr"][:3], 0.05, rtol=1e-6)
  assert capsys.readouterr().out == ""  # --quiet


@pytest.mark.slow
def test_train_business_preset_end_to_end(tmp_path):
  out = tmp_path / "run"
  argv = ["train", "-m", "mlp", "--steps", "3", "-b", "32", "--metrics", "business"]
  assert main([*argv, "--out", str(out), "-q", "--no-plots", "--checkpoint-every", "0"]) == 0
  h = History.load(out)
  assert h.config["metrics"] == "business"
  for key in ["alpha", "norm_test", "inner_test", "ortho_test", "hess_trace", "tic_diag"]:
    assert np.all(np.isfinite(h[key])), key
  assert "hess_max_ev" not in h.keys()  # full only
  assert h.steps("activations/dead_fraction/fc1").tolist() == [0, 1, 2]
  assert "params/mean/fc1/kernel" in h.keys()  # the economy per-layer scope


@pytest.mark.slow
def test_plot_renders_an_existing_run(tmp_path, capsys):
  out = tmp_path / "run"
  # Per-layer norms and ratios, no instruments: the step of test_run_integrity's runs (one
  # program in the compilation cache), compiled in a fraction of the economy preset's time.
  argv = ["train", "-m", "mlp", "--steps", "12", "--eval-every", "5", "--out", str(out)]
  argv += ["--metrics", "norm,ratio"]
  assert main([*argv, "--no-plots"]) == 0  # not quiet: progress bar and summary
  assert "finished at step 12" in capsys.readouterr().out
  assert not (out / "plots").exists()
  assert main(["plot", str(out), "--out", str(tmp_path / "figs")]) == 0
  assert "plots to" in capsys.readouterr().out
  assert (tmp_path / "figs" / "grads_norm.png").stat().st_size > 1000


def test_lists(capsys):
  assert main(["list-metrics"]) == 0
  text = capsys.readouterr().out
  assert "spectral_norm" in text and "preset economy" in text and "ratio" in text
  assert "preset business" in text and "HessTrace" in text and "HessMaxEV" in text
  assert main(["list-models"]) == 0
  text = capsys.readouterr().out
  for name in ["mlp", "mnist_mlp", "2c2d", "3c3d", "lenet5", "alexnet_mini", "resnet20"]:
    assert f"\n{name} " in f"\n{text}"
  assert main(["list-datasets"]) == 0
  text = capsys.readouterr().out
  assert "digits" in text and "needs --data-dir" in text and "embedded" in text


@pytest.mark.parametrize("command", ["train", "plot", "diagnose", "list-metrics"])
def test_help_of_every_option_renders(command, capsys):
  """argparse formats each help text with ``%``: a bare percent sign in one breaks --help."""
  with pytest.raises(SystemExit) as e:
    main([command, "--help"])
  assert e.value.code == 0
  assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
  "argv, message",
  [
    (["train", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["train", "--optimizer", "adamx", "--steps", "1"], "unknown optimizer 'adamx'"),
    (["train", "--schedule", "step", "--steps", "1"], "unknown schedule 'step'"),
    (["train", "--metrics", "nrm", "--steps", "1"], "unknown metric 'nrm'"),
    (["train", "--model", "vgg99", "--steps", "1"], "vgg99"),
    (["train", "--dataset", "mnist", "--steps", "1"], "data"),
    (["train", "--opt-args", "momentum", "--steps", "1"], "key=value"),
    (["train", "--xla-options", "fast", "--steps", "1"], "unknown name 'fast'"),
    (["train", "--xla-options", "auto,lean_compile", "--steps", "1"], "stand alone"),
    (["plot", "/nonexistent/run"], "not a run directory"),
  ],
)
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, argv, message):
  if argv[0] == "train":
    argv = [*argv, "--out", str(tmp_path / "run"), "-q"]
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.slow
def test_existing_run_directory_needs_resume(tmp_path, capsys):
  out = str(tmp_path / "run")
  # No metrics: the run directory's guard does not depend on them (and compiles in seconds).
  base = ["train", "-m", "mlp", "--metrics", "none", "--out", out, "-q", "--no-plots"]
  assert main([*base, "--steps", "2"]) == 0
  with pytest.raises(SystemExit):
    main([*base, "--steps", "4"])
  assert "--resume" in capsys.readouterr().err
  assert main([*base, "--steps", "4", "--resume"]) == 0
  assert History.load(out).steps("loss").tolist() == [0, 1, 2, 3]


PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "jaxscope-kurtosis-plugin"
version = "0.0.1"

[project.entry-points."jaxscope.metrics"]
kurtosis = "kurtosis_plugin:kurtosis"
"""

PLUGIN_MODULE = '''
"""A third-party jaxscope metric: excess kurtosis of a layer."""
import jax.numpy as jnp
from jaxscope.metrics import stateless


def kurtosis():
  """Excess kurtosis ``E[(x-μ)^4]/σ^4 - 3`` of the layer's elements."""

  def fn(leaves):
    x = jnp.concatenate([jnp.ravel(v) for v in leaves])
    c = x - x.mean()
    return jnp.mean(c**4) / jnp.mean(c**2) ** 2 - 3.0

  return stateless("kurtosis", fn)
'''

USE_PLUGIN = """
import sys
import numpy as np
from jaxscope import metrics
from jaxscope.cli import main
from jaxscope.record import History

assert "kurtosis" in metrics.registry.names(), metrics.registry.names()
sc = metrics.scope(params=["kurtosis"])           # by name, in a scope
x = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
values, _ = sc.update(sc.init({"w": x}), params={"w": x})
c = x.astype(np.float64) - x.mean()
print("KURTOSIS", float(values["params/kurtosis/w"]), (c**4).mean() / (c**2).mean() ** 2 - 3)
assert main(["train", "-m", "mlp", "--steps", "3", "--metrics", "norm,kurtosis",
             "--topics", "grads", "--out", sys.argv[1], "-q", "--no-plots"]) == 0
print("KEYS", sorted(k for k in History.load(sys.argv[1]).keys() if "kurtosis" in k))
"""


@pytest.mark.slow
def test_plugin_metric_is_found_through_its_entry_point(tmp_path):
  src = tmp_path / "src"
  (src / "kurtosis_plugin").mkdir(parents=True)
  (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
  (src / "kurtosis_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN_MODULE))
  site = tmp_path / "site"
  pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
  pip += ["--no-build-isolation", "--target", str(site), str(src)]
  subprocess.run(pip, check=True, capture_output=True, text=True)
  assert list(site.glob("jaxscope_kurtosis_plugin-*.dist-info"))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
  r = subprocess.run(
    [sys.executable, "-c", USE_PLUGIN, str(tmp_path / "run")],
    capture_output=True,
    text=True,
    env=env,
    cwd=Path(__file__).resolve().parents[1],
  )
  assert r.returncode == 0, r.stderr
  line = next(l for l in r.stdout.splitlines() if l.startswith("KURTOSIS"))
  ours, reference = map(float, line.split()[1:])
  assert ours == pytest.approx(reference, rel=1e-4)
  keys = next(l for l in r.stdout.splitlines() if l.startswith("KEYS"))
  assert "grads/kurtosis/fc1/kernel" in keys
