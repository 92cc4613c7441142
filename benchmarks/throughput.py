"""Training throughput of the reference loop with and without jaxscope metrics.

Run from the repository root::

    .venv/bin/python benchmarks/throughput.py
    .venv/bin/python benchmarks/throughput.py --problems digits --chunks 30

For each problem it builds the train step of :mod:`jaxscope.train` twice, as
``jaxscope train`` runs it: ``none`` (no per-layer metrics; loss, batch accuracy and
learning rate recorded) and ``economy`` (+ norm, mean, variance of params, grads and
updates and the update/weight ratios, every step). Each variant runs the loop's real
work per step: gather the batch on the device, the jitted step (state donated), and
``Recorder.write`` of the step's values into ``metrics.jsonl`` in a temporary
directory, so the cost of moving the metrics to the host and writing them is
included.

The variants are timed interleaved in one process, in chunks of ``--chunk-steps``
steps (the order rotated each round) after a warm-up; the throughput of a chunk is
``steps · batch_size / seconds``. The report gives the median examples per second of
each variant and the ratio ``economy / none``, as a table and as JSON (``--out``).

Problems:

* ``digits``: the default of ``jaxscope train`` and ``make demo``: LeNet-5 on the
  embedded digits (8×8×1, 1437 training images), batch 64, SGD with momentum 0.9.
* ``mnist_mlp``: DeepOBS's mnist_mlp (784-1000-500-100-10, 1,336,610 parameters) on
  random 28×28×1 images, batch 128, SGD with momentum 0.9.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxscope import data, models, record, transforms  # noqa: E402
from jaxscope.record import Recorder  # noqa: E402
from jaxscope.train import (  # noqa: E402
  TrainState,
  make_optimizer,
  make_schedule,
  make_scope,
  make_train_step,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput-cpu.json"
VARIANTS = ("none", "economy")


def _problem(name: str) -> tuple[str, np.ndarray, np.ndarray, int, int]:
  """``(model, train_x, train_y, num_classes, batch_size)`` of a problem."""
  if name == "digits":
    ds = data.load("digits")
    return "lenet5", ds.train_x, ds.train_y, ds.num_classes, 64
  if name == "mnist_mlp":
    rng = np.random.default_rng(0)
    x = rng.random((6000, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 6000).astype(np.int32)
    return "mnist_mlp", x, y, 10, 128
  raise ValueError(f"unknown problem {name!r}: digits or mnist_mlp.")


class _Loop:
  """One variant's training loop, advanced a chunk of steps at a time."""

  def __init__(self, problem: str, variant: str, run_dir: Path) -> None:
    model_name, x, y, classes, bs = _problem(problem)
    self.batch_size = bs
    model = models.build(model_name, tuple(x.shape[1:]), classes)
    steps_per_epoch = len(x) // bs
    schedule = make_schedule("constant", 0.01, steps_per_epoch=steps_per_epoch, total_steps=1)
    tx = make_optimizer("momentum", schedule)
    sc = make_scope(variant)
    if sc is not None:
      tx = transforms.monitored(tx, sc)
    variables = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    params = variables["params"]
    state = TrainState(
      jnp.zeros((), jnp.int32),
      params,
      {k: v for k, v in variables.items() if k != "params"},
      tx.init(params),
    )
    self.state = state
    self.step_fn = jax.jit(
      make_train_step(model, tx, schedule=schedule, monitored=sc is not None),
      static_argnames="measure",
      donate_argnums=0,
    )
    self.monitored = sc is not None
    self.train_x, self.train_y = jax.device_put(x), jax.device_put(y)
    self.gather = jax.jit(lambda idx: (self.train_x[idx], self.train_y[idx]))
    self.order = np.random.default_rng(0).permutation(len(x)).astype(np.int32)
    self.steps_per_epoch = steps_per_epoch
    self.recorder = Recorder(run_dir)
    self.step = 0

  def run(self, n: int) -> float:
    """Runs ``n`` steps; returns the wall time in seconds (all work finished)."""
    t0 = time.perf_counter()
    for _ in range(n):
      i = self.step % self.steps_per_epoch
      idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
      x, y = self.gather(idx)
      self.state, values = self.step_fn(self.state, x, y, measure=self.monitored)
      self.recorder.write(self.step, values)
      self.step += 1
    self.recorder.flush()
    jax.block_until_ready(self.state)
    return time.perf_counter() - t0


def run(problem_names: list[str], chunks: int, chunk_steps: int) -> dict[str, Any]:
  """Times the variants interleaved; returns the JSON-ready report."""
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    for problem in problem_names:
      loops = {v: _Loop(problem, v, Path(tmp) / f"{problem}-{v}") for v in VARIANTS}
      for loop in loops.values():
        loop.run(chunk_steps)  # compile and warm up
      times: dict[str, list[float]] = {v: [] for v in VARIANTS}
      for r in range(chunks):
        order = VARIANTS[r % 2 :] + VARIANTS[: r % 2]
        for v in order:
          times[v].append(loops[v].run(chunk_steps))
      bs = loops["none"].batch_size
      eps = {v: chunk_steps * bs / np.asarray(t) for v, t in times.items()}
      med = {v: float(np.median(e)) for v, e in eps.items()}
      for loop in loops.values():
        loop.recorder.close()
        loss = float(
          loop.step_fn(loop.state, *loop.gather(loop.order[:bs]), measure=False)[1]["loss"]
        )
        if not np.isfinite(loss):
          raise RuntimeError(f"{problem}: training diverged during the benchmark.")
      rec = {
        "problem": problem,
        "batch_size": bs,
        "none_examples_per_s": med["none"],
        "economy_examples_per_s": med["economy"],
        "none_ms_per_step": 1e3 * bs / med["none"],
        "economy_ms_per_step": 1e3 * bs / med["economy"],
        "ratio": med["economy"] / med["none"],
        "iqr_examples_per_s": {
          v: float(np.subtract(*np.percentile(e, [75, 25]))) for v, e in eps.items()
        },
      }
      records.append(rec)
      print(
        f"{problem:10s} batch {bs:4d}: none {med['none']:9.0f} ex/s, economy "
        f"{med['economy']:9.0f} ex/s, economy/none {rec['ratio']:.3f}"
      )
  return {
    "benchmark": "throughput",
    "device": str(jax.devices()[0]),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "chunks": chunks,
    "chunk_steps": chunk_steps,
    "records": records,
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--problems", default="digits,mnist_mlp")
  p.add_argument("--chunks", type=int, default=20, help="timed chunks per variant")
  p.add_argument("--chunk-steps", type=int, default=20, help="steps per chunk")
  p.add_argument("--out", default=str(DEFAULT_OUT))
  args = p.parse_args(argv)
  report = run(args.problems.split(","), args.chunks, args.chunk_steps)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(record.dumps(report, indent=2) + "\n")
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
