"""Resuming a run: what may change between the run's ``config.json`` and a new command.

A resumed run (``resume=True``, ``jaxscope train --resume``) is compared with the config the
run recorded. Each differing field is a :class:`Change` of one of three kinds:

* **training** (:data:`TRAINING_KEYS`: the model, the data, the batch size, the optimizer,
  its learning rate and schedule, the seed, capacity and the parameters' type; and the
  length of a run whose schedule depends on it, ``cosine``): it alters the trajectory the
  parameters follow, so it is refused with a readable diff unless ``allow_changes=True``
  (``--allow-changes``);
* **measurement** (:data:`MEASUREMENT_KEYS`: what is measured and how often): allowed; the
  measurements whose state depends on it restart at the resumed step;
* anything else (the length, evaluation and checkpoint intervals, output options, the
  mesh, the data's location): allowed.

Every accepted change is recorded in ``config.json``, which then holds the config the run
continues with and a ``config_history`` list: one entry per resume that changed something,
``{"step": S, "time": ..., "changes": {field: {"from": old, "to": new}}}``, S being the
first step computed with the new values. A run that is read back
(:func:`jaxscope.load_run`) thus says which configuration produced which steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from jaxscope.run.config import TrainConfig
from jaxscope.run.directory import RunLayout, read_config

__all__ = [
  "COMMAND_KEYS",
  "MEASUREMENT_KEYS",
  "TRAINING_KEYS",
  "Change",
  "ResumePlan",
  "check_resume",
  "clear_run",
  "describe_changes",
  "diff_config",
  "history_entry",
]

#: Fields whose change alters training (refused on resume without ``allow_changes``).
TRAINING_KEYS = (
  "model",
  "model_args",
  "dataset",
  "data_args",
  "batch_size",
  "optimizer",
  "optimizer_args",
  "lr",
  "schedule",
  "ratio_target",
  "ratio_smoothing",
  "ratio_max_factor",
  "ratio_floor",
  "ratio_mode",
  "seed",
  "capacity",
  "param_dtype",
  "dtype",
)

#: Fields that choose what is measured: allowed on resume; the measurements' state restarts.
MEASUREMENT_KEYS = ("metrics", "topics", "layers", "exclude", "depth", "kind", "every")

#: Fields of the command, not of the run: never compared, never taken from the record.
COMMAND_KEYS = ("out", "resume", "allow_changes", "overwrite", "quiet")


class Change(NamedTuple):
  """One field that differs between the recorded config and the resumed one."""

  key: str
  old: Any
  new: Any
  kind: str
  """``"training"``, ``"measurement"`` or ``"other"`` (see the module docstring)."""


class ResumePlan(NamedTuple):
  """What :func:`check_resume` found."""

  resume: bool
  """Whether there is a run to continue (``False``: a new run starts)."""
  old: dict[str, Any]
  """The recorded ``config.json`` (``{}`` for a new run)."""
  changes: tuple[Change, ...]
  """The fields that differ, in field order."""

  @property
  def state_changes(self) -> bool:
    """Whether a change can alter the structure of the saved state (the model, optimizer,
    capacity, dtype or the measurements), so that the checkpoint is restored with the
    recorded config and carried over (:func:`jaxscope.train.loop` does)."""
    return any(c.kind != "other" or c.key == "schedule" for c in self.changes)


def _kind(key: str, old: Mapping[str, Any], config: TrainConfig, total_steps: int | None) -> str:
  if key in TRAINING_KEYS:
    return "training"
  if key in MEASUREMENT_KEYS:
    return "measurement"
  if key in ("steps", "epochs") and config.schedule == "cosine":
    # The cosine schedule decays over the run's length: a new length moves every later lr.
    if total_steps is None or old.get("total_steps") != total_steps:
      return "training"
  return "other"


def _same(a: Any, b: Any) -> bool:
  """Equal as JSON values (a tuple equals a list; 1 equals 1.0, but not True)."""
  if isinstance(a, list | tuple) and isinstance(b, list | tuple):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if _number(a) and _number(b):
    return a == b
  return type(a) is type(b) and a == b


def _number(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def diff_config(
  old: Mapping[str, Any], config: TrainConfig, total_steps: int | None = None
) -> tuple[Change, ...]:
  """The fields of ``config`` that differ from the recorded ``old`` (a ``config.json``).

  A field the old record does not hold (an earlier version) is compared with its default.
  ``total_steps`` is the new run's length (decides whether ``steps``/``epochs`` alter a
  cosine schedule).
  """
  out = []
  for f in dataclasses.fields(TrainConfig):
    if f.name in COMMAND_KEYS:
      continue
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    before = old.get(f.name, default)
    now = getattr(config, f.name)
    if not _same(before, now):
      out.append(Change(f.name, before, now, _kind(f.name, old, config, total_steps)))
  return tuple(out)


def _shown(value: Any) -> str:
  return repr(value) if not isinstance(value, str) else value or "''"


def describe_changes(changes: tuple[Change, ...] | list[Change]) -> str:
  """``"lr 0.05 -> 0.1, steps 100 -> 200"``: the changes on one line."""
  return ", ".join(f"{c.key} {_shown(c.old)} -> {_shown(c.new)}" for c in changes)


def check_resume(
  layout: RunLayout, config: TrainConfig, total_steps: int | None = None
) -> ResumePlan:
  """Checks that ``config`` may write into ``layout`` and what resuming changes.

  A directory that already holds a run needs ``config.resume`` (or ``config.overwrite``,
  handled by the caller before this check). A resumed run is compared with the recorded
  ``config.json`` (:func:`diff_config`): a change that alters training needs
  ``config.allow_changes``.

  Args:
    layout: the run directory.
    config: the new run's configuration.
    total_steps: the new run's length in steps (for a ``cosine`` schedule).

  Returns:
    A :class:`ResumePlan`; ``resume`` is ``False`` when there is nothing to continue.

  Raises:
    ValueError: the directory holds a run and neither resume nor overwrite was asked for,
      or a training change without ``allow_changes`` (the message lists every change).
  """
  holds = layout.holds_run()
  if holds and not config.resume:
    raise ValueError(
      f"train: {layout.root} already holds a run; pass resume=True (--resume) to continue it, "
      "overwrite=True (--overwrite) to replace it, or choose another output directory (--out)."
    )
  if not (config.resume and holds):
    return ResumePlan(False, {}, ())
  old = read_config(layout.root)
  changes = diff_config(old, config, total_steps) if old else ()
  refused = [c for c in changes if c.kind == "training"]
  if refused and not config.allow_changes:
    rows = "\n".join(f"  {c.key}: {_shown(c.old)} -> {_shown(c.new)}" for c in refused)
    raise ValueError(
      f"train(resume=True): these options differ from the run's {layout.config} and would "
      f"change how it trains:\n{rows}\nresume with the run's own values (options left out on "
      "the command line are taken from the run), or pass allow_changes=True "
      "(--allow-changes) to continue with the new ones (config.json records each change "
      "and the step it applies from)."
    )
  return ResumePlan(True, old, changes)


def history_entry(step: int, changes: tuple[Change, ...]) -> dict[str, Any]:
  """The ``config_history`` entry of a resume at ``step`` with ``changes``."""
  return {
    "step": int(step),
    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "changes": {c.key: {"from": c.old, "to": c.new, "kind": c.kind} for c in changes},
  }


def clear_run(layout: RunLayout) -> list[Path]:
  """Removes the run written in ``layout`` (``overwrite=True``, ``--overwrite``): its log
  and the files cut from it, config, checkpoints (damaged ones too), TensorBoard events,
  plots, analyses and diagnosis. Other files in the directory are left. Returns what was
  removed."""
  entries = [
    layout.metrics,
    *layout.root.glob(f"{layout.metrics.name}.rewound-*"),
    layout.config,
    layout.checkpoints,
    layout.damaged_checkpoints,
    layout.tensorboard,
    layout.plots,
    layout.analysis,
    layout.diagnosis,
    layout.diagnosis_figure,
  ]
  removed = []
  for path in entries:
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
      path.unlink()
    else:
      continue
    removed.append(path)
  return removed
