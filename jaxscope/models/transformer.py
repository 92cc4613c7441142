"""Transformers in Flax Linen: a decoder-only language model and a small vision transformer.

Both stack the same pre-LayerNorm block (Radford et al. 2019; Xiong et al. 2020)::

    h = x + Attention(LN₁(x))          multi-head self-attention, causal for the LM
    y = h + fc₂(GELU(fc₁(LN₂(h))))     MLP of width mlp_ratio · d_model

with the attention written with ``nn.DenseGeneral``, so that the kernels have Flax's
multi-axis shapes (those of ``nn.MultiHeadDotProductAttention``): ``query`` / ``key`` /
``value`` kernels ``[d_model, heads, head_dim]`` with biases ``[heads, head_dim]``, and the
``out`` kernel ``[heads, head_dim, d_model]``. Per head ``h`` and query position ``i``,

    a_ij = q_i · k_j / √head_dim,   p_i = softmax_j(a_ij + m_ij),   o_i = Σ_j p_ij v_j

where the causal mask ``m_ij`` is 0 for ``j ≤ i`` and the most negative float32 otherwise (so
a future token gets weight exactly 0). Each block sows ``max |a_ij|`` over the batch, heads
and unmasked pairs into the ``intermediates`` collection as ``attn/attn_logit_max``, to
watch attention-logit growth across the stack::

    _, inter = module.apply(variables, x, mutable=["intermediates"])
    inter["intermediates"]["blocks"]["attn"]["attn_logit_max"]   # ([L],) when scanned
    inter["intermediates"]["blocks_0"]["attn"]["attn_logit_max"]  # (scalar,) unrolled

**Layer stacking.** With ``scan=True`` the blocks are one ``nn.scan`` named ``blocks`` over
``n_layers`` copies (``variable_axes={"params": 0, "intermediates": 0}``, ``split_rngs``
for ``params`` and ``dropout``), so every block leaf has a leading layer axis
(``blocks/attn/query/kernel`` is ``[L, d_model, heads, head_dim]``); unrolled, the blocks
are the modules ``blocks_0 … blocks_{L−1}``. :func:`stack_layers` and
:func:`unstack_layers` map parameters between the two layouts, so one initialisation runs
in both and gives the same outputs.

**Logical axes.** Every parameter is created with ``nn.with_logical_partitioning`` (names
``vocab``, ``embed``, ``heads``, ``head_dim``, ``mlp``, ``seq``), and the scan adds
``layers`` in front (``metadata_params={nn.PARTITION_NAME: "layers"}``); without logical
axis rules this changes nothing. :func:`param_axes` reads them back as one
``PartitionSpec`` per leaf; the zoo's :class:`~jaxscope.models.base.ModelDef` carries them
as ``param_axes``.

**Precision.** ``dtype`` is the compute dtype of the embeddings, matrix products and the
residual stream, ``param_dtype`` that of the stored parameters. LayerNorm and the softmax
run in float32 whatever ``dtype`` is (the attention logits accumulate in float32), and the
returned logits are float32: ``dtype=jnp.bfloat16`` is the usual bf16 compute policy.

References: A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017; A. Radford et
al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019; R. Xiong et al.,
"On Layer Normalization in the Transformer Architecture", ICML 2020; A. Dosovitskiy et al.,
"An Image is Worth 16x16 Words", ICLR 2021.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "Block",
  "DecoderLM",
  "SelfAttention",
  "ViT",
  "multihead_attention",
  "param_axes",
  "resolve_dtype",
  "stack_layers",
  "unstack_layers",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(value: Any, *, arg: str = "dtype") -> Any:
  """A floating dtype from a name (``"bfloat16"``, ``"float32"``, ``"float16"``) or a dtype.

  Raises:
    ValueError: naming ``arg`` for anything else.
  """
  if isinstance(value, str):
    key = value.strip().lower().removeprefix("jnp.").removeprefix("np.")
    if key in _DTYPES:
      return _DTYPES[key]
  else:
    try:
      dt = jnp.dtype(value)
    except TypeError:
      dt = None
    if dt is not None and dt.name in _DTYPES:
      return _DTYPES[dt.name]
  raise ValueError(f"{arg} must be one of {sorted(_DTYPES)} (a name or a dtype), got {value!r}.")


def _init(fn: Any, *names: str | None) -> Any:
  """``fn`` with Flax logical-axis metadata (a no-op without axis rules)."""
  return nn.with_logical_partitioning(fn, names)


def multihead_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention of ``[B, T, heads, head_dim]`` queries, keys and values.

  ``a = q·kᵀ/√head_dim`` accumulates in float32; with ``causal`` the pairs ``j > i`` get the
  most negative float32 (weight exactly 0 after the softmax); the softmax runs in float32
  and its weights are cast to ``dtype`` for the product with ``v``.

  Returns:
    ``(o [B, T, heads, head_dim] in dtype, max |a_ij|)`` over the batch, the heads and the
    unmasked pairs, a float32 scalar.
  """
  depth = q.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits.astype(jnp.float32) / np.float32(math.sqrt(depth))
  if causal:
    t_q, t_k = logits.shape[-2:]
    keep = jnp.tril(jnp.ones((t_q, t_k), bool))
    logit_max = jnp.max(jnp.where(keep, jnp.abs(logits), 0.0))
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  else:
    logit_max = jnp.max(jnp.abs(logits))
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(dtype)), logit_max


