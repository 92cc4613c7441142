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
Exit status (:data:`EXIT_CODES`; also in ``jaxscope --help``): 0 success; 1 some analyses
of ``analyze RUN all`` failed (the others are written); 2 a bad argument (the message names
the flag), a run the command cannot use (e.g. one without checkpoints) or a refused resume;
74 the run directory cannot be written (no space, read-only, no permission: ``OSError``);
75 the run directory is in use by another run (its lock); 130 a run stopped by Ctrl-C and
143 one stopped by SIGTERM (both after writing their logs and a final checkpoint). Every
error is one line, ``jaxscope COMMAND: error: ...``, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxscope.run.config import positive_int

__all__ = ["EXIT_CODES", "main"]

#: The exit status of ``jaxscope`` and what it means.
EXIT_CODES = {
  0: "success",
  1: "some analyses failed (the others are written)",
  2: "bad argument, unusable run directory or refused resume (the message says which)",
  74: "the run directory cannot be written (no space, read-only, no permission)",
  75: "the run directory is in use by another run (its lock names it)",
  130: "stopped by Ctrl-C (logs and a final checkpoint written)",
  143: "stopped by SIGTERM (logs and a final checkpoint written)",
}


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
  from jaxscope.metrics.instruments import INSTRUMENT_PRESETS

  def extra(name: str, base: str) -> list[str]:
    return [q for q in INSTRUMENT_PRESETS[name] if q not in INSTRUMENT_PRESETS[base]]

  return {
    "economy": "per-layer scope economy + Cockpit's economy: "
    f"{_cockpit_names(INSTRUMENT_PRESETS['economy'])} + activation health",
    "business": f"economy + {_cockpit_names(extra('business', 'economy'))}",
    "full": f"business + {_cockpit_names(extra('full', 'business'))} + per-layer scope full "
    "(histograms, spectral norms)",
  }


_ACTIVATION_HEALTH = (
  "activation health: activations/{std,dead_fraction,saturation_fraction}/LAYER and "
  "layer_grads/norm/LAYER of the captured Flax layers"
)


#: Extra help of ``jaxscope train`` options, appended to the field's own (computed).
def _train_help_extra() -> dict[str, str]:
  presets = "\n".join(f"{k}: {v}" for k, v in _instrument_presets().items())
  return {
    "metrics": f":\n{presets}\n{_ACTIVATION_HEALTH}.\n"
    "Per-example statistics (NormTest, InnerTest, OrthoTest, GradHist, TIC) are ill-defined "
    "for BatchNorm in training mode, and dropout draws other masks in the per-example pass "
    "(as in Cockpit); the step's loss and gradient are unchanged."
  }


