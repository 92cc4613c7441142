"""How right the instruments' readings are: each against an exact float64 computation.

Run from the repository root::

    .venv/bin/python benchmarks/fidelity.py             # 5-8 min on the shared 2-core CPU
    .venv/bin/python benchmarks/fidelity.py --quick     # smoke run (~3 min), nothing written
    .venv/bin/python benchmarks/fidelity.py --markdown  # docs/fidelity.md's tables from the JSON

Two problems on scikit-learn's 1797 digits (8×8, ``X/16``), batch 128, SGD lr 0.1,
minibatches drawn from a seeded permutation per epoch:

* ``digits_mlp``: Dense(32)-tanh-Dense(10), 2 410 parameters: ``curvature="auto"`` is
  exact (``exact_max_params = 4096``);
* ``digits_cnn``: Conv(8, 3×3)-relu-Conv(8, 3×3)-relu-flatten-Dense(10) (SAME padding),
  5 794 parameters: above 4 096, so ``"auto"`` means Hutchinson with 8 probes.

Each trains 101 steps; one jitted step measures ``instruments(["tic_trace"],
preset="full")`` twice, with the new defaults and with the round-one options
:data:`OLD` (``curvature="hutchinson", hutchinson_probes=1, max_ev_tol=None``,
per-step histogram ranges), and the scope's spectral norms twice (the ``full`` preset's
metric; round one's one warm-started power step). At steps 0, 1, 10 and 100 every reading
is compared with a float64 reference at the same parameters and batch:

* the dense Hessian in float64 (``jax.hessian`` under ``jax.enable_x64``; for the CNN the
  columns of the convolutions by forward-over-reverse products and the Dense head's
  block as the Hessian of the loss in the head's parameters alone, checked against
  full products on random head columns): ``λ`` of largest magnitude (``eigsh``), trace,
  diagonal;
* per-example gradients by ``vmap(grad)`` in float64: the second moment ``M`` of the TICs
  (``tic_diag = Σ Mⱼ/(Hⱼⱼ + ε)``, ``tic_trace = Σ Mⱼ/(tr H + ε)``), the histograms;
* ``α``: the weighted least-squares quadratic fit of Cockpit (Mahsereci & Hennig 2017)
  solved by ``numpy.linalg.lstsq`` in float64 from float64 losses and projections;
* spectral norms: ``numpy.linalg.svd`` of each kernel's matrix view in float64.

A reading is *within its error bar* when ``|value − reference| ≤ 2·stderr``
(``*_stderr``), ``≤ residual + 1e-5·|reference|`` (``*_residual``, float32 slack), or,
for an exact reading (error bar 0), within 1e-5 relative. Coverage: the 8-probe and
1-probe Hutchinson readings redrawn ``--draws`` times at the parameters of steps 0 and
100. Along the run, whether the new defaults refine ``λ_max`` at each step (one power step
from the same vector, unrefined, has a residual above ``max_ev_tol·|λ|``). Cost:
``instruments(preset="business" | "full")`` with the new defaults and with :data:`OLD`
(plus the new ``full`` without refinement, and Hutchinson's 8 probes where ``"auto"`` is
exact) against a bare ``jax.value_and_grad`` SGD step, compiled ahead, timed interleaved
(order rotated), medians and ratios. ``docs/fidelity.md`` quotes the output.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from scipy.sparse.linalg import eigsh  # noqa: E402

from benchmarks.common import copy_tree, environment, iqr, write_json  # noqa: E402
from jaxscope.metrics import instruments, registry, scope, spectral  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fidelity.json"
BATCH = 128
LEARNING_RATE = 0.1
STEPS = (0, 1, 10, 100)
TIC_EPS = 1e-7  # instruments' tic_eps default.
#: Round one's options (issue 18's findings were measured with them).
OLD: dict[str, Any] = {
  "curvature": "hutchinson",
  "hutchinson_probes": 1,
  "max_ev_tol": None,
  "hist_range": "step",
  "hist2d_range": "step",
}
QUANTITIES = ("hess_max_ev", "hess_trace", "tic_diag", "tic_trace", "alpha")
ERROR_BAR = {
  "hess_max_ev": "hess_max_ev_residual",
  "hess_trace": "hess_trace_stderr",
  "tic_diag": "tic_diag_stderr",
  "tic_trace": "tic_trace_stderr",
}
WARMUP = 3


class DigitsMLP(nn.Module):
  """Dense(32)-tanh-Dense(10) on the flattened image."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(nn.tanh(nn.Dense(32)(x)))


class DigitsCNN(nn.Module):
  """Conv(8, 3×3)-relu-Conv(8, 3×3)-relu-flatten-Dense(10), SAME padding."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class Problem(NamedTuple):
  name: str
  description: str
  model: nn.Module
  params: Any
  head: str | None
  """Top-level module whose Hessian block is formed on its own (``None``: all at once)."""

  def losses(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """The individual losses ``[B]``."""
    logits = self.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(self.losses(params, x, y))


def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: ``float32 [1797, 8, 8, 1]`` in ``[0, 1]`` and ``int32`` labels."""
  from sklearn.datasets import load_digits

  bunch = load_digits()
  return (bunch.images / 16.0).astype(np.float32)[..., None], bunch.target.astype(np.int32)


