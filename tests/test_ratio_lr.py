"""Tests of the ratio-adaptive learning rate against a float64 numpy reference."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscope import transforms
from jaxscope.transforms import (
  RatioAdaptiveState,
  ratio_adaptive_lr,
  ratio_adaptive_sgd,
  ratio_lr_values,
  scale_to_update_ratio,
)

# --------------------------------------------------------------------------- reference


def _reference(mode, params, grads, base_lr, steps, target, gamma, max_factor, floor):
  """Plain-numpy float64 re-derivation of both modes (SGD with fixed gradients).

  Returns per step: the factor applied, the mean smoothed ratio after the step and the
  smoothed ratios. Only the 2-D leaves (kernels) count.
  """
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  kernels = [k for k in w if w[k].ndim >= 2]
  lo = 0.0 if floor is None else floor
  hi = np.inf if max_factor is None else max_factor
  r = dict.fromkeys(kernels, 0.0)
  raw_prev = None
  applied = 1.0
  pending = 1.0
  out = []
  for _ in range(steps):
    applied = pending
    u = {k: -base_lr * applied * g[k] for k in w}
    raw = {k: np.linalg.norm(u[k]) / np.linalg.norm(w[k] + u[k]) for k in kernels}
    if mode == "code":
      m_prev = np.mean(list(r.values()))
      pending = target / m_prev if m_prev > 1e-9 else 1.0
      r = {k: gamma * raw[k] + (1 - gamma) * r[k] for k in kernels}
    else:
      prev = raw if raw_prev is None else raw_prev
      r = {k: gamma * raw[k] + (1 - gamma) * prev[k] for k in kernels}
      m = np.mean(list(r.values()))
      pending = applied * target / m if m > 1e-9 else applied
      raw_prev = raw
    pending = float(np.clip(pending, lo, hi))
    w = {k: w[k] + u[k] for k in w}
    out.append((applied, float(np.mean(list(r.values()))), dict(r)))
  return out


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "a": {"kernel": rng.normal(size=(3, 4)), "bias": np.zeros(4)},
    "b": {"kernel": rng.normal(size=(4, 2)) * 0.1, "bias": rng.normal(size=2)},
  }
  grads = {
    "a": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
    "b": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=2)},
  }
  return params, grads


def _flat(tree):
  return {"/".join(str(getattr(p, "key", p)) for p in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


def _run(tx, params, grads, steps):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append((updates, optax.tree.get(state, "factor"), state))
  return out


@pytest.mark.parametrize("mode", ["code", "thesis"])
@pytest.mark.parametrize(
  ("base_lr", "target", "gamma", "max_factor", "floor"),
  [
    (0.05, 1e-3, 0.9, 500.0, None),  # the defaults
    (0.01, 1e-3, 0.5, None, None),  # no cap, more smoothing
    (1e-4, 1e-1, 0.9, 20.0, None),  # the cap binds
    (0.5, 1e-5, 0.7, None, 0.2),  # the floor binds
  ],
)
def test_factor_matches_numpy_reference(mode, base_lr, target, gamma, max_factor, floor):
  params, grads = _problem()
  steps = 12
  ref = _reference(mode, _flat(params), _flat(grads), base_lr, steps, target, gamma,
                   max_factor, floor)  # fmt: skip
  tx = optax.chain(
    optax.sgd(base_lr),
    ratio_adaptive_lr(target, gamma, max_factor, floor, mode=mode, base_learning_rate=base_lr),
  )
  got = _run(tx, params, grads, steps)
  factors = []
  for k, ((f_ref, _, r_ref), (updates, f, state)) in enumerate(zip(ref, got, strict=True)):
    np.testing.assert_allclose(float(f), f_ref, rtol=2e-4, err_msg=f"step {k} factor")
    np.testing.assert_allclose(
      float(optax.tree.get(state, "effective_learning_rate")), base_lr * f_ref, rtol=2e-4
    )
    # The ratios after update k are those up to update k − 1 (measured on the weights
    # each update produced, when the next update arrives).
    _, m_prev, r_prev = ref[k - 1] if k else (None, 0.0, dict.fromkeys(r_ref, 0.0))
    np.testing.assert_allclose(float(optax.tree.get(state, "mean_ratio")), m_prev, rtol=2e-4)
    ratios = optax.tree.get(state, "ratios")
    assert set(ratios) == {"a/kernel", "b/kernel"}  # biases do not count
    for name, v in r_prev.items():
      np.testing.assert_allclose(float(ratios[name]), v, rtol=2e-4, err_msg=name)
    # Every leaf (biases too) is scaled by the applied factor.
    np.testing.assert_allclose(
      np.asarray(updates["a"]["bias"]),
      -base_lr * f_ref * np.asarray(grads["a"]["bias"]),
      rtol=2e-4,
    )
    factors.append(float(f))
  lo = 0.0 if floor is None else floor
  hi = np.inf if max_factor is None else max_factor
  assert all(lo - 1e-6 <= f <= hi * (1 + 1e-6) for f in factors[1:])
  if max_factor == 20.0:
    assert max(factors) == pytest.approx(20.0)
  if floor == 0.2:
    assert min(factors) == pytest.approx(0.2)


def test_hand_computed_first_steps():
  """One 2×2 layer of ones, gradient of ones, SGD at η: every step by hand."""
  eta, t, g = 0.1, 1e-3, 0.9
  params = {"w": jnp.ones((2, 2))}
  grads = {"w": jnp.ones((2, 2))}
  # Step 0: factor 1, W: 1 → 0.9, R0 = ‖0.1‖/‖0.9‖ = 1/9.
  r0 = 0.1 / 0.9
  # mode "code": steps 0 and 1 use factor 1 (lag); step 2 uses t / (γ R0).
  got = _run(optax.chain(optax.sgd(eta), ratio_adaptive_lr(t, g)), params, grads, 3)
  assert [float(f) for _, f, _ in got] == pytest.approx([1.0, 1.0, t / (g * r0)], rel=1e-5)
  # mode "thesis": step 1 uses t / R0 (the two-tap average of R0 with itself).
  got = _run(optax.chain(optax.sgd(eta), ratio_adaptive_lr(t, g, mode="thesis")), params, grads, 2)
  assert [float(f) for _, f, _ in got] == pytest.approx([1.0, t / r0], rel=1e-5)


def test_thesis_mode_hits_target_in_closed_form():
  """W and g parallel, raw ratios (γ = 1): from step 1 on, η_k = t‖W_k‖/‖g‖ exactly.

  ``η_{k+1} = η_k t / R_k`` with ``R_k = η_k‖g‖ / (‖W_k‖ − η_k‖g‖)`` gives
  ``η_{k+1} = t‖W_{k+1}‖/‖g‖`` and then ``R_{k+1} = t / (1 − t)``.
  """
  t = 1e-3
  w = np.full((4, 4), 2.0)
  g = np.full((4, 4), 0.5)
  got = _run(
    optax.chain(optax.sgd(1.0), ratio_adaptive_lr(t, 1.0, None, mode="thesis")),
    {"w": w},
    {"w": g},
    8,
  )
  for k, (updates, _, state) in enumerate(got):
    if k >= 1:
      lr = float(optax.tree.get(state, "effective_learning_rate"))
      assert lr == pytest.approx(t * np.linalg.norm(w) / np.linalg.norm(g), rel=1e-5)
    if k >= 2:  # the ratio of update k − 1, the first made at the steered rate
      assert float(optax.tree.get(state, "mean_ratio")) == pytest.approx(t / (1 - t), rel=1e-5)
    w = w + np.asarray(updates["w"], np.float64)


# --------------------------------------------------------------------------- edge cases


def test_zero_updates_and_zero_weights_stay_finite():
  params = {"w": jnp.zeros((3, 3)), "v": jnp.ones((2, 2))}
  zero = {"w": jnp.zeros((3, 3)), "v": jnp.zeros((2, 2))}
  for mode in ("code", "thesis"):
    tx = optax.chain(optax.sgd(0.1), ratio_adaptive_lr(mode=mode))
    got = _run(tx, params, zero, 5)
    for updates, f, state in got:
      assert float(f) == 1.0  # documented fallback: mean ratio 0 → factor 1 / unchanged
      assert all(np.isfinite(v) for v in jax.tree.leaves(ratio_lr_values(state)))
      # Zero weights: the layer keeps its previous (initial) ratio.
      assert float(optax.tree.get(state, "ratios")["w"]) == 0.0
      np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)


def test_nan_gradient_does_not_poison_the_factor():
  params = {"w": jnp.ones((2, 2)), "v": jnp.ones((2, 2))}
  tx = optax.chain(optax.sgd(0.1), ratio_adaptive_lr(mode="thesis"))
  state = tx.init(params)
  ok = {"w": jnp.ones((2, 2)), "v": jnp.ones((2, 2))}
  _, state = tx.update(ok, state, params)
  bad = {"w": jnp.full((2, 2), jnp.nan), "v": jnp.ones((2, 2))}
  updates, state = tx.update(bad, state, params)  # folds in the first (good) ratio
  good = float(optax.tree.get(state, "ratios")["w"])
  assert good > 0
  assert np.isnan(np.asarray(updates["w"])).all()  # divergence is not hidden
  _, state = tx.update(ok, state, params)  # the NaN update's ratio: not learnt from
  assert float(optax.tree.get(state, "ratios")["w"]) == good
  f = float(optax.tree.get(state, "factor"))
  assert np.isfinite(f) and f > 0


def test_state_structure_is_fixed_and_works_in_scan():
  params, grads = _problem(1)
  params = jax.tree.map(jnp.asarray, params)
  grads = jax.tree.map(jnp.asarray, grads)
  tx = ratio_adaptive_sgd(0.1, mode="code")
  s0 = tx.init(params)
  _, s1 = tx.update(grads, s0, params)
  assert jax.tree.structure(s0) == jax.tree.structure(s1)
  assert [x.dtype for x in jax.tree.leaves(s0)] == [x.dtype for x in jax.tree.leaves(s1)]

  def body(carry, _):
    p, s = carry
    u, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, u), s), optax.tree.get(s, "effective_learning_rate")

  (_, s_scan), lrs = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), length=6))(params, s0)
  p, s = params, s0
  loop = []
  for _ in range(6):
    u, s = tx.update(grads, s, p)
    p = optax.apply_updates(p, u)
    loop.append(float(optax.tree.get(s, "effective_learning_rate")))
  np.testing.assert_allclose(np.asarray(lrs), loop, rtol=1e-5)
  np.testing.assert_allclose(float(s_scan[1].factor), float(s[1].factor), rtol=1e-5)


def test_inject_hyperparams_and_monitor():
  params = {"w": jnp.ones((3, 3))}
  grads = {"w": jnp.ones((3, 3))}
  tx = optax.inject_hyperparams(ratio_adaptive_sgd)(learning_rate=0.1, target=1e-3)
  state = tx.init(params)
  for _ in range(3):
    _, state = jax.jit(tx.update)(grads, state, params)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
  # In code mode the factor is target / mean ratio: doubling the injected target
  # doubles the factor of that very update.
  doubled = state._replace(hyperparams={**state.hyperparams, "target": jnp.asarray(2e-3)})
  _, a = tx.update(grads, state, params)
  _, b = tx.update(grads, doubled, params)
  fa = float(optax.tree.get(a, "factor"))
  assert float(optax.tree.get(b, "factor")) == pytest.approx(2 * fa, rel=1e-6)
  # Inside a monitored chain the monitor sees the scaled updates and both states coexist.
  from jaxscope.metrics import scope

  mon = transforms.monitored(ratio_adaptive_sgd(0.1), scope(updates=["norm"]))
  ms = mon.init(params)
  for _ in range(3):
    upd, ms = mon.update(grads, ms, params)
  vals = transforms.monitored_metrics(ms)
  assert float(vals["updates/norm/w"]) == pytest.approx(float(jnp.linalg.norm(upd["w"])), rel=1e-6)
  assert set(ratio_lr_values(ms)) == {"lr", "ratio_lr/factor", "ratio_lr/mean_ratio",
                                      "ratio_lr/ratio/w"}  # fmt: skip


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"target": 0.0}, "target"),
    ({"target": float("nan")}, "target"),
    ({"smoothing": 0.0}, "smoothing"),
    ({"smoothing": 1.5}, "smoothing"),
    ({"max_factor": -1.0}, "max_factor"),
    ({"floor": -1.0}, "floor"),
    ({"floor": 10.0, "max_factor": 5.0}, "floor"),
    ({"mode": "paper"}, "mode"),
    ({"base_learning_rate": 0.0}, "base_learning_rate"),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ratio_adaptive_lr(**kwargs)


def test_errors_name_what_is_wrong():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  tx = ratio_adaptive_lr()
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(params, state)
  with pytest.raises(ValueError, match="matches no leaf"):
    ratio_adaptive_lr(layers="conv").init(params)
  with pytest.raises(ValueError, match="different tree structures"):
    tx.update({"w": jnp.ones((2, 2))}, state, params)
  with pytest.raises(ValueError, match="a number"):
    ratio_adaptive_sgd(optax.constant_schedule(0.1))
  with pytest.raises(ValueError, match="target"):
    scale_to_update_ratio(-1.0)
  with pytest.raises(ValueError, match="needs the parameters"):
    scale_to_update_ratio().update(params, optax.EmptyState())


# --------------------------------------------------------------------------- FixedRatioSGD


def test_scale_to_update_ratio_hits_target_exactly():
  rng = np.random.default_rng(3)
  params = {
    "k": jnp.asarray(rng.normal(size=(5, 3))),
    "b": jnp.zeros(3),
    "s": jnp.asarray(rng.normal(size=4)),
  }
  grads = {
    "k": jnp.asarray(rng.normal(size=(5, 3))),
    "b": jnp.asarray(rng.normal(size=3)),
    "s": jnp.zeros(4),
  }
  tx = optax.chain(optax.sgd(0.7), scale_to_update_ratio(2e-3))
  updates, _ = tx.update(grads, tx.init(params), params)
  k_ref = -(2e-3 * np.linalg.norm(params["k"]) / np.linalg.norm(grads["k"])) * np.asarray(
    grads["k"]
  )
  np.testing.assert_allclose(np.asarray(updates["k"]), k_ref, rtol=1e-5)
  # All-zero parameters pass the incoming update through; a zero update stays zero.
  np.testing.assert_allclose(np.asarray(updates["b"]), -0.7 * np.asarray(grads["b"]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(updates["s"]), 0.0)
  # Leaves not selected pass through unchanged.
  tx = optax.chain(optax.sgd(0.7), scale_to_update_ratio(2e-3, kind="kernel"))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["b"]), -0.7 * np.asarray(grads["b"]), rtol=1e-6)


# --------------------------------------------------------------------------- real training


def _digits_run(tx, steps=240, seed=0):
  from jaxscope import data, models

  ds = data.load("digits")
  m = models.build("mlp", ds.train_x.shape[1:], ds.num_classes)
  params = m.init(jax.random.key(seed), jnp.asarray(ds.train_x[:1]))["params"]
  state = tx.init(params)
  x_all, y_all = jnp.asarray(ds.train_x), jnp.asarray(ds.train_y)

  def body(carry, idx):
    p, s = carry

    def loss(p):
      out, _ = m.apply({"params": p}, x_all[idx], train=True)
      return optax.softmax_cross_entropy_with_integer_labels(out, y_all[idx]).mean()

    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    v = ratio_lr_values(s)
    return (optax.apply_updates(p, u), s), (v["ratio_lr/mean_ratio"], v["ratio_lr/factor"])

  idx = jax.random.randint(jax.random.key(seed), (steps, 64), 0, len(ds.train_x))
  _, (ratios, factors) = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), idx))(params, state)
  return np.asarray(ratios), np.asarray(factors)


@pytest.mark.slow
def test_mean_ratio_converges_toward_target_on_digits():
  target = 1e-3

  def gm(x):
    return float(np.exp(np.mean(np.log(x[-80:]))))

  # Thesis mode: the mean ratio settles at the target.
  ratios, _ = _digits_run(ratio_adaptive_sgd(0.5, target, mode="thesis"))
  assert ratios[1] > 5 * target  # lr 0.5 starts far above the target (ratios lag a step)
  assert abs(np.log(gm(ratios) / target)) < np.log(1.2)
  # Code mode: f = t / r̄ where r̄ already carries f, so the fixed point is
  # R* = sqrt(t · R_base), R_base = R / f the ratio the base rate would give.
  ratios, factors = _digits_run(ratio_adaptive_sgd(0.5, target, mode="code"))
  base = ratios[1:] / factors[:-1]  # the ratios after update k are those of update k − 1
  assert gm(ratios) == pytest.approx(np.sqrt(target * gm(base)), rel=0.05)
  assert target < gm(ratios) < 0.5 * gm(base)


# --------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_train_and_cli_schedule_ratio(tmp_path):
  from jaxscope import cli

  out = tmp_path / "run"
  rc = cli.main(
    ["train", "--model", "mlp", "--dataset", "digits", "--steps", "30", "--optimizer", "sgd",
     "--lr", "0.2", "--schedule", "ratio", "--ratio-target", "2e-3", "--ratio-smoothing",
     "0.8", "--ratio-max-factor", "none", "--ratio-mode", "thesis", "--metrics", "none",
     "--out", str(out), "--no-plots", "-q"]
  )  # fmt: skip
  assert rc == 0
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  steps = [r["values"] for r in rows if "lr" in r["values"]]
  assert len(steps) == 30
  assert steps[0]["lr"] == pytest.approx(0.2)
  for v in steps:
    assert v["lr"] == pytest.approx(0.2 * v["ratio_lr/factor"], rel=1e-6)
    assert {"ratio_lr/mean_ratio", "ratio_lr/ratio/fc1/kernel"} <= set(v)
  assert abs(np.log(steps[-1]["ratio_lr/mean_ratio"] / 2e-3)) < np.log(2.0)
  config = json.loads((out / "config.json").read_text())
  assert config["schedule"] == "ratio" and config["ratio_mode"] == "thesis"
  assert config["ratio_max_factor"] is None
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--schedule", "ratio", "--ratio-max-factor", "lots", "--out",
              str(tmp_path / "x")])  # fmt: skip
  assert e.value.code == 2


def test_state_type_is_exported():
  state = ratio_adaptive_lr().init({"w": jnp.ones((2, 2))})
  assert isinstance(state, RatioAdaptiveState)


def test_init_state_can_be_donated():
  # Every leaf of the initial state is its own buffer (donating a shared one fails).
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones((3, 2))}
  tx = ratio_adaptive_sgd(0.1)
  state = tx.init(params)
  leaves = jax.tree.leaves(state)
  assert len({id(x) for x in leaves}) == len(leaves)
  step = jax.jit(lambda s, p: tx.update(p, s, p), donate_argnums=0)
  _, state = step(state, params)
  assert int(optax.tree.get(state, "count")) == 1
