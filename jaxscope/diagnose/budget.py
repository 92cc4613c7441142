"""Rule on the run's length: too few steps, read from the loss still falling at the end, or
from updates still as large as in the first steps of a run too short to settle.

It reads ``loss`` (and ``test/loss`` at the first step, the initial loss) and, for runs too
short for the update-ratio rules, ``updates/ratio/{layer}``. A run that diverged is not
judged: it broke, it did not stop too early.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxscope.diagnose.divergence import _divergence_step, _initial_test_loss, _stable_loss
from jaxscope.diagnose.finding import Finding, Thresholds, _confidence, _finding, _fmt, _margin
from jaxscope.diagnose.series import (
  _finite,
  _layer_tail_medians,
  _layers,
  _rel_drop,
  _series,
  _tail,
)
from jaxscope.record import History


def _still_falling(
  th: Thresholds, t_steps: np.ndarray, t_loss: np.ndarray, first: float
) -> tuple[float, str, dict[str, float]] | None:
  """``(margin, sentence, values)`` when the line through the last stretch falls by more
  than ``still_improving`` of the whole improvement from ``first`` and by at least
  ``plateau_rel_change`` of its own start, else ``None``."""
  t_start, t_end, drop = _rel_drop(t_steps, t_loss)
  total = first - t_end
  if total <= 0 or drop < th.plateau_rel_change:
    return None  # No improvement to speak of, or a last stretch on a plateau (late_plateau).
  recent = (t_start - t_end) / total
  if recent <= th.still_improving:
    return None
  sentence = (
    f"the loss is still falling at the end: over steps {int(t_steps[0])}–{int(t_steps[-1])} "
    f"it goes from {_fmt(t_start)} to {_fmt(t_end)}, {recent:.0%} of the run's whole "
    f"improvement (more than {th.still_improving:.0%})"
  )
  margin = min(
    _margin(recent, th.still_improving, above=True),
    _margin(drop, th.plateau_rel_change, above=True),
  )
  values = {"recent_fraction": recent, "start": t_start, "end": t_end, "first": first}
  return margin, sentence, values


def _still_moving(
  h: History, th: Thresholds, t_steps: np.ndarray
) -> tuple[float, str, dict[str, float]] | None:
  """``(margin, sentence, values)`` when the run is too short for the update-ratio rules
  (no weight layer has ``min_points`` ratios in the last half of its steps after
  ``ratio_warmup``) and a weight layer's median ``updates/ratio`` over the last stretch
  (from ``t_steps[0]``, at least ``len(t_steps)`` points) is above ``transient_ratio``: the run
  stopped in its early transient, while the parameters still moved fast; else ``None``."""
  layers = _layers(h, "updates", "ratio", weights=True)
  settled = _layer_tail_medians(
    h, "updates/ratio", layers, warmup=th.ratio_warmup, min_points=th.min_points
  )
  if not layers or settled.med:
    return None  # Long enough: update_ratio_high judges the ratios.
  med: dict[str, float] = {}
  for lay in layers:
    steps, values = _finite(*_series(h, f"updates/ratio/{lay}"))  # type: ignore[misc]
    last = values[steps >= t_steps[0]]
    if last.size >= t_steps.size:
      med[lay] = float(np.median(last))
  high = {lay: m for lay, m in med.items() if m > th.transient_ratio}
  if not high:
    return None
  shown = ", ".join(f"{lay} {_fmt(m)}" for lay, m in list(high.items())[:5])
  sentence = (
    f"the run ended inside its early transient: the update/weight ratio over its last "
    f"steps is still above {_fmt(th.transient_ratio)} ({shown}; a run settles near 1e-3 after "
    f"its first {th.ratio_warmup} steps)"
  )
  values = {f"median_ratio/{lay}": m for lay, m in high.items()}
  return _margin(max(high.values()), th.transient_ratio, above=True), sentence, values


def _rule_too_few_steps(h: History, th: Thresholds) -> list[Finding]:
  """Too few steps: the run stopped before it converged.

  On the finite loss of a run that did not diverge, with at least ``2 × tail_min_points``
  points: the last stretch is its last ``late_fraction``, widened to the last
  ``tail_min_points`` points when it holds fewer (so a 12-step run is judged on its last 5
  steps, a 150-step run on its last 30). Either piece of evidence is enough:

  * **still falling** (:func:`_still_falling`): a least-squares line through the stretch
    (in ``log(loss)`` when positive, :func:`_rel_drop`) falls by more than
    ``still_improving`` of the run's whole improvement (from the initial loss to the
    line's end; the initial loss is the test loss evaluated at the first step when
    recorded, else the median of the first five training losses, which a fast first fall
    makes too low), and by at least ``plateau_rel_change`` of its own start (less is a
    plateau: a run that never learnt shows noise there, not progress);
  * **still moving** (:func:`_still_moving`): a run too short for the update-ratio rules
    (fewer than ``ratio_warmup`` steps plus their minimum evidence) whose update/weight
    ratio over the stretch is above ``transient_ratio`` in some weight layer: it stopped in the
    early transient where every run's ratios are high (the evidence that
    ``update_ratio_high`` no longer takes from short runs).

  Warning. Confidence: the larger margin (still falling: the smaller of ``recent /
  still_improving`` and ``drop / plateau_rel_change``; still moving: the ratio over
  ``transient_ratio``), on the stretch's points. Source: "too few epochs", one of the most
  common real faults of the DeepFD study.
  """
  if _divergence_step(h, th) is not None:
    return []
  s = _stable_loss(h, th)
  need = max(th.tail_min_points, 2)
  if s is None or s[0].size < 2 * need:
    return []
  steps, loss = s
  t_steps, t_loss = _tail(steps, loss, th.late_fraction)
  if t_steps.size < need:
    t_steps, t_loss = steps[-need:], loss[-need:]
  initial = _initial_test_loss(h, th)
  first = initial[1] if initial is not None else float(np.median(loss[:5]))
  found = [
    e for e in (_still_falling(th, t_steps, t_loss, first), _still_moving(h, th, t_steps)) if e
  ]
  if not found:
    return []
  sentences = "; ".join(e[1] for e in found)
  summary = f"Too few steps: {sentences}. The run stopped before it converged."
  values: dict[str, Any] = {}
  metric = ["loss"]
  for e in found:
    values.update(e[2])
    metric += [f"updates/ratio/{k.split('/', 1)[1]}" for k in e[2] if k.startswith("median_")]
  return [
    _finding(
      "too_few_steps",
      "warning",
      summary,
      metric=metric,
      steps=[t_steps[0], t_steps[-1]],
      values=values,
      confidence=_confidence(max(e[0] for e in found), t_steps.size, need),
    )
  ]
