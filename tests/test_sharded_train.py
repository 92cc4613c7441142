"""Sharded training in ``jaxscope train``: device meshes, the partition rule, dtypes.

The end-to-end tests run ``jaxscope train`` in subprocesses with 4 and 8 simulated CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before jax starts):
the MLP on digits, the economy preset (per-layer scope and Cockpit's instruments), a few
steps. Every recorded value of a data-parallel run (``data=4``) and of a fully sharded
run (``data=4,fsdp=2``, interrupted and resumed) must equal the single-device run's. The
single-device runs (``--mesh`` unset: every array on the first device) are made in the
8-device process, which saves a process; they record the values of a one-device process
bit for bit (checked by hand: 503 of 503 equal). The 8-device process also checks the
layout: shard shapes, per-device bytes, the restored state's shardings and the
all-gathers of the compiled step. One subprocess per device count; run this file as
``python tests/test_sharded_train.py N OUT`` to drive one by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: What every end-to-end run shares: 5 updates of 64 examples, no figures.
COMMON = (
  "train",
  "-m",
  "mlp",
  "-d",
  "digits",
  "-b",
  "64",
  "--steps",
  "5",
  "--metrics",
  "economy",
  "--checkpoint-every",
  "0",
  "--no-live-diagnosis",
  "--no-plots",
  "-q",
)
#: The per-layer scope of the economy preset without Cockpit's instruments.
ECONOMY_SCOPE = "norm,mean,variance,ratio"
#: Elements of each parameter of the digits MLP (64 → 128 → 64 → 10).
SIZES = {
  "fc1/kernel": 64 * 128,
  "fc1/bias": 128,
  "fc2/kernel": 128 * 64,
  "fc2/bias": 64,
  "out/kernel": 64 * 10,
  "out/bias": 10,
}


# --------------------------------------------------------------------------- the drivers
# Each runs in a fresh interpreter with N devices and writes OUT/resultN.json.


def _cli(*args: str) -> None:
  from jaxscope.cli import main

  rc = main([*COMMON, *args])
  assert rc == 0, (args, rc)


def _drive_one(out: Path) -> dict[str, Any]:
  """The reference run, and a bfloat16-parameter run with its step's dtypes (one device:
  no mesh, so the first of the process's devices)."""
  import jax
  import jax.numpy as jnp

  from jaxscope.run import TrainConfig
  from jaxscope.train import setup

  _cli("--out", str(out / "one"))
  # Cockpit's instruments do not lower with bf16 parameters yet (an SVD of a bf16 Gram
  # matrix in metrics/instruments/update.py), so this run measures the economy scope.
  _cli("--out", str(out / "bf16"), "--param-dtype", "bfloat16", "--metrics", ECONOMY_SCOPE)
  s = setup(
    TrainConfig(model="mlp", dataset="digits", metrics=ECONOMY_SCOPE, param_dtype="bfloat16")
  )
  x = jax.ShapeDtypeStruct((64, 8, 8, 1), jnp.float32)
  y = jax.ShapeDtypeStruct((64,), jnp.int32)
  step = s.train_step()
  new_state, values = jax.eval_shape(
    lambda st, a, b: step(st, a, b), jax.eval_shape(s.init_state), x, y
  )

  def dtypes(tree: Any) -> list[str]:
    return sorted({str(a.dtype) for a in jax.tree.leaves(tree)})

  return {  # momentum's trace: opt_state = monitored(chain(trace, scale)) state
    "param_dtypes": dtypes(new_state.params),
    "trace_dtypes": dtypes(new_state.opt_state.inner_state[0].trace),
    "value_dtypes": dtypes(values),
  }


def _drive_data(out: Path) -> dict[str, Any]:
  _cli("--out", str(out / "data"), "--mesh", "data=4")
  return {}


