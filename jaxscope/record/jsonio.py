"""The one JSON convention of every file jaxscope writes, and atomic whole-file writes.

Every JSON file and JSON line jaxscope writes (``config.json``, ``metrics.jsonl``,
analysis and landscape records, ``diagnosis.json``) is **strict JSON** (RFC 8259), so any
parser reads it. JSON has no number for NaN or ±∞, so a non-finite float is written as one
of the three strings

    ``"NaN"``, ``"Infinity"``, ``"-Infinity"``

(the spellings of Python's and JavaScript's own names for them), and read back as the
float. Everything else maps as usual: numpy scalars and arrays to numbers and (nested)
lists, tuples and sets to lists, paths to strings; ``None`` is ``null``.

:func:`dumps` / :func:`write_json` write the convention, :func:`loads` / :func:`read_json`
read it. The reader also accepts what earlier versions wrote: the bare tokens ``NaN``,
``Infinity`` and ``-Infinity`` (``metrics.jsonl``, landscapes) and the strings ``"nan"``,
``"inf"``, ``"-inf"`` (diagnoses). ``null`` stays ``None`` (earlier analysis records wrote
non-finite values as ``null``; they read back as ``None``).

Example:
  >>> from jaxscope.record import dumps, loads
  >>> text = dumps({"loss": float("nan"), "grad": [1.0, float("inf")]})
  >>> text
  '{"loss": "NaN", "grad": [1.0, "Infinity"]}'
  >>> loads(text)
  {'loss': nan, 'grad': [1.0, inf]}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
  "NON_FINITE",
  "dumps",
  "dumps_line",
  "from_jsonable",
  "loads",
  "read_json",
  "to_jsonable",
  "write_atomic",
  "write_json",
]

#: The strings that stand for the non-finite floats in jaxscope's JSON files.
NON_FINITE: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# What earlier versions of jaxscope wrote (diagnoses); read, never written.
_LEGACY_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_READ_NON_FINITE = {**NON_FINITE, **_LEGACY_NON_FINITE}


def _float(x: float) -> float | str:
  if math.isfinite(x):
    return x
  if math.isnan(x):
    return "NaN"
  return "Infinity" if x > 0 else "-Infinity"


def to_jsonable(obj: Any) -> Any:
  """``obj`` as plain JSON values under the convention of this module.

  Mappings become dicts with ``str`` keys; lists, tuples, sets and arrays become lists;
  numpy and JAX scalars become Python numbers; non-finite floats become ``"NaN"``,
  ``"Infinity"`` or ``"-Infinity"``; paths become strings; anything else ``str(obj)``.
  """
  if obj is None or isinstance(obj, bool | int | str):
    return obj
  if isinstance(obj, float):
    return _float(obj)
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple | set | frozenset):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return to_jsonable(obj.item())
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if hasattr(obj, "__array__"):  # numpy and jax arrays
    a = np.asarray(obj)
    if a.dtype.kind not in "biuf":
      try:  # bfloat16 and other ml_dtypes floats.
        a = a.astype(np.float64)
      except (TypeError, ValueError):
        return str(obj)
    return to_jsonable(a.tolist())
  return str(obj)


def from_jsonable(obj: Any) -> Any:
  """Inverse of :func:`to_jsonable` for the non-finite floats: the strings ``"NaN"``,
  ``"Infinity"``, ``"-Infinity"`` (and the older ``"nan"``, ``"inf"``, ``"-inf"``)
  become floats, in dicts and lists at any depth; everything else is returned as is."""
  if isinstance(obj, str):
    return _READ_NON_FINITE.get(obj, obj)
  if isinstance(obj, dict):
    return {k: from_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [from_jsonable(v) for v in obj]
  return obj


def dumps(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
  """``obj`` as strict JSON text (see the module docstring for the convention).

  Args:
    obj: a JSON-like value (dicts, lists, numbers, strings, numpy arrays, …).
    indent: as :func:`json.dumps`; ``None`` writes one line with ``", "`` and ``": "``.
    sort_keys: sort the keys of every dict.
  """
  try:  # Fast path: plain Python values, all finite.
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
  except (TypeError, ValueError):
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def dumps_line(obj: Any) -> str:
  """As :func:`dumps`, compact (``","`` and ``":"`` separators), for JSON Lines."""
  try:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)
  except (TypeError, ValueError):
    return json.dumps(to_jsonable(obj), separators=(",", ":"), allow_nan=False)


def loads(text: str | bytes) -> Any:
  """Parses JSON text written by :func:`dumps` (or by earlier versions of jaxscope):
  non-finite floats come back as floats (see the module docstring)."""
  obj = json.loads(text)
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  if any(f'"{s}"' in text for s in _READ_NON_FINITE):
    return from_jsonable(obj)
  return obj


def process_umask() -> int:
  """The process's file-creation mask (``os.umask`` can only be read by setting it)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
  """Writes ``path`` atomically: ``write(f)`` fills a temporary file (binary) in the same
  directory, which then replaces ``path`` with ``os.replace``; on any error the temporary
  file is removed and ``path`` is left as it was. The file gets the mode a plain ``open``
  would give it (``0o666`` less the process umask), not ``mkstemp``'s ``0o600``. Used for
  every file jaxscope writes whole (configs, analyses, landscapes, diagnoses)."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp's 0600 would hide it from the team.
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_json(
  path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> None:
  """Writes ``obj`` to ``path`` as strict JSON (:func:`dumps`, newline-terminated),
  atomically (:func:`write_atomic`)."""
  text = dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
  write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike[str]) -> Any:
  """Reads a JSON file written by :func:`write_json` (or an earlier jaxscope): :func:`loads`."""
  return loads(Path(path).read_text(encoding="utf-8"))
