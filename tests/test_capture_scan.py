"""capture on layer-stacked models: layers inside ``lax.scan`` come out stacked ``[L, …]``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_stacked import D, L, _Scanned, _Unrolled, _unstack_params

from jaxscope import capture, metrics


def _loss(model):
  def fn(p, x):
    return jnp.mean(model.apply({"params": p}, x) ** 2)

  return fn


@pytest.mark.slow
def test_linen_scan_outputs_and_layer_grads_equal_unrolled():
  x = jax.random.normal(jax.random.key(1), (5, 4))
  params = _Scanned().init(jax.random.key(0), x)["params"]
  flat = _unstack_params(params)
  f = jax.jit(capture.value_and_grad(_loss(_Scanned()), inputs=True))
  loss, grads, cap = f(params, x)
  loss_u, grads_u, cap_u = jax.jit(capture.value_and_grad(_loss(_Unrolled()), inputs=True))(flat, x)
  np.testing.assert_allclose(loss, loss_u, rtol=1e-6)
  assert set(cap.outputs) == {"embed", "blocks/ln", "blocks/fc", "head"}
  assert cap.outputs["blocks/fc"].shape == (L, 5, D)
  assert cap.kinds["blocks/fc"] == "dense"
  for i in range(L):
    for layer in ("ln", "fc"):
      for part in ("outputs", "grads", "inputs"):
        np.testing.assert_allclose(
          getattr(cap, part)[f"blocks/{layer}"][i],
          getattr(cap_u, part)[f"blocks_{i}/{layer}"],
          rtol=1e-5,
          atol=1e-7,
          err_msg=f"{part} {layer} {i}",
        )
  np.testing.assert_allclose(
    grads["blocks"]["fc"]["kernel"][1], grads_u["blocks_1"]["fc"]["kernel"], rtol=1e-5, atol=1e-7
  )
  # Per-layer activation metrics through a stacked scope equal the unrolled ones.
  sc = metrics.scope(activations=["std"], layer_grads=["norm"], stacked={"^blocks": 0})
  vals, _ = sc.update(
    sc.init(activations=cap.outputs, layer_grads=cap.grads),
    activations=cap.outputs,
    layer_grads=cap.grads,
  )
  su = metrics.scope(activations=["std"], layer_grads=["norm"])
  ref, _ = su.update(
    su.init(activations=cap_u.outputs, layer_grads=cap_u.grads),
    activations=cap_u.outputs,
    layer_grads=cap_u.grads,
  )
  for i in range(L):
    np.testing.assert_allclose(
      vals[f"activations/std/blocks/{i}/fc"], ref[f"activations/std/blocks_{i}/fc"], rtol=1e-5
    )
    np.testing.assert_allclose(
      vals[f"layer_grads/norm/blocks/{i}/ln"], ref[f"layer_grads/norm/blocks_{i}/ln"], rtol=1e-5
    )


class _RematBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(D, name="fc")(x)


class _Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    x = nn.remat(_RematBlock)(name="block")(x)
    return nn.Dense(2, name="head")(x)


def test_layers_in_other_nested_traces_are_skipped_not_leaked():
  x = jnp.ones((2, 4))
  params = _Remat().init(jax.random.key(0), x)["params"]
  with capture.intercept() as rec:
    _Remat().apply({"params": params}, x)
  assert "block/fc" in rec.skipped and set(rec.outputs) == {"embed", "head"}
  loss, _, cap = jax.jit(capture.value_and_grad(_loss(_Remat())))(params, x)
  assert set(cap.outputs) == {"embed", "head"}
  assert np.isfinite(loss)


@pytest.mark.slow
def test_nnx_scan_over_vmapped_layers():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
      return x + jnp.tanh(self.fc(x))

  class Model(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(r):
        return Block(r)

      self.blocks = create(rngs)
      self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def fwd(x, block):
        return block(x)

      return self.head(fwd(x, self.blocks))

  graphdef, state = nnx.split(Model(nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(2), (4, D))
  fn = lambda st, x: jnp.mean(nnx.merge(graphdef, st)(x) ** 2)  # noqa: E731
  loss, _, cap = jax.jit(capture.value_and_grad(fn))(state, x)
  assert set(cap.outputs) == {"blocks/fc", "head"}
  # Independent reference: the same network written by hand, perturbed at each fc output.
  p = nnx.to_pure_dict(state)
  w, b = np.asarray(p["blocks"]["fc"]["kernel"]), np.asarray(p["blocks"]["fc"]["bias"])

  def manual(eps):
    h = x
    outs = []
    for i in range(L):
      y = h @ w[i] + b[i] + eps[i]
      outs.append(y)
      h = h + jnp.tanh(y)
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2), jnp.stack(outs)

  (ref_loss, ref_outs), ref_grads = jax.value_and_grad(manual, has_aux=True)(jnp.zeros((L, 4, D)))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(cap.outputs["blocks/fc"], ref_outs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cap.grads["blocks/fc"], ref_grads, rtol=1e-5, atol=1e-7)


def test_scan_patch_is_removed_after_the_block():
  original = jax.lax.scan
  with capture.intercept():
    assert jax.lax.scan is not original
  assert jax.lax.scan is original
  with (
    pytest.raises(ValueError, match="perturbations"),
    capture.intercept(perturbations={"x": jnp.zeros(2)}),
  ):
    pass
  assert jax.lax.scan is original
