"""Cockpit's instruments on a digits MLP: a good learning rate and one 10x too large.

Cockpit (Schneider, Dangel & Hennig, NeurIPS 2021) reads a training run through instruments
computed at every step: the normalised step length α (does the update undershoot or
overshoot the minimum along its direction?), the gradient tests (is the batch large enough
for the gradient's noise?), the curvature (largest Hessian eigenvalue λ_max, trace, TIC) and
the per-example gradient histograms. This script measures all of them with
``jaxscope.metrics.instruments(preset="full")`` inside the jitted train step:

1. a Flax Linen MLP (flatten → Dense 64 → Dense 64 → Dense 10, ReLU) on scikit-learn's
   embedded 8×8 digits (1438 train / 359 test), plain SGD without momentum, batch 128,
   seed 0, trained at ``lr = 0.2`` and again at ``lr = 2.0`` (10x too large), from the same
   initialisation and on the same batches (``--lr`` sets the first);
2. every step's values go to ``jaxscope.record.Recorder`` (``OUT/<name>/metrics.jsonl``),
   with the test loss and accuracy every 25 steps;
3. ``jaxscope.plot.cockpit`` draws each run on one page (``cockpit_<name>.png``) and a
   table compares the runs: final test accuracy, median α over the last 50 steps and the
   share of steps with α > 0, the final λ_max, ``lr·λ_max`` at the end and at its largest
   (gradient descent on a quadratic is stable only while it is below 2), and the median
   norm and inner-product tests over the last 50 steps.

Run it with::

    python examples/cockpit_instruments.py              # 600 steps per run (about 2 min, 2 cores)
    python examples/cockpit_instruments.py --quick      # a smoke test (a few dozen steps)

The runs go to ``runs/cockpit_example/<name>/`` and the figures to
``docs/figures/cockpit_<name>.png``; with ``--out DIR`` (or ``--quick``, which defaults to a
temporary directory) both go under ``DIR`` (``DIR/<name>/``, ``DIR/figures/``).
"""

from __future__ import annotations

import os
import sys

# The smoke test (--quick) spends most of its time compiling. XLA:CPU without LLVM
# optimisation and with its classic instead of its MLIR fusion emitters compiles two to
# three times as fast, which outweighs its slower steps. This must happen before JAX is
# imported (so it only applies when the script is run as a program).
if "--quick" in sys.argv[1:] and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  ).strip()

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxscope
from jaxscope import metrics, plot
from jaxscope.data import batches, load_digits
from jaxscope.record import History, Recorder

ROOT = Path(__file__).resolve().parents[1]
LR = 0.2
TOO_LARGE = 10.0  # The second run's learning rate is TOO_LARGE · lr.
BATCH = 128
HIDDEN = (64, 64)
SEED = 0
STEPS = 600
QUICK_STEPS = 30
EVAL_EVERY = 25
LAST = 50  # The table's medians are over the last LAST steps.


class MLP(nn.Module):
  """Flatten → Dense → ReLU (per hidden width) → Dense ``num_classes``."""

  hidden: tuple[int, ...] = HIDDEN
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def _train(
  name: str,
  lr: float,
  steps: int,
  run_dir: Path,
  train_step: Any,
  evaluate: Any,
  params: Any,
  inst: metrics.Instruments,
  tx: optax.GradientTransformation,
  data: Any,
) -> History:
  """Trains one run from ``params``, recording every step into ``run_dir``."""
  if run_dir.exists():  # A fresh run: the recorder would append to an old metrics.jsonl.
    shutil.rmtree(run_dir)
  opt_state = tx.init(params)
  opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
  istate = inst.init(params)
  config = {
    "name": name,
    "lr": lr,
    "optimizer": "sgd",
    "momentum": 0.0,
    "batch_size": BATCH,
    "model": f"MLP{list(HIDDEN)}",
    "dataset": data.name,
    "preset": "full",
    "seed": SEED,
    "steps": steps,
    "jaxscope": jaxscope.__version__,
  }
  t0 = time.perf_counter()
  step, epoch = 0, 0
  with Recorder(run_dir, config=config) as recorder:
    while step < steps:
      for x, y in batches(data.train_x, data.train_y, BATCH, seed=SEED + epoch):
        params, opt_state, istate, values = train_step(params, opt_state, istate, x, y)
        recorder.write(step, values)
        step += 1
        if step % EVAL_EVERY == 0 or step == steps:
          recorder.write(step - 1, evaluate(params, data.test_x, data.test_y))
        if step == steps:
          break
      epoch += 1
  history = History.load(run_dir)
  print(
    f"{name}: lr {lr:g}, {steps} steps in {time.perf_counter() - t0:.1f} s, "
    f"final loss {history['loss'][-1]:.4f}, test accuracy {history['test/accuracy'][-1]:.4f}"
  )
  return history


