"""A scanned transformer LM learns Shakespeare: per-layer ratios and attention logits.

The zoo's ``transformer_lm`` with its blocks stacked by ``nn.scan`` (one module
``blocks`` whose leaves have a leading layer axis) is trained on the byte-level
``shakespeare`` corpus with Adam (linear warm-up, cosine decay), and watched per layer:

* the ``economy`` scope (or ``--preset full``) split along the stack
  (``stacked={"^blocks/": 0}``, read from the model's logical axes by
  :func:`jaxscope.train.measure.stacked_of`), so every block has its own series:
  ``updates/ratio/blocks/2/attn/query/kernel`` is ``‖Δθ‖/‖θ‖`` of block 2's query kernel;
* the growth of the attention logits per block: each block sows
  ``max |q_i·k_j/√d_head|`` (over the batch, heads and unmasked pairs) into Flax's
  ``intermediates``; the train step does not return that collection, so one extra jitted
  forward pass per measured step reads it (on the step's batch and parameters) and
  records it as ``attention/logit_max/blocks/{i}/attn``;
* the test split's cross-entropy in bits per character (``test/bits_per_token``; a
  uniform guess over the 256 bytes is 8 bits).

The loop is built from :mod:`jaxscope.train`'s public pieces (:func:`make_scope`,
:func:`make_train_step`, :func:`make_evaluate`) and a :class:`~jaxscope.record.Recorder`,
so the run directory has the keys of a ``jaxscope train`` run plus the attention logits;
it is then diagnosed (:func:`jaxscope.diagnose.diagnose`) and drawn:

* ``transformer_lm_updates_ratio_stack.png``: step × layer heat maps of the update/weight
  ratio of each kernel of the block (:func:`jaxscope.plot.stack_figure`);
* ``transformer_lm_attn_logit_max_stack.png``: the same for the attention-logit maximum;
* ``transformer_lm_curves.png``: training loss and test bits per character, and the
  attention-logit maximum of each block over the steps;
* ``transformer_lm_diagnosis.png``: the series behind each finding
  (:func:`jaxscope.plot.diagnosis_figure`).

Run it with::

    python examples/transformer_lm.py            # 4 blocks, d_model 64, 300 steps (~2 min on CPU)
    python examples/transformer_lm.py --quick    # a smoke test (a few steps of a tiny model)
    python examples/transformer_lm.py --param-dtype bfloat16   # bf16 parameters: lost updates

It writes the run to ``--run-dir`` (default ``runs/transformer_lm``; with ``--quick``
``OUT/run``), ``OUT/results/transformer_lm.json`` and ``OUT/figures/transformer_lm_*.png``
(``--out``, default ``docs/``; with ``--quick`` and no ``--out`` a temporary directory),
and prints a summary: the final bits per character, which blocks move fastest, how the
attention logits grew, and the diagnoses.
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
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

import jaxscope
from jaxscope import data, models, plot, record, transforms
from jaxscope.diagnose import diagnose, findings_to_json, report
from jaxscope.record import History, Recorder
from jaxscope.train import TrainState, make_evaluate, make_scope, make_train_step
from jaxscope.train.measure import stacked_of

ROOT = Path(__file__).resolve().parents[1]
#: The block's kernels, as the scope names them below ``blocks/{i}/``.
KERNELS = (
  "attn/query/kernel",
  "attn/key/kernel",
  "attn/value/kernel",
  "attn/out/kernel",
  "fc1/kernel",
  "fc2/kernel",
)
LOGIT_KEY = "attention/logit_max/blocks/{i}/attn"
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- the run


def attention_logit_max(model: models.ModelDef) -> Callable[[Any, jax.Array], jax.Array]:
  """A jitted ``(params, x) -> [L]``: each block's ``max |a_ij|`` on the batch ``x``.

  The blocks sow it into the ``intermediates`` collection, which
  :attr:`~jaxscope.models.ModelDef.apply` does not return; the Linen module's own
  ``apply`` with ``mutable=["intermediates"]`` does. A scanned stack sows one ``[L]``
  array (``intermediates/blocks/attn/attn_logit_max``), an unrolled one a scalar per
  ``blocks_{i}``.
  """

  def logit_max(params: Any, x: jax.Array) -> jax.Array:
    _, inter = model.module.apply({"params": params}, x, train=False, mutable=["intermediates"])
    inter = inter["intermediates"]
    if "blocks" in inter:
      return jnp.asarray(inter["blocks"]["attn"]["attn_logit_max"][0], jnp.float32)
    n = len([k for k in inter if k.startswith("blocks_")])
    values = [inter[f"blocks_{i}"]["attn"]["attn_logit_max"][0] for i in range(n)]
    return jnp.stack(values).astype(jnp.float32)

  return jax.jit(logit_max)


def train_run(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
  """Trains the scanned LM into ``run_dir``; returns what the summary needs."""
  ds = data.load(
    "shakespeare", seq_len=args.seq_len, num_train=args.num_train, num_test=args.num_test
  )
  model = models.build(
    "transformer_lm",
    (args.seq_len,),
    ds.num_classes,
    d_model=args.d_model,
    num_heads=args.heads,
    n_layers=args.layers,
    scan=True,
    dtype=args.dtype,
    param_dtype=args.param_dtype,
  )
  stacked = stacked_of(model)  # {"^blocks/": 0}: the scanned leaves, split per block
  low_precision = jnp.dtype(args.param_dtype).itemsize < 4
  sc = make_scope(args.preset, stacked=stacked, low_precision=low_precision)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, args.lr, warmup_steps=max(1, args.steps // 10), decay_steps=args.steps
  )
  tx = transforms.monitored(optax.adam(schedule), sc)
  step_fn = jax.jit(
    make_train_step(model, tx, schedule=schedule, seed=args.seed, monitored=True),
    static_argnames=("measure", "phase"),
    donate_argnums=0,
  )
  evaluate = make_evaluate(model, ds.test_x, ds.test_y, batch_size=256)
  logit_max = attention_logit_max(model)
  x_all, y_all = jax.device_put(ds.train_x), jax.device_put(ds.train_y)
  params = model.init(jax.random.key(args.seed), jnp.asarray(ds.train_x[:1]))["params"]
  state = TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params), ())
  spe = len(ds.train_x) // args.batch_size
  config = {
    "model": "transformer_lm",
    "model_args": {
      "d_model": args.d_model,
      "num_heads": args.heads,
      "n_layers": args.layers,
      "scan": True,
      "dtype": args.dtype,
      "param_dtype": args.param_dtype,
    },
    "dataset": "shakespeare",
    "data_args": {"seq_len": args.seq_len, "num_train": args.num_train, "num_test": args.num_test},
    "optimizer": "adam",
    "lr": args.lr,
    "schedule": "warmup_cosine",
    "batch_size": args.batch_size,
    "steps": args.steps,
    "steps_per_epoch": spe,
    "total_steps": args.steps,
    "metrics": args.preset,
    "every": args.every,
    "stacked": stacked,
    "param_dtype": args.param_dtype,
    "seed": args.seed,
  }
  rng = np.random.default_rng(args.seed)
  order = rng.permutation(len(ds.train_x))
  t0 = time.perf_counter()
  with Recorder(run_dir, config=config) as rec:
    rec.write(0, evaluate(state.params, {}))
    for step in range(args.steps):
      epoch, i = divmod(step, spe)
      if i == 0 and epoch > 0:
        order = rng.permutation(len(ds.train_x))
      idx = jnp.asarray(order[i * args.batch_size : (i + 1) * args.batch_size])
      x, y = x_all[idx], y_all[idx]
      measure = step % args.every == 0
      logits_max = logit_max(state.params, x) if measure else None  # θ_k, before the step
      state, values = step_fn(state, x, y, measure=measure)
      if logits_max is not None:
        values = {**values, **{LOGIT_KEY.format(i=j): v for j, v in enumerate(logits_max)}}
      rec.write(step, values)
      if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
        rec.write(step + 1, evaluate(state.params, {}))
  return {"seconds": time.perf_counter() - t0, "parameters": models.count_params(params)}


# --------------------------------------------------------------------------- summary


def _tail_median(history: History, key: str, fraction: float = 0.5) -> float:
  """Median of the finite values of ``key`` over the last ``fraction`` of its steps."""
  steps, values = history.series(key)
  values = np.asarray(values, np.float64)
  tail = values[steps >= steps[0] + (1 - fraction) * (steps[-1] - steps[0])]
  tail = tail[np.isfinite(tail)]
  return float(np.median(tail)) if tail.size else float("nan")


def layer_ratios(history: History, n_layers: int) -> dict[str, Any]:
  """Per block and kernel, the median update/weight ratio over the second half of the run;
  per block the geometric mean over its kernels, and the blocks ranked by it."""
  table = {
    name: [_tail_median(history, f"updates/ratio/blocks/{i}/{name}") for i in range(n_layers)]
    for name in KERNELS
  }
  per_layer = [
    float(np.exp(np.mean([np.log(table[name][i]) for name in KERNELS]))) for i in range(n_layers)
  ]
  return {
    "median_ratio_second_half": table,
    "geometric_mean_per_layer": per_layer,
    "fastest_per_kernel": {name: int(np.nanargmax(v)) for name, v in table.items()},
    "layers_fastest_first": [int(i) for i in np.argsort(per_layer)[::-1]],
  }


def logit_growth(history: History, n_layers: int) -> dict[str, Any]:
  """Per block, the attention-logit maximum at the first and last measured step, their
  ratio, and the largest value seen."""
  first, last, peak = [], [], []
  for i in range(n_layers):
    values = np.asarray(history[LOGIT_KEY.format(i=i)], np.float64)
    first.append(float(values[0]))
    last.append(float(values[-1]))
    peak.append(float(np.nanmax(values)))
  return {
    "first": first,
    "last": last,
    "max": peak,
    "growth": [b / a if a > 0 else float("nan") for a, b in zip(first, last, strict=True)],
  }


def evaluation(history: History) -> dict[str, float]:
  """The first and last test evaluation: bits per character, perplexity, accuracy."""
  out = {}
  for key in ("test/bits_per_token", "test/perplexity", "test/accuracy", "test/loss"):
    values = history[key]
    out[f"initial_{key.split('/')[1]}"] = float(values[0])
    out[f"final_{key.split('/')[1]}"] = float(values[-1])
  return out


# --------------------------------------------------------------------------- figures


def curves_figure(history: History, n_layers: int) -> Figure:
  """Training loss and test bits per character; the attention-logit maximum per block."""
  fig = Figure(figsize=(11, 3.8), layout="constrained")
  ax = fig.add_subplot(1, 2, 1)
  steps, loss = history.series("loss")
  ax.plot(steps, np.asarray(loss) / LN2, color="0.6", lw=0.8, label="train (batch)")
  window = max(1, len(loss) // 20)
  if window > 1:
    smooth = np.convolve(np.asarray(loss) / LN2, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, color="C0", label=f"train (mean of {window})")
  ts, bits = history.series("test/bits_per_token")
  ax.plot(ts, bits, "o-", color="C3", label="test")
  ax.axhline(8.0, color="k", ls=":", lw=0.8, label="uniform (8 bits)")
  ax.set_xlabel("step")
  ax.set_ylabel("bits per character")
  ax.set_title("cross-entropy")
  ax.legend(fontsize="small")
  ax = fig.add_subplot(1, 2, 2)
  for i in range(n_layers):
    s, v = history.series(LOGIT_KEY.format(i=i))
    ax.plot(s, v, color=f"C{i % 10}", label=f"block {i}")
  ax.set_xlabel("step")
  ax.set_ylabel("max |q·k/√d_head|")
  ax.set_title("attention-logit maximum per block")
  ax.legend(fontsize="small")
  return fig


def draw(
  history: History, findings: Sequence[Any], n_layers: int, figdir: Path, dpi: int = 110
) -> list[Path]:
  """Writes the example's figures into ``figdir``; returns their paths."""
  figdir.mkdir(parents=True, exist_ok=True)
  figures = {
    "updates_ratio_stack": plot.stack_figure(
      history, "updates", "ratio", families=[f"blocks/*/{k}" for k in KERNELS]
    ),
    "attn_logit_max_stack": plot.stack_figure(history, "attention", "logit_max"),
    "curves": curves_figure(history, n_layers),
    "diagnosis": plot.diagnosis_figure(history, findings),
  }
  paths = []
  for name, fig in figures.items():
    path = figdir / f"transformer_lm_{name}.png"
    fig.savefig(path, dpi=dpi)
    paths.append(path)
  return paths


