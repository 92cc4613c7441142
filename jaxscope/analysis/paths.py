"""Linear and quadratic interpolation paths at model, layer and parameter level.

* **Linear** (Goodfellow, Vinyals & Saxe 2015): ``θ(α) = (1−α)·θ_a + α·θ_b``.
* **Quadratic** (the nnvis thesis): the element-wise Lagrange polynomial through the nodes
  ``(0, θ_0)``, ``(t_m, θ_m)``, ``(1, θ_f)``:
  ``θ(α) = ℓ₀(α)θ_0 + ℓ₁(α)θ_m + ℓ₂(α)θ_f`` with
  ``ℓ₀ = (α−t_m)(α−1)/t_m``, ``ℓ₁ = α(α−1)/(t_m(t_m−1))``, ``ℓ₂ = α(α−t_m)/(1−t_m)``
  (nnvis fixes ``t_m = ½``: ``ℓ₀ = 2(α−½)(α−1)``, ``ℓ₁ = −4α(α−1)``, ``ℓ₂ = 2α(α−½)``;
  here ``t_m`` may also be the mid checkpoint's true time fraction). The weights sum to 1
  for every α; the closed form never fails where scipy's per-scalar ``lagrange`` silently
  did (collinear values).
* **Levels**: *model* (all leaves move), *layer* (one layer's leaves move, every other leaf
  stays at the final model, as nnvis), *parameter* (one scalar moves).
* **Real curve**: each checkpoint's true loss placed at its projected path coordinate
  ``α_t = ⟨θ_t − θ_0, θ_f − θ_0⟩ / ‖θ_f − θ_0‖²`` (the nnvis figure put epoch ``e`` at
  ``e/E`` instead), and the mean absolute error of each path's loss against it.

All of it evaluates through :mod:`jaxscope.analysis.kernel` (one compilation per analysis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxscope import tree as jtree
from jaxscope.analysis.kernel import (
  ApplyFn,
  EvalSet,
  make_batch_evaluator,
  make_point_evaluator,
)

__all__ = [
  "PathResult",
  "TrajectoryStats",
  "lagrange_weights",
  "layer_paths",
  "linear_weights",
  "model_path",
  "parameter_paths",
  "path_error",
  "project_on_path",
  "select_parameters",
  "trajectory_stats",
]

DEFAULT_ALPHAS = np.linspace(-0.5, 1.5, 41)


class PathResult(NamedTuple):
  """Loss and accuracy along one path."""

  alpha: np.ndarray
  loss: np.ndarray
  accuracy: np.ndarray
  kind: str
  """``"linear"`` or ``"quadratic"``."""
  level: str
  """``"model"``, ``"layer"`` or ``"parameter"``."""
  name: str
  """``"model"``, the layer name, or ``"{leaf}[{index}]"``."""
  distance: float
  """``‖θ_f − θ_0‖`` of what moves (the layer's leaves, or ``|Δ|`` of the scalar)."""


def linear_weights(alpha: Any) -> np.ndarray:
  """``[K, 2]`` weights ``[1−α, α]`` of ``θ_a`` and ``θ_b``."""
  a = np.asarray(alpha, np.float64).reshape(-1)
  return np.stack([1 - a, a], axis=1)


def lagrange_weights(alpha: Any, mid: float = 0.5) -> np.ndarray:
  """``[K, 3]`` Lagrange weights of the nodes ``(0, t_m, 1)`` (module docstring).

  Raises:
    ValueError: ``mid`` not strictly between 0 and 1.
  """
  if not 0.0 < mid < 1.0:
    raise ValueError(f"lagrange_weights: the mid node must lie in (0, 1), got {mid}.")
  a = np.asarray(alpha, np.float64).reshape(-1)
  l0 = (a - mid) * (a - 1) / mid
  l1 = a * (a - 1) / (mid * (mid - 1))
  l2 = a * (a - mid) / (1 - mid)
  return np.stack([l0, l1, l2], axis=1)


def _basis_and_weights(
  theta_0: Any, theta_f: Any, theta_mid: Any, alphas: np.ndarray, mid: float
) -> tuple[list[Any], np.ndarray, str]:
  if theta_mid is None:
    return [theta_0, theta_f], linear_weights(alphas), "linear"
  return [theta_0, theta_mid, theta_f], lagrange_weights(alphas, mid), "quadratic"


def _tree_dist(a: Any, b: Any) -> float:
  return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)))


