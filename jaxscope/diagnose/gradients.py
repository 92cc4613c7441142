"""Rules on the per-layer gradients and updates: vanishing and exploding gradients through
depth, the update/weight ratio ``‖Δθ‖/‖θ‖`` far from ``1e-3``, layers that stopped moving,
updates lost to the rounding of low-precision parameters.

They read ``grads/norm/{layer}`` and ``updates/ratio/{layer}``, and look at the weight
matrices when any are recorded (see :data:`~jaxscope.diagnose.series._WEIGHT_NAMES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
from jaxscope.diagnose.loss import _fits, _last_stretch_fit, _rule_early_plateau
from jaxscope.diagnose.series import (
  _finite,
  _head,
  _layer_tail_medians,
  _layers,
  _series,
  _tail,
)
from jaxscope.record import History

# --------------------------------------------------------------------------- gradients


def _depth_ratio(
  h: History, th: Thresholds, first: str, last: str, prefix: str = "grads/norm"
) -> Finding | None:
  """``"vanishing_gradients"`` or ``"exploding_gradients"`` from the median of
  ``‖g_first‖/‖g_last‖`` at the common finite steps of the last half, or ``None``."""
  s1 = _series(h, f"{prefix}/{first}")
  s2 = _series(h, f"{prefix}/{last}")
  assert s1 is not None and s2 is not None
  common, i1, i2 = np.intersect1d(s1[0], s2[0], return_indices=True)
  if not common.size:
    return None
  num, den = s1[1][i1], s2[1][i2]
  ok = np.isfinite(num) & np.isfinite(den) & (den > 0)
  c_steps, ratio = _tail(common[ok], num[ok] / den[ok], 0.5)
  if ratio.size < max(th.min_points, 1):
    return None
  med = float(np.median(ratio))
  if med < th.vanishing_ratio:
    name, title, word, bound = "vanishing_gradients", "Vanishing", "below", th.vanishing_ratio
  elif med > th.exploding_ratio:
    name, title, word, bound = "exploding_gradients", "Exploding", "above", th.exploding_ratio
  else:
    return None
  margin = _margin(med, bound, above=word == "above")
  vals = {
    "median_ratio": med,
    f"median/{first}": float(np.median(_tail(common[ok], num[ok], 0.5)[1])),
    f"median/{last}": float(np.median(_tail(common[ok], den[ok], 0.5)[1])),
  }
  summary = (
    f"{title} gradients: the gradient norm of the first layer {first} is "
    f"{_fmt(med)} × that of the last layer {last} (median over the last half, "
    f"{word} {_fmt(bound)})."
  )
  return _finding(
    name,
    "warning",
    summary,
    metric=[f"{prefix}/{first}", f"{prefix}/{last}"],
    layers=[first, last],
    steps=[c_steps[0]],
    values=vals,
    confidence=_confidence(margin, ratio.size, th.min_points),
  )


def _growth(
  h: History, th: Thresholds, layers: Sequence[str], prefix: str = "grads/norm"
) -> Finding | None:
  """``"exploding_gradients"`` when some layer's gradient norm (median of the last 10 % of
  its steps) exceeds ``exploding_growth ×`` its median over the first 10 %, or ``None``."""
  growing: dict[str, float] = {}
  first_step: list[int] = []
  points: list[int] = []
  for lay in layers:
    steps, values = _finite(*_series(h, f"{prefix}/{lay}"))  # type: ignore[misc]
    if steps.size < th.min_points:
      continue
    _, head = _head(steps, values, 0.1)
    t_steps, tail = _tail(steps, values, 0.1)
    h0, h1 = float(np.median(head)), float(np.median(tail))
    if h0 > 0 and h1 > th.exploding_growth * h0:
      growing[lay] = h1 / h0
      first_step.append(int(t_steps[0]))
      points.append(int(steps.size))
  if not growing:
    return None
  names = list(growing)
  top = max(growing.values())
  summary = (
    f"Exploding gradients: the gradient norm of {len(names)} layer(s) "
    f"({', '.join(names[:5])}{', …' if len(names) > 5 else ''}) grows by up to "
    f"{_fmt(top)} × from the first to the last 10 % of the run (more than "
    f"{_fmt(th.exploding_growth)} ×)."
  )
  return _finding(
    "exploding_gradients",
    "warning",
    summary,
    metric=[f"{prefix}/{lay}" for lay in names],
    layers=names,
    steps=[min(first_step)],
    values={f"growth/{lay}": g for lay, g in growing.items()},
    confidence=_confidence(
      _margin(max(growing.values()), th.exploding_growth, above=True), max(points), th.min_points
    ),
  )


def _left_flat_start(h: History, th: Thresholds) -> bool:
  """The loss plateaued early (:func:`~jaxscope.diagnose.loss._rule_early_plateau`) and the
  run ends fitting the data (:func:`~jaxscope.diagnose.loss._last_stretch_fit`)."""
  if not _rule_early_plateau(h, th):
    return False
  fit = _last_stretch_fit(h, th)
  return fit is not None and fit.far is None


def _rule_gradients(h: History, th: Thresholds) -> list[Finding]:
  """Vanishing and exploding gradients through depth.

  With ``grads/norm/{layer}`` of at least two (weight) layers in depth order: the ratio
  ``‖g_first‖/‖g_last‖`` of the input-side to the output-side layer at their common steps
  of the last half, its median below ``vanishing_ratio`` → ``"vanishing_gradients"``
  (an info when the run still fits the data, :func:`~jaxscope.diagnose.loss._fits`, as
  for dead or saturated units: the small gradients do not hold training back), above
  ``exploding_ratio`` → ``"exploding_gradients"``. Independently, for any layer,
  the median norm of the last 10 % of its steps above ``exploding_growth ×`` the median of
  the first 10 % (positive) → ``"exploding_gradients"``, unless the run left a flat start
  (:func:`_left_flat_start`): gradients that grew from the tiny ones of an early plateau
  while the run came to fit the data are a network leaving a flat region (a small
  initialisation), not an explosion. Warnings. Source: the lecture's
  vanishing/exploding gradients; per-layer gradient norms as in ikkuna. A run with only
  the instruments' ``cockpit/grad_norm/{leaf}`` is read from those.
  """
  topic, stat = "grads", "norm"
  if not _layers(h, topic, stat) and _layers(h, "cockpit", "grad_norm"):
    topic, stat = "cockpit", "grad_norm"
  prefix = f"{topic}/{stat}"
  layers = _layers(h, topic, stat, weights=True)
  if not layers:
    return []
  findings: list[Finding] = []
  if len(layers) >= 2:
    depth = _depth_ratio(h, th, layers[0], layers[-1], prefix)
    if depth is not None and depth.name == "vanishing_gradients":
      depth = _info_when_fitting(h, th, depth, "they do not hold training back")
    if depth is not None:
      findings.append(depth)
  if not any(f.name == "exploding_gradients" for f in findings):
    growth = _growth(h, th, _layers(h, topic, stat), prefix)
    if growth is not None and not _left_flat_start(h, th):
      findings.append(growth)
  return findings


# --------------------------------------------------------------------------- update ratio


def _stalled(h: History, th: Thresholds) -> tuple[list[str], dict[str, float], int | None, int]:
  """Stalled weight layers (while another moves), their maxima, the first step of the
  window and the fewest points a stalled layer's window holds (at least ``min_points``)."""
  layers = _layers(h, "updates", "ratio", weights=True)
  maxima: dict[str, float] = {}
  moving = False
  first: int | None = None
  points = 0
  for lay in layers:
    steps, values = _finite(*_series(h, f"updates/ratio/{lay}"))  # type: ignore[misc]
    if steps.size == 0:
      continue
    t_steps, tail = _tail(steps, values, th.stall_fraction)
    top = float(np.max(np.abs(tail)))
    if top >= th.stall_ratio:
      moving = True
    elif tail.size >= max(th.min_points, 1):
      maxima[lay] = top
      first = int(t_steps[0]) if first is None else min(first, int(t_steps[0]))
      points = min(points, int(tail.size)) if points else int(tail.size)
  if not moving:
    return [], {}, None, 0
  return list(maxima), maxima, first, points


