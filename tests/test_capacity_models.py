"""Tests of the dynamic-capacity layers, masks and zoo models (jaxscope.models.capacity).

References are computed another way: numpy float64 forwards of the sliced active
sub-network, hand-written index sets for the trainable masks, Flax's own ``nn.Conv`` for the
convolution, and the initialiser's known standard deviation for re-initialisation.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscope import models
from jaxscope.models.capacity import (
  CAPACITY,
  INITIALIZERS,
  CapacityConv,
  CapacityDense,
  CapacityInfo,
  CapacityMLP,
  CapacityResidualBlock,
  capacity_layers,
  initializer,
  reinit_chunk,
  trainable_mask,
  unit_mask,
)

KEY = jax.random.key(0)


def _with_active(capacity: dict, active: dict[str, int]) -> dict:
  """A copy of ``capacity`` with some layers' ``active`` replaced (int32 scalars)."""
  out = jax.tree_util.tree_map(lambda a: a, capacity)
  for key, value in active.items():
    node = out
    for part in key.split("/"):
      node = node[part]
    node["active"] = jnp.asarray(value, jnp.int32)
  return out


def _normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
  """``N(0, scale²)`` float32 draws from numpy (no XLA compilation per shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomised(params: dict, seed: int = 1) -> dict:
  """Params with every leaf (biases included) drawn from N(0, 0.5²), so zeros mean masking."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return jax.tree_util.tree_unflatten(
    treedef, [_normal(seed * 1000 + i, leaf.shape, 0.5) for i, leaf in enumerate(leaves)]
  )


@functools.cache
def _model(name: str, shape: tuple[int, ...], num_classes: int, **kwargs):
  model = models.build(name, shape, num_classes, **kwargs)
  variables = model.init(KEY, jnp.zeros((2, *shape)))
  return model, variables


# --------------------------------------------------------------------------- masks and layers


def test_unit_mask_and_chunk_validation():
  np.testing.assert_array_equal(unit_mask(2, 6, 3), [True] * 4 + [False] * 2)
  np.testing.assert_array_equal(unit_mask(0, 4, 2), [False] * 4)
  np.testing.assert_array_equal(unit_mask(jnp.int32(2), 4, 2), [True] * 4)
  traced = jax.jit(lambda a, c: unit_mask(a, 6, c))(jnp.int32(1), jnp.int32(3))
  np.testing.assert_array_equal(traced, [True] * 2 + [False] * 4)
  with pytest.raises(ValueError, match=r"features=10.*chunks=3"):
    unit_mask(1, 10, 3)
  with pytest.raises(ValueError, match=r"features=10.*chunks=3"):
    CapacityDense(10, chunks=3).init(KEY, jnp.zeros((1, 2)))
  with pytest.raises(ValueError, match=r"features=10.*chunks=4"):
    CapacityConv(10, 3, chunks=4).init(KEY, jnp.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match="initial_chunks"):
    CapacityDense(10, chunks=5, initial_chunks=6).init(KEY, jnp.zeros((1, 2)))


class _DenseNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(CapacityDense(12, chunks=3, initial_chunks=1)(x))
    return nn.Dense(4)(h), h


