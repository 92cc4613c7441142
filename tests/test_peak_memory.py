"""The instruments' memory: what the state holds and what a step's temporaries may take.

The state is counted leaf by leaf against the presets' parameter copies, and XLA's own
buffer assignment (``compiled.memory_analysis()``) of the compiled step is checked against
the documented formula of ``docs/instruments.md`` ("Memory"): no per-example gradients
(a ``B·P`` term), no parameter-sized buffer per Hutchinson probe (``hvp_chunk=1``), and
temporaries under ``4·(10·P + 10·B·(D + A))`` bytes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks import peak_memory, problems
from jaxscope import metrics


class _MLP(nn.Module):
  width: int = 256

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width // 2)(x))
    return nn.Dense(10)(x)


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


def _problem(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> problems.Problem:
  x = jax.random.normal(jax.random.key(1), (batch, *input_shape))
  y = jnp.arange(batch, dtype=jnp.int32) % 10
  params = model.init(jax.random.key(0), x)["params"]
  return problems.Problem("test", model, params, x, y, 1)


def _num_params(p: problems.Problem) -> int:
  return int(sum(a.size for a in jax.tree.leaves(p.params)))


def _instruments(preset: str, **kw: object) -> metrics.Instruments:
  # exact_max_params=0: Hutchinson, as on any model of more than 4096 parameters.
  return metrics.instruments(preset=preset, exact_max_params=0, updates_in_span=True, **kw)


def _state_bytes(p: problems.Problem, preset: str) -> int:
  return int(sum(a.nbytes for a in jax.tree.leaves(_instruments(preset).init(p.params))))


def _step_memory(p: problems.Problem, preset: str, **kw: object) -> int:
  """The temporaries in bytes of the donated SGD step with ``preset`` (XLA's own options)."""
  inst = _instruments(preset, **kw)
  tx = optax.sgd(0.1)

  def losses(params: object, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = p.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  def step(params: object, opt_state: object, istate: object, x: jax.Array, y: jax.Array):
    probe = inst.grad(istate, losses, params, x, y)
    updates, opt_state = tx.update(probe.grads, opt_state, params)
    values, istate = inst.update(istate, probe, updates)
    return optax.apply_updates(params, updates), opt_state, istate, values

  state = (p.params, tx.init(p.params), inst.init(p.params))
  jitted = jax.jit(step, donate_argnums=(0, 1, 2))
  return int(jitted.lower(*state, p.x, p.y).compile().memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize(("preset", "copies"), [("economy", 2), ("business", 4), ("full", 5)])
def test_the_state_holds_2_4_5_copies_of_the_parameters(preset: str, copies: int) -> None:
  """economy: the initial parameters and the last update; business: also the Hessian
  diagonal's moving average and its variance; full: also λ_max's vector. The rest (the
  packed values, counters, the key) does not grow with the parameters."""
  rest = []
  for width in (64, 256):
    p = _problem(_MLP(width), (32,), 8)
    rest.append(_state_bytes(p, preset) - 4 * copies * _num_params(p))
  assert rest[0] == rest[1]
  assert 0 < rest[0] < 16384  # the packed values, the 2-D histogram's bins among them


def test_no_per_example_gradients_in_the_temporaries() -> None:
  """Per-example gradients would add ``B·P`` floats; the full step's temporaries grow by
  far less than one parameter copy per example."""
  temps = {}
  for batch in (16, 64):
    p = _problem(_MLP(256), (64,), batch)
    temps[batch] = _step_memory(p, "full")
  num = _num_params(_problem(_MLP(256), (64,), 1))
  assert temps[64] - temps[16] < 48 * 4 * num / 10


@pytest.mark.slow
def test_hutchinson_probes_in_turns_take_a_fraction_of_a_parameter_copy_each() -> None:
  """``hvp_chunk=1`` pushes one probe through the linearised gradient at a time: each
  probe adds 0.3 parameter copies (what XLA reserves for its turn's branch), against two
  (its tangent and its product) when all go through at once (``hvp_chunk=None``)."""
  p = _problem(_MLP(256), (64,), 16)
  copy = 4 * _num_params(p)
  per_probe = {}
  for chunk in (1, None):
    few = _step_memory(p, "business", hutchinson_probes=2, hvp_chunk=chunk)
    many = _step_memory(p, "business", hutchinson_probes=16, hvp_chunk=chunk)
    per_probe[chunk] = (many - few) / 14 / copy
  assert per_probe[1] < 0.5 < 1.5 < per_probe[None]


@pytest.mark.slow
@pytest.mark.parametrize(
  ("model", "shape"), [(_MLP(256), (64,)), (_CNN(), (12, 12, 3))], ids=["mlp", "cnn"]
)
def test_temporaries_stay_under_the_documented_bound(model: nn.Module, shape: tuple) -> None:
  """``temp ≤ 4·(10·P + 10·B·(D + A))`` bytes for every preset and two batch sizes, and
  the bound is not loose by more than an order of magnitude on ``full``."""
  for batch in (8, 32):
    p = _problem(model, shape, batch)
    d, a = peak_memory.activation_floats(p)
    bound = peak_memory.bound_bytes(_num_params(p), batch, d + a)
    for preset in ("economy", "business", "full"):
      temp = _step_memory(p, preset)
      assert temp <= bound, (preset, batch, temp, bound)
    assert temp > bound / 10


def test_fit_line_and_activation_floats_by_hand() -> None:
  """The line through two rows, and ``D + A`` of a model counted by hand."""
  rows = [
    {"batch": 10, "temp_bytes": 4 * (3 * 100 + 7 * 10), "instrument_state_bytes": 4 * 200},
    {"batch": 30, "temp_bytes": 4 * (3 * 100 + 7 * 30), "instrument_state_bytes": 4 * 200},
  ]
  fit = peak_memory.fit_line(rows, 100)
  assert fit == pytest.approx({"t_P": 3.0, "t_B": 7.0, "s_P": 2.0})
  with pytest.raises(ValueError, match="two batch sizes"):
    peak_memory.fit_line(rows[:1], 100)
  p = _problem(_MLP(64), (32,), 4)
  # Input 32; Dense outputs 64, 32, 10; the model's own output (the logits) again.
  assert peak_memory.activation_floats(p) == (32, 64 + 32 + 10 + 10)
