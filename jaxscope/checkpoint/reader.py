"""Reading checkpoints back, read-only: :class:`RunCheckpoints` (see :mod:`jaxscope.checkpoint`)."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxscope.checkpoint.layout import (
  CHECKPOINT_DIR,
  CheckpointLayout,
  CheckpointLayoutError,
  collections_of,
  describe_keys,
  find_layout,
  item_names,
  parse_key,
  subtree,
)
from jaxscope.tree import path_name

__all__ = ["Checkpoint", "DamagedCheckpointWarning", "RunCheckpoints"]

# What a restore reads: the parameters and the non-params collections (see CheckpointLayout).
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
  :func:`jaxscope.train.train` or ``jaxscope train``; the ``checkpoints`` folder itself is
  accepted too), or the directory of an orbax ``CheckpointManager`` of your own loop, with
  an orbax ``CheckpointManager`` in read-only mode: nothing on disk is written or cleaned
  up, so it is safe on a run that is still training (call :meth:`reload` to see its new
  steps).

  Restores read only the parameters and the non-params collections (``model_state``:
  BatchNorm statistics), with shapes and dtypes taken from each step's own metadata, so no
  model or optimizer has to be built first. Where they are in a checkpoint is its
  :attr:`layout`: by default jaxscope's own (item ``state`` with ``params`` and
  ``model_state``, JSON item ``meta``); else the only item (``default`` when it was saved
  unnamed) or the only one holding a ``params`` subtree, with the params at ``params`` and
  the collections at ``model_state`` or ``batch_stats`` beside them (a flax ``TrainState``
  saved whole, or a ``{"params": …, "opt_state": …}`` dict); ``item=``, ``params_key=`` and
  ``model_state_key=`` say otherwise. Without a ``meta`` item a step's metadata is
  ``{"step": step}``.

  A step that is listed but damaged (truncated or missing files) raises ``ValueError`` in
  :meth:`restore` and is skipped with a :class:`DamagedCheckpointWarning` by :meth:`iter`.
  Use it as a context manager, or call :meth:`close`. Reading silences orbax's absl and
  asyncio logging for the duration of each call (process-wide), so use one thread.

  Args:
    run_dir: the run directory (holding ``config.json`` and ``checkpoints/``), or a
      ``CheckpointManager``'s directory (holding the step folders ``0/``, ``100/``, …).
    sharding: where :meth:`restore` and :meth:`iter` put the arrays when they are given
      no ``sharding`` of their own (see :meth:`restore`; default: the first device).
      :func:`jaxscope.load_run` passes the run's own layout here for a run trained on a
      device mesh (:func:`jaxscope.run.mesh.checkpoint_sharding`).
    item: the orbax item holding the parameters (default: ``"state"`` when present, else
      the only item, else the only one with a subtree at ``params_key``).
    params_key: the ``/``-separated path of the params tree in the item (default
      ``"params"``; ``""`` or ``"."``: the item itself is the params tree; digits index lists).
    model_state_key: the path of the non-params collections, a dict ``{collection: tree}``
      (a path ending in ``batch_stats`` is that collection), ``"none"`` for none (default:
      ``model_state``, else ``batch_stats``, beside the params, else none).

  Raises:
    ValueError: the directory does not exist, or holds no checkpoints.
    CheckpointLayoutError: the parameters are not where asked or looked for (a
      ``ValueError``; the message lists the items and keys found and how to choose).

  Example:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> d = tempfile.mkdtemp()
    >>> mngr = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(create=True))
    >>> for step in (0, 1):
    ...   state = {"params": {"w": jnp.full(2, step, jnp.float32)}, "opt_state": {}}
    ...   _ = mngr.save(step, args=ocp.args.StandardSave(state))
    >>> mngr.wait_until_finished(); mngr.close()
    >>> with RunCheckpoints(d) as ckpts:
    ...   print(ckpts.steps, ckpts.layout)
    ...   print(ckpts.restore(1).params["w"], ckpts.meta(1))
    [0, 1] CheckpointLayout(item='default', params='params', model_state=None, meta=False)
    [1. 1.] {'step': 1}
  """

  def __init__(
    self,
    run_dir: str | Path,
    *,
    sharding: Any = None,
    item: str | None = None,
    params_key: str | None = None,
    model_state_key: str | None = None,
  ) -> None:
    import orbax.checkpoint as ocp

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
      raise ValueError(f"RunCheckpoints: run directory {run_dir} does not exist.")
    if item is not None and not isinstance(item, str):
      raise ValueError(f"RunCheckpoints: item must be an item's name, got {item!r}.")
    parse_key(params_key, "params_key")  # Strings or None.
    parse_key(model_state_key, "model_state_key")
    directory = run_dir / CHECKPOINT_DIR
    if not directory.is_dir() and run_dir.name == CHECKPOINT_DIR:
      directory, run_dir = run_dir, run_dir.parent
    elif not directory.is_dir() and item_names(run_dir):  # A CheckpointManager's own folder.
      directory = run_dir
    self.run_dir = run_dir
    """The run directory (for a ``CheckpointManager``'s folder, that folder)."""
    self.directory = directory
    """The orbax checkpoint directory, ``run_dir/checkpoints`` (or the manager's folder)."""
    self.sharding = sharding
    """The default ``sharding`` of :meth:`restore` and :meth:`iter` (``None``: the first
    device)."""
    self._ocp = ocp
    self._manager: Any = None
    self._options = {"item": item, "params_key": params_key, "model_state_key": model_state_key}
    self._layout: CheckpointLayout | None = None
    hint = (
      "train with checkpoint_every=k (jaxscope train --checkpoint-every k; by default "
      "`jaxscope train` writes one at step 0, every epoch and at the end), or pass the "
      "directory of an orbax CheckpointManager."
    )
    if not directory.is_dir():
      raise ValueError(f"RunCheckpoints: {run_dir} has no checkpoints ({directory}); {hint}")
    names = item_names(directory) or ["meta", "state"]
    self._items = names
    handlers = {
      n: ocp.JsonCheckpointHandler() if n == "meta" else ocp.PyTreeCheckpointHandler()
      for n in names
    }
    with _quiet():
      self._manager = ocp.CheckpointManager(
        directory.absolute(),
        item_names=tuple(names),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers=handlers,
      )
    if not self._manager.all_steps():
      self.close()
      raise ValueError(f"RunCheckpoints: {run_dir} has no checkpoints in {directory}; {hint}")
    try:
      self._resolve()
    except CheckpointLayoutError:
      self.close()
      raise

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
    """The JSON record saved with ``step`` (``step``, ``epoch``, ``wall_time``, …;
    ``{"step": step}`` for checkpoints without a ``meta`` item).

    Raises:
      ValueError: ``step`` is not a checkpoint, or its record cannot be read.
    """
    step = self._check_step(step)
    if "meta" not in self._items:
      return {"step": step}
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

  @property
  def layout(self) -> CheckpointLayout:
    """Where the checkpoints keep the parameters (:class:`CheckpointLayout`), found in
    the newest step whose metadata can be read.

    Raises:
      ValueError: no step's metadata can be read.
    """
    layout = self._resolve()
    if layout is None:
      raise ValueError(f"RunCheckpoints: no checkpoint in {self.directory} can be read.")
    return layout

  def _resolve(self) -> CheckpointLayout | None:
    """The layout (cached), or ``None`` while no step's metadata can be read."""
    if self._layout is None:
      for step in reversed(self.steps):
        md, error = _attempt(lambda s=step: self._mngr().item_metadata(s))
        trees = {} if error else {n: getattr(md[n], "tree", None) for n in md if n != "meta"}
        if any(t is not None for t in trees.values()):
          where = str(self.directory)
          self._layout = find_layout(trees, "meta" in self._items, where, **self._options)
          break
    return self._layout

  def _tree_metadata(self, step: int) -> tuple[CheckpointLayout, Any, dict[str, tuple]]:
    """The layout, ``step``'s item metadata tree and its collections (:func:`collections_of`)."""
    layout = self._resolve()
    others = [n for n in self._items if n != "meta"]  # (No layout: no step is readable yet.)
    item = layout.item if layout else "state" if "state" in others or not others else others[0]
    md, error = _attempt(lambda: self._mngr().item_metadata(step)[item])
    tree = getattr(md, "tree", None)
    if error is None and (tree is None or layout is None):
      error = f"its {item} metadata is missing"
    elif error is None:
      found = collections_of(tree, layout)
      paths = {"params": layout.params, "model_state": layout.model_state}
      missing = [key for c, key in paths.items() if key is not None and c not in found]
      if not missing:
        return layout, tree, found
      error = f"its {item} holds {describe_keys(tree)}, without {missing}"
    raise ValueError(f"RunCheckpoints: checkpoint {step} in {self.directory} is damaged: {error}")

  def abstract_params(self, step: int | None = None) -> Any:
    """The parameters' shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), read from the
    metadata of ``step`` (default: the newest step whose metadata can be read)."""
    return self._abstract("params", step)

  def abstract_model_state(self, step: int | None = None) -> dict:
    """As :meth:`abstract_params`, for ``model_state`` (``{}`` when the model has none)."""
    return self._abstract("model_state", step)

  def _abstract(self, collection: str, step: int | None) -> Any:
    if step is not None:
      _, _, found = self._tree_metadata(self._check_step(step))
    else:
      errors = []
      for s in reversed(self.steps):
        try:
          _, _, found = self._tree_metadata(s)
          break
        except ValueError as e:
          errors.append(str(e))
      else:
        raise ValueError("; ".join(errors))
    if collection not in found:
      return {}
    _, sub, wrap = found[collection]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub)
    return abstract if wrap is None else {wrap: abstract}

  # ------------------------------------------------------------------------- restoring

  def _read(self, step: int, item: Any, restore_args: Any, *, meta: bool) -> Any:
    """Restores the layout's item (leaves not wanted are ``ocp.PLACEHOLDER``) and meta."""
    ocp = self._ocp
    args = {self.layout.item: ocp.args.PyTreeRestore(item=item, restore_args=restore_args)}
    if meta and "meta" in self._items:
      args["meta"] = ocp.args.JsonRestore()
    r, error = _attempt(lambda: self._mngr().restore(step, args=ocp.args.Composite(**args)))
    if error is not None:
      raise ValueError(f"RunCheckpoints: checkpoint {step} in {self.directory} is damaged: {error}")
    return r

  def _pick(self, step: int, tree: Any, wanted: Mapping[tuple, Any], *, meta: bool) -> Any:
    """Restores the leaves of the item tree at the key paths of ``wanted`` (``{path:
    restore args}``); every other leaf is skipped. Returns the item and orbax's result."""
    ocp = self._ocp

    def each(want: Callable[[Any, Any], Any]) -> Any:
      return jax.tree_util.tree_map_with_path(
        lambda p, m: want(m, wanted[tuple(p)]) if tuple(p) in wanted else ocp.PLACEHOLDER, tree
      )

    item = each(lambda m, _: jax.ShapeDtypeStruct(m.shape, m.dtype))
    r = self._read(step, item, each(lambda _, args: args), meta=meta)
    return r[self.layout.item], r

  def restore(self, step: int | None = None, *, sharding: Any = None) -> Checkpoint:
    """Restores the parameters and ``model_state`` of ``step``, with its metadata.

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
    _, tree, found = self._tree_metadata(step)
    wanted = {}
    for collection, (prefix, sub, wrap) in found.items():
      shardings = _shardings_for(sharding, collection, sub if wrap is None else {wrap: sub})
      args = jax.tree.map(
        lambda m, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=tuple(m.shape), dtype=m.dtype),
        sub,
        shardings if wrap is None else shardings[wrap],
      )
      wanted.update(
        {prefix + tuple(p): a for p, a in jax.tree_util.tree_flatten_with_path(args)[0]}
      )
    got, r = self._pick(step, tree, wanted, meta=True)
    out = {}
    for collection, (prefix, _, wrap) in found.items():
      value = subtree(got, prefix)
      out[collection] = value if wrap is None else {wrap: value}
    model_state = out.get("model_state")
    meta = dict(r.meta) if "meta" in self._items else {"step": step}
    return Checkpoint(step, out["params"], dict(model_state) if model_state else {}, meta)

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
      except CheckpointLayoutError:
        raise
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
      except CheckpointLayoutError:
        raise
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
    _, tree, found = self._tree_metadata(step)
    if collection not in found:
      return
    prefix, sub, wrap = found[collection]
    for path, _ in jax.tree_util.tree_flatten_with_path(sub)[0]:
      full = prefix + tuple(path)
      got, _ = self._pick(step, tree, {full: ocp.RestoreArgs(restore_type=np.ndarray)}, meta=False)
      name = path if wrap is None else (jax.tree_util.DictKey(wrap), *path)
      yield path_name(name), np.asarray(subtree(got, full))
