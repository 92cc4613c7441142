"""The least XLA program for the scope's ``full`` preset, the floor its row is set against.

``benchmarks/costs.py`` measures ``scope/full`` against this program (row
``xla_floor/scope/full``). It is the bare SGD step plus what the preset's statistics are
made of, with no per-layer scalar work beyond them, no state and no check:

* the economy sums: ``Σx`` and ``Σx²`` of every leaf of ``params``, ``grads``, ``updates``
  (norm, mean and variance of each; the update/weight ratio is made of these);
* per leaf and topic, the histogram's counts: the same strided sample of at most
  :data:`~jaxscope.metrics.registry.HISTOGRAM_SAMPLE` elements, its min and max, and a
  64-bin scatter-add (the one counting primitive of XLA:CPU that is not slower: see the
  README, "the histograms' cost");
* per kernel, one power-iteration pair ``u = W v``, ``v' = Wᵀ u`` from a fixed vector,
  the least a warm-started spectral norm needs (the scope refines from the last step's
  vector, and takes an exact SVD of kernels up to 4096 elements, which this floor does
  not: it is cheaper);
* per leaf, the realised update ``Σ(θ' − θ)²``, the count of lost coordinates
  ``Σ[u ≠ 0 ∧ θ' = θ]`` and that of moving ones ``Σ[u ≠ 0]`` (``realised_ratio``;
  ``lost_fraction`` is the ratio of the two counts), over the parameters the step stores
  anyway.

Everything is returned as three vectors (sums, counts, spectral), so the program's
outputs are three leaves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks import problems
from benchmarks.common import copy_tree
from jaxscope.metrics.registry import HISTOGRAM_SAMPLE
from jaxscope.metrics.stats import _subsample
from jaxscope.tree import as_matrix

BINS = 64


def _counts(x: jax.Array) -> jax.Array:
  """The 64-bin counts of the leaf's histogram sample, on its own min..max range."""
  s = _subsample(x, HISTOGRAM_SAMPLE)
  lo, hi = jnp.min(s), jnp.max(s)
  idx = jnp.clip(jnp.floor((s - lo) * (BINS / (hi - lo))).astype(jnp.int32), 0, BINS - 1)
  return jnp.zeros((BINS,), jnp.int32).at[idx].add(1, mode="promise_in_bounds")


def _power_pair(w: jax.Array) -> jax.Array:
  """``‖Wᵀ W v‖`` of a fixed ``v``: one warm power-iteration step of the matrix view."""
  m = as_matrix(w)
  v = jnp.full((m.shape[1],), m.shape[1] ** -0.5, m.dtype)
  return jnp.linalg.norm(m.T @ (m @ v))


def full_step(
  problem: problems.Problem, learning_rate: float, compiler_options: Any = None
) -> tuple[Any, tuple]:
  """The jitted SGD step computing only the ``full`` preset's sums, counts and products
  (``compiler_options``: ``jax.jit``'s)."""
  tx = optax.sgd(learning_rate)

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    trees = [jax.tree.leaves(t) for t in (params, grads, updates)]
    sums = [f(leaf) for leaves in trees for leaf in leaves for f in (jnp.sum, _sumsq)]
    for p, u, n in zip(*(jax.tree.leaves(t) for t in (params, updates, new)), strict=True):
      sums.append(_sumsq(n - p))
      sums.append(jnp.sum(((u != 0) & (n == p)).astype(jnp.float32)))
      sums.append(jnp.sum((u != 0).astype(jnp.float32)))
    counts = jnp.stack([_counts(leaf) for leaves in trees for leaf in leaves])
    spectral = jnp.stack([_power_pair(w) for w in trees[0] if w.ndim >= 2])
    return new, opt_state, (loss, jnp.stack(sums), counts, spectral)

  jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)
  return jitted, (copy_tree(problem.params), tx.init(problem.params))


def _sumsq(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x))
