"""benchmarks/costs.py: the XLA-floor programs compute the sums the scope's rows are made of."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import costs, floors, problems


def test_xla_floor_program_computes_the_economy_sums_the_scope_reports():
  problem = problems.mnist_mlp()
  step, state = costs.xla_floor_step(problem, "scope/economy")
  params64 = [np.asarray(x, np.float64) for x in jax.tree.leaves(problem.params)]
  grads = jax.grad(problem.loss)(problem.params, problem.x, problem.y)
  grads64 = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  updates64 = [-costs.LEARNING_RATE * g for g in grads64]
  _, _, (_, sums) = step(*state, problem.x, problem.y)
  want = [f(x) for t in (params64, grads64, updates64) for x in t for f in (np.sum, _sumsq)]
  np.testing.assert_allclose(np.asarray(sums), want, rtol=2e-4, atol=1e-6)
  # The scope's step measures the same tensors: its norms are the square roots of the
  # floor program's Σx² (same parameters, same batch).
  sc_step, sc_state = costs.scope_step(problem, costs.metrics.scope(preset="economy"))
  _, _, (_, values) = sc_step(*sc_state, problem.x, problem.y)
  names = [n for n in sorted(values) if n.startswith("grads/norm/")]
  assert len(names) == len(grads64) == 8
  np.testing.assert_allclose(
    [values[n] for n in names], [np.sqrt(_sumsq(g)) for g in grads64], rtol=2e-4
  )


def _sumsq(x: np.ndarray) -> float:
  return float(np.sum(np.square(x)))


def test_ratio_lr_floor_reads_each_kernel_and_leaves_the_update_unchanged():
  from benchmarks import ratio_lr

  rng = np.random.default_rng(0)
  params = {
    "Dense_0": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,))},
    "Dense_1": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=(2,))},
  }
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  updates = jax.tree.map(lambda x: 0.1 * x + 1.0, params)
  tx = ratio_lr.xla_floor()
  out, sums = jax.jit(tx.update)(updates, tx.init(params), params)
  want = [_sumsq(t[k]["kernel"]) for k in ("Dense_0", "Dense_1") for t in (updates, params)]
  np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(updates), strict=True):
    np.testing.assert_array_equal(a, b)


def test_full_floor_program_computes_what_the_full_scope_is_made_of():
  from benchmarks import scope_floor

  problem = problems.mnist_mlp()
  step, state = scope_floor.full_step(problem, costs.LEARNING_RATE)
  params64 = [np.asarray(x, np.float64) for x in jax.tree.leaves(problem.params)]
  _, _, (_, sums, counts, spectral) = step(*state, problem.x, problem.y)
  n = len(params64)
  assert sums.shape == (3 * 2 * n + 3 * n,) and counts.shape == (3 * n, scope_floor.BINS)
  np.testing.assert_allclose(np.asarray(sums[: 2 * n : 2]), [x.sum() for x in params64], rtol=2e-4)
  # Per leaf, after the moments: Σ(θ' − θ)², lost and moving coordinates (u ≠ 0).
  grads = jax.grad(problem.loss)(problem.params, problem.x, problem.y)
  moving = [int(np.count_nonzero(np.asarray(g))) for g in jax.tree.leaves(grads)]
  np.testing.assert_array_equal(np.asarray(sums[6 * n + 2 :: 3]), moving)
  # Every sampled element is counted once: the scope's histogram of the same leaf (a
  # strided sample of the same size) counts as many.
  sc_step, sc_state = costs.scope_step(problem, costs.metrics.scope(preset="full"))
  _, _, (_, values) = sc_step(*sc_state, problem.x, problem.y)
  hist = [k for k in values if k.startswith("params/histogram_counts/")]
  assert len(hist) == n
  np.testing.assert_array_equal(
    np.asarray(counts[:n]).sum(1), [int(np.asarray(values[k]).sum()) for k in hist]
  )
  # One power-iteration pair from a flat start: ‖WᵀW v‖ ≤ σ_max², and above 0.
  kernels = [x for x in params64 if x.ndim == 2]
  sigma = [np.linalg.norm(w, 2) for w in kernels]
  assert np.all(np.asarray(spectral) <= np.square(sigma) * (1 + 1e-4))
  assert np.all(np.asarray(spectral) > 0)


def test_floors_only_reports_each_rows_floor_against_its_timed_base():
  report = costs.floors_only(["mnist_mlp"], reps=1, which="scope")
  r = report["problems"]["mnist_mlp"]
  assert report["floors_only"] and set(r["base_ms"]) == {"bare", "loss"}
  rows = {row["measurement"]: row for row in r["rows"]}
  assert "scope/economy" in rows and not any(k.startswith("xla_floor/") for k in rows)
  econ = rows["scope/economy"]
  want = costs.floor_ms(costs.floor("scope/economy", r["facts"]), r["rates"])
  np.testing.assert_allclose(econ["floor_ms"], want)
  assert econ["base"] == "bare"
  np.testing.assert_allclose(
    econ["floor_step_ratio"], (r["base_ms"]["bare"] + want) / r["base_ms"]["bare"]
  )


def test_preset_floor_counts_the_shared_hutchinson_probes_once():
  # hess_trace, tic_diag and tic_trace read the same k probes' HVPs (one streamed pass):
  # a preset with all three pays k HVPs and one second moment, not 3k HVPs.
  facts = {
    "P": 1000,
    "B": 8,
    "kernels": [{"layer": "d", "size": 900, "d_in": 30, "d_out": 30, "positions": 1}],
    "leaf_sizes": [900, 30, 70],
    "F_hvp": 1e6,
  }
  k = 8
  hvps = k * facts["F_hvp"]
  second_moment = 2 * 8 * 900  # Σ 2B T_l n_l
  parts = floors._preset_parts(["hess_trace", "tic_diag", "tic_trace"], costs_table(facts, k))
  assert floors._sum_floors(parts)["flops"] == hvps + second_moment
  parts = floors._preset_parts(["tic_diag"], costs_table(facts, k))
  assert floors._sum_floors(parts)["flops"] == hvps + second_moment
  parts = floors._preset_parts(["hess_trace", "hess_max_ev"], costs_table(facts, k))
  assert floors._sum_floors(parts)["flops"] == hvps + facts["F_hvp"]


def costs_table(facts: dict, k: int) -> dict:
  """The per-quantity floors ``{name: (flops, bytes)}`` of :func:`floors.floor`."""
  names = ["hess_trace", "tic_diag", "tic_trace", "hess_max_ev", "grad_variance"]
  return {n: tuple(floors.floor(n, facts, k_probes=k).values()) for n in names}


def test_hvp_floor_program_sums_each_probes_quadratic_form_of_the_dense_hessian():
  import flax.linen as nn
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree

  from benchmarks import hvp_floor

  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(1), (5, 4))
  y = jnp.array([0, 1, 2, 1, 0])
  params = model.init(jax.random.key(2), x)["params"]
  problem = problems.Problem("tiny", model, params, x, y, 1)
  step, state = hvp_floor.hvps_step(problem, 3, 0.0)
  total = float(step(*state, x, y)[2])
  flat, unravel = ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda f: problem.loss(unravel(f), x, y))(flat), np.float64)
  zs = [np.asarray(ravel_pytree(hvp_floor.probe(params, i))[0], np.float64) for i in range(3)]
  assert all(set(np.unique(z)) == {-1.0, 1.0} for z in zs)
  np.testing.assert_allclose(total, sum(z @ h @ z for z in zs), rtol=1e-5)
  # Products per row: the shared probes once, the power vector's one.
  assert hvp_floor.hvp_count(["hess_trace", "tic_diag", "alpha"], 8) == 8
  assert hvp_floor.hvp_count(["tic_trace", "hess_max_ev"], 8) == 9
  assert hvp_floor.hvp_count(["hess_max_ev"], 8) == 1
  assert hvp_floor.hvp_count(["alpha"], 8) == 0


def test_hvp_rows_are_set_against_timed_products_plus_the_rest_of_their_floor():
  facts = {"F_hvp": 2e9}
  rates = {"R_mm_gflops": 100.0, "R_red_gbps": 10.0}
  # business: 8 products (16 ms at the roofline) + 1 GFLOP of the rest (10 ms).
  rows = [
    {"measurement": "instruments/business", "floor_flops": 17e9, "floor_bytes": 0.0,
     "extra_ms": 200.0},
    {"measurement": "alpha", "floor_flops": 1e9, "floor_bytes": 0.0, "extra_ms": 3.0},
  ]  # fmt: skip
  costs._hvp_floors(rows, facts, rates, hvps_extra_ms=80.0)
  assert rows[0]["xla_floor_extra_ms"] == 8 * 10.0 + 10.0
  assert rows[0]["extra_over_xla_floor"] == 200.0 / 90.0
  assert "xla_floor_extra_ms" not in rows[1]


def test_rows_keep_only_the_named_rows_and_the_base_steps():
  problem = problems.mnist_mlp()
  kept = costs.variants(problem, "instruments", ["instruments/business", "xla_floor/hvps"])
  assert set(kept) == {"bare", "loss", "instruments/business", "xla_floor/hvps"}
  with pytest.raises(ValueError, match="instruments/business"):
    costs.variants(problem, "scope", ["instruments/business"])


@pytest.mark.slow
def test_compiler_options_memory_children_compile_with_their_option():
  """Each fresh process of ``benchmarks/compiler_options.py --memory`` compiles the step
  with its own option: its XLA temporaries are the ones the option gives in this process."""
  from benchmarks import compiler_options as co

  rows = co.memory_rows(["mnist_mlp:bare:1"])
  assert [r["option"] for r in rows] == list(co.OPTIONS)
  problem = problems.mnist_mlp()
  for r in rows:
    assert r["rss_before_mb"] < r["rss_after_compile_mb"] <= r["peak_rss_mb"]
    assert r["temp_mb"] == pytest.approx(co.temp_mb(problem, None, r["option"]), abs=0.05)
  temps = {r["option"]: r["temp_mb"] for r in rows}
  assert temps["fewer_copies"] < temps["default"]  # The bare step's kernel copies (README).


def test_economy_floor_program_computes_what_the_economy_instruments_are_made_of():
  # On a tiny MLP: per-example gradients by vmap(grad), reduced in float64, against the
  # floor program's sums, variances and histogram counts (a given last update). The first
  # layer's projections on the gradient go through Gram matrices, the second's through
  # the contraction.
  import flax.linen as nn
  import jax.numpy as jnp
  import optax

  from benchmarks import economy_floor
  from jaxscope.metrics.histograms import histogram_sample

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
      h = nn.relu(nn.Dense(16)(x))  # Dense_0 (through Gram matrices), then Dense_1
      return nn.Dense(3)(h)

  model = Tiny()
  x = jax.random.normal(jax.random.key(1), (5, 12))
  y = jnp.array([0, 1, 2, 1, 0])
  params = model.init(jax.random.key(2), x)["params"]
  problem = problems.Problem("tiny", model, params, x, y, 1)
  lr = 0.1
  step, (p, o, _, init) = economy_floor.economy_step(problem, lr, hist_sample=20)
  prev = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)
  d = np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(prev)])
  _, _, _, _, (sums, stats, counts) = step(p, o, prev, init, x, y)  # prev is donated

  def example_loss(q: dict, xi: jax.Array, yi: jax.Array) -> jax.Array:
    logits = model.apply({"params": q}, xi[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

  per = jax.vmap(jax.grad(example_loss), (None, 0, 0))(params, x, y)
  gi = np.concatenate([np.asarray(a, np.float64).reshape(5, -1) for a in jax.tree.leaves(per)], 1)
  g = gi.mean(0)
  leaves = [np.asarray(a, np.float64).reshape(5, -1) for a in jax.tree.leaves(per)]
  grad_sq = [float(np.sum(np.square(a.mean(0)))) for a in leaves]
  np.testing.assert_allclose(np.asarray(sums[:4]), grad_sq, rtol=1e-5)  # ‖g‖² per leaf
  np.testing.assert_allclose(np.asarray(sums[4:8]), np.multiply(lr**2, grad_sq), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sums[8:]), 0.0, atol=0)  # at init: no distance
  losses = np.asarray(jax.vmap(example_loss, (None, 0, 0))(params, x, y), np.float64)
  want = [losses.mean(), losses.var(), (gi @ g).var(), (gi @ d).var(), np.mean(np.sum(gi**2, 1))]
  np.testing.assert_allclose(np.asarray(stats), want, rtol=1e-4)
  # Every sampled entry is counted once, in its leaf's row of the table.
  sample = histogram_sample(params, 20)
  table = np.asarray(counts).reshape(4, economy_floor.BINS)
  np.testing.assert_array_equal(table.sum(1), [5 * s for s in sample.leaf_sampled])
  lo, hi = economy_floor.RANGE
  for k, (a, idx) in enumerate(zip(leaves, sample.indices, strict=True)):
    entries = np.asarray(a[:, idx], np.float32).ravel()
    binned = np.clip(np.floor((entries - lo) * (economy_floor.BINS / (hi - lo))), 0, 99)
    expected = np.bincount(binned.astype(int), minlength=economy_floor.BINS)
    assert np.abs(table[k] - expected).sum() <= 2  # an entry within rounding of an edge


def test_profile_step_sums_each_operation_per_step_and_names_its_origin():
  from benchmarks import profile_step

  events = [
    {"ph": "X", "name": "dot.1", "dur": 30.0, "tid": 1},
    {"ph": "X", "name": "dot.1", "dur": 50.0, "tid": 2},
    {"ph": "X", "name": "copy.3", "dur": 4.0, "tid": 1},
    {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 999.0, "tid": 1},  # runtime
    {"ph": "X", "name": "end: dot.1", "dur": 1.0, "tid": 1},  # marker
    {"ph": "i", "name": "dot.1", "tid": 1},  # no duration
  ]
  t = profile_step.operation_times(events, steps=2)
  assert t["ops"] == {"dot.1": (40.0, 1.0), "copy.3": (2.0, 0.5)}
  assert t["threads"] == {"1": 17.0, "2": 25.0} and t["small"] == (0.5, 2.0)
  with pytest.raises(ValueError, match="steps"):
    profile_step.operation_times(events, steps=0)
  hlo = '  %dot.1 = f32[8,4]{1,0} dot(%a, %b), metadata={op_name="jit(step)/Dense_0/dot_general"}'
  assert profile_step.hlo_origin(hlo, "dot.1") == "f32[8,4]{1,0}  jit(step)/Dense_0/dot_general"
  assert profile_step.hlo_origin(hlo, "dot.12") == ""


@pytest.mark.slow
def test_profile_step_traces_the_bare_step_of_the_mlp():
  from benchmarks import profile_step

  report = profile_step.profile("mnist_mlp", "bare", steps=2, warmup=1)
  origins = " ".join(op["origin"] for op in report["ops"])
  assert "Dense_0" in origins and report["ops"][0]["us_per_step"] > 0
  assert report["thread_busy_us"][0] > 0
  with pytest.raises(ValueError, match="not rows"):
    profile_step.profile("mnist_mlp", "no_such_row", steps=1, warmup=0)
