"""Where a step's time goes: XLA:CPU's per-operation times from ``jax.profiler``.

Run from the repository root::

    .venv/bin/python benchmarks/profile_step.py --row instruments/economy
    .venv/bin/python benchmarks/profile_step.py --problem mnist_mlp --row scope/full --top 30

The step is any row of ``benchmarks/costs.py`` (``bare``, ``loss``, ``scope/…``,
``instruments/…``, single instruments such as ``alpha``, and the ``xla_floor/…``
programs), built as that script builds it. After warm-up, ``--steps`` calls are traced
with ``jax.profiler.trace(..., create_perfetto_trace=True)``; the Perfetto trace (plain
JSON) holds one event per executed XLA operation ("thunk") with its duration and the
thread that ran it. The report gives, per step:

* the operations by total time, each with its HLO shape and the JAX operation it came
  from (``op_name`` of the optimised HLO), e.g. ``ynn_fusion.28  f32[128]
  jit(step)/bi,io,bo->b/dot_general``: a per-example contraction;
* the busy time of each thread: on 2 cores, a step whose added work runs on one thread
  while the other idles costs its full time;
* the number of operations under 10 µs and their total (each costs the executor a few
  µs: tiny reductions split in two stages add up).

This is how the costs of this round were located (README, "Performance targets at a
glance"): the materialised masks and int32 reductions of ``lost_fraction``, the span
check of α, the histogram's scatter. The profiler slows the step (the traced step is
slower than the timed one); read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402

from benchmarks import costs, problems  # noqa: E402
from benchmarks.common import environment, write_json  # noqa: E402

#: Events of the runtime around the operations, not operations themselves.
RUNTIME_EVENTS = ("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "CommonPjRt")
#: An operation under this many µs is counted as small.
SMALL_US = 10.0


def operation_times(events: Sequence[dict[str, Any]], steps: int) -> dict[str, Any]:
  """Per-step operation times from Perfetto ``events`` (``traceEvents``) of ``steps`` calls.

  Returns ``{"ops": {name: (µs per step, calls per step)}, "threads": {tid: busy µs per
  step}, "small": (count per step, µs per step)}``; runtime events
  (:data:`RUNTIME_EVENTS`) and those without a duration are left out.
  """
  if steps < 1:
    raise ValueError(f"operation_times: steps must be >= 1, got {steps!r}.")
  total: dict[str, float] = collections.defaultdict(float)
  calls: collections.Counter[str] = collections.Counter()
  busy: dict[str, float] = collections.defaultdict(float)
  small_n, small_us = 0, 0.0
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = str(e.get("name", ""))
    if name.startswith(RUNTIME_EVENTS) or name.startswith("end: ") or "::" in name:
      continue
    dur = float(e["dur"])
    total[name] += dur
    calls[name] += 1
    busy[str(e.get("tid"))] += dur
    if dur < SMALL_US:
      small_n += 1
      small_us += dur
  return {
    "ops": {k: (total[k] / steps, calls[k] / steps) for k in total},
    "threads": {k: v / steps for k, v in busy.items()},
    "small": (small_n / steps, small_us / steps),
  }


def hlo_origin(hlo_text: str, name: str) -> str:
  """``"shape  op_name"`` of the instruction ``name`` in optimised HLO text ("" if absent)."""
  m = re.search(rf"^\s*(?:ROOT )?%{re.escape(name)} = (\S+) .*$", hlo_text, re.MULTILINE)
  if m is None:
    return ""
  op = re.search(r'op_name="([^"]+)"', m.group(0))
  return f"{m.group(1)}  {op.group(1) if op else ''}".rstrip()


def profile(problem_name: str, row: str, steps: int, warmup: int = 10) -> dict[str, Any]:
  """Traces ``steps`` calls of the ``costs.py`` row ``row`` on ``problem_name``."""
  problem = problems.get(problem_name)
  step, state = costs.variants(problem, "all", [row])[row]()  # ValueError: unknown row
  args = (problem.x, problem.y)
  for _ in range(warmup):
    state = step(*state, *args)[: len(state)]
  jax.block_until_ready(state)
  hlo = step.lower(*state, *args).compile().as_text()
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        state = step(*state, *args)[: len(state)]
      jax.block_until_ready(state)
    traces = sorted(Path(tmp).rglob("perfetto_trace.json.gz"))
    if not traces:
      raise RuntimeError("profile_step: jax.profiler wrote no Perfetto trace.")
    data = json.loads(gzip.decompress(traces[0].read_bytes()))
  events = data["traceEvents"] if isinstance(data, dict) else data
  times = operation_times(events, steps)
  ops = sorted(times["ops"].items(), key=lambda kv: -kv[1][0])
  return {
    **environment(),
    "problem": problem_name,
    "row": row,
    "steps": steps,
    "ops": [
      {"name": k, "us_per_step": us, "calls_per_step": n, "origin": hlo_origin(hlo, k)}
      for k, (us, n) in ops
    ],
    "thread_busy_us": sorted(times["threads"].values(), reverse=True),
    "small_ops_per_step": times["small"][0],
    "small_ops_us_per_step": times["small"][1],
  }


def format_report(report: dict[str, Any], top: int) -> str:
  """The ``top`` operations and the per-thread summary, as text."""
  lines = [f"{report['problem']} {report['row']}: {report['steps']} traced steps, per step"]
  for op in report["ops"][:top]:
    lines.append(f"  {op['us_per_step']:9.1f} µs  {op['name']:<32} {op['origin'][:90]}")
  busy = ", ".join(f"{b:.0f}" for b in report["thread_busy_us"])
  lines.append(f"threads busy (µs): {busy}")
  lines.append(
    f"operations under {SMALL_US:.0f} µs: {report['small_ops_per_step']:.0f}, "
    f"{report['small_ops_us_per_step']:.0f} µs in all"
  )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command line: ``--problem``, ``--row``, ``--steps``, ``--top``, ``--out``."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--problem", default="mnist_mlp", choices=sorted(problems.PROBLEMS))
  ap.add_argument("--row", default="instruments/economy", help="a row of benchmarks/costs.py")
  ap.add_argument("--steps", type=int, default=20, help="traced calls (default 20)")
  ap.add_argument("--top", type=int, default=25, help="operations printed (default 25)")
  ap.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
  args = ap.parse_args(argv)
  if args.steps < 1:
    ap.error("--steps must be >= 1.")
  report = profile(args.problem, args.row, args.steps)
  print(format_report(report, args.top))
  if args.out is not None:
    write_json(report, args.out)
    print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
