"""What every benchmark script shares: the environment record, timing statistics, the
problem-list argument, input copies and atomic JSON output."""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import problems
from jaxscope import record, xla

__all__ = [
  "copy_tree",
  "environment",
  "git_version",
  "iqr",
  "problem_list",
  "step_options",
  "write_json",
]

_ROOT = Path(__file__).resolve().parents[1]


def copy_tree(tree: Any) -> Any:
  """Fresh device copies of every leaf (a donated step consumes its inputs)."""
  return jax.tree.map(lambda a: a.copy(), tree)


_CONVOLUTIONAL: dict[str, bool] = {}


def _convolutional(problem: problems.Problem) -> bool:
  if problem.name not in _CONVOLUTIONAL:
    _CONVOLUTIONAL[problem.name] = xla.has_convolution(
      problem.loss, problem.params, problem.x[:1], problem.y[:1]
    )
  return _CONVOLUTIONAL[problem.name]


def step_options(
  problem: problems.Problem, names: Sequence[str], *, hessian_sums: bool
) -> list[str]:
  """The :data:`jaxscope.xla.STEP_OPTIONS` a benchmark compiles a step of ``problem`` with.

  ``["auto"]``: what ``jaxscope train`` chooses by default
  (:func:`jaxscope.xla.step_options` for the problem's model and whether the step adds up
  Hutchinson sums); ``["none"]`` or none: XLA's own; other names as given."""
  names = list(names)
  if names == ["auto"]:
    return xla.step_options(
      convolutional=_convolutional(problem),
      hessian_sums=hessian_sums,
      platform=jax.default_backend(),
    )
  return [] if names == ["none"] else names


def git_version() -> str | None:
  """``git describe --always --dirty`` of the checkout, or ``None`` outside git."""
  try:
    out = subprocess.run(
      ["git", "describe", "--always", "--dirty"],
      cwd=_ROOT,
      capture_output=True,
      text=True,
      timeout=10,
      check=True,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def environment() -> dict[str, Any]:
  """Where a report was measured: device, jax version, CPU count, jaxscope commit, and the
  process defaults jaxscope applied on import (:func:`jaxscope.xla.defaults`)."""
  dev = jax.devices()[0]
  return {
    "device": f"{dev.device_kind}/{dev.platform}",
    "jax": jax.__version__,
    "cpu_count": os.cpu_count(),
    "jaxscope_git": git_version(),
    "jaxscope_process_defaults": xla.defaults(),
  }


def iqr(t: np.ndarray) -> float:
  """Interquartile range of timings."""
  q1, q3 = np.percentile(t, [25, 75])
  return float(q3 - q1)


def problem_list(value: str) -> list[str]:
  """``argparse`` type of ``--problems``: comma-separated names of :data:`problems.PROBLEMS`."""
  names = [v.strip() for v in value.split(",") if v.strip()]
  for p in names:
    if p not in problems.PROBLEMS:
      raise argparse.ArgumentTypeError(
        f"unknown problem {p!r}; problems: {', '.join(problems.PROBLEMS)}."
      )
  return names


def write_json(report: dict[str, Any], path: Path) -> None:
  """Writes ``report`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(record.dumps(report, indent=2))
      f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared.
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
