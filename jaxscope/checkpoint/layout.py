"""Where a checkpoint keeps the parameters: :class:`CheckpointLayout`, found in the items'
metadata trees or given (``item=``, ``params_key=``, ``model_state_key=`` of
:class:`~jaxscope.checkpoint.RunCheckpoints`), and the paths of the pieces read back.

jaxscope's runs save an item ``state`` (the whole :class:`~jaxscope.train.TrainState`:
``params``, ``model_state``, …) and a JSON item ``meta``; a loop of one's own saves what it
likes (``docs/checkpoints.md``).

>>> find_layout({"default": {"params": {"w": 0}, "opt_state": {}}}, False, "here")
CheckpointLayout(item='default', params='params', model_state=None, meta=False)
>>> find_layout({"state": {"params": {}, "model_state": {}}}, True, "here").model_state
'model_state'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax

__all__ = [
  "CHECKPOINT_DIR",
  "CheckpointLayout",
  "CheckpointLayoutError",
  "collections_of",
  "describe_keys",
  "find_layout",
  "item_names",
  "parse_key",
  "subtree",
  "walk",
]

#: The checkpoints' folder inside a run directory (see :mod:`jaxscope.run`).
CHECKPOINT_DIR = "checkpoints"


class CheckpointLayout(NamedTuple):
  """Where a checkpoint directory keeps the parameters (:attr:`RunCheckpoints.layout`).

  jaxscope's own runs: ``CheckpointLayout("state", "params", "model_state", True)``; a
  loop that saves ``StandardSave({"params": …, "opt_state": …})`` as the only item:
  ``CheckpointLayout("default", "params", None, False)``.
  """

  item: str
  """The orbax item that holds them (``"state"``; ``"default"`` for an unnamed item)."""
  params: str
  """The ``/``-separated path of the params subtree in the item (``""``: the item itself)."""
  model_state: str | None
  """The path of the non-params collections, ``None`` when there are none: a dict
  ``{collection: tree}`` (jaxscope's ``model_state``), or, for a path ending in
  ``batch_stats``, that one collection (restored as ``{"batch_stats": tree}``)."""
  meta: bool
  """Whether the steps have a JSON item ``meta`` (else their metadata is ``{"step": step}``)."""


class CheckpointLayoutError(ValueError):
  """The checkpoints do not hold the parameters where :class:`RunCheckpoints` looks."""


_OWN_LAYOUT = (
  "jaxscope's own layout is an item 'state' holding 'params' and 'model_state', and a JSON "
  "item 'meta'"
)


def parse_key(key: str | None, arg: str) -> tuple[str, ...] | None:
  """``"a/b"`` → ``("a", "b")``; ``""`` or ``"."`` → ``()`` (the item); ``None`` stays."""
  if key is None:
    return None
  if not isinstance(key, str):
    raise ValueError(f"RunCheckpoints: {arg} must be a '/'-separated path string, got {key!r}.")
  return tuple(p for p in key.strip().split("/") if p.strip() not in ("", "."))


def walk(tree: Any, parts: Sequence[str]) -> tuple[tuple, Any] | None:
  """``(key path, subtree)`` of ``parts`` in ``tree`` (digits index lists), ``None`` if absent."""
  path: list[Any] = []
  for part in parts:
    if isinstance(tree, Mapping) and part in tree:
      path.append(jax.tree_util.DictKey(part))
      tree = tree[part]
    elif isinstance(tree, list | tuple) and part.isdigit() and int(part) < len(tree):
      path.append(jax.tree_util.SequenceKey(int(part)))
      tree = tree[int(part)]
    else:
      return None
  return (tuple(path), tree) if tree is not None else None


def describe_keys(tree: Any) -> str:
  """The top-level keys of a metadata tree, for messages (``"['opt_state', 'params']"``)."""
  if isinstance(tree, Mapping):
    return str(sorted(tree))
  return f"a {type(tree).__name__}" if tree is not None else "no pytree"


def _nested_params(tree: Any, depth: int = 3, prefix: str = "") -> list[str]:
  """Paths of the subtrees named ``params`` below the top level (for the error's hint)."""
  if depth == 0 or not isinstance(tree, Mapping):
    return []
  found = []
  for key, sub in tree.items():
    path = f"{prefix}{key}"
    if key == "params" and prefix:
      found.append(path)
    found += _nested_params(sub, depth - 1, path + "/")
  return found


def _choose_item(trees: Mapping[str, Any], item: str | None, params: tuple, where: str) -> str:
  names = sorted(trees)
  if item is not None:
    if item not in trees:
      raise CheckpointLayoutError(
        f"RunCheckpoints: item={item!r} is not in the checkpoints of {where}; their items "
        f"are {names}."
      )
    return item
  if "state" in trees:
    return "state"
  others = [n for n in names if n != "meta"]
  holding = [n for n in others if walk(trees[n], params) is not None]
  if len(others) == 1 or len(holding) == 1:
    return others[0] if len(others) == 1 else holding[0]
  raise CheckpointLayoutError(
    f"RunCheckpoints: the checkpoints of {where} have the items {names}, and {len(holding)} "
    f"of them hold {'/'.join(params) or 'a tree'!r} {holding}; choose one with item=NAME "
    "(jaxscope analyze --item NAME)."
  )


def find_layout(
  trees: Mapping[str, Any],
  has_meta: bool,
  where: str,
  item: str | None = None,
  params_key: str | None = None,
  model_state_key: str | None = None,
) -> CheckpointLayout:
  """The layout of one step's items (``{name: metadata tree}``) as asked or auto-detected.

  Raises:
    CheckpointLayoutError: saying what was found, what was expected and how to choose.
  """
  given = parse_key(params_key, "params_key")
  params = ("params",) if given is None else given
  name = _choose_item(trees, item, params, where)
  tree = trees[name]
  found = walk(tree, params)
  if found is None:
    nested = _nested_params(tree)
    hint = f" ({', '.join(map(repr, nested))} holds a 'params' subtree)" if nested else ""
    raise CheckpointLayoutError(
      f"RunCheckpoints: no parameters at {'/'.join(params) or 'the item itself'!r} of item "
      f"{name!r} in {where}: the item holds {describe_keys(tree)}{hint} (items: {sorted(trees)}; "
      f"{_OWN_LAYOUT}). Say where the parameters are with params_key='path/to/params' "
      "(jaxscope analyze --params-key PATH; '' when the item itself is the params tree) "
      "and item=NAME (--item NAME) for another item."
    )
  if model_state_key is not None and model_state_key.strip().lower() == "none":
    state = None
  elif model_state_key is not None:
    state = parse_key(model_state_key, "model_state_key")
    if walk(tree, state) is None:
      raise CheckpointLayoutError(
        f"RunCheckpoints: model_state_key={model_state_key!r} is not in item {name!r} of "
        f"{where}, which holds {describe_keys(tree)}; pass a path in it, or 'none'."
      )
  else:
    beside = [(*params[:-1], k) for k in ("model_state", "batch_stats")] if params else []
    state = next((p for p in beside if walk(tree, p) is not None), None)
  if state is not None and (state[: len(params)] == params or params[: len(state)] == state):
    raise CheckpointLayoutError(
      f"RunCheckpoints: the params ({'/'.join(params)!r}) and model state "
      f"({'/'.join(state)!r}) of {where} overlap; give paths to separate subtrees."
    )
  return CheckpointLayout(
    name, "/".join(params), None if state is None else "/".join(state), has_meta
  )


def collections_of(tree: Any, layout: CheckpointLayout) -> dict[str, tuple[tuple, Any, str | None]]:
  """``{collection: (key path in the item, metadata subtree, wrapping name or None)}`` of
  one step's item tree; a collection the step lacks is missing from the dict."""
  out = {}
  paths = {"params": layout.params, "model_state": layout.model_state}
  for collection, key in paths.items():
    if key is None:
      continue
    parts = parse_key(key, collection) or ()
    found = walk(tree, parts)
    if found is not None:
      wrap = (
        "batch_stats" if collection == "model_state" and parts[-1:] == ("batch_stats",) else None
      )
      out[collection] = (*found, wrap)
  return out


def subtree(tree: Any, path: tuple) -> Any:
  """The subtree of a restored tree at a key path of :func:`walk`."""
  for key in path:
    tree = tree[key.key if isinstance(key, jax.tree_util.DictKey) else key.idx]
  return tree


def item_names(directory: Path) -> list[str]:
  """The orbax items on disk: folders of the step folders (``state``, ``meta``, ``default``)."""
  names: set[str] = set()
  for step in directory.iterdir() if directory.is_dir() else ():
    if step.is_dir() and step.name.isdigit():
      names |= {
        p.name
        for p in step.iterdir()
        if p.is_dir() and p.name[:1] not in "_." and ".orbax-checkpoint-tmp" not in p.name
      }
  return sorted(names)
