"""Hessian-vector products by forward-over-reverse differentiation: the one place they are built.

The Hessian ``H = ∇²L(θ)`` of a loss is never formed; it is reached as the derivative of the
gradient map ``θ ↦ ∇L(θ)``: ``H v = ∂/∂ε ∇L(θ + εv)``, the JVP (forward mode) of the
gradient (reverse mode). Two routes, for two uses:

* :func:`linearize_grad`: ``jax.linearize`` of the gradient map runs the forward and backward
  pass once and returns the gradient with the linear map ``v ↦ H v``; each product then
  costs about one extra forward+backward pass and the gradient is not recomputed. The
  linearisation keeps the residuals of the forward and backward pass alive (about the memory
  of one backward pass). For products that are applied repeatedly or one after another
  (power iteration, Lanczos, one product per optimizer phase) and where the vectors are not
  known in advance. :func:`value_grad_and_hvp` is this route for a loss function, and
  ``k`` products at once go through it as a batch with :func:`batched_hvp`.
* :func:`jvp_grad`: ``jax.vmap`` of ``jax.jvp`` of the gradient map for ``k`` tangents known
  in advance: the primal (gradient) once, the ``k`` tangents pushed through as one batch,
  with no linearisation kept. For a fixed set of probes in one pass (Hutchinson probes and
  a one-step power iteration, :mod:`jaxscope.metrics.instruments`).

:mod:`jaxscope.metrics.curvature`, :mod:`jaxscope.metrics.instruments` and
:mod:`jaxscope.transforms.probprec` take their products from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.shard_alike import shard_alike

__all__ = [
  "batched_hvp",
  "jvp_grad",
  "linearize_grad",
  "value_grad_and_hvp",
]

PyTree = Any
Hvp = Callable[[PyTree], PyTree]


def _like(tangent: PyTree, params: PyTree) -> PyTree:
  """``tangent`` in the parameters' dtypes and layout, its values unchanged.

  * The dtypes (JAX requires them): float32 probe vectors meet bfloat16 parameters, whose
    products are then bfloat16 (their sums are taken in float32 by
    :func:`jaxscope.metrics.base.tree_vdot`).
  * The layout: each tangent leaf is sharded as its parameter
    (:func:`jax.experimental.shard_alike.shard_alike`; nothing happens on one device). A
    probe drawn inside ``jit`` (Rademacher) has no layout of its own; on a device mesh XLA
    laid it out replicated and then gathered the sharded parameter it meets in the
    forward-mode pass (a whole ``[128, 64]`` kernel per HVP in a fully sharded MLP step:
    ``hess_trace`` and ``tic_diag`` of the business and full presets).
  """
  return jax.tree.map(lambda t, p: shard_alike(t.astype(jnp.result_type(p)), p)[0], tangent, params)


def linearize_grad(
  grad_fn: Callable[[PyTree], Any], params: PyTree, *, has_aux: bool = False
) -> tuple[PyTree, Hvp, Any]:
  """The gradient at ``params`` and the Hessian-vector product ``v ↦ H v``, by ``jax.linearize``.

  ``grad_fn`` is the gradient map ``θ ↦ ∇L(θ)`` (for example ``jax.grad(loss_fn)``); its
  linearisation at ``θ`` is ``v ↦ H v``. The forward and backward pass run once; every
  ``hvp(v)`` costs about one more forward+backward pass.

  Args:
    grad_fn: ``grad_fn(params)`` returning the gradient pytree (``(grads, aux)`` with
      ``has_aux``; ``aux`` is carried along, not differentiated).
    params: the point ``θ``, a pytree.
    has_aux: whether ``grad_fn`` returns ``(grads, aux)``.

  Returns:
    ``(grads, hvp, aux)`` (``aux`` is ``None`` without ``has_aux``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxscope.metrics.hvp import linearize_grad
    >>> g, hvp, _ = linearize_grad(jax.grad(lambda p: jnp.sum(p**3)), jnp.array([1.0, 2.0]))
    >>> [float(x) for x in hvp(jnp.array([1.0, 1.0]))]   # H = diag(6θ)
    [6.0, 12.0]
  """
  if has_aux:
    grads, hvp, aux = jax.linearize(grad_fn, params, has_aux=True)
  else:
    (grads, hvp), aux = jax.linearize(grad_fn, params), None
  return grads, lambda v: hvp(_like(v, params)), aux


def jvp_grad(
  grad_fn: Callable[[PyTree], Any], params: PyTree, tangents: PyTree, *, has_aux: bool = False
) -> tuple[PyTree, PyTree, Any]:
  """The gradient and ``H tₖ`` for a stack of ``k`` tangents, in one forward-over-reverse pass.

  ``jax.vmap`` over the tangents of ``jax.jvp(grad_fn, (params,), (t,))``: the primal
  (gradient and ``aux``) is computed once, the ``k`` tangents are pushed through as one
  batch, and no linearisation is kept alive afterwards.

  Args:
    grad_fn: ``grad_fn(params)`` returning the gradient pytree (``(grads, aux)`` with
      ``has_aux``).
    params: the point ``θ``, a pytree.
    tangents: a pytree like ``params`` whose leaves carry a leading axis of length ``k``.
    has_aux: whether ``grad_fn`` returns ``(grads, aux)``.

  Returns:
    ``(grads, products, aux)``: ``products`` like ``tangents`` (leading axis ``k``);
    ``aux`` is ``None`` without ``has_aux``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxscope.metrics.hvp import jvp_grad
    >>> grad_fn = jax.grad(lambda p: jnp.sum(p**3))
    >>> _, hv, _ = jvp_grad(grad_fn, jnp.array([1.0, 2.0]), jnp.eye(2))
    >>> hv.tolist()   # H = diag(6θ), one row per tangent
    [[6.0, 0.0], [0.0, 12.0]]
  """

  def one(t: PyTree) -> tuple[Any, ...]:
    return jax.jvp(grad_fn, (params,), (_like(t, params),), has_aux=has_aux)

  if all(a.shape[0] == 1 for a in jax.tree.leaves(tangents)):
    # One tangent without vmap: XLA:CPU runs the product's matmuls slower with a batch
    # axis of 1 (one HVP of the MNIST MLP at batch 128: 13.6 ms through vmap, 12.4 ms
    # without, jitted on its own).
    out = one(jax.tree.map(lambda a: a[0], tangents))
    products = jax.tree.map(lambda a: a[None], out[1])
    return out[0], products, out[2] if has_aux else None
  if has_aux:
    return jax.vmap(one, out_axes=(None, 0, None))(tangents)
  grads, products = jax.vmap(one, out_axes=(None, 0))(tangents)
  return grads, products, None


def value_grad_and_hvp(
  loss_fn: Callable[..., Any], params: PyTree, *args: Any, has_aux: bool = False, **kwargs: Any
) -> tuple[Any, PyTree, Hvp]:
  """The loss, its gradient and the Hessian-vector product ``v ↦ H v`` at ``params``, in one pass.

  Forward-over-reverse: :func:`linearize_grad` of ``jax.value_and_grad(loss_fn)`` runs the
  forward and backward pass once and returns, with the value and gradient ``g = ∇L(θ)``,
  the linear map ``v ↦ H v`` (the JVP of the gradient, ``H v = ∂/∂ε ∇L(θ + εv)``; the
  value rides along undifferentiated). Each ``hvp(v)`` then costs about one extra
  forward+backward pass, and the gradient is not recomputed. To apply ``H`` to ``k``
  vectors use :func:`batched_hvp` (``jax.vmap`` of the linear map): one linearisation,
  ``k`` tangents pushed through it as a batch, which is cheaper than ``k`` separate
  ``jax.jvp`` calls (those each redo the forward pass and run ``k`` sequential small
  kernels instead of one batched one). The linearisation keeps the residuals of the
  forward and backward pass alive (about the memory of one backward pass).

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` returning a scalar (or
      ``(scalar, aux)`` with ``has_aux``).
    params: the point ``θ``, a pytree.
    *args: further arguments of ``loss_fn`` (the mini-batch), held fixed.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    **kwargs: keyword arguments of ``loss_fn``, held fixed.

  Returns:
    ``(value, grads, hvp)``: ``value`` is the loss (``(loss, aux)`` with ``has_aux``),
    ``grads`` the gradient pytree and ``hvp(v) = H v`` for ``v`` a pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxscope.transforms import value_grad_and_hvp
    >>> loss = lambda p: jnp.sum(p**3)
    >>> v, g, hvp = value_grad_and_hvp(loss, jnp.array([1.0, 2.0]))
    >>> [float(x) for x in hvp(jnp.array([1.0, 0.0]))]   # H = diag(6x)
    [6.0, 0.0]
  """

  def grads_and_value(p: PyTree) -> tuple[PyTree, Any]:
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(p, *args, **kwargs)
    return grads, value

  grads, hvp, value = linearize_grad(grads_and_value, params, has_aux=True)
  return value, grads, lambda v: hvp(_like(v, params))


def batched_hvp(hvp: Hvp, vs: PyTree) -> PyTree:
  """``H vₖ`` for a stack of ``k`` vectors: ``jax.vmap(hvp)(vs)``.

  Args:
    hvp: ``v ↦ H v``, e.g. from :func:`value_grad_and_hvp`.
    vs: a pytree like the parameters whose leaves carry a leading axis of length ``k``.

  Returns:
    The pytree of products, with the same leading axis.
  """
  return jax.vmap(hvp)(vs)
