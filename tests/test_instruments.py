"""Cockpit's instruments in a jitted step, against references computed another way.

References: per-example gradients materialised with ``vmap(grad)`` and every statistic
re-derived from them in numpy float64; a dense ``jax.hessian`` (eigenvalues, trace and
diagonal in float64); the closed form of α on a quadratic.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxscope.metrics import Instruments, InstrumentsState, instruments

B, D, C = 12, 6, 3
LR = 0.1
#: XLA's CPU backend at LLVM -O0 for this file's programs: compiling them, not running
#: them, is what these tests cost, and -O0 halves it (the same HLO, rounding apart).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.tanh(nn.Dense(8)(x))
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(C)(x)


MODEL = MLP()


def _data(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
    jnp.asarray(rng.integers(0, C, size=B), jnp.int32),
  )


def losses_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


@functools.cache
def _params() -> dict:
  """The MLP's initial parameters (one jitted init, shared: jax arrays are immutable)."""
  x, _ = _data()
  return jax.jit(MODEL.init, compiler_options=FAST_COMPILE)(jax.random.key(0), x)["params"]


@functools.cache
def _sgd_step(inst: Instruments, lr: float) -> Any:
  """The jitted SGD step measured by ``inst`` (one per ``inst`` and ``lr``: tests that run
  the same instruments share its compilation)."""
  tx = optax.sgd(lr)

  @jax.jit(compiler_options=FAST_COMPILE)
  def step(p: dict, o: dict, s: InstrumentsState, x: jax.Array, y: jax.Array):
    probe = inst.grad(s, losses_fn, p, x, y)
    upd, o = tx.update(probe.grads, o, p)
    vals, s = inst.update(s, probe, upd, learning_rate=lr)
    return optax.apply_updates(p, upd), o, s, vals

  return step


@functools.cache
def _full_every_2() -> Instruments:
  """``instruments(preset="full", every=2)``, one object: the tests that run it share its
  compiled step (the full preset's is the costliest of this file)."""
  return instruments(preset="full", every=2)


def _run(inst: Instruments, steps: int, params: dict, batches: list, lr: float = LR):
  """Trains with SGD, returning the values and the parameters before each step."""
  tx = optax.sgd(lr)
  step = _sgd_step(inst, lr)
  state, opt = inst.init(params), tx.init(params)
  out, before = [], []
  for i in range(steps):
    x, y = batches[i % len(batches)]
    before.append(params)
    params, opt, state, vals = step(params, opt, state, x, y)
    out.append(jax.tree.map(np.asarray, vals))
  return out, before, state


@jax.jit(compiler_options=FAST_COMPILE)
def _per_example_tree(params: dict, x: jax.Array, y: jax.Array) -> dict:
  one = jax.grad(lambda p, xi, yi: losses_fn(p, xi[None], yi[None])[0])
  return jax.vmap(one, in_axes=(None, 0, 0))(params, x, y)


#: ``losses_fn`` as one program (the references below call it; op by op, each primitive
#: would be compiled on its own).
_losses = jax.jit(losses_fn, compiler_options=FAST_COMPILE)


def _per_example(params: dict, x: jax.Array, y: jax.Array) -> np.ndarray:
  """Per-example gradients ``[n, P]`` in float64 (``vmap(grad)``, materialised)."""
  per = _per_example_tree(params, x, y)
  return np.concatenate(
    [np.asarray(a, np.float64).reshape(x.shape[0], -1) for a in jax.tree.leaves(per)], axis=1
  )


def _flat(tree: dict) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], np.float64)


@pytest.fixture(scope="module")
def economy_run() -> dict:
  params = _params()
  batches = [_data(0), _data(1), _data(2)]
  inst = instruments(
    ["mean_gsnr", "cabs", "early_stopping", "grad_variance", "per_example_norms"],
    preset="economy",
  )
  vals, before, _ = _run(inst, 3, params, batches)
  return {"vals": vals, "before": before, "batches": batches}


