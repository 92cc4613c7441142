"""The fault benchmark of the diagnosis (benchmarks/diagnose/): its scoring functions on
hand-made outcomes (Wilson interval, McNemar, ground truth, held-out split, remedies,
divergence stops), the injected faults on a small constructed dataset, and ``--quick``
(grid, then ``--remedies``) in a subprocess, whose JSON is checked against its own
per-run table."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks.diagnose import score  # noqa: E402
from benchmarks.diagnose.faults import corrupt  # noqa: E402
from benchmarks.diagnose.remedy import (  # noqa: E402
  ACTIONS,
  NOT_AUTOMATIC,
  REMEDY,
  apply_action,
  other_action,
)
from benchmarks.diagnose.tasks import TASKS  # noqa: E402
from jaxscope.data import Dataset  # noqa: E402

ROW_KEYS = {
  "id", "task", "half", "pool", "family", "severity", "setting", "seed", "run_dir", "steps",
  "test_loss", "test_accuracy", "faulty", "flagged", "findings", "alarm_names", "top1",
  "top3", "right_finding", "detection_prefix", "detection_step", "loss_events",
}  # fmt: skip

# ------------------------------------------------------------------------- rates


def test_wilson_matches_the_hand_value():
  # 8/10: p = 0.8, z² = 3.8415; centre (0.8 + 0.19207) / 1.38415 = 0.71681, half-width
  # 1.96 √(0.016 + 0.0096037) / 1.38415 = 0.22658 -> [0.4902, 0.9434] (the textbook value).
  w = score.wilson(8, 10)
  assert (w["k"], w["n"], w["rate"]) == (8, 10, 0.8)
  assert w["ci95"] == pytest.approx([0.4902, 0.9434], abs=2e-4)
  assert score.wilson(0, 0) == {"k": 0, "n": 0, "rate": None, "ci95": None}
  lo, hi = score.wilson(0, 5)["ci95"]
  assert lo == 0.0 and hi == pytest.approx(3.8415 / (5 + 3.8415), abs=1e-4)  # z²/(n+z²)
  assert score.wilson(5, 5)["ci95"][1] == 1.0


def test_mcnemar_exact_p():
  assert score.mcnemar_p(5, 0) == pytest.approx(2 / 32)  # 2 · C(5,0) / 2^5
  assert score.mcnemar_p(6, 1) == pytest.approx(2 * (1 + 7) / 128)
  assert score.mcnemar_p(3, 3) == 1.0 and score.mcnemar_p(0, 0) == 1.0


# ------------------------------------------------------------------------- ground truth


def _healthy(task: str, losses: list[float], accs: list[float | None]) -> list[dict]:
  return [
    {"task": task, "pool": "healthy", "test_loss": lo, "test_accuracy": a}
    for lo, a in zip(losses, accs, strict=True)
  ]


def test_reference_and_label_by_hand():
  rows = _healthy("digits", [0.2, 0.2, 0.2, 0.2], [0.95, 0.96, 0.94, 0.95])
  rows += _healthy("sine", [0.04, 0.05, 0.03], [None, None, None])
  ref = score.reference(rows)
  d, s = ref["digits"], ref["sine"]
  # Loss std 0 -> the margin 0.15 decides; accuracy std 0.00816 -> 3 std = 0.0245 < 0.03.
  assert d["test_loss"]["threshold"] == pytest.approx(0.35)
  assert d["test_accuracy"]["threshold"] == pytest.approx(0.95 - 0.03)
  # sine: mean 0.04, std 0.01 -> 3 std = 0.03 < margin 0.05; no accuracy threshold.
  assert s["test_loss"]["threshold"] == pytest.approx(0.09) and "test_accuracy" not in s

  def lab(task: str, loss: float | None, acc: float | None) -> bool:
    return score.label({"test_loss": loss, "test_accuracy": acc}, ref[task])

  assert not lab("digits", 0.34, 0.93)
  assert lab("digits", 0.36, 0.99)  # loss over the threshold
  assert lab("digits", 0.2, 0.91)  # accuracy under it
  assert lab("digits", None, 0.95) and lab("digits", 0.2, None)  # not finite
  assert not lab("sine", 0.089, None) and lab("sine", 0.091, None) and lab("sine", None, None)


def _row(half: str, pool: str, faulty: bool, flagged: bool, conf: str | None = None) -> dict:
  findings = [{"name": "x", "severity": "warning", "confidence": conf}] if flagged else []
  return {
    "task": "digits" if half == "calibration" else "sine", "half": half, "pool": pool,
    "family": "f", "severity": 1, "faulty": faulty, "flagged": flagged,
    "findings": findings, "alarm_names": ["x"] if flagged else [], "top1": flagged,
    "top3": flagged, "detection_prefix": 0.25 if flagged and faulty else None,
  }  # fmt: skip


def test_halves_and_their_difference():
  assert {t.name for t in TASKS.values() if t.half == "calibration"} == {"digits", "moons"}
  assert {t.name for t in TASKS.values() if t.half == "held_out"} == {"mnist1d", "sine"}
  cal = [_row("calibration", "fault", True, f) for f in (True, True, True, False)]
  cal += [_row("calibration", "healthy", False, f) for f in (False, False, False, True)]
  held = [_row("held_out", "fault", True, True) for _ in range(2)]
  held += [_row("held_out", "healthy", False, False) for _ in range(2)]
  m = score.all_scores(cal + held, ["f"])
  assert m["per_half"]["calibration"]["recall"]["rate"] == 0.75
  assert m["per_half"]["held_out"]["recall"]["rate"] == 1.0
  assert m["half_difference"]["recall"] == pytest.approx(0.25)
  assert m["half_difference"]["false_alarm_healthy"] == pytest.approx(0.0 - 0.25)
  assert m["overall"]["recall"]["k"] == 5 and m["overall"]["recall"]["n"] == 6
  assert m["per_family"]["f"]["per_half"]["held_out"]["runs"] == 2
  # Only one half: no difference.
  assert "half_difference" not in score.all_scores(cal, ["f"])


def test_precision_by_confidence_partitions_the_flagged_runs():
  rows = [
    _row("calibration", "fault", True, True, "high"),
    _row("calibration", "fault", True, True, "high"),
    _row("calibration", "healthy", False, True, "low"),
    _row("calibration", "fault", True, True, None),
  ]
  rows[0]["findings"].append({"name": "y", "severity": "warning", "confidence": "low"})
  by = score.scores(rows)["precision_by_confidence"]
  assert (by["high"]["k"], by["high"]["n"]) == (2, 2)
  assert (by["low"]["k"], by["low"]["n"]) == (0, 1)
  assert (by["none"]["k"], by["none"]["n"]) == (1, 1) and by["medium"]["n"] == 0
  assert sum(w["n"] for w in by.values()) == score.scores(rows)["flagged"]
  high = score.scores(rows)["high_confidence_only"]  # only the two high alarms count
  assert (high["recall"]["k"], high["recall"]["n"]) == (2, 3)
  assert (high["precision"]["k"], high["precision"]["n"]) == (2, 2)
  assert (high["false_alarm_healthy"]["k"], high["false_alarm_healthy"]["n"]) == (0, 1)


# ------------------------------------------------------------------------- reruns


def test_remedy_table_names_actions():
  for name, action in REMEDY.items():
    assert action is None or action in ACTIONS, name
    assert action is not None or name in NOT_AUTOMATIC, name


def test_apply_action_changes_the_config_fields():
  fields = {"lr": 1.0, "data_args": {"label_noise": 0.5}}
  job = {"id": "digits/x", "task": "digits", "fields": fields}
  assert apply_action(job, "lr_down")["fields"]["lr"] == pytest.approx(0.1)
  assert job["fields"]["lr"] == 1.0  # the job itself is left alone
  plain = {"id": "sine/y", "task": "sine", "fields": {"steps_frac": 0.25}}
  assert apply_action(plain, "lr_up")["fields"]["lr"] == pytest.approx(TASKS["sine"].lr * 10)
  assert apply_action(plain, "more_steps")["fields"]["steps_frac"] == 1.0
  scaled = {"id": "z", "task": "digits", "fields": {"model_args": {"kernel_scale": 5.0}}}
  standard = apply_action(scaled, "fan_in_init")["fields"]["model_args"]
  assert standard == {"init_mode": "lecun", "kernel_scale": 1.0, "hidden_bias": 0.0}
  data = apply_action(job, "standardize")["fields"]["data_args"]
  assert data == {"label_noise": 0.5, "standardize": True}
  strong = {"id": "z", "task": "digits", "fields": {"model_args": {"dropout": 0.9}}}
  assert apply_action(strong, "less_dropout")["fields"]["model_args"]["dropout"] == 0.1
  assert apply_action(plain, "less_dropout")["fields"]["model_args"]["dropout"] == 0.0
  init = apply_action({**strong, "fields": {"model_args": {"kernel_scale": 20.0}}}, "scaled_init")
  assert init["fields"]["model_args"] == {"kernel_scale": 1.0, "init_mode": "scaled",
                                          "hidden_bias": 0.0}  # fmt: skip
  with pytest.raises(ValueError, match="action must be one of"):
    apply_action(job, "pray")


def test_other_action_is_another_seeded_draw():
  ids = [f"digits/run-{i}" for i in range(200)]
  draws = [other_action(i, "lr_down") for i in ids]
  assert "lr_down" not in draws and set(draws) == set(ACTIONS) - {"lr_down"}
  assert draws == [other_action(i, "lr_down") for i in ids]  # the same each time
  regression = {other_action(i, None, classification=False) for i in ids}
  assert not regression & {"rebalance", "logits_output"}


def test_remedy_and_divergence_scores_by_hand():
  def entry(half: str, action: str | None, top: bool | None, other: bool | None) -> dict:
    return {"family": "f", "half": half, "top_action": action, "top_fixed": top,
            "other_fixed": other}  # fmt: skip

  plan = [
    entry("calibration", "lr_down", True, False),
    entry("calibration", "lr_down", True, True),
    entry("held_out", "lr_up", True, False),
    entry("held_out", "lr_up", False, True),
    entry("held_out", None, None, None),
  ]
  s = score.remedy_scores(plan)["overall"]
  assert (s["top"]["k"], s["top"]["n"], s["no_remedy"]) == (3, 4, 1)
  assert (s["top_all"]["k"], s["top_all"]["n"]) == (3, 5)
  assert (s["other"]["k"], s["other"]["n"]) == (2, 4)
  assert (s["paired"]["b"], s["paired"]["c"]) == (2, 1)
  assert s["paired"]["p"] == pytest.approx(1.0)
  stops = [
    {"half": "calibration", "explosion": True, "stopped": "why", "nan_recorded": False},
    {"half": "held_out", "explosion": True, "stopped": "why", "nan_recorded": True},
    {"half": "held_out", "explosion": False, "stopped": None, "nan_recorded": True},
  ]
  d = score.divergence_scores(stops)
  assert (d["trend"]["stopped_before_nan"]["k"], d["trend"]["stopped_before_nan"]["n"]) == (1, 2)
  assert d["sudden"]["stopped_before_nan"]["k"] == 0 and d["all"]["stopped"] == 2
  assert d["trend"]["per_half"]["calibration"]["stopped_before_nan"]["rate"] == 1.0


# ------------------------------------------------------------------------- faults


def _toy(n: int = 40, k: int = 4) -> Dataset:
  x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
  y = (np.arange(n) % k).astype(np.int32)
  return Dataset(x, y, x[:8].copy(), y[:8].copy(), k, "toy")


def test_corrupt_faults_and_remedies():
  ds = _toy()
  shifted = corrupt(ds, label_shift=1.0)
  np.testing.assert_array_equal(shifted.train_y, (ds.train_y + 1) % 4)
  np.testing.assert_array_equal(shifted.test_y, ds.test_y)  # the test split stays clean
  thin = corrupt(ds, minority_keep=0.2)  # classes 2, 3 keep 2 of their 10 examples
  assert np.bincount(thin.train_y).tolist() == [10, 10, 2, 2]
  assert corrupt(thin, rebalance=True).train_y.tolist().count(3) == 10
  nan = corrupt(ds, nan_fraction=0.1)
  assert np.isnan(nan.train_x).any(1).sum() == 4
  dropped = corrupt(ds, nan_fraction=0.1, drop_nonfinite=True)
  assert len(dropped.train_x) == 36 and np.isfinite(dropped.train_x).all()
  big = corrupt(ds, input_scale=255.0, standardize=True)
  assert abs(big.train_x.mean()) < 1e-5 and big.train_x.std() == pytest.approx(1.0, abs=1e-5)
  reg = Dataset(ds.train_x, ds.train_x[:, :1], ds.test_x, ds.test_x[:, :1], 1, "r", "regression")
  with pytest.raises(ValueError, match="regression"):
    corrupt(reg, label_noise=0.5)
  with pytest.raises(ValueError, match="label_shift must be in"):
    corrupt(ds, label_shift=1.5)


# ------------------------------------------------------------------------- the quick run


def _check_scores(s: dict, rows: list[dict]) -> None:
  faulty = [r for r in rows if r["faulty"]]
  flagged = [r for r in rows if r["flagged"]]
  assert (s["runs"], s["faulty"], s["flagged"]) == (len(rows), len(faulty), len(flagged))
  assert (s["recall"]["k"], s["recall"]["n"]) == (sum(r["flagged"] for r in faulty), len(faulty))
  assert (s["precision"]["k"], s["precision"]["n"]) == (len([r for r in flagged if r["faulty"]]),
                                                        len(flagged))  # fmt: skip
  injected = [r for r in faulty if r["pool"] == "fault"]
  assert (s["top1"]["k"], s["top1"]["n"]) == (sum(r["top1"] for r in injected), len(injected))
  for name in score.RATES:
    rate = s[name]["rate"]
    assert rate is None or 0.0 <= rate <= 1.0


def _run(tmp_path: Path, *extra: str) -> dict:
  proc = subprocess.run(
    [sys.executable, "benchmarks/diagnose/run.py", "--quick", "--out", str(tmp_path), *extra],
    cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True, text=True,
    timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((tmp_path / "diagnose.json").read_text())


def _fake_train(job: dict) -> dict:
  """A rerun without training: NaN inputs dropped (or a stop) give a healthy outcome."""
  stop = job["id"].endswith(":stop")
  healthy = stop or job["fields"].get("data_args", {}).get("drop_nonfinite", False)
  return {
    "id": job["id"], "run_dir": job["run_dir"], "steps": 3 if stop else 100,
    "test_loss": 0.1 if healthy else None, "test_accuracy": 0.97 if healthy else 0.5,
    "stopped": "diverged" if stop else None,
    "loss_events": {"first_nonfinite_step": None, "first_explosion_step": None},
  }  # fmt: skip


def _stored(family: str, seed: int, alarms: list[str], events: tuple, **kw) -> dict:
  return {
    "id": f"moons/{family}-s2-seed{seed}", "task": "moons", "half": "calibration",
    "pool": "fault", "family": family, "severity": 2, "setting": "s",
    "fields": {"data_args": {"nan_fraction": 0.02}} if family == "nan_data" else {},
    "seed": seed, "task_steps": 100, "run_dir": f"runs/moons/{family}-s2-seed{seed}",
    "flagged": bool(alarms), "faulty": True, "alarm_names": alarms,
    "loss_events": {"first_nonfinite_step": events[0], "first_explosion_step": events[1]},
    **kw,
  }  # fmt: skip


def test_remedies_stage_on_stored_diagnoses(tmp_path: Path, monkeypatch) -> None:
  from benchmarks.diagnose import remedy, run

  runs = [
    _stored("nan_data", 0, ["nonfinite_data", "divergence"], (0, None)),
    _stored("nan_data", 2, ["nonfinite_data"], (0, None)),  # seed 2: not rerun
    _stored("label_noise", 1, ["label_noise"], (None, None)),  # no automatic remedy
    _stored("lr_too_high", 1, [], (7, 5)),  # missed: no advice rerun, but a stop rerun
  ]
  ref = {"moons": {"n": 2, "test_loss": {"threshold": 0.3}, "test_accuracy": {"threshold": 0.9}}}
  stored = {"runs": runs, "reference": ref, "runs_base": "OUT", "rules_commit": "abc"}
  (tmp_path / "diagnose.json").write_text(json.dumps(stored))
  monkeypatch.setattr(run, "train_one", _fake_train)
  stored = {r["run_dir"]: r["alarm_names"] for r in runs}
  base = tmp_path.resolve()  # runs_base "OUT": the run dirs lie under the result's folder
  monkeypatch.setattr(run, "first_alarm",
                      lambda d: (stored[str(Path(d).relative_to(base))][0], {}))  # fmt: skip
  monkeypatch.setattr(remedy, "first_alarm", lambda d: (None, {}))  # reruns: no alarm
  args = argparse.Namespace(runs=None, rerun_seeds=2, jobs=1, rounds=3)
  result = run.remedies(args, tmp_path)
  plan = {e["id"]: e for e in result["remedies"]["runs"]}
  assert set(plan) == {"moons/nan_data-s2-seed0", "moons/label_noise-s2-seed1"}
  nan = plan["moons/nan_data-s2-seed0"]
  assert nan["top_action"] == "drop_nonfinite"
  assert nan["top_fixed"] is True and nan["other_fixed"] is False
  assert nan["other_action"] not in (None, "drop_nonfinite")
  noise = plan["moons/label_noise-s2-seed1"]
  assert noise["top_action"] is None and noise["top_fixed"] is None
  s = result["remedies"]["scores"]["overall"]
  assert (s["runs"], s["no_remedy"], s["top"]["k"], s["top"]["n"]) == (2, 1, 1, 1)
  stops = {r["family"]: r for r in result["divergence_stop"]["runs"]}
  assert set(stops) == {"nan_data", "lr_too_high"}  # seeds 0 and 1 with a loss event
  assert stops["lr_too_high"]["explosion"] and not stops["nan_data"]["explosion"]
  assert result["divergence_stop"]["scores"]["all"]["stopped_before_nan"]["k"] == 2


@pytest.mark.slow
def test_quick_benchmark(tmp_path: Path) -> None:
  result = _run(tmp_path)
  assert result["quick"] is True and "--quick" in result["command"]
  rows = result["runs"]
  assert rows and all(ROW_KEYS <= set(r) for r in rows)
  assert {r["pool"] for r in rows} == {"healthy", "fault"}
  assert {r["half"] for r in rows} == {"calibration", "held_out"}
  assert all(not Path(r["run_dir"]).is_absolute() for r in rows)
  for r in rows:  # the ground truth follows from the outcome alone
    ref = result["reference"][r["task"]]
    loss, acc = r["test_loss"], r["test_accuracy"]
    bad = loss is None or loss > ref["test_loss"]["threshold"]
    if "test_accuracy" in ref:
      bad = bad or acc is None or acc < ref["test_accuracy"]["threshold"]
    assert r["faulty"] == bad
    assert r["flagged"] == bool(r["alarm_names"])
    ok = set(result["acceptable"].get(r["family"], ()))
    assert r["top1"] == (bool(r["alarm_names"]) and r["alarm_names"][0] in ok)
    assert loss is None or math.isfinite(loss)
  metrics = result["metrics"]
  _check_scores(metrics["overall"], rows)
  for half, s in metrics["per_half"].items():
    _check_scores(s, [r for r in rows if r["half"] == half])
  # NaN inputs are named at once; lr 10 diverges, and the log says where.
  (nan,) = [r for r in rows if r["family"] == "nan_data"]
  assert "nonfinite_data" in nan["alarm_names"] and nan["faulty"]
  (high,) = [r for r in rows if r["family"] == "lr_too_high"]
  assert high["faulty"] and any(v is not None for v in high["loss_events"].values())


def test_doc_remedy_table_is_the_code_table():
  text = (ROOT / "docs" / "diagnose.md").read_text(encoding="utf-8")
  for name, action in REMEDY.items():
    assert f"| `{name}` | {f'`{action}`' if action else '–'} |" in text, name


def test_train_remedy_follows_the_reruns_advice() -> None:
  """An advice chain: the rerun is diagnosed and the remedy of its first alarm applied on
  top while an alarm is raised, at most ``rounds`` runs; lr_up takes the finding's
  suggested factor; a stopped run with no alarm counts as a divergence (issue 21)."""
  from benchmarks.diagnose.remedy import train_remedy

  seen: list[tuple[str, float]] = []

  def fake(job: dict) -> dict:
    lr = job["fields"]["lr"]
    seen.append((job["run_dir"], lr))
    return {"id": job["id"], "run_dir": job["run_dir"], "test_loss": lr,
            "stopped": "diverged" if lr > 1.0 else None}  # fmt: skip

  def alarm(run_dir: str) -> tuple:
    lr = dict(seen)[run_dir]
    return ("lr_too_low", {"suggested_factor": 10.0}) if lr < 0.01 else (None, {})

  job = {"id": "digits/x:top", "task": "digits", "fields": {"lr": 1e-4}, "run_dir": "d"}
  row = train_remedy({**job, "chain": ("top", "lr_up", {"suggested_factor": 30.0}, 3)},
                     fake, alarm)  # fmt: skip
  assert [lr for _, lr in seen] == pytest.approx([3e-3, 3e-2])  # x30, then x10: no alarm
  assert [d for d, _ in seen] == ["d-r1", "d-r2"]
  assert [r["action"] for r in row["rounds"]] == ["lr_up", "lr_up"]
  assert row["test_loss"] == pytest.approx(3e-2)
  seen.clear()  # at most `rounds` runs, however many alarms
  row = train_remedy({**job, "chain": ("top", "lr_up", {}, 2)}, fake,
                     lambda d: ("lr_too_low", {"suggested_factor": 2.0}))  # fmt: skip
  assert [lr for _, lr in seen] == pytest.approx([1e-3, 2e-3]) and len(row["rounds"]) == 2
  seen.clear()  # a diverged rerun with no alarm: the divergence advice, lr x 0.1
  big = {**job, "fields": {"lr": 30.0}}
  row = train_remedy({**big, "chain": ("top", "more_steps", {}, 3)}, fake, lambda d: (None, {}))
  assert [lr for _, lr in seen] == pytest.approx([30.0, 3.0, 0.3])
  assert [r["action"] for r in row["rounds"]] == ["more_steps", "lr_down", "lr_down"]
  seen.clear()  # the same finding again after its remedy: the advice's next item
  row = train_remedy({**job, "chain": ("top", "scaled_init", {}, 3)}, fake,
                     lambda d: ("dead_units", {}))  # fmt: skip
  assert [r["action"] for r in row["rounds"]] == ["scaled_init", "lr_down", "lr_down"]
  seen.clear()  # an alarm with no automatic remedy ends the advice chain
  row = train_remedy({**job, "chain": ("top", "lr_up", {}, 3)}, fake,
                     lambda d: ("label_noise", {}))  # fmt: skip
  assert len(row["rounds"]) == 1
  seen.clear()  # the random chain: another action than the advised one, without its values
  row = train_remedy({**job, "chain": ("other", "stop_early", {}, 3)}, fake,
                     lambda d: ("lr_too_low", {"suggested_factor": 1e6}))  # fmt: skip
  acts = [r["action"] for r in row["rounds"]]
  assert len(acts) == 3 and "lr_up" not in acts[1:]
  assert acts[1] == other_action("digits/x:top#1", "lr_up")
  assert max(lr for _, lr in seen) < 1.0  # no factor of 1e6 was read


def test_lr_up_and_down_read_the_suggested_factor() -> None:
  job = {"id": "digits/x", "task": "digits", "fields": {"lr": 1e-3}}
  assert apply_action(job, "lr_up", {"suggested_factor": 50.0})["fields"]["lr"] == 0.05
  assert apply_action(job, "lr_up", {"lr": 3.0})["fields"]["lr"] == pytest.approx(1e-2)
  assert apply_action(job, "lr_down", {"suggested_factor": 0.04})["fields"]["lr"] == 4e-5
  assert apply_action(job, "lr_down", {})["fields"]["lr"] == pytest.approx(1e-4)
  # A stated factor on the wrong side of 1 is not read: each action keeps its direction.
  assert apply_action(job, "lr_down", {"suggested_factor": 50.0})["fields"]["lr"] == 1e-4
  assert apply_action(job, "lr_up", {"suggested_factor": 0.5})["fields"]["lr"] == 1e-2


def test_next_remedy_takes_the_follow_up_once_the_first_was_applied() -> None:
  """A finding raised again after its remedy: a repeatable remedy again (lr x 0.1 once
  more), else the next advice item a config change expresses, else the chain ends."""
  from benchmarks.diagnose.remedy import FOLLOW_UP, REPEATABLE, next_remedy

  # dead_units: died during training -> the learning rate (again while they die); dead
  # from the first step -> biases, then He init, then the learning rate.
  assert next_remedy("dead_units", []) == "lr_down"
  assert next_remedy("dead_units", ["lr_down"]) == "lr_down"  # repeatable
  start = {"dead_from_start": True}
  assert next_remedy("dead_units", [], start) == "positive_biases"
  assert next_remedy("dead_units", ["positive_biases"], start) == "scaled_init"
  assert next_remedy("dead_units", ["positive_biases", "scaled_init"], start) == "lr_down"
  assert next_remedy("early_plateau", ["lr_up"]) == "lr_up"
  assert next_remedy("late_plateau", ["lr_decay"]) == "scaled_init"
  assert next_remedy("late_plateau", ["lr_decay", "scaled_init"]) is None
  assert next_remedy("class_imbalance", ["rebalance"]) is None
  assert next_remedy("label_noise", []) is None
  # bad_init_scale: down to the fan-in scale, or up (He) when the finding measured too small.
  assert next_remedy("bad_init_scale", []) == "fan_in_init"
  assert next_remedy("bad_init_scale", [], {"initial_scale": "too large"}) == "fan_in_init"
  assert next_remedy("bad_init_scale", [], {"initial_scale": "too small"}) == "scaled_init"
  assert next_remedy("bad_init_scale", ["fan_in_init"], {"initial_scale": "too large"}) is None
  for name, actions in FOLLOW_UP.items():
    assert name in REMEDY and all(a in ACTIONS for a in actions), name
  assert REPEATABLE <= set(ACTIONS)
