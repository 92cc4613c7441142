"""A 1-D regression toy problem: ``y = sin(x)`` for ``x`` uniform on ``[-2π, 2π]``.

This is the sine-fitting task used to study dynamic network capacity (a network grows while
its error plateaus): small, smooth, and with a known optimum, so capacity and optimiser
effects are easy to see.
"""

from __future__ import annotations

import numpy as np

from jaxscope.data.digits import Dataset

__all__ = ["load_sine"]


def load_sine(
  num_train: int = 4000,
  num_test: int = 1000,
  *,
  noise_std: float = 0.0,
  low: float = -2.0 * np.pi,
  high: float = 2.0 * np.pi,
  seed: int = 0,
) -> Dataset:
  """Samples ``x ~ U[low, high)`` and targets ``y = sin(x) + noise_std * ε``, ``ε ~ N(0, 1)``.

  Noise (if any) is added to the training targets only; the test targets are exactly
  ``sin(x)``, so the test error measures how well the function itself was learned.

  Args:
    num_train: training examples (default 4000).
    num_test: test examples (default 1000).
    noise_std: standard deviation of the Gaussian noise on the training targets.
    low: lower end of the input interval (default ``-2π``).
    high: upper end of the input interval (default ``2π``).
    seed: seed of ``np.random.default_rng``; the same seed gives the same data.

  Returns:
    A regression :class:`Dataset`: ``float32 [n, 1]`` inputs and ``float32 [n, 1]`` targets,
    ``num_classes == 1``, ``task == "regression"``.
  """
  if num_train < 1 or num_test < 1:
    raise ValueError(f"load_sine: need num_train, num_test >= 1, got {num_train}, {num_test}.")
  if not low < high:
    raise ValueError(f"load_sine: need low < high, got [{low}, {high}].")
  if noise_std < 0:
    raise ValueError(f"load_sine: noise_std must be >= 0, got {noise_std}.")
  rng = np.random.default_rng(seed)
  x = rng.uniform(low, high, size=(num_train + num_test, 1)).astype(np.float32)
  y = np.sin(x)
  train_x, test_x = x[:num_train], x[num_train:]
  train_y, test_y = y[:num_train], y[num_train:]
  if noise_std > 0:
    noise = rng.normal(0.0, noise_std, size=train_y.shape)
    train_y = (train_y + noise).astype(np.float32)
  return Dataset(train_x, train_y, test_x, test_y, 1, "sine", "regression")
