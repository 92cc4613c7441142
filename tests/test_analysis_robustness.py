"""Tests of layer robustness against manual layer replacement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscope import analysis, data, models
from jaxscope.analysis.robustness import classify_layers, layer_robustness


@pytest.fixture(scope="module")
def trained():
  ds = data.load("digits")
  m = models.build("mlp", ds.train_x.shape[1:], ds.num_classes)
  x1 = jnp.asarray(ds.train_x[:1])
  theta = m.init(jax.random.key(0), x1)["params"]
  tx = optax.sgd(0.5)
  opt = tx.init(theta)

  def loss(p, x, y):
    out, _ = m.apply({"params": p}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  cps = [theta]
  for k in range(44):
    i = (k % 22) * 64
    g = jax.grad(loss)(theta, ds.train_x[i : i + 64], ds.train_y[i : i + 64])
    u, opt = tx.update(g, opt, theta)
    theta = optax.apply_updates(theta, u)
    if k in (21, 43):
      cps.append(theta)
  es = analysis.make_eval_set(ds.test_x, ds.test_y, batch_size=128)
  return m, ds, cps, es, x1


def _error(m, params, ds):
  out = m.apply({"params": params}, jnp.asarray(ds.test_x), train=False)[0]
  return float(np.mean(np.asarray(jnp.argmax(out, -1)) != ds.test_y))


def test_reinitialisation_matches_manual_replacement(trained):
  m, ds, cps, es, x1 = trained

  def apply_fn(p, s, x):
    return m.apply({"params": p, **s}, x, train=False)[0]

  def init_fn(key):
    return m.init(key, x1)["params"]

  res = layer_robustness(apply_fn, es, cps, [0, 22, 44], num_classes=10, init_fn=init_fn, seeds=2)
  assert res.layers == ("fc1", "fc2", "out") and res.steps == (0, 22, 44)
  assert res.error.shape == (3, 3) and res.rerandomized_error.shape == (2, 3)
  final = cps[-1]
  assert res.base_error == pytest.approx(_error(m, final, ds), abs=1e-6)
  for t, cp in enumerate(cps):
    for li, name in enumerate(res.layers):
      manual = {k: (cp[k] if k == name else final[k]) for k in final}
      assert res.error[t, li] == pytest.approx(_error(m, manual, ds), abs=1e-6), (t, name)
  fresh = init_fn(jax.random.key(2))
  manual = {k: (fresh[k] if k == "fc2" else final[k]) for k in final}
  assert res.rerandomized_error[1, 1] == pytest.approx(_error(m, manual, ds), abs=1e-6)
  assert set(res.labels.values()) <= {"ambient", "intermediate", "critical"}
  assert res.thresholds["chance_error"] == pytest.approx(0.9)
  with pytest.raises(ValueError, match="at least"):
    layer_robustness(apply_fn, es, cps[:1], num_classes=10)
  with pytest.raises(ValueError, match="2 steps for 3"):
    layer_robustness(apply_fn, es, cps, [0, 1], num_classes=10)


def test_classification_thresholds():
  labels = classify_layers(
    np.array([0.05, 0.06, 0.50, 0.85, np.nan]),
    0.05,
    ["a", "b", "c", "d", "e"],
    chance_error=0.9,
    ambient_tol=0.01,
    critical_tol=0.1,
  )
  assert labels == {
    "a": "ambient",
    "b": "ambient",
    "c": "intermediate",
    "d": "critical",
    "e": "critical",
  }