def _all_gathers(s: Any, state: Any) -> list[str]:
  """The result shapes of the all-gathers in the compiled step of ``s`` (measuring)."""
  from jaxscope.train import sharding

  batch = sharding.batch_sharding(s.mesh)
  x = sharding.put_global(s.dataset.train_x[:64], batch)
  y = sharding.put_global(s.dataset.train_y[:64], batch)
  text = s.train_step().lower(state, x, y, measure=True).compile().as_text()
  return re.findall(r"= (\S+) all-gather(?:-start)?\(", text)


def _drive_fsdp(out: Path) -> dict[str, Any]:
  """The fully sharded run (3 steps, then resumed to 5), its restored layout, shard shapes,
  per-device bytes and all-gathers."""
  import jax

  from jaxscope import checkpoint
  from jaxscope.metrics.instruments import instruments
  from jaxscope.run import TrainConfig
  from jaxscope.train import setup, sharding

  # The resumed run compiles the same programs again: a compilation cache in the run's
  # folder serves them (the test's time, not its subject).
  jax.config.update("jax_compilation_cache_dir", str(out / "compiled"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  run = str(out / "fsdp")
  _cli("--out", run, "--mesh", "data=4,fsdp=2", "--steps", "3")
  restored: dict[str, Any] = {}
  original = checkpoint.CheckpointWriter.restore_latest

  def spy(self: Any, targets: Any) -> Any:
    found = original(self, targets)
    want = jax.tree.leaves(targets[found[0]])
    got = jax.tree.leaves(found[1])
    restored["same"] = [g.sharding == w.sharding for g, w in zip(got, want, strict=True)]
    restored["fsdp_leaves"] = sum("fsdp" in str(w.sharding.spec) for w in want)
    restored["fc1_shard"] = list(found[1].params["fc1"]["kernel"].addressable_shards[0].data.shape)
    return found

  checkpoint.CheckpointWriter.restore_latest = spy
  _cli("--out", run, "--mesh", "data=4,fsdp=2", "--resume")
  checkpoint.CheckpointWriter.restore_latest = original

  config = TrainConfig(model="mlp", dataset="digits", mesh="data=4,fsdp=2", metrics="none")
  bare = setup(config)
  state = bare.initial_state()
  shapes = {
    jax.tree_util.keystr(p): list(a.addressable_shards[0].data.shape)
    for p, a in jax.tree_util.tree_flatten_with_path(state.params)[0]
  }
  scoped = setup(dataclasses.replace(config, metrics="economy"))  # scope and instruments
  scoped_state = scoped.initial_state()
  # The instruments' code that gathered whole kernels: the Hessian-vector products'
  # probes, the per-example gradients of the vmap(grad) route (what every non-Dense leaf
  # takes) and the 2-D histogram's parameter sample.
  # One probe: several tangents make XLA gather the kernel once for the batched HVP
  # (documented in docs/sharding.md), which is not the gather this test is about.
  probed = bare._replace(
    instruments=instruments(
      quantities=("hess_trace", "grad_hist_2d"), capture_layers=False, hutchinson_probes=1
    )
  )
  # Its step is only lowered and compiled: the state's shapes and shardings are enough.
  probed_state = sharding.abstract_with(jax.eval_shape(probed.init_state), probed.state_shardings())
  return {
    "analysis": _analyze_sharded(Path(run)),
    "restored": restored,
    "shapes": shapes,
    "device_bytes": sharding.device_bytes(state.params),
    "total_bytes": sum(a.nbytes for a in jax.tree.leaves(state.params)),
    "state_device_bytes": sharding.device_bytes(scoped_state),
    "state_total_bytes": sum(a.nbytes for a in jax.tree.leaves(scoped_state)),
    "gathers_bare": _all_gathers(bare, state),
    "gathers_scope": _all_gathers(scoped, scoped_state),
    "gathers_probes": _all_gathers(probed, probed_state),
  }


def _analyze_sharded(run: Path) -> dict[str, Any]:
  """``jaxscope.load_run`` of the fully sharded run: the shardings its checkpoints come back
  with (the run's own, one device, another mesh) and ``analyze(run, "path")`` on them."""
  import jaxscope
  from jaxscope.analysis import analyze

  def fc1(ckpt: Any) -> tuple[str, str, tuple[int, ...]]:
    kernel = ckpt.params["fc1"]["kernel"]
    shard = tuple(kernel.addressable_shards[0].data.shape)
    return type(kernel.sharding).__name__, str(getattr(kernel.sharding, "spec", "")), shard

  out: dict[str, Any] = {}
  with jaxscope.load_run(run) as r:
    out["mesh"] = dict(r.mesh.shape)
    ckpts, restore, seen = r.checkpoints, r.checkpoints.restore, set()

    def spy(step: Any = None, **kw: Any) -> Any:  # what the analysis computes on
      ckpt = restore(step, **kw)
      seen.add(fc1(ckpt))
      return ckpt

    ckpts.restore = spy
    report = analyze(r, "path", out=run / "analysis", alphas=(0.0, 1.0, 3))
    out["seen"] = sorted(seen)
    arrays = report.results["path"].arrays
    for key in ("alpha", "checkpoint_loss", "linear_loss", "quadratic_loss"):
      out[key] = arrays[key].tolist()
    out["steps"] = report.info["checkpoints"]
  with jaxscope.load_run(run, mesh=None) as r:
    out["one_device"] = fc1(r.checkpoints.restore(5))
  with jaxscope.load_run(run, mesh="fsdp=4") as r:
    out["fsdp4"] = fc1(r.checkpoints.restore(5))
  return out


def _drive_eight(out: Path) -> dict[str, Any]:
  """The one-device runs, then the fully sharded one, in one process of 8 devices."""
  return {**_drive_one(out), **_drive_fsdp(out)}


_DRIVERS = {4: _drive_data, 8: _drive_eight}


#: XLA flags of every run of this file but the device count: LLVM at -O0, which halves the
#: compilations that are most of these runs' time (the runs compared are compiled alike).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def _spawn(devices: int, out: Path) -> dict[str, Any]:
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(ROOT),
  }
  proc = subprocess.run(
    [sys.executable, __file__, str(devices), str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads((out / f"result{devices}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
  """The run folder and the drivers' results (one dict: their keys are distinct)."""
  out = tmp_path_factory.mktemp("sharded")
  return out, {k: v for n in _DRIVERS for k, v in _spawn(n, out).items()}


# --------------------------------------------------------------------------- comparison


def _log(run: Path) -> dict[int, dict[str, Any]]:
  """``metrics.jsonl`` merged per step (evaluation and step records)."""
  steps: dict[int, dict[str, Any]] = {}
  for line in (run / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    steps.setdefault(record["step"], {}).update(record["values"])
  return steps


def _number(v: Any) -> Any:
  return np.asarray([float(t) for t in v] if isinstance(v, list) else float(v), np.float64)


def _assert_same_run(ref: dict[int, dict[str, Any]], got: dict[int, dict[str, Any]]) -> int:
  """Every value of ``ref`` equals ``got``'s to rtol 1e-6; returns the number compared.

  Two kinds of value need an absolute part, both rounding, not layout:
  * ``{topic}/mean/{layer}`` of sums that are 0 in exact arithmetic (the softmax gradient of
    the output bias, ~1e-10): the float32 rounding of a mean is ``≤ ε Σ|vᵢ|/n ≤ ε·rms``,
    so the tolerance is ``1e-6 · rms`` with ``rms = norm/√n`` from the same step;
  * the per-example gradient histogram: its edges ``−m + k·2m/100`` from the largest
    ``|gᵢⱼ|`` carry an absolute error ``~ε·m`` (the middle edge is ~1e-8 instead of 0), so
    ``atol = 1e-6·m``; its weighted counts (about 1.1e6 entries summed in float32 by a
    scatter-add) have a single-device total off the exact 64·17226 by ~9e2 (8e-4
    relative), so the counts agree to ``2e-3`` of the total.
  """
  compared = 0
  for step, values in ref.items():
    for key, value in values.items():
      assert key in got[step], (step, key)
      want, have = _number(value), _number(got[step][key])
      np.testing.assert_array_equal(np.isfinite(want), np.isfinite(have), err_msg=key)
      finite = np.isfinite(want)
      want, have = np.where(finite, want, 0.0), np.where(finite, have, 0.0)
      atol = 0.0
      topic, _, rest = key.partition("/mean/")
      if rest:
        atol = 1e-6 * float(values[f"{topic}/norm/{rest}"]) / math.sqrt(SIZES[rest])
      if key.endswith("hist_counts"):
        atol = 2e-3 * float(np.sum(want))
      if key.endswith("hist_edges"):
        atol = 1e-6 * float(np.max(np.abs(want)))
      np.testing.assert_allclose(have, want, rtol=1e-6, atol=atol, err_msg=f"step {step} {key}")
      compared += 1
  return compared


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_data_parallel_run_equals_one_device(runs):
  out, _ = runs
  one, data = _log(out / "one"), _log(out / "data")
  assert sorted(one) == sorted(data) == [0, 1, 2, 3, 4, 5]
  assert _assert_same_run(one, data) > 300  # scope, instruments, activations, evaluation
  config = json.loads((out / "data" / "config.json").read_text())
  assert config["mesh"] == {"data": 4} and config["device_count"] == 4
  assert config["process_count"] == 1 and config["param_dtype"] == "float32"


@pytest.mark.slow
def test_fully_sharded_resumed_run_equals_one_device(runs):
  out, _ = runs
  one, fsdp = _log(out / "one"), _log(out / "fsdp")
  assert sorted(fsdp) == [0, 1, 2, 3, 4, 5]
  assert "test/loss" in fsdp[3]  # the end of the first part
  assert _assert_same_run(one, fsdp) > 300


@pytest.mark.slow
def test_resume_restores_the_sharded_layout(runs):
  restored = runs[1]["restored"]
  assert restored["same"] and all(restored["same"])
  # fc1 and fc2 kernels of params, momentum and the instruments' copies (initial params,
  # previous update): 2 · 4 leaves of ≥ 1024 elements split over fsdp.
  assert restored["fsdp_leaves"] == 8
  assert restored["fc1_shard"] == [64, 64]


@pytest.mark.slow
def test_load_run_and_analyses_keep_the_sharding(runs):
  """``load_run`` of the ``data=4,fsdp=2`` run on 8 devices restores its checkpoints in the
  run's layout, and ``analyze`` computes on them: the path's losses at θ_0, θ_mid and θ_f
  are the checkpoints' evaluations that the training logged."""
  out, results = runs
  a = results["analysis"]
  sharded = ["NamedSharding", "P(None, 'fsdp')", [64, 64]]
  assert a["mesh"] == {"data": 4, "fsdp": 2}
  assert a["seen"] == [sharded]  # every checkpoint the analysis read was sharded
  assert a["one_device"][0] == "SingleDeviceSharding" and a["one_device"][2] == [64, 128]
  assert a["fsdp4"] == ["NamedSharding", "P(None, 'fsdp')", [64, 32]]
  log = _log(out / "fsdp")
  assert a["steps"] == [0, 3, 5]
  logged = [log[s]["test/loss"] for s in a["steps"]]
  np.testing.assert_allclose(a["checkpoint_loss"], logged, rtol=1e-6)
  assert a["alpha"] == [0.0, 0.5, 1.0]
  np.testing.assert_allclose(np.asarray(a["linear_loss"])[[0, 2]], logged[::2], rtol=1e-6)
  np.testing.assert_allclose(a["quadratic_loss"], logged, rtol=1e-6)  # θ_mid at α = 0.5
  # With fewer devices than the run's 4 (this process), it is restored onto the first one.
  import jax

  import jaxscope

  if jax.device_count() < 4:
    with jaxscope.load_run(out / "data") as run:
      assert run.mesh is None
      kernel = run.checkpoints.restore(5).params["fc1"]["kernel"]
      assert kernel.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


@pytest.mark.slow
def test_fully_sharded_parameters_take_half_the_memory(runs):
  r = runs[1]
  # The partition rule by hand: kernels [64, 128] and [128, 64] split on their 128-axis;
  # out/kernel (640 elements) and the biases are replicated.
  assert r["shapes"] == {
    "['fc1']['bias']": [128],
    "['fc1']['kernel']": [64, 64],
    "['fc2']['bias']": [64],
    "['fc2']['kernel']": [64, 64],
    "['out']['bias']": [10],
    "['out']['kernel']": [64, 10],
  }
  assert r["total_bytes"] == 4 * sum(SIZES.values())
  assert r["device_bytes"] == 4 * (64 * 64 * 2 + 128 + 64 + 640 + 10)
  assert r["device_bytes"] / r["total_bytes"] < 0.53  # ≈ 1/2 with fsdp = 2
  assert r["state_device_bytes"] / r["state_total_bytes"] < 0.55  # momentum and scope too


def _whole_kernels(gathers: list[str]) -> list[str]:
  """The all-gathers (HLO result shapes) of a whole ``[64, 128]`` or ``[128, 64]`` kernel,
  with any leading axes (probes, examples)."""
  out = []
  for g in gathers:
    dims = tuple(int(d) for d in re.findall(r"\d+", g.split("[")[1].split("]")[0]))
    if dims[-2:] in ((64, 128), (128, 64)):
      out.append(g.split("{")[0])
  return out


@pytest.mark.slow
def test_metrics_add_no_all_gather(runs):
  """The fully sharded step gathers no whole kernel: not the bare step (XLA gathers the
  [16, 64] activations of the fsdp pair instead), not with the economy preset (scope and
  instruments; one more all-gather, of a replicated [128] bias-shaped leaf), and not with
  the instruments whose code used to (HVP probes, the vmap(grad) per-example route, the
  2-D histogram: 4 whole-kernel gathers before, [32, 64, 128] among them)."""
  r = runs[1]
  assert _whole_kernels(r["gathers_bare"]) == []
  assert _whole_kernels(r["gathers_scope"]) == []
  assert _whole_kernels(r["gathers_probes"]) == []
  extra = sorted(r["gathers_scope"])
  for g in r["gathers_bare"]:
    extra.remove(g)
  assert [g.split("{")[0] for g in extra] == ["f32[128]"]


@pytest.mark.slow
def test_bfloat16_parameters(runs):
  out, r = runs
  assert r["param_dtypes"] == r["trace_dtypes"] == ["bfloat16"]
  assert r["value_dtypes"] == ["float32"]
  one, bf16 = _log(out / "one"), _log(out / "bf16")
  for step, values in bf16.items():
    for key, value in values.items():
      if key in one[step]:  # non-finite only where float32 is (ratios of zero biases)
        assert np.isfinite(float(value)) == np.isfinite(float(one[step][key])), key
  config = json.loads((out / "bf16" / "config.json").read_text())
  assert config["param_dtype"] == "bfloat16" and config["dtype"] is None
  # Step 0 measures the initial parameters rounded to bf16 (8 significant bits): each
  # norm within 2⁻⁸ of the float32 one, the loss within 1 %.
  for layer in SIZES:
    key = f"params/norm/{layer}"
    np.testing.assert_allclose(bf16[0][key], one[0][key], rtol=2**-8)
  np.testing.assert_allclose(bf16[0]["loss"], one[0]["loss"], rtol=1e-2)
  assert bf16[0]["params/norm/fc1/kernel"] != one[0]["params/norm/fc1/kernel"]


@pytest.mark.slow
@pytest.mark.skipif(
  os.environ.get("JAXSCOPE_TEST_MULTIPROCESS") != "1",
  reason="two JAX processes (~40 s of CPU); set JAXSCOPE_TEST_MULTIPROCESS=1 to run",
)
def test_two_processes_equal_one_device(runs):
  """The multi-host launch: two processes of two devices each (``jax.distributed`` over
  the local coordinator, gloo collectives on CPU), one run directory."""
  import socket

  out, _ = runs
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  run = out / "two_processes"
  procs = []
  for rank in (0, 1):
    env = {
      **os.environ,
      "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE_FLAGS}",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": str(ROOT),
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(rank),
    }
    args = [*COMMON, "--mesh", "data=2,fsdp=2", "--out", str(run)]
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "jaxscope", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  for proc in procs:
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
  config = json.loads((run / "config.json").read_text())
  assert config["process_count"] == 2 and config["device_count"] == 4
  assert _assert_same_run(_log(out / "one"), _log(run)) > 300


# --------------------------------------------------------------------------- pieces


def test_mesh_option_parsing_and_errors():
  from jaxscope.run.config import TrainConfig, check_config, parse_mesh

  assert parse_mesh("data=4") == {"data": 4}
  assert parse_mesh("fsdp=2, data=2") == {"data": 2, "fsdp": 2}
  assert parse_mesh("none") is None and parse_mesh(None) is None
  assert parse_mesh({"fsdp": 8}) == {"fsdp": 8}
  for bad, says in [
    ("model=2", "unknown axis ['model']"),
    ("data=0", "positive integer"),
    ("data=2,data=2", "given twice"),
    ("data", "AXIS=SIZE"),
  ]:
    with pytest.raises(ValueError, match=re.escape(says)):
      parse_mesh(bad)
  with pytest.raises(ValueError, match="batch_size 60 is not a multiple of 8"):
    check_config(TrainConfig(batch_size=60, mesh="data=4,fsdp=2"))
  check_config(TrainConfig(batch_size=64, eval_batch_size=500, mesh="data=4,fsdp=2"))
  with pytest.raises(ValueError, match="param_dtype"):
    check_config(TrainConfig(param_dtype="float16"))


def test_partition_rule():
  from jax.sharding import PartitionSpec as P

  from jaxscope.train.sharding import leaf_spec

  assert leaf_spec((64, 256), 4) == P(None, "fsdp")
  assert leaf_spec((256, 64), 4) == P("fsdp", None)
  assert leaf_spec((64, 64), 4) == P("fsdp", None)  # the first of equal axes
  assert leaf_spec((3, 64, 256), 8) == P(None, None, "fsdp")
  assert leaf_spec((250, 64), 8) == P(None, "fsdp")  # 250 is not a multiple of 8
  assert leaf_spec((100, 30), 8) == P()  # no axis divisible
  assert leaf_spec((16, 16), 2) == P()  # 256 < MIN_SHARD_SIZE elements
  assert leaf_spec((), 2) == P() and leaf_spec((4096,), 1) == P()


def test_take_flat_is_the_flattened_gather():
  """``take_flat`` (the instruments' sampled entries, gathered without flattening a leaf)
  picks what numpy's ``reshape(-1)[indices]`` does."""
  import jax.numpy as jnp

  from jaxscope.metrics.per_example import take_flat

  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  idx = np.array([0, 7, 59, 13, 7])
  np.testing.assert_array_equal(take_flat(jnp.asarray(x), idx), x.reshape(-1)[idx])
  np.testing.assert_array_equal(take_flat(jnp.asarray(x), idx, lead=1), x.reshape(2, -1)[:, idx])
  per_example = np.array([1.0, 2.0], np.float32)  # a scalar leaf's per-example values
  np.testing.assert_array_equal(
    take_flat(jnp.asarray(per_example), [0, 0], lead=1), [[1, 1], [2, 2]]
  )
  np.testing.assert_array_equal(take_flat(jnp.float32(3.0), [0]), [3.0])


def test_make_evaluate_on_a_mesh():
  """``make_evaluate(mesh=...)`` (the loop's sharded evaluation) gives the keys and values
  of the one-device evaluation: per-token labels, against a float64 numpy reference."""
  import jax
  import jax.numpy as jnp

  from jaxscope.run.mesh import make_mesh, replicated
  from jaxscope.train import make_evaluate
  from jaxscope.train.sharding import make_sharded_evaluate

  class Table:  # logits of token t: row t of w
    def apply(self, variables: Any, x: Any, train: bool) -> tuple[Any]:
      return (variables["params"]["w"][x],)

  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 5, (7, 3)), rng.integers(0, 5, (7, 3))
  w = rng.normal(size=(5, 5))
  z = w[x] - w[x].max(-1, keepdims=True)
  nll = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(7)[:, None], np.arange(3), y]
  want = {
    "test/loss": nll.mean(),
    "test/accuracy": (w[x].argmax(-1) == y).mean(),
    "test/perplexity": np.exp(nll.mean()),
    "test/bits_per_token": nll.mean() / np.log(2.0),
  }
  params = {"w": jnp.asarray(w, jnp.float32)}
  mesh = make_mesh(f"data={jax.device_count()}")
  pinned = ({"w": replicated(mesh)}, {})
  for evaluate in (
    make_evaluate(Table(), x, y, batch_size=3),
    make_evaluate(Table(), x, y, batch_size=3, mesh=mesh),
    make_sharded_evaluate(
      Table(), x, y, task="classification", batch_size=3, mesh=mesh, shardings=pinned
    ),
  ):
    got = evaluate(params, {})
    assert sorted(got) == sorted(want)
    for key, value in want.items():
      np.testing.assert_allclose(float(got[key]), value, rtol=1e-6, err_msg=key)
  with pytest.raises(ValueError, match="shardings needs the mesh"):
    make_evaluate(Table(), x, y, shardings=pinned)


def test_mesh_needs_every_device():
  import jax

  from jaxscope.train.sharding import make_mesh

  n = jax.device_count()
  with pytest.raises(ValueError, match=f"needs {2 * n} devices, but the run has {n}"):
    make_mesh(f"data={2 * n}")
  assert dict(make_mesh(f"data={n}").shape) == {"data": n, "fsdp": 1}


def test_only_process_zero_draws_and_reports(tmp_path, monkeypatch, capsys):
  """``jaxscope train`` in a multi-process run: every process trains, process 0 alone
  draws the figures and prints the summary (the training itself is stubbed here)."""
  import jax

  import jaxscope.plot
  import jaxscope.train
  from jaxscope.cli import main
  from jaxscope.train import TrainResult

  drawn = []
  result = TrainResult(None, tmp_path, 2, {"test/loss": 0.5}, False, 0.1)
  monkeypatch.setattr(jaxscope.train, "train", lambda config: result)
  monkeypatch.setattr(
    jaxscope.plot, "save_run_plots", lambda run, out, **kw: drawn.append(out) or []
  )
  for rank in (1, 0):
    monkeypatch.setattr(jax, "process_index", lambda *a, rank=rank: rank)
    assert main(["train", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    if rank:
      assert printed == "" and drawn == []
    else:
      assert "finished at step 2" in printed and drawn == [tmp_path / "plots"]


def test_dtype_needs_a_model_that_takes_it(tmp_path):
  from jaxscope.train import train

  with pytest.raises(ValueError, match="model 'mlp' does not"):
    train(model="mlp", dataset="digits", steps=1, dtype="bfloat16", out=str(tmp_path))


if __name__ == "__main__":
  devices, target = int(sys.argv[1]), Path(sys.argv[2])
  result = _DRIVERS[devices](target)
  (target / f"result{devices}.json").write_text(json.dumps(result))
