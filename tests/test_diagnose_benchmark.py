"""The fault benchmark of the diagnosis (benchmarks/diagnose/run.py): ``--quick`` runs in a
subprocess, and its JSON is checked for structure and for metrics that agree with its
per-run table (recomputed here)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATES = (
  "recall",
  "precision",
  "false_alarm_healthy",
  "false_alarm_stress",
  "flagged_harmless_injected",
  "top1",
  "top3",
)
ROW_KEYS = {
  "id", "pool", "family", "severity", "setting", "seed", "run_dir", "steps", "test_loss",
  "test_accuracy", "faulty", "flagged", "findings", "alarm_names", "top1", "top3",
  "right_finding", "detection_prefix", "detection_step",
}  # fmt: skip


def _check_rate(w: dict, k: int, n: int) -> None:
  assert (w["k"], w["n"]) == (k, n)
  if n == 0:
    assert w["rate"] is None and w["ci95"] is None
    return
  assert w["rate"] == pytest.approx(k / n)
  lo, hi = w["ci95"]
  assert 0.0 <= lo <= w["rate"] <= hi <= 1.0


def _check_scores(s: dict, rows: list[dict]) -> None:
  faulty = [r for r in rows if r["faulty"]]
  flagged = [r for r in rows if r["flagged"]]
  assert (s["runs"], s["faulty"], s["flagged"]) == (len(rows), len(faulty), len(flagged))
  _check_rate(s["recall"], sum(r["flagged"] for r in faulty), len(faulty))
  _check_rate(s["precision"], sum(r["faulty"] for r in flagged), len(flagged))
  for key, pool in (
    ("false_alarm_healthy", "healthy"),
    ("false_alarm_stress", "stress"),
    ("flagged_harmless_injected", "fault"),
  ):
    clean = [r for r in rows if r["pool"] == pool and not r["faulty"]]
    _check_rate(s[key], sum(r["flagged"] for r in clean), len(clean))
  injected = [r for r in faulty if r["pool"] == "fault"]
  _check_rate(s["top1"], sum(r["top1"] for r in injected), len(injected))
  _check_rate(s["top3"], sum(r["top3"] for r in injected), len(injected))
  found = [r for r in injected if r["detection_prefix"] is not None]
  assert sum(s["detection_prefix_counts"].values()) == len(found)
  for name in RATES:
    rate = s[name]["rate"]
    assert rate is None or 0.0 <= rate <= 1.0


@pytest.mark.slow
def test_quick_benchmark(tmp_path: Path) -> None:
  env = {**os.environ, "MPLBACKEND": "Agg"}
  proc = subprocess.run(
    [sys.executable, "benchmarks/diagnose/run.py", "--quick", "--out", str(tmp_path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "diagnose.json").read_text())
  assert result["quick"] is True and "--quick" in result["command"]
  assert result["grid"]["seed_list"] == [0]
  rows = result["runs"]
  assert rows and all(ROW_KEYS <= set(r) for r in rows)
  assert {r["pool"] for r in rows} == {"healthy", "stress", "fault"}
  ref = result["reference"]
  for r in rows:  # the ground truth follows from the outcome alone
    loss, acc = r["test_loss"], r["test_accuracy"]
    bad = loss is None or acc is None
    bad = bad or loss > ref["test_loss"]["threshold"] or acc < ref["test_accuracy"]["threshold"]
    assert r["faulty"] == bad
    assert r["flagged"] == any(f["severity"] in ("critical", "warning") for f in r["findings"])
    assert r["flagged"] == bool(r["alarm_names"])
    ok = set(result["acceptable"].get(r["family"], ()))
    assert r["top1"] == (bool(r["alarm_names"]) and r["alarm_names"][0] in ok)
    assert r["top3"] == bool(ok & set(r["alarm_names"][:3]))
    if r["detection_prefix"] is not None:
      assert r["right_finding"] and r["detection_prefix"] in result["grid"]["prefixes"]
      assert r["detection_step"] <= r["steps"]
    assert loss is None or math.isfinite(loss)
  metrics = result["metrics"]
  _check_scores(metrics["overall"], rows)
  assert set(metrics["per_family"]) == {r["family"] for r in rows if r["pool"] == "fault"}
  for family, s in metrics["per_family"].items():
    _check_scores(s, [r for r in rows if r["pool"] == "fault" and r["family"] == family])
  # The blatant faults of the quick grid are found (a NaN in the data is named at once).
  nan = [r for r in rows if r["family"] == "nan_data"]
  assert nan and all("nonfinite_data" in r["alarm_names"] for r in nan)
