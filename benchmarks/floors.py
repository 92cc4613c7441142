"""The floors of ``benchmarks/costs.py``: the model's shape, the machine's rates, and the
least FLOPs and bytes each measurement must spend.

The floors (``P`` parameters, ``B`` examples, per kernel ``l``: ``n_l`` elements and
``T_l`` output positions, ``T_l = 1`` for a Dense layer, fan-in ``d_in`` and fan-out
``d_out``; ``F_fwd`` the forward FLOPs, ``F_hvp`` the FLOPs of one Hessian-vector
product, both counted by XLA's cost analysis of the plain programs ``loss(params)`` and
``jvp(grad(loss))``):

=========================================  =================  ==========================
measurement                                FLOPs              bytes
=========================================  =================  ==========================
moments of one topic (norm, mean, var.)    3P                 4P (one read)
update/weight ratio                        2P                 8P (updates and params)
histogram of one topic (S sampled / leaf)  2 Σ min(S, n_l)    4 Σ min(S, n_l)
spectral norm (one warm power iteration)   4 Σ n_l            8 Σ n_l (W v, then Wᵀ u)
loss                                       0                  0 (the step has it)
grad_norm, update_size                     2P                 4P
distance                                   3P                 8P (params and origin)
alpha                                      Σ 2B T_l n_l + 4P  8P + (*) (gᵢ·u_prev: one
                                                                  contraction; no Gram
                                                                  matrix of this batch
                                                                  gives it)
per-example norms ‖gᵢ‖² (norm test)       Σ min(2B T_l²(d_in+d_out), 2B T_l n_l)    (*)
inner_test gᵢ·ḡ (all pairs by Gram)        Σ min(2B² T_l²(d_in+d_out), 2B T_l n_l)   (*)
second moment Σᵢ gᵢ² (variance, GSNR,      Σ 2B T_l n_l (one weight-gradient          (*)
  CABS, early stopping, TIC)               contraction again)
grad histograms (S sampled per leaf)       2B Σ min(S, n_l)   4B Σ min(S, n_l)
hess_trace / tic (k Hutchinson probes)     k · F_hvp          –
hess_max_ev (one warm HVP per step)        F_hvp              –
=========================================  =================  ==========================

(*) reading the layers' inputs and output gradients, ``4B Σ (d_in + d_out) T_l`` bytes.
A quantity that needs several of these pays their sum (e.g. ``tic_diag`` = k HVPs + the
second moment).

A floor's time is the roofline ``max(flops / R_mm, bytes / R_red)`` (:func:`floor_ms`), at
the rates :func:`machine_rates` measures in the same process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import problems
from benchmarks.hvp_floor import HUTCHINSON
from jaxscope.metrics.instruments import INSTRUMENT_PRESETS
from jaxscope.metrics.registry import HISTOGRAM_SAMPLE

F32 = 4  # bytes


# --------------------------------------------------------------------------- the model's shape


def _cost(fn: Callable[..., Any], *args: Any) -> dict[str, float]:
  """XLA's cost analysis (``flops``, ``bytes accessed``) of ``jit(fn)(*args)``."""
  ca = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(ca, list | tuple):
    ca = ca[0]
  return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}


def shape_facts(problem: problems.Problem) -> dict[str, Any]:
  """What the floors need: ``P``, ``B``, per kernel its size, output positions and fan in/out,
  and XLA's FLOP count of the forward pass and of one Hessian-vector product."""
  variables = {"params": problem.params}
  _, state = problem.model.apply(variables, problem.x, capture_intermediates=True)
  inter = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  outputs = {}
  for path, leaf in inter:
    name = "/".join(str(getattr(k, "key", k)) for k in path[:-2])
    outputs[name] = leaf.shape
  kernels = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(problem.params)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[-1] != "kernel":
      continue
    layer = "/".join(keys[:-1])
    out_shape = outputs.get(layer)
    positions = int(np.prod(out_shape[1:-1])) if out_shape is not None else 1
    kernels.append(
      {
        "layer": layer,
        "size": int(leaf.size),
        "d_in": int(np.prod(leaf.shape[:-1])),
        "d_out": int(leaf.shape[-1]),
        "positions": positions,
      }
    )
  n_params = sum(int(x.size) for x in jax.tree.leaves(problem.params))
  leaf_sizes = [int(x.size) for x in jax.tree.leaves(problem.params)]

  def loss(p: Any) -> jax.Array:
    return problem.loss(p, problem.x, problem.y)

  def hvp(p: Any, v: Any) -> Any:
    return jax.jvp(jax.grad(loss), (p,), (v,))[1]

  return {
    "P": n_params,
    "B": int(problem.x.shape[0]),
    "kernels": kernels,
    "leaf_sizes": leaf_sizes,
    "F_fwd": _cost(loss, problem.params)["flops"],
    "F_grad": _cost(jax.grad(loss), problem.params)["flops"],
    "F_hvp": _cost(hvp, problem.params, problem.params)["flops"],
  }


