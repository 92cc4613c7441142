"""Tests of jaxscope.checkpoint: reading a run's orbax checkpoints read-only."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscope.checkpoint import (
  Checkpoint,
  CheckpointWriter,
  DamagedCheckpointWarning,
  RunCheckpoints,
)
from jaxscope.run import load_run
from jaxscope.train import TrainState, make_evaluate, train
from jaxscope.tree import path_name


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("mlp") / "run"
  result = train(
    model="mlp",
    dataset="digits",
    steps=6,
    batch_size=64,
    checkpoint_every=2,
    eval_every=2,  # so that every checkpoint's eval_loss is measured at its own step
    metrics="none",
    out=str(out),
    quiet=True,
  )
  return result


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
  """A run with BatchNorm statistics in model_state (and a list in params), written by the
  training loop's own checkpointer, without the cost of compiling a BatchNorm model."""
  run_dir = tmp_path_factory.mktemp("bn") / "run"
  rng = np.random.default_rng(0)

  def arrays(scale):
    params = {
      "conv": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32)},
      "blocks": [{"kernel": rng.normal(size=(4, 4)).astype(np.float32)} for _ in range(2)],
    }
    stats = {"bn": {"mean": np.full(4, scale, np.float32), "var": np.ones(4, np.float32)}}
    return jax.tree.map(jnp.asarray, params), {"batch_stats": jax.tree.map(jnp.asarray, stats)}

  tx = optax.sgd(0.1, momentum=0.9)
  ckpt = CheckpointWriter(run_dir / "checkpoints", None)
  states = {}
  for step in (0, 3):
    params, model_state = arrays(float(step))
    states[step] = TrainState(jnp.asarray(step, jnp.int32), params, model_state, tx.init(params))
    ckpt.save(step, states[step], {"step": step, "epoch": step / 3})
  ckpt.close()
  return run_dir, states


def _damaged_copy(run_dir: Path, dest: Path, step: int) -> Path:
  """A copy of the run whose checkpoint ``step`` has its array data truncated.

  The data lie in OCDBT files under ``state/d/`` (the merged root, which inlines values
  under 1 KiB) and ``state/ocdbt.process_0/d/``; all of them are cut to 10 bytes.
  """
  shutil.copytree(run_dir, dest)
  data = [f for f in (dest / "checkpoints" / str(step) / "state").rglob("*") if f.is_file()]
  chunks = [f for f in data if f.parent.name == "d"]
  assert chunks
  for f in chunks:
    with open(f, "r+b") as fh:
      fh.truncate(10)
  return dest


def _snapshot(root: Path) -> dict:
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (pa, xa), (_, xb) in zip(la, lb, strict=True):
    xa, xb = np.asarray(xa), np.asarray(xb)
    assert xa.dtype == xb.dtype and xa.shape == xb.shape, path_name(pa)
    assert np.array_equal(xa, xb), path_name(pa)


def test_steps_config_meta(mlp_run):
  with load_run(mlp_run.run_dir) as run:
    ckpts = run.checkpoints
    assert ckpts.steps == [0, 2, 4, 6]
    assert run.config["model"] == "mlp" and run.config["steps_per_epoch"] == 22
    assert "steps=[0, 2, 4, 6]" in repr(ckpts)
    meta = ckpts.meta(4)
    assert meta["step"] == 4
    assert meta["epoch"] == pytest.approx(4 / 22)
    assert {"wall_time", "eval_loss", "eval_accuracy"} <= set(meta)
    metas = ckpts.metas()
    assert sorted(metas) == [0, 2, 4, 6]
    assert metas[6]["eval_loss"] == pytest.approx(mlp_run.final_eval["test/loss"])
    assert [metas[s]["wall_time"] for s in ckpts.steps] == sorted(
      metas[s]["wall_time"] for s in ckpts.steps
    )


