"""Filter-normalised random directions for loss landscapes, and tree-vector helpers.

**Filter-normalised random directions** (Li, Xu, Taylor, Studer & Goldstein, "Visualizing
the Loss Landscape of Neural Nets", NeurIPS 2018, arXiv:1712.09913, §4): a Gaussian
direction ``d ~ N(0, I)`` shaped like the parameters, rescaled per output unit ("filter")
``j`` of every weight leaf so that ``‖d_j‖ = ‖θ_j‖``. Landscapes
``f(a, b) = L(θ* + a·δ + b·η)`` are then comparable across layers, nets and scale-invariant
reparametrisations. PCA of a trajectory and the projection of checkpoints onto a plane are in
:mod:`jaxscope.analysis.pca`.

All functions take parameter pytrees (Flax Linen ``params`` dicts, NNX ``State``, plain
nested dicts) and name leaves with :func:`jaxscope.tree.path_name`. Norms and inner
products are computed in ``float32``, or in the leaf's dtype where that is wider.

**Axis convention.** Flax keeps the output axis of a weight LAST (Dense ``[in, out]``,
Conv ``[kh, kw, in, out]``, see :func:`jaxscope.tree.output_axes`); PyTorch keeps it FIRST
(``[out, in, kh, kw]``). The original implementations loop over axis 0; porting that loop
to Flax silently normalises kernel *rows* (input units) instead of filters, the most
likely port bug. Here a filter is the slice ``[..., j]``, and ``output_axes=`` overrides
the rule per leaf (e.g. ``(heads, head_dim)`` of a DenseGeneral q/k/v kernel
``[d_model, heads, head_dim]``, or the rows of an Embed table).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxscope import tree as jtree

__all__ = [
  "cosine",
  "filter_normalize",
  "leaf_seed",
  "random_directions",
]

Norm = Literal["filter", "layer", "none"]
Ignore1D = Literal["zero", "copy", "filter", "keep"]
AxesFn = Callable[[str, tuple[int, ...]], Sequence[int]]

_NORMS = ("filter", "layer", "none")
_IGNORES = ("zero", "copy", "filter", "keep")


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(*dtypes: Any) -> np.dtype:
  """``float32``, or the widest floating dtype among ``dtypes`` if wider (and enabled)."""
  dt = np.dtype(np.float32)
  for d in dtypes:
    d = np.dtype(d)
    if jnp.issubdtype(d, jnp.floating) and d.itemsize > dt.itemsize:
      dt = d
  return np.dtype(jax.dtypes.canonicalize_dtype(dt))


def _up(x: Any) -> jax.Array:
  """``x`` as a JAX array in its computation dtype (at least ``float32``)."""
  x = jnp.asarray(x)
  return x.astype(_compute_dtype(x.dtype))


def _out_dtype(dtype: Any) -> np.dtype:
  """The dtype of a direction leaf: the parameter's dtype if floating, else float32."""
  dtype = np.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))
  return np.dtype(np.float32)


def _vdot(a: Any, b: Any) -> jax.Array:
  """``⟨a, b⟩`` over whole trees, in float32 or wider (``optax.tree.vdot``)."""
  return optax.tree.vdot(jax.tree.map(_up, a), jax.tree.map(_up, b))


def _norm(a: Any) -> jax.Array:
  """``‖a‖₂`` over a whole tree, in float32 or wider (``optax.tree.norm``)."""
  return optax.tree.norm(jax.tree.map(_up, a))


