"""Cockpit's instruments inside a jitted JAX train step: gradient noise, curvature, α.

Cockpit (Schneider, Dangel & Hennig, NeurIPS 2021) tracks 19 quantities of a training step;
:func:`instruments` computes each of them (:data:`QUANTITIES`) as pure functions inside the
user's jitted step, in two calls around the optimizer::

  inst = jaxscope.metrics.instruments(preset="economy")
  istate = inst.init(params)

  @jax.jit
  def train_step(params, opt_state, istate, x, y):
    probe = inst.grad(istate, losses_fn, params, x, y)  # losses_fn(params, x, y) -> [B]
    updates, opt_state = tx.update(probe.grads, opt_state, params)
    values, istate = inst.update(istate, probe, updates)
    return optax.apply_updates(params, updates), opt_state, istate, values

``losses_fn`` returns the *individual* losses ``ℓᵢ`` (``[B]``); the mini-batch loss is their
mean and ``probe.grads`` its gradient, identical to ``jax.grad`` of the mean. ``values`` is a
flat ``dict[str, jax.Array]`` (keys below) with fixed shapes from ``init`` on, so the state
goes through ``jit``, ``lax.scan`` and orbax unchanged.

What each preset measures (the same quantities as Cockpit's configurations):

* ``economy``: ``loss``, ``grads/norm/{leaf}``, ``params/distance/{leaf}``,
  ``updates/norm/{leaf}``, ``alpha``, ``norm_test``, ``inner_test``, ``ortho_test``,
  ``per_example_grads/hist_{counts,edges}``;
* ``business``: economy + ``tic_diag`` + ``hess_trace`` (and ``hessian/trace/{leaf}``);
* ``full``: business + ``hess_max_ev`` +
  ``per_example_grads/hist2d_{counts,param_edges,grad_edges}``.

Not in a preset, as in Cockpit: ``mean_gsnr``, ``cabs``, ``early_stopping``, ``tic_trace``,
and jaxscope's ``grad_variance`` (``per_example_grads/variance/{leaf}``,
``per_example_grads/second_moment/{leaf}``) and ``per_example_norms``
(``per_example_grads/norm_mean``, ``per_example_grads/norm_max``).

How each is computed (the cheap exact routes; see :mod:`jaxscope.metrics.noise` and
:mod:`jaxscope.metrics.curvature`):

* per-example squared norms and second moments: outer products for Dense layers
  (captured with :mod:`jaxscope.capture`), chunked ``vmap(grad)`` for the rest;
* per-example projections ``gᵢᵀv`` (inner-product test on ``v = g``, α on ``v`` = the
  update): one forward-mode pass for all directions (:func:`~jaxscope.metrics.noise.projections`);
* curvature: one linearisation of the gradient (``jax.linearize``; forward-over-reverse)
  gives Hessian-vector products: Hutchinson probes for the trace and diagonal, a
  warm-started power iteration for ``λ_max`` (Cockpit restarts from scratch each step,
  ≈ 30 HVPs; here ``max_ev_iters`` per step carried over steps);
* histograms of per-example gradient entries on a fixed uniform sample of coordinates,
  weighted to estimate the full ``B·P`` histogram
  (:class:`~jaxscope.metrics.noise.HistogramSample`).

``alpha`` and the update-based values are *two-step*: ``alpha`` at step ``t`` is the α of
the update made at step ``t − 1`` (measured with the losses at ``θ_{t−1}`` and ``θ_t``);
``updates/norm`` is this step's update. With ``every = n`` only steps ``0, n, 2n, …``
measure (``lax.cond``/``lax.switch``; α's end point is step ``kn + 1``, which then pays one
forward-mode pass). ``values["measured"]`` tells whether the values are this step's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxscope import capture
from jaxscope import tree as jtree
from jaxscope.metrics import curvature, noise

__all__ = [
  "PRESETS",
  "QUANTITIES",
  "Instruments",
  "InstrumentsState",
  "Probe",
  "instruments",
]

_F32 = jnp.float32

#: Every quantity and a one-line description (Cockpit's name in brackets).
QUANTITIES: dict[str, str] = {
  "loss": "mini-batch loss, the mean of the individual losses [Loss]",
  "grad_norm": "ℓ₂ norm of the mini-batch gradient per leaf [GradNorm]",
  "distance": "ℓ₂ distance of each leaf from its value at init() [Distance]",
  "update_size": "ℓ₂ norm of the update per leaf [UpdateSize]",
  "alpha": "normalised step length α of the previous update (noise-aware quadratic fit) [Alpha]",
  "norm_test": "largest θ passing the norm test, Byrd et al. 2012 [NormTest]",
  "inner_test": "largest θ passing the inner-product test, Bollapragada et al. 2017 [InnerTest]",
  "ortho_test": "largest ν passing the orthogonality test, Bollapragada et al. 2017 [OrthoTest]",
  "grad_hist_1d": "histogram of per-example gradient entries [GradHist1d]",
  "grad_hist_2d": "2-D histogram of per-example gradient entries vs parameters [GradHist2d]",
  "hess_trace": "Hessian trace, Hutchinson estimate, total and per leaf [HessTrace]",
  "tic_diag": "Takeuchi information criterion with a diagonal Hessian estimate [TICDiag]",
  "tic_trace": "Takeuchi information criterion from traces [TICTrace]",
  "hess_max_ev": "largest-magnitude Hessian eigenvalue, warm-started power iteration [HessMaxEV]",
  "mean_gsnr": "mean gradient signal-to-noise ratio, Liu et al. 2020 [MeanGSNR]",
  "cabs": "CABS batch-size suggestion, Balles et al. 2017 (SGD without momentum) [CABS]",
  "early_stopping": "evidence-based early stopping, Mahsereci et al. 2017 [EarlyStopping]",
  "grad_variance": "per-leaf mean of the per-example gradient variance and second moment",
  "per_example_norms": "mean and max of the per-example gradient norms ‖gᵢ‖",
}

_ECONOMY = (
  "alpha",
  "distance",
  "grad_hist_1d",
  "grad_norm",
  "inner_test",
  "loss",
  "norm_test",
  "ortho_test",
  "update_size",
)
#: Cockpit's configurations (``cockpit.utils.configuration``), quantity for quantity.
PRESETS: dict[str, tuple[str, ...]] = {
  "economy": _ECONOMY,
  "business": (*_ECONOMY, "tic_diag", "hess_trace"),
  "full": (*_ECONOMY, "tic_diag", "hess_trace", "hess_max_ev", "grad_hist_2d"),
}

_SECOND_MOMENT = {"tic_diag", "tic_trace", "mean_gsnr", "cabs", "early_stopping", "grad_variance"}
_SQ_NORMS = {"norm_test", "ortho_test", "per_example_norms"}
_HIST = {"grad_hist_1d", "grad_hist_2d"}
_HUTCHINSON = {"hess_trace", "tic_diag", "tic_trace"}
_PROJ_GRAD = {"inner_test", "ortho_test"}


class InstrumentsState(NamedTuple):
  """State of :func:`instruments`; fixed structure from ``init`` on."""

  count: jax.Array
  """``int32``: steps seen."""
  key: jax.Array
  """PRNG key for Hutchinson probes."""
  measured: jax.Array
  """``bool``: whether ``values`` were measured at the last step."""
  values: dict[str, jax.Array]
  """The latest values."""
  init_params: Any
  """The parameters at ``init`` (for ``distance``), else ``()``."""
  prev_update: Any
  """The update of the last α start point (for ``alpha``), else ``()``."""
  alpha_start: jax.Array
  """``float32[6]``: ``t, f, var f, f', var f', valid`` at the last α start point."""
  max_ev: Any
  """:class:`~jaxscope.metrics.curvature.MaxEigState` (for ``hess_max_ev``), else ``()``."""
  diag_ema: Any
  """Moving average of the Hutchinson Hessian diagonal (for ``tic_diag``), else ``()``."""
  diag_steps: jax.Array
  """``int32``: measured steps in ``diag_ema``."""


class Probe(NamedTuple):
  """What :meth:`Instruments.grad` measured; pass it to :meth:`Instruments.update`.

  Holds the loss function and batch, so use it inside the same traced function.
  """

  loss: jax.Array
  losses: jax.Array
  grads: Any
  aux: Any
  captured: Any
  """The captured layers' outputs and output gradients, a
  :class:`~jaxscope.capture.Captured` without ``inputs`` (zeros on unmeasured steps;
  ``None`` with ``capture_layers=False``): feed ``captured.outputs`` and
  ``captured.grads`` to a scope's ``activations=`` and ``layer_grads=``."""
  values: dict[str, jax.Array]
  measured: jax.Array
  key: jax.Array
  max_ev: Any
  diag_ema: Any
  diag_steps: jax.Array
  dense: tuple[noise.DenseLayer, ...]
  """The captured Dense layers (empty when none or not measured)."""
  convs: tuple[noise.ConvLayer, ...]
  """The captured convolutions with their per-example gradients."""
  sq_norms: jax.Array
  """``[B]`` per-example squared gradient norms (zeros when not measured)."""
  params: Any
  args: tuple[Any, ...]
  losses_fn: Callable[..., Any]
  has_aux: bool


