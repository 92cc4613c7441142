"""Sufficient statistics of the per-example gradients, by the cheapest exact route.

With the mini-batch loss ``L = (1/B) Σᵢ ℓᵢ`` and ``gᵢ = ∇ℓᵢ`` (Cockpit's conventions, see
:mod:`jaxscope.metrics.noise`), :func:`per_example_moments` forms ``‖gᵢ‖²`` per example,
the uncentred second moment ``M = (1/B) Σᵢ gᵢ ⊙ gᵢ`` and sampled entries of the ``gᵢ``
without materialising ``B × P`` gradients:

* **Dense layers** (``y = x W + b`` with a ``[B, in]`` input): the per-example gradient
  is an outer product, ``gᵢ(W) = xᵢ δᵢᵀ`` and ``gᵢ(b) = δᵢ``, with ``δᵢ = ∂ℓᵢ/∂yᵢ = B·∂L/∂yᵢ``
  (captured by :mod:`jaxscope.capture`). Hence ``‖gᵢ(W)‖² = ‖xᵢ‖²‖δᵢ‖²`` and
  ``Σᵢ gᵢ(W)⊙gᵢ(W) = (X⊙X)ᵀ(Δ⊙Δ)``: one matrix product, no ``B × P`` tensor
  (:class:`DenseLayer`, :func:`dense_layers`).
* **Convolutions** (SAME/VALID/explicit padding, one feature group): ``gᵢ(W) = Pᵢᵀδᵢ``
  from the input's patches ``Pᵢ``, one layer at a time (:class:`ConvLayer`,
  :func:`conv_layers`).
* **Every other parameter** (normalisation scales, embeddings, unusual convolutions): per-example
  gradients by ``vmap(grad)`` of the single-example loss, ``chunk`` examples at a time
  (a ``lax.scan``), reduced to the statistics before the next chunk, so at most
  ``chunk × P_rest`` floats exist at once.

Both routes assume that example ``i``'s loss depends on the batch only through example
``i`` (no BatchNorm in training mode, no in-batch contrastive losses): with batch
statistics, per-example gradients are not defined (Cockpit/BackPACK have the same
limitation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxscope import tree as jtree

if TYPE_CHECKING:
  from jaxscope.metrics.histograms import HistogramSample

__all__ = [
  "ConvLayer",
  "DenseLayer",
  "PerExampleMoments",
  "conv_layers",
  "dense_layers",
  "per_example_moments",
  "take_flat",
]

_F32 = jnp.float32


def take_flat(x: jax.Array, indices: np.ndarray, lead: int = 0) -> jax.Array:
  """``x.reshape(*x.shape[:lead], -1)[..., indices]`` without the reshape.

  The entries at the row-major flat ``indices`` of ``x``'s trailing shape
  ``x.shape[lead:]`` (after ``lead`` leading axes, e.g. examples), gathered by their
  multi-indices (``np.unravel_index``). The values are those of the flattened array, but a
  leaf sharded over a device mesh along a trailing axis is never flattened: merging a
  sharded axis with others makes XLA gather the whole leaf onto every device first (a
  kernel, or ``chunk`` per-example copies of it), while a point gather of a sharded array
  is done shard by shard.

  Args:
    x: an array of at least ``lead`` axes.
    indices: integer flat indices into ``x.shape[lead:]`` (static, numpy).
    lead: the number of leading axes kept.

  Returns:
    ``[*x.shape[:lead], len(indices)]``.
  """
  indices = np.asarray(indices)
  trailing = x.shape[lead:]
  if not trailing:  # a scalar per leading index: every flat index is 0
    return jnp.broadcast_to(x[..., None], (*x.shape, len(indices)))
  head = (slice(None),) * lead
  return x[(*head, *np.unravel_index(indices, trailing))]


def _trailing_sum(x: jax.Array, lead: int = 1) -> jax.Array:
  """``Σ`` over every axis after the first ``lead`` (``x.reshape(*lead, -1).sum(-1)``
  without the reshape, which would gather a sharded leaf)."""
  return jnp.sum(x, axis=tuple(range(lead, x.ndim)))


class DenseLayer(NamedTuple):
  """A Dense layer's captured tensors for the outer-product route."""

  inputs: jax.Array
  """``X``: ``[B, in]``, the layer's input."""
  output_grads: jax.Array
  """``∂L/∂y``: ``[B, out]`` for the *mean* loss ``L`` (so ``δᵢ = B · ∂L/∂yᵢ``)."""
  kernel: int
  """Index of the kernel ``[in, out]`` among ``jax.tree.leaves(params)``."""
  bias: int | None
  """Index of the bias ``[out]``, or ``None``."""


