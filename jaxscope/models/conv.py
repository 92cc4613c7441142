"""Plain convolutional networks: DeepOBS 2c2d and 3c3d, LeNet-5, ikkuna's AlexNetMini.

All of them take ``[B, H, W, C]`` images or ``[B, L, C]`` 1-D signals: kernels are
``(k,) * spatial_ndim`` and pooling windows likewise, with ``spatial_ndim = x.ndim - 2``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["AlexNetMini", "LeNet5", "ThreeC3D", "TwoC2D"]


def _window(x: jax.Array, k: int) -> tuple[int, ...]:
  """``(k,) * spatial_ndim`` for a batched channels-last input."""
  return (k,) * (x.ndim - 2)


def _max_pool(x: jax.Array, window: int, stride: int, padding: str) -> jax.Array:
  return nn.max_pool(x, _window(x, window), _window(x, stride), padding=padding)


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


class TwoC2D(nn.Module):
  """DeepOBS's ``2c2d`` network (``mnist_2c2d``, ``fmnist_2c2d``; Schneider et al., 2019).

  Architecture: conv 5×5, 32 filters, SAME → ReLU → max-pool 2, stride 2, SAME →
  conv 5×5, 64 filters, SAME → ReLU → max-pool 2/2 SAME → Dense 1024 → ReLU →
  Dense ``num_classes``. As in DeepOBS, kernels are drawn from a normal with standard
  deviation 0.05 truncated at two standard deviations and biases start at 0.05. At
  ``(28, 28, 1)`` with 10 classes it has 3,274,634 parameters.

  Reference: F. Schneider, L. Balles, P. Hennig, "DeepOBS: A Deep Learning Optimizer
  Benchmark Suite", ICLR 2019.

  Attributes:
    num_classes: number of outputs.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    w = nn.initializers.truncated_normal(stddev=0.05)
    b = nn.initializers.constant(0.05)
    x = jnp.asarray(x, jnp.float32)
    for i, features in enumerate((32, 64)):
      conv = nn.Conv(
        features, _window(x, 5), padding="SAME", kernel_init=w, bias_init=b, name=f"conv{i + 1}"
      )
      x = _max_pool(nn.relu(conv(x)), 2, 2, "SAME")
    x = nn.relu(nn.Dense(1024, kernel_init=w, bias_init=b, name="fc1")(_flatten(x)))
    return nn.Dense(self.num_classes, kernel_init=w, bias_init=b, name="fc2")(x)


