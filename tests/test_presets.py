"""The run presets (issue 20): ``jaxscope train --metrics NAME`` measures exactly what
``jaxscope.metrics.preset(NAME)`` does (:mod:`jaxscope.metrics.presets`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxscope import metrics
from jaxscope.metrics import presets
from jaxscope.run import TrainConfig
from jaxscope.train import measure

PARAMS = {
  "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))},
  "Dense_1": {"kernel": jnp.full((4, 2), 0.5), "bias": jnp.zeros((2,))},
}
#: Captured layer outputs and output gradients, as ``probe.captured`` holds them.
CAPTURED = {"Dense_0": jnp.ones((5, 4)), "Dense_1": jnp.ones((5, 2))}


# The key sets come from ``jax.eval_shape``: the states' structure without running them.


def _scope_keys(sc) -> set[str]:
  return set(jax.eval_shape(sc.init, PARAMS).values)


def _updated_scope_keys(sc) -> set[str]:
  def one_update(p):
    return sc.update(sc.init(p), params=p, grads=p, updates=p)[0]

  return set(jax.eval_shape(one_update, PARAMS))


def _instrument_keys(inst) -> set[str]:
  return set(jax.eval_shape(inst.init, PARAMS).values)


def _activation_keys(sc) -> set[str]:
  return set(jax.eval_shape(lambda c: sc.init(activations=c, layer_grads=c), CAPTURED).values)


def _loop_parts(name: str, **fields):
  """What the loop's ``setup`` builds for ``--metrics name`` with the CLI's defaults."""
  c = TrainConfig(metrics=name, **fields)
  sc = measure.make_scope(
    c.metrics,
    topics=c.topics,
    layers=c.layers,
    exclude=c.exclude,
    depth=c.depth,
    kind=c.kind,
    every=c.every,
    stacked=None,
    low_precision=jnp.dtype(c.param_dtype).itemsize < 4,
  )
  inst = measure.make_instruments(c.metrics, every=c.every, seed=c.seed)
  act = measure.make_activation_scope(c.every, stacked=None)
  return sc, inst, act


@pytest.mark.parametrize("name", metrics.RUN_PRESETS)
def test_cli_presets_are_the_library_presets(name):
  sc, inst, act = _loop_parts(name)
  p = metrics.preset(name)
  assert isinstance(p, metrics.Preset)
  assert _scope_keys(sc) == _scope_keys(p.scope) and _scope_keys(sc)
  assert sc.topics == p.scope.topics == ("params", "grads", "updates")
  assert inst is not None and inst.quantities == p.instruments.quantities
  assert _instrument_keys(inst) == _instrument_keys(p.instruments)
  assert _activation_keys(act) == _activation_keys(p.activations) and _activation_keys(act)
  assert (sc.every, inst.every, act.every) == (1, 1, 1)


def test_preset_parts_are_what_each_preset_holds():
  economy, business, full = (metrics.preset(n) for n in ("economy", "business", "full"))
  # The per-layer scope: business is the economy scope, full adds histograms and more.
  assert _scope_keys(business.scope) == _scope_keys(economy.scope)
  assert "updates/ratio/Dense_0/kernel" in _scope_keys(economy.scope)
  assert "params/spectral_norm/Dense_0/kernel" in _scope_keys(full.scope)
  assert _scope_keys(economy.scope) < _scope_keys(full.scope)
  # The instruments are Cockpit's configuration of the same name.
  for name, p in (("economy", economy), ("business", business), ("full", full)):
    assert p.instruments.quantities == metrics.instruments(preset=name).quantities
  assert "hess_trace" in business.instruments.quantities
  assert "hess_max_ev" in full.instruments.quantities
  assert "hess_max_ev" not in business.instruments.quantities
  # The activation health is the same for all three.
  want = {
    f"{t}/{m}/{layer}"
    for t, ms in presets.ACTIVATION_METRICS.items()
    for m in ms
    for layer in CAPTURED
  }
  for p in (economy, business, full):
    assert _activation_keys(p.activations) == want


def test_one_update_measures_the_same_keys():
  for name in metrics.RUN_PRESETS:
    sc, _, _ = _loop_parts(name)
    keys = _updated_scope_keys(sc)
    assert keys == _updated_scope_keys(metrics.preset(name).scope)
    assert keys == _scope_keys(sc) | {"measured"}


def test_every_seed_and_selection_reach_the_parts():
  p = metrics.preset("business", every=3, seed=7)
  assert (p.scope.every, p.instruments.every, p.activations.every) == (3, 3, 3)
  sc = measure.make_scope("economy", topics=["updates"], kind="kernel", layers="Dense_1")
  q = metrics.preset("economy", topics=["updates"], kind="kernel", include="Dense_1")
  assert _scope_keys(sc) == _scope_keys(q.scope)
  assert {k.split("/")[0] for k in _scope_keys(q.scope)} == {"updates"}
  assert all(k.endswith("Dense_1/kernel") for k in _scope_keys(q.scope))
  with pytest.raises(ValueError, match="unknown topic 'weights'"):
    metrics.preset("economy", topics=["weights"])


def test_unknown_preset_lists_the_names():
  with pytest.raises(
    ValueError, match=r"unknown run preset 'bogus'; presets: economy, business, full"
  ):
    metrics.preset("bogus")
  with pytest.raises(ValueError, match="presets: economy, business, full"):
    presets.scope_metrics("none")


@pytest.mark.parametrize("name", metrics.RUN_PRESETS)
def test_low_precision_adds_the_realised_metrics(name):
  realised = {f"updates/{m}/Dense_0/kernel" for m in presets.REALISED_METRICS}
  plain = _scope_keys(metrics.preset(name).scope)
  low = _scope_keys(metrics.preset(name, low_precision=True).scope)
  assert realised <= low
  if name == "full":  # full measures them anyway.
    assert low == plain
  else:
    assert not realised & plain and low - plain == {
      f"updates/{m}/{layer}" for m in presets.REALISED_METRICS for layer in _layers()
    }
  sc, _, _ = _loop_parts(name, param_dtype="bfloat16")
  assert _scope_keys(sc) == low


def _layers() -> list[str]:
  return [f"{m}/{leaf}" for m, leaves in PARAMS.items() for leaf in leaves]


def test_measure_re_exports_the_library_definitions():
  assert measure.PRESET_SCOPES is presets.PRESET_SCOPES
  assert measure.ACTIVATION_METRICS is presets.ACTIVATION_METRICS
  assert measure.REALISED_METRICS is presets.REALISED_METRICS
  assert tuple(presets.PRESET_SCOPES) == metrics.RUN_PRESETS == ("economy", "business", "full")
  # Metric-name lists and "none" run no instrument and no preset.
  assert measure.make_instruments("norm,mean") is None
  assert measure.make_scope("none") is None
