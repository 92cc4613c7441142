"""Tests of jaxscope.diagnose: each rule on synthetic histories, healthy runs, ordering, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxscope.diagnose import (
  CONFIDENCES,
  RULES,
  Finding,
  Thresholds,
  diagnose,
  findings_to_json,
  report,
)
from jaxscope.record import History

N = 1000
LAYERS = ("Dense_0", "Dense_1", "Dense_2")


def _base(seed: int = 0, n: int = N) -> dict[str, np.ndarray]:
  """Arrays of a healthy run: exponentially decaying loss with multiplicative noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(n, dtype=np.float64)
  out: dict[str, np.ndarray] = {
    "loss": (2.3 * np.exp(-t / 250) + 0.05) * np.exp(0.1 * rng.standard_normal(n)),
    "train/accuracy": np.clip(1 - 0.9 * np.exp(-t / 200) + 0.01 * rng.standard_normal(n), 0, 1),
    "lr": np.full(n, 0.05),
    "hess_max_ev": 10.0 * np.exp(0.1 * rng.standard_normal(n)),
  }
  for lay in LAYERS:
    out[f"grads/norm/{lay}/kernel"] = np.exp(0.2 * rng.standard_normal(n))
    out[f"grads/norm/{lay}/bias"] = 0.1 * np.exp(0.2 * rng.standard_normal(n))
    out[f"params/norm/{lay}/kernel"] = np.full(n, 10.0)
    out[f"updates/ratio/{lay}/kernel"] = 1e-3 * np.exp(0.3 * rng.standard_normal(n))
    out[f"updates/ratio/{lay}/bias"] = 3e-2 * np.exp(0.3 * rng.standard_normal(n))
    out[f"activations/dead_fraction/{lay}"] = np.clip(0.05 + 0.01 * rng.standard_normal(n), 0, 1)
    out[f"activations/saturation_fraction/{lay}"] = np.full(n, 0.02)
    out[f"activations/std/{lay}"] = np.exp(0.05 * rng.standard_normal(n))
  return out


def _test_loss(n: int = N, every: int = 50, best: int | None = None) -> dict[int, float]:
  steps = range(0, n, every)
  if best is None:
    return {s: 2.3 * np.exp(-s / 250) + 0.1 for s in steps}
  return {s: 0.5 + ((s - best) / 500) ** 2 for s in steps}


def _history(
  arrays: dict[str, np.ndarray],
  sparse: dict[str, dict[int, float]] | None = None,
  config: dict | None = None,
) -> History:
  n = max(len(v) for v in arrays.values()) if arrays else 0
  records = []
  for s in range(n):
    values = {k: float(v[s]) for k, v in arrays.items() if s < len(v)}
    for k, by_step in (sparse or {}).items():
      if s in by_step:
        values[k] = float(by_step[s])
    records.append((s, values))
  return History(records, config=config or {"lr": 0.05, "optimizer": "sgd"})


def _healthy(seed: int = 0) -> History:
  return _history(_base(seed), {"test/loss": _test_loss()})


def _names(findings: list[Finding]) -> list[str]:
  return [f.name for f in findings]


def _one(findings: list[Finding], name: str) -> Finding:
  found = [f for f in findings if f.name == name]
  assert len(found) == 1, _names(findings)
  return found[0]


# --------------------------------------------------------------------------- healthy runs


@pytest.mark.parametrize("seed", range(6))
def test_healthy_run_has_no_finding(seed):
  findings = diagnose(_healthy(seed))
  assert findings == [], report(findings)


def test_empty_and_missing_keys_do_not_crash():
  assert diagnose(History([])) == []
  assert diagnose(History([(0, {"loss": 1.0})])) == []
  assert diagnose(History([(s, {"grads/norm/a": 1.0}) for s in range(3)])) == []
  # Histogram arrays and strings of other shapes are ignored.
  h = History([(s, {"params/histogram_counts/a": [1, 2, 3], "loss": 1.0}) for s in range(5)])
  assert diagnose(h) == []
  for rule in RULES.values():
    assert rule(History([]), Thresholds()) == []


def test_inputs_mapping_and_run_dir(tmp_path):
  base = _base(0)
  base["loss"][600:] = np.nan
  mapping = {k: (np.arange(N), v) for k, v in base.items()}
  assert _names(diagnose(mapping)) == ["divergence"]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for s in range(N):
      f.write(json.dumps({"step": s, "values": {"loss": float(base["loss"][s])}}) + "\n")
  assert _names(diagnose(tmp_path)) == ["divergence"]
  assert _names(diagnose(str(tmp_path))) == ["divergence"]
  with pytest.raises(TypeError, match="History"):
    diagnose(42)


# --------------------------------------------------------------------------- divergence


def test_divergence_nan_names_first_step_and_layer():
  base = _base(1)
  base["loss"][600:] = np.nan
  base["params/norm/Dense_1/kernel"][598:] = np.inf
  base["grads/norm/Dense_0/kernel"][599:] = np.nan
  base["grads/norm/Dense_2/kernel"][700:] = np.nan  # After the divergence: not the first.
  f = _one(diagnose(_history(base)), "divergence")
  assert f.severity == "critical"
  assert f.evidence["steps"] == [600]
  assert f.evidence["values"]["first_nonfinite_step"] == 598
  assert f.evidence["values"]["first_nonfinite_key"] == "params/norm/Dense_1/kernel"
  assert f.evidence["values"]["first_nonfinite_layer"] == "Dense_1/kernel"
  assert f.evidence["layers"] == ["Dense_1/kernel"]
  assert f.evidence["values"]["loss_at_step"] == "NaN"
  assert "598" in f.summary and "600" in f.summary and "Dense_1/kernel" in f.summary


def test_divergence_by_factor_and_nonfinite_fraction():
  base = _base(2)
  initial = base["loss"][0]
  base["loss"][700:] = initial * 20
  f = _one(diagnose(_history(base)), "divergence")
  assert f.evidence["steps"] == [700]
  assert f.evidence["values"]["initial_loss"] == pytest.approx(initial)
  assert diagnose(_history(base), divergence_factor=30) == []
  # A finite loss with non-finite parameters is still reported.
  base = _base(2)
  base["params/nonfinite_fraction/Dense_2/kernel"] = np.where(np.arange(N) >= 300, 0.1, 0.0)
  f = _one(diagnose(_history(base)), "divergence")
  assert f.evidence["steps"] == [300]
  assert f.evidence["layers"] == ["Dense_2/kernel"]


def test_divergence_of_a_squared_loss_estimates_how_far_to_lower_the_learning_rate():
  # The first update multiplies the loss by r = 9: (1 − lr·λ_max)² ≥ 9, lr·λ_max ≥ 4, and
  # a learning rate ×1/4 (0.2 to one significant digit) brings lr·λ_max to at most 1.
  loss = np.array([0.5, 4.5, 40.0, 400.0, np.nan, np.nan])
  regression = {"lr": 0.5, "optimizer": "momentum", "task": "regression"}
  f = _one(diagnose(_history({"loss": loss}, config=regression)), "divergence")
  values = f.evidence["values"]
  assert values["first_update_loss_ratio"] == pytest.approx(9.0)
  assert values["lr_curvature_at_least"] == pytest.approx(4.0)
  assert values["suggested_factor"] == 0.2
  assert f.advice[0].startswith("lower the learning rate by about ×0.2 (from 0.5 to 0.1)")
  assert "lr·λ_max ≥ 4" in f.advice[0] and len(f.advice) == 4  # before the usual three
  # A run stopped by --stop-on divergence says the same.
  stopped = _history({"loss": loss[:2]}, {"stop/nonfinite_loss": {1: 1.0}}, config=regression)
  f = _one(diagnose(stopped), "divergence")
  assert f.evidence["values"]["suggested_factor"] == 0.2 and f.evidence["values"]["stop"]
  # No estimate: a cross-entropy (the ratio says little of lr·λ_max), a first update that
  # lowered the loss, or no first two consecutive steps.
  for config, arrays in (
    ({**regression, "task": "classification"}, {"loss": loss}),
    (regression, {"loss": np.array([0.5, 0.4, 40.0, np.nan])}),
  ):
    f = _one(diagnose(_history(arrays, config=config)), "divergence")
    assert "suggested_factor" not in f.evidence["values"]
    assert f.advice[0].startswith("lower the learning rate by 10×")
  records = [(0, {"loss": 0.5}), (10, {"loss": 4.5}), (20, {"loss": np.nan})]
  sparse = History(records, config=regression)
  assert "suggested_factor" not in _one(diagnose(sparse), "divergence").evidence["values"]


# --------------------------------------------------------------------------- oscillation


@pytest.mark.parametrize(("period", "factor"), [(25, 3.0), (37, 3.0), (50, 3.0), (120, 10.0)])
def test_periodic_spikes_report_the_period(period, factor):
  base = _base(3)
  t = np.arange(N)
  base["loss"] = base["loss"] * np.where(t % period == 7, factor, 1.0)
  findings = diagnose(_history(base))
  f = _one(findings, "oscillation")
  assert f.severity == "warning"
  assert f.evidence["values"]["period_steps"] == pytest.approx(period, rel=0.1)
  assert "instability" not in _names(findings)


def test_sinusoidal_oscillation_with_recording_interval():
  rng = np.random.default_rng(4)
  steps = np.arange(0, 5000, 5)  # Recorded every 5 steps.
  loss = (2 * np.exp(-steps / 1500) + 0.1) * np.exp(
    0.3 * np.sin(2 * np.pi * steps / 400) + 0.05 * rng.standard_normal(steps.size)
  )
  h = History([(int(s), {"loss": float(v)}) for s, v in zip(steps, loss, strict=True)])
  f = _one(diagnose(h), "oscillation")
  assert f.evidence["values"]["period_steps"] == pytest.approx(400, rel=0.1)


