"""Stacked (layer-scanned) parameters measured per layer: ``stacked=`` in tree and scope."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxscope import metrics
from jaxscope import tree as jtree

L, D = 3, 6


class _Block(nn.Module):
  partitioned: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    init = nn.initializers.lecun_normal()
    if self.partitioned:
      init = nn.with_partitioning(init, ("embed", "mlp"))
    h = nn.LayerNorm(name="ln")(x)
    h = nn.Dense(D, kernel_init=init, name="fc")(h)
    return x + jnp.tanh(h), None


class _Scanned(nn.Module):
  partitioned: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    stack = nn.scan(
      _Block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=L,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(self.partitioned, name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


class _Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    for i in range(L):
      x, _ = _Block(name=f"blocks_{i}")(x)
    return nn.Dense(2, name="head")(x)


def _unstack_params(p):
  out = {"embed": p["embed"], "head": p["head"]}
  for i in range(L):
    out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], p["blocks"])
  return out


@pytest.fixture(scope="module")
def scanned():
  x = jax.random.normal(jax.random.key(1), (5, 4))
  params = _Scanned().init(jax.random.key(0), x)["params"]
  return params, x


def test_unstack_names_shapes_and_kinds(scanned):
  params, _ = scanned
  lay = jtree.layout(params, stacked={"^blocks": 0})
  names = [g.key for g in lay.groups]
  assert "blocks/0/fc/kernel" in names and "blocks/2/ln/scale" in names
  assert "blocks/fc/kernel" not in names
  infos = {i.name: i for i in lay.leaves}
  assert infos["blocks/1/fc/kernel"].shape == (D, D)
  assert infos["blocks/1/fc/kernel"].kind == "kernel"
  assert infos["blocks/1/fc/bias"].kind == "bias"
  assert infos["blocks/1/ln/scale"].kind == "other"
  leaves = jax.tree_util.tree_leaves(params)
  np.testing.assert_array_equal(
    jtree.leaf_value(leaves, infos["blocks/2/fc/kernel"]), params["blocks"]["fc"]["kernel"][2]
  )
  # Match ending inside the leaf name: the index follows the first component.
  lay = jtree.layout(params, stacked={"fc/kernel$": 0}, include="fc/kernel")
  assert [g.key for g in lay.groups] == [
    "blocks/0/fc/kernel",
    "blocks/1/fc/kernel",
    "blocks/2/fc/kernel",
  ]
  # depth groups the per-layer names.
  lay = jtree.layout(params, stacked={"^blocks/": 0}, depth=2, include="^blocks")
  assert [g.key for g in lay.groups] == ["blocks/0", "blocks/1", "blocks/2"]


def test_unstack_errors(scanned):
  params, _ = scanned
  with pytest.raises(ValueError, match="match no leaf"):
    jtree.layout(params, stacked={"^nothing": 0})
  with pytest.raises(ValueError, match="has no axis 3"):
    jtree.layout(params, stacked={"blocks/ln/scale": 3})
  with pytest.raises(TypeError, match="must be an int axis"):
    jtree.layout(params, stacked={"^blocks": "0"})
  with pytest.raises(ValueError, match="invalid regular expression"):
    metrics.scope(params=["norm"], stacked={"(": 0})


@pytest.mark.slow
def test_scanned_equals_unrolled_per_layer(scanned):
  params, x = scanned
  flat = _unstack_params(params)
  # The two layouts compute the same function.
  y_s = _Scanned().apply({"params": params}, x)
  y_u = _Unrolled().apply({"params": flat}, x)
  np.testing.assert_allclose(y_s, y_u, rtol=1e-6, atol=1e-6)
  grads = jax.tree.map(lambda a: 0.5 * a, params)
  stats = ["norm", "mean", "variance", "max_abs", "spectral_norm"]
  sc = metrics.scope(params=stats, grads=["norm"], stacked={"^blocks": 0})
  vals, _ = jax.jit(sc.update)(sc.init(params), params=params, grads=grads)
  su = metrics.scope(params=stats, grads=["norm"])
  ref, _ = jax.jit(su.update)(
    su.init(flat), params=flat, grads=jax.tree.map(lambda a: 0.5 * a, flat)
  )
  for i in range(L):
    for leaf in ("fc/kernel", "fc/bias", "ln/scale", "ln/bias"):
      for stat in stats:
        key_u = f"params/{stat}/blocks_{i}/{leaf}"
        if key_u not in ref:
          continue  # spectral norm: kernels only
        np.testing.assert_allclose(vals[f"params/{stat}/blocks/{i}/{leaf}"], ref[key_u], rtol=2e-6)
  assert "params/spectral_norm/blocks/0/ln/scale" not in vals
  # Against numpy float64 on the slices.
  for i in range(L):
    w = np.asarray(params["blocks"]["fc"]["kernel"][i], np.float64)
    np.testing.assert_allclose(
      vals[f"params/norm/blocks/{i}/fc/kernel"], np.linalg.norm(w), rtol=1e-6
    )
    np.testing.assert_allclose(
      vals[f"params/spectral_norm/blocks/{i}/fc/kernel"], np.linalg.svd(w)[1][0], rtol=1e-5
    )
  # Unstacked leaves are unchanged; the pooled norm is the root of the sum of squares.
  np.testing.assert_allclose(vals["params/norm/embed/kernel"], ref["params/norm/embed/kernel"])
  pooled = np.linalg.norm(np.asarray(params["blocks"]["fc"]["kernel"], np.float64))
  per_layer = [float(vals[f"params/norm/blocks/{i}/fc/kernel"]) for i in range(L)]
  np.testing.assert_allclose(np.sqrt(np.sum(np.square(per_layer))), pooled, rtol=1e-6)


def test_stack_axes_from_linen_metadata():
  x = jnp.ones((2, 4))
  boxed = _Scanned(partitioned=True).init(jax.random.key(0), x)["params"]
  assert jtree.stack_axes(boxed) == {"^blocks/fc/kernel$": 0}
  assert jtree.stack_axes(nn.unbox(boxed)) == {}
  assert jtree.stack_axes(boxed, axis_name="mlp") == {"^blocks/fc/kernel$": 2}
  specs = nn.get_partition_spec(boxed)
  assert jtree.stack_axes(specs) == {"^blocks/fc/kernel$": 0}


def test_stack_axes_from_nnx_metadata():
  class Block(nnx.Module):
    def __init__(self, rngs):
      init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
      self.fc = nnx.Linear(D, D, kernel_init=init, rngs=rngs)

  class Model(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def create(r):
        return Block(r)

      self.blocks = create(rngs)
      self.head = nnx.Linear(D, 2, rngs=rngs)

  with nnx.use_eager_sharding(False):  # Names only; no mesh needed.
    model = Model(nnx.Rngs(0))
  spec = jtree.stack_axes(nnx.state(model, nnx.Param))
  assert spec == {"^blocks/fc/kernel$": 0}
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  sc = metrics.scope(params=["norm"], stacked=spec)
  vals, _ = sc.update(sc.init(state), params=state)
  w = np.asarray(state["blocks"]["fc"]["kernel"][1], np.float64)
  np.testing.assert_allclose(vals["params/norm/blocks/1/fc/kernel"], np.linalg.norm(w), rtol=1e-6)
  assert "params/norm/blocks/fc/bias" in vals  # not declared stacked: pooled


def test_stacked_captured_layers():
  acts = {
    "blocks/fc": jnp.arange(L * 2 * 3, dtype=jnp.float32).reshape(L, 2, 3),
    "head": jnp.ones((2, 2)),
  }
  sc = metrics.scope(activations=["mean"], stacked={"^blocks": 0, "^nothing": 0})
  vals, _ = sc.update(sc.init(activations=acts), activations=acts)
  for i in range(L):
    np.testing.assert_allclose(
      vals[f"activations/mean/blocks/{i}/fc"], np.mean(np.asarray(acts["blocks/fc"][i]))
    )
  assert vals["activations/mean/head"] == 1.0


@pytest.mark.slow
def test_multi_axis_attention_kernels_matrix_view():
  """Spectral norms of DenseGeneral kernels: the operator of the whole projection."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(8, 2, 4)).astype(np.float32)  # [d, heads, head_dim]
  o = rng.normal(size=(2, 4, 8)).astype(np.float32)  # [heads, head_dim, d]
  wq = rng.normal(size=(8, 2, 4)).astype(np.float32)  # a custom name: needs a rule
  params = {
    "attn": {
      "query": {"kernel": q, "bias": np.zeros((2, 4), np.float32)},
      "out": {"kernel": o},
      "proj_q": {"kernel": wq},
    }
  }
  sc = metrics.scope(
    params=["spectral_norm", "condition_number"], matrix_axes={"proj_q/kernel$": 1}
  )
  vals, _ = sc.update(sc.init(params), params=params)
  svq = np.linalg.svd(q.astype(np.float64).reshape(8, 8), compute_uv=False)
  svo = np.linalg.svd(o.astype(np.float64).reshape(8, 8), compute_uv=False)
  svw = np.linalg.svd(wq.astype(np.float64).reshape(8, 8), compute_uv=False)
  np.testing.assert_allclose(vals["params/spectral_norm/attn/query/kernel"], svq[0], rtol=1e-5)
  np.testing.assert_allclose(
    vals["params/condition_number/attn/query/kernel"], svq[0] / svq[-1], rtol=1e-4
  )
  np.testing.assert_allclose(vals["params/spectral_norm/attn/out/kernel"], svo[0], rtol=1e-5)
  np.testing.assert_allclose(vals["params/spectral_norm/attn/proj_q/kernel"], svw[0], rtol=1e-5)
  # The [d·heads, head_dim] reshape is a different matrix (the old, wrong view).
  wrong = np.linalg.svd(q.astype(np.float64).reshape(16, 4), compute_uv=False)[0]
  assert abs(wrong - svq[0]) > 1e-3
  assert "params/spectral_norm/attn/query/bias" not in vals
  # The power iteration sees the same view (warm state sized by its rows).
  sp = metrics.scope(params=[metrics.spectral_norm(method="power", iters=60)])
  vals, _ = sp.update(sp.init(params), params=params)
  np.testing.assert_allclose(vals["params/spectral_norm/attn/query/kernel"], svq[0], rtol=1e-4)
  with pytest.raises(ValueError, match="input axes"):
    bad = metrics.scope(params=["spectral_norm"], matrix_axes={"query/kernel$": 3})
    bad.init(params)
