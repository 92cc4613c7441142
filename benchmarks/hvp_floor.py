"""The least XLA program for the instruments' Hessian-vector products, a floor to set them
against.

``benchmarks/costs.py`` times this program as the row ``xla_floor/hvps``: the bare SGD step
plus ``k`` Hutchinson products of one linearisation, ``Σₖ zₖᵀ H zₖ`` (``jax.linearize`` of
the gradient once, so the primal pass is shared, as the instruments share it), and nothing
else: no per-leaf sums, no error bars, no state. Its extra over the bare step, divided by
``k``, is what one product of this model costs on this machine when XLA computes nothing
but products. The roofline floor counts a product's FLOPs at the best rate of a plain
matmul (:func:`benchmarks.floors.machine_rates`, with ``8B`` rows), a rate that a product of
one tangent at batch ``B`` does not reach on XLA:CPU; a row with ``n`` products is set
against ``n`` of these plus the roofline floor of what else it computes
(:func:`xla_floor_ms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from benchmarks import problems
from benchmarks.common import copy_tree
from jaxscope.metrics.hutchinson import rademacher

#: Quantities that push the ``k`` Hutchinson probes through the HVP (one shared pass).
HUTCHINSON = frozenset({"hess_trace", "tic_diag", "tic_trace"})


def hvp_count(quantities: Sequence[str], k: int) -> int:
  """How many products a step measuring ``quantities`` computes: the ``k`` probes (shared
  by :data:`HUTCHINSON`) and ``hess_max_ev``'s one."""
  return k * bool(HUTCHINSON & set(quantities)) + ("hess_max_ev" in quantities)


def xla_floor_ms(n: int, per_hvp_ms: float, rest_floor_ms: float) -> float:
  """The floor of a row with ``n`` products: ``n`` timed products plus the roofline floor of
  the rest (``rest_floor_ms``)."""
  return n * per_hvp_ms + rest_floor_ms


def probe(params: Any, i: int) -> Any:
  """Probe ``i`` of the floor program: Rademacher leaves like ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(0), i), len(leaves))
  z = [rademacher(jnp.shape(a), kk, a.dtype) for a, kk in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(treedef, z)


def hvps_step(
  problem: problems.Problem, k: int, learning_rate: float, compiler_options: Any = None
) -> tuple[Any, tuple]:
  """The jitted SGD step that also computes ``Σₖ zₖᵀ H zₖ`` over ``k`` Rademacher probes
  (``compiler_options``: ``jax.jit``'s)."""
  tx = optax.sgd(learning_rate)

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    grads, lin = jax.linearize(lambda p: jax.grad(problem.loss)(p, x, y), params)
    total = jnp.zeros((), jnp.float32)
    for i in range(k):
      z = probe(params, i)
      pairs = zip(jax.tree.leaves(z), jax.tree.leaves(lin(z)), strict=True)
      total = total + sum(jnp.vdot(a, b) for a, b in pairs)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, total

  state = (copy_tree(problem.params), tx.init(problem.params))
  return jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options), state
