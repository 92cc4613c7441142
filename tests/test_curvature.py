"""Tests of the HVP-based curvature metrics against dense float64 numpy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxscope.metrics import lanczos
from jaxscope.metrics.curvature import (
  MaxEigState,
  alpha,
  batched_hvp,
  exact_hessian_diagonal,
  hutchinson,
  hvp_fn,
  leaf_traces,
  max_eigenvalue,
  max_eigenvalue_init,
  max_eigenvalue_update,
  rademacher,
  tic,
  tic_trace,
)

# --------------------------------------------------------------------------- problem

D_IN, D_HID, D_OUT, N = 4, 7, 2, 16  # 4·7 + 7 + 7·2 + 2 = 51 parameters


def _params(dtype=jnp.float32):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  return {
    "Dense_0": {
      "kernel": jax.random.normal(k1, (D_IN, D_HID), dtype) * 0.8,
      "bias": jax.random.normal(k2, (D_HID,), dtype) * 0.1,
    },
    "Dense_1": {
      "kernel": jax.random.normal(k3, (D_HID, D_OUT), dtype) * 0.8,
      "bias": jax.random.normal(k4, (D_OUT,), dtype) * 0.1,
    },
  }


def _data(dtype=jnp.float32):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(N, D_IN))
  y = np.stack([np.sin(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 3]], axis=1)
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def _per_example_loss(params, x, y):
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  return 0.5 * jnp.sum((out - y) ** 2, axis=-1)


def _loss(params, x, y):
  return jnp.mean(_per_example_loss(params, x, y))


@functools.cache
def _dense():
  """Dense Hessian (float64, flattened in ravel_pytree order) and its eigenvalues."""
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), _params())
    x64, y64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in _data())
    flat, unravel = ravel_pytree(p64)
    h = np.asarray(jax.jit(jax.hessian(lambda f: _loss(unravel(f), x64, y64)))(flat))
  h = 0.5 * (h + h.T)
  return h, np.linalg.eigvalsh(h)


def _hvp():
  x, y = _data()
  _, _, hvp = hvp_fn(_loss, _params(), x, y)
  return hvp


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _top(evals):
  return evals[np.argmax(np.abs(evals))]


# --------------------------------------------------------------------------- HVPs


@pytest.mark.slow
def test_hvp_matches_dense():
  h, _ = _dense()
  x, y = _data()
  params = _params()
  unravel = ravel_pytree(params)[1]
  vs = np.random.default_rng(2).normal(size=(5, h.shape[0]))
  stacked = jax.vmap(unravel)(jnp.asarray(vs, jnp.float32))

  @jax.jit
  def run(stacked):
    value, grads, hvp = hvp_fn(_loss, params, x, y)
    looped = [hvp(jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(len(vs))]
    return value, grads, batched_hvp(hvp, stacked), looped

  value, grads, batched, looped = run(stacked)
  np.testing.assert_allclose(float(value), float(_loss(params, x, y)), rtol=1e-6)
  np.testing.assert_allclose(
    _flat(grads), _flat(jax.grad(_loss)(params, x, y)), rtol=1e-5, atol=1e-7
  )
  scale = np.abs(h).max()
  for i in range(len(vs)):
    hv = _flat(looped[i])
    np.testing.assert_allclose(hv, h @ vs[i], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(
      _flat(jax.tree.map(lambda a, i=i: a[i], batched)), hv, rtol=1e-5, atol=1e-6 * scale
    )


# --------------------------------------------------------------------------- top eigenvalue


@pytest.mark.slow
@pytest.mark.parametrize(("method", "iters", "rtol"), [("power", 300, 1e-3), ("lanczos", 20, 1e-4)])
def test_max_eigenvalue_one_shot(method, iters, rtol):
  h, evals = _dense()
  top = _top(evals)
  fn = jax.jit(lambda key: max_eigenvalue(_hvp(), _params(), key, iters=iters, method=method))
  value, vector = fn(jax.random.PRNGKey(3))
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), top, rtol=rtol)
  v = _flat(vector)
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-5)
  # Eigenvector: residual ‖Hv − λv‖ small relative to ‖H‖.
  assert np.linalg.norm(h @ v - top * v) < 0.05 * abs(top)


@pytest.mark.slow
def test_lanczos_more_iterations_than_parameters():
  _, evals = _dense()
  value, _ = jax.jit(lambda k: max_eigenvalue(_hvp(), _params(), k, iters=60))(
    jax.random.PRNGKey(4)
  )
  np.testing.assert_allclose(float(value), _top(evals), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "steps", "rtol"), [("power", 300, 1e-3), ("lanczos", 6, 1e-4)])
def test_warm_start_through_scan(method, steps, rtol):
  _, evals = _dense()
  iters = 1 if method == "power" else 5

  def run(key):
    hvp = _hvp()

    def step(state, _):
      state = max_eigenvalue_update(hvp, state, iters=iters, method=method)
      return state, state.value

    return jax.lax.scan(step, max_eigenvalue_init(_params(), key), None, length=steps)

  state, values = jax.jit(run)(jax.random.PRNGKey(5))
  assert isinstance(state, MaxEigState)
  assert int(state.count) == steps
  top = _top(evals)
  np.testing.assert_allclose(float(state.value), top, rtol=rtol)
  err = np.abs(np.asarray(values) - top)
  assert err[-1] < err[0]  # It converged across steps, from a poor first estimate.


@pytest.mark.slow
def test_warm_start_tracks_drifting_hessian():
  """Power iteration with 2 HVPs per step follows the Hessian along an SGD trajectory."""
  x, y = _data()

  def run(params, key):
    def step(carry, _):
      p, state = carry
      _, g, hvp = hvp_fn(_loss, p, x, y)
      state = max_eigenvalue_update(hvp, state, iters=2)
      p = jax.tree.map(lambda a, b: a - 0.02 * b, p, g)
      return (p, state), None

    (p, state), _ = jax.lax.scan(step, (params, max_eigenvalue_init(params, key)), None, 150)
    return p, state

  p, state = jax.jit(run)(_params(), jax.random.PRNGKey(6))
  with jax.enable_x64(True):
    flat, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p))
    x64, y64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, y))
    h = np.asarray(jax.jit(jax.hessian(lambda f: _loss(unravel(f), x64, y64)))(flat))
  evals = np.linalg.eigvalsh(0.5 * (h + h.T))
  # Parameters moved between the HVPs of the last step and p: compare loosely.
  np.testing.assert_allclose(float(state.value), _top(evals), rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_nan_and_zero_hvp(method):
  params = _params()
  state0 = max_eigenvalue_init(params, jax.random.PRNGKey(7))

  @jax.jit
  def run(state):
    bad = max_eigenvalue_update(
      lambda v: jax.tree.map(lambda a: a * jnp.nan, v), state, iters=3, method=method
    )
    zero = max_eigenvalue_update(
      lambda v: jax.tree.map(jnp.zeros_like, v), bad, iters=3, method=method
    )
    good = max_eigenvalue_update(_hvp(), zero, iters=20, method=method)
    return bad, zero, good

  bad, zero, good = run(state0)
  assert np.isnan(float(bad.value))
  np.testing.assert_array_equal(_flat(bad.vector), _flat(state0.vector))
  assert float(zero.value) == 0.0
  np.testing.assert_allclose(_flat(zero.vector), _flat(state0.vector), rtol=1e-6, atol=1e-7)
  assert np.isfinite(float(good.value)) and float(good.value) != 0.0
  assert np.all(np.isfinite(_flat(good.vector)))
  assert int(good.count) == 3


def test_bad_arguments():
  state = max_eigenvalue_init(_params(), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="method"):
    max_eigenvalue_update(_hvp(), state, method="arnoldi")
  with pytest.raises(ValueError, match="iters"):
    max_eigenvalue_update(_hvp(), state, iters=0)
  with pytest.raises(ValueError, match="iters >= 2"):
    max_eigenvalue_update(_hvp(), state, iters=1, method="lanczos")
  with pytest.raises(ValueError, match="num_probes"):
    hutchinson(_hvp(), _params(), jax.random.PRNGKey(0), num_probes=0)


# --------------------------------------------------------------------------- trace, diagonal


@pytest.mark.slow
def test_hutchinson_within_standard_errors():
  h, _ = _dense()
  k = 2000
  trace, diag = jax.jit(lambda key: hutchinson(_hvp(), _params(), key, num_probes=k))(
    jax.random.PRNGKey(8)
  )
  var_trace = 2.0 * (np.sum(h**2) - np.sum(np.diag(h) ** 2))
  se = np.sqrt(var_trace / k)
  assert abs(float(trace) - np.trace(h)) < 3.0 * se, (float(trace), np.trace(h), se)
  d = _flat(diag)
  var_diag = np.sum(h**2, axis=1) - np.diag(h) ** 2
  se_diag = np.sqrt(var_diag / k)
  assert np.all(np.abs(d - np.diag(h)) < 4.0 * se_diag + 1e-6)
  np.testing.assert_allclose(float(trace), d.sum(), rtol=1e-4)
  # Per-leaf traces sum the diagonal per leaf.
  per_leaf = leaf_traces(diag)
  np.testing.assert_allclose(
    float(per_leaf["Dense_1"]["bias"]), float(jnp.sum(diag["Dense_1"]["bias"])), rtol=1e-6
  )
  # Batched probes with lax.map: the same probes, the same estimate.
  trace_b, _ = jax.jit(
    lambda key: hutchinson(_hvp(), _params(), key, num_probes=k, batch_size=500)
  )(jax.random.PRNGKey(8))
  np.testing.assert_allclose(float(trace_b), float(trace), rtol=1e-4)


@pytest.mark.slow
def test_hutchinson_single_probe_variance_formula():
  h, _ = _dense()
  keys = jax.random.split(jax.random.PRNGKey(9), 3000)
  samples = np.asarray(jax.jit(jax.vmap(lambda k: hutchinson(_hvp(), _params(), k)[0]))(keys))
  var_trace = 2.0 * (np.sum(h**2) - np.sum(np.diag(h) ** 2))
  np.testing.assert_allclose(samples.var(ddof=1), var_trace, rtol=0.1)
  # A diagonal Hessian is recovered exactly from one probe.
  dvec = jnp.arange(1.0, 6.0)
  tr, dg = jax.jit(lambda k: hutchinson(lambda v: dvec * v, jnp.zeros(5), k))(jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(tr), 15.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dg), np.asarray(dvec), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [7, 64])
def test_exact_hessian_diagonal(chunk):
  h, _ = _dense()
  diag = jax.jit(lambda: exact_hessian_diagonal(_hvp(), _params(), chunk=chunk))()
  assert jax.tree.structure(diag) == jax.tree.structure(_params())
  ref = np.diag(h)
  np.testing.assert_allclose(_flat(diag), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  tr = leaf_traces(diag)
  np.testing.assert_allclose(sum(float(v) for v in jax.tree.leaves(tr)), np.trace(h), rtol=1e-5)


@pytest.mark.slow
def test_exact_hessian_diagonal_max_params():
  with pytest.raises(ValueError, match=r"51 parameters.*max_params=50"):
    exact_hessian_diagonal(_hvp(), _params(), max_params=50)


# --------------------------------------------------------------------------- TIC


@pytest.mark.slow
def test_tic_matches_numpy():
  x, y = _data()
  params = _params()

  @jax.jit
  def run():
    per_ex = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(params, x[:, None], y[:, None])
    second = jax.tree.map(lambda g: jnp.mean(g**2, axis=0), per_ex)
    curv = exact_hessian_diagonal(_hvp(), params)
    flat_g = jax.vmap(lambda t: ravel_pytree(t)[0])(per_ex)
    return second, curv, flat_g, tic(second, curv), tic_trace(second, curv)

  second, curv, g, tic_diag, tic_tr = run()
  g = np.asarray(g, np.float64)
  h, _ = _dense()
  m = np.mean(g**2, axis=0)
  c = np.diag(h)
  eps = 1e-7
  np.testing.assert_allclose(float(tic_diag), np.sum(m / (c + eps)), rtol=1e-4)
  np.testing.assert_allclose(float(tic_tr), m.sum() / (c.sum() + eps), rtol=1e-5)
  np.testing.assert_allclose(
    float(tic_trace(second, np.trace(h))), m.sum() / (c.sum() + eps), rtol=1e-5
  )
  np.testing.assert_allclose(float(tic_trace(second, curv)), m.sum() / (c.sum() + eps), rtol=1e-5)
  # Negative curvature is not guarded, as in Cockpit; eps is used as given.
  ms, cs = np.array([1.0, 2.0, 3.0]), np.array([0.5, -2.0, 0.0])
  np.testing.assert_allclose(
    float(tic(jnp.asarray(ms), jnp.asarray(cs), eps=0.1)), np.sum(ms / (cs + 0.1)), rtol=1e-6
  )


# --------------------------------------------------------------------------- alpha


def _quadratic_observations(eta, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a = (q * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])) @ q.T
  b = rng.normal(size=6)
  theta0 = rng.normal(size=6)

  def f(th):
    return 0.5 * th @ a @ th + b @ th

  g = a @ theta0 + b
  theta1 = theta0 - eta * g
  t = np.linalg.norm(theta1 - theta0)
  d = (theta1 - theta0) / t
  df0, df1 = (a @ theta0 + b) @ d, (a @ theta1 + b) @ d
  closed = eta * (g @ a @ g) / (g @ g) - 1.0
  return (t, f(theta0), f(theta1), df0, df1), closed, (g @ a @ g) / (g @ g)


@pytest.mark.parametrize("ratio", [0.3, 1.0, 1.6])
def test_alpha_quadratic_closed_form(ratio):
  _, _, c = _quadratic_observations(1.0)
  obs, closed, _ = _quadratic_observations(ratio / c)
  np.testing.assert_allclose(closed, ratio - 1.0, rtol=1e-12)
  got = jax.jit(alpha)(*[jnp.float32(o) for o in obs], 0.0, 0.0, 0.0, 0.0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), closed, atol=2e-5)


def _wls_alpha(t, f0, f1, df0, df1, vf0, vf1, vdf0, vdf1, eps=1e-10):
  """Weighted least squares of the ORIGINAL (unscaled) 4×3 system, float64."""
  phi = np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]])
  y = np.array([f0, f1, df0, df1])
  var = np.array([vf0, vf1, vdf0, vdf1], np.float64)
  var = np.where(var > 0, var, eps)
  sw = 1.0 / np.sqrt(var)
  mu, *_ = np.linalg.lstsq(phi * sw[:, None], y * sw, rcond=None)
  if mu[2] < 0:
    return -1.0
  return -2.0 * mu[2] * t / mu[1] - 1.0


def test_alpha_noisy_matches_weighted_least_squares():
  rng = np.random.default_rng(10)
  got, want = [], []
  for i in range(40):
    t = 10 ** rng.uniform(-3, 0)
    f0 = rng.uniform(0.5, 3.0)
    df0 = -rng.uniform(0.1, 3.0)
    curv = rng.uniform(0.2, 5.0)
    f1 = f0 + df0 * t + 0.5 * curv * t * t + rng.normal() * 0.05 * t
    df1 = df0 + curv * t + rng.normal() * 0.3
    var = 10 ** rng.uniform(-4, 1, size=4)
    if i % 5 == 0:
      var[rng.integers(4)] = 0.0  # eps weight: that observation is nearly interpolated.
    obs = (t, f0, f1, df0, df1, *var)
    want.append(_wls_alpha(*obs))
    got.append(float(jax.jit(alpha)(*[jnp.float32(o) for o in obs])))
  got, want = np.array(got), np.array(want)
  assert np.any(want == -1.0) and np.any(want > 0) and np.any((want < 0) & (want > -1))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_alpha_special_cases():
  # Concave: f'(t) < f'(0) with consistent observations (μ₂ < 0) → −1.
  t, f0, df0, mu2 = 0.5, 1.0, -1.0, -2.0
  f1 = f0 + df0 * t + mu2 * t * t
  df1 = df0 + 2 * mu2 * t
  assert _wls_alpha(t, f0, f1, df0, df1, 1, 1, 1, 1) == -1.0
  assert float(alpha(t, f0, f1, df0, df1, 1.0, 1.0, 1.0, 1.0)) == -1.0
  # No step: −1, also with NaN-free degenerate observations.
  assert float(alpha(0.0, 1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0)) == -1.0
  # Non-finite observations give NaN, never raise.
  assert np.isnan(float(alpha(0.5, jnp.nan, 1.0, -1.0, 0.0, 1.0, 1.0, 1.0, 1.0)))
  # Broadcasting (vmap-like use): one α per entry.
  out = alpha(jnp.array([0.0, 0.5]), 1.0, 0.75, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(
    np.asarray(out), [-1.0, _wls_alpha(0.5, 1.0, 0.75, -1.0, 0.0, 0, 0, 0, 0)], atol=1e-5
  )


def test_rademacher_signs_are_fair_and_independent() -> None:
  z = np.asarray(rademacher((4, 25_000), jax.random.key(3)))
  assert set(np.unique(z)) == {-1.0, 1.0}
  # Mean 0 (sd 1/√N), and neighbouring entries (same 32-bit word) uncorrelated.
  assert abs(z.mean()) < 4 / np.sqrt(z.size)
  flat = z.reshape(-1)
  assert abs(np.mean(flat[:-1] * flat[1:])) < 4 / np.sqrt(flat.size)
  other = np.asarray(rademacher((4, 25_000), jax.random.key(4)))
  assert abs(np.mean(z * other)) < 4 / np.sqrt(z.size)


@pytest.mark.parametrize("k, chunk", [(8, 1), (8, 3), (8, 8), (1, 1), (5, 2)])
def test_streamed_estimate_is_the_batched_one_without_the_k_by_p_arrays(k, chunk):
  """The same probes (51 parameters: leaves of 28, 7, 14, 2, none a multiple of 32) pushed
  through in turns give the batched estimate; the per-entry variance against numpy."""
  from jaxscope.metrics.hutchinson import probes_like, streamed_estimate, trace_estimate

  params, key = _params(), jax.random.PRNGKey(3)
  probes = probes_like(params, key, k)
  products = jax.vmap(_hvp())(probes)
  want = trace_estimate(probes, products)
  got, last = jax.jit(lambda key: streamed_estimate(_hvp(), params, key, k, chunk=chunk))(key)
  assert got.samples is None
  for field in ("trace", "trace_stderr", "diag", "leaf_traces", "leaf_stderr", "diag_variance"):
    np.testing.assert_allclose(
      _flat(getattr(got, field)), _flat(getattr(want, field)), rtol=2e-5, atol=1e-6, err_msg=field
    )
  # The last turn's products are those of the last turn's probes.
  first = (k - 1) // chunk * chunk
  np.testing.assert_allclose(
    _flat(jax.tree.map(lambda a: a[first:], products)), _flat(last), rtol=1e-5, atol=1e-6
  )
  # Var of each diag entry: K/(K−1)·(mean d² − d̄²)/K from the samples, in float64.
  d = np.stack([_flat(jax.tree.map(lambda s, i=i: s[i], want.samples)) for i in range(k)], 0)
  d = d.astype(np.float64)
  ref = (
    np.full(d.shape[1], np.inf)
    if k == 1
    else np.maximum((d**2).mean(0) - d.mean(0) ** 2, 0) / (k - 1)
  )
  np.testing.assert_allclose(_flat(got.diag_variance), ref, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="chunk"):
    streamed_estimate(_hvp(), params, key, k, chunk=0)


def test_streamed_sums_are_added_in_a_branch_per_turn_on_the_cpu():
  """XLA:CPU would fuse every turn's sums into each reader of them (reading all products
  again, transposed); each turn's sums are materialised in a branch of their own instead."""
  from jaxscope.metrics.hutchinson import streamed_estimate

  if jax.default_backend() != "cpu":
    pytest.skip("the branches are XLA:CPU's; other backends add the sums directly")
  params, key = _params(), jax.random.PRNGKey(3)
  fn = jax.jit(lambda key: streamed_estimate(_hvp(), params, key, 3)[0].diag_variance)
  hlo = fn.lower(key).compile().as_text()
  # One conditional per turn, returning the sums of the 4 leaves twice.
  conds = [ln for ln in hlo.splitlines() if " conditional(" in ln and "f32[" in ln.split("=")[1]]
  assert len(conds) == 3


