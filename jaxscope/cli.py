"""The ``jaxscope`` command line.

Sub-commands::

    jaxscope train [flags]          train a zoo model on a dataset, writing a run directory
    jaxscope plot RUN [--out DIR]   render every recorded metric of RUN to PNG
    jaxscope analyze RUN WHAT       checkpoint analyses (WHAT: path, layers, params,
                                    landscape, trajectory, robustness or all)
    jaxscope list-metrics           metric names (built-in and plugins) and presets
    jaxscope list-models            the model zoo
    jaxscope list-datasets          the datasets (embedded or from --data-dir)

``jaxscope train --help`` lists the training flags; they mirror the fields of
:class:`jaxscope.train.TrainConfig`; ``jaxscope analyze --help`` the analyses' options.
Exit status: 0 on success, 2 on bad arguments (the message names the flag) or a run the
command cannot use (e.g. one without checkpoints), 1 when some analyses of
``analyze RUN all`` failed (the others are written), 130 when a run was stopped with
Ctrl-C (its logs and a final checkpoint are written).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults and keeps the line breaks of a help text (each line is wrapped)."""

  def _split_lines(self, text: str, width: int) -> list[str]:
    lines: list[str] = []
    for line in text.splitlines():
      lines.extend(super()._split_lines(line, width) or [""])
    return lines


def _cockpit_names(quantities: Sequence[str]) -> str:
  """Cockpit's names of instrument quantities (the bracketed part of their description)."""
  from jaxscope.metrics.instruments import QUANTITIES

  names = []
  for q in quantities:
    desc = QUANTITIES[q]
    names.append(desc[desc.rindex("[") + 1 : -1] if desc.endswith("]") else q)
  return ", ".join(names)


def _instrument_presets() -> dict[str, str]:
  """One line per instrument preset of ``--metrics``: what it measures."""
  from jaxscope.metrics.instruments import PRESETS

  def extra(name: str, base: str) -> list[str]:
    return [q for q in PRESETS[name] if q not in PRESETS[base]]

  return {
    "economy": "per-layer scope economy + Cockpit's economy: "
    f"{_cockpit_names(PRESETS['economy'])} + activation health",
    "business": f"economy + {_cockpit_names(extra('business', 'economy'))}",
    "full": f"business + {_cockpit_names(extra('full', 'business'))} + per-layer scope full "
    "(histograms, spectral norms)",
  }


_ACTIVATION_HEALTH = (
  "activation health: activations/{std,dead_fraction,saturation_fraction}/LAYER and "
  "layer_grads/norm/LAYER of the captured Flax layers"
)


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
    formatter_class=_HelpFormatter,
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
  g.add_argument(
    "--no-live-diagnosis",
    action="store_true",
    help="do not run the diagnosis rules at each evaluation (they print new warnings)",
  )
  g.add_argument(
    "--capacity",
    default=None,
    help="dynamic capacity for capacity_mlp / capacity_cnn: chunks=5,patience=10,"
    "policy=all|activation-std (also cooldown, min_delta, smoothing). On a plateau of the "
    "moving-average training loss the next chunk of a layer is activated and the trained "
    "chunks are frozen; events are logged as capacity/expanded.",
  )
  g = p.add_argument_group("metrics")
  presets = "\n".join(f"{k}: {v}" for k, v in _instrument_presets().items())
  g.add_argument(
    "--metrics",
    default=d.metrics,
    help="economy | business | full | none | comma list of metric names (jaxscope "
    "list-metrics; no instruments). The presets are Cockpit's configurations:\n"
    f"{presets}\n{_ACTIVATION_HEALTH}.\n"
    "Per-example statistics (NormTest, InnerTest, OrthoTest, GradHist, TIC) are ill-defined "
    "for BatchNorm in training mode, and dropout draws other masks in the per-example pass "
    "(as in Cockpit); the step's loss and gradient are unchanged.",
  )
  g.add_argument(
    "--topics",
    default=None,
    help="comma list of params,grads,updates (all); --topics, --layers, --exclude, --depth "
    "and --kind select the per-layer scope only",
  )
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
    capacity=args.capacity,
    live_diagnosis=not args.no_live_diagnosis,
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


def _parse_overrides(spec: str | None) -> dict[str, float]:
  """``--set k=v,…`` of ``jaxscope diagnose``: threshold overrides as numbers."""
  out: dict[str, float] = {}
  for part in (p.strip() for p in (spec or "").split(",")):
    if not part:
      continue
    if "=" not in part:
      raise ValueError(f"diagnose --set: expected name=value, got {part!r}.")
    k, v = (t.strip() for t in part.split("=", 1))
    try:
      out[k] = float(v) if any(c in v for c in ".eE") else int(v)
    except ValueError:
      raise ValueError(f"diagnose --set: {k} must be a number, got {v!r}.") from None
  return out


