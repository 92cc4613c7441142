"""Analyses of checkpoints written by a plain orbax loop of one's own (issue 19, part 6).

A Flax MLP that jaxscope knows nothing about (``tests/own_model.py``) is trained a few steps
with optax on the digits, and a plain ``ocp.CheckpointManager`` saves it in three layouts:
``StandardSave({"params", "opt_state"})`` as the only, unnamed item (``default``); a flax
``TrainState`` saved whole as ``Composite(train_state=…)``; the params saved as the item.
They are restored exactly, analysed through ``jaxscope.analysis.analyze`` and
``jaxscope analyze`` (the path's end points against the loss of the saved params, computed
here with the module itself), and a wrong layout fails with a message that says what is
there and how to choose.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

import jaxscope
from jaxscope import data
from jaxscope.analysis import analyze
from jaxscope.checkpoint import (
  CheckpointLayout,
  CheckpointLayoutError,
  CheckpointWriter,
  RunCheckpoints,
)
from jaxscope.cli import main

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "checkpoints.md"
STEPS = (0, 2, 4)

#: Layout name → (what the loop saves at a step, the layout the reader finds, its options).
LAYOUTS = {
  "plain": CheckpointLayout("default", "params", None, False),
  "train_state": CheckpointLayout("train_state", "params", None, False),
  "params": CheckpointLayout("default", "", None, False),
}
OPTIONS = {"plain": {}, "train_state": {}, "params": {"params_key": ""}}


def _save(mngr, layout, step, state):
  if layout == "plain":
    args = ocp.args.StandardSave({"params": state.params, "opt_state": state.opt_state})
  elif layout == "train_state":
    args = ocp.args.Composite(train_state=ocp.args.StandardSave(state))
  else:
    args = ocp.args.StandardSave(state.params)
  mngr.save(step, args=args)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
  """The user's loop: an MLP trained 4 Adam steps on the digits, checkpointed at steps 0,
  2 and 4 in each layout; returns the directories, the saved params and the dataset."""
  sys.path.insert(0, str(HERE))
  import own_model

  root = tmp_path_factory.mktemp("own")
  ds = data.load("digits")
  model = own_model.MLP()
  params = model.init(jax.random.key(0), jnp.asarray(ds.train_x[:1]))["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))

  @jax.jit
  def step(state, x, y):
    def loss(p):
      logits = state.apply_fn({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  managers = {
    name: ocp.CheckpointManager(root / name, options=ocp.CheckpointManagerOptions(create=True))
    for name in LAYOUTS
  }
  saved = {}
  for s in range(STEPS[-1] + 1):
    if s in STEPS:
      saved[s] = jax.device_get(state.params)
      for name, mngr in managers.items():
        _save(mngr, name, s, state)
    state = step(state, ds.train_x[64 * s : 64 * (s + 1)], ds.train_y[64 * s : 64 * (s + 1)])
  for mngr in managers.values():
    mngr.wait_until_finished()
    mngr.close()
  return {name: root / name for name in LAYOUTS}, saved, ds


def _test_loss(params, ds):
  """The mean test cross-entropy of ``params``, with the module itself (the reference)."""
  import own_model

  logits = own_model.MLP().apply({"params": params}, jnp.asarray(ds.test_x))
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, ds.test_y).mean())


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- restoring


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_is_found_and_restored_exactly(loop, layout):
  dirs, saved, _ = loop
  with RunCheckpoints(dirs[layout], **OPTIONS[layout]) as ckpts:
    assert ckpts.steps == list(STEPS)
    assert ckpts.layout == LAYOUTS[layout]
    assert ckpts.directory == dirs[layout]  # the manager's own folder, no checkpoints/
    for s in STEPS:
      ckpt = ckpts.restore(s)
      _assert_trees_equal(ckpt.params, saved[s])
      assert ckpt.model_state == {} and ckpt.meta == {"step": s} == ckpts.meta(s)
    assert [c.step for c in ckpts.iter()] == list(STEPS)
    leaves = dict(ckpts.leaves(4))
    assert sorted(leaves) == ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]
    np.testing.assert_array_equal(leaves["Dense_0/kernel"], saved[4]["Dense_0"]["kernel"])
    abstract = ckpts.abstract_params()
    assert abstract["Dense_0"]["kernel"] == jax.ShapeDtypeStruct((64, 16), jnp.float32)
    assert ckpts.abstract_model_state() == {}


def test_restore_places_the_arrays_as_asked(loop):
  dirs, saved, _ = loop
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with RunCheckpoints(dirs["train_state"]) as ckpts:
    ckpt = ckpts.restore(2, sharding={"params": one})
  assert all(x.sharding == one for x in jax.tree.leaves(ckpt.params))
  _assert_trees_equal(ckpt.params, saved[2])


def test_batch_stats_and_meta_beside_the_params(tmp_path):
  """A variables dict saved with a JSON record: the statistics come back as model_state."""
  variables = {
    "params": {"bn": {"scale": jnp.ones(3)}},
    "batch_stats": {"bn": {"mean": jnp.arange(3.0), "var": jnp.full(3, 2.0)}},
  }
  with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True)) as m:
    for step in (0, 5):
      m.save(
        step,
        args=ocp.args.Composite(
          variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave({"epoch": step})
        ),
      )
    m.wait_until_finished()
  with RunCheckpoints(tmp_path) as ckpts:
    assert ckpts.layout == CheckpointLayout("variables", "params", "batch_stats", True)
    ckpt = ckpts.restore(5)
    _assert_trees_equal(ckpt.model_state, {"batch_stats": variables["batch_stats"]})
    assert ckpt.meta == {"epoch": 5}
    assert [n for n, _ in ckpts.leaves(0, collection="model_state")] == [
      "batch_stats/bn/mean",
      "batch_stats/bn/var",
    ]
  with RunCheckpoints(tmp_path, model_state_key="none") as ckpts:
    assert ckpts.restore(0).model_state == {}


def test_jaxscopes_own_layout_is_found_first(tmp_path):
  writer = CheckpointWriter(tmp_path / "checkpoints")
  state = {"params": {"w": jnp.ones(2)}, "model_state": {}, "opt_state": {"mu": jnp.ones(2)}}
  writer.save(0, state, {"step": 0, "epoch": 0.0})
  writer.close()
  with RunCheckpoints(tmp_path) as ckpts:
    assert ckpts.layout == CheckpointLayout("state", "params", "model_state", True)
    assert ckpts.restore(0).meta == {"step": 0, "epoch": 0.0}


def test_a_wrong_layout_says_what_is_there_and_how_to_choose(loop):
  dirs, _, _ = loop
  with pytest.raises(CheckpointLayoutError) as e:  # The params saved as the item itself.
    RunCheckpoints(dirs["params"])
  text = str(e.value)
  assert "'default'" in text and "['Dense_0', 'Dense_1']" in text
  assert "params_key=" in text and "--params-key" in text and "'state'" in text
  with pytest.raises(ValueError, match=r"no parameters at 'weights'.*\['opt_state', 'params'\]"):
    RunCheckpoints(dirs["plain"], params_key="weights")
  with pytest.raises(ValueError, match=r"item='state' is not in .*items are \['default'\]"):
    RunCheckpoints(dirs["plain"], item="state")
  with pytest.raises(ValueError, match=r"model_state_key='stats' is not in item"):
    RunCheckpoints(dirs["plain"], model_state_key="stats")
  with pytest.raises(ValueError, match="params_key must be"):
    RunCheckpoints(dirs["plain"], params_key=3)


# ------------------------------------------------------------------------------ analyses


@pytest.fixture(scope="module")
def api_report(loop, tmp_path_factory):
  dirs, _, _ = loop
  with jaxscope.load_run(dirs["plain"], model="own_model:MLP", dataset="digits") as run:
    assert run.task == "classification" and run.checkpoints.steps == list(STEPS)
    return analyze(run, "path", alphas=(0.0, 1.0, 3), out=tmp_path_factory.mktemp("api"))


def test_api_path_ends_at_the_saved_params_losses(loop, api_report):
  _, saved, ds = loop
  paths = api_report.results["path"].value
  want = [_test_loss(saved[s], ds) for s in STEPS]
  np.testing.assert_allclose(paths["linear"].loss[[0, -1]], [want[0], want[-1]], rtol=1e-5)
  np.testing.assert_allclose(paths["quadratic"].loss, want, rtol=1e-5)  # through θ_mid at 0.5
  assert api_report.info["model"] == "own_model:MLP" and api_report.info["dataset"] == "digits"
  assert {f.name for f in api_report.files} >= {"path.npz", "path.json"}


CLI_RUNS = {
  "train_state": ["--model", "own_model:MLP"],
  "params": ["--model", "own_model:make_mlp", "--model-args", "hidden=16", "--params-key", ""],
}


@pytest.mark.parametrize("layout", list(CLI_RUNS))
def test_cli_analyses_a_train_state_and_bare_params(loop, tmp_path, monkeypatch, layout):
  dirs, saved, ds = loop
  monkeypatch.syspath_prepend(str(HERE))
  want = [_test_loss(saved[s], ds) for s in (STEPS[0], STEPS[-1])]
  flags = CLI_RUNS[layout]
  argv = ["analyze", str(dirs[layout]), "path", "--dataset", "digits", "--alphas", "0:1:2"]
  assert main([*argv, *flags, "--out", str(tmp_path), "-q"]) == 0
  assert (tmp_path / "path.json").is_file() and (tmp_path / "path.png").is_file()
  np.testing.assert_allclose(np.load(tmp_path / "path.npz")["linear_loss"], want, rtol=1e-5)
  meta = json.loads((tmp_path / "path.json").read_text())
  assert meta["model"] == flags[1] and meta["checkpoints"] == list(STEPS)


def test_cli_wrong_params_key_is_a_clear_error(loop, capsys, monkeypatch):
  dirs, _, _ = loop
  monkeypatch.syspath_prepend(str(HERE))
  argv = ["analyze", str(dirs["plain"]), "path", "--model", "own_model:MLP", "--dataset", "digits"]
  with pytest.raises(SystemExit) as e:
    main([*argv, "--params-key", "weights"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "jaxscope analyze: error:" in err and "no parameters at 'weights'" in err
  assert "['opt_state', 'params']" in err and "--params-key" in err


def test_load_run_errors_name_the_argument(loop, monkeypatch):
  dirs, _, _ = loop
  monkeypatch.syspath_prepend(str(HERE))
  d = dirs["plain"]
  with jaxscope.load_run(d) as run:
    with pytest.raises(ValueError, match=r"config\.json.*pass model="):
      run.model  # noqa: B018
    with pytest.raises(ValueError, match=r"config\.json.*pass dataset="):
      run.dataset  # noqa: B018
  cases = {
    "no_such_module_xyz:MLP": r"model 'no_such_module_xyz:MLP': cannot import module",
    "own_model:Nope": r"model 'own_model:Nope': own_model has no attribute 'Nope'",
    "own_model:NOT_A_MODEL": r"model 'own_model:NOT_A_MODEL' is a int; expected a flax",
    "no_zoo_model": r"model 'no_zoo_model': Unknown model name",
  }
  for spec, match in cases.items():
    with jaxscope.load_run(d, model=spec, dataset="digits") as run:
      with pytest.raises(ValueError, match=match):
        run.model  # noqa: B018
  with jaxscope.load_run(d, model="own_model:MLP", dataset="digits", model_args={"x": 1}) as run:
    with pytest.raises(ValueError, match=r"MLP\(\*\*model_args\) failed.*'x': 1"):
      run.model  # noqa: B018
  with pytest.raises(ValueError, match="task must be"):
    jaxscope.load_run(d, task="ranking")


def test_python_objects_are_models_too(loop):
  import own_model

  dirs, _, ds = loop
  for model in (own_model.MLP, own_model.MLP(), own_model.make_mlp):
    with jaxscope.load_run(dirs["plain"], model=model, dataset="digits") as run:
      assert run.config["model"].startswith("own_model:")
      logits, state = run.model.apply(
        {"params": run.checkpoints.restore(0).params}, jnp.asarray(ds.test_x[:3]), train=False
      )
      assert logits.shape == (3, 10) and state == {}


@pytest.mark.slow
def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
  """docs/checkpoints.md: my_loop.py, then its Python and command-line analyses, as shown."""
  blocks = re.findall(r"```(python|bash)\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
  loop_code = next(c for k, c in blocks if k == "python" and c.startswith("# my_loop.py"))
  api_code = next(c for k, c in blocks if k == "python" and "load_run" in c)
  command = shlex.split(next(c for k, c in blocks if k == "bash").splitlines()[0])
  (tmp_path / "my_loop.py").write_text(loop_code)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "my_loop", raising=False)
  runpy.run_path("my_loop.py", run_name="__main__")
  exec(compile(api_code, str(DOC), "exec"), {"__name__": "docs_example"})
  out = capsys.readouterr().out
  layout = "CheckpointLayout(item='default', params='params', model_state=None, meta=False)"
  assert f"[0, 10, 20] {layout}" in out
  assert (tmp_path / "runs/my-loop/analysis/path.json").is_file()
  assert command[:3] == ["PYTHONPATH=.", "jaxscope", "analyze"]
  assert main([*command[2:], "--out", "cli", "-q"]) == 0
  assert (tmp_path / "cli" / "path.npz").is_file()
  sys.modules.pop("my_loop", None)


def test_recorded_data_dir_of_an_embedded_set_gives_no_warning(tmp_path):
  """A run trained on an embedded set with --data-dir recorded that directory; reading the
  run's dataset back warned that an embedded set reads no files (the warning belongs to
  the training command, once). An explicit data_dir= still warns."""
  import warnings

  import jaxscope

  config = {"dataset": "sine", "data_dir": str(tmp_path / "nowhere")}
  config["data_args"] = {"num_train": 8, "num_test": 4}
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "metrics.jsonl").write_text('{"step":0,"values":{"loss":1.0}}\n')
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert jaxscope.load_run(tmp_path).dataset.train_x.shape == (8, 1)
  with pytest.warns(UserWarning, match="is embedded and reads no files"):
    assert jaxscope.load_run(tmp_path, data_dir=tmp_path).dataset.num_classes == 1
