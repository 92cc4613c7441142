"""Writing metrics to a run directory without stalling the train step, and reading them back.

:class:`Recorder` appends one JSON line per step to ``run_dir/metrics.jsonl`` (and,
optionally, TensorBoard events to ``run_dir/tensorboard``); :class:`History` loads a
run directory back into numpy arrays.

A jitted train step returns as soon as it is *dispatched*; reading its outputs on the
host (``float(x)``, ``np.asarray(x)``, ``jax.device_get``) waits until the device has
finished it, which leaves the device idle while the host prepares the next step. The
recorder therefore never reads the values it is given now: it keeps them and transfers
the values of step ``k`` (one ``jax.device_get`` for a whole batch) only after the
values of step ``k + 1`` were handed to :meth:`Recorder.write`, that is after step
``k + 1`` was dispatched, so the device always has work queued while the host waits.
At the time of the write, each array's device-to-host copy is started asynchronously
(``copy_to_host_async``), so the later transfer usually finds the data already there.

Values must stay valid until they are transferred: return the metrics from the jitted
step (outputs are fresh buffers). Do not hand the recorder arrays that the next step
*donates* (``donate_argnums``), e.g. ``transforms.metrics(opt_state)`` read outside
``jit`` from a state that is then donated; the recorder raises a clear error if it
finds a deleted array.

File format: each line of ``metrics.jsonl`` is ``{"step": int, "values": {key: value}}``
with floats, ints, bools and (nested) lists of them, e.g. histogram counts and edges.
NaN and ±Inf are written as ``NaN``, ``Infinity`` and ``-Infinity``, which Python's
``json`` module (and :meth:`History.load`) reads back, but which strict JSON parsers
reject. Steps whose ``"measured"`` flag is false (scopes with ``every=n`` repeat old
values on unmeasured steps) are not written, and the flag itself is never stored.

Multi-host: only process 0 (``jax.process_index() == 0``) writes. On other processes a
recorder creates nothing, and ``write``, ``flush`` and ``close`` do nothing; arrays
given to ``write`` must then be fully addressable on process 0 (replicated metrics,
as a scope produces from replicated or sharded parameters).

Example:
  >>> import tempfile
  >>> import jax, jax.numpy as jnp, optax
  >>> from jaxscope import metrics, transforms
  >>> from jaxscope.record import History, Recorder
  >>> params = {"w": jnp.ones((3, 2))}
  >>> tx = transforms.monitored(optax.sgd(0.1), metrics.scope(params=["norm"]))
  >>> opt_state = tx.init(params)
  >>> @jax.jit
  ... def train_step(params, opt_state):
  ...   loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] ** 2))(params)
  ...   updates, opt_state = tx.update(grads, opt_state, params)
  ...   params = optax.apply_updates(params, updates)
  ...   return params, opt_state, {**transforms.metrics(opt_state), "loss": loss}
  >>> run_dir = tempfile.mkdtemp()
  >>> with Recorder(run_dir, config={"lr": 0.1}) as rec:
  ...   for step in range(3):
  ...     params, opt_state, values = train_step(params, opt_state)
  ...     rec.write(step, values)
  >>> history = History.load(run_dir)
  >>> history.keys()
  ['loss', 'params/norm/w']
  >>> history.steps("loss").tolist()
  [0, 1, 2]
  >>> history["loss"].round(3).tolist()
  [6.0, 3.84, 2.458]
  >>> history.config
  {'lr': 0.1}
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import jax
import numpy as np

__all__ = [
  "CONFIG_FILE",
  "METRICS_FILE",
  "TENSORBOARD_DIR",
  "History",
  "Recorder",
  "write_atomic",
]

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


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray | jax.Array):
    return np.asarray(x).tolist()
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  if isinstance(x, set | frozenset | tuple):
    return list(x)
  return str(x)


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
  """Writes ``path`` atomically: ``write(f)`` fills a temporary file (binary) in the same
  directory, which then replaces ``path`` with ``os.replace``; on any error the temporary
  file is removed and ``path`` is left as it was. Used for every file jaxscope writes whole
  (configs, analyses, landscapes, diagnoses)."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _write_atomic(path: Path, text: str) -> None:
  write_atomic(path, lambda f: f.write(text.encode("utf-8")))


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
      text = json.dumps(dict(config), indent=2, sort_keys=True, default=_json_default)
      _write_atomic(self._run_dir / CONFIG_FILE, text + "\n")
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
      lines.append(json.dumps({"step": step, "values": out}, separators=(",", ":")) + "\n")
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