def _diagnose(args: argparse.Namespace) -> int:
  import json

  from jaxscope.diagnose import diagnose, findings_to_json, report
  from jaxscope.plot import diagnosis_figure
  from jaxscope.record import write_atomic

  run = Path(args.run)
  if not (run / "metrics.jsonl").exists():
    raise ValueError(f"diagnose: {run} is not a run directory (no metrics.jsonl in it).")
  try:
    findings = diagnose(run, **_parse_overrides(args.set))
  except TypeError as e:  # An unknown threshold name.
    raise ValueError(str(e)) from None
  print(report(findings))
  out = Path(args.out) if args.out else run
  out.mkdir(parents=True, exist_ok=True)
  text = json.dumps({"run": str(run), "findings": findings_to_json(findings)}, indent=2)
  write_atomic(out / "diagnosis.json", lambda f: f.write(text.encode()))
  fig = diagnosis_figure(run, findings)
  fig.savefig(out / "diagnosis.png", dpi=args.dpi)
  print(f"wrote {out / 'diagnosis.json'} and {out / 'diagnosis.png'}")
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
  print()
  print("jaxscope train --metrics PRESET (Cockpit's configurations, with instruments):")
  for preset, desc in _instrument_presets().items():
    print(f"preset {preset:13s} {desc}")
  print(f"{'':20s} {_ACTIVATION_HEALTH}")
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


# ------------------------------------------------------------------------------ analyze

_ANALYSES = ("path", "layers", "params", "landscape", "trajectory", "robustness")
# Options whose values may start with "-" (a negative range); argparse would take
# "--grid -1:1:21" for two options, so main() joins them into "--grid=-1:1:21".
_RANGE_OPTIONS = ("--grid", "--alphas")
_CACHE_BYTES = 256 * 2**20
_RERANDOMIZE_SEEDS = 3

Axis = tuple[float, float, int]


def _axis(text: str) -> Axis:
  """Parses ``start:stop:num`` (``num ≥ 1``; 0 is a valid bound, unlike the original's
  falsy check that rejected ``--y=0:1:51``)."""
  parts = text.strip().split(":")
  if len(parts) != 3:
    raise argparse.ArgumentTypeError(f"expected start:stop:num, got {text!r}")
  try:
    lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected numbers start:stop:num, got {text!r}") from None
  if not (math.isfinite(lo) and math.isfinite(hi)):
    raise argparse.ArgumentTypeError(f"start and stop must be finite, got {text!r}")
  if n < 1:
    raise argparse.ArgumentTypeError(f"num must be at least 1, got {text!r}")
  if n > 1 and lo == hi:
    raise argparse.ArgumentTypeError(f"start equals stop with num > 1 in {text!r}")
  return lo, hi, n


def _grid(text: str) -> tuple[Axis, Axis]:
  """Parses ``x0:x1:nx[,y0:y1:ny]``; without the y part, y is the same as x."""
  parts = text.split(",")
  if len(parts) > 2:
    raise argparse.ArgumentTypeError(f"expected x0:x1:nx[,y0:y1:ny], got {text!r}")
  x = _axis(parts[0])
  return x, (_axis(parts[1]) if len(parts) == 2 else x)


def _param_choice(text: str) -> tuple[str, int]:
  """Parses ``top:K`` or ``random:K`` (``K`` defaults to 10)."""
  how, _, k = text.strip().partition(":")
  if how not in ("top", "random"):
    raise argparse.ArgumentTypeError(f"expected top:K or random:K, got {text!r}")
  return how, _positive_int(k) if k else 10


def _join_range_values(argv: Sequence[str]) -> list[str]:
  """``["--grid", "-1:1:3"]`` → ``["--grid=-1:1:3"]`` (see ``_RANGE_OPTIONS``)."""
  out: list[str] = []
  i = 0
  while i < len(argv):
    a = argv[i]
    nxt = argv[i + 1] if i + 1 < len(argv) else ""
    if a in _RANGE_OPTIONS and len(nxt) > 1 and nxt[0] == "-" and nxt[1] in "0123456789.":
      out.append(f"{a}={nxt}")
      i += 2
      continue
    out.append(a)
    i += 1
  return out


