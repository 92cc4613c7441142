"""Real runs on the embedded digits that provoke each training problem, then diagnosed.

Each case trains a short run that has one classic problem on purpose, records the usual
per-step metrics, and hands the run directory to :func:`jaxscope.diagnose.diagnose`; the
script then checks whether the expected finding is among what the rules report:

1. ``lr_too_high``: plain SGD at lr 50 on the MLP → ``divergence``;
2. ``lr_too_low``: plain SGD at lr 1e-6 → ``early_plateau`` and ``update_ratio_low``;
3. ``unshuffled``: the training set sorted by label and never shuffled, so every epoch
   walks through the classes in order (a custom loop: :func:`jaxscope.train.train`
   always shuffles), plain SGD at lr 0.05 → ``oscillation`` with a period of one epoch;
   ``unshuffled_momentum``: the same with momentum 0.9;
4. ``bad_init``: an MLP whose ReLU layers start with biases of −2, so almost every unit
   is dead from the first step (a custom loop: the model zoo has no init option; it runs
   the ``economy`` metrics, whose activation health gives ``activations/dead_fraction``)
   → ``dead_units`` and ``early_plateau``;
5. ``overfitting``: a wide MLP (512, 512) on ~100 training digits (``test_fraction``
   0.94) for 150 epochs → ``overfitting``, with the early-stopping step;
6. ``healthy``: the MLP, SGD with momentum 0.9 at lr 0.05, 5 epochs → no finding;
   ``healthy_lenet5``: the same with LeNet-5.

The runs use :func:`jaxscope.train.train` (cases 1, 2, 5, 6) or the same public
step pieces (:func:`~jaxscope.train.make_train_step`, :func:`~jaxscope.train.make_scope`,
:func:`~jaxscope.train.make_evaluate`) in a loop of its own (cases 3, 4), so every run
directory has the keys the rules read (``loss``, ``train/accuracy``, ``test/loss``,
``lr``, ``grads/norm/*`` (or the instruments' ``cockpit/grad_norm/*``),
``updates/ratio/*`` and, for case 4, ``activations/*``).

Run it with::

    python examples/diagnose_runs.py            # the documented runs (about 1 min on CPU)
    python examples/diagnose_runs.py --quick    # a smoke test (tiny runs; rules may miss)

It writes ``OUT/results/diagnoses.json`` (``--out``, default ``docs/``; with ``--quick``
and no ``--out`` a temporary directory), keeps the run directories in ``--runs`` (default
``runs/diagnose_runs``, with ``--quick`` ``OUT/runs``) and prints a markdown table:
per case the expected finding(s), whether they were found, and the summary line.
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
import dataclasses
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxscope
from jaxscope import data as jdata
from jaxscope import models as jmodels
from jaxscope import record, transforms
from jaxscope.diagnose import Finding, diagnose, findings_to_json
from jaxscope.models.base import linen_model_def
from jaxscope.record import History, Recorder
from jaxscope.train import (
  TrainConfig,
  TrainState,
  init_instruments,
  make_activation_scope,
  make_evaluate,
  make_instruments,
  make_optimizer,
  make_scope,
  make_train_step,
  train,
)

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
BATCH = 64
METRICS = "norm,ratio"  # params/grads/updates norms and ratios: what the rules need
BAD_BIAS = -2.0


@dataclasses.dataclass(frozen=True)
class Case:
  """One provoked problem: how it is trained and what the rules should say."""

  name: str
  problem: str
  setup: str
  expected: tuple[str, ...]
  """Finding names that should all be reported (empty: a healthy run, no finding)."""
  run: Callable[[Path, bool], dict[str, Any]]
  """``run(run_dir, quick) -> info`` trains the run into ``run_dir``."""


# --------------------------------------------------------------------------- runs


def _train(run_dir: Path, **fields: Any) -> dict[str, Any]:
  """A :func:`jaxscope.train.train` run with the example's common settings."""
  config = TrainConfig(
    dataset="digits",
    batch_size=BATCH,
    metrics=METRICS,
    checkpoint_every=0,
    out=str(run_dir),
    quiet=True,
    seed=SEED,
  )
  if "live_diagnosis" in {f.name for f in dataclasses.fields(TrainConfig)}:
    fields.setdefault("live_diagnosis", False)  # diagnosed once, at the end
  result = train(config, **fields)
  return {
    "steps": result.steps,
    "steps_per_epoch": History.load(run_dir).config.get("steps_per_epoch"),
    "final_eval": result.final_eval,
  }


