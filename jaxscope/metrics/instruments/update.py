"""The update side of the instruments (:meth:`Instruments.update`).

Once the optimizer's update is known: the distance from ``init``, the update's size, the
per-example projections on the gradient (inner-product and orthogonality tests) and on the
update (both ends of α's quadratic fit), and the new state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxscope import tree as jtree
from jaxscope.metrics import curvature, noise, stats
from jaxscope.metrics.base import tree_norm, tree_vdot
from jaxscope.metrics.instruments.config import F32, Config, leaf_names, leaf_norms
from jaxscope.metrics.instruments.state import InstrumentsState, Probe
from jaxscope.packed import PackedValues, unpack

__all__ = ["update"]

_Measured = tuple[PackedValues, Any, jax.Array]
"""``(values, prev_update, alpha_start)``: what one branch of the update side returns."""


def update(
  cfg: Config,
  state: InstrumentsState,
  probe: Probe,
  updates: Any,
  *,
  learning_rate: jax.Array | float | None = None,
) -> tuple[PackedValues, InstrumentsState]:
  """Finishes the step's measurements once the optimizer's ``updates`` are known.

  Args:
    cfg: the instruments' settings.
    state: the state given to :meth:`grad` this step.
    probe: what :meth:`grad` returned.
    updates: the optimizer's updates (what ``optax.apply_updates`` adds).
    learning_rate: SGD's learning rate, needed by ``cabs`` only.

  Returns:
    ``(values, new_state)``; ``values`` (a :class:`jaxscope.packed.PackedValues`, one
    array per dtype and shape) includes ``"measured"``.
  """
  if not isinstance(probe, Probe):
    raise TypeError(f"instruments.update: probe must come from grad(), got {type(probe).__name__}.")
  if "cabs" in cfg.want and learning_rate is None:
    raise ValueError("instruments.update: 'cabs' needs learning_rate= (SGD's step size).")
  jtree.check_same_structure(probe.params, updates, ref_name="params", other_name="updates")

  def measure(_: Any) -> _Measured:
    vals, prev_update, alpha_start = _measure(cfg, state, probe, updates, learning_rate)
    # Packed as init built them: the branches return two or three arrays, not one per value.
    return PackedValues.pack(vals, like=state.values), prev_update, alpha_start

  def alpha_end(_: Any) -> _Measured:
    proj = _project(probe, [state.prev_update])
    alpha = _alpha_from(state, probe, state.alpha_start, proj[0])
    vals = PackedValues.pack({**unpack(state.values), "alpha": alpha}, like=state.values)
    return vals, state.prev_update, state.alpha_start

  def skip(_: Any) -> _Measured:
    return state.values, state.prev_update, state.alpha_start

  if cfg.every == 1:
    vals, prev_update, alpha_start = measure(None)
    measured = jnp.ones((), jnp.bool_)
  else:
    # α's end point is the step after a measured one: it pays one forward-mode pass.
    measured = probe.measured
    branches = [skip, measure]
    if cfg.need_alpha:
      branches.append(alpha_end)
      mode = jnp.where(
        measured, 1, jnp.where(state.alpha_start[5] == state.count.astype(F32), 2, 0)
      )
    else:
      mode = measured.astype(jnp.int32)
    vals, prev_update, alpha_start = jax.lax.switch(mode, branches, None)
  new_state = InstrumentsState(
    count=optax.safe_increment(state.count),
    key=probe.key,
    measured=measured,
    values=vals,
    init_params=state.init_params,
    prev_update=prev_update,
    alpha_start=alpha_start,
    max_ev=probe.max_ev,
    diag_ema=probe.diag_ema,
    diag_steps=probe.diag_steps,
    diag_var_ema=probe.diag_var_ema,
  )
  return vals | {"measured": measured}, new_state


def _measure(
  cfg: Config,
  state: InstrumentsState,
  probe: Probe,
  updates: Any,
  learning_rate: jax.Array | float | None,
) -> tuple[dict[str, jax.Array], Any, jax.Array]:
  """A measured step's update side: distance, update size, projections, α's start (and end)."""
  want = cfg.want
  params, grads = probe.params, probe.grads
  names = leaf_names(params)
  vals = {**unpack(state.values), **probe.values}
  if "distance" in want:
    diff = jax.tree.map(lambda p, q: p - q, params, state.init_params)
    vals.update(leaf_norms("cockpit/distance", names, diff))
  if "update_size" in want:
    vals.update(leaf_norms("cockpit/update_size", names, updates))
  if "cabs" in want:
    vals["cabs"] = (vals["cabs"] * learning_rate).astype(F32)
  tangents, slots = [], {}
  if cfg.need_proj_grad or cfg.need_alpha:
    # α's update is in the span of the gradient (SGD) or of it and the last update
    # (momentum), and the gradient's projections are cheap (Gram matrices).
    slots["g"] = len(tangents)
    tangents.append(grads)
  if cfg.need_alpha:
    if cfg.every == 1:
      slots["end"] = len(tangents)
      tangents.append(state.prev_update)
    slots["start"] = len(tangents)
    tangents.append(updates)
  alpha_start = state.alpha_start
  prev_update = state.prev_update
  if tangents:
    in_span = None
    if cfg.need_alpha and cfg.every == 1 and cfg.updates_in_span:
      proj, in_span = _project_declared_span(probe, tangents, state.alpha_start[6])
    elif cfg.need_alpha and len(tangents) > 1 and _forward_mode_leaves(probe):
      proj = _project_with_span(probe, tangents)
    else:
      proj = _project(probe, tangents)
    gsq = tree_norm(grads, squared=True)
    if "inner_test" in want:
      vals["inner_test"] = noise.inner_test(proj[slots["g"]], gsq)
    if "ortho_test" in want:
      vals["ortho_test"] = noise.ortho_test(probe.sq_norms, proj[slots["g"]], gsq)
    if cfg.need_alpha:
      if cfg.every == 1:
        vals["alpha"] = _alpha_from(state, probe, state.alpha_start, proj[slots["end"]])
      alpha_start = _start_info(state, probe, proj[slots["start"]], updates, in_span)
      prev_update = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, state.prev_update)
  return vals, prev_update, alpha_start


def _var(x: jax.Array) -> jax.Array:
  """Sample variance with ``ddof = 1`` (Cockpit's ``torch.var``)."""
  return jnp.var(x.astype(F32), ddof=1)


def _start_info(
  state: InstrumentsState, probe: Probe, proj: jax.Array, upd: Any, in_span: jax.Array | None
) -> jax.Array:
  """α's start point: ``[t, f, var f, f', var f', valid step, span mode]`` (``f'`` along the
  update; ``in_span``: whether the update passed the declared span route's guard,
  ``None`` off that route, see :func:`_project_declared_span`)."""
  t = tree_norm(upd).astype(F32)
  scaled = proj / jnp.where(t > 0, t, 1.0)
  stamp = (state.count + 1).astype(F32)  # Valid for the next step only.
  mode = state.alpha_start[6]
  if in_span is not None:
    # Combined from the span but not in it: this start point is wrong, so not kept, and no
    # later update is combined. Projected directly, an update in the span promotes the
    # route; one outside it leaves the route untested (a resumed run's first update is
    # outside span{g, 0} under momentum).
    dropped = (mode == SPAN_VERIFIED) & ~in_span
    stamp = jnp.where(dropped, -1.0, stamp)
    mode = jnp.where(
      dropped | (mode == SPAN_FAILED),
      SPAN_FAILED,
      jnp.where(in_span, SPAN_VERIFIED, SPAN_UNTESTED),
    )
  return jnp.stack(
    [t, probe.loss.astype(F32), _var(probe.losses), jnp.mean(scaled), _var(scaled), stamp, mode]
  ).astype(F32)


def _alpha_from(
  state: InstrumentsState, probe: Probe, start: jax.Array, proj_end: jax.Array
) -> jax.Array:
  """α of the previous update from its start point and this step's loss and projections.

  Kept from the last value unless the start point was recorded at the previous step.
  """
  t = start[0]
  scaled = proj_end / jnp.where(t > 0, t, 1.0)
  a = curvature.alpha(
    t,
    start[1],
    probe.loss.astype(F32),
    start[3],
    jnp.mean(scaled),
    start[2],
    _var(probe.losses),
    start[4],
    _var(scaled),
  )
  consecutive = start[5] == state.count.astype(F32)
  return jnp.where(consecutive, a, state.values["alpha"]).astype(F32)


def _project(probe: Probe, tangents: list[Any]) -> jax.Array:
  """Per-example projections ``gᵢᵀv`` on each tangent: ``float32[k, B]``.

  Dense and Conv leaves from their per-example gradients (when the probe holds them);
  on the gradient itself (a tangent that *is* ``probe.grads``) the Dense leaves go
  through Gram matrices where that is cheaper
  (:func:`~jaxscope.metrics.noise.layer_grad_projections`); forward mode for the rest.
  """
  params = probe.params
  dense, convs = probe.dense, probe.convs
  if not dense and not convs:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *tangents)
    return noise.projections(
      probe.losses_fn, params, probe.args, stacked, has_aux=probe.has_aux
    ).astype(F32)
  p_leaves, treedef = jax.tree.flatten(params)
  t_leaves = [jax.tree.leaves(t) for t in tangents]
  is_grad = [t is probe.grads for t in tangents]
  rows: list[jax.Array | None] = [
    noise.layer_grad_projections(dense, convs, leaves) if g else None
    for g, leaves in zip(is_grad, t_leaves, strict=True)
  ]
  others = [k for k, r in enumerate(rows) if r is None]
  if others:
    stacked = [jnp.stack(xs) for xs in zip(*(t_leaves[k] for k in others), strict=True)]
    for k, row in zip(others, noise.layer_projections(dense, convs, stacked), strict=True):
      rows[k] = row
  out = jnp.stack(rows)
  covered = _covered(dense, convs)
  rest = [i for i in range(len(p_leaves)) if i not in covered]
  if rest:

    def rest_losses(rest_leaves: list[jax.Array], *args: Any) -> jax.Array:
      full = list(p_leaves)
      for i, leaf in zip(rest, rest_leaves, strict=True):
        full[i] = leaf
      return probe.losses_fn(jax.tree.unflatten(treedef, full), *args)

    out = out + noise.projections(
      rest_losses,
      [p_leaves[i] for i in rest],
      probe.args,
      [jnp.stack([leaves[i] for leaves in t_leaves]) for i in rest],
      has_aux=probe.has_aux,
    )
  return out.astype(F32)


