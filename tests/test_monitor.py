"""transforms.monitored: transparency, composition with optax, metrics() access."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxscope import metrics, transforms


def _params():
  r = np.random.default_rng(1)
  return {
    "Dense_0": {"kernel": jnp.asarray(r.normal(size=(5, 4)), jnp.float32), "bias": jnp.ones(4)},
    "Dense_1": {"kernel": jnp.asarray(r.normal(size=(4, 2)), jnp.float32), "bias": jnp.ones(2)},
  }


def _grads(params, k=1.0):
  return jax.tree.map(lambda x: jnp.sin(x * 3.0 + k), params)


def _economy():
  return metrics.scope(preset="economy", network=["loss"])


@pytest.mark.slow
def test_updates_are_those_of_the_inner_optimizer():
  params = _params()
  inner = optax.adam(1e-2)
  tx = transforms.monitored(inner, _economy())
  s_in, s_mon = inner.init(params), tx.init(params)
  p_in = p_mon = params
  for k in range(5):
    u_in, s_in = jax.jit(inner.update)(_grads(p_in, k), s_in, p_in)
    u_mon, s_mon = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.float32(1.0)))(
      _grads(p_mon, k), s_mon, p_mon
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), u_in, u_mon)
    p_in, p_mon = optax.apply_updates(p_in, u_in), optax.apply_updates(p_mon, u_mon)


@pytest.mark.slow
def test_topics_are_bound_to_grads_updates_params():
  params = _params()
  lr = 0.05
  tx = transforms.monitored(optax.sgd(lr), _economy())
  state = tx.init(params)
  g = _grads(params)
  _, state = tx.update(g, state, params, value=jnp.float32(2.5))
  m = transforms.monitored_metrics(state)
  gk = np.asarray(g["Dense_0"]["kernel"], np.float64)
  pk = np.asarray(params["Dense_0"]["kernel"], np.float64)
  np.testing.assert_allclose(m["grads/norm/Dense_0/kernel"], np.linalg.norm(gk), rtol=1e-6)
  np.testing.assert_allclose(m["updates/norm/Dense_0/kernel"], lr * np.linalg.norm(gk), rtol=1e-6)
  np.testing.assert_allclose(m["updates/mean/Dense_0/kernel"], -lr * gk.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["params/variance/Dense_0/kernel"], pk.var(), rtol=1e-6)
  np.testing.assert_allclose(
    m["updates/ratio/Dense_0/kernel"],
    lr * np.linalg.norm(gk) / np.linalg.norm(pk),
    rtol=1e-5,
  )
  assert float(m["loss"]) == 2.5
  assert bool(m["measured"])


@pytest.mark.slow
def test_composes_with_chain_inject_hyperparams_and_multisteps():
  params = _params()
  sc = _economy()
  variants = {
    "chain": optax.chain(optax.clip_by_global_norm(1.0), transforms.monitored(optax.sgd(0.1), sc)),
    "inject_inside": transforms.monitored(
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), sc
    ),
    "inject_outside": optax.inject_hyperparams(
      lambda learning_rate: transforms.monitored(optax.sgd(learning_rate), sc)
    )(learning_rate=0.1),
    "multisteps": optax.MultiSteps(transforms.monitored(optax.sgd(0.1), sc), every_k_schedule=2),
  }
  for name, tx in variants.items():
    state = tx.init(params)

    @jax.jit
    def step(p, s, k, tx=tx):
      g = _grads(p, k)
      u, s = tx.update(g, s, p, value=k)
      return optax.apply_updates(p, u), s, transforms.monitored_metrics(s)

    p = params
    for k in range(4):
      if k == 2:
        p_before = p
      p, state, m = step(p, state, jnp.float32(k))
      assert "updates/ratio/Dense_1/kernel" in m, name
    assert np.isfinite(float(m["updates/norm/Dense_0/kernel"])), name
    assert float(m["loss"]) == 3.0, name
    if name == "multisteps":
      # The inner optimizer ran on mini-steps 2 and 4; on step 4 it saw the mean of the
      # gradients of steps 3 and 4, taken at the same parameters (step 3 applied zero).
      g = (
        _grads(p_before, 2.0)["Dense_0"]["kernel"] + _grads(p_before, 3.0)["Dense_0"]["kernel"]
      ) / 2
      np.testing.assert_allclose(
        m["grads/norm/Dense_0/kernel"], np.linalg.norm(np.asarray(g, np.float64)), rtol=1e-5
      )
  # inject_hyperparams: the learning rate can be changed between steps and shows in updates.
  tx = variants["inject_inside"]
  s = tx.init(params)
  s = optax.tree.set(s, learning_rate=0.2)
  _, s = tx.update(_grads(params), s, params, value=0.0)
  g = np.asarray(_grads(params)["Dense_0"]["kernel"], np.float64)
  np.testing.assert_allclose(
    transforms.monitored_metrics(s)["updates/norm/Dense_0/kernel"],
    0.2 * np.linalg.norm(g),
    rtol=1e-6,
  )


def test_plain_transform_and_extra_args():
  params = _params()
  tx = transforms.monitored(optax.scale_by_adam(), metrics.scope(grads=["norm"]))
  s = tx.init(params)
  _, s = tx.update(_grads(params), s, params, value=1.0, unrelated=3)  # extras are dropped
  assert "grads/norm/Dense_0/kernel" in transforms.monitored_metrics(s)


@pytest.mark.slow
def test_state_stable_under_cond_and_dtype_preserved():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  tx = transforms.monitored(optax.adam(1e-3), metrics.scope(preset="full", every=2))
  s0 = tx.init(params)
  u, s1 = jax.jit(tx.update)(_grads(params), s0, params)
  assert jax.tree.structure(s0) == jax.tree.structure(s1)
  assert [x.dtype for x in jax.tree.leaves(s0)] == [x.dtype for x in jax.tree.leaves(s1)]
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  out = jax.jit(lambda c: jax.lax.cond(c, lambda: s0, lambda: s1))(False)
  assert jax.tree.structure(out) == jax.tree.structure(s0)


@pytest.mark.slow
def test_converges_on_parabola():
  params = {"w": jnp.array([3.0, -2.0])}
  tx = transforms.monitored(optax.sgd(0.1), metrics.scope(grads=["norm"], every=5))
  s = tx.init(params)
  for _ in range(100):
    g = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    u, s = tx.update(g, s, params)
    params = optax.apply_updates(params, u)
  np.testing.assert_allclose(params["w"], 0.0, atol=1e-6)


def test_nnx_optimizer():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(
    model, transforms.monitored(optax.sgd(0.1), metrics.scope(grads=["norm"])), wrt=nnx.Param
  )
  x = jnp.ones((4, 3))

  @nnx.jit
  def step(model, opt):
    _loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, g)
    return transforms.monitored_metrics(opt.opt_state), g

  m, g = step(model, opt)
  np.testing.assert_allclose(
    m["grads/norm/kernel"], np.linalg.norm(np.asarray(g["kernel"][...], np.float64)), rtol=1e-6
  )


def test_metrics_errors():
  with pytest.raises(ValueError, match="no jaxscope scope"):
    transforms.monitored_metrics(optax.sgd(0.1).init({"w": jnp.ones(2)}))
  params = {"w": jnp.ones(2)}
  sc = metrics.scope(grads=["norm"])
  two = optax.chain(
    transforms.monitored(optax.sgd(0.1), sc), transforms.monitored(optax.sgd(0.1), sc)
  )
  # Two monitors are read together (issue 20), each under its position in the tree ...
  got = transforms.monitored_metrics(two.init(params))
  assert sorted(got) == [
    "measured",
    "monitor0/grads/norm/w",
    "monitor0/measured",
    "monitor1/grads/norm/w",
    "monitor1/measured",
  ]
  # ... or its name; one name for two is an error.
  same = optax.chain(
    transforms.monitored(optax.sgd(0.1), sc, name="a"),
    transforms.monitored(optax.sgd(0.1), sc, name="a"),
  )
  with pytest.raises(ValueError, match="several monitors are named 'a'"):
    transforms.monitored_metrics(same.init(params))
  with pytest.raises(ValueError, match="name must be None or a str"):
    transforms.monitored(optax.sgd(0.1), sc, name="a/b")
  ratio = transforms.monitored(optax.sgd(0.1), metrics.scope(updates=["ratio"]))
  with pytest.raises(ValueError, match=r"tx.update\(grads, opt_state, params\)"):
    ratio.update(params, ratio.init(params))


def test_monitored_forwards_static_measure():
  params = _params()
  tx = transforms.monitored(optax.sgd(0.1), metrics.scope(grads=["norm"], every=1))
  s = tx.init(params)
  _, s = tx.update(_grads(params), s, params, measure=False)
  assert not bool(transforms.monitored_metrics(s)["measured"])
  _, s = tx.update(_grads(params), s, params, measure=True)
  assert bool(transforms.monitored_metrics(s)["measured"])
