"""A test's body run in a fresh interpreter with XLA at -O0 (the library's jits take no
compiler options, and the flag set for the whole test process changes other tests'
floats), optionally with every program in the persistent compilation cache, so that a run
repeating an earlier one's configuration loads its programs instead of compiling them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: LLVM at -O0: about halves the compilations that are most of these tests' time (the
#: runs a test compares are compiled alike).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def run_fresh(test_file: str, name: str, arg: Path, *, cache: Path | None = None) -> None:
  """Calls ``tests.<test_file's stem>.<name>(arg)`` in a new interpreter and asserts that
  it succeeded (its stderr's end is the message otherwise).

  Args:
    test_file: the calling test's ``__file__``.
    name: a module-level function of that file taking one ``pathlib.Path``.
    arg: the path passed to it.
    cache: with a folder, every program goes to the persistent compilation cache: the
      test process's when it has one (``make test``), else this folder.
  """
  env = {
    **os.environ,
    "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip(),
    "JAX_PLATFORMS": "cpu",
    "MPLBACKEND": "Agg",
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
  }
  if cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(cache))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  code = (
    "import sys, pathlib\n"
    f"from tests.{Path(test_file).stem} import {name} as body\n"
    "body(pathlib.Path(sys.argv[1]))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code, str(arg)],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
