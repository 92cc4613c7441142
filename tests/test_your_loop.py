"""jaxscope in the user's own loop (issue 20): NNX, TrainState, inject_hyperparams,
MultiSteps, multi_transform, several monitors; each against a reference computed without
the feature under test."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training.train_state import TrainState

from jaxscope import Recorder, capture, metrics, transforms

# ------------------------------------------------------------------------------------ NNX


class _Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _xy():
  k1, k2 = jax.random.split(jax.random.key(1))
  return jax.random.normal(k1, (6, 4)), jax.random.normal(k2, (6, 2))


@pytest.mark.slow
def test_nnx_capture_equals_nnx_value_and_grad_and_carries_state():
  x, y = _xy()
  ref_model, model = _Net(nnx.Rngs(0)), _Net(nnx.Rngs(0))

  @nnx.jit
  def ref(m):
    return nnx.value_and_grad(_nnx_loss)(m, x, y)

  @nnx.jit
  def ours(m):
    return capture.value_and_grad(_nnx_loss)(m, x, y)

  for _ in range(2):  # The second call sees the BatchNorm statistics and RNG counts of the first.
    lv, lg = ref(ref_model)
    v, g, captured = ours(model)
    np.testing.assert_allclose(v, lv, rtol=1e-6)
    assert isinstance(g, nnx.State)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), g, lg)
  # The non-differentiated state was written back as NNX's own transform writes it.
  np.testing.assert_allclose(model.bn.mean[...], ref_model.bn.mean[...], rtol=1e-6)
  np.testing.assert_allclose(model.bn.mean[...] != 0, True)
  assert int(model.drop.rngs.count[...]) == int(ref_model.drop.rngs.count[...]) == 2
  assert sorted(captured.outputs) == ["bn", "l1", "l2"]
  # ∂L/∂(output of l2) by hand: 2 (ŷ − y) / N.
  yhat = captured.outputs["l2"]
  np.testing.assert_allclose(captured.grads["l2"], 2 * (yhat - y) / y.size, rtol=1e-5)


def test_nnx_optimizer_monitored_matches_numpy():
  x, y = _xy()
  model = _Net(nnx.Rngs(0))
  model.eval()  # Deterministic: the reference below recomputes the step in numpy.
  tx = transforms.monitored(optax.sgd(0.1), metrics.scope(preset="economy", network=["loss"]))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  w0 = np.asarray(model.l1.kernel[...], np.float64)
  loss0 = float(_nnx_loss(model, x, y))  # eval mode: the step's forward pass gives the same.

  @nnx.jit
  def step(m, o):
    loss, grads, _ = capture.value_and_grad(_nnx_loss)(m, x, y)
    o.update(m, grads, value=loss)
    return transforms.monitored_metrics(o.opt_state), grads

  got, grads = step(model, opt)
  g = np.asarray(grads["l1"]["kernel"][...], np.float64)
  assert bool(got["measured"])
  np.testing.assert_allclose(got["grads/norm/l1/kernel"], np.linalg.norm(g), rtol=1e-6)
  np.testing.assert_allclose(
    got["updates/ratio/l1/kernel"], 0.1 * np.linalg.norm(g) / np.linalg.norm(w0), rtol=1e-5
  )
  np.testing.assert_allclose(got["loss"], loss0, rtol=1e-6)  # the value= passed to update
  np.testing.assert_allclose(model.l1.kernel[...], w0 - 0.1 * g, rtol=1e-5, atol=1e-7)


def test_scope_names_what_to_pass_for_an_nnx_module():
  model = _Net(nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"nnx.state\(model, nnx.Param\)"):
    metrics.scope(preset="economy").init(model)
  with pytest.raises(TypeError, match="wrt= is for NNX modules"):
    capture.value_and_grad(lambda p: p["w"].sum(), wrt=nnx.Param)({"w": jnp.ones(2)})


# ----------------------------------------------------------------------- Linen + TrainState


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


def _linen():
  x, y = _xy()
  model = _Mlp()
  params = model.init(jax.random.key(0), x)
  return model, params, x, y


def _scope():
  return metrics.scope(preset="economy", network=["loss"])


def test_train_state_apply_gradients_equals_the_plain_optax_loop():
  model, params, x, y = _linen()

  def loss_fn(p):
    return jnp.mean((model.apply(p, x) - y) ** 2)

  tx = transforms.monitored(optax.adam(1e-2), _scope())
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  opt_state, p = tx.init(params), params

  @jax.jit
  def ts_step(state):
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = transforms.apply_gradients(state, grads=grads, value=loss)
    return state, transforms.monitored_metrics(state.opt_state)

  @jax.jit
  def ref_step(p, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p, value=loss)
    return optax.apply_updates(p, updates), opt_state

  for _ in range(3):
    state, got = ts_step(state)
    p, opt_state = ref_step(p, opt_state)
    want = transforms.monitored_metrics(opt_state)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert int(state.step) == 3
  jax.tree.map(np.testing.assert_array_equal, state.params, p)


def test_train_state_helper_errors():
  model, params, _, _ = _linen()
  state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
  with pytest.raises(TypeError, match="may not set params"):
    transforms.apply_gradients(state, grads=params, replace={"params": params})
  with pytest.raises(TypeError, match=r"must be a flax\.training\.train_state\.TrainState"):
    transforms.apply_gradients({"params": params}, grads=params)


# ------------------------------------------------------------------------ inject_hyperparams


def _quadratic():
  a = jnp.linspace(0.5, 3.0, 12).reshape(3, 4)
  params = {"w": jnp.ones((3, 4)), "b": jnp.full((4,), 0.5)}

  def loss(p):
    return 0.5 * jnp.sum(a * p["w"] ** 2) + 0.5 * jnp.sum(p["b"] ** 2)

  return loss, params


def _run(tx, loss, params, steps, hvp=False):
  @jax.jit
  def step(p, s):
    if hvp:
      _, grads, hvp_fn = transforms.value_grad_and_hvp(loss, p)
      u, s = tx.update(grads, s, p, hvp_fn=hvp_fn)
    else:
      grads = jax.grad(loss)(p)
      u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  s, p = tx.init(params), params
  out = []
  for _ in range(steps):
    p, s = step(p, s)
    out.append(p)
  return out, s


def test_inject_hyperparams_constant_schedule_matches_static_ratio_lr():
  loss, params = _quadratic()
  static = transforms.ratio_adaptive_sgd(0.05, target=1e-2)
  injected = optax.inject_hyperparams(transforms.ratio_adaptive_sgd)(
    learning_rate=optax.constant_schedule(0.05), target=1e-2
  )
  ps, ss = _run(static, loss, params, 6)
  pi, si = _run(injected, loss, params, 6)
  for a, b in zip(ps, pi, strict=True):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), a, b)
  # One key, one value: the applied rate (the base rate is hyperparams["learning_rate"]).
  np.testing.assert_allclose(
    optax.tree.get(si, "effective_learning_rate"), optax.tree.get(ss, "effective_learning_rate")
  )
  np.testing.assert_allclose(si.hyperparams["learning_rate"], 0.05)
  # A changing schedule changes the applied rate by its factor inside jit.
  halving = optax.inject_hyperparams(transforms.ratio_adaptive_sgd)(
    learning_rate=optax.piecewise_constant_schedule(0.05, {3: 0.5}), target=1e-2
  )
  _, sh = _run(halving, loss, params, 6)
  f = float(optax.tree.get(sh, "factor"))
  np.testing.assert_allclose(optax.tree.get(sh, "effective_learning_rate"), 0.025 * f, rtol=1e-6)


@pytest.mark.parametrize(
  "variant", [pytest.param("preconditioned_sgd", marks=pytest.mark.slow), "only_adaptive_sgd"]
)
def test_inject_hyperparams_constant_schedule_matches_static_preconditioner(variant):
  loss, params = _quadratic()
  shape = {"est_rank": 1, "num_observations": 2, "prior_iterations": 2}
  factory = getattr(transforms, variant)
  static = factory(**shape, fixed_lr=0.1, faithful=False)
  injected = optax.inject_hyperparams(factory, static_args=tuple(shape))(
    **shape, fixed_lr=optax.constant_schedule(0.1), faithful=False
  )
  ps, _ = _run(static, loss, params, 7, hvp=True)
  pi, _ = _run(injected, loss, params, 7, hvp=True)
  for a, b in zip(ps, pi, strict=True):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), a, b)
  assert not np.allclose(ps[-1]["w"], params["w"])  # It did step.
  with pytest.raises(ValueError, match="static_args"):
    optax.inject_hyperparams(factory)(**shape).init(params)


# ---------------------------------------------------------------------------------- MultiSteps


def test_multisteps_measures_once_per_real_update_with_the_unwrapped_values(tmp_path):
  loss, params = _quadratic()
  k, micro = 4, 12
  grads = [
    jax.tree.map(lambda x, i=i: x * (1.0 + 0.1 * i), jax.grad(loss)(params)) for i in range(micro)
  ]
  wrapped = optax.MultiSteps(transforms.monitored(optax.adam(0.1), _scope()), k)
  plain = transforms.monitored(optax.adam(0.1), _scope())
  sw, sp, pw, pp = wrapped.init(params), plain.init(params), params, params
  update_w, update_p = jax.jit(wrapped.update), jax.jit(plain.update)
  want = []
  with Recorder(tmp_path) as rec:
    for i, g in enumerate(grads):
      u, sw = update_w(g, sw, pw, value=jnp.float32(i))
      pw = optax.apply_updates(pw, u)
      rec.write(i, transforms.monitored_metrics(sw))
      if (i + 1) % k == 0:  # The real update: the mean of the k micro-gradients.
        mean = jax.tree.map(lambda *x: sum(x) / k, *grads[i + 1 - k : i + 1])
        u, sp = update_p(mean, sp, pp, value=jnp.float32(i))
        pp = optax.apply_updates(pp, u)
        want.append((i, transforms.monitored_metrics(sp)))
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == [3, 7, 11]
  for rec_line, (i, ref) in zip(lines, want, strict=True):
    assert rec_line["step"] == i
    for key, value in rec_line["values"].items():
      np.testing.assert_allclose(value, np.asarray(ref[key]), rtol=1e-6, atol=1e-12, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), pw, pp)


# ----------------------------------------------------------------- multi_transform, several


def test_multi_transform_partitions_are_read_under_their_labels(tmp_path):
  loss, params = _quadratic()
  labels = {"w": "slow", "b": "fast"}
  tx = optax.multi_transform(
    {
      "slow": transforms.monitored(optax.sgd(0.01), metrics.scope(preset="economy", every=2)),
      "fast": transforms.monitored(optax.adam(0.1), metrics.scope(preset="economy")),
    },
    labels,
  )
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  with Recorder(tmp_path) as rec:
    for step in range(2):
      _, state = jax.jit(tx.update)(grads, state, params)
      got = transforms.monitored_metrics(state)
      rec.write(step, got)
  assert {k.split("/")[0] for k in got} == {"slow", "fast", "measured"}
  g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  np.testing.assert_allclose(got["slow/grads/norm/w"], np.linalg.norm(g["w"]), rtol=1e-6)
  np.testing.assert_allclose(got["fast/grads/norm/b"], np.linalg.norm(g["b"]), rtol=1e-6)
  assert not any("/b" in k for k in got if k.startswith("slow/"))  # only its partition
  # Step 1: "slow" (every=2) did not measure; its keys are left out of that record.
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any(k.startswith("slow/") for k in lines[0]["values"])
  assert not any(k.startswith("slow/") for k in lines[1]["values"])
  assert any(k.startswith("fast/") for k in lines[1]["values"])
  assert not any(k.endswith("measured") for r in lines for k in r["values"])


def test_named_monitors_keep_their_names():
  loss, params = _quadratic()
  one = transforms.monitored(optax.sgd(0.1), metrics.scope(grads=["norm"]), name="enc")
  s = one.init(params)
  _, s = one.update(jax.grad(loss)(params), s, params)
  assert sorted(transforms.monitored_metrics(s)) == [
    "enc/grads/norm/b",
    "enc/grads/norm/w",
    "enc/measured",
    "measured",
  ]


# ----------------------------------------------- every transform under every optax wrapper

_TRAINABLE = {"w": jnp.array(True), "b": jnp.array(False)}
_TRANSFORMS = {
  "ratio_adaptive_lr": (transforms.ratio_adaptive_lr, {"target": 1e-2, "kind": "any"}, {}),
  "ratio_adaptive_sgd": (transforms.ratio_adaptive_sgd, {"learning_rate": 0.1, "kind": "any"}, {}),
  "scale_to_update_ratio": (transforms.scale_to_update_ratio, {"target": 1e-2}, {}),
  "plateau_detector": (transforms.plateau_detector, {"patience": 2}, {"value": 1.0}),
  "masked_freeze": (
    lambda learning_rate: transforms.masked_freeze(optax.adam(learning_rate)),
    {"learning_rate": 0.1},
    {"trainable": _TRAINABLE},
  ),
  "monitored": (
    lambda learning_rate: transforms.monitored(optax.sgd(learning_rate), _scope()),
    {"learning_rate": 0.1},
    {"value": 1.0},
  ),
  "only_adaptive_sgd": (
    transforms.only_adaptive_sgd,
    {"est_rank": 1, "num_observations": 2, "prior_iterations": 2},
    "hvp",
  ),
}
_SHAPE_ARGS = ("est_rank", "num_observations", "prior_iterations")


def _steps(tx, loss, params, extra, n):
  @jax.jit
  def step(p, s):
    if extra == "hvp":
      _, grads, hvp_fn = transforms.value_grad_and_hvp(loss, p)
      u, s = tx.update(grads, s, p, hvp_fn=hvp_fn)
    else:
      u, s = tx.update(jax.grad(loss)(p), s, p, **extra)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for _ in range(n):
    p, s = step(p, s)
  return p, s


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_TRANSFORMS))
def test_every_transform_under_inject_hyperparams_and_multisteps(name):
  factory, args, extra = _TRANSFORMS[name]
  loss, params = _quadratic()
  plain, _ = _steps(factory(**args), loss, params, extra, 6)
  static = tuple(k for k in _SHAPE_ARGS if k in args)
  injected = optax.inject_hyperparams(factory, static_args=static)(**args)
  got, _ = _steps(injected, loss, params, extra, 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, plain)
  # MultiSteps(k=2) on a gradient that does not change between its micro-steps (the
  # parameters only move on the real update): 12 micro-steps are the 6 plain steps.
  got, _ = _steps(optax.MultiSteps(factory(**args), 2), loss, params, extra, 12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, plain)


def test_readers_name_each_partition_and_the_preconditioner_refuses_one():
  loss, params = _quadratic()
  tx = optax.multi_transform(
    {
      "w": transforms.ratio_adaptive_sgd(0.1, target=1e-2, kind="any"),
      "b": transforms.ratio_adaptive_sgd(0.1, target=1e-2, kind="any"),
    },
    {"w": "w", "b": "b"},
  )
  _, s = _steps(tx, loss, params, {}, 3)
  got = transforms.ratio_lr_values(s)
  assert sorted(k for k in got if k.endswith("/lr")) == ["b/lr", "w/lr"]
  assert "w/ratio_lr/ratio/w" in got and "b/ratio_lr/ratio/b" in got
  frozen = optax.multi_transform(
    {"w": transforms.masked_freeze(optax.adam(0.1)), "b": optax.sgd(0.1)}, {"w": "w", "b": "b"}
  )
  p, _ = _steps(frozen, loss, params, {"trainable": {"w": jnp.array(False), "b": True}}, 2)
  np.testing.assert_array_equal(p["w"], params["w"])  # frozen inside its partition
  pre = optax.multi_transform(
    {"w": transforms.only_adaptive_sgd(1, 2, 2), "b": optax.sgd(0.1)}, {"w": "w", "b": "b"}
  )
  with pytest.raises(ValueError, match="labels="):
    _steps(pre, loss, params, "hvp", 1)


def test_instruments_take_nnx_parameters_as_a_state():
  model = nnx.Sequential(
    nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1))
  )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (16, 4))
  y = jnp.arange(16) % 3

  def losses_fn(p, x, y):
    logits = nnx.merge(graphdef, p, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  ins = metrics.instruments(preset="economy")

  def grad(s, p):
    probe = ins.grad(s, losses_fn, p, x, y)
    return probe.loss, probe.grads

  loss, grads = jax.jit(grad)(ins.init(params), params)
  ref_loss, ref_grads = nnx.value_and_grad(
    lambda m: losses_fn(nnx.state(m, nnx.Param), x, y).mean()
  )(model)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), grads, ref_grads
  )


# ------------------------------------------------------- the reference loop, same seed


@pytest.mark.slow
def test_train_state_loop_records_what_the_reference_loop_records(tmp_path):
  """The user's Linen + TrainState loop of docs/your-loop.md, on the zoo's mlp with the
  reference loop's seed, data order and loss, records the reference loop's values."""
  from jaxscope import History, data, models
  from jaxscope.run import TrainConfig
  from jaxscope.train import train

  steps, batch, lr, seed = 4, 64, 0.1, 3
  config = TrainConfig(
    model="mlp", dataset="digits", optimizer="sgd", lr=lr, steps=steps, batch_size=batch,
    seed=seed, metrics="economy", quiet=True, out=str(tmp_path / "ref"),
  )  # fmt: skip
  ref = History.load(train(config).run_dir)

  ds = data.load("digits")
  model = models.build("mlp", ds.train_x.shape[1:], ds.num_classes)
  params = model.init(jax.random.key(seed), jnp.asarray(ds.train_x[:1]))["params"]
  tx = transforms.monitored(optax.sgd(lr), metrics.scope(preset="economy"))
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state, x, y):
    def loss_fn(p):
      logits, _ = state.apply_fn({"params": p}, x, train=True, rng=None)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = transforms.apply_gradients(state, grads=grads, value=loss)
    return state, {"loss": loss, **transforms.monitored_metrics(state.opt_state)}

  order = np.random.default_rng([seed, 0]).permutation(len(ds.train_x))  # the loop's epoch 0
  with Recorder(tmp_path / "mine") as rec:
    for step in range(steps):
      idx = order[step * batch : (step + 1) * batch]
      state, values = train_step(state, ds.train_x[idx], ds.train_y[idx])
      rec.write(step, values)
  mine = History.load(tmp_path / "mine")
  per_layer = [k for k in mine.keys() if k.count("/") >= 2]
  assert len(per_layer) >= 20 and set(per_layer) <= set(ref.keys())
  for key in ["loss", *per_layer]:
    np.testing.assert_array_equal(mine.steps(key), ref.steps(key))
    np.testing.assert_allclose(mine[key], ref[key], rtol=2e-5, atol=1e-9, err_msg=key)
