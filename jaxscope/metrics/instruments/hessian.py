"""The curvature of the instruments: Hessian trace and diagonal, ``λ_max``, the TIC.

Each reading comes with its error bar (``*_stderr`` for Hutchinson's estimates, a
residual for ``λ_max``; exact readings report 0). Called by the gradient side
(:mod:`jaxscope.metrics.instruments.grad`) on measured steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope.metrics import curvature, hutchinson
from jaxscope.metrics.base import tree_norm
from jaxscope.metrics.hvp import Hvp
from jaxscope.metrics.instruments.config import F32, Config
from jaxscope.metrics.instruments.state import InstrumentsState

__all__ = [
  "Curvature",
  "Products",
  "batched_products",
  "hvp_tangents",
  "measure",
  "num_tangents",
  "streamed_products",
  "tic_values",
]


class Curvature(NamedTuple):
  """The curvature part of a measured step."""

  values: dict[str, jax.Array]
  max_ev: Any
  diag_ema: Any
  diag_steps: jax.Array
  trace: jax.Array | None
  """``tr(H)`` (exact or estimated) for ``tic_trace``, else ``None``."""
  trace_stderr: jax.Array | None
  diag: Any
  """The Hessian diagonal that ``tic_diag`` divides by, else ``None``."""
  diag_var: Any
  """The variance of each entry of ``diag`` (Hutchinson: from the probes; exact: of its
  float32 rounding, ``(ε₃₂ ‖Hᵢ,:‖₂)²``), else ``None``."""
  diag_var_ema: Any
  """The state's moving sum of per-step variances (Hutchinson with ``tic_diag``)."""


def empty(state: InstrumentsState) -> Curvature:
  """The curvature of a step that measures none."""
  return Curvature(
    {}, state.max_ev, state.diag_ema, state.diag_steps, None, None, None, None, state.diag_var_ema
  )


def num_tangents(cfg: Config) -> int:
  """How many tangents a measured step pushes through the HVP: the Hutchinson probes and
  (for ``hess_max_ev``) the power iteration's vector."""
  return cfg.hutchinson_probes * cfg.need_hutchinson + ("hess_max_ev" in cfg.want)


def _power_unit(state: InstrumentsState) -> Any:
  """The power iteration's vector, normalised (left as it is when its norm is 0 or NaN)."""
  vec = state.max_ev.vector
  vnorm = tree_norm(vec)
  ok = jnp.isfinite(vnorm) & (vnorm > 0)
  return jax.tree.map(lambda a: jnp.where(ok, a / jnp.where(ok, vnorm, 1.0), a), vec)


def hvp_tangents(
  cfg: Config, state: InstrumentsState, probe_key: jax.Array, params: Any
) -> tuple[Any, Any]:
  """The stacked tangents of the batched HVP pass and the Hutchinson probes among them.

  The ``hutchinson_probes`` Rademacher probes come first, then (for ``hess_max_ev``) the
  power iteration's unit vector.
  """
  leaves, treedef = jax.tree.flatten(params)
  probes = None
  parts = []
  if cfg.need_hutchinson:
    probes = hutchinson.probes_like(params, probe_key, cfg.hutchinson_probes)
    parts.append(jax.tree.leaves(probes))
  if "hess_max_ev" in cfg.want:
    parts.append([a[None] for a in jax.tree.leaves(_power_unit(state))])
  del leaves
  stacked = jax.tree.unflatten(
    treedef, [jnp.concatenate(ls, axis=0) for ls in zip(*parts, strict=True)]
  )
  return stacked, probes


class Products(NamedTuple):
  """What the step's HVP pass gave the curvature: the Hutchinson estimate and the power
  iteration's product ``H v`` (each ``None`` when not measured, or left to :func:`measure`)."""

  estimate: hutchinson.HutchinsonEstimate | None
  power: Any


def batched_products(cfg: Config, probes: Any, hvp_batch: Any) -> Products:
  """The :class:`Products` of one batched pass over :func:`hvp_tangents`' tangents."""
  est = power = None
  if cfg.need_hutchinson:
    k = cfg.hutchinson_probes
    est = hutchinson.trace_estimate(probes, jax.tree.map(lambda hz: hz[:k], hvp_batch))
  if "hess_max_ev" in cfg.want:
    power = jax.tree.map(lambda a: a[-1], hvp_batch)
  return Products(est, power)


