"""Tests of the plateau detector and of masked freezing against plain-Python/numpy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscope import transforms
from jaxscope.transforms import (
  PlateauState,
  masked_freeze,
  plateau_detector,
  plateau_init,
  plateau_update,
)
from jaxscope.transforms.capacity import plateau_restart

# ------------------------------------------------------------------- plateau reference


def _reference(values, patience, cooldown=0, min_delta=0.0, relative=True, smoothing=0.1):
  """Plain-Python re-statement of the rule (float32 arithmetic as the device code).

  Returns the indices at which a plateau fires and the average after every value.
  """
  f32 = np.float32
  gamma = f32(smoothing)
  avg, best = f32(0.0), None  # best None: no finite value seen yet
  since, cool = 0, 0
  fired_at, averages = [], []
  for i, raw in enumerate(values):
    v = f32(raw)
    finite = math.isfinite(float(v))
    if finite:
      avg = v if best is None else f32(gamma * v + (f32(1.0) - gamma) * avg)
    improved = False
    if finite:
      if best is None:
        improved = True
      else:
        tol = f32(min_delta) * f32(abs(best)) if relative else f32(min_delta)
        improved = bool(avg < f32(best - tol))
    if improved:
      best = avg
    cooling = cool > 0
    since = 0 if (improved or cooling) else since + 1
    fire = (not cooling) and since >= patience
    if fire:
      fired_at.append(i)
      since = 0
      if best is not None:
        best = avg
      cool = cooldown
    else:
      cool = max(cool - 1, 0)
    averages.append(float(avg))
  return fired_at, np.array(averages)


def _run_eager(values, **kw):
  s = plateau_init()
  fired, avgs = [], []
  for v in values:
    s = plateau_update(s, v, **kw)
    fired.append(bool(s.fired))
    avgs.append(float(s.average))
  return [i for i, f in enumerate(fired) if f], np.array(avgs), s


def _run_scan(values, **kw):
  tx = plateau_detector(**kw)
  params = {"w": jnp.zeros(2)}

  @jax.jit
  def run(vals):
    def body(state, v):
      _, state = tx.update({"w": jnp.ones(2)}, state, params, value=v)
      return state, (optax.tree.get(state, "fired"), optax.tree.get(state, "average"))

    return jax.lax.scan(body, tx.init(params), vals)

  state, (fired, avgs) = run(jnp.asarray(values, jnp.float32))
  return list(np.flatnonzero(np.asarray(fired))), np.asarray(avgs), state


# ----------------------------------------------------------------------- plateau tests


def test_plateau_by_hand_no_smoothing():
  # 10, 9, …, 1 (indices 0–9, each an improvement), then 1 forever: index 9 sets best=1,
  # indices 10..19 are the 1st..10th non-improving values -> the first plateau fires at 19;
  # best is reset to 1 and the next fires 10 values later.
  values = [10.0 - i for i in range(10)] + [1.0] * 30
  kw = dict(patience=10, smoothing=1.0)
  assert _reference(values, **kw)[0] == [19, 29, 39]
  fired, avgs, s = _run_eager(values, **kw)
  assert fired == [19, 29, 39]
  np.testing.assert_array_equal(avgs, values)
  assert int(s.fires) == 3 and int(s.count) == 40 and float(s.best) == 1.0


def test_plateau_cooldown_by_hand():
  # cooldown 5: after the plateau at 19, values 20..24 are not counted, 25..34 are the
  # 10 counted ones -> 34, then 34 + 5 + 10 = 49.
  values = [10.0 - i for i in range(10)] + [1.0] * 40
  kw = dict(patience=10, cooldown=5, smoothing=1.0)
  assert _reference(values, **kw)[0] == [19, 34, 49]
  assert _run_eager(values, **kw)[0] == [19, 34, 49]
  assert _run_scan(values, **kw)[0] == [19, 34, 49]


def test_plateau_decreasing_then_flat_matches_reference():
  # 30 decreasing values, then flat; the EMA keeps creeping down after step 30, so the
  # relative min_delta decides when the creeping stops counting.
  values = [5.0 * 0.9**i for i in range(30)] + [5.0 * 0.9**29] * 150
  kw = dict(patience=10, min_delta=1e-3, smoothing=0.1)
  expected, ref_avg = _reference(values, **kw)
  assert expected and expected[0] > 30
  fired, avgs, _ = _run_eager(values, **kw)
  assert fired == expected
  np.testing.assert_allclose(avgs, ref_avg, rtol=1e-6)
  fired_scan, avgs_scan, _ = _run_scan(values, **kw)
  assert fired_scan == expected
  np.testing.assert_allclose(avgs_scan, ref_avg, rtol=1e-6)


@pytest.mark.parametrize("relative", [False, True])
def test_plateau_min_delta_ignores_small_improvements(relative):
  # 3.0, 2.9, …, 1.1 (indices 0–19), then 1.0 − 1e-4·k: a steady drift of 1e-4 per step.
  # With min_delta = 0.01 (absolute, or relative to best ≈ 1) the drift is noise: index 20
  # improves (1.0 < 1.1 − 0.011), then 21..30 are 10 non-improving values -> fires at 30,
  # and at 40. With min_delta = 0 every drift step improves and nothing fires.
  values = [3.0 - 0.1 * i for i in range(20)] + [1.0 - 1e-4 * k for k in range(30)]
  kw = dict(patience=10, min_delta=0.01, relative=relative, smoothing=1.0)
  assert _reference(values, **kw)[0] == [30, 40]
  assert _run_eager(values, **kw)[0] == [30, 40]
  assert _run_scan(values, **kw)[0] == [30, 40]
  kw0 = dict(patience=10, min_delta=0.0, smoothing=1.0)
  assert _reference(values, **kw0)[0] == []
  assert _run_eager(values, **kw0)[0] == []


def test_plateau_nan_never_improves_and_counts():
  nan = float("nan")
  # 5 and 4 improve; three NaNs are 3 non-improving values -> fire at 4 (patience 3);
  # the average stays 4 through them; 3.0 improves, then 3 more -> fire at 8.
  values = [5.0, 4.0, nan, nan, nan, 3.0, 3.0, 3.0, 3.0]
  kw = dict(patience=3, smoothing=1.0)
  assert _reference(values, **kw)[0] == [4, 8]
  fired, avgs, _ = _run_eager(values, **kw)
  assert fired == [4, 8]
  np.testing.assert_array_equal(avgs, [5, 4, 4, 4, 4, 3, 3, 3, 3])
  assert _run_scan(values, **kw)[0] == [4, 8]
  # NaN from the start: fires after `patience` of them, best stays +inf, and the first
  # finite value initialises the average and improves.
  values = [nan, float("inf"), nan, 7.0]
  fired, avgs, s = _run_eager(values, patience=3, smoothing=0.5)
  assert fired == [2]
  np.testing.assert_array_equal(avgs, [0, 0, 0, 7])
  assert float(s.best) == 7.0 and int(s.since_best) == 0


def test_plateau_scan_matches_python_loop_on_noisy_curve():
  rng = np.random.default_rng(0)
  steps = np.arange(400)
  curve = 2.0 * np.exp(-steps / 40.0) + 0.3 * (steps > 200) * np.exp(-(steps - 200) / 30.0)
  values = (curve + 0.02 * rng.standard_normal(400)).astype(np.float32)
  values[150] = np.nan
  kw = dict(patience=15, cooldown=4, min_delta=1e-3, smoothing=0.3)
  expected, ref_avg = _reference(values.tolist(), **kw)
  assert len(expected) >= 3
  fired, avgs, s = _run_scan(values, **kw)
  assert fired == expected
  np.testing.assert_allclose(avgs, ref_avg, rtol=1e-5)
  assert int(optax.tree.get(s, "fires")) == len(expected)


def test_plateau_state_structure_is_stable():
  tx = plateau_detector(patience=2)
  params = {"w": jnp.zeros(3)}
  s0 = tx.init(params)
  _, s1 = tx.update({"w": jnp.ones(3)}, s0, params, value=jnp.float32(1.0))
  assert isinstance(s0, PlateauState)
  assert jax.tree.structure(s0) == jax.tree.structure(s1)
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1), strict=True):
    assert a.shape == b.shape == () and a.dtype == b.dtype
  out = jax.lax.cond(True, lambda: s0, lambda: s1)  # needs identical structure
  assert int(out.count) == 0
  # Updates pass through unchanged.
  u, _ = tx.update({"w": jnp.arange(3.0)}, s0, params, value=1.0)
  np.testing.assert_array_equal(u["w"], [0.0, 1.0, 2.0])


def test_plateau_restart_forgets_the_level_and_keeps_the_counts():
  s = plateau_init()
  for v in (3.0, 2.0, 2.0, 2.0):  # raw values, patience 2: fires at the fourth; cooldown 5
    s = plateau_update(s, v, patience=2, cooldown=5, smoothing=1.0)
  assert bool(s.fired) and int(s.fires) == 1 and int(s.cooldown) == 5
  r = plateau_restart(s)
  assert float(r.average) == 0.0 and math.isinf(float(r.best)) and int(r.since_best) == 0
  assert (int(r.count), int(r.cooldown), bool(r.fired), int(r.fires)) == (4, 5, True, 1)
  assert jax.tree_util.tree_structure(r) == jax.tree_util.tree_structure(s)
  assert [a.dtype for a in r] == [a.dtype for a in s]
  # The next value re-initialises the average and is an improvement; without the restart
  # the EMA (weight 0.5) mixes it with the old level, 0.5 · 4 + 0.5 · 2 = 3, and the bar
  # stays at the level of the plateau, 2.
  after = plateau_update(r, 4.0, patience=2, cooldown=5, smoothing=0.5)
  assert (float(after.average), float(after.best)) == (4.0, 4.0)
  kept = plateau_update(s, 4.0, patience=2, cooldown=5, smoothing=0.5)
  assert (float(kept.average), float(kept.best)) == (3.0, 2.0)


def test_plateau_errors():
  tx = plateau_detector()
  with pytest.raises(ValueError, match="value"):
    tx.update({"w": jnp.ones(2)}, tx.init(None))
  with pytest.raises(ValueError, match="scalar"):
    plateau_update(plateau_init(), jnp.ones(2))
  with pytest.raises(ValueError, match="patience"):
    plateau_detector(patience=0)
  with pytest.raises(ValueError, match="smoothing"):
    plateau_detector(smoothing=0.0)
  with pytest.raises(ValueError, match="min_delta"):
    plateau_detector(min_delta=-1.0)
  assert "plateau_detector" in transforms.__all__ and "masked_freeze" in transforms.__all__


# ---------------------------------------------------------------------- freeze fixtures

STEPS, SWITCH, LR = 20, 10, 0.05


def _params():
  rng = np.random.default_rng(1)
  return {
    "w": rng.standard_normal((4, 3)).astype(np.float32),
    "v": rng.standard_normal(5).astype(np.float32),
    "b": rng.standard_normal(3).astype(np.float32),
  }


def _grads():
  rng = np.random.default_rng(2)
  return [
    {k: rng.standard_normal(s).astype(np.float32) for k, s in (("w", (4, 3)), ("v", 5), ("b", 3))}
    for _ in range(STEPS)
  ]


def _mask(step):
  """w: per output unit (shape (3,)); v: per entry; b: whole leaf (scalar)."""
  if step < SWITCH:
    return {
      "w": np.array([True, False, True]),
      "v": np.array([True, False, True, False, True]),
      "b": np.array(True),
    }
  return {
    "w": np.array([True, True, False]),
    "v": np.array([True, True, False, False, True]),
    "b": np.array(False),
  }


def _full_mask(step, shapes):
  return {k: np.broadcast_to(m, shapes[k]) for k, m in _mask(step).items()}


def _numpy_reference(kind, params, grads):
  """float64 masked SGD-momentum / Adam: frozen entries keep their moments, move 0."""
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  shapes = {k: v.shape for k, v in w.items()}
  m1 = {k: np.zeros_like(v) for k, v in w.items()}
  m2 = {k: np.zeros_like(v) for k, v in w.items()}
  b1, b2, eps = 0.9, 0.999, 1e-8
  ups = []
  for t, g in enumerate(grads):
    mask = _full_mask(t, shapes)
    u = {}
    for k in w:
      gk = np.asarray(g[k], np.float64)
      on = mask[k]
      if kind == "sgd":
        new1 = gk + 0.9 * m1[k]
        uk = -LR * new1
        m1[k] = np.where(on, new1, m1[k])
      else:
        new1 = b1 * m1[k] + (1 - b1) * gk
        new2 = b2 * m2[k] + (1 - b2) * gk**2
        count = t + 1  # global count: advances for every entry
        uk = -LR * (new1 / (1 - b1**count)) / (np.sqrt(new2 / (1 - b2**count)) + eps)
        m1[k] = np.where(on, new1, m1[k])
        m2[k] = np.where(on, new2, m2[k])
      u[k] = np.where(on, uk, 0.0)
      w[k] = w[k] + u[k]
    ups.append(u)
  return ups


def _inner(kind):
  return optax.sgd(LR, momentum=0.9) if kind == "sgd" else optax.adam(LR)


def _moments(kind, state):
  if kind == "sgd":
    return [optax.tree.get(state, "trace")]
  return [optax.tree.get(state, "mu"), optax.tree.get(state, "nu")]


# ------------------------------------------------------------------------ freeze tests


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_masked_freeze_against_references(kind):
  params = {k: jnp.asarray(v) for k, v in _params().items()}
  shapes = {k: v.shape for k, v in params.items()}
  grads = _grads()
  tx = masked_freeze(_inner(kind))
  traces = []

  @jax.jit
  def step(p, s, g, mask):
    traces.append(1)
    u, s = tx.update(g, s, p, trainable=mask)
    return optax.apply_updates(p, u), s, u

  state = tx.init(params)
  p = params
  got_updates = []
  for t in range(STEPS):
    before = [jax.tree.map(np.asarray, m) for m in _moments(kind, state)]
    p, state, u = step(p, state, grads[t], _mask(t))
    after = [jax.tree.map(np.asarray, m) for m in _moments(kind, state)]
    full = _full_mask(t, shapes)
    for k in params:
      off = ~full[k]
      # Frozen entries: exactly zero update, bit-identical moments.
      assert np.all(np.asarray(u[k])[off] == 0.0), (t, k)
      for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a[k][off], b[k][off])
    got_updates.append(jax.tree.map(np.asarray, u))
  assert len(traces) == 1  # the mask changed at step 10 without retracing
  if kind == "adam":
    assert int(optax.tree.get(state, "count")) == STEPS  # count advanced normally

  # Against the float64 numpy reference, every step and entry.
  ref = _numpy_reference(kind, _params(), grads)
  for t in range(STEPS):
    for k in params:
      np.testing.assert_allclose(got_updates[t][k], ref[t][k], rtol=2e-5, atol=1e-7)

  # Entries trainable throughout match the unmasked optimizer run on just those entries.
  cols, idx = [0], [0, 4]
  sub = {"w": params["w"][:, cols], "v": params["v"][jnp.array(idx)]}
  inner = _inner(kind)
  s2 = inner.init(sub)
  for t in range(STEPS):
    g2 = {"w": grads[t]["w"][:, cols], "v": grads[t]["v"][idx]}
    u2, s2 = inner.update(g2, s2, sub)
    sub = optax.apply_updates(sub, u2)
    np.testing.assert_allclose(got_updates[t]["w"][:, cols], u2["w"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got_updates[t]["v"][idx], u2["v"], rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(np.asarray(p["w"])[:, cols], sub["w"], rtol=1e-6)


def test_masked_freeze_protects_state_inside_partition_and_chain():
  params = {k: jnp.asarray(v) for k, v in _params().items()}
  inner = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.partition(
      {"a": optax.adam(LR), "s": optax.sgd(LR, momentum=0.9)}, {"w": "a", "v": "s", "b": "a"}
    ),
  )
  tx = masked_freeze(inner)
  state = tx.init(params)
  grads = _grads()
  # The global norm is taken over the trainable entries only (frozen gradients are zeroed).
  _, state = tx.update(grads[0], state, params, trainable=_mask(0))
  full = _full_mask(0, {k: v.shape for k, v in params.items()})
  gnorm = math.sqrt(sum(float(np.sum(np.where(full[k], grads[0][k], 0) ** 2)) for k in full))
  trace = optax.tree.get(state, "trace")["v"]
  expected = np.where(full["v"], grads[0]["v"] * min(1.0, 1.0 / gnorm), 0.0)
  np.testing.assert_allclose(trace, expected, rtol=1e-5)
  mu_before = np.asarray(optax.tree.get(state, "mu")["w"])
  tr_before = np.asarray(trace)
  _, state = tx.update(grads[1], state, params, trainable=_mask(SWITCH))
  full2 = _full_mask(SWITCH, {k: v.shape for k, v in params.items()})
  mu_after = np.asarray(optax.tree.get(state, "mu")["w"])
  tr_after = np.asarray(optax.tree.get(state, "trace")["v"])
  np.testing.assert_array_equal(mu_after[~full2["w"]], mu_before[~full2["w"]])
  np.testing.assert_array_equal(tr_after[~full2["v"]], tr_before[~full2["v"]])
  assert not np.array_equal(mu_after[full2["w"]], mu_before[full2["w"]])


def test_masked_freeze_frozen_nan_gradient_does_not_leak():
  tx = masked_freeze(optax.adam(0.1))
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.array([1.0, jnp.nan, 1.0])}
  u, s = tx.update(g, tx.init(params), params, trainable={"w": jnp.array([True, False, True])})
  assert np.all(np.isfinite(u["w"])) and float(u["w"][1]) == 0.0
  assert np.all(np.isfinite(optax.tree.get(s, "nu")["w"]))


def test_optax_masked_passes_raw_gradients_so_it_cannot_freeze():
  # Why masked_freeze exists: optax.masked returns the raw gradient for masked-out leaves,
  # so apply_updates would *ascend* on the leaves one meant to freeze.
  params = {"w": jnp.ones(2), "b": jnp.ones(2)}
  g = {"w": jnp.array([0.5, -2.0]), "b": jnp.array([1.0, 1.0])}
  tx = optax.masked(optax.sgd(0.1), {"w": False, "b": True})
  u, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_array_equal(u["w"], g["w"])
  u, _ = masked_freeze(optax.sgd(0.1)).update(
    g, optax.sgd(0.1).init(params), params, trainable={"w": jnp.array(False), "b": True}
  )
  np.testing.assert_array_equal(u["w"], [0.0, 0.0])


def test_masked_freeze_errors():
  tx = masked_freeze(optax.sgd(0.1))
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  s = tx.init(params)
  with pytest.raises(ValueError, match="trainable"):
    tx.update(params, s, params)
  with pytest.raises(ValueError, match="missing from trainable: \\['b'\\]"):
    tx.update(params, s, params, trainable={"w": True})
  with pytest.raises(ValueError, match="boolean"):
    tx.update(params, s, params, trainable={"w": jnp.ones(3), "b": True})
  with pytest.raises(ValueError, match=r"'w'.*broadcast"):
    tx.update(params, s, params, trainable={"w": jnp.ones(2, bool), "b": True})


def test_capacity_growth_loop_in_scan():
  # The two pieces together: a plateau activates the next chunk of 2 output units.
  tx = optax.chain(masked_freeze(optax.adam(0.05)), plateau_detector(patience=5, smoothing=1.0))
  params = {"w": jnp.ones((3, 6))}
  units = jnp.arange(6)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s, active = carry
      loss = jnp.float32(1.0)  # flat: a plateau every 5 steps
      mask = {"w": units < 2 * active}
      u, s = tx.update({"w": jnp.ones((3, 6))}, s, p, value=loss, trainable=mask)
      active = jnp.minimum(active + optax.tree.get(s, "fired").astype(jnp.int32), 3)
      return (optax.apply_updates(p, u), s, active), active

    return jax.lax.scan(body, (params, tx.init(params), jnp.int32(1)), None, length=12)

  (p, _, active), hist = run(params)
  # Step 0 improves; steps 1–5 are 5 non-improving values -> fires at 5, then at 10.
  np.testing.assert_array_equal(hist, [1] * 5 + [2] * 5 + [3] * 2)
  moved = np.asarray(p["w"] != 1.0).all(axis=0)
  np.testing.assert_array_equal(moved, [True] * 6)
  assert int(active) == 3
