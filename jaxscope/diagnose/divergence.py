"""The divergence rule: a loss that turns NaN/Inf or explodes, where inside the network it
started, the records ``--stop-on divergence`` leaves, and the catapult (a spike the run
recovers from). Also the divergence step and the stable (pre-divergence) loss that every
other rule on the loss reads.

They read ``loss``, ``test/loss`` at the first step and, for the first non-finite value
inside the network, every per-layer ``{topic}/{stat}/{layer}`` key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxscope.diagnose.finding import (
  Finding,
  Thresholds,
  _confidence,
  _finding,
  _fmt,
  _margin,
  _nice,
)
from jaxscope.diagnose.series import _finite, _natural_key, _series
from jaxscope.record import History

#: Ratios whose denominator is a weight's norm: infinite for zero weights (a freshly
#: initialised bias), so their non-finite values are not evidence of a divergence.
_RATIO_STATS = ("ratio", "ratio_new", "elementwise_ratio", "realised_ratio")


# --------------------------------------------------------------------------- divergence


def _divergence_step(h: History, th: Thresholds) -> int | None:
  """The first step where ``loss`` is non-finite or above ``divergence_factor × |initial|``,
  leaving out an explosion the run recovers from (:func:`_catapult`)."""
  s = _series(h, "loss")
  if s is None:
    return None
  steps, loss = s
  finite = np.isfinite(loss)
  bad = ~finite
  if finite.any():
    initial = loss[np.argmax(finite)]
    if initial > 0 and _catapult(loss, th) is None:
      bad |= finite & (loss > th.divergence_factor * initial)
  return int(steps[np.argmax(bad)]) if bad.any() else None


def _catapult(loss: np.ndarray, th: Thresholds) -> tuple[int, int, float] | None:
  """A loss that rises above ``divergence_factor ×`` its first finite value and recovers:
  finite from then on, with the median of the last ``late_fraction`` of the run below the
  first value. Returns ``(index of the first point above, index of its peak, peak)`` or
  ``None``. The catapult of Lewkowycz et al. (2020): a learning rate a little above the
  stability limit ``2/λ_max`` throws the loss up, the curvature falls, and training
  converges (full-batch sine runs at lr 0.05 in the fault benchmark, issue 21)."""
  finite = np.isfinite(loss)
  if not finite.any():
    return None
  start = int(np.argmax(finite))
  initial = float(loss[start])
  above = finite & (loss > th.divergence_factor * initial)
  if initial <= 0 or not above.any():
    return None
  k = int(np.argmax(above))
  after = loss[k:]
  tail = loss[-max(1, math.ceil(th.late_fraction * loss.size)) :]
  if not np.isfinite(after).all() or k + 1 >= loss.size or np.median(tail) >= initial:
    return None
  if np.argmax(loss[::-1] > th.divergence_factor * initial) < tail.size:
    return None  # Still above the factor within the last stretch: not recovered.
  peak = k + int(np.argmax(after))
  return k, peak, float(loss[peak])


def _stable_loss(h: History, th: Thresholds) -> tuple[np.ndarray, np.ndarray] | None:
  """The finite ``loss`` before the divergence step (if any)."""
  s = _series(h, "loss")
  if s is None:
    return None
  steps, loss = s
  div = _divergence_step(h, th)
  if div is not None:
    keep = steps < div
    steps, loss = steps[keep], loss[keep]
  steps, loss = _finite(steps, loss)
  return (steps, loss) if steps.size else None


def _initial_test_loss(h: History, th: Thresholds) -> tuple[int, float] | None:
  """``(step, value)`` of ``test/loss`` evaluated at or before the first (pre-divergence)
  training step: the loss of the initial parameters on the whole test set, free of the
  minibatch noise of the first training losses; ``None`` when not recorded."""
  s = _stable_loss(h, th)
  test = _series(h, "test/loss")
  if s is None or test is None:
    return None
  t_steps, t_loss = _finite(*test)
  if not t_steps.size or t_steps[0] > s[0][0]:
    return None
  return int(t_steps[0]), float(t_loss[0])


def _nonfinite_name(x: float) -> str:
  """``"NaN"``, ``"+Inf"`` or ``"-Inf"``."""
  return "NaN" if np.isnan(x) else ("+Inf" if x > 0 else "-Inf")


def _first_nonfinite(h: History, div: int | None) -> tuple[tuple[int, str, str] | None, list[str]]:
  """The first non-finite per-layer value at or before ``div`` (any step if ``None``).

  Returns ``(step, key, layer)`` of the earliest one (ties: the first layer in depth order)
  or ``None``, and the layers (depth order) that turn non-finite at that step. A
  ``*/nonfinite_fraction/*`` above 0 counts as non-finite; ``updates/ratio``-like keys do not
  (:data:`_RATIO_STATS`).
  """
  first: tuple[int, str, str] | None = None  # (step, key, layer)
  bad_layers: dict[int, list[str]] = {}
  for key in h.keys():
    parts = key.split("/", 2)
    if len(parts) != 3:
      continue
    s = _series(h, key)
    if s is None:
      continue
    steps, values = s
    if parts[1] in _RATIO_STATS:
      continue  # ‖Δθ‖/‖θ‖ is +inf for a zero-initialised bias: not a NaN in the network.
    bad = ~np.isfinite(values)
    if parts[1] == "nonfinite_fraction":
      bad |= np.isfinite(values) & (values > 0)
    if div is not None:
      bad &= steps <= div
    if not bad.any():
      continue
    step = int(steps[np.argmax(bad)])
    bad_layers.setdefault(step, []).append(parts[2])
    if first is None or (step, _natural_key(parts[2])) < (first[0], _natural_key(first[2])):
      first = (step, key, parts[2])
  if first is None:
    return None, []
  return first, sorted(set(bad_layers[first[0]]), key=_natural_key)


#: Records ``--stop-on divergence`` writes in place of a step it did not record:
#: ``key -> what happened at that step``.
_STOP_KEYS = {
  "stop/nonfinite_loss": "its loss was non-finite (the step was not recorded)",
  "stop/nonfinite_batch": "its batch held a training example with a non-finite input or "
  "target (the step was not run)",
}


def _stop_record(h: History) -> tuple[int, str] | None:
  """``(step, key)`` of the first ``stop/*`` record of :data:`_STOP_KEYS`, or ``None``."""
  found = []
  for key in _STOP_KEYS:
    s = _series(h, key)
    if s is not None and s[0].size:
      found.append((int(s[0][0]), key))
  return min(found) if found else None


def _stopped_finding(step: int, key: str) -> Finding:
  summary = f"The run was stopped at step {step} by --stop-on divergence: {_STOP_KEYS[key]}."
  return _finding(
    "divergence",
    "critical",
    summary,
    metric=key,
    steps=[step],
    values={"divergence_step": step, "stop": key},
    confidence="high",
  )


def _catapult_finding(
  steps: np.ndarray, loss: np.ndarray, c: tuple[int, int, float], th: Thresholds
) -> Finding:
  k, peak, value = c
  initial = float(loss[np.isfinite(loss)][0])
  summary = (
    f"The loss spiked and recovered: at step {int(steps[k])} it rose above "
    f"{_fmt(th.divergence_factor)} × the initial {_fmt(initial)} (peak {_fmt(value)} at step "
    f"{int(steps[peak])}) and then fell to {_fmt(float(loss[-1]))}: a catapult, the loss's "
    "answer to a learning rate just above the stability limit; not a divergence."
  )
  return _finding(
    "catapult",
    "info",
    summary,
    metric="loss",
    steps=[steps[k], steps[peak]],
    values={"initial_loss": initial, "peak": value, "final_loss": float(loss[-1])},
    confidence="high",
  )


def _first_update_estimate(h: History) -> dict[str, float] | None:
  """How far to lower the learning rate, from the first update of a squared loss.

  On a quadratic ``L(θ) = ½ Σᵢ λᵢ xᵢ²`` one gradient step multiplies each ``xᵢ`` by
  ``1 − lr·λᵢ``, so the loss after it is ``r = Σᵢ (1 − lr·λᵢ)² wᵢ`` times the loss before
  (``wᵢ`` the share of direction ``i``). When ``r > 1`` the step overshot along the top
  curvature: ``(1 − lr·λ_max)² ≥ r``, so ``lr·λ_max ≥ 1 + √r``, and a learning rate
  ``1 / (1 + √r)`` times the current one brings ``lr·λ_max`` down to at most 1 (for the
  λ_max the first batch saw; a larger one still diverges, and the rule says so again).
  Read only for regression runs (mean squared error, ``config["task"] == "regression"``),
  where the quadratic is the loss's own shape; a cross-entropy grows only linearly in
  large logits, so its first-step ratio says little of ``lr·λ_max``. Needs the losses
  of the first two consecutive steps, finite and positive (``loss`` at step ``s`` is the
  batch loss before update ``s``).

  Returns:
    ``{"first_update_loss_ratio": r, "lr_curvature_at_least": 1 + √r,
    "suggested_factor": 1 / (1 + √r) to one significant digit}``, or ``None``.
  """
  if h.config.get("task") != "regression":
    return None
  s = _series(h, "loss")
  if s is None or s[0].size < 2 or int(s[0][1]) != int(s[0][0]) + 1:
    return None
  before, after = float(s[1][0]), float(s[1][1])
  if not (math.isfinite(before) and math.isfinite(after)) or before <= 0 or after <= before:
    return None
  r = after / before
  curvature = 1.0 + math.sqrt(r)
  return {
    "first_update_loss_ratio": r,
    "lr_curvature_at_least": curvature,
    "suggested_factor": _nice(1.0 / curvature),
  }


def _with_lr_estimate(f: Finding, h: History) -> Finding:
  """``f`` with :func:`_first_update_estimate`'s values and, first in its advice, the
  learning rate it suggests; ``f`` itself when there is no estimate."""
  est = _first_update_estimate(h)
  if est is None:
    return f
  factor, lr = est["suggested_factor"], h.config.get("lr")
  to = f" (from {_fmt(lr)} to {_fmt(lr * factor)})" if isinstance(lr, int | float) else ""
  tip = (
    f"lower the learning rate by about ×{factor:g}{to}: the first update multiplied the "
    f"squared loss by {_fmt(est['first_update_loss_ratio'])}, so lr·λ_max ≥ "
    f"{_fmt(est['lr_curvature_at_least'])} (stable below 2)"
  )
  evidence = {**f.evidence, "values": {**f.evidence["values"], **est}}
  return dataclasses.replace(f, evidence=evidence, advice=[tip, *f.advice])


def _rule_divergence(h: History, th: Thresholds) -> list[Finding]:
  """Divergence: the loss becomes non-finite or explodes.

  Measures the first step ``s*`` where ``loss`` is non-finite or exceeds
  ``divergence_factor × |loss_0|`` (``loss_0`` the first finite loss), and the first
  per-layer value (any ``{topic}/{stat}/{layer}`` key) that is non-finite, or a
  ``*/nonfinite_fraction/*`` above 0, at or before ``s*``: the layer where the NaN/Inf
  started. When the loss stays finite but per-layer values are non-finite, that is
  reported too. An explosion the run recovers from (finite afterwards, the last stretch
  below the initial loss) is the info ``"catapult"`` instead (:func:`_catapult`). A run
  stopped by ``--stop-on divergence`` before it recorded a non-finite
  step (a ``stop/nonfinite_loss`` or ``stop/nonfinite_batch`` record) is reported at that
  step. Critical. Source: the lecture's "loss explodes / NaN" shape.
  """
  div = _divergence_step(h, th)
  stopped = _stop_record(h)
  if stopped is not None and (div is None or stopped[0] < div):
    return [_with_lr_estimate(_stopped_finding(*stopped), h)]
  if div is None and (s := _series(h, "loss")) is not None and (c := _catapult(s[1], th)):
    return [_catapult_finding(s[0], s[1], c, th)]
  first, layers = _first_nonfinite(h, div)
  if first is None and div is not None:
    # The loss exploded before anything was non-finite: the NaN/Inf, if one followed,
    # and the layer it started in are still what the user needs to know.
    first, _ = _first_nonfinite(h, None)
  if div is None and first is None:
    return []
  values: dict[str, Any] = {}
  if first is not None:
    values.update(
      first_nonfinite_step=first[0], first_nonfinite_key=first[1], first_nonfinite_layer=first[2]
    )
  where = (
    f"; the first non-finite per-layer value is {first[1]!r} (layer {first[2]}) at step {first[0]}"
    if first is not None
    else ""
  )
  if div is not None:
    steps, loss = _series(h, "loss")  # type: ignore[misc]
    at = float(loss[np.searchsorted(steps, div)])
    finite = loss[np.isfinite(loss)]
    initial = float(finite[0]) if finite.size else float("nan")
    values.update(initial_loss=initial, loss_at_step=at, divergence_step=div)
    what = (
      f"is {_nonfinite_name(at)}"
      if not np.isfinite(at)
      else (f"is {_fmt(at)}, above {_fmt(th.divergence_factor)} × the initial {_fmt(initial)}")
    )
    later = ~np.isfinite(loss) & (steps > div)
    if np.isfinite(at) and later.any():
      nan_at = int(steps[np.argmax(later)])
      values.update(nonfinite_loss_step=nan_at)
      what += f"; from step {nan_at} it is {_nonfinite_name(loss[np.argmax(later)])}"
    summary = f"The loss diverges: at step {div} it {what}{where}."
    # Certain when the loss (or a value inside the network) is non-finite; an explosion by
    # its factor over divergence_factor × the initial loss.
    nonfinite = not np.isfinite(at) or later.any() or first is not None
    margin = math.inf if nonfinite else _margin(at, th.divergence_factor * abs(initial), above=True)
    found = _finding(
      "divergence",
      "critical",
      summary,
      metric="loss",
      layers=layers,
      steps=[div],
      values=values,
      confidence=_confidence(margin),
    )
    return [_with_lr_estimate(found, h)]
  assert first is not None
  summary = f"Non-finite values inside the network while the loss stays finite{where}."
  return [
    _finding(
      "divergence",
      "critical",
      summary,
      metric=first[1],
      layers=layers,
      steps=[first[0]],
      values=values,
      confidence="high",
    )
  ]
