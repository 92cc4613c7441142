"""Every key the instruments report, with its definition (what ``jaxscope list-metrics`` shows).

The keys come from the instruments' own tables: :func:`instrument_keys` builds
:func:`~jaxscope.metrics.instruments` for one quantity with its defaults and reads the keys
of its ``values`` (``jax.eval_shape`` of ``init``, nothing is computed), so a key added
there shows up here. :data:`INSTRUMENT_KEYS` gives each key a definition; a test checks that
none is missing. Per-leaf keys are written with ``{leaf}``, the leaf's name
(``Dense_0/kernel``, :func:`jaxscope.tree.leaf_infos`). The scope's keys
``{topic}/{stat}/{layer}`` are described by :func:`jaxscope.metrics.registry.info`.

Conventions (see ``docs/instruments.md`` for the formulas): ``gᵢ = ∇ℓᵢ`` is one example's
gradient, ``g = (1/B) Σᵢ gᵢ`` the mini-batch gradient, ``M = (1/B) Σᵢ gᵢ⊙gᵢ`` its second
moment, ``H`` the Hessian of the mini-batch loss; a ``…_stderr`` key is the standard error
(1 σ) of the reading of the same name, a ``…_residual`` key a convergence residual that
bounds its distance to the true quantity (``docs/cockpit_instruments.md``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxscope.metrics.instruments import INSTRUMENT_PRESETS, QUANTITIES, instruments

__all__ = ["INSTRUMENT_KEYS", "LEAF", "InstrumentKey", "instrument_key_table", "instrument_keys"]

#: The placeholder of a leaf's name in per-leaf key patterns.
LEAF = "{leaf}"
_SENTINEL = "jaxscope_leaf"

#: Definition of every instrument key (pattern with :data:`LEAF`).
INSTRUMENT_KEYS: dict[str, str] = {
  "loss": "mini-batch loss L = (1/B) Σᵢ ℓᵢ",
  "cockpit/grad_norm/{leaf}": "‖g‖₂ of the leaf: the mini-batch gradient of the instruments' probe "
  "(∇ of the mean of losses_fn, before any optimizer transformation)",
  "cockpit/distance/{leaf}": "‖θ_t − θ_0‖₂ of the leaf from its value at init()",
  "cockpit/update_size/{leaf}": "‖Δθ_t‖₂ of the leaf: this step's update as given to update() "
  "(what optax.apply_updates adds)",
  "alpha": "normalised step length α = t/s* − 1 of the previous step's update (quadratic "
  "fit along it, s* its minimiser; −1 if concave); NaN at the first step",
  "norm_test": "θ = √(Σᵢ‖gᵢ − g‖² / ((B−1)·B·‖g‖²)), Byrd et al. 2012",
  "inner_test": "θ = √(Var(gᵢᵀg) / (B·‖g‖⁴)), Var with ddof 1, Bollapragada et al. 2017",
  "ortho_test": "ν = √(Σᵢ‖gᵢ − (gᵢᵀg/‖g‖²)g‖² / ((B−1)·B·‖g‖²)), Bollapragada et al. 2017",
  "per_example_grads/hist_counts": "counts of the B·P per-example gradient entries gᵢⱼ "
  "per bin (estimated from a fixed sample of coordinates, exact for small leaves)",
  "per_example_grads/hist_edges": "the bin edges of hist_counts (bins + 1)",
  "per_example_grads/hist_nonfinite": "number of non-finite gᵢⱼ (not in hist_counts)",
  "per_example_grads/hist2d_counts_grad_param": "2-D counts of (gᵢⱼ, θⱼ) pairs, axis 0 the "
  "gradient bins, axis 1 the parameter bins (Cockpit's order)",
  "per_example_grads/hist2d_grad_edges": "bin edges of the gradient axis (axis 0)",
  "per_example_grads/hist2d_param_edges": "bin edges of the parameter axis (axis 1)",
  "hess_trace": "tr(H): exact from the Hessian diagonal on small models, else Hutchinson "
  "(1/K) Σₖ zₖᵀHzₖ over K Rademacher probes",
  "hess_trace_stderr": "standard error of hess_trace (0 when exact)",
  "hessian/trace/{leaf}": "the leaf's block of tr(H): Σⱼ Hⱼⱼ over its entries",
  "hessian/trace_stderr/{leaf}": "standard error of hessian/trace/{leaf} (0 when exact)",
  "tic_diag": "Takeuchi information criterion Σⱼ Mⱼ/(Hⱼⱼ + ε), Thomas et al. 2019",
  "tic_diag_stderr": "standard error of tic_diag (delta method over the diagonal's error)",
  "tic_trace": "Takeuchi information criterion from traces Σⱼ Mⱼ/(tr H + ε)",
  "tic_trace_stderr": "standard error of tic_trace, from the range of tr H ± 2·"
  "hess_trace_stderr (inf when that range reaches 0)",
  "hess_max_ev": "largest-magnitude eigenvalue λ of H, warm-started across steps",
  "hess_max_ev_residual": "‖Hv − λv‖ of the reading's unit vector v: an eigenvalue lies "
  "within it of hess_max_ev",
  "mean_gsnr": "mean gradient signal-to-noise ratio meanⱼ gⱼ²/(Mⱼ − gⱼ² + ε), "
  "Liu et al. 2020 (per-example variance, Cockpit's convention)",
  "cabs": "CABS batch size η·Σⱼ(Mⱼ − gⱼ²)/L, Balles et al. 2017 (SGD without momentum)",
  "early_stopping": "evidence-based criterion 1 − B·meanⱼ gⱼ²/(B(Mⱼ − gⱼ²)/(B−1) + ε), "
  "Mahsereci et al. 2017 (> 0: stop)",
  "per_example_grads/variance/{leaf}": "mean over the leaf's entries of Mⱼ − gⱼ² "
  "(per-example gradient variance, ddof 0)",
  "per_example_grads/second_moment/{leaf}": "mean over the leaf's entries of Mⱼ",
  "per_example_grads/norm_mean": "mean over the batch of ‖gᵢ‖₂",
  "per_example_grads/norm_max": "max over the batch of ‖gᵢ‖₂",
}


class InstrumentKey(NamedTuple):
  """One row of :func:`instrument_key_table`."""

  quantity: str
  key: str
  """The key pattern (per-leaf keys with :data:`LEAF`)."""
  definition: str
  """From :data:`INSTRUMENT_KEYS` ("" for a key it lacks)."""
  presets: tuple[str, ...]
  """The instrument presets that measure the quantity."""


def instrument_keys(quantity: str) -> tuple[str, ...]:
  """The keys ``instruments([quantity])`` reports with its defaults (per-leaf keys with
  :data:`LEAF`; without the reserved ``measured``)."""
  params = {_SENTINEL: jax.ShapeDtypeStruct((3, 2), jnp.float32)}
  state = jax.eval_shape(instruments([quantity]).init, params)
  return tuple(k.replace(_SENTINEL, LEAF) for k in state.values)


def instrument_key_table() -> list[InstrumentKey]:
  """Every quantity's keys with their definitions and presets, in the order of
  :data:`~jaxscope.metrics.instruments.QUANTITIES`."""
  rows = []
  for q in QUANTITIES:
    presets = tuple(p for p, qs in INSTRUMENT_PRESETS.items() if q in qs)
    for key in instrument_keys(q):
      rows.append(InstrumentKey(q, key, INSTRUMENT_KEYS.get(key, ""), presets))
  return rows