def _covered(dense: Any, convs: Any) -> set[int]:
  """Indices of the leaves that captured Dense and Conv layers project directly."""
  layers = (*dense, *convs)
  return {layer.kernel for layer in layers} | {
    layer.bias for layer in layers if layer.bias is not None
  }


def _forward_mode_leaves(probe: Probe) -> bool:
  """Whether :func:`_project` takes some leaf's projections in forward mode (a JVP of the
  per-example losses: a forward pass per direction), not from captured layers.

  Only then does :func:`_project_with_span`'s checked route pay (unless the caller
  declared ``updates_in_span``): it saves the update's direction but checks the span over
  every coordinate and keeps a direct projection as its fallback.
  On a model of captured Dense layers one direction is one contraction per layer, and on
  the MNIST MLP the check and its fallback branch cost more than they saved (α's step
  6.2–7.1 ms with the span, 5.9 ms projecting the update directly; loss-only step 2.8 ms;
  2-core CPU, jax 0.10.2).
  """
  if not probe.dense and not probe.convs:
    return True
  return len(_covered(probe.dense, probe.convs)) < len(jax.tree.leaves(probe.params))


#: Coordinates per leaf on which :func:`_project_with_span` fits the update's coefficients.
SPAN_SAMPLE = 4096


def _span_sample(tree: Any) -> list[jax.Array]:
  """A strided sample of at most :data:`SPAN_SAMPLE` coordinates of every leaf, in float32
  (the same coordinates for trees of the same structure). Each sample keeps its leaf's
  other axes, so a sharded leaf is sampled shard by shard and never gathered."""
  return [stats._subsample(x.astype(F32), SPAN_SAMPLE) for x in jax.tree.leaves(tree)]