def model_path(
  apply_fn: ApplyFn,
  eval_set: EvalSet,
  theta_0: Any,
  theta_f: Any,
  *,
  theta_mid: Any = None,
  mid: float = 0.5,
  alphas: Any = DEFAULT_ALPHAS,
  model_state: Any = None,
  task: str = "classification",
) -> PathResult:
  """Loss and accuracy along the model-level linear (or, with ``theta_mid``, quadratic)
  path from ``theta_0`` (α = 0) to ``theta_f`` (α = 1).

  Args:
    apply_fn: ``apply_fn(params, model_state, x) -> outputs`` in evaluation mode.
    eval_set: :func:`jaxscope.analysis.make_eval_set`.
    theta_0: parameters at α = 0 (e.g. the initial checkpoint).
    theta_f: parameters at α = 1 (the final checkpoint).
    theta_mid: the middle node of a quadratic path (``None``: linear path).
    mid: the middle node's α (0.5 as nnvis, or its true time fraction).
    alphas: the path coordinates (default 41 points on ``[−0.5, 1.5]``).
    model_state: BatchNorm statistics used at every point (the final model's: "keep").
    task: ``"classification"`` or ``"regression"``.
  """
  alphas = np.asarray(alphas, np.float64)
  basis, w, kind = _basis_and_weights(theta_0, theta_f, theta_mid, alphas, mid)
  ev = make_point_evaluator(apply_fn, basis, eval_set, model_state=model_state, task=task)
  out = ev.evaluate(w)
  return PathResult(
    alphas, out["loss"], out["accuracy"], kind, "model", "model", _tree_dist(theta_f, theta_0)
  )


def layer_paths(
  apply_fn: ApplyFn,
  eval_set: EvalSet,
  theta_0: Any,
  theta_f: Any,
  *,
  theta_mid: Any = None,
  mid: float = 0.5,
  alphas: Any = DEFAULT_ALPHAS,
  depth: int | None = -1,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  model_state: Any = None,
  task: str = "classification",
) -> dict[str, PathResult]:
  """One path per layer: that layer's leaves follow the path, all others stay at
  ``theta_f`` (nnvis's layer level). All layers × all α run in one compiled kernel.

  Layers are groups of leaves by :func:`jaxscope.tree.layout` (``depth=-1``: per module,
  a kernel with its bias; ``depth=None``: per leaf). At α = 0 the value is the
  re-initialisation test of Zhang et al. for that layer. ``distance`` is
  ``‖θ_f − θ_0‖`` over the layer's leaves (nnvis reported the weight only).

  Returns:
    ``{layer: PathResult}`` in the tree's order.
  """
  alphas = np.asarray(alphas, np.float64)
  lay = jtree.layout(theta_f, include=include, exclude=exclude, depth=depth, argname="theta_f")
  names = list(lay.keys)
  n_leaves = len(lay.leaves)
  leaf_group = [len(names)] * n_leaves  # the rest: group G−1, fixed at θ_f
  for gi, g in enumerate(lay.groups):
    for info in g.leaves:
      leaf_group[info.index] = gi
  basis, w, kind = _basis_and_weights(theta_0, theta_f, theta_mid, alphas, mid)
  r, G, A = len(basis), len(names) + 1, len(alphas)
  fixed = np.zeros(r)
  fixed[-1] = 1.0  # θ_f is the last basis element
  coeffs = np.broadcast_to(fixed[None, :, None], (len(names) * A, r, G)).copy()
  for li in range(len(names)):
    coeffs[li * A : (li + 1) * A, :, li] = w
  ev = make_point_evaluator(
    apply_fn,
    basis,
    eval_set,
    groups=[*names, "(rest)"],
    leaf_groups=leaf_group,
    model_state=model_state,
    task=task,
  )
  out = ev.evaluate(coeffs)
  f0 = jax.tree.leaves(theta_0)
  ff = jax.tree.leaves(theta_f)
  results = {}
  for li, g in enumerate(lay.groups):
    d = float(np.sqrt(sum(float(jnp.sum((ff[i.index] - f0[i.index]) ** 2)) for i in g.leaves)))
    sl = slice(li * A, (li + 1) * A)
    results[g.key] = PathResult(
      alphas, out["loss"][sl], out["accuracy"][sl], kind, "layer", g.key, d
    )
  return results


