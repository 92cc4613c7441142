"""Tests of jaxscope.diagnose.LiveDiagnosis on hand-made run directories."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from jaxscope.diagnose import LiveDiagnosis
from jaxscope.record import Recorder

N = 200


def _write_run(run_dir: Path, values_at, steps=range(N)) -> Recorder:
  """A run directory with ``values_at(step)`` at each step; the recorder left open."""
  rec = Recorder(run_dir)
  for s in steps:
    rec.write(s, values_at(s))
  return rec


def _healthy(s: int) -> dict[str, float]:
  return {"loss": 2.3 * math.exp(-s / 50) + 0.05}


def _diverging(s: int) -> dict[str, float]:
  return {"loss": _healthy(s)["loss"] if s < 150 else math.nan}


def _dead_units(s: int) -> dict[str, float]:
  # Dead units in the first of two layers of a run stuck near its initial loss: warnings
  # only (dead units, the early and the late plateau).
  return {
    "loss": 2.3 * (1 + 0.01 * float(np.random.default_rng(s).standard_normal())),
    "activations/dead_fraction/Dense_0": 0.8,
    "activations/dead_fraction/Dense_1": 0.0,
  }


def test_critical_findings_are_emitted_at_once_and_only_once(tmp_path):
  _write_run(tmp_path, _diverging).close()
  lines: list[str] = []
  live = LiveDiagnosis(tmp_path, total_steps=1000, emit=lines.append)
  new = live(N - 1)
  assert [f.name for f in new] == ["divergence"]
  assert len(lines) == 1
  assert lines[0].startswith(
    "jaxscope [critical] divergence (high confidence): The loss diverges: at step 150"
  )
  assert lines[0].endswith(f"(jaxscope diagnose {tmp_path})")
  assert live.reported == {"divergence"}
  assert live(N) == [] and live(1000) == []  # Reported before: not again.
  assert len(lines) == 1


def test_warnings_wait_for_the_final_evaluation(tmp_path):
  _write_run(tmp_path, _dead_units).close()
  lines: list[str] = []
  live = LiveDiagnosis(tmp_path, total_steps=N, emit=lines.append)
  assert live(N // 2) == [] and live(N - 1) == []
  assert lines == []
  new = live(N)
  assert {f.name for f in new} == {"dead_units", "early_plateau", "late_plateau"}
  assert lines == [live.message(f) for f in new]
  assert any(x.startswith("jaxscope [warning] dead_units (medium confidence): ") for x in lines)
  assert live(N + 10) == []


def test_a_healthy_run_emits_nothing(tmp_path):
  _write_run(tmp_path, _healthy).close()
  lines: list[str] = []
  live = LiveDiagnosis(tmp_path, total_steps=N - 1, emit=lines.append)
  assert live(N - 1) == [] and lines == []


def test_flush_is_called_before_the_log_is_read(tmp_path):
  # The loss turns NaN at the last step, which the open recorder still holds (pending).
  rec = _write_run(tmp_path, lambda s: _diverging(s + 150 - (N - 1)))
  quiet = LiveDiagnosis(tmp_path, total_steps=N, emit=lambda _: None)
  assert quiet(N) == []  # Without a flush the last step is not in the log yet.
  calls: list[int] = []

  def flush() -> None:
    calls.append(1)
    rec.flush()

  live = LiveDiagnosis(tmp_path, total_steps=N, emit=lambda _: None, flush=flush)
  (f,) = live(N)
  assert f.name == "divergence" and f.evidence["steps"] == [N - 1]
  assert calls == [1]
  rec.close()


def test_thresholds_are_passed_to_the_rules(tmp_path):
  _write_run(tmp_path, _dead_units).close()
  live = LiveDiagnosis(tmp_path, total_steps=N, emit=lambda _: None)
  assert "dead_units" in [f.name for f in live(N)]
  from jaxscope.diagnose import Thresholds

  strict = LiveDiagnosis(
    tmp_path, total_steps=N, emit=lambda _: None, thresholds=Thresholds(dead_fraction=0.9)
  )
  assert "dead_units" not in [f.name for f in strict(N)]


def test_default_emit_prints_to_stderr(tmp_path, capsys):
  _write_run(tmp_path, _diverging).close()
  LiveDiagnosis(str(tmp_path), total_steps=N)(N)
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.count("] divergence") == 1


def test_a_failing_diagnosis_warns_and_never_raises(tmp_path):
  live = LiveDiagnosis(tmp_path / "missing", total_steps=N, emit=lambda _: None)
  with pytest.warns(UserWarning, match="live diagnosis failed"):
    assert live(N) == []
  assert live.reported == set()


def test_steps_recorded_sparsely(tmp_path):
  # Evaluations every 10 steps; the rules see exactly what was logged.
  _write_run(tmp_path, _diverging, steps=np.arange(0, N, 10).tolist()).close()
  live = LiveDiagnosis(tmp_path, total_steps=N, emit=lambda _: None)
  (f,) = live(N)
  assert f.evidence["steps"] == [150]
