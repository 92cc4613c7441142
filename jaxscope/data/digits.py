"""scikit-learn's embedded handwritten digits (1797 real 8×8 images, 10 classes).

The data ships inside scikit-learn, so nothing is downloaded. Images are returned in
Flax's NHWC layout, scaled from the original 0…16 grey levels to ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "batches", "load_digits"]


class Dataset(NamedTuple):
  """A train/test split of a dataset as numpy arrays.

  Layouts: images ``float32 [n, H, W, C]`` in ``[0, 1]`` (NHWC, Flax's layout), 1-D signals
  ``float32 [n, L, C]``, token sequences ``int32 [n, T]``, other inputs ``float32 [n, D]``.
  Targets are ``int32 [n]`` class indices when ``task == "classification"`` (``int32
  [n, T]``, one per token, for sequences) and ``float32 [n, 1]`` values (with
  ``num_classes == 1``) when ``task == "regression"``.
  """

  train_x: np.ndarray
  """``float32 [n_train, ...]`` (images: ``[n_train, H, W, C]``)."""
  train_y: np.ndarray
  """``int32 [n_train]`` labels, or ``float32 [n_train, 1]`` regression targets."""
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  """Number of classes; ``1`` for regression."""
  name: str
  task: str = "classification"
  """``"classification"`` or ``"regression"``."""


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """Loads the digits and splits them, stratified by class, with a fixed seed.

  Args:
    test_fraction: share of each class held out for testing, in ``(0, 1)``.
    seed: seed of the split (the same seed gives the same split).

  Returns:
    A :class:`Dataset` with ``[n, 8, 8, 1]`` images in ``[0, 1]``.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction}.")
  from sklearn.datasets import load_digits as _sk_load_digits

  bunch = _sk_load_digits()
  x = (bunch.images.astype(np.float32) / 16.0)[..., None]
  y = bunch.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test_idx = []
  for c in range(10):
    idx = np.flatnonzero(y == c)
    rng.shuffle(idx)
    test_idx.extend(idx[: round(len(idx) * test_fraction)])
  test_mask = np.zeros(len(y), bool)
  test_mask[np.asarray(test_idx)] = True
  train_idx = rng.permutation(np.flatnonzero(~test_mask))
  test_idx = np.sort(np.flatnonzero(test_mask))
  return Dataset(x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, "digits")


def batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  *,
  seed: int | None = 0,
  drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields one epoch of ``(x, y)`` minibatches, shuffled with ``seed`` (None: in order).

  With ``drop_last`` (default) every batch has exactly ``batch_size`` examples, so a
  jitted step compiles once.
  """
  if len(x) != len(y):
    raise ValueError(f"batches: x has {len(x)} examples but y has {len(y)}.")
  if batch_size < 1:
    raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}.")
  order = np.arange(len(x)) if seed is None else np.random.default_rng(seed).permutation(len(x))
  stop = len(x) - len(x) % batch_size if drop_last else len(x)
  for i in range(0, stop, batch_size):
    idx = order[i : i + batch_size]
    yield x[idx], y[idx]