def test_dense_inactive_units_are_zero_and_get_no_gradient():
  net = _DenseNet()
  x = _normal(1, (5, 7))
  variables = jax.jit(net.init)(KEY, x)
  assert set(variables) == {"params", CAPACITY}
  cap = variables[CAPACITY]["CapacityDense_0"]
  assert cap["active"].dtype == jnp.int32 and int(cap["active"]) == 1 and int(cap["chunks"]) == 3
  params = _randomised(variables["params"])
  _, h = jax.jit(net.apply)({"params": params, CAPACITY: variables[CAPACITY]}, x)
  assert np.all(np.asarray(h[:, 4:]) == 0.0) and np.count_nonzero(h[:, :4]) == h[:, :4].size
  full = _with_active(variables[CAPACITY], {"CapacityDense_0": 3})
  _, h_full = jax.jit(net.apply)({"params": params, CAPACITY: full}, x)
  assert np.count_nonzero(h_full) == h_full.size  # The zeros come from the mask.

  def loss(p):
    out, _ = net.apply({"params": p, CAPACITY: variables[CAPACITY]}, x)
    return jnp.sum((out - 1.0) ** 2)

  g = jax.jit(jax.grad(loss))(params)
  assert np.all(np.asarray(g["CapacityDense_0"]["kernel"][:, 4:]) == 0.0)
  assert np.all(np.asarray(g["CapacityDense_0"]["bias"][4:]) == 0.0)
  assert np.all(np.asarray(g["Dense_0"]["kernel"][4:, :]) == 0.0)
  assert np.count_nonzero(g["CapacityDense_0"]["kernel"][:, :4]) == 7 * 4
  assert np.count_nonzero(g["Dense_0"]["kernel"][:4, :]) == 4 * 4


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(CapacityConv(8, 3, chunks=4, initial_chunks=1)(x))
    return CapacityConv(6, (3, 3), chunks=3, initial_chunks=3)(h), h


@pytest.mark.slow
def test_conv_inactive_channels_and_gradients():
  net = _ConvNet()
  x = _normal(2, (2, 6, 6, 3))
  variables = jax.jit(net.init)(KEY, x)
  params = _randomised(variables["params"])
  cap = variables[CAPACITY]
  _, h = jax.jit(net.apply)({"params": params, CAPACITY: cap}, x)
  assert h.shape == (2, 6, 6, 8)
  assert np.all(np.asarray(h[..., 2:]) == 0.0) and np.count_nonzero(h[..., :2]) > 0

  def loss(p):
    out, _ = net.apply({"params": p, CAPACITY: cap}, x)
    return jnp.sum(jnp.sin(out))

  g = jax.jit(jax.grad(loss))(params)
  assert np.all(np.asarray(g["CapacityConv_0"]["kernel"][..., 2:]) == 0.0)
  assert np.all(np.asarray(g["CapacityConv_0"]["bias"][2:]) == 0.0)
  assert np.all(np.asarray(g["CapacityConv_1"]["kernel"][:, :, 2:, :]) == 0.0)
  assert np.count_nonzero(g["CapacityConv_0"]["kernel"][..., :2]) > 0
  assert np.count_nonzero(g["CapacityConv_1"]["kernel"][:, :, :2, :]) > 0


@pytest.mark.parametrize(
  "shape, kwargs",
  [
    ((2, 9, 7, 3), dict(strides=2, padding="VALID")),
    ((2, 8, 8, 3), dict(strides=(1, 2), padding="SAME")),
    ((2, 12, 2), dict(strides=1, padding=1)),  # 1-D signal, explicit padding
  ],
)
@pytest.mark.slow
def test_conv_fully_active_matches_flax_conv(shape, kwargs):
  x = _normal(3, shape)
  nd = len(shape) - 2
  layer = CapacityConv(8, 3, chunks=4, initial_chunks=4, **kwargs)
  variables = jax.jit(layer.init)(KEY, x)
  params = _randomised(variables["params"])
  ours = jax.jit(layer.apply)({"params": params, CAPACITY: variables[CAPACITY]}, x)
  ref = jax.jit(nn.Conv(8, (3,) * nd, **kwargs).apply)({"params": params}, x)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "shape, strides",
  [((2, 8, 8, 3), 2), ((2, 6, 6, 8), 1), ((3, 8), 1)],
  ids=["projection", "identity", "dense"],
)
@pytest.mark.slow
def test_residual_block_output_follows_active_chunks(shape, strides):
  block = CapacityResidualBlock(8, chunks=4, initial_chunks=2, strides=strides)
  x = _normal(4, shape)
  variables = jax.jit(block.init)(KEY, x)
  assert set(variables[CAPACITY]) == {"active", "chunks"}
  subs = set(variables["params"])
  assert subs == (
    {"conv1", "conv2"} if shape[-1] == 8 and strides == 1 else {"conv1", "conv2", "proj"}
  )
  params = _randomised(variables["params"])
  cap = variables[CAPACITY]
  y = jax.jit(block.apply)({"params": params, CAPACITY: cap}, x)
  assert np.all(np.asarray(y[..., 4:]) == 0.0) and np.count_nonzero(y[..., :4]) > 0
  y_full = jax.jit(block.apply)({"params": params, CAPACITY: {**cap, "active": jnp.int32(4)}}, x)
  assert np.count_nonzero(y_full[..., 4:]) > 0

  def loss(p):
    return jnp.sum(jnp.sin(block.apply({"params": p, CAPACITY: cap}, x)))

  g = jax.jit(jax.grad(loss))(params)
  for sub in subs:
    assert np.all(np.asarray(g[sub]["kernel"][..., 4:]) == 0.0), sub
    assert np.all(np.asarray(g[sub]["bias"][4:]) == 0.0), sub
    assert np.count_nonzero(g[sub]["kernel"][..., :4]) > 0, sub
  assert np.all(np.asarray(g["conv2"]["kernel"][..., 4:, :]) == 0.0)


