"""Keyword options checked against a signature: unknown names and values of the wrong kind.

The model builders, dataset loaders and optimizers take options as keyword arguments (on
the command line ``--model-args``, ``--data-args``, ``--opt-args``). A misspelt name or a
text where a number belongs would otherwise surface as a ``TypeError`` from deep inside the
callee (or not at all: ``nesterov="no"`` is true). These helpers find such options from the
callee's signature; the callers raise :class:`OptionError` with their own wording.

>>> import inspect
>>> def f(*, depth: int = 20, widths=(16, 32)): ...
>>> params = inspect.signature(f).parameters
>>> unknown_keywords(["dpth"], params)
"['dpth'] (did you mean 'depth'?)"
>>> wrong_kind(params, {"depth": "abc"})
('depth', 'abc', 'an integer (the default is 20)')
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import numpy as np

from jaxscope.models.base import ModelDef

__all__ = [
  "OptionError",
  "check_model_options",
  "keyword_parameters",
  "unknown_keywords",
  "wrong_kind",
]


class OptionError(ValueError, TypeError):
  """An option a function does not take, or one of the wrong kind.

  A ``ValueError`` (the command line reports it as a bad argument, in one line) and a
  ``TypeError`` (what Python raises for an unexpected keyword, which callers may catch).
  """


def keyword_parameters(
  fn: Callable[..., Any], *, skip: int = 0
) -> tuple[dict[str, inspect.Parameter], bool] | None:
  """The parameters of ``fn`` that can be given by keyword, and whether it takes ``**kwargs``.

  Args:
    fn: a function or class; string annotations are evaluated where they can be.
    skip: leave out this many leading positional parameters (e.g. a builder's
      ``input_shape`` and ``num_classes``, an optimizer's ``learning_rate``).

  Returns:
    ``(parameters by name, takes **kwargs)``, or ``None`` when ``fn`` has no signature.
  """
  try:
    sig = inspect.signature(fn, eval_str=True)
  except Exception:  # An annotation that does not evaluate: keep them as text.
    try:
      sig = inspect.signature(fn)
    except (TypeError, ValueError):
      return None
  out: dict[str, inspect.Parameter] = {}
  var_keyword = False
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  for p in sig.parameters.values():
    if p.kind in positional and skip > 0:
      skip -= 1
    elif p.kind is inspect.Parameter.VAR_KEYWORD:
      var_keyword = True
    elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
      out[p.name] = p
  return out, var_keyword


def check_model_options(name: str, builder: Any, skip: int, kwargs: Mapping[str, Any]) -> None:
  """Raises :class:`OptionError` for an option the model builder ``builder`` (its first
  ``skip`` positional parameters left out) does not take, unless it takes ``**kwargs``, or
  a text where it takes a number or a bool. A ``ModelDef`` or anything not callable is left
  alone."""
  if isinstance(builder, ModelDef) or not callable(builder):
    return  # build_external takes a ModelDef as it is, and refuses what is not callable.
  found = keyword_parameters(builder, skip=skip)
  if found is None:
    return
  params, var_keyword = found
  unknown = None if var_keyword else unknown_keywords(kwargs, params)
  if unknown:
    takes = ", ".join(params) if params else "no options"
    raise OptionError(
      f"build({name!r}): unexpected option(s) {unknown}; this model takes {takes} (model_args)."
    )
  bad = wrong_kind(params, kwargs)
  if bad:
    key, value, expected = bad
    raise OptionError(f"build({name!r}): model_args {key} must be {expected}, got {value!r}.")


def unknown_keywords(given: Collection[str], accepted: Collection[str]) -> str | None:
  """``None`` when every name of ``given`` is in ``accepted``; else the unknown names, with
  the closest accepted name for each misspelling (``"['widht'] (did you mean 'width'?)"``)."""
  unknown = sorted(k for k in given if k not in accepted)
  if not unknown:
    return None
  close = [m[0] for k in unknown if (m := difflib.get_close_matches(k, list(accepted), n=1))]
  hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
  return f"{unknown}{hint}"


def wrong_kind(
  params: Mapping[str, inspect.Parameter], kwargs: Mapping[str, Any]
) -> tuple[str, Any, str] | None:
  """The first option of ``kwargs`` that is a text where ``params`` takes a number or a bool,
  as ``(name, value, what was expected)``; ``None`` when there is none.

  A string is refused only where it cannot be meant: the parameter's default is a number
  or a bool (and its annotation, if any, admits no ``str``), or the default is ``None``
  and the annotation admits only numbers and ``None``. Other values are left to the
  callee, since many options legitimately take strings, callables or ``None``.
  """
  for name, value in kwargs.items():
    p = params.get(name)
    if p is None or not isinstance(value, str) or _admits_str(p.annotation):
      continue
    default = p.default
    if isinstance(default, bool | np.bool_):
      return name, value, f"True or False (the default is {default})"
    if isinstance(default, numbers.Number):
      kind = "an integer" if isinstance(default, numbers.Integral) else "a number"
      return name, value, f"{kind} (the default is {default!r})"
    if (default is None or default is inspect.Parameter.empty) and _numeric(p.annotation):
      return name, value, "a number" + (" or None" if default is None else "")
  return None


def _members(annotation: Any) -> tuple[Any, ...]:
  """The members of a union annotation, or the annotation alone."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    return typing.get_args(annotation)
  return (annotation,)


def _admits_str(annotation: Any) -> bool:
  """Whether an (evaluated) annotation admits a ``str``; text annotations are not read."""
  for m in _members(annotation):
    if m is Any or m is str:
      return True
    literal = typing.get_origin(m) is typing.Literal
    if literal and any(isinstance(a, str) for a in typing.get_args(m)):
      return True
  return False


def _numeric(annotation: Any) -> bool:
  """Whether an (evaluated) annotation admits only numbers, numeric arrays and ``None``."""
  if annotation is inspect.Parameter.empty or isinstance(annotation, str):
    return False
  members = [m for m in _members(annotation) if m is not type(None)]
  numeric = (numbers.Number, np.number, np.bool_, np.ndarray, jax.Array)
  return bool(members) and all(isinstance(m, type) and issubclass(m, numeric) for m in members)
