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

Stacked layers (``nn.scan`` / ``nnx.scan`` over ``nnx.vmap``-created blocks) hold every
layer's parameter in one leaf with a leading *stack* axis: ``blocks/attn/query/kernel`` of
shape ``[L, d, heads, head_dim]``. ``stacked={pattern: axis}`` (a regular expression on the
leaf name, ``re.search``, and the stack axis) splits each matching leaf into ``L`` layers
named with the layer index inserted after the path component where the match ends:
``stacked={"^blocks": 0}`` turns it into ``blocks/0/attn/query/kernel`` …
``blocks/{L-1}/attn/query/kernel`` (shape ``[d, heads, head_dim]`` each); if the match
ends in the leaf's own name, the index follows the first component. Selection, kinds and
``depth`` then act on these per-layer names (``depth=2`` groups ``blocks/0``), so every
metric is measured per layer. :func:`stack_axes` reads the mapping from Flax partitioning
metadata (``nn.with_partitioning`` + ``nn.scan(metadata_params=...)``, NNX
``out_sharding`` + ``nnx.vmap(transform_metadata=...)``) where the model declares it.

Flax keeps the output axis of a weight LAST (Dense ``[in, out]``, Conv
``[kh, kw, in, out]``); :func:`output_axes` and :func:`as_matrix` encode that.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

