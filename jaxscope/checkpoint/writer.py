"""Writing a run's checkpoints: :class:`CheckpointWriter` (what the reference loop saves)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["CheckpointWriter"]


@dataclasses.dataclass(frozen=True)
class _Empty:
  """A zero-size array's place in a saved tree: orbax cannot save arrays of size 0 (a
  rank-0 factor of the preconditioner for a one-element leaf), so its shape and dtype
  travel as static structure and the array is rebuilt on restore."""

  shape: tuple[int, ...]
  dtype: str


jax.tree_util.register_static(_Empty)


def _is_empty(x: Any) -> bool:
  shape = getattr(x, "shape", None)
  return shape is not None and hasattr(x, "dtype") and math.prod(shape) == 0


def _hide_empty(tree: Any) -> Any:
  """``tree`` with each zero-size array replaced by an :class:`_Empty` (no leaves)."""
  return jax.tree.map(lambda x: _Empty(tuple(x.shape), str(x.dtype)) if _is_empty(x) else x, tree)


def _rebuild_empty(tree: Any) -> Any:
  """The inverse of :func:`_hide_empty`."""
  return jax.tree.map(
    lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, _Empty) else x,
    tree,
    is_leaf=lambda x: isinstance(x, _Empty),
  )


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
        state=ocp.args.StandardSave(_hide_empty(state)), meta=ocp.args.JsonSave(dict(meta))
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
              state=ocp.args.StandardRestore(_hide_empty(target)),
              meta=ocp.args.JsonRestore(),
            ),
          )
        except Exception as e:  # A damaged step: fall back to an older one.
          error = error or e
          continue
        return i, _rebuild_empty(r.state), dict(r.meta)
      warnings.warn(
        f"checkpoint {step} could not be restored ({error}); trying older.", stacklevel=3
      )
    return None

  def close(self) -> None:
    """Waits for pending saves and closes the manager."""
    self.manager.wait_until_finished()
    self.manager.close()
