"""Pure, jit-able statistics of parameter, gradient and update pytrees.

Per-layer metrics (:class:`Metric`) are bundled into a :func:`scope`, which produces one
flat ``dict[str, jax.Array]`` per step keyed ``{topic}/{stat}/{layer}``.
"""

from jaxscope.metrics import registry, spectral, stats
from jaxscope.metrics.base import Metric, evaluate, stateless
from jaxscope.metrics.network import NetworkMetric, accuracy, batch_accuracy, loss
from jaxscope.metrics.registry import PRESETS, preset_metrics, register
from jaxscope.metrics.scope import MEASURED, TOPICS, Scope, ScopeState, scope, scope_values
from jaxscope.metrics.spectral import condition_number, power_iteration, spectral_norm
from jaxscope.metrics.stats import (
  elementwise_ratio,
  histogram,
  max_abs,
  mean,
  nonfinite_fraction,
  norm,
  ratio_to_params,
  rms,
  sum,
  variance,
  zero_fraction,
)

__all__ = [
  "MEASURED",
  "PRESETS",
  "TOPICS",
  "Metric",
  "NetworkMetric",
  "Scope",
  "ScopeState",
  "accuracy",
  "batch_accuracy",
  "condition_number",
  "elementwise_ratio",
  "evaluate",
  "histogram",
  "loss",
  "max_abs",
  "mean",
  "nonfinite_fraction",
  "norm",
  "power_iteration",
  "preset_metrics",
  "ratio_to_params",
  "register",
  "registry",
  "rms",
  "scope",
  "scope_values",
  "spectral",
  "spectral_norm",
  "stateless",
  "stats",
  "sum",
  "variance",
  "zero_fraction",
]
