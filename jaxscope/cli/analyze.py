"""``jaxscope analyze``: the checkpoint analyses' options and the command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from jaxscope.cli._common import _argparse_type
from jaxscope.run.config import positive_int

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
