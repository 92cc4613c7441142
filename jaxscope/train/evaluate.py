"""The reference loop's evaluation: the analyses' evaluation kernel on the test split."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxscope.analysis.kernel import make_eval_set, make_evaluator

__all__ = ["make_evaluate"]


def make_evaluate(
  model: Any,
  x: np.ndarray,
  y: np.ndarray,
  *,
  task: str = "classification",
  batch_size: int = 500,
) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """Builds ``evaluate(params, model_state) -> {"test/loss", "test/accuracy", ...}``.

  The whole split is evaluated: it is padded to a multiple of ``batch_size``, kept on
  the device, and scanned batch by batch; padded examples carry zero weight, so the
  result is the exact mean over the ``n`` examples,
  ``L = (1/n) Σ_i ℓ(f(x_i), y_i)`` and ``acc = (1/n) Σ_i [argmax f(x_i) = y_i]``
  (``test/accuracy`` for classification only). The model runs in evaluation mode
  (``train=False``: running BatchNorm statistics, no dropout). This is the evaluation
  kernel of the checkpoint analyses (:func:`jaxscope.analysis.kernel.make_evaluator`), so
  a checkpoint's loss here and in ``jaxscope analyze`` is one computation.

  Sequence models (classification with per-token labels ``y [n, T]``) get, besides the
  per-token mean cross-entropy ``L`` (in nats) and the token accuracy,

  * ``test/perplexity = exp(L)``, the perplexity of the test tokens;
  * ``test/bits_per_token = L / ln 2``, the cross-entropy in bits (for a byte- or
    character-level vocabulary such as ``shakespeare``'s, bits per byte / character).

  Both are of the mean over tokens (every example has ``T`` tokens, so the mean over
  examples of per-example means is the mean over all ``n·T`` tokens).
  """
  n = len(x)
  if n == 0:
    raise ValueError("make_evaluate: the evaluation split is empty.")
  if len(y) != n:
    raise ValueError(f"make_evaluate: x has {n} examples but y has {len(y)}.")
  per_token = task == "classification" and np.ndim(y) == 2
  eval_set = make_eval_set(x, y, batch_size=max(1, int(batch_size)))
  kernel = make_evaluator(
    lambda p, s, xb: model.apply({"params": p, **s}, xb, train=False)[0], eval_set, task=task
  )

  @jax.jit
  def evaluate(params: Any, model_state: Any) -> dict[str, jax.Array]:
    loss, accuracy = kernel(params, model_state)
    out = {"test/loss": loss}
    if task == "classification":
      out["test/accuracy"] = accuracy
    if per_token:
      out["test/perplexity"] = jnp.exp(loss)
      out["test/bits_per_token"] = loss / np.float32(math.log(2.0))
    return out

  return evaluate
