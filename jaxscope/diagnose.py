"""Rules over a recorded run that name a training problem, with the evidence and what to try.

:func:`diagnose` runs every rule of :data:`RULES` over a :class:`~jaxscope.record.History`
(or a run directory, or a mapping ``key -> (steps, values)``) and returns the
:class:`Finding` objects, most severe first. Each rule reads only the keys the training
loop writes (``loss``, ``train/accuracy``, ``test/loss``, ``lr``, ``hess_max_ev`` and the
per-layer ``{topic}/{stat}/{layer}`` metrics, see :mod:`jaxscope.train`) and skips
silently when they were not recorded. Every threshold is a field of :class:`Thresholds`
and can be overridden by name: ``diagnose(history, dead_fraction=0.3)``.

The rules and their advice follow a training lecture's catalogue of loss-curve shapes,
their causes and what to try (divergence, oscillation, plateaus, overfitting), and the
per-layer health checks of live introspection (ikkuna, Cockpit): gradient flow
through depth, the update/weight ratio (target around ``1e-3``), dead and saturated
units, stalled layers, and the learning rate against the curvature
(gradient descent on a quadratic is stable only for ``lr · λ_max < 2``).

Conventions:

* **Depth order.** Layers are ordered by a natural sort of their names (``Dense_2``
  before ``Dense_10``), which for Flax's ``{Module}_{i}`` names is the order from input
  to output; the first layer is the input side, the last the output side. (The order of
  :meth:`History.layers` is the parameter flattening order, which sorts names as strings
  and puts ``Dense_10`` before ``Dense_2``.)
* **Weight layers.** Rules on gradients and update ratios look at the weight matrices
  (last name component ``kernel``, ``weight``, ``w`` or ``embedding``) when any are
  recorded, else at every layer: biases start at zero, so their ratios and norms are not
  comparable across layers.
* **Loss domain.** Oscillation is analysed on ``log(loss)`` when the loss is positive
  (multiplicative mini-batch noise becomes additive and stationary), else on the loss.
* **Steps.** Windows ("the last half", "the first 10 %") are fractions of the recorded
  step range of the series concerned; periods are in steps (the median spacing of the
  recorded steps times the period in samples).

Example:
  >>> from jaxscope.record import History
  >>> h = History([(s, {"loss": 2.0 if s < 5 else float("nan")}) for s in range(10)])
  >>> [f.name for f in diagnose(h)]
  ['divergence']
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxscope.record import History

__all__ = [
  "RULES",
  "SEVERITIES",
  "Finding",
  "Thresholds",
  "diagnose",
  "findings_to_json",
  "report",
]

#: Severities, most severe first.
SEVERITIES: tuple[str, ...] = ("critical", "warning", "info")

_WEIGHT_NAMES = frozenset({"kernel", "weight", "w", "embedding"})
_MAX_STEPS_SHOWN = 20  # Steps listed in an evidence dict at most.


# --------------------------------------------------------------------------- data types


@dataclasses.dataclass(frozen=True)
class Finding:
  """A named problem found in a run.

  Attributes:
    name: what was found, e.g. ``"divergence"``, ``"oscillation"``, ``"instability"``,
      ``"early_plateau"``, ``"late_plateau"``, ``"overfitting"``,
      ``"vanishing_gradients"``, ``"exploding_gradients"``, ``"update_ratio_high"``,
      ``"update_ratio_low"``, ``"dead_units"``, ``"saturation"``, ``"stalled_layers"``,
      ``"lr_above_curvature_limit"``.
    severity: ``"critical"``, ``"warning"`` or ``"info"``.
    summary: one readable sentence with the numbers.
    evidence: JSON-serialisable dict: ``"metric"`` (the key or keys read), ``"layers"``,
      ``"steps"`` (the steps that show it, at most 20) and ``"values"`` (named numbers).
      Non-finite numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``.
    advice: what to try, most promising first.
  """

  name: str
  severity: str
  summary: str
  evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
  advice: list[str] = dataclasses.field(default_factory=list)

  def __post_init__(self) -> None:
    if self.severity not in SEVERITIES:
      raise ValueError(f"Finding: severity must be one of {SEVERITIES}, got {self.severity!r}.")

  def to_dict(self) -> dict[str, Any]:
    """The finding as a JSON-serialisable dict (``json.dumps(..., allow_nan=False)`` works)."""
    return {
      "name": self.name,
      "severity": self.severity,
      "summary": self.summary,
      "evidence": _jsonable(self.evidence),
      "advice": list(self.advice),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Finding:
    """The inverse of :meth:`to_dict`."""
    return cls(
      name=d["name"],
      severity=d["severity"],
      summary=d["summary"],
      evidence=dict(d.get("evidence", {})),
      advice=list(d.get("advice", [])),
    )


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Every threshold of the rules, with its default.

  Override one by name: ``diagnose(history, dead_fraction=0.3)`` or
  ``diagnose(history, Thresholds(dead_fraction=0.3))``.
  """

  # divergence
  divergence_factor: float = 10.0
  """Divergence: the loss exceeds ``divergence_factor × |initial loss|`` (or is non-finite)."""
  # oscillation / instability
  min_series: int = 32
  """Oscillation: fewest finite loss points needed for the spectral and spike analysis."""
  max_points: int = 4096
  """Oscillation: longer loss series are reduced to block maxima (which keep the spikes)
  down to at most this length."""
  trend_fraction: float = 0.125
  """Oscillation: window of the moving median (the trend), as a fraction of the series."""
  spike_power_ratio: float = 30.0
  """Oscillation: a periodogram peak above ``spike_power_ratio ×`` the median power is
  periodic (white noise exceeds 30 × median with probability ≈ n/2 · 2^-30)."""
  min_period: float = 4.0
  """Oscillation: shortest period reported, in steps (the longest is a quarter of the run)."""
  spike_factor: float = 6.0
  """Instability: a spike is a point above the moving median by ``spike_factor ×`` the
  moving median absolute deviation (MAD; 6 MAD ≈ 4 σ for Gaussian noise)."""
  instability_fraction: float = 0.02
  """Instability: reported when more than this fraction of the steps are spikes."""
  # plateaus
  min_points: int = 10
  """Plateaus and overfitting: fewest points a window needs; shorter windows are skipped."""
  plateau_rel_change: float = 0.05
  """Plateaus: a window whose loss falls by less than this fraction of its start value."""
  early_fraction: float = 0.1
  """Early plateau: the first ``early_fraction`` of the run."""
  late_fraction: float = 0.2
  """Late plateau: the last ``late_fraction`` of the run."""
  late_acc: float = 0.9
  """Late plateau: "still far from good" when the median training accuracy of the window is
  below this (used when ``train/accuracy`` is recorded)."""
  late_loss_fraction: float = 0.5
  """Late plateau: "still far from good" when the median loss of the window is above this
  fraction of the initial loss (used without ``train/accuracy``)."""
  # overfitting
  overfit_window: int = 5
  """Overfitting: number of last evaluations over which the slopes are fitted."""
  overfit_rel: float = 0.1
  """Overfitting: the final test loss exceeds its minimum by more than this fraction, and
  the training loss does not rise by more than this fraction over the window."""
  # gradients
  vanishing_ratio: float = 1e-3
  """Vanishing gradients: median of ‖g_first‖/‖g_last‖ over the last half below this."""
  exploding_ratio: float = 1e3
  """Exploding gradients: median of ‖g_first‖/‖g_last‖ over the last half above this."""
  exploding_growth: float = 100.0
  """Exploding gradients: a layer's gradient norm (median of the last 10 % of its steps)
  exceeds ``exploding_growth ×`` its median over the first 10 %."""
  # update / weight ratio
  ratio_high: float = 1e-2
  """Update ratio: median ‖Δθ‖/‖θ‖ over the last half above this (target ≈ 1e-3)."""
  ratio_low: float = 1e-5
  """Update ratio: median ‖Δθ‖/‖θ‖ over the last half below this."""
  # activations
  dead_fraction: float = 0.5
  """Dead units: median of ``activations/dead_fraction`` over the last half above this."""
  saturation_fraction: float = 0.5
  """Saturation: median of ``activations/saturation_fraction`` over the last half above this."""
  exclude_output_layer: bool = True
  """Dead units and saturation: leave out the last layer in depth order (the logits, which
  have no non-linearity) when more than one layer is recorded."""
  # stalled layers
  stall_ratio: float = 1e-7
  """Stalled layers: ‖Δθ‖/‖θ‖ below this at every step of the last ``stall_fraction``."""
  stall_fraction: float = 0.25
  """Stalled layers: the final fraction of the steps that is checked."""
  # curvature
  curvature_limit: float = 2.0
  """Curvature: plain gradient descent is unstable on a quadratic when ``lr · λ_max``
  exceeds 2; heavy-ball momentum β raises the limit to ``curvature_limit · (1 + β)`` and
  Nesterov momentum to ``curvature_limit · (1 + β) / (1 + 2β)``."""
  curvature_fraction: float = 0.5
  """Curvature: reported when the limit is exceeded on more than this fraction of the
  steps where ``hess_max_ev`` was measured."""