class ThreeC3D(nn.Module):
  """DeepOBS's ``3c3d`` network (``cifar10_3c3d``, ``cifar100_3c3d``; Schneider et al., 2019).

  Architecture: conv 5×5, 64 filters, VALID → ReLU → max-pool 3, stride 2, SAME →
  conv 3×3, 96 filters, VALID → ReLU → max-pool 3/2 SAME → conv 3×3, 128 filters, SAME
  → ReLU → max-pool 3/2 SAME → Dense 512 → ReLU → Dense 256 → ReLU → Dense
  ``num_classes``. As in DeepOBS, conv kernels are Glorot-normal (truncated), dense
  kernels Glorot-uniform, biases 0. At ``(32, 32, 3)`` with 10 classes it has 895,210
  parameters. DeepOBS's L2 weight decay of 0.002 belongs to the loss, not to the model.

  The two VALID convolutions need inputs of at least 9 pixels per side; ``padding='SAME'``
  (not DeepOBS) makes every convolution SAME so that small inputs such as 8×8 digits fit.

  Reference: F. Schneider, L. Balles, P. Hennig, "DeepOBS: A Deep Learning Optimizer
  Benchmark Suite", ICLR 2019.

  Attributes:
    num_classes: number of outputs.
    padding: padding of the first two convolutions, ``'VALID'`` (DeepOBS) or ``'SAME'``.
  """

  num_classes: int = 10
  padding: str = "VALID"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    conv_init = nn.initializers.glorot_normal()
    dense_init = nn.initializers.glorot_uniform()
    zeros = nn.initializers.zeros
    x = jnp.asarray(x, jnp.float32)
    for i, (features, k, pad) in enumerate(
      ((64, 5, self.padding), (96, 3, self.padding), (128, 3, "SAME"))
    ):
      conv = nn.Conv(
        features,
        _window(x, k),
        padding=pad,
        kernel_init=conv_init,
        bias_init=zeros,
        name=f"conv{i + 1}",
      )
      x = _max_pool(nn.relu(conv(x)), 3, 2, "SAME")
    x = _flatten(x)
    for i, width in enumerate((512, 256)):
      x = nn.relu(nn.Dense(width, kernel_init=dense_init, bias_init=zeros, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, kernel_init=dense_init, bias_init=zeros, name="fc3")(x)


class LeNet5(nn.Module):
  """LeNet-5 as adapted in the nnvis thesis (after LeCun et al., 1998).

  Architecture: conv 3×3, 6 filters, SAME → ReLU → max-pool 2, stride 2, SAME →
  conv 3×3, 16 filters, SAME → ReLU → max-pool 2/2 SAME → Dense 120 → ReLU →
  Dense 84 → ReLU → Dense ``num_classes``. SAME padding throughout keeps it valid for
  any input size (8×8 digits: 8 → 4 → 2, so the first dense layer sees 2·2·16 = 64
  features; 28×28 MNIST: 7·7·16 = 784). Flax default initialisers.

  Reference: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied
  to document recognition", Proc. IEEE 86(11), 1998; the 3×3 / ReLU / max-pool variant
  follows the nnvis loss-landscape thesis.

  Attributes:
    num_classes: number of outputs.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = jnp.asarray(x, jnp.float32)
    for i, features in enumerate((6, 16)):
      x = nn.Conv(features, _window(x, 3), padding="SAME", name=f"conv{i + 1}")(x)
      x = _max_pool(nn.relu(x), 2, 2, "SAME")
    x = _flatten(x)
    x = nn.relu(nn.Dense(120, name="fc1")(x))
    x = nn.relu(nn.Dense(84, name="fc2")(x))
    return nn.Dense(self.num_classes, name="fc3")(x)


class AlexNetMini(nn.Module):
  """ikkuna's ``AlexNetMini``, a tiny AlexNet-like network that adapts to its input.

  Architecture: conv 3×3, 4 filters, VALID → ReLU → conv 3×3, 8 filters, VALID → ReLU →
  max-pool 2, stride 2, VALID → dropout 0.25 → Dense 16 → ReLU → dropout 0.5 → Dense
  ``num_classes``. Each spatial side shrinks ``n → floor((n - 4) / 2)``, so inputs need
  at least 6 pixels per side (8×8 digits: 8 → 6 → 4 → 2, 2·2·8 = 32 features; 32×32
  CIFAR: 14·14·8 = 1568). Dropout is active only with ``train=True`` and needs a
  ``'dropout'`` PRNG stream. Flax default initialisers.

  Reference: ikkuna (github.com/Peltarion/ai_ikkuna, 2018), ``ikkuna.models.AlexNetMini``;
  after A. Krizhevsky, I. Sutskever, G. Hinton, "ImageNet Classification with Deep
  Convolutional Neural Networks", NeurIPS 2012.

  Attributes:
    num_classes: number of outputs.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    x = nn.relu(nn.Conv(4, _window(x, 3), padding="VALID", name="conv1")(x))
    x = nn.relu(nn.Conv(8, _window(x, 3), padding="VALID", name="conv2")(x))
    x = _max_pool(x, 2, 2, "VALID")
    x = nn.Dropout(0.25, deterministic=not train, name="dropout1")(_flatten(x))
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    x = nn.Dropout(0.5, deterministic=not train, name="dropout2")(x)
    return nn.Dense(self.num_classes, name="fc2")(x)
