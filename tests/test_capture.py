"""Capture of layer outputs, inputs and dL/d(output) from unmodified Linen and NNX models.

References are hand-written numpy float64 forward and backward passes from the
parameters, and plain ``jax.grad`` for the parameter gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxscope import capture, models

B, D_IN, HID, C = 5, 6, 4, 3

# ---------------------------------------------------------------- numpy references


def _softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def _onehot(y, c=C):
  return np.eye(c)[np.asarray(y)]


def _xent(logits, y):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _np(a):
  return np.asarray(a, np.float64)


def _conv_valid(x, k, b):
  """NHWC x HWIO convolution, VALID padding, stride 1."""
  kh, kw = k.shape[:2]
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], oh, ow, k.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,co->bhwo", x[:, i : i + oh, j : j + ow, :], k[i, j])
  return out + b


def _mlp_ref(w1, b1, w2, b2, x, y):
  """Forward and backward of Dense -> relu -> Dense -> mean softmax cross-entropy."""
  h1 = x @ w1 + b1
  logits = np.maximum(h1, 0) @ w2 + b2
  g2 = (_softmax(logits) - _onehot(y)) / x.shape[0]
  g1 = (g2 @ w2.T) * (h1 > 0)
  return h1, logits, g1, g2


def _cnn_ref(k, kb, w, wb, x, y):
  """Forward and backward of Conv(VALID) -> relu -> flatten -> Dense -> cross-entropy."""
  h1 = _conv_valid(x, k, kb)
  logits = np.maximum(h1, 0).reshape(x.shape[0], -1) @ w + wb
  g2 = (_softmax(logits) - _onehot(y)) / x.shape[0]
  g1 = (g2 @ w.T).reshape(h1.shape) * (h1 > 0)
  return h1, logits, g1, g2


def _data(seed=0, shape=(B, D_IN)):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=shape), jnp.float32)
  y = jnp.asarray(r.integers(0, C, size=shape[0]), jnp.int32)
  return x, y


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(_np(a), _np(b), rtol=tol, atol=tol)


def _tree_close(a, b, tol=1e-6):
  jax.tree.map(lambda u, v: _close(u, v, tol), a, b)


# ---------------------------------------------------------------- Linen


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(HID, name="hidden")(x))
    return nn.Dense(C, name="out")(x)


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3), padding="VALID")(x))
    return nn.Dense(C)(x.reshape(x.shape[0], -1))


def _linen_setup(model, x):
  params = model.init(jax.random.key(1), x)["params"]
  # Non-zero biases so that a missing bias would show.
  return jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)


@pytest.mark.slow
def test_linen_mlp_outputs_layer_grads_and_params_grads_match_numpy():
  model = LinenMLP()
  x, y = _data()
  params = _linen_setup(model, x)

  def loss(p, x, y):
    return _xent(model.apply({"params": p}, x), y)

  value, grads, cap = jax.jit(lambda p, x, y: capture.value_and_grad(loss)(p, x, y))(params, x, y)
  h, o = params["hidden"], params["out"]
  h1, logits, g1, g2 = _mlp_ref(
    _np(h["kernel"]), _np(h["bias"]), _np(o["kernel"]), _np(o["bias"]), _np(x), y
  )
  assert set(cap.outputs) == {"hidden", "out"}
  assert cap.kinds == {"hidden": "dense", "out": "dense"}
  _close(cap.outputs["hidden"], h1)  # The pre-activation: relu is a function, not a layer.
  _close(cap.outputs["out"], logits)
  _close(cap.grads["out"], g2)
  _close(cap.grads["hidden"], g1)
  assert cap.inputs == {}
  v_ref, g_ref = jax.value_and_grad(loss)(params, x, y)
  _close(value, v_ref)
  _tree_close(grads, g_ref)


@pytest.mark.slow
def test_linen_cnn_matches_numpy_and_records_inputs():
  model = LinenCNN()
  x, y = _data(1, (B, 5, 5, 2))
  params = _linen_setup(model, x)

  def loss(p, x, y):
    return _xent(model.apply({"params": p}, x), y)

  value, grads, cap = jax.jit(lambda p: capture.value_and_grad(loss, inputs=True)(p, x, y))(params)
  c, d = params["Conv_0"], params["Dense_0"]
  h1, logits, g1, g2 = _cnn_ref(
    _np(c["kernel"]), _np(c["bias"]), _np(d["kernel"]), _np(d["bias"]), _np(x), y
  )
  assert cap.kinds == {"Conv_0": "conv", "Dense_0": "dense"}
  _close(cap.outputs["Conv_0"], h1)
  _close(cap.outputs["Dense_0"], logits)
  _close(cap.grads["Dense_0"], g2)
  _close(cap.grads["Conv_0"], g1)
  _close(cap.inputs["Conv_0"], x)
  _close(cap.inputs["Dense_0"], np.maximum(h1, 0).reshape(B, -1))
  _tree_close(grads, jax.grad(loss)(params, x, y))
  _close(value, loss(params, x, y))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(HID)(x))


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = Block()(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(C)(x)


@pytest.mark.slow
def test_linen_nested_keys_kinds_include_exclude_and_has_aux():
  model = Nested()
  x, y = _data(2)
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p, x, y):
    logits = model.apply({"params": p}, x)
    return _xent(logits, y), {"logits": logits}

  vg = capture.value_and_grad(loss, has_aux=True)
  (value, aux), grads, cap = vg(params, x, y)
  # Block_0 owns no parameter of its own: only the leaf modules are layers.
  assert set(cap.outputs) == {"Block_0/Dense_0", "LayerNorm_0", "Dense_0"}
  assert cap.kinds["LayerNorm_0"] == "other"
  _close(cap.outputs["Dense_0"], aux["logits"])
  _close(cap.grads["Dense_0"], (_softmax(_np(aux["logits"])) - _onehot(y)) / B)
  (v_ref, _), g_ref = jax.value_and_grad(loss, has_aux=True)(params, x, y)
  _close(value, v_ref)
  _tree_close(grads, g_ref)
  _, _, cap = capture.value_and_grad(loss, has_aux=True, include="Dense")(params, x, y)
  assert set(cap.outputs) == set(cap.grads) == {"Block_0/Dense_0", "Dense_0"}
  _, _, cap = capture.value_and_grad(loss, has_aux=True, include=["Block", "Layer"])(params, x, y)
  assert set(cap.outputs) == {"Block_0/Dense_0", "LayerNorm_0"}
  _, _, cap = capture.value_and_grad(loss, has_aux=True, exclude="^Dense", layer_grads=False)(
    params, x, y
  )
  assert set(cap.outputs) == {"Block_0/Dense_0", "LayerNorm_0"}
  assert cap.grads == {}


# ---------------------------------------------------------------- NNX


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.linear1 = nnx.Linear(D_IN, HID, rngs=rngs)
    self.linear2 = nnx.Linear(HID, C, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.relu(self.linear1(x)))


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 2, (3, 3), padding="VALID", rngs=rngs)
    self.head = nnx.Linear(3 * 3 * 2, C, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    return self.head(x.reshape(x.shape[0], -1))


def _bump_biases(model):
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.Linear | nnx.Conv):
      m.bias[...] = m.bias[...] + 0.1


def test_nnx_mlp_closure_and_split_merge_match_numpy():
  model = NNXMLP(nnx.Rngs(0))
  _bump_biases(model)
  x, y = _data(3)
  graphdef, state = nnx.split(model)

  def loss_merge(state, x, y):
    return _xent(nnx.merge(graphdef, state)(x), y)

  def loss_closure(p, x, y):
    del p
    return _xent(model(x), y)

  l1, l2 = model.linear1, model.linear2
  h1, logits, g1, g2 = _mlp_ref(
    _np(l1.kernel[...]), _np(l1.bias[...]), _np(l2.kernel[...]), _np(l2.bias[...]), _np(x), y
  )
  for fn, p in ((loss_merge, state), (loss_closure, {})):
    value, grads, cap = jax.jit(lambda p, x, y, fn=fn: capture.value_and_grad(fn)(p, x, y))(p, x, y)
    _close(value, _xent(jnp.asarray(logits), y))
    assert set(cap.outputs) == {"linear1", "linear2"}
    assert cap.kinds == {"linear1": "dense", "linear2": "dense"}
    _close(cap.outputs["linear1"], h1)
    _close(cap.outputs["linear2"], logits)
    _close(cap.grads["linear2"], g2)
    _close(cap.grads["linear1"], g1)
    if fn is loss_merge:
      _tree_close(grads, jax.grad(loss_merge)(state, x, y))
    else:
      assert grads == {}
  # Keys are the parameter paths' module prefixes.
  prefixes = {"/".join(str(k) for k in path[:-1]) for path, _ in _flat_params(model)}
  assert prefixes == set(cap.outputs)


def _flat_params(model):
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return [
    (tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]
  ]


def test_nnx_cnn_matches_numpy():
  model = NNXCNN(nnx.Rngs(1))
  _bump_biases(model)
  x, y = _data(4, (B, 5, 5, 2))
  graphdef, state = nnx.split(model)

  def loss(state, x, y):
    return _xent(nnx.merge(graphdef, state)(x), y)

  value, grads, cap = jax.jit(lambda s: capture.value_and_grad(loss, inputs=True)(s, x, y))(state)
  c, d = model.conv, model.head
  h1, logits, g1, g2 = _cnn_ref(
    _np(c.kernel[...]), _np(c.bias[...]), _np(d.kernel[...]), _np(d.bias[...]), _np(x), y
  )
  _close(value, _xent(jnp.asarray(logits), y))
  assert cap.kinds == {"conv": "conv", "head": "dense"}
  _close(cap.outputs["conv"], h1)
  _close(cap.outputs["head"], logits)
  _close(cap.grads["head"], g2)
  _close(cap.grads["conv"], g1)
  _close(cap.inputs["conv"], x)
  _tree_close(grads, jax.grad(loss)(state, x, y))


class Scaled(nnx.Linear):
  """Overrides __call__ and calls super(): must be recorded once, with its own output."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


