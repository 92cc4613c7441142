"""Recorder: per-step metrics written to a run directory without stalling the train step.

See :mod:`jaxscope.record` for the deferred transfer, the file format and multi-host
behaviour.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np

from jaxscope.packed import PackedValues, unpack
from jaxscope.record.jsonio import dumps_line, write_json

__all__ = ["CONFIG_FILE", "METRICS_FILE", "TENSORBOARD_DIR", "Recorder"]

#: File of a run directory holding one JSON record per written step.
METRICS_FILE = "metrics.jsonl"
#: File of a run directory holding the run's configuration.
CONFIG_FILE = "config.json"
#: Sub-directory of a run directory holding TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"
_MEASURED = "measured"  # Same as jaxscope.metrics.MEASURED (kept import-free: host side).

_Record = tuple[int, dict[str, Any]]
# A pending write: (step, values) from write(); (steps, values) from write_stacked(), with
# the steps as a tuple of host ints or a 1-D device array, and a leading steps axis on values.
_Entry = tuple[int | tuple[int, ...] | jax.Array, Mapping[str, Any]]
_WRITE = "Recorder.write"
_STACKED = "Recorder.write_stacked"


def _drop_unmeasured(values: dict[str, Any]) -> dict[str, Any]:
  """Drops the keys under ``P/`` where ``P/measured`` is false, and the ``P/measured`` flags.

  Several monitors read together (``monitored_metrics`` of a ``multi_transform``) each
  carry their own flag; a monitor that did not measure this step contributes nothing.
  """
  flags = [k for k in values if k.endswith("/" + _MEASURED)]
  if not flags:
    return values
  stale = tuple(k[: -len(_MEASURED)] for k in flags if not bool(np.asarray(values[k])))
  return {k: v for k, v in values.items() if k not in flags and not k.startswith(stale)}


def _check_step(step: Any, where: str = _WRITE, name: str = "step") -> int:
  if isinstance(step, bool | np.bool_) or not isinstance(step, int | np.integer):
    hint = ""
    if isinstance(step, jax.Array):
      hint = " Pass the host-side loop counter: reading a device step would block."
    raise TypeError(f"{where}: {name} must be an int, got {type(step).__name__}.{hint}")
  if step < 0:
    raise ValueError(f"{where}: {name} must be >= 0, got {step}.")
  return int(step)


def _check_values(values: Any, where: str = _WRITE) -> Mapping[str, Any]:
  if not isinstance(values, Mapping):
    raise TypeError(f"{where}: values must be a Mapping[str, array], got {type(values).__name__}.")
  if isinstance(values, PackedValues):  # Checked by its arrays: reading entries would slice.
    if "" in values:
      raise ValueError(f"{where}: got an empty key.")
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(values)):
      raise TypeError(
        f"{where}: the values are tracers; call {where.removeprefix('Recorder.')}() outside "
        "jit, with the values returned by the jitted step."
      )
    return values
  out: dict[str, Any] = {}
  for key, value in values.items():
    if not isinstance(key, str):
      raise TypeError(f"{where}: keys must be str, got {key!r} ({type(key).__name__}).")
    if not key:
      raise ValueError(f"{where}: got an empty key.")
    if isinstance(value, jax.core.Tracer):
      raise TypeError(
        f"{where}: value of {key!r} is a tracer; call {where.removeprefix('Recorder.')}() "
        "outside jit, with the values returned by the jitted step."
      )
    if not isinstance(value, jax.Array | np.ndarray | np.generic | bool | int | float):
      raise TypeError(
        f"{where}: value of {key!r} must be an array or a number, got {type(value).__name__}."
      )
    out[key] = value
  return out


def _shape(value: Any) -> tuple[int, ...]:
  """The shape of an array or number, read without a device transfer."""
  return tuple(getattr(value, "shape", ()))


def _shapes(values: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """Each value's shape, read without a device transfer or a slice."""
  if isinstance(values, PackedValues):
    return values.shapes()
  return {k: _shape(v) for k, v in values.items()}


