"""The checks of the zoo's builder arguments (:func:`jaxscope.models.build`): each raises a
``ValueError`` that names the model and the argument."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["flag", "min_side", "positive_ints", "real"]


def positive_ints(name: str, arg: str, value: Any, *, allow_empty: bool = False) -> tuple:
  """``value`` as a tuple of positive ``int``s (empty only with ``allow_empty``)."""
  try:
    out = tuple(value)
  except TypeError:
    out = None
  if (
    out is None
    or (not out and not allow_empty)
    or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in out)
  ):
    raise ValueError(
      f"build({name!r}): {arg} must be a sequence of positive integers, got {value!r}."
    )
  return tuple(int(v) for v in out)


def real(value: Any) -> bool:
  """Whether ``value`` is a real number (not a bool)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def min_side(name: str, input_shape: tuple[int, ...], side: int, hint: str = "") -> None:
  """Refuses an input whose spatial sides (all but the last axis) are under ``side``."""
  small = [n for n in input_shape[:-1] if n < side]
  if small:
    raise ValueError(
      f"build({name!r}): input_shape {input_shape} is too small; this model needs every "
      f"spatial side >= {side}.{hint}"
    )


def flag(name: str, arg: str, value: Any) -> bool:
  """``value`` as a ``bool``; only ``True`` or ``False`` are accepted."""
  if not isinstance(value, bool | np.bool_):
    raise ValueError(f"build({name!r}): {arg} must be True or False, got {value!r}.")
  return bool(value)
