"""The embedded digits dataset and the batch iterator."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_load_digits

from jaxscope.data import batches, load_digits


def test_digits_split_is_stratified_deterministic_and_complete():
  d = load_digits(test_fraction=0.2, seed=3)
  assert d.train_x.shape[1:] == (8, 8, 1) and d.train_x.dtype == np.float32
  assert len(d.train_x) + len(d.test_x) == 1797
  assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0
  # Every image appears exactly once across the split (compare with sklearn's raw data).
  raw = sk_load_digits()
  both = np.concatenate([d.train_x, d.test_x])[..., 0] * 16.0
  assert sorted(map(bytes, both.astype(np.uint8))) == sorted(
    map(bytes, raw.images.astype(np.uint8))
  )
  counts = np.bincount(d.test_y, minlength=10)
  np.testing.assert_allclose(counts / np.bincount(raw.target), 0.2, atol=0.01)
  d2 = load_digits(test_fraction=0.2, seed=3)
  np.testing.assert_array_equal(d.train_y, d2.train_y)
  with pytest.raises(ValueError, match="test_fraction"):
    load_digits(test_fraction=1.0)


def test_batches_cover_an_epoch():
  x = np.arange(10)[:, None].astype(np.float32)
  y = np.arange(10)
  got = list(batches(x, y, 3, seed=0))
  assert [len(b[1]) for b in got] == [3, 3, 3]
  assert len(set(np.concatenate([b[1] for b in got]))) == 9
  tail = list(batches(x, y, 3, seed=None, drop_last=False))
  assert [b[1].tolist() for b in tail] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
  with pytest.raises(ValueError, match="x has 10"):
    list(batches(x, y[:5], 2))
