"""The low-rank probabilistic preconditioner of de Roos & Hennig (2019) as an optax transform.

The method (F. de Roos and P. Hennig, "Active probabilistic inference on matrices for
pre-conditioning in stochastic optimization", AISTATS 2019, arXiv:1902.07557), as the
PyTorch ``Preconditioner`` of the probabilistic-preconditioning thesis (L. Bald 2019,
``ludwigbald/probprec``) implements it. One *estimation cycle* of ``P + M`` steps, with
``P = prior_iterations``, ``M = num_observations``, the weights held still:

* **Phase A** (steps ``0 … P−1``): probe the Hessian along the (regularised) gradient
  ``v = g + wd·θ``: ``h = H v + wd·v``. Keep per leaf ``Σv``, ``Σh``, ``a = Σ‖v‖²``,
  ``b = Σ⟨v, h⟩``, ``c = Σ‖h‖²``. **Phase A'** (end of step ``P−1``, ``n = P``), per
  parameter group: step size ``α = B/C`` (``Σ sᵀHs / Σ sᵀHHs``), prior scale ``w = B/A``,
  noise ``λ = |A − Q|/n`` with ``Q = Σ_p ‖Σv_p‖²`` (``A, B, C`` the sums of ``a, b, c``), and
  the first posterior column from the mean direction ``s₀ = −α ḡ``, ``y₀ = −α h̄``.
* **Phase B** (steps ``P … P+M−2``): the direction ``d = B̂⁻¹ g`` (Woodbury on the current
  posterior mean ``B̂ = α⁻¹ I + w² X Ŝᵀ``), one Hessian-vector product ``H d + wd·d``, a
  new column ``ŝ = d/ρ``, ``ŷ = Hd/ρ`` (``ρ = ‖d‖``), and the posterior factor
  ``X = Δ K⁻¹`` with ``Δ = Ŷ − b₀Ŝ`` and the Gram matrix ``K = w² ŜᵀŜ + λ²·I`` (paper
  eqs. 8–14 with ``W = wI``, ``Λ = λI``).
* **Phase C** (step ``P+M−1``): the top-``r`` singular pairs of ``B̂`` per leaf, exactly:
  ``[X, Ŝ] = Q [R_X, R_S]`` (QR), core ``C = α⁻¹ I + w² R_X R_Sᵀ`` (at most ``2M × 2M``),
  ``C = U_C Σ V_Cᵀ``, ``U = Q U_C[:, :r]``, ``σ = Σ[:r]``. The step size becomes ``α``.
* **Phase D** (from step ``P+M−1`` on): ``g̃ = P g = g + U (diag(σ^{-1/2}) − I) Uᵀ g``;
  with heavy-ball momentum ``μ`` (reset every cycle), ``b ← μ b + g̃ + wd·θ``,
  ``θ ← θ − α b``.

Estimation steps emit exactly zero updates, as the original. The Hessian blocks are per
*leaf* (a kernel and its bias are separate blocks), the Hessian-vector products are of the
whole model, and ``α, w, λ`` are per parameter *group* (sums over the group's leaves).

**``faithful=True``** reproduces the reference code, quirks included
(``../shared/specs/probprec.md`` §9): the prior mean in the residual is ``α·I`` (not
``α⁻¹·I``) and ``I`` for the first column; the Woodbury core uses ``XᵀŜ`` instead of
``ŜᵀX``; the Gram diagonal uses the un-normalised ``ρ_i²``, so ``K_ii = (w² + λ²) ρ_i²``;
no safeguards (a negative ``α`` becomes a negative learning rate, zero singular values are
dropped). **``faithful=False``** is the consistent version: prior mean ``α⁻¹·I``
everywhere, the exact Woodbury core ``ŜᵀX``, the unit-vector Gram ``K = w²ŜᵀŜ + λ²I``,
``λ = (A − Q/n)/n`` (the mean squared deviation of the probes, zero for noise-free
observations; the code's ``Q`` is the squared norm of the *sum*), and safeguards:
``A``, ``C``, ``w² + λ²`` and ``σ`` floored at ``eps``, an ``α`` that is not finite and
positive replaced by the previous cycle's ``α`` (else ``fallback_lr``), columns with a
zero or non-finite direction masked out, and a non-finite ``U``/``σ`` replaced by the
identity preconditioner, so no NaN reaches the updates from the estimation.

In both modes the small solves and SVDs run in float64 when ``jax_enable_x64`` is on, else
in float32; ``P g`` is applied once with step ``α`` (the code's form, not the paper's
``P²``/``α²`` scaling, spec §9.7). Directions of ``U`` come only from ``span[X, Ŝ]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope import tree as jtree
from jaxscope.transforms.state import find_state

__all__ = [
  "PHASES",
  "PreconditionerState",
  "adaptive_sgd",
  "only_adaptive_sgd",
  "preconditioned_sgd",
  "preconditioner_log",
  "preconditioner_phase",
  "probabilistic_preconditioner",
  "restart_estimate",
  "value_grad_and_hvp",
]

#: Names of the phase codes recorded in the state (``state.phase``).
PHASES = ("prior", "prior_end", "posterior", "build", "apply")

HvpFn = Callable[[Any], Any]


class PreconditionerState(NamedTuple):
  """State of :func:`probabilistic_preconditioner`; its structure is fixed by ``init``.

  Per-leaf buffers are trees with the structure of the parameters; each leaf is
  flattened to a vector of ``N_p`` entries and its columns stored as rows (``S``, ``Y``,
  ``X``: ``[M, N_p]``; ``U``: ``[k_p, N_p]``, one singular vector per row, with
  ``k_p = min(est_rank, N_p − 1)``), which keeps every product a plain matrix product
  without transposes of ``N``-sized buffers.
  """

  count: jax.Array
  """``int32`` updates seen in total."""
  step: jax.Array
  """``int32`` steps since the current estimation cycle started (``k``)."""
  cycle: jax.Array
  """``int32`` index of the current cycle (0 for the first)."""
  phase: jax.Array
  """``int32`` phase of the latest update (index into :data:`PHASES`)."""
  sum_v: Any
  sum_h: Any
  abc: Any
  """Per leaf ``[a, b, c] = [Σ‖v‖², Σ⟨v, h⟩, Σ‖h‖²]``."""
  S: Any
  Y: Any
  X: Any
  rho2: Any
  """Per leaf ``[M]``: squared norms ``ρ_i²`` of the un-normalised directions."""
  U: Any
  sigma: Any
  """Per leaf ``[k_p]``: the singular values of ``B̂`` kept (0: dropped)."""
  alpha: jax.Array
  """``[G]`` step size / inverse prior mean per group."""
  w: jax.Array
  """``[G]`` prior scale per group."""
  lam: jax.Array
  """``[G]`` noise scale per group."""
  lr: jax.Array
  """``[G]`` learning rate in use per group (0 during estimation)."""
  last_alpha: jax.Array
  """``[G]`` the latest valid ``α`` (0 before any), the fallback of ``faithful=False``."""
  trace: Any
  """The momentum buffer (parameter-shaped), reset every cycle."""
  grad_norm: jax.Array
  """Global L2 norm of the gradient of the latest update (preconditioned in phase D)."""


def _is_number(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def _small_dtype() -> Any:
  """float64 when 64-bit types are enabled (globally or by ``jax.enable_x64``), else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def _scalar_dtype(params: Any) -> Any:
  """The dtype of the state's scalars: the parameters' (at least float32)."""
  return jnp.result_type(
    *[jnp.promote_types(p.dtype, jnp.float32) for p in jax.tree_util.tree_leaves(params)]
  )


