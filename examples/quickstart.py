"""Quickstart: watch a Flax CNN learn scikit-learn's embedded handwritten digits.

The optimizer is wrapped by ``jaxscope.transforms.monitored``, so every train step
measures per-layer norms, moments, update/weight ratios, histograms and spectral norms
inside the jitted step; a ``Recorder`` moves them to ``metrics.jsonl`` without stalling
the step, and the run is plotted to PNG at the end.

Run it with ``make demo`` or::

    python examples/quickstart.py --out runs/demo --epochs 8

It writes ``runs/demo/{config.json, metrics.jsonl, plots/*.png}`` and prints a per-layer
table of the last measured values.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxscope
from jaxscope import metrics, plot, transforms
from jaxscope.data import batches, load_digits
from jaxscope.record import History, Recorder


class DigitsCNN(nn.Module):
  """Conv 3×3·16 → Conv 3×3·32 → max-pool 2 → Dense 64 → Dense 10, ReLU."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/demo", help="run directory")
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--preset", default="full", choices=sorted(metrics.SCOPE_PRESETS))
  parser.add_argument("--every", type=int, default=1, help="measure every n-th step")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)

  data = load_digits(seed=args.seed)
  model = DigitsCNN(data.num_classes)
  params = model.init(jax.random.PRNGKey(args.seed), data.train_x[:1])["params"]
  scope = metrics.scope(preset=args.preset, network=["loss", "accuracy"], every=args.every)
  tx = transforms.monitored(optax.sgd(args.lr, momentum=args.momentum), scope)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss, logits=logits, labels=y)
    return optax.apply_updates(params, updates), opt_state, transforms.monitored_metrics(opt_state)

  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return {"test/loss": loss, "test/accuracy": metrics.batch_accuracy(logits, y)}

  out = Path(args.out)
  config = {
    **vars(args),
    "model": "DigitsCNN",
    "dataset": data.name,
    "jaxscope": jaxscope.__version__,
  }
  step = 0
  t0 = time.perf_counter()
  with Recorder(out, config=config, tensorboard=args.tensorboard) as recorder:
    for epoch in range(args.epochs):
      for x, y in batches(data.train_x, data.train_y, args.batch_size, seed=args.seed + epoch):
        params, opt_state, values = train_step(params, opt_state, x, y)
        recorder.write(step, values)
        step += 1
      test = evaluate(params, data.test_x, data.test_y)
      recorder.write(step - 1, test)
      print(
        f"epoch {epoch + 1:2d}  step {step:4d}  train loss {float(values['loss']):.4f}  "
        f"test loss {float(test['test/loss']):.4f}  test acc {float(test['test/accuracy']):.4f}"
      )
  elapsed = time.perf_counter() - t0

  history = History.load(out)
  print(f"\n{step} steps in {elapsed:.1f} s; last measured values per layer:")
  _print_table(history)
  if not args.no_plots:
    paths = plot.save_run_plots(history, out / "plots")
    print(f"\nwrote {out / 'metrics.jsonl'} and {len(paths)} plots in {out / 'plots'}")
  return {k: float(history[k][-1]) for k in ("loss", "test/accuracy")}


def _print_table(history: History) -> None:
  columns = [
    ("params", "norm", "‖θ‖"),
    ("grads", "norm", "‖g‖"),
    ("updates", "ratio", "‖Δθ‖/‖θ‖"),
    ("params", "spectral_norm", "σ_max"),
    ("grads", "variance", "var(g)"),
  ]
  columns = [c for c in columns if history.layers(c[0], c[1])]
  layers = history.layers("params", "norm")
  width = max(len(layer) for layer in layers) + 2
  print("layer".ljust(width) + "".join(title.rjust(12) for _, _, title in columns))
  for layer in layers:
    row = layer.ljust(width)
    for topic, stat, _ in columns:
      key = f"{topic}/{stat}/{layer}"
      row += f"{history[key][-1]:12.4g}" if key in history else "-".rjust(12)
    print(row)


if __name__ == "__main__":
  result = main()
  assert np.isfinite(result["loss"])
