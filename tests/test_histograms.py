"""Per-example gradient histograms (issue 18): exact integer counts per leaf, fixed clamped
ranges, non-finite entries reported, unbiased sampled estimates; numpy as the reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope.metrics import noise


def _hist(values: np.ndarray, sample: noise.HistogramSample | None, bins: int, rng: tuple) -> dict:
  """One jitted histogram with a traced range (as the instruments keep it in their state)."""
  fn = jax.jit(lambda v, r: noise.sampled_histogram(v, sample, bins, r))
  return fn(jnp.asarray(values), jnp.asarray(rng, jnp.float32))


def test_full_data_reproduces_numpy_with_clamping_under_jit() -> None:
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(6, 40)) * 1.5).astype(np.float32)
  x[0, :9] = np.linspace(-2, 2, 9)  # every edge: bins are [e_k, e_k+1), the last one closed
  x[1, :4] = [-50.0, 7.0, 2.0000002, -2.0000002]  # outliers, clamped into the edge bins
  h = _hist(x, None, 8, (-2.0, 2.0))
  ref, edges = np.histogram(np.clip(x, -2, 2), bins=8, range=(-2, 2))
  np.testing.assert_array_equal(h["edges"], edges)
  np.testing.assert_array_equal(h["counts"], ref)
  np.testing.assert_array_equal(h["leaf_counts"], ref[None])
  assert h["leaf_counts"].dtype == jnp.int32
  assert float(h["counts"].sum()) == x.size and float(h["nonfinite"]) == 0.0
  assert float(h["counts"][0]) > np.sum((x >= -2) & (x < -1.5))  # the clamped ones count
  # An asymmetric range whose edges are not binary fractions: the same counts as numpy.
  lo, hi = -0.7, 1.3
  h = _hist(x, None, 13, (lo, hi))
  ref, ref_edges = np.histogram(np.clip(x, lo, hi), bins=13, range=(lo, hi))
  np.testing.assert_array_equal(h["counts"], ref)
  np.testing.assert_allclose(h["edges"], ref_edges, rtol=0, atol=2e-7)
  # Entries on and one ulp either side of every returned edge, where ⌊(x − lo)·13/2⌋ in
  # float32 alone is wrong for some: binned as numpy bins them on these edges.
  e = np.asarray(h["edges"])
  x[2:4, :21] = np.concatenate([e, np.nextafter(e, -9), np.nextafter(e, 9)]).reshape(2, 21)
  ref, _ = np.histogram(np.clip(x, lo, hi), bins=e)
  np.testing.assert_array_equal(_hist(x, None, 13, (lo, hi))["counts"], ref)


def test_nonfinite_entries_are_reported_not_counted() -> None:
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 25)).astype(np.float32)
  x[0, 0], x[1, 3], x[3, 24] = np.nan, np.inf, -np.inf
  h = _hist(x, None, 10, (-1.0, 1.0))
  finite = x[np.isfinite(x)]
  ref, _ = np.histogram(np.clip(finite, -1, 1), bins=10, range=(-1, 1))
  np.testing.assert_array_equal(h["counts"], ref)
  assert float(h["nonfinite"]) == 3.0
  assert float(h["counts"].sum() + h["nonfinite"]) == x.size


def test_leaf_weights_totals_and_exact_full_sample() -> None:
  params = {"a": jnp.zeros((10, 6)), "b": jnp.zeros(5), "c": jnp.zeros((0,))}
  s = noise.histogram_sample(params, 13)
  assert s.sizes == (60, 5, 0) and s.leaf_sampled == (12, 1, 0)
  np.testing.assert_array_equal(s.leaf_weights, [5.0, 5.0, 1.0])
  legacy = noise.HistogramSample(s.indices, s.weights)  # two fields: weights give w_l
  np.testing.assert_array_equal(legacy.leaf_weights, s.leaf_weights)
  # Full data, three leaves, outliers and a NaN: integer totals are exactly B·P.
  full = noise.histogram_sample(params, 1000)
  assert full.leaf_sampled == (60, 5, 0)
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(7, 65)) * 3).astype(np.float32)
  x[2, 61] = np.nan
  h = _hist(x, full, 6, (-2.0, 2.0))
  ref, _ = np.histogram(np.clip(x[np.isfinite(x)], -2, 2), bins=6, range=(-2, 2))
  np.testing.assert_array_equal(h["counts"], ref)
  assert int(h["leaf_counts"].sum()) + int(h["nonfinite"]) == 7 * 65
  ref_b, _ = np.histogram(np.clip(x[:, 60:][np.isfinite(x[:, 60:])], -2, 2), 6, range=(-2, 2))
  np.testing.assert_array_equal(h["leaf_counts"][1], ref_b)
  # A sample: weighted totals are B·P (and the float32 weights of the old layout agree).
  hs = _hist(x[:, :13], s, 6, (-2.0, 2.0))
  assert float(hs["counts"].sum() + hs["nonfinite"]) == pytest.approx(7 * 65, rel=1e-6)


def test_2d_histogram_is_numpy_histogram2d_in_grad_param_order() -> None:
  rng = np.random.default_rng(3)
  g = rng.normal(size=(5, 30)).astype(np.float32)
  p = (rng.normal(size=30) * 2).astype(np.float32)
  g[0, 0], p[7] = np.nan, np.inf  # one pair, then a whole column of B pairs
  fn = jax.jit(lambda g, p, gr, pr: noise.sampled_histogram_2d(g, p, None, (4, 5), gr, pr))
  h = fn(jnp.asarray(g), jnp.asarray(p), jnp.asarray([-1.0, 1.0]), jnp.asarray([-2.0, 2.0]))
  assert h["counts"].shape == (4, 5) and h["leaf_counts"].shape == (1, 4, 5)
  pb = np.broadcast_to(p, g.shape)
  ok = np.isfinite(g) & np.isfinite(pb)
  ref, ge, pe = np.histogram2d(
    np.clip(g[ok], -1, 1), np.clip(pb[ok], -2, 2), bins=(4, 5), range=((-1, 1), (-2, 2))
  )
  np.testing.assert_array_equal(h["counts"], ref)
  np.testing.assert_allclose(h["grad_edges"], ge, rtol=1e-6)  # float32 vs numpy's float64
  np.testing.assert_allclose(h["param_edges"], pe, rtol=1e-6)
  assert float(h["nonfinite"]) == 1 + 5


def test_sampled_estimate_is_unbiased_by_enumeration() -> None:
  """E[counts] over every sample (C(4,2)·C(3,1) = 18 equally likely) = the full counts."""
  rng = np.random.default_rng(4)
  g = (rng.normal(size=(3, 7)) * 1.2).astype(np.float32)  # leaves of 4 and 3 coordinates
  p = rng.normal(size=7).astype(np.float32)
  rg, rp = (-1.5, 1.5), (-1.0, 1.0)
  full_1 = _hist(g, None, 5, rg)["counts"]
  ref_2, _, _ = np.histogram2d(
    np.clip(g, *rg).ravel(), np.clip(np.broadcast_to(p, g.shape), *rp).ravel(), (3, 2), (rg, rp)
  )
  mean_1, mean_2, n = np.zeros(5), np.zeros((3, 2)), 0
  shape = noise.histogram_sample({"a": jnp.zeros(4), "b": jnp.zeros(3)}, 3)
  assert shape.leaf_sampled == (2, 1)  # the static layout every enumerated sample shares
  fn_1 = jax.jit(lambda v: noise.sampled_histogram(v, shape, 5, rg)["counts"])
  fn_2 = jax.jit(lambda v, q: noise.sampled_histogram_2d(v, q, shape, (3, 2), rg, rp)["counts"])
  for a in itertools.combinations(range(4), 2):
    for b in range(3):
      cols = [*a, 4 + b]
      mean_1 += np.asarray(fn_1(jnp.asarray(g[:, cols])), np.float64)
      mean_2 += np.asarray(fn_2(jnp.asarray(g[:, cols]), jnp.asarray(p[cols])), np.float64)
      n += 1
  np.testing.assert_allclose(mean_1 / n, full_1, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(mean_2 / n, ref_2, rtol=1e-6, atol=1e-5)
  one = np.asarray(fn_1(jnp.asarray(g[:, [0, 1, 4]])))
  assert not np.allclose(one, full_1)  # a single sample is an estimate, not the full counts


def test_histogram_range_first_step_default() -> None:
  x = jnp.asarray([[0.5, -3.0, np.nan], [np.inf, 1.0, 0.0]])
  np.testing.assert_allclose(jax.jit(noise.histogram_range)(x), [-3.6, 3.6], rtol=1e-6)
  np.testing.assert_allclose(noise.histogram_range(x, pad=0.0), [-3.0, 3.0])
  np.testing.assert_array_equal(noise.histogram_range(jnp.zeros((2, 3))), [-1.0, 1.0])
  np.testing.assert_array_equal(noise.histogram_range(jnp.full(3, np.nan)), [-1.0, 1.0])
  with pytest.raises(ValueError, match="pad"):
    noise.histogram_range(x, pad=-0.1)


def test_bad_arguments_are_named() -> None:
  s = noise.histogram_sample({"a": jnp.zeros(10)}, 4)
  with pytest.raises(ValueError, match="last axis"):
    noise.sampled_histogram(jnp.zeros((2, 5)), s, 4, (-1.0, 1.0))
  with pytest.raises(ValueError, match="range"):
    noise.sampled_histogram(jnp.zeros((2, 4)), s, 4, (1.0, 1.0))
  with pytest.raises(ValueError, match="bins"):
    noise.sampled_histogram(jnp.zeros((2, 4)), s, 0, (-1.0, 1.0))
  with pytest.raises(ValueError, match="param_range"):
    noise.sampled_histogram_2d(jnp.zeros((2, 4)), jnp.zeros(4), s, (2, 2), (-1, 1), (2, 0))
  with pytest.raises(ValueError, match="broadcast"):
    noise.sampled_histogram_2d(jnp.zeros((2, 4)), jnp.zeros(3), s, (2, 2), (-1, 1), (-1, 1))
