"""Seconds per grid point of a 2-D loss landscape: jaxscope's kernel vs a per-point loop.

Run from the repository root::

    .venv/bin/python benchmarks/landscape.py
    .venv/bin/python benchmarks/landscape.py --eval all --loop-points 30   # 1797 examples

Setting: LeNet-5 (``jaxscope.models.build("lenet5", (8, 8, 1), 10)``) trained for a few
epochs by :func:`jaxscope.train.train` (real orbax checkpoints on disk), a fixed evaluation
set (the digits test split, 359 examples; ``--eval all`` adds the training split, 1797), and
the 2-D grid ``θ* + aδ + bη`` around the final checkpoint with two seeded,
filter-normalised random directions (biases zeroed), ``a, b`` on ``--grid`` points in
``[−1, 1]``.

Two ways to evaluate the same grid, in the same process:

* ``kernel``: jaxscope's evaluator (:func:`jaxscope.analysis.make_point_evaluator`, what
  :func:`jaxscope.analysis.landscape_2d` runs): the basis ``[θ*, δ, η]`` and the evaluation
  set live on the device, a chunk of points is built inside ``jit`` from coefficient arrays
  and evaluated at once (``vmap`` over points, ``scan`` over batches). Compiled once; the
  compile time is reported on its own and left out of the per-point time. ``kernel-c1`` is
  the same kernel with one point per call (``chunk=1``), ``kernel`` the library's default
  chunk. The end-to-end time of one :func:`landscape_2d` call (compile included) is reported
  too.
* ``loop``: what nnvis and loss-landscape do, one point after the other: restore the
  parameters from the checkpoint on disk (:meth:`jaxscope.checkpoint.RunCheckpoints.restore`),
  build ``θ* + aδ + bη`` with ``jax.tree.map`` on the host (numpy), evaluate the evaluation
  set batch by batch (a jitted per-batch loss and hit count, a Python loop over host
  batches of ``--loop-batch-size`` as a DataLoader yields them, sums accumulated on the
  host), next point. The directions stay in memory (loss-landscape re-reads them from its
  HDF5 file at every point; this loop is kinder). The per-batch function is compiled and
  warmed up before timing.

The kernel evaluates the whole grid ``--reps`` times; the loop evaluates ``--loop-points``
grid points (spread over the grid), interleaved with the kernel's repetitions in rotating
order. Reported: median seconds per point of each variant (and the loop's restore /
combine / evaluate split), the ratio ``loop / kernel``, compile times, and a check that both
give the same losses and accuracies at the shared points (``rtol 1e-4``). The target is
``≥ 20×`` faster per point. ``forward``, timed in the same rotation, is one jitted forward
pass over the whole evaluation set at fixed parameters (loss and accuracy, no combination,
no restore): issue 22's floor, against which a kernel point should cost at most ``1.5×``
(``over_forward``). The 1-minute load average is recorded before, during and after
the measurement; by default the script waits (up to ``--wait`` seconds) for it to fall
below ``--max-load`` before measuring.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Benchmark the checkout this file sits in (also when run as a script from anywhere).
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import environment, iqr, write_json  # noqa: E402
from jaxscope import analysis, data, models  # noqa: E402
from jaxscope.checkpoint import RunCheckpoints  # noqa: E402
from jaxscope.train import train  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "landscape-cpu.json"
TARGET = 20.0
#: Issue 22: a grid point within this factor of one batched forward pass over the
#: evaluation set at fixed parameters.
TARGET_OVER_FORWARD = 1.5
#: Forward-pass calls timed per repetition.
FORWARD_CALLS = 20
RTOL = 1e-4


def wait_for_quiet(max_load: float, wait_s: float, poll_s: float = 60.0) -> dict[str, Any]:
  """Waits until the 1-minute load average is below ``max_load`` (at most ``wait_s``).

  Returns:
    ``{"quiet": bool, "waited_s": float, "load": [1, 5, 15-minute averages]}``.
  """
  t0 = time.perf_counter()
  while True:
    load = os.getloadavg()
    waited = time.perf_counter() - t0
    if load[0] < max_load or waited >= wait_s:
      return {"quiet": load[0] < max_load, "waited_s": round(waited, 1), "load": list(load)}
    print(f"  load {load[0]:.2f} ≥ {max_load}: waiting ({waited:.0f} / {wait_s:.0f} s)")
    time.sleep(min(poll_s, max(1.0, wait_s - waited)))


def train_run(run_dir: Path, epochs: int, seed: int) -> tuple[int, float]:
  """Trains LeNet-5 on digits with a checkpoint per epoch; returns (final step, seconds)."""
  t0 = time.perf_counter()
  res = train(
    model="lenet5",
    dataset="digits",
    epochs=epochs,
    metrics="none",
    seed=seed,
    out=str(run_dir),
    quiet=True,
  )
  return int(res.steps), time.perf_counter() - t0


def eval_data(which: str) -> tuple[np.ndarray, np.ndarray]:
  """The evaluation set: the digits test split (``test``) or test + train (``all``)."""
  ds = data.load("digits")
  if which == "test":
    return np.asarray(ds.test_x), np.asarray(ds.test_y)
  return (
    np.concatenate([ds.test_x, ds.train_x]),
    np.concatenate([ds.test_y, ds.train_y]),
  )


class Loop:
  """The per-point loop of nnvis / loss-landscape (module docstring)."""

  def __init__(
    self,
    model: Any,
    ckpts: RunCheckpoints,
    step: int,
    directions: Sequence[Any],
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
  ) -> None:
    self.ckpts, self.step = ckpts, step
    self.dirs = [jax.tree.map(np.asarray, d) for d in directions]
    self.x, self.y, self.bs = x, y, batch_size

    @jax.jit
    def batch_sums(params: Any, xb: jax.Array, yb: jax.Array) -> tuple[jax.Array, jax.Array]:
      logits = model.apply({"params": params}, xb, train=False)[0]
      per = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return per.sum(), (logits.argmax(-1) == yb).sum()

    self.batch_sums = batch_sums

  def warm_up(self) -> float:
    """Compiles the per-batch function for every batch shape; returns the seconds."""
    t0 = time.perf_counter()
    params = jax.tree.map(np.asarray, self.ckpts.restore(self.step).params)
    self.evaluate(params)
    return time.perf_counter() - t0

  def evaluate(self, params: Any) -> tuple[float, float]:
    """Mean loss and accuracy over the evaluation set, batch by batch from the host."""
    loss_sum, hits = 0.0, 0
    for i in range(0, len(self.x), self.bs):
      loss, hit = self.batch_sums(params, self.x[i : i + self.bs], self.y[i : i + self.bs])
      loss_sum += float(loss)
      hits += int(hit)
    return loss_sum / len(self.x), hits / len(self.x)

  def point(self, a: float, b: float) -> tuple[float, float, dict[str, float]]:
    """One grid point from scratch: restore, combine on the host, evaluate."""
    t0 = time.perf_counter()
    theta = self.ckpts.restore(self.step).params
    t1 = time.perf_counter()
    params = jax.tree.map(
      lambda t, d, e: np.asarray(t) + np.float32(a) * d + np.float32(b) * e,
      theta,
      *self.dirs,
    )
    t2 = time.perf_counter()
    loss, acc = self.evaluate(params)
    t3 = time.perf_counter()
    return loss, acc, {"restore": t1 - t0, "combine": t2 - t1, "evaluate": t3 - t2}


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the benchmark; returns the JSON-ready report."""
  quiet = (
    wait_for_quiet(args.max_load, args.wait)
    if args.wait > 0
    else {"quiet": None, "waited_s": 0.0, "load": list(os.getloadavg())}
  )
  print(f"load before: {quiet['load'][0]:.2f} (quiet: {quiet['quiet']})")
  tmp = tempfile.TemporaryDirectory(prefix="jaxscope-landscape-")
  run_dir = Path(tmp.name) / "run"
  final_step, train_s = train_run(run_dir, args.epochs, args.seed)
  print(f"trained LeNet-5 on digits for {args.epochs} epochs ({final_step} steps, {train_s:.1f} s)")
  model = models.build("lenet5", (8, 8, 1), 10)

  def apply_fn(p: Any, s: Any, x: jax.Array) -> jax.Array:
    return model.apply({"params": p, **s}, x, train=False)[0]

  ckpts = RunCheckpoints(run_dir)
  try:
    theta = ckpts.restore(final_step).params
    dx, dy = analysis.random_directions(theta, args.direction_seed, 2)
    cos = float(analysis.cosine(dx, dy))
    x, y = eval_data(args.eval)
    es = analysis.make_eval_set(x, y)
    axis = np.linspace(-1.0, 1.0, args.grid)
    a, b = np.meshgrid(axis, axis)  # [ny, nx], rows are y
    coeffs = np.stack([np.ones(a.size), a.ravel(), b.ravel()], axis=1)
    n_points = a.size
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(theta))

    # landscape_2d end to end, in a fresh evaluator: compile + one pass over the grid.
    t0 = time.perf_counter()
    land = analysis.landscape_2d(apply_fn, es, theta, dx, dy, axis, axis)
    e2e_s = time.perf_counter() - t0
    print(f"landscape_2d {args.grid}×{args.grid}: {e2e_s:.2f} s end to end (compile included)")

    # The kernel variants, compiled and warmed up.
    # The first pass compiles (its time minus a steady pass is the compile time).
    variants: dict[str, Any] = {}
    first_s: dict[str, float] = {}
    for name, chunk in (("kernel", None), ("kernel-c1", 1)):
      ev = analysis.make_point_evaluator(apply_fn, [theta, dx, dy], es, chunk=chunk)
      t0 = time.perf_counter()
      first = ev.evaluate(coeffs)
      first_s[name] = time.perf_counter() - t0
      ev.evaluate(coeffs)  # warm-up
      variants[name] = ev
      print(f"  {name}: chunk {ev.chunk}, first pass {first_s[name]:.2f} s")
      if name == "kernel":
        kernel_loss, kernel_acc = first["loss"], first["accuracy"]

    # Issue 22's floor: one batched forward pass over the whole evaluation set at a
    # fixed parameter vector (no combination, no restore), the least a grid point costs.
    @jax.jit
    def forward(params: Any, xe: jax.Array, ye: jax.Array) -> tuple[jax.Array, jax.Array]:
      logits = model.apply({"params": params}, xe, train=False)[0]
      per = optax.softmax_cross_entropy_with_integer_labels(logits, ye)
      return per.mean(), (logits.argmax(-1) == ye).mean()

    theta_dev, xe, ye = jax.device_put(theta), jnp.asarray(x), jnp.asarray(y)
    jax.block_until_ready(forward(theta_dev, xe, ye))  # compile
    loop = Loop(model, ckpts, final_step, [dx, dy], x, y, args.loop_batch_size)
    loop_compile_s = loop.warm_up()
    print(f"  loop: per-batch function compiled and warmed up ({loop_compile_s:.2f} s)")

    # The loop's points, spread over the grid (every k-th point, centre included).
    k = max(1, n_points // args.loop_points)
    picks = list(range(0, n_points, k))[: args.loop_points]
    centre = n_points // 2
    if centre not in picks:
      picks[-1] = centre
    shares = np.array_split(np.asarray(picks), args.reps)

    times: dict[str, list[float]] = {"kernel": [], "kernel-c1": [], "loop": [], "forward": []}
    parts: dict[str, list[float]] = {"restore": [], "combine": [], "evaluate": []}
    loop_loss, loop_acc = {}, {}
    loads = []
    order = ["kernel", "kernel-c1", "loop", "forward"]
    for rep in range(args.reps):
      loads.append(os.getloadavg()[0])
      shift = rep % len(order)
      for name in order[shift:] + order[:shift]:
        if name == "loop":
          for p in shares[rep]:
            t0 = time.perf_counter()
            loss, acc, split = loop.point(float(a.ravel()[p]), float(b.ravel()[p]))
            times["loop"].append(time.perf_counter() - t0)
            for key, v in split.items():
              parts[key].append(v)
            loop_loss[int(p)], loop_acc[int(p)] = loss, acc
        elif name == "forward":
          for _ in range(FORWARD_CALLS):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(theta_dev, xe, ye))
            times["forward"].append(time.perf_counter() - t0)
        else:
          t0 = time.perf_counter()
          out = variants[name].evaluate(coeffs)
          jax.block_until_ready(out)
          times[name].append((time.perf_counter() - t0) / n_points)
      print(f"  rep {rep + 1}/{args.reps} done (load {loads[-1]:.2f})")
    load_after = list(os.getloadavg())
  finally:
    ckpts.close()
    tmp.cleanup()

  idx = np.asarray(sorted(loop_loss))
  l_loop = np.asarray([loop_loss[i] for i in idx])
  a_loop = np.asarray([loop_acc[i] for i in idx])
  rel = np.abs(l_loop - kernel_loss[idx]) / np.abs(kernel_loss[idx])
  check = {
    "points": len(idx),
    "max_rel_loss_diff": float(rel.max()),
    "max_abs_accuracy_diff": float(np.abs(a_loop - kernel_acc[idx]).max()),
    "rtol": RTOL,
    "ok": bool(np.allclose(l_loop, kernel_loss[idx], rtol=RTOL, atol=0.0))
    and bool(np.allclose(a_loop, kernel_acc[idx], rtol=0.0, atol=1.5 / len(x))),
    "centre_loss": land.center_loss,
    "centre_matches_grid": bool(
      np.isclose(land.loss[args.grid // 2, args.grid // 2], land.center_loss, rtol=1e-6)
    ),
  }

  def stat(v: list[float]) -> dict[str, float]:
    arr = np.asarray(v)
    return {"median_s": float(np.median(arr)), "iqr_s": iqr(arr), "n": len(arr)}

  loop_pp = float(np.median(times["loop"]))
  fwd_pp = float(np.median(times["forward"]))
  kernels = {}
  compile_s = {}
  for name in ("kernel", "kernel-c1"):
    pp = float(np.median(times[name]))
    compile_s[name] = max(0.0, first_s[name] - pp * n_points)
    kernels[name] = {
      "chunk": variants[name].chunk,
      "per_point": stat(times[name]),
      "compile_s": compile_s[name],
      "per_point_incl_compile_s": pp + compile_s[name] / n_points,
      "ratio": loop_pp / pp,
      "over_forward": pp / fwd_pp,
      "ratio_incl_compile": loop_pp / (pp + compile_s[name] / n_points),
      "per_point_incl_compile_51x51_s": pp + compile_s[name] / 51**2,
    }
  report = {
    "benchmark": "landscape",
    **environment(),
    "setting": {
      "model": "lenet5 (8, 8, 1) -> 10",
      "parameters": n_params,
      "train_epochs": args.epochs,
      "train_steps": final_step,
      "train_s": train_s,
      "eval": args.eval,
      "eval_examples": len(x),
      "eval_set_digest": es.digest,
      "kernel_eval_batch": int(es.x.shape[1]),
      "loop_batch_size": args.loop_batch_size,
      "grid": [args.grid, args.grid],
      "grid_points": n_points,
      "axis": [-1.0, 1.0],
      "directions": {
        "kind": "random, filter-normalised, 1-D leaves zeroed",
        "seed": args.direction_seed,
        "cosine": cos,
      },
      "reps": args.reps,
      "loop_points": len(idx),
    },
    "load": {
      "max_load": args.max_load,
      "quiet_before": quiet["quiet"],
      "waited_s": quiet["waited_s"],
      "before": quiet["load"],
      "during_1min": loads,
      "after": load_after,
    },
    "landscape_2d_end_to_end_s": e2e_s,
    "landscape_2d_per_point_incl_compile_s": e2e_s / n_points,
    "kernel": kernels["kernel"],
    "kernel_chunk1": kernels["kernel-c1"],
    "loop": {
      "per_point": stat(times["loop"]),
      "split_median_s": {k: float(np.median(v)) for k, v in parts.items()},
      "compile_s": loop_compile_s,
    },
    "forward": {"per_call": stat(times["forward"]), "batch": len(x)},
    "check": check,
    "target_over_forward": TARGET_OVER_FORWARD,
    "target_over_forward_met": kernels["kernel"]["over_forward"] <= TARGET_OVER_FORWARD,
    "target": TARGET,
    "target_met": kernels["kernel"]["ratio"] >= TARGET,
    "target_met_chunk1": kernels["kernel-c1"]["ratio"] >= TARGET,
  }
  return report


def format_table(r: dict[str, Any]) -> str:
  """A readable table of the report."""
  s = r["setting"]
  lines = [
    f"device {r['device']}, jax {r['jax']}, {r['cpu_count']} CPUs, jaxscope {r['jaxscope_git']}",
    f"LeNet-5 ({s['parameters']} parameters), {s['eval_examples']} eval examples, "
    f"{s['grid'][0]}×{s['grid'][1]} grid, loop on {s['loop_points']} points, "
    f"1-min load {r['load']['before'][0]:.2f} before, "
    f"{np.median(r['load']['during_1min']):.2f} during (median)",
    f"{'variant':<22} {'s/point':>10} {'(IQR)':>10} {'compile s':>10} {'loop/this':>10}",
    "-" * 66,
  ]
  for name, key in (("kernel (default chunk)", "kernel"), ("kernel (chunk 1)", "kernel_chunk1")):
    k = r[key]
    lines.append(
      f"{name:<22} {k['per_point']['median_s']:>10.5f} {k['per_point']['iqr_s']:>10.5f} "
      f"{k['compile_s']:>10.2f} {k['ratio']:>9.1f}x"
    )
  lp = r["loop"]
  lines.append(
    f"{'per-point loop':<22} {lp['per_point']['median_s']:>10.5f} "
    f"{lp['per_point']['iqr_s']:>10.5f} {lp['compile_s']:>10.2f} {1.0:>9.1f}x"
  )
  fw = r["forward"]["per_call"]
  lines.append(
    f"{'one forward pass':<22} {fw['median_s']:>10.5f} {fw['iqr_s']:>10.5f} {'':>10} "
    f"{'':>10}  (kernel / forward: {r['kernel']['over_forward']:.2f}x, target <= "
    f"{r['target_over_forward']:.1f}x)"
  )
  sp = lp["split_median_s"]
  lines.append(
    f"  loop split (median s): restore {sp['restore']:.5f}, combine {sp['combine']:.5f}, "
    f"evaluate {sp['evaluate']:.5f}"
  )
  k = r["kernel"]
  lines.append(
    f"kernel incl. compile: {k['per_point_incl_compile_s']:.5f} s/point on this grid "
    f"({k['ratio_incl_compile']:.1f}x), {k['per_point_incl_compile_51x51_s']:.5f} s/point "
    f"on a 51×51 grid; landscape_2d end to end {r['landscape_2d_end_to_end_s']:.2f} s"
  )
  c = r["check"]
  lines.append(
    f"same losses at {c['points']} shared points: max rel diff {c['max_rel_loss_diff']:.2e} "
    f"(rtol {c['rtol']:g}) -> {'ok' if c['ok'] else 'MISMATCH'}"
  )
  met = {True: "met", False: "NOT met"}
  lines.append(
    f"target ≥ {r['target']:.0f}x: default chunk {met[r['target_met']]}, "
    f"chunk 1 {met[r['target_met_chunk1']]}"
  )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; returns the report."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path.")
  ap.add_argument("--grid", type=int, default=11, help="points per axis (odd: contains 0).")
  ap.add_argument("--loop-points", type=int, default=20, help="grid points the loop evaluates.")
  ap.add_argument("--reps", type=int, default=5, help="kernel passes over the whole grid.")
  ap.add_argument("--epochs", type=int, default=2, help="training epochs of the run.")
  ap.add_argument("--seed", type=int, default=0, help="training seed.")
  ap.add_argument("--direction-seed", type=int, default=123, help="seed of the directions.")
  ap.add_argument(
    "--eval",
    choices=["test", "all"],
    default="test",
    help="evaluation set: the digits test split (359) or test + train (1797).",
  )
  ap.add_argument("--loop-batch-size", type=int, default=128, help="the loop's batch size.")
  ap.add_argument("--max-load", type=float, default=1.5, help="quiet: 1-min load below this.")
  ap.add_argument(
    "--wait", type=float, default=600.0, help="seconds to wait for quiet (0: do not wait)."
  )
  args = ap.parse_args(argv)
  if args.grid < 3 or args.grid % 2 == 0:
    ap.error("--grid must be odd and ≥ 3 (so that the centre is on the grid).")
  if not 1 <= args.loop_points <= args.grid**2:
    ap.error("--loop-points must be between 1 and grid².")
  if not 1 <= args.reps <= args.loop_points:
    ap.error("--reps must be between 1 and --loop-points.")
  if args.epochs < 1 or args.loop_batch_size < 1:
    ap.error("--epochs and --loop-batch-size must be ≥ 1.")
  report = run(args)
  print()
  print(format_table(report))
  write_json(report, args.out)
  print(f"\nwrote {args.out}")
  return report


if __name__ == "__main__":
  main()