def _add_analyze_parser(sub: Any) -> None:
  p = sub.add_parser(
    "analyze",
    help="checkpoint analyses of a run: paths, landscapes, trajectory, layer robustness",
    description="Analyses of a run's checkpoints, on the test split: interpolation paths "
    "(linear and quadratic, against the real training curve) at model, layer and parameter "
    "level, a loss landscape along random or PCA directions, the PCA trajectory with each "
    "checkpoint's true loss next to the plane's, and layer robustness (re-initialisation and "
    "re-randomisation). θ_0 is the first checkpoint, θ_f the last, θ_mid the middle one. "
    "Writes NAME.npz + NAME.json and PNG figures per analysis into --out.",
  )
  p.add_argument("run", metavar="RUN", help="run directory (holding checkpoints/, config.json)")
  p.add_argument(
    "what",
    choices=[*_ANALYSES, "all"],
    metavar="WHAT",
    help=f"{' | '.join(_ANALYSES)} | all",
  )
  p.add_argument(
    "--alphas",
    type=_axis,
    default="-0.5:1.5:41",
    metavar="A:B:N",
    help="path coordinates: N points on [A, B]; 0 is θ_0, 1 is θ_f (default %(default)s)",
  )
  p.add_argument(
    "--grid",
    type=_grid,
    default="-1:1:21",
    metavar="X0:X1:NX[,Y0:Y1:NY]",
    help="landscape grid; without the y part y = x (default %(default)s); the trajectory "
    "uses only the counts NX, NY and covers the projected path with a margin",
  )
  p.add_argument(
    "--1d",
    dest="one_d",
    action="store_true",
    help="a 1-D landscape along one direction, on the x axis of --grid",
  )
  p.add_argument(
    "--directions",
    choices=["random", "pca"],
    default="random",
    help="landscape directions: filter-normalised random ones (Li et al.) or the trajectory's "
    "PCA (default %(default)s)",
  )
  p.add_argument(
    "--seed", type=int, default=0, help="of the random directions and parameter sampling (0)"
  )
  p.add_argument(
    "--layers", default=None, help="regex selecting the layers (layers, params, robustness)"
  )
  p.add_argument(
    "--params",
    type=_param_choice,
    default="top:10",
    metavar="top:K|random:K",
    help="scalars of the parameter-level paths: the K largest |θ_f − θ_0|, or K at random "
    "(default %(default)s)",
  )
  p.add_argument(
    "--mid-time",
    action="store_true",
    help="put θ_mid of the quadratic path at its true time fraction instead of α = 0.5",
  )
  p.add_argument(
    "--eval-examples",
    type=_positive_int,
    default=None,
    metavar="N",
    help="evaluate on N test examples, a fixed subset (default: the whole test split)",
  )
  p.add_argument("--eval-batch-size", type=_positive_int, default=500, metavar="B")
  p.add_argument("--data-dir", default=None, help="where the dataset is now (default: the run's)")
  p.add_argument("--out", default=None, help="output directory (default: RUN/analysis)")
  p.add_argument("--dpi", type=_positive_int, default=100)
  p.add_argument("-q", "--quiet", action="store_true", help="no summary")