@pytest.mark.slow
@pytest.mark.parametrize("step", [0, 2])
def test_noise_statistics_match_materialised_gradients(economy_run: dict, step: int) -> None:
  v = economy_run["vals"][step]
  p = economy_run["before"][step]
  x, y = economy_run["batches"][step]
  gi = _per_example(p, x, y)
  g = gi.mean(0)
  gsq = np.sum(g**2)
  n = B
  np.testing.assert_allclose(v["loss"], np.mean(np.asarray(_losses(p, x, y))), rtol=1e-6)
  np.testing.assert_allclose(
    v["norm_test"], np.sqrt(np.sum((gi - g) ** 2) / (n - 1) / (n * gsq)), rtol=1e-4
  )
  proj = gi @ g
  np.testing.assert_allclose(
    v["inner_test"], np.sqrt(np.var(proj, ddof=1) / (n * gsq**2)), rtol=1e-4
  )
  orth = np.sum((gi - np.outer(proj / gsq, g)) ** 2) / (n - 1)
  np.testing.assert_allclose(v["ortho_test"], np.sqrt(orth / (n * gsq)), rtol=1e-4)
  var = gi.var(0)
  np.testing.assert_allclose(v["mean_gsnr"], np.mean(g**2 / (var + 1e-5)), rtol=1e-3)
  loss = float(v["loss"])
  np.testing.assert_allclose(v["cabs"], LR * var.sum() / loss, rtol=1e-4)
  np.testing.assert_allclose(
    v["early_stopping"], 1 - n * np.mean(g**2 / (gi.var(0, ddof=1) + 1e-5)), rtol=1e-3
  )
  norms = np.sqrt((gi**2).sum(1))
  np.testing.assert_allclose(v["per_example_grads/norm_mean"], norms.mean(), rtol=1e-5)
  np.testing.assert_allclose(v["per_example_grads/norm_max"], norms.max(), rtol=1e-5)
  # Per-leaf values: leaf order of the flattened params.
  names = [
    "/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(p)[0]
  ]
  sizes = [a.size for a in jax.tree.leaves(p)]
  offsets = np.cumsum([0, *sizes])
  for name, lo, hi in zip(names, offsets[:-1], offsets[1:], strict=True):
    np.testing.assert_allclose(v[f"cockpit/grad_norm/{name}"], np.linalg.norm(g[lo:hi]), rtol=1e-5)
    np.testing.assert_allclose(
      v[f"per_example_grads/variance/{name}"], var[lo:hi].mean(), rtol=1e-3, atol=1e-9
    )
    upd = v[f"cockpit/update_size/{name}"]
    np.testing.assert_allclose(upd, LR * np.linalg.norm(g[lo:hi]), rtol=1e-5)
    dist = np.linalg.norm(_flat(p)[lo:hi] - _flat(economy_run["before"][0])[lo:hi])
    np.testing.assert_allclose(v[f"cockpit/distance/{name}"], dist, rtol=1e-4, atol=1e-7)
  # The histogram estimates all B·P per-example entries.
  counts = v["per_example_grads/hist_counts"]
  assert counts.shape == (100,)
  np.testing.assert_allclose(counts.sum(), gi.size, rtol=1e-5)
  assert bool(v["measured"])


@pytest.mark.slow
def test_histogram_is_exact_when_every_coordinate_is_sampled() -> None:
  params = _params()
  x, y = _data()
  size = sum(a.size for a in jax.tree.leaves(params))
  inst = instruments(["grad_hist_1d", "grad_hist_2d"], hist_sample=10 * size)
  vals, _, _ = _run(inst, 1, params, [(x, y)])
  v = vals[0]
  gi = _per_example(params, x, y)
  edges = v["per_example_grads/hist_edges"]
  ref, _ = np.histogram(gi, bins=edges.astype(np.float64))
  # Integer counts: exact, summing to B·P (issue 18; float32 fractional weights did not).
  np.testing.assert_array_equal(v["per_example_grads/hist_counts"], ref)
  assert float(np.sum(v["per_example_grads/hist_counts"], dtype=np.float64)) == gi.size
  assert float(v["per_example_grads/hist_nonfinite"]) == 0.0
  # The range of the first measured step: ±1.2·max|g| (nothing clamped).
  np.testing.assert_allclose(edges[[0, -1]], [-1.2 * np.abs(gi).max(), 1.2 * np.abs(gi).max()])
  pv = np.broadcast_to(_flat(params)[None], gi.shape)
  ref2, _, _ = np.histogram2d(  # Cockpit's axis order: gradient, then parameter.
    gi.ravel(),
    pv.ravel(),
    bins=(v["per_example_grads/hist2d_grad_edges"], v["per_example_grads/hist2d_param_edges"]),
  )
  np.testing.assert_array_equal(v["per_example_grads/hist2d_counts_grad_param"], ref2)