def _argparse_type(parse: Any) -> Any:
  """A config value parser (raising ``ValueError``) as an argparse ``type``."""

  def convert(text: str) -> Any:
    try:
      return parse(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  convert.__name__ = getattr(parse, "__name__", "value")
  return convert


def _add_train_parser(sub: Any, *, suppress: bool = False) -> None:
  """``jaxscope train``: one option per :class:`~jaxscope.run.TrainConfig` field, generated
  from the field's metadata (:func:`jaxscope.run.cli_options`). With ``suppress`` no option
  has a default (the parsed namespace holds only the options given: :func:`_given`)."""
  from jaxscope.run import cli_options

  p = sub.add_parser(
    "train",
    help="train a model and record its metrics",
    description="Train a zoo model on a dataset with an optax optimizer, recording per-layer "
    "metrics, evaluations and checkpoints into a run directory.",
    formatter_class=_HelpFormatter,
  )
  extra = _train_help_extra()
  groups: dict[str, Any] = {}
  length = None  # --epochs and --steps exclude each other.
  for o in cli_options():
    g = groups.get(o.group) or groups.setdefault(o.group, p.add_argument_group(o.group))
    if o.field in ("epochs", "steps"):
      length = length or g.add_mutually_exclusive_group()
      g = length
    kw: dict[str, Any] = {"dest": o.field, "help": o.help + extra.get(o.field, "")}
    if o.switch == "on":
      kw.update(action="store_true")
    elif o.switch == "off":
      kw.update(action="store_false", help=f"turn off: {kw['help']}")
    else:
      kw.update(default=o.default, metavar=o.metavar, choices=o.choices)
      if o.parse is not None:
        kw["type"] = _argparse_type(o.parse)
    if o.field == "data_dir":
      kw["default"] = os.environ.get("JAXSCOPE_DATA")
    if o.field == "out":
      kw["default"] = None
    if suppress:
      kw["default"] = argparse.SUPPRESS
    g.add_argument(*o.flags, **kw)
  out = groups["evaluation, checkpoints, output"]
  out.add_argument("--no-plots", action="store_true", help="do not render plots at the end")


def _given(argv: Sequence[str]) -> set[str]:
  """The ``jaxscope train`` options given on the command line ``argv`` (field names)."""
  parser = argparse.ArgumentParser(add_help=False)
  _add_train_parser(parser.add_subparsers(dest="command"), suppress=True)
  given, _ = parser.parse_known_args(list(argv))
  return set(vars(given)) - {"command"}


def _train_fields(args: argparse.Namespace) -> dict[str, Any]:
  """The :class:`~jaxscope.run.TrainConfig` fields of ``jaxscope train``. With ``--resume``
  of a run that recorded its config, the options not given on the command line are the
  run's own (so ``jaxscope train --out RUN --resume`` continues RUN as it was)."""
  from jaxscope.run import cli_options, read_config
  from jaxscope.run.resume import COMMAND_KEYS

  fields = {o.field: getattr(args, o.field) for o in cli_options()}
  if fields["out"] is None:
    fields["out"] = f"runs/{args.model}-{args.dataset}-s{args.seed}"
  if fields["steps"]:
    fields["epochs"] = None  # --steps overrides --epochs.
  recorded = read_config(fields["out"]) if args.resume and Path(fields["out"]).is_dir() else {}
  if recorded:
    given = _given(getattr(args, "argv", ()))
    for key in fields:
      if key not in given and key not in COMMAND_KEYS and key in recorded:
        fields[key] = recorded[key]
    if "steps" in given:
      fields["epochs"] = None
    elif "epochs" in given:
      fields["steps"] = None
  return fields


def _train(args: argparse.Namespace) -> int:
  """``jaxscope train``. In a multi-process run (several hosts, ``jax.distributed``) every
  process trains, and process 0 alone draws the figures and prints the summary, as it
  alone writes the log (:class:`jaxscope.record.Recorder`)."""
  import jax

  from jaxscope.run import RunLayout, TrainConfig
  from jaxscope.train import train

  result = train(TrainConfig(**_train_fields(args)))
  code = 128 + int(result.stop_signal) if result.stop_signal else 0
  if jax.process_index() != 0:
    return code
  if not args.no_plots:
    from jaxscope.plot import save_run_plots

    paths = save_run_plots(result.run_dir, RunLayout(result.run_dir).plots)
  if not args.quiet:
    evals = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.final_eval.items()))
    state = "stopped" if result.interrupted else "finished"
    print(f"{state} at step {result.steps} in {result.wall_time:.1f} s: {evals}")
    print(f"run directory: {result.run_dir}")
    if not args.no_plots:
      print(f"{len(paths)} plots in {RunLayout(result.run_dir).plots}")
  return code


def _logged_run(command: str, path: str) -> Any:
  """The run directory ``path`` (:class:`jaxscope.run.RunLayout`), which must hold a log."""
  from jaxscope.run import RunLayout

  layout = RunLayout(Path(path))
  if not layout.metrics.exists():
    raise ValueError(
      f"{command}: {layout.root} is not a run directory (no {layout.metrics.name} in it)."
    )
  return layout


