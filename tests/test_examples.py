"""The examples run end to end (shortened)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from jaxscope.record import History

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(
    f"examples_{name}", ROOT / "examples" / f"{name}.py"
  )
  mod = importlib.util.module_from_spec(spec)
  sys.modules[f"examples_{name}"] = mod
  spec.loader.exec_module(mod)
  return mod


def test_quickstart_writes_a_run_directory(tmp_path, capsys):
  out = tmp_path / "run"
  result = _load("quickstart").main(
    ["--out", str(out), "--epochs", "2", "--every", "3", "--preset", "full"]
  )
  assert np.isfinite(result["loss"]) and result["test/accuracy"] > 0.5
  assert json.loads((out / "config.json").read_text())["preset"] == "full"
  history = History.load(out)
  # every=3: only steps 0, 3, 6, ... carry scope values; test metrics once per epoch.
  assert history.steps("grads/norm/Dense_0/kernel").tolist() == list(range(0, 44, 3))
  assert history.steps("test/accuracy").tolist() == [21, 43]
  assert (out / "plots" / "updates_ratio.png").stat().st_size > 1000
  assert "Dense_0/kernel" in capsys.readouterr().out
