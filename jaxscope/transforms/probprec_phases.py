"""The phases of the probabilistic preconditioner's update, as pure functions.

:func:`~jaxscope.transforms.probprec.probabilistic_preconditioner` (see its module for the
method, de Roos & Hennig 2019) runs one of five phases per update; each is a function of
the static :class:`Settings`, the update's :class:`Step` (gradient, parameters and HVP as
flat per-leaf vectors) and the :class:`~jaxscope.transforms.probprec.PreconditionerState`:

* :func:`prior_step` (phase A): accumulate the prior statistics of one probe;
* :func:`prior_end` (phase A'): ``α, w, λ`` per group and the first posterior column;
* :func:`posterior_step` (phase B): one posterior observation along ``B̂⁻¹ g``
  (:func:`posterior_x` solves for the posterior factor);
* :func:`build` (phase C): the top-``r`` singular pairs of ``B̂`` (:func:`_low_rank`) and
  the learning rate;
* :func:`apply` (phase D): the preconditioned (momentum) SGD step.

:func:`run_phase` picks the phase, on the device (``lax.switch``) or statically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from jaxscope.transforms.probprec_state import PreconditionerState

__all__ = [
  "Settings",
  "Step",
  "apply",
  "build",
  "make_step",
  "posterior_step",
  "posterior_x",
  "prior_end",
  "prior_step",
  "ranks",
  "run_phase",
]


class Settings(NamedTuple):
  """The static arguments of :func:`~jaxscope.transforms.probprec.probabilistic_preconditioner`."""

  P: int
  """``prior_iterations``."""
  M: int
  """``num_observations``."""
  r: int
  """``est_rank``."""
  wd: Any
  """``weight_decay``."""
  faithful: bool
  apply_preconditioner: bool
  estimate_hessian: bool
  initial_lr: Any
  fixed_lr: Any
  momentum: Any
  fallback_lr: float
  eps: float
  labels: Any
  """The parameter groups (a label tree or callable), used by the transform."""
  reestimate_every: int | None
  """Used by the transform."""
  log_grad_norm: bool = False
  """Keep the gradient's global norm in the state (one more pass per step)."""


class Step(NamedTuple):
  """One update's inputs, flattened per leaf, and the layout to undo the flattening."""

  g: list[jax.Array]
  """The gradient per leaf, flat, in at least float32."""
  theta: list[jax.Array]
  """The parameters per leaf, flat, in the gradient's dtype."""
  hvp: Callable[[list[jax.Array]], list[jax.Array]] | None
  """``v ↦ H v + wd·v`` on flat per-leaf vectors (``None`` when no phase needs it)."""
  treedef: Any
  shapes: list[tuple[int, ...]]
  gid: list[int]
  """The group index of each leaf."""
  G: int
  """The number of groups."""
  ranks: list[int]
  """``k_p = min(est_rank, N_p − 1)`` per leaf."""
  small: Any
  """The dtype of the small solves and SVDs (float64 with x64, else float32)."""
  sdt: Any
  """The dtype of the state's scalars."""


def _leaves(tree: Any) -> list[jax.Array]:
  return jax.tree_util.tree_leaves(tree)


def _is_zero(x: Any) -> bool:
  """Whether ``x`` is the Python number 0 (a static zero: the term can be left out)."""
  return isinstance(x, int | float) and not isinstance(x, bool) and x == 0


def make_step(
  cfg: Settings,
  updates: Any,
  params: Any,
  hvp_fn: Callable[[Any], Any] | None,
  gid: list[int],
  G: int,
  small: Any,
  sdt: Any,
) -> Step:
  """The :class:`Step` of one update: flat per-leaf gradient and parameters, and the HVP."""
  g_leaves, treedef = jax.tree_util.tree_flatten(updates)
  p_leaves = _leaves(params)
  shapes = [p.shape for p in p_leaves]
  g = [x.reshape(-1).astype(jnp.promote_types(x.dtype, jnp.float32)) for x in g_leaves]
  theta = [p.reshape(-1).astype(gi.dtype) for p, gi in zip(p_leaves, g, strict=True)]
  hvp = None
  if hvp_fn is not None:

    def hvp(vecs: list[jax.Array]) -> list[jax.Array]:
      tangent = jax.tree_util.tree_unflatten(
        treedef,
        [v.reshape(s).astype(p.dtype) for v, s, p in zip(vecs, shapes, p_leaves, strict=True)],
      )
      out = [x.reshape(-1) for x in _leaves(hvp_fn(tangent))]
      return [o.astype(v.dtype) + cfg.wd * v for o, v in zip(out, vecs, strict=True)]

  return Step(g, theta, hvp, treedef, shapes, gid, G, ranks(cfg, params), small, sdt)


