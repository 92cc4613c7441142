"""The reference loop's evaluation: the analyses' evaluation kernel on the test split."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxscope.analysis.kernel import EvalSet, make_eval_set, make_evaluator
from jaxscope.run.config import batch_split
from jaxscope.run.mesh import batch_sharding, put_global, replicated

__all__ = ["make_evaluate"]


def _values(loss: jax.Array, accuracy: jax.Array, task: str, per_token: bool) -> dict[str, Any]:
  """The recorded evaluation values of a mean loss and accuracy (see :func:`make_evaluate`)."""
  out = {"test/loss": loss}
  if task == "classification":
    out["test/accuracy"] = accuracy
  if per_token:
    out["test/perplexity"] = jnp.exp(loss)
    out["test/bits_per_token"] = loss / np.float32(math.log(2.0))
  return out


def make_evaluate(
  model: Any,
  x: np.ndarray,
  y: np.ndarray,
  *,
  task: str = "classification",
  batch_size: int = 500,
  mesh: Mesh | None = None,
  shardings: tuple[Any, Any] | None = None,
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

  Both are of the mean over counted tokens (:func:`jaxscope.analysis.kernel.token_sums`).

  On a device ``mesh`` (:func:`jaxscope.run.mesh.make_mesh`) each evaluation batch is split
  over its ``data`` and ``fsdp`` axes (:func:`jaxscope.run.mesh.batch_sharding`; each
  process places only its devices' shards), the batch is ``min(batch_size, n)`` rounded
  down to a multiple of that split, and the values come back replicated; the parameters
  stay in their layout: ``shardings``, the shardings of ``params`` and ``model_state``
  (e.g. the train state's), or by default the arguments' own. The values are the same
  exact means.

  Raises:
    ValueError: an empty split, ``x`` and ``y`` of different lengths, ``shardings``
      without a ``mesh``, or fewer examples than the mesh splits a batch into.
  """
  n = len(x)
  if n == 0:
    raise ValueError("make_evaluate: the evaluation split is empty.")
  if len(y) != n:
    raise ValueError(f"make_evaluate: x has {n} examples but y has {len(y)}.")
  per_token = task == "classification" and np.ndim(y) == 2
  layout: dict[str, Any] = {}
  if mesh is None:
    if shardings is not None:
      raise ValueError("make_evaluate: shardings needs the mesh they are on (mesh=).")
    es = make_eval_set(x, y, batch_size=max(1, int(batch_size)))
    data = (es.x, es.y, es.mask)
  else:
    parts = batch_split(dict(mesh.shape))
    if n < parts:
      raise ValueError(
        f"train: the evaluation split has {n} examples, fewer than the {parts} parts the "
        "mesh splits a batch into."
      )
    size = max(parts, min(int(batch_size), n) // parts * parts)
    es = make_eval_set(x, y, batch_size=size)
    split = batch_sharding(mesh, batch_axis=1)
    data = tuple(put_global(np.asarray(a), split) for a in (es.x, es.y, es.mask))
    layout["out_shardings"] = replicated(mesh)
    if shardings is not None:
      layout["in_shardings"] = (*shardings, split, split, split)
  count, digest = es.n, es.digest
  del es  # On a mesh, its copy on the default device is no longer needed.

  def apply_fn(p: Any, s: Any, xb: jax.Array) -> jax.Array:
    return model.apply({"params": p, **s}, xb, train=False)[0]

  def run(params: Any, model_state: Any, xs: Any, ys: Any, mask: Any) -> dict[str, jax.Array]:
    kernel = make_evaluator(apply_fn, EvalSet(xs, ys, mask, count, digest), task=task)
    return _values(*kernel(params, model_state), task, per_token)

  compiled = jax.jit(run, **layout)
  return lambda params, model_state: compiled(params, model_state, *data)
