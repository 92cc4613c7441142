"""Findings out: their order (most severe first, then by first step), JSON and a text report.

(Named ``reporting`` so that the submodule does not shadow the function
:func:`jaxscope.diagnose.report` on the package.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from jaxscope.diagnose.finding import SEVERITIES, Finding


def _sort_key(f: Finding) -> tuple[int, float, str]:
  """Severity (most severe first), then the first step of the evidence, then the name."""
  steps = f.evidence.get("steps") or []
  first = min(steps) if steps else math.inf
  return SEVERITIES.index(f.severity), first, f.name


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
