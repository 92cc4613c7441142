"""Pure, jit-able statistics of parameter, gradient and update pytrees.

Per-layer metrics (:class:`Metric`) are bundled into a :func:`scope`, which produces one
flat ``dict[str, jax.Array]`` per step keyed ``{topic}/{stat}/{layer}``. Cockpit's
gradient-noise, curvature and step-length instruments come from :func:`instruments`
(built on :mod:`.noise`, :mod:`.per_example`, :mod:`.curvature` and :mod:`.hvp`).

:func:`preset` gives a run preset (``economy``, ``business``, ``full``) as the
:class:`Preset` ``(scope, instruments, activations)``: the per-layer scope, Cockpit's
instruments of the same name and the activation health of the captured layers, exactly
what ``jaxscope train --metrics NAME`` records (:mod:`.presets`; ``scope(preset=...)`` is
the per-layer part only).
"""

from jaxscope.metrics import (
  activations,
  curvature,
  hvp,
  noise,
  per_example,
  presets,
  registry,
  spectral,
  stats,
)
from jaxscope.metrics.activations import activation_std, dead_fraction, saturation_fraction
from jaxscope.metrics.base import Metric, evaluate, stateless
from jaxscope.metrics.instruments import Instruments, InstrumentsState, Probe, instruments
from jaxscope.metrics.network import NetworkMetric, accuracy, batch_accuracy, loss
from jaxscope.metrics.presets import RUN_PRESETS, Preset, preset
from jaxscope.metrics.registry import SCOPE_PRESETS, preset_metrics, register
from jaxscope.metrics.scope import MEASURED, TOPICS, Scope, ScopeState, scope, scope_values
from jaxscope.metrics.spectral import condition_number, power_iteration, spectral_norm
from jaxscope.metrics.stats import (
  elementwise_ratio,
  histogram,
  lost_fraction,
  max_abs,
  mean,
  nonfinite_fraction,
  norm,
  ratio_to_params,
  realised_ratio,
  rms,
  total,
  variance,
  zero_fraction,
)

__all__ = [
  "MEASURED",
  "RUN_PRESETS",
  "SCOPE_PRESETS",
  "TOPICS",
  "Instruments",
  "InstrumentsState",
  "Metric",
  "NetworkMetric",
  "Preset",
  "Probe",
  "Scope",
  "ScopeState",
  "accuracy",
  "activation_std",
  "activations",
  "batch_accuracy",
  "condition_number",
  "curvature",
  "dead_fraction",
  "elementwise_ratio",
  "evaluate",
  "histogram",
  "hvp",
  "instruments",
  "loss",
  "lost_fraction",
  "max_abs",
  "mean",
  "noise",
  "nonfinite_fraction",
  "norm",
  "per_example",
  "power_iteration",
  "preset",
  "preset_metrics",
  "presets",
  "ratio_to_params",
  "realised_ratio",
  "register",
  "registry",
  "rms",
  "saturation_fraction",
  "scope",
  "scope_values",
  "spectral",
  "spectral_norm",
  "stateless",
  "stats",
  "total",
  "variance",
  "zero_fraction",
]
