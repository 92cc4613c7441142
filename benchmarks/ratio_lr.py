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
* ``fixed_ratio``: ``optax.chain(optax.sgd(0.01), scale_to_update_ratio(1e-3))``;
* ``xla_floor``: the least program that does the rate's reading, ``Σu²`` and ``Σθ²`` of
  every kernel and a factor on the updates that depends on them (:func:`xla_floor`).

The variants are timed interleaved in one process (the order rotated every repetition),
each training its own donated parameters, as ``benchmarks/overhead.py`` does. The report
is the median wall time per call, its interquartile range and ``median / median(sgd)``,
printed and written as JSON to ``--out``; each ratio-adaptive variant also gets its extra
time over SGD divided by ``xla_floor``'s (``extra_over_xla_floor``). The target is
``ratio_code`` and ``ratio_thesis`` ``<= 1.05×`` plain SGD, or, where the floor alone is
above that, within 1.3× of the floor's extra.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import problems  # noqa: E402
from benchmarks.common import copy_tree, environment, iqr, problem_list, write_json  # noqa: E402
from jaxscope import tree as jtree  # noqa: E402
from jaxscope.transforms import ratio_adaptive_lr, scale_to_update_ratio  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ratio-lr-cpu.json"
TARGET = 1.05
WARMUP = 3
LEARNING_RATE = 0.01


def xla_floor() -> optax.GradientTransformation:
  """The least work of a ratio-adaptive rate, as a transform: ``Σu²`` and ``Σθ²`` of every
  kernel in one vector (kept in the state), the updates scaled by a factor that depends on
  them (always 1 here). No EMA, no per-layer scalar arithmetic, no checks."""

  def init_fn(params: optax.Params) -> jax.Array:
    kernels = [i for i in jtree.leaf_infos(params) if i.kind == "kernel"]
    return jnp.zeros((2 * len(kernels),), jnp.float32)

  def update_fn(
    updates: optax.Updates, state: jax.Array, params: optax.Params | None = None
  ) -> tuple[optax.Updates, jax.Array]:
    kernels = [i.index for i in jtree.leaf_infos(params) if i.kind == "kernel"]
    u, p = jax.tree.leaves(updates), jax.tree.leaves(params)
    sums = jnp.stack([jnp.sum(jnp.square(t[k])) for k in kernels for t in (u, p)])
    f = jnp.minimum(1.0, 1e30 / (1.0 + jnp.sum(sums)))
    return jax.tree.map(lambda x: x * f, updates), sums

  return optax.GradientTransformation(init_fn, update_fn)


VARIANTS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "sgd": lambda: optax.sgd(LEARNING_RATE),
  "ratio_code": lambda: optax.chain(optax.sgd(LEARNING_RATE), ratio_adaptive_lr(mode="code")),
  "ratio_thesis": lambda: optax.chain(optax.sgd(LEARNING_RATE), ratio_adaptive_lr(mode="thesis")),
  "fixed_ratio": lambda: optax.chain(optax.sgd(LEARNING_RATE), scale_to_update_ratio(1e-3)),
  "xla_floor": lambda: optax.chain(optax.sgd(LEARNING_RATE), xla_floor()),
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
    floor_extra = float(np.median(times["xla_floor"])) - base
    for name in variants:
      med = float(np.median(times[name]))
      records.append(
        {
          "problem": pname,
          "variant": name,
          "median_ms": round(med, 4),
          "iqr_ms": round(iqr(times[name]), 4),
          "ratio": round(med / base, 4),
          "extra_over_xla_floor": (
            round((med - base) / floor_extra, 3) if name in TARGETS and floor_extra > 0 else None
          ),
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
    f"{'problem':<14} {'variant':<13} {'median ms':>10} {'(IQR)':>8} {'ratio':>7} {'target':>7}"
    f"  ok  extra/XLA floor"
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
      f"{r['ratio']:>6.3f}x {target_s:>7}  {ok:<3} "
      + ("" if r.get("extra_over_xla_floor") is None else f"{r['extra_over_xla_floor']:.2f}x")
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