class ConvLayer(NamedTuple):
  """A convolution's per-example gradients, formed from its captured input and output grads.

  ``Gᵢ = Pᵢᵀ δᵢ``: the patches ``Pᵢ`` (``[T, K]``, ``T`` output positions, ``K = kh·kw·c_in``)
  of example ``i``'s input times its output gradients ``δᵢ = B·∂L/∂yᵢ`` (``[T, c_out]``),
  one batched matrix product with the FLOPs of the layer's weight gradient. It exists for
  one layer at a time (``B × K × c_out`` floats), never for the whole network.
  """

  kernel_grads: jax.Array
  """``[B, K, c_out]``, ``K`` in the kernel's ``(kh, kw, c_in)`` order."""
  bias_grads: jax.Array | None
  """``[B, c_out]``: ``Σ_t δᵢₜ``, or ``None``."""
  kernel: int
  bias: int | None


class PerExampleMoments(NamedTuple):
  """Sufficient statistics of the per-example gradients (see the module docstring)."""

  sq_norms: jax.Array
  """``[B]``: ``‖gᵢ‖²`` over all parameters."""
  second_moment: Any
  """``M = (1/B) Σᵢ gᵢ⊙gᵢ``, a pytree like the parameters."""
  samples: jax.Array | None
  """``[B, S]``: per-example gradient entries at a :class:`HistogramSample`'s coordinates
  (leaf order), or ``None``."""


def per_example_moments(
  losses_fn: Callable[..., Any],
  params: Any,
  args: Sequence[Any],
  *,
  dense: Sequence[DenseLayer] = (),
  convs: Sequence[ConvLayer] = (),
  has_aux: bool = False,
  chunk: int = 32,
  sample: HistogramSample | None = None,
  second_moment: bool = True,
) -> PerExampleMoments:
  """``‖gᵢ‖²``, ``M = (1/B)Σᵢ gᵢ⊙gᵢ`` and sampled entries of the per-example gradients.

  Dense layers listed in ``dense`` use the outer-product identities of the module
  docstring; all other leaves use ``vmap(grad)`` of the single-example loss over chunks
  of ``chunk`` examples (the batch is padded to a multiple of ``chunk``; padded examples
  are masked out). Every array in ``args`` must have the batch as its leading axis.

  Args:
    losses_fn: ``losses_fn(params, *args) -> [B]`` (``(losses, aux)`` if ``has_aux``).
    params: the parameters.
    args: batch arrays with a leading axis ``B``.
    dense: captured Dense layers (see :class:`DenseLayer`).
    convs: convolutions with their per-example gradients (see :class:`ConvLayer`).
    has_aux: whether ``losses_fn`` returns ``(losses, aux)``.
    chunk: examples per ``vmap(grad)`` chunk (memory ``chunk × P_rest`` floats).
    sample: coordinates to return per-example entries of (for histograms).
    second_moment: whether to form ``M`` (``False``: ``second_moment`` is ``None``).

  Returns:
    :class:`PerExampleMoments`.
  """
  leaves, treedef = jax.tree.flatten(params)
  b = _batch_size(args)
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"per_example_moments: chunk must be a positive int, got {chunk!r}.")
  sq_norms, second, samples, covered = _layer_moments(
    leaves, b, dense, convs, sample, second_moment
  )
  rest = [i for i in range(len(leaves)) if i not in covered]
  if rest:

    def example_loss(rest_leaves: list[jax.Array], example: tuple[Any, ...]) -> jax.Array:
      full = list(leaves)
      for i, leaf in zip(rest, rest_leaves, strict=True):
        full[i] = leaf
      p = jax.tree.unflatten(treedef, full)
      batch1 = jax.tree.map(lambda a: a[None], example)
      out = losses_fn(p, *batch1)
      return (out[0] if has_aux else out)[0]

    rest_sq, rest_second, rest_samples = _vmap_moments(
      example_loss, [leaves[i] for i in rest], rest, args, b, chunk, sample, second_moment
    )
    sq_norms = sq_norms + rest_sq
    for j, i in enumerate(rest):
      if second_moment:
        second[i] = rest_second[j]
      if sample is not None:
        samples[i] = rest_samples[j]

  sampled = None
  if sample is not None:
    sampled = jnp.concatenate([s for s in samples if s is not None], axis=1)
  moment = jax.tree.unflatten(treedef, second) if second_moment else None
  return PerExampleMoments(sq_norms, moment, sampled)


def _batch_size(args: Sequence[Any]) -> int:
  """``B``, the common leading axis of every batch array (at least 2)."""
  arg_leaves = jax.tree.leaves(tuple(args))
  if not arg_leaves:
    raise ValueError("per_example_moments: args holds no batch array.")
  b = int(arg_leaves[0].shape[0])
  for a in arg_leaves:
    if a.ndim == 0 or a.shape[0] != b:
      raise ValueError(
        "per_example_moments: every batch argument needs the batch as its leading axis "
        f"of size {b}, got one of shape {tuple(a.shape)}."
      )
  if b < 2:
    raise ValueError(f"per_example_moments: needs a batch of at least 2 examples, got {b}.")
  return b


