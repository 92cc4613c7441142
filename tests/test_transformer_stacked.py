"""The scanned LM and the same LM unrolled give the same per-layer metrics (issue 17).

One initialisation of ``transformer_lm`` in the unrolled layout (``blocks_0 …``) is mapped
to the scanned one (``blocks`` with a leading layer axis) by ``models.stack_layers``; both
take one Adam step on the same batch, and a library scope (economy + spectral norms,
histograms, realised updates), split per layer
with ``stacked={"^blocks/": 0}`` on the scanned side, measures params, grads and updates.
Every value of ``blocks/{i}/X`` must equal the unrolled ``blocks_{i}/X`` (and the
unstacked leaves their own) to rtol 1e-5; a few per-layer values are also checked against
numpy float64 on the slices of the scanned arrays.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest

from jaxscope import metrics, models

T, V, L, B, D = 8, 32, 2, 4, 16
RTOL = 1e-5
#: XLA's CPU backend at LLVM -O0: the same programs (both layouts compiled alike), compiled
#: in about half the CPU time (compilation, not the run, is this test's cost).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _leaf(tree: dict, layer: str) -> np.ndarray:
  """``tree["blocks_0"]["attn"]["query"]["kernel"]`` for ``"blocks_0/attn/query/kernel"``."""
  for part in layer.split("/"):
    tree = tree[part]
  return np.asarray(tree, np.float64)


def _measure(model, params, x, y, stacked):
  """One Adam step of ``model`` from ``params`` on ``(x, y)``; the full scope's values and
  the step's gradients and updates."""
  tx = optax.adam(1e-2)
  # The economy preset plus what the full one adds, with histograms on params only (their
  # compilation dominated this test): stateful power iteration, histograms, realised updates.
  sc = metrics.scope(
    preset="economy",
    params=[metrics.spectral_norm(method="power"), metrics.histogram(16)],
    updates=["realised_ratio", "lost_fraction"],
    stacked=stacked,
  )

  @jax.jit(compiler_options=FAST_COMPILE)
  def step(p):
    def loss(q):
      logits, _ = model.apply({"params": q}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    g = jax.grad(loss)(p)
    u, _ = tx.update(g, tx.init(p), p)
    vals, _ = sc.update(sc.init(p), params=p, grads=g, updates=u)
    return vals, g, u

  return jax.device_get(step(params))


@pytest.mark.slow
def test_scanned_and_unrolled_lm_give_identical_per_layer_metrics():
  kw = {"d_model": D, "num_heads": 2, "n_layers": L}
  unrolled_lm = models.build("transformer_lm", (T,), V, scan=False, **kw)
  scanned_lm = models.build("transformer_lm", (T,), V, scan=True, **kw)
  rng = np.random.default_rng(1)  # numpy's: jax.random.randint takes a compilation
  x, y = rng.integers(0, V, (B, T), np.int32), rng.integers(0, V, (B, T), np.int32)
  pu = jax.jit(unrolled_lm.init, compiler_options=FAST_COMPILE)(jax.random.key(0), x)["params"]
  ps = models.stack_layers(pu, L)
  vs, gs, us = _measure(scanned_lm, ps, x, y, {"^blocks/": 0})
  vu, gu, uu = _measure(unrolled_lm, pu, x, y, None)

  mapped = {re.sub(r"^(\w+/\w+/)blocks/(\d+)/", r"\1blocks_\2/", k): k for k in vs}
  assert len(vs) == len(vu) > 250 and set(mapped) == set(vu)
  assert "updates/ratio/blocks/1/attn/query/kernel" in vs  # per layer, not pooled
  assert "updates/ratio/blocks/attn/query/kernel" not in vs
  trees = {"params": pu, "grads": gu, "updates": uu}
  checked = 0
  for key_u, key_s in mapped.items():
    if key_u.count("/") < 2:  # the scope's "measured" flag
      assert vs[key_s] == vu[key_u], key_s
      continue
    topic, stat, layer = key_u.split("/", 2)
    if topic in ("grads", "updates") and layer.endswith("attn/key/bias"):
      # ∂L/∂(key bias) is exactly 0 (the softmax removes q_i·b from row i): both layouts
      # hold float32 rounding noise there, ~1e-10, which Adam's first step g/(|g|+ε)
      # amplifies into unrelated updates. Checked as zero below instead.
      continue
    got, want = np.asarray(vs[key_s], np.float64), np.asarray(vu[key_u], np.float64)
    assert got.shape == want.shape, key_s
    atol = 0.0
    if stat in ("mean", "histogram_edges"):
      # A mean (edges from the extremes) of a tensor can be near 0 as a sum that cancels:
      # the rounding is relative to the tensor's root mean square, not to the mean.
      leaf = _leaf(trees[topic], layer)
      atol = RTOL * float(np.sqrt(np.mean(leaf**2)))
    if stat == "histogram_counts":  # a value on a bin edge may fall on either side
      assert np.abs(got - want).sum() <= 2, key_s
      assert got.sum() == want.sum(), key_s
    else:
      np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=key_s)
    checked += 1
  # All but 'measured' and the key biases' 5 gradient and 8 update values per layer.
  assert checked == len(vs) - 1 - 9 * L  # 3 grads + 6 updates stats of the key bias per layer

  for i in range(L):
    key_bias = _leaf(gs, "blocks/attn/key/bias")[i]
    assert np.abs(key_bias).max() < 1e-6 * np.abs(_leaf(gs, "blocks/attn/query/bias")[i]).max()
    # Independent references: numpy float64 on the slices of the scanned arrays.
    for name in ("attn/query/kernel", "attn/out/kernel", "fc1/kernel", "ln2/scale"):
      p = _leaf(ps, f"blocks/{name}")[i]
      g = _leaf(gs, f"blocks/{name}")[i]
      u = _leaf(us, f"blocks/{name}")[i]
      k = f"blocks/{i}/{name}"
      np.testing.assert_allclose(vs[f"params/norm/{k}"], np.linalg.norm(p), rtol=1e-6)
      np.testing.assert_allclose(vs[f"grads/variance/{k}"], np.var(g), rtol=1e-5)
      np.testing.assert_allclose(
        vs[f"updates/ratio/{k}"], np.linalg.norm(u) / np.linalg.norm(p), rtol=1e-5
      )
      # The slices hold the unrolled layer's gradient (float32 rounding apart).
      g_u = _leaf(gu, f"blocks_{i}/{name}")
      np.testing.assert_allclose(g, g_u, rtol=1e-4, atol=1e-5 * np.abs(g_u).max())