# --------------------------------------------------------------------------- training behaviour


@pytest.mark.slow
def test_sgd_leaves_inactive_parameters_bit_identical():
  model, variables = _model("capacity_mlp", (5,), 2, widths=(12, 9), chunks=3)
  cap = _with_active(variables[CAPACITY], {"CapacityDense_0": 2, "CapacityDense_1": 1})
  params0 = _randomised(variables["params"])
  x = _normal(5, (16, 5))
  y = _normal(6, (16, 2))
  tx = optax.sgd(0.05, momentum=0.9)

  def loss(p):
    out, new_state = model.apply({"params": p, CAPACITY: cap}, x, train=True)
    assert new_state == {}
    return jnp.mean((out - y) ** 2)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(step, (p, tx.init(p)), length=50)[0][0]

  p = train(params0)
  a0, a1 = 8, 3  # active units of the two hidden layers
  frozen_views = [
    ("CapacityDense_0", "kernel", np.s_[:, a0:]),
    ("CapacityDense_0", "bias", np.s_[a0:]),
    ("CapacityDense_1", "kernel", np.s_[a0:, :]),
    ("CapacityDense_1", "kernel", np.s_[:, a1:]),
    ("CapacityDense_1", "bias", np.s_[a1:]),
    ("Dense_0", "kernel", np.s_[a1:, :]),
  ]
  for layer, leaf, view in frozen_views:
    np.testing.assert_array_equal(
      np.asarray(p[layer][leaf])[view], np.asarray(params0[layer][leaf])[view], f"{layer}/{leaf}"
    )
  for layer, leaf, view in [
    ("CapacityDense_0", "kernel", np.s_[:, :a0]),
    ("CapacityDense_1", "kernel", np.s_[:a0, :a1]),
    ("Dense_0", "kernel", np.s_[:a1, :]),
    ("Dense_0", "bias", np.s_[:]),
  ]:
    changed = np.asarray(p[layer][leaf])[view] != np.asarray(params0[layer][leaf])[view]
    assert changed.all(), f"{layer}/{leaf}"


