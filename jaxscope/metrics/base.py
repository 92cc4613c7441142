"""The :class:`Metric` type: a named, pure statistic of one layer's tensors.

A metric is a pair of pure functions, in the optax manner:

* ``init(shapes) -> state``: the per-layer state (an empty tuple for stateless
  statistics; a warm-start vector for power iteration), from the layer's leaves as
  ``jax.ShapeDtypeStruct``.
* ``apply(leaves, state, reference) -> (value, state)``: the statistic of the layer
  whose tensors are ``leaves``; ``reference`` is the matching leaves of the parameters
  for metrics that need them (update/weight ratios), else ``None``.

A *layer* may hold several leaves (``depth`` grouping); unless a metric says
otherwise, its statistic treats the layer as one flat vector made of all its
elements. Values are ``float32`` scalars, or a dict of fixed-shape arrays (histogram
``counts`` and ``edges``), which a scope stores under ``{topic}/{name}_{part}/{layer}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxscope.tree import LeafInfo, as_matrix, input_axes, leaf_infos

__all__ = [
  "SUMS",
  "Metric",
  "Moments",
  "evaluate",
  "group_max",
  "group_min",
  "group_sum",
  "moments",
  "stateless",
  "takes",
  "tree_norm",
  "tree_vdot",
  "view",
]

Leaves = Sequence[jax.Array]
Value = jax.Array | dict[str, jax.Array]

#: The sums a :class:`Moments` statistic can read, per layer: ``s1 = Σx``, ``s2 = Σx²``,
#: ``ss = Σ(x − mean)²`` (exact, see :mod:`jaxscope.metrics.moments`) and ``ref_s2``, the
#: ``Σθ²`` of the matching parameters.
SUMS = ("s1", "s2", "ss", "ref_s2")


class Moments(NamedTuple):
  """A statistic that is a function of a layer's element count and sums only.

  A scope evaluates such a metric for all layers of a topic at once
  (:mod:`jaxscope.metrics.moments`): each sum is computed once per leaf whatever the
  number of metrics reading it, and ``finish`` runs once on the vectors of all layers.
  The metric's ``apply`` still computes the same value for one layer (for
  :func:`evaluate` and for any other caller).
  """

  needs: frozenset[str]
  """The sums read, a subset of :data:`SUMS`."""
  finish: Callable[[Mapping[str, jax.Array], Any], jax.Array]
  """``finish(sums, n)``: the values of all layers from ``{sum: float32[K]}`` and the
  element counts ``n`` (``float32[K]``, a numpy array), element-wise over the ``K`` layers."""


def moments(needs: Sequence[str], finish: Callable[..., jax.Array]) -> Moments:
  """Builds a :class:`Moments`, checking the sums' names."""
  bad = [s for s in needs if s not in SUMS]
  if bad:
    raise ValueError(f"moments: unknown sum(s) {bad}; sums: {', '.join(SUMS)}.")
  return Moments(frozenset(needs), finish)


class Metric(NamedTuple):
  """A named per-layer statistic; see the module docstring."""

  name: str
  """The ``stat`` part of the output key, e.g. ``"norm"``."""
  init: Callable[[Sequence[jax.ShapeDtypeStruct]], Any]
  apply: Callable[[Leaves, Any, Leaves | None], tuple[Value, Any]]
  needs_params: bool = False
  """Whether ``apply`` needs the parameters' leaves as ``reference``."""
  min_ndim: int = 0
  """Leaves of lower rank are left out of this metric (2 for spectral norms)."""
  kernels_only: bool = False
  """Only leaves of kind ``"kernel"`` (:func:`jaxscope.tree.leaf_kind`): the matrices a
  layer applies; biases (also 2-D ones, e.g. an attention bias ``[heads, head_dim]``) and
  normalisation scales are left out (spectral norms, condition numbers)."""
  matrix: bool = False
  """``apply`` gets each leaf as its matrix view ``[fan_in, fan_out]``
  (:func:`jaxscope.tree.as_matrix` with :func:`jaxscope.tree.input_axes` of the leaf's
  name), and ``init`` the views' shapes."""
  moments: Moments | None = None
  """For a stateless statistic of the layer's sums: how a scope evaluates it for all
  layers at once (:class:`Moments`)."""


def takes(metric: Metric, shape: Sequence[int], kind: str) -> bool:
  """Whether ``metric`` measures a leaf of this ``shape`` and ``kind``."""
  return len(shape) >= metric.min_ndim and (not metric.kernels_only or kind == "kernel")