def test_periodic_spikes_in_a_long_run():
  rng = np.random.default_rng(19)
  n = 12_000  # Longer than max_points: reduced to block maxima.
  t = np.arange(n)
  clean = (2 * np.exp(-t / 3000) + 0.1) * np.exp(0.1 * rng.standard_normal(n))
  loss = clean * np.where(t % 600 == 100, 5.0, 1.0)
  h = History([(int(s), {"loss": float(v)}) for s, v in zip(t, loss, strict=True)])
  f = _one(diagnose(h), "oscillation")
  assert f.evidence["values"]["period_steps"] == pytest.approx(600, rel=0.1)
  clean = History([(int(s), {"loss": float(v)}) for s, v in zip(t, clean, strict=True)])
  assert diagnose(clean) == []


def test_random_spikes_are_instability_not_oscillation():
  rng = np.random.default_rng(5)
  base = _base(5)
  spikes = rng.random(N) < 0.06
  spikes[:3] = False
  base["loss"] = base["loss"] * np.where(spikes, 4.0, 1.0)
  findings = diagnose(_history(base))
  assert "oscillation" not in _names(findings)
  f = _one(findings, "instability")
  assert f.evidence["values"]["spike_fraction"] == pytest.approx(spikes.mean(), abs=0.01)
  assert f.evidence["steps"][0] == int(np.flatnonzero(spikes)[0])
  assert diagnose(_history(base), instability_fraction=0.2) == []


def _catapult_loss(recover: bool) -> np.ndarray:
  t = np.arange(N, dtype=np.float64)
  loss = 0.5 * np.exp(-t / 100) + 0.02
  bump = np.exp(-(((t - 300) / 4.0) ** 2))  # Steps ~292-308 thrown up to 30 x the start.
  loss = loss + 15.0 * bump
  if not recover:
    loss[300:] = 15.0
  return loss


@pytest.mark.parametrize("recover", [True, False])
def test_a_recovered_spike_is_a_catapult_not_a_divergence(recover):
  """Full-batch GD a little above 2/λ_max throws the loss up and converges (issue 21:
  healthy full-batch sine runs were called diverged and unstable)."""
  base = _base(17)
  base["loss"] = _catapult_loss(recover)
  names = _names(diagnose(_history(base)))
  if recover:
    f = _one(diagnose(_history(base)), "catapult")
    assert f.severity == "info" and f.evidence["steps"][1] == 300
    assert f.evidence["values"]["peak"] == pytest.approx(15.0 + 0.5 * np.exp(-3) + 0.02)
    assert "divergence" not in names and "instability" not in names
  else:
    assert "divergence" in names and "catapult" not in names


def test_one_burst_of_spikes_is_not_instability():
  """Four neighbouring steps of 120 spiking (3 %) are one event; 30 spikes spread over a
  run are instability (issue 21: a catapult's few steps were called unstable)."""
  rng = np.random.default_rng(18)
  n = 120
  base = _base(18, n=n)
  t = np.arange(n, dtype=np.float64)
  smooth = (2.3 * np.exp(-t / 250) + 0.05) * np.exp(0.02 * rng.standard_normal(n))
  burst = np.zeros(n, bool)
  burst[60:64] = True
  base["loss"] = smooth * np.where(burst, 3.0, 1.0)
  assert "instability" not in _names(diagnose(_history(base)))
  assert "instability" in _names(diagnose(_history(base), instability_min_events=1))
  base = _base(18)
  t = np.arange(N, dtype=np.float64)
  smooth = (2.3 * np.exp(-t / 250) + 0.05) * np.exp(0.02 * rng.standard_normal(N))
  spread = np.zeros(N, bool)
  spread[rng.choice(N, 30, replace=False)] = True
  base["loss"] = smooth * np.where(spread, 3.0, 1.0)
  f = _one(diagnose(_history(base)), "instability")
  runs = int(spread[0]) + int(np.count_nonzero(spread[1:] & ~spread[:-1]))
  assert f.evidence["values"]["spike_events"] == runs > 20


# --------------------------------------------------------------------------- plateaus


def test_early_plateau():
  rng = np.random.default_rng(6)
  t = np.arange(N, dtype=np.float64)
  base = _base(6)
  base["loss"] = np.where(t < 200, 2.3, 2.3 * np.exp(-(t - 200) / 150) + 0.05) * np.exp(
    0.05 * rng.standard_normal(N)
  )
  f = _one(diagnose(_history(base)), "early_plateau")
  assert f.evidence["values"]["relative_drop"] < 0.05
  assert f.evidence["steps"] == [0, 99]
  assert diagnose(_history(base), early_fraction=0.3) == []
  # A loss that rises by more than plateau_rel_change over the window is no plateau (a
  # large learning rate's first steps; issue 21), one that rises by less still is.
  for rise, found in ((1.15, False), (1.03, True)):
    base["loss"] = np.where(t < 100, 2.3 * (1 + (rise - 1) * t / 100), 2.3 * rise)
    assert ("early_plateau" in _names(diagnose(_history(base)))) is found, rise


def test_an_early_plateau_the_run_left_is_info():
  """A flat start followed by a fit of the data (2.3 -> 0.05) is reported as info, no alarm;
  the same start with a loss that stays far from a fit is a warning (issue 21: deep nets
  with a small initialisation that ended as well as the healthy runs were flagged)."""
  t = np.arange(N, dtype=np.float64)
  base = _base(6)
  base["loss"] = np.where(t < 200, 2.3, 2.3 * np.exp(-(t - 200) / 150) + 0.05)
  f = _one(diagnose(_history(base)), "early_plateau")
  assert f.severity == "info" and "The run left it" in f.summary
  base["loss"] = np.where(t < 200, 2.3, 2.3 - 0.3 * (t - 200) / (N - 200))  # ends at 2.0
  base["train/accuracy"] = np.full(N, 0.3)  # and learnt little
  f = _one(diagnose(_history(base)), "early_plateau")
  assert f.severity == "warning" and "left it" not in f.summary


@pytest.mark.parametrize(("accuracy", "found"), [(None, True), (0.5, True), (0.95, False)])
def test_late_plateau(accuracy, found):
  rng = np.random.default_rng(7)
  t = np.arange(N, dtype=np.float64)
  base = _base(7)
  base["loss"] = (0.5 * np.exp(-t / 100) + 1.8) * np.exp(0.05 * rng.standard_normal(N))
  if accuracy is None:
    del base["train/accuracy"]
  else:
    base["train/accuracy"] = np.full(N, accuracy)
  findings = diagnose(_history(base))
  assert ("late_plateau" in _names(findings)) == found
  if found:
    f = _one(findings, "late_plateau")
    assert f.evidence["steps"] == [800, 999]
    if accuracy is not None:
      assert f.evidence["values"]["train_accuracy"] == pytest.approx(accuracy)
    else:
      assert f.evidence["values"]["reference_loss"] > 2


@pytest.mark.parametrize(("level", "found"), [(1.05, False), (1.9, True)])
def test_late_plateau_needs_a_loss_far_above_chance(level, found):
  """A 10-class run that levels off at 60 % training accuracy: at 0.46 × ln(10) it learned
  what the model allows (healthy MNIST-1D MLPs, issue 21), at 0.83 × ln(10) it is stuck."""
  rng = np.random.default_rng(8)
  t = np.arange(N, dtype=np.float64)
  base = _base(8)
  base["loss"] = (1.4 * np.exp(-t / 100) + level) * np.exp(0.05 * rng.standard_normal(N))
  base["train/accuracy"] = np.full(N, 0.6)
  config = {"task": "classification", "num_classes": 10}
  findings = diagnose(_history(base, config=config))
  assert ("late_plateau" in _names(findings)) == found
  if found:
    f = _one(findings, "late_plateau")
    assert f.evidence["values"]["reference_loss"] == pytest.approx(np.log(10))
    assert "chance level ln(10)" in f.summary and "training accuracy 0.6" in f.summary


@pytest.mark.parametrize(
  ("hparams", "held"),
  [({"weight_decay": 0.1}, True), ({"weight_decay": 1e-3}, False), ({}, False), (None, False)],
)
def test_late_plateau_held_by_weight_decay_is_info(hparams, held):
  """A plateau where decoupled weight decay (lr · wd per step) is a large share of the
  update ratio is the regularised optimum the run asked for (issue 21's stress runs: AdamW
  with weight decay 1.0): the info ``regularised_plateau``, not a warning. ``{}`` is AdamW
  with optax's default 1e-4 (share 0.005), ``None`` SGD with no weight decay."""
  rng = np.random.default_rng(7)
  t = np.arange(N, dtype=np.float64)
  base = _base(7)
  base["loss"] = (0.5 * np.exp(-t / 100) + 1.8) * np.exp(0.05 * rng.standard_normal(N))
  base["train/accuracy"] = np.full(N, 0.5)
  config: dict = {"lr": 0.05, "optimizer": "sgd" if hparams is None else "adamw"}
  if hparams is not None:
    config["optimizer_hparams"] = hparams
  findings = diagnose(_history(base, config=config))
  names = _names(findings)
  assert ("regularised_plateau" in names) is held and ("late_plateau" in names) is not held
  if held:
    f = _one(findings, "regularised_plateau")
    assert f.severity == "info" and f.evidence["steps"] == [800, 999]
    # The share by hand: lr · wd over the median of the layers' window medians.
    window = slice(800, N)
    ratio = np.median([np.median(base[f"updates/ratio/{lay}/kernel"][window]) for lay in LAYERS])
    values = f.evidence["values"]
    assert values["decay_per_step"] == pytest.approx(0.05 * 0.1)
    assert values["decay_share"] == pytest.approx(0.005 / ratio)
    assert f.confidence == "high"  # a share of about 5 against 0.25, 200 points
    # A threshold above the share gives the warning back.
    assert "late_plateau" in _names(diagnose(_history(base, config=config), decay_share=10.0))


