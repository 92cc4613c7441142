"""Tests for jaxscope.analysis.directions and jaxscope.analysis.pca: filter normalisation,
random and PCA directions, projection. References are numpy float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.decomposition import PCA

from jaxscope.analysis import directions as jd
from jaxscope.analysis import pca as jp

EPS = 1e-10


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "Conv_0": {
      "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    },
    "Dense_0": {
      "kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
    },
  }


def _like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)


def _np(x):
  return np.asarray(x, np.float64)


def _filter_ref(d, t):
  """numpy reference: per output unit (last axis) d_j·‖θ_j‖/(‖d_j‖ + ε)."""
  d, t = _np(d), _np(t)
  axes = tuple(range(d.ndim - 1))
  nd = np.sqrt(np.sum(d**2, axis=axes, keepdims=True))
  nt = np.sqrt(np.sum(t**2, axis=axes, keepdims=True))
  return d * nt / (nd + EPS)


def _slice_norms(x):
  x = _np(x)
  return np.sqrt(np.sum(x**2, axis=tuple(range(x.ndim - 1))))


def _flat(tree):
  return np.concatenate([_np(x).reshape(-1) for x in jax.tree.leaves(tree)])


# ----------------------------------------------------------------- filter_normalize


def test_filter_normalize_per_output_unit_dense_and_conv():
  theta, d = _params(0), _like(_params(0), 1)
  out = jd.filter_normalize(d, theta)
  for layer in ("Dense_0", "Conv_0"):
    k, t, dk = out[layer]["kernel"], theta[layer]["kernel"], d[layer]["kernel"]
    assert k.dtype == jnp.float32 and k.shape == t.shape
    np.testing.assert_allclose(_np(k), _filter_ref(dk, t), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_slice_norms(k), _slice_norms(t), rtol=1e-5)
    # The PyTorch-axis-0 port would match row norms instead; Flax filters are columns.
    assert not np.allclose(
      np.linalg.norm(_np(k).reshape(k.shape[0], -1), axis=1),
      np.linalg.norm(_np(t).reshape(t.shape[0], -1), axis=1),
      rtol=1e-3,
    )
  assert out["Dense_0"]["kernel"].shape == (5, 3) and out["Conv_0"]["kernel"].shape == (3, 3, 2, 4)


def test_filter_normalize_1d_modes():
  theta, d = _params(0), _like(_params(0), 1)
  tb, db = _np(theta["Dense_0"]["bias"]), _np(d["Dense_0"]["bias"])
  zero = jd.filter_normalize(d, theta)
  np.testing.assert_array_equal(_np(zero["Dense_0"]["bias"]), 0.0)
  np.testing.assert_array_equal(_np(zero["Conv_0"]["bias"]), 0.0)
  copy = jd.filter_normalize(d, theta, ignore_1d="copy")
  np.testing.assert_array_equal(_np(copy["Dense_0"]["bias"]), tb)
  per = jd.filter_normalize(d, theta, ignore_1d="filter")
  np.testing.assert_allclose(_np(per["Dense_0"]["bias"]), np.sign(db) * np.abs(tb), rtol=1e-6)
  keep = jd.filter_normalize(d, theta, ignore_1d="keep")
  np.testing.assert_array_equal(_np(keep["Dense_0"]["bias"]), db)
  # ignore_1d never changes the kernels.
  for out in (copy, per, keep):
    np.testing.assert_array_equal(_np(out["Conv_0"]["kernel"]), _np(zero["Conv_0"]["kernel"]))


def test_filter_normalize_layer_and_none_modes():
  theta, d = _params(0), _like(_params(0), 1)
  layer = jd.filter_normalize(d, theta, norm="layer")
  for name in ("Dense_0", "Conv_0"):
    k, t, dk = _np(layer[name]["kernel"]), _np(theta[name]["kernel"]), _np(d[name]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(k), np.linalg.norm(t), rtol=1e-5)
    np.testing.assert_allclose(k, dk * np.linalg.norm(t) / np.linalg.norm(dk), rtol=1e-5)
  none = jd.filter_normalize(d, theta, norm="none")
  np.testing.assert_array_equal(_np(none["Conv_0"]["kernel"]), _np(d["Conv_0"]["kernel"]))
  np.testing.assert_array_equal(_np(none["Conv_0"]["bias"]), 0.0)


def test_filter_normalize_output_axes_override_and_jit():
  rng = np.random.default_rng(3)
  theta = {"q": {"kernel": jnp.asarray(rng.normal(size=(4, 2, 3)), jnp.float32)}}
  d = {"q": {"kernel": jnp.asarray(rng.normal(size=(4, 2, 3)), jnp.float32)}}
  out = jd.filter_normalize(d, theta, output_axes=lambda name, shape: (1, 2))
  np.testing.assert_allclose(
    np.linalg.norm(_np(out["q"]["kernel"]), axis=0),
    np.linalg.norm(_np(theta["q"]["kernel"]), axis=0),
    rtol=1e-5,
  )
  theta, d = _params(0), _like(_params(0), 1)
  eager = jd.filter_normalize(d, theta)
  jitted = jax.jit(jd.filter_normalize)(d, theta)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-6, atol=1e-7)


def test_filter_normalize_errors():
  theta, d = _params(0), _like(_params(0), 1)
  with pytest.raises(ValueError, match="norm must be"):
    jd.filter_normalize(d, theta, norm="weight")
  with pytest.raises(ValueError, match="ignore_1d"):
    jd.filter_normalize(d, theta, ignore_1d="biasbn")
  with pytest.raises(ValueError, match="structure"):
    jd.filter_normalize({"Dense_0": d["Dense_0"]}, theta)


def test_filter_normalize_bfloat16_keeps_dtype():
  theta, d = _params(0), _like(_params(0), 1)
  d16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), d)
  out = jd.filter_normalize(d16, theta)
  assert out["Dense_0"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_allclose(
    _slice_norms(out["Dense_0"]["kernel"]), _slice_norms(theta["Dense_0"]["kernel"]), rtol=2e-2
  )


# ----------------------------------------------------------------- random_directions


@pytest.mark.slow
def test_random_directions_filter_normalised_and_deterministic():
  params = _params(0)
  a = jd.random_directions(params, jax.random.key(7))
  b = jd.random_directions(params, jax.random.key(7))
  c = jd.random_directions(params, jax.random.key(8))
  assert len(a) == 2
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(_np(x), _np(y))
  assert not np.allclose(_np(a[0]["Dense_0"]["kernel"]), _np(c[0]["Dense_0"]["kernel"]))
  assert not np.allclose(_np(a[0]["Dense_0"]["kernel"]), _np(a[1]["Dense_0"]["kernel"]))
  for d in a:
    for name in ("Dense_0", "Conv_0"):
      np.testing.assert_allclose(
        _slice_norms(d[name]["kernel"]), _slice_norms(params[name]["kernel"]), rtol=1e-5
      )
      np.testing.assert_array_equal(_np(d[name]["bias"]), 0.0)
  # An integer seed means jax.random.key(seed); n=3 extends n=2.
  s = jd.random_directions(params, 7, n=3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(s[:2]), strict=True):
    np.testing.assert_array_equal(_np(x), _np(y))


@pytest.mark.slow
def test_random_directions_independent_of_leaf_order_and_other_leaves():
  params = _params(0)
  reordered = {
    "Dense_0": {"bias": params["Dense_0"]["bias"], "kernel": params["Dense_0"]["kernel"]},
    "Conv_0": dict(params["Conv_0"]),
  }
  extra = dict(params, Aaa_0={"kernel": jnp.ones((7, 2))}, Zzz={"kernel": jnp.ones((2, 2))})
  key = jax.random.key(3)
  base = jd.random_directions(params, key, ignore_1d="filter")
  for other in (
    jd.random_directions(reordered, key, ignore_1d="filter"),
    jd.random_directions(extra, key, ignore_1d="filter"),
  ):
    for k in range(2):
      for layer in ("Dense_0", "Conv_0"):
        for leaf in ("kernel", "bias"):
          np.testing.assert_array_equal(_np(base[k][layer][leaf]), _np(other[k][layer][leaf]))


@pytest.mark.parametrize(
  ("norm", "ignore_1d"), [("filter", "zero"), ("layer", "zero"), ("none", "keep")]
)
@pytest.mark.slow
def test_random_directions_orthogonalize(norm, ignore_1d):
  params = _params(0)
  plain = jd.random_directions(params, jax.random.key(0), n=3, norm=norm, ignore_1d=ignore_1d)
  assert abs(float(jd.cosine(plain[0], plain[1]))) > 1e-4  # not orthogonal by chance
  d = jd.random_directions(
    params, jax.random.key(0), n=3, norm=norm, ignore_1d=ignore_1d, orthogonalize=True
  )
  for i, j in ((0, 1), (0, 2), (1, 2)):
    assert abs(float(jd.cosine(d[i], d[j]))) < 1e-6
  # The first direction is untouched; the others keep the filter norms.
  for x, y in zip(jax.tree.leaves(plain[0]), jax.tree.leaves(d[0]), strict=True):
    np.testing.assert_array_equal(_np(x), _np(y))
  if norm == "filter":
    for k in range(3):
      for name in ("Dense_0", "Conv_0"):
        np.testing.assert_allclose(
          _slice_norms(d[k][name]["kernel"]), _slice_norms(params[name]["kernel"]), rtol=1e-5
        )


def test_cosine():
  a, b = _params(0), _params(1)
  assert float(jd.cosine(a, a)) == pytest.approx(1.0, abs=1e-6)
  assert float(jd.cosine(a, jax.tree.map(jnp.negative, a))) == pytest.approx(-1.0, abs=1e-6)
  fa, fb = _flat(a), _flat(b)
  ref = fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))
  assert float(jd.cosine(a, b)) == pytest.approx(ref, abs=1e-6)
  assert np.isnan(float(jd.cosine(a, jax.tree.map(jnp.zeros_like, a))))


# ------------------------------------------------------------------------------- PCA


def _trajectory(T=9, seed=0):
  rng = np.random.default_rng(seed)
  theta = _params(seed)
  out = [theta]
  for t in range(1, T):
    # A drifting random walk with decreasing steps (a curved, not planar, path).
    theta = jax.tree.map(
      lambda x, t=t: x + jnp.asarray(rng.normal(size=x.shape) * 0.3 / t + 0.05, jnp.float32),
      theta,
    )
    out.append(theta)
  return out


def _kernels_flat(tree):
  return np.concatenate([_np(tree[m]["kernel"]).reshape(-1) for m in ("Conv_0", "Dense_0")])


def test_pca_matches_numpy_svd_and_sklearn():
  ckpts = _trajectory()
  T = len(ckpts)
  res = jp.pca_directions(ckpts, n=2)
  X = np.stack([_kernels_flat(c) for c in ckpts])  # kernels only: ignore_1d="zero"
  Xc = X - X.mean(axis=0)
  _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
  np.testing.assert_allclose(res.singular_values, S[:2], rtol=1e-8)
  np.testing.assert_allclose(res.explained_variance, S[:2] ** 2 / (T - 1), rtol=1e-8)
  np.testing.assert_allclose(res.explained_variance_ratio, S[:2] ** 2 / np.sum(S**2), rtol=1e-8)
  assert res.center == "mean"
  D = np.stack([_kernels_flat(d) for d in res.directions])
  for k in range(2):
    assert abs(D[k] @ Vt[k]) == pytest.approx(1.0, abs=1e-6)
    assert D[k][np.argmax(np.abs(D[k]))] > 0  # sign convention
    for d in res.directions:
      np.testing.assert_array_equal(_np(d["Dense_0"]["bias"]), 0.0)
  np.testing.assert_allclose(D @ D.T, np.eye(2), atol=1e-6)
  # sklearn parity, signs included (sklearn >= 1.5 flips on the components).
  pca = PCA(n_components=2, svd_solver="full").fit(X)
  np.testing.assert_allclose(D, pca.components_, atol=1e-6)
  np.testing.assert_allclose(res.explained_variance_ratio, pca.explained_variance_ratio_, rtol=1e-6)
  np.testing.assert_allclose(res.coords, pca.transform(X), rtol=1e-6, atol=1e-6)


def test_pca_final_center_and_keep():
  ckpts = _trajectory(T=6, seed=1)
  res = jp.pca_directions(ckpts, n=3, center="final", ignore_1d="keep")
  X = np.stack([_flat(c) for c in ckpts])
  R = X - X[-1]
  _, S, Vt = np.linalg.svd(R, full_matrices=False)
  np.testing.assert_allclose(res.singular_values, S[:3], rtol=1e-8)
  np.testing.assert_allclose(res.explained_variance_ratio, S[:3] ** 2 / np.sum(S**2), rtol=1e-8)
  D = np.stack([_flat(d) for d in res.directions])
  np.testing.assert_allclose(np.abs(np.sum(D * Vt[:3], axis=1)), 1.0, atol=1e-6)
  np.testing.assert_allclose(res.coords, R @ D.T, rtol=1e-5, atol=1e-5)
  assert np.any(D[:, -3:] != 0)  # Dense_0/bias is included


def test_pca_streaming_blocks_generator_and_reads():
  ckpts = _trajectory(T=7, seed=2)
  ref = jp.pca_directions(ckpts, n=2)
  reads = []

  def load(i):
    reads.append(i)
    return ckpts[i]

  lazy = jp.LazyCheckpoints(load, len(ckpts))
  one = jp.pca_directions(lazy, n=2)
  assert sorted(reads) == list(range(7))  # everything fits in one block: one read each
  reads.clear()
  # 8·T·C ≤ 600 bytes → C = 10 columns per block: leaves are split across blocks.
  small = jp.pca_directions(lazy, n=2, block_bytes=600)
  n_blocks = -(-(72 + 15) // 10)
  assert len(reads) == 1 + 6 * (n_blocks + 1)  # checkpoint 0 is read once and kept
  gen = jp.pca_directions((c for c in ckpts), n=2)
  for other in (one, small, gen):
    np.testing.assert_allclose(other.singular_values, ref.singular_values, rtol=1e-8)
    np.testing.assert_allclose(other.coords, ref.coords, rtol=1e-6, atol=1e-6)
    for a, b in zip(
      jax.tree.leaves(ref.directions), jax.tree.leaves(other.directions), strict=True
    ):
      np.testing.assert_allclose(_np(a), _np(b), atol=1e-6)


def test_pca_errors():
  ckpts = _trajectory(T=4)
  with pytest.raises(ValueError, match="at least 2"):
    jp.pca_directions(ckpts[:1])
  with pytest.raises(ValueError, match="n must be"):
    jp.pca_directions(ckpts, n=4)
  with pytest.raises(TypeError, match="mapping"):
    jp.pca_directions(ckpts[0])
  with pytest.raises(ValueError, match="structure"):
    jp.pca_directions([*ckpts, {"Dense_0": ckpts[0]["Dense_0"]}])
  # Collinear checkpoints span one dimension only.
  step = _like(ckpts[0], 5)
  line = [jax.tree.map(lambda x, s, a=a: x + a * s, ckpts[0], step) for a in (0.0, 1.0, 3.0)]
  with pytest.raises(ValueError, match="span only 1"):
    jp.pca_directions(line, n=2)
  assert jp.pca_directions(line, n=1).explained_variance_ratio[0] == pytest.approx(1.0)


# ------------------------------------------------------------------------- projection


def _plane_points(T=8, seed=0, noise=0.0):
  rng = np.random.default_rng(seed)
  base = _params(seed)
  u, v = _like(base, seed + 1), _like(base, seed + 2)
  ab = rng.normal(size=(T, 2))
  pts = []
  for a, b in ab:
    p = jax.tree.map(lambda x, y, z, a=a, b=b: x + a * y + b * z, base, u, v)
    if noise:
      p = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape) * noise, jnp.float32), p)
    pts.append(p)
  return pts


@pytest.mark.parametrize("center", ["mean", "final"])
def test_planar_trajectory_projects_with_zero_residual(center):
  pts = _plane_points()
  res = jp.pca_directions(pts, n=2, ignore_1d="keep", center=center)
  assert float(np.sum(res.explained_variance_ratio)) == pytest.approx(1.0, abs=1e-9)
  origin = pts[-1]
  coords, resid = jp.project(pts, origin, res.directions)
  assert coords.shape == (8, 2) and resid.shape == (8,)
  assert np.all(resid < 1e-4)
  assert resid[-1] == 0.0
  np.testing.assert_allclose(coords[-1], 0.0, atol=1e-6)
  D = np.stack([_flat(d) for d in res.directions])
  recon = _flat(origin)[None] + coords @ D
  np.testing.assert_allclose(recon, np.stack([_flat(p) for p in pts]), atol=1e-4)
  # Coordinates relative to the final model = PCA coordinates shifted by that of θ_T.
  np.testing.assert_allclose(coords, res.coords - res.coords[-1], atol=1e-4)


def test_off_plane_trajectory_has_positive_residual():
  pts = _plane_points(noise=0.3)
  res = jp.pca_directions(pts, n=2, ignore_1d="keep")
  _, resid = jp.project(pts, pts[-1], res.directions)
  assert resid[-1] == 0.0
  assert np.all(resid[:-1] > 0.05) and np.all(resid <= 1.0)
  # numpy reference for the residual fraction.
  D = np.stack([_flat(d) for d in res.directions])
  R = np.stack([_flat(p) for p in pts]) - _flat(pts[-1])
  ref = np.linalg.norm(R - (R @ D.T) @ D, axis=1) / np.maximum(np.linalg.norm(R, axis=1), 1e-300)
  np.testing.assert_allclose(resid, ref, rtol=1e-4, atol=1e-6)


def test_project_non_orthogonal_directions_least_squares():
  base, d1 = _params(0), _like(_params(0), 1)
  d2 = jax.tree.map(lambda a, b: a + 0.5 * b, _like(_params(0), 2), d1)  # cos ≈ 0.45
  coef = np.array([[0.0, 0.0], [1.0, -2.0], [0.3, 0.7]])
  pts = [jax.tree.map(lambda o, x, y, a=a, b=b: o + a * x + b * y, base, d1, d2) for a, b in coef]
  coords, resid = jp.project(iter(pts), base, [d1, d2])
  np.testing.assert_allclose(coords, coef, atol=1e-5)
  assert np.all(resid < 1e-5)
  with pytest.raises(ValueError, match="linearly dependent"):
    jp.project(pts, base, [d1, jax.tree.map(lambda x: 2 * x, d1)])
  with pytest.raises(ValueError, match="at least one"):
    jp.project(pts, base, [])