def view(
  metric: Metric, info: LeafInfo, x: Any, matrix_axes: Mapping[str, int] | None = None
) -> Any:
  """The leaf ``x`` (described by ``info``) as ``metric`` measures it: its matrix view for
  metrics with ``matrix``, else unchanged. Works on arrays and ``ShapeDtypeStruct``."""
  if not metric.matrix:
    return x
  n_in = input_axes(info.name, info.shape, matrix_axes)
  if isinstance(x, jax.ShapeDtypeStruct):
    rows = math.prod(info.shape[:n_in])
    return jax.ShapeDtypeStruct((rows, math.prod(info.shape) // max(rows, 1)), x.dtype)
  return as_matrix(x, n_in)


def group_sum(parts: Sequence[jax.Array]) -> jax.Array:
  """Sum of per-leaf partial results of one layer (no extra op for a single leaf)."""
  return parts[0] if len(parts) == 1 else jnp.sum(jnp.stack(parts))


def group_min(parts: Sequence[jax.Array]) -> jax.Array:
  """Minimum of per-leaf partial results of one layer."""
  return parts[0] if len(parts) == 1 else jnp.min(jnp.stack(parts))


def group_max(parts: Sequence[jax.Array]) -> jax.Array:
  """Maximum of per-leaf partial results of one layer."""
  return parts[0] if len(parts) == 1 else jnp.max(jnp.stack(parts))


def tree_vdot(a: Any, b: Any) -> jax.Array:
  """``Σᵢ aᵢ bᵢ`` over two pytrees, in float32 whatever the leaves' dtype.

  ``optax.tree.vdot`` keeps the leaves' dtype, so bfloat16 trees give a bfloat16 result
  (3 significant digits) that e.g. ``jnp.linalg.lstsq`` cannot take; here every leaf is
  upcast inside the fused product-sum.
  """
  parts = jax.tree.leaves(
    jax.tree.map(lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b)
  )
  return group_sum(parts) if parts else jnp.zeros((), jnp.float32)


def tree_norm(tree: Any, *, squared: bool = False) -> jax.Array:
  """``‖tree‖₂`` (or its square) in float32 whatever the leaves' dtype (see :func:`tree_vdot`)."""
  sq = tree_vdot(tree, tree)
  return sq if squared else jnp.sqrt(sq)


def _no_state(shapes: Sequence[jax.ShapeDtypeStruct]) -> tuple[()]:
  del shapes
  return ()


def stateless(
  name: str,
  fn: Callable[..., Value],
  *,
  needs_params: bool = False,
  min_ndim: int = 0,
  kernels_only: bool = False,
  matrix: bool = False,
  moments: Moments | None = None,
) -> Metric:
  """Builds a :class:`Metric` without state from ``fn(leaves)`` or ``fn(leaves, ref)``.

  Args:
    name: the ``stat`` part of output keys.
    fn: the statistic. Called as ``fn(leaves)``, or ``fn(leaves, reference)`` when
      ``needs_params`` is true.
    needs_params: whether the statistic needs the parameters' leaves.
    min_ndim: leaves of lower rank are excluded.
    kernels_only: only leaves of kind ``"kernel"`` are measured (see :class:`Metric`).
    matrix: ``fn`` gets the leaves' matrix views (see :class:`Metric`).
    moments: the same statistic as a function of the layer's sums (:class:`Moments`),
      which a scope evaluates for all layers at once; it must agree with ``fn``.

  Returns:
    A :class:`Metric`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxscope import metrics
    >>> m = metrics.stateless("l1", lambda xs: sum(jnp.abs(x).sum() for x in xs))
    >>> float(metrics.evaluate(m, jnp.array([1.0, -2.0])))
    3.0
  """

  def apply(leaves: Leaves, state: Any, reference: Leaves | None) -> tuple[Value, Any]:
    if needs_params:
      return fn(leaves, reference), state
    return fn(leaves), state

  return Metric(name, _no_state, apply, needs_params, min_ndim, kernels_only, matrix, moments)


def evaluate(metric: Metric, tree: Any, reference: Any = None, state: Any = None) -> Value:
  """Evaluates ``metric`` on a whole pytree (or array) treated as one layer.

  A convenience for one-off use and tests; inside a train step use a
  :func:`~jaxscope.metrics.scope`, which evaluates per layer and keeps the state.

  Args:
    metric: the metric.
    tree: an array or pytree of arrays.
    reference: the matching parameters, for metrics with ``needs_params``.
    state: the metric's state; ``None`` uses ``metric.init``.

  Returns:
    The metric's value.
  """
  infos = [i for i in leaf_infos(tree, argname="tree") if takes(metric, i.shape, i.kind)]
  keep = [i.index for i in infos]
  flat = jax.tree_util.tree_leaves(tree)
  leaves = [view(metric, i, jnp.asarray(flat[i.index])) for i in infos]
  if not leaves:
    what = "kernel leaf" if metric.kernels_only else "leaf"
    raise ValueError(f"metric {metric.name!r}: no {what} of rank >= {metric.min_ndim} in the tree.")
  ref = None
  if metric.needs_params:
    if reference is None:
      raise ValueError(f"metric {metric.name!r} needs reference= (the parameters).")
    flat_ref = jax.tree_util.tree_leaves(reference)
    ref = [jnp.asarray(flat_ref[i]) for i in keep]
  if state is None:
    state = metric.init([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves])
  value, _ = metric.apply(leaves, state, ref)
  return value