def summary(result: dict[str, Any]) -> str:
  """The printed summary of a run."""
  ev, lay, lg = result["evaluation"], result["layers"], result["logits"]
  lines = [
    f"test: {ev['initial_bits_per_token']:.2f} → {ev['final_bits_per_token']:.2f} bits per "
    f"character (perplexity {ev['final_perplexity']:.1f}, next-byte accuracy "
    f"{100 * ev['final_accuracy']:.1f} %)",
    "",
    "median update/weight ratio over the second half, per block:",
    "| kernel | "
    + " | ".join(f"block {i}" for i in range(len(lay["geometric_mean_per_layer"])))
    + " | fastest |",
    "|---|" + "---|" * (len(lay["geometric_mean_per_layer"]) + 1),
  ]
  for name, row in lay["median_ratio_second_half"].items():
    cells = " | ".join(f"{v:.2e}" for v in row)
    lines.append(f"| {name} | {cells} | {lay['fastest_per_kernel'][name]} |")
  cells = " | ".join(f"{v:.2e}" for v in lay["geometric_mean_per_layer"])
  fastest = lay["layers_fastest_first"]
  lines.append(f"| geometric mean | {cells} | {fastest[0]} |")
  lines.append(f"blocks, fastest first: {fastest}")
  lines.append("")
  lines.append("attention-logit maximum per block (first → last measured step, growth):")
  for i, (a, b, g) in enumerate(zip(lg["first"], lg["last"], lg["growth"], strict=True)):
    lines.append(f"  block {i}: {a:.2f} → {b:.2f} (×{g:.2f}; max {lg['max'][i]:.2f})")
  return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="a smoke test: a tiny model, a few steps")
  p.add_argument("--out", default=None, help="writes OUT/results and OUT/figures (default docs/)")
  p.add_argument("--run-dir", default=None, help="the run directory (default runs/transformer_lm)")
  p.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
  p.add_argument("--layers", type=int, default=None, help="blocks (default 4)")
  p.add_argument("--d-model", type=int, default=None, help="width (default 64)")
  p.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
  p.add_argument("--seq-len", type=int, default=None, help="bytes per window (default 64)")
  p.add_argument("--batch-size", type=int, default=None, help="windows per batch (default 32)")
  p.add_argument("--lr", type=float, default=3e-3, help="Adam's peak learning rate")
  p.add_argument("--every", type=int, default=None, help="measure every n-th step (default 5)")
  p.add_argument("--eval-every", type=int, default=None, help="test evaluation (default 50)")
  p.add_argument("--preset", choices=["economy", "full"], default="economy")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute")
  p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--seed", type=int, default=0)
  return p