def test_restore_last_equals_final_state(mlp_run):
  with RunCheckpoints(mlp_run.run_dir) as ckpts:
    ckpt = ckpts.restore(6)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.step == 6 and ckpt.meta["step"] == 6
    assert ckpt.model_state == {}
    _assert_trees_equal(ckpt.params, mlp_run.state.params)
    assert ckpt.variables == {"params": ckpt.params}
    assert ckpts.restore().step == 6  # None: the newest readable step.
    # The accepted alternative: the checkpoints folder itself.
  with RunCheckpoints(mlp_run.run_dir / "checkpoints") as ckpts:
    assert ckpts.run_dir == mlp_run.run_dir and load_run(ckpts.run_dir).config["model"] == "mlp"


def test_step0_is_the_init(mlp_run):
  with load_run(mlp_run.run_dir) as run:
    ckpts = run.checkpoints
    model, ds = run.model, run.dataset
    init = model.init(jax.random.key(run.config["seed"]), ds.train_x[:1])
    _assert_trees_equal(ckpts.restore(0).params, init["params"])
    abstract = ckpts.abstract_params()
    assert jax.tree.structure(abstract) == jax.tree.structure(init["params"])
    for s, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(init["params"]), strict=True):
      assert isinstance(s, jax.ShapeDtypeStruct) and (s.shape, s.dtype) == (x.shape, x.dtype)
    assert ckpts.abstract_model_state(0) == {}


def test_leaves_stream_the_params(mlp_run):
  with RunCheckpoints(mlp_run.run_dir) as ckpts:
    got = list(ckpts.leaves(6))
    assert list(ckpts.leaves(6, collection="model_state")) == []
    with pytest.raises(ValueError, match="collection"):
      ckpts.leaves(6, collection="opt_state")
  want = jax.tree_util.tree_flatten_with_path(mlp_run.state.params)[0]
  assert [n for n, _ in got] == [path_name(p) for p, _ in want]
  assert got[0][0] == "fc1/bias" and "fc1/kernel" in dict(got)
  for (_, a), (_, b) in zip(got, want, strict=True):
    assert isinstance(a, np.ndarray) and a.dtype == b.dtype
    assert np.array_equal(a, np.asarray(b))


def test_model_and_dataset_reproduce_eval_loss(mlp_run):
  with load_run(mlp_run.run_dir) as run:
    ckpts = run.checkpoints
    ds, config = run.dataset, run.config
    evaluate = make_evaluate(
      run.model, ds.test_x, ds.test_y, task=config["task"], batch_size=config["eval_batch_size"]
    )
    seen = []
    for ckpt in ckpts.iter():
      loss = float(evaluate(ckpt.params, ckpt.model_state)["test/loss"])
      assert loss == pytest.approx(ckpt.meta["eval_loss"], abs=1e-5)
      seen.append(ckpt.step)
    assert seen == [0, 2, 4, 6]
    assert [c.step for c in ckpts.iter([6, 0])] == [6, 0]
    assert run.dataset is ds  # cached


def test_batchnorm_run(bn_run):
  run_dir, states = bn_run
  with RunCheckpoints(run_dir) as ckpts:
    assert ckpts.steps == [0, 3] and load_run(run_dir).config == {}
    for step, state in states.items():
      ckpt = ckpts.restore(step)
      assert set(ckpt.model_state) == {"batch_stats"}
      _assert_trees_equal(ckpt.params, state.params)
      _assert_trees_equal(ckpt.model_state, state.model_state)
      assert ckpt.meta == {"step": step, "epoch": step / 3}
    names = [n for n, _ in ckpts.leaves(3)]
    assert names == ["blocks/0/kernel", "blocks/1/kernel", "conv/kernel"]
    got = dict(ckpts.leaves(3, collection="model_state"))
    assert sorted(got) == ["batch_stats/bn/mean", "batch_stats/bn/var"]
    assert np.array_equal(got["batch_stats/bn/mean"], np.full(4, 3.0, np.float32))
    abstract = ckpts.abstract_model_state()
    assert abstract["batch_stats"]["bn"]["mean"] == jax.ShapeDtypeStruct((4,), jnp.float32)


