"""Capacity control: plateau detection and partial freezing driven by a traced mask.

The dynamic-network-capacity seed grows a network in *chunks* of units: the network starts
with the first chunk trainable, and "when the moving average of the training error has not
improved within the last ``patience`` batches, [it activates] the next chunk"; chunks that
are already trained may be frozen. This module holds the two device-side pieces of that
loop; both are pure functions of arrays, so they run inside ``jit`` and ``lax.scan``:

* :func:`plateau_detector` (with :func:`plateau_init` / :func:`plateau_update` to use the
  rule without optax, and :func:`plateau_restart` to start it afresh after the caller
  acted on a plateau) signals a plateau of a scalar value such as the training loss or
  error, as ``optax.contrib.reduce_on_plateau`` does, but only *signals* it (the
  ``fired`` flag in its state): what to do on a plateau (activate a chunk, cut the rate)
  is the caller's choice.
* :func:`masked_freeze` wraps an optimizer so that entries whose ``trainable`` mask is
  False neither move nor let the optimizer's per-parameter state (momentum, Adam moments)
  drift; the mask is a traced argument of ``update``, so it may change every step without
  recompiling.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope import tree as jtree

__all__ = [
  "PlateauState",
  "masked_freeze",
  "plateau_detector",
  "plateau_init",
  "plateau_restart",
  "plateau_update",
]

# ------------------------------------------------------------------------------- plateau


class PlateauState(NamedTuple):
  """State of the plateau rule (:func:`plateau_update`); its structure is fixed by init.

  ``optax.tree.get(opt_state, "fired")`` reads the flag of the latest update inside any
  optimizer state (``count`` and ``cooldown`` are common names in optax states, so read
  those through the ``PlateauState`` itself).
  """

  count: jax.Array
  """``int32`` number of values seen (finite or not)."""
  average: jax.Array
  """``float32`` exponential moving average ``a`` of the finite values (0 before the
  first finite value, which initialises it)."""
  best: jax.Array
  """``float32`` the reference level ``b`` improvements are measured against (``+inf``
  before the first finite value)."""
  since_best: jax.Array
  """``int32`` counted steps since ``best`` last improved (or since the last plateau)."""
  cooldown: jax.Array
  """``int32`` steps of cooldown left."""
  fired: jax.Array
  """``bool`` whether the latest update signalled a plateau."""
  fires: jax.Array
  """``int32`` number of plateaus signalled so far."""


def _is_number(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def _check_plateau_args(
  caller: str, patience: Any, cooldown: Any, min_delta: Any, smoothing: Any
) -> None:
  # Only concrete Python numbers are checked: traced hyperparameters are allowed.
  def bad(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{caller}: {name} must be {expected}, got {value!r}.")

  if _is_number(patience) and not (patience >= 1 and float(patience).is_integer()):
    raise bad("patience", patience, "a positive integer")
  if _is_number(cooldown) and not (cooldown >= 0 and float(cooldown).is_integer()):
    raise bad("cooldown", cooldown, "a non-negative integer")
  if _is_number(min_delta) and not (min_delta >= 0 and math.isfinite(min_delta)):
    raise bad("min_delta", min_delta, "a non-negative finite number")
  if _is_number(smoothing) and not 0.0 < smoothing <= 1.0:
    raise bad("smoothing", smoothing, "in (0, 1] (the weight of the newest value)")


def plateau_init() -> PlateauState:
  """The state of :func:`plateau_update` before any value: nothing seen, ``best = +inf``."""
  return PlateauState(
    count=jnp.zeros((), jnp.int32),
    average=jnp.zeros((), jnp.float32),
    best=jnp.full((), jnp.inf, jnp.float32),
    since_best=jnp.zeros((), jnp.int32),
    cooldown=jnp.zeros((), jnp.int32),
    fired=jnp.zeros((), jnp.bool_),
    fires=jnp.zeros((), jnp.int32),
  )


def plateau_restart(state: PlateauState) -> PlateauState:
  """The rule started afresh, for a value whose level has just changed (e.g. after the
  network grew): the moving average and the reference level are forgotten, the patience
  counter is cleared; the cooldown left, ``count``, ``fired`` and ``fires`` are kept.

  ``a ← 0``, ``b ← +inf``, ``since_best ← 0``, as in :func:`plateau_init`: the next finite
  value re-initialises the average (``a ← v``) and counts as an improvement (``b ← a``),
  so a jump of the value after the restart is not a plateau, and a value that falls from
  its new level keeps improving on it. Jittable; select it with ``jnp.where`` to restart
  conditionally (``jax.tree.map(lambda r, s: jnp.where(c, r, s), plateau_restart(s), s)``).
  """
  return state._replace(
    average=jnp.zeros_like(state.average),
    best=jnp.full_like(state.best, jnp.inf),
    since_best=jnp.zeros_like(state.since_best),
  )


def plateau_update(
  state: PlateauState,
  value: jax.typing.ArrayLike,
  *,
  patience: int | jax.Array = 10,
  cooldown: int | jax.Array = 0,
  min_delta: float | jax.Array = 0.0,
  relative: bool = True,
  smoothing: float | jax.Array = 0.1,
) -> PlateauState:
  """Folds one value (loss, training error) into the plateau rule.

  With ``γ = smoothing``, ``P = patience``, ``C = cooldown`` and ``δ = min_delta``, one
  update with a value ``v`` does, in order:

  1. **average** (EMA, ``γ`` is the weight of the newest value)::

       a ← v                    for the first finite value
       a ← γ v + (1 − γ) a      for later finite values
       a unchanged              when v is NaN or ±inf

  2. **improvement**: ``improved = isfinite(v) and a < b − tol`` with
     ``tol = δ·|b|`` if ``relative`` else ``tol = δ`` (strict ``<``; before the first
     finite value ``b = +inf`` and any finite value improves). On improvement
     ``b ← a`` and ``since_best ← 0``.
  3. **counting**: otherwise ``since_best ← since_best + 1``, except during cooldown
     (the cooldown left *before* this update is ``> 0``), whose steps are not counted
     (``since_best ← 0``, as ``optax.contrib.reduce_on_plateau``).
  4. **firing**: ``fired = (not in cooldown) and since_best ≥ P``. On firing
     ``since_best ← 0``, ``b ← a`` (the bar is reset to the current level, which may lie
     above the best seen: the next plateau needs ``P`` more counted steps without
     improving on the level at the plateau), ``cooldown ← C`` and ``fires`` += 1;
     otherwise ``cooldown ← max(cooldown − 1, 0)``.

  Hence with no improvement at all the first plateau fires at the ``P``-th non-improving
  value after the last improvement, and the following ones every ``C + P`` values. A
  smaller ``γ`` (heavier smoothing) makes the average keep creeping down for a while
  after the raw value flattens; use ``min_delta`` so such creeping does not count.

  Non-finite values never improve and never enter the average; they are counted as steps
  without improvement, so ``P`` NaN losses in a row *do* fire (as they would in
  ``reduce_on_plateau``, whose average turns NaN). A plateau fired before any finite value
  leaves ``b = +inf``, so the first finite value still counts as an improvement.

  Args:
    state: the state so far (:func:`plateau_init` to start).
    value: a scalar (cast to ``float32``).
    patience: ``P ≥ 1``, counted non-improving steps that make a plateau.
    cooldown: ``C ≥ 0``, steps after a plateau during which nothing is counted or fired.
    min_delta: ``δ ≥ 0``, the least decrease that counts as improvement.
    relative: whether ``δ`` is relative to ``|b|`` (default) or absolute.
    smoothing: ``γ ∈ (0, 1]``; 1 uses the raw values.

  Returns:
    The new state; ``state.fired`` says whether this value completed a plateau.

  Raises:
    ValueError: invalid (concrete) arguments or a non-scalar ``value``.

  Example:
    >>> from jaxscope.transforms import plateau_init, plateau_update
    >>> s = plateau_init()
    >>> fired = []
    >>> for v in [3.0, 2.0, 1.0] + [1.0] * 4:
    ...   s = plateau_update(s, v, patience=3, smoothing=1.0)
    ...   fired.append(bool(s.fired))
    >>> fired.index(True)    # the 3rd value after the last improvement (index 2)
    5
  """
  _check_plateau_args("plateau_update", patience, cooldown, min_delta, smoothing)
  v = jnp.asarray(value)
  if v.shape != ():
    raise ValueError(
      f"plateau_update: value must be a scalar (the loss or error of the step), got shape "
      f"{v.shape}."
    )
  v = v.astype(jnp.float32)
  finite = jnp.isfinite(v)
  seen = jnp.isfinite(state.best)  # a finite value has been seen (b is finite from then on)
  gamma = jnp.asarray(smoothing, jnp.float32)
  ema = gamma * v + (1 - gamma) * state.average
  average = jnp.where(finite, jnp.where(seen, ema, v), state.average)

  delta = jnp.asarray(min_delta, jnp.float32)
  tol = delta * jnp.abs(state.best) if relative else delta
  threshold = jnp.where(seen, state.best - tol, jnp.inf)
  improved = finite & (average < threshold)
  best = jnp.where(improved, average, state.best)

  in_cooldown = state.cooldown > 0
  since = jnp.where(
    improved | in_cooldown, jnp.zeros((), jnp.int32), optax.safe_increment(state.since_best)
  )
  fired = jnp.logical_not(in_cooldown) & (since >= patience)
  since = jnp.where(fired, jnp.zeros((), jnp.int32), since)
  best = jnp.where(fired & jnp.isfinite(best), average, best)
  left = jnp.maximum(state.cooldown - 1, 0)
  cool = jnp.where(fired, jnp.asarray(cooldown, jnp.int32), left).astype(jnp.int32)
  return PlateauState(
    count=optax.safe_increment(state.count),
    average=average.astype(jnp.float32),
    best=best.astype(jnp.float32),
    since_best=since.astype(jnp.int32),
    cooldown=cool,
    fired=fired,
    fires=jnp.where(fired, optax.safe_increment(state.fires), state.fires),
  )


def plateau_detector(
  patience: int | jax.Array = 10,
  cooldown: int | jax.Array = 0,
  min_delta: float | jax.Array = 0.0,
  *,
  relative: bool = True,
  smoothing: float | jax.Array = 0.1,
) -> optax.GradientTransformationExtraArgs:
  """An optax transformation that watches ``value=`` for plateaus and changes nothing.

  The updates pass through unchanged; each ``update`` folds the extra argument ``value``
  (the loss or training error of the step, the keyword ``optax.contrib.reduce_on_plateau``
  reads) into a :class:`PlateauState` by the rule of :func:`plateau_update`. Read the
  signal inside the jitted step with ``optax.tree.get(opt_state, "fired")``; e.g. grow the
  network by one chunk when it is True. Put it anywhere in an ``optax.chain`` (chain
  passes ``value`` to every member).

  Args:
    patience: counted steps without improvement that make a plateau (``P``).
    cooldown: steps after a plateau that are neither counted nor fire (``C``).
    min_delta: the least decrease of the average that counts as improvement (``δ``).
    relative: whether ``min_delta`` is relative to ``|best|`` (default) or absolute.
    smoothing: weight of the newest value in the moving average (``γ``; 1: none).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`PlateauState`.

  Raises:
    ValueError: invalid arguments; ``update`` without ``value``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from jaxscope.transforms import plateau_detector
    >>> tx = optax.chain(optax.sgd(0.1), plateau_detector(patience=2, smoothing=1.0))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> for loss in [1.0, 1.0, 1.0]:
    ...   _, state = tx.update({"w": jnp.ones(3)}, state, params, value=loss)
    >>> bool(optax.tree.get(state, "fired"))
    True
  """
  _check_plateau_args("plateau_detector", patience, cooldown, min_delta, smoothing)

  def init_fn(params: optax.Params) -> PlateauState:
    del params
    return plateau_init()

  def update_fn(
    updates: optax.Updates,
    state: PlateauState,
    params: optax.Params | None = None,
    *,
    value: jax.typing.ArrayLike | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, PlateauState]:
    del params, extra_args
    if value is None:
      raise ValueError(
        "plateau_detector: update needs the extra argument `value` (the loss or training "
        "error of the step): tx.update(grads, opt_state, params, value=loss)."
      )
    new_state = plateau_update(
      state,
      value,
      patience=patience,
      cooldown=cooldown,
      min_delta=min_delta,
      relative=relative,
      smoothing=smoothing,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -------------------------------------------------------------------------------- freeze


def _path_key(path: Any) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((k,)) for k in path)


def _cut_to_partition(updates: optax.Updates, trainable: Any) -> Any:
  """``trainable`` with ``MaskedNode`` where ``updates`` has one (else unchanged)."""
  is_masked = lambda x: isinstance(x, optax.transforms.MaskedNode)  # noqa: E731
  if not any(is_masked(x) for x in jax.tree_util.tree_leaves(updates, is_leaf=is_masked)):
    return trainable
  try:
    return jax.tree.map(
      lambda u, m: u if is_masked(u) else m, updates, trainable, is_leaf=is_masked
    )
  except ValueError:
    return trainable  # Let the structure check name the difference.


def _check_mask(
  updates: optax.Updates, trainable: Any
) -> tuple[list[jax.Array], jax.tree_util.PyTreeDef, list[tuple[str, ...]]]:
  """Flattens ``trainable`` against ``updates``; returns masks, treedef and path keys.

  Inside ``optax.multi_transform`` / ``optax.masked`` the updates hold ``MaskedNode``s
  where other partitions' leaves are; the mask of the whole model is cut to the same.
  """
  trainable = _cut_to_partition(updates, trainable)
  flat_u, treedef = jax.tree_util.tree_flatten_with_path(updates)
  flat_m, mdef = jax.tree_util.tree_flatten_with_path(trainable)
  if mdef != treedef:
    u_names = [jtree.path_name(p) for p, _ in flat_u]
    m_names = [jtree.path_name(p) for p, _ in flat_m]
    missing = [n for n in u_names if n not in set(m_names)]
    extra = [n for n in m_names if n not in set(u_names)]
    detail = []
    if missing:
      detail.append(f"leaves missing from trainable: {missing[:5]}")
    if extra:
      detail.append(f"leaves only in trainable: {extra[:5]}")
    raise ValueError(
      "masked_freeze: `trainable` must have the tree structure of the parameters"
      + (f" ({'; '.join(detail)})" if detail else f": {mdef} vs {treedef}")
      + "."
    )
  masks = []
  for (path, u), (_, m) in zip(flat_u, flat_m, strict=True):
    m = jnp.asarray(m)
    name = jtree.path_name(path) or "<root>"
    if m.dtype != jnp.bool_:
      raise ValueError(
        f"masked_freeze: trainable leaf {name!r} must be boolean, got dtype {m.dtype}."
      )
    try:
      shape = jnp.broadcast_shapes(m.shape, u.shape)
    except ValueError:
      shape = None
    if shape != tuple(u.shape):
      raise ValueError(
        f"masked_freeze: trainable leaf {name!r} has shape {m.shape}, which does not "
        f"broadcast to the parameter's shape {tuple(u.shape)} (use a scalar for the whole "
        "leaf, the output-axis size for whole units, or the full shape)."
      )
    masks.append(m)
  return masks, treedef, [_path_key(p) for p, _ in flat_u]


def _protect_state(
  new_state: Any,
  old_state: Any,
  masks: list[jax.Array],
  param_paths: list[tuple[str, ...]],
  param_shapes: list[tuple[int, ...]],
) -> Any:
  """``where(trainable, new, old)`` on every state leaf that mirrors a parameter leaf."""
  index = {p: i for i, p in enumerate(param_paths)}
  lengths = sorted({len(p) for p in param_paths}, reverse=True)
  flat_new, sdef = jax.tree_util.tree_flatten_with_path(new_state)
  flat_old, odef = jax.tree_util.tree_flatten(old_state)
  if odef != sdef:
    raise ValueError(
      "masked_freeze: the inner optimizer's state changed structure in update; it cannot "
      "be protected leaf by leaf."
    )
  out = []
  for (path, new), old in zip(flat_new, flat_old, strict=True):
    key = _path_key(path)
    match = None
    for n in lengths:  # the longest parameter path that ends this state path
      if n <= len(key) and key[len(key) - n :] in index:
        match = index[key[len(key) - n :]]
        break
    if (
      match is not None
      and hasattr(new, "shape")
      and tuple(new.shape) == param_shapes[match]
      and jnp.issubdtype(new.dtype, jnp.inexact)
    ):
      new = jnp.where(masks[match], new, old).astype(new.dtype)
    out.append(new)
  return jax.tree_util.tree_unflatten(sdef, out)


def masked_freeze(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Freezes the entries a traced ``trainable`` mask marks False, state included.

  ``update(updates, state, params=None, *, trainable, **extra)`` with ``m = trainable``
  (a tree of boolean arrays with the structure of the parameters; each leaf a scalar for
  the whole leaf, the size of the output axis for whole units (Flax keeps it last), or
  the leaf's full shape; traced, so it may change every step without recompiling):

      (u, s')  = inner.update(where(m, g, 0), s, params, **extra)
      update   = where(m, u, 0)                       (frozen entries: exactly 0)
      s'[leaf] = where(m, s'[leaf], s[leaf])          (leaves that mirror a parameter)

  A state leaf *mirrors* a parameter when its key path ends with the parameter's key
  path (``ScaleByAdamState.mu['Dense_0']['kernel']`` ends with ``['Dense_0']['kernel']``)
  and it has the parameter's shape and a floating dtype: momentum buffers, Adam's
  ``mu``/``nu``, accumulated gradients (``MultiSteps``), also through ``chain``,
  ``partition``, ``masked`` and ``inject_hyperparams``. There, frozen entries keep their
  state bit for bit, and when an entry is unfrozen it resumes from the state it had when
  it was frozen. Integer and scalar state (``count``, injected hyperparameters) advances
  normally, so Adam's bias correction uses the global step count.

  The gradient of frozen entries is zeroed *before* the inner optimizer sees it, so they
  also add nothing to statistics that couple entries (global-norm clipping, per-layer
  trust ratios), and NaN/Inf in a frozen gradient cannot leak into the update.

  Limitations: state leaves that do not mirror a parameter's shape are not protected
  (e.g. Adafactor's factored second moments ``v_row``/``v_col``, or low-rank
  preconditioner factors): for frozen entries they are updated with a zero gradient
  (they decay). A state leaf of a bare-array parameter tree matches by shape and dtype
  alone. Weight decay inside ``inner`` (``adamw``) is masked too, since the update of a
  frozen entry is 0.

  Compared with optax: ``optax.freeze(mask)`` / ``set_to_zero`` zero the updates of a
  *static* (Python) mask, and ``optax.selective_transform`` / ``partition`` keep no state
  for frozen leaves; changing which leaves are frozen means a new optimizer and a
  recompile, and whole leaves only. ``optax.masked(inner, mask)`` must not be used to
  freeze: it passes the *raw gradient* through for masked-out leaves, so
  ``apply_updates`` would step up the gradient.

  Args:
    inner: the optimizer to apply to the trainable entries (plain transformations are
      given extra-argument support, so ``chain`` extras such as ``value`` reach them).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s state.

  Raises:
    ValueError: ``update`` without ``trainable``, or a ``trainable`` tree that does not
      fit the updates (naming the leaf).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from jaxscope.transforms import masked_freeze
    >>> tx = masked_freeze(optax.adam(0.1))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> trainable = {"w": jnp.array([True, False, True])}
    >>> u, state = tx.update({"w": jnp.ones(3)}, state, params, trainable=trainable)
    >>> [round(x, 4) for x in u["w"].tolist()]
    [-0.1, 0.0, -0.1]
    >>> [round(x, 4) for x in optax.tree.get(state, "mu")["w"].tolist()]
    [0.1, 0.0, 0.1]
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> Any:
    return inner.init(params)

  def update_fn(
    updates: optax.Updates,
    state: Any,
    params: optax.Params | None = None,
    *,
    trainable: Any = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, Any]:
    if trainable is None:
      raise ValueError(
        "masked_freeze: update needs the keyword argument `trainable` (a tree of booleans "
        "with the structure of the parameters): tx.update(grads, opt_state, params, "
        "trainable=mask)."
      )
    masks, treedef, paths = _check_mask(updates, trainable)
    flat_g = jax.tree_util.tree_leaves(updates)
    shapes = [tuple(g.shape) for g in flat_g]
    grads = treedef.unflatten(
      [jnp.where(m, g, jnp.zeros_like(g)) for m, g in zip(masks, flat_g, strict=True)]
    )
    new_updates, new_state = inner.update(grads, state, params, **extra_args)
    flat_u = treedef.flatten_up_to(new_updates)
    out = treedef.unflatten(
      [jnp.where(m, u, jnp.zeros_like(u)) for m, u in zip(masks, flat_u, strict=True)]
    )
    return out, _protect_state(new_state, state, masks, paths, shapes)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
