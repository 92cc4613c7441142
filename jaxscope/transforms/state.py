"""Finding a transformation's state inside any optimizer state."""

from __future__ import annotations

from typing import Any, TypeVar

import jax

__all__ = ["find_state"]

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
