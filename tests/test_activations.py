"""Activation metrics against numpy float64, and the activations/layer_grads scope topics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxscope import capture, metrics
from jaxscope.metrics import registry


def _ev(metric, *arrays):
  m = metric
  leaves = [jnp.asarray(a, jnp.float32) for a in arrays]
  value, _ = m.apply(leaves, m.init([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]), None)
  return float(value)


def _np_dead(x, t=0.0):
  x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  return float(np.mean(np.all(x <= t, axis=0)))


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_std_matches_numpy_population_std():
  x = _rng().normal(3.0, 0.5, size=(8, 5))
  assert _ev(metrics.activation_std(), x) == pytest.approx(np.std(x), rel=1e-5)
  conv = _rng(1).normal(size=(4, 3, 3, 6))
  assert _ev(metrics.activation_std(), conv) == pytest.approx(np.std(conv), rel=1e-5)
  # Large mean, small spread: still accurate.
  big = 1000.0 + _rng(2).normal(0.0, 0.01, size=(16, 8))
  assert _ev(metrics.activation_std(), big) == pytest.approx(np.std(big), rel=1e-2)
  assert metrics.activation_std().name == "std"


def test_dead_fraction_cases():
  m = metrics.dead_fraction()
  x = _rng().normal(size=(6, 10))
  x[:, [1, 4, 7]] = -np.abs(x[:, [1, 4, 7]])  # Three dead units.
  x[:, 7] = 0.0  # Exactly 0 counts as dead (<= threshold).
  x[0, 2] = 5.0
  x[1:, 2] = -1.0  # Alive in one example only: not dead.
  assert _ev(m, x) == pytest.approx(_np_dead(x)) == pytest.approx(0.3)
  assert _ev(m, -np.abs(x) - 1e-3) == 1.0  # All dead.
  assert _ev(m, np.abs(x) + 1e-3) == 0.0  # None dead.
  # Conv-shaped [B, H, W, C]: a channel is dead only if dead at every position.
  c = _rng(3).normal(size=(2, 4, 4, 5))
  c[..., 0] = -1.0
  c[..., 3] = -1.0
  c[1, 2, 2, 3] = 0.5  # One positive position: channel 3 alive.
  assert _ev(m, c) == pytest.approx(_np_dead(c)) == pytest.approx(0.2)
  # Threshold.
  assert _ev(metrics.dead_fraction(0.5), x) == pytest.approx(_np_dead(x, 0.5))


def test_saturation_fraction_matches_numpy():
  x = _rng(4).normal(0.0, 2.0, size=(7, 3, 9))
  for t in (3.0, 0.99):
    ref = float(np.mean(np.abs(x) > t))
    assert _ev(metrics.saturation_fraction(t), x) == pytest.approx(ref, rel=1e-6)
  assert _ev(metrics.saturation_fraction(), np.zeros((2, 3))) == 0.0
  with pytest.raises(ValueError, match="threshold"):
    metrics.saturation_fraction(-1.0)


def test_nonfinite_values_do_not_crash_and_follow_the_documented_rules():
  x = -np.ones((4, 5))
  x[0, 0] = np.nan  # Unit 0: NaN compares false -> not dead.
  x[1, 1] = np.inf  # Unit 1: +Inf > 0 -> alive; saturated.
  x[2, 2] = -np.inf  # Unit 2: -Inf <= 0 -> dead; saturated.
  assert _ev(metrics.dead_fraction(), x) == pytest.approx(3 / 5)
  assert _ev(metrics.saturation_fraction(1.5), x) == pytest.approx(2 / 20)
  assert np.isnan(_ev(metrics.activation_std(), x))


def test_registry_names():
  assert registry.get("std").name == "std"
  assert registry.get("dead_fraction", threshold=0.1).name == "dead_fraction"
  assert registry.get("saturation_fraction").name == "saturation_fraction"


# ---------------------------------------------------------------- scope end to end


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(x)


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(Block()(x))
    return nn.Dense(3)(x)


def _xent(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _setup():
  r = _rng(5)
  x = jnp.asarray(r.normal(size=(8, 6)), jnp.float32)
  y = jnp.asarray(r.integers(0, 3, size=8), jnp.int32)
  model = Model()
  params = model.init(jax.random.key(0), x)["params"]
  # Kill two hidden units: their pre-activations are negative for every example.
  k = params["Block_0"]["Dense_0"]["kernel"].at[:, :2].set(0.0)
  params["Block_0"]["Dense_0"] = {"kernel": k, "bias": jnp.array([-1.0, -2.0, 0.5, 0.5])}

  def loss(p, x, y):
    return _xent(model.apply({"params": p}, x), y)

  return params, x, y, loss


@pytest.mark.slow
def test_scope_end_to_end_with_capture_in_jit():
  params, x, y, loss = _setup()
  sc = metrics.scope(
    params=["norm"], activations=["std", "dead_fraction"], layer_grads=["norm"], kind="kernel"
  )
  assert sc.topics == ("params", "activations", "layer_grads")
  _, _, cap = jax.eval_shape(lambda p: capture.value_and_grad(loss)(p, x, y), params)
  state = sc.init(params, activations=cap.outputs, layer_grads=cap.grads)

  @jax.jit
  def step(state, params, x, y):
    _, _, cap = capture.value_and_grad(loss)(params, x, y)
    values, state = sc.update(state, params=params, activations=cap.outputs, layer_grads=cap.grads)
    return values, state, cap

  values, state, cap = step(state, params, x, y)
  assert sorted(values) == [
    "activations/dead_fraction/Block_0/Dense_0",
    "activations/dead_fraction/Dense_0",
    "activations/std/Block_0/Dense_0",
    "activations/std/Dense_0",
    "layer_grads/norm/Block_0/Dense_0",
    "layer_grads/norm/Dense_0",
    "measured",
    "params/norm/Block_0/Dense_0/kernel",
    "params/norm/Dense_0/kernel",
  ]
  # Independent numpy reference from the parameters.
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = (
    np.asarray(x, np.float64) @ p["Block_0"]["Dense_0"]["kernel"] + p["Block_0"]["Dense_0"]["bias"]
  )
  logits = np.maximum(h, 0) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  z = np.exp(logits - logits.max(1, keepdims=True))
  g_out = (z / z.sum(1, keepdims=True) - np.eye(3)[np.asarray(y)]) / 8
  g_h = (g_out @ p["Dense_0"]["kernel"].T) * (h > 0)
  tol = dict(rel=1e-5, abs=1e-6)
  assert float(values["activations/std/Block_0/Dense_0"]) == pytest.approx(np.std(h), **tol)
  assert float(values["activations/std/Dense_0"]) == pytest.approx(np.std(logits), **tol)
  assert float(values["activations/dead_fraction/Block_0/Dense_0"]) == pytest.approx(0.5)
  assert float(values["activations/dead_fraction/Block_0/Dense_0"]) == _np_dead(h)
  assert float(values["layer_grads/norm/Dense_0"]) == pytest.approx(np.linalg.norm(g_out), **tol)
  assert float(values["layer_grads/norm/Block_0/Dense_0"]) == pytest.approx(
    np.linalg.norm(g_h), **tol
  )


def test_scope_selection_depth_and_errors():
  params, x, y, loss = _setup()
  _, _, cap = jax.eval_shape(lambda p: capture.value_and_grad(loss)(p, x, y), params)
  sc = metrics.scope(activations=["std"], include="Block")
  state = sc.init(activations=cap.outputs)
  assert sorted(state.values) == ["activations/std/Block_0/Dense_0"]
  sc = metrics.scope(activations=["std"], depth=1)
  assert sorted(sc.init(activations=cap.outputs).values) == [
    "activations/std/Block_0",
    "activations/std/Dense_0",
  ]
  sc = metrics.scope(activations=["std"], layer_grads=["norm"])
  with pytest.raises(ValueError, match=r"init\(activations=...\)"):
    sc.init(params)
  with pytest.raises(ValueError, match=r"init\(layer_grads=...\)"):
    sc.init(params, activations=cap.outputs)
  with pytest.raises(ValueError, match=r"ratio.*cannot measure 'activations'"):
    metrics.scope(activations=["ratio"])
  with pytest.raises(ValueError, match="matches no layer"):
    metrics.scope(activations=["std"], include="nope").init(activations=cap.outputs)
  with pytest.raises(TypeError, match="expected a dict"):
    metrics.scope(activations=["std"]).init(activations=[jnp.ones(3)])
  sc = metrics.scope(activations=["std"])
  state = sc.init(activations=cap.outputs)
  with pytest.raises(ValueError, match="update\\(\\) got activations=None"):
    sc.update(state)
