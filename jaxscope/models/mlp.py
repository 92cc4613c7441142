"""Fully connected models: a configurable MLP and DeepOBS's ``mnist_mlp``."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MLP", "MnistMLP"]


class MLP(nn.Module):
  """A multilayer perceptron on the flattened input.

  Architecture: flatten → ``[Dense(h) → ReLU] for h in hidden_sizes`` → Dense(num_outputs).
  Layers are named ``fc1 … fcN`` and the output layer ``out``. With ``num_outputs=1`` it
  is a regression network (outputs ``[B, 1]``), with ``num_outputs=K`` a classifier
  returning logits ``[B, K]``. Flax's default initialisers (LeCun normal kernels, zero
  biases) are used.

  Attributes:
    hidden_sizes: widths of the hidden layers.
    num_outputs: number of outputs (classes, or 1 for regression).
  """

  hidden_sizes: Sequence[int] = (128, 64)
  num_outputs: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout or BatchNorm.
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_outputs, name="out")(x)


class MnistMLP(nn.Module):
  """DeepOBS's ``mnist_mlp`` test problem network (Schneider et al., 2019).

  Architecture: flatten (784 for MNIST) → Dense 1000 → ReLU → Dense 500 → ReLU →
  Dense 100 → ReLU → Dense ``num_classes``. Kernels are drawn from a normal with
  standard deviation 3e-2 truncated at two standard deviations (TensorFlow's
  ``truncated_normal_initializer(stddev=3e-2)``), biases start at 0. At input
  ``(28, 28, 1)`` with 10 classes it has 1,336,610 parameters. DeepOBS reshapes to 784
  inputs; here any input shape is flattened.

  Reference: F. Schneider, L. Balles, P. Hennig, "DeepOBS: A Deep Learning Optimizer
  Benchmark Suite", ICLR 2019.

  Attributes:
    num_classes: number of outputs.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    init = nn.initializers.truncated_normal(stddev=3e-2)
    zeros = nn.initializers.zeros
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    for i, width in enumerate((1000, 500, 100)):
      x = nn.relu(nn.Dense(width, kernel_init=init, bias_init=zeros, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, kernel_init=init, bias_init=zeros, name="fc4")(x)
