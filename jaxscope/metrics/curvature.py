"""Curvature of the mini-batch loss from Hessian-vector products, on the device.

Everything here is a pure function of pytrees with fixed shapes, safe inside ``jit``,
``lax.scan`` and ``lax.cond``. The Hessian ``H = ∇²L(θ)`` of the mini-batch loss is never
formed: it is reached through a callable ``hvp(v) = H v`` (a pytree like the parameters in,
the same out), which :func:`hvp_fn` builds by forward-over-reverse differentiation
(:mod:`jaxscope.metrics.hvp`).

The quantities are those of Cockpit (Schneider, Dangel & Hennig, "Cockpit: A Practical
Debugging Tool for the Training of Deep Neural Networks", NeurIPS 2021):

* ``HessMaxEV``: :func:`max_eigenvalue_update` (power iteration or Lanczos, warm-started
  across training steps) and the one-shot :func:`max_eigenvalue`;
* ``HessTrace``: :func:`hutchinson` (Rademacher probes) or, for small models, the exact
  diagonal :func:`exact_hessian_diagonal`; per-layer traces by :func:`leaf_traces`;
* ``TICDiag`` / ``TICTrace``: :func:`tic` and :func:`tic_trace`;
* ``Alpha``: :func:`alpha`, the normalised step length of a noise-aware quadratic fit.

Cockpit gets the Hessian diagonal from BackPACK's second-order backpropagation; here it is
estimated (Hutchinson) or computed column by column (exact), both from HVPs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxscope.metrics import lanczos
from jaxscope.metrics.base import tree_norm, tree_vdot
from jaxscope.metrics.hutchinson import exact_hessian_diagonal, hutchinson, leaf_traces, rademacher
from jaxscope.metrics.hvp import Hvp, batched_hvp, value_grad_and_hvp

__all__ = [
  "MaxEigState",
  "alpha",
  "batched_hvp",
  "exact_hessian_diagonal",
  "hutchinson",
  "hvp_fn",
  "leaf_traces",
  "max_eigenvalue",
  "max_eigenvalue_init",
  "max_eigenvalue_update",
  "rademacher",
  "tic",
  "tic_trace",
]

PyTree = Any

_F32 = jnp.float32


# --------------------------------------------------------------------------- HVPs


def hvp_fn(
  loss_fn: Callable[..., Any], params: PyTree, *args: Any, has_aux: bool = False, **kwargs: Any
) -> tuple[Any, PyTree, Hvp]:
  """The loss, its gradient and the Hessian-vector product ``v ↦ H v`` at ``params``.

  The same as :func:`jaxscope.metrics.hvp.value_grad_and_hvp` (forward-over-reverse:
  ``jax.linearize`` of the gradient, so the forward and backward pass run once and each
  ``hvp(v)`` costs about one more; :func:`batched_hvp` applies ``H`` to ``k`` vectors as one
  batch through the same linearisation). Arguments and return value as there:
  ``(value, grads, hvp)`` with ``hvp(v) = H v`` for ``v`` a pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxscope.metrics.curvature import hvp_fn
    >>> value, grads, hvp = hvp_fn(lambda p: jnp.sum(p**3), jnp.array([1.0, 2.0]))
    >>> [float(x) for x in hvp(jnp.array([1.0, 1.0]))]   # H = diag(6θ)
    [6.0, 12.0]
  """
  return value_grad_and_hvp(loss_fn, params, *args, has_aux=has_aux, **kwargs)


def _num_params(tree: PyTree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _normalise(v: PyTree) -> tuple[PyTree, jax.Array]:
  n = tree_norm(v).astype(_F32)
  return optax.tree.scale(1.0 / jnp.maximum(n, 1e-30), v), n


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  return tree_vdot(a, b).astype(_F32)


# --------------------------------------------------------------------------- top eigenvalue


class MaxEigState(NamedTuple):
  """Warm-start state of :func:`max_eigenvalue_update`; its structure is fixed by init."""

  vector: PyTree
  """The current eigenvector estimate, a unit-norm pytree like the parameters."""
  value: jax.Array
  """``float32`` latest eigenvalue estimate (0 before the first update; NaN after a bad one)."""
  count: jax.Array
  """``int32`` number of updates made."""
  residual: jax.Array
  """``float32`` ``‖H x − λ x‖`` of the unit vector ``x`` whose Rayleigh quotient is ``value``
  (``inf`` before the first update): some eigenvalue of ``H`` lies within it of ``value``."""


def max_eigenvalue_init(params: PyTree, key: jax.Array) -> MaxEigState:
  """A random unit start vector (standard normal entries, normalised), value 0, count 0.

  Args:
    params: the parameters (only their structure, shapes and dtypes are used).
    key: a PRNG key.

  Returns:
    The initial :class:`MaxEigState`.
  """
  v = optax.tree.random_like(key, params, jax.random.normal)
  v, _ = _normalise(v)
  return MaxEigState(
    vector=v,
    value=jnp.zeros((), _F32),
    count=jnp.zeros((), jnp.int32),
    residual=jnp.full((), jnp.inf, _F32),
  )


def _power(
  hvp: Hvp, v: PyTree, iters: int, product: PyTree | None = None
) -> tuple[jax.Array, jax.Array, PyTree]:
  """``iters`` power steps from the unit ``v``: ``(λ, residual, next vector)``.

  ``λ = vᵀHv`` and ``residual = ‖Hv − λv‖`` belong to the last vector fed in; ``product``
  is ``H v`` for the first one when already known (saves one HVP).
  """

  def body(i: Any, carry: tuple[PyTree, jax.Array, jax.Array]) -> tuple[PyTree, ...]:
    v, _, _ = carry
    hv = product if (product is not None and isinstance(i, int) and i == 0) else hvp(v)
    hv = jax.tree.map(lambda a, b: a.astype(b.dtype), hv, v)
    lam = _vdot(v, hv)  # Rayleigh quotient vᵀHv, ‖v‖ = 1.
    res = tree_norm(jax.tree.map(lambda a, b: a - lam.astype(a.dtype) * b, hv, v)).astype(_F32)
    new_v, n = _normalise(hv)
    ok = jnp.isfinite(n) & (n > 0)
    v = optax.tree.where(ok, new_v, v)
    return v, lam, res

  carry = (v, jnp.zeros((), _F32), jnp.full((), jnp.inf, _F32))
  if iters <= 4 or product is not None:
    # Unrolled: XLA:CPU runs a convolution's HVP inside a while loop ~40x slower than the
    # same HVP outside one (measured on CIFAR-10 3c3d), and warm starts use 1-2 iterations.
    for i in range(iters):
      carry = body(i, carry)
  else:
    carry = lax.fori_loop(0, iters, body, carry)
  v, lam, res = carry
  return lam, res, v


def _check_update_args(
  method: str, iters: int, product: PyTree | None, tol: float | None, refine_iters: int
) -> None:
  """The argument checks of :func:`max_eigenvalue_update` (a ``ValueError`` naming each)."""
  if method not in ("power", "lanczos"):
    raise ValueError(f"max_eigenvalue_update: method must be 'power' or 'lanczos', got {method!r}.")
  if not isinstance(iters, int) or iters < 1:
    raise ValueError(f"max_eigenvalue_update: iters must be a positive int, got {iters!r}.")
  if method == "lanczos" and iters < 2:
    raise ValueError("max_eigenvalue_update: method='lanczos' needs iters >= 2, got 1.")
  if product is not None and method != "power":
    raise ValueError("max_eigenvalue_update: product= is only used with method='power'.")
  if tol is not None and (not isinstance(refine_iters, int) or refine_iters < 2):
    raise ValueError(
      f"max_eigenvalue_update: refine_iters must be an int >= 2, got {refine_iters!r}."
    )


def max_eigenvalue_update(
  hvp: Hvp,
  state: MaxEigState,
  *,
  iters: int = 1,
  method: str = "power",
  product: PyTree | None = None,
  tol: float | None = None,
  refine_iters: int = 20,
) -> MaxEigState:
  """Refines the largest-magnitude Hessian eigenvalue from the stored (warm-start) vector.

  ``method="power"``: ``iters`` steps of power iteration, each one HVP:
  ``λ = vᵀHv`` (Rayleigh quotient, ``‖v‖ = 1``), then ``v ← Hv/‖Hv‖``. The stored value is
  the Rayleigh quotient of the last vector fed in, the stored vector the one after it.
  Power iteration converges to the eigenvalue of largest **magnitude** ``|λ|``, at rate
  ``|λ₂/λ₁|`` per step; it returns the negative eigenvalue if that one dominates
  (Cockpit's ``HessMaxEV`` behaves the same way: it runs up to 100 power iterations from a
  random vector each step, rtol 1e-3). Carried across training steps, the vector makes one
  or a few iterations per step enough while the Hessian drifts slowly.

  ``method="lanczos"``: ``iters`` Lanczos steps (``iters`` HVPs) from the stored vector,
  with full reorthogonalisation (Gram-Schmidt twice against all previous Lanczos vectors),
  so ``(iters + 1) × P`` extra memory: meant for ``iters ≲ 30``. The tridiagonal
  ``T = QᵀHQ`` is diagonalised and its Ritz value of largest magnitude (and its Ritz
  vector ``Q y``, the new warm start) kept. From the same start vector the Krylov space
  contains the power-iteration vector, so ``k`` Lanczos steps are at least as accurate as
  ``k`` power steps and usually much better (error falling like a Chebyshev polynomial,
  ``~exp(−2k √gap)``, rather than ``~(1 − gap)^k``). Restarting from the Ritz vector every
  training step discards the rest of the Krylov space, though, so with very few steps per
  call (2–3) the warm-started power iteration, which keeps accumulating powers of ``H``,
  can converge faster; use Lanczos with ``iters ≳ 5`` (it needs ``iters ≥ 2``: one step
  only evaluates the Rayleigh quotient and never moves the vector). ``iters`` is capped at
  the number of parameters ``P``; an invariant subspace (breakdown, ``β ≤ 64 ε ‖Hq‖``)
  ends the recurrence early with exact zeros in ``T``.

  **Residual and refinement.** Every update also stores ``residual = ‖Hx − λx‖`` of the
  unit vector ``x`` whose Rayleigh quotient ``λ`` it reports (power: the last vector fed in;
  Lanczos: the Ritz vector, ``β_k |y_k|``). For symmetric ``H`` some eigenvalue lies within
  ``residual`` of ``λ`` (Bauer–Fike; Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1),
  and the Rayleigh quotient's own error is about ``residual² / gap``: the residual is a
  conservative error bar. With ``tol`` set, a refinement of ``refine_iters`` Lanczos steps
  from the stored vector runs (under ``lax.cond``, so it costs nothing when not taken) on
  the first update (``count == 0``: a random start, never converged in one step) and
  whenever ``residual > tol · |λ|``; its Ritz pair replaces the step's result when its
  residual is smaller. Cold-started one-step power iteration is useless early in training
  (on the digits MLP it read 2·10⁻⁴ for a true 0.39); the refinement makes the first
  recorded step converged.

  Non-finite products: a NaN (or Inf) in ``H v`` gives ``value = NaN``, never an
  exception, and the stored vector is kept (not re-randomised: it is the best estimate so
  far, and keeping it needs no key in the state). A product of zero norm (``v`` in the
  null space, e.g. ``H = 0``) also keeps the vector, with value 0. The next finite step
  resumes from the kept vector.

  The refinement keeps five vectors, not its Lanczos basis
  (:func:`jaxscope.metrics.lanczos.lanczos_two_pass`: the recurrence until the Ritz value
  has converged, ``m ≤ refine_iters`` steps, then
  again to rebuild the Ritz vector, and one product for its residual). A stored basis is
  ``(refine_iters + 1) × P`` floats, and XLA reserves a branch's buffers on every call,
  taken or not: on the MNIST MLP (1.3 M parameters) the ``full`` instruments' temporaries
  went from 185 to 51 MB (153 to 37 MB with :data:`jaxscope.xla.FEWER_COPIES`), on the
  3c3d CNN, whose activations dominate, from 397 to 355 MB, and on a model of ``P``
  parameters the step no longer needs ``21 P`` floats beside it. The price is up to
  ``2 · refine_iters`` products on the (rare) steps that refine, against
  ``refine_iters``.

  Args:
    hvp: ``v ↦ H v`` of the current mini-batch loss (e.g. from :func:`hvp_fn`).
    state: the previous state (from :func:`max_eigenvalue_init` or an update).
    iters: HVPs in this update (static, ≥ 1).
    method: ``"power"`` or ``"lanczos"``.
    product: ``H v`` for the stored (normalised) vector when already computed, e.g. in a
      batched pass with other tangents (power only: it replaces the first HVP).
    tol: relative residual above which the refinement runs; ``None``: never.
    refine_iters: Lanczos steps of a refinement (static, ≥ 2; capped at ``P``).

  Returns:
    The new :class:`MaxEigState` (``value`` and ``residual`` are ``float32``).
  """
  _check_update_args(method, iters, product, tol, refine_iters)
  v, n0 = _normalise(state.vector)
  v = optax.tree.where(jnp.isfinite(n0) & (n0 > 0), v, state.vector)
  cap = max(_num_params(v), 1)
  if method == "power":
    lam, res, new_v = _power(hvp, v, iters, product)
  else:
    lam, res, new_v = lanczos.lanczos(hvp, v, min(iters, cap))
  if tol is not None and cap > 1:
    need = (state.count == 0) | ~(res <= tol * jnp.abs(lam))

    def refine(_: Any) -> tuple[jax.Array, jax.Array, PyTree]:
      r_lam, r_res, r_v = lanczos.lanczos_two_pass(hvp, v, min(refine_iters, cap))
      better = jnp.isfinite(r_lam) & ~(r_res > res)
      return (
        jnp.where(better, r_lam, lam),
        jnp.where(better, r_res, res),
        optax.tree.where(better, r_v, new_v),
      )

    lam, res, new_v = lax.cond(need, refine, lambda _: (lam, res, new_v), None)
  new_v, n = _normalise(new_v)
  keep = jnp.isfinite(lam) & jnp.isfinite(n) & (n > 0.5) & _finite(new_v)
  new_v = optax.tree.where(keep, new_v, state.vector)
  # Not below the float32 rounding of λ itself (the Ritz residual can be).
  res = jnp.maximum(res, 16 * jnp.finfo(_F32).eps * jnp.abs(lam))
  return MaxEigState(
    vector=new_v,
    value=lam.astype(_F32),
    count=state.count + jnp.ones((), jnp.int32),
    residual=jnp.where(jnp.isfinite(lam), res, jnp.nan).astype(_F32),
  )


def max_eigenvalue(
  hvp: Hvp, params: PyTree, key: jax.Array, iters: int = 100, method: str = "lanczos"
) -> tuple[jax.Array, PyTree]:
  """One-shot largest-magnitude Hessian eigenvalue from a random start.

  :func:`max_eigenvalue_init` followed by one :func:`max_eigenvalue_update` with ``iters``
  HVPs. Lanczos (the default) keeps ``iters + 1`` vectors (capped at ``P + 1``); use
  ``method="power"`` where memory is short.

  Args:
    hvp: ``v ↦ H v``.
    params: the parameters (structure, shapes and dtypes).
    key: PRNG key of the start vector.
    iters: number of HVPs (static).
    method: ``"lanczos"`` or ``"power"``.

  Returns:
    ``(value, vector)``: the ``float32`` eigenvalue estimate and its unit eigenvector.
  """
  state = max_eigenvalue_update(hvp, max_eigenvalue_init(params, key), iters=iters, method=method)
  return state.value, state.vector


# --------------------------------------------------------------------------- TIC


def tic(second_moment: PyTree, curvature: PyTree, eps: float = 1e-7) -> jax.Array:
  """Takeuchi information criterion with diagonal curvature (Cockpit's ``TICDiag``).

  ``TIC_diag = Σ_j M_j / (c_j + ε)``, summed over all parameters ``j``, where
  ``M = (1/B) Σᵢ gᵢ ⊙ gᵢ`` is the uncentred second moment of the ``B`` per-example
  gradients ``gᵢ`` and ``c`` the Hessian diagonal. It approximates ``tr(H⁻¹ C)``, the
  generalisation-gap term of Thomas, Pedregosa, van Merriënboer, Manzagol, Bengio & Le Roux,
  "On the interplay between noise and curvature and its effect on optimization and
  generalization", AISTATS 2020 (arXiv:1906.07774). As in Cockpit, ``ε`` is added without
  guarding negative curvature (a negative ``c_j`` gives a negative term).

  Args:
    second_moment: ``M``, a pytree like the parameters.
    curvature: ``c``, the Hessian diagonal (exact or estimated), the same structure.
    eps: ``ε`` added to the denominator.

  Returns:
    The ``float32`` scalar.
  """
  terms = jax.tree.map(
    lambda m, c: jnp.sum(m.astype(_F32) / (c.astype(_F32) + eps)), second_moment, curvature
  )
  return jnp.asarray(optax.tree.sum(terms), _F32)


def tic_trace(second_moment: PyTree, trace: PyTree, eps: float = 1e-7) -> jax.Array:
  """Takeuchi information criterion from traces (Cockpit's ``TICTrace``).

  ``TIC_trace = Σ_j M_j / (Σ_j c_j + ε) = tr(M) / (tr(H) + ε)``, with ``M`` the uncentred
  second moment of the per-example gradients (see :func:`tic`; Thomas et al. 2020).

  Args:
    second_moment: ``M``, a pytree like the parameters.
    trace: ``tr(H)`` as a scalar, or the Hessian diagonal (any pytree; all entries are
      summed).
    eps: ``ε`` added to the denominator.

  Returns:
    The ``float32`` scalar.
  """
  tr = optax.tree.sum(jax.tree.map(lambda c: jnp.sum(c.astype(_F32)), trace))
  m = optax.tree.sum(jax.tree.map(lambda x: jnp.sum(x.astype(_F32)), second_moment))
  return jnp.asarray(m / (tr + eps), _F32)


# --------------------------------------------------------------------------- alpha


def alpha(
  t: jax.Array,
  f0: jax.Array,
  f1: jax.Array,
  df0: jax.Array,
  df1: jax.Array,
  var_f0: jax.Array,
  var_f1: jax.Array,
  var_df0: jax.Array,
  var_df1: jax.Array,
  eps: float = 1e-10,
) -> jax.Array:
  """Normalised step length ``α`` of a noise-aware quadratic fit along the step (Cockpit's Alpha).

  Along the update direction ``d = (θ₁ − θ₀)/t``, ``t = ‖θ₁ − θ₀‖``, the loss is observed at
  ``s = 0`` and ``s = t``: values ``f0, f1`` (mini-batch mean losses) and directional
  derivatives ``df0, df1`` (means over examples of ``gᵢᵀd``), with variances ``var_*``, the
  sample variances (``ddof=1``) of the individual losses and individual projections. As
  in Cockpit they are **not** divided by the batch size ``B`` (they are the noise of one
  example, not of the mean); only their ratios matter for the fit, so this is a choice of
  relative weighting, not of scale. Variances ``≤ 0`` are replaced by ``eps``.

  The quadratic ``q(s) = μ₀ + μ₁ s + μ₂ s²`` is fitted to the four observations
  ``q(0) = f0, q(t) = f1, q'(0) = df0, q'(t) = df1`` by weighted least squares (weights
  ``1/var``); its minimum is ``s* = −μ₁/(2μ₂)`` and

      α = t / s* − 1 = −2 μ₂ t / μ₁ − 1,

  so ``α = 0``: the step lands on the fitted minimum; ``α = 1``: on the far side at the
  starting height; ``α < 0``: short of the minimum (``−1``: no progress). This is the
  line-search model of Mahsereci & Hennig, "Probabilistic line searches for stochastic
  optimization", JMLR 2017, as used by Cockpit (Schneider et al. 2021).

  Computation (float32-safe): in the coordinate ``u = s/t`` the observations become
  ``y = (f0, f1, t·df0, t·df1)`` with variances ``σ² = (var_f0, var_f1, t²var_df0,
  t²var_df1)`` and the design rows ``(1,0,0), (1,1,1), (0,1,0), (0,1,2)`` for
  ``ν = (μ₀, μ₁t, μ₂t²)``; this is the same weighted least-squares problem. Its 4×3
  design has the one-dimensional left null space ``n = (−2, 2, −1, −1)`` (the trapezoid
  rule), so the weighted residual is ``r = δ σ² ⊙ n / Σ nⱼ²σⱼ²`` with ``δ = nᵀy`` and
  ``ν`` solves ``y − r`` exactly: ``ν₁ = ŷ₃``, ``ν₂ = (ŷ₄ − ŷ₃)/2``. No matrix is inverted
  and weights spanning many orders of magnitude stay exact; ``α = −2ν₂/ν₁ − 1``.

  Special cases: a concave or linear fit (``μ₂ ≤ 0``, no minimum ahead) gives ``−1`` as in
  Cockpit; ``t = 0`` (no step) gives ``−1`` (``t/s* − 1`` with ``t = 0``; Cockpit also
  returns −1 there); ``μ₁ = 0 < μ₂`` (the start is the fitted minimum) gives ``+inf``;
  ``μ₁ > 0 < μ₂`` (the fit rises from the start) gives ``α < −1``. NaN inputs give NaN
  (except ``t = 0``). Pure ``jnp``: usable under ``jit`` and ``vmap``.

  Args:
    t: step length ``‖θ₁ − θ₀‖``.
    f0: mean loss at the start.
    f1: mean loss at the end.
    df0: mean directional derivative at the start.
    df1: mean directional derivative at the end.
    var_f0: variance of the individual losses at the start.
    var_f1: variance of the individual losses at the end.
    var_df0: variance of the individual directional derivatives at the start.
    var_df1: variance of the individual directional derivatives at the end.
    eps: the variance used where one is 0.

  Returns:
    ``α``, a ``float32`` scalar (or array, broadcasting the inputs).
  """
  t, f0, f1, df0, df1 = (jnp.asarray(x, _F32) for x in (t, f0, f1, df0, df1))

  def var(v: jax.Array) -> jax.Array:
    v = jnp.asarray(v, _F32)
    return jnp.where(v > 0, v, jnp.asarray(eps, _F32))

  v1, v2 = var(var_f0), var(var_f1)
  v3, v4 = t * t * var(var_df0), t * t * var(var_df1)
  y1, y2, y3, y4 = f0, f1, t * df0, t * df1
  delta = -2.0 * y1 + 2.0 * y2 - y3 - y4  # nᵀy, 0 for consistent observations.
  s = 4.0 * v1 + 4.0 * v2 + v3 + v4  # Σ nⱼ² σⱼ² > 0.
  c = delta / s
  # ŷ = y − c σ² ⊙ n, with n₃ = n₄ = −1.
  h3 = y3 + c * v3
  h4 = y4 + c * v4
  nu1 = h3
  nu2 = 0.5 * (h4 - h3)
  safe_nu1 = jnp.where(nu1 == 0, 1.0, nu1)
  a = -2.0 * nu2 / safe_nu1 - 1.0
  a = jnp.where(nu1 == 0, jnp.inf, a)
  a = jnp.where(nu2 <= 0, -1.0, a)
  a = jnp.where(jnp.isnan(nu1) | jnp.isnan(nu2), jnp.nan, a)
  return jnp.where(t == 0, -1.0, a).astype(_F32)
