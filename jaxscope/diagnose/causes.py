"""Rules that name a cause in the run's setup: a learning rate too low, noisy training
labels, too strong a dropout (a bad initial scale: :mod:`jaxscope.diagnose.init_scale`).

They read the log next to the run's configuration (``config.json``: ``lr``, ``optimizer``,
``num_classes``, ``task``, ``model``, ``model_args`` and the ``data_stats`` of
:func:`jaxscope.data.data_stats`), and only the steps before a divergence (the registry
passes them that part of the run).

* ``lr_too_low``: every weight layer's update/weight ratio far below the usual ≈ 1e-3
  while the loss falls slowly, with no dead units, saturation, vanishing gradients or
  stalled layers that would explain small updates.
* ``label_noise`` and ``dropout_too_strong``: the training accuracy (measured on the
  training batches against their labels, in training mode) stays far below the test
  accuracy (clean labels, evaluation mode) while the training loss stays above the test
  loss. The two have the same signature in the record; the recorded dropout rate decides:
  at least ``dropout_rate_min`` → ``dropout_too_strong``, else ``label_noise``.

Dropout left on at evaluation cannot be told from what a run directory records (the test
metrics carry no mark of the mode they were computed in), so no rule claims it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxscope.diagnose.activations import _rule_dead_units, _rule_saturation
from jaxscope.diagnose.divergence import _divergence_step, _stable_loss
from jaxscope.diagnose.finding import (
  Finding,
  Thresholds,
  _confidence,
  _finding,
  _fmt,
  _margin,
)
from jaxscope.diagnose.gradients import _raise_factor, _rule_gradients, _stalled
from jaxscope.diagnose.loss import _last_stretch_fit
from jaxscope.diagnose.series import (
  _before,
  _finite,
  _layer_tail_medians,
  _layers,
  _rel_drop,
  _series,
  _tail,
)
from jaxscope.record import History

#: Dropout rates of zoo models that do not take them in ``model_args`` (``alexnet_mini``:
#: fixed 0.25 and 0.5) or take them with a default (``nnx_cnn``: ``dropout_rate=0.25``);
#: ``tests/test_diagnose.py`` checks them against the models. The diagnoses sit below the
#: model zoo in the layers of the package, so they cannot ask it.
ZOO_DROPOUT: dict[str, float] = {"alexnet_mini": 0.5, "nnx_cnn": 0.25}

_DROPOUT_KEY = re.compile(r"drop", re.IGNORECASE)


# --------------------------------------------------------------------------- configuration


def _lr(config: Mapping[str, Any]) -> float | None:
  """The recorded learning rate (``config["lr"]`` or ``config["learning_rate"]``)."""
  lr = config.get("lr", config.get("learning_rate"))
  return float(lr) if isinstance(lr, int | float) and not isinstance(lr, bool) else None


def _rates(value: Any) -> list[float]:
  """The numbers in ``[0, 1)`` of a ``model_args`` value (a number or a sequence of them)."""
  items = value if isinstance(value, list | tuple) else [value]
  return [
    float(v)
    for v in items
    if isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= float(v) < 1.0
  ]


def _dropout_rate(config: Mapping[str, Any]) -> tuple[float, str] | None:
  """The largest dropout rate of the run's model and where it was read, or ``None``.

  Read from ``config["model_args"]`` (every key containing ``drop``, e.g. ``dropout``,
  ``dropout_rate``, ``attn_drop``; a number or a sequence of numbers in ``[0, 1)``), else
  from :data:`ZOO_DROPOUT` for the zoo models whose rate is fixed or a default.
  """
  args = config.get("model_args")
  found: list[tuple[float, str]] = []
  if isinstance(args, Mapping):
    for key, value in args.items():
      if _DROPOUT_KEY.search(str(key)):
        found += [(r, f"model_args {key}") for r in _rates(value)]
  if found:
    return max(found)
  model = config.get("model")
  if isinstance(model, str) and model in ZOO_DROPOUT:
    return ZOO_DROPOUT[model], f"the {model} model's own dropout"
  return None


# --------------------------------------------------------------------------- lr too low


def _far_from_fit(h: History, th: Thresholds, steps: np.ndarray, loss: np.ndarray) -> str | None:
  """Why the run is still far from a good fit at its end (``late_plateau``'s test), or
  ``None``: median ``train/accuracy`` of the last ``late_fraction`` below ``late_acc``,
  else median loss there above ``late_loss_fraction ×`` the initial (first five points)."""
  t_steps, t_loss = _tail(steps, loss, th.late_fraction)
  acc = _series(h, "train/accuracy")
  if acc is not None:
    a_steps, a = _finite(*acc)
    a = a[(a_steps >= t_steps[0]) & (a_steps <= t_steps[-1])]
    if a.size:
      level = float(np.median(a))
      return f"training accuracy {level:.3g}" if level < th.late_acc else None
  initial, level = float(np.median(loss[:5])), float(np.median(t_loss))
  if initial > 0 and level > th.late_loss_fraction * initial:
    return f"loss {_fmt(level)}, {level / initial:.0%} of the initial {_fmt(initial)}"
  return None


def _rule_lr_too_low(h: History, th: Thresholds) -> list[Finding]:
  """Learning rate too low: small updates everywhere while the loss falls slowly.

  Every weight layer's median ``updates/ratio/{layer}`` (last half after ``ratio_warmup``
  steps, at least ``min_points`` points; :func:`_rule_update_ratio`'s window) is below
  ``lr_low_ratio`` (the usual ≈ 1e-3) and above ``stall_ratio`` (the layers move); the
  (pre-divergence) loss, at least ``2 × min_points`` points, does not rise (a line fitted
  to ``log(loss)``) and ends far from a good fit (:func:`_far_from_fit`); and nothing
  explains small updates: no ``dead_units``, ``saturation``, ``vanishing_gradients`` or
  stalled layer. The summary names the recorded learning rate and a factor:
  ``lr_target_ratio`` (a healthy run's ratio) over the median layer's ratio (at least 2,
  one significant digit), which brings that layer there if the ratio scales with the
  learning rate (it grows more slowly, so the factor is a lower bound). Warning.
  Confidence: ``lr_low_ratio`` over the largest layer's ratio. Source: "learning rate too
  low", a common real fault of the DeepFD study; the update-ratio target of ikkuna.
  """
  layers = _layers(h, "updates", "ratio", weights=True)
  tm = _layer_tail_medians(
    h, "updates/ratio", layers, warmup=th.ratio_warmup, min_points=th.min_points
  )
  if not tm.med or len(tm.med) < len(layers):
    return []
  top, low = max(tm.med.values()), min(tm.med.values())
  if not (th.stall_ratio < low and top < th.lr_low_ratio) or _stalled(h, th)[0]:
    return []
  s = _stable_loss(h, th)
  if s is None or s[0].size < 2 * th.min_points:
    return []
  steps, loss = s
  start, end, drop = _rel_drop(steps, loss)
  why = _far_from_fit(h, th, steps, loss)
  if drop < 0 or why is None:
    return []
  explained = _rule_dead_units(h, th) + _rule_saturation(h, th)
  explained += [f for f in _rule_gradients(h, th) if f.name == "vanishing_gradients"]
  if explained:
    return []
  median = float(np.median(list(tm.med.values())))
  factor = _raise_factor(median, th)
  lr = _lr(h.config)
  shown = ", ".join(f"{lay} {_fmt(m)}" for lay, m in list(tm.med.items())[:5])
  opt = h.config.get("optimizer")
  named = f"the recorded lr {_fmt(lr)}" + (f" ({opt})" if opt else "") if lr else "the lr"
  summary = (
    f"The learning rate looks too low: the loss falls by only {drop:.0%} over steps "
    f"{int(steps[0])}–{int(steps[-1])} ({_fmt(start)} → {_fmt(end)}; {why}) while the "
    f"update/weight ratio of every weight layer stays below {_fmt(th.lr_low_ratio)} (median "
    f"over the last half: {shown}{', …' if len(tm.med) > 5 else ''}; usual ≈ 1e-3), with "
    f"no dead units, saturation or vanishing gradients to explain it. Raise {named} by "
    f"about ×{_fmt(factor)}."
  )
  tip = f"raise the learning rate by about ×{_fmt(factor)}" + (
    f" (from {_fmt(lr)} to ≈ {_fmt(lr * factor)})" if lr else ""
  )
  values: dict[str, Any] = {f"median/{lay}": m for lay, m in tm.med.items()}
  values.update(relative_drop=drop, suggested_factor=factor, lr=lr)
  worst = max(tm.med, key=lambda lay: tm.med[lay])
  return [
    _finding(
      "lr_too_low",
      "warning",
      summary,
      metric=["loss", *(f"updates/ratio/{lay}" for lay in tm.med)],
      layers=list(tm.med),
      steps=[min(tm.first.values())],
      values=values,
      confidence=_confidence(
        _margin(top, th.lr_low_ratio, above=False), tm.points[worst], th.min_points
      ),
      advice=[tip],
    )
  ]


# --------------------------------------------------------------------------- train vs test


class _Gap(NamedTuple):
  """Training against test metrics over the last ``late_fraction`` of a run."""

  steps: np.ndarray
  """The test evaluations read."""
  train_acc: float | None
  test_acc: float | None
  train_loss: float
  test_loss: float | None
  points: int
  """Training points in the window."""


def _train_test_gap(h: History, th: Thresholds) -> _Gap | None:
  """Medians over the last ``late_fraction`` of the (pre-divergence) loss's step range: of
  ``loss`` and ``train/accuracy`` (at least ``min_points`` points), and of ``test/loss`` and
  ``test/accuracy`` at the evaluations from its start on (at least 2, else the last 2
  before the divergence; the final evaluation after the last step counts)."""
  s = _stable_loss(h, th)
  if s is None:
    return None
  steps, loss = s
  t_steps, t_loss = _tail(steps, loss, th.late_fraction)
  if t_steps.size < th.min_points:
    return None
  cut, end = int(t_steps[0]), int(steps[-1])
  div = _divergence_step(h, th)

  def evals(key: str) -> tuple[np.ndarray, np.ndarray] | None:
    e = _series(h, key)
    if e is None:
      return None
    e_steps, e_vals = _finite(*e)
    if div is not None:
      e_steps, e_vals = e_steps[e_steps < div], e_vals[e_steps < div]
    late = e_steps >= cut
    if late.sum() < 2:
      late = np.zeros(e_steps.shape, bool)
      late[-2:] = True
    return (e_steps[late], e_vals[late]) if late.sum() >= 2 else None

  def train_median(key: str) -> float | None:
    a = _series(h, key)
    if a is None:
      return None
    a_steps, a = _finite(*a)
    a = a[(a_steps >= cut) & (a_steps <= end)]
    return float(np.median(a)) if a.size >= th.min_points else None

  test_loss, test_acc = evals("test/loss"), evals("test/accuracy")
  e_steps = test_acc[0] if test_acc is not None else (test_loss[0] if test_loss else None)
  if e_steps is None:
    return None
  return _Gap(
    e_steps,
    train_median("train/accuracy"),
    float(np.median(test_acc[1])) if test_acc is not None else None,
    float(np.median(t_loss)),
    float(np.median(test_loss[1])) if test_loss is not None else None,
    int(t_steps.size),
  )


def _gap_evidence(
  gap: _Gap, th: Thresholds, chance: float, *, regression_ok: bool
) -> tuple[float, str] | None:
  """``(margin, sentence)`` when training stays far behind test (see the module
  docstring), or ``None``: test accuracy above the chance level ``chance`` and above the
  training accuracy, both by more than ``noise_gap``, with the training loss above the
  test loss (a network that learnt nothing is at chance on both); without accuracies (and
  ``regression_ok``), the training loss above ``dropout_loss_ratio ×`` the test loss."""
  if gap.train_acc is not None and gap.test_acc is not None:
    diff = gap.test_acc - gap.train_acc
    if diff <= th.noise_gap or gap.test_acc - chance <= th.noise_gap:
      return None
    if gap.test_loss is not None and gap.train_loss <= gap.test_loss:
      return None
    loss = (
      f", training loss {_fmt(gap.train_loss)} against test loss {_fmt(gap.test_loss)}"
      if gap.test_loss is not None
      else ""
    )
    sentence = (
      f"the training accuracy {gap.train_acc:.3g} stays {diff:.3g} below the test accuracy "
      f"{gap.test_acc:.3g} (more than {_fmt(th.noise_gap)}){loss}"
    )
    return _margin(diff, th.noise_gap, above=True), sentence
  if not regression_ok or gap.test_loss is None or gap.test_loss <= 0:
    return None
  ratio = gap.train_loss / gap.test_loss
  if ratio <= th.dropout_loss_ratio:
    return None
  sentence = (
    f"the training loss {_fmt(gap.train_loss)} stays {_fmt(ratio)} × the test loss "
    f"{_fmt(gap.test_loss)} (more than {_fmt(th.dropout_loss_ratio)}×)"
  )
  return _margin(ratio, th.dropout_loss_ratio, above=True), sentence


def _chance(h: History) -> float:
  """The chance accuracy ``1/num_classes`` (0 when ``num_classes`` is not recorded)."""
  k = h.config.get("num_classes")
  return 1.0 / k if isinstance(k, int) and not isinstance(k, bool) and k >= 2 else 0.0


def _window(gap: _Gap) -> str:
  return f"over the evaluations at steps {', '.join(str(int(s)) for s in gap.steps)}"


def _systematic(gap: _Gap, chance: float, th: Thresholds) -> tuple[float, str] | None:
  """``(margin, sentence)`` when the test accuracy is below half the chance level while the
  training accuracy is above chance by more than ``noise_gap`` (labels that disagree
  systematically: shifted or permuted), or ``None``."""
  if chance <= 0 or gap.train_acc is None or gap.test_acc is None:
    return None
  if gap.test_acc >= chance / 2 or gap.train_acc - chance <= th.noise_gap:
    return None
  sentence = (
    f"the test accuracy {gap.test_acc:.3g} is below the chance level {_fmt(chance)} while the "
    f"training accuracy reaches {gap.train_acc:.3g}: the training labels disagree with the "
    "test labels systematically (a shifted or permuted label mapping)"
  )
  return _margin(gap.test_acc, chance / 2, above=False), sentence


def _rule_label_noise(h: History, th: Thresholds) -> list[Finding]:
  """Noisy training labels: the model does better on the clean test labels than on the
  labels it trains on, or worse than chance on them.

  Over the last ``late_fraction`` of a classification run (:func:`_train_test_gap`: at
  least ``min_points`` training points and 2 evaluations), either

  * **random noise**: the median test accuracy exceeds the median training accuracy
    (``train/accuracy``, measured against the training labels) and the chance level
    ``1/K`` by more than ``noise_gap`` while the training loss stays above the test
    loss, and no dropout of at least ``dropout_rate_min`` is recorded (that gap is
    ``dropout_too_strong``'s). With
    symmetric noise of a fraction ``η`` over ``K`` classes the training accuracy is about
    ``a(1 − η) + η/K`` for a test accuracy ``a``, so the summary estimates
    ``η ≈ (a − a_train)/(a − 1/K)``; or
  * **systematic noise** (``config["num_classes"]`` recorded): the test accuracy below
    half the chance level ``1/K`` while the training accuracy exceeds chance by more than
    ``noise_gap`` (labels moved to another class: no model, however poor, is below
    chance on clean labels). Confidence: half the chance level over the test accuracy.

  Warning. Confidence (random noise): the gap over ``noise_gap``, on the training points.
  Source: "label noise", a common real fault of the DeepFD study.
  """
  gap = _train_test_gap(h, th)
  if gap is None or gap.train_acc is None or gap.test_acc is None:
    return []
  chance = _chance(h)
  rate = _dropout_rate(h.config)
  values: dict[str, Any] = {
    "train_accuracy": gap.train_acc,
    "test_accuracy": gap.test_acc,
    "train_loss": gap.train_loss,
    "test_loss": gap.test_loss,
  }
  found = _systematic(gap, chance, th)
  if found is not None:
    summary = f"The training labels look wrong: {_window(gap)}, {found[1]}."
    values["systematic"] = True
  else:
    if rate is not None and rate[0] >= th.dropout_rate_min:
      return []
    found = _gap_evidence(gap, th, chance, regression_ok=False)
    if found is None:
      return []
    eta = float(np.clip((gap.test_acc - gap.train_acc) / max(gap.test_acc - chance, 1e-9), 0, 1))
    summary = (
      f"The training labels look noisy: {_window(gap)}, {found[1]}; about {eta:.0%} of the "
      "training labels would be wrong (symmetric noise)."
    )
    values["noise_estimate"] = eta
  return [
    _finding(
      "label_noise",
      "warning",
      summary,
      metric=["train/accuracy", "test/accuracy", "loss", "test/loss"],
      steps=gap.steps,
      values=values,
      confidence=_confidence(found[0], gap.points, th.min_points),
    )
  ]


def _rule_dropout_too_strong(h: History, th: Thresholds) -> list[Finding]:
  """Dropout too strong: under a recorded dropout rate ``p ≥ dropout_rate_min``
  (:func:`_dropout_rate`: ``model_args``, or the zoo's fixed rates), training (measured in
  training mode, with dropout) stays far behind the test metrics (evaluation mode):
  :func:`_gap_evidence` over the last ``late_fraction`` (test accuracy above training
  accuracy by more than ``noise_gap`` with the training loss above the test loss; without
  accuracies, the training loss above ``dropout_loss_ratio ×`` the test loss). Warning.
  Confidence: the gap's margin, on the training points. The summary says that noisy
  labels would look the same. Source: "misused dropout", a real fault class of the DeepFD
  study.
  """
  rate = _dropout_rate(h.config)
  if rate is None or rate[0] < th.dropout_rate_min:
    return []
  gap = _train_test_gap(h, th)
  found = _gap_evidence(gap, th, _chance(h), regression_ok=True) if gap is not None else None
  if gap is None or found is None:
    return []
  margin, sentence = found
  summary = (
    f"Dropout looks too strong: with a dropout rate of {_fmt(rate[0])} ({rate[1]}), "
    f"{_window(gap)}, {sentence}: the model cannot fit its training batches under dropout "
    "(noisy labels would look the same)."
  )
  values = {
    "dropout_rate": rate[0],
    "train_accuracy": gap.train_acc,
    "test_accuracy": gap.test_acc,
    "train_loss": gap.train_loss,
    "test_loss": gap.test_loss,
  }
  confidence = _confidence(margin, gap.points, th.min_points)
  return [
    _finding(
      "dropout_too_strong",
      "warning",
      summary,
      metric=["train/accuracy", "test/accuracy", "loss", "test/loss"],
      steps=gap.steps,
      values=values,
      confidence=confidence,
    )
  ]


def _rule_dropout_rate_high(h: History, th: Thresholds) -> list[Finding]:
  """Dropout too strong by its rate alone: a recorded rate of at least
  ``dropout_rate_high`` in a run that diverged or is still far from a good fit
  (:func:`~jaxscope.diagnose.loss._far_from_good` over the last ``late_fraction``), when
  the train–test gap of :func:`_rule_dropout_too_strong` is not there to read (under such
  rates the evaluation mode fails as well, or the loss blows up first: inverted dropout
  scales the kept units by ``1/(1 − p)``). Reads the whole run (a divergence included):
  the rate is set before any step. Warning, confidence medium."""
  rate = _dropout_rate(h.config)
  if rate is None or rate[0] < th.dropout_rate_high:
    return []
  div = _divergence_step(h, th)
  if _rule_dropout_too_strong(_before(h, div) if div is not None else h, th):
    return []  # the gap says it, with its evidence
  if div is not None:
    why, steps = f"its loss diverged at step {div}", [div]
  else:
    fit = _last_stretch_fit(h, th)
    if fit is None or fit.far is None:
      return []
    why, steps = f"it is still far from a good fit ({fit.far[0]})", [fit.steps[0], fit.steps[-1]]
  summary = (
    f"Dropout looks too strong: a rate of {_fmt(rate[0])} ({rate[1]}) keeps "
    f"{1 - rate[0]:.0%} of the units at each step, and {why}."
  )
  return [
    _finding(
      "dropout_too_strong",
      "warning",
      summary,
      metric="loss",
      steps=steps,
      values={"dropout_rate": rate[0]},
      confidence="medium",
    )
  ]
