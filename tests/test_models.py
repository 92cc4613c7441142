"""Tests of the model zoo: one jitted SGD step per model, parameter counts, bad input."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscope import models
from jaxscope.tree import leaf_infos

# (name, input_shape, num_classes, kwargs): small configurations that compile fast. XLA
# compilation dominates on CPU, so every configuration is initialised and stepped once and
# the results are shared by the tests below.
TRAIN_CASES = [
  ("mlp", (8, 8, 1), 10, {}),
  ("mlp", (40, 1), 10, {}),
  ("mlp", (1,), 1, {}),  # sine regression
  ("mnist_mlp", (8, 8, 1), 10, {}),
  ("2c2d", (8, 8, 1), 10, {}),
  ("2c2d", (40, 1), 10, {}),
  ("3c3d", (12, 12, 1), 10, {}),
  ("3c3d", (8, 8, 1), 10, {"padding": "SAME"}),
  ("lenet5", (8, 8, 1), 10, {}),
  ("lenet5", (40, 1), 10, {}),
  ("alexnet_mini", (8, 8, 1), 10, {}),
  ("alexnet_mini", (40, 1), 10, {}),
  ("resnet", (8, 8, 1), 10, {"depth": 8}),
  ("densenet_bc", (8, 8, 1), 10, {"depth": 10}),
  ("nnx_cnn", (8, 8, 1), 10, {}),
  ("nnx_cnn", (40, 1), 10, {}),
]
# Deeper presets and 1-D variants of the BatchNorm models: the same train step is traced
# with jax.eval_shape (shapes, structure, jit-ability) but not compiled, to keep the file fast.
TRACE_CASES = [
  ("resnet20", (8, 8, 1), 10, {}),
  ("resnet56", (8, 8, 1), 10, {}),
  ("resnet", (40, 1), 10, {"depth": 8}),
  ("densenet_bc", (40, 1), 3, {"block_sizes": (1, 2), "growth_rate": 4}),
]
BATCH = 4


def _case_id(case):
  name, shape, k, kw = case
  return f"{name}-{'x'.join(map(str, shape))}-{k}" + ("-" + "-".join(kw) if kw else "")


def _batch(shape, num_classes, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (BATCH, *shape), jnp.float32)
  if num_classes == 1:
    y = jnp.sin(3.0 * x.reshape(BATCH, -1)[:, :1])
  else:
    y = jax.random.randint(ky, (BATCH,), 0, num_classes)
  return x, y


def _leaves_differ(a, b):
  return [
    not np.allclose(np.asarray(u), np.asarray(v))
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  ]


def _make_step(model, num_classes, tx):
  def loss_fn(p, bs, x, y, rng):
    v = {"params": p, "batch_stats": bs} if model.has_batch_stats else {"params": p}
    out, new_state = model.apply(v, x, train=True, rng=rng)
    if num_classes == 1:
      loss = jnp.mean((out - y) ** 2)
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return loss, (out, new_state)

  def step(p, bs, o, x, y, rng):
    (loss, (out, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, bs, x, y, rng)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss, out, new_state

  return step


@functools.cache
def _run(case_id):
  """Builds, initialises (jitted, keys 0, 0 and 1) and takes one jitted SGD step."""
  name, shape, num_classes, kwargs = next(c for c in TRAIN_CASES if _case_id(c) == case_id)
  model = models.build(name, shape, num_classes, **kwargs)
  x, y = _batch(shape, num_classes)
  init = model.init  # Jitted by the ModelDef.
  variables = init(jax.random.key(0), x)
  tx = optax.sgd(0.1)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  step = jax.jit(_make_step(model, num_classes, tx))
  new_params, _, loss, out, new_state = step(
    params, batch_stats, tx.init(params), x, y, jax.random.key(2)
  )
  return dict(
    model=model,
    x=x,
    variables=variables,
    again=init(jax.random.key(0), x),
    other=init(jax.random.key(1), x),
    new_params=new_params,
    loss=loss,
    out=out,
    new_state=new_state,
  )


def test_every_registered_model_is_exercised():
  # The dynamic-capacity models (a "capacity" collection) are exercised in
  # tests/test_capacity_models.py, the transformers in tests/test_transformer.py.
  capacity = {"capacity_mlp", "capacity_cnn"}
  transformers = {"transformer_lm", "nnx_transformer_lm", "vit"}
  assert set(models.names()) - capacity - transformers == {c[0] for c in TRAIN_CASES + TRACE_CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", TRAIN_CASES, ids=_case_id)
def test_one_sgd_step(case):
  name, shape, num_classes, _ = case
  r = _run(_case_id(case))
  model, variables = r["model"], r["variables"]
  assert isinstance(model, models.ModelDef)
  assert model.name == name and model.input_shape == shape and model.num_classes == num_classes
  assert ("batch_stats" in variables) == model.has_batch_stats
  assert set(variables) <= {"params", "batch_stats"}
  for leaf in jax.tree_util.tree_leaves(variables):
    assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
  # init is deterministic for a key and depends on it.
  assert not any(_leaves_differ(variables, r["again"]))
  assert any(_leaves_differ(variables["params"], r["other"]["params"]))

  assert r["out"].shape == (BATCH, num_classes)
  assert r["out"].dtype == jnp.float32
  assert np.isfinite(float(r["loss"]))
  params = variables["params"]
  changed = _leaves_differ(params, r["new_params"])
  assert all(changed), [i.name for i, c in zip(leaf_infos(params), changed, strict=True) if not c]

  new_state = r["new_state"]
  if model.has_batch_stats:
    assert set(new_state) == {"batch_stats"}
    stats = variables["batch_stats"]
    treedef = jax.tree_util.tree_structure(stats)
    assert jax.tree_util.tree_structure(new_state["batch_stats"]) == treedef
    assert all(_leaves_differ(stats, new_state["batch_stats"]))
  else:
    assert new_state == {}


@pytest.mark.parametrize("case", TRACE_CASES, ids=_case_id)
def test_traced_sgd_step(case):
  name, shape, num_classes, kwargs = case
  model = models.build(name, shape, num_classes, **kwargs)
  x, y = _batch(shape, num_classes)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  tx = optax.sgd(0.1)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = jax.eval_shape(tx.init, params)
  step = _make_step(model, num_classes, tx)
  new_params, _, loss, out, new_state = jax.eval_shape(
    step, params, stats, opt_state, x, y, jax.random.key(0)
  )
  assert out.shape == (BATCH, num_classes) and loss.shape == ()
  assert jax.tree_util.tree_structure(new_params) == jax.tree_util.tree_structure(params)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(
    {"batch_stats": stats}
  )


@pytest.mark.slow
def test_batchnorm_eval_mode_and_momentum():
  r = _run(_case_id(("resnet", (8, 8, 1), 10, {"depth": 8})))
  model, variables, x = r["model"], r["variables"], r["x"]
  # momentum 0.9 from mean 0: new_mean = 0.1 * batch mean of conv1's output.
  k = variables["params"]["conv1"]["kernel"]
  h = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  expected = 0.1 * np.asarray(h).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(r["new_state"]["batch_stats"]["bn1"]["mean"], expected, atol=1e-5)
  # Eval mode uses the running averages (changing them changes the output) and returns {}.
  apply = jax.jit(lambda v: model.apply(v, x, train=False))
  out1, state1 = apply(variables)
  out2, _ = apply({**variables, **r["new_state"]})
  assert state1 == {} and out1.shape == (BATCH, 10)
  assert not np.allclose(out1, out2)


@pytest.mark.slow
@pytest.mark.parametrize(
  "case",
  [c for c in TRAIN_CASES if c[0] in ("alexnet_mini", "nnx_cnn") or c[:2] == ("mlp", (8, 8, 1))],
  ids=_case_id,
)
def test_dropout_only_in_train_mode(case):
  r = _run(_case_id(case))
  model, variables, x = r["model"], r["variables"], r["x"]
  apply = jax.jit(model.apply, static_argnames="train")
  eval1, _ = apply(variables, x, train=False)
  eval2, _ = apply(variables, x, train=False, rng=jax.random.key(5))
  np.testing.assert_array_equal(eval1, eval2)
  train1, _ = apply(variables, x, train=True, rng=jax.random.key(1))
  train2, _ = apply(variables, x, train=True, rng=jax.random.key(2))
  train1b, _ = apply(variables, x, train=True, rng=jax.random.key(1))
  np.testing.assert_array_equal(train1, train1b)
  if model.has_dropout:
    assert not np.allclose(train1, train2)
    assert not np.allclose(train1, eval1)
    with pytest.raises(ValueError, match="rng"):
      model.apply(variables, x, train=True)
  else:
    np.testing.assert_array_equal(train1, train2)
    np.testing.assert_allclose(train1, eval1, rtol=1e-6)


def test_model_flags():
  def build(n):
    shape = (8,) if n.endswith("transformer_lm") else (8, 8, 1)  # token ids [T]
    return models.build(n, shape, 10, **({"padding": "SAME"} if n == "3c3d" else {}))

  assert {n for n in models.names() if build(n).has_dropout} == {"alexnet_mini", "nnx_cnn"}
  assert not models.build("nnx_cnn", (8, 8, 1), 10, dropout_rate=0.0).has_dropout
  bn = {n for n in models.names() if build(n).has_batch_stats}
  assert bn == {"resnet", "resnet20", "resnet56", "densenet_bc"}


# --- parameter counts against hand formulas ----------------------------------------------


def _count(name, shape, num_classes=10, **kwargs):
  model = models.build(name, shape, num_classes, **kwargs)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
  return models.count_params(variables["params"]), variables


def dense(n_in, n_out):
  return n_in * n_out + n_out


def conv(k, c_in, c_out, ndim=2, bias=True):
  return k**ndim * c_in * c_out + (c_out if bias else 0)


def same(n, s=2):
  return math.ceil(n / s)


def test_count_mlp():
  assert _count("mlp", (8, 8, 1))[0] == dense(64, 128) + dense(128, 64) + dense(64, 10)
  assert _count("mlp", (1,), 1)[0] == dense(1, 128) + dense(128, 64) + dense(64, 1)
  assert _count("mlp", (40, 1), 3, hidden_sizes=(7,))[0] == dense(40, 7) + dense(7, 3)
  assert _count("mlp", (5,), 2, hidden_sizes=())[0] == dense(5, 2)


def test_count_mnist_mlp():
  count, _ = _count("mnist_mlp", (28, 28, 1))
  assert count == 784 * 1000 + 1000 + 1000 * 500 + 500 + 500 * 100 + 100 + 100 * 10 + 10
  assert count == 1_336_610


def test_count_2c2d():
  def formula(h, w, c, k=10):
    flat = same(same(h)) * same(same(w)) * 64
    return conv(5, c, 32) + conv(5, 32, 64) + dense(flat, 1024) + dense(1024, k)

  assert _count("2c2d", (28, 28, 1))[0] == formula(28, 28, 1) == 3_274_634
  assert _count("2c2d", (8, 8, 1))[0] == formula(8, 8, 1)
  flat_1d = same(same(40)) * 64
  assert _count("2c2d", (40, 1))[0] == (
    conv(5, 1, 32, 1) + conv(5, 32, 64, 1) + dense(flat_1d, 1024) + dense(1024, 10)
  )


def test_count_3c3d():
  # 32 -conv5 VALID-> 28 -pool3/2 SAME-> 14 -conv3 VALID-> 12 -> 6 -conv3 SAME-> 6 -> 3.
  side = same(same(same(32 - 4) - 2))
  assert side == 3
  expected = (
    conv(5, 3, 64)
    + conv(3, 64, 96)
    + conv(3, 96, 128)
    + dense(side * side * 128, 512)
    + dense(512, 256)
    + dense(256, 10)
  )
  assert _count("3c3d", (32, 32, 3))[0] == expected == 895_210
  # All-SAME variant on 8x8: 8 -> 4 -> 2 -> 1.
  assert _count("3c3d", (8, 8, 1), padding="SAME")[0] == (
    conv(5, 1, 64) + conv(3, 64, 96) + conv(3, 96, 128) + dense(128, 512) + dense(512, 256)
  ) + dense(256, 10)


def test_count_lenet5():
  def formula(h, w, c, k=10):
    flat = same(same(h)) * same(same(w)) * 16
    return conv(3, c, 6) + conv(3, 6, 16) + dense(flat, 120) + dense(120, 84) + dense(84, k)

  assert _count("lenet5", (8, 8, 1))[0] == formula(8, 8, 1) == 19_754
  assert _count("lenet5", (28, 28, 1))[0] == formula(28, 28, 1) == 106_154
  assert _count("lenet5", (40, 1))[0] == (
    conv(3, 1, 6, 1) + conv(3, 6, 16, 1) + dense(10 * 16, 120) + dense(120, 84) + dense(84, 10)
  )


def test_count_alexnet_mini():
  def formula(h, w, c, k=10):
    flat = ((h - 4) // 2) * ((w - 4) // 2) * 8
    return conv(3, c, 4) + conv(3, 4, 8) + dense(flat, 16) + dense(16, k)

  assert _count("alexnet_mini", (8, 8, 1))[0] == formula(8, 8, 1) == 1_034
  assert _count("alexnet_mini", (32, 32, 3))[0] == formula(32, 32, 3) == 25_682
  assert _count("alexnet_mini", (9, 7, 2), 4)[0] == formula(9, 7, 2, 4)
  assert _count("alexnet_mini", (40, 1))[0] == (
    conv(3, 1, 4, 1) + conv(3, 4, 8, 1) + dense(18 * 8, 16) + dense(16, 10)
  )


def _resnet_formula(depth, c_in, k=10, widths=(16, 32, 64), ndim=2):
  """Option-B CIFAR ResNet: bias-free convs, BN has scale + bias per channel."""
  n = (depth - 2) // 6
  bn = 2
  total = conv(3, c_in, widths[0], ndim, bias=False) + bn * widths[0]
  prev = widths[0]
  for w in widths:
    for b in range(n):
      total += conv(3, prev, w, ndim, bias=False) + bn * w
      total += conv(3, w, w, ndim, bias=False) + bn * w
      if b == 0 and prev != w:
        total += conv(1, prev, w, ndim, bias=False) + bn * w
      prev = w
  return total + dense(widths[-1], k)


def test_count_resnet():
  count, variables = _count("resnet20", (32, 32, 3))
  assert count == _resnet_formula(20, 3) == 272_474
  # Option A (no projections) would have 2 fewer 1x1 convs + BNs: the paper's 0.27M.
  assert count - (16 * 32 + 2 * 32) - (32 * 64 + 2 * 64) == 269_722
  # Running mean and variance per BN channel.
  assert models.count_params(variables["batch_stats"]) == 2 * (
    16 + 3 * 2 * 16 + 3 * 2 * 32 + 32 + 3 * 2 * 64 + 64
  )
  assert _count("resnet56", (32, 32, 3))[0] == _resnet_formula(56, 3)
  assert _count("resnet", (32, 32, 3), depth=32)[0] == _resnet_formula(32, 3)
  assert _count("resnet", (40, 1), 5, depth=8)[0] == _resnet_formula(8, 1, 5, ndim=1)


def _densenet_formula(blocks, c_in, k=10, growth=12, compression=0.5):
  ch = 2 * growth
  total = conv(3, c_in, ch, bias=False)
  for i, n in enumerate(blocks):
    for _ in range(n):
      total += 2 * ch + conv(1, ch, 4 * growth, bias=False)
      total += 2 * 4 * growth + conv(3, 4 * growth, growth, bias=False)
      ch += growth
    if i < len(blocks) - 1:
      out = int(ch * compression)
      total += 2 * ch + conv(1, ch, out, bias=False)
      ch = out
  return total + 2 * ch + dense(ch, k)


def test_count_densenet():
  assert _count("densenet_bc", (32, 32, 3))[0] == _densenet_formula((6, 6, 6), 3)
  # DenseNet-BC-100 (k=12), ikkuna's configuration: the paper's 0.8M.
  count = _count("densenet_bc", (32, 32, 3), block_sizes=(16, 16, 16))[0]
  assert count == _densenet_formula((16, 16, 16), 3) == 769_162
  assert _count("densenet_bc", (32, 32, 3), depth=100)[0] == count
  assert _count("densenet_bc", (8, 8, 1), 4, depth=10)[0] == _densenet_formula((1, 1, 1), 1, 4)


def test_count_nnx_cnn():
  flat = same(same(8)) ** 2 * 32
  expected = conv(3, 1, 16) + conv(3, 16, 32) + dense(flat, 64) + dense(64, 10)
  assert _count("nnx_cnn", (8, 8, 1))[0] == expected
  flat = same(same(40)) * 32
  assert _count("nnx_cnn", (40, 1))[0] == (
    conv(3, 1, 16, 1) + conv(3, 16, 32, 1) + dense(flat, 64) + dense(64, 10)
  )


# --- names, initialisation, NNX state ------------------------------------------------------


def test_nnx_params_are_a_readable_pure_dict():
  r = _run(_case_id(("nnx_cnn", (8, 8, 1), 10, {})))
  model, variables = r["model"], r["variables"]
  assert type(variables) is dict and set(variables) == {"params"}
  infos = {i.name: i for i in leaf_infos(variables["params"])}
  assert set(infos) == {
    f"{layer}/{leaf}"
    for layer in ("conv1", "conv2", "linear1", "linear2")
    for leaf in ("kernel", "bias")
  }
  assert infos["conv1/kernel"].kind == "kernel" and infos["conv1/kernel"].shape == (3, 3, 1, 16)
  assert infos["linear1/bias"].kind == "bias"
  assert infos["linear2/kernel"].shape == (64, 10)
  # A wrong structure is refused with the leaf named.
  broken = {"params": {k: v for k, v in variables["params"].items() if k != "conv2"}}
  with pytest.raises(ValueError, match="conv2"):
    model.apply(broken, r["x"], train=False)


def test_linen_names():
  names = [i.name for i in leaf_infos(_count("resnet20", (32, 32, 3))[1]["params"])]
  assert "conv1/kernel" in names and "fc/kernel" in names
  assert "stage2_block1/proj_conv/kernel" in names and "stage3_block3/bn2/scale" in names
  assert "stage1_block1/proj_conv/kernel" not in names
  names = [i.name for i in leaf_infos(_count("densenet_bc", (8, 8, 1), depth=10)[1]["params"])]
  assert "block1_layer1/conv2/kernel" in names and "transition2/conv/kernel" in names
  names = [i.name for i in leaf_infos(_count("2c2d", (8, 8, 1))[1]["params"])]
  assert names == [f"{m}/{p}" for m in ("conv1", "conv2", "fc1", "fc2") for p in ("bias", "kernel")]


@pytest.mark.slow
def test_deepobs_initialisation():
  model = models.build("mnist_mlp", (28, 28, 1), 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  w = np.asarray(params["fc1"]["kernel"])
  # Normal(0, 0.03) truncated at +-2 sigma has std 0.03 * 0.8796.
  assert np.abs(w).max() <= 2 * 0.03 + 1e-6
  assert abs(w.std() - 0.03 * 0.87962566) < 0.02 * 0.03
  assert all(not np.any(params[f"fc{i}"]["bias"]) for i in range(1, 5))
  params = _run(_case_id(("2c2d", (8, 8, 1), 10, {})))["variables"]["params"]
  np.testing.assert_array_equal(params["conv1"]["bias"], np.full(32, 0.05, np.float32))
  assert np.abs(np.asarray(params["fc1"]["kernel"])).max() <= 0.1 + 1e-6


def test_describe_and_names():
  assert models.names()[:2] == ["mlp", "mnist_mlp"]
  for name in models.names():
    text = models.describe(name)
    assert text and "\n" not in text
  with pytest.raises(ValueError, match="available models: mlp, mnist_mlp"):
    models.describe("vgg")


# --- bad input -----------------------------------------------------------------------------


def test_unknown_model():
  with pytest.raises(ValueError, match=r"Unknown model name 'vgg16'.*resnet20"):
    models.build("vgg16", (8, 8, 1), 10)


@pytest.mark.parametrize(
  ("name", "shape", "match"),
  [
    ("lenet5", (1, 8, 8, 1), r"input_shape \(1, 8, 8, 1\) has rank 4"),
    ("mlp", (2, 2, 2, 2), "rank 4"),
    ("2c2d", (10,), r"input_shape \(10,\) has rank 1.*2-D \[length, channels\]"),
    ("resnet20", (), "rank 0"),
    ("mlp", (8, 0, 1), "non-positive"),
    ("mlp", "abc", "integers"),
    ("mlp", 8, "input_shape must be a tuple"),
    ("3c3d", (8, 8, 1), r"too small.*>= 9.*padding='SAME'"),
    ("alexnet_mini", (5, 8, 1), "too small.*>= 6"),
  ],
)
def test_bad_input_shape(name, shape, match):
  with pytest.raises(ValueError, match=match):
    models.build(name, shape, 10)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True, "10"])
def test_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    models.build("mlp", (8, 8, 1), num_classes)


def test_bad_options():
  with pytest.raises(ValueError, match="depth must be 6n"):
    models.build("resnet", (8, 8, 1), 10, depth=9)
  with pytest.raises(ValueError, match="depth must be 6n"):
    models.build("densenet_bc", (8, 8, 1), 10, depth=12)
  with pytest.raises(ValueError, match="hidden_sizes"):
    models.build("mlp", (8, 8, 1), 10, hidden_sizes=(8, 0))
  with pytest.raises(ValueError, match="padding"):
    models.build("3c3d", (32, 32, 3), 10, padding="FULL")
  with pytest.raises(TypeError, match=r"unexpected option\(s\) \['depth'\]"):
    models.build("resnet20", (8, 8, 1), 10, depth=8)
  with pytest.raises(TypeError, match="no options"):
    models.build("lenet5", (8, 8, 1), 10, width=3)


@pytest.mark.slow
def test_apply_checks_the_batch_shape():
  r = _run(_case_id(("lenet5", (8, 8, 1), 10, {})))
  model, variables = r["model"], r["variables"]
  with pytest.raises(ValueError, match=r"x must have shape \[batch, 8, 8, 1\]"):
    model.apply(variables, jnp.zeros((2, 28, 28, 1)), train=False)
  with pytest.raises(ValueError, match="input_shape"):
    model.init(jax.random.key(0), jnp.zeros((8, 8, 1)))
