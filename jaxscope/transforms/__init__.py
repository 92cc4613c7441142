"""optax transformations that see and act on what they measure."""

from jaxscope.transforms.capacity import (
  PlateauState,
  masked_freeze,
  plateau_detector,
  plateau_init,
  plateau_restart,
  plateau_update,
)
from jaxscope.transforms.monitor import MonitoredState, monitored, monitored_metrics
from jaxscope.transforms.probprec import (
  PHASES,
  PreconditionerState,
  adaptive_sgd,
  only_adaptive_sgd,
  preconditioned_sgd,
  preconditioner_log,
  preconditioner_phase,
  probabilistic_preconditioner,
  restart_estimate,
  value_grad_and_hvp,
)
from jaxscope.transforms.ratio_lr import (
  RatioAdaptiveState,
  ratio_adaptive_lr,
  ratio_adaptive_sgd,
  ratio_lr_values,
  scale_to_update_ratio,
)
from jaxscope.transforms.train_state import apply_gradients

__all__ = [
  "PHASES",
  "MonitoredState",
  "PlateauState",
  "PreconditionerState",
  "RatioAdaptiveState",
  "adaptive_sgd",
  "apply_gradients",
  "masked_freeze",
  "monitored",
  "monitored_metrics",
  "only_adaptive_sgd",
  "plateau_detector",
  "plateau_init",
  "plateau_restart",
  "plateau_update",
  "preconditioned_sgd",
  "preconditioner_log",
  "preconditioner_phase",
  "probabilistic_preconditioner",
  "ratio_adaptive_lr",
  "ratio_adaptive_sgd",
  "ratio_lr_values",
  "restart_estimate",
  "scale_to_update_ratio",
  "value_grad_and_hvp",
]
