"""Writing a run's checkpoints: :class:`CheckpointWriter` (what the reference loop saves)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CheckpointWriter"]


class CheckpointWriter:
  """Writes a run's checkpoints: an orbax ``CheckpointManager`` with atomic, asynchronous
  saves of a state pytree (item ``state``) and a JSON record (item ``meta``).

  This is the layout :class:`RunCheckpoints` reads: ``state`` is any pytree whose top
  level holds ``params`` and ``model_state`` (the loop saves its whole
  :class:`~jaxscope.train.TrainState`), ``meta`` a dict of JSON values (``step``,
  ``epoch``, ``wall_time``, ``eval_loss``, …).

  Args:
    directory: the checkpoint folder (``run_dir/checkpoints``); created if missing.
    max_to_keep: checkpoints kept (``None``: all).
  """

  def __init__(self, directory: str | Path, max_to_keep: int | None = None) -> None:
    import orbax.checkpoint as ocp

    self._ocp = ocp
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(
      Path(directory).absolute(), options=options, item_names=("state", "meta")
    )
    self.saved: set[int] = set(self.manager.all_steps())
    """The steps on disk (and being written)."""

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Saves ``state`` and ``meta`` as ``step`` (asynchronously; a step already on disk is
    left as it is)."""
    if step in self.saved:
      return
    ocp = self._ocp
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
      ),
      force=True,
    )
    self.saved.add(step)

  def restore_latest(self, targets: Sequence[Any]) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest step that restores into one of ``targets`` (abstract pytrees, tried in
    order): ``(index of the target, state, meta)``; damaged steps are skipped with a
    warning, ``None`` when no step restores."""
    ocp = self._ocp
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      for i, target in enumerate(targets):
        try:
          r = self.manager.restore(
            step,
            args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
          )
        except Exception as e:  # A damaged step: fall back to an older one.
          error = error or e
          continue
        return i, r.state, dict(r.meta)
      warnings.warn(
        f"checkpoint {step} could not be restored ({error}); trying older.", stacklevel=3
      )
    return None

  def close(self) -> None:
    """Waits for pending saves and closes the manager."""
    self.manager.wait_until_finished()
    self.manager.close()
