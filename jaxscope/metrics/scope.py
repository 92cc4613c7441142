"""Scopes: bundles of per-layer metrics over the topics of a train step.

A scope is an optax-style pair of pure functions,

* ``init(params, *, activations=None, layer_grads=None) -> ScopeState``
* ``update(state, *, params, grads, updates, activations, layer_grads, loss, logits,
  labels) -> (values, state)``

where ``values`` is one flat read-only mapping ``{str: jax.Array}`` with keys
``"{topic}/{stat}/{layer}"`` (e.g. ``"grads/norm/Dense_0/kernel"``), network-level
keys (``"loss"``, ``"accuracy"``) and the reserved key ``"measured"`` (a bool telling
whether this step was measured). It is a :class:`jaxscope.packed.PackedValues`: one
stacked array per dtype and shape, so a step that returns it (or keeps it in its
state) has a few leaves rather than one per value; read it on the host after
``jax.device_get``. The state's structure, shapes and dtypes are fixed
by ``init``, so a scope works inside ``jit``, ``lax.scan`` and ``lax.cond`` without
retracing and restores with orbax into the structure ``init`` built.

The topics ``activations`` and ``layer_grads`` measure the dicts ``{layer_key: array}``
of :class:`jaxscope.capture.Captured` (``captured.outputs`` and ``captured.grads``, the
layer outputs ``y_l`` and ``∂L/∂y_l``). Each entry is one layer whose key is the dict key
(``"activations/std/Block_0/Conv_1"``); the key plays the role of the module path for
``include``/``exclude`` (``re.search`` on the key) and ``depth`` (``-1``/``None``: per
layer, ``k``: first ``k`` components of the key). ``kind`` selects parameter leaves only
and never drops an activation layer. These trees do not exist when the scope is built, so
``init`` takes them (arrays or ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``) as
``init(params, activations=..., layer_grads=...)``.

With ``every=n`` only steps ``0, n, 2n, …`` are measured; the others go through a
``lax.cond`` branch that returns the previous values unchanged. The cond still needs
its operands materialised (e.g. the updates, which would otherwise fuse into
``apply_updates``), so a skipped step is cheap but not free. For truly free skipped
steps decide on the host: pass the static ``measure=True/False`` to ``update`` (through
:func:`~jaxscope.transforms.monitored`: ``tx.update(..., measure=...)``) from a step
jitted with ``static_argnames="measure"``; that compiles two variants of the step, one
without any measurement.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxscope import metrics
  >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  >>> sc = metrics.scope(params=["norm"], grads=[metrics.variance()], kind="kernel")
  >>> state = sc.init(params)
  >>> values, state = jax.jit(sc.update)(state, params=params, grads=params)
  >>> sorted(values)
  ['grads/variance/Dense_0/kernel', 'measured', 'params/norm/Dense_0/kernel']
  >>> round(float(values["params/norm/Dense_0/kernel"]), 4)
  2.4495
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope import tree as jtree
from jaxscope.metrics import moments, registry, stacked
from jaxscope.metrics.base import Metric, takes, view
from jaxscope.metrics.network import NetworkMetric
from jaxscope.packed import PackedValues

__all__ = [
  "CAPTURE_TOPICS",
  "MEASURED",
  "PARAM_TOPICS",
  "TOPICS",
  "Scope",
  "ScopeState",
  "scope",
  "scope_values",
]

#: Topics whose trees have the structure of the parameters.
PARAM_TOPICS = ("params", "grads", "updates")
#: Topics measured on :mod:`jaxscope.capture` dicts ``{layer_key: array}``.
CAPTURE_TOPICS = ("activations", "layer_grads")
#: Tensor topics a scope can measure.
TOPICS = PARAM_TOPICS + CAPTURE_TOPICS
#: The reserved key that tells whether the values belong to this step.
MEASURED = "measured"
_NETWORK_INPUTS = ("loss", "logits", "labels")


class ScopeState(NamedTuple):
  """State of a :func:`scope`."""

  count: jax.Array
  """``int32``: number of ``update`` calls so far."""
  measured: jax.Array
  """``bool``: whether the last ``update`` measured (else ``values`` are older)."""
  values: PackedValues
  """The latest measured values, keyed ``{topic}/{stat}/{layer}``: a read-only mapping held
  as one array per dtype and shape (:class:`jaxscope.packed.PackedValues`), so that a jitted
  step carries two or three state leaves for them rather than one per value."""
  metric_state: dict[str, Any]
  """Per-metric, per-layer state (e.g. power-iteration warm starts)."""


class Scope(NamedTuple):
  """A bundle of metrics; see the module docstring."""

  init: Callable[..., ScopeState]
  update: Callable[..., tuple[PackedValues, ScopeState]]
  topics: tuple[str, ...]
  """The tensor topics this scope needs (a subset of :data:`TOPICS`)."""
  every: int


def scope_values(state: ScopeState) -> PackedValues:
  """The flat values of a scope state, with the ``measured`` flag (no array is copied)."""
  return state.values | {MEASURED: state.measured}


MetricSpec = Metric | NetworkMetric | str


def _resolve(spec: MetricSpec, where: str) -> Metric | NetworkMetric:
  if isinstance(spec, Metric | NetworkMetric):
    return spec
  if isinstance(spec, str):
    return registry.get(spec)
  raise TypeError(f"{where}: expected a Metric or a metric name, got {type(spec).__name__}.")


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _check_layer_dict(tree: Any, topic: str) -> dict[str, Any]:
  """Checks that ``tree`` is a flat ``{layer_key: array}`` mapping; returns it as a dict."""
  if not isinstance(tree, Mapping):
    raise TypeError(
      f"{topic}: expected a dict {{layer_key: array}} (capture.Captured.outputs / .grads), "
      f"got {type(tree).__name__}."
    )
  if not tree:
    raise ValueError(f"{topic}: the dict of layers is empty.")
  for k, v in tree.items():
    if not isinstance(k, str):
      raise TypeError(f"{topic}: layer keys must be str, got {k!r}.")
    if not jtree._is_array_like(v):
      raise TypeError(
        f"{topic}: layer {k!r} is a {type(v).__name__}, expected an array "
        "(jax.Array, numpy array or ShapeDtypeStruct)."
      )
  return dict(tree)


def _layer_layout(
  tree: Mapping[str, Any],
  topic: str,
  *,
  include: str | Sequence[str] | None,
  exclude: str | Sequence[str] | None,
  depth: int | None,
  stacked: jtree.Stacked | None = None,
) -> jtree.Layout:
  """Layout of a ``{layer_key: array}`` dict: one leaf per key, the key is its module path.

  ``kind`` is not applied (it selects parameter leaves). Leaf indices follow
  ``jax.tree_util.tree_leaves`` order (sorted keys).
  """
  if depth is not None and (not isinstance(depth, int) or (depth < 1 and depth != -1)):
    raise ValueError(f"depth must be None, -1 or a positive integer, got {depth!r}.")
  inc = jtree._compile(include, "include")
  exc = jtree._compile(exclude, "exclude")
  keys = sorted(tree)  # The flattening order of a dict.
  infos = []
  for i, k in enumerate(keys):
    shape = tuple(int(d) for d in tree[k].shape)
    infos.append(jtree.LeafInfo(i, k, k, "other", shape, tree[k].dtype))
  if stacked:
    # A layer of a stacked output keeps the layer key (with its index) as its module path.
    infos = [
      i if i.stack is None else i._replace(module=i.name, kind="other")
      for i in jtree.unstack(infos, stacked, argname=topic, strict=False)
    ]
  selected = [
    info
    for info in infos
    if (inc is None or any(p.search(info.name) for p in inc))
    and not (exc is not None and any(p.search(info.name) for p in exc))
  ]
  if not selected:
    shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
    raise ValueError(
      f"{topic}: the selection include={include!r}, exclude={exclude!r} matches no layer. "
      f"Layers are: {shown}."
    )
  groups: dict[str, list[jtree.LeafInfo]] = {}
  for info in selected:
    if depth is None or depth == -1:
      gkey = info.name
    else:
      gkey = "/".join(info.name.split("/")[:depth])
    groups.setdefault(gkey, []).append(info)
  return jtree.Layout(tuple(jtree.Group(k, tuple(v)) for k, v in groups.items()), tuple(infos))


def _tensor_metrics(lists: Mapping[str, Sequence[MetricSpec]]) -> dict[str, tuple[Metric, ...]]:
  """Resolves and checks the per-layer metrics of each tensor topic; topics without any are
  left out."""
  topic_metrics: dict[str, tuple[Metric, ...]] = {}
  for topic in TOPICS:
    resolved = []
    for spec in lists[topic]:
      m = _resolve(spec, f"scope({topic}=...)")
      if not isinstance(m, Metric):
        raise TypeError(f"scope: {m.name!r} is a network metric; pass it in network=.")
      resolved.append(m)
    if topic in CAPTURE_TOPICS:
      bad = [m.name for m in resolved if m.needs_params]
      if bad:
        raise ValueError(
          f"scope: metric(s) {bad} compare with the parameters and cannot measure {topic!r} "
          "(layer outputs have no matching parameter); use them on params/grads/updates."
        )
    names = [m.name for m in resolved]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
      raise ValueError(f"scope: metric(s) {sorted(dup)} given twice for topic {topic!r}.")
    if resolved:
      topic_metrics[topic] = tuple(resolved)
  return topic_metrics


def _network_metrics(specs: Sequence[MetricSpec]) -> list[NetworkMetric]:
  """Resolves and checks the network-level metrics."""
  net: list[NetworkMetric] = []
  for spec in specs:
    m = _resolve(spec, "scope(network=...)")
    if not isinstance(m, NetworkMetric):
      raise TypeError(f"scope: {m.name!r} is a per-layer metric, not a network metric.")
    if m.name in {n.name for n in net}:
      raise ValueError(f"scope: network metric {m.name!r} given twice.")
    net.append(m)
  return net


class _Spec(NamedTuple):
  """What a scope measures, resolved and checked once when it is built."""

  topic_metrics: dict[str, tuple[Metric, ...]]
  net: list[NetworkMetric]
  needs_params: bool
  include: str | Sequence[str] | None
  exclude: str | Sequence[str] | None
  kind: jtree.Kind
  depth: int | None
  stacked: jtree.Stacked | None = None
  matrix_axes: Mapping[str, int] | None = None


def _plan(
  spec: _Spec, topic: str, tree: Any
) -> list[tuple[str, Metric, tuple[jtree.LeafInfo, ...]]]:
  """The measurements ``(key, metric, leaves)`` of one topic's tree, in order."""
  if topic in CAPTURE_TOPICS:
    lay = _layer_layout(
      tree,
      topic,
      include=spec.include,
      exclude=spec.exclude,
      depth=spec.depth,
      stacked=spec.stacked,
    )
  else:
    lay = jtree.layout(
      tree,
      argname=topic,
      include=spec.include,
      exclude=spec.exclude,
      kind=spec.kind,
      depth=spec.depth,
      stacked=spec.stacked,
    )
  plan = []
  for group in lay.groups:
    for m in spec.topic_metrics[topic]:
      infos = tuple(i for i in group.leaves if takes(m, i.shape, i.kind))
      if infos:
        plan.append((f"{topic}/{m.name}/{group.key}", m, infos))
  return plan


