"""The examples run end to end (shortened)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxscope.record import History

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(
    f"examples_{name}", ROOT / "examples" / f"{name}.py"
  )
  mod = importlib.util.module_from_spec(spec)
  sys.modules[f"examples_{name}"] = mod
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture
def fast_compile():
  """XLA without most optimisations while the test runs (an in-process example cannot set
  the XLA flags of the ``--quick`` scripts): compiling is most of the example's time."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.slow
def test_quickstart_writes_a_run_directory(tmp_path, capsys, fast_compile):
  out = tmp_path / "run"
  result = _load("quickstart").main(
    ["--out", str(out), "--epochs", "2", "--every", "3", "--preset", "full"]
  )
  assert np.isfinite(result["loss"]) and result["test/accuracy"] > 0.5
  assert json.loads((out / "config.json").read_text())["preset"] == "full"
  history = History.load(out)
  # every=3: only steps 0, 3, 6, ... carry scope values; test metrics once per epoch.
  assert history.steps("grads/norm/Dense_0/kernel").tolist() == list(range(0, 44, 3))
  assert history.steps("test/accuracy").tolist() == [21, 43]
  assert (out / "plots" / "updates_ratio.png").stat().st_size > 1000
  assert "Dense_0/kernel" in capsys.readouterr().out


