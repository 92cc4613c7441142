"""Learning rates steered by the update/weight ratio (ikkuna thesis, §3.3, eq. 3.6–3.7).

The update/weight ratio of layer ``i`` at step ``k`` is

    R_{i,k} = ‖W_{i,k+1} − W_{i,k}‖₂ / ‖W_{i,k+1}‖₂ = ‖Δ_{i,k}‖ / ‖W_{i,k} + Δ_{i,k}‖

(Frobenius norms of the applied update ``Δ`` and of the weights it produces). The rule of
thumb is that ``R ≈ 1e-3`` for a healthy learning rate (Karpathy, CS231n). The
live-introspection thesis (Berg 2019, "ikkuna") proposed to *steer* the learning rate so
that the mean ratio over the weight layers sits at a target ``t``:

* :func:`ratio_adaptive_lr` scales the updates of the optimizer in front of it by a factor
  computed from the smoothed ratios, in one of two modes (below);
* :func:`ratio_adaptive_sgd` is that transformation after plain (or momentum) SGD;
* :func:`scale_to_update_ratio` is the original's ``FixedRatioSGD``: every tensor's step
  is rescaled to hit the target ratio exactly;
* :func:`ratio_lr_values` reads the state for logging (the training loop records it).

**Mode "code"** (the original implementation, ``RatioLRSubscriber`` of the thesis's
experiments). Each layer's ratio is smoothed by a recursive exponential moving average
whose weight ``γ`` (``smoothing``, 0.9 by default) falls on the *newest* ratio, starting
from ``r_i = 0``::

    r_{i,k} = γ R_{i,k} + (1 − γ) r_{i,k−1}
    f = t / ((1/L) Σ_i r_i)          (1 when the mean is ≤ 1e-9)
    η_k = η_base · f                 (absolute: the *base* rate is scaled every step)

The factor is computed when a batch starts and the scheduler applies it after the next
optimizer step, so the update of step ``k`` is scaled by the factor computed from the
ratios up to step ``k − 2`` (one step of lag). Because ``R`` is measured on the applied
update, which already carries the factor (``R = f · R_base``, with ``R_base`` the ratio the
base rate would give), this rule does **not** settle at the target: its fixed point
``f = t / (f R_base)`` gives ``f* = sqrt(t / R_base)`` and ``R* = sqrt(t · R_base)``, the
geometric mean of the target and the base rate's ratio. With the lag it is a delayed
negative feedback, so the factor also rings with a period of about four steps. (Measured
on digits with an MLP, SGD at 0.05/0.2/0.5: late mean ratios 2.0e-3/3.6e-3/5.7e-3 against
``sqrt(t · R_base)`` = 2.0e-3/3.6e-3/5.7e-3; ``tests/test_ratio_lr.py``.)

**Mode "thesis"** (eq. 3.7 as printed). A two-tap average of the raw ratios of the last two
steps updates the previous rate multiplicatively, with no lag::

    m_k = (1/L) Σ_i (γ R_{i,k} + (1 − γ) R_{i,k−1})      (R_{i,−1} = R_{i,0})
    η_{k+1} = η_k · t / m_k                               (unchanged when m_k ≤ 1e-9)

(the thesis prints the factor as ``(t · m_k)⁻¹``, which is dimensionally a typo; the
intended and implemented factor is ``t / m_k``). Since ``R`` is proportional to the rate
that produced it, this sets ``η_{k+1}`` to the rate that would have hit the target on the
last step: the mean ratio reaches the target within a few steps, whatever the base rate.

In both modes the factor ``f = η / η_base`` is clipped to ``[floor, max_factor]``;
``max_factor = 500`` is the cap of the thesis listing (the final code had none, and no
floor). The mean is unweighted over layers, which favours small layers (noted in the
thesis). Only weight kernels count by default (biases are ignored, as in the original,
whose experiments tracked ``Conv2d`` and ``Linear`` weights).

Differences from the original worth knowing (``../shared/specs/ikkuna.md`` §3): its
subscriber was registered with ``tag=None``, which under the tag rule in force from
2019-01 receives no ratios, leaving the rate constant; its ``ExponentialRatioLRSubscriber``
cannot be constructed (a ``TypeError``). Here the transformation sees the updates
directly, so neither can happen.

Zero and non-finite values: a layer whose new weights have zero norm, or whose ratio is
not finite (NaN/Inf in the update or weights), keeps its previous smoothed ratio for that
step, so the factor stays finite; the non-finite update itself is passed on unchanged in
shape (the ratio transform does not hide divergence, it only refuses to learn from it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope import tree as jtree
from jaxscope.transforms.state import find_states, state_names

__all__ = [
  "MIN_MEAN_RATIO",
  "RatioAdaptiveState",
  "ratio_adaptive_lr",
  "ratio_adaptive_sgd",
  "ratio_lr_values",
  "scale_to_update_ratio",
]

#: Mean ratios at or below this value leave the factor at its fallback (as the original).
MIN_MEAN_RATIO = 1e-9

Mode = Literal["code", "thesis"]


class RatioAdaptiveState(NamedTuple):
  """State of :func:`ratio_adaptive_lr`; its structure is fixed by ``init``.

  After update ``k``, ``factor`` and ``effective_learning_rate`` are those *applied* in it
  (as ``optax.inject_hyperparams`` holds the rate of its latest update), so
  ``optax.tree.get(opt_state, "effective_learning_rate")`` reads the rate of the last
  step (a name of its own: under ``inject_hyperparams`` the state also holds the base
  rate as ``hyperparams["learning_rate"]``, and one key must find one value); the
  ratios are those up to update ``k − 1`` (a ratio needs the weights its update produced,
  which arrive with the next update).
  """

  count: jax.Array
  """``int32`` number of updates seen."""
  ratios: dict[str, jax.Array]
  """Smoothed ratio of each counted layer (mode "code": the EMA ``r_i``; mode "thesis":
  the two-tap average ``γ R_{i,k} + (1 − γ) R_{i,k−1}``), keyed by layer name."""
  last_ratios: dict[str, jax.Array]
  """The raw ratio ``R_{i,k}`` of the latest update of each layer."""
  mean_ratio: jax.Array
  """Unweighted mean of ``ratios`` over the layers."""
  factor: jax.Array
  """The factor ``η / η_base`` applied in the latest update (1 before the first)."""
  effective_learning_rate: jax.Array
  """``base_learning_rate · factor``: the effective rate of the latest update."""
  update_norms: dict[str, jax.Array]
  """``‖Δ‖`` of the latest update per counted layer; its ratio is taken at the next
  update, on the weights it produced."""


def _is_number(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def _check_args(
  target: Any, smoothing: Any, max_factor: Any, floor: Any, mode: Any, base_learning_rate: Any
) -> None:
  # Only concrete Python numbers are checked: inject_hyperparams passes arrays.
  def bad(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"ratio_adaptive_lr: {name} must be {expected}, got {value!r}.")

  if _is_number(target) and not (target > 0 and math.isfinite(target)):
    raise bad("target", target, "a positive finite number (e.g. 1e-3)")
  if _is_number(smoothing) and not 0.0 < smoothing <= 1.0:
    raise bad("smoothing", smoothing, "in (0, 1] (the weight of the newest ratio)")
  if _is_number(max_factor) and not max_factor > 0:
    raise bad("max_factor", max_factor, "positive or None")
  if _is_number(floor) and not (floor >= 0 and math.isfinite(floor)):
    raise bad("floor", floor, "a non-negative finite number or None")
  if _is_number(floor) and _is_number(max_factor) and floor > max_factor:
    raise bad("floor", floor, f"at most max_factor={max_factor}")
  if mode not in ("code", "thesis"):
    raise bad("mode", mode, "'code' or 'thesis'")
  if _is_number(base_learning_rate) and not (
    base_learning_rate > 0 and math.isfinite(base_learning_rate)
  ):
    raise bad("base_learning_rate", base_learning_rate, "a positive finite number")


def _norm(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def _selected(
  tree: Any,
  layers: str | Sequence[str] | None,
  exclude: str | Sequence[str] | None,
  kind: jtree.Kind,
  argname: str,
) -> list[jtree.LeafInfo]:
  lay = jtree.layout(tree, include=layers, exclude=exclude, kind=kind, argname=argname)
  return [info for g in lay.groups for info in g.leaves]


def _clip_factor(f: jax.Array, floor: Any, max_factor: Any) -> jax.Array:
  """``f`` clipped to ``[floor, max_factor]`` (``None``: 0 and no upper bound)."""
  lo = 0.0 if floor is None else floor
  hi = jnp.inf if max_factor is None else max_factor
  return jnp.clip(f, lo, hi)


def _mean(d: dict[str, jax.Array]) -> jax.Array:
  """Unweighted mean of the per-layer scalars."""
  return jnp.mean(jnp.stack(list(d.values())))


def _previous_ratios(
  infos: Sequence[jtree.LeafInfo], flat_p: Sequence[jax.Array], state: RatioAdaptiveState
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The previous update's ratio ``R_{k−1} = ‖Δ_{k−1}‖ / ‖W_k‖`` per counted layer, and
  whether it counts (a previous update exists, ``W_k ≠ 0`` and ``R`` is finite).

  It is measured now, on the weights the update produced (the ``params`` given to this
  update): one reduction over the parameters, none over ``p + Δ``, and exactly the weights
  the next step starts from.
  """
  has_prev = state.count > 0
  raw, valid = {}, {}
  for info in infos:
    wn = _norm(flat_p[info.index])
    un = state.update_norms[info.name]
    r = un / jnp.where(wn > 0, wn, 1.0)
    raw[info.name] = r
    valid[info.name] = has_prev & (wn > 0) & jnp.isfinite(r)
  return raw, valid