def test_weight_decay_read_from_the_config_or_the_optax_default():
  from jaxscope.diagnose.regularisation import _weight_decay

  assert _weight_decay({"optimizer": "adamw", "optimizer_hparams": {"weight_decay": 0.5}}) == 0.5
  assert _weight_decay({"optimizer": "adamw", "optimizer_args": {"weight_decay": 2}}) == 2.0
  assert _weight_decay({"optimizer": "adamw"}) == pytest.approx(1e-4)  # optax's default
  assert _weight_decay({"optimizer": "sgd"}) is None  # optax.sgd takes none
  assert _weight_decay({"optimizer": "momentum"}) is None  # not an optax name
  assert _weight_decay({"optimizer": "adamw", "optimizer_hparams": {"weight_decay": True}}) is None
  assert _weight_decay({}) is None


# --------------------------------------------------------------------------- overfitting


def test_overfitting_suggests_the_step_of_the_minimum_test_loss():
  test = _test_loss(best=500)
  best = min(test, key=test.get)
  f = _one(diagnose(_history(_base(8), {"test/loss": test})), "overfitting")
  assert f.evidence["steps"] == [best] == [500]
  assert f.evidence["values"]["best_step"] == 500
  assert f.evidence["values"]["best_test_loss"] == pytest.approx(0.5)
  assert "step 500" in f.summary
  assert diagnose(_history(_base(8), {"test/loss": test}), overfit_rel=10.0) == []


def test_no_overfitting_when_both_losses_rise_or_test_falls():
  base = _base(9)
  base["loss"] = np.linspace(0.2, 1.0, N)  # Training loss rising as well.
  findings = diagnose(_history(base, {"test/loss": _test_loss(best=500)}))
  assert "overfitting" not in _names(findings)
  assert "overfitting" not in _names(diagnose(_history(_base(9), {"test/loss": _test_loss()})))


# --------------------------------------------------------------------------- gradients


def test_vanishing_gradients_uses_natural_depth_order():
  base = _base(10)
  for lay in LAYERS:
    del base[f"grads/norm/{lay}/kernel"]
  # Lexicographic order would put Dense_10 before Dense_2.
  base["grads/norm/Dense_0/kernel"] = np.full(N, 1e-5)
  base["grads/norm/Dense_2/kernel"] = np.full(N, 1e-3)
  base["grads/norm/Dense_10/kernel"] = np.full(N, 1.0)
  f = _one(diagnose(_history(base)), "vanishing_gradients")
  assert f.evidence["layers"] == ["Dense_0/kernel", "Dense_10/kernel"]
  assert f.evidence["values"]["median_ratio"] == pytest.approx(1e-5)
  assert f.evidence["steps"] == [500]
  assert diagnose(_history(base), vanishing_ratio=1e-6) == []


def test_exploding_gradients_by_ratio_and_by_growth():
  base = _base(11)
  base["grads/norm/Dense_0/kernel"] = np.full(N, 1e4)
  f = _one(diagnose(_history(base)), "exploding_gradients")
  assert f.evidence["values"]["median_ratio"] == pytest.approx(1e4, rel=0.2)
  base = _base(11)
  base["grads/norm/Dense_1/kernel"] = np.exp(np.linspace(0, np.log(1e4), N))
  f = _one(diagnose(_history(base)), "exploding_gradients")
  assert f.evidence["layers"] == ["Dense_1/kernel"]
  growth = np.median(base["grads/norm/Dense_1/kernel"][900:]) / np.median(
    base["grads/norm/Dense_1/kernel"][:100]
  )
  assert f.evidence["values"]["growth/Dense_1/kernel"] == pytest.approx(growth, rel=0.05)
  # The same growth out of an early plateau, in a run that ends fitting the data: a
  # network leaving a flat start (a small init), not an explosion (issue 21).
  t = np.arange(N, dtype=np.float64)
  flat = np.where(t < 150, 2.3, 2.3 * np.exp(-(t - 150) / 100) + 0.05)
  base["loss"] = flat * np.exp(0.01 * np.random.default_rng(0).standard_normal(N))
  findings = diagnose(_history(base))
  assert "early_plateau" in _names(findings)
  assert "exploding_gradients" not in _names(findings)
  base["loss"] = np.where(t < 150, 2.3, 2.3 * np.exp(-(t - 150) / 2000))  # far from a fit
  base["train/accuracy"] = np.full(N, 0.3)
  assert "exploding_gradients" in _names(diagnose(_history(base)))


# --------------------------------------------------------------------------- update ratio


def test_update_ratio_high_and_low_per_layer():
  base = _base(12)
  base["updates/ratio/Dense_1/kernel"] = np.full(N, 0.1)
  base["updates/ratio/Dense_2/kernel"] = np.full(N, 1e-6)
  findings = diagnose(_history(base))
  high = _one(findings, "update_ratio_high")
  low = _one(findings, "update_ratio_low")
  assert high.evidence["layers"] == ["Dense_1/kernel"]
  assert low.evidence["layers"] == ["Dense_2/kernel"]
  assert high.evidence["values"]["median/Dense_1/kernel"] == pytest.approx(0.1)
  # The last half of the steps after the warm-up (ratio_warmup=50): steps 525-999.
  medians = np.median(base["updates/ratio/Dense_0/kernel"][525:])
  assert high.evidence["values"]["median/Dense_0/kernel"] == pytest.approx(medians)
  assert "bias" not in json.dumps(high.to_dict())  # Biases (ratio 3e-2) are left out.
  assert "update_ratio_high" not in _names(diagnose(_history(base), ratio_high=0.5))
  assert "suggested_factor" not in high.evidence["values"]
  # Every layer far below: the factor that brings the median layer (3e-6) to a healthy
  # run's 3e-3 (lr_target_ratio), as lr_too_low states it.
  for i, ratio in enumerate((2e-6, 3e-6, 6e-6)):
    base[f"updates/ratio/Dense_{i}/kernel"] = np.full(N, ratio)
  low = _one(diagnose(_history(base)), "update_ratio_low")
  assert low.evidence["values"]["suggested_factor"] == 1000
  assert low.advice[0].startswith("raise the learning rate by about ×1000: the median layer's")
  low = _one(diagnose(_history(base), lr_target_ratio=1e-5), "update_ratio_low")
  assert low.evidence["values"]["suggested_factor"] == 3  # 1e-5 / 3e-6 = 3.3


def test_stalled_layers_and_all_stalled():
  base = _base(13)
  base["updates/ratio/Dense_1/kernel"][600:] = 0.0
  findings = diagnose(_history(base))
  f = _one(findings, "stalled_layers")
  assert f.evidence["layers"] == ["Dense_1/kernel"]
  assert f.evidence["steps"] == [750]
  assert "update_ratio_low" not in _names(findings)
  # Every layer stalled: no "while other layers move"; the ratio is reported as too low.
  for lay in LAYERS:
    base[f"updates/ratio/{lay}/kernel"][:] = 0.0
  findings = diagnose(_history(base))
  assert "stalled_layers" not in _names(findings)
  assert _one(findings, "update_ratio_low").evidence["layers"] == [f"{x}/kernel" for x in LAYERS]


@pytest.mark.parametrize(("final", "severity"), [(0.05, "info"), (0.45, "warning")])
@pytest.mark.parametrize("name", ["stalled_layers", "vanishing_gradients"])
def test_frozen_or_vanishing_layers_warn_only_while_the_fit_is_poor(name, final, severity):
  """A first layer that gets no gradient (frozen on purpose for fine-tuning, or by a
  ``stop_gradient``): in a run that fits the data it does not hold training back (info,
  as for dead units); in one that stays above half its initial loss it is a warning
  (issue 21: harmless frozen layers counted against the family's precision)."""
  base = _base(17)
  t = np.arange(N, dtype=np.float64)
  base["loss"] = (0.5 - final) * np.exp(-t / 100) + final
  del base["train/accuracy"]
  base["updates/ratio/Dense_0/kernel"][:] = 0.0
  base["grads/norm/Dense_0/kernel"][:] = 1e-9
  findings = diagnose(_history(base))
  f = _one(findings, name)
  assert f.evidence["layers"][0] == "Dense_0/kernel"
  assert f.severity == severity
  assert ("do not hold training back" in f.summary) == (severity == "info")
  assert ("The run still fits the data (median loss" in f.summary) == (severity == "info")


def test_a_frozen_layer_is_a_warning_again_when_another_alarm_fires():
  """The info of a frozen layer in a fitting run is a warning again (its own summary and a
  note naming the other alarm) when the run raises another alarm: the run is flagged
  anyway, and the frozen layer is among the possible causes."""
  base = _base(17)
  t = np.arange(N, dtype=np.float64)
  base["loss"] = 0.45 * np.exp(-t / 100) + 0.05
  del base["train/accuracy"]
  base["updates/ratio/Dense_0/kernel"][:] = 0.0
  assert _one(diagnose(_history(base)), "stalled_layers").severity == "info"
  base["updates/ratio/Dense_1/kernel"] = np.full(N, 0.1)  # update_ratio_high: an alarm
  findings = diagnose(_history(base))
  assert _one(findings, "update_ratio_high").severity == "warning"
  f = _one(findings, "stalled_layers")
  assert f.severity == "warning"
  assert "The run still fits" not in f.summary
  assert "but update_ratio_high also fired" in f.summary
  assert f.summary.startswith("1 layer(s) stopped moving (Dense_0/kernel)")


