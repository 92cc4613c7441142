"""A fault benchmark for :func:`jaxscope.diagnose.diagnose` (issue 21, part 1).

Short real runs on four offline tasks (:mod:`benchmarks.diagnose.tasks`: digits and two
moons for calibration, MNIST-1D and sine regression held out), each either healthy or
broken on purpose in one way (the 17 fault families of :data:`~benchmarks.diagnose.grid.FAULTS`
at two severities; data and model faults come from :mod:`benchmarks.diagnose.faults`,
named ``module:attribute`` in the config), each with several seeds. Every run goes
through :func:`jaxscope.train.train` with the ``economy`` metrics.

1. **Ground truth first, from outcomes only.** A run is *faulty* when its final test loss
   is above its task's healthy pool's mean by more than ``max(3 std, margin)``, or (for
   classification) its final test accuracy below the mean by more than ``max(3 std,
   margin)``, or either is not finite. Whether a fault was injected does not enter.
2. **Then the diagnosis**, with default thresholds, of every run directory. A run is
   *flagged* when a ``warning`` or ``critical`` finding is reported.
3. **Scores** (:mod:`benchmarks.diagnose.score`): recall, precision, false alarms of the
   healthy standard and stress pools, with Wilson 95 % intervals, overall, per half of the
   tasks (and their difference), per task and per family; top-1 / top-3 cause; precision
   per confidence; the detection prefix (25/50/75/100 % of the log).
4. ``--remedies``, a stage of its own (after the grid, or after ``--rediagnose``): each
   flagged faulty run (seeds ``< --rerun-seeds``) is run again with the remedy of its
   first alarm and with a random other remedy (:mod:`benchmarks.diagnose.remedy`); and each
   run whose loss diverged is run again with ``stop_on="divergence"`` and the live
   monitor, to count the runs stopped before a non-finite loss is recorded.

Run it with::

    python benchmarks/diagnose/run.py                 # the documented grid
    python benchmarks/diagnose/run.py --rediagnose    # the stored runs, current rules
    python benchmarks/diagnose/run.py --remedies      # the advice and stop-on reruns
    python benchmarks/diagnose/run.py --quick         # smoke test (then --quick --remedies)

It writes ``OUT/diagnose.json`` (``--out``, default ``benchmarks/results``) and, unless
``--quick`` or ``--no-doc``, the generated section of ``docs/diagnose.md``. Run
directories go to ``--runs`` (default ``runs/diagnose_benchmark``, with ``--quick``
``OUT/runs``); the JSON names them relative to the checkout (or to ``OUT``).
"""

from __future__ import annotations

import os
import sys

# Compilation dominates runs this short: XLA:CPU without LLVM optimisation and with its
# classic fusion emitters compiles two to three times as fast. Set before JAX is imported;
# the worker processes inherit the environment.
if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  ).strip()
  # The runs of one model and batch shape compile the same programs: the persistent
  # compilation cache (shared by the workers) saves a part of each compilation.
  _cache = os.path.join(os.path.dirname(__file__), "..", "..", "runs", "xla_cache_diagnose")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_cache))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import argparse
import concurrent.futures
import json
import multiprocessing
import platform
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks.diagnose import report  # noqa: E402
from benchmarks.diagnose.grid import (  # noqa: E402
  ACCEPTABLE,
  BASE,
  CLASS_ONLY,
  DATA,
  FAULTS,
  MODEL,
  grid,
  make_jobs,
  records,
  stress,
  train_one,
)  # fmt: skip
from benchmarks.diagnose.remedy import (  # noqa: E402
  ACTIONS,
  NOT_AUTOMATIC,
  REMEDY,
  ROUNDS,
  first_alarm,
  other_action,
  remedy_of,
  train_remedy,
)  # fmt: skip
from benchmarks.diagnose.score import (  # noqa: E402
  ALARM,
  N_STD,
  PREFIXES,
  all_scores,
  divergence_scores,
  label,
  reference,
  remedy_scores,
)  # fmt: skip
from benchmarks.diagnose.tasks import TASKS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- diagnosis


