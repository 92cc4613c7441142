"""The least XLA program for the instruments' ``economy`` preset on a model of Dense layers,
the floor its row is set against.

``benchmarks/costs.py`` measures ``instruments/economy`` against this program (row
``xla_floor/instruments/economy``; MNIST MLP only, whose layers are all Dense). It is the
bare SGD step, written out layer by layer so that one backward pass also gives every
layer's output gradients ``δᵢ`` (a zero added to each layer's output and differentiated,
the least a capture can do), plus what the preset's values are made of, with no state,
no check and no per-value scalar work beyond them:

* the per-example squared gradient norms ``‖gᵢ‖² = Σ_l (‖xᵢ‖² + 1)·‖δᵢ‖²`` (norm test);
* the per-example projections on the mean gradient through the Gram matrices,
  ``gᵢᵀg = (1/B) Σⱼ (xᵢᵀxⱼ + 1)(δᵢᵀδⱼ)``, or the contraction ``xᵢᵀ G δᵢ`` where that is
  cheaper (inner-product and orthogonality tests);
* the per-example projections on the last update, one contraction ``xᵢᵀ U δᵢ`` per layer
  (α's end point; its start point, SGD's update ``−ηg``, is the gradient's projections
  scaled: the route of ``updates_in_span``);
* the per-example gradient entries at the same sample of coordinates as the instruments
  (:func:`jaxscope.metrics.histograms.histogram_sample`), binned on a fixed range by
  ``⌊(x − lo)·bins/(hi − lo)⌋`` clipped (no edge correction) and counted per leaf with one
  ``int32`` scatter-add;
* per leaf ``‖g‖²``, ``‖u‖²`` and ``‖θ − θ₀‖²`` (gradient norm, update size, distance).

Everything is returned as one vector of sums and one table of counts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import problems
from benchmarks.common import copy_tree
from jaxscope.metrics.histograms import histogram_sample

BINS = 100
#: The fixed histogram range of the floor (the instruments keep the first step's range).
RANGE = (-0.05, 0.05)


def _layers(params: Any) -> list[tuple[str, jax.Array, jax.Array]]:
  """``(name, kernel, bias)`` of the Dense layers in order (``Dense_0``, ``Dense_1``, …)."""
  names = sorted(params, key=lambda n: int(n.rsplit("_", 1)[1]))
  return [(n, params[n]["kernel"], params[n]["bias"]) for n in names]


def _forward(params: Any, zeros: list[jax.Array], x: jax.Array, y: jax.Array) -> Any:
  """Mean loss, with the per-example losses and each layer's inputs as auxiliaries."""
  layers = _layers(params)
  h, inputs = x, []
  for i, ((_, w, b), z) in enumerate(zip(layers, zeros, strict=True)):
    inputs.append(h)
    h = h @ w + b + z
    if i < len(layers) - 1:
      h = jax.nn.relu(h)
  losses = optax.softmax_cross_entropy_with_integer_labels(h, y)
  return jnp.mean(losses), (losses, inputs)


def _grad_projections(x: jax.Array, d: jax.Array, g_kernel: jax.Array) -> jax.Array:
  """``gᵢᵀg`` of one layer (kernel and bias), the cheaper of the Gram and the contraction."""
  b, n_in = x.shape
  n_out = d.shape[1]
  if b * (n_in + n_out) < n_in * n_out:
    return jnp.sum((x @ x.T + 1.0) * (d @ d.T), axis=1) / b
  return jnp.einsum("bi,io,bo->b", x, g_kernel, d) + d @ jnp.mean(d, axis=0)


def _histogram(
  inputs: list[jax.Array], deltas: list[jax.Array], params: Any, sample: Any
) -> jax.Array:
  """Per-leaf counts of the sampled per-example entries: one scatter-add."""
  cols, leaf_of = [], []
  leaves_of_layers = []
  for (_, w, _), x, d in zip(_layers(params), inputs, deltas, strict=True):
    leaves_of_layers.append(("bias", None, d))
    leaves_of_layers.append(("kernel", w.shape, (x, d)))
  # jax.tree.leaves order: per layer, bias before kernel.
  for k, (kind, shape, data) in enumerate(leaves_of_layers):
    idx = sample.indices[k]
    if kind == "bias":
      cols.append(data[:, idx])
    else:
      rows, c = np.divmod(idx, shape[1])
      x, d = data
      cols.append(x[:, rows] * d[:, c])
    leaf_of.append(np.full(len(idx), k * BINS, np.int32))
  entries = jnp.concatenate(cols, axis=1)
  lo, hi = RANGE
  binned = jnp.clip(jnp.floor((entries - lo) * (BINS / (hi - lo))), 0, BINS - 1)
  flat = binned.astype(jnp.int32) + np.concatenate(leaf_of)[None, :]
  table = jnp.zeros(len(leaves_of_layers) * BINS, jnp.int32)
  return table.at[flat.reshape(-1)].add(1, mode="promise_in_bounds")


def economy_step(
  problem: problems.Problem,
  learning_rate: float,
  compiler_options: Any = None,
  hist_sample: int = 2048,
) -> tuple[Any, tuple]:
  """The jitted SGD step computing only the ``economy`` preset's sums, projections and
  counts (``compiler_options``: ``jax.jit``'s; ``hist_sample``: the instruments' default)."""
  tx = optax.sgd(learning_rate)
  sample = histogram_sample(problem.params, hist_sample)

  def step(params: Any, opt_state: Any, prev: Any, init: Any, x: jax.Array, y: jax.Array) -> Any:
    layers = _layers(params)
    zeros = [jnp.zeros((x.shape[0], w.shape[1]), w.dtype) for _, w, _ in layers]
    (loss, (losses, inputs)), (grads, dz) = jax.value_and_grad(
      _forward, argnums=(0, 1), has_aux=True
    )(params, zeros, x, y)
    b = x.shape[0]
    deltas = [d * b for d in dz]
    sq_norms = sum(
      (jnp.sum(xx * xx, axis=1) + 1.0) * jnp.sum(d * d, axis=1)
      for xx, d in zip(inputs, deltas, strict=True)
    )
    on_grad = sum(
      _grad_projections(xx, d, grads[n]["kernel"])
      for (n, _, _), xx, d in zip(layers, inputs, deltas, strict=True)
    )
    on_prev = sum(
      jnp.einsum("bi,io,bo->b", xx, prev[n]["kernel"], d) + d @ prev[n]["bias"]
      for (n, _, _), xx, d in zip(layers, inputs, deltas, strict=True)
    )
    counts = _histogram(inputs, deltas, params, sample)
    updates, opt_state = tx.update(grads, opt_state, params)
    sums = []
    for tree in (grads, updates, jax.tree.map(jnp.subtract, params, init)):
      sums += [jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)]
    stats = [loss, jnp.var(losses), jnp.var(on_grad), jnp.var(on_prev), jnp.mean(sq_norms)]
    out = (jnp.stack(sums), jnp.stack(stats), counts)
    return optax.apply_updates(params, updates), opt_state, updates, init, out

  jitted = jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=compiler_options)
  zeros = jax.tree.map(jnp.zeros_like, problem.params)
  return jitted, (copy_tree(problem.params), tx.init(problem.params), zeros, problem.params)
