"""bfloat16 leaves: metrics accumulate in float32; the realised update beside the intended."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscope import metrics


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "fc1": {
      "kernel": (0.3 * jax.random.normal(k1, (32, 48))).astype(jnp.bfloat16),
      "bias": (0.1 * jax.random.normal(k2, (48,))).astype(jnp.bfloat16),
    },
    "ln": {"scale": jnp.ones((48,), jnp.bfloat16)},
  }


@pytest.mark.slow
def test_bf16_moments_spectral_histogram_against_float64():
  params = _params()
  sc = metrics.scope(
    params=["norm", "mean", "variance", "max_abs", "spectral_norm", metrics.histogram(16)]
  )
  vals, _ = jax.jit(sc.update)(sc.init(params), params=params)
  up = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  ref, _ = jax.jit(sc.update)(sc.init(up), params=up)
  for name, leaf in (("fc1/kernel", params["fc1"]["kernel"]), ("fc1/bias", params["fc1"]["bias"])):
    x = np.asarray(leaf.astype(jnp.float32), np.float64)  # exact upcast
    assert vals[f"params/norm/{name}"].dtype == jnp.float32
    np.testing.assert_allclose(vals[f"params/norm/{name}"], np.linalg.norm(x), rtol=1e-5)
    np.testing.assert_allclose(vals[f"params/mean/{name}"], x.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(vals[f"params/variance/{name}"], x.var(), rtol=1e-4)
    np.testing.assert_allclose(vals[f"params/max_abs/{name}"], np.abs(x).max(), rtol=0)
    # The bf16 histogram is the float32 one of the upcast leaf, and numpy's up to elements
    # that sit exactly on an edge (bf16 values are coarse; edges are float32).
    for part in ("counts", "edges"):
      key = f"params/histogram_{part}/{name}"
      np.testing.assert_array_equal(vals[key], ref[key])
    counts, edges = np.histogram(x, bins=16)
    assert int(vals[f"params/histogram_counts/{name}"].sum()) == x.size
    assert np.abs(np.asarray(vals[f"params/histogram_counts/{name}"]) - counts).max() <= 1
    np.testing.assert_allclose(vals[f"params/histogram_edges/{name}"], edges, rtol=1e-6)
  w = np.asarray(params["fc1"]["kernel"].astype(jnp.float32), np.float64)
  np.testing.assert_allclose(
    vals["params/spectral_norm/fc1/kernel"], np.linalg.svd(w, compute_uv=False)[0], rtol=1e-5
  )


def test_realised_ratio_and_lost_fraction_bf16():
  params = _params()
  # An update that lands on most kernel elements but on no element of the scale (1.0 has
  # bf16 spacing 2^-7 above and 2^-8 below: 1e-3 rounds back to 1.0).
  updates = {
    "fc1": {
      "kernel": jnp.full((32, 48), 0.02, jnp.float32),
      "bias": jnp.zeros((48,), jnp.float32),
    },
    "ln": {"scale": jnp.full((48,), 1e-3, jnp.float32)},
  }
  sc = metrics.scope(updates=["ratio", "realised_ratio", "lost_fraction"])
  vals, _ = jax.jit(sc.update)(sc.init(params), params=params, updates=updates)
  new = optax.apply_updates(params, updates)  # what a train step stores
  for name in ("fc1/kernel", "ln/scale"):
    p = np.asarray(_get(params, name).astype(jnp.float32), np.float64)
    q = np.asarray(_get(new, name).astype(jnp.float32), np.float64)
    u = np.asarray(_get(updates, name), np.float64)
    assert _get(new, name).dtype == jnp.bfloat16
    np.testing.assert_allclose(
      vals[f"updates/realised_ratio/{name}"], np.linalg.norm(q - p) / np.linalg.norm(p), rtol=1e-5
    )
    np.testing.assert_allclose(
      vals[f"updates/ratio/{name}"], np.linalg.norm(u) / np.linalg.norm(p), rtol=1e-5
    )
    lost = np.sum((u != 0) & (q == p)) / max(np.sum(u != 0), 1)
    np.testing.assert_allclose(vals[f"updates/lost_fraction/{name}"], lost, rtol=1e-6)
  assert float(vals["updates/realised_ratio/ln/scale"]) == 0.0
  assert float(vals["updates/lost_fraction/ln/scale"]) == 1.0
  assert float(vals["updates/ratio/ln/scale"]) > 1e-4  # the intended update is not zero
  assert float(vals["updates/lost_fraction/fc1/bias"]) == 0.0  # no non-zero update
  assert 0.0 <= float(vals["updates/lost_fraction/fc1/kernel"]) < 0.5


def test_realised_equals_intended_in_float32():
  params = jax.tree.map(lambda x: x.astype(jnp.float32), _params())
  updates = jax.tree.map(lambda x: 1e-2 * jnp.ones_like(x), params)
  sc = metrics.scope(updates=["ratio", "realised_ratio", "lost_fraction"])
  vals, _ = sc.update(sc.init(params), params=params, updates=updates)
  np.testing.assert_allclose(
    vals["updates/realised_ratio/fc1/kernel"], vals["updates/ratio/fc1/kernel"], rtol=1e-4
  )
  assert float(vals["updates/lost_fraction/fc1/kernel"]) == 0.0
  nan = jax.tree.map(lambda u: u.at[(0,) * u.ndim].set(jnp.nan), updates)
  vals, _ = sc.update(sc.init(params), params=params, updates=nan)
  assert np.isnan(vals["updates/realised_ratio/fc1/kernel"])  # reported, not hidden


def _get(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def test_lost_updates_diagnosed():
  from jaxscope import diagnose

  steps = np.arange(0, 40)
  hist = {
    "updates/lost_fraction/ln/scale": (steps, np.full(40, 1.0)),
    "updates/lost_fraction/fc1/kernel": (steps, np.full(40, 0.1)),
    "updates/realised_ratio/ln/scale": (steps, np.zeros(40)),
    "updates/ratio/ln/scale": (steps, np.full(40, 4.5e-5)),
    "updates/ratio/fc1/kernel": (steps, np.full(40, 1e-3)),
  }
  found = [f for f in diagnose.diagnose(hist) if f.name == "lost_updates"]
  assert len(found) == 1
  ev = found[0].evidence
  assert ev["layers"] == ["ln/scale"]
  assert ev["values"]["realised_ratio/ln/scale"] == 0.0
  assert ev["values"]["intended_ratio/ln/scale"] == 4.5e-5
  assert found[0].advice and "float32" in found[0].advice[0]
  hist["updates/lost_fraction/ln/scale"] = (steps, np.full(40, 0.3))
  assert not [f for f in diagnose.diagnose(hist) if f.name == "lost_updates"]
  assert not [f for f in diagnose.diagnose(hist, lost_fraction=0.5) if f.name == "lost_updates"]
  assert [f for f in diagnose.diagnose(hist, lost_fraction=0.2) if f.name == "lost_updates"]


def test_infinite_realised_ratio_of_a_zero_bias_is_not_a_divergence():
  from jaxscope import diagnose

  steps = np.arange(0, 20)
  ratio = np.full(20, 0.5)
  ratio[0] = np.inf  # a bias initialised at zero: x/0 at the first step
  hist = {
    "loss": (steps, np.linspace(2.0, 1.0, 20)),
    "updates/realised_ratio/attn/key/bias": (steps, ratio),
  }
  assert not [f for f in diagnose.diagnose(hist) if f.name == "divergence"]


def test_tree_products_in_float32_and_hvp_of_bf16_params():
  from jaxscope.metrics.base import tree_norm, tree_vdot
  from jaxscope.metrics.hvp import jvp_grad, value_grad_and_hvp

  params = _params()
  ones = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params)
  flat = np.concatenate(
    [np.asarray(x.astype(jnp.float32), np.float64).ravel() for x in jax.tree.leaves(params)]
  )
  assert tree_vdot(params, ones).dtype == jnp.float32
  np.testing.assert_allclose(tree_vdot(params, ones), flat.sum(), rtol=1e-5)
  np.testing.assert_allclose(tree_norm(params), np.linalg.norm(flat), rtol=1e-5)
  w = params["fc1"]["kernel"]
  loss = lambda p: 0.5 * jnp.sum(jnp.square(p.astype(jnp.float32)))  # noqa: E731  H = I
  t = jnp.ones((2, *w.shape), jnp.float32)  # float32 probes against bf16 parameters
  _, hv, _ = jvp_grad(jax.grad(loss), w, t)
  np.testing.assert_allclose(np.asarray(hv, np.float32), 1.0)
  _, _, hvp = value_grad_and_hvp(loss, w)
  np.testing.assert_allclose(np.asarray(hvp(t[0]), np.float32), 1.0)