class BiasedMLP(nn.Module):
  """The zoo's MLP (flatten → [Dense → ReLU]* → Dense, layers ``fc1 …``, ``out``) with
  every hidden bias initialised to ``bias``."""

  hidden_sizes: Sequence[int] = (128, 64)
  num_outputs: int = 10
  bias: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    init = nn.initializers.constant(self.bias)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, bias_init=init, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_outputs, name="out")(x)


def _loop(
  run_dir: Path,
  model: jmodels.ModelDef,
  ds: jdata.Dataset,
  order: np.ndarray,
  *,
  steps: int,
  lr: float,
  optimizer: str,
  metrics: str,
  config: dict[str, Any],
) -> dict[str, Any]:
  """A training loop of its own over a fixed data ``order`` (the same every epoch).

  It uses :mod:`jaxscope.train`'s public pieces, so the run directory has the same keys
  as one of :func:`~jaxscope.train.train`: the loss and accuracy of every step, ``lr``, the
  scope's per-layer metrics, the instruments' and activation-health values with the
  ``economy`` preset, and ``test/loss``/``test/accuracy`` at step 0 and every epoch.
  """
  schedule = optax.constant_schedule(lr)
  sc = make_scope(metrics)
  tx = make_optimizer(optimizer, schedule)
  if sc is not None:
    tx = transforms.monitored(tx, sc)
  inst = make_instruments(metrics, seed=SEED)
  act = make_activation_scope() if inst is not None else None
  spe = len(order) // BATCH
  x_all, y_all = jax.device_put(ds.train_x), jax.device_put(ds.train_y)
  params = model.init(jax.random.key(SEED), jnp.asarray(ds.train_x[:1]))["params"]
  istate: Any = ()
  if inst is not None:
    shapes = tuple(
      jax.ShapeDtypeStruct((BATCH, *a.shape[1:]), a.dtype) for a in (ds.train_x, ds.train_y)
    )
    istate = init_instruments(model, inst, params, {}, *shapes, activation_scope=act)
  state = TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params), istate)
  step_fn = jax.jit(
    make_train_step(
      model,
      tx,
      schedule=schedule,
      seed=SEED,
      monitored=sc is not None,
      instruments=inst,
      activation_scope=act,
      learning_rate=lr,
    ),
    static_argnames=("measure", "phase"),
  )
  evaluate = make_evaluate(model, ds.test_x, ds.test_y)
  full = {
    **config,
    "optimizer": optimizer,
    "lr": lr,
    "batch_size": BATCH,
    "metrics": metrics,
    "seed": SEED,
    "steps_per_epoch": spe,
    "total_steps": steps,
    "shuffle": False,
  }
  with Recorder(run_dir, config=full) as rec:
    values = evaluate(state.params, state.model_state)
    rec.write(0, values)
    for step in range(steps):
      i = step % spe
      idx = jnp.asarray(order[i * BATCH : (i + 1) * BATCH])
      state, values = step_fn(state, x_all[idx], y_all[idx], measure=True)
      if step == 0:  # α of "the update before" does not exist yet (as train drops it).
        values = {k: v for k, v in values.items() if k != "alpha"}
      rec.write(step, values)
      if (step + 1) % spe == 0 or step + 1 == steps:
        values = evaluate(state.params, state.model_state)
        rec.write(step + 1, values)
  return {
    "steps": steps,
    "steps_per_epoch": spe,
    "final_eval": {k: float(v) for k, v in values.items()},
  }


def run_lr_too_high(run_dir: Path, quick: bool) -> dict[str, Any]:
  return _train(run_dir, model="mlp", optimizer="sgd", lr=50.0, steps=30 if quick else 100)


def run_lr_too_low(run_dir: Path, quick: bool) -> dict[str, Any]:
  return _train(run_dir, model="mlp", optimizer="sgd", lr=1e-6, steps=40 if quick else 200)


def _unshuffled(run_dir: Path, quick: bool, optimizer: str) -> dict[str, Any]:
  ds = jdata.load("digits")
  order = np.argsort(ds.train_y, kind="stable")  # class 0 first, then 1, … every epoch
  model = jmodels.build("mlp", tuple(ds.train_x.shape[1:]), ds.num_classes)
  spe = len(order) // BATCH
  return _loop(
    run_dir, model, ds, order, steps=(2 if quick else 10) * spe, lr=0.05, optimizer=optimizer,
    metrics=METRICS,
    config={"model": "mlp", "dataset": "digits", "order": "sorted by label, no shuffling"},
  )  # fmt: skip


