"""What the ratio-adaptive learning rate costs in a jitted train step, against plain SGD.

Run from the repository root::

    .venv/bin/python benchmarks/ratio_lr.py
    .venv/bin/python benchmarks/ratio_lr.py --problems mnist_mlp --reps 50

For each problem (``benchmarks/problems.py``: DeepOBS's ``mnist_mlp`` and ``3c3d``
shapes, batch 128) it jits one train step ``(params, opt_state, x, y) -> (params,
opt_state, loss)`` per variant:

* ``sgd``: ``optax.sgd(0.01)``;
* ``ratio_code``: ``optax.chain(optax.sgd(0.01), ratio_adaptive_lr(mode="code"))``;
* ``ratio_thesis``: the same with ``mode="thesis"``;
* ``fixed_ratio``: ``optax.chain(optax.sgd(0.01), scale_to_update_ratio(1e-3))``.

The variants are timed interleaved in one process (the order rotated every repetition),
each training its own donated parameters, as ``benchmarks/overhead.py`` does. The report
is the median wall time per call, its interquartile range and ``median / median(sgd)``,
printed and written as JSON to ``--out``. The target is ``ratio_code`` and
``ratio_thesis`` ``<= 1.05×`` plain SGD.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import problems  # noqa: E402
from benchmarks.common import copy_tree, environment, iqr, problem_list, write_json  # noqa: E402
from jaxscope.transforms import ratio_adaptive_lr, scale_to_update_ratio  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ratio-lr-cpu.json"
TARGET = 1.05
WARMUP = 3
LEARNING_RATE = 0.01

VARIANTS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "sgd": lambda: optax.sgd(LEARNING_RATE),
  "ratio_code": lambda: optax.chain(optax.sgd(LEARNING_RATE), ratio_adaptive_lr(mode="code")),
  "ratio_thesis": lambda: optax.chain(optax.sgd(LEARNING_RATE), ratio_adaptive_lr(mode="thesis")),
  "fixed_ratio": lambda: optax.chain(optax.sgd(LEARNING_RATE), scale_to_update_ratio(1e-3)),
}
TARGETS = {"ratio_code": TARGET, "ratio_thesis": TARGET}


def make_step(problem: problems.Problem, variant: str) -> tuple[Callable[..., Any], Any]:
  """The jitted, donating train step of ``problem`` with ``variant`` and its opt state."""
  tx = VARIANTS[variant]()

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, Any]:
    loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), tx.init(problem.params)


def time_variants(
  problem: problems.Problem, variants: Sequence[str], reps: int
) -> dict[str, np.ndarray]:
  """Per-call wall times in ms of each variant, interleaved."""
  steps, states = {}, {}
  for name in variants:
    steps[name], opt_state = make_step(problem, name)
    states[name] = (copy_tree(problem.params), opt_state)

  def call(name: str) -> float:
    params, opt_state = states[name]
    t0 = time.perf_counter()
    out = steps[name](params, opt_state, problem.x, problem.y)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    states[name] = (out[0], out[1])
    return dt * 1e3

  for name in variants:
    for _ in range(WARMUP):
      call(name)
  times: dict[str, list[float]] = {name: [] for name in variants}
  for rep in range(reps):
    shift = rep % len(variants)
    for name in list(variants[shift:]) + list(variants[:shift]):
      times[name].append(call(name))
  for name in variants:
    loss = float(problem.loss(states[name][0], problem.x, problem.y))
    if not np.isfinite(loss):
      raise RuntimeError(f"{problem.name}/{name}: loss became {loss} during the benchmark.")
  return {name: np.asarray(t) for name, t in times.items()}


def run(problem_names: Sequence[str], reps: int | None) -> dict[str, Any]:
  """Runs the benchmark and returns the JSON-ready report."""
  variants = list(VARIANTS)
  records = []
  for pname in problem_names:
    problem = problems.get(pname)
    n = reps if reps is not None else 3 * problem.default_reps
    print(f"{pname}: {n} interleaved repetitions of {', '.join(variants)}")
    times = time_variants(problem, variants, n)
    base = float(np.median(times["sgd"]))
    for name in variants:
      med = float(np.median(times[name]))
      records.append(
        {
          "problem": pname,
          "variant": name,
          "median_ms": round(med, 4),
          "iqr_ms": round(iqr(times[name]), 4),
          "ratio": round(med / base, 4),
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
    f"{'problem':<14} {'variant':<13} {'median ms':>10} {'(IQR)':>8} {'ratio':>7} {'target':>7}  ok"
  )
  lines = [
    f"device {report['device']}, jax {report['jax']}, {report['cpu_count']} CPUs, "
    f"jaxscope {report.get('jaxscope_git')}",
    header,
    "-" * len(header),
  ]
  for r in report["records"]:
    target = report["targets"].get(r["variant"])
    ok = "" if target is None else ("yes" if r["ratio"] <= target else "NO")
    target_s = "" if target is None else f"{target:.2f}x"
    lines.append(
      f"{r['problem']:<14} {r['variant']:<13} {r['median_ms']:>10.3f} {r['iqr_ms']:>8.3f} "
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
    help="timed calls per variant (default: 3× the problem's default, 90 / 30).",
  )
  args = ap.parse_args(argv)
  if args.reps is not None and args.reps < 1:
    ap.error("--reps must be >= 1.")
  report = run(args.problems, args.reps)
  print()
  print(format_table(report))
  write_json(report, args.out)
  print(f"\nwrote {args.out}")
  return report


if __name__ == "__main__":
  main()