def batch_indices(n: int, steps: int, seed: int = 0) -> list[np.ndarray]:
  """``steps`` minibatches of :data:`BATCH` indices, one seeded permutation per epoch."""
  rng = np.random.default_rng(seed)
  out: list[np.ndarray] = []
  while len(out) < steps:
    perm = rng.permutation(n)
    out += [perm[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
  return out[:steps]


def make_problems(x: np.ndarray) -> list[Problem]:
  out = []
  for name, model, head, desc in (
    ("digits_mlp", DigitsMLP(), None, "Dense(32)-tanh-Dense(10)"),
    ("digits_cnn", DigitsCNN(), "Dense_0", "Conv(8,3x3)-relu-Conv(8,3x3)-relu-Dense(10)"),
  ):
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    out.append(Problem(name, desc, model, params, head))
  return out


def num_params(params: Any) -> int:
  return sum(int(a.size) for a in jax.tree.leaves(params))


# ------------------------------------------------------------------ float64 references


def _hvp_columns(loss64: Callable, f64: jax.Array, idx: np.ndarray, chunk: int) -> np.ndarray:
  """``H[:, idx]`` (``[len(idx), P]``) by forward-over-reverse products on one-hot vectors."""
  grad = jax.grad(loss64)
  cols = jax.jit(jax.vmap(lambda v: jax.jvp(grad, (f64,), (v,))[1]))
  out = []
  for i in range(0, len(idx), chunk):
    part = idx[i : i + chunk]
    e = np.zeros((chunk, f64.size))
    e[np.arange(len(part)), part] = 1.0
    out.append(np.asarray(cols(jnp.asarray(e)))[: len(part)])
  return np.concatenate(out)


def dense_hessian(problem: Problem, params: Any, x: np.ndarray, y: np.ndarray) -> dict:
  """The float64 Hessian of the mean loss at ``params`` on ``(x, y)``, symmetrised.

  Without a head: ``jax.hessian``. With one (the CNN): the columns of every other
  parameter by products ``H eⱼ`` and the head's own block as the Hessian of the loss in
  the head's parameters alone (the rest fixed): the full product on a head column costs
  the convolutions' forward-over-reverse pass, the restricted one only the head's.
  Checked on 16 random head columns against full products (``check_max_abs``).
  """
  flat, unravel = ravel_pytree(params)
  p = flat.size
  with jax.enable_x64(True):
    f64 = jnp.asarray(np.asarray(flat), jnp.float64)
    x64, y64 = jnp.asarray(x, jnp.float64), jnp.asarray(y)

    def loss64(f: jax.Array) -> jax.Array:
      return problem.loss(unravel(f), x64, y64)

    if problem.head is None:
      h = np.asarray(jax.jit(jax.hessian(loss64))(f64))
      check = None
    else:
      mask = ravel_pytree(
        {
          k: jax.tree.map(lambda a, k=k: np.full(a.shape, k == problem.head), v)
          for k, v in params.items()
        }
      )[0]
      head = np.flatnonzero(np.asarray(mask))
      body = np.flatnonzero(~np.asarray(mask))
      h = np.zeros((p, p))
      h[body, :] = _hvp_columns(loss64, f64, body, 128)
      h[:, body] = h[body, :].T
      fixed = unravel(f64)  # The other layers enter as constants: no tangent through them.
      f_head, unravel_head = ravel_pytree(fixed[problem.head])  # = f64[head], same order

      def head_loss(fh: jax.Array) -> jax.Array:
        return problem.loss({**fixed, problem.head: unravel_head(fh)}, x64, y64)

      h[np.ix_(head, head)] = _hvp_columns(head_loss, f_head, np.arange(head.size), 512)
      pick = np.random.default_rng(0).choice(head, 16, replace=False)
      check = float(np.max(np.abs(_hvp_columns(loss64, f64, pick, 16) - h[pick, :])))
  h = 0.5 * (h + h.T)
  return {"h": h, "check_max_abs": check}


def per_example(problem: Problem, params: Any, x: np.ndarray, y: np.ndarray) -> dict:
  """Individual losses ``[B]`` and gradients ``[B, P]`` in float64 (``vmap(grad)``)."""
  flat, unravel = ravel_pytree(params)
  with jax.enable_x64(True):
    f64 = jnp.asarray(np.asarray(flat), jnp.float64)
    x64, y64 = jnp.asarray(x, jnp.float64), jnp.asarray(y)

    def one(f: jax.Array, xi: jax.Array, yi: jax.Array) -> jax.Array:
      return problem.losses(unravel(f), xi[None], yi[None])[0]

    losses = np.asarray(jax.vmap(one, (None, 0, 0))(f64, x64, y64))
    grads = np.asarray(jax.jit(jax.vmap(jax.grad(one), (None, 0, 0)))(f64, x64, y64))
  return {"losses": losses, "grads": grads}


def alpha_reference(start: dict, end: dict, update: np.ndarray, eps: float = 1e-10) -> float:
  """α of ``update`` from float64 observations at its start and end (Cockpit's fit).

  ``q(s) = μ₀ + μ₁s + μ₂s²`` fitted by weighted least squares (weights ``1/σ²``, the
  ``ddof = 1`` variances of the individual losses and projections on ``d = u/‖u‖``) to
  ``q(0) = f₀, q(t) = f₁, q'(0) = f'₀, q'(t) = f'₁``; ``α = −2μ₂t/μ₁ − 1``, ``−1`` when
  ``μ₂ ≤ 0`` (no minimum ahead).
  """
  t = float(np.linalg.norm(update))
  d = update / t
  p0, p1 = start["grads"] @ d, end["grads"] @ d
  obs = np.array([start["losses"].mean(), end["losses"].mean(), p0.mean(), p1.mean()])
  var = np.array([np.var(v, ddof=1) for v in (start["losses"], end["losses"], p0, p1)])
  var = np.where(var > 0, var, eps)
  design = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], np.float64)
  w = 1.0 / np.sqrt(var)
  mu = np.linalg.lstsq(design * w[:, None], obs * w, rcond=None)[0]
  return -1.0 if mu[2] <= 0 else float(-2.0 * mu[2] * t / mu[1] - 1.0)


