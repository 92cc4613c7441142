"""Tests of jaxscope.record: Recorder (deferred transfer, crash safety, TensorBoard), History."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscope import record
from jaxscope.record import History, Recorder

N_STEPS = 20
LAYERS = ("Dense_0/kernel", "Dense_1/kernel")
BINS = 4


def _inputs(step: int) -> dict[str, np.ndarray]:
  """Host-side inputs of a step (numpy), computed independently of the recorder."""
  rng = np.random.default_rng(step)
  out: dict[str, np.ndarray] = {}
  for i, layer in enumerate(LAYERS):
    out[f"grads/norm/{layer}"] = np.float32(rng.uniform(0.1, 10.0) * (i + 1))
  out["updates/ratio/Dense_0/kernel"] = np.float32(rng.uniform(1e-4, 1e-2))
  out["grads/histogram_counts/Dense_0/kernel"] = rng.integers(0, 50, BINS).astype(np.int32)
  lo = np.float32(rng.uniform(-2.0, -1.0))
  out["grads/histogram_edges/Dense_0/kernel"] = np.linspace(lo, -lo, BINS + 1, dtype=np.float32)
  out["loss"] = np.float32(1.0 / (step + 1))
  return out


def _measured(step: int) -> bool:
  return step % 3 != 2


def _device_values(step: int) -> dict[str, jax.Array]:
  values = {k: jnp.asarray(v) for k, v in _inputs(step).items()}
  values["measured"] = jnp.asarray(_measured(step))
  return values


def _write_run(run_dir: Path, transfer_every: int = 1, **kw: object) -> None:
  with Recorder(run_dir, transfer_every=transfer_every, **kw) as rec:
    for step in range(N_STEPS):
      rec.write(step, _device_values(step))


def test_round_trip(tmp_path: Path) -> None:
  _write_run(tmp_path / "run", config={"lr": 1e-3, "layers": [2, 3], "path": tmp_path})
  h = History.load(tmp_path / "run")
  measured = [s for s in range(N_STEPS) if _measured(s)]
  assert len(measured) < N_STEPS
  expected_keys = list(_inputs(0))
  assert sorted(h.keys()) == sorted(expected_keys)
  assert "measured" not in h
  for key in expected_keys:
    steps, values = h.series(key)
    assert steps.dtype == np.int64
    np.testing.assert_array_equal(steps, measured)
    want = np.stack([_inputs(s)[key] for s in measured])
    if want.dtype.kind == "f":
      assert values.dtype == np.float64
      np.testing.assert_array_equal(values, want.astype(np.float64))
    else:
      assert values.dtype == np.int64
      np.testing.assert_array_equal(values, want.astype(np.int64))
  assert h["grads/histogram_counts/Dense_0/kernel"].shape == (len(measured), BINS)
  assert h["grads/histogram_edges/Dense_0/kernel"].shape == (len(measured), BINS + 1)
  assert h.topics() == ["grads", "updates"]
  assert h.stats("grads") == ["norm", "histogram_counts", "histogram_edges"]
  assert h.layers("grads", "norm") == list(LAYERS)
  assert h.layers("updates", "ratio") == ["Dense_0/kernel"]
  assert h.config == {"lr": 1e-3, "layers": [2, 3], "path": str(tmp_path)}
  assert h.run_dir == tmp_path / "run"
  # Every line is one record {"step", "values"} without the flag.
  lines = (tmp_path / "run" / record.METRICS_FILE).read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == measured
  assert not list((tmp_path / "run").glob("*.tmp"))


def test_layers_keep_first_seen_order() -> None:
  h = History([(0, {"a/s/z": 1.0, "a/s/b/c": 2.0, "a/t/y": 0.0}), (1, {"a/s/m": 3.0})])
  assert h.layers("a", "s") == ["z", "b/c", "m"]
  assert h.stats("a") == ["s", "t"]


def test_python_and_numpy_values(tmp_path: Path) -> None:
  with Recorder(tmp_path) as rec:
    rec.write(np.int64(3), {"a": 1.5, "b": 2, "c": np.float16(0.5), "d": jnp.bfloat16(0.25)})
    rec.write(4, {"a": np.float64(2.5), "measured": True})
    rec.write(5, {"a": 9.0, "measured": np.bool_(False)})
  h = History.load(tmp_path)
  np.testing.assert_array_equal(h.steps("a"), [3, 4])
  np.testing.assert_array_equal(h["a"], [1.5, 2.5])
  assert h["b"].dtype == np.int64 and h["b"].tolist() == [2]
  assert h["c"].tolist() == [0.5] and h["d"].tolist() == [0.25]


def test_nan_and_inf_round_trip(tmp_path: Path) -> None:
  with Recorder(tmp_path) as rec:
    rec.write(0, {"loss": jnp.float32(jnp.nan), "x/y/z": jnp.float32(jnp.inf)})
    rec.write(1, {"loss": jnp.float32(1.0), "x/y/z": jnp.float32(-jnp.inf)})
    rec.write(2, {"loss": jnp.array([jnp.nan, jnp.inf, 1.0])})
  text = (tmp_path / record.METRICS_FILE).read_text()
  assert "NaN" in text and "Infinity" in text
  h = History.load(tmp_path)
  steps, loss = h.series("x/y/z")
  assert steps.tolist() == [0, 1]
  assert loss[0] == np.inf and loss[1] == -np.inf
  lines = [record.loads(line) for line in text.splitlines()]
  assert math.isnan(lines[0]["values"]["loss"])
  v = lines[2]["values"]["loss"]
  assert math.isnan(v[0]) and v[1] == math.inf and v[2] == 1.0


def test_transfer_every_gives_same_file(tmp_path: Path) -> None:
  _write_run(tmp_path / "a", transfer_every=1)
  _write_run(tmp_path / "b", transfer_every=5)
  _write_run(tmp_path / "c", transfer_every=64)
  a = (tmp_path / "a" / record.METRICS_FILE).read_bytes()
  assert a
  assert (tmp_path / "b" / record.METRICS_FILE).read_bytes() == a
  assert (tmp_path / "c" / record.METRICS_FILE).read_bytes() == a


def _n_lines(path: Path) -> int:
  return len(path.read_text().splitlines()) if path.exists() else 0


def test_recorder_holds_newest_step_untransferred(tmp_path: Path) -> None:
  f = tmp_path / record.METRICS_FILE
  rec = Recorder(tmp_path)
  rec.write(0, {"loss": jnp.float32(0.0)})
  assert _n_lines(f) == 0 and rec.num_pending == 1
  rec.write(1, {"loss": jnp.float32(1.0)})
  assert _n_lines(f) == 1 and rec.num_pending == 1
  assert json.loads(f.read_text())["step"] == 0
  rec.write(2, {"loss": jnp.float32(2.0)})
  assert _n_lines(f) == 2
  rec.flush()
  assert _n_lines(f) == 3 and rec.num_pending == 0
  rec.close()
  rec.close()  # Idempotent.
  assert rec.closed
  with pytest.raises(ValueError, match="closed"):
    rec.write(3, {"loss": 3.0})


def test_transfer_in_batches(tmp_path: Path) -> None:
  f = tmp_path / record.METRICS_FILE
  rec = Recorder(tmp_path, transfer_every=3)
  counts = []
  for step in range(7):
    rec.write(step, {"loss": jnp.float32(step)})
    counts.append(_n_lines(f))
  # Steps 0-2 go out when step 3 is written, steps 3-5 when step 6 is written.
  assert counts == [0, 0, 0, 3, 3, 3, 6]
  rec.close()
  assert _n_lines(f) == 7


def test_values_dict_is_copied(tmp_path: Path) -> None:
  values = {"loss": jnp.float32(1.0)}
  with Recorder(tmp_path) as rec:
    rec.write(0, values)
    values["loss"] = jnp.float32(5.0)
    values["other"] = jnp.float32(2.0)
  h = History.load(tmp_path)
  assert h["loss"].tolist() == [1.0] and "other" not in h


def _run_script(code: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
  script = "import sys\nrun_dir = sys.argv[1]\n" + textwrap.dedent(code)
  return subprocess.run(
    [sys.executable, "-c", script, str(run_dir)],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def test_crash_inside_context_manager_keeps_all_steps(tmp_path: Path) -> None:
  proc = _run_script(
    """
    import jax.numpy as jnp
    from jaxscope.record import Recorder
    with Recorder(run_dir, transfer_every=4) as rec:
      for step in range(7):
        rec.write(step, {"loss": jnp.float32(step) * 0.5})
      raise RuntimeError("boom")
    """,
    tmp_path,
  )
  assert proc.returncode != 0
  assert "RuntimeError: boom" in proc.stderr
  h = History.load(tmp_path)
  assert h.steps("loss").tolist() == list(range(7))
  np.testing.assert_array_equal(h["loss"], 0.5 * np.arange(7))


def test_hard_exit_after_flush_keeps_flushed_steps(tmp_path: Path) -> None:
  proc = _run_script(
    """
    import os
    import jax.numpy as jnp
    from jaxscope.record import Recorder
    rec = Recorder(run_dir, transfer_every=2)
    for step in range(5):
      rec.write(step, {"loss": jnp.float32(step)})
    rec.flush()
    rec.write(5, {"loss": jnp.float32(5)})  # Pending: lost by the hard exit.
    os._exit(1)
    """,
    tmp_path,
  )
  assert proc.returncode == 1, proc.stderr
  h = History.load(tmp_path)
  assert h.steps("loss").tolist() == [0, 1, 2, 3, 4]


def test_truncated_last_line_is_skipped_with_warning(tmp_path: Path) -> None:
  with Recorder(tmp_path) as rec:
    for step in range(3):
      rec.write(step, {"loss": float(step)})
  f = tmp_path / record.METRICS_FILE
  with open(f, "a") as fh:
    fh.write('{"step": 3, "values": {"lo')
  with pytest.warns(RuntimeWarning, match="line 4"):
    h = History.load(tmp_path)
  assert h.steps("loss").tolist() == [0, 1, 2]
  # Resuming appends after the truncated line without gluing onto it.
  with Recorder(tmp_path) as rec:
    rec.write(3, {"loss": 3.0})
  with pytest.warns(RuntimeWarning, match="line 4"):
    h = History.load(tmp_path)
  assert h.steps("loss").tolist() == [0, 1, 2, 3]


def test_later_records_of_a_step_win(tmp_path: Path) -> None:
  with Recorder(tmp_path) as rec:
    for step in range(4):
      rec.write(step, {"loss": float(step)})
  with Recorder(tmp_path) as rec:  # Resumed from a checkpoint at step 2.
    rec.write(2, {"loss": 20.0})
    rec.write(2, {"eval/loss": 7.0})
  h = History.load(tmp_path)
  assert h.steps("loss").tolist() == [0, 1, 2, 3]
  assert h["loss"].tolist() == [0.0, 1.0, 20.0, 3.0]
  assert h.series("eval/loss")[0].tolist() == [2]


def test_missing_key_error_lists_keys() -> None:
  h = History([(0, {"loss": 1.0, "grads/norm/Dense_0/kernel": 2.0})])
  with pytest.raises(KeyError, match="grads/norm/Dense_0/kernel"):
    h["grads/norm/Dense_1/kernel"]
  with pytest.raises(KeyError, match="loss"):
    h.steps("accuracy")


def test_load_missing_dir(tmp_path: Path) -> None:
  with pytest.raises(FileNotFoundError):
    History.load(tmp_path / "nope")
  h = History.load(tmp_path)
  assert h.keys() == [] and h.config == {}


def test_tensorboard(tmp_path: Path) -> None:
  pytest.importorskip("tensorboardX")
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  _write_run(tmp_path, tensorboard=True)
  acc = event_accumulator.EventAccumulator(
    str(tmp_path / record.TENSORBOARD_DIR), size_guidance={"scalars": 0, "histograms": 0}
  )
  acc.Reload()
  tags = acc.Tags()
  measured = [s for s in range(N_STEPS) if _measured(s)]
  assert "loss" in tags["scalars"] and "grads/norm/Dense_1/kernel" in tags["scalars"]
  assert "measured" not in tags["scalars"]
  for key in ("loss", "grads/norm/Dense_1/kernel"):
    events = acc.Scalars(key)
    assert [e.step for e in events] == measured
    want = [float(_inputs(s)[key]) for s in measured]
    np.testing.assert_allclose([e.value for e in events], want, rtol=1e-6)
  assert tags["histograms"] == ["grads/histogram/Dense_0/kernel"]
  hists = acc.Histograms("grads/histogram/Dense_0/kernel")
  assert [e.step for e in hists] == measured
  first = hists[0].histogram_value
  counts = _inputs(measured[0])["grads/histogram_counts/Dense_0/kernel"]
  edges = _inputs(measured[0])["grads/histogram_edges/Dense_0/kernel"]
  assert first.num == counts.sum()
  np.testing.assert_allclose(first.min, edges[0], rtol=1e-6)
  np.testing.assert_allclose(first.max, edges[-1], rtol=1e-6)
  np.testing.assert_allclose(list(first.bucket), counts)
  np.testing.assert_allclose(list(first.bucket_limit), edges[1:], rtol=1e-6)


def test_tensorboard_missing_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with pytest.raises(ImportError, match=r"pip install 'jaxscope\[tensorboard\]'"):
    Recorder(tmp_path / "run", tensorboard=True)
  assert not (tmp_path / "run").exists()


def test_bad_input(tmp_path: Path) -> None:
  with Recorder(tmp_path) as rec:
    with pytest.raises(ValueError, match="step must be >= 0"):
      rec.write(-1, {"loss": 1.0})
    with pytest.raises(TypeError, match="step must be an int"):
      rec.write(1.0, {"loss": 1.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="step must be an int"):
      rec.write(True, {"loss": 1.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loop counter"):
      rec.write(jnp.int32(1), {"loss": 1.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="values must be a Mapping"):
      rec.write(0, [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys must be str"):
      rec.write(0, {1: 1.0})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="'name'"):
      rec.write(0, {"name": "adam"})
    with pytest.raises(TypeError, match="tracer"):
      jax.jit(lambda x: rec.write(0, {"loss": x}))(1.0)
  assert rec.num_pending == 0
  assert History.load(tmp_path).keys() == []
  with pytest.raises(ValueError, match="transfer_every"):
    Recorder(tmp_path, transfer_every=0)


def test_non_zero_process_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with Recorder(tmp_path / "run", config={"a": 1}) as rec:
    rec.write(0, {"loss": jnp.float32(1.0)})
    rec.write(1, {"loss": jnp.float32(1.0)})
    rec.flush()
  assert not (tmp_path / "run").exists()


def test_deleted_array_gives_clear_error(tmp_path: Path) -> None:
  x = jnp.ones(())
  step = jax.jit(lambda a: a + 1, donate_argnums=0)
  rec = Recorder(tmp_path)
  rec.write(0, {"loss": x})
  y = step(x)  # Donates (deletes) x on backends that support donation.
  if not x.is_deleted():
    rec.close()
    pytest.skip("this backend does not donate buffers")
  with pytest.raises(RuntimeError, match="donated"):
    rec.write(1, {"loss": y})
  rec.close()


def _strict(text: str):
  def reject(token):
    raise ValueError(f"non-strict JSON token {token}")

  return json.loads(text, parse_constant=reject)


def test_json_convention_is_strict_and_round_trips(tmp_path: Path) -> None:
  obj = {
    "a": float("nan"),
    "b": [1.5, float("inf"), -np.inf],
    "c": np.float32(np.nan),
    "d": np.array([[1.0, np.nan]]),
    "e": (1, None, "x"),
    "f": tmp_path,
  }
  text = record.dumps(obj)
  plain = _strict(text)  # any strict parser reads it
  assert plain["a"] == "NaN" and plain["b"] == [1.5, "Infinity", "-Infinity"]
  assert (
    plain["d"] == [[1.0, "NaN"]] and plain["e"] == [1, None, "x"] and plain["f"] == str(tmp_path)
  )
  back = record.loads(text)
  assert math.isnan(back["a"]) and math.isnan(back["c"]) and back["e"] == [1, None, "x"]
  assert back["b"] == [1.5, math.inf, -math.inf] and math.isnan(back["d"][0][1])
  record.write_json(tmp_path / "x.json", obj)
  assert (tmp_path / "x.json").read_text().endswith("\n")
  assert record.read_json(tmp_path / "x.json")["b"] == [1.5, math.inf, -math.inf]
  # The metrics log is strict JSON Lines too.
  with Recorder(tmp_path / "run") as rec:
    rec.write(0, {"loss": jnp.float32(jnp.nan), "h": jnp.array([jnp.inf, 1.0])})
  (line,) = (tmp_path / "run" / record.METRICS_FILE).read_text().splitlines()
  assert _strict(line) == {"step": 0, "values": {"loss": "NaN", "h": ["Infinity", 1.0]}}


def test_json_reads_what_earlier_versions_wrote(tmp_path: Path) -> None:
  # metrics.jsonl with bare tokens, diagnoses with "nan"/"inf", analyses with null.
  old = '{"step": 3, "values": {"loss": NaN, "g": [Infinity, -Infinity, 2.0]}}\n'
  (tmp_path / record.METRICS_FILE).write_text(old)
  h = History.load(tmp_path)
  assert math.isnan(h["loss"][0]) and h["g"][0].tolist() == [math.inf, -math.inf, 2.0]
  back = record.loads('{"v": ["nan", "inf", "-inf"], "w": null, "s": "nanny"}')
  assert math.isnan(back["v"][0]) and back["v"][1:] == [math.inf, -math.inf]
  assert back["w"] is None and back["s"] == "nanny"


def test_packed_values_give_the_file_a_dict_gives(tmp_path: Path) -> None:
  """A PackedValues is written as the dict of its entries would be (one device_get of its
  few arrays); stacked rows and a false `measured` are handled the same; a donated one
  fails with a clear message."""
  from jaxscope.packed import PackedValues

  def values(step: int) -> dict:
    return {
      "loss": jnp.float32(1.0 / (step + 1)),
      "measured": jnp.bool_(step != 1),
      "hist": jnp.arange(3.0) * step,
      "count": jnp.int32(step),
    }

  for name, wrap in (("dict", dict), ("packed", PackedValues.pack)):
    with Recorder(tmp_path / name) as rec:
      for step in range(3):
        rec.write(step, wrap(values(step)))
      stacked = jax.lax.scan(lambda c, _, w=wrap: (c + 1, w(values(c))), 0, length=3)[1]
      rec.write_stacked(10, stacked)
  # The same records (a dict through jit comes back with its keys sorted, so the order of
  # keys within a record may differ).
  records = {
    n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
    for n in ("dict", "packed")
  }
  assert records["packed"] == records["dict"]
  assert [r["step"] for r in records["packed"]] == [0, 2, 10, 12]

  donated = jax.jit(lambda v: v, donate_argnums=0)
  live = PackedValues.pack(values(0))
  with pytest.raises(RuntimeError, match=r"'4 packed values \(float32\)' at step 0 was deleted"):
    with Recorder(tmp_path / "gone", transfer_every=1) as rec:
      rec.write(0, live)
      donated(live)
      rec.write(1, values(1))