def _jsonable(obj: Any) -> Any:
  """Numpy values and arrays as JSON values; non-finite floats as ``null`` (strict JSON)."""
  import numpy as np

  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    return _jsonable(obj.item())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def _save_result(out: Path, name: str, arrays: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
  """``out/name.npz`` (the arrays, exact) and ``out/name.json`` (strict JSON)."""
  import numpy as np

  from jaxscope.record import write_atomic

  npz, js = out / f"{name}.npz", out / f"{name}.json"
  data = {k: np.asarray(v) for k, v in arrays.items()}
  write_atomic(npz, lambda f: np.savez(f, **data))
  text = json.dumps(_jsonable({**meta, "arrays": sorted(data)}), indent=2, allow_nan=False)
  write_atomic(js, lambda f: f.write(text.encode()))
  return [npz, js]


def _closest(alphas: Any, value: float) -> int | None:
  """The index of ``value`` in ``alphas`` (within 1e-9), or ``None``."""
  import numpy as np

  d = np.abs(np.asarray(alphas, np.float64) - value)
  i = int(np.argmin(d))
  return i if d[i] <= 1e-9 else None


class _Analyzer:
  """What the analyses of one ``jaxscope analyze`` call share: the run's checkpoints,
  model, evaluation set, each checkpoint's true loss, and cached intermediate results."""

  def __init__(self, args: argparse.Namespace) -> None:
    from jaxscope.checkpoint import RunCheckpoints

    self.args = args
    self.run = Path(args.run)
    self.out = Path(args.out) if args.out else self.run / "analysis"
    self.ckpts = RunCheckpoints(self.run)
    try:
      self._setup()
    except BaseException:
      self.ckpts.close()
      raise
    self._paths: dict[str, Any] | None = None
    self._pca: Any = None

  def close(self) -> None:
    self.ckpts.close()

  # ----------------------------------------------------------------------------- setup

  def _setup(self) -> None:
    import jax
    import numpy as np

    from jaxscope.analysis import make_batch_evaluator, make_eval_set

    args, ckpts = self.args, self.ckpts
    config = ckpts.config
    ds = ckpts.dataset(args.data_dir)
    self.task = config.get("task") or getattr(ds, "task", "classification")
    self.model = ckpts.model()
    model = self.model
    self.apply_fn = lambda p, s, x: model.apply({"params": p, **s}, x, train=False)[0]
    n_test = len(ds.test_x)
    if args.eval_examples and args.eval_examples < n_test:
      idx = np.sort(np.random.default_rng(0).permutation(n_test)[: args.eval_examples])
      rule = "sorted first N of numpy.random.default_rng(0).permutation(n_test)"
    else:
      idx, rule = np.arange(n_test), "the whole test split"
    self.eval_indices = idx
    self.eval_set = make_eval_set(ds.test_x[idx], ds.test_y[idx], batch_size=args.eval_batch_size)
    self.num_classes = int(ds.num_classes)
    self.init_x = np.asarray(ds.train_x[:1])
    batch_eval = make_batch_evaluator(self.apply_fn, self.eval_set, task=self.task)

    def one(p: Any, s: Any) -> Any:
      return batch_eval(jax.tree.map(lambda v: v[None], p), jax.tree.map(lambda v: v[None], s))

    one = jax.jit(one)
    # One pass over the checkpoints (damaged ones skipped with a warning): each one's
    # true loss with its own BatchNorm statistics; small models stay cached.
    self.steps: list[int] = []
    loss, acc, logged = [], [], []
    self._cache: dict[int, Any] = {}
    self._keep_all = True
    last = None
    for ck in ckpts.iter():
      lo, ac = one(ck.params, ck.model_state)
      loss.append(float(lo[0]))
      acc.append(float(ac[0]))
      logged.append(ck.meta.get("eval_loss"))
      if not self.steps:
        size = sum(x.nbytes for x in jax.tree.leaves(ck.params))
        self._keep_all = size * len(ckpts.steps) <= _CACHE_BYTES
        self.first = ck
      if self._keep_all:
        self._cache[len(self.steps)] = ck.params
      self.steps.append(ck.step)
      last = ck
    if len(self.steps) < 2:
      raise ValueError(
        f"analyze: {self.run} has {len(self.steps)} readable checkpoint(s) {self.steps}; the "
        "analyses need at least the initial and the final one."
      )
    self.final = last
    self.true_loss = np.asarray(loss)
    self.true_accuracy = np.asarray(acc)
    self.logged_loss = [None if v is None else float(v) for v in logged]
    T = len(self.steps)
    self.mid_index = (T - 1) // 2 if T >= 3 else None
    self.mid = ckpts.restore(self.steps[self.mid_index]) if self.mid_index is not None else None
    if self.mid is not None and args.mid_time:
      s0, sm, sf = self.steps[0], self.steps[self.mid_index], self.steps[-1]
      self.mid_alpha = (sm - s0) / (sf - s0)
    else:
      self.mid_alpha = 0.5
    self.state_f = self.final.model_state
    self.has_state = bool(jax.tree.leaves(self.state_f))
    self.alphas = np.linspace(*args.alphas)
    self.info = {
      "run_dir": str(self.run),
      "model": config.get("model"),
      "dataset": config.get("dataset"),
      "task": self.task,
      "eval": {
        "split": "test",
        "n": self.eval_set.n,
        "of": n_test,
        "subset": rule,
        "digest": self.eval_set.digest,
        "batch_size": args.eval_batch_size,
      },
      "checkpoints": self.steps,
      "theta_0": self.steps[0],
      "theta_f": self.steps[-1],
      "theta_mid": None if self.mid is None else self.steps[self.mid_index],
      "mid_alpha": self.mid_alpha if self.mid is not None else None,
      "bn_policy": "keep (the final checkpoint's statistics at every point)"
      if self.has_state
      else "none (the model has no BatchNorm statistics)",
      "mode": "evaluation (train=False)",
    }

  def params(self, i: int) -> Any:
    """The parameters of checkpoint ``i`` (an index into :attr:`steps`)."""
    if i in self._cache:
      return self._cache[i]
    if i == 0:
      return self.first.params
    if i == len(self.steps) - 1:
      return self.final.params
    return self.ckpts.restore(self.steps[i]).params

  def say(self, text: str) -> None:
    if not self.args.quiet:
      print(text)

  def save_fig(self, fig: Any, name: str) -> Path:
    path = self.out / name
    fig.savefig(path, dpi=self.args.dpi)
    return path

  # --------------------------------------------------------------------- shared pieces

  def model_paths(self) -> dict[str, Any]:
    """The model-level linear (and, with ≥ 3 checkpoints, quadratic) paths, cached."""
    if self._paths is None:
      from jaxscope.analysis import model_path

      kw = {"alphas": self.alphas, "model_state": self.state_f, "task": self.task}
      th0, thf = self.first.params, self.final.params
      self._paths = {"linear": model_path(self.apply_fn, self.eval_set, th0, thf, **kw)}
      if self.mid is not None:
        self._paths["quadratic"] = model_path(
          self.apply_fn,
          self.eval_set,
          th0,
          thf,
          theta_mid=self.mid.params,
          mid=self.mid_alpha,
          **kw,
        )
    return self._paths

  def lazy(self) -> Any:
    from jaxscope.analysis import LazyCheckpoints

    return LazyCheckpoints(load=self.params, length=len(self.steps))

  def pca(self) -> Any:
    """PCA of the whole trajectory (streamed), up to two directions, cached."""
    if self._pca is None:
      from jaxscope.analysis import pca_directions

      self._pca = pca_directions(self.lazy(), n=min(2, len(self.steps) - 1))
    return self._pca

  def kinds(self) -> list[tuple[str, dict[str, Any]]]:
    """``(kind, path keyword arguments)`` of the linear and (when possible) quadratic path."""
    out = [("linear", {})]
    if self.mid is not None:
      out.append(("quadratic", {"theta_mid": self.mid.params, "mid": self.mid_alpha}))
    return out

  # ------------------------------------------------------------------------- analyses

  def path(self) -> list[Path]:
    import numpy as np

    from jaxscope.analysis import project_on_path, trajectory_stats
    from jaxscope.plot import path_figure

    paths = self.model_paths()
    T = len(self.steps)
    alpha_t = project_on_path(
      self.first.params, self.final.params, (self.params(i) for i in range(T))
    )
    maes = {k: _path_mae(p, alpha_t, self.true_loss) for k, p in paths.items()}
    arrays: dict[str, Any] = {"alpha": self.alphas, "eval_indices": self.eval_indices}
    meta: dict[str, Any] = {"analysis": "path", **self.info, "paths": {}}
    for kind, p in paths.items():
      arrays[f"{kind}_loss"], arrays[f"{kind}_accuracy"] = p.loss, p.accuracy
      meta["paths"][kind] = {
        "alpha": p.alpha,
        "loss": p.loss,
        "accuracy": p.accuracy,
        "distance": p.distance,
        "mae_vs_checkpoints": maes[kind],
      }
    arrays.update(
      checkpoint_step=np.asarray(self.steps),
      checkpoint_alpha=alpha_t,
      checkpoint_loss=self.true_loss,
      checkpoint_accuracy=self.true_accuracy,
    )
    meta["checkpoints_on_path"] = {
      "step": self.steps,
      "alpha": alpha_t,
      "loss": self.true_loss,
      "accuracy": self.true_accuracy,
      "logged_eval_loss": self.logged_loss,
    }
    # Sanity (spec §7.8): the endpoints of the path reproduce the checkpoints' losses.
    checks = {}
    for a, j in ((0.0, 0), (1.0, T - 1)):
      i = _closest(self.alphas, a)
      if i is not None and not (a == 0.0 and self.has_state):
        checks[f"alpha={a:g}"] = {
          "path_loss": float(paths["linear"].loss[i]),
          "checkpoint_loss": float(self.true_loss[j]),
          "abs_diff": abs(float(paths["linear"].loss[i]) - float(self.true_loss[j])),
        }
    meta["endpoint_checks"] = checks
    if self._keep_all:
      st = trajectory_stats([self.params(i) for i in range(T)])
      meta["trajectory"] = {
        "distance": st.distance,
        "relative_distance": st.relative_distance,
        "path_length": st.path_length,
      }
    files = _save_result(self.out, "path", arrays, meta)
    real = (alpha_t, self.true_loss, [str(s) for s in self.steps])
    files.append(self.save_fig(path_figure(list(paths.values()), real=real), "path.png"))
    # Summary.
    mids = f", θ_mid = step {self.info['theta_mid']} at α = {self.mid_alpha:.3g}"
    self.say(
      f"path: θ_0 = step {self.steps[0]}, θ_f = step {self.steps[-1]}"
      + (mids if self.mid is not None else " (2 checkpoints: no quadratic path)")
    )
    for k, c in checks.items():
      self.say(
        f"  check {k}: path loss {c['path_loss']:.6g} vs checkpoint {c['checkpoint_loss']:.6g}"
        f" (|Δ| {c['abs_diff']:.2g})"
      )
    for kind, m in maes.items():
      self.say(f"  {kind:9s} mean |loss − true loss| over the checkpoints: {m:.4g}")
    if len(maes) == 2 and all(math.isfinite(v) for v in maes.values()):
      (k1, m1), (k2, m2) = sorted(maes.items(), key=lambda kv: kv[1])
      rel = f" ({100 * (m2 - m1) / m2:.0f} % less error)" if m2 > 0 else ""
      self.say(
        f"  → the {k1} path is closer to the real training curve than the {k2} one, by "
        f"{m2 - m1:.4g}{rel}"
      )
    if "trajectory" in meta:
      t = meta["trajectory"]
      self.say(
        f"  training moved θ by {t['distance']:.4g} ({100 * t['relative_distance']:.3g} % of "
        f"‖θ_0‖) along a path of length {t['path_length']:.4g}"
      )
    return files

  def _layer_classes(self, result: Any) -> dict[str, str] | None:
    """Critical / ambient / intermediate from a linear layer path at α = 0 (the
    re-initialisation test), for classification runs whose α grid holds 0."""
    from jaxscope.analysis import classify_layers

    i = _closest(self.alphas, 0.0)
    if i is None or self.task != "classification" or not result:
      return None
    names = list(result)
    err = [1.0 - float(result[n].accuracy[i]) for n in names]
    return classify_layers(
      err, 1.0 - float(self.true_accuracy[-1]), names, chance_error=1.0 - 1.0 / self.num_classes
    )

  def layers(self) -> list[Path]:
    import numpy as np

    from jaxscope.analysis import layer_paths
    from jaxscope.plot import layer_paths_figure

    results = {}
    for kind, kw in self.kinds():
      results[kind] = layer_paths(
        self.apply_fn,
        self.eval_set,
        self.first.params,
        self.final.params,
        alphas=self.alphas,
        include=self.args.layers,
        model_state=self.state_f,
        task=self.task,
        **kw,
      )
    names = list(results["linear"])
    classes = self._layer_classes(results["linear"])
    arrays: dict[str, Any] = {
      "alpha": self.alphas,
      "layers": np.asarray(names),
      "distance": np.asarray([results["linear"][n].distance for n in names]),
      "eval_indices": self.eval_indices,
    }
    meta: dict[str, Any] = {"analysis": "layers", **self.info, "layers_regex": self.args.layers}
    meta["layers"] = {n: {"distance": results["linear"][n].distance} for n in names}
    for kind, res in results.items():
      arrays[f"{kind}_loss"] = np.stack([res[n].loss for n in names])
      arrays[f"{kind}_accuracy"] = np.stack([res[n].accuracy for n in names])
      for n in names:
        meta["layers"][n][kind] = {"loss": res[n].loss, "accuracy": res[n].accuracy}
    if classes is not None:
      for n in names:
        meta["layers"][n]["class"] = classes[n]
      meta["classification"] = "from the linear path at α = 0 (re-initialisation to θ_0)"
    files = _save_result(self.out, "layers", arrays, meta)
    model = self.model_paths()
    for kind, res in results.items():
      fig = layer_paths_figure(res, model[kind])
      files.append(self.save_fig(fig, f"layers_{kind}.png"))
    i0 = _closest(self.alphas, 0.0)
    self.say(f"layers ({len(names)}): distance ‖θ_f − θ_0‖, loss with the layer at θ_0, class")
    for n in names:
      r = results["linear"][n]
      at0 = f"{float(r.loss[i0]):.4g}" if i0 is not None else "n/a"
      cls = classes[n] if classes is not None else ""
      self.say(f"  {n:24s} {r.distance:10.4g} {at0:>10s}  {cls}")
    return files

  def params_level(self) -> list[Path]:
    import numpy as np

    from jaxscope.analysis import parameter_paths, select_parameters
    from jaxscope.plot import parameter_paths_figure

    how, k = self.args.params
    sel = select_parameters(
      self.first.params,
      self.final.params,
      how=how,
      k=k,
      seed=self.args.seed,
      include=self.args.layers,
    )
    results = {}
    for kind, kw in self.kinds():
      results[kind] = parameter_paths(
        self.apply_fn,
        self.eval_set,
        self.first.params,
        self.final.params,
        sel,
        alphas=self.alphas,
        model_state=self.state_f,
        task=self.task,
        **kw,
      )
    lin = results["linear"]
    arrays: dict[str, Any] = {
      "alpha": self.alphas,
      "names": np.asarray([r.name for r in lin]),
      "distance": np.asarray([r.distance for r in lin]),
      "eval_indices": self.eval_indices,
    }
    for kind, res in results.items():
      arrays[f"{kind}_loss"] = np.stack([r.loss for r in res])
      arrays[f"{kind}_accuracy"] = np.stack([r.accuracy for r in res])
    meta: dict[str, Any] = {
      "analysis": "params",
      **self.info,
      "selection": {"how": how, "k": k, "seed": self.args.seed, "layers_regex": self.args.layers},
      "parameters": [
        {
          "leaf": leaf,
          "index": list(idx),
          "distance": r.distance,
          **{kind: {"loss": res[j].loss} for kind, res in results.items()},
        }
        for j, ((leaf, idx), r) in enumerate(zip(sel, lin, strict=True))
      ],
    }
    files = _save_result(self.out, "params", arrays, meta)
    for kind, res in results.items():
      files.append(self.save_fig(parameter_paths_figure(res), f"params_{kind}.png"))
    self.say(f"params: {len(sel)} scalars ({how}); largest |Δθ|:")
    for r in sorted(lin, key=lambda r: -r.distance)[:3]:
      spread = float(np.nanmax(r.loss) - np.nanmin(r.loss)) if np.isfinite(r.loss).any() else 0
      self.say(f"  {r.name:30s} |Δθ| {r.distance:.4g}, loss range along the path {spread:.3g}")
    return files

  def landscape(self) -> list[Path]:
    import numpy as np

    from jaxscope.analysis import cosine, landscape_1d, landscape_2d, save_landscape
    from jaxscope.plot import landscape_figure, surface_figure

    xgrid, ygrid = self.args.grid
    xs = np.linspace(*xgrid)
    ys = None if self.args.one_d else np.linspace(*ygrid)
    n = 1 if ys is None else 2
    settings: dict[str, Any] = {
      **self.info,
      "analysis": "landscape",
      "center": "theta_f",
      "center_step": self.steps[-1],
    }
    extra: dict[str, Any] = {"eval_indices": self.eval_indices}
    trajectory = None
    if self.args.directions == "random":
      from jaxscope.analysis import random_directions

      dirs = random_directions(self.final.params, self.args.seed, n=n)
      settings.update(directions="random", seed=self.args.seed, norm="filter", ignore_1d="zero")
      settings["directions_note"] = "regenerate with random_directions(theta_f, seed, n)"
      if n == 2:
        settings["cosine"] = float(cosine(dirs[0], dirs[1]))
    else:
      pca = self.pca()
      if len(pca.directions) < n:
        raise ValueError(
          "analyze landscape: PCA directions of a 2-checkpoint run span one dimension; "
          "use --1d or --directions random."
        )
      dirs = pca.directions[:n]
      settings.update(
        directions="pca",
        explained_variance_ratio=pca.explained_variance_ratio[:n].tolist(),
        singular_values=pca.singular_values[:n].tolist(),
      )
      from jaxscope.analysis import project

      coords, _ = project(self.lazy(), self.final.params, dirs)
      trajectory = {
        "coords": coords,
        "labels": [str(s) for s in self.steps],
        "loss": self.true_loss,
      }
      extra.update(trajectory_coords=coords, trajectory_steps=np.asarray(self.steps))
    kw = {"model_state": self.state_f, "task": self.task, "settings": _jsonable(settings)}
    if n == 2:
      land = landscape_2d(self.apply_fn, self.eval_set, self.final.params, *dirs, xs, ys, **kw)
    else:
      land = landscape_1d(self.apply_fn, self.eval_set, self.final.params, dirs[0], xs, **kw)
    files = list(save_landscape(self.out / "landscape", land, **extra))
    files.append(self.save_fig(landscape_figure(land, trajectory), "landscape.png"))
    if n == 2:
      files.append(self.save_fig(surface_figure(land), "landscape_surface.png"))
    shape = "×".join(str(s) for s in land.loss.shape[::-1])
    finite = land.loss[np.isfinite(land.loss)]
    rng = f"{finite.min():.4g} … {finite.max():.4g}" if finite.size else "no finite value"
    self.say(
      f"landscape: {self.args.directions} directions, {shape} grid around step "
      f"{self.steps[-1]}: loss {rng}"
    )
    self.say(
      f"  centre loss {land.center_loss:.6g} (checkpoint's own: {self.true_loss[-1]:.6g})"
      + (f"; cos(δ, η) = {settings['cosine']:.3g}" if "cosine" in settings else "")
    )
    if _closest(xs, 0.0) is None or (ys is not None and _closest(ys, 0.0) is None):
      self.say("  note: the grid does not contain the centre (0 on every axis).")
    return files

  def trajectory(self) -> list[Path]:
    import numpy as np

    from jaxscope.analysis import landscape_1d, landscape_2d, make_point_evaluator, project
    from jaxscope.analysis import save_landscape as save
    from jaxscope.plot import landscape_figure

    pca = self.pca()
    dirs = pca.directions
    coords, resid = project(self.lazy(), self.final.params, dirs)
    counts = [self.args.grid[0][2], self.args.grid[1][2]][: len(dirs)]
    axes = []
    for k, num in enumerate(counts):
      lo, hi = float(min(coords[:, k].min(), 0.0)), float(max(coords[:, k].max(), 0.0))
      span = hi - lo if hi > lo else max(abs(lo), abs(hi), 1e-3)
      axes.append(np.linspace(lo - 0.2 * span, hi + 0.2 * span, num))
    ev = make_point_evaluator(
      self.apply_fn,
      [self.final.params, *dirs],
      self.eval_set,
      model_state=self.state_f,
      task=self.task,
    )
    plane = ev.evaluate(np.concatenate([np.ones((len(coords), 1)), coords], axis=1))
    settings: dict[str, Any] = {
      **self.info,
      "analysis": "trajectory",
      "directions": "pca",
      "pca_center": pca.center,
      "origin": "theta_f",
      "center_step": self.steps[-1],
      "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
      "explained_variance": pca.explained_variance.tolist(),
      "singular_values": pca.singular_values.tolist(),
      "grid_rule": "the projected checkpoints and the origin, with a 20 % margin per side",
      "checkpoints_projected": {
        "step": self.steps,
        "coords": coords,
        "true_loss": self.true_loss,
        "plane_loss": plane["loss"],
        "residual_fraction": resid,
      },
    }
    settings = _jsonable(settings)
    kw = {"model_state": self.state_f, "task": self.task, "settings": settings}
    if len(dirs) == 2:
      land = landscape_2d(self.apply_fn, self.eval_set, self.final.params, *dirs, *axes, **kw)
    else:
      land = landscape_1d(self.apply_fn, self.eval_set, self.final.params, dirs[0], axes[0], **kw)
    files = list(
      save(
        self.out / "trajectory",
        land,
        steps=np.asarray(self.steps),
        coords=coords,
        true_loss=self.true_loss,
        plane_loss=plane["loss"],
        residual_fraction=resid,
        explained_variance_ratio=pca.explained_variance_ratio,
        eval_indices=self.eval_indices,
      )
    )
    traj = {"coords": coords, "labels": [str(s) for s in self.steps], "loss": self.true_loss}
    where = "plane" if len(dirs) == 2 else "first principal direction"
    fig = landscape_figure(land, traj, title=f"loss on the trajectory's PCA {where}")
    files.append(self.save_fig(fig, "trajectory.png"))
    evr = ", ".join(f"{100 * r:.1f} %" for r in pca.explained_variance_ratio)
    self.say(
      f"trajectory: PCA of {len(self.steps)} checkpoints, explained variance {evr}; origin = "
      f"step {self.steps[-1]}"
    )
    self.say("  step      true loss   plane loss   off-plane fraction")
    rows = range(len(self.steps))
    if len(self.steps) > 8:
      rows = [*range(4), *range(len(self.steps) - 4, len(self.steps))]
    for i in rows:
      self.say(
        f"  {self.steps[i]:<8d} {self.true_loss[i]:10.4g} {plane['loss'][i]:12.4g} {resid[i]:14.3f}"
      )
    self.say(
      f"  (mean |plane − true| {np.mean(np.abs(plane['loss'] - self.true_loss)):.4g}: the "
      "contour under a checkpoint is not its loss unless its off-plane fraction is ≈ 0)"
    )
    return files

  def robustness(self) -> list[Path]:
    import jax.numpy as jnp
    import numpy as np

    from jaxscope.analysis import layer_robustness
    from jaxscope.plot import robustness_figure

    if self.task != "classification":
      raise ValueError(f"analyze robustness: needs a classification run, not {self.task}.")
    model, x = self.model, jnp.asarray(self.init_x)
    res = layer_robustness(
      self.apply_fn,
      self.eval_set,
      [self.params(i) for i in range(len(self.steps))],
      self.steps,
      num_classes=self.num_classes,
      init_fn=lambda key: model.init(key, x)["params"],
      seeds=_RERANDOMIZE_SEEDS,
      include=self.args.layers,
      model_state=self.state_f,
    )
    arrays = {
      "layers": np.asarray(res.layers),
      "steps": np.asarray(res.steps),
      "error": res.error,
      "loss": res.loss,
      "rerandomized_error": res.rerandomized_error,
      "eval_indices": self.eval_indices,
    }
    meta = {
      "analysis": "robustness",
      **self.info,
      "layers_regex": self.args.layers,
      "layers": list(res.layers),
      "steps": list(res.steps),
      "base_error": res.base_error,
      "labels": res.labels,
      "thresholds": res.thresholds,
      "rerandomize_seeds": list(range(1, _RERANDOMIZE_SEEDS + 1)),
      "note": "ambient = robust (Zhang et al.); the nnvis thesis's 'robust' means critical",
    }
    files = _save_result(self.out, "robustness", arrays, meta)
    files.append(self.save_fig(robustness_figure(res), "robustness.png"))
    th = res.thresholds
    self.say(
      f"robustness: base error {res.base_error:.4f}; ambient if Δerr ≤ {th['ambient_tol']:g}, "
      f"critical if err ≥ {th['chance_error'] - th['critical_tol']:.3g}"
    )
    rer = res.rerandomized_error
    for j, lay in enumerate(res.layers):
      rr = f", re-randomised {np.mean(rer[:, j]):.3f}" if len(rer) else ""
      self.say(
        f"  {lay:24s} {res.labels[lay]:12s} error at τ = {res.steps[0]}: {res.error[0, j]:.3f}{rr}"
      )
    return files


def _path_mae(path: Any, alpha_t: Any, loss_t: Any) -> float:
  from jaxscope.analysis import path_error

  return path_error(path, alpha_t, loss_t)


def _analyze(args: argparse.Namespace) -> int:
  import warnings

  todo = list(_ANALYSES) if args.what == "all" else [args.what]
  an = _Analyzer(args)
  failed = []
  files: list[Path] = []
  try:
    an.out.mkdir(parents=True, exist_ok=True)
    es = an.eval_set
    an.say(
      f"{an.run}: {len(an.steps)} checkpoints (steps {an.steps[0]} … {an.steps[-1]}); eval set: "
      f"{es.n} test examples (digest {es.digest}); output: {an.out}"
    )
    if an.has_state:
      an.say("  note: BatchNorm statistics of the final checkpoint are used at every point.")
    runners = {
      "path": an.path,
      "layers": an.layers,
      "params": an.params_level,
      "landscape": an.landscape,
      "trajectory": an.trajectory,
      "robustness": an.robustness,
    }
    for name in todo:
      if name == "robustness" and args.what == "all" and an.task != "classification":
        an.say(f"robustness: skipped ({an.task} run).")
        continue
      t0 = time.perf_counter()
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", RuntimeWarning)  # NaN losses are expected to occur.
          files += runners[name]()
      except ValueError as e:
        if args.what != "all":
          raise
        print(f"jaxscope analyze: {name} failed: {e}", file=sys.stderr)
        failed.append(name)
        continue
      an.say(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
  finally:
    an.close()
  an.say(f"wrote {len(files)} files to {an.out}")
  if failed:
    print(f"jaxscope analyze: failed: {', '.join(failed)}", file=sys.stderr)
    return 1
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
  _add_analyze_parser(sub)
  p = sub.add_parser(
    "diagnose",
    help="name what is going wrong in a run, with the evidence and what to try",
    description="Runs jaxscope.diagnose's rules over a run's metrics.jsonl, prints the "
    "findings (most severe first), and writes diagnosis.json and diagnosis.png (the metrics "
    "behind each finding, its steps marked).",
  )
  p.add_argument("run", help="run directory (holding metrics.jsonl)")
  p.add_argument("--out", default=None, help="output directory (default: RUN)")
  p.add_argument(
    "--set",
    default=None,
    help="threshold overrides, e.g. dead_fraction=0.3,ratio_high=0.05 "
    "(see jaxscope.diagnose.Thresholds)",
  )
  p.add_argument("--dpi", type=_positive_int, default=100)
  sub.add_parser("list-metrics", help="metric names and presets")
  sub.add_parser("list-models", help="the model zoo")
  sub.add_parser("list-datasets", help="the datasets")
  return parser


_COMMANDS = {
  "train": _train,
  "plot": _plot,
  "analyze": _analyze,
  "diagnose": _diagnose,
  "list-metrics": _list_metrics,
  "list-models": _list_models,
  "list-datasets": _list_datasets,
}


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``jaxscope`` command line; returns the exit status."""
  parser = build_parser()
  args = parser.parse_args(_join_range_values(sys.argv[1:] if argv is None else list(argv)))
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