# --------------------------------------------------------------------------- activations


def test_dead_units_and_threshold_override():
  base = _base(14)
  base["activations/dead_fraction/Dense_0"] = np.full(N, 0.8)
  base["activations/dead_fraction/Dense_1"] = np.full(N, 0.2)
  base["activations/dead_fraction/Dense_2"] = np.full(N, 0.9)  # Output layer: left out.
  f = _one(diagnose(_history(base)), "dead_units")
  assert f.evidence["layers"] == ["Dense_0"]
  assert f.evidence["values"]["median/Dense_0"] == pytest.approx(0.8)
  f = _one(diagnose(_history(base), dead_fraction=0.1), "dead_units")
  assert f.evidence["layers"] == ["Dense_0", "Dense_1"]
  f = _one(diagnose(_history(base), Thresholds(exclude_output_layer=False)), "dead_units")
  assert f.evidence["layers"] == ["Dense_0", "Dense_2"]
  assert diagnose(_history(base), dead_fraction=0.95) == []
  # A named output layer is left out wherever it sorts (a transformer's head before ln_f).
  base["activations/dead_fraction/head"] = np.full(N, 0.7)
  base["activations/dead_fraction/ln_f"] = np.full(N, 0.9)
  f = _one(diagnose(_history(base)), "dead_units")
  assert f.evidence["layers"] == ["Dense_0", "Dense_2", "ln_f"]


def test_dead_units_from_the_first_step_advise_the_biases_first():
  base = _base(14)
  base["activations/dead_fraction/Dense_0"] = np.full(N, 0.8)  # dead from step 0 on
  f = _one(diagnose(_history(base)), "dead_units")
  assert f.evidence["values"]["dead_from_start"] is True
  assert f.evidence["values"]["first/Dense_0"] == pytest.approx(0.8)
  assert f.advice[0].startswith("initialise the hidden biases at zero or small positive")
  assert f.advice[1].startswith("lower the learning rate")
  assert "dead from the first step" in f.summary
  # Alive at the first step (0.2 < dead_fraction 0.5), dead later: the learning rate first.
  base["activations/dead_fraction/Dense_0"] = np.where(np.arange(N) < 50, 0.2, 0.8)
  f = _one(diagnose(_history(base)), "dead_units")
  assert f.evidence["values"]["dead_from_start"] is False
  assert f.advice[0].startswith("lower the learning rate") and "first step" not in f.summary
  # Every dead layer must have started dead.
  base["activations/dead_fraction/Dense_1"] = np.full(N, 0.9)
  f = _one(diagnose(_history(base)), "dead_units")
  assert f.evidence["layers"] == ["Dense_0", "Dense_1"]
  assert f.evidence["values"]["dead_from_start"] is False


@pytest.mark.parametrize(("final", "severity"), [(0.05, "info"), (0.45, "warning")])
def test_dead_units_warn_only_while_the_fit_is_poor(final, severity):
  """A regression net on 1-D inputs fitting a sine keeps 60 % of its second layer's ReLUs
  dead on every batch and fits well (info); the same dead units in a run that stays above
  half its initial loss are a warning (issue 21: healthy sine runs were flagged)."""
  base = _base(16)
  t = np.arange(N, dtype=np.float64)
  base["loss"] = (0.5 - final) * np.exp(-t / 100) + final
  del base["train/accuracy"]
  base["activations/dead_fraction/Dense_1"] = np.full(N, 0.6)
  f = _one(diagnose(_history(base)), "dead_units")
  assert f.severity == severity
  assert ("does not hold" in f.summary or "do not hold" in f.summary) == (severity == "info")


def test_saturation():
  base = _base(15)
  base["activations/saturation_fraction/Dense_1"] = np.linspace(0, 1, N)
  f = _one(diagnose(_history(base)), "saturation")
  assert f.evidence["layers"] == ["Dense_1"]
  assert f.evidence["values"]["median/Dense_1"] == pytest.approx(0.75, abs=0.01)
  assert diagnose(_history(base), saturation_fraction=0.8) == []


# --------------------------------------------------------------------------- curvature


@pytest.mark.parametrize(
  ("config", "lr", "found"),
  [
    ({"optimizer": "sgd", "lr": 0.05}, None, True),  # 5 > 2
    ({"optimizer": "momentum", "lr": 0.05}, None, True),  # 5 > 2 · 1.9
    ({"optimizer": "momentum", "lr": 0.03}, None, False),  # 3 < 3.8
    ({"optimizer": "nesterov", "lr": 0.03}, None, True),  # 3 > 3.8 / 2.8
    ({"optimizer": "sgd", "lr": 0.03}, None, True),  # 3 > 2
    ({"optimizer": "adam", "lr": 0.05}, None, False),  # Adaptive: skipped.
    ({}, 0.05, True),  # The lr key, no config.
    ({"optimizer": "sgd", "lr": 1.0}, 0.01, False),  # The lr key wins over the config.
  ],
)
def test_lr_above_curvature_limit(config, lr, found):
  base = _base(16)
  base["hess_max_ev"] = np.full(N, 100.0)
  if lr is None:
    del base["lr"]
  else:
    base["lr"] = np.full(N, lr)
  findings = diagnose(_history(base, config=config or {"unused": 1}))
  assert ("lr_above_curvature_limit" in _names(findings)) == found
  if found:
    f = _one(findings, "lr_above_curvature_limit")
    assert f.evidence["values"]["fraction"] == 1.0
    assert f.evidence["steps"][:3] == [0, 1, 2]


def test_lr_curvature_fraction_with_decaying_lr():
  base = _base(17)
  base["hess_max_ev"] = np.full(N, 100.0)
  base["lr"] = np.where(np.arange(N) < 300, 0.05, 0.01)  # Above 2/λ on 30 % of the steps.
  h = _history(base)
  assert "lr_above_curvature_limit" not in _names(diagnose(h))
  f = _one(diagnose(h, curvature_fraction=0.2), "lr_above_curvature_limit")
  assert f.evidence["values"]["fraction"] == pytest.approx(0.3)
  assert f.evidence["values"]["max_product"] == pytest.approx(5.0)


def _curvature_run(ev: np.ndarray, **errors: np.ndarray) -> History:
  """λ_max readings (lr 0.05, plain SGD: the limit is 2/0.05 = 40) with error bars."""
  base = _base(19)
  base["hess_max_ev"] = ev
  for name, e in errors.items():
    base[f"hess_max_ev_{name}"] = e
  return _history(base)


def test_lr_curvature_ignores_noisy_readings():
  ev = np.full(N, 100.0)  # lr · λ = 5 > 2 at every step
  assert "lr_above_curvature_limit" in _names(diagnose(_curvature_run(ev)))
  # Unconverged (residual 60 ≥ 100/2) or noisy (2σ = 200 ≥ 100): the rule does not fire,
  # and an info note says the curvature could not be judged.
  for errors in ({"residual": np.full(N, 60.0)}, {"stderr": np.full(N, 100.0)}):
    findings = diagnose(_curvature_run(ev, **errors))
    assert "lr_above_curvature_limit" not in _names(findings)
    note = _one(findings, "curvature_not_judged")
    assert note.severity == "info"
    (kind,) = errors
    assert note.evidence["values"]["error_key"] == f"hess_max_ev_{kind}"
    assert note.evidence["values"]["ignored_noise"] == N == note.evidence["values"]["measured"]
    assert "could not be judged" in note.summary and note.advice
  # Tight error bars (residual 1, stderr 1): the rule fires as without them.
  for errors in ({"residual": np.full(N, 1.0)}, {"stderr": np.full(N, 1.0)}):
    f = _one(diagnose(_curvature_run(ev, **errors)), "lr_above_curvature_limit")
    assert f.evidence["values"]["fraction"] == 1.0
    assert f.evidence["values"]["ignored_noise"] == 0


def test_lr_curvature_counts_ignored_readings():
  # Early unconverged readings far above the limit (like a warm start's first steps), then
  # converged ones below it: 60 % over the limit without error bars, none with them.
  ev = np.where(np.arange(N) < 600, 100.0, 10.0)
  res = np.where(np.arange(N) < 600, 80.0, 0.1)
  assert "lr_above_curvature_limit" in _names(diagnose(_curvature_run(ev)))
  findings = diagnose(_curvature_run(ev, residual=res))
  assert not {"lr_above_curvature_limit", "curvature_not_judged"} & set(_names(findings))
  # Noise (a negative reading too) ignored, the rest over the limit: the evidence says how
  # many readings were left out and why; a missing or zero error bar counts as measured.
  ev = np.where(np.arange(N) < 200, -7e-3, 100.0)
  res = np.where(np.arange(N) < 200, 0.4, 0.5)
  res[500] = 0.0
  base = _base(19)
  base["hess_max_ev"] = ev
  h = _history(base, {"hess_max_ev_residual": dict(enumerate(res[:900]))})
  f = _one(diagnose(h), "lr_above_curvature_limit")
  v = f.evidence["values"]
  assert (v["measured"], v["ignored_noise"], v["fraction"]) == (N, 200, 1.0)
  assert v["noise_rule"] == "residual ≥ |λ_max|/2"
  assert f.evidence["steps"][0] == 200
  assert "200 of the 1000 λ_max readings were ignored as noise" in f.summary


