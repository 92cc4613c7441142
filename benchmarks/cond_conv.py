"""Why a convolution's Hessian-vector product is slow inside ``lax.cond`` on XLA:CPU.

The first measured step of the ``full`` instruments on the 3c3d CNN takes ~110 s against
~3 s for the later ones: it refines λ_max with 20 Lanczos steps inside a ``lax.cond``
(README, "Memory: XLA:CPU's scheduler"; jax-ml/jax#12868 reports the same for loops).
This benchmark isolates one HVP of one convolution (5×5, 64 → 96 channels, NHWC, batch
``--batch``), jitted plain and inside a ``lax.cond`` whose predicate is true, times both
interleaved (medians) and reads the compiled programs: the dimension order of every
convolution XLA kept. Outside the branch, XLA:CPU rewrites the kernel-gradient
convolution into the canonical order its fast convolution runs (``b01f_01io->b01f``);
inside the branch that convolution keeps JAX's order (``f01b_i01o->01bf``).

Run from the repository root::

    .venv/bin/python benchmarks/cond_conv.py            # ~1 min on 2 cores

Writes ``benchmarks/results/cond-conv-cpu.json``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxscope  # noqa: E402, F401  (first: its XLA defaults apply before a backend starts)
from benchmarks.common import environment, write_json  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cond-conv-cpu.json"


def _loss(w: jax.Array, x: jax.Array) -> jax.Array:
  y = jax.lax.conv_general_dilated(
    x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jnp.sum(jnp.tanh(y) ** 2)


def _hvp(v: jax.Array, w: jax.Array, x: jax.Array) -> jax.Array:
  return jax.jvp(lambda w_: jax.grad(_loss)(w_, x), (w,), (v,))[1]


def _in_cond(v: jax.Array, w: jax.Array, x: jax.Array, pred: jax.Array) -> jax.Array:
  return jax.lax.cond(pred, _hvp, lambda v_, w_, x_: v_, v, w, x)


def conv_orders(hlo: str) -> list[str]:
  """The ``dim_labels`` of every convolution in a compiled program's text."""
  return re.findall(r" convolution\([^\n]*?dim_labels=(\S+?),", hlo)


def run(batch: int, reps: int) -> dict[str, Any]:
  """Times both programs interleaved; returns the JSON report."""
  kx, kw, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (batch, 32, 32, 64))
  w = 0.05 * jax.random.normal(kw, (5, 5, 64, 96))
  v = jax.random.normal(kv, w.shape)
  pred = jnp.asarray(True)
  programs: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
    "plain": (jax.jit(_hvp), (v, w, x)),
    "in_cond": (jax.jit(_in_cond), (v, w, x, pred)),
  }
  orders = {k: conv_orders(f.lower(*a).compile().as_text()) for k, (f, a) in programs.items()}
  a, b = programs["plain"][0](v, w, x), programs["in_cond"][0](v, w, x, pred)
  rel = jnp.linalg.norm(a - b) / jnp.linalg.norm(a)  # float32 rounding of other sum orders
  times: dict[str, list[float]] = {k: [] for k in programs}
  for f, a in programs.values():
    jax.block_until_ready(f(*a))  # warm-up
  for _ in range(reps):
    for k, (f, a) in programs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      times[k].append(time.perf_counter() - t0)
  med = {k: statistics.median(t) for k, t in times.items()}
  return {
    "environment": environment(),
    "batch": batch,
    "reps": reps,
    "seconds": med,
    "ratio_in_cond_to_plain": med["in_cond"] / med["plain"],
    "relative_difference": float(rel),
    "conv_dim_labels": orders,
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=32, help="examples in the batch (default 32).")
  ap.add_argument("--reps", type=int, default=3, help="timed calls of each program.")
  ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = ap.parse_args(argv)
  report = run(args.batch, args.reps)
  for k, s in report["seconds"].items():
    print(f"{k:8} {s:8.3f} s   convolutions: {', '.join(report['conv_dim_labels'][k])}")
  print(
    f"in_cond / plain: {report['ratio_in_cond_to_plain']:.1f}x; values differ by "
    f"{report['relative_difference']:.1e} (relative)"
  )
  write_json(report, args.out)
  print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
