"""Cutting a run's metrics log back to a checkpoint, so that a resumed run records each
step once.

A run resumed from the checkpoint of step ``S`` computes steps ``S, S+1, …`` again. Their
records from before the interruption are cut from ``metrics.jsonl`` by :func:`rewind_log`:
every record of a step after ``S``, the training record of ``S`` itself, and any line that
is not a complete record (a crash can leave one at the end). The evaluation of ``S``
(records holding only ``test/…`` keys), which describes the checkpoint's own parameters,
is kept. The cut is atomic: the removed lines are first written to
``metrics.jsonl.rewound-S`` (kept, not deleted), then the log is replaced in one
``os.replace``. :func:`drop_rewound` deletes those files once the run has recorded past
their last step.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from jaxscope.record.jsonio import loads, write_atomic
from jaxscope.record.recorder import METRICS_FILE

__all__ = ["drop_rewound", "rewind_log", "rewound_files"]

_EVAL_PREFIX = "test/"


def _record_step(line: str) -> tuple[int | None, bool]:
  """``(step, evaluation only)`` of one line; ``(None, False)`` when it is not a record."""
  try:
    obj = loads(line)
    step, values = obj["step"], obj["values"]
  except (ValueError, KeyError, TypeError):
    return None, False
  if not isinstance(step, int) or not isinstance(values, dict):
    return None, False
  return step, bool(values) and all(k.startswith(_EVAL_PREFIX) for k in values)


def rewind_log(run_dir: str | os.PathLike[str], step: int) -> Path | None:
  """Cuts ``run_dir/metrics.jsonl`` back to the checkpoint of ``step`` (see the module
  docstring).

  Args:
    run_dir: the run directory.
    step: the restored checkpoint's step.

  Returns:
    The file holding the removed lines (``metrics.jsonl.rewound-STEP``), or ``None`` when
    nothing was removed (or there is no log).
  """
  path = Path(run_dir) / METRICS_FILE
  if not path.exists():
    return None
  with open(path, encoding="utf-8", newline="") as f:
    lines = f.read().splitlines(keepends=True)
  kept, cut = [], []
  for line in lines:
    if not line.strip():
      continue
    at, eval_only = _record_step(line)
    keep = at is not None and (at < step or (at == step and eval_only))
    (kept if keep else cut).append(line if line.endswith("\n") else line + "\n")
  if not cut:
    return None
  aside = path.with_name(f"{METRICS_FILE}.rewound-{step}")
  n = 0
  while aside.exists():  # Never overwrite an earlier cut.
    n += 1
    aside = path.with_name(f"{METRICS_FILE}.rewound-{step}.{n}")
  text = "".join(cut).encode()
  write_atomic(aside, lambda f: f.write(text))
  body = "".join(kept).encode()
  write_atomic(path, lambda f: f.write(body))
  return aside


def rewound_files(run_dir: str | os.PathLike[str]) -> list[Path]:
  """The ``metrics.jsonl.rewound-*`` files of ``run_dir``, oldest cut first."""
  found = sorted(Path(run_dir).glob(f"{METRICS_FILE}.rewound-*"), key=lambda p: p.stat().st_mtime)
  return [p for p in found if re.search(r"\.rewound-\d+(\.\d+)?$", p.name)]


def drop_rewound(run_dir: str | os.PathLike[str], step: int) -> list[Path]:
  """Deletes the rewound files whose every record is at a step before ``step`` (the run
  has recorded past them); returns the deleted paths."""
  dropped = []
  for path in rewound_files(run_dir):
    with open(path, encoding="utf-8") as f:
      steps = [_record_step(line)[0] for line in f if line.strip()]
    last = max((s for s in steps if s is not None), default=-1)
    if last < step:
      path.unlink(missing_ok=True)
      dropped.append(path)
  return dropped