def _layer_moments(
  leaves: list[jax.Array],
  b: int,
  dense: Sequence[DenseLayer],
  convs: Sequence[ConvLayer],
  sample: HistogramSample | None,
  second_moment: bool,
) -> tuple[jax.Array, list[jax.Array | None], list[jax.Array | None], set[int]]:
  """The Dense and Conv layers' part: ``(sq_norms, second, samples, covered leaves)``.

  ``second`` and ``samples`` are per leaf, ``None`` for the leaves not covered.
  """
  second: list[jax.Array | None] = [None] * len(leaves)
  samples: list[jax.Array | None] = [None] * len(leaves)
  sq_norms = jnp.zeros((b,), _F32)
  covered: set[int] = set()
  for layer in dense:
    x = layer.inputs.astype(_F32)
    d = layer.output_grads.astype(_F32) * b  # δᵢ = ∂ℓᵢ/∂yᵢ
    kernel = leaves[layer.kernel]
    if x.ndim != 2 or d.ndim != 2 or kernel.shape != (x.shape[1], d.shape[1]):
      raise ValueError(
        f"per_example_moments: dense layer with kernel {kernel.shape} needs inputs [B, in] and "
        f"output grads [B, out], got {x.shape} and {d.shape}."
      )
    x2, d2 = x * x, d * d
    dsq = jnp.sum(d2, axis=1)
    sq_norms = sq_norms + jnp.sum(x2, axis=1) * dsq
    if second_moment:
      second[layer.kernel] = (x2.T @ d2 / b).astype(kernel.dtype)
    covered.add(layer.kernel)
    if sample is not None:
      rows, cols = np.divmod(sample.indices[layer.kernel], kernel.shape[1])
      samples[layer.kernel] = x[:, rows] * d[:, cols]
    if layer.bias is not None:
      sq_norms = sq_norms + dsq
      if second_moment:
        second[layer.bias] = jnp.mean(d2, axis=0).astype(leaves[layer.bias].dtype)
      covered.add(layer.bias)
      if sample is not None:
        samples[layer.bias] = d[:, sample.indices[layer.bias]]
  for conv in convs:
    parts = [(conv.kernel, conv.kernel_grads)]
    if conv.bias is not None:
      parts.append((conv.bias, conv.bias_grads))
    for index, g in parts:
      sq_norms = sq_norms + _trailing_sum(g * g)
      if second_moment:
        second[index] = jnp.mean(g * g, axis=0).reshape(leaves[index].shape)
      if sample is not None:
        samples[index] = take_flat(g, sample.indices[index], lead=1)
      covered.add(index)
  return sq_norms, second, samples, covered