def diagnose_row(row: dict[str, Any], base: Path = ROOT) -> None:
  """Adds the findings of the whole run and the detection prefix to ``row``."""
  from jaxscope.diagnose import diagnose
  from jaxscope.record import History

  run_dir = base / row["run_dir"]
  full = History.load(run_dir)
  findings = diagnose(full)
  alarms = [f for f in findings if f.severity in ALARM]
  row["findings"] = [
    {"name": f.name, "severity": f.severity, "confidence": getattr(f, "confidence", None)}
    for f in findings
  ]
  row["alarm_names"] = [f.name for f in alarms]
  row["flagged"] = bool(alarms)
  ok = set(ACCEPTABLE.get(row["family"], ()))
  row["top1"] = bool(alarms) and alarms[0].name in ok
  row["top3"] = any(f.name in ok for f in alarms[:3])
  row["right_finding"] = any(f.name in ok for f in alarms)
  row["detection_prefix"] = None
  row["detection_step"] = None
  if row["right_finding"]:
    recs = records(run_dir)
    for frac in PREFIXES:
      cut = frac * row["steps"]
      if frac < 1.0:
        h = History([r for r in recs if r[0] <= cut], config=full.config)
        names = {f.name for f in diagnose(h) if f.severity in ALARM}
      else:
        names = set(row["alarm_names"])
      if names & ok:
        row["detection_prefix"] = frac
        row["detection_step"] = int(cut)
        break


def judge(rows: list[dict[str, Any]], base: Path) -> dict[str, Any]:
  """Ground truth (from outcomes only, before any diagnosis), then the diagnosis of every
  row; returns the per-task reference."""
  ref = reference(rows)
  for r in rows:
    r["faulty"] = label(r, ref[r["task"]])
  for r in rows:
    diagnose_row(r, base)
  return ref


# --------------------------------------------------------------------------- training


def run_jobs(
  jobs: list[dict[str, Any]], n_jobs: int, fn: Callable[[dict[str, Any]], dict[str, Any]]
) -> list[dict[str, Any]]:
  """``fn`` of every job in ``n_jobs`` spawned processes (longest first; ``n_jobs == 1``:
  in this process, one after the other); rows in job order."""
  if n_jobs == 1:
    return [_show(fn(job), i, len(jobs)) for i, job in enumerate(jobs, 1)]
  order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
  rows: list[Any] = [None] * len(jobs)
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=ctx) as pool:
    futures = {pool.submit(fn, jobs[i]): i for i in order}
    for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
      rows[futures[fut]] = _show(fut.result(), done, len(jobs))
  return rows


def _show(row: dict[str, Any], done: int, total: int) -> dict[str, Any]:
  loss, acc = row["test_loss"], row["test_accuracy"]
  print(f"  [{done}/{total}] {row['id']:52s} loss {loss}  acc {acc}", flush=True)
  return row


def _cost(job: dict[str, Any]) -> float:
  f = job["fields"]
  depth = len(f.get("model_args", {}).get("hidden_sizes", (0, 0)))
  return job["task_steps"] * f.get("steps_frac", 1.0) * (1 + 64 / f.get("batch_size", 64)) + (
    100 * depth
  )


