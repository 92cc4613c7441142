"""Every statistic against an independent numpy float64 reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope import metrics

RNG = np.random.default_rng(0)


def _tree():
  """A tree with a dense kernel, a conv kernel, biases and a scalar."""
  return {
    "Conv_0": {
      "kernel": RNG.normal(size=(3, 3, 2, 4)).astype(np.float32),
      "bias": RNG.normal(size=(4,)).astype(np.float32),
    },
    "Dense_0": {
      "kernel": RNG.normal(size=(20, 7)).astype(np.float32) * 0.3,
      "bias": np.zeros(7, np.float32),
    },
    "temperature": np.float32(1.7),
  }


def _per_leaf(tree, fn):
  """numpy float64 reference per leaf name."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  from jaxscope.tree import path_name

  return {path_name(p): fn(np.asarray(x, np.float64).reshape(-1)) for p, x in flat}


def _scope_values(sc, tree, **kw):
  state = sc.init(tree)
  values, _ = jax.jit(lambda s, t: sc.update(s, params=t, **kw))(state, tree)
  return values


REFERENCES = {
  "mean": lambda x: x.mean(),
  "sum": lambda x: x.sum(),
  "variance": lambda x: x.var(),
  "norm": lambda x: np.linalg.norm(x, 2),
  "norm1": lambda x: np.abs(x).sum(),
  "norminf": lambda x: np.abs(x).max(),
  "rms": lambda x: np.sqrt(np.mean(x**2)),
  "max_abs": lambda x: np.abs(x).max(),
  "zero_fraction": lambda x: np.mean(x == 0),
  "nonfinite_fraction": lambda x: np.mean(~np.isfinite(x)),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_statistic_matches_numpy_float64(name):
  tree = _tree()
  values = _scope_values(metrics.scope(params=[name]), tree)
  ref = _per_leaf(tree, REFERENCES[name])
  assert len(ref) == 5
  for layer, expected in ref.items():
    got = float(values[f"params/{name}/{layer}"])
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7, err_msg=layer)


def test_variance_ddof_and_single_element():
  x = RNG.normal(size=(10, 3)).astype(np.float32)
  got = metrics.evaluate(metrics.variance(ddof=1), x)
  np.testing.assert_allclose(got, np.var(x.astype(np.float64), ddof=1), rtol=1e-6)
  # One element with ddof=1 is undefined: NaN, not a crash.
  assert np.isnan(metrics.evaluate(metrics.variance(ddof=1), jnp.ones(1)))
  with pytest.raises(ValueError, match="ddof"):
    metrics.variance(ddof=-1)


def test_grouped_layer_is_one_flat_vector():
  tree = _tree()
  values = _scope_values(metrics.scope(params=["variance", "norm"], depth=-1), tree)
  x = np.concatenate([np.ravel(tree["Conv_0"]["bias"]), np.ravel(tree["Conv_0"]["kernel"])]).astype(
    np.float64
  )
  np.testing.assert_allclose(values["params/variance/Conv_0"], x.var(), rtol=2e-6)
  np.testing.assert_allclose(values["params/norm/Conv_0"], np.linalg.norm(x), rtol=2e-6)
  assert "params/norm/temperature" in values  # a top-level leaf is its own group


