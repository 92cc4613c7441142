"""CIFAR-10 and CIFAR-100 from the official "python version" pickles in a local directory.

Format (Krizhevsky, 2009, https://www.cs.toronto.edu/~kriz/cifar.html): each batch file is a
pickled dict; ``b"data"`` is ``uint8 [N, 3072]`` where each row holds the 1024 red, then 1024
green, then 1024 blue values of a 32×32 image in row-major order (CHW). CIFAR-10 has
``cifar-10-batches-py/data_batch_1`` … ``data_batch_5`` and ``test_batch`` with ``b"labels"``;
CIFAR-100 has ``cifar-100-python/train`` and ``test`` with ``b"fine_labels"`` (100 classes) and
``b"coarse_labels"`` (20 superclasses).

The directory ``cifar-10-batches-py`` (``cifar-100-python``) is looked for in ``data_dir``;
failing that, ``data_dir`` itself is used if it holds the batch files.

The files are read with :mod:`pickle`, which can run arbitrary code while loading: only load
files from a source you trust (e.g. the official archive, checked against its published MD5).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxscope.data.digits import Dataset

__all__ = ["CIFAR10_FILES", "CIFAR100_FILES", "load_cifar10", "load_cifar100"]

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
"""The five training batches, then the test batch."""
CIFAR100_DIR = "cifar-100-python"
CIFAR100_FILES = ("train", "test")


def _find(data_dir: str | os.PathLike, subdir: str, files: tuple[str, ...], name: str) -> Path:
  data_dir = Path(data_dir)
  for d in (data_dir / subdir, data_dir):
    if all((d / f).is_file() for f in files):
      return d
  expected = "\n  ".join(f"{data_dir / subdir / f}  (or {data_dir / f})" for f in files)
  note = "" if data_dir.is_dir() else f"\n({data_dir} is not a directory.)"
  raise FileNotFoundError(
    f"{name}: the official python-version batches were not found. Expected:\n  {expected}"
    f"\n(unpack the official archive into the data directory).{note}"
  )


def _unpickle(path: Path) -> dict[Any, Any]:
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e}).") from e
  if not isinstance(batch, dict):
    raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}.")
  return batch


def _get(batch: dict[Any, Any], key: str, path: Path) -> Any:
  for k in (key.encode(), key):
    if k in batch:
      return batch[k]
  keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
  raise ValueError(f"{path}: missing key b{key!r}; the file has keys {keys}.")


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  batch = _unpickle(path)
  data = np.asarray(_get(batch, "data", path))
  labels = np.asarray(_get(batch, label_key, path))
  if data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"{path}: b'data' must be N×3072 (3×32×32 per row), got shape {data.shape}.")
  if data.dtype != np.uint8:
    raise ValueError(f"{path}: b'data' must be uint8, got {data.dtype}.")
  if labels.shape != (len(data),):
    raise ValueError(
      f"{path}: b'{label_key}' must hold one label per image ({len(data)}), "
      f"got shape {labels.shape}."
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"{path}: b'{label_key}' must be in 0…{num_classes - 1}, found {labels.min()}…{labels.max()}."
    )
  return data, labels.astype(np.int32)


def _to_nhwc(data: np.ndarray) -> np.ndarray:
  """``uint8 [N, 3072]`` rows in CHW order -> ``float32 [N, 32, 32, 3]`` in ``[0, 1]``."""
  x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return x.astype(np.float32) / np.float32(255.0)


def load_cifar10(data_dir: str | os.PathLike) -> Dataset:
  """Loads CIFAR-10 (50 000 train / 10 000 test 32×32 colour images, 10 classes).

  Args:
    data_dir: directory containing ``cifar-10-batches-py/`` (or the batch files directly).

  Returns:
    A :class:`Dataset` with ``float32 [n, 32, 32, 3]`` images in ``[0, 1]`` (NHWC, pixel /
    255; ``x[i, r, c, ch] = data[i, ch * 1024 + r * 32 + c] / 255``) and ``int32`` labels;
    the official split.

  Raises:
    FileNotFoundError: if a batch file is missing (the message lists the expected paths).
    ValueError: if a batch is malformed (not a dict, missing keys, wrong shapes or labels).
  """
  d = _find(data_dir, CIFAR10_DIR, CIFAR10_FILES, "cifar10")
  parts = [_read_batch(d / f, "labels", 10) for f in CIFAR10_FILES]
  train_x = _to_nhwc(np.concatenate([p[0] for p in parts[:-1]]))
  train_y = np.concatenate([p[1] for p in parts[:-1]])
  test_x, test_y = _to_nhwc(parts[-1][0]), parts[-1][1]
  return Dataset(train_x, train_y, test_x, test_y, 10, "cifar10")


def load_cifar100(
  data_dir: str | os.PathLike, *, label_mode: Literal["fine", "coarse"] = "fine"
) -> Dataset:
  """Loads CIFAR-100 (50 000 train / 10 000 test 32×32 colour images).

  Args:
    data_dir: directory containing ``cifar-100-python/`` (or ``train`` and ``test``
      directly).
    label_mode: ``"fine"`` (100 classes, ``b"fine_labels"``) or ``"coarse"`` (20
      superclasses, ``b"coarse_labels"``).

  Returns:
    A :class:`Dataset` as for :func:`load_cifar10`, with 100 or 20 classes.

  Raises:
    FileNotFoundError: if ``train`` or ``test`` is missing (the message lists the paths).
    ValueError: if a file is malformed, or ``label_mode`` is neither value.
  """
  if label_mode not in ("fine", "coarse"):
    raise ValueError(f"load_cifar100: label_mode must be 'fine' or 'coarse', got {label_mode!r}.")
  num_classes = 100 if label_mode == "fine" else 20
  d = _find(data_dir, CIFAR100_DIR, CIFAR100_FILES, "cifar100")
  (tr_data, train_y), (te_data, test_y) = (
    _read_batch(d / f, f"{label_mode}_labels", num_classes) for f in CIFAR100_FILES
  )
  return Dataset(_to_nhwc(tr_data), train_y, _to_nhwc(te_data), test_y, num_classes, "cifar100")
