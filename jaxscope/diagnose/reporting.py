"""Findings out: their order (alarms first, causes before symptoms, most severe and most
certain first, then by first step), JSON and a text report.

(Named ``reporting`` so that the submodule does not shadow the function
:func:`jaxscope.diagnose.report` on the package.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from jaxscope.diagnose.finding import CONFIDENCES, SEVERITIES, Finding

#: Findings that name a cause in the training data or the run's setup (what to change
#: before training again; ``stalled_layers``: layers that get no update, a stop_gradient,
#: mask or per-layer learning rate of 0). Within a severity they come before the findings
#: that describe a symptom (a curve's shape, a layer's state), which several causes can
#: produce: the first finding of a report is the likeliest cause.
CAUSES = frozenset(
  {
    "nonfinite_data",
    "unnormalised_inputs",
    "class_imbalance",
    "label_noise",
    "bad_init_scale",
    "lr_too_low",
    "lr_above_curvature_limit",
    "dropout_too_strong",
    "loss_output_mismatch",
    "too_few_steps",
    "stalled_layers",
  }
)


def _sort_key(f: Finding) -> tuple[bool, bool, bool, int, int, float, str]:
  """Alarms (critical and warning) before info; within them findings of confidence
  ``"low"`` last (just past a threshold, or seen only after a divergence), causes
  (:data:`CAUSES`) before symptoms (an input scale or initialisation that made the loss
  diverge comes before the divergence, whatever their severities), then by severity,
  confidence, the first step of the evidence and the name."""
  steps = f.evidence.get("steps") or []
  first = min(steps) if steps else math.inf
  return (
    f.severity == "info",
    f.confidence == "low",
    f.name not in CAUSES,
    SEVERITIES.index(f.severity),
    CONFIDENCES.index(f.confidence),
    first,
    f.name,
  )


def findings_to_json(findings: Iterable[Finding]) -> list[dict[str, Any]]:
  """The findings as a list of JSON-serialisable dicts (:meth:`Finding.to_dict`)."""
  return [f.to_dict() for f in findings]


def report(findings: Sequence[Finding]) -> str:
  """A readable text report of the findings in the order of :func:`_sort_key`, each with
  its severity, name, confidence, summary, evidence layers and steps, and advice.

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
    lines.append(f"[{f.severity.upper()}] {f.name} ({f.confidence} confidence): {f.summary}")
    ev = f.evidence
    if ev.get("layers"):
      lines.append(f"  layers: {', '.join(ev['layers'])}")
    if ev.get("steps"):
      lines.append(f"  steps: {', '.join(str(s) for s in ev['steps'])}")
    for tip in f.advice:
      lines.append(f"  - try: {tip}")
  return "\n".join(lines)
