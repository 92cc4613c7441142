"""Read a training run's orbax checkpoints: params, BatchNorm statistics and metadata.

:func:`jaxscope.train.train` writes an orbax checkpoint at step 0, every
``checkpoint_every`` steps and at the end (see :mod:`jaxscope.train`); each one holds the
whole :class:`~jaxscope.train.TrainState` (item ``state``) and a JSON record (item
``meta``: ``step``, ``epoch``, ``wall_time``, ``eval_loss``, ``eval_accuracy``).
:class:`RunCheckpoints` opens them **read-only** for the analyses that walk a trajectory
(interpolation, landscapes, PCA of the path): it restores only ``params`` and
``model_state`` (never the optimizer state, so no optimizer has to be rebuilt), takes the
shapes from the checkpoint's own metadata, streams one leaf at a time for models too large
to hold twice, and skips damaged steps with a warning.

>>> import tempfile
>>> from jaxscope.checkpoint import RunCheckpoints
>>> from jaxscope.train import train
>>> run = train(model="mlp", dataset="digits", steps=2, checkpoint_every=1, metrics="none",
...             out=tempfile.mkdtemp(), quiet=True)
>>> with RunCheckpoints(run.run_dir) as ckpts:
...   print(ckpts.steps)
...   last = ckpts.restore(2)
...   print(sorted(last.params), last.model_state, last.meta["step"])
...   print([name for name, _ in ckpts.leaves(0)][:2])
[0, 1, 2]
['fc1', 'fc2', 'out'] {} 2
['fc1/bias', 'fc1/kernel']
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxscope.tree import path_name

__all__ = [
  "CHECKPOINT_DIR",
  "Checkpoint",
  "CheckpointWriter",
  "DamagedCheckpointWarning",
  "RunCheckpoints",
]

#: The checkpoints' folder inside a run directory (see :mod:`jaxscope.run`).
CHECKPOINT_DIR = "checkpoints"

# What a restore reads of the ``state`` item (the TrainState fields, saved as dict keys).
_COLLECTIONS = ("params", "model_state")


class Checkpoint(NamedTuple):
  """One restored checkpoint of a run: the model's variables and the step's metadata."""

  step: int
  """The step: the number of updates applied (0 is the initialisation)."""
  params: Any
  """The model's parameters, as the run saved them (``jax.Array`` leaves)."""
  model_state: dict
  """Non-parameter collections (e.g. ``{"batch_stats": …}``), ``{}`` when none."""
  meta: dict
  """The step's JSON record: ``step``, ``epoch``, ``wall_time``, ``eval_loss``, … ."""

  @property
  def variables(self) -> dict:
    """``{"params": params, **model_state}``, as ``model.apply`` takes them."""
    return {"params": self.params, **self.model_state}


class DamagedCheckpointWarning(UserWarning):
  """A checkpoint step is listed on disk but cannot be read; it was skipped."""


def _describe(error: BaseException) -> str:
  """A short description of an orbax/tensorstore error: its root cause, first line."""
  root = error
  seen = {id(root)}
  while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
    seen.add(id(nxt))
    root = nxt
  lines = str(root).split(" See full TensorStore")[0].strip().splitlines()
  text = f"{type(root).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Silences orbax's absl and asyncio logging and unraisable-exception reports."""
  loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]
  levels = [lg.level for lg in loggers]
  hook = sys.unraisablehook
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    sys.unraisablehook = hook
    for lg, level in zip(loggers, levels, strict=True):
      lg.setLevel(level)


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
  """Runs an orbax call quietly: ``(result, None)``, or ``(None, what went wrong)``.

  A read-only manager logs absl warnings, and a failed restore leaves orbax's unfinished
  read coroutines behind, which report their errors again ("Exception ignored in
  <coroutine …>", "Task exception was never retrieved") when they are collected. After a
  failure they are collected here, still quietly, so a damaged step gives one message.
  """
  with _quiet():
    try:
      return fn(), None
    except Exception as e:
      error = _describe(e)
      del e
    gc.collect()
  return None, error


