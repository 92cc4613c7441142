"""The gradient side of the instruments (:meth:`Instruments.grad`).

One pass gives the loss, the gradient, the captured layers and, when curvature is measured,
the Hessian-vector products (:mod:`jaxscope.metrics.hvp`); from them come the values that
need no update: the curvature (Hutchinson trace and diagonal, ``λ_max``, TIC) and the
per-example statistics (the norm test, GSNR, CABS, early stopping, variances, histograms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope import capture
from jaxscope.metrics import curvature, hvp, noise
from jaxscope.metrics.base import tree_norm
from jaxscope.metrics.instruments.config import (
  F32,
  Config,
  leaf_names,
  leaf_norms,
  update_side,
  value_specs,
)
from jaxscope.metrics.instruments.state import InstrumentsState, Probe
from jaxscope.metrics.per_example import take_flat

__all__ = ["grad", "public_captured"]


class _Batch(NamedTuple):
  """The user's loss function and batch (as :meth:`Instruments.grad` got them)."""

  losses_fn: Callable[..., Any]
  params: Any
  args: tuple[Any, ...]
  has_aux: bool


class _GradSide(NamedTuple):
  """What a step's gradient side returns, measured or not (the branches of ``lax.cond``)."""

  loss: jax.Array
  losses: jax.Array
  grads: Any
  aux: Any
  values: dict[str, jax.Array]
  max_ev: Any
  diag_ema: Any
  diag_steps: jax.Array
  sq_norms: jax.Array
  captured: Any


class _Curvature(NamedTuple):
  """The curvature part of a measured step."""

  values: dict[str, jax.Array]
  max_ev: Any
  diag_ema: Any
  diag_steps: jax.Array
  trace: jax.Array | None
  """The Hutchinson trace estimate (for ``tic_trace``), else ``None``."""
  tic_diag: Any
  """The Hessian diagonal that ``tic_diag`` divides by, else ``None``."""


def public_captured(captured: Any) -> Any:
  """The captured outputs and output gradients (inputs dropped: only the Dense route needs them)."""
  if captured is None:
    return None
  return captured._replace(inputs={})


