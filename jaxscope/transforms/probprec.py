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

Each phase is a pure function in :mod:`jaxscope.transforms.probprec_phases`; the
Hessian-vector products come from :func:`~jaxscope.metrics.hvp.value_grad_and_hvp`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxscope import tree as jtree
from jaxscope.metrics.hvp import value_grad_and_hvp
from jaxscope.transforms import probprec_phases as phases
from jaxscope.transforms.probprec_phases import _low_rank as _low_rank  # (tests import it here)
from jaxscope.transforms.probprec_state import _COUNTERS, _GROUPS, PreconditionerState
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
    hint = ""
    if isinstance(value, jax.Array) and name in _STATIC_ARGS:
      hint = (
        f" Under optax.inject_hyperparams, pass static_args={_STATIC_ARGS!r}: it shapes the "
        "state, so it cannot be a traced hyperparameter."
      )
    raise ValueError(
      f"probabilistic_preconditioner: {name} must be {expected}, got {value!r}.{hint}"
    )


def _is_number_or_array(x: Any) -> bool:
  """A Python number or a scalar array (a hyperparameter traced by inject_hyperparams)."""
  return _is_number(x) or (isinstance(x, jax.Array) and x.ndim == 0)


#: The arguments that shape the state or the phase schedule: static under
#: ``optax.inject_hyperparams(..., static_args=_STATIC_ARGS)``.
_STATIC_ARGS = ("est_rank", "num_observations", "prior_iterations", "reestimate_every")


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
  log_grad_norm: bool = False,
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
    log_grad_norm: also keep the global norm of the step's gradient (preconditioned in
      phase D) in the state, ``probprec/grad_norm`` of :func:`preconditioner_log` (the
      original's ``get_log``, whose call its runner left commented out). Off by default:
      it is one more pass over the gradients in every step (+0.22 ms on the MNIST MLP's
      4.7 ms apply step, paired and interleaved), and a scope or the ``grad_norm``
      instrument measures the same norms.

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

  cfg = phases.Settings(
    P=prior_iterations,
    M=num_observations,
    r=est_rank,
    wd=weight_decay,
    faithful=faithful,
    apply_preconditioner=apply_preconditioner,
    estimate_hessian=estimate_hessian,
    initial_lr=initial_lr,
    fixed_lr=fixed_lr,
    momentum=momentum,
    fallback_lr=fallback_lr,
    eps=eps,
    labels=labels,
    reestimate_every=reestimate_every,
    log_grad_norm=log_grad_norm,
  )
  _check_settings(cfg)
  return optax.GradientTransformationExtraArgs(
    functools.partial(_init, cfg), functools.partial(_update_fn, cfg)
  )


def _update_fn(
  cfg: phases.Settings,
  updates: optax.Updates,
  state: PreconditionerState,
  params: optax.Params | None = None,
  *,
  hvp_fn: HvpFn | None = None,
  phase: int | None = None,
  **extra_args: Any,
) -> tuple[optax.Updates, PreconditionerState]:
  """The ``update`` of :func:`probabilistic_preconditioner` (other extra args ignored)."""
  del extra_args
  return _update(cfg, updates, state, params, hvp_fn=hvp_fn, phase=phase)


def _check_settings(cfg: phases.Settings) -> None:
  """Raises a ``ValueError`` naming the first invalid argument of the factory."""
  P, M = cfg.P, cfg.M
  for name, v in (("est_rank", cfg.r), ("num_observations", M), ("prior_iterations", P)):
    _check(name, v, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int ≥ 1")
  every = cfg.reestimate_every
  if every is not None:
    _check(
      "reestimate_every",
      every,
      isinstance(every, int) and every >= P + M,
      f"None or an int ≥ prior_iterations + num_observations = "
      f"{P + M} (a cycle must finish its estimation)",
    )
  wd, momentum = cfg.wd, cfg.momentum
  if _is_number(wd):
    _check("weight_decay", wd, wd >= 0 and math.isfinite(wd), "≥ 0")
  if _is_number(momentum):
    _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
  for name, v in (("initial_lr", cfg.initial_lr), ("fixed_lr", cfg.fixed_lr)):
    if v is not None:
      _check(name, v, _is_number_or_array(v), "None or a positive number")
    if v is not None and _is_number(v):
      _check(name, v, v > 0 and math.isfinite(v), "None or a positive number")
  fallback_lr, eps = cfg.fallback_lr, cfg.eps
  for name, v in (("fallback_lr", fallback_lr), ("eps", eps)):
    _check(name, v, _is_number_or_array(v), "a positive number")
    if _is_number(v):
      _check(name, v, v > 0, "a positive number")
  _check("log_grad_norm", cfg.log_grad_norm, isinstance(cfg.log_grad_norm, bool), "a bool")


def _init(cfg: phases.Settings, params: optax.Params) -> PreconditionerState:
  """The zero state of :func:`probabilistic_preconditioner` for ``params``."""
  jtree.leaf_infos(params, argname="probabilistic_preconditioner(params)")
  _, names = _group_ids(params, cfg.labels)
  G, M = len(names), cfg.M
  leaves, treedef = jax.tree_util.tree_flatten(params)

  def per_leaf(fn: Callable[[jax.Array, int], jax.Array]) -> Any:
    return jax.tree_util.tree_unflatten(
      treedef, [fn(p, k) for p, k in zip(leaves, phases.ranks(cfg, params), strict=True)]
    )

  dt = lambda p: jnp.promote_types(p.dtype, jnp.float32)  # noqa: E731
  sdt = _scalar_dtype(params)
  # Buffers a variant never reads are () (no leaves): OnlyAdaptiveSGD carried 15 N floats
  # and 89 leaves, and every leaf costs the jitted step ~5 µs of dispatch (a D step on the
  # MNIST MLP: +0.39 ms over SGD's 6.4 ms; benchmarks/preconditioner.py). The small ones
  # are packed (PreconditionerState): each small donated buffer costs a step in a loop.
  est = cfg.estimate_hessian
  hessian = lambda fn: per_leaf(fn) if est else ()  # noqa: E731
  return PreconditionerState(
    counters=jnp.zeros((len(_COUNTERS),), jnp.int32),
    sum_v=per_leaf(lambda p, k: jnp.zeros((p.size,), dt(p))),
    sum_h=hessian(lambda p, k: jnp.zeros((p.size,), dt(p))),
    abc=jnp.zeros((len(leaves), 3), sdt),
    S=hessian(lambda p, k: jnp.zeros((M, p.size), dt(p))),
    Y=hessian(lambda p, k: jnp.zeros((M, p.size), dt(p))),
    X=hessian(lambda p, k: jnp.zeros((M, p.size), dt(p))),
    rho2_rows=jnp.zeros((len(leaves), M), sdt) if est else (),
    U=hessian(lambda p, k: jnp.zeros((k, p.size), dt(p))),
    sigma_rows=jnp.zeros((len(leaves), max(phases.ranks(cfg, params))), sdt) if est else (),
    groups=jnp.zeros((len(_GROUPS), G), sdt),
    trace=()
    if phases._is_zero(cfg.momentum)
    else jax.tree.map(lambda p: jnp.zeros(p.shape, dt(p)), params),
    grad_norm=jnp.zeros((), sdt) if cfg.log_grad_norm else (),
  )


def _reject_partitions(updates: optax.Updates) -> None:
  """A clear error inside ``optax.multi_transform`` / ``optax.masked``: ``hvp_fn`` is the
  whole model's, the updates only a part of it."""
  masked = jax.tree_util.tree_leaves(
    updates, is_leaf=lambda x: isinstance(x, optax.transforms.MaskedNode)
  )
  if any(isinstance(x, optax.transforms.MaskedNode) for x in masked):
    raise ValueError(
      "probabilistic_preconditioner: it sees only part of the parameters (inside "
      "optax.multi_transform or optax.masked), but hvp_fn multiplies the whole model's "
      "Hessian. Use it on all parameters, with labels= for per-group step sizes (a tree "
      "of labels like multi_transform's)."
    )


def _update(
  cfg: phases.Settings,
  updates: optax.Updates,
  state: PreconditionerState,
  params: optax.Params | None,
  *,
  hvp_fn: HvpFn | None,
  phase: int | None,
) -> tuple[optax.Updates, PreconditionerState]:
  """One update of :func:`probabilistic_preconditioner`: checks, restart, the phase's step."""
  _reject_partitions(updates)
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
  needs_hvp = phase is None or phase < 2 or (phase == 2 and cfg.estimate_hessian)
  if hvp_fn is None and needs_hvp:
    raise ValueError(
      "probabilistic_preconditioner: update needs hvp_fn=, the Hessian-vector product of "
      "the same minibatch loss; build it with jaxscope.transforms.value_grad_and_hvp"
      + ("." if phase is None else f" (phase {PHASES[phase]!r} estimates).")
    )
  jtree.check_same_structure(params, updates, ref_name="params", other_name="grads")
  gid, names = _group_ids(params, cfg.labels)
  st = phases.make_step(
    cfg, updates, params, hvp_fn, gid, len(names), _small_dtype(), _scalar_dtype(params)
  )
  # A conditional copies the state it passes through, so the restart only runs where one
  # can happen: every step under lax.switch, only prior steps with a static phase.
  every = cfg.reestimate_every
  if every is not None and (phase is None or phase == 0):
    restart = (state.count > 0) & (state.count % every == 0)
    state = jax.lax.cond(restart, lambda s: restart_estimate(s), lambda s: s, state)
  upd, new = phases.run_phase(cfg, st, state, phase)
  new = new.replace(
    count=optax.safe_increment(state.count),
    step=jnp.minimum(state.step + 1, cfg.P + cfg.M),
  )
  g_leaves = jax.tree_util.tree_leaves(updates)
  out = [u.reshape(s).astype(x.dtype) for u, s, x in zip(upd, st.shapes, g_leaves, strict=True)]
  return jax.tree_util.tree_unflatten(st.treedef, out), new


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
  return state.replace(
    step=jnp.zeros_like(state.step),
    cycle=state.cycle + 1,
    sum_v=zero(state.sum_v),
    sum_h=zero(state.sum_h),
    abc=zero(state.abc),
    S=zero(state.S),
    Y=zero(state.Y),
    X=zero(state.X),
    rho2_rows=zero(state.rho2_rows),
    U=zero(state.U),
    sigma_rows=zero(state.sigma_rows),
    alpha=zero(state.alpha),
    w=zero(state.w),
    lam=zero(state.lam),
    lr=zero(state.lr),
    trace=zero(state.trace),
  )


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


def _variant_signature(fixed: tuple[str, ...]) -> inspect.Signature:
  """The factory's signature without the arguments a variant fixes.

  The variants take ``**kwargs``; ``optax.inject_hyperparams`` binds the factory's
  signature and would pass ``kwargs=`` as one argument, so they carry the full one.
  """
  sig = inspect.signature(probabilistic_preconditioner, eval_str=True)
  return sig.replace(parameters=[p for n, p in sig.parameters.items() if n not in fixed])


preconditioned_sgd.__signature__ = _variant_signature(())  # type: ignore[attr-defined]
adaptive_sgd.__signature__ = _variant_signature(("apply_preconditioner",))  # type: ignore[attr-defined]
only_adaptive_sgd.__signature__ = _variant_signature(  # type: ignore[attr-defined]
  ("apply_preconditioner", "estimate_hessian")
)


def preconditioner_log(opt_state: Any, group_names: list[str] | None = None) -> dict[str, Any]:
  """The loggable values of the preconditioner state in ``opt_state`` (the original's
  ``get_log`` and more): ``probprec/grad_norm`` (with ``log_grad_norm=True``),
  ``probprec/phase``, ``lr`` (one group),
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
  out: dict[str, Any] = {"probprec/phase": s.phase}
  if not isinstance(s.grad_norm, tuple):
    out["probprec/grad_norm"] = s.grad_norm
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