class Instruments(NamedTuple):
  """The pure functions of :func:`instruments` (see the module docstring)."""

  init: Callable[..., InstrumentsState]
  grad: Callable[..., Probe]
  update: Callable[..., tuple[dict[str, jax.Array], InstrumentsState]]
  quantities: tuple[str, ...]
  every: int


def _leaf_names(params: Any) -> list[str]:
  return [i.name for i in jtree.leaf_infos(params, argname="params")]


def _leaf_norms(prefix: str, names: Sequence[str], tree: Any) -> dict[str, jax.Array]:
  return {
    f"{prefix}/{n}": jnp.sqrt(jnp.sum(jnp.square(x.astype(_F32))))
    for n, x in zip(names, jax.tree.leaves(tree), strict=True)
  }


_UPDATE_SIDE = ("params/distance/", "updates/norm/")


def _update_side(key: str) -> bool:
  """Whether ``key`` is measured in ``update`` (needs the update or a projection)."""
  return key in ("alpha", "inner_test", "ortho_test") or key.startswith(_UPDATE_SIDE)


def _public(captured: Any) -> Any:
  """The captured outputs and output gradients (inputs dropped: only the Dense route needs them)."""
  if captured is None:
    return None
  return captured._replace(inputs={})


def _var(x: jax.Array) -> jax.Array:
  """Sample variance with ``ddof = 1`` (Cockpit's ``torch.var``)."""
  return jnp.var(x.astype(_F32), ddof=1)