def _measure_tensors(
  spec: _Spec, data: Mapping[str, Any], metric_state: Mapping[str, Any]
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """The per-layer values of every planned measurement, and the metrics' new state."""
  values: dict[str, jax.Array] = {}
  new_state: dict[str, Any] = {}
  ref_leaves = jax.tree_util.tree_leaves(data["params"]) if data.get("params") is not None else None
  for topic in spec.topic_metrics:
    leaves = jax.tree_util.tree_leaves(data[topic])
    items = stacked.families(_plan(spec, topic, data[topic]), data[topic])
    together = [it for it in items if moments.batched(it.metric)]
    if together:
      values.update(moments.measure(together, leaves, ref_leaves))
      new_state.update({k: metric_state[k] for it in together for k in it.keys})
    for item in items:
      if moments.batched(item.metric):
        continue
      states = [metric_state[k] for k in item.keys]
      vals, news = stacked.measure(item, leaves, ref_leaves, states, spec.matrix_axes)
      for key, value, state in zip(item.keys, vals, news, strict=True):
        new_state[key] = state
        if isinstance(value, dict):
          topic_, stat, layer = key.split("/", 2)
          for part, v in value.items():
            values[f"{topic_}/{stat}_{part}/{layer}"] = v
        else:
          values[key] = value
  return values, new_state


def _reject_nnx_modules(trees: Mapping[str, Any], caller: str) -> None:
  """Raises a ``TypeError`` that says what to pass when a topic is an NNX module."""
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover - flax is a dependency.
    return
  for topic, tree in trees.items():
    if isinstance(tree, nnx.Module):
      raise TypeError(
        f"{caller}: {topic}= is an nnx.Module ({type(tree).__name__}); pass its parameters, "
        f"nnx.state(model, nnx.Param) (or the nnx.State of gradients that "
        "capture.value_and_grad / nnx.grad return), so that RNG keys and batch statistics "
        "are not measured as parameters. With nnx.Optimizer, wrap its tx with "
        "transforms.monitored(tx, scope) instead: it sees the right state."
      )


def _init_state(spec: _Spec, params: Any, activations: Any, layer_grads: Any) -> ScopeState:
  """``scope.init``: the state whose structure every later ``update`` keeps."""
  _reject_nnx_modules({"params": params}, "scope.init")
  given = {"activations": activations, "layer_grads": layer_grads}
  trees: dict[str, Any] = {}
  if params is not None:
    jtree.leaf_infos(params, argname="params")  # Clear errors for non-array leaves.
    shapes = _shapes(params)
    trees.update({t: shapes for t in PARAM_TOPICS})
  for topic in CAPTURE_TOPICS:
    if given[topic] is not None:
      trees[topic] = _shapes(_check_layer_dict(given[topic], topic))
  for topic in spec.topic_metrics:
    if topic not in trees:
      how = (
        f"init({topic}=...): the {{layer_key: array}} dict of capture.value_and_grad "
        f"(Captured.{'outputs' if topic == 'activations' else 'grads'}) or its "
        "ShapeDtypeStructs"
        if topic in CAPTURE_TOPICS
        else "init(params)"
      )
      raise ValueError(f"scope measures {topic!r}, so it needs its shapes: call {how}.")
  if spec.needs_params and params is None:
    raise ValueError("scope: init() needs params (the scope measures or compares with them).")
  metric_state: dict[str, Any] = {}
  for topic in spec.topic_metrics:
    for key, m, infos in _plan(spec, topic, trees[topic]):
      metric_state[key] = m.init(
        [view(m, i, jax.ShapeDtypeStruct(i.shape, i.dtype), spec.matrix_axes) for i in infos]
      )
  data = {topic: trees[topic] for topic in spec.topic_metrics}
  if spec.needs_params:
    data["params"] = trees["params"]
  value_shapes, _ = jax.eval_shape(functools.partial(_measure_tensors, spec), data, metric_state)
  values = {k: jnp.zeros(s.shape, s.dtype) for k, s in value_shapes.items()}
  for m in spec.net:
    values[m.name] = jnp.zeros((), jnp.float32)
  packed = PackedValues.pack(values)
  return ScopeState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_), packed, metric_state)


