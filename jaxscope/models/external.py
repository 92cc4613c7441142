"""Models and datasets of your own, named ``module:attribute`` where the zoo's names go.

``jaxscope train --model mypkg.nets:make_lm --dataset mypkg.corpus:load`` (or
``TrainConfig(model="mypkg.nets:make_lm", …)``) imports ``mypkg.nets`` and uses its
``make_lm`` like a zoo entry, so a run of your own model and data gets everything a zoo run
gets: metrics, checkpoints, ``jaxscope.load_run`` (which rebuilds the model from the
same name), analyses and diagnoses. The module must be importable where the run is read
back (installed, or on ``PYTHONPATH``).

A **model** attribute is called as ``factory(input_shape, num_classes, **model_args)`` and
returns a :class:`~jaxscope.models.base.ModelDef` or a ``flax.linen.Module`` whose
``__call__(x, train)`` returns the outputs (wrapped with
:func:`~jaxscope.models.base.linen_model_def`: BatchNorm statistics are detected from its
variables, and a dropout key is always passed in training mode). A module that takes
token ids declares ``input_dtype = jnp.int32`` (a class attribute or field; default
float32). Flax partitioning metadata (``nn.with_partitioning``, ``nn.scan(...,
metadata_params={nn.PARTITION_NAME: "layers"})``) becomes ``ModelDef.param_axes``, so a
scanned stack is measured per layer. A ``ModelDef`` itself is used as it is.

A **dataset** attribute is called as ``loader(**data_args)`` (with ``data_dir=`` when it
takes one) and returns a :class:`~jaxscope.data.Dataset` or any object with its fields
(``train_x``, ``train_y``, ``test_x``, ``test_y``, ``num_classes``; ``name`` and ``task``
optional).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscope.models.base import ModelDef, linen_model_def

__all__ = ["build_external", "import_object", "is_external", "load_external"]


def is_external(name: Any) -> bool:
  """Whether ``name`` names an object of the user's (``"module:attribute"``)."""
  return isinstance(name, str) and ":" in name


def import_object(spec: str, *, what: str = "object") -> Any:
  """The object ``attribute`` of module ``module`` named by ``"module:attribute"``
  (``attribute`` may be dotted: ``"pkg.mod:Class.factory"``).

  Raises:
    ValueError: a malformed spec, a module that cannot be imported or a missing attribute
      (the message names the spec and what was expected).
  """
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name.strip() or not attr.strip():
    raise ValueError(f"{what} {spec!r}: expected 'module:attribute', e.g. 'mypkg.nets:make_model'.")
  try:
    obj = importlib.import_module(module_name.strip())
  except ImportError as e:
    raise ValueError(
      f"{what} {spec!r}: cannot import module {module_name!r} ({e}); install it or put it on "
      "PYTHONPATH."
    ) from None
  for part in attr.strip().split("."):
    if not hasattr(obj, part):
      owner = getattr(obj, "__name__", repr(obj))
      raise ValueError(f"{what} {spec!r}: {owner} has no attribute {part!r}.")
    obj = getattr(obj, part)
  return obj


def build_external(
  spec: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> ModelDef:
  """Builds the user's model ``spec`` (see the module docstring).

  Raises:
    ValueError: the spec cannot be imported, or the factory returns neither a ``ModelDef``
      nor a ``flax.linen.Module``.
    TypeError: an option the factory does not take.
  """
  obj = import_object(spec, what="model")
  shape, classes = tuple(int(n) for n in input_shape), int(num_classes)
  if isinstance(obj, ModelDef):
    return obj
  if not callable(obj):
    raise ValueError(f"model {spec!r}: expected a factory, a ModelDef or a Linen Module class.")
  out = obj(shape, classes, **kwargs)
  if isinstance(out, ModelDef):
    return out
  if not isinstance(out, nn.Module):
    raise ValueError(
      f"model {spec!r}: {getattr(obj, '__name__', obj)!r}(input_shape, num_classes, ...) returned "
      f"{type(out).__name__}; expected a jaxscope.models.ModelDef or a flax.linen.Module."
    )
  input_dtype = jnp.dtype(getattr(out, "input_dtype", jnp.float32))
  x = jax.ShapeDtypeStruct((1, *shape), input_dtype)
  variables = jax.eval_shape(
    lambda k, xb: out.init({"params": k}, xb, train=False), jax.random.key(0), x
  )
  axes = nn.get_partition_spec(variables.get("params", {}))
  has_axes = any(len(p) for p in jax.tree.leaves(axes, is_leaf=_is_spec))
  return linen_model_def(
    spec,
    out,
    shape,
    classes,
    has_batch_stats="batch_stats" in variables,
    has_dropout=True,
    input_dtype=input_dtype,
    param_axes=axes if has_axes else None,
  )


def _is_spec(x: Any) -> bool:
  return isinstance(x, jax.sharding.PartitionSpec)


def load_external(spec: str, data_dir: Any = None, **kwargs: Any) -> Any:
  """Loads the user's dataset ``spec`` (see the module docstring).

  Raises:
    ValueError: the spec cannot be imported, or the loader's result lacks a field.
  """
  loader = import_object(spec, what="dataset")
  if not callable(loader):
    raise ValueError(f"dataset {spec!r}: expected a loader function.")
  try:
    takes_dir = "data_dir" in inspect.signature(loader).parameters
  except (TypeError, ValueError):
    takes_dir = False
  ds = loader(data_dir=data_dir, **kwargs) if takes_dir else loader(**kwargs)
  missing = [
    f for f in ("train_x", "train_y", "test_x", "test_y", "num_classes") if not hasattr(ds, f)
  ]
  if missing:
    raise ValueError(
      f"dataset {spec!r}: the loader returned {type(ds).__name__} without {missing}; return a "
      "jaxscope.data.Dataset (or an object with its fields)."
    )
  return ds