def select_parameters(
  theta_0: Any,
  theta_f: Any,
  *,
  how: str = "top",
  k: int = 10,
  seed: int = 0,
  explicit: Sequence[tuple[str, tuple[int, ...]]] | None = None,
  include: str | Sequence[str] | None = None,
  kind: jtree.Kind = "any",
) -> list[tuple[str, tuple[int, ...]]]:
  """Chooses scalars ``(leaf name, index)`` for :func:`parameter_paths`.

  Args:
    how: ``"top"`` (largest ``|θ_f − θ_0|``), ``"random"`` (uniform over the selected
      leaves' entries, seeded) or ``"explicit"`` (``explicit`` as given, validated).
    k: how many.
    include, kind: which leaves qualify (:func:`jaxscope.tree.layout`); biases included
      unless ``kind="kernel"`` (nnvis could only select ``.weight``).

  Raises:
    ValueError: an unknown ``how``, a leaf or index that does not exist.
  """
  infos = [
    i
    for g in jtree.layout(theta_f, include=include, kind=kind, argname="theta_f").groups
    for i in g.leaves
  ]
  f0, ff = jax.tree.leaves(theta_0), jax.tree.leaves(theta_f)
  by_name = {i.name: i for i in infos}
  if how == "explicit":
    out = []
    for name, idx in explicit or []:
      if name not in by_name:
        raise ValueError(f"select_parameters: no leaf {name!r}; leaves: {sorted(by_name)}.")
      shape = by_name[name].shape
      idx = tuple(int(v) for v in idx)
      if len(idx) != len(shape) or any(not 0 <= v < s for v, s in zip(idx, shape, strict=True)):
        raise ValueError(f"select_parameters: index {idx} is outside {name!r} of shape {shape}.")
      out.append((name, idx))
    return out
  if how not in ("top", "random"):
    raise ValueError(f"select_parameters: how must be top, random or explicit, got {how!r}.")
  flat = [(i, np.abs(np.asarray(ff[i.index]) - np.asarray(f0[i.index])).reshape(-1)) for i in infos]
  sizes = np.array([len(d) for _, d in flat])
  allv = np.concatenate([d for _, d in flat])
  if how == "top":
    picks = np.argsort(-allv, kind="stable")[:k]
  else:
    picks = np.random.default_rng(seed).choice(len(allv), size=min(k, len(allv)), replace=False)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  out = []
  for p in picks:
    li = int(np.searchsorted(offsets, p, side="right") - 1)
    info = flat[li][0]
    out.append((info.name, tuple(int(v) for v in np.unravel_index(p - offsets[li], info.shape))))
  return out


def parameter_paths(
  apply_fn: ApplyFn,
  eval_set: EvalSet,
  theta_0: Any,
  theta_f: Any,
  selection: Sequence[tuple[str, tuple[int, ...]]],
  *,
  theta_mid: Any = None,
  mid: float = 0.5,
  alphas: Any = DEFAULT_ALPHAS,
  model_state: Any = None,
  task: str = "classification",
) -> list[PathResult]:
  """One path per selected scalar: only that scalar follows the (linear or quadratic)
  path, everything else stays at ``theta_f`` (nnvis's parameter level).

  Each point is ``θ_f`` with one entry of the flat parameter vector replaced (a scatter),
  evaluated in chunks of points by one compiled kernel. ``distance`` is ``|Δθ|`` of the
  scalar (a displacement, not a path length; see :func:`trajectory_stats`).
  """
  alphas = np.asarray(alphas, np.float64)
  if not selection:
    return []
  flat_f, unravel = ravel_pytree(theta_f)
  flat_0, _ = ravel_pytree(theta_0)
  flat_m = ravel_pytree(theta_mid)[0] if theta_mid is not None else None
  infos = {i.name: i for i in jtree.leaf_infos(theta_f, argname="theta_f")}
  sizes = [int(np.prod(i.shape)) for i in sorted(infos.values(), key=lambda i: i.index)]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  positions = []
  for name, idx in selection:
    if name not in infos:
      raise ValueError(f"parameter_paths: no leaf {name!r}.")
    info = infos[name]
    positions.append(int(offsets[info.index] + np.ravel_multi_index(idx, info.shape)))
  pos = np.asarray(positions)
  _, w, kind = _basis_and_weights(None, None, theta_mid, alphas, mid)
  nodes = [np.asarray(flat_0)[pos], np.asarray(flat_f)[pos]]
  if flat_m is not None:
    nodes.insert(1, np.asarray(flat_m)[pos])
  vals = w @ np.stack(nodes)  # [A, P]: the scalar's value at each α
  A, Pn = len(alphas), len(pos)
  idx_all = np.repeat(pos, A)
  val_all = vals.T.reshape(-1).astype(np.asarray(flat_f).dtype)
  batch_eval = make_batch_evaluator(apply_fn, eval_set, task=task)
  state = {} if model_state is None else model_state

  @jax.jit
  def run(idx: jax.Array, val: jax.Array) -> tuple[jax.Array, jax.Array]:
    params = jax.vmap(lambda i, v: unravel(flat_f.at[i].set(v)))(idx, val)
    states = jax.vmap(lambda _: state)(idx)
    return batch_eval(params, states)

  chunk = max(1, min(len(idx_all), 64))
  losses, accs = [], []
  for s in range(0, len(idx_all), chunk):
    i, v = idx_all[s : s + chunk], val_all[s : s + chunk]
    pad = chunk - len(i)
    if pad:
      i, v = np.concatenate([i, np.repeat(i[:1], pad)]), np.concatenate([v, np.repeat(v[:1], pad)])
    loss, acc = run(jnp.asarray(i), jnp.asarray(v))
    losses.append(np.asarray(loss)[: chunk - pad])
    accs.append(np.asarray(acc)[: chunk - pad])
  loss, acc = np.concatenate(losses).reshape(Pn, A), np.concatenate(accs).reshape(Pn, A)
  return [
    PathResult(
      alphas,
      loss[j],
      acc[j],
      kind,
      "parameter",
      f"{name}[{','.join(map(str, idx))}]",
      float(abs(nodes[-1][j] - nodes[0][j])),
    )
    for j, (name, idx) in enumerate(selection)
  ]


