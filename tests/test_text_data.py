"""The shipped Shakespeare corpus: hash, split, shift, determinism, the registry, and the
loop's perplexity / bits per token against a hand computation."""

from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxscope.data
from jaxscope.data import describe, embedded, load
from jaxscope.data.text import SHAKESPEARE_SHA256, load_shakespeare, read_corpus, windows
from jaxscope.train import make_evaluate

CORPUS = Path(jaxscope.data.__file__).parent / "corpus" / "shakespeare.txt.gz"


@pytest.fixture(scope="module")
def text():
  return gzip.decompress(CORPUS.read_bytes())


def test_corpus_hash_and_content(text):
  assert hashlib.sha256(text).hexdigest() == SHAKESPEARE_SHA256
  assert read_corpus() == text
  assert len(text) == 1_271_825 and max(text) < 128  # ASCII: one byte per character
  assert text.startswith(b"HAMLET, PRINCE OF DENMARK")
  assert b"To be, or not to be" in text and b"Our revels now are ended" in text
  notice = (CORPUS.parent / "NOTICE.md").read_text()
  assert SHAKESPEARE_SHA256 in notice and "public domain" in notice


def test_split_shift_and_no_window_across_the_boundary(text):
  t = 16
  d = load_shakespeare(seq_len=t)
  split = int(0.9 * len(text))
  assert d.num_classes == 256 and d.task == "classification" and d.name == "shakespeare"
  for x, y, start, stop in (
    (d.train_x, d.train_y, 0, split),
    (d.test_x, d.test_y, split, len(text)),
  ):
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape and x.shape[1] == t
    assert len(x) == (stop - start - t - 1) // t + 1
    # Window i is text[start + i·t : … + t] and its targets the same bytes one later.
    i = np.arange(len(x))[:, None] * t + np.arange(t)[None, :] + start
    stream = np.frombuffer(text, np.uint8).astype(np.int32)
    np.testing.assert_array_equal(x, stream[i])
    np.testing.assert_array_equal(y, stream[i + 1])
    assert i[-1, -1] + 1 < stop  # The last target lies inside the split.
  np.testing.assert_array_equal(d.train_y[:, :-1], d.train_x[:, 1:])
  assert bytes(d.train_x[0].astype(np.uint8)) == text[:t]
  assert bytes(d.test_x[0].astype(np.uint8)) == text[split : split + t]


def test_defaults_limits_stride_and_determinism():
  d = load("shakespeare")
  assert d.train_x.shape == (17885, 64) and d.test_x.shape == (1987, 64)
  e = load_shakespeare(num_train=5, num_test=3)
  np.testing.assert_array_equal(e.train_x, d.train_x[:5])
  np.testing.assert_array_equal(e.test_y, d.test_y[:3])
  f = load_shakespeare(seq_len=8, stride=3, num_train=4)
  np.testing.assert_array_equal(f.train_x[1, :5], f.train_x[0, 3:])  # overlapping windows
  g = load("shakespeare", seq_len=8, stride=3, num_train=4)
  for a, b in zip(f, g, strict=True):
    if isinstance(a, np.ndarray):
      np.testing.assert_array_equal(a, b)
  assert embedded("shakespeare") and "x [n, 64]" in describe("shakespeare")


def test_windows_and_errors():
  x, y = windows(np.arange(10), 4, 2)
  np.testing.assert_array_equal(x, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]])
  np.testing.assert_array_equal(y, x + 1)
  assert windows(np.arange(4), 4, 1)[0].shape == (0, 4)
  for kw in ({"seq_len": 0}, {"num_train": 0}, {"stride": -1}, {"seq_len": True}):
    with pytest.raises(ValueError, match="positive integer"):
      load_shakespeare(**kw)
  with pytest.raises(ValueError, match="no window"):
    load_shakespeare(seq_len=200_000)
  with pytest.raises(TypeError, match="seq_len"):
    load("shakespeare", seq_length=8)


class _Table:
  """A bigram model: the logits of token t are row x_t of a table ``[256, 256]``."""

  def apply(self, variables, x, train=False):
    return variables["params"]["w"][x], {}


def test_perplexity_and_bits_against_hand_computation():
  d = load_shakespeare(seq_len=8, num_test=10)
  evaluate = make_evaluate(_Table(), d.test_x, d.test_y, batch_size=4)
  # A uniform model: loss ln 256, perplexity 256, 8 bits per byte, exactly.
  out = evaluate({"w": jnp.zeros((256, 256))}, {})
  np.testing.assert_allclose(float(out["test/loss"]), math.log(256), rtol=1e-6)
  np.testing.assert_allclose(float(out["test/perplexity"]), 256.0, rtol=1e-5)
  np.testing.assert_allclose(float(out["test/bits_per_token"]), 8.0, rtol=1e-6)
  # A random table against float64 numpy: the per-token mean cross-entropy.
  w = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
  out = evaluate({"w": jnp.asarray(w)}, {})
  logits = w.astype(np.float64)[d.test_x]
  lse = np.log(np.exp(logits).sum(-1))
  ce = (lse - np.take_along_axis(logits, d.test_y[..., None], -1)[..., 0]).mean()
  np.testing.assert_allclose(float(out["test/loss"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(out["test/perplexity"]), math.exp(ce), rtol=1e-5)
  np.testing.assert_allclose(float(out["test/bits_per_token"]), ce / math.log(2), rtol=1e-5)
  # Labels without a token axis (and regression targets [n, 1]) get no perplexity.
  flat = make_evaluate(_Table(), d.test_x[:, 0], d.test_y[:, 0])({"w": jnp.asarray(w)}, {})
  assert set(flat) == {"test/loss", "test/accuracy"}
  reg = make_evaluate(
    _Table(), d.test_x[:, :1], d.test_y[:, :1].astype(np.float32), task="regression"
  )
  assert set(reg({"w": jnp.zeros(256)}, {})) == {"test/loss"}