def streamed_products(
  cfg: Config, state: InstrumentsState, probe_key: jax.Array, params: Any, hvp_fn: Hvp
) -> Products:
  """The :class:`Products` from a linearisation, ``cfg.hvp_chunk`` tangents at a time.

  The probes go through :func:`~jaxscope.metrics.hutchinson.streamed_estimate` (no
  ``[K, P]`` probes or products are formed), then the power vector, after them.
  Straight-line code in turns, not a loop: XLA:CPU ran the products inside ``lax.map``'s
  loop many times slower than outside it (69 s against 5 s per business step on the
  3c3d). On the 3c3d at batch 128, one tangent at a time is both the leanest and the
  fastest: business 3.0 s per step and 1.0 GB of XLA temporaries, against 4.1 s and
  2.9 GB for all nine tangents in one batched pass (2-core CPU, 2026-12-05).
  """
  est = power = last = None
  if cfg.need_hutchinson:
    est, last = hutchinson.streamed_estimate(
      hvp_fn, params, probe_key, cfg.hutchinson_probes, chunk=cfg.hvp_chunk or 1
    )
  if "hess_max_ev" in cfg.want:
    unit = _power_unit(state)
    if last is not None:
      unit, _ = jax.lax.optimization_barrier((unit, last))
    power = hvp_fn(unit)
  return Products(est, power)


def _ema(
  cfg: Config, state: InstrumentsState, diag: Any, var: Any
) -> tuple[Any, Any, jax.Array, Any, Any]:
  """The moving average of Hutchinson diagonals and its variance.

  ``c = Σₛ aₛ d̄ₛ / (1 − βᵗ)`` with ``aₛ = (1 − β) β^{t−s}``, so, the steps' probes being
  independent, ``Var c = Σₛ aₛ² Var d̄ₛ / (1 − βᵗ)²``.

  Returns:
    ``(ema, var_ema, steps, c, Var c)``.
  """
  decay = cfg.curvature_decay
  steps = state.diag_steps + 1
  ema = jax.tree.map(lambda e, d: decay * e + (1 - decay) * d, state.diag_ema, diag)
  var_ema = jax.tree.map(lambda e, v: decay**2 * e + (1 - decay) ** 2 * v, state.diag_var_ema, var)
  corr = 1.0 - decay ** steps.astype(F32)
  return (
    ema,
    var_ema,
    steps,
    jax.tree.map(lambda e: e / corr, ema),
    jax.tree.map(lambda e: e / corr**2, var_ema),
  )


def measure(
  cfg: Config,
  state: InstrumentsState,
  params: Any,
  names: list[str],
  probe_key: jax.Array,
  hvp_fn: Callable[[Any], Any],
  products: Products,
) -> Curvature:
  """Trace and diagonal (exact or Hutchinson, with standard errors) and ``λ_max``.

  Args:
    cfg: the settings.
    state: the instruments' state.
    params: the parameters.
    names: their leaf names.
    probe_key: the key of this step's Hutchinson probes.
    hvp_fn: ``v ↦ H v`` (a linearisation, or a fresh forward-over-reverse pass per call).
    products: what the step's HVP pass already gave (:func:`batched_products`,
      :func:`streamed_products`); what it leaves ``None`` comes from ``hvp_fn``.
  """
  want = cfg.want
  vals: dict[str, jax.Array] = {}
  max_ev, diag_ema, diag_steps = state.max_ev, state.diag_ema, state.diag_steps
  var_ema = state.diag_var_ema
  trace = trace_se = diag = diag_var = None
  if cfg.need_hutchinson:
    if cfg.exact(params):
      diag, row_norm = curvature.exact_hessian_diagonal(
        hvp_fn, params, max_params=max(cfg.exact_max_params, 1), with_row_norm=True
      )
      diag = jax.tree.map(lambda d: d.astype(F32), diag)
      eps = float(jnp.finfo(F32).eps)
      diag_var = jax.tree.map(lambda r: jnp.square(eps * r.astype(F32)), row_norm)
      leaf_tr = [jnp.sum(d) for d in jax.tree.leaves(diag)]
      leaf_se = [jnp.zeros((), F32) for _ in leaf_tr]
      trace, trace_se = jnp.asarray(sum(leaf_tr), F32), jnp.zeros((), F32)
    else:
      est = products.estimate
      if est is None:
        est = hutchinson.hutchinson_estimate(hvp_fn, params, probe_key, cfg.hutchinson_probes)
      trace, trace_se, diag = est.trace, est.trace_stderr, est.diag
      leaf_tr, leaf_se = jax.tree.leaves(est.leaf_traces), jax.tree.leaves(est.leaf_stderr)
      if "tic_diag" in want:
        diag_ema, var_ema, diag_steps, diag, diag_var = _ema(
          cfg, state, est.diag, est.diag_variance
        )
    if "hess_trace" in want:
      vals["hess_trace"] = trace
      vals["hess_trace_stderr"] = trace_se
      for n, t, se in zip(names, leaf_tr, leaf_se, strict=True):
        vals[f"hessian/trace/{n}"] = t.astype(F32)
        vals[f"hessian/trace_stderr/{n}"] = se.astype(F32)
  if "hess_max_ev" in want:
    max_ev = curvature.max_eigenvalue_update(
      hvp_fn,
      state.max_ev,
      iters=cfg.max_ev_iters,
      method=cfg.max_ev_method,
      product=products.power,
      tol=cfg.max_ev_tol,
      refine_iters=cfg.max_ev_refine_iters,
    )
    vals["hess_max_ev"] = max_ev.value.astype(F32)
    vals["hess_max_ev_residual"] = max_ev.residual.astype(F32)
  return Curvature(vals, max_ev, diag_ema, diag_steps, trace, trace_se, diag, diag_var, var_ema)