def references(h: np.ndarray, ex: dict) -> dict:
  """λ of largest magnitude, traces and TICs from the Hessian and the per-example gradients."""
  lam = float(eigsh(h, k=1, which="LM", tol=1e-13, return_eigenvectors=False)[0])
  d, m = np.diag(h), np.mean(ex["grads"] ** 2, axis=0)
  return {
    "hess_max_ev": lam,
    "hess_trace": float(d.sum()),
    "tic_trace": float(m.sum() / (d.sum() + TIC_EPS)),
    "tic_diag": float(np.sum(m / (d + TIC_EPS))),
    "frobenius": float(np.sqrt(np.sum(h * h))),
    "one_probe_trace_sd": float(np.sqrt(2 * (np.sum(h * h) - np.sum(d * d)))),
    "diag": d,
  }


def nearest_eigenvalue(h: np.ndarray, value: float) -> float:
  """The eigenvalue of ``h`` closest to ``value`` (shift-invert Lanczos)."""
  return float(eigsh(h, k=1, sigma=value, which="LM", return_eigenvectors=False)[0])


# ------------------------------------------------------------------ the training run


def spectral_metrics() -> dict[str, Any]:
  """The scope ``full`` preset's spectral metric (new) and round one's (one power step)."""
  new = [
    m
    for m in registry.preset_metrics("full")["params"]
    if not isinstance(m, str) and "spectral" in m.name
  ]
  if len(new) != 1:
    raise RuntimeError(f"the full preset has {len(new)} spectral metrics, expected one.")
  sig = inspect.signature(spectral.spectral_norm).parameters
  legacy = {"warmup_iters": 0, "rewarm_every": 0, "max_iters": 1}  # round one: none of these
  old = spectral.spectral_norm(
    method="power", iters=1, **{k: v for k, v in legacy.items() if k in sig}
  )
  return {"new": new[0], "old": old}


def train(problem: Problem, x: np.ndarray, y: np.ndarray, checked: Sequence[int]) -> dict:
  """Trains ``max(checked) + 1`` SGD steps measuring everything twice (new, :data:`OLD`).

  Returns:
    ``{"values": {opts: {step: values}}, "params": {step: θ_t}, "updates": {step: u_t},
    "batches": {step: indices}, "refined": [bool per step]}``: values at the ``checked``
    steps, parameters (before the step), updates and batches there and one step before
    (α's start), and at which steps the new defaults refined ``λ_max``.
  """
  steps = max(checked) + 1
  keep = set(checked) | {t - 1 for t in checked if t > 0}
  insts = {
    "new": instruments(["tic_trace"], preset="full"),
    "old": instruments(["tic_trace"], preset="full", **OLD),
  }
  # One power step from the new instance's vector, never refined: whether the new
  # defaults refine λ_max this step (residual > max_ev_tol·|λ|).
  power = instruments(["hess_max_ev"], max_ev_tol=None)
  tol = inspect.signature(instruments).parameters["max_ev_tol"].default
  scopes = {k: scope(params=[m]) for k, m in spectral_metrics().items()}
  tx = optax.sgd(LEARNING_RATE)

  @jax.jit
  def step(params: Any, opt: Any, states: dict, xb: jax.Array, yb: jax.Array) -> tuple:
    probes = {k: i.grad(states[k], problem.losses, params, xb, yb) for k, i in insts.items()}
    upd, opt = tx.update(probes["new"].grads, opt, params)
    new_states, vals = {"power": states["power"]}, {}
    for k, inst in insts.items():
      v, new_states[k] = inst.update(states[k], probes[k], upd)
      sv, new_states[f"scope_{k}"] = scopes[k].update(states[f"scope_{k}"], params=params)
      vals[k] = {**v, **sv}
    ps = states["power"]._replace(max_ev=states["new"].max_ev)
    pv, _ = power.update(ps, power.grad(ps, problem.losses, params, xb, yb), upd)
    refined = ~(pv["hess_max_ev_residual"] <= tol * jnp.abs(pv["hess_max_ev"]))
    return optax.apply_updates(params, upd), opt, new_states, upd, vals, refined

  params = problem.params
  states = {k: i.init(params) for k, i in insts.items()}
  states.update({f"scope_{k}": s.init(params) for k, s in scopes.items()})
  states["power"] = power.init(params)
  opt = tx.init(params)
  idx = batch_indices(len(x), steps)
  out: dict[str, Any] = {"values": {"new": {}, "old": {}}, "params": {}, "updates": {}}
  out["batches"] = {t: idx[t] for t in keep}
  out["refined"] = []
  t0 = time.perf_counter()
  for t in range(steps):
    before = params
    params, opt, states, upd, vals, refined = step(params, opt, states, x[idx[t]], y[idx[t]])
    out["refined"].append(t == 0 or bool(refined))  # The first step always refines.
    if t in keep:
      out["params"][t] = jax.tree.map(np.asarray, before)
      out["updates"][t] = np.asarray(ravel_pytree(upd)[0], np.float64)
    if t in checked:
      for k in ("new", "old"):
        out["values"][k][t] = {n: np.asarray(v) for n, v in vals[k].items()}
  print(f"  {problem.name}: {steps} steps trained and measured in {time.perf_counter() - t0:.1f} s")
  return out


