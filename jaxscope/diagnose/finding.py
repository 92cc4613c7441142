"""What a diagnosis returns: :class:`Finding`, the :class:`Thresholds` of every rule, and the
advice per finding name.

A rule builds its findings with :func:`_finding`, which attaches the advice of the finding's
name and turns the evidence into strict-JSON values (:func:`jaxscope.record.to_jsonable`:
non-finite numbers as ``"NaN"``, ``"Infinity"``, ``"-Infinity"``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxscope.record import to_jsonable

#: Severities, most severe first.
SEVERITIES: tuple[str, ...] = ("critical", "warning", "info")

#: Confidences, most certain first (see :func:`_confidence`).
CONFIDENCES: tuple[str, ...] = ("high", "medium", "low")

#: Confidence "high": the evidence is at least this factor past its threshold...
HIGH_MARGIN = 2.0
#: ...confidence "low": less than this factor past it.
LOW_MARGIN = 1.25

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
      ``"lr_above_curvature_limit"``, ``"lost_updates"``, ``"nonfinite_data"``,
      ``"unnormalised_inputs"``, ``"class_imbalance"``, ``"too_few_steps"``,
      ``"loss_output_mismatch"``, ``"lr_too_low"``, ``"bad_init_scale"``, ``"label_noise"``,
      ``"dropout_too_strong"``; the info
      ``"curvature_not_judged"`` (every λ_max reading within its error bar's noise),
      ``"edge_of_stability"`` (``lr · λ_max`` at the limit while the loss falls: healthy),
      ``"catapult"`` (the loss spiked above the divergence factor and recovered),
      ``"regularised_plateau"`` (a late plateau where decoupled weight decay holds the
      weights).
    severity: ``"critical"``, ``"warning"`` or ``"info"``.
    summary: one readable sentence with the numbers.
    evidence: JSON-serialisable dict: ``"metric"`` (the key or keys read), ``"layers"``,
      ``"steps"`` (the steps that show it, at most 20) and ``"values"`` (named numbers).
      Non-finite numbers are the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (the
      JSON convention of :mod:`jaxscope.record.jsonio`).
    advice: what to try, most promising first.
    confidence: ``"high"``, ``"medium"`` or ``"low"``: how far the evidence is past the
      rule's threshold and how many points it rests on (:func:`_confidence`; the criteria
      per rule are in ``docs/diagnose-rules.md``). ``"low"`` also marks a finding that
      only the steps after a divergence show (a consequence, not a cause).
  """

  name: str
  severity: str
  summary: str
  evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
  advice: list[str] = dataclasses.field(default_factory=list)
  confidence: str = "medium"

  def __post_init__(self) -> None:
    if self.severity not in SEVERITIES:
      raise ValueError(f"Finding: severity must be one of {SEVERITIES}, got {self.severity!r}.")
    if self.confidence not in CONFIDENCES:
      raise ValueError(
        f"Finding: confidence must be one of {CONFIDENCES}, got {self.confidence!r}."
      )

  def to_dict(self) -> dict[str, Any]:
    """The finding as a JSON-serialisable dict (``json.dumps(..., allow_nan=False)`` works)."""
    return {
      "name": self.name,
      "severity": self.severity,
      "summary": self.summary,
      "evidence": to_jsonable(self.evidence),
      "advice": list(self.advice),
      "confidence": self.confidence,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Finding:
    """The inverse of :meth:`to_dict`; a dict without ``"confidence"`` (written before
    findings had one) gets ``"medium"``."""
    return cls(
      name=d["name"],
      severity=d["severity"],
      summary=d["summary"],
      evidence=dict(d.get("evidence", {})),
      advice=list(d.get("advice", [])),
      confidence=d.get("confidence", "medium"),
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
  spike_min_rel: float = 0.2
  """Instability: a spike also rises at least this fraction above the trend (log domain:
  ``log(1 + spike_min_rel)``): minibatch noise of a few percent on a flat stretch is not
  instability, however small the local MAD."""
  instability_min_events: int = 3
  """Instability: fewest separate spike events (runs of consecutive spiking points): one
  excursion of a few steps, such as a catapult, is not a loss that keeps jumping."""
  instability_min_points: int = 100
  """Instability: fewest loss points to judge a fraction of spikes (at 40 points one
  spike is 2.5 %, which says nothing)."""
  # plateaus
  min_points: int = 10
  """Plateaus and overfitting: fewest points a window needs; shorter windows are skipped."""
  plateau_rel_change: float = 0.05
  """Plateaus: a window whose loss falls by less than this fraction of its start value."""
  early_fraction: float = 0.1
  """Early plateau: the first ``early_fraction`` of the run."""
  late_fraction: float = 0.2
  """Late plateau: the last ``late_fraction`` of the run (also the stretch the too-few-steps
  rule reads)."""
  mismatch_acc: float = 0.8
  """Loss/output mismatch: the median accuracy of the last ``late_fraction`` at least this..."""
  mismatch_loss_fraction: float = 0.5
  """...while the median loss there is above this fraction of the initial loss."""
  still_improving: float = 0.1
  """Too few steps: the loss's fall over the last ``late_fraction`` of the run above this
  fraction of the run's whole improvement."""
  tail_min_points: int = 5
  """Too few steps: the last stretch is the last ``late_fraction`` of the run widened to at
  least this many points, and the run needs twice as many (a 12-step run is judged on its
  last 5 points)."""
  late_acc: float = 0.9
  """Late plateau, dead units, saturation: "still far from a good fit" needs the median
  training accuracy of the last stretch below this (when ``train/accuracy`` is recorded)..."""
  late_loss_fraction: float = 0.5
  """...and its median loss above this fraction of the loss of a model that learned
  nothing (``ln(num_classes)`` for classification, else the run's initial loss)."""
  decay_share: float = 0.25
  """Late plateau held by the regularisation: decoupled weight decay (``lr · wd`` per step)
  at least this share of the weight layers' median update/weight ratio over the stretch
  makes the plateau the info ``regularised_plateau`` (the weights sit where the decay
  balances the gradient). Typical AdamW settings (lr 1e-3, wd 1e-4–0.1) give 1e-4–0.1; the
  fault benchmark's heavy-weight-decay stress runs (lr 3e-3, wd 1.0) 0.36–1."""
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
  ratio_high: float = 3e-2
  """Update ratio: median ‖Δθ‖/‖θ‖ over the last half above this (rule of thumb ≈ 1e-3;
  healthy momentum-SGD runs of the fault benchmark's four tasks settle at 4e-3–1.4e-2,
  highest in the output layer of a one-output regression net)."""
  transient_ratio: float = 1e-2
  """Too few steps: a run too short for the update-ratio rules whose ratio over its last
  stretch is above this stopped inside its early transient."""
  ratio_low: float = 1e-5
  """Update ratio: median ‖Δθ‖/‖θ‖ over the last half below this."""
  ratio_warmup: int = 50
  """Update ratio (and ``lr_too_low``): the first steps of the run are left out (the
  transient of the first steps, when momentum builds up and the loss falls fastest: the
  ratios of healthy digits runs peak near 3e-2 at steps 25–30); the rules read the last
  half of the remaining steps and need ``min_points`` there."""
  lr_low_ratio: float = 1e-3
  """Learning rate too low: the median ‖Δθ‖/‖θ‖ of every weight layer below this (the
  usual ≈ 1e-3) while the loss falls slowly and stays far from a good fit."""
  lr_target_ratio: float = 3e-3
  """Learning rate too low: the ratio its suggested factor aims the median layer at, the
  median layer's ratio of healthy runs (3.3e-3 on the benchmark's calibration tasks,
  digits and moons, SGD with momentum 0.9 at lr 0.05). The ratio grows more slowly than
  the learning rate (a slower run keeps larger gradients), so aiming at the threshold
  ``lr_low_ratio`` undershot: factors of 3 and 30 for learning rates 50× and 500× below
  the healthy one."""
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
  # lost updates
  lost_fraction: float = 0.5
  """Lost updates: median of ``updates/lost_fraction`` over the last half above this."""
  # curvature
  curvature_limit: float = 2.0
  """Curvature: plain gradient descent is unstable on a quadratic when ``lr · λ_max``
  exceeds 2; heavy-ball momentum β raises the limit to ``curvature_limit · (1 + β)`` and
  Nesterov momentum to ``curvature_limit · (1 + β) / (1 + 2β)``."""
  curvature_fraction: float = 0.5
  """Curvature: reported when the limit is exceeded on more than this fraction of the
  steps where ``hess_max_ev`` was measured."""
  curvature_min_points: int = 5
  """Curvature: fewest trusted ``hess_max_ev`` readings to judge a fraction over the limit."""
  # data (config["data_stats"])
  input_scale_max: float = 20.0
  """Data: inputs reaching ``|x|`` above this are unnormalised (raw 0–255 pixels)."""
  input_std_min: float = 1e-3
  """Data: inputs whose standard deviation is below this barely vary."""
  input_std_max: float = 4.0
  """Data: inputs whose standard deviation is above this are unnormalised (standardised
  inputs have 1, pixels in [0, 1] about 0.3; sklearn's 0–16 digits 6)."""
  target_scale_max: float = 100.0
  """Data: regression targets reaching ``|y|`` above this are unnormalised."""
  imbalance_ratio: float = 0.1
  """Data: the rarest class's share below this × the commonest's is an imbalance."""
  # the run's setup: initialisation, labels, dropout
  init_loss_factor: float = 3.0
  """Bad initial scale: the first loss of a classification run above this × the chance
  level ``ln(num_classes)`` (large initial logits) while the inputs are normalised."""
  init_growth: float = 2.5
  """Bad initial scale: the standard deviation of the layers' outputs at the first step
  grows (or shrinks) by more than this factor per layer (geometric mean through depth,
  every consecutive layer in the same direction, at least 3 layers)."""
  noise_gap: float = 0.1
  """Label noise / dropout: the test accuracy above the training accuracy (measured on the
  training batches, against their labels) by more than this over the last
  ``late_fraction``, while the training loss stays above the test loss."""
  dropout_rate_min: float = 0.3
  """Dropout too strong: a recorded dropout rate of at least this takes the train–test gap
  (below it the gap is read as label noise)."""
  dropout_rate_high: float = 0.7
  """Dropout too strong by its rate alone: a rate of at least this in a run that diverged
  or is still far from a good fit."""
  dropout_loss_ratio: float = 1.5
  """Dropout too strong, without an accuracy (regression): the training loss above this ×
  the test loss."""
  eos_band: float = 1.2
  """Curvature: ``lr · λ_max`` whose median over the steps above the limit stays within
  ``eos_band ×`` the limit while the loss keeps falling is the edge of stability of
  gradient descent (Cohen et al. 2021), not a fault: reported as the info
  ``edge_of_stability``."""


# --------------------------------------------------------------------------- advice

_ADVICE: dict[str, list[str]] = {
  "catapult": [
    "nothing needs to change: the run recovered and converges",
    "a slightly lower learning rate or a short warm-up avoids the spike",
  ],
  "divergence": [
    "lower the learning rate by 10×, and again while it still diverges (with --stop-on "
    "divergence each try ends where it diverges), or add a warm-up",
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
  "regularised_plateau": [
    "nothing needs to change if the test metrics are good: the weight decay trades "
    "training loss for smaller weights",
    "lower weight_decay (optimizer_args) if the training loss should fall further",
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
  "lost_updates": [
    "keep a float32 master copy of the parameters (cast to bfloat16 for the forward pass)",
    "raise the learning rate of these layers, or accumulate updates before applying them",
    "use stochastic rounding when storing bfloat16 parameters",
  ],
  "lr_above_curvature_limit": [
    "lower the learning rate below the curvature limit (2/λ_max for SGD)",
    "use a warm-up or a decaying learning rate",
  ],
  "loss_output_mismatch": [
    "return logits from the model when the loss applies (log-)softmax itself "
    "(optax.softmax_cross_entropy*): remove the final softmax",
    "for a model that outputs probabilities, use a loss on their logarithm, not on logits",
  ],
  "too_few_steps": [
    "train for more steps: the loss had not stopped falling",
    "with a fixed budget, raise the learning rate or decay it later",
  ],
  "nonfinite_data": [
    "find and drop (or impute) the examples with NaN/Inf entries before training",
    "check the data pipeline: a division by zero, log of 0 or an overflow in preprocessing",
  ],
  "unnormalised_inputs": [
    "standardise the inputs (subtract the mean, divide by the standard deviation) or scale "
    "pixels to [0, 1]",
    "scale regression targets to unit variance (and undo it for predictions)",
  ],
  "class_imbalance": [
    "re-weight the loss by inverse class frequency, or over-sample the rare classes",
    "judge the model by a balanced metric (per-class recall), not only accuracy",
  ],
  "lr_too_low": [
    "compare a short sweep around the suggested learning rate (÷3, ×1, ×3): the factor "
    "brings ‖Δθ‖/‖θ‖ near 1e-3 if the ratio scales with the learning rate",
    "with a fixed step budget, use a schedule with a higher peak (warm-up then decay)",
    "if the learning rate cannot change, train for many more steps",
  ],
  "bad_init_scale": [
    "use an initialisation scaled to the activation and fan-in (He for ReLU, "
    "LeCun/Glorot for tanh and linear layers): the layers' outputs should keep a standard "
    "deviation near 1 through depth and the first loss near ln(num_classes)",
    "add normalisation layers (batch or layer normalisation)",
  ],
  "label_noise": [
    "check the training labels: look at the examples whose loss stays highest (they are "
    "often mislabelled) and fix or drop them",
    "use a loss that is robust to noisy labels (label smoothing, bootstrapping, "
    "generalised cross-entropy), or stop early before the model memorises the noise",
    "check that the training labels are aligned with the inputs (a shuffle or shift "
    "applied to one but not the other)",
  ],
  "dropout_too_strong": [
    "lower the dropout rate (e.g. halve it, or 0.1–0.3 for small layers)",
    "apply dropout to fewer or wider layers, or regularise with weight decay instead",
    "if a lower rate does not close the train–test gap, check the training labels "
    "(noisy labels look the same in the record)",
  ],
  "edge_of_stability": [
    "nothing to fix: gradient descent settles where lr · λ_max ≈ 2 and keeps making progress "
    "(Cohen et al. 2021); lower the learning rate only if the loss stops falling",
  ],
  "curvature_not_judged": [
    "measure λ_max with a residual check (instruments(max_ev_tol=0.05), the default) or "
    "more Lanczos steps, so that its residual falls below |λ_max|/2",
    "record more steps: a warm-started estimate converges over the steps",
  ],
}


# --------------------------------------------------------------------------- construction


def _finding(
  name: str,
  severity: str,
  summary: str,
  *,
  metric: str | Sequence[str],
  layers: Sequence[str] = (),
  steps: Iterable[Any] = (),
  values: Mapping[str, Any] | None = None,
  confidence: str = "medium",
  advice: Sequence[str] = (),
) -> Finding:
  """A :class:`Finding` with the advice of ``name`` (after ``advice``, run-specific lines
  such as a suggested factor) and the evidence dict ``{"metric", "layers", "steps" (the
  first 20), "values"}`` in strict-JSON values."""
  steps = [int(s) for s in steps][:_MAX_STEPS_SHOWN]
  evidence = {
    "metric": metric if isinstance(metric, str) else list(metric),
    "layers": list(layers),
    "steps": steps,
    "values": dict(values or {}),
  }
  tips = [*advice, *_ADVICE.get(name, [])]
  return Finding(name, severity, summary, to_jsonable(evidence), tips, confidence)


def _nice(x: float) -> float:
  """``x`` rounded to one significant digit (2.8 → 3, 16 → 20)."""
  if x <= 0 or not math.isfinite(x):
    return x
  return float(f"{x:.1g}")  # Rounds half to even, as round() does; no 0.0009000000000000001.


def _margin(value: float, bound: float, *, above: bool) -> float:
  """How far ``value`` is past ``bound``, as a factor (``≥ 1`` when it is past it).

  ``value / bound`` for a rule that fires above ``bound``, ``bound / value`` for one that
  fires below it; ``inf`` when the value is past a positive bound by any factor (a value
  of 0 or below for a "below" rule, a non-finite one) and 0 when ``bound`` is not positive.
  """
  if not math.isfinite(value):
    return math.inf
  if bound <= 0:
    return 0.0 if not above or value <= 0 else math.inf
  if above:
    return value / bound
  return bound / value if value > 0 else math.inf


def _confidence(margin: float, points: int | None = None, min_points: int = 1) -> str:
  """The confidence of a finding from its evidence.

  Args:
    margin: how far the measured value is past the rule's threshold, as a factor
      (:func:`_margin`; ``≥ 1`` when the rule fires).
    points: how many points the measurement rests on (``None``: not a sample of a noisy
      series, e.g. the data statistics or a configuration value).
    min_points: the rule's minimum evidence (fewer points and the rule does not judge).

  Returns:
    ``"high"`` when ``margin ≥ HIGH_MARGIN`` (2) and the evidence holds at least twice the
    minimum number of points; ``"low"`` when ``margin < LOW_MARGIN`` (1.25: just past the
    threshold, where noise could have put it); ``"medium"`` otherwise.
  """
  if margin < LOW_MARGIN:
    return "low"
  enough = points is None or points >= 2 * max(int(min_points), 1)
  return "high" if margin >= HIGH_MARGIN and enough else "medium"


def _fmt(x: float) -> str:
  """A number in a summary: three significant digits."""
  return f"{x:.3g}"
