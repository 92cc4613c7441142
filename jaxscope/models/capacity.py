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

Which units are active, the layer graph, which parameter entries may train and how a new
chunk is re-initialised are in :mod:`jaxscope.models.capacity_chunks` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxscope.models.capacity_chunks import (
  _LECUN_NORMAL,
  INITIALIZERS,
  KEEP,
  CapacityInfo,
  Initializer,
  _check_chunks,
  capacity_layers,
  initializer,
  reinit_chunk,
  trainable_mask,
  unit_mask,
)

__all__ = [
  "CAPACITY",
  "INITIALIZERS",
  "KEEP",
  "CapacityCNN",
  "CapacityConv",
  "CapacityDense",
  "CapacityInfo",
  "CapacityMLP",
  "CapacityResidualBlock",
  "capacity_layers",
  "initializer",
  "reinit_chunk",
  "trainable_mask",
  "unit_mask",
]

CAPACITY = "capacity"
"""The name of the Flax variable collection holding each capacity layer's ``active`` and
``chunks`` (``int32`` scalars)."""

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]

_ZEROS = nn.initializers.zeros
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "tanh": jnp.tanh}


# --------------------------------------------------------------------------- masks


def _masked(y: jax.Array, mask: jax.Array) -> jax.Array:
  """``y ⊙ mask`` on the last axis, as an exact zero (``where``, so ``inf·0`` cannot leak)."""
  return jnp.where(mask, y, jnp.zeros((), y.dtype))