@pytest.mark.slow
def test_alpha_closed_form_on_a_quadratic() -> None:
  # ℓᵢ(θ) = ½θᵀAθ + bᵀθ for every example: no noise, the quadratic fit is exact and
  # α = η·gᵀAg/gᵀg − 1 for the SGD step θ₁ = θ₀ − ηg (t/s* − 1 with s* the line minimum).
  rng = np.random.default_rng(0)
  q = rng.normal(size=(5, 5))
  a = q @ q.T + np.eye(5)
  bvec = rng.normal(size=5)
  theta0 = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}

  def quad(p: dict, x: jax.Array) -> jax.Array:
    w = p["w"]
    val = 0.5 * w @ jnp.asarray(a, jnp.float32) @ w + jnp.asarray(bvec, jnp.float32) @ w
    return val + 0.0 * x[:, 0]

  x = jnp.zeros((8, 1))
  g = a @ np.asarray(theta0["w"], np.float64) + bvec
  inst = instruments(["alpha"])

  @jax.jit(compiler_options=FAST_COMPILE)  # the learning rate traced: one program for all
  def step(p: dict, o: Any, s: InstrumentsState, lr: jax.Array):
    tx = optax.sgd(lr)
    probe = inst.grad(s, quad, p, x)
    upd, o = tx.update(probe.grads, o, p)
    vals, s = inst.update(s, probe, upd)
    return optax.apply_updates(p, upd), o, s, vals

  for lr in (0.02, 1.0 / (g @ a @ g / (g @ g)), 0.3):
    p, o, s = theta0, optax.sgd(lr).init(theta0), inst.init(theta0)
    p, o, s, v0 = step(p, o, s, jnp.float32(lr))
    p, o, s, v1 = step(p, o, s, jnp.float32(lr))
    expected = lr * (g @ a @ g) / (g @ g) - 1
    assert np.isnan(float(v0["alpha"]))  # no previous update yet: NaN, never 0 (issue 18)
    np.testing.assert_allclose(float(v1["alpha"]), expected, atol=2e-3)


@pytest.mark.slow
def test_alpha_concave_is_minus_one() -> None:
  theta0 = {"w": jnp.asarray([1.0, -2.0])}

  def concave(p: dict, x: jax.Array) -> jax.Array:
    return -0.5 * jnp.sum(p["w"] ** 2) + 0.0 * x[:, 0]

  inst = instruments(["alpha"])
  tx = optax.sgd(0.1)
  x = jnp.zeros((4, 1))

  @jax.jit(compiler_options=FAST_COMPILE)  # one program, not every primitive on its own
  def step(p: dict, o: Any, s: InstrumentsState) -> tuple:
    probe = inst.grad(s, concave, p, x)
    upd, o = tx.update(probe.grads, o, p)
    v, s = inst.update(s, probe, upd)
    return optax.apply_updates(p, upd), o, s, v

  p, o, s = theta0, tx.init(theta0), inst.init(theta0)
  for _ in range(2):
    p, o, s, v = step(p, o, s)
  assert float(v["alpha"]) == -1.0


@pytest.fixture(scope="module")
def dense_hessian() -> dict:
  params = _params()
  x, y = _data()
  flat, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda f: jnp.mean(losses_fn(unravel(f), x, y)))
  h = jax.jit(hessian, compiler_options=FAST_COMPILE)(flat)
  h = np.asarray(h, np.float64)
  h = 0.5 * (h + h.T)
  return {"params": params, "x": x, "y": y, "h": h, "eig": np.linalg.eigvalsh(h)}


@pytest.mark.slow
def test_curvature_matches_dense_hessian(dense_hessian: dict) -> None:
  params, x, y, h, eig = (dense_hessian[k] for k in ("params", "x", "y", "h", "eig"))
  inst = instruments(
    ["hess_max_ev", "hess_trace", "tic_trace"], hutchinson_probes=4, curvature="hutchinson"
  )
  vals, _, _ = _run(inst, 60, params, [(x, y)], lr=0.0)  # θ fixed: H is the same each step
  top = eig[np.argmax(np.abs(eig))]
  # Warm-started power iteration, one HVP per step: within 5 % after warm-up.
  assert abs(float(vals[-1]["hess_max_ev"]) - top) / abs(top) < 0.05
  # Hutchinson: the mean over 60 steps × 4 probes is within 4 standard errors of tr(H).
  traces = np.array([float(v["hess_trace"]) for v in vals])
  sd = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / 4)
  assert abs(traces.mean() - np.trace(h)) < 4 * sd / np.sqrt(len(traces))
  gi = _per_example(params, x, y)
  m = (gi**2).mean(0)
  # TICTrace = Σ M / tr(H) with this step's trace estimate (the ratio of a noisy estimate
  # is not unbiased, so compare step by step).
  for v in vals[:5]:
    np.testing.assert_allclose(
      float(v["tic_trace"]), m.sum() / (float(v["hess_trace"]) + 1e-7), rtol=1e-4
    )


