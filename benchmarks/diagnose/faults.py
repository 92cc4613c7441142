"""The injected faults of the diagnosis benchmark: a dataset loader and a model factory.

Both are named ``module:attribute`` in a :class:`jaxscope.run.TrainConfig`
(``dataset="benchmarks.diagnose.faults:load_faulty_digits"``,
``model="benchmarks.diagnose.faults:faulty_mlp"``), so every run goes through
:func:`jaxscope.train.train` unchanged and records what a normal run records.

Data faults (``data_args``): ``nan_fraction`` (that fraction of the training examples get
one NaN pixel), ``label_noise`` (that fraction of the training labels drawn at random),
``minority_keep`` (classes 5–9 keep only that fraction of their training examples),
``input_scale`` (train and test inputs multiplied, e.g. 255: raw pixels). The test split
is never corrupted except by ``input_scale`` (the same preprocessing at test time).

Model faults (``model_args``): ``kernel_scale`` (every kernel's LeCun-normal init
multiplied), ``hidden_bias`` (the hidden biases' initial value; negative: dead ReLUs),
``frozen`` (the first ``frozen`` hidden layers get no gradient: their learning rate is in
effect 0), ``softmax_output`` (the model returns probabilities, and the loss applies its
log-softmax to them a second time).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxscope.data import Dataset, load_digits

__all__ = ["FaultyMLP", "faulty_mlp", "load_faulty_digits"]

_MINORITY = (5, 6, 7, 8, 9)


def load_faulty_digits(
  seed: int = 0,
  nan_fraction: float = 0.0,
  label_noise: float = 0.0,
  minority_keep: float = 1.0,
  input_scale: float = 1.0,
) -> Dataset:
  """The embedded digits (1438 train / 359 test) with the data faults applied.

  Args:
    seed: seed of the corruption (which examples, which labels).
    nan_fraction: fraction of the training examples with one NaN pixel (at least one
      example when positive).
    label_noise: fraction of the training labels replaced by uniformly drawn classes.
    minority_keep: fraction of the training examples of classes 5–9 that is kept.
    input_scale: factor of the train and test inputs (255: raw 0–255 pixels).

  Returns:
    The :class:`~jaxscope.data.Dataset`.
  """
  ds = load_digits()
  rng = np.random.default_rng([20260021, int(seed)])
  tx, ty = ds.train_x.copy(), ds.train_y.copy()
  if minority_keep < 1.0:
    keep = np.ones(len(ty), bool)
    for c in _MINORITY:
      idx = np.flatnonzero(ty == c)
      n = max(1, round(minority_keep * len(idx)))
      keep[rng.permutation(idx)[n:]] = False
    tx, ty = tx[keep], ty[keep]
  if label_noise > 0:
    flip = rng.random(len(ty)) < label_noise
    ty[flip] = rng.integers(0, ds.num_classes, int(flip.sum()))
  if nan_fraction > 0:
    n = max(1, round(nan_fraction * len(ty)))
    rows = rng.choice(len(ty), n, replace=False)
    flat = tx.reshape(len(ty), -1)
    flat[rows, rng.integers(0, flat.shape[1], n)] = np.nan
    tx = flat.reshape(tx.shape)
  test_x = ds.test_x
  if input_scale != 1.0:
    tx, test_x = tx * np.float32(input_scale), test_x * np.float32(input_scale)
  return Dataset(
    tx.astype(np.float32), ty.astype(np.int32), test_x.astype(np.float32), ds.test_y,
    ds.num_classes, "faulty_digits",
  )  # fmt: skip


class FaultyMLP(nn.Module):
  """The zoo's MLP (flatten → [Dense → ReLU]* → Dense; layers ``fc1 …``, ``out``) with the
  model faults of the module docstring."""

  hidden_sizes: Sequence[int] = (128, 64)
  num_outputs: int = 10
  kernel_scale: float = 1.0
  hidden_bias: float = 0.0
  frozen: int = 0
  softmax_output: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    kinit = nn.initializers.variance_scaling(self.kernel_scale**2, "fan_in", "truncated_normal")
    binit = nn.initializers.constant(self.hidden_bias)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.Dense(width, kernel_init=kinit, bias_init=binit, name=f"fc{i + 1}")(x)
      if i < self.frozen:
        x = jax.lax.stop_gradient(x)  # no gradient reaches this layer or those before it
      x = nn.relu(x)
    x = nn.Dense(self.num_outputs, kernel_init=kinit, name="out")(x)
    return nn.softmax(x) if self.softmax_output else x


def faulty_mlp(input_shape: Sequence[int], num_classes: int, **kwargs: object) -> FaultyMLP:
  """The model factory (``factory(input_shape, num_classes, **model_args)``)."""
  del input_shape
  return FaultyMLP(num_outputs=int(num_classes), **kwargs)  # type: ignore[arg-type]