@pytest.mark.slow
def test_forward_equals_float64_active_subnetwork():
  model, variables = _model("capacity_mlp", (4,), 3, widths=(10, 15), chunks=5)
  params = _randomised(variables["params"], seed=7)
  cap = _with_active(variables[CAPACITY], {"CapacityDense_0": 3, "CapacityDense_1": 2})
  x = _normal(8, (6, 4))
  out, _ = model.apply({"params": params, CAPACITY: cap}, x, train=False)
  x = np.asarray(x, np.float64)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  n0, n1 = 3 * 2, 2 * 3  # active chunks · chunk size
  h = np.tanh(x @ p["CapacityDense_0"]["kernel"][:, :n0] + p["CapacityDense_0"]["bias"][:n0])
  h = np.tanh(h @ p["CapacityDense_1"]["kernel"][:n0, :n1] + p["CapacityDense_1"]["bias"][:n1])
  ref = h @ p["Dense_0"]["kernel"][:n1] + p["Dense_0"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_expansion_under_jit_does_not_retrace():
  model, variables = _model("capacity_mlp", (4,), 3, widths=(10, 15), chunks=5)
  params = _randomised(variables["params"], seed=9)
  x = _normal(10, (6, 4))
  traces = []

  @jax.jit
  def forward(variables, x):
    traces.append(1)
    return model.apply(variables, x, train=False)[0]

  outs = []
  for active in (1, 2, 3):
    cap = _with_active(variables[CAPACITY], {"CapacityDense_0": active, "CapacityDense_1": active})
    outs.append(np.asarray(forward({"params": params, CAPACITY: cap}, x)))
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


# --------------------------------------------------------------------------- trainable_mask


def _mlp_expected(case: str, keep: str = "new") -> dict:
  """Hand-written masks of capacity_mlp widths=(6, 6), chunks=3 (chunk size 2), 4 → 2.

  ``keep``: once a chunk is frozen, the output layer's bias (``"bias"``) or its whole
  active part (``"output"``) stays trainable too."""
  z = functools.partial(np.zeros, dtype=bool)
  k0, b0, k1, b1, k2, b2 = z((4, 6)), z(6), z((6, 6)), z(6), z((6, 2)), z(2)
  if case == "active2_frozen1":  # both layers: units 0-3 active, 2-3 new
    k0[:, 2:4] = b0[2:4] = True
    k1[0:4, 2:4] = k1[2:4, 0:4] = b1[2:4] = True
    k2[2:4, :] = True
  elif case == "active1_frozen0":  # nothing frozen: every active entry trains
    k0[:, 0:2] = b0[0:2] = True
    k1[0:2, 0:2] = b1[0:2] = True
    k2[0:2, :] = True
    b2[:] = True
  elif case == "mixed":  # layer 0: active 3, frozen 2 (new 4-5); layer 1: active 1, frozen 0
    k0[:, 4:6] = b0[4:6] = True
    k1[:, 0:2] = b1[0:2] = True  # all its active units are new; reads of 4-5 are inside
    k2[0:2, :] = True
  if case != "active1_frozen0" and keep in ("bias", "output"):
    b2[:] = True
  if keep == "output":  # the rows that read active units of CapacityDense_1
    k2[: 2 * {"active2_frozen1": 2, "mixed": 1}[case], :] = True
  return {
    "CapacityDense_0": {"kernel": k0, "bias": b0},
    "CapacityDense_1": {"kernel": k1, "bias": b1},
    "Dense_0": {"kernel": k2, "bias": b2},
  }


@pytest.mark.parametrize(
  "case, active, frozen, keep",
  [
    ("active2_frozen1", (2, 2), (1, 1), "new"),
    ("active2_frozen1", (2, 2), (1, 1), "bias"),
    ("active2_frozen1", (2, 2), (1, 1), "output"),
    ("active1_frozen0", (1, 1), (0, 0), "bias"),
    ("mixed", (3, 1), (2, 0), "bias"),
    ("mixed", (3, 1), (2, 0), "output"),
  ],
)
@pytest.mark.slow
def test_trainable_mask_mlp(case, active, frozen, keep):
  _, variables = _model("capacity_mlp", (4,), 2, widths=(6, 6), chunks=3)
  names = ("CapacityDense_0", "CapacityDense_1")
  cap = _with_active(variables[CAPACITY], dict(zip(names, active, strict=True)))
  fro = {n: jnp.asarray(f, jnp.int32) for n, f in zip(names, frozen, strict=True)}
  got = jax.jit(functools.partial(trainable_mask, keep=keep))(variables["params"], cap, fro)
  want = _mlp_expected(case, keep)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, g), w in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
  ):
    assert g.dtype == jnp.bool_
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_trainable_mask_errors_and_missing_keys():
  _, variables = _model("capacity_mlp", (4,), 2, widths=(6, 6), chunks=3)
  with pytest.raises(ValueError, match="nope"):
    trainable_mask(variables["params"], variables[CAPACITY], {"nope": 1})
  # Missing layers count as frozen = 0: all active entries train.
  got = trainable_mask(variables["params"], variables[CAPACITY], {})
  np.testing.assert_array_equal(got["Dense_0"]["bias"], [True, True])
  np.testing.assert_array_equal(
    got["CapacityDense_1"]["kernel"], _mlp_expected("active1_frozen0")["CapacityDense_1"]["kernel"]
  )
  with pytest.raises(ValueError, match="capacity"):
    trainable_mask(variables["params"], {}, {})
  with pytest.raises(ValueError, match=r"keep must be one of \('new', 'bias', 'output'\)"):
    trainable_mask(variables["params"], variables[CAPACITY], {}, keep="head")