def _leaves(values: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """The arrays that hold the values, named (a packed mapping's by its groups)."""
  if isinstance(values, PackedValues):
    flat = jax.tree_util.tree_flatten_with_path(values)[0]
    return [(f"{len(values)} packed values ({p[0].key})", a) for p, a in flat]
  return list(values.items())


def _steps_axis(values: Mapping[str, Any]) -> int | None:
  """``T``, the leading axis every stacked value shares (``None`` for no values)."""
  first: tuple[str, tuple[int, ...]] | None = None
  shapes = _shapes(values)
  for key, shape in shapes.items():
    if not shape:
      raise ValueError(
        f"{_STACKED}: value of {key!r} has shape () and no leading steps axis; every value "
        "needs the leading axis T of the stacked steps (write one step with write())."
      )
    if first is None:
      first = (key, shape)
    elif shape[0] != first[1][0]:
      raise ValueError(
        f"{_STACKED}: values have different leading (steps) axes: {key!r} has shape {shape}, "
        f"{first[0]!r} has shape {first[1]}."
      )
  if _MEASURED in shapes and len(shapes[_MEASURED]) != 1:
    raise ValueError(f"{_STACKED}: {_MEASURED!r} must have shape (T,), got {shapes[_MEASURED]}.")
  return None if first is None else first[1][0]


def _check_host_steps(steps: Any, length: int | None, name: str = "steps") -> tuple[int, ...]:
  """Checks host steps: 1-D ints, ``length`` of them, non-negative, strictly increasing."""
  a = np.asarray(steps)
  if a.ndim != 1:
    raise ValueError(f"{_STACKED}: {name} must be 1-D (one step per row), got shape {a.shape}.")
  if a.size and a.dtype.kind not in "iu":
    raise TypeError(f"{_STACKED}: {name} must hold ints, got dtype {a.dtype}.")
  if length is not None and a.size != length:
    raise ValueError(
      f"{_STACKED}: {name} has {a.size} entries but the values have a leading axis of {length}."
    )
  out = tuple(int(s) for s in a)
  if out and out[0] < 0:
    raise ValueError(f"{_STACKED}: {name} must be >= 0, got {out[0]}.")
  for prev, step in itertools.pairwise(out):
    if step <= prev:
      raise ValueError(f"{_STACKED}: {name} must be increasing, got {step} after {prev}.")
  return out


def _check_stacked_steps(steps: Any, length: int | None) -> tuple[int, ...] | jax.Array:
  """``write_stacked``'s steps: host ints checked now, a device array kept as it is."""
  if isinstance(steps, int | np.integer) and not isinstance(steps, bool | np.bool_):
    start = _check_step(steps, _STACKED, "steps (the start)")
    if length is None:
      raise ValueError(f"{_STACKED}: no values to take the number of steps from; pass the steps.")
    return tuple(range(start, start + length))
  if isinstance(steps, jax.core.Tracer):
    raise TypeError(f"{_STACKED}: steps is a tracer; call write_stacked() outside jit.")
  if isinstance(steps, jax.Array):
    if steps.ndim != 1 or steps.dtype.kind not in "iu":
      raise TypeError(
        f"{_STACKED}: steps must be a 1-D int array, got {steps.dtype}{list(steps.shape)}."
      )
    if length is not None and steps.shape[0] != length:
      raise ValueError(
        f"{_STACKED}: steps has {steps.shape[0]} entries but the values have a leading "
        f"axis of {length}."
      )
    return steps  # Checked when transferred.
  if isinstance(steps, bool | np.bool_ | float | str | bytes | Mapping) or steps is None:
    raise TypeError(
      f"{_STACKED}: steps must be an int start or a 1-D sequence of ints, "
      f"got {type(steps).__name__}."
    )
  return _check_host_steps(steps, length)


def _rows(entry: _Entry, host: tuple[Any, list[Any]]) -> list[_Record]:
  """The ``(step, host values)`` rows of a transferred entry (one for ``write``)."""
  steps, device_values = entry
  host_steps, host_values = host
  if isinstance(host_values, PackedValues):
    values = unpack(host_values)  # numpy views
  else:
    values = dict(zip(device_values, host_values, strict=True))
  if isinstance(steps, int):
    return [(steps, values)]
  if isinstance(steps, jax.Array):  # Only now on the host.
    host_steps = _check_host_steps(host_steps, len(steps), name="steps (device array)")
  else:
    host_steps = steps
  return [(step, {k: v[i] for k, v in values.items()}) for i, step in enumerate(host_steps)]


def _to_json_value(key: str, value: Any) -> Any:
  """Converts a host value to a JSON-able float / int / bool or (nested) list of them."""
  a = np.asarray(value)
  if a.dtype.kind in "iu":
    a = a.astype(np.int64)
  elif a.dtype.kind == "f":
    a = a.astype(np.float64)
  elif a.dtype.kind != "b":
    try:  # bfloat16 and other ml_dtypes floats.
      a = a.astype(np.float64)
    except (TypeError, ValueError) as e:
      raise TypeError(f"Recorder: cannot record {key!r} of dtype {a.dtype}.") from e
  return a.item() if a.ndim == 0 else a.tolist()


def _histogram_stat(key: str) -> tuple[str, str] | None:
  """For ``{topic}/{name}_counts/{layer}`` returns (edges key, histogram tag)."""
  parts = key.split("/", 2)
  if len(parts) != 3 or not parts[1].endswith("_counts"):
    return None
  topic, stat, layer = parts
  name = stat[: -len("_counts")]
  return f"{topic}/{name}_edges/{layer}", f"{topic}/{name}/{layer}"


class Recorder:
  """Appends per-step metrics to ``run_dir/metrics.jsonl`` without stalling the device.

  See the module docstring for the deferred transfer, the file format and multi-host
  behaviour. Use it as a context manager, or call :meth:`close` at the end: values
  still pending when the process ends without a :meth:`flush` or :meth:`close` are
  lost (nothing is registered at exit). Not thread-safe.

  Args:
    run_dir: the run directory; created with its parents. An existing
      ``metrics.jsonl`` is appended to (resuming a run); a truncated last line left by a
      crash is closed with a newline first, so new records stay readable.
    transfer_every: number of steps transferred per batch. ``1`` transfers the values
      of step ``k`` when step ``k + 1`` is written; ``N`` transfers steps ``k … k+N−1``
      in one ``device_get`` when step ``k + N`` is written (fewer host syncs, and up
      to ``N`` steps lost on a hard crash).
    tensorboard: also write TensorBoard events to ``run_dir/tensorboard`` (needs
      ``tensorboardX``: ``pip install 'jaxscope[tensorboard]'``). Scalars go to
      ``add_scalar``; ``{topic}/histogram_counts/{layer}`` with its
      ``{topic}/histogram_edges/{layer}`` go to ``add_histogram_raw`` under the tag
      ``{topic}/histogram/{layer}`` (sum and sum of squares estimated from the bin
      centres); other arrays are not sent to TensorBoard.
    config: the run's configuration, written (atomically) to ``run_dir/config.json``.
      Values that JSON cannot hold are converted: numpy scalars and arrays to numbers
      and lists, paths to strings, anything else to ``str(value)``.

  Raises:
    ImportError: ``tensorboard=True`` but ``tensorboardX`` is not installed.
    ValueError: ``transfer_every`` is not a positive int.
  """

  def __init__(
    self,
    run_dir: str | os.PathLike[str],
    *,
    transfer_every: int = 1,
    tensorboard: bool = False,
    config: Mapping[str, Any] | None = None,
  ) -> None:
    if isinstance(transfer_every, bool) or not isinstance(transfer_every, int):
      raise TypeError(f"Recorder: transfer_every must be an int, got {transfer_every!r}.")
    if transfer_every < 1:
      raise ValueError(f"Recorder: transfer_every must be >= 1, got {transfer_every}.")
    if config is not None and not isinstance(config, Mapping):
      raise TypeError(f"Recorder: config must be a dict, got {type(config).__name__}.")
    self._run_dir = Path(run_dir)
    self._transfer_every = transfer_every
    self._pending: list[_Entry] = []
    self._file: Any = None
    self._tb: Any = None
    self._closed = False
    self._active = jax.process_index() == 0
    if not self._active:
      return
    summary_writer = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter as summary_writer
      except ImportError as e:
        raise ImportError(
          "Recorder(tensorboard=True) needs tensorboardX: pip install 'jaxscope[tensorboard]'"
        ) from e
    self._run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
      write_json(self._run_dir / CONFIG_FILE, dict(config), indent=2, sort_keys=True)
    path = self._run_dir / METRICS_FILE
    self._file = open(path, "a", encoding="utf-8")  # Closed in close().
    if self._file.tell() > 0:
      with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":  # A crashed run left a truncated line: close it.
          self._file.write("\n")
          self._file.flush()
    if summary_writer is not None:
      self._tb = summary_writer(logdir=str(self._run_dir / TENSORBOARD_DIR))

  @property
  def run_dir(self) -> Path:
    """The run directory."""
    return self._run_dir

  @property
  def closed(self) -> bool:
    """Whether :meth:`close` was called."""
    return self._closed

  @property
  def num_pending(self) -> int:
    """Number of written steps not transferred to the host yet (all rows of a stacked write)."""
    return sum(1 if isinstance(steps, int) else len(steps) for steps, _ in self._pending)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    """Records the values of one step; returns without waiting for the device.

    The values are kept (not read) until the next write; see the module docstring.

    Args:
      step: the step number, a non-negative Python or numpy int (not a device array,
        whose reading would block).
      values: a flat mapping from str keys to arrays (``jax.Array``, numpy) or
        numbers, e.g. a scope's values. A false ``"measured"`` entry drops the step; a
        false ``"P/measured"`` entry drops the keys ``P/…`` (several monitors).

    Raises:
      TypeError: ``step`` is not an int, ``values`` not a mapping, a key not a str or a
        value neither an array nor a number.
      ValueError: ``step`` is negative, ``"measured"`` is not a scalar (stacked values:
        use :meth:`write_stacked`), or the recorder is closed.
    """
    step = _check_step(step)
    values = _check_values(values)
    measured_shape = _shapes(values).get(_MEASURED, ())
    if measured_shape != ():
      raise ValueError(
        f"{_WRITE}: {_MEASURED!r} has shape {measured_shape}, not a scalar: the "
        "values of several steps stacked on a leading axis (e.g. the outputs of lax.scan)? "
        "Write them with write_stacked(steps, values)."
      )
    self._append(step, values, _WRITE)

  def write_stacked(
    self, steps: int | Sequence[int] | np.ndarray | jax.Array, values: Mapping[str, Any]
  ) -> None:
    """Records the values of ``T`` steps stacked on a leading axis, e.g. by ``lax.scan``.

    Row ``i`` of every value is the value of step ``steps[i]``: the file, TensorBoard and
    :class:`History` get exactly what ``T`` calls ``write(steps[i], {k: v[i] ...})``
    would give them, rows whose ``"measured"`` entry is false dropped. Like
    :meth:`write` it returns without waiting for the device: the values (one entry
    towards ``transfer_every``, whatever ``T``) are transferred by a later call.

    Args:
      steps: the steps of the rows: an int ``start`` (steps ``start, start + 1, …,
        start + T − 1``), or ``T`` increasing non-negative ints (a sequence or numpy
        array). A 1-D int device array is accepted too; it is transferred (and checked)
        with the values, so its errors come from the call that transfers them.
      values: a flat mapping from str keys to arrays with a common leading axis ``T``,
        e.g. a scope's values stacked by ``lax.scan``; ``"measured"``, if present, has
        shape ``[T]``.

    Raises:
      TypeError: ``steps`` neither an int nor a sequence of ints, ``values`` not a
        mapping, a key not a str or a value not an array.
      ValueError: a value without the common leading axis, ``steps`` of the wrong length,
        negative or not increasing, or the recorder is closed.

    Example:
      >>> import tempfile
      >>> import jax, jax.numpy as jnp
      >>> from jaxscope import metrics
      >>> from jaxscope.record import History, Recorder
      >>> sc = metrics.scope(params=["norm"], every=2)
      >>> def body(carry, _):
      ...   params, state = carry
      ...   params = jax.tree.map(lambda p: 0.5 * p, params)
      ...   values, state = sc.update(state, params=params)
      ...   return (params, state), values
      >>> scan = jax.jit(lambda carry: jax.lax.scan(body, carry, length=4))
      >>> params = {"w": jnp.ones((3, 2))}
      >>> carry = (params, sc.init(params))
      >>> run_dir = tempfile.mkdtemp()
      >>> with Recorder(run_dir) as rec:
      ...   for start in (0, 4):
      ...     carry, values = scan(carry)  # values["measured"].shape == (4,)
      ...     rec.write_stacked(start, values)
      >>> h = History.load(run_dir)
      >>> h.steps("params/norm/w").tolist(), h["params/norm/w"].round(3).tolist()
      ([0, 2, 4, 6], [1.225, 0.306, 0.077, 0.019])
    """
    values = _check_values(values, _STACKED)
    for key, value in _leaves(values):
      if not isinstance(value, jax.Array | np.ndarray):
        raise TypeError(
          f"{_STACKED}: value of {key!r} must be an array with a leading steps axis, "
          f"got {type(value).__name__}."
        )
    steps = _check_stacked_steps(steps, _steps_axis(values))
    self._append(steps, values, _STACKED)

  def _append(self, steps: Any, values: Mapping[str, Any], where: str) -> None:
    """Keeps checked values pending; transfers the older ones once enough are pending."""
    if self._closed:
      raise ValueError(f"{where}: the recorder is closed.")
    if not self._active:
      return
    for _, value in [*_leaves(values), ("steps", steps)]:
      if isinstance(value, jax.Array):
        # Start the copy; the result is read later. A deleted array fails here and is
        # reported with a clear message at transfer time.
        with contextlib.suppress(Exception):
          value.copy_to_host_async()
    self._pending.append((steps, values))
    if len(self._pending) > self._transfer_every:
      batch = self._pending[:-1]
      self._pending = self._pending[-1:]
      self._transfer(batch)

  def flush(self) -> None:
    """Transfers and writes every pending step; flushes the file and TensorBoard."""
    if not self._active or self._closed:
      return
    batch, self._pending = self._pending, []
    if batch:
      self._transfer(batch)
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes, then closes the files. Idempotent."""
    if self._closed:
      return
    try:
      self.flush()
    finally:
      self._closed = True
      self._pending = []
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()

  def __enter__(self) -> Recorder:
    return self

  def __exit__(
    self,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
  ) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # Save what can be saved, without hiding the exception being raised.
      self.close()
    except Exception as e:
      warnings.warn(
        f"Recorder: could not write the pending steps while handling {exc_type.__name__}: {e!r}",
        RuntimeWarning,
        stacklevel=2,
      )

  def _transfer(self, batch: list[_Entry]) -> None:
    for steps, values in batch:
      for key, value in [*_leaves(values), ("steps", steps)]:
        if isinstance(value, jax.Array) and value.is_deleted():
          at = f"step {steps}" if isinstance(steps, int) else "the stacked steps"
          raise RuntimeError(
            f"Recorder: the value of {key!r} at {at} was deleted before it was "
            "transferred (donated to a later jitted call?). Return the metrics from the "
            "jitted step instead of reading them from a donated state."
          )
    # Lists, not dicts: pytree flattening would sort the keys, and the file keeps their order
    # (a packed mapping keeps it itself). Steps travel only when on the device (write_stacked
    # given a device array).
    host = jax.device_get(
      [
        (
          s if isinstance(s, jax.Array) else None,
          v if isinstance(v, PackedValues) else list(v.values()),
        )
        for s, v in batch
      ]
    )
    rows = [row for entry, h in zip(batch, host, strict=True) for row in _rows(entry, h)]
    lines = []
    records: list[_Record] = []
    for step, values in rows:
      if _MEASURED in values and not bool(np.asarray(values[_MEASURED])):
        continue
      values = _drop_unmeasured(values)
      out = {k: _to_json_value(k, v) for k, v in values.items() if k != _MEASURED}
      records.append((step, out))
      lines.append(dumps_line({"step": step, "values": out}) + "\n")
    if lines:
      self._file.write("".join(lines))
    self._file.flush()
    if self._tb is not None:
      for step, out in records:
        self._write_tensorboard(step, out)

  def _write_tensorboard(self, step: int, values: dict[str, Any]) -> None:
    for key, value in values.items():
      if isinstance(value, bool | int | float):
        self._tb.add_scalar(key, float(value), global_step=step)
        continue
      hist = _histogram_stat(key)
      if hist is None or hist[0] not in values:
        continue
      counts = np.asarray(value, np.float64)
      edges = np.asarray(values[hist[0]], np.float64)
      if counts.ndim != 1 or edges.shape != (counts.size + 1,) or counts.size == 0:
        continue
      if not np.all(np.isfinite(edges)):
        continue
      centers = 0.5 * (edges[:-1] + edges[1:])
      self._tb.add_histogram_raw(
        hist[1],
        min=float(edges[0]),
        max=float(edges[-1]),
        num=float(counts.sum()),
        sum=float(np.sum(counts * centers)),
        sum_squares=float(np.sum(counts * centers**2)),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
      )