def machine_rates(problem: problems.Problem, facts: dict[str, Any], reps: int = 30) -> dict:
  """``R_mm`` (FLOP/s of a plain matmul of the widest Dense shape) and ``R_red`` (bytes/s of
  a plain sum over ``P`` float32 values), medians of ``reps`` calls."""
  widest = max(facts["kernels"], key=lambda k: k["d_in"] * k["d_out"] * k["positions"])
  w = jnp.ones((widest["d_in"], widest["d_out"]), jnp.float32)
  v = jnp.ones((facts["P"],), jnp.float32)
  mm, red = jax.jit(jnp.matmul), jax.jit(jnp.sum)

  def timed(fn: Callable[[], Any]) -> float:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
    return float(np.median(ts))

  best = (0.0, 0)
  for rows in (facts["B"] * widest["positions"], 8 * facts["B"] * widest["positions"]):
    a = jnp.ones((rows, widest["d_in"]), jnp.float32)
    rate = 2 * rows * widest["d_in"] * widest["d_out"] / timed(lambda a=a: mm(a, w)) / 1e9
    best = max(best, (rate, rows))
  t_red = timed(lambda: red(v))
  return {
    "matmul_shape": [best[1], widest["d_in"], widest["d_out"]],
    "R_mm_gflops": best[0],
    "R_red_gbps": F32 * facts["P"] / t_red / 1e9,
  }


# --------------------------------------------------------------------------- floors


def _weight_contraction(f: dict[str, Any]) -> tuple[float, float]:
  """One weight-gradient-sized contraction again (the elementwise second moment
  ``Σᵢ gᵢ² = (a²)ᵀ(δ²)``): ``Σ 2B T_l n_l`` FLOPs, reading the layers' inputs and output
  gradients, ``4B Σ (d_in + d_out) T_l`` bytes."""
  flops = sum(2 * f["B"] * k["positions"] * k["size"] for k in f["kernels"])
  return flops, _layer_io(f)


def _layer_io(f: dict[str, Any]) -> float:
  """Bytes of the layers' inputs and output gradients: ``4B Σ (d_in + d_out) T_l``."""
  return sum(F32 * f["B"] * (k["d_in"] + k["d_out"]) * k["positions"] for k in f["kernels"])


def _gram_or_contraction(f: dict[str, Any], per_example: bool) -> tuple[float, float]:
  """Per-example inner products, the cheaper route per layer: the contraction
  ``2B T_l n_l`` or the Gram matrices of inputs and output gradients
  (``gᵢ·gⱼ = Σ_{t,t'} (aᵢₜ·aⱼₜ')(δᵢₜ·δⱼₜ')``): ``2 B T_l² (d_in + d_out)`` for the diagonal
  only (``per_example``: the norms ``‖gᵢ‖²``) or ``2 B² T_l² (d_in + d_out)`` for all
  pairs (the inner-product test's ``gᵢ·ḡ``)."""
  flops = 0.0
  for k in f["kernels"]:
    pairs = f["B"] if per_example else f["B"] ** 2
    gram = 2 * pairs * k["positions"] ** 2 * (k["d_in"] + k["d_out"])
    flops += min(gram, 2 * f["B"] * k["positions"] * k["size"])
  return flops, _layer_io(f)


def _hist_sample(f: dict[str, Any], sample: int) -> int:
  return sum(min(sample, n) for n in f["leaf_sizes"])


