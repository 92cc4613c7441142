"""Moment statistics evaluated for all layers at once (jaxscope.metrics.moments) against
numpy float64 and against the per-layer evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope import metrics
from jaxscope.metrics import moments
from jaxscope.tree import path_name

RNG = np.random.default_rng(3)

NUMPY = {
  "mean": lambda x: x.mean(),
  "sum": lambda x: x.sum(),
  "variance": lambda x: x.var(),
  "norm": lambda x: np.sqrt(np.sum(x**2)),
  "rms": lambda x: np.sqrt(np.mean(x**2)),
}


def _params():
  """Layers of every kind the batched path meets: a plain kernel, a zero bias, a layer whose
  mean dominates its spread (the second pass), a stacked leaf, and a scalar."""
  return {
    "Dense_0": {
      "kernel": RNG.normal(size=(30, 7)).astype(np.float32),
      "bias": np.zeros(7, np.float32),
    },
    "LayerNorm_0": {"scale": (1.0 + 1e-3 * RNG.normal(size=(64,))).astype(np.float32)},
    "blocks": {"kernel": (RNG.normal(size=(3, 5, 4)) + np.arange(3)[:, None, None] * 1e3)},
    "temperature": np.float32(-1.7),
  }


def _leaves64(tree, stacked=False):
  """``{layer name: float64 vector}``, the stacked leaf split per layer when asked."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = path_name(path)
    x = np.asarray(x, np.float64)
    if stacked and name.startswith("blocks/"):
      for i in range(x.shape[0]):
        out[f"blocks/{i}/{name.split('/', 1)[1]}"] = x[i].reshape(-1)
    else:
      out[name] = x.reshape(-1)
  return out


def _run(sc, params, **trees):
  state = sc.init(params)
  values, _ = jax.jit(lambda s, p, t: sc.update(s, params=p, **t))(state, params, trees)
  return values


@pytest.mark.parametrize("stacked", [None, {"^blocks/": 0}])
def test_batched_moments_match_numpy_float64(stacked):
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), _params())
  sc = metrics.scope(params=list(NUMPY), stacked=stacked)
  values = _run(sc, params)
  ref = _leaves64(params, stacked=stacked is not None)
  assert len(ref) == (7 if stacked else 5)
  for layer, x in ref.items():
    for name, fn in NUMPY.items():
      # Variances of a mean-dominated layer are exact only through the second pass: the
      # one-pass form loses every digit of the LayerNorm scale's 1e-6 variance.
      got = float(values[f"params/{name}/{layer}"])
      np.testing.assert_allclose(got, fn(x), rtol=2e-4, atol=1e-9, err_msg=f"{name} {layer}")


def test_batched_equals_the_per_layer_evaluation():
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), _params())
  grads = jax.tree.map(lambda x: RNG.normal(size=np.shape(x)).astype(np.float32), params)
  updates = jax.tree.map(lambda x: (0.01 * x).astype(np.float32), grads)
  names = ["mean", "sum", "norm", "rms", "ratio", metrics.variance(ddof=1)]
  sc = metrics.scope(updates=names, depth=-1)
  values = _run(sc, params, updates=updates)
  groups = {
    "Dense_0": ["kernel", "bias"],
    "LayerNorm_0": ["scale"],
    "blocks": ["kernel"],
  }
  for layer, leaves in groups.items():
    u = {k: updates[layer][k] for k in leaves}
    p = {k: params[layer][k] for k in leaves}
    for m in ["mean", "sum", "norm", "rms", "ratio"]:
      metric = metrics.registry.get(m)
      want = metrics.evaluate(metric, u, reference=p)
      np.testing.assert_allclose(values[f"updates/{m}/{layer}"], want, rtol=1e-6, err_msg=m)
    want = metrics.evaluate(metrics.variance(ddof=1), u)
    np.testing.assert_allclose(values[f"updates/variance/{layer}"], want, rtol=1e-5)


def test_one_layer_needing_the_second_pass_leaves_the_others_exact():
  # Only the first layer's mean dominates; the others keep their one-pass values, and a
  # NaN layer stays NaN without spoiling the rest.
  tree = {
    "a": (1e4 + RNG.normal(size=(200,))).astype(np.float32),
    "b": RNG.normal(size=(50,)).astype(np.float32),
    "c": np.array([1.0, np.nan, 2.0], np.float32),
  }
  values = _run(metrics.scope(params=["variance", "mean"]), tree)
  var64 = {k: np.var(v.astype(np.float64)) for k, v in tree.items()}
  np.testing.assert_allclose(values["params/variance/a"], var64["a"], rtol=1e-3)
  np.testing.assert_allclose(values["params/variance/b"], var64["b"], rtol=1e-5)
  assert np.isnan(values["params/variance/c"]) and np.isnan(values["params/mean/c"])


def test_variance_of_too_few_elements_is_nan():
  tree = {"one": np.ones((1,), np.float32), "two": np.array([1.0, 3.0], np.float32)}
  values = _run(metrics.scope(params=[metrics.variance(ddof=1)]), tree)
  assert np.isnan(values["params/variance/one"])
  np.testing.assert_allclose(values["params/variance/two"], 2.0)


def test_economy_compiles_to_one_guard_per_topic():
  # The per-layer evaluation compiled one `conditional` per variance (24 on a 4-layer MLP);
  # the batched one guards each topic's second pass with one (plus one per layer inside it).
  params = {f"Dense_{i}": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)} for i in range(4)}
  sc = metrics.scope(preset="economy")
  state = sc.init(params)
  fn = jax.jit(lambda s, p, g, u: sc.update(s, params=p, grads=g, updates=u))
  hlo = fn.lower(state, params, params, params).compile().as_text()
  entry = hlo[hlo.index("ENTRY") :]
  assert entry.count(" conditional(") == 3


def test_moments_names_its_sums():
  with pytest.raises(ValueError, match="unknown sum"):
    metrics.base.moments(("s3",), lambda s, n: s["s3"])
  assert moments.batched(metrics.norm()) and not moments.batched(metrics.norm(1))
  assert not moments.batched(metrics.ratio_to_params("new"))