def span_fit(basis: list[Any], d: Any, *, everywhere: bool = True) -> tuple[jax.Array, jax.Array]:
  """``(c, in_span)``: the coefficients of ``d ≈ Σₖ cₖ basisₖ`` and whether they reproduce
  ``d`` (relative squared residual ≤ 1e-10).

  The coefficients are fitted on a strided sample of every leaf (:data:`SPAN_SAMPLE`
  coordinates; the inner products of the full trees were five passes over two trees
  each, most of α's cost after its one contraction). With ``everywhere`` the residual is
  taken over every coordinate in one fused pass, so a fit that holds on the sample only
  is rejected; without, on the sample only (a guard against updates that are not in the
  span, not a proof that they are).
  """
  basis_s = [_span_sample(b) for b in basis]
  d_s = _span_sample(d)
  gram = jnp.stack([jnp.stack([tree_vdot(a, b) for b in basis_s]) for a in basis_s])
  rhs = jnp.stack([tree_vdot(a, d_s) for a in basis_s])
  scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(gram))), 1e-30)
  coef = jnp.linalg.lstsq(gram / scale, rhs / scale)[0]
  if not everywhere:
    basis, d = basis_s, d_s
  approx = jax.tree.map(lambda *xs: sum(c * x for c, x in zip(coef, xs, strict=True)), *basis)
  resid = tree_norm(optax.tree.sub(d, approx), squared=True)
  dsq = tree_norm(d, squared=True)
  return coef, resid <= 1e-10 * dsq