@pytest.mark.slow
def test_update_weight_ratio_both_denominators():
  tree = _tree()
  upd = jax.tree.map(lambda x: (RNG.normal(size=np.shape(x)) * 1e-2).astype(np.float32), tree)
  sc = metrics.scope(
    updates=[
      metrics.ratio_to_params("new"),
      metrics.elementwise_ratio("old"),
      metrics.ratio_to_params("old"),
    ]
  )
  values, _ = sc.update(sc.init(tree), params=tree, updates=upd)
  for p, u, name in [
    (tree["Dense_0"]["kernel"], upd["Dense_0"]["kernel"], "Dense_0/kernel"),
    (tree["Conv_0"]["kernel"], upd["Conv_0"]["kernel"], "Conv_0/kernel"),
  ]:
    p64, u64 = p.astype(np.float64), u.astype(np.float64)
    np.testing.assert_allclose(
      values[f"updates/ratio_new/{name}"],
      np.linalg.norm(u64) / np.linalg.norm(p64 + u64),
      rtol=1e-5,
    )
    np.testing.assert_allclose(
      values[f"updates/ratio/{name}"], np.linalg.norm(u64) / np.linalg.norm(p64), rtol=1e-5
    )
    np.testing.assert_allclose(
      values[f"updates/elementwise_ratio/{name}"], np.mean(np.abs(u64 / p64)), rtol=1e-5
    )
  # Dense_0/bias is all zero: ‖θ_new‖ = ‖Δθ‖ > 0 for "new" → ratio 1 exactly.
  np.testing.assert_allclose(values["updates/ratio_new/Dense_0/bias"], 1.0, rtol=1e-6)
  assert float(values["updates/ratio/Dense_0/bias"]) == np.inf  # ‖θ_old‖ = 0 < ‖Δθ‖
  # Element-wise ratio leaves out zero parameters: all zero → 0.
  assert float(values["updates/elementwise_ratio/Dense_0/bias"]) == 0.0
  old = metrics.ratio_to_params("old")
  zero = jnp.zeros(3)
  assert float(metrics.evaluate(old, jnp.ones(3), reference=zero)) == np.inf
  assert float(metrics.evaluate(old, zero, reference=zero)) == 0.0
  np.testing.assert_allclose(
    metrics.evaluate(old, jnp.array([3.0, 4.0]), reference=jnp.array([0.0, 10.0])), 0.5
  )
  # Partially zero parameters: only the non-zero ones count.
  np.testing.assert_allclose(
    metrics.evaluate(
      metrics.elementwise_ratio(), jnp.array([1.0, 2.0, 3.0]), reference=jnp.array([0.0, 4.0, -2.0])
    ),
    (0.5 + 1.5) / 2,
  )


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [False, True])
def test_histogram_matches_numpy(fixed):
  x = RNG.normal(size=(50, 40)).astype(np.float32)
  rng_ = (-1.5, 2.0) if fixed else None
  out = metrics.evaluate(metrics.histogram(16, range=rng_), x)
  edges = np.asarray(out["edges"], np.float64)
  lo, hi = (x.min(), x.max()) if rng_ is None else rng_
  np.testing.assert_allclose(edges, np.linspace(lo, hi, 17), rtol=1e-6, atol=1e-6)
  ref, _ = np.histogram(x.astype(np.float64), bins=16, range=(lo, hi))
  counts = np.asarray(out["counts"])
  assert counts.dtype == np.int32
  assert counts.sum() == ref.sum()  # out-of-range values are not counted, as numpy
  # Float32 vs float64 bin boundaries may move a value by one bin at most.
  assert np.abs(counts - ref).sum() <= 2


@pytest.mark.slow
def test_histogram_edge_cases():
  const = metrics.evaluate(metrics.histogram(4), jnp.full((5,), 2.0))
  np.testing.assert_allclose(const["edges"], np.linspace(1.5, 2.5, 5))
  assert np.asarray(const["counts"]).tolist() == [0, 0, 5, 0]
  bad = metrics.evaluate(metrics.histogram(4), jnp.array([np.nan, np.inf, -np.inf]))
  assert np.asarray(bad["counts"]).sum() == 0
  mixed = metrics.evaluate(metrics.histogram(2), jnp.array([0.0, 1.0, np.nan, np.inf]))
  assert np.asarray(mixed["counts"]).tolist() == [1, 1]  # max falls in the closed last bin
  with pytest.raises(ValueError, match="bins"):
    metrics.histogram(0)
  with pytest.raises(ValueError, match="range"):
    metrics.histogram(4, range=(1.0, 1.0))


def _np_sigma(x):
  m = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  return np.linalg.svd(m, compute_uv=False)


