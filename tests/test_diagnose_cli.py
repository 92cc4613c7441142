"""``jaxscope diagnose RUN`` and the loop's live warning, on a real diverging run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxscope.cli import main as cli_main
from jaxscope.train import TrainConfig, train


@pytest.mark.slow
def test_diverging_run_is_diagnosed_live_and_by_the_command(tmp_path: Path, capsys) -> None:
  run = tmp_path / "run"
  train(
    TrainConfig(
      model="mlp",
      dataset="digits",
      optimizer="sgd",
      lr=200.0,  # far too high: the loss explodes within a few steps
      steps=40,
      eval_every=10,
      checkpoint_every=0,
      metrics="norm,ratio",
      out=str(run),
      quiet=True,
    )
  )
  err = capsys.readouterr().err
  assert "jaxscope [critical] divergence" in err  # the live warning, printed once
  assert err.count("] divergence") == 1
  # A problem found: exit 1 (0 only when none is).
  assert cli_main(["diagnose", str(run), "--set", "divergence_factor=10"]) == 1
  out = capsys.readouterr().out
  assert "divergence" in out
  data = json.loads((run / "diagnosis.json").read_text())
  names = [f["name"] for f in data["findings"]]
  assert names[0] == "divergence"  # the most severe first
  first = data["findings"][0]
  assert first["severity"] == "critical" and first["advice"]
  assert (run / "diagnosis.png").stat().st_size > 5_000
  with pytest.raises(SystemExit) as e:
    cli_main(["diagnose", str(run), "--set", "no_such_threshold=1"])
  assert e.value.code == 2
  assert "no_such_threshold" in capsys.readouterr().err


def test_exit_status_healthy_findings_unreadable(tmp_path, capsys):
  """0 healthy, 1 findings, 2 an unreadable log with one clear line (issue 21)."""
  import json

  def write(name, lines):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(lines))
    return str(d)

  # A smoothly falling loss: healthy, also at its fast-falling start (it was "instability").
  smooth = write(
    "smooth", [json.dumps({"step": s, "values": {"loss": 2.0 * 0.97**s}}) + "\n" for s in range(50)]
  )
  assert cli_main(["diagnose", smooth]) == 0
  assert "No problem found" in capsys.readouterr().out
  # A loss that explodes and then turns NaN: the finding names the NaN and the layer.
  recs = []
  for s in range(30):
    loss = 2.0 * 1.5**s if s < 20 else "NaN"
    g0 = 2.0**s if s < 18 else "NaN"
    recs.append(json.dumps({"step": s, "values": {"loss": loss, "grads/norm/Dense_0/kernel": g0}}))
  nan = write("nan", [r + "\n" for r in recs])
  assert cli_main(["diagnose", nan]) == 1
  out = capsys.readouterr().out
  assert "from step 20 it is NaN" in out and "'grads/norm/Dense_0/kernel'" in out
  assert "at step 18" in out
  # Records of the wrong shape: exit 2, one line naming the file and the expected form.
  bad = write("bad", ['{"step": 0, "loss": 1.0}\n', '{"step": 1, "loss": 0.9}\n'])
  with pytest.raises(SystemExit) as e:
    cli_main(["diagnose", bad])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "holds no readable record (2 unreadable line(s)" in err[0]


def test_divergence_guard_reads_one_step_behind():
  from jaxscope.train.guard import DivergenceGuard

  g = DivergenceGuard(factor=10)
  assert g.check(0, 2.0) is None  # nothing before step 0
  assert g.check(1, 3.0) is None  # step 0: 2.0 is the initial loss
  assert g.check(2, 25.0) is None  # step 1: 3.0
  assert "step 2 is 25, above 10 × the initial 2" in g.check(3, float("nan"))
  g = DivergenceGuard()
  g.check(0, float("inf"))
  assert g.check(1, 1.0) == "the loss at step 0 is inf"


@pytest.mark.slow
def test_stop_on_divergence_stops_before_the_nan_is_recorded(tmp_path, capsys):
  """lr 1e4 explodes the loss: --stop-on divergence stops one step after it went above
  10 × the initial loss, so the log holds only that step of the diverged run (issue 21)."""
  import json

  from jaxscope.run import TrainConfig
  from jaxscope.train import train

  cfg = dict(model="mlp", dataset="digits", lr=1e4, steps=20, batch_size=64, metrics="none")
  result = train(TrainConfig(**cfg, quiet=True, stop_on="divergence", out=str(tmp_path / "a")))
  assert result.diverged is not None and "above 10 × the initial" in result.diverged
  assert result.steps < 20
  err = capsys.readouterr().err
  assert "stopped at step" in err and "--stop-on divergence" in err

  def losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["values"]["loss"] for r in lines if "loss" in r["values"]]

  guarded = losses(result.run_dir)
  assert all(isinstance(v, float) for v in guarded)  # no "NaN"/"Infinity" recorded
  high = [v > 10 * guarded[0] for v in guarded]
  assert high[-1] and not any(high[:-1])  # only the step that diverged is in the log
  # Without the option the same run goes on recording the diverged loss.
  plain = train(TrainConfig(**cfg, quiet=True, live_diagnosis=False, out=str(tmp_path / "b")))
  assert plain.diverged is None and plain.steps == 20
  assert sum(not (isinstance(v, float) and v <= 10 * guarded[0]) for v in losses(plain.run_dir)) > 5


def test_divergence_guard_holds_a_nonfinite_step_back():
  """The record of a step is written once its loss is read; a non-finite one becomes a
  ``stop/nonfinite_loss`` record naming nothing non-finite (issue 21)."""
  from jaxscope.train.guard import DivergenceGuard, nonfinite_examples

  g = DivergenceGuard()
  assert g.check(0, 2.0) is None and g.release(False) is None
  g.hold(0, {"loss": 2.0})
  assert g.check(1, float("nan")) is None  # step 0 is fine
  assert g.release(False) == (0, {"loss": 2.0})
  vals = {"loss": float("nan"), "grads/norm/Dense_10": np.nan, "grads/norm/Dense_2": np.inf,
          "updates/ratio/Dense_0": np.inf, "grads/norm/Dense_0": 1.0}  # fmt: skip
  g.hold(1, vals)
  why = g.settle()
  assert why == "the loss at step 1 is nan"
  assert DivergenceGuard.nonfinite_keys(vals) == [
    "grads/norm/Dense_2",
    "grads/norm/Dense_10",
    "loss",
  ]
  assert g.release(True) == (1, {"stop/nonfinite_loss": 1.0})
  g.hold(2, {"loss": 50.0})  # an explosion that stays finite is recorded as it is
  assert g.release(True) == (2, {"loss": 50.0})
  x = np.zeros((5, 3), np.float32)
  x[3, 1] = np.nan
  y = np.array([0.0, np.inf, 0.0, 0.0, 0.0])
  assert nonfinite_examples(x, y).tolist() == [1, 3]
  assert nonfinite_examples(x, np.arange(5)).tolist() == [3]  # integer labels are finite
  g = DivergenceGuard(bad_examples=[3])
  assert g.check_batch(0, np.array([0, 1, 2])) is None
  assert "index 3" in g.check_batch(4, np.array([4, 3]))
  assert DivergenceGuard().check_batch(0, np.array([3])) is None


@pytest.mark.slow
def test_stop_on_divergence_stops_before_a_batch_with_nan_data(tmp_path, capsys):
  """A NaN in one training example: --stop-on divergence stops before the step whose batch
  holds it, the log holds no non-finite loss, and the diagnosis names the stop and the
  data (issue 21)."""
  import json

  from jaxscope.diagnose import diagnose
  from jaxscope.record import History
  from jaxscope.run import TrainConfig
  from jaxscope.train import train

  faults = "benchmarks.diagnose.faults"
  cfg = dict(model=f"{faults}:faulty_mlp", dataset=f"{faults}:load_faulty",
             data_args={"task": "moons", "seed": 0, "nan_fraction": 1e-3}, lr=0.05,
             optimizer="momentum", steps=60, batch_size=64, metrics="economy")  # fmt: skip
  result = train(TrainConfig(**cfg, quiet=True, stop_on="divergence", out=str(tmp_path / "a")))
  assert result.diverged is not None and "non-finite input or target" in result.diverged
  assert 0 < result.steps < 60
  err = capsys.readouterr().err
  assert f"stopped at step {result.steps}" in err
  # The live diagnosis names the data at step 0, before any step has run.
  assert err.index("[critical] nonfinite_data") < err.index("stopped at step")
  lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["values"]["loss"] for r in lines if "loss" in r["values"]]
  assert len(losses) == result.steps and all(isinstance(v, float) for v in losses)
  assert lines[-1] == {"step": result.steps, "values": {"stop/nonfinite_batch": 1.0}}
  names = {f.name: f for f in diagnose(History.load(result.run_dir))}
  assert names["divergence"].severity == "critical"
  assert f"stopped at step {result.steps}" in names["divergence"].summary
  assert "nonfinite_data" in names
  # Without the option the same run records NaN losses from that step on.
  plain = train(TrainConfig(**cfg, quiet=True, live_diagnosis=False, out=str(tmp_path / "b")))
  plain_lines = [json.loads(x) for x in (plain.run_dir / "metrics.jsonl").read_text().splitlines()]
  assert any(r["values"].get("loss") == "NaN" for r in plain_lines)
