"""The rule that names a bad initial scale: the network starts with outputs far too large
(or small).

``bad_init_scale`` reads the first step of the log next to the run's configuration
(``config.json``: ``num_classes``, ``task`` and the ``data_stats`` of
:func:`jaxscope.data.data_stats`): an initial loss far above that of a model that learned
nothing (the chance level ``ln(num_classes)``; for regression, the mean squared error of
predicting zero) with normalised inputs (large initial outputs), and/or the standard
deviation of the layers' outputs growing or shrinking by a large factor per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxscope.diagnose.activations import _hidden_layers
from jaxscope.diagnose.data import _inputs_normalised, _stats
from jaxscope.diagnose.divergence import _initial_test_loss, _stable_loss
from jaxscope.diagnose.finding import Finding, Thresholds, _confidence, _finding, _fmt, _margin
from jaxscope.diagnose.series import _layers, _series
from jaxscope.record import History


def _first_scales(
  h: History, th: Thresholds
) -> tuple[int, list[str], np.ndarray, np.ndarray] | None:
  """``(step, layers, std, dead fraction)`` of the captured layers (depth order, the output
  layer left out with ``exclude_output_layer``: a few units, often scaled down on purpose)
  at the first step where ``activations/std`` of every one of them is recorded and finite
  (dead fraction NaN where not recorded), or ``None``."""
  layers = _hidden_layers(_layers(h, "activations", "std"), th)
  if not layers:
    return None
  series = [_series(h, f"activations/std/{lay}") for lay in layers]
  common = series[0][0]  # type: ignore[index]
  for st, _ in series[1:]:  # type: ignore[misc]
    common = np.intersect1d(common, st)
  for step in common:
    std = np.array([v[np.searchsorted(st, step)] for st, v in series])  # type: ignore[misc]
    if np.all(np.isfinite(std)):
      dead = np.full(std.shape, np.nan)
      for i, lay in enumerate(layers):
        d = _series(h, f"activations/dead_fraction/{lay}")
        if d is not None and step in d[0]:
          dead[i] = d[1][np.searchsorted(d[0], step)]
      return int(step), layers, std, dead
  return None


def _depth_growth(h: History, th: Thresholds) -> tuple[float, str, int, dict[str, Any]] | None:
  """The per-layer factor of the layers' output std at the first step when it grows or
  shrinks beyond ``init_growth`` (see :func:`_rule_bad_init_scale`): ``(margin, sentence,
  step, values)``, or ``None``."""
  first = _first_scales(h, th)
  if first is None or len(first[1]) < 3:
    return None
  step, layers, std, dead = first
  if np.any(std <= 0):
    return None
  ratios = std[1:] / std[:-1]
  g = float((std[-1] / std[0]) ** (1.0 / (len(std) - 1)))
  if g > th.init_growth and np.all(ratios > 1):
    word, margin = "grows", _margin(g, th.init_growth, above=True)
  elif g < 1.0 / th.init_growth and np.all(ratios < 1):
    # Dead ReLUs at the first step also collapse the signal: dead_units names that.
    if np.any(dead > th.dead_fraction):
      return None
    word, margin = "shrinks", _margin(g, 1.0 / th.init_growth, above=False)
  else:
    return None
  profile = " → ".join(f"{lay} {_fmt(v)}" for lay, v in zip(layers, std, strict=True))
  sentence = (
    f"the standard deviation of the layers' outputs at step {step} {word} {_fmt(g)}× per "
    f"layer ({profile}; beyond {_fmt(th.init_growth)}×)"
  )
  values = {f"std/{lay}": float(v) for lay, v in zip(layers, std, strict=True)}
  values["std_growth_per_layer"] = g
  return margin, sentence, step, values


def _initial_loss(h: History, th: Thresholds) -> tuple[int, float, str] | None:
  """``(step, loss, key)`` of the initial parameters: ``test/loss`` evaluated at or before
  the first training step (:func:`_initial_test_loss`: the whole test set, no minibatch
  noise), else the first (pre-divergence) training loss."""
  test = _initial_test_loss(h, th)
  if test is not None:
    return test[0], test[1], "test/loss"
  s = _stable_loss(h, th)
  return (int(s[0][0]), float(s[1][0]), "loss") if s is not None else None


def _learned_nothing_loss(h: History) -> tuple[float, str] | None:
  """The loss of a model that learned nothing and a phrase naming it: ``ln K`` for a
  classification run of ``K`` classes (uniform predictions); for a regression run (mean
  squared error) ``E[y²] = mean² + std²`` of the recorded training targets (predicting zero,
  which a network with small initial outputs does); ``None`` when the run says neither."""
  if h.config.get("task") == "regression":
    y = (_stats(h) or {}).get("targets")
    if not isinstance(y, Mapping) or "std" not in y or "mean" not in y:
      return None
    zero = float(y["mean"]) ** 2 + float(y["std"]) ** 2
    return (zero, f"the loss of predicting zero E[y²] = {_fmt(zero)}") if zero > 0 else None
  k = h.config.get("num_classes")
  if not isinstance(k, int) or k < 2:
    return None
  return math.log(k), f"the chance level ln({k}) = {_fmt(math.log(k))}"


def _large_first_loss(h: History, th: Thresholds) -> tuple[float, str, int, dict[str, Any]] | None:
  """The initial loss far above that of a model that learned nothing
  (:func:`_learned_nothing_loss`) with normalised inputs (see :func:`_rule_bad_init_scale`):
  ``(margin, sentence, step, values)`` or ``None``."""
  nothing = _learned_nothing_loss(h)
  if nothing is None:
    return None
  if not _inputs_normalised(h, th):
    return None  # Unnormalised inputs (or none recorded) would explain a large loss.
  initial = _initial_loss(h, th)
  if initial is None:
    return None
  step, loss0, key = initial
  chance, name = nothing
  if loss0 <= th.init_loss_factor * chance:
    return None
  x = _stats(h)["inputs"]  # type: ignore[index]
  what = "the initial test loss" if key == "test/loss" else "the first loss"
  large = (
    "large initial outputs" if h.config.get("task") == "regression" else "large initial logits"
  )
  sentence = (
    f"{what} is {_fmt(loss0)}, {_fmt(loss0 / chance)} × {name} ({large}) while the inputs "
    f"are normalised (std {_fmt(x['std'])}, |x| ≤ {_fmt(max(abs(x['min']), abs(x['max'])))})"
  )
  values = {"first_loss": loss0, "first_loss_key": key, "chance_loss": chance}
  values["input_std"] = float(x["std"])
  return _margin(loss0, th.init_loss_factor * chance, above=True), sentence, step, values


def _rule_bad_init_scale(h: History, th: Thresholds) -> list[Finding]:
  """Bad initial scale: the network starts with outputs far too large (or small).

  Two independent pieces of evidence, each enough:

  * **initial loss**: the loss of the initial parameters (``test/loss`` evaluated at or
    before the first step, else the first finite training loss, :func:`_initial_loss`)
    above ``init_loss_factor ×`` the loss of a model that learned nothing: ``ln K`` for
    classification (``config["num_classes"] = K``, uniform predictions; a first loss that
    high means large initial logits), ``E[y²]`` of the recorded targets for regression
    (mean squared error of predicting zero: large initial outputs), while ``data_stats``
    shows normalised inputs (no ``unnormalised_inputs`` problem: inputs scaled up give a
    large first loss too, and that rule names them); not judged without ``data_stats``;
  * **depth profile**: at the first step where ``activations/std/{layer}`` of every
    captured layer but the output layer (at least 3, depth order) is finite, the per-layer factor
    ``g = (σ_last/σ_first)^(1/(L−1))`` above ``init_growth`` with every consecutive layer
    growing, or below ``1/init_growth`` with every one shrinking and no layer dead at that
    step (more than ``dead_fraction`` dead units: ``dead_units`` names that collapse).

  Warning. Confidence: the larger margin; one level up (low → medium → high) when both
  hold. Minimum evidence: the first step (an initialisation is judged where it is).
  Source: "bad initialisation", a common real fault of the DeepFD study; the layer
  response analysis of He et al. (2016).
  """
  found = [e for e in (_large_first_loss(h, th), _depth_growth(h, th)) if e is not None]
  if not found:
    return []
  margin = max(e[0] for e in found)
  confidence = _confidence(margin)
  if len(found) == 2 and margin >= 1.0:
    confidence = "high" if confidence != "low" else "medium"
  sentences = "; ".join(e[1] for e in found)
  summary = f"The initial scale is wrong: {sentences}."
  large = any("first_loss" in e[3] or e[3]["std_growth_per_layer"] > 1 for e in found)
  if large:
    tip = "scale the initial weights down to the standard fan-in scale (LeCun normal, variance "
    tip += "1/fan-in, Flax's Dense default; the output layer's smaller still, even zero) so "
    tip += "that the first outputs are small"
  else:
    tip = "scale the initial weights up (He: variance 2/fan-in for ReLU) so that the signal "
    tip += "keeps its size through depth"
  values: dict[str, Any] = {"initial_scale": "too large" if large else "too small"}
  for e in found:
    values.update(e[3])
  metric = []
  if "first_loss_key" in values:
    metric.append(values["first_loss_key"])
  if any("std_growth_per_layer" in e[3] for e in found):
    metric += [k.replace("std/", "activations/std/") for k in values if k.startswith("std/")]
  return [
    _finding(
      "bad_init_scale",
      "warning",
      summary,
      metric=metric,
      steps=[min(e[2] for e in found)],
      values=values,
      confidence=confidence,
      advice=[tip],
    )
  ]