def _shardings_for(sharding: Any, collection: str, metadata: Any) -> Any:
  """A pytree of shardings matching ``metadata`` (the saved ``collection``) from the
  ``sharding`` argument of :meth:`RunCheckpoints.restore`."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(sharding, Mapping):
    unknown = sorted(set(sharding) - set(_COLLECTIONS))
    if unknown:
      raise ValueError(
        f"RunCheckpoints.restore: sharding has keys {unknown}; expected {list(_COLLECTIONS)}."
      )
    sharding = sharding.get(collection, default)
  if sharding is None:
    sharding = default
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda _: sharding, metadata)
  if callable(sharding):  # A rule: the collection's shapes and dtypes → its shardings.
    sharding = sharding(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata))
  want, got = jax.tree.structure(metadata), jax.tree.structure(sharding)
  if want != got:
    raise ValueError(
      f"RunCheckpoints.restore: the shardings of {collection!r} do not match the checkpoint's "
      f"tree: expected {want}, got {got}."
    )
  for s in jax.tree.leaves(sharding):
    if not isinstance(s, jax.sharding.Sharding):
      raise ValueError(
        f"RunCheckpoints.restore: the shardings of {collection!r} must be "
        f"jax.sharding.Sharding leaves, got {type(s).__name__}."
      )
  return sharding


class RunCheckpoints:
  """The checkpoints of one training run, opened read-only.

  ``RunCheckpoints(run_dir)`` opens ``run_dir/checkpoints`` (a run written by
  :func:`jaxscope.train.train` or ``jaxscope train``; the ``checkpoints`` folder itself
  is accepted too) with an orbax ``CheckpointManager`` in read-only mode: nothing on disk
  is written or cleaned up, so it is safe on a run that is still training (call
  :meth:`reload` to see its new steps).

  Restores read only ``params`` and ``model_state`` of the saved
  :class:`~jaxscope.train.TrainState`, with shapes and dtypes taken from each step's own
  metadata, so no model or optimizer has to be built first. A step that is listed but
  damaged (truncated or missing files) raises ``ValueError`` in :meth:`restore` and is
  skipped with a :class:`DamagedCheckpointWarning` by :meth:`iter`.

  Use it as a context manager, or call :meth:`close`. Reading silences orbax's absl and
  asyncio logging for the duration of each call (process-wide), so use one thread.

  Args:
    run_dir: the run directory (holding ``config.json`` and ``checkpoints/``).
    sharding: where :meth:`restore` and :meth:`iter` put the arrays when they are given
      no ``sharding`` of their own (see :meth:`restore`; default: the first device).
      :func:`jaxscope.load_run` passes the run's own layout here for a run trained on a
      device mesh (:func:`jaxscope.run.mesh.checkpoint_sharding`).

  Raises:
    ValueError: the directory does not exist, or holds no checkpoints.
  """

  def __init__(self, run_dir: str | Path, *, sharding: Any = None) -> None:
    import orbax.checkpoint as ocp

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
      raise ValueError(f"RunCheckpoints: run directory {run_dir} does not exist.")
    directory = run_dir / CHECKPOINT_DIR
    if not directory.is_dir() and run_dir.name == CHECKPOINT_DIR:
      directory, run_dir = run_dir, run_dir.parent
    self.run_dir = run_dir
    """The run directory."""
    self.directory = directory
    """The orbax checkpoint directory, ``run_dir/checkpoints``."""
    self.sharding = sharding
    """The default ``sharding`` of :meth:`restore` and :meth:`iter` (``None``: the first
    device)."""
    self._ocp = ocp
    self._manager: Any = None
    hint = (
      "train with checkpoint_every=k (jaxscope train --checkpoint-every k; by default "
      "`jaxscope train` writes one at step 0, every epoch and at the end)."
    )
    if not directory.is_dir():
      raise ValueError(f"RunCheckpoints: {run_dir} has no checkpoints ({directory}); {hint}")
    with _quiet():
      self._manager = ocp.CheckpointManager(
        directory.absolute(),
        item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={
          "state": ocp.PyTreeCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(),
        },
      )
    if not self._manager.all_steps():
      self.close()
      raise ValueError(f"RunCheckpoints: {run_dir} has no checkpoints in {directory}; {hint}")

  # ------------------------------------------------------------------------- listing

  def __repr__(self) -> str:
    return f"RunCheckpoints({str(self.run_dir)!r}, steps={self.steps})"

  def __enter__(self) -> RunCheckpoints:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def close(self) -> None:
    """Closes the orbax manager (idempotent)."""
    if self._manager is not None:
      with _quiet():
        self._manager.close()
      self._manager = None

  def _mngr(self) -> Any:
    if self._manager is None:
      raise ValueError(f"RunCheckpoints({str(self.run_dir)!r}) is closed.")
    return self._manager

  def reload(self) -> None:
    """Lists the checkpoint directory again (for a run that is still training)."""
    with _quiet():
      self._mngr().reload()

  @property
  def steps(self) -> list[int]:
    """The steps on disk, sorted (damaged ones included; see :meth:`readable_steps`)."""
    return sorted(int(s) for s in self._mngr().all_steps())

  def _check_step(self, step: int) -> int:
    steps = self.steps
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or int(step) not in steps:
      raise ValueError(
        f"RunCheckpoints: no checkpoint at step {step!r} in {self.directory}; "
        f"available steps: {steps}."
      )
    return int(step)

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON record saved with ``step`` (``step``, ``epoch``, ``wall_time``, …).

    Raises:
      ValueError: ``step`` is not a checkpoint, or its record cannot be read.
    """
    step = self._check_step(step)
    ocp = self._ocp
    r, error = _attempt(
      lambda: self._mngr().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    )
    if error is not None:
      raise ValueError(f"RunCheckpoints: the metadata of step {step} cannot be read: {error}")
    return dict(r.meta)

  def metas(self) -> dict[int, dict[str, Any]]:
    """``{step: meta(step)}`` for every step whose record can be read (maps steps to
    epochs, wall time and evaluation); unreadable ones are skipped with a warning."""
    out = {}
    for step in self.steps:
      try:
        out[step] = self.meta(step)
      except ValueError as e:
        warnings.warn(str(e), DamagedCheckpointWarning, stacklevel=2)
    return out

  # ------------------------------------------------------------------------- metadata

  def _tree_metadata(self, step: int) -> dict[str, Any]:
    """The metadata tree of ``step``'s ``state`` item (TrainState fields as keys)."""
    md, error = _attempt(lambda: self._mngr().item_metadata(step)["state"])
    tree = getattr(md, "tree", None)
    if error is None and not isinstance(tree, dict):
      error = "its state metadata is missing"
    elif error is None and not all(k in tree for k in _COLLECTIONS):
      error = f"its state holds {sorted(tree)}, not {list(_COLLECTIONS)} (not a jaxscope run?)"
    if error is not None:
      raise ValueError(f"RunCheckpoints: checkpoint {step} in {self.directory} is damaged: {error}")
    return tree

  def abstract_params(self, step: int | None = None) -> Any:
    """The parameters' shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), read from the
    metadata of ``step`` (default: the newest step whose metadata can be read)."""
    return self._abstract("params", step)

  def abstract_model_state(self, step: int | None = None) -> dict:
    """As :meth:`abstract_params`, for ``model_state`` (``{}`` when the model has none)."""
    return self._abstract("model_state", step)

  def _abstract(self, collection: str, step: int | None) -> Any:
    if step is not None:
      tree = self._tree_metadata(self._check_step(step))
    else:
      errors = []
      for s in reversed(self.steps):
        try:
          tree = self._tree_metadata(s)
          break
        except ValueError as e:
          errors.append(str(e))
      else:
        raise ValueError("; ".join(errors))
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[collection])

  # ------------------------------------------------------------------------- restoring

  def _read(self, step: int, item: Any, restore_args: Any, *, meta: bool) -> Any:
    """Restores ``item`` (leaves not wanted are ``ocp.PLACEHOLDER``) and optionally meta."""
    ocp = self._ocp
    args = {"state": ocp.args.PyTreeRestore(item=item, restore_args=restore_args)}
    if meta:
      args["meta"] = ocp.args.JsonRestore()
    r, error = _attempt(lambda: self._mngr().restore(step, args=ocp.args.Composite(**args)))
    if error is not None:
      raise ValueError(f"RunCheckpoints: checkpoint {step} in {self.directory} is damaged: {error}")
    return r

  def restore(self, step: int | None = None, *, sharding: Any = None) -> Checkpoint:
    """Restores ``params`` and ``model_state`` of ``step``, with its metadata.

    The optimizer state is not read. Arrays come back as ``jax.Array`` with the shapes and
    dtypes they were saved with, placed as ``sharding`` says: by default as the reader's
    :attr:`sharding` (the first device, unless it was opened with another: a run loaded
    with :func:`jaxscope.load_run` comes back in its training layout when the devices are
    there); for a run trained sharded over a mesh, its shardings give the arrays back
    sharded (each device reads only its shards).

    Args:
      step: a step of :attr:`steps`; ``None``: the newest step that can be read (damaged
        newer ones are skipped with a :class:`DamagedCheckpointWarning`).
      sharding: ``None`` (the reader's :attr:`sharding`), one ``jax.sharding.Sharding``
        for every leaf (e.g. ``NamedSharding(mesh, P())`` to replicate, or
        ``SingleDeviceSharding(jax.devices()[0])`` for the first device whatever the
        reader's default), a rule ``f(abstract) -> shardings`` called with a collection's
        tree of ``jax.ShapeDtypeStruct`` (e.g. :func:`jaxscope.run.mesh.checkpoint_sharding`),
        or a dict ``{"params": …, "model_state": …}`` whose entries are a ``Sharding``, a
        rule or a pytree of shardings matching that collection (e.g. the shardings of the
        train state's ``params``); a collection left out of the dict goes to the first
        device.

    Raises:
      ValueError: ``step`` is not a checkpoint (the message lists the steps), it is
        damaged (the message says how), or ``sharding`` does not match the checkpoint.
    """
    if sharding is None:
      sharding = self.sharding
    if step is None:
      for ckpt in self.iter(reversed(self.steps), sharding=sharding):
        return ckpt
      raise ValueError(f"RunCheckpoints: none of the steps {self.steps} can be read.")
    step = self._check_step(step)
    ocp = self._ocp
    tree = self._tree_metadata(step)
    item, restore_args = {}, {}
    for key, sub in tree.items():
      if key in _COLLECTIONS:
        item[key] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub)
        shardings = _shardings_for(sharding, key, sub)
        restore_args[key] = jax.tree.map(
          lambda m, sh: ocp.ArrayRestoreArgs(
            sharding=sh, global_shape=tuple(m.shape), dtype=m.dtype
          ),
          sub,
          shardings,
        )
      else:
        item[key] = restore_args[key] = jax.tree.map(lambda _: ocp.PLACEHOLDER, sub)
    r = self._read(step, item, restore_args, meta=True)
    model_state = r.state["model_state"]
    return Checkpoint(
      step, r.state["params"], dict(model_state) if model_state else {}, dict(r.meta)
    )

  def iter(
    self, steps: Iterable[int] | None = None, *, sharding: Any = None
  ) -> Iterator[Checkpoint]:
    """Restores the checkpoints one after the other (see :meth:`restore`).

    Args:
      steps: the steps to read, in this order (default: :attr:`steps`).
      sharding: where the arrays go (see :meth:`restore`; ``None``: :attr:`sharding`).

    Yields:
      A :class:`Checkpoint` per readable step. A damaged step is skipped with a
      :class:`DamagedCheckpointWarning` naming the step and the error.

    Raises:
      ValueError: a step of ``steps`` is not a checkpoint (checked before reading any).
    """
    wanted = self.steps if steps is None else [self._check_step(s) for s in steps]
    return self._iter(wanted, sharding)

  def _iter(self, steps: list[int], sharding: Any = None) -> Iterator[Checkpoint]:
    for step in steps:
      try:
        ckpt = self.restore(step, sharding=sharding)
      except ValueError as e:
        warnings.warn(f"{e} Skipped.", DamagedCheckpointWarning, stacklevel=2)
        continue
      yield ckpt

  def __iter__(self) -> Iterator[Checkpoint]:
    return self.iter()

  def readable_steps(self) -> list[int]:
    """The steps whose ``params``, ``model_state`` and metadata can be read.

    This reads every checkpoint in full (and drops it); when you need the values anyway,
    use :meth:`iter`, which skips the damaged steps as it goes.
    """
    out = []
    for step in self.steps:
      try:
        self.restore(step)
      except ValueError:
        continue
      out.append(step)
    return out

  def leaves(self, step: int, *, collection: str = "params") -> Iterator[tuple[str, np.ndarray]]:
    """Streams the leaves of ``step`` one at a time, as host ``numpy`` arrays.

    Each leaf is restored on its own (every other leaf of the checkpoint is skipped), so
    at most one leaf is in memory at a time: for models too large to hold twice.

    Args:
      step: a step of :attr:`steps`.
      collection: ``"params"`` or ``"model_state"``.

    Yields:
      ``(name, array)`` in the tree's leaf order; names as
      :func:`jaxscope.tree.path_name` (``"conv1/kernel"``; for ``model_state``,
      ``"batch_stats/bn1/mean"``).

    Raises:
      ValueError: unknown step or collection (at the call), or a damaged checkpoint.
    """
    if collection not in _COLLECTIONS:
      raise ValueError(f"RunCheckpoints.leaves: collection must be one of {_COLLECTIONS}.")
    return self._leaves(self._check_step(step), collection)

  def _leaves(self, step: int, collection: str) -> Iterator[tuple[str, np.ndarray]]:
    ocp = self._ocp
    tree = self._tree_metadata(step)
    flat = jax.tree_util.tree_flatten_with_path(tree[collection])[0]
    for path, _ in flat:
      full = (jax.tree_util.DictKey(collection), *path)

      def only(want: Any, full: tuple = full) -> Any:
        return lambda p, m: want(m) if tuple(p) == full else ocp.PLACEHOLDER

      item = jax.tree_util.tree_map_with_path(
        only(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype)), tree
      )
      restore_args = jax.tree_util.tree_map_with_path(
        only(lambda m: ocp.RestoreArgs(restore_type=np.ndarray)), tree
      )
      r = self._read(step, item, restore_args, meta=False)
      (leaf,) = [v for q, v in jax.tree_util.tree_flatten_with_path(r.state)[0] if tuple(q) == full]
      yield path_name(path), np.asarray(leaf)


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
