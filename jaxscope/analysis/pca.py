"""Principal directions of a training trajectory, and projection of checkpoints onto a plane.

* **PCA of a trajectory** (Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss
  Landscape of Neural Nets", NeurIPS 2018, arXiv:1712.09913, §7): the top principal axes of
  the checkpoints ``θ_0 … θ_{T−1}``, computed from the ``T × T`` Gram matrix streamed over
  parameter blocks, never from the ``T × P`` matrix at once.
* **Projection** of checkpoints onto the plane ``origin + span(d_1, …, d_n)``, with the
  fraction of each displacement that lies off the plane (why a trajectory drawn over a PCA
  contour plot does not sit at the losses the checkpoints really had: Li's issue #1).

All functions take parameter pytrees (Flax Linen ``params`` dicts, NNX ``State``, plain
nested dicts) and name leaves with :func:`jaxscope.tree.path_name`. Inner products are
computed in ``float32``, or in the leaf's dtype where that is wider; the PCA itself runs in
``float64`` numpy on the host. Random (filter-normalised) directions are in
:mod:`jaxscope.analysis.directions`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxscope import tree as jtree
from jaxscope.analysis.directions import _compute_dtype, _norm, _up, _vdot

__all__ = [
  "LazyCheckpoints",
  "PCAResult",
  "pca_directions",
  "project",
]

# A column segment of a block: (leaf index, start, stop, offset in the block).
_Segment = tuple[int, int, int, int]


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


def _selected_leaves(infos: Sequence[jtree.LeafInfo], ignore_1d: str) -> list[int]:
  """Indices of the leaves that enter the PCA: floating, non-empty, and of rank ≥ 2 unless
  ``ignore_1d="keep"``."""
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
  return used


def _column_blocks(
  used: Sequence[int], sizes: Mapping[int, int], cols: int
) -> list[list[_Segment]]:
  """Column blocks: lists of ``(leaf, start, stop, offset)`` segments of at most ``cols``
  columns, covering the used leaves in order."""
  blocks: list[list[_Segment]] = [[]]
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
  return blocks


def _gram(
  reader: _Reader, blocks: list[list[_Segment]], T: int, center: str
) -> tuple[np.ndarray, np.ndarray]:
  """``G = Σ_blocks B Bᵀ`` over the centred ``[T, C]`` column blocks ``B``; also returns the
  last centred block (the whole matrix when there is one block)."""
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
  return gram, block


def _top_eigen(gram: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Eigenpairs of the Gram matrix in decreasing order (eigenvalues clipped at 0), checking
  that the top ``n`` are positive."""
  lam, u = np.linalg.eigh(gram)
  order = np.argsort(lam)[::-1]
  lam, u = np.clip(lam[order], 0.0, None), u[:, order]
  for k in range(n):
    if not lam[k] > 1e-12 * max(lam[0], 0.0) or lam[k] <= 0:
      raise ValueError(
        f"pca_directions: the checkpoints span only {k} dimension(s) "
        f"(eigenvalues {lam[:n].tolist()}); ask for n ≤ {k}."
      )
  return lam, u


def _direction_vectors(
  reader: _Reader,
  blocks: list[list[_Segment]],
  block: np.ndarray,
  sizes: Mapping[int, int],
  uk: np.ndarray,
  sig: np.ndarray,
  weights: np.ndarray,
) -> dict[int, np.ndarray]:
  """Directions as per-leaf ``[n, size]`` float64 arrays: ``Bᵀ U Σ⁻¹`` from the one block
  held, or ``Σ_i w_ik (θ_i − θ_0)`` from one more pass over the checkpoints. The keys are
  the used leaves in order (the order of ``sizes``), which later sums follow."""
  if len(blocks) == 1:
    full = (block.T @ uk) / sig  # [P_used, n]
    return {i: full[off : off + stop - start].T.copy() for i, start, stop, off in blocks[0]}
  n = uk.shape[1]
  vecs = {i: np.zeros((n, size)) for i, size in sizes.items()}
  pivot: dict[int, np.ndarray] = {}
  for t in range(weights.shape[0]):
    leaves = reader.leaves(t)
    for i in sizes:
      x = _flat64(leaves[i])
      if t == 0:
        pivot[i] = x
      else:
        vecs[i] += weights[t][:, None] * (x - pivot[i])[None, :]
  return vecs


def _orthonormalize(vecs: dict[int, np.ndarray], n: int) -> None:
  """Modified Gram–Schmidt of the ``n`` directions in float64, in place (a rounding-level
  correction)."""
  for k in range(n):
    for j in range(k):
      c = sum(float(v[k] @ v[j]) for v in vecs.values())
      for v in vecs.values():
        v[k] -= c * v[j]
    nk = np.sqrt(sum(float(v[k] @ v[k]) for v in vecs.values()))
    for v in vecs.values():
      v[k] /= nk


def _flip_signs(vecs: dict[int, np.ndarray], n: int) -> np.ndarray:
  """``svd_flip`` on the components, in place: the entry of largest ``|d_k|`` (first in flat
  order) becomes positive. Returns the signs applied."""
  signs = np.ones(n)
  for k in range(n):
    best, value = -1.0, 0.0
    for v in vecs.values():
      j = int(np.argmax(np.abs(v[k])))
      if abs(v[k][j]) > best:
        best, value = abs(v[k][j]), v[k][j]
    signs[k] = -1.0 if value < 0 else 1.0
  for v in vecs.values():
    v *= signs[:, None]
  return signs


def _as_trees(
  vecs: dict[int, np.ndarray], infos: Sequence[jtree.LeafInfo], treedef: Any, n: int
) -> list[Any]:
  """The ``n`` directions as trees, zero on the leaves left out."""
  directions = []
  for k in range(n):
    out = []
    for i, info in enumerate(infos):
      dt = _compute_dtype(info.dtype)
      if i in vecs:
        out.append(jnp.asarray(vecs[i][k].reshape(info.shape), dt))
      else:
        out.append(jnp.zeros(info.shape, dt))
    directions.append(jax.tree.unflatten(treedef, out))
  return directions


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
  used = _selected_leaves(reader.infos, ignore_1d)
  sizes = {i: int(np.prod(reader.infos[i].shape)) for i in used}
  blocks = _column_blocks(used, sizes, max(1, int(block_bytes) // (8 * T)))

  gram, block = _gram(reader, blocks, T, center)
  lam, u = _top_eigen(gram, n)
  total = float(np.trace(gram))
  sig = np.sqrt(lam[:n])
  uk = u[:, :n]
  a = np.full(T, 1.0 / T) if center == "mean" else np.eye(T)[-1]
  weights = (uk - np.outer(a, uk.sum(axis=0))) / sig  # [T, n], columns sum to 0

  vecs = _direction_vectors(reader, blocks, block, sizes, uk, sig, weights)
  _orthonormalize(vecs, n)
  signs = _flip_signs(vecs, n)
  return PCAResult(
    directions=_as_trees(vecs, reader.infos, reader.treedef, n),
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