@pytest.mark.slow
def test_damaged_step_is_skipped(mlp_run, tmp_path, capfd):
  run_dir = _damaged_copy(mlp_run.run_dir, tmp_path / "run", 2)
  hook = sys.unraisablehook
  absl_level = logging.getLogger("absl").level
  with RunCheckpoints(run_dir) as ckpts:
    assert ckpts.steps == [0, 2, 4, 6]  # still listed by orbax
    with pytest.warns(DamagedCheckpointWarning, match=r"checkpoint 2 .*damaged"):
      got = [c.step for c in ckpts.iter()]
    assert got == [0, 4, 6]
    with pytest.raises(ValueError, match=r"checkpoint 2 .*damaged"):
      ckpts.restore(2)
    with pytest.raises(ValueError, match="damaged"):
      list(ckpts.leaves(2))
    assert ckpts.readable_steps() == [0, 4, 6]
    assert ckpts.meta(2)["step"] == 2  # the JSON record survived
  assert sys.unraisablehook is hook
  assert logging.getLogger("absl").level == absl_level
  err = capfd.readouterr().err
  assert "Exception ignored" not in err and "never retrieved" not in err


def test_restore_none_falls_back_from_a_damaged_last_step(mlp_run, tmp_path):
  run_dir = _damaged_copy(mlp_run.run_dir, tmp_path / "run", 6)
  (run_dir / "checkpoints" / "4" / "state" / "_METADATA").unlink()  # metadata gone too
  with RunCheckpoints(run_dir) as ckpts:
    with pytest.warns(DamagedCheckpointWarning) as record:
      ckpt = ckpts.restore()
    assert ckpt.step == 2
    assert [str(w.message).split(" in ")[0] for w in record] == [
      "RunCheckpoints: checkpoint 6",
      "RunCheckpoints: checkpoint 4",
    ]
    assert "metadata is missing" in str(record[1].message)
    assert ckpts.abstract_params() is not None  # from the newest step with metadata (6)


def test_read_only(mlp_run):
  before = _snapshot(mlp_run.run_dir)
  with RunCheckpoints(mlp_run.run_dir) as ckpts:
    ckpts.restore(2)
    list(ckpts.leaves(4))
    ckpts.meta(0)
  assert _snapshot(mlp_run.run_dir) == before


