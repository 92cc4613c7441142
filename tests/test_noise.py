"""Per-example gradient statistics vs per-example gradients materialised in numpy float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope.metrics import noise

B, D, H, C = 10, 5, 4, 3


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    "Dense_0": {
      "kernel": jnp.asarray(rng.normal(size=(D, H)) * 0.7, jnp.float32),
      "bias": jnp.asarray(rng.normal(size=H) * 0.1, jnp.float32),
    },
    "Dense_1": {
      "kernel": jnp.asarray(rng.normal(size=(H, C)) * 0.7, jnp.float32),
      "bias": jnp.asarray(rng.normal(size=C) * 0.1, jnp.float32),
    },
  }


def _batch(seed: int = 1) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(B, D)), jnp.float32), jnp.asarray(
    rng.integers(0, C, size=B), jnp.int32
  )


def _forward(params: dict, x: jax.Array, eps: dict | None = None) -> jax.Array:
  y0 = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  if eps is not None:
    y0 = y0 + eps["Dense_0"]
  y1 = jnp.tanh(y0) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  if eps is not None:
    y1 = y1 + eps["Dense_1"]
  return y1


def losses_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = _forward(params, x)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def _numpy_per_example(params: dict, x: jax.Array, y: jax.Array) -> np.ndarray:
  """Hand-written float64 backward of the tanh MLP, per example: ``[B, P]`` (leaf order)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs, ys = np.asarray(x, np.float64), np.asarray(y)
  rows = []
  for i in range(xs.shape[0]):
    a0 = xs[i] @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = np.tanh(a0)
    z = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    s = np.exp(z - z.max())
    s /= s.sum()
    d1 = s.copy()
    d1[ys[i]] -= 1.0
    d0 = (p["Dense_1"]["kernel"] @ d1) * (1 - h**2)
    grads = {
      "Dense_0": {"bias": d0, "kernel": np.outer(xs[i], d0)},
      "Dense_1": {"bias": d1, "kernel": np.outer(h, d1)},
    }
    rows.append(np.concatenate([g.reshape(-1) for g in jax.tree.leaves(grads)]))
  return np.stack(rows)


def _dense_layers(params: dict, x: jax.Array, y: jax.Array) -> list[noise.DenseLayer]:
  """Layer inputs and ∂L/∂(output) of the mean loss, by the perturbation trick."""
  eps = {"Dense_0": jnp.zeros((B, H)), "Dense_1": jnp.zeros((B, C))}

  def mean_loss(e: dict) -> jax.Array:
    logits = _forward(params, x, e)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  d = jax.grad(mean_loss)(eps)
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  # Leaf order: Dense_0/bias, Dense_0/kernel, Dense_1/bias, Dense_1/kernel.
  return [noise.DenseLayer(x, d["Dense_0"], 1, 0), noise.DenseLayer(h, d["Dense_1"], 3, 2)]


@pytest.fixture(scope="module")
def ref() -> dict:
  params = _params()
  x, y = _batch()
  gi = _numpy_per_example(params, x, y)
  return {"params": params, "x": x, "y": y, "gi": gi, "g": gi.mean(0)}


