"""XLA:CPU options per step: :data:`jaxscope.xla.FEWER_COPIES` and ``LEAN_COMPILE``.

Run from the repository root::

    .venv/bin/python benchmarks/compiler_options.py                         # MLP time
    .venv/bin/python benchmarks/compiler_options.py --problems none \\
        --memory cifar10_3c3d:business:4,cifar10_3c3d:full:2                  # CNN memory

Both options are XLA debug options that ``jax.jit(..., compiler_options=...)`` takes for
one program, so the variants of a step can be compared in one process:

* **time**: for each problem, the Cockpit presets' steps (``benchmarks/cockpit_presets``:
  SGD with :func:`jaxscope.metrics.instruments`, parameters donated) and the bare step, each
  compiled with the default options, with ``FEWER_COPIES`` and with ``LEAN_COMPILE``;
  interleaved in turns of ``--block`` calls (the first of each turn not counted), medians
  after warm-up, ratios to the default, and XLA's temporaries of each program
  (``memory_analysis``).
* **memory** (``--memory problem:preset:steps,...``): for each option, a fresh process
  compiles the step and runs ``steps`` steps; it reports its resident memory before
  compiling, after compiling, and its peak (``VmHWM``).

Writes JSON to ``benchmarks/results/compiler-options-cpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import problems  # noqa: E402
from benchmarks.cockpit_presets import PRESETS, make_step  # noqa: E402
from benchmarks.common import copy_tree, environment, iqr, write_json  # noqa: E402
from benchmarks.costs import time_interleaved  # noqa: E402
from jaxscope import xla  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compiler-options-cpu.json"
#: The compared options, by name (``default``: none).
OPTIONS: dict[str, dict[str, Any] | None] = {
  "default": None,
  "fewer_copies": xla.FEWER_COPIES,
  "lean_compile": xla.LEAN_COMPILE,
}


def _rss_mb(field: str = "VmRSS") -> float:
  status = Path("/proc/self/status").read_text()
  kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))
  return round(kib / 1024, 1)


def temp_mb(problem: problems.Problem, preset: str | None, option: str) -> float:
  """XLA's temporaries (MB) of the step of ``preset`` compiled with ``option``."""
  step, opt_state, istate = make_step(problem, preset, OPTIONS[option])
  args = (problem.params, opt_state, istate, problem.x, problem.y)
  return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def time_problem(problem: problems.Problem, reps: int, block: int) -> list[dict[str, Any]]:
  """Interleaved medians of every (preset, option) step of ``problem``."""
  builders = {}
  for preset in ("bare", *PRESETS):
    for option in OPTIONS:

      def build(p: str = preset, o: str = option) -> tuple:
        step, opt_state, istate = make_step(problem, None if p == "bare" else p, OPTIONS[o])
        return step, (copy_tree(problem.params), opt_state, istate)

      builders[f"{preset}/{option}"] = build
  times = time_interleaved(problem, builders, reps, block)
  rows = []
  for preset in ("bare", *PRESETS):
    base = float(np.median(times[f"{preset}/default"]))
    for option in OPTIONS:
      t = times[f"{preset}/{option}"]
      rows.append(
        {
          "preset": preset,
          "option": option,
          "step_ms": float(np.median(t)),
          "step_iqr_ms": iqr(t),
          "vs_default": float(np.median(t)) / base,
          "temp_mb": temp_mb(problem, None if preset == "bare" else preset, option),
        }
      )
  return rows


def _memory_child(spec: str) -> None:
  pname, preset, steps, option = spec.split(":")
  problem = problems.get(pname)
  before = _rss_mb()
  step, opt_state, istate = make_step(
    problem, None if preset == "bare" else preset, OPTIONS[option]
  )
  state = (copy_tree(problem.params), opt_state, istate)
  t0 = time.perf_counter()
  compiled = step.lower(*state, problem.x, problem.y).compile()
  compile_s = time.perf_counter() - t0
  after_compile = _rss_mb()
  for _ in range(int(steps)):
    out = compiled(*state, problem.x, problem.y)
    jax.block_until_ready(out)
    state = out[:3]
  report = {
    "rss_before_mb": before,
    "rss_after_compile_mb": after_compile,
    "peak_rss_mb": _rss_mb("VmHWM"),
    "compile_s": round(compile_s, 2),
    "temp_mb": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
  }
  print(json.dumps(report))


def memory_rows(specs: list[str]) -> list[dict[str, Any]]:
  """One fresh process per ``problem:preset:steps`` spec and option."""
  rows = []
  for spec in specs:
    pname, preset, steps = spec.split(":")
    for option in OPTIONS:
      out = subprocess.run(
        [sys.executable, __file__, "--memory-child", f"{spec}:{option}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=_ROOT,
      )
      row = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append(
        {"problem": pname, "preset": preset, "steps": int(steps), "option": option, **row}
      )
      print(f"  {spec} {option}: {row}", flush=True)
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", default="mnist_mlp", help="comma list for the time, or none")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--block", type=int, default=4)
  parser.add_argument("--memory", default="", help="problem:preset:steps,... (fresh processes)")
  parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.memory_child:
    _memory_child(args.memory_child)
    return
  report: dict[str, Any] = {"environment": environment(), "options": OPTIONS, "time": {}}
  names = [] if args.problems == "none" else args.problems.split(",")
  for pname in names:
    rows = time_problem(problems.get(pname), args.reps, args.block)
    report["time"][pname] = rows
    print(f"\n{pname} ({args.reps} interleaved repetitions, turns of {args.block})")
    print("| preset | option | step ms | vs default | XLA temporaries MB |\n|---|---|---|---|---|")
    for r in rows:
      print(
        f"| {r['preset']} | {r['option']} | {r['step_ms']:.1f} | {r['vs_default']:.2f}× "
        f"| {r['temp_mb']:.0f} |"
      )
  report["memory"] = memory_rows([s for s in args.memory.split(",") if s])
  write_json(report, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
