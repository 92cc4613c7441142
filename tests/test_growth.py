"""The growth controller: plateau → expansion → freezing, inside a jitted train step."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxscope import transforms
from jaxscope.models import capacity as cap
from jaxscope.models import growth


def _model(widths: tuple[int, ...] = (8, 6), chunks: int = 2) -> tuple:
  model = cap.CapacityMLP(widths=widths, chunks=chunks, num_outputs=1)
  variables = model.init(jax.random.key(0), jnp.zeros((4, 3)))
  return model, variables["params"], variables["capacity"]


def _plateau_steps(values: list[float], patience: int, smoothing: float) -> list[int]:
  """The steps at which the plateau rule fires, re-implemented in plain Python."""
  avg, best, since, fired = None, float("inf"), 0, []
  for i, v in enumerate(values):
    avg = v if avg is None else smoothing * v + (1 - smoothing) * avg
    if avg < best:
      best, since = avg, 0
    else:
      since += 1
    if since >= patience:
      fired.append(i)
      since, best = 0, avg
  return fired


@pytest.mark.slow
def test_policy_all_grows_every_layer_on_the_plateau_and_freezes_the_old_chunks() -> None:
  _, params, capacity = _model()
  state = growth.growth_init(params, capacity)
  values = [5.0 - 0.5 * i for i in range(6)] + [2.0] * 10
  expected = _plateau_steps(values, patience=3, smoothing=1.0)
  assert expected  # the curve has a plateau
  fired = []
  step = jax.jit(
    lambda s, v, p, c, k: growth.growth_update(
      s, value=v, params=p, capacity=c, key=k, patience=3, smoothing=1.0
    )
  )
  for i, v in enumerate(values):
    before = params
    params, capacity, state = step(state, v, params, capacity, jax.random.key(i))
    if bool(state.expanded):
      fired.append(i)
      # Only the new chunk's columns changed (re-initialised), the rest is untouched.
      k_new = np.asarray(params["CapacityDense_0"]["kernel"])
      k_old = np.asarray(before["CapacityDense_0"]["kernel"])
      np.testing.assert_array_equal(k_new[:, :4], k_old[:, :4])
      assert not np.array_equal(k_new[:, 4:], k_old[:, 4:])
  # Two chunks per layer: the first plateau grows both layers to full, later ones do nothing.
  assert fired == expected[:1]
  vals = growth.growth_values(state, capacity)
  assert int(vals["capacity/active/CapacityDense_0"]) == 2
  assert int(vals["capacity/active/CapacityDense_1"]) == 2
  assert int(vals["capacity/frozen/CapacityDense_0"]) == 1
  assert int(vals["capacity/expansions"]) == 1


def test_activation_std_policy_grows_the_layer_with_the_highest_std() -> None:
  _, params, capacity = _model(chunks=2)
  state = growth.growth_init(params, capacity)
  stds = {"CapacityDense_0": jnp.float32(0.3), "CapacityDense_1": jnp.float32(0.9)}
  # Constant values, patience 2: plateaus at steps 2 and 5 (the first value after an
  # expansion restarts the rule and counts as an improvement).
  for i in range(6):
    params, capacity, state = growth.growth_update(
      state,
      value=1.0,
      params=params,
      capacity=capacity,
      key=jax.random.key(i),
      policy="activation-std",
      activation_std=stds,
      patience=2,
      smoothing=1.0,
    )
  vals = growth.growth_values(state, capacity)
  # First plateau: layer 1 (highest std); it is then full, so the next plateau grows layer 0.
  assert int(vals["capacity/active/CapacityDense_1"]) == 2
  assert int(vals["capacity/active/CapacityDense_0"]) == 2
  assert int(vals["capacity/expansions"]) == 2
  with pytest.raises(ValueError, match="activation_std"):
    growth.growth_update(
      state, value=1.0, params=params, capacity=capacity, key=jax.random.key(0),
      policy="activation-std",
    )  # fmt: skip
  with pytest.raises(ValueError, match="policy"):
    growth.growth_update(
      state, value=1.0, params=params, capacity=capacity, key=jax.random.key(0), policy="x"
    )


@pytest.mark.slow
def test_training_with_growth_freezes_old_chunks_and_never_retraces() -> None:
  model, params, capacity = _model(widths=(12,), chunks=3)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-2, 2, size=(64, 3)), jnp.float32)
  y = jnp.sin(x.sum(1, keepdims=True))
  tx = transforms.masked_freeze(optax.adam(0.05))
  opt_state = tx.init(params)
  gstate = growth.growth_init(params, capacity)
  traces = [0]

  @jax.jit
  def step(params, opt_state, capacity, gstate, key):
    traces[0] += 1

    def loss_fn(p):
      out = model.apply({"params": p, "capacity": capacity}, x)
      return jnp.mean((out - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    mask = growth.trainable(params, capacity, gstate)
    updates, opt_state = tx.update(grads, opt_state, params, trainable=mask)
    params = optax.apply_updates(params, updates)
    params, capacity, gstate = growth.growth_update(
      gstate,
      value=loss,
      params=params,
      capacity=capacity,
      key=key,
      patience=5,
      smoothing=0.5,
      min_delta=0.05,
    )
    return params, opt_state, capacity, gstate, loss

  snapshots = []
  for i in range(120):
    prev = params
    params, opt_state, capacity, gstate, _ = step(
      params, opt_state, capacity, gstate, jax.random.key(i)
    )
    active = int(growth.growth_values(gstate, capacity)["capacity/active/CapacityDense_0"])
    frozen = int(gstate.frozen["CapacityDense_0"])
    k_prev = np.asarray(prev["CapacityDense_0"]["kernel"])
    k_now = np.asarray(params["CapacityDense_0"]["kernel"])
    if not bool(gstate.expanded):
      # Frozen chunks and inactive chunks do not move; the trainable chunk does.
      np.testing.assert_array_equal(k_now[:, : 4 * frozen], k_prev[:, : 4 * frozen])
      np.testing.assert_array_equal(k_now[:, 4 * active :], k_prev[:, 4 * active :])
      snapshots.append((frozen, active))
  assert traces[0] == 1  # expansions change arrays, not shapes: one compilation
  assert int(gstate.expansions) >= 1  # the run reached a plateau and grew
  assert (1, 2) in snapshots or (2, 3) in snapshots


def test_capacity_and_growth_state_survive_a_checkpoint(tmp_path) -> None:
  _, params, capacity = _model()
  state = growth.growth_init(params, capacity)
  for i in range(8):
    params, capacity, state = growth.growth_update(
      state, value=1.0, params=params, capacity=capacity, key=jax.random.key(i), patience=2,
      smoothing=1.0,
    )  # fmt: skip
  tree = {"params": params, "capacity": capacity, "growth": state}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "c", tree)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "c", jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  mask_a = growth.trainable(params, capacity, state)
  mask_b = growth.trainable(restored["params"], restored["capacity"], restored["growth"])
  for a, b in zip(jax.tree.leaves(mask_a), jax.tree.leaves(mask_b), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _plateau_steps_reset(
  values: list[float], patience: int, cooldown: int, chunks: int, reset: bool
) -> list[int]:
  """Expansion steps of the rule with cooldown (raw values), restarted after each expansion
  when ``reset``, re-implemented in plain Python; ``chunks - 1`` expansions at most."""
  best, since, cool, grown = float("inf"), 0, 0, []
  for i, v in enumerate(values):
    improved = v < best
    if improved:
      best = v
    in_cooldown = cool > 0
    since = 0 if improved or in_cooldown else since + 1
    cool = max(cool - 1, 0)
    if not in_cooldown and since >= patience:
      since, best, cool = 0, v, cooldown
      if len(grown) < chunks - 1:
        grown.append(i)
        if reset:
          best = float("inf")
  return grown


@pytest.mark.parametrize("reset", [True, False])
def test_detector_waits_the_cooldown_after_an_expansion(reset: bool) -> None:
  # A constructed loss: falls to 1.0 and stays (plateau); after the expansion at step 7 it
  # jumps to 3.0 and falls by 0.05 a step back to 1.0 (the new chunk training), then stays.
  values = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]
  values += [3.0 - 0.05 * k for k in range(41)] + [1.0] * 30
  patience, cooldown = 3, 10
  _, params, capacity = _model(widths=(8,), chunks=4)
  state = growth.growth_init(params, capacity)
  step = jax.jit(
    lambda s, v, p, c: growth.growth_update(
      s, value=v, params=p, capacity=c, key=jax.random.key(0), patience=patience,
      cooldown=cooldown, smoothing=1.0, reset=reset,
    )
  )  # fmt: skip
  grown = []
  for i, v in enumerate(values):
    params, capacity, state = step(state, jnp.float32(v), params, capacity)
    if bool(state.expanded):
      grown.append(i)
  assert grown == _plateau_steps_reset(values, patience, cooldown, 4, reset)
  assert grown[0] == 7  # three flat values after the last improvement (step 4)
  # Never again within the cooldown after an expansion.
  assert all(b - a > cooldown for a, b in itertools.pairwise(grown))
  if reset:
    # The falling loss keeps improving on its new level: the next plateau is the flat part
    # (first flat value at step 49, +3), then cooldown + patience later as it persists.
    assert grown == [7, 51, 64]
  else:
    # Without the restart the jump never improves on the old level: the rule fires as soon
    # as the cooldown is over, while the new chunk is still learning (the bug).
    assert grown[:2] == [7, 7 + cooldown + patience]


def test_cooldown_at_the_start() -> None:
  # Constant values, patience 2, cooldown 3 from growth_init: values 0-2 are the cooldown,
  # 3 and 4 the counted steps without improvement, so the first plateau is at step 4 (without
  # the initial cooldown: at step 2, hand-traced in plateau_update's docstring).
  _, params, capacity = _model(widths=(8,), chunks=4)
  step = jax.jit(
    lambda s, p, c: growth.growth_update(
      s, value=1.0, params=p, capacity=c, key=jax.random.key(0), patience=2, cooldown=3,
      smoothing=1.0,
    )
  )  # fmt: skip
  for cooldown, want in ((3, 4), (0, 2)):
    state = growth.growth_init(params, capacity, cooldown=cooldown)
    p, c, grown = params, capacity, []
    for i in range(5):
      p, c, state = step(state, p, c)
      if bool(state.expanded):
        grown.append(i)
    assert grown[0] == want
  with pytest.raises(ValueError, match="cooldown must be a non-negative integer, got -1"):
    growth.growth_init(params, capacity, cooldown=-1)


def test_reset_reinitialises_the_moving_average() -> None:
  _, params, capacity = _model(widths=(8,), chunks=4)
  for reset, want in ((True, 3.0), (False, 0.5 * 3.0 + 0.5 * 1.0)):
    state = growth.growth_init(params, capacity)
    p, c = params, capacity
    for v in (1.0, 1.0, 1.0, 3.0):  # patience 2: the plateau fires at the third value
      p, c, state = growth.growth_update(
        state, value=v, params=p, capacity=c, key=jax.random.key(0), patience=2, smoothing=0.5,
        reset=reset,
      )  # fmt: skip
    assert int(state.expansions) == 1
    np.testing.assert_allclose(float(state.plateau.average), want)


@pytest.mark.slow
@pytest.mark.parametrize("reinit", [False, True])
def test_reinit_false_keeps_the_predrawn_chunk_and_the_output_bias_trains(reinit: bool) -> None:
  model = cap.CapacityMLP(widths=(8,), chunks=4, num_outputs=1, kernel_init="glorot_uniform")
  variables = model.init(jax.random.key(0), jnp.zeros((4, 3)))
  params, capacity = variables["params"], variables["capacity"]
  params0 = params
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-2, 2, size=(32, 3)), jnp.float32)
  y = jnp.sin(x.sum(1, keepdims=True))
  tx = transforms.masked_freeze(optax.adam(0.05))
  opt_state = tx.init(params)
  gstate = growth.growth_init(params, capacity)

  @jax.jit
  def step(params, opt_state, capacity, gstate, value):
    def loss_fn(p):
      return jnp.mean((model.apply({"params": p, "capacity": capacity}, x) - y) ** 2)

    grads = jax.grad(loss_fn)(params)
    mask = growth.trainable(params, capacity, gstate)
    updates, opt_state = tx.update(grads, opt_state, params, trainable=mask)
    params = optax.apply_updates(params, updates)
    params, capacity, gstate = growth.growth_update(
      gstate, value=value, params=params, capacity=capacity, key=jax.random.key(7),
      patience=2, smoothing=1.0, reinit=reinit, init="glorot_uniform",
    )  # fmt: skip
    return params, opt_state, capacity, gstate

  # The constructed value falls for 5 steps, then is flat: the plateau fires at step 6.
  values = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0]
  for v in values:
    params, opt_state, capacity, gstate = step(params, opt_state, capacity, gstate, v)
  assert bool(gstate.expanded) and int(gstate.frozen["CapacityDense_0"]) == 1
  k0 = np.asarray(params0["CapacityDense_0"]["kernel"])
  k_now = np.asarray(params["CapacityDense_0"]["kernel"])
  assert not np.array_equal(k_now[:, :2], k0[:, :2])  # the first chunk trained
  if reinit:  # re-drawn (zero bias), within Glorot's bound for the 3 x 8 kernel
    assert not np.any(k_now[:, 2:4] == k0[:, 2:4])
    assert np.abs(k_now[:, 2:4]).max() <= np.sqrt(6 / 11)
    np.testing.assert_array_equal(np.asarray(params["CapacityDense_0"]["bias"])[2:4], 0.0)
  else:  # the weights the full-width initialisation drew, untouched while inactive
    np.testing.assert_array_equal(k_now[:, 2:8], k0[:, 2:8])
  # After the expansion the output bias still trains (keep="bias"); the old chunk does not.
  b_before = np.asarray(params["Dense_0"]["bias"])
  params, opt_state, capacity, gstate = step(params, opt_state, capacity, gstate, 1.0)
  assert not np.array_equal(np.asarray(params["Dense_0"]["bias"]), b_before)
  k_next = np.asarray(params["CapacityDense_0"]["kernel"])
  np.testing.assert_array_equal(k_next[:, :2], k_now[:, :2])
  assert not np.array_equal(k_next[:, 2:4], k_now[:, 2:4])