def _plot(args: argparse.Namespace) -> int:
  from jaxscope.plot import save_run_plots

  layout = _logged_run("plot", args.run)
  out = Path(args.out) if args.out else layout.plots
  paths = save_run_plots(layout.root, out, dpi=args.dpi)
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
  from jaxscope.diagnose import diagnose, findings_to_json, report
  from jaxscope.plot import diagnosis_figure
  from jaxscope.record import History, write_json
  from jaxscope.run import RunLayout

  layout = _logged_run("diagnose", args.run)
  history = History.load(layout.root)
  try:
    findings = diagnose(history, **_parse_overrides(args.set))
  except TypeError as e:  # An unknown threshold name.
    raise ValueError(str(e)) from None
  print(report(findings))
  out = RunLayout(Path(args.out)) if args.out else layout
  out.root.mkdir(parents=True, exist_ok=True)
  write_json(
    out.diagnosis, {"run": str(layout.root), "findings": findings_to_json(findings)}, indent=2
  )
  fig = diagnosis_figure(history, findings)
  fig.savefig(out.diagnosis_figure, dpi=args.dpi)
  print(f"wrote {out.diagnosis} and {out.diagnosis_figure}")
  return 0


def _plain(text: str) -> str:
  """A docstring fragment for the terminal: ``x`` → x, :func:`~a.b` → b."""
  import re

  text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", text)
  return text.replace("``", "")


def _spec_text(spec: Any) -> str:
  """A preset entry: its registered name, or the stats of a configured metric's keys."""
  from jaxscope.metrics import registry

  if isinstance(spec, str):
    return spec
  stats = [k.split("/")[1] for k in registry.keys_of(spec)]
  return stats[0] + (f" (+{', '.join(stats[1:])})" if len(stats) > 1 else "")


def _list_metrics(args: argparse.Namespace) -> int:
  """``jaxscope list-metrics``: every key a scope or the instruments can report, with its
  definition, generated from the registry and the instruments' own tables."""
  from jaxscope.metrics import keys, registry
  from jaxscope.metrics.instruments import QUANTITIES
  from jaxscope.metrics.scope import TOPICS

  print(
    "Per-layer metrics: metrics.scope(params=[...], ...) or jaxscope train --metrics "
    "'NAME,NAME(ARG=VALUE)'\n"
    f"keys {{topic}}/{{stat}}/{{layer}}: topic one of {', '.join(TOPICS)}; layer the module "
    "path, e.g. Dense_0/kernel; arguments as in the signature, e.g. variance(ddof=1)"
  )
  network = []
  for name in registry.names():
    meta = registry.info(name)
    if not meta.keys[0].startswith("{topic}/"):
      network.append(meta)
      continue
    print(f"\n{name}{meta.signature}\n    {_plain(meta.summary)}")
    print(f"    keys: {', '.join(meta.keys)}")
    if meta.note:
      print(f"    convention: {meta.note}")
  print("\nNetwork metrics (scope(network=[...]), plain keys):")
  for meta in network:
    print(f"{meta.name:20s} key {meta.keys[0]}: {_plain(meta.summary)}")
  print()
  for preset in registry.SCOPE_PRESETS:
    lists = registry.preset_metrics(preset)
    desc = "; ".join(
      f"{t}: {', '.join(_spec_text(s) for s in specs)}" for t, specs in lists.items()
    )
    print(f"preset {preset:13s} {desc}")
  print()
  print("jaxscope train --metrics PRESET (Cockpit's configurations, with instruments):")
  for preset, desc in _instrument_presets().items():
    print(f"preset {preset:13s} {desc}")
  print(f"{'':20s} {_ACTIVATION_HEALTH}")
  print(
    "\nInstrument quantities: metrics.instruments([...]) or the presets above; keys per "
    "parameter leaf with {leaf} (its name, e.g. Dense_0/kernel); K_stderr is the standard "
    "error of reading K, K_residual a convergence residual bounding its error"
  )
  quantity = None
  for row in keys.instrument_key_table():
    if row.quantity != quantity:
      quantity = row.quantity
      presets = ", ".join(row.presets) or "no preset"
      print(f"\n{quantity} [{presets}]: {QUANTITIES[quantity]}")
    print(f"    {row.key}: {row.definition}")
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