@pytest.mark.slow
def test_trainable_mask_conv_flatten_dense():
  # 8x8 -> pool 4x4 -> pool 2x2: CapacityDense_0 reads 2*2*6 = 24 rows, channels last.
  model, variables = _model("capacity_cnn", (8, 8, 1), 3, features=(4, 6), hidden=4, chunks=2)
  params = variables["params"]
  assert params["CapacityDense_0"]["kernel"].shape == (24, 4)
  names = ("CapacityConv_0", "CapacityConv_1", "CapacityDense_0")
  cap = _with_active(variables[CAPACITY], dict.fromkeys(names, 2))
  got = jax.jit(trainable_mask)(params, cap, dict.fromkeys(names, jnp.int32(1)))
  channel_of_row = np.broadcast_to(np.arange(6), (2, 2, 6)).reshape(-1)  # numpy's flatten
  want = np.zeros((24, 4), bool)
  for r in range(24):
    for j in range(4):
      want[r, j] = j in (2, 3) or channel_of_row[r] in (3, 4, 5)
  np.testing.assert_array_equal(got["CapacityDense_0"]["kernel"], want)
  want_conv = np.zeros((3, 3, 4, 6), bool)
  want_conv[..., 3:6] = True  # new output channels (chunk 1 of 2, size 3)
  want_conv[:, :, 2:4, :] = True  # rows that read new channels of CapacityConv_0
  np.testing.assert_array_equal(got["CapacityConv_1"]["kernel"], want_conv)
  np.testing.assert_array_equal(got["Dense_0"]["kernel"], np.repeat([[0], [0], [1], [1]], 3, 1) > 0)
  assert np.all(got["Dense_0"]["bias"])  # the output bias keeps training (keep="bias")

  # The flatten layout agrees with the model: with channels 3-5 of CapacityConv_1 inactive,
  # every row that the (unfrozen) mask calls inactive gets exactly zero gradient.
  cap1 = _with_active(cap, {"CapacityConv_1": 1})
  mask = jax.jit(trainable_mask)(params, cap1, {})["CapacityDense_0"]["kernel"]
  x = _normal(11, (4, 8, 8, 1))

  def loss(p):
    return jnp.sum(jnp.sin(model.apply({"params": p, CAPACITY: cap1}, x, train=False)[0]))

  g = jax.jit(jax.grad(loss))(params)["CapacityDense_0"]["kernel"]
  assert np.all(np.asarray(g)[~np.asarray(mask)] == 0.0)
  assert np.count_nonzero(np.asarray(g)[np.asarray(mask)]) > 0
  assert not np.asarray(mask).all()


