"""Statistics of a dataset's training split that the diagnoses read (``config.json``'s
``data_stats``): the inputs' scale and non-finite entries, the labels' balance."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxscope.data.digits import Dataset

__all__ = ["data_stats"]

#: Examples read at most (evenly spaced over the split), so large sets cost little.
MAX_EXAMPLES = 20_000


def _sample(a: np.ndarray) -> np.ndarray:
  if len(a) <= MAX_EXAMPLES:
    return np.asarray(a)
  idx = np.linspace(0, len(a) - 1, MAX_EXAMPLES).astype(np.int64)
  return np.asarray(a[idx])


def _float_stats(a: np.ndarray) -> dict[str, float]:
  a = a.astype(np.float64)
  finite = np.isfinite(a)
  good = a[finite]
  out = {"nonfinite_fraction": float(1.0 - finite.mean()) if a.size else 0.0}
  if good.size:
    out.update(
      mean=float(good.mean()),
      std=float(good.std()),
      min=float(good.min()),
      max=float(good.max()),
    )
  return out


def data_stats(ds: Dataset) -> dict[str, Any]:
  """What the diagnoses need to know of ``ds``'s training split.

  Returns a JSON-able dict: ``examples``; ``inputs`` (float inputs: ``mean``, ``std``,
  ``min``, ``max`` of the finite entries and ``nonfinite_fraction``; integer inputs such
  as tokens: ``min``, ``max``); and for classification ``labels`` with ``class_fractions``
  (the fraction of each class ``0 … num_classes − 1`` among the labels ``≥ 0``; token
  labels of every position count), ``sequence`` (one label per token) and
  ``ignored_fraction`` (labels ``< 0``); for
  regression ``targets`` (as ``inputs``). At most :data:`MAX_EXAMPLES` evenly spaced
  examples are read.

  Example:
    >>> from jaxscope.data import load
    >>> s = data_stats(load("sine", num_train=64, num_test=8))
    >>> sorted(s), s["inputs"]["nonfinite_fraction"]
    (['examples', 'inputs', 'targets'], 0.0)
  """
  x, y = _sample(ds.train_x), _sample(ds.train_y)
  out: dict[str, Any] = {"examples": len(ds.train_x)}
  if np.issubdtype(x.dtype, np.integer):
    out["inputs"] = {"min": int(x.min()), "max": int(x.max())} if x.size else {}
  else:
    out["inputs"] = _float_stats(x)
  if ds.task == "regression":
    out["targets"] = _float_stats(y)
    return out
  labels = np.asarray(y).reshape(-1).astype(np.int64)
  valid = labels[labels >= 0]
  counts = np.bincount(valid, minlength=ds.num_classes)[: ds.num_classes]
  total = max(int(counts.sum()), 1)
  out["labels"] = {
    "sequence": bool(np.ndim(ds.train_y) > 1),
    "class_fractions": [float(c) / total for c in counts],
    "ignored_fraction": float(1.0 - valid.size / labels.size) if labels.size else 0.0,
  }
  return out