@pytest.mark.slow
def test_tic_diag_with_exact_curvature(dense_hessian: dict) -> None:
  params, x, y, h = (dense_hessian[k] for k in ("params", "x", "y", "h"))
  inst = instruments(["tic_diag"], tic_curvature="exact")
  vals, _, _ = _run(inst, 1, params, [(x, y)], lr=0.0)
  gi = _per_example(params, x, y)
  m = (gi**2).mean(0)
  np.testing.assert_allclose(float(vals[0]["tic_diag"]), np.sum(m / (np.diag(h) + 1e-7)), rtol=1e-3)


@pytest.mark.slow
def test_every_n_and_scan_match_the_loop() -> None:
  params = _params()
  batches = [_data(i) for i in range(7)]
  every1, _, _ = _run(instruments(preset="economy"), 7, params, batches)
  every3, _, _ = _run(instruments(preset="economy", every=3), 7, params, batches)
  assert [bool(v["measured"]) for v in every3] == [i % 3 == 0 for i in range(7)]
  for i in (0, 3, 6):  # measured steps agree with measuring every step
    for k in ("loss", "norm_test", "inner_test", "ortho_test"):
      np.testing.assert_allclose(every3[i][k], every1[i][k], rtol=1e-5)
  for i in (1, 2):  # unmeasured steps repeat the last measured values ...
    np.testing.assert_allclose(every3[i]["norm_test"], every3[0]["norm_test"])
  # ... except α, whose end point is the step after a measured one.
  np.testing.assert_allclose(every3[1]["alpha"], every1[1]["alpha"], rtol=1e-4)
  np.testing.assert_allclose(every3[4]["alpha"], every1[4]["alpha"], rtol=1e-4)
  np.testing.assert_allclose(every3[5]["alpha"], every3[4]["alpha"])

  inst = _full_every_2()
  tx = optax.sgd(LR)
  xs = jnp.stack([b[0] for b in batches])
  ys = jnp.stack([b[1] for b in batches])

  def body(carry: tuple, batch: tuple) -> tuple:
    p, o, s = carry
    probe = inst.grad(s, losses_fn, p, *batch)
    upd, o = tx.update(probe.grads, o, p)
    vals, s = inst.update(s, probe, upd)
    return (optax.apply_updates(p, upd), o, s), vals

  init = (params, tx.init(params), inst.init(params))
  scan = jax.jit(lambda c: jax.lax.scan(body, c, (xs, ys)), compiler_options=FAST_COMPILE)
  _, scanned = scan(init)
  looped, _, _ = _run(inst, 7, params, batches)
  for k in ("loss", "alpha", "hess_max_ev", "norm_test"):
    np.testing.assert_allclose(scanned[k], np.stack([v[k] for v in looped]), rtol=1e-5)


@pytest.mark.slow
def test_values_keep_their_structure_and_dtypes() -> None:
  params = _params()
  inst = _full_every_2()  # steps 0 and 2 measured, 1 not
  state = inst.init(params)
  vals, _, new_state = _run(inst, 3, params, [_data()])
  assert jax.tree.structure(state) == jax.tree.structure(new_state)
  for k, v in state.values.items():
    assert vals[-1][k].shape == v.shape and vals[-1][k].dtype == v.dtype, k
  assert set(vals[-1]) == {*state.values, "measured"}


@pytest.mark.slow
def test_probe_captures_layers_for_a_scope() -> None:
  params = _params()
  x, y = _data()
  inst = instruments(["loss"])

  @jax.jit(compiler_options=FAST_COMPILE)  # one program, not every primitive on its own
  def probed(s: InstrumentsState, p: dict) -> tuple:
    probe = inst.grad(s, losses_fn, p, x, y)
    return probe.captured, probe.grads

  captured, grads = probed(inst.init(params), params)
  assert sorted(captured.outputs) == ["Dense_0", "Dense_1", "Dense_2"]
  assert captured.grads["Dense_2"].shape == (B, C)
  grad = jax.grad(lambda p: jnp.mean(losses_fn(p, x, y)))
  g = jax.jit(grad, compiler_options=FAST_COMPILE)(params)
  np.testing.assert_allclose(_flat(grads), _flat(g), rtol=1e-6)