def _rule_update_ratio(h: History, th: Thresholds) -> list[Finding]:
  """Update/weight ratio ``‖Δθ‖/‖θ‖`` per layer far from the target ``1e-3``.

  The median of ``updates/ratio/{layer}`` over the last half of its steps after the first
  ``ratio_warmup`` steps (the early transient, when the ratios of a healthy run are
  naturally high), with at least ``min_points`` points, per weight layer: above
  ``ratio_high`` → ``"update_ratio_high"`` (learning rate too high for the layer); below
  ``ratio_low`` → ``"update_ratio_low"`` (too low, the layer hardly learns; layers
  reported as stalled are left out). Warnings; the confidence from the worst layer.
  Source: the ikkuna thesis (update ratio around 1e-3, Karpathy's rule of thumb).
  """
  layers = _layers(h, "updates", "ratio", weights=True)
  stalled = set(_stalled(h, th)[0])
  med, first, points = _layer_tail_medians(
    h, "updates/ratio", layers, warmup=th.ratio_warmup, min_points=th.min_points
  )
  findings: list[Finding] = []
  for name, pick, word, bound in (
    ("update_ratio_high", lambda m: m > th.ratio_high, "above", th.ratio_high),
    ("update_ratio_low", lambda m: m < th.ratio_low, "below", th.ratio_low),
  ):
    bad = [lay for lay, m in med.items() if pick(m) and lay not in stalled]
    if not bad:
      continue
    above = name == "update_ratio_high"
    margin = max(_margin(med[lay], bound, above=above) for lay in bad)
    worst = max(bad, key=lambda lay: _margin(med[lay], bound, above=above))
    shown = ", ".join(f"{lay} {_fmt(med[lay])}" for lay in bad[:5])
    summary = (
      f"Update/weight ratio {word} {_fmt(bound)} in {len(bad)} layer(s) (median over the "
      f"last half: {shown}{', …' if len(bad) > 5 else ''}; target ≈ 1e-3)."
    )
    values: dict[str, Any] = {f"median/{lay}": m for lay, m in med.items()}
    tips = [] if above else _raise_lr_tip(med, th, values)
    findings.append(
      _finding(
        name,
        "warning",
        summary,
        metric=[f"updates/ratio/{lay}" for lay in bad],
        layers=bad,
        steps=[min(first[lay] for lay in bad)],
        values=values,
        confidence=_confidence(margin, points[worst], th.min_points),
        advice=tips,
      )
    )
  return findings


