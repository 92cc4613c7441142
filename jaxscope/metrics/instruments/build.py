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
  hutchinson_probes: int = 1,
  max_ev_iters: int = 1,
  max_ev_method: str = "power",
  eps: float = 1e-5,
  tic_eps: float = 1e-7,
  tic_curvature: str = "hutchinson",
  curvature_decay: float = 0.9,
  seed: int = 0,
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
    hist2d_bins: ``(parameter bins, gradient bins)`` of ``grad_hist_2d`` (Cockpit: 40×50).
    hist_sample: parameter coordinates sampled for histograms (every example each).
    hutchinson_probes: Rademacher probes per step for the trace and diagonal.
    max_ev_iters: HVPs per step spent on ``λ_max`` (carried over steps).
    max_ev_method: ``"power"`` or ``"lanczos"`` (see :mod:`jaxscope.metrics.curvature`).
    eps, tic_eps: stabilisers of ``mean_gsnr``/``early_stopping`` and of the TIC (Cockpit:
      1e-5, 1e-7).
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
    hutchinson_probes=hutchinson_probes,
    max_ev_iters=max_ev_iters,
    max_ev_method=max_ev_method,
    eps=eps,
    tic_eps=tic_eps,
    tic_curvature=tic_curvature,
    curvature_decay=curvature_decay,
    seed=seed,
  )

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

  return Instruments(init_fn, grad_fn, update_fn, qs, every)


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