# ------------------------------------------------------------------ comparisons


def judge(value: float, ref: float, bar: float | None, kind: str) -> dict:
  """One reading against its reference: errors, and whether its error bar holds them."""
  err = value - ref
  rel = abs(err) / abs(ref) if ref != 0 else float("inf")
  if kind == "exact" or (kind == "stderr" and bar == 0.0):
    within, kind = rel <= 1e-5, "exact"
  elif kind == "stderr":
    within = abs(err) <= 2 * bar
  elif kind == "residual":
    within = abs(err) <= bar + 1e-5 * abs(ref)
  else:
    within = None
  noise = None
  if kind == "stderr":
    noise = 2 * bar >= abs(value)
  elif kind == "residual":
    noise = bar >= 0.5 * abs(value)
  return {
    "value": value,
    "reference": ref,
    "abs_error": abs(err),
    "rel_error": rel,
    "error_bar": bar,
    "error_bar_kind": kind,
    "within": within,
    "noise": noise,
  }


def compare_readings(values: dict, ref: dict, h: np.ndarray, alpha_ref: float) -> list[dict]:
  """Every quantity of :data:`QUANTITIES` of one step and options against the reference."""
  rows = []
  for q in QUANTITIES:
    value = float(values[q])
    if q == "alpha":
      row = {"value": value, "reference": alpha_ref, "error_bar_kind": "none", "within": None}
      if np.isfinite(alpha_ref):
        row.update(judge(value, alpha_ref, None, "none"))
      row["nan_as_specified"] = bool(np.isnan(alpha_ref) and np.isnan(value))
    else:
      bar_key = ERROR_BAR[q]
      kind = "residual" if bar_key.endswith("_residual") else "stderr"
      row = judge(value, ref[q], float(values[bar_key]), kind)
      if q == "hess_max_ev" and not row["within"]:
        near = nearest_eigenvalue(h, value)  # The residual bounds the distance to *an* eigenvalue.
        row["nearest_eigenvalue"] = near
        row["within_nearest"] = abs(value - near) <= row["error_bar"] + 1e-5 * abs(near)
    rows.append({"quantity": q, **row})
  return rows


def compare_histograms(values: dict, grads: np.ndarray, p: int) -> dict:
  """Histogram totals against ``B·P`` and the 1-D counts against the exact full histogram."""
  counts = np.asarray(values["per_example_grads/hist_counts"], np.float64)
  edges = np.asarray(values["per_example_grads/hist_edges"], np.float64)
  exact, _ = np.histogram(np.clip(grads, edges[0], edges[-1]), bins=edges)
  c2 = np.asarray(values["per_example_grads/hist2d_counts_grad_param"], np.float64)
  return {
    "expected_total": BATCH * p,
    "hist_total": float(counts.sum()),
    "hist2d_total": float(c2.sum()),
    "hist_range": [float(edges[0]), float(edges[-1])],
    "hist2d_grad_range": [float(values["per_example_grads/hist2d_grad_edges"][i]) for i in (0, -1)],
    "tv_vs_exact": float(0.5 * np.abs(counts / counts.sum() - exact / exact.sum()).sum()),
  }


def _leaf_dict(params: Any) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(k.key) for k in path): np.asarray(a) for path, a in flat}


def compare_spectral(values: dict, params: Any) -> list[dict]:
  """Each ``params/spectral_norm/{layer}`` against the float64 SVD of its matrix view."""
  rows = []
  leaves = _leaf_dict(params)
  for key in sorted(k for k in values if k.startswith("params/spectral_norm/")):
    layer = key.removeprefix("params/spectral_norm/")
    w = leaves[layer].astype(np.float64)
    ref = float(np.linalg.svd(w.reshape(-1, w.shape[-1]), compute_uv=False)[0])
    res_key = f"params/spectral_norm_residual/{layer}"
    if res_key in values:
      row = judge(float(values[key]), ref, float(values[res_key]), "residual")
    else:
      row = judge(float(values[key]), ref, None, "exact")
    rows.append({"layer": layer, "shape": list(w.shape), **row})
  return rows


