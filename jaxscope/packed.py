"""Packed values: a read-only mapping of named arrays held as one array per dtype and shape.

A scope measures dozens to hundreds of scalars per step (``grads/norm/Dense_0/kernel``,
…). Kept as a dict, each is a leaf of the optimizer state and of the step's outputs, and
every leaf of a jitted call's arguments and results costs its dispatch a few µs on
XLA:CPU (about 5 µs per donated leaf, measured: 80 scalar values carried in the state and
returned cost a 0.2 ms step 0.36 ms more). :class:`PackedValues` keeps the same mapping
as one stacked array per ``(dtype, shape)`` group (usually one ``float32[n]`` and one
``bool[1]``): two leaves instead of eighty. Inside ``jit`` the stacking and the reads are
slices and concatenations that XLA fuses into the step.

It is a :class:`collections.abc.Mapping` (``values["loss"]``, ``dict(values)``, ``in``,
iteration in insertion order) and a pytree whose leaves are the group arrays, so it passes
through ``jit``, ``lax.cond``/``scan``, ``jax.device_get`` and orbax unchanged. Read it on
the host after one transfer: ``jax.device_get(values)`` fetches the few group arrays, then
each entry is a numpy view. Reading entries of a device-side instance one by one
dispatches one slice per entry (``dict(values)`` on device arrays: 80 small calls).

Arrays stacked by ``lax.scan`` or ``vmap`` gain leading axes; an entry is read along the
group's member axis, so ``values["loss"]`` of a scan's output has the leading ``[T]``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxscope.packed import PackedValues
  >>> v = PackedValues.pack({"loss": jnp.float32(0.5), "norm": jnp.float32(2.0),
  ...                        "hist": jnp.zeros(4)})
  >>> len(jax.tree.leaves(v)), sorted(v)
  (2, ['hist', 'loss', 'norm'])
  >>> float(jax.jit(lambda v: v["norm"] * 2)(v))
  4.0
  >>> host = jax.device_get(v | {"measured": jnp.bool_(True)})
  >>> bool(host["measured"]), float(host["loss"])
  (True, 0.5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PackedValues", "unpack"]

_SHOWN = 6  # Entries shown by repr().


class _Group(NamedTuple):
  """One stacked array: its entries' dtype and shape, and their keys in member order
  (``None`` for a member :meth:`PackedValues.without` hid: still stored, not an entry)."""

  dtype: str
  shape: tuple[int, ...]
  keys: tuple[str | None, ...]

  def name(self) -> str:
    """The group's key in the pytree (and orbax's parameter name): ``float32``,
    ``float32_16`` or ``int32_4x2``."""
    return self.dtype if not self.shape else f"{self.dtype}_{'x'.join(map(str, self.shape))}"


def _dtype_shape(x: Any) -> tuple[str, tuple[int, ...]]:
  return np.dtype(jnp.result_type(x)).name, tuple(int(d) for d in np.shape(x))


def _grouped(mapping: Mapping[str, Any]) -> tuple[_Group, ...]:
  """Groups the keys by ``(dtype, shape)``, groups in order of their first key."""
  members: dict[tuple[str, tuple[int, ...]], list[str]] = {}
  for key, value in mapping.items():
    if not isinstance(key, str):
      raise TypeError(f"PackedValues: keys must be str, got {key!r} ({type(key).__name__}).")
    members.setdefault(_dtype_shape(value), []).append(key)
  return tuple(_Group(d, s, tuple(ks)) for (d, s), ks in members.items())


def _stack(group: _Group, mapping: Mapping[str, Any]) -> jax.Array:
  def member(k: str | None) -> jax.Array:
    if k is None:  # A hidden member of ``like``'s layout: kept as zeros.
      return jnp.zeros(group.shape, group.dtype)
    return jnp.asarray(mapping[k], group.dtype)

  if len(group.keys) == 1:  # A reshape, not a concatenation.
    return member(group.keys[0])[None]
  return jnp.stack([member(k) for k in group.keys])


@jax.tree_util.register_pytree_with_keys_class
class PackedValues(Mapping[str, Any]):
  """A read-only ``{key: array}`` mapping stored as one stacked array per (dtype, shape).

  Build one with :meth:`pack`; see the module docstring.
  """

  __slots__ = ("_arrays", "_groups", "_index", "_order")

  def __init__(
    self, groups: tuple[_Group, ...], arrays: tuple[Any, ...], order: tuple[str, ...]
  ) -> None:
    # Private: use pack(). ``order`` is the mapping's key order (groups regroup it).
    self._groups = groups
    self._arrays = tuple(arrays)
    self._order = order
    self._index: dict[str, tuple[int, int, int]] | None = None

  @classmethod
  def pack(cls, mapping: Mapping[str, Any], like: PackedValues | None = None) -> PackedValues:
    """Packs a mapping of arrays (or numbers), grouped by dtype and shape.

    Args:
      mapping: ``{str: array}``; works inside ``jit`` (the stacking is traced).
      like: a packed mapping whose layout (keys, groups, dtypes) to reproduce: the values
        are cast to its dtypes, so that e.g. ``lax.cond`` branches and a state updated
        in place keep the structure ``init`` built.

    Raises:
      TypeError: a key is not a str.
      ValueError: with ``like``, the keys differ, or a value's shape differs.
    """
    if isinstance(mapping, PackedValues) and like is None:
      return mapping
    if like is None:
      groups = _grouped(mapping)
      order = tuple(mapping)
    else:
      if set(mapping) != set(like._order):
        extra = sorted(set(mapping) - set(like._order))[:3]
        gone = sorted(set(like._order) - set(mapping))[:3]
        raise ValueError(
          f"PackedValues.pack: the keys differ from like's (new: {extra}; missing: {gone})."
        )
      groups, order = like._groups, like._order
      for g in groups:
        for k in g.keys:
          if k is not None and tuple(np.shape(mapping[k])) != g.shape:
            raise ValueError(
              f"PackedValues.pack: {k!r} has shape {tuple(np.shape(mapping[k]))}, like's "
              f"has {g.shape}."
            )
    return cls(groups, tuple(_stack(g, mapping) for g in groups), order)

  # Mapping.
  def _lookup(self) -> dict[str, tuple[int, int, int]]:
    if self._index is None:
      self._index = {
        k: (gi, i, len(g.shape))
        for gi, g in enumerate(self._groups)
        for i, k in enumerate(g.keys)
        if k is not None
      }
    return self._index

  def __getitem__(self, key: str) -> Any:
    gi, i, ndim = self._lookup()[key]
    # The member axis is the one before the entry's own axes (scan/vmap add axes in front).
    return self._arrays[gi][(Ellipsis, i, *(slice(None),) * ndim)]

  def __contains__(self, key: object) -> bool:
    return key in self._lookup()

  def __iter__(self) -> Iterator[str]:
    return iter(self._order)

  def __len__(self) -> int:
    return len(self._order)

  def __repr__(self) -> str:
    groups = ", ".join(f"{g.name()}[{len(g.keys)}]" for g in self._groups)
    head = f"PackedValues({len(self)} entries in {len(self._groups)} arrays: {groups}"
    if any(isinstance(a, jax.core.Tracer) for a in self._arrays):
      return head + ")"
    # A few entries, read on the host (one transfer): what a dict's repr would start with.
    host = jax.device_get(self)
    shown = [f"{k!r}: {_short(np.asarray(host[k]))}" for k in self._order[:_SHOWN]]
    more = ", …" if len(self) > _SHOWN else ""
    return head + "; " + ", ".join(shown) + more + ")"

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """Each entry's shape (leading scan/vmap axes included), read without slicing."""
    out: dict[str, tuple[int, ...]] = {}
    for g, a in zip(self._groups, self._arrays, strict=True):
      lead = tuple(np.shape(a))[: np.ndim(a) - len(g.shape) - 1]
      out.update((k, (*lead, *g.shape)) for k in g.keys if k is not None)
    return {k: out[k] for k in self._order}

  # Building new ones without unstacking.
  def __or__(self, other: Mapping[str, Any]) -> PackedValues:
    """``self | other``: the entries of both, ``other``'s winning on a shared key.

    Disjoint keys keep this mapping's arrays as they are and add ``other``'s groups (no
    slicing); a shared key repacks the union.
    """
    if not isinstance(other, Mapping):
      return NotImplemented
    if any(k in self for k in other):
      return PackedValues.pack({**unpack(self), **unpack(other)})
    other = PackedValues.pack(other)
    return PackedValues(
      self._groups + other._groups, self._arrays + other._arrays, self._order + other._order
    )

  def prefixed(self, prefix: str) -> PackedValues:
    """The same arrays with every key ``k`` renamed ``prefix + k``."""
    return self.renamed(lambda k: prefix + k)

  def renamed(self, fn: Callable[[str], str]) -> PackedValues:
    """The same arrays with every key ``k`` renamed ``fn(k)`` (names must stay distinct)."""
    order = tuple(fn(k) for k in self._order)
    if len(set(order)) != len(order):
      raise ValueError("PackedValues.renamed: two keys got the same name.")
    groups = tuple(
      g._replace(keys=tuple(None if k is None else fn(k) for k in g.keys)) for g in self._groups
    )
    return PackedValues(groups, self._arrays, order)

  def without(self, *keys: str) -> PackedValues:
    """The entries but ``keys`` (absent ones ignored), on the same arrays: a dropped entry
    stays in its array, hidden (no slicing, so it is cheap on device arrays too)."""
    drop = {k for k in keys if k in self}
    if not drop:
      return self
    groups = tuple(
      g._replace(keys=tuple(None if k in drop else k for k in g.keys)) for g in self._groups
    )
    return PackedValues(groups, self._arrays, tuple(k for k in self._order if k not in drop))

  # Pytree.
  def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], Any]:
    names = [g.name() for g in self._groups]
    # Groups joined by ``|`` may share a dtype and shape: number the repeats (orbax and
    # other path users need distinct names).
    names = [
      n if names[:i].count(n) == 0 else f"{n}_{names[:i].count(n)}" for i, n in enumerate(names)
    ]
    keys = [jax.tree_util.DictKey(n) for n in names]
    return list(zip(keys, self._arrays, strict=True)), (self._groups, self._order)

  def tree_flatten(self) -> tuple[tuple[Any, ...], Any]:
    return self._arrays, (self._groups, self._order)

  @classmethod
  def tree_unflatten(cls, aux: Any, children: Any) -> PackedValues:
    groups, order = aux
    return cls(groups, tuple(children), order)


def _short(a: np.ndarray) -> str:
  return repr(a.item()) if a.ndim == 0 else np.array2string(a, threshold=6)


def unpack(values: Mapping[str, Any]) -> dict[str, Any]:
  """A plain dict of a mapping's entries (one slice per entry of a :class:`PackedValues`).

  On the host, transfer first (``unpack(jax.device_get(values))``) so that the slices are
  numpy views rather than one device call each.
  """
  return {k: values[k] for k in values}
