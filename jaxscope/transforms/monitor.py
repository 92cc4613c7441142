"""An optax wrapper that measures a scope on every (or every n-th) optimizer step.

``monitored(inner, scope)`` sees what the optimizer sees: the incoming updates (the
gradients, when it is first in a chain), the updates it emits (what
``optax.apply_updates`` adds to the parameters) and the parameters. It keeps the
scope's latest values in its state, where :func:`monitored_metrics` finds them, inside or
outside ``jit``, through ``optax.chain``, ``inject_hyperparams`` and ``MultiSteps``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope.metrics.scope import MEASURED, Scope, ScopeState
from jaxscope.packed import PackedValues

__all__ = ["MonitorName", "MonitoredState", "monitored", "monitored_metrics"]


@dataclasses.dataclass(frozen=True)
class MonitorName:
  """The name of a :func:`monitored` wrapper: static, a pytree node without leaves (so
  it passes through ``jit``, ``lax.scan`` and orbax checkpoints unchanged)."""

  name: str | None = None


jax.tree_util.register_static(MonitorName)


class MonitoredState(NamedTuple):
  """State of :func:`monitored`."""

  inner_state: optax.OptState
  """The wrapped optimizer's state."""
  jaxscope_scope: ScopeState
  """The scope's state (a unique field name, so ``optax.tree.get`` finds it)."""
  name: MonitorName = MonitorName()
  """The wrapper's name (``monitored(..., name=)``); static, no arrays."""


def monitored(
  inner: optax.GradientTransformation, scope: Scope, *, name: str | None = None
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

  Several monitors in one optimizer (one per ``optax.multi_transform`` partition, or one
  inside another) are read together by :func:`monitored_metrics`, each under its name.

  Inside ``optax.MultiSteps`` the monitor runs only when the inner optimizer does (on the
  k-th mini-step, with the accumulated gradient); :func:`monitored_metrics` reports
  ``measured = False`` on the accumulation steps, so a record is never a stale copy.

  Args:
    inner: any optax transformation (an alias such as ``optax.adam(1e-3)``, a chain).
    scope: a :func:`jaxscope.metrics.scope`.
    name: the prefix of this monitor's keys in :func:`monitored_metrics`
      (``{name}/{topic}/{stat}/{layer}``); ``None``: no prefix when it is the only
      monitor, else the ``optax.multi_transform`` partition label (or ``named_chain``
      name) it sits under. Letters, digits, ``_``, ``-`` and ``.``.

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
  if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
    raise ValueError(
      f"monitored: name must be None or a str of letters, digits, '_', '-', '.', got {name!r}."
    )
  inner = optax.with_extra_args_support(inner)
  tag = MonitorName(name)

  def init_fn(params: optax.Params) -> MonitoredState:
    return MonitoredState(inner.init(params), scope.init(params), tag)

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
    return new_updates, MonitoredState(inner_state, scope_state, tag)

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


def monitored_metrics(opt_state: Any) -> PackedValues:
  """Returns the latest scope values held in an optimizer state.

  Works on the state of :func:`monitored` wherever it sits: inside ``optax.chain``,
  ``named_chain``, ``multi_transform``, ``inject_hyperparams``, ``MultiSteps``, or an
  ``nnx.Optimizer``'s ``opt_state``. Usable inside ``jit`` (it only reads the state).

  One monitor: its ``{topic}/{stat}/{layer}`` values (prefixed ``{name}/`` when it was
  given a name). Several: each monitor's values under its name (``monitored(...,
  name=)``, else the partition label or ``named_chain`` name above it, else
  ``monitor{i}`` in tree order), each with its own ``{name}/measured`` flag, and
  ``measured`` true when any of them measured (:class:`jaxscope.Recorder` drops a
  monitor's values on the steps its own flag is false).

  Inside ``optax.MultiSteps``, a monitor counts as measured only on the step its inner
  optimizer ran (``mini_step == 0`` after the update).

  The values come packed (:class:`jaxscope.packed.PackedValues`, a read-only mapping held as
  one array per dtype and shape): returned from a jitted step as they are, they cost its
  dispatch a few leaves rather than one per value. ``values | {"loss": loss}`` adds
  entries without unpacking; on the host, read them after ``jax.device_get``.

  Returns:
    The flat mapping plus ``"measured"`` (bool: whether the values are from the latest
    step).

  Raises:
    ValueError: if the state holds no monitor, or two monitors with the same name.
  """
  found = _monitors(opt_state)
  if not found:
    raise ValueError(
      "monitored_metrics: the optimizer state holds no jaxscope scope; wrap the optimizer with "
      "jaxscope.transforms.monitored(optimizer, scope)."
    )
  names = _names(found)
  if len(found) == 1 and names[0] is None:
    values, measured = _values(found[0])
    return values | {MEASURED: measured}
  out = PackedValues.pack({})
  flags = []
  for name, f in zip(names, found, strict=True):
    values, measured = _values(f)
    flags.append(measured)
    out = out | values.prefixed(f"{name}/") | {f"{name}/{MEASURED}": measured}
  measured = jnp.any(jnp.stack(flags)) if len(found) > 1 else flags[0]
  return out | {MEASURED: measured}


_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class _Found(NamedTuple):
  path: tuple[Any, ...]
  scope: ScopeState
  name: str | None
  mini_steps: tuple[Any, ...]  # MultiSteps counters of the wrappers around it.


def _monitors(tree: Any, path: tuple[Any, ...] = (), mini: tuple[Any, ...] = ()) -> list[_Found]:
  """Every monitor (or bare scope state) in ``tree``, in tree order, with its context."""
  kinds = (MonitoredState, ScopeState, optax.MultiStepsState)
  out: list[_Found] = []
  # Flattened inside a 1-tuple so that ``tree`` itself can be one of the kinds.
  nodes = jax.tree_util.tree_flatten_with_path((tree,), is_leaf=lambda x: isinstance(x, kinds))[0]
  for p, node in nodes:
    where = path + tuple(p[1:])
    if isinstance(node, optax.MultiStepsState):
      out += _monitors(node.inner_opt_state, where, (*mini, node.mini_step))
    elif isinstance(node, MonitoredState):
      out.append(_Found(where, node.jaxscope_scope, node.name.name, mini))
      out += _monitors(node.inner_state, where, mini)
    elif isinstance(node, ScopeState):
      out.append(_Found(where, node, None, mini))
  return out


def _names(found: list[_Found]) -> list[str | None]:
  """Each monitor's prefix: its own name, else the labels above it, else its position."""
  if len(found) == 1:
    return [found[0].name]
  names: list[str | None] = []
  for i, f in enumerate(found):
    labels = [str(k.key) for k in f.path if isinstance(k, jax.tree_util.DictKey)]
    names.append(f.name or "/".join(labels) or f"monitor{i}")
  dup = sorted({n for n in names if names.count(n) > 1}, key=str)
  if dup:
    raise ValueError(
      f"monitored_metrics: several monitors are named {', '.join(map(repr, dup))}; give each "
      "monitored(..., name=) a name of its own."
    )
  return names


def _values(f: _Found) -> tuple[PackedValues, jax.Array]:
  """A monitor's values and its measured flag (false on a ``MultiSteps`` mini-step)."""
  measured = jnp.asarray(_unwrap(f.scope.measured))
  for m in f.mini_steps:
    measured = measured & (jnp.asarray(_unwrap(m)) == 0)
  return _unwrap(f.scope.values), measured