def _sq(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  return jnp.sum(x * x, axis=axes, keepdims=True)


def _dot(x: jax.Array, y: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  return jnp.sum(x * y, axis=axes, keepdims=True)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def leaf_seed(name: str) -> int:
  """The stable 32-bit seed of a leaf name: ``zlib.crc32`` of its UTF-8 bytes.

  Python's ``hash`` of a string is salted per process, so it cannot be used to make
  directions reproducible across runs.

  >>> leaf_seed("Dense_0/kernel")
  4141646615
  """
  return zlib.crc32(name.encode("utf-8"))


def _check_modes(norm: str, ignore_1d: str) -> None:
  if norm not in _NORMS:
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}.")
  if ignore_1d not in _IGNORES:
    raise ValueError(f"ignore_1d must be one of {_IGNORES}, got {ignore_1d!r}.")


class _Unit(NamedTuple):
  """How one leaf of a direction is built and normalised.

  ``tag``: ``"zero"`` (all zeros), ``"copy"`` (the parameters themselves), ``"free"``
  (random, not normalised), ``"unit"`` (random, each normalisation unit rescaled to the
  parameters' norm; the unit is the slice reduced over ``axes``) or ``"scalar"`` (a rank
  ≤ 1 leaf normalised per scalar).
  """

  tag: str
  axes: tuple[int, ...] = ()


def _unit(info: jtree.LeafInfo, norm: str, ignore_1d: str, axes_fn: AxesFn | None) -> _Unit:
  if not jnp.issubdtype(np.dtype(info.dtype), jnp.floating):
    return _Unit("zero")
  ndim = len(info.shape)
  if ndim <= 1:
    return {
      "zero": _Unit("zero"),
      "copy": _Unit("copy"),
      "keep": _Unit("free"),
      "filter": _Unit("scalar", ()),
    }[ignore_1d]
  if norm == "none":
    return _Unit("free")
  if norm == "layer":
    return _Unit("unit", tuple(range(ndim)))
  raw = tuple(int(a) for a in (axes_fn or jtree.output_axes)(info.name, info.shape))
  for a in raw:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"output_axes for leaf {info.name!r} of shape {info.shape} returned axis {a}, "
        f"out of range for rank {ndim}."
      )
  out = {a % ndim for a in raw}
  return _Unit("unit", tuple(a for a in range(ndim) if a not in out))


def _normalize_leaf(d: jax.Array, theta: jax.Array, unit: _Unit, eps: float) -> jax.Array:
  """One leaf of :func:`filter_normalize`; ``d`` and ``theta`` in the compute dtype."""
  if unit.tag == "zero":
    return jnp.zeros_like(d)
  if unit.tag == "copy":
    return theta.astype(d.dtype)
  if unit.tag == "free":
    return d
  return d * jnp.sqrt(_sq(theta, unit.axes)) / (jnp.sqrt(_sq(d, unit.axes)) + eps)


# --------------------------------------------------------------------- normalisation