# --------------------------------------------------------------------------- advice

_ADVICE: dict[str, list[str]] = {
  "divergence": [
    "lower the learning rate (e.g. by 10×) or add a warm-up",
    "clip gradients (optax.clip_by_global_norm)",
    "check the inputs (NaN/Inf, scaling) and the initialisation",
  ],
  "oscillation": [
    "shuffle the training data every epoch (online learning on unshuffled or imbalanced "
    "data makes the loss periodic)",
    "vary or increase the batch size",
    "lower the learning rate",
  ],
  "instability": [
    "shuffle the training data",
    "lower the learning rate or let it decay",
    "add batch normalisation, or try another activation function",
    "clip gradients if single large gradients cause the jumps",
  ],
  "early_plateau": [
    "use a more robust initialisation (He/Glorot scaled to the activation)",
    "normalise the inputs, add batch or layer normalisation",
    "try a slightly larger learning rate",
  ],
  "late_plateau": [
    "decay the learning rate (higher at the start, lower later)",
    "try another initialisation",
    "check the model's capacity (too small a model cannot fit the data)",
  ],
  "overfitting": [
    "stop early at the step of the minimum test loss",
    "regularise: L2 weight decay, dropout",
    "get more data or augment it",
  ],
  "vanishing_gradients": [
    "use an initialisation scaled to the activation (He for ReLU, Glorot for tanh)",
    "add normalisation layers (batch or layer normalisation)",
    "add residual connections",
    "use non-saturating activations (ReLU family) instead of sigmoid/tanh",
  ],
  "exploding_gradients": [
    "clip gradients (optax.clip_by_global_norm)",
    "lower the learning rate",
    "use a smaller-scale initialisation and normalisation layers",
  ],
  "update_ratio_high": [
    "lower the learning rate (for these layers) so that ‖Δθ‖/‖θ‖ is near 1e-3",
    "use a warm-up, or the ratio-adaptive learning rate (jaxscope.transforms)",
  ],
  "update_ratio_low": [
    "raise the learning rate (for these layers) so that ‖Δθ‖/‖θ‖ is near 1e-3",
    "check the gradients reaching these layers (vanishing gradients, dead units)",
  ],
  "dead_units": [
    "lower the learning rate (large steps push ReLU units into the dead zone)",
    "use a better initialisation (He), or small positive biases",
    "use leaky ReLU / GELU, or add normalisation",
  ],
  "saturation": [
    "use an initialisation scaled to the activation (smaller weights)",
    "normalise the inputs, add batch or layer normalisation",
    "use a non-saturating activation (ReLU family)",
  ],
  "stalled_layers": [
    "check that these layers receive gradients (stop_gradient, masks, dead units)",
    "check the optimizer's per-layer learning rate and weight decay",
  ],
  "lr_above_curvature_limit": [
    "lower the learning rate below the curvature limit (2/λ_max for SGD)",
    "use a warm-up or a decaying learning rate",
  ],
}