def instruments(
  quantities: Sequence[str] = (),
  *,
  preset: str | None = None,
  every: int = 1,
  capture_layers: bool | None = None,
  include: str | Sequence[str] | None = None,
  exclude: str | Sequence[str] | None = None,
  chunk: int = 32,
  hist_bins: int = 100,
  hist2d_bins: tuple[int, int] = (40, 50),
  hist_sample: int = 2048,
  hutchinson_probes: int = 1,
  max_ev_iters: int = 1,
  max_ev_method: str = "power",
  eps: float = 1e-5,
  tic_eps: float = 1e-7,
  tic_curvature: str = "hutchinson",
  curvature_decay: float = 0.9,
  seed: int = 0,
) -> Instruments:
  """Builds Cockpit's instruments (see the module docstring).

  Args:
    quantities: names from :data:`QUANTITIES`.
    preset: ``"economy"``, ``"business"`` or ``"full"`` (:data:`PRESETS`), added to
      ``quantities``.
    every: measure steps ``0, every, 2·every, …``.
    capture_layers: capture the Flax layers' inputs, outputs and output gradients
      (:mod:`jaxscope.capture`): the Dense outer-product route and ``probe.captured``.
      ``None`` (default): when ``losses_fn`` calls Flax layers; ``False``: chunked
      ``vmap(grad)`` for every leaf (what non-Dense layers always use).
    include: regular expression(s) of the layers captured for that route.
    exclude: regular expression(s) of layers not captured.
    chunk: examples per ``vmap(grad)`` chunk.
    hist_bins: bins of ``grad_hist_1d`` (Cockpit: 100).
    hist2d_bins: ``(parameter bins, gradient bins)`` of ``grad_hist_2d`` (Cockpit: 40×50).
    hist_sample: parameter coordinates sampled for histograms (every example each).
    hutchinson_probes: Rademacher probes per step for the trace and diagonal.
    max_ev_iters: HVPs per step spent on ``λ_max`` (carried over steps).
    max_ev_method: ``"power"`` or ``"lanczos"`` (see :mod:`jaxscope.metrics.curvature`).
    eps: stabiliser of ``mean_gsnr`` and ``early_stopping`` (Cockpit: 1e-5).
    tic_eps: stabiliser of the TIC (Cockpit: 1e-7).
    tic_curvature: the Hessian diagonal of ``tic_diag``: ``"hutchinson"`` (default; a
      bias-corrected moving average, decay ``curvature_decay``, of the per-step Hutchinson
      estimates, whose per-entry variance ``Σ_{k≠j} H_jk²`` makes a one-step estimate
      useless as a denominator) or ``"exact"`` (``P`` HVPs per step: small models only).
      ``tic_trace`` and ``hess_trace`` use the current step's estimate.
    curvature_decay: the moving average's decay.
    seed: seed of the histogram sample and of the probes.

  Returns:
    An :class:`Instruments`.
  """
  names = list(quantities)
  if preset is not None:
    if preset not in PRESETS:
      raise ValueError(f"instruments: unknown preset {preset!r}; presets: {', '.join(PRESETS)}.")
    names += [q for q in PRESETS[preset] if q not in names]
  unknown = [q for q in names if q not in QUANTITIES]
  if unknown:
    raise ValueError(
      f"instruments: unknown quantit{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
      f"known: {', '.join(QUANTITIES)}."
    )
  if not names:
    raise ValueError("instruments: no quantity given (pass quantities= or preset=).")
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"instruments: every must be a positive int, got {every!r}.")
  for name, v in (("chunk", chunk), ("hutchinson_probes", hutchinson_probes)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"instruments: {name} must be a positive int, got {v!r}.")
  if not isinstance(max_ev_iters, int) or max_ev_iters < 1:
    raise ValueError(f"instruments: max_ev_iters must be a positive int, got {max_ev_iters!r}.")
  if max_ev_method not in ("power", "lanczos"):
    raise ValueError(
      f"instruments: max_ev_method must be 'power' or 'lanczos', got {max_ev_method!r}."
    )
  qs = tuple(dict.fromkeys(names))
  want = set(qs)
  need_second = bool(want & _SECOND_MOMENT)
  need_sq = bool(want & _SQ_NORMS)
  need_hist = bool(want & _HIST)
  need_per_example = need_second or need_sq or need_hist
  need_hutchinson = bool(want & _HUTCHINSON)
  need_hvp = need_hutchinson or "hess_max_ev" in want
  need_proj_grad = bool(want & _PROJ_GRAD)
  need_alpha = "alpha" in want
  if tic_curvature not in ("hutchinson", "exact"):
    raise ValueError(
      f"instruments: tic_curvature must be 'hutchinson' or 'exact', got {tic_curvature!r}."
    )
  if not 0.0 <= curvature_decay < 1.0:
    raise ValueError(f"instruments: curvature_decay must be in [0, 1), got {curvature_decay!r}.")
  use_ema = "tic_diag" in want and tic_curvature == "hutchinson"
  # One batched jvp pass serves Hutchinson and a 1-step power iteration; Lanczos, more
  # power steps or the exact diagonal apply a linearisation repeatedly instead.
  fast_hvp = not ("tic_diag" in want and tic_curvature == "exact") and (
    "hess_max_ev" not in want or (max_ev_method == "power" and max_ev_iters == 1)
  )

  def value_specs(params: Any) -> dict[str, jax.ShapeDtypeStruct]:
    leaf_names = _leaf_names(params)
    s = jax.ShapeDtypeStruct((), _F32)
    specs: dict[str, jax.ShapeDtypeStruct] = {}
    scalars = [
      q
      for q in qs
      if q
      in {
        "loss",
        "alpha",
        "norm_test",
        "inner_test",
        "ortho_test",
        "tic_diag",
        "tic_trace",
        "hess_trace",
        "hess_max_ev",
        "mean_gsnr",
        "cabs",
        "early_stopping",
      }
    ]
    for q in scalars:
      specs[q] = s
    per_leaf = {
      "grad_norm": ["grads/norm"],
      "distance": ["params/distance"],
      "update_size": ["updates/norm"],
      "hess_trace": ["hessian/trace"],
      "grad_variance": ["per_example_grads/variance", "per_example_grads/second_moment"],
    }
    for q, prefixes in per_leaf.items():
      if q in want:
        for prefix in prefixes:
          for n in leaf_names:
            specs[f"{prefix}/{n}"] = s
    if "per_example_norms" in want:
      specs["per_example_grads/norm_mean"] = s
      specs["per_example_grads/norm_max"] = s
    if "grad_hist_1d" in want:
      specs["per_example_grads/hist_counts"] = jax.ShapeDtypeStruct((hist_bins,), _F32)
      specs["per_example_grads/hist_edges"] = jax.ShapeDtypeStruct((hist_bins + 1,), _F32)
    if "grad_hist_2d" in want:
      bx, by = hist2d_bins
      specs["per_example_grads/hist2d_counts"] = jax.ShapeDtypeStruct((bx, by), _F32)
      specs["per_example_grads/hist2d_param_edges"] = jax.ShapeDtypeStruct((bx + 1,), _F32)
      specs["per_example_grads/hist2d_grad_edges"] = jax.ShapeDtypeStruct((by + 1,), _F32)
    return specs

  def init_fn(params: Any) -> InstrumentsState:
    """The initial state; ``params`` fixes the structure (and ``distance``'s origin)."""
    specs = value_specs(params)
    values = {k: jnp.zeros(v.shape, v.dtype) for k, v in specs.items()}
    key = jax.random.key(seed)
    key, ev_key = jax.random.split(key)
    return InstrumentsState(
      count=jnp.zeros((), jnp.int32),
      key=key,
      measured=jnp.zeros((), jnp.bool_),
      values=values,
      init_params=jax.tree.map(jnp.array, params) if "distance" in want else (),
      prev_update=jax.tree.map(jnp.zeros_like, params) if need_alpha else (),
      alpha_start=jnp.zeros((6,), _F32).at[5].set(-1.0),  # No start point yet.
      max_ev=curvature.max_eigenvalue_init(params, ev_key) if "hess_max_ev" in want else (),
      diag_ema=jax.tree.map(jnp.zeros_like, params) if use_ema else (),
      diag_steps=jnp.zeros((), jnp.int32),
    )

  def _is_measured(count: jax.Array) -> jax.Array:
    return count % every == 0

  # ------------------------------------------------------------------ grad

  def grad_fn(
    state: InstrumentsState,
    losses_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    has_aux: bool = False,
  ) -> Probe:
    """Loss, gradient and the gradient-side measurements of this step.

    Args:
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

    def split_out(out: Any) -> tuple[jax.Array, Any]:
      losses, aux = out if has_aux else (out, None)
      losses = jnp.asarray(losses)
      if losses.ndim != 1:
        raise ValueError(
          "instruments.grad: losses_fn must return the individual losses, shape [B], got "
          f"shape {tuple(losses.shape)}."
        )
      return losses, aux

    def mean_loss(p: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
      losses, aux = split_out(losses_fn(p, *args))
      return jnp.mean(losses), (losses, aux)

    use_capture = capture_layers
    if use_capture is None:  # Auto: capture when the loss calls Flax layers.

      def recorded(p: Any) -> dict[str, jax.Array]:
        with capture.intercept(include=include, exclude=exclude) as rec:
          mean_loss(p)
        return dict(rec.outputs)

      use_capture = bool(jax.eval_shape(recorded, params))

    def plain(_: Any) -> tuple[Any, ...]:
      (loss, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
      zero_vals = {k: jnp.zeros_like(v) for k, v in grad_values_template.items()}
      cap = None
      if use_capture:
        shapes = jax.eval_shape(lambda p: _public(measure_capture(p)), params)
        cap = jax.tree.map(lambda sd: jnp.zeros(sd.shape, sd.dtype), shapes)
      return (
        loss,
        losses,
        grads,
        aux,
        zero_vals,
        (state.max_ev, state.diag_ema, state.diag_steps),
        jnp.zeros_like(losses),
        cap,
      )

    def grads_and_capture(p: Any) -> tuple[Any, Any]:
      if use_capture:
        vg = capture.value_and_grad(
          mean_loss, has_aux=True, include=include, exclude=exclude, inputs=True
        )
        (loss, (losses, aux)), grads, captured = vg(p)
      else:
        (loss, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(p)
        captured = None
      return grads, (loss, losses, aux, captured)

    def measure_capture(p: Any) -> Any:
      return grads_and_capture(p)[1][3]

    def measure(_: Any) -> tuple[Any, ...]:
      hvp_batch = None
      if need_hvp and fast_hvp:
        # One forward-over-reverse pass for every probe and the power vector: the primal
        # (gradient and captures) once, the tangents batched by vmap.
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(probe_key, max(len(leaves), 1))
        probes = (
          [
            curvature.rademacher((hutchinson_probes, *x.shape), k, x.dtype)
            for k, x in zip(keys, leaves, strict=False)
          ]
          if need_hutchinson
          else None
        )
        parts = [] if probes is None else [probes]
        if "hess_max_ev" in want:
          vec = state.max_ev.vector
          vnorm = optax.tree.norm(vec)
          ok = jnp.isfinite(vnorm) & (vnorm > 0)
          unit = jax.tree.map(lambda a: jnp.where(ok, a / jnp.where(ok, vnorm, 1.0), a), vec)
          parts.append([a[None] for a in jax.tree.leaves(unit)])
        stacked = jax.tree.unflatten(
          treedef, [jnp.concatenate(ls, axis=0) for ls in zip(*parts, strict=True)]
        )

        def one(t: Any) -> tuple[Any, Any, Any]:
          return jax.jvp(grads_and_capture, (params,), (t,), has_aux=True)

        grads, hvp_batch, (loss, losses, aux, captured) = jax.vmap(one, out_axes=(None, 0, None))(
          stacked
        )
        hvp_lin = None
      elif need_hvp:
        grads, hvp_lin, (loss, losses, aux, captured) = jax.linearize(
          grads_and_capture, params, has_aux=True
        )
      else:
        grads, (loss, losses, aux, captured) = grads_and_capture(params)
        hvp_lin = None
      vals: dict[str, jax.Array] = {}
      leaf_names = _leaf_names(params)
      if "loss" in want:
        vals["loss"] = loss.astype(_F32)
      if "grad_norm" in want:
        vals.update(_leaf_norms("grads/norm", leaf_names, grads))
      max_ev = state.max_ev
      diag_ema, diag_steps = state.diag_ema, state.diag_steps
      sq_norms = jnp.zeros_like(losses)
      if need_hvp:
        if need_hutchinson and hvp_batch is not None:
          k = hutchinson_probes
          prods = jax.tree.map(
            lambda z, hz: z.astype(_F32) * hz[:k].astype(_F32),
            jax.tree.unflatten(treedef, probes),
            hvp_batch,
          )
          diag = jax.tree.map(lambda a: jnp.mean(a, axis=0), prods)
          trace = optax.tree.sum(diag)
        elif need_hutchinson:
          trace, diag = curvature.hutchinson(hvp_lin, params, probe_key, hutchinson_probes)
        if need_hutchinson:
          if "hess_trace" in want:
            vals["hess_trace"] = trace.astype(_F32)
            for n, d in zip(leaf_names, jax.tree.leaves(diag), strict=True):
              vals[f"hessian/trace/{n}"] = jnp.sum(d).astype(_F32)
          if use_ema:
            diag_steps = state.diag_steps + 1
            diag_ema = jax.tree.map(
              lambda e, d: curvature_decay * e + (1 - curvature_decay) * d, state.diag_ema, diag
            )
            corr = 1.0 - curvature_decay ** diag_steps.astype(_F32)
            tic_diag_curv = jax.tree.map(lambda e: e / corr, diag_ema)
          elif "tic_diag" in want:
            tic_diag_curv = curvature.exact_hessian_diagonal(hvp_lin, params)
        if "hess_max_ev" in want:
          if hvp_batch is not None:
            hv = jax.tree.map(lambda a: a[-1], hvp_batch)
            hvp_ev = lambda _: hv  # noqa: E731 (the product of the unit vector, computed above)
          else:
            hvp_ev = hvp_lin
          max_ev = curvature.max_eigenvalue_update(
            hvp_ev, state.max_ev, iters=max_ev_iters, method=max_ev_method
          )
          vals["hess_max_ev"] = max_ev.value.astype(_F32)
      if need_per_example:
        dense = noise.dense_layers(params, captured) if captured is not None else []
        convs = noise.conv_layers(params, captured) if captured is not None else []
        if every == 1:  # Reused by update() for the projections (no cond in between).
          dense_box.extend(dense)
          conv_box.extend(convs)
        sample = noise.histogram_sample(params, hist_sample, seed) if need_hist else None
        mom = noise.per_example_moments(
          losses_fn,
          params,
          args,
          dense=dense,
          convs=convs,
          has_aux=has_aux,
          chunk=chunk,
          sample=sample,
          second_moment=need_second,
        )
        gsq = optax.tree.norm(grads, squared=True)
        sq_norms = mom.sq_norms
        if "norm_test" in want:
          vals["norm_test"] = noise.norm_test(mom.sq_norms, gsq)
        if "per_example_norms" in want:
          norms = jnp.sqrt(mom.sq_norms)
          vals["per_example_grads/norm_mean"] = jnp.mean(norms)
          vals["per_example_grads/norm_max"] = jnp.max(norms)
        if "grad_variance" in want:
          var = noise.gradient_variance(grads, mom.second_moment)
          for n, v, m in zip(
            leaf_names, jax.tree.leaves(var), jax.tree.leaves(mom.second_moment), strict=True
          ):
            vals[f"per_example_grads/variance/{n}"] = jnp.mean(v).astype(_F32)
            vals[f"per_example_grads/second_moment/{n}"] = jnp.mean(m).astype(_F32)
        if "mean_gsnr" in want:
          vals["mean_gsnr"] = noise.mean_gsnr(grads, mom.second_moment, eps)
        if "early_stopping" in want:
          vals["early_stopping"] = noise.early_stopping(
            grads, mom.second_moment, losses.shape[0], eps
          )
        if "cabs" in want:
          # Needs the learning rate: finished in update(); keep tr(Σ) here.
          vals["cabs"] = noise.cabs(grads, mom.second_moment, loss, 1.0)
        if "tic_diag" in want:
          vals["tic_diag"] = curvature.tic(mom.second_moment, tic_diag_curv, tic_eps).astype(_F32)
        if "tic_trace" in want:
          vals["tic_trace"] = curvature.tic_trace(mom.second_moment, trace, tic_eps).astype(_F32)
        if sample is not None:
          weights = jnp.asarray(sample.weights)
          if "grad_hist_1d" in want:
            h = noise.weighted_histogram(mom.samples, weights[None, :], hist_bins)
            vals["per_example_grads/hist_counts"] = h["counts"]
            vals["per_example_grads/hist_edges"] = h["edges"]
          if "grad_hist_2d" in want:
            pvals = jnp.concatenate(
              [
                x.reshape(-1)[idx].astype(_F32)
                for x, idx in zip(jax.tree.leaves(params), sample.indices, strict=True)
              ]
            )
            pv = jnp.broadcast_to(pvals[None, :], mom.samples.shape)
            h2 = noise.weighted_histogram_2d(pv, mom.samples, weights[None, :], hist2d_bins)
            vals["per_example_grads/hist2d_counts"] = h2["counts"]
            vals["per_example_grads/hist2d_param_edges"] = h2["x_edges"]
            vals["per_example_grads/hist2d_grad_edges"] = h2["y_edges"]
      vals = {k: v.astype(grad_values_template[k].dtype) for k, v in vals.items()}
      return (
        loss,
        losses,
        grads,
        aux,
        vals,
        (max_ev, diag_ema, diag_steps),
        sq_norms,
        _public(captured),
      )

    dense_box: list[noise.DenseLayer] = []
    conv_box: list[noise.ConvLayer] = []
    specs = value_specs(params)
    grad_values_template = {
      k: jnp.zeros(v.shape, v.dtype) for k, v in specs.items() if not _update_side(k)
    }
    if every == 1:
      measured = jnp.ones((), jnp.bool_)
      loss, losses, grads, aux, vals, carried, sq_norms, cap = measure(None)
    else:
      measured = _is_measured(state.count)
      loss, losses, grads, aux, vals, carried, sq_norms, cap = jax.lax.cond(
        measured, measure, plain, None
      )
    return Probe(
      loss=loss,
      losses=losses,
      grads=grads,
      aux=aux,
      captured=cap,
      values=vals,
      measured=measured,
      key=key,
      max_ev=carried[0],
      diag_ema=carried[1],
      diag_steps=carried[2],
      dense=tuple(dense_box),
      convs=tuple(conv_box),
      sq_norms=sq_norms,
      params=params,
      args=tuple(args),
      losses_fn=losses_fn,
      has_aux=has_aux,
    )

  # ------------------------------------------------------------------ update

  def update_fn(
    state: InstrumentsState,
    probe: Probe,
    updates: Any,
    *,
    learning_rate: jax.Array | float | None = None,
  ) -> tuple[dict[str, jax.Array], InstrumentsState]:
    """Finishes the step's measurements once the optimizer's ``updates`` are known.

    Args:
      state: the state given to :meth:`grad` this step.
      probe: what :meth:`grad` returned.
      updates: the optimizer's updates (what ``optax.apply_updates`` adds).
      learning_rate: SGD's learning rate, needed by ``cabs`` only.

    Returns:
      ``(values, new_state)``; ``values`` includes ``"measured"``.
    """
    if not isinstance(probe, Probe):
      raise TypeError(
        f"instruments.update: probe must come from grad(), got {type(probe).__name__}."
      )
    if "cabs" in want and learning_rate is None:
      raise ValueError("instruments.update: 'cabs' needs learning_rate= (SGD's step size).")
    jtree.check_same_structure(probe.params, updates, ref_name="params", other_name="updates")
    params, grads = probe.params, probe.grads
    leaf_names = _leaf_names(params)
    losses = probe.losses

    def start_info(proj: jax.Array, upd: Any) -> jax.Array:
      t = optax.tree.norm(upd).astype(_F32)
      scaled = proj / jnp.where(t > 0, t, 1.0)
      stamp = (state.count + 1).astype(_F32)  # Valid for the next step only.
      return jnp.stack(
        [t, probe.loss.astype(_F32), _var(losses), jnp.mean(scaled), _var(scaled), stamp]
      )

    def alpha_from(start: jax.Array, proj_end: jax.Array) -> jax.Array:
      t = start[0]
      scaled = proj_end / jnp.where(t > 0, t, 1.0)
      a = curvature.alpha(
        t,
        start[1],
        probe.loss.astype(_F32),
        start[3],
        jnp.mean(scaled),
        start[2],
        _var(losses),
        start[4],
        _var(scaled),
      )
      consecutive = start[5] == state.count.astype(_F32)
      return jnp.where(consecutive, a, state.values["alpha"]).astype(_F32)

    def project(tangents: list[Any]) -> jax.Array:
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *tangents)
      dense, convs = probe.dense, probe.convs
      if not dense and not convs:
        return noise.projections(
          probe.losses_fn, params, probe.args, stacked, has_aux=probe.has_aux
        ).astype(_F32)
      # Dense and Conv leaves from their per-example gradients; forward mode for the rest.
      t_leaves, treedef = jax.tree.flatten(stacked)
      p_leaves = jax.tree.leaves(params)
      covered = {layer.kernel for layer in (*dense, *convs)} | {
        layer.bias for layer in (*dense, *convs) if layer.bias is not None
      }
      out = noise.layer_projections(dense, convs, t_leaves)
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
          [t_leaves[i] for i in rest],
          has_aux=probe.has_aux,
        )
      return out.astype(_F32)

    def project_with_span(tangents: list[Any]) -> jax.Array:
      """Projections on ``tangents``; the last (the update) from the others if in their span.

      SGD's update is ``−ηg`` and heavy-ball momentum's ``−ηg + μ·d_{t−1}`` (constant η):
      both lie in the span of the other directions, so their per-example projections are
      the same combination of the others' and one pass over the layers is saved. The
      combination comes from the 2×2 (or 1×1) Gram system; it is used only when it
      reproduces the update to a relative squared residual below 1e-10, else the update
      is projected directly (Adam and other per-coordinate scalings).
      """
      basis, d = tangents[:-1], tangents[-1]
      gram = jnp.stack([jnp.stack([optax.tree.vdot(a, b) for b in basis]) for a in basis])
      rhs = jnp.stack([optax.tree.vdot(a, d) for a in basis])
      scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(gram))), 1e-30)
      coef = jnp.linalg.lstsq(gram / scale, rhs / scale)[0]
      approx = jax.tree.map(lambda *xs: sum(c * x for c, x in zip(coef, xs, strict=True)), *basis)
      resid = optax.tree.norm(optax.tree.sub(d, approx), squared=True)
      dsq = optax.tree.norm(d, squared=True)
      in_span = resid <= 1e-10 * dsq
      proj_basis = project(basis)

      def combine(_: Any) -> jax.Array:
        return coef.astype(_F32) @ proj_basis

      def direct(_: Any) -> jax.Array:
        return project([d])[0]

      last = jax.lax.cond(in_span, combine, direct, None)
      return jnp.concatenate([proj_basis, last[None]], axis=0)

    def measure_update(_: Any) -> tuple[dict[str, jax.Array], Any, jax.Array]:
      vals = {**state.values, **probe.values}
      if "distance" in want:
        diff = jax.tree.map(lambda p, q: p - q, params, state.init_params)
        vals.update(_leaf_norms("params/distance", leaf_names, diff))
      if "update_size" in want:
        vals.update(_leaf_norms("updates/norm", leaf_names, updates))
      if "cabs" in want:
        vals["cabs"] = (vals["cabs"] * learning_rate).astype(_F32)
      tangents, slots = [], {}
      if need_proj_grad:
        slots["g"] = len(tangents)
        tangents.append(grads)
      if need_alpha:
        if every == 1:
          slots["end"] = len(tangents)
          tangents.append(state.prev_update)
        slots["start"] = len(tangents)
        tangents.append(updates)
      alpha_start = state.alpha_start
      prev_update = state.prev_update
      if tangents:
        if need_alpha and len(tangents) > 1:
          proj = project_with_span(tangents)
        else:
          proj = project(tangents)
        gsq = optax.tree.norm(grads, squared=True)
        if "inner_test" in want:
          vals["inner_test"] = noise.inner_test(proj[slots["g"]], gsq)
        if "ortho_test" in want:
          vals["ortho_test"] = noise.ortho_test(probe.sq_norms, proj[slots["g"]], gsq)
        if need_alpha:
          if every == 1:
            vals["alpha"] = alpha_from(state.alpha_start, proj[slots["end"]])
          alpha_start = start_info(proj[slots["start"]], updates)
          prev_update = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, state.prev_update)
      return vals, prev_update, alpha_start

    def alpha_end(_: Any) -> tuple[dict[str, jax.Array], Any, jax.Array]:
      vals = dict(state.values)
      proj = project([state.prev_update])
      vals["alpha"] = alpha_from(state.alpha_start, proj[0])
      return vals, state.prev_update, state.alpha_start

    def skip(_: Any) -> tuple[dict[str, jax.Array], Any, jax.Array]:
      return dict(state.values), state.prev_update, state.alpha_start

    if every == 1:
      vals, prev_update, alpha_start = measure_update(None)
      measured = jnp.ones((), jnp.bool_)
    else:
      measured = probe.measured
      branches = [skip, measure_update]
      if need_alpha:
        branches.append(alpha_end)
        mode = jnp.where(
          measured, 1, jnp.where(state.alpha_start[5] == state.count.astype(_F32), 2, 0)
        )
      else:
        mode = measured.astype(jnp.int32)
      vals, prev_update, alpha_start = jax.lax.switch(mode, branches, None)
    vals = {k: v.astype(state.values[k].dtype) for k, v in vals.items()}
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
    )
    return {**vals, "measured": measured}, new_state

  return Instruments(init_fn, grad_fn, update_fn, qs, every)