class _BlockNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(CapacityConv(8, 3, chunks=4)(x))
    x = CapacityResidualBlock(8, chunks=4, strides=2)(x)
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.slow
def test_trainable_mask_residual_block():
  net = _BlockNet()
  variables = jax.jit(net.init)(KEY, jnp.zeros((1, 8, 8, 2)))
  infos = capacity_layers(variables["params"], variables[CAPACITY])
  assert infos == {
    "CapacityConv_0": CapacityInfo("CapacityConv_0", 8, 4),
    "CapacityResidualBlock_0": CapacityInfo("CapacityResidualBlock_0", 8, 4),
  }
  cap = _with_active(variables[CAPACITY], {"CapacityConv_0": 2, "CapacityResidualBlock_0": 3})
  fro = {"CapacityConv_0": 1, "CapacityResidualBlock_0": 2}
  got = jax.jit(trainable_mask)(variables["params"], cap, fro)
  blk = got["CapacityResidualBlock_0"]
  stem_active, stem_new = set(range(4)), {2, 3}
  blk_active, blk_new = set(range(6)), {4, 5}
  for sub, (ins_active, ins_new) in {
    "conv1": (stem_active, stem_new),
    "proj": (stem_active, stem_new),
    "conv2": (blk_active, blk_new),
  }.items():
    want = np.zeros(blk[sub]["kernel"].shape, bool)
    for i in range(8):
      for j in range(8):
        want[..., i, j] = (j in blk_new and i in ins_active) or (i in ins_new and j in blk_active)
    np.testing.assert_array_equal(blk[sub]["kernel"], want, err_msg=sub)
    np.testing.assert_array_equal(blk[sub]["bias"], [j in blk_new for j in range(8)])
  np.testing.assert_array_equal(got["Dense_0"]["kernel"][:, 0], [i in blk_new for i in range(8)])


# --------------------------------------------------------------------------- reinit_chunk


def _changed(a, b) -> np.ndarray:
  return np.asarray(a) != np.asarray(b)


