"""A small DenseNet-BC for CIFAR-sized (and smaller) inputs (Huang et al., 2017)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["DenseNetBC"]

_he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _bn(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class _Bottleneck(nn.Module):
  """BN-ReLU-Conv1×1(4k)-BN-ReLU-Conv3×3(k); returns the ``k`` new feature maps."""

  growth_rate: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    nd = x.ndim - 2
    y = nn.relu(_bn(train, "bn1")(x))
    y = nn.Conv(4 * self.growth_rate, (1,) * nd, use_bias=False, kernel_init=_he, name="conv1")(y)
    y = nn.relu(_bn(train, "bn2")(y))
    return nn.Conv(
      self.growth_rate, (3,) * nd, padding="SAME", use_bias=False, kernel_init=_he, name="conv2"
    )(y)


class _Transition(nn.Module):
  """BN-ReLU-Conv1×1(features)-AvgPool 2×2 stride 2 (SAME, padding not counted)."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    nd = x.ndim - 2
    y = nn.relu(_bn(train, "bn")(x))
    y = nn.Conv(self.features, (1,) * nd, use_bias=False, kernel_init=_he, name="conv")(y)
    return nn.avg_pool(y, (2,) * nd, (2,) * nd, padding="SAME", count_include_pad=False)


class DenseNetBC(nn.Module):
  """DenseNet-BC for small inputs (Huang et al., 2017, CIFAR variant).

  Architecture: conv 3×3 with ``2k`` filters (``k`` = growth rate) → dense block 1 →
  transition 1 → dense block 2 → transition 2 → dense block 3 → BN → ReLU → global
  average pool → Dense ``num_classes``. A dense block stacks bottleneck layers
  BN-ReLU-Conv1×1(4k)-BN-ReLU-Conv3×3(k), each concatenating its ``k`` new channels to
  its input. A transition is BN-ReLU-Conv1×1 to ``floor(compression · channels)`` channels,
  then 2×2 average pooling with stride 2; the pooling is SAME (padding not counted), so a
  side of 1 stays 1 and 8×8 digits go 8 → 4 → 2. Convolutions have no bias and He-normal
  kernels. ``block_sizes=(6, 6, 6)`` is DenseNet-BC-40 (depth = 6n + 4 with n layers per
  block), ``(16, 16, 16)`` DenseNet-BC-100 as used by ikkuna.

  Layers are named ``conv1``, ``block{b}_layer{l}/{bn1,conv1,bn2,conv2}``,
  ``transition{b}/{bn,conv}``, ``bn_final`` and ``fc``.

  Reference: G. Huang, Z. Liu, L. van der Maaten, K. Q. Weinberger, "Densely Connected
  Convolutional Networks", CVPR 2017.

  Attributes:
    block_sizes: bottleneck layers in each dense block.
    growth_rate: ``k``, channels each bottleneck layer adds.
    compression: ``θ``, channel reduction of the transitions.
    num_classes: number of outputs.
  """

  block_sizes: tuple[int, ...] = (6, 6, 6)
  growth_rate: int = 12
  compression: float = 0.5
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    nd = x.ndim - 2
    x = nn.Conv(
      2 * self.growth_rate, (3,) * nd, padding="SAME", use_bias=False, kernel_init=_he, name="conv1"
    )(x)
    for b, size in enumerate(self.block_sizes):
      for layer in range(size):
        y = _Bottleneck(self.growth_rate, name=f"block{b + 1}_layer{layer + 1}")(x, train)
        x = jnp.concatenate([x, y], axis=-1)
      if b < len(self.block_sizes) - 1:
        features = int(x.shape[-1] * self.compression)
        x = _Transition(features, name=f"transition{b + 1}")(x, train)
    x = nn.relu(_bn(train, "bn_final")(x))
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    return nn.Dense(self.num_classes, name="fc")(x)