#: The defaults of the documented run and of ``--quick``.
DEFAULTS = {
  "steps": (300, 6),
  "layers": (4, 2),
  "d_model": (64, 32),
  "heads": (4, 2),
  "seq_len": (64, 32),
  "batch_size": (32, 8),
  "every": (5, 1),
  "eval_every": (50, 3),
  "num_train": (None, 64),
  "num_test": (256, 32),
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = _parser()
  given = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(given)
  for name, (full, quick) in DEFAULTS.items():
    if getattr(args, name, None) is None:
      setattr(args, name, quick if args.quick else full)
  for name in ("steps", "layers", "d_model", "heads", "seq_len", "batch_size", "every"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
  if args.eval_every < 1:
    parser.error(f"--eval-every must be >= 1, got {args.eval_every}.")
  if args.layers < 2:
    parser.error("--layers: a stack needs at least 2 blocks.")
  if args.d_model % args.heads:
    parser.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}.")
  if args.out is not None:
    out = Path(args.out)
  elif args.quick:
    out = Path(tempfile.mkdtemp(prefix="transformer_lm_"))
  else:
    out = ROOT / "docs"
  if args.run_dir is not None:
    run_dir = Path(args.run_dir)
  else:
    run_dir = out / "run" if args.quick else ROOT / "runs" / "transformer_lm"
  if run_dir.exists():  # A fresh run (the Recorder would append).
    shutil.rmtree(run_dir)

  t0 = time.perf_counter()
  info = train_run(run_dir, args)
  history = History.load(run_dir)
  findings = diagnose(history)
  result = {
    "evaluation": evaluation(history),
    "layers": layer_ratios(history, args.layers),
    "logits": logit_growth(history, args.layers),
  }
  paths = draw(history, findings, args.layers, out / "figures", dpi=80 if args.quick else 110)
  total = time.perf_counter() - t0

  print(summary(result))
  print()
  print(report(findings) if findings else "diagnosis: no problem found.")
  report_json = {
    "config": {
      **{k: v for k, v in vars(args).items() if k not in ("out", "run_dir")},
      "command": " ".join(["python examples/transformer_lm.py", *given]),
      "parameters": info["parameters"],
      "train_seconds": round(info["seconds"], 1),
      "seconds": round(total, 1),
      "versions": {"jaxscope": jaxscope.__version__, "jax": jax.__version__},
      "platform": f"{platform.system()} {platform.machine()}, {jax.default_backend()}",
      "run_dir": str(run_dir),
    },
    **result,
    "findings": findings_to_json(findings),
    "figures": [str(p) for p in paths],
  }
  path = out / "results" / "transformer_lm.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(record.dumps(report_json, indent=2) + "\n")
  print(f"\n{info['parameters']:,} parameters, {args.steps} steps in {info['seconds']:.0f} s "
        f"(total {total:.0f} s); wrote {path}, {len(paths)} figures in {out / 'figures'}, "
        f"the run in {run_dir}")  # fmt: skip
  return report_json


if __name__ == "__main__":
  main()
