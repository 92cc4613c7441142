"""He et al.'s CIFAR ResNets (ResNet-20, -32, -44, -56, -110: depth = 6n + 2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["BasicBlock", "CifarResNet"]

_he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _bn(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
  """A residual basic block: conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU.

  The shortcut is the identity when shape is preserved and otherwise a strided 1×1
  convolution followed by BatchNorm (He et al.'s option B). Convolutions have no bias.

  Attributes:
    features: output channels.
    stride: stride of the first convolution and of the projection.
  """

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    nd = x.ndim - 2
    k3, k1, s = (3,) * nd, (1,) * nd, (self.stride,) * nd
    y = nn.Conv(
      self.features, k3, s, padding="SAME", use_bias=False, kernel_init=_he, name="conv1"
    )(x)
    y = nn.relu(_bn(train, "bn1")(y))
    y = nn.Conv(self.features, k3, padding="SAME", use_bias=False, kernel_init=_he, name="conv2")(y)
    y = _bn(train, "bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, k1, s, use_bias=False, kernel_init=_he, name="proj_conv")(x)
      x = _bn(train, "proj_bn")(x)
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  """The CIFAR ResNet of He et al. (2016), §4.2, with projection shortcuts (option B).

  Architecture: conv 3×3, 16 filters → BN → ReLU → three stages of ``n = (depth - 2) / 6``
  :class:`BasicBlock` s with 16, 32 and 64 filters (the first block of stages 2 and 3
  has stride 2 and a 1×1 conv + BN projection shortcut) → global average pool → Dense
  ``num_classes``. BatchNorm uses batch statistics when training and running averages
  (momentum 0.9) otherwise. Convolutions have no bias and He-normal kernels
  (std = sqrt(2 / fan_in)). ResNet-20 has 0.27M parameters with the paper's
  parameter-free option-A shortcuts; option B adds two 1×1 projections and their BN,
  giving 272,474 at ``(32, 32, 3)`` with 10 classes. Works on images and 1-D signals.

  Layers are named ``conv1``, ``bn1``, ``stage{s}_block{b}/{conv1,bn1,conv2,bn2,proj_conv,
  proj_bn}`` and ``fc``.

  Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image
  Recognition", CVPR 2016.

  Attributes:
    depth: total depth 6n + 2 (20, 32, 44, 56, 110, …; 8 is the smallest).
    num_classes: number of outputs.
    widths: channels of the three stages.
  """

  depth: int = 20
  num_classes: int = 10
  widths: tuple[int, int, int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"CifarResNet: depth must be 6n + 2 with n >= 1, got {self.depth}.")
    n = (self.depth - 2) // 6
    x = jnp.asarray(x, jnp.float32)
    nd = x.ndim - 2
    x = nn.Conv(
      self.widths[0], (3,) * nd, padding="SAME", use_bias=False, kernel_init=_he, name="conv1"
    )(x)
    x = nn.relu(_bn(train, "bn1")(x))
    for stage, width in enumerate(self.widths):
      for block in range(n):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, stride, name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    return nn.Dense(self.num_classes, name="fc")(x)