def _raise_factor(median: float, th: Thresholds) -> float:
  """The learning-rate factor that brings an update ratio ``median`` to a healthy run's
  (``lr_target_ratio``), at least ×2, to one significant digit; ``lr_too_low`` and
  ``update_ratio_low`` state it."""
  return _nice(max(2.0, th.lr_target_ratio / median))


def _raise_lr_tip(med: dict[str, float], th: Thresholds, values: dict[str, Any]) -> list[str]:
  """The learning-rate factor that brings the median layer's update ratio to a healthy
  run's (``lr_target_ratio``, at least ×2), as ``lr_too_low`` states it: added to
  ``values`` as ``suggested_factor`` and returned as an advice line; none when the median
  layer does not move at all."""
  median = float(np.median(list(med.values())))
  if not median > 0:
    return []
  factor = _raise_factor(median, th)
  values["suggested_factor"] = factor
  return [
    f"raise the learning rate by about ×{factor:g}: the median layer's ratio "
    f"{_fmt(median)} is that far below a healthy run's ≈ {_fmt(th.lr_target_ratio)}"
  ]


def _rule_stalled_layers(h: History, th: Thresholds) -> list[Finding]:
  """Layers that stopped moving while others still move.

  A weight layer whose ``updates/ratio/{layer}`` stays below ``stall_ratio`` (absolute)
  at every step of the last ``stall_fraction`` of its steps (at least ``min_points``),
  while at least one other layer is above it. Warning; an info when the run still fits
  the data (:func:`~jaxscope.diagnose.loss._fits`): then the layers do not hold training
  back, as with layers frozen on purpose for fine-tuning. Source: ikkuna's per-layer
  update ratio; the capacity thesis's frozen layers.
  """
  layers, maxima, first, points = _stalled(h, th)
  if not layers:
    return []
  margin = min(_margin(m, th.stall_ratio, above=False) for m in maxima.values())
  summary = (
    f"{len(layers)} layer(s) stopped moving ({', '.join(layers[:5])}"
    f"{', …' if len(layers) > 5 else ''}): ‖Δθ‖/‖θ‖ < {_fmt(th.stall_ratio)} over the last "
    f"{th.stall_fraction:.0%} of the steps while other layers still move (expected only "
    "for layers frozen on purpose)."
  )
  found = _finding(
    "stalled_layers",
    "warning",
    summary,
    metric=[f"updates/ratio/{lay}" for lay in layers],
    layers=layers,
    steps=[first],
    values={f"max/{lay}": m for lay, m in maxima.items()},
    confidence=_confidence(margin, points, th.min_points),
  )
  return [_info_when_fitting(h, th, found, "they do not hold training back")]