@pytest.mark.slow
def test_nan_in_the_batch_is_measured_not_raised() -> None:
  params = _params()
  x, y = _data()
  x = x.at[0, 0].set(jnp.nan)
  vals, _, _ = _run(_full_every_2(), 3, params, [(x, y)])  # step 2 is measured
  assert np.isnan(vals[-1]["loss"])
  assert bool(vals[-1]["measured"])


@pytest.mark.slow
def test_bad_input() -> None:
  with pytest.raises(ValueError, match="unknown quantit"):
    instruments(["gradnorm"])
  with pytest.raises(ValueError, match="unknown preset"):
    instruments(preset="first_class")
  with pytest.raises(ValueError, match="no quantity"):
    instruments()
  with pytest.raises(ValueError, match="every"):
    instruments(["loss"], every=0)
  params = _params()
  x, y = _data()
  inst = instruments(["loss"])
  # The checks are Python's, at trace time: jax.eval_shape runs them without computing.
  with pytest.raises(ValueError, match=r"individual losses, shape \[B\]"):
    jax.eval_shape(
      lambda p: inst.grad(inst.init(p), lambda q, a, b: jnp.mean(losses_fn(q, a, b)), p, x, y),
      params,
    )
  cabs = instruments(["cabs"])

  def no_learning_rate(p: dict) -> Any:
    s = cabs.init(p)
    probe = cabs.grad(s, losses_fn, p, x, y)
    assert probe.grads is not None  # the probe itself is fine
    with pytest.raises(ValueError, match="learning_rate"):
      cabs.update(s, probe, probe.grads)

  jax.eval_shape(no_learning_rate, params)
  with pytest.raises(TypeError, match="InstrumentsState"):
    inst.grad({}, losses_fn, params, x, y)


_EIGHT = textwrap.dedent(
  """
  import os
  # Eight devices, and XLA's CPU backend at -O0 for every program (FAST_COMPILE's flag; the
  # initial states' and the batches' too, not just the steps').
  os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
  )
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  sys_path = {root!r}
  import sys; sys.path.insert(0, sys_path)
  from tests.test_instruments import FAST_COMPILE, _params, _data, losses_fn, LR
  from jaxscope.metrics import instruments
  assert jax.device_count() == 8
  inst = instruments(preset="full")
  tx = optax.sgd(LR)

  def step(p, o, s, x, y):
    probe = inst.grad(s, losses_fn, p, x, y)
    upd, o = tx.update(probe.grads, o, p)
    vals, s = inst.update(s, probe, upd)
    return optax.apply_updates(p, upd), o, s, vals

  # One jitted step for both runs (traced once: the layouts share its jaxpr, each compiled),
  # and the initial states as one program, computed once (both runs start from them).
  fn = jax.jit(step, compiler_options=FAST_COMPILE)
  states = jax.jit(lambda p: (tx.init(p), inst.init(p)), compiler_options=FAST_COMPILE)
  o0, s0 = states(_params())

  def run(shard):
    params = _params()
    batches = [_data(0), _data(1), _data(2)]
    # batch 12 does not split over 8 devices: use 16 examples (numpy's, no compilation)
    batches = [(np.concatenate([x, x[:4]]), np.concatenate([y, y[:4]])) for x, y in batches]
    if shard:
      mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      dsh = NamedSharding(mesh, P("data"))
      batches = [(jax.device_put(x, dsh), jax.device_put(y, dsh)) for x, y in batches]
    p, o, s = params, o0, s0
    if shard:  # replicated from the start, as every step returns them: one program, not two
      p, o, s = jax.device_put((p, o, s), NamedSharding(mesh, P()))
    for x, y in batches:
      p, o, s, v = fn(p, o, s, x, y)
    return v
  one, eight = run(False), run(True)
  worst = 0.0
  for k in one:
    a, b = np.asarray(one[k], np.float64), np.asarray(eight[k], np.float64)
    err = np.max(np.abs(a - b) / (np.abs(a) + 1e-6)) if a.size else 0.0
    worst = max(worst, float(err))
    # rtol 1e-6; α (a ratio of differences) and the TIC (a sum of M/c over tiny diagonal
    # estimates) amplify the reduction-order rounding of 8 shards (measured 3e-6, 1.2e-5).
    rtol = {{"alpha": 2e-5, "tic_diag": 5e-5}}.get(k, 1e-6)
    np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-7, err_msg=k)
  print("worst", worst)
  """
)


