"""The figure of a diagnosis (:func:`jaxscope.diagnose.diagnose`): the metrics behind each
finding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxscope.plot._common import MANY_LAYERS, log_worthy, mark_nonfinite, scalar_series
from jaxscope.record import History

__all__ = ["diagnosis_figure"]

MAX_PANELS = 8
"""Findings beyond the first eight (the likeliest causes) are not drawn."""
SEVERITY_COLOURS = {"critical": "tab:red", "warning": "tab:orange", "info": "tab:blue"}
"""The colour of a finding's step markers by its severity."""


def _evidence_keys(history: History, evidence: Mapping[str, Any]) -> list[str]:
  """The recorded scalar keys a finding's evidence names (metric × layers)."""
  metrics = evidence.get("metric") or evidence.get("metrics") or []
  if isinstance(metrics, str):
    metrics = [metrics]
  layers = evidence.get("layers") or []
  keys: list[str] = []
  for m in metrics:
    if m in history:
      keys.append(m)
      continue
    for lay in layers:
      if f"{m}/{lay}" in history:
        keys.append(f"{m}/{lay}")
    if not layers:
      keys.extend(k for k in history.keys() if k.startswith(f"{m}/"))
  out = []
  for k in dict.fromkeys(keys):
    _, v = history.series(k)
    if v.ndim == 1:
      out.append(k)
  return out[:MANY_LAYERS]


def _draw_finding(ax: Any, history: History, finding: Any) -> None:
  """One finding's panel: its evidence series, its steps as vertical lines, its summary."""
  keys = _evidence_keys(history, finding.evidence) or (["loss"] if "loss" in history else [])
  values = []
  for k in keys:
    steps, v = scalar_series(history, k)
    values.append(v)
    ok = np.isfinite(v)
    ax.plot(steps[ok], v[ok], lw=1, label=k if len(keys) > 1 else None)
    mark_nonfinite(ax, steps[~ok])
  if values and log_worthy(values, 100.0):
    ax.set_yscale("log")
  colour = SEVERITY_COLOURS.get(finding.severity, "gray")
  for s in list(finding.evidence.get("steps") or [])[:20]:
    ax.axvline(float(s), color=colour, lw=0.8, alpha=0.7)
  ax.set_title(
    f"[{finding.severity}] {finding.name}\n{finding.summary}", fontsize=8, loc="left", wrap=True
  )
  ax.set_xlabel("step")
  if keys:
    ax.set_ylabel(keys[0] if len(keys) == 1 else "value", fontsize=8)
  if len(keys) > 1:
    ax.legend(fontsize=6)


def diagnosis_figure(history: History | str | Path, findings: Sequence[Any]) -> Figure:
  """One page with the metrics behind each finding of :func:`jaxscope.diagnose.diagnose`.

  One panel per finding (in the order of the diagnosis, at most 8): the recorded series its evidence
  names (``evidence["metric"]`` and ``evidence["layers"]``), log scale when they span
  decades, the steps in ``evidence["steps"]`` marked by vertical lines, titled with the
  finding's severity, name and summary. With no finding, the loss with "no problem found".

  Args:
    history: the run (a :class:`~jaxscope.record.History` or its directory).
    findings: the findings (objects with ``name``, ``severity``, ``summary``, ``evidence``).

  Returns:
    The figure.
  """
  if not isinstance(history, History):
    history = History.load(history)
  shown = list(findings)[:MAX_PANELS]
  n = max(len(shown), 1)
  cols = 2 if n > 1 else 1
  rows = -(-n // cols)
  fig = Figure(figsize=(6.5 * cols, 3.2 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  if not shown:
    ax = axes[0]
    if "loss" in history:
      steps, loss = scalar_series(history, "loss")
      ax.plot(steps, loss, lw=1)
      if log_worthy([loss], 100.0):
        ax.set_yscale("log")
    ax.set_title("no problem found", fontsize=10)
    ax.set_xlabel("step")
  for ax, f in zip(axes, shown, strict=False):
    _draw_finding(ax, history, f)
  for ax in axes[n:]:
    ax.set_visible(False)
  fig.suptitle(f"diagnosis of {history.run_dir or 'a run'}", fontsize=10)
  fig.tight_layout()
  return fig
