"""Tests of Recorder.write_stacked: metrics stacked by lax.scan (a leading steps axis)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope import metrics
from jaxscope.record import METRICS_FILE, History, Recorder

T = 5
EVERY = 2
MEASURED_STEPS = [s for s in range(T) if s % EVERY == 0]  # 0, 2, 4
HIST = "grads/histogram_counts/w"


def _loss(params: dict[str, jax.Array]) -> jax.Array:
  return jnp.sum(params["w"] ** 2) + jnp.sum(params["b"])


def _scan_values() -> dict[str, jax.Array]:
  """A scope (economy, every=2) measured in a lax.scan over T SGD steps, plus extras."""
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.ones(2)}
  sc = metrics.scope(preset="economy", every=EVERY)

  def body(carry, _):
    params, state = carry
    loss, grads = jax.value_and_grad(_loss)(params)
    updates = jax.tree.map(lambda g: -0.1 * g, grads)
    values, state = sc.update(state, params=params, grads=grads, updates=updates)
    params = jax.tree.map(jnp.add, params, updates)
    counts, edges = jnp.histogram(grads["w"], bins=4, range=(-2.0, 2.0))
    extra = {
      "loss": loss,
      HIST: counts.astype(jnp.int32),
      "grads/histogram_edges/w": edges,
      "probe/non_finite": jnp.asarray([jnp.nan, jnp.inf, -jnp.inf]) * loss,
    }
    return (params, state), {**values, **extra}

  scan = jax.jit(lambda carry: jax.lax.scan(body, carry, length=T))
  _, stacked = scan((params, sc.init(params)))
  return stacked


@pytest.fixture(scope="module")
def stacked() -> dict[str, jax.Array]:
  values = _scan_values()
  assert values["measured"].shape == (T,)
  assert all(v.shape[0] == T for v in values.values())
  return values


def _rows(stacked: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
  return [{k: v[i] for k, v in stacked.items()} for i in range(T)]


def _lines(run_dir: Path) -> bytes:
  return (run_dir / METRICS_FILE).read_bytes()


def _write_per_step(run_dir: Path, stacked: dict[str, jax.Array], start: int = 0, **kw) -> bytes:
  with Recorder(run_dir, **kw) as rec:
    for i, row in enumerate(_rows(stacked)):
      rec.write(start + i, row)
  return _lines(run_dir)


def test_same_lines_as_write_per_step(tmp_path: Path, stacked) -> None:
  want = _write_per_step(tmp_path / "loop", stacked)
  assert want.count(b"\n") == len(MEASURED_STEPS)
  assert b'"NaN"' in want and b'"-Infinity"' in want
  with Recorder(tmp_path / "scan") as rec:
    rec.write_stacked(list(range(T)), stacked)
    assert rec.num_pending == T
  assert _lines(tmp_path / "scan") == want


def test_steps_forms_give_the_same_lines(tmp_path: Path, stacked) -> None:
  want = _write_per_step(tmp_path / "loop", stacked, start=10)
  forms = {
    "start": 10,
    "range": range(10, 10 + T),
    "numpy": np.arange(10, 10 + T, dtype=np.int32),
    "device": jnp.arange(10, 10 + T),
  }
  for name, steps in forms.items():
    with Recorder(tmp_path / name) as rec:
      rec.write_stacked(steps, stacked)
    assert _lines(tmp_path / name) == want, name


def test_gaps_and_chunks_with_transfer_every(tmp_path: Path, stacked) -> None:
  """Two scan chunks, arbitrary increasing steps, a plain write between: one file."""
  steps = [3, 7, 8, 20, 21]
  want_rec = Recorder(tmp_path / "loop", transfer_every=2)
  with want_rec as rec:
    for step, row in zip(steps, _rows(stacked), strict=True):
      rec.write(step, row)
    rec.write(25, {"loss": 1.5})
    for i, row in enumerate(_rows(stacked)):
      rec.write(30 + i, row)
  with Recorder(tmp_path / "scan", transfer_every=2) as rec:
    rec.write_stacked(steps, stacked)
    rec.write(25, {"loss": jnp.float32(1.5)})
    assert _lines(tmp_path / "scan") == b""  # Nothing read yet: one batch of 2 pending.
    assert rec.num_pending == T + 1
    rec.write_stacked(30, stacked)
    assert rec.num_pending == T  # The first two writes were transferred.
    assert _lines(tmp_path / "scan").count(b"\n") == len(MEASURED_STEPS) + 1
  assert _lines(tmp_path / "scan") == _lines(tmp_path / "loop")


def test_history_reads_the_written_steps(tmp_path: Path, stacked) -> None:
  with Recorder(tmp_path) as rec:
    rec.write_stacked(100, stacked)
  h = History.load(tmp_path)
  want_steps = [100 + s for s in MEASURED_STEPS]
  assert "measured" not in h
  assert sorted(h.keys()) == sorted(k for k in stacked if k != "measured")
  for key in h.keys():
    assert h.steps(key).tolist() == want_steps
  np.testing.assert_allclose(h["loss"], np.asarray(stacked["loss"])[MEASURED_STEPS], rtol=1e-6)
  np.testing.assert_array_equal(h[HIST], np.asarray(stacked[HIST])[MEASURED_STEPS])
  norm = h["params/norm/w"]
  np.testing.assert_allclose(norm, np.asarray(stacked["params/norm/w"])[MEASURED_STEPS])
  assert len(set(norm.tolist())) == len(MEASURED_STEPS)  # Measured anew, not repeated.
  nf = h["probe/non_finite"]
  assert math.isnan(nf[0, 0]) and nf[0, 1] == math.inf and nf[0, 2] == -math.inf


def test_tensorboard_matches_write_per_step(tmp_path: Path, stacked) -> None:
  pytest.importorskip("tensorboardX")
  ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  _write_per_step(tmp_path / "loop", stacked, tensorboard=True)
  with Recorder(tmp_path / "scan", tensorboard=True) as rec:
    rec.write_stacked(0, stacked)

  def events(run: str):
    acc = ea.EventAccumulator(
      str(tmp_path / run / "tensorboard"), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0}
    )
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    hists = {t: [(e.step, list(e.histogram_value.bucket)) for e in acc.Histograms(t)]
             for t in acc.Tags()["histograms"]}  # fmt: skip
    return scalars, hists

  scalars, hists = events("scan")
  assert (scalars, hists) == events("loop")
  assert [s for s, _ in scalars["loss"]] == MEASURED_STEPS
  assert [s for s, _ in hists["grads/histogram/w"]] == MEASURED_STEPS


def test_errors(tmp_path: Path, stacked) -> None:
  with Recorder(tmp_path) as rec:
    bad = {**stacked, "loss": stacked["loss"][:3]}
    with pytest.raises(ValueError, match=r"'loss' has shape \(3,\).*has shape \(5,"):
      rec.write_stacked(0, bad)
    with pytest.raises(ValueError, match="'loss' has shape \\(\\) and no leading steps axis"):
      rec.write_stacked(0, {"loss": jnp.float32(1.0)})
    with pytest.raises(TypeError, match="'loss' must be an array with a leading steps axis"):
      rec.write_stacked(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="'measured' must have shape \\(T,\\)"):
      rec.write_stacked(0, {"loss": jnp.ones((2, 3)), "measured": jnp.ones((2, 3), bool)})
    with pytest.raises(ValueError, match="steps must be increasing, got 2 after 2"):
      rec.write_stacked([0, 1, 2, 2, 3], stacked)
    with pytest.raises(ValueError, match="steps must be increasing, got 1 after 3"):
      rec.write_stacked(np.array([0, 3, 1, 4, 5]), stacked)
    with pytest.raises(
      ValueError, match="steps has 4 entries but the values have a leading axis of 5"
    ):
      rec.write_stacked([0, 1, 2, 3], stacked)
    with pytest.raises(
      ValueError, match="steps has 6 entries but the values have a leading axis of 5"
    ):
      rec.write_stacked(jnp.arange(6), stacked)
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
      rec.write_stacked([-1, 0, 1, 2, 3], stacked)
    with pytest.raises(ValueError, match=r"steps \(the start\) must be >= 0"):
      rec.write_stacked(-1, stacked)
    with pytest.raises(TypeError, match="steps must hold ints, got dtype float64"):
      rec.write_stacked([0.0, 1.0, 2.0, 3.0, 4.0], stacked)
    with pytest.raises(TypeError, match="steps must be an int start or a 1-D sequence"):
      rec.write_stacked(True, stacked)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be 1-D"):
      rec.write_stacked([[0, 1, 2, 3, 4]], stacked)
    with pytest.raises(ValueError, match=r"not a scalar.*write_stacked"):
      rec.write(0, stacked)
    assert rec.num_pending == 0
  assert _lines(tmp_path) == b""
  with pytest.raises(ValueError, match=r"Recorder\.write_stacked: the recorder is closed"):
    rec.write_stacked(0, stacked)


def test_device_steps_are_checked_when_transferred(tmp_path: Path, stacked) -> None:
  rec = Recorder(tmp_path)
  rec.write_stacked(jnp.asarray([0, 1, 5, 4, 6]), stacked)  # Returns: not read yet.
  with pytest.raises(ValueError, match=r"steps \(device array\) must be increasing, got 4 after 5"):
    rec.flush()
  rec.close()
  assert _lines(tmp_path) == b""
