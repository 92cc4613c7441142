"""Dynamic network capacity: Flax layers whose width grows in chunks during training.

A capacity layer is allocated at its maximum width ``features`` and split into ``chunks``
equal chunks of ``s = features / chunks`` units. Only the first ``active`` chunks take part
in the forward pass: unit ``j`` (an output column of a Dense kernel, an output channel of a
convolution) is active iff

    chunk(j) = floor(j / s) < active,

and the layer returns ``y ⊙ m`` with ``m_j = [chunk(j) < active]`` (an exact zero, so the
inactive units receive exactly zero gradient and, through activations with ``f(0) = 0``, feed
exact zeros to the next layer, whose rows that read them also receive zero gradient). On an
error plateau a controller raises ``active`` by one, re-initialises the new chunk
(:func:`reinit_chunk`) and freezes the chunks trained so far (:func:`trainable_mask`).

``active`` is an ``int32`` array in the Flax variable collection :data:`CAPACITY`
(``variables['capacity'][<layer path>]['active']``), next to the constant
``variables['capacity'][<layer path>]['chunks']``. It is passed to ``apply`` like BatchNorm
statistics but never mutated by it; expanding the network is an array update of the model
state, so a jitted train step never recompiles.

Reference: the dynamic-network-capacity thesis (TensorFlow, 2017) this implements — layers of
maximum width in equal chunks, the first chunk active at the start, the next chunk activated
on an error plateau and the already-trained chunks frozen; the thesis names the wrong scale of
a new chunk's initialisation as a flaw, which :func:`reinit_chunk` addresses by drawing the new
weights for the *active* fan-in.

Layer graph used by :func:`trainable_mask` and :func:`reinit_chunk` (derived from the
``params`` and ``capacity`` trees alone):

* Layers are ordered by the natural sort of their module paths (digit runs compared as
  integers: ``CapacityDense_2 < CapacityDense_10``). A jitted ``init`` returns dicts with
  sorted keys, so the creation order is not available; Flax's automatic names
  (``CapacityConv_0, CapacityConv_1, CapacityDense_0, Dense_0``) and the zoo's names sort in
  call order. Name layers so that they do.
* A capacity layer's *consumer* is the next layer in that order whose kernel input dimension
  (``kernel.shape[-2]``) equals the capacity layer's ``features`` ``C`` (Dense after Dense,
  conv after conv, Dense after global pooling), or — for a 2-D (Dense) kernel after a
  convolutional capacity layer — is a multiple of ``C`` (a channels-last flatten: input row
  ``r`` reads channel ``r mod C``). Layers in between that match neither are skipped
  (e.g. an unrelated stem); a non-capacity layer that consumes ends the chain.
* A :class:`CapacityResidualBlock` is one capacity layer whose sub-layers ``conv1`` and
  ``proj`` read the block's input (they consume the previous capacity layer) and whose
  ``conv2`` reads the block's own units.

Only sequential stacks of such layers are analysed; branches, concatenations or layers with
several kernels (other than :class:`CapacityResidualBlock`) are not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxscope.tree import path_name

__all__ = [
  "CAPACITY",
  "CapacityCNN",
  "CapacityConv",
  "CapacityDense",
  "CapacityInfo",
  "CapacityMLP",
  "CapacityResidualBlock",
  "capacity_layers",
  "reinit_chunk",
  "trainable_mask",
  "unit_mask",
]

CAPACITY = "capacity"
"""The name of the Flax variable collection holding each capacity layer's ``active`` and
``chunks`` (``int32`` scalars)."""

Initializer = Callable[..., jax.Array]
Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]

_LECUN_NORMAL = nn.initializers.lecun_normal()
_ZEROS = nn.initializers.zeros
# The sub-layer of a CapacityResidualBlock that reads the block's own units.
_BLOCK_INNER = "conv2"
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "tanh": jnp.tanh}


# --------------------------------------------------------------------------- masks


def _check_chunks(
  where: str, features: int, chunks: int, initial_chunks: int | None = None
) -> None:
  if isinstance(features, bool) or not isinstance(features, int | np.integer) or features < 1:
    raise ValueError(f"{where}: features must be a positive integer, got {features!r}.")
  if isinstance(chunks, bool) or not isinstance(chunks, int | np.integer) or chunks < 1:
    raise ValueError(f"{where}: chunks must be a positive integer, got {chunks!r}.")
  if features % chunks:
    raise ValueError(
      f"{where}: features={features} is not divisible by chunks={chunks}; the width must split "
      "into equal chunks."
    )
  if initial_chunks is not None and not (
    isinstance(initial_chunks, int | np.integer) and 0 <= initial_chunks <= chunks
  ):
    raise ValueError(
      f"{where}: initial_chunks must be an integer in [0, chunks={chunks}], got {initial_chunks!r}."
    )


def _chunk_index(features: int, chunks: int | jax.Array) -> jax.Array:
  """``floor(j / (features / chunks))`` for ``j = 0 … features-1`` (``int32``)."""
  return jnp.arange(features, dtype=jnp.int32) // (features // jnp.asarray(chunks, jnp.int32))


def unit_mask(active: jax.Array, features: int, chunks: int | jax.Array) -> jax.Array:
  """Returns the boolean mask of active units of a capacity layer.

  ``mask_j = floor(j / s) < active`` with chunk size ``s = features / chunks``, for
  ``j = 0 … features-1``: the first ``active · s`` units.

  Args:
    active: number of active chunks (an ``int`` or ``int32`` scalar array, may be traced).
    features: the layer's maximum width (static).
    chunks: the number of equal chunks (static ``int``, or a traced scalar as read from the
      ``capacity`` collection inside ``jit``).

  Returns:
    ``bool[features]``.

  Raises:
    ValueError: if a static ``chunks`` does not divide ``features`` (naming both).

  >>> unit_mask(2, 6, 3)
  Array([ True,  True,  True,  True, False, False], dtype=bool)
  """
  if not isinstance(chunks, jax.Array):
    _check_chunks("unit_mask", features, chunks)
  return _chunk_index(features, chunks) < jnp.asarray(active, jnp.int32)


def _masked(y: jax.Array, mask: jax.Array) -> jax.Array:
  """``y ⊙ mask`` on the last axis, as an exact zero (``where``, so ``inf·0`` cannot leak)."""
  return jnp.where(mask, y, jnp.zeros((), y.dtype))


def _declare(module: nn.Module, features: int, chunks: int, initial_chunks: int) -> jax.Array:
  """Declares ``capacity/<path>/{active, chunks}`` and returns the active-unit mask."""
  _check_chunks(type(module).__name__, features, chunks, initial_chunks)
  active = module.variable(CAPACITY, "active", lambda: jnp.asarray(initial_chunks, jnp.int32))
  module.variable(CAPACITY, "chunks", lambda: jnp.asarray(chunks, jnp.int32))
  return unit_mask(active.value, features, chunks)


# --------------------------------------------------------------------------- layers


class CapacityDense(nn.Module):
  """A Dense layer of maximum width ``features`` whose active width grows in chunks.

  ``y = (x W + b) ⊙ m`` with ``W ∈ R^{in×features}``, ``b ∈ R^{features}`` and the active-unit
  mask ``m_j = [floor(j / s) < active]``, ``s = features / chunks`` (:func:`unit_mask`).
  ``active`` is the variable ``capacity/<path>/active`` (``int32``, initialised to
  ``initial_chunks``); ``capacity/<path>/chunks`` holds ``chunks``. Parameters are named
  ``kernel`` and ``bias`` as in ``nn.Dense``.

  Attributes:
    features: maximum width (number of output units).
    chunks: number of equal chunks (must divide ``features``).
    initial_chunks: chunks active at initialisation.
    use_bias: whether to add a bias.
    kernel_init: kernel initialiser (LeCun normal, as ``nn.Dense``).
    bias_init: bias initialiser (zeros).
  """

  features: int
  chunks: int = 5
  initial_chunks: int = 1
  use_bias: bool = True
  kernel_init: Initializer = _LECUN_NORMAL
  bias_init: Initializer = _ZEROS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = _declare(self, self.features, self.chunks, self.initial_chunks)
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features), jnp.float32)
    dtype = jnp.result_type(x, kernel)
    y = jnp.dot(jnp.asarray(x, dtype), jnp.asarray(kernel, dtype))
    if self.use_bias:
      y = y + jnp.asarray(self.param("bias", self.bias_init, (self.features,), jnp.float32), dtype)
    return _masked(y, mask)


def _tuple(value: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
  out = (int(value),) * n if isinstance(value, int | np.integer) else tuple(int(v) for v in value)
  if len(out) != n:
    raise ValueError(f"{what} must have {n} entries (one per spatial axis), got {value!r}.")
  return out


def _conv_padding(padding: Padding, n: int) -> str | list[tuple[int, int]]:
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(
        f"CapacityConv: padding must be 'SAME', 'VALID' or integers, got {padding!r}."
      )
    return padding.upper()
  if isinstance(padding, int | np.integer):
    return [(int(padding), int(padding))] * n
  pads = [
    (int(p), int(p)) if isinstance(p, int | np.integer) else tuple(map(int, p)) for p in padding
  ]
  if len(pads) != n:
    raise ValueError(f"CapacityConv: padding must have {n} entries, got {padding!r}.")
  return pads  # type: ignore[return-value]


def _conv_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  """Channels-last input/output, ``(*window, in, out)`` kernel (as ``nn.Conv``)."""
  lhs = (0, ndim - 1, *range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2, *range(0, ndim - 2))
  return lax.ConvDimensionNumbers(lhs, rhs, lhs)


class CapacityConv(nn.Module):
  """A convolution of maximum ``features`` output channels, active in chunks.

  ``y = (x ⋆ K + b) ⊙ m`` with ``K ∈ R^{k_1×…×k_d×in×features}`` (channels last, as
  ``nn.Conv``) and the active-channel mask ``m_c = [floor(c / s) < active]``,
  ``s = features / chunks``. Inputs are batched and channels-last: ``[B, *spatial, C]``
  (``d = x.ndim - 2`` spatial axes: images or 1-D signals).

  Attributes:
    features: maximum number of output channels.
    kernel_size: window, an ``int`` (same on every spatial axis) or a sequence.
    strides: an ``int`` or a sequence (default 1).
    padding: ``'SAME'`` (default), ``'VALID'``, an ``int``, or per-axis ``int`` /
      ``(low, high)`` pairs (like ``nn.Conv``; ``'CIRCULAR'``/``'CAUSAL'`` are not supported).
    chunks: number of equal chunks (must divide ``features``).
    initial_chunks: chunks active at initialisation.
    use_bias: whether to add a bias.
    kernel_init: kernel initialiser (LeCun normal).
    bias_init: bias initialiser (zeros).
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  chunks: int = 5
  initial_chunks: int = 1
  use_bias: bool = True
  kernel_init: Initializer = _LECUN_NORMAL
  bias_init: Initializer = _ZEROS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = _declare(self, self.features, self.chunks, self.initial_chunks)
    if jnp.ndim(x) < 3:
      raise ValueError(
        f"CapacityConv: x must be batched and channels-last [B, *spatial, C], got shape "
        f"{jnp.shape(x)}."
      )
    n = jnp.ndim(x) - 2
    window = _tuple(self.kernel_size, n, "CapacityConv: kernel_size")
    strides = _tuple(self.strides, n, "CapacityConv: strides")
    shape = (*window, jnp.shape(x)[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    dtype = jnp.result_type(x, kernel)
    y = lax.conv_general_dilated(
      jnp.asarray(x, dtype),
      jnp.asarray(kernel, dtype),
      strides,
      _conv_padding(self.padding, n),
      dimension_numbers=_conv_dimension_numbers(jnp.ndim(x)),
    )
    if self.use_bias:
      y = y + jnp.asarray(self.param("bias", self.bias_init, (self.features,), jnp.float32), dtype)
    return _masked(y, mask)


class CapacityResidualBlock(nn.Module):
  """A residual block whose width (both convolutions and the shortcut) grows in chunks.

  ``h = relu((conv1(x)) ⊙ m)``, ``y = relu((conv2(h) + shortcut(x)) ⊙ m)`` with the block's
  active-unit mask ``m`` (one ``capacity/<block>/active`` for the whole block).
  ``conv1`` is a ``3×3`` convolution with stride ``strides``, ``conv2`` a ``3×3`` convolution
  (both SAME, windows ``(3,) * (x.ndim - 2)``). The shortcut is the identity when
  ``strides == 1`` and the input has ``features`` channels, and otherwise a ``1×1``
  projection ``proj`` with stride ``strides`` whose output is masked with ``m`` too; the
  final mask makes the block's output width follow the active chunks even when an
  identity shortcut carries non-zero inactive channels. For unbatched-spatial inputs
  ``[B, D]`` (1-D feature vectors) the three layers are Dense layers of the same names
  (``strides`` must then be 1). No normalisation layers (the masked channels would
  otherwise feed BatchNorm statistics).

  Parameters: ``conv1/{kernel,bias}``, ``conv2/{kernel,bias}``, ``proj/{kernel,bias}`` (all
  with ``features`` output units). :func:`trainable_mask` treats ``conv1`` and ``proj`` as
  readers of the block's input and ``conv2`` as a reader of the block's own units.

  Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image
  Recognition", CVPR 2016 (the block); the chunked width follows the capacity thesis.

  Attributes:
    features: maximum width (output channels).
    chunks: number of equal chunks (must divide ``features``).
    initial_chunks: chunks active at initialisation.
    strides: stride of ``conv1`` and of the projection.
    use_bias: whether the three layers have biases.
    kernel_init: kernel initialiser (LeCun normal).
    bias_init: bias initialiser (zeros).
  """

  features: int
  chunks: int = 5
  initial_chunks: int = 1
  strides: int = 1
  use_bias: bool = True
  kernel_init: Initializer = _LECUN_NORMAL
  bias_init: Initializer = _ZEROS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = _declare(self, self.features, self.chunks, self.initial_chunks)
    inits = dict(use_bias=self.use_bias, kernel_init=self.kernel_init, bias_init=self.bias_init)
    n = jnp.ndim(x) - 2
    if n < 0:
      raise ValueError(f"CapacityResidualBlock: x must be batched, got shape {jnp.shape(x)}.")
    if n == 0:
      if self.strides != 1:
        raise ValueError(
          f"CapacityResidualBlock: strides must be 1 for [B, D] inputs, got {self.strides}."
        )

      def layer(_window: int, stride: int, name: str) -> nn.Module:
        del _window, stride
        return nn.Dense(self.features, name=name, **inits)

    else:

      def layer(window: int, stride: int, name: str) -> nn.Module:
        return nn.Conv(
          self.features, (window,) * n, (stride,) * n, padding="SAME", name=name, **inits
        )

    h = nn.relu(_masked(layer(3, self.strides, "conv1")(x), mask))
    y = layer(3, 1, "conv2")(h)
    if self.strides != 1 or jnp.shape(x)[-1] != self.features:
      shortcut = _masked(layer(1, self.strides, "proj")(x), mask)
    else:
      shortcut = x
    return nn.relu(_masked(y + shortcut, mask))


# --------------------------------------------------------------------------- zoo models


class CapacityMLP(nn.Module):
  """An MLP of capacity layers: the thesis's sine network by default.

  Architecture: flatten → ``[CapacityDense(w, chunks) → activation] for w in widths`` →
  ``nn.Dense(num_outputs)``. Layers are named ``CapacityDense_0 … CapacityDense_{L-1}`` and
  ``Dense_0`` (natural order = call order, as :func:`trainable_mask` needs). The defaults —
  one hidden layer of 500 units in 5 chunks of 100, ``tanh``, one output — are the
  thesis's sine-regression network. Both activations have ``f(0) = 0``, so inactive units
  stay exactly zero after the activation.

  Attributes:
    widths: maximum widths of the hidden layers.
    chunks: chunks per hidden layer (must divide every width).
    activation: ``'tanh'`` or ``'relu'``.
    num_outputs: outputs (1 for regression, the class count for classification).
    initial_chunks: chunks active at initialisation.
  """

  widths: Sequence[int] = (500,)
  chunks: int = 5
  activation: str = "tanh"
  num_outputs: int = 1
  initial_chunks: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout or BatchNorm.
    if self.activation not in _ACTIVATIONS:
      raise ValueError(
        f"CapacityMLP: activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}."
      )
    act = _ACTIVATIONS[self.activation]
    x = jnp.asarray(x, jnp.float32).reshape(jnp.shape(x)[0], -1)
    for width in self.widths:
      x = act(CapacityDense(width, self.chunks, self.initial_chunks)(x))
    return nn.Dense(self.num_outputs)(x)


class CapacityCNN(nn.Module):
  """The thesis's digit CNN in chunks: two capacity convolutions and a capacity hidden layer.

  Architecture: ``[CapacityConv(f, 3×3, SAME, chunks) → ReLU → max-pool 2/2 SAME] for f in
  features`` → flatten → ``CapacityDense(hidden, chunks)`` → ReLU → ``nn.Dense(num_classes)``.
  The defaults (30 and 60 channels, 120 hidden units, 10 chunks each: the network grows in
  tenths) follow the thesis's MNIST CNN, with the usual 32/64/128 widths rounded to
  multiples of 10 so that the chunks are equal. Layers are named ``CapacityConv_0``,
  ``CapacityConv_1``, ``CapacityDense_0``, ``Dense_0``. Works on images ``[B, H, W, C]`` and
  1-D signals ``[B, L, C]``.

  Attributes:
    features: maximum channels of the two convolutions.
    hidden: maximum width of the hidden Dense layer.
    chunks: chunks per capacity layer (must divide every width).
    num_classes: number of outputs.
    initial_chunks: chunks active at initialisation.
  """

  features: Sequence[int] = (30, 60)
  hidden: int = 120
  chunks: int = 10
  num_classes: int = 10
  initial_chunks: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = jnp.asarray(x, jnp.float32)
    n = x.ndim - 2
    for f in self.features:
      x = nn.relu(CapacityConv(f, 3, chunks=self.chunks, initial_chunks=self.initial_chunks)(x))
      x = nn.max_pool(x, (2,) * n, (2,) * n, padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(CapacityDense(self.hidden, self.chunks, self.initial_chunks)(x))
    return nn.Dense(self.num_classes)(x)


# --------------------------------------------------------------------------- the layer graph


class CapacityInfo(NamedTuple):
  """One capacity layer, as found by :func:`capacity_layers`."""

  key: str
  """The module path, ``/``-joined (``"CapacityDense_0"``, ``"Block_1"``)."""
  features: int
  """Maximum width: the last axis of the layer's kernel(s)."""
  chunks: int | jax.Array
  """Number of chunks: a Python ``int`` when ``capacity`` is concrete, the traced ``int32``
  scalar inside ``jit``."""


class _Edge(NamedTuple):
  """How one kernel connects to the capacity layers."""

  owner: str | None  # capacity layer whose units are the kernel's output columns
  provider: str | None  # capacity layer whose units the kernel's input rows read
  flatten: bool  # rows read channel r mod C of a flattened convolutional provider


def _natural(name: str) -> tuple:
  """Sort key: per ``/`` component, text compared as text and digit runs as integers."""
  return tuple(
    tuple(int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", part)))
    for part in name.split("/")
  )


def _module_of(name: str) -> str:
  return name.rpartition("/")[0]


def _owner(module: str, keys: Sequence[str]) -> str | None:
  """The capacity layer that is ``module`` or contains it (the longest matching path)."""
  best = None
  for key in keys:
    if (module == key or module.startswith(key + "/")) and (best is None or len(key) > len(best)):
      best = key
  return best


def _leaves(tree: Any, argname: str) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not flat:
    raise ValueError(f"{argname} is empty.")
  return [(path_name(p), leaf) for p, leaf in flat]


def _capacity_vars(capacity: Any) -> dict[str, dict[str, Any]]:
  out: dict[str, dict[str, Any]] = {}
  for name, leaf in _leaves(capacity, "capacity"):
    module, _, var = name.rpartition("/")
    out.setdefault(module, {})[var] = leaf
  found = {k: v for k, v in out.items() if "active" in v}
  if not found:
    raise ValueError(
      "capacity holds no '<layer path>/active' variables; pass variables['capacity'] of a model "
      "built from capacity layers."
    )
  for key, v in found.items():
    if "chunks" not in v:
      raise ValueError(f"capacity/{key} has 'active' but no 'chunks' variable.")
  return found


def _static_int(x: Any) -> int | jax.Array:
  """``int(x)`` for a concrete value, ``x`` itself when it is traced."""
  try:
    return int(np.asarray(x))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return x


def _analyse(
  params: Any, capacity: Any
) -> tuple[dict[str, CapacityInfo], dict[str, jax.Array], dict[str, bool], dict[str, _Edge]]:
  """Capacity layers, their ``active`` values, whether they are convolutional, kernel edges."""
  cap = _capacity_vars(capacity)
  keys = sorted(cap, key=_natural)
  leaves = _leaves(params, "params")
  kernels = sorted(
    ((n, leaf) for n, leaf in leaves if n.rpartition("/")[2] == "kernel" and np.ndim(leaf) >= 2),
    key=lambda t: _natural(t[0]),
  )
  infos: dict[str, CapacityInfo] = {}
  is_conv: dict[str, bool] = {}
  for key in keys:
    mine = [(n, leaf) for n, leaf in kernels if _owner(_module_of(n), keys) == key]
    if not mine:
      raise ValueError(
        f"capacity/{key} has no kernel in params (expected params['{key}']['kernel'] or, for a "
        "residual block, kernels below it)."
      )
    widths = {np.shape(leaf)[-1] for _, leaf in mine}
    if len(widths) != 1:
      raise ValueError(
        f"capacity layer {key!r}: its kernels {[n for n, _ in mine]} have different output widths "
        f"{sorted(widths)}."
      )
    features = widths.pop()
    chunks = _static_int(cap[key]["chunks"])
    if not isinstance(chunks, jax.Array):
      _check_chunks(f"capacity layer {key!r}", features, chunks)
    infos[key] = CapacityInfo(key, int(features), chunks)
    is_conv[key] = all(np.ndim(leaf) > 2 for _, leaf in mine)
  active = {k: jnp.asarray(cap[k]["active"], jnp.int32) for k in keys}

  # Group kernels into layers (a capacity layer, or one non-capacity module) in natural order.
  groups: list[tuple[str | None, list[tuple[str, Any]]]] = []
  for n, leaf in kernels:
    owner = _owner(_module_of(n), keys)
    if owner is not None and groups and groups[-1][0] == owner:
      groups[-1][1].append((n, leaf))
    else:
      groups.append((owner, [(n, leaf)]))

  edges: dict[str, _Edge] = {}
  pending: str | None = None
  for owner, members in groups:
    consumed = False
    for n, leaf in members:
      shape = np.shape(leaf)
      rel = _module_of(n)[len(owner) + 1 :] if owner is not None else ""
      if owner is not None and rel == _BLOCK_INNER:
        edges[n] = _Edge(owner, owner, False)
        continue
      provider, flatten = None, False
      if pending is not None:
        c = infos[pending].features
        if shape[-2] == c:
          provider = pending
        elif len(shape) == 2 and is_conv[pending] and shape[-2] % c == 0:
          provider, flatten = pending, True
      consumed |= provider is not None
      edges[n] = _Edge(owner, provider, flatten)
    if owner is not None:
      pending = owner
    elif consumed:
      pending = None
  return infos, active, is_conv, edges


def capacity_layers(params: Any, capacity: Any) -> dict[str, CapacityInfo]:
  """Finds the capacity layers of a model from its ``params`` and ``capacity`` collections.

  A capacity layer is a module path ``p`` with ``capacity[p]['active']`` and
  ``capacity[p]['chunks']``; its ``features`` is the last axis of the kernel(s) at or below
  ``params[p]`` (``kernel.shape[-1]``), its ``chunks`` the stored constant.

  Args:
    params: ``variables['params']``.
    capacity: ``variables['capacity']``.

  Returns:
    ``{key: CapacityInfo(key, features, chunks)}`` in layer order (natural sort of the paths,
    see the module docstring).

  Raises:
    ValueError: if ``capacity`` holds no capacity layer, a layer has no kernel, or a static
      ``chunks`` does not divide ``features``.
  """
  return _analyse(params, capacity)[0]


def _unit_state(
  info: CapacityInfo, active: jax.Array, frozen: jax.Array, n_rows: int | None, flatten: bool
) -> tuple[jax.Array, jax.Array]:
  """``(active_u, new_u)`` per unit (or per input row that reads a unit)."""
  chunk = _chunk_index(info.features, info.chunks)
  if n_rows is not None:
    channel = jnp.arange(n_rows) % info.features if flatten else jnp.arange(n_rows)
    chunk = chunk[channel]
  is_active = chunk < active
  return is_active, is_active & (chunk >= frozen)


def _frozen_values(frozen: Any, infos: dict[str, CapacityInfo]) -> dict[str, jax.Array]:
  frozen = dict(frozen or {})
  unknown = sorted(set(frozen) - set(infos))
  if unknown:
    raise ValueError(
      f"frozen names unknown capacity layer(s) {unknown}; the capacity layers are {list(infos)}."
    )
  return {k: jnp.asarray(frozen.get(k, 0), jnp.int32) for k in infos}


def trainable_mask(params: Any, capacity: Any, frozen: Any) -> Any:
  """Which parameter entries may still change, given the active and frozen chunks.

  Per capacity layer ``l`` with chunk index ``c_l(j)`` of unit ``j``:
  ``active_l(j) = c_l(j) < active_l`` and ``new_l(j) = frozen_l <= c_l(j) < active_l``
  (``frozen_l`` = number of oldest chunks frozen, ``0`` if ``l`` is missing from ``frozen``).
  For a kernel entry connecting input row ``i`` to output unit ``j``:

      trainable(i, j) = (new_out(j) ∧ act_in(i)) ∨ (new_in(i) ∧ act_out(j))
                        ∨ (¬F ∧ act_in(i) ∧ act_out(j)),    F = ∃ l: frozen_l > 0,

  where ``new_out``/``act_out`` refer to the layer owning the kernel's output columns
  (``False``/``True`` if it is not a capacity layer) and ``new_in``/``act_in`` to the capacity
  layer the rows read (its consumer relation, see the module docstring; ``False``/``True``
  if the input is not capacity-managed; for a flatten after a convolution, row ``r`` reads
  channel ``r mod C``). Leading window axes of a conv kernel broadcast. Biases (and any
  other leaf of a capacity layer whose last axis has ``features`` entries):
  ``new_out(j) ∨ (¬F ∧ act_out(j))``; other leaves: ``¬F``.

  Consequences: before any freezing (``F`` false) every active entry is trainable; inactive
  entries (reading or writing an inactive unit) never are; once something is frozen, an
  entry is trainable iff it writes a new unit or reads one, so layers that are not capacity
  layers and read no new unit are frozen entirely.

  Args:
    params: ``variables['params']``.
    capacity: ``variables['capacity']`` (may be traced).
    frozen: ``{layer_key: int32 scalar}`` (may be traced), keys from :func:`capacity_layers`.

  Returns:
    A pytree of ``bool`` arrays with the structure and shapes of ``params``. Jittable.

  Raises:
    ValueError: for a key of ``frozen`` that is not a capacity layer.
  """
  infos, active, _, edges = _analyse(params, capacity)
  fro = _frozen_values(frozen, infos)
  any_frozen = jnp.any(jnp.stack([f > 0 for f in fro.values()]))
  keys = list(infos)

  def mask(path: Any, leaf: Any) -> jax.Array:
    name = path_name(path)
    shape = np.shape(leaf)
    edge = edges.get(name)
    if edge is not None:
      n_in, n_out = shape[-2], shape[-1]
      if edge.owner is not None:
        act_out, new_out = _unit_state(
          infos[edge.owner], active[edge.owner], fro[edge.owner], None, False
        )
      else:
        act_out, new_out = jnp.ones(n_out, bool), jnp.zeros(n_out, bool)
      if edge.provider is not None:
        p = edge.provider
        act_in, new_in = _unit_state(infos[p], active[p], fro[p], n_in, edge.flatten)
      else:
        act_in, new_in = jnp.ones(n_in, bool), jnp.zeros(n_in, bool)
      ai, ni = act_in[:, None], new_in[:, None]
      ao, no = act_out[None, :], new_out[None, :]
      m = (no & ai) | (ni & ao) | (~any_frozen & ai & ao)
      return jnp.broadcast_to(m, shape)
    owner = _owner(_module_of(name), keys)
    if owner is not None and len(shape) >= 1 and shape[-1] == infos[owner].features:
      act_out, new_out = _unit_state(infos[owner], active[owner], fro[owner], None, False)
      return jnp.broadcast_to(new_out | (~any_frozen & act_out), shape)
    return jnp.broadcast_to(~any_frozen, shape)

  return jax.tree_util.tree_map_with_path(mask, params)


def reinit_chunk(
  key: jax.Array,
  params: Any,
  capacity: Any,
  layer_key: str,
  chunk: int | jax.Array,
  *,
  init: Initializer = _LECUN_NORMAL,
) -> Any:
  """Re-initialises chunk ``chunk`` of capacity layer ``layer_key`` for its active fan-in.

  For every kernel ``K`` of the layer (one for Dense/conv, ``conv1``/``conv2``/``proj`` for a
  residual block) the columns ``j`` with ``floor(j / s) == chunk`` become

      K[..., :, j] = G[..., :, j] · sqrt(n_full / n_active),   G = init(key_K, K.shape),

  where ``n_full = prod(K.shape[:-1])`` is the fan-in the initialiser saw (window × input
  size) and ``n_active = prod(K.shape[:-2]) · #{active input rows}``: the window size times
  the number of input rows that read an active unit of the providing capacity layer
  (``active_p · s_p`` rows, or ``H·W·active_p·s_p`` after a flatten) — or all input rows if
  the input is not capacity-managed. For LeCun normal the new columns thus have standard
  deviation ``sqrt(1 / n_active)``; the rescaling is exact for every fan-in
  variance-scaling initialiser (``lecun_*``, ``he_*``, ``variance_scaling(..., 'fan_in',
  ...)``, whose variance is ``∝ 1 / fan_in``) and only approximate for ``fan_avg``
  (Glorot); other initialisers get the same factor. The counts use the ``active`` values in
  ``capacity`` at the call: raise ``active`` of the previous layer first if it expands in
  the same step (a residual block's ``conv2`` reads the block itself, whose own ``active``
  is used). Rows that read inactive units are drawn at the same scale. The chunk's bias
  entries are set to zero. Nothing else changes.

  Args:
    key: PRNG key.
    params: ``variables['params']``.
    capacity: ``variables['capacity']`` (may be traced).
    layer_key: a key of :func:`capacity_layers`.
    chunk: the chunk index (``int`` or traced ``int32`` scalar).
    init: the kernel initialiser (default ``nn.initializers.lecun_normal()``), evaluated at
      the kernel's full shape and rescaled.

  Returns:
    ``params`` with the chunk's columns and bias entries replaced. Jittable.

  Raises:
    ValueError: for an unknown ``layer_key`` or a static ``chunk`` out of range.
  """
  infos, active, _, edges = _analyse(params, capacity)
  if layer_key not in infos:
    raise ValueError(
      f"reinit_chunk: {layer_key!r} is not a capacity layer; the capacity layers are {list(infos)}."
    )
  info = infos[layer_key]
  if isinstance(chunk, int | np.integer) and isinstance(info.chunks, int):
    if not 0 <= chunk < info.chunks:
      raise ValueError(
        f"reinit_chunk: chunk must be in [0, {info.chunks}) for {layer_key!r}, got {chunk}."
      )
  cols = _chunk_index(info.features, info.chunks) == jnp.asarray(chunk, jnp.int32)
  kernel_names = sorted((n for n, e in edges.items() if e.owner == layer_key), key=_natural)
  index = {n: i for i, n in enumerate(kernel_names)}
  kernel_modules = {_module_of(n) for n in kernel_names}

  def update(path: Any, leaf: Any) -> Any:
    name = path_name(path)
    if name in index:
      shape = np.shape(leaf)
      edge = edges[name]
      if edge.provider is not None:
        p = edge.provider
        act_in, _ = _unit_state(infos[p], active[p], active[p], shape[-2], edge.flatten)
        rows = jnp.sum(act_in.astype(jnp.int32))
      else:
        rows = jnp.asarray(shape[-2], jnp.int32)
      n_full = math.prod(shape[:-1])
      n_active = jnp.maximum(math.prod(shape[:-2]) * rows, 1).astype(jnp.float32)
      g = init(jax.random.fold_in(key, index[name]), shape, jnp.result_type(leaf))
      new = g * jnp.sqrt(n_full / n_active).astype(g.dtype)
      return jnp.where(cols, new, leaf)
    module, _, leaf_name = name.rpartition("/")
    if leaf_name == "bias" and module in kernel_modules and np.shape(leaf)[-1:] == (info.features,):
      return jnp.where(cols, jnp.zeros((), jnp.result_type(leaf)), leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(update, params)
