"""MNIST-1D, generated offline: 10 classes of length-40 1-D signals (Greydanus, 2020).

Reference: S. Greydanus and D. Kobak, "Scaling down deep learning with MNIST-1D" (ICML 2024;
first released 2020 as "Scaling down deep learning", arXiv:2011.14439), and the authors'
generator in the repository ``greydanus/mnist1d`` (files ``mnist1d/data.py`` for the templates,
the default arguments and ``make_dataset``, and ``mnist1d/transform.py`` for the pipeline;
PyPI package ``mnist1d`` 0.0.2.post1). This module is a vectorised numpy/scipy
re-implementation of that generator. It draws its random numbers from a legacy
``np.random.RandomState(seed)`` in the same order as the reference (per example: padding,
scale, translation, correlated noise, iid noise, shear; then the shuffle of the examples), so
with the default arguments it reproduces the reference ``make_dataset()`` output; the test
suite pins a few values the reference package produced.

Pipeline for one example of class ``c`` (template ``T_c`` of 12 points):

1. ``pad``: append ``p ~ U{36..60}`` zeros to ``T_c + 1e-8``.
2. ``interpolate`` (dilate) to ``template_len + padding[1] = 72`` points.
3. scale by ``1 + scale_coeff * (u - 1/2)``, ``u ~ U[0, 1)``.
4. ``translate``: roll right by ``k ~ U{0..max_translation-1}``.
5. where the signal is exactly zero (the padding), put correlated noise
   ``gaussian_filter(corr_noise_scale * N(0, 1), sigma=2)``.
6. add iid noise ``iid_noise_scale * N(0, 1)``.
7. ``shear``: subtract ``c * linspace(-1/2, 1/2, 72)``, ``c = shear_scale * (u - 1/2)``.
8. ``interpolate`` (subsample) to ``final_seq_length = 40`` points.

The examples are then shuffled, the first ``int(n * train_split)`` form the training set and,
as in the reference, the whole set (train and test together) is standardised with its global
mean and standard deviation (``standardize=False`` skips that step).
"""

from __future__ import annotations

import numpy as np

from jaxscope.data.digits import Dataset

__all__ = [
  "corr_noise",
  "interpolate",
  "load_mnist1d",
  "mnist1d_templates",
  "pad",
  "shear",
  "translate",
]

# The ten hand-drawn 12-point digit templates of the reference (``get_templates``).
_RAW_TEMPLATES = (
  (5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5),
  (5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5),
  (5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5),
  (5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5),
  (5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5),
  (5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5),
  (5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5),
  (5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5),
  (5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5),
  (5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5),
)


def mnist1d_templates() -> tuple[np.ndarray, np.ndarray]:
  """The ten digit templates, normalised as in the reference.

  Each raw template ``d`` becomes ``((d - mean d) / std d - (d_0 - mean d) / std d) / 6``, so
  it starts at 0 and has standard deviation 1/6.

  Returns:
    ``(x, t)``: ``float64 [10, 12]`` templates (row ``c`` is digit ``c``) and their ``float64
    [12]`` coordinates ``linspace(-5, 5, 12) / 6``.
  """
  x = np.asarray(_RAW_TEMPLATES, dtype=np.float64)
  x = x - x.mean(1, keepdims=True)
  x = x / x.std(1, keepdims=True)
  x = x - x[:, :1]
  return x / 6.0, np.linspace(-5, 5, x.shape[1]) / 6.0


def pad(x: np.ndarray, p: int) -> np.ndarray:
  """Appends ``p`` zeros along the last axis: ``[x_0, …, x_{m-1}, 0, …, 0]``."""
  x = np.asarray(x, dtype=np.float64)
  return np.concatenate([x, np.zeros((*x.shape[:-1], int(p)))], axis=-1)


def interpolate(x: np.ndarray, n: int) -> np.ndarray:
  """Linear resampling of the last axis from ``m`` to ``n`` evenly spaced points.

  Sample ``i`` of the output is the piecewise-linear interpolant of ``x`` (placed at
  ``linspace(0, 1, m)``) evaluated at ``i / (n - 1)``. It computes exactly what ``np.interp``
  (and so the reference's ``scipy.interpolate.interp1d(kind="linear")``) computes for one row,
  for every row of ``x`` at once.

  Args:
    x: ``[..., m]`` with ``m >= 2``.
    n: number of output points, ``>= 2``.

  Returns:
    ``float64 [..., n]``.
  """
  x = np.asarray(x, dtype=np.float64)
  m = x.shape[-1]
  if m < 2 or n < 2:
    raise ValueError(f"interpolate: need at least 2 input and 2 output points, got {m} -> {n}.")
  old = np.linspace(0.0, 1.0, m)
  new = np.linspace(0.0, 1.0, n)
  j = np.clip(np.searchsorted(old, new, side="right") - 1, 0, m - 2)
  slope = (x[..., j + 1] - x[..., j]) / (old[j + 1] - old[j])
  out = slope * (new - old[j]) + x[..., j]
  # np.interp returns the data value itself on a grid point (and at the right end).
  on_grid = new == old[j]
  out[..., on_grid] = x[..., j[on_grid]]
  out[..., new == old[-1]] = x[..., -1:]
  return out


def translate(x: np.ndarray, k: int | np.ndarray) -> np.ndarray:
  """Circular shift right along the last axis: ``out[..., i] = x[..., (i - k) mod L]``.

  Args:
    x: ``[..., L]`` signals.
    k: shift, a scalar or one per row of ``x`` (shape ``x.shape[:-1]``), ``0 <= k <= L``.
  """
  x = np.asarray(x)
  length = x.shape[-1]
  k = np.asarray(k)[..., None]
  idx = (np.arange(length) - k) % length
  return np.take_along_axis(x, np.broadcast_to(idx, x.shape), axis=-1)


