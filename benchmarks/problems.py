"""Benchmark problems: DeepOBS-style Flax Linen models on fixed random data.

Each problem is a model, one fixed random batch (inputs and integer labels drawn from a
fixed seed) and the model's initial parameters; the loss is the mean softmax
cross-entropy. Only shapes and FLOPs matter for timing, so no data set is downloaded.

* ``mnist_mlp``: DeepOBS's MNIST MLP, 784-1000-500-100-10 with ReLU, batch 128.
* ``cifar10_3c3d``: DeepOBS's CIFAR-10 3c3d (three conv + max-pool blocks, then dense
  512-256-10), batch 128 of 32×32×3 images.
* ``fmnist_2c2d``: DeepOBS's Fashion-MNIST 2c2d (two conv + max-pool blocks, dense 1024,
  10 outputs; 3.27 M parameters), batch 128 of 28×28×1 images.

The initializers follow DeepOBS (truncated normal σ = 0.03 for the MLP, Glorot normal for
3c3d, zero biases); 3c3d's L2 weight decay is left out (the benchmark measures the
cost of introspection, not the regulariser).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["PROBLEMS", "Problem", "cifar10_3c3d", "fmnist_2c2d", "get", "mnist_mlp"]

BATCH = 128
NUM_CLASSES = 10


class Problem(NamedTuple):
  """A model with its initial parameters and one fixed batch."""

  name: str
  model: nn.Module
  params: Any
  """The initial ``params`` collection of ``model``."""
  x: jax.Array
  y: jax.Array
  """Integer labels in ``[0, NUM_CLASSES)``."""
  default_reps: int
  """Timed repetitions when the command line does not say."""

  def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the model on ``(x, y)``."""
    logits = self.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class MnistMLP(nn.Module):
  """DeepOBS ``mnist_mlp``: dense 1000-500-100 with ReLU, then 10 logits."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.truncated_normal(3e-2)
    for width in (1000, 500, 100):
      x = nn.relu(nn.Dense(width, kernel_init=init)(x))
    return nn.Dense(NUM_CLASSES, kernel_init=init)(x)


class Cifar3c3d(nn.Module):
  """DeepOBS ``cifar10_3c3d``: three conv/ReLU/max-pool blocks, dense 512-256-10."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.glorot_normal()
    for features, size, padding in ((64, 5, "VALID"), (96, 3, "VALID"), (128, 3, "SAME")):
      x = nn.Conv(features, (size, size), padding=padding, kernel_init=init)(x)
      x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    for width in (512, 256):
      x = nn.relu(nn.Dense(width, kernel_init=init)(x))
    return nn.Dense(NUM_CLASSES, kernel_init=init)(x)


def _make(
  name: str, model: nn.Module, input_shape: tuple[int, ...], default_reps: int, seed: int
) -> Problem:
  k_init, k_x, k_y = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k_x, (BATCH, *input_shape), jnp.float32)
  y = jax.random.randint(k_y, (BATCH,), 0, NUM_CLASSES, jnp.int32)
  params = model.init(k_init, x)["params"]
  return Problem(name, model, params, x, y, default_reps)


def mnist_mlp(seed: int = 0) -> Problem:
  """DeepOBS MNIST MLP on a random batch ``[128, 784]``."""
  return _make("mnist_mlp", MnistMLP(), (784,), default_reps=30, seed=seed)


def cifar10_3c3d(seed: int = 0) -> Problem:
  """DeepOBS CIFAR-10 3c3d on a random batch ``[128, 32, 32, 3]``."""
  return _make("cifar10_3c3d", Cifar3c3d(), (32, 32, 3), default_reps=10, seed=seed)


def fmnist_2c2d(seed: int = 0) -> Problem:
  """DeepOBS Fashion-MNIST 2c2d (the zoo's ``TwoC2D``) on a random batch ``[128, 28, 28, 1]``."""
  from jaxscope.models.conv import TwoC2D

  return _make("fmnist_2c2d", TwoC2D(num_classes=NUM_CLASSES), (28, 28, 1), 10, seed)


PROBLEMS: dict[str, Callable[..., Problem]] = {
  "mnist_mlp": mnist_mlp,
  "cifar10_3c3d": cifar10_3c3d,
  "fmnist_2c2d": fmnist_2c2d,
}


def get(name: str, seed: int = 0) -> Problem:
  """Builds the problem ``name`` (a key of :data:`PROBLEMS`)."""
  try:
    factory = PROBLEMS[name]
  except KeyError:
    raise KeyError(f"unknown problem {name!r}; problems: {', '.join(PROBLEMS)}.") from None
  return factory(seed)
