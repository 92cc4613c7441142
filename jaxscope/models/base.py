"""The uniform functional interface of the model zoo: :class:`ModelDef`.

Every model of :mod:`jaxscope.models`, Linen or NNX, is handed to the training loop as a
:class:`ModelDef`, a frozen record of two pure functions:

* ``init(rng, x) -> variables``: ``{'params': ...}`` plus ``{'batch_stats': ...}`` for
  models with BatchNorm; every leaf is a plain ``jax.Array`` (Flax's partitioning boxes are
  removed; their logical axis names are kept in ``ModelDef.param_axes``). It is jitted
  already.
* ``apply(variables, x, *, train, rng=None) -> (outputs, new_state)``: ``outputs`` is
  ``[B, num_classes]`` (``[B, 1]`` for regression; ``[B, T, vocab]`` for the language
  models, whose inputs are int32 token ids ``[B, T]``); ``new_state`` holds the updated
  non-``params`` collections (``{'batch_stats': ...}`` when ``train=True`` on a BatchNorm
  model) and is ``{}`` otherwise. Dropout is active only for ``train=True`` and draws from
  ``rng``.

Both are pure and can be jitted, differentiated and vmapped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "ApplyFn",
  "InitFn",
  "ModelDef",
  "check_batch",
  "check_input_shape",
  "check_num_classes",
  "count_params",
  "linen_model_def",
  "pool_out",
]

InitFn = Callable[[jax.Array, jax.Array], dict]
ApplyFn = Callable[..., tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """A model behind one functional interface (see the module docstring).

  Attributes:
    name: the registry name (``"resnet20"``).
    module: the ``flax.linen.Module`` instance, or for NNX models the ``nnx.GraphDef``.
    init: ``(rng_key, example_batch_x) -> variables``; deterministic for a given key.
    apply: ``(variables, x, *, train, rng=None) -> (outputs, new_state)``.
    has_batch_stats: whether ``variables`` has a ``'batch_stats'`` collection that
      ``apply(train=True)`` updates.
    has_dropout: whether ``apply(train=True)`` needs ``rng``.
    input_shape: the shape of one example (no batch axis) the model was built for.
    num_classes: the number of outputs per example.
    input_dtype: the dtype ``x`` is cast to (float32; int32 for token ids), e.g. for a
      dummy batch ``jnp.zeros((1, *input_shape), input_dtype)``.
    param_axes: the logical axis names of each parameter, a tree like ``params`` with one
      ``jax.sharding.PartitionSpec`` per leaf (``PartitionSpec('layers', 'embed', 'heads',
      'head_dim')``; ``'layers'`` marks a stacked layer axis), from Flax's partitioning
      metadata; ``None`` when the model declares none.
  """

  name: str
  module: Any
  init: InitFn
  apply: ApplyFn
  has_batch_stats: bool
  has_dropout: bool
  input_shape: tuple[int, ...] = ()
  num_classes: int = 0
  input_dtype: Any = jnp.float32
  param_axes: Any = None


def count_params(params: Any) -> int:
  """Returns the number of scalars in a pytree of arrays (or ``ShapeDtypeStruct``).

  ``count = Σ_leaves prod(leaf.shape)``. Pass ``variables['params']`` to count only the
  trainable parameters (BatchNorm running statistics live in ``'batch_stats'``).

  >>> count_params({'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)})
  16
  """
  return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


def check_num_classes(name: str, num_classes: Any) -> int:
  """Validates ``num_classes`` (an integer >= 1) and returns it as ``int``."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
    raise ValueError(f"build({name!r}): num_classes must be an integer >= 1, got {num_classes!r}.")
  if num_classes < 1:
    raise ValueError(f"build({name!r}): num_classes must be >= 1, got {num_classes}.")
  return int(num_classes)


def check_input_shape(
  name: str, input_shape: Any, *, ranks: Sequence[int] = (1, 2, 3)
) -> tuple[int, ...]:
  """Validates ``input_shape`` (one example, no batch axis) and returns it as a tuple.

  Args:
    name: the model's name, for error messages.
    input_shape: a sequence of positive integers.
    ranks: the ranks the model accepts: 1 is a feature vector ``[D]``, 2 a 1-D signal
      ``[L, C]``, 3 an image ``[H, W, C]``.

  Raises:
    ValueError: naming ``input_shape`` and what was expected.
  """
  layouts = {1: "[features]", 2: "[length, channels]", 3: "[height, width, channels]"}
  expected = " or ".join(f"{r}-D {layouts.get(r, '')}".strip() for r in ranks)
  try:
    shape = tuple(input_shape)
  except TypeError:
    raise ValueError(
      f"build({name!r}): input_shape must be a tuple of positive integers without the batch "
      f"axis ({expected}), got {input_shape!r}."
    ) from None
  if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in shape):
    raise ValueError(f"build({name!r}): input_shape must hold integers, got {input_shape!r}.")
  shape = tuple(int(d) for d in shape)
  if len(shape) not in ranks:
    raise ValueError(
      f"build({name!r}): input_shape {shape} has rank {len(shape)}, but this model takes "
      f"{expected} inputs, given without the batch axis."
    )
  if any(d < 1 for d in shape):
    raise ValueError(f"build({name!r}): input_shape {shape} has a non-positive dimension.")
  return shape


def pool_out(size: int, window: int, stride: int, padding: str) -> int:
  """Output length of a convolution or pooling along one axis (``'SAME'`` or ``'VALID'``).

  ``SAME``: ``ceil(n / s)``; ``VALID``: ``floor((n - k) / s) + 1`` (``0`` if ``n < k``).
  """
  if padding == "SAME":
    return -(-size // stride)
  return max(0, (size - window) // stride + 1)


def check_batch(
  name: str, input_shape: tuple[int, ...], x: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
  """Checks that ``x`` is ``[batch, *input_shape]`` and returns it as ``dtype`` (float32;
  int32 for token ids)."""
  if tuple(x.shape[1:]) != input_shape or x.ndim != len(input_shape) + 1:
    raise ValueError(
      f"{name}: x must have shape [batch, {', '.join(map(str, input_shape))}] (the model was "
      f"built for input_shape={input_shape}), got {tuple(x.shape)}."
    )
  return jnp.asarray(x, dtype)


def linen_model_def(
  name: str,
  module: nn.Module,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  has_batch_stats: bool,
  has_dropout: bool,
  input_dtype: Any = jnp.float32,
  param_axes: Any = None,
) -> ModelDef:
  """Wraps a Linen module with ``__call__(x, train)`` into a :class:`ModelDef`.

  ``init`` runs ``module.init`` in eval mode (no dropout key needed) under ``jax.jit``
  (one compilation instead of one per operation when called eagerly) and unboxes Flax's
  partitioning metadata (``nn.meta.unbox``), so every leaf is a plain array; ``apply`` runs
  ``module.apply`` with ``mutable=['batch_stats']`` when training a BatchNorm model and
  ``rngs={'dropout': rng}`` when training a model with dropout. ``x`` is cast to
  ``input_dtype`` (int32 for token ids); ``param_axes`` is stored on the
  :class:`ModelDef`.
  """

  def init(rng: jax.Array, x: jax.Array) -> dict:
    x = check_batch(name, input_shape, x, input_dtype)
    variables = nn.meta.unbox(module.init({"params": rng}, x, train=False))
    return jax.tree_util.tree_map(jnp.asarray, dict(variables))

  def apply(
    variables: dict, x: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    x = check_batch(name, input_shape, x, input_dtype)
    rngs = {}
    if train and has_dropout:
      if rng is None:
        raise ValueError(
          f"{name}: apply(train=True) needs rng= (a PRNG key) because the model uses dropout."
        )
      rngs = {"dropout": rng}
    if train and has_batch_stats:
      out, updates = module.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
      return out, dict(updates)
    return module.apply(variables, x, train=train, rngs=rngs), {}

  return ModelDef(
    name=name,
    module=module,
    init=jax.jit(init),
    apply=apply,
    has_batch_stats=has_batch_stats,
    has_dropout=has_dropout,
    input_shape=input_shape,
    num_classes=num_classes,
    input_dtype=input_dtype,
    param_axes=param_axes,
  )
