"""``jaxscope train --capacity``: growth in the reference loop, logged, checkpointed, resumed."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from jaxscope.cli import main as cli_main
from jaxscope.train import TrainConfig, parse_capacity, train


def _rows(run_dir: Path) -> list[dict]:
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [{"step": r["step"], **r["values"]} for r in rows]


def _config(out: Path, **kw: object) -> TrainConfig:
  base = dict(
    model="capacity_mlp",
    dataset="sine",
    optimizer="adam",
    lr=0.01,
    steps=80,
    batch_size=32,
    metrics="none",
    capacity="chunks=4,patience=5,policy=all",
    model_args={"widths": (16,)},
    out=str(out),
    quiet=True,
    checkpoint_every=40,
  )
  base.update(kw)
  return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.mark.slow
def test_capacity_run_grows_logs_events_and_resumes_exactly(tmp_path: Path) -> None:
  full = tmp_path / "full"
  train(_config(full))
  rows = [r for r in _rows(full) if "capacity/active/CapacityDense_0" in r]
  active = [r["capacity/active/CapacityDense_0"] for r in rows]
  frozen = [r["capacity/frozen/CapacityDense_0"] for r in rows]
  events = [r["step"] for r in rows if r["capacity/expanded"]]
  assert active[0] == 1 and max(active) > 1  # it grew
  assert events and all(a <= 4 for a in active)
  # Each event raises the active count by one and freezes the chunks trained so far.
  for s in events:
    i = [r["step"] for r in rows].index(s)
    assert active[i] == (active[i - 1] if i else 1) + 1
    assert frozen[i] == active[i] - 1
  # Resume from the step-40 checkpoint: the same metrics as the uninterrupted run.
  part = tmp_path / "part"
  train(_config(part, steps=40))
  train(_config(part, steps=80, resume=True))
  a = {r["step"]: r for r in _rows(full) if "loss" in r}
  b = {r["step"]: r for r in _rows(part) if "loss" in r}
  for s in range(40, 80):
    assert b[s]["capacity/active/CapacityDense_0"] == a[s]["capacity/active/CapacityDense_0"]
    np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-6)


@pytest.mark.slow
def test_capacity_cli_and_errors(tmp_path: Path) -> None:
  out = tmp_path / "cli"
  rc = cli_main(
    [
      "train",
      "--model",
      "capacity_mlp",
      "--dataset",
      "sine",
      "--steps",
      "30",
      "--optimizer",
      "adam",
      "--capacity",
      "chunks=5,patience=3,policy=activation-std,cooldown=2,reinit=false,reset=true,keep=output",
      "--model-args",
      "kernel_init=glorot_uniform",
      "--metrics",
      "none",
      "--out",
      str(out),
      "--no-plots",
      "--quiet",
    ]
  )
  assert rc == 0
  rows = [r for r in _rows(out) if "capacity/expansions" in r]
  assert rows[-1]["capacity/expansions"] >= 1
  events = [r["step"] for r in rows if r["capacity/expanded"]]
  assert all(b - a > 2 for a, b in itertools.pairwise(events))  # cooldown 2
  with pytest.raises(ValueError, match="capacity layers"):
    train(_config(tmp_path / "x", model="mlp", model_args={}))
  with pytest.raises(ValueError, match="unknown key"):
    parse_capacity("chunk=5")
  with pytest.raises(ValueError, match="policy"):
    parse_capacity("policy=largest")
  with pytest.raises(ValueError, match="chunks must be >= 2"):
    parse_capacity("chunks=1")
  assert parse_capacity("patience=3")["chunks"] == 5
  spec = parse_capacity("reinit=false,reset=0,keep=new,cooldown=300")
  got = (spec["reinit"], spec["reset"], spec["keep"], spec["cooldown"])
  assert got == (False, False, "new", 300)
  defaults = parse_capacity("")
  assert (defaults["reinit"], defaults["reset"], defaults["keep"]) == (True, True, "bias")
  with pytest.raises(ValueError, match="reinit must be true or false, got 'maybe'"):
    parse_capacity("reinit=maybe")
  with pytest.raises(ValueError, match="keep must be one of"):
    parse_capacity("keep=head")
  with pytest.raises(ValueError, match="kernel_init must be one of"):
    train(_config(tmp_path / "y", model_args={"widths": (16,), "kernel_init": "glorot"}))