# --------------------------------------------------------------------------- output


def _problem_run() -> History:
  base = _base(18)
  base["loss"][900:] = np.nan
  base["activations/dead_fraction/Dense_0"] = np.full(N, 0.8)
  base["updates/ratio/Dense_1/kernel"] = np.full(N, 0.1)
  return _history(base, {"test/loss": _test_loss(best=400)})


def test_ordering_by_severity_then_confidence_then_step():
  """Most severe first; within a severity low confidence last, then by confidence, then by
  the first step (issue 21: the order was severity, then step)."""
  findings = diagnose(_problem_run())
  assert findings[0].name == "divergence"
  ranks = [("critical", "warning", "info").index(f.severity) for f in findings]
  assert ranks == sorted(ranks)
  warnings = [f for f in findings if f.severity == "warning"]
  keys = [(CONFIDENCES.index(f.confidence), min(f.evidence["steps"])) for f in warnings]
  assert keys == sorted(keys)
  assert {"dead_units", "update_ratio_high", "overfitting"} <= set(_names(findings))


def test_a_cause_comes_before_the_divergence_it_made():
  """Raw-pixel inputs (a warning) that made the loss diverge (critical): the cause leads,
  so its advice is the first to try; info findings stay last (issue 21)."""
  base = _base(41)
  base["loss"][600:] = np.nan
  data = {"examples": 1000, "inputs": _fl(33.0, 78.0, 0.0, 255.0)}
  findings = diagnose(_history(base, config={"optimizer": "adam", "data_stats": data}))
  names = _names(findings)
  assert names[:2] == ["unnormalised_inputs", "divergence"]
  assert [f.severity for f in findings[:2]] == ["warning", "critical"]
  sev = [f.severity == "info" for f in findings]
  assert sev == sorted(sev)


def test_json_round_trip_and_report():
  findings = diagnose(_problem_run())
  data = findings_to_json(findings)
  text = json.dumps(data, allow_nan=False)
  back = [Finding.from_dict(d) for d in json.loads(text)]
  assert back == findings
  assert findings_to_json(back) == data
  for d in data:
    assert set(d) == {"name", "severity", "summary", "evidence", "advice", "confidence"}
    assert set(d["evidence"]) == {"metric", "layers", "steps", "values"}
    assert d["advice"] and d["confidence"] in CONFIDENCES
  text = report(findings)
  assert text.splitlines()[0].startswith(f"{len(findings)} finding")
  assert text.index("[CRITICAL] divergence (high confidence): ") < text.index("[WARNING]")
  assert "Dense_0" in text and "try:" in text
  assert report([]).startswith("No problem found")


def test_report_sorts_unsorted_findings():
  info = Finding("x", "info", "an info", {"steps": [0]}, [])
  crit = Finding("y", "critical", "a critical", {"steps": [5]}, ["do"])
  text = report([info, crit])
  assert text.index("[CRITICAL] y") < text.index("[INFO] x")
  with pytest.raises(ValueError, match="severity"):
    Finding("x", "fatal", "", {}, [])


def test_threshold_overrides():
  with pytest.raises(TypeError, match="unknown thresholds"):
    diagnose(_healthy(), dead_fraction_typo=0.3)
  th = Thresholds(dead_fraction=0.3)
  assert diagnose(_healthy(), th, dead_fraction=0.01)  # Overrides apply on top of `th`.
  assert diagnose(_healthy(), th) == []
  # Integer thresholds may come as floats (command line): overfit_window=5.0 works.
  test = _test_loss(best=500)
  assert "overfitting" in _names(
    diagnose(_history(_base(8), {"test/loss": test}), overfit_window=5.0)
  )


def test_infinite_update_ratio_of_a_zero_bias_is_not_a_divergence() -> None:
  # ‖Δb‖/‖b‖ = inf at step 0 for a zero-initialised bias: a healthy run, not a NaN.
  from jaxscope.record import History

  recs = [
    (s, {"loss": 2.0 * 0.99**s, "updates/ratio/Dense_0/bias": np.inf if s == 0 else 1e-3})
    for s in range(50)
  ]
  names = [f.name for f in diagnose(History(recs))]
  assert "divergence" not in names


def test_a_diverged_run_is_not_called_overfitting() -> None:
  from jaxscope.record import History

  recs = [(s, {"loss": 2.0 if s < 5 else 1e6}) for s in range(40)]
  recs += [(s, {"test/loss": 2.0 + s}) for s in range(0, 40, 5)]
  names = [f.name for f in diagnose(History(recs))]
  assert "divergence" in names and "overfitting" not in names


@pytest.mark.parametrize(
  ("ev", "falling", "expect"),
  [
    (42.0, True, "edge_of_stability"),  # lr·λ = 2.1: at the limit, loss falling: healthy
    (42.0, False, "lr_above_curvature_limit"),  # at the limit but the loss rises
    (60.0, True, "lr_above_curvature_limit"),  # 3.0 > 1.2 · 2: well above the limit
  ],
)
def test_edge_of_stability_is_not_a_fault(ev, falling, expect):
  """Full-batch gradient descent settles where lr · λ_max ≈ 2 and keeps making progress
  (Cohen et al. 2021); only a product well above the limit, or one with a loss that does
  not fall, is a warning (issue 21)."""
  base = _base(23)
  base["lr"] = np.full(N, 0.05)
  base["hess_max_ev"] = np.full(N, ev)
  t = np.arange(N)
  base["loss"] = 2.0 * np.exp(-t / N) if falling else 1.0 + 0.5 * t / N
  findings = diagnose(_history(base, config={"optimizer": "sgd", "lr": 0.05}))
  names = _names(findings)
  assert expect in names
  other = {"edge_of_stability", "lr_above_curvature_limit"} - {expect}
  assert not other & set(names)
  if expect == "edge_of_stability":
    f = _one(findings, "edge_of_stability")
    assert f.severity == "info"
    assert f.evidence["values"]["median_product"] == pytest.approx(2.1)


def test_instability_needs_evidence_and_real_jumps():
  """A 40-step healthy run (minibatch noise on a short plateau) and small jumps (+10 %)
  are not instability; +100 % jumps on 5 % of a long run are (issue 21)."""
  # The loss of a real 40-step LeNet-5/digits run (jaxscope train --steps 40 --seed 2),
  # which the rule called "unstable" (3 of 40 points above 6 MAD of the noise).
  real = [2.317, 2.297, 2.328, 2.322, 2.281, 2.272, 2.297, 2.261, 2.263, 2.265, 2.247, 2.305,
          2.268, 2.227, 2.223, 2.216, 2.199, 2.19, 2.146, 2.104, 2.102, 2.119, 2.017, 1.985,
          1.934, 1.85, 1.814, 1.736, 1.676, 1.617, 1.387, 1.243, 1.325, 1.135, 1.095, 0.966,
          1.368, 0.923, 1.503, 1.513]  # fmt: skip
  assert "instability" not in _names(diagnose(_history({"loss": np.array(real)})))
  rng = np.random.default_rng(29)
  jumps = rng.random(N) < 0.05
  jumps[:3] = False
  for factor, unstable in ((1.1, False), (2.0, True)):
    base = _base(29)
    base["loss"] = base["loss"] * np.where(jumps, factor, 1.0)
    assert ("instability" in _names(diagnose(_history(base)))) == unstable, factor
  short = _base(31, n=60)
  short["loss"] = short["loss"] * np.where(jumps[:60], 3.0, 1.0)
  h = _history(short)
  assert "instability" not in _names(diagnose(h))  # fewer than instability_min_points
  assert "instability" in _names(diagnose(h, instability_min_points=50))


# --------------------------------------------------------------------------- the data


def _data_run(**stats):
  """A healthy history whose config holds data_stats (jaxscope.data.data_stats's form)."""
  data = {
    "examples": 1000,
    "inputs": {"mean": 0.3, "std": 0.4, "min": 0.0, "max": 1.0, "nonfinite_fraction": 0.0},
    "labels": {"class_fractions": [0.25] * 4, "ignored_fraction": 0.0, "sequence": False},
  }
  data.update(stats)
  return _history(_base(37), config={"optimizer": "adam", "data_stats": data})


DATA_RULES = {"nonfinite_data", "unnormalised_inputs", "class_imbalance"}


def _fl(mean, std, lo, hi, nonfinite=0.0):
  return {"mean": mean, "std": std, "min": lo, "max": hi, "nonfinite_fraction": nonfinite}


def _lab(fractions, sequence=False):
  return {"labels": {"class_fractions": fractions, "sequence": sequence}}


@pytest.mark.parametrize(
  ("stats", "expect"),
  [
    ({}, None),
    ({"inputs": _fl(33.0, 78.0, 0.0, 255.0)}, "unnormalised_inputs"),  # raw pixels
    ({"inputs": _fl(0.5, 1e-5, 0.5, 0.5)}, "unnormalised_inputs"),  # constant
    ({"inputs": _fl(0.3, 0.4, 0.0, 1.0, 0.01)}, "nonfinite_data"),
    (_lab([0.7, 0.2, 0.05, 0.05]), "class_imbalance"),
    (_lab([0.7, 0.2, 0.1, 0.0]), "class_imbalance"),  # a class without examples
    (_lab([0.5, 0.45, 0.05 + 1e-3]), None),  # 1:9.8
    (_lab([0.9, 0.05, 0.05], sequence=True), None),  # tokens: imbalanced by nature
    ({"targets": _fl(5e3, 1e3, 1e3, 9e3)}, "unnormalised_inputs"),
  ],
)
def test_data_rules(stats, expect):
  found = DATA_RULES & set(_names(diagnose(_data_run(**stats))))
  assert found == ({expect} if expect else set())
  if expect == "nonfinite_data":
    assert _one(diagnose(_data_run(**stats)), expect).severity == "critical"


