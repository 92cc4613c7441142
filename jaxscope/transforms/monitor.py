"""An optax wrapper that measures a scope on every (or every n-th) optimizer step.

``monitored(inner, scope)`` sees what the optimizer sees: the incoming updates (the
gradients, when it is first in a chain), the updates it emits (what
``optax.apply_updates`` adds to the parameters) and the parameters. It keeps the
scope's latest values in its state, where :func:`monitored_metrics` finds them, inside or
outside ``jit``, through ``optax.chain``, ``inject_hyperparams`` and ``MultiSteps``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from jaxscope.metrics.scope import Scope, ScopeState, scope_values
from jaxscope.transforms.state import find_state

__all__ = ["MonitoredState", "monitored", "monitored_metrics"]


class MonitoredState(NamedTuple):
  """State of :func:`monitored`."""

  inner_state: optax.OptState
  """The wrapped optimizer's state."""
  jaxscope_scope: ScopeState
  """The scope's state (a unique field name, so ``optax.tree.get`` finds it)."""


def monitored(
  inner: optax.GradientTransformation, scope: Scope
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that each update also measures ``scope``.

  The scope's topics are bound as ``grads`` = the updates ``inner`` receives,
  ``updates`` = the updates it returns and ``params`` = the parameters passed to
  ``update``. Network metrics read the extra arguments ``value=`` (the loss, optax's
  convention), ``logits=`` and ``labels=``; other extra arguments go to ``inner``.
  The extra argument ``measure`` (a static Python bool) forces measuring or skipping
  this step regardless of the scope's ``every``; jit the step with
  ``static_argnames="measure"`` and choose on the host for skipped steps that cost
  nothing (the scope's ``every`` uses ``lax.cond``, which costs a little).

  Args:
    inner: any optax transformation (an alias such as ``optax.adam(1e-3)``, a chain).
    scope: a :func:`jaxscope.metrics.scope`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`MonitoredState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxscope import metrics, transforms
    >>> params = {"w": jnp.ones((2, 2))}
    >>> tx = transforms.monitored(optax.sgd(0.1), metrics.scope(preset="economy"))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    >>> round(float(transforms.monitored_metrics(state)["updates/ratio/w"]), 4)
    0.1
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> MonitoredState:
    return MonitoredState(inner.init(params), scope.init(params))

  def update_fn(
    updates: optax.Updates,
    state: MonitoredState,
    params: optax.Params | None = None,
    measure: bool | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, MonitoredState]:
    new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    try:
      _, scope_state = scope.update(
        state.jaxscope_scope,
        params=params,
        grads=updates,
        updates=new_updates,
        loss=extra_args.get("value"),
        logits=extra_args.get("logits"),
        labels=extra_args.get("labels"),
        measure=measure,
      )
    except ValueError as e:
      if params is None and "params" in str(e):
        raise ValueError(f"{e} Call tx.update(grads, opt_state, params).") from e
      raise
    return new_updates, MonitoredState(inner_state, scope_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unwrap(x: Any) -> Any:
  # flax.nnx.Optimizer wraps optimizer-state arrays in Variables; read their arrays.
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover - flax is a dependency.
    return x
  return jax.tree.map(
    lambda v: v[...] if isinstance(v, nnx.Variable) else v,
    x,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )


def monitored_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Returns the latest scope values held in an optimizer state.

  Works on the state of :func:`monitored` wherever it sits: inside ``optax.chain``,
  ``named_chain``, ``inject_hyperparams``, ``MultiSteps``, or an ``nnx.Optimizer``'s
  ``opt_state``. Usable inside ``jit`` (it only reads the state).

  Returns:
    The flat ``{topic}/{stat}/{layer}`` dict plus ``"measured"`` (bool: whether the
    values are from the latest step).

  Raises:
    ValueError: if the state holds no or several monitors.
  """
  found = find_state(
    opt_state,
    ScopeState,
    caller="monitored_metrics",
    what="monitored scopes (use one monitored() with a single scope, or read each state's "
    "jaxscope_scope)",
  )
  if found is None:
    raise ValueError(
      "monitored_metrics: the optimizer state holds no jaxscope scope; wrap the optimizer with "
      "jaxscope.transforms.monitored(optimizer, scope)."
    )
  return _unwrap(scope_values(found))
