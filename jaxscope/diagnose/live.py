"""Diagnosis while a run trains: each new finding reported once, critical ones at once."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from jaxscope.diagnose.finding import Finding, Thresholds
from jaxscope.diagnose.registry import diagnose
from jaxscope.record import History


def _print_stderr(message: str) -> None:
  print(message, file=sys.stderr)


class LiveDiagnosis:
  """Runs :func:`~jaxscope.diagnose.diagnose` on a run's log at each evaluation.

  Each call flushes the log (``flush``), loads the run's :class:`~jaxscope.record.History`,
  runs the rules and emits one line per finding whose name was not emitted before:
  critical findings at any step, warnings only from ``total_steps`` on (the final
  evaluation), since they judge trends over the whole run (plateaus, update ratios,
  spikes) that a prefix of it does not show reliably. Info findings are not emitted. A
  diagnosis that fails (an unreadable log, a bug in a rule) is reported with
  :func:`warnings.warn` and never raised: it must not stop training.

  The line reads ``jaxscope [{severity}] {name} ({confidence} confidence): {summary}
  (jaxscope diagnose {run_dir})``.

  A training loop uses it as::

    live = LiveDiagnosis(run_dir, total_steps, emit=bar.write, flush=recorder.flush)
    ...
    live(step)  # after writing the evaluation of `step`

  Args:
    run_dir: the run directory whose ``metrics.jsonl`` is diagnosed.
    total_steps: the run's last step; warnings are emitted at calls with
      ``step >= total_steps``.
    emit: called with each line (default: printed to stderr).
    flush: called before the log is read, e.g. :meth:`jaxscope.record.Recorder.flush`, so
      that it holds every step written so far.
    thresholds: the thresholds of the rules (default :class:`Thresholds()`).
  """

  def __init__(
    self,
    run_dir: str | os.PathLike[str],
    total_steps: int,
    *,
    emit: Callable[[str], None] | None = None,
    flush: Callable[[], None] | None = None,
    thresholds: Thresholds | None = None,
  ) -> None:
    self.run_dir = Path(run_dir)
    self.total_steps = int(total_steps)
    self._emit = emit if emit is not None else _print_stderr
    self._flush = flush
    self._thresholds = thresholds
    self.reported: set[str] = set()
    """Names of the findings emitted so far."""

  def message(self, finding: Finding) -> str:
    """The line emitted for ``finding``."""
    return (
      f"jaxscope [{finding.severity}] {finding.name} ({finding.confidence} confidence): "
      f"{finding.summary} "
      f"(jaxscope diagnose {self.run_dir})"
    )

  def __call__(self, step: int) -> list[Finding]:
    """Diagnoses the run as logged up to now and emits the new findings.

    Args:
      step: the step of the evaluation just written; warnings wait until it reaches
        ``total_steps``.

    Returns:
      The findings emitted by this call (empty when none is new, or the diagnosis failed).
    """
    if self._flush is not None:
      self._flush()
    try:
      findings = diagnose(History.load(self.run_dir), self._thresholds)
    except Exception as e:  # A diagnosis must never stop training.
      warnings.warn(f"jaxscope: live diagnosis failed: {e}", stacklevel=2)
      return []
    severities = ("critical", "warning") if step >= self.total_steps else ("critical",)
    new: list[Finding] = []
    for f in findings:
      if f.name not in self.reported and f.severity in severities:
        self.reported.add(f.name)
        self._emit(self.message(f))
        new.append(f)
    return new
