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
  wrt: Any = None,
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

  **NNX**: when the first argument is an ``nnx.Module``, the call is that of
  ``nnx.value_and_grad(fn, wrt=wrt)(model, ...)``: the gradient is taken w.r.t. the
  model's ``wrt`` variables only (default ``nnx.Param``) and returned as an
  ``nnx.State`` (what ``nnx.Optimizer.update(model, grads)`` takes); the other state
  (BatchNorm statistics, dropout RNG counts) is carried through and written back into
  ``model`` after the call, as NNX's own transforms do. Use it under ``nnx.jit`` (or
  inside a ``jax.jit`` function that ``nnx.merge``-s the model and returns its state).

  Args:
    fn: ``fn(params, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with ``has_aux``),
      ``loss`` a real scalar.
    has_aux: whether ``fn`` returns ``(loss, aux)``.
    include: regular expression(s) on layer keys (``re.search``); ``None`` = all.
    exclude: regular expression(s) of layer keys to leave out.
    layer_grads: also compute ``∂loss/∂y_l`` per layer.
    inputs: also record each layer's first positional input.
    wrt: NNX only: the filter of the variables to differentiate (default ``nnx.Param``).

  Returns:
    A function of ``(params, *args, **kwargs)`` returning ``(value, grads, captured)``.

  Raises:
    TypeError: if ``fn`` is not callable; ``wrt`` given with a first argument that is
      not an NNX module.
    ValueError: (when called) if no layer was recorded, naming include/exclude; see
      also :func:`intercept`.
  """
  if not callable(fn):
    raise TypeError(f"capture.value_and_grad: fn must be callable, got {type(fn).__name__}.")
  _compile(include, "include")  # Fail early on an invalid pattern.
  _compile(exclude, "exclude")
  options = (include, exclude, layer_grads, inputs)
  core = _captured_value_and_grad(fn, has_aux, *options)

  def wrapped(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Captured]:
    if _is_nnx_module(params):
      return _nnx_value_and_grad(fn, has_aux, options, wrt, params, args, kwargs)
    if wrt is not None:
      raise TypeError(
        "capture.value_and_grad: wrt= is for NNX modules (the first argument), got "
        f"{type(params).__name__}; with a params pytree the gradient is w.r.t. all of it."
      )
    return core(params, *args, **kwargs)

  return wrapped


def _split_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
  if not has_aux:
    return out, None
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
      "capture.value_and_grad: with has_aux=True, fn must return a pair (loss, aux), "
      f"got {type(out).__name__}."
    )
  return out


def _captured_value_and_grad(
  fn: Callable[..., Any],
  has_aux: bool,
  include: Pattern,
  exclude: Pattern,
  layer_grads: bool,
  inputs: bool,
) -> Callable[..., tuple[Any, Any, Captured]]:
  """The captured ``value_and_grad`` of ``fn`` w.r.t. its first argument (a pytree)."""

  def core(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Captured]:
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
      loss, aux = _split_aux(out, has_aux)
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

  return core


def _is_nnx_module(x: Any) -> bool:
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover - flax is a dependency.
    return False
  return isinstance(x, nnx.Module)


def _nnx_value_and_grad(
  fn: Callable[..., Any],
  has_aux: bool,
  options: tuple[Pattern, Pattern, bool, bool],
  wrt: Any,
  model: Any,
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> tuple[Any, Any, Captured]:
  """The captured ``value_and_grad`` of ``fn(model, ...)`` for an NNX module.

  The recipe of ``nnx.value_and_grad``: ``nnx.split`` the module into the differentiated
  state (``wrt``, default ``nnx.Param``) and the rest, ``nnx.merge`` them inside the
  differentiated function, return the rest as it is after the call (BatchNorm
  statistics, RNG counts) and ``nnx.update`` the caller's module with it, so integer RNG
  state is never differentiated and state updates are not lost.
  """
  from flax import nnx

  wrt = nnx.Param if wrt is None else wrt
  graphdef, diff, rest = nnx.split(model, wrt, ...)

  def pure(d: Any, r: Any, *a: Any, **k: Any) -> tuple[Any, Any]:
    r = jax.tree.map(lambda x: x, r)  # New Variables at this trace level (they mutate).
    m = nnx.merge(graphdef, d, r)
    loss, aux = _split_aux(fn(m, *a, **k), has_aux)
    return loss, (aux, nnx.split(m, wrt, ...)[2])

  core = _captured_value_and_grad(pure, True, *options)
  (loss, (aux, new_rest)), grads, captured = core(diff, rest, *args, **kwargs)
  nnx.update(model, new_rest)
  return ((loss, aux) if has_aux else loss), grads, captured