def _update_trees(spec: _Spec, trees: dict[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
  """Checks the trees and network inputs of one ``update``; returns the trees with the
  capture topics as plain dicts."""
  _reject_nnx_modules(trees, "scope.update")
  trees = dict(trees)
  for topic in spec.topic_metrics:
    if trees[topic] is None:
      raise ValueError(f"scope measures {topic!r} but update() got {topic}=None.")
    if topic in CAPTURE_TOPICS:
      trees[topic] = _check_layer_dict(trees[topic], topic)
  params = trees["params"]
  if spec.needs_params and params is None:
    users = sorted({m.name for ms in spec.topic_metrics.values() for m in ms if m.needs_params})
    raise ValueError(
      f"scope: {', '.join(users or ['params'])} needs the parameters, but update() got params=None."
    )
  if params is not None:
    for topic in ("grads", "updates"):
      if topic in spec.topic_metrics:
        jtree.check_same_structure(params, trees[topic], ref_name="params", other_name=topic)
  for m in spec.net:
    missing = [n for n in m.needs if inputs[n] is None]
    if missing:
      raise ValueError(
        f"scope: network metric {m.name!r} needs {', '.join(f'{n}=' for n in missing)} "
        "(through monitored(): value=, logits=, labels= extra arguments)."
      )
  return trees


def _update_state(
  spec: _Spec,
  every: int,
  state: ScopeState,
  trees: Mapping[str, Any],
  inputs: Mapping[str, Any],
  measure: bool | None,
) -> tuple[PackedValues, ScopeState]:
  """``scope.update`` on checked trees: measures (or skips) and advances the state."""
  data = {t: trees[t] for t in spec.topic_metrics}
  if spec.needs_params:
    data["params"] = trees["params"]
  net_inputs = {k: v for k, v in inputs.items() if v is not None}

  def measure_fn(
    operand: tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]],
  ) -> tuple[PackedValues, dict[str, Any]]:
    data_, metric_state, net_in = operand
    values, new_ms = _measure_tensors(spec, data_, metric_state)
    for m in spec.net:
      values[m.name] = m.fn(**net_in).astype(jnp.float32)
    # Keep the layout and dtypes exactly as init built them.
    return PackedValues.pack(values, like=state.values), new_ms

  def skip(
    operand: tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]],
  ) -> tuple[PackedValues, dict[str, Any]]:
    del operand
    return state.values, dict(state.metric_state)

  planned = {key for topic in spec.topic_metrics for key, _, _ in _plan(spec, topic, trees[topic])}
  if planned != set(state.metric_state):
    extra = sorted(planned - set(state.metric_state))[:3]
    gone = sorted(set(state.metric_state) - planned)[:3]
    raise ValueError(
      "scope.update: the trees do not match the ones init() was given "
      f"(new layers: {extra}; missing layers: {gone}). Call init() with these parameters "
      "(and activations/layer_grads)."
    )
  operand = (data, state.metric_state, net_inputs)
  if measure is False:
    measured = jnp.zeros((), jnp.bool_)
    values, metric_state = skip(operand)
  elif measure or every == 1:
    measured = jnp.ones((), jnp.bool_)
    values, metric_state = measure_fn(operand)
  else:
    measured = state.count % every == 0
    values, metric_state = jax.lax.cond(measured, measure_fn, skip, operand)
  new_state = ScopeState(optax.safe_increment(state.count), measured, values, metric_state)
  return scope_values(new_state), new_state


