"""The reference training loop: schedules, optimizers, scopes, evaluation, runs, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _fresh import run_fresh

from jaxscope.checkpoint import RunCheckpoints
from jaxscope.record import History
from jaxscope.train import (
  TrainConfig,
  make_evaluate,
  make_instruments,
  make_optimizer,
  make_schedule,
  make_scope,
  train,
  updates_in_span,
)

ROOT = Path(__file__).resolve().parents[1]

# A small, fast configuration: MLP on the embedded digits, 22 steps per epoch.
FAST = TrainConfig(model="mlp", dataset="digits", batch_size=64, quiet=True)


# --------------------------------------------------------------------------- pieces


def test_exponential_schedule_is_gamma_per_epoch():
  s = make_schedule("exponential:0.5", 0.2, steps_per_epoch=10, total_steps=100)
  for t in [0, 9, 10, 19, 20, 35]:
    assert float(s(t)) == pytest.approx(0.2 * 0.5 ** (t // 10), rel=1e-6)
  assert float(make_schedule("exponential", 1.0, steps_per_epoch=1, total_steps=5)(3)) == (
    pytest.approx(0.98**3, rel=1e-6)
  )


def test_cosine_and_constant_schedules():
  s = make_schedule("cosine", 0.1, steps_per_epoch=10, total_steps=40)
  for t in [0, 10, 20, 40]:
    assert float(s(t)) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * t / 40)), abs=1e-8)
  assert float(make_schedule("constant", 0.3, steps_per_epoch=1, total_steps=1)(1000)) == (
    pytest.approx(0.3)
  )


@pytest.mark.parametrize(
  "spec, match",
  [("linear", "unknown schedule"), ("exponential:2", "γ must be in"), ("exponential:x", "number")],
)
def test_bad_schedules(spec, match):
  with pytest.raises(ValueError, match=match):
    make_schedule(spec, 0.1, steps_per_epoch=10, total_steps=100)


def test_optimizers_by_name():
  params = {"w": jnp.array([1.0, -2.0])}
  g = {"w": jnp.array([0.5, 0.25])}
  # momentum = heavy-ball SGD with μ = 0.9: two steps give -lr·g and -lr·(1.9 g).
  tx = make_optimizer("momentum", 0.1)
  state = tx.init(params)
  u1, state = tx.update(g, state, params)
  u2, _ = tx.update(g, state, params)
  np.testing.assert_allclose(u1["w"], -0.1 * np.array([0.5, 0.25]), rtol=1e-6)
  np.testing.assert_allclose(u2["w"], -0.1 * 1.9 * np.array([0.5, 0.25]), rtol=1e-6)
  # Any optax alias by name, with its keyword arguments.
  tx = make_optimizer("adamw", 1e-3, weight_decay=0.0)
  u, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(u["w"], -1e-3 * np.sign([0.5, 0.25]), rtol=1e-4)


@pytest.mark.parametrize(
  "name, kwargs, match",
  [
    ("adamx", {}, "unknown optimizer 'adamx'"),
    ("chain", {}, "not an optimizer alias"),
    ("adam", {"bogus": 1}, "rejected its arguments"),
  ],
)
def test_bad_optimizers(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_optimizer(name, 0.1, **kwargs)


def test_make_scope_presets_lists_and_errors():
  params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  assert make_scope("none") is None and make_scope(None) is None
  sc = make_scope("economy", topics=["updates"], kind="kernel")
  values, _ = sc.update(sc.init(params), params=params, grads=params, updates=params)
  assert sorted(values) == [
    "measured",
    "updates/mean/Dense_0/kernel",
    "updates/norm/Dense_0/kernel",
    "updates/ratio/Dense_0/kernel",
    "updates/variance/Dense_0/kernel",
  ]
  # A comma list on two topics; network metrics are recorded by the loop, not the scope.
  sc = make_scope("norm, max_abs,loss", topics=["params", "grads"], layers="bias")
  values, _ = sc.update(sc.init(params), params=params, grads=params)
  assert sorted(values) == [
    "grads/max_abs/Dense_0/bias",
    "grads/norm/Dense_0/bias",
    "measured",
    "params/max_abs/Dense_0/bias",
    "params/norm/Dense_0/bias",
  ]
  assert float(values["params/norm/Dense_0/bias"]) == pytest.approx(math.sqrt(2))
  with pytest.raises(ValueError, match="unknown metric 'nrm'"):
    make_scope("norm,nrm")
  with pytest.raises(ValueError, match="unknown topic 'weights'"):
    make_scope("norm", topics=["weights"])


class _Linear:
  """A ModelDef-like linear classifier, for an evaluation reference."""

  def apply(self, variables, x, *, train, rng=None):
    del train, rng
    p = variables["params"]
    return x.reshape(x.shape[0], -1) @ p["w"] + p["b"], {}


@pytest.mark.parametrize("batch_size", [3, 7, 100])
def test_evaluate_is_the_exact_mean_over_the_split(batch_size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 2, 2)).astype(np.float32)
  y = rng.integers(0, 3, 7).astype(np.int32)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.float32([0.1, 0, -0.1])}
  out = make_evaluate(_Linear(), x, y, batch_size=batch_size)(params, {})
  logits = x.reshape(7, -1).astype(np.float64) @ params["w"] + params["b"]
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  assert float(out["test/loss"]) == pytest.approx(-logp[np.arange(7), y].mean(), rel=1e-5)
  assert float(out["test/accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == y))
  # Regression: mean squared error over the examples (not over the padding).
  yr = rng.normal(size=(7, 3)).astype(np.float32)
  out = make_evaluate(_Linear(), x, yr, task="regression", batch_size=batch_size)(params, {})
  assert float(out["test/loss"]) == pytest.approx(np.mean((logits - yr) ** 2), rel=1e-5)
  assert "test/accuracy" not in out


# --------------------------------------------------------------------------- runs


def _run(tmp_path, name, **kw):
  return train(dataclasses.replace(FAST, out=str(tmp_path / name), **kw))


def _in_fresh_process(body, tmp_path):
  """``body(tmp_path)``, runs and assertions, in a new -O0 interpreter with every program in
  the persistent compilation cache (:func:`_fresh.run_fresh`): a run repeating an earlier
  one's configuration (same seed, resumed) loads its programs instead of compiling them."""
  run_fresh(__file__, body.__name__, tmp_path, cache=tmp_path / "compiled")