def _layer_norm(name: str, param_dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=1e-6,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    scale_init=_init(nn.initializers.ones, "embed"),
    bias_init=_init(nn.initializers.zeros, "embed"),
    name=name,
  )


class SelfAttention(nn.Module):
  """Multi-head self-attention with ``DenseGeneral`` projections (see the module docstring).

  Attributes:
    num_heads: number of heads; ``d_model`` must be divisible by it.
    causal: mask the future (decoder) or not (encoder).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  causal: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, T, d_model] -> [B, T, d_model]``; sows ``attn_logit_max``."""
    d_model = x.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(
        f"SelfAttention: d_model {d_model} must be divisible by num_heads {self.num_heads}."
      )
    head_dim = d_model // self.num_heads
    kernel = nn.initializers.lecun_normal()

    def proj(name: str) -> jax.Array:
      return nn.DenseGeneral(
        (self.num_heads, head_dim),
        axis=-1,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_init(kernel, "embed", "heads", "head_dim"),
        bias_init=_init(nn.initializers.zeros, "heads", "head_dim"),
        name=name,
      )(x)

    out, logit_max = multihead_attention(
      proj("query"), proj("key"), proj("value"), causal=self.causal, dtype=self.dtype
    )
    self.sow("intermediates", "attn_logit_max", logit_max)
    return nn.DenseGeneral(
      d_model,
      axis=(-2, -1),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(kernel, "heads", "head_dim", "embed"),
      bias_init=_init(nn.initializers.zeros, "embed"),
      name="out",
    )(out)


class Block(nn.Module):
  """One pre-LayerNorm transformer block: ``ln1``, ``attn``, ``ln2``, ``fc1``, ``fc2``.

  ``__call__(x, _) -> (y, None)`` has the carry signature of ``nn.scan``.

  Attributes:
    num_heads: attention heads.
    mlp_dim: width of the MLP's hidden layer.
    causal: causal attention.
    dtype: compute dtype (LayerNorm and softmax run in float32).
    param_dtype: parameter dtype.
  """

  num_heads: int
  mlp_dim: int
  causal: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
    """``x [B, T, d_model]`` (in ``dtype``) ``-> (y [B, T, d_model], None)``."""
    d_model = x.shape[-1]
    kernel = nn.initializers.lecun_normal()
    h = _layer_norm("ln1", self.param_dtype)(x)
    a = SelfAttention(self.num_heads, self.causal, self.dtype, self.param_dtype, name="attn")(
      h.astype(self.dtype)
    )
    x = x + a.astype(x.dtype)
    h = _layer_norm("ln2", self.param_dtype)(x)
    h = nn.Dense(
      self.mlp_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(kernel, "embed", "mlp"),
      bias_init=_init(nn.initializers.zeros, "mlp"),
      name="fc1",
    )(h)
    h = nn.Dense(
      d_model,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(kernel, "mlp", "embed"),
      bias_init=_init(nn.initializers.zeros, "embed"),
      name="fc2",
    )(nn.gelu(h))
    return x + h.astype(x.dtype), None


