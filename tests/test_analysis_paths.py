"""Tests of the evaluation kernel and the interpolation paths against direct evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscope import analysis, data, models


@pytest.fixture(scope="module")
def setup():
  ds = data.load("digits")
  m = models.build("mlp", ds.train_x.shape[1:], ds.num_classes)
  theta_0 = m.init(jax.random.key(0), jnp.asarray(ds.train_x[:1]))["params"]
  # A few SGD steps make θ_f (a real, if short, trajectory with three checkpoints).
  tx = optax.sgd(0.5)
  opt = tx.init(theta_0)

  def loss(p, x, y):
    out, _ = m.apply({"params": p}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  theta, cps = theta_0, [theta_0]
  for k in range(20):
    x, y = ds.train_x[k * 64 : (k + 1) * 64], ds.train_y[k * 64 : (k + 1) * 64]
    g = jax.grad(loss)(theta, x, y)
    u, opt = tx.update(g, opt, theta)
    theta = optax.apply_updates(theta, u)
    if k in (9, 19):
      cps.append(theta)
  x_eval, y_eval = ds.test_x[:150], ds.test_y[:150]
  es = analysis.make_eval_set(x_eval, y_eval, batch_size=64)  # 150 = 2 full batches + 22

  def apply_fn(p, s, x):
    return m.apply({"params": p, **s}, x, train=False)[0]

  return m, es, cps, (x_eval, y_eval), apply_fn


def _direct(m, params, xy):
  """Loss and accuracy by one plain forward pass over the whole set, in float64."""
  out = np.asarray(m.apply({"params": params}, jnp.asarray(xy[0]), train=False)[0], np.float64)
  out = out - out.max(-1, keepdims=True)
  logp = out - np.log(np.exp(out).sum(-1, keepdims=True))
  y = np.asarray(xy[1])
  return float(-logp[np.arange(len(y)), y].mean()), float((out.argmax(-1) == y).mean())


def test_eval_set_pads_and_hashes():
  es = analysis.make_eval_set(np.ones((5, 2)), np.arange(5), batch_size=2)
  assert es.x.shape == (3, 2, 2) and es.n == 5
  np.testing.assert_array_equal(np.asarray(es.mask).ravel(), [1, 1, 1, 1, 1, 0])
  assert es.digest == analysis.make_eval_set(np.ones((5, 2)), np.arange(5)).digest
  assert es.digest != analysis.make_eval_set(np.ones((5, 2)), np.arange(1, 6)).digest
  with pytest.raises(ValueError, match="empty"):
    analysis.make_eval_set(np.ones((0, 2)), np.zeros(0))
  with pytest.raises(ValueError, match="4 examples but y has 3"):
    analysis.make_eval_set(np.ones((4, 2)), np.zeros(3))


def test_lagrange_weights():
  w = analysis.lagrange_weights([0.0, 0.5, 1.0, -0.5, 1.5, 0.3])
  np.testing.assert_allclose(w[:3], np.eye(3), atol=1e-12)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
  # nnvis's closed form for t_m = ½.
  a = np.array([-0.5, 0.3, 1.5])
  ref = np.stack([2 * (a - 0.5) * (a - 1), -4 * a * (a - 1), 2 * a * (a - 0.5)], 1)
  np.testing.assert_allclose(analysis.lagrange_weights(a), ref, atol=1e-12)
  w = analysis.lagrange_weights([0.0, 0.3, 1.0], mid=0.3)
  np.testing.assert_allclose(w, np.eye(3), atol=1e-12)
  with pytest.raises(ValueError, match="mid node"):
    analysis.lagrange_weights([0.0], mid=1.0)


@pytest.mark.slow
def test_model_paths_reproduce_the_checkpoints(setup):
  m, es, (t0, tm, tf), xy, apply_fn = setup
  lin = analysis.model_path(apply_fn, es, t0, tf, alphas=[0.0, 1.0, 0.5, -0.5])
  for a, th in ((0, t0), (1, tf)):
    loss, acc = _direct(m, th, xy)
    assert lin.loss[a] == pytest.approx(loss, rel=1e-5)
    assert lin.accuracy[a] == pytest.approx(acc, abs=1e-7)
  mid_theta = jax.tree.map(lambda a, b: 0.5 * (a + b), t0, tf)
  assert lin.loss[2] == pytest.approx(_direct(m, mid_theta, xy)[0], rel=1e-5)
  quad = analysis.model_path(apply_fn, es, t0, tf, theta_mid=tm, alphas=[0.0, 0.5, 1.0])
  for j, th in enumerate((t0, tm, tf)):
    assert quad.loss[j] == pytest.approx(_direct(m, th, xy)[0], rel=1e-5)
  assert quad.kind == "quadratic" and lin.kind == "linear"
  assert lin.distance == pytest.approx(
    float(np.sqrt(sum(np.sum((np.asarray(b) - np.asarray(a)) ** 2)
                      for a, b in zip(jax.tree.leaves(t0), jax.tree.leaves(tf), strict=True))))
  )  # fmt: skip


def test_chunking_does_not_change_results(setup):
  _, es, (t0, _, tf), _, apply_fn = setup
  w = analysis.linear_weights(np.linspace(-0.5, 1.5, 7))
  a = analysis.make_point_evaluator(apply_fn, [t0, tf], es, chunk=3).evaluate(w)
  b = analysis.make_point_evaluator(apply_fn, [t0, tf], es, chunk=64).evaluate(w)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
  ev = analysis.make_point_evaluator(apply_fn, [t0, tf], es)
  with pytest.raises(ValueError, match="coefficients must be"):
    ev.evaluate(np.zeros((2, 3)))
  assert ev.timings["points"] == 0


def test_layer_path_at_zero_is_the_manual_reinitialisation(setup):
  m, es, (t0, _, tf), xy, apply_fn = setup
  paths = analysis.layer_paths(apply_fn, es, t0, tf, alphas=[0.0, 1.0])
  assert list(paths) == ["fc1", "fc2", "out"]
  for name, res in paths.items():
    manual = {k: (t0[k] if k == name else tf[k]) for k in tf}
    assert res.loss[0] == pytest.approx(_direct(m, manual, xy)[0], rel=1e-5), name
    assert res.loss[1] == pytest.approx(_direct(m, tf, xy)[0], rel=1e-5)
    d = np.sqrt(sum(np.sum((np.asarray(tf[name][k]) - np.asarray(t0[name][k])) ** 2)
                    for k in tf[name]))  # fmt: skip
    assert res.distance == pytest.approx(float(d), rel=1e-5)


def test_parameter_paths_match_manual_replacement(setup):
  m, es, (t0, tm, tf), xy, apply_fn = setup
  sel = analysis.select_parameters(t0, tf, how="top", k=3)
  flat = {
    (n, i): abs(float(np.asarray(tf[n.split("/")[0]][n.split("/")[1]])[i]
                      - np.asarray(t0[n.split("/")[0]][n.split("/")[1]])[i]))
    for n, i in sel
  }  # fmt: skip
  assert list(flat.values()) == sorted(flat.values(), reverse=True)
  res = analysis.parameter_paths(apply_fn, es, t0, tf, sel, theta_mid=tm, alphas=[0.0, 2.0])
  name, idx = sel[0]
  layer, leaf = name.split("/")
  v0, vm, vf = (float(np.asarray(t[layer][leaf])[idx]) for t in (t0, tm, tf))
  for j, a in enumerate([0.0, 2.0]):
    w = analysis.lagrange_weights([a])[0]
    value = w @ np.array([v0, vm, vf])
    manual = jax.tree.map(lambda x: x, tf)
    manual = {k: dict(v) for k, v in manual.items()}
    manual[layer][leaf] = manual[layer][leaf].at[idx].set(value)
    assert res[0].loss[j] == pytest.approx(_direct(m, manual, xy)[0], rel=1e-5)
  assert res[0].name == f"{name}[{','.join(map(str, idx))}]"
  assert res[0].distance == pytest.approx(abs(vf - v0), rel=1e-6)
  rnd = analysis.select_parameters(t0, tf, how="random", k=4, seed=1)
  assert rnd == analysis.select_parameters(t0, tf, how="random", k=4, seed=1) and len(rnd) == 4
  with pytest.raises(ValueError, match="outside"):
    analysis.select_parameters(t0, tf, how="explicit", explicit=[("fc1/kernel", (99, 0))])
  with pytest.raises(ValueError, match="no leaf"):
    analysis.select_parameters(t0, tf, how="explicit", explicit=[("nope", (0,))])


def test_projection_and_path_error(setup):
  _, es, (t0, _, tf), _, apply_fn = setup
  on_line = [jax.tree.map(lambda a, b, s=s: (1 - s) * a + s * b, t0, tf) for s in (0.0, 0.25, 1.0)]
  np.testing.assert_allclose(analysis.project_on_path(t0, tf, on_line), [0, 0.25, 1], atol=1e-6)
  lin = analysis.model_path(apply_fn, es, t0, tf, alphas=np.linspace(0, 1, 5))
  assert analysis.path_error(lin, lin.alpha, lin.loss) == pytest.approx(0.0, abs=1e-7)
  assert analysis.path_error(lin, [0.5], [lin.loss[2] + 0.1]) == pytest.approx(0.1, rel=1e-5)
  assert np.isnan(analysis.path_error(lin, [3.0], [1.0]))


def test_path_error_finite_values_only():
  # α out of order, one α infinite and one loss NaN: the finite points, sorted by α, are
  # (0, 1), (0.5, 0.5), (1, 0), i.e. the line 1 − α.
  path = analysis.PathResult(
    np.array([1.0, np.inf, 0.5, 0.25, 0.0]),
    np.array([0.0, 2.0, 0.5, np.nan, 1.0]),
    np.zeros(5),
    "linear",
    "model",
    "model",
    1.0,
  )
  alpha_t = [0.25, 0.75, 0.9, 1.5, 0.5, np.nan]
  loss_t = [1.0, 0.0, 0.4, 9.0, np.nan, 1.0]
  # |0.75 − 1| = 0.25, |0.25 − 0| = 0.25, |0.1 − 0.4| = 0.3; α_t = 1.5 lies outside [0, 1],
  # and a NaN loss or α of a checkpoint leaves it out.
  assert analysis.path_error(path, alpha_t, loss_t) == pytest.approx(0.8 / 3)
  assert np.isnan(analysis.path_error(path, [0.5], [np.inf]))
  nothing = path._replace(loss=np.full(5, np.nan))
  assert np.isnan(analysis.path_error(nothing, alpha_t, loss_t))


def test_trajectory_stats(setup):
  _, _, cps, _, _ = setup
  st = analysis.trajectory_stats(cps)
  flat = [np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(c)]) for c in cps]
  d = np.linalg.norm(flat[-1] - flat[0])
  assert st.distance == pytest.approx(d, rel=1e-6)
  assert st.relative_distance == pytest.approx(d / np.linalg.norm(flat[0]), rel=1e-6)
  length = sum(np.linalg.norm(flat[t + 1] - flat[t]) for t in range(len(flat) - 1))
  assert st.path_length == pytest.approx(length, rel=1e-6) and st.path_length >= st.distance
  assert set(st.per_layer) == {"fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias",
                               "out/kernel", "out/bias"}  # fmt: skip
  with pytest.raises(ValueError, match="two checkpoints"):
    analysis.trajectory_stats(cps[:1])


@pytest.mark.slow
def test_batchnorm_statistics_recomputed_exactly():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      h = nn.Dense(4, name="d1")(x)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
      return nn.Dense(3, name="d2")(nn.relu(h))

  net = Net()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 5)).astype(np.float32)
  y = rng.integers(0, 3, 96)
  v = net.init(jax.random.key(0), jnp.asarray(x[:2]))
  params, state = v["params"], {"batch_stats": v["batch_stats"]}

  def apply_fn(p, s, xb):
    return net.apply({"params": p, **s}, xb, train=False)

  def apply_train(p, s, xb):
    _, upd = net.apply({"params": p, **s}, xb, train=True, mutable=["batch_stats"])
    return {"batch_stats": upd["batch_stats"]}

  xs = jnp.asarray(x.reshape(3, 32, 5))
  got = jax.jit(lambda p: analysis.recompute_statistics(apply_train, p, state, xs))(params)
  W, b = np.asarray(params["d1"]["kernel"], np.float64), np.asarray(params["d1"]["bias"])
  h = x.reshape(3, 32, 5).astype(np.float64) @ W + b
  np.testing.assert_allclose(got["batch_stats"]["bn"]["mean"], h.mean(1).mean(0), rtol=1e-5)
  np.testing.assert_allclose(got["batch_stats"]["bn"]["var"], h.var(1).mean(0), rtol=1e-4)
  # Through the kernel: the recompute policy at α = 0 and 1 equals evaluating each endpoint
  # with its own recomputed statistics.
  theta_b = jax.tree.map(lambda a: a * 1.5, params)
  es = analysis.make_eval_set(x, y, batch_size=40)
  ev = analysis.make_point_evaluator(
    apply_fn, [params, theta_b], es, model_state=state, recompute=(apply_train, xs)
  )
  out = ev.evaluate(analysis.linear_weights([0.0, 1.0]))
  for j, th in enumerate((params, theta_b)):
    st = analysis.recompute_statistics(apply_train, th, state, xs)
    logits = np.asarray(apply_fn(th, st, jnp.asarray(x)), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert out["loss"][j] == pytest.approx(-logp[np.arange(96), y].mean(), rel=1e-5)


@pytest.mark.slow
def test_paths_work_with_an_nnx_model():
  ds = data.load("digits")
  m = models.build("nnx_cnn", ds.train_x.shape[1:], ds.num_classes)
  x1 = jnp.asarray(ds.train_x[:1])
  v0, v1 = m.init(jax.random.key(0), x1), m.init(jax.random.key(1), x1)
  state = {k: v for k, v in v1.items() if k != "params"}
  es = analysis.make_eval_set(ds.test_x[:64], ds.test_y[:64], batch_size=32)

  def apply_fn(p, s, x):
    return m.apply({"params": p, **s}, x, train=False)[0]

  res = analysis.model_path(
    apply_fn, es, v0["params"], v1["params"], alphas=[0.0, 1.0], model_state=state
  )
  for j, v in enumerate((v0, v1)):
    out = np.asarray(apply_fn(v["params"], state, jnp.asarray(ds.test_x[:64])), np.float64)
    out -= out.max(-1, keepdims=True)
    logp = out - np.log(np.exp(out).sum(-1, keepdims=True))
    assert res.loss[j] == pytest.approx(-logp[np.arange(64), ds.test_y[:64]].mean(), rel=1e-5)
