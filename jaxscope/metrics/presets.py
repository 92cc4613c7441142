"""The run presets: what ``jaxscope train --metrics economy|business|full`` measures.

A run preset is three measurements of one training step (:class:`Preset`):

* ``scope``: the per-layer statistics of the parameters, gradients and updates
  (:func:`~jaxscope.metrics.scope` with the scope preset of :data:`PRESET_SCOPES`:
  ``economy`` for ``economy`` and ``business``, ``full`` for ``full``);
* ``instruments``: Cockpit's instruments of the same name
  (:func:`~jaxscope.metrics.instruments`, ``preset=name``);
* ``activations``: the activation health of the captured Flax layers
  (:func:`activation_scope`, the metrics of :data:`ACTIVATION_METRICS`).

``jaxscope.metrics.scope(preset="economy")`` is the first part only; ``preset("economy")``
is what the command line records, and the reference loop (:mod:`jaxscope.train.measure`)
builds its measurements from it. In a step of one's own the scope goes into the optimizer
through :func:`jaxscope.transforms.monitored`, the instruments around it (``grad`` before,
``update`` after) and the activation scope on the captured layers
(``probe.captured``, or the :class:`~jaxscope.capture.Captured` of
:func:`jaxscope.capture.value_and_grad` without instruments)::

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from jaxscope import metrics, transforms

  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
  x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
  params = model.init(jax.random.key(0), x)["params"]

  p = metrics.preset("business", every=1)
  tx = transforms.monitored(optax.sgd(0.1), p.scope)
  opt_state, istate = tx.init(params), p.instruments.init(params)


  def losses_fn(params, x, y):  # the individual losses, [B]
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


  # The activation scope's state is sized by the captured layers (shapes only).
  cap = jax.eval_shape(lambda: p.instruments.grad(istate, losses_fn, params, x, y).captured)
  astate = p.activations.init(activations=dict(cap.outputs), layer_grads=dict(cap.grads))


  @jax.jit
  def step(params, opt_state, istate, astate, x, y):
    probe = p.instruments.grad(istate, losses_fn, params, x, y)
    updates, opt_state = tx.update(probe.grads, opt_state, params)
    ivals, istate = p.instruments.update(istate, probe, updates, learning_rate=0.1)
    avals, astate = p.activations.update(
      astate, activations=dict(probe.captured.outputs), layer_grads=dict(probe.captured.grads)
    )
    values = transforms.monitored_metrics(opt_state) | ivals | avals
    return optax.apply_updates(params, updates), opt_state, istate, astate, values


  params, opt_state, istate, astate, values = step(params, opt_state, istate, astate, x, y)
  # values: grads/norm/layers_0/kernel, ..., alpha, hess_trace, activations/std/layers_0, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from jaxscope import tree as jtree
from jaxscope.metrics import registry
from jaxscope.metrics.instruments import Instruments, instruments
from jaxscope.metrics.scope import PARAM_TOPICS, Scope, scope

__all__ = [
  "ACTIVATION_METRICS",
  "PRESET_SCOPES",
  "REALISED_METRICS",
  "RUN_PRESETS",
  "Preset",
  "activation_scope",
  "preset",
  "scope_metrics",
]

#: The run presets, each with the per-layer scope preset it uses
#: (:data:`jaxscope.metrics.registry.SCOPE_PRESETS`); the instruments are the preset of the
#: same name (:data:`jaxscope.metrics.instruments.INSTRUMENT_PRESETS`).
PRESET_SCOPES: dict[str, str] = {"economy": "economy", "business": "economy", "full": "full"}

#: The names of the run presets.
RUN_PRESETS: tuple[str, ...] = tuple(PRESET_SCOPES)

#: The realised-update metrics the presets add for parameters stored below float32.
REALISED_METRICS = ("realised_ratio", "lost_fraction")

#: The activation-health metrics of the run presets (:func:`activation_scope`).
ACTIVATION_METRICS: dict[str, tuple[str, ...]] = {
  "activations": ("std", "dead_fraction", "saturation_fraction"),
  "layer_grads": ("norm",),
}


class Preset(NamedTuple):
  """The three measurements of a run preset (see :mod:`jaxscope.metrics.presets`)."""

  scope: Scope
  """Per-layer statistics of ``params``, ``grads`` and ``updates``
  (:func:`jaxscope.transforms.monitored`, or ``scope.update`` in the step)."""
  instruments: Instruments
  """Cockpit's instruments of the same name, ``grad`` before the optimizer and ``update``
  after it."""
  activations: Scope
  """The activation health of the captured layers (topics ``activations`` and
  ``layer_grads``), fed ``probe.captured.outputs`` and ``probe.captured.grads``."""


def _check_name(name: str) -> None:
  if not isinstance(name, str) or name not in PRESET_SCOPES:
    raise ValueError(f"unknown run preset {name!r}; presets: {', '.join(RUN_PRESETS)}.")


def _check_topics(topics: Sequence[str] | None) -> list[str]:
  topics = list(PARAM_TOPICS if topics is None else topics)
  for t in topics:
    if t not in PARAM_TOPICS:
      raise ValueError(f"unknown topic {t!r}; topics: {', '.join(PARAM_TOPICS)}.")
  return topics


def scope_metrics(
  name: str, *, topics: Sequence[str] | None = None, low_precision: bool = False
) -> dict[str, list[Any]]:
  """The per-layer metric lists of the run preset ``name``, keyword arguments of
  :func:`~jaxscope.metrics.scope`.

  Args:
    name: ``"economy"``, ``"business"`` or ``"full"`` (:data:`RUN_PRESETS`).
    topics: the topics kept (default all of ``params``, ``grads``, ``updates``).
    low_precision: the parameters are stored below float32 (bfloat16): also measure the
      realised update ratio and the fraction of lost updates (:data:`REALISED_METRICS`,
      under ``updates``), which ``full`` has anyway.

  Returns:
    ``{topic: [metric, …]}``, topics without a metric left out.

  Raises:
    ValueError: an unknown preset or topic.
  """
  _check_name(name)
  topics = _check_topics(topics)
  lists = {t: v for t, v in registry.preset_metrics(PRESET_SCOPES[name]).items() if t in topics}
  if low_precision and "updates" in lists:
    lists["updates"] += [m for m in REALISED_METRICS if m not in lists["updates"]]
  return {t: v for t, v in lists.items() if v}


def activation_scope(every: int = 1, *, stacked: jtree.Stacked | None = None) -> Scope:
  """The activation-health scope of the run presets.

  Measures, per captured Flax layer ``l`` (:mod:`jaxscope.capture`, the ``probe.captured``
  of :meth:`~jaxscope.metrics.Instruments.grad`), the standard deviation of the layer's
  output ``y_l`` (``activations/std/{l}``), the fraction of dead units, ``≤ 0`` for the
  whole batch (``activations/dead_fraction/{l}``), the fraction of entries with
  ``|y| > 3`` (``activations/saturation_fraction/{l}``) and the norm ``‖∂L/∂y_l‖`` of
  the gradient w.r.t. the output (``layer_grads/norm/{l}``).

  Args:
    every: measure every ``every``-th step.
    stacked: ``{pattern: axis}``: layers inside a ``lax.scan`` over a stack are captured
      with a leading layer axis and measured per layer (see :func:`~jaxscope.metrics.scope`).
  """
  lists = {t: list(v) for t, v in ACTIVATION_METRICS.items()}
  return scope(**lists, every=every, stacked=stacked)  # type: ignore[arg-type]


def preset(
  name: str,
  *,
  every: int = 1,
  seed: int = 0,
  stacked: jtree.Stacked | None = None,
  low_precision: bool = False,
  topics: Sequence[str] | None = None,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  kind: jtree.Kind = "any",
  depth: int | None = None,
  updates_in_span: bool = False,
) -> Preset:
  """The measurements of the run preset ``name``, those of ``jaxscope train --metrics name``.

  * ``economy``: the ``economy`` scope (norm, mean and variance of ``params``, ``grads``
    and ``updates``, the update/weight ratio per layer), Cockpit's ``economy``
    instruments (loss, gradient norm, distance from init, update size, α, norm /
    inner-product / orthogonality tests, per-example gradient histogram) and the
    activation health;
  * ``business``: the ``economy`` scope, Cockpit's ``business`` instruments (economy +
    TIC and Hessian trace with standard errors) and the activation health;
  * ``full``: the ``full`` scope (economy + histograms, spectral norms, realised update
    ratio and lost fraction), Cockpit's ``full`` instruments (business + ``λ_max``, 2-D
    histogram) and the activation health.

  Args:
    name: ``"economy"``, ``"business"`` or ``"full"`` (:data:`RUN_PRESETS`).
    every: measure every ``every``-th step (all three parts).
    seed: seed of the instruments' coordinate sample and probes.
    stacked: ``{pattern: axis}`` of layer-stacked parameters and captured layers,
      measured per layer (scope and activation scope; see :func:`~jaxscope.metrics.scope`).
    low_precision: the parameters are stored below float32: the scope also measures
      :data:`REALISED_METRICS` (see :func:`scope_metrics`).
    topics: the scope's topics (default all of ``params``, ``grads``, ``updates``).
    include: regular expression(s) of the scope's layers (``re.search``); ``None`` = all.
    exclude: regular expression(s) of layers the scope leaves out.
    kind: ``"kernel"``, ``"bias"`` or ``"any"``: the scope's parameter kinds.
    depth: the scope's layer grouping (see :func:`jaxscope.tree.layout`).
      ``topics``, ``include``, ``exclude``, ``kind`` and ``depth`` select the per-layer
      scope only, as the command line's ``--topics``, ``--layers``, ``--exclude``,
      ``--kind`` and ``--depth``.
    updates_in_span: the optimizer's updates are ``c₀·g + c₁·d_{t−1}`` (plain SGD or
      heavy-ball momentum): α combines the update's projections from the others'
      (``updates_in_span`` of :func:`~jaxscope.metrics.instruments`).

  Returns:
    A :class:`Preset` ``(scope, instruments, activations)``.

  Raises:
    ValueError: an unknown preset name (the message lists the names), an unknown topic,
      or topics that leave the scope without a metric.
  """
  lists = scope_metrics(name, topics=topics, low_precision=low_precision)
  if not lists:
    raise ValueError(f"preset {name!r}: no per-layer metric on topics {list(topics or ())}.")
  sc = scope(
    **lists,  # type: ignore[arg-type]
    every=every,
    include=include,
    exclude=exclude,
    kind=kind,
    depth=depth,
    stacked=stacked,
  )
  inst = instruments(preset=name, every=every, seed=seed, updates_in_span=updates_in_span)
  return Preset(sc, inst, activation_scope(every, stacked=stacked))
