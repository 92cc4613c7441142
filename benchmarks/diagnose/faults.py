"""The injected faults of the diagnosis benchmark: a dataset loader and a model factory.

Both are named ``module:attribute`` in a :class:`jaxscope.run.TrainConfig`
(``dataset="benchmarks.diagnose.faults:load_faulty"``,
``model="benchmarks.diagnose.faults:faulty_mlp"``), so every run goes through
:func:`jaxscope.train.train` unchanged and records what a normal run records.

Data faults (``data_args``, on a task of :mod:`benchmarks.diagnose.tasks`):
``nan_fraction`` (that fraction of the training examples get one NaN input entry),
``label_noise`` (that fraction of the training labels drawn at random), ``label_shift``
(that fraction of the training labels moved to the next class, ``(y + 1) mod K``: a
systematic labelling error), ``minority_keep`` (the upper half of the classes keeps only
that fraction of its training examples), ``input_scale`` (train and test inputs
multiplied, e.g. 255: raw pixels). The test split is never corrupted except by
``input_scale`` (the same preprocessing at test time).

Data remedies (``data_args``, applied after the faults, as a fixed pipeline would):
``standardize`` (inputs minus the training mean, over the training std, test alike),
``drop_nonfinite`` (training examples with a NaN/Inf entry removed), ``rebalance``
(every class over-sampled to the largest class's count).

Model faults (``model_args``): ``kernel_scale`` (every kernel's init standard deviation
multiplied), ``hidden_bias`` (the hidden biases' initial value; negative: dead ReLUs),
``frozen`` (the first ``frozen`` hidden layers get no gradient: their learning rate is in
effect 0), ``output`` (``"softmax"``: the model returns probabilities and the loss applies
its log-softmax to them a second time; ``"sigmoid"``: per-class probabilities of a
binary-cross-entropy model fed to the softmax loss), ``activation`` (``"tanh"``,
``"sigmoid"``), ``hidden_sizes`` (a deep stack without normalisation), ``dropout`` (the
rate after each hidden activation in training). Model remedy: ``init_mode="scaled"`` (He
variance ``2 / fan_in`` for ReLU, Glorot ``2 / (fan_in + fan_out)`` for tanh/sigmoid,
times ``kernel_scale²``) instead of the default LeCun ``1 / fan_in``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.diagnose.tasks import load_task
from jaxscope.data import Dataset

__all__ = ["FaultyMLP", "corrupt", "faulty_mlp", "load_faulty"]

_ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid}
_OUTPUTS = ("logits", "softmax", "sigmoid")


def load_faulty(
  task: str = "digits",
  seed: int = 0,
  nan_fraction: float = 0.0,
  label_noise: float = 0.0,
  label_shift: float = 0.0,
  minority_keep: float = 1.0,
  input_scale: float = 1.0,
  standardize: bool = False,
  drop_nonfinite: bool = False,
  rebalance: bool = False,
) -> Dataset:
  """The data of ``task`` with the data faults, then the data remedies, applied.

  Args:
    task: a task of :data:`benchmarks.diagnose.tasks.TASKS`.
    seed: seed of the corruption (which examples, which labels) and of the over-sampling.
    nan_fraction, label_noise, label_shift, minority_keep, input_scale: the faults (module
      docstring); the label faults need a classification task.
    standardize, drop_nonfinite, rebalance: the remedies (module docstring).

  Returns:
    The :class:`~jaxscope.data.Dataset` (its name ``faulty_<task>``).
  """
  return corrupt(
    load_task(task), seed, nan_fraction=nan_fraction, label_noise=label_noise,
    label_shift=label_shift, minority_keep=minority_keep, input_scale=input_scale,
    standardize=standardize, drop_nonfinite=drop_nonfinite, rebalance=rebalance,
  )  # fmt: skip


def corrupt(
  ds: Dataset,
  seed: int = 0,
  *,
  nan_fraction: float = 0.0,
  label_noise: float = 0.0,
  label_shift: float = 0.0,
  minority_keep: float = 1.0,
  input_scale: float = 1.0,
  standardize: bool = False,
  drop_nonfinite: bool = False,
  rebalance: bool = False,
) -> Dataset:
  """:func:`load_faulty` on a given dataset ``ds`` (same arguments)."""
  classes = ds.task != "regression"
  if not classes and (label_noise or label_shift or minority_keep < 1.0 or rebalance):
    raise ValueError(
      f"corrupt: {ds.name} is a regression set; label_noise, label_shift, minority_keep "
      "and rebalance need class labels."
    )
  for name, v in (("nan_fraction", nan_fraction), ("label_noise", label_noise),
                  ("label_shift", label_shift)):  # fmt: skip
    if not 0.0 <= v <= 1.0:
      raise ValueError(f"corrupt: {name} must be in [0, 1], got {v}.")
  if not 0.0 < minority_keep <= 1.0:
    raise ValueError(f"corrupt: minority_keep must be in (0, 1], got {minority_keep}.")
  rng = np.random.default_rng([20260021, int(seed)])
  tx, ty, test_x = ds.train_x.copy(), ds.train_y.copy(), ds.test_x.copy()
  k = ds.num_classes
  if minority_keep < 1.0:
    keep = np.ones(len(ty), bool)
    for c in range(k - k // 2, k):  # the upper half: 5-9 of ten classes, 1 of two
      idx = np.flatnonzero(ty == c)
      n = max(1, round(minority_keep * len(idx)))
      keep[rng.permutation(idx)[n:]] = False
    tx, ty = tx[keep], ty[keep]
  if label_noise > 0:
    flip = rng.random(len(ty)) < label_noise
    ty[flip] = rng.integers(0, k, int(flip.sum()))
  if label_shift > 0:
    shift = rng.random(len(ty)) < label_shift
    ty[shift] = (ty[shift] + 1) % k
  if nan_fraction > 0:
    n = max(1, round(nan_fraction * len(ty)))
    rows = rng.choice(len(ty), n, replace=False)
    flat = tx.reshape(len(ty), -1)
    flat[rows, rng.integers(0, flat.shape[1], n)] = np.nan
    tx = flat.reshape(tx.shape)
  if input_scale != 1.0:
    tx, test_x = tx * np.float32(input_scale), test_x * np.float32(input_scale)
  # The remedies, after the faults.
  if drop_nonfinite:
    good = np.isfinite(tx.reshape(len(tx), -1)).all(1)
    tx, ty = tx[good], ty[good]
  if standardize:
    mean, std = np.nanmean(tx), np.nanstd(tx)
    tx, test_x = (tx - mean) / max(std, 1e-12), (test_x - mean) / max(std, 1e-12)
  if rebalance:
    counts = np.bincount(ty, minlength=k)
    idx = [np.flatnonzero(ty == c) for c in range(k) if counts[c]]
    top = counts.max()
    over = np.concatenate([np.concatenate([i, rng.choice(i, top - len(i))]) for i in idx])
    over = rng.permutation(over)
    tx, ty = tx[over], ty[over]
  return Dataset(
    tx.astype(np.float32), ty.astype(ty.dtype), test_x.astype(np.float32), ds.test_y, k,
    f"faulty_{ds.name}", ds.task,
  )  # fmt: skip


class FaultyMLP(nn.Module):
  """The zoo's MLP (flatten → [Dense → activation → dropout]* → Dense; layers ``fc1 …``,
  ``out``) with the model faults and the remedy of the module docstring. With the defaults
  it is :class:`jaxscope.models.MLP` (LeCun-normal kernels, zero biases, ReLU)."""

  hidden_sizes: Sequence[int] = (128, 64)
  num_outputs: int = 10
  kernel_scale: float = 1.0
  hidden_bias: float = 0.0
  frozen: int = 0
  output: str = "logits"
  activation: str = "relu"
  dropout: float = 0.0
  init_mode: str = "lecun"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"FaultyMLP: activation must be one of {sorted(_ACTIVATIONS)}, got "
                       f"{self.activation!r}.")  # fmt: skip
    if self.output not in _OUTPUTS:
      raise ValueError(f"FaultyMLP: output must be one of {_OUTPUTS}, got {self.output!r}.")
    if self.init_mode not in ("lecun", "scaled"):
      raise ValueError(f"FaultyMLP: init_mode must be 'lecun' or 'scaled', got {self.init_mode!r}.")
    act = _ACTIVATIONS[self.activation]
    var = self.kernel_scale**2
    if self.init_mode == "scaled":  # He for ReLU, Glorot for the saturating activations
      kinit = nn.initializers.variance_scaling(
        2 * var if self.activation == "relu" else var,
        "fan_in" if self.activation == "relu" else "fan_avg",
        "truncated_normal",
      )
    else:
      kinit = nn.initializers.variance_scaling(var, "fan_in", "truncated_normal")
    binit = nn.initializers.constant(self.hidden_bias)
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.Dense(width, kernel_init=kinit, bias_init=binit, name=f"fc{i + 1}")(x)
      if i < self.frozen:
        x = jax.lax.stop_gradient(x)  # no gradient reaches this layer or those before it
      x = act(x)
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_outputs, kernel_init=kinit, name="out")(x)
    if self.output == "softmax":
      return nn.softmax(x)
    return nn.sigmoid(x) if self.output == "sigmoid" else x


def faulty_mlp(input_shape: Sequence[int], num_classes: int, **kwargs: object) -> FaultyMLP:
  """The model factory (``factory(input_shape, num_classes, **model_args)``)."""
  del input_shape
  if "hidden_sizes" in kwargs:
    kwargs["hidden_sizes"] = tuple(int(w) for w in kwargs["hidden_sizes"])  # type: ignore[union-attr]
  return FaultyMLP(num_outputs=int(num_classes), **kwargs)  # type: ignore[arg-type]