@pytest.mark.slow
def test_reinit_chunk_dense_scale_and_locality():
  _, variables = _model("capacity_mlp", (30,), 1, widths=(500, 500), chunks=5)
  params = _randomised(variables["params"], seed=12)
  cap = _with_active(variables[CAPACITY], {"CapacityDense_0": 2, "CapacityDense_1": 3})
  new = reinit_chunk(jax.random.key(13), params, cap, "CapacityDense_1", 2)
  k_old, k_new = params["CapacityDense_1"]["kernel"], new["CapacityDense_1"]["kernel"]
  want = np.zeros((500, 500), bool)
  want[:, 200:300] = True
  np.testing.assert_array_equal(_changed(k_new, k_old), want)
  b_new = np.asarray(new["CapacityDense_1"]["bias"])
  assert np.all(b_new[200:300] == 0.0)
  np.testing.assert_array_equal(
    np.delete(b_new, np.s_[200:300]),
    np.delete(np.asarray(params["CapacityDense_1"]["bias"]), np.s_[200:300]),
  )
  for layer in ("CapacityDense_0", "Dense_0"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(new[layer][leaf], params[layer][leaf])
  # LeCun normal for the active fan-in 2 · 100 = 200 inputs (not 500): std = sqrt(1 / 200).
  cols = np.asarray(k_new[:, 200:300], np.float64)
  assert abs(cols.std() / np.sqrt(1 / 200) - 1) < 0.03
  assert abs(cols.mean()) < 4 * np.sqrt(1 / 200) / np.sqrt(cols.size)

  # The first layer reads the raw input (30 features), whatever is active.
  new0 = reinit_chunk(jax.random.key(14), params, cap, "CapacityDense_0", 1)
  cols0 = np.asarray(new0["CapacityDense_0"]["kernel"][:, 100:200], np.float64)
  assert abs(cols0.std() / np.sqrt(1 / 30) - 1) < 0.06

  # Jitted with a traced chunk (and traced capacity): only chunk 4 changes.
  jitted = jax.jit(lambda k, p, c, ch: reinit_chunk(k, p, c, "CapacityDense_1", ch))
  new4 = jitted(jax.random.key(15), params, cap, jnp.int32(4))
  want = np.zeros((500, 500), bool)
  want[:, 400:500] = True
  np.testing.assert_array_equal(_changed(new4["CapacityDense_1"]["kernel"], k_old), want)
  cols4 = np.asarray(new4["CapacityDense_1"]["kernel"][:, 400:], np.float64)
  assert abs(cols4.std() / np.sqrt(1 / 200) - 1) < 0.03

  with pytest.raises(ValueError, match="Dense_0"):
    reinit_chunk(KEY, params, cap, "Dense_0", 0)
  with pytest.raises(ValueError, match="chunk"):
    reinit_chunk(KEY, params, cap, "CapacityDense_1", 5)


@pytest.mark.slow
def test_reinit_chunk_conv_and_flatten_fan_in():
  _, variables = _model("capacity_cnn", (8, 8, 1), 10, features=(32, 64), hidden=16, chunks=4)
  params = variables["params"]
  cap = _with_active(variables[CAPACITY], {"CapacityConv_0": 2, "CapacityConv_1": 1})
  new = reinit_chunk(jax.random.key(16), params, cap, "CapacityConv_1", 1)
  want = np.zeros((3, 3, 32, 64), bool)
  want[..., 16:32] = True
  np.testing.assert_array_equal(
    _changed(new["CapacityConv_1"]["kernel"], params["CapacityConv_1"]["kernel"]), want
  )
  cols = np.asarray(new["CapacityConv_1"]["kernel"][..., 16:32], np.float64)
  assert abs(cols.std() / np.sqrt(1 / (9 * 16)) - 1) < 0.05  # 3x3 window x 16 active channels
  # After the flatten: 2·2 positions x 16 active channels of CapacityConv_1 = 64 inputs.
  new_d = reinit_chunk(jax.random.key(17), params, cap, "CapacityDense_0", 0)
  cols_d = np.asarray(new_d["CapacityDense_0"]["kernel"][:, 0:4], np.float64)
  assert cols_d.shape == (256, 4)
  assert abs(cols_d.std() / np.sqrt(1 / 64) - 1) < 0.08


# --------------------------------------------------------------------------- zoo models


@pytest.mark.slow
def test_capacity_mlp_zoo_model_sine():
  model, variables = _model("capacity_mlp", (1,), 1)
  assert isinstance(model, models.ModelDef) and model.name == "capacity_mlp"
  assert not model.has_batch_stats and not model.has_dropout
  assert set(variables) == {"params", CAPACITY}
  assert variables["params"]["CapacityDense_0"]["kernel"].shape == (1, 500)
  cap = variables[CAPACITY]["CapacityDense_0"]
  assert cap["active"].dtype == jnp.int32 and int(cap["active"]) == 1 and int(cap["chunks"]) == 5
  assert capacity_layers(variables["params"], variables[CAPACITY]) == {
    "CapacityDense_0": CapacityInfo("CapacityDense_0", 500, 5)
  }
  x = jnp.linspace(-1.0, 1.0, 8)[:, None]
  for train in (False, True):
    out, new_state = model.apply(variables, x, train=train)
    assert out.shape == (8, 1) and new_state == {}
  relu = models.build("capacity_mlp", (1,), 1, activation="relu", widths=(20, 10), chunks=2)
  assert relu.apply(relu.init(KEY, x), x, train=False)[0].shape == (8, 1)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 8, 1), (40, 1)])
def test_capacity_cnn_zoo_model_digits(shape):
  model, variables = _model("capacity_cnn", shape, 10)
  params = variables["params"]
  assert set(params) == {"CapacityConv_0", "CapacityConv_1", "CapacityDense_0", "Dense_0"}
  infos = capacity_layers(params, variables[CAPACITY])
  assert [(i.key, i.features, i.chunks) for i in infos.values()] == [
    ("CapacityConv_0", 30, 10),
    ("CapacityConv_1", 60, 10),
    ("CapacityDense_0", 120, 10),
  ]
  x = _normal(18, (3, *shape))
  out, new_state = model.apply(variables, x, train=True)
  assert out.shape == (3, 10) and new_state == {}
  assert np.all(np.isfinite(np.asarray(out)))


# --------------------------------------------------------------------------- initialisers