def test_spectral_norm_exact_matches_numpy_svd():
  tree = _tree()
  values = _scope_values(metrics.scope(params=[metrics.spectral_norm(method="svd")]), tree)
  assert "params/spectral_norm/Dense_0/bias" not in values  # rank-1 leaves are left out
  for name, x in [
    ("Conv_0/kernel", tree["Conv_0"]["kernel"]),
    ("Dense_0/kernel", tree["Dense_0"]["kernel"]),
  ]:
    np.testing.assert_allclose(values[f"params/spectral_norm/{name}"], _np_sigma(x)[0], rtol=1e-5)


@pytest.mark.slow
def test_power_iteration_converges_across_steps():
  # A known spectrum with gap σ₂/σ₁ = 0.8: error shrinks by 0.64 per step.
  u, _ = np.linalg.qr(RNG.normal(size=(300, 200)))
  v, _ = np.linalg.qr(RNG.normal(size=(200, 200)))
  svals = np.concatenate([[10.0, 8.0], np.linspace(6.0, 0.1, 198)])
  w = ((u * svals) @ v.T).astype(np.float32)
  sigma = _np_sigma(w)[0]
  np.testing.assert_allclose(sigma, 10.0, rtol=1e-5)
  # Plain power iteration, as the default was before issue 18: no warm-up, no extra
  # iterations (the residual check), one iteration per step.
  plain = metrics.spectral_norm(method="power", iters=1, warmup_iters=0, max_iters=1)
  sc = metrics.scope(params=[plain])
  params = {"Dense_0": {"kernel": jnp.asarray(w)}}
  state = sc.init(params)
  step = jax.jit(lambda s: sc.update(s, params=params))
  estimates = []
  for _ in range(60):
    values, state = step(state)
    estimates.append(float(values["params/spectral_norm/Dense_0/kernel"]))
  assert estimates[0] < sigma * 0.999  # one step from a random start is not enough
  assert all(e <= sigma * (1 + 1e-5) for e in estimates)  # a lower bound
  assert all(b >= a * (1 - 1e-5) for a, b in itertools.pairwise(estimates))
  np.testing.assert_allclose(estimates[-1], sigma, rtol=2e-3)


@pytest.mark.slow
def test_power_iteration_survives_a_nan_step():
  w = jnp.asarray(RNG.normal(size=(40, 30)).astype(np.float32))
  v0 = jnp.ones(40) / np.sqrt(40)
  s_nan, v_nan = metrics.power_iteration(w.at[0, 0].set(jnp.nan), v0, 3)
  assert np.isnan(s_nan)
  np.testing.assert_array_equal(v_nan, v0)  # warm start kept, not poisoned
  s_zero, v_zero = metrics.power_iteration(jnp.zeros((4, 3)), jnp.ones(4) / 2.0, 2)
  assert float(s_zero) == 0.0 and np.all(np.isfinite(v_zero))


def test_condition_number_is_ratio_not_product():
  # Known singular values 5, 2, 0.5: κ = 10 (ikkuna's bug would give 2.5).
  u, _ = np.linalg.qr(RNG.normal(size=(6, 3)))
  v, _ = np.linalg.qr(RNG.normal(size=(3, 3)))
  w = (u * np.array([5.0, 2.0, 0.5])) @ v.T
  np.testing.assert_allclose(
    metrics.evaluate(metrics.condition_number(), w.astype(np.float32)), 10.0, rtol=1e-4
  )
  singular = np.outer(np.arange(1.0, 5.0), np.ones(3)).astype(np.float32)
  assert float(metrics.evaluate(metrics.condition_number(), singular)) > 1e6  # rank 1
  assert float(metrics.evaluate(metrics.condition_number(), np.zeros((3, 3), np.float32))) == np.inf
  assert np.isnan(metrics.evaluate(metrics.condition_number(), np.full((3, 3), np.nan, np.float32)))