def _code_factor(
  state: RatioAdaptiveState,
  raw: dict[str, jax.Array],
  valid: dict[str, jax.Array],
  gamma: jax.Array,
  tgt: jax.Array,
  floor: Any,
  max_factor: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mode "code": ``f = t / mean r`` from the EMAs before ``R_{k−1}`` is folded in, and the
  new EMAs ``r ← γ R + (1 − γ) r``."""
  # This update's factor comes from the ratios up to step k − 2, before R_{k−1} is
  # folded in (one step of lag, as the original's LambdaLR stepping).
  m_prev = state.mean_ratio
  ok = (m_prev > MIN_MEAN_RATIO) & jnp.isfinite(m_prev)
  f = _clip_factor(jnp.where(ok, tgt / jnp.where(ok, m_prev, 1.0), 1.0), floor, max_factor)
  ratios = {
    k: jnp.where(valid[k], gamma * raw[k] + (1 - gamma) * state.ratios[k], state.ratios[k])
    for k in raw
  }
  return f, ratios


def _thesis_factor(
  state: RatioAdaptiveState,
  raw: dict[str, jax.Array],
  valid: dict[str, jax.Array],
  gamma: jax.Array,
  tgt: jax.Array,
  floor: Any,
  max_factor: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mode "thesis" (eq. 3.7): the two-tap averages ``γ R_k + (1 − γ) R_{k−1}`` and
  ``f ← f · t / m`` with ``m`` their mean."""
  has_prev = state.count > 0
  first = state.count == 1  # R_0 is the first ratio: its predecessor is itself.
  prev = {k: jnp.where(first, raw[k], state.last_ratios[k]) for k in raw}
  ratios = {
    k: jnp.where(valid[k], gamma * raw[k] + (1 - gamma) * prev[k], state.ratios[k]) for k in raw
  }
  m = _mean(ratios)
  ok = has_prev & (m > MIN_MEAN_RATIO) & jnp.isfinite(m)
  f = _clip_factor(
    jnp.where(ok, state.factor * tgt / jnp.where(ok, m, 1.0), state.factor), floor, max_factor
  )
  return f, ratios


def ratio_adaptive_lr(
  target: float = 1e-3,
  smoothing: float = 0.9,
  max_factor: float | None = 500.0,
  floor: float | None = None,
  *,
  mode: Mode = "code",
  base_learning_rate: float = 1.0,
  layers: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  kind: jtree.Kind = "kernel",
) -> optax.GradientTransformation:
  """Scales updates so that the mean update/weight ratio steers toward ``target``.

  Put it *after* an optimizer in ``optax.chain``: it multiplies the updates it receives
  (``−η_base · g`` for SGD) by a factor ``f``, so the effective learning rate is
  ``η_base · f``. The factor follows the update/weight ratios
  ``R_{i,k} = ‖Δ_{i,k}‖ / ‖W_{i,k} + Δ_{i,k}‖`` of the counted layers as described in
  the module docstring (``mode="code"``: absolute factor ``t / mean EMA`` with one step
  of lag, as the original implementation; ``mode="thesis"``: multiplicative update of
  the previous rate, eq. 3.7 of the ikkuna thesis).

  Args:
    target: the target ratio ``t`` (1e-3, the usual rule of thumb).
    smoothing: ``γ``, the weight of the newest ratio (0.9 in the original, which makes
      the average nearly unsmoothed); 1 uses the raw ratios.
    max_factor: upper bound of ``f`` (500 in the thesis listing); ``None`` for none.
    floor: lower bound of ``f``; ``None`` for none (0).
    mode: ``"code"`` or ``"thesis"``.
    base_learning_rate: the base rate of the optimizer in front, used only to report
      ``learning_rate = base_learning_rate · factor`` in the state (leave at 1 to read
      the factor there).
    layers: regular expression(s) selecting the counted leaves by name (as
      :func:`jaxscope.tree.layout`'s ``include``); default all.
    exclude: regular expression(s) of leaves not to count.
    kind: ``"kernel"`` (default: weight kernels of Dense/Conv/Embed, biases and
      normalisation scales ignored, as the original), ``"bias"`` or ``"any"``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`RatioAdaptiveState`;
    its ``update`` needs ``params``. All updates are scaled, counted or not.

  Raises:
    ValueError: invalid arguments; ``update`` without ``params``; a selection that
      matches no leaf (the message lists the leaves).

  Reference:
    L. Berg, "Live introspection of neural network training", MSc thesis, Osnabrück
    University, 2019, §3.3 (eq. 3.6–3.7).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from jaxscope.transforms import ratio_adaptive_lr
    >>> params = {"w": jnp.full((4, 4), 1.0)}
    >>> tx = optax.chain(optax.sgd(0.1), ratio_adaptive_lr(1e-3, mode="thesis",
    ...                                                     base_learning_rate=0.1))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((4, 4), 0.1)}
    >>> for _ in range(10):
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> round(float(optax.tree.get(state, "mean_ratio")), 5)   # on target
    0.001
    >>> round(float(optax.tree.get(state, "effective_learning_rate")), 4)   # ≈ 1e-3·‖W‖/‖g‖
    0.0098
  """
  _check_args(target, smoothing, max_factor, floor, mode, base_learning_rate)

  def init_fn(params: optax.Params) -> RatioAdaptiveState:
    infos = _selected(params, layers, exclude, kind, "ratio_adaptive_lr(params)")
    # Distinct buffers for every leaf, so the state can be donated to a jitted step.
    return RatioAdaptiveState(
      count=jnp.zeros((), jnp.int32),
      ratios={i.name: jnp.zeros((), jnp.float32) for i in infos},
      last_ratios={i.name: jnp.zeros((), jnp.float32) for i in infos},
      mean_ratio=jnp.zeros((), jnp.float32),
      factor=jnp.ones((), jnp.float32),
      effective_learning_rate=jnp.full((), base_learning_rate, jnp.float32),
      update_norms={i.name: jnp.zeros((), jnp.float32) for i in infos},
    )

  def update_fn(
    updates: optax.Updates, state: RatioAdaptiveState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, RatioAdaptiveState]:
    if params is None:
      raise ValueError(
        "ratio_adaptive_lr: update needs the parameters to measure the update/weight "
        "ratio; call tx.update(grads, opt_state, params)."
      )
    jtree.check_same_structure(params, updates, ref_name="params", other_name="updates")
    flat_u = jax.tree_util.tree_leaves(updates)
    flat_p = jax.tree_util.tree_leaves(params)
    infos = _selected(updates, layers, exclude, kind, "ratio_adaptive_lr(updates)")
    if set(state.ratios) != {i.name for i in infos}:
      raise ValueError(
        "ratio_adaptive_lr: the counted layers changed since init "
        f"({sorted(state.ratios)} vs {sorted(i.name for i in infos)})."
      )
    raw, valid = _previous_ratios(infos, flat_p, state)
    gamma = jnp.asarray(smoothing, jnp.float32)
    tgt = jnp.asarray(target, jnp.float32)
    step = _code_factor if mode == "code" else _thesis_factor
    f, ratios = step(state, raw, valid, gamma, tgt, floor, max_factor)
    f = f.astype(jnp.float32)
    scaled = jax.tree.map(lambda u: u * f.astype(u.dtype), updates)
    last = {k: jnp.where(valid[k], raw[k], state.last_ratios[k]) for k in raw}
    new_state = RatioAdaptiveState(
      count=optax.safe_increment(state.count),
      ratios=ratios,
      last_ratios=last,
      mean_ratio=_mean(ratios),
      factor=f,
      effective_learning_rate=jnp.asarray(base_learning_rate, jnp.float32) * f,
      update_norms={i.name: f * _norm(flat_u[i.index]) for i in infos},
    )
    return scaled, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def ratio_adaptive_sgd(
  learning_rate: float,
  target: float = 1e-3,
  smoothing: float = 0.9,
  max_factor: float | None = 500.0,
  floor: float | None = None,
  *,
  mode: Mode = "code",
  momentum: float | None = None,
  nesterov: bool = False,
  layers: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  kind: jtree.Kind = "kernel",
) -> optax.GradientTransformation:
  """SGD whose learning rate is steered by the update/weight ratio.

  ``optax.chain(optax.sgd(learning_rate, momentum, nesterov), ratio_adaptive_lr(...))``
  with ``base_learning_rate=learning_rate``: the effective rate is
  ``learning_rate · factor`` (see :func:`ratio_adaptive_lr` for the other arguments).
  Works with ``optax.inject_hyperparams`` (e.g. to change ``learning_rate`` or
  ``target`` during training, by a schedule evaluated inside ``jit``): the base rate is
  then ``hyperparams["learning_rate"]`` and the applied one
  ``optax.tree.get(state, "effective_learning_rate")``; a constant schedule gives the
  updates of the static rate.

  Args:
    learning_rate: the base rate ``η_base`` (a number: the ratio rule replaces a
      schedule).
    target: the target ratio.
    smoothing: the weight of the newest ratio.
    max_factor: upper bound of the factor (``None``: none).
    floor: lower bound of the factor (``None``: none).
    mode: ``"code"`` or ``"thesis"``.
    momentum: heavy-ball momentum of the SGD (``None``: plain SGD, as the thesis).
    nesterov: Nesterov momentum.
    layers: leaves counted (regex), as :func:`ratio_adaptive_lr`.
    exclude: leaves not counted (regex).
    kind: kind of the counted leaves.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from jaxscope.transforms import ratio_adaptive_sgd
    >>> tx = optax.inject_hyperparams(ratio_adaptive_sgd)(learning_rate=0.1)
    >>> params = {"w": jnp.ones((3, 3))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.ones((3, 3))}, state, params)
    >>> round(float(state.hyperparams["learning_rate"]), 6)
    0.1
    >>> round(float(optax.tree.get(state, "effective_learning_rate")), 6)  # 0.1 · factor 1
    0.1
  """
  if callable(learning_rate):
    raise ValueError(
      "ratio_adaptive_sgd: learning_rate must be a number (the ratio rule replaces a "
      "schedule); chain optax.sgd(schedule) with ratio_adaptive_lr() to combine them."
    )
  return optax.chain(
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    ratio_adaptive_lr(
      target,
      smoothing,
      max_factor,
      floor,
      mode=mode,
      base_learning_rate=learning_rate,
      layers=layers,
      exclude=exclude,
      kind=kind,
    ),
  )


def scale_to_update_ratio(
  target: float = 1e-3,
  *,
  layers: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  kind: jtree.Kind = "any",
) -> optax.GradientTransformation:
  """Rescales each tensor's update to the norm ``target · ‖θ‖`` (``FixedRatioSGD``).

  For every selected leaf, ``u ← u · t‖θ‖ / ‖u‖``, so ``‖Δθ‖ / ‖θ‖ = t`` exactly (the
  ratio to the weights *before* the step, as the original). After ``optax.sgd(η)`` this
  is the original's ``FixedRatioSGD`` step ``θ ← θ − (t‖θ‖/‖g‖) g``, whatever ``η``.
  Leaves that are all zero (Flax's zero-initialised biases) cannot be given a ratio:
  their update is passed through unchanged, so they take one plain step of the
  optimizer in front and are rescaled from then on; a zero update stays zero. Leaves
  not selected pass through unchanged.

  Args:
    target: the ratio ``t`` every step hits.
    layers: regular expression(s) of the leaves rescaled (default all).
    exclude: regular expression(s) of leaves left alone.
    kind: ``"any"`` (default, every tensor as the original), ``"kernel"`` or ``"bias"``.

  Reference:
    L. Berg, "Live introspection of neural network training", 2019, §4.3
    (``FixedRatioSGD``: it learns, but to clearly lower accuracy than SGD).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from jaxscope.transforms import scale_to_update_ratio
    >>> tx = optax.chain(optax.sgd(1.0), scale_to_update_ratio(1e-3))
    >>> params = {"w": jnp.full((2, 2), 3.0)}
    >>> updates, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
    >>> round(float(jnp.linalg.norm(updates["w"]) / jnp.linalg.norm(params["w"])), 6)
    0.001
  """
  if _is_number(target) and not (target > 0 and math.isfinite(target)):
    raise ValueError(
      f"scale_to_update_ratio: target must be a positive finite number, got {target!r}."
    )

  def init_fn(params: optax.Params) -> optax.EmptyState:
    _selected(params, layers, exclude, kind, "scale_to_update_ratio(params)")
    return optax.EmptyState()

  def update_fn(
    updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.EmptyState]:
    if params is None:
      raise ValueError(
        "scale_to_update_ratio: update needs the parameters; call "
        "tx.update(grads, opt_state, params)."
      )
    jtree.check_same_structure(params, updates, ref_name="params", other_name="updates")
    chosen = {i.index for i in _selected(updates, layers, exclude, kind, "updates")}
    flat_u, treedef = jax.tree_util.tree_flatten(updates)
    flat_p = jax.tree_util.tree_leaves(params)
    out = []
    for i, (u, p) in enumerate(zip(flat_u, flat_p, strict=True)):
      if i not in chosen:
        out.append(u)
        continue
      un, pn = _norm(u), _norm(p)
      ok = (un > 0) & (pn > 0)
      scale = jnp.where(ok, target * pn / jnp.where(ok, un, 1.0), 1.0)
      out.append(u * scale.astype(u.dtype))
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


def ratio_lr_values(opt_state: Any) -> dict[str, jax.Array]:
  """The loggable values of the :func:`ratio_adaptive_lr` state inside ``opt_state``.

  Returns ``{"lr": effective_learning_rate, "ratio_lr/factor": …, "ratio_lr/mean_ratio":
  …, "ratio_lr/ratio/{layer}": smoothed ratio, …}`` (the keys the training loop records),
  or ``{}`` when the state holds none. Several (one per ``optax.multi_transform``
  partition): each one's keys under the partition label, ``{label}/lr``, … Usable inside
  ``jit``.
  """
  found = find_states(opt_state, RatioAdaptiveState)
  names = state_names([p for p, _ in found], caller="ratio_lr_values")
  out: dict[str, jax.Array] = {}
  for name, (_, s) in zip(names, found, strict=True):
    prefix = f"{name}/" if len(found) > 1 else ""
    out[f"{prefix}lr"] = s.effective_learning_rate
    out[f"{prefix}ratio_lr/factor"] = s.factor
    out[f"{prefix}ratio_lr/mean_ratio"] = s.mean_ratio
    out.update({f"{prefix}ratio_lr/ratio/{k}": v for k, v in s.ratios.items()})
  return _unwrap_variables(out)


def _unwrap_variables(x: Any) -> Any:
  # flax.nnx.Optimizer wraps optimizer-state arrays in Variables; read their arrays.
  from flax import nnx

  return jax.tree.map(
    lambda v: v[...] if isinstance(v, nnx.Variable) else v,
    x,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
