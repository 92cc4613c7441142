"""What a jaxscope scope costs inside a jitted train step, against the bare step.

Run from the repository root::

    .venv/bin/python benchmarks/overhead.py
    .venv/bin/python benchmarks/overhead.py --problems mnist_mlp --reps 50 --every 10
    .venv/bin/python benchmarks/overhead.py --every 10 --skip host   # host-side skipping

For each problem (see ``benchmarks/problems.py``) it jits one SGD train step
``(params, opt_state, x, y) -> (params, opt_state, loss[, metrics])`` per variant:

* ``bare``: ``tx = optax.sgd(0.01)``;
* one variant per preset (``economy``, ``full``): ``tx = monitored(optax.sgd(0.01),
  scope(preset=..., every=N))``, called with ``value=loss``; the step also returns
  ``jaxscope.transforms.monitored_metrics(opt_state)``, so the measurements are live outputs.

Each variant is compiled and warmed up, then the variants are timed interleaved in one
process: every repetition times one call of each variant (in an order rotated each
repetition, so no variant always runs first), blocking on all of its outputs. Each
variant trains its own parameters, feeding each call's outputs to its next call, with
``params`` and ``opt_state`` donated as in a real training loop.

The report is the median wall time per call, its interquartile range and the ratio
``median(scoped) / median(bare)``, printed as a table and written as JSON to ``--out``.
The targets are ``economy <= 1.10×`` and ``full <= 1.5×`` the bare step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Benchmark the checkout this file sits in (also when run as a script from anywhere).
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxscope  # noqa: E402
from benchmarks import problems  # noqa: E402
from benchmarks.common import (  # noqa: E402
  copy_tree,
  environment,
  iqr,
  problem_list,
  write_json,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "overhead-cpu.json"
TARGETS = {"economy": 1.10, "full": 1.5}
WARMUP = 3
LEARNING_RATE = 0.01

Step = Callable[..., tuple[Any, ...]]


def make_step(
  problem: problems.Problem, preset: str | None, every: int, skip: str = "cond"
) -> tuple[Step, Any]:
  """The jitted train step of ``problem`` and its initial optimizer state.

  Args:
    problem: the model and batch.
    preset: ``None`` for the bare step, else the scope preset to monitor.
    every: measure every ``every``-th step.
    skip: ``"cond"``: the scope's ``every`` (``lax.cond`` on device); ``"host"``: the
      step is jitted with a static ``measure`` flag chosen on the host (two compiled
      variants; skipped steps run the one without measurement).

  Returns:
    ``(step, opt_state)``; ``step(params, opt_state, x, y)`` returns
    ``(params, opt_state, loss)``, plus the scope's metrics dict when ``preset`` is set.
  """
  if preset is None:
    tx = optax.sgd(LEARNING_RATE)
  else:
    sc = jaxscope.metrics.scope(preset=preset, every=every if skip == "cond" else 1)
    tx = jaxscope.transforms.monitored(optax.sgd(LEARNING_RATE), sc)

  def step(
    params: Any, opt_state: Any, x: jax.Array, y: jax.Array, measure: bool | None = None
  ) -> tuple[Any, ...]:
    loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
    if preset is None:
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params, value=loss, measure=measure)
    params = optax.apply_updates(params, updates)
    if preset is None:
      return params, opt_state, loss
    return params, opt_state, loss, jaxscope.transforms.monitored_metrics(opt_state)

  if preset is None or skip == "cond" or every == 1:
    return jax.jit(step, donate_argnums=(0, 1)), tx.init(problem.params)
  jitted = jax.jit(step, donate_argnums=(0, 1), static_argnames="measure")
  calls = [0]

  def host_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, ...]:
    measure = calls[0] % every == 0
    calls[0] += 1
    return jitted(params, opt_state, x, y, measure=measure)

  return host_step, tx.init(problem.params)


def time_variants(
  problem: problems.Problem, presets: Sequence[str], every: int, reps: int, skip: str = "cond"
) -> dict[str, np.ndarray]:
  """Times the bare step and one scoped step per preset, interleaved.

  Returns:
    ``{variant: per-call wall times in ms}``, variants ``"bare"`` and each preset.
  """
  names = ["bare", *presets]
  steps: dict[str, Step] = {}
  states: dict[str, tuple[Any, Any]] = {}
  for name in names:
    step, opt_state = make_step(problem, None if name == "bare" else name, every, skip)
    steps[name] = step
    states[name] = (copy_tree(problem.params), opt_state)
  x, y = problem.x, problem.y

  def call(name: str) -> float:
    params, opt_state = states[name]
    t0 = time.perf_counter()
    out = steps[name](params, opt_state, x, y)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    states[name] = (out[0], out[1])
    return dt * 1e3

  for name in names:
    t0 = time.perf_counter()
    call(name)  # The first call compiles.
    compile_s = time.perf_counter() - t0
    for _ in range(max(WARMUP - 1, every)):  # Host mode: compile both variants.
      call(name)
    print(f"  {problem.name}/{name}: compiled and warmed up ({compile_s:.1f} s first call)")

  times: dict[str, list[float]] = {name: [] for name in names}
  for rep in range(reps):
    shift = rep % len(names)
    for name in names[shift:] + names[:shift]:
      times[name].append(call(name))
  for name in names:  # Training must not have diverged, or the timings mean little.
    loss = float(problem.loss(states[name][0], x, y))
    if not np.isfinite(loss):
      raise RuntimeError(f"{problem.name}/{name}: loss became {loss} during the benchmark.")
  return {name: np.asarray(t) for name, t in times.items()}


def run(
  problem_names: Sequence[str],
  presets: Sequence[str],
  every: int,
  reps: int | None,
  skip: str = "cond",
) -> dict[str, Any]:
  """Runs the benchmark and returns the JSON-ready report."""
  records = []
  for pname in problem_names:
    problem = problems.get(pname)
    n = reps if reps is not None else problem.default_reps
    print(f"{pname}: {n} interleaved repetitions of {', '.join(['bare', *presets])}")
    times = time_variants(problem, presets, every, n, skip)
    bare = float(np.median(times["bare"]))
    for preset in presets:
      scoped = float(np.median(times[preset]))
      records.append(
        {
          "problem": pname,
          "preset": preset,
          "every": every,
          "skip": skip,
          "bare_ms": round(bare, 4),
          "scoped_ms": round(scoped, 4),
          "ratio": round(scoped / bare, 4),
          "bare_iqr_ms": round(iqr(times["bare"]), 4),
          "scoped_iqr_ms": round(iqr(times[preset]), 4),
          "reps": n,
        }
      )
  return {
    **environment(),
    "records": records,
    "targets": dict(TARGETS),
  }


def format_table(report: dict[str, Any]) -> str:
  """A readable table of the report's records."""
  header = (
    f"{'problem':<14} {'preset':<8} {'every':>5} {'skip':>4} {'bare ms':>9} {'(IQR)':>8} "
    f"{'scoped ms':>10} {'(IQR)':>8} {'ratio':>7} {'target':>7}  ok"
  )
  lines = [
    f"device {report['device']}, jax {report['jax']}, {report['cpu_count']} CPUs, "
    f"jaxscope {report.get('jaxscope_git')}",
    header,
    "-" * len(header),
  ]
  for r in report["records"]:
    target = report["targets"].get(r["preset"])
    ok = "" if target is None else ("yes" if r["ratio"] <= target else "NO")
    target_s = "" if target is None else f"{target:.2f}x"
    lines.append(
      f"{r['problem']:<14} {r['preset']:<8} {r['every']:>5} {r.get('skip', 'cond'):>4} "
      f"{r['bare_ms']:>9.2f} "
      f"{r['bare_iqr_ms']:>8.2f} {r['scoped_ms']:>10.2f} {r['scoped_iqr_ms']:>8.2f} "
      f"{r['ratio']:>6.3f}x {target_s:>7}  {ok}"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; returns the report."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path.")
  ap.add_argument(
    "--problems",
    type=problem_list,
    default=["mnist_mlp", "cifar10_3c3d"],
    help=f"comma-separated problems of {', '.join(problems.PROBLEMS)} "
    "(default: mnist_mlp,cifar10_3c3d).",
  )
  ap.add_argument(
    "--reps",
    type=int,
    default=None,
    help="timed calls per variant (default: per problem, 30 for mnist_mlp, 10 for 3c3d).",
  )
  ap.add_argument(
    "--presets",
    type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
    default=["economy", "full"],
    help="comma-separated scope presets (default: economy,full).",
  )
  ap.add_argument("--every", type=int, default=1, help="measure every N-th step (default 1).")
  ap.add_argument(
    "--skip",
    choices=["cond", "host"],
    default="cond",
    help="how unmeasured steps are skipped: the scope's lax.cond (default) or a static "
    "measure flag chosen on the host (two compiled step variants).",
  )
  args = ap.parse_args(argv)
  if not args.presets:
    ap.error("--presets: give at least one preset.")
  for p in args.presets:
    if p not in jaxscope.metrics.SCOPE_PRESETS:
      ap.error(f"unknown preset {p!r}; presets: {', '.join(jaxscope.metrics.SCOPE_PRESETS)}.")
  if args.reps is not None and args.reps < 1:
    ap.error("--reps must be >= 1.")
  if args.every < 1:
    ap.error("--every must be >= 1.")

  report = run(args.problems, args.presets, args.every, args.reps, args.skip)
  print()
  print(format_table(report))
  write_json(report, args.out)
  print(f"\nwrote {args.out}")
  return report


if __name__ == "__main__":
  main()
