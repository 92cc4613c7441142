"""The builders of the zoo's transformers (:func:`jaxscope.models.build`): the decoder-only
language model (Linen, with ``scan`` over its blocks, and NNX) and the vision transformer,
each with the logical axis names of its parameters for sharding."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxscope.models.base import ModelDef, linen_model_def
from jaxscope.models.build_args import flag, min_side, positive_ints
from jaxscope.models.nnx_models import nnx_module_def
from jaxscope.models.transformer import DecoderLM, ViT, param_axes, resolve_dtype
from jaxscope.models.transformer_nnx import NNXDecoderLM

__all__ = ["nnx_transformer_lm", "transformer_lm", "vit"]


def _transformer_options(
  name: str, d_model: Any, num_heads: Any, n_layers: Any, mlp_ratio: Any, dtype: Any,
  param_dtype: Any,
) -> dict[str, Any]:  # fmt: skip
  """The shared options of the transformers, checked (``d_model`` divisible by the heads)."""
  d, h, n, r = positive_ints(
    name, "d_model, num_heads, n_layers and mlp_ratio", (d_model, num_heads, n_layers, mlp_ratio)
  )
  if d % h:
    raise ValueError(f"build({name!r}): d_model {d} must be divisible by num_heads {h}.")
  try:
    dt, pdt = resolve_dtype(dtype, arg="dtype"), resolve_dtype(param_dtype, arg="param_dtype")
  except ValueError as e:
    raise ValueError(f"build({name!r}): {e}") from None
  return dict(d_model=d, num_heads=h, n_layers=n, mlp_ratio=r, dtype=dt, param_dtype=pdt)


def _linen_axes(module: Any, x: jax.ShapeDtypeStruct) -> Any:
  """The logical axis names of a Linen module's parameters (one abstract ``init``)."""
  boxed = jax.eval_shape(
    lambda k, xb: module.init({"params": k}, xb, train=False), jax.random.key(0), x
  )
  return param_axes(boxed["params"])


def transformer_lm(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  d_model: int = 64,
  num_heads: int = 4,
  n_layers: int = 2,
  mlp_ratio: int = 4,
  scan: bool = False,
  tie_embeddings: bool = False,
  dtype: Any = "float32",
  param_dtype: Any = "float32",
) -> ModelDef:
  opts = _transformer_options(name, d_model, num_heads, n_layers, mlp_ratio, dtype, param_dtype)
  module = DecoderLM(
    vocab_size=num_classes,
    max_len=input_shape[0],
    scan=flag(name, "scan", scan),
    tie_embeddings=flag(name, "tie_embeddings", tie_embeddings),
    **opts,
  )
  axes = _linen_axes(module, jax.ShapeDtypeStruct((1, *input_shape), jnp.int32))
  return linen_model_def(
    name,
    module,
    input_shape,
    num_classes,
    has_batch_stats=False,
    has_dropout=False,
    input_dtype=jnp.int32,
    param_axes=axes,
  )


def nnx_transformer_lm(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  d_model: int = 64,
  num_heads: int = 4,
  n_layers: int = 2,
  mlp_ratio: int = 4,
  tie_embeddings: bool = False,
  dtype: Any = "float32",
  param_dtype: Any = "float32",
) -> ModelDef:
  opts = _transformer_options(name, d_model, num_heads, n_layers, mlp_ratio, dtype, param_dtype)
  tie = flag(name, "tie_embeddings", tie_embeddings)
  # The parameter tree is the scanned Linen model's, and so are its logical axes.
  twin = DecoderLM(
    vocab_size=num_classes, max_len=input_shape[0], scan=True, tie_embeddings=tie, **opts
  )
  axes = _linen_axes(twin, jax.ShapeDtypeStruct((1, *input_shape), jnp.int32))

  def make(rngs: Any) -> NNXDecoderLM:
    return NNXDecoderLM(num_classes, input_shape[0], tie_embeddings=tie, **opts, rngs=rngs)

  return nnx_module_def(
    name,
    make,
    input_shape,
    num_classes,
    has_dropout=False,
    input_dtype=jnp.int32,
    param_axes=axes,
  )


def vit(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  patch: int = 4,
  d_model: int = 64,
  num_heads: int = 4,
  n_layers: int = 2,
  mlp_ratio: int = 4,
  pool: str = "cls",
  scan: bool = False,
  dtype: Any = "float32",
  param_dtype: Any = "float32",
) -> ModelDef:
  opts = _transformer_options(name, d_model, num_heads, n_layers, mlp_ratio, dtype, param_dtype)
  (p,) = positive_ints(name, "patch", (patch,))
  min_side(name, input_shape, p, f" (one patch of side patch={p}); pass a smaller patch.")
  if pool not in ("cls", "mean"):
    raise ValueError(f"build({name!r}): pool must be 'cls' or 'mean', got {pool!r}.")
  module = ViT(num_classes=num_classes, patch=p, pool=pool, scan=flag(name, "scan", scan), **opts)
  axes = _linen_axes(module, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return linen_model_def(
    name,
    module,
    input_shape,
    num_classes,
    has_batch_stats=False,
    has_dropout=False,
    param_axes=axes,
  )
