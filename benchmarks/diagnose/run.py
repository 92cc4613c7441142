"""A fault benchmark for :func:`jaxscope.diagnose.diagnose` (issue 21, part 1).

Short real runs on the embedded digits (MLP 64 → 128 → 64 → 10, SGD with momentum 0.9 at
lr 0.05, batch 64), each either healthy or broken on purpose in one way (the faults of
:data:`FAULTS`, at one or two severities; data and model faults come from
:mod:`benchmarks.diagnose.faults`, named ``module:attribute`` in the config), each with
several seeds. Every run goes through :func:`jaxscope.train.train` with the ``economy``
metrics and ``live_diagnosis=False``.

1. **Ground truth first, from outcomes only.** A run is *faulty* when its final test loss
   is above the healthy pool's mean by more than ``max(3 std, 0.15)``, or its final test
   accuracy below the mean by more than ``max(3 std, 0.03)``, or either is not finite.
   Whether a fault was injected does not enter: an injected fault that does no harm is
   labelled healthy (and reported apart).
2. **Then the diagnosis**, with default thresholds, of every run directory. A run is
   *flagged* when a ``warning`` or ``critical`` finding is reported (``info`` is not an
   alarm).
3. **Scores**: recall (flagged faulty / faulty), precision (flagged faulty / flagged), the
   false-alarm rate of the healthy standard pool and of the healthy stress pool apart, each
   with a Wilson 95 % interval, overall and per fault family; top-1 / top-3 accuracy of
   the named cause (the first one / three findings against :data:`ACCEPTABLE`); and the
   detection step, the earliest prefix of the log (25/50/75/100 % of the steps) whose
   diagnosis already contains an acceptable finding.

Run it with::

    python benchmarks/diagnose/run.py                 # the documented grid
    python benchmarks/diagnose/run.py --quick         # smoke test: 1 seed, 3 faults

It writes ``OUT/diagnose.json`` (``--out``, default ``benchmarks/results``) and, unless
``--quick``, the generated section of ``docs/diagnose.md``. Run directories go to
``--runs`` (default ``runs/diagnose_benchmark``, with ``--quick`` ``OUT/runs``).
"""

from __future__ import annotations

import os
import sys

# Compilation dominates runs this short: XLA:CPU without LLVM optimisation and with its
# classic fusion emitters compiles two to three times as fast. Set before JAX is imported
# (also in the worker processes, which import this module afresh).
if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  ).strip()

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import platform
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

