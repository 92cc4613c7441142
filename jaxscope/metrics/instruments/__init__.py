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

* ``economy``: ``loss``, ``cockpit/grad_norm/{leaf}``, ``cockpit/distance/{leaf}``,
  ``cockpit/update_size/{leaf}`` (under their own topic, so they never collide with a
  scope's ``grads/norm/…`` of possibly clipped gradients), ``alpha``, ``norm_test``,
  ``inner_test``, ``ortho_test``,
  ``per_example_grads/hist_{counts,edges,nonfinite}``;
* ``business``: economy + ``tic_diag`` + ``hess_trace`` (and ``hessian/trace/{leaf}``), each
  with its standard error (``tic_diag_stderr``, ``hess_trace_stderr``,
  ``hessian/trace_stderr/{leaf}``);
* ``full``: business + ``hess_max_ev`` (and ``hess_max_ev_residual``) +
  ``per_example_grads/hist2d_counts_grad_param`` (``[gradient bins, parameter bins]``, as
  Cockpit's ``GradHist2d``) with ``per_example_grads/hist2d_{grad,param}_edges``.

Not in a preset, as in Cockpit: ``mean_gsnr``, ``cabs``, ``early_stopping``, ``tic_trace``,
and jaxscope's ``grad_variance`` (``per_example_grads/variance/{leaf}``,
``per_example_grads/second_moment/{leaf}``) and ``per_example_norms``
(``per_example_grads/norm_mean``, ``per_example_grads/norm_max``).

How each is computed (the cheap exact routes; see :mod:`jaxscope.metrics.noise` and
:mod:`jaxscope.metrics.curvature`):

* per-example squared norms and second moments (:mod:`jaxscope.metrics.per_example`):
  outer products for Dense layers (captured with :mod:`jaxscope.capture`), patches for
  convolutions, chunked ``vmap(grad)`` for the rest;
* per-example projections ``gᵢᵀv`` (inner-product test on ``v = g``, α on ``v`` = the
  update): one forward-mode pass for all directions (:func:`~jaxscope.metrics.noise.projections`);
* curvature: Hessian-vector products by forward-over-reverse differentiation of the
  gradient (:mod:`jaxscope.metrics.hvp`: one batched ``jax.jvp`` pass for the probes and a
  one-step power iteration, else one ``jax.linearize``): the exact diagonal or Hutchinson
  probes for the trace and diagonal, a warm-started power iteration for ``λ_max`` with a
  residual check (Cockpit restarts from scratch each step, ≈ 30 HVPs; here
  ``max_ev_iters`` per step carried over steps, refined by Lanczos when not converged);
* histograms of per-example gradient entries on a fixed uniform sample of coordinates:
  integer counts per leaf times the leaf's sampling weight, exact (summing to ``B·P``) for
  full data and unbiased for samples, on a range kept from the first measured step
  (:func:`~jaxscope.metrics.histograms.sampled_histogram`).

**Error bars** (issue 18; ``docs/fidelity.md`` measures them against float64):

* ``curvature="exact"`` computes the diagonal from ``P`` one-hot HVPs per measured step
  and gives exact traces and TICs; ``"hutchinson"`` estimates them from
  ``hutchinson_probes`` probes with standard errors ``*_stderr``
  (:func:`~jaxscope.metrics.hutchinson.trace_estimate`; with 8 probes
  ``value ± 2·stderr`` covers the exact value in ~92–95% of draws; Cockpit's single
  probe gives a reading whose error usually exceeds the trace). ``"auto"`` is exact up to
  ``exact_max_params`` parameters (4096: a measured step of the 2.4 k-parameter digits
  MLP then costs ~0.1 s on a 2-core CPU), Hutchinson above. ``tic_diag`` under Hutchinson
  divides by a bias-corrected moving average of the diagonal estimates, whose per-entry
  variance ``Σ_{k≠j} H_jk²`` its standard error carries (:func:`.hessian.tic_values`).
* ``hess_max_ev`` reports ``hess_max_ev_residual = ‖Hv − λv‖``: an eigenvalue lies within
  it. The first measured step and every step whose residual exceeds
  ``max_ev_tol·|λ|`` are refined by ``max_ev_refine_iters`` Lanczos steps (run twice so
  that no basis is stored: ``2·max_ev_refine_iters + 1`` products, each recomputing the
  forward and backward pass), so the reading is converged from the first
  recorded step. The default ``max_ev_tol=0.5`` refines exactly the readings that would
  otherwise be noise (residual ≥ |λ|/2): one warm-started power step on a new mini-batch
  leaves a residual of 14–40% of |λ| on the digits MLP and CNN (their error 2–15%, inside
  it), so a tolerance of 0.05 refines every step at ~20 HVPs each (``docs/fidelity.md``).
* ``alpha`` is NaN until an update exists (step 0).

``alpha`` and the update-based values are *two-step*: ``alpha`` at step ``t`` is the α of
the update made at step ``t − 1`` (measured with the losses at ``θ_{t−1}`` and ``θ_t``);
``cockpit/update_size`` is this step's update. With ``every = n`` only steps ``0, n, 2n, …``
measure (``lax.cond``/``lax.switch``; α's end point is step ``kn + 1``, which then pays one
forward-mode pass). ``values["measured"]`` tells whether the values are this step's.

The package: :mod:`.config` (the quantities, presets and settings), :mod:`.state` (the
state and the probe), :mod:`.grad` (the gradient side), :mod:`.hessian` (its curvature),
:mod:`.update` (the update side) and :mod:`.build` (the factory).
"""

from jaxscope.metrics.instruments.build import instruments
from jaxscope.metrics.instruments.config import (
  HUTCHINSON_QUANTITIES,
  INSTRUMENT_PRESETS,
  QUANTITIES,
)
from jaxscope.metrics.instruments.state import Instruments, InstrumentsState, Probe

__all__ = [
  "HUTCHINSON_QUANTITIES",
  "INSTRUMENT_PRESETS",
  "QUANTITIES",
  "Instruments",
  "InstrumentsState",
  "Probe",
  "instruments",
]
