"""Gradient noise: per-example gradient statistics without materialising ``B × P`` gradients.

Conventions (Cockpit's, Schneider et al. 2021): the mini-batch loss is the mean of the
individual losses, ``L = (1/B) Σᵢ ℓᵢ``; ``gᵢ = ∇ℓᵢ`` is the gradient of example ``i``'s loss
and ``g = (1/B) Σᵢ gᵢ`` the mini-batch gradient. Everything below is computed from four
*sufficient statistics* of the ``gᵢ``:

* ``sq_norms``: ``‖gᵢ‖²`` per example (``[B]``),
* ``projections``: ``gᵢᵀv`` per example for a direction ``v`` (``[B]``; one forward-mode
  pass per direction, :func:`projections`),
* ``second_moment``: the uncentred second moment ``M = (1/B) Σᵢ gᵢ ⊙ gᵢ`` (a pytree like
  the parameters),
* ``grad``: ``g``.

:func:`per_example_moments` (:mod:`jaxscope.metrics.per_example`) forms ``sq_norms`` and
``M`` by the cheapest exact route: outer products for Dense layers, patches for
convolutions, chunked ``vmap(grad)`` for every other parameter. All of them assume that
example ``i``'s loss depends on the batch only through example ``i`` (no BatchNorm in
training mode, no in-batch contrastive losses).

The tests below follow Cockpit's formulas (``cockpit/quantities/*.py`` at v1.0.2), with
its batch-size conventions spelled out in each docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxscope.metrics.histograms import (
  HistogramSample,
  histogram_range,
  histogram_sample,
  sampled_histogram,
  sampled_histogram_2d,
)
from jaxscope.metrics.per_example import (
  ConvLayer,
  DenseLayer,
  PerExampleMoments,
  conv_layers,
  dense_layers,
  per_example_moments,
)

__all__ = [
  "ConvLayer",
  "DenseLayer",
  "HistogramSample",
  "PerExampleMoments",
  "cabs",
  "conv_layers",
  "dense_layers",
  "dense_projections",
  "early_stopping",
  "gradient_variance",
  "histogram_range",
  "histogram_sample",
  "inner_test",
  "layer_grad_projections",
  "layer_projections",
  "mean_gsnr",
  "norm_test",
  "ortho_test",
  "per_example_moments",
  "projections",
  "sampled_histogram",
  "sampled_histogram_2d",
]

_F32 = jnp.float32


# --------------------------------------------------------------------------- the tests


def _safe_sqrt(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(x, 0.0))


def norm_test(sq_norms: jax.Array, grad_sq_norm: jax.Array) -> jax.Array:
  """The largest θ for which the norm test (Byrd et al. 2012, eq. 3.9) passes.

  ``Var₁ = (Σᵢ ‖gᵢ‖² − B‖g‖²)/(B − 1) = Σᵢ ‖gᵢ − g‖²/(B − 1)`` (the sample variance's
  ℓ₁ norm) and ``θ = √(Var₁ / (B‖g‖²))``. Small θ: the gradient's direction is reliable at
  this batch size; θ > 1: noise dominates. (Cockpit ``NormTest``.)

  Args:
    sq_norms: ``[B]`` per-example squared gradient norms ``‖gᵢ‖²``.
    grad_sq_norm: ``‖g‖²`` of the mini-batch gradient.

  Returns:
    θ (float32 scalar); a negative variance from rounding is clamped to 0.
  """
  b = sq_norms.shape[0]
  var = (jnp.sum(sq_norms) - b * grad_sq_norm) / (b - 1)
  return _safe_sqrt(var / (b * grad_sq_norm)).astype(_F32)


def inner_test(projections_on_grad: jax.Array, grad_sq_norm: jax.Array) -> jax.Array:
  """The largest θ for which the inner-product test (Bollapragada et al. 2017, eq. 2.6) passes.

  With projections ``pᵢ = gᵢᵀg``: ``Var = (Σᵢ pᵢ² − B‖g‖⁴)/(B − 1)`` (the sample variance of
  the ``pᵢ``, whose mean is ``‖g‖²``) and ``θ = √(Var / (B‖g‖⁴))``. (Cockpit ``InnerTest``.)

  Args:
    projections_on_grad: ``[B]`` values ``gᵢᵀg``.
    grad_sq_norm: ``‖g‖²``.
  """
  b = projections_on_grad.shape[0]
  var = (jnp.sum(projections_on_grad**2) - b * grad_sq_norm**2) / (b - 1)
  return _safe_sqrt(var / (b * grad_sq_norm**2)).astype(_F32)


def ortho_test(
  sq_norms: jax.Array, projections_on_grad: jax.Array, grad_sq_norm: jax.Array
) -> jax.Array:
  """The largest ν for which the orthogonality test (Bollapragada et al. 2017, eq. 3.3) passes.

  The variance of the components of ``gᵢ`` orthogonal to ``g``:
  ``Var⊥ = (Σᵢ ‖gᵢ‖² − Σᵢ pᵢ²/‖g‖²)/(B − 1)`` with ``pᵢ = gᵢᵀg``, and
  ``ν = √(Var⊥ / (B‖g‖²))``. (Cockpit ``OrthoTest``.)
  """
  b = sq_norms.shape[0]
  var = (jnp.sum(sq_norms) - jnp.sum(projections_on_grad**2) / grad_sq_norm) / (b - 1)
  return _safe_sqrt(var / (b * grad_sq_norm)).astype(_F32)


def _tree_sum(fn: Callable[..., jax.Array], *trees: Any) -> jax.Array:
  parts = jax.tree.leaves(jax.tree.map(lambda *xs: jnp.sum(fn(*xs)), *trees))
  return jnp.sum(jnp.stack(parts)) if len(parts) > 1 else parts[0]


def _tree_size(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def gradient_variance(grad: Any, second_moment: Any) -> Any:
  """Per-entry variance of the per-example gradients, ``Var(gᵢ) = M − g⊙g`` (a pytree).

  The biased (``1/B``) estimator, as Cockpit's ``MeanGSNR``; multiply by ``B/(B − 1)``
  for the unbiased one. The mini-batch gradient's own variance is ``Var(gᵢ)/B``.
  """
  return jax.tree.map(lambda m, g: m - g * g, second_moment, grad)


def mean_gsnr(grad: Any, second_moment: Any, eps: float = 1e-5) -> jax.Array:
  """Mean gradient signal-to-noise ratio (Liu et al. 2020) as Cockpit computes it.

  ``GSNR_j = g_j² / (M_j − g_j² + ε)``, averaged over all ``P`` parameters. The denominator
  is the per-*example* variance ``(1/B)Σᵢ gᵢⱼ² − gⱼ²`` (not the variance of the mini-batch
  mean): this is Cockpit's scaling, which its users questioned (cockpit issue #28; Liu et
  al. define the ratio with the variance over *samples*, which is this one). Multiply by
  ``B`` for the SNR of the mini-batch gradient.
  """
  total = _tree_sum(lambda g, m: (g * g) / (m - g * g + eps), grad, second_moment)
  return (total / _tree_size(grad)).astype(_F32)


def cabs(
  grad: Any, second_moment: Any, loss: jax.Array, learning_rate: jax.Array | float
) -> jax.Array:
  """Batch size suggested by CABS (Balles, Romero & Hennig 2017, eq. 22).

  ``B_CABS = η · tr(Σ) / L`` with the per-example gradient covariance trace
  ``tr(Σ) = Σⱼ (Mⱼ − gⱼ²)`` and the mini-batch loss ``L``; derived for SGD without
  momentum at learning rate ``η``. (Cockpit ``CABS``: ``η (B·ΣM − B‖g‖²)/(B·L)``, the same.)
  """
  trace = _tree_sum(lambda g, m: m - g * g, grad, second_moment)
  return (learning_rate * trace / loss).astype(_F32)


def early_stopping(grad: Any, second_moment: Any, batch_size: int, eps: float = 1e-5) -> jax.Array:
  """Evidence-based early-stopping criterion (Mahsereci et al. 2017, eq. 7, left side).

  ``Var_j = (B·M_j − B·g_j²)/(B − 1)`` (unbiased per-example variance),
  ``SNR_j = g_j² / (Var_j + ε)`` and the criterion ``1 − B · mean_j SNR_j``; a value
  above 0 says "stop": the gradient is indistinguishable from noise. For SGD without
  momentum. (Cockpit ``EarlyStopping``.)
  """
  b = batch_size
  total = _tree_sum(lambda g, m: (g * g) / (b * (m - g * g) / (b - 1) + eps), grad, second_moment)
  return (1.0 - b * total / _tree_size(grad)).astype(_F32)


# --------------------------------------------------------------------------- projections


def projections(
  losses_fn: Callable[..., Any],
  params: Any,
  args: Sequence[Any],
  tangents: Any,
  *,
  has_aux: bool = False,
) -> jax.Array:
  """Per-example directional derivatives ``gᵢᵀvₖ`` for ``k`` directions at once: ``[k, B]``.

  One forward-mode pass (``jax.jvp`` of the per-example losses) per direction, the ``k``
  directions batched by ``vmap``; no per-example gradient is formed. This gives the
  inner-product test (``v = g``) and Cockpit's α (``v`` = the update) for any layer type.

  Args:
    losses_fn: ``losses_fn(params, *args) -> [B]`` individual losses (``(losses, aux)``
      if ``has_aux``).
    params: the parameters.
    args: the batch arguments.
    tangents: a pytree like ``params`` whose leaves have a leading axis ``k``.
    has_aux: whether ``losses_fn`` returns ``(losses, aux)``.
  """

  def fn(p: Any) -> jax.Array:
    out = losses_fn(p, *args)
    return out[0] if has_aux else out

  def one(t: Any) -> jax.Array:
    return jax.jvp(fn, (params,), (t,))[1]

  return jax.vmap(one)(tangents)


def layer_projections(
  dense: Sequence[DenseLayer], convs: Sequence[Any], tangent_leaves: Sequence[jax.Array]
) -> jax.Array:
  """Per-example ``gᵢᵀv`` restricted to captured Dense and Conv leaves: ``[k, B]``.

  Dense layers as in :func:`dense_projections`; a convolution contracts its per-example
  gradients ``Gᵢ`` (:class:`ConvLayer`) with the direction: ``Σ_kc Gᵢ[k, c] V[k, c]``.
  """
  total = dense_projections(dense, tangent_leaves) if dense else None
  for conv in convs:
    _, k, c = conv.kernel_grads.shape
    v = tangent_leaves[conv.kernel].astype(_F32)
    part = jnp.einsum("bkc,nkc->nb", conv.kernel_grads, v.reshape(v.shape[0], k, c))
    if conv.bias is not None:
      part = part + jnp.einsum("bc,nc->nb", conv.bias_grads, tangent_leaves[conv.bias])
    total = part if total is None else total + part
  if total is None:
    raise ValueError("layer_projections: no Dense or Conv layer given.")
  return total


def layer_grad_projections(
  dense: Sequence[DenseLayer], convs: Sequence[Any], grad_leaves: Sequence[jax.Array]
) -> jax.Array:
  """Per-example ``gᵢᵀg`` on the mean gradient ``g`` itself, restricted to the captured
  Dense and Conv leaves: ``[B]``.

  A Dense layer's ``g = (1/B) Σⱼ xⱼ ⊗ δⱼ``, so ``gᵢ(W)ᵀg(W) = (1/B) Σⱼ (xᵢᵀxⱼ)(δᵢᵀδⱼ)``
  and ``gᵢ(b)ᵀg(b) = (1/B) Σⱼ δᵢᵀδⱼ``: two Gram matrices, ``2B²(in + out)`` FLOPs
  against ``2B·in·out`` for contracting with the gradient (:func:`dense_projections`).
  Each layer takes the cheaper of the two; the values agree to float32 rounding when the
  leaves' gradient is the mean of the per-example gradients (what the Dense route
  assumes in any case). Convolutions contract their per-example gradients with ``g``.

  Args:
    dense: the captured Dense layers.
    convs: the captured convolutions (:class:`ConvLayer`).
    grad_leaves: ``jax.tree.leaves`` of the mean gradient (no leading axis).
  """
  total = None
  contract = []
  for layer in dense:
    b, n_in = layer.inputs.shape
    n_out = layer.output_grads.shape[1]
    if b * (n_in + n_out) >= n_in * n_out:  # the contraction is no dearer
      contract.append(layer)
      continue
    x = layer.inputs.astype(_F32)
    d = layer.output_grads.astype(_F32) * b
    gd = d @ d.T
    gram = (x @ x.T + (1.0 if layer.bias is not None else 0.0)) * gd
    part = jnp.sum(gram, axis=1) / b
    total = part if total is None else total + part
  if contract or convs:
    rest = layer_projections(contract, convs, [leaf[None] for leaf in grad_leaves])[0]
    total = rest if total is None else total + rest
  if total is None:
    raise ValueError("layer_grad_projections: no Dense or Conv layer given.")
  return total


def dense_projections(
  dense: Sequence[DenseLayer], tangent_leaves: Sequence[jax.Array]
) -> jax.Array:
  """Per-example ``gᵢᵀv`` restricted to the Dense layers' leaves, for ``k`` directions: ``[k, B]``.

  ``gᵢ(W)ᵀV = xᵢᵀ V δᵢ`` and ``gᵢ(b)ᵀv_b = δᵢᵀ v_b`` (``δᵢ = B·∂L/∂yᵢ``): one ``[B, in] ×
  [in, out]`` product per layer and direction, no forward pass.

  Args:
    dense: the captured Dense layers.
    tangent_leaves: ``jax.tree.leaves`` of the directions, each with a leading axis ``k``.
  """
  total = None
  for layer in dense:
    x = layer.inputs.astype(_F32)
    d = layer.output_grads.astype(_F32) * x.shape[0]
    v = tangent_leaves[layer.kernel].astype(_F32)  # [k, in, out]
    # One contraction per direction, the kernel in its own layout: an einsum over the
    # stacked [k, in, out] had XLA:CPU transpose each kernel first (a copy as dear as the
    # product on the MLP's first layer). A plain (x @ V) · d instead made the SPMD
    # partitioner gather a sharded layer's activations; the einsum does not.
    part = jnp.stack([jnp.einsum("bi,io,bo->b", x, v[j], d) for j in range(v.shape[0])])
    if layer.bias is not None:
      part = part + jnp.einsum("ko,bo->kb", tangent_leaves[layer.bias].astype(_F32), d)
    total = part if total is None else total + part
  if total is None:
    raise ValueError("dense_projections: no Dense layer given.")
  return total