@pytest.mark.slow
def test_eight_cpu_devices_match_one() -> None:
  root = str(Path(__file__).resolve().parents[1])
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-c", _EIGHT.format(root=root)],
    capture_output=True,
    text=True,
    env=env,
    cwd=root,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "worst" in out.stdout


def _switching(first: optax.GradientTransformation, then: optax.GradientTransformation) -> Any:
  """``first``'s update at the first step, ``then``'s after (an optimizer that leaves the
  span of the gradient and the last update mid-run)."""

  def init(params: Any) -> Any:
    return jnp.zeros((), jnp.int32), first.init(params), then.init(params)

  def update(grads: Any, state: Any, params: Any = None) -> Any:
    count, s1, s2 = state
    u1, s1 = first.update(grads, s1, params)
    u2, s2 = then.update(grads, s2, params)
    upd = jax.tree.map(lambda a, b: jnp.where(count == 0, a, b), u1, u2)
    return upd, (count + 1, s1, s2)

  return optax.GradientTransformation(init, update)


_OPTIMIZERS = {
  "sgd": optax.sgd(0.3),
  "momentum": optax.sgd(0.2, momentum=0.9),
  "adam": optax.adam(0.01),
  "sgd_then_adam": _switching(optax.sgd(0.3), optax.adam(0.01)),
}


@pytest.mark.parametrize(
  "capture,declared",
  [(None, False), (False, False), (None, True)],
  ids=["dense", "forward_mode", "declared"],
)
@pytest.mark.parametrize("opt", list(_OPTIMIZERS.values()), ids=list(_OPTIMIZERS))
@pytest.mark.slow
def test_alpha_and_inner_test_for_any_optimizer(
  opt: optax.GradientTransformation, capture: bool | None, declared: bool
) -> None:
  # Captured Dense layers project every direction directly. In forward mode (no capture)
  # SGD and momentum updates lie in span{g, d_prev} (their projections are combined from
  # those); Adam's do not (projected directly). All must equal the definition. Declared
  # in the span (updates_in_span), the first update is projected and checked: SGD's and
  # momentum's pass, and the later ones are combined; Adam's never pass (all projected).
  # An optimizer leaving the span mid-run fails the guard once combined: that α is
  # missing, never wrong, and every later update is projected.
  from jaxscope.metrics import curvature
  from jaxscope.metrics.instruments import update

  params = _params()
  batches = [_data(i) for i in range(3)]
  inst = instruments(["alpha", "inner_test"], capture_layers=capture, updates_in_span=declared)
  routes: list[str] = []
  checked, guarded = update._project_with_span, update._project_declared_span

  def spy_checked(probe: Any, tangents: list[Any]) -> jax.Array:
    routes.append("checked")
    return checked(probe, tangents)

  def spy_guarded(probe: Any, tangents: list[Any], mode: jax.Array) -> Any:
    routes.append("declared")
    return guarded(probe, tangents, mode)

  @jax.jit(compiler_options=FAST_COMPILE)
  def step(p: dict, o: Any, s: InstrumentsState, x: jax.Array, y: jax.Array):
    probe = inst.grad(s, losses_fn, p, x, y)
    upd, o = opt.update(probe.grads, o, p)
    vals, s = inst.update(s, probe, upd)
    return optax.apply_updates(p, upd), o, s, vals

  p, o, s = params, opt.init(params), inst.init(params)
  thetas, vals, modes = [p], [], []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(update, "_project_with_span", spy_checked)
    mp.setattr(update, "_project_declared_span", spy_guarded)
    for x, y in batches:
      p, o, s, v = step(p, o, s, x, y)
      thetas.append(p)
      vals.append(v)
      modes.append(float(s.alpha_start[6]))
  expected_route = "declared" if declared else "checked" if capture is False else None
  assert set(routes) == ({expected_route} if expected_route else set())
  name = next(k for k, v in _OPTIMIZERS.items() if v is opt)
  U, V, F = update.SPAN_UNTESTED, update.SPAN_VERIFIED, update.SPAN_FAILED
  if declared:
    expected_modes = {"adam": [U, U, U], "sgd_then_adam": [V, F, F]}.get(name, [V, V, V])
    assert modes == expected_modes
  else:
    assert modes == [U, U, U]  # Off the declared route: never changed.
  for t in (1, 2):  # α of the update made at step t − 1, reported at step t
    if declared and name == "sgd_then_adam" and t == 2:
      # Combined from the span at step 1, the update failed the guard: no new α (the last
      # one is kept, as at a step that does not follow a start point), not a wrong one.
      assert float(vals[t]["alpha"]) == float(vals[t - 1]["alpha"])
      continue
    d = _flat(thetas[t]) - _flat(thetas[t - 1])
    tlen = np.linalg.norm(d)
    g0 = _per_example(thetas[t - 1], *batches[t - 1]) @ d / tlen
    g1 = _per_example(thetas[t], *batches[t]) @ d / tlen
    l0 = np.asarray(_losses(thetas[t - 1], *batches[t - 1]), np.float64)
    l1 = np.asarray(_losses(thetas[t], *batches[t]), np.float64)
    expected = curvature.alpha(
      tlen, l0.mean(), l1.mean(), g0.mean(), g1.mean(),
      l0.var(ddof=1), l1.var(ddof=1), g0.var(ddof=1), g1.var(ddof=1),
    )  # fmt: skip
    np.testing.assert_allclose(float(vals[t]["alpha"]), float(expected), rtol=2e-3, atol=2e-4)
    gi = _per_example(thetas[t], *batches[t])
    g = gi.mean(0)
    ref = np.sqrt(np.var(gi @ g, ddof=1) / (B * np.sum(g**2) ** 2))
    np.testing.assert_allclose(float(vals[t]["inner_test"]), ref, rtol=1e-4)


