"""Conventions a user can see (issue 18 item 4): metric specs with arguments
(``variance(ddof=1)``), every key's definition in ``jaxscope list-metrics``, and no key
reported by both a scope and the instruments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope import metrics
from jaxscope.cli import main
from jaxscope.metrics import keys, registry
from jaxscope.metrics.instruments import INSTRUMENT_PRESETS, QUANTITIES


def test_metric_specs_take_arguments():
  assert registry.parse_spec("variance") == ("variance", (), {})
  assert registry.parse_spec(" variance(ddof=1) ") == ("variance", (), {"ddof": 1})
  assert registry.parse_spec("histogram(32, range=(-1.0, 1.0))") == (
    "histogram",
    (32,),
    {"range": (-1.0, 1.0)},
  )
  assert registry.split_specs("norm, histogram(32, range=(-1, 1)),variance(ddof=1),") == [
    "norm",
    "histogram(32, range=(-1, 1))",
    "variance(ddof=1)",
  ]
  x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  for spec, ddof in [("variance", 0), ("variance(ddof=1)", 1), ("variance(1)", 1)]:
    got = metrics.evaluate(registry.get(spec), x)
    np.testing.assert_allclose(got, np.var(x.astype(np.float64), ddof=ddof), rtol=1e-6)
  # In a scope and through the train command's metric list.
  from jaxscope.train.measure import make_scope

  params = {"Dense_0": {"kernel": jnp.asarray(x)}}
  sc = make_scope("norm,variance(ddof=1)", topics=["params"])
  values, _ = sc.update(sc.init(params), params=params)
  np.testing.assert_allclose(
    values["params/variance/Dense_0/kernel"], np.var(x.astype(np.float64), ddof=1), rtol=1e-6
  )
  with pytest.raises(ValueError, match=r"variance\(dof=1\).*ddof=0"):
    registry.get("variance(dof=1)")  # names the spec and shows the signature
  with pytest.raises(ValueError, match="literals"):
    registry.get("variance(ddof=x)")
  with pytest.raises(ValueError, match="NAME"):
    registry.get("variance(ddof=1")
  with pytest.raises(KeyError, match="unknown metric 'kurtosis'"):
    registry.get("kurtosis(2)")


def test_every_instrument_key_has_a_definition():
  # The keys come from the instruments themselves; a key added there without a definition
  # in jaxscope.metrics.keys fails here.
  for q in QUANTITIES:
    produced = keys.instrument_keys(q)
    assert produced, q
    missing = [k for k in produced if not keys.INSTRUMENT_KEYS.get(k)]
    assert not missing, f"{q}: no definition in jaxscope.metrics.keys.INSTRUMENT_KEYS for {missing}"
  contract = [
    "hess_trace_stderr",
    "hessian/trace_stderr/{leaf}",
    "tic_trace_stderr",
    "tic_diag_stderr",
    "hess_max_ev_residual",
    "per_example_grads/hist2d_counts_grad_param",
    "per_example_grads/hist2d_grad_edges",
    "per_example_grads/hist2d_param_edges",
  ]
  table = {row.key for row in keys.instrument_key_table()}
  assert set(contract) <= table


def test_list_metrics_reaches_every_key(capsys):
  assert main(["list-metrics"]) == 0
  text = capsys.readouterr().out
  for name in registry.names():
    meta = registry.info(name)
    assert f"{name}{meta.signature}" in text or f"{name:20s} key {name}" in text, name
    for key in meta.keys:
      assert key in text, key
  assert "variance(ddof=0)" in text and "ikkuna" in text and "ddof=1" in text
  assert "{topic}/spectral_norm_residual/{layer}" in text and "svd_max_size=4096" in text
  for row in keys.instrument_key_table():
    assert f"    {row.key}: {row.definition}" in text
  for preset in INSTRUMENT_PRESETS:
    assert f"preset {preset}" in text


def _scope_keys(params):
  out = set()
  for preset in registry.SCOPE_PRESETS:
    sc = metrics.scope(preset=preset)
    out |= set(jax.eval_shape(sc.init, params).values)
  return out


def _instrument_keys(params):
  out = set()
  for preset in INSTRUMENT_PRESETS:
    out |= set(jax.eval_shape(metrics.instruments(preset=preset).init, params).values)
  return out


def test_scope_and_instrument_keys_are_disjoint():
  # Before issue 18 the instruments' grads/norm/{leaf} and updates/norm/{leaf} were also
  # the scope's keys (another definition when monitored() does not wrap the optimizer).
  f32 = jnp.float32
  params = {
    "Dense_0": {
      "kernel": jax.ShapeDtypeStruct((6, 5), f32),
      "bias": jax.ShapeDtypeStruct((5,), f32),
    },
    "Dense_1": {
      "kernel": jax.ShapeDtypeStruct((5, 3), f32),
      "bias": jax.ShapeDtypeStruct((3,), f32),
    },
  }
  both = (_scope_keys(params) & _instrument_keys(params)) - {metrics.MEASURED}
  assert not both, sorted(both)