def floor(name: str, f: dict[str, Any], k_probes: int = 8, hist_sample: int = 2048) -> dict:
  """The floor ``{"flops", "bytes"}`` of one measurement (see the module docstring)."""
  P = f["P"]
  moments = (3 * P, F32 * P)
  kernel_n = sum(k["size"] for k in f["kernels"])
  contraction = _weight_contraction(f)
  pe_norms = _gram_or_contraction(f, per_example=True)
  inner = _gram_or_contraction(f, per_example=False)
  hist = _hist_sample(f, hist_sample)
  table: dict[str, tuple[float, float]] = {
    "scope/params_moments": moments,
    "scope/grads_moments": moments,
    "scope/updates_moments": moments,
    "scope/ratio": (2 * P, 2 * F32 * P),
    "scope/params_histogram": (
      2 * _hist_sample(f, HISTOGRAM_SAMPLE),
      F32 * _hist_sample(f, HISTOGRAM_SAMPLE),
    ),
    "scope/params_spectral_norm": (4 * kernel_n, 2 * F32 * kernel_n),
    "loss": (0.0, 0.0),
    "grad_norm": (2 * P, F32 * P),
    "update_size": (2 * P, F32 * P),
    "distance": (3 * P, 2 * F32 * P),
    # α's end point needs every example's projection on the previous update, which no
    # Gram matrix of this batch gives: one weight-gradient-sized contraction (its start
    # point, the update, is combined from the gradient's projections: inner_test's).
    "alpha": (contraction[0] + 4 * P, contraction[1] + 2 * F32 * P),
    "norm_test": pe_norms,
    "ortho_test": (pe_norms[0] + inner[0], pe_norms[1]),
    "per_example_norms": pe_norms,
    "inner_test": inner,
    "grad_variance": contraction,
    "mean_gsnr": contraction,
    "cabs": contraction,
    "early_stopping": contraction,
    "grad_hist_1d": (2 * f["B"] * hist, F32 * f["B"] * hist),
    "grad_hist_2d": (2 * f["B"] * hist, F32 * f["B"] * hist),
    "hess_trace": (k_probes * f["F_hvp"], 0.0),
    "tic_diag": (k_probes * f["F_hvp"] + contraction[0], contraction[1]),
    "tic_trace": (k_probes * f["F_hvp"] + contraction[0], contraction[1]),
    "hess_max_ev": (f["F_hvp"], 0.0),
    "hvps": (k_probes * f["F_hvp"], 0.0),  # hvp_floor's program: the probes' products only.
  }
  if name.startswith("xla_floor/"):
    return floor(name.split("/", 1)[1], f, k_probes, hist_sample)
  if name.startswith("scope/") and name.endswith(("economy", "full")):
    parts = [table[f"scope/{t}_moments"] for t in ("params", "grads", "updates")]
    parts.append(table["scope/ratio"])
    if name.endswith("full"):
      # Histograms of the three topics, spectral norms, and the realised ratio / lost
      # fraction (arithmetic on the parameters and updates the moments already read).
      parts += [table["scope/params_histogram"]] * 3
      parts += [table["scope/params_spectral_norm"], (4 * P, 0.0)]
    return _sum_floors(parts)
  if name.startswith("instruments/"):
    preset = name.split("/", 1)[1]
    return _sum_floors(_preset_parts(INSTRUMENT_PRESETS[preset], table))
  if name not in table:
    raise KeyError(f"floor: no floor for {name!r}")
  flops, nbytes = table[name]
  return {"flops": float(flops), "bytes": float(nbytes)}


def _preset_parts(quantities: Sequence[str], table: dict) -> list[tuple[float, float]]:
  """The floors of a preset's quantities, the shared passes counted once: the
  elementwise second moment (``grad_variance``, ``mean_gsnr``, ``cabs``,
  ``early_stopping``, the TICs), the histograms' per-example entries and the ``k``
  Hutchinson probes' HVPs (``hess_trace``, ``tic_diag`` and ``tic_trace`` read the same
  products) are computed once for all quantities that read them."""
  shared = {"grad_variance", "mean_gsnr", "cabs", "early_stopping"}
  hists = {"grad_hist_1d", "grad_hist_2d"}
  parts, contraction_done, hist_done, probes_done = [], False, False, False
  for q in quantities:
    flops, nbytes = table[q]
    if q in {"tic_diag", "tic_trace"}:
      flops -= table["grad_variance"][0]
      nbytes = 0.0
    if q in HUTCHINSON:
      if probes_done:
        continue
      probes_done = True
    if q in shared:
      if contraction_done:
        continue
      contraction_done = True
    if q in hists:
      if hist_done:
        continue
      hist_done = True
    parts.append((flops, nbytes))
  if any(q in {"tic_diag", "tic_trace"} for q in quantities) and not contraction_done:
    parts.append(table["grad_variance"])
  return parts


def _sum_floors(parts: Sequence[tuple[float, float]]) -> dict[str, float]:
  return {"flops": float(sum(p[0] for p in parts)), "bytes": float(sum(p[1] for p in parts))}


def floor_ms(fl: dict[str, float], rates: dict[str, float]) -> float:
  """The roofline time of a floor: ``max(flops / R_mm, bytes / R_red)`` in ms."""
  t_mm = fl["flops"] / (rates["R_mm_gflops"] * 1e9)
  t_red = fl["bytes"] / (rates["R_red_gbps"] * 1e9)
  return 1e3 * max(t_mm, t_red)