def ranks(cfg: Settings, params: Any) -> list[int]:
  """``k_p = min(est_rank, N_p − 1)``, the preconditioner's rank on each leaf."""
  return [min(cfg.r, int(p.size) - 1) for p in _leaves(params)]


def _tree_of(st: Step, xs: list[jax.Array]) -> Any:
  return jax.tree_util.tree_unflatten(st.treedef, xs)


def _unflat(st: Step, vecs: list[jax.Array]) -> Any:
  return _tree_of(st, [v.reshape(s) for v, s in zip(vecs, st.shapes, strict=True)])


def _group_sum(st: Step, xs: list[jax.Array]) -> jax.Array:
  gid = jnp.asarray(st.gid, jnp.int32)
  return jnp.zeros((st.G,), st.sdt).at[gid].add(jnp.stack(xs).astype(st.sdt))


def _gnorm(st: Step, vecs: list[jax.Array]) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(st.sdt))) for v in vecs))


def _zero_updates(st: Step) -> list[jax.Array]:
  return [jnp.zeros_like(x) for x in st.g]


# --------------------------------------------------------------------------- phase A, A'


def prior_step(cfg: Settings, st: Step, s: PreconditionerState) -> PreconditionerState:
  """Phase A: probe ``v = g + wd·θ``, ``h = H v + wd·v``; accumulate ``v``, ``h`` and
  ``[‖v‖², ⟨v, h⟩, ‖h‖²]`` per leaf."""
  v = [gi + cfg.wd * th for gi, th in zip(st.g, st.theta, strict=True)]
  h = st.hvp(v)
  sum_v = [a + b for a, b in zip(_leaves(s.sum_v), v, strict=True)]
  rows = [
    jnp.stack([jnp.vdot(vi, vi), jnp.vdot(vi, hi), jnp.vdot(hi, hi)])
    for vi, hi in zip(v, h, strict=True)
  ]
  s = s.replace(sum_v=_tree_of(st, sum_v), abc=s.abc + jnp.stack(rows).astype(st.sdt))
  if not cfg.estimate_hessian:  # Only the posterior's first column reads the sum of h.
    return s
  sum_h = [a + b for a, b in zip(_leaves(s.sum_h), h, strict=True)]
  return s.replace(sum_h=_tree_of(st, sum_h))


