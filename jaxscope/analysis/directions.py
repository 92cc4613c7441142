"""Directions for loss landscapes and trajectories.

* **Filter-normalised random directions** (Li, Xu, Taylor, Studer & Goldstein, "Visualizing
  the Loss Landscape of Neural Nets", NeurIPS 2018, arXiv:1712.09913, §4): a Gaussian
  direction ``d ~ N(0, I)`` shaped like the parameters, rescaled per output unit ("filter")
  ``j`` of every weight leaf so that ``‖d_j‖ = ‖θ_j‖``. Landscapes
  ``f(a, b) = L(θ* + a·δ + b·η)`` are then comparable across layers, nets and scale-invariant
  reparametrisations.
* **PCA of a trajectory** (Li et al. 2018, §7): the top principal axes of the checkpoints
  ``θ_0 … θ_{T−1}``, computed from the ``T × T`` Gram matrix streamed over parameter blocks,
  never from the ``T × P`` matrix at once.
* **Projection** of checkpoints onto the plane ``origin + span(d_1, …, d_n)``, with the
  fraction of each displacement that lies off the plane (why a trajectory drawn over a PCA
  contour plot does not sit at the losses the checkpoints really had: Li's issue #1).

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxscope import tree as jtree

__all__ = [
  "LazyCheckpoints",
  "PCAResult",
  "cosine",
  "filter_normalize",
  "leaf_seed",
  "pca_directions",
  "project",
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


# ------------------------------------------------------------------------------- PCA


class LazyCheckpoints(Sequence):
  """A read-only sequence whose item ``i`` is ``load(i)``, loaded on every access.

  Lets :func:`pca_directions` stream checkpoints that live on disk, e.g. with orbax::

    steps = manager.all_steps()
    ckpts = LazyCheckpoints(lambda i: manager.restore(steps[i])["params"], len(steps))

  ``load`` may return a tree whose leaves are anything ``np.asarray`` accepts and that has
  ``shape`` and ``dtype`` (a lazily-read array), so only the leaves needed are read.
  """

  def __init__(self, load: Callable[[int], Any], length: int) -> None:
    self._load = load
    self._length = int(length)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> Any:  # type: ignore[override]
    if not isinstance(i, int | np.integer):
      raise TypeError(f"LazyCheckpoints indices must be integers, got {type(i).__name__}.")
    i = int(i)
    if i < 0:
      i += self._length
    if not 0 <= i < self._length:
      raise IndexError(f"checkpoint index {i} out of range for {self._length} checkpoints.")
    return self._load(i)

  def __iter__(self) -> Iterator[Any]:
    for i in range(self._length):
      yield self._load(i)


class PCAResult(NamedTuple):
  """Principal axes of a trajectory (:func:`pca_directions`)."""

  directions: list[Any]
  """``n`` trees, unit norm and mutually orthogonal (over the flattened tree), with zeros
  on the leaves left out (rank ≤ 1 under ``ignore_1d="zero"``, non-floating)."""
  explained_variance: np.ndarray
  """``[n]`` ``λ_k / (T − 1)`` (sklearn's ``explained_variance_``)."""
  explained_variance_ratio: np.ndarray
  """``[n]`` ``λ_k / Σ_all λ``: the share of the trajectory's spread on each axis."""
  singular_values: np.ndarray
  """``[n]`` ``σ_k = √λ_k`` of the centred checkpoint matrix."""
  center: str
  """``"mean"`` or ``"final"``: the reference subtracted from every checkpoint."""
  coords: np.ndarray
  """``[T, n]`` ``⟨θ_i − c, d_k⟩`` with ``c`` the centre (sklearn's ``fit_transform``
  for ``"mean"``). For projection around another origin use :func:`project`."""


def _as_source(checkpoints: Any) -> Sequence[Any]:
  if isinstance(checkpoints, Mapping):
    raise TypeError(
      "checkpoints must be a sequence or an iterable of parameter trees, got a mapping "
      "(a single tree?)."
    )
  if hasattr(checkpoints, "__len__") and hasattr(checkpoints, "__getitem__"):
    return checkpoints
  if not isinstance(checkpoints, Iterable):
    raise TypeError(
      f"checkpoints must be a sequence or an iterable of parameter trees, got "
      f"{type(checkpoints).__name__}."
    )
  # A one-shot iterable: read it once, keeping every checkpoint on the host.
  return [jax.tree.map(np.asarray, c) for c in checkpoints]


class _Reader:
  """Loads checkpoint ``i`` of a source and checks it against checkpoint 0."""

  def __init__(self, source: Sequence[Any]) -> None:
    self.source = source
    self.first = source[0]
    self.infos = jtree.leaf_infos(self.first, argname="checkpoints[0]")
    self.treedef = jax.tree.structure(self.first)

  def leaves(self, i: int) -> list[Any]:
    tree = self.first if i == 0 else self.source[i]
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != self.treedef or any(
      tuple(np.shape(x)) != info.shape for x, info in zip(leaves, self.infos, strict=True)
    ):
      jtree.check_same_structure(
        self.first, tree, ref_name="checkpoints[0]", other_name=f"checkpoints[{i}]"
      )
    return leaves


def _flat64(x: Any) -> np.ndarray:
  return np.asarray(x).reshape(-1).astype(np.float64)


def pca_directions(
  checkpoints: Sequence[Any] | Iterable[Any],
  n: int = 2,
  *,
  ignore_1d: Literal["zero", "keep"] = "zero",
  center: Literal["mean", "final"] = "mean",
  block_bytes: int = 2**30,
) -> PCAResult:
  r"""Principal axes of a trajectory of checkpoints, from a streamed Gram matrix.

  With rows ``r_i = vec(θ_i − c)`` (``i = 0 … T−1``) and ``c`` the mean checkpoint
  (``center="mean"``: sklearn ``PCA``, which is what Li et al.'s ``setup_PCA_directions``
  computes, since sklearn centres the rows ``θ_i − θ_T`` again) or the final one
  (``center="final"``: the literal matrix ``M = [θ_0 − θ_T; …]`` of Li et al. 2018, §7),
  the ``T × T`` Gram matrix ``G = R Rᵀ`` has eigenpairs ``(λ_k, u_k)``, and the principal
  directions are the right singular vectors

  .. math:: d_k = R^\top u_k / \sigma_k = \sum_i w_{ik}\, \theta_i, \qquad
            \sigma_k = \sqrt{\lambda_k}, \quad W = (I - \mathbf{1} a^\top)^\top U \Sigma^{-1},

  with ``a = 1/T`` (mean) or ``e_{T−1}`` (final); the weights of each direction sum to 0,
  so ``d_k`` is accumulated as ``Σ_i w_ik (θ_i − θ_0)`` without cancellation.

  **Streaming and memory.** ``G`` is accumulated over blocks of parameter columns: for
  each block, that block of every checkpoint is stacked into ``B [T, C]`` (float64, at
  most ``block_bytes``), centred exactly per column, and ``G += B Bᵀ``. Memory is
  ``O(T² + T·C)`` for the Gram pass and ``O((n + 1)·P)`` float64 host memory for the
  directions pass, plus one checkpoint at a time. When every column fits in one block
  (``8·T·P ≤ block_bytes``) each checkpoint is read ONCE; otherwise it is read once per
  block and once more for the directions. ``checkpoints`` is therefore either

  * a sequence (``__len__`` and ``__getitem__``, e.g. a list or a
    :class:`LazyCheckpoints` over orbax steps) that is indexed, possibly repeatedly, and
    never held in memory at once; or
  * a one-shot iterable (generator), iterated exactly once and kept on the host as numpy
    (``T × P`` values: the full matrix). Prefer a sequence for large models.

  **Sign convention** (sklearn's ``svd_flip(u_based_decision=False)``, sklearn ≥ 1.5): the
  entry of largest ``|d_k|`` over the flattened tree (leaves in ``jax.tree.leaves``
  order, each raveled C-order) is positive, so results are deterministic.

  Leaves of rank ≤ 1 are left out under ``ignore_1d="zero"`` (Li's ``--ignore biasbn``:
  zero direction, and excluded from the Gram matrix and the total variance);
  ``ignore_1d="keep"`` includes them. Li applies no filter normalisation to PCA
  directions; neither does this function, so coordinates are parameter distances.

  Args:
    checkpoints: ``T ≥ 2`` parameter trees of one structure, in training order (the last
      one is the final model).
    n: number of directions, ``1 ≤ n ≤ T − 1``.
    ignore_1d: ``"zero"`` or ``"keep"`` (above).
    center: ``"mean"`` or ``"final"`` (above).
    block_bytes: the most memory for one float64 ``[T, C]`` column block.

  Returns:
    A :class:`PCAResult`.

  Raises:
    ValueError: fewer than 2 checkpoints, ``n`` out of range, checkpoints that differ in
      structure, no leaf selected, or a trajectory spanning fewer than ``n`` dimensions.
    TypeError: ``checkpoints`` is a single tree (a mapping) or not iterable.
  """
  if ignore_1d not in ("zero", "keep"):
    raise ValueError(f"pca_directions: ignore_1d must be 'zero' or 'keep', got {ignore_1d!r}.")
  if center not in ("mean", "final"):
    raise ValueError(f"pca_directions: center must be 'mean' or 'final', got {center!r}.")
  source = _as_source(checkpoints)
  T = len(source)
  if T < 2:
    raise ValueError(f"pca_directions: need at least 2 checkpoints, got {T}.")
  if not 1 <= n <= T - 1:
    raise ValueError(f"pca_directions: n must be between 1 and T − 1 = {T - 1}, got {n}.")
  reader = _Reader(source)
  infos = reader.infos
  used = [
    i
    for i, info in enumerate(infos)
    if jnp.issubdtype(np.dtype(info.dtype), jnp.floating)
    and (len(info.shape) >= 2 or ignore_1d == "keep")
    and int(np.prod(info.shape)) > 0
  ]
  if not used:
    raise ValueError(
      "pca_directions: no leaf selected (only rank ≤ 1 or non-floating leaves; use "
      "ignore_1d='keep' to include rank ≤ 1 leaves)."
    )
  sizes = {i: int(np.prod(infos[i].shape)) for i in used}

  # Column blocks: lists of (leaf, start, stop, offset) segments of at most `cols` columns.
  cols = max(1, int(block_bytes) // (8 * T))
  blocks: list[list[tuple[int, int, int, int]]] = [[]]
  width = 0
  for i in used:
    start = 0
    while start < sizes[i]:
      if width == cols:
        blocks.append([])
        width = 0
      stop = min(sizes[i], start + cols - width)
      blocks[-1].append((i, start, stop, width))
      width += stop - start
      start = stop

  gram = np.zeros((T, T))
  block = None
  for segments in blocks:
    block = np.empty((T, segments[-1][3] + segments[-1][2] - segments[-1][1]))
    for t in range(T):
      leaves = reader.leaves(t)
      for i, start, stop, off in segments:
        block[t, off : off + stop - start] = _flat64(leaves[i])[start:stop]
    block -= block.mean(axis=0) if center == "mean" else block[-1]
    gram += block @ block.T

  lam, u = np.linalg.eigh(gram)
  order = np.argsort(lam)[::-1]
  lam, u = np.clip(lam[order], 0.0, None), u[:, order]
  total = float(np.trace(gram))
  for k in range(n):
    if not lam[k] > 1e-12 * max(lam[0], 0.0) or lam[k] <= 0:
      raise ValueError(
        f"pca_directions: the checkpoints span only {k} dimension(s) "
        f"(eigenvalues {lam[:n].tolist()}); ask for n ≤ {k}."
      )
  sig = np.sqrt(lam[:n])
  uk = u[:, :n]
  a = np.full(T, 1.0 / T) if center == "mean" else np.eye(T)[-1]
  weights = (uk - np.outer(a, uk.sum(axis=0))) / sig  # [T, n], columns sum to 0

  # Directions as per-leaf [n, size] float64 arrays.
  vecs: dict[int, np.ndarray] = {}
  if len(blocks) == 1:
    full = (block.T @ uk) / sig  # [P_used, n]
    for i, start, stop, off in blocks[0]:
      vecs[i] = full[off : off + stop - start].T.copy()
  else:
    vecs = {i: np.zeros((n, sizes[i])) for i in used}
    pivot: dict[int, np.ndarray] = {}
    for t in range(T):
      leaves = reader.leaves(t)
      for i in used:
        x = _flat64(leaves[i])
        if t == 0:
          pivot[i] = x
        else:
          vecs[i] += weights[t][:, None] * (x - pivot[i])[None, :]

  # Re-orthonormalise (modified Gram–Schmidt in float64; a rounding-level correction).
  for k in range(n):
    for j in range(k):
      c = sum(float(vecs[i][k] @ vecs[i][j]) for i in used)
      for i in used:
        vecs[i][k] -= c * vecs[i][j]
    nk = np.sqrt(sum(float(vecs[i][k] @ vecs[i][k]) for i in used))
    for i in used:
      vecs[i][k] /= nk

  # svd_flip on the components: the entry of largest |d_k| (first in flat order) is > 0.
  signs = np.ones(n)
  for k in range(n):
    best, value = -1.0, 0.0
    for i in used:
      j = int(np.argmax(np.abs(vecs[i][k])))
      if abs(vecs[i][k][j]) > best:
        best, value = abs(vecs[i][k][j]), vecs[i][k][j]
    signs[k] = -1.0 if value < 0 else 1.0
  for i in used:
    vecs[i] *= signs[:, None]

  directions = []
  for k in range(n):
    out = []
    for i, info in enumerate(infos):
      dt = _compute_dtype(info.dtype)
      if i in vecs:
        out.append(jnp.asarray(vecs[i][k].reshape(info.shape), dt))
      else:
        out.append(jnp.zeros(info.shape, dt))
    directions.append(jax.tree.unflatten(reader.treedef, out))
  return PCAResult(
    directions=directions,
    explained_variance=lam[:n] / (T - 1),
    explained_variance_ratio=lam[:n] / total,
    singular_values=sig,
    center=center,
    coords=uk * sig * signs,
  )


# ------------------------------------------------------------------------ projection


@jax.jit
def _project_one(
  theta: Any, origin: Any, dirs: list[Any], ainv: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r = jax.tree.map(lambda x, o: _up(x) - _up(o), theta, origin)
  b = jnp.stack([_vdot(r, d) for d in dirs])
  c = ainv.astype(b.dtype) @ b
  res = r
  for k, d in enumerate(dirs):
    res = optax.tree.add_scale(res, -c[k], jax.tree.map(_up, d))
  return c, _norm(r), _norm(res)


def project(
  checkpoints: Iterable[Any], origin: Any, directions: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
  r"""Coordinates of checkpoints in the plane ``origin + span(d_1 … d_n)``, and their
  off-plane residual.

  With ``r_i = θ_i − origin`` and ``D = [d_1 … d_n]``, the coordinates are the
  least-squares solution ``c_i = (DᵀD)⁻¹ Dᵀ r_i``; for orthonormal directions (PCA) this is
  ``c_ik = ⟨θ_i − origin, d_k⟩``, Li et al.'s "cos" projection, and for non-orthogonal
  ones (random filter-normalised directions) it is their "lstsq" method, the grid
  coordinates of ``origin + Σ_k c_ik d_k``. The residual fraction is

  .. math:: \rho_i = \lVert r_i - D c_i \rVert / \lVert r_i \rVert \quad (0 \text{ if } r_i = 0),

  computed from the residual vector itself (not ``‖r‖² − ‖Dc‖²``, which loses half the
  digits). It is the share of the displacement that a 2-D picture cannot show: the loss
  on the plane at ``c_i`` is not the checkpoint's loss unless ``ρ_i ≈ 0`` (loss-landscape
  issue #1). The residual runs over ALL leaves, including those a direction leaves at 0
  (biases under ``ignore_1d="zero"``), since they move off the plane too.

  Li et al. project around the FINAL model (``origin = θ_T``), not the PCA mean; the
  origin is explicit here. Checkpoints are iterated once (a generator is fine); each is
  projected by one compiled function, in ``float32`` or wider.

  Args:
    checkpoints: parameter trees ``θ_0 … θ_{T−1}``.
    origin: the tree at coordinate 0.
    directions: ``n ≥ 1`` linearly independent trees of the same structure.

  Returns:
    ``(coords [T, n], residual_fraction [T])`` as float64 numpy arrays.

  Raises:
    ValueError: no directions, linearly dependent or zero directions, or trees whose
      structure differs from ``origin``.
  """
  dirs = list(directions)
  if not dirs:
    raise ValueError("project: need at least one direction.")
  for k, d in enumerate(dirs):
    jtree.check_same_structure(origin, d, ref_name="origin", other_name=f"directions[{k}]")
  gram = np.array([[float(_vdot(di, dj)) for dj in dirs] for di in dirs], np.float64)
  ev = np.linalg.eigvalsh(gram)
  if not ev[0] > 1e-10 * max(ev[-1], 0.0) or ev[-1] <= 0:
    raise ValueError(
      f"project: the directions are zero or linearly dependent (Gram eigenvalues {ev})."
    )
  ainv = jnp.asarray(np.linalg.inv(gram), _compute_dtype(np.float64))
  coords, fracs = [], []
  for t, theta in enumerate(checkpoints):
    jtree.check_same_structure(origin, theta, ref_name="origin", other_name=f"checkpoint {t}")
    c, rn, resn = _project_one(theta, origin, dirs, ainv)
    rn, resn = float(rn), float(resn)
    coords.append(np.asarray(c, np.float64))
    fracs.append(resn / rn if rn > 0 else 0.0)
  return np.asarray(coords, np.float64).reshape(-1, len(dirs)), np.asarray(fracs, np.float64)
