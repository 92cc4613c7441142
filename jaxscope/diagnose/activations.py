"""Rules on the activations: dead ReLU units and saturated units per layer.

They read ``activations/dead_fraction/{layer}`` and ``activations/saturation_fraction/{layer}``
and leave out the output layer (the logits) with ``Thresholds.exclude_output_layer``: the
layers named in :data:`OUTPUT_LAYER_NAMES`, else the last in depth order. Confidence: the
worst layer's median against the bound (:func:`~jaxscope.diagnose.finding._confidence`).
A warning when the run is still far from a good fit
(:func:`~jaxscope.diagnose.loss._far_from_good`), else info: a network of one-dimensional
inputs fitting a sine well has 50–70 % of its second layer's ReLUs dead on every batch
(their kinks sit outside the data), and the units it needs are alive.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxscope.diagnose.finding import Finding, Thresholds, _confidence, _finding, _margin
from jaxscope.diagnose.loss import _fits
from jaxscope.diagnose.series import _layer_tail_medians, _layers, _series
from jaxscope.record import History

#: Names of output layers (the logits, no non-linearity after them), left out with
#: ``exclude_output_layer`` wherever they sit in depth order (a transformer's ``head``
#: sorts before its ``ln_f``).
OUTPUT_LAYER_NAMES = frozenset({"head", "lm_head", "logits", "output", "classifier"})


def _hidden_layers(layers: list[str], th: Thresholds) -> list[str]:
  """``layers`` (depth order) without the output layer when ``exclude_output_layer`` and
  more than one is recorded: the layers named in :data:`OUTPUT_LAYER_NAMES`, else the last."""
  if th.exclude_output_layer and len(layers) > 1:
    named = [lay for lay in layers if lay.rsplit("/", 1)[-1] in OUTPUT_LAYER_NAMES]
    return [lay for lay in layers if lay not in named] if named else layers[:-1]
  return layers


def _activation_rule(
  h: History, th: Thresholds, stat: str, name: str, bound: float, what: str
) -> list[Finding]:
  """Finding ``name`` for the layers whose median ``activations/{stat}/{layer}`` over the
  last half is above ``bound``; ``what`` opens the summary."""
  layers = _hidden_layers(_layers(h, "activations", stat), th)
  med, first, points = _layer_tail_medians(
    h, f"activations/{stat}", layers, min_points=th.min_points
  )
  bad = [lay for lay, m in med.items() if m > bound]
  if not bad:
    return []
  worst = max(bad, key=lambda lay: med[lay])
  confidence = _confidence(_margin(med[worst], bound, above=True), points[worst], th.min_points)
  shown = ", ".join(f"{lay} {med[lay]:.0%}" for lay in bad[:5])
  summary = (
    f"{what} in {len(bad)} layer(s) (median fraction over the last half above "
    f"{bound:.0%}: {shown}{', …' if len(bad) > 5 else ''})."
  )
  severity, fit = "warning", _fits(h, th)
  if fit is not None:
    severity = "info"
    summary += f" The run still fits the data ({fit}): they do not hold training back."
  values: dict[str, Any] = {f"median/{lay}": m for lay, m in med.items()}
  tips: list[str] = []
  if stat == "dead_fraction":
    tips = _dead_from_start(h, bad, bound, values)
    if tips:
      summary += " They are dead from the first step: the initialisation put them there."
  return [
    _finding(
      name,
      severity,
      summary,
      metric=[f"activations/{stat}/{lay}" for lay in bad],
      layers=bad,
      steps=[min(first[lay] for lay in bad)],
      values=values,
      confidence=confidence,
      advice=tips,
    )
  ]


def _dead_from_start(h: History, bad: list[str], bound: float, values: dict[str, Any]) -> list[str]:
  """Whether the dead layers ``bad`` were dead already at their first recorded step (the
  fraction above ``bound`` in every one): adds ``values["dead_from_start"]`` and each
  layer's ``first/{layer}`` fraction, and returns the advice that comes first then (the
  initialisation, not the learning rate, killed them: a negative bias or a bad scale)."""
  firsts = {}
  for lay in bad:
    s = _series(h, f"activations/dead_fraction/{lay}")
    if s is None or not s[1].size or not np.isfinite(s[1][0]):
      return []
    firsts[lay] = float(s[1][0])
  start = all(v > bound for v in firsts.values())
  values["dead_from_start"] = start
  values.update({f"first/{lay}": v for lay, v in firsts.items()})
  if not start:
    return []
  return [
    "initialise the hidden biases at zero or small positive values (e.g. 0.01) so that "
    "the units start active; a negative bias or a bad scale put them in the dead zone"
  ]


def _rule_dead_units(h: History, th: Thresholds) -> list[Finding]:
  """Dead ReLU units: median ``activations/dead_fraction/{layer}`` over the last half (at
  least ``min_points`` points) above ``dead_fraction`` (a unit is dead when its
  pre-activation is ``≤ 0`` for the whole batch). ``values["dead_from_start"]`` says
  whether every such layer was dead at its first recorded step too: then the
  initialisation put them there (a negative bias, a bad scale) and the advice opens with
  the biases; else they died during training and it opens with the learning rate.
  The output layer is left out with ``exclude_output_layer``. Warning. Source: the
  lecture's dying-ReLU diagnosis; Cockpit-style activation health."""
  return _activation_rule(h, th, "dead_fraction", "dead_units", th.dead_fraction, "Dead units")


def _rule_saturation(h: History, th: Thresholds) -> list[Finding]:
  """Saturated units: median ``activations/saturation_fraction/{layer}`` (entries with
  ``|y| > 3``) over the last half (at least ``min_points`` points) above
  ``saturation_fraction``. The output layer is left
  out with ``exclude_output_layer``. Warning. Source: the lecture's saturating
  sigmoid/tanh diagnosis."""
  return _activation_rule(
    h, th, "saturation_fraction", "saturation", th.saturation_fraction, "Saturated units"
  )
