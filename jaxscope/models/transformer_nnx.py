"""The Flax NNX twin of :class:`~jaxscope.models.transformer.DecoderLM`.

The blocks are created by ``nnx.vmap`` over ``nnx.split_rngs`` keys and applied by
``nnx.scan`` (the Flax "scan over layers" pattern), so every block parameter has a leading
layer axis. Attribute names follow the Linen model, and the pure parameter dict of
:class:`NNXDecoderLM` (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) has exactly the
tree of the *scanned* Linen ``DecoderLM(scan=True)`` (``embed/embedding``,
``pos_embed/embedding``, ``blocks/attn/query/kernel [L, d_model, heads, head_dim]``, …,
``ln_f``, ``head``): the same parameters give the same logits in both, and
:func:`~jaxscope.models.transformer.unstack_layers` maps them to the unrolled Linen model.
The math is shared (:func:`~jaxscope.models.transformer.multihead_attention`, LayerNorm with
ε = 1e-6 in float32, tanh-approximated GELU, float32 logits).

Unlike the Linen model, the NNX twin sows no ``attn_logit_max`` (``Module.sow`` outside
``nnx.capture`` is deprecated in Flax 0.12).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscope.models.transformer import multihead_attention

__all__ = ["NNXAttention", "NNXBlock", "NNXDecoderLM"]


def _layer_norm(d_model: int, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(d_model, epsilon=1e-6, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class NNXAttention(nnx.Module):
  """Causal multi-head self-attention: ``query``, ``key``, ``value`` (``LinearGeneral``
  ``[d_model, heads, head_dim]``) and ``out`` (``[heads, head_dim, d_model]``)."""

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    causal: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ) -> None:
    if d_model % num_heads:
      raise ValueError(
        f"NNXAttention: d_model {d_model} must be divisible by num_heads {num_heads}."
      )
    shape = (num_heads, d_model // num_heads)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = nnx.LinearGeneral(d_model, shape, **kw)
    self.key = nnx.LinearGeneral(d_model, shape, **kw)
    self.value = nnx.LinearGeneral(d_model, shape, **kw)
    self.out = nnx.LinearGeneral(shape, d_model, axis=(-2, -1), **kw)
    self.causal, self.dtype = causal, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, T, d_model] -> [B, T, d_model]``."""
    out, _ = multihead_attention(
      self.query(x), self.key(x), self.value(x), causal=self.causal, dtype=self.dtype
    )
    return self.out(out)


class NNXBlock(nnx.Module):
  """One pre-LayerNorm block: ``ln1``, ``attn``, ``ln2``, ``fc1``, ``fc2`` (as the Linen
  :class:`~jaxscope.models.transformer.Block`)."""

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    mlp_dim: int,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ) -> None:
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = _layer_norm(d_model, param_dtype, rngs)
    self.attn = NNXAttention(d_model, num_heads, **kw)
    self.ln2 = _layer_norm(d_model, param_dtype, rngs)
    self.fc1 = nnx.Linear(d_model, mlp_dim, **kw)
    self.fc2 = nnx.Linear(mlp_dim, d_model, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, T, d_model] -> [B, T, d_model]`` (in the residual stream's dtype)."""
    x = x + self.attn(self.ln1(x).astype(self.dtype)).astype(x.dtype)
    h = self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
    return x + h.astype(x.dtype)


class NNXDecoderLM(nnx.Module):
  """The decoder-only language model of :class:`~jaxscope.models.transformer.DecoderLM`,
  written with Flax NNX, its blocks stacked by ``nnx.vmap`` and applied by ``nnx.scan``.

  Args:
    vocab_size: number of token ids (and of output classes).
    max_len: the longest sequence.
    d_model: width of the residual stream.
    num_heads: attention heads.
    n_layers: number of blocks.
    mlp_ratio: MLP width over ``d_model``.
    tie_embeddings: use the token embedding as the output head (no ``head``).
    dtype: compute dtype (LayerNorm, softmax and the logits stay float32).
    param_dtype: parameter dtype.
    rngs: the ``nnx.Rngs`` that initialise the parameters (``params`` stream).
  """

  def __init__(
    self,
    vocab_size: int,
    max_len: int,
    *,
    d_model: int = 64,
    num_heads: int = 4,
    n_layers: int = 2,
    mlp_ratio: int = 4,
    tie_embeddings: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ) -> None:
    embed_init = nnx.initializers.normal(0.02)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embed = nnx.Embed(vocab_size, d_model, embedding_init=embed_init, **kw, rngs=rngs)
    self.pos_embed = nnx.Embed(max_len, d_model, embedding_init=embed_init, **kw, rngs=rngs)

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> NNXBlock:
      return NNXBlock(d_model, num_heads, mlp_ratio * d_model, **kw, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.ln_f = _layer_norm(d_model, param_dtype, rngs)
    if not tie_embeddings:
      self.head = nnx.Linear(d_model, vocab_size, **kw, rngs=rngs)
    self.tie_embeddings, self.max_len, self.dtype = tie_embeddings, max_len, dtype

  def __call__(
    self, tokens: jax.Array, train: bool = False, rng: jax.Array | None = None
  ) -> jax.Array:
    """``tokens int [B, T]`` (``T ≤ max_len``) ``-> logits float32 [B, T, vocab_size]``;
    ``train`` and ``rng`` are accepted for the zoo's interface (no dropout)."""
    del train, rng
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(
        f"NNXDecoderLM: tokens must be [batch, T] with T <= max_len={self.max_len}, got "
        f"shape {tuple(tokens.shape)}."
      )
    x = self.embed(tokens.astype(jnp.int32)) + self.pos_embed(jnp.arange(tokens.shape[1]))[None]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(h: jax.Array, block: NNXBlock) -> jax.Array:
      return block(h)

    h = self.ln_f(forward(x, self.blocks)).astype(self.dtype)
    logits = self.embed.attend(h) if self.tie_embeddings else self.head(h)
    return logits.astype(jnp.float32)
