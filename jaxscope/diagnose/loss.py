"""Rules on the loss curves: oscillation and instability, early and late plateaus,
overfitting, a loss that does not match the output (the divergence rule is in
:mod:`jaxscope.diagnose.divergence`).

They read ``loss``, ``train/accuracy`` and ``test/loss``, and look only at the finite loss
before the divergence step (if any).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from jaxscope.diagnose.divergence import (
  _catapult,
  _divergence_step,
  _initial_test_loss,
  _stable_loss,
)
from jaxscope.diagnose.finding import Finding, Thresholds, _confidence, _finding, _fmt, _margin
from jaxscope.diagnose.regularisation import DecayShare, _held_by_decay
from jaxscope.diagnose.series import (
  _acf_period,
  _finite,
  _head,
  _moving_median,
  _rel_drop,
  _series,
  _slope,
  _tail,
)
from jaxscope.record import History

# --------------------------------------------------------------------------- oscillation


class _Residual(NamedTuple):
  """The detrended loss that the oscillation and instability analyses read."""

  y: np.ndarray
  """``log(loss)`` (positive loss) or the loss, reduced to block maxima."""
  resid: np.ndarray
  """``y`` minus its trend (a centred moving median over ``window`` samples)."""
  dt: float
  """Steps per sample of ``y``."""
  block: int
  """Samples of the recorded loss per sample of ``y``."""
  window: int
  """The trend window in samples (odd)."""
  use_log: bool
  """Whether ``y`` is ``log(loss)``."""


def _loss_residual(steps: np.ndarray, loss: np.ndarray, th: Thresholds) -> _Residual:
  """The loss in the log domain when positive, reduced to at most ``max_points`` block
  maxima (which keep the spikes), minus a moving median over ``trend_fraction`` of it."""
  use_log = bool(np.all(loss > 0))
  y = np.log(loss) if use_log else loss.copy()
  dt = float(np.median(np.diff(steps))) if steps.size > 1 else 1.0
  dt = dt if dt > 0 else 1.0
  block = max(1, math.ceil(y.size / th.max_points))
  if block > 1:
    m = y.size // block * block
    y = y[:m].reshape(-1, block).max(axis=1)  # The maximum keeps the spikes.
    dt *= block
  window = max(5, int(th.trend_fraction * y.size)) | 1
  return _Residual(y, y - _moving_median(y, window, edge="linear"), dt, block, window, use_log)


def _periodic_spikes(steps: np.ndarray, res: _Residual, th: Thresholds) -> Finding | None:
  """The ``"oscillation"`` finding of a significant periodogram peak, or ``None``."""
  n, dt = res.y.size, res.dt
  r = res.resid - res.resid.mean()
  power = np.abs(np.fft.rfft(r)) ** 2
  k = np.arange(power.size)
  ref = float(np.median(power[1:])) if power.size > 1 else 0.0
  top = float(power[1:].max()) if power.size > 1 else 0.0
  if top <= 0:
    return None
  ref = max(ref, 1e-12 * top)
  period = n * dt / np.maximum(k, 1)
  in_range = (k >= 4) & (period >= th.min_period) & (period <= n * dt / 4)
  sig = np.flatnonzero(in_range & (power > th.spike_power_ratio * ref))
  if not sig.size:
    return None
  kk = int(sig[np.argmax(power[sig])])
  lag = _acf_period(r, max(th.min_period / dt, 2.0), n / 4)
  period_steps = (lag if lag is not None else n / kk) * dt
  ratio = float(power[kk] / ref)
  summary = (
    f"The loss oscillates with a period of about {period_steps:.3g} steps "
    f"(spectral peak {ratio:.3g} × the median power)."
  )
  return _finding(
    "oscillation",
    "warning",
    summary,
    metric="loss",
    steps=[int(steps[0])],
    values={"period_steps": period_steps, "power_ratio": ratio, "log_domain": res.use_log},
    confidence=_confidence(_margin(ratio, th.spike_power_ratio, above=True), n, th.min_series),
  )


def _instability(
  steps: np.ndarray, res: _Residual, th: Thresholds, quiet: tuple[int, int] | None = None
) -> Finding | None:
  """The ``"instability"`` finding when too many points spike above the trend, or ``None``;
  spikes in the samples ``quiet = (start, stop)`` (a catapult) do not count."""
  resid = res.resid
  # The scale: a moving MAD over twice the trend window, at least a quarter of the global
  # MAD (a few equal residuals near the edges must not make the scale vanish).
  mad = _moving_median(np.abs(resid), 2 * res.window + 1, edge=False)
  floor = max(0.25 * float(np.median(np.abs(resid))), 1e-12 * float(np.max(np.abs(res.y))), 1e-300)
  if resid.size < th.instability_min_points:
    return None
  rel = math.log1p(th.spike_min_rel) if res.use_log else th.spike_min_rel * np.abs(res.y - resid)
  spikes = (resid > th.spike_factor * np.maximum(mad, floor)) & (resid > rel)
  if quiet is not None:
    spikes[quiet[0] : quiet[1]] = False
  frac = float(spikes.mean())
  events = int(spikes[0]) + int(np.count_nonzero(spikes[1:] & ~spikes[:-1]))
  if frac <= th.instability_fraction or events < th.instability_min_events:
    return None
  idx = np.flatnonzero(spikes)
  spike_steps = steps[idx * res.block]  # The first step of each spiking block.
  summary = (
    f"The loss is unstable: {frac:.1%} of the steps jump above the running median by more "
    f"than {_fmt(th.spike_factor)} × its median absolute deviation."
  )
  return _finding(
    "instability",
    "warning",
    summary,
    metric="loss",
    steps=spike_steps,
    values={
      "spike_fraction": frac,
      "num_spikes": int(idx.size),
      "spike_events": events,
      "log_domain": res.use_log,
    },
    confidence=_confidence(
      _margin(frac, th.instability_fraction, above=True), resid.size, th.instability_min_points
    ),
  )


def _rule_oscillation(h: History, th: Thresholds) -> list[Finding]:
  """Oscillation (periodic spikes) and non-periodic instability of the loss.

  On the finite loss before any divergence (``log(loss)`` when positive; series longer
  than ``max_points`` reduced to the maximum of each block), the trend is a moving median over
  ``trend_fraction`` of the series and ``r`` the residual. Periodic: the periodogram
  ``|rfft(r − mean r)|²``; a bin at a period between ``min_period`` steps and a quarter of
  the run whose power exceeds ``spike_power_ratio ×`` the median power (bins 1…n/2) is
  significant; the reported period is the first strong autocorrelation peak (see
  :func:`_acf_period`), which finds the fundamental of a spike train rather than one of
  its equally strong harmonics (fallback: the strongest bin). Warning ``"oscillation"``.
  Instability (only without a periodic finding): the fraction of points with
  ``r > spike_factor × MAD`` (MAD a moving median of ``|r|`` over twice the trend
  window, at least a quarter of the global median of ``|r|``) and ``r`` above
  ``log(1 + spike_min_rel)`` (a jump of at least ``spike_min_rel`` of the trend) exceeds
  ``instability_fraction`` in at least ``instability_min_events`` separate runs of
  spiking points, judged on at least ``instability_min_points`` points (minimum
  evidence); the excursion of a catapult (:func:`_catapult`) does not count. Warning
  ``"instability"``.
  Source: the lecture's "periodic spikes: online learning on unshuffled or imbalanced
  data" and "unstable loss: stuck between minima, large gradients".
  """
  s = _stable_loss(h, th)
  if s is None or s[0].size < th.min_series:
    return []
  steps, loss = s
  res = _loss_residual(steps, loss, th)
  quiet = None
  if (c := _catapult(loss, th)) is not None:
    # The catapult's excursion (from the start of its rise until the loss is back within
    # spike_min_rel of where it started) is one event, reported on its own: its bumps are
    # not instability.
    k, peak, _ = c
    while k > 0 and loss[k - 1] < loss[k]:
      k -= 1  # The rise starts where the loss stopped falling.
    back = np.flatnonzero(loss[peak:] <= (1 + th.spike_min_rel) * loss[k])
    end = peak + (int(back[0]) if back.size else loss.size)
    quiet = (k // res.block, -(-end // res.block))
  found = _periodic_spikes(steps, res, th) or _instability(steps, res, th, quiet)
  return [found] if found is not None else []


# --------------------------------------------------------------------------- plateaus, overfitting


def _rule_early_plateau(h: History, th: Thresholds) -> list[Finding]:
  """Early plateau: the loss barely falls at the start.

  Over the first ``early_fraction`` of the (finite, pre-divergence) loss, with at least
  ``min_points`` points, the relative drop ``(start − end)/|start|`` of a least-squares
  line through the window (in ``log(loss)`` when positive) is below
  ``plateau_rel_change`` in size (a loss that rises by more is no plateau), and so is the
  drop from the initial test loss (``test/loss``
  evaluated at the first step, when recorded) to the line's end: a loss that fell fast in
  its first steps and then wanders in minibatch noise is not a plateau (the line through
  the window is flat, but the loss is far below where it started). Warning, or info when
  the run left the plateau: its last stretch fits the data
  (:func:`_last_stretch_fit`, the test of ``late_plateau``) at a loss below the plateau's
  end. A slow start the run recovered from cost steps, not the result (issue 21: deep
  nets with a small initialisation that ended at or better than the healthy runs' loss
  were flagged). Confidence: ``plateau_rel_change`` over the larger drop, on the
  window's points. Source: the lecture's "plateau at the start: bad initialisation".
  """
  s = _stable_loss(h, th)
  if s is None:
    return []
  steps, loss = _head(*s, th.early_fraction)
  if steps.size < th.min_points:
    return []
  start, end, drop = _rel_drop(steps, loss)
  initial = _initial_test_loss(h, th)
  if initial is not None and initial[1] != 0:
    drop = max(drop, (initial[1] - end) / abs(initial[1]))
  if abs(drop) >= th.plateau_rel_change:  # it falls, or it rises: no plateau either way
    return []
  summary = (
    f"The loss plateaus early: over steps {int(steps[0])}–{int(steps[-1])} it goes from "
    f"{_fmt(start)} to {_fmt(end)} ({drop:.1%} drop, less than "
    f"{th.plateau_rel_change:.1%})."
  )
  fit = _last_stretch_fit(h, th)
  left = fit is not None and fit.far is None and fit.level < end
  if left:
    summary += (
      f" The run left it: its loss ends at {_fmt(fit.level)}, a fit of the data, so the "
      "slow start cost steps, not the result."
    )
  margin = _margin(drop, th.plateau_rel_change, above=False)
  return [
    _finding(
      "early_plateau",
      "info" if left else "warning",
      summary,
      metric="loss",
      steps=[steps[0], steps[-1]],
      values={"start": start, "end": end, "relative_drop": drop},
      confidence=_confidence(margin, steps.size, th.min_points),
    )
  ]


def _far_from_good(
  h: History, th: Thresholds, first_step: float, all_loss: np.ndarray, level: float
) -> tuple[str, float, dict[str, Any], list[str]] | None:
  """Whether a run whose loss from ``first_step`` on has median ``level`` is still far from
  a good fit: the loss above ``late_loss_fraction ×`` the loss of a model that learned
  nothing (``ln(num_classes)`` for a classification run that records ``num_classes``,
  else the median of the run's first five losses ``all_loss[:5]``), and, when
  ``train/accuracy`` is recorded, its median from ``first_step`` on below ``late_acc``.
  Returns ``(why, margin, values, metrics)`` or ``None`` (a good fit, or no reference)."""
  k = h.config.get("num_classes")
  chance = h.config.get("task") == "classification" and isinstance(k, int) and k > 1
  ref = math.log(k) if chance else float(np.median(all_loss[:5]))
  if ref <= 0 or level <= th.late_loss_fraction * ref:
    return None
  name = f"chance level ln({k})" if chance else "initial"
  values: dict[str, Any] = {"reference_loss": ref}
  why = f"loss {_fmt(level)} > {_fmt(th.late_loss_fraction)} × {name} {_fmt(ref)}"
  margin = _margin(level, th.late_loss_fraction * ref, above=True)
  metrics: list[str] = []
  acc = _series(h, "train/accuracy")
  if acc is not None:
    a_steps, a = _finite(*acc)
    keep = a_steps >= first_step
    div = _divergence_step(h, th)
    if div is not None:
      keep &= a_steps < div
    if keep.any():
      acc_level = float(np.median(a[keep]))
      if acc_level >= th.late_acc:
        return None
      values["train_accuracy"] = acc_level
      why = f"training accuracy {acc_level:.3g} < {_fmt(th.late_acc)}, {why}"
      margin = min(margin, _margin(acc_level, th.late_acc, above=False))
      metrics.append("train/accuracy")
  return why, margin, values, metrics


class _Fit(NamedTuple):
  """How a run fits over the last ``late_fraction`` of its stable loss."""

  steps: np.ndarray
  """The steps of that last stretch."""
  level: float
  """The median loss there."""
  far: tuple[str, float, dict[str, Any], list[str]] | None
  """:func:`_far_from_good` of the stretch: ``None`` when the run fits."""


def _last_stretch_fit(h: History, th: Thresholds) -> _Fit | None:
  """:class:`_Fit` of the run, or ``None`` without a stable loss of at least
  ``min_points`` points in its last ``late_fraction``."""
  s = _stable_loss(h, th)
  if s is None:
    return None
  steps, loss = _tail(*s, th.late_fraction)
  if steps.size < th.min_points:
    return None
  level = float(np.median(loss))
  return _Fit(steps, level, _far_from_good(h, th, steps[0], s[1], level))


def _fits(h: History, th: Thresholds) -> str | None:
  """How the run fits the data when it is not far from a good fit over the last
  ``late_fraction`` of its loss (:func:`_far_from_good`), else
  ``None`` (far from it, or no loss to judge)."""
  fit = _last_stretch_fit(h, th)
  if fit is None or fit.far is not None:
    return None
  return f"median loss {fit.level:.3g} over steps {int(fit.steps[0])}–{int(fit.steps[-1])}"


def _rule_late_plateau(h: History, th: Thresholds) -> list[Finding]:
  """Late plateau: the loss stopped improving while still far from a good fit.

  Over the last ``late_fraction`` of the (finite, pre-divergence) loss, with at least
  ``min_points`` points, the relative drop of a least-squares line through the window
  (in ``log(loss)`` when positive) is below ``plateau_rel_change``, and the run is still
  far from good (:func:`_far_from_good`): the median loss of the window above
  ``late_loss_fraction ×`` the loss of a model that learned nothing (``ln(num_classes)``,
  else the run's initial loss) and, when ``train/accuracy`` is recorded, its median over
  the window below ``late_acc``. A run that halved its loss is learning what the task and
  the model allow (MNIST-1D's MLPs level off near 60 % accuracy at 0.46 × chance level).
  Warning. Source: the lecture's "stuck early then overfitting late → decaying learning
  rate, other initialisation".

  When decoupled weight decay is at least ``decay_share`` of the weight layers' update
  ratio over the stretch (:mod:`jaxscope.diagnose.regularisation`), the plateau is where
  the regularisation holds the loss, which the run was configured for: the info
  ``regularised_plateau`` instead, with the decay's share (confidence: the share over
  ``decay_share``).
  """
  s = _stable_loss(h, th)
  if s is None:
    return []
  all_steps, all_loss = s
  steps, loss = _tail(all_steps, all_loss, th.late_fraction)
  if steps.size < th.min_points:
    return []
  start, end, drop = _rel_drop(steps, loss)
  if drop >= th.plateau_rel_change:
    return []
  far = _far_from_good(h, th, steps[0], all_loss, float(np.median(loss)))
  if far is None:
    return []
  why, far_margin, far_values, far_metrics = far
  values: dict[str, Any] = {"start": start, "end": end, "relative_drop": drop, **far_values}
  held = _held_by_decay(h, th, steps[0])
  if held is not None:
    return [_regularised_plateau(steps, drop, why, values, held, far_metrics, th)]
  margin = min(_margin(drop, th.plateau_rel_change, above=False), far_margin)
  summary = (
    f"The loss is stuck late: over steps {int(steps[0])}–{int(steps[-1])} it falls by only "
    f"{drop:.1%} while still far from a good fit ({why})."
  )
  return [
    _finding(
      "late_plateau",
      "warning",
      summary,
      metric=["loss", *far_metrics],
      steps=[steps[0], steps[-1]],
      values=values,
      confidence=_confidence(margin, steps.size, th.min_points),
    )
  ]


def _regularised_plateau(
  steps: np.ndarray,
  drop: float,
  why: str,
  values: dict[str, Any],
  held: DecayShare,
  far_metrics: list[str],
  th: Thresholds,
) -> Finding:
  """The info ``regularised_plateau``: a late plateau held by decoupled weight decay."""
  summary = (
    f"The loss levels off late (over steps {int(steps[0])}–{int(steps[-1])} it falls by "
    f"{drop:.1%}; {why}) where the weight decay holds it: lr · weight_decay = "
    f"{_fmt(held.per_step)} per step is {held.share:.0%} of the weight layers' median "
    f"update/weight ratio {_fmt(held.update_ratio)}, so the weights sit where the decay "
    "balances the gradient."
  )
  values = {
    **values,
    "decay_per_step": held.per_step,
    "update_ratio": held.update_ratio,
    "decay_share": held.share,
  }
  return _finding(
    "regularised_plateau",
    "info",
    summary,
    metric=["loss", "lr", "updates/ratio", *far_metrics],
    steps=[steps[0], steps[-1]],
    values=values,
    confidence=_confidence(
      _margin(held.share, th.decay_share, above=True), held.points, th.min_points
    ),
  )


def _train_at(steps: np.ndarray, loss: np.ndarray, at: np.ndarray) -> np.ndarray:
  """Median training loss in each interval ``(at[j-1], at[j]]`` (nearest point if empty)."""
  out = np.empty(at.size)
  prev = -np.inf
  for j, t in enumerate(at):
    sel = (steps > prev) & (steps <= t)
    if sel.any():
      out[j] = np.median(loss[sel])
    else:
      out[j] = loss[np.argmin(np.abs(steps - t))]
    prev = t
  return out


def _rule_overfitting(h: History, th: Thresholds) -> list[Finding]:
  """Overfitting: the test loss rises while the training loss does not.

  Over the last ``overfit_window`` finite evaluations of ``test/loss``, least-squares
  slopes of the test loss and of the gap ``test − train`` (train = median ``loss`` since
  the previous evaluation) are both positive, the training loss does not rise by more
  than ``overfit_rel`` (relative, fitted), and the final test loss (median of the last
  three evaluations) exceeds the minimum test loss by more than ``overfit_rel``
  (relative), with at least ``overfit_window`` evaluations after the minimum (minimum
  evidence: a rise that persists, not the last evaluations' noise; a small test set's loss
  wanders by 20 % from one evaluation to the next). Suggests early stopping at the step of
  the minimum test loss. Warning. Confidence: the rise over ``overfit_rel``, on the
  evaluations after the minimum (high from twice ``overfit_window``).
  Source: the lecture's "training loss falls, validation loss rises". In a diverged run
  only the evaluations before the divergence step count.
  """
  div = _divergence_step(h, th)
  test = _series(h, "test/loss")
  train = _series(h, "loss")
  if test is None or train is None:
    return []
  t_steps, t_loss = _finite(*test)
  tr_steps, tr_loss = _finite(*train)
  if div is not None:  # Only the part before a divergence can show overfitting.
    keep, keep_tr = t_steps < div, tr_steps < div
    t_steps, t_loss = t_steps[keep], t_loss[keep]
    tr_steps, tr_loss = tr_steps[keep_tr], tr_loss[keep_tr]
  w = th.overfit_window
  if t_steps.size < max(w, 3) or tr_steps.size == 0:
    return []
  ws, wl = t_steps[-w:], t_loss[-w:]
  tr = _train_at(tr_steps, tr_loss, ws)
  test_slope, gap_slope, train_slope = _slope(ws, wl), _slope(ws, wl - tr), _slope(ws, tr)
  span = float(ws[-1] - ws[0])
  train_rise = train_slope * span / abs(tr[0]) if tr[0] != 0 else 0.0
  best = int(np.argmin(t_loss))
  best_loss, best_step = float(t_loss[best]), int(t_steps[best])
  final = float(np.median(t_loss[-3:]))
  above = (final - best_loss) / abs(best_loss) if best_loss != 0 else math.inf
  if not (test_slope > 0 and gap_slope > 0 and train_rise <= th.overfit_rel):
    return []
  after = int(t_steps.size - 1 - best)
  if above <= th.overfit_rel or after < w:
    return []
  summary = (
    f"Overfitting: the test loss rises to {_fmt(final)}, {above:.1%} above its minimum "
    f"{_fmt(best_loss)} at step {best_step}, while the training loss does not rise; "
    f"stop early at step {best_step}."
  )
  return [
    _finding(
      "overfitting",
      "warning",
      summary,
      metric=["loss", "test/loss"],
      steps=[best_step],
      values={
        "best_step": best_step,
        "best_test_loss": best_loss,
        "final_test_loss": final,
        "test_slope": test_slope,
        "gap_slope": gap_slope,
        "train_slope": train_slope,
      },
      confidence=_confidence(_margin(above, th.overfit_rel, above=True), after, w),
    )
  ]


# --------------------------------------------------------------------------- loss vs output


def _rule_loss_output_mismatch(h: History, th: Thresholds) -> list[Finding]:
  """Loss and output do not match: the accuracy gets high while the loss stays high.

  Over the last ``late_fraction`` of a classification run (``train/accuracy`` or
  ``accuracy`` recorded, at least ``min_points`` points), the median accuracy is at least
  ``mismatch_acc`` while the median loss is still above ``mismatch_loss_fraction ×`` the
  initial loss (median of the first five points), and below it (it fell, onto a floor).
  A softmax applied before a loss that takes logits bounds the loss from below (10
  classes: ``log(1 + 9/e) ≈ 1.46`` against ``log 10 ≈ 2.30`` at the start): an MLP on
  digits so built reaches 88 % accuracy at 70 % of its initial loss, the same model on
  logits 98 % at 3 %. Warning. Source: "a loss that does not match the output
  activation", the commonest fault class of the DeepFD study.
  """
  s = _stable_loss(h, th)
  acc = _series(h, "train/accuracy") or _series(h, "accuracy")
  if s is None or acc is None or s[0].size < th.min_series:
    return []
  steps, loss = s
  first = float(np.median(loss[:5]))
  t_steps, t_loss = _tail(steps, loss, th.late_fraction)
  a_steps, a_vals = _tail(*_finite(*acc), th.late_fraction)
  if t_steps.size < th.min_points or a_steps.size < th.min_points or first <= 0:
    return []
  acc_end, loss_end = float(np.median(a_vals)), float(np.median(t_loss))
  if acc_end < th.mismatch_acc or not th.mismatch_loss_fraction * first < loss_end < first:
    return []  # (A loss above its start did not meet a floor: it rose.)
  summary = (
    f"The loss does not match the output: the accuracy reaches {acc_end:.0%} while the loss "
    f"stays at {_fmt(loss_end)}, {loss_end / first:.0%} of the initial {_fmt(first)} (a "
    "softmax before a loss that takes logits bounds the loss from below)."
  )
  values = {"accuracy": acc_end, "loss": loss_end, "initial_loss": first}
  # The accuracy is a gate (a task that is learnt); the evidence is the loss's floor.
  margin = _margin(loss_end, th.mismatch_loss_fraction * first, above=True)
  return [
    _finding(
      "loss_output_mismatch",
      "warning",
      summary,
      metric=["loss"],
      steps=[t_steps[0], t_steps[-1]],
      values=values,
      confidence=_confidence(margin, t_steps.size, th.min_points),
    )
  ]