# --------------------------------------------------------------------------- helpers


#: Ratios whose denominator is a weight's norm: infinite for zero weights (a freshly
#: initialised bias), so their non-finite values are not evidence of a divergence.
_RATIO_STATS = ("ratio", "ratio_new", "elementwise_ratio")


def _jsonable(x: Any) -> Any:
  """Converts numpy values, tuples and non-finite floats into strict-JSON values."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple | set | frozenset):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return [_jsonable(v) for v in x.tolist()]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, bool) or x is None or isinstance(x, int | str):
    return x
  if isinstance(x, float):
    if math.isnan(x):
      return "nan"
    if math.isinf(x):
      return "inf" if x > 0 else "-inf"
    return x
  return str(x)


def _finding(
  name: str,
  severity: str,
  summary: str,
  *,
  metric: str | Sequence[str],
  layers: Sequence[str] = (),
  steps: Iterable[Any] = (),
  values: Mapping[str, Any] | None = None,
) -> Finding:
  steps = [int(s) for s in steps][:_MAX_STEPS_SHOWN]
  evidence = {
    "metric": metric if isinstance(metric, str) else list(metric),
    "layers": list(layers),
    "steps": steps,
    "values": dict(values or {}),
  }
  return Finding(name, severity, summary, _jsonable(evidence), list(_ADVICE.get(name, [])))


def _fmt(x: float) -> str:
  return f"{x:.3g}"


def _natural_key(name: str) -> list[Any]:
  return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _series(h: History, key: str) -> tuple[np.ndarray, np.ndarray] | None:
  """``(steps, float values)`` of a scalar key, or ``None`` if absent or not scalar."""
  if key not in h:
    return None
  try:
    steps, values = h.series(key)
  except ValueError:
    return None
  if values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iuf":
    return None
  return steps, values.astype(np.float64)


def _layers(h: History, topic: str, stat: str, *, weights: bool = False) -> list[str]:
  """Layers of ``{topic}/{stat}`` with scalar series, in depth (natural sort) order."""
  layers = [lay for lay in h.layers(topic, stat) if _series(h, f"{topic}/{stat}/{lay}") is not None]
  if weights:
    w = [lay for lay in layers if lay.rsplit("/", 1)[-1] in _WEIGHT_NAMES]
    layers = w or layers
  return sorted(layers, key=_natural_key)


def _tail(steps: np.ndarray, values: np.ndarray, fraction: float) -> tuple[np.ndarray, ...]:
  """The points in the last ``fraction`` of the step range (at least one)."""
  if steps.size == 0:
    return steps, values
  cut = steps[-1] - fraction * (steps[-1] - steps[0])
  keep = steps >= cut
  keep[-1] = True
  return steps[keep], values[keep]


def _head(steps: np.ndarray, values: np.ndarray, fraction: float) -> tuple[np.ndarray, ...]:
  """The points in the first ``fraction`` of the step range (at least one)."""
  if steps.size == 0:
    return steps, values
  cut = steps[0] + fraction * (steps[-1] - steps[0])
  keep = steps <= cut
  keep[0] = True
  return steps[keep], values[keep]


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  ok = np.isfinite(values)
  return steps[ok], values[ok]


def _layer_tail_medians(
  h: History, prefix: str, layers: Sequence[str]
) -> tuple[dict[str, float], dict[str, int]]:
  """Per layer, the median of ``{prefix}/{layer}`` over the last half of its finite
  values and the first step of that half (layers without a finite value are left out)."""
  med: dict[str, float] = {}
  first: dict[str, int] = {}
  for lay in layers:
    steps, values = _finite(*_series(h, f"{prefix}/{lay}"))  # type: ignore[misc]
    if steps.size == 0:
      continue
    t_steps, tail = _tail(steps, values, 0.5)
    med[lay] = float(np.median(tail))
    first[lay] = int(t_steps[0])
  return med, first


def _moving_median(y: np.ndarray, window: int, *, edge: bool = True) -> np.ndarray:
  """Centred moving median; pads with the median of the 5 edge values (a trend), or by
  reflection (``edge=False``: a stationary scale)."""
  half = min(max(window // 2, 1), max(y.size - 1, 1))
  if edge or y.size < 2:
    padded = np.pad(y, half, mode="median", stat_length=min(5, y.size))
  else:
    padded = np.pad(y, half, mode="reflect")
  return np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)


def _acf_period(r: np.ndarray, lo: float, hi: float) -> float | None:
  """The period (samples) of ``r`` from its autocorrelation, or ``None``.

  The first interior local maximum of the (biased) autocorrelation at a lag in
  ``[lo, hi]`` whose value is at least half the largest one in that range, refined by
  parabolic interpolation: the fundamental of a spike train (whose harmonics are as
  strong in the periodogram) and the period of a sine alike.
  """
  n = r.size
  spec = np.fft.rfft(r, 2 * n)
  acf = np.fft.irfft(np.abs(spec) ** 2)[:n]
  if acf[0] <= 0:
    return None
  acf = acf / acf[0]
  a, b = max(math.ceil(lo), 1), min(int(hi), n - 2)
  if b <= a:
    return None
  top = float(acf[a : b + 1].max())
  if top <= 0:
    return None
  for lag in range(a + 1, b + 1):
    if acf[lag] >= 0.5 * top and acf[lag] >= acf[lag - 1] and acf[lag] >= acf[lag + 1]:
      x, y, z = acf[lag - 1], acf[lag], acf[lag + 1]
      den = x - 2 * y + z
      return lag + (float(np.clip(0.5 * (x - z) / den, -0.5, 0.5)) if den != 0 else 0.0)
  return None


def _divergence_step(h: History, th: Thresholds) -> int | None:
  """The first step where ``loss`` is non-finite or above ``divergence_factor × |initial|``."""
  s = _series(h, "loss")
  if s is None:
    return None
  steps, loss = s
  finite = np.isfinite(loss)
  bad = ~finite
  if finite.any():
    initial = loss[np.argmax(finite)]
    if initial > 0:
      bad |= finite & (loss > th.divergence_factor * initial)
  return int(steps[np.argmax(bad)]) if bad.any() else None


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


def _rel_drop(steps: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
  """``(start, end, (start − end)/start)`` of a least-squares line through the window.

  The line is fitted to ``log(values)`` when they are positive (multiplicative noise,
  exponential decay), else to the values; ``start`` and ``end`` are the fitted values at
  the window's first and last step. A fit over every point is less noisy than comparing
  a few points at either end.
  """
  x = steps.astype(np.float64)
  if np.all(values > 0):
    slope, icpt = np.polyfit(x, np.log(values), 1) if x.size > 1 else (0.0, np.log(values[0]))
    start, end = float(np.exp(icpt + slope * x[0])), float(np.exp(icpt + slope * x[-1]))
  else:
    slope, icpt = np.polyfit(x, values, 1) if x.size > 1 else (0.0, values[0])
    start, end = float(icpt + slope * x[0]), float(icpt + slope * x[-1])
  return start, end, (start - end) / abs(start) if start != 0 else 0.0


def _slope(x: np.ndarray, y: np.ndarray) -> float:
  if x.size < 2 or np.ptp(x) == 0:
    return 0.0
  return float(np.polyfit(x.astype(np.float64), y, 1)[0])


# --------------------------------------------------------------------------- rules


def _rule_divergence(h: History, th: Thresholds) -> list[Finding]:
  """Divergence: the loss becomes non-finite or explodes.

  Measures the first step ``s*`` where ``loss`` is non-finite or exceeds
  ``divergence_factor × |loss_0|`` (``loss_0`` the first finite loss), and the first
  per-layer value (any ``{topic}/{stat}/{layer}`` key) that is non-finite, or a
  ``*/nonfinite_fraction/*`` above 0, at or before ``s*``: the layer where the NaN/Inf
  started. When the loss stays finite but per-layer values are non-finite, that is
  reported too. Critical. Source: the lecture's "loss explodes / NaN" shape.
  """
  div = _divergence_step(h, th)
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
  if div is None and first is None:
    return []
  values: dict[str, Any] = {}
  layers: list[str] = []
  if first is not None:
    layers = sorted(set(bad_layers[first[0]]), key=_natural_key)
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
      "is non-finite"
      if not np.isfinite(at)
      else (f"is {_fmt(at)}, above {_fmt(th.divergence_factor)} × the initial {_fmt(initial)}")
    )
    summary = f"The loss diverges: at step {div} it {what}{where}."
    return [
      _finding(
        "divergence", "critical", summary, metric="loss", layers=layers, steps=[div], values=values
      )
    ]
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
    )
  ]


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
  window, at least a quarter of the global median of ``|r|``) exceeds
  ``instability_fraction``. Warning ``"instability"``.
  Source: the lecture's "periodic spikes: online learning on unshuffled or imbalanced
  data" and "unstable loss: stuck between minima, large gradients".
  """
  s = _stable_loss(h, th)
  if s is None or s[0].size < th.min_series:
    return []
  steps, loss = s
  use_log = bool(np.all(loss > 0))
  y = np.log(loss) if use_log else loss.copy()
  dt = float(np.median(np.diff(steps))) if steps.size > 1 else 1.0
  dt = dt if dt > 0 else 1.0
  block = max(1, math.ceil(y.size / th.max_points))
  if block > 1:
    m = y.size // block * block
    y = y[:m].reshape(-1, block).max(axis=1)  # The maximum keeps the spikes.
    dt *= block
  n = y.size
  window = max(5, int(th.trend_fraction * n)) | 1
  resid = y - _moving_median(y, window)
  findings: list[Finding] = []

  # Periodic spikes.
  r = resid - resid.mean()
  power = np.abs(np.fft.rfft(r)) ** 2
  k = np.arange(power.size)
  ref = float(np.median(power[1:])) if power.size > 1 else 0.0
  top = float(power[1:].max()) if power.size > 1 else 0.0
  if top > 0:
    ref = max(ref, 1e-12 * top)
    period = n * dt / np.maximum(k, 1)
    in_range = (k >= 4) & (period >= th.min_period) & (period <= n * dt / 4)
    sig = np.flatnonzero(in_range & (power > th.spike_power_ratio * ref))
    if sig.size:
      kk = int(sig[np.argmax(power[sig])])
      lag = _acf_period(r, max(th.min_period / dt, 2.0), n / 4)
      period_steps = (lag if lag is not None else n / kk) * dt
      ratio = float(power[kk] / ref)
      first = int(steps[0])
      summary = (
        f"The loss oscillates with a period of about {period_steps:.3g} steps "
        f"(spectral peak {ratio:.3g} × the median power)."
      )
      findings.append(
        _finding(
          "oscillation",
          "warning",
          summary,
          metric="loss",
          steps=[first],
          values={"period_steps": period_steps, "power_ratio": ratio, "log_domain": use_log},
        )
      )
  if findings:
    return findings

  # Non-periodic instability.
  # The scale: a moving MAD over twice the trend window, at least a quarter of the global
  # MAD (a few equal residuals near the edges must not make the scale vanish).
  mad = _moving_median(np.abs(resid), 2 * window + 1, edge=False)
  floor = max(0.25 * float(np.median(np.abs(resid))), 1e-12 * float(np.max(np.abs(y))), 1e-300)
  spikes = resid > th.spike_factor * np.maximum(mad, floor)
  frac = float(spikes.mean())
  if frac > th.instability_fraction:
    idx = np.flatnonzero(spikes)
    spike_steps = steps[idx * block]  # The first step of each spiking block.
    summary = (
      f"The loss is unstable: {frac:.1%} of the steps jump above the running median by more "
      f"than {_fmt(th.spike_factor)} × its median absolute deviation."
    )
    findings.append(
      _finding(
        "instability",
        "warning",
        summary,
        metric="loss",
        steps=spike_steps,
        values={"spike_fraction": frac, "num_spikes": int(idx.size), "log_domain": use_log},
      )
    )
  return findings


def _rule_early_plateau(h: History, th: Thresholds) -> list[Finding]:
  """Early plateau: the loss barely falls at the start.

  Over the first ``early_fraction`` of the (finite, pre-divergence) loss, with at least
  ``min_points`` points, the relative drop ``(start − end)/|start|`` of a least-squares
  line through the window (in ``log(loss)`` when positive) is below
  ``plateau_rel_change``. Warning.
  Source: the lecture's "plateau at the start: bad initialisation".
  """
  s = _stable_loss(h, th)
  if s is None:
    return []
  steps, loss = _head(*s, th.early_fraction)
  if steps.size < th.min_points:
    return []
  start, end, drop = _rel_drop(steps, loss)
  if drop >= th.plateau_rel_change:
    return []
  summary = (
    f"The loss plateaus early: over steps {int(steps[0])}–{int(steps[-1])} it goes from "
    f"{_fmt(start)} to {_fmt(end)} ({drop:.1%} drop, less than "
    f"{th.plateau_rel_change:.1%})."
  )
  return [
    _finding(
      "early_plateau",
      "warning",
      summary,
      metric="loss",
      steps=[steps[0], steps[-1]],
      values={"start": start, "end": end, "relative_drop": drop},
    )
  ]


def _rule_late_plateau(h: History, th: Thresholds) -> list[Finding]:
  """Late plateau: the loss stopped improving while still far from a good fit.

  Over the last ``late_fraction`` of the (finite, pre-divergence) loss, with at least
  ``min_points`` points, the relative drop of a least-squares line through the window
  (in ``log(loss)`` when positive) is below ``plateau_rel_change``, and the run is still
  far from good: the median ``train/accuracy`` of the window is below ``late_acc`` when
  recorded, else the median loss of the window is above ``late_loss_fraction ×`` the
  initial loss (median of the run's first five points, positive). Warning. Source: the
  lecture's "stuck early then
  overfitting late → decaying learning rate, other initialisation".
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
  values: dict[str, Any] = {"start": start, "end": end, "relative_drop": drop}
  metric: list[str] = ["loss"]
  acc = _series(h, "train/accuracy")
  acc_vals = None
  if acc is not None:
    a_steps, a = _finite(*acc)
    keep = a_steps >= steps[0]
    div = _divergence_step(h, th)
    if div is not None:
      keep &= a_steps < div
    acc_vals = a[keep]
  if acc_vals is not None and acc_vals.size:
    level = float(np.median(acc_vals))
    if level >= th.late_acc:
      return []
    metric.append("train/accuracy")
    values["train_accuracy"] = level
    why = f"training accuracy {level:.3g} < {_fmt(th.late_acc)}"
  else:
    initial = float(np.median(all_loss[:5]))
    level = float(np.median(loss))
    if initial <= 0 or level <= th.late_loss_fraction * initial:
      return []
    values["initial_loss"] = initial
    why = f"loss {_fmt(level)} > {_fmt(th.late_loss_fraction)} × initial {_fmt(initial)}"
  summary = (
    f"The loss is stuck late: over steps {int(steps[0])}–{int(steps[-1])} it falls by only "
    f"{drop:.1%} while still far from a good fit ({why})."
  )
  return [
    _finding(
      "late_plateau",
      "warning",
      summary,
      metric=metric,
      steps=[steps[0], steps[-1]],
      values=values,
    )
  ]


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
  (relative). Suggests early stopping at the step of the minimum test loss. Warning.
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
  if above <= th.overfit_rel:
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
    )
  ]


def _rule_gradients(h: History, th: Thresholds) -> list[Finding]:
  """Vanishing and exploding gradients through depth.

  With ``grads/norm/{layer}`` of at least two (weight) layers in depth order: the ratio
  ``‖g_first‖/‖g_last‖`` of the input-side to the output-side layer at their common steps
  of the last half, its median below ``vanishing_ratio`` → ``"vanishing_gradients"``,
  above ``exploding_ratio`` → ``"exploding_gradients"``. Independently, for any layer,
  the median norm of the last 10 % of its steps above ``exploding_growth ×`` the median of
  the first 10 % (positive) → ``"exploding_gradients"``. Warnings. Source: the lecture's
  vanishing/exploding gradients; per-layer gradient norms as in ikkuna.
  """
  layers = _layers(h, "grads", "norm", weights=True)
  if not layers:
    return []
  findings: list[Finding] = []
  if len(layers) >= 2:
    first, last = layers[0], layers[-1]
    s1 = _series(h, f"grads/norm/{first}")
    s2 = _series(h, f"grads/norm/{last}")
    assert s1 is not None and s2 is not None
    common, i1, i2 = np.intersect1d(s1[0], s2[0], return_indices=True)
    if common.size:
      num, den = s1[1][i1], s2[1][i2]
      ok = np.isfinite(num) & np.isfinite(den) & (den > 0)
      c_steps, ratio = _tail(common[ok], num[ok] / den[ok], 0.5)
      if ratio.size:
        med = float(np.median(ratio))
        keys = [f"grads/norm/{first}", f"grads/norm/{last}"]
        vals = {
          "median_ratio": med,
          f"median/{first}": float(np.median(_tail(common[ok], num[ok], 0.5)[1])),
          f"median/{last}": float(np.median(_tail(common[ok], den[ok], 0.5)[1])),
        }
        if med < th.vanishing_ratio:
          summary = (
            f"Vanishing gradients: the gradient norm of the first layer {first} is "
            f"{_fmt(med)} × that of the last layer {last} (median over the last half, "
            f"below {_fmt(th.vanishing_ratio)})."
          )
          findings.append(
            _finding(
              "vanishing_gradients",
              "warning",
              summary,
              metric=keys,
              layers=[first, last],
              steps=[c_steps[0]],
              values=vals,
            )
          )
        elif med > th.exploding_ratio:
          summary = (
            f"Exploding gradients: the gradient norm of the first layer {first} is "
            f"{_fmt(med)} × that of the last layer {last} (median over the last half, "
            f"above {_fmt(th.exploding_ratio)})."
          )
          findings.append(
            _finding(
              "exploding_gradients",
              "warning",
              summary,
              metric=keys,
              layers=[first, last],
              steps=[c_steps[0]],
              values=vals,
            )
          )
  growing: dict[str, float] = {}
  first_step: list[int] = []
  for lay in _layers(h, "grads", "norm"):
    steps, values = _finite(*_series(h, f"grads/norm/{lay}"))  # type: ignore[misc]
    if steps.size < th.min_points:
      continue
    _, head = _head(steps, values, 0.1)
    t_steps, tail = _tail(steps, values, 0.1)
    h0, h1 = float(np.median(head)), float(np.median(tail))
    if h0 > 0 and h1 > th.exploding_growth * h0:
      growing[lay] = h1 / h0
      first_step.append(int(t_steps[0]))
  if growing and not any(f.name == "exploding_gradients" for f in findings):
    names = list(growing)
    top = max(growing.values())
    summary = (
      f"Exploding gradients: the gradient norm of {len(names)} layer(s) "
      f"({', '.join(names[:5])}{', …' if len(names) > 5 else ''}) grows by up to "
      f"{_fmt(top)} × from the first to the last 10 % of the run (more than "
      f"{_fmt(th.exploding_growth)} ×)."
    )
    findings.append(
      _finding(
        "exploding_gradients",
        "warning",
        summary,
        metric=[f"grads/norm/{lay}" for lay in names],
        layers=names,
        steps=[min(first_step)],
        values={f"growth/{lay}": g for lay, g in growing.items()},
      )
    )
  return findings


def _stalled(h: History, th: Thresholds) -> tuple[list[str], dict[str, float], int | None]:
  """Stalled weight layers (while another moves), their maxima, first step of the window."""
  layers = _layers(h, "updates", "ratio", weights=True)
  maxima: dict[str, float] = {}
  moving = False
  first: int | None = None
  for lay in layers:
    steps, values = _finite(*_series(h, f"updates/ratio/{lay}"))  # type: ignore[misc]
    if steps.size == 0:
      continue
    t_steps, tail = _tail(steps, values, th.stall_fraction)
    top = float(np.max(np.abs(tail)))
    if top < th.stall_ratio:
      maxima[lay] = top
      first = int(t_steps[0]) if first is None else min(first, int(t_steps[0]))
    else:
      moving = True
  if not moving:
    return [], {}, None
  return list(maxima), maxima, first


def _rule_update_ratio(h: History, th: Thresholds) -> list[Finding]:
  """Update/weight ratio ``‖Δθ‖/‖θ‖`` per layer far from the target ``1e-3``.

  The median of ``updates/ratio/{layer}`` over the last half of its steps, per weight
  layer: above ``ratio_high`` → ``"update_ratio_high"`` (learning rate too high for the
  layer); below ``ratio_low`` → ``"update_ratio_low"`` (too low, the layer hardly learns;
  layers reported as stalled are left out). Warnings. Source: the ikkuna thesis (update
  ratio around 1e-3, Karpathy's rule of thumb).
  """
  layers = _layers(h, "updates", "ratio", weights=True)
  stalled = set(_stalled(h, th)[0])
  med, first = _layer_tail_medians(h, "updates/ratio", layers)
  findings: list[Finding] = []
  for name, pick, word, bound in (
    ("update_ratio_high", lambda m: m > th.ratio_high, "above", th.ratio_high),
    ("update_ratio_low", lambda m: m < th.ratio_low, "below", th.ratio_low),
  ):
    bad = [lay for lay, m in med.items() if pick(m) and lay not in stalled]
    if not bad:
      continue
    shown = ", ".join(f"{lay} {_fmt(med[lay])}" for lay in bad[:5])
    summary = (
      f"Update/weight ratio {word} {_fmt(bound)} in {len(bad)} layer(s) (median over the "
      f"last half: {shown}{', …' if len(bad) > 5 else ''}; target ≈ 1e-3)."
    )
    findings.append(
      _finding(
        name,
        "warning",
        summary,
        metric=[f"updates/ratio/{lay}" for lay in bad],
        layers=bad,
        steps=[min(first[lay] for lay in bad)],
        values={f"median/{lay}": m for lay, m in med.items()},
      )
    )
  return findings


def _activation_rule(
  h: History, th: Thresholds, stat: str, name: str, bound: float, what: str
) -> list[Finding]:
  layers = _layers(h, "activations", stat)
  if th.exclude_output_layer and len(layers) > 1:
    layers = layers[:-1]
  med, first = _layer_tail_medians(h, f"activations/{stat}", layers)
  bad = [lay for lay, m in med.items() if m > bound]
  if not bad:
    return []
  shown = ", ".join(f"{lay} {med[lay]:.0%}" for lay in bad[:5])
  summary = (
    f"{what} in {len(bad)} layer(s) (median fraction over the last half above "
    f"{bound:.0%}: {shown}{', …' if len(bad) > 5 else ''})."
  )
  return [
    _finding(
      name,
      "warning",
      summary,
      metric=[f"activations/{stat}/{lay}" for lay in bad],
      layers=bad,
      steps=[min(first[lay] for lay in bad)],
      values={f"median/{lay}": m for lay, m in med.items()},
    )
  ]


def _rule_dead_units(h: History, th: Thresholds) -> list[Finding]:
  """Dead ReLU units: median ``activations/dead_fraction/{layer}`` over the last half above
  ``dead_fraction`` (a unit is dead when its pre-activation is ``≤ 0`` for the whole batch).
  The output layer is left out with ``exclude_output_layer``. Warning. Source: the
  lecture's dying-ReLU diagnosis; Cockpit-style activation health."""
  return _activation_rule(h, th, "dead_fraction", "dead_units", th.dead_fraction, "Dead units")


def _rule_saturation(h: History, th: Thresholds) -> list[Finding]:
  """Saturated units: median ``activations/saturation_fraction/{layer}`` (entries with
  ``|y| > 3``) over the last half above ``saturation_fraction``. The output layer is left
  out with ``exclude_output_layer``. Warning. Source: the lecture's saturating
  sigmoid/tanh diagnosis."""
  return _activation_rule(
    h, th, "saturation_fraction", "saturation", th.saturation_fraction, "Saturated units"
  )


def _rule_stalled_layers(h: History, th: Thresholds) -> list[Finding]:
  """Layers that stopped moving while others still move.

  A weight layer whose ``updates/ratio/{layer}`` stays below ``stall_ratio`` (absolute)
  at every step of the last ``stall_fraction`` of its steps, while at least one other
  layer is above it. Warning (expected for layers frozen on purpose). Source: ikkuna's
  per-layer update ratio; the capacity thesis's frozen layers.
  """
  layers, maxima, first = _stalled(h, th)
  if not layers:
    return []
  summary = (
    f"{len(layers)} layer(s) stopped moving ({', '.join(layers[:5])}"
    f"{', …' if len(layers) > 5 else ''}): ‖Δθ‖/‖θ‖ < {_fmt(th.stall_ratio)} over the last "
    f"{th.stall_fraction:.0%} of the steps while other layers still move (expected only "
    "for layers frozen on purpose)."
  )
  return [
    _finding(
      "stalled_layers",
      "warning",
      summary,
      metric=[f"updates/ratio/{lay}" for lay in layers],
      layers=layers,
      steps=[first],
      values={f"max/{lay}": m for lay, m in maxima.items()},
    )
  ]


_ADAPTIVE_HINT = re.compile(r"adam|rms|ada|lion|lamb|lars|sm3|yogi|novograd|fromage|sophia|shampoo")


def _curvature_limit(config: Mapping[str, Any], th: Thresholds) -> float | None:
  """The stable ``lr · λ_max`` bound for the run's optimizer; ``None`` for adaptive ones."""
  opt = str(config.get("optimizer", "sgd")).lower()
  args = config.get("optimizer_args") or {}
  beta = args.get("momentum") if isinstance(args, Mapping) else None
  nesterov = opt == "nesterov" or (isinstance(args, Mapping) and bool(args.get("nesterov")))
  if opt in ("momentum", "nesterov") and beta is None:
    beta = 0.9
  if opt not in ("sgd", "momentum", "nesterov"):
    return None if _ADAPTIVE_HINT.search(opt) else th.curvature_limit
  beta = float(beta or 0.0)
  if nesterov:
    return th.curvature_limit * (1 + beta) / (1 + 2 * beta)
  return th.curvature_limit * (1 + beta)


def _rule_lr_curvature(h: History, th: Thresholds) -> list[Finding]:
  """Learning rate above the curvature limit.

  With ``hess_max_ev`` (largest Hessian eigenvalue ``λ_max``) and the learning rate (key
  ``lr`` at the same or the last earlier step, else ``config["lr"]``): the product
  ``lr · λ_max`` exceeds the stability limit on more than ``curvature_fraction`` of the
  measured steps. The limit is ``curvature_limit`` (2: gradient descent on a quadratic
  diverges along the top eigenvector when ``lr > 2/λ_max``), ``2(1 + β)`` for heavy-ball
  momentum β and ``2(1 + β)/(1 + 2β)`` for Nesterov momentum (``config["optimizer"]`` and
  ``config["optimizer_args"]``, β = 0.9 for ``"momentum"``/``"nesterov"``); the rule is
  skipped for adaptive optimizers (Adam, RMSProp, …), whose effective step differs.
  Warning. Source: the classical quadratic stability bound; Cockpit's ``hess_max_ev``.
  """
  ev = _series(h, "hess_max_ev")
  if ev is None:
    return []
  limit = _curvature_limit(h.config, th)
  if limit is None:
    return []
  e_steps, lam = _finite(*ev)
  if e_steps.size == 0:
    return []
  lr_series = _series(h, "lr")
  if lr_series is not None:
    l_steps, lrs = lr_series
    idx = np.searchsorted(l_steps, e_steps, side="right") - 1
    keep = idx >= 0
    e_steps, lam, lr = e_steps[keep], lam[keep], lrs[idx[keep]]
  else:
    base = h.config.get("lr", h.config.get("learning_rate"))
    if not isinstance(base, int | float) or isinstance(base, bool):
      return []
    lr = np.full(lam.shape, float(base))
  if e_steps.size == 0:
    return []
  product = lr * lam
  over = product > limit
  frac = float(over.mean())
  if frac <= th.curvature_fraction:
    return []
  worst = int(np.argmax(product))
  summary = (
    f"The learning rate is above the curvature limit: lr · λ_max > {_fmt(limit)} on "
    f"{frac:.0%} of the {e_steps.size} measured steps (largest {_fmt(product[worst])} at "
    f"step {int(e_steps[worst])}, i.e. lr {_fmt(lr[worst])} vs 2/λ_max "
    f"{_fmt(2 / lam[worst])})."
  )
  return [
    _finding(
      "lr_above_curvature_limit",
      "warning",
      summary,
      metric=["lr", "hess_max_ev"],
      steps=e_steps[over],
      values={
        "limit": limit,
        "fraction": frac,
        "max_product": float(product[worst]),
        "max_step": int(e_steps[worst]),
      },
    )
  ]


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
  "gradients": _rule_gradients,
  "update_ratio": _rule_update_ratio,
  "dead_units": _rule_dead_units,
  "saturation": _rule_saturation,
  "stalled_layers": _rule_stalled_layers,
  "lr_above_curvature_limit": _rule_lr_curvature,
}


# --------------------------------------------------------------------------- entry points


def _as_history(history: Any) -> History:
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


def _sort_key(f: Finding) -> tuple[int, float, str]:
  steps = f.evidence.get("steps") or []
  first = min(steps) if steps else math.inf
  return SEVERITIES.index(f.severity), first, f.name


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
    The findings, most severe first (critical, warning, info), then by the first step of
    their evidence, then by name. Empty when nothing was found.

  Raises:
    TypeError: an override names no field of :class:`Thresholds`, or ``history`` has an
      unsupported type.
  """
  th = thresholds if thresholds is not None else Thresholds()
  if overrides:
    fields = {f.name for f in dataclasses.fields(Thresholds)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise TypeError(f"diagnose: unknown thresholds {unknown}; known: {sorted(fields)}.")
    th = dataclasses.replace(th, **overrides)
  # Integer thresholds given as integral floats (e.g. from a command line) become ints.
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
  h = _as_history(history)
  findings: list[Finding] = []
  for rule in RULES.values():
    findings.extend(rule(h, th))
  return sorted(findings, key=_sort_key)


def findings_to_json(findings: Iterable[Finding]) -> list[dict[str, Any]]:
  """The findings as a list of JSON-serialisable dicts (:meth:`Finding.to_dict`)."""
  return [f.to_dict() for f in findings]


def report(findings: Sequence[Finding]) -> str:
  """A readable text report of the findings, most severe first.

  Returns ``"No problem found."`` when there is none.
  """
  if not findings:
    return "No problem found."
  findings = sorted(findings, key=_sort_key)
  counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
  head = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
  lines = [f"{len(findings)} finding(s) ({head}):"]
  for f in findings:
    lines.append("")
    lines.append(f"[{f.severity.upper()}] {f.name}: {f.summary}")
    ev = f.evidence
    if ev.get("layers"):
      lines.append(f"  layers: {', '.join(ev['layers'])}")
    if ev.get("steps"):
      lines.append(f"  steps: {', '.join(str(s) for s in ev['steps'])}")
    for tip in f.advice:
      lines.append(f"  - try: {tip}")
  return "\n".join(lines)
