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
Exit status (:data:`EXIT_CODES`; also in ``jaxscope --help``): 0 success (``diagnose``: no
problem found, or only info findings); 1 some analyses of ``analyze RUN all`` failed (the
others are written), ``diagnose`` has a warning or critical finding, or ``train --stop-on
divergence`` stopped a diverging run; 2 a bad argument (the
message names the flag), a run the command cannot use (e.g. one without checkpoints or
without a readable record) or a refused resume;
74 the run directory cannot be written (no space, read-only, no permission: ``OSError``);
75 the run directory is in use by another run (its lock); 130 a run stopped by Ctrl-C and
143 one stopped by SIGTERM (both after writing their logs and a final checkpoint). Every
error is one line, ``jaxscope COMMAND: error: ...``, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxscope.cli._common import _argparse_type
from jaxscope.cli.analyze import _add_analyze_parser, _analyze, _axis, _grid, _join_range_values
from jaxscope.cli.listing import _list_datasets, _list_metrics, _list_models
from jaxscope.cli.train import _add_train_parser, _train
from jaxscope.run.config import positive_int

__all__ = ["EXIT_CODES", "build_parser", "main"]

# The parsers of the analyses' ranges, used by their tests as cli._axis, cli._grid.
_RANGE_PARSERS = (_axis, _grid)

#: The exit status of ``jaxscope`` and what it means.
EXIT_CODES = {
  0: "success",
  1: "some analyses failed (the others are written); diagnose: a warning or critical finding; "
  "train: stopped by --stop-on divergence",
  2: "bad argument, unusable run directory or refused resume (the message says which)",
  74: "the run directory cannot be written (no space, read-only, no permission)",
  75: "the run directory is in use by another run (its lock names it)",
  130: "stopped by Ctrl-C (logs and a final checkpoint written)",
  143: "stopped by SIGTERM (logs and a final checkpoint written)",
}


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
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    history = History.load(layout.root)
  skipped = [w for w in caught if "skipping corrupt" in str(w.message)]
  if len(history) == 0:
    raise ValueError(
      f"diagnose: {layout.metrics} holds no readable record ({len(skipped)} unreadable "
      'line(s); each line must be {"step": int, "values": {key: number, ...}}, as '
      "jaxscope.Recorder writes)."
    )
  for w in caught:
    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
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
  return 1 if any(f.severity != "info" for f in findings) else 0


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
    "findings (the likeliest cause first), and writes diagnosis.json and diagnosis.png (the "
    "metrics behind each finding, its steps marked).",
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


def _quiet_oserror(previous: Any) -> Any:
  """An unraisable-exception hook that drops the ``OSError`` of a write cut short (already
  reported in one line) and hands anything else to ``previous``."""

  def hook(unraisable: Any) -> None:
    if not isinstance(unraisable.exc_value, OSError):
      previous(unraisable)

  return hook


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
    # ...and a write cut short leaves its coroutine unawaited, which Python reports at exit
    # (as a warning, or as its OSError ignored in a finaliser): the one line says it all.
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    sys.unraisablehook = _quiet_oserror(sys.unraisablehook)
    parser.exit(74, f"jaxscope {args.command}: error: {_os_error(e, args)}\n")
  except KeyboardInterrupt:
    print("jaxscope: interrupted.", file=sys.stderr)
    return 130
  finally:
    warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main())
