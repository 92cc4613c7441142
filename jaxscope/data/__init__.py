"""Datasets by name, a batch iterator, and the individual loaders.

Embedded sets need nothing on disk (``digits`` ships with scikit-learn, ``shakespeare``
with jaxscope itself; ``mnist1d`` and ``sine`` are generated); file-based sets read the
official files from a local directory and never download anything.

>>> from jaxscope.data import load, names
>>> names()
['cifar10', 'cifar100', 'digits', 'fashion_mnist', 'mnist', 'mnist1d', 'shakespeare', 'sine']
>>> d = load("sine", num_train=8, num_test=4)
>>> d.train_x.shape, d.train_y.shape, d.task, d.num_classes
((8, 1), (8, 1), 'regression', 1)
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

from jaxscope.data.cifar import load_cifar10, load_cifar100
from jaxscope.data.digits import Dataset, batches, load_digits
from jaxscope.data.mnist import IDX_FILES, load_fashion_mnist, load_mnist, read_idx
from jaxscope.data.mnist1d import load_mnist1d
from jaxscope.data.sine import load_sine
from jaxscope.data.stats import data_stats
from jaxscope.data.text import load_shakespeare

__all__ = [
  "Dataset",
  "batches",
  "data_stats",
  "describe",
  "embedded",
  "load",
  "load_cifar10",
  "load_cifar100",
  "load_digits",
  "load_fashion_mnist",
  "load_mnist",
  "load_mnist1d",
  "load_shakespeare",
  "load_sine",
  "names",
  "read_idx",
]


class _Entry(NamedTuple):
  loader: Callable[..., Dataset]
  embedded: bool
  description: str
  files: str = ""
  """For file-based sets: what must be in the data directory."""


_IDX = ", ".join(f"{f}[.gz]" for f in IDX_FILES)
_REGISTRY: dict[str, _Entry] = {
  "cifar10": _Entry(
    load_cifar10,
    False,
    "CIFAR-10 colour photos, x [n, 32, 32, 3] in [0, 1], 10 classes, 50000 train / 10000 test",
    "cifar-10-batches-py/data_batch_1..5 and test_batch (the official python version)",
  ),
  "cifar100": _Entry(
    load_cifar100,
    False,
    "CIFAR-100 colour photos, x [n, 32, 32, 3] in [0, 1], 100 fine classes (label_mode="
    "'coarse': 20), 50000 train / 10000 test",
    "cifar-100-python/train and test (the official python version)",
  ),
  "digits": _Entry(
    load_digits,
    True,
    "scikit-learn's 1797 handwritten digits, x [n, 8, 8, 1] in [0, 1], 10 classes, "
    "stratified 80/20 split (test_fraction, seed)",
  ),
  "fashion_mnist": _Entry(
    load_fashion_mnist,
    False,
    "Fashion-MNIST clothing images, x [n, 28, 28, 1] in [0, 1], 10 classes, "
    "60000 train / 10000 test",
    f"{_IDX} (in the directory, fashion_mnist/ or FashionMNIST/raw/)",
  ),
  "mnist": _Entry(
    load_mnist,
    False,
    "MNIST handwritten digits, x [n, 28, 28, 1] in [0, 1], 10 classes, 60000 train / 10000 test",
    f"{_IDX} (in the directory, mnist/ or MNIST/raw/)",
  ),
  "mnist1d": _Entry(
    load_mnist1d,
    True,
    "MNIST-1D (Greydanus 2020) 1-D digit signals, x [n, 40, 1] standardised, 10 classes, "
    "4000 train / 1000 test, generated (benchmark seed 42)",
  ),
  "shakespeare": _Entry(
    load_shakespeare,
    True,
    "ten Shakespeare plays (public domain, 1.27 MB shipped in jaxscope), byte-level: "
    "x [n, 64] int32 token ids, y [n, 64] the next bytes, 256 classes, contiguous split "
    "(first 90% train: 17885 windows, last 10% test: 1987; seq_len, stride, num_train, "
    "num_test)",
  ),
  "sine": _Entry(
    load_sine,
    True,
    "regression y = sin(x), x uniform on [-2π, 2π], x [n, 1], y [n, 1], "
    "4000 train / 1000 test, generated (noise_std on train targets)",
  ),
}


def _key(name: str) -> str:
  key = str(name).strip().lower().replace("-", "_")
  if key not in _REGISTRY:
    close = difflib.get_close_matches(key, names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"Unknown dataset {name!r}{hint}; known datasets: {', '.join(names())}.")
  return key


def names() -> list[str]:
  """The registered dataset names, sorted."""
  return sorted(_REGISTRY)


def embedded(name: str) -> bool:
  """Whether ``name`` needs no files (shipped with a package or generated)."""
  return _REGISTRY[_key(name)].embedded


def describe(name: str) -> str:
  """One line (without the name): what the dataset is, its shapes and classes, what it needs."""
  key = _key(name)
  e = _REGISTRY[key]
  need = "embedded, no files needed" if e.embedded else f"needs files in --data-dir: {e.files}"
  return f"{e.description}; {need}."


def load(
  name: str,
  data_dir: str | os.PathLike | None = None,
  *,
  seed: int | None = None,
  **kwargs: Any,
) -> Dataset:
  """Loads a dataset by name (case-insensitive; ``-`` and ``_`` are the same).

  Args:
    name: one of :func:`names`, or ``"module:attribute"`` naming a loader of your own
      (:mod:`jaxscope.models.external`).
    data_dir: directory with the files of a file-based set. Embedded sets read none and
      warn (``UserWarning``) when one is given, unless it is ``$JAXSCOPE_DATA`` (the
      command line's default).
    seed: seed of the split or generator of an embedded set; ``None`` keeps the loader's
      default (``mnist1d``: 42, the published benchmark; ``digits`` and ``sine``: 0).
      File-based sets use their official split and ignore it.
    **kwargs: passed to the loader (e.g. ``test_fraction`` for ``digits``, ``noise_std`` for
      ``sine``, ``num_samples`` for ``mnist1d``, ``label_mode`` for ``cifar100``,
      ``seq_len`` for ``shakespeare``).

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: unknown name, or a file-based set without ``data_dir``.
    OptionError: (a ``ValueError`` and a ``TypeError``) a keyword argument the loader does
      not take, or a text where it takes a number or a bool.
    FileNotFoundError: the files are not in ``data_dir`` (the message says where to put them).
  """
  if isinstance(name, str) and ":" in name:  # "module:attribute": the user's own loader.
    from jaxscope.models.external import load_external

    if seed is not None:
      kwargs["seed"] = seed
    return load_external(name, data_dir, **kwargs)
  key = _key(name)
  entry = _REGISTRY[key]
  params = _check_kwargs(key, entry.loader, seed, kwargs)
  if entry.embedded:
    if data_dir is not None and os.fspath(data_dir) != os.environ.get("JAXSCOPE_DATA"):
      warnings.warn(
        f"load({key!r}): data_dir {os.fspath(data_dir)!r} is not used: {key} is embedded "
        "and reads no files.",
        UserWarning,
        stacklevel=2,
      )
    if seed is not None and "seed" in params:
      kwargs["seed"] = seed
    return entry.loader(**kwargs)
  if data_dir is None:
    raise ValueError(
      f"load({key!r}): this dataset is read from local files and nothing is downloaded; pass "
      f"--data-dir (data_dir=) pointing to a directory with {entry.files}."
    )
  return entry.loader(data_dir, **kwargs)


def _check_kwargs(
  key: str, loader: Callable[..., Dataset], seed: Any, kwargs: dict[str, Any]
) -> dict[str, inspect.Parameter]:
  """The loader's parameters, after refusing keyword arguments it does not take and texts
  where it takes a number or a bool (:class:`~jaxscope.models.keywords.OptionError`)."""
  from jaxscope.models.keywords import OptionError, keyword_parameters, unknown_keywords, wrong_kind

  params, var_keyword = keyword_parameters(loader) or ({}, True)
  accepted = [p for p in params if p != "data_dir"]
  unknown = None if var_keyword else unknown_keywords(kwargs, [*accepted, "seed"])
  if unknown:
    raise OptionError(
      f"load({key!r}): unexpected keyword argument(s) in data_args: {unknown}; it accepts "
      f"{', '.join(accepted) or 'none'}."
    )
  bad = wrong_kind(params, {**kwargs, **({} if seed is None else {"seed": seed})})
  if bad:
    k, value, expected = bad
    raise OptionError(f"load({key!r}): data_args {k} must be {expected}, got {value!r}.")
  return params