DATA = "benchmarks.diagnose.faults:load_faulty_digits"
MODEL = "benchmarks.diagnose.faults:faulty_mlp"
BASE: dict[str, Any] = {"batch_size": 64, "optimizer": "momentum", "lr": 0.05}
PREFIXES = (0.25, 0.5, 0.75, 1.0)
LOSS_MARGIN = 0.15
ACC_MARGIN = 0.03
N_STD = 3.0
ALARM = ("critical", "warning")
DOC = ROOT / "docs" / "diagnose.md"
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One setting of the grid: a fault at one severity, or a healthy setting."""

  pool: str
  """``"fault"``, ``"healthy"`` (standard settings) or ``"stress"`` (healthy, unusual)."""
  family: str
  severity: int
  """1 (mild) or 2 (severe); 0 for the healthy pools."""
  setting: str
  fields: dict[str, Any]
  """TrainConfig fields over :data:`BASE` (``steps`` as a fraction of the run: ``steps_frac``)."""


#: The fault families: ``family -> [(severity, setting, fields), ...]``.
FAULTS: dict[str, list[tuple[int, str, dict[str, Any]]]] = {
  "lr_too_high": [
    (1, "lr 1", {"lr": 1.0}),
    (2, "lr 10", {"lr": 10.0}),
  ],
  "lr_too_low": [
    (1, "lr 1e-3", {"lr": 1e-3}),
    (2, "lr 1e-4", {"lr": 1e-4}),
  ],
  "nan_data": [
    (1, "1 training example with a NaN pixel", {"data_args": {"nan_fraction": 1e-4}}),
    (2, "2 % of training examples with a NaN pixel", {"data_args": {"nan_fraction": 0.02}}),
  ],
  "label_noise": [
    (1, "50 % of training labels random", {"data_args": {"label_noise": 0.5}}),
    (2, "80 % of training labels random", {"data_args": {"label_noise": 0.8}}),
  ],
  "class_imbalance": [
    (1, "classes 5-9 keep 10 % of their examples", {"data_args": {"minority_keep": 0.1}}),
    (2, "classes 5-9 keep 2 %", {"data_args": {"minority_keep": 0.02}}),
  ],
  "unnormalised_inputs": [
    (1, "inputs x 16 (sklearn's 0-16 scale)", {"data_args": {"input_scale": 16.0}}),
    (2, "inputs x 255 (raw pixels)", {"data_args": {"input_scale": 255.0}}),
  ],
  "bad_init_scale": [
    (1, "kernel init x 5", {"model_args": {"kernel_scale": 5.0}}),
    (2, "kernel init x 20", {"model_args": {"kernel_scale": 20.0}}),
  ],
  "too_few_steps": [
    (1, "1/4 of the steps", {"steps_frac": 0.25}),
    (2, "1/12 of the steps", {"steps_frac": 1 / 12}),
  ],
  "dead_relu": [
    (1, "hidden biases -1", {"model_args": {"hidden_bias": -1.0}}),
    (2, "hidden biases -3", {"model_args": {"hidden_bias": -3.0}}),
  ],
  "frozen_layers": [
    (1, "fc1 gets no gradient", {"model_args": {"frozen": 1}}),
    (2, "fc1 and fc2 get no gradient", {"model_args": {"frozen": 2}}),
  ],
  "softmax_twice": [
    (2, "softmax output, log-softmax again in the loss", {"model_args": {"softmax_output": True}}),
  ],
  "small_batch_high_lr": [
    (1, "batch 8, lr 0.5", {"batch_size": 8, "lr": 0.5}),
    (2, "batch 2, lr 1", {"batch_size": 2, "lr": 1.0}),
  ],
}  # fmt: skip

#: What names the cause: ``family -> finding names`` that count as the right diagnosis.
ACCEPTABLE: dict[str, tuple[str, ...]] = {
  "lr_too_high": (
    "divergence", "instability", "oscillation", "exploding_gradients", "update_ratio_high",
    "lr_above_curvature_limit",
  ),
  "lr_too_low": (
    "early_plateau", "late_plateau", "update_ratio_low", "stalled_layers", "too_few_steps",
  ),
  "nan_data": ("nonfinite_data", "divergence"),
  "label_noise": ("late_plateau", "overfitting"),
  "class_imbalance": ("class_imbalance",),
  "unnormalised_inputs": (
    "unnormalised_inputs", "divergence", "instability", "oscillation", "exploding_gradients",
    "update_ratio_high", "lr_above_curvature_limit",
  ),
  "bad_init_scale": (
    "exploding_gradients", "vanishing_gradients", "dead_units", "saturation", "divergence",
    "instability", "update_ratio_high", "update_ratio_low",
  ),
  "too_few_steps": ("too_few_steps", "late_plateau"),
  "dead_relu": (
    "dead_units", "stalled_layers", "vanishing_gradients", "update_ratio_low", "early_plateau",
  ),
  "frozen_layers": ("stalled_layers", "update_ratio_low", "vanishing_gradients"),
  "softmax_twice": (
    "loss_output_mismatch", "early_plateau", "late_plateau", "update_ratio_low",
    "vanishing_gradients", "saturation", "too_few_steps",
  ),
  "small_batch_high_lr": (
    "instability", "oscillation", "divergence", "update_ratio_high", "lr_above_curvature_limit",
    "exploding_gradients",
  ),
}  # fmt: skip

#: The healthy stress pool: unusual but sound settings.
STRESS: dict[str, tuple[str, dict[str, Any]]] = {
  "full_batch": ("full batch (1438), momentum lr 0.05", {"batch_size": 1438}),
  "small_batch_small_lr": ("batch 8, momentum lr 0.005", {"batch_size": 8, "lr": 0.005}),
  "heavy_weight_decay": (
    "adamw lr 3e-3, weight decay 1.0",
    {"optimizer": "adamw", "lr": 3e-3, "optimizer_args": {"weight_decay": 1.0}},
  ),
}

QUICK_FAMILIES = ("lr_too_high", "nan_data", "dead_relu")


def grid(quick: bool) -> list[Variant]:
  """The variants of the grid (``quick``: severity 2 of :data:`QUICK_FAMILIES`, one stress)."""
  out = [Variant("healthy", "healthy", 0, "momentum lr 0.05, batch 64", {})]
  for name, (setting, fields) in STRESS.items():
    if not quick or name == "full_batch":
      out.append(Variant("stress", name, 0, setting, fields))
  for family, levels in FAULTS.items():
    if quick and family not in QUICK_FAMILIES:
      continue
    for severity, setting, fields in levels:
      if not quick or severity == max(s for s, _, _ in levels):
        out.append(Variant("fault", family, severity, setting, fields))
  return out


# --------------------------------------------------------------------------- training


def train_one(job: dict[str, Any]) -> dict[str, Any]:
  """Trains one run (in a worker process) and returns its row (outcome, no diagnosis)."""
  from jaxscope.run import TrainConfig
  from jaxscope.train import train

  fields = dict(job["fields"])
  steps = max(4, round(job["steps"] * fields.pop("steps_frac", 1.0)))
  data_args = {"seed": job["seed"], **fields.pop("data_args", {})}
  model_args = fields.pop("model_args", {})
  config = TrainConfig(
    model=MODEL,
    dataset=DATA,
    steps=steps,
    seed=job["seed"],
    metrics="economy",
    eval_every=max(1, steps // 10),
    checkpoint_every=0,
    live_diagnosis=False,
    out=job["run_dir"],
    quiet=True,
    overwrite=True,
    data_args=data_args,
    model_args=model_args,
    **{**BASE, **fields},
  )
  t0 = time.perf_counter()
  result = train(config)
  ev = result.final_eval
  return {
    **{k: job[k] for k in ("id", "pool", "family", "severity", "setting", "seed", "run_dir")},
    "steps": int(result.steps),
    "test_loss": _finite_or_none(ev.get("test/loss")),
    "test_accuracy": _finite_or_none(ev.get("test/accuracy")),
    "train_seconds": round(time.perf_counter() - t0, 2),
  }


def _finite_or_none(x: Any) -> float | None:
  return float(x) if x is not None and math.isfinite(float(x)) else None


# --------------------------------------------------------------------------- ground truth


def reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The healthy standard pool's outcome statistics and the faulty thresholds."""
  healthy = [r for r in rows if r["pool"] == "healthy"]
  out: dict[str, Any] = {"n": len(healthy)}
  for key, sign, margin in (("test_loss", 1, LOSS_MARGIN), ("test_accuracy", -1, ACC_MARGIN)):
    vals = [r[key] for r in healthy if r[key] is not None]
    mean = statistics.fmean(vals) if vals else math.nan
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    out[key] = {
      "mean": mean,
      "std": std,
      "threshold": mean + sign * max(N_STD * std, margin),
    }
  return out


