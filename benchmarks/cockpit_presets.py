"""Cockpit's configurations in jaxscope: economy / business / full against the bare step.

Run from the repository root::

    .venv/bin/python benchmarks/cockpit_presets.py
    .venv/bin/python benchmarks/cockpit_presets.py --problems mnist_mlp --reps 20

For each problem (``benchmarks/problems.py``: DeepOBS shapes, batch 128) it jits one SGD
train step per variant:

* ``bare``: ``jax.value_and_grad`` of the mean loss, ``optax.sgd(0.01)``;
* ``economy``, ``business``, ``full``: the same step measuring
  ``jaxscope.metrics.instruments(preset=..., updates_in_span=True)`` every step
  (``inst.grad`` → optimizer → ``inst.update``), returning the values so they are live
  outputs. ``updates_in_span`` tells α that SGD's updates are multiples of the gradient,
  as ``jaxscope train`` tells it for ``sgd`` and ``momentum``.

The variants are compiled and warmed up, then timed interleaved in one process (the order
rotated each repetition), each training its own parameters with donated buffers. The
report holds medians, IQRs and ratios to the bare step. Each step is compiled with the
XLA:CPU options ``jaxscope train`` chooses for it by default (``--xla-options auto``,
:func:`jaxscope.xla.step_options`: ``lean_compile`` on the CNN, ``fewer_copies`` for the
MLP's ``business`` and ``full``); ``--xla-options none`` gives XLA's own.

Peak memory: each variant runs again in a fresh process (``--peak-rss``) for a few steps,
and the process's peak resident set size (``VmHWM``) is reported, as in Cockpit's
measurement (``../shared/specs/cockpit.md`` §3).

Accuracy of ``hess_max_ev``: after 100 SGD steps measuring it (warm-started power
iteration, one HVP per step, while the Hessian changes with training), the estimate is
compared with 60 Lanczos iterations from a random start at the final parameters and batch
(the reference), as a relative error.

Cockpit measured on the same 2-core machine (``../shared/specs/cockpit.md``): economy
318× / 11.6×, business 359× / 23×, full 1186× / 131× the bare step (mnist_mlp / 3c3d);
peak RSS up to 5.0 GB. Targets here: economy ≤ 3×, business ≤ 4×, full ≤ 10×, peak
memory ≤ 2 GB, ``hess_max_ev`` within 5 %.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import problems  # noqa: E402
from benchmarks.common import (  # noqa: E402
  copy_tree,
  environment,
  iqr,
  problem_list,
  step_options,
  write_json,
)
from jaxscope import xla  # noqa: E402
from jaxscope.metrics import curvature, instruments  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cockpit-presets-cpu.json"
PRESETS = ("economy", "business", "full")
TARGETS = {"economy": 3.0, "business": 4.0, "full": 10.0}
PEAK_RSS_TARGET_MB = 2048
#: Cockpit 1.0.2 on the same kind of machine (2 cores), ratios to a bare PyTorch step.
COCKPIT = {
  "mnist_mlp": {"economy": 318.0, "business": 359.0, "full": 1186.0},
  "cifar10_3c3d": {"economy": 11.6, "business": 23.0, "full": 131.0},
}
LEARNING_RATE = 0.01
WARMUP = 3
#: Training steps before ``hess_max_ev`` is compared with the Lanczos reference.
WARMUP_MAX_EV = 100

Step = Callable[..., tuple[Any, ...]]


def make_step(
  problem: problems.Problem, preset: str | None, compiler_options: dict[str, Any] | None = None
) -> tuple[Step, Any, Any]:
  """The jitted step ``(params, opt_state, istate, x, y) -> (params, opt_state, istate, out)``
  (``compiler_options``: XLA's options for this program, ``jax.jit``'s argument)."""
  tx = optax.sgd(LEARNING_RATE)

  def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = problem.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  if preset is None:

    def bare(params: Any, opt_state: Any, istate: Any, x: jax.Array, y: jax.Array) -> Any:
      loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, istate, loss

    jitted = jax.jit(bare, donate_argnums=(0, 1), compiler_options=compiler_options)
    return jitted, tx.init(problem.params), ()

  inst = instruments(preset=preset, updates_in_span=True)

  def step(params: Any, opt_state: Any, istate: Any, x: jax.Array, y: jax.Array) -> Any:
    probe = inst.grad(istate, losses_fn, params, x, y)
    updates, opt_state = tx.update(probe.grads, opt_state, params)
    values, istate = inst.update(istate, probe, updates)
    return optax.apply_updates(params, updates), opt_state, istate, values

  return (
    jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=compiler_options),
    tx.init(problem.params),
    inst.init(problem.params),
  )


def variant_options(problem: problems.Problem, variant: str, names: Sequence[str]) -> list[str]:
  """The options a variant's step is compiled with: ``names``, where ``["auto"]`` is what
  ``jaxscope train`` would choose (:func:`benchmarks.common.step_options`; the Hutchinson
  sums are in ``business`` and ``full``)."""
  return step_options(problem, names, hessian_sums=variant in ("business", "full"))


def time_variants(
  problem: problems.Problem,
  reps: int,
  variants: Sequence[str] = ("bare", *PRESETS),
  xla_options: Sequence[str] = (),
) -> dict[str, np.ndarray]:
  """Interleaved timings per variant (ms): ``bare`` and instrument presets, each step
  compiled with the named :data:`jaxscope.xla.STEP_OPTIONS` (:func:`variant_options`)."""
  names = list(variants)
  steps, states = {}, {}
  for name in names:
    options = xla.compiler_options(variant_options(problem, name, xla_options))
    step, opt_state, istate = make_step(problem, None if name == "bare" else name, options)
    steps[name] = step
    states[name] = (copy_tree(problem.params), opt_state, istate)
  x, y = problem.x, problem.y

  def call(name: str) -> float:
    t0 = time.perf_counter()
    out = steps[name](*states[name], x, y)
    jax.block_until_ready(out)
    states[name] = out[:3]
    return (time.perf_counter() - t0) * 1e3

  for name in names:
    t0 = time.perf_counter()
    call(name)
    first = time.perf_counter() - t0
    for _ in range(WARMUP - 1):
      call(name)
    print(f"  {problem.name}/{name}: compiled and warmed up ({first:.1f} s first call)")
  times: dict[str, list[float]] = {n: [] for n in names}
  for rep in range(reps):
    shift = rep % len(names)
    for name in names[shift:] + names[:shift]:
      times[name].append(call(name))
  return {n: np.asarray(t) for n, t in times.items()}


def max_ev_error(problem: problems.Problem, warmup: int) -> dict[str, float]:
  """``hess_max_ev`` after ``warmup`` training steps vs 60 Lanczos iterations there.

  Trains with ``instruments(["hess_max_ev"])`` (one HVP per step, the vector carried
  over steps) and SGD on the fixed batch, then compares the last estimate with 60 Lanczos
  iterations from a random start at the final parameters (the reference).
  """
  inst = instruments(["hess_max_ev"])
  tx = optax.sgd(LEARNING_RATE)

  def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = problem.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  @jax.jit
  def step(params: Any, opt_state: Any, istate: Any) -> Any:
    probe = inst.grad(istate, losses_fn, params, problem.x, problem.y)
    updates, opt_state = tx.update(probe.grads, opt_state, params)
    values, istate = inst.update(istate, probe, updates)
    return optax.apply_updates(params, updates), opt_state, istate, values

  params, opt_state, istate = problem.params, tx.init(problem.params), inst.init(problem.params)
  history = []
  for _ in range(warmup):
    params, opt_state, istate, values = step(params, opt_state, istate)
    history.append(float(values["hess_max_ev"]))
  ref = lanczos_reference(problem, params)
  return {
    "warmup_steps": warmup,
    "estimate": history[-1],
    "reference": ref,
    "rel_error": abs(history[-1] - ref) / abs(ref),
    "estimates_every_25": history[24::25],
  }


def lanczos_reference(problem: problems.Problem, params: Any, iters: int = 60) -> float:
  """Largest-magnitude Hessian eigenvalue by Lanczos in float64 on the host.

  Full reorthogonalisation; each Hessian-vector product is one jitted call (a device-side
  ``fori_loop`` around a convolution's HVP runs ~40× slower on XLA:CPU).
  """
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  _, _, hvp = curvature.hvp_fn(problem.loss, params, problem.x, problem.y)
  hvp_flat = jax.jit(lambda v: jax.flatten_util.ravel_pytree(hvp(unravel(v)))[0])
  rng = np.random.default_rng(1)
  q = rng.normal(size=flat.size)
  qs = [q / np.linalg.norm(q)]
  alphas, betas = [], []
  for k in range(iters):
    w = np.asarray(hvp_flat(jnp.asarray(qs[-1], flat.dtype)), np.float64)
    alphas.append(float(qs[-1] @ w))
    basis = np.stack(qs)
    w -= basis.T @ (basis @ w)
    w -= basis.T @ (basis @ w)  # twice is enough
    beta = float(np.linalg.norm(w))
    if beta < 1e-10 or k == iters - 1:
      break
    betas.append(beta)
    qs.append(w / beta)
  t = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
  ev = np.linalg.eigvalsh(t)
  return float(ev[np.argmax(np.abs(ev))])


def peak_rss_mb(
  problem: str, variant: str, steps: int = 4, xla_options: Sequence[str] = ()
) -> float:
  """Peak RSS (MB) of a fresh process running ``steps`` steps of one variant (compiled
  with the named :data:`jaxscope.xla.STEP_OPTIONS`)."""
  out = subprocess.run(
    [
      sys.executable,
      __file__,
      "--peak-rss",
      f"{problem}:{variant}:{steps}:{','.join(xla_options)}",
    ],
    capture_output=True,
    text=True,
    check=True,
    cwd=_ROOT,
  )
  return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _peak_rss_child(spec: str) -> None:
  pname, variant, steps, *names = spec.split(":")  # problem:variant:steps[:option,…]
  problem = problems.get(pname)
  options = xla.compiler_options([n for n in ",".join(names).split(",") if n])
  step, opt_state, istate = make_step(problem, None if variant == "bare" else variant, options)
  state = (copy_tree(problem.params), opt_state, istate)
  for _ in range(int(steps)):
    out = step(*state, problem.x, problem.y)
    jax.block_until_ready(out)
    state = out[:3]
  # VmHWM, not ru_maxrss: the latter survives exec(), so a child forked from a large
  # parent reports the parent's peak.
  status = Path("/proc/self/status").read_text()
  hwm_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
  print(json.dumps({"peak_rss_mb": round(hwm_kib / 1024, 1)}))


def run(
  problem_names: Sequence[str],
  reps: int | None,
  memory: bool,
  xla_options: Sequence[str] = (),
) -> dict[str, Any]:
  """Runs the benchmark; returns the JSON-ready report (every step compiled with the
  named :data:`jaxscope.xla.STEP_OPTIONS`; the ``hess_max_ev`` check with XLA's own)."""
  records = []
  for pname in problem_names:
    problem = problems.get(pname)
    n = reps if reps is not None else max(problem.default_reps // 2, 5)
    print(f"{pname}: {n} interleaved repetitions of bare, {', '.join(PRESETS)}")
    times = time_variants(problem, n, xla_options=xla_options)
    ev = max_ev_error(problem, WARMUP_MAX_EV)
    print(
      f"  hess_max_ev {ev['estimate']:.4g} vs Lanczos {ev['reference']:.4g} "
      f"({100 * ev['rel_error']:.2f} %)"
    )
    bare = float(np.median(times["bare"]))
    variants = ["bare", *PRESETS]
    chosen = {v: variant_options(problem, v, xla_options) for v in variants}
    rss = {v: peak_rss_mb(pname, v, xla_options=chosen[v]) for v in variants} if memory else {}
    for preset in PRESETS:
      med = float(np.median(times[preset]))
      records.append(
        {
          "problem": pname,
          "preset": preset,
          "bare_ms": round(bare, 3),
          "bare_iqr_ms": round(iqr(times["bare"]), 3),
          "ms": round(med, 3),
          "iqr_ms": round(iqr(times[preset]), 3),
          "ratio": round(med / bare, 3),
          "cockpit_ratio": COCKPIT.get(pname, {}).get(preset),
          "peak_rss_mb": rss.get(preset),
          "bare_peak_rss_mb": rss.get("bare"),
          "reps": n,
          "xla_options": chosen[preset],
          "bare_xla_options": chosen["bare"],
          **({"hess_max_ev": ev} if preset == "full" else {}),
        }
      )
  return {
    **environment(),
    "learning_rate": LEARNING_RATE,
    "xla_options": list(xla_options),
    "targets": {**TARGETS, "peak_rss_mb": PEAK_RSS_TARGET_MB, "hess_max_ev_rel_error": 0.05},
    "records": records,
  }


def format_table(report: dict[str, Any]) -> str:
  """A readable table of the report."""
  head = (
    f"{'problem':<14} {'preset':<9} {'bare ms':>8} {'ms':>9} {'(IQR)':>8} {'ratio':>7} "
    f"{'target':>7} {'Cockpit':>8} {'peak MB':>8}"
  )
  lines = [f"device {report['device']}, jax {report['jax']}, {report['cpu_count']} CPUs", head]
  lines.append("-" * len(head))
  for r in report["records"]:
    cp = r["cockpit_ratio"]
    rss = r["peak_rss_mb"]
    lines.append(
      f"{r['problem']:<14} {r['preset']:<9} {r['bare_ms']:>8.2f} {r['ms']:>9.2f} "
      f"{r['iqr_ms']:>8.2f} {r['ratio']:>6.2f}x {TARGETS[r['preset']]:>6.1f}x "
      f"{'' if cp is None else f'{cp:.0f}x':>8} {'' if rss is None else f'{rss:.0f}':>8}"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  """Command-line entry point."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path.")
  ap.add_argument(
    "--problems",
    type=problem_list,
    default=["mnist_mlp", "cifar10_3c3d"],
    help="comma-separated problems (default: mnist_mlp,cifar10_3c3d).",
  )
  ap.add_argument("--reps", type=int, default=None, help="timed calls per variant.")
  ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes.")
  ap.add_argument(
    "--xla-options",
    default="auto",
    help="comma list of jaxscope.xla.STEP_OPTIONS for every step; 'auto' (the default): "
    "per step what jaxscope train chooses (jaxscope.xla.step_options); 'none': XLA's own.",
  )
  ap.add_argument("--peak-rss", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.peak_rss:
    _peak_rss_child(args.peak_rss)
    return None
  if args.reps is not None and args.reps < 1:
    ap.error("--reps must be >= 1.")
  names = [n for n in args.xla_options.split(",") if n]
  try:
    if names not in (["auto"], ["none"]):
      xla.compiler_options(names)
  except ValueError as e:
    ap.error(f"{e}; or auto or none")
  report = run(args.problems, args.reps, not args.no_memory, names)
  print(format_table(report))
  write_json(report, args.out)
  print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
