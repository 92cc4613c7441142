"""What jaxscope's process-wide defaults (``jaxscope/xla.py``) do to time and memory.

Run from the repository root::

    .venv/bin/python benchmarks/xla_defaults.py               # ~45 min on 2 cores
    .venv/bin/python benchmarks/xla_defaults.py --rounds 1 --no-memory

The defaults are process-wide (a flag read when the CPU backend starts, a listener on
compilations), so the two settings cannot be interleaved in one process. Each setting
runs in fresh child processes instead, ``on`` (the defaults, as installed), ``trim``
(``JAXSCOPE_XLA_DEFAULTS=trim``: XLA's own scheduler, compiler memory released),
``off`` (``JAXSCOPE_XLA_DEFAULTS=0``) and ``emitters`` (the defaults with
``XLA_FLAGS=--xla_cpu_use_fusion_emitters=false``, XLA:CPU's older fusion emitters), in
turn for ``--rounds`` rounds (the order reversed every other round):

* **time**: one child per setting and round times, interleaved in that process, the
  mnist_mlp SGD step bare and with the scope presets ``economy`` and ``full``
  (``benchmarks/costs.py``'s steps), and the cifar10_3c3d step bare and with the
  instrument presets ``economy`` and ``business`` (``benchmarks/cockpit_presets.py``'s
  steps). Reported: each variant's median per setting (the median over the rounds of each
  child's median), and the ratios to ``off``.
* **memory**: the peak resident set size (``VmHWM``) of a fresh process running four steps
  of each cifar10_3c3d variant (``cockpit_presets.py --peak-rss``), and the XLA
  temporaries of the compiled step (``memory_analysis``), per setting.

Writes ``benchmarks/results/xla-defaults-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "xla-defaults-cpu.json"
SETTINGS = {
  "on": {},
  "trim": {"JAXSCOPE_XLA_DEFAULTS": "trim"},
  "off": {"JAXSCOPE_XLA_DEFAULTS": "0"},
  # The defaults plus XLA:CPU's older fusion emitters (README: halves the compilation's
  # memory; an option, not a default).
  "emitters": {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"},
}
MLP_VARIANTS = ("bare", "scope/economy", "scope/full")
CNN_VARIANTS = ("bare", "economy", "business")
MEMORY_VARIANTS = ("bare", "economy", "business", "full")


def _child_env(setting: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXSCOPE_XLA_DEFAULTS")}
  env.update(SETTINGS[setting])
  return env


def _run_child(args: list[str], setting: str) -> dict[str, Any]:
  out = subprocess.run(
    [sys.executable, __file__, *args],
    env=_child_env(setting),
    capture_output=True,
    text=True,
    check=True,
    cwd=_ROOT,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _time_child(mlp_reps: int, cnn_reps: int) -> None:
  """Child: interleaved medians (ms) of every timed variant, printed as JSON."""
  import numpy as np

  import jaxscope  # noqa: F401  (first: the defaults apply before a backend starts)
  from benchmarks import cockpit_presets, costs, problems
  from jaxscope import metrics

  out: dict[str, float] = {}
  mlp = problems.get("mnist_mlp")
  builders = {  # "scope/<preset>" measures that scope preset, "bare" none.
    v: lambda v=v: costs.scope_step(
      mlp, None if v == "bare" else metrics.scope(preset=v.removeprefix("scope/"))
    )
    for v in MLP_VARIANTS
  }
  times = costs.time_interleaved(mlp, builders, mlp_reps)
  out.update({f"mnist_mlp/{k}": float(np.median(v)) for k, v in times.items()})
  cnn = problems.get("cifar10_3c3d")
  cnn_times = cockpit_presets.time_variants(cnn, cnn_reps, variants=CNN_VARIANTS)
  out.update({f"cifar10_3c3d/{k}": float(np.median(v)) for k, v in cnn_times.items()})
  print(json.dumps(out))


def _temp_child(variant: str) -> None:
  """Child: the XLA temporaries (MB) of the compiled cifar10_3c3d step of ``variant``."""
  import jaxscope  # noqa: F401
  from benchmarks import cockpit_presets, problems
  from benchmarks.common import copy_tree

  cnn = problems.get("cifar10_3c3d")
  step, opt_state, istate = cockpit_presets.make_step(cnn, None if variant == "bare" else variant)
  compiled = step.lower(copy_tree(cnn.params), opt_state, istate, cnn.x, cnn.y).compile()
  print(json.dumps({"temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20}))


def _peak_rss(variant: str, setting: str) -> float:
  out = subprocess.run(
    [
      sys.executable,
      str(Path(__file__).with_name("cockpit_presets.py")),
      "--peak-rss",
      f"cifar10_3c3d:{variant}:4",
    ],
    env=_child_env(setting),
    capture_output=True,
    text=True,
    check=True,
    cwd=_ROOT,
  )
  return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def run(rounds: int, mlp_reps: int, cnn_reps: int, memory: bool) -> dict[str, Any]:
  """Runs the children; returns the JSON report."""
  from benchmarks.common import environment

  per_round: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
  for r in range(rounds):
    order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
    for setting in order:
      t0 = time.perf_counter()
      per_round[setting].append(_run_child(["--time-child", f"{mlp_reps}:{cnn_reps}"], setting))
      print(f"round {r} {setting}: {time.perf_counter() - t0:.0f} s", flush=True)
  keys = list(per_round["on"][0])
  median = {
    s: {k: float(statistics.median(x[k] for x in per_round[s])) for k in keys} for s in SETTINGS
  }
  report: dict[str, Any] = {
    "environment": environment(),
    "rounds": rounds,
    "mlp_reps": mlp_reps,
    "cnn_reps": cnn_reps,
    "step_ms": median,
    "step_ms_per_round": per_round,
    "ratio_to_off": {
      s: {k: median[s][k] / median["off"][k] for k in keys} for s in SETTINGS if s != "off"
    },
  }
  if memory:
    mem: dict[str, dict[str, dict[str, float]]] = {s: {} for s in SETTINGS}
    for setting in SETTINGS:
      for v in MEMORY_VARIANTS:
        temp = _run_child(["--temp-child", v], setting)["temp_mb"]
        mem[setting][v] = {"peak_rss_mb": _peak_rss(v, setting), "xla_temp_mb": temp}
        print(f"{setting} {v}: {mem[setting][v]}", flush=True)
    report["memory_cifar10_3c3d"] = mem
  return report


def format_table(report: dict[str, Any]) -> str:
  """The report as a plain-text table: ms per setting, then the ratios to ``off``."""
  names = list(SETTINGS)
  head = "".join(f"{n + ' ms':>11}" for n in names)
  ratios = [n for n in names if n != "off"]
  lines = [f"{'variant':26}{head}" + "".join(f"{n + '/off':>11}" for n in ratios)]
  for k in report["step_ms"]["off"]:
    ms = "".join(f"{report['step_ms'][n][k]:11.2f}" for n in names)
    rt = "".join(f"{report['ratio_to_off'][n][k]:11.3f}" for n in ratios)
    lines.append(f"{k:26}{ms}{rt}")
  mem = report.get("memory_cifar10_3c3d")
  if mem:
    lines.append("cifar10_3c3d, peak RSS / XLA temporaries (MB)")
    lines.append(f"{'variant':26}" + "".join(f"{n:>16}" for n in names))
    for v in MEMORY_VARIANTS:
      cells = "".join(
        f"{mem[n][v]['peak_rss_mb']:9.0f} / {mem[n][v]['xla_temp_mb']:4.0f}" for n in names
      )
      lines.append(f"{v:26}{cells}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=3, help="rounds of one child per setting.")
  ap.add_argument("--mlp-reps", type=int, default=100, help="mnist_mlp repetitions per child.")
  ap.add_argument("--cnn-reps", type=int, default=6, help="cifar10_3c3d repetitions per child.")
  ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes.")
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  ap.add_argument("--time-child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--temp-child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.time_child:
    mlp_reps, cnn_reps = (int(x) for x in args.time_child.split(":"))
    _time_child(mlp_reps, cnn_reps)
    return None
  if args.temp_child:
    _temp_child(args.temp_child)
    return None
  report = run(args.rounds, args.mlp_reps, args.cnn_reps, not args.no_memory)
  from benchmarks.common import write_json

  write_json(report, args.out)
  print(format_table(report))
  return report


if __name__ == "__main__":
  main()