def scope(
  *,
  params: Sequence[MetricSpec] = (),
  grads: Sequence[MetricSpec] = (),
  updates: Sequence[MetricSpec] = (),
  activations: Sequence[MetricSpec] = (),
  layer_grads: Sequence[MetricSpec] = (),
  network: Sequence[MetricSpec] = (),
  preset: str | None = None,
  every: int = 1,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  kind: jtree.Kind = "any",
  depth: int | None = None,
  stacked: jtree.Stacked | None = None,
  matrix_axes: Mapping[str, int] | None = None,
) -> Scope:
  """Builds a scope measuring the given metrics per layer and topic.

  Args:
    params: metrics (or registered names) of the parameters ``θ`` of the step.
    grads: metrics of the gradients ``∂L/∂θ``.
    updates: metrics of the optimizer's updates ``Δθ`` (what ``apply_updates`` adds).
    activations: metrics of the layer outputs ``y_l`` (``Captured.outputs`` of
      :func:`jaxscope.capture.value_and_grad`), e.g. ``"std"``, ``"dead_fraction"``.
    layer_grads: metrics of ``∂L/∂y_l`` (``Captured.grads``).
    network: network-level metrics (``"loss"``, ``"accuracy"``).
    preset: ``"economy"`` or ``"full"`` (see :data:`registry.SCOPE_PRESETS`), added to the
      explicit lists.
    every: measure every ``every``-th step (steps ``0, every, 2·every, …``).
    include: regular expression(s) on layer names (``re.search``); ``None`` = all.
    exclude: regular expression(s) of layer names to leave out.
    kind: ``"kernel"``, ``"bias"`` or ``"any"``; applies to the parameter topics only.
    depth: layer grouping (see :mod:`jaxscope.tree`): ``None`` per leaf, ``-1`` per
      module, ``k`` per module-path prefix of length ``k``. For ``activations`` and
      ``layer_grads`` a layer key is a module path.
    stacked: ``{pattern: axis}`` for layer-stacked models (``nn.scan``, ``nnx.scan``):
      leaves whose name matches a pattern (``re.search``) are split along ``axis`` into
      per-layer values, ``blocks/attn/query/kernel [L, …]`` measured as
      ``blocks/0/attn/query/kernel`` … (see :mod:`jaxscope.tree`;
      :func:`jaxscope.tree.stack_axes` reads it from Flax partitioning metadata).
      Captured layers whose key matches are split the same way (a pattern need not match
      any of them). ``None``: every leaf is one layer (stacks are pooled).
    matrix_axes: ``{pattern: n_in}``: the number of leading input axes of matching
      kernels in the matrix view of spectral norms and condition numbers, over the
      default convention (:func:`jaxscope.tree.input_axes`: attention ``query``/``key``/
      ``value`` kernels ``[d, heads, head_dim]`` have 1, every other kernel all axes but
      the last).

  Returns:
    A :class:`Scope`.
  """
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"scope: every must be a positive int, got {every!r}.")
  lists: dict[str, list[MetricSpec]] = {
    "params": list(params),
    "grads": list(grads),
    "updates": list(updates),
    "activations": list(activations),
    "layer_grads": list(layer_grads),
    "network": list(network),
  }
  if preset is not None:
    for topic, specs in registry.preset_metrics(preset).items():
      lists[topic].extend(specs)
  topic_metrics = _tensor_metrics(lists)
  net = _network_metrics(lists["network"])
  if not topic_metrics and not net:
    raise ValueError(
      "scope: no metric given (pass params=, grads=, updates=, activations=, layer_grads=, "
      "network= or preset=)."
    )
  needs_params = "params" in topic_metrics or any(
    m.needs_params for ms in topic_metrics.values() for m in ms
  )
  jtree._stack_rules(stacked, "scope")  # Fail early on a bad mapping.
  spec = _Spec(
    topic_metrics, net, needs_params, include, exclude, kind, depth, stacked, matrix_axes
  )

  def init_fn(
    params: Any = None, *, activations: Any = None, layer_grads: Any = None
  ) -> ScopeState:
    return _init_state(spec, params, activations, layer_grads)

  def update_fn(
    state: ScopeState,
    *,
    params: Any = None,
    grads: Any = None,
    updates: Any = None,
    activations: Mapping[str, jax.Array] | None = None,
    layer_grads: Mapping[str, jax.Array] | None = None,
    loss: jax.Array | None = None,
    logits: jax.Array | None = None,
    labels: jax.Array | None = None,
    measure: bool | None = None,
  ) -> tuple[PackedValues, ScopeState]:
    if measure is not None and not isinstance(measure, bool):
      raise TypeError(
        "scope.update: measure must be a Python bool or None (static), "
        f"got {type(measure).__name__}."
      )
    trees = {
      "params": params,
      "grads": grads,
      "updates": updates,
      "activations": activations,
      "layer_grads": layer_grads,
    }
    inputs = {"loss": loss, "logits": logits, "labels": labels}
    trees = _update_trees(spec, trees, inputs)
    return _update_state(spec, every, state, trees, inputs, measure)

  return Scope(init_fn, update_fn, tuple(t for t in TOPICS if t in topic_metrics), every)