def test_accuracy_and_loss():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [0.0, 0.5]])
  labels = jnp.array([0, 1, 1, 1])
  assert float(metrics.batch_accuracy(logits, labels)) == 0.75
  assert float(metrics.batch_accuracy(logits, jax.nn.one_hot(labels, 2))) == 0.75
  assert float(metrics.batch_accuracy(logits, labels, mask=jnp.array([1, 1, 0, 0]))) == 1.0
  with pytest.raises(ValueError, match="labels"):
    metrics.batch_accuracy(logits, jnp.zeros((3,), jnp.int32))
  sc = metrics.scope(network=["loss", "accuracy"])
  values, _ = sc.update(
    sc.init({"w": jnp.ones(2)}), loss=jnp.float32(0.3), logits=logits, labels=labels
  )
  np.testing.assert_allclose(values["loss"], 0.3)
  assert float(values["accuracy"]) == 0.75


@pytest.mark.slow
def test_nan_in_one_layer_leaves_other_layers_untouched():
  tree = _tree()
  bad = jax.tree.map(lambda x: x, tree)
  bad["Conv_0"]["kernel"] = bad["Conv_0"]["kernel"].copy()
  bad["Conv_0"]["kernel"][0, 0, 0, 0] = np.nan
  bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].copy()
  bad["Dense_0"]["kernel"][1, 1] = np.inf
  sc = metrics.scope(
    params=["mean", "variance", "norm", "nonfinite_fraction", metrics.histogram(8)]
  )
  good_v = _scope_values(sc, tree)
  bad_v = _scope_values(sc, bad)
  assert np.isnan(bad_v["params/mean/Conv_0/kernel"])
  assert np.isinf(bad_v["params/norm/Dense_0/kernel"])
  np.testing.assert_allclose(bad_v["params/nonfinite_fraction/Conv_0/kernel"], 1 / 72)
  assert int(np.sum(bad_v["params/histogram_counts/Conv_0/kernel"])) == 71  # NaN not counted
  for key, val in good_v.items():
    if "Conv_0/kernel" in key or "Dense_0/kernel" in key:
      continue
    np.testing.assert_array_equal(bad_v[key], val, err_msg=key)


def test_registry_names_presets_and_errors():
  names = metrics.registry.names()
  for n in ["mean", "variance", "norm", "ratio", "histogram", "spectral_norm", "accuracy"]:
    assert n in names
  with pytest.raises(KeyError, match="unknown metric 'kurtosis'"):
    metrics.registry.get("kurtosis")
  with pytest.raises(KeyError, match="unknown preset"):
    metrics.preset_metrics("deluxe")
  metrics.register("l1_test", lambda: metrics.stateless("l1_test", lambda xs: jnp.abs(xs[0]).sum()))
  assert float(metrics.evaluate(metrics.registry.get("l1_test"), jnp.array([1.0, -2.0]))) == 3.0
  with pytest.raises(ValueError, match="exists"):
    metrics.register("l1_test", metrics.mean)
  with pytest.raises(ValueError, match="ord"):
    metrics.norm(3)
  with pytest.raises(ValueError, match="denominator"):
    metrics.ratio_to_params("mid")


def test_variance_accurate_when_mean_dominates():
  # BatchNorm-scale-like data: mean 1, std 1e-3. The one-pass form would lose every
  # digit in float32; the cond falls back to two passes.
  x = (1.0 + 1e-3 * RNG.normal(size=(1000,))).astype(np.float32)
  np.testing.assert_allclose(
    metrics.evaluate(metrics.variance(), x), np.var(x.astype(np.float64)), rtol=1e-4
  )
  big = (1e4 + RNG.normal(size=(500,))).astype(np.float32)
  np.testing.assert_allclose(
    metrics.evaluate(metrics.variance(), big), np.var(big.astype(np.float64)), rtol=1e-3
  )
  assert abs(float(metrics.evaluate(metrics.variance(), jnp.full((7,), 3.3)))) < 1e-12