__all__ = [
  "BIAS_NAMES",
  "KERNEL_NAMES",
  "MULTI_OUTPUT_KERNELS",
  "Group",
  "Kind",
  "Layout",
  "LeafInfo",
  "Stacked",
  "as_matrix",
  "check_same_structure",
  "input_axes",
  "layout",
  "leaf_infos",
  "leaf_kind",
  "leaf_value",
  "output_axes",
  "path_name",
  "stack_axes",
  "unstack",
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


#: Kernels whose *first* axis is the input and whose other axes are outputs: the
#: ``DenseGeneral`` projections of multi-head attention (``query``/``key``/``value``
#: ``[d_model, heads, head_dim]``, as ``nn.MultiHeadDotProductAttention`` and
#: ``nnx.MultiHeadAttention`` name them, and the common ``q``/``k``/``v``/``qkv``/
#: ``*_proj``/``wq`` spellings). Every other kernel has its *last* axis as output.
MULTI_OUTPUT_KERNELS = (
  r"(^|/)(query|key|value|q|k|v|qkv|wq|wk|wv|wqkv|q_proj|k_proj|v_proj|qkv_proj)/kernel$",
)


def input_axes(name: str, shape: Sequence[int], rules: Mapping[str, int] | None = None) -> int:
  """The number of leading input axes of a kernel in its matrix view (:func:`as_matrix`).

  ``rules`` (``{pattern: n_in}``, ``re.search`` on ``name``) are checked first, then
  :data:`MULTI_OUTPUT_KERNELS` (``n_in = 1``); otherwise all axes but the last are
  inputs (Dense ``[in, out]``, Conv ``[kh, kw, in, out]``, the attention output
  projection ``[heads, head_dim, d_model]``).

  Args:
    name: the leaf name.
    shape: the leaf shape (of one layer, for stacked leaves).
    rules: user overrides.

  Returns:
    ``n_in`` with ``1 <= n_in <= ndim - 1`` for rank >= 2 (rank < 2: ``ndim``).

  Raises:
    ValueError: a rule gives an ``n_in`` the shape cannot have.
  """
  nd = len(shape)
  if nd < 2:
    return nd
  for pat, n_in in (rules or {}).items():
    if re.search(pat, name):
      if not 1 <= int(n_in) <= nd - 1:
        raise ValueError(
          f"matrix view of {name!r} {tuple(shape)}: rule {pat!r} gives {n_in} input axes; "
          f"expected 1..{nd - 1}."
        )
      return int(n_in)
  if any(re.search(p, name) for p in MULTI_OUTPUT_KERNELS):
    return 1
  return nd - 1


def as_matrix(x: jax.Array, n_in: int | None = None) -> jax.Array:
  """Reshapes a kernel to the matrix ``[fan_in, fan_out]`` that its layer applies.

  The first ``n_in`` axes are the inputs, the rest the outputs (:func:`input_axes`
  decides ``n_in`` from the leaf name; ``None``: all axes but the last, Flax's
  convention). So a Dense kernel ``[in, out]`` is returned as is, a Conv kernel
  ``[kh, kw, in, out]`` becomes ``[kh·kw·in, out]`` (each column one output filter
  flattened over its receptive field), an attention query kernel ``[d, heads, head_dim]``
  (``n_in = 1``) becomes ``[d, heads·head_dim]`` (the operator ``x ↦ x W`` of the
  projection of all heads) and the output projection ``[heads, head_dim, d]`` becomes
  ``[heads·head_dim, d]``. (ikkuna reshaped PyTorch's ``[out, in, kh, kw]`` to
  ``[out, in·kh·kw]``, the transpose of the same matrix, so singular values agree.) A
  Conv matrix's spectral norm is *not* the operator norm of the convolution over an
  image, which also depends on the input size.

  Rank-1 arrays become a ``[n, 1]`` column, scalars ``[1, 1]``.
  """
  if x.ndim == 0:
    return x.reshape(1, 1)
  if x.ndim == 1:
    return x.reshape(-1, 1)
  n_in = x.ndim - 1 if n_in is None else n_in
  rows = 1
  for d in x.shape[:n_in]:
    rows *= int(d)
  return x.reshape(rows, -1)


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
  """The leaf's shape; for one layer of a stacked leaf, the shape of that slice."""
  dtype: Any
  stack: tuple[int, int] | None = None
  """``(axis, i)`` when this is layer ``i`` of a leaf stacked along ``axis`` (see
  :func:`unstack`), else ``None``."""


def leaf_value(leaves: Sequence[Any], info: LeafInfo) -> Any:
  """The array ``info`` describes: ``leaves[info.index]``, or its slice for a stacked layer.

  A stacked layer's slice is a static ``lax.index_in_dim`` (no copy inside a fused
  reduction).
  """
  x = leaves[info.index]
  if info.stack is None:
    return x
  axis, i = info.stack
  return jax.lax.index_in_dim(x, i, axis, keepdims=False)


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


#: ``{regular expression on leaf names: stack axis}``; see the module docstring.
Stacked = Mapping[str, int]


def _stack_rules(stacked: Stacked | None, argname: str) -> list[tuple[str, re.Pattern, int]]:
  if stacked is None:
    return []
  if not isinstance(stacked, Mapping):
    raise TypeError(
      f"{argname}: stacked must be a mapping {{regular expression: stack axis}}, "
      f"got {type(stacked).__name__}."
    )
  rules = []
  for pat, axis in stacked.items():
    if not isinstance(axis, int | np.integer) or isinstance(axis, bool):
      raise TypeError(f"{argname}: stacked[{pat!r}] must be an int axis, got {axis!r}.")
    (compiled,) = _compile(pat, "stacked")  # type: ignore[misc]
    rules.append((pat, compiled, int(axis)))
  return rules


def _stacked_name(name: str, match_end: int, i: int) -> str:
  """``name`` with the layer index ``i`` inserted after the component where a match ends."""
  if match_end > 0 and name[match_end - 1] == "/":
    match_end -= 1  # A match ending with the separator ends in the component before it.
  parts = name.split("/")
  ends, pos = [], 0
  for p in parts:
    pos += len(p)
    ends.append(pos)
    pos += 1  # The separator.
  at = next(k for k, e in enumerate(ends) if match_end <= e)
  if at >= len(parts) - 1:
    at = 0
  return "/".join([*parts[: at + 1], str(i), *parts[at + 1 :]])


def unstack(
  infos: Sequence[LeafInfo],
  stacked: Stacked | None,
  *,
  argname: str = "tree",
  strict: bool = True,
) -> list[LeafInfo]:
  """Splits the leaves matching ``stacked`` into one :class:`LeafInfo` per layer.

  Args:
    infos: the leaves (:func:`leaf_infos`).
    stacked: ``{pattern: axis}``; the first pattern whose ``re.search`` matches a leaf
      name decides its stack axis (negative axes count from the end). ``None`` or ``{}``
      returns ``infos`` unchanged.
    argname: the argument name to use in error messages.
    strict: raise if a pattern matches no leaf.

  Returns:
    The leaves with every stacked leaf replaced by its ``L`` layers (name with the
    layer index, shape without the stack axis, kind of the slice, ``stack=(axis, i)``).

  Raises:
    ValueError: a pattern matches no leaf (with ``strict``), or a matching leaf has no
      such axis.
  """
  rules = _stack_rules(stacked, argname)
  if not rules:
    return list(infos)
  used = set()
  out = []
  for info in infos:
    hit = next(((p, m, a) for p, c, a in rules if (m := c.search(info.name))), None)
    if hit is None or info.stack is not None:
      out.append(info)
      continue
    pat, match, axis = hit
    used.add(pat)
    nd = len(info.shape)
    if not -nd <= axis < nd:
      raise ValueError(
        f"{argname}: leaf {info.name!r} of shape {info.shape} matches stacked pattern "
        f"{pat!r} but has no axis {axis}."
      )
    axis %= nd
    shape = info.shape[:axis] + info.shape[axis + 1 :]
    for i in range(info.shape[axis]):
      name = _stacked_name(info.name, match.end(), i)
      module, _, _ = name.rpartition("/")
      kind = leaf_kind(name, shape)
      out.append(LeafInfo(info.index, name, module, kind, shape, info.dtype, (axis, i)))
  unused = [p for p, _, _ in rules if p not in used]
  if unused and strict:
    names = [i.name for i in infos]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise ValueError(f"{argname}: stacked pattern(s) {unused} match no leaf. Leaves are: {shown}.")
  return out


def _names_of(meta: Any) -> tuple[Any, ...] | None:
  """The logical axis names of a boxed Flax leaf (Linen ``Partitioned``, NNX ``Variable``)
  or of a ``PartitionSpec``."""
  if isinstance(meta, jax.sharding.PartitionSpec):
    return tuple(meta)
  names = getattr(meta, "names", None)
  if names is None and hasattr(meta, "get_metadata"):
    md = meta.get_metadata()
    names = md.get("out_sharding", md.get("sharding_names", md.get("sharding")))
  return tuple(names) if names is not None else None


def _is_boxed(x: Any) -> bool:
  return (
    hasattr(x, "unbox") or hasattr(x, "get_metadata") or isinstance(x, jax.sharding.PartitionSpec)
  )


def stack_axes(tree: Any, axis_name: str = "layers") -> dict[str, int]:
  """The ``stacked`` mapping declared by Flax partitioning metadata.

  Reads the logical axis names of boxed leaves: Linen ``nn.Partitioned`` (from
  ``nn.with_partitioning``, with ``nn.scan(..., metadata_params={nn.PARTITION_NAME:
  axis_name})`` adding the stack axis) and NNX ``Variable`` metadata
  (``out_sharding``, with ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME:
  axis_name})``). Call it on the *boxed* variables (``model.init(...)["params"]`` before
  ``nn.unbox``, or ``nnx.state(model, nnx.Param)``), or on a tree of ``PartitionSpec``
  of logical names (``nn.get_partition_spec(boxed)``, the zoo's ``ModelDef.param_axes``).
  Leaves without names are not stacked; without such metadata, declare ``stacked``
  yourself.

  Each stacked leaf gets the pattern of its shortest module prefix under which every
  leaf is stacked along the same axis (the scanned module), e.g. ``{"^blocks/": 0}``.

  Args:
    tree: a pytree whose leaves may be boxed with axis names.
    axis_name: the logical name of the stack axis.

  Returns:
    ``{pattern: axis}`` for :func:`layout` / ``scope(stacked=...)``; ``{}`` if no leaf
    names ``axis_name``.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_boxed)[0]
  axes: dict[str, int | None] = {}
  for path, leaf in flat:
    names = _names_of(leaf) if _is_boxed(leaf) else None
    axis = names.index(axis_name) if names is not None and axis_name in names else None
    axes[path_name(path)] = axis
  out: dict[str, int] = {}
  for name, axis in axes.items():
    if axis is None or any(re.search(p, name) for p in out):
      continue
    parts = name.split("/")
    for k in range(1, len(parts)):
      prefix = "/".join(parts[:k]) + "/"
      under = [a for n, a in axes.items() if n.startswith(prefix)]
      if all(a == axis for a in under):
        out["^" + re.escape(prefix)] = axis
        break
    else:
      out["^" + re.escape(name) + "$"] = axis
  return out


class Group(NamedTuple):
  """A layer: a key and the leaves that make it up."""

  key: str
  leaves: tuple[LeafInfo, ...]


class Layout(NamedTuple):
  """The static grouping of a tree's selected leaves into layers."""

  groups: tuple[Group, ...]
  leaves: tuple[LeafInfo, ...]
  """All leaves of the tree (selected or not), in flattening order; stacked leaves
  appear as their layers."""

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
  stacked: Stacked | None = None,
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
    stacked: ``{pattern: axis}`` splitting stacked leaves into layers (see the module
      docstring and :func:`unstack`); selection and grouping see the per-layer names.
    argname: the argument name to use in error messages.

  Returns:
    A :class:`Layout`; group order follows the tree's flattening order (layers of a
    stacked leaf in index order at its place).

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
  infos = unstack(leaf_infos(tree, argname=argname), stacked, argname=argname)
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