def _run_quick(script: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
  """Runs ``examples/<script> --quick --out tmp_path`` as a user does: in a subprocess,
  since the scripts set XLA flags before JAX is imported. Fails with the stderr tail."""
  proc = subprocess.run(
    [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path), *extra],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_ratio_lr_schedules_quick(tmp_path):
  proc = _run_quick("ratio_lr_schedules.py", tmp_path)
  assert "| mlp | digits | 0.1 |" in proc.stdout  # the markdown table
  report = json.loads((tmp_path / "results" / "ratio_lr_schedules.json").read_text())
  config = report["config"]
  assert config["models"] == ["mlp"] and config["datasets"] == ["digits"]
  assert config["lrs"] == [0.1, 0.5] and config["seeds"] == 2
  schedules = ["constant", "exponential", "ratio", "ratio_thesis", "fixed_ratio"]
  assert list(config["schedules"]) == schedules
  by_sched = report["results"]["mlp"]["digits"]
  for schedule in schedules:
    for lr in ("0.1", "0.5"):
      res = by_sched[schedule]["by_lr"][lr]
      accs = res["final_test_accuracy"]
      assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
      assert np.isclose(res["mean"], np.mean(accs), atol=1e-5)
      assert len(res["curves"]["test_accuracy"]) == config["epochs"]["digits"]
  assert min(by_sched["constant"]["by_lr"]["0.1"]["final_test_accuracy"]) > 0.2  # chance 0.1
  # The trace run (lr 0.5, seed 0): one value per step; the constant rate is the base rate.
  traces = report["traces"]["schedules"]
  steps = config["epochs"]["digits"] * config["dataset_sizes"]["digits"]["steps_per_epoch"]
  assert len(traces["ratio"]["lr"]) == steps
  assert np.allclose(traces["constant"]["lr"], 0.5, rtol=1e-4)
  assert traces["ratio"]["lr"][0] == 0.5 and traces["ratio"]["lr"][5] != 0.5
  for name in ("boxplots", "traces", "curves"):
    assert (tmp_path / "figures" / f"ratio_lr_{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_preconditioner_comparison_quick(tmp_path):
  proc = _run_quick("preconditioner_comparison.py", tmp_path)
  assert "| PreconditionedSGD |" in proc.stdout  # the markdown tables
  report = json.loads((tmp_path / "results" / "preconditioner_comparison.json").read_text())
  config = report["config"]
  assert config["setups"] == ["mlp/digits"] and config["seeds"] == 1
  assert list(config["methods"]) == ["sgd", "psgd"] and config["lrs"] == [0.1, 0.3]
  res = report["results"]["mlp/digits"]
  epochs, spe = res["epochs"], res["steps_per_epoch"]
  assert (epochs, spe, res["batch_size"]) == (2, 22, 64)
  assert res["reestimate_every"] == spe  # --quick re-estimates every epoch
  assert res["sgd_tuning"]["tuned_lr"] in (0.1, 0.3)
  for name, method in res["methods"].items():
    for key in ("train_loss", "test_loss", "test_accuracy"):
      curve = method["curves"][key]["mean"]
      assert len(curve) == epochs + 1 and all(np.isfinite(v) for v in curve), (name, key)
      assert len(method["per_seed"][key]) == 1
    assert 0.0 <= method["final"]["test_accuracy"]["mean"] <= 1.0
  sgd = res["methods"]["sgd"]
  assert sgd["lr"] == res["sgd_tuning"]["tuned_lr"]
  assert sgd["final"]["test_accuracy"]["mean"] > res["chance_accuracy"] + 0.1
  # PreconditionedSGD: a cycle per epoch (α set after its 10 prior steps), each with 14
  # steps without updates, then steps at lr α.
  psgd = res["methods"]["psgd"]
  assert psgd["frozen_steps"] == 2 * 14
  cycles = psgd["alpha_cycles"][0]
  assert [c["step"] for c in cycles] == [9, spe + 9]
  for c in cycles:
    assert np.isfinite(c["alpha"]) and c["lr"] == c["alpha"]
    assert c["sigma_max"] >= c["sigma_min"] > 0  # the low-rank estimate's singular values
  sens = res["sensitivity"]
  for variant in ("sgd", "psgd_initial_lr"):
    assert list(sens[variant]) == ["0.1", "0.3"]
    for r in sens[variant].values():
      assert np.isfinite(r["final"]["train_loss"]["mean"])
  # With initial_lr the first cycle steps with it instead of α, the second with α.
  first, second = sens["psgd_initial_lr"]["0.3"]["alpha_cycles"][0]
  assert np.isclose(first["lr"], 0.3) and second["lr"] == second["alpha"]
  for name in ("curves", "sensitivity", "alpha"):
    assert (tmp_path / "figures" / f"probprec_{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_training_progress_quick(tmp_path):
  run_dir = tmp_path / "run"
  proc = _run_quick("training_progress.py", tmp_path, "--run-dir", str(run_dir))
  assert "| linear |" in proc.stdout and "| quadratic |" in proc.stdout  # the markdown tables
  report = json.loads((tmp_path / "results" / "training_progress.json").read_text())
  assert report["config"]["epochs"] == 2 and report["config"]["quick"]
  cps = report["checkpoints"]
  assert cps["steps"] == [0, 22, 44] and cps["epochs"] == [0.0, 1.0, 2.0]
  assert cps["max_abs_diff_logged_vs_kernel"] < 1e-4  # the kernel reproduces train's eval
  paths = report["paths"]
  alpha = np.asarray(paths["alpha"])
  i0, i1 = int(np.argmin(np.abs(alpha))), int(np.argmin(np.abs(alpha - 1)))
  for key in ("linear", "quadratic"):  # every path passes through both endpoints
    loss = paths[key]["loss"]
    assert np.isclose(loss[i0], cps["true_loss"][0], rtol=1e-4)
    assert np.isclose(loss[i1], cps["true_loss"][-1], rtol=1e-4)
  assert paths["checkpoint_alpha"][0] == 0 and np.isclose(paths["checkpoint_alpha"][-1], 1)
  assert paths["closer"] in ("linear", "quadratic")
  assert set(paths["mae"]["at_projected_alpha"]) >= {"linear", "quadratic"}
  rob = report["layers"]["robustness"]
  assert set(rob["labels"]) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
  assert len(rob["reinit_error"]) == 3 and len(rob["rerandomized_error"]) == 1
  par = report["parameters"]
  assert par["selected_by"][:4] == ["top-k overall"] * 4  # --quick: k = 4
  assert {name.split("/")[0] for name in par["selection"]} == set(rob["labels"])  # every layer
  assert len(par["linear"]) == len(par["quadratic"]) == len(par["selection"])
  surf = report["surface"]
  assert np.isclose(surf["grid_center_loss"], surf["center_loss"], rtol=1e-5)
  assert np.isclose(surf["center_loss"], cps["true_loss"][-1], rtol=1e-5)
  pca = report["pca"]
  assert 0.0 < pca["explained_variance_ratio_sum"] <= 1.0 + 1e-6
  assert np.allclose(pca["coords"][-1], 0.0, atol=1e-6)  # θ_f is the plane's origin
  assert (run_dir / "analysis" / "surface_random.npz").exists()
  for name in ("paths", "layers", "robustness", "parameters", "surface", "pca"):
    assert (tmp_path / "figures" / f"progress_{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cockpit_instruments_quick(tmp_path):
  proc = _run_quick("cockpit_instruments.py", tmp_path)
  assert "| lr0.2 | 0.2 |" in proc.stdout and "| lr2 | 2 |" in proc.stdout  # the markdown table
  for name, lr in (("lr0.2", 0.2), ("lr2", 2.0)):
    history = History.load(tmp_path / name)
    assert history.config["lr"] == lr and history.config["preset"] == "full"
    steps = history.config["steps"]
    assert history.steps("alpha").tolist() == list(range(steps))  # every step measured
    for key in ("loss", "norm_test", "inner_test", "ortho_test", "hess_max_ev", "tic_diag"):
      assert np.isfinite(history[key]).all(), key
    assert history["per_example_grads/hist2d_counts_grad_param"].shape == (steps, 40, 50)
    assert history.steps("test/accuracy")[-1] == steps - 1
    assert (tmp_path / "figures" / f"cockpit_{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_dynamic_capacity_quick(tmp_path):
  proc = _run_quick("dynamic_capacity.py", tmp_path)
  for name in (
    "static 100",
    "static 500",
    "adaptive 500 (fifths)",
    "standard",
    "adaptive (tenths)",
  ):
    assert name in proc.stdout
  # The masked network's step time is measured at one chunk and at full capacity.
  assert "capacity 500, 1/5 active" in proc.stdout


@pytest.mark.slow
def test_diagnose_runs_quick(tmp_path):
  proc = _run_quick("diagnose_runs.py", tmp_path)
  cases = [
    "lr_too_high",
    "lr_too_low",
    "unshuffled",
    "unshuffled_momentum",
    "bad_init",
    "overfitting",
    "healthy",
    "healthy_lenet5",
  ]
  for name in cases:
    assert f"| {name} |" in proc.stdout  # the markdown table
  report = json.loads((tmp_path / "results" / "diagnoses.json").read_text())
  assert report["config"]["quick"] and report["config"]["cases"] == cases
  results = report["results"]
  assert list(results) == cases
  for name, r in results.items():
    assert r["status"] in ("found", "partly found", "missed", "healthy", "false alarm"), name
    names = [f["name"] for f in r["findings"]]
    assert r["found"] == [n for n in r["expected"] if n in names]
    for f in r["findings"]:
      assert f["severity"] in ("critical", "warning", "info") and f["summary"]
    assert (tmp_path / "runs" / name / "metrics.jsonl").exists()
  # Even the tiny runs show the blatant problems: lr 50 diverges at once, -2 biases kill ReLUs.
  assert results["lr_too_high"]["status"] == "found"
  assert results["lr_too_high"]["findings"][0]["name"] == "divergence"
  assert "dead_units" in results["bad_init"]["found"]
  # The custom loop: label-sorted, unshuffled data, the train loop's keys.
  history = History.load(tmp_path / "runs" / "unshuffled")
  spe = history.config["steps_per_epoch"]
  assert history.config["shuffle"] is False and results["unshuffled"]["steps"] == 2 * spe
  assert history.steps("loss").tolist() == list(range(2 * spe))
  assert "updates/ratio/fc1/kernel" in history and "test/loss" in history
  bad = History.load(tmp_path / "runs" / "bad_init")
  assert "activations/dead_fraction/fc1" in bad


@pytest.mark.slow
def test_transformer_lm_quick(tmp_path):
  proc = _run_quick("transformer_lm.py", tmp_path)
  assert "bits per character" in proc.stdout and "| fc1/kernel |" in proc.stdout
  report = json.loads((tmp_path / "results" / "transformer_lm.json").read_text())
  config = report["config"]
  assert config["quick"] and config["layers"] == 2 and config["steps"] == 6
  history = History.load(tmp_path / "run")
  assert history.config["stacked"] == {"^blocks/": 0}
  # Per block of the scanned stack, every step (--quick measures every step).
  for i in range(2):
    assert history.steps(f"updates/ratio/blocks/{i}/fc1/kernel").tolist() == list(range(6))
    logits = history[f"attention/logit_max/blocks/{i}/attn"]
    assert logits.shape == (6,) and np.all(np.isfinite(logits)) and np.all(logits > 0)
    assert report["logits"]["first"][i] == pytest.approx(float(logits[0]))
  assert "updates/ratio/blocks/attn/query/kernel" not in history  # not pooled
  ev = report["evaluation"]
  bits = history["test/bits_per_token"]
  assert ev["final_bits_per_token"] == pytest.approx(float(bits[-1]))
  # bits = nats / ln 2 of the same evaluation
  assert np.allclose(bits, history["test/loss"] / np.log(2), rtol=1e-6)
  assert ev["final_bits_per_token"] < ev["initial_bits_per_token"]
  layers = report["layers"]
  assert sorted(layers["layers_fastest_first"]) == [0, 1]
  for name, row in layers["median_ratio_second_half"].items():
    assert len(row) == 2 and all(r > 0 for r in row), name
  for name in ("updates_ratio_stack", "attn_logit_max_stack", "curves", "diagnosis"):
    assert (tmp_path / "figures" / f"transformer_lm_{name}.png").stat().st_size > 10_000