def check_problem(
  problem: Problem, x: np.ndarray, y: np.ndarray, checked: Sequence[int], draws: int
) -> dict:
  """Trains, then compares every checked step's readings with the float64 references.

  Also the coverage of Hutchinson's error bars (:func:`coverage`, ``draws`` draws of 8
  and of 1 probe) at the first and last checked steps.
  """
  run = train(problem, x, y, checked)
  p = num_params(problem.params)
  readings, hists, spectra, hess_info, cover = [], [], [], [], []
  runs: dict[int, Callable] = {}
  examples: dict[int, dict] = {}
  t0 = time.perf_counter()
  for t in sorted(run["params"]):
    ib = run["batches"][t]
    examples[t] = per_example(problem, run["params"][t], x[ib], y[ib])
  for t in checked:
    ib = run["batches"][t]
    dense = dense_hessian(problem, run["params"][t], x[ib], y[ib])
    ref = references(dense["h"], examples[t])
    hess_info.append(
      {
        "step": t,
        "lambda_max": ref["hess_max_ev"],
        "trace": ref["hess_trace"],
        "frobenius": ref["frobenius"],
        "one_probe_trace_sd": ref["one_probe_trace_sd"],
        "min_abs_diag": float(np.min(np.abs(ref["diag"]))),
        "head_check_max_abs": dense["check_max_abs"],
      }
    )
    if t in (checked[0], checked[-1]):
      for k in (8, 1):
        if k not in runs:
          runs[k] = _draws_fn(problem, k)
        c = coverage(runs[k], run["params"][t], x[ib], y[ib], ref, k, draws)
        cover.append({"step": t, **c})
    a_ref = float("nan")
    if t > 0:
      a_ref = alpha_reference(examples[t - 1], examples[t], run["updates"][t - 1])
    for opts in ("new", "old"):
      v = run["values"][opts][t]
      for row in compare_readings(v, ref, dense["h"], a_ref):
        readings.append({"step": t, "options": opts, **row})
      hists.append({"step": t, "options": opts, **compare_histograms(v, examples[t]["grads"], p)})
      for row in compare_spectral(v, run["params"][t]):
        spectra.append({"step": t, "options": opts, **row})
  print(f"  {problem.name}: float64 references and coverage in {time.perf_counter() - t0:.1f} s")
  return {
    "readings": readings,
    "histograms": hists,
    "spectral": spectra,
    "hessian": hess_info,
    "coverage": cover,
    "trained_steps": len(run["refined"]),
    "max_ev_refined_steps": [t for t, r in enumerate(run["refined"]) if r],
    "max_ev_refined_fraction": float(np.mean(run["refined"])),
  }


# ------------------------------------------------------------------ coverage


def _draws_fn(problem: Problem, probes: int) -> Callable:
  """``(params, x, y, key) -> values``: one Hutchinson draw of ``probes`` probes, jitted.

  Called once per draw from Python: inside ``lax.map`` (a loop on the device) the
  convolutions' Hessian-vector products run ~10× slower on XLA:CPU.
  """
  inst = instruments(
    ["hess_trace", "tic_trace", "tic_diag"], curvature="hutchinson", hutchinson_probes=probes
  )

  def one(params: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> dict:
    s = inst.init(params)._replace(key=key)
    probe = inst.grad(s, problem.losses, params, x, y)
    return inst.update(s, probe, probe.grads)[0]

  return jax.jit(one)


def coverage(
  run: Callable, params: Any, x: np.ndarray, y: np.ndarray, ref: dict, probes: int, draws: int
) -> dict:
  """Hutchinson's readings redrawn ``draws`` times at fixed parameters and batch.

  Args:
    run: from :func:`_draws_fn` (``probes`` probes).
    params, x, y: where.
    ref: :func:`references` there.
    probes, draws: as ``run``.

  Returns:
    The fraction of draws whose ``value ± 2·stderr`` holds the float64 value, for
    ``hess_trace``, ``tic_trace``, ``tic_diag`` (one step: its moving average is that
    step's estimate) and the per-leaf traces, with the median reported standard error and
    the measured standard deviation of ``hess_trace`` next to the true one
    ``√(2 Σ_{i≠j} Hᵢⱼ² / K)``.
  """
  xb, yb = jnp.asarray(x), jnp.asarray(y)
  draws_v = [run(params, xb, yb, k) for k in jax.random.split(jax.random.key(1), draws)]
  v = {k: np.stack([np.asarray(d[k]) for d in draws_v]) for k in draws_v[0]}
  out: dict[str, Any] = {"probes": probes, "draws": draws}
  for q in ("hess_trace", "tic_trace", "tic_diag"):
    se = v[f"{q}_stderr"]
    out[q] = {
      "reference": ref[q],
      "coverage_2se": float(np.mean(np.abs(v[q] - ref[q]) <= 2 * se)),
      "median_stderr": float(np.median(se)),
      "sd_of_values": float(np.std(v[q])),
      "median_rel_error": float(np.median(np.abs(v[q] - ref[q]) / abs(ref[q]))),
      "noise_fraction": float(np.mean(2 * se >= np.abs(v[q]))),
    }
  out["hess_trace"]["true_stderr"] = ref["one_probe_trace_sd"] / np.sqrt(probes)
  sizes = [a.size for a in jax.tree.leaves(params)]
  leaf_tr = [s.sum() for s in np.split(ref["diag"], np.cumsum(sizes)[:-1])]
  hits = [
    np.abs(v[f"hessian/trace/{n}"] - tr) <= 2 * v[f"hessian/trace_stderr/{n}"]
    for n, tr in zip(_leaf_dict(params), leaf_tr, strict=True)
  ]
  out["leaf_traces_coverage_2se"] = float(np.mean(hits))
  return out


# ------------------------------------------------------------------ cost


def make_step(problem: Problem, preset: str | None, opts: dict) -> tuple[Callable, tuple]:
  """A jitted SGD step (bare, or measuring ``instruments(preset=...)``) and its state."""
  tx = optax.sgd(LEARNING_RATE)
  if preset is None:

    def bare(params: Any, opt: Any, istate: Any, x: jax.Array, y: jax.Array) -> tuple:
      loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
      upd, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, upd), opt, istate, loss

    return jax.jit(bare, donate_argnums=(0, 1)), (tx.init(problem.params), ())
  inst = instruments(preset=preset, **opts)

  def step(params: Any, opt: Any, istate: Any, x: jax.Array, y: jax.Array) -> tuple:
    probe = inst.grad(istate, problem.losses, params, x, y)
    upd, opt = tx.update(probe.grads, opt, params)
    values, istate = inst.update(istate, probe, upd)
    return optax.apply_updates(params, upd), opt, istate, values

  return jax.jit(step, donate_argnums=(0, 1, 2)), (
    tx.init(problem.params),
    inst.init(problem.params),
  )


