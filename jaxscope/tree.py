"""Layer names, grouping, selection and output axes of parameter pytrees.

Everything in jaxscope that speaks about "a layer" goes through this module. A pytree
path such as ``(DictKey('Dense_0'), DictKey('kernel'))`` becomes the stable name
``"Dense_0/kernel"``; the same rule covers Flax Linen ``params`` dicts, Flax NNX
``State`` (whose leaves sit behind a trailing ``.value`` attribute, which is dropped),
plain nested dicts, lists, tuples and NamedTuples.

Names are split into a *module path* (``"Dense_0"``) and a *leaf name* (``"kernel"``).
Selection works on the full name with regular expressions (``re.search``), on the
*kind* of a leaf (``"kernel"``, ``"bias"`` or ``"other"``) and on *depth*, which
groups leaves into layers as ikkuna's ``--depth`` did:

* ``depth=None`` (default): every selected leaf is its own group, keyed by its full
  name (``"Dense_0/kernel"``).
* ``depth=-1``: leaves are grouped by their full module path (``"Dense_0"`` holds the
  kernel and the bias).
* ``depth=k >= 1``: leaves are grouped by the first ``k`` components of their module
  path (``"Block_0"`` for ``Block_0/Dense_1/kernel`` at ``depth=1``).

All of this happens at trace time on static tree structure and shapes, so it costs
nothing inside a jitted step.

Flax keeps the output axis of a weight LAST (Dense ``[in, out]``, Conv
``[kh, kw, in, out]``); :func:`output_axes` and :func:`as_matrix` encode that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

__all__ = [
  "BIAS_NAMES",
  "KERNEL_NAMES",
  "Group",
  "Kind",
  "Layout",
  "LeafInfo",
  "as_matrix",
  "check_same_structure",
  "layout",
  "leaf_infos",
  "leaf_kind",
  "output_axes",
  "path_name",
]

Kind = Literal["kernel", "bias", "any"]

#: Leaf names that are weight matrices / kernels whatever their rank.
KERNEL_NAMES = frozenset({"kernel", "weight", "w", "embedding", "W"})
#: Leaf names that are additive biases.
BIAS_NAMES = frozenset({"bias", "b"})
#: Leaf names of normalisation scales (LayerNorm, BatchNorm, RMSNorm): never kernels, even
#: when stacked over layers (rank 2).
SCALE_NAMES = frozenset({"scale"})

# Trailing path entries that carry no naming information (NNX ``Variable.value``).
_TRANSPARENT_ATTRS = frozenset({"value", "raw_value"})


def _key_str(entry: Any) -> str:
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return str(entry.name)
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_name(path: Sequence[Any]) -> str:
  """Returns the stable ``/``-joined name of a pytree key path.

  Dict keys, attribute names and sequence indices are joined with ``/``; a trailing
  ``.value`` (Flax NNX ``Variable``) is dropped, so ``nnx.state(model)`` and the
  equivalent pure dict give the same names.

  Args:
    path: a key path as produced by ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The name, e.g. ``"Dense_0/kernel"``; ``""`` for the root of a bare array.
  """
  entries = list(path)
  while (
    entries
    and isinstance(entries[-1], jax.tree_util.GetAttrKey)
    and entries[-1].name in _TRANSPARENT_ATTRS
  ):
    entries.pop()
  return "/".join(_key_str(e) for e in entries)


def leaf_kind(name: str, shape: Sequence[int]) -> Literal["kernel", "bias", "other"]:
  """Classifies a leaf as ``"kernel"``, ``"bias"`` or ``"other"``.

  A leaf whose last name component is in :data:`KERNEL_NAMES` is a kernel, one in
  :data:`BIAS_NAMES` a bias, one in :data:`SCALE_NAMES` (normalisation scales, also when
  stacked over layers) ``"other"``. Otherwise arrays of rank >= 2 count as kernels and
  everything else (running statistics, scalars) as ``"other"``.
  """
  last = name.rsplit("/", 1)[-1]
  if last in KERNEL_NAMES:
    return "kernel"
  if last in BIAS_NAMES:
    return "bias"
  if last in SCALE_NAMES:
    return "other"
  return "kernel" if len(shape) >= 2 else "other"


def output_axes(name: str, shape: Sequence[int]) -> tuple[int, ...]:
  """Returns the output axes of a leaf, in Flax's convention (output axis last).

  Kernels of rank >= 2 (Dense ``[in, out]``, Conv ``[kh, kw, in, out]``) have their
  output axis last; a bias or other rank-1 leaf is indexed by output unit on axis 0;
  scalars have none.
  """
  del name  # The convention is the same for every Flax layer.
  if len(shape) == 0:
    return ()
  return (len(shape) - 1,)


def as_matrix(x: jax.Array) -> jax.Array:
  """Reshapes a kernel to the matrix ``[fan_in, out]`` that its layer applies.

  Flax keeps the output axis last, so a Dense kernel ``[in, out]`` is returned as is
  and a Conv kernel ``[kh, kw, in, out]`` becomes ``[kh·kw·in, out]``: each column
  is one output filter flattened over its receptive field. (ikkuna reshaped PyTorch's
  ``[out, in, kh, kw]`` to ``[out, in·kh·kw]``, the transpose of the same matrix, so
  singular values agree.) This matrix's spectral norm is *not* the operator norm of
  the convolution over an image, which also depends on the input size.

  Rank-1 arrays become a ``[n, 1]`` column, scalars ``[1, 1]``.
  """
  if x.ndim == 0:
    return x.reshape(1, 1)
  if x.ndim == 1:
    return x.reshape(-1, 1)
  return x.reshape(-1, x.shape[-1])


class LeafInfo(NamedTuple):
  """Static description of one leaf of a pytree."""

  index: int
  """Position in ``jax.tree_util.tree_leaves`` order."""
  name: str
  """Full stable name, e.g. ``"Dense_0/kernel"``."""
  module: str
  """Module path, e.g. ``"Dense_0"`` (``""`` for a top-level leaf)."""
  kind: str
  """``"kernel"``, ``"bias"`` or ``"other"``."""
  shape: tuple[int, ...]
  dtype: Any


def _is_array_like(x: Any) -> bool:
  return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct) or (
    hasattr(x, "shape") and hasattr(x, "dtype")
  )


def leaf_infos(tree: Any, *, argname: str = "tree") -> list[LeafInfo]:
  """Returns a :class:`LeafInfo` for every leaf of ``tree`` in flattening order.

  Args:
    tree: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
    argname: the argument name to use in error messages.

  Raises:
    TypeError: if a leaf is not an array, naming the leaf.
    ValueError: if the tree has no leaves.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    raise ValueError(f"{argname}: the pytree has no array leaves.")
  infos = []
  for i, (path, leaf) in enumerate(flat):
    name = path_name(path)
    if not _is_array_like(leaf):
      raise TypeError(
        f"{argname}: leaf {name or '<root>'!r} is a {type(leaf).__name__}, expected an array "
        "(jax.Array, numpy array or ShapeDtypeStruct)."
      )
    module, _, _ = name.rpartition("/")
    shape = tuple(int(d) for d in leaf.shape)
    infos.append(LeafInfo(i, name, module, leaf_kind(name, shape), shape, leaf.dtype))
  return infos


