"""History: a run's recorded metrics loaded back as numpy arrays per key."""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxscope.record.jsonio import loads, read_json
from jaxscope.record.recorder import _MEASURED, CONFIG_FILE, METRICS_FILE, _Record

__all__ = ["History"]


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
            obj = loads(line)
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
        config = read_json(config_path)
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
