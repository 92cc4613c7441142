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
  assert cli_main(["diagnose", str(run), "--set", "divergence_factor=10"]) == 0
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
