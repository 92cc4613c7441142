"""A Flax NNX model behind the same functional :class:`~jaxscope.models.base.ModelDef`.

NNX modules hold their parameters as attributes. To give them the pure
``init`` / ``apply`` interface of the Linen models:

* ``init`` builds the module from ``nnx.Rngs(params=key)`` and returns
  ``{'params': nnx.to_pure_dict(nnx.state(model, nnx.Param))}``, a nested dict of plain
  arrays whose names follow the attributes (``conv1/kernel``, ``linear1/bias``).
* ``apply`` copies the abstract state recorded at build time, fills it with
  ``nnx.replace_by_pure_dict`` and rebuilds the module with ``nnx.merge`` inside the
  (traced) function, so nothing outside the call is mutated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscope.models.base import ModelDef, check_batch, pool_out
from jaxscope.tree import check_same_structure

__all__ = ["NNXCNN", "nnx_model_def", "nnx_module_def"]


class NNXCNN(nnx.Module):
  """A small CNN written with Flax NNX.

  Architecture: conv 3×3 (``features[0]``, SAME) → ReLU → max-pool 2/2 SAME → conv 3×3
  (``features[1]``, SAME) → ReLU → max-pool 2/2 SAME → flatten → Linear ``hidden`` →
  ReLU → dropout ``dropout_rate`` → Linear ``num_classes``. Works on ``[H, W, C]`` images
  and ``[L, C]`` signals. Attributes ``conv1``, ``conv2``, ``linear1``, ``linear2`` give
  the parameter names. The dropout layer holds no RNG state: its key is passed at call
  time, so the state is parameters only.

  Args:
    input_shape: one example's shape, ``(H, W, C)`` or ``(L, C)``.
    num_classes: number of outputs.
    features: filters of the two convolutions.
    hidden: width of the hidden linear layer.
    dropout_rate: dropout before the output layer (0 disables it).
    rngs: the ``nnx.Rngs`` that initialise the parameters.
  """

  def __init__(
    self,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    features: tuple[int, int] = (16, 32),
    hidden: int = 64,
    dropout_rate: float = 0.25,
    rngs: nnx.Rngs,
  ) -> None:
    nd = len(input_shape) - 1
    self.window = (2,) * nd
    self.conv1 = nnx.Conv(input_shape[-1], features[0], (3,) * nd, padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(features[0], features[1], (3,) * nd, padding="SAME", rngs=rngs)
    spatial = [pool_out(pool_out(n, 2, 2, "SAME"), 2, 2, "SAME") for n in input_shape[:-1]]
    self.linear1 = nnx.Linear(math.prod(spatial) * features[1], hidden, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)
    self.linear2 = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = False, rng: jax.Array | None = None) -> jax.Array:
    """Returns logits ``[B, num_classes]``; dropout is active only if ``train``."""
    x = jnp.asarray(x, jnp.float32)
    x = nnx.max_pool(nnx.relu(self.conv1(x)), self.window, self.window, padding="SAME")
    x = nnx.max_pool(nnx.relu(self.conv2(x)), self.window, self.window, padding="SAME")
    x = nnx.relu(self.linear1(x.reshape(x.shape[0], -1)))
    x = self.dropout(x, deterministic=not train, rngs=rng)
    return self.linear2(x)


def nnx_model_def(
  name: str,
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  features: tuple[int, int] = (16, 32),
  hidden: int = 64,
  dropout_rate: float = 0.25,
) -> ModelDef:
  """Builds an :class:`NNXCNN` and wraps it into a :class:`ModelDef`.

  ``ModelDef.module`` is the ``nnx.GraphDef``; ``variables`` is ``{'params': pure dict}``.
  """
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"build({name!r}): dropout_rate must be in [0, 1), got {dropout_rate}.")

  def make(rngs: nnx.Rngs) -> NNXCNN:
    return NNXCNN(
      input_shape,
      num_classes,
      features=tuple(features),
      hidden=hidden,
      dropout_rate=dropout_rate,
      rngs=rngs,
    )

  return nnx_module_def(name, make, input_shape, num_classes, has_dropout=dropout_rate > 0.0)


def nnx_module_def(
  name: str,
  make: Callable[[nnx.Rngs], nnx.Module],
  input_shape: tuple[int, ...],
  num_classes: int,
  *,
  has_dropout: bool,
  input_dtype: Any = jnp.float32,
  param_axes: Any = None,
) -> ModelDef:
  """Wraps the NNX module built by ``make(rngs)`` into a :class:`ModelDef`.

  The module's ``__call__(x, train, rng)`` returns the outputs; ``x`` is cast to
  ``input_dtype`` (int32 for token ids). ``ModelDef.module`` is the ``nnx.GraphDef``;
  ``variables`` is ``{'params': pure dict}``; ``param_axes`` is stored on the
  :class:`ModelDef`.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  abstract_params = {"params": nnx.to_pure_dict(abstract_state)}

  def init(rng: jax.Array, x: jax.Array) -> dict:
    check_batch(name, input_shape, x, input_dtype)
    model = make(nnx.Rngs(params=rng))
    return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}

  def apply(
    variables: dict, x: jax.Array, *, train: bool, rng: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    x = check_batch(name, input_shape, x, input_dtype)
    if train and has_dropout and rng is None:
      raise ValueError(
        f"{name}: apply(train=True) needs rng= (a PRNG key) because the model uses dropout."
      )
    params = {"params": variables.get("params")} if isinstance(variables, dict) else variables
    check_same_structure(abstract_params, params, ref_name="the model", other_name="variables")
    state = jax.tree_util.tree_map(lambda v: v, abstract_state)  # A fresh copy to fill.
    nnx.replace_by_pure_dict(state, variables["params"])
    model = nnx.merge(graphdef, state)
    return model(x, train=train, rng=rng if train else None), {}

  return ModelDef(
    name=name,
    module=graphdef,
    init=jax.jit(init),
    apply=apply,
    has_batch_stats=False,
    has_dropout=has_dropout,
    input_shape=input_shape,
    num_classes=num_classes,
    input_dtype=input_dtype,
    param_axes=param_axes,
  )
