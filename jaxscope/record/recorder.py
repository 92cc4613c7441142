"""Recorder: per-step metrics written to a run directory without stalling the train step.

See :mod:`jaxscope.record` for the deferred transfer, the file format and multi-host
behaviour.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np

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


def _check_step(step: Any) -> int:
  if isinstance(step, bool | np.bool_) or not isinstance(step, int | np.integer):
    hint = ""
    if isinstance(step, jax.Array):
      hint = " Pass the host-side loop counter: reading a device step would block."
    raise TypeError(f"Recorder.write: step must be an int, got {type(step).__name__}.{hint}")
  if step < 0:
    raise ValueError(f"Recorder.write: step must be >= 0, got {step}.")
  return int(step)


def _check_values(values: Any) -> dict[str, Any]:
  if not isinstance(values, Mapping):
    raise TypeError(
      f"Recorder.write: values must be a Mapping[str, array], got {type(values).__name__}."
    )
  out: dict[str, Any] = {}
  for key, value in values.items():
    if not isinstance(key, str):
      raise TypeError(f"Recorder.write: keys must be str, got {key!r} ({type(key).__name__}).")
    if not key:
      raise ValueError("Recorder.write: got an empty key.")
    if isinstance(value, jax.core.Tracer):
      raise TypeError(
        f"Recorder.write: value of {key!r} is a tracer; call write() outside jit, with the "
        "values returned by the jitted step."
      )
    if not isinstance(value, jax.Array | np.ndarray | np.generic | bool | int | float):
      raise TypeError(
        f"Recorder.write: value of {key!r} must be an array or a number, "
        f"got {type(value).__name__}."
      )
    out[key] = value
  return out


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
    self._pending: list[_Record] = []
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
    """Number of written steps not transferred to the host yet."""
    return len(self._pending)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    """Records the values of one step; returns without waiting for the device.

    The values are kept (not read) until the next write; see the module docstring.

    Args:
      step: the step number, a non-negative Python or numpy int (not a device array,
        whose reading would block).
      values: a flat mapping from str keys to arrays (``jax.Array``, numpy) or
        numbers, e.g. a scope's values. A false ``"measured"`` entry drops the step.

    Raises:
      TypeError: ``step`` is not an int, ``values`` not a mapping, a key not a str or a
        value neither an array nor a number.
      ValueError: ``step`` is negative, or the recorder is closed.
    """
    step = _check_step(step)
    values = _check_values(values)
    if self._closed:
      raise ValueError("Recorder.write: the recorder is closed.")
    if not self._active:
      return
    for value in values.values():
      if isinstance(value, jax.Array):
        # Start the copy; the result is read later. A deleted array fails here and is
        # reported with a clear message at transfer time.
        with contextlib.suppress(Exception):
          value.copy_to_host_async()
    self._pending.append((step, values))
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

  def _transfer(self, batch: list[_Record]) -> None:
    for step, values in batch:
      for key, value in values.items():
        if isinstance(value, jax.Array) and value.is_deleted():
          raise RuntimeError(
            f"Recorder: the value of {key!r} at step {step} was deleted before it was "
            "transferred (donated to a later jitted call?). Return the metrics from the "
            "jitted step instead of reading them from a donated state."
          )
    # Lists, not dicts: pytree flattening would sort the keys, and the file keeps their order.
    host = jax.device_get([list(values.values()) for _, values in batch])
    lines = []
    records: list[_Record] = []
    for (step, device_values), host_values in zip(batch, host, strict=True):
      values = dict(zip(device_values, host_values, strict=True))
      if _MEASURED in values and not bool(np.asarray(values[_MEASURED])):
        continue
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