# Options whose values may start with "-" (a negative range); argparse would take
# "--grid -1:1:21" for two options, so main() joins them into "--grid=-1:1:21".
_RANGE_OPTIONS = ("--grid", "--alphas")


def _parsed(parse: Any, text: str) -> Any:
  """``parse(text)``, its ``ValueError`` as argparse's error for the option."""
  try:
    return parse(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _axis(text: str) -> tuple[float, float, int]:
  """Parses ``start:stop:num`` (:func:`jaxscope.analysis.run.parse_axis`)."""
  from jaxscope.analysis.run import parse_axis

  return _parsed(parse_axis, text)


def _grid(text: str) -> tuple[tuple[float, float, int], tuple[float, float, int]]:
  """Parses ``x0:x1:nx[,y0:y1:ny]``; without the y part, y is the same as x."""
  from jaxscope.analysis.run import parse_grid

  return _parsed(parse_grid, text)


def _param_choice(text: str) -> tuple[str, int]:
  """Parses ``top:K`` or ``random:K`` (``K`` defaults to 10)."""
  from jaxscope.analysis.run import parse_param_choice

  return _parsed(parse_param_choice, text)


def _axis_text(axis: tuple[float, float, int]) -> str:
  return f"{axis[0]:g}:{axis[1]:g}:{axis[2]}"


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
  from jaxscope.analysis.run import ANALYSES, AnalysisOptions
  from jaxscope.run.own import ANALYZE_FLAGS

  d = AnalysisOptions()  # The defaults, shared with jaxscope.analysis.analyze.
  grid = _axis_text(d.grid[0]) + ("" if d.grid[1] == d.grid[0] else f",{_axis_text(d.grid[1])}")
  p = sub.add_parser(
    "analyze",
    help="checkpoint analyses of a run: paths, landscapes, trajectory, layer robustness",
    description="Analyses of a run's checkpoints, on the test split: interpolation paths "
    "(linear and quadratic, against the real training curve) at model, layer and parameter "
    "level, a loss landscape along random or PCA directions, the PCA trajectory with each "
    "checkpoint's true loss next to the plane's, and layer robustness (re-initialisation and "
    "re-randomisation). θ_0 is the first checkpoint, θ_f the last, θ_mid the middle one. "
    "Writes NAME.npz + NAME.json and PNG figures per analysis into --out. For your own orbax "
    "checkpoints see the options below and docs/checkpoints.md.",
  )
  p.add_argument("run", metavar="RUN", help="run directory, or your CheckpointManager's directory")
  p.add_argument(
    "what",
    choices=[*ANALYSES, "all"],
    metavar="WHAT",
    help=f"{' | '.join(ANALYSES)} | all",
  )
  p.add_argument(
    "--alphas",
    type=_axis,
    default=_axis_text(d.alphas),
    metavar="A:B:N",
    help="path coordinates: N points on [A, B]; 0 is θ_0, 1 is θ_f (default %(default)s)",
  )
  p.add_argument(
    "--grid",
    type=_grid,
    default=grid,
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
    default=d.directions,
    help="landscape directions: filter-normalised random ones (Li et al.) or the trajectory's "
    "PCA (default %(default)s)",
  )
  p.add_argument(
    "--seed",
    type=int,
    default=d.seed,
    help="of the random directions and parameter sampling (%(default)s)",
  )
  p.add_argument(
    "--layers", default=d.layers, help="regex selecting the layers (layers, params, robustness)"
  )
  p.add_argument(
    "--params",
    type=_param_choice,
    default=f"{d.params[0]}:{d.params[1]}",
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
    type=_argparse_type(positive_int),
    default=d.eval_examples,
    metavar="N",
    help="evaluate on N test examples, a fixed subset (default: the whole test split)",
  )
  p.add_argument(
    "--eval-batch-size", type=_argparse_type(positive_int), default=d.eval_batch_size, metavar="B"
  )
  p.add_argument("--data-dir", default=None, help="where the dataset is now (default: the run's)")
  own = p.add_argument_group("checkpoints of your own loop (no config.json)")
  for flag, kw in ANALYZE_FLAGS:  # Their values are load_run's keywords.
    own.add_argument(flag, **{**kw, "type": _argparse_type(kw.get("type", str))}, default=None)
  p.add_argument("--out", default=None, help="output directory (default: RUN/analysis)")
  p.add_argument("--dpi", type=_argparse_type(positive_int), default=d.dpi)
  p.add_argument("-q", "--quiet", action="store_true", help="no summary")


def _analyze(args: argparse.Namespace) -> int:
  import dataclasses

  from jaxscope.analysis import AnalysisOptions, analyze
  from jaxscope.run import load_run

  fields = dataclasses.fields(AnalysisOptions)
  options = AnalysisOptions(**{f.name: getattr(args, f.name) for f in fields})

  def failed(name: str, error: Exception) -> None:
    print(f"jaxscope analyze: {name} failed: {error}", file=sys.stderr)

  from jaxscope.run.own import ANALYZE_FLAGS

  own = {f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_")) for f, _ in ANALYZE_FLAGS}
  with load_run(args.run, data_dir=args.data_dir, **own) as run:
    report = analyze(
      run,
      args.what,
      out=args.out or run.layout.analysis,
      options=options,
      echo=None if args.quiet else print,
      on_failure=failed,
    )
  if report.failed:
    print(f"jaxscope analyze: failed: {', '.join(report.failed)}", file=sys.stderr)
    return 1
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of the ``jaxscope`` command."""
  import jaxscope

  codes = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
  parser = argparse.ArgumentParser(
    prog="jaxscope",
    description="Live introspection of neural-network training in JAX.",
    epilog=f"exit status:\n{codes}",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--version", action="version", version=f"jaxscope {jaxscope.__version__}")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  _add_train_parser(sub)
  p = sub.add_parser("plot", help="render a run's metrics to PNG")
  p.add_argument("run", help="run directory (holding metrics.jsonl)")
  p.add_argument("--out", default=None, help="output directory (default: RUN/plots)")
  p.add_argument("--dpi", type=_argparse_type(positive_int), default=100)
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
  p.add_argument("--dpi", type=_argparse_type(positive_int), default=100)
  sub.add_parser(
    "list-metrics",
    help="every metric and instrument key with its definition, defaults and presets",
  )
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


def _one_line_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> str:
  """A warning as the command line prints it: ``jaxscope: warning: ...`` (one line, no
  source location)."""
  return f"jaxscope: warning: {message}\n"


def _os_error(error: OSError, args: argparse.Namespace) -> str:
  """One line for an ``OSError``: what failed, on which file (else the command's directory),
  and the system's reason."""
  reason = error.strerror or str(error)
  place = error.filename or getattr(args, "out", None) or getattr(args, "run", None)
  where = f" {place}" if place else ""
  hint = {28: " (no space left: free some or choose another --out)", 30: " (read-only)"}.get(
    error.errno or 0, ""
  )
  return f"cannot write{where}: {reason}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``jaxscope`` command line; returns the exit status (:data:`EXIT_CODES`)."""
  from jaxscope.run.lock import RunLockedError

  parser = build_parser()
  argv = _join_range_values(sys.argv[1:] if argv is None else list(argv))
  args = parser.parse_args(argv)
  args.argv = argv
  formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
  try:
    return _COMMANDS[args.command](args)
  except (ValueError, FileNotFoundError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    parser.exit(2, f"jaxscope {args.command}: error: {msg}\n")
  except RunLockedError as e:
    parser.exit(75, f"jaxscope {args.command}: error: {e}\n")
  except OSError as e:
    # Orbax's failed writes report themselves again when collected, up to the exit.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    parser.exit(74, f"jaxscope {args.command}: error: {_os_error(e, args)}\n")
  except KeyboardInterrupt:
    print("jaxscope: interrupted.", file=sys.stderr)
    return 130
  finally:
    warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main())