@pytest.mark.slow
def test_hvp_chunk_gives_the_products_of_one_batched_pass() -> None:
  """``hvp_chunk`` bounds memory (linearise once, tangents ``c`` at a time) without changing
  what is measured: the 8 Hutchinson probes and the power vector through one batched pass
  (``None``) or one, three or four at a time (the last turn then takes the one left) agree
  to float32 rounding, step after step."""
  qs = ("hess_trace", "tic_diag", "hess_max_ev")
  batches = [_data(0), _data(1)]
  runs = {
    c: _run(instruments(qs, curvature="hutchinson", hvp_chunk=c), 2, _params(), batches)[0]
    for c in (None, 1, 3, 4)
  }
  keys = [k for k in runs[None][0] if k.startswith(("hess", "tic", "hessian"))]
  assert {"hess_trace", "tic_diag", "hess_max_ev"} <= set(keys)
  for c in (1, 3, 4):
    for step in range(2):
      for k in keys:
        np.testing.assert_allclose(
          runs[c][step][k], runs[None][step][k], rtol=2e-4, atol=1e-6, err_msg=f"{c} {k}"
        )


def test_hvp_turns_are_straight_line_code() -> None:
  # The turns were a lax.map loop, which XLA:CPU ran 14x slower on a conv net; they are
  # unrolled now, one after the other (the default, hvp_chunk=1). Loops remain (threefry's
  # and the one-trip loops that add each turn's sums on the CPU), but no product is in one.
  inst = instruments(["hess_trace"], curvature="hutchinson")
  params = _params()
  x, y = _data(0)
  state = inst.init(params)
  jaxpr = jax.make_jaxpr(lambda s, p: inst.grad(s, losses_fn, p, x, y).values)(state, params)

  def products(jx: Any, in_loop: bool) -> tuple[int, int]:
    """(products outside loops, products inside loops) in ``jx`` and its sub-jaxprs."""
    outside = inside = 0
    for eqn in jx.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        inside, outside = (inside + 1, outside) if in_loop else (inside, outside + 1)
      loop = in_loop or eqn.primitive.name in ("while", "scan")
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        o, i = products(sub, loop)
        outside, inside = outside + o, inside + i
    return outside, inside

  outside, inside = products(jaxpr.jaxpr, False)
  assert outside >= 8 and inside == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_hvp_chunk_must_be_a_positive_int(bad: Any) -> None:
  with pytest.raises(ValueError, match="hvp_chunk"):
    instruments(["hess_trace"], hvp_chunk=bad)