class History:
  """The recorded metrics of a run, as numpy arrays per key.

  Records are merged per step: a key written twice for the same step (a run resumed
  from a checkpoint and re-run, or train and eval values written separately) keeps its
  last value, and every series is ordered by step.

  Args:
    records: ``(step, values)`` pairs, e.g. from a recorder's file. A false
      ``"measured"`` entry drops the record; the flag is not stored.
    config: the run's configuration.
    run_dir: the run directory the records came from, if any.

  Example:
    >>> h = History([(0, {"loss": 2.0, "grads/norm/Dense_0/kernel": 1.0}), (1, {"loss": 1.0})])
    >>> h.steps("loss").tolist(), h["loss"].tolist()
    ([0, 1], [2.0, 1.0])
    >>> h.layers("grads", "norm")
    ['Dense_0/kernel']
  """

  def __init__(
    self,
    records: Iterable[tuple[int, Mapping[str, Any]]],
    *,
    config: Mapping[str, Any] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
  ) -> None:
    self._data: dict[str, dict[int, Any]] = {}
    for step, values in records:
      step = int(step)
      if _MEASURED in values and not bool(np.asarray(values[_MEASURED])):
        continue
      for key, value in values.items():
        if key != _MEASURED:
          self._data.setdefault(key, {})[step] = value
    self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._config = dict(config) if config is not None else {}
    self._run_dir = Path(run_dir) if run_dir is not None else None

  @classmethod
  def load(cls, run_dir: str | os.PathLike[str]) -> History:
    """Loads a run directory written by :class:`Recorder`.

    A line that is not a complete record (e.g. the last line of a crashed run) is
    skipped with a warning naming its line number.

    Args:
      run_dir: the run directory.

    Returns:
      The :class:`History` of the run (empty if no metrics were written).

    Raises:
      FileNotFoundError: ``run_dir`` does not exist.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
      raise FileNotFoundError(f"History.load: no run directory {str(run_dir)!r}.")
    records: list[_Record] = []
    path = run_dir / METRICS_FILE
    if path.exists():
      with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
          if not line.strip():
            continue
          try:
            obj = json.loads(line)
            step, values = obj["step"], obj["values"]
            if not isinstance(step, int) or not isinstance(values, dict):
              raise ValueError("bad record")
          except (ValueError, KeyError, TypeError):
            warnings.warn(
              f"History.load: skipping corrupt or truncated line {lineno} of {path}.",
              RuntimeWarning,
              stacklevel=2,
            )
            continue
          records.append((step, values))
    config: dict[str, Any] = {}
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
      try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
      except ValueError:
        warnings.warn(f"History.load: cannot parse {config_path}.", RuntimeWarning, stacklevel=2)
    return cls(records, config=config, run_dir=run_dir)

  @property
  def config(self) -> dict[str, Any]:
    """The run's configuration (``config.json``), or ``{}``."""
    return self._config

  @property
  def run_dir(self) -> Path | None:
    """The run directory this history was loaded from (``None`` if built in memory)."""
    return self._run_dir

  def keys(self) -> list[str]:
    """All recorded keys, in first-seen order."""
    return list(self._data)

  def __contains__(self, key: object) -> bool:
    return key in self._data

  def __len__(self) -> int:
    return len(self._data)

  def __repr__(self) -> str:
    where = f", run_dir={str(self._run_dir)!r}" if self._run_dir is not None else ""
    return f"History({len(self._data)} keys{where})"

  def _missing(self, key: str) -> KeyError:
    keys = list(self._data)
    close = difflib.get_close_matches(key, keys, n=5)
    shown = close or keys[:5]
    more = f" ({len(keys)} in all)" if len(keys) > len(shown) else ""
    what = "similar keys" if close else "available keys"
    return KeyError(f"History: {key!r} was not recorded; {what}: {shown}{more}.")

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The steps where ``key`` was recorded and its values there.

    Returns:
      ``(steps, values)``: ``int64[n]`` steps in increasing order, and values stacked
      over them: ``[n]`` for scalars, ``[n, bins]`` for histogram arrays; ``float64``
      for floats, ``int64`` for ints, ``bool`` for flags.

    Raises:
      KeyError: ``key`` was not recorded.
      ValueError: the values have different shapes at different steps.
    """
    if key in self._cache:
      return self._cache[key]
    if key not in self._data:
      raise self._missing(key)
    by_step = self._data[key]
    steps = np.array(sorted(by_step), dtype=np.int64)
    arrays = [np.asarray(by_step[int(s)]) for s in steps]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
      raise ValueError(f"History: {key!r} has values of different shapes: {sorted(shapes)}.")
    values = np.stack(arrays) if arrays else np.zeros((0,))
    if values.dtype.kind in "iu":
      values = values.astype(np.int64)
    elif values.dtype.kind != "b":
      values = values.astype(np.float64)
    steps.setflags(write=False)
    values.setflags(write=False)
    self._cache[key] = (steps, values)
    return steps, values

  def steps(self, key: str) -> np.ndarray:
    """The steps (``int64``, increasing) where ``key`` was recorded."""
    return self.series(key)[0]

  def __getitem__(self, key: str) -> np.ndarray:
    """The values of ``key`` stacked over its recorded steps; see :meth:`series`."""
    return self.series(key)[1]

  def _split(self) -> list[tuple[str, str, str]]:
    return [tuple(k.split("/", 2)) for k in self._data if k.count("/") >= 2]  # type: ignore[misc]

  def topics(self) -> list[str]:
    """Topics of the per-layer keys ``{topic}/{stat}/{layer}``, in first-seen order."""
    return list(dict.fromkeys(t for t, _, _ in self._split()))

  def stats(self, topic: str) -> list[str]:
    """Stats recorded for ``topic``, in first-seen order."""
    return list(dict.fromkeys(s for t, s, _ in self._split() if t == topic))

  def layers(self, topic: str, stat: str) -> list[str]:
    """Layer names recorded for ``{topic}/{stat}``, in first-seen order."""
    return [lay for t, s, lay in self._split() if t == topic and s == stat]