def run_unshuffled(run_dir: Path, quick: bool) -> dict[str, Any]:
  return _unshuffled(run_dir, quick, "sgd")


def run_unshuffled_momentum(run_dir: Path, quick: bool) -> dict[str, Any]:
  return _unshuffled(run_dir, quick, "momentum")


def run_bad_init(run_dir: Path, quick: bool) -> dict[str, Any]:
  ds = jdata.load("digits")
  shape = tuple(ds.train_x.shape[1:])
  module = BiasedMLP(num_outputs=ds.num_classes, bias=BAD_BIAS)
  model = linen_model_def(
    "biased_mlp", module, shape, ds.num_classes, has_batch_stats=False, has_dropout=False
  )
  order = np.random.default_rng(SEED).permutation(len(ds.train_x))
  return _loop(
    run_dir, model, ds, order, steps=20 if quick else 150, lr=0.05, optimizer="momentum",
    metrics="economy",
    config={"model": f"mlp, hidden biases {BAD_BIAS:g}", "dataset": "digits"},
  )  # fmt: skip


def run_overfitting(run_dir: Path, quick: bool) -> dict[str, Any]:
  return _train(
    run_dir,
    model="mlp",
    model_args={"hidden_sizes": [512, 512]},
    data_args={"test_fraction": 0.94},
    batch_size=32,
    optimizer="momentum",
    lr=0.05,
    steps=60 if quick else 450,
    eval_every=5 if quick else 15,
  )


def run_healthy(run_dir: Path, quick: bool) -> dict[str, Any]:
  return _train(run_dir, model="mlp", optimizer="momentum", lr=0.05, epochs=2 if quick else 5)


def run_healthy_lenet5(run_dir: Path, quick: bool) -> dict[str, Any]:
  return _train(run_dir, model="lenet5", optimizer="momentum", lr=0.05, epochs=2 if quick else 5)


CASES: tuple[Case, ...] = (
  Case(
    "lr_too_high", "learning rate far too high", "mlp, SGD lr 50, 100 steps",
    ("divergence",), run_lr_too_high,
  ),
  Case(
    "lr_too_low", "learning rate far too low", "mlp, SGD lr 1e-6, 200 steps",
    ("early_plateau", "update_ratio_low"), run_lr_too_low,
  ),
  Case(
    "unshuffled", "data sorted by label, never shuffled",
    "mlp, SGD lr 0.05, label-sorted digits in a fixed order, 10 epochs",
    ("oscillation",), run_unshuffled,
  ),
  Case(
    "unshuffled_momentum", "data sorted by label, never shuffled",
    "as unshuffled, with momentum 0.9",
    ("oscillation",), run_unshuffled_momentum,
  ),
  Case(
    "bad_init", "bad initialisation (dead ReLUs)",
    f"mlp with hidden biases {BAD_BIAS:g}, momentum lr 0.05, 150 steps, economy metrics",
    ("dead_units", "early_plateau"), run_bad_init,
  ),
  Case(
    "overfitting", "large model, few examples",
    "mlp (512, 512) on ~100 digits (test_fraction 0.94), momentum lr 0.05, batch 32, "
    "450 steps (150 epochs)",
    ("overfitting",), run_overfitting,
  ),
  Case(
    "healthy", "well-tuned run", "mlp, momentum 0.9 lr 0.05, 5 epochs",
    (), run_healthy,
  ),
  Case(
    "healthy_lenet5", "well-tuned run", "lenet5, momentum 0.9 lr 0.05, 5 epochs",
    (), run_healthy_lenet5,
  ),
)  # fmt: skip


# --------------------------------------------------------------------------- report


def judge(case: Case, findings: Sequence[Finding], info: dict[str, Any]) -> dict[str, Any]:
  """Whether the expected findings are there, and the checks specific to a case."""
  names = [f.name for f in findings]
  found = [n for n in case.expected if n in names]
  missed = [n for n in case.expected if n not in names]
  if not case.expected:
    status = "healthy" if not findings else "false alarm"
  elif not missed:
    status = "found"
  else:
    status = "partly found" if found else "missed"
  extra = [n for n in names if n not in case.expected]
  by_name = {f.name: f for f in reversed(findings)}  # the first finding of each name
  key = next((by_name[n] for n in case.expected if n in by_name), findings[0] if findings else None)
  out: dict[str, Any] = {
    "status": status,
    "found": found,
    "missed": missed,
    "other_findings": extra,
    "summary": key.summary if key is not None else "No problem found.",
  }
  osc = next((f for f in findings if f.name == "oscillation"), None)
  if case.name == "unshuffled" and osc is not None:
    period = float(osc.evidence["values"]["period_steps"])
    spe = int(info["steps_per_epoch"])
    out["period_steps"] = period
    out["period_over_steps_per_epoch"] = period / spe
  over = next((f for f in findings if f.name == "overfitting"), None)
  if over is not None:
    out["early_stopping_step"] = int(over.evidence["values"]["best_step"])
  return out


