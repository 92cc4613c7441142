"""Rules over the data a run trained on (``config["data_stats"]``, which
:func:`jaxscope.data.data_stats` records): non-finite entries, unnormalised inputs or
targets, class imbalance. A run without ``data_stats`` (older, or a loop of one's own
whose config does not hold it) is not judged.

They read the whole run's configuration, a divergence or not (the data are a cause, never a
consequence). Their evidence is a statistic of the data, not a sample of a noisy series,
so their confidence rests on the margin alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxscope.diagnose.finding import Finding, Thresholds, _confidence, _finding, _fmt, _margin
from jaxscope.record import History


def _stats(h: History) -> Mapping[str, Any] | None:
  stats = (h.config or {}).get("data_stats")
  return stats if isinstance(stats, Mapping) else None


def _rule_nonfinite_data(h: History, th: Thresholds) -> list[Finding]:
  """NaN/Inf in the training inputs or regression targets: ``nonfinite_fraction > 0``.
  Critical: every batch that holds one makes the loss and the gradient NaN."""
  del th
  stats = _stats(h)
  if stats is None:
    return []
  bad = {
    part: float(stats[part].get("nonfinite_fraction", 0.0))
    for part in ("inputs", "targets")
    if isinstance(stats.get(part), Mapping) and stats[part].get("nonfinite_fraction", 0.0) > 0
  }
  if not bad:
    return []
  what = " and ".join(f"{_fmt(100 * v)} % of the {k}' entries" for k, v in bad.items())
  summary = f"The training data holds NaN/Inf: {what} are not finite."
  values = {f"{k}_nonfinite_fraction": v for k, v in bad.items()}
  # Any non-finite entry makes every batch that holds it NaN: a fact, not a judgement.
  return [
    _finding("nonfinite_data", "critical", summary, metric="loss", values=values, confidence="high")
  ]


def _input_problem(x: Mapping[str, Any], th: Thresholds) -> tuple[str, float] | None:
  """What is wrong with float inputs' statistics ``x`` and its margin, or ``None``."""
  scale = max(abs(float(x["min"])), abs(float(x["max"])))
  std = float(x["std"])
  if scale > th.input_scale_max:
    what = (
      f"the inputs reach |x| = {_fmt(scale)} (mean {_fmt(x['mean'])}, std {_fmt(std)}), "
      f"above {_fmt(th.input_scale_max)}"
    )
    return what, max(
      _margin(scale, th.input_scale_max, above=True), _margin(std, th.input_std_max, above=True)
    )
  if std > th.input_std_max:
    what = f"the inputs' standard deviation is {_fmt(std)} (|x| up to {_fmt(scale)}), above "
    return what + _fmt(th.input_std_max), _margin(std, th.input_std_max, above=True)
  if std < th.input_std_min:
    what = f"the inputs barely vary (std {_fmt(std)} < {_fmt(th.input_std_min)})"
    return what, _margin(std, th.input_std_min, above=False)
  return None


def _inputs_normalised(h: History, th: Thresholds) -> bool | None:
  """Whether the recorded float inputs look normalised (no :func:`_input_problem`);
  ``None`` without ``data_stats`` or float input statistics."""
  stats = _stats(h)
  x = stats.get("inputs") if stats is not None else None
  if not isinstance(x, Mapping) or "std" not in x:
    return None
  return _input_problem(x, th) is None


def _rule_unnormalised(h: History, th: Thresholds) -> list[Finding]:
  """Unnormalised inputs (``max |x| > input_scale_max`` or a standard deviation above
  ``input_std_max``: raw 0–255 pixels, unscaled features; a standard deviation below
  ``input_std_min``: a constant input) or regression targets (``max |y| >
  target_scale_max``). Warning; the confidence from the largest margin. Source: the most
  common real fault of the DeepFD study, "unnormalised inputs"."""
  stats = _stats(h)
  if stats is None:
    return []
  problems: list[str] = []
  margins: list[float] = []
  values: dict[str, float] = {}
  x = stats.get("inputs")
  if isinstance(x, Mapping) and "std" in x:
    scale = max(abs(float(x["min"])), abs(float(x["max"])))
    values.update(input_scale=scale, input_mean=float(x["mean"]), input_std=float(x["std"]))
    problem = _input_problem(x, th)
    if problem is not None:
      problems.append(problem[0])
      margins.append(problem[1])
  y = stats.get("targets")
  if isinstance(y, Mapping) and "max" in y:
    scale = max(abs(float(y["min"])), abs(float(y["max"])))
    values["target_scale"] = scale
    if scale > th.target_scale_max:
      problems.append(
        f"the regression targets reach |y| = {_fmt(scale)}, above {_fmt(th.target_scale_max)}"
      )
      margins.append(_margin(scale, th.target_scale_max, above=True))
  if not problems:
    return []
  summary = "Unnormalised data: " + "; ".join(problems) + "."
  return [
    _finding(
      "unnormalised_inputs",
      "warning",
      summary,
      metric="loss",
      values=values,
      confidence=_confidence(max(margins)),
    )
  ]


def _rule_class_imbalance(h: History, th: Thresholds) -> list[Finding]:
  """Class imbalance: the rarest class's share of the training labels is below
  ``imbalance_ratio ×`` the commonest's (a class without examples included). Not judged
  for per-token labels (language models), whose classes are imbalanced by nature.
  Warning."""
  stats = _stats(h)
  labels = stats.get("labels") if stats is not None else None
  if not isinstance(labels, Mapping) or labels.get("sequence"):
    return []
  fr = [float(f) for f in labels.get("class_fractions", [])]
  if len(fr) < 2 or max(fr) <= 0:
    return []
  lo, hi = min(fr), max(fr)
  ratio = lo / hi
  if ratio >= th.imbalance_ratio:
    return []
  rare, common = fr.index(lo), fr.index(hi)
  summary = (
    f"Class imbalance: class {rare} is {_fmt(100 * lo)} % of the training labels, class "
    f"{common} {_fmt(100 * hi)} % (ratio {_fmt(ratio)} < {_fmt(th.imbalance_ratio)})."
  )
  values = {"ratio": ratio, "rarest_class": rare, "commonest_class": common}
  confidence = _confidence(_margin(ratio, th.imbalance_ratio, above=False))
  return [
    _finding(
      "class_imbalance", "warning", summary, metric="loss", values=values, confidence=confidence
    )
  ]