def _vmap_moments(
  example_loss: Callable[[list[jax.Array], tuple[Any, ...]], jax.Array],
  rest_leaves: list[jax.Array],
  rest: list[int],
  args: Sequence[Any],
  b: int,
  chunk: int,
  sample: HistogramSample | None,
  second_moment: bool,
) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
  """The other leaves' part, by ``vmap(grad)`` over chunks: ``(sq_norms, second, samples)``.

  ``example_loss(rest_leaves, example)`` is one example's loss as a function of the leaves
  ``rest`` (indices into the parameters' leaves); the batch is padded to a multiple of
  ``chunk`` and the padded examples are masked out.
  """
  c = min(chunk, b)
  n_chunks = -(-b // c)
  pad = n_chunks * c
  order = jnp.arange(pad) % b
  mask = (jnp.arange(pad) < b).astype(_F32).reshape(n_chunks, c)
  chunked = jax.tree.map(lambda a: a[order].reshape((n_chunks, c, *a.shape[1:])), tuple(args))
  grad_one = jax.grad(example_loss)

  def body(carry: list[jax.Array], xs: tuple[Any, jax.Array]) -> tuple[Any, Any]:
    ex, m = xs
    g = jax.vmap(grad_one, in_axes=(None, 0))(rest_leaves, ex)  # list of [c, *shape]
    g = [gi.astype(_F32) * m.reshape((-1,) + (1,) * (gi.ndim - 1)) for gi in g]
    sq = sum(_trailing_sum(gi * gi) for gi in g)
    if second_moment:
      carry = [acc + jnp.sum(gi * gi, axis=0) for acc, gi in zip(carry, g, strict=True)]
    out = [sq]
    if sample is not None:
      out.append([take_flat(gi, sample.indices[i], lead=1) for i, gi in zip(rest, g, strict=True)])
    return carry, out

  init = [jnp.zeros(x.shape if second_moment else (), _F32) for x in rest_leaves]
  sums, outs = jax.lax.scan(body, init, (chunked, mask))
  sq_norms = outs[0].reshape(pad)[:b]
  second = []
  if second_moment:
    second = [(s / b).astype(x.dtype) for s, x in zip(sums, rest_leaves, strict=True)]
  samples = []
  if sample is not None:
    samples = [v.reshape(pad, -1)[:b] for v in outs[1]]
  return sq_norms, second, samples


def _conv_per_example(x: jax.Array, d: jax.Array, spec: Any) -> jax.Array:
  """``[B, K, c_out]`` per-example kernel gradients of one convolution (see :class:`ConvLayer`)."""
  b, c_in = x.shape[0], x.shape[-1]
  nd = len(spec.kernel_size)
  lhs = jnp.moveaxis(x.astype(_F32), -1, 1)  # [B, C_in, *spatial]
  patches = jax.lax.conv_general_dilated_patches(
    lhs,
    filter_shape=spec.kernel_size,
    window_strides=spec.strides,
    padding=spec.padding,
    lhs_dilation=spec.input_dilation,
    rhs_dilation=spec.kernel_dilation,
  )  # [B, C_in·prod(k), *out], features ordered (c_in, *k)
  t = math.prod(patches.shape[2:])
  patches = patches.reshape(b, c_in, *spec.kernel_size, t)
  patches = jnp.moveaxis(patches, 1, 1 + nd).reshape(b, -1, t)  # (*k, c_in) order
  delta = d.astype(_F32).reshape(b, t, d.shape[-1]) * b
  return jnp.einsum("bkt,btc->bkc", patches, delta)


def conv_layers(params: Any, captured: Any) -> list[ConvLayer]:
  """The :class:`ConvLayer` of every captured ``"conv"`` layer the patch route supports.

  A layer qualifies when :mod:`jaxscope.capture` recorded its :class:`~jaxscope.capture.ConvSpec`
  (``SAME``/``VALID``/explicit padding), it has one feature group, its parameters are
  exactly ``{key}/kernel`` ``[*k, c_in, c_out]`` (and optionally ``{key}/bias``), and its
  input is ``[B, *spatial, c_in]``; the others take the ``vmap(grad)`` route.
  """
  convs = getattr(captured, "convs", {})
  by_module = _leaves_by_module(params)
  out = []
  for key, spec in convs.items():
    if key not in captured.inputs or key not in captured.grads or spec.feature_group_count != 1:
      continue
    x, d = captured.inputs[key], captured.grads[key]
    own = {i.name.rpartition("/")[2]: i for i in by_module.get(key, [])}
    if "kernel" not in own or set(own) - {"kernel", "bias"}:
      continue
    k = own["kernel"]
    nd = len(spec.kernel_size)
    if (
      x.ndim != nd + 2
      or d.ndim != nd + 2
      or k.shape != (*spec.kernel_size, x.shape[-1], d.shape[-1])
    ):
      continue
    bias = own.get("bias")
    if bias is not None and bias.shape != (d.shape[-1],):
      continue
    g = _conv_per_example(x, d, spec)
    bg = None
    if bias is not None:
      bg = jnp.sum(d.astype(_F32).reshape(d.shape[0], -1, d.shape[-1]), axis=1) * d.shape[0]
    out.append(ConvLayer(g, bg, k.index, None if bias is None else bias.index))
  return out


def _leaves_by_module(params: Any) -> dict[str, list[jtree.LeafInfo]]:
  by_module: dict[str, list[jtree.LeafInfo]] = {}
  for info in jtree.leaf_infos(params, argname="params"):
    by_module.setdefault(info.module, []).append(info)
  return by_module


def dense_layers(params: Any, captured: Any) -> list[DenseLayer]:
  """The :class:`DenseLayer` records for every captured ``"dense"`` layer with a 2-D input.

  ``captured`` is a :class:`jaxscope.capture.Captured` recorded with ``inputs=True`` and
  layer gradients; a layer qualifies when its parameters are exactly ``{key}/kernel``
  ``[in, out]`` (and optionally ``{key}/bias`` ``[out]``) and its input is ``[B, in]``.
  """
  by_module = _leaves_by_module(params)
  out = []
  for key, kind in captured.kinds.items():
    if kind != "dense" or key not in captured.inputs or key not in captured.grads:
      continue
    x, d = captured.inputs[key], captured.grads[key]
    own = {i.name.rpartition("/")[2]: i for i in by_module.get(key, [])}
    if x.ndim != 2 or d.ndim != 2 or "kernel" not in own or set(own) - {"kernel", "bias"}:
      continue
    k = own["kernel"]
    if k.shape != (x.shape[1], d.shape[1]):
      continue
    bias = own.get("bias")
    if bias is not None and bias.shape != (d.shape[1],):
      continue
    out.append(DenseLayer(x, d, k.index, None if bias is None else bias.index))
  return out
