"""The transformers of the zoo against a float64 numpy forward pass: causal mask, scanned vs
unrolled vs NNX, DenseGeneral kernel shapes and logical axes, bf16, the ViT, the registry."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fresh import run_fresh
from jax.sharding import PartitionSpec as P

from jaxscope import models
from jaxscope.models.transformer import multihead_attention

ROOT = Path(__file__).resolve().parents[1]
T, V, D, H, L = 8, 11, 16, 2, 2
KW = dict(d_model=D, num_heads=H, n_layers=L, mlp_ratio=2)


def _tokens(seed=0, n=3):
  return np.random.default_rng(seed).integers(0, V, (n, T)).astype(np.int32)


def _random_params(model, seed=0):
  """Parameters of ``model``'s tree (no init compiled): N(0, 0.3²), scales near 1."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *model.input_shape)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape) * 0.3
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + noise, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


# --- float64 numpy reference ------------------------------------------------------------------


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu(x):  # tanh approximation
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _attention_ref(q, k, v, causal):
  a = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  keep = np.tril(np.ones(a.shape[-2:], bool)) if causal else np.ones(a.shape[-2:], bool)
  logit_max = np.abs(a)[..., keep].max()
  a = np.where(keep, a, -np.inf)
  w = np.exp(a - a.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v), logit_max