def time_variants(problem: Problem, x: jax.Array, y: jax.Array, reps: int) -> dict:
  """Per-call wall times (ms) of the bare step and business/full × new/old, interleaved.

  Two more variants split the new defaults' cost: ``full_new_no_refine`` (``max_ev_tol =
  None``: λ_max never refined) and, where ``"auto"`` is exact, ``business_hutchinson8``
  (``curvature="hutchinson"``, 8 probes).
  """
  variants: dict[str, tuple[str | None, dict]] = {"bare": (None, {})}
  for preset in ("business", "full"):
    variants[f"{preset}_new"] = (preset, {})
    variants[f"{preset}_old"] = (preset, OLD)
  variants["full_new_no_refine"] = ("full", {"max_ev_tol": None})
  limit = inspect.signature(instruments).parameters["exact_max_params"].default
  if num_params(problem.params) <= limit:
    variants["business_hutchinson8"] = ("business", {"curvature": "hutchinson"})
  steps, states = {}, {}
  for name, (preset, opts) in variants.items():
    steps[name], (opt, ist) = make_step(problem, preset, opts)
    states[name] = (copy_tree(problem.params), opt, ist)

  def call(name: str) -> float:
    t0 = time.perf_counter()
    out = steps[name](*states[name], x, y)
    jax.block_until_ready(out)
    states[name] = out[:3]
    return (time.perf_counter() - t0) * 1e3

  compile_s = {}
  for name in variants:
    t0 = time.perf_counter()
    call(name)
    compile_s[name] = time.perf_counter() - t0
    for _ in range(WARMUP - 1):
      call(name)
  names = list(variants)
  times: dict[str, list[float]] = {n: [] for n in names}
  for rep in range(reps):
    shift = rep % len(names)
    for name in names[shift:] + names[:shift]:
      times[name].append(call(name))
  med = {n: float(np.median(t)) for n, t in times.items()}
  out = {
    "reps": reps,
    "median_ms": {n: round(m, 3) for n, m in med.items()},
    "iqr_ms": {n: round(iqr(np.asarray(t)), 3) for n, t in times.items()},
    "first_call_s": {n: round(s, 2) for n, s in compile_s.items()},
    "ratio_to_bare": {n: round(med[n] / med["bare"], 3) for n in names if n != "bare"},
  }
  out["new_over_old"] = {
    p: round(med[f"{p}_new"] / med[f"{p}_old"], 3) for p in ("business", "full")
  }
  return out


# ------------------------------------------------------------------ report


def _fmt(x: Any, width: int = 10) -> str:
  if x is None:
    return f"{'-':>{width}}"
  if isinstance(x, bool):
    return f"{'yes' if x else 'NO':>{width}}"
  return f"{x:>{width}.4g}"


