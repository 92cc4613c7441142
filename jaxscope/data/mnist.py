"""MNIST and Fashion-MNIST from the official IDX files in a local directory (no download).

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte big-endian magic
number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian ``uint32`` sizes, then the data in
row-major (C) order. Labels are ``0x00000801`` (``uint8 [N]``), images ``0x00000803``
(``uint8 [N, rows, cols]``). Fashion-MNIST (Xiao et al., 2017) uses the same files and names.

The four files (each either plain or gzipped with a ``.gz`` suffix)::

  train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

are looked for, in this order, in ``data_dir/<dir>/raw`` and ``data_dir/<dir>`` for each
``<dir>`` of the dataset (MNIST: ``mnist``, ``MNIST``; Fashion-MNIST: ``fashion_mnist``,
``fashion-mnist``, ``FashionMNIST``; ``<dir>/raw`` is torchvision's layout), and last in
``data_dir`` itself. The dataset's own directories come first because both datasets use the
same file names, so one ``data_dir`` can hold both. The first directory that holds all four
files is used; in it a plain file is preferred to its ``.gz``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from jaxscope.data.digits import Dataset

__all__ = ["IDX_FILES", "find_idx_files", "load_fashion_mnist", "load_mnist", "read_idx"]

IDX_FILES = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)
"""The official file names (without ``.gz``): train images, train labels, test images, labels."""

_SUBDIRS = {
  "mnist": ("mnist", "MNIST"),
  "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST"),
}

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}
_LABELS_MAGIC = 0x00000801
_IMAGES_MAGIC = 0x00000803


def _read_bytes(path: Path) -> bytes:
  try:
    if path.name.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    return path.read_bytes()
  except (EOFError, OSError, zlib.error) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path}: cannot read the file ({type(e).__name__}: {e}).") from e


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
  """Reads one IDX file (plain or gzipped, by its ``.gz`` suffix).

  Args:
    path: the file.
    expected_magic: if given, the magic number the file must have (``0x00000801`` for a
      label vector, ``0x00000803`` for a stack of images).

  Returns:
    The array, with the dims of the header and the dtype of its type byte (native order).

  Raises:
    ValueError: naming the file, if the magic number is malformed or not the expected one,
      or if the file's length does not match ``4 + 4 * ndim + prod(dims) * itemsize`` bytes
      (e.g. a truncated download).
  """
  path = Path(path)
  raw = _read_bytes(path)
  what = f"{path}" + (" (after gunzip)" if path.name.endswith(".gz") else "")
  if len(raw) < 4:
    raise ValueError(f"{what}: too short for an IDX header ({len(raw)} bytes).")
  magic = int.from_bytes(raw[:4], "big")
  type_code, ndim = raw[2], raw[3]
  if raw[0] != 0 or raw[1] != 0 or type_code not in _IDX_DTYPES or ndim == 0:
    raise ValueError(f"{what}: not an IDX file (magic number 0x{magic:08x}).")
  if expected_magic is not None and magic != expected_magic:
    raise ValueError(
      f"{what}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
      f"({'labels' if expected_magic == _LABELS_MAGIC else 'images'})."
    )
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{what}: truncated header: expected {header} bytes, got {len(raw)}.")
  dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  dtype = _IDX_DTYPES[type_code]
  expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(raw) != expected:
    kind = "truncated" if len(raw) < expected else "has trailing bytes"
    raise ValueError(
      f"{what}: file {kind}: the header (dims {dims}, {dtype.name}) needs {expected} bytes, "
      f"got {len(raw)}."
    )
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
  return data.astype(dtype.newbyteorder("="))


def _candidate_dirs(data_dir: Path, name: str) -> list[Path]:
  dirs = []
  for sub in _SUBDIRS[name]:
    dirs += [data_dir / sub / "raw", data_dir / sub]
  return [*dirs, data_dir]


def find_idx_files(data_dir: str | os.PathLike, name: str = "mnist") -> dict[str, Path]:
  """Finds the four IDX files of ``name`` (``"mnist"`` or ``"fashion_mnist"``).

  Returns:
    ``{official name: path}`` for the first directory (in the module's search order) that
    holds all four files, plain or ``.gz``.

  Raises:
    FileNotFoundError: listing the files needed and every directory searched.
  """
  if name not in _SUBDIRS:
    raise ValueError(f"find_idx_files: name must be one of {sorted(_SUBDIRS)}, got {name!r}.")
  data_dir = Path(data_dir)
  dirs = _candidate_dirs(data_dir, name)
  partial = []
  for d in dirs:
    found = {}
    for f in IDX_FILES:
      for cand in (d / f, d / f"{f}.gz"):
        if cand.is_file():
          found[f] = cand
          break
    if len(found) == len(IDX_FILES):
      return found
    if found:
      partial.append(f"{d} has {sorted(found)} but lacks {sorted(set(IDX_FILES) - set(found))}")
  need = ", ".join(f"{f}[.gz]" for f in IDX_FILES)
  where = "\n  ".join(str(d) for d in dirs)
  msg = f"{name}: put the four IDX files {need} together in one of these directories:\n  {where}"
  if not data_dir.is_dir():
    msg += f"\n({data_dir} is not a directory.)"
  if partial:
    msg += "\nIncomplete: " + "; ".join(partial) + "."
  raise FileNotFoundError(msg)


def _load_idx_dataset(data_dir: str | os.PathLike, name: str) -> Dataset:
  files = find_idx_files(data_dir, name)
  arrays = {
    f: read_idx(p, _IMAGES_MAGIC if "images" in f else _LABELS_MAGIC) for f, p in files.items()
  }
  splits = []
  for images_f, labels_f in (IDX_FILES[:2], IDX_FILES[2:]):
    images, labels = arrays[images_f], arrays[labels_f]
    if images.shape[1:] != (28, 28):
      raise ValueError(
        f"{files[images_f]}: expected 28×28 images, the header says {images.shape[1:]}."
      )
    if len(labels) != len(images):
      raise ValueError(
        f"{files[labels_f]}: {len(labels)} labels but {files[images_f]} has {len(images)} images."
      )
    if labels.size and labels.max() > 9:
      raise ValueError(f"{files[labels_f]}: labels must be in 0…9, found {labels.max()}.")
    x = (images.astype(np.float32) / np.float32(255.0))[..., None]
    splits += [x, labels.astype(np.int32)]
  return Dataset(*splits, 10, name)


def load_mnist(data_dir: str | os.PathLike) -> Dataset:
  """Loads MNIST (60 000 train / 10 000 test 28×28 digits) from the official IDX files.

  See the module docstring for the file names and the directories searched.

  Args:
    data_dir: directory holding the files (directly, or in ``mnist/``, ``MNIST/raw/``, …).

  Returns:
    A :class:`Dataset` with ``float32 [n, 28, 28, 1]`` images in ``[0, 1]`` (pixel / 255)
    and ``int32`` labels 0…9; the official train/test split.

  Raises:
    FileNotFoundError: if the files are missing (the message lists where they may go).
    ValueError: if a file is malformed (bad magic, wrong length, label/image count mismatch).
  """
  return _load_idx_dataset(data_dir, "mnist")


def load_fashion_mnist(data_dir: str | os.PathLike) -> Dataset:
  """Loads Fashion-MNIST (Xiao et al., 2017) from its IDX files; otherwise as :func:`load_mnist`.

  Args:
    data_dir: directory holding the files (directly, or in ``fashion_mnist/``,
      ``FashionMNIST/raw/``, …).

  Returns:
    A :class:`Dataset` with ``float32 [n, 28, 28, 1]`` images in ``[0, 1]`` and ``int32``
    labels 0…9 (T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag,
    ankle boot).
  """
  return _load_idx_dataset(data_dir, "fashion_mnist")
