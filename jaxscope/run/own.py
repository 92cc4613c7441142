"""The model of checkpoints written by a loop of your own: ``load_run(path, model=…)``.

A run directory of ``jaxscope train`` records its model in ``config.json``; the orbax
checkpoints of your own loop do not, so :func:`jaxscope.load_run` (and ``jaxscope analyze
--model``) takes it as ``model=``, built for the dataset's input shape and class count:

* a zoo name (``"mlp"``, ``"lenet5"``; :func:`jaxscope.models.build` with ``model_args``);
* ``"module:attribute"`` (the module importable: installed, or on ``PYTHONPATH``), whose
  attribute is a ``flax.linen.Module`` instance, a Module class (instantiated with
  ``model_args``, none by default), a :class:`~jaxscope.models.ModelDef`, or a factory
  returning one of those: called with ``**model_args``, or as ``factory(input_shape,
  num_classes, **model_args)`` when it takes two positional arguments (the convention of
  ``jaxscope train --model module:attribute``);
* from Python, any of these objects itself.

A Linen module is wrapped into a :class:`~jaxscope.models.ModelDef` by
:func:`module_model_def`; its ``__call__(x, …)`` returns the outputs (logits, or the
regression output) and may take a ``train``, ``training`` or ``is_training`` flag or
``deterministic`` (the opposite), which is set from ``apply(…, train=…)``.

Example:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(3)(x.reshape((x.shape[0], -1)))
  >>> model = build_model(Net, (4, 2), 3)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 2)))
  >>> model.apply(variables, jnp.ones((5, 4, 2)), train=False)[0].shape
  (5, 3)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscope import models as jmodels
from jaxscope.models.base import ModelDef, check_batch
from jaxscope.models.external import import_object, is_external
from jaxscope.run.config import kv_pairs

__all__ = ["ANALYZE_FLAGS", "build_model", "model_name", "module_model_def"]

# ``__call__`` flags set from ``train`` (``deterministic`` is its opposite).
_FLAGS = (("train", False), ("training", False), ("is_training", False), ("deterministic", True))

#: The options of ``jaxscope analyze`` for checkpoints of a loop of your own:
#: ``(flag, argparse keywords)``; each one's destination is a keyword of ``load_run``.
ANALYZE_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
  (
    "--model",
    {
      "metavar": "MODULE:ATTR|NAME",
      "help": "the model: a zoo name (jaxscope list-models) or module:attribute naming a Flax "
      "Linen module instance or class, or a factory returning one or a jaxscope ModelDef "
      "(default: the run's config.json)",
    },
  ),
  (
    "--model-args",
    {
      "type": kv_pairs,
      "metavar": "K=V,...",
      "help": "keyword arguments of the model's class or factory, e.g. hidden=32,depth=2",
    },
  ),
  ("--dataset", {"help": "the dataset (jaxscope list-datasets; default: the run's)"}),
  (
    "--task",
    {
      "choices": ["classification", "regression"],
      "help": "default: the run's, else the dataset's",
    },
  ),
  (
    "--params-key",
    {
      "metavar": "PATH",
      "help": "/-separated path of the params in the checkpoint item (default: params; '' or "
      "'.' when the item itself is the params tree)",
    },
  ),
  (
    "--item",
    {
      "metavar": "NAME",
      "help": "the orbax item holding the params (default: state, else the only item, e.g. "
      "default)",
    },
  ),
  (
    "--model-state-key",
    {
      "metavar": "PATH",
      "help": "path of the non-params collections, e.g. batch_stats (default: model_state or "
      "batch_stats beside the params; none: none)",
    },
  ),
)

_EXPECTED = (
  "a flax.linen.Module instance or class, a factory returning one, or a jaxscope.models.ModelDef"
)


def model_name(model: Any) -> str:
  """What a run records as its model: the spec, or ``module:qualname`` of an object."""
  if isinstance(model, str):
    return model
  if isinstance(model, ModelDef):
    return model.name
  target = model if isinstance(model, type) or inspect.isroutine(model) else type(model)
  return f"{target.__module__}:{getattr(target, '__qualname__', target.__name__)}"


def _train_flag(module: nn.Module) -> tuple[str, bool] | None:
  try:
    params = inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):
    return None
  return next(((name, flip) for name, flip in _FLAGS if name in params), None)


def module_model_def(
  name: str, module: nn.Module, input_shape: Sequence[int], num_classes: int
) -> ModelDef:
  """Wraps a Linen ``module`` (``__call__(x[, train | deterministic …])``) into a
  :class:`~jaxscope.models.ModelDef` for inputs ``[batch, *input_shape]``.

  ``init`` is jitted and unboxes Flax's partitioning metadata; ``apply(variables, x, *,
  train, rng=None)`` passes ``rng`` as the dropout key when given, and updates
  ``batch_stats`` in training mode when the module has them. The input dtype is the
  module's ``input_dtype`` attribute, else float32.

  Raises:
    ValueError: the module cannot be initialised on such a batch (the message says why).
  """
  shape, classes = tuple(int(d) for d in input_shape), int(num_classes)
  flag = _train_flag(module)
  dtype = jnp.dtype(getattr(module, "input_dtype", jnp.float32))

  def kw(train: bool) -> dict[str, bool]:
    return {} if flag is None else {flag[0]: train != flag[1]}

  def init(rng: jax.Array, x: jax.Array) -> dict:
    x = check_batch(name, shape, x, dtype)
    variables = nn.meta.unbox(module.init({"params": rng}, x, **kw(False)))
    return jax.tree.map(jnp.asarray, dict(variables))

  try:
    x = jax.ShapeDtypeStruct((1, *shape), dtype)
    variables = jax.eval_shape(init, jax.random.key(0), x)
  except Exception as e:
    raise ValueError(
      f"load_run: model {name!r} cannot be initialised on a batch [1, "
      f"{', '.join(map(str, shape))}] of the dataset's examples: {type(e).__name__}: {e}"
    ) from None
  has_batch_stats = "batch_stats" in variables

  def apply(
    variables: dict, x: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    x = check_batch(name, shape, x, dtype)
    rngs = {} if rng is None else {"dropout": rng}
    if train and has_batch_stats:
      out, updates = module.apply(variables, x, rngs=rngs, mutable=["batch_stats"], **kw(True))
      return out, dict(updates)
    return module.apply(variables, x, rngs=rngs, **kw(train)), {}

  return ModelDef(
    name=name,
    module=module,
    init=jax.jit(init),
    apply=apply,
    has_batch_stats=has_batch_stats,
    has_dropout=flag is not None,
    input_shape=shape,
    num_classes=classes,
    input_dtype=dtype,
  )


def _takes_shapes(factory: Any) -> bool:
  """Whether ``factory`` takes two positional arguments: ``(input_shape, num_classes)``."""
  try:
    params = inspect.signature(factory).parameters.values()
  except (TypeError, ValueError):
    return False
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return sum(p.kind in positional and p.default is p.empty for p in params) >= 2


def _is_module_class(obj: Any) -> bool:
  return isinstance(obj, type) and issubclass(obj, nn.Module)


def _call(name: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
  try:
    return fn(*args, **kwargs)
  except TypeError as e:
    raise ValueError(
      f"load_run: model {name!r}: {what} failed ({e}); model_args (jaxscope analyze "
      f"--model-args k=v,…) gave {kwargs or 'no arguments'}."
    ) from None


def build_model(
  model: Any,
  input_shape: Sequence[int],
  num_classes: int,
  model_args: Mapping[str, Any] | None = None,
) -> ModelDef:
  """The model ``model`` (see the module docstring) as a :class:`~jaxscope.models.ModelDef`
  for examples of ``input_shape`` and ``num_classes`` outputs.

  Raises:
    ValueError: naming ``model``: an unknown zoo name, a module that cannot be imported,
      a missing attribute, an object that is not a module, model or factory, or a factory
      or class that does not take ``model_args``.
  """
  args = dict(model_args or {})
  name = model_name(model)
  shape, classes = tuple(int(d) for d in input_shape), int(num_classes)
  if isinstance(model, str) and not is_external(model):
    try:
      return jmodels.build(model, shape, classes, **args)
    except (ValueError, TypeError) as e:
      raise ValueError(f"load_run: model {model!r}: {e}") from None
  obj = import_object(model, what="load_run: model") if isinstance(model, str) else model
  if _is_module_class(obj):
    obj = _call(name, f"{obj.__name__}(**model_args)", obj, **args)
  elif callable(obj) and not isinstance(obj, nn.Module | ModelDef):
    what = getattr(obj, "__name__", "the factory")
    if _takes_shapes(obj):
      obj = _call(name, f"{what}(input_shape, num_classes, …)", obj, shape, classes, **args)
    else:
      obj = _call(name, f"{what}(**model_args)", obj, **args)
    if _is_module_class(obj):
      obj = _call(name, f"{obj.__name__}()", obj)
  elif args:
    raise ValueError(
      f"load_run: model {name!r} is a {type(obj).__name__} already built; model_args "
      f"{args} apply only to a class or a factory."
    )
  if isinstance(obj, ModelDef):
    return obj
  if isinstance(obj, nn.Module):
    return module_model_def(name, obj, shape, classes)
  raise ValueError(f"load_run: model {name!r} is a {type(obj).__name__}; expected {_EXPECTED}.")