def test_projections_on_wide_layers_match_forward_mode() -> None:
  """Wide Dense layers and a small batch: the projections on the gradient go through Gram
  matrices, those on the last update through the captured layers; both must equal the
  forward-mode projections of ``capture_layers=False`` (issue 22)."""

  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
      return nn.Dense(C)(nn.relu(nn.Dense(48)(x)))

  model = Wide()
  rng = np.random.default_rng(3)
  batches = [(jnp.asarray(rng.normal(size=(4, 40)), jnp.float32),
              jnp.asarray(rng.integers(0, C, size=4), jnp.int32)) for _ in range(3)]  # fmt: skip
  params = model.init(jax.random.key(1), batches[0][0])["params"]

  def wide_losses(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)

  out = {}
  for capture in (True, False):
    inst = instruments(["alpha", "inner_test", "ortho_test"], capture_layers=capture)
    tx = optax.sgd(0.2, momentum=0.9)

    @jax.jit
    def step(p: dict, o: Any, s: InstrumentsState, x: jax.Array, y: jax.Array, inst=inst, tx=tx):
      probe = inst.grad(s, wide_losses, p, x, y)
      upd, o = tx.update(probe.grads, o, p)
      vals, s = inst.update(s, probe, upd)
      return optax.apply_updates(p, upd), o, s, vals

    p, o, s = params, tx.init(params), inst.init(params)
    vals = []
    for x, y in batches:
      p, o, s, v = step(p, o, s, x, y)
      vals.append({k: float(v[k]) for k in ("alpha", "inner_test", "ortho_test")})
    out[capture] = vals
  for t in range(3):
    for k in ("inner_test", "ortho_test", "alpha"):
      if t == 0 and k == "alpha":
        continue  # no update before step 0: NaN on both routes
      np.testing.assert_allclose(out[True][t][k], out[False][t][k], rtol=1e-4, atol=1e-6)


def test_span_fit_accepts_only_updates_in_the_span_everywhere() -> None:
  # The update's coefficients are fitted on a strided sample of each leaf; the residual
  # over every coordinate decides. SGD/momentum-like updates pass, an Adam-like one and
  # one that agrees with the span on the sample only do not.
  from jaxscope.metrics.instruments.update import SPAN_SAMPLE, span_fit

  rng = np.random.default_rng(5)
  shapes = {"a": (300, 50), "b": (7,)}  # 15000 > SPAN_SAMPLE coordinates: a sample.
  assert 300 * 50 > SPAN_SAMPLE
  g = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  p = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  fit = jax.jit(span_fit)
  momentum = jax.tree.map(lambda x, y: -0.3 * x + 0.9 * y, g, p)
  coef, ok = fit([g, p], momentum)
  assert bool(ok)
  np.testing.assert_allclose(coef, [-0.3, 0.9], rtol=1e-5)
  coef, ok = fit([g, jax.tree.map(jnp.zeros_like, p)], jax.tree.map(lambda x: -0.1 * x, g))
  assert bool(ok) and abs(float(coef[0]) + 0.1) < 1e-6  # First step: no previous update.
  adam = jax.tree.map(lambda x: x / (jnp.abs(x) + 1e-3), g)
  assert not bool(fit([g, p], adam)[1])
  off_sample = dict(momentum)
  off_sample["a"] = momentum["a"].at[1, 1].add(1e-2)  # Row 1 is not in the strided sample.
  assert not bool(fit([g, p], off_sample)[1])
  # The guard of the declared route (everywhere=False) sees the sample only: it refuses
  # Adam's update and accepts momentum's, and cannot see the off-sample change.
  guard = jax.jit(functools.partial(span_fit, everywhere=False))
  assert bool(guard([g, p], momentum)[1]) and not bool(guard([g, p], adam)[1])
  assert bool(guard([g, p], off_sample)[1])


def test_declared_span_is_used_with_every_1_only():
  # With every=2 the measured steps are not consecutive, so the last update is not a
  # direction of this one: the declaration changes nothing (mode untested, same values).
  from jaxscope.metrics.instruments import update

  batches = [_data(i) for i in range(2)]
  runs = {
    d: _run(instruments(["alpha", "inner_test"], every=2, updates_in_span=d), 4, _params(), batches)
    for d in (False, True)
  }
  assert float(runs[True][2].alpha_start[6]) == update.SPAN_UNTESTED
  for a, b in zip(runs[False][0], runs[True][0], strict=True):
    for k in ("alpha", "inner_test"):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