def test_data_stats_match_numpy():
  from jaxscope.data import Dataset, data_stats

  rng = np.random.default_rng(41)
  x = rng.normal(3.0, 2.0, (50, 4)).astype(np.float32)
  x[7, 1] = np.nan
  y = np.array([0] * 30 + [1] * 15 + [2] * 5, np.int32)
  ds = Dataset(x, y, x[:2], y[:2], 4, "toy")
  s = data_stats(ds)
  finite = x[np.isfinite(x)].astype(np.float64)
  assert s["examples"] == 50
  assert s["inputs"]["nonfinite_fraction"] == pytest.approx(1 / 200)
  assert s["inputs"]["mean"] == pytest.approx(finite.mean())
  assert s["inputs"]["std"] == pytest.approx(finite.std())
  assert s["inputs"]["max"] == pytest.approx(finite.max())
  assert s["labels"]["class_fractions"] == pytest.approx([0.6, 0.3, 0.1, 0.0])
  assert s["labels"]["sequence"] is False
  # The run's record of it drives the rules: class 3 has no example; a NaN entry.
  h = _history(_base(43), config={"data_stats": s})
  assert {"nonfinite_data", "class_imbalance"} <= set(_names(diagnose(h)))


def test_too_few_steps():
  """A loss still falling fast at the end (the run stopped early) against the healthy
  base run, which has converged (its last fifth gives 2 % of its improvement)."""
  rng = np.random.default_rng(47)
  t = np.arange(N, dtype=np.float64)
  base = _base(47)
  base["loss"] = (2.3 * np.exp(-t / 900) + 0.05) * np.exp(0.05 * rng.standard_normal(N))
  f = _one(diagnose(_history(base)), "too_few_steps")
  # Last fifth: 2.3·(e^{-800/900} − e^{-1000/900}) = 0.20 of 2.3·(1 − e^{-1000/900}) = 1.55.
  assert f.evidence["values"]["recent_fraction"] == pytest.approx(0.13, abs=0.03)
  assert f.severity == "warning"
  assert "too_few_steps" not in _names(diagnose(_history(_base(47))))
  assert "too_few_steps" not in _names(diagnose(_history(base), still_improving=0.2))


def test_loss_output_mismatch():
  """A softmax before a logits loss: an MLP on digits reached 88 % accuracy at 70 % of its
  initial loss (2.30 -> 1.61); on logits 98 % at 3 %. Synthetic curves of both shapes."""
  rng = np.random.default_rng(53)
  t = np.arange(N, dtype=np.float64)
  base = _base(53)
  base["loss"] = (1.6 + 0.7 * np.exp(-t / 150)) * np.exp(0.03 * rng.standard_normal(N))
  base["train/accuracy"] = np.clip(0.88 - 0.78 * np.exp(-t / 150), 0, 1)
  f = _one(diagnose(_history(base)), "loss_output_mismatch")
  assert f.evidence["values"]["accuracy"] == pytest.approx(0.88, abs=0.01)
  assert f.evidence["values"]["loss"] / f.evidence["values"]["initial_loss"] == pytest.approx(
    0.7, abs=0.03
  )
  assert "loss_output_mismatch" not in _names(diagnose(_history(_base(53))))  # on logits
  low_acc = dict(base, **{"train/accuracy": np.full(N, 0.5)})  # a hard task: not judged
  assert "loss_output_mismatch" not in _names(diagnose(_history(low_acc)))


# --------------------------------------------------------------------------- confidence


def test_confidence_from_margin_and_points():
  from jaxscope.diagnose.finding import _confidence, _margin

  # margin: value / bound above, bound / value below; inf when past a positive bound by
  # any factor (0 or less for a "below" rule, a non-finite value).
  assert _margin(0.8, 0.5, above=True) == pytest.approx(1.6)
  assert _margin(1e-4, 1e-3, above=False) == pytest.approx(10.0)
  assert _margin(-0.01, 0.05, above=False) == _margin(float("nan"), 1.0, above=True) == np.inf
  assert [_confidence(m) for m in (1.0, 1.24, 1.25, 1.99, 2.0, np.inf)] == [
    "low", "low", "medium", "medium", "high", "high",
  ]  # fmt: skip
  # High needs twice the minimum evidence; low does not depend on it.
  assert _confidence(5.0, points=19, min_points=10) == "medium"
  assert _confidence(5.0, points=20, min_points=10) == "high"
  assert _confidence(1.1, points=1000, min_points=10) == "low"
  with pytest.raises(ValueError, match="confidence"):
    Finding("x", "warning", "s", {}, [], "certain")
  old = {"name": "x", "severity": "info", "summary": "s", "evidence": {}, "advice": []}
  assert Finding.from_dict(old).confidence == "medium"  # written before confidences
  assert Finding("x", "info", "s").confidence == "medium"  # the constructor's default


@pytest.mark.parametrize(("dead", "expect"), [(0.6, "low"), (0.8, "medium"), (1.0, "high")])
def test_confidence_follows_the_evidence_margin(dead, expect):
  base = _base(61, n=200)
  base["activations/dead_fraction/Dense_0"] = np.full(200, dead)  # bound 0.5
  f = _one(diagnose(_history(base)), "dead_units")
  assert f.confidence == expect
  # The same margin on fewer points than twice the minimum evidence is not "high".
  short = _base(61, n=30)
  short["activations/dead_fraction/Dense_0"] = np.full(30, dead)
  f = _one(diagnose(_history(short)), "dead_units")  # 15 points in the last half
  assert f.confidence == ("medium" if expect == "high" else expect)


# --------------------------------------------------------------------------- divergence first


def test_findings_after_a_divergence_are_consequences():
  """Dead units that appear only after the NaN step are reported with confidence low and
  a note; dead units present before it are a finding like any other (issue 21)."""
  n = 400
  base = _base(67, n=n)
  base["loss"][300:] = np.nan
  base["activations/dead_fraction/Dense_0"] = np.where(np.arange(n) < 300, 0.05, 1.0)
  base["updates/ratio/Dense_1/kernel"] = np.where(np.arange(n) < 300, 1e-3, 0.0)
  findings = diagnose(_history(base))
  assert findings[0].name == "divergence"
  dead = _one(findings, "dead_units")
  assert dead.confidence == "low"
  assert "after the divergence at step 300" in dead.summary
  assert dead.evidence["values"]["after_divergence_step"] == 300
  assert findings[-1].confidence == "low"  # consequences come last
  assert "too_few_steps" not in _names(findings)  # a diverged run did not stop early
  # Present before the divergence: judged on the steps before it, not marked.
  base["activations/dead_fraction/Dense_0"] = np.full(n, 0.9)
  dead = _one(diagnose(_history(base)), "dead_units")
  assert dead.confidence != "low" and "after the divergence" not in dead.summary
  assert dead.evidence["steps"] == [150]  # the last half of steps 0-299


# --------------------------------------------------------------------------- short runs


def test_short_runs_update_ratio_and_too_few_steps():
  """A 30-step run: its update ratios are in the early transient (not update_ratio_high),
  and its still-falling loss is judged by too_few_steps on its last 6 steps (issue 21)."""
  t = np.arange(30, dtype=np.float64)
  rng = np.random.default_rng(71)
  arrays = {
    "loss": 2.3 * np.exp(-t / 40),
    **{f"updates/ratio/{lay}/kernel": np.full(30, 0.05) for lay in LAYERS},
  }
  findings = diagnose(_history(arrays))
  assert "update_ratio_high" not in _names(findings)
  f = _one(findings, "too_few_steps")
  assert f.evidence["steps"] == [24, 29]  # the last fifth of steps 0-29: 23.2 on
  # Last stretch 2.3·(e^{-24/40} - e^{-29/40}) = 0.149 of 2.3·(e^{-2/40} - e^{-29/40}) = 1.07.
  assert f.evidence["values"]["recent_fraction"] == pytest.approx(0.1384, abs=0.001)
  assert f.confidence == "medium"  # 5 × transient_ratio but on 6 points (fewer than 2 × 5)
  # Its ratios are the second piece of evidence: it stopped in the early transient.
  assert "early transient" in f.summary
  assert f.evidence["values"]["median_ratio/Dense_0/kernel"] == pytest.approx(0.05)
  # The same ratios on a long run are judged (after ratio_warmup), and a 30-step run that
  # has converged has no too_few_steps, unless its updates are still those of the transient.
  assert "update_ratio_high" in _names(diagnose(_history(arrays), ratio_warmup=0))
  flat = {"loss": np.where(t < 8, 2.3 - 0.28 * t, 0.06) * np.exp(0.02 * rng.standard_normal(30))}
  assert "too_few_steps" not in _names(diagnose(_history(flat)))
  ratios = {k: v for k, v in arrays.items() if k.startswith("updates/")}
  f = _one(diagnose(_history({**flat, **ratios})), "too_few_steps")
  assert "recent_fraction" not in f.evidence["values"] and "early transient" in f.summary
  long = {k: np.concatenate([v, np.full(70, v[-1])]) for k, v in {**flat, **ratios}.items()}
  names = _names(diagnose(_history(long)))  # 100 steps: past the transient, a real finding
  assert "update_ratio_high" in names and "too_few_steps" not in names
  twelve = {"loss": 2.3 * np.exp(-np.arange(12) / 10.0)}  # judged on its last 5 points
  f = _one(diagnose(_history(twelve)), "too_few_steps")
  assert f.evidence["steps"] == [7, 11]
  # 2.3·(e^{-0.7} - e^{-1.1}) = 0.376 of 2.3·(e^{-0.2} - e^{-1.1}) = 1.12.
  assert f.evidence["values"]["recent_fraction"] == pytest.approx(0.337, abs=0.002)
  assert diagnose(_history({"loss": 2.3 * np.exp(-np.arange(9) / 10.0)})) == []  # < 10 points