# --------------------------------------------------------------------------- refinement


def _matrix_hvp(h: np.ndarray):
  hj = jnp.asarray(h, jnp.float32)
  return lambda v: {"a": hj @ v["a"]}


@pytest.mark.parametrize(("n", "k"), [(40, 20), (300, 20), (6, 6), (200, 8)])
def test_two_pass_lanczos_matches_dense_and_measures_its_residual(n, k):
  """The refinement's basis-free Lanczos: its value within its residual of the top eigenvalue
  (float64 reference), the residual that of the unit vector returned (measured, also where
  orthogonality is lost: n=300, k=20 converges long before the end), and no worse than the
  stored-basis Lanczos from the same start beyond float32 rounding."""
  rng = np.random.default_rng(n + k)
  a = rng.normal(size=(n, n))
  h = 0.5 * (a + a.T)
  h[0, 0] += 3.0 * np.sqrt(n)
  evals = np.linalg.eigvalsh(h)
  top = _top(evals)
  v0 = rng.normal(size=n)
  v = {"a": jnp.asarray(v0 / np.linalg.norm(v0), jnp.float32)}
  hvp = _matrix_hvp(h)
  lam, res, x = jax.jit(lambda v: lanczos.lanczos_two_pass(hvp, v, k))(v)
  ref_lam, ref_res, _ = jax.jit(lambda v: lanczos.lanczos(hvp, v, k))(v)
  x = np.asarray(x["a"], np.float64)
  np.testing.assert_allclose(np.linalg.norm(x), 1.0, rtol=1e-5)
  rounding = 64 * np.finfo(np.float32).eps * np.abs(evals).max()
  true_res = np.linalg.norm(h @ x - float(lam) * x)
  assert abs(float(res) - true_res) <= rounding
  assert abs(float(lam) - top) <= float(res) + rounding
  assert abs(float(lam) - top) <= abs(float(ref_lam) - top) + float(ref_res) + rounding


