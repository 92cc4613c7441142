"""The scores of the diagnosis benchmark: ground truth, rates with Wilson intervals, the
halves of the tasks, the advice reruns and the divergence stops.

Everything here is a pure function of the rows (dicts, one per run) that
:mod:`benchmarks.diagnose.run` writes; nothing trains or diagnoses.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.diagnose.tasks import HALVES, TASKS

__all__ = [
  "CONFIDENCES", "N_STD", "PREFIXES", "RATES", "all_scores", "divergence_scores", "label",
  "mcnemar_p", "reference", "remedy_scores", "scores", "wilson",
]  # fmt: skip

N_STD = 3.0
PREFIXES = (0.25, 0.5, 0.75, 1.0)
ALARM = ("critical", "warning")
CONFIDENCES = ("high", "medium", "low", "none")
#: The rates of :func:`scores`.
RATES = (
  "recall", "precision", "false_alarm_healthy", "false_alarm_stress",
  "flagged_harmless_injected", "top1", "top3",
)  # fmt: skip


# --------------------------------------------------------------------------- ground truth


def reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Per task, the healthy standard pool's outcome statistics and the faulty thresholds:
  ``mean ± max(N_STD std, margin)`` of the test loss (and accuracy for classification)."""
  out: dict[str, Any] = {}
  for name in dict.fromkeys(r["task"] for r in rows):
    task = TASKS[name]
    healthy = [r for r in rows if r["task"] == name and r["pool"] == "healthy"]
    ref: dict[str, Any] = {"n": len(healthy)}
    keys = [("test_loss", 1, task.loss_margin)]
    if task.acc_margin is not None:
      keys.append(("test_accuracy", -1, task.acc_margin))
    for key, sign, margin in keys:
      vals = [r[key] for r in healthy if r[key] is not None]
      mean = statistics.fmean(vals) if vals else math.nan
      std = statistics.stdev(vals) if len(vals) > 1 else 0.0
      ref[key] = {
        "mean": mean, "std": std, "margin": margin,
        "threshold": mean + sign * max(N_STD * std, margin),
      }  # fmt: skip
    out[name] = ref
  return out


def label(row: dict[str, Any], ref: dict[str, Any]) -> bool:
  """Whether a run's outcome is significantly worse than its task's healthy pool's
  (``ref``: the task's entry of :func:`reference`): faulty."""
  loss = row["test_loss"]
  if loss is None or loss > ref["test_loss"]["threshold"]:
    return True
  if "test_accuracy" in ref:
    acc = row["test_accuracy"]
    return acc is None or acc < ref["test_accuracy"]["threshold"]
  return False


# --------------------------------------------------------------------------- rates


def wilson(k: int, n: int, z: float = 1.959964) -> dict[str, Any]:
  """``k / n`` with its Wilson score interval (``None`` values when ``n == 0``).

  ``(p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k/n`` (Wilson 1927).
  """
  if n == 0:
    return {"k": 0, "n": 0, "rate": None, "ci95": None}
  p = k / n
  d = 1 + z * z / n
  c = (p + z * z / (2 * n)) / d
  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return {"k": k, "n": n, "rate": p, "ci95": [max(0.0, c - h), min(1.0, c + h)]}


def mcnemar_p(b: int, c: int) -> float:
  """Exact two-sided McNemar p-value of ``b`` vs ``c`` discordant pairs:
  ``min(1, 2 Σ_{i ≤ min(b, c)} C(b + c, i) / 2^(b + c))``."""
  n = b + c
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
  return min(1.0, 2 * tail)


def _top_confidence(row: dict[str, Any]) -> str:
  """The highest confidence among a run's alarms (``"none"``: not stated)."""
  levels = [f.get("confidence") or "none" for f in row["findings"] if f["severity"] in ALARM]
  return min(levels, key=CONFIDENCES.index) if levels else "none"


def scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Recall, precision, false-alarm rates, cause accuracy, detection prefixes and the
  precision per confidence (of a flagged run's most confident alarm) of ``rows``."""
  faulty = [r for r in rows if r["faulty"]]
  flagged = [r for r in rows if r["flagged"]]
  injected_faulty = [r for r in faulty if r["pool"] == "fault"]
  found = [r for r in injected_faulty if r["detection_prefix"] is not None]
  prefixes = {str(p): sum(r["detection_prefix"] == p for r in found) for p in PREFIXES}

  def far(pool: str) -> dict[str, Any]:
    clean = [r for r in rows if r["pool"] == pool and not r["faulty"]]
    return wilson(sum(r["flagged"] for r in clean), len(clean))

  by_conf = {}
  for level in CONFIDENCES:
    sub = [r for r in flagged if _top_confidence(r) == level]
    by_conf[level] = wilson(sum(r["faulty"] for r in sub), len(sub))
  # Were only high-confidence alarms reported: a run is flagged when one of them is.
  high = [r for r in flagged if _top_confidence(r) == "high"]

  def far_high(pool: str) -> dict[str, Any]:
    clean = [r for r in rows if r["pool"] == pool and not r["faulty"]]
    return wilson(sum(r in high for r in clean), len(clean))

  high_only = {
    "recall": wilson(sum(r in high for r in faulty), len(faulty)),
    "precision": wilson(sum(r["faulty"] for r in high), len(high)),
    "false_alarm_healthy": far_high("healthy"),
    "false_alarm_stress": far_high("stress"),
  }
  return {
    "runs": len(rows),
    "faulty": len(faulty),
    "flagged": len(flagged),
    "recall": wilson(sum(r["flagged"] for r in faulty), len(faulty)),
    "precision": wilson(sum(r["faulty"] for r in flagged), len(flagged)),
    "false_alarm_healthy": far("healthy"),
    "false_alarm_stress": far("stress"),
    "flagged_harmless_injected": far("fault"),
    "top1": wilson(sum(r["top1"] for r in injected_faulty), len(injected_faulty)),
    "top3": wilson(sum(r["top3"] for r in injected_faulty), len(injected_faulty)),
    "precision_by_confidence": by_conf,
    "high_confidence_only": high_only,
    "detection_prefix_counts": prefixes,
    "detection_prefix_median": (
      statistics.median(r["detection_prefix"] for r in found) if found else None
    ),
  }


def _difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
  """``b − a`` of each rate (None where either is undefined)."""
  out = {}
  for key in RATES:
    ra, rb = a[key]["rate"], b[key]["rate"]
    out[key] = None if ra is None or rb is None else rb - ra
  return out


def all_scores(rows: list[dict[str, Any]], families: list[str]) -> dict[str, Any]:
  """:func:`scores` overall, per half of the tasks (with the held-out − calibration
  difference of every rate), per task, per fault family (its runs only; also per half)
  and per family and severity."""
  fam: dict[str, Any] = {}
  for family in families:
    sub = [r for r in rows if r["pool"] == "fault" and r["family"] == family]
    if not sub:
      continue
    fam[family] = scores(sub)
    fam[family]["per_half"] = {
      h: scores([r for r in sub if r["half"] == h]) for h in HALVES if any(
        r["half"] == h for r in sub)
    }  # fmt: skip
    for sev in sorted({r["severity"] for r in sub}):
      fam[family][f"severity_{sev}"] = {
        "runs": sum(r["severity"] == sev for r in sub),
        "faulty": sum(r["faulty"] for r in sub if r["severity"] == sev),
        "flagged": sum(r["flagged"] for r in sub if r["severity"] == sev),
      }
  halves = {h: scores([r for r in rows if r["half"] == h]) for h in HALVES}
  out = {
    "overall": scores(rows),
    "per_half": halves,
    "per_task": {t: scores([r for r in rows if r["task"] == t]) for t in dict.fromkeys(
      r["task"] for r in rows)},
    "per_family": fam,
  }  # fmt: skip
  if all(halves[h]["runs"] for h in HALVES):
    out["half_difference"] = _difference(halves["calibration"], halves["held_out"])
  return out


# --------------------------------------------------------------------------- reruns


def remedy_scores(reruns: list[dict[str, Any]]) -> dict[str, Any]:
  """Fix rates of the advice reruns. Each entry: ``family``, ``half``, ``top_action``
  (None: no automatic remedy), ``top_fixed`` (after the whole advice chain; None when not
  rerun), ``other_action``, ``other_fixed``, and optionally ``top_fixed_first`` /
  ``other_fixed_first`` (after the chain's first run; default: the chain's outcome).

  ``top``: fixed / reruns with an automatic remedy; ``top_all``: fixed / all flagged faulty
  runs (no remedy counts as not fixed); ``other``: the random other advice, over the same
  runs as ``top``; ``paired``: ``b`` (top fixed, other not), ``c`` (other fixed, top not)
  and the exact McNemar p-value of ``b`` vs ``c``; ``top_first`` / ``other_first``: the
  rates of ``top`` / ``other`` after the first run of each chain.
  """

  def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in rs if r["top_fixed"] is not None]
    b = sum(r["top_fixed"] and not r["other_fixed"] for r in done)
    c = sum(r["other_fixed"] and not r["top_fixed"] for r in done)
    return {
      "runs": len(rs),
      "no_remedy": len(rs) - len(done),
      "top": wilson(sum(r["top_fixed"] for r in done), len(done)),
      "top_all": wilson(sum(r["top_fixed"] for r in done), len(rs)),
      "other": wilson(sum(r["other_fixed"] for r in done), len(done)),
      "paired": {"b": b, "c": c, "p": mcnemar_p(b, c)},
      "top_first": wilson(sum(r.get("top_fixed_first", r["top_fixed"]) for r in done), len(done)),
      "other_first": wilson(
        sum(r.get("other_fixed_first", r["other_fixed"]) for r in done), len(done)
      ),
    }

  out = {"overall": block(reruns)}
  out["per_half"] = {h: block([r for r in reruns if r["half"] == h]) for h in HALVES}
  out["per_family"] = {
    f: block([r for r in reruns if r["family"] == f]) for f in dict.fromkeys(
      r["family"] for r in reruns)
  }  # fmt: skip
  actions: dict[str, list[dict[str, Any]]] = {}
  for r in reruns:
    actions.setdefault(str(r["top_action"]), []).append(r)
  out["per_top_action"] = {a: block(rs) for a, rs in actions.items()}
  return out


def divergence_scores(stops: list[dict[str, Any]]) -> dict[str, Any]:
  """Of the diverging runs rerun with ``stop_on="divergence"``: how many were stopped
  before a non-finite loss was recorded. Each entry: ``half``, ``explosion`` (the original
  log had a loss above the divergence factor before any non-finite loss), ``stopped``
  (the rerun was stopped), ``nan_recorded`` (the rerun's log has a non-finite loss).

  ``trend``: the runs whose loss exploded first (a trend to read); ``sudden``: those whose
  first abnormal loss was already non-finite; ``all``: both.
  """

  def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rs if r["stopped"] and not r["nan_recorded"]]
    return {
      "stopped_before_nan": wilson(len(ok), len(rs)),
      "stopped": sum(bool(r["stopped"]) for r in rs),
    }

  out = {}
  for name, sel in (("trend", True), ("sudden", False), ("all", None)):
    rs = [r for r in stops if sel is None or r["explosion"] == sel]
    out[name] = block(rs)
    out[name]["per_half"] = {h: block([r for r in rs if r["half"] == h]) for h in HALVES}
  return out
