"""Spectral norms right from the first step (issue 18): exact SVD for small kernels, power
iteration with an honest residual above, checked against numpy's float64 SVD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope import metrics
from jaxscope.metrics import registry, spectral

#: float32 rounding allowed on top of the residual (relative to σ).
SLACK = 2e-6


def _sigma_max(w: np.ndarray) -> float:
  return float(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0])


def _with_spectrum(rng: np.random.Generator, m: int, n: int, s: np.ndarray) -> np.ndarray:
  u, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
  v, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
  return ((u * s) @ v.T).astype(np.float32)


def _matrices(m: int = 96, n: int = 80) -> list[np.ndarray]:
  """Random matrices whose top singular values are well and ill separated."""
  out = []
  k = min(m, n)
  for seed in range(4):
    rng = np.random.default_rng(seed)
    out.append(rng.normal(size=(m, n)).astype(np.float32))  # Marchenko–Pastur edge
    close = np.concatenate([[1.0, 0.999, 0.998], np.linspace(0.99, 0.01, k - 3)])
    out.append(_with_spectrum(rng, m, n, close))  # gaps of 0.1%
    out.append(_with_spectrum(rng, m, n, np.sort(rng.uniform(0, 1, k))[::-1]))
  return out


def test_exact_svd_matches_numpy_float64():
  rng = np.random.default_rng(0)
  params = {
    "Conv_0": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},  # [36, 8]
    "Dense_0": {"kernel": rng.normal(size=(40, 30)).astype(np.float32), "bias": np.ones(30)},
  }
  for m in (metrics.spectral_norm(), metrics.spectral_norm(method="svd")):
    sc = metrics.scope(params=[m])
    values, _ = sc.update(sc.init(params), params=params)
    assert not any("residual" in k for k in values)  # exact: no residual key
    for name, w in [("Conv_0/kernel", params["Conv_0"]["kernel"].reshape(36, 8))]:
      np.testing.assert_allclose(values[f"params/spectral_norm/{name}"], _sigma_max(w), rtol=1e-5)
    np.testing.assert_allclose(
      values["params/spectral_norm/Dense_0/kernel"],
      _sigma_max(params["Dense_0"]["kernel"]),
      rtol=1e-5,
    )


def test_full_preset_uses_the_auto_spectral_norm():
  (spec,) = [m for m in registry.preset_metrics("full")["params"] if not isinstance(m, str)][-1:]
  assert registry.keys_of(spec) == (
    "{topic}/spectral_norm/{layer}",
    "{topic}/spectral_norm_residual/{layer}",
  )
  assert spectral.SVD_MAX_SIZE == 4096


def test_power_iteration_first_call_within_its_residual():
  # 96×80 = 7680 elements: power iteration under the default "auto".
  m = metrics.spectral_norm()
  f = jax.jit(lambda w: metrics.evaluate(m, w))
  rel = []
  for w in _matrices():
    out = f(jnp.asarray(w))
    assert set(out) == {"norm", "norm_residual"}
    sigma, r, smax = float(out["norm"]), float(out["norm_residual"]), _sigma_max(w)
    assert sigma <= smax * (1 + SLACK)  # ‖Wv‖ is a lower bound
    assert smax - sigma <= r + SLACK * smax, (smax, sigma, r)  # honest
    assert r <= 1e-2 * sigma  # converged to the default tolerance
    rel.append((smax - sigma) / smax)
  assert max(rel) < 2e-3  # the old default (1 step from a random vector) was 23% low


def test_one_gaussian_start_can_miss_the_top_where_the_block_does_not():
  # An unlucky start (almost no weight on the top singular vector) of a matrix with a 2%
  # gap: 20 power iterations stall on σ₂ with a small residual, the block start does not.
  rng = np.random.default_rng(1)
  s = np.concatenate([[1.0, 0.98], np.linspace(0.9, 0.01, 78)])
  w = _with_spectrum(rng, 96, 80, s)
  u1 = np.linalg.svd(w.astype(np.float64))[0][:, 0]
  u = rng.normal(size=96)
  u -= (u @ u1 - 1e-4) * u1  # weight 1e-8 on the top
  u = jnp.asarray(u / np.linalg.norm(u), jnp.float32)

  @jax.jit
  def both(w, u):
    plain = spectral.refine(w, u, 20, 20, 1e-2)[:2]
    start = spectral.subspace_start(w, u, 30, jax.random.PRNGKey(0))
    return plain, spectral.refine(w, start, 1, 50, 1e-2)[:2]

  (sigma, r), (sigma_b, r_b) = both(jnp.asarray(w), u)
  assert 1.0 - float(sigma) > 2 * float(r)  # stalled, residual dishonest
  assert abs(1.0 - float(sigma_b)) <= float(r_b) + SLACK


def test_warm_steps_stay_honest_and_the_residual_check_adds_iterations():
  rng = np.random.default_rng(3)
  w0 = rng.normal(size=(96, 80)).astype(np.float32)
  drift = 0.01 * rng.normal(size=w0.shape).astype(np.float32)
  shape = [jax.ShapeDtypeStruct(w0.shape, jnp.float32)]
  checked = metrics.spectral_norm(method="power")
  fixed = metrics.spectral_norm(method="power", max_iters=1)  # no residual check

  @jax.jit
  def step(w, s1, s2):
    (a, s1), (b, s2) = checked.apply([w], s1, None), fixed.apply([w], s2, None)
    return a, b, s1, s2

  s1, s2 = checked.init(shape), fixed.init(shape)
  for t in range(4):  # small updates: warm-started, one iteration each
    w = w0 + t * drift
    a, _, s1, s2 = step(jnp.asarray(w), s1, s2)
    smax = _sigma_max(w)
    assert smax - float(a["norm"]) <= float(a["norm_residual"]) + SLACK * smax
  assert int(s1.count) == 4
  # A different matrix of the same shape (an update that turns the top singular vector):
  # one iteration leaves a large residual, the check iterates to the tolerance.
  w = rng.normal(size=w0.shape).astype(np.float32)
  a, b, _, _ = step(jnp.asarray(w), s1, s2)
  assert float(b["norm_residual"]) > 1e-2 * float(b["norm"])
  assert float(a["norm_residual"]) <= 1e-2 * float(a["norm"])
  smax = _sigma_max(w)
  assert smax - float(a["norm"]) <= float(a["norm_residual"]) + SLACK * smax
  assert smax - float(b["norm"]) <= float(b["norm_residual"]) + SLACK * smax


@pytest.mark.slow
def test_stacked_layers_and_grouped_kernels():
  rng = np.random.default_rng(4)
  stack = rng.normal(size=(3, 96, 80)).astype(np.float32)
  small = rng.normal(size=(20, 10)).astype(np.float32)
  params = {"blocks": {"fc": {"kernel": stack}}, "head": {"kernel": small}}
  # Per layer of the stack, evaluated at once under vmap.
  sc = metrics.scope(params=["spectral_norm"], stacked={"blocks": 0})
  values, state = jax.jit(lambda s: sc.update(s, params=params))(sc.init(params))
  for i in range(3):
    sigma = float(values[f"params/spectral_norm/blocks/{i}/fc/kernel"])
    r = float(values[f"params/spectral_norm_residual/blocks/{i}/fc/kernel"])
    smax = _sigma_max(stack[i])
    assert -SLACK * smax <= smax - sigma <= r + SLACK * smax
    assert int(state.metric_state[f"params/spectral/blocks/{i}/fc/kernel"].count) == 1
  assert "params/spectral_norm_residual/head/kernel" not in values  # 200 elements: SVD
  # A layer of several kernels is their block-diagonal operator: σ = max σ_j, and the
  # residual covers every leaf's interval [σ_j, σ_j + r_j].
  grouped = metrics.scope(params=["spectral_norm"], depth=1)
  both = {"net": {"a": {"kernel": stack[0]}, "b": {"kernel": 3 * small}}}
  values, _ = grouped.update(grouped.init(both), params=both)
  sigma = float(values["params/spectral_norm/net"])
  r = float(values["params/spectral_norm_residual/net"])
  smax = max(_sigma_max(stack[0]), _sigma_max(3 * small))
  assert -SLACK * smax <= smax - sigma <= r + SLACK * smax


def test_bad_arguments_name_themselves():
  with pytest.raises(ValueError, match="method"):
    metrics.spectral_norm(method="lanczos")
  with pytest.raises(ValueError, match="warmup_iters"):
    metrics.spectral_norm(warmup_iters=-1)
  with pytest.raises(ValueError, match="tol"):
    metrics.spectral_norm(tol=float("nan"))


def test_a_nan_step_keeps_the_warm_start_and_the_count():
  m = metrics.spectral_norm(method="power")
  w = np.random.default_rng(5).normal(size=(96, 80)).astype(np.float32)
  state = m.init([jax.ShapeDtypeStruct(w.shape, jnp.float32)])
  apply = jax.jit(lambda x, s: m.apply([x], s, None))
  out, bad = apply(jnp.asarray(w).at[0, 0].set(jnp.nan), state)
  assert np.isnan(out["norm"]) and int(bad.count) == 0  # the next call warms up again
  np.testing.assert_array_equal(bad.vectors[0], state.vectors[0])
  out, good = apply(jnp.asarray(w), bad)
  smax = _sigma_max(w)
  assert smax - float(out["norm"]) <= float(out["norm_residual"]) + SLACK * smax
  assert int(good.count) == 1
