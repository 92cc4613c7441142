"""The one compiled evaluation kernel every checkpoint analysis runs on.

A *point* in parameter space is a coefficient array over a small *basis* of parameter
trees ``B_0 … B_{r−1}`` (checkpoints, or a centre and directions). Leaves are split into
``G`` *groups* (one per layer, or one for the whole model), and the coefficients may differ
per group:

    θ(c)_leaf = Σ_j c[j, g(leaf)] · B_j,leaf          c ∈ R^{r × G}

which covers, with one kernel:

* model-level paths: ``G = 1``; the linear path ``θ(α) = (1−α)θ_a + αθ_b`` is
  ``c = [1−α, α]``, the quadratic (Lagrange) path through three checkpoints has the three
  Lagrange weights as ``c``; a 2-D landscape ``θ* + aδ + bη`` is ``c = [1, a, b]``;
* layer-level paths and re-initialisation: ``G`` = number of layers + 1; only the moving
  layer's group gets the path weights, all others ``[0, …, 0, 1]`` (the final model);
* checkpoint × layer heat-maps (Zhang et al.'s re-initialisation to step τ): the basis is
  the checkpoints, and the group of layer ℓ gets the one-hot of τ.

Every point of a chunk is evaluated at once (``vmap``) over a fixed evaluation set kept on
the device, padded to whole batches with a validity mask and scanned batch by batch, so the
loss is the exact mean ``L = (1/n) Σ_i ℓ(f(x_i; θ), y_i)`` over the ``n`` examples and the
accuracy the exact fraction. The coefficients enter as arrays, so one analysis compiles once
(plus once for a smaller last chunk, which is padded instead). Chunk sizes come from a
memory budget (:func:`chunk_size`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxscope import tree as jtree

__all__ = [
  "IGNORE_BELOW",
  "ApplyFn",
  "EvalSet",
  "PointEvaluator",
  "chunk_size",
  "make_batch_evaluator",
  "make_eval_set",
  "make_evaluator",
  "make_point_evaluator",
  "per_example_losses",
  "recompute_statistics",
]

#: ``apply_fn(params, model_state, x) -> outputs`` in evaluation mode.
ApplyFn = Callable[[Any, Any, jax.Array], jax.Array]


class EvalSet(NamedTuple):
  """A fixed evaluation set on the device, padded into whole batches."""

  x: jax.Array
  """``[batches, batch_size, ...]`` inputs."""
  y: jax.Array
  """``[batches, batch_size, ...]`` targets (integer labels for classification)."""
  mask: jax.Array
  """``[batches, batch_size]`` 1 for real examples, 0 for padding."""
  n: int
  """Number of real examples."""
  digest: str
  """SHA-256 (first 16 hex digits) of the examples and labels, to identify the set."""


def make_eval_set(x: Any, y: Any, *, batch_size: int = 500) -> EvalSet:
  """Pads ``(x, y)`` to whole batches, puts them on the device and hashes them.

  Raises:
    ValueError: empty set, ``x`` and ``y`` of different lengths, or a bad batch size.
  """
  x, y = np.asarray(x), np.asarray(y)
  n = len(x)
  if n == 0:
    raise ValueError("make_eval_set: the evaluation set is empty.")
  if len(y) != n:
    raise ValueError(f"make_eval_set: x has {n} examples but y has {len(y)}.")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"make_eval_set: batch_size must be a positive int, got {batch_size!r}.")
  bs = min(batch_size, n)
  nb = -(-n // bs)
  pad = nb * bs - n
  digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes())
  xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(nb, bs, *x.shape[1:])
  ys = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)]).reshape(nb, bs, *y.shape[1:])
  mask = (np.arange(nb * bs) < n).astype(np.float32).reshape(nb, bs)
  return EvalSet(
    jax.device_put(xs), jax.device_put(ys), jax.device_put(mask), n, digest.hexdigest()[:16]
  )


#: Integer labels below 0 are ignored tokens (padding of sequences of unequal length), as
#: PyTorch's ``ignore_index=-100``: they count neither in the loss nor in the accuracy.
IGNORE_BELOW = 0


def _example_mean(x: jax.Array) -> jax.Array:
  """The mean over every axis but the first (per-token values → per-example)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def token_sums(
  task: str, outputs: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per example ``(Σ_t ℓ_t, Σ_t [correct]_t, n_t)`` over its counted tokens.

  Classification: the tokens with a label ``>= 0`` (one "token" without token axes);
  regression: every output entry, ``n_t`` = 1 (the loss is the mean over entries).
  """
  if task == "regression":
    per = _example_mean((outputs - y) ** 2)
    return per, jnp.zeros_like(per), jnp.ones_like(per)
  valid = y >= IGNORE_BELOW
  labels = jnp.where(valid, y, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
  hit = (jnp.argmax(outputs, -1) == labels) & valid
  axes = tuple(range(1, y.ndim))
  w = valid.astype(jnp.float32)
  return (
    jnp.sum(jnp.where(valid, ce, 0.0), axis=axes),
    jnp.sum(hit.astype(jnp.float32), axis=axes),
    jnp.sum(w, axis=axes),
  )


def per_example_losses(task: str, outputs: jax.Array, y: jax.Array) -> jax.Array:
  """``ℓᵢ``, shape ``[B]``: softmax cross-entropy with integer labels (classification) or
  the mean squared error of example ``i`` over its output entries (regression). The loss
  of the reference loop's step and of every evaluation.

  Labels may carry token axes (sequence models: ``y [B, T]``, ``outputs [B, T, V]``): the
  example's loss is then the mean over its tokens, ``ℓᵢ = (1/Tᵢ) Σ_t CE(f(x_i)_t, y_{i,t})``,
  over the ``Tᵢ`` tokens whose label is ``>= 0``; labels below 0 (padding, as PyTorch's
  ``ignore_index``) are left out (an example without a counted token has ``ℓᵢ = 0``).
  The evaluations (:func:`make_evaluator`) weight examples by ``Tᵢ``, so their loss is the
  mean over all counted tokens.
  """
  total, _, count = token_sums(task, outputs, y)
  return total / jnp.maximum(count, 1.0)


def _batch_sums(
  apply_fn: ApplyFn, task: str, params: Any, state: Any, batch: tuple[jax.Array, ...]
) -> jax.Array:
  """``[Σ mᵢ Σ_t ℓ, Σ mᵢ Σ_t [correct], Σ mᵢ Tᵢ]`` of one padded batch ``(x, y, m)``."""
  xb, yb, mb = batch
  total, hits, count = token_sums(task, apply_fn(params, state, xb), yb)
  return jnp.stack([jnp.sum(total * mb), jnp.sum(hits * mb), jnp.sum(count * mb)])


def _means(sums: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(loss, accuracy)`` from summed ``[loss, hits, count]`` (last axis)."""
  count = jnp.maximum(sums[..., 2], 1.0)
  return sums[..., 0] / count, sums[..., 1] / count


def make_evaluator(
  apply_fn: ApplyFn, eval_set: EvalSet, *, task: str = "classification"
) -> Callable[[Any, Any], tuple[jax.Array, jax.Array]]:
  """``f(params, state) -> (loss, accuracy)`` over ``eval_set``, for one parameter tree.

  The padded batches are scanned (``lax.scan``); padded examples carry weight 0, so the
  results are the exact means ``L = (1/n) Σ_i ℓ(f(x_i), y_i)`` and
  ``acc = (1/n) Σ_i [argmax f(x_i) = y_i]`` (0 for regression) over the ``n`` examples
  (with token axes, over their counted tokens: see :func:`per_example_losses`).
  The reference loop's evaluation (:func:`jaxscope.train.make_evaluate`); trace it inside
  ``jit``. :func:`make_batch_evaluator` evaluates ``K`` trees at once the same way.
  """

  def evaluate(params: Any, state: Any) -> tuple[jax.Array, jax.Array]:
    def body(carry: jax.Array, batch: tuple[jax.Array, ...]) -> Any:
      return carry + _batch_sums(apply_fn, task, params, state, batch), None

    zero = jnp.zeros((3,), jnp.float32)
    sums, _ = jax.lax.scan(body, zero, (eval_set.x, eval_set.y, eval_set.mask))
    return _means(sums)

  return evaluate


def make_batch_evaluator(
  apply_fn: ApplyFn, eval_set: EvalSet, *, task: str = "classification"
) -> Callable[[Any, Any], tuple[jax.Array, jax.Array]]:
  """``f(params [K, ...], states [K, ...]) -> (loss [K], accuracy [K])`` over ``eval_set``.

  The ``K`` parameter trees (leading axis) are evaluated together (``vmap``) while the
  padded batches are scanned (``lax.scan``); padded examples carry weight 0, so the results
  are exact means over the ``n`` examples. Trace it inside ``jit``.
  """

  def evaluate(params: Any, states: Any) -> tuple[jax.Array, jax.Array]:
    def body(carry: jax.Array, batch: tuple[jax.Array, ...]) -> Any:
      def one(p: Any, s: Any) -> jax.Array:
        return _batch_sums(apply_fn, task, p, s, batch)

      return carry + jax.vmap(one)(params, states), None

    k = jax.tree.leaves(params)[0].shape[0]
    zero = jnp.zeros((k, 3), jnp.float32)
    sums, _ = jax.lax.scan(body, zero, (eval_set.x, eval_set.y, eval_set.mask))
    return _means(sums)

  return evaluate


def recompute_statistics(
  apply_train: Callable[[Any, Any, jax.Array], Any], params: Any, state: Any, xs: jax.Array
) -> Any:
  """BatchNorm statistics of ``params`` averaged exactly over the batches ``xs``.

  A train-mode pass updates each statistic as an exponential moving average
  ``s' = m·s + (1 − m)·b`` with the batch's value ``b`` and the layer's momentum ``m``.
  Two passes from ``s = 0`` and ``s = 1`` give ``s'₀ = (1 − m)·b`` and ``s'₁ = m + s'₀``,
  hence ``m = s'₁ − s'₀`` and ``b = s'₀ / (1 − m)``, whatever the momentum; the result is
  the plain mean of ``b`` over the batches (not an EMA). A statistic with ``m = 1`` (never
  updated) keeps its value in ``state``. Trace it inside ``jit``.
  """
  zeros = jax.tree.map(jnp.zeros_like, state)
  ones = jax.tree.map(jnp.ones_like, state)

  def one(x: jax.Array) -> Any:
    s0, s1 = apply_train(params, zeros, x), apply_train(params, ones, x)
    return jax.tree.map(lambda a, b: (a, b - a), s0, s1)

  def batch_value(pair: Any, old: jax.Array) -> jax.Array:
    s0, m = pair
    keep = jnp.abs(1 - m) < 1e-12
    return jnp.where(keep, old, s0 / jnp.where(keep, 1.0, 1 - m))

  def body(total: Any, x: jax.Array) -> tuple[Any, None]:
    pairs = one(x)
    vals = jax.tree.map(batch_value, pairs, state, is_leaf=lambda p: isinstance(p, tuple))
    return jax.tree.map(jnp.add, total, vals), None

  total, _ = jax.lax.scan(body, zeros, xs)
  return jax.tree.map(lambda t: t / xs.shape[0], total)


def chunk_size(basis: Sequence[Any], eval_set: EvalSet, *, budget_bytes: float = 2**30) -> int:
  """Points evaluated at once within ``budget_bytes``.

  On the CPU the answer is 1: ``vmap`` over points turns convolutions into grouped
  convolutions, which XLA:CPU runs slower per point than one point at a time
  (``benchmarks/landscape.py``: 1.7 ms against 3.0 ms per LeNet-5 point). Elsewhere each
  point holds its own parameters (``|θ|`` bytes) and the activations of one batch; the
  activations are estimated as 64 floats per input element of the batch (generous for
  the small convolutional and dense models of the zoo), and the result is clipped to
  ``[1, 256]``.
  """
  if jax.default_backend() == "cpu":
    return 1
  p_bytes = sum(
    int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(basis[0])
  )
  act = 64 * 4 * int(np.prod(eval_set.x.shape[1:]))
  return int(max(1, min(256, budget_bytes // max(1, p_bytes + act))))


class PointEvaluator(NamedTuple):
  """What :func:`make_point_evaluator` returns."""

  evaluate: Callable[[Any], dict[str, np.ndarray]]
  """``evaluate(coeffs [K, r, G]) -> {"loss": [K], "accuracy": [K]}`` (numpy)."""
  groups: tuple[str, ...]
  """The group names in order (``("all",)`` for one group)."""
  leaf_group: tuple[int, ...]
  """Each leaf's group index, in flattening order."""
  chunk: int
  """Points per compiled call."""
  timings: dict[str, float]
  """Cumulative seconds: ``compile`` (first call) and ``run``; ``points`` evaluated."""


def make_point_evaluator(
  apply_fn: ApplyFn,
  basis: Sequence[Any],
  eval_set: EvalSet,
  *,
  groups: Sequence[str] | None = None,
  leaf_groups: Sequence[int] | None = None,
  model_state: Any = None,
  state_basis: Sequence[Any] | None = None,
  recompute: tuple[Callable[[Any, Any, jax.Array], Any], Any] | None = None,
  task: str = "classification",
  chunk: int | None = None,
) -> PointEvaluator:
  """Builds the compiled evaluator of points ``θ(c) = Σ_j c[j, g] B_j`` (module docstring).

  Args:
    apply_fn: ``apply_fn(params, model_state, x) -> outputs`` in evaluation mode (for a
      :class:`jaxscope.models.ModelDef` ``m``: ``lambda p, s, x: m.apply({"params": p,
      **s}, x, train=False)[0]``).
    basis: ``r`` parameter trees of one structure (leaves of equal shapes and dtypes).
    eval_set: from :func:`make_eval_set`.
    groups: names of the ``G`` leaf groups (default one group ``"all"``).
    leaf_groups: the group index of each leaf in flattening order (default all 0).
    model_state: non-parameter collections (BatchNorm statistics) used at every point
      ("keep" policy; e.g. the final model's), ``{}``/``None`` when the model has none.
    state_basis: instead of ``model_state``, one state tree per basis element: the state
      is interpolated with the same coefficients as the parameters of group 0
      ("interpolate" policy, Li et al.'s ``states`` directions).
    recompute: ``(apply_train, xs)``: recompute the BatchNorm statistics at every point
      ("recompute" policy, the only correct one far from the checkpoints) from the
      training batches ``xs`` (``[batches, batch_size, ...]``) with
      ``apply_train(params, model_state, x) -> new_model_state`` (train mode, mutable
      statistics); see :func:`recompute_statistics`. ``model_state`` gives the structure.
    task: ``"classification"`` (softmax cross-entropy, integer labels) or
      ``"regression"`` (mean squared error; accuracy is 0).
    chunk: points per call (default :func:`chunk_size`).

  Returns:
    A :class:`PointEvaluator`. ``evaluate`` accepts ``[K, r]`` (one group) or
    ``[K, r, G]`` coefficients and any ``K``; NaN/Inf losses are returned as they are.

  Raises:
    ValueError: an empty basis, trees of different structure or shapes, bad groups,
      coefficients of the wrong shape, an unknown task.
  """
  basis, groups, leaf_groups, state_basis = _check_points(
    basis, groups, leaf_groups, state_basis, task
  )
  r, G = len(basis), len(groups)
  model_state = {} if model_state is None else model_state
  chunk = int(chunk) if chunk else chunk_size(basis, eval_set)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *basis)  # leaves [r, ...]
  stacked_state = (
    jax.tree.map(lambda *xs: jnp.stack(xs), *state_basis) if state_basis is not None else None
  )
  lg = jnp.asarray(leaf_groups, jnp.int32)
  treedef = jax.tree.structure(basis[0])

  def point_params(c: jax.Array) -> Any:  # c: [r, G]
    leaves = jax.tree.leaves(stacked)
    out = []
    for i, leaf in enumerate(leaves):
      w = c[:, lg[i]].astype(leaf.dtype)  # [r]
      out.append(jnp.tensordot(w, leaf, axes=1))
    return jax.tree.unflatten(treedef, out)

  def point_state(c: jax.Array) -> Any:
    if recompute is not None:
      return recompute_statistics(recompute[0], point_params(c), model_state, recompute[1])
    if stacked_state is None:
      return model_state
    return jax.tree.map(lambda s: jnp.tensordot(c[:, 0].astype(s.dtype), s, axes=1), stacked_state)

  batch_eval = make_batch_evaluator(apply_fn, eval_set, task=task)

  @jax.jit
  def run_chunk(coeffs: jax.Array) -> tuple[jax.Array, jax.Array]:  # coeffs [K, r, G]
    return batch_eval(jax.vmap(point_params)(coeffs), jax.vmap(point_state)(coeffs))

  timings = {"compile": 0.0, "run": 0.0, "points": 0.0}

  def evaluate(coeffs: Any) -> dict[str, np.ndarray]:
    return _evaluate_chunks(run_chunk, coeffs, r=r, G=G, chunk=chunk, timings=timings)

  return PointEvaluator(evaluate, groups, leaf_groups, chunk, timings)


def _check_points(
  basis: Sequence[Any],
  groups: Sequence[str] | None,
  leaf_groups: Sequence[int] | None,
  state_basis: Sequence[Any] | None,
  task: str,
) -> tuple[list[Any], tuple[str, ...], tuple[int, ...], list[Any] | None]:
  """The checked arguments of :func:`make_point_evaluator`: ``(basis, groups, leaf_groups,
  state_basis)`` with their defaults (one group ``"all"``, every leaf in it)."""
  if task not in ("classification", "regression"):
    raise ValueError(
      f"make_point_evaluator: task must be classification or regression, not {task!r}."
    )
  basis = list(basis)
  if not basis:
    raise ValueError("make_point_evaluator: the basis is empty.")
  for i, b in enumerate(basis[1:], 1):
    jtree.check_same_structure(basis[0], b, ref_name="basis[0]", other_name=f"basis[{i}]")
  n_leaves = len(jax.tree.leaves(basis[0]))
  groups = tuple(groups) if groups is not None else ("all",)
  leaf_groups = tuple(int(g) for g in (leaf_groups if leaf_groups is not None else [0] * n_leaves))
  if len(leaf_groups) != n_leaves:
    raise ValueError(
      f"make_point_evaluator: leaf_groups has {len(leaf_groups)} entries for {n_leaves} leaves."
    )
  if any(not 0 <= g < len(groups) for g in leaf_groups):
    raise ValueError(f"make_point_evaluator: leaf_groups must index the {len(groups)} groups.")
  if state_basis is not None:
    state_basis = list(state_basis)
    if len(state_basis) != len(basis):
      raise ValueError(
        f"make_point_evaluator: state_basis has {len(state_basis)} trees for {len(basis)}."
      )
  return basis, groups, leaf_groups, state_basis


def _evaluate_chunks(
  run_chunk: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
  coeffs: Any,
  *,
  r: int,
  G: int,
  chunk: int,
  timings: dict[str, float],
) -> dict[str, np.ndarray]:
  """Evaluates ``[K, r]`` or ``[K, r, G]`` coefficients ``chunk`` points per compiled call
  (the last chunk padded with copies of its first point), timing compile and run."""
  c = np.asarray(coeffs, np.float32)
  if c.ndim == 2:
    c = c[:, :, None] * np.ones((1, 1, G), np.float32)
  if c.ndim != 3 or c.shape[1:] != (r, G):
    raise ValueError(
      f"evaluate: coefficients must be [K, {r}] or [K, {r}, {G}], got {np.shape(coeffs)}."
    )
  K = len(c)
  size = min(chunk, K)  # Few points: a smaller compiled shape, not a padded full chunk.
  losses, accs = [], []
  for start in range(0, K, size):
    part = c[start : start + size]
    pad = size - len(part)
    if pad:  # One compiled shape: pad the last chunk with copies of its first point.
      part = np.concatenate([part, np.repeat(part[:1], pad, axis=0)])
    t0 = time.perf_counter()
    loss, acc = jax.block_until_ready(run_chunk(jnp.asarray(part)))
    dt = time.perf_counter() - t0
    key = "compile" if timings["points"] == 0 and start == 0 else "run"
    timings[key] += dt
    losses.append(np.asarray(loss)[: size - pad])
    accs.append(np.asarray(acc)[: size - pad])
  timings["points"] += K
  return {
    "loss": np.concatenate(losses) if losses else np.zeros(0, np.float32),
    "accuracy": np.concatenate(accs) if accs else np.zeros(0, np.float32),
  }
