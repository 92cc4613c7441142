"""Per-token (sequence) labels in the evaluation kernel: ``y [N, T]``, ``logits [N, T, V]``.

The loss of a sequence model is the mean over its tokens; before, labels with a token axis
broadcast against the ``[B]`` padding mask, which raised, or, when the batch size equalled
``T``, gave a loss ``T`` times too large.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope.analysis import make_eval_set, model_path
from jaxscope.analysis.kernel import make_evaluator, per_example_losses
from jaxscope.train import make_evaluate

T, V, D = 6, 5, 3


def _apply(p, s, x):  # x [B, T, D] -> logits [B, T, V]
  return x @ p["w"]


def _reference(x, y, w):
  """Per-token mean cross-entropy and token accuracy in float64 numpy."""
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  ce = lse - np.take_along_axis(logits, y[..., None], -1)[..., 0]
  return ce.mean(), (logits.argmax(-1) == y).mean()


def _data(n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, T, D)).astype(np.float32)
  y = rng.integers(0, V, size=(n, T)).astype(np.int32)
  w = rng.normal(size=(D, V)).astype(np.float32)
  return x, y, w


@pytest.mark.parametrize(("n", "batch"), [(6, 6), (10, 6), (7, 3), (4, 500)])
def test_per_token_labels_give_the_per_token_mean(n, batch):
  # (6, 6) and (10, 6): the batch size equals T, where the loss was T times too large.
  x, y, w = _data(n)
  want_loss, want_acc = _reference(x, y, w)
  es = make_eval_set(x, y, batch_size=batch)
  loss, acc = make_evaluator(_apply, es)({"w": jnp.asarray(w)}, {})
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(acc), want_acc, rtol=1e-6)
  path = model_path(_apply, es, {"w": jnp.asarray(w)}, {"w": jnp.asarray(2 * w)}, alphas=[0.0, 1.0])
  np.testing.assert_allclose(path.loss, [want_loss, _reference(x, y, 2 * w)[0]], rtol=1e-5)
  np.testing.assert_allclose(path.accuracy[0], want_acc, rtol=1e-6)


def test_the_loops_evaluation_takes_per_token_labels():
  x, y, w = _data(9, seed=1)

  class _Model:
    def apply(self, variables, xb, train=False):
      return _apply(variables["params"], {}, xb), {}

  out = make_evaluate(_Model(), x, y, batch_size=T)({"w": jnp.asarray(w)}, {})
  want_loss, want_acc = _reference(x, y, w)
  np.testing.assert_allclose(float(out["test/loss"]), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(out["test/accuracy"]), want_acc, rtol=1e-6)


def test_per_example_losses_shapes():
  x, y, w = _data(4, seed=2)
  logits = jnp.asarray(x @ w)
  per = per_example_losses("classification", logits, jnp.asarray(y))
  assert per.shape == (4,)
  ce = np.asarray(per_example_losses("classification", logits.reshape(-1, V), y.reshape(-1)))
  np.testing.assert_allclose(per, ce.reshape(4, T).mean(1), rtol=1e-6)
  # Regression: the mean over every output entry of the example, whatever the rank.
  out, tgt = jnp.asarray(x), jnp.zeros_like(jnp.asarray(x))
  reg = per_example_losses("regression", out, tgt)
  np.testing.assert_allclose(reg, (np.asarray(x, np.float64) ** 2).mean((1, 2)), rtol=1e-5)
  assert per_example_losses("regression", jnp.ones(3), jnp.zeros(3)).shape == (3,)


def test_ignored_tokens_are_left_out():
  """Labels below 0 (padding of shorter sequences) count neither in loss nor in accuracy;
  evaluations are the mean over the counted tokens."""
  x, y, w = _data(7, seed=3)
  y = y.copy()
  y[0, 3:] = -100  # a short sequence
  y[4, :] = -1  # an example without a counted token
  valid = y >= 0
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  yc = np.where(valid, y, 0)
  ce = lse - np.take_along_axis(logits, yc[..., None], -1)[..., 0]
  want_loss = ce[valid].mean()
  want_acc = (logits.argmax(-1) == y)[valid].mean()
  for batch in (3, 500):
    es = make_eval_set(x, y, batch_size=batch)
    loss, acc = make_evaluator(_apply, es)({"w": jnp.asarray(w)}, {})
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(acc), want_acc, rtol=1e-6)
  per = per_example_losses("classification", jnp.asarray(logits, jnp.float32), jnp.asarray(y))
  np.testing.assert_allclose(per[0], ce[0, :3].mean(), rtol=1e-5)
  assert float(per[4]) == 0.0