def filter_normalize(
  direction: Any,
  reference: Any,
  *,
  norm: Norm = "filter",
  ignore_1d: Ignore1D = "zero",
  eps: float = 1e-10,
  output_axes: AxesFn | None = None,
) -> Any:
  r"""Rescales a direction per filter (or per layer) to the norms of the reference.

  Filter normalisation (Li et al. 2018, §4, Eq. in "Filter-Wise Normalization"): for every
  leaf of rank ≥ 2 and every output unit ``j``,

  .. math:: d_j \leftarrow d_j \, \frac{\lVert \theta_j \rVert_F}{\lVert d_j \rVert_F + \epsilon},

  where ``d_j`` and ``θ_j`` are the slices ``[..., j]`` (Flax keeps the output axis LAST)
  and the Frobenius norms run over all other axes, so a Dense filter is a column of
  ``[in, out]`` and a Conv filter a ``[kh, kw, in]`` block of ``[kh, kw, in, out]``.
  PyTorch stores the output axis FIRST and the original code (``net_plotter.py``) loops
  over axis 0; applying that loop to a Flax kernel would normalise its rows instead.

  Modes for leaves of rank ≥ 2 (``norm``):

  * ``"filter"``: the formula above (``ε = 1e-10`` as in the original).
  * ``"layer"``: ``d ← d·‖θ‖/(‖d‖ + ε)`` over the whole leaf (the original has no ε).
  * ``"none"``: unchanged.

  Modes for leaves of rank ≤ 1, i.e. biases and BatchNorm/LayerNorm scale and bias
  (``ignore_1d``; the originals decide by rank alone):

  * ``"zero"`` (default; Li's ``--xignore biasbn``): the direction is 0, so these leaves
    stay at the centre.
  * ``"copy"`` (Li's behaviour without ``biasbn``, for parity only): ``d = θ``, which is
    not random: moving by ``a`` scales the leaf by ``1 + a``.
  * ``"filter"`` (nnvis ``get_random_direction``): each scalar is its own filter,
    ``d_i ← d_i·|θ_i|/(|d_i| + ε)`` ≈ ``±|θ_i|``.
  * ``"keep"``: unchanged.

  Leaves whose dtype is not floating get a zero direction. Norms are computed in
  ``float32`` (or the leaf's dtype if wider); the result has the direction's dtypes.
  Shapes are static, so the function can be traced inside ``jax.jit``.

  Args:
    direction: a pytree with the structure and shapes of ``reference``.
    reference: the parameters ``θ`` whose norms the direction takes.
    norm: ``"filter"``, ``"layer"`` or ``"none"``.
    ignore_1d: ``"zero"``, ``"copy"``, ``"filter"`` or ``"keep"``.
    eps: added to the direction's norms.
    output_axes: ``(name, shape) -> axes`` giving the output axes of a leaf of rank ≥ 2
      (default :func:`jaxscope.tree.output_axes`, the last axis); a filter is one index
      along these axes and its norm runs over the other axes.

  Returns:
    The normalised direction, with the structure of ``direction``.

  Raises:
    ValueError: unknown mode, or structures or shapes that differ.

  >>> import jax.numpy as jnp
  >>> theta = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
  >>> d = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  >>> out = filter_normalize(d, theta)
  >>> [round(float(v), 4) for v in jnp.linalg.norm(out["kernel"], axis=0)]
  [5.0, 1.0]
  >>> out["bias"].tolist()
  [0.0, 0.0]
  """
  _check_modes(norm, ignore_1d)
  jtree.check_same_structure(reference, direction, ref_name="reference", other_name="direction")
  infos = jtree.leaf_infos(reference, argname="reference")
  d_leaves, treedef = jax.tree.flatten(direction)
  t_leaves = jax.tree.leaves(reference)
  out = []
  for info, d, t in zip(infos, d_leaves, t_leaves, strict=True):
    d = jnp.asarray(d)
    cdt = _compute_dtype(d.dtype, info.dtype)
    unit = _unit(info, norm, ignore_1d, output_axes)
    res = _normalize_leaf(d.astype(cdt), jnp.asarray(t).astype(cdt), unit, eps)
    out.append(res.astype(d.dtype))
  return jax.tree.unflatten(treedef, out)


def cosine(a: Any, b: Any) -> jax.Array:
  """Cosine similarity ``⟨a, b⟩ / (‖a‖·‖b‖)`` of two trees, flattened.

  Li et al. print it for their two random directions (≈ 0 in high dimension). Computed
  in ``float32`` or wider; ``NaN`` when either tree is zero.
  """
  jtree.check_same_structure(a, b, ref_name="a", other_name="b")
  num = _vdot(a, b)
  den = _norm(a) * _norm(b)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.nan)


# ------------------------------------------------------------------ random directions


def _orthogonalize(
  dirs: list[list[jax.Array]], thetas: list[jax.Array], units: list[_Unit], eps: float
) -> None:
  """Gram–Schmidt of ``dirs[k]`` against ``dirs[:k]``, per normalisation unit, in place."""
  free = [i for i, u in enumerate(units) if u.tag == "free"]
  for k in range(1, len(dirs)):
    for i, unit in enumerate(units):
      if unit.tag != "unit":
        continue
      v = dirs[k][i]
      v_norm0 = jnp.sqrt(_sq(v, unit.axes))
      for j in range(k):
        u = dirs[j][i]
        v = v - _safe_div(_dot(v, u, unit.axes), _sq(u, unit.axes)) * u
      v_norm = jnp.sqrt(_sq(v, unit.axes))
      t_norm = jnp.sqrt(_sq(thetas[i], unit.axes))
      # A unit with fewer entries than directions has nothing left after the projection
      # but rounding noise; rescaling that noise would break orthogonality, so zero it.
      tol = 64 * float(jnp.finfo(v.dtype).eps)
      dirs[k][i] = jnp.where(v_norm > tol * v_norm0, v * t_norm / (v_norm + eps), 0)
    if free:
      v = [dirs[k][i] for i in free]
      for j in range(k):
        u = [dirs[j][i] for i in free]
        coef = _safe_div(optax.tree.vdot(v, u), optax.tree.vdot(u, u))
        v = optax.tree.add_scale(v, -coef, u)
      for i, x in zip(free, v, strict=True):
        dirs[k][i] = x


