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

from jaxscope import capture
from jaxscope.metrics import hvp, noise
from jaxscope.metrics.base import tree_norm
from jaxscope.metrics.instruments import hessian
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
  diag_var_ema: Any
  sq_norms: jax.Array
  captured: Any


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
    diag_var_ema=out.diag_var_ema,
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
    diag_var_ema=state.diag_var_ema,
    sq_norms=jnp.zeros_like(losses),
    captured=cap,
  )


def _fresh_hvp(mean_loss: Callable[[Any], Any], params: Any) -> Callable[[Any], Any]:
  """``v ↦ H v`` by a fresh forward-over-reverse pass per call (nothing kept alive)."""

  def grad_only(p: Any) -> Any:
    return jax.grad(lambda q: mean_loss(q)[0])(p)

  def hvp_fn(v: Any) -> Any:
    _, hv, _ = hvp.jvp_grad(grad_only, params, jax.tree.map(lambda a: a[None], v))
    return jax.tree.map(lambda a: a[0], hv)

  return hvp_fn


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
  hvp_lin = None
  products = hessian.Products(None, None)
  if cfg.need_hvp and cfg.fast_hvp(params):
    if cfg.hvp_chunk is None or cfg.hvp_chunk >= hessian.num_tangents(cfg):
      # One forward-over-reverse pass for every probe and the power vector: the primal
      # (gradient and captures) once, the tangents batched by vmap.
      tangents, probes = hessian.hvp_tangents(cfg, state, probe_key, params)
      grads, hvp_batch, (loss, losses, aux, captured) = hvp.jvp_grad(
        grads_and_capture, params, tangents, has_aux=True
      )
      hvp_lin = _fresh_hvp(_mean_loss_fn(batch), params)  # For a λ_max refinement only.
      products = hessian.batched_products(cfg, probes, hvp_batch)
    else:
      # Bounded memory: the primal and its linearisation once, the tangents through it
      # hvp_chunk at a time, their sums kept as they come.
      grads, hvp_lin, (loss, losses, aux, captured) = hvp.linearize_grad(
        grads_and_capture, params, has_aux=True
      )
      products = hessian.streamed_products(cfg, state, probe_key, params, hvp_lin)
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
    vals.update(leaf_norms("cockpit/grad_norm", names, grads))
  curv = hessian.empty(state)
  if cfg.need_hvp:
    curv = hessian.measure(cfg, state, params, names, probe_key, hvp_lin, products)
  vals.update(curv.values)
  sq_norms = jnp.zeros_like(losses)
  dense, convs = (), ()
  if cfg.need_per_example:
    pe_vals, sq_norms, dense, convs = _per_example(
      cfg, state, batch, names, grads, loss, losses, captured, curv
    )
    vals.update(pe_vals)
  elif (cfg.need_proj_grad or cfg.need_alpha) and captured is not None:
    # The projections read the captured Dense layers too (no forward-mode pass for their
    # leaves). Convolutions stay in forward mode here: their per-example gradients
    # (B × K × c_out floats a layer) are formed only when per-example statistics need them.
    dense = tuple(noise.dense_layers(params, captured))
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
    diag_var_ema=curv.diag_var_ema,
    sq_norms=sq_norms,
    captured=public_captured(captured),
  )
  return out, dense, convs


def _per_example(
  cfg: Config,
  state: InstrumentsState,
  batch: _Batch,
  names: list[str],
  grads: Any,
  loss: jax.Array,
  losses: jax.Array,
  captured: Any,
  curv: hessian.Curvature,
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
  vals.update(hessian.tic_values(cfg, curv, mom.second_moment))
  if sample is not None:
    vals.update(_histograms(cfg, state, params, sample, mom.samples))
  return vals, mom.sq_norms, tuple(dense), tuple(convs)


def _kept_range(
  state: InstrumentsState, key: str, mode: Any, fixed: Any, values: jax.Array
) -> jax.Array:
  """A histogram's ``(lo, hi)``: fixed, this step's (``"step"``) or the first measured step's.

  The first step's range is kept as the recorded edges (``state.values[key]``, zeros until
  a step was measured), so it needs no state of its own.
  """
  if fixed is not None:
    return jnp.asarray(fixed, F32)
  fresh = noise.histogram_range(values)
  if mode == "step":
    return fresh
  edges = state.values[key]
  kept = jnp.stack([edges[0], edges[-1]])
  return jnp.where(kept[1] > kept[0], kept, fresh)


def _histograms(
  cfg: Config,
  state: InstrumentsState,
  params: Any,
  sample: noise.HistogramSample,
  samples: jax.Array,
) -> dict[str, jax.Array]:
  """``grad_hist_1d`` and ``grad_hist_2d`` from the sampled per-example gradient entries.

  Integer counts per leaf scaled by the leaf's sampling weight (exact for full data,
  unbiased for samples; :func:`~jaxscope.metrics.noise.sampled_histogram`), values outside
  the range clamped into the edge bins as Cockpit does.
  """
  vals: dict[str, jax.Array] = {}
  fixed = cfg.hist_fixed()
  if "grad_hist_1d" in cfg.want:
    key = "per_example_grads/hist_edges"
    rng = _kept_range(state, key, cfg.hist_range, fixed[0], samples)
    h = noise.sampled_histogram(samples, sample, cfg.hist_bins, rng)
    vals["per_example_grads/hist_counts"] = h["counts"]
    vals["per_example_grads/hist_edges"] = h["edges"]
    vals["per_example_grads/hist_nonfinite"] = h["nonfinite"]
  if "grad_hist_2d" in cfg.want:
    pvals = jnp.concatenate(  # the sampled entries, gathered without flattening a leaf
      [
        take_flat(x, idx).astype(F32)
        for x, idx in zip(jax.tree.leaves(params), sample.indices, strict=True)
      ]
    )
    g_key, p_key = "per_example_grads/hist2d_grad_edges", "per_example_grads/hist2d_param_edges"
    g_rng = _kept_range(state, g_key, cfg.hist2d_range, fixed[1], samples)
    p_rng = _kept_range(state, p_key, cfg.hist2d_range, fixed[2], pvals)
    h2 = noise.sampled_histogram_2d(samples, pvals, sample, cfg.hist2d_bins, g_rng, p_rng)
    vals["per_example_grads/hist2d_counts_grad_param"] = h2["counts"]
    vals["per_example_grads/hist2d_grad_edges"] = h2["grad_edges"]
    vals["per_example_grads/hist2d_param_edges"] = h2["param_edges"]
  return vals
