"""What the reference loop measures: the per-layer scope, Cockpit's instruments and the
activation health of the captured layers, from the run's ``metrics`` setting.

The presets (``economy``, ``business``, ``full``) are the library's run presets: each part
is built by :func:`jaxscope.metrics.preset` (:mod:`jaxscope.metrics.presets`, which also
defines :data:`PRESET_SCOPES`, :data:`ACTIVATION_METRICS` and :data:`REALISED_METRICS`,
re-exported here), so ``jaxscope train --metrics NAME`` records what
``jaxscope.metrics.preset(NAME)`` measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxscope.metrics import presets, registry
from jaxscope.metrics.instruments import Instruments
from jaxscope.metrics.network import NetworkMetric
from jaxscope.metrics.presets import ACTIVATION_METRICS, PRESET_SCOPES, REALISED_METRICS
from jaxscope.metrics.scope import PARAM_TOPICS, Scope, scope
from jaxscope.tree import Stacked, stack_axes

__all__ = [
  "ACTIVATION_METRICS",
  "PRESET_SCOPES",
  "REALISED_METRICS",
  "make_activation_scope",
  "make_instruments",
  "make_scope",
  "stacked_of",
]


def make_instruments(
  metrics: str | Sequence[str] | None,
  *,
  every: int = 1,
  seed: int = 0,
  updates_in_span: bool = False,
) -> Instruments | None:
  """Cockpit's instruments for a run's ``metrics`` (``None`` unless it names a preset).

  ``"economy"``, ``"business"`` and ``"full"`` give the instruments of the run preset,
  ``jaxscope.metrics.preset(metrics, every=every, seed=seed).instruments`` (Cockpit's
  configurations of the same names, see :mod:`jaxscope.metrics.instruments`); metric-name
  lists and ``"none"`` run no instrument. ``updates_in_span``: the optimizer is plain SGD
  or heavy-ball momentum (:func:`jaxscope.train.updates_in_span`), so α combines the
  update's projections instead of projecting it.
  """
  if isinstance(metrics, str) and metrics in PRESET_SCOPES:
    return presets.preset(
      metrics, every=every, seed=seed, updates_in_span=updates_in_span
    ).instruments
  return None


def make_activation_scope(every: int = 1, *, stacked: Stacked | None = None) -> Scope:
  """The activation-health scope of the run presets, the ``activations`` of
  :func:`jaxscope.metrics.preset` (:func:`jaxscope.metrics.presets.activation_scope`).

  Measures, per captured Flax layer ``l`` (:mod:`jaxscope.capture`, the ``probe.captured``
  of :meth:`~jaxscope.metrics.Instruments.grad`), the standard deviation of the layer's
  output ``y_l`` (``activations/std/{l}``), the fraction of dead units, ``≤ 0`` for the
  whole batch (``activations/dead_fraction/{l}``), the fraction of entries with
  ``|y| > 3`` (``activations/saturation_fraction/{l}``) and the norm ``‖∂L/∂y_l‖`` of
  the gradient w.r.t. the output (``layer_grads/norm/{l}``). Layers inside a
  ``lax.scan`` over a stack are captured with a leading layer axis and measured per layer
  with ``stacked`` (see :func:`make_scope`).
  """
  return presets.activation_scope(every, stacked=stacked)


def make_scope(
  metrics: str | Sequence[str] | None = "economy",
  *,
  topics: Sequence[str] | None = None,
  layers: str | None = None,
  exclude: str | None = None,
  depth: int | None = None,
  kind: str = "any",
  every: int = 1,
  stacked: Stacked | None = None,
  low_precision: bool = False,
) -> Scope | None:
  """Builds the scope of a run from command-line style arguments.

  Args:
    metrics: a preset (``"economy"``, ``"full"``; ``"business"`` is the ``economy``
      scope, see :data:`PRESET_SCOPES`), ``"none"``/``None``/``""`` for no
      per-layer metrics, or metric names (a comma-separated string or a list; built-in,
      registered or plugin metrics, see ``jaxscope list-metrics``), measured on every
      topic in ``topics``. Network metrics (``loss``, ``accuracy``) are always recorded
      by the loop and are ignored here.
    topics: the topics to measure (default: all of ``params``, ``grads``, ``updates``).
    layers: regular expression selecting layers by name (``re.search``).
    exclude: regular expression of layers to leave out.
    depth: layer grouping (see :func:`jaxscope.tree.layout`).
    kind: ``"kernel"``, ``"bias"`` or ``"any"``.
    every: measure every ``every``-th step.
    stacked: ``{pattern: axis}`` of layer-stacked parameters, measured per layer (see
      :func:`jaxscope.tree.unstack`; :func:`stacked_of` reads it from a zoo model).
    low_precision: the parameters are stored in a dtype below float32 (bfloat16): the
      presets also measure the realised update ratio and the fraction of lost updates
      (``updates/realised_ratio``, ``updates/lost_fraction``), which the ``full`` preset
      has anyway.

  Returns:
    The scope, or ``None`` when no per-layer metric is asked for.
  """
  if topics is None:
    topics = PARAM_TOPICS
  topics = list(topics)
  for t in topics:
    if t not in PARAM_TOPICS:
      raise ValueError(f"unknown topic {t!r}; topics: {', '.join(PARAM_TOPICS)}.")
  if metrics is None or metrics in ("", "none"):
    return None
  if isinstance(metrics, str) and metrics in PRESET_SCOPES:  # The run preset's scope.
    if not topics:
      return None
    return presets.preset(
      metrics,
      every=every,
      stacked=stacked,
      low_precision=low_precision,
      topics=topics,
      include=layers,
      exclude=exclude,
      kind=kind,  # type: ignore[arg-type]
      depth=depth,
    ).scope
  names = registry.split_specs(metrics) if isinstance(metrics, str) else metrics
  names = [n for n in names if n]
  lists: dict[str, list[Any]] = {t: [] for t in topics}
  for n in names:
    n = PRESET_SCOPES.get(n, n)
    if n in registry.SCOPE_PRESETS:  # A preset among names: its per-layer metrics.
      for t, specs in registry.preset_metrics(n).items():
        if t in lists:
          lists[t].extend(s for s in specs if s not in lists[t])
      continue
    try:
      m = registry.get(n)
    except KeyError as e:
      raise ValueError(str(e.args[0])) from None
    if isinstance(m, NetworkMetric):
      continue  # loss and accuracy are recorded by the loop itself.
    for t in topics:
      if n not in lists[t]:
        lists[t].append(n)
  lists = {t: v for t, v in lists.items() if v}
  if not lists:
    return None
  return scope(
    **lists,  # type: ignore[arg-type]
    every=every,
    include=layers,
    exclude=exclude,
    kind=kind,  # type: ignore[arg-type]
    depth=depth,
    stacked=stacked,
  )


def stacked_of(model: Any) -> dict[str, int] | None:
  """The ``stacked`` mapping of a zoo model: its parameters' stacked layer axes, from the
  logical axis names of :attr:`jaxscope.models.ModelDef.param_axes` (``"layers"``), or
  ``None`` when it has none (e.g. an unrolled transformer, an MLP)."""
  axes = getattr(model, "param_axes", None)
  if axes is None:
    return None
  return stack_axes(axes, "layers") or None