def random_directions(
  params: Any,
  key: jax.Array | int,
  n: int = 2,
  *,
  norm: Norm = "filter",
  ignore_1d: Ignore1D = "zero",
  orthogonalize: bool = False,
  eps: float = 1e-10,
  output_axes: AxesFn | None = None,
) -> list[Any]:
  """``n`` random directions shaped like ``params``, filter-normalised against them.

  Direction ``k`` draws leaf ``ℓ`` from ``N(0, I)`` with the key
  ``fold_in(fold_in(key, k), leaf_seed(name_ℓ))`` (:func:`leaf_seed` is ``zlib.crc32`` of
  the leaf's path name), in chunks of 1024 values, chunk ``c`` folding in ``c`` once more
  (all draws then share one shape and compile once). Every leaf's draw thus depends only
  on the key, ``k``, its own name, shape and dtype: reordering the tree, or adding or
  removing other leaves, leaves it unchanged, and the first directions of ``n = 3`` equal
  those of ``n = 2``. (The original seeds torch once and draws leaf after leaf, so its
  directions depend on the architecture and on the draws the model's initialisation
  consumed first: loss-landscape issue #36.) Draws are made in ``float32`` (or the leaf's
  dtype if wider) and then normalised as in :func:`filter_normalize` (``norm``,
  ``ignore_1d``, ``eps``, ``output_axes``); the whole construction is one compiled
  function per tree structure.

  ``orthogonalize=True`` applies Gram–Schmidt to direction ``k`` against directions
  ``0 … k−1`` *per normalisation unit* (per filter for ``norm="filter"``, per leaf for
  ``"layer"``) and then rescales each unit back to ``‖θ_j‖``: orthogonal units give an
  exactly orthogonal whole, and the filter norms still hold exactly (Gram–Schmidt over the
  flattened tree followed by re-normalisation per filter would undo the orthogonality).
  Un-normalised random entries (``norm="none"`` leaves, ``ignore_1d="keep"`` leaves) are
  orthogonalised together over the flattened tree. Cosines are then 0 up to rounding when
  ``ignore_1d`` is ``"zero"`` or ``"keep"``; ``"copy"`` and per-scalar ``"filter"`` rank
  ≤ 1 leaves cannot be orthogonalised without breaking their definition and are left as
  they are, so they contribute ``⟨δ_b, η_b⟩`` to the inner product. A filter with fewer
  entries than ``n`` (e.g. a Dense kernel with fan-in 1) cannot hold ``n`` orthogonal
  vectors and is zero in the later directions. Without ``orthogonalize`` the directions
  are nearly orthogonal in high dimension, as in the original (see :func:`cosine`).

  Args:
    params: the parameters ``θ*`` (centre of the landscape).
    key: a JAX PRNG key, or an integer seed for ``jax.random.key``.
    n: number of directions.
    norm: see :func:`filter_normalize`.
    ignore_1d: see :func:`filter_normalize`.
    orthogonalize: Gram–Schmidt per normalisation unit (above).
    eps: see :func:`filter_normalize`.
    output_axes: see :func:`filter_normalize`.

  Returns:
    A list of ``n`` pytrees with the structure of ``params`` and its (floating) dtypes.

  Raises:
    ValueError: ``n < 1`` or an unknown mode.
  """
  _check_modes(norm, ignore_1d)
  if n < 1:
    raise ValueError(f"random_directions: n must be at least 1, got {n}.")
  if isinstance(key, int):
    key = jax.random.key(key)
  jtree.leaf_infos(params, argname="params")  # Clear errors before tracing.
  return _random_directions(
    params,
    key,
    n=n,
    norm=norm,
    ignore_1d=ignore_1d,
    orthogonalize=orthogonalize,
    eps=float(eps),
    output_axes=output_axes,
  )


