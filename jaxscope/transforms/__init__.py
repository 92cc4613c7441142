"""optax transformations that see and act on what they measure."""

from jaxscope.transforms.monitor import MonitorState, metrics, monitored
from jaxscope.transforms.ratio_lr import (
  RatioAdaptiveState,
  ratio_adaptive_lr,
  ratio_adaptive_sgd,
  ratio_lr_values,
  scale_to_update_ratio,
)

__all__ = [
  "MonitorState",
  "RatioAdaptiveState",
  "metrics",
  "monitored",
  "ratio_adaptive_lr",
  "ratio_adaptive_sgd",
  "ratio_lr_values",
  "scale_to_update_ratio",
]