def _group_ids(params: Any, labels: Any) -> tuple[list[int], list[Hashable]]:
  """Per-leaf group index and the sorted group names from a label tree or callable."""
  n = len(jax.tree_util.tree_leaves(params))
  if labels is None:
    return [0] * n, ["all"]
  if callable(labels):
    labels = labels(params)
  flat, treedef = jax.tree_util.tree_flatten(labels)
  p_def = jax.tree_util.tree_structure(params)
  if treedef != p_def or len(flat) != n:
    raise ValueError(
      "probabilistic_preconditioner: labels must be a tree with the parameters' structure "
      f"(one label per leaf, like optax.multi_transform), got {treedef} for {p_def}."
    )
  names = sorted(set(flat), key=str)
  index = {k: i for i, k in enumerate(names)}
  return [index[lab] for lab in flat], names


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
  if not ok:
    raise ValueError(f"probabilistic_preconditioner: {name} must be {expected}, got {value!r}.")


def probabilistic_preconditioner(
  est_rank: int = 2,
  num_observations: int = 5,
  prior_iterations: int = 10,
  weight_decay: float = 0.0,
  *,
  labels: Any = None,
  reestimate_every: int | None = None,
  initial_lr: float | None = None,
  fixed_lr: float | None = None,
  momentum: float = 0.0,
  faithful: bool = True,
  apply_preconditioner: bool = True,
  estimate_hessian: bool = True,
  fallback_lr: float = 0.01,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  """The low-rank probabilistic preconditioner with its SGD step (de Roos & Hennig 2019).

  ``update(grads, state, params, *, hvp_fn, phase=None)`` needs ``hvp_fn(v)``, the product of the
  Hessian of the *same minibatch loss* (without weight decay) with a parameter-shaped
  tangent ``v``; :func:`value_grad_and_hvp` builds it with ``jax.linearize`` so the
  gradient is not computed twice. It is only evaluated in the estimation phases. The
  transformation emits the final updates (it *is* the optimizer, like ``optax.sgd``):
  zeros during estimation, then ``−lr · (P g + wd·θ)`` with optional momentum. See the
  module docstring for the phases and what ``faithful`` changes.

  By default the phase is chosen on the device by ``lax.switch`` on the step counter
  (works in ``lax.scan``). A static ``phase=preconditioner_phase(count, …)`` instead
  traces only that phase: jit the step with ``static_argnames="phase"`` (five variants);
  the build and apply phases then need no ``hvp_fn``, and no conditional copies the
  estimation buffers (the fast path of the training loop and the benchmark).

  Args:
    est_rank: ``r``, the rank of the preconditioner per leaf (``min(r, N_p − 1)``).
    num_observations: ``M``, posterior observations per cycle (≥ 1).
    prior_iterations: ``P``, steps of prior statistics per cycle (≥ 1).
    weight_decay: ``wd``, L2 added to the probes, the HVPs and (unpreconditioned) the step.
    labels: parameter groups, a tree of hashable labels with the parameters' structure
      or a callable ``params -> labels`` (as ``optax.multi_transform``); ``α, w, λ`` and
      the learning rate are per group. Default: one group.
    reestimate_every: restart the estimation every this many updates (the original
      restarted every epoch: pass the steps per epoch); the momentum resets with it.
      ``None``: estimate once.
    initial_lr: the learning rate of the first cycle instead of ``α`` (later cycles
      use ``α``); the code before its param-group refactor and the paper's CIFAR runs.
    fixed_lr: always this learning rate (the thesis's "tuned" variants).
    momentum: heavy-ball momentum ``μ`` of the inner SGD (0: plain SGD, the default).
    faithful: reproduce the reference code's quirks (``True``) or use the consistent
      formulas with safeguards (``False``).
    apply_preconditioner: ``False`` estimates everything but steps with plain SGD at
      ``α`` (the thesis's AdaptiveSGD).
    estimate_hessian: ``False`` keeps only the prior phase (``α``), no posterior, no
      preconditioner (OnlyAdaptiveSGD); steps ``P … P+M−2`` still emit zero updates.
    fallback_lr: ``faithful=False``: the step size when ``α`` is not finite and positive
      and no earlier cycle gave a valid one.
    eps: ``faithful=False``: the floor of ``A``, ``C``, ``w² + λ²`` and ``σ``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`PreconditionerState`.

  Raises:
    ValueError: invalid arguments (named), ``update`` without ``params`` or
      ``hvp_fn``, labels that do not match the parameters.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxscope.transforms import preconditioned_sgd, value_grad_and_hvp
    >>> A = jnp.diag(jnp.array([10.0, 1.0, 0.1]))
    >>> loss = lambda p: 0.5 * p["x"] @ A @ p["x"]
    >>> params = {"x": jnp.ones(3)}
    >>> tx = preconditioned_sgd(est_rank=1, num_observations=2, prior_iterations=2)
    >>> state = tx.init(params)
    >>> for _ in range(6):   # 2 prior steps, 1 posterior step, then 3 updates
    ...   value, grads, hvp = value_grad_and_hvp(loss, params)
    ...   updates, state = tx.update(grads, state, params, hvp_fn=hvp)
    ...   params = jax.tree.map(jnp.add, params, updates)
    >>> PHASES[int(state.phase)], round(float(state.alpha[0]), 3)
    ('apply', 0.1)
    >>> round(float(loss(params)), 2)   # from 5.55
    0.9
  """
  for name, v in (
    ("est_rank", est_rank),
    ("num_observations", num_observations),
    ("prior_iterations", prior_iterations),
  ):
    _check(name, v, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int ≥ 1")
  if reestimate_every is not None:
    _check(
      "reestimate_every",
      reestimate_every,
      isinstance(reestimate_every, int) and reestimate_every >= prior_iterations + num_observations,
      f"None or an int ≥ prior_iterations + num_observations = "
      f"{prior_iterations + num_observations} (a cycle must finish its estimation)",
    )
  if _is_number(weight_decay):
    _check("weight_decay", weight_decay, weight_decay >= 0 and math.isfinite(weight_decay), "≥ 0")
  if _is_number(momentum):
    _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
  for name, v in (("initial_lr", initial_lr), ("fixed_lr", fixed_lr)):
    if v is not None and _is_number(v):
      _check(name, v, v > 0 and math.isfinite(v), "None or a positive number")
  _check("fallback_lr", fallback_lr, _is_number(fallback_lr) and fallback_lr > 0, "positive")
  _check("eps", eps, _is_number(eps) and eps > 0, "positive")

  P, M, r = prior_iterations, num_observations, est_rank
  wd = weight_decay

  def ranks(params: Any) -> list[int]:
    return [min(r, int(p.size) - 1) for p in jax.tree_util.tree_leaves(params)]

  def init_fn(params: optax.Params) -> PreconditionerState:
    jtree.leaf_infos(params, argname="probabilistic_preconditioner(params)")
    gid, names = _group_ids(params, labels)
    G = len(names)
    del gid

    def zeros(shape: tuple[int, ...], dtype: Any) -> jax.Array:
      return jnp.zeros(shape, dtype)

    leaves, treedef = jax.tree_util.tree_flatten(params)

    def per_leaf(fn: Callable[[jax.Array, int], jax.Array]) -> Any:
      return jax.tree_util.tree_unflatten(
        treedef, [fn(p, k) for p, k in zip(leaves, ranks(params), strict=True)]
      )

    dt = lambda p: jnp.promote_types(p.dtype, jnp.float32)  # noqa: E731
    sdt = _scalar_dtype(params)
    return PreconditionerState(
      count=jnp.zeros((), jnp.int32),
      step=jnp.zeros((), jnp.int32),
      cycle=jnp.zeros((), jnp.int32),
      phase=jnp.zeros((), jnp.int32),
      sum_v=per_leaf(lambda p, k: zeros((p.size,), dt(p))),
      sum_h=per_leaf(lambda p, k: zeros((p.size,), dt(p))),
      abc=per_leaf(lambda p, k: zeros((3,), sdt)),
      S=per_leaf(lambda p, k: zeros((M, p.size), dt(p))),
      Y=per_leaf(lambda p, k: zeros((M, p.size), dt(p))),
      X=per_leaf(lambda p, k: zeros((M, p.size), dt(p))),
      rho2=per_leaf(lambda p, k: zeros((M,), sdt)),
      U=per_leaf(lambda p, k: zeros((k, p.size), dt(p))),
      sigma=per_leaf(lambda p, k: zeros((k,), sdt)),
      alpha=zeros((G,), sdt),
      w=zeros((G,), sdt),
      lam=zeros((G,), sdt),
      lr=zeros((G,), sdt),
      last_alpha=zeros((G,), sdt),
      trace=jax.tree.map(lambda p: jnp.zeros(p.shape, dt(p)), params),
      grad_norm=jnp.zeros((), sdt),
    )

  def update_fn(
    updates: optax.Updates,
    state: PreconditionerState,
    params: optax.Params | None = None,
    *,
    hvp_fn: HvpFn | None = None,
    phase: int | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, PreconditionerState]:
    del extra_args
    if params is None:
      raise ValueError(
        "probabilistic_preconditioner: update needs the parameters; call "
        "tx.update(grads, state, params, hvp_fn=hvp_fn)."
      )
    if phase is not None and (
      isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < len(PHASES)
    ):
      raise ValueError(
        f"probabilistic_preconditioner: phase must be None or a static int in "
        f"[0, {len(PHASES)}) (see preconditioner_phase), got {phase!r}."
      )
    needs_hvp = phase is None or phase < 2 or (phase == 2 and estimate_hessian)
    if hvp_fn is None and needs_hvp:
      raise ValueError(
        "probabilistic_preconditioner: update needs hvp_fn=, the Hessian-vector product of "
        "the same minibatch loss; build it with jaxscope.transforms.value_grad_and_hvp"
        + ("." if phase is None else f" (phase {PHASES[phase]!r} estimates).")
      )
    jtree.check_same_structure(params, updates, ref_name="params", other_name="grads")
    small = _small_dtype()
    sdt = _scalar_dtype(params)
    gid, names = _group_ids(params, labels)
    G = len(names)
    gid_arr = jnp.asarray(gid, jnp.int32)
    g_leaves, treedef = jax.tree_util.tree_flatten(updates)
    p_leaves = jax.tree_util.tree_leaves(params)
    shapes = [p.shape for p in p_leaves]
    L = len(p_leaves)

    def flat(tree: Any) -> list[jax.Array]:
      return [x.reshape(-1) for x in jax.tree_util.tree_leaves(tree)]

    def unflat(vecs: list[jax.Array]) -> Any:
      return jax.tree_util.tree_unflatten(
        treedef, [v.reshape(s) for v, s in zip(vecs, shapes, strict=True)]
      )

    def leaves(tree: Any) -> list[jax.Array]:
      return jax.tree_util.tree_leaves(tree)

    def tree_of(xs: list[jax.Array]) -> Any:
      return jax.tree_util.tree_unflatten(treedef, xs)

    def group_sum(xs: list[jax.Array]) -> jax.Array:
      return jnp.zeros((G,), sdt).at[gid_arr].add(jnp.stack(xs).astype(sdt))

    g = [x.reshape(-1).astype(jnp.promote_types(x.dtype, jnp.float32)) for x in g_leaves]
    theta = [p.reshape(-1).astype(gi.dtype) for p, gi in zip(p_leaves, g, strict=True)]

    def hvp(vecs: list[jax.Array]) -> list[jax.Array]:
      tangent = jax.tree_util.tree_unflatten(
        treedef,
        [v.reshape(s).astype(p.dtype) for v, s, p in zip(vecs, shapes, p_leaves, strict=True)],
      )
      out = flat(hvp_fn(tangent))
      return [o.astype(v.dtype) + wd * v for o, v in zip(out, vecs, strict=True)]

    # ----------------------------------------------------------------- restart
    # (A conditional copies the state it passes through, so it only runs where a restart
    # can happen: every step under lax.switch, only prior steps with a static phase.)
    if reestimate_every is not None and (phase is None or phase == 0):
      restart = (state.count > 0) & (state.count % reestimate_every == 0)
      state = jax.lax.cond(restart, lambda s: restart_estimate(s), lambda s: s, state)
    k = state.step

    # ----------------------------------------------------------------- phases
    def zero_updates() -> list[jax.Array]:
      return [jnp.zeros_like(x) for x in g]

    def gnorm(vecs: list[jax.Array]) -> jax.Array:
      return jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(sdt))) for v in vecs))

    def prior_step(s: PreconditionerState) -> PreconditionerState:
      v = [gi + wd * th for gi, th in zip(g, theta, strict=True)]
      h = hvp(v)
      sum_v = [a + b for a, b in zip(leaves(s.sum_v), v, strict=True)]
      sum_h = [a + b for a, b in zip(leaves(s.sum_h), h, strict=True)]
      abc = [
        old + jnp.stack([jnp.vdot(vi, vi), jnp.vdot(vi, hi), jnp.vdot(hi, hi)]).astype(sdt)
        for old, vi, hi in zip(leaves(s.abc), v, h, strict=True)
      ]
      return s._replace(sum_v=tree_of(sum_v), sum_h=tree_of(sum_h), abc=tree_of(abc))

    def prior_end(s: PreconditionerState) -> PreconditionerState:
      n = float(P)
      abc = jnp.stack(leaves(s.abc))  # [L, 3]
      A = group_sum(list(abc[:, 0]))
      B = group_sum(list(abc[:, 1]))
      C = group_sum(list(abc[:, 2]))
      Q = group_sum([jnp.vdot(x, x) for x in leaves(s.sum_v)])
      if faithful:
        alpha = B / C
        w = B / A
        lam = jnp.abs(A - Q) / n
      else:
        alpha = B / jnp.maximum(C, eps)
        ok = jnp.isfinite(alpha) & (alpha > 0)
        prev = jnp.where(s.last_alpha > 0, s.last_alpha, fallback_lr)
        alpha = jnp.where(ok, alpha, prev)
        w = jnp.abs(B) / jnp.maximum(A, eps)
        w = jnp.where(jnp.isfinite(w), w, 0.0)
        lam = jnp.maximum(A - Q / n, 0.0) / n
        lam = jnp.where(jnp.isfinite(lam), lam, 0.0)
      s = s._replace(alpha=alpha, w=w, lam=lam)
      if not estimate_hessian:
        return s
      # Column 0 from the mean probe direction.
      S, Y, X, rho2 = [], [], [], []
      for i, (sv, sh) in enumerate(zip(leaves(s.sum_v), leaves(s.sum_h), strict=True)):
        a, ww, ll = alpha[gid[i]], w[gid[i]], lam[gid[i]]
        gbar, hbar = sv / n, sh / n
        rho = jnp.abs(a) * jnp.linalg.norm(gbar)
        if faithful:
          s0 = -a * gbar / rho
          y0 = -a * hbar / rho
          x0 = (y0 - s0) / ((ww**2 + ll**2) * rho**2)
        else:
          good = jnp.isfinite(rho) & (rho > 0) & jnp.all(jnp.isfinite(hbar))
          safe = jnp.where(good, rho, 1.0)
          s0 = jnp.where(good, -a * gbar / safe, 0.0)
          y0 = jnp.where(good, -a * hbar / safe, 0.0)
          x0 = jnp.where(good, (y0 - s0 / a) / jnp.maximum(ww**2 + ll**2, eps), 0.0)
          rho = jnp.where(good, rho, 0.0)
        S.append(leaves(s.S)[i].at[0].set(s0.astype(sv.dtype)))
        Y.append(leaves(s.Y)[i].at[0].set(y0.astype(sv.dtype)))
        X.append(leaves(s.X)[i].at[0].set(x0.astype(sv.dtype)))
        rho2.append(leaves(s.rho2)[i].at[0].set((rho**2).astype(sdt)))
      return s._replace(S=tree_of(S), Y=tree_of(Y), X=tree_of(X), rho2=tree_of(rho2))

    def posterior_X(
      Si: jax.Array, Yi: jax.Array, rho2: jax.Array, filled: jax.Array, a: Any, ww: Any, ll: Any
    ) -> jax.Array:
      """``X = Δ K⁻¹`` over the ``filled`` columns (the others are zero).

      Columns are stored as rows (``[M, N]``), so this computes ``Xᵀ = K⁻¹ Δᵀ``
      (``K`` is symmetric).
      """
      mask = filled
      if not faithful:
        mask = mask & (rho2 > 0)
      Sd, Yd = Si.astype(small), Yi.astype(small)
      a, ww, ll = (jnp.asarray(x, small) for x in (a, ww, ll))
      gram = Sd @ Sd.T
      if faithful:
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
      if faithful:
        # K⁻¹ (M × M) then one matrix product: a LAPACK solve with N right-hand sides
        # would transpose the [M, N] buffer twice.
        Xd = jnp.linalg.solve(K, jnp.eye(M, dtype=small)) @ delta
      else:
        # Noise-free observations (λ = 0) along nearly parallel directions make K
        # singular: the pseudo-inverse gives the minimum-norm posterior factor.
        Xd = jnp.linalg.pinv(K, hermitian=True) @ delta
        Xd = jnp.where(jnp.isfinite(Xd), Xd, 0.0)
      return Xd.astype(Si.dtype)

    def posterior_step(s: PreconditionerState) -> PreconditionerState:
      if not estimate_hessian:
        return s
      m = k - P + 1  # Columns held before this step.
      Ss, Ys, Xs = leaves(s.S), leaves(s.Y), leaves(s.X)
      d = []
      for i in range(L):
        a, ww = s.alpha[gid[i]], s.w[gid[i]]
        Xi, Si = Xs[i].astype(small), Ss[i].astype(small)
        # (Rows are columns: XᵀŜ is Xi @ Siᵀ, X z is z @ Xi.)
        core = Xi @ Si.T if faithful else Si @ Xi.T
        core = jnp.eye(M, dtype=small) + a.astype(small) * ww.astype(small) ** 2 * core
        z = jnp.linalg.solve(core, Si @ g[i].astype(small))
        di = a * g[i] - (a**2 * ww**2).astype(small) * (z @ Xi)
        if not faithful:  # A singular Woodbury core: fall back to the prior's α g.
          di = jnp.where(jnp.all(jnp.isfinite(di)), di, a * g[i])
        d.append(di.astype(g[i].dtype))
      h = hvp(d)
      filled = jnp.arange(M) < m + 1
      newS, newY, newX, newR = [], [], [], []
      for i in range(L):
        rho = jnp.linalg.norm(d[i])
        if faithful:
          si, yi = d[i] / rho, h[i] / rho
        else:
          good = jnp.isfinite(rho) & (rho > 0) & jnp.all(jnp.isfinite(h[i]))
          safe = jnp.where(good, rho, 1.0)
          si = jnp.where(good, d[i] / safe, 0.0)
          yi = jnp.where(good, h[i] / safe, 0.0)
          rho = jnp.where(good, rho, 0.0)
        Si = Ss[i].at[m].set(si)
        Yi = Ys[i].at[m].set(yi)
        ri = leaves(s.rho2)[i].at[m].set((rho**2).astype(sdt))
        j = gid[i]
        Xi = posterior_X(Si, Yi, ri, filled, s.alpha[j], s.w[j], s.lam[j])
        newS.append(Si)
        newY.append(Yi)
        newX.append(Xi)
        newR.append(ri)
      return s._replace(S=tree_of(newS), Y=tree_of(newY), X=tree_of(newX), rho2=tree_of(newR))

    def build(s: PreconditionerState) -> PreconditionerState:
      Us, sig = [], []
      if estimate_hessian:
        for i, (Xi, Si, kp) in enumerate(zip(leaves(s.X), leaves(s.S), ranks(params), strict=True)):
          if kp <= 0:
            Us.append(leaves(s.U)[i])
            sig.append(leaves(s.sigma)[i])
            continue
          a, ww = s.alpha[gid[i]].astype(small), s.w[gid[i]].astype(small)
          Ui, si = _low_rank(Xi, Si, a, ww, kp, small)
          if faithful:
            keep = si > 0  # The code drops zero singular values.
          else:
            ok = jnp.all(jnp.isfinite(Ui)) & jnp.all(jnp.isfinite(si))
            # Directions with σ = 1/α carry no curvature information (they fill up a
            # degenerate span[X, Ŝ]): leave them unscaled like the rest of the space.
            rel = max(1e-6, 100 * float(jnp.finfo(small).eps))
            informative = jnp.abs(si - 1 / a) > rel * jnp.abs(1 / a)
            keep = ok & jnp.isfinite(si) & informative
            si = jnp.where(keep, jnp.maximum(si, eps), 0.0)
          Ui = jnp.where(keep[:, None], Ui, 0.0)
          si = jnp.where(keep, si, 0.0)
          Us.append(Ui.astype(Xi.dtype))
          sig.append(si.astype(sdt))
      else:
        Us, sig = leaves(s.U), leaves(s.sigma)
      lr = s.alpha
      if initial_lr is not None:
        lr = jnp.where(s.cycle == 0, jnp.asarray(initial_lr, sdt), lr)
      if fixed_lr is not None:
        lr = jnp.full((G,), fixed_lr, sdt)
      valid = jnp.isfinite(s.alpha) & (s.alpha > 0)
      last = jnp.where(valid, s.alpha, s.last_alpha)
      trace = jax.tree.map(jnp.zeros_like, s.trace)
      return s._replace(U=tree_of(Us), sigma=tree_of(sig), lr=lr, last_alpha=last, trace=trace)

    def apply(s: PreconditionerState) -> tuple[list[jax.Array], PreconditionerState]:
      gt = []
      for gi, Ui, si in zip(g, leaves(s.U), leaves(s.sigma), strict=True):
        if apply_preconditioner and Ui.shape[0] > 0:
          scale = jnp.where(si > 0, 1.0 / jnp.sqrt(jnp.where(si > 0, si, 1.0)) - 1.0, 0.0)
          # Row by row (k dot products, then k fused axpys): no transpose of U.
          coef = [scale[j].astype(gi.dtype) * jnp.vdot(Ui[j], gi) for j in range(Ui.shape[0])]
          gi = gi + sum(c * Ui[j] for j, c in enumerate(coef))
        gt.append(gi)
      plain = _is_number(momentum) and momentum == 0
      decay = not (_is_number(wd) and wd == 0)
      tr = [gi + wd * th if decay else gi for gi, th in zip(gt, theta, strict=True)]
      if not plain:  # Heavy ball; with μ = 0 there is no trace to write.
        tr = [momentum * b + t for b, t in zip(flat(s.trace), tr, strict=True)]
      upd = [-s.lr[gid[i]].astype(tr[i].dtype) * tr[i] for i in range(L)]
      s = s._replace(grad_norm=gnorm(gt))
      return upd, (s if plain else s._replace(trace=unflat(tr)))

    def branch_prior(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
      s = prior_step(s)
      return zero_updates(), s._replace(phase=jnp.asarray(0, jnp.int32), grad_norm=gnorm(g))

    def branch_prior_end(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
      s = prior_end(prior_step(s))
      return zero_updates(), s._replace(phase=jnp.asarray(1, jnp.int32), grad_norm=gnorm(g))

    def branch_posterior(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
      s = posterior_step(s)
      return zero_updates(), s._replace(phase=jnp.asarray(2, jnp.int32), grad_norm=gnorm(g))

    def branch_build(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
      upd, s = apply(build(s))
      return upd, s._replace(phase=jnp.asarray(3, jnp.int32))

    def branch_apply(s: PreconditionerState) -> tuple[Any, PreconditionerState]:
      upd, s = apply(s)
      return upd, s._replace(phase=jnp.asarray(4, jnp.int32))

    branches = [branch_prior, branch_prior_end, branch_posterior, branch_build, branch_apply]
    if phase is None:
      idx = jnp.where(
        k < P - 1,
        0,
        jnp.where(k == P - 1, 1, jnp.where(k < P + M - 1, 2, jnp.where(k == P + M - 1, 3, 4))),
      )
      upd, new = jax.lax.switch(idx, branches, state)
    else:
      upd, new = branches[phase](state)
    new = new._replace(
      count=optax.safe_increment(state.count),
      step=jnp.minimum(state.step + 1, P + M),
    )
    out = [u.reshape(s).astype(x.dtype) for u, s, x in zip(upd, shapes, g_leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out), new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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


def preconditioner_phase(
  count: int,
  *,
  prior_iterations: int = 10,
  num_observations: int = 5,
  reestimate_every: int | None = None,
) -> int:
  """The phase (index into :data:`PHASES`) of the update number ``count``, on the host.

  The phase is a function of the update count alone (unless :func:`restart_estimate` is
  called by hand), so a training loop can pass it as a *static* ``phase=`` to
  ``tx.update`` and jit one step per phase: the apply step then carries no conditional
  and needs no ``hvp_fn`` (no ``jax.linearize``). XLA:CPU copies every buffer a
  ``lax.switch``/``lax.cond`` passes through, which for the estimation buffers
  (``(2 + 3M)·N`` floats) costs several plain SGD steps; the static phase avoids it.

  Example:
    >>> from jaxscope.transforms import PHASES, preconditioner_phase
    >>> [PHASES[preconditioner_phase(c, prior_iterations=2, num_observations=2,
    ...                               reestimate_every=5)] for c in range(6)]
    ['prior', 'prior_end', 'posterior', 'build', 'apply', 'prior']
  """
  P, M = prior_iterations, num_observations
  k = count % reestimate_every if reestimate_every else count
  if k < P - 1:
    return 0
  if k == P - 1:
    return 1
  if k < P + M - 1:
    return 2
  return 3 if k == P + M - 1 else 4


def restart_estimate(state: PreconditionerState) -> PreconditionerState:
  """Starts a new estimation cycle: counters, buffers, ``α, w, λ`` and momentum reset.

  ``last_alpha`` (the fallback of ``faithful=False``) and ``count`` are kept. This is
  the original's ``start_estimate()``; ``reestimate_every`` calls it automatically.
  """
  zero = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
  return state._replace(
    step=jnp.zeros_like(state.step),
    cycle=state.cycle + 1,
    sum_v=zero(state.sum_v),
    sum_h=zero(state.sum_h),
    abc=zero(state.abc),
    S=zero(state.S),
    Y=zero(state.Y),
    X=zero(state.X),
    rho2=zero(state.rho2),
    U=zero(state.U),
    sigma=zero(state.sigma),
    alpha=zero(state.alpha),
    w=zero(state.w),
    lam=zero(state.lam),
    lr=zero(state.lr),
    trace=zero(state.trace),
  )


def value_grad_and_hvp(
  loss_fn: Callable[..., Any], params: Any, *args: Any, has_aux: bool = False, **kwargs: Any
) -> tuple[Any, Any, HvpFn]:
  """The loss, its gradient and a Hessian-vector product at ``params``, in one pass.

  ``jax.linearize`` of ``jax.value_and_grad(loss_fn)`` returns the value and gradient
  together with the linear map ``v ↦ (∇L·v, H v)`` (forward-over-reverse), so the
  gradient is not recomputed for the HVPs.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` returning a scalar (or
      ``(scalar, aux)`` with ``has_aux``).
    params: where to evaluate.
    *args: further arguments of ``loss_fn`` (the minibatch).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``(value, grads, hvp_fn)`` with ``hvp_fn(v) = H v`` (``value`` is ``(loss, aux)``
    with ``has_aux``).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxscope.transforms import value_grad_and_hvp
    >>> loss = lambda p: jnp.sum(p**3)
    >>> v, g, hvp = value_grad_and_hvp(loss, jnp.array([1.0, 2.0]))
    >>> [float(x) for x in hvp(jnp.array([1.0, 0.0]))]   # H = diag(6x)
    [6.0, 0.0]
  """

  def vg(p: Any) -> Any:
    return jax.value_and_grad(loss_fn, has_aux=has_aux)(p, *args, **kwargs)

  (value, grads), lin = jax.linearize(vg, params)

  def hvp_fn(v: Any) -> Any:
    return lin(v)[1]

  return value, grads, hvp_fn


def preconditioned_sgd(
  est_rank: int = 2,
  num_observations: int = 5,
  prior_iterations: int = 10,
  weight_decay: float = 0.0,
  **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """PreconditionedSGD: estimate, precondition, step with ``α`` (see
  :func:`probabilistic_preconditioner` for the arguments)."""
  return probabilistic_preconditioner(
    est_rank, num_observations, prior_iterations, weight_decay, **kwargs
  )


def adaptive_sgd(
  est_rank: int = 2,
  num_observations: int = 5,
  prior_iterations: int = 10,
  weight_decay: float = 0.0,
  **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """AdaptiveSGD: estimate everything, but step with plain SGD at ``α`` (no
  preconditioning)."""
  return probabilistic_preconditioner(
    est_rank,
    num_observations,
    prior_iterations,
    weight_decay,
    apply_preconditioner=False,
    **kwargs,
  )


def only_adaptive_sgd(
  est_rank: int = 2,
  num_observations: int = 5,
  prior_iterations: int = 10,
  weight_decay: float = 0.0,
  **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """OnlyAdaptiveSGD: the prior phase only (``α``), then SGD at ``α``; the ``M − 1``
  posterior steps still emit zero updates, as the original."""
  return probabilistic_preconditioner(
    est_rank,
    num_observations,
    prior_iterations,
    weight_decay,
    apply_preconditioner=False,
    estimate_hessian=False,
    **kwargs,
  )


def preconditioner_log(opt_state: Any, group_names: list[str] | None = None) -> dict[str, Any]:
  """The loggable values of the preconditioner state in ``opt_state`` (the original's
  ``get_log`` and more): ``probprec/grad_norm``, ``probprec/phase``, ``lr`` (one group),
  and per group ``probprec/{alpha,w,lambda,lr}/{group}`` and per leaf
  ``probprec/sigma_{j}/{leaf}``. Usable inside ``jit``; ``{}`` when there is none.

  Args:
    opt_state: an optimizer state holding one :class:`PreconditionerState`.
    group_names: the names of the groups in order (default ``"0"``, ``"1"``, …; with
      one group, ``"all"``).
  """
  s = find_state(opt_state, PreconditionerState, caller="preconditioner_log")
  if s is None:
    return {}
  G = s.alpha.shape[0]
  names = group_names or (["all"] if G == 1 else [str(i) for i in range(G)])
  out: dict[str, Any] = {"probprec/grad_norm": s.grad_norm, "probprec/phase": s.phase}
  if G == 1:
    out["lr"] = s.lr[0]
  for key, arr in (("alpha", s.alpha), ("w", s.w), ("lambda", s.lam), ("lr", s.lr)):
    for i, n in enumerate(names):
      out[f"probprec/{key}/{n}"] = arr[i]
  for path, sig in jax.tree_util.tree_flatten_with_path(s.sigma)[0]:
    name = jtree.path_name(path)
    for j in range(sig.shape[0]):
      out[f"probprec/sigma_{j}/{name}"] = sig[j]
  return out