def _lm_ref(params, tokens, tie=False):
  """Logits [B, T, V] and the per-block max |attention logit| of unrolled parameters."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["embed"]["embedding"][tokens] + p["pos_embed"]["embedding"][: tokens.shape[1]]
  maxes = []
  for i in range(L):
    b = p[f"blocks_{i}"]
    h = _ln(x, b["ln1"])
    qkv = [
      np.einsum("btd,dhk->bthk", h, b["attn"][n]["kernel"]) + b["attn"][n]["bias"]
      for n in ("query", "key", "value")
    ]
    o, m = _attention_ref(*qkv, causal=True)
    maxes.append(m)
    x = x + np.einsum("bthk,hkd->btd", o, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]
    h = _gelu(_ln(x, b["ln2"]) @ b["fc1"]["kernel"] + b["fc1"]["bias"])
    x = x + h @ b["fc2"]["kernel"] + b["fc2"]["bias"]
  h = _ln(x, p["ln_f"])
  logits = h @ p["embed"]["embedding"].T if tie else h @ p["head"]["kernel"] + p["head"]["bias"]
  return logits, np.asarray(maxes)


# --- shared builds and compiled forward passes ------------------------------------------------


@functools.cache
def _lm(kind, **extra):
  name = "nnx_transformer_lm" if kind == "nnx" else "transformer_lm"
  kw = dict(KW, **extra)
  if kind != "nnx":
    kw["scan"] = kind == "scan"
  return models.build(name, (T,), V, **kw)


@functools.cache
def _forward(kind, **extra):
  """A jitted ``(variables, x) -> (logits, attn_logit_max per block or None)``."""
  model = _lm(kind, **extra)
  if kind == "nnx":
    return jax.jit(lambda v, x: (model.apply(v, x, train=False)[0], None))

  def f(v, x):
    logits, inter = model.module.apply(v, x, mutable=["intermediates"])
    inter = inter["intermediates"]
    if kind == "scan":
      return logits, inter["blocks"]["attn"]["attn_logit_max"][0]
    return logits, jnp.stack([inter[f"blocks_{i}"]["attn"]["attn_logit_max"][0] for i in range(L)])

  return jax.jit(f)


@functools.cache
def _params():
  """One set of unrolled parameters and the same mapped to the scanned layout."""
  unrolled = _random_params(_lm("unrolled"))["params"]
  return unrolled, models.stack_layers(unrolled, L)


# --- tests ------------------------------------------------------------------------------------


def test_attention_against_numpy():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  for causal in (True, False):
    out, m = multihead_attention(q, k, v, causal=causal)
    want, want_m = _attention_ref(*(a.astype(np.float64) for a in (q, k, v)), causal)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(float(m), want_m, rtol=1e-5)


def test_kernel_shapes_and_logical_axes():
  for kind, lead in (("unrolled", ()), ("scan", (L,))):
    model = _lm(kind)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    block = v["blocks"] if kind == "scan" else v["blocks_1"]
    for n in ("query", "key", "value"):
      assert block["attn"][n]["kernel"].shape == (*lead, D, H, D // H)
      assert block["attn"][n]["bias"].shape == (*lead, H, D // H)
    assert block["attn"]["out"]["kernel"].shape == (*lead, H, D // H, D)
    assert block["attn"]["out"]["bias"].shape == (*lead, D)
    assert block["fc1"]["kernel"].shape == (*lead, D, 2 * D)
    assert block["ln1"]["scale"].shape == (*lead, D)
    assert v["embed"]["embedding"].shape == (V, D) and v["pos_embed"]["embedding"].shape == (T, D)
    layers = ("layers",) if lead else ()
    axes = model.param_axes["blocks" if lead else "blocks_1"]
    assert axes["attn"]["query"]["kernel"] == P(*layers, "embed", "heads", "head_dim")
    assert axes["attn"]["out"]["kernel"] == P(*layers, "heads", "head_dim", "embed")
    assert model.param_axes["embed"]["embedding"] == P("vocab", "embed")
    assert jax.tree.structure(model.param_axes, is_leaf=lambda a: isinstance(a, P)) == (
      jax.tree.structure(v)
    )
    assert model.input_dtype == jnp.int32


@pytest.mark.slow
def test_unrolled_and_scanned_match_numpy_and_each_other():
  unrolled, scanned = _params()
  x = _tokens()
  want, want_max = _lm_ref(unrolled, x)
  lu, mu = _forward("unrolled")({"params": unrolled}, x)
  ls, ms = _forward("scan")({"params": scanned}, x)
  assert lu.dtype == jnp.float32 and lu.shape == (3, T, V)
  np.testing.assert_allclose(lu, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(mu, want_max, rtol=1e-4)
  np.testing.assert_allclose(ls, lu, rtol=1e-5, atol=1e-5)  # float32 rounding only
  np.testing.assert_allclose(ms, mu, rtol=1e-5)
  # The layouts map one to the other exactly.
  back = models.unstack_layers(scanned)
  assert jax.tree.structure(back) == jax.tree.structure(unrolled)
  jax.tree.map(np.testing.assert_array_equal, back, unrolled)


def test_nnx_twin_matches_linen():
  _, scanned = _params()
  nnx_model = _lm("nnx")
  abstract = jax.eval_shape(nnx_model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  assert jax.tree.structure(abstract) == jax.tree.structure({"params": scanned})
  assert nnx_model.param_axes == _lm("scan").param_axes
  x = _tokens(2)
  ln, _ = _forward("nnx")({"params": scanned}, x)
  ls, _ = _forward("scan")({"params": scanned}, x)
  np.testing.assert_allclose(ln, ls, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    ln, _lm_ref(models.unstack_layers(scanned), x)[0], rtol=1e-4, atol=1e-4
  )


def test_causal_mask():
  _, scanned = _params()
  x = _tokens(3)
  x2 = x.copy()
  x2[:, 5] = (x2[:, 5] + 1) % V  # Change one token: earlier positions must not move.
  f = _forward("scan")
  a, _ = f({"params": scanned}, x)
  b, _ = f({"params": scanned}, x2)
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.abs(np.asarray(a[:, 5:]) - np.asarray(b[:, 5:])).max() > 1e-3


def test_bf16_compute_returns_float32_logits_and_tied_head():
  unrolled, _ = _params()
  tied = {k: v for k, v in unrolled.items() if k != "head"}
  x = _tokens(4)
  model = _lm("unrolled", dtype="bfloat16", tie_embeddings=True)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  assert "head" not in abstract["params"]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))  # param_dtype
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))({"params": tied}, x)
  assert logits.dtype == jnp.float32
  want, _ = _lm_ref(unrolled, x, tie=True)
  err = np.abs(np.asarray(logits, np.float64) - want).max() / np.abs(want).max()
  assert 1e-4 < err < 0.05, err  # bf16 rounding: visible, but small


def test_vit_shapes_and_forward():
  for shape, patch, tokens in (((8, 8, 1), 4, 4), ((28, 28, 1), 4, 49), ((32, 32, 3), 4, 64)):
    model = models.build("vit", shape, 10, patch=patch, **KW)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))["params"]
    assert v["patch_embed"]["kernel"].shape == (patch, patch, shape[-1], D)
    assert v["pos_embed"].shape == (1, tokens + 1, D) and v["cls"].shape == (1, 1, D)
    assert v["blocks_0"]["attn"]["query"]["kernel"].shape == (D, H, D // H)
  model = models.build("vit", (8, 8, 1), 10, patch=2, pool="mean", scan=True, **KW)
  params = _random_params(model, seed=5)
  assert "cls" not in params["params"] and params["params"]["pos_embed"].shape == (1, 16, D)
  x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
  out, state = jax.jit(lambda v, x: model.apply(v, x, train=False))(params, x)
  assert out.shape == (2, 10) and out.dtype == jnp.float32 and state == {}
  assert np.isfinite(np.asarray(out)).all()


def test_stack_layers_errors():
  unrolled, scanned = _params()
  with pytest.raises(ValueError, match="blocks_0 … blocks_2"):
    models.stack_layers(unrolled, 3)
  with pytest.raises(ValueError, match="no 'blocks' entry"):
    models.unstack_layers(unrolled)
  bad = dict(scanned, blocks={"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))})
  with pytest.raises(ValueError, match="same leading"):
    models.unstack_layers(bad)


def test_registry_options_and_errors():
  for name in ("transformer_lm", "nnx_transformer_lm", "vit"):
    assert name in models.names() and models.describe(name)
  with pytest.raises(ValueError, match="divisible by num_heads"):
    models.build("transformer_lm", (T,), V, d_model=10, num_heads=4)
  with pytest.raises(ValueError, match="dtype must be one of"):
    models.build("transformer_lm", (T,), V, dtype="int8")
  with pytest.raises(ValueError, match="rank 3"):
    models.build("transformer_lm", (8, 8, 1), V)
  with pytest.raises(ValueError, match="patch=16"):
    models.build("vit", (8, 8, 1), 10, patch=16)
  with pytest.raises(ValueError, match="scan must be True or False"):
    models.build("transformer_lm", (T,), V, scan="yes")
  with pytest.raises(TypeError, match="scan"):
    models.build("nnx_transformer_lm", (T,), V, scan=True)
  m = models.build("transformer_lm", (T,), V, dtype=jnp.bfloat16, param_dtype="bfloat16")
  assert m.module.dtype == jnp.bfloat16 and m.module.param_dtype == jnp.bfloat16


@pytest.mark.slow
def test_train_runs_end_to_end(tmp_path):
  """The run and its assertions in a new -O0 interpreter (:func:`_fresh.run_fresh`: the loop's
  jits take no compiler options, and the flag set for the whole test process changes other
  tests' floats)."""
  run_fresh(__file__, "_train_end_to_end", tmp_path)


def _train_end_to_end(tmp_path):
  from jaxscope.train import train

  r = train(
    model="transformer_lm",
    dataset="shakespeare",
    model_args=dict(d_model=16, num_heads=2, n_layers=1, mlp_ratio=2),
    data_args=dict(seq_len=16, num_train=64, num_test=32),
    steps=3,
    batch_size=16,
    optimizer="adam",
    lr=1e-2,
    out=str(tmp_path / "run"),
    quiet=True,
    live_diagnosis=False,
  )
  ev = r.final_eval
  assert {"test/loss", "test/accuracy", "test/perplexity", "test/bits_per_token"} <= set(ev)
  np.testing.assert_allclose(ev["test/perplexity"], math.exp(ev["test/loss"]), rtol=1e-5)
  assert ev["test/loss"] < math.log(256)  # 3 Adam steps already beat the uniform guess