def _blocks(
  x: jax.Array, *, n_layers: int, scan: bool, causal: bool, num_heads: int, mlp_dim: int,
  dtype: Any, param_dtype: Any,
) -> jax.Array:  # fmt: skip
  """Applies the stack of blocks inside a compact method (the caller is their parent)."""
  kw = dict(num_heads=num_heads, mlp_dim=mlp_dim, causal=causal, dtype=dtype)
  if scan:
    stack = nn.scan(
      Block,
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      length=n_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(**kw, param_dtype=param_dtype, name="blocks")(x, None)
    return x
  for i in range(n_layers):
    x, _ = Block(**kw, param_dtype=param_dtype, name=f"blocks_{i}")(x, None)
  return x


class DecoderLM(nn.Module):
  """A decoder-only (GPT-style) language model over token ids.

  Architecture: token embedding ``embed`` ``[vocab, d_model]`` + learned positions
  ``pos_embed`` ``[max_len, d_model]`` → ``n_layers`` causal pre-LN :class:`Block` s →
  LayerNorm ``ln_f`` → output head ``head`` ``[d_model, vocab]`` (or, with
  ``tie_embeddings``, ``embedᵀ``: ``logits = h · Eᵀ``). Returns float32 logits
  ``[B, T, vocab]``; position ``t``'s logits predict token ``t + 1`` from tokens ``≤ t``.

  Attributes:
    vocab_size: number of token ids (and of output classes).
    max_len: the longest sequence (rows of ``pos_embed``).
    d_model: width of the residual stream.
    num_heads: attention heads (``head_dim = d_model / num_heads``).
    n_layers: number of blocks.
    mlp_ratio: MLP width over ``d_model``.
    scan: stack the blocks with ``nn.scan`` (``blocks``, a leading layer axis) instead of
      unrolled modules ``blocks_0 …``.
    tie_embeddings: use the token embedding as the output head.
    dtype: compute dtype (LayerNorm, softmax and the logits stay float32).
    param_dtype: parameter dtype.
  """

  vocab_size: int
  max_len: int
  d_model: int = 64
  num_heads: int = 4
  n_layers: int = 2
  mlp_ratio: int = 4
  scan: bool = False
  tie_embeddings: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """``tokens int [B, T]`` (``T ≤ max_len``) ``-> logits float32 [B, T, vocab_size]``."""
    del train  # No dropout or BatchNorm.
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(
        f"DecoderLM: tokens must be [batch, T] with T <= max_len={self.max_len}, got shape "
        f"{tuple(tokens.shape)}."
      )
    embed_init = nn.initializers.normal(0.02)
    embed = nn.Embed(
      self.vocab_size,
      self.d_model,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=_init(embed_init, "vocab", "embed"),
      name="embed",
    )
    positions = nn.Embed(
      self.max_len,
      self.d_model,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=_init(embed_init, "seq", "embed"),
      name="pos_embed",
    )(jnp.arange(tokens.shape[1]))
    x = embed(tokens.astype(jnp.int32)) + positions[None]
    x = _blocks(
      x,
      n_layers=self.n_layers,
      scan=self.scan,
      causal=True,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_ratio * self.d_model,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    h = _layer_norm("ln_f", self.param_dtype)(x).astype(self.dtype)
    if self.tie_embeddings:
      return embed.attend(h).astype(jnp.float32)
    logits = nn.Dense(
      self.vocab_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(nn.initializers.lecun_normal(), "embed", "vocab"),
      bias_init=_init(nn.initializers.zeros, "vocab"),
      name="head",
    )(h)
    return logits.astype(jnp.float32)


class ViT(nn.Module):
  """A small vision transformer (Dosovitskiy et al. 2021) on ``[B, H, W, C]`` images (or
  ``[B, L, C]`` signals).

  Architecture: patch embedding ``patch_embed`` (a convolution with kernel = stride =
  ``patch``, VALID: a border smaller than a patch is dropped) → ``N`` tokens of width
  ``d_model`` (+ a learned class token ``cls`` in front when ``pool="cls"``) + learned
  positions ``pos_embed`` ``[1, N(+1), d_model]`` → ``n_layers`` non-causal pre-LN
  :class:`Block` s → LayerNorm ``ln_f`` → the class token's features (``pool="cls"``) or
  the mean over the tokens (``pool="mean"``) → Dense ``head`` → float32 logits
  ``[B, num_classes]``.

  Attributes:
    num_classes: outputs.
    patch: side of the square (or 1-D) patches.
    d_model, num_heads, n_layers, mlp_ratio, scan, dtype, param_dtype: as in
      :class:`DecoderLM`.
    pool: ``"cls"`` or ``"mean"``.
  """

  num_classes: int
  patch: int = 4
  d_model: int = 64
  num_heads: int = 4
  n_layers: int = 2
  mlp_ratio: int = 4
  pool: str = "cls"
  scan: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``x [B, *spatial, C] -> logits float32 [B, num_classes]``."""
    del train
    nd = x.ndim - 2
    x = nn.Conv(
      self.d_model,
      (self.patch,) * nd,
      strides=(self.patch,) * nd,
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(nn.initializers.lecun_normal(), *(None,) * (nd + 1), "embed"),
      bias_init=_init(nn.initializers.zeros, "embed"),
      name="patch_embed",
    )(jnp.asarray(x, jnp.float32))
    x = x.reshape(x.shape[0], -1, self.d_model)
    if self.pool == "cls":
      cls = self.param(
        "cls", _init(nn.initializers.zeros, None, None, "embed"), (1, 1, self.d_model),
        self.param_dtype,
      )  # fmt: skip
      x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])), x], 1
      )
    pos = self.param(
      "pos_embed", _init(nn.initializers.normal(0.02), None, "seq", "embed"),
      (1, x.shape[1], self.d_model), self.param_dtype,
    )  # fmt: skip
    x = x + pos.astype(x.dtype)
    x = _blocks(
      x,
      n_layers=self.n_layers,
      scan=self.scan,
      causal=False,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_ratio * self.d_model,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    h = _layer_norm("ln_f", self.param_dtype)(x)
    h = h[:, 0] if self.pool == "cls" else jnp.mean(h, axis=1)
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_init(nn.initializers.lecun_normal(), "embed", None),
      bias_init=_init(nn.initializers.zeros, None),
      name="head",
    )(h.astype(self.dtype))
    return logits.astype(jnp.float32)


def param_axes(variables: Any) -> Any:
  """The logical axis names of each parameter, as ``jax.sharding.PartitionSpec`` leaves.

  Args:
    variables: the boxed variables of ``module.init`` (or of ``jax.eval_shape`` of it),
      before unboxing, e.g. ``jax.eval_shape(module.init, key, x)["params"]``.

  Returns:
    A tree like the parameters with one ``PartitionSpec`` per leaf, e.g.
    ``PartitionSpec('layers', 'embed', 'heads', 'head_dim')`` for a scanned query kernel;
    leaves created without names get ``PartitionSpec()``.
  """
  return jax.tree.map(
    lambda v: v if isinstance(v, jax.sharding.PartitionSpec) else jax.sharding.PartitionSpec(),
    nn.get_partition_spec(variables),
    is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec),
  )


def stack_layers(unrolled_params: Any, n_layers: int, *, name: str = "blocks") -> dict:
  """Maps unrolled parameters (``blocks_0 … blocks_{L−1}``) to the scanned layout.

  ``out[name]`` is the blocks' trees stacked leaf by leaf along a new leading axis (layer
  ``i`` at index ``i``); every other entry is kept as it is. The inverse of
  :func:`unstack_layers`.

  Args:
    unrolled_params: the ``"params"`` collection of an unrolled model.
    n_layers: the number of blocks ``L`` it must hold.
    name: the blocks' name (``blocks``).

  Raises:
    ValueError: a block is missing, there are other blocks, or their trees differ.
  """
  params = dict(unrolled_params)
  pattern = re.compile(rf"^{re.escape(name)}_(\d+)$")
  found = sorted(int(m.group(1)) for k in params if (m := pattern.match(str(k))))
  if found != list(range(n_layers)):
    raise ValueError(
      f"stack_layers: unrolled_params must hold {name}_0 … {name}_{n_layers - 1} (n_layers="
      f"{n_layers}), got {[f'{name}_{i}' for i in found]}."
    )
  blocks = [params.pop(f"{name}_{i}") for i in range(n_layers)]
  structure = jax.tree.structure(blocks[0])
  for i, b in enumerate(blocks):
    if jax.tree.structure(b) != structure:
      raise ValueError(f"stack_layers: {name}_{i} has another tree than {name}_0.")
  params[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def unstack_layers(scanned_params: Any, *, name: str = "blocks") -> dict:
  """Maps scanned parameters (``blocks`` with a leading layer axis) to the unrolled layout.

  ``out[f"{name}_{i}"]`` is slice ``i`` of every leaf of ``scanned_params[name]``; every
  other entry is kept. The inverse of :func:`stack_layers`.

  Raises:
    ValueError: no ``name`` entry, or leaves whose leading axes differ.
  """
  params = dict(scanned_params)
  if name not in params:
    raise ValueError(f"unstack_layers: scanned_params has no {name!r} entry, got {sorted(params)}.")
  stacked = params.pop(name)
  lengths = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(stacked)}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(
      f"unstack_layers: every leaf of {name!r} must have the same leading (layer) axis, got "
      f"lengths {sorted(lengths, key=str)}."
    )
  (n_layers,) = lengths
  for i in range(n_layers):
    params[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