def _number(x: float) -> float | str:
  """A float for strict JSON: non-finite values as the strings "nan", "inf", "-inf"."""
  x = float(x)
  if np.isnan(x):
    return "nan"
  if np.isinf(x):
    return "inf" if x > 0 else "-inf"
  return x


def table(results: dict[str, dict[str, Any]]) -> str:
  """The markdown table: expected vs found per case, with the key summary line."""
  lines = [
    "| case | setup | expected | result | other findings | summary |",
    "|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    expected = ", ".join(r["expected"]) or "(none)"
    other = ", ".join(r["other_findings"]) or "–"
    summary = r["summary"].replace("|", "\\|")
    lines.append(f"| {name} | {r['setup']} | {expected} | {r['status']} | {other} | {summary} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny runs (a smoke test)")
  parser.add_argument(
    "--out",
    default=None,
    help="writes OUT/results/diagnoses.json (default docs/; with --quick a temporary directory)",
  )
  parser.add_argument(
    "--runs",
    default=None,
    help="directory of the run directories (default runs/diagnose_runs; with --quick OUT/runs)",
  )
  parser.add_argument(
    "--cases",
    default=",".join(c.name for c in CASES),
    help="comma list of the cases to run (default: all)",
  )
  args = parser.parse_args(argv)
  wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = sorted(set(wanted) - {c.name for c in CASES})
  if unknown:
    parser.error(f"unknown case(s) {unknown}; cases: {', '.join(c.name for c in CASES)}")
  if args.out is not None:
    out = Path(args.out)
  elif args.quick:
    out = Path(tempfile.mkdtemp(prefix="diagnose_runs_"))
  else:
    out = ROOT / "docs"
  if args.runs is not None:
    runs = Path(args.runs)
  else:
    runs = out / "runs" if args.quick else ROOT / "runs" / "diagnose_runs"
  runs.mkdir(parents=True, exist_ok=True)

  t_total = time.perf_counter()
  results: dict[str, dict[str, Any]] = {}
  for case in CASES:
    if case.name not in wanted:
      continue
    run_dir = runs / case.name
    if run_dir.exists():  # A fresh run (train refuses to overwrite, Recorder would append).
      shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    info = case.run(run_dir, args.quick)
    seconds = time.perf_counter() - t0
    findings = diagnose(run_dir)
    verdict = judge(case, findings, info)
    results[case.name] = {
      "problem": case.problem,
      "setup": case.setup,
      "expected": list(case.expected),
      **verdict,
      "findings": findings_to_json(findings),
      "steps": info["steps"],
      "steps_per_epoch": info["steps_per_epoch"],
      "final_eval": {k: _number(v) for k, v in info["final_eval"].items()},
      "seconds": round(seconds, 2),
      "run_dir": str(run_dir),
    }
    got = ", ".join(f.name for f in findings) or "no finding"
    print(f"{case.name}: {verdict['status']} ({got}) in {seconds:.1f} s", flush=True)

  print()
  if args.quick:
    print("--quick: every run is shortened (see `steps` in the JSON); the findings differ from")
    print("the documented runs'.\n")
  md = table(results)
  print(md)
  total = time.perf_counter() - t_total
  print(f"\n{len(results)} cases in {total:.1f} s; runs in {runs}")
  report = {
    "config": {
      "quick": args.quick,
      "seed": SEED,
      "batch_size": BATCH,
      "metrics": METRICS,
      "cases": [c.name for c in CASES if c.name in wanted],
      "command": "python examples/diagnose_runs.py" + (" --quick" if args.quick else ""),
      "seconds": round(total, 1),
      "versions": {"jaxscope": jaxscope.__version__, "jax": jax.__version__},
      "platform": f"{platform.system()} {platform.machine()}, {jax.default_backend()}",
    },
    "results": results,
    "table": md,
  }
  path = out / "results" / "diagnoses.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(record.dumps(report, indent=2) + "\n")
  print(f"wrote {path}")
  return report


if __name__ == "__main__":
  main()