@pytest.mark.slow
def test_run_directory_is_complete(tmp_path):
  r = _run(tmp_path, "run", epochs=2, checkpoint_every=10, every=5)
  spe = 1438 // 64  # digits: 1438 training examples (test fraction 0.2).
  assert r.steps == 2 * spe and not r.interrupted
  config = json.loads((r.run_dir / "config.json").read_text())
  assert config["model"] == "mlp" and config["steps_per_epoch"] == spe
  assert config["versions"]["jax"] == jax.__version__
  h = History.load(r.run_dir)
  # Loss, accuracy and lr every step; scope values on measured steps only.
  assert h.steps("loss").tolist() == list(range(2 * spe))
  assert h.steps("lr").tolist() == list(range(2 * spe))
  assert h.steps("grads/norm/fc1/kernel").tolist() == list(range(0, 2 * spe, 5))
  assert h.steps("test/accuracy").tolist() == [0, spe, 2 * spe]
  assert h["test/accuracy"][-1] == pytest.approx(r.final_eval["test/accuracy"])
  assert h["test/accuracy"][-1] > 0.8  # an MLP learns digits in two epochs.
  # Checkpoints: init, every 10 steps, final, each with metadata.
  with ocp.CheckpointManager((r.run_dir / "checkpoints").absolute(), item_names=("meta",)) as m:
    assert m.all_steps() == [0, 10, 20, 30, 40, 2 * spe]
    meta = m.restore(2 * spe, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  assert meta["step"] == 2 * spe and meta["epoch"] == pytest.approx(2.0)
  assert meta["eval_loss"] == pytest.approx(r.final_eval["test/loss"]) and meta["wall_time"] > 0


@pytest.mark.slow
def test_same_seed_same_metrics_file_bit_for_bit(tmp_path):
  _in_fresh_process(_same_seed_same_metrics_file, tmp_path)


def _same_seed_same_metrics_file(tmp_path):
  # Dropout, the per-layer scope and Cockpit's instruments (per-example pass, α, histograms),
  # over two evaluations (a run costs its compilations; the steps are cheap either way).
  kw = dict(steps=6, model="alexnet_mini", metrics="economy", eval_every=3)
  a, b = _run(tmp_path, "a", **kw), _run(tmp_path, "b", **kw)
  text = (a.run_dir / "metrics.jsonl").read_bytes()
  assert text == (b.run_dir / "metrics.jsonl").read_bytes()
  c = _run(tmp_path, "c", seed=1, **kw)
  assert (c.run_dir / "metrics.jsonl").read_bytes() != text


@pytest.mark.slow
def test_resume_continues_at_the_right_step_with_identical_parameters(tmp_path):
  full = _run(tmp_path, "full", epochs=2, checkpoint_every=0)
  part = _run(tmp_path, "part", epochs=1, checkpoint_every=0)
  assert part.steps == full.steps // 2
  resumed = _run(tmp_path, "part", epochs=2, checkpoint_every=0, resume=True)
  assert resumed.steps == full.steps and int(resumed.state.step) == full.steps
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  hf, hr = History.load(full.run_dir), History.load(resumed.run_dir)
  assert hf.keys() == hr.keys()
  for key in ["loss", "updates/ratio/fc2/kernel", "test/loss"]:
    np.testing.assert_array_equal(hf.steps(key), hr.steps(key))
    np.testing.assert_array_equal(hf[key], hr[key])
  # Resuming a finished run does nothing; a different optimizer is refused.
  again = _run(tmp_path, "part", epochs=2, resume=True)
  assert again.steps == full.steps
  with pytest.raises(ValueError, match="optimizer: momentum -> adam"):
    _run(tmp_path, "part", epochs=3, resume=True, optimizer="adam")


def test_regression_dataset_records_loss_only(tmp_path):
  r = _run(tmp_path, "sine", dataset="sine", steps=5, optimizer="adam", lr=1e-2, metrics="none")
  h = History.load(r.run_dir)
  assert "train/accuracy" not in h and "test/accuracy" not in h
  assert sorted(h.keys()) == ["loss", "lr", "test/loss"]


def test_bad_configurations_are_named(tmp_path):
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    _run(tmp_path, "x", batch_size=0)
  with pytest.raises(ValueError, match="batch_size 5000 is larger than the 1438"):
    _run(tmp_path, "x", batch_size=5000)
  with pytest.raises(ValueError, match=r"layers .* is not a valid regex"):
    _run(tmp_path, "x", layers="(")
  with pytest.raises(ValueError, match="give epochs or steps"):
    _run(tmp_path, "x", epochs=None)
  with pytest.raises(ValueError, match="xla options: unknown name 'fast'; expected some of"):
    _run(tmp_path, "x", xla_options=["fast"])


def test_xla_options_compile_the_same_step(tmp_path):
  """``--xla-options``: the step's program compiled with both per-program options trains
  as the default one does (same losses and gradient norms up to float rounding)."""
  kw = dict(steps=6, metrics="economy")
  a = History.load(_run(tmp_path, "a", **kw).run_dir)
  run_b = _run(tmp_path, "b", xla_options=["fewer_copies", "lean_compile"], **kw)
  b = History.load(run_b.run_dir)
  assert json.loads((run_b.run_dir / "config.json").read_text())["xla_options"] == [
    "fewer_copies",
    "lean_compile",
  ]
  for key in ("loss", "grads/norm/fc1/kernel"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_nan_in_training_is_recorded_not_raised(tmp_path):
  # A learning rate that overflows: the run finishes and the history shows non-finite values.
  r = _run(tmp_path, "nan", steps=15, optimizer="sgd", lr=1e30, metrics="economy")
  h = History.load(r.run_dir)
  assert not np.all(np.isfinite(h["loss"]))
  assert not math.isfinite(r.final_eval["test/loss"])


_INTERRUPT = """
import sys
from jaxscope.train import train
r = train(model="mlp", dataset="digits", steps=100000, batch_size=64, out=sys.argv[1],
          quiet=True, checkpoint_every=0, eval_every=100000, metrics="none")
print("STOPPED", r.steps, r.interrupted, flush=True)
"""


@pytest.mark.slow
def test_ctrl_c_flushes_logs_and_writes_a_final_checkpoint(tmp_path):
  out = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
    [sys.executable, "-c", _INTERRUPT, str(out)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  deadline = time.time() + 120
  metrics = out / "metrics.jsonl"
  while time.time() < deadline:  # Wait until training is under way.
    if metrics.exists() and metrics.read_text().count("\n") > 30:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  _, steps, interrupted = stdout.split()[-3:]
  steps = int(steps)
  assert interrupted == "True" and 0 < steps < 100000
  h = History.load(out)
  assert h.steps("loss")[-1] == steps - 1  # every completed step is in the log
  assert h.steps("test/loss").tolist() == [0, steps]
  with ocp.CheckpointManager(out.absolute() / "checkpoints", item_names=("meta",)) as m:
    assert m.all_steps() == [0, steps]


# --------------------------------------------------------------------------- instruments

_COCKPIT_ECONOMY = [
  "alpha",
  "norm_test",
  "inner_test",
  "ortho_test",
  "per_example_grads/hist_counts",
]


def _finite(h, key):
  return all(np.all(np.isfinite(np.asarray(v, np.float64))) for v in h[key])


@pytest.mark.slow
def test_full_preset_records_cockpit_and_activation_health(tmp_path):
  _in_fresh_process(_full_preset_records, tmp_path)


def _full_preset_records(tmp_path):
  # A narrow MLP (682 parameters: curvature="auto" computes the traces exactly, and the
  # preset's step compiles in about half the time of the default 17 k-parameter MLP's, whose
  # Hutchinson path test_cli's business run takes).
  narrow = {"hidden_sizes": (8, 8)}
  r = _run(tmp_path, "full", steps=4, batch_size=32, metrics="full", checkpoint_every=2,
           model_args=narrow)  # fmt: skip
  h = History.load(r.run_dir)
  keys = set(h.keys())
  # Cockpit's full configuration: economy + business (TIC, trace) + λ_max and the 2-D histogram.
  for key in [*_COCKPIT_ECONOMY, "tic_diag", "hess_trace", "hess_max_ev"]:
    assert key in keys, key
    assert _finite(h, key), key
  assert "per_example_grads/hist2d_counts_grad_param" in keys
  assert "cockpit/distance/fc1/kernel" in keys
  assert h.steps("norm_test").tolist() == [0, 1, 2, 3]
  assert h.steps("alpha").tolist() == [1, 2, 3]  # α of the update of the step before.
  # Activation health of every captured layer, and the full per-layer scope.
  for stat in ["std", "dead_fraction", "saturation_fraction"]:
    assert h.layers("activations", stat) == ["fc1", "fc2", "out"]
    assert all(_finite(h, f"activations/{stat}/{lay}") for lay in ["fc1", "fc2", "out"])
  assert h.layers("layer_grads", "norm") == ["fc1", "fc2", "out"]
  assert "params/spectral_norm/fc1/kernel" in keys
  np.testing.assert_array_less(0.0, h["activations/std/fc1"])
  assert "loss" in keys and h.steps("loss").tolist() == [0, 1, 2, 3]
  # The instruments' state lives in the TrainState (plain arrays) and in the checkpoints,
  # which the read-only reader still opens for their params.
  assert int(r.state.instruments["cockpit"].count) == 4
  assert r.state.instruments["cockpit"].key.dtype == jnp.uint32
  with RunCheckpoints(r.run_dir) as ckpts:
    assert ckpts.steps == [0, 2, 4]
    last = ckpts.restore(4)
    for a, b in zip(jax.tree.leaves(last.params), jax.tree.leaves(r.state.params), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_instruments_resume_every_2_and_leave_training_unchanged(tmp_path):
  _in_fresh_process(_instruments_resume_every_2, tmp_path)


def _instruments_resume_every_2(tmp_path):
  kw = dict(batch_size=32, metrics="economy", every=2, checkpoint_every=0)
  full = _run(tmp_path, "full", steps=7, **kw)
  h = History.load(full.run_dir)
  assert h.steps("norm_test").tolist() == [0, 2, 4, 6]
  assert h.steps("activations/std/fc1").tolist() == [0, 2, 4, 6]
  assert h.steps("alpha").tolist() == [1, 3, 5]  # α of the measured steps' updates
  assert h.steps("loss").tolist() == list(range(7))
  assert _finite(h, "alpha") and _finite(h, "ortho_test")
  # Stopped at an odd step (its α comes from the checkpointed state) and resumed.
  _run(tmp_path, "part", steps=3, **kw)
  resumed = _run(tmp_path, "part", steps=7, resume=True, **kw)
  assert resumed.steps == 7
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  hr = History.load(resumed.run_dir)
  assert h.keys() == hr.keys()
  for key in ["loss", "alpha", "norm_test", "inner_test", "activations/dead_fraction/fc2"]:
    np.testing.assert_array_equal(h.steps(key), hr.steps(key))
    np.testing.assert_array_equal(h[key], hr[key])
  # The instruments do not change training: same losses and parameters as without metrics.
  plain = _run(tmp_path, "plain", steps=7, batch_size=32, metrics="none", checkpoint_every=0)
  np.testing.assert_allclose(History.load(plain.run_dir)["loss"], h["loss"], rtol=1e-5)
  for a, b in zip(
    jax.tree.leaves(plain.state.params), jax.tree.leaves(full.state.params), strict=True
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert plain.state.instruments == ()


@pytest.mark.slow
def test_instruments_with_a_hessian_vector_product_optimizer(tmp_path):
  _in_fresh_process(_instruments_with_hvp, tmp_path)


def _instruments_with_hvp(tmp_path):
  kw = dict(steps=4, batch_size=32, optimizer="preconditioned_sgd", checkpoint_every=0)
  r = _run(tmp_path, "pre", metrics="economy", **kw)
  plain = _run(tmp_path, "plain", metrics="none", **kw)
  h = History.load(r.run_dir)
  assert "probprec/phase" in h.keys() and _finite(h, "norm_test") and _finite(h, "alpha")
  for a, b in zip(
    jax.tree.leaves(plain.state.params), jax.tree.leaves(r.state.params), strict=True
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_metric_lists_run_no_instruments():
  assert make_instruments("norm,mean") is None and make_instruments("none") is None
  inst = make_instruments("business", every=3)
  assert (
    inst.every == 3 and "hess_trace" in inst.quantities and "hess_max_ev" not in inst.quantities
  )
  # "business" is the economy per-layer scope.
  params = {"Dense_0": {"kernel": jnp.ones((3, 2))}}
  a, b = make_scope("business"), make_scope("economy")
  va, _ = a.update(a.init(params), params=params, grads=params, updates=params)
  vb, _ = b.update(b.init(params), params=params, grads=params, updates=params)
  assert sorted(va) == sorted(vb)


def test_runs_declare_their_updates_in_the_span_for_sgd_and_momentum_only():
  # α combines the update's projections only where the optimizer makes it c0*g + c1*d_prev.
  cfg = dataclasses.replace
  assert updates_in_span(cfg(FAST, optimizer="sgd"))
  assert updates_in_span(cfg(FAST, optimizer="momentum", schedule="cosine"))
  assert updates_in_span(cfg(FAST, optimizer="sgd", optimizer_args={"momentum": 0.5}))
  assert not updates_in_span(cfg(FAST, optimizer="sgd", optimizer_args={"nesterov": True}))
  assert not updates_in_span(cfg(FAST, optimizer="nesterov"))
  assert not updates_in_span(cfg(FAST, optimizer="adam"))
  assert not updates_in_span(cfg(FAST, optimizer="sgd"), capacity=True)  # frozen chunks
  inst = make_instruments("economy", updates_in_span=True)
  params = {"Dense_0": {"kernel": jnp.ones((3, 2))}}
  assert inst.init(params).alpha_start.shape == (7,)
  with pytest.raises(ValueError, match="updates_in_span must be a bool"):
    make_instruments("economy", updates_in_span="yes")


@pytest.mark.slow
def test_resume_from_a_checkpoint_without_instrument_state(tmp_path):
  _in_fresh_process(_resume_without_instrument_state, tmp_path)


def _resume_without_instrument_state(tmp_path):
  # Checkpoints written before TrainState.instruments existed hold four fields.
  from jaxscope.checkpoint import CheckpointWriter

  save = CheckpointWriter.save

  def legacy_save(self, step, state, meta):
    save(self, step, {f: getattr(state, f) for f in state._fields[:4]}, meta)

  kw = dict(batch_size=32, checkpoint_every=0)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(CheckpointWriter, "save", legacy_save)
    _run(tmp_path, "old", steps=2, **kw)
  with pytest.warns(UserWarning, match="instruments start afresh"):
    r = _run(tmp_path, "old", steps=4, resume=True, **kw)
  assert r.steps == 4 and int(r.state.instruments["cockpit"].count) == 4
  h = History.load(r.run_dir)
  assert h.steps("norm_test").tolist() == [0, 1, 2, 3]
  assert h.steps("alpha").tolist() == [1, 3]  # none at step 2: its start point was not saved
  assert _finite(h, "alpha") and _finite(h, "activations/std/fc1")


def test_resume_from_checkpoints_of_another_state_structure_says_so(tmp_path):
  """Checkpoints whose optimizer state has another structure than this version builds
  (an older jaxscope's, e.g. before PreconditionerState packed its scalars) are refused
  with that said, and left where they are."""
  from jaxscope.checkpoint import CheckpointWriter

  save = CheckpointWriter.save

  def older_save(self, step, state, meta):
    save(self, step, state._replace(opt_state={"older": state.opt_state}), meta)

  kw = dict(batch_size=32, checkpoint_every=0, metrics="none", optimizer="adam")
  with pytest.MonkeyPatch.context() as m:
    m.setattr(CheckpointWriter, "save", older_save)
    _run(tmp_path, "old", steps=2, **kw)
  saved = sorted(p.name for p in (tmp_path / "old" / "checkpoints").iterdir())
  with pytest.raises(ValueError, match=r"another structure.*Nothing was moved"):
    _run(tmp_path, "old", steps=4, resume=True, **kw)
  assert sorted(p.name for p in (tmp_path / "old" / "checkpoints").iterdir()) == saved


def test_xla_options_auto_resolves_per_model_and_is_recorded(tmp_path):
  """The default (``auto``) is :func:`jaxscope.xla.step_options` of the model and the
  instruments, recorded in ``config.json``; ``none`` is XLA's own; names are kept."""
  from jaxscope.train.build import setup

  assert setup(dataclasses.replace(FAST, metrics="none")).xla_options() == []
  assert setup(dataclasses.replace(FAST, metrics="business")).xla_options() == ["fewer_copies"]
  assert setup(
    dataclasses.replace(FAST, model="lenet5", dataset="digits", metrics="none")
  ).xla_options() == ["lean_compile"]
  business = dataclasses.replace(FAST, metrics="business")
  assert setup(dataclasses.replace(business, xla_options=["none"])).xla_options() == []
  assert setup(dataclasses.replace(business, xla_options=["lean_compile"])).xla_options() == [
    "lean_compile"
  ]
  r = _run(tmp_path, "auto", steps=2, metrics="business")
  record = json.loads((r.run_dir / "config.json").read_text())
  assert record["xla_options"] == ["auto"] and record["xla_step_options"] == ["fewer_copies"]
  with pytest.raises(ValueError, match="'auto' and 'none' stand alone"):
    _run(tmp_path, "x", xla_options=["auto", "lean_compile"])