# --------------------------------------------------------------------------- the run's setup

SETUP_N = 300
NORMALISED = {"mean": 0.3, "std": 0.4, "min": 0.0, "max": 1.0, "nonfinite_fraction": 0.0}


def _setup_run(
  *,
  loss=None,
  train_acc=None,
  test_acc=0.95,
  test_loss=0.2,
  test_loss0=2.3,
  ratio=3e-3,
  std0=(0.5, 0.35, 0.2),
  dead0=0.05,
  dead=0.05,
  inputs=NORMALISED,
  **config,
) -> History:
  """A healthy 300-step classification run with the keys and config the setup rules read
  (an MLP: three hidden layers and a ``head``, evaluations every 30 steps and after the
  last step)."""
  n, rng = SETUP_N, np.random.default_rng(79)
  t = np.arange(n, dtype=np.float64)
  arrays = {
    "loss": (2.3 * np.exp(-t / 40) + 0.1) * np.exp(0.05 * rng.standard_normal(n))
    if loss is None
    else np.asarray(loss, np.float64),
    "train/accuracy": 0.97 - 0.87 * np.exp(-t / 40) if train_acc is None else train_acc + 0 * t,
  }
  for i, lay in enumerate(LAYERS):
    arrays[f"updates/ratio/{lay}/kernel"] = ratio * np.exp(0.2 * rng.standard_normal(n))
    arrays[f"activations/std/{lay}"] = np.full(n, 0.5) if i else np.full(n, 0.6)
    arrays[f"activations/std/{lay}"][0] = std0[i]
    arrays[f"activations/dead_fraction/{lay}"] = np.full(n, dead)
    arrays[f"activations/dead_fraction/{lay}"][0] = dead0
  arrays["activations/std/head"] = np.full(n, 0.2)  # the output layer: not in the profile
  arrays["activations/dead_fraction/head"] = np.full(n, 0.0)
  records = [(s, {k: float(v[s]) for k, v in arrays.items()}) for s in range(n)]
  for s in range(0, n + 1, 30):  # the final evaluation after the last step too
    records.append((s, {"test/accuracy": 0.1 if s == 0 else test_acc}))
    records.append((s, {"test/loss": test_loss0 if s == 0 else test_loss}))
  cfg = {"lr": 0.05, "optimizer": "momentum", "num_classes": 10, "task": "classification"}
  cfg["data_stats"] = {"examples": 1000, "inputs": inputs}
  cfg.update(config)
  return History(records, config=cfg)


SETUP_RULES = {"lr_too_low", "bad_init_scale", "label_noise", "dropout_too_strong"}


def test_setup_run_is_healthy():
  assert diagnose(_setup_run()) == []
  for model_args in ({"dropout": 0.5}, {"dropout_rate": 0.2}):
    assert diagnose(_setup_run(model_args=model_args)) == []
  assert diagnose(_setup_run(model="alexnet_mini")) == []


def test_lr_too_low():
  t = np.arange(SETUP_N)
  slow = 2.3 - 0.4 * t / SETUP_N  # falls steadily, slowly
  acc = 0.35
  h = _setup_run(loss=slow, train_acc=acc, test_acc=0.36, test_loss=2.0, ratio=2e-4, lr=1e-3)
  findings = diagnose(h)
  f = _one(findings, "lr_too_low")
  assert f is findings[0]  # a cause before the plateau it explains
  assert f.confidence == "high"  # every layer ≈ 2e-4: 5 × below lr_low_ratio
  vals = f.evidence["values"]
  median = float(np.median([v for k, v in vals.items() if k.startswith("median/")]))
  assert 1.8e-4 < median < 2.2e-4
  want = 3e-3 / median  # lr_target_ratio over the median layer, to one significant digit
  assert vals["suggested_factor"] == pytest.approx(round(want / 10) * 10)
  assert vals["lr"] == 1e-3
  factor = f"{vals['suggested_factor']:g}"
  assert "lr 0.001 (momentum)" in f.summary and f"×{factor}" in f.summary
  assert f.advice[0].startswith(f"raise the learning rate by about ×{factor} (from 0.001 to")
  low = _one(diagnose(h, lr_target_ratio=1e-3), "lr_too_low")
  assert low.evidence["values"]["suggested_factor"] == 5  # 1e-3 / 2e-4
  assert set(f.evidence["layers"]) == {f"{lay}/kernel" for lay in LAYERS}
  # Closer to the usual ratio: less confident; above it, or the loss fitted, or dead units
  # explaining the small updates: not this rule.
  h = _setup_run(loss=slow, train_acc=acc, test_acc=0.36, test_loss=2.0, ratio=7e-4)
  assert _one(diagnose(h), "lr_too_low").confidence == "medium"
  assert "lr_too_low" not in _names(diagnose(_setup_run(ratio=2e-4)))
  h = _setup_run(loss=slow, train_acc=acc, test_acc=0.36, test_loss=2.0, ratio=2e-3)
  assert "lr_too_low" not in _names(diagnose(h))
  h = _setup_run(loss=slow, train_acc=acc, test_acc=0.36, test_loss=2.0, ratio=2e-4, dead=0.9)
  names = _names(diagnose(h))
  assert "dead_units" in names and "lr_too_low" not in names


def test_bad_init_scale_by_first_loss_and_depth_profile():
  # The initial parameters' test loss: 30 / ln(10) = 13 × the chance level.
  f = _one(diagnose(_setup_run(test_loss0=30.0)), "bad_init_scale")
  assert f.evidence["values"]["first_loss"] == 30.0
  assert f.evidence["values"]["first_loss_key"] == "test/loss"
  assert f.evidence["values"]["chance_loss"] == pytest.approx(np.log(10))
  assert f.confidence == "high"  # 30 / (3 ln 10) = 4.3
  assert "initial test loss is 30" in f.summary and f.evidence["steps"] == [0]
  assert f.advice[0].startswith("scale the initial weights down to the standard fan-in scale")
  assert f.evidence["values"]["initial_scale"] == "too large"
  # One training batch's loss does not outvote the evaluation of the initial parameters;
  # without one, the first training loss is read.
  loss = 2.3 * np.exp(-np.arange(SETUP_N) / 40) + 0.1
  loss[0] = 30.0
  assert "bad_init_scale" not in _names(diagnose(_setup_run(loss=loss)))
  h = _history({"loss": loss}, config={"num_classes": 10, "data_stats": {"inputs": NORMALISED}})
  f = _one(diagnose(h), "bad_init_scale")
  assert f.evidence["values"]["first_loss_key"] == "loss" and "first loss is 30" in f.summary
  # Unnormalised inputs explain a large first loss: unnormalised_inputs names them.
  raw = {"mean": 80.0, "std": 90.0, "min": 0.0, "max": 255.0, "nonfinite_fraction": 0.0}
  names = _names(diagnose(_setup_run(test_loss0=30.0, inputs=raw)))
  assert "unnormalised_inputs" in names and "bad_init_scale" not in names
  # The layers' output std at the first step: ×4 per layer (every layer growing).
  f = _one(diagnose(_setup_run(std0=(1.0, 4.0, 16.0))), "bad_init_scale")
  assert f.evidence["values"]["std_growth_per_layer"] == pytest.approx(4.0)
  assert f.confidence == "medium" and "grows 4× per layer" in f.summary
  f = _one(diagnose(_setup_run(std0=(1.0, 0.1, 0.01))), "bad_init_scale")
  assert "shrinks 0.1× per layer" in f.summary and f.confidence == "high"  # 0.4 / 0.1
  assert f.advice[0].startswith("scale the initial weights up")
  assert f.evidence["values"]["initial_scale"] == "too small"
  # Both pieces of evidence: one level up. Not monotone, or dead units at the first step
  # (dead_units names that collapse), or a healthy profile: no finding.
  both = _setup_run(test_loss0=30.0, std0=(1.0, 4.0, 16.0))
  assert _one(diagnose(both), "bad_init_scale").confidence == "high"
  for std0, dead0 in (((1.0, 8.0, 4.0), 0.05), ((1.0, 0.1, 0.01), 0.9), ((0.5, 0.35, 0.2), 0.05)):
    assert "bad_init_scale" not in _names(diagnose(_setup_run(std0=std0, dead0=dead0)))