def corr_noise(noise: np.ndarray, sigma: float = 2.0) -> np.ndarray:
  """Correlated noise: each row of ``noise`` smoothed with a Gaussian of std ``sigma``.

  ``scipy.ndimage.gaussian_filter1d`` along the last axis (reflecting boundaries, kernel
  truncated at 4 sigma), i.e. what the reference's ``gaussian_filter`` does to a 1-D array.
  """
  from scipy.ndimage import gaussian_filter1d

  return gaussian_filter1d(np.asarray(noise, dtype=np.float64), sigma, axis=-1)


def shear(x: np.ndarray, coeff: float | np.ndarray) -> np.ndarray:
  """Subtracts a line through 0: ``x - coeff * linspace(-1/2, 1/2, L)`` (one coeff per row)."""
  x = np.asarray(x, dtype=np.float64)
  return x - np.asarray(coeff, dtype=np.float64)[..., None] * np.linspace(-0.5, 0.5, x.shape[-1])


def load_mnist1d(
  *,
  num_samples: int = 5000,
  train_split: float = 0.8,
  template_len: int = 12,
  padding: tuple[int, int] = (36, 60),
  scale_coeff: float = 0.4,
  max_translation: int = 48,
  corr_noise_scale: float = 0.25,
  iid_noise_scale: float = 2e-2,
  shear_scale: float = 0.75,
  final_seq_length: int = 40,
  shuffle_seq: bool = False,
  standardize: bool = True,
  seed: int = 42,
) -> Dataset:
  """Generates MNIST-1D (the defaults are the benchmark's, 4000 train / 1000 test).

  See the module docstring for the pipeline and the reference. Generation takes well under
  a second for the default 5000 examples.

  Args:
    num_samples: total examples; ``num_samples // 10`` are made per class.
    train_split: share of the (shuffled) examples used for training.
    template_len: template length; the dilated signal has ``template_len + padding[1]``
      points.
    padding: inclusive range ``(low, high)`` of the number of zeros appended.
    scale_coeff: amplitude scale range, ``1 ± scale_coeff / 2``.
    max_translation: shifts are drawn from ``0 … max_translation - 1``.
    corr_noise_scale: std of the white noise before Gaussian smoothing (sigma 2).
    iid_noise_scale: std of the added iid noise.
    shear_scale: shear slope range, ``± shear_scale / 2``.
    final_seq_length: length of the returned signals.
    shuffle_seq: also permute the time axis with one fixed permutation (the reference's
      "shuffled" variant).
    standardize: subtract the global mean and divide by the global std of all examples
      (train and test together, as the reference does).
    seed: seed of the ``np.random.RandomState`` that drives everything (42: the benchmark).

  Returns:
    A :class:`Dataset` with ``float32 [n, final_seq_length, 1]`` signals and ``int32``
    labels 0…9.
  """
  templates, _ = mnist1d_templates()
  num_classes = len(templates)
  per_class = int(num_samples) // num_classes
  low, high = (int(v) for v in padding)
  length = int(template_len) + high
  if per_class < 1:
    raise ValueError(f"load_mnist1d: num_samples must be >= {num_classes}, got {num_samples}.")
  if not 0.0 < train_split < 1.0:
    raise ValueError(f"load_mnist1d: train_split must be in (0, 1), got {train_split}.")
  if not 0 <= low <= high:
    raise ValueError(
      f"load_mnist1d: padding must be (low, high) with 0 <= low <= high, got {padding}."
    )
  if not 1 <= max_translation <= length:
    raise ValueError(
      f"load_mnist1d: max_translation must be in [1, {length}] (the dilated length), "
      f"got {max_translation}."
    )
  if final_seq_length < 2:
    raise ValueError(f"load_mnist1d: final_seq_length must be >= 2, got {final_seq_length}.")

  n = per_class * num_classes
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  rng = np.random.RandomState(seed)
  # Draw in the reference's order, one example after the other (class-major).
  pads = np.empty(n, np.int64)
  scale_u = np.empty(n)
  shifts = np.empty(n, np.int64)
  corr = np.empty((n, length))
  iid = np.empty((n, length))
  shear_u = np.empty(n)
  for i in range(n):
    pads[i] = low + int(rng.rand() * (high - low + 1))
    scale_u[i] = rng.rand()
    shifts[i] = rng.choice(max_translation)
    corr[i] = rng.randn(length)
    iid[i] = rng.randn(length)
    shear_u[i] = rng.rand()

  base = templates[labels] + 1e-8  # the reference's eps keeps the digit itself non-zero
  x = np.empty((n, length))
  for p in np.unique(pads):
    rows = pads == p
    x[rows] = interpolate(pad(base[rows], p), length)
  x *= (1.0 + scale_coeff * (scale_u - 0.5))[:, None]
  x = translate(x, shifts)
  x = np.where(x != 0, x, corr_noise(corr_noise_scale * corr, 2.0))
  x = x + iid_noise_scale * iid
  x = shear(x, shear_scale * (shear_u - 0.5))
  x = interpolate(x, final_seq_length)

  order = rng.permutation(n)
  x, y = x[order], labels[order]
  if shuffle_seq:
    x = x[:, rng.permutation(final_seq_length)]
  if standardize:
    x = (x - x.mean()) / x.std()
  x = x.astype(np.float32)[..., None]
  split = int(n * train_split)
  return Dataset(x[:split], y[:split], x[split:], y[split:], num_classes, "mnist1d")