def train_grid(args: argparse.Namespace, out: Path) -> dict[str, Any]:
  """The grid: train, judge, score (the JSON result)."""
  tasks = tuple(args.tasks.split(",")) if args.tasks else None
  seeds = args.seeds or (1 if args.quick else 5)
  held = args.held_out_seeds or seeds
  healthy = args.healthy_seeds or (2 if args.quick else 2 * seeds)
  n_seeds = {"calibration": seeds, "held_out": held, "healthy_calibration": healthy,
             "healthy_held_out": healthy}  # fmt: skip
  steps = {t: args.steps or (30 if args.quick else TASKS[t].steps) for t in TASKS}
  runs_dir = Path(args.runs) if args.runs else (
    out / "runs" if args.quick else ROOT / "runs" / "diagnose_benchmark"
  )  # fmt: skip
  jobs = make_jobs(grid(args.quick, tasks), n_seeds, runs_dir, steps)
  if runs_dir.exists() and not args.runs:
    shutil.rmtree(runs_dir)
  print(f"{len(jobs)} runs, {args.jobs} processes", flush=True)
  t0 = time.perf_counter()
  rows = run_jobs(jobs, args.jobs, train_one)
  train_wall = time.perf_counter() - t0
  base = _base(runs_dir, out)
  for r in rows:
    r["run_dir"] = str(Path(r["run_dir"]).relative_to(base))
  ref = judge(rows, base)
  families = list(FAULTS)
  return {
    "command": shlex.join(["python", "benchmarks/diagnose/run.py", *args.argv]),
    "date": time.strftime("%Y-%m-%d"),
    "quick": args.quick,
    "runs_base": "." if base == ROOT else "OUT",
    "grid": {
      "runs": len(rows), "seeds": n_seeds, "steps": {t: steps[t] for t in dict.fromkeys(
        r["task"] for r in rows)},
      "tasks": {t: {"half": TASKS[t].half, "description": TASKS[t].description,
                    "lr": TASKS[t].lr} for t in dict.fromkeys(r["task"] for r in rows)},
      "base": {"model": MODEL, "dataset": DATA, **BASE, "metrics": "economy"},
      "faults": {f: [{"severity": s, "setting": t, "fields": fl} for s, t, fl in lv]
                 for f, lv in FAULTS.items()},
      "class_only": sorted(CLASS_ONLY),
      "stress": {k: {"setting": t, "fields": fl} for k, (t, fl) in stress(
        TASKS["digits"]).items()},
      "prefixes": list(PREFIXES),
    },
    "ground_truth": {
      "rule": "faulty when the final test loss > the task's healthy mean + max(3 std, "
      "loss margin), or (classification) the final test accuracy < healthy mean - max(3 "
      "std, accuracy margin), or either is not finite; decided before diagnosing, from "
      "outcomes only",
      "n_std": N_STD,
      "margins": {t: {"loss": TASKS[t].loss_margin, "accuracy": TASKS[t].acc_margin}
                  for t in TASKS},
    },
    "flagged_rule": "a finding of severity critical or warning (default thresholds)",
    "acceptable": {k: list(v) for k, v in ACCEPTABLE.items()},
    "reference": ref,
    "metrics": all_scores(rows, families),
    "runs": rows,
    "jaxscope_commit": git_commit(),
    "rules_commit": rules_commit(),
    "wall_seconds": round(time.perf_counter() - t0, 1),
    "train_seconds": round(train_wall, 1),
    "environment": {
      "python": platform.python_version(), "platform": platform.platform(),
      "cpus": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "jobs": args.jobs,
    },
  }  # fmt: skip


def _base(runs_dir: Path, out: Path) -> Path:
  """What run directories are named relative to: the checkout, else ``OUT``."""
  runs_dir = runs_dir.resolve()
  return ROOT if runs_dir.is_relative_to(ROOT) else out.resolve()


def _result_base(result: dict[str, Any], out: Path) -> Path:
  return ROOT if result.get("runs_base", ".") == "." else out.resolve()


# --------------------------------------------------------------------------- stages


def rediagnose(args: argparse.Namespace, out: Path) -> dict[str, Any]:
  """``--rediagnose``: the runs of ``OUT/diagnose.json`` diagnosed again, nothing retrained."""
  old = json.loads((out / "diagnose.json").read_text(encoding="utf-8"))
  base = _result_base(old, out)
  keep = ("id", "task", "half", "pool", "family", "severity", "setting", "fields", "seed",
          "task_steps", "run_dir", "steps", "test_loss", "test_accuracy", "loss_events",
          "stopped", "train_seconds")  # fmt: skip
  rows = [{k: r[k] for k in keep} for r in old["runs"]]
  t0 = time.perf_counter()
  ref = judge(rows, base)
  result = {
    **old,
    "acceptable": {k: list(v) for k, v in ACCEPTABLE.items()},
    "reference": ref,
    "metrics": all_scores(rows, list(FAULTS)),
    "runs": rows,
    "rediagnosed": {"date": time.strftime("%Y-%m-%d %H:%M"),
                    "seconds": round(time.perf_counter() - t0, 1)},
    "jaxscope_commit": git_commit(),
    "rules_commit": rules_commit(),
  }  # fmt: skip
  if "remedies" in result:  # reruns chosen by older diagnoses: say how many changed
    tops = {r["id"]: (r["alarm_names"] or [None])[0] for r in rows}
    result["remedies"]["stale"] = sum(
      tops.get(r["id"]) != r["top_finding"] for r in result["remedies"]["runs"]
    )
  return result