def label(row: dict[str, Any], ref: dict[str, Any]) -> bool:
  """Whether a run's outcome is significantly worse than the healthy pool's (faulty)."""
  loss, acc = row["test_loss"], row["test_accuracy"]
  if loss is None or acc is None:
    return True
  return loss > ref["test_loss"]["threshold"] or acc < ref["test_accuracy"]["threshold"]


# --------------------------------------------------------------------------- diagnosis


def _records(run_dir: str) -> list[tuple[int, dict[str, Any]]]:
  from jaxscope.record.jsonio import loads

  out = []
  with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        obj = loads(line)
        out.append((int(obj["step"]), obj["values"]))
  return out


def diagnose_row(row: dict[str, Any]) -> None:
  """Adds the findings of the whole run and the detection prefix to ``row``."""
  from jaxscope.diagnose import diagnose
  from jaxscope.record import History

  full = History.load(row["run_dir"])
  findings = diagnose(full)
  alarms = [f for f in findings if f.severity in ALARM]
  row["findings"] = [{"name": f.name, "severity": f.severity} for f in findings]
  row["alarm_names"] = [f.name for f in alarms]
  row["flagged"] = bool(alarms)
  ok = set(ACCEPTABLE.get(row["family"], ()))
  row["top1"] = bool(alarms) and alarms[0].name in ok
  row["top3"] = any(f.name in ok for f in alarms[:3])
  row["right_finding"] = any(f.name in ok for f in alarms)
  row["detection_prefix"] = None
  row["detection_step"] = None
  if row["right_finding"]:
    records = _records(row["run_dir"])
    for frac in PREFIXES:
      cut = frac * row["steps"]
      if frac < 1.0:
        h = History([r for r in records if r[0] <= cut], config=full.config)
        names = {f.name for f in diagnose(h) if f.severity in ALARM}
      else:
        names = set(row["alarm_names"])
      if names & ok:
        row["detection_prefix"] = frac
        row["detection_step"] = int(cut)
        break


