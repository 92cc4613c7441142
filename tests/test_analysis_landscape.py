"""Tests of 1-D/2-D landscapes against direct evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope import analysis, data, models
from jaxscope.analysis.landscape import landscape_1d, landscape_2d, load_landscape, save_landscape


@pytest.fixture(scope="module")
def problem():
  ds = data.load("digits")
  m = models.build("mlp", ds.train_x.shape[1:], ds.num_classes)
  theta = m.init(jax.random.key(0), jnp.asarray(ds.train_x[:1]))["params"]
  k1, k2 = jax.random.split(jax.random.key(5))
  leaves, treedef = jax.tree.flatten(theta)
  dx = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(jax.random.fold_in(k1, i), x.shape)
                                    for i, x in enumerate(leaves)])  # fmt: skip
  dy = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(jax.random.fold_in(k2, i), x.shape)
                                    for i, x in enumerate(leaves)])  # fmt: skip
  es = analysis.make_eval_set(ds.test_x[:100], ds.test_y[:100], batch_size=64)

  def apply_fn(p, s, x):
    return m.apply({"params": p, **s}, x, train=False)[0]

  def direct(a, b):
    p = jax.tree.map(lambda c, u, v: c + a * u + b * v, theta, dx, dy)
    out = np.asarray(apply_fn(p, {}, jnp.asarray(ds.test_x[:100])), np.float64)
    out = out - out.max(-1, keepdims=True)
    logp = out - np.log(np.exp(out).sum(-1, keepdims=True))
    return float(-logp[np.arange(100), ds.test_y[:100]].mean())

  return apply_fn, es, theta, dx, dy, direct


@pytest.mark.slow
def test_non_square_grid_keeps_orientation_and_centre(problem, tmp_path):
  apply_fn, es, theta, dx, dy, direct = problem
  xs, ys = np.array([-1.0, 0.0, 0.5, 2.0]), np.array([-0.5, 0.0, 1.0])
  land = landscape_2d(apply_fn, es, theta, dx, dy, xs, ys, settings={"seed": 5})
  assert land.loss.shape == (3, 4)
  for iy, b in enumerate(ys):
    for ix, a in enumerate(xs):
      assert land.loss[iy, ix] == pytest.approx(direct(a, b), rel=2e-5), (a, b)
  assert land.loss[1, 1] == pytest.approx(land.center_loss, rel=1e-6)
  assert land.center_loss == pytest.approx(direct(0.0, 0.0), rel=1e-5)
  assert land.settings["seed"] == 5 and land.settings["eval_set_digest"] == es.digest
  npz, js = save_landscape(tmp_path / "land", land, traj_x=np.arange(3.0))
  back, extra = load_landscape(tmp_path / "land")
  np.testing.assert_array_equal(back.loss, land.loss)
  np.testing.assert_array_equal(back.y, ys)
  np.testing.assert_array_equal(extra["traj_x"], np.arange(3.0))
  assert back.center_loss == land.center_loss and npz.exists() and js.exists()


def test_1d_landscape(problem):
  apply_fn, es, theta, dx, _, direct = problem
  land = landscape_1d(apply_fn, es, theta, dx, np.linspace(-1, 1, 5))
  assert land.y is None and land.loss.shape == (5,)
  for a, v in zip(land.x, land.loss, strict=True):
    assert v == pytest.approx(direct(a, 0.0), rel=2e-5)
  with pytest.raises(ValueError, match="finite"):
    landscape_1d(apply_fn, es, theta, dx, [0.0, np.nan])