def _mean_loss_fn(batch: _Batch) -> Callable[[Any], tuple[jax.Array, tuple[jax.Array, Any]]]:
  """``p ↦ (mean loss, (individual losses, aux))``, checking the losses' shape ``[B]``."""

  def mean_loss(p: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    out = batch.losses_fn(p, *batch.args)
    losses, aux = out if batch.has_aux else (out, None)
    losses = jnp.asarray(losses)
    if losses.ndim != 1:
      raise ValueError(
        "instruments.grad: losses_fn must return the individual losses, shape [B], got "
        f"shape {tuple(losses.shape)}."
      )
    return jnp.mean(losses), (losses, aux)

  return mean_loss


def _use_capture(cfg: Config, mean_loss: Callable[[Any], Any], params: Any) -> bool:
  """``capture_layers``; when ``None``, whether the loss calls Flax layers."""
  if cfg.capture_layers is not None:
    return cfg.capture_layers

  def recorded(p: Any) -> dict[str, jax.Array]:
    with capture.intercept(include=cfg.include, exclude=cfg.exclude) as rec:
      mean_loss(p)
    return dict(rec.outputs)

  return bool(jax.eval_shape(recorded, params))


def _grads_and_capture_fn(
  cfg: Config, mean_loss: Callable[[Any], Any], use_capture: bool
) -> Callable[[Any], tuple[Any, tuple[Any, ...]]]:
  """The gradient map ``p ↦ (grads, (loss, losses, aux, captured))`` that the HVPs linearise."""

  def grads_and_capture(p: Any) -> tuple[Any, tuple[Any, ...]]:
    if use_capture:
      vg = capture.value_and_grad(
        mean_loss, has_aux=True, include=cfg.include, exclude=cfg.exclude, inputs=True
      )
      (loss, (losses, aux)), grads, captured = vg(p)
    else:
      (loss, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(p)
      captured = None
    return grads, (loss, losses, aux, captured)

  return grads_and_capture


def grad(
  cfg: Config,
  state: InstrumentsState,
  losses_fn: Callable[..., Any],
  params: Any,
  *args: Any,
  has_aux: bool = False,
) -> Probe:
  """Loss, gradient and the gradient-side measurements of this step.

  Args:
    cfg: the instruments' settings.
    state: the instruments' state.
    losses_fn: ``losses_fn(params, *args) -> [B]`` individual losses (or
      ``(losses, aux)`` with ``has_aux``).
    params: the parameters.
    *args: the batch, arrays with the batch as leading axis.
    has_aux: whether ``losses_fn`` returns ``(losses, aux)``.

  Returns:
    A :class:`Probe`; ``probe.grads`` is the gradient of the mean loss.
  """
  if not isinstance(state, InstrumentsState):
    raise TypeError(
      f"instruments.grad: state must be the InstrumentsState from init(), got "
      f"{type(state).__name__}."
    )
  key, probe_key = jax.random.split(state.key)
  batch = _Batch(losses_fn, params, tuple(args), has_aux)
  mean_loss = _mean_loss_fn(batch)
  use_capture = _use_capture(cfg, mean_loss, params)
  grads_and_capture = _grads_and_capture_fn(cfg, mean_loss, use_capture)
  template = {
    k: jnp.zeros(v.shape, v.dtype)
    for k, v in value_specs(cfg, params).items()
    if not update_side(k)
  }

  def measure(_: Any) -> tuple[_GradSide, tuple[Any, ...], tuple[Any, ...]]:
    return _measure(cfg, state, probe_key, batch, grads_and_capture, template)

  def plain(_: Any) -> _GradSide:
    return _plain(state, params, mean_loss, grads_and_capture, use_capture, template)

  if cfg.every == 1:
    measured = jnp.ones((), jnp.bool_)
    out, dense, convs = measure(None)  # update() reuses the layers (no cond in between).
  else:
    measured = state.count % cfg.every == 0
    out = jax.lax.cond(measured, lambda _: measure(_)[0], plain, None)
    dense, convs = (), ()
  return Probe(
    loss=out.loss,
    losses=out.losses,
    grads=out.grads,
    aux=out.aux,
    captured=out.captured,
    values=out.values,
    measured=measured,
    key=key,
    max_ev=out.max_ev,
    diag_ema=out.diag_ema,
    diag_steps=out.diag_steps,
    dense=dense,
    convs=convs,
    sq_norms=out.sq_norms,
    params=params,
    args=batch.args,
    losses_fn=losses_fn,
    has_aux=has_aux,
  )


def _plain(
  state: InstrumentsState,
  params: Any,
  mean_loss: Callable[[Any], Any],
  grads_and_capture: Callable[[Any], Any],
  use_capture: bool,
  template: dict[str, jax.Array],
) -> _GradSide:
  """An unmeasured step: loss and gradient only, zeros (of fixed shapes) for the rest."""
  (loss, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  cap = None
  if use_capture:
    shapes = jax.eval_shape(lambda p: public_captured(grads_and_capture(p)[1][3]), params)
    cap = jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype), shapes)
  return _GradSide(
    loss=loss,
    losses=losses,
    grads=grads,
    aux=aux,
    values={k: jnp.zeros_like(v) for k, v in template.items()},
    max_ev=state.max_ev,
    diag_ema=state.diag_ema,
    diag_steps=state.diag_steps,
    sq_norms=jnp.zeros_like(losses),
    captured=cap,
  )


def _measure(
  cfg: Config,
  state: InstrumentsState,
  probe_key: jax.Array,
  batch: _Batch,
  grads_and_capture: Callable[[Any], Any],
  template: dict[str, jax.Array],
) -> tuple[_GradSide, tuple[noise.DenseLayer, ...], tuple[noise.ConvLayer, ...]]:
  """A measured step's gradient side; also the captured Dense and Conv layers."""
  params = batch.params
  hvp_lin = hvp_batch = probes = None
  if cfg.need_hvp and cfg.fast_hvp:
    # One forward-over-reverse pass for every probe and the power vector: the primal
    # (gradient and captures) once, the tangents batched by vmap.
    tangents, probes = _hvp_tangents(cfg, state, probe_key, params)
    grads, hvp_batch, (loss, losses, aux, captured) = hvp.jvp_grad(
      grads_and_capture, params, tangents, has_aux=True
    )
  elif cfg.need_hvp:
    grads, hvp_lin, (loss, losses, aux, captured) = hvp.linearize_grad(
      grads_and_capture, params, has_aux=True
    )
  else:
    grads, (loss, losses, aux, captured) = grads_and_capture(params)
  names = leaf_names(params)
  vals: dict[str, jax.Array] = {}
  if "loss" in cfg.want:
    vals["loss"] = loss.astype(F32)
  if "grad_norm" in cfg.want:
    vals.update(leaf_norms("grads/norm", names, grads))
  curv = _Curvature({}, state.max_ev, state.diag_ema, state.diag_steps, None, None)
  if cfg.need_hvp:
    curv = _curvature(cfg, state, params, names, probe_key, hvp_lin, hvp_batch, probes)
  vals.update(curv.values)
  sq_norms = jnp.zeros_like(losses)
  dense, convs = (), ()
  if cfg.need_per_example:
    pe_vals, sq_norms, dense, convs = _per_example(
      cfg, batch, names, grads, loss, losses, captured, curv
    )
    vals.update(pe_vals)
  vals = {k: v.astype(template[k].dtype) for k, v in vals.items()}
  out = _GradSide(
    loss=loss,
    losses=losses,
    grads=grads,
    aux=aux,
    values=vals,
    max_ev=curv.max_ev,
    diag_ema=curv.diag_ema,
    diag_steps=curv.diag_steps,
    sq_norms=sq_norms,
    captured=public_captured(captured),
  )
  return out, dense, convs


def _hvp_tangents(
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
    keys = jax.random.split(probe_key, max(len(leaves), 1))
    probes = [
      curvature.rademacher((cfg.hutchinson_probes, *x.shape), k, x.dtype)
      for k, x in zip(keys, leaves, strict=False)
    ]
    parts.append(probes)
  if "hess_max_ev" in cfg.want:
    vec = state.max_ev.vector
    vnorm = tree_norm(vec)
    ok = jnp.isfinite(vnorm) & (vnorm > 0)
    unit = jax.tree.map(lambda a: jnp.where(ok, a / jnp.where(ok, vnorm, 1.0), a), vec)
    parts.append([a[None] for a in jax.tree.leaves(unit)])
  stacked = jax.tree.unflatten(
    treedef, [jnp.concatenate(ls, axis=0) for ls in zip(*parts, strict=True)]
  )
  return stacked, (None if probes is None else jax.tree.unflatten(treedef, probes))


def _curvature(
  cfg: Config,
  state: InstrumentsState,
  params: Any,
  names: list[str],
  probe_key: jax.Array,
  hvp_lin: Callable[[Any], Any] | None,
  hvp_batch: Any,
  probes: Any,
) -> _Curvature:
  """Hutchinson trace and diagonal, the TIC's curvature and the warm-started ``λ_max``.

  From the batched products ``hvp_batch`` of the tangents of :func:`_hvp_tangents` when
  given, else from the linearisation ``hvp_lin``.
  """
  want = cfg.want
  vals: dict[str, jax.Array] = {}
  max_ev, diag_ema, diag_steps = state.max_ev, state.diag_ema, state.diag_steps
  trace = tic_curv = None
  if cfg.need_hutchinson:
    if hvp_batch is not None:
      k = cfg.hutchinson_probes
      prods = jax.tree.map(lambda z, hz: z.astype(F32) * hz[:k].astype(F32), probes, hvp_batch)
      diag = jax.tree.map(lambda a: jnp.mean(a, axis=0), prods)
      trace = optax.tree.sum(diag)
    else:
      trace, diag = curvature.hutchinson(hvp_lin, params, probe_key, cfg.hutchinson_probes)
    if "hess_trace" in want:
      vals["hess_trace"] = trace.astype(F32)
      for n, d in zip(names, jax.tree.leaves(diag), strict=True):
        vals[f"hessian/trace/{n}"] = jnp.sum(d).astype(F32)
    if cfg.use_ema:
      decay = cfg.curvature_decay
      diag_steps = state.diag_steps + 1
      diag_ema = jax.tree.map(lambda e, d: decay * e + (1 - decay) * d, state.diag_ema, diag)
      corr = 1.0 - decay ** diag_steps.astype(F32)
      tic_curv = jax.tree.map(lambda e: e / corr, diag_ema)
    elif "tic_diag" in want:
      tic_curv = curvature.exact_hessian_diagonal(hvp_lin, params)
  if "hess_max_ev" in want:
    if hvp_batch is not None:
      hv = jax.tree.map(lambda a: a[-1], hvp_batch)
      hvp_ev = lambda _: hv  # noqa: E731 (the product of the unit vector, computed above)
    else:
      hvp_ev = hvp_lin
    max_ev = curvature.max_eigenvalue_update(
      hvp_ev, state.max_ev, iters=cfg.max_ev_iters, method=cfg.max_ev_method
    )
    vals["hess_max_ev"] = max_ev.value.astype(F32)
  return _Curvature(vals, max_ev, diag_ema, diag_steps, trace, tic_curv)


def _per_example(
  cfg: Config,
  batch: _Batch,
  names: list[str],
  grads: Any,
  loss: jax.Array,
  losses: jax.Array,
  captured: Any,
  curv: _Curvature,
) -> tuple[dict[str, jax.Array], jax.Array, tuple[Any, ...], tuple[Any, ...]]:
  """The per-example statistics: ``(values, sq_norms, dense layers, conv layers)``."""
  want = cfg.want
  params = batch.params
  dense = noise.dense_layers(params, captured) if captured is not None else []
  convs = noise.conv_layers(params, captured) if captured is not None else []
  sample = noise.histogram_sample(params, cfg.hist_sample, cfg.seed) if cfg.need_hist else None
  mom = noise.per_example_moments(
    batch.losses_fn,
    params,
    batch.args,
    dense=dense,
    convs=convs,
    has_aux=batch.has_aux,
    chunk=cfg.chunk,
    sample=sample,
    second_moment=cfg.need_second,
  )
  vals: dict[str, jax.Array] = {}
  gsq = tree_norm(grads, squared=True)
  if "norm_test" in want:
    vals["norm_test"] = noise.norm_test(mom.sq_norms, gsq)
  if "per_example_norms" in want:
    norms = jnp.sqrt(mom.sq_norms)
    vals["per_example_grads/norm_mean"] = jnp.mean(norms)
    vals["per_example_grads/norm_max"] = jnp.max(norms)
  if "grad_variance" in want:
    var = noise.gradient_variance(grads, mom.second_moment)
    for n, v, m in zip(
      names, jax.tree.leaves(var), jax.tree.leaves(mom.second_moment), strict=True
    ):
      vals[f"per_example_grads/variance/{n}"] = jnp.mean(v).astype(F32)
      vals[f"per_example_grads/second_moment/{n}"] = jnp.mean(m).astype(F32)
  if "mean_gsnr" in want:
    vals["mean_gsnr"] = noise.mean_gsnr(grads, mom.second_moment, cfg.eps)
  if "early_stopping" in want:
    vals["early_stopping"] = noise.early_stopping(
      grads, mom.second_moment, losses.shape[0], cfg.eps
    )
  if "cabs" in want:
    # Needs the learning rate: finished in update(); keep tr(Σ) here.
    vals["cabs"] = noise.cabs(grads, mom.second_moment, loss, 1.0)
  if "tic_diag" in want:
    vals["tic_diag"] = curvature.tic(mom.second_moment, curv.tic_diag, cfg.tic_eps).astype(F32)
  if "tic_trace" in want:
    vals["tic_trace"] = curvature.tic_trace(mom.second_moment, curv.trace, cfg.tic_eps).astype(F32)
  if sample is not None:
    vals.update(_histograms(cfg, params, sample, mom.samples))
  return vals, mom.sq_norms, tuple(dense), tuple(convs)


def _histograms(
  cfg: Config, params: Any, sample: noise.HistogramSample, samples: jax.Array
) -> dict[str, jax.Array]:
  """``grad_hist_1d`` and ``grad_hist_2d`` from the sampled per-example gradient entries."""
  vals: dict[str, jax.Array] = {}
  weights = jnp.asarray(sample.weights)
  if "grad_hist_1d" in cfg.want:
    h = noise.weighted_histogram(samples, weights[None, :], cfg.hist_bins)
    vals["per_example_grads/hist_counts"] = h["counts"]
    vals["per_example_grads/hist_edges"] = h["edges"]
  if "grad_hist_2d" in cfg.want:
    pvals = jnp.concatenate(  # the sampled entries, gathered without flattening a leaf
      [
        take_flat(x, idx).astype(F32)
        for x, idx in zip(jax.tree.leaves(params), sample.indices, strict=True)
      ]
    )
    pv = jnp.broadcast_to(pvals[None, :], samples.shape)
    h2 = noise.weighted_histogram_2d(pv, samples, weights[None, :], cfg.hist2d_bins)
    vals["per_example_grads/hist2d_counts"] = h2["counts"]
    vals["per_example_grads/hist2d_param_edges"] = h2["x_edges"]
    vals["per_example_grads/hist2d_grad_edges"] = h2["y_edges"]
  return vals