def remedies(args: argparse.Namespace, out: Path) -> dict[str, Any]:
  """``--remedies``: the advice reruns and the divergence stops of ``OUT/diagnose.json``."""
  result = json.loads((out / "diagnose.json").read_text(encoding="utf-8"))
  base = _result_base(result, out)
  rerun_dir = Path(args.runs) if args.runs else base / Path(result["runs"][0]["run_dir"]).parents[1]
  rerun_dir = rerun_dir / "reruns"
  if rerun_dir.exists():
    shutil.rmtree(rerun_dir)
  seeds = args.rerun_seeds
  rows = [r for r in result["runs"] if r["seed"] < seeds]
  t0 = time.perf_counter()
  jobs, plan = [], []
  for r in rows:
    if not (r["flagged"] and r["faulty"]):
      continue
    top, values = first_alarm(str(base / r["run_dir"]))
    if top != r["alarm_names"][0]:  # the stored diagnosis is of other rules
      raise SystemExit(f"--remedies: {r['id']}'s stored first alarm {r['alarm_names'][0]} is "
                       f"not its diagnosis now ({top}); run --rediagnose first.")  # fmt: skip
    action = remedy_of(top, values)
    entry = {"id": r["id"], "task": r["task"], "half": r["half"], "family": r["family"],
             "top_finding": top, "top_action": action, "top_fixed": None,
             "other_action": None, "other_fixed": None}  # fmt: skip
    if action is not None:
      entry["other_action"] = other_action(r["id"], action, TASKS[r["task"]].classification)
      for which in ("top", "other"):
        act = entry[f"{which}_action"]
        job = _job(r, rerun_dir / f"{r['id']}-{which}")
        job["chain"] = (which, act, values if which == "top" else {}, args.rounds)
        job["overrides"] = {"stop_on": "divergence"}
        jobs.append({**job, "id": f"{r['id']}:{which}"})
    plan.append(entry)
  stops = [r for r in rows if any(v is not None for v in r["loss_events"].values())]
  overrides = {"stop_on": "divergence", "live_diagnosis": True}
  for r in stops:
    jobs.append({**_job(r, rerun_dir / f"{r['id']}-stop"), "id": f"{r['id']}:stop",
                 "overrides": overrides})  # fmt: skip
  print(f"{len(jobs)} reruns, {args.jobs} processes", flush=True)
  done = {j["id"]: row for j, row in zip(jobs, run_jobs(jobs, args.jobs, _rerun), strict=True)}
  ref = result["reference"]
  for e in plan:
    for which in ("top", "other"):
      rerun = done.get(f"{e['id']}:{which}")
      if rerun is not None:
        rounds = [_round(k, ref[e["task"]]) for k in rerun["rounds"]]
        e[f"{which}_fixed"] = rounds[-1]["fixed"]
        e[f"{which}_fixed_first"] = rounds[0]["fixed"]
        e[f"{which}_rounds"] = rounds
  stop_rows = []
  for r in stops:
    rerun = done[f"{r['id']}:stop"]
    ev = r["loss_events"]
    stop_rows.append({
      "id": r["id"], "task": r["task"], "half": r["half"], "family": r["family"],
      "explosion": ev["first_explosion_step"] is not None and (
        ev["first_nonfinite_step"] is None
        or ev["first_explosion_step"] < ev["first_nonfinite_step"]),
      "first_nonfinite_step": ev["first_nonfinite_step"],
      "first_explosion_step": ev["first_explosion_step"],
      "stopped": rerun["stopped"], "stopped_at": rerun["steps"],
      "nan_recorded": rerun["loss_events"]["first_nonfinite_step"] is not None,
    })  # fmt: skip
  result["remedies"] = {
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "rerun_seeds": seeds,
    "rules_commit": result.get("rules_commit"),
    "stale": 0,
    "table": REMEDY,
    "actions": {a: d for a, (d, _) in ACTIONS.items()},
    "rounds": args.rounds,
    "not_automatic": NOT_AUTOMATIC,
    "runs": plan,
    "scores": remedy_scores(plan),
    "seconds": round(time.perf_counter() - t0, 1),
  }
  result["divergence_stop"] = {"runs": stop_rows, "scores": divergence_scores(stop_rows)}
  return result