class Listed(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([Scaled(D_IN, HID, rngs=rngs), nnx.Linear(HID, C, rngs=rngs)])
    self.dropout = nnx.Dropout(0.5)

  def __call__(self, x):
    return self.blocks[1](self.dropout(self.blocks[0](x), deterministic=True))


def test_nnx_list_paths_and_super_call():
  model = Listed(nnx.Rngs(0))
  x, y = _data(5)
  _, _, cap = capture.value_and_grad(lambda p: _xent(model(x), y))({})
  assert set(cap.outputs) == {"blocks/0", "blocks/1"}
  s = model.blocks[0]
  _close(cap.outputs["blocks/0"], 2.0 * (_np(x) @ _np(s.kernel[...]) + _np(s.bias[...])))
  prefixes = {"/".join(str(k) for k in path[:-1]) for path, _ in _flat_params(model)}
  assert prefixes == set(cap.outputs)


@pytest.mark.slow
def test_zoo_nnx_model_keys_match_params_and_grads_match():
  md = models.build("nnx_cnn", (6, 6, 1), num_classes=C, features=(2, 3), hidden=4)
  x, y = _data(6, (B, 6, 6, 1))
  variables = md.init(jax.random.key(0), x)

  def loss(params, x, y):
    logits, _ = md.apply({"params": params}, x, train=False)
    return _xent(logits, y), logits

  step = jax.jit(lambda p, x, y: capture.value_and_grad(loss, has_aux=True)(p, x, y))
  (value, logits), grads, cap = step(variables["params"], x, y)
  prefixes = {
    "/".join(str(k.key) for k in path[:-1])
    for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  }
  assert set(cap.outputs) == prefixes == {"conv1", "conv2", "linear1", "linear2"}
  assert cap.kinds == {"conv1": "conv", "conv2": "conv", "linear1": "dense", "linear2": "dense"}
  assert cap.outputs["conv1"].shape == (B, 6, 6, 2)
  _close(cap.outputs["linear2"], logits)
  _close(value, _xent(logits, y))
  _close(cap.grads["linear2"], (_softmax(_np(logits)) - _onehot(y)) / B)
  _tree_close(grads, jax.grad(lambda p: loss(p, x, y)[0])(variables["params"]))


# ---------------------------------------------------------------- errors and hygiene


def test_error_when_no_flax_module_is_called():
  with pytest.raises(ValueError, match=r"no layer was recorded.*include=None"):
    capture.value_and_grad(lambda p, x: jnp.sum(p["w"] * x))({"w": jnp.ones(3)}, jnp.ones(3))


def test_error_when_include_matches_nothing():
  model = LinenMLP()
  x, y = _data()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: _xent(model.apply({"params": p}, x), y)  # noqa: E731
  with pytest.raises(ValueError, match="include='nomatch'"):
    capture.value_and_grad(loss, include="nomatch")(params)
  with pytest.raises(ValueError, match="include"):
    capture.value_and_grad(loss, include="(")
  with pytest.raises(TypeError, match="fn must be callable"):
    capture.value_and_grad(3)


class LinenShared(nn.Module):
  def setup(self):
    self.dense = nn.Dense(D_IN)

  def __call__(self, x):
    return self.dense(self.dense(x))


class NNXShared(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(D_IN, D_IN, rngs=rngs)

  def __call__(self, x):
    return self.linear(self.linear(x))


def test_shared_layer_called_twice_raises_naming_the_layer():
  x, _ = _data()
  lin = LinenShared()
  params = lin.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match="'dense' was called more than once"):
    capture.value_and_grad(lambda p: jnp.sum(lin.apply({"params": p}, x)))(params)
  model = NNXShared(nnx.Rngs(0))
  with pytest.raises(ValueError, match="'linear' was called more than once"):
    capture.value_and_grad(lambda p: jnp.sum(model(x)))({})


def test_nnx_classes_are_unpatched_after_the_context():
  original = nnx.Linear.__dict__["__call__"]
  model = NNXMLP(nnx.Rngs(0))
  x, _ = _data()
  with capture.intercept() as rec:
    assert nnx.Linear.__dict__["__call__"] is not original
    model(x)
  assert nnx.Linear.__dict__["__call__"] is original
  assert NNXMLP.__dict__["__call__"].__qualname__ == "NNXMLP.__call__"
  assert set(rec.outputs) == {"linear1", "linear2"}
  model(x)  # Outside: nothing recorded.
  assert set(rec.outputs) == {"linear1", "linear2"}
  with pytest.raises(RuntimeError, match="boom"), capture.intercept():
    raise RuntimeError("boom")
  assert nnx.Linear.__dict__["__call__"] is original


def test_intercept_perturbations_and_bad_perturbations():
  model = NNXMLP(nnx.Rngs(0))
  x, _ = _data()
  base = model(x)
  eps = jnp.ones((B, C))
  with capture.intercept(perturbations={"linear2": eps}, record_inputs=True) as rec:
    out = model(x)
  _close(out, base + 1.0)
  _close(rec.inputs["linear1"], x)
  with (
    pytest.raises(ValueError, match="shape"),
    capture.intercept(perturbations={"linear2": jnp.ones((1, 2))}),
  ):
    model(x)
  with pytest.raises(ValueError, match=r"not recorded.*\['nope'\]|\['nope'\].*not recorded"):
    with capture.intercept(perturbations={"nope": eps}):
      model(x)
  with pytest.raises(TypeError, match="perturbations must be a mapping"):
    with capture.intercept(perturbations=[eps]):
      pass
