"""``jaxscope train``: its options (generated from :class:`jaxscope.run.TrainConfig`) and
the command."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxscope.cli._common import _argparse_type, _HelpFormatter


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
  code = 128 + int(result.stop_signal) if result.stop_signal else (1 if result.diverged else 0)
  if jax.process_index() != 0:
    return code
  if not args.no_plots:
    from jaxscope.plot import save_run_plots

    paths = save_run_plots(result.run_dir, RunLayout(result.run_dir).plots)
  if not args.quiet:
    evals = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.final_eval.items()))
    state = "stopped" if result.interrupted or result.diverged else "finished"
    print(f"{state} at step {result.steps} in {result.wall_time:.1f} s: {evals}")
    print(f"run directory: {result.run_dir}")
    if not args.no_plots:
      print(f"{len(paths)} plots in {RunLayout(result.run_dir).plots}")
  return code
