"""``value_and_grad`` with layer outputs and ``∂L/∂(layer output)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxscope.capture.layers import Captured, ConvSpec, Pattern, _Kinds
from jaxscope.capture.recording import intercept
from jaxscope.tree import _compile

__all__ = ["value_and_grad"]


def _no_layer_error(include: Pattern, exclude: Pattern) -> ValueError:
  return ValueError(
    "capture.value_and_grad: no layer was recorded (include="
    f"{include!r}, exclude={exclude!r}). fn must call a Flax Linen module (model.apply) "
    "or an NNX module inside it, the recorded layers are the non-root modules that own "
    "parameters, and include/exclude must leave at least one of them."
  )


def value_and_grad(
  fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  include: Pattern = None,
  exclude: Pattern = None,
  layer_grads: bool = True,
  inputs: bool = False,
) -> Callable[..., tuple[Any, Any, Captured]]:
  """``jax.value_and_grad(fn)`` that also captures layer outputs and ``∂L/∂(output)``.

  ``value_and_grad(fn)(params, *args, **kwargs)`` returns ``(value, grads, captured)``:
  ``value = fn(params, *args, **kwargs)`` (``(loss, aux)`` with ``has_aux``),
  ``grads = ∂loss/∂params`` exactly as ``jax.value_and_grad(fn, has_aux=has_aux)``, and
  a :class:`Captured` with each recorded layer's output ``y_l``, optionally its input,
  and with ``layer_grads`` ``∂loss/∂y_l = ∂loss(θ, ε)/∂ε_l`` at ``ε = 0``, where
  ``y_l + ε_l`` replaces the layer's output.

  Cost: ``fn`` is traced twice (a ``jax.eval_shape`` pass learns the layers and their
  output shapes) when ``layer_grads``; the compiled program is one forward and one
  backward pass that also returns the activations, as plain ``jax.value_and_grad``.
  Use it inside the jitted step; ``fn`` calls the model normally (``model.apply(...)``,
  an NNX module held by closure, or ``nnx.merge`` inside ``fn``).

  Args:
    fn: ``fn(params, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with ``has_aux``),
      ``loss`` a real scalar.
    has_aux: whether ``fn`` returns ``(loss, aux)``.
    include: regular expression(s) on layer keys (``re.search``); ``None`` = all.
    exclude: regular expression(s) of layer keys to leave out.
    layer_grads: also compute ``∂loss/∂y_l`` per layer.
    inputs: also record each layer's first positional input.

  Returns:
    A function of ``(params, *args, **kwargs)`` returning ``(value, grads, captured)``.

  Raises:
    TypeError: if ``fn`` is not callable.
    ValueError: (when called) if no layer was recorded, naming include/exclude; see
      also :func:`intercept`.
  """
  if not callable(fn):
    raise TypeError(f"capture.value_and_grad: fn must be callable, got {type(fn).__name__}.")
  _compile(include, "include")  # Fail early on an invalid pattern.
  _compile(exclude, "exclude")

  def split(out: Any) -> tuple[Any, Any]:
    if not has_aux:
      return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError(
        "capture.value_and_grad: with has_aux=True, fn must return a pair (loss, aux), "
        f"got {type(out).__name__}."
      )
    return out

  def wrapped(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Captured]:
    kinds: dict[str, str] = {}
    convs: dict[str, ConvSpec] = {}

    def inner(p: Any, eps: dict[str, jax.Array] | None) -> tuple[Any, Any]:
      with intercept(
        perturbations=eps, include=include, exclude=exclude, record_inputs=inputs
      ) as rec:
        out = fn(p, *args, **kwargs)
      if not rec.outputs:
        raise _no_layer_error(include, exclude)
      kinds.clear()
      kinds.update(rec.kinds)
      convs.clear()
      convs.update(rec.convs)
      loss, aux = split(out)
      return loss, (aux, dict(rec.outputs), dict(rec.inputs))

    if layer_grads:

      def discover(p: Any) -> dict[str, jax.Array]:
        with intercept(include=include, exclude=exclude) as rec:
          fn(p, *args, **kwargs)
        return dict(rec.outputs)

      shapes = jax.eval_shape(discover, params)
      if not shapes:
        raise _no_layer_error(include, exclude)
      eps0 = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
      (loss, (aux, outs, ins)), (grads, lgrads) = jax.value_and_grad(
        inner, argnums=(0, 1), has_aux=True
      )(params, eps0)
    else:
      (loss, (aux, outs, ins)), grads = jax.value_and_grad(inner, has_aux=True)(params, None)
      lgrads = {}
    value = (loss, aux) if has_aux else loss
    return value, grads, Captured(outs, ins, dict(lgrads), _Kinds(kinds), _Kinds(convs))

  return wrapped