@pytest.mark.slow
def test_kernel_init_draws_the_full_width():
  # A masked layer draws its weights for the FULL width: its initial kernel is that of an
  # unmasked layer of full width with the same initialiser and key, whatever is active.
  x = jnp.zeros((2, 3))
  glorot = nn.initializers.glorot_uniform()
  masked = CapacityDense(500, chunks=5, kernel_init="glorot_uniform").init(KEY, x)["params"]
  dense = nn.Dense(500, kernel_init=glorot).init(KEY, x)["params"]
  np.testing.assert_array_equal(masked["kernel"], dense["kernel"])
  np.testing.assert_array_equal(masked["bias"], np.zeros(500))
  # Glorot uniform's fans are those of the full kernel (3 in, 500 out): |w| <= sqrt(6 / 503)
  # and the draws fill that range; a chunk's own fans (3, 100) would allow sqrt(6 / 103).
  w = np.abs(np.asarray(masked["kernel"], np.float64))
  bound = np.sqrt(6 / 503)
  assert w.max() <= bound and w.max() > 0.99 * bound
  xi = jnp.zeros((1, 6, 6, 2))
  conv = CapacityConv(10, 3, chunks=5, kernel_init="xavier_normal", bias_init="ones")
  got = conv.init(KEY, xi)["params"]
  glorot_normal = nn.initializers.glorot_normal()
  ref = nn.Conv(10, (3, 3), kernel_init=glorot_normal, bias_init=nn.initializers.ones)
  want = ref.init(KEY, xi)["params"]
  np.testing.assert_array_equal(got["kernel"], want["kernel"])
  np.testing.assert_array_equal(got["bias"], np.ones(10))


class _SineNet(nn.Module):
  """The unmasked reference of CapacityMLP(widths=(500,)): nn.Dense layers of the same names."""

  init_fn: Any

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(500, kernel_init=self.init_fn, name="CapacityDense_0")(x))
    return nn.Dense(1, kernel_init=self.init_fn, name="Dense_0")(h)


@pytest.mark.parametrize(
  "name, init_fn",
  [
    ("glorot_uniform", nn.initializers.glorot_uniform()),
    (None, nn.initializers.lecun_normal()),  # the default: LeCun normal, as before the option
  ],
)
def test_zoo_kernel_init_applies_to_every_layer(name, init_fn):
  x = jnp.zeros((2, 1))
  kw = {} if name is None else {"kernel_init": name}
  got = CapacityMLP(widths=(500,), **kw).init(KEY, x)["params"]
  want = _SineNet(init_fn).init(KEY, x)["params"]
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
  ):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_initializer_names_and_errors():
  assert {"glorot_uniform", "glorot_normal", "lecun_normal", "he_normal"} <= set(INITIALIZERS)
  # he_normal: variance 2 / fan_in (fan_in = 50), sampled (truncated normal rescaled to it).
  w = np.asarray(initializer("he_normal")(KEY, (50, 400)), np.float64)
  assert abs(w.std() / np.sqrt(2 / 50) - 1) < 0.03
  f = nn.initializers.zeros_init()
  assert initializer(f) is f
  with pytest.raises(ValueError, match=r"kernel_init must be one of .*'glorot_uniform'.*'glorot'"):
    models.build("capacity_mlp", (1,), 1, kernel_init="glorot")
  with pytest.raises(ValueError, match=r"bias_init must be one of .*got 3"):
    models.build("capacity_cnn", (8, 8, 1), 10, bias_init=3)
  with pytest.raises(ValueError, match=r"CapacityDense: kernel_init must be one of"):
    CapacityDense(4, chunks=2, kernel_init="nope").init(KEY, jnp.zeros((1, 2)))


def test_zoo_build_errors():
  with pytest.raises(ValueError, match=r"chunks=3.*\[500\]"):
    models.build("capacity_mlp", (1,), 1, chunks=3)
  with pytest.raises(ValueError, match="activation"):
    models.build("capacity_mlp", (1,), 1, activation="sigmoid")
  with pytest.raises(ValueError, match="initial_chunks"):
    models.build("capacity_cnn", (8, 8, 1), 10, initial_chunks=11)
  assert "capacity_mlp" in models.names() and "capacity_cnn" in models.names()