def check_same_structure(reference: Any, other: Any, *, ref_name: str, other_name: str) -> None:
  """Raises ``ValueError`` naming the first differing leaf if two trees differ.

  Structures must match and leaves must have equal shapes.
  """
  ref_flat, ref_def = jax.tree_util.tree_flatten_with_path(reference)
  oth_flat, oth_def = jax.tree_util.tree_flatten_with_path(other)
  ref_names = [path_name(p) for p, _ in ref_flat]
  oth_names = [path_name(p) for p, _ in oth_flat]
  if ref_def != oth_def:
    missing = [n for n in ref_names if n not in set(oth_names)]
    extra = [n for n in oth_names if n not in set(ref_names)]
    detail = []
    if missing:
      detail.append(f"leaves only in {ref_name}: {missing[:5]}")
    if extra:
      detail.append(f"leaves only in {other_name}: {extra[:5]}")
    raise ValueError(
      f"{other_name} and {ref_name} have different tree structures"
      + (f" ({'; '.join(detail)})" if detail else f": {oth_def} vs {ref_def}")
      + "."
    )
  for name, (_, a), (_, b) in zip(ref_names, ref_flat, oth_flat, strict=True):
    if tuple(a.shape) != tuple(b.shape):
      raise ValueError(
        f"leaf {name!r}: {other_name} has shape {tuple(b.shape)} but {ref_name} has "
        f"{tuple(a.shape)}."
      )


