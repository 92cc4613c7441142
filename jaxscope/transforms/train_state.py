"""``TrainState.apply_gradients`` that passes optax extra arguments to the optimizer.

``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)`` calls
``tx.update(grads, opt_state, params)`` and ``.replace(**kwargs)``-es the rest: there is
no way to hand the loss, logits and labels to the optimizer, which is what
:func:`jaxscope.transforms.monitored` (network metrics), the ratio-adaptive learning rate
and the preconditioner (``hvp_fn=``) read as extra arguments (optax's
``GradientTransformationExtraArgs`` convention, ``value=`` for the loss).
:func:`apply_gradients` is the same step with those arguments passed through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import optax
from flax.training.train_state import OVERWRITE_WITH_GRADIENT, TrainState

__all__ = ["apply_gradients"]

S = TypeVar("S", bound=TrainState)


def apply_gradients(
  state: S,
  *,
  grads: Any,
  replace: Mapping[str, Any] | None = None,
  **extra_args: Any,
) -> S:
  """``state.apply_gradients(grads=grads)`` with ``extra_args`` given to ``state.tx.update``.

  Computes ``updates, opt_state = tx.update(grads, opt_state, params, **extra_args)``,
  ``params = optax.apply_updates(params, updates)`` and returns
  ``state.replace(step=step + 1, params=params, opt_state=opt_state, **replace)``: exactly
  Flax's ``TrainState.apply_gradients`` (including its ``OVERWRITE_WITH_GRADIENT``
  collection), for any ``TrainState`` subclass (e.g. one with ``batch_stats``), plus the
  extra arguments. ``tx`` must accept them: optax wraps plain transformations with
  ``optax.with_extra_args_support`` (which drops unknown arguments); jaxscope's transforms
  and ``optax.chain`` of them take them.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or subclass).
    grads: gradients with the structure of ``state.params``.
    replace: other fields of ``state`` to replace (what Flax's ``**kwargs`` do, e.g.
      ``{"batch_stats": new_stats}``).
    **extra_args: passed to ``state.tx.update``, e.g. ``value=loss``, ``logits=``,
      ``labels=`` for :func:`jaxscope.transforms.monitored`.

  Returns:
    The new state, of the type of ``state``.

  Raises:
    TypeError: if ``state`` is not a ``TrainState``; ``replace`` names a field that is
      set here (``step``, ``params``, ``opt_state``).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax.training.train_state import TrainState
    >>> from jaxscope import metrics, transforms
    >>> tx = transforms.monitored(optax.sgd(0.1), metrics.scope(network=["loss"]))
    >>> state = TrainState.create(apply_fn=None, params={"w": jnp.ones(3)}, tx=tx)
    >>> state = transforms.apply_gradients(state, grads={"w": jnp.ones(3)}, value=2.5)
    >>> float(transforms.monitored_metrics(state.opt_state)["loss"]), int(state.step)
    (2.5, 1)
  """
  if not isinstance(state, TrainState):
    raise TypeError(
      "apply_gradients: state must be a flax.training.train_state.TrainState, got "
      f"{type(state).__name__}."
    )
  replace = dict(replace or {})
  clash = sorted(set(replace) & {"step", "params", "opt_state"})
  if clash:
    raise TypeError(f"apply_gradients: replace= may not set {', '.join(clash)} (set here).")
  overwrite = isinstance(grads, Mapping) and OVERWRITE_WITH_GRADIENT in grads
  g = grads["params"] if overwrite else grads
  p = state.params["params"] if overwrite else state.params
  tx = optax.with_extra_args_support(state.tx)
  updates, opt_state = tx.update(g, state.opt_state, p, **extra_args)
  new_p = optax.apply_updates(p, updates)
  if overwrite:
    new_p = {"params": new_p, OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT]}
  return state.replace(step=state.step + 1, params=new_p, opt_state=opt_state, **replace)
