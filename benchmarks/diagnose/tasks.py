"""The tasks of the diagnosis benchmark: small real problems that run offline.

Two **calibration** tasks (the rules' thresholds may be tuned on them) and two **held-out**
tasks (they may not; the benchmark reports the difference between the halves):

==========  ===========  ==============  ==============================================
task        half         kind            data
==========  ===========  ==============  ==============================================
digits      calibration  10 classes      scikit-learn's 8×8 digits, 1438 / 359
moons       calibration  2 classes       two interleaved half-moons, noise 0.2, 1600 / 400
mnist1d     held out     10 classes      MNIST-1D (Greydanus 2020), 4000 / 1000
sine        held out     regression      ``y = sin(x)``, ``x`` on ``[-2π, 2π]`` standardised
==========  ===========  ==============  ==============================================

Every task's data is fixed (its own seed); a run's seed only draws the corruption of a
data fault, the initialisation and the batch order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxscope.data import Dataset, load_digits, load_mnist1d, load_sine

__all__ = ["HALVES", "TASKS", "Task", "load_moons", "load_task"]

HALVES = ("calibration", "held_out")


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the benchmark and its healthy standard setting."""

  name: str
  half: str
  """``"calibration"`` or ``"held_out"``."""
  classification: bool
  steps: int
  """Steps of a run in the full grid."""
  lr: float
  """The healthy learning rate (SGD with momentum 0.9, batch 64)."""
  n_train: int
  loss_margin: float
  """Least distance of a faulty run's test loss above the healthy mean (also
  ``n_std`` standard deviations of the healthy pool)."""
  acc_margin: float | None
  """Least distance of a faulty run's test accuracy below the healthy mean (None:
  regression, the loss alone decides)."""
  description: str


TASKS: dict[str, Task] = {
  t.name: t
  for t in (
    Task("digits", "calibration", True, 150, 0.05, 1438, 0.15, 0.03,
         "scikit-learn's 8x8 digits, MLP 64-128-64-10"),
    Task("moons", "calibration", True, 150, 0.05, 1600, 0.1, 0.03,
         "two interleaved moons (noise 0.2), MLP 2-128-64-2"),
    Task("mnist1d", "held_out", True, 300, 0.05, 4000, 0.15, 0.05,
         "MNIST-1D (40-point signals), MLP 40-128-64-10"),
    Task("sine", "held_out", False, 300, 0.05, 4000, 0.05, None,
         "sin(x) on [-2pi, 2pi] (x standardised), MLP 1-128-64-1 (mean squared error)"),
  )
}  # fmt: skip


def load_moons(
  num_train: int = 1600, num_test: int = 400, noise: float = 0.2, seed: int = 0
) -> Dataset:
  """Two interleaved half-moons (scikit-learn's ``make_moons``), inputs standardised.

  Args:
    num_train: training examples.
    num_test: test examples.
    noise: standard deviation of the Gaussian noise added to the points.
    seed: seed of the points (the same seed gives the same data).

  Returns:
    A :class:`~jaxscope.data.Dataset` with ``float32 [n, 2]`` inputs and ``int32`` labels
    0/1 (balanced).
  """
  if num_train < 2 or num_test < 2:
    raise ValueError(f"load_moons: need num_train, num_test >= 2, got {num_train}, {num_test}.")
  from sklearn.datasets import make_moons

  x, y = make_moons(num_train + num_test, noise=noise, random_state=seed)
  x = (x - x[:num_train].mean(0)) / x[:num_train].std(0)
  x, y = x.astype(np.float32), y.astype(np.int32)
  return Dataset(x[:num_train], y[:num_train], x[num_train:], y[num_train:], 2, "moons")


def load_task(name: str) -> Dataset:
  """The clean data of task ``name`` (one of :data:`TASKS`)."""
  if name == "digits":
    return load_digits()
  if name == "moons":
    return load_moons()
  if name == "mnist1d":
    return load_mnist1d()
  if name == "sine":
    ds = load_sine()
    std = float(ds.train_x.std())  # inputs standardised: raw ±2π diverges at lr 0.05
    return ds._replace(train_x=ds.train_x / std, test_x=ds.test_x / std)
  raise ValueError(f"load_task: name must be one of {sorted(TASKS)}, got {name!r}.")