def _project_with_span(probe: Probe, tangents: list[Any]) -> jax.Array:
  """Projections on ``tangents``; the last (the update) from the others if in their span.

  SGD's update is ``−ηg`` and heavy-ball momentum's ``−ηg + μ·d_{t−1}`` (constant η):
  both lie in the span of the other directions, so their per-example projections are
  the same combination of the others' and one forward pass is saved. The combination
  comes from the 2×2 (or 1×1) Gram system of a strided sample of at most
  :data:`SPAN_SAMPLE` coordinates per leaf (exact when the update is in the span); it is
  used only when it reproduces the update over *every* coordinate to a relative squared
  residual below 1e-10, else the update is projected directly (Adam and other
  per-coordinate scalings).
  """
  basis, d = tangents[:-1], tangents[-1]
  coef, in_span = span_fit(basis, d)
  return _combined_or_direct(probe, basis, d, coef, in_span)


def _combined_or_direct(
  probe: Probe, basis: list[Any], d: Any, coef: jax.Array, combine: jax.Array
) -> jax.Array:
  """Projections on ``basis`` and then on ``d``: ``d``'s are ``coef`` times the basis's
  where ``combine`` holds, else projected (a ``lax.cond``, so only one route runs)."""
  proj_basis = _project(probe, basis)
  last = jax.lax.cond(
    combine,
    lambda _: coef.astype(F32) @ proj_basis,
    lambda _: _project(probe, [d])[0],
    None,
  )
  return jnp.concatenate([proj_basis, last[None]], axis=0)


#: The declared span route's modes (``alpha_start[6]``): no update verified yet (projected
#: directly), the last update in the span on the sample (combined), or a combined update
#: found outside it (projected directly from then on).
SPAN_UNTESTED, SPAN_VERIFIED, SPAN_FAILED = 0.0, 1.0, 2.0


def _project_declared_span(
  probe: Probe, tangents: list[Any], mode: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Projections on ``tangents``, the last (the update) combined from the others, for
  callers that declared ``updates_in_span``; and whether the update passed the guard.

  The caller states that its updates are ``c₀·g + c₁·d_{t−1}``: SGD (``−ηg``) and
  heavy-ball momentum (``−ηg + μ·(η/η_{t−1})·d_{t−1}``) under any step-size schedule,
  clipping by the global norm included. The update's per-example projections are then
  the same combination of the others', and no contraction (or forward pass) is spent on
  it. The coefficients are fitted on a strided sample of :data:`SPAN_SAMPLE` coordinates
  per leaf, whose residual is the guard (:func:`span_fit` without ``everywhere``). The
  route is chosen by the previous steps (``mode``), so that no branch waits for this
  step's guard:

  * until an update passes the guard (:data:`SPAN_UNTESTED`: the first, or the first
    after a resume with fresh instrument state, or every one of an optimizer that is
    not in the span, such as Adam, weight decay or Nesterov momentum), each is
    projected directly;
  * after one has (:data:`SPAN_VERIFIED`), each is combined from the span, and checked;
  * a combined update that fails the guard (an optimizer whose updates leave the span
    mid-run) makes its start point dropped (that α is missing, not wrong:
    :func:`_start_info`) and every later update projected directly (:data:`SPAN_FAILED`).

  A deviation on unsampled coordinates only is not seen: the declaration is the
  caller's. Without it the update is projected directly (captured Dense and Conv
  layers) or checked over every coordinate first (:func:`_project_with_span`). On the
  MNIST MLP's ``economy`` step that check cost 1.9 ms of each step, more than the
  contraction it saves: 8.4 ms checked over every coordinate, 7.7 ms projecting
  directly, 6.5–6.8 ms on this route (loss-only step 2.7 ms; 2-core CPU, jax 0.10.2).
  Measured steps are consecutive only with ``every=1``, the only case where the last
  update is a direction of momentum's update; the caller uses this route then.
  """
  basis, d = tangents[:-1], tangents[-1]
  coef, in_span = span_fit(basis, d, everywhere=False)
  return _combined_or_direct(probe, basis, d, coef, mode == SPAN_VERIFIED), in_span