def test_bad_init_scale_of_a_regression_run_by_the_loss_of_predicting_zero():
  # Targets of mean 0.1 and std 0.7: predicting zero costs E[y²] = 0.01 + 0.49 = 0.5.
  targets = {"mean": 0.1, "std": 0.7, "min": -1.0, "max": 1.0, "nonfinite_fraction": 0.0}
  stats = {"examples": 1000, "inputs": NORMALISED, "targets": targets}
  t = np.arange(SETUP_N)

  def run(test_loss0, **config):
    cfg = {"task": "regression", "num_classes": None, "data_stats": stats, **config}
    loss = 0.5 * np.exp(-t / 40) + 0.01
    return _setup_run(loss=loss, test_loss=0.02, test_loss0=test_loss0, **cfg)

  f = _one(diagnose(run(20.0)), "bad_init_scale")  # 40 × the loss of predicting zero
  assert f.evidence["values"]["chance_loss"] == pytest.approx(0.5)
  assert "40 × the loss of predicting zero E[y²] = 0.5" in f.summary
  assert "large initial outputs" in f.summary and f.confidence == "high"  # 20 / 1.5 = 13
  assert f.advice[0].startswith("scale the initial weights down")
  assert "bad_init_scale" not in _names(diagnose(run(1.4)))  # 2.8 × ≤ init_loss_factor 3
  assert "bad_init_scale" not in _names(
    diagnose(run(1.4 * 1e4, data_stats={**stats, "targets": {**targets, "mean": 100.0}}))
  )  # unscaled targets: predicting zero costs 1e4 as well
  no_targets = {"examples": 1000, "inputs": NORMALISED}
  assert "bad_init_scale" not in _names(diagnose(run(20.0, data_stats=no_targets)))


def _noisy(**config) -> History:
  """Noisy labels as measured: training accuracy 0.5 against test 0.88, the training loss
  1.75 against the test loss 0.95 (50 % of the digits labels random, 150 steps)."""
  t = np.arange(SETUP_N)
  loss = 1.75 + 0.55 * np.exp(-t / 30)
  return _setup_run(loss=loss, train_acc=0.5, test_acc=0.88, test_loss=0.95, **config)


def test_label_noise_and_dropout_too_strong():
  f = _one(diagnose(_noisy()), "label_noise")
  # η ≈ (a - a_train) / (a - 1/K) = (0.88 - 0.5) / (0.88 - 0.1)
  assert f.evidence["values"]["noise_estimate"] == pytest.approx(0.38 / 0.78)
  assert f.confidence == "high"  # a gap of 0.38: 3.8 × noise_gap
  assert f.evidence["steps"] == [240, 270, 300]  # the evaluations of the last fifth
  assert "about 49% of the training labels" in f.summary
  assert "dropout_too_strong" not in _names(diagnose(_noisy()))
  # A recorded dropout of at least dropout_rate_min takes the gap; a small one does not.
  findings = diagnose(_noisy(model_args={"dropout": 0.8}))
  f = _one(findings, "dropout_too_strong")
  assert "label_noise" not in _names(findings)
  assert f.evidence["values"]["dropout_rate"] == 0.8 and "model_args dropout" in f.summary
  assert "label_noise" in _names(diagnose(_noisy(model_args={"dropout_rate": 0.2})))
  # A network that learnt nothing (test accuracy at chance, a batch accuracy of 0 on
  # batches of 8) is no evidence of noisy labels.
  dead = _setup_run(loss=np.full(SETUP_N, 2.5), train_acc=0.0, test_acc=0.1, test_loss=2.4)
  assert "label_noise" not in _names(diagnose(dead))
  # Every label moved to the next class: fitted (0.97) but below chance on the test labels.
  shifted = _setup_run(train_acc=0.97, test_acc=0.02, test_loss=6.0)
  f = _one(diagnose(shifted), "label_noise")
  assert f.evidence["values"]["systematic"] is True and "below the chance level 0.1" in f.summary
  assert f.confidence == "high"  # 0.05 / 0.02 = 2.5
  f = _one(diagnose(_noisy(model="alexnet_mini")), "dropout_too_strong")
  assert f.evidence["values"]["dropout_rate"] == 0.5 and "alexnet_mini" in f.summary
  # A gap below noise_gap is not judged; regression: the loss ratio alone.
  assert not SETUP_RULES & set(_names(diagnose(_noisy(), noise_gap=0.4)))
  t = np.arange(SETUP_N)
  arrays = {"loss": 0.5 + np.exp(-t / 30)}
  test = {"test/loss": {s: 0.2 for s in range(0, SETUP_N + 1, 30)}}
  cfg = {"task": "regression", "model_args": {"dropout": 0.5}}
  f = _one(diagnose(_history(arrays, test, config=cfg)), "dropout_too_strong")
  assert f.evidence["values"]["train_loss"] == pytest.approx(0.5, abs=0.01)
  assert f.confidence == "medium"  # 0.5 / 0.2 = 2.5 = 1.67 × dropout_loss_ratio
  cfg["model_args"] = {"dropout": 0.1}
  assert diagnose(_history(arrays, test, config=cfg)) == []


def test_dropout_rate_high_names_a_run_that_diverged_or_learnt_nothing():
  """Dropout 0.8 in a regression net whose loss explodes (inverted dropout scales the kept
  units by 5): the rate is the cause and leads the report; 0.8 in a run that fits, or
  0.5 in the diverging run, says nothing (issue 21: 11/32 dropout faults named)."""
  t = np.arange(SETUP_N, dtype=np.float64)
  diverging = {"loss": np.where(t < 20, 0.5 * np.exp(t / 3), np.nan)}
  cfg = {"task": "regression", "model_args": {"dropout": 0.8}}
  findings = diagnose(_history(diverging, config=cfg))
  assert _names(findings)[:2] == ["dropout_too_strong", "divergence"]
  f = findings[0]
  assert f.confidence == "medium" and f.evidence["values"]["dropout_rate"] == 0.8
  assert "keeps 20% of the units" in f.summary and "diverged at step" in f.summary
  cfg["model_args"] = {"dropout": 0.5}
  assert "dropout_too_strong" not in _names(diagnose(_history(diverging, config=cfg)))
  # Far from a fit: 10 classes at 0.9 x ln(10) and 20 % accuracy.
  stuck = _setup_run(loss=np.full(SETUP_N, 2.1), train_acc=0.2, test_acc=0.2, test_loss=2.1,
                     model_args={"dropout": 0.9})  # fmt: skip
  f = _one(diagnose(stuck), "dropout_too_strong")
  assert "still far from a good fit" in f.summary
  assert "dropout_too_strong" not in _names(diagnose(_setup_run(model_args={"dropout": 0.8})))


def test_zoo_dropout_rates_match_the_models():
  import inspect
  import re

  from jaxscope.diagnose.causes import ZOO_DROPOUT
  from jaxscope.models.conv import AlexNetMini
  from jaxscope.models.nnx_models import NNXCNN

  rates = [float(r) for r in re.findall(r"nn\.Dropout\(([\d.]+)", inspect.getsource(AlexNetMini))]
  assert ZOO_DROPOUT["alexnet_mini"] == max(rates) == 0.5
  default = inspect.signature(NNXCNN.__init__).parameters["dropout_rate"].default
  assert ZOO_DROPOUT["nnx_cnn"] == default


def test_overfitting_needs_a_rise_that_persists():
  """A test loss that rises over the last three evaluations only (a small test set's loss
  wanders by 20 % between evaluations: two healthy moons runs were called overfitting) is
  not judged; overfit_window evaluations after the minimum are (issue 21)."""
  test = {s: 2.0 - 0.002 * s for s in range(0, 850, 50)}  # 0.4 at step 800
  test.update({850: 0.5, 900: 0.55, 950: 0.6})
  h = _history(_base(83), {"test/loss": test})
  assert "overfitting" not in _names(diagnose(h))
  f = _one(diagnose(h, overfit_window=3), "overfitting")
  assert f.evidence["values"]["best_step"] == 800
  assert f.confidence == "medium"  # 37.5 % above the minimum, 3 evaluations after it


def test_a_fast_first_fall_is_no_plateau_and_sets_the_improvement():
  """A two-class run whose loss falls from ln 2 to 0.3 in five steps and then wanders in
  minibatch noise (the first 15 losses of a healthy moons run): the line through its first
  tenth is flat (early_plateau said 4 %), and the median of its first five losses (0.35)
  hid half of its improvement from too_few_steps. The initial test loss (step 0) sets both
  (issue 21: healthy moons runs were flagged)."""
  head = [0.575, 0.446, 0.352, 0.368, 0.316, 0.267, 0.391, 0.192, 0.349, 0.285, 0.263, 0.361,
          0.301, 0.465, 0.598]  # fmt: skip
  loss = np.concatenate([head, 0.30 - 0.0014 * np.arange(135)])  # 0.30 -> 0.11 at the end
  test = {s: 0.568 if s == 0 else 0.3 for s in range(0, 151, 15)}
  assert diagnose(_history({"loss": loss}, {"test/loss": test})) == []
  # Without the initial test loss: a 4 % early drop, and the last fifth's fall (0.153 ->
  # 0.112) is 17 % of 0.352 - 0.112 (9 % of 0.568 - 0.112 with it).
  names = _names(diagnose(_history({"loss": loss})))
  assert {"early_plateau", "too_few_steps"} <= set(names)


def test_too_few_steps_needs_a_falling_last_stretch():
  """A run that never learnt (2.37 -> 2.33) whose last fifth falls 1 % in noise: 40 % of
  a tiny improvement, but a plateau, not progress (a digits run at lr 1 was 'too few
  steps' and 'stuck late' at once)."""
  rng = np.random.default_rng(97)
  loss = 2.35 - 0.0003 * np.arange(150) + 0.03 * rng.standard_normal(150)
  test = {s: 2.37 if s == 0 else 2.34 for s in range(0, 151, 15)}
  h = _history({"loss": loss}, {"test/loss": test})
  assert "too_few_steps" not in _names(diagnose(h))
  assert "too_few_steps" in _names(diagnose(h, plateau_rel_change=0.0))