def tic_values(cfg: Config, curv: Curvature, second_moment: Any) -> dict[str, jax.Array]:
  """``tic_diag`` and ``tic_trace`` with their standard errors.

  ``tic_trace = tr(M)/(tr(H) + ε)``: the interval ``tr(H) ± 2·stderr`` mapped through
  ``t ↦ tr(M)/(t + ε)`` (monotone, so it covers as often as the trace's), reported as the
  standard error ``s`` whose symmetric band ``value ± 2s`` contains it; ``inf`` when the
  trace's interval reaches ``−ε`` (the ratio is then not determined), 0 when exact.
  ``tic_diag = Σⱼ Mⱼ/(cⱼ + ε)``, standard error by the delta method
  ``√(Σⱼ (Mⱼ/(cⱼ + ε)²)² Var cⱼ)`` with ``Var cⱼ`` the variance of the diagonal entry
  (Hutchinson: of its probe noise, through the moving average; exact: of its float32
  rounding). The second moment ``M`` is exact for the batch. First order: where an
  interval ``cⱼ ± 2√Var cⱼ`` reaches ``−ε`` the ratio is not determined and the error bar
  becomes as large as it should. It does not cover the moving average's lag behind a
  changing Hessian.
  """
  vals: dict[str, jax.Array] = {}
  eps = cfg.tic_eps
  if "tic_diag" in cfg.want:
    f32 = lambda t: jax.tree.map(lambda x: x.astype(F32), t)  # noqa: E731
    m, c, v = f32(second_moment), curv.diag, curv.diag_var
    value = curvature.tic(m, c, eps)

    def term(mi: jax.Array, ci: jax.Array, vi: jax.Array) -> jax.Array:
      # An entry with Mⱼ = 0 adds nothing, whatever its curvature's variance (0·inf).
      return jnp.sum(jnp.where(mi == 0, 0.0, jnp.square(mi / (ci + eps) ** 2) * vi))

    terms = jax.tree.map(term, m, c, v)
    vals["tic_diag"] = value.astype(F32)
    vals["tic_diag_stderr"] = jnp.sqrt(optax.tree.sum(terms)).astype(F32)
  if "tic_trace" in cfg.want:
    m = optax.tree.sum(jax.tree.map(lambda x: jnp.sum(x.astype(F32)), second_moment))
    value = m / (curv.trace + eps)
    lo, hi = curv.trace - 2 * curv.trace_stderr + eps, curv.trace + 2 * curv.trace_stderr + eps
    half = jnp.maximum(m / jnp.where(lo > 0, lo, 1.0) - value, value - m / hi)
    se = jnp.where(curv.trace_stderr == 0, 0.0, jnp.where(lo > 0, 0.5 * half, jnp.inf))
    vals["tic_trace"] = jnp.asarray(value, F32)
    vals["tic_trace_stderr"] = jnp.asarray(se, F32)
  return vals