def _prior_scales(
  cfg: Settings, st: Step, s: PreconditionerState
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``α = B/C``, ``w = B/A`` and ``λ`` per group from the prior sums (module docstring)."""
  n = float(cfg.P)
  abc = s.abc  # [L, 3]
  A = _group_sum(st, list(abc[:, 0]))
  B = _group_sum(st, list(abc[:, 1]))
  C = _group_sum(st, list(abc[:, 2]))
  Q = _group_sum(st, [jnp.vdot(x, x) for x in _leaves(s.sum_v)])
  if cfg.faithful:
    return B / C, B / A, jnp.abs(A - Q) / n
  eps = cfg.eps
  alpha = B / jnp.maximum(C, eps)
  ok = jnp.isfinite(alpha) & (alpha > 0)
  prev = jnp.where(s.last_alpha > 0, s.last_alpha, cfg.fallback_lr)
  alpha = jnp.where(ok, alpha, prev)
  w = jnp.abs(B) / jnp.maximum(A, eps)
  w = jnp.where(jnp.isfinite(w), w, 0.0)
  lam = jnp.maximum(A - Q / n, 0.0) / n
  lam = jnp.where(jnp.isfinite(lam), lam, 0.0)
  return alpha, w, lam


def prior_end(cfg: Settings, st: Step, s: PreconditionerState) -> PreconditionerState:
  """Phase A': ``α, w, λ`` per group; column 0 from the mean probe ``s₀ = −α ḡ, y₀ = −α h̄``."""
  alpha, w, lam = _prior_scales(cfg, st, s)
  s = s.replace(alpha=alpha, w=w, lam=lam)
  if not cfg.estimate_hessian:
    return s
  n = float(cfg.P)
  S, Y, X, rho2 = [], [], [], []
  for i, (sv, sh) in enumerate(zip(_leaves(s.sum_v), _leaves(s.sum_h), strict=True)):
    j = st.gid[i]
    a, ww, ll = alpha[j], w[j], lam[j]
    gbar, hbar = sv / n, sh / n
    rho = jnp.abs(a) * jnp.linalg.norm(gbar)
    if cfg.faithful:
      s0 = -a * gbar / rho
      y0 = -a * hbar / rho
      x0 = (y0 - s0) / ((ww**2 + ll**2) * rho**2)
    else:
      good = jnp.isfinite(rho) & (rho > 0) & jnp.all(jnp.isfinite(hbar))
      safe = jnp.where(good, rho, 1.0)
      s0 = jnp.where(good, -a * gbar / safe, 0.0)
      y0 = jnp.where(good, -a * hbar / safe, 0.0)
      x0 = jnp.where(good, (y0 - s0 / a) / jnp.maximum(ww**2 + ll**2, cfg.eps), 0.0)
      rho = jnp.where(good, rho, 0.0)
    S.append(_leaves(s.S)[i].at[0].set(s0.astype(sv.dtype)))
    Y.append(_leaves(s.Y)[i].at[0].set(y0.astype(sv.dtype)))
    X.append(_leaves(s.X)[i].at[0].set(x0.astype(sv.dtype)))
    rho2.append(_leaves(s.rho2)[i].at[0].set((rho**2).astype(st.sdt)))
  return s.replace(S=_tree_of(st, S), Y=_tree_of(st, Y), X=_tree_of(st, X), rho2=_tree_of(st, rho2))


# --------------------------------------------------------------------------- phase B


def posterior_x(
  cfg: Settings,
  small: Any,
  Si: jax.Array,
  Yi: jax.Array,
  rho2: jax.Array,
  filled: jax.Array,
  a: Any,
  ww: Any,
  ll: Any,
) -> jax.Array:
  """``X = Δ K⁻¹`` over the ``filled`` columns (the others are zero).

  Columns are stored as rows (``[M, N]``), so this computes ``Xᵀ = K⁻¹ Δᵀ``
  (``K`` is symmetric).
  """
  M, eps = cfg.M, cfg.eps
  mask = filled
  if not cfg.faithful:
    mask = mask & (rho2 > 0)
  Sd, Yd = Si.astype(small), Yi.astype(small)
  a, ww, ll = (jnp.asarray(x, small) for x in (a, ww, ll))
  gram = Sd @ Sd.T
  if cfg.faithful:
    K = ww**2 * gram
    K = K.at[jnp.diag_indices(M)].set((ww**2 + ll**2) * rho2.astype(small))
    delta = Yd - a * Sd
  else:
    K = ww**2 * gram + ll**2 * jnp.eye(M, dtype=small)
    K = K + (eps - jnp.minimum(jnp.diag(K), eps)) * jnp.eye(M, dtype=small)
    delta = Yd - Sd / a
  m2 = mask[:, None] & mask[None, :]
  K = jnp.where(m2, K, jnp.eye(M, dtype=small))
  delta = jnp.where(mask[:, None], delta, 0.0)
  if cfg.faithful:
    # K⁻¹ (M × M) then one matrix product: a LAPACK solve with N right-hand sides
    # would transpose the [M, N] buffer twice.
    Xd = jnp.linalg.solve(K, jnp.eye(M, dtype=small)) @ delta
  else:
    # Noise-free observations (λ = 0) along nearly parallel directions make K
    # singular: the pseudo-inverse gives the minimum-norm posterior factor.
    Xd = jnp.linalg.pinv(K, hermitian=True) @ delta
    Xd = jnp.where(jnp.isfinite(Xd), Xd, 0.0)
  return Xd.astype(Si.dtype)


def _search_directions(cfg: Settings, st: Step, s: PreconditionerState) -> list[jax.Array]:
  """``d = B̂⁻¹ g`` per leaf by Woodbury on the posterior mean ``B̂ = α⁻¹ I + w² X Ŝᵀ``."""
  M, small = cfg.M, st.small
  d = []
  for i, (Xi, Si) in enumerate(zip(_leaves(s.X), _leaves(s.S), strict=True)):
    gi = st.g[i]
    a, ww = s.alpha[st.gid[i]], s.w[st.gid[i]]
    Xi, Si = Xi.astype(small), Si.astype(small)
    # (Rows are columns: XᵀŜ is Xi @ Siᵀ, X z is z @ Xi.)
    core = Xi @ Si.T if cfg.faithful else Si @ Xi.T
    core = jnp.eye(M, dtype=small) + a.astype(small) * ww.astype(small) ** 2 * core
    z = jnp.linalg.solve(core, Si @ gi.astype(small))
    di = a * gi - (a**2 * ww**2).astype(small) * (z @ Xi)
    if not cfg.faithful:  # A singular Woodbury core: fall back to the prior's α g.
      di = jnp.where(jnp.all(jnp.isfinite(di)), di, a * gi)
    d.append(di.astype(gi.dtype))
  return d


def posterior_step(
  cfg: Settings, st: Step, s: PreconditionerState, k: jax.Array
) -> PreconditionerState:
  """Phase B: one observation ``ŝ = d/ρ``, ``ŷ = Hd/ρ`` along ``d = B̂⁻¹ g`` at cycle step ``k``."""
  if not cfg.estimate_hessian:
    return s
  m = k - cfg.P + 1  # Columns held before this step.
  d = _search_directions(cfg, st, s)
  h = st.hvp(d)
  filled = jnp.arange(cfg.M) < m + 1
  Ss, Ys, rho2s = _leaves(s.S), _leaves(s.Y), _leaves(s.rho2)
  newS, newY, newX, newR = [], [], [], []
  for i in range(len(d)):
    rho = jnp.linalg.norm(d[i])
    if cfg.faithful:
      si, yi = d[i] / rho, h[i] / rho
    else:
      good = jnp.isfinite(rho) & (rho > 0) & jnp.all(jnp.isfinite(h[i]))
      safe = jnp.where(good, rho, 1.0)
      si = jnp.where(good, d[i] / safe, 0.0)
      yi = jnp.where(good, h[i] / safe, 0.0)
      rho = jnp.where(good, rho, 0.0)
    Si = Ss[i].at[m].set(si)
    Yi = Ys[i].at[m].set(yi)
    ri = rho2s[i].at[m].set((rho**2).astype(st.sdt))
    j = st.gid[i]
    Xi = posterior_x(cfg, st.small, Si, Yi, ri, filled, s.alpha[j], s.w[j], s.lam[j])
    newS.append(Si)
    newY.append(Yi)
    newX.append(Xi)
    newR.append(ri)
  return s.replace(
    S=_tree_of(st, newS), Y=_tree_of(st, newY), X=_tree_of(st, newX), rho2=_tree_of(st, newR)
  )


# --------------------------------------------------------------------------- phase C, D


def _factorise(cfg: Settings, st: Step, s: PreconditionerState) -> tuple[list[Any], list[Any]]:
  """``U`` and ``σ`` per leaf: the top-``k_p`` singular pairs of ``B̂`` (with safeguards)."""
  small = st.small
  Us, sig = [], []
  for i, (Xi, Si, kp) in enumerate(zip(_leaves(s.X), _leaves(s.S), st.ranks, strict=True)):
    if kp <= 0:
      Us.append(_leaves(s.U)[i])
      sig.append(_leaves(s.sigma)[i])
      continue
    a, ww = s.alpha[st.gid[i]].astype(small), s.w[st.gid[i]].astype(small)
    Ui, si = _low_rank(Xi, Si, a, ww, kp, small)
    if cfg.faithful:
      keep = si > 0  # The code drops zero singular values.
    else:
      ok = jnp.all(jnp.isfinite(Ui)) & jnp.all(jnp.isfinite(si))
      # Directions with σ = 1/α carry no curvature information (they fill up a
      # degenerate span[X, Ŝ]): leave them unscaled like the rest of the space.
      rel = max(1e-6, 100 * float(jnp.finfo(small).eps))
      informative = jnp.abs(si - 1 / a) > rel * jnp.abs(1 / a)
      keep = ok & jnp.isfinite(si) & informative
      si = jnp.where(keep, jnp.maximum(si, cfg.eps), 0.0)
    Ui = jnp.where(keep[:, None], Ui, 0.0)
    si = jnp.where(keep, si, 0.0)
    Us.append(Ui.astype(Xi.dtype))
    sig.append(si.astype(st.sdt))
  return Us, sig


def build(cfg: Settings, st: Step, s: PreconditionerState) -> PreconditionerState:
  """Phase C: ``U``, ``σ`` of the preconditioner, the learning rate, a fresh momentum."""
  if cfg.estimate_hessian:
    Us, sig = _factorise(cfg, st, s)
    s = s.replace(U=_tree_of(st, Us), sigma=_tree_of(st, sig))
  lr = s.alpha
  if cfg.initial_lr is not None:
    lr = jnp.where(s.cycle == 0, jnp.asarray(cfg.initial_lr, st.sdt), lr)
  if cfg.fixed_lr is not None:
    lr = jnp.full((st.G,), cfg.fixed_lr, st.sdt)
  valid = jnp.isfinite(s.alpha) & (s.alpha > 0)
  last = jnp.where(valid, s.alpha, s.last_alpha)
  trace = jax.tree.map(jnp.zeros_like, s.trace)
  return s.replace(lr=lr, last_alpha=last, trace=trace)


def apply(
  cfg: Settings, st: Step, s: PreconditionerState
) -> tuple[list[jax.Array], PreconditionerState]:
  """Phase D: ``g̃ = g + U (diag(σ^{-1/2}) − I) Uᵀ g``, ``b ← μ b + g̃ + wd·θ``, ``−lr·b``."""
  if not (cfg.apply_preconditioner and cfg.estimate_hessian):  # No U to apply.
    gt = list(st.g)
  else:
    gt = _preconditioned(st, s)
  plain = _is_zero(cfg.momentum)
  decay = not _is_zero(cfg.wd)
  tr = [gi + cfg.wd * th if decay else gi for gi, th in zip(gt, st.theta, strict=True)]
  if not plain:  # Heavy ball; with μ = 0 there is no trace to write.
    tr = [cfg.momentum * b + t for b, t in zip(_flat(s.trace), tr, strict=True)]
  upd = [-s.lr[st.gid[i]].astype(tr[i].dtype) * tr[i] for i in range(len(tr))]
  if cfg.log_grad_norm:
    s = s.replace(grad_norm=_gnorm(st, gt))
  return upd, (s if plain else s.replace(trace=_unflat(st, tr)))


def _preconditioned(st: Step, s: PreconditionerState) -> list[jax.Array]:
  """``g + U (diag(σ^{-1/2}) − I) Uᵀ g`` per leaf (leaves of rank 0 unchanged)."""
  gt = []
  for gi, Ui, si in zip(st.g, _leaves(s.U), _leaves(s.sigma), strict=True):
    if Ui.shape[0] > 0:
      scale = jnp.where(si > 0, 1.0 / jnp.sqrt(jnp.where(si > 0, si, 1.0)) - 1.0, 0.0)
      # Row by row (k dot products, then k fused axpys): no transpose of U.
      coef = [scale[j].astype(gi.dtype) * jnp.vdot(Ui[j], gi) for j in range(Ui.shape[0])]
      gi = gi + sum(c * Ui[j] for j, c in enumerate(coef))
    gt.append(gi)
  return gt


def _flat(tree: Any) -> list[jax.Array]:
  return [x.reshape(-1) for x in _leaves(tree)]


# --------------------------------------------------------------------------- dispatch


def run_phase(
  cfg: Settings, st: Step, state: PreconditionerState, phase: int | None
) -> tuple[list[jax.Array], PreconditionerState]:
  """The flat updates and the new state of the ``phase`` (``None``: by ``state.step``)."""
  k = state.step
  P, M = cfg.P, cfg.M

  def estimating(s: PreconditionerState, code: int) -> tuple[Any, PreconditionerState]:
    s = s.replace(phase=jnp.asarray(code, jnp.int32))
    if cfg.log_grad_norm:
      s = s.replace(grad_norm=_gnorm(st, st.g))
    return _zero_updates(st), s

  def branch_prior(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
    return estimating(prior_step(cfg, st, s), 0)

  def branch_prior_end(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
    return estimating(prior_end(cfg, st, prior_step(cfg, st, s)), 1)

  def branch_posterior(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
    return estimating(posterior_step(cfg, st, s, k), 2)

  def branch_build(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
    upd, s = apply(cfg, st, build(cfg, st, s))
    return upd, s.replace(phase=jnp.asarray(3, jnp.int32))

  def branch_apply(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
    upd, s = apply(cfg, st, s)
    return upd, s.replace(phase=jnp.asarray(4, jnp.int32))

  branches = [branch_prior, branch_prior_end, branch_posterior, branch_build, branch_apply]
  if phase is not None:
    return branches[phase](state)
  idx = jnp.where(
    k < P - 1,
    0,
    jnp.where(k == P - 1, 1, jnp.where(k < P + M - 1, 2, jnp.where(k == P + M - 1, 3, 4))),
  )
  return jax.lax.switch(idx, branches, state)


# --------------------------------------------------------------------------- low rank


def _low_rank(
  X: jax.Array, S: jax.Array, a: jax.Array, w: jax.Array, k: int, small: Any
) -> tuple[jax.Array, jax.Array]:
  """The top-``k`` left singular pairs of ``B̂ = α⁻¹ I + w² X Sᵀ`` (columns as rows).

  ``B̂`` acts as ``α⁻¹`` outside ``span[X, S]``, so its informative singular pairs are
  those of the small core of ``B̂`` on that span (spec §9.13): with ``Z = [X, S] = Q R``
  (Householder QR, only ``R`` is formed) and the SVD ``R = W Σ_R Pᵀ``, the columns of
  ``Q W = Z P Σ_R⁻¹`` are an orthonormal basis of the span and ``Z = (Q W) Σ_R Pᵀ``;
  the core is ``C = α⁻¹ I + w² R'_X R'_Sᵀ`` with ``R' = Σ_R Pᵀ``, ``C = U_C Σ V_Cᵀ``,
  and ``U = Z P Σ_R⁻¹ U_C[:, :k]``, one small matrix applied to ``Z``. (Forming ``Q``
  explicitly doubles the QR's cost; a Gram-matrix basis is faster still but loses
  ``cond(Z)²`` instead of ``cond(Z)`` in precision, measured as 2 % in the direction
  in float32.) Directions with ``σ_R ≤ 2M·ε·max σ_R`` are numerically absent (a
  rank-deficient span, e.g. ``N < 2M``): dropped, with zero rows of ``U`` and zero rows
  and columns of the core, so their singular value 0 never outranks a real one.

  Returns:
    ``U`` as ``[k, N]`` rows and ``σ`` ``[k]``.
  """
  Z = jnp.concatenate([X, S], axis=0)  # [2M, N]
  Zs = Z.astype(small)
  R = jnp.linalg.qr(Zs.T, mode="r")  # [min(N, 2M), 2M]
  _, sR, Pt = jnp.linalg.svd(R, full_matrices=False)
  tol = Z.shape[0] * jnp.finfo(small).eps * jnp.max(sR)
  keep = sR > tol
  sR = jnp.where(keep, sR, 0.0)
  Rp = sR[:, None] * Pt  # [r, 2M]: Z = (Q W) R'.
  M = X.shape[0]
  core = jnp.diag(keep.astype(small)) / a + w**2 * (Rp[:, :M] @ Rp[:, M:].T)
  Uc, sv, _ = jnp.linalg.svd(core)
  inv = jnp.where(keep, 1.0 / jnp.where(keep, sR, 1.0), 0.0)
  T = (Uc[:, :k].T * inv[None, :]) @ Pt  # [k, 2M]: U = T Z.
  U = (T.astype(Z.dtype) @ Z) if small == Z.dtype else (T @ Zs)
  return U, sv[:k]