# --------------------------------------------------------------------------- scores


def wilson(k: int, n: int, z: float = 1.959964) -> dict[str, Any]:
  """``k / n`` with its Wilson score interval (``None`` values when ``n == 0``)."""
  if n == 0:
    return {"k": 0, "n": 0, "rate": None, "ci95": None}
  p = k / n
  d = 1 + z * z / n
  c = (p + z * z / (2 * n)) / d
  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return {"k": k, "n": n, "rate": p, "ci95": [max(0.0, c - h), min(1.0, c + h)]}


def scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Recall, precision, false-alarm rates, cause accuracy and detection prefixes of ``rows``."""
  faulty = [r for r in rows if r["faulty"]]
  flagged = [r for r in rows if r["flagged"]]
  injected_faulty = [r for r in faulty if r["pool"] == "fault"]
  found = [r for r in injected_faulty if r["detection_prefix"] is not None]
  prefixes = {str(p): sum(r["detection_prefix"] == p for r in found) for p in PREFIXES}

  def far(pool: str) -> dict[str, Any]:
    clean = [r for r in rows if r["pool"] == pool and not r["faulty"]]
    return wilson(sum(r["flagged"] for r in clean), len(clean))

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
    "detection_prefix_counts": prefixes,
    "detection_prefix_median": (
      statistics.median(r["detection_prefix"] for r in found) if found else None
    ),
  }


def all_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """:func:`scores` overall, per fault family (its runs only), and per family and severity."""
  fam: dict[str, Any] = {}
  for family in FAULTS:
    sub = [r for r in rows if r["pool"] == "fault" and r["family"] == family]
    if sub:
      fam[family] = scores(sub)
      for sev in sorted({r["severity"] for r in sub}):
        fam[family][f"severity_{sev}"] = {
          "runs": sum(r["severity"] == sev for r in sub),
          "faulty": sum(r["faulty"] for r in sub if r["severity"] == sev),
          "flagged": sum(r["flagged"] for r in sub if r["severity"] == sev),
        }
  return {"overall": scores(rows), "per_family": fam}


# --------------------------------------------------------------------------- report


def _pct(w: dict[str, Any]) -> str:
  if w["n"] == 0:
    return "–"
  lo, hi = w["ci95"]
  return f"{w['k']}/{w['n']} = {100 * w['rate']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"


def markdown(result: dict[str, Any]) -> str:
  """The generated section of ``docs/diagnose.md``."""
  o, g, ref = result["metrics"]["overall"], result["grid"], result["reference"]
  lines = [
    f"Generated by `{result['command']}` on {result['date']} ({g['runs']} runs: "
    f"{g['seeds']} seeds per fault setting and stress setting, {g['healthy_seeds']} healthy "
    f"runs, {g['steps']} steps per run; {result['wall_seconds'] / 60:.1f} min on "
    f"{result['environment']['cpus']} CPU cores){_rediagnosed(result)}. Rates are k/n = rate "
    "[Wilson 95 % interval].",
    "",
    f"Healthy reference (n = {ref['n']}): test loss {ref['test_loss']['mean']:.3f} ± "
    f"{ref['test_loss']['std']:.3f}, test accuracy {ref['test_accuracy']['mean']:.3f} ± "
    f"{ref['test_accuracy']['std']:.3f}. A run is faulty when its test loss exceeds "
    f"{ref['test_loss']['threshold']:.3f} or its test accuracy is below "
    f"{ref['test_accuracy']['threshold']:.3f} (mean ± max({N_STD:g} std, margin {LOSS_MARGIN} / "
    f"{ACC_MARGIN})), or either is not finite.",
    "",
    "### Overall",
    "",
    "| measure | value |",
    "|---|---|",
    f"| runs / faulty / flagged | {o['runs']} / {o['faulty']} / {o['flagged']} |",
    f"| recall (flagged faulty / faulty) | {_pct(o['recall'])} |",
    f"| precision (faulty / flagged) | {_pct(o['precision'])} |",
    f"| false alarms, healthy standard pool | {_pct(o['false_alarm_healthy'])} |",
    f"| false alarms, healthy stress pool | {_pct(o['false_alarm_stress'])} |",
    f"| flagged, fault injected but outcome healthy | {_pct(o['flagged_harmless_injected'])} |",
    f"| top-1 cause (faulty injected runs) | {_pct(o['top1'])} |",
    f"| top-3 cause | {_pct(o['top3'])} |",
    f"| detection prefix (25/50/75/100 %: runs) | {_prefixes(o)} |",
    "",
    "### Per fault family",
    "",
    "| family | runs | faulty | recall | precision | flagged harmless | top-1 | top-3 | "
    "detected at 25/50/75/100 % |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for fam, s in result["metrics"]["per_family"].items():
    lines.append(
      f"| {fam} | {s['runs']} | {s['faulty']} | {_pct(s['recall'])} | {_pct(s['precision'])} | "
      f"{_pct(s['flagged_harmless_injected'])} | {_pct(s['top1'])} | {_pct(s['top3'])} | "
      f"{_prefixes(s)} |"
    )
  lines += [
    "",
    "### Settings: outcome and findings",
    "",
    "| pool | family | severity | setting | faulty / runs | flagged / runs | mean test acc | "
    "findings (runs) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
  for r in result["runs"]:
    groups.setdefault((r["pool"], r["family"], r["severity"], r["setting"]), []).append(r)
  for (pool, fam, sev, setting), rs in groups.items():
    accs = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
    acc = f"{statistics.fmean(accs):.3f}" if accs else "NaN"
    counts: dict[str, int] = {}
    for r in rs:
      for n in dict.fromkeys(r["alarm_names"]):
        counts[n] = counts.get(n, 0) + 1
    names = ", ".join(f"{n} ({c})" for n, c in sorted(counts.items(), key=lambda t: -t[1])) or "–"
    lines.append(
      f"| {pool} | {fam} | {sev or '–'} | {setting} | {sum(r['faulty'] for r in rs)}/{len(rs)} | "
      f"{sum(r['flagged'] for r in rs)}/{len(rs)} | {acc} | {names} |"
    )
  return "\n".join(lines)


def _rediagnosed(result: dict[str, Any]) -> str:
  commit = f" (rules of {result['jaxscope_commit']})" if result.get("jaxscope_commit") else ""
  if "rediagnosed" in result:
    return f"; diagnosed again with `--rediagnose` on {result['rediagnosed']['date']}{commit}"
  return commit and f";{commit[1:-1]}"


def _prefixes(s: dict[str, Any]) -> str:
  c = s["detection_prefix_counts"]
  return "/".join(str(c[str(p)]) for p in PREFIXES)


def write_doc(section: str, path: Path = DOC) -> None:
  """Replaces the text between the markers of ``path`` with ``section``."""
  text = path.read_text(encoding="utf-8")
  head, sep, rest = text.partition(BEGIN)
  _, sep2, tail = rest.partition(END)
  if not sep or not sep2:
    raise SystemExit(f"{path}: markers {BEGIN} / {END} not found")
  path.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}", encoding="utf-8")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark and returns the JSON result (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="1 seed, 3 fault types, few steps")
  p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 5; quick 1)")
  p.add_argument("--healthy-seeds", type=int, default=None, help="default 2 x seeds (quick 2)")
  p.add_argument("--steps", type=int, default=None, help="steps per run (default 150; quick 30)")
  p.add_argument("--out", default=None, help="directory of diagnose.json (benchmarks/results)")
  p.add_argument("--runs", default=None, help="directory of the run directories")
  p.add_argument("--jobs", type=int, default=2, help="training processes (default 2)")
  p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/diagnose.md")
  p.add_argument(
    "--rediagnose",
    action="store_true",
    help="no training: diagnose the runs of OUT/diagnose.json again with the current rules "
    "(outcomes and ground truth unchanged)",
  )
  args = p.parse_args(argv)
  if args.rediagnose:
    return rediagnose(args)
  seeds = args.seeds or (1 if args.quick else 5)
  healthy_seeds = args.healthy_seeds or (2 if args.quick else 2 * seeds)
  steps = args.steps or (30 if args.quick else 150)
  out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
  runs_dir = Path(args.runs) if args.runs else (
    out / "runs" if args.quick else ROOT / "runs" / "diagnose_benchmark"
  )  # fmt: skip
  t0 = time.perf_counter()

  jobs = []
  for v in grid(args.quick):
    n = healthy_seeds if v.pool == "healthy" else seeds
    for seed in range(n):
      name = f"{v.family}-s{v.severity}-seed{seed}"
      jobs.append({
        "id": name, "pool": v.pool, "family": v.family, "severity": v.severity,
        "setting": v.setting, "fields": v.fields, "seed": seed, "steps": steps,
        "run_dir": str(runs_dir / name),
      })  # fmt: skip
  if runs_dir.exists() and not args.runs:
    shutil.rmtree(runs_dir)
  print(f"{len(jobs)} runs, {args.jobs} processes", flush=True)
  rows: list[dict[str, Any]] = []
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
    for row in pool.map(train_one, jobs):
      rows.append(row)
      print(f"  {row['id']:40s} loss {row['test_loss']}  acc {row['test_accuracy']}", flush=True)
  train_wall = time.perf_counter() - t0
  result = finish(rows, t0, train_wall, args, argv, seeds, healthy_seeds, steps)
  write(result, out, quick=args.quick, doc=not args.quick and not args.no_doc)
  return result


_OUTCOME = (
  "id", "pool", "family", "severity", "setting", "seed", "run_dir", "steps", "test_loss",
  "test_accuracy", "train_seconds",
)  # fmt: skip


def rediagnose(args: argparse.Namespace) -> dict[str, Any]:
  """``--rediagnose``: the runs of ``OUT/diagnose.json`` diagnosed again, nothing retrained."""
  out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
  old = json.loads((out / "diagnose.json").read_text(encoding="utf-8"))
  rows = []
  for r in old["runs"]:
    row = {k: r[k] for k in _OUTCOME}
    if not Path(row["run_dir"]).is_absolute():
      row["run_dir"] = str(ROOT / row["run_dir"])
    rows.append(row)
  t0 = time.perf_counter()
  ref = reference(rows)
  for r in rows:
    r["faulty"] = label(r, ref)
    diagnose_row(r)
  _relative(rows)
  result = {
    **old,
    "acceptable": {k: list(v) for k, v in ACCEPTABLE.items()},
    "reference": ref,
    "metrics": all_scores(rows),
    "runs": rows,
    "rediagnosed": {
      "date": time.strftime("%Y-%m-%d %H:%M"),
      "seconds": round(time.perf_counter() - t0, 1),
    },
    "jaxscope_commit": git_commit(),
  }
  write(result, out, quick=old["quick"], doc=not old["quick"] and not args.no_doc)
  return result


def git_commit() -> str | None:
  """``git describe --always --dirty`` of the checkout (the rules' version), or None."""
  try:
    return subprocess.run(
      ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
      timeout=10, check=True,
    ).stdout.strip()  # fmt: skip
  except (OSError, subprocess.SubprocessError):
    return None


def _relative(rows: list[dict[str, Any]]) -> None:
  for r in rows:  # run directories in the checkout are shown relative to it
    if Path(r["run_dir"]).is_relative_to(ROOT):
      r["run_dir"] = str(Path(r["run_dir"]).relative_to(ROOT))


def write(result: dict[str, Any], out: Path, *, quick: bool, doc: bool) -> None:
  """Writes ``OUT/diagnose.json``, prints the section and (``doc``) rewrites the doc."""
  out.mkdir(parents=True, exist_ok=True)
  path = out / "diagnose.json"
  path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
  section = markdown(result)
  print(section)
  print(f"wrote {path} ({result['wall_seconds']:.0f} s)")
  if doc and not quick:
    write_doc(section)
    print(f"wrote {DOC}")


def finish(
  rows: list[dict[str, Any]],
  t0: float,
  train_wall: float,
  args: argparse.Namespace,
  argv: list[str] | None,
  seeds: int,
  healthy_seeds: int,
  steps: int,
) -> dict[str, Any]:
  """Ground truth, diagnosis and scores of the trained ``rows``: the JSON result."""
  # 1. Ground truth, from outcomes only, before any diagnosis.
  ref = reference(rows)
  for r in rows:
    r["faulty"] = label(r, ref)
  # 2. Diagnosis.
  for r in rows:
    diagnose_row(r)
  wall = time.perf_counter() - t0
  _relative(rows)
  argv_shown = sys.argv[1:] if argv is None else argv
  result = {
    "command": shlex.join(["python", "benchmarks/diagnose/run.py", *argv_shown]),
    "date": time.strftime("%Y-%m-%d"),
    "quick": args.quick,
    "grid": {
      "runs": len(rows),
      "seeds": seeds,
      "seed_list": list(range(seeds)),
      "healthy_seeds": healthy_seeds,
      "steps": steps,
      "base": {"model": MODEL, "dataset": DATA, **BASE, "metrics": "economy"},
      "faults": {
        f: [{"severity": s, "setting": t, "fields": fl} for s, t, fl in lv]
        for f, lv in FAULTS.items()
      },
      "stress": {k: {"setting": t, "fields": fl} for k, (t, fl) in STRESS.items()},
      "prefixes": list(PREFIXES),
    },
    "ground_truth": {
      "rule": "faulty when the final test loss > healthy mean + max(3 std, 0.15), or the final "
      "test accuracy < healthy mean - max(3 std, 0.03), or either is not finite; decided "
      "before diagnosing, from outcomes only",
      "n_std": N_STD,
      "loss_margin": LOSS_MARGIN,
      "accuracy_margin": ACC_MARGIN,
    },
    "flagged_rule": "a finding of severity critical or warning (default thresholds)",
    "acceptable": {k: list(v) for k, v in ACCEPTABLE.items()},
    "reference": ref,
    "metrics": all_scores(rows),
    "runs": rows,
    "jaxscope_commit": git_commit(),
    "wall_seconds": round(wall, 1),
    "train_seconds": round(train_wall, 1),
    "environment": {
      "python": platform.python_version(),
      "platform": platform.platform(),
      "cpus": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jobs": args.jobs,
    },
  }
  return result


if __name__ == "__main__":
  main()
