"""The share of a run's updates that is decoupled weight decay.

An optimizer with decoupled weight decay (``optax.adamw``, ``lion``, ``lamb``, …; Loshchilov
& Hutter 2019) adds ``lr · wd · θ`` to every update, so it moves each weight matrix by the
fraction ``lr · wd`` of its norm per step whatever the gradient does. When that is a large
share of the recorded update/weight ratio ``‖Δθ‖/‖θ‖``, the weights sit where the decay
balances the gradient, and the training loss levels off where the regularisation holds it:
a late plateau the run was configured for, not a fault (``late_plateau`` reports it as the
info ``regularised_plateau``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import optax

from jaxscope.diagnose.finding import Thresholds
from jaxscope.diagnose.series import _finite, _layers, _series
from jaxscope.record import History


def _number(value: Any) -> float | None:
  """``value`` as a float when it is a finite non-negative number (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, int | float):
    return None
  return float(value) if np.isfinite(value) and value >= 0 else None


def _weight_decay(config: Mapping[str, Any]) -> float | None:
  """The run's decoupled weight decay: ``weight_decay`` of ``optimizer_hparams`` (or
  ``optimizer_args``), else the default of the optax optimizer named ``optimizer`` when it
  takes a ``weight_decay`` argument (``optax.adamw``: 1e-4); ``None`` when the optimizer
  has none."""
  for key in ("optimizer_hparams", "optimizer_args"):
    args = config.get(key)
    if isinstance(args, Mapping) and "weight_decay" in args:
      return _number(args["weight_decay"])
  name = config.get("optimizer")
  factory = getattr(optax, name, None) if isinstance(name, str) else None
  if factory is None or not callable(factory) or name.startswith("_"):
    return None
  try:
    param = inspect.signature(factory).parameters.get("weight_decay")
  except (TypeError, ValueError):
    return None
  return None if param is None else _number(param.default)


class DecayShare(NamedTuple):
  """How much of the updates over a stretch of steps is decoupled weight decay."""

  per_step: float
  """``lr · wd``: the fraction of each weight's norm the decay removes per step (median
  recorded learning rate of the stretch, else ``config["lr"]``)."""
  update_ratio: float
  """The median over the weight layers of their median ``updates/ratio`` in the stretch."""
  share: float
  """``per_step / update_ratio``."""
  points: int
  """Update-ratio points the medians rest on (the fewest of any layer)."""


def _decay_share(h: History, first_step: float) -> DecayShare | None:
  """:class:`DecayShare` of the steps from ``first_step`` on, or ``None`` when the run has
  no decoupled weight decay, no learning rate or no recorded update ratios there."""
  wd = _weight_decay(h.config)
  if not wd:
    return None
  lr_series = _series(h, "lr")
  lr = None
  if lr_series is not None:
    steps, values = _finite(*lr_series)
    values = values[steps >= first_step]
    lr = float(np.median(values)) if values.size else None
  if lr is None:
    lr = _number(h.config.get("lr", h.config.get("learning_rate")))
  if not lr:
    return None
  medians, points = [], []
  for lay in _layers(h, "updates", "ratio", weights=True):
    steps, values = _finite(*_series(h, f"updates/ratio/{lay}"))  # type: ignore[misc]
    values = values[steps >= first_step]
    if values.size:
      medians.append(float(np.median(values)))
      points.append(int(values.size))
  if not medians:
    return None
  ratio = float(np.median(medians))
  per_step = lr * wd
  share = per_step / ratio if ratio > 0 else float("inf")
  return DecayShare(per_step, ratio, share, min(points))


def _held_by_decay(h: History, th: Thresholds, first_step: float) -> DecayShare | None:
  """:func:`_decay_share` when the decay is at least ``decay_share`` of the updates."""
  d = _decay_share(h, first_step)
  return d if d is not None and d.share >= th.decay_share else None