def format_table(report: dict) -> str:
  """The readings, histogram totals, spectral norms, coverage and cost as text."""
  lines = [
    f"device {report['device']}, jax {report['jax']}, {report['cpu_count']} CPUs, "
    f"jaxscope {report.get('jaxscope_git')}"
  ]
  head = (
    f"{'quantity':<12} {'opts':<4} {'step':>4} {'value':>10} {'reference':>10} "
    f"{'rel err':>10} {'bar':>10} {'kind':>8} {'within':>6} {'noise':>6}"
  )
  for name, prob in report["problems"].items():
    lines += [
      "",
      f"{name}: {prob['model']}, {prob['num_params']} parameters, "
      f"curvature='auto' -> {prob['auto_curvature']}",
      head,
      "-" * len(head),
    ]
    for r in sorted(prob["readings"], key=lambda r: (r["quantity"], r["options"], r["step"])):
      lines.append(
        f"{r['quantity']:<12} {r['options']:<4} {r['step']:>4} {_fmt(r['value'])} "
        f"{_fmt(r['reference'])} {_fmt(r.get('rel_error'))} {_fmt(r.get('error_bar'))} "
        f"{r['error_bar_kind']:>8} {_fmt(r['within'], 6)} {_fmt(r.get('noise'), 6)}"
      )
    lines.append("histograms (sum of counts vs B*P; total variation vs the exact histogram):")
    for h in prob["histograms"]:
      lines.append(
        f"  {h['options']:<4} step {h['step']:>3}: 1-D {h['hist_total']:.0f}, 2-D "
        f"{h['hist2d_total']:.0f} vs {h['expected_total']}; range "
        f"[{h['hist_range'][0]:.3g}, {h['hist_range'][1]:.3g}]; TV {h['tv_vs_exact']:.3f}"
      )
    lines.append("spectral norms (worst layer per step):")
    for opts in ("new", "old"):
      for t in sorted({s["step"] for s in prob["spectral"]}):
        rows = [s for s in prob["spectral"] if s["options"] == opts and s["step"] == t]
        worst = max(rows, key=lambda s: s["rel_error"])
        lines.append(
          f"  {opts:<4} step {t:>3}: max rel err {worst['rel_error']:.2e} ({worst['layer']}, "
          f"{worst['error_bar_kind']}); all within: {all(s['within'] for s in rows)}"
        )
    lines.append("coverage of value ± 2·stderr (Hutchinson):")
    for c in prob["coverage"]:
      parts = ", ".join(
        f"{q} {c[q]['coverage_2se']:.3f}" for q in ("hess_trace", "tic_trace", "tic_diag")
      )
      lines.append(
        f"  step {c['step']:>3}, {c['probes']} probe(s), {c['draws']} draws: {parts}, "
        f"leaf traces {c['leaf_traces_coverage_2se']:.3f}; stderr median/true "
        f"{c['hess_trace']['median_stderr'] / c['hess_trace']['true_stderr']:.3f}"
      )
    refined = set(prob["max_ev_refined_steps"])
    lines.append(
      f"λ_max refined (new defaults) at {len(refined)} of {prob['trained_steps']} steps; "
      f"not at {[t for t in range(prob['trained_steps']) if t not in refined]}"
    )
    c = prob["cost"]
    lines.append(
      "cost (median ms per measured step): "
      + ", ".join(f"{n} {m:.2f}" for n, m in c["median_ms"].items())
    )
    lines.append(
      "  ratio to bare: "
      + ", ".join(f"{n} {r:.2f}x" for n, r in c["ratio_to_bare"].items())
      + "; new/old: "
      + ", ".join(f"{n} {r:.2f}x" for n, r in c["new_over_old"].items())
    )
  return "\n".join(lines)


def _cell(r: dict) -> str:
  """A reading's table cell: relative error, relative error bar, within it, noise."""
  if r["quantity"] == "alpha" and not np.isfinite(float(r["reference"])):
    return "NaN (ref. NaN)" if r.get("nan_as_specified") else f"{r['value']} (ref. NaN)"
  cell = f"{r['rel_error']:.2g}"
  if r["error_bar_kind"] in ("stderr", "residual"):  # JSON: "Infinity", "NaN" as strings
    bar = float(r["error_bar"]) * (2 if r["error_bar_kind"] == "stderr" else 1)
    cell += f" (±{bar / abs(r['reference']):.2g})"
  if r["within"] is not None:
    cell += " ✓" if r["within"] else " ✗"
  return cell + (" n" if r.get("noise") else "")


def markdown_tables(report: dict) -> str:
  """The tables ``docs/fidelity.md`` quotes, from a report."""
  steps = report["settings"]["steps"]
  out = []
  for name, prob in report["problems"].items():
    out += [
      f"**{name}** ({prob['model']}, {prob['num_params']} parameters, "
      f"`curvature='auto'` → {prob['auto_curvature']})",
      "",
    ]
    out.append("| quantity | options | " + " | ".join(f"step {t}" for t in steps) + " |")
    out.append("|---|---|" + "---|" * len(steps))
    for q in QUANTITIES:
      ref = {r["step"]: r["reference"] for r in prob["readings"] if r["quantity"] == q}
      refs = " | ".join(f"{float(ref[t]):.4g}" for t in steps)
      out.append(f"| `{q}` | reference | {refs} |")
      for opts in ("old", "new"):
        rows = {
          r["step"]: r for r in prob["readings"] if r["quantity"] == q and r["options"] == opts
        }
        out.append(f"| | {opts} | " + " | ".join(_cell(rows[t]) for t in steps) + " |")
    out.append("")
  return "\n".join(out)