def _info_when_fitting(h: History, th: Thresholds, found: Finding, why: str) -> Finding:
  """``found`` as an info, its summary saying how the run fits the data and ``why`` that
  matters, when the run still fits the data (:func:`~jaxscope.diagnose.loss._fits`);
  else ``found`` unchanged. The info keeps the warning's summary in
  ``values["warning_summary"]``: :func:`~jaxscope.diagnose.registry.diagnose` makes it a
  warning again when another alarm is raised (:data:`INFO_UNLESS_ALARMED`)."""
  fit = _fits(h, th)
  if fit is None:
    return found
  evidence = dict(found.evidence)
  evidence["values"] = {**dict(evidence.get("values", {})), "warning_summary": found.summary}
  summary = f"{found.summary} The run still fits the data ({fit}): {why}."
  return dataclasses.replace(found, severity="info", summary=summary, evidence=evidence)


#: Findings that are infos only while the run fits the data *and* no other alarm is
#: raised: with one, the run has a problem and these layers are among its possible causes.
INFO_UNLESS_ALARMED = frozenset({"stalled_layers", "vanishing_gradients"})


def _alarmed_again(findings: list[Finding]) -> list[Finding]:
  """``findings`` with the infos of :data:`INFO_UNLESS_ALARMED` made warnings again
  (their warning summary and a note) when another finding is an alarm (critical or
  warning). The run is then flagged either way; what changes is which causes it names."""
  others = [
    f.name
    for f in findings
    if f.severity in ("critical", "warning") and f.name not in INFO_UNLESS_ALARMED
  ]
  if not others:
    return findings
  out = []
  for f in findings:
    base = f.evidence.get("values", {}).get("warning_summary")
    if f.name in INFO_UNLESS_ALARMED and f.severity == "info" and base is not None:
      named = ", ".join(sorted(set(others)))
      note = f" The run fits the data, but {named} also fired: these may be among its causes."
      f = dataclasses.replace(f, severity="warning", summary=base + note)
    out.append(f)
  return out


# --------------------------------------------------------------------------- lost updates


def _rule_lost_updates(h: History, th: Thresholds) -> list[Finding]:
  """Updates that do not land: the parameters' dtype rounds them away.

  Per layer, the median of ``updates/lost_fraction/{layer}`` (the fraction of non-zero
  updates that leave the stored parameter unchanged, :func:`jaxscope.metrics.lost_fraction`)
  over the last half of its steps (at least ``min_points``) above ``lost_fraction``,
  → ``"lost_updates"``, with the realised ratio ``updates/realised_ratio/{layer}`` beside
  the intended ``updates/ratio/{layer}`` when recorded. Warning. Typical of bfloat16 parameters (8
  mantissa bits: an update below ``2⁻⁹ |θᵢ|`` rounds to nothing) with a small learning rate.
  """
  layers = _layers(h, "updates", "lost_fraction")
  med, first, points = _layer_tail_medians(
    h, "updates/lost_fraction", layers, min_points=th.min_points
  )
  bad = [lay for lay, m in med.items() if m > th.lost_fraction]
  if not bad:
    return []
  worst = max(bad, key=lambda lay: med[lay])
  margin = _margin(med[worst], th.lost_fraction, above=True)
  confidence = _confidence(margin, points[worst], th.min_points)
  realised = _layer_tail_medians(h, "updates/realised_ratio", bad).med
  intended = _layer_tail_medians(h, "updates/ratio", bad).med
  shown = ", ".join(f"{lay} {med[lay]:.0%}" for lay in bad[:5])
  summary = (
    f"Updates lost to rounding in {len(bad)} layer(s): more than {th.lost_fraction:.0%} of "
    f"the non-zero updates leave the stored parameters unchanged (median over the last "
    f"half: {shown}{', …' if len(bad) > 5 else ''})."
  )
  values = {f"median/{lay}": med[lay] for lay in bad}
  values.update({f"realised_ratio/{lay}": v for lay, v in realised.items()})
  values.update({f"intended_ratio/{lay}": v for lay, v in intended.items()})
  return [
    _finding(
      "lost_updates",
      "warning",
      summary,
      metric=[f"updates/lost_fraction/{lay}" for lay in bad],
      layers=bad,
      steps=[min(first[lay] for lay in bad)],
      values=values,
      confidence=confidence,
    )
  ]
