"""Scopes: subsampling, fixed state structure, bad input, sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxscope import metrics

#: XLA's CPU backend at LLVM -O0 for the programs of this file's tests: their compilation,
#: not their run, is what the tests cost.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _params(seed=0):
  r = np.random.default_rng(seed)
  return {
    "Conv_0": {
      "kernel": jnp.asarray(r.normal(size=(3, 3, 1, 4)), jnp.float32),
      "bias": jnp.zeros(4),
    },
    "Dense_0": {"kernel": jnp.asarray(r.normal(size=(16, 3)), jnp.float32), "bias": jnp.ones(3)},
  }


def _full_scope(every=1):
  return metrics.scope(preset="full", network=["loss"], every=every)


def test_every_n_measures_only_those_steps_and_skips_leave_state_unchanged():
  params = _params()
  sc = metrics.scope(params=["norm", metrics.spectral_norm(method="power")], every=3)
  state = sc.init(params)
  step = jax.jit(lambda s, p: sc.update(s, params=p), compiler_options=FAST_COMPILE)
  measured, prev = [], state
  for k in range(7):
    p = jax.tree.map(lambda x, k=k: x * (k + 1), params)
    values, state = step(state, p)
    measured.append(bool(values["measured"]))
    if k % 3 == 0:
      np.testing.assert_allclose(
        values["params/norm/Dense_0/kernel"],
        np.linalg.norm(np.asarray(params["Dense_0"]["kernel"], np.float64)) * (k + 1),
        rtol=1e-6,
      )
    else:  # Skipped: values and metric state exactly as after the last measured step.
      jax.tree.map(np.testing.assert_array_equal, state.values, prev.values)
      jax.tree.map(np.testing.assert_array_equal, state.metric_state, prev.metric_state)
    assert int(state.count) == k + 1
    prev = state
  assert measured == [True, False, False, True, False, False, True]


def _structure(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_state_structure_fixed_from_init():
  params = _params()
  sc = _full_scope(every=2)
  s0 = sc.init(params)
  _, s1 = sc.update(s0, params=params, grads=params, updates=params, loss=jnp.float32(1.0))
  _, s2 = jax.jit(
    lambda s: sc.update(s, params=params, grads=params, updates=params, loss=1.0),
    compiler_options=FAST_COMPILE,
  )(s1)
  assert _structure(s0) == _structure(s1) == _structure(s2)

  # Under lax.scan over steps (carry must keep its structure) ...
  def body(s, k):
    g = jax.tree.map(lambda x: x * k, params)
    values, s = sc.update(s, params=params, grads=g, updates=g, loss=k)
    return s, values["grads/norm/Dense_0/kernel"]

  scan = jax.jit(lambda s, ks: jax.lax.scan(body, s, ks), compiler_options=FAST_COMPILE)
  s_end, norms = scan(s0, jnp.arange(4, dtype=jnp.float32))
  ref = np.linalg.norm(np.asarray(params["Dense_0"]["kernel"], np.float64))
  np.testing.assert_allclose(norms, [0.0, 0.0, 2 * ref, 2 * ref], rtol=1e-6)  # every=2
  assert _structure(s_end) == _structure(s0)
  # ... and through lax.cond with init and updated states as branches (optax's check).
  out = jax.jit(lambda p: jax.lax.cond(p, lambda: s0, lambda: s2))(True)
  assert _structure(out) == _structure(s0)


def test_no_retrace_across_steps():
  params = _params()
  sc = _full_scope()
  traces = []

  @jax.jit(compiler_options=FAST_COMPILE)
  def step(s, p):
    traces.append(1)
    return sc.update(s, params=p, grads=p, updates=p, loss=0.5)

  s = sc.init(params)
  for _ in range(3):
    _, s = step(s, params)
  assert len(traces) == 1


@pytest.mark.slow
def test_orbax_restore_into_init_structure(tmp_path):
  params = _params()
  sc = _full_scope()
  s0 = sc.init(params)
  update = jax.jit(  # one program (op by op, each of the full preset's conds compiles)
    lambda s: sc.update(s, params=params, grads=params, updates=params, loss=0.25),
    compiler_options=FAST_COMPILE,
  )
  _, s1 = update(s0)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "scope", s1)
  ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, sc.init(params))
  restored = ckpt.restore(tmp_path / "scope", abstract)
  assert isinstance(restored, metrics.ScopeState)
  jax.tree.map(np.testing.assert_array_equal, restored, s1)


def test_bad_input_errors_name_the_problem():
  params = _params()
  sc = metrics.scope(grads=["norm"], updates=["ratio"])
  s = sc.init(params)
  other = {"Conv_0": params["Conv_0"], "Dense_1": params["Dense_0"]}
  with pytest.raises(ValueError, match=r"grads and params have different tree structures.*Dense_1"):
    sc.update(s, params=params, grads=other, updates=params)
  with pytest.raises(ValueError, match="update\\(\\) got grads=None"):
    sc.update(s, params=params, updates=params)
  with pytest.raises(ValueError, match="needs the parameters"):
    sc.update(s, grads=params, updates=params)
  with pytest.raises(ValueError, match=r"selection include='Linear'.*Leaves are"):
    metrics.scope(grads=["norm"], include="Linear").init(params)
  with pytest.raises(TypeError, match="leaf 'Dense_0/act' is a str"):
    metrics.scope(params=["norm"]).init({"Dense_0": {"kernel": jnp.ones(2), "act": "relu"}})
  with pytest.raises(ValueError, match="needs logits="):
    ns = metrics.scope(network=["accuracy"])
    ns.update(ns.init(params))
  with pytest.raises(ValueError, match="every"):
    metrics.scope(params=["norm"], every=0)
  with pytest.raises(ValueError, match="no metric"):
    metrics.scope()
  with pytest.raises(ValueError, match="given twice"):
    metrics.scope(params=["norm", metrics.norm()])
  with pytest.raises(TypeError, match="network metric"):
    metrics.scope(params=["loss"])


def test_selection_and_kind_in_scope():
  params = _params()
  sc = metrics.scope(params=["norm"], kind="kernel", exclude="Conv")
  values, _ = sc.update(sc.init(params), params=params)
  assert sorted(values) == ["measured", "params/norm/Dense_0/kernel"]


SHARDING_SCRIPT = textwrap.dedent(
  """
  import os, sys, json
  # -O0: the programs' compilation is most of this test's time, LLVM's optimisation most of it.
  os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
  )
  import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxscope import metrics, transforms

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(32)(x))
      return nn.Dense(10)(x)

  model = MLP()
  r = np.random.default_rng(0)
  x = r.normal(size=(64, 20)).astype(np.float32)
  y = r.integers(0, 10, size=64)
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  sc = metrics.scope(preset="full", network=["loss", "accuracy"])
  tx = transforms.monitored(optax.adam(1e-2), sc)

  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits
    (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt_state = tx.update(g, opt_state, params, value=loss, logits=logits, labels=y)
    return optax.apply_updates(params, u), opt_state, transforms.monitored_metrics(opt_state)

  def run(n_dev):
    devs = np.array(jax.devices()[:n_dev])
    mesh = jax.sharding.Mesh(devs, ("data",))
    repl, dsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    f = jax.jit(step, in_shardings=(repl, repl, dsh, dsh), out_shardings=(repl, repl, repl))
    p = jax.tree.map(np.asarray, params)
    s = jax.tree.map(np.asarray, tx.init(params))
    for _ in range(3):
      p, s, m = f(p, s, x, y)
    return {k: np.asarray(v).tolist() for k, v in m.items()}

  assert len(jax.devices()) == 8
  json.dump({"one": run(1), "eight": run(8)}, sys.stdout)
  """
)


@pytest.mark.slow
def test_sharded_8_devices_matches_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True, env=env, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  import json

  res = json.loads(out.stdout)
  one, eight = res["one"], res["eight"]
  assert one.keys() == eight.keys() and len(one) > 20
  for key in one:
    a, b = np.asarray(one[key], np.float64), np.asarray(eight[key], np.float64)
    if "histogram_counts" in key:
      # Bin edges move by float rounding; a value on a boundary may change bin.
      assert np.abs(a - b).sum() <= 2, key
    else:
      np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=key)


def test_optax_tree_get_finds_scope_state():
  params = _params()
  tx = optax.named_chain(("clip", optax.clip_by_global_norm(1.0)), ("sgd", optax.sgd(0.1)))
  from jaxscope import transforms

  mon = transforms.monitored(tx, metrics.scope(grads=["norm"]))
  state = mon.init(params)
  assert isinstance(optax.tree.get(state, "jaxscope_scope"), metrics.ScopeState)


def test_static_measure_overrides_every():
  params = _params()
  sc = metrics.scope(params=["norm"], every=1)
  s0 = sc.init(params)
  v, s1 = sc.update(s0, params=params, measure=False)
  assert not bool(v["measured"]) and int(s1.count) == 1
  jax.tree.map(np.testing.assert_array_equal, s1.values, s0.values)
  v, s2 = sc.update(s1, params=params, measure=True)
  assert bool(v["measured"])
  assert _structure(s2) == _structure(s0)
  # Host-side choice with a static argument: the skipped variant holds no reduction.
  step = jax.jit(
    lambda s, p, measure: sc.update(s, params=p, measure=measure), static_argnames="measure"
  )
  hlo = step.lower(s0, params, measure=False).compile().as_text()
  assert " reduce(" not in hlo and "conditional" not in hlo
  with pytest.raises(TypeError, match="measure must be a Python bool"):
    sc.update(s0, params=params, measure=jnp.array(True))


def test_update_with_trees_other_than_init_is_named():
  params = _params()
  sc = metrics.scope(params=["norm"])
  s = sc.init(params)
  other = {"Dense_9": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"do not match the ones init\(\).*Dense_9/kernel"):
    sc.update(s, params=other)