class Group(NamedTuple):
  """A layer: a key and the leaves that make it up."""

  key: str
  leaves: tuple[LeafInfo, ...]


class Layout(NamedTuple):
  """The static grouping of a tree's selected leaves into layers."""

  groups: tuple[Group, ...]
  leaves: tuple[LeafInfo, ...]
  """All leaves of the tree (selected or not), in flattening order."""

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(g.key for g in self.groups)


def _group_key(info: LeafInfo, depth: int | None) -> str:
  if depth is None:
    return info.name
  parts = info.module.split("/") if info.module else []
  if depth == -1 or depth >= len(parts):
    return info.module or info.name
  if depth < 1:
    raise ValueError(f"depth must be None, -1 or a positive integer, got {depth}.")
  return "/".join(parts[:depth])


def _compile(pattern: str | Sequence[str] | None, argname: str) -> list[re.Pattern] | None:
  if pattern is None:
    return None
  pats = [pattern] if isinstance(pattern, str) else list(pattern)
  out = []
  for p in pats:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{argname}: invalid regular expression {p!r}: {e}") from e
  return out


def layout(
  tree: Any,
  *,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  kind: Kind = "any",
  depth: int | None = None,
  argname: str = "tree",
) -> Layout:
  """Selects leaves of ``tree`` and groups them into layers.

  Args:
    tree: a pytree of arrays or ``ShapeDtypeStruct``.
    include: regular expression(s); a leaf is kept if ``re.search`` matches its full
      name for any of them. ``None`` keeps every leaf.
    exclude: regular expression(s); matching leaves are dropped (after ``include``).
    kind: ``"kernel"``, ``"bias"`` or ``"any"`` (see :func:`leaf_kind`).
    depth: grouping depth (see the module docstring).
    argname: the argument name to use in error messages.

  Returns:
    A :class:`Layout`; group order follows the tree's flattening order.

  Raises:
    ValueError: if the selection matches no leaf (the message lists the names there
      are), if a pattern is invalid or ``kind``/``depth`` is not allowed.
  """
  if kind not in ("kernel", "bias", "any"):
    raise ValueError(f"kind must be 'kernel', 'bias' or 'any', got {kind!r}.")
  if depth is not None and (not isinstance(depth, int) or (depth < 1 and depth != -1)):
    raise ValueError(f"depth must be None, -1 or a positive integer, got {depth!r}.")
  inc = _compile(include, "include")
  exc = _compile(exclude, "exclude")
  infos = leaf_infos(tree, argname=argname)
  selected = []
  for info in infos:
    if inc is not None and not any(p.search(info.name) for p in inc):
      continue
    if exc is not None and any(p.search(info.name) for p in exc):
      continue
    if kind != "any" and info.kind != kind:
      continue
    selected.append(info)
  if not selected:
    names = [i.name for i in infos]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise ValueError(
      f"{argname}: the selection include={include!r}, exclude={exclude!r}, kind={kind!r} "
      f"matches no leaf. Leaves are: {shown}."
    )
  groups: dict[str, list[LeafInfo]] = {}
  for info in selected:
    groups.setdefault(_group_key(info, depth), []).append(info)
  return Layout(tuple(Group(k, tuple(v)) for k, v in groups.items()), tuple(infos))