def project_on_path(theta_0: Any, theta_f: Any, checkpoints: Sequence[Any]) -> np.ndarray:
  """Each checkpoint's coordinate on the line: ``α_t = ⟨θ_t − θ_0, Δ⟩ / ‖Δ‖²``,
  ``Δ = θ_f − θ_0`` (0 for every checkpoint when ``Δ = 0``)."""
  delta = jax.tree.map(jnp.subtract, theta_f, theta_0)
  dd = float(optax.tree.vdot(delta, delta))
  out = []
  for th in checkpoints:
    num = float(optax.tree.vdot(jax.tree.map(jnp.subtract, th, theta_0), delta))
    out.append(num / dd if dd > 0 else 0.0)
  return np.asarray(out)


def path_error(path: PathResult, alpha_t: Any, loss_t: Any) -> float:
  """Mean absolute error of a path's loss against the checkpoints' true losses.

  ``MAE = mean_t |ℓ̂(α_t) − loss_t|`` where ``ℓ̂`` linearly interpolates the path's loss
  over its α (sorted) and ``t`` runs over the checkpoints inside the α range of the
  path's finite points. Only finite values count: path points whose α or loss is not
  finite are dropped before interpolating, and checkpoints whose ``α_t`` or ``loss_t`` is
  not finite are left out, so one diverged point does not make the whole error NaN.

  Args:
    path: the path (its ``alpha`` and ``loss``, in any order of α).
    alpha_t: the checkpoints' coordinates on the path (:func:`project_on_path`).
    loss_t: the checkpoints' true losses.

  Returns:
    The mean absolute error; NaN when no finite path point or no finite checkpoint inside
    the range is left.
  """
  a = np.asarray(path.alpha, np.float64).reshape(-1)
  lo = np.asarray(path.loss, np.float64).reshape(-1)
  good = np.isfinite(a) & np.isfinite(lo)
  if not good.any():
    return float("nan")
  order = np.argsort(a[good])
  a, lo = a[good][order], lo[good][order]
  at = np.asarray(alpha_t, np.float64).reshape(-1)
  lt = np.asarray(loss_t, np.float64).reshape(-1)
  inside = (at >= a[0]) & (at <= a[-1]) & np.isfinite(lt)
  if not inside.any():
    return float("nan")
  return float(np.mean(np.abs(np.interp(at[inside], a, lo) - lt[inside])))


class TrajectoryStats(NamedTuple):
  """How far training moved the parameters."""

  distance: float
  """``‖θ_T − θ_0‖``."""
  relative_distance: float
  """``‖θ_T − θ_0‖ / ‖θ_0‖`` (``inf`` for ``θ_0 = 0``)."""
  path_length: float
  """``Σ_t ‖θ_{t+1} − θ_t‖`` over the checkpoints (≥ the distance)."""
  per_layer: dict[str, tuple[float, float, float]]
  """The three numbers per leaf."""


def trajectory_stats(checkpoints: Sequence[Any]) -> TrajectoryStats:
  """Distance travelled, relative distance and path length over ``checkpoints``
  (at least two parameter trees, in training order), whole model and per leaf."""
  cps = list(checkpoints)
  if len(cps) < 2:
    raise ValueError("trajectory_stats: give at least two checkpoints.")
  names = [i.name for i in jtree.leaf_infos(cps[0], argname="checkpoints[0]")]
  leaves = [[np.asarray(x, np.float64) for x in jax.tree.leaves(c)] for c in cps]
  per = {}
  tot_d2 = tot_02 = 0.0
  steps = np.zeros(len(cps) - 1)
  for j, name in enumerate(names):
    first, last = leaves[0][j], leaves[-1][j]
    d = float(np.linalg.norm(last - first))
    n0 = float(np.linalg.norm(first))
    seg = np.array([np.sum((leaves[t + 1][j] - leaves[t][j]) ** 2) for t in range(len(cps) - 1)])
    steps += seg
    per[name] = (d, d / n0 if n0 > 0 else float("inf"), float(np.sum(np.sqrt(seg))))
    tot_d2 += d * d
    tot_02 += n0 * n0
  dist = float(np.sqrt(tot_d2))
  rel = dist / float(np.sqrt(tot_02)) if tot_02 > 0 else float("inf")
  return TrajectoryStats(dist, rel, float(np.sum(np.sqrt(steps))), per)