def test_two_pass_lanczos_breakdown_and_nan():
  """An invariant Krylov space (rank-2 H, 10 steps) ends the recurrence without NaN; a NaN
  product gives NaN, never an exception."""
  u = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 2)))[0]
  h = u @ np.diag([5.0, -2.0]) @ u.T
  v = {"a": jnp.full((12,), 12**-0.5, jnp.float32)}
  lam, res, x = jax.jit(lambda v: lanczos.lanczos_two_pass(_matrix_hvp(h), v, 10))(v)
  np.testing.assert_allclose(float(lam), 5.0, rtol=1e-5)
  assert float(res) < 1e-4
  assert np.all(np.isfinite(np.asarray(x["a"])))
  nan_hvp = lambda v: {"a": v["a"] * jnp.nan}  # noqa: E731
  lam, res, _ = jax.jit(lambda v: lanczos.lanczos_two_pass(nan_hvp, v, 4))(v)
  assert np.isnan(float(lam)) and np.isnan(float(res))


def test_refinement_keeps_no_basis():
  """The refinement branch's temporaries do not grow with its step count (a stored basis of
  ``refine_iters + 1`` vectors would add ~4 MB per 10 steps here)."""
  p = 100_000
  params = {"w": jnp.zeros((p,), jnp.float32)}
  diag = jnp.linspace(-1.0, 2.0, p)
  hvp = lambda v: {"w": diag * v["w"]}  # noqa: E731
  state = max_eigenvalue_init(params, jax.random.PRNGKey(0))

  def temp_bytes(refine_iters: int) -> int:
    fn = jax.jit(
      lambda s: max_eigenvalue_update(hvp, s, iters=1, tol=0.5, refine_iters=refine_iters)
    )
    return fn.lower(state).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(40) <= temp_bytes(5) + 64 * 1024
  out = jax.jit(lambda s: max_eigenvalue_update(hvp, s, iters=1, tol=0.5, refine_iters=40))(state)
  assert abs(float(out.value) - 2.0) <= float(out.residual) < 0.05


def test_two_pass_lanczos_stops_once_converged():
  """A well-separated top eigenvalue (100 against a spectrum in [-1, 1]) converges in a few
  steps: the first pass stops there. Counted products: m of the first pass, 19 of the
  second (a fixed count), 1 for the residual; 40 without the early stop."""
  rng = np.random.default_rng(3)
  q = np.linalg.qr(rng.normal(size=(60, 60)))[0]
  h = q @ np.diag(np.r_[100.0, rng.uniform(-1, 1, 59)]) @ q.T
  calls = []
  hj = jnp.asarray(h, jnp.float32)

  def hvp(v):
    jax.debug.callback(lambda: calls.append(1))
    return {"a": hj @ v["a"]}

  v = {"a": jnp.full((60,), 60**-0.5, jnp.float32)}
  lam, res, _ = jax.jit(lambda v: lanczos.lanczos_two_pass(hvp, v, 20))(v)
  jax.effects_barrier()
  np.testing.assert_allclose(float(lam), 100.0, rtol=1e-5)
  assert float(res) <= 1e-3 * 100.0
  assert 20 + 2 <= len(calls) <= 20 + 8
