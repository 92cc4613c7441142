"""PackedValues: a mapping stored as one array per (dtype, shape), checked against dicts."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxscope.packed import PackedValues, unpack


def _example() -> dict:
  return {
    "b": jnp.float32(2.5),
    "a": jnp.float32(-1.0),
    "flag": jnp.bool_(True),
    "hist": jnp.arange(4, dtype=jnp.float32),
    "count": jnp.int32(7),
    "c": jnp.float32(np.nan),
  }


def _same(packed, ref):
  assert list(packed) == list(ref)
  for k, v in ref.items():
    got = np.asarray(packed[k])
    assert got.dtype == np.asarray(v).dtype and got.shape == np.shape(v), k
    np.testing.assert_array_equal(got, np.asarray(v), err_msg=k)


def test_groups_by_dtype_and_shape_and_reads_back_every_entry():
  ref = _example()
  p = PackedValues.pack(ref)
  # float32 scalars, bool, float32[4], int32: four arrays for six entries.
  assert len(jax.tree.leaves(p)) == 4
  assert jax.tree.leaves(p)[0].shape == (3,)
  assert len(p) == 6 and "hist" in p and "nope" not in p
  _same(p, ref)
  _same(jax.device_get(p), ref)
  assert p.shapes() == {k: np.shape(v) for k, v in ref.items()}
  assert repr(p).startswith("PackedValues(6 entries in 4 arrays: float32[3], bool[1], float32_4[1]")
  assert "'b': 2.5, 'a': -1.0, 'flag': True, 'hist': [0. 1. 2. 3.]" in repr(p)
  jax.jit(lambda v: print(repr(v)) or v["a"])(p)  # a traced one shows its layout only
  with pytest.raises(KeyError):
    p["nope"]


def test_host_reads_are_numpy_views_of_one_transfer():
  host = jax.device_get(PackedValues.pack(_example()))
  assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(host))
  assert isinstance(host["a"], np.ndarray) and host["a"].base is not None


def test_through_jit_cond_and_keyed_paths():
  ref = _example()
  p = PackedValues.pack(ref)
  out = jax.jit(lambda v: PackedValues.pack({k: v[k] for k in v}, like=v))(p)
  _same(out, ref)
  doubled = jax.jit(
    lambda v, c: jax.lax.cond(
      c, lambda: PackedValues.pack({**unpack(v), "a": v["a"] * 2}, like=v), lambda: v
    )
  )
  _same(doubled(p, False), ref)
  assert float(doubled(p, True)["a"]) == -2.0
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
  assert paths == ["['float32']", "['bool']", "['float32_4']", "['int32']"]


def test_like_keeps_the_layout_and_casts():
  like = PackedValues.pack({"x": jnp.float32(0), "n": jnp.int32(0)})
  p = PackedValues.pack({"n": 3.7, "x": 1}, like=like)
  assert list(p) == ["x", "n"]
  assert p["n"].dtype == jnp.int32 and int(p["n"]) == 3
  assert p["x"].dtype == jnp.float32
  assert jax.tree.structure(p) == jax.tree.structure(like)
  with pytest.raises(ValueError, match=r"new: \['y'\]; missing: \['n'\]"):
    PackedValues.pack({"x": 1.0, "y": 2.0}, like=like)
  with pytest.raises(ValueError, match=r"'x' has shape \(2,\)"):
    PackedValues.pack({"x": jnp.zeros(2), "n": 1}, like=like)
  with pytest.raises(TypeError, match="keys must be str"):
    PackedValues.pack({1: 2.0})


def test_scan_and_vmap_stack_in_front_of_the_member_axis():
  def body(c, _):
    return c + 1, PackedValues.pack({"s": c, "v": jnp.full(3, c), "w": 2 * c})

  _, stacked = jax.lax.scan(body, jnp.float32(0), length=5)
  assert stacked.shapes() == {"s": (5,), "v": (5, 3), "w": (5,)}
  np.testing.assert_array_equal(stacked["w"], 2 * np.arange(5))
  np.testing.assert_array_equal(stacked["v"], np.repeat(np.arange(5.0)[:, None], 3, 1))
  batched = jax.vmap(lambda x: PackedValues.pack({"m": x.mean(), "s": x.sum()}))(jnp.ones((2, 4)))
  np.testing.assert_array_equal(batched["s"], [4.0, 4.0])


def test_or_prefix_rename_without():
  p = PackedValues.pack({"a": jnp.float32(1), "b": jnp.float32(2)})
  q = p | {"m": jnp.bool_(False)}
  assert list(q) == ["a", "b", "m"]
  assert jax.tree.leaves(q)[0] is jax.tree.leaves(p)[0]  # not unstacked
  r = q | {"a": jnp.float32(5)}  # a shared key: the right one wins
  assert float(r["a"]) == 5.0 and float(r["b"]) == 2.0 and len(r) == 3
  assert list(p.prefixed("opt/")) == ["opt/a", "opt/b"]
  with pytest.raises(ValueError, match="same name"):
    p.renamed(lambda k: "x")
  w = q.without("a", "zz")
  assert list(w) == ["b", "m"] and "a" not in w and w.shapes() == {"b": (), "m": ()}
  assert jax.tree.leaves(w)[0] is jax.tree.leaves(q)[0]  # hidden, not sliced out
  with pytest.raises(KeyError):
    w["a"]
  assert float(w["b"]) == 2.0 and list(w.prefixed("p/")) == ["p/b", "p/m"]
  again = PackedValues.pack({"b": 3.0, "m": True}, like=w)  # the hidden member is zero
  assert float(again["b"]) == 3.0 and float(jax.tree.leaves(again)[0][0]) == 0.0
  assert float((w | {"a": jnp.float32(9)})["a"]) == 9.0
  assert q.without("zz") is q
  assert PackedValues.pack(q) is q
  twice = q | {"n": jnp.bool_(True)}  # a second bool group: its path is numbered
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(twice)[0]]
  assert paths == ["['float32']", "['bool']", "['bool_1']"]
  assert dict(PackedValues.pack({})) == {}


def test_orbax_round_trip(tmp_path):
  ref = _example()
  p = PackedValues.pack(ref)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "p", {"values": p})
  with ocp.StandardCheckpointer() as ckptr:
    back = ckptr.restore(tmp_path / "p", {"values": p})["values"]
  assert isinstance(back, PackedValues)
  _same(back, ref)
