"""Dynamic network capacity: the thesis's sine and digit experiments, static vs adaptive.

Run from the repository root (about 4 minutes on a 2-core CPU)::

    .venv/bin/python examples/dynamic_capacity.py            # writes docs/dynamic_capacity.md
    .venv/bin/python examples/dynamic_capacity.py --quick    # a smoke test (seconds)

1. **Sine regression** on [−2π, 2π] (``jaxscope.data`` ``sine``), one tanh hidden layer:
   static 100 units, static 500 units, and adaptive: 500 units in fifths, one fifth
   active at the start, the next activated on each plateau of the training loss's moving
   average (patience 10 steps), the trained fifths frozen (``jaxscope train --capacity
   chunks=5,patience=10,policy=all``). Adam, lr 1e-3, batch 64; every configuration over
   ``--seeds`` seeds. The table gives the *final-10 error* as the thesis does: the mean test
   MSE of the last 10 evaluations, mean ± std over seeds.
2. **Digits CNN in tenths** (``capacity_cnn``: two capacity convolutions and a capacity
   hidden layer, each in 10 chunks) on the embedded 8×8 digits: standard (all chunks
   active from the start) vs adaptive; final-10 test error (1 − accuracy).
3. **Time per step** of the masked network at one chunk and at full capacity against the
   static networks: the masked layers compute the full width (masking multiplies, it does
   not skip), so a small capacity costs as much as a full one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

# The smoke test (--quick) spends most of its time compiling. XLA:CPU without LLVM
# optimisation and with its classic instead of its MLIR fusion emitters compiles two to
# three times as fast, which outweighs its slower steps (its step times mean nothing). This
# must happen before JAX is imported (so it only applies when the script is run as a program).
if "--quick" in sys.argv[1:] and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxscope import models, record  # noqa: E402
from jaxscope.record import History  # noqa: E402
from jaxscope.train import TrainConfig, train  # noqa: E402

DOCS = _ROOT / "docs"

SINE = {
  "static 100": {"model_args": {"widths": (100,), "chunks": 5, "initial_chunks": 5}},
  "static 500": {"model_args": {"widths": (500,), "chunks": 5, "initial_chunks": 5}},
  "adaptive 500 (fifths)": {
    "model_args": {"widths": (500,), "chunks": 5, "initial_chunks": 1},
    "capacity": "chunks=5,patience=10,policy=all",
  },
}
_CNN = {"features": (30, 60), "hidden": 120}  # widths divisible by 10 chunks
DIGITS = {
  "standard": {"model_args": {**_CNN, "chunks": 10, "initial_chunks": 10}},
  "adaptive (tenths)": {
    "model_args": {**_CNN, "chunks": 10, "initial_chunks": 1},
    "capacity": "chunks=10,patience=10,policy=all",
  },
}


def run(name: str, spec: dict[str, Any], seed: int, out: Path, **cfg: Any) -> dict[str, Any]:
  """One training run; returns its test-error curve, train-loss curve and expansion steps."""
  run_dir = out / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}-s{seed}"
  config = TrainConfig(
    out=str(run_dir),
    seed=seed,
    quiet=True,
    metrics="none",
    model_args=dict(spec["model_args"]),
    capacity=spec.get("capacity"),
    **cfg,
  )
  t0 = time.perf_counter()
  train(config)
  wall = time.perf_counter() - t0
  h = History.load(run_dir)
  if "test/accuracy" in h.keys():
    steps, acc = h.series("test/accuracy")
    err = 1.0 - acc
  else:
    steps, err = h.series("test/loss")
  loss_steps, loss = h.series("loss")
  expansions: list[int] = []
  if "capacity/expanded" in h.keys():
    s, e = h.series("capacity/expanded")
    expansions = [int(x) for x in s[np.asarray(e, bool)]]
  return {
    "eval_steps": steps.tolist(),
    "error": np.asarray(err, float).tolist(),
    "loss_steps": loss_steps.tolist(),
    "loss": np.asarray(loss, float).tolist(),
    "expansions": expansions,
    "final10": float(np.mean(np.asarray(err, float)[-10:])),
    "wall_s": wall,
  }


def step_times(reps: int) -> dict[str, float]:
  """Median ms of a jitted forward+backward (batch 64, sine inputs), interleaved."""
  x = jnp.linspace(-6.0, 6.0, 64).reshape(64, 1)
  y = jnp.sin(x)
  variants: dict[str, Any] = {}
  for label, widths, initial in (
    ("static 100", (100,), 5),
    ("static 500", (500,), 5),
    ("capacity 500, 1/5 active", (500,), 1),
    ("capacity 500, 5/5 active", (500,), 5),
  ):
    md = models.build("capacity_mlp", (1,), 1, widths=widths, chunks=5, initial_chunks=initial)
    variables = md.init(jax.random.key(0), x)

    def loss(p: Any, v: dict = variables, md: Any = md) -> jax.Array:
      out, _ = md.apply({**v, "params": p}, x, train=True)
      return jnp.mean((out - y) ** 2)

    variants[label] = (jax.jit(jax.value_and_grad(loss)), variables["params"])
  for f, p in variants.values():
    jax.block_until_ready(f(p))
  times: dict[str, list[float]] = {k: [] for k in variants}
  for _ in range(reps):
    for k, (f, p) in variants.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(p))
      times[k].append((time.perf_counter() - t0) * 1e3)
  return {k: float(np.median(v)) for k, v in times.items()}


def _table(results: dict[str, list[dict[str, Any]]], fmt: str) -> list[str]:
  lines = ["| configuration | final-10 error (mean ± std) | seeds | expansions (mean) |"]
  lines.append("|---|---|---|---|")
  for name, runs in results.items():
    f10 = np.array([r["final10"] for r in runs])
    exp = np.mean([len(r["expansions"]) for r in runs])
    lines.append(f"| {name} | {f10.mean():{fmt}} ± {f10.std():{fmt}} | {len(runs)} | {exp:.1f} |")
  return lines


def _figure(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4.5))
  colors = {name: f"C{i}" for i, name in enumerate(results)}
  for name, runs in results.items():
    r = runs[0]
    steps = np.asarray(r["loss_steps"])
    loss = np.asarray(r["loss"])
    k = 25  # Smooth the mini-batch loss for readability.
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax.semilogy(steps[k - 1 :], smooth, color=colors[name], label=f"{name} (train, seed 0)")
    ax.semilogy(r["eval_steps"], r["error"], "--", color=colors[name], alpha=0.7)
    for s in r["expansions"]:
      ax.axvline(s, color=colors[name], lw=0.8, alpha=0.5)
  ax.set_xlabel("step")
  ax.set_ylabel("MSE (solid: train, 25-step mean; dashed: test)")
  ax.set_title("Sine regression: static vs adaptive capacity (vertical lines: expansions)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--sine-steps", type=int, default=15000)
  ap.add_argument("--digits-epochs", type=int, default=15)
  ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
  args = ap.parse_args(argv)
  seeds = 1 if args.quick else args.seeds
  sine_steps = 60 if args.quick else args.sine_steps
  digit_epochs = 1 if args.quick else args.digits_epochs
  tmp = tempfile.TemporaryDirectory()
  out = args.out or Path(tmp.name)
  sine: dict[str, list[dict[str, Any]]] = {}
  for name, spec in SINE.items():
    sine[name] = [
      run(
        f"sine-{name}",
        spec,
        s,
        out,
        model="capacity_mlp",
        dataset="sine",
        optimizer="adam",
        lr=1e-3,
        batch_size=64,
        steps=sine_steps,
        eval_every=max(sine_steps // 50, 1),
        checkpoint_every=0,
      )
      for s in range(seeds)
    ]
    print(f"sine {name}: final-10 {[round(r['final10'], 5) for r in sine[name]]}")
  digits: dict[str, list[dict[str, Any]]] = {}
  for name, spec in DIGITS.items():
    digits[name] = [
      run(
        f"digits-{name}",
        spec,
        s,
        out,
        model="capacity_cnn",
        dataset="digits",
        optimizer="momentum",
        lr=0.05,
        batch_size=64,
        epochs=digit_epochs,
        eval_every=5,
        checkpoint_every=0,
      )
      for s in range(min(seeds, 3))
    ]
    print(f"digits {name}: final-10 {[round(r['final10'], 4) for r in digits[name]]}")
  times = step_times(5 if args.quick else 200)
  print("ms per step:", {k: round(v, 3) for k, v in times.items()})
  report = {"sine": sine, "digits": digits, "step_ms": times, "quick": args.quick}
  if not args.quick:
    (DOCS / "results").mkdir(parents=True, exist_ok=True)
    (DOCS / "results" / "dynamic_capacity.json").write_text(record.dumps(report))
    _figure(sine, DOCS / "figures" / "dynamic_capacity_sine.png")
    lines = ["## Sine regression (final-10 test MSE)", "", *_table(sine, ".5f"), ""]
    lines += ["## Digits CNN (final-10 test error)", "", *_table(digits, ".4f"), ""]
    lines += ["## Time per step (forward + backward, batch 64, median ms)", ""]
    lines += ["| network | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in times.items()]
    (DOCS / "results" / "dynamic_capacity_tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
  tmp.cleanup()
  return report


if __name__ == "__main__":
  main()