def _median_last(history: History, key: str, last: int = LAST) -> float:
  v = np.asarray(history[key][-last:], np.float64)
  v = v[np.isfinite(v)]
  return float(np.median(v)) if v.size else float("nan")


def summarize(history: History, lr: float) -> dict[str, float]:
  """The table's row of one run."""
  ev = np.asarray(history["hess_max_ev"], np.float64)
  alpha = np.asarray(history["alpha"][1:], np.float64)  # Step 0 has no α yet.
  return {
    "lr": lr,
    "test_accuracy": float(history["test/accuracy"][-1]),
    "test_loss": float(history["test/loss"][-1]),
    "alpha_median": _median_last(history, "alpha"),
    "alpha_overshoot_share": float(np.mean(alpha[np.isfinite(alpha)] > 0)),
    "hess_max_ev": float(ev[-1]),
    "lr_hess_max_ev": lr * float(ev[-1]),
    "lr_hess_max_ev_max": lr * float(np.nanmax(ev)) if np.isfinite(ev).any() else float("nan"),
    "norm_test_median": _median_last(history, "norm_test"),
    "inner_test_median": _median_last(history, "inner_test"),
  }


def table(rows: dict[str, dict[str, float]]) -> str:
  """The comparison as a markdown table."""
  lines = [
    f"| run | lr | test acc. | median α (last {LAST}) | steps with α > 0 | final λ_max "
    f"| final lr·λ_max | max lr·λ_max | median norm test (last {LAST}) "
    f"| median inner test (last {LAST}) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(
      f"| {name} | {r['lr']:g} | {r['test_accuracy']:.4f} | {r['alpha_median']:.3f} "
      f"| {r['alpha_overshoot_share']:.0%} | {r['hess_max_ev']:.3g} | {r['lr_hess_max_ev']:.3g} "
      f"| {r['lr_hess_max_ev_max']:.3g} | {r['norm_test_median']:.3g} "
      f"| {r['inner_test_median']:.3g} |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run")
  parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {STEPS})")
  parser.add_argument(
    "--out",
    default=None,
    help="output directory for the runs and figures (default: runs/cockpit_example and "
    "docs/figures; with --quick a temporary directory)",
  )
  parser.add_argument(
    "--lr",
    type=float,
    default=LR,
    help=f"the good learning rate (default {LR}); the second run uses {TOO_LARGE:g}x it",
  )
  args = parser.parse_args(argv)
  runs = {f"lr{lr:g}": lr for lr in (args.lr, TOO_LARGE * args.lr)}
  steps = args.steps if args.steps is not None else QUICK_STEPS if args.quick else STEPS
  if steps < 1:
    parser.error("--steps must be >= 1")
  if args.out is not None:
    runs_dir = Path(args.out)
    fig_dir = runs_dir / "figures"
  elif args.quick:
    runs_dir = Path(tempfile.mkdtemp(prefix="cockpit_example_"))
    fig_dir = runs_dir / "figures"
  else:
    runs_dir = ROOT / "runs" / "cockpit_example"
    fig_dir = ROOT / "docs" / "figures"
  fig_dir.mkdir(parents=True, exist_ok=True)

  data = load_digits(seed=SEED)
  model = MLP(num_classes=data.num_classes)
  params = model.init(jax.random.key(SEED), data.train_x[:1])["params"]
  inst = metrics.instruments(preset="full", seed=SEED)
  # The learning rate lives in the optimizer state, so both runs share one compiled step.
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=args.lr)

  def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)  # [B]

  @jax.jit
  def train_step(
    params: Any, opt_state: Any, istate: metrics.InstrumentsState, x: jax.Array, y: jax.Array
  ) -> tuple[Any, Any, metrics.InstrumentsState, dict[str, jax.Array]]:
    probe = inst.grad(istate, losses_fn, params, x, y)
    updates, opt_state = tx.update(probe.grads, opt_state, params)
    lr = opt_state.hyperparams["learning_rate"]
    values, istate = inst.update(istate, probe, updates, learning_rate=lr)
    return optax.apply_updates(params, updates), opt_state, istate, values

  @jax.jit
  def evaluate(params: Any, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return {"test/loss": loss, "test/accuracy": metrics.batch_accuracy(logits, y)}

  print(
    f"MLP{list(HIDDEN)} on {data.name} ({len(data.train_x)} train / {len(data.test_x)} test), "
    f"SGD batch {BATCH}, {steps} steps per run, instruments(preset='full')"
  )
  rows: dict[str, dict[str, float]] = {}
  for name, lr in runs.items():
    history = _train(name, lr, steps, runs_dir / name, train_step, evaluate, params, inst, tx, data)
    rows[name] = summarize(history, lr)
    fig = plot.cockpit(history)
    path = fig_dir / f"cockpit_{name}.png"
    fig.savefig(path, dpi=80 if args.quick else 100)
    print(f"  wrote {path}")
  print()
  print(table(rows))
  print(f"\nruns in {runs_dir}")
  return rows


if __name__ == "__main__":
  main()
