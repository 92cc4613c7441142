"""Restoring a run to resume it: the newest readable checkpoint, in the run's own structure,
carried over into the new configuration.

:func:`restore` reads the newest checkpoint that restores (damaged newer ones are moved
aside to ``RUN/damaged-checkpoints/STEP``, so the resumed run writes those steps afresh).
When the resumed configuration changes the saved state's structure (another metrics
preset, optimizer or dtype: :attr:`jaxscope.run.resume.ResumePlan.state_changes`), the
checkpoint is read with the structure of the recorded configuration and carried over
(:func:`carry_over`): parameters and model state as they are (cast to a new parameter
type), the optimizer's and the measurements' state where their structure is unchanged,
fresh otherwise.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxscope.checkpoint import CheckpointWriter
from jaxscope.run import RunLayout, TrainConfig
from jaxscope.run.resume import ResumePlan
from jaxscope.train import sharding
from jaxscope.train.step import TrainState

__all__ = ["Restored", "carry_over", "restore"]


class Restored(NamedTuple):
  """What :func:`restore` found."""

  state: TrainState | None
  """The restored state (``None``: nothing to restore; the run starts at step 0)."""
  start: int
  """The step the run continues from."""
  alpha_from: int
  """The first step whose α (the previous update's step size) is recorded."""
  notes: tuple[str, ...]
  """What was not carried over (state that starts afresh), one line each."""


def _same(a: Any, b: Any) -> bool:
  """Same tree structure, shapes and dtypes."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
    x.shape == y.shape and x.dtype == y.dtype
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _params(old: Any, new: Any, what: str) -> Any:
  if jax.tree.structure(old) != jax.tree.structure(new) or any(
    x.shape != y.shape for x, y in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True)
  ):
    raise ValueError(
      f"train(resume=True): the checkpoint's {what} do not fit the new configuration (the "
      "model's layers or shapes changed); a run can only be resumed with the same model."
    )
  return jax.tree.map(lambda o, n: o.astype(n.dtype) if o.dtype != n.dtype else o, old, new)


def _carry(old: Any, new: Any) -> tuple[Any, bool]:
  """``old`` where it has ``new``'s structure (per key of a dict), else ``new``; and whether
  all of ``old`` was kept."""
  if _same(old, new):
    return old, True
  if isinstance(old, dict) and isinstance(new, dict):
    out, kept = {}, True
    for key, value in new.items():
      out[key], k = _carry(old[key], value) if key in old else (value, False)
      kept = kept and k
    return out, kept
  return new, False


def _optimizer_state(old: Any, new: Any) -> tuple[Any, bool]:
  """The optimizer's state: the old one when its structure is unchanged; through a change
  of the monitored scope (``MonitoredState``), the wrapped optimizer's state."""
  if _same(old, new):
    return old, True
  old_inner, new_inner = getattr(old, "inner_state", old), getattr(new, "inner_state", new)
  if _same(old_inner, new_inner):
    return (new._replace(inner_state=old_inner) if new_inner is not new else old_inner), True
  return new, False


def carry_over(old: TrainState, fresh: TrainState) -> tuple[TrainState, tuple[str, ...]]:
  """``old`` (a checkpoint read in its own structure) in the structure of ``fresh`` (the
  new configuration's initial state); returns the state and what starts afresh.

  Raises:
    ValueError: the parameters or model state do not fit (another model).
  """
  notes = []
  params = _params(old.params, fresh.params, "parameters")
  model_state = _params(old.model_state, fresh.model_state, "model state (e.g. batch_stats)")
  opt_state, kept = _optimizer_state(old.opt_state, fresh.opt_state)
  if not kept:
    notes.append("the optimizer's state starts afresh (another optimizer or schedule)")
  instruments, kept = _carry(old.instruments, fresh.instruments)
  if not kept:
    notes.append("the measurements' state starts afresh (other metrics or every)")
  if isinstance(instruments, dict) and "cockpit" in instruments:
    if instruments["cockpit"] is fresh.instruments["cockpit"]:  # Measures the same steps.
      instruments = {**instruments, "cockpit": _counted(instruments["cockpit"], old.step)}
  state = TrainState(old.step, params, model_state, opt_state, instruments)
  return state, tuple(notes)


def _counted(cockpit: Any, step: Any) -> Any:
  return cockpit._replace(count=jnp.asarray(int(step), jnp.int32))  # Its own buffer (donated).


def _set_aside(ckpt: CheckpointWriter, layout: RunLayout, steps: list[int]) -> None:
  """Moves damaged checkpoint steps to ``RUN/damaged-checkpoints/STEP`` (kept for a look)."""
  if jax.process_index() == 0:
    for step in steps:
      source = layout.checkpoints / str(step)
      if source.exists():
        target = layout.damaged_checkpoints / str(step)
        n = 0
        while target.exists():
          n += 1
          target = layout.damaged_checkpoints / f"{step}.{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
  sharding.sync_processes("jaxscope.train: damaged checkpoints set aside")
  ckpt.saved.difference_update(steps)
  ckpt.manager.reload()


def _abstract(s: Any) -> Any:
  abstract = jax.eval_shape(s.init_state)
  if s.mesh is not None:  # Restored straight into the run's layout.
    abstract = sharding.abstract_with(abstract, s.state_shardings())
  return abstract


def restore(
  s: Any,
  ckpt: CheckpointWriter,
  layout: RunLayout,
  plan: ResumePlan,
  setup: Callable[[TrainConfig], Any],
) -> Restored:
  """The newest checkpoint of ``layout`` that restores, in ``s``'s configuration.

  Args:
    s: the new run's :class:`~jaxscope.train.Setup`.
    ckpt: the run's checkpoint writer.
    layout: the run directory.
    plan: :func:`jaxscope.run.resume.check_resume`'s plan.
    setup: :func:`jaxscope.train.setup` (builds the recorded configuration when the state's
      structure changed).

  Raises:
    ValueError: no checkpoint restores (each was damaged), or the model changed.
  """
  if not ckpt.saved:
    return Restored(None, 0, 1, ())
  recorded = s
  if plan.state_changes and plan.old:
    old = TrainConfig.from_record(plan.old)
    recorded = setup(dataclasses.replace(old, mesh=s.config.mesh, data_dir=s.config.data_dir))
  abstract = _abstract(recorded)
  # A checkpoint written before TrainState.instruments existed holds four fields.
  legacy = {f: getattr(abstract, f) for f in TrainState._fields if f != "instruments"}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    found = ckpt.restore_latest([abstract, legacy])
  if found is None:
    ckpt.close()
    why = _first_line(caught)
    hint = (
      " Their state has another structure than this jaxscope builds for the recorded "
      "configuration: a version whose state differs wrote them (CHANGELOG); resume with "
      "that version. Nothing was moved."
      if "Structure mismatch" in why
      else ""
    )
    raise ValueError(
      f"train(resume=True): none of the checkpoints {sorted(ckpt.saved)} in "
      f"{layout.checkpoints} could be restored ({why}).{hint}"
    )
  which, state, _ = found
  state = TrainState(**state) if which == 1 else state
  start = int(state.step)
  damaged = sorted(step for step in ckpt.saved if step > start)
  if damaged:
    warnings.warn(
      f"train(resume=True): checkpoints {damaged} could not be read "
      f"({_first_line(caught)}); resuming from step {start}. They were moved to "
      f"{layout.damaged_checkpoints} and will be written again.",
      stacklevel=3,
    )
    _set_aside(ckpt, layout, damaged)
  notes: tuple[str, ...] = ()
  alpha_from = 1
  if which == 1 and s.instruments is not None:
    fresh = s.initial_state()
    state = state._replace(instruments=fresh.instruments)
    state, notes = carry_over(state, fresh)
    notes = ("the checkpoint holds no instrument state; the instruments start afresh",)
  elif recorded is not s:
    state, notes = carry_over(state, s.initial_state())
  if any("measurements" in n or "instrument" in n for n in notes):
    alpha_from = start + 1
  return Restored(state, start, alpha_from, notes)


def _first_line(caught: list[warnings.WarningMessage]) -> str:
  for w in caught:
    text = str(w.message).strip().splitlines()
    if text:
      line = text[0]
      return line if len(line) <= 300 else line[:297] + "..."
  return "unreadable"