@pytest.mark.slow
def test_histogram_subsample_visits_every_column():
  x = RNG.normal(size=(784, 1000)).astype(np.float32)
  k = -(-784 // (65536 // 1000))  # 65 rows fit: every 13th
  assert metrics.stats.sample_axis(x.shape) == 0
  sample = x[::k]  # every k-th input row, every output unit (column)
  out = metrics.evaluate(metrics.histogram(32, max_elements=65536), x)
  ref, ref_edges = np.histogram(sample.astype(np.float64), bins=32)
  np.testing.assert_allclose(out["edges"], ref_edges, rtol=1e-6, atol=1e-6)
  assert int(np.sum(out["counts"])) == sample.size <= 65536
  assert np.abs(np.asarray(out["counts"]) - ref).sum() <= 2
  small = metrics.evaluate(metrics.histogram(8, max_elements=65536), x[:10])
  assert int(np.sum(small["counts"])) == 10 * 1000  # small tensors are counted in full
  # Conv kernels [kh, kw, in, out]: the largest input axis is subsampled.
  assert metrics.stats.sample_axis((3, 3, 64, 128)) == 2
  # A vector longer than the stride allows along its only axis: flat fallback.
  v = RNG.normal(size=(5, 200000)).astype(np.float32)
  kf = metrics.stats.sample_stride(v.size, 200000, 65536)
  out = metrics.evaluate(metrics.histogram(8, max_elements=65536), v)
  assert int(np.sum(out["counts"])) == v.reshape(-1)[::kf].size


def test_spectral_norms_only_for_kernels():
  # A 2-D attention bias [heads, head_dim] and LayerNorm scales stacked over 3 layers are
  # not matrices a layer applies: no spectral norm or condition number (issue 17).
  from jaxscope.tree import leaf_kind

  r = np.random.default_rng(0)
  kernel = r.normal(size=(8, 4)).astype(np.float32)
  params = {
    "attn": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(10 * r.normal(size=(4, 16)))},
    "ln": {"scale": jnp.full((3, 8), 5.0)},
  }
  assert leaf_kind("ln/scale", (3, 8)) == "other" and leaf_kind("attn/bias", (4, 16)) == "bias"
  assert leaf_kind("ln/scale", (8,)) == "other" and leaf_kind("proj", (4, 4)) == "kernel"
  sc = metrics.scope(params=["spectral_norm", "condition_number", "norm"])
  values, _ = sc.update(sc.init(params), params=params)
  assert sorted(values) == [
    "measured",
    "params/condition_number/attn/kernel",
    "params/norm/attn/bias",
    "params/norm/attn/kernel",
    "params/norm/ln/scale",
    "params/spectral_norm/attn/kernel",
  ]
  sv = np.linalg.svd(kernel.astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(values["params/spectral_norm/attn/kernel"], sv[0], rtol=1e-5)
  np.testing.assert_allclose(
    values["params/condition_number/attn/kernel"], sv[0] / sv[-1], rtol=1e-4
  )
  # evaluate() leaves the bias out too, and says so when no kernel is left.
  got = metrics.evaluate(metrics.spectral_norm(), params["attn"])
  assert set(got) == {"norm"}  # exact (SVD): no residual
  np.testing.assert_allclose(got["norm"], sv[0], rtol=1e-5)
  with pytest.raises(ValueError, match="no kernel leaf"):
    metrics.evaluate(metrics.spectral_norm(), params["ln"])


@pytest.mark.parametrize("shape", [(), (7,), (5, 9), (3, 4, 6)])
def test_count_true_is_exact_in_any_shape(shape):
  # Rows counted in float32, added as integers: the exact count whatever the shape.
  from jaxscope.metrics.stats import count_true

  mask = np.random.default_rng(len(shape)).random(shape) < 0.3
  got = jax.jit(count_true)(jnp.asarray(mask))
  assert got.dtype == jnp.int32 and int(got) == int(mask.sum())