def _inits(module: nn.Module) -> tuple[Initializer, Initializer]:
  """The module's ``kernel_init`` and ``bias_init``, names resolved (:func:`initializer`)."""
  where = type(module).__name__
  return (
    initializer(module.kernel_init, what=f"{where}: kernel_init"),
    initializer(module.bias_init, what=f"{where}: bias_init"),
  )


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
    kernel_init: kernel initialiser or its name in :data:`INITIALIZERS` (LeCun normal, as
      ``nn.Dense``), drawn for the full width: the initial kernel is that of an
      ``nn.Dense(features)`` with the same initialiser and key (Glorot's fans are
      ``in`` and ``features``, not the active width).
    bias_init: bias initialiser or its name (zeros).
  """

  features: int
  chunks: int = 5
  initial_chunks: int = 1
  use_bias: bool = True
  kernel_init: Initializer | str = _LECUN_NORMAL
  bias_init: Initializer | str = _ZEROS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = _declare(self, self.features, self.chunks, self.initial_chunks)
    kernel_init, bias_init = _inits(self)
    kernel = self.param("kernel", kernel_init, (jnp.shape(x)[-1], self.features), jnp.float32)
    dtype = jnp.result_type(x, kernel)
    y = jnp.dot(jnp.asarray(x, dtype), jnp.asarray(kernel, dtype))
    if self.use_bias:
      y = y + jnp.asarray(self.param("bias", bias_init, (self.features,), jnp.float32), dtype)
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
    kernel_init: kernel initialiser or its name in :data:`INITIALIZERS` (LeCun normal),
      drawn for all ``features`` output channels.
    bias_init: bias initialiser or its name (zeros).
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  chunks: int = 5
  initial_chunks: int = 1
  use_bias: bool = True
  kernel_init: Initializer | str = _LECUN_NORMAL
  bias_init: Initializer | str = _ZEROS

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
    kernel_init, bias_init = _inits(self)
    kernel = self.param("kernel", kernel_init, shape, jnp.float32)
    dtype = jnp.result_type(x, kernel)
    y = lax.conv_general_dilated(
      jnp.asarray(x, dtype),
      jnp.asarray(kernel, dtype),
      strides,
      _conv_padding(self.padding, n),
      dimension_numbers=_conv_dimension_numbers(jnp.ndim(x)),
    )
    if self.use_bias:
      y = y + jnp.asarray(self.param("bias", bias_init, (self.features,), jnp.float32), dtype)
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
    kernel_init: kernel initialiser or its name in :data:`INITIALIZERS` (LeCun normal).
    bias_init: bias initialiser or its name (zeros).
  """

  features: int
  chunks: int = 5
  initial_chunks: int = 1
  strides: int = 1
  use_bias: bool = True
  kernel_init: Initializer | str = _LECUN_NORMAL
  bias_init: Initializer | str = _ZEROS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mask = _declare(self, self.features, self.chunks, self.initial_chunks)
    kernel_init, bias_init = _inits(self)
    inits = dict(use_bias=self.use_bias, kernel_init=kernel_init, bias_init=bias_init)
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
  stay exactly zero after the activation. ``kernel_init`` and ``bias_init`` apply to every
  layer, the capacity layers at their full width (the thesis: Xavier/Glorot,
  ``kernel_init="glorot_uniform"``).

  Attributes:
    widths: maximum widths of the hidden layers.
    chunks: chunks per hidden layer (must divide every width).
    activation: ``'tanh'`` or ``'relu'``.
    num_outputs: outputs (1 for regression, the class count for classification).
    initial_chunks: chunks active at initialisation.
    kernel_init: kernel initialiser or its name in :data:`INITIALIZERS` (LeCun normal).
    bias_init: bias initialiser or its name (zeros).
  """

  widths: Sequence[int] = (500,)
  chunks: int = 5
  activation: str = "tanh"
  num_outputs: int = 1
  initial_chunks: int = 1
  kernel_init: Initializer | str = "lecun_normal"
  bias_init: Initializer | str = "zeros"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout or BatchNorm.
    if self.activation not in _ACTIVATIONS:
      raise ValueError(
        f"CapacityMLP: activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}."
      )
    act = _ACTIVATIONS[self.activation]
    kernel_init, bias_init = _inits(self)
    inits = dict(kernel_init=kernel_init, bias_init=bias_init)
    x = jnp.asarray(x, jnp.float32).reshape(jnp.shape(x)[0], -1)
    for width in self.widths:
      x = act(CapacityDense(width, self.chunks, self.initial_chunks, **inits)(x))
    return nn.Dense(self.num_outputs, **inits)(x)


class CapacityCNN(nn.Module):
  """The thesis's digit CNN in chunks: two capacity convolutions and a capacity hidden layer.

  Architecture: ``[CapacityConv(f, 3×3, SAME, chunks) → ReLU → max-pool 2/2 SAME] for f in
  features`` → flatten → ``CapacityDense(hidden, chunks)`` → ReLU → ``nn.Dense(num_classes)``.
  The defaults (30 and 60 channels, 120 hidden units, 10 chunks each: the network grows in
  tenths) follow the thesis's MNIST CNN, with the usual 32/64/128 widths rounded to
  multiples of 10 so that the chunks are equal. Layers are named ``CapacityConv_0``,
  ``CapacityConv_1``, ``CapacityDense_0``, ``Dense_0``. Works on images ``[B, H, W, C]`` and
  1-D signals ``[B, L, C]``. ``kernel_init`` and ``bias_init`` apply to every layer, the
  capacity layers at their full width.

  Attributes:
    features: maximum channels of the two convolutions.
    hidden: maximum width of the hidden Dense layer.
    chunks: chunks per capacity layer (must divide every width).
    num_classes: number of outputs.
    initial_chunks: chunks active at initialisation.
    kernel_init: kernel initialiser or its name in :data:`INITIALIZERS` (LeCun normal).
    bias_init: bias initialiser or its name (zeros).
  """

  features: Sequence[int] = (30, 60)
  hidden: int = 120
  chunks: int = 10
  num_classes: int = 10
  initial_chunks: int = 1
  kernel_init: Initializer | str = "lecun_normal"
  bias_init: Initializer | str = "zeros"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    kernel_init, bias_init = _inits(self)
    inits = dict(kernel_init=kernel_init, bias_init=bias_init)
    x = jnp.asarray(x, jnp.float32)
    n = x.ndim - 2
    for f in self.features:
      conv = CapacityConv(f, 3, chunks=self.chunks, initial_chunks=self.initial_chunks, **inits)
      x = nn.max_pool(nn.relu(conv(x)), (2,) * n, (2,) * n, padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(CapacityDense(self.hidden, self.chunks, self.initial_chunks, **inits)(x))
    return nn.Dense(self.num_classes, **inits)(x)
