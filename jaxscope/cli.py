"""The ``jaxscope`` command line.

Sub-commands::

    jaxscope train [flags]          train a zoo model on a dataset, writing a run directory
    jaxscope plot RUN [--out DIR]   render every recorded metric of RUN to PNG
    jaxscope list-metrics           metric names (built-in and plugins) and presets
    jaxscope list-models            the model zoo
    jaxscope list-datasets          the datasets (embedded or from --data-dir)

``jaxscope train --help`` lists the training flags; they mirror the fields of
:class:`jaxscope.train.TrainConfig`. Exit status: 0 on success, 2 on bad arguments
(the message names the flag), 130 when a run was stopped with Ctrl-C (its logs and a
final checkpoint are written).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _kv_pairs(text: str) -> dict[str, Any]:
  """Parses ``"a=1,b=0.9,c=true,name=x"`` into a dict of Python literals."""
  out: dict[str, Any] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, eq, value = part.partition("=")
    if not eq or not key.strip():
      raise argparse.ArgumentTypeError(f"expected key=value pairs, got {part!r}")
    v = value.strip()
    lowered = {"true": True, "false": False, "none": None}
    if v.lower() in lowered:
      out[key.strip()] = lowered[v.lower()]
      continue
    try:
      out[key.strip()] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[key.strip()] = v
  return out


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def _optional_float(text: str) -> float | None:
  if text.strip().lower() == "none":
    return None
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _non_negative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
  return value


def _add_train_parser(sub: Any) -> None:
  from jaxscope.train import TrainConfig

  d = TrainConfig()
  p = sub.add_parser(
    "train",
    help="train a model and record its metrics",
    description="Train a zoo model on a dataset with an optax optimizer, recording per-layer "
    "metrics, evaluations and checkpoints into a run directory.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  g = p.add_argument_group("model and data")
  g.add_argument("-m", "--model", default=d.model, help="model name (jaxscope list-models)")
  g.add_argument("--model-args", type=_kv_pairs, default={}, help="model kwargs, e.g. depth=56")
  g.add_argument("-d", "--dataset", default=d.dataset, help="dataset (jaxscope list-datasets)")
  g.add_argument(
    "--data-dir", default=os.environ.get("JAXSCOPE_DATA"), help="directory of dataset files"
  )
  g.add_argument("--data-args", type=_kv_pairs, default={}, help="dataset loader kwargs")
  g = p.add_argument_group("optimisation")
  g.add_argument("-b", "--batch-size", type=_positive_int, default=d.batch_size)
  length = g.add_mutually_exclusive_group()
  length.add_argument("-e", "--epochs", type=_positive_int, default=d.epochs)
  length.add_argument("--steps", type=_positive_int, default=None, help="total updates")
  g.add_argument(
    "-o",
    "--optimizer",
    default=d.optimizer,
    help="momentum, nesterov, any optax alias (sgd, adam, adamw, rmsprop, …), or the "
    "probabilistic preconditioners preconditioned_sgd, adaptive_sgd, only_adaptive_sgd "
    "(step size estimated; --opt-args initial_lr=…, fixed_lr=…, est_rank=…)",
  )
  g.add_argument("-l", "--lr", "--learning-rate", type=float, default=d.lr, dest="lr")
  g.add_argument(
    "--opt-args", type=_kv_pairs, default={}, help="optimizer kwargs, e.g. weight_decay=1e-4"
  )
  g.add_argument(
    "--schedule",
    default=d.schedule,
    help="constant | exponential:GAMMA (per epoch) | cosine | ratio (update/weight-ratio "
    "adaptive, see --ratio-*)",
  )
  g.add_argument(
    "--ratio-target", type=float, default=d.ratio_target, help="--schedule ratio: target ratio"
  )
  g.add_argument(
    "--ratio-smoothing",
    type=float,
    default=d.ratio_smoothing,
    help="--schedule ratio: weight of the newest ratio in the moving average",
  )
  g.add_argument(
    "--ratio-max-factor",
    type=_optional_float,
    default=d.ratio_max_factor,
    help="--schedule ratio: cap of lr/base lr ('none': no cap)",
  )
  g.add_argument(
    "--ratio-floor",
    type=_optional_float,
    default=d.ratio_floor,
    help="--schedule ratio: floor of lr/base lr (default none)",
  )
  g.add_argument(
    "--ratio-mode",
    default=d.ratio_mode,
    choices=["code", "thesis"],
    help="--schedule ratio: 'code' (original implementation) or 'thesis' (eq. 3.7)",
  )
  g.add_argument("--seed", type=int, default=d.seed)
  g = p.add_argument_group("metrics")
  g.add_argument(
    "--metrics",
    default=d.metrics,
    help="economy | full | none | comma list of metric names (jaxscope list-metrics)",
  )
  g.add_argument("--topics", default=None, help="comma list of params,grads,updates (all)")
  g.add_argument("--layers", default=None, help="regex selecting layers by name")
  g.add_argument("--exclude", default=None, help="regex of layers to leave out")
  g.add_argument("--depth", type=int, default=None, help="layer grouping depth (-1: per module)")
  g.add_argument("--kind", default=d.kind, choices=["any", "kernel", "bias"])
  g.add_argument("--every", type=_positive_int, default=d.every, help="measure every n-th step")
  g = p.add_argument_group("evaluation, checkpoints, output")
  g.add_argument(
    "--eval-every", type=_positive_int, default=None, help="steps between evals (epoch)"
  )
  g.add_argument(
    "--checkpoint-every",
    type=_non_negative_int,
    default=None,
    help="steps between checkpoints (default: each epoch; 0: only first and last)",
  )
  g.add_argument("--max-to-keep", type=_positive_int, default=None, help="checkpoints kept")
  g.add_argument(
    "--out",
    "--log-dir",
    dest="out",
    default=None,
    help="run directory (default: runs/MODEL-DATASET-sSEED)",
  )
  g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
  g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
  g.add_argument("--no-plots", action="store_true", help="do not render plots at the end")
  g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def _train(args: argparse.Namespace) -> int:
  from jaxscope.train import TrainConfig, train

  out = args.out or f"runs/{args.model}-{args.dataset}-s{args.seed}"
  topics = [t.strip() for t in args.topics.split(",") if t.strip()] if args.topics else None
  config = TrainConfig(
    model=args.model,
    dataset=args.dataset,
    data_dir=args.data_dir,
    batch_size=args.batch_size,
    epochs=None if args.steps else args.epochs,
    steps=args.steps,
    optimizer=args.optimizer,
    lr=args.lr,
    optimizer_args=args.opt_args,
    schedule=args.schedule,
    ratio_target=args.ratio_target,
    ratio_smoothing=args.ratio_smoothing,
    ratio_max_factor=args.ratio_max_factor,
    ratio_floor=args.ratio_floor,
    ratio_mode=args.ratio_mode,
    metrics=args.metrics,
    topics=topics,
    layers=args.layers,
    exclude=args.exclude,
    depth=args.depth,
    kind=args.kind,
    every=args.every,
    eval_every=args.eval_every,
    checkpoint_every=args.checkpoint_every,
    max_to_keep=args.max_to_keep,
    out=out,
    tensorboard=args.tensorboard,
    seed=args.seed,
    quiet=args.quiet,
    resume=args.resume,
    model_args=args.model_args,
    data_args=args.data_args,
  )
  result = train(config)
  if not args.no_plots:
    from jaxscope.plot import save_run_plots

    paths = save_run_plots(result.run_dir, result.run_dir / "plots")
  if not args.quiet:
    evals = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.final_eval.items()))
    state = "stopped" if result.interrupted else "finished"
    print(f"{state} at step {result.steps} in {result.wall_time:.1f} s: {evals}")
    print(f"run directory: {result.run_dir}")
    if not args.no_plots:
      print(f"{len(paths)} plots in {result.run_dir / 'plots'}")
  return 130 if result.interrupted else 0


def _plot(args: argparse.Namespace) -> int:
  from jaxscope.plot import save_run_plots

  run = Path(args.run)
  if not (run / "metrics.jsonl").exists():
    raise ValueError(f"plot: {run} is not a run directory (no metrics.jsonl in it).")
  out = Path(args.out) if args.out else run / "plots"
  paths = save_run_plots(run, out, dpi=args.dpi)
  print(f"wrote {len(paths)} plots to {out}")
  return 0


def _list_metrics(args: argparse.Namespace) -> int:
  from jaxscope.metrics import registry

  for name in registry.names():
    print(f"{name:20s} {registry.describe(name)}".rstrip())
  print()
  for preset in registry.PRESETS:
    lists = registry.preset_metrics(preset)
    desc = "; ".join(
      f"{t}: {', '.join(getattr(s, 'name', str(s)) for s in specs)}" for t, specs in lists.items()
    )
    print(f"preset {preset:13s} {desc}")
  return 0


def _list_models(args: argparse.Namespace) -> int:
  from jaxscope import models

  for name in models.names():
    print(f"{name:14s} {models.describe(name)}")
  return 0


def _list_datasets(args: argparse.Namespace) -> int:
  from jaxscope import data

  for name in data.names():
    where = "embedded" if data.embedded(name) else "needs --data-dir"
    print(f"{name:14s} [{where}] {data.describe(name)}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of the ``jaxscope`` command."""
  import jaxscope

  parser = argparse.ArgumentParser(
    prog="jaxscope", description="Live introspection of neural-network training in JAX."
  )
  parser.add_argument("--version", action="version", version=f"jaxscope {jaxscope.__version__}")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  _add_train_parser(sub)
  p = sub.add_parser("plot", help="render a run's metrics to PNG")
  p.add_argument("run", help="run directory (holding metrics.jsonl)")
  p.add_argument("--out", default=None, help="output directory (default: RUN/plots)")
  p.add_argument("--dpi", type=_positive_int, default=100)
  sub.add_parser("list-metrics", help="metric names and presets")
  sub.add_parser("list-models", help="the model zoo")
  sub.add_parser("list-datasets", help="the datasets")
  return parser


_COMMANDS = {
  "train": _train,
  "plot": _plot,
  "list-metrics": _list_metrics,
  "list-models": _list_models,
  "list-datasets": _list_datasets,
}


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``jaxscope`` command line; returns the exit status."""
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return _COMMANDS[args.command](args)
  except (ValueError, FileNotFoundError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    parser.exit(2, f"jaxscope {args.command}: error: {msg}\n")
  except KeyboardInterrupt:
    print("jaxscope: interrupted.", file=sys.stderr)
    return 130


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main())
