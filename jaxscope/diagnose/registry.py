"""The rule registry :data:`RULES` and :func:`diagnose`, which runs it over a run.

A rule is ``rule(history, thresholds) -> list[Finding]``; the registry's order is the order
in which the rules run (the findings are sorted afterwards, so it matters only for ties).

After a divergence (the first non-finite or exploding loss step, ``divergence_factor``)
what the layers do is a consequence, not a cause: every rule but those of
:data:`WHOLE_RUN` judges only the steps before it. A finding that only the whole run shows
is still reported, with confidence ``"low"`` and a note "after the divergence at step N".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxscope.diagnose.activations import _rule_dead_units, _rule_saturation
from jaxscope.diagnose.budget import _rule_too_few_steps
from jaxscope.diagnose.causes import (
  _rule_dropout_rate_high,
  _rule_dropout_too_strong,
  _rule_label_noise,
  _rule_lr_too_low,
)
from jaxscope.diagnose.curvature import _rule_lr_curvature
from jaxscope.diagnose.data import _rule_class_imbalance, _rule_nonfinite_data, _rule_unnormalised
from jaxscope.diagnose.divergence import _divergence_step, _rule_divergence
from jaxscope.diagnose.finding import Finding, Thresholds
from jaxscope.diagnose.gradients import (
  _alarmed_again,
  _rule_gradients,
  _rule_lost_updates,
  _rule_stalled_layers,
  _rule_update_ratio,
)
from jaxscope.diagnose.init_scale import _rule_bad_init_scale
from jaxscope.diagnose.loss import (
  _rule_early_plateau,
  _rule_late_plateau,
  _rule_loss_output_mismatch,
  _rule_oscillation,
  _rule_overfitting,
)
from jaxscope.diagnose.reporting import _sort_key
from jaxscope.diagnose.series import _before
from jaxscope.record import History

#: The rules by name: ``rule(history, thresholds) -> list[Finding]``. A rule may return
#: findings of several names (``"oscillation"`` gives ``oscillation`` or ``instability``,
#: ``"gradients"`` gives ``vanishing_gradients`` / ``exploding_gradients``,
#: ``"update_ratio"`` gives ``update_ratio_high`` / ``update_ratio_low``).
RULES: dict[str, Callable[[History, Thresholds], list[Finding]]] = {
  "divergence": _rule_divergence,
  "oscillation": _rule_oscillation,
  "early_plateau": _rule_early_plateau,
  "late_plateau": _rule_late_plateau,
  "overfitting": _rule_overfitting,
  "too_few_steps": _rule_too_few_steps,
  "loss_output_mismatch": _rule_loss_output_mismatch,
  "gradients": _rule_gradients,
  "update_ratio": _rule_update_ratio,
  "dead_units": _rule_dead_units,
  "saturation": _rule_saturation,
  "stalled_layers": _rule_stalled_layers,
  "lost_updates": _rule_lost_updates,
  "lr_above_curvature_limit": _rule_lr_curvature,
  "nonfinite_data": _rule_nonfinite_data,
  "unnormalised_inputs": _rule_unnormalised,
  "class_imbalance": _rule_class_imbalance,
  "lr_too_low": _rule_lr_too_low,
  "bad_init_scale": _rule_bad_init_scale,
  "label_noise": _rule_label_noise,
  "dropout_too_strong": _rule_dropout_too_strong,
  "dropout_rate": _rule_dropout_rate_high,
}

#: Rules that read the whole run, a divergence included: the divergence itself, the rules
#: on the training data (``config["data_stats"]``, a cause that precedes any step) and
#: ``too_few_steps``, which does not judge a run that diverged (it broke; it did not stop
#: too early), and ``dropout_rate`` (a rate set before any step).
WHOLE_RUN = frozenset(
  {
    "divergence",
    "nonfinite_data",
    "unnormalised_inputs",
    "class_imbalance",
    "too_few_steps",
    "dropout_rate",
  }
)


# --------------------------------------------------------------------------- entry point


def _as_history(history: Any) -> History:
  """A :class:`History` from a History, a run directory or a mapping ``key -> (steps, values)``."""
  if isinstance(history, History):
    return history
  if isinstance(history, str | os.PathLike):
    return History.load(history)
  if isinstance(history, Mapping):
    by_step: dict[int, dict[str, Any]] = {}
    for key, pair in history.items():
      steps, values = pair
      for s, v in zip(np.asarray(steps).tolist(), np.asarray(values), strict=True):
        by_step.setdefault(int(s), {})[key] = v
    return History(sorted(by_step.items()))
  raise TypeError(
    "diagnose: history must be a History, a run directory or a mapping "
    f"key -> (steps, values), got {type(history).__name__}."
  )


def _after_divergence(f: Finding, step: int) -> Finding:
  """``f`` as a consequence of the divergence at ``step``: confidence ``"low"``, a note in
  its summary and ``values["after_divergence_step"]``."""
  evidence = dict(f.evidence)
  evidence["values"] = {**dict(evidence.get("values", {})), "after_divergence_step": step}
  note = f" (after the divergence at step {step}: a consequence, not a cause)"
  summary = f.summary[:-1] + note + "." if f.summary.endswith(".") else f.summary + note
  return dataclasses.replace(f, summary=summary, evidence=evidence, confidence="low")


def _run_rules(h: History, th: Thresholds) -> list[Finding]:
  """Every rule of :data:`RULES` over ``h``; after a divergence, those not in
  :data:`WHOLE_RUN` over the steps before it, and what only the whole run shows marked
  by :func:`_after_divergence`."""
  div = _divergence_step(h, th)
  before = _before(h, div) if div is not None else h
  findings: list[Finding] = []
  for name, rule in RULES.items():
    if div is None or name in WHOLE_RUN:
      findings.extend(rule(h, th))
      continue
    early = rule(before, th)
    findings.extend(early)
    seen = {f.name for f in early}
    findings.extend(_after_divergence(f, div) for f in rule(h, th) if f.name not in seen)
  return findings


def _thresholds(thresholds: Thresholds | None, overrides: Mapping[str, Any]) -> Thresholds:
  """``thresholds`` (default :class:`Thresholds()`) with the overrides by name; integer
  thresholds given as integral floats (e.g. from a command line) become ints."""
  th = thresholds if thresholds is not None else Thresholds()
  if overrides:
    fields = {f.name for f in dataclasses.fields(Thresholds)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise TypeError(f"diagnose: unknown thresholds {unknown}; known: {sorted(fields)}.")
    th = dataclasses.replace(th, **overrides)
  ints = {
    f.name: int(getattr(th, f.name))
    for f in dataclasses.fields(Thresholds)
    if isinstance(f.default, int)
    and not isinstance(f.default, bool)
    and isinstance(getattr(th, f.name), float)
    and float(getattr(th, f.name)).is_integer()
  }
  if ints:
    th = dataclasses.replace(th, **ints)
  return th


def diagnose(
  history: History | str | os.PathLike[str] | Mapping[str, tuple[np.ndarray, np.ndarray]],
  thresholds: Thresholds | None = None,
  **overrides: Any,
) -> list[Finding]:
  """Runs every rule of :data:`RULES` over a run and returns what it finds.

  Args:
    history: a :class:`~jaxscope.record.History`, a run directory (loaded with
      :meth:`History.load`), or a mapping ``key -> (steps, values)``.
    thresholds: the thresholds (default :class:`Thresholds()`).
    **overrides: thresholds to change by name, e.g. ``dead_fraction=0.3``.

  Returns:
    The findings in the order of :func:`~jaxscope.diagnose.reporting._sort_key`: alarms
    (critical, warning) before info; among them findings of confidence ``"low"`` last,
    those that name a cause (:data:`~jaxscope.diagnose.reporting.CAUSES`) before those
    that describe a symptom, then by severity, by confidence, by the first step of their
    evidence and by name. Empty when nothing was found.

  Raises:
    TypeError: an override names no field of :class:`Thresholds`, or ``history`` has an
      unsupported type.
  """
  th = _thresholds(thresholds, overrides)
  return sorted(_alarmed_again(_run_rules(_as_history(history), th)), key=_sort_key)
