"""Finding a transformation's state inside any optimizer state."""

from __future__ import annotations

from typing import Any, TypeVar

import jax

__all__ = ["find_state", "find_states", "state_names"]

T = TypeVar("T")


def find_state(opt_state: Any, cls: type[T], *, caller: str, what: str | None = None) -> T | None:
  """The one ``cls`` (a NamedTuple state) inside ``opt_state``, or ``None``.

  Searches the whole pytree, so the state is found inside ``optax.chain``,
  ``named_chain``, ``inject_hyperparams``, ``MultiSteps``, a ``monitored`` wrapper or an
  ``nnx.Optimizer``'s ``opt_state``. Usable inside ``jit`` (it reads structure only).

  Raises:
    ValueError: if the state holds several, naming ``caller`` and ``what`` (default the
      class name).
  """
  found = [
    x
    for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
    if isinstance(x, cls)
  ]
  if len(found) > 1:
    raise ValueError(
      f"{caller}: the optimizer state holds {len(found)} {what or cls.__name__ + 's'}; "
      "expected one."
    )
  return found[0] if found else None


def find_states(opt_state: Any, cls: type[T]) -> list[tuple[tuple[Any, ...], T]]:
  """Every ``cls`` state inside ``opt_state`` with its key path, in tree order."""
  return [
    (tuple(path), x)
    for path, x in jax.tree_util.tree_flatten_with_path(
      opt_state, is_leaf=lambda x: isinstance(x, cls)
    )[0]
    if isinstance(x, cls)
  ]


def state_names(paths: list[tuple[Any, ...]], *, caller: str) -> list[str]:
  """A name per state for reading several at once: the dict keys on its path (the
  ``optax.multi_transform`` partition label, the ``named_chain`` name), joined with
  ``/``, else ``{i}`` by position.

  Raises:
    ValueError: if two states get the same name, naming ``caller``.
  """
  names = []
  for i, path in enumerate(paths):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    names.append("/".join(keys) or str(i))
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"{caller}: several states would be named {', '.join(map(repr, dup))}.")
  return names
