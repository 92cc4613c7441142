"""``jaxscope diagnose RUN`` and the loop's live warning, on a real diverging run."""

from __future__ import annotations

import json
from pathlib import Path

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