def _round(k: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
  row = k["row"]
  return {"action": k["action"], "outcome": [row["test_loss"], row["test_accuracy"]],
          "stopped": row["stopped"], "fixed": not label(row, ref)}  # fmt: skip


def _rerun(job: dict[str, Any]) -> dict[str, Any]:
  """A rerun (in a worker process): an advice chain, or one plain run (the stop reruns)."""
  return train_remedy(job, train_one) if "chain" in job else train_one(job)


def _job(row: dict[str, Any], run_dir: Path) -> dict[str, Any]:
  keep = ("id", "task", "half", "pool", "family", "severity", "setting", "fields", "seed",
          "task_steps")  # fmt: skip
  return {**{k: row[k] for k in keep}, "run_dir": str(run_dir)}


def git_commit() -> str | None:
  """``git describe --always --dirty`` of the checkout, or None."""
  return _git("describe", "--always", "--dirty")


def rules_commit() -> str | None:
  """The last commit of ``jaxscope/diagnose`` (the rules' version; ``+uncommitted`` when
  the checkout's rules differ from it), or None."""
  commit = _git("log", "-1", "--format=%h", "--", "jaxscope/diagnose")
  if commit and _git("status", "--porcelain", "--", "jaxscope/diagnose"):
    commit += "+uncommitted"
  return commit


def _git(*argv: str) -> str | None:
  try:
    return subprocess.run(
      ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True,
    ).stdout.strip() or None  # fmt: skip
  except (OSError, subprocess.SubprocessError):
    return None


def write(result: dict[str, Any], out: Path, *, doc: bool) -> None:
  """Writes ``OUT/diagnose.json``, prints the section and (``doc``) rewrites the doc."""
  out.mkdir(parents=True, exist_ok=True)
  path = out / "diagnose.json"
  path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
  section = report.markdown(result)
  print(section)
  print(f"wrote {path}")
  if doc and not result["quick"]:
    report.write_doc(section)
    print(f"wrote {report.DOC}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark's stage and returns the JSON result (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="smoke test: 2 tasks, 2 faults, 30 steps")
  p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
  p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 5; quick 1)")
  p.add_argument("--held-out-seeds", type=int, default=None, help="on held-out tasks (--seeds)")
  p.add_argument("--healthy-seeds", type=int, default=None, help="default 2 x seeds (quick 2)")
  p.add_argument("--steps", type=int, default=None, help="steps per run (per task; quick 30)")
  p.add_argument("--out", default=None, help="directory of diagnose.json (benchmarks/results)")
  p.add_argument("--runs", default=None, help="directory of the run directories")
  p.add_argument("--jobs", type=int, default=2, help="training processes (default 2)")
  p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/diagnose.md")
  p.add_argument(
    "--rediagnose",
    action="store_true",
    help="no training: diagnose the runs of OUT/diagnose.json again",
  )
  p.add_argument(
    "--remedies",
    action="store_true",
    help="the advice and stop-on reruns of the runs of OUT/diagnose.json",
  )
  p.add_argument("--rerun-seeds", type=int, default=2,
                 help="--remedies: rerun the runs of seeds below this (default 2)")  # fmt: skip
  p.add_argument("--rounds", type=int, default=ROUNDS,
                 help=f"--remedies: most runs of one advice chain (default {ROUNDS})")  # fmt: skip
  args = p.parse_args(argv)
  args.argv = sys.argv[1:] if argv is None else argv
  if args.jobs < 1:
    p.error(f"--jobs must be >= 1, got {args.jobs}")
  if args.rounds < 1:
    p.error(f"--rounds must be >= 1, got {args.rounds}")
  out = Path(args.out) if args.out else RESULTS
  if args.rediagnose:
    result = rediagnose(args, out)
  elif args.remedies:
    result = remedies(args, out)
  else:
    result = train_grid(args, out)
  write(result, out, doc=not args.no_doc)
  return result


if __name__ == "__main__":
  main()
