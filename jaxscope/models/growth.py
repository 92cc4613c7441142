"""Dynamic network capacity: grow a layer on an error plateau, freeze what was trained.

The method of the dynamic-network-capacity thesis (2017), as pure functions of the
model's ``capacity`` collection (:mod:`jaxscope.models.capacity`), so a jitted train step
expands without recompiling:

1. the moving average of the training error (here: the value passed, e.g. the loss) is
   tracked by :func:`jaxscope.transforms.plateau_update`; after an expansion it is started
   afresh (:func:`jaxscope.transforms.capacity.plateau_restart`) and a ``cooldown`` gives
   the new chunk time to train before the next plateau can be signalled;
2. when it has not improved for ``patience`` steps (a plateau), the next chunk of a
   capacity layer is activated: of **every** layer that has room (``policy="all"``, as the
   thesis did), or of the one whose activations have the highest standard deviation
   (``policy="activation-std"``, the thesis's proposal after He et al.'s residual
   analysis);
3. the chunks trained so far are frozen (``frozen = old active``), so the new chunk
   learns the residual mistakes of the old ones: feed :func:`trainable` to
   :func:`jaxscope.transforms.masked_freeze` (the output layer's bias keeps training by
   default, ``keep=``);
4. the new chunk is re-initialised for its active fan-in
   (:func:`jaxscope.models.capacity.reinit_chunk`), or keeps the weights the full-width
   initialisation drew for it (``reinit=False``, as the thesis).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxscope.models import capacity as cap, growth
  >>> model = cap.CapacityMLP(widths=(8,), chunks=4, num_outputs=1)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 3)))
  >>> state = growth.growth_init(variables["params"], variables["capacity"])
  >>> params, capacity, state = growth.growth_update(
  ...   state, value=1.0, params=variables["params"], capacity=variables["capacity"],
  ...   key=jax.random.key(1), patience=1)
  >>> growth.growth_values(state, capacity)["capacity/active/CapacityDense_0"].item()
  1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxscope import tree as jtree
from jaxscope.models import capacity as cap
from jaxscope.transforms.capacity import (
  PlateauState,
  plateau_init,
  plateau_restart,
  plateau_update,
)

__all__ = [
  "POLICIES",
  "GrowthState",
  "activation_std",
  "growth_init",
  "growth_update",
  "growth_values",
  "set_active",
  "trainable",
]

POLICIES = ("all", "activation-std")


class GrowthState(NamedTuple):
  """State of the growth controller; fixed structure from :func:`growth_init` on."""

  plateau: PlateauState
  frozen: dict[str, jax.Array]
  """``int32`` per capacity layer: the number of oldest chunks that no longer train."""
  expansions: jax.Array
  """``int32``: plateaus that grew at least one layer."""
  expanded: jax.Array
  """``bool``: whether the last update grew a layer (the event to log)."""
  grown: dict[str, jax.Array]
  """``bool`` per capacity layer: whether the last update grew it."""


def _active(capacity: Any) -> dict[str, jax.Array]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(capacity)[0]:
    name = jtree.path_name(path)
    module, _, var = name.rpartition("/")
    if var == "active":
      out[module] = jnp.asarray(leaf, jnp.int32)
  return out


def set_active(capacity: Any, active: Mapping[str, jax.Array]) -> Any:
  """``capacity`` with ``capacity[layer]['active']`` replaced for the layers in ``active``."""

  def replace(path: Any, leaf: Any) -> Any:
    module, _, var = jtree.path_name(path).rpartition("/")
    if var == "active" and module in active:
      return jnp.asarray(active[module], jnp.int32).reshape(jnp.shape(leaf))
    return leaf

  return jax.tree_util.tree_map_with_path(replace, capacity)


def growth_init(params: Any, capacity: Any, *, cooldown: int = 0) -> GrowthState:
  """The initial state: nothing frozen, no plateau seen.

  ``cooldown``: steps at the start during which no plateau is counted or signalled, as
  after an expansion (the first chunk, too, needs time to train); pass the ``cooldown`` of
  :func:`growth_update`. 0 (the default): the first plateau may come at step ``patience``.
  """
  if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
    raise ValueError(f"growth_init: cooldown must be a non-negative integer, got {cooldown!r}.")
  layers = cap.capacity_layers(params, capacity)
  zero = {k: jnp.zeros((), jnp.int32) for k in layers}
  return GrowthState(
    plateau=plateau_init()._replace(cooldown=jnp.asarray(cooldown, jnp.int32)),
    frozen=zero,
    expansions=jnp.zeros((), jnp.int32),
    expanded=jnp.zeros((), jnp.bool_),
    grown={k: jnp.zeros((), jnp.bool_) for k in layers},
  )


def trainable(params: Any, capacity: Any, state: GrowthState, *, keep: str = "bias") -> Any:
  """The boolean mask of entries that train now (for ``masked_freeze(..., trainable=)``).

  ``keep`` (``"new"``, ``"bias"``, ``"output"``): what stays trainable after an expansion
  in the layers that are not capacity layers, see
  :func:`jaxscope.models.capacity.trainable_mask`.
  """
  return cap.trainable_mask(params, capacity, state.frozen, keep=keep)


def growth_update(
  state: GrowthState,
  *,
  value: jax.typing.ArrayLike,
  params: Any,
  capacity: Any,
  key: jax.Array,
  policy: str = "all",
  activation_std: Mapping[str, jax.Array] | None = None,
  patience: int = 10,
  cooldown: int = 0,
  min_delta: float = 0.0,
  smoothing: float = 0.1,
  reinit: bool = True,
  reset: bool = True,
  init: cap.Initializer | str | None = None,
) -> tuple[Any, Any, GrowthState]:
  """Folds one training-error value in; on a plateau grows, freezes and re-initialises.

  The plateau rule is :func:`jaxscope.transforms.plateau_update` (EMA of the value with
  weight ``smoothing``, a plateau after ``patience`` counted steps without a relative
  improvement of ``min_delta``). On a plateau that grew a layer: the new chunks are
  activated, the old ones frozen, the new ones re-initialised (``reinit``); with ``reset``
  the rule is started afresh (:func:`jaxscope.transforms.capacity.plateau_restart`: the
  average re-initialised by the next value, the patience counter cleared), and for
  ``cooldown`` steps after the expansion no plateau is counted or signalled. So with a
  constant loss the expansions come every ``cooldown + patience`` steps; set ``cooldown``
  to the steps a new chunk needs to train.

  Args:
    state: the controller's state.
    value: this step's training error (or loss).
    params: the model's parameters (the new chunk is re-initialised in them).
    capacity: the model's ``capacity`` collection.
    key: PRNG key for the re-initialisation.
    policy: ``"all"`` (every layer with room grows one chunk) or ``"activation-std"``
      (only the layer with room whose ``activation_std`` is highest).
    activation_std: per capacity layer, the standard deviation of its output (e.g.
      ``activations/std/{layer}`` of a scope over :mod:`jaxscope.capture`); needed by
      ``"activation-std"``.
    patience: steps without improvement of the moving average that make a plateau.
    cooldown: steps after a plateau during which none is counted or signalled.
    min_delta: relative improvement needed.
    smoothing: weight ``γ`` of the newest value in the moving average (an EMA of span
      ``N = 2/γ − 1`` steps: 0.1 ≈ 19 steps).
    reinit: re-initialise the new chunk for its active fan-in (``False``: it keeps the
      weights the full-width initialisation drew, never trained while inactive).
    reset: restart the plateau rule after an expansion (``False``: the reference level of
      the plateau stays, so the jump of the loss after an expansion counts as no
      improvement: the behaviour before the fix).
    init: the kernel initialiser (or its name) of the re-initialisation; ``None``: LeCun
      normal (:func:`jaxscope.models.capacity.reinit_chunk`). Give the model's.

  Returns:
    ``(params, capacity, state)``; ``state.expanded`` and ``state.grown`` tell what happened.
  """
  if policy not in POLICIES:
    raise ValueError(f"growth_update: policy must be one of {POLICIES}, got {policy!r}.")
  layers = cap.capacity_layers(params, capacity)
  if set(layers) != set(state.frozen):
    raise ValueError(
      f"growth_update: the capacity layers {sorted(layers)} differ from the state's "
      f"{sorted(state.frozen)}; call growth_init with this model."
    )
  plateau = plateau_update(
    state.plateau,
    value,
    patience=patience,
    cooldown=cooldown,
    min_delta=min_delta,
    smoothing=smoothing,
  )
  active = _active(capacity)
  room = {k: active[k] < jnp.asarray(info.chunks, jnp.int32) for k, info in layers.items()}
  if policy == "all":
    grow = {k: plateau.fired & room[k] for k in layers}
  else:
    if activation_std is None or set(activation_std) < set(layers):
      missing = sorted(set(layers) - set(activation_std or {}))
      raise ValueError(
        f"growth_update: policy='activation-std' needs activation_std for every capacity "
        f"layer; missing {missing}."
      )
    keys = list(layers)
    std = jnp.stack(
      [
        jnp.where(room[k] & jnp.isfinite(activation_std[k]), activation_std[k], -jnp.inf)
        for k in keys
      ]
    )
    best = jnp.argmax(std)
    any_room = jnp.any(jnp.stack([room[k] for k in keys]))
    grow = {k: plateau.fired & any_room & (best == i) & room[k] for i, k in enumerate(keys)}
  new_active = {k: active[k] + grow[k].astype(jnp.int32) for k in layers}
  frozen = {k: jnp.where(grow[k], active[k], state.frozen[k]) for k in layers}
  new_capacity = set_active(capacity, new_active)
  if reinit:
    kw = {} if init is None else {"init": init}
    keys_ = jax.random.split(key, max(len(layers), 1))
    for (k, _), sub in zip(layers.items(), keys_, strict=False):
      fresh = cap.reinit_chunk(sub, params, new_capacity, k, active[k], **kw)
      params = jax.tree.map(lambda a, b, g=grow[k]: jnp.where(g, a, b), fresh, params)
  expanded = jnp.any(jnp.stack(list(grow.values())))
  if reset:
    restarted = plateau_restart(plateau)
    plateau = jax.tree.map(lambda r, p: jnp.where(expanded, r, p), restarted, plateau)
  return (
    params,
    new_capacity,
    GrowthState(
      plateau=plateau,
      frozen=frozen,
      expansions=state.expansions + expanded.astype(jnp.int32),
      expanded=expanded,
      grown=grow,
    ),
  )


def activation_std(
  outputs: Mapping[str, jax.Array], params: Any, capacity: Any
) -> dict[str, jax.Array]:
  """Per capacity layer, the standard deviation of its output over the *active* units.

  ``std_l = sqrt(mean_{b, …, j active} (y − ȳ)²)`` with ``ȳ`` the mean over the same
  entries (inactive units are exactly zero and would drag a small layer's std down).
  ``outputs`` are the layers' outputs keyed by module path, e.g. ``captured.outputs`` from
  :func:`jaxscope.capture.value_and_grad`; layers missing from it get ``NaN``.
  """
  layers = cap.capacity_layers(params, capacity)
  active = _active(capacity)
  out = {}
  for k, info in layers.items():
    if k not in outputs:
      out[k] = jnp.asarray(jnp.nan, jnp.float32)
      continue
    y = outputs[k].astype(jnp.float32)
    mask = cap.unit_mask(active[k], info.features, info.chunks).astype(jnp.float32)
    w = jnp.broadcast_to(mask, y.shape)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(y * w) / n
    out[k] = jnp.sqrt(jnp.sum(w * (y - mean) ** 2) / n)
  return out


def growth_values(state: GrowthState, capacity: Any) -> dict[str, jax.Array]:
  """Values to record: ``capacity/active/{layer}``, ``capacity/frozen/{layer}``,
  ``capacity/expanded`` (the event), ``capacity/expansions`` and the plateau average."""
  out: dict[str, jax.Array] = {}
  for k, a in _active(capacity).items():
    out[f"capacity/active/{k}"] = a
  for k, f in state.frozen.items():
    out[f"capacity/frozen/{k}"] = f
  out["capacity/expanded"] = state.expanded
  out["capacity/expansions"] = state.expansions
  out["capacity/error_average"] = state.plateau.average
  return out