@pytest.mark.slow
def test_reference_matches_jax_gradient(ref: dict) -> None:
  # The hand-written backward is right: its mean is jax.grad of the mean loss.
  g = jax.grad(lambda p: jnp.mean(losses_fn(p, ref["x"], ref["y"])))(ref["params"])
  flat = np.concatenate([np.asarray(a).reshape(-1) for a in jax.tree.leaves(g)])
  np.testing.assert_allclose(flat, ref["g"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["vmap", "dense", "mixed"])
@pytest.mark.parametrize("chunk", [4, 32])
def test_moments_match_materialised(ref: dict, route: str, chunk: int) -> None:
  params, x, y, gi = ref["params"], ref["x"], ref["y"], ref["gi"]
  dense = {"vmap": [], "dense": _dense_layers(params, x, y)}.get(route)
  if route == "mixed":
    dense = _dense_layers(params, x, y)[1:]
  size = sum(a.size for a in jax.tree.leaves(params))
  sample = noise.histogram_sample(params, 10 * size)  # every coordinate
  mom = jax.jit(
    lambda p, a, b: noise.per_example_moments(
      losses_fn, p, (a, b), dense=dense, chunk=chunk, sample=sample
    )
  )(params, x, y)
  np.testing.assert_allclose(mom.sq_norms, (gi**2).sum(1), rtol=2e-5)
  m = np.concatenate([np.asarray(a).reshape(-1) for a in jax.tree.leaves(mom.second_moment)])
  np.testing.assert_allclose(m, (gi**2).mean(0), rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(mom.samples, gi, rtol=2e-5, atol=1e-7)


@pytest.mark.slow
def test_statistics_match_numpy(ref: dict) -> None:
  params, x, y, gi, g = ref["params"], ref["x"], ref["y"], ref["gi"], ref["g"]
  mom = noise.per_example_moments(losses_fn, params, (x, y), dense=_dense_layers(params, x, y))
  tree_g = jax.grad(lambda p: jnp.mean(losses_fn(p, x, y)))(params)
  gsq = float(np.sum(g**2))
  proj = noise.projections(losses_fn, params, (x, y), jax.tree.map(lambda a: a[None], tree_g))[0]
  np.testing.assert_allclose(proj, gi @ g, rtol=2e-5)
  n = gi.shape[0]
  # Byrd et al. / Bollapragada et al. tests, written from their definitions.
  var_l1 = np.sum((gi - g) ** 2) / (n - 1)
  np.testing.assert_allclose(
    noise.norm_test(mom.sq_norms, gsq), np.sqrt(var_l1 / (n * gsq)), rtol=1e-4
  )
  p = gi @ g
  var_p = np.var(p, ddof=1)
  np.testing.assert_allclose(noise.inner_test(proj, gsq), np.sqrt(var_p / (n * gsq**2)), rtol=1e-4)
  orth = gi - np.outer(p / gsq, g)
  var_o = np.sum(orth**2) / (n - 1)
  np.testing.assert_allclose(
    noise.ortho_test(mom.sq_norms, proj, gsq), np.sqrt(var_o / (n * gsq)), rtol=1e-4
  )
  var_i = gi.var(0)  # per-example variance, 1/B
  np.testing.assert_allclose(
    noise.mean_gsnr(tree_g, mom.second_moment), np.mean(g**2 / (var_i + 1e-5)), rtol=1e-3
  )
  loss = float(np.mean(losses_fn(params, x, y)))
  np.testing.assert_allclose(
    noise.cabs(tree_g, mom.second_moment, loss, 0.1), 0.1 * var_i.sum() / loss, rtol=1e-4
  )
  var_u = gi.var(0, ddof=1)
  np.testing.assert_allclose(
    noise.early_stopping(tree_g, mom.second_moment, n),
    1 - n * np.mean(g**2 / (var_u + 1e-5)),
    rtol=1e-3,
  )
  var_tree = noise.gradient_variance(tree_g, mom.second_moment)
  flat = np.concatenate([np.asarray(a).reshape(-1) for a in jax.tree.leaves(var_tree)])
  np.testing.assert_allclose(flat, var_i, rtol=1e-3, atol=1e-8)


def test_identical_examples_give_zero_noise() -> None:
  # Every example the same: gᵢ = g, so all variances vanish (tests pass for any θ).
  params = _params()
  x, y = _batch()
  x = jnp.broadcast_to(x[:1], x.shape)
  y = jnp.broadcast_to(y[:1], y.shape)
  mom = noise.per_example_moments(losses_fn, params, (x, y), dense=_dense_layers(params, x, y))
  g = jax.grad(lambda p: jnp.mean(losses_fn(p, x, y)))(params)
  gsq = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(g))
  assert float(noise.norm_test(mom.sq_norms, gsq)) < 2e-3
  proj = noise.projections(losses_fn, params, (x, y), jax.tree.map(lambda a: a[None], g))[0]
  assert float(noise.ortho_test(mom.sq_norms, proj, gsq)) < 2e-3


@pytest.mark.slow
def test_conv_leaves_use_vmap_route() -> None:
  rng = np.random.default_rng(3)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.3, jnp.float32)},
    "out": {"kernel": jnp.asarray(rng.normal(size=(4 * 5 * 5, 2)) * 0.1, jnp.float32)},
  }
  x = jnp.asarray(rng.normal(size=(9, 5, 5, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, size=9), jnp.int32)

  def lf(p: dict, xb: jax.Array, yb: jax.Array) -> jax.Array:
    h = jax.lax.conv_general_dilated(
      xb, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    logits = jax.nn.relu(h).reshape(xb.shape[0], -1) @ p["out"]["kernel"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1)[:, 0]

  per = jax.vmap(jax.grad(lambda p, xi, yi: lf(p, xi[None], yi[None])[0]), in_axes=(None, 0, 0))(
    params, x, y
  )
  gi = np.concatenate(
    [np.asarray(a, np.float64).reshape(9, -1) for a in jax.tree.leaves(per)], axis=1
  )
  mom = noise.per_example_moments(lf, params, (x, y), chunk=4)
  np.testing.assert_allclose(mom.sq_norms, (gi**2).sum(1), rtol=1e-5)
  m = np.concatenate([np.asarray(a).reshape(-1) for a in jax.tree.leaves(mom.second_moment)])
  np.testing.assert_allclose(m, (gi**2).mean(0), rtol=1e-5, atol=1e-10)


@pytest.mark.slow
def test_histogram_sample_is_unbiased_and_exact_for_small_leaves() -> None:
  params = {"a": jnp.zeros((100, 30)), "b": jnp.zeros(7)}
  s = noise.histogram_sample(params, 301)
  # Leaf order a, b: a gets ≈ 301·3000/3007 coordinates, b at least one.
  assert len(s.indices[0]) == 300 and len(s.indices[1]) == 1
  assert len(np.unique(s.indices[0])) == 300
  # Each leaf's weights sum to its size: the histogram estimates all 3007 coordinates.
  assert float(s.weights.sum()) == pytest.approx(3007, rel=1e-6)
  full = noise.histogram_sample(params, 10_000)
  np.testing.assert_array_equal(full.indices[1], np.arange(7))
  np.testing.assert_array_equal(full.weights, np.ones(3007))
  with pytest.raises(ValueError, match="size"):
    noise.histogram_sample(params, 0)


def test_bad_input() -> None:
  params = _params()
  x, y = _batch()
  with pytest.raises(ValueError, match="leading axis"):
    noise.per_example_moments(losses_fn, params, (x, y[:3]))
  with pytest.raises(ValueError, match="at least 2"):
    noise.per_example_moments(losses_fn, params, (x[:1], y[:1]))
  with pytest.raises(ValueError, match="chunk"):
    noise.per_example_moments(losses_fn, params, (x, y), chunk=0)


@pytest.mark.parametrize(
  "conv_args",
  [
    {},
    {"padding": "VALID", "strides": 2},
    {"padding": ((1, 2), (0, 1)), "strides": (2, 1), "kernel_dilation": (1, 2)},
    {"padding": 1},
  ],
)
@pytest.mark.slow
def test_conv_patch_route_equals_vmap_grad(conv_args: dict) -> None:
  import flax.linen as nn
  import optax

  from jaxscope import capture

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
      x = nn.relu(nn.Conv(5, (3, 2), **conv_args)(x))
      x = nn.Conv(4, (2, 2), padding="VALID", use_bias=False)(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 7, 8, 2)), jnp.float32)
  y = jnp.arange(6) % 3
  model = CNN()
  params = model.init(jax.random.key(0), x)["params"]

  def lf(p: dict, xb: jax.Array, yb: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb)

  _, _, cap = capture.value_and_grad(lambda p: jnp.mean(lf(p, x, y)), inputs=True)(params)
  convs = noise.conv_layers(params, cap)
  assert len(convs) == 2
  # Materialised per-example gradients (vmap of grad), the independent reference.
  per = jax.vmap(jax.grad(lambda p, xi, yi: lf(p, xi[None], yi[None])[0]), in_axes=(None, 0, 0))(
    params, x, y
  )
  gi = np.concatenate([np.asarray(a, np.float64).reshape(6, -1) for a in jax.tree.leaves(per)], 1)
  size = gi.shape[1]
  sample = noise.histogram_sample(params, 10 * size)
  mom = noise.per_example_moments(
    lf, params, (x, y), dense=noise.dense_layers(params, cap), convs=convs, sample=sample
  )
  np.testing.assert_allclose(mom.sq_norms, (gi**2).sum(1), rtol=1e-5)
  m = np.concatenate([np.asarray(a).reshape(-1) for a in jax.tree.leaves(mom.second_moment)])
  np.testing.assert_allclose(m, (gi**2).mean(0), rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(mom.samples, gi, rtol=1e-4, atol=1e-6)
  v = rng.normal(size=(2, size))
  tangents = [jnp.asarray(t, jnp.float32) for t in _split_like(params, v)]
  proj = noise.layer_projections(noise.dense_layers(params, cap), convs, tangents)
  np.testing.assert_allclose(proj, v @ gi.T, rtol=1e-4, atol=1e-5)


def _split_like(params: dict, v: np.ndarray) -> list[np.ndarray]:
  """Splits ``[k, P]`` rows into per-leaf ``[k, *shape]`` arrays in leaf order."""
  out, start = [], 0
  for leaf in jax.tree.leaves(params):
    out.append(v[:, start : start + leaf.size].reshape((v.shape[0], *leaf.shape)))
    start += leaf.size
  return out


@pytest.mark.parametrize("batch", [4, 64])
def test_grad_projections_by_gram_match_float64(batch: int) -> None:
  """gᵢᵀg on the mean gradient: Gram matrices for a wide layer (B = 4: 4·28 < 16·12),
  the contraction for a narrow one and for every layer at B = 64; against float64."""
  rng = np.random.default_rng(7)
  shapes = [(16, 12, True), (3, 2, False)]
  xs = [rng.standard_normal((batch, i)).astype(np.float32) for i, _, _ in shapes]
  ds = [rng.standard_normal((batch, o)).astype(np.float32) / batch for _, o, _ in shapes]
  # Leaves: Dense_0/bias, Dense_0/kernel, Dense_1/kernel.
  layers = [noise.DenseLayer(jnp.asarray(xs[0]), jnp.asarray(ds[0]), 1, 0),
            noise.DenseLayer(jnp.asarray(xs[1]), jnp.asarray(ds[1]), 2, None)]  # fmt: skip
  rows = []
  for i in range(batch):
    d0, d1 = ds[0][i] * batch, ds[1][i] * batch  # δᵢ = B·∂L/∂yᵢ
    rows.append(np.concatenate([d0, np.outer(xs[0][i], d0).ravel(),
                                np.outer(xs[1][i], d1).ravel()]).astype(np.float64))  # fmt: skip
  gi = np.stack(rows)
  g = gi.mean(0)
  leaves = [jnp.asarray(g[:12], jnp.float32), jnp.asarray(g[12:204].reshape(16, 12), jnp.float32),
            jnp.asarray(g[204:].reshape(3, 2), jnp.float32)]  # fmt: skip
  got = noise.layer_grad_projections(layers, [], leaves)
  np.testing.assert_allclose(np.asarray(got), gi @ g, rtol=2e-5, atol=1e-6 * np.abs(gi @ g).max())
  contracted = noise.layer_projections(layers, [], [leaf[None] for leaf in leaves])[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(contracted), rtol=2e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no Dense or Conv layer"):
    noise.layer_grad_projections([], [], leaves)