# Every leaf is drawn in chunks of this many values, chunk c of leaf ℓ of direction k with
# the key fold_in(fold_in(fold_in(key, k), leaf_seed(ℓ)), c): all draws share one shape, so
# the whole tree costs one vmapped threefry instead of one compiled sampler per leaf shape.
_CHUNK = 1024


def _draw_chunks(keys: jax.Array, seeds: jax.Array, chunks: jax.Array, dtype: Any) -> jax.Array:
  """``[n, N, _CHUNK]`` normals, row ``(k, r)`` from ``fold_in(fold_in(keys[k], seeds[r]),
  chunks[r])``."""

  def one(key_k: jax.Array, seed: jax.Array, chunk: jax.Array) -> jax.Array:
    kk = jax.random.fold_in(jax.random.fold_in(key_k, seed), chunk)
    return jax.random.normal(kk, (_CHUNK,), dtype)

  return jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)), in_axes=(0, None, None))(keys, seeds, chunks)


def _gaussian_leaves(
  key: jax.Array, n: int, infos: Sequence[jtree.LeafInfo], dtypes: Sequence[Any]
) -> list[list[jax.Array]]:
  """``[k][leaf]`` N(0, I) draws; each depends only on ``key``, ``k``, the leaf's name and
  shape, and its dtype."""
  out: list[list[Any]] = [[None] * len(infos) for _ in range(n)]
  for dt in sorted({np.dtype(d) for d in dtypes}, key=str):
    idx = [i for i, d in enumerate(dtypes) if np.dtype(d) == dt]
    sizes = [int(np.prod(infos[i].shape)) for i in idx]
    counts = [max(1, -(-s // _CHUNK)) for s in sizes]
    seeds = np.repeat(np.array([leaf_seed(infos[i].name) for i in idx], np.uint32), counts)
    chunks = np.concatenate([np.arange(c, dtype=np.uint32) for c in counts])

    keys = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(n, dtype=jnp.uint32))
    z = _draw_chunks(keys, jnp.asarray(seeds), jnp.asarray(chunks), dt)
    start = 0
    for i, size, count in zip(idx, sizes, counts, strict=True):
      for k in range(n):
        flat = z[k, start : start + count].reshape(-1)[:size]
        out[k][i] = flat.reshape(infos[i].shape)
      start += count
  return out


@functools.partial(
  jax.jit, static_argnames=("n", "norm", "ignore_1d", "orthogonalize", "eps", "output_axes")
)
def _random_directions(
  params: Any,
  key: jax.Array,
  *,
  n: int,
  norm: str,
  ignore_1d: str,
  orthogonalize: bool,
  eps: float,
  output_axes: AxesFn | None,
) -> list[Any]:
  """:func:`random_directions` as one compiled function."""
  infos = jtree.leaf_infos(params, argname="params")
  leaves, treedef = jax.tree.flatten(params)
  units = [_unit(info, norm, ignore_1d, output_axes) for info in infos]
  thetas = [_up(x) for x in leaves]
  drawn = [i for i, u in enumerate(units) if u.tag not in ("zero", "copy")]
  raws = _gaussian_leaves(key, n, [infos[i] for i in drawn], [thetas[i].dtype for i in drawn])
  dirs: list[list[jax.Array]] = []
  for k in range(n):
    raw = dict(zip(drawn, raws[k], strict=True))
    out = []
    for i, (info, theta, unit) in enumerate(zip(infos, thetas, units, strict=True)):
      d = raw[i] if i in raw else jnp.zeros(info.shape, theta.dtype)
      out.append(_normalize_leaf(d, theta, unit, eps))
    dirs.append(out)
  if orthogonalize:
    _orthogonalize(dirs, thetas, units, eps)
  return [
    jax.tree.unflatten(
      treedef, [x.astype(_out_dtype(info.dtype)) for info, x in zip(infos, d, strict=True)]
    )
    for d in dirs
  ]
