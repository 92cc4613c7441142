"""Tests for jaxscope.tree: names, kinds, selection, grouping, output axes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxscope import tree as jtree


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(5)(x)
    return nn.Dense(2, name="head")(x)


class _NNX(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(3, 4, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs)])
    self.bn = nnx.BatchNorm(4, rngs=rngs)


def _names(tree):
  return [i.name for i in jtree.leaf_infos(tree)]


@pytest.mark.slow
def test_linen_names_and_kinds():
  params = _Linen().init(jax.random.PRNGKey(0), jnp.ones((1, 6, 6, 2)))["params"]
  infos = {i.name: i for i in jtree.leaf_infos(params)}
  assert set(infos) == {
    "Conv_0/kernel",
    "Conv_0/bias",
    "Dense_0/kernel",
    "Dense_0/bias",
    "head/kernel",
    "head/bias",
  }
  assert infos["Conv_0/kernel"].kind == "kernel"
  assert infos["Conv_0/kernel"].module == "Conv_0"
  assert infos["head/bias"].kind == "bias"
  assert infos["Conv_0/kernel"].shape == (3, 3, 2, 4)


def test_nnx_state_names_drop_value_attribute():
  model = _NNX(nnx.Rngs(0))
  names = _names(nnx.state(model, nnx.Param))
  assert sorted(names) == [
    "blocks/0/bias",
    "blocks/0/kernel",
    "bn/bias",
    "bn/scale",
    "l1/bias",
    "l1/kernel",
  ]
  # The pure-dict form of the same state gives the same names.
  assert _names(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == names
  kinds = {i.name: i.kind for i in jtree.leaf_infos(nnx.state(model))}
  assert kinds["bn/scale"] == "other"
  assert kinds["bn/mean"] == "other"


def test_plain_containers_and_scalars():
  tree = {"a": [jnp.ones(2), (jnp.ones((2, 3)),)], "s": jnp.float32(1.0)}
  infos = jtree.leaf_infos(tree)
  assert [i.name for i in infos] == ["a/0", "a/1/0", "s"]
  assert [i.kind for i in infos] == ["other", "kernel", "other"]


def test_output_axes_and_matrix():
  assert jtree.output_axes("Dense_0/kernel", (3, 5)) == (1,)
  assert jtree.output_axes("Conv_0/kernel", (3, 3, 2, 8)) == (3,)
  assert jtree.output_axes("Dense_0/bias", (5,)) == (0,)
  assert jtree.output_axes("scale", ()) == ()
  k = np.arange(3 * 3 * 2 * 8, dtype=np.float32).reshape(3, 3, 2, 8)
  m = np.asarray(jtree.as_matrix(jnp.asarray(k)))
  assert m.shape == (18, 8)
  # Column j is output filter j flattened over (kh, kw, in).
  np.testing.assert_array_equal(m[:, 5], k[..., 5].reshape(-1))


def test_selection_by_regex_kind_and_depth():
  params = {
    "Block_0": {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
    "Block_1": {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
    "head": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)},
  }
  lay = jtree.layout(params, include="Block", kind="kernel")
  assert lay.keys == ("Block_0/Dense_0/kernel", "Block_1/Dense_0/kernel")
  lay = jtree.layout(params, exclude=["head", "bias"])
  assert lay.keys == ("Block_0/Dense_0/kernel", "Block_1/Dense_0/kernel")
  lay = jtree.layout(params, depth=1)
  assert lay.keys == ("Block_0", "Block_1", "head")
  assert [i.name for i in lay.groups[0].leaves] == [
    "Block_0/Dense_0/bias",
    "Block_0/Dense_0/kernel",
  ]
  lay = jtree.layout(params, depth=-1, kind="bias")
  assert lay.keys == ("Block_0/Dense_0", "Block_1/Dense_0", "head")


def test_selection_that_matches_nothing_names_the_regex_and_leaves():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"include='Conv'.*Dense_0/kernel"):
    jtree.layout(params, include="Conv", argname="params")
  with pytest.raises(ValueError, match="invalid regular expression"):
    jtree.layout(params, include="(")
  with pytest.raises(ValueError, match="depth"):
    jtree.layout(params, depth=0)
  with pytest.raises(ValueError, match="kind"):
    jtree.layout(params, kind="weights")  # type: ignore[arg-type]


def test_non_array_leaf_is_named():
  with pytest.raises(TypeError, match=r"leaf 'Dense_0/act' is a str"):
    jtree.leaf_infos({"Dense_0": {"kernel": jnp.ones(2), "act": "relu"}}, argname="params")
  with pytest.raises(ValueError, match="no array leaves"):
    jtree.leaf_infos({})


def test_check_same_structure_names_the_difference():
  a = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 2))}}
  b = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_2": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"only in params: \['Dense_1/kernel'\]"):
    jtree.check_same_structure(a, b, ref_name="params", other_name="grads")
  c = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match=r"leaf 'Dense_1/kernel'.*\(3, 2\)"):
    jtree.check_same_structure(a, c, ref_name="params", other_name="grads")
  jtree.check_same_structure(a, a, ref_name="params", other_name="grads")
