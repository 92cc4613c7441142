"""What capture records about a layer: its call, its kind, convolution hyperparameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
from flax import linen as nn
from flax import nnx

__all__ = ["Captured", "ConvSpec", "LayerCall"]


class ConvSpec(NamedTuple):
  """A captured convolution's hyperparameters (static), for per-example gradients."""

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  """``"SAME"``, ``"VALID"`` or explicit ``(low, high)`` pairs per spatial axis."""
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int


def _tuple(v: Any, nd: int) -> tuple[int, ...] | None:
  if v is None:
    return (1,) * nd
  if isinstance(v, int):
    return (v,) * nd
  try:
    out = tuple(int(a) for a in v)
  except TypeError:
    return None
  return out if len(out) == nd else None


def _conv_spec(module: Any) -> ConvSpec | None:
  """The hyperparameters of a Linen/NNX ``Conv``; ``None`` for unsupported settings."""
  try:
    ks = tuple(int(k) for k in module.kernel_size)
  except (AttributeError, TypeError):
    return None
  nd = len(ks)
  strides = _tuple(getattr(module, "strides", None), nd)
  in_dil = _tuple(getattr(module, "input_dilation", None), nd)
  k_dil = _tuple(getattr(module, "kernel_dilation", None), nd)
  groups = int(getattr(module, "feature_group_count", 1) or 1)
  pad = getattr(module, "padding", "SAME")
  if isinstance(pad, str):
    padding: Any = pad.upper() if pad.upper() in ("SAME", "VALID") else None
  elif isinstance(pad, int):
    padding = ((pad, pad),) * nd
  else:
    try:
      items = list(pad)
      if all(isinstance(a, int) for a in items):
        padding = tuple((int(a), int(a)) for a in items)
      else:
        padding = tuple((int(a), int(b)) for a, b in items)
    except (TypeError, ValueError):
      padding = None
    if padding is not None and len(padding) != nd:
      padding = None
  if None in (strides, in_dil, k_dil, padding):
    return None
  return ConvSpec(ks, strides, padding, in_dil, k_dil, groups)  # type: ignore[arg-type]


class LayerCall(NamedTuple):
  """One recorded layer."""

  key: str
  """The layer name: ``'/'``-joined module path (``"Dense_0"``, ``"blocks/0/conv"``)."""
  kind: str
  """``"dense"`` (``linen.Dense``, ``nnx.Linear``), ``"conv"`` (``linen.Conv``,
  ``nnx.Conv``) or ``"other"``."""
  module: Any
  """The module object (Linen bound module or NNX module), for introspection only."""


class Captured(NamedTuple):
  """What :func:`value_and_grad` captured, keyed by layer key."""

  outputs: dict[str, jax.Array]
  """Each layer's output ``y_l`` (its activations)."""
  inputs: dict[str, jax.Array]
  """Each layer's first positional input (only with ``inputs=True``, else ``{}``)."""
  grads: dict[str, jax.Array]
  """``∂L/∂y_l`` of the differentiated scalar (only with ``layer_grads=True``, else ``{}``)."""
  kinds: dict[str, str]
  """Each layer's kind (see :class:`LayerCall`). Static: a dict that is a pytree node
  without leaves, so ``Captured`` can be returned from ``jit``."""
  convs: dict[str, ConvSpec] = {}  # noqa: RUF012 (a NamedTuple default, never mutated)
  """The :class:`ConvSpec` of each ``"conv"`` layer with supported settings (static)."""


Pattern = str | Sequence[str] | None


class _Kinds(dict):
  """A ``dict[str, str]`` that is a pytree *without leaves* (the items are static).

  So a :class:`Captured` can be returned from ``jit`` and pass through ``jax.tree.map``
  with its kinds intact.
  """


jax.tree_util.register_pytree_node(
  _Kinds, lambda d: ((), tuple(d.items())), lambda items, _: _Kinds(items)
)


def _kind(module: Any) -> str:
  if isinstance(module, nn.Dense | nnx.Linear):
    return "dense"
  if isinstance(module, nn.Conv | nnx.Conv):
    return "conv"
  return "other"


def _linen_owns_params(module: nn.Module) -> bool:
  try:
    params = module.variables.get("params", {})
  except Exception:  # An unbound module or a scope without variables.
    return False
  return any(not isinstance(v, Mapping) for v in params.values())


def _nnx_owns_params(module: nnx.Module) -> bool:
  return any(isinstance(v, nnx.Param) for v in vars(module).values())
