"""The factory :func:`instruments`: checks the settings and binds the pure functions to them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jaxscope.metrics.instruments import grad as grad_side
from jaxscope.metrics.instruments import update as update_side
from jaxscope.metrics.instruments.config import INSTRUMENT_PRESETS, QUANTITIES, Config
from jaxscope.metrics.instruments.state import Instruments, InstrumentsState, Probe, init

__all__ = ["instruments"]


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
  hist_range: Any = "first",
  hist2d_range: Any = "first",
  hutchinson_probes: int = 8,
  max_ev_iters: int = 1,
  max_ev_method: str = "power",
  max_ev_tol: float | None = 0.5,
  max_ev_refine_iters: int = 20,
  eps: float = 1e-5,
  tic_eps: float = 1e-7,
  curvature: str = "auto",
  exact_max_params: int = 4096,
  curvature_decay: float = 0.9,
  seed: int = 0,
  tic_curvature: str | None = None,
  hvp_chunk: int | None = 1,
  updates_in_span: bool = False,
) -> Instruments:
  """Builds Cockpit's instruments (see :mod:`jaxscope.metrics.instruments`).

  Args:
    quantities: names from :data:`QUANTITIES`.
    preset: ``"economy"``, ``"business"``, ``"full"`` (:data:`INSTRUMENT_PRESETS`), added.
    every: measure steps ``0, every, 2·every, …``.
    capture_layers: capture the Flax layers' inputs, outputs and output gradients
      (:mod:`jaxscope.capture`): the Dense outer-product route and ``probe.captured``.
      ``None`` (default): when ``losses_fn`` calls Flax layers; ``False``: chunked
      ``vmap(grad)`` for every leaf (what non-Dense layers always use).
    include, exclude: regular expressions of the layers captured for that route, and not.
    chunk: examples per ``vmap(grad)`` chunk.
    hist_bins: bins of ``grad_hist_1d`` (Cockpit: 100).
    hist2d_bins: ``(gradient bins, parameter bins)`` of ``grad_hist_2d`` (Cockpit: 40×50).
    hist_sample: parameter coordinates sampled for histograms (every example each).
    hist_range, hist2d_range: the histograms' ranges (values outside are clamped into the
      edge bins): ``"first"`` (default: ``±1.2·max|x|`` of the first measured step, kept, so
      bins compare across steps), ``"step"`` (each step's own), ``"cockpit"`` (Cockpit's
      fixed ranges) or explicit ``(lo, hi)`` / ``((grad_lo, grad_hi), (param_lo, param_hi))``.
    hutchinson_probes: Rademacher probes per measured step (default 8; see "Error bars"
      in :mod:`jaxscope.metrics.instruments`).
    max_ev_iters: HVPs per step spent on ``λ_max`` (carried over steps).
    max_ev_method: ``"power"`` or ``"lanczos"`` (see :mod:`jaxscope.metrics.curvature`).
    max_ev_tol: relative residual above which ``λ_max`` is refined; ``None``: never.
    max_ev_refine_iters: Lanczos steps of a refinement.
    eps, tic_eps: stabilisers of ``mean_gsnr``/``early_stopping`` and of the TIC (Cockpit:
      1e-5, 1e-7).
    curvature: ``"auto"`` (default), ``"exact"`` or ``"hutchinson"``: the Hessian diagonal
      and traces (see "Error bars" there).
    exact_max_params: the largest model that ``"auto"`` treats exactly.
    curvature_decay: decay of the moving average of Hutchinson diagonals in ``tic_diag``.
    seed: seed of the histogram sample and of the probes.
    tic_curvature: the name of ``curvature`` before issue 18; overrides it when given.
    hvp_chunk: Hessian-vector products pushed through the network at once when a step
      needs several (the Hutchinson probes and the power vector: ``K = hutchinson_probes
      + 1``). An int ``c`` (default ``1``): the gradient is linearised once
      (``jax.linearize``) and the ``K`` tangents go through it ``c`` at a time, one turn
      after the other in straight-line code, so the peak is ``M_step + c · M_tangent``,
      where ``M_tangent`` is about one more set of the step's activations (on the DeepOBS
      3c3d at batch 128, ``M_step`` ≈ 310 MB and ``M_tangent`` ≈ 320 MB by XLA's memory
      analysis). ``None``: all ``K`` in one batched forward-over-reverse pass, peak
      ``M_step + K · M_tangent``. The products are the same up to float32 rounding. On
      the 3c3d ``1`` is also the fastest (business 3.0 s per step and 1.0 GB of XLA
      temporaries, against 4.1 s and 2.9 GB with ``None``); on the MNIST MLP the two are
      equal (2-core CPU, 2026-12-05). The turns were a ``lax.map`` loop before, which
      XLA:CPU ran 14× slower on the 3c3d.
    updates_in_span: declares that the optimizer's updates are ``c₀·g + c₁·d_{t−1}``
      (plain SGD or heavy-ball momentum under any step-size schedule, clipping by the
      global norm included; not Adam, weight decay or Nesterov momentum). With
      ``every=1``, ``alpha`` then combines the update's per-example projections from the
      gradient's and the last update's once one update was seen in their span, instead
      of projecting each (the MNIST MLP's ``economy`` step 7.7 → 6.8 ms and 8.0 → 7.3 ms
      in two processes, bare step 2.7–2.9 ms). A check on a sample of 4096 coordinates
      per leaf guards the declaration: a combined update outside the span there drops
      that step's α and projects every later update directly. Default ``False``: every
      update is projected, or checked over every coordinate first where that saves a
      forward pass.

  Returns:
    An :class:`Instruments`.
  """
  qs = _quantities(quantities, preset)
  cfg = Config(  # Checks the settings.
    quantities=qs,
    every=every,
    capture_layers=capture_layers,
    include=include,
    exclude=exclude,
    chunk=chunk,
    hist_bins=hist_bins,
    hist2d_bins=hist2d_bins,
    hist_sample=hist_sample,
    hist_range=hist_range,
    hist2d_range=hist2d_range,
    hutchinson_probes=hutchinson_probes,
    max_ev_iters=max_ev_iters,
    max_ev_method=max_ev_method,
    max_ev_tol=max_ev_tol,
    max_ev_refine_iters=max_ev_refine_iters,
    eps=eps,
    tic_eps=tic_eps,
    curvature=curvature if tic_curvature is None else tic_curvature,
    exact_max_params=exact_max_params,
    curvature_decay=curvature_decay,
    seed=seed,
    hvp_chunk=hvp_chunk,
    updates_in_span=updates_in_span,
  )

  return _bind(cfg)


def _bind(cfg: Config) -> Instruments:
  """The pure functions of :class:`Instruments`, bound to the checked settings ``cfg``."""

  def init_fn(params: Any) -> InstrumentsState:
    """The initial state; ``params`` fixes the structure (and ``distance``'s origin)."""
    return init(cfg, params)

  def grad_fn(
    state: InstrumentsState,
    losses_fn: Any,
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
    return grad_side.grad(cfg, state, losses_fn, params, *args, has_aux=has_aux)

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
    return update_side.update(cfg, state, probe, updates, learning_rate=learning_rate)

  return Instruments(init_fn, grad_fn, update_fn, cfg.quantities, cfg.every)


def _quantities(quantities: Sequence[str], preset: str | None) -> tuple[str, ...]:
  """The requested quantities, the preset's added, in order and without repeats."""
  names = list(quantities)
  if preset is not None:
    if preset not in INSTRUMENT_PRESETS:
      raise ValueError(
        f"instruments: unknown preset {preset!r}; presets: {', '.join(INSTRUMENT_PRESETS)}."
      )
    names += [q for q in INSTRUMENT_PRESETS[preset] if q not in names]
  unknown = [q for q in names if q not in QUANTITIES]
  if unknown:
    raise ValueError(
      f"instruments: unknown quantit{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
      f"known: {', '.join(QUANTITIES)}."
    )
  if not names:
    raise ValueError("instruments: no quantity given (pass quantities= or preset=).")
  return tuple(dict.fromkeys(names))