def test_reload_sees_new_steps(mlp_run, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(mlp_run.run_dir, run_dir)
  shutil.move(run_dir / "checkpoints" / "6", tmp_path / "six")
  with RunCheckpoints(run_dir) as ckpts:
    assert ckpts.steps == [0, 2, 4]
    shutil.move(tmp_path / "six", run_dir / "checkpoints" / "6")  # the run writes step 6
    assert ckpts.steps == [0, 2, 4]
    ckpts.reload()
    assert ckpts.steps == [0, 2, 4, 6] and ckpts.restore().step == 6


def test_errors(mlp_run, tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    RunCheckpoints(tmp_path / "nope")
  with pytest.raises(ValueError, match=r"has no checkpoints.*checkpoint_every"):
    RunCheckpoints(tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match=r"has no checkpoints.*checkpoint_every"):
    RunCheckpoints(tmp_path)
  ckpts = RunCheckpoints(mlp_run.run_dir)
  with pytest.raises(ValueError, match=r"step 3 .*available steps: \[0, 2, 4, 6\]"):
    ckpts.restore(3)
  with pytest.raises(ValueError, match=r"available steps"):
    ckpts.meta(-1)
  with pytest.raises(ValueError, match=r"available steps"):
    ckpts.iter([0, 5])  # checked before reading anything
  with pytest.raises(ValueError, match=r"available steps"):
    ckpts.leaves(1)
  ckpts.close()
  ckpts.close()
  with pytest.raises(ValueError, match="closed"):
    ckpts.restore(0)


def test_no_config(mlp_run, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(mlp_run.run_dir, run_dir)
  (run_dir / "config.json").unlink()
  with load_run(run_dir) as run:
    ckpts = run.checkpoints
    assert run.config == {}
    assert ckpts.restore(0).step == 0
    with pytest.raises(ValueError, match=r"config\.json"):
      run.model  # noqa: B018
    with pytest.raises(ValueError, match=r"config\.json"):
      run.dataset  # noqa: B018


SHARDED_RESTORE_SCRIPT = textwrap.dedent(
  """
  import os, sys, json
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxscope.checkpoint import CheckpointWriter, RunCheckpoints

  run_dir = sys.argv[1]
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  r = np.random.default_rng(0)
  params = {"dense": {"kernel": r.normal(size=(16, 32)).astype(np.float32),
                      "bias": r.normal(size=(32,)).astype(np.float32)}}
  stats = {"batch_stats": {"bn": {"mean": r.normal(size=(32,)).astype(np.float32)}}}
  fsdp = {"dense": {"kernel": NamedSharding(mesh, P(None, "fsdp")),
                    "bias": NamedSharding(mesh, P("fsdp"))}}
  sharded = jax.tree.map(jax.device_put, params, fsdp)
  w = CheckpointWriter(os.path.join(run_dir, "checkpoints"))
  w.save(0, {"params": sharded, "model_state": stats}, {"step": 0})
  w.close()
  out = {}
  with RunCheckpoints(run_dir) as ck:
    plain = ck.restore(0)
    out["default"] = [str(x.sharding) for x in jax.tree.leaves(plain.params)]
    c = ck.restore(0, sharding={"params": fsdp})
    pairs = zip(jax.tree.leaves(c.params), jax.tree.leaves(fsdp))
    out["kept"] = [x.sharding == s for x, s in pairs]
    out["shards"] = [len(x.addressable_shards) for x in jax.tree.leaves(c.params)]
    out["shard_shape"] = list(c.params["dense"]["kernel"].addressable_shards[0].data.shape)
    out["equal"] = all(np.array_equal(np.asarray(a), b) for a, b in
                       zip(jax.tree.leaves(c.params), jax.tree.leaves(params)))
    out["state_default"] = str(jax.tree.leaves(c.model_state)[0].sharding)
    repl = NamedSharding(mesh, P())
    d = ck.restore(0, sharding=repl)
    out["replicated"] = all(x.sharding == repl for x in jax.tree.leaves((d.params, d.model_state)))
    out["iter"] = [c2.params["dense"]["bias"].sharding == fsdp["dense"]["bias"]
                   for c2 in ck.iter(sharding={"params": fsdp})]
    errors = []
    bads = ({"params": {"dense": {"kernel": repl}}}, {"opt_state": repl},
            {"params": {"dense": {"kernel": repl, "bias": 3}}})
    for bad in bads:
      try:
        ck.restore(0, sharding=bad)
      except ValueError as e:
        errors.append(str(e))
    out["errors"] = errors
  json.dump(out, sys.stdout)
  """
)


def test_restore_keeps_a_runs_sharding(tmp_path):
  # A fully sharded state (8 simulated devices, 2 x 4 mesh) restores with the run's
  # shardings when given, and on the first device otherwise.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", SHARDED_RESTORE_SCRIPT, str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert all("SingleDeviceSharding" in s for s in out["default"])
  assert out["kept"] == [True, True] and out["shards"] == [8, 8]
  assert out["shard_shape"] == [16, 8]  # the kernel's columns split over the 4 fsdp devices
  assert out["equal"] and "SingleDeviceSharding" in out["state_default"]
  assert out["replicated"] and out["iter"] == [True]
  assert len(out["errors"]) == 3
  assert "do not match" in out["errors"][0] and "opt_state" in out["errors"][1]
  assert "jax.sharding.Sharding leaves" in out["errors"][2]


def test_zero_size_arrays_round_trip(tmp_path):
  """orbax cannot save arrays of size 0 (the preconditioner's rank-0 factor of a
  one-element leaf made `--optimizer adaptive_sgd` on a 1-output model exit 2)."""
  from jaxscope.checkpoint import CheckpointWriter

  state = {
    "w": jnp.arange(6.0).reshape(2, 3),
    "U": {"bias": jnp.zeros((0, 1)), "kernel": jnp.ones((1, 4))},
    "i": jnp.zeros((0,), jnp.int32),
  }
  writer = CheckpointWriter(tmp_path / "ckpt")
  writer.save(5, state, {"step": 5})
  writer.close()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  reader = CheckpointWriter(tmp_path / "ckpt")
  index, got, meta = reader.restore_latest([target])
  reader.close()
  assert index == 0 and meta == {"step": 5}
  assert jax.tree.structure(got) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