def markdown_extras(report: dict) -> str:
  """Spectral norms, histograms, coverage and cost tables for ``docs/fidelity.md``."""
  steps = report["settings"]["steps"]
  out = [
    "| problem | options | " + " | ".join(f"step {t}" for t in steps) + " |",
    "|---|---|" + "---|" * len(steps),
  ]
  for name, prob in report["problems"].items():
    for opts in ("old", "new"):
      cells = []
      for t in steps:
        rows = [s for s in prob["spectral"] if s["options"] == opts and s["step"] == t]
        worst = max(rows, key=lambda s: s["rel_error"])
        ok = "✓" if all(s["within"] for s in rows) else "✗"
        cells.append(f"{worst['rel_error']:.2g} {ok}")
      out.append(f"| {name} | {opts} | " + " | ".join(cells) + " |")
  out += [
    "",
    "| problem | options | step | 1-D total | 2-D total | B·P | range | TV |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, prob in report["problems"].items():
    for h in prob["histograms"]:
      if h["step"] in (steps[0], steps[-1]):
        out.append(
          f"| {name} | {h['options']} | {h['step']} | {h['hist_total']:.0f} | "
          f"{h['hist2d_total']:.0f} | {h['expected_total']} | ±{h['hist_range'][1]:.3g} | "
          f"{h['tv_vs_exact']:.3f} |"
        )
  out += [
    "",
    "| problem | step | probes | `hess_trace` | `tic_trace` | `tic_diag` | leaf traces "
    "| median stderr / true |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, prob in report["problems"].items():
    for c in prob["coverage"]:
      ht = c["hess_trace"]
      out.append(
        f"| {name} | {c['step']} | {c['probes']} | {ht['coverage_2se']:.3f} | "
        f"{c['tic_trace']['coverage_2se']:.3f} | {c['tic_diag']['coverage_2se']:.3f} | "
        f"{c['leaf_traces_coverage_2se']:.3f} | {ht['median_stderr'] / ht['true_stderr']:.3f} |"
      )
  names = [
    "bare",
    "business_old",
    "business_new",
    "full_old",
    "full_new",
    "full_new_no_refine",
    "business_hutchinson8",
  ]
  out += [
    "",
    "| problem | " + " | ".join(names) + " | new/old business | new/old full |",
    "|---|" + "---|" * (len(names) + 2),
  ]
  for name, prob in report["problems"].items():
    c = prob["cost"]
    cells = [
      f"{c['median_ms'][n]:.3g} ms" + ("" if n == "bare" else f" ({c['ratio_to_bare'][n]:.3g}×)")
      if n in c["median_ms"]
      else "–"
      for n in names
    ]
    ratios = [f"{c['new_over_old'][p]:.3g}×" for p in ("business", "full")]
    out.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
  return "\n".join(out)


def run(checked: Sequence[int], draws: int, reps: int) -> dict:
  """The whole benchmark: fidelity, coverage and cost on both problems."""
  x, y = digits()
  report: dict[str, Any] = {
    **environment(),
    "settings": {
      "batch": BATCH,
      "learning_rate": LEARNING_RATE,
      "steps": list(checked),
      "old_options": OLD,
      "new_options": "instruments() defaults",
      "quantities": 'instruments(["tic_trace"], preset="full")',
      "spectral_new": "scope full preset's spectral metric",
      "spectral_old": "spectral_norm(method='power', iters=1), no warm-up or added iterations",
    },
    "problems": {},
  }
  for problem in make_problems(x):
    print(f"{problem.name}: {num_params(problem.params)} parameters")
    res = check_problem(problem, x, y, checked, draws)
    ib = batch_indices(len(x), 1)[0]
    t0 = time.perf_counter()
    res["cost"] = time_variants(problem, jnp.asarray(x[ib]), jnp.asarray(y[ib]), reps)
    print(f"  {problem.name}: cost in {time.perf_counter() - t0:.1f} s")
    limit = inspect.signature(instruments).parameters["exact_max_params"].default
    report["problems"][problem.name] = {
      "model": problem.description,
      "num_params": num_params(problem.params),
      "auto_curvature": "exact" if num_params(problem.params) <= limit else "hutchinson",
      **res,
    }
  return report


def main(argv: Sequence[str] | None = None) -> dict:
  """Command-line entry point; returns the report."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}).")
  ap.add_argument("--quick", action="store_true", help="smoke run: steps 0,1,3, few draws/reps.")
  ap.add_argument("--draws", type=int, default=None, help="coverage draws (default 200).")
  ap.add_argument("--reps", type=int, default=None, help="timed calls per variant (default 20).")
  ap.add_argument(
    "--markdown",
    action="store_true",
    help="print the tables of docs/fidelity.md from the JSON (--out or the default); no run.",
  )
  args = ap.parse_args(argv)
  if args.markdown:
    report = json.loads((args.out or DEFAULT_OUT).read_text())
    print(markdown_tables(report))
    print(markdown_extras(report))
    return report
  checked = (0, 1, 3) if args.quick else STEPS
  draws = args.draws or (10 if args.quick else 200)
  reps = args.reps or (3 if args.quick else 20)
  t0, load0 = time.perf_counter(), os.getloadavg()[0]
  report = run(checked, draws, reps)
  report["wall_s"] = round(time.perf_counter() - t0, 1)
  report["load_average_1min"] = {"start": load0, "end": os.getloadavg()[0]}
  print()
  print(format_table(report))
  out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
  if out is not None:
    write_json(report, out)
    print(f"\nwrote {out}")
  return report


if __name__ == "__main__":
  main()
